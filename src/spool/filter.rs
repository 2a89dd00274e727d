//! A Bloom filter in front of the dedupe table (`dedupe.rs`): the fingerprints the table may
//! hold, in memory, so that a lookup of a new id (nearly every id of an export) reads no page.
//!
//! Without it, a commit's 8000 random ids fall on 8000 different pages of a table of a few
//! million entries: at 5 million ids the lookups copied about 32 MB of the table from the page
//! cache per commit, 13.5% of the agent's CPU during an ingest (BENCHMARKS.md, "At 5M
//! events"). With it, only the ids the filter cannot rule out (one in a hundred at the
//! filter's capacity, and every id that is really a duplicate) are looked up in the file.
//!
//! - **Blocked**: an id sets [`K`] bits within one 64-byte block (one cache line), chosen by
//!   its fingerprint's bits. The fingerprint is SHA-256 already, so nothing is hashed again
//!   (why not a crate: each would hash the key once more, and none is filled from the
//!   table's pages as below).
//! - **Bounded**: [`BYTES`], whatever the table's size: 10 bits per id for 3.3 million ids
//!   (about 1% pass it wrongly), 6.4 at 5 million (5%). Past that the filter rules out fewer
//!   ids (two thirds still at 14 million) and lookups fall back to the file more often, but
//!   memory does not grow with the window. (Sized to the table instead, it was overfull while
//!   the table waited to grow: a quarter of a million entries are held before they go in.)
//! - **Only ever a superset**: the table adds every entry it takes (pending or in the file) and
//!   every entry it finds when it fills the filter from its pages. A bit is never cleared, so
//!   entries pruned from the window stay until the table fills a new filter (see
//!   `Table::take`). A filter that wrongly said "absent" would let an id be spooled twice;
//!   one that says "maybe" costs only a page read.
//! - **Not stored**: a table opened from disk fills a new filter from its pages a slice at a
//!   time, at each lookup (see `Table::contains`), and uses it once every page is in, so a
//!   restart reads nothing more before it is ready.

use super::dedupe::Fingerprint;

/// The filter's size: 4 MiB (in tests 64 KiB, so that one can fill it).
pub(super) const BYTES: usize = if cfg!(test) { 64 << 10 } else { 4 << 20 };
/// Bits set per id.
const K: u32 = 6;
const BLOCK_WORDS: usize = 8;
const BLOCK_BITS: u64 = 512;
/// Bits per entry the filter is meant for (about 1% false positives).
const BITS_PER_ENTRY: u64 = 10;

pub(super) struct Filter {
    words: Vec<u64>,
    /// Blocks minus one (blocks are a power of two).
    mask: u64,
    /// Entries added, duplicates included.
    added: u64,
}

impl Filter {
    pub(super) fn new() -> Filter {
        Filter::with_bytes(BYTES)
    }

    /// An empty filter of `bytes` (rounded up to a power of two, at least a block).
    fn with_bytes(bytes: usize) -> Filter {
        let blocks = (bytes as u64 * 8 / BLOCK_BITS).max(1).next_power_of_two();
        Filter {
            words: vec![0; blocks as usize * BLOCK_WORDS],
            mask: blocks - 1,
            added: 0,
        }
    }

    /// The block of `f` (the partition's 16 bits, then the hash's top 8) and its [`K`] bits
    /// (9 bits of the hash each, from its low 54).
    fn bits(&self, f: &Fingerprint) -> [(usize, u64); K as usize] {
        let block = (u64::from(f.partition) | (f.hash >> 56) << 16) & self.mask;
        let base = block as usize * BLOCK_WORDS;
        let mut bits = [(0, 0); K as usize];
        for (i, b) in bits.iter_mut().enumerate() {
            let p = (f.hash >> (9 * i)) & 511;
            *b = (base + (p >> 6) as usize, 1u64 << (p & 63));
        }
        bits
    }

    pub(super) fn insert(&mut self, f: &Fingerprint) {
        for (word, bit) in self.bits(f) {
            self.words[word] |= bit;
        }
        self.added += 1;
    }

    /// False only when `f` was never added.
    pub(super) fn may_contain(&self, f: &Fingerprint) -> bool {
        self.bits(f)
            .iter()
            .all(|&(word, bit)| self.words[word] & bit != 0)
    }

    /// Forgets every entry.
    pub(super) fn clear(&mut self) {
        self.words.fill(0);
        self.added = 0;
    }

    /// Entries added since the filter was made or cleared.
    pub(super) fn added(&self) -> u64 {
        self.added
    }

    /// The entries it is meant for.
    pub(super) fn capacity(&self) -> u64 {
        self.words.len() as u64 * 64 / BITS_PER_ENTRY
    }

    pub(super) fn bytes(&self) -> usize {
        self.words.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::dedupe::fingerprint;

    #[test]
    fn added_ids_are_always_found_and_others_rarely() {
        // 10 bits for each of 100,000 ids.
        let mut f = Filter::with_bytes(128 << 10);
        let ids: Vec<_> = (0..100_000)
            .map(|i| fingerprint(&format!("in-{i}")))
            .collect();
        for id in &ids {
            f.insert(id);
        }
        assert!(ids.iter().all(|id| f.may_contain(id)), "no false negative");
        let wrong = (0..100_000)
            .filter(|i| f.may_contain(&fingerprint(&format!("out-{i}"))))
            .count();
        // About 1% at 10 bits each (a blocked filter does a little worse than the
        // textbook 0.8%).
        assert!(wrong < 2_500, "{wrong} false positives in 100,000");
        assert!(wrong > 0, "a filter of this size has some");
        assert_eq!((f.added(), f.capacity()), (100_000, 104_857));
        f.clear();
        assert_eq!(f.added(), 0);
        assert!(!ids.iter().any(|id| f.may_contain(id)), "cleared");
        assert_eq!(Filter::new().bytes(), BYTES);
    }
}
