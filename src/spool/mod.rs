//! The durable spool: segment files holding the events not yet accepted by Segment, a sled
//! 0.34.7 database holding where they are, the read position of every input file, the dedupe
//! log, the quarantine and the dead letters, and a hash table file for the dedupe index.
//!
//! # On-disk format (version 3)
//!
//! Under `spool.dir`: `CURRENT` names the current generation, `gen-<n>/` is a sled database
//! (sled's own files: `db`, `conf`, `blobs/`, `snap.*`), `segments/` holds the events
//! themselves in append-only files (see `segments.rs`), `dedupe.tab` the dedupe index (see
//! `dedupe.rs`), `join.tab` the CSV export join's state (see `join_table.rs`), and
//! `corrupt-<unix time>/` holds a generation that could not be opened, with
//! its segments and dedupe table (see `store.rs` for the generation rules). Trees:
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `meta` | ASCII name | `format_version` u32 BE (= 3); `live_bytes`, `depth`, `next_id`, `dedupe_next` u64 BE; `segment_end` (segment u64, offset u64 BE); `catalog_cache` JSON (the Leanplum catalog last fetched) |
//! | `queue` | key of the packet's first event, u64 BE (FIFO: sled iterates keys in byte order) | where the packet of consecutive events of one file is in the segments (see `segments.rs`), or, written by version 2, the packet itself (see `packet.rs`) |
//! | `acked` | packet key, u64 BE | bitmap of its events already delivered or dead-lettered, while others remain |
//! | `files` | file id, u64 BE | [`FileRecord`] as JSON |
//! | `paths` | path bytes (relative to `watch.dir`) | file id u64 BE |
//! | `heads` | head hash (32 hex ASCII) + file id u64 BE | empty: files by content |
//! | `dedupe` | log sequence number, u64 BE | the dedupe entries one commit added, not yet in `dedupe.tab` durably (see `dedupe.rs`) |
//! | `quarantine` | id u64 BE | [`QuarantineEntry`] as JSON (bad input) |
//! | `dead` | id u64 BE | [`DeadLetter`] as JSON (events Segment will never take) |
//! | `join_log` | log sequence number, u64 BE | the join writes one commit made, not yet in `join.tab` durably (see `join_table.rs`); `meta/join_next` is the next number |
//! | `join_sessions`, `join_waiting`, `join_params`, `join_jobs` | see `join.rs` | the CSV export join's state as the first agents with the join kept it (`meta/join_waiting` counted `join_waiting`): moved into `join.tab` at open, empty after |
//!
//! The join came after version 3 without a new version: a spool without its trees and table is
//! a spool with nothing waiting, and an older agent never reads them (a compaction by an older
//! agent would drop the log, and with it what waits there).
//!
//! Version 1 kept one queue key per event and one dedupe key per `messageId`: sled's memory
//! grows with the number of keys, so a backlog of millions grew the agent by tens of MB per
//! million. Version 2 packed events into packets kept in sled; sled's memory and the time it
//! takes to open still grew with the bytes written, so version 3 keeps the packets in segment
//! files. Version 3 reads version 1 queue values as packets of one and version 2 packets where
//! they are (they drain first); an agent opening a version 1 or 2 spool moves its dedupe
//! entries into `dedupe.tab`.
//!
//! `live_bytes` and `depth` are kept by us, not taken from the files' sizes: a segment holds
//! delivered events until all of it is delivered, and sled 0.34 does not shrink its files when
//! keys are removed. Disk space comes back after an outage as the drain deletes the segments it
//! has passed; [`Spool::compact`] copies sled's live data into a fresh generation when its
//! files have grown far past it.
//!
//! # Transactions
//!
//! 1. [`Spool::commit_file_chunk`]: the chunk's new events are appended to the active segment
//!    as packets and the segment is `fdatasync`ed; then one sled transaction takes the packets'
//!    locations into `queue`, the segments' new end into `meta`, the new events' dedupe
//!    entries into the `dedupe` log (duplicates skipped, oversize events into `dead`), the bad
//!    lines into `quarantine`, the chunk's join writes ([`Chunk::join`]: what the rows
//!    contributed, and the removal of the waiting records whose events the chunk carries) as
//!    one value into the `join_log` with `meta/join_next`, the file's new offset into `files`,
//!    and `live_bytes`/`depth` into `meta`; then `Db::flush` and an fsync of sled's data file.
//!    The offset counts as durable only once that returns. Then the dedupe entries go into
//!    `dedupe.tab` (see `dedupe.rs`) and the join writes into `join.tab` (see
//!    `join_table.rs`).
//! 2. [`Spool::ack`]: after a 2xx, the batch's events are marked in `acked` (a packet whose
//!    events are all marked leaves `queue` and `acked`), `meta` and the files' `pending` counts
//!    go down; one transaction, not flushed here (sled writes its buffers out
//!    every 200 ms, see `store.rs`). A crash that loses it re-sends that batch: Segment dedupes
//!    by `messageId`.
//! 3. [`Spool::dead_letter`]: events Segment rejected for good move from `queue` to `dead`.
//!
//! # What a crash leaves
//!
//! - `kill -9` before transaction 1 is flushed: neither the events nor the offset; the chunk is
//!   read again (segment bytes it appended lie past the committed end and are cut off at the
//!   next open). After it: both. There is no state with the offset advanced but the events
//!   missing, or the reverse: they are one transaction, sled recovers to a transaction
//!   boundary, and the segment bytes it points at were synced before it.
//! - The CSV export join likewise: a waiting record's removal is logged in the transaction
//!   that spools the events it became, and a row's contribution (a session, a waiting record,
//!   a parameter) is logged with the offset past the row. A crash before it reads the rows
//!   again and does the same; after it, the rows are not read again and nothing they released
//!   is released twice (a row read twice, say a session re-sent, finds nothing left to
//!   release, and its events' `messageId`s are in the dedupe index anyway). `join.tab` only
//!   ever takes writes of committed transactions, after their flush; what it took since its
//!   last checkpoint is in the log and applied again at open (put or remove a key, in commit
//!   order: idempotent, so writes that reached the table before the crash do no harm). Commits
//!   that release waiting records without moving the offset (a session with very many, the
//!   end of an `eventparameters` file) are just as atomic; the file is marked read only after
//!   the last.
//! - Between a 2xx and the flush of transaction 2: the batch is still queued and is sent again
//!   (same `messageId`s).
//! - During a compaction: either the old generation (the new one is debris, deleted at open) or
//!   the complete new one.
//!
//! # Damage
//!
//! A packet whose bytes are missing or fail their checksum (a damaged disk, a deleted segment)
//! is taken out of the queue with a quarantine entry naming its file and the events lost, so the
//! drain goes on (see [`Spool::peek`]). A database sled cannot open is moved aside (see
//! `store.rs`).
//!
//! # Power loss
//!
//! A power cut keeps what was fsynced and may drop anything else, including directory entries
//! not synced through their directory. What each file of the spool relies on:
//!
//! | file | written by | made durable by |
//! | --- | --- | --- |
//! | `segments/<id>.seg` | our appends | `fdatasync` before the commit's transaction; a new segment's entry by an fsync of `segments/` at its creation; deletions only after a flush of the acks that emptied them |
//! | `gen-<n>/db` (sled's log) | sled | `Db::flush` ends in `sync_file_range`, which is no sync (no metadata, no disk cache, and on FUSE nothing at all): our `fsync` of `db` after it |
//! | `gen-<n>/blobs/*` | sled, for log items over 128 KiB | nothing in sled 0.34.7: we fsync every new blob file, then `blobs/`, *before* `db` (see `Store::flush`) |
//! | `gen-<n>/conf`, `snap.*` | sled, at open | sled syncs neither `conf` nor the directory after the snapshot's rename: we fsync them and the directories once per open |
//! | `dedupe.tab` | our page writes after each commit | fsync at its checkpoints and rebuilds; the header's `applied` is written after the pages are synced |
//! | `join.tab` | our page writes after each commit with join writes | the same as `dedupe.tab`: fsync at its checkpoints (every 8 MB of log, the maintenance tick, close) and rebuilds, then the header's `applied`; only then are the log values it covers deleted |
//! | `CURRENT` | compaction | temp file, fsync, rename, fsync of `spool.dir` |
//!
//! The blob files were the hole (found with a file system that drops unsynced data at a
//! "power cut", see `tests/integration/power_cut.rs`): sled writes a big node to a blob file
//! and never syncs it; after a cut the file is empty, sled's recovery stops reading its log at
//! the first item pointing at it, and every transaction after it is gone, flushed or not. The
//! dedupe table, synced at a checkpoint after those transactions, then held ids whose events
//! and offsets the database had lost, and the files read again from their older offsets had
//! those events skipped as duplicates: committed events lost for good.
//!
//! Two rules keep the dedupe table from ever causing loss:
//! - entries go into the table only after the commit that logs them is durable (the order
//!   above), so the table never runs ahead of a database that keeps its promises;
//! - every commit that logs entries also records `meta/dedupe_next`. A table whose `applied`
//!   is not below it holds ids of transactions the database no longer has: at open it is
//!   replaced by an empty one (logged as an error), and the log refills what it still holds.
//!   Dedupe entries can be lost that way (a re-exported event may be sent again; Segment
//!   dedupes by `messageId`), events cannot.
//!
//! `join.tab` follows the first rule the same way, with `meta/join_next`. A join table found
//! ahead of the database is kept, not emptied (logged as an error): nothing else holds the
//! join's state, and the rows of the lost transactions, read again, put the same records. A
//! torn page of `join.tab` (a power cut in the middle of a 4 KiB write after its last
//! checkpoint) is not detected; the log puts every key it wrote again, so only records of
//! older commits sharing that page are at risk.
//!
//! Not covered: writes after the last commit (ack removals, file status changes), which come
//! back as re-sends or re-reads, never as loss. Pages of `dedupe.tab` written after its last
//! checkpoint are either lost (their entries come back from the log) or survive, and then
//! belong to commits the database holds, by the first rule. The one case not caught: a
//! database that loses transactions it flushed *after* the table's last checkpoint, while the
//! page writes that followed them reach the disk; the first rule is what excludes it.
//!
//! # Ordering
//!
//! Queue keys come from a counter initialised past the last key at open and are allocated under
//! the writer lock, so keys are committed in increasing order; the drain reads only below
//! [`Spool::watermark`], the first key not yet committed, so it never skips a key that a
//! transaction was still writing.

