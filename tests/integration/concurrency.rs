//! How many requests go at once, and how fast (SPEC section 6): the adaptive concurrency limit
//! grows while Segment answers fast and steadily and falls when it answers 429, as `status`
//! shows; `max_events_per_sec` holds the events Segment receives per second within its bucket.

use std::time::{Duration, Instant};

use crate::util::{
    PATIENCE, Reply, TestEnv, assert_exactly_once, new_env, run_cli, session_export, status_u64,
    wait_delivered, wait_for_status, write_atomically,
};

/// Long enough for anything the agent should do "soon" on a loaded machine, and for a 429
/// backoff (at most `max_backoff_secs = 2` in the test config) or two.
const GENEROUS: Duration = Duration::from_secs(60);

fn limit_of(status: &serde_json::Value) -> u64 {
    status_u64(status, "concurrency_limit")
}

#[test]
fn the_adaptive_limit_grows_on_steady_answers_and_falls_on_429() {
    let mut env = new_env();
    // Default concurrency: adaptive. Below the fake server's 40 workers, so its answers stay
    // steady at any limit; small batches, so there are many of them.
    env.config.max_batch_events = Some(10);
    env.config = env
        .config
        .clone()
        .with_extra("segment", "max_concurrency = 6");
    env.server.set_delay(Duration::from_millis(50));
    let mut agent = env.start_agent();

    let first = session_export(7_130_000_000_000_000_000, 3000);
    write_atomically(&env.watch_dir().join("first"), &first.bytes);

    let status = wait_for_status(&env.config_path, GENEROUS, |s| {
        s["concurrency_limit"].as_u64().is_some_and(|l| l >= 3)
    });
    let Some(status) = status else {
        panic!(
            "the limit never rose above 2 with fast, steady answers\nagent log tail:\n{}",
            agent.log_tail(40)
        );
    };
    assert_eq!(status["concurrency_mode"], "adaptive", "{status}");
    assert_eq!(status_u64(&status, "max_concurrency"), 6, "{status}");
    assert!(limit_of(&status) <= 6, "{status}");
    let rtt = status["rtt_ms"].as_f64().expect("rtt_ms once answers came");
    assert!(
        rtt >= 50.0,
        "the round trip includes the server's 50 ms: {status}"
    );
    let human = run_cli(
        &[
            "status".as_ref(),
            "--config".as_ref(),
            env.config_path.as_os_str(),
        ],
        PATIENCE,
    );
    assert!(
        human.stdout.contains("concurrency:") && human.stdout.contains("adaptive, limit "),
        "{}",
        human.stdout
    );

    // Segment starts refusing: whatever is in flight or comes next gets 429.
    env.server.set_default(Reply::status(429));
    let second = session_export(7_130_000_000_000_100_000, 500);
    write_atomically(&env.watch_dir().join("second"), &second.bytes);
    let status = wait_for_status(&env.config_path, GENEROUS, |s| {
        s["concurrency_limit"].as_u64().is_some_and(|l| l <= 2)
            && env.server.requests().iter().any(|r| r.status == 429)
    });
    assert!(
        status.is_some(),
        "the limit did not fall to 2 or less after 429s\nagent log tail:\n{}",
        agent.log_tail(40)
    );

    // Segment recovers: everything arrives, once.
    env.server.set_default(Reply::ok());
    let mut expected = first.message_ids.clone();
    expected.extend(second.message_ids.iter().cloned());
    wait_delivered(&env, &agent, &expected, "after the 429s");
    assert_exactly_once(&env.server, &expected, &agent, "adaptive concurrency");
    let exit = agent
        .stop()
        .expect("the agent exits within 15 s of SIGTERM");
    assert!(exit.success(), "SIGTERM exits 0, got {exit}");
}

#[test]
fn max_events_per_sec_holds_what_segment_receives_within_the_bucket() {
    const RATE: u64 = 200;
    const EVENTS: usize = 2000;
    let mut env = TestEnv::new();
    env.config.log_level = Some("info,leanplum_segment_agent=debug".into());
    env.config = env
        .config
        .clone()
        .with_extra("segment", &format!("max_events_per_sec = {RATE}"));
    let mut agent = env.start_agent();

    let export = session_export(7_140_000_000_000_000_000, EVENTS);
    write_atomically(&env.watch_dir().join("backfill"), &export.bytes);
    let status = wait_for_status(&env.config_path, PATIENCE, |s| {
        s["max_events_per_sec"].as_u64().is_some()
    })
    .expect("status answers");
    assert_eq!(status_u64(&status, "max_events_per_sec"), RATE, "{status}");

    // The pace is the bucket's; a slow machine only makes it slower.
    if !env.server.wait_for_ids(&export.message_ids, GENEROUS) {
        panic!(
            "not all {EVENTS} events arrived\nagent log tail:\n{}",
            agent.log_tail(40)
        );
    }
    assert_exactly_once(&env.server, &export.message_ids, &agent, "rate-limited");
    let exit = agent
        .stop()
        .expect("the agent exits within 15 s of SIGTERM");
    assert!(exit.success(), "SIGTERM exits 0, got {exit}");

    let accepted: Vec<(Instant, usize)> = env
        .server
        .accepted_requests()
        .iter()
        .map(|r| (r.received_at, r.events().len()))
        .collect();
    for (_, n) in &accepted {
        assert!(
            *n as u64 <= RATE,
            "a batch of {n} events, larger than the bucket ({RATE})"
        );
    }
    // Over any window of several seconds: at most the bucket (one second of events, the
    // burst a full bucket allows) plus the rate over the window, with 50% slack for timers.
    let window = Duration::from_secs(4);
    let bound = (RATE as f64 * 1.5 * window.as_secs_f64()) as usize + RATE as usize;
    for (i, (start, _)) in accepted.iter().enumerate() {
        let in_window: usize = accepted[i..]
            .iter()
            .take_while(|(t, _)| t.duration_since(*start) < window)
            .map(|(_, n)| n)
            .sum();
        assert!(
            in_window <= bound,
            "{in_window} events received within {window:?} of request {i}; the ceiling of \
             {RATE}/s allows at most {bound}"
        );
    }
    // And over the whole run: the bucket plus the rate, so the run took at least this long.
    let (first, last) = (accepted[0].0, accepted[accepted.len() - 1].0);
    let span = last.duration_since(first).as_secs_f64();
    let total: usize = accepted.iter().map(|(_, n)| n).sum();
    assert!(
        total as f64 <= RATE as f64 * 1.5 * span + RATE as f64 + 1.0,
        "{total} events in {span:.1} s at a ceiling of {RATE}/s"
    );
}
