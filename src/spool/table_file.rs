//! What the spool's hash table files (`dedupe.tab`, `join.tab`) share: a header at the start
//! ending in a CRC-32 of it, fixed-size pages read and written in place, and rebuilds written
//! at a temporary name beside the table, then renamed over it.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Error, io_err, sync_dir};

/// Deletes the temporary tables of rebuilds that did not finish (`<stem>.<n>.tmp`).
pub(super) fn remove_unfinished(path: &Path) {
    if let (Some(dir), Some(stem)) = (path.parent(), path.file_stem()) {
        let prefix = format!("{}.", stem.to_string_lossy());
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// A zeroed file of a header page and `pages` pages of `page` bytes, at a temporary name
/// beside `path`.
pub(super) fn create_tmp(path: &Path, pages: u64, page: usize) -> Result<(PathBuf, File), Error> {
    let tmp = path.with_extension(format!("{pages}.tmp"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.set_len((pages + 1) * page as u64)
        .map_err(io_err(&tmp))?;
    Ok((tmp, file))
}

/// Writes `fields` and their CRC-32 at the start of the file, and syncs it.
pub(super) fn write_header(file: &File, path: &Path, fields: &[u8]) -> Result<(), Error> {
    let mut h = fields.to_vec();
    h.extend_from_slice(&crc32fast::hash(fields).to_le_bytes());
    file.write_all_at(&h, 0)
        .and_then(|()| file.sync_data())
        .map_err(io_err(path))
}

/// The `len` bytes of header fields, if they are there and their CRC-32 matches.
pub(super) fn read_header(file: &File, len: usize) -> Option<Vec<u8>> {
    let mut h = vec![0u8; len + 4];
    file.read_exact_at(&mut h, 0).ok()?;
    let crc = u32::from_le_bytes(h[len..].try_into().ok()?);
    h.truncate(len);
    (crc32fast::hash(&h) == crc).then_some(h)
}

/// Moves a fully written and synced table from `tmp` to `path`, durably.
pub(super) fn install(tmp: &Path, path: &Path) -> Result<(), Error> {
    fs::rename(tmp, path).map_err(io_err(tmp))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Reads page `page` (the header is page 0) into `buf`, a page long.
pub(super) fn read_page(file: &File, path: &Path, page: u64, buf: &mut [u8]) -> Result<(), Error> {
    file.read_exact_at(buf, page * buf.len() as u64)
        .map_err(io_err(path))
}

pub(super) fn write_page(file: &File, path: &Path, page: u64, buf: &[u8]) -> Result<(), Error> {
    file.write_all_at(buf, page * buf.len() as u64)
        .map_err(io_err(path))
}

/// A checkpoint: unless the header already says `applied` (`durable`), syncs the pages, then
/// writes the header (`header`). Returns what is now durable.
pub(super) fn checkpoint(
    file: &File,
    path: &Path,
    durable: u64,
    applied: u64,
    header: impl FnOnce() -> Result<(), Error>,
) -> Result<u64, Error> {
    if durable != applied {
        file.sync_data().map_err(io_err(path))?;
        header()?;
    }
    Ok(applied)
}

/// Writes committed log values (sequence number, writes) in order until one fails; what failed
/// and what follows stay in `pending`, and `applied` is the last one written.
pub(super) fn apply_in_order<T>(
    pending: &mut Vec<(u64, T)>,
    applied: &mut u64,
    mut write: impl FnMut(&T) -> Result<(), Error>,
) -> Result<(), Error> {
    while let Some((seq, item)) = pending.first() {
        write(item)?;
        *applied = (*applied).max(*seq);
        pending.remove(0);
    }
    Ok(())
}

/// Makes a rebuilt table written at `tmp` durable (its pages, then its header, `header`) and
/// moves it to `path`.
pub(super) fn finish_rebuild(
    file: &File,
    tmp: &Path,
    path: &Path,
    header: impl FnOnce() -> Result<(), Error>,
) -> Result<(), Error> {
    file.sync_data().map_err(io_err(tmp))?;
    header()?;
    install(tmp, path)
}
