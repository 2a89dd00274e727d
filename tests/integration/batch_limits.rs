//! Batch size without gzip (SPEC section 6): with a small `max_batch_bytes` every request body
//! stays within it, is sent uncompressed, and every event still arrives exactly once.

use std::time::Duration;

use serde_json::Value;

use crate::events::{assert_same_events, derive_shard_1, expected_shard_0};
use crate::util::{
    PATIENCE, SHARD_0, SHARD_1, TestEnv, copy_into, file_name, read_repo_file, write_atomically,
};

const MAX_BATCH_BYTES: usize = 4000;

#[test]
fn uncompressed_batches_stay_within_max_batch_bytes() {
    let mut env = TestEnv::new();
    env.config.gzip = Some(false);
    env.config.max_batch_bytes = Some(MAX_BATCH_BYTES as u64);
    let mut agent = env.start_agent();

    let shard_dir = env.watch_dir().join("20261101");
    write_atomically(
        &shard_dir.join(file_name(SHARD_0)),
        &read_repo_file(SHARD_0),
    );
    copy_into(SHARD_1, &shard_dir.join(file_name(SHARD_1)));

    let shard_0 = expected_shard_0();
    let expected: Vec<Value> = shard_0
        .iter()
        .cloned()
        .chain(derive_shard_1(&shard_0))
        .collect();
    let arrived = env.server.wait_for_accepted(expected.len(), PATIENCE);
    env.server
        .wait_for_quiet(Duration::from_millis(1500), PATIENCE);
    let exit = agent.stop();
    assert!(
        arrived,
        "only {} of {} events accepted\nagent log tail:\n{}",
        env.server.accepted_count(),
        expected.len(),
        agent.log_tail(40)
    );
    let exit = exit.expect("the agent exits within 15 s of SIGTERM");
    assert!(exit.success(), "SIGTERM exits 0, got {exit}");

    let requests = env.server.requests();
    assert!(
        requests.len() >= 2,
        "{} events cannot fit one {MAX_BATCH_BYTES}-byte batch",
        expected.len()
    );
    for r in &requests {
        let n = r.seq;
        assert!(r.auth_ok, "request {n} authenticated");
        assert!(
            r.header("content-encoding")
                .is_none_or(|v| v.eq_ignore_ascii_case("identity")),
            "request {n}: gzip = false, yet Content-Encoding {:?}",
            r.header("content-encoding")
        );
        assert_eq!(r.body_error, None, "request {n}: plain JSON body");
        assert!(
            r.raw_body.len() <= MAX_BATCH_BYTES,
            "request {n}: {} bytes, limit {MAX_BATCH_BYTES}",
            r.raw_body.len()
        );
        assert_eq!(r.status, 200, "request {n} answered {}", r.status);
        assert!(r.sent_at().is_some(), "request {n} has sentAt");
    }
    assert_same_events(
        &env.server.accepted_events(),
        &expected,
        "accepted in small batches",
    );
}
