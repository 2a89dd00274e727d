//! The state of the CSV export join (see `crate::ingest::join`), kept in `spool.dir/join.tab`,
//! a hash table file (`join_table.rs`), so a day's job of millions of sessions costs disk, not
//! memory, and committed with the file offset that read it: each commit's join writes go into
//! the sled `join_log` tree in the commit's transaction, and into the table after sled's flush
//! (see `join_table.rs` and the spool's `//!`).
//!
//! The spool only stores and finds these keys; what the values mean is the join's business.
//! Keys are built here so their layout is documented in one place. In the table a key starts
//! with its tree's byte ([`JoinTree`]); the group (what is read together) is in bold:
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `join_sessions` | **job, sessionId** | the session's identity and context: a `leanplum::Session` with no states, as JSON |
//! | `join_waiting` | **`s`, job, sessionId**, `e` eventId u64 BE / `x` experimentId u64 BE + variantId u64 BE | a message event or an impression waiting for its session, as JSON |
//! | `join_waiting` | **`p`, job, shard u32 BE, eventId u64 BE** | a message event whose session is known, waiting for its shard's `eventparameters`, as JSON (found by a scan of the table) |
//! | `join_params` | **job, eventId u64 BE**, parameter name | the parameter's value (text) |
//! | `join_jobs` | **job, `p`, shard u32 BE** | the file id of the shard's `eventparameters`, read to its end |
//!
//! A job or sessionId in a key is its length (u16 BE) then its bytes, so no id is a prefix of
//! another. The table's header counts the keys of `join_waiting`.
//!
//! # Cleanup
//!
//! Every record carries the day it was written. A job none of whose records waits, and none
//! written for [`JOIN_RETENTION_DAYS`], is removed by [`Spool::sweep_join`] (the maintenance
//! tick): its sessions, parameters and shard marks. What waits stays until it is mapped (or
//! purged by hand), and keeps its job's sessions with it.
//!
//! Spools written before `join.tab` kept these keys in four sled trees of the same names; an
//! agent opening one moves them into the table (in commits like any other, see
//! [`Spool::migrate_join_trees`]).

use std::collections::HashMap;

use sled::transaction::Transactional;

use super::join_table::{self, Table, Write};
use super::{Error, Spool, Store, decode_u64};

/// A job's state is removed this many days after its last write, once nothing of it waits.
pub const JOIN_RETENTION_DAYS: u64 = 2;
/// Join writes per commit of a sweep or a migration.
const WRITES_PER_COMMIT: usize = 20_000;
/// A checkpoint of the table once the log holds this many bytes: sled keeps the log's values
/// in memory until they are removed, so this bounds what the log costs in RSS.
const CHECKPOINT_LOG_BYTES: u64 = 8 << 20;
/// The `meta` key of the next `join_log` sequence number, committed with every log value.
pub(super) const JOIN_NEXT: &str = "join_next";

/// The tree a [`JoinOp`] writes to: the first byte of its keys in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum JoinTree {
    Sessions = 1,
    Waiting = 2,
    Params = 3,
    Jobs = 4,
}

/// One write of the join's state, committed with a chunk (`value: None` removes the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOp {
    pub tree: JoinTree,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl JoinOp {
    /// Whether the key and value are more than the join's table can hold in one record.
    pub fn too_large(&self) -> bool {
        1 + self.key.len() + self.value.as_ref().map_or(0, Vec::len) > join_table::MAX_RECORD
    }
}

/// Keys and values read from a join tree.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// The `meta` key of the number of keys in `join_waiting` (spools before `join.tab`).
pub(super) const JOIN_WAITING: &str = "join_waiting";

fn push_text(k: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    k.extend_from_slice(&(b.len() as u16).to_be_bytes());
    k.extend_from_slice(b);
}

fn read_text(k: &[u8]) -> Option<(String, &[u8])> {
    let len = u16::from_be_bytes(k.get(..2)?.try_into().ok()?) as usize;
    let text = k.get(2..2 + len)?;
    Some((String::from_utf8_lossy(text).into_owned(), &k[2 + len..]))
}

/// `join_sessions` key.
pub fn session_key(job: &str, session_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(job.len() + session_id.len() + 4);
    push_text(&mut k, job);
    push_text(&mut k, session_id);
    k
}

