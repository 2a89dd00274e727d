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
//!   than the window counts as free. Lookups and inserts are one `pread` (and one `pwrite`)
//!   of a page the page cache usually holds: no memory of ours grows with the window. When the
//!   table is three quarters full, or a page has no free slot, it is rebuilt twice as large
//!   into a new file that replaces it by `rename`.
//! - **The sled `dedupe` tree is its log**: each commit adds one value, its new entries, under
//!   a sequence number, in the same transaction as its events; after sled's flush the entries
//!   are the table's. They are held in memory (and looked up there) until [`DEFER_ENTRIES`] of
//!   them have gathered, then go into the file together, each page read and written once for
//!   all its entries: put in commit by commit, every entry cost a `pread` and a `pwrite` of its
//!   own page, a quarter of the agent's CPU during an ingest. The table is not synced at every
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
/// doc): about 3.5 MB with their lookup set, and at a table of 4096 pages (a million ids) 16
/// entries per page read and written instead of one.
pub(super) const DEFER_ENTRIES: usize = 1 << 16;
/// A lookup reads at most this many pages with one `pread` (256 KiB)...
const LOOKUP_PAGES: u64 = 64;
/// ...reading past at most this many pages it does not need between two it does.
const LOOKUP_GAP: u64 = 1;

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
    /// it failed), in log order: looked up in `pending_set`, and put in together.
    pending: Vec<(Fingerprint, u16)>,
    /// The log sequence number of the last of them.
    pending_upto: u64,
    /// The fingerprints of the first `indexed` pending entries (all of them, but while
    /// [`Table::take`] puts them in).
    pending_set: FingerprintSet,
    indexed: usize,
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
            pending: Vec::new(),
            pending_upto: 0,
            pending_set: FingerprintSet::default(),
            indexed: 0,
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

    fn read_page(&self, page: u64, buf: &mut [u8; PAGE]) -> Result<(), Error> {
        table_file::read_page(&self.file, &self.path, page, buf)
    }

    fn write_page(&self, page: u64, buf: &[u8; PAGE]) -> Result<(), Error> {
        table_file::write_page(&self.file, &self.path, page, buf)
    }

    fn live(&self, day: u16) -> bool {
        day != 0 && day >= self.min_day
    }

    /// Which of `ids` the table (or the pending entries) holds within the window. The pages
    /// are read in file order, a run of neighbouring ones (gaps of at most [`LOOKUP_GAP`]
    /// pages) with one `pread` of up to [`LOOKUP_PAGES`]: a commit's thousands of ids fall on
    /// most pages of a table of a few million, and a `pread` per page cost more than the
    /// copy.
    pub(super) fn contains(&self, ids: &[Fingerprint]) -> Result<Vec<bool>, Error> {
        let mut out = vec![false; ids.len()];
        // The ids to look for in the file, by page.
        let mut wanted = Vec::with_capacity(ids.len());
        for (i, f) in ids.iter().enumerate() {
            if self.pending_set.contains(f) {
                out[i] = true;
            } else {
                wanted.push((self.page_of(f), i));
            }
        }
        wanted.sort_unstable();
        let mut buf = Vec::new();
        let mut rest = &wanted[..];
        while let Some(&(first, _)) = rest.first() {
            let mut last = first;
            let n = rest
                .iter()
                .take_while(|&&(page, _)| {
                    let near = page - last <= LOOKUP_GAP + 1 && page - first < LOOKUP_PAGES;
                    if near {
                        last = page;
                    }
                    near
                })
                .count();
            let (run, tail) = rest.split_at(n);
            buf.resize((last - first + 1) as usize * PAGE, 0);
            self.file
                .read_exact_at(&mut buf, first * PAGE as u64)
                .map_err(io_err(&self.path))?;
            for &(page, i) in run {
                let at = (page - first) as usize * PAGE;
                out[i] = self.holds(&buf[at..at + PAGE], ids[i]);
            }
            rest = tail;
        }
        Ok(out)
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
        self.pending_upto = self.pending_upto.max(seq);
        if self.pending.is_empty() {
            self.pending = entries;
        } else {
            self.pending.extend(entries);
        }
        if self.pending.len() < hold {
            self.index_pending();
            return Ok(());
        }
        self.apply_pending()
    }

    /// Puts every pending entry into the file in one pass (entries of one page in log order,
    /// as commit after commit would). Only once all are in does `applied` move past them; a
    /// failure keeps them all pending (those written already are found there again).
    fn apply_pending(&mut self) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let result = self.insert(&pending);
        self.pending = pending;
        if result.is_err() {
            self.index_pending();
            return result;
        }
        self.applied = self.applied.max(self.pending_upto);
        self.pending.clear();
        self.pending_set.clear();
        self.indexed = 0;
        Ok(())
    }

    fn index_pending(&mut self) {
        let new = &self.pending[self.indexed..];
        self.pending_set.extend(new.iter().map(|(f, _)| *f));
        self.indexed = self.pending.len();
    }

    /// Puts entries of an older format in and syncs them (before their old form is deleted).
    pub(super) fn insert_durably(&mut self, entries: &[(Fingerprint, u16)]) -> Result<(), Error> {
        self.insert(entries)?;
        self.file.sync_data().map_err(io_err(&self.path))?;
        self.write_header(&self.path.clone())
    }

    /// Puts entries into their pages, each page read once and written only if it changed
    /// (entries it already holds change nothing: a replay after a `kill -9` finds most of
    /// them there). Grows the table when it would be more than three quarters full or a page
    /// has no free slot.
    fn insert(&mut self, entries: &[(Fingerprint, u16)]) -> Result<(), Error> {
        let mut by_page: Vec<(u64, (Fingerprint, u16))> =
            entries.iter().map(|e| (self.page_of(&e.0), *e)).collect();
        // Stable: entries of one page go in in their log order.
        by_page.sort_by_key(|(page, _)| *page);
        let limit = self.pages * SLOTS as u64 * 3 / 4;
        let mut buf = [0u8; PAGE];
        let mut rest = &by_page[..];
        while let Some(&(page, _)) = rest.first() {
            let (group, tail) = rest.split_at(rest.iter().take_while(|(p, _)| *p == page).count());
            self.read_page(page, &mut buf)?;
            // The page's hashes, decoded once for the whole group: each entry is looked up
            // against them, and the full slot read only where a hash matches.
            let mut hashes = [0u64; SLOTS];
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = slot_at(&buf, i).0.hash;
            }
            // Slots below this one are live (the group only fills slots).
            let mut free_from = 0;
            let mut added = 0;
            let mut changed = false;
            let mut full = false;
            for &(_, (f, day)) in group {
                let held = hashes.iter().enumerate().any(|(i, &h)| {
                    h == f.hash && {
                        let (g, d) = slot_at(&buf, i);
                        g == f && self.live(d)
                    }
                });
                if held {
                    continue;
                }
                match (free_from..SLOTS).find(|&s| !self.live(slot_at(&buf, s).1)) {
                    Some(s) if slot_at(&buf, s).1 == 0 && self.used + added >= limit => {
                        // Three quarters full: grow before taking an empty slot.
                        full = true;
                        break;
                    }
                    Some(s) => {
                        if slot_at(&buf, s).1 == 0 {
                            added += 1;
                        }
                        set_slot(&mut buf, s, f, day);
                        hashes[s] = f.hash;
                        free_from = s + 1;
                        changed = true;
                    }
                    None => {
                        full = true;
                        break;
                    }
                }
            }
            if changed {
                self.write_page(page, &buf)?;
            }
            self.used += added;
            if full {
                // Grow (which rehashes everything, this page's entries included) and put the
                // rest of this batch in the new table.
                self.grow()?;
                let left: Vec<_> = rest.iter().map(|(_, e)| *e).collect();
                return self.insert(&left);
            }
            rest = tail;
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
            self.read_page(page, &mut buf)?;
            for s in 0..SLOTS {
                let (f, day) = slot_at(&buf, s);
                // (An entry not of this page can only be debris, say of a torn write.)
                if self.live(day) && self.page_of(&f) == page {
                    let i = ((new.page_of(&f) - page) / self.pages) as usize;
                    set_slot(&mut out[i], filled[i], f, day);
                    filled[i] += 1;
                }
            }
            for i in 0..split {
                if filled[i] > 0 {
                    new.write_page(page + i as u64 * self.pages, &out[i])?;
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
        new.pending_upto = self.pending_upto;
        new.pending_set = std::mem::take(&mut self.pending_set);
        new.indexed = self.indexed;
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
            pending: Vec::new(),
            pending_upto: 0,
            pending_set: FingerprintSet::default(),
            indexed: 0,
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
            self.read_page(page, &mut buf)?;
            let mut n = 0;
            for s in 0..SLOTS {
                let (_, d) = slot_at(&buf, s);
                if d != 0 && d < self.min_day {
                    buf[s * SLOT..(s + 1) * SLOT].fill(0);
                    n += 1;
                }
            }
            if n > 0 {
                self.write_page(page, &buf)?;
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
        assert!(t.pending.is_empty() && t.pending_set.is_empty());
        assert_eq!(t.checkpoint().unwrap(), 4);
        drop(t);
        let t = Table::open(&path).unwrap();
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
        assert!(t.pending.is_empty() && t.pending_set.is_empty());
        assert_eq!(in_file(&path, &[fp(1), fp(3), fp(10)]), [true; 3]);
        // A checkpoint writes what is held and makes it durable.
        t.defer(4, vec![(fp(4), 20_000)]).unwrap();
        assert_eq!(t.checkpoint().unwrap(), 4);
        drop(t);
        let t = Table::open(&path).unwrap();
        assert_eq!(t.applied(), 4);
        assert_eq!(t.contains(&[fp(4), fp(5)]).unwrap(), [true, false]);
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
        let t = Table::open(&path).unwrap();
        assert_eq!((t.applied(), t.used), (0, 0));
        assert_eq!(t.contains(&[fp(1)]).unwrap(), [false]);
    }
}
