//! The parallel stage of ingest: one file's records parsed, mapped and serialized on several
//! threads, committed in file order by one (session exports and flat engagement records, plain
//! or gzipped; CSV export tables are read by `join.rs`, one record after the other).
//!
//! For one file, inside [`Ingestor::read_records`]:
//! - **the reader thread** owns the file's [`Reader`]: it reads (and gunzips) the file and
//!   frames complete records into batches of about [`BATCH_BYTES`] of raw bytes, numbered in
//!   file order ([`Reader::fill_batch`]: offsets and line numbers are the reader's), then a
//!   last piece saying how the stream ended (its length, or the stream error);
//! - **`watch.ingest_threads` workers** (default: one per core) each take the next batch and
//!   parse, map and serialize its records, handing back for each record what it gave (its
//!   events, a quarantine entry, skipped counts), whether it is an unfinished last line to hold,
//!   and the messages and A/B tests it names that the catalog does not know;
//! - **the committer** (the calling thread) takes the batches back in sequence order and goes
//!   through their records in file order as a single reader would: it stops at a held last
//!   line, or at a record that must wait for a catalog lookup (it asks the catalog, in order,
//!   about the records naming unknown ids), builds chunks of [`CHUNK_EVENTS`] events,
//!   [`CHUNK_BYTES`] of them or [`CHUNK_RECORDS`] records and commits each one before it
//!   builds the next.
//!
//! The crash story is the spool's, unchanged: one thread commits a file's chunks one after the
//! other in file order, so a chunk's offset is committed only after every chunk before it, and
//! a chunk never holds a record past one that was not taken. Whatever the workers parsed past
//! the point where a pass stops (a record waiting for the catalog, a held line, shutdown, a
//! failed commit, damage) is dropped and read again at the next pass, as if it had never been
//! read. Memory stays bounded: the reader takes a batch's bytes from a budget of
//! [`IN_FLIGHT_BATCHES`] batches per worker before it hands the batch on, and the committer
//! gives them back once it has taken the batch's records, so the batches read, being parsed or
//! waiting for their turn never hold more than that; a record longer than the whole budget
//! goes alone.

use std::collections::BTreeMap;
use std::fs::{File, Metadata};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, mpsc};

use tokio_util::sync::CancellationToken;

use super::{CHUNK_BYTES, CHUNK_EVENTS, CHUNK_RECORDS, Counted, Ingestor, Skipped, unknown_ids};
use crate::clock::now_ms;
use crate::input::{Filled, InputError, Item, Parser, RawBatch, Reader};
use crate::leanplum::Id;
use crate::mapping::{MappingState, Output};
use crate::spool::{self, Chunk, Committer, QuarantineEntry, SpoolEvent};
use crate::stats::Stats;

/// Raw bytes the reader frames into one batch (the batch ends with the record that reaches it):
/// large enough that handing batches around costs nothing beside parsing them, small enough
/// that the workers share the end of a file and memory stays small.
const BATCH_BYTES: usize = 512 << 10;
/// Batches in flight per worker (read, being parsed, or parsed and waiting for their turn):
/// enough that the workers parse a few chunks ahead while the committer waits for a commit's
/// fsyncs (a chunk of 8000 events is about 10 MB of session export, so they parse ahead
/// within it).
const IN_FLIGHT_BATCHES: usize = 8;

/// The file being read, as the workers and the committer see it.
pub(super) struct Pass<'a> {
    /// The path, as logs and quarantine entries name it.
    pub(super) shown: &'a str,
    pub(super) file: &'a File,
    pub(super) meta: &'a Metadata,
    pub(super) gzip: bool,
    pub(super) replay: bool,
    /// The catalog and options for the whole pass.
    pub(super) mapping: &'a MappingState,
}

/// How a pass over a file ended, once everything before that point is committed.
pub(super) enum End {
    /// Read to the end of its data: the file is done.
    Eof,
    /// At an unfinished last line that does not parse: held until the writer finishes it.
    Held,
    /// At a record that must wait for a catalog lookup.
    Waiting,
    /// At a stream error (damage): the records before it are committed, with a quarantine entry
    /// pointing at it.
    Damaged(InputError),
}

/// A pass that was not cut short by shutdown.
pub(super) struct Passed {
    /// Events spooled, duplicates and quarantined records.
    pub(super) totals: (u64, u64, u64),
    pub(super) end: End,
    /// The line of the last record taken.
    pub(super) line: u64,
}

