//! Leanplum's CSV export joined back into sessions (SPEC section 4, format 4), on disk.
//!
//! A job's tables arrive as separate files, in any order and at any time. Each row is turned
//! into what it contributes, and every session's events are mapped by [`map_session`] from a
//! [`Session`] rebuilt from the rows: identity and context from its `sessions` row, its message
//! events (with their `eventparameters`) as `states[].events[]`, its `experiments` rows as
//! impressions. So the Segment events are, by construction, those the same sessions give as a
//! JSON export: same `messageId`s, timestamps, properties and context.
//!
//! # What is kept, and where
//!
//! The join's state lives in the spool (`crate::spool::join`: a hash table file, `join.tab`,
//! whose writes are logged in the spool's database), not in memory, and each change to it is
//! committed in the transaction that moves the file's offset past the rows that caused it,
//! together with the events it released:
//! - a `sessions` row stores the session's identity and context (`join_sessions`), then
//!   releases what waited for it;
//! - an `events` row of a message event (`.m<id>...`) whose session is known, and whose shard's
//!   parameters are known (below), is mapped at once; otherwise it waits in `join_waiting`,
//!   for its session or for its parameters. App events are counted and dropped: they never
//!   become Segment events;
//! - an `eventparameters` row is stored (`join_params`) if the mapping reads it (`email_id`,
//!   `url`, `link_url`, `index`, `link_id`); the others are counted and dropped;
//! - an `experiments` row is mapped at once (Experiment Viewed, with its session's start and
//!   identity) if its session is known, else waits for it;
//! - `states` and `userattributes` rows are counted.
//!
//! A session whose context is too large for one record of the table (about 4 KiB) is
//! quarantined; what comes for it later waits, visibly. A job's state is removed some days
//! after its last row once nothing of it waits (`crate::spool::join`, "Cleanup").
//!
//! # Parameters that come late
//!
//! An `events` file can land before the `eventparameters` file that holds its clicks' URLs. A
//! message event is therefore mapped only once the job's `eventparameters` file **of the same
//! shard** (`...-outputeventparameters-<n>` for `...-outputevents-<n>`: Leanplum writes a
//! shard's tables from the same sessions) has been read to its end, or the job's manifest
//! (`export-<appId>-<jobId>-output-manifest`, beside the file) lists the job's files and no such
//! file. Until then it waits (visible in `status` and `dead-letter list` as `waiting`). A Click
//! is never sent without its URL because the parameters had not arrived yet. With
//! `watch.require_manifest`, a job's tables wait for its manifest anyway.
//!
//! Reaching the end of an `eventparameters` file marks its shard (in the commit that holds its
//! last rows), then releases the shard's waiting events in commits of their own, and only then
//! marks the file read: a crash in between finds the file still being read at the next start,
//! reads nothing new, and releases the rest.
//!
//! # Crash safety
//!
//! Every commit holds the events released, the removal of what released them from
//! `join_waiting`, the rows' own contributions and the file's new offset. A crash before it
//! leaves none of it (the rows are read again and do the same); after it, all of it. Releasing
//! is idempotent (deterministic `messageId`s, a removed key stays removed), so a row read twice
//! (a re-sent session) releases nothing twice.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Ingestor, Outcome, Skipped, spool_event};
use crate::clock::now_ms;
use crate::input::leanplum_csv::{TableItem, TableReader};
use crate::input::{InputError, Record};
use crate::leanplum::csv_export::{
    self, ExperimentRow, MAPPED_PARAMETERS, Row, Table, TableFile, parameters_json,
};
use crate::leanplum::{Event, Experiment, Id, LpTime, Session, State};
use crate::mapping::{MappingState, Output, map_session};
use crate::spool::join as keys;
use crate::spool::{self, Chunk, JoinOp, JoinTree, QuarantineEntry, Spool};
use crate::stats::Stats;

/// Rows per commit. Most rows add nothing to the join (app events, parameters the mapping
/// does not read), and what a chunk holds is bounded by [`CHUNK_OPS`] and the events: every
/// commit costs its fsyncs, 3 or 4 with a join log value (sled writes a value over 128 KiB to
/// a blob file of its own), so commits are few.
const CHUNK_ROWS: usize = 50_000;
/// Join writes per commit (a `sessions` row can release many).
const CHUNK_OPS: usize = 20_000;
/// Waiting records read from the spool at a time.
const PAGE: usize = 1000;

