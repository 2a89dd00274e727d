//! One file through input and mapping into the spool, chunk by chunk, and `dry-run`, which is
//! the same path with stdout in place of the spool.
//!
//! A file is identified by its path plus the hash of its first bytes (see [`FileRecord`]): the
//! same path with the same head is the same file, read on from its committed offset; a
//! different head, or a plain file now shorter than its offset, is a new file read from the
//! start. Each chunk (its events, its bad lines, and the offset after them) is one spool commit,
//! so a crash re-reads at most the chunks that were being built.
//!
//! Session exports and flat engagement records are parsed, mapped and serialized on
//! `watch.ingest_threads` threads and committed in file order on one (`parallel.rs`, whose doc
//! says how that keeps the crash story); CSV export tables (`join.rs`) and `dry-run` read one
//! record after the other.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

mod join;
mod parallel;

use crate::clock::{self, now_ms};
use crate::event::{MAX_EVENT_BYTES, TrackEvent};
use crate::input::{BadRecord, InputError, Item, Reader, Record};
use crate::leanplum::catalog::Catalog;
use crate::mapping::{
    self, MapError, MappingOptions, MappingState, Output, SharedMapping, map_engagement,
    map_session,
};
use crate::spool::{
    self, Chunk, Committer, Done, Failed, FileRecord, FileStatus, QuarantineEntry, Spool,
    SpoolEvent, Transition, fingerprint,
};
use crate::stats::Stats;
use fingerprint::Relation;
use parallel::{End, Pass, Passed};

/// Events per spool commit: large enough to amortize the flush, small enough that a crash
/// re-reads little (about 10 MB of session export) and memory stays flat. Each commit waits
/// for three syncs (the segment, sled's log, its file: 6 to 10 ms here), on the one thread
/// that commits: at 2000 events a commit that was 3.5 s of the 1153 MB benchmark export,
/// more than the whole ingest may take at the 350 MB/s of issue 13.
const CHUNK_EVENTS: usize = 8000;
/// Records per commit when records yield few events (app-event-only sessions).
const CHUNK_RECORDS: usize = 80_000;
/// Bytes of event JSON per commit when events are large (a commit's packets all go into one
/// segment file, so this is also how far a segment may run past its size).
const CHUNK_BYTES: usize = 8 << 20;
/// At most this much of a bad line is kept in the quarantine.
const QUARANTINE_RAW_BYTES: usize = 4096;

/// Maps one parsed record into `out`.
pub(crate) fn map_record(
    record: &Record,
    catalog: &Catalog,
    opts: &MappingOptions,
    out: &mut Output,
) -> Result<(), MapError> {
    match record {
        Record::Session(s) => map_session(s, catalog, opts, out),
        Record::Engagement(e) => map_engagement(e, catalog, opts, out),
    }
}

/// The messages and A/B tests `record` names (in events that would be sent) that the
/// mapping's catalog does not know.
fn unknown_ids(
    record: &Record,
    mapping: &MappingState,
) -> (Vec<crate::leanplum::Id>, Vec<crate::leanplum::Id>) {
    match record {
        Record::Session(s) => (
            crate::mapping::session_unknown_messages(s, &mapping.catalog),
            crate::mapping::session_unknown_abtests(s, &mapping.catalog, &mapping.opts),
        ),
        Record::Engagement(e) => (
            crate::mapping::engagement_unknown_message(e, &mapping.catalog)
                .into_iter()
                .collect(),
            Vec::new(),
        ),
    }
}

/// Starts a replay of `abs` (`replay PATH`, SPEC section 2): a file record of its own, with
/// nothing in common with the watched files (see [`FileRecord::replay`]), read from the start
/// by [`Ingestor::replay`]. Returns its id.
pub(crate) fn begin_replay(spool: &Spool, abs: &Path) -> Result<u64, spool::Error> {
    let now = now_ms();
    let len = std::fs::metadata(abs).map_or(0, |m| m.len());
    spool.ledger().begin(
        abs,
        &FileRecord {
            path: abs.to_string_lossy().into_owned(),
            raw_len: len,
            status: FileStatus::Reading,
            first_seen_ms: now,
            updated_ms: now,
            replay: true,
            ..FileRecord::default()
        },
    )
}

/// A mapped event as the spool stores it: its JSON, keyed for dedupe by its `messageId`. An
/// event over Segment's size limit is refused here (Segment would reject it): the spool keeps
/// it as a dead letter, with this reason, instead of queueing it. Every event into the spool
/// comes through here (files, the CSV join, parked records, quarantine retries).
pub(crate) fn spool_event(ev: TrackEvent) -> SpoolEvent {
    let json = ev.to_json();
    let refused = (json.len() > MAX_EVENT_BYTES).then(|| {
        format!(
            "event is {} bytes, over Segment's {} byte limit",
            json.len(),
            MAX_EVENT_BYTES
        )
    });
    SpoolEvent::new(ev.message_id, json, refused)
}

