//! The file ledger: every input file the spool knows, by id ([`FileRecord`] in the `files`
//! tree), found by its path (`paths`) or by its content (`heads`, see [`fingerprint`]), and
//! the one place where a file's state changes.
//!
//! # A file's state
//!
//! ```text
//!            begin                   chunk with file_done              Delivered
//!   (new) ─────────> Reading ─────────────────────────────> Read ─────────────────> Done
//!                     │   ^                                   │                       │
//!           Failed(r) │   │ chunk with file_done              │ ReadAgain             │ ReadAgain
//!                     v   │ (a later pass read it to its end) v                       v
//!                    Failed                                Reading                 Reading
//! ```
//!
//! - [`Ledger::transition`] takes a file through a [`Transition`] outside a commit: reading
//!   again content that grew (`ReadAgain`, from Read or Done), failing with a reason (`Failed`,
//!   from any state), delivered with `after_ingest` done (`Delivered`, from Read).
//! - Inside the spool's transactions, [`progress`] applies what a commit or an ack did to the
//!   record (a [`Progress`]): a chunk moves the offset, line and tail hash, adds its events to
//!   `pending`, and marks the file Read when it was the last; acks and dead letters take events
//!   off `pending` and say when a Read file has none left (a candidate for `after_ingest`);
//!   dead letters put back in the queue add to it again.
//! - Identity changes are their own calls: [`Ledger::begin`] (new content, or a replay),
//!   [`Ledger::begin_copy`] (a copy of content already read), [`Ledger::link_path`] (a rename),
//!   [`Ledger::update_head`] (a small file that grew).
//!
//! `FileRecord`'s field names are part of the on-disk format: add fields with
//! `#[serde(default)]`, never rename.

pub(crate) mod fingerprint;

use std::path::Path;

use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, Transactional, TransactionalTree,
};

use super::store::Store;
use super::{Error, Spool, TxResult, abort, decode_u64};
use crate::clock::now_ms;

/// The file id of events that belong to no file record (quarantined records retried by hand).
pub(crate) const NO_FILE: u64 = u64::MAX;

/// Where a file stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    /// Being read, or waiting to be read on (it may grow).
    #[default]
    Reading,
    /// Every record is in the spool; events may still be waiting for delivery.
    Read,
    /// All events delivered and `after_ingest` done.
    Done,
    /// Could not be read (its error is in `error`); retried when it changes.
    Failed,
}

/// One input file as the spool knows it: identity, read position and progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Path relative to `watch.dir` when last seen (lossy UTF-8, for humans).
    pub path: String,
    /// How many leading bytes `head_hash` covers.
    pub head_len: u64,
    /// SHA-256 (first 16 bytes, hex) of the file's first `head_len` raw bytes: its identity.
    pub head_hash: String,
    /// SHA-256 (16 bytes, hex) of the 1 KiB before `offset` at the last commit (plain files):
    /// the file still holds what was read if this still matches.
    #[serde(default)]
    pub tail_hash: String,
    /// Size of the file as read (gzip files: they do not grow, so a new size is new content).
    #[serde(default)]
    pub raw_len: u64,
    pub gzip: bool,
    /// Decompressed bytes committed (read and spooled).
    pub offset: u64,
    /// Lines committed.
    pub line: u64,
    pub events_spooled: u64,
    /// Spooled events not yet delivered.
    pub pending: u64,
    pub status: FileStatus,
    #[serde(default)]
    pub error: Option<String>,
    pub first_seen_ms: u64,
    pub updated_ms: u64,
    /// Read by `replay` (an operator's explicit re-send): `path` is absolute, the record is
    /// nobody's identity (neither its path nor its content names it for the watcher), its
    /// events skipped the dedupe check, and `after_ingest` leaves the file alone.
    #[serde(default)]
    pub replay: bool,
    /// The format the reader detected (`sessions`, `engagements-json`, ...), once read.
    #[serde(default)]
    pub format: String,
}

/// A change of a file's state outside a commit (see the state diagram in the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Read or Done -> Reading: new content in a file read before (it grew). A file Reading
    /// or Failed stays as it is (a failed file is Read again once a pass reads it to its end).
    ReadAgain,
    /// Any -> Failed, with why: unreadable, damaged, vanished while being read, a join that
    /// cannot go on.
    Failed(String),
    /// Read -> Done: every event delivered and `after_ingest` done.
    Delivered,
}

