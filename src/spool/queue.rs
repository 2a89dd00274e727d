//! The queue: events waiting for Segment, oldest first. Packets of consecutive events of one
//! file live in the segment files (`segments.rs`, the packet layout in `packet.rs`); the `queue`
//! tree maps each packet's first key to where it is, `acked` holds the events already gone from
//! a packet not yet wholly gone, and `meta/depth`, `meta/live_bytes` count what is queued.
//!
//! Appending happens inside the spool's commit (see `Spool::commit_file_chunk` and the
//! "Ordering" section of the spool's `//!`); reading ([`Queue::peek`]) goes only below the
//! [`Queue::watermark`], and removing ([`Queue::ack`], [`Queue::dead_letter`]) is one
//! transaction with the files' pending counts (see `ledger.rs`). Segments whose packets are all
//! gone are deleted once the acks that emptied them are durable.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sled::IVec;
use sled::transaction::{TransactionError, Transactional, TransactionalTree};

use super::ledger::{self, Progress};
use super::letters::{self, DeadLetter, QuarantineEntry};
use super::meta::{self, DEPTH, LIVE_BYTES, SEGMENT_END};
use super::store::Store;
use super::{Error, Spool, TxResult, Writer, decode_u64, packet, segments};
use crate::clock::now_ms;

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

/// The result of [`Queue::peek`].
#[derive(Debug, Default)]
pub struct Peeked {
    pub items: Vec<Queued>,
    /// Stopped at `max_events` or the byte budget: more events are waiting.
    pub full: bool,
}

/// Depth of the queue, kept by us (see the spool's `//!`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Depth {
    pub events: u64,
    pub bytes: u64,
}

/// The queue's own state beside the database.
pub(super) struct QueueState {
    /// `spool.dir/segments` (see `segments.rs`).
    pub segments_dir: PathBuf,
    /// Segments below this one are known to be deleted already.
    removed_below: AtomicU64,
    /// First queue key not yet committed.
    watermark: AtomicU64,
    /// The segments' committed end, set before the watermark moves past its packets.
    committed_end: Mutex<segments::End>,
    /// The drain's reader, kept across peeks (see [`Queue::peek`]).
    reader: Mutex<segments::Reader>,
}

impl QueueState {
    pub(super) fn new(segments_dir: PathBuf, next: u64, end: segments::End) -> QueueState {
        QueueState {
            segments_dir,
            removed_below: AtomicU64::new(0),
            watermark: AtomicU64::new(next),
            committed_end: Mutex::new(end),
            reader: Mutex::default(),
        }
    }

    /// The segments' committed end: it covers every packet below the watermark read before.
    fn committed_end(&self) -> segments::End {
        *self.committed_end.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A queued packet whose bytes cannot be read (see [`Queue::set_aside_damaged`]).
struct Damaged {
    first: u64,
    loc: segments::Location,
}

/// Queue entries to commit: a packet's first key and its location.
pub(super) type QueueEntries = Vec<(u64, segments::LocationBytes)>;

/// Packets appended to the segments, to be committed: the queue entries, the segments' new end,
/// and the key after the last event.
pub(super) struct Appended {
    entries: QueueEntries,
    end: segments::End,
    pub next: u64,
    /// The segment written, to sync before the transaction.
    to_sync: Option<segments::ToSync>,
}

impl Appended {
    /// Makes the appended bytes durable (`fdatasync` of their segment): before the transaction
    /// that names them.
    pub(super) fn sync(&self) -> Result<(), Error> {
        self.to_sync.as_ref().map_or(Ok(()), segments::ToSync::sync)
    }
}

/// Packs events of one file (`file_id`) into packets, each at most what `packet::split` allows.
pub(super) fn packets<'a>(
    now: u64,
    file_id: u64,
    events: &[&'a [u8]],
    out: &mut Vec<segments::Packet<'a>>,
) {
    for part in packet::split(events, |j| j.len()) {
        out.push(segments::Packet {
            head: packet::header(now, file_id, part.iter().copied()),
            body: part.to_vec(),
            file_id,
        });
    }
}

impl Writer {
    /// Appends packets to the segments, with keys from the next one on (past those of appends
    /// still being committed). The result is synced ([`Appended::sync`]), committed with
    /// [`insert`] in the caller's transaction, then made readable with [`committed`]; or, when
    /// that fails, forgotten with [`abandon`].
    pub(super) fn append(&mut self, packets: &[segments::Packet]) -> Result<Appended, Error> {
        let (locations, end, to_sync) = self.segments.append(packets)?;
        let mut key = self.next;
        let entries = locations
            .iter()
            .map(|l| {
                let k = key;
                key += u64::from(l.events);
                (k, l.encode())
            })
            .collect();
        self.next = key;
        Ok(Appended {
            entries,
            end,
            next: key,
            to_sync,
        })
    }
}

/// In the commit's transaction: the appended packets' queue entries, the segments' new end, and
/// the depth counters (`events` more events of `bytes` bytes).
pub(super) fn insert(
    queue: &TransactionalTree,
    meta: &TransactionalTree,
    appended: &Appended,
    events: u64,
    bytes: u64,
) -> TxResult<()> {
    for (k, v) in &appended.entries {
        queue.insert(&k.to_be_bytes(), v.as_slice())?;
    }
    meta.insert(SEGMENT_END, &appended.end.encode())?;
    meta::add(meta, LIVE_BYTES, bytes as i64)?;
    meta::add(meta, DEPTH, events as i64)?;
    Ok(())
}

/// After the commit's flush: its keys and segment bytes are the spool's; the drain may read up
/// to the new watermark. Commits are committed in the order of their appends.
pub(super) fn committed(state: &QueueState, w: &mut Writer, appended: Appended) {
    w.segments.committed(appended.end);
    *state
        .committed_end
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = appended.end;
    state.watermark.store(appended.next, Ordering::Release);
}

/// After a commit failed: its appends, and those of the commits after it, are forgotten; the
/// next append takes their keys and writes over their bytes.
pub(super) fn abandon(state: &QueueState, w: &mut Writer) {
    w.segments.abandon();
    w.next = state.watermark.load(Ordering::Acquire);
}

/// The queue of an open spool (see [`Spool::queue`]).
pub struct Queue<'a> {
    pub(super) spool: &'a Spool,
}

impl Queue<'_> {
    fn state(&self) -> &QueueState {
        &self.spool.queue_state
    }