/// An event's parameters (name, value) and the keys holding them.
type ParamsFound = (Vec<(String, String)>, Vec<Vec<u8>>);

/// A record in `join_waiting` waiting for its session.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "k")]
enum ForSession {
    /// A message event, and the shard of its `events` file.
    #[serde(rename = "e")]
    Event {
        id: Id,
        name: String,
        time: LpTime,
        shard: u32,
    },
    #[serde(rename = "x")]
    Experiment { id: Id, variant: Id },
}

/// A message event in `join_waiting` whose session is known, waiting for its parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ForParams {
    session: String,
    id: Id,
    name: String,
    time: LpTime,
}

/// The join's view of one table file being read: its job and shard, and what it learnt of the
/// job's state during this pass.
pub(crate) struct Join<'a> {
    spool: &'a Spool,
    mapping: &'a MappingState,
    file: TableFile,
    /// The file's directory (for the job's manifest).
    dir: PathBuf,
    shown: String,
    /// Shards whose parameters are known to be complete.
    params_done: HashMap<u32, bool>,
    /// The job's manifest, read once per pass: the file names it lists.
    manifest: Option<Option<Vec<String>>>,
    /// The last session looked up.
    last_session: Option<(String, Arc<Session>)>,
    /// Where the release of each shard's events waiting for parameters reads the table on.
    release_cursor: HashMap<u32, keys::ScanCursor>,
}