/// What happened to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Read to its end (or to where it stands now); counts are for this pass.
    Read {
        events: u64,
        duplicates: u64,
        quarantined: u64,
    },
    /// Nothing new since the last pass.
    Unchanged,
    /// Not a regular file any more, or gone.
    Gone,
    /// Could not be read; the reason was logged once and the file marked failed.
    Failed(String),
    /// Shutdown came first; the uncommitted rest is read at the next start.
    Cancelled,
    /// Read up to an unfinished last line, which is held: offer the file again later.
    Held,
    /// Read up to a record naming a message the catalog is looking up: offer the file again
    /// once the catalog's generation moves past the one given (or after a while).
    WaitingOnCatalog(u64),
}

pub(crate) struct Ingestor {
    pub spool: Arc<Spool>,
    /// Catalog and options; a reload swaps them, taking effect at the next file.
    pub mapping: SharedMapping,
    pub stats: Arc<Stats>,
    pub watch_dir: PathBuf,
    /// `spool.max_bytes`: reading pauses above it.
    pub max_spool_bytes: u64,
    /// `watch.max_line_bytes`: a longer line is quarantined with its size.
    pub max_line_bytes: usize,
    /// Told after every commit so the drain need not poll.
    pub drain_wake: Arc<tokio::sync::Notify>,
    /// How long after its last change a file's unfinished, unparsable last line is held
    /// before it is taken as final (and quarantined).
    pub partial_line_hold: Duration,
    /// Files held on an unfinished line, so that is logged once, not at every look.
    pub holding: Arc<std::sync::Mutex<HashSet<PathBuf>>>,
    /// Bumped at every commit and every wait: the watchdog's proof that reading is alive.
    pub heartbeat_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Where files whose events are all delivered are announced (for `after_ingest`).
    pub files_delivered: Option<tokio::sync::mpsc::UnboundedSender<u64>>,
    /// With the Leanplum API configured: asked before mapping a record that names an unknown
    /// message, which then waits for its lookup.
    pub catalog: Option<Arc<crate::catalog::CatalogService>>,
    /// Threads that parse, map and serialize a file's records (`watch.ingest_threads`, at
    /// least 1; see `parallel.rs`).
    pub ingest_threads: usize,
}

impl Ingestor {
    /// Reads `rel` (relative to the watch dir) from where it was left, into the spool.
    pub(crate) fn ingest(
        &self,
        rel: &Path,
        cancel: &CancellationToken,
    ) -> Result<Outcome, spool::Error> {
        self.ingest_path(rel, cancel, None)
    }

    /// Reads the replayed file `abs` (record `file_id`, from [`begin_replay`]) from
    /// where it was left, skipping the dedupe check: an operator's explicit backfill or re-send.
    /// Events keep their deterministic `messageId`s, so Segment still dedupes them.
    pub(crate) fn replay(
        &self,
        abs: &Path,
        file_id: u64,
        cancel: &CancellationToken,
    ) -> Result<Outcome, spool::Error> {
        self.ingest_path(abs, cancel, Some(file_id))
    }

