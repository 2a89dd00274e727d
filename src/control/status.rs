//! The status report (SPEC section 9): what `status` prints, what `status --json` emits, what
//! the control socket answers and what systemd's `STATUS=` line summarises. Building and
//! rendering it is pure apart from reading the spool; the socket lives in [`super::socket`].
//!
//! # Fields (`status --json`)
//!
//! The JSON field names are a stable interface: scripts and monitoring parse them. Add fields,
//! never rename or remove one. "Running" means the figure a live agent reports; "stopped" means
//! what `status` reads from the spool when no agent answers on the control socket.
//!
//! | field | type | meaning |
//! | --- | --- | --- |
//! | `state` | string | `running`, `backing_off` (Segment or the network failing; retrying), `auth_failed` (401/403: check the write key), `rejected` (Segment refuses the requests for good), `spool_full` (`spool.max_bytes` reached: reading paused, draining goes on), `stopped` (no agent answered) |
//! | `version` | string | the agent's version (stopped: the version of the `status` binary) |
//! | `pid` | integer or null | the agent's process id; null when stopped |
//! | `uptime_secs` | integer or null | seconds since the agent started; null when stopped |
//! | `endpoint` | string | the Segment endpoint (`segment.endpoint`), without any credentials; never the write key |
//! | `spool_events` | integer | events queued for delivery |
//! | `spool_bytes` | integer | bytes of event JSON queued (what `spool.max_bytes` limits) |
//! | `oldest_event_age_secs` | integer or null | how long the oldest queued event has waited; null when the queue is empty |
//! | `events_read` | integer | records (sessions, engagement rows) read from files since start; 0 when stopped |
//! | `events_spooled` | integer | events committed to the spool since start; 0 when stopped |
//! | `events_delivered` | integer | events Segment accepted since start; 0 when stopped |
//! | `duplicates_skipped` | integer | events not spooled because their `messageId` was seen within `spool.dedupe_window_days`, since start; 0 when stopped |
//! | `skipped` | integer | engagements deliberately not sent (SPEC section 5), since start; the sum of `skipped_by_action`; 0 when stopped |
//! | `skipped_by_action` | object | `skipped` by Leanplum action name, e.g. `{"Held Back": 3}`; empty when stopped |
//! | `quarantined` | integer | bad records put in quarantine: since start when running, all entries held by the spool when stopped |
//! | `dead_lettered` | integer | events Segment will never take: since start when running, all dead letters held by the spool when stopped |
//! | `files_seen` | integer | input files the spool knows (all of them, not only since start) |
//! | `files_in_progress` | integer | files being read, or waiting to be read on because they may grow |
//! | `files_done` | integer | files read to the end (their events are in the spool or delivered) |
//! | `files_failed` | integer | files that could not be read (retried when they change) |
//! | `last_success` | string or null | RFC 3339 time of the last batch Segment accepted; null if none since start |
//! | `last_error` | string or null | the last delivery error, as one line |
//! | `current_backoff_ms` | integer or null | the retry wait in force now; null when not waiting |
//! | `last_rejected_status` | integer or null | HTTP status of the last request Segment refused for good (`rejected`, `auth_failed`) |
//! | `notes` | array of strings | facts the operator should know, in plain words (e.g. a corrupt spool moved aside) |
//! | `parked` | integer | records parked until the catalog knows their message (`unknown_message_channel = "park"`), now |
//! | `parked_messages` | array | the message ids most parked records wait for, most first (at most 5): `message_id`, `records` |
//! | `waiting` | integer | Leanplum CSV export records waiting in the join, now: message events and impressions whose `sessions` row has not been read yet, and message events whose shard's `eventparameters` file has not (see `dead-letter list`, kind `waiting`) |
//! | `concurrency_mode` | string or null | `adaptive` or `fixed` (`segment.concurrency`); null when stopped |
//! | `concurrency_limit` | integer or null | requests that may be in flight now: the fixed number, or where the adaptive controller stands (starts at 1, grows by one per round trip while round trips stay flat, halves on 429, 5xx, timeouts or a rising round trip); null when stopped |
//! | `max_concurrency` | integer or null | the most the limit can be: the fixed number, or `segment.max_concurrency`; null when stopped |
//! | `in_flight` | integer | requests in flight now; 0 when stopped |
//! | `rtt_ms` | number or null | the smoothed round trip of a request to Segment in milliseconds (send to answer, compression included; an EWMA over windows of about one round trip); null before the first answer and when stopped |
//! | `max_events_per_sec` | integer or null | `segment.max_events_per_sec` in force, 0 for unlimited; null when stopped |
//! | `catalog` | object or null | the message and A/B-test catalog (null when stopped): `source` (`files`, `files+api`, `files+cache`), `messages`, `abtests`, `fetched_at` and `age_secs` (when the API part was fetched), `last_refresh` (last attempt), `last_error`, `files_error` (why the catalog files on disk were refused, naming the file; the last good ones are in use; null when they are good), and `waiting`: what reading waits for from Leanplum, each with `kind` (`message`: a `getMessage` lookup; `abtest`: the next `getAbTests`), `id`, `since`, `files` (whose reading waits on it) and `reason` |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::segment::drain::{DeliveryState, DrainStatus};
use crate::spool::{self, FileStatus, Spool};
use crate::stats::Stats;

