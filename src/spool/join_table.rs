//! `spool.dir/join.tab`: the CSV export join's state (see `join.rs` for the keys) in a hash
//! table file, so a day's job of millions of sessions costs disk and the kernel's page cache,
//! not memory of ours, and nothing is written twice the way sled rewrites its nodes.
//!
//! # Layout
//!
//! A header page, then pages of [`PAGE`] bytes. A page starts with `[used u16][flags u16]`
//! (little-endian; `used` counts the bytes of records after those four, flag bit 0 says a
//! record of a group homed here or earlier went on to the next page), then records packed one
//! after another: `[key len u16][value len u16][day u16][key][value]`, `day` the day (since the
//! Unix epoch) the record was written.
//!
//! Every key belongs to a *group* (a prefix of it, see `join::group_len`): what waits for one
//! session, one event's parameters, a session itself. A record lives in its group's home page
//! (`1 + hash(group) % pages`) or, when that is full, in the first page after it with room,
//! each page passed getting the overflow flag. So a group is found by reading its home page
//! and the pages after it while their flag is set: usually one `pread`. The table is rebuilt
//! twice as large (into a temporary file, then `rename`) when its records fill 70% of it.
//!
//! # Durability
//!
//! The table is written only with what the spool's database has committed: every commit puts
//! its join writes into the sled `join_log` tree (one value per commit, under a sequence
//! number, in the commit's transaction), and after sled's flush they are applied here. The
//! table is not synced at every commit: a checkpoint fsyncs it and writes into its header the
//! last sequence number it holds; the log values up to it are then deleted. Opening the spool
//! applies the log values past it again. Applying is idempotent (a put or a removal of a key,
//! in commit order), so a table that took some of them before a crash ends the same. See the
//! spool's `//!`, "What a crash leaves".

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::{Error, io_err, table_file};

/// Bytes per page. Every lookup and write copies a page in or out of the kernel: that copying
/// is most of the join's cost, so pages are small (8 KiB ones took 25% more CPU on a 1 GB job),
/// yet large enough for a session's context.
pub(super) const PAGE: usize = 4096;
const PAGE_HEADER: usize = 4;
const RECORD_HEADER: usize = 6;
/// The longest record (key and value) a page can take.
pub(crate) const MAX_RECORD: usize = PAGE - PAGE_HEADER - RECORD_HEADER;
const OVERFLOW: u16 = 1;
const MAGIC: &[u8; 8] = b"LSAJOIN1";
const HEADER_LEN: usize = 8 + 8 * 4;
const MIN_PAGES: u64 = 64;
/// The first byte of the keys of `join_waiting` (see `join::JoinTree`).
const WAITING_TAG: u8 = super::join::JoinTree::Waiting as u8;

/// One write to the table (`value: None` removes the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Write {
    /// The key, its first byte the tree (see `join::JoinTree`).
    pub key: Vec<u8>,
    /// How many bytes of the key make its group.
    pub group: usize,
    pub value: Option<Vec<u8>>,
    pub day: u16,
}

/// A log value: a commit's writes, `[key len u16][group len u16][day u16][value len u32 or
/// u32::MAX for a removal][key][value]` each (big-endian).
pub(super) fn encode_log(writes: &[Write]) -> Vec<u8> {
    let mut v = Vec::new();
    for w in writes {
        v.extend_from_slice(&(w.key.len() as u16).to_be_bytes());
        v.extend_from_slice(&(w.group as u16).to_be_bytes());
        v.extend_from_slice(&w.day.to_be_bytes());
        let len = w.value.as_ref().map_or(u32::MAX, |v| v.len() as u32);
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&w.key);
        if let Some(val) = &w.value {
            v.extend_from_slice(val);
        }
    }
    v
}

