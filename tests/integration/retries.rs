//! Refused batches (SPEC section 6): a 503 and a 429 are retried with the same events, the
//! 429's `Retry-After` is honoured, `sentAt` is fresh on every attempt, and in the end every
//! event is accepted exactly once.

use std::time::Duration;

use crate::events::{assert_same_events, expected_shard_0, timestamp_millis};
use crate::util::{PATIENCE, Reply, SHARD_0, TestEnv, file_name, read_repo_file, write_atomically};

#[test]
fn refused_batches_are_resent_with_the_same_events() {
    let mut env = TestEnv::new();
    // One batch in flight, so the scripted answers fall on successive attempts of one batch.
    env.config.concurrency = Some(1);
    env.server.push_replies([
        Reply::status(503),
        Reply::status(429).with_header("Retry-After", "1"),
    ]);
    let mut agent = env.start_agent();

    write_atomically(
        &env.watch_dir().join("20261101").join(file_name(SHARD_0)),
        &read_repo_file(SHARD_0),
    );

    let expected = expected_shard_0();
    let arrived = env.server.wait_for_accepted(expected.len(), PATIENCE);
    env.server
        .wait_for_quiet(Duration::from_millis(1500), PATIENCE);
    let exit = agent.stop();
    let requests = env.server.requests();
    assert!(
        arrived,
        "only {} of {} events accepted; statuses so far {:?}\nagent log tail:\n{}",
        env.server.accepted_count(),
        expected.len(),
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        agent.log_tail(40)
    );
    let exit = exit.expect("the agent exits within 15 s of SIGTERM");
    assert!(exit.success(), "SIGTERM exits 0, got {exit}");

    assert!(
        requests.len() >= 3,
        "503, 429, then success: {} requests",
        requests.len()
    );
    for r in &requests {
        assert!(r.auth_ok, "request {} authenticated", r.seq);
        assert_eq!(r.body_error, None, "request {}: body", r.seq);
    }
    let (refused, limited, accepted) = (&requests[0], &requests[1], &requests[2]);
    assert_eq!(
        (refused.status, limited.status, accepted.status),
        (503, 429, 200),
        "the script ran in order"
    );

    // A retry re-sends the same events: same messageIds, nothing added, nothing dropped.
    let sorted_ids = |r: &crate::util::RecordedRequest| {
        let mut ids = r.message_ids();
        ids.sort();
        ids
    };
    assert!(
        !refused.events().is_empty(),
        "the first attempt carried events"
    );
    assert_eq!(
        sorted_ids(refused),
        sorted_ids(accepted),
        "the 503'd batch was re-sent as it was"
    );
    assert_eq!(
        sorted_ids(limited),
        sorted_ids(accepted),
        "the 429'd batch was re-sent as it was"
    );

    // Retry-After: 1 was honoured (with slack for timer granularity).
    let answered = limited.answered_at.expect("the 429 was answered");
    let waited = accepted.received_at.saturating_duration_since(answered);
    assert!(
        waited >= Duration::from_millis(900),
        "retried {waited:?} after a 429 with Retry-After: 1"
    );

    // sentAt is set per attempt: the attempt a second later says so.
    let sent_at = |r: &crate::util::RecordedRequest| {
        let s = r
            .sent_at()
            .unwrap_or_else(|| panic!("request {} has no sentAt", r.seq));
        timestamp_millis(&s).unwrap_or_else(|e| panic!("request {}: sentAt: {e}", r.seq))
    };
    assert!(
        sent_at(accepted) - sent_at(limited) >= 900,
        "sentAt is fresh per attempt: {:?} then {:?}",
        limited.sent_at(),
        accepted.sent_at()
    );

    assert_same_events(
        &env.server.accepted_events(),
        &expected,
        "accepted after retries",
    );
}