impl<'a> Join<'a> {
    pub(crate) fn new(
        spool: &'a Spool,
        mapping: &'a MappingState,
        file: TableFile,
        dir: PathBuf,
        shown: String,
    ) -> Join<'a> {
        Join {
            spool,
            mapping,
            file,
            dir,
            shown,
            params_done: HashMap::new(),
            manifest: None,
            last_session: None,
            release_cursor: HashMap::new(),
        }
    }

    fn job(&self) -> &str {
        &self.file.job
    }

    /// Whether the parameters of `shard` are all known (see the module doc).
    fn params_complete(&mut self, shard: u32) -> Result<bool, spool::Error> {
        if let Some(&done) = self.params_done.get(&shard) {
            return Ok(done);
        }
        let mut done = self
            .spool
            .join_get(JoinTree::Jobs, &keys::params_read_key(self.job(), shard))?
            .is_some();
        let name = csv_export::parameters_file_name(self.job(), shard);
        if !done && let Some(listed) = self.manifest_files() {
            done = !listed
                .iter()
                .any(|f| f.strip_suffix(".gz").unwrap_or(f) == name);
        }
        self.params_done.insert(shard, done);
        Ok(done)
    }

    /// The files the job's manifest lists, if it is beside the file and readable.
    fn manifest_files(&mut self) -> Option<&Vec<String>> {
        if self.manifest.is_none() {
            let path = self
                .dir
                .join(format!("export-{}-output-manifest", self.file.job));
            let listed = std::fs::read(&path)
                .ok()
                .and_then(|b| crate::watch::manifest::shard_names(&b).ok());
            self.manifest = Some(listed);
        }
        self.manifest.as_ref().and_then(|m| m.as_ref())
    }

    /// The session stored for `session_id`, if its row was read.
    fn session(&mut self, session_id: &str) -> Result<Option<Arc<Session>>, spool::Error> {
        if let Some((id, s)) = &self.last_session
            && id == session_id
        {
            return Ok(Some(s.clone()));
        }
        let Some(v) = self.spool.join_get(
            JoinTree::Sessions,
            &keys::session_key(self.job(), session_id),
        )?
        else {
            return Ok(None);
        };
        let s: Session = serde_json::from_slice(&v).map_err(|_| spool::Error::Corrupt {
            path: self.spool.path(),
            what: format!("join session {session_id}"),
        })?;
        let s = Arc::new(s);
        self.last_session = Some((session_id.to_owned(), s.clone()));
        Ok(Some(s))
    }

    /// An event's stored parameters, and the keys holding them.
    fn params(&self, event_id: Id) -> Result<ParamsFound, spool::Error> {
        let prefix = keys::params_prefix(self.job(), event_id.0);
        let found = self.spool.join_scan(JoinTree::Params, &prefix, 64)?;
        let mut params = Vec::new();
        let mut used = Vec::new();
        for (k, v) in found {
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            params.push((name, String::from_utf8_lossy(&v).into_owned()));
            used.push(k);
        }
        Ok((params, used))
    }

    /// Maps `session` with the given events and impressions into the chunk.
    fn emit(
        &self,
        session: &Session,
        events: Vec<Event>,
        experiments: Vec<Experiment>,
        chunk: &mut Chunk,
        line: u64,
        out: &mut Output,
    ) {
        let s = Session {
            experiments,
            states: vec![State {
                events: crate::leanplum::Events::from_events(events),
            }],
            ..session.clone()
        };
        let before = out.events.len();
        let parked_before = out.parked.len();
        match map_session(&s, &self.mapping.catalog, &self.mapping.opts, out) {
            Ok(()) => {
                chunk
                    .events
                    .extend(out.events.drain(before..).map(spool_event));
                if out.parked.len() > parked_before {
                    let ids: Vec<Id> = out.parked.drain(parked_before..).collect();
                    chunk.quarantine.push(crate::catalog::parking::entry(
                        &Record::Session(Box::new(s)),
                        &ids,
                        &self.shown,
                        line,
                    ));
                }
            }
            Err(e) => chunk.quarantine.push(QuarantineEntry {
                reason: e.to_string(),
                file: self.shown.clone(),
                line,
                time_ms: now_ms(),
                ..QuarantineEntry::default()
            }),
        }
    }

    /// A message event ready to map: its parameters are looked up, and used up.
    fn event_with_params(
        &self,
        id: Id,
        name: String,
        time: LpTime,
        chunk: &mut Chunk,
    ) -> Result<Event, spool::Error> {
        let (params, used) = self.params(id)?;
        for k in used {
            chunk.join.push(remove(JoinTree::Params, k));
        }
        Ok(Event {
            event_id: id,
            name,
            time,
            parameters: parameters_json(&params),
        })
    }

    /// Adds one row. For a `sessions` row, releases at most a page of what waits for it and
    /// returns `false` while more waits: commit the chunk (its offset still before the row) and
    /// call again.
    pub(crate) fn add_row(
        &mut self,
        row: &Row,
        line: u64,
        chunk: &mut Chunk,
        out: &mut Output,
    ) -> Result<bool, spool::Error> {
        match row {
            Row::Session(r) => {
                let prefix = keys::waiting_for_session_prefix(self.job(), &r.session_id);
                let page = self.spool.join_scan(JoinTree::Waiting, &prefix, PAGE)?;
                let more = page.len() >= PAGE;
                let mut events = Vec::new();
                let mut experiments = Vec::new();
                for (k, v) in page {
                    chunk.join.push(remove(JoinTree::Waiting, k));
                    match serde_json::from_slice::<ForSession>(&v) {
                        Ok(ForSession::Experiment { id, variant }) => {
                            experiments.push(Experiment {
                                id,
                                variant_id: variant,
                                impressed: None,
                            })
                        }
                        Ok(ForSession::Event {
                            id,
                            name,
                            time,
                            shard,
                        }) => {
                            if self.params_complete(shard)? {
                                events.push(self.event_with_params(id, name, time, chunk)?);
                            } else {
                                chunk.join.push(put(
                                    JoinTree::Waiting,
                                    keys::waiting_for_params_key(self.job(), shard, id.0),
                                    &ForParams {
                                        session: r.session_id.clone(),
                                        id,
                                        name,
                                        time,
                                    },
                                ));
                            }
                        }
                        Err(_) => {
                            tracing::warn!(job = %self.job(), "unreadable waiting record dropped")
                        }
                    }
                }
                if !events.is_empty() || !experiments.is_empty() {
                    self.emit(&r.session, events, experiments, chunk, line, out);
                }
                if more {
                    return Ok(false);
                }
                let op = put(
                    JoinTree::Sessions,
                    keys::session_key(self.job(), &r.session_id),
                    &r.session,
                );
                if op.too_large() {
                    // What waits for it later stays visible as waiting.
                    chunk.quarantine.push(QuarantineEntry {
                        reason: format!(
                            "session {} too large to keep for the join ({} bytes of context)",
                            r.session_id,
                            op.value.as_ref().map_or(0, Vec::len)
                        ),
                        file: self.shown.clone(),
                        line,
                        time_ms: now_ms(),
                        ..QuarantineEntry::default()
                    });
                    return Ok(true);
                }
                chunk.join.push(op);
                self.last_session = Some((r.session_id.clone(), Arc::new(r.session.clone())));
            }
            Row::Event(e) => {
                if crate::mapping::parse_message_event(&e.name).is_none() {
                    out_app_event(out);
                    return Ok(true);
                }
                let shard = self.file.shard;
                match self.session(&e.session_id)? {
                    None => chunk.join.push(put(
                        JoinTree::Waiting,
                        keys::waiting_event_key(self.job(), &e.session_id, e.event_id.0),
                        &ForSession::Event {
                            id: e.event_id,
                            name: e.name.clone(),
                            time: e.time,
                            shard,
                        },
                    )),
                    Some(s) if self.params_complete(shard)? => {
                        let ev =
                            self.event_with_params(e.event_id, e.name.clone(), e.time, chunk)?;
                        self.emit(&s, vec![ev], Vec::new(), chunk, line, out);
                    }
                    Some(_) => chunk.join.push(put(
                        JoinTree::Waiting,
                        keys::waiting_for_params_key(self.job(), shard, e.event_id.0),
                        &ForParams {
                            session: e.session_id.clone(),
                            id: e.event_id,
                            name: e.name.clone(),
                            time: e.time,
                        },
                    )),
                }
            }
            Row::Param(p) => {
                if MAPPED_PARAMETERS.contains(&p.name.as_str()) {
                    chunk.join.push(JoinOp {
                        tree: JoinTree::Params,
                        key: keys::param_key(self.job(), p.event_id.0, &p.name),
                        value: Some(p.value.clone().into_bytes()),
                    });
                }
            }
            Row::Experiment(x) => self.add_experiment(x, line, chunk, out)?,
            Row::Other => {}
        }
        Ok(true)
    }

    fn add_experiment(
        &mut self,
        x: &ExperimentRow,
        line: u64,
        chunk: &mut Chunk,
        out: &mut Output,
    ) -> Result<(), spool::Error> {
        match self.session(&x.session_id)? {
            Some(s) => self.emit(&s, Vec::new(), vec![x.experiment()], chunk, line, out),
            None => chunk.join.push(put(
                JoinTree::Waiting,
                keys::waiting_experiment_key(
                    self.job(),
                    &x.session_id,
                    x.experiment_id.0,
                    x.variant_id.0,
                ),
                &ForSession::Experiment {
                    id: x.experiment_id,
                    variant: x.variant_id,
                },
            )),
        }
        Ok(())
    }

    /// The shards whose waiting events may go now that this file is read to its end: its own
    /// if it is an `eventparameters` file (marked in `chunk`), and those the job's manifest
    /// says have no parameters file.
    pub(crate) fn shards_to_release(&mut self, chunk: &mut Chunk) -> Vec<u32> {
        let mut shards = Vec::new();
        if self.file.table == Table::EventParameters {
            chunk.join.push(JoinOp {
                tree: JoinTree::Jobs,
                key: keys::params_read_key(self.job(), self.file.shard),
                value: Some(chunk.file_id.to_be_bytes().to_vec()),
            });
            self.params_done.insert(self.file.shard, true);
            shards.push(self.file.shard);
        }
        let job = self.file.job.clone();
        if let Some(listed) = self.manifest_files() {
            let mut without: Vec<u32> = listed
                .iter()
                .filter_map(|f| csv_export::table_file(f))
                .filter(|t| t.job == job)
                .map(|t| t.shard)
                .collect();
            without.sort_unstable();
            without.dedup();
            for shard in without {
                if !shards.contains(&shard) && self.params_complete(shard).unwrap_or(false) {
                    shards.push(shard);
                }
            }
        }
        shards
    }

    /// Releases up to a page of the events of `shard` waiting for its parameters. Returns
    /// `false` when none was left.
    pub(crate) fn release_page(
        &mut self,
        shard: u32,
        chunk: &mut Chunk,
        out: &mut Output,
    ) -> Result<bool, spool::Error> {
        let prefix = keys::waiting_for_params_prefix(self.job(), shard);
        let cursor = self.release_cursor.entry(shard).or_default();
        let (page, more) = self
            .spool
            .join_scan_table(JoinTree::Waiting, &prefix, cursor, PAGE)?;
        if page.is_empty() && !more {
            return Ok(false);
        }
        let line = chunk.line;
        for (k, v) in page {
            chunk.join.push(remove(JoinTree::Waiting, k));
            let Ok(w) = serde_json::from_slice::<ForParams>(&v) else {
                tracing::warn!(job = %self.job(), "unreadable waiting record dropped");
                continue;
            };
            match self.session(&w.session)? {
                Some(s) => {
                    let ev = self.event_with_params(w.id, w.name, w.time, chunk)?;
                    self.emit(&s, vec![ev], Vec::new(), chunk, line, out);
                }
                None => {
                    tracing::warn!(job = %self.job(), session = %w.session, "session of a waiting event is gone; event dropped")
                }
            }
        }
        Ok(true)
    }
}

