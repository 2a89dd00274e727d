//! The commit of a file's chunk (transaction 1 of the module doc), in three steps:
//!
//! 1. **stage** (under the writer lock): find the chunk's duplicates, append its new events to
//!    the active segment (not synced), and take queue keys, a dedupe log number and ids;
//! 2. **make durable** (no lock of ours): `fdatasync` the segment, run the one sled
//!    transaction, flush sled and fsync its data file;
//! 3. **apply** (under the writer lock): the keys and bytes become readable by the drain, the
//!    dedupe entries the table's, the join writes `join.tab`'s.
//!
//! [`Spool::commit_file_chunk`] does the three one after the other. A [`Committer`] (the
//! parallel ingest's, one per pass over a file) overlaps them: chunk N+1 is staged while a
//! thread of its own makes chunk N durable, so the committing thread does not wait for the
//! three syncs of every chunk (they were half of its time, and the one thread that commits
//! bounded the whole ingest).
//!
//! # Why the overlap keeps the crash story
//!
//! - Step 2 runs for one chunk at a time, in file order, on one thread: transactions commit in
//!   the order of their appends, each after the `fdatasync` of the segment it names, as
//!   before. A chunk's offset and events are still one transaction.
//! - Staged bytes lie past the committed end, and staged keys past the watermark: the drain
//!   never reads them (see `queue.rs`), and a crash leaves them for the next open to cut off,
//!   as it did the bytes of a commit that had not finished.
//! - Chunk N+1's duplicates are looked up in the table and in chunk N's new entries, which
//!   go into the table only once chunk N is durable (the table never holds ids of events that
//!   were not committed, see `dedupe.rs`).
//! - When a chunk's step 2 fails, the chunk staged after it is abandoned with it: the pending
//!   end, keys and log number go back to the committed ones ([`Spool::abandon`]), the next
//!   append writes over their bytes, and the caller gets both chunks back to commit again
//!   (after waiting for disk space) or to read again.
//! - The committer holds the writer lock while a commit is under way, so nothing else appends,
//!   retires a segment or compacts in between; it lets waiting threads in between two chunks
//!   (after the one in flight is applied).

use sled::transaction::Transactional;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use super::dedupe::{self, FingerprintSet};
use super::join;
use super::ledger::{self, Progress};
use super::letters::{self, DeadLetter};
use super::meta::DEDUPE_NEXT;
use super::queue::{self, Appended};
use super::store::Store;
use super::{Chunk, ChunkOutcome, Error, Spool, Writer};
use crate::clock::now_ms;

/// A chunk staged: its segment bytes written (not synced), and everything its transaction
/// writes.
pub(super) struct Staged {
    appended: Appended,
    out: ChunkOutcome,
    /// Bytes of the events queued.
    bytes: u64,
    log_seq: u64,
    /// The new dedupe entries, and their log value.
    added: Vec<(dedupe::Fingerprint, u16)>,
    log_value: Vec<u8>,
    dead_letters: Vec<(u64, Vec<u8>)>,
    quarantine: Vec<(u64, Vec<u8>)>,
    join: Option<join::Prepared>,
    file_id: u64,
    offset: u64,
    line: u64,
    tail_hash: Option<String>,
    file_done: bool,
    now: u64,
}

impl Spool {
    /// Commits one chunk of a file in one transaction and flushes it (see the module doc).
    pub fn commit_file_chunk(&self, chunk: &Chunk) -> Result<ChunkOutcome, Error> {
        // The writer lock before the store lock, as everywhere (compaction takes both).
        let mut w = self.writer();
        let s = self.store();
        let (staged, _) = self.stage(&mut w, &s, chunk, None)?;
        if let Err(e) = self.make_durable(&s, &staged) {
            self.abandon(&mut w);
            return Err(e);
        }
        let out = staged.out;
        self.apply(&mut w, &s, staged);
        Ok(out)
    }

