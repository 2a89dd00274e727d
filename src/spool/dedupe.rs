//! The dedupe index: which `messageId`s were spooled within `spool.dedupe_window_days`.
//!
//! Ids are hashed (SHA-256); an entry keeps 80 bits of the hash and the day it was spooled.
//! Two ids are taken for the same when those 80 bits agree: with 14 million ids in the window,
//! the chance that a new id is wrongly skipped is about 1 in 10^17.
//!
//! # Where the entries live (format version 3)
//!
//! Version 2 kept the entries in 65,536 sled values, each a sorted list rewritten whole by
//! every commit that added to it: at a few million ids every commit rewrote megabytes, four
//! fifths of the commit's time, and sled's memory and open time grew with what it wrote. Now:
//!
//! - **`spool.dir/dedupe.tab`**, a hash table in a plain file: a header page, then pages of
//!   4 KiB, each [`SLOTS`] slots of `[hash u64][partition u16][day u16]` (little-endian; day 0
//!   is an empty slot). An id lives in the page its hash picks, in any free slot; a slot older
//!   than the window counts as free. Lookups read the pages of a commit's ids, neighbouring
//!   ones with one `pread`, from the page cache: no memory of ours grows with the window.
//!   When the table is three quarters full, or a page has no free slot, it is rebuilt twice
//!   as large into a new file that replaces it by `rename`.
//! - **A Bloom filter in memory** (`filter.rs`, 4 MiB) rules out most new ids before any page
//!   is read: at 5 million ids a commit's 8000 ids fell on 8000 pages, 32 MB of copies per
//!   commit and 13.5% of the agent's CPU. It is not stored: a table opened from disk fills it
//!   from its pages a slice at a time, at each lookup, and trusts it once all are in.
//! - **The sled `dedupe` tree is its log**: each commit adds one value, its new entries, under
//!   a sequence number, in the same transaction as its events; after sled's flush the entries
//!   are the table's. They are held in memory (and looked up there) until [`DEFER_ENTRIES`] of
//!   them have gathered, then go into the file together, each page read and written once for
//!   all its entries, runs of neighbouring pages with one call: a batch rewrites most of a
//!   large table however few entries it has, so the fewer batches the better (a quarter of a
//!   million entries, about 7 MB held; half as many cost 4% more CPU at 5 million ids). Put
//!   in commit by commit, every entry had cost a `pread` and a `pwrite` of its own page, a
//!   quarter of the agent's CPU during an ingest. The table is not synced at every
//!   commit: its header records the last sequence number it holds durably, and a checkpoint
//!   (every [`CHECKPOINT_ENTRIES`] entries, at the maintenance tick, and when the spool closes)
//!   puts the entries held in memory in, fsyncs it, writes that number, and deletes the log
//!   values it covers. Opening the spool applies the values past it again.
//!
//! So an entry is in the table only once its events are committed (an id is never skipped
//! for events that were not spooled), and a committed entry is in the table, in memory or in
//! the log (a crash loses only the memory, and the log still holds those entries). A
//! table lost or damaged (power loss in the middle of a page write, a deleted file) loses at
//! worst entries, never events: a re-exported event would be sent again, and Segment dedupes
//! by `messageId` too.

use std::collections::HashSet;
use std::fs::{self, File};
use std::hash::{BuildHasherDefault, Hasher};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use hashbrown::HashTable;

use super::filter::Filter;
use super::{Error, io_err, table_file};

/// An entry of a version 2 partition (sled keys of 2 bytes), read once to move it here.
const PARTITION_ENTRY: usize = 10;

const PAGE: usize = 4096;
const SLOT: usize = 12;
pub(super) const SLOTS: usize = PAGE / SLOT;
const MAGIC: &[u8; 8] = b"LSADEDUP";
const TABLE_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 8;
const MIN_PAGES: u64 = 256;
/// A checkpoint once the log holds this many entries (about 10 MB of sled values).
pub(super) const CHECKPOINT_ENTRIES: u64 = 1_000_000;
/// Committed entries held in memory before they go into the file together (see the module
/// doc): about 7 MB with their index, and at a table of 32,768 pages (5 million ids) 8
/// entries per page read and written instead of one.
pub(super) const DEFER_ENTRIES: usize = 1 << 18;
/// A lookup reads at most this many pages with one `pread` (256 KiB)...
const LOOKUP_PAGES: u64 = 64;
/// ...reading past at most this many pages it does not need between two it does.
const LOOKUP_GAP: u64 = 1;
/// Pages read into a filter being filled at each lookup (8 MiB: a table of 5 million ids is
/// in after 16 commits; tests fill a table of 150,000 in 16 lookups).
const FILL_PAGES: u64 = if cfg!(test) { 64 } else { 2048 };

/// Where an id goes and what is stored for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Fingerprint {
    pub partition: u16,
    pub hash: u64,
}

/// A set of fingerprints, hashed by their own bits: they are a SHA-256 already (SipHash over
/// them was a tenth of the committing thread's time).
pub(super) type FingerprintSet = HashSet<Fingerprint, BuildHasherDefault<FingerprintHasher>>;

pub(super) fn fingerprint_set(capacity: usize) -> FingerprintSet {
    FingerprintSet::with_capacity_and_hasher(capacity, Default::default())
}

/// Hashes a [`Fingerprint`] (its derived `Hash` writes the partition, then the hash) to the
/// bits it carries.
#[derive(Default)]
pub(super) struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u16(&mut self, n: u16) {
        self.0 ^= u64::from(n);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by `Fingerprint`; a plain fold, should another key ever come here.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
}

