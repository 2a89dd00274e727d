//! `kill -9` at random moments (SPEC section 7: "crash at any instant loses nothing that was
//! committed and re-reads what was not; a restart re-sends at most the batches that were in
//! flight"). Files keep arriving while the agent is killed and restarted on the same spool and
//! watch dir; in the end every event must have reached Segment, and every duplicate must be
//! explained by the kill that ended the agent which had it acknowledged: the batch was in flight,
//! or its ack (a sled transaction that is not flushed, spool module doc) had not been flushed
//! yet. An ack followed by a spool flush (every chunk commit flushes) must survive `kill -9`.
//!
//! Set `LSA_CRASH_SEED` to replay a run; the seed is printed either way.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::util::{
    DeliveryReport, PATIENCE, RecordedRequest, Reply, TestEnv, session_export, write_atomically,
};

/// eventIds of this test.
const BASE: u64 = 7_200_000_000_000_000_000;
const FILES: usize = 30;
const PER_FILE: usize = 100;
const KILLS: usize = 24;
const CONCURRENCY: usize = 4;
const MAX_BATCH_EVENTS: usize = 50;

/// From Segment's answer to the agent's ack transaction: generous, for a loaded machine.
const ACK_SLACK: Duration = Duration::from_millis(250);

fn seed() -> u64 {
    match std::env::var("LSA_CRASH_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("LSA_CRASH_SEED={v:?}: {e}")),
        Err(_) => fastrand::u64(..),
    }
}

#[test]
fn kill_9_at_random_moments_loses_nothing() {
    let seed = seed();
    eprintln!("crash test: seed {seed} (LSA_CRASH_SEED={seed} replays the kill schedule)");
    let mut rng = fastrand::Rng::with_seed(seed);

    let mut env = TestEnv::new();
    env.config.max_batch_events = Some(MAX_BATCH_EVENTS as u64);
    env.config.concurrency = Some(CONCURRENCY as u64);
    // Segment answers 200 after 0-50 ms, so batches are often in flight when the kill comes.
    let server_rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed ^ 0x05e6_7e17)));
    env.server.set_rule(move |_| {
        let ms = server_rng.lock().expect("server rng").u64(0..=50);
        Some(Reply::ok().with_delay(Duration::from_millis(ms)))
    });

    let started = Instant::now();
    // To place the agent's log lines (wall clock) on the test's monotonic clock.
    let clock = (started, SystemTime::now());
    let mut agent = env.start_agent();
    let mut expected: Vec<String> = Vec::with_capacity(FILES * PER_FILE);
    let mut dropped = 0;
    let mut kill_times: Vec<Instant> = Vec::with_capacity(KILLS);
    for k in 0..KILLS {
        // Files arrive progressively, at a random moment of each run, so the kill finds the
        // agent starting, reading, sending or idle.
        let run_for = Duration::from_millis(rng.u64(100..=700));
        let drop_after = run_for.mul_f64(rng.f64());
        thread::sleep(drop_after);
        let due = ((k + 1) * FILES).div_ceil(KILLS);
        while dropped < due {
            let export = session_export(BASE + (dropped * PER_FILE) as u64, PER_FILE);
            write_atomically(
                &env.watch_dir()
                    .join("20261105")
                    .join(format!("crash-{dropped:03}")),
                &export.bytes,
            );
            expected.extend(export.message_ids);
            dropped += 1;
        }
        thread::sleep(run_for - drop_after);
        assert!(
            agent.is_running(),
            "the agent exited by itself before kill {k}: {:?}\nagent log tail:\n{}",
            agent.try_exit(),
            agent.log_tail(60)
        );
        agent.kill();
        kill_times.push(Instant::now());
        agent = env.start_agent();
    }
    let chaos = started.elapsed();
    let accepted_before_calm = env.server.accepted_count();

    let arrived = env.server.wait_for_ids(&expected, PATIENCE * 2);
    env.server
        .wait_for_quiet(Duration::from_millis(1500), PATIENCE);
    let exit = agent.stop();
    let requests = env.server.requests();
    let report = DeliveryReport::of(&env.server, &expected);
    assert!(
        arrived,
        "events lost after {KILLS} kills (seed {seed}): {}\nagent log tail:\n{}",
        report.summary(),
        agent.log_tail(60)
    );
    assert!(
        exit.expect("exits within 15 s of SIGTERM").success(),
        "SIGTERM exits 0"
    );
    assert!(
        report.unexpected.is_empty(),
        "unexpected messageIds (seed {seed}): {}",
        report.summary()
    );
    assert!(report.is_complete(), "seed {seed}: {}", report.summary());

    let flushes = flush_windows(&agent.logs(), clock, &kill_times);
    let resends = resends(&requests, &kill_times, &flushes);
    assert_eq!(resends.len(), report.extra_deliveries);
    let mut times: BTreeMap<usize, usize> = BTreeMap::new();
    for (_, n) in &report.repeated {
        *times.entry(*n).or_default() += 1;
    }
    let mut per_kill: BTreeMap<usize, usize> = BTreeMap::new();
    for r in &resends {
        if let Some(k) = r.kill {
            *per_kill.entry(k).or_default() += 1;
        }
    }
    let without_crash: Vec<&Resend> = resends.iter().filter(|r| r.kill.is_none()).collect();
    let after_flush: Vec<&Resend> = resends
        .iter()
        .filter(|r| r.flushed_after.is_some())
        .collect();
    let in_flight_bound = KILLS * CONCURRENCY * MAX_BATCH_EVENTS;
    eprintln!(
        "crash test (seed {seed}): {KILLS} kills in {chaos:?}; {} events in {FILES} files; {} \
         requests; {accepted_before_calm} events accepted while killing; {} messageIds accepted \
         more than once, {} duplicate deliveries (messageIds by times accepted: {times:?}); \
         re-sends per kill: max {}, {} kills caused any; {} spool flushes seen in the log; \
         kills x concurrency x max_batch_events = {in_flight_bound}",
        expected.len(),
        requests.len(),
        report.repeated.len(),
        report.extra_deliveries,
        per_kill.values().max().copied().unwrap_or(0),
        per_kill.len(),
        flushes.len(),
    );
    // Bounded duplicates: each one was re-sent by a restarted agent after the agent that had it
    // acknowledged was killed, and that agent had not flushed its spool since the ack. So a
    // restart re-sends at most the batches in flight plus those acked since the last flush,
    // which is what the spool module doc promises (SPEC section 7 says "in flight" only: the
    // unflushed acks are the difference).
    assert!(
        without_crash.is_empty(),
        "seed {seed}: {} events accepted twice with no kill in between (e.g. {:?})",
        without_crash.len(),
        without_crash
            .iter()
            .take(3)
            .map(|r| r.describe(&kill_times))
            .collect::<Vec<_>>()
    );
    assert!(
        after_flush.is_empty(),
        "seed {seed}: {} events re-sent after a kill although the spool was flushed between \
         their ack and the kill (acks before a flush must survive kill -9), e.g. {:?}",
        after_flush.len(),
        after_flush
            .iter()
            .take(3)
            .map(|r| r.describe(&kill_times))
            .collect::<Vec<_>>()
    );
}

