//! Segment misbehaving (SPEC section 6): a 400 is bisected down to the bad events, an event over
//! 32 KB never leaves the spool, a bad write key stops sending without losing anything, an
//! outage, connections reset or a dead endpoint are retried within `concurrency` and the
//! backoff, slow answers time out and are retried, `Retry-After` as an HTTP date is honoured,
//! and the backoff starts small again after a success. Every test ends with every good event accepted (exactly once, unless
//! it says why not).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::util::{
    Agent, DeliveryReport, PATIENCE, RecordedRequest, Reply, SegmentServer, TestEnv,
    assert_exactly_once, count_log_lines, dead_letters, free_port, requests_between,
    session_export, write_atomically,
};

/// eventIds of this file's tests: one range per test, far from the other test files'.
const BASE: u64 = 7_000_000_000_000_000_000;

fn sorted_ids(r: &RecordedRequest) -> Vec<String> {
    let mut ids = r.message_ids();
    ids.sort();
    ids
}

fn statuses(requests: &[RecordedRequest]) -> Vec<u16> {
    requests.iter().map(|r| r.status).collect()
}

#[test]
fn bad_request_is_bisected_and_only_the_bad_events_dead_lettered() {
    let mut env = TestEnv::new();
    env.config.max_batch_events = Some(40);
    // A request whose answer never comes back (seen under load with the fake server: the
    // client waits out its timeout) is retried after 5 s instead of 30.
    env.config.request_timeout_secs = Some(5);
    env.config.log_level = Some("info,leanplum_segment_agent=debug".into());
    let export = session_export(BASE + 1_000, 40);
    let bad: HashSet<String> = [7, 29]
        .iter()
        .map(|&i| export.message_ids[i].clone())
        .collect();
    let good: Vec<String> = export
        .message_ids
        .iter()
        .filter(|id| !bad.contains(*id))
        .cloned()
        .collect();
    env.server.reject_message_ids(bad.clone(), 400);
    let mut agent = env.start_agent();

    write_atomically(&env.watch_dir().join("bisect-1"), &export.bytes);

    let arrived = env.server.wait_for_ids(&good, PATIENCE);
    let lettered = crate::util::wait_until(PATIENCE, || {
        count_log_lines(&agent.logs(), "dead-lettered") >= bad.len()
    });
    env.server
        .wait_for_quiet(Duration::from_millis(1500), PATIENCE);
    let exit = agent.stop();
    let requests = env.server.requests();
    assert!(
        arrived,
        "the good events were not all accepted: {}\nstatuses {:?}\nanswers not delivered: \
         {:?}\nagent log tail:\n{}",
        DeliveryReport::of(&env.server, &good).summary(),
        statuses(&requests),
        requests
            .iter()
            .filter_map(|r| r.respond_error.as_deref())
            .collect::<Vec<_>>(),
        agent.log_tail(40)
    );
    assert!(
        lettered,
        "expected {} 'dead-lettered' log lines\nagent log tail:\n{}",
        bad.len(),
        agent.log_tail(40)
    );
    let exit = exit.expect("the agent exits within 15 s of SIGTERM");
    assert!(exit.success(), "SIGTERM exits 0, got {exit}");

    // Every good event once. At least once is the guarantee: a request whose answer the agent
    // never got (a timeout, a reset) is sent again, and if the server had taken it, its events
    // arrive twice (Segment dedupes them by messageId). That, and nothing else, may explain
    // a duplicate here: bisection itself never re-sends an accepted half.
    let logs = agent.logs();
    let lost_answers: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("delivery failed") && !l.contains("detail=HTTP"))
        .collect();
    let report = DeliveryReport::of(&env.server, &good);
    assert!(
        report.is_complete() && report.unexpected.is_empty(),
        "{}",
        report.summary()
    );
    if !report.is_exactly_once() {
        assert!(
            !lost_answers.is_empty(),
            "events accepted twice with no lost answer to explain it: {}\nstatuses {:?}\n{}",
            report.summary(),
            statuses(&requests),
            agent.log_tail(40)
        );
        eprintln!(
            "bisection: re-sent after a lost answer: {}; {}",
            report.summary(),
            lost_answers.join(" | ")
        );
    }
    for r in &requests {
        let has_bad = r.message_ids().iter().any(|id| bad.contains(id));
        assert_eq!(
            r.status,
            if has_bad { 400 } else { 200 },
            "request {}: {} events",
            r.seq,
            r.message_ids().len()
        );
    }
    // Bisection: each bad event costs about two requests per halving of the 40-event batch.
    let halvings = (40f64).log2().ceil() as usize;
    let bound = 2 * halvings * bad.len() + 3 + lost_answers.len();
    eprintln!(
        "bisection: {} requests for 40 events with {} bad ({} answered 400); bound {bound}",
        requests.len(),
        bad.len(),
        requests.iter().filter(|r| r.status == 400).count()
    );
    assert!(
        requests.len() <= bound,
        "{} requests to isolate {} bad events in 40 (bound {bound}); statuses {:?}",
        requests.len(),
        bad.len(),
        statuses(&requests)
    );
    // The first request carried the whole batch.
    assert_eq!(requests[0].message_ids().len(), 40, "one batch of 40 first");

    let letters = dead_letters(&env.config.spool_dir);
    let lettered_ids: BTreeSet<String> = letters.iter().map(|d| d.message_id.clone()).collect();
    assert_eq!(
        lettered_ids,
        bad.iter().cloned().collect::<BTreeSet<_>>(),
        "exactly the bad events are dead-lettered: {letters:#?}"
    );
    assert_eq!(
        letters.len(),
        bad.len(),
        "one dead letter each: {letters:#?}"
    );
    for d in &letters {
        assert_eq!(d.status, Some(400), "dead letter {}: status", d.message_id);
        let event: serde_json::Value = serde_json::from_str(&d.event)
            .unwrap_or_else(|e| panic!("dead letter {}: event JSON: {e}", d.message_id));
        assert_eq!(event["messageId"], d.message_id.as_str());
    }
}