    fn ingest_path(
        &self,
        rel: &Path,
        cancel: &CancellationToken,
        replay: Option<u64>,
    ) -> Result<Outcome, spool::Error> {
        // `rel` is absolute for a replay, and `join` keeps it so.
        let abs = self.watch_dir.join(rel);
        let shown = rel.display().to_string();
        let meta = match std::fs::symlink_metadata(&abs) {
            Ok(m) if m.is_file() => m,
            _ => {
                // Gone before it was read to the end (say, deleted while its last line was
                // held): it is no longer in progress.
                if let Some((id, rec)) = self.spool.ledger().file_by_path(rel)?
                    && rec.status == FileStatus::Reading
                    && Path::new(&rec.path) == rel
                {
                    tracing::warn!(path = %shown, "file vanished before it was read to the end");
                    self.spool.ledger().transition(
                        id,
                        Transition::Failed("vanished before it was read to the end".into()),
                    )?;
                }
                return Ok(Outcome::Gone);
            }
        };
        let file = match File::open(&abs) {
            Ok(f) => f,
            Err(e) => {
                // A record (with no content known) so status counts the file as failed, and a
                // permission fix (a ctime change) gets it read.
                let id = match self.spool.ledger().file_by_path(rel)? {
                    Some((_, rec)) if rec.status == FileStatus::Failed => {
                        return Ok(Outcome::Failed(rec.error.unwrap_or_default()));
                    }
                    Some((id, _)) => id,
                    None => self.begin(rel, &[], false, 0)?,
                };
                return Ok(self.unreadable(rel, Some(id), &format!("cannot open: {e}")));
            }
        };
        let len = meta.len();
        let head = match fingerprint::head(&file, len) {
            Ok(h) => h,
            Err(e) => return Ok(self.unreadable(rel, None, &format!("cannot read: {e}"))),
        };
        let gzip = crate::input::is_gzip(&head);

        let known = match replay {
            Some(id) => match self.spool.ledger().file(id)? {
                Some(rec) => (id, rec, Relation::Grown),
                None => return Ok(Outcome::Gone),
            },
            None => match self.identify(rel, &file, len, &head)? {
                Some(known) => known,
                None => (
                    self.begin(rel, &head, gzip, len)?,
                    FileRecord::default(),
                    Relation::Grown,
                ),
            },
        };
        let (id, rec, relation) = known;
        if relation == Relation::Same
            && (rec.status == FileStatus::Read
                || rec.status == FileStatus::Done
                || rec.status == FileStatus::Failed && rec.updated_ms > clock::mtime_ms(&meta))
        {
            return Ok(Outcome::Unchanged);
        }
        // Content past what was read: Read or Done goes back to Reading.
        self.spool.ledger().transition(id, Transition::ReadAgain)?;
        if replay.is_none()
            && !gzip
            && rec.head_len < fingerprint::IDENTITY_HEAD_BYTES
            && (head.len() as u64) > rec.head_len
        {
            // A small file grew: its identity now covers more of it.
            self.spool
                .ledger()
                .update_head(id, head.len() as u64, &fingerprint::hash(&head))?;
        }
        let (file_id, offset, line) = (id, rec.offset, rec.line);

        if crate::input::leanplum_csv::table_file(rel).is_some() {
            return self.ingest_table(
                rel, &file, &meta, &head, gzip, len, file_id, offset, line, cancel,
            );
        }
        let (mut file_id, mut offset, mut line) = (file_id, offset, line);
        let opened = match Reader::open(&abs, offset, self.max_line_bytes) {
            Err(InputError::BadOffset { .. }) if offset > 0 && replay.is_none() => {
                // The edges still match but the committed offset no longer falls on a line
                // boundary: the file was rewritten. Read it as a new file.
                tracing::warn!(path = %shown, offset, "file rewritten; reading it as a new file");
                file_id = self.begin(rel, &head, gzip, len)?;
                (offset, line) = (0, 0);
                Reader::open(&abs, 0, self.max_line_bytes)
            }
            other => other,
        };
        let reader = match opened {
            Ok(r) => r,
            Err(InputError::Empty) => {
                let chunk = Chunk {
                    file_id,
                    file_done: true,
                    ..Chunk::default()
                };
                self.commit(&chunk, cancel)?;
                tracing::info!(path = %shown, "empty file skipped");
                return Ok(Outcome::Read {
                    events: 0,
                    duplicates: 0,
                    quarantined: 0,
                });
            }
            Err(e) => return Ok(self.unreadable(rel, Some(file_id), &e.to_string())),
        };
        if offset == 0 {
            tracing::info!(path = %shown, format = %reader.format(), gzip = reader.is_gzip(), replay = replay.is_some(), "reading file");
            self.spool
                .ledger()
                .set_format(file_id, &reader.format().to_string())?;
        } else {
            tracing::debug!(path = %shown, offset, "reading on from the committed offset");
        }

        let chunk = Chunk {
            file_id,
            offset,
            line,
            skip_dedupe: replay.is_some(),
            ..Chunk::default()
        };
        // The generation first: a catalog published after this read is sure to move it.
        let generation = self.catalog.as_ref().map(|c| c.generation());
        let mapping = mapping::current(&self.mapping);
        let pass = Pass {
            shown: &shown,
            file: &file,
            meta: &meta,
            gzip,
            replay: replay.is_some(),
            mapping: &mapping,
        };
        // Parsed on several threads, committed in order on this one (see `parallel.rs`).
        let Some(Passed { totals, end, line }) = self.read_records(reader, &pass, chunk, cancel)?
        else {
            return Ok(Outcome::Cancelled);
        };

        let held = match end {
            End::Damaged(e) => {
                let reason = e.to_string();
                tracing::warn!(path = %shown, line = line + 1, error = %reason, "file damaged; records before the damage were kept");
                self.spool
                    .ledger()
                    .transition(file_id, Transition::Failed(reason.clone()))?;
                return Ok(Outcome::Failed(reason));
            }
            End::Waiting => {
                tracing::debug!(path = %shown, line = line + 1, "reading waits for a catalog lookup");
                return Ok(Outcome::WaitingOnCatalog(generation.unwrap_or(0)));
            }
            End::Held => true,
            End::Eof => false,
        };
        let mut holding = self.holding.lock().unwrap_or_else(|e| e.into_inner());
        if held {
            if holding.insert(rel.to_path_buf()) {
                tracing::info!(path = %shown, line = line + 1, "last line unfinished; holding it until it is complete");
            }
            return Ok(Outcome::Held);
        }
        holding.remove(rel);
        drop(holding);
        tracing::info!(
            path = %shown,
            events = totals.0,
            duplicates = totals.1,
            quarantined = totals.2,
            "file ingested"
        );
        Ok(Outcome::Read {
            events: totals.0,
            duplicates: totals.1,
            quarantined: totals.2,
        })
    }

