//! `kill -9` at random moments (SPEC section 7: "crash at any instant loses nothing that was
//! committed and re-reads what was not; a restart re-sends at most the batches that were in
//! flight"). Files keep arriving while the agent is killed and restarted on the same spool and
//! watch dir; in the end every event must have reached Segment, and the duplicates must be
//! explained by what was in flight (or acked but not yet flushed) at each kill.
//!
//! Set `LSA_CRASH_SEED` to replay a run; the seed is printed either way.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

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

/// How far before a kill an acknowledged batch may still be in the spool: acks are one sled
/// transaction that is not flushed (spool module doc, transaction 2); sled writes its log at
/// least every 1000 ms (`flush_every_ms`) and at every chunk commit. 1.5 s leaves half a
/// second for a flusher thread that a loaded machine runs late.
const UNFLUSHED_ACKS: Duration = Duration::from_millis(1500);

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
    let server_rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed ^ 0x5e67_e17)));
    env.server.set_rule(move |_| {
        let ms = server_rng.lock().expect("server rng").u64(0..=50);
        Some(Reply::ok().with_delay(Duration::from_millis(ms)))
    });

    let started = Instant::now();
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

    // Which events each kill could legitimately make the agent send again: those in requests
    // the server had received by the kill and that were still in flight, or answered at most
    // UNFLUSHED_ACKS before it (acked, but the removal maybe not yet on disk).
    let exposed: Vec<HashSet<String>> = kill_times
        .iter()
        .map(|&kill| exposed_at(&requests, kill))
        .collect();
    let exposed_total: usize = exposed.iter().map(HashSet::len).sum();
    let exposed_any: HashSet<&String> = exposed.iter().flatten().collect();
    let unexplained: Vec<&(String, usize)> = report
        .repeated
        .iter()
        .filter(|(id, _)| !exposed_any.contains(id))
        .collect();
    let mut times: HashMap<usize, usize> = HashMap::new();
    for (_, n) in &report.repeated {
        *times.entry(*n).or_default() += 1;
    }
    let causes = duplicate_causes(&requests, &kill_times);
    let in_flight_dups = causes
        .iter()
        .filter(|c| c.acked_before_kill.is_none())
        .count();
    let oldest_ack = causes.iter().filter_map(|c| c.acked_before_kill).max();
    let late: Vec<&DuplicateCause> = causes
        .iter()
        .filter(|c| c.acked_before_kill.is_some_and(|age| age > UNFLUSHED_ACKS))
        .collect();
    let in_flight_bound = KILLS * CONCURRENCY * MAX_BATCH_EVENTS;
    eprintln!(
        "crash test (seed {seed}): {KILLS} kills in {chaos:?}, {} events in {FILES} files, \
         {} requests; {accepted_before_calm} events accepted during the kills; \
         {} messageIds accepted more than once ({} duplicate deliveries; by times accepted: \
         {times:?}); exposed at the kills: {exposed_total} events \
         (in-flight bound kills × concurrency × max_batch_events = {in_flight_bound}); \
         of the re-sends, {in_flight_dups} were in flight at the kill and {} acked before it, \
         the oldest ack {oldest_ack:?} before the kill",
        expected.len(),
        requests.len(),
        report.repeated.len(),
        report.extra_deliveries,
        causes.len() - in_flight_dups,
    );
    assert!(
        late.is_empty(),
        "seed {seed}: {} re-sends of events acked more than {UNFLUSHED_ACKS:?} before the kill \
         that preceded them (acks older than sled's flush interval must survive kill -9), e.g. \
         {:?}",
        late.len(),
        late.iter()
            .take(5)
            .map(|c| (&c.message_id, c.acked_before_kill))
            .collect::<Vec<_>>()
    );
    // Every duplicate is an event that was in flight, or acked but possibly unflushed, at some
    // kill, and there are no more duplicate deliveries than such exposures: a restart re-sends
    // at most what was in flight plus the last unflushed acks (SPEC section 7).
    assert!(
        unexplained.is_empty(),
        "seed {seed}: {} messageIds accepted more than once though never in flight near a kill, \
         e.g. {:?}",
        unexplained.len(),
        unexplained.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        report.extra_deliveries <= exposed_total,
        "seed {seed}: {} duplicate deliveries, but only {exposed_total} events were in flight \
         or freshly acked at the {KILLS} kills",
        report.extra_deliveries
    );
}

/// A request the dying agent had fully written may be read by the server just after the kill.
const SOCKET_BACKLOG: Duration = Duration::from_millis(100);

/// messageIds of the requests received by `kill` (the moment the killed agent was reaped, plus
/// [`SOCKET_BACKLOG`]) that were unanswered then, or answered within [`UNFLUSHED_ACKS`] before
/// it.
fn exposed_at(requests: &[RecordedRequest], kill: Instant) -> HashSet<String> {
    requests
        .iter()
        .filter(|r| r.received_at <= kill + SOCKET_BACKLOG)
        .filter(|r| r.answered_at.is_none_or(|a| a + UNFLUSHED_ACKS >= kill))
        .flat_map(RecordedRequest::message_ids)
        .collect()
}

/// Why one messageId was accepted again: the kill that came between its acceptance and the
/// re-send, and how long before that kill the first acceptance was answered (`None`: it was
/// still in flight at the kill).
#[derive(Debug)]
struct DuplicateCause {
    message_id: String,
    acked_before_kill: Option<Duration>,
}

/// One cause per duplicate delivery (every acceptance after the first).
fn duplicate_causes(requests: &[RecordedRequest], kills: &[Instant]) -> Vec<DuplicateCause> {
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let mut causes = Vec::new();
    let mut accepted: Vec<&RecordedRequest> = requests.iter().filter(|r| r.is_accepted()).collect();
    accepted.sort_by_key(|r| r.received_at);
    for r in accepted {
        let answered = r.answered_at.unwrap_or(r.received_at);
        for id in r.message_ids() {
            match seen.get(&id) {
                None => {
                    seen.insert(id, answered);
                }
                Some(&first) => {
                    // The re-sending agent was started after the last kill before this request.
                    let kill = kills.iter().rev().find(|&&k| k <= r.received_at).copied();
                    let acked_before_kill = match kill {
                        Some(k) if first <= k => Some(k - first),
                        _ => None,
                    };
                    causes.push(DuplicateCause {
                        message_id: id,
                        acked_before_kill,
                    });
                }
            }
        }
    }
    causes
}