#[test]
fn oversize_event_is_dead_lettered_before_sending() {
    let env = TestEnv::new();
    let mut agent = env.start_agent();

    let record = |event_id: u64, subject: &str| {
        serde_json::json!({
            "event": "Email Opened",
            "user_id": format!("big-user-{event_id}"),
            "device_id": "BIG-DEV-0001",
            "timestamp": "2026-11-03T08:00:00.125Z",
            "message_id": "5680127476129675",
            "channel": "email",
            "event_id": (BASE + event_id).to_string(),
            "email_subject": subject,
        })
        .to_string()
    };
    let big_subject = "S".repeat(40 * 1024);
    let mut lines = Vec::new();
    let mut good = Vec::new();
    for i in 0..6u64 {
        if i == 3 {
            lines.push(record(2_003, &big_subject));
        } else {
            lines.push(record(2_000 + i, "A normal subject"));
            good.push(format!("lp-e-{}", BASE + 2_000 + i));
        }
    }
    let big_id = format!("lp-e-{}", BASE + 2_003);
    write_atomically(
        &env.watch_dir().join("engagements-big.jsonl"),
        format!("{}\n", lines.join("\n")).as_bytes(),
    );

    let arrived = env.server.wait_for_ids(&good, PATIENCE);
    env.server
        .wait_for_quiet(Duration::from_millis(1500), PATIENCE);
    let exit = agent.stop();
    assert!(
        arrived,
        "{}\nagent log tail:\n{}",
        DeliveryReport::of(&env.server, &good).summary(),
        agent.log_tail(40)
    );
    assert!(
        exit.expect("the agent exits within 15 s of SIGTERM")
            .success(),
        "SIGTERM exits 0"
    );
    // The big one would show up as unexpected.
    assert_exactly_once(
        &env.server,
        &good,
        &agent,
        "engagements beside an oversize one",
    );
    for r in env.server.requests() {
        assert!(
            !r.message_ids().contains(&big_id),
            "request {} carried the oversize event",
            r.seq
        );
        for e in r.events() {
            let len = serde_json::to_vec(&e).expect("serialize").len();
            assert!(len <= 32 * 1024, "request {}: a {len}-byte event", r.seq);
        }
    }

    let letters = dead_letters(&env.config.spool_dir);
    assert_eq!(letters.len(), 1, "one dead letter: {letters:#?}");
    let d = &letters[0];
    assert_eq!(d.message_id, big_id);
    assert_eq!(d.status, None, "never sent, so no HTTP status");
    assert!(
        d.event.len() > 32 * 1024 && d.event.contains(&big_subject),
        "the dead letter keeps the event as it would have been sent ({} bytes)",
        d.event.len()
    );
}