/// `join_waiting`: the prefix of everything waiting for one session.
pub fn waiting_for_session_prefix(job: &str, session_id: &str) -> Vec<u8> {
    let mut k = vec![b's'];
    k.extend(session_key(job, session_id));
    k
}

/// `join_waiting`: a message event waiting for its session.
pub fn waiting_event_key(job: &str, session_id: &str, event_id: u64) -> Vec<u8> {
    let mut k = waiting_for_session_prefix(job, session_id);
    k.push(b'e');
    k.extend_from_slice(&event_id.to_be_bytes());
    k
}

/// `join_waiting`: an impression waiting for its session.
pub fn waiting_experiment_key(
    job: &str,
    session_id: &str,
    experiment_id: u64,
    variant_id: u64,
) -> Vec<u8> {
    let mut k = waiting_for_session_prefix(job, session_id);
    k.push(b'x');
    k.extend_from_slice(&experiment_id.to_be_bytes());
    k.extend_from_slice(&variant_id.to_be_bytes());
    k
}

/// `join_waiting`: the prefix of the events of one shard waiting for its parameters.
pub fn waiting_for_params_prefix(job: &str, shard: u32) -> Vec<u8> {
    let mut k = vec![b'p'];
    push_text(&mut k, job);
    k.extend_from_slice(&shard.to_be_bytes());
    k
}

/// `join_waiting`: one event waiting for its shard's parameters.
pub fn waiting_for_params_key(job: &str, shard: u32, event_id: u64) -> Vec<u8> {
    let mut k = waiting_for_params_prefix(job, shard);
    k.extend_from_slice(&event_id.to_be_bytes());
    k
}

/// `join_params`: the prefix of one event's parameters.
pub fn params_prefix(job: &str, event_id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(job.len() + 10);
    push_text(&mut k, job);
    k.extend_from_slice(&event_id.to_be_bytes());
    k
}

/// `join_params`: one parameter of one event.
pub fn param_key(job: &str, event_id: u64, name: &str) -> Vec<u8> {
    let mut k = params_prefix(job, event_id);
    k.extend_from_slice(name.as_bytes());
    k
}

/// `join_jobs`: the mark that a shard's `eventparameters` file was read to its end.
pub fn params_read_key(job: &str, shard: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(job.len() + 7);
    push_text(&mut k, job);
    k.push(b'p');
    k.extend_from_slice(&shard.to_be_bytes());
    k
}

/// What waits in `join_waiting`, grouped for `dead-letter list` and `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingGroup {
    pub job: String,
    /// `None`: records waiting for their sessions; `Some(shard)`: events waiting for the
    /// shard's `eventparameters` file.
    pub params_shard: Option<u32>,
    pub records: u64,
    /// A few of the sessionIds waited for (sessions only), for the operator to look up.
    pub sample_sessions: Vec<String>,
}

/// How many bytes of a table key (tree byte first) make its group (see the module doc).
pub(super) fn group_len(key: &[u8]) -> usize {
    let text_end = |from: usize| -> Option<usize> {
        let len = u16::from_be_bytes(key.get(from..from + 2)?.try_into().ok()?) as usize;
        Some(from + 2 + len)
    };
    let n = match key.first() {
        Some(&t) if t == JoinTree::Waiting as u8 && key.get(1) == Some(&b's') => {
            text_end(2).and_then(text_end)
        }
        Some(&t) if t == JoinTree::Params as u8 => text_end(1).map(|e| e + 8),
        _ => None,
    };
    n.filter(|&n| n <= key.len()).unwrap_or(key.len())
}

fn tagged(tree: JoinTree, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(tree as u8);
    k.extend_from_slice(key);
    k
}

/// The job a table key belongs to.
fn job_of(key: &[u8]) -> Option<String> {
    let from = match key.first() {
        Some(&t) if t == JoinTree::Waiting as u8 => 2,
        Some(_) => 1,
        None => return None,
    };
    read_text(key.get(from..)?).map(|(job, _)| job)
}

/// The join's table and the log's position, guarded by the spool's `join` lock (taken after
/// the writer and store locks).
#[derive(Default)]
pub(super) struct State {
    /// Opened at open for an agent, at first use otherwise.
    table: Option<Table>,
    /// The next `join_log` sequence number.
    next: u64,
    /// Log bytes written since the last checkpoint.
    unsynced: u64,
}