/// What a commit or an ack did to a file, applied in its transaction (see [`progress`]).
pub(super) enum Progress<'a> {
    /// A chunk committed: the file's new position, `spooled` events more pending, and Read
    /// when `file_done`.
    Chunk {
        offset: u64,
        line: u64,
        tail_hash: Option<&'a str>,
        spooled: u64,
        file_done: bool,
        now: u64,
    },
    /// Events of the file left the queue (delivered or dead-lettered).
    EventsRemoved(u64),
    /// Dead letters of the file went back into the queue.
    EventsRequeued(u64),
}

/// Applies `t` to `rec`; false when it does not apply to the record's state (nothing changes).
fn step(rec: &mut FileRecord, t: &Transition) -> bool {
    match t {
        Transition::ReadAgain => {
            if !matches!(rec.status, FileStatus::Read | FileStatus::Done) {
                return false;
            }
            rec.status = FileStatus::Reading;
        }
        Transition::Failed(reason) => {
            rec.status = FileStatus::Failed;
            rec.error = Some(reason.clone());
        }
        Transition::Delivered => {
            if rec.status != FileStatus::Read {
                return false;
            }
            rec.status = FileStatus::Done;
        }
    }
    true
}

/// In a spool transaction: applies `p` to file `id`'s record. For `EventsRemoved`, true when
/// the file is Read with nothing left pending (a candidate for `after_ingest`). A chunk of
/// [`NO_FILE`] (retried quarantine entries) has no record; any other missing record aborts
/// the chunk's transaction as damage.
pub(super) fn progress(files: &TransactionalTree, id: u64, p: &Progress) -> TxResult<bool> {
    let key = id.to_be_bytes();
    let Some(v) = files.get(key)? else {
        return match p {
            Progress::Chunk { .. } if id != NO_FILE => abort(format!("file record {id}")),
            _ => Ok(false),
        };
    };
    let mut rec = decode_tx(&v)?;
    let mut done = false;
    match *p {
        Progress::Chunk {
            offset,
            line,
            tail_hash,
            spooled,
            file_done,
            now,
        } => {
            rec.offset = offset;
            rec.line = line;
            if let Some(t) = tail_hash {
                rec.tail_hash = t.to_owned();
            }
            rec.events_spooled += spooled;
            rec.pending += spooled;
            rec.updated_ms = now;
            if file_done {
                rec.status = FileStatus::Read;
            }
        }
        Progress::EventsRemoved(n) => {
            rec.pending = rec.pending.saturating_sub(n);
            done = rec.pending == 0 && rec.status == FileStatus::Read;
        }
        Progress::EventsRequeued(n) => rec.pending += n,
    }
    files.insert(&key, encode(&rec))?;
    Ok(done)
}

/// The path of file `id` as last seen ("" when unknown), for messages.
pub(super) fn path_of(s: &Store, id: u64) -> Result<String, Error> {
    Ok(s.files
        .get(id.to_be_bytes())
        .map_err(|e| s.sled_err(e))?
        .and_then(|v| serde_json::from_slice::<FileRecord>(&v).ok())
        .map(|r| r.path)
        .unwrap_or_default())
}

fn encode(rec: &FileRecord) -> Vec<u8> {
    serde_json::to_vec(rec).unwrap_or_default()
}

fn decode_tx(v: &[u8]) -> TxResult<FileRecord> {
    serde_json::from_slice(v)
        .map_err(|e| ConflictableTransactionError::Abort(format!("file record: {e}")))
}

fn decode(s: &Store, id: u64, v: &[u8]) -> Result<FileRecord, Error> {
    serde_json::from_slice(v).map_err(|_| s.corrupt(format!("file record {id}")))
}

fn head_key(head_hash: &str, id: u64) -> Vec<u8> {
    let mut k = head_hash.as_bytes().to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn path_key(path: &Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes()
}

/// The ledger of an open spool (see [`Spool::ledger`]).
pub struct Ledger<'a> {
    pub(super) spool: &'a Spool,
}