mod dedupe;
pub mod join;
mod join_table;
mod packet;
mod records;
mod segments;
mod store;
mod table_file;

use store::Store;

pub use join::{JoinOp, JoinTree};
pub use records::{
    DeadLetter, FileRecord, FileStatus, QuarantineEntry, QuarantineKind, QuarantineTag,
};

use sled::IVec;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use crate::segment::MAX_EVENT_BYTES;

/// The file id of events that belong to no file record (quarantined records retried by hand).
pub const NO_FILE: u64 = u64::MAX;

/// Bumped when the layout above changes; an older binary refuses a newer spool, a newer one
/// upgrades an older spool when an agent opens it (see [`Spool::open`]).
pub const FORMAT_VERSION: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// sled failed (I/O, or a corrupt database).
    #[error("spool {path}: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// A filesystem call around sled failed (fsync, creating the directory).
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another process (a running agent) holds the spool.
    #[error("spool {path} is in use by another process (is the agent already running?)")]
    Locked { path: PathBuf },
    /// The spool was written by a newer version of the agent.
    #[error("spool {path} has format version {found}, this agent reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    /// A stored value does not decode: the database is damaged.
    #[error("spool {path}: corrupt {what}")]
    Corrupt { path: PathBuf, what: String },
}

impl Error {
    /// True when the disk is full: the caller pauses reading instead of failing.
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            Error::Io { source, .. } => Some(source),
            Error::Sled {
                source: sled::Error::Io(e),
                ..
            } => Some(e),
            _ => None,
        };
        // sled hands back clones of its stored error, which keep the kind but not the errno.
        io.is_some_and(|e| {
            e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == std::io::ErrorKind::StorageFull
        })
    }
}

/// One event ready for the spool: its Segment `messageId` (the dedupe key) and its JSON.
#[derive(Debug, Clone)]
pub struct SpoolEvent {
    pub message_id: String,
    pub json: Vec<u8>,
}

/// One chunk of a file: its events and bad lines, and where reading got to.
#[derive(Debug, Default)]
pub struct Chunk {
    pub file_id: u64,
    /// Offset (decompressed bytes) just past the last record of the chunk.
    pub offset: u64,
    /// Lines read so far (the line number of the last record of the chunk).
    pub line: u64,
    pub events: Vec<SpoolEvent>,
    pub quarantine: Vec<QuarantineEntry>,
    /// Marks the file as fully read (all its records are in the spool).
    pub file_done: bool,
    /// The file's tail hash at `offset` (plain files; see `ingest::fingerprint`).
    pub tail_hash: Option<String>,
    /// `replay`: spool the events even if their ids were seen (they are still recorded as seen).
    pub skip_dedupe: bool,
    /// Writes to the CSV export join's trees (see `join.rs`), committed with the rest.
    pub join: Vec<JoinOp>,
}

/// What a commit did with the chunk's events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChunkOutcome {
    pub spooled: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub quarantined: u64,
}

/// A queued event as the drain sees it.
#[derive(Debug, Clone)]
pub struct Queued {
    pub key: u64,
    pub file_id: u64,
    pub enqueued_ms: u64,
    /// The event JSON (no header).
    pub json: IVec,
    /// The packet holding the event (its first event's key), the event's place in it, and
    /// the packet's number of events (see `packet.rs`).
    pub packet: u64,
    pub index: u16,
    pub packet_len: u16,
}

/// What a compaction gave back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    pub disk_before: u64,
    pub disk_after: u64,
}

/// The result of [`Spool::peek`].
#[derive(Debug, Default)]
pub struct Peeked {
    pub items: Vec<Queued>,
    /// Stopped at `max_events` or the byte budget: more events are waiting.
    pub full: bool,
}

/// Depth of the queue, kept by us (see the module doc).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    pub events: u64,
    pub bytes: u64,
}

pub struct Spool {
    /// `spool.dir`: holds `CURRENT` and the generations (see the module doc).
    dir: PathBuf,
    cache_bytes: u64,
    /// The open generation. Read-locked by every operation; write-locked only to swap in a
    /// compacted generation.
    store: RwLock<Store>,
    /// Next queue key and the segment writer; held for the whole of a commit so keys commit
    /// in order.
    writer: Mutex<Writer>,
    /// `spool.dir/segments` (see `segments.rs`).
    segments_dir: PathBuf,
    /// Segments below this one are known to be deleted already.
    segments_removed_below: AtomicU64,
    /// First queue key not yet committed.
    watermark: AtomicU64,
    /// The day dedupe entries were last pruned below (see [`Spool::prune_dedupe`]).
    pruned_day: std::sync::atomic::AtomicU32,
    /// The CSV export join's table and log position (see `join.rs`); locked after `writer`
    /// and `store`.
    join: Mutex<join::State>,
    /// The "no size" warning of [`Spool::disk_nearly_full`] was given.
    unsized_fs_logged: std::sync::atomic::AtomicBool,
    /// What `open` had to repair, for status.
    recovered: Option<String>,
    /// Our flock on `spool.dir/LOCK`, held as long as an agent has the spool open (`None` for
    /// a look by `status`).
    _lock: Option<File>,
}