/// What one record gave, as the committer takes it.
struct Taken {
    line: u64,
    end_offset: u64,
    /// The batch's events and quarantine entries up to and including this record's.
    events_end: usize,
    quarantine_end: usize,
    skipped: Skipped,
    /// An unfinished last line that does not parse, in a file that may still grow: held, not
    /// taken.
    held: bool,
    /// Messages and A/B tests it names that the catalog does not know: the committer asks the
    /// catalog, in file order, before it takes the record.
    unknown: Option<(Vec<Id>, Vec<Id>)>,
}

/// A batch parsed: its records, then their events and quarantine entries in file order.
struct Parsed {
    records: Vec<Taken>,
    events: Vec<SpoolEvent>,
    quarantine: Vec<QuarantineEntry>,
    /// The raw bytes the batch took from the [`Budget`].
    raw_bytes: usize,
}

/// What the committer receives, numbered in file order.
enum Piece {
    Batch(Parsed),
    /// The end of the stream: its length, or the error that ended it.
    End {
        offset: u64,
        error: Option<InputError>,
    },
    /// A reader or worker thread panicked (sent out of order): the pass stops and the panic goes
    /// on from the calling thread.
    Lost,
}

type Pieces = mpsc::Sender<(u64, Piece)>;

impl Ingestor {
    /// Reads the rest of `reader`'s file into the spool from `chunk` (its id, offset and line),
    /// parsing on `watch.ingest_threads` threads and committing in file order on this one (see
    /// the module doc). `None` when shutdown came first: the uncommitted rest is read again at
    /// the next start.
    pub(super) fn read_records(
        &self,
        reader: Reader,
        pass: &Pass,
        chunk: Chunk,
        cancel: &CancellationToken,
    ) -> Result<Option<Passed>, spool::Error> {
        let workers = self.ingest_threads.max(1);
        let budget = Budget::new(workers * IN_FLIGHT_BATCHES * BATCH_BYTES);
        let parser = reader.parser().clone();
        let (work_tx, work_rx) = mpsc::channel::<(u64, RawBatch)>();
        let work_rx = Mutex::new(work_rx);
        let (pieces_tx, pieces_rx) = mpsc::channel();
        let stopped = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (budget, parser, work_rx, stopped) = (&budget, &parser, &work_rx, &stopped);
            let mut threads = Vec::with_capacity(workers + 1);
            let pieces = pieces_tx.clone();
            threads.push(scope.spawn(move || frame_batches(reader, work_tx, pieces, budget)));
            for _ in 0..workers {
                let pieces = pieces_tx.clone();
                threads.push(scope.spawn(move || {
                    let _lost = OnPanic(&pieces);
                    loop {
                        let next = work_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((seq, batch)) = next else { return };
                        if stopped.load(Ordering::Relaxed) {
                            continue;
                        }
                        let parsed = self.parse_batch(pass, parser, batch);
                        if pieces.send((seq, Piece::Batch(parsed))).is_err() {
                            return;
                        }
                    }
                }));
            }
            drop(pieces_tx);
            // However the committer ends (a panic too), the threads stop at their next batch:
            // the reader is not given room for another, the workers skip what is left.
            let stop = Stop(budget, stopped);
            let result = self.spool.with_committer(|committer| {
                self.commit_in_order(pass, chunk, pieces_rx, budget, committer, cancel)
            });
            drop(stop);
            for thread in threads {
                if let Err(panic) = thread.join() {
                    std::panic::resume_unwind(panic);
                }
            }
            result
        })
    }

    /// Parses, maps and serializes one batch's records (a worker's part).
    fn parse_batch(&self, pass: &Pass, parser: &Parser, batch: RawBatch) -> Parsed {
        let raw_bytes = batch.byte_len();
        let mut records = Vec::with_capacity(batch.len());
        // Collects the batch's events and quarantine entries; its offsets are not used.
        let mut scratch = Chunk::default();
        let mut output = Output::default();
        for item in parser.items(&batch) {
            let mut taken = Taken {
                line: item.line,
                end_offset: item.end_offset,
                events_end: scratch.events.len(),
                quarantine_end: scratch.quarantine.len(),
                skipped: Skipped::new(),
                held: self.must_hold(&item, pass),
                unknown: None,
            };
            if taken.held {
                // Only a last line is unfinished.
                records.push(taken);
                break;
            }
            taken.unknown = self.unknown(&item, pass.mapping);
            self.add_item(pass.mapping, pass.shown, item, &mut scratch, &mut output);
            taken.events_end = scratch.events.len();
            taken.quarantine_end = scratch.quarantine.len();
            taken.skipped = std::mem::take(&mut output.skipped);
            records.push(taken);
        }
        Parsed {
            records,
            events: scratch.events,
            quarantine: scratch.quarantine,
            raw_bytes,
        }
    }

    /// A last line with no newline that does not parse while the file may still grow: the
    /// writer is most likely mid-line. It is kept out of the commit and looked at again later.
    fn must_hold(&self, item: &Item, pass: &Pass) -> bool {
        !item.complete
            && !pass.gzip
            && item.result.is_err()
            && !pass.replay
            && self.may_still_grow(pass.meta)
    }

    /// With the Leanplum API configured: the messages and A/B tests the record names that the
    /// mapping's catalog does not know, if any.
    fn unknown(&self, item: &Item, mapping: &MappingState) -> Option<(Vec<Id>, Vec<Id>)> {
        let (Some(_), Ok(record)) = (&self.catalog, &item.result) else {
            return None;
        };
        let (messages, abtests) = unknown_ids(record, mapping);
        (!messages.is_empty() || !abtests.is_empty()).then_some((messages, abtests))
    }

    /// The committer's part: takes the parsed batches in file order, record by record, into
    /// chunks, and commits each. Stops at the first record not taken (held, or waiting for the
    /// catalog), at the end of the stream, or at shutdown (`None`).
    fn commit_in_order(
        &self,
        pass: &Pass,
        mut chunk: Chunk,
        pieces: mpsc::Receiver<(u64, Piece)>,
        budget: &Budget,
        committer: &mut Committer<'_, Skipped>,
        cancel: &CancellationToken,
    ) -> Result<Option<Passed>, spool::Error> {
        // Its bad log logs this pass's bad records when it ends, however it ends.
        let mut counted = Counted::default();
        let mut skipped = Skipped::new();
        let mut records = 0usize;
        // Bytes of the chunk's events.
        let mut bytes = 0usize;
        // Batches parsed before their turn, by sequence number.
        let mut early = BTreeMap::new();
        let mut next = 0u64;
        let end = 'pass: loop {
            let piece = match early.remove(&next) {
                Some(piece) => piece,
                None => match pieces.recv() {
                    // Only a panic ends the threads before the end of the stream: the caller
                    // resumes it.
                    Ok((_, Piece::Lost)) | Err(_) => return Ok(None),
                    Ok((seq, piece)) if seq != next => {
                        early.insert(seq, piece);
                        continue;
                    }
                    Ok((_, piece)) => piece,
                },
            };
            next += 1;
            let parsed = match piece {
                Piece::Batch(parsed) => parsed,
                Piece::End {
                    offset,
                    error: None,
                } => {
                    chunk.offset = offset;
                    chunk.file_done = true;
                    break End::Eof;
                }
                Piece::End { error: Some(e), .. } => {
                    // Keep what was read before the damage, and a pointer to where it is.
                    chunk.quarantine.push(QuarantineEntry {
                        reason: e.to_string(),
                        file: pass.shown.to_owned(),
                        line: chunk.line + 1,
                        time_ms: now_ms(),
                        raw: String::new(),
                        ..QuarantineEntry::default()
                    });
                    break End::Damaged(e);
                }
                Piece::Lost => return Ok(None),
            };
            budget.give(parsed.raw_bytes);
            let mut events = parsed.events.into_iter();
            let mut quarantine = parsed.quarantine.into_iter();
            let (mut events_at, mut quarantine_at) = (0, 0);
            for record in parsed.records {
                if record.held {
                    break 'pass End::Held;
                }
                if let (Some(catalog), Some((messages, abtests))) = (&self.catalog, &record.unknown)
                    && catalog.must_wait(messages, abtests, pass.shown)
                {
                    // The offset stays before this record; what came before is committed.
                    break 'pass End::Waiting;
                }
                Stats::add(&self.stats.records_read, 1);
                chunk.offset = record.end_offset;
                chunk.line = record.line;
                let taken = chunk.events.len();
                chunk
                    .events
                    .extend(events.by_ref().take(record.events_end - events_at));
                bytes += chunk.events[taken..]
                    .iter()
                    .map(|e| e.json.len())
                    .sum::<usize>();
                chunk.quarantine.extend(
                    quarantine
                        .by_ref()
                        .take(record.quarantine_end - quarantine_at),
                );
                (events_at, quarantine_at) = (record.events_end, record.quarantine_end);
                for (key, n) in record.skipped {
                    *skipped.entry(key).or_insert(0) += n;
                }
                records += 1;
                if chunk.events.len() >= CHUNK_EVENTS
                    || bytes >= CHUNK_BYTES
                    || records >= CHUNK_RECORDS
                {
                    if cancel.is_cancelled() {
                        // The rest is read again at the next start.
                        return Ok(None);
                    }
                    self.seal(&mut chunk, pass.file, pass.gzip);
                    let next = Chunk {
                        file_id: chunk.file_id,
                        offset: chunk.offset,
                        line: chunk.line,
                        skip_dedupe: chunk.skip_dedupe,
                        ..Chunk::default()
                    };
                    let full = (
                        std::mem::replace(&mut chunk, next),
                        std::mem::take(&mut skipped),
                    );
                    let committed =
                        self.commit_pipelined(committer, [full], false, &mut counted, cancel)?;
                    if committed.is_none() {
                        return Ok(None);
                    }
                    (records, bytes) = (0, 0);
                }
            }
        };
        self.seal(&mut chunk, pass.file, pass.gzip);
        let line = chunk.line;
        let committed =
            self.commit_pipelined(committer, [(chunk, skipped)], true, &mut counted, cancel)?;
        if committed.is_none() {
            return Ok(None);
        }
        Ok(Some(Passed {
            totals: counted.totals,
            end,
            line,
        }))
    }
}