    /// Step 1: finds the chunk's duplicates (in the table, and in `before`: the new entries of
    /// a chunk staged and not yet applied), appends its new events, and takes the keys and
    /// numbers its transaction writes. Returns the staged chunk and its new fingerprints.
    fn stage(
        &self,
        w: &mut Writer,
        s: &Store,
        chunk: &Chunk,
        before: Option<&FingerprintSet>,
    ) -> Result<(Staged, FingerprintSet), Error> {
        let now = now_ms();
        let today = dedupe::day(now);
        let quarantine = chunk
            .quarantine
            .iter()
            .map(|q| Ok((s.new_id()?, letters::encode(q))))
            .collect::<Result<Vec<_>, Error>>()?;

        // Duplicates are found before the transaction: only this writer (holding `writer`)
        // changes the dedupe table.
        let fingerprints: Vec<dedupe::Fingerprint> =
            chunk.events.iter().map(|e| e.fingerprint).collect();
        let seen = if chunk.skip_dedupe {
            // Opened all the same: the entries go in after the commit.
            self.table(w, s)?;
            vec![false; fingerprints.len()]
        } else {
            let mut seen = self.table(w, s)?.contains(&fingerprints)?;
            if let Some(before) = before {
                for (seen, f) in seen.iter_mut().zip(&fingerprints) {
                    *seen = *seen || before.contains(f);
                }
            }
            seen
        };
        let mut in_chunk = dedupe::fingerprint_set(chunk.events.len());
        let mut added = Vec::with_capacity(chunk.events.len());

        // New events: refused ones (see `SpoolEvent::refused`) become dead letters, the rest go
        // into packets; both are remembered as seen.
        let mut out = ChunkOutcome::default();
        let mut dead_letters = Vec::new();
        let mut fresh: Vec<&[u8]> = Vec::with_capacity(chunk.events.len());
        for ((ev, f), seen) in chunk.events.iter().zip(&fingerprints).zip(seen) {
            if seen || !in_chunk.insert(*f) {
                out.duplicates += 1;
                continue;
            }
            added.push((*f, today));
            if let Some(reason) = &ev.refused {
                let letter = DeadLetter {
                    reason: reason.clone(),
                    status: None,
                    file_id: Some(chunk.file_id),
                    time_ms: now,
                    message_id: ev.message_id.clone(),
                    event: String::from_utf8_lossy(&ev.json).into_owned(),
                };
                dead_letters.push((s.new_id()?, letters::encode(&letter)));
                out.dead_lettered += 1;
            } else {
                fresh.push(&ev.json);
            }
        }
        let bytes: u64 = fresh.iter().map(|j| j.len() as u64).sum();
        out.spooled = fresh.len() as u64;
        out.quarantined = chunk.quarantine.len() as u64;
        // The join's writes, logged in the transaction and applied to its table after it.
        let join = self.prepare_join(s, &chunk.join, today)?;
        let mut packets = Vec::new();
        queue::packets(now, chunk.file_id, &fresh, &mut packets);
        let appended = w.append(&packets)?;
        let log_seq = w.log_seq;
        if !added.is_empty() {
            w.log_seq += 1;
        }
        let staged = Staged {
            appended,
            out,
            bytes,
            log_seq,
            log_value: dedupe::encode_log(&added),
            added,
            dead_letters,
            quarantine,
            join,
            file_id: chunk.file_id,
            offset: chunk.offset,
            line: chunk.line,
            tail_hash: chunk.tail_hash.clone(),
            file_done: chunk.file_done,
            now,
        };
        Ok((staged, in_chunk))
    }

    /// Step 2: the segment synced, then the transaction, flushed. Takes no lock of ours but
    /// the store's (read), so it runs beside the staging of the next chunk.
    fn make_durable(&self, s: &Store, st: &Staged) -> Result<(), Error> {
        st.appended.sync()?;
        (
            &s.queue,
            &s.files,
            &s.dedupe,
            &s.meta,
            &s.quarantine,
            &s.dead,
            &s.join_log,
        )
            .transaction(|(queue, files, dedupe, meta, quarantine, dead, join_log)| {
                queue::insert(queue, meta, &st.appended, st.out.spooled, st.bytes)?;
                if !st.log_value.is_empty() {
                    dedupe.insert(&st.log_seq.to_be_bytes(), st.log_value.as_slice())?;
                    // What the table may hold at most (see `install_table`).
                    meta.insert(DEDUPE_NEXT, &(st.log_seq + 1).to_be_bytes())?;
                }
                for (id, v) in &st.dead_letters {
                    dead.insert(&id.to_be_bytes(), v.as_slice())?;
                }
                for (id, q) in &st.quarantine {
                    quarantine.insert(&id.to_be_bytes(), q.as_slice())?;
                }
                ledger::progress(
                    files,
                    st.file_id,
                    &Progress::Chunk {
                        offset: st.offset,
                        line: st.line,
                        tail_hash: st.tail_hash.as_deref(),
                        spooled: st.out.spooled,
                        file_done: st.file_done,
                        now: st.now,
                    },
                )?;
                if let Some(j) = &st.join {
                    j.log(join_log, meta)?;
                }
                Ok(())
            })
            .map_err(|e| s.tx_err(e))?;
        if !st.quarantine.is_empty() {
            self.quarantine_changed();
        }
        s.flush()
    }