    /// Finds the file `rel` holds among the files read before: first the record at its path,
    /// then any record with the same content (a rename or a re-synced copy), which `rel` is
    /// then linked to. `None`: new content.
    fn identify(
        &self,
        rel: &Path,
        file: &File,
        len: u64,
        head: &[u8],
    ) -> Result<Option<(u64, FileRecord, Relation)>, spool::Error> {
        let shown = rel.display();
        let io = |e: std::io::Error| spool::Error::Io {
            path: self.watch_dir.join(rel),
            source: e,
        };
        if let Some((id, rec)) = self.spool.ledger().file_by_path(rel)? {
            match fingerprint::relate(file, len, &rec).map_err(io)? {
                Relation::Different(why) => {
                    tracing::warn!(path = %shown, reason = why, "file content changed; reading it as a new file");
                }
                relation => return Ok(Some((id, rec, relation))),
            }
        }
        if len == 0 {
            // Every empty file looks alike; an empty file is simply new.
            return Ok(None);
        }
        // Several known files can share these first bytes (a file, and a copy of it that grew
        // since): the one read furthest into this content is the match, so nothing already
        // read is read again.
        let mut best: Option<(u64, FileRecord, Relation)> = None;
        for (id, rec) in self
            .spool
            .ledger()
            .files_with_head(&fingerprint::hash(head))?
        {
            if !join::may_be_same_file(rel, &rec.path) {
                continue;
            }
            let relation = fingerprint::relate(file, len, &rec).map_err(io)?;
            if relation != Relation::Same && relation != Relation::Grown {
                continue;
            }
            if best.as_ref().is_none_or(|(_, b, _)| rec.offset > b.offset) {
                best = Some((id, rec, relation));
            }
        }
        if let Some((id, rec, relation)) = best {
            let original = self.watch_dir.join(&rec.path);
            let copied = Path::new(&rec.path) != rel
                && std::fs::symlink_metadata(&original).is_ok_and(|m| m.is_file());
            if !copied {
                tracing::info!(path = %shown, was = %rec.path, "same content as a file already read (renamed); not read again");
                self.spool.ledger().link_path(rel, id)?;
                return Ok(Some((id, rec, relation)));
            }
            // A copy (a re-sync under another name) gets a record of its own, starting where
            // the original stands: the two may grow, move or vanish apart from each other.
            tracing::info!(path = %shown, same_as = %rec.path, "same content as a file already read (a copy); not read again");
            let delivered =
                rec.pending == 0 && matches!(rec.status, FileStatus::Read | FileStatus::Done);
            let (copy_id, copy) = self.spool.ledger().begin_copy(rel, &rec)?;
            if delivered && let Some(tx) = &self.files_delivered {
                // Everything in it already reached Segment: after_ingest applies now.
                let _ = tx.send(copy_id);
            }
            return Ok(Some((copy_id, copy, relation)));
        }
        Ok(None)
    }

    fn begin(&self, rel: &Path, head: &[u8], gzip: bool, len: u64) -> Result<u64, spool::Error> {
        let now = now_ms();
        self.spool.ledger().begin(
            rel,
            &FileRecord {
                path: rel.to_string_lossy().into_owned(),
                head_len: head.len() as u64,
                head_hash: fingerprint::hash(head),
                raw_len: len,
                gzip,
                status: FileStatus::Reading,
                first_seen_ms: now,
                updated_ms: now,
                ..FileRecord::default()
            },
        )
    }

    /// Logs a file that cannot be read at all, once, and records why.
    fn unreadable(&self, rel: &Path, file_id: Option<u64>, reason: &str) -> Outcome {
        let shown = rel.display().to_string();
        tracing::warn!(path = %shown, error = %reason, "file cannot be read");
        let entry = QuarantineEntry {
            reason: reason.to_owned(),
            file: shown,
            line: 0,
            time_ms: now_ms(),
            raw: String::new(),
            ..QuarantineEntry::default()
        };
        let result = match file_id {
            Some(id) => {
                let chunk = Chunk {
                    file_id: id,
                    quarantine: vec![entry],
                    ..Chunk::default()
                };
                self.spool.commit_file_chunk(&chunk).and_then(|_| {
                    self.spool
                        .ledger()
                        .transition(id, Transition::Failed(reason.to_owned()))
                })
            }
            None => self.spool.letters().quarantine(&entry),
        };
        match result {
            Ok(()) => Stats::add(&self.stats.quarantined, 1),
            Err(e) => tracing::error!(error = %e, "cannot record the failure in the spool"),
        }
        Outcome::Failed(reason.to_owned())
    }

    /// Adds one record (or its failure) to the chunk being built.
    fn add_item(
        &self,
        mapping: &MappingState,
        shown: &str,
        item: Item,
        chunk: &mut Chunk,
        output: &mut Output,
    ) {
        chunk.offset = item.end_offset;
        chunk.line = item.line;
        let bad = |reason: String, raw: &[u8]| QuarantineEntry {
            reason,
            file: shown.to_owned(),
            line: item.line,
            time_ms: now_ms(),
            raw: String::from_utf8_lossy(&raw[..raw.len().min(QUARANTINE_RAW_BYTES)]).into_owned(),
            ..QuarantineEntry::default()
        };
        match item.result {
            Ok(record) => {
                let before = output.events.len();
                match map_record(&record, &mapping.catalog, &mapping.opts, output) {
                    Ok(()) => {
                        chunk
                            .events
                            .extend(output.events.drain(before..).map(spool_event));
                        if !output.parked.is_empty() {
                            let ids = std::mem::take(&mut output.parked);
                            chunk.quarantine.push(crate::catalog::parking::entry(
                                &record, &ids, shown, item.line,
                            ));
                        }
                    }
                    Err(e) => chunk.quarantine.push(bad(e.to_string(), b"")),
                }
            }
            Err(BadRecord { reason, raw }) => chunk.quarantine.push(bad(reason, &raw)),
        }
    }