/// The reader thread: frames the file's records into numbered batches for the workers, then
/// tells the committer how the stream ended. Stops early when the committer has stopped (no
/// more room is given).
fn frame_batches(
    mut reader: Reader,
    work: mpsc::Sender<(u64, RawBatch)>,
    pieces: Pieces,
    budget: &Budget,
) {
    let _lost = OnPanic(&pieces);
    let mut seq = 0u64;
    loop {
        let mut batch = RawBatch::with_capacity(BATCH_BYTES + (BATCH_BYTES >> 3));
        let filled = reader.fill_batch(&mut batch, BATCH_BYTES);
        if !batch.is_empty() {
            if !budget.take(batch.byte_len()) || work.send((seq, batch)).is_err() {
                return;
            }
            seq += 1;
        }
        let error = match filled {
            Filled::Full => continue,
            Filled::End => None,
            Filled::Failed(e) => Some(e),
        };
        let end = Piece::End {
            offset: reader.offset(),
            error,
        };
        let _ = pieces.send((seq, end));
        return;
    }
}

/// Tells the committer when the thread holding it panics, so the pass stops instead of waiting
/// for a batch that will never come.
struct OnPanic<'a>(&'a Pieces);

impl Drop for OnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.send((u64::MAX, Piece::Lost));
        }
    }
}