    /// Step 3, once the chunk is durable: its keys and bytes are the drain's, its dedupe
    /// entries the table's (held in memory, written many commits at a time), its join writes
    /// `join.tab`'s.
    fn apply(&self, w: &mut Writer, s: &Store, st: Staged) {
        queue::committed(&self.queue_state, w, st.appended);
        if let Some(j) = st.join {
            self.join_committed(s, j);
        }
        if st.added.is_empty() {
            return;
        }
        w.log_committed = st.log_seq + 1;
        w.unsynced += st.added.len() as u64;
        let table = w.dedupe.as_mut().expect("opened for the lookup");
        if let Err(e) = table.defer(st.log_seq, st.added) {
            // The commit stands: the entries stay in memory and in the log.
            tracing::warn!(error = %e, "cannot write the dedupe table; its new entries are kept in memory and retried");
        }
        if w.unsynced >= dedupe::CHECKPOINT_ENTRIES
            && let Err(e) = self.checkpoint_dedupe_with(w, s)
        {
            tracing::warn!(error = %e, "dedupe checkpoint failed; retried later");
        }
    }

    /// After a failed step 2: the staged chunks not committed are forgotten (their bytes are
    /// written over, their keys and log number taken again).
    fn abandon(&self, w: &mut Writer) {
        queue::abandon(&self.queue_state, w);
        w.log_seq = w.log_committed;
    }

    /// What a committer reports when its commit thread is gone (it panicked: the panic goes on
    /// from [`Spool::with_committer`] once `f` returns; a panic of our own here, maybe while
    /// unwinding, would abort).
    fn commit_thread_stopped(&self) -> Error {
        Error::Io {
            path: self.dir.clone(),
            source: std::io::Error::other("the spool's commit thread stopped"),
        }
    }

    /// Runs `f` with a [`Committer`] for a file's chunks; its durable step runs on a thread of
    /// its own (`spool-commit`) for as long as `f` does.
    pub fn with_committer<T, R>(&self, f: impl FnOnce(&mut Committer<'_, T>) -> R) -> R {
        std::thread::scope(|scope| {
            let (jobs, jobs_rx) = mpsc::sync_channel::<Staged>(1);
            let (results_tx, results) = mpsc::channel();
            std::thread::Builder::new()
                .name("spool-commit".into())
                .spawn_scoped(scope, move || {
                    for staged in jobs_rx {
                        let result = self.make_durable(&self.store(), &staged);
                        if results_tx.send((staged, result)).is_err() {
                            return;
                        }
                    }
                })
                .expect("cannot start the spool's commit thread");
            let mut committer = Committer {
                spool: self,
                writer: None,
                in_flight: None,
                jobs,
                results,
            };
            f(&mut committer)
            // Dropping the committer settles the chunk in flight and ends the thread.
        })
    }
}

/// A chunk being made durable, kept until it is (for a retry), with its new fingerprints.
struct InFlight<T> {
    chunk: Chunk,
    tag: T,
    fresh: FingerprintSet,
    /// Bytes of its events queued.
    bytes: u64,
}

/// A chunk committed, with the caller's tag and what the commit did.
#[derive(Debug)]
pub struct Done<T> {
    pub chunk: Chunk,
    pub tag: T,
    pub outcome: ChunkOutcome,
}

/// A commit failed: the chunks committed before it, and those not committed (in file order,
/// the failed one first), to commit again or read again.
#[derive(Debug)]
pub struct Failed<T> {
    pub error: Error,
    pub done: Vec<Done<T>>,
    pub undone: Vec<(Chunk, T)>,
}

/// Commits a file's chunks in order, each one's syncs and transaction overlapping the staging
/// of the next (see the module doc). From [`Spool::with_committer`]. Each chunk carries a tag
/// of the caller's, handed back with it.
pub struct Committer<'s, T> {
    spool: &'s Spool,
    /// Held while a commit is under way.
    writer: Option<MutexGuard<'s, Writer>>,
    in_flight: Option<InFlight<T>>,
    jobs: mpsc::SyncSender<Staged>,
    results: mpsc::Receiver<(Staged, Result<(), Error>)>,
}

