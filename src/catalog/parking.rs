//! Parked records (`unknown_message_channel = "park"`, SPEC section 5): an engagement of a
//! message the catalog does not know is neither guessed nor dropped. Its record (a session cut
//! down to those engagements, or the engagement record) goes to the quarantine as kind
//! `parked`, with the message ids it waits for; every time the catalog changes (a file
//! reload, an API refresh, a lookup answer, a SIGHUP) each parked record is mapped again. What
//! maps then is spooled, with the `messageId`s it would have had at first (the dedupe index
//! keeps a record mapped twice from being sent twice); the rest stays parked, cut down to what
//! still waits. `dead-letter list` shows parked records, `dead-letter purge` drops them, and
//! `spool.keep_bad_days` bounds them like the rest of the quarantine.
//!
//! Crash story: a record's events are committed before its entry is removed or cut down, so a
//! crash in between maps it again at the next change, and the dedupe index skips what was
//! spooled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::CatalogService;
use crate::clock::now_ms;
use crate::input::Record;
use crate::leanplum::Id;
use crate::mapping::{MappingState, Output, SharedMapping, parked_part};
use crate::spool::{self, Chunk, NO_FILE, QuarantineEntry, QuarantineKind, QuarantineTag, Spool};
use crate::stats::Stats;

/// How many message ids `status` names.
const TOP_IDS: usize = 5;
/// Events per spool commit when unparking.
const COMMIT_EVENTS: usize = 2000;

/// The quarantine entry that parks `record`, whose mapping held back engagements of `ids`.
pub(crate) fn entry(record: &Record, ids: &[Id], file: &str, line: u64) -> QuarantineEntry {
    let kept = parked_part(record, ids);
    let names = id_names(ids);
    QuarantineEntry {
        kind: QuarantineKind::Parked,
        reason: format!(
            "parked: {} engagement(s) of message(s) {} not in the catalog; sent once the \
             catalog knows them",
            ids.len(),
            names.join(", ")
        ),
        message_ids: names,
        file: file.to_owned(),
        line,
        time_ms: now_ms(),
        raw: serde_json::to_string(&kept).unwrap_or_default(),
    }
}

/// What one pass over the parked records did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Remapped {
    /// Records whose engagements all mapped: their entries are gone.
    pub released: u64,
    /// Events spooled (new to the dedupe index).
    pub events: u64,
    /// Records still waiting.
    pub still_parked: u64,
}

/// Maps every parked record again with `mapping`; see the module doc.
pub(crate) fn remap(spool: &Spool, mapping: &MappingState) -> Result<Remapped, spool::Error> {
    let mut done = Remapped::default();
    let mut events = Vec::new();
    // Entry changes wait for the commit of the events they release.
    let mut changes: Vec<(u64, Option<QuarantineEntry>)> = Vec::new();
    let flush = |events: &mut Vec<_>, changes: &mut Vec<(u64, Option<QuarantineEntry>)>| {
        let mut spooled = 0;
        if !events.is_empty() {
            spooled = spool
                .commit_file_chunk(&Chunk {
                    file_id: NO_FILE,
                    events: std::mem::take(events),
                    ..Chunk::default()
                })?
                .spooled;
        }
        for (id, change) in changes.drain(..) {
            spool.letters().set_quarantine(id, change.as_ref())?;
        }
        Ok::<u64, spool::Error>(spooled)
    };
    for (id, q) in spool.letters().quarantine_entries()? {
        if q.kind != QuarantineKind::Parked {
            continue;
        }
        let Ok(record) = serde_json::from_str::<Record>(&q.raw) else {
            // Written by this module, so only damage gets here: it stays, visible.
            done.still_parked += 1;
            continue;
        };
        let mut out = Output::default();
        if crate::ingest::map_record(&record, &mapping.catalog, &mapping.opts, &mut out).is_err() {
            done.still_parked += 1;
            continue;
        }
        if out.events.is_empty() && id_names(&out.parked) == q.message_ids {
            // Nothing changed for this record.
            done.still_parked += 1;
            continue;
        }
        events.extend(out.events.into_iter().map(crate::ingest::spool_event));
        if out.parked.is_empty() {
            done.released += 1;
            changes.push((id, None));
        } else {
            done.still_parked += 1;
            let mut rest = entry(&record, &out.parked, &q.file, q.line);
            rest.time_ms = q.time_ms;
            changes.push((id, Some(rest)));
        }
        if events.len() >= COMMIT_EVENTS {
            done.events += flush(&mut events, &mut changes)?;
        }
    }
    done.events += flush(&mut events, &mut changes)?;
    Ok(done)
}

