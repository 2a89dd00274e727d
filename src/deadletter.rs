//! `dead-letter list | retry [ID...] | purge [ID...]`: the quarantine (bad input) and the dead
//! letters (events Segment refused for good) as the operator sees them.
//!
//! The same operations run in the agent (asked over the control socket, since a running agent
//! holds the spool) and in the CLI directly on the spool when no agent runs.
//!
//! Parked records (`unknown_message_channel = "park"`) are listed as kind `parked` with the
//! message ids they wait for, and `purge` drops them; `retry` leaves them to the automatic
//! pass of `crate::catalog::parking`, which maps them again whenever the catalog or the
//! mapping options change.
//!
//! `retry` puts dead letters back in the queue. For a quarantined record it parses the kept
//! line again with today's catalog and mapping: if it now gives events, they are spooled (the
//! dedupe index still applies) and the entry goes; if not, the entry stays with the new reason.
//! Lines longer than the 4 KiB kept, CSV rows (their header is not kept), and whole-file
//! problems cannot be retried this way: fix the source file and drop it in again. A line that
//! was over `watch.max_line_bytes` is never re-parsed from its kept start: the retry says
//! whether the configured limit would take it now.

use serde::{Deserialize, Serialize};

use crate::control::protocol::{Answer, DeadLetterRequest};
use crate::input::{self, Format};
use crate::leanplum::catalog::Catalog;
use crate::mapping::{MappingOptions, Output};
use crate::spool::{self, Chunk, NO_FILE, QuarantineKind, Spool, SpoolEvent};

/// One line of `dead-letter list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub id: u64,
    /// `quarantine` (bad input) or `dead-letter` (refused by Segment).
    pub kind: String,
    /// RFC 3339.
    pub time: String,
    pub file: Option<String>,
    pub line: Option<u64>,
    pub reason: String,
    pub status: Option<u16>,
    pub message_id: Option<String>,
}

/// One entry in full (`dead-letter show ID`): its line of `list`, and what is kept of it: the
/// record as read (bad input: the start of the line, at most 4 KiB; parked: the part of the
/// record that waits, as JSON) or the event as it would have been sent (dead letters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Shown {
    #[serde(flatten)]
    pub entry: Entry,
    /// `record` or `event`.
    pub content_kind: String,
    pub content: String,
}

/// The entry `id`, in full; `None` when there is none.
pub(crate) fn show(spool: &Spool, id: u64) -> Result<Option<Shown>, spool::Error> {
    let Some(entry) = list(spool)?.into_iter().find(|e| e.id == id) else {
        return Ok(None);
    };
    let (content_kind, content) = if entry.kind == "dead-letter" {
        let event = spool
            .letters()
            .dead_letters()?
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, d)| d.event)
            .unwrap_or_default();
        ("event", event)
    } else {
        let raw = spool
            .letters()
            .quarantine_entries()?
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, q)| q.raw)
            .unwrap_or_default();
        ("record", raw)
    };
    Ok(Some(Shown {
        entry,
        content_kind: content_kind.to_owned(),
        content,
    }))
}

/// `dead-letter show` for people.
pub(crate) fn render_shown(s: &Shown) -> String {
    let e = &s.entry;
    let mut out = format!(
        "id:      {}\nkind:    {}\ntime:    {}\n",
        e.id, e.kind, e.time
    );
    if let Some(f) = &e.file {
        out.push_str(&format!("file:    {f}\n"));
    }
    if let Some(l) = e.line {
        out.push_str(&format!("line:    {l}\n"));
    }
    if let Some(st) = e.status {
        out.push_str(&format!("status:  HTTP {st}\n"));
    }
    if let Some(m) = &e.message_id {
        out.push_str(&format!("message: {m}\n"));
    }
    out.push_str(&format!("reason:  {}\n", e.reason));
    if s.content.is_empty() {
        out.push_str(&format!("{}: (none kept)\n", s.content_kind));
    } else {
        out.push_str(&format!("{}:\n{}\n", s.content_kind, s.content));
    }
    out
}

/// `list --kind K --file F`: the entries of that kind (`quarantine`, `parked`, `dead-letter`,
/// `waiting`)
/// and file (its path as listed, or any path ending with it).
pub(crate) fn filter(entries: Vec<Entry>, kind: Option<&str>, file: Option<&str>) -> Vec<Entry> {
    entries
        .into_iter()
        .filter(|e| kind.is_none_or(|k| e.kind == k))
        .filter(|e| {
            file.is_none_or(|f| {
                e.file
                    .as_deref()
                    .is_some_and(|p| p == f || p.ends_with(&format!("/{f}")) || f.ends_with(p))
            })
        })
        .collect()
}