pub(super) fn decode_log(mut v: &[u8]) -> Option<Vec<Write>> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let u16_at =
            |v: &[u8], i: usize| Some(u16::from_be_bytes(v.get(i..i + 2)?.try_into().ok()?));
        let klen = u16_at(v, 0)? as usize;
        let group = u16_at(v, 2)? as usize;
        let day = u16_at(v, 4)?;
        let vlen = u32::from_be_bytes(v.get(6..10)?.try_into().ok()?);
        let key = v.get(10..10 + klen)?.to_vec();
        v = &v[10 + klen..];
        let value = if vlen == u32::MAX {
            None
        } else {
            let val = v.get(..vlen as usize)?.to_vec();
            v = &v[vlen as usize..];
            Some(val)
        };
        out.push(Write {
            key,
            group,
            value,
            day,
        });
    }
    Some(out)
}

/// One record read from the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub day: u16,
}

fn hash(group: &[u8]) -> u64 {
    // FNV-1a, then a final mix: stable across releases (it is on disk) and cheap.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in group {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The records of a page: (offset of the record, key range, value range, day).
fn records(page: &[u8]) -> impl Iterator<Item = (usize, &[u8], &[u8], u16)> {
    let used = (u16_at(page, 0) as usize).min(PAGE - PAGE_HEADER);
    let mut at = PAGE_HEADER;
    std::iter::from_fn(move || {
        if at + RECORD_HEADER > PAGE_HEADER + used {
            return None;
        }
        let (klen, vlen, day) = (
            u16_at(page, at) as usize,
            u16_at(page, at + 2) as usize,
            u16_at(page, at + 4),
        );
        let start = at;
        let k = at + RECORD_HEADER;
        let end = k + klen + vlen;
        if end > PAGE_HEADER + used {
            return None;
        }
        at = end;
        Some((start, &page[k..k + klen], &page[k + klen..end], day))
    })
}

fn record_len(key: &[u8], value: &[u8]) -> usize {
    RECORD_HEADER + key.len() + value.len()
}

/// Removes the record at `start` from the page, moving the ones after it down.
fn cut(page: &mut [u8], start: usize) -> usize {
    let used = u16_at(page, 0) as usize;
    let len = RECORD_HEADER + u16_at(page, start) as usize + u16_at(page, start + 2) as usize;
    let end = PAGE_HEADER + used;
    page.copy_within(start + len..end, start);
    page[end - len..end].fill(0);
    page[..2].copy_from_slice(&((used - len) as u16).to_le_bytes());
    len
}

fn append(page: &mut [u8], key: &[u8], value: &[u8], day: u16) -> bool {
    let used = u16_at(page, 0) as usize;
    let len = record_len(key, value);
    if PAGE_HEADER + used + len > PAGE {
        return false;
    }
    let at = PAGE_HEADER + used;
    page[at..at + 2].copy_from_slice(&(key.len() as u16).to_le_bytes());
    page[at + 2..at + 4].copy_from_slice(&(value.len() as u16).to_le_bytes());
    page[at + 4..at + 6].copy_from_slice(&day.to_le_bytes());
    page[at + 6..at + 6 + key.len()].copy_from_slice(key);
    page[at + 6 + key.len()..at + len].copy_from_slice(value);
    page[..2].copy_from_slice(&((used + len) as u16).to_le_bytes());
    true
}

fn flags(page: &[u8]) -> u16 {
    u16_at(page, 2)
}

fn set_overflow(page: &mut [u8]) {
    let f = flags(page) | OVERFLOW;
    page[2..4].copy_from_slice(&f.to_le_bytes());
}

/// The table (see the module doc).
pub(super) struct Table {
    path: PathBuf,
    file: File,
    /// Data pages (the header page not counted).
    pages: u64,
    /// Bytes of records.
    used: u64,
    /// Records of the `join_waiting` tree.
    pub waiting: u64,
    /// The last log sequence number whose writes are all in the table.
    pub applied: u64,
    /// `applied` as the header on disk says.
    durable: u64,
    /// Bumped at every rebuild: page numbers of a scan in progress no longer hold.
    pub generation: u64,
    /// Committed log values not yet in the table (a write to it failed): applied before
    /// anything else reads or writes it.
    pending: Vec<(u64, Vec<Write>)>,
}

/// Reads of the table are random: no readahead. Besides wasting the page cache, readahead
/// fills it with large folios, and on ext4 with large folios (Linux 6.16 and later) every
/// small write into one walks all its blocks: that took 77% of the ingest's time (measured:
/// 8 KiB read-and-write cycles 5 times slower after one sequential read of the file).
fn no_readahead(file: &File) {
    // Only a hint: the table works the same without it.
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Random);
}