/// The `state` of an agent that is not running.
pub(crate) const STATE_STOPPED: &str = "stopped";

/// One status report; see the module doc for what each field means.
///
/// `#[serde(default)]`: during a package upgrade the new `status` binary talks to the old
/// daemon still running, so a field the daemon does not know yet must not fail the parse.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct StatusReport {
    pub state: String,
    pub version: String,
    pub pid: Option<u32>,
    pub uptime_secs: Option<u64>,
    pub endpoint: String,
    pub spool_events: u64,
    pub spool_bytes: u64,
    pub oldest_event_age_secs: Option<u64>,
    pub events_read: u64,
    pub events_spooled: u64,
    pub events_delivered: u64,
    pub duplicates_skipped: u64,
    pub skipped: u64,
    pub skipped_by_action: BTreeMap<String, u64>,
    pub quarantined: u64,
    pub dead_lettered: u64,
    pub files_seen: u64,
    pub files_in_progress: u64,
    pub files_done: u64,
    pub files_failed: u64,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    pub current_backoff_ms: Option<u64>,
    pub last_rejected_status: Option<u16>,
    pub notes: Vec<String>,
    pub catalog: Option<crate::catalog::CatalogStatus>,
    /// Records parked until the catalog knows their messages, and the ids most wait for.
    pub parked: u64,
    pub parked_messages: Vec<crate::catalog::parking::ParkedMessage>,
    /// CSV export records waiting in the join for their session or their parameters.
    pub waiting: u64,
    /// How many requests may be in flight, and how long they take.
    pub concurrency_mode: Option<String>,
    pub concurrency_limit: Option<u64>,
    pub max_concurrency: Option<u64>,
    pub in_flight: u64,
    pub rtt_ms: Option<f64>,
    pub max_events_per_sec: Option<u64>,
}

impl StatusReport {
    /// A short human summary (about a dozen aligned "label: value" lines, the state first), as
    /// `status` prints it.
    pub(crate) fn render_human(&self) -> String {
        self.render_human_at(Utc::now())
    }

    /// One line for systemd's `STATUS=`, e.g.
    /// `running: 1234 queued, 5678 delivered, last success 12s ago`.
    pub(crate) fn one_line(&self) -> String {
        self.one_line_at(Utc::now())
    }