/// Stops the reader and the workers when dropped: the committer is done.
struct Stop<'a>(&'a Budget, &'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.1.store(true, Ordering::Relaxed);
        self.0.close();
    }
}

/// The raw bytes of the batches in flight (framed, not yet taken by the committer), bounded.
struct Budget {
    limit: usize,
    /// Bytes taken, and whether the committer has stopped.
    state: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl Budget {
    fn new(limit: usize) -> Budget {
        Budget {
            limit,
            state: Mutex::new((0, false)),
            changed: Condvar::new(),
        }
    }

    /// Waits until `bytes` fit (or nothing else is in flight: a batch larger than the limit
    /// goes alone) and takes them. False once the committer has stopped.
    fn take(&self, bytes: usize) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !state.1 && state.0 > 0 && state.0 + bytes > self.limit {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.1 {
            return false;
        }
        state.0 += bytes;
        true
    }

    fn give(&self, bytes: usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= bytes;
        self.changed.notify_all();
    }

    /// The committer has stopped: no more room is given.
    fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::Budget;

    #[test]
    fn the_budget_bounds_bytes_in_flight_lets_a_big_batch_go_alone_and_closing_frees_a_waiter() {
        let budget = Budget::new(100);
        assert!(budget.take(60));
        assert!(budget.take(40));
        // Over the limit while something is in flight: waits until room is given back.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| budget.take(30));
            budget.give(60);
            assert!(waiter.join().unwrap());
        });
        budget.give(40);
        budget.give(30);
        // A batch larger than the whole budget goes when nothing else is in flight.
        assert!(budget.take(1000));
        // Closing wakes a waiter, which gets nothing; nothing is given after.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| budget.take(1));
            budget.close();
            assert!(!waiter.join().unwrap());
        });
        assert!(!budget.take(1));
    }
}