/// A queued packet whose bytes cannot be read (see [`Spool::set_aside_damaged`]).
struct Damaged {
    first: u64,
    loc: segments::Location,
}

/// What the writer lock guards.
struct Writer {
    /// The next queue key.
    next: u64,
    segments: segments::Writer,
    /// The dedupe table, opened at the first commit (at open for an agent).
    dedupe: Option<dedupe::Table>,
    /// The next dedupe log sequence number, and the entries logged since the last checkpoint.
    log_seq: u64,
    unsynced: u64,
}

/// Queue entries to commit: a packet's first key and its location.
type QueueEntries = Vec<(u64, segments::LocationBytes)>;

impl Writer {
    /// Appends packets (encoded, with their numbers of events) to the segments, durably.
    /// Returns the queue entries to commit (first key -> location), the segment end to commit
    /// with them, and the key after the last event.
    fn write_packets(
        &mut self,
        first_key: u64,
        packets: &[segments::Packet],
    ) -> Result<(QueueEntries, segments::End, u64), Error> {
        let (locations, end) = self.segments.append(packets)?;
        let mut key = first_key;
        let entries = locations
            .iter()
            .map(|l| {
                let k = key;
                key += u64::from(l.events);
                (k, l.encode())
            })
            .collect();
        Ok((entries, end, key))
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.dir).finish()
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<String>>;

impl Spool {
    /// Opens (or creates) the spool under `dir`, with sled's page cache capped at `cache_bytes`.
    /// A spool sled cannot open (or panics opening) is moved aside and replaced by an empty one;
    /// [`Spool::recovered`] then says so. A spool from a newer agent is an error, never moved.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Spool, Error> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        // Only agents take LOCK, so a held one means another agent: refuse at once. (`status`
        // on a stopped agent holds sled's own lock for a moment instead, which `open_current`
        // waits out.)
        let lock = store::lock(dir)?;
        let (store, recovered) = store::open_current(dir, cache_bytes)?;
        let cut = segments::repair(&segments::dir(dir), store.segment_end()?)?;
        if cut > 0 {
            tracing::info!(
                bytes = cut,
                "spool: cut off segment bytes of a commit that did not finish"
            );
        }
        let mut table = dedupe::Table::open(&dedupe::path(dir))?;
        let version = store.format_version()?;
        if version < FORMAT_VERSION {
            // Version 1 and 2 packets stay in sled's queue and drain from there; their dedupe
            // entries move into the table.
            let moved = store.migrate_dedupe(version, &mut table)?;
            store.set_format_version()?;
            tracing::info!(
                dedupe_ids = moved,
                "spool upgraded from format version {version} to {FORMAT_VERSION}"
            );
        }
        let spool = Spool::from_store(dir, cache_bytes, store, recovered, Some(lock))?;
        {
            // The table's log is replayed now, not at the first commit.
            let mut w = spool.writer();
            spool.install_table(&mut w, &spool.store(), table)?;
        }
        // The join's table is brought up to its log now too, and the state of a spool written
        // before it moves in (see `join.rs`).
        spool.join_waiting_count()?;
        let moved = spool.migrate_join_trees()?;
        if moved > 0 {
            tracing::info!(
                keys = moved,
                "join state moved from sled trees into join.tab"
            );
        }
        Ok(spool)
    }

    /// Opens an existing spool to look at it (no agent running): repairs, deletes and creates
    /// nothing. `Ok(None)` when there is no spool at `dir`; [`Error::Locked`] when an agent
    /// holds it.
    pub fn open_existing(dir: &Path, cache_bytes: u64) -> Result<Option<Spool>, Error> {
        match store::open_existing(dir, cache_bytes)? {
            Some(store) => Spool::from_store(dir, cache_bytes, store, None, None).map(Some),
            None => Ok(None),
        }
    }

    /// Opens the spool of a stopped agent once and closes it, which makes sled write a snapshot
    /// of its log: sled 0.34 writes one only when it opens, and at every open scans the log
    /// written since the last snapshot (about a second per GB). Called as an agent exits, so
    /// the next start reads only the snapshot. Repairs nothing: a damaged spool is left for the
    /// next start to deal with.
    pub fn checkpoint(dir: &Path) -> Result<(), Error> {
        Spool::open_existing(dir, 8 << 20).map(drop)
    }

    /// Whether a process (a running agent) holds the spool at `dir`. Takes and drops the lock:
    /// for a clear message before daemonizing, not as a guarantee.
    pub fn is_locked(dir: &Path) -> bool {
        dir.join("LOCK").exists() && matches!(store::lock(dir), Err(Error::Locked { .. }))
    }

    fn from_store(
        dir: &Path,
        cache_bytes: u64,
        store: Store,
        recovered: Option<String>,
        lock: Option<File>,
    ) -> Result<Spool, Error> {
        let next = store.next_queue_key()?;
        let end = store.segment_end()?;
        let segments_dir = segments::dir(dir);
        Ok(Spool {
            dir: dir.to_owned(),
            cache_bytes,
            store: RwLock::new(store),
            writer: Mutex::new(Writer {
                next,
                segments: segments::Writer::new(&segments_dir, end),
                dedupe: None,
                log_seq: 0,
                unsynced: 0,
            }),
            segments_dir,
            segments_removed_below: AtomicU64::new(0),
            watermark: AtomicU64::new(next),
            pruned_day: Default::default(),
            join: Default::default(),
            unsized_fs_logged: Default::default(),
            recovered,
            _lock: lock,
        })
    }