    /// `now` is a parameter so tests do not depend on the clock.
    fn render_human_at(&self, now: DateTime<Utc>) -> String {
        let mut rows: Vec<(&str, String)> = Vec::new();
        rows.push(("state", self.state.clone()));
        let mut version = self.version.clone();
        match (self.pid, self.uptime_secs) {
            (Some(pid), Some(up)) => {
                let _ = write!(version, " (pid {pid}, up {})", fmt_duration(up));
            }
            (Some(pid), None) => {
                let _ = write!(version, " (pid {pid})");
            }
            (None, Some(up)) => {
                let _ = write!(version, " (up {})", fmt_duration(up));
            }
            (None, None) => {}
        }
        rows.push(("version", version));
        rows.push(("endpoint", self.endpoint.clone()));
        let mut queued = format!(
            "{} events, {}",
            self.spool_events,
            fmt_bytes(self.spool_bytes)
        );
        if let Some(age) = self.oldest_event_age_secs {
            let _ = write!(queued, ", oldest {}", fmt_duration(age));
        }
        rows.push(("queued", queued));
        rows.push((
            "events",
            format!(
                "{} read, {} spooled, {} delivered",
                self.events_read, self.events_spooled, self.events_delivered
            ),
        ));
        let mut skipped = format!(
            "{} duplicates, {} by action",
            self.duplicates_skipped, self.skipped
        );
        if !self.skipped_by_action.is_empty() {
            let by: Vec<String> = self
                .skipped_by_action
                .iter()
                .map(|(action, n)| format!("{action}: {n}"))
                .collect();
            let _ = write!(skipped, " ({})", by.join(", "));
        }
        rows.push(("skipped", skipped));
        rows.push((
            "bad",
            format!(
                "{} quarantined, {} dead-lettered",
                self.quarantined, self.dead_lettered
            ),
        ));
        if self.parked > 0 {
            let ids: Vec<String> = self
                .parked_messages
                .iter()
                .map(|m| format!("{} ({})", m.message_id, m.records))
                .collect();
            rows.push((
                "parked",
                format!(
                    "{} records wait for messages not in the catalog: {}",
                    self.parked,
                    ids.join(", ")
                ),
            ));
        }
        if self.waiting > 0 {
            rows.push((
                "csv join",
                format!(
                    "{} CSV export records wait for their sessions or parameters (dead-letter list)",
                    self.waiting
                ),
            ));
        }
        rows.push((
            "files",
            format!(
                "{} seen, {} in progress, {} done, {} failed",
                self.files_seen, self.files_in_progress, self.files_done, self.files_failed
            ),
        ));
        let last_success = match &self.last_success {
            Some(at) => match ago(at, now) {
                Some(secs) => format!("{at} ({} ago)", fmt_duration(secs)),
                None => at.clone(),
            },
            None => "none".to_string(),
        };
        rows.push(("last success", last_success));
        if let Some(e) = &self.last_error {
            rows.push(("last error", one_line_text(e, usize::MAX)));
        }
        if let Some(ms) = self.current_backoff_ms {
            rows.push(("backoff", fmt_duration_ms(ms)));
        }
        if let Some(code) = self.last_rejected_status {
            rows.push(("last rejected", format!("HTTP {code}")));
        }
        if let (Some(mode), Some(limit)) = (&self.concurrency_mode, self.concurrency_limit) {
            let mut line = match (mode.as_str(), self.max_concurrency) {
                ("adaptive", Some(max)) => format!("adaptive, limit {limit} of {max}"),
                _ => format!("{mode}, limit {limit}"),
            };
            let _ = write!(line, ", {} in flight", self.in_flight);
            if let Some(rtt) = self.rtt_ms {
                let _ = write!(line, ", round trip {rtt:.1} ms");
            }
            rows.push(("concurrency", line));
        }
        if let Some(rate) = self.max_events_per_sec.filter(|r| *r > 0) {
            rows.push(("rate limit", format!("{rate} events/s")));
        }
        if let Some(c) = &self.catalog {
            let mut line = format!(
                "{} messages, {} A/B tests from {}",
                c.messages, c.abtests, c.source
            );
            if let Some(age) = c.age_secs {
                let _ = write!(line, ", fetched {} ago", fmt_duration(age));
            }
            rows.push(("catalog", line));
            if let Some(e) = &c.files_error {
                rows.push((
                    "catalog files",
                    format!(
                        "refused, the last good catalog is in use: {}",
                        one_line_text(e, usize::MAX)
                    ),
                ));
            }
            if let Some(e) = &c.last_error {
                rows.push(("catalog error", one_line_text(e, usize::MAX)));
            }
            for w in &c.waiting {
                rows.push((
                    "waiting",
                    format!(
                        "{} {} since {} ({}): {}",
                        w.kind,
                        w.id,
                        w.since,
                        one_line_text(&w.reason, 200),
                        w.files.join(", ")
                    ),
                ));
            }
        }
        for note in &self.notes {
            rows.push(("note", one_line_text(note, usize::MAX)));
        }

        let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0) + 1;
        let mut out = String::new();
        for (label, value) in rows {
            let _ = writeln!(out, "{:<width$} {value}", format!("{label}:"));
        }
        out
    }

    fn one_line_at(&self, now: DateTime<Utc>) -> String {
        let mut line = format!(
            "{}: {} queued, {} delivered",
            self.state, self.spool_events, self.events_delivered
        );
        match self.last_success.as_deref().and_then(|at| ago(at, now)) {
            Some(secs) => {
                let _ = write!(line, ", last success {} ago", fmt_duration(secs));
            }
            None if self.last_success.is_none() => line.push_str(", no delivery yet"),
            None => {}
        }
        if let Some(ms) = self.current_backoff_ms {
            let _ = write!(line, ", retry in {}", fmt_duration_ms(ms));
        }
        // Only when something is wrong: a stale error beside "running" would mislead.
        if self.state != "running"
            && let Some(e) = &self.last_error
        {
            let _ = write!(line, "; {}", one_line_text(e, 120));
        }
        line
    }
}

