//! Letters: what the spool keeps beside the queue for an operator to look at. The `quarantine`
//! tree holds bad input (SPEC section 8: a bad line, an unreadable file, a packet the disk
//! lost) and parked records (engagements of messages the catalog does not know yet, mapped
//! again at every catalog change, see `catalog::parking`); the `dead` tree holds events that
//! can never be delivered (refused by the ingest, or by Segment for good). Both are kept for
//! `spool.keep_bad_days` ([`Letters::drop_letters_before`]), listed, retried ([`Letters::requeue_dead`]
//! puts dead letters back in the queue) and purged by `dead-letter`.
//!
//! The records' field names are part of the on-disk format: add fields with
//! `#[serde(default)]`, never rename.

use serde::{Deserialize, Serialize};
use sled::transaction::{TransactionError, Transactional};

use super::ledger::{self, NO_FILE, Progress};
use super::{Error, Spool, decode_u64, queue};
use crate::clock::now_ms;

/// What a quarantine entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuarantineKind {
    /// Bad input (SPEC section 8).
    #[default]
    Bad,
    /// A record whose message the catalog does not know yet (`unknown_message_channel =
    /// "park"`): mapped again each time the catalog changes.
    Parked,
}

/// A bad record or a pointer to it (SPEC section 8), or a parked record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    #[serde(default)]
    pub kind: QuarantineKind,
    /// Parked: the message ids the catalog does not know (decimal).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub message_ids: Vec<String>,
    pub reason: String,
    /// Path relative to `watch.dir`.
    pub file: String,
    /// 1-based line, 0 when the problem is the whole file.
    pub line: u64,
    pub time_ms: u64,
    /// The start of the offending line (lossy UTF-8, at most 4 KiB); parked: the record itself,
    /// as JSON (`input::Record`), holding only its events that wait on the catalog.
    pub raw: String,
}

/// What a quarantine entry is, without its record: what `status` counts (the record, up to a
/// whole parked session, is skipped by the parser, not copied).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct QuarantineTag {
    #[serde(default)]
    pub kind: QuarantineKind,
    #[serde(default)]
    pub message_ids: Vec<String>,
}

/// An event that will never be delivered (refused by the ingest, over 32 KB, or 400 after
/// bisection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub reason: String,
    /// HTTP status, when Segment answered.
    pub status: Option<u16>,
    pub file_id: Option<u64>,
    pub time_ms: u64,
    pub message_id: String,
    /// The event JSON as it would have been sent.
    pub event: String,
}

/// A quarantine entry or dead letter as stored.
pub(super) fn encode<T: Serialize>(letter: &T) -> Vec<u8> {
    serde_json::to_vec(letter).unwrap_or_default()
}

/// The `messageId` of a serialized event, for dead-letter listings.
pub(super) fn message_id_of(json: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Id {
        #[serde(rename = "messageId")]
        message_id: String,
    }
    serde_json::from_slice::<Id>(json)
        .map(|i| i.message_id)
        .unwrap_or_default()
}

/// The quarantine and dead letters of an open spool (see [`Spool::letters`]).
pub struct Letters<'a> {
    pub(super) spool: &'a Spool,
}

