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
//! # Parts
//!
//! [`Spool`] opens the store and holds what crosses its parts: the commit of a chunk (one
//! transaction over all of them, below), the dedupe table and its log (`dedupe.rs`), flushes
//! and checkpoints, the disk-space policy and compaction (`store.rs`). The rest is reached
//! through its parts, each a view of the open spool with its own methods:
//! - [`Spool::queue`] ([`Queue`], `queue.rs`): the segments and the packet index: peek, ack,
//!   dead-letter, watermark, depth, age, deleting drained segments.
//! - [`Spool::ledger`] ([`Ledger`], `ledger/`): file identity (by path and by content,
//!   `ledger/fingerprint.rs`) and every change of a file's state ([`Transition`]).
//! - [`Spool::letters`] ([`Letters`], `letters.rs`): the quarantine (bad input, parked
//!   records) and the dead letters, their listing, retry, purge and retention.
//! - [`Spool::meta`] ([`Meta`], `meta.rs`): the format version, counters, the catalog cache.
//! - `join.rs`: the CSV export join's trees.
//!
//! The spool stores what it is given: which events can never be delivered is decided before
//! (see [`SpoolEvent::refused`]); it knows no HTTP and no Segment limits.
//!
//! # Transactions
//!
//! 1. [`Spool::commit_file_chunk`]: the chunk's new events are appended to the active segment
//!    as packets and the segment is `fdatasync`ed; then one sled transaction takes the packets'
//!    locations into `queue`, the segments' new end into `meta`, the new events' dedupe
//!    entries into the `dedupe` log (duplicates skipped, events the ingest refused into
//!    `dead`), the bad lines into `quarantine`, the chunk's join writes ([`Chunk::join`]: what
//!    the rows contributed, and the removal of the waiting records whose events the chunk
//!    carries) as one value into the `join_log` with `meta/join_next`, the file's new offset
//!    into `files` (the ledger's `Progress::Chunk`), and `live_bytes`/`depth` into `meta`;
//!    then `Db::flush` and an fsync of sled's data file. The offset counts as durable only once
//!    that returns. Then the dedupe entries are the table's (held in memory, and written into
//!    `dedupe.tab` many commits' worth at a time, see `dedupe.rs`) and the join writes go into
//!    `join.tab` (see `join_table.rs`). A [`Committer`] (the parallel ingest's) runs the
//!    syncs, transaction and flush of one chunk on a thread of its own while the next chunk is
//!    looked up and appended past it; transactions still commit one at a time, in file order,
//!    each after the sync of the bytes it names (see `commit.rs` for why that keeps this story).
//! 2. [`Queue::ack`]: after a 2xx, the batch's events are marked in `acked` (a packet whose
//!    events are all marked leaves `queue` and `acked`), `meta` and the files' `pending` counts
//!    go down; one transaction, not flushed here (sled writes its buffers out
//!    every 200 ms, see `store.rs`). A crash that loses it re-sends that batch: Segment dedupes
//!    by `messageId`.
//! 3. [`Queue::dead_letter`]: events Segment rejected for good move from `queue` to `dead`.
//! 4. [`Letters::requeue_dead`]: dead letters go back to the end of the queue, appended and
//!    synced like a chunk's events, in one transaction with their removal from `dead` and the
//!    files' `pending` counts; flushed.
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
//! drain goes on (see [`Queue::peek`]). A database sled cannot open is moved aside (see
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
//! | `dedupe.tab` | our page writes after commits (each page once for the entries of many, see `dedupe.rs`; its Bloom filter, `filter.rs`, is memory only, filled again from the pages at open) | fsync at its checkpoints and rebuilds; the header's `applied` is written after the pages are synced |
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
//! [`Queue::watermark`], the first key not yet committed, so it never skips a key that a
//! transaction was still writing.

mod commit;
mod dedupe;
mod filter;
pub mod join;
mod join_table;
mod ledger;
mod letters;
mod meta;
mod packet;
mod queue;
mod segments;
mod store;
mod table_file;

use store::Store;

pub use commit::{Committer, Done, Failed};
pub use join::{JoinOp, JoinTree};
pub(crate) use ledger::fingerprint;
pub use ledger::{FileRecord, FileStatus, Ledger};
pub(crate) use ledger::{NO_FILE, Transition};
pub(crate) use letters::QuarantineTag;
pub use letters::{DeadLetter, Letters, QuarantineEntry, QuarantineKind};
pub(crate) use meta::{FORMAT_VERSION, Meta};
pub(crate) use queue::Depth;
pub use queue::{Peeked, Queue, Queued};

