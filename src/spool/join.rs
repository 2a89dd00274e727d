//! The state of the CSV export join (see `crate::ingest::join`), kept in four trees of the
//! spool's database so a day's job of millions of sessions costs disk, not memory, and so it is
//! committed in the same transaction as the file offset that read it (see the spool's `//!`).
//!
//! The spool only stores and finds these keys; what the values mean is the join's business.
//! Keys are built here so their layout is documented in one place:
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `join_sessions` | job, sessionId | the session's identity and context: a `leanplum::Session` with no states, as JSON |
//! | `join_waiting` | `s`, job, sessionId, `e` eventId u64 BE / `x` experimentId u64 BE + variantId u64 BE | a message event or an impression waiting for its session, as JSON |
//! | `join_waiting` | `p`, job, shard u32 BE, eventId u64 BE | a message event whose session is known, waiting for its shard's `eventparameters`, as JSON |
//! | `join_params` | job, eventId u64 BE, parameter name | the parameter's value (text) |
//! | `join_jobs` | job, `p`, shard u32 BE | the file id of the shard's `eventparameters`, read to its end |
//!
//! A job or sessionId in a key is its length (u16 BE) then its bytes, so no id is a prefix of
//! another. `meta/join_waiting` (u64 BE) counts the keys of `join_waiting`, kept by the commits
//! that change them.

use super::{Error, Spool, decode_u64};

/// The tree a [`JoinOp`] writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinTree {
    Sessions,
    Waiting,
    Params,
    Jobs,
}

/// One write of the join's state, committed with a chunk (`value: None` removes the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOp {
    pub tree: JoinTree,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Keys and values read from a join tree.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// The `meta` key of the number of keys in `join_waiting`.
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

impl Spool {
    fn join_tree(s: &super::Store, tree: JoinTree) -> &sled::Tree {
        match tree {
            JoinTree::Sessions => &s.join_sessions,
            JoinTree::Waiting => &s.join_waiting,
            JoinTree::Params => &s.join_params,
            JoinTree::Jobs => &s.join_jobs,
        }
    }

    /// The value at `key` in a join tree.
    pub fn join_get(&self, tree: JoinTree, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let s = self.store();
        Spool::join_tree(&s, tree)
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| s.sled_err(e))
    }

    /// Up to `limit` keys and values under `prefix` in a join tree, in key order, starting after
    /// `after` when given.
    pub fn join_scan(
        &self,
        tree: JoinTree,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KeyValues, Error> {
        let s = self.store();
        let t = Spool::join_tree(&s, tree);
        let iter = match after {
            Some(a) => {
                let mut from = a.to_vec();
                from.push(0);
                t.range(from..)
            }
            None => t.range(prefix.to_vec()..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(|e| s.sled_err(e))?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// How many records wait in the join (for a session or for parameters).
    pub fn join_waiting_count(&self) -> Result<u64, Error> {
        let s = self.store();
        Ok(s.meta
            .get(JOIN_WAITING)
            .map_err(|e| s.sled_err(e))?
            .and_then(|v| decode_u64(&v))
            .unwrap_or(0))
    }

    /// Everything waiting in the join, grouped by job and by what it waits for. Walks the whole
    /// tree: for `dead-letter list`, not for every status.
    pub fn join_waiting_groups(&self) -> Result<Vec<WaitingGroup>, Error> {
        let s = self.store();
        let mut groups: Vec<WaitingGroup> = Vec::new();
        for item in s.join_waiting.iter() {
            let (k, _) = item.map_err(|e| s.sled_err(e))?;
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
        Ok(groups)
    }
}

/// Applies a chunk's join writes inside its transaction, keeping `meta/join_waiting` exact: a
/// key of `join_waiting` counts when it is inserted absent and when it is removed present.
pub(super) fn apply(
    ops: &[JoinOp],
    trees: [&sled::transaction::TransactionalTree; 4],
    meta: &sled::transaction::TransactionalTree,
) -> super::TxResult<()> {
    let [sessions, waiting, params, jobs] = trees;
    let mut delta = 0i64;
    for op in ops {
        let t = match op.tree {
            JoinTree::Sessions => sessions,
            JoinTree::Waiting => waiting,
            JoinTree::Params => params,
            JoinTree::Jobs => jobs,
        };
        let before = match &op.value {
            Some(v) => t.insert(op.key.as_slice(), v.as_slice())?,
            None => t.remove(op.key.as_slice())?,
        };
        if op.tree == JoinTree::Waiting {
            match (&op.value, before.is_some()) {
                (Some(_), false) => delta += 1,
                (None, true) => delta -= 1,
                _ => {}
            }
        }
    }
    if delta != 0 {
        super::add_meta(meta, JOIN_WAITING, delta)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