impl<T> Committer<'_, T> {
    /// Stages `chunk` and hands it to the commit thread, once the chunk before it is durable.
    /// Returns the chunks committed meanwhile (the one before, or none). A chunk with join
    /// writes is committed alone: the next one's join reads what it wrote.
    pub fn submit(&mut self, chunk: Chunk, tag: T) -> Result<Vec<Done<T>>, Failed<T>> {
        let mut done = Vec::new();
        if self.spool.writer_waiting.load(Ordering::SeqCst) > 0 {
            match self.finish() {
                Ok(d) => done = d,
                Err(mut failed) => {
                    // Not staged: handed back after the chunk that failed.
                    failed.undone.push((chunk, tag));
                    return Err(failed);
                }
            }
            self.let_waiters_in();
        }
        let spool = self.spool;
        let w = self.writer.get_or_insert_with(|| spool.writer_for_chunks());
        let staged = {
            let s = spool.store();
            let before = self.in_flight.as_ref().map(|f| &f.fresh);
            spool.stage(w, &s, &chunk, before)
        };
        match (self.settle(), staged) {
            (Ok(before), Ok((staged, fresh))) => {
                done.extend(before);
                let alone = !chunk.join.is_empty();
                let bytes = staged.bytes;
                if self.jobs.send(staged).is_err() {
                    self.abandon();
                    return Err(Failed {
                        error: self.spool.commit_thread_stopped(),
                        done,
                        undone: vec![(chunk, tag)],
                    });
                }
                self.in_flight = Some(InFlight {
                    chunk,
                    tag,
                    fresh,
                    bytes,
                });
                if alone {
                    match self.finish() {
                        Ok(d) => done.extend(d),
                        Err(mut failed) => {
                            done.append(&mut failed.done);
                            failed.done = done;
                            return Err(failed);
                        }
                    }
                }
                Ok(done)
            }
            (Ok(before), Err(error)) => {
                done.extend(before);
                self.abandon();
                Err(Failed {
                    error,
                    done,
                    undone: vec![(chunk, tag)],
                })
            }
            (Err(mut failed), _) => {
                // Staged past a chunk that failed: abandoned with it.
                self.abandon();
                failed.undone.push((chunk, tag));
                done.append(&mut failed.done);
                failed.done = done;
                Err(failed)
            }
        }
    }

    /// Bytes of events the chunk in flight queues (the spool's depth may count them already).
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight.as_ref().map_or(0, |f| f.bytes)
    }

    /// Waits for the chunk in flight and lets go of the writer lock. Returns it committed.
    pub fn finish(&mut self) -> Result<Vec<Done<T>>, Failed<T>> {
        let settled = self.settle();
        if settled.is_err() {
            self.abandon();
        }
        self.writer = None;
        settled.map(|d| d.into_iter().collect())
    }

    /// Waits for the chunk in flight: applied when it is durable; when it failed, abandoned
    /// (with anything staged after it) by the caller.
    fn settle(&mut self) -> Result<Option<Done<T>>, Failed<T>> {
        let Some(f) = self.in_flight.take() else {
            return Ok(None);
        };
        let Ok((staged, result)) = self.results.recv() else {
            return Err(Failed {
                error: self.spool.commit_thread_stopped(),
                done: Vec::new(),
                undone: vec![(f.chunk, f.tag)],
            });
        };
        match result {
            Ok(()) => {
                let outcome = staged.out;
                let w = self
                    .writer
                    .as_mut()
                    .expect("held while a commit is under way");
                self.spool.apply(w, &self.spool.store(), staged);
                Ok(Some(Done {
                    chunk: f.chunk,
                    tag: f.tag,
                    outcome,
                }))
            }
            Err(error) => Err(Failed {
                error,
                done: Vec::new(),
                undone: vec![(f.chunk, f.tag)],
            }),
        }
    }

    /// After a failure: forgets what was staged and lets go of the writer lock (nothing is in
    /// flight any more; the caller may wait a while before it commits again).
    fn abandon(&mut self) {
        if let Some(mut w) = self.writer.take() {
            self.spool.abandon(&mut w);
        }
    }

    /// With the writer lock let go: gives the threads waiting for it their turn before the
    /// next chunk takes it again (std's mutex is not fair; a waiter counts itself out once it
    /// holds the lock). Gives up after a while: a waiter that keeps the lock long is simply
    /// waited for at the next lock.
    fn let_waiters_in(&self) {
        for _ in 0..1000 {
            if self.spool.writer_waiting.load(Ordering::SeqCst) == 0 {
                return;
            }
            std::thread::yield_now();
        }
    }
}

impl<T> Drop for Committer<'_, T> {
    /// Settles the chunk in flight (a durable one must be applied: its bytes and keys are the
    /// spool's), however the caller stopped.
    fn drop(&mut self) {
        if let Err(f) = self.finish() {
            tracing::debug!(error = %f.error, "a commit in flight failed as its pass stopped; read again later");
        }
    }
}