/// The table file under `spool.dir`.
pub(super) fn path(spool_dir: &Path) -> PathBuf {
    spool_dir.join("join.tab")
}

impl Table {
    /// Opens the table at `path`, or creates an empty one when it is missing. A damaged header
    /// is an error: the join's state cannot be rebuilt from anything else.
    pub(super) fn open(path: &Path) -> Result<Table, Error> {
        table_file::remove_unfinished(path);
        let file = match fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut t = Table::create_tmp(path, MIN_PAGES, 0)?;
                let tmp = std::mem::replace(&mut t.path, path.to_owned());
                t.write_header(&tmp)?;
                t.install(&tmp)?;
                return Ok(t);
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        no_readahead(&file);
        let corrupt = || Error::Corrupt {
            path: path.to_owned(),
            what: "join table header".into(),
        };
        let h = table_file::read_header(&file, HEADER_LEN).ok_or_else(corrupt)?;
        if &h[..8] != MAGIC {
            return Err(corrupt());
        }
        let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"));
        let (pages, applied, used, waiting) = (u64_at(8), u64_at(16), u64_at(24), u64_at(32));
        let len = file.metadata().map_err(io_err(path))?.len();
        if pages == 0 || len < (pages + 1) * PAGE as u64 {
            return Err(corrupt());
        }
        Ok(Table {
            path: path.to_owned(),
            file,
            pages,
            used,
            waiting,
            applied,
            durable: applied,
            generation: 0,
            pending: Vec::new(),
        })
    }

    fn create_tmp(path: &Path, pages: u64, applied: u64) -> Result<Table, Error> {
        let (tmp, file) = table_file::create_tmp(path, pages, PAGE)?;
        no_readahead(&file);
        Ok(Table {
            path: tmp,
            file,
            pages,
            used: 0,
            waiting: 0,
            applied,
            durable: applied,
            generation: 0,
            pending: Vec::new(),
        })
    }

    fn write_header(&self, path: &Path) -> Result<(), Error> {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(MAGIC);
        for v in [self.pages, self.applied, self.used, self.waiting] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        table_file::write_header(&self.file, path, &h)
    }

    fn install(&self, tmp: &Path) -> Result<(), Error> {
        table_file::install(tmp, &self.path)
    }

    fn home(&self, group: &[u8]) -> u64 {
        1 + hash(group) % self.pages
    }

    fn next_page(&self, page: u64) -> u64 {
        if page >= self.pages { 1 } else { page + 1 }
    }

    fn read_page(&self, page: u64, buf: &mut [u8]) -> Result<(), Error> {
        table_file::read_page(&self.file, &self.path, page, buf)
    }

    fn write_page(&self, page: u64, buf: &[u8]) -> Result<(), Error> {
        table_file::write_page(&self.file, &self.path, page, buf)
    }

    /// Calls `f` with each page of `group`'s chain (page number, bytes) until it returns true.
    fn walk(&self, group: &[u8], mut f: impl FnMut(u64, &[u8]) -> bool) -> Result<(), Error> {
        let mut page = self.home(group);
        let mut buf = vec![0u8; PAGE];
        for _ in 0..self.pages {
            self.read_page(page, &mut buf)?;
            if f(page, &buf) || flags(&buf) & OVERFLOW == 0 {
                break;
            }
            page = self.next_page(page);
        }
        Ok(())
    }

    /// The value at `key` (of group `key[..group]`).
    pub(super) fn get(&mut self, key: &[u8], group: usize) -> Result<Option<Vec<u8>>, Error> {
        self.apply_pending()?;
        let mut found = None;
        self.walk(&key[..group], |_, page| {
            found = records(page)
                .find(|(_, k, _, _)| *k == key)
                .map(|(_, _, v, _)| v.to_vec());
            found.is_some()
        })?;
        Ok(found)
    }

