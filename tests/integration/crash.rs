//! `kill -9` at random moments (SPEC section 7: "crash at any instant loses nothing that was
//! committed and re-reads what was not; a restart re-sends at most the batches that were in
//! flight"). Files keep arriving while the agent is killed and restarted on the same spool and
//! watch dir; in the end every event must have reached Segment, and every duplicate must be
//! explained by the kill that ended the agent which had it acknowledged: the batch was in flight,
//! or its ack (a sled transaction that is not flushed, spool module doc) had not been flushed
//! yet. An ack followed by a spool flush (every chunk commit flushes) must survive `kill -9`, and
//! the re-sends after each kill are at most the events in flight at the kill plus those
//! acknowledged since the killed agent's last flush.
//!
//! Set `LSA_CRASH_SEED` to replay a run; the seed is printed either way.
//!
//! And a backlog of several spool segment files, drained through the real binary with a
//! `kill -9` in the middle: the restarted agent delivers the rest exactly once, re-sends only
//! what was in flight or just acknowledged, and gives the disk back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::util::session_export;
use crate::util::{
    DeliveryReport, PATIENCE, RecordedRequest, Reply, TestEnv, click_session_lines, dir_bytes,
    new_env, status_u64, wait_for_status, wait_until, write_atomically,
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
    // The bound per kill: a restart re-sends at most what the killed agent had in flight plus
    // what it had acknowledged since its spool's last flush.
    let over: Vec<String> = per_kill
        .iter()
        .filter_map(|(&k, &n)| {
            let (in_flight, unflushed) = resend_allowance(&requests, &kill_times, &flushes, k);
            (n > in_flight + unflushed).then(|| {
                format!(
                    "kill {k}: {n} events re-sent, {in_flight} in flight + {unflushed} acked since \
                     the last flush"
                )
            })
        })
        .collect();
    assert!(
        over.is_empty(),
        "seed {seed}: re-sends beyond what was in flight or acknowledged unflushed at the kill:\n{}",
        over.join("\n")
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
    /// When Segment answered 2xx for it the time before.
    answered: Instant,
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
            before(self.answered),
            self.flushed_after.map(|(_, to)| before(to))
        )
    }
}

/// Every acceptance after an event's first, with its cause: the kill that ended the agent
/// which had the previous acceptance.
fn resends(
    requests: &[RecordedRequest],
    kills: &[Instant],
    flushes: &[(Instant, Instant)],
) -> Vec<Resend> {
    let mut last: HashMap<String, (Instant, Instant)> = HashMap::new();
    let mut out = Vec::new();
    let mut accepted: Vec<&RecordedRequest> = requests.iter().filter(|r| r.is_accepted()).collect();
    accepted.sort_by_key(|r| r.received_at);
    for r in accepted {
        let answered = r.answered_at.unwrap_or(r.received_at);
        for id in r.message_ids() {
            let Some((prev_sent, prev_answered)) =
                last.insert(id.clone(), (r.received_at, answered))
            else {
                continue;
            };
            // The agent that sent the previous accepted request lived until the first kill after
            // the server received it. (Not after the answer: a kill can land between the two,
            // and then that agent never saw the 2xx.)
            let kill = kills
                .iter()
                .position(|&k| k >= prev_sent)
                .filter(|&i| kills[i] < r.received_at);
            let flushed_after = kill.and_then(|i| {
                flushes
                    .iter()
                    .find(|&&(from, to)| from > prev_answered + ACK_SLACK && to < kills[i])
                    .copied()
            });
            out.push(Resend {
                message_id: id,
                answered: prev_answered,
                kill,
                flushed_after,
            });
        }
    }
    out
}

/// What a restart after kill `k` may re-send: the events of every request the killed agent
/// had sent that the server had not answered before the kill (in flight), plus those answered
/// since the spool's last flush seen before the kill, less [`ACK_SLACK`] (acknowledged, the
/// ack not yet durable). Returns (in flight, acknowledged unflushed).
fn resend_allowance(
    requests: &[RecordedRequest],
    kills: &[Instant],
    flushes: &[(Instant, Instant)],
    k: usize,
) -> (usize, usize) {
    let kill = kills[k];
    let born = k.checked_sub(1).map(|p| kills[p]);
    let last_flush = flushes
        .iter()
        .filter(|&&(from, to)| to < kill && born.is_none_or(|b| from > b))
        .map(|&(from, _)| from)
        .max();
    let (mut in_flight, mut unflushed) = (0, 0);
    for r in requests.iter().filter(|r| r.is_accepted()) {
        if r.received_at > kill || born.is_some_and(|b| r.received_at <= b) {
            continue;
        }
        match r.answered_at {
            Some(at) if at < kill => {
                if last_flush.is_none_or(|f| at + ACK_SLACK >= f) {
                    unflushed += r.event_count;
                }
            }
            _ => in_flight += r.event_count,
        }
    }
    (in_flight, unflushed)
}

/// Segment files of a spool (`segments/<id>.seg`).
fn segment_files(spool: &std::path::Path) -> usize {
    std::fs::read_dir(spool.join("segments")).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
            .count()
    })
}