use sled::transaction::ConflictableTransactionError;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use crate::clock::now_ms;
// `join.rs` adds to its counter under this name.
use meta::add as add_meta;
use queue::QueueState;

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
    pub(crate) fn is_disk_full(&self) -> bool {
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
    /// `Some(reason)`: the producer decided the event can never be delivered (over Segment's
    /// size limit, see `ingest::spool_event`). The spool keeps it as a dead letter with this
    /// reason instead of queueing it, after the same dedupe check as any event. The spool
    /// itself knows no delivery limits.
    pub refused: Option<String>,
    /// `message_id`'s key in the dedupe index (a SHA-256), computed where the event is made
    /// (on the parse threads), not by the one thread that commits.
    fingerprint: dedupe::Fingerprint,
}

impl SpoolEvent {
    pub fn new(message_id: String, json: Vec<u8>, refused: Option<String>) -> SpoolEvent {
        SpoolEvent {
            fingerprint: dedupe::fingerprint(&message_id),
            message_id,
            json,
            refused,
        }
    }
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

/// What a compaction gave back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Compaction {
    pub disk_before: u64,
    pub disk_after: u64,
}

/// An open spool (see the module doc). Its parts are reached through [`Spool::queue`],
/// [`Spool::ledger`], [`Spool::letters`] and [`Spool::meta`]; what crosses them is here.
pub struct Spool {
    /// `spool.dir`: holds `CURRENT` and the generations (see the module doc).
    dir: PathBuf,
    cache_bytes: u64,
    /// The open generation. Read-locked by every operation; write-locked only to swap in a
    /// compacted generation.
    store: RwLock<Store>,
    /// Next queue key and the segment writer; held for the whole of a commit so keys commit
    /// in order (a [`Committer`] holds it while its commits are under way).
    writer: Mutex<Writer>,
    /// Threads waiting for `writer` other than a committer: a committer lets them in between
    /// two chunks.
    writer_waiting: std::sync::atomic::AtomicUsize,
    /// The queue's segments directory, watermark and deleted segments (see `queue.rs`).
    queue_state: QueueState,
    /// The day dedupe entries were last pruned below (see [`Spool::prune_dedupe`]).
    pruned_day: std::sync::atomic::AtomicU32,
    /// The CSV export join's table and log position (see `join.rs`); locked after `writer`
    /// and `store`.
    join: Mutex<join::State>,
    /// The "no size" warning of [`Spool::disk_nearly_full`] was given.
    unsized_fs_logged: std::sync::atomic::AtomicBool,
    /// Writes to the quarantine since the spool was opened (see [`Spool::quarantine_changes`]).
    quarantine_changes: std::sync::atomic::AtomicU64,
    /// What `open` had to repair, for status.
    recovered: Option<String>,
    /// Our flock on `spool.dir/LOCK`, held as long as the spool is open: exclusive for an
    /// agent, shared for a look by a command (see `store::lock`). Dropped after the store.
    _lock: Option<File>,
}

/// What the writer lock guards.
struct Writer {
    /// The next queue key (past those of a commit under way, see `commit.rs`).
    next: u64,
    segments: segments::Writer,
    /// The dedupe table, opened at the first commit (at open for an agent).
    dedupe: Option<dedupe::Table>,
    /// The next dedupe log sequence number (past that of a commit under way), the one after
    /// the last commit's, and the entries logged since the last checkpoint.
    log_seq: u64,
    log_committed: u64,
    unsynced: u64,
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
        // Another agent holding LOCK is refused at once; a command looking at the spool
        // (`status` with no agent running) is waited for.
        let lock = store::lock(dir)?;
        let t = std::time::Instant::now();
        let (store, recovered) = store::open_current(dir, cache_bytes)?;
        tracing::debug!(ms = ms_since(t), "spool open: database opened");
        let t = std::time::Instant::now();
        let cut = segments::repair(&segments::dir(dir), store.segment_end()?)?;
        tracing::debug!(ms = ms_since(t), "spool open: segments repaired");
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
        let t = std::time::Instant::now();
        let spool = Spool::from_store(dir, cache_bytes, store, recovered, Some(lock))?;
        tracing::debug!(ms = ms_since(t), "spool open: queue state read");
        {
            // The table's log is replayed now, not at the first commit.
            let t = std::time::Instant::now();
            let mut w = spool.writer();
            spool.install_table(&mut w, &spool.store(), table)?;
            tracing::debug!(ms = ms_since(t), "spool open: dedupe table installed");
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
            Some((store, look)) => {
                Spool::from_store(dir, cache_bytes, store, None, Some(look)).map(Some)
            }
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

    /// Whether a running agent holds the spool at `dir`: for a clear message before
    /// daemonizing, not as a guarantee.
    pub fn is_locked(dir: &Path) -> bool {
        store::held_by_agent(dir)
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
        let segments = segments::Writer::new(&segments_dir, end);
        Ok(Spool {
            dir: dir.to_owned(),
            cache_bytes,
            store: RwLock::new(store),
            writer: Mutex::new(Writer {
                next,
                segments,
                dedupe: None,
                log_seq: 0,
                log_committed: 0,
                unsynced: 0,
            }),
            writer_waiting: Default::default(),
            queue_state: QueueState::new(segments_dir, next, end),
            pruned_day: Default::default(),
            join: Default::default(),
            unsized_fs_logged: Default::default(),
            quarantine_changes: Default::default(),
            recovered,
            _lock: lock,
        })
    }

    fn store(&self) -> RwLockReadGuard<'_, Store> {
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer lock, for anything but a file's chunks (see [`Spool::writer_for_chunks`]).
    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer_waiting.fetch_add(1, Ordering::SeqCst);
        let w = self.writer_for_chunks();
        self.writer_waiting.fetch_sub(1, Ordering::SeqCst);
        w
    }