/// `ids` as an entry lists them: decimal, sorted, once each.
fn id_names(ids: &[Id]) -> Vec<String> {
    let mut names: Vec<String> = ids.iter().map(Id::to_string).collect();
    names.sort();
    names.dedup();
    names
}

/// Parked records in `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ParkedSummary {
    /// Records parked now.
    pub records: u64,
    /// The message ids most records wait for, with their counts, most first.
    pub top: Vec<ParkedMessage>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ParkedMessage {
    pub message_id: String,
    pub records: u64,
}

/// Counts the parked records and their message ids (one walk of the quarantine).
pub(crate) fn summary(spool: &Spool) -> Result<ParkedSummary, spool::Error> {
    Ok(summarize(spool.letters().quarantine_tags()?))
}

/// The last [`summary`] of a running agent's spool, with the spool's count of quarantine
/// writes it was read at: while no write has been made since, it is still exact, and a walk of
/// the whole quarantine is saved (0.6 s at 200,000 parked records, for every `status`, the
/// metrics and systemd's `STATUS=` line every 10 s).
#[derive(Debug, Default)]
pub(crate) struct SummaryMemo(std::sync::Mutex<Option<(u64, ParkedSummary)>>);

impl SummaryMemo {
    /// [`summary`] of `spool`, from the memo when the quarantine has not changed since.
    pub(crate) fn summary(&self, spool: &Spool) -> Result<ParkedSummary, spool::Error> {
        let mut memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Read before the walk: a write during it leaves the memo behind the count.
        let changes = spool.quarantine_changes();
        if let Some((at, s)) = &*memo
            && *at == changes
        {
            return Ok(s.clone());
        }
        let s = summary(spool)?;
        *memo = Some((changes, s.clone()));
        Ok(s)
    }
}

/// [`summary`] of tags already read.
pub(crate) fn summarize(tags: Vec<QuarantineTag>) -> ParkedSummary {
    let mut by_id: BTreeMap<String, u64> = BTreeMap::new();
    let mut records = 0;
    for q in tags {
        if q.kind == QuarantineKind::Parked {
            records += 1;
            for id in q.message_ids {
                *by_id.entry(id).or_insert(0) += 1;
            }
        }
    }
    let mut top: Vec<ParkedMessage> = by_id
        .into_iter()
        .map(|(message_id, records)| ParkedMessage {
            message_id,
            records,
        })
        .collect();
    top.sort_by(|a, b| {
        b.records
            .cmp(&a.records)
            .then(a.message_id.cmp(&b.message_id))
    });
    top.truncate(TOP_IDS);
    ParkedSummary { records, top }
}

