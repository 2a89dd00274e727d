//! Packets: runs of consecutive events of one file, under the queue key of their first event.
//!
//! sled 0.34 keeps bookkeeping in memory for every page of every tree, and its pages hold at
//! most 16 keys: memory grows with the number of keys, not with the bytes stored. A key per
//! event made the agent's memory grow about 45 bytes per queued event. Packing events under one
//! key divides the keys (and that growth, and the per-key write cost) by the events per packet.
//! Version 2 kept packets in sled, so they were small (4 KiB, 64 events: a leaf of 16 stayed
//! under sled's blob threshold). Version 3 keeps them in segment files (see `segments.rs`) and
//! sled only their locations, so they are large: up to [`PACKET_BYTES`], [`PACKET_EVENTS`]
//! events; a backlog of 5 million events is about 15,000 keys.
//!
//! Event `i` of the packet under key `k` has the event key `k + i`: keys stay one per event, so
//! the drain's view (a FIFO of keyed events) is unchanged. Delivered events of a packet that is
//! not all delivered yet are marked in the `acked` tree (`k` -> a bitmap, bit `i` set); the
//! packet and its bitmap go when every event is marked.
//!
//! Layout (all integers big-endian):
//! - version 2: `[2u8][enqueued_ms u64][file_id u64][n u16][len u32; n][JSON; n]`;
//! - version 1 (one event per key, format version 1 spools): `[1u8][enqueued_ms u64][file_id
//!   u64][JSON]`, read as a packet of one.

/// Packets are filled up to this many bytes of event JSON (at least one event each).
pub(super) const PACKET_BYTES: usize = 256 << 10;
/// And hold at most this many events (the bitmap stays at 128 bytes; `n` fits its u16).
pub(super) const PACKET_EVENTS: usize = 1024;

const V1: u8 = 1;
const V2: u8 = 2;
const V1_HEADER: usize = 17;
const V2_HEADER: usize = 19;

/// The decoded header and event bounds of one packet (borrowing nothing: ranges into the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Packet {
    pub enqueued_ms: u64,
    pub file_id: u64,
    /// Byte ranges of each event's JSON in the value.
    pub events: Vec<std::ops::Range<usize>>,
}

impl Packet {
    pub(super) fn len(&self) -> usize {
        self.events.len()
    }
}

/// Splits `events` (JSON, each at most `u32::MAX` bytes) into packets.
pub(super) fn split<'a, T>(
    events: &'a [T],
    size: impl Fn(&T) -> usize + 'a,
) -> impl Iterator<Item = &'a [T]> + 'a {
    let mut rest = events;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len() && n < PACKET_EVENTS {
            let s = size(&rest[n]);
            if n > 0 && bytes + s > PACKET_BYTES {
                break;
            }
            bytes += s;
            n += 1;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    })
}

/// Bytes of a (version 2) packet's header with `n` events: what precedes their JSON.
pub(super) fn header_len(n: usize) -> usize {
    V2_HEADER + 4 * n
}

/// A (version 2) packet's header: what precedes its events' JSON, which follows as is (a
/// commit writes the events from where they are, see `segments::Packet`).
pub(super) fn header<'a>(
    enqueued_ms: u64,
    file_id: u64,
    events: impl ExactSizeIterator<Item = &'a [u8]>,
) -> Vec<u8> {
    let n = events.len();
    let mut v = Vec::with_capacity(header_len(n));
    v.push(V2);
    v.extend_from_slice(&enqueued_ms.to_be_bytes());
    v.extend_from_slice(&file_id.to_be_bytes());
    v.extend_from_slice(&(n as u16).to_be_bytes());
    for e in events {
        v.extend_from_slice(&(e.len() as u32).to_be_bytes());
    }
    v
}

/// Encodes one packet: its header, then its events' JSON.
#[cfg(test)]
pub(super) fn encode<'a>(
    enqueued_ms: u64,
    file_id: u64,
    events: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
) -> Vec<u8> {
    let mut v = header(enqueued_ms, file_id, events.clone());
    for e in events {
        v.extend_from_slice(e);
    }
    v
}

