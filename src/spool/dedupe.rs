//! The dedupe index: which `messageId`s were spooled within `spool.dedupe_window_days`.
//!
//! A key per `messageId` made the index, like the queue, cost sled's per-page memory for every
//! event of the window (see `packet.rs`). Instead, ids are hashed (SHA-256) into
//! [`PARTITIONS`] partitions by their first 16 bits; a partition's value is the sorted list of
//! its entries, each the next 64 bits of the hash and the day it was spooled:
//! `[hash u64 BE][day u16 BE]`, 10 bytes. The tree never holds more than [`PARTITIONS`] keys,
//! whatever the window's volume.
//!
//! Two ids are taken for the same when 80 bits of their SHA-256 agree: with 14 million ids in
//! the window, the chance that a new id is wrongly skipped is about 1 in 10^17.
//!
//! A commit reads each partition its events fall in once, under the spool's writer lock (the
//! only writer of this tree besides pruning, which takes the same lock), and writes the merged
//! partitions in its transaction. Pruning drops entries older than the window, day by day.

use sha2::{Digest, Sha256};

pub const PARTITIONS: usize = 1 << 16;
const ENTRY: usize = 10;

/// Where an id goes and what is stored for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub partition: u16,
    pub hash: u64,
}

pub fn fingerprint(message_id: &str) -> Fingerprint {
    let d = Sha256::digest(message_id.as_bytes());
    Fingerprint {
        partition: u16::from_be_bytes([d[0], d[1]]),
        hash: u64::from_be_bytes(d[2..10].try_into().expect("8 bytes")),
    }
}

/// Days since the Unix epoch (fits a u16 until 2149).
pub fn day(ms: u64) -> u16 {
    u16::try_from(ms / 86_400_000).unwrap_or(u16::MAX)
}

pub fn key(partition: u16) -> [u8; 2] {
    partition.to_be_bytes()
}

fn hash_at(value: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(value[i * ENTRY..i * ENTRY + 8].try_into().expect("8 bytes"))
}

fn day_at(value: &[u8], i: usize) -> u16 {
    u16::from_be_bytes(
        value[i * ENTRY + 8..i * ENTRY + 10]
            .try_into()
            .expect("2 bytes"),
    )
}

/// Whether a partition value is well formed.
pub fn is_valid(value: &[u8]) -> bool {
    value.len().is_multiple_of(ENTRY)
}

/// Whether the partition holds `hash`.
pub fn contains(value: &[u8], hash: u64) -> bool {
    let n = value.len() / ENTRY;
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        match hash_at(value, mid).cmp(&hash) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

/// The partition with `new` entries merged in (`new` need not be sorted; a hash already there
/// keeps its older day).
pub fn merge(value: &[u8], new: &mut [(u64, u16)]) -> Vec<u8> {
    new.sort_unstable();
    let n = value.len() / ENTRY;
    let mut out = Vec::with_capacity(value.len() + new.len() * ENTRY);
    let (mut i, mut j) = (0, 0);
    let mut last: Option<u64> = None;
    let mut push = |out: &mut Vec<u8>, hash: u64, day: u16| {
        if last != Some(hash) {
            out.extend_from_slice(&hash.to_be_bytes());
            out.extend_from_slice(&day.to_be_bytes());
            last = Some(hash);
        }
    };
    while i < n || j < new.len() {
        let take_old = j >= new.len() || (i < n && hash_at(value, i) <= new[j].0);
        if take_old {
            push(&mut out, hash_at(value, i), day_at(value, i));
            i += 1;
        } else {
            push(&mut out, new[j].0, new[j].1);
            j += 1;
        }
    }
    out
}

/// The partition without entries from before `min_day`; `None` when nothing would go.
pub fn prune(value: &[u8], min_day: u16) -> Option<Vec<u8>> {
    let n = value.len() / ENTRY;
    if (0..n).all(|i| day_at(value, i) >= min_day) {
        return None;
    }
    Some(
        value
            .chunks_exact(ENTRY)
            .filter(|e| u16::from_be_bytes([e[8], e[9]]) >= min_day)
            .flatten()
            .copied()
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_contains_prune() {
        let mut v = merge(&[], &mut [(5, 10), (1, 10), (9, 11)]);
        assert!(contains(&v, 1) && contains(&v, 5) && contains(&v, 9));
        assert!(!contains(&v, 2) && !contains(&v, 0) && !contains(&v, u64::MAX));
        v = merge(&v, &mut [(5, 12), (7, 12), (7, 12), (0, 12)]);
        assert_eq!(v.len(), 5 * ENTRY, "5 kept its first day, 7 once");
        assert!(contains(&v, 0) && contains(&v, 7));
        let pruned = prune(&v, 11).unwrap();
        assert!(!contains(&pruned, 1) && !contains(&pruned, 5) && contains(&pruned, 9));
        assert!(contains(&pruned, 7) && contains(&pruned, 0));
        assert_eq!(prune(&pruned, 11), None);
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
}