#[test]
fn unauthorized_stops_sending_keeps_everything_then_recovers() {
    const CONCURRENCY: usize = 4;
    const MAX_BACKOFF_SECS: u64 = 2;
    const WINDOW: Duration = Duration::from_secs(5);
    let mut env = TestEnv::new();
    env.config.concurrency = Some(CONCURRENCY as u64);
    env.config.max_batch_events = Some(20);
    env.config.max_backoff_secs = Some(MAX_BACKOFF_SECS);
    env.server.set_default(Reply::status(401));
    let mut agent = env.start_agent();

    // 10 batches: more than `concurrency`, so a runaway retry loop would show.
    let export = session_export(BASE + 3_000, 200);
    write_atomically(&env.watch_dir().join("unauthorized-1"), &export.bytes);

    assert!(
        env.server.wait_for_requests(1, PATIENCE),
        "no request\nagent log tail:\n{}",
        agent.log_tail(40)
    );
    let t0 = env.server.requests()[0].received_at;
    // The scenario: watch the retries for a fixed window.
    thread::sleep((t0 + WINDOW).saturating_duration_since(Instant::now()));
    let during = requests_between(&env.server.requests(), t0, t0 + WINDOW);
    let accepted_during = env.server.accepted_count();
    assert!(agent.is_running(), "a bad key does not stop the agent");

    // Retried at the max backoff: at most one round of `concurrency` requests per backoff,
    // plus the first round.
    let bound = ((WINDOW.as_secs_f64() / MAX_BACKOFF_SECS as f64) + 1.0) * CONCURRENCY as f64;
    let rounds = rounds(&during);
    eprintln!(
        "401: {} requests in {WINDOW:?} in {} rounds (bound {bound}); gaps between rounds {:?}",
        during.len(),
        rounds.len(),
        round_gaps(&rounds)
    );
    assert!(
        (during.len() as f64) <= bound,
        "{} requests in {WINDOW:?} answered 401 (bound {bound})",
        during.len()
    );
    assert!(
        during.iter().all(|r| r.status == 401),
        "statuses {:?}",
        statuses(&during)
    );
    assert!(
        rounds.len() >= 2,
        "the agent keeps trying: {} rounds",
        rounds.len()
    );
    assert_eq!(accepted_during, 0);
    let batches: HashSet<String> = during.iter().map(|r| r.message_ids()[0].clone()).collect();
    assert!(
        batches.len() <= CONCURRENCY,
        "no new batches claimed while refused: {} distinct batches",
        batches.len()
    );

    env.server.set_default(Reply::ok());
    deliver_and_stop(
        &env.server,
        &mut agent,
        &export.message_ids,
        "after the key works again",
    );
    assert_exactly_once(
        &env.server,
        &export.message_ids,
        &agent,
        "after a 401 period",
    );
}

/// Waits until every id in `ids` was accepted and the agent has gone quiet, stops it, and checks
/// that it delivered them and exited 0 after SIGTERM. Every request the server saw.
fn deliver_and_stop(
    server: &SegmentServer,
    agent: &mut Agent,
    ids: &[String],
    what: &str,
) -> Vec<RecordedRequest> {
    let arrived = server.wait_for_ids(ids, PATIENCE);
    server.wait_for_quiet(Duration::from_millis(1500), PATIENCE);
    let exit = agent.stop();
    let requests = server.requests();
    assert!(
        arrived,
        "{what}: {}\nstatuses {:?}\nagent log tail:\n{}",
        DeliveryReport::of(server, ids).summary(),
        statuses(&requests),
        agent.log_tail(40)
    );
    assert!(exit.expect("exits after SIGTERM").success());
    requests
}