    /// Up to `limit` records of `group` whose key starts with `prefix`.
    pub(super) fn scan_group(
        &mut self,
        group: &[u8],
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Record>, Error> {
        self.apply_pending()?;
        let mut out = Vec::new();
        self.walk(group, |_, page| {
            for (_, k, v, day) in records(page) {
                if k.starts_with(prefix) && out.len() < limit {
                    out.push(Record {
                        key: k.to_vec(),
                        value: v.to_vec(),
                        day,
                    });
                }
            }
            out.len() >= limit
        })?;
        Ok(out)
    }

    /// Records whose key starts with `prefix`, reading the table in page order from `from`
    /// (1-based) until `limit` are found. Returns them and the page to go on from (`None`: the
    /// end was reached).
    pub(super) fn scan_all(
        &mut self,
        prefix: &[u8],
        from: u64,
        limit: usize,
    ) -> Result<(Vec<Record>, Option<u64>), Error> {
        self.apply_pending()?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; PAGE];
        for page in from.max(1)..=self.pages {
            self.read_page(page, &mut buf)?;
            for (_, k, v, day) in records(&buf) {
                if k.starts_with(prefix) {
                    out.push(Record {
                        key: k.to_vec(),
                        value: v.to_vec(),
                        day,
                    });
                }
            }
            if out.len() >= limit {
                return Ok((out, Some(page + 1)));
            }
        }
        Ok((out, None))
    }

    /// Takes the writes of the committed log value `seq`. A failure to write the table keeps
    /// them pending (applied before the next read) and is returned for the caller to log; the
    /// commit stands.
    pub(super) fn apply(&mut self, seq: u64, writes: Vec<Write>) -> Result<(), Error> {
        self.pending.push((seq, writes));
        self.apply_pending()
    }

    fn apply_pending(&mut self) -> Result<(), Error> {
        let (mut pending, mut applied) = (std::mem::take(&mut self.pending), self.applied);
        let result = table_file::apply_in_order(&mut pending, &mut applied, |w| self.write_all(w));
        (self.pending, self.applied) = (pending, applied);
        result
    }

    fn write_all(&mut self, writes: &[Write]) -> Result<(), Error> {
        let adding: u64 = writes
            .iter()
            .filter_map(|w| w.value.as_ref().map(|v| record_len(&w.key, v) as u64))
            .sum();
        if (self.used + adding) * 10 > self.pages * PAGE as u64 * 7 {
            self.grow(self.used + adding)?;
        }
        let mut chain = Vec::new();
        for w in writes {
            self.write_one(w, &mut chain)?;
        }
        Ok(())
    }