/// What `retry` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RetryOutcome {
    /// Dead letters put back in the queue.
    pub requeued: u64,
    /// Quarantined records that parsed and mapped this time (their events are spooled).
    pub recovered: u64,
    /// Quarantined records still bad, with why.
    pub still_bad: Vec<(u64, String)>,
}

pub(crate) fn list(spool: &Spool) -> Result<Vec<Entry>, spool::Error> {
    let mut out: Vec<Entry> = spool
        .letters()
        .quarantine_entries()?
        .into_iter()
        .map(|(id, q)| Entry {
            id,
            kind: match q.kind {
                QuarantineKind::Bad => "quarantine".into(),
                QuarantineKind::Parked => "parked".into(),
            },
            time: crate::event::rfc3339_millis(q.time_ms as i64),
            file: Some(q.file),
            line: (q.line > 0).then_some(q.line),
            reason: q.reason,
            status: None,
            message_id: (!q.message_ids.is_empty()).then(|| q.message_ids.join(",")),
        })
        .collect();
    out.extend(spool.letters().dead_letters()?.into_iter().map(|(id, d)| {
        Entry {
            id,
            kind: "dead-letter".into(),
            time: crate::event::rfc3339_millis(d.time_ms as i64),
            file: d
                .file_id
                .and_then(|f| spool.ledger().file(f).ok().flatten())
                .map(|r| r.path),
            line: None,
            reason: d.reason,
            status: d.status,
            message_id: Some(d.message_id),
        }
    }));
    out.sort_by_key(|e| e.id);
    out.extend(waiting_entries(spool)?);
    Ok(out)
}

/// Retries the entries `ids` (all when empty); see the module doc. `max_line_bytes` is the
/// configured `watch.max_line_bytes`.
/// The Leanplum CSV export records waiting in the join, one entry per job and per thing they
/// wait for (there can be millions of them). Id 0: they are not retried or purged by id; they
/// leave when what they wait for is read (or the job's tables are dropped in again).
fn waiting_entries(spool: &Spool) -> Result<Vec<Entry>, spool::Error> {
    let now = crate::event::rfc3339_millis(crate::clock::now_ms() as i64);
    Ok(spool
        .join_waiting_groups()?
        .into_iter()
        .map(|g| Entry {
            id: 0,
            kind: "waiting".into(),
            time: now.clone(),
            file: Some(match g.params_shard {
                Some(shard) => crate::leanplum::csv_export::parameters_file_name(&g.job, shard),
                None => format!("export-{}-outputsessions-*", g.job),
            }),
            line: None,
            reason: match g.params_shard {
                Some(_) => format!(
                    "{} message event(s) of CSV export job {} wait for their shard's eventparameters file",
                    g.records, g.job
                ),
                None => format!(
                    "{} message event(s) or impression(s) of CSV export job {} wait for their sessions (sessionId {}{})",
                    g.records,
                    g.job,
                    g.sample_sessions.join(", "),
                    if g.records as usize > g.sample_sessions.len() { ", ..." } else { "" }
                ),
            },
            status: None,
            message_id: None,
        })
        .collect())
}

/// Retries the entries `ids` (all when empty); see the module doc.
pub(crate) fn retry(
    spool: &Spool,
    ids: &[u64],
    catalog: &Catalog,
    opts: &MappingOptions,
    max_line_bytes: usize,
) -> Result<RetryOutcome, spool::Error> {
    let mut outcome = RetryOutcome {
        requeued: spool.letters().requeue_dead(ids)?,
        ..RetryOutcome::default()
    };
    for (id, mut q) in spool.letters().quarantine_entries()? {
        if !ids.is_empty() && !ids.contains(&id) {
            continue;
        }
        if q.kind == QuarantineKind::Parked {
            // Parked records go again whenever the catalog changes (`catalog::parking`).
            continue;
        }
        let reparsed = match input::over_limit_size(&q.reason) {
            Some(size) => Err(over_limit_advice(size, max_line_bytes)),
            None => reparse(q.raw.as_bytes(), catalog, opts),
        };
        match reparsed {
            Ok(events) => {
                spool.commit_file_chunk(&Chunk {
                    file_id: NO_FILE,
                    events,
                    ..Chunk::default()
                })?;
                spool.letters().set_quarantine(id, None)?;
                outcome.recovered += 1;
            }
            Err(why) => {
                q.reason = format!("retry failed: {why}");
                q.time_ms = crate::clock::now_ms();
                spool.letters().set_quarantine(id, Some(&q))?;
                outcome.still_bad.push((id, why));
            }
        }
    }
    Ok(outcome)
}