/// Requests grouped into rounds: a new round starts after a pause of more than 500 ms.
fn rounds(requests: &[RecordedRequest]) -> Vec<Vec<RecordedRequest>> {
    let mut out: Vec<Vec<RecordedRequest>> = Vec::new();
    for r in requests {
        match out.last_mut() {
            Some(round)
                if r.received_at.saturating_duration_since(
                    round.last().expect("a round has a request").received_at,
                ) <= Duration::from_millis(500) =>
            {
                round.push(r.clone())
            }
            _ => out.push(vec![r.clone()]),
        }
    }
    out
}

fn round_gaps(rounds: &[Vec<RecordedRequest>]) -> Vec<Duration> {
    rounds
        .windows(2)
        .map(|w| {
            w[1][0]
                .received_at
                .saturating_duration_since(w[0][0].received_at)
        })
        .collect()
}

#[test]
fn outage_5xx_then_recovery_bounded_requests() {
    const CONCURRENCY: usize = 2;
    const OUTAGE: Duration = Duration::from_secs(6);
    let mut env = TestEnv::new();
    env.config.concurrency = Some(CONCURRENCY as u64);
    env.config.initial_backoff_ms = Some(200);
    env.config.max_backoff_secs = Some(2);
    env.config.max_batch_events = Some(50);
    env.server.set_default(Reply::status(503));
    let mut agent = env.start_agent();

    let export = session_export(BASE + 4_000, 300);
    write_atomically(&env.watch_dir().join("outage-1"), &export.bytes);

    assert!(
        env.server.wait_for_requests(1, PATIENCE),
        "no request\nagent log tail:\n{}",
        agent.log_tail(40)
    );
    let t0 = env.server.requests()[0].received_at;
    // The scenario: an outage of a fixed length.
    thread::sleep((t0 + OUTAGE).saturating_duration_since(Instant::now()));
    let during = requests_between(&env.server.requests(), t0, t0 + OUTAGE);
    // Exponential full-jitter backoff from 200 ms to 2 s: the ceilings of successive waits
    // are 0.2, 0.4, 0.8, 1.6, 2, 2, ... s, so an average round lasts about a second once the
    // ceiling is reached. 2 batches × ~10 rounds is the expectation; 40 means the waits
    // averaged 0.3 s, which full jitter does not produce by chance; a storm would be hundreds.
    eprintln!(
        "503 outage: {} requests in {OUTAGE:?} with concurrency {CONCURRENCY} ({} rounds)",
        during.len(),
        rounds(&during).len()
    );
    assert!(
        during.len() <= 40,
        "{} requests in a {OUTAGE:?} outage: not backing off",
        during.len()
    );
    assert!(during.len() >= 2, "retried during the outage");
    assert_eq!(env.server.accepted_count(), 0);
    // Memory stays bounded: only the batches already in flight are retried; nothing new is
    // claimed while they wait.
    let batches: HashSet<String> = during.iter().map(|r| r.message_ids()[0].clone()).collect();
    assert!(
        batches.len() <= CONCURRENCY,
        "{} distinct batches sent during the outage, concurrency {CONCURRENCY}",
        batches.len()
    );

    env.server.set_default(Reply::ok());
    deliver_and_stop(
        &env.server,
        &mut agent,
        &export.message_ids,
        "after the outage",
    );
    assert_exactly_once(
        &env.server,
        &export.message_ids,
        &agent,
        "after a 503 outage",
    );
}

/// A front on its own port before the Segment server: while `resetting` holds, it resets every
/// connection (it reads a few bytes of the request and closes the socket with the rest unread,
/// which makes the kernel answer with RST); afterwards it passes connections through. It
/// records when each reset happened.
struct ResettingFront {
    port: u16,
    resetting: Arc<AtomicBool>,
    resets: Arc<std::sync::Mutex<Vec<Instant>>>,
}

impl ResettingFront {
    fn start(target: std::net::SocketAddr) -> ResettingFront {
        use std::io::Read;
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the front");
        let port = listener.local_addr().expect("front address").port();
        let resetting = Arc::new(AtomicBool::new(true));
        let resets = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (on, log) = (resetting.clone(), resets.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut client) = conn else { continue };
                if on.load(Ordering::SeqCst) {
                    let mut head = [0u8; 16];
                    let _ = client.read(&mut head);
                    log.lock().unwrap().push(Instant::now());
                    drop(client);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                };
                let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                    continue;
                };
                pipe(client, upstream);
                pipe(u2, c2);
            }
        });
        ResettingFront {
            port,
            resetting,
            resets,
        }
    }
}