    fn store(&self) -> RwLockReadGuard<'_, Store> {
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The dedupe table, opened on first use (an agent's `open` installs it at once).
    fn table<'w>(&self, w: &'w mut Writer, s: &Store) -> Result<&'w mut dedupe::Table, Error> {
        if w.dedupe.is_none() {
            let t = dedupe::Table::open(&dedupe::path(&self.dir))?;
            self.install_table(w, s, t)?;
        }
        Ok(w.dedupe.as_mut().expect("installed above"))
    }

    /// Replays the log values the table lacks into it and makes it the writer's.
    fn install_table(&self, w: &mut Writer, s: &Store, mut t: dedupe::Table) -> Result<(), Error> {
        let committed = s.dedupe_next()?;
        if let Some(next) = committed
            && t.applied() >= next
        {
            // The table holds entries of commits the database no longer has: sled came back
            // from a power cut older than a state it had reported durable. Those ids' events
            // are not spooled, so the table must not skip them when their files are read
            // again: it starts empty, and the log refills what it still holds.
            tracing::error!(
                table_applied = t.applied(),
                database_next = next,
                "the dedupe table is ahead of the spool database (a power cut took committed \
                 transactions); starting an empty table so re-read events are spooled again \
                 (Segment dedupes them by messageId)"
            );
            drop(t);
            t = dedupe::Table::reset(&dedupe::path(&self.dir))?;
        }
        t.min_day = self.pruned_day.load(Ordering::Relaxed) as u16;
        let (next, replayed) = s.replay_dedupe_log(&mut t)?;
        let next = next.max(committed.unwrap_or(0));
        if replayed > 0 {
            tracing::info!(
                entries = replayed,
                "dedupe log entries written since the last checkpoint applied to the table"
            );
        }
        w.log_seq = next;
        w.dedupe = Some(t);
        Ok(())
    }

    /// Makes the dedupe table durable and drops the log values it covers (see `dedupe.rs`).
    pub fn checkpoint_dedupe(&self) -> Result<(), Error> {
        let mut w = self.writer();
        self.checkpoint_dedupe_with(&mut w, &self.store())
    }

    fn checkpoint_dedupe_with(&self, w: &mut Writer, s: &Store) -> Result<(), Error> {
        let Some(t) = w.dedupe.as_mut() else {
            return Ok(());
        };
        let upto = t.checkpoint()?;
        s.trim_dedupe_log(upto)?;
        w.unsynced = 0;
        Ok(())
    }

    /// The open generation's directory.
    pub fn path(&self) -> PathBuf {
        self.store().path.clone()
    }

    /// Set when `open` found the spool unreadable and started a new one: what happened.
    pub fn recovered(&self) -> Option<&str> {
        self.recovered.as_deref()
    }

    /// Makes everything written so far durable: sled's flush, then an fsync of its data file.
    pub fn flush(&self) -> Result<(), Error> {
        self.store().flush()
    }

    /// The first queue key not yet committed; keys below it are safe to read.
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// Commits one chunk of a file in one transaction and flushes it (see the module doc).
    pub fn commit_file_chunk(&self, chunk: &Chunk) -> Result<ChunkOutcome, Error> {
        // The writer lock before the store lock, as everywhere (compaction takes both).
        let mut w = self.writer();
        let s = self.store();
        let first_key = w.next;
        let now = now_ms();
        let today = dedupe::day(now);
        let q_ids = (0..chunk.quarantine.len())
            .map(|_| s.new_id())
            .collect::<Result<Vec<_>, _>>()?;
        let quarantine_json: Vec<Vec<u8>> = chunk
            .quarantine
            .iter()
            .map(|q| serde_json::to_vec(q).unwrap_or_default())
            .collect();

        // Duplicates are found before the transaction: only this writer (holding `writer`)
        // changes the dedupe table.
        let fingerprints: Vec<dedupe::Fingerprint> = chunk
            .events
            .iter()
            .map(|e| dedupe::fingerprint(&e.message_id))
            .collect();
        let seen = if chunk.skip_dedupe {
            // Opened all the same: the entries go in after the commit.
            self.table(&mut w, &s)?;
            vec![false; fingerprints.len()]
        } else {
            self.table(&mut w, &s)?.contains(&fingerprints)?
        };
        let mut in_chunk = std::collections::HashSet::with_capacity(chunk.events.len());
        let mut added = Vec::with_capacity(chunk.events.len());

        // New events: oversize ones become dead letters, the rest go into packets; both are
        // remembered as seen.
        let mut out = ChunkOutcome::default();
        let mut letters = Vec::new();
        let mut fresh: Vec<&[u8]> = Vec::with_capacity(chunk.events.len());
        for ((ev, f), seen) in chunk.events.iter().zip(&fingerprints).zip(seen) {
            if seen || !in_chunk.insert(*f) {
                out.duplicates += 1;
                continue;
            }
            added.push((*f, today));
            if ev.json.len() > MAX_EVENT_BYTES {
                let letter = DeadLetter {
                    reason: format!(
                        "event is {} bytes, over Segment's {} byte limit",
                        ev.json.len(),
                        MAX_EVENT_BYTES
                    ),
                    status: None,
                    file_id: Some(chunk.file_id),
                    time_ms: now,
                    message_id: ev.message_id.clone(),
                    event: String::from_utf8_lossy(&ev.json).into_owned(),
                };
                letters.push((s.new_id()?, serde_json::to_vec(&letter).unwrap_or_default()));
                out.dead_lettered += 1;
            } else {
                fresh.push(&ev.json);
            }
        }
        let log_seq = w.log_seq;
        let log_value = dedupe::encode_log(&added);
        let bytes: u64 = fresh.iter().map(|j| j.len() as u64).sum();
        out.spooled = fresh.len() as u64;
        let mut packets = Vec::new();
        for events in packet::split(&fresh, |j| j.len()) {
            packets.push(segments::Packet {
                bytes: packet::encode(now, chunk.file_id, events.iter().copied()),
                events: events.len() as u16,
                file_id: chunk.file_id,
            });
        }
        let (packets, end, key) = w.write_packets(first_key, &packets)?;
        out.quarantined = chunk.quarantine.len() as u64;
        // The join's writes, logged in the transaction and applied to its table after it.
        let join = self.prepare_join(&s, &chunk.join, today)?;

        (
            &s.queue,
            &s.files,
            &s.dedupe,
            &s.meta,
            &s.quarantine,
            &s.dead,
            &s.join_log,
        )
            .transaction(|(queue, files, dedupe, meta, quarantine, dead, join_log)| {
                for (k, v) in &packets {
                    queue.insert(&k.to_be_bytes(), v.as_slice())?;
                }
                meta.insert(SEGMENT_END, &end.encode())?;
                if !log_value.is_empty() {
                    dedupe.insert(&log_seq.to_be_bytes(), log_value.as_slice())?;
                    // What the table may hold at most (see `install_table`).
                    meta.insert(DEDUPE_NEXT, &(log_seq + 1).to_be_bytes())?;
                }
                for (id, v) in &letters {
                    dead.insert(&id.to_be_bytes(), v.as_slice())?;
                }
                for (id, q) in q_ids.iter().zip(&quarantine_json) {
                    quarantine.insert(&id.to_be_bytes(), q.as_slice())?;
                }
                let fkey = chunk.file_id.to_be_bytes();
                let mut rec = match files.get(fkey)? {
                    Some(v) => decode_file(&v)?,
                    None if chunk.file_id == NO_FILE => FileRecord::default(),
                    None => return abort(format!("file record {}", chunk.file_id)),
                };
                rec.offset = chunk.offset;
                rec.line = chunk.line;
                if let Some(t) = &chunk.tail_hash {
                    rec.tail_hash.clone_from(t);
                }
                rec.events_spooled += out.spooled;
                rec.pending += out.spooled;
                rec.updated_ms = now;
                if chunk.file_done {
                    rec.status = FileStatus::Read;
                }
                if chunk.file_id != NO_FILE {
                    files.insert(&fkey, encode_file(&rec))?;
                }
                add_meta(meta, "live_bytes", bytes as i64)?;
                add_meta(meta, "depth", out.spooled as i64)?;
                if let Some(j) = &join {
                    j.log(join_log, meta)?;
                }
                Ok(())
            })
            .map_err(|e| s.tx_err(e))?;
        s.flush()?;
        self.committed(&mut w, key, end);
        if let Some(j) = join {
            self.join_committed(&s, j);
        }
        if !added.is_empty() {
            w.log_seq += 1;
            w.unsynced += added.len() as u64;
            let table = w.dedupe.as_mut().expect("opened for the lookup");
            if let Err(e) = table.apply(log_seq, added) {
                // The commit stands: the entries stay in memory and in the log.
                tracing::warn!(error = %e, "cannot write the dedupe table; its new entries are kept in memory and retried");
            }
            if w.unsynced >= dedupe::CHECKPOINT_ENTRIES
                && let Err(e) = self.checkpoint_dedupe_with(&mut w, &s)
            {
                tracing::warn!(error = %e, "dedupe checkpoint failed; retried later");
            }
        }
        Ok(out)
    }

    /// After a commit's flush: its keys and segment bytes are the spool's; the drain may read
    /// up to `next`.
    fn committed(&self, w: &mut Writer, next: u64, end: segments::End) {
        w.segments.committed(end);
        w.next = next;
        self.watermark.store(next, Ordering::Release);
    }

    /// A queue entry's first key, packet bytes and decoded packet: read from its segment, or
    /// the value itself for a version 2 packet kept in sled. `Err(Damaged)`: the segment's
    /// bytes are missing or fail their checksum.
    fn load_packet(
        &self,
        s: &Store,
        reader: &mut segments::Reader,
        k: &[u8],
        v: IVec,
    ) -> Result<Result<(u64, IVec, packet::Packet), Damaged>, Error> {
        let corrupt = || s.corrupt(format!("queue entry {k:?}"));
        let first = decode_u64(k).ok_or_else(corrupt)?;
        let Some(loc) = segments::Location::decode(&v) else {
            let p = packet::decode(&v).ok_or_else(corrupt)?;
            return Ok(Ok((first, v, p)));
        };
        let read = reader.read(&self.segments_dir, &loc)?;
        Ok(match read.as_deref().and_then(packet::decode) {
            Some(p) => Ok((first, read.expect("decoded above"), p)),
            None => Err(Damaged { first, loc }),
        })
    }

    /// Takes a packet whose bytes are lost (damage on disk, a deleted segment) out of the
    /// queue, so the drain goes on past it, and leaves a quarantine entry saying what was lost
    /// and from which file. Its events are gone: the one case where the spool loses events,
    /// and only because the disk did. The file keeps its pending count (it is never taken for
    /// delivered, so `after_ingest` leaves it in place).
    fn set_aside_damaged(&self, s: &Store, d: &Damaged) -> Result<(), Error> {
        let pkey = d.first.to_be_bytes();
        let acked = s
            .acked
            .get(pkey)
            .map_err(|e| s.sled_err(e))?
            .map_or(0, |b| packet::count(&b) as u64);
        let lost = u64::from(d.loc.events).saturating_sub(acked);
        let file = s
            .files
            .get(d.loc.file_id.to_be_bytes())
            .map_err(|e| s.sled_err(e))?
            .and_then(|v| serde_json::from_slice::<FileRecord>(&v).ok())
            .map(|r| r.path)
            .unwrap_or_default();
        let reason = format!(
            "spool damaged on disk: {lost} queued events (queue keys {} to {}) could not be read \
             from segment {} at offset {} (missing, or failing their checksum) and are lost; \
             they came from {}",
            d.first,
            d.first + u64::from(d.loc.events) - 1,
            d.loc.segment,
            d.loc.offset,
            if file.is_empty() {
                "an unknown file"
            } else {
                &file
            }
        );
        tracing::error!(
            file = %file,
            events = lost,
            segment = d.loc.segment,
            offset = d.loc.offset,
            "spool damaged on disk: events lost; see dead-letter list"
        );
        let entry = QuarantineEntry {
            reason,
            file,
            line: 0,
            time_ms: now_ms(),
            raw: String::new(),
            ..QuarantineEntry::default()
        };
        let id = s.new_id()?;
        let value = serde_json::to_vec(&entry).unwrap_or_default();
        // The events' JSON is unknown: the packet's bytes less its header, shared out.
        let body =
            (d.loc.len as usize).saturating_sub(packet::header_len(d.loc.events.into())) as u64;
        let bytes = body * lost / u64::from(d.loc.events).max(1);
        (&s.queue, &s.acked, &s.meta, &s.quarantine)
            .transaction(|(queue, acked, meta, quarantine)| {
                queue.remove(&pkey)?;
                acked.remove(&pkey)?;
                quarantine.insert(&id.to_be_bytes(), value.as_slice())?;
                add_meta(meta, "depth", -(lost as i64))?;
                add_meta(meta, "live_bytes", -(bytes as i64))?;
                Ok(())
            })
            .map_err(|e: TransactionError<String>| s.tx_err(e))?;
        s.flush()
    }

    /// Deletes the segments whose packets are all gone: those below the segment of the first
    /// packet still queued. When nothing is queued, the one being written goes too, if `w` (the
    /// writer lock) is given: then no commit can be adding to it. Called after every ack
    /// (with the lock only if it is free) and at the maintenance tick (see
    /// [`Spool::remove_drained_segments`]).
    fn delete_drained_segments(&self, s: &Store, w: Option<&mut Writer>) -> Result<(), Error> {
        let first_live = match s.queue.first().map_err(|e| s.sled_err(e))? {
            Some((_, v)) => match segments::Location::decode(&v) {
                Some(l) => l.segment,
                // A version 2 packet kept in sled: older than any segment.
                None => return Ok(()),
            },
            None => match w {
                Some(w) => w.segments.retire().map_or(0, |id| id + 1),
                // A commit holds the lock: the next ack or tick deletes what it may.
                None => return Ok(()),
            },
        };
        if first_live > self.segments_removed_below.load(Ordering::Relaxed) {
            // The acks that emptied these segments become durable first: after a power cut
            // that took them, the queue would point into deleted segments and take its
            // delivered packets for damage.
            s.flush()?;
            segments::remove_below(&self.segments_dir, first_live);
            self.segments_removed_below
                .fetch_max(first_live, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Deletes the segments the drain has emptied, the one being written included when
    /// nothing is queued (the maintenance tick; acks do the same when the writer is free).
    pub fn remove_drained_segments(&self) -> Result<(), Error> {
        let mut w = self.writer();
        self.delete_drained_segments(&self.store(), Some(&mut w))
    }

    /// Up to `max_events` queued events with keys in `(after, watermark)`, oldest first, whose
    /// sizes add up to at most `budget`, each counted as its JSON plus one separator byte (see
    /// `segment::batch::event_budget`). The first event is always returned, whatever its size,
    /// so no event can block the queue. `full` says the batch stopped at a limit rather than at
    /// the end of the queue.
    pub fn peek(
        &self,
        after: Option<u64>,
        max_events: usize,
        budget: usize,
    ) -> Result<Peeked, Error> {
        let s = self.store();
        let start = after.map_or(0, |k| k.saturating_add(1));
        let end = self.watermark();
        let mut out = Peeked::default();
        if start >= end {
            return Ok(out);
        }
        // The packet holding `start` begins at or before it.
        let from = match s
            .queue
            .range(..=start.to_be_bytes())
            .next_back()
            .transpose()
            .map_err(|e| s.sled_err(e))?
        {
            Some((k, _)) => decode_u64(&k).unwrap_or(start),
            None => start,
        };
        let mut bytes = 0usize;
        let mut reader = segments::Reader::default();
        'packets: for item in s.queue.range(from.to_be_bytes()..end.to_be_bytes()) {
            let (k, v) = item.map_err(|e| s.sled_err(e))?;
            let (first, v, p) = match self.load_packet(&s, &mut reader, &k, v)? {
                Ok(loaded) => loaded,
                Err(damaged) => {
                    self.set_aside_damaged(&s, &damaged)?;
                    continue;
                }
            };
            let acked = s
                .acked
                .get(k)
                .map_err(|e| s.sled_err(e))?
                .map(|b| b.to_vec());
            for (i, range) in p.events.iter().enumerate() {
                let key = first + i as u64;
                if key < start || acked.as_deref().is_some_and(|b| packet::is_set(b, i)) {
                    continue;
                }
                let size = range.len() + 1;
                if !out.items.is_empty() && (out.items.len() >= max_events || bytes + size > budget)
                {
                    out.full = true;
                    break 'packets;
                }
                bytes += size;
                out.items.push(Queued {
                    key,
                    file_id: p.file_id,
                    enqueued_ms: p.enqueued_ms,
                    json: v.subslice(range.start, range.len()),
                    packet: first,
                    index: i as u16,
                    packet_len: p.len() as u16,
                });
            }
        }
        if out.items.len() >= max_events {
            out.full = true;
        }
        Ok(out)
    }

    /// Removes delivered events. Returns the ids of files whose events are now all delivered
    /// and which are fully read (candidates for `after_ingest`).
    pub fn ack(&self, items: &[Queued]) -> Result<Vec<u64>, Error> {
        self.remove_from_queue(items, None)
    }

    /// Moves events Segment rejected for good from the queue to the dead letters.
    pub fn dead_letter(
        &self,
        items: &[Queued],
        reason: &str,
        status: Option<u16>,
    ) -> Result<Vec<u64>, Error> {
        self.remove_from_queue(items, Some((reason, status)))
    }

    fn remove_from_queue(
        &self,
        items: &[Queued],
        dead_reason: Option<(&str, Option<u16>)>,
    ) -> Result<Vec<u64>, Error> {
        let s = self.store();
        let now = now_ms();
        let mut per_file: Vec<(u64, u64)> = Vec::new();
        for q in items {
            match per_file.iter_mut().find(|(f, _)| *f == q.file_id) {
                Some((_, n)) => *n += 1,
                None => per_file.push((q.file_id, 1)),
            }
        }
        let letters: Vec<(u64, Vec<u8>)> = match dead_reason {
            None => Vec::new(),
            Some((reason, status)) => items
                .iter()
                .map(|q| {
                    let letter = DeadLetter {
                        reason: reason.to_owned(),
                        status,
                        file_id: Some(q.file_id),
                        time_ms: now,
                        message_id: message_id_of(&q.json),
                        event: String::from_utf8_lossy(&q.json).into_owned(),
                    };
                    let id = s.new_id()?;
                    Ok((id, serde_json::to_vec(&letter).unwrap_or_default()))
                })
                .collect::<Result<_, Error>>()?,
        };
        // Items by packet, in the order given.
        let mut by_packet: Vec<(u64, u16, Vec<usize>)> = Vec::new();
        for (i, q) in items.iter().enumerate() {
            match by_packet.iter_mut().find(|(p, _, _)| *p == q.packet) {
                Some((_, _, list)) => list.push(i),
                None => by_packet.push((q.packet, q.packet_len, vec![i])),
            }
        }
        let done = (&s.queue, &s.acked, &s.files, &s.meta, &s.dead)
            .transaction(|(queue, acked, files, meta, dead)| {
                let mut removed = 0i64;
                let mut bytes = 0i64;
                let mut removed_per_file = per_file.clone();
                for (first, len, list) in &by_packet {
                    let pkey = first.to_be_bytes();
                    let mut bitmap = match acked.get(pkey)? {
                        Some(b) => b.to_vec(),
                        None if queue.get(pkey)?.is_some() => {
                            packet::empty_bitmap(usize::from(*len))
                        }
                        // The whole packet was delivered (or dead-lettered) before.
                        None => Vec::new(),
                    };
                    for &i in list {
                        let q = &items[i];
                        let index = usize::from(q.index);
                        if bitmap.is_empty() || packet::is_set(&bitmap, index) {
                            // Already gone: not counted again, and not dead-lettered: it is
                            // not ours any more.
                            if let Some((_, n)) =
                                removed_per_file.iter_mut().find(|(f, _)| *f == q.file_id)
                            {
                                *n -= 1;
                            }
                            continue;
                        }
                        packet::set(&mut bitmap, index);
                        removed += 1;
                        bytes += q.json.len() as i64;
                        if let Some((id, v)) = letters.get(i) {
                            dead.insert(&id.to_be_bytes(), v.as_slice())?;
                        }
                    }
                    if bitmap.is_empty() {
                        continue;
                    }
                    if packet::count(&bitmap) >= usize::from(*len) {
                        queue.remove(&pkey)?;
                        acked.remove(&pkey)?;
                    } else {
                        acked.insert(&pkey, bitmap)?;
                    }
                }
                let mut done = Vec::new();
                for (file_id, n) in &removed_per_file {
                    let fkey = file_id.to_be_bytes();
                    if let Some(v) = files.get(fkey)? {
                        let mut rec = decode_file(&v)?;
                        rec.pending = rec.pending.saturating_sub(*n);
                        if rec.pending == 0 && rec.status == FileStatus::Read {
                            done.push(*file_id);
                        }
                        files.insert(&fkey, encode_file(&rec))?;
                    }
                }
                add_meta(meta, "live_bytes", -bytes)?;
                add_meta(meta, "depth", -removed)?;
                Ok(done)
            })
            .map_err(|e| s.tx_err(e))?;
        self.delete_drained_segments(&s, self.writer.try_lock().ok().as_deref_mut())?;
        Ok(done)
    }

    /// The catalog last fetched from Leanplum (see `crate::catalog`), as it was stored.
    pub fn catalog_cache(&self) -> Result<Option<Vec<u8>>, Error> {
        let s = self.store();
        Ok(s.meta
            .get(CATALOG_CACHE)
            .map_err(|e| s.sled_err(e))?
            .map(|v| v.to_vec()))
    }

    /// Replaces the cached catalog and flushes it: a restart while Leanplum is unreachable maps
    /// with it.
    pub fn store_catalog_cache(&self, bytes: &[u8]) -> Result<(), Error> {
        let s = self.store();
        s.meta
            .insert(CATALOG_CACHE, bytes)
            .map_err(|e| s.sled_err(e))?;
        s.flush()
    }

    /// Events and bytes queued (our own count; see the module doc).
    pub fn depth(&self) -> Result<Depth, Error> {
        let s = self.store();
        let get = |name: &str| -> Result<u64, Error> {
            Ok(s.meta
                .get(name)
                .map_err(|e| s.sled_err(e))?
                .and_then(|v| decode_u64(&v))
                .unwrap_or(0))
        };
        Ok(Depth {
            events: get("depth")?,
            bytes: get("live_bytes")?,
        })
    }

    /// When the oldest queued event was spooled (ms since the epoch).
    pub fn oldest_enqueued_ms(&self) -> Result<Option<u64>, Error> {
        let s = self.store();
        match s.queue.first().map_err(|e| s.sled_err(e))? {
            Some((k, v)) => {
                let mut reader = segments::Reader::default();
                // A damaged packet is set aside by the drain's next read; no age meanwhile.
                Ok(self
                    .load_packet(&s, &mut reader, &k, v)?
                    .ok()
                    .map(|(_, _, p)| p.enqueued_ms))
            }
            None => Ok(None),
        }
    }

    /// The file last seen at `path` (relative to the watch dir).
    pub fn file_by_path(&self, path: &Path) -> Result<Option<(u64, FileRecord)>, Error> {
        let s = self.store();
        let Some(id) = s
            .paths
            .get(path_key(path))
            .map_err(|e| s.sled_err(e))?
            .and_then(|v| decode_u64(&v))
        else {
            return Ok(None);
        };
        Ok(self.file(id)?.map(|r| (id, r)))
    }

    pub fn file(&self, id: u64) -> Result<Option<FileRecord>, Error> {
        let s = self.store();
        match s.files.get(id.to_be_bytes()).map_err(|e| s.sled_err(e))? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|_| Error::Corrupt {
                    path: s.path.clone(),
                    what: format!("file record {id}"),
                }),
            None => Ok(None),
        }
    }

    /// Registers a file about to be read for the first time (or read anew because its content
    /// changed) and points its path at it. Durable before it returns.
    pub fn begin_file(&self, path: &Path, record: &FileRecord) -> Result<u64, Error> {
        let s = self.store();
        let id = s.new_id()?;
        (&s.files, &s.paths, &s.heads)
            .transaction(|(files, paths, heads)| {
                files.insert(&id.to_be_bytes(), encode_file(record))?;
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

    /// Files whose first bytes hash to `head_hash`: candidates for "the same content".
    pub fn files_with_head(&self, head_hash: &str) -> Result<Vec<(u64, FileRecord)>, Error> {
        let s = self.store();
        let mut out = Vec::new();
        for item in s.heads.scan_prefix(head_hash.as_bytes()) {
            let (k, _) = item.map_err(|e| s.sled_err(e))?;
            let Some(id) = k.get(k.len().saturating_sub(8)..).and_then(decode_u64) else {
                continue;
            };
            if let Some(v) = s.files.get(id.to_be_bytes()).map_err(|e| s.sled_err(e))? {
                let rec = serde_json::from_slice(&v).map_err(|_| Error::Corrupt {
                    path: s.path.clone(),
                    what: format!("file record {id}"),
                })?;
                out.push((id, rec));
            }
        }
        Ok(out)
    }

    /// Points `path` at a known file (a rename, or a copy of content already read).
    pub fn link_path(&self, path: &Path, id: u64) -> Result<(), Error> {
        let s = self.store();
        let shown = path.to_string_lossy().into_owned();
        (&s.files, &s.paths)
            .transaction(|(files, paths)| {
                paths.insert(path_key(path), &id.to_be_bytes())?;
                if let Some(v) = files.get(id.to_be_bytes())? {
                    let mut rec = decode_file(&v)?;
                    rec.path.clone_from(&shown);
                    files.insert(&id.to_be_bytes(), encode_file(&rec))?;
                }
                Ok(())
            })
            .map_err(|e: TransactionError<String>| s.tx_err(e))?;
        s.flush()
    }

    /// Widens a file's head (a small file that grew) and re-indexes it.
    pub fn update_head(&self, id: u64, head_len: u64, head_hash: &str) -> Result<(), Error> {
        let s = self.store();
        (&s.files, &s.heads)
            .transaction(|(files, heads)| {
                let Some(v) = files.get(id.to_be_bytes())? else {
                    return Ok(());
                };
                let mut rec = decode_file(&v)?;
                heads.remove(head_key(&rec.head_hash, id))?;
                rec.head_len = head_len;
                rec.head_hash = head_hash.to_owned();
                heads.insert(head_key(head_hash, id), &[])?;
                files.insert(&id.to_be_bytes(), encode_file(&rec))?;
                Ok(())
            })
            .map_err(|e: TransactionError<String>| s.tx_err(e))
    }

    /// Quarantines a problem that belongs to no file record (a file that cannot even be
    /// opened).
    pub fn quarantine(&self, entry: &QuarantineEntry) -> Result<(), Error> {
        let s = self.store();
        let id = s.new_id()?;
        let v = serde_json::to_vec(entry).unwrap_or_default();
        s.quarantine
            .insert(id.to_be_bytes(), v)
            .map_err(|e| s.sled_err(e))?;
        s.flush()
    }

    /// Rewrites a file record (status changes outside a chunk commit).
    pub fn update_file(&self, id: u64, f: impl Fn(&mut FileRecord)) -> Result<(), Error> {
        let s = self.store();
        s.files
            .transaction(|files| {
                let key = id.to_be_bytes();
                if let Some(v) = files.get(key)? {
                    let mut rec = decode_file(&v)?;
                    f(&mut rec);
                    rec.updated_ms = now_ms();
                    files.insert(&key, encode_file(&rec))?;
                }
                Ok(())
            })
            .map_err(|e: TransactionError<String>| s.tx_err(e))
    }

    /// Puts dead letters back in the queue (after the operator fixed what Segment refused),
    /// at the end, in id order. `ids` empty means all. Returns how many went back.
    pub fn requeue_dead(&self, ids: &[u64]) -> Result<u64, Error> {
        let mut w = self.writer();
        let s = self.store();
        let letters: Vec<(u64, DeadLetter)> = s
            .json_entries(&s.dead, "dead letter")?
            .into_iter()
            .filter(|(id, _)| ids.is_empty() || ids.contains(id))
            .collect();
        let now = now_ms();
        // Packets of letters of one file each, in id order.
        let mut packets = Vec::new();
        for group in letters.chunk_by(|a, b| a.1.file_id == b.1.file_id) {
            let file_id = group[0].1.file_id.unwrap_or(NO_FILE);
            for part in packet::split(group, |(_, l)| l.event.len()) {
                packets.push(segments::Packet {
                    bytes: packet::encode(
                        now,
                        file_id,
                        part.iter().map(|(_, l)| l.event.as_bytes()),
                    ),
                    events: part.len() as u16,
                    file_id,
                });
            }
        }
        let first_key = w.next;
        let (packets, end, key) = w.write_packets(first_key, &packets)?;
        (&s.queue, &s.dead, &s.meta, &s.files)
            .transaction(|(queue, dead, meta, files)| {
                for (k, v) in &packets {
                    queue.insert(&k.to_be_bytes(), v.as_slice())?;
                }
                meta.insert(SEGMENT_END, &end.encode())?;
                let mut bytes = 0i64;
                for (id, letter) in &letters {
                    let file_id = letter.file_id.unwrap_or(NO_FILE);
                    dead.remove(&id.to_be_bytes())?;
                    bytes += letter.event.len() as i64;
                    if let Some(v) = files.get(file_id.to_be_bytes())? {
                        let mut rec = decode_file(&v)?;
                        rec.pending += 1;
                        files.insert(&file_id.to_be_bytes(), encode_file(&rec))?;
                    }
                }
                add_meta(meta, "live_bytes", bytes)?;
                add_meta(meta, "depth", letters.len() as i64)?;
                Ok(())
            })
            .map_err(|e: TransactionError<String>| s.tx_err(e))?;
        s.flush()?;
        self.committed(&mut w, key, end);
        Ok(letters.len() as u64)
    }

    /// Drops quarantine entries and dead letters for good. `ids` empty means all of them.
    pub fn purge(&self, ids: &[u64]) -> Result<u64, Error> {
        let s = self.store();
        let mut removed = 0;
        for tree in [&s.quarantine, &s.dead] {
            let mut batch = sled::Batch::default();
            for item in tree.iter() {
                let (k, _) = item.map_err(|e| s.sled_err(e))?;
                if ids.is_empty() || decode_u64(&k).is_some_and(|id| ids.contains(&id)) {
                    batch.remove(k);
                    removed += 1;
                }
            }
            tree.apply_batch(batch).map_err(|e| s.sled_err(e))?;
        }
        s.flush()?;
        Ok(removed)
    }

    /// Drops quarantined (bad and parked) entries and dead letters recorded before `cutoff_ms`
    /// (`spool.keep_bad_days`); returns how many of each went.
    pub fn drop_letters_before(&self, cutoff_ms: u64) -> Result<(u64, u64), Error> {
        #[derive(serde::Deserialize)]
        struct Stamp {
            time_ms: u64,
        }
        let s = self.store();
        let mut dropped = [0u64; 2];
        for (n, tree) in [&s.quarantine, &s.dead].into_iter().enumerate() {
            let mut batch = sled::Batch::default();
            for item in tree.iter() {
                let (k, v) = item.map_err(|e| s.sled_err(e))?;
                // An entry whose time cannot be read is kept: better listed than lost unseen.
                if serde_json::from_slice::<Stamp>(&v).is_ok_and(|st| st.time_ms < cutoff_ms) {
                    batch.remove(k);
                    dropped[n] += 1;
                }
            }
            tree.apply_batch(batch).map_err(|e| s.sled_err(e))?;
        }
        if dropped != [0, 0] {
            s.flush()?;
        }
        Ok((dropped[0], dropped[1]))
    }

    /// Replaces a quarantine entry (its reason after a failed retry), or removes it (`None`).
    pub fn set_quarantine(&self, id: u64, entry: Option<&QuarantineEntry>) -> Result<(), Error> {
        let s = self.store();
        let key = id.to_be_bytes();
        match entry {
            Some(e) => s
                .quarantine
                .insert(key, serde_json::to_vec(e).unwrap_or_default())
                .map(|_| ()),
            None => s.quarantine.remove(key).map(|_| ()),
        }
        .map_err(|e| s.sled_err(e))?;
        s.flush()
    }

    /// Every file the spool knows, by id.
    pub fn files(&self) -> Result<Vec<(u64, FileRecord)>, Error> {
        let s = self.store();
        s.json_entries(&s.files, "file record")
    }

    /// Forgets dedupe entries from days before the day of `cutoff_ms`: from now on they count
    /// as absent, and their slots are cleared, a slice of the table at a time under the writer
    /// lock so commits go on in between. A day already pruned is not walked again. Returns how
    /// many entries went. Ends with a checkpoint of the table (this runs at every maintenance
    /// tick).
    pub fn prune_dedupe(&self, cutoff_ms: u64) -> Result<u64, Error> {
        let min_day = dedupe::day(cutoff_ms);
        let mut removed = 0;
        if self.pruned_day.load(Ordering::Relaxed) != u32::from(min_day) {
            let pages = {
                let mut w = self.writer();
                let t = self.table(&mut w, &self.store())?;
                t.min_day = min_day;
                t.pages()
            };
            let mut from = 1;
            while from <= pages {
                let mut w = self.writer();
                removed += self
                    .table(&mut w, &self.store())?
                    .prune_pages(from, from + 4096)?;
                from += 4096;
            }
            self.pruned_day.store(u32::from(min_day), Ordering::Relaxed);
        }
        self.checkpoint_dedupe()?;
        Ok(removed)
    }

    /// Whether the filesystem under the spool is too full to take `incoming` more bytes of
    /// events safely. sled, once a write of its fails for lack of space, fails every later
    /// write until reopened, so the agent stops writing before the disk is full: it keeps a
    /// reserve of 5% of the filesystem (between 1 MiB and 256 MiB), plus a quarter of sled's
    /// files (for the drain's removals), plus twice what the commit adds.
    pub fn disk_nearly_full(&self, incoming: u64) -> bool {
        let (Ok(free), Ok(total)) = (fs2::available_space(&self.dir), fs2::total_space(&self.dir))
        else {
            return false;
        };
        if total == 0 {
            // Some FUSE and network file systems report no sizes at all: unknown, not full.
            // Running out of room then shows as ENOSPC, which commits handle.
            if !self.unsized_fs_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    dir = %self.dir.display(),
                    "the file system under the spool reports no size; free space is not checked \
                     ahead (a full disk still pauses reading when a write fails with ENOSPC)"
                );
            }
            return false;
        }
        // sled logs every removal and moves live pages when it cleans segments, so draining
        // a large spool needs room too: a quarter of sled's files on top of the floor.
        // And twice the dedupe and join tables, which grow by rebuilding twice as large.
        let reserve = (total / 20).clamp(1 << 20, 256 << 20)
            + self.store().size_on_disk() / 4
            + 2 * file_len(&dedupe::path(&self.dir))
            + 2 * file_len(&join_table::path(&self.dir));
        free < reserve.saturating_add(incoming.saturating_mul(2))
    }

    /// Bytes the spool takes on disk: sled's files, the segments and the tables. Not the
    /// backlog (see [`Spool::depth`]).
    pub fn disk_bytes(&self) -> u64 {
        self.store().size_on_disk()
            + segments::disk_bytes(&self.segments_dir)
            + file_len(&dedupe::path(&self.dir))
            + file_len(&join_table::path(&self.dir))
    }

    /// Whether sled's files are so much larger than the live data that [`Spool::compact`] is
    /// worth its pause: over `min_disk_bytes`, and over `ratio` times the live data. Reading
    /// the live size walks every tree, so it is done only past the first test.
    pub fn is_bloated(&self, min_disk_bytes: u64, ratio: u64) -> Result<bool, Error> {
        let s = self.store();
        let disk = s.size_on_disk();
        if disk < min_disk_bytes {
            return Ok(false);
        }
        Ok(disk > s.live_bytes()?.saturating_mul(ratio))
    }

    /// Whether a compaction now would give disk space back (sled's files over twice the live
    /// data) and its copy fits in the free space left: a fresh sled database takes a few
    /// 512 KiB segments before any data, and about twice the raw bytes for the data (its log
    /// and page headers). A copy that still runs out of space fails harmlessly: it is deleted,
    /// and the current generation was not written to meanwhile (the copy holds the writer and
    /// store locks). Walks every tree once.
    pub fn compaction_helps_and_fits(&self) -> Result<bool, Error> {
        let Ok(free) = fs2::available_space(&self.dir) else {
            return Ok(false);
        };
        let s = self.store();
        let live = s.live_bytes()?;
        let copy = live.saturating_mul(2);
        Ok(s.size_on_disk() > copy && free > copy.saturating_add(2 << 20))
    }

    /// Rebuilds the spool into a fresh sled generation and swaps it in, crash-safely (see
    /// `store::compact`), so disk space comes back after a backlog drained: sled 0.34 never
    /// shrinks its files. Commits and the drain wait during the copy.
    pub fn compact(&self) -> Result<Compaction, Error> {
        let _writer = self.writer();
        let mut current = self.store.write().unwrap_or_else(|e| e.into_inner());
        let before = current.size_on_disk();
        let new = store::compact(&self.dir, &current, self.cache_bytes)?;
        let old = std::mem::replace(&mut *current, new);
        let old_path = old.path.clone();
        drop(old);
        store::remove_generation(&old_path);
        Ok(Compaction {
            disk_before: before,
            disk_after: current.size_on_disk(),
        })
    }

    /// Quarantine entries, oldest first.
    pub fn quarantine_entries(&self) -> Result<Vec<(u64, QuarantineEntry)>, Error> {
        let s = self.store();
        s.json_entries(&s.quarantine, "quarantine entry")
    }

    /// The kind and message ids of every quarantine entry (for counts), oldest first.
    pub fn quarantine_tags(&self) -> Result<Vec<QuarantineTag>, Error> {
        let s = self.store();
        Ok(s.json_entries(&s.quarantine, "quarantine entry")?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// Dead letters, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<(u64, DeadLetter)>, Error> {
        let s = self.store();
        s.json_entries(&s.dead, "dead letter")
    }
}

impl Drop for Spool {
    /// Checkpoints the dedupe table, so the next open has no log to replay.
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint_dedupe() {
            tracing::warn!(error = %e, "dedupe checkpoint at close failed; the next start replays its log");
        }
        if let Err(e) = self.checkpoint_join() {
            tracing::warn!(error = %e, "join checkpoint at close failed; the next start replays its log");
        }
    }
}