    /// The first queue key not yet committed; keys below it are safe to read.
    pub(crate) fn watermark(&self) -> u64 {
        self.state().watermark.load(Ordering::Acquire)
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
        let state = self.state();
        let read = reader.read(&state.segments_dir, &loc, state.committed_end())?;
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
        let file = ledger::path_of(s, d.loc.file_id)?;
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
        let value = letters::encode(&entry);
        // The events' JSON is unknown: the packet's bytes less its header, shared out.
        let body =
            (d.loc.len as usize).saturating_sub(packet::header_len(d.loc.events.into())) as u64;
        let bytes = body * lost / u64::from(d.loc.events).max(1);
        (&s.queue, &s.acked, &s.meta, &s.quarantine)
            .transaction(|(queue, acked, meta, quarantine)| {
                queue.remove(&pkey)?;
                acked.remove(&pkey)?;
                quarantine.insert(&id.to_be_bytes(), value.as_slice())?;
                meta::add(meta, DEPTH, -(lost as i64))?;
                meta::add(meta, LIVE_BYTES, -(bytes as i64))?;
                Ok(())
            })
            .map_err(|e: TransactionError<String>| s.tx_err(e))?;
        self.spool.quarantine_changed();
        s.flush()
    }

    /// Deletes the segments whose packets are all gone: those below the segment of the first
    /// packet still queued. When nothing is queued, the one being written goes too, if `w` (the
    /// writer lock) is given: then no commit can be adding to it. Called after every ack
    /// (with the lock only if it is free) and at the maintenance tick (see
    /// [`Queue::remove_drained_segments`]).
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
        let state = self.state();
        if first_live > state.removed_below.load(Ordering::Relaxed) {
            // The acks that emptied these segments become durable first: after a power cut
            // that took them, the queue would point into deleted segments and take its
            // delivered packets for damage.
            s.flush()?;
            segments::remove_below(&state.segments_dir, first_live);
            state.removed_below.fetch_max(first_live, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Deletes the segments the drain has emptied, the one being written included when
    /// nothing is queued (the maintenance tick; acks do the same when the writer is free).
    pub(crate) fn remove_drained_segments(&self) -> Result<(), Error> {
        let mut w = self.spool.writer();
        self.delete_drained_segments(&self.spool.store(), Some(&mut w))
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
        let s = self.spool.store();
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
        // The drain's peeks go on where the last one stopped, mostly inside what it read
        // ahead: they share one reader (another peek at the same time gets its own).
        let mut shared = self.state().reader.try_lock().ok();
        let mut own = segments::Reader::default();
        let reader = shared.as_deref_mut().unwrap_or(&mut own);
        'packets: for item in s.queue.range(from.to_be_bytes()..end.to_be_bytes()) {
            let (k, v) = item.map_err(|e| s.sled_err(e))?;
            let (first, v, p) = match self.load_packet(&s, reader, &k, v)? {
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
        // Its buffer stays for the next peek; an open file would keep a deleted segment's space.
        reader.close();
        if out.items.len() >= max_events {
            out.full = true;
        }
        Ok(out)
    }

    /// Removes delivered events. Returns the ids of files whose events are now all delivered
    /// and which are fully read (candidates for `after_ingest`).
    pub fn ack(&self, items: &[Queued]) -> Result<Vec<u64>, Error> {
        self.remove(items, None)
    }

    /// Moves events Segment rejected for good from the queue to the dead letters.
    pub(crate) fn dead_letter(
        &self,
        items: &[Queued],
        reason: &str,
        status: Option<u16>,
    ) -> Result<Vec<u64>, Error> {
        self.remove(items, Some((reason, status)))
    }

    fn remove(
        &self,
        items: &[Queued],
        dead_reason: Option<(&str, Option<u16>)>,
    ) -> Result<Vec<u64>, Error> {
        let s = self.spool.store();
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
                        message_id: letters::message_id_of(&q.json),
                        event: String::from_utf8_lossy(&q.json).into_owned(),
                    };
                    Ok((s.new_id()?, letters::encode(&letter)))
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
                    if ledger::progress(files, *file_id, &Progress::EventsRemoved(*n))? {
                        done.push(*file_id);
                    }
                }
                meta::add(meta, LIVE_BYTES, -bytes)?;
                meta::add(meta, DEPTH, -removed)?;
                Ok(done)
            })
            .map_err(|e| s.tx_err(e))?;
        self.delete_drained_segments(&s, self.spool.writer.try_lock().ok().as_deref_mut())?;
        Ok(done)
    }

    /// Events and bytes queued (our own count; see the spool's `//!`).
    pub(crate) fn depth(&self) -> Result<Depth, Error> {
        let s = self.spool.store();
        Ok(Depth {
            events: meta::counter(&s, DEPTH)?,
            bytes: meta::counter(&s, LIVE_BYTES)?,
        })
    }

    /// When the oldest queued event was spooled (ms since the epoch).
    pub(crate) fn oldest_enqueued_ms(&self) -> Result<Option<u64>, Error> {
        let s = self.spool.store();
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
}