#[test]
fn connection_resets_are_retried_within_the_backoff() {
    const OUTAGE: Duration = Duration::from_secs(6);
    let mut env = TestEnv::new();
    let front = ResettingFront::start(env.server.addr());
    env.config.endpoint = format!("http://127.0.0.1:{}", front.port);
    env.config.concurrency = Some(2);
    env.config.initial_backoff_ms = Some(200);
    env.config.max_backoff_secs = Some(2);
    env.config.max_batch_events = Some(50);
    let mut agent = env.start_agent();

    let export = session_export(BASE + 5_500, 300);
    write_atomically(&env.watch_dir().join("reset-conn-1"), &export.bytes);
    assert!(
        crate::util::wait_until(PATIENCE, || !front.resets.lock().unwrap().is_empty()),
        "no connection reached the front\nagent log tail:\n{}",
        agent.log_tail(40)
    );
    let t0 = front.resets.lock().unwrap()[0];
    // The scenario: an outage of a fixed length.
    thread::sleep((t0 + OUTAGE).saturating_duration_since(Instant::now()));
    front.resetting.store(false, Ordering::SeqCst);
    let resets = front.resets.lock().unwrap().len();
    // As for the 503 outage: two batches retried with full-jitter backoff from 200 ms to 2 s
    // make about 10 rounds each in 6 s; a storm would be hundreds.
    eprintln!("connection resets: {resets} connections reset in {OUTAGE:?}");
    assert!(resets >= 2, "retried during the resets");
    assert!(
        resets <= 40,
        "{resets} connections in {OUTAGE:?} of resets: not backing off"
    );
    assert!(agent.is_running());
    assert_eq!(env.server.accepted_count(), 0, "nothing got through");

    deliver_and_stop(
        &env.server,
        &mut agent,
        &export.message_ids,
        "after the resets",
    );
    assert_exactly_once(
        &env.server,
        &export.message_ids,
        &agent,
        "after connection resets",
    );
}

#[test]
fn connection_refused_then_server_appears() {
    let mut env = TestEnv::new();
    let port = free_port();
    env.config.endpoint = format!("http://127.0.0.1:{port}");
    env.config.max_backoff_secs = Some(2);
    let mut agent = env.start_agent();

    let export = session_export(BASE + 5_000, 100);
    write_atomically(&env.watch_dir().join("refused-1"), &export.bytes);
    let started = Instant::now();
    assert!(
        agent.wait_for_log("delivery failed", PATIENCE),
        "no failed delivery logged while nothing listens\nagent log tail:\n{}",
        agent.log_tail(40)
    );
    // The scenario: nothing listens for 3 s while the agent retries.
    thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
    assert!(agent.is_running());

    let server = SegmentServer::start_on(port);
    deliver_and_stop(
        &server,
        &mut agent,
        &export.message_ids,
        "once the server listens",
    );
    assert_exactly_once(
        &server,
        &export.message_ids,
        &agent,
        "after connection refused",
    );
    assert!(
        env.server.requests().is_empty(),
        "nothing went to the other server"
    );
}