/// Decodes a packet; `None` when the value is damaged.
pub(super) fn decode(v: &[u8]) -> Option<Packet> {
    let u64_at = |at: usize| Some(u64::from_be_bytes(v.get(at..at + 8)?.try_into().ok()?));
    match *v.first()? {
        V1 if v.len() >= V1_HEADER => Some(Packet {
            enqueued_ms: u64_at(1)?,
            file_id: u64_at(9)?,
            events: std::iter::once(V1_HEADER..v.len()).collect(),
        }),
        V2 if v.len() >= V2_HEADER => {
            let n = u16::from_be_bytes(v[17..19].try_into().ok()?) as usize;
            let mut at = header_len(n);
            let mut events = Vec::with_capacity(n);
            for i in 0..n {
                let p = V2_HEADER + 4 * i;
                let len = u32::from_be_bytes(v.get(p..p + 4)?.try_into().ok()?) as usize;
                let end = at.checked_add(len)?;
                if end > v.len() {
                    return None;
                }
                events.push(at..end);
                at = end;
            }
            (n > 0 && at == v.len()).then_some(Packet {
                enqueued_ms: u64_at(1)?,
                file_id: u64_at(9)?,
                events,
            })
        }
        _ => None,
    }
}

/// A bitmap of `n` events, all clear.
pub(super) fn empty_bitmap(n: usize) -> Vec<u8> {
    vec![0; n.div_ceil(8)]
}

pub(super) fn is_set(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

pub(super) fn set(bitmap: &mut [u8], i: usize) {
    if let Some(b) = bitmap.get_mut(i / 8) {
        *b |= 1 << (i % 8);
    }
}

pub(super) fn count(bitmap: &[u8]) -> usize {
    bitmap.iter().map(|b| b.count_ones() as usize).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip() {
        let events: Vec<&[u8]> = vec![b"{\"a\":1}", b"", b"{}"];
        let v = encode(7, 9, events.iter().copied());
        let p = decode(&v).unwrap();
        assert_eq!((p.enqueued_ms, p.file_id, p.len()), (7, 9, 3));
        let back: Vec<&[u8]> = p.events.iter().map(|r| &v[r.clone()]).collect();
        assert_eq!(back, events);
    }

    #[test]
    fn version_1_values_are_packets_of_one() {
        let mut v = vec![1u8];
        v.extend_from_slice(&5u64.to_be_bytes());
        v.extend_from_slice(&6u64.to_be_bytes());
        v.extend_from_slice(b"{\"x\":2}");
        let p = decode(&v).unwrap();
        assert_eq!((p.enqueued_ms, p.file_id), (5, 6));
        assert_eq!(&v[p.events[0].clone()], b"{\"x\":2}");
    }

    #[test]
    fn damaged_values_do_not_decode() {
        let v = encode(1, 2, [b"abc".as_slice(), b"de"].into_iter());
        for cut in 0..v.len() {
            assert_eq!(decode(&v[..cut]), None, "cut at {cut}");
        }
        let mut longer = v.clone();
        longer.push(b'x');
        assert_eq!(decode(&longer), None);
        assert_eq!(decode(&[3, 0, 0]), None);
    }

    #[test]
    fn split_fills_packets_by_bytes_and_count() {
        const K: usize = PACKET_BYTES / 4;
        let sizes = [K, K, K, K, K, 5 * K, 10, 10];
        let packets: Vec<Vec<usize>> = split(&sizes, |s| *s).map(<[usize]>::to_vec).collect();
        assert_eq!(
            packets,
            vec![vec![K, K, K, K], vec![K], vec![5 * K], vec![10, 10]]
        );
        let small = vec![1usize; 3 * PACKET_EVENTS + 8];
        let lens: Vec<usize> = split(&small, |s| *s).map(<[usize]>::len).collect();
        assert_eq!(lens, vec![PACKET_EVENTS, PACKET_EVENTS, PACKET_EVENTS, 8]);
        assert_eq!(split(&[] as &[usize], |s| *s).count(), 0);
    }

    #[test]
    fn bitmaps() {
        let mut b = empty_bitmap(10);
        assert_eq!(b.len(), 2);
        set(&mut b, 0);
        set(&mut b, 9);
        assert!(is_set(&b, 0) && is_set(&b, 9) && !is_set(&b, 5));
        assert_eq!(count(&b), 2);
    }
}