impl Letters<'_> {
    /// Quarantines a problem that belongs to no file record (a file that cannot even be
    /// opened).
    pub fn quarantine(&self, entry: &QuarantineEntry) -> Result<(), Error> {
        let s = self.spool.store();
        let id = s.new_id()?;
        s.quarantine
            .insert(id.to_be_bytes(), encode(entry))
            .map_err(|e| s.sled_err(e))?;
        self.spool.quarantine_changed();
        s.flush()
    }

    /// Replaces a quarantine entry (its reason after a failed retry), or removes it (`None`).
    pub(crate) fn set_quarantine(
        &self,
        id: u64,
        entry: Option<&QuarantineEntry>,
    ) -> Result<(), Error> {
        let s = self.spool.store();
        let key = id.to_be_bytes();
        match entry {
            Some(e) => s.quarantine.insert(key, encode(e)).map(|_| ()),
            None => s.quarantine.remove(key).map(|_| ()),
        }
        .map_err(|e| s.sled_err(e))?;
        self.spool.quarantine_changed();
        s.flush()
    }

    /// Quarantine entries, oldest first.
    pub(crate) fn quarantine_entries(&self) -> Result<Vec<(u64, QuarantineEntry)>, Error> {
        let s = self.spool.store();
        s.json_entries(&s.quarantine, "quarantine entry")
    }

    /// The kind and message ids of every quarantine entry (for counts), oldest first.
    pub(crate) fn quarantine_tags(&self) -> Result<Vec<QuarantineTag>, Error> {
        let s = self.spool.store();
        Ok(s.json_entries(&s.quarantine, "quarantine entry")?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// Dead letters, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<(u64, DeadLetter)>, Error> {
        let s = self.spool.store();
        s.json_entries(&s.dead, "dead letter")
    }

    /// Puts dead letters back in the queue (after the operator fixed what Segment refused),
    /// at the end, in id order. `ids` empty means all. Returns how many went back.
    pub(crate) fn requeue_dead(&self, ids: &[u64]) -> Result<u64, Error> {
        let mut w = self.spool.writer();
        let s = self.spool.store();
        let letters: Vec<(u64, DeadLetter)> = s
            .json_entries(&s.dead, "dead letter")?
            .into_iter()
            .filter(|(id, _)| ids.is_empty() || ids.contains(id))
            .collect();
        let now = now_ms();
        // Packets of letters of one file each, in id order.
        let mut packets = Vec::new();
        for group in letters.chunk_by(|a, b| a.1.file_id == b.1.file_id) {
            let file_id = group[0].1.file_id.unwrap_or(NO_FILE);
            let events: Vec<&[u8]> = group.iter().map(|(_, l)| l.event.as_bytes()).collect();
            queue::packets(now, file_id, &events, &mut packets);
        }
        let appended = w.append(&packets)?;
        let bytes: u64 = letters.iter().map(|(_, l)| l.event.len() as u64).sum();
        let committed = appended.sync().and_then(|()| {
            (&s.queue, &s.dead, &s.meta, &s.files)
                .transaction(|(queue, dead, meta, files)| {
                    queue::insert(queue, meta, &appended, letters.len() as u64, bytes)?;
                    for (id, letter) in &letters {
                        dead.remove(&id.to_be_bytes())?;
                        let file_id = letter.file_id.unwrap_or(NO_FILE);
                        ledger::progress(files, file_id, &Progress::EventsRequeued(1))?;
                    }
                    Ok(())
                })
                .map_err(|e: TransactionError<String>| s.tx_err(e))?;
            s.flush()
        });
        if let Err(e) = committed {
            queue::abandon(&self.spool.queue_state, &mut w);
            return Err(e);
        }
        queue::committed(&self.spool.queue_state, &mut w, appended);
        Ok(letters.len() as u64)
    }

    /// Drops quarantine entries and dead letters for good. `ids` empty means all of them.
    pub(crate) fn purge(&self, ids: &[u64]) -> Result<u64, Error> {
        let s = self.spool.store();
        let mut removed = 0;
        for tree in [&s.quarantine, &s.dead] {
            let mut batch = sled::Batch::default();
            for item in tree.iter() {
                let (k, _) = item.map_err(|e| s.sled_err(e))?;
                if ids.is_empty() || decode_u64(&k).is_some_and(|id| ids.contains(&id)) {
                    batch.remove(k);
                    removed += 1;
                }
            }
            tree.apply_batch(batch).map_err(|e| s.sled_err(e))?;
        }
        self.spool.quarantine_changed();
        s.flush()?;
        Ok(removed)
    }

    /// Drops quarantined (bad and parked) entries and dead letters recorded before `cutoff_ms`
    /// (`spool.keep_bad_days`); returns how many of each went.
    pub(crate) fn drop_letters_before(&self, cutoff_ms: u64) -> Result<(u64, u64), Error> {
        #[derive(serde::Deserialize)]
        struct Stamp {
            time_ms: u64,
        }
        let s = self.spool.store();
        let mut dropped = [0u64; 2];
        for (n, tree) in [&s.quarantine, &s.dead].into_iter().enumerate() {
            let mut batch = sled::Batch::default();
            for item in tree.iter() {
                let (k, v) = item.map_err(|e| s.sled_err(e))?;
                // An entry whose time cannot be read is kept: better listed than lost unseen.
                if serde_json::from_slice::<Stamp>(&v).is_ok_and(|st| st.time_ms < cutoff_ms) {
                    batch.remove(k);
                    dropped[n] += 1;
                }
            }
            tree.apply_batch(batch).map_err(|e| s.sled_err(e))?;
        }
        if dropped[0] > 0 {
            self.spool.quarantine_changed();
        }
        if dropped != [0, 0] {
            s.flush()?;
        }
        Ok((dropped[0], dropped[1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_older_than_the_cutoff_are_dropped_and_newer_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 8 << 20).unwrap();
        for (id, time_ms) in [(1u64, 1_000u64), (2, 5_000)] {
            let letter = DeadLetter {
                reason: "HTTP 400".into(),
                status: Some(400),
                file_id: None,
                time_ms,
                message_id: format!("m{id}"),
                event: "{}".into(),
            };
            spool
                .store()
                .dead
                .insert(id.to_be_bytes(), serde_json::to_vec(&letter).unwrap())
                .unwrap();
            spool
                .letters()
                .quarantine(&QuarantineEntry {
                    reason: "bad".into(),
                    time_ms,
                    ..QuarantineEntry::default()
                })
                .unwrap();
        }
        assert_eq!(spool.letters().drop_letters_before(3_000).unwrap(), (1, 1));
        assert_eq!(spool.letters().dead_letters().unwrap().len(), 1);
        assert_eq!(spool.letters().dead_letters().unwrap()[0].1.time_ms, 5_000);
        assert_eq!(spool.letters().quarantine_entries().unwrap().len(), 1);
        assert_eq!(spool.letters().drop_letters_before(3_000).unwrap(), (0, 0));
    }
}