impl Ledger<'_> {
    pub(crate) fn file(&self, id: u64) -> Result<Option<FileRecord>, Error> {
        let s = self.spool.store();
        match s.files.get(id.to_be_bytes()).map_err(|e| s.sled_err(e))? {
            Some(v) => decode(&s, id, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Every file the spool knows, by id.
    pub(crate) fn files(&self) -> Result<Vec<(u64, FileRecord)>, Error> {
        let s = self.spool.store();
        s.json_entries(&s.files, "file record")
    }

    /// The file last seen at `path` (relative to the watch dir).
    pub(crate) fn file_by_path(&self, path: &Path) -> Result<Option<(u64, FileRecord)>, Error> {
        let s = self.spool.store();
        let Some(id) = s
            .paths
            .get(path_key(path))
            .map_err(|e| s.sled_err(e))?
            .and_then(|v| decode_u64(&v))
        else {
            return Ok(None);
        };
        drop(s);
        Ok(self.file(id)?.map(|r| (id, r)))
    }

    /// Files whose first bytes hash to `head_hash`: candidates for "the same content".
    pub(crate) fn files_with_head(&self, head_hash: &str) -> Result<Vec<(u64, FileRecord)>, Error> {
        let s = self.spool.store();
        let mut out = Vec::new();
        for item in s.heads.scan_prefix(head_hash.as_bytes()) {
            let (k, _) = item.map_err(|e| s.sled_err(e))?;
            let Some(id) = k.get(k.len().saturating_sub(8)..).and_then(decode_u64) else {
                continue;
            };
            if let Some(v) = s.files.get(id.to_be_bytes()).map_err(|e| s.sled_err(e))? {
                out.push((id, decode(&s, id, &v)?));
            }
        }
        Ok(out)
    }

    /// Registers a file about to be read for the first time (or read anew because its content
    /// changed) and points its path at it. Durable before it returns.
    pub fn begin(&self, path: &Path, record: &FileRecord) -> Result<u64, Error> {
        let s = self.spool.store();
        let id = s.new_id()?;
        (&s.files, &s.paths, &s.heads)
            .transaction(|(files, paths, heads)| {
                files.insert(&id.to_be_bytes(), encode(record))?;
                if !record.replay {
                    paths.insert(path_key(path), &id.to_be_bytes())?;
                    heads.insert(head_key(&record.head_hash, id), &[])?;
                }
                Ok(())
            })
            .map_err(|e: TransactionError<String>| s.tx_err(e))?;
        s.flush()?;
        Ok(id)
    }

    /// Registers `path` as a copy of `original` (the same content under another name, say a
    /// re-sync): a record of its own starting where the original stands, with no events of its
    /// own, Read where the original is Done (its `after_ingest` is its own). Returns its id and
    /// record.
    pub(crate) fn begin_copy(
        &self,
        path: &Path,
        original: &FileRecord,
    ) -> Result<(u64, FileRecord), Error> {
        let mut copy = original.clone();
        copy.path = path.to_string_lossy().into_owned();
        copy.events_spooled = 0;
        copy.pending = 0;
        copy.first_seen_ms = now_ms();
        if copy.status == FileStatus::Done {
            copy.status = FileStatus::Read;
        }
        Ok((self.begin(path, &copy)?, copy))
    }

    /// Points `path` at a known file (a rename, or a copy of content already read).
    pub(crate) fn link_path(&self, path: &Path, id: u64) -> Result<(), Error> {
        let s = self.spool.store();
        let shown = path.to_string_lossy().into_owned();
        (&s.files, &s.paths)
            .transaction(|(files, paths)| {
                paths.insert(path_key(path), &id.to_be_bytes())?;
                if let Some(v) = files.get(id.to_be_bytes())? {
                    let mut rec = decode_tx(&v)?;
                    rec.path.clone_from(&shown);
                    files.insert(&id.to_be_bytes(), encode(&rec))?;
                }
                Ok(())
            })
            .map_err(|e: TransactionError<String>| s.tx_err(e))?;
        s.flush()
    }

    /// Widens a file's head (a small file that grew) and re-indexes it.
    pub(crate) fn update_head(&self, id: u64, head_len: u64, head_hash: &str) -> Result<(), Error> {
        let s = self.spool.store();
        (&s.files, &s.heads)
            .transaction(|(files, heads)| {
                let Some(v) = files.get(id.to_be_bytes())? else {
                    return Ok(());
                };
                let mut rec = decode_tx(&v)?;
                heads.remove(head_key(&rec.head_hash, id))?;
                rec.head_len = head_len;
                rec.head_hash = head_hash.to_owned();
                heads.insert(head_key(head_hash, id), &[])?;
                files.insert(&id.to_be_bytes(), encode(&rec))?;
                Ok(())
            })
            .map_err(|e: TransactionError<String>| s.tx_err(e))
    }

    /// Records the format the reader detected.
    pub(crate) fn set_format(&self, id: u64, format: &str) -> Result<(), Error> {
        self.rewrite(id, |r| {
            r.format = format.to_owned();
            true
        })
    }

    /// Takes file `id` through `t` (see the module doc). A transition that does not apply to
    /// the file's state changes nothing.
    pub(crate) fn transition(&self, id: u64, t: Transition) -> Result<(), Error> {
        self.rewrite(id, |r| step(r, &t))
    }

    /// Rewrites a record (not flushed: a crash that loses it reads or delivers again). `f`
    /// says whether it changed anything.
    fn rewrite(&self, id: u64, f: impl Fn(&mut FileRecord) -> bool) -> Result<(), Error> {
        let s = self.spool.store();
        s.files
            .transaction(|files| {
                let key = id.to_be_bytes();
                if let Some(v) = files.get(key)? {
                    let mut rec = decode_tx(&v)?;
                    if f(&mut rec) {
                        rec.updated_ms = now_ms();
                        files.insert(&key, encode(&rec))?;
                    }
                }
                Ok(())
            })
            .map_err(|e| s.tx_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_apply_only_from_their_states() {
        use FileStatus::*;
        for (from, t, to) in [
            (Read, Transition::ReadAgain, Reading),
            (Done, Transition::ReadAgain, Reading),
            (Reading, Transition::ReadAgain, Reading),
            (Failed, Transition::ReadAgain, Failed),
            (Reading, Transition::Failed("x".into()), Failed),
            (Done, Transition::Failed("x".into()), Failed),
            (Read, Transition::Delivered, Done),
            (Reading, Transition::Delivered, Reading),
            (Failed, Transition::Delivered, Failed),
        ] {
            let mut rec = FileRecord {
                status: from,
                ..FileRecord::default()
            };
            let changed = step(&mut rec, &t);
            assert_eq!(rec.status, to, "{from:?} {t:?}");
            assert_eq!(changed, from != to, "{from:?} {t:?}");
        }
        let mut rec = FileRecord::default();
        step(&mut rec, &Transition::Failed("gone".into()));
        assert_eq!(rec.error.as_deref(), Some("gone"));
    }

    #[test]
    fn transitions_and_copies_through_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 8 << 20).unwrap();
        let ledger = spool.ledger();
        let id = ledger
            .begin(
                Path::new("a"),
                &FileRecord {
                    path: "a".into(),
                    head_hash: "h".into(),
                    ..FileRecord::default()
                },
            )
            .unwrap();
        ledger.transition(id, Transition::Delivered).unwrap();
        assert_eq!(
            ledger.file(id).unwrap().unwrap().status,
            FileStatus::Reading
        );
        spool
            .commit_file_chunk(&super::super::Chunk {
                file_id: id,
                file_done: true,
                ..Default::default()
            })
            .unwrap();
        ledger.transition(id, Transition::Delivered).unwrap();
        let rec = ledger.file(id).unwrap().unwrap();
        assert_eq!(rec.status, FileStatus::Done);
        let (copy_id, copy) = ledger.begin_copy(Path::new("b"), &rec).unwrap();
        assert_eq!((copy.status, copy.path.as_str()), (FileStatus::Read, "b"));
        assert_eq!(
            ledger.file_by_path(Path::new("b")).unwrap().unwrap().0,
            copy_id
        );
        assert_eq!(ledger.files_with_head("h").unwrap().len(), 2);
        ledger.transition(id, Transition::ReadAgain).unwrap();
        assert_eq!(
            ledger.file(id).unwrap().unwrap().status,
            FileStatus::Reading
        );
    }
}
