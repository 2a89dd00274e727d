//! Files as the tests write and read them: atomically (as sync tools do), slowly (as a
//! download), copied from the repository.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::thread;
use std::time::Duration;

use super::repo_path;

/// Writes `path` the way sync tools do: all of it to `.<name>.tmp` beside it, then a rename
/// into place, so the watcher only ever sees the complete file under its final name.
pub fn write_atomically(path: &Path, contents: &[u8]) {
    let parent = path.parent().expect("file has a parent dir");
    fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    let name = path
        .file_name()
        .expect("file has a name")
        .to_str()
        .expect("UTF-8 file name");
    let tmp = parent.join(format!(".{name}.tmp"));
    let mut file = File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
    file.write_all(contents).expect("write temp file");
    file.sync_all().expect("sync temp file");
    drop(file);
    fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), path.display()));
}

/// Writes `path` in place, chunk by chunk with `pause` between chunks, as a slow download
/// would: the watcher sees the file grow (possibly with a partial last line) until it settles.
pub fn write_slowly<C: AsRef<[u8]>>(path: &Path, chunks: &[C], pause: Duration) {
    let parent = path.parent().expect("file has a parent dir");
    fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    let mut file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            thread::sleep(pause);
        }
        file.write_all(chunk.as_ref()).expect("write a chunk");
        file.flush().expect("flush a chunk");
    }
}

/// Copies a repository file (e.g. [`SHARD_0`]) to `dest` in place, creating parent dirs.
pub fn copy_into(relative: &str, dest: &Path) {
    let parent = dest.parent().expect("destination has a parent dir");
    fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    fs::copy(repo_path(relative), dest)
        .unwrap_or_else(|e| panic!("copy {relative} -> {}: {e}", dest.display()));
}

/// Reads a repository file.
pub fn read_repo_file(relative: &str) -> Vec<u8> {
    fs::read(repo_path(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

/// The file name part of a repository path.
pub fn file_name(relative: &str) -> &str {
    relative
        .rsplit('/')
        .next()
        .expect("a path has a last component")
}

/// True when `dir` does not exist or holds nothing.
pub fn dir_is_absent_or_empty(dir: &Path) -> bool {
    match fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => panic!("read dir {}: {e}", dir.display()),
    }
}

/// A file's text (lossy UTF-8), empty when it does not exist yet.
pub(crate) fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// Bytes of every file under `dir` (0 when it does not exist), e.g. a spool's disk usage.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}