#[test]
fn slow_responses_time_out_and_are_retried() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let mut env = TestEnv::new();
    // One batch in flight, so the two slow answers fall on successive attempts of one batch.
    env.config.concurrency = Some(1);
    env.config.request_timeout_secs = Some(TIMEOUT.as_secs());
    env.config.max_batch_events = Some(20);
    env.server.push_replies([
        Reply::ok().with_delay(Duration::from_secs(3)),
        Reply::ok().with_delay(Duration::from_secs(3)),
    ]);
    let mut agent = env.start_agent();

    let export = session_export(BASE + 6_000, 60);
    write_atomically(&env.watch_dir().join("slow-1"), &export.bytes);

    let arrived = env.server.wait_for_ids(&export.message_ids, PATIENCE);
    // The slow answers are written 3 s after their requests; wait for them so the record of
    // what the server accepted is final.
    let answered = crate::util::wait_until(PATIENCE, || {
        env.server
            .requests()
            .iter()
            .all(|r| r.answered_at.is_some())
    });
    env.server
        .wait_for_quiet(Duration::from_millis(1500), PATIENCE);
    let exit = agent.stop();
    let requests = env.server.requests();
    assert!(
        arrived,
        "{}\nstatuses {:?}\nagent log tail:\n{}",
        DeliveryReport::of(&env.server, &export.message_ids).summary(),
        statuses(&requests),
        agent.log_tail(40)
    );
    assert!(answered, "the server answered everything");
    assert!(exit.expect("exits after SIGTERM").success());

    assert!(
        requests.len() >= 5,
        "2 timed out + 3 batches: {} requests",
        requests.len()
    );
    // Answered after the agent had given up: the server took the batch, the agent did not know.
    let orphaned = |r: &RecordedRequest| {
        r.answered_at
            .is_some_and(|a| a.saturating_duration_since(r.received_at) >= TIMEOUT)
    };
    assert!(
        orphaned(&requests[0]) && orphaned(&requests[1]),
        "the first two were slow"
    );
    assert_eq!(
        sorted_ids(&requests[0]),
        sorted_ids(&requests[1]),
        "the timed-out batch was sent again as it was"
    );
    assert_eq!(
        sorted_ids(&requests[1]),
        sorted_ids(&requests[2]),
        "and again after the second timeout"
    );
    assert!(!orphaned(&requests[2]) && requests[2].status == 200);
    let retry_gap = requests[1]
        .received_at
        .saturating_duration_since(requests[0].received_at);
    assert!(
        retry_gap >= TIMEOUT - Duration::from_millis(50),
        "the retry came {retry_gap:?} after the first attempt: before the timeout"
    );

    let report = DeliveryReport::of(&env.server, &export.message_ids);
    assert!(report.is_complete(), "{}", report.summary());
    // Duplicates come only from the orphaned requests: without them, exactly once.
    let orphan_events: usize = requests
        .iter()
        .filter(|r| orphaned(r) && r.is_accepted())
        .map(|r| r.message_ids().len())
        .sum();
    let orphan_ids: HashSet<String> = requests
        .iter()
        .filter(|r| orphaned(r))
        .flat_map(|r| r.message_ids())
        .collect();
    for (id, n) in &report.repeated {
        assert!(
            orphan_ids.contains(id),
            "{id} accepted {n} times but never in a request answered after the timeout"
        );
    }
    assert_eq!(
        report.extra_deliveries, orphan_events,
        "each orphaned acceptance is one duplicate, and there are no others"
    );
    let respond_errors = requests
        .iter()
        .filter(|r| r.respond_error.is_some())
        .count();
    eprintln!(
        "slow responses: {} requests, {} answered after the client's timeout \
         ({respond_errors} with a write error on the server), {} messageIds accepted twice or \
         more, {} duplicate deliveries",
        requests.len(),
        requests.iter().filter(|r| orphaned(r)).count(),
        report.repeated.len(),
        report.extra_deliveries
    );
}

#[test]
fn retry_after_http_date_is_honoured() {
    let mut env = TestEnv::new();
    env.config.concurrency = Some(1);
    // Above the Retry-After, so the clamp to max_backoff does not decide the wait.
    env.config.max_backoff_secs = Some(10);
    let fired = Arc::new(AtomicBool::new(false));
    let target = Arc::new(std::sync::Mutex::new(None::<SystemTime>));
    {
        let (fired, target) = (fired.clone(), target.clone());
        // The date is made when the request arrives, rounded up to a whole second (HTTP
        // dates have no fractions) at least 2 s ahead: the wait asked for is 2 to 3 s.
        env.server.set_rule(move |_| {
            if fired.swap(true, Ordering::SeqCst) {
                return None;
            }
            let ahead = SystemTime::now() + Duration::from_secs(2);
            let secs = ahead
                .duration_since(UNIX_EPOCH)
                .expect("after 1970")
                .as_secs_f64()
                .ceil() as u64;
            let at = UNIX_EPOCH + Duration::from_secs(secs);
            *target.lock().expect("target lock") = Some(at);
            Some(Reply::status(429).with_header("Retry-After", &httpdate::fmt_http_date(at)))
        });
    }
    let mut agent = env.start_agent();

    let export = session_export(BASE + 7_000, 20);
    write_atomically(&env.watch_dir().join("retry-after-1"), &export.bytes);

    let requests = deliver_and_stop(&env.server, &mut agent, &export.message_ids, "after a 429");
    assert!(requests.len() >= 2);
    let (limited, next) = (&requests[0], &requests[1]);
    assert_eq!(limited.status, 429);
    assert_eq!(
        sorted_ids(limited),
        sorted_ids(next),
        "the same batch again"
    );
    let answered = limited.answered_at.expect("the 429 was answered");
    let answered_wall =
        limited.received_wall + answered.saturating_duration_since(limited.received_at);
    let target = target
        .lock()
        .expect("target lock")
        .expect("the rule set a date");
    let asked = target
        .duration_since(answered_wall)
        .unwrap_or(Duration::ZERO);
    let waited = next.received_at.saturating_duration_since(answered);
    eprintln!("Retry-After date: asked to wait {asked:?}, waited {waited:?}");
    assert!(
        waited >= Duration::from_millis(1500),
        "retried {waited:?} after a 429 with Retry-After {asked:?} ahead"
    );
    assert!(
        waited + Duration::from_millis(250) >= asked,
        "retried {waited:?} after a 429 asking for {asked:?}"
    );
    assert_exactly_once(&env.server, &export.message_ids, &agent, "after a 429");
}