/// What a running agent knows, gathered for [`live_report`].
#[derive(Debug)]
pub(crate) struct LiveSources<'a> {
    pub stats: &'a Stats,
    /// A snapshot of the drain's status (copied out of its mutex by the caller).
    pub drain: &'a DrainStatus,
    pub spool: &'a Spool,
    /// `segment.endpoint` as configured; credentials in it are removed.
    pub endpoint: &'a str,
    /// When the agent started, for `uptime_secs`.
    pub started: Instant,
    /// `spool.max_bytes`: at or over it the state is `spool_full`.
    pub max_spool_bytes: u64,
    /// Facts found at startup that the operator should see (a spool moved aside, ...).
    pub notes: &'a [String],
    pub catalog: Option<crate::catalog::CatalogStatus>,
    /// The parked records' summary, kept while the quarantine does not change.
    pub parked: &'a crate::catalog::parking::SummaryMemo,
}

/// Builds the report of this running agent. Never fails: a spool that cannot be read shows
/// as zeros and a note, because a status answer that says why beats no answer.
pub(crate) fn live_report(src: &LiveSources<'_>) -> StatusReport {
    let mut notes = src.notes.to_vec();
    if let Some(note) = src.spool.recovered()
        && !notes.iter().any(|n| n == note)
    {
        notes.push(note.to_string());
    }
    let depth = src.spool.queue().depth().unwrap_or_else(|e| {
        notes.push(format!("cannot read the spool depth: {e}"));
        spool::Depth::default()
    });
    let oldest = src.spool.queue().oldest_enqueued_ms().unwrap_or_else(|e| {
        notes.push(format!("cannot read the oldest queued event: {e}"));
        None
    });
    let files = file_counts(src.spool).unwrap_or_else(|e| {
        notes.push(format!("cannot read the files table: {e}"));
        FileCounts::default()
    });
    let parked = src.parked.summary(src.spool).unwrap_or_else(|e| {
        notes.push(format!("cannot read the parked records: {e}"));
        Default::default()
    });
    let skipped_by_action = src
        .stats
        .skipped
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let now = now_ms();
    StatusReport {
        state: state_name(src.drain.state, depth.bytes >= src.max_spool_bytes).to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: Some(std::process::id()),
        uptime_secs: Some(src.started.elapsed().as_secs()),
        endpoint: redact_endpoint(src.endpoint),
        spool_events: depth.events,
        spool_bytes: depth.bytes,
        oldest_event_age_secs: oldest.map(|t| now.saturating_sub(t) / 1000),
        events_read: Stats::get(&src.stats.records_read),
        events_spooled: Stats::get(&src.stats.events_spooled),
        events_delivered: Stats::get(&src.stats.events_delivered),
        duplicates_skipped: Stats::get(&src.stats.duplicates_skipped),
        skipped: skipped_by_action.values().sum(),
        skipped_by_action,
        quarantined: Stats::get(&src.stats.quarantined),
        dead_lettered: Stats::get(&src.stats.dead_lettered),
        files_seen: files.seen,
        files_in_progress: files.in_progress,
        files_done: files.done,
        files_failed: files.failed,
        last_success: src.drain.last_success_ms.map(rfc3339_ms),
        last_error: src.drain.last_error.clone(),
        current_backoff_ms: src.drain.current_backoff_ms,
        last_rejected_status: src.drain.last_rejected_status,
        notes,
        catalog: src.catalog.clone(),
        parked: parked.records,
        parked_messages: parked.top,
        waiting: src.spool.join_waiting_count().unwrap_or(0),
        concurrency_mode: Some(
            if src.drain.concurrency_adaptive {
                "adaptive"
            } else {
                "fixed"
            }
            .to_string(),
        ),
        concurrency_limit: Some(src.drain.concurrency_limit as u64),
        max_concurrency: Some(src.drain.max_concurrency as u64),
        in_flight: src.drain.in_flight as u64,
        rtt_ms: src.drain.rtt_ms,
        max_events_per_sec: Some(src.drain.max_events_per_sec),
    }
}