/// A commit's join writes, ready for its transaction (see [`Spool::commit_file_chunk`]).
pub(super) struct Prepared {
    pub seq: u64,
    pub value: Vec<u8>,
    writes: Vec<Write>,
}

impl Prepared {
    /// Puts the log value and the next sequence number into the commit's transaction.
    pub(super) fn log(
        &self,
        log: &sled::transaction::TransactionalTree,
        meta: &sled::transaction::TransactionalTree,
    ) -> super::TxResult<()> {
        log.insert(&self.seq.to_be_bytes(), self.value.as_slice())?;
        meta.insert(JOIN_NEXT, &(self.seq + 1).to_be_bytes())?;
        Ok(())
    }
}

impl Spool {
    fn join_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.join.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The join table, opened and brought up to the log on first use.
    fn join_table<'a>(&self, s: &Store, st: &'a mut State) -> Result<&'a mut Table, Error> {
        if st.table.is_none() {
            self.install_join_table(s, st)?;
        }
        Ok(st.table.as_mut().expect("installed above"))
    }

    /// Opens the table and applies the log values it lacks (after a crash: those committed
    /// since its last checkpoint).
    fn install_join_table(&self, s: &Store, st: &mut State) -> Result<(), Error> {
        let mut t = Table::open(&join_table::path(&self.dir))?;
        let committed = s
            .meta
            .get(JOIN_NEXT)
            .map_err(|e| s.sled_err(e))?
            .and_then(|v| decode_u64(&v))
            .unwrap_or(1);
        if t.applied >= committed {
            // Writes of commits the database no longer has (a power cut took transactions it
            // had reported durable). Nothing can rebuild the join's state, so the table is
            // kept: the rows of those commits are read again and put the same; a waiting
            // record those commits had released is gone with the events they spooled.
            tracing::error!(
                table_applied = t.applied,
                database_next = committed,
                "the join table is ahead of the spool database (a power cut took committed \
                 transactions); keeping it"
            );
        }
        let mut replayed = 0u64;
        let mut next = committed.max(t.applied + 1);
        for item in s.join_log.range((t.applied + 1).to_be_bytes()..) {
            let (k, v) = item.map_err(|e| s.sled_err(e))?;
            let seq = decode_u64(&k).unwrap_or(0);
            let writes = join_table::decode_log(&v).ok_or_else(|| Error::Corrupt {
                path: s.path.clone(),
                what: format!("join log value {seq}"),
            })?;
            t.apply(seq, writes)?;
            replayed += 1;
            next = next.max(seq + 1);
        }
        if replayed > 0 {
            t.recount()?;
            tracing::info!(
                commits = replayed,
                "join log values written since the last checkpoint applied to the join table"
            );
        }
        st.next = next;
        st.table = Some(t);
        Ok(())
    }

    /// The log value of a commit's join writes, or `None` when it has none. Called with the
    /// writer lock held, so sequence numbers commit in order.
    pub(super) fn prepare_join(
        &self,
        s: &Store,
        ops: &[JoinOp],
        day: u16,
    ) -> Result<Option<Prepared>, Error> {
        if ops.is_empty() {
            return Ok(None);
        }
        let mut st = self.join_state();
        self.join_table(s, &mut st)?;
        let writes: Vec<Write> = ops
            .iter()
            .map(|op| {
                let key = tagged(op.tree, &op.key);
                Write {
                    group: group_len(&key),
                    key,
                    value: op.value.clone(),
                    day,
                }
            })
            .collect();
        Ok(Some(Prepared {
            seq: st.next,
            value: join_table::encode_log(&writes),
            writes,
        }))
    }

    /// After the commit holding `p` is durable: its writes go into the table (see
    /// `join_table.rs`), and the table is checkpointed when the log has grown.
    pub(super) fn join_committed(&self, s: &Store, p: Prepared) {
        let mut st = self.join_state();
        st.next = p.seq + 1;
        st.unsynced += p.value.len() as u64;
        let Some(t) = st.table.as_mut() else {
            return;
        };
        if let Err(e) = t.apply(p.seq, p.writes) {
            // The commit stands: the writes stay pending and are applied before the next read.
            tracing::warn!(error = %e, "cannot write the join table; retried before its next use");
        }
        if st.unsynced >= CHECKPOINT_LOG_BYTES
            && let Err(e) = self.checkpoint_join_with(s, &mut st)
        {
            tracing::warn!(error = %e, "join checkpoint failed; retried later");
        }
    }

    /// Makes the join table durable and drops the log values it covers.
    pub fn checkpoint_join(&self) -> Result<(), Error> {
        let s = self.store();
        let mut st = self.join_state();
        self.checkpoint_join_with(&s, &mut st)
    }

    fn checkpoint_join_with(&self, s: &Store, st: &mut State) -> Result<(), Error> {
        let Some(t) = st.table.as_mut() else {
            return Ok(());
        };
        let upto = t.checkpoint()?;
        let mut batch = sled::Batch::default();
        let mut any = false;
        for item in s.join_log.range(..=upto.to_be_bytes()) {
            let (k, _) = item.map_err(|e| s.sled_err(e))?;
            batch.remove(k);
            any = true;
        }
        if any {
            s.join_log.apply_batch(batch).map_err(|e| s.sled_err(e))?;
        }
        st.unsynced = 0;
        Ok(())
    }

    /// Commits join writes of their own (a sweep, a migration: no file offset moves), in
    /// order with the chunks' commits, and applies them.
    fn commit_join_writes(
        &self,
        ops: &[JoinOp],
        old: Option<&[(JoinTree, Vec<u8>)]>,
    ) -> Result<(), Error> {
        let _w = self.writer();
        let s = self.store();
        let Some(p) = self.prepare_join(&s, ops, super::dedupe::day(super::now_ms()))? else {
            return Ok(());
        };
        let old = old.unwrap_or(&[]);
        (
            &s.join_log,
            &s.meta,
            &s.join_sessions,
            &s.join_waiting,
            &s.join_params,
            &s.join_jobs,
        )
            .transaction(|(log, meta, sessions, waiting, params, jobs)| {
                p.log(log, meta)?;
                for (tree, key) in old {
                    let t = match tree {
                        JoinTree::Sessions => sessions,
                        JoinTree::Waiting => waiting,
                        JoinTree::Params => params,
                        JoinTree::Jobs => jobs,
                    };
                    t.remove(key.as_slice())?;
                }
                let left_waiting = old.iter().filter(|(t, _)| *t == JoinTree::Waiting).count();
                if left_waiting > 0 {
                    super::add_meta(meta, JOIN_WAITING, -(left_waiting as i64))?;
                }
                Ok(())
            })
            .map_err(|e| s.tx_err(e))?;
        s.flush()?;
        self.join_committed(&s, p);
        Ok(())
    }

    /// Moves the join state of a spool written before `join.tab` (four sled trees) into the
    /// table, in commits that remove from the trees what they put into the log. Returns how
    /// many keys moved.
    pub(super) fn migrate_join_trees(&self) -> Result<u64, Error> {
        let mut moved = 0u64;
        loop {
            let mut ops = Vec::new();
            let mut old = Vec::new();
            {
                let s = self.store();
                for (tree, t) in [
                    (JoinTree::Sessions, &s.join_sessions),
                    (JoinTree::Waiting, &s.join_waiting),
                    (JoinTree::Params, &s.join_params),
                    (JoinTree::Jobs, &s.join_jobs),
                ] {
                    for item in t.iter().take(WRITES_PER_COMMIT - ops.len()) {
                        let (k, v) = item.map_err(|e| s.sled_err(e))?;
                        ops.push(JoinOp {
                            tree,
                            key: k.to_vec(),
                            value: Some(v.to_vec()),
                        });
                        old.push((tree, k.to_vec()));
                    }
                }
            }
            if ops.is_empty() {
                return Ok(moved);
            }
            moved += ops.len() as u64;
            self.commit_join_writes(&ops, Some(&old))?;
        }
    }

    /// The value at `key` in a join tree.
    pub fn join_get(&self, tree: JoinTree, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let key = tagged(tree, key);
        let s = self.store();
        let mut st = self.join_state();
        self.join_table(&s, &mut st)?.get(&key, group_len(&key))
    }

    /// Up to `limit` keys and values of the group `group` of a join tree (see the module doc:
    /// what waits for a session, an event's parameters).
    pub fn join_scan(
        &self,
        tree: JoinTree,
        group: &[u8],
        limit: usize,
    ) -> Result<KeyValues, Error> {
        let group = tagged(tree, group);
        let s = self.store();
        let mut st = self.join_state();
        let found = self
            .join_table(&s, &mut st)?
            .scan_group(&group, &group, limit)?;
        Ok(found
            .into_iter()
            .map(|r| (r.key[1..].to_vec(), r.value))
            .collect())
    }

    /// Keys under `prefix` of a join tree found by reading the table in page order from
    /// `cursor` (start with the default) until `limit` are found: for `join_waiting`'s events
    /// waiting for a shard's parameters, which are not one group. Returns them, and `false`
    /// once the whole table was read.
    pub fn join_scan_table(
        &self,
        tree: JoinTree,
        prefix: &[u8],
        cursor: &mut ScanCursor,
        limit: usize,
    ) -> Result<(KeyValues, bool), Error> {
        let prefix = tagged(tree, prefix);
        let s = self.store();
        let mut st = self.join_state();
        let t = self.join_table(&s, &mut st)?;
        if cursor.generation != t.generation {
            // Rebuilt since: its pages are not those the cursor counted.
            *cursor = ScanCursor {
                page: 1,
                generation: t.generation,
            };
        }
        let (found, next) = t.scan_all(&prefix, cursor.page, limit)?;
        cursor.page = next.unwrap_or(u64::MAX);
        let kv = found
            .into_iter()
            .map(|r| (r.key[1..].to_vec(), r.value))
            .collect();
        Ok((kv, next.is_some()))
    }

    /// How many records wait in the join (for a session or for parameters).
    pub fn join_waiting_count(&self) -> Result<u64, Error> {
        let s = self.store();
        let mut st = self.join_state();
        let in_table = self.join_table(&s, &mut st)?.waiting;
        // A spool from before `join.tab` not yet opened by an agent counts in `meta`.
        let old = s
            .meta
            .get(JOIN_WAITING)
            .map_err(|e| s.sled_err(e))?
            .and_then(|v| decode_u64(&v))
            .unwrap_or(0);
        Ok(in_table + old)
    }

    /// Everything waiting in the join, grouped by job and by what it waits for. Reads the whole
    /// table: for `dead-letter list`, not for every status.
    pub fn join_waiting_groups(&self) -> Result<Vec<WaitingGroup>, Error> {
        let mut groups: Vec<WaitingGroup> = Vec::new();
        let s = self.store();
        let mut st = self.join_state();
        let t = self.join_table(&s, &mut st)?;
        let mut cursor = 1;
        loop {
            let (found, next) = t.scan_all(&[JoinTree::Waiting as u8], cursor, 10_000)?;
            for r in found {
                let k = &r.key[1..];
                let (params_shard, job, session) = match k.first() {
                    Some(b's') => {
                        let Some((job, rest)) = read_text(&k[1..]) else {
                            continue;
                        };
                        let session = read_text(rest).map(|(sid, _)| sid);
                        (None, job, session)
                    }
                    Some(b'p') => {
                        let Some((job, rest)) = read_text(&k[1..]) else {
                            continue;
                        };
                        let shard = rest
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map(u32::from_be_bytes)
                            .unwrap_or(0);
                        (Some(shard), job, None)
                    }
                    _ => continue,
                };
                let g = match groups
                    .iter_mut()
                    .find(|g| g.job == job && g.params_shard == params_shard)
                {
                    Some(g) => g,
                    None => {
                        groups.push(WaitingGroup {
                            job,
                            params_shard,
                            records: 0,
                            sample_sessions: Vec::new(),
                        });
                        groups.last_mut().expect("pushed")
                    }
                };
                g.records += 1;
                if let Some(sid) = session
                    && g.sample_sessions.len() < 3
                    && !g.sample_sessions.contains(&sid)
                {
                    g.sample_sessions.push(sid);
                }
            }
            match next {
                Some(n) => cursor = n,
                None => break,
            }
        }
        Ok(groups)
    }

    /// Removes the state of every job none of whose records waits and none of whose records
    /// was written on or after the day of `cutoff_ms` (the maintenance tick passes now minus
    /// [`JOIN_RETENTION_DAYS`]). Returns how many records went.
    pub fn sweep_join(&self, cutoff_ms: u64) -> Result<u64, Error> {
        let cutoff = super::dedupe::day(cutoff_ms);
        // Per job: whether something waits, and the last day it was written to.
        let mut jobs: HashMap<String, (bool, u16)> = HashMap::new();
        {
            let s = self.store();
            let mut st = self.join_state();
            let t = self.join_table(&s, &mut st)?;
            let mut cursor = 1;
            loop {
                let (found, next) = t.scan_all(&[], cursor, 10_000)?;
                for r in found {
                    let Some(job) = job_of(&r.key) else { continue };
                    let e = jobs.entry(job).or_insert((false, 0));
                    e.0 |= r.key[0] == JoinTree::Waiting as u8;
                    e.1 = e.1.max(r.day);
                }
                match next {
                    Some(n) => cursor = n,
                    None => break,
                }
            }
        }
        jobs.retain(|_, (waiting, day)| !*waiting && *day < cutoff);
        if jobs.is_empty() {
            return Ok(0);
        }
        let mut removed = 0;
        let mut cursor = 1;
        loop {
            let (found, next) = {
                let s = self.store();
                let mut st = self.join_state();
                self.join_table(&s, &mut st)?
                    .scan_all(&[], cursor, WRITES_PER_COMMIT)?
            };
            let ops: Vec<JoinOp> = found
                .into_iter()
                .filter(|r| job_of(&r.key).is_some_and(|j| jobs.contains_key(&j)))
                .filter_map(|r| {
                    let tree = match r.key[0] {
                        1 => JoinTree::Sessions,
                        3 => JoinTree::Params,
                        4 => JoinTree::Jobs,
                        _ => return None,
                    };
                    Some(JoinOp {
                        tree,
                        key: r.key[1..].to_vec(),
                        value: None,
                    })
                })
                .collect();
            removed += ops.len() as u64;
            self.commit_join_writes(&ops, None)?;
            match next {
                Some(n) => cursor = n,
                None => break,
            }
        }
        if removed > 0 {
            tracing::info!(
                jobs = jobs.len(),
                records = removed,
                "join state of finished CSV export jobs removed"
            );
            self.checkpoint_join()?;
        }
        Ok(removed)
    }
}