    /// Whether the file changed recently enough that its writer may still finish the last line.
    fn may_still_grow(&self, meta: &std::fs::Metadata) -> bool {
        meta.modified()
            .ok()
            .and_then(clock::age)
            .is_some_and(|age| age < self.partial_line_hold)
    }

    /// Records where the file stands at the chunk's end (plain files), so a later pass can tell
    /// the same file grown from a rewritten one.
    fn seal(&self, chunk: &mut Chunk, file: &File, gzip: bool) {
        if !gzip {
            chunk.tail_hash = fingerprint::tail_hash(file, chunk.offset).ok();
        }
    }

    /// Commits the chunk and updates the counters. `None` when shutdown came while waiting for
    /// spool space.
    fn commit_counted(
        &self,
        chunk: &Chunk,
        skipped: &Skipped,
        bad_log: &mut BadLog,
        cancel: &CancellationToken,
    ) -> Committed {
        let Some(out) = self.commit(chunk, cancel)? else {
            return Ok(None);
        };
        Ok(Some(self.count(chunk, out, skipped, bad_log)))
    }

    /// Counts a committed chunk; returns its events spooled, duplicates and quarantined.
    fn count(
        &self,
        chunk: &Chunk,
        out: spool::ChunkOutcome,
        skipped: &Skipped,
        bad_log: &mut BadLog,
    ) -> (u64, u64, u64) {
        let mut parked = 0;
        for q in &chunk.quarantine {
            if q.kind == spool::QuarantineKind::Parked {
                parked += 1;
            }
            bad_log.add(q);
        }
        Stats::add(&self.stats.events_spooled, out.spooled);
        Stats::add(&self.stats.duplicates_skipped, out.duplicates);
        Stats::add(&self.stats.quarantined, out.quarantined - parked);
        Stats::add(&self.stats.dead_lettered, out.dead_lettered);
        self.stats.add_skipped(skipped);
        (out.spooled, out.duplicates, out.quarantined)
    }