/// Builds the report of a stopped agent from its spool alone (`status` with no daemon): state
/// `stopped`, the figures only the spool knows (depth, oldest event age, quarantine and
/// dead-letter counts, files by status), the process counters 0.
pub(crate) fn offline_report(spool: &Spool, endpoint: &str) -> Result<StatusReport, spool::Error> {
    let depth = spool.queue().depth()?;
    let oldest = spool.queue().oldest_enqueued_ms()?;
    let counts = file_counts(spool)?;
    // One walk of the quarantine for both counts.
    let tags = spool.letters().quarantine_tags()?;
    let quarantined = tags
        .iter()
        .filter(|t| t.kind == spool::QuarantineKind::Bad)
        .count() as u64;
    let parked = crate::catalog::parking::summarize(tags);
    let now = now_ms();
    Ok(StatusReport {
        parked: parked.records,
        parked_messages: parked.top,
        waiting: spool.join_waiting_count()?,
        state: STATE_STOPPED.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        endpoint: redact_endpoint(endpoint),
        spool_events: depth.events,
        spool_bytes: depth.bytes,
        oldest_event_age_secs: oldest.map(|t| now.saturating_sub(t) / 1000),
        quarantined,
        dead_lettered: spool.letters().dead_letters()?.len() as u64,
        files_seen: counts.seen,
        files_in_progress: counts.in_progress,
        files_done: counts.done,
        files_failed: counts.failed,
        notes: spool.recovered().map(str::to_string).into_iter().collect(),
        ..StatusReport::default()
    })
}

/// The `state` for a drain state, with a full spool: auth and rejection come first because
/// they are what the operator must fix (they also end up filling the spool); a full spool
/// comes before a backoff because it means input is no longer being read.
pub(crate) fn state_name(drain: DeliveryState, spool_full: bool) -> &'static str {
    match (drain, spool_full) {
        (DeliveryState::AuthFailed, _) => "auth_failed",
        (DeliveryState::Rejected, _) => "rejected",
        (_, true) => "spool_full",
        (DeliveryState::BackingOff, false) => "backing_off",
        (DeliveryState::Running, false) => "running",
    }
}

/// Files the spool knows, by status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct FileCounts {
    seen: u64,
    in_progress: u64,
    done: u64,
    failed: u64,
}

impl FileCounts {
    fn add(&mut self, status: FileStatus) {
        self.seen += 1;
        match status {
            FileStatus::Reading => self.in_progress += 1,
            // Read to the end: "done" for the operator even while events wait for delivery.
            FileStatus::Read | FileStatus::Done => self.done += 1,
            FileStatus::Failed => self.failed += 1,
        }
    }
}

/// Files by status from the spool's `files` tree. Reads every file record: fine for `status`,
/// too much to run every second.
fn file_counts(spool: &Spool) -> Result<FileCounts, spool::Error> {
    let mut counts = FileCounts::default();
    for (_, rec) in spool.ledger().files()? {
        counts.add(rec.status);
    }
    Ok(counts)
}

/// Drops `user:password@` from a URL: the endpoint is printed, and a credential someone put in
/// it must not be.
fn redact_endpoint(endpoint: &str) -> String {
    let Some((scheme, rest)) = endpoint.split_once("://") else {
        return endpoint.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => endpoint.to_string(),
    }
}

fn rfc3339_ms(ms: u64) -> String {
    match Utc.timestamp_millis_opt(ms as i64).single() {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        None => ms.to_string(),
    }
}

/// Seconds from the RFC 3339 time `at` to `now`, if `at` parses; 0 for a time in the future
/// (clock steps).
fn ago(at: &str, now: DateTime<Utc>) -> Option<u64> {
    let t = DateTime::parse_from_rfc3339(at).ok()?;
    Some((now - t.with_timezone(&Utc)).num_seconds().max(0) as u64)
}

/// "45s", "12m 3s", "3h 12m", "2d 4h": two units at most, enough to judge an age.
fn fmt_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

fn fmt_duration_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        fmt_duration(ms / 1000)
    }
}

fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Error texts can hold newlines (response bodies); a status line and `STATUS=` cannot.
fn one_line_text(s: &str, max_chars: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.chars().count() <= max_chars {
        return flat.to_string();
    }
    let mut cut: String = flat.chars().take(max_chars.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Chunk, FileRecord, QuarantineEntry, SpoolEvent};
    use std::path::Path;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn sample() -> StatusReport {
        StatusReport {
            state: "backing_off".into(),
            version: "0.1.0".into(),
            pid: Some(4242),
            uptime_secs: Some(3 * 3600 + 12 * 60),
            endpoint: "https://api.segment.io".into(),
            spool_events: 1234,
            spool_bytes: 5 * 1024 * 1024 + 600 * 1024,
            oldest_event_age_secs: Some(723),
            events_read: 900,
            events_spooled: 880,
            events_delivered: 5678,
            duplicates_skipped: 20,
            skipped: 5,
            skipped_by_action: BTreeMap::from([("Held Back".into(), 3), ("Open".into(), 2)]),
            quarantined: 3,
            dead_lettered: 1,
            files_seen: 10,
            files_in_progress: 1,
            files_done: 8,
            files_failed: 1,
            last_success: Some("2024-05-01T12:00:00Z".into()),
            last_error: Some("HTTP 503:\nService Unavailable".into()),
            current_backoff_ms: Some(30_000),
            last_rejected_status: None,
            notes: vec!["spool was corrupt and moved aside to /x/spool.corrupt".into()],
            catalog: Some(crate::catalog::CatalogStatus {
                source: "files+cache".into(),
                messages: 12,
                abtests: 3,
                fetched_at: Some("2024-05-01T11:00:00Z".into()),
                age_secs: Some(3600),
                last_refresh: Some("2024-05-01T12:00:00Z".into()),
                last_error: Some("cannot reach Leanplum: connection refused".into()),
                waiting: vec![crate::catalog::WaitingLookup {
                    kind: "message".into(),
                    id: "77".into(),
                    since: "2024-05-01T11:59:00Z".into(),
                    files: vec!["20240501/export-1".into()],
                    reason: "cannot reach Leanplum: connection refused".into(),
                }],
                files_error: None,
            }),
            parked: 2,
            parked_messages: vec![crate::catalog::parking::ParkedMessage {
                message_id: "77".into(),
                records: 2,
            }],
            waiting: 3,
            concurrency_mode: Some("adaptive".into()),
            concurrency_limit: Some(12),
            max_concurrency: Some(32),
            in_flight: 9,
            rtt_ms: Some(152.3),
            max_events_per_sec: Some(200),
        }
    }

    #[test]
    fn json_field_names_are_stable() {
        let v = serde_json::to_value(sample()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut expected = vec![
            "state",
            "version",
            "pid",
            "uptime_secs",
            "endpoint",
            "spool_events",
            "spool_bytes",
            "oldest_event_age_secs",
            "events_read",
            "events_spooled",
            "events_delivered",
            "duplicates_skipped",
            "skipped",
            "skipped_by_action",
            "quarantined",
            "dead_lettered",
            "files_seen",
            "files_in_progress",
            "files_done",
            "files_failed",
            "last_success",
            "last_error",
            "current_backoff_ms",
            "last_rejected_status",
            "notes",
            "catalog",
            "parked",
            "parked_messages",
            "waiting",
            "concurrency_mode",
            "concurrency_limit",
            "max_concurrency",
            "in_flight",
            "rtt_ms",
            "max_events_per_sec",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        let back: StatusReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn json_from_an_older_agent_with_fewer_fields_still_parses() {
        let r: StatusReport =
            serde_json::from_str(r#"{"state":"running","spool_events":7,"future_field":1}"#)
                .unwrap();
        assert_eq!((r.state.as_str(), r.spool_events), ("running", 7));
        assert!(r.notes.is_empty());
    }

    #[test]
    fn human_summary_is_aligned_and_starts_with_the_state() {
        let text = sample().render_human_at(at("2024-05-01T12:00:12Z"));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("state:") && lines[0].ends_with(" backing_off"));
        // Every optional row is present in this sample: a dozen lines in the usual case.
        assert!((10..=20).contains(&lines.len()), "{text}");
        assert!(
            text.contains(
                "csv join:      3 CSV export records wait for their sessions or parameters"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "concurrency:   adaptive, limit 12 of 32, 9 in flight, round trip 152.3 ms"
            ),
            "{text}"
        );
        assert!(text.contains("rate limit:    200 events/s"), "{text}");
        assert!(
            text.contains("parked:        2 records wait for messages not in the catalog: 77 (2)"),
            "{text}"
        );
        let col = lines[0].find("backing_off").unwrap();
        for line in &lines {
            let colon = line.find(':').unwrap();
            assert!(colon < col && line[col - 1..].starts_with(' '), "{line}");
            assert_ne!(line.as_bytes()[col], b' ', "misaligned: {line}");
        }
        assert!(
            text.contains("version:       0.1.0 (pid 4242, up 3h 12m)"),
            "{text}"
        );
        assert!(
            text.contains("1234 events, 5.6 MiB, oldest 12m 3s"),
            "{text}"
        );
        assert!(text.contains("(Held Back: 3, Open: 2)"), "{text}");
        assert!(text.contains("2024-05-01T12:00:00Z (12s ago)"), "{text}");
        assert!(text.contains("HTTP 503: Service Unavailable"), "{text}");
        assert!(text.contains("backoff:       30s"), "{text}");
        assert!(text.contains("note:          spool was corrupt"), "{text}");
        assert!(
            text.contains(
                "catalog:       12 messages, 3 A/B tests from files+cache, fetched 1h 0m ago"
            ),
            "{text}"
        );
        assert!(
            text.contains("waiting:       message 77 since 2024-05-01T11:59:00Z (cannot reach Leanplum: connection refused): 20240501/export-1"),
            "{text}"
        );
    }

    #[test]
    fn human_summary_shows_refused_catalog_files() {
        let mut r = sample();
        let error = "bad catalog file /etc/c/messages.json: expected a JSON array at line 1";
        r.catalog.as_mut().unwrap().files_error = Some(error.into());
        let text = r.render_human_at(at("2024-05-01T12:00:12Z"));
        assert!(
            text.contains(&format!(
                "catalog files: refused, the last good catalog is in use: {error}"
            )),
            "{text}"
        );
        assert!(!sample().render_human().contains("catalog files"));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["catalog"]["files_error"], error);
        assert!(serde_json::to_value(sample()).unwrap()["catalog"]["files_error"].is_null());
    }

    #[test]
    fn one_line_summarises_for_systemd() {
        let now = at("2024-05-01T12:00:12Z");
        let mut r = sample();
        r.state = "running".into();
        r.current_backoff_ms = None;
        assert_eq!(
            r.one_line_at(now),
            "running: 1234 queued, 5678 delivered, last success 12s ago"
        );
        let line = sample().one_line_at(now);
        assert_eq!(
            line,
            "backing_off: 1234 queued, 5678 delivered, last success 12s ago, retry in 30s; \
             HTTP 503: Service Unavailable"
        );
        r.last_success = None;
        r.last_error = Some("x".repeat(500));
        r.state = "rejected".into();
        let line = r.one_line_at(now);
        assert!(line.contains("no delivery yet") && !line.contains('\n'));
        assert!(line.chars().count() < 200, "{line}");
    }

    #[test]
    fn state_name_puts_what_to_fix_first() {
        assert_eq!(state_name(DeliveryState::Running, false), "running");
        assert_eq!(state_name(DeliveryState::BackingOff, false), "backing_off");
        assert_eq!(state_name(DeliveryState::BackingOff, true), "spool_full");
        assert_eq!(state_name(DeliveryState::AuthFailed, true), "auth_failed");
        assert_eq!(state_name(DeliveryState::Rejected, false), "rejected");
    }

    #[test]
    fn endpoint_credentials_are_never_shown() {
        assert_eq!(
            redact_endpoint("https://user:secret@api.segment.io/v1"),
            "https://api.segment.io/v1"
        );
        assert_eq!(
            redact_endpoint("https://api.segment.io/a@b"),
            "https://api.segment.io/a@b"
        );
        assert_eq!(redact_endpoint("not a url"), "not a url");
    }

    #[test]
    fn durations_and_sizes_read_well() {
        assert_eq!(fmt_duration(45), "45s");
        assert_eq!(fmt_duration(723), "12m 3s");
        assert_eq!(fmt_duration(2 * 86_400 + 4 * 3600 + 5), "2d 4h");
        assert_eq!(fmt_duration_ms(250), "250ms");
        assert_eq!(fmt_bytes(0), "0 B");
        assert_eq!(fmt_bytes(10 << 30), "10.0 GiB");
        assert_eq!(rfc3339_ms(1_714_564_800_500), "2024-05-01T12:00:00Z");
    }

    fn file_record(path: &str) -> FileRecord {
        FileRecord {
            path: path.into(),
            head_len: 0,
            head_hash: String::new(),
            tail_hash: String::new(),
            raw_len: 0,
            gzip: false,
            offset: 0,
            line: 0,
            events_spooled: 0,
            pending: 0,
            status: FileStatus::Reading,
            error: None,
            first_seen_ms: 0,
            updated_ms: 0,
            ..FileRecord::default()
        }
    }

    fn spool_with_backlog(dir: &Path) -> Spool {
        let spool = Spool::open(dir, 8 << 20).unwrap();
        let fid = spool
            .ledger()
            .begin(Path::new("a.json"), &file_record("a.json"))
            .unwrap();
        let events = ["e1", "e2", "e3"]
            .iter()
            .map(|id| {
                SpoolEvent::new(
                    (*id).into(),
                    format!("{{\"messageId\":\"{id}\"}}").into_bytes(),
                    None,
                )
            })
            .collect();
        spool
            .commit_file_chunk(&Chunk {
                file_id: fid,
                offset: 10,
                line: 4,
                events,
                quarantine: vec![QuarantineEntry {
                    reason: "not JSON".into(),
                    file: "a.json".into(),
                    line: 4,
                    time_ms: 0,
                    raw: "{".into(),
                    ..QuarantineEntry::default()
                }],
                ..Chunk::default()
            })
            .unwrap();
        for (path, status) in [("b.json", FileStatus::Read), ("c.json", FileStatus::Failed)] {
            let id = spool
                .ledger()
                .begin(Path::new(path), &file_record(path))
                .unwrap();
            match status {
                FileStatus::Read => {
                    spool
                        .commit_file_chunk(&Chunk {
                            file_id: id,
                            file_done: true,
                            ..Chunk::default()
                        })
                        .unwrap();
                }
                _ => spool
                    .ledger()
                    .transition(id, crate::spool::Transition::Failed("bad".into()))
                    .unwrap(),
            }
        }
        spool
    }

    #[test]
    fn offline_report_reads_only_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with_backlog(dir.path());
        let r = offline_report(&spool, "https://k:s@api.segment.io").unwrap();
        assert_eq!(r.state, STATE_STOPPED);
        assert_eq!(r.endpoint, "https://api.segment.io");
        assert_eq!((r.pid, r.uptime_secs), (None, None));
        assert_eq!(r.spool_events, 3);
        assert!(r.spool_bytes > 0);
        assert!(r.oldest_event_age_secs.is_some_and(|a| a < 60));
        assert_eq!((r.quarantined, r.dead_lettered), (1, 0));
        assert_eq!(
            (
                r.files_seen,
                r.files_in_progress,
                r.files_done,
                r.files_failed
            ),
            (3, 1, 1, 1)
        );
        assert!(r.notes.is_empty());
        assert_eq!(
            (r.events_read, r.events_spooled, r.events_delivered),
            (0, 0, 0)
        );
        assert!(r.last_success.is_none() && r.last_error.is_none());
    }

    #[test]
    fn live_report_combines_stats_drain_and_spool() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with_backlog(dir.path());
        let stats = Stats::default();
        Stats::add(&stats.events_delivered, 7);
        stats.add_skipped(&BTreeMap::from([("Held Back".to_string(), 4)]));
        let drain = DrainStatus {
            state: DeliveryState::BackingOff,
            last_success_ms: Some(1_714_564_800_000),
            last_error: Some("HTTP 503".into()),
            current_backoff_ms: Some(1000),
            last_rejected_status: None,
            concurrency_adaptive: true,
            concurrency_limit: 5,
            max_concurrency: 32,
            in_flight: 3,
            rtt_ms: Some(48.5),
            max_events_per_sec: 0,
        };
        let notes = vec!["hello".to_string()];
        let src = LiveSources {
            stats: &stats,
            drain: &drain,
            spool: &spool,
            endpoint: "https://api.segment.io",
            started: Instant::now(),
            max_spool_bytes: 1 << 30,
            notes: &notes,
            catalog: None,
            parked: &Default::default(),
        };
        let r = live_report(&src);
        assert_eq!(r.state, "backing_off");
        assert_eq!(r.pid, Some(std::process::id()));
        assert_eq!((r.spool_events, r.events_delivered), (3, 7));
        assert_eq!(
            (r.skipped, r.skipped_by_action.get("Held Back")),
            (4, Some(&4))
        );
        assert_eq!(r.last_success.as_deref(), Some("2024-05-01T12:00:00Z"));
        assert_eq!(r.current_backoff_ms, Some(1000));
        assert_eq!(r.concurrency_mode.as_deref(), Some("adaptive"));
        assert_eq!(
            (r.concurrency_limit, r.max_concurrency, r.in_flight),
            (Some(5), Some(32), 3)
        );
        assert_eq!((r.rtt_ms, r.max_events_per_sec), (Some(48.5), Some(0)));
        // Files come from the spool, so they survive a restart.
        assert_eq!((r.files_seen, r.files_in_progress), (3, 1));
        assert_eq!(r.notes, notes);

        let full = live_report(&LiveSources {
            max_spool_bytes: 1,
            ..src
        });
        assert_eq!(full.state, "spool_full");
    }
}