/// A backlog spanning several segment files (32 MiB each) is spooled while Segment is down;
/// Segment comes back, and the agent is killed (`kill -9`) once part of the backlog was
/// accepted. After the restart: every event arrives; the restarted agent sends each at most
/// once; what it sends again from before the kill is only what was in flight or acknowledged
/// just before it (the ack not yet written out); and the spool gives its segments back.
#[test]
fn kill_9_mid_drain_of_a_backlog_over_several_segment_files() {
    /// Events of about 3.4 KB (a long link URL): 24,000 of them are about 80 MB of spool.
    const FILES: usize = 8;
    const PER_FILE: usize = 3_000;
    const URL_BYTES: usize = 3_000;
    /// How long after Segment's answer an ack may still be lost to `kill -9` (sled writes its
    /// buffers out every 200 ms): generous, for a loaded machine.
    const ACK_WRITTEN_WITHIN: Duration = Duration::from_millis(1500);
    /// The drain's pace (`segment.max_events_per_sec`), so that more is acknowledged well before
    /// the kill than in the last [`ACK_WRITTEN_WITHIN`]: the bound on re-sends then means
    /// something.
    const EVENTS_PER_SEC: u64 = 2_000;
    /// Waits for work proportional to the backlog (a debug build on a loaded machine).
    const BACKLOG_PATIENCE: Duration = Duration::from_secs(300);
    const BASE: u64 = 7_250_000_000_000_000_000;

    let mut env = new_env();
    env.config.gzip = Some(false);
    env.config.spool_max_bytes = Some(1 << 30);
    env.config.extra.push((
        "segment".into(),
        format!("max_events_per_sec = {EVENTS_PER_SEC}"),
    ));
    env.server.set_default(Reply::status(503));
    let spool = env.config.spool_dir.clone();
    let mut agent = env.start_agent();
    let mut expected = Vec::with_capacity(FILES * PER_FILE);
    for f in 0..FILES {
        let (bytes, ids) = click_session_lines(BASE + (f * PER_FILE) as u64, PER_FILE, URL_BYTES);
        write_atomically(&env.watch_dir().join(format!("backlog-{f}.jsonl")), &bytes);
        expected.extend(ids);
    }
    let spooled = wait_for_status(&env.config_path, BACKLOG_PATIENCE, |s| {
        status_u64(s, "files_done") == FILES as u64
            && status_u64(s, "spool_events") == expected.len() as u64
    });
    assert!(
        spooled.is_some(),
        "the backlog is spooled\n{}",
        agent.log_tail(30)
    );
    let (segments, bytes) = (segment_files(&spool), dir_bytes(&spool));
    eprintln!(
        "backlog: {} events, {segments} segment files, {bytes} bytes of spool",
        expected.len()
    );
    assert!(
        segments >= 3,
        "the backlog spans several segment files: {segments}"
    );

    // Segment comes back; the kill lands once half the backlog was accepted.
    env.server.set_default(Reply::ok());
    assert!(
        env.server
            .wait_for_accepted(expected.len() / 2, BACKLOG_PATIENCE),
        "the drain starts\n{}",
        agent.log_tail(30)
    );
    agent.kill();
    let killed_at = Instant::now();
    let accepted_before = env.server.accepted_count();
    let restarted_at = Instant::now();
    let agent = env.start_agent();
    assert!(
        env.server.wait_for_ids(&expected, BACKLOG_PATIENCE),
        "every event arrives after the restart: {}\n{}",
        DeliveryReport::of(&env.server, &expected).summary(),
        agent.log_tail(30)
    );
    env.server
        .wait_for_quiet(Duration::from_millis(1500), PATIENCE);

    let requests = env.server.requests();
    let report = DeliveryReport::of(&env.server, &expected);
    assert!(
        report.unexpected.is_empty(),
        "unexpected events: {}",
        report.summary()
    );
    // The restarted agent sends each event at most once.
    let mut after: HashMap<String, usize> = HashMap::new();
    for r in requests
        .iter()
        .filter(|r| r.is_accepted() && r.received_at >= restarted_at)
    {
        for id in r.message_ids() {
            *after.entry(id).or_default() += 1;
        }
    }
    let twice: Vec<&String> = after
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        twice.is_empty(),
        "{} events accepted twice after the restart, e.g. {:?}",
        twice.len(),
        twice.iter().take(3).collect::<Vec<_>>()
    );
    // What it sent again was in flight at the kill, or acknowledged just before it.
    let mut may_repeat: HashSet<String> = HashSet::new();
    for r in requests
        .iter()
        .filter(|r| r.is_accepted() && r.received_at < restarted_at)
    {
        if r.answered_at
            .is_none_or(|at| at + ACK_WRITTEN_WITHIN >= killed_at)
        {
            may_repeat.extend(r.message_ids());
        }
    }
    let unexplained: Vec<&(String, usize)> = report
        .repeated
        .iter()
        .filter(|(id, _)| !may_repeat.contains(id))
        .collect();
    eprintln!(
        "kill -9 after {accepted_before} events accepted: {} re-sent, {} in flight or acknowledged \
         within {ACK_WRITTEN_WITHIN:?} of the kill",
        report.extra_deliveries,
        may_repeat.len()
    );
    assert!(
        may_repeat.len() < accepted_before,
        "the kill came late enough into the drain that some acks were surely written out"
    );
    assert!(
        unexplained.is_empty(),
        "{} events re-sent that were acknowledged well before the kill, e.g. {:?}",
        unexplained.len(),
        unexplained.iter().take(3).collect::<Vec<_>>()
    );

    // The spool gives its disk back: nothing queued, at most the segment being written.
    let drained = wait_for_status(&env.config_path, PATIENCE, |s| {
        status_u64(s, "spool_events") == 0
    });
    assert!(
        drained.is_some(),
        "the spool is empty\n{}",
        agent.log_tail(30)
    );
    assert!(
        wait_until(PATIENCE, || segment_files(&spool) <= 1),
        "the drained segment files are deleted: {} left\n{}",
        segment_files(&spool),
        agent.log_tail(30)
    );
    eprintln!(
        "after the drain: {} segment file(s), {} bytes of spool (was {bytes})",
        segment_files(&spool),
        dir_bytes(&spool)
    );
}
