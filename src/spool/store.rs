//! One sled database (a "generation") and the files around it: which generation is current,
//! moving a damaged one aside, and copying the live data into a fresh one (compaction).
//!
//! Layout under `spool.dir`:
//! - `CURRENT`: the name of the current generation (`gen-<n>`), replaced atomically (write
//!   `CURRENT.tmp`, fsync, rename, fsync the directory).
//! - `gen-<n>/`: a sled database. Any `gen-*` that `CURRENT` does not name is debris of an
//!   interrupted compaction and is deleted at open.
//! - `corrupt-<unix time>/`: a generation sled could not open, kept for a post-mortem.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sled::transaction::TransactionError;
use sled::{IVec, Tree};

use super::dedupe;
use super::meta::{DEDUPE_NEXT, FORMAT, FORMAT_VERSION, SEGMENT_END};
use super::packet;
use super::segments::{self, End, Location};
use super::{Error, decode_u64, io_err, ms_since, sync_dir};
use crate::clock::now_ms;

const CURRENT: &str = "CURRENT";
/// sled's background flush of its write buffers into its files. Commits flush (and fsync)
/// themselves; this bounds what a `kill -9` loses of the writes in between (acks of delivered
/// batches, which would otherwise be re-sent after a restart). The page cache survives a killed
/// process, so no fsync is needed for that.
const SLED_FLUSH_EVERY_MS: u64 = 200;
/// Dedupe log entries replayed into the table at a time: 16 bytes each, and about 36 more
/// while they are sorted by page, so about 14 MB at most.
const REPLAY_BATCH: usize = 1 << 18;
/// The trees of the current format, copied by compaction.
pub(super) const TREES: [&str; 14] = [
    "meta",
    "queue",
    "acked",
    "files",
    "paths",
    "heads",
    "dedupe",
    "quarantine",
    "dead",
    "join_sessions",
    "join_waiting",
    "join_params",
    "join_jobs",
    "join_log",
];

pub(super) struct Store {
    pub path: PathBuf,
    pub db: sled::Db,
    /// sled's data file, fsynced at commit points: `Db::flush` on Linux ends in
    /// `sync_file_range`, which neither flushes the disk's cache nor the file's metadata.
    pub data_file: File,
    /// The files under sled's `blobs/` already fsynced (see [`Store::flush`]).
    synced_blobs: Mutex<HashSet<OsString>>,
    pub meta: Tree,
    pub queue: Tree,
    /// Delivered events of packets not yet wholly delivered (see `packet.rs`).
    pub acked: Tree,
    pub files: Tree,
    pub paths: Tree,
    pub heads: Tree,
    pub dedupe: Tree,
    pub quarantine: Tree,
    pub dead: Tree,
    /// The CSV export join's log (see `join_table.rs`).
    pub join_log: Tree,
    /// The CSV export join's state before `join.tab`, moved out at open (see `join.rs`).
    pub join_sessions: Tree,
    pub join_waiting: Tree,
    pub join_params: Tree,
    pub join_jobs: Tree,
}

/// How long an agent waits for commands that read its spool while it was stopped (`status`,
/// `dead-letter list` and the like: they take a moment) before it gives up.
const LOOKS_WAIT: Duration = Duration::from_secs(30);

fn lock_file(dir: &Path) -> Result<(PathBuf, File), Error> {
    let path = dir.join("LOCK");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    Ok((path, file))
}

/// Whether `lock` is held the way `try` asks: `Ok(false)` when another open file holds it in a
/// way that excludes ours.
fn try_flock(path: &Path, lock: Result<(), fs::TryLockError>) -> Result<bool, Error> {
    match lock {
        Ok(()) => Ok(true),
        Err(fs::TryLockError::WouldBlock) => Ok(false),
        Err(fs::TryLockError::Error(e)) => Err(io_err(path)(e)),
    }
}