    /// Puts or removes one key: the old record (anywhere in the chain) goes, the new one goes
    /// into the first page of the chain with room. Reads each page of the chain once and
    /// writes those it changed (usually one read and one write).
    fn write_one(&mut self, w: &Write, chain: &mut Vec<(u64, Vec<u8>, bool)>) -> Result<(), Error> {
        let group = &w.key[..w.group.min(w.key.len())];
        let is_waiting = w.key.first() == Some(&WAITING_TAG);
        if let Some(value) = &w.value
            && record_len(&w.key, value) > PAGE - PAGE_HEADER
        {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                what: format!("join record of {} bytes", record_len(&w.key, value)),
            });
        }
        chain.clear();
        let mut page = self.home(group);
        let mut removed = false;
        for _ in 0..self.pages {
            let mut buf = vec![0u8; PAGE];
            self.read_page(page, &mut buf)?;
            let mut dirty = false;
            if !removed {
                let found = records(&buf)
                    .find(|(_, k, _, _)| *k == w.key.as_slice())
                    .map(|(start, _, _, _)| start);
                if let Some(start) = found {
                    // (Saturating: before a replay's recount the header's figure may be behind.)
                    self.used = self.used.saturating_sub(cut(&mut buf, start) as u64);
                    removed = true;
                    dirty = true;
                }
            }
            let more = flags(&buf) & OVERFLOW != 0;
            chain.push((page, buf, dirty));
            if !more {
                break;
            }
            page = self.next_page(page);
        }
        if is_waiting && removed {
            self.waiting = self.waiting.saturating_sub(1);
        }
        if let Some(value) = &w.value {
            let mut placed = false;
            for (_, buf, dirty) in chain.iter_mut() {
                if append(buf, &w.key, value, w.day) {
                    *dirty = true;
                    placed = true;
                    break;
                }
                if flags(buf) & OVERFLOW == 0 {
                    set_overflow(buf);
                    *dirty = true;
                }
            }
            // Past the chain's end: the next pages, until one has room.
            let mut page = chain.last().map_or(self.home(group), |c| c.0);
            let mut steps = 0;
            while !placed {
                steps += 1;
                if steps > self.pages {
                    return Err(Error::Corrupt {
                        path: self.path.clone(),
                        what: "join table full".into(),
                    });
                }
                page = self.next_page(page);
                let mut buf = vec![0u8; PAGE];
                self.read_page(page, &mut buf)?;
                if append(&mut buf, &w.key, value, w.day) {
                    placed = true;
                } else {
                    set_overflow(&mut buf);
                }
                chain.push((page, buf, true));
            }
            self.used += record_len(&w.key, value) as u64;
            if is_waiting {
                self.waiting += 1;
            }
        }
        for (page, buf, dirty) in chain.iter() {
            if *dirty {
                self.write_page(*page, buf)?;
            }
        }
        Ok(())
    }

    /// Rebuilds the table large enough for `need` bytes of records at half its capacity, and
    /// swaps it in; every record goes back by its key's group (see `join::group_len`).
    fn grow(&mut self, need: u64) -> Result<(), Error> {
        let mut pages = self.pages * 2;
        while need * 2 > pages * PAGE as u64 {
            pages *= 2;
        }
        let mut new = Table::create_tmp(&self.path, pages, self.applied)?;
        let mut buf = vec![0u8; PAGE];
        let mut chain = Vec::new();
        for page in 1..=self.pages {
            self.read_page(page, &mut buf)?;
            for (_, k, v, day) in records(&buf) {
                let w = Write {
                    key: k.to_vec(),
                    group: super::join::group_len(k),
                    value: Some(v.to_vec()),
                    day,
                };
                new.write_one(&w, &mut chain)?;
            }
        }
        let tmp = std::mem::replace(&mut new.path, self.path.clone());
        table_file::finish_rebuild(&new.file, &tmp, &new.path, || new.write_header(&tmp))?;
        new.durable = new.applied;
        new.generation = self.generation + 1;
        new.pending = std::mem::take(&mut self.pending);
        *self = new;
        Ok(())
    }

    /// Makes the table durable up to `applied` and returns it: the log values up to it can go.
    pub(super) fn checkpoint(&mut self) -> Result<u64, Error> {
        let header = || self.write_header(&self.path);
        self.durable =
            table_file::checkpoint(&self.file, &self.path, self.durable, self.applied, header)?;
        Ok(self.durable)
    }

    /// Counts the records of the waiting tree again (after a replay, whose writes may have
    /// met a table that had taken some of them already).
    pub(super) fn recount(&mut self) -> Result<(), Error> {
        let tag = [WAITING_TAG];
        let mut n = 0;
        let mut used = 0;
        let mut buf = vec![0u8; PAGE];
        for page in 1..=self.pages {
            self.read_page(page, &mut buf)?;
            for (_, k, v, _) in records(&buf) {
                used += record_len(k, v) as u64;
                if k.starts_with(&tag) {
                    n += 1;
                }
            }
        }
        self.waiting = n;
        self.used = used;
        Ok(())
    }

    #[cfg(test)]
    pub fn pages(&self) -> u64 {
        self.pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn put(key: &[u8], group: usize, value: &[u8]) -> Write {
        Write {
            key: key.to_vec(),
            group,
            value: Some(value.to_vec()),
            day: 20_000,
        }
    }

    /// A `join_waiting` key as the table holds it: an event of session `group` waiting.
    fn key(tree: u8, group: u32, i: u32) -> Vec<u8> {
        let mut k = vec![tree];
        k.extend(super::super::join::waiting_event_key(
            "job",
            &format!("s{group:04}"),
            i.into(),
        ));
        k
    }

    /// Its group's length.
    const G: usize = 1 + 1 + 5 + 7;

    #[test]
    fn log_values_decode() {
        let w = vec![
            put(b"\x01abc", 2, b"value"),
            Write {
                key: b"\x02x".to_vec(),
                group: 2,
                value: None,
                day: 7,
            },
        ];
        assert_eq!(decode_log(&encode_log(&w)), Some(w));
        assert_eq!(decode_log(&[0, 9, 0]), None);
    }

    #[test]
    fn records_survive_growth_overflow_removal_and_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let path = path(tmp.path());
        let mut t = Table::open(&path).unwrap();
        let start_pages = t.pages();
        // Groups of 40 records of ~200 bytes: a group is more than a page, so chains overflow.
        let value = vec![b'v'; 190];
        let mut seq = 0;
        for g in 0..200u32 {
            let writes = (0..40)
                .map(|i| put(&key(WAITING_TAG, g, i), G, &value))
                .collect();
            seq += 1;
            t.apply(seq, writes).unwrap();
        }
        assert!(t.pages() > start_pages, "grew to {} pages", t.pages());
        assert_eq!(t.waiting, 8000);
        let g7 = key(WAITING_TAG, 7, 0)[..G].to_vec();
        assert_eq!(super::super::join::group_len(&g7), G);
        assert_eq!(t.scan_group(&g7, &g7, 1000).unwrap().len(), 40);
        assert_eq!(
            t.get(&key(WAITING_TAG, 199, 39), G).unwrap(),
            Some(value.clone())
        );
        // A put of a present key replaces it; removals go.
        seq += 1;
        let mut writes = vec![put(&key(WAITING_TAG, 7, 3), G, b"new")];
        writes.extend((10..40).map(|i| Write {
            key: key(WAITING_TAG, 7, i),
            group: G,
            value: None,
            day: 0,
        }));
        t.apply(seq, writes).unwrap();
        assert_eq!(t.scan_group(&g7, &g7, 1000).unwrap().len(), 10);
        assert_eq!(
            t.get(&key(WAITING_TAG, 7, 3), G).unwrap(),
            Some(b"new".to_vec())
        );
        assert_eq!(t.get(&key(WAITING_TAG, 7, 30), G).unwrap(), None);
        assert_eq!(t.waiting, 7970);
        assert_eq!(t.checkpoint().unwrap(), seq);
        drop(t);
        let mut t = Table::open(&path).unwrap();
        assert_eq!((t.applied, t.waiting), (seq, 7970));
        // Applying the same log value again (a replay) changes nothing.
        let again = vec![put(&key(WAITING_TAG, 7, 3), G, b"new")];
        t.apply(seq, again).unwrap();
        t.recount().unwrap();
        assert_eq!(t.waiting, 7970);
        // A scan of the whole table, in steps, finds every record once.
        let mut found = 0;
        let mut from = 1;
        loop {
            let (r, next) = t.scan_all(&[WAITING_TAG], from, 500).unwrap();
            found += r.len();
            match next {
                Some(n) => from = n,
                None => break,
            }
        }
        assert_eq!(found, 7970);
    }

    #[test]
    fn a_damaged_header_is_an_error_not_an_empty_table() {
        let tmp = tempfile::tempdir().unwrap();
        let path = path(tmp.path());
        let mut t = Table::open(&path).unwrap();
        t.apply(1, vec![put(b"\x01k", 2, b"v")]).unwrap();
        t.checkpoint().unwrap();
        drop(t);
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", 3).unwrap();
        assert!(matches!(Table::open(&path), Err(Error::Corrupt { .. })));
    }
}