    /// One spool commit, after waiting for room below `spool.max_bytes` and retrying while the
    /// disk is full. Reading (and so the offset) waits with it; nothing is dropped.
    fn commit(
        &self,
        chunk: &Chunk,
        cancel: &CancellationToken,
    ) -> Result<Option<spool::ChunkOutcome>, spool::Error> {
        let incoming: u64 = chunk.events.iter().map(|e| e.json.len() as u64).sum();
        let mut room = Room::default();
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let why = match self.must_wait(incoming, 0, &mut room, &mut || Ok(()))? {
                Some(why) => why,
                None => match self.spool.commit_file_chunk(chunk) {
                    Ok(out) => {
                        self.resumed(&room);
                        return Ok(Some(out));
                    }
                    Err(e) if e.is_disk_full() => DISK_FULL_ENOSPC,
                    Err(e) => return Err(e),
                },
            };
            self.pause(why, &mut room);
        }
    }

    /// Hands a file's chunks to its pass's committer (see `parallel.rs`), after waiting for
    /// room as [`Ingestor::commit`] does, and counts the chunks committed meanwhile into
    /// `counted`; `last`: then waits for the commit in flight too. A commit that fails for
    /// lack of disk space is tried again, the chunks after it with it, once there is room.
    /// `None` when shutdown came while waiting.
    fn commit_pipelined(
        &self,
        committer: &mut Committer<'_, Skipped>,
        chunks: impl IntoIterator<Item = (Chunk, Skipped)>,
        last: bool,
        counted: &mut Counted,
        cancel: &CancellationToken,
    ) -> Result<Option<()>, spool::Error> {
        let mut todo: std::collections::VecDeque<_> = chunks.into_iter().collect();
        let incoming: u64 = todo
            .iter()
            .flat_map(|(c, _)| &c.events)
            .map(|e| e.json.len() as u64)
            .sum();
        let mut room = Room::default();
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let in_flight = committer.in_flight_bytes();
            let waiting = self.must_wait(incoming, in_flight, &mut room, &mut || {
                // Before waiting (or compacting, which takes the writer lock): the chunk in
                // flight settled, the lock let go.
                let finished = committer.finish();
                match counted.settled(self, finished, &mut todo) {
                    // Tried again after the pause, with the chunks after it.
                    Err(e) if e.is_disk_full() => Ok(()),
                    other => other,
                }
            })?;
            let why = match waiting {
                Some(why) => why,
                None => {
                    let mut result = Ok(());
                    while let Some((chunk, skipped)) = todo.pop_front() {
                        result = counted.settled(self, committer.submit(chunk, skipped), &mut todo);
                        if result.is_err() {
                            break;
                        }
                    }
                    if result.is_ok() && last {
                        result = counted.settled(self, committer.finish(), &mut todo);
                    }
                    match result {
                        Ok(()) => {
                            self.resumed(&room);
                            return Ok(Some(()));
                        }
                        Err(e) if e.is_disk_full() => DISK_FULL_ENOSPC,
                        Err(e) => return Err(e),
                    }
                }
            };
            self.pause(why, &mut room);
        }
    }

    /// Why a commit of `incoming` bytes must wait, if it must: the spool is at
    /// `spool.max_bytes`, or the disk nearly full (a compaction is tried first, at most every
    /// 30 s). `settle` (which commits the `in_flight` bytes of a committer, if any) runs before
    /// any waiting or compaction, and before deciding when those bytes would reach the limit,
    /// so the spool goes past `spool.max_bytes` by at most one chunk, as with one commit at a
    /// time.
    fn must_wait(
        &self,
        incoming: u64,
        in_flight: u64,
        room: &mut Room,
        settle: &mut dyn FnMut() -> Result<(), spool::Error>,
    ) -> Result<Option<&'static str>, spool::Error> {
        self.heartbeat_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        let mut depth = self.spool.queue().depth()?.bytes;
        if in_flight > 0 && depth.saturating_add(in_flight) >= self.max_spool_bytes {
            settle()?;
            depth = self.spool.queue().depth()?.bytes;
        }
        let full = depth >= self.max_spool_bytes;
        if !full && !self.spool.disk_nearly_full(incoming) {
            return Ok(None);
        }
        settle()?;
        if full {
            return Ok(Some(
                "spool full (spool.max_bytes); reading paused until the drain catches up",
            ));
        }
        // Delivered events give their room back as the drain deletes their segments; sled's
        // own files never shrink, and a compaction gives back what they grew by. Deciding walks
        // every tree of the spool, so at most every 30 s.
        let due = room
            .last_compaction_check
            .is_none_or(|t| t.elapsed() > Duration::from_secs(30));
        if due {
            room.last_compaction_check = Some(std::time::Instant::now());
        }
        if due && self.spool.compaction_helps_and_fits()? {
            match self.spool.compact() {
                Ok(c) => tracing::info!(
                    disk_before = c.disk_before,
                    disk_after = c.disk_after,
                    "spool compacted to give disk space back"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "compaction failed; still waiting for disk space")
                }
            }
            // Looked at again at once.
            return self.must_wait(incoming, 0, room, &mut || Ok(()));
        }
        Ok(Some(
            "disk full: free space under the spool is below its reserve; reading paused until there is room",
        ))
    }

    /// Reading waits: logged once per pause.
    fn pause(&self, why: &'static str, room: &mut Room) {
        if room.paused.is_none() {
            tracing::warn!(max_bytes = self.max_spool_bytes, "{why}");
        }
        room.paused = room.paused.or(Some(why));
        std::thread::sleep(Duration::from_millis(250));
    }

    /// A commit went in: says so if reading had paused, and wakes the drain.
    fn resumed(&self, room: &Room) {
        if room.paused.is_some() {
            tracing::info!("spool has room again; reading resumed");
        }
        self.drain_wake.notify_one();
    }
}

const DISK_FULL_ENOSPC: &str = "disk full (ENOSPC); reading paused until there is room";

/// Why reading is paused (logged once per pause), and when a compaction was last considered.
#[derive(Default)]
struct Room {
    paused: Option<&'static str>,
    last_compaction_check: Option<std::time::Instant>,
}

/// What a pass committed: its totals and its bad records, counted as its chunks are committed.
#[derive(Default)]
pub(super) struct Counted {
    /// Events spooled, duplicates and quarantined records.
    pub(super) totals: (u64, u64, u64),
    pub(super) bad_log: BadLog,
}

impl Counted {
    fn add(&mut self, ingest: &Ingestor, done: Done<Skipped>) {
        let t = ingest.count(&done.chunk, done.outcome, &done.tag, &mut self.bad_log);
        self.totals = (
            self.totals.0 + t.0,
            self.totals.1 + t.1,
            self.totals.2 + t.2,
        );
    }

    /// Counts what a committer committed; the chunks a failure left go back to the front of
    /// `todo`, in order, and the failure is returned.
    fn settled(
        &mut self,
        ingest: &Ingestor,
        result: Result<Vec<Done<Skipped>>, Failed<Skipped>>,
        todo: &mut std::collections::VecDeque<(Chunk, Skipped)>,
    ) -> Result<(), spool::Error> {
        match result {
            Ok(done) => {
                done.into_iter().for_each(|d| self.add(ingest, d));
                Ok(())
            }
            Err(f) => {
                f.done.into_iter().for_each(|d| self.add(ingest, d));
                for c in f.undone.into_iter().rev() {
                    todo.push_front(c);
                }
                Err(f.error)
            }
        }
    }
}

/// The bad and parked records of one pass over a file, logged once per kind with their count
/// when the pass ends (SPEC section 8: one line per file and kind, never one per record;
/// `status` and `dead-letter list` have the rest). A file of 100,000 malformed lines logs one
/// line.
#[derive(Default)]
pub(super) struct BadLog {
    /// Kind -> (records, file, first line, first reason).
    kinds: std::collections::BTreeMap<String, (u64, String, u64, String)>,
    /// Parked records: (records, file).
    parked: Option<(u64, String)>,
}