/// Why a line quarantined for its size cannot be retried, and what would read it.
fn over_limit_advice(size: u64, max_line_bytes: usize) -> String {
    if size > max_line_bytes as u64 {
        format!(
            "{}: only its first 4 KiB were kept; raise watch.max_line_bytes and drop the file in again",
            input::over_limit_reason("line", size, max_line_bytes)
        )
    } else {
        format!(
            "line of {} bytes was over watch.max_line_bytes when it was read (the limit is {} now), \
             and only its first 4 KiB were kept: drop the file in again",
            input::thousands(size),
            input::thousands(max_line_bytes as u64)
        )
    }
}

fn reparse(
    raw: &[u8],
    catalog: &Catalog,
    opts: &MappingOptions,
) -> Result<Vec<SpoolEvent>, String> {
    if raw.is_empty() {
        return Err(
            "no record was kept (a whole-file problem): fix the file and drop it in again".into(),
        );
    }
    let format = input::detect(raw).map_err(|e| e.to_string())?;
    if format == Format::EngagementCsv {
        return Err("a CSV row cannot be parsed without its file's header: fix the file and drop it in again".into());
    }
    let record = input::parse_record(format, &[], raw)?;
    let mut out = Output::default();
    crate::ingest::map_record(&record, catalog, opts, &mut out).map_err(|e| e.to_string())?;
    Ok(out
        .events
        .into_iter()
        .map(crate::ingest::spool_event)
        .collect())
}

/// Answers a `dead-letter` request, in the agent (over the control socket) or on a stopped
/// agent's spool alike; `Err` is the error for the operator. `max_line_bytes` is the
/// configured `watch.max_line_bytes`, for retries.
pub(crate) fn answer(
    request: &DeadLetterRequest,
    spool: &Spool,
    catalog: &Catalog,
    opts: &MappingOptions,
    max_line_bytes: usize,
) -> Result<Answer, String> {
    let answered = match request {
        DeadLetterRequest::List => list(spool).map(Answer::DeadLetters),
        DeadLetterRequest::Show { id } => match show(spool, *id) {
            Ok(Some(s)) => Ok(Answer::DeadLetter(Box::new(s))),
            Ok(None) => return Err(format!("no entry {id}")),
            Err(e) => Err(e),
        },
        DeadLetterRequest::Retry { ids } => {
            retry(spool, ids, catalog, opts, max_line_bytes).map(Answer::Retried)
        }
        DeadLetterRequest::Purge { ids } => spool.letters().purge(ids).map(Answer::Purged),
    };
    answered.map_err(|e| e.to_string())
}