/// Takes `spool.dir/LOCK` for an agent: an exclusive flock, released when the process dies,
/// even by `kill -9`. A second agent learns at once that the spool is in use
/// ([`Error::Locked`]) instead of waiting on sled's own lock or, worse, taking its refusal for
/// damage. Commands that look at the spool of a stopped agent hold a shared flock for as long
/// as they have it open ([`look_lock`]): an agent starting meanwhile waits for them (up to
/// [`LOOKS_WAIT`]), where it used to find sled's lock held by them and wait only 5 s.
pub(super) fn lock(dir: &Path) -> Result<File, Error> {
    let (path, file) = lock_file(dir)?;
    let deadline = Instant::now() + LOOKS_WAIT;
    let mut said = false;
    loop {
        if try_flock(&path, file.try_lock())? {
            return Ok(file);
        }
        // Held. Shared only (a command's look, which ends soon) if we can share it.
        if !try_flock(&path, file.try_lock_shared())? || Instant::now() >= deadline {
            return Err(Error::Locked {
                path: dir.to_owned(),
            });
        }
        file.unlock().map_err(io_err(&path))?;
        if !said {
            tracing::info!(path = %dir.display(), "a command is reading the spool (status, dead-letter, files, catalog with no agent running); waiting for it to finish");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A shared flock on `spool.dir/LOCK` for a look at a stopped agent's spool, held while the
/// spool is open (see [`lock`]). [`Error::Locked`] when an agent runs.
fn look_lock(dir: &Path) -> Result<File, Error> {
    let (path, file) = lock_file(dir)?;
    if try_flock(&path, file.try_lock_shared())? {
        Ok(file)
    } else {
        Err(Error::Locked {
            path: dir.to_owned(),
        })
    }
}

/// Whether an agent holds the spool at `dir` (an exclusive flock on its `LOCK`).
pub(super) fn held_by_agent(dir: &Path) -> bool {
    let path = dir.join("LOCK");
    let Ok(file) = fs::OpenOptions::new().read(true).open(&path) else {
        return false;
    };
    matches!(try_flock(&path, file.try_lock_shared()), Ok(false))
}

/// Opens an existing spool for a look (offline `status`, `dead-letter` with no agent running):
/// repairs nothing, deletes nothing, and holds a shared flock on `LOCK` with it (created if
/// missing), so no agent opens the spool meanwhile. [`Error::Locked`] when an agent runs.
/// `None`: no spool yet.
pub(super) fn open_existing(dir: &Path, cache_bytes: u64) -> Result<Option<(Store, File)>, Error> {
    let Ok(name) = fs::read_to_string(dir.join(CURRENT)) else {
        return Ok(None);
    };
    let path = dir.join(name.trim());
    if !is_generation(name.trim()) || !path.join("db").exists() {
        return Ok(None);
    }
    let lock = look_lock(dir)?;
    Ok(Some((Store::open(&path, cache_bytes)?, lock)))
}

/// Opens the current generation, creating the first one, deleting debris, and moving a
/// generation sled cannot open aside. The second value says what was repaired. The caller holds
/// the lock (see [`lock`]).
pub(super) fn open_current(dir: &Path, cache_bytes: u64) -> Result<(Store, Option<String>), Error> {
    let current = match fs::read_to_string(dir.join(CURRENT)) {
        Ok(name) if is_generation(name.trim()) => name.trim().to_owned(),
        Ok(_) | Err(_) => {
            let name = "gen-1".to_owned();
            set_current(dir, &name)?;
            name
        }
    };
    remove_debris(dir, &current);
    let path = dir.join(&current);
    match Store::open(&path, cache_bytes) {
        Ok(store) => Ok((store, None)),
        Err(e @ Error::Version { .. }) => Err(e),
        // sled's own lock refused: another process has it open. Not damage.
        Err(e) if e.to_string().contains("could not acquire lock") => Err(e),
        Err(e) if e.is_disk_full() => Err(e),
        Err(e) => {
            let aside = dir.join(format!("corrupt-{}", now_ms() / 1000));
            fs::rename(&path, &aside).map_err(io_err(&path))?;
            // The segments' index and the dedupe log were in the damaged database: the segments
            // and the dedupe table go with it (the table would skip the events of files read
            // again, whose first reading is lost with the database).
            for (from, to) in [
                (segments::dir(dir), "segments"),
                (dedupe::path(dir), "dedupe.tab"),
            ] {
                if from.exists() {
                    fs::rename(&from, aside.join(to)).map_err(io_err(&from))?;
                }
            }
            let next = next_generation(&current);
            set_current(dir, &next)?;
            let store = Store::open(&dir.join(&next), cache_bytes)?;
            let note = format!(
                "the spool could not be opened ({e}); it was moved to {} and a new one started; \
                 files in the watch directory are read again (Segment dedupes by messageId)",
                aside.display()
            );
            tracing::error!(moved_to = %aside.display(), error = %e, "spool unreadable; started a new one");
            Ok((store, Some(note)))
        }
    }
}

fn is_generation(name: &str) -> bool {
    name.strip_prefix("gen-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn next_generation(name: &str) -> String {
    let n: u64 = name
        .strip_prefix("gen-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    format!("gen-{}", n + 1)
}

/// Points `CURRENT` at `name`, atomically and durably.
fn set_current(dir: &Path, name: &str) -> Result<(), Error> {
    let tmp = dir.join("CURRENT.tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(name.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, dir.join(CURRENT)).map_err(io_err(&tmp))?;
    sync_dir(dir)
}

/// Deletes generations other than `current`: left by a compaction that did not finish (the new
/// one) or that finished but had not yet deleted the old one.
fn remove_debris(dir: &Path, current: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_generation(&name)
            && name != current
            && let Err(err) = fs::remove_dir_all(e.path())
        {
            tracing::warn!(path = %e.path().display(), error = %err, "cannot remove an old spool generation");
        }
    }
}

/// sled can panic on some damaged files instead of returning an error; we turn that into an
/// error so a damaged spool is moved aside rather than crash-looping the service.
///
/// We hold `LOCK` when we get here, so sled's own lock can only be held by a handle of ours
/// being dropped (sled's flusher thread lets go up to a flush interval later, which a
/// compaction or a test's reopen can hit): that is waited out for a few seconds.
fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db, Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match open_sled_once(path, cache_bytes) {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn open_sled_once(path: &Path, cache_bytes: u64) -> Result<sled::Db, Error> {
    let path_owned = path.to_owned();
    let result = std::panic::catch_unwind(move || {
        sled::Config::new()
            .path(&path_owned)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(SLED_FLUSH_EVERY_MS))
            .open()
    });
    match result {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(source)) => Err(Error::Sled {
            path: path.to_owned(),
            source,
        }),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "sled panicked".into());
            Err(Error::Corrupt {
                path: path.to_owned(),
                what: format!("database (sled panicked: {what})"),
            })
        }
    }
}

impl Store {
    pub(super) fn open(path: &Path, cache_bytes: u64) -> Result<Store, Error> {
        fs::create_dir_all(path).map_err(io_err(path))?;
        let t = std::time::Instant::now();
        let db = open_sled(path, cache_bytes)?;
        tracing::debug!(ms = ms_since(t), "spool open: sled opened");
        let sled_err = |source| Error::Sled {
            path: path.to_owned(),
            source,
        };
        let tree = |name: &str| db.open_tree(name).map_err(sled_err);
        let store = Store {
            meta: tree("meta")?,
            queue: tree("queue")?,
            acked: tree("acked")?,
            files: tree("files")?,
            paths: tree("paths")?,
            heads: tree("heads")?,
            dedupe: tree("dedupe")?,
            quarantine: tree("quarantine")?,
            dead: tree("dead")?,
            join_log: tree("join_log")?,
            join_sessions: tree("join_sessions")?,
            join_waiting: tree("join_waiting")?,
            join_params: tree("join_params")?,
            join_jobs: tree("join_jobs")?,
            data_file: File::open(path.join("db")).map_err(io_err(&path.join("db")))?,
            synced_blobs: Mutex::new(HashSet::new()),
            path: path.to_owned(),
            db,
        };
        // What sled wrote while opening (a new `conf`, a snapshot, the directories) is made
        // durable before anything is committed on top of it.
        let t = std::time::Instant::now();
        store.sync_sled_files()?;
        tracing::debug!(ms = ms_since(t), "spool open: sled's files synced");
        match store.meta.get(FORMAT).map_err(sled_err)? {
            None => {
                store
                    .meta
                    .insert(FORMAT, &FORMAT_VERSION.to_be_bytes())
                    .map_err(sled_err)?;
                store.flush()?;
            }
            Some(v) => {
                let found =
                    u32::from_be_bytes(v.as_ref().try_into().map_err(|_| Error::Corrupt {
                        path: path.to_owned(),
                        what: FORMAT.into(),
                    })?);
                // Version 1 differs in the dedupe tree, version 2 in keeping packets in the
                // queue tree, which version 3 still reads; `Spool::open` upgrades both.
                if !(1..=FORMAT_VERSION).contains(&found) {
                    return Err(Error::Version {
                        path: path.to_owned(),
                        found,
                    });
                }
            }
        }
        Ok(store)
    }

    pub(super) fn sled_err(&self, source: sled::Error) -> Error {
        Error::Sled {
            path: self.path.clone(),
            source,
        }
    }

    pub(super) fn tx_err(&self, e: TransactionError<String>) -> Error {
        match e {
            TransactionError::Storage(source) => self.sled_err(source),
            TransactionError::Abort(what) => Error::Corrupt {
                path: self.path.clone(),
                what,
            },
        }
    }

    /// Makes everything sled was given so far durable, in an order a power cut at any step
    /// cannot turn into loss (see "Power loss" in the spool's `//!`): sled's flush (its log
    /// written, ending in `sync_file_range`, which is no sync), then the blob files its log
    /// points at, then the log itself (`db`, data and metadata).
    pub(super) fn flush(&self) -> Result<(), Error> {
        self.db.flush().map_err(|e| self.sled_err(e))?;
        self.sync_blobs()?;
        self.data_file
            .sync_all()
            .map_err(io_err(&self.path.join("db")))
    }

    /// fsyncs the blob files sled wrote since the last call, and `blobs/` when its entries
    /// changed. sled 0.34 writes a log item over a quarter of its 512 KiB segment (a large
    /// node of ours: a leaf of big dedupe log values, a quarantined line) to a file of its
    /// own and never syncs it. After a power cut such a file is empty, sled's recovery stops
    /// reading its log at the item that points at it, and every later transaction is gone,
    /// flushed or not; a missing one is skipped, and the node goes back to an older version.
    fn sync_blobs(&self) -> Result<(), Error> {
        let dir = self.path.join("blobs");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(());
        };
        let present: HashSet<OsString> = entries.flatten().map(|e| e.file_name()).collect();
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|e| e.into_inner());
        let todo: Vec<&OsString> = present.iter().filter(|n| !synced.contains(*n)).collect();
        let changed = synced.len() != present.len() || !todo.is_empty();
        sync_files(&dir, &todo)?;
        if changed {
            sync_dir(&dir)?;
            *synced = present;
        }
        Ok(())
    }

    /// fsyncs the files sled writes without syncing them or their directory entries: `conf`
    /// (written once; sled rewrites a lost one from our settings, but says so at every start),
    /// the snapshot it writes when it opens (its content is synced, its rename is not), the
    /// blobs, and the generation's directory and its entry in `spool.dir`. Once per open.
    fn sync_sled_files(&self) -> Result<(), Error> {
        for e in fs::read_dir(&self.path)
            .map_err(io_err(&self.path))?
            .flatten()
        {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name == "conf" || name.starts_with("snap.") {
                let p = e.path();
                match File::open(&p).and_then(|f| f.sync_all()) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io_err(&p)(e));
                    }
                    _ => {}
                }
            }
        }
        let t = std::time::Instant::now();
        self.sync_blobs()?;
        tracing::debug!(
            ms = ms_since(t),
            blobs = self.synced_blobs.lock().map_or(0, |s| s.len()),
            "spool open: blob files synced"
        );
        sync_dir(&self.path)?;
        match self.path.parent() {
            Some(parent) => sync_dir(parent),
            None => Ok(()),
        }
    }

    /// A new id for a file record, a quarantine entry or a dead letter. Kept in `meta` (not
    /// sled's `generate_id`, whose counter a compacted copy would start again from zero, handing
    /// out ids of records that still exist).
    pub(super) fn new_id(&self) -> Result<u64, Error> {
        let mut fresh_start = None;
        let prev = self
            .meta
            .fetch_and_update("next_id", |old| {
                let next = match old.and_then(decode_u64) {
                    Some(n) => n,
                    // A spool from before this counter: continue after sled's.
                    None => *fresh_start
                        .get_or_insert_with(|| self.db.generate_id().unwrap_or(0) + (1 << 20)),
                };
                Some(next.saturating_add(1).to_be_bytes().to_vec())
            })
            .map_err(|e| self.sled_err(e))?;
        Ok(match prev.as_deref().and_then(decode_u64) {
            Some(n) => n,
            None => fresh_start.unwrap_or(0),
        })
    }

    /// The key after the last event of the last packet. With an empty queue, 0: keys are only
    /// compared within one run of the agent's drain, never stored elsewhere.
    pub(super) fn next_queue_key(&self) -> Result<u64, Error> {
        Ok(match self.queue.last().map_err(|e| self.sled_err(e))? {
            Some((k, v)) => {
                let corrupt = || self.corrupt(format!("queue entry {k:?}"));
                let first = decode_u64(&k).ok_or_else(corrupt)?;
                let events = match Location::decode(&v) {
                    Some(l) => usize::from(l.events),
                    None => packet::decode(&v).ok_or_else(corrupt)?.len(),
                };
                first + events as u64
            }
            None => 0,
        })
    }

    /// The segments' committed end (`meta/segment_end`; none yet: segment 0).
    pub(super) fn segment_end(&self) -> Result<End, Error> {
        match self.meta.get(SEGMENT_END).map_err(|e| self.sled_err(e))? {
            Some(v) => End::decode(&v).ok_or_else(|| self.corrupt("segment_end".into())),
            None => Ok(End::default()),
        }
    }

    /// Records the current format version (an older spool needing no data moved).
    pub(super) fn set_format_version(&self) -> Result<(), Error> {
        self.meta
            .insert(FORMAT, &FORMAT_VERSION.to_be_bytes())
            .map_err(|e| self.sled_err(e))?;
        self.flush()
    }

    /// Bytes sled's files take on disk (never the backlog: sled does not shrink them).
    pub(super) fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Bytes of every key and value in our trees: what a compacted copy needs.
    pub(super) fn live_bytes(&self) -> Result<u64, Error> {
        let mut total = 0u64;
        for name in TREES {
            let tree = self.db.open_tree(name).map_err(|e| self.sled_err(e))?;
            for item in tree.iter() {
                let (k, v) = item.map_err(|e| self.sled_err(e))?;
                total += (k.len() + v.len()) as u64;
            }
        }
        Ok(total)
    }

    /// Copies every tree into `to` (a fresh generation) and flushes it.
    pub(super) fn copy_into(&self, to: &Store) -> Result<(), Error> {
        for name in TREES {
            let from = self.db.open_tree(name).map_err(|e| self.sled_err(e))?;
            let dest = to.db.open_tree(name).map_err(|e| to.sled_err(e))?;
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for item in from.iter() {
                let (k, v) = item.map_err(|e| self.sled_err(e))?;
                batch.insert(k, v);
                n += 1;
                if n % 10_000 == 0 {
                    dest.apply_batch(std::mem::take(&mut batch))
                        .map_err(|e| to.sled_err(e))?;
                }
            }
            dest.apply_batch(batch).map_err(|e| to.sled_err(e))?;
        }
        to.flush()
    }

    pub(super) fn corrupt(&self, what: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    /// The format version stored in `meta`.
    pub(super) fn format_version(&self) -> Result<u32, Error> {
        Ok(self
            .meta
            .get(FORMAT)
            .map_err(|e| self.sled_err(e))?
            .and_then(|v| v.as_ref().try_into().ok().map(u32::from_be_bytes))
            .unwrap_or(FORMAT_VERSION))
    }

    /// Moves the dedupe entries of an older format into the table (see `dedupe.rs`): version
    /// 1 kept a key per `messageId` (value: spooled at, ms), version 2 a sorted partition per
    /// 2-byte key. A slice at a time: the entries go into the table and are synced, then the old
    /// keys are deleted, so a crash half way only moves some entries twice. Returns how many.
    pub(super) fn migrate_dedupe(
        &self,
        version: u32,
        table: &mut dedupe::Table,
    ) -> Result<u64, Error> {
        let mut moved = 0u64;
        loop {
            let mut keys: Vec<IVec> = Vec::new();
            let mut entries = Vec::new();
            for item in self.dedupe.iter() {
                let (k, v) = item.map_err(|e| self.sled_err(e))?;
                if k.len() == 2 {
                    let p = u16::from_be_bytes([k[0], k[1]]);
                    entries.extend(
                        dedupe::decode_partition(p, &v)
                            .ok_or_else(|| self.corrupt(format!("dedupe partition {p}")))?,
                    );
                } else if version == 1 {
                    let ms = decode_u64(&v).unwrap_or_else(now_ms);
                    let f = dedupe::fingerprint(&String::from_utf8_lossy(&k));
                    entries.push((f, dedupe::day(ms)));
                } else {
                    continue;
                }
                keys.push(k);
                if entries.len() >= 100_000 {
                    break;
                }
            }
            if keys.is_empty() {
                break;
            }
            table.insert_durably(&entries)?;
            let mut batch = sled::Batch::default();
            for k in keys {
                batch.remove(k);
            }
            self.dedupe
                .apply_batch(batch)
                .map_err(|e| self.sled_err(e))?;
            moved += entries.len() as u64;
        }
        Ok(moved)
    }

    /// Applies the dedupe log values the table does not hold yet (see `dedupe.rs`). Returns the
    /// next sequence number and how many entries were applied. The values go in together, up
    /// to [`REPLAY_BATCH`] entries at a time, so each page of the table is read once per batch
    /// rather than once per entry: after a `kill -9` just before a checkpoint the log holds
    /// about a million entries.
    pub(super) fn replay_dedupe_log(&self, table: &mut dedupe::Table) -> Result<(u64, u64), Error> {
        let mut last = table.applied();
        let mut applied = 0u64;
        let mut batch = Vec::new();
        for item in self.dedupe.range((table.applied() + 1).to_be_bytes()..) {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            let Some(seq) = decode_u64(&k) else { continue };
            let entries = dedupe::decode_log(&v)
                .ok_or_else(|| self.corrupt(format!("dedupe log value {seq}")))?;
            applied += entries.len() as u64;
            batch.extend(entries);
            last = last.max(seq);
            if batch.len() >= REPLAY_BATCH {
                table.apply(last, std::mem::take(&mut batch))?;
            }
        }
        if !batch.is_empty() {
            table.apply(last, batch)?;
        }
        if let Some((k, _)) = self.dedupe.last().map_err(|e| self.sled_err(e))?
            && let Some(seq) = decode_u64(&k)
        {
            last = last.max(seq);
        }
        Ok((last + 1, applied))
    }

    /// The dedupe log's next sequence number as last committed (`None`: a spool from before
    /// it was kept).
    pub(super) fn dedupe_next(&self) -> Result<Option<u64>, Error> {
        Ok(self
            .meta
            .get(DEDUPE_NEXT)
            .map_err(|e| self.sled_err(e))?
            .and_then(|v| decode_u64(&v)))
    }

    /// Deletes the dedupe log values up to `upto` (the table holds them durably).
    pub(super) fn trim_dedupe_log(&self, upto: u64) -> Result<(), Error> {
        let mut batch = sled::Batch::default();
        for item in self.dedupe.range(..=upto.to_be_bytes()) {
            let (k, _) = item.map_err(|e| self.sled_err(e))?;
            if k.len() == 8 {
                batch.remove(k);
            }
        }
        self.dedupe.apply_batch(batch).map_err(|e| self.sled_err(e))
    }

    pub(super) fn json_entries<T: serde::de::DeserializeOwned>(
        &self,
        tree: &Tree,
        what: &str,
    ) -> Result<Vec<(u64, T)>, Error> {
        tree.iter()
            .map(|item| {
                let (k, v) = item.map_err(|e| self.sled_err(e))?;
                let id = decode_u64(&k).unwrap_or(0);
                let entry = serde_json::from_slice(&v).map_err(|_| Error::Corrupt {
                    path: self.path.clone(),
                    what: format!("{what} {id}"),
                })?;
                Ok((id, entry))
            })
            .collect()
    }
}