pub(super) fn fingerprint(message_id: &str) -> Fingerprint {
    let d = Sha256::digest(message_id.as_bytes());
    Fingerprint {
        partition: u16::from_be_bytes([d[0], d[1]]),
        hash: u64::from_be_bytes(d[2..10].try_into().expect("8 bytes")),
    }
}

/// Days since the Unix epoch (fits a u16 until 2149).
pub(super) fn day(ms: u64) -> u16 {
    u16::try_from(ms / 86_400_000).unwrap_or(u16::MAX)
}

/// The table file under `spool.dir`.
pub(super) fn path(spool_dir: &Path) -> PathBuf {
    spool_dir.join("dedupe.tab")
}

/// A log value: the entries one commit added, `[partition u16 BE][hash u64 BE][day u16 BE]`.
pub(super) fn encode_log(entries: &[(Fingerprint, u16)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * 12);
    for (f, day) in entries {
        v.extend_from_slice(&f.partition.to_be_bytes());
        v.extend_from_slice(&f.hash.to_be_bytes());
        v.extend_from_slice(&day.to_be_bytes());
    }
    v
}

pub(super) fn decode_log(v: &[u8]) -> Option<Vec<(Fingerprint, u16)>> {
    if !v.len().is_multiple_of(12) {
        return None;
    }
    Some(
        v.chunks_exact(12)
            .map(|e| {
                (
                    Fingerprint {
                        partition: u16::from_be_bytes([e[0], e[1]]),
                        hash: u64::from_be_bytes(e[2..10].try_into().expect("8 bytes")),
                    },
                    u16::from_be_bytes([e[10], e[11]]),
                )
            })
            .collect(),
    )
}

/// The entries of a version 2 partition value (`None`: damaged).
pub(super) fn decode_partition(partition: u16, v: &[u8]) -> Option<Vec<(Fingerprint, u16)>> {
    if !v.len().is_multiple_of(PARTITION_ENTRY) {
        return None;
    }
    Some(
        v.chunks_exact(PARTITION_ENTRY)
            .map(|e| {
                (
                    Fingerprint {
                        partition,
                        hash: u64::from_be_bytes(e[..8].try_into().expect("8 bytes")),
                    },
                    u16::from_be_bytes([e[8], e[9]]),
                )
            })
            .collect(),
    )
}

/// How many of `pages` (sorted, not empty) one `pread` of the table covers: from the first
/// on, within [`LOOKUP_PAGES`], with gaps of at most [`LOOKUP_GAP`] pages; and the last page
/// it reads.
fn run(mut pages: impl Iterator<Item = u64>) -> (usize, u64) {
    let first = pages.next().expect("a page");
    let mut last = first;
    let n = pages
        .take_while(|&page| {
            let near = page - last <= LOOKUP_GAP + 1 && page - first < LOOKUP_PAGES;
            if near {
                last = page;
            }
            near
        })
        .count();
    (n + 1, last)
}

/// Entries committed but not yet in the table's file, in log order, with an index of their
/// places hashed by the fingerprints' own bits (the filter rules out most ids before: a set
/// of fingerprints took 34 bytes an entry, this 16 and about 10).
#[derive(Default)]
struct Pending {
    entries: Vec<Held>,
    index: HashTable<u32>,
    /// The log sequence number of the last entries.
    upto: u64,
}

/// A pending entry (16 bytes where `(Fingerprint, u16)` takes 24).
#[derive(Clone, Copy)]
struct Held {
    hash: u64,
    partition: u16,
    day: u16,
}

impl Held {
    fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            partition: self.partition,
            hash: self.hash,
        }
    }
}

impl Pending {
    fn push(&mut self, seq: u64, new: Vec<(Fingerprint, u16)>) {
        self.upto = self.upto.max(seq);
        let Pending { entries, index, .. } = self;
        // Room in steps of two, the last with some to spare for the commit that crosses
        // [`DEFER_ENTRIES`] (it is put in then), so that it moves nothing.
        let want = entries.len() + new.len();
        if want > entries.capacity() {
            let room = match want.next_power_of_two() {
                DEFER_ENTRIES => DEFER_ENTRIES + DEFER_ENTRIES / 16,
                n if n < DEFER_ENTRIES => n,
                _ => want,
            };
            entries.reserve_exact(room - entries.len());
            index.reserve(room - index.len(), |&i| entries[i as usize].hash);
        }
        for (f, day) in new {
            let i = u32::try_from(entries.len()).expect("fewer than 2^32 pending entries");
            entries.push(Held {
                hash: f.hash,
                partition: f.partition,
                day,
            });
            index.insert_unique(f.hash, i, |&i| entries[i as usize].hash);
        }
    }

    fn reindex(&mut self) {
        let Pending { entries, index, .. } = self;
        index.reserve(entries.len(), |&i| entries[i as usize].hash);
        for (i, e) in entries.iter().enumerate() {
            index.insert_unique(e.hash, i as u32, |&i| entries[i as usize].hash);
        }
    }

    fn contains(&self, f: &Fingerprint) -> bool {
        self.index
            .find(f.hash, |&i| self.entries[i as usize].fingerprint() == *f)
            .is_some()
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, i: usize) -> (Fingerprint, u16) {
        let e = self.entries[i];
        (e.fingerprint(), e.day)
    }

