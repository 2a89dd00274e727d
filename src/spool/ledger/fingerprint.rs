//! File identity by content. Paths lie (sync tools rename, re-sync under new names, replace
//! files in place) and inodes are reused, so a file is known by what it holds:
//!
//! - its **head**: SHA-256 of its first `min(size, 1024)` bytes (for a file first seen shorter
//!   than 1 KiB, the head grows with it until it covers 1 KiB);
//! - for plain files, its **tail at the committed offset**: SHA-256 of the 1 KiB just before
//!   the offset reading got to, recorded at every commit. A file that grew keeps both; one
//!   truncated or rewritten loses one of them;
//! - for gzip files, also its size: a gzip file is complete when read, so a different size is
//!   different content.
//!
//! A file whose head and tail match a known file's (at any path) is that file: a rename or a
//! re-synced copy is recognised without reading it again.
//!
//! Limits: two different files with identical first KiB *and* identical KiB before the known
//! file's offset are taken for one another (not seen in real exports: session lines carry
//! unique ids). A small file renamed *and* grown at once is not recognised, and is read again:
//! the spool's dedupe index keeps its events from being spooled twice. Content changed between
//! the head and the tail window of a plain file is not noticed (it would have to be rewritten in
//! place with the same length and the same edges).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

use super::FileRecord;

/// Bytes of a file's start that identify it.
pub(crate) const IDENTITY_HEAD_BYTES: u64 = 1024;
/// Bytes before the committed offset that must still be there for the file to read on.
pub(crate) const TAIL_BYTES: u64 = 1024;

/// First 16 bytes of SHA-256, hex: enough to tell files apart, short enough to store per file.
pub(crate) fn hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..16])
}

/// `len` bytes at `offset` (fewer only at end of file).
pub(crate) fn read_at(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut got = 0;
    while got < buf.len() {
        let n = file.read_at(&mut buf[got..], offset + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

/// The head of a file of `size` bytes: its first `min(size, IDENTITY_HEAD_BYTES)` bytes.
pub(crate) fn head(file: &File, size: u64) -> io::Result<Vec<u8>> {
    read_at(file, 0, size.min(IDENTITY_HEAD_BYTES))
}

/// The hash of the `TAIL_BYTES` before `offset` (fewer near the start), recorded at a commit.
pub(crate) fn tail_hash(file: &File, offset: u64) -> io::Result<String> {
    let start = offset.saturating_sub(TAIL_BYTES);
    Ok(hash(&read_at(file, start, offset - start)?))
}

/// How a file on disk relates to a record of a file read before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Relation {
    /// The same content, no more than was read.
    Same,
    /// The same content with more after the committed offset (a plain file that grew).
    Grown,
    /// Different content; the reason is for the log.
    Different(&'static str),
}

/// Compares the file (of `size` bytes) with what `rec` says was read.
pub(crate) fn relate(file: &File, size: u64, rec: &FileRecord) -> io::Result<Relation> {
    if size < rec.head_len {
        return Ok(Relation::Different("shorter than its known first bytes"));
    }
    if hash(&read_at(file, 0, rec.head_len)?) != rec.head_hash {
        return Ok(Relation::Different("its first bytes changed"));
    }
    if rec.gzip {
        return Ok(if size == rec.raw_len {
            Relation::Same
        } else {
            Relation::Different("a gzip file changed size")
        });
    }
    if size < rec.offset {
        return Ok(Relation::Different("truncated below the committed offset"));
    }
    if !rec.tail_hash.is_empty() && tail_hash(file, rec.offset)? != rec.tail_hash {
        return Ok(Relation::Different("rewritten before the committed offset"));
    }
    Ok(if size > rec.offset {
        Relation::Grown
    } else {
        Relation::Same
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::FileStatus;
    use std::io::Write;

    fn record(head: &[u8], gzip: bool, raw_len: u64, offset: u64, tail: &str) -> FileRecord {
        FileRecord {
            path: "f".into(),
            head_len: head.len() as u64,
            head_hash: hash(head),
            tail_hash: tail.into(),
            raw_len,
            gzip,
            offset,
            line: 0,
            events_spooled: 0,
            pending: 0,
            status: FileStatus::Read,
            error: None,
            first_seen_ms: 0,
            updated_ms: 0,
            ..FileRecord::default()
        }
    }

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let h = File::open(f.path()).unwrap();
        (f, h)
    }

    #[test]
    fn same_grown_and_different() {
        let content: Vec<u8> = (0..3000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        let (_f, file) = file_with(&content);
        let size = content.len() as u64;
        let read_to = 2000;
        let head = &content[..IDENTITY_HEAD_BYTES as usize];
        let tail = tail_hash(&file, read_to).unwrap();
        let rec = record(head, false, 0, read_to, &tail);
        assert_eq!(relate(&file, size, &rec).unwrap(), Relation::Grown);
        assert_eq!(relate(&file, read_to, &rec).unwrap(), Relation::Same);
        // Truncated below the offset.
        assert!(matches!(
            relate(&file, 1500, &rec).unwrap(),
            Relation::Different(_)
        ));
        // Same head, different bytes before the offset.
        let mut rewritten = content.clone();
        rewritten[1500] = b'X';
        let (_g, file2) = file_with(&rewritten);
        assert_eq!(
            relate(&file2, size, &rec).unwrap(),
            Relation::Different("rewritten before the committed offset")
        );
        // Different head.
        let mut other = content.clone();
        other[0] = b'#';
        let (_h, file3) = file_with(&other);
        assert_eq!(
            relate(&file3, size, &rec).unwrap(),
            Relation::Different("its first bytes changed")
        );
    }

    #[test]
    fn gzip_files_are_the_same_only_at_the_same_size() {
        let bytes = [0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6];
        let (_f, file) = file_with(&bytes);
        let rec = record(&bytes, true, bytes.len() as u64, 500, "");
        assert_eq!(
            relate(&file, bytes.len() as u64, &rec).unwrap(),
            Relation::Same
        );
        let mut longer = bytes.to_vec();
        longer.push(7);
        let (_g, file2) = file_with(&longer);
        assert!(matches!(
            relate(&file2, 11, &rec).unwrap(),
            Relation::Different(_)
        ));
    }
}