/// Wraps an I/O error with the path it concerns.
fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Makes the entries of `dir` (a created, renamed or deleted file) durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn abort<T>(what: String) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(what))
}

/// The `meta` key of the cached Leanplum catalog (JSON, see `crate::catalog`).
const CATALOG_CACHE: &str = "catalog_cache";
/// The `meta` key of the segments' committed end (see `segments.rs`).
const SEGMENT_END: &str = "segment_end";
/// The dedupe log's next sequence number, committed with every log value: the table can never
/// rightly hold a later one (see `Spool::install_table`).
const DEDUPE_NEXT: &str = "dedupe_next";

fn add_meta(meta: &sled::transaction::TransactionalTree, name: &str, delta: i64) -> TxResult<()> {
    let cur = meta.get(name)?.and_then(|v| decode_u64(&v)).unwrap_or(0);
    let new = if delta >= 0 {
        cur.saturating_add(delta as u64)
    } else {
        cur.saturating_sub(delta.unsigned_abs())
    };
    meta.insert(name, &new.to_be_bytes())?;
    Ok(())
}

fn encode_file(rec: &FileRecord) -> Vec<u8> {
    serde_json::to_vec(rec).unwrap_or_default()
}

fn decode_file(v: &[u8]) -> TxResult<FileRecord> {
    serde_json::from_slice(v)
        .map_err(|e| ConflictableTransactionError::Abort(format!("file record: {e}")))
}

fn decode_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
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

/// The `messageId` of a serialized event, for dead-letter listings.
fn message_id_of(json: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Id {
        #[serde(rename = "messageId")]
        message_id: String,
    }
    serde_json::from_slice::<Id>(json)
        .map(|i| i.message_id)
        .unwrap_or_default()
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