    fn entries(&self) -> impl Iterator<Item = (Fingerprint, u16)> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

fn slot_at(page: &[u8], i: usize) -> (Fingerprint, u16) {
    let s = &page[i * SLOT..(i + 1) * SLOT];
    (
        Fingerprint {
            hash: u64::from_le_bytes(s[..8].try_into().expect("8 bytes")),
            partition: u16::from_le_bytes([s[8], s[9]]),
        },
        u16::from_le_bytes([s[10], s[11]]),
    )
}

fn set_slot(page: &mut [u8], i: usize, f: Fingerprint, day: u16) {
    let s = &mut page[i * SLOT..(i + 1) * SLOT];
    s[..8].copy_from_slice(&f.hash.to_le_bytes());
    s[8..10].copy_from_slice(&f.partition.to_le_bytes());
    s[10..12].copy_from_slice(&day.to_le_bytes());
}

/// The table (see the module doc). Owned by the spool's writer.
pub(super) struct Table {
    path: PathBuf,
    file: File,
    /// Data pages (the header page not counted).
    pages: u64,
    /// Slots not empty (expired ones included until a prune clears them).
    used: u64,
    /// The last log sequence number whose entries are all in the table.
    applied: u64,
    /// `applied` as the header on disk says (what a checkpoint made durable).
    durable: u64,
    /// Entries committed but not yet in the file (deferred, see [`Table::defer`], or a write to
    /// it failed), put in together.
    pending: Pending,
    /// What the table may hold (see `filter.rs`): every entry taken since it was made, and
    /// those of the pages before `filling`.
    filter: Filter,
    /// The next page to read into the filter; `None` once all are in (only then does a
    /// lookup trust it).
    filling: Option<u64>,
    /// Entries of days before this one count as absent.
    pub min_day: u16,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("path", &self.path)
            .field("pages", &self.pages)
            .field("used", &self.used)
            .field("applied", &self.applied)
            .finish()
    }
}

impl Table {
    /// Opens the table at `path`, or starts an empty one when it is missing or its header is
    /// damaged (saying so: ids spooled before may be spooled again).
    pub(super) fn open(path: &Path) -> Result<Table, Error> {
        table_file::remove_unfinished(path);
        match Table::open_existing(path)? {
            Some(t) => Ok(t),
            None => {
                if path.exists() {
                    tracing::warn!(path = %path.display(), "dedupe table damaged; starting an empty one (events re-exported by Leanplum may be sent again; Segment dedupes them by messageId)");
                }
                Table::create(path, MIN_PAGES, 0)
            }
        }
    }

    /// Replaces the table at `path` with an empty one (its entries cannot be trusted).
    pub(super) fn reset(path: &Path) -> Result<Table, Error> {
        Table::create(path, MIN_PAGES, 0)
    }