/// fsyncs the files `names` under `dir`, several at once: each fsync waits for the disk to
/// flush its cache, and flushes issued together are served together (an open after a
/// `kill -9` finds dozens of blob files, all to be synced). A file gone meanwhile is skipped:
/// sled removed a rewritten node's old blob.
fn sync_files(dir: &Path, names: &[&OsString]) -> Result<(), Error> {
    const AT_ONCE: usize = 8;
    let sync = |names: &[&OsString]| {
        for name in names {
            let p = dir.join(name);
            match File::open(&p).and_then(|f| f.sync_all()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&p)(e)),
                _ => {}
            }
        }
        Ok(())
    };
    if names.len() <= 1 {
        return sync(names);
    }
    std::thread::scope(|s| {
        let threads: Vec<_> = names
            .chunks(names.len().div_ceil(AT_ONCE))
            .map(|part| s.spawn(move || sync(part)))
            .collect();
        threads
            .into_iter()
            .try_for_each(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}

/// Swaps in a compacted copy of `old`: builds `gen-<n+1>` beside it, points `CURRENT` at it,
/// and deletes `old`. Crash-safe at every step: before the `CURRENT` rename the old generation
/// is current and the new one is debris; after it, the new one is complete (flushed before the
/// rename) and the old one is debris. Debris is deleted at the next open.
pub(super) fn compact(dir: &Path, old: &Store, cache_bytes: u64) -> Result<Store, Error> {
    let old_name = old
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let new_name = next_generation(&old_name);
    let new_path = dir.join(&new_name);
    if new_path.exists() {
        fs::remove_dir_all(&new_path).map_err(io_err(&new_path))?;
    }
    let new = Store::open(&new_path, cache_bytes)?;
    if let Err(e) = old.copy_into(&new) {
        drop(new);
        let _ = fs::remove_dir_all(&new_path);
        return Err(e);
    }
    set_current(dir, &new_name)?;
    Ok(new)
}

/// Deletes a generation that is no longer current (after its `Store` was dropped).
pub(super) fn remove_generation(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove the old spool generation; it goes at the next start");
    }
}
