//! What the fake Segment server accepted against what was expected, and other checks on what
//! the agent did (its log, its dead letters).

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use super::{Agent, RecordedRequest, SegmentServer};

/// What the server accepted, compared with what was expected, by messageId.
#[derive(Debug, Default)]
pub struct DeliveryReport {
    /// Expected, never accepted.
    pub missing: Vec<String>,
    /// Accepted, never expected.
    pub unexpected: Vec<String>,
    /// Accepted more than once: (messageId, times).
    pub repeated: Vec<(String, usize)>,
    /// Deliveries beyond the first, summed over all messageIds.
    pub extra_deliveries: usize,
}

impl DeliveryReport {
    /// Compares the server's accepted messageIds with `expected`.
    pub fn of(server: &SegmentServer, expected: &[String]) -> DeliveryReport {
        let counts = server.accepted_id_counts();
        let wanted: HashSet<&str> = expected.iter().map(String::as_str).collect();
        let mut report = DeliveryReport {
            missing: expected
                .iter()
                .filter(|id| !counts.contains_key(*id))
                .cloned()
                .collect(),
            ..DeliveryReport::default()
        };
        for (id, n) in counts {
            if !wanted.contains(id.as_str()) {
                report.unexpected.push(id.clone());
            }
            if n > 1 {
                report.extra_deliveries += n - 1;
                report.repeated.push((id, n));
            }
        }
        report
    }

    /// Every expected id accepted at least once, nothing else.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }

    /// Complete, and nothing accepted twice.
    pub fn is_exactly_once(&self) -> bool {
        self.is_complete() && self.repeated.is_empty()
    }

    /// A short account for assertion messages (first few ids of each kind).
    pub fn summary(&self) -> String {
        let few = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>();
        format!(
            "{} missing {:?}, {} unexpected {:?}, {} accepted more than once {:?} ({} extra deliveries)",
            self.missing.len(),
            few(&self.missing),
            self.unexpected.len(),
            few(&self.unexpected),
            self.repeated.len(),
            self.repeated.iter().take(5).collect::<Vec<_>>(),
            self.extra_deliveries
        )
    }
}

/// Asserts that every id in `expected` was accepted exactly once and nothing else was.
pub fn assert_exactly_once(server: &SegmentServer, expected: &[String], agent: &Agent, what: &str) {
    let report = DeliveryReport::of(server, expected);
    assert!(
        report.is_exactly_once(),
        "{what}: {}\nstatuses: {:?}\nagent log tail:\n{}",
        report.summary(),
        server
            .requests()
            .iter()
            .map(|r| r.status)
            .collect::<Vec<_>>(),
        agent.log_tail(40)
    );
}

/// A loopback port nothing listens on (bound, read, released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// How many log lines contain `needle`.
pub fn count_log_lines(logs: &str, needle: &str) -> usize {
    logs.lines().filter(|l| l.contains(needle)).count()
}

/// Opens a stopped agent's spool with the library (the agent must not be running: sled locks
/// its files) and returns its dead letters.
pub fn dead_letters(spool_dir: &Path) -> Vec<leanplum_segment_agent::spool::DeadLetter> {
    let spool = leanplum_segment_agent::spool::Spool::open(spool_dir, 8 << 20)
        .unwrap_or_else(|e| panic!("open the spool {}: {e}", spool_dir.display()));
    spool
        .letters()
        .dead_letters()
        .expect("read the dead letters")
        .into_iter()
        .map(|(_, d)| d)
        .collect()
}

/// Requests that arrived in `[from, to)`.
pub fn requests_between(
    requests: &[RecordedRequest],
    from: Instant,
    to: Instant,
) -> Vec<RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.received_at >= from && r.received_at < to)
        .cloned()
        .collect()
}
