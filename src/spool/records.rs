//! The JSON records stored in the spool's `files`, `quarantine` and `dead` trees. Field names
//! are part of the on-disk format: add fields with `#[serde(default)]`, never rename.

use serde::{Deserialize, Serialize};

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

/// What a quarantine entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuarantineKind {
    /// Bad input (SPEC section 8).
    #[default]
    Bad,
    /// A record whose message the catalog does not know yet (`unknown_message_channel =
    /// "park"`): mapped again each time the catalog changes.
    Parked,
}

/// A bad record or a pointer to it (SPEC section 8), or a parked record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    #[serde(default)]
    pub kind: QuarantineKind,
    /// Parked: the message ids the catalog does not know (decimal).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub message_ids: Vec<String>,
    pub reason: String,
    /// Path relative to `watch.dir`.
    pub file: String,
    /// 1-based line, 0 when the problem is the whole file.
    pub line: u64,
    pub time_ms: u64,
    /// The start of the offending line (lossy UTF-8, at most 4 KiB); parked: the record itself,
    /// as JSON (`input::Record`), holding only its events that wait on the catalog.
    pub raw: String,
}

/// What a quarantine entry is, without its record: what `status` counts (the record, up to a
/// whole parked session, is skipped by the parser, not copied).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct QuarantineTag {
    #[serde(default)]
    pub kind: QuarantineKind,
    #[serde(default)]
    pub message_ids: Vec<String>,
}

/// An event Segment will never take (400 after bisection, or over 32 KB).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub reason: String,
    /// HTTP status, when Segment answered.
    pub status: Option<u16>,
    pub file_id: Option<u64>,
    pub time_ms: u64,
    pub message_id: String,
    /// The event JSON as it would have been sent.
    pub event: String,
}