fn out_app_event(out: &mut Output) {
    out.app_events += 1;
}

fn put<T: Serialize + ?Sized>(tree: JoinTree, key: Vec<u8>, value: &T) -> JoinOp {
    JoinOp {
        tree,
        key,
        value: Some(serde_json::to_vec(value).unwrap_or_default()),
    }
}

fn remove(tree: JoinTree, key: Vec<u8>) -> JoinOp {
    JoinOp {
        tree,
        key,
        value: None,
    }
}

/// Whether `rel` and a file read before (at `other`) may be the same file: any two files, but
/// two CSV export tables only if they are the same table of the same shard of the same job
/// (two shards' empty tables hold the same bytes, and each must be read).
pub(crate) fn may_be_same_file(rel: &Path, other: &str) -> bool {
    match crate::input::leanplum_csv::table_file(rel) {
        None => true,
        Some(t) => crate::input::leanplum_csv::table_file(Path::new(other)).as_ref() == Some(&t),
    }
}

impl Ingestor {
    /// Reads a CSV export table file from `offset` into the join and the spool (see the
    /// module doc). The file is known (`file_id`); what happens to it is the same as for any
    /// other file: held on an unfinished last row, paused while the catalog looks a message
    /// up, failed on damage.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn ingest_table(
        &self,
        rel: &Path,
        file: &File,
        meta: &std::fs::Metadata,
        head: &[u8],
        gzip: bool,
        len: u64,
        mut file_id: u64,
        offset: u64,
        line: u64,
        cancel: &CancellationToken,
    ) -> Result<Outcome, spool::Error> {
        let abs = self.watch_dir.join(rel);
        let shown = rel.display().to_string();
        let (mut offset, mut line) = (offset, line);
        let opened = match TableReader::open(&abs, offset) {
            Err(InputError::BadOffset { .. }) if offset > 0 => {
                tracing::warn!(path = %shown, offset, "file rewritten; reading it as a new file");
                file_id = self.begin(rel, head, gzip, len)?;
                (offset, line) = (0, 0);
                TableReader::open(&abs, 0)
            }
            other => other,
        };
        let mut reader = match opened {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(self.unreadable(rel, Some(file_id), "not a CSV export table")),
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
        let table = reader.table();
        if offset == 0 {
            tracing::info!(path = %shown, format = "leanplum-csv", table = %table, job = %reader.file().job, shard = reader.file().shard, gzip, "reading file");
        }
        let generation = self.catalog.as_ref().map(|c| c.generation());
        let mapping = crate::mapping::current(&self.mapping);
        let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut join = Join::new(
            &self.spool,
            &mapping,
            reader.file().clone(),
            dir,
            shown.clone(),
        );
        let mut chunk = Chunk {
            file_id,
            offset,
            line,
            ..Chunk::default()
        };
        let mut out = Output::default();
        let mut rows = 0usize;
        // The chunk's event bytes, and how many of its events they count (a commit empties it).
        let (mut bytes, mut counted) = (0usize, 0usize);
        let mut totals = (0u64, 0u64, 0u64);
        let (mut held, mut waiting, mut stream_error) = (false, false, None);
        // The pass's bad rows, logged once per kind when it ends.
        let mut bad_log = super::BadLog::default();
        // Commits `chunk` and starts the next one where it ends; `false`: cancelled.
        let mut commit = |chunk: &mut Chunk, out: &mut Output| -> Result<bool, spool::Error> {
            if !gzip {
                chunk.tail_hash = super::fingerprint::tail_hash(file, chunk.offset).ok();
            }
            let skipped: Skipped = std::mem::take(&mut out.skipped);
            let Some(t) = self.commit_counted(chunk, &skipped, &mut bad_log, cancel)? else {
                return Ok(false);
            };
            totals = (totals.0 + t.0, totals.1 + t.1, totals.2 + t.2);
            *chunk = Chunk {
                file_id: chunk.file_id,
                offset: chunk.offset,
                line: chunk.line,
                ..Chunk::default()
            };
            Ok(true)
        };
        loop {
            let item: TableItem = match reader.next_item() {
                None => break,
                Some(Ok(item)) => item,
                Some(Err(e)) => {
                    stream_error = Some(e);
                    break;
                }
            };
            if !item.complete && !gzip && self.may_still_grow(meta) {
                // A cut row can still parse (a time cut short): hold it whatever it says.
                held = true;
                break;
            }
            if self.table_row_must_wait(&item, &mapping, &shown) {
                waiting = true;
                break;
            }
            Stats::add(&self.stats.records_read, 1);
            rows += 1;
            match &item.result {
                Ok(row) => {
                    while !join.add_row(row, item.line, &mut chunk, &mut out)? {
                        if !commit(&mut chunk, &mut out)? {
                            return Ok(Outcome::Cancelled);
                        }
                    }
                }
                Err(bad) => chunk.quarantine.push(QuarantineEntry {
                    reason: bad.reason.clone(),
                    file: shown.clone(),
                    line: item.line,
                    time_ms: now_ms(),
                    raw: String::from_utf8_lossy(&bad.raw).into_owned(),
                    ..QuarantineEntry::default()
                }),
            }
            chunk.offset = item.end_offset;
            chunk.line = item.line;
            if chunk.events.len() < counted {
                (bytes, counted) = (0, 0);
            }
            bytes += chunk.events[counted..]
                .iter()
                .map(|e| e.json.len())
                .sum::<usize>();
            counted = chunk.events.len();
            if (rows >= CHUNK_ROWS
                || chunk.events.len() >= super::CHUNK_EVENTS
                || bytes >= super::CHUNK_BYTES
                || chunk.join.len() >= CHUNK_OPS)
                && !commit(&mut chunk, &mut out)?
            {
                return Ok(Outcome::Cancelled);
            }
            if rows >= CHUNK_ROWS {
                rows = 0;
            }
        }
        if let Some(e) = &stream_error {
            chunk.quarantine.push(QuarantineEntry {
                reason: e.to_string(),
                file: shown.clone(),
                line: chunk.line + 1,
                time_ms: now_ms(),
                ..QuarantineEntry::default()
            });
        }
        let at_end = stream_error.is_none() && !held && !waiting;
        if at_end {
            chunk.offset = reader.offset();
            let shards = join.shards_to_release(&mut chunk);
            if !commit(&mut chunk, &mut out)? {
                return Ok(Outcome::Cancelled);
            }
            for shard in shards {
                while join.release_page(shard, &mut chunk, &mut out)? {
                    if !commit(&mut chunk, &mut out)? {
                        return Ok(Outcome::Cancelled);
                    }
                }
            }
            chunk.file_done = true;
        }
        if !commit(&mut chunk, &mut out)? {
            return Ok(Outcome::Cancelled);
        }
        if let Some(e) = stream_error {
            let reason = e.to_string();
            tracing::warn!(path = %shown, error = %reason, "file damaged; rows before the damage were kept");
            self.spool
                .ledger()
                .transition(file_id, spool::Transition::Failed(reason.clone()))?;
            return Ok(Outcome::Failed(reason));
        }
        if waiting {
            return Ok(Outcome::WaitingOnCatalog(generation.unwrap_or(0)));
        }
        let mut holding = self.holding.lock().unwrap_or_else(|e| e.into_inner());
        if held {
            if holding.insert(rel.to_path_buf()) {
                tracing::info!(path = %shown, "last row unfinished; holding it until it is complete");
            }
            return Ok(Outcome::Held);
        }
        holding.remove(rel);
        drop(holding);
        tracing::info!(
            path = %shown,
            table = %table,
            events = totals.0,
            duplicates = totals.1,
            quarantined = totals.2,
            waiting = self.spool.join_waiting_count().unwrap_or(0),
            "file ingested"
        );
        Ok(Outcome::Read {
            events: totals.0,
            duplicates: totals.1,
            quarantined: totals.2,
        })
    }

    /// With the Leanplum API configured: whether the row names a message or A/B test the
    /// catalog is still finding out about.
    fn table_row_must_wait(&self, item: &TableItem, mapping: &MappingState, shown: &str) -> bool {
        let Some(catalog) = &self.catalog else {
            return false;
        };
        let probe = match &item.result {
            Ok(Row::Event(e)) if crate::mapping::parse_message_event(&e.name).is_some() => {
                Session {
                    states: vec![State {
                        events: crate::leanplum::Events::from_events([Event {
                            event_id: e.event_id,
                            name: e.name.clone(),
                            time: e.time,
                            parameters: None,
                        }]),
                    }],
                    ..Session::default()
                }
            }
            Ok(Row::Experiment(x)) => Session {
                experiments: vec![x.experiment()],
                ..Session::default()
            },
            _ => return false,
        };
        let messages = crate::mapping::session_unknown_messages(&probe, &mapping.catalog);
        let abtests =
            crate::mapping::session_unknown_abtests(&probe, &mapping.catalog, &mapping.opts);
        catalog.must_wait(&messages, &abtests, shown)
    }
}