/// Maps the parked records again each time the catalog (or the mapping options) change, until
/// `stop`. A pass runs at start too: the catalog may have changed while the agent was down.
pub(crate) async fn run(
    spool: Arc<Spool>,
    service: Arc<CatalogService>,
    mapping: SharedMapping,
    stats: Arc<Stats>,
    drain_wake: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut seen = None;
    loop {
        let generation = service.generation();
        if seen != Some(generation) {
            seen = Some(generation);
            let (spool, state) = (spool.clone(), crate::mapping::current(&mapping));
            match tokio::task::spawn_blocking(move || remap(&spool, &state)).await {
                Ok(Ok(r)) => {
                    if r.events > 0 || r.released > 0 {
                        tracing::info!(
                            released = r.released,
                            events = r.events,
                            still_parked = r.still_parked,
                            "parked records mapped again after a catalog change"
                        );
                        Stats::add(&stats.events_spooled, r.events);
                        drain_wake.notify_one();
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot map the parked records again; retried at the next catalog change");
                }
                Err(e) => tracing::error!(error = %e, "mapping the parked records again panicked"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leanplum::catalog::{Catalog, Message, MessageKind};
    use crate::mapping::MappingOptions;
    use crate::spool::FileRecord;
    use std::path::Path;

    const LATE: u64 = 9_100_000_000_000_000_001;

    fn state(messages: &[(u64, &str)]) -> MappingState {
        MappingState {
            catalog: Arc::new(Catalog::from_parts(
                messages
                    .iter()
                    .map(|(id, name)| Message {
                        id: Id(*id),
                        channel: MessageKind::Email,
                        name: Some((*name).into()),
                        subject: None,
                        campaign_id: None,
                        campaign_name: None,
                    })
                    .collect(),
                Vec::new(),
            )),
            opts: MappingOptions::default(),
        }
    }

    fn session() -> Record {
        let line = format!(
            r#"{{"deviceId":"D1","userId":"u1","time":1793534899.612,"locale":"en_US","states":[{{"events":[
              {{"eventId":11,"name":".m{LATE} Open","time":1793534900.5}},
              {{"eventId":12,"name":"Add To Cart","time":1793534901}},
              {{"eventId":13,"name":".m{LATE} Click","time":1793534902,"parameters":{{"url":"https://x/y","index":3}}}}]}}]}}"#
        );
        crate::input::parse_record(crate::input::Format::Sessions, &[], line.as_bytes()).unwrap()
    }

    #[test]
    fn a_memoized_summary_follows_every_write_to_the_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 8 << 20).unwrap();
        let memo = SummaryMemo::default();
        let parked = |message: u64, time_ms: u64| QuarantineEntry {
            kind: QuarantineKind::Parked,
            message_ids: vec![message.to_string()],
            time_ms,
            ..QuarantineEntry::default()
        };
        let records = || memo.summary(&spool).unwrap().records;
        assert_eq!(records(), 0);
        spool.letters().quarantine(&parked(1, now_ms())).unwrap();
        assert_eq!(records(), 1);
        // A commit's parked records.
        let fid = spool
            .ledger()
            .begin(Path::new("f"), &FileRecord::default())
            .unwrap();
        spool
            .commit_file_chunk(&Chunk {
                file_id: fid,
                quarantine: vec![parked(2, now_ms()), parked(2, now_ms())],
                ..Chunk::default()
            })
            .unwrap();
        let s = memo.summary(&spool).unwrap();
        assert_eq!((s.records, s.top[0].message_id.as_str()), (3, "2"));
        // Nothing written since: the memo answers, exactly.
        let changes = spool.quarantine_changes();
        assert_eq!(memo.summary(&spool).unwrap(), s);
        assert_eq!(spool.quarantine_changes(), changes);
        // `spool.keep_bad_days`.
        spool.letters().quarantine(&parked(3, 1_000)).unwrap();
        assert_eq!(records(), 4);
        assert_eq!(spool.letters().drop_letters_before(2_000).unwrap(), (1, 0));
        assert_eq!(records(), 3);
        // A record cut down (replaced), then released (removed).
        let (id, mut e) = spool.letters().quarantine_entries().unwrap().remove(0);
        e.message_ids = vec!["9".into()];
        spool.letters().set_quarantine(id, Some(&e)).unwrap();
        let s = memo.summary(&spool).unwrap();
        assert!(s.top.iter().any(|m| m.message_id == "9"), "{s:?}");
        spool.letters().set_quarantine(id, None).unwrap();
        assert_eq!(records(), 2);
        // `dead-letter purge`.
        spool.letters().purge(&[]).unwrap();
        assert_eq!(records(), 0);
    }

    #[test]
    fn a_parked_session_maps_once_its_message_is_known_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 8 << 20).unwrap();
        let fid = spool
            .ledger()
            .begin(
                Path::new("f"),
                &FileRecord {
                    path: "f".into(),
                    ..FileRecord::default()
                },
            )
            .unwrap();
        let record = session();
        let mut out = Output::default();
        let unknown = state(&[]);
        crate::ingest::map_record(&record, &unknown.catalog, &unknown.opts, &mut out).unwrap();
        assert!(out.events.is_empty());
        assert_eq!(out.parked, [Id(LATE), Id(LATE)]);
        spool
            .commit_file_chunk(&Chunk {
                file_id: fid,
                quarantine: vec![entry(&record, &out.parked, "f", 1)],
                ..Chunk::default()
            })
            .unwrap();
        let s = summary(&spool).unwrap();
        assert_eq!(s.records, 1);
        assert_eq!(s.top[0].message_id, LATE.to_string());

        // The catalog still does not know it: nothing changes.
        let r = remap(&spool, &unknown).unwrap();
        assert_eq!((r.released, r.events, r.still_parked), (0, 0, 1));

        // Now it does: both engagements spooled, with the session's context, and the entry gone.
        let r = remap(&spool, &state(&[(LATE, "Late")])).unwrap();
        assert_eq!((r.released, r.events, r.still_parked), (1, 2, 0));
        assert_eq!(summary(&spool).unwrap().records, 0);
        let queued = spool.queue().peek(None, 10, usize::MAX).unwrap().items;
        let events: Vec<serde_json::Value> = queued
            .iter()
            .map(|q| serde_json::from_slice(&q.json).unwrap())
            .collect();
        assert_eq!(events[0]["messageId"], "lp-e-11");
        assert_eq!(events[0]["properties"]["email_subject"], "Late");
        assert_eq!(events[0]["timestamp"], "2026-11-01T12:08:20.500Z");
        assert_eq!(events[0]["context"]["locale"], "en_US");
        assert_eq!(events[1]["messageId"], "lp-e-13");
        assert_eq!(events[1]["properties"]["link_url"], "https://x/y");
        assert_eq!(events[1]["properties"]["link_id"], 3);
    }
}