/// `dead-letter list` for people: one entry per line.
pub(crate) fn render(entries: &[Entry]) -> String {
    if entries.is_empty() {
        return "no quarantined records and no dead letters\n".into();
    }
    let mut out = format!(
        "{:<20} {:<11} {:<24} {:<40} {}\n",
        "ID", "KIND", "TIME", "WHERE", "REASON"
    );
    for e in entries {
        let place = match (&e.file, e.line, &e.message_id) {
            (Some(f), Some(l), _) => format!("{f}:{l}"),
            (Some(f), None, Some(m)) => format!("{f} ({m})"),
            (Some(f), None, None) => f.clone(),
            (None, _, Some(m)) => m.clone(),
            (None, _, None) => "-".into(),
        };
        let reason = match e.status {
            Some(s) if !e.reason.contains(&s.to_string()) => format!("HTTP {s}: {}", e.reason),
            _ => e.reason.clone(),
        };
        out.push_str(&format!(
            "{:<20} {:<11} {:<24} {:<40} {}\n",
            e.id, e.kind, e.time, place, reason
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{FileRecord, QuarantineEntry};
    use std::path::Path;

    const LIMIT: usize = crate::config::DEFAULT_MAX_LINE_BYTES;

    fn catalog() -> Catalog {
        Catalog::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/catalog")).unwrap()
    }

    #[test]
    fn list_retry_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 8 << 20).unwrap();
        let fid = spool
            .ledger()
            .begin(
                Path::new("in/f"),
                &FileRecord {
                    path: "in/f".into(),
                    ..FileRecord::default()
                },
            )
            .unwrap();
        let good_line = r#"{"deviceId":"D1","time":1793534899.612,"states":[{"events":[{"eventId":77,"name":".m5680127476129675 Open","time":1793534900}]}]}"#;
        spool
            .commit_file_chunk(&Chunk {
                file_id: fid,
                events: vec![SpoolEvent::new(
                    "lp-e-1".into(),
                    br#"{"messageId":"lp-e-1"}"#.to_vec(),
                    None,
                )],
                quarantine: vec![
                    QuarantineEntry {
                        reason: "record has neither a user id nor a device id".into(),
                        file: "in/f".into(),
                        line: 2,
                        time_ms: 1,
                        raw: good_line.into(),
                        ..QuarantineEntry::default()
                    },
                    QuarantineEntry {
                        reason: "malformed".into(),
                        file: "in/f".into(),
                        line: 3,
                        time_ms: 2,
                        raw: "{oops".into(),
                        ..QuarantineEntry::default()
                    },
                ],
                ..Chunk::default()
            })
            .unwrap();
        let q = spool.queue().peek(None, 10, usize::MAX).unwrap().items;
        spool
            .queue()
            .dead_letter(&q, "HTTP 400: bad", Some(400))
            .unwrap();

        let entries = list(&spool).unwrap();
        assert_eq!(entries.len(), 3);
        let text = render(&entries);
        assert!(text.contains("in/f:2"), "{text}");
        assert!(text.contains("dead-letter"), "{text}");
        assert!(text.contains("lp-e-1"), "{text}");

        let out = retry(&spool, &[], &catalog(), &MappingOptions::default(), LIMIT).unwrap();
        assert_eq!(out.requeued, 1);
        assert_eq!(out.recovered, 1, "the quarantined line maps today");
        assert_eq!(out.still_bad.len(), 1);
        let queued: Vec<String> = spool
            .queue()
            .peek(None, 10, usize::MAX)
            .unwrap()
            .items
            .iter()
            .map(|q| String::from_utf8_lossy(&q.json).into_owned())
            .collect();
        assert_eq!(queued.len(), 2);
        assert!(queued[0].contains("lp-e-1"));
        assert!(queued[1].contains("lp-e-77"));
        assert_eq!(spool.queue().depth().unwrap().events, 2);

        let left = list(&spool).unwrap();
        assert_eq!(left.len(), 1);
        assert!(left[0].reason.starts_with("retry failed"), "{:?}", left[0]);
        assert_eq!(spool.letters().purge(&[]).unwrap(), 1);
        assert!(list(&spool).unwrap().is_empty());
    }

    #[test]
    fn requests_of_the_control_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 8 << 20).unwrap();
        let (c, o) = (catalog(), MappingOptions::default());
        let ask = |r| answer(&r, &spool, &c, &o, LIMIT);
        assert_eq!(
            ask(DeadLetterRequest::List),
            Ok(Answer::DeadLetters(vec![]))
        );
        assert_eq!(
            ask(DeadLetterRequest::Show { id: 5 }),
            Err("no entry 5".to_owned())
        );
        assert_eq!(
            ask(DeadLetterRequest::Purge { ids: vec![5] }),
            Ok(Answer::Purged(0))
        );
    }

    #[test]
    fn a_line_over_the_limit_is_not_reparsed_from_its_kept_start() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 8 << 20).unwrap();
        // Its kept start happens to be a whole session: still not what the line held.
        let start = r#"{"deviceId":"D1","time":1793534899.612,"states":[{"events":[{"eventId":78,"name":".m5680127476129675 Open","time":1793534900}]}]}"#;
        spool
            .letters()
            .quarantine(&QuarantineEntry {
                reason: input::over_limit_reason("line", 3_000_000, 1 << 20),
                file: "in/big".into(),
                line: 1,
                time_ms: 1,
                raw: start.into(),
                ..QuarantineEntry::default()
            })
            .unwrap();
        let (c, o) = (catalog(), MappingOptions::default());
        let out = retry(&spool, &[], &c, &o, 2 << 20).unwrap();
        assert_eq!(out.recovered, 0);
        assert_eq!(
            out.still_bad[0].1,
            "line of 3,000,000 bytes is over watch.max_line_bytes (2,097,152): only its first \
             4 KiB were kept; raise watch.max_line_bytes and drop the file in again"
        );
        // Recognized again after a failed retry rewrote the reason.
        let out = retry(&spool, &[], &c, &o, LIMIT).unwrap();
        assert_eq!(out.recovered, 0);
        assert!(
            out.still_bad[0].1.starts_with(
                "line of 3,000,000 bytes was over watch.max_line_bytes when it was read \
                 (the limit is 67,108,864 now)"
            ),
            "{}",
            out.still_bad[0].1
        );
        assert_eq!(spool.queue().depth().unwrap().events, 0, "nothing spooled");
        assert_eq!(list(&spool).unwrap().len(), 1);
    }
}