/// `dry-run` over a job's CSV files: the same join, in memory. Sessions are rebuilt from all
/// the files given, then mapped one by one. Returns the sessions, and what found no session.
#[derive(Default)]
pub(crate) struct MemoryJoin {
    /// (job, sessionId) -> session, with its events and impressions.
    sessions: HashMap<(String, String), Session>,
    /// (job, eventId) -> (sessionId, event).
    events: HashMap<(String, Id), (String, Event)>,
    params: HashMap<(String, Id), Vec<(String, String)>>,
    experiments: Vec<(String, ExperimentRow)>,
}

impl MemoryJoin {
    pub(crate) fn add(&mut self, file: &TableFile, row: Row) {
        let job = file.job.clone();
        match row {
            Row::Session(r) => {
                self.sessions.insert((job, r.session_id), r.session);
            }
            Row::Event(e) => {
                if crate::mapping::parse_message_event(&e.name).is_some() {
                    self.events.insert(
                        (job, e.event_id),
                        (
                            e.session_id,
                            Event {
                                event_id: e.event_id,
                                name: e.name,
                                time: e.time,
                                parameters: None,
                            },
                        ),
                    );
                }
            }
            Row::Param(p) => {
                if MAPPED_PARAMETERS.contains(&p.name.as_str()) {
                    self.params
                        .entry((job, p.event_id))
                        .or_default()
                        .push((p.name, p.value));
                }
            }
            Row::Experiment(x) => self.experiments.push((job, x)),
            Row::Other => {}
        }
    }

    /// The joined sessions (those with something to map), and how many records found no
    /// session.
    pub(crate) fn finish(mut self) -> (Vec<Session>, u64) {
        let mut orphans = 0;
        let mut events: Vec<_> = self.events.into_iter().collect();
        events.sort_by_key(|((_, id), _)| *id);
        for ((job, id), (sid, mut ev)) in events {
            if let Some(p) = self.params.get(&(job.clone(), id)) {
                ev.parameters = parameters_json(p);
            }
            match self.sessions.get_mut(&(job, sid)) {
                Some(s) => match s.states.first_mut() {
                    Some(st) => st.events.push(ev),
                    None => s.states.push(State {
                        events: crate::leanplum::Events::from_events([ev]),
                    }),
                },
                _ => orphans += 1,
            }
        }
        for (job, x) in self.experiments {
            match self.sessions.get_mut(&(job, x.session_id.clone())) {
                Some(s) => s.experiments.push(x.experiment()),
                None => orphans += 1,
            }
        }
        let mut out: Vec<Session> = self
            .sessions
            .into_values()
            .filter(|s| !s.experiments.is_empty() || !s.states.is_empty())
            .collect();
        out.sort_by_key(|s| s.time.map(|t| t.millis()));
        (out, orphans)
    }
}