impl BadLog {
    fn add(&mut self, q: &QuarantineEntry) {
        if q.kind == spool::QuarantineKind::Parked {
            self.parked.get_or_insert_with(|| (0, q.file.clone())).0 += 1;
            return;
        }
        let entry = self
            .kinds
            .entry(bad_kind(&q.reason))
            .or_insert_with(|| (0, q.file.clone(), q.line, q.reason.clone()));
        entry.0 += 1;
    }
}

impl Drop for BadLog {
    fn drop(&mut self) {
        if let Some((records, file)) = self.parked.take() {
            tracing::info!(path = %file, records, "records parked until the catalog knows their messages (see dead-letter list)");
        }
        for (kind, (records, file, first_line, first_reason)) in std::mem::take(&mut self.kinds) {
            tracing::warn!(
                path = %file,
                kind = %kind,
                records,
                first_line,
                first_reason = %first_reason,
                "bad records quarantined (see dead-letter list)"
            );
        }
    }
}

/// What kind of problem a reason names: its text before any detail (a colon), without numbers,
/// so "line 3: ..." and "line 4: ..." are one kind.
fn bad_kind(reason: &str) -> String {
    let head = reason.split(':').next().unwrap_or(reason);
    let kind: String = head
        .chars()
        .filter(|c| !c.is_ascii_digit() && *c != ',')
        .collect();
    kind.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A chunk's skipped engagements by action, counted once the chunk is committed.
type Skipped = std::collections::BTreeMap<String, u64>;
/// Events spooled, duplicates and quarantined records of a chunk; `None` when shutdown
/// interrupted its commit.
type Committed = Result<Option<(u64, u64, u64)>, spool::Error>;

/// What `dry-run` saw.
#[derive(Debug, Default)]
pub(crate) struct DryRunSummary {
    pub events: u64,
    pub duplicates: u64,
    pub bad_records: u64,
    pub unreadable_files: u64,
    /// Engagements of messages the catalog does not know, which the agent would park.
    pub parked: u64,
    /// Engagements not sent, by why (an action name, `in-app`, `unknown message`, ...).
    pub skipped: std::collections::BTreeMap<String, u64>,
    /// CSV export events and impressions whose session was in none of the files given.
    pub waiting: u64,
}

impl DryRunSummary {
    /// The closing line on stderr: what was sent and what was not, and why.
    pub(crate) fn render(&self) -> String {
        let special = [
            mapping::SKIP_IN_APP,
            mapping::SKIP_UNKNOWN_MESSAGE,
            mapping::SKIP_EXPERIMENT_NO_TIME,
        ];
        let by_action: Vec<String> = self
            .skipped
            .iter()
            .filter(|(k, _)| !special.contains(&k.as_str()))
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        let actions: u64 = self
            .skipped
            .iter()
            .filter(|(k, _)| !special.contains(&k.as_str()))
            .map(|(_, n)| n)
            .sum();
        let count = |k: &str| self.skipped.get(k).copied().unwrap_or(0);
        let mut text = format!(
            "{} events; not sent: {actions} skipped by action",
            self.events
        );
        if !by_action.is_empty() {
            text.push_str(&format!(" ({})", by_action.join(", ")));
        }
        text.push_str(&format!(
            ", {} in-app, {} unknown message, {} parked (message not in the catalog), {} \
             without a session time, {} duplicates, {} bad records, {} CSV export records \
             waiting for their session; {} unreadable files",
            count(mapping::SKIP_IN_APP),
            count(mapping::SKIP_UNKNOWN_MESSAGE),
            self.parked,
            count(mapping::SKIP_EXPERIMENT_NO_TIME),
            self.duplicates,
            self.bad_records,
            self.waiting,
            self.unreadable_files
        ));
        text
    }
}

/// Parses `paths` and writes the events they would produce as JSON lines to `out`; bad records
/// (a line over `max_line_bytes` too) and unreadable files are reported on `err` as
/// `file:line: reason`. Events are deduplicated by `messageId` across all the files, as the
/// spool would.
pub(crate) fn dry_run(
    paths: &[PathBuf],
    catalog: &Catalog,
    opts: &MappingOptions,
    max_line_bytes: usize,
    explain: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<DryRunSummary> {
    let mut seen = HashSet::new();
    let mut summary = DryRunSummary::default();
    let mut tables = join::MemoryJoin::default();
    let mut any_table = false;
    for path in paths {
        let shown = path.display();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if crate::watch::manifest::is_manifest(&name) {
            writeln!(err, "{shown}: a job manifest, not data; skipped")?;
            continue;
        }
        if crate::input::leanplum_csv::table_file(path).is_some() {
            any_table = true;
            dry_run_table(path, &mut tables, &mut summary, err)?;
            continue;
        }
        let mut reader = match Reader::open(path, 0, max_line_bytes) {
            Ok(r) => r,
            Err(InputError::Empty) => continue,
            Err(e) => {
                writeln!(err, "{shown}: {e}")?;
                summary.unreadable_files += 1;
                continue;
            }
        };
        while let Some(item) = reader.next_item() {
            let item = match item {
                Ok(i) => i,
                Err(e) => {
                    writeln!(err, "{shown}: {e}")?;
                    summary.unreadable_files += 1;
                    break;
                }
            };
            let record = match item.result {
                Ok(r) => r,
                Err(bad) => {
                    writeln!(err, "{shown}:{}: {}", item.line, bad.reason)?;
                    summary.bad_records += 1;
                    continue;
                }
            };
            let at = format!("{shown}:{}", item.line);
            dry_run_map(
                &record,
                &at,
                catalog,
                opts,
                &mut seen,
                &mut summary,
                explain,
                out,
                err,
            )?;
        }
    }
    if any_table {
        let (sessions, orphans) = tables.finish();
        for s in sessions {
            let at = "CSV export session".to_owned();
            let record = Record::Session(Box::new(s));
            dry_run_map(
                &record,
                &at,
                catalog,
                opts,
                &mut seen,
                &mut summary,
                explain,
                out,
                err,
            )?;
        }
        if orphans > 0 {
            writeln!(
                err,
                "CSV export: {orphans} event(s) or impression(s) whose session is in none of the files given: the agent would keep them waiting for it"
            )?;
            summary.waiting += orphans;
        }
    }
    out.flush()?;
    Ok(summary)
}

/// Maps one record for `dry-run` and prints its new events.
#[allow(clippy::too_many_arguments)]
fn dry_run_map(
    record: &Record,
    at: &str,
    catalog: &Catalog,
    opts: &MappingOptions,
    seen: &mut HashSet<String>,
    summary: &mut DryRunSummary,
    explain: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<()> {
    let mut mapped = Output::default();
    if let Err(e) = map_record(record, catalog, opts, &mut mapped) {
        writeln!(err, "{at}: {e}")?;
        summary.bad_records += 1;
        return Ok(());
    }
    if explain && !mapped.parked.is_empty() {
        let mut ids: Vec<String> = mapped.parked.iter().map(|i| i.to_string()).collect();
        ids.dedup();
        writeln!(
            err,
            "{at}: {} engagement(s) of message(s) not in the catalog ({}): the agent would park them",
            mapped.parked.len(),
            ids.join(", ")
        )?;
    }
    if explain && !mapped.skipped.is_empty() {
        let why: Vec<String> = mapped
            .skipped
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect();
        writeln!(err, "{at}: not sent: {}", why.join(", "))?;
    }
    summary.parked += mapped.parked.len() as u64;
    for (k, n) in mapped.skipped {
        *summary.skipped.entry(k).or_insert(0) += n;
    }
    for ev in mapped.events {
        if !seen.insert(ev.message_id.clone()) {
            summary.duplicates += 1;
            continue;
        }
        out.write_all(&ev.to_json())?;
        out.write_all(b"\n")?;
        summary.events += 1;
    }
    Ok(())
}

/// Reads one CSV export table for `dry-run` into the in-memory join.
fn dry_run_table(
    path: &Path,
    tables: &mut join::MemoryJoin,
    summary: &mut DryRunSummary,
    err: &mut dyn Write,
) -> std::io::Result<()> {
    let shown = path.display();
    let mut reader = match crate::input::leanplum_csv::TableReader::open(path, 0) {
        Ok(Some(r)) => r,
        Ok(None) | Err(InputError::Empty) => return Ok(()),
        Err(e) => {
            writeln!(err, "{shown}: {e}")?;
            summary.unreadable_files += 1;
            return Ok(());
        }
    };
    let file = reader.file().clone();
    while let Some(item) = reader.next_item() {
        match item {
            Ok(item) => match item.result {
                Ok(row) => tables.add(&file, row),
                Err(bad) => {
                    writeln!(err, "{shown}:{}: {}", item.line, bad.reason)?;
                    summary.bad_records += 1;
                }
            },
            Err(e) => {
                writeln!(err, "{shown}: {e}")?;
                summary.unreadable_files += 1;
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(id: &str, pad: usize) -> TrackEvent {
        TrackEvent {
            message_id: id.into(),
            event: "Email Opened",
            user_id: Some("u".into()),
            anonymous_id: None,
            timestamp: crate::event::Timestamp(1793534899612),
            properties: crate::event::Properties::Email {
                email_id: None,
                email_subject: Some("x".repeat(pad).into()),
                message_id: None,
                campaign_id: None,
                campaign_name: None,
                link: None,
            },
            context: std::sync::Arc::new(crate::event::Context::from_map(serde_json::Map::new())),
        }
    }

    #[test]
    fn events_over_segments_limit_are_refused_before_the_spool() {
        let small = spool_event(track("lp-e-1", 10));
        assert_eq!((small.message_id.as_str(), small.refused), ("lp-e-1", None));
        let big = spool_event(track("lp-e-2", MAX_EVENT_BYTES));
        assert!(big.json.len() > MAX_EVENT_BYTES);
        assert_eq!(
            big.refused.as_deref(),
            Some(
                format!(
                    "event is {} bytes, over Segment's {MAX_EVENT_BYTES} byte limit",
                    big.json.len()
                )
                .as_str()
            )
        );
    }
}