    /// The writer lock as a [`Committer`] takes it: not counted in `writer_waiting`, which the
    /// committer watches to let the others in.
    fn writer_for_chunks(&self) -> std::sync::MutexGuard<'_, Writer> {
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
        w.log_committed = next;
        w.dedupe = Some(t);
        Ok(())
    }

    /// Makes the dedupe table durable and drops the log values it covers (see `dedupe.rs`).
    pub(crate) fn checkpoint_dedupe(&self) -> Result<(), Error> {
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
    pub(crate) fn path(&self) -> PathBuf {
        self.store().path.clone()
    }

    /// Set when `open` found the spool unreadable and started a new one: what happened.
    pub(crate) fn recovered(&self) -> Option<&str> {
        self.recovered.as_deref()
    }

    /// Makes everything written so far durable: sled's flush, then an fsync of its data file.
    pub(crate) fn flush(&self) -> Result<(), Error> {
        self.store().flush()
    }

    /// The queue: segments and packet index (see `queue.rs`).
    pub fn queue(&self) -> Queue<'_> {
        Queue { spool: self }
    }

    /// The file ledger: identity and state of every input file (see `ledger/`).
    pub fn ledger(&self) -> Ledger<'_> {
        Ledger { spool: self }
    }

    /// The quarantine and the dead letters (see `letters.rs`).
    pub fn letters(&self) -> Letters<'_> {
        Letters { spool: self }
    }

    /// Format version, counters, catalog cache (see `meta.rs`).
    /// How many writes to the quarantine this spool has made since it was opened, counted
    /// after each: a summary of the quarantine read when it was `n` is still exact while it is
    /// `n` (`status` walks the whole quarantine otherwise: 0.6 s at 200,000 parked records).
    pub(crate) fn quarantine_changes(&self) -> u64 {
        self.quarantine_changes.load(Ordering::SeqCst)
    }

    /// Counts a write to the quarantine (after it is made).
    fn quarantine_changed(&self) {
        self.quarantine_changes.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn meta(&self) -> Meta<'_> {
        Meta { spool: self }
    }

    /// Forgets dedupe entries from days before the day of `cutoff_ms`: from now on they count
    /// as absent, and their slots are cleared, a slice of the table at a time under the writer
    /// lock so commits go on in between. A day already pruned is not walked again. Returns how
    /// many entries went. Ends with a checkpoint of the table (this runs at every maintenance
    /// tick).
    pub(crate) fn prune_dedupe(&self, cutoff_ms: u64) -> Result<u64, Error> {
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
    pub(crate) fn disk_nearly_full(&self, incoming: u64) -> bool {
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
            + segments::disk_bytes(&self.queue_state.segments_dir)
            + file_len(&dedupe::path(&self.dir))
            + file_len(&join_table::path(&self.dir))
    }

    /// Whether sled's files are so much larger than the live data that [`Spool::compact`] is
    /// worth its pause: over `min_disk_bytes`, and over `ratio` times the live data. Reading
    /// the live size walks every tree, so it is done only past the first test.
    pub(crate) fn is_bloated(&self, min_disk_bytes: u64, ratio: u64) -> Result<bool, Error> {
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
    pub(crate) fn compaction_helps_and_fits(&self) -> Result<bool, Error> {
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
    pub(crate) fn compact(&self) -> Result<Compaction, Error> {
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

/// Milliseconds since `t`, for the open's debug timings.
fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
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

fn decode_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