#[test]
fn backoff_resets_after_success() {
    // The first outage is long (12 failures), so without a reset the next wait would be drawn
    // from [0, 100 ms × 2^12 = 410 s]: below 5 s only 1.2% of the time, while with the reset it
    // is at most 100 ms (5 s leaves room for a loaded machine). SIGUSR1 ("drain now") skips
    // each wait so the test stays fast; it does not touch the failure count.
    const FIRST_OUTAGE: usize = 12;
    let mut env = TestEnv::new();
    env.config.concurrency = Some(1);
    env.config.initial_backoff_ms = Some(100);
    env.config.max_backoff_secs = Some(600);
    env.server
        .push_replies(std::iter::repeat_n(Reply::status(503), FIRST_OUTAGE));
    env.server
        .push_replies([Reply::ok(), Reply::status(503), Reply::ok()]);
    let mut agent = env.start_agent();

    let first = session_export(BASE + 8_000, 20);
    write_atomically(&env.watch_dir().join("reset-1"), &first.bytes);

    // Kick the agent whenever it sits in a backoff for more than 300 ms.
    let deadline = Instant::now() + PATIENCE;
    let mut kicks = 0;
    while env.server.requests().len() < FIRST_OUTAGE + 1 && Instant::now() < deadline {
        let before = env.server.requests().len();
        thread::sleep(Duration::from_millis(300));
        let requests = env.server.requests();
        if requests.len() == before && requests.last().is_some_and(|r| r.status == 503) {
            agent.signal(libc::SIGUSR1);
            kicks += 1;
        }
    }
    assert!(
        env.server.wait_for_ids(&first.message_ids, PATIENCE),
        "first file after {FIRST_OUTAGE} failures: statuses {:?}\nagent log tail:\n{}",
        statuses(&env.server.requests()),
        agent.log_tail(40)
    );

    let second = session_export(BASE + 8_100, 20);
    write_atomically(&env.watch_dir().join("reset-2"), &second.bytes);
    let requests = deliver_and_stop(&env.server, &mut agent, &second.message_ids, "second file");

    let mut want = vec![503; FIRST_OUTAGE];
    want.extend([200, 503, 200]);
    assert_eq!(statuses(&requests), want, "the script ran in order");
    let failed = &requests[FIRST_OUTAGE + 1];
    let retried = &requests[FIRST_OUTAGE + 2];
    let gap = retried
        .received_at
        .saturating_duration_since(failed.answered_at.expect("answered"));
    eprintln!(
        "backoff reset: {kicks} SIGUSR1 kicks in the first outage; retry after the reset came {gap:?} after the failure"
    );
    assert!(
        gap < Duration::from_secs(5),
        "after a success the backoff starts at 100 ms again, yet the retry came {gap:?} later"
    );
    let mut all = first.message_ids.clone();
    all.extend(second.message_ids.iter().cloned());
    assert_exactly_once(&env.server, &all, &agent, "two outages");
}