/// Where a [`Spool::join_scan_table`] goes on from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanCursor {
    page: u64,
    generation: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Chunk, NO_FILE};

    fn put(tree: JoinTree, key: Vec<u8>, value: &str) -> JoinOp {
        JoinOp {
            tree,
            key,
            value: Some(value.as_bytes().to_vec()),
        }
    }

    #[test]
    fn a_finished_jobs_state_is_swept_and_a_waiting_jobs_kept_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 8 << 20).unwrap();
        let chunk = Chunk {
            file_id: NO_FILE,
            join: vec![
                // Job "done": a session and a parameter, nothing waiting.
                put(JoinTree::Sessions, session_key("done", "s1"), "{}"),
                put(JoinTree::Params, param_key("done", 5, "url"), "https://x"),
                put(JoinTree::Jobs, params_read_key("done", 0), "1"),
                // Job "open": a session, and an event waiting for another session.
                put(JoinTree::Sessions, session_key("open", "s1"), "{}"),
                put(JoinTree::Waiting, waiting_event_key("open", "s2", 9), "{}"),
            ],
            ..Chunk::default()
        };
        spool.commit_file_chunk(&chunk).unwrap();
        assert_eq!(spool.join_waiting_count().unwrap(), 1);
        let now = super::super::now_ms();
        // Written today: nothing is old enough yet.
        assert_eq!(spool.sweep_join(now - 3 * 86_400_000).unwrap(), 0);
        drop(spool);
        let spool = Spool::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(spool.join_waiting_count().unwrap(), 1);
        // Three days on: the finished job goes, the job with something waiting stays whole.
        assert_eq!(spool.sweep_join(now + 3 * 86_400_000).unwrap(), 3);
        let get = |t, k: Vec<u8>| spool.join_get(t, &k).unwrap();
        assert_eq!(get(JoinTree::Sessions, session_key("done", "s1")), None);
        assert_eq!(get(JoinTree::Params, param_key("done", 5, "url")), None);
        assert_eq!(get(JoinTree::Jobs, params_read_key("done", 0)), None);
        assert!(get(JoinTree::Sessions, session_key("open", "s1")).is_some());
        assert_eq!(
            spool
                .join_scan(
                    JoinTree::Waiting,
                    &waiting_for_session_prefix("open", "s2"),
                    10
                )
                .unwrap()
                .len(),
            1
        );
        let groups = spool.join_waiting_groups().unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!((groups[0].job.as_str(), groups[0].records), ("open", 1));
        // Once what waited is mapped (removed), the job is finished too.
        let chunk = Chunk {
            file_id: NO_FILE,
            join: vec![JoinOp {
                tree: JoinTree::Waiting,
                key: waiting_event_key("open", "s2", 9),
                value: None,
            }],
            ..Chunk::default()
        };
        spool.commit_file_chunk(&chunk).unwrap();
        assert_eq!(spool.join_waiting_count().unwrap(), 0);
        assert_eq!(spool.sweep_join(now + 3 * 86_400_000).unwrap(), 1);
        assert_eq!(get(JoinTree::Sessions, session_key("open", "s1")), None);
    }

    #[test]
    fn the_state_of_a_spool_from_before_join_tab_moves_into_it_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What the first agents with the join wrote: keys in four sled trees, and the
            // count of `join_waiting` in `meta`.
            let spool = Spool::open(dir.path(), 8 << 20).unwrap();
            let s = spool.store();
            s.join_sessions
                .insert(session_key("j", "s1"), b"{\"userId\":\"u\"}".as_slice())
                .unwrap();
            s.join_params
                .insert(param_key("j", 5, "url"), b"https://x".as_slice())
                .unwrap();
            s.join_jobs
                .insert(params_read_key("j", 0), 7u64.to_be_bytes().as_slice())
                .unwrap();
            for i in 0..3 {
                s.join_waiting
                    .insert(waiting_event_key("j", "s2", i), b"{}".as_slice())
                    .unwrap();
            }
            s.meta
                .insert(JOIN_WAITING, 3u64.to_be_bytes().as_slice())
                .unwrap();
            s.flush().unwrap();
        }
        let spool = Spool::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(spool.join_waiting_count().unwrap(), 3);
        assert_eq!(
            spool
                .join_get(JoinTree::Sessions, &session_key("j", "s1"))
                .unwrap()
                .as_deref(),
            Some(b"{\"userId\":\"u\"}".as_slice())
        );
        assert!(
            spool
                .join_get(JoinTree::Params, &param_key("j", 5, "url"))
                .unwrap()
                .is_some()
        );
        assert!(
            spool
                .join_get(JoinTree::Jobs, &params_read_key("j", 0))
                .unwrap()
                .is_some()
        );
        let waiting_prefix = waiting_for_session_prefix("j", "s2");
        let waits = spool
            .join_scan(JoinTree::Waiting, &waiting_prefix, 10)
            .unwrap();
        assert_eq!(waits.len(), 3);
        let s = spool.store();
        for t in [
            &s.join_sessions,
            &s.join_waiting,
            &s.join_params,
            &s.join_jobs,
        ] {
            assert!(t.is_empty(), "the old trees are emptied");
        }
    }

    #[test]
    fn groups_are_what_is_read_together() {
        let t = |tree: JoinTree, k: Vec<u8>| tagged(tree, &k);
        let w = t(JoinTree::Waiting, waiting_event_key("j", "s", 1));
        assert_eq!(
            &w[..group_len(&w)],
            t(JoinTree::Waiting, waiting_for_session_prefix("j", "s")).as_slice()
        );
        let p = t(JoinTree::Params, param_key("j", 7, "url"));
        assert_eq!(
            &p[..group_len(&p)],
            t(JoinTree::Params, params_prefix("j", 7)).as_slice()
        );
        let s = t(JoinTree::Sessions, session_key("j", "s"));
        assert_eq!(group_len(&s), s.len());
        let f = t(JoinTree::Waiting, waiting_for_params_key("j", 0, 1));
        assert_eq!(group_len(&f), f.len());
    }

    #[test]
    fn no_key_is_a_prefix_of_another_ones_group() {
        assert!(!session_key("j", "12").starts_with(&session_key("j", "1")));
        assert!(
            !waiting_event_key("j", "12", 1).starts_with(&waiting_for_session_prefix("j", "1"))
        );
        assert!(waiting_event_key("j", "1", 1).starts_with(&waiting_for_session_prefix("j", "1")));
        assert!(waiting_for_params_key("j", 3, 9).starts_with(&waiting_for_params_prefix("j", 3)));
        assert!(!param_key("j", 1, "url").starts_with(&params_prefix("j", 2)));
    }
}