/// A log line's time on the test's monotonic clock.
fn log_instant(line: &str, (t0, w0): (Instant, SystemTime)) -> Option<Instant> {
    let stamp = line.split_whitespace().next()?;
    let at = chrono::DateTime::parse_from_rfc3339(stamp).ok()?;
    let wall = UNIX_EPOCH + Duration::from_micros(u64::try_from(at.timestamp_micros()).ok()?);
    Some(match wall.duration_since(w0) {
        Ok(after) => t0 + after,
        Err(before) => t0.checked_sub(before.duration())?,
    })
}

/// The value of `path=` in a log line.
fn path_field(line: &str) -> Option<&str> {
    let rest = &line[line.find(" path=")? + 6..];
    Some(rest.split_whitespace().next().unwrap_or(rest))
}

/// Moments the agent certainly flushed its spool, as (from, to): between a file's "reading"
/// line and its "file ingested" line in the same run, the file's chunks were committed, and
/// every commit ends in a spool flush.
fn flush_windows(
    logs: &str,
    clock: (Instant, SystemTime),
    kills: &[Instant],
) -> Vec<(Instant, Instant)> {
    let run_of = |t: Instant| kills.iter().filter(|&&k| k < t).count();
    let mut reading: HashMap<String, Instant> = HashMap::new();
    let mut out = Vec::new();
    for line in logs.lines() {
        let is_start =
            line.contains(" reading file path=") || line.contains(" reading on from the committed");
        let is_end = line.contains(" file ingested path=");
        if !is_start && !is_end {
            continue;
        }
        let (Some(at), Some(path)) = (log_instant(line, clock), path_field(line)) else {
            continue;
        };
        if is_start {
            reading.insert(path.to_string(), at);
        } else if let Some(from) = reading.remove(path)
            && run_of(from) == run_of(at)
        {
            out.push((from, at));
        }
    }
    out
}

/// One duplicate delivery and what caused it.
#[derive(Debug)]
struct Resend {
    message_id: String,
    /// When Segment first answered 2xx for it.
    first_answered: Instant,
    /// The kill that ended the agent which got that answer (index), if any came before the
    /// re-send.
    kill: Option<usize>,
    /// A spool flush seen after the ack and before that kill: the ack should have survived.
    flushed_after: Option<(Instant, Instant)>,
}

impl Resend {
    /// For assertion messages: the event, and its ack and the flush relative to the kill.
    fn describe(&self, kills: &[Instant]) -> String {
        let Some(k) = self.kill else {
            return format!("{}: re-sent with no kill in between", self.message_id);
        };
        let before = |t: Instant| kills[k].saturating_duration_since(t);
        format!(
            "{}: answered {:?} before kill {k}, spool flushed {:?} before it",
            self.message_id,
            before(self.first_answered),
            self.flushed_after.map(|(_, to)| before(to))
        )
    }
}

/// Every acceptance after an event's first, with its cause.
fn resends(
    requests: &[RecordedRequest],
    kills: &[Instant],
    flushes: &[(Instant, Instant)],
) -> Vec<Resend> {
    let mut first: HashMap<String, (Instant, Instant)> = HashMap::new();
    let mut out = Vec::new();
    let mut accepted: Vec<&RecordedRequest> = requests.iter().filter(|r| r.is_accepted()).collect();
    accepted.sort_by_key(|r| r.received_at);
    for r in accepted {
        let answered = r.answered_at.unwrap_or(r.received_at);
        for id in r.message_ids() {
            let Some(&(first_sent, first_answered)) = first.get(&id) else {
                first.insert(id, (r.received_at, answered));
                continue;
            };
            // The agent that sent the first accepted request lived until the first kill after
            // the server received it. (Not after the answer: a kill can land between the two,
            // and then that agent never saw the 2xx.)
            let kill = kills
                .iter()
                .position(|&k| k >= first_sent)
                .filter(|&i| kills[i] < r.received_at);
            let flushed_after = kill.and_then(|i| {
                flushes
                    .iter()
                    .find(|&&(from, to)| from > first_answered + ACK_SLACK && to < kills[i])
                    .copied()
            });
            out.push(Resend {
                message_id: id,
                first_answered,
                kill,
                flushed_after,
            });
        }
    }
    out
}