    fn open_existing(path: &Path) -> Result<Option<Table>, Error> {
        let file = match fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path)(e)),
        };
        let Some(h) = table_file::read_header(&file, HEADER_LEN) else {
            return Ok(None);
        };
        if &h[..8] != MAGIC {
            return Ok(None);
        }
        let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        let (pages, applied, used) = (u64_at(12), u64_at(20), u64_at(28));
        let len = file.metadata().map_err(io_err(path))?.len();
        if version != TABLE_VERSION || pages == 0 || len < (pages + 1) * PAGE as u64 {
            return Ok(None);
        }
        Ok(Some(Table {
            path: path.to_owned(),
            file,
            pages,
            used,
            applied,
            durable: applied,
            pending: Pending::default(),
            filter: Filter::new(),
            filling: Some(1),
            min_day: 0,
        }))
    }

    /// Writes an empty table of `pages` at `path` (through a temporary file and a rename).
    fn create(path: &Path, pages: u64, applied: u64) -> Result<Table, Error> {
        let mut t = Table::create_tmp(path, pages, applied, 0)?;
        let tmp = std::mem::replace(&mut t.path, path.to_owned());
        t.write_header(&tmp)?;
        t.install(&tmp)?;
        Ok(t)
    }

    fn write_header(&self, path: &Path) -> Result<(), Error> {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&TABLE_VERSION.to_le_bytes());
        h.extend_from_slice(&self.pages.to_le_bytes());
        h.extend_from_slice(&self.applied.to_le_bytes());
        h.extend_from_slice(&self.used.to_le_bytes());
        table_file::write_header(&self.file, path, &h)
    }

    /// Moves a fully written and synced table from `tmp` to its place, durably.
    fn install(&self, tmp: &Path) -> Result<(), Error> {
        table_file::install(tmp, &self.path)
    }

    fn page_of(&self, f: &Fingerprint) -> u64 {
        // The hash bits are uniform; the partition's mix in for tables past 2^64 / 2^16 pages.
        1 + (f.hash ^ (u64::from(f.partition) << 48)) % self.pages
    }

    /// Reads pages `first..` into `buf` (whole pages), with one `pread`.
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> Result<(), Error> {
        debug_assert!(buf.len().is_multiple_of(PAGE));
        self.file
            .read_exact_at(buf, first * PAGE as u64)
            .map_err(io_err(&self.path))
    }

    /// Writes `buf` (whole pages) as pages `first..`, with one `pwrite`.
    fn write_pages(&self, first: u64, buf: &[u8]) -> Result<(), Error> {
        debug_assert!(buf.len().is_multiple_of(PAGE));
        self.file
            .write_all_at(buf, first * PAGE as u64)
            .map_err(io_err(&self.path))
    }

    fn live(&self, day: u16) -> bool {
        day != 0 && day >= self.min_day
    }

    /// Which of `ids` the table (or the pending entries) holds within the window. The pages
    /// are read in file order, a run of neighbouring ones (gaps of at most [`LOOKUP_GAP`]
    /// pages) with one `pread` of up to [`LOOKUP_PAGES`]: a commit's thousands of ids fall on
    /// most pages of a table of a few million, and a `pread` per page cost more than the
    /// copy.
    ///
    /// An id the filter rules out is neither read nor looked for in the pending entries. A
    /// filter still being filled is not trusted: each lookup reads its next [`FILL_PAGES`]
    /// into it first.
    pub(super) fn contains(&mut self, ids: &[Fingerprint]) -> Result<Vec<bool>, Error> {
        self.fill_filter(FILL_PAGES)?;
        let filtered = self.filling.is_none();
        let mut out = vec![false; ids.len()];
        // The ids to look for in the file, by page.
        let mut wanted = Vec::with_capacity(ids.len());
        for (i, f) in ids.iter().enumerate() {
            if filtered && !self.filter.may_contain(f) {
                continue;
            }
            if self.pending.contains(f) {
                out[i] = true;
            } else {
                wanted.push((self.page_of(f), i));
            }
        }
        wanted.sort_unstable();
        let mut buf = Vec::new();
        let mut rest = &wanted[..];
        while let Some(&(first, _)) = rest.first() {
            let (n, last) = run(rest.iter().map(|w| w.0));
            let (run, tail) = rest.split_at(n);
            buf.resize((last - first + 1) as usize * PAGE, 0);
            self.read_pages(first, &mut buf)?;
            for &(page, i) in run {
                let at = (page - first) as usize * PAGE;
                out[i] = self.holds(&buf[at..at + PAGE], ids[i]);
            }
            rest = tail;
        }
        Ok(out)
    }

    /// Reads up to `pages` more pages into the filter being filled, every entry of them (an
    /// expired one too: the window may widen at a reload), and marks it complete after the
    /// last.
    fn fill_filter(&mut self, pages: u64) -> Result<(), Error> {
        let Some(from) = self.filling else {
            return Ok(());
        };
        let to = from.saturating_add(pages).min(self.pages + 1);
        let mut buf = vec![0u8; LOOKUP_PAGES as usize * PAGE];
        let mut first = from;
        while first < to {
            let n = (to - first).min(LOOKUP_PAGES);
            let run = &mut buf[..n as usize * PAGE];
            self.read_pages(first, run)?;
            for page in run.chunks_exact(PAGE) {
                for s in 0..SLOTS {
                    let (f, day) = slot_at(page, s);
                    if day != 0 {
                        self.filter.insert(&f);
                    }
                }
            }
            first += n;
        }
        self.filling = (to <= self.pages).then_some(to);
        if self.filling.is_none() {
            tracing::debug!(
                pages = self.pages,
                ids = self.filter.added(),
                bytes = self.filter.bytes(),
                "dedupe filter filled"
            );
        }
        Ok(())
    }

    /// Starts a new filter, to be filled from the pages, when the one in use holds more than
    /// it is sized for and more than twice the entries the table does (in the file and
    /// pending): entries pruned from the window, or counted twice by a replay, that a new one
    /// leaves out.
    fn renew_filter(&mut self) {
        let f = &self.filter;
        let held = self.used + self.pending.len() as u64;
        if self.filling.is_some() || f.added() <= f.capacity() || f.added() <= 2 * held {
            return;
        }
        self.filter.clear();
        for (f, _) in self.pending.entries() {
            self.filter.insert(&f);
        }
        self.filling = Some(1);
    }

    /// Whether `page` holds `f` within the window.
    fn holds(&self, page: &[u8], f: Fingerprint) -> bool {
        (0..SLOTS).any(|s| {
            let (g, day) = slot_at(page, s);
            g == f && self.live(day)
        })
    }

    /// Takes the entries of the committed log value `seq`, with any still pending, into the
    /// file now. A failure to write the table keeps them pending (looked up from memory) and
    /// is returned for the caller to log; the commit stands.
    pub(super) fn apply(
        &mut self,
        seq: u64,
        entries: Vec<(Fingerprint, u16)>,
    ) -> Result<(), Error> {
        self.take(seq, entries, 0)
    }

    /// Takes the entries of the committed log value `seq`: held in memory until
    /// [`DEFER_ENTRIES`] have gathered (or the next checkpoint), then put into the file with
    /// the others as [`Table::apply`] does.
    pub(super) fn defer(
        &mut self,
        seq: u64,
        entries: Vec<(Fingerprint, u16)>,
    ) -> Result<(), Error> {
        self.take(seq, entries, DEFER_ENTRIES)
    }

    /// Adds `entries` (of log value `seq`) to the pending ones, and puts them all in once
    /// there are `hold` or more.
    fn take(
        &mut self,
        seq: u64,
        entries: Vec<(Fingerprint, u16)>,
        hold: usize,
    ) -> Result<(), Error> {
        for (f, _) in &entries {
            self.filter.insert(f);
        }
        self.pending.push(seq, entries);
        self.renew_filter();
        if self.pending.len() < hold {
            return Ok(());
        }
        self.apply_pending()
    }

    /// Puts every pending entry into the file in one pass (entries of one page in log order,
    /// as commit after commit would). Only once all are in does `applied` move past them; a
    /// failure keeps them all pending (those written already are found there again).
    fn apply_pending(&mut self) -> Result<(), Error> {
        if self.pending.len() == 0 {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.pending);
        // Not needed while they go in (lookups wait): its memory is had back first.
        pending.index = HashTable::new();
        let result = self.insert(pending.len(), &|i| pending.get(i));
        if result.is_err() {
            pending.reindex();
            self.pending = pending;
            return result;
        }
        self.applied = self.applied.max(pending.upto);
        Ok(())
    }

    /// Puts entries of an older format in and syncs them (before their old form is deleted).
    pub(super) fn insert_durably(&mut self, entries: &[(Fingerprint, u16)]) -> Result<(), Error> {
        for (f, _) in entries {
            self.filter.insert(f);
        }
        self.insert(entries.len(), &|i| entries[i])?;
        self.file.sync_data().map_err(io_err(&self.path))?;
        self.write_header(&self.path.clone())
    }

    /// Puts entries into their pages, each page read once and written only if it changed
    /// (entries it already holds change nothing: a replay after a `kill -9` finds most of
    /// them there). Neighbouring pages are read with one `pread`, as a lookup reads them, and
    /// each run of changed ones written back with one `pwrite`: at 5 million ids a batch
    /// changes most pages of the table, and two calls per page cost more than the copies.
    /// Grows the table when it would be more than three quarters full or a page has no free
    /// slot.
    fn insert(
        &mut self,
        n: usize,
        entry: &dyn Fn(usize) -> (Fingerprint, u16),
    ) -> Result<(), Error> {
        // Entry `i` (in log order) as `[its page - 1: 32 bits][i: 32 bits]`: sorted, by page
        // and in log order (8 bytes, where a copy of each would be 24: a batch is a quarter
        // of a million). A table of 2^32 pages would hold 10^12 ids.
        let mut keys: Vec<u64> = (0..n)
            .map(|i| (self.page_of(&entry(i).0) - 1) << 32 | i as u64)
            .collect();
        let entry = |key: u64| entry((key & u64::from(u32::MAX)) as usize);
        let page_of_key = |key: u64| (key >> 32) + 1;
        // Entries of one page go in in their log order.
        keys.sort_unstable();
        let limit = self.pages * SLOTS as u64 * 3 / 4;
        let mut buf = Vec::new();
        let mut changed = Vec::new();
        let mut group = Vec::new();
        let mut rest = &keys[..];
        while let Some(&key) = rest.first() {
            let first = page_of_key(key);
            let (n, last) = run(rest.iter().map(|&k| page_of_key(k)));
            let run = &rest[..n];
            buf.resize((last - first + 1) as usize * PAGE, 0);
            self.read_pages(first, &mut buf)?;
            changed.clear();
            changed.resize((last - first + 1) as usize, false);
            let mut done = 0;
            let mut full = false;
            while done < n {
                let page = page_of_key(run[done]);
                group.clear();
                group.extend(
                    run[done..]
                        .iter()
                        .take_while(|&&k| page_of_key(k) == page)
                        .map(|&k| entry(k)),
                );
                let at = (page - first) as usize;
                let (added, page_changed, page_full) =
                    self.put_in_page(&mut buf[at * PAGE..(at + 1) * PAGE], &group, limit);
                self.used += added;
                changed[at] = page_changed;
                if page_full {
                    full = true;
                    break;
                }
                done += group.len();
            }
            self.write_changed(first, &buf, &changed)?;
            if full {
                // Grow (which rehashes everything, this page's entries included) and put the
                // rest of this batch in the new table.
                self.grow()?;
                let left: Vec<_> = rest[done..].iter().map(|&k| entry(k)).collect();
                return self.insert(left.len(), &|i| left[i]);
            }
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Puts `group` (entries of this `page`) into it: returns the slots it filled that were
    /// empty, whether it changed, and whether it stopped for want of room (a page with no
    /// free slot, or an empty slot to take with the table at `limit`).
    fn put_in_page(
        &self,
        page: &mut [u8],
        group: &[(Fingerprint, u16)],
        limit: u64,
    ) -> (u64, bool, bool) {
        // The page's hashes, decoded once for the whole group: each entry is looked up
        // against them, and the full slot read only where a hash matches.
        let mut hashes = [0u64; SLOTS];
        for (i, h) in hashes.iter_mut().enumerate() {
            *h = slot_at(page, i).0.hash;
        }
        // Slots below this one are live (the group only fills slots).
        let mut free_from = 0;
        let mut added = 0;
        let mut changed = false;
        for &(f, day) in group {
            let held = hashes.iter().enumerate().any(|(i, &h)| {
                h == f.hash && {
                    let (g, d) = slot_at(page, i);
                    g == f && self.live(d)
                }
            });
            if held {
                continue;
            }
            match (free_from..SLOTS).find(|&s| !self.live(slot_at(page, s).1)) {
                // Three quarters full: grow before taking an empty slot.
                Some(s) if slot_at(page, s).1 == 0 && self.used + added >= limit => {
                    return (added, changed, true);
                }
                Some(s) => {
                    if slot_at(page, s).1 == 0 {
                        added += 1;
                    }
                    set_slot(page, s, f, day);
                    hashes[s] = f.hash;
                    free_from = s + 1;
                    changed = true;
                }
                None => return (added, changed, true),
            }
        }
        (added, changed, false)
    }

    /// Writes the pages of `buf` (read from page `first` on) that `changed` marks, a run of
    /// neighbouring ones with one `pwrite`.
    fn write_changed(&self, first: u64, buf: &[u8], changed: &[bool]) -> Result<(), Error> {
        let mut i = 0;
        while i < changed.len() {
            if !changed[i] {
                i += 1;
                continue;
            }
            let n = changed[i..].iter().take_while(|c| **c).count();
            self.write_pages(first + i as u64, &buf[i * PAGE..(i + n) * PAGE])?;
            i += n;
        }
        Ok(())
    }

    /// Rebuilds the table twice as large (live entries only) and swaps it in.
    fn grow(&mut self) -> Result<(), Error> {
        let live = self.used;
        let mut pages = self.pages * 2;
        while live * 2 > pages * SLOTS as u64 {
            pages *= 2;
        }
        self.rebuild(pages)
    }

    /// Copies the live entries into a new table of `pages` (a multiple of the current count)
    /// and swaps it in. An entry's page is `1 + x % pages`, so old page `p` splits into new
    /// pages `p`, `p + P`, `p + 2P`, ... (`P` the old count): each old page is read once and its
    /// entries written straight into those, never more than a page's worth, so no new page can
    /// overflow and nothing is read back.
    fn rebuild(&mut self, pages: u64) -> Result<(), Error> {
        debug_assert!(pages.is_multiple_of(self.pages));
        let split = (pages / self.pages) as usize;
        let mut new = Table::create_tmp(&self.path, pages, self.applied, self.min_day)?;
        let mut buf = [0u8; PAGE];
        let mut out = vec![[0u8; PAGE]; split];
        let mut filled = vec![0usize; split];
        for page in 1..=self.pages {
            self.read_pages(page, &mut buf)?;
            for s in 0..SLOTS {
                let (f, day) = slot_at(&buf, s);
                // (An entry not of this page can only be debris, say of a torn write.)
                if self.live(day) && self.page_of(&f) == page {
                    if self.filling.is_some() {
                        // The filter is not complete: it will be with every entry copied.
                        self.filter.insert(&f);
                    }
                    let i = ((new.page_of(&f) - page) / self.pages) as usize;
                    set_slot(&mut out[i], filled[i], f, day);
                    filled[i] += 1;
                }
            }
            for i in 0..split {
                if filled[i] > 0 {
                    new.write_pages(page + i as u64 * self.pages, &out[i])?;
                    new.used += filled[i] as u64;
                    out[i] = [0u8; PAGE];
                    filled[i] = 0;
                }
            }
        }
        let tmp = std::mem::replace(&mut new.path, self.path.clone());
        table_file::finish_rebuild(&new.file, &tmp, &new.path, || new.write_header(&tmp))?;
        new.durable = new.applied;
        new.pending = std::mem::take(&mut self.pending);
        // The filter has every entry taken, and every entry copied.
        std::mem::swap(&mut new.filter, &mut self.filter);
        new.filling = None;
        *self = new;
        Ok(())
    }

    /// An empty table at a temporary name beside `path` (installed by the caller).
    fn create_tmp(path: &Path, pages: u64, applied: u64, min_day: u16) -> Result<Table, Error> {
        let (tmp, file) = table_file::create_tmp(path, pages, PAGE)?;
        Ok(Table {
            path: tmp,
            file,
            pages,
            used: 0,
            applied,
            durable: applied,
            pending: Pending::default(),
            // Empty, so the filter is complete (a rebuild keeps the table's own).
            filter: Filter::new(),
            filling: None,
            min_day,
        })
    }

    /// Puts the pending entries in, makes the table durable up to `applied` and returns it:
    /// the log values up to it can go. When the pending entries cannot be written, what is in
    /// is still made durable, and the error returned (the log is kept).
    pub(super) fn checkpoint(&mut self) -> Result<u64, Error> {
        let pending_in = self.apply_pending();
        let header = || self.write_header(&self.path);
        self.durable =
            table_file::checkpoint(&self.file, &self.path, self.durable, self.applied, header)?;
        pending_in.map(|()| self.durable)
    }

    /// The last log sequence number the table holds, durably or not.
    pub(super) fn applied(&self) -> u64 {
        self.applied
    }

    /// Clears the slots of days before `min_day` in pages `[from, to)` (1-based, clamped) and
    /// returns how many. From then on such entries count as absent anyway.
    pub(super) fn prune_pages(&mut self, from: u64, to: u64) -> Result<u64, Error> {
        let mut cleared = 0;
        let mut buf = [0u8; PAGE];
        for page in from.max(1)..to.min(self.pages + 1) {
            self.read_pages(page, &mut buf)?;
            let mut n = 0;
            for s in 0..SLOTS {
                let (_, d) = slot_at(&buf, s);
                if d != 0 && d < self.min_day {
                    buf[s * SLOT..(s + 1) * SLOT].fill(0);
                    n += 1;
                }
            }
            if n > 0 {
                self.write_pages(page, &buf)?;
                cleared += n;
            }
        }
        self.used = self.used.saturating_sub(cleared);
        Ok(cleared)
    }

    pub(super) fn pages(&self) -> u64 {
        self.pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(i: u64) -> Fingerprint {
        fingerprint(&format!("id-{i}"))
    }

    #[test]
    fn fingerprints_are_stable() {
        // Stored on disk: the hash must never change between releases.
        let f = fingerprint("lp-e-9178288208762825810");
        assert_eq!(f, fingerprint("lp-e-9178288208762825810"));
        let d = Sha256::digest(b"lp-e-9178288208762825810");
        assert_eq!(f.partition, u16::from_be_bytes([d[0], d[1]]));
        assert_ne!(f, fingerprint("lp-e-9178288208762825811"));
        assert_eq!(day(86_400_000 * 20_000 + 5), 20_000);
    }

    #[test]
    fn log_values_and_partitions_decode() {
        let e = vec![(fp(1), 20_000), (fp(2), 20_001)];
        assert_eq!(decode_log(&encode_log(&e)), Some(e));
        assert_eq!(decode_log(&[0; 13]), None);
        let mut v = 5u64.to_be_bytes().to_vec();
        v.extend_from_slice(&20_000u16.to_be_bytes());
        let p = decode_partition(7, &v).unwrap();
        assert_eq!(
            p,
            vec![(
                Fingerprint {
                    partition: 7,
                    hash: 5
                },
                20_000
            )]
        );
        assert_eq!(decode_partition(7, &v[..9]), None);
    }

    #[test]
    fn the_table_holds_ids_across_growth_reopen_and_pruning() {
        let tmp = tempfile::tempdir().unwrap();
        let path = path(tmp.path());
        let mut t = Table::open(&path).unwrap();
        assert_eq!(t.pages(), MIN_PAGES);
        // Enough ids to grow the table several times, in commit-sized batches.
        let n = 150_000u64;
        for (seq, start) in (0..n).step_by(2000).enumerate() {
            let batch: Vec<_> = (start..start + 2000)
                .map(|i| (fp(i), 20_000 + (i % 3) as u16))
                .collect();
            t.apply(seq as u64 + 1, batch).unwrap();
        }
        assert!(t.pages() > MIN_PAGES, "grew to {} pages", t.pages());
        assert_eq!(t.used, n);
        let every: Vec<_> = (0..n).map(fp).collect();
        assert!(
            t.contains(&every).unwrap().iter().all(|found| *found),
            "every id survived the growths"
        );
        let probe: Vec<_> = (n - 5..n + 5).map(fp).collect();
        let found = t.contains(&probe).unwrap();
        assert_eq!(found, [[true; 5], [false; 5]].concat());
        // An id already there is not stored twice, nor does its day change.
        t.apply(999, vec![(fp(0), 20_005)]).unwrap();
        assert_eq!(t.used, n);
        assert_eq!(t.checkpoint().unwrap(), 999);
        drop(t);
        let mut t = Table::open(&path).unwrap();
        assert_eq!((t.applied(), t.used), (999, n));
        assert_eq!(t.contains(&[fp(7), fp(n + 7)]).unwrap(), [true, false]);
        // Days before the window count as absent, then are cleared.
        t.min_day = 20_001;
        let days: Vec<bool> = t.contains(&[fp(3), fp(4), fp(5)]).unwrap();
        assert_eq!(days, [false, true, true], "id-3 was spooled on day 20000");
        let cleared = t.prune_pages(1, u64::MAX).unwrap();
        assert_eq!(cleared, n.div_ceil(3));
        assert_eq!(t.used, n - cleared);
    }

    #[test]
    fn a_replay_in_one_batch_fills_the_table_as_commits_do_and_grows_only_when_needed() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let mut by_commit = Table::open(&path(&a)).unwrap();
        let mut replayed = Table::open(&path(&b)).unwrap();
        let n = 150_000u64;
        let all: Vec<_> = (0..n).map(|i| (fp(i), 20_000)).collect();
        for (seq, batch) in all.chunks(2000).enumerate() {
            by_commit.apply(seq as u64 + 1, batch.to_vec()).unwrap();
        }
        // The whole log at once, as the open replays it.
        replayed.apply(75, all.clone()).unwrap();
        assert_eq!(
            (replayed.pages(), replayed.used, replayed.applied()),
            (by_commit.pages(), by_commit.used, by_commit.applied())
        );
        let every: Vec<_> = (0..n).map(fp).collect();
        assert!(replayed.contains(&every).unwrap().iter().all(|f| *f));
        // A replay of entries the table already holds (after a `kill -9`, the page writes
        // survive) grows nothing, though they are more than the room left below three quarters.
        let pages = replayed.pages();
        assert!((replayed.used + n) * 4 > pages * SLOTS as u64 * 3);
        replayed.apply(76, all).unwrap();
        assert_eq!((replayed.pages(), replayed.used), (pages, n));
    }

    #[test]
    fn entries_the_table_cannot_take_stay_pending_and_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let path = path(tmp.path());
        let mut t = Table::open(&path).unwrap();
        t.apply(1, vec![(fp(1), 20_000)]).unwrap();
        // Writes fail (a read-only handle stands in for a full or failing disk).
        t.file = File::open(&path).unwrap();
        assert!(t.apply(2, vec![(fp(2), 20_000)]).is_err());
        assert!(t.apply(3, vec![(fp(3), 20_000)]).is_err());
        assert_eq!(t.applied(), 1, "nothing past 1 is in the table");
        assert_eq!(
            t.contains(&[fp(1), fp(2), fp(3), fp(4)]).unwrap(),
            [true, true, true, false],
            "pending entries count as seen"
        );
        // The disk is back: the next commit's apply takes the pending ones too, in order.
        t.file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        t.apply(4, vec![(fp(4), 20_000)]).unwrap();
        assert_eq!(t.applied(), 4);
        assert_eq!(t.pending.len(), 0);
        assert_eq!(t.checkpoint().unwrap(), 4);
        drop(t);
        let mut t = Table::open(&path).unwrap();
        assert_eq!(
            t.contains(&[fp(1), fp(2), fp(3), fp(4)]).unwrap(),
            [true; 4]
        );
    }

    #[test]
    fn deferred_entries_are_found_before_they_are_written_and_a_checkpoint_puts_them_in() {
        let tmp = tempfile::tempdir().unwrap();
        let path = path(tmp.path());
        let mut t = Table::open(&path).unwrap();
        let in_file = |path: &Path, ids: &[Fingerprint]| {
            let mut copy = Table::open_existing(path).unwrap().unwrap();
            copy.min_day = 0;
            copy.contains(ids).unwrap()
        };
        t.defer(1, vec![(fp(1), 20_000), (fp(2), 20_000)]).unwrap();
        t.defer(2, vec![(fp(3), 20_000)]).unwrap();
        assert_eq!(t.applied(), 0, "held in memory");
        assert_eq!(in_file(&path, &[fp(1), fp(3)]), [false, false]);
        assert_eq!(
            t.contains(&[fp(1), fp(2), fp(3), fp(4)]).unwrap(),
            [true, true, true, false]
        );
        // Enough of them: all go into the file together, in log order.
        let many: Vec<_> = (10..10 + DEFER_ENTRIES as u64)
            .map(|i| (fp(i), 20_000))
            .collect();
        t.defer(3, many).unwrap();
        assert_eq!((t.applied(), t.used), (3, DEFER_ENTRIES as u64 + 3));
        assert_eq!(t.pending.len(), 0);
        assert_eq!(in_file(&path, &[fp(1), fp(3), fp(10)]), [true; 3]);
        // A checkpoint writes what is held and makes it durable.
        t.defer(4, vec![(fp(4), 20_000)]).unwrap();
        assert_eq!(t.checkpoint().unwrap(), 4);
        drop(t);
        let mut t = Table::open(&path).unwrap();
        assert_eq!(t.applied(), 4);
        assert_eq!(t.contains(&[fp(4), fp(5)]).unwrap(), [true, false]);
    }

    /// Every entry of the file's pages and every pending one passes the filter (once it is
    /// complete, it is trusted to rule ids out).
    fn assert_the_filter_covers_the_table(t: &Table) {
        assert_eq!(t.filling, None, "complete");
        let mut buf = [0u8; PAGE];
        let mut entries = 0;
        for page in 1..=t.pages {
            t.read_pages(page, &mut buf).unwrap();
            for s in 0..SLOTS {
                let (f, day) = slot_at(&buf, s);
                if day != 0 {
                    assert!(t.filter.may_contain(&f), "{f:?} of page {page}");
                    entries += 1;
                }
            }
        }
        for (f, _) in t.pending.entries() {
            assert!(t.filter.may_contain(&f), "pending {f:?}");
        }
        assert!(entries + t.pending.len() > 0);
    }

    #[test]
    fn the_filter_covers_the_table_through_growth_deferral_and_a_reopen_filled_a_slice_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let path = path(tmp.path());
        let mut t = Table::open(&path).unwrap();
        let n = 150_000u64;
        for (seq, start) in (0..n).step_by(5000).enumerate() {
            let batch: Vec<_> = (start..start + 5000).map(|i| (fp(i), 20_000)).collect();
            // Most into the file (growing it), the last held in memory.
            if start < 120_000 {
                t.apply(seq as u64 + 1, batch).unwrap();
            } else {
                t.defer(seq as u64 + 1, batch).unwrap();
            }
            assert_the_filter_covers_the_table(&t);
        }
        assert!(t.pages() > MIN_PAGES, "grew");
        assert_eq!(t.pending.len(), 30_000);
        let new: Vec<_> = (n..n + 8000).map(fp).collect();
        let ruled_out = new.iter().filter(|f| !t.filter.may_contain(f)).count();
        // (The tests' filter of 64 KiB has 3.5 bits per id here: about 30% pass wrongly.)
        assert!(
            ruled_out > 4000,
            "the filter rules out most new ids ({ruled_out})"
        );
        assert_eq!(t.checkpoint().unwrap(), (n / 5000));
        drop(t);

        // Reopened, the filter is filled from the pages, [`FILL_PAGES`] at each lookup, and
        // trusted only once all are in: every lookup before is answered from the file.
        let mut t = Table::open(&path).unwrap();
        assert_eq!(t.filling, Some(1));
        let slices = t.pages().div_ceil(FILL_PAGES);
        assert!(slices > 4, "{} pages", t.pages());
        let mut lookups = 0;
        while t.filling.is_some() {
            let probe: Vec<_> = (lookups * 997..lookups * 997 + 50)
                .chain(n + lookups * 50..n + lookups * 50 + 50)
                .map(fp)
                .collect();
            let found = t.contains(&probe).unwrap();
            assert_eq!(
                found,
                [[true; 50], [false; 50]].concat(),
                "lookup {lookups}"
            );
            lookups += 1;
        }
        assert_eq!(lookups, slices);
        assert_the_filter_covers_the_table(&t);
        assert_eq!(t.filter.added(), n);
        let every: Vec<_> = (0..n).map(fp).collect();
        assert!(t.contains(&every).unwrap().iter().all(|f| *f));
    }

    #[test]
    fn a_filter_full_of_pruned_entries_is_filled_anew() {
        let tmp = tempfile::tempdir().unwrap();
        let path = path(tmp.path());
        let mut t = Table::open(&path).unwrap();
        // More than the filter is meant for, on a day that leaves the window.
        let capacity = t.filter.capacity();
        let old = capacity + 1000;
        t.apply(1, (0..old).map(|i| (fp(i), 20_000)).collect())
            .unwrap();
        assert_eq!(t.filling, None);
        t.min_day = 20_001;
        assert_eq!(t.prune_pages(1, u64::MAX).unwrap(), old);
        // A commit's entries: the filter holds far more than twice the table, so a new one
        // is filled from the pages, with the pending entries in already.
        let live: Vec<_> = (old..old + 3000).map(|i| (fp(i), 20_001)).collect();
        t.defer(2, live.clone()).unwrap();
        assert_eq!(t.filling, Some(1));
        assert_eq!(t.filter.added(), 3000);
        let ids: Vec<_> = live.iter().map(|e| e.0).collect();
        assert!(t.contains(&ids).unwrap().iter().all(|f| *f));
        while t.filling.is_some() {
            t.contains(&[fp(0)]).unwrap();
        }
        assert_the_filter_covers_the_table(&t);
        let gone = (0..old).filter(|&i| t.filter.may_contain(&fp(i))).count() as u64;
        assert!(
            gone < old / 20,
            "{gone} pruned ids still pass the new filter"
        );
        assert_eq!(t.contains(&[fp(0), fp(old)]).unwrap(), [false, true]);
    }

    #[test]
    fn a_damaged_header_starts_an_empty_table() {
        let tmp = tempfile::tempdir().unwrap();
        let path = path(tmp.path());
        let mut t = Table::open(&path).unwrap();
        t.apply(1, vec![(fp(1), 20_000)]).unwrap();
        t.checkpoint().unwrap();
        drop(t);
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", 3).unwrap();
        let mut t = Table::open(&path).unwrap();
        assert_eq!((t.applied(), t.used), (0, 0));
        assert_eq!(t.contains(&[fp(1)]).unwrap(), [false]);
    }
}
