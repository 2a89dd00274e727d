//! The `meta` tree: the format version, counters kept by us rather than counted (the queue's
//! `depth` and `live_bytes`, the id counter `next_id`, the dedupe log's `dedupe_next`, the
//! segments' committed end, the join's `join_waiting`), and the Leanplum catalog last fetched
//! (`catalog_cache`). Keys are ASCII names; see the table in the spool's `//!`.

use sled::transaction::TransactionalTree;

use super::store::Store;
use super::{Error, Spool, TxResult, decode_u64};

/// Bumped when the layout in the spool's `//!` changes; an older binary refuses a newer
/// spool, a newer one upgrades an older spool when an agent opens it (see `Spool::open`).
pub(crate) const FORMAT_VERSION: u32 = 3;

/// The format version, u32 BE.
pub(super) const FORMAT: &str = "format_version";
/// Events queued (u64 BE).
pub(super) const DEPTH: &str = "depth";
/// Bytes of the events queued (u64 BE).
pub(super) const LIVE_BYTES: &str = "live_bytes";
/// The cached Leanplum catalog (JSON, see `crate::catalog`).
const CATALOG_CACHE: &str = "catalog_cache";
/// The segments' committed end (see `segments.rs`).
pub(super) const SEGMENT_END: &str = "segment_end";
/// The dedupe log's next sequence number, committed with every log value: the table can never
/// rightly hold a later one (see `Spool::install_table`).
pub(super) const DEDUPE_NEXT: &str = "dedupe_next";

/// In a transaction: adds `delta` to the counter `name` (saturating at 0 and at `u64::MAX`).
pub(super) fn add(meta: &TransactionalTree, name: &str, delta: i64) -> TxResult<()> {
    let cur = meta.get(name)?.and_then(|v| decode_u64(&v)).unwrap_or(0);
    let new = if delta >= 0 {
        cur.saturating_add(delta as u64)
    } else {
        cur.saturating_sub(delta.unsigned_abs())
    };
    meta.insert(name, &new.to_be_bytes())?;
    Ok(())
}

/// The counter `name` (0 when never set).
pub(super) fn counter(s: &Store, name: &str) -> Result<u64, Error> {
    Ok(s.meta
        .get(name)
        .map_err(|e| s.sled_err(e))?
        .and_then(|v| decode_u64(&v))
        .unwrap_or(0))
}

/// The `meta` tree of an open spool (see [`Spool::meta`]).
pub(crate) struct Meta<'a> {
    pub(super) spool: &'a Spool,
}

impl Meta<'_> {
    /// The catalog last fetched from Leanplum (see `crate::catalog`), as it was stored.
    pub(crate) fn catalog_cache(&self) -> Result<Option<Vec<u8>>, Error> {
        let s = self.spool.store();
        Ok(s.meta
            .get(CATALOG_CACHE)
            .map_err(|e| s.sled_err(e))?
            .map(|v| v.to_vec()))
    }

    /// Replaces the cached catalog and flushes it: a restart while Leanplum is unreachable maps
    /// with it.
    pub(crate) fn store_catalog_cache(&self, bytes: &[u8]) -> Result<(), Error> {
        let s = self.spool.store();
        s.meta
            .insert(CATALOG_CACHE, bytes)
            .map_err(|e| s.sled_err(e))?;
        s.flush()
    }
}
