//! SIGHUP while running (SPEC sections 3 and 9): a write key rotated in its key file after
//! Segment refused the old one, a catalog with a changed channel and a smaller
//! `max_batch_events` applied to what is sent next, a `[watch]` change reported as taking effect
//! at the next restart; and `run` refusing a bad config with exit 78.
//! (`service.rs` covers the endpoint, an invalid config kept out and the log level.)

use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::util::{
    Agent, EX_CONFIG, PATIENCE, TestEnv, WRITE_KEY, assert_exactly_once, count_log_lines, lp_id,
    new_env, open_session_lines, repo_path, wait_delivered, wait_for_status, write_atomically,
};

/// eventIds of this module: `BASE + test * 1_000_000 + i`.
const BASE: u64 = 8_600_000_000_000_000_000;

fn ids_base(test: u64) -> u64 {
    BASE + test * 1_000_000
}

/// Drops a file of `n` one-event sessions (email opens, eventIds from `first`); their ids.
fn drop_events(env: &TestEnv, name: &str, first: u64, n: usize) -> Vec<String> {
    let (bytes, ids) = open_session_lines(first, n);
    write_atomically(&env.watch_dir().join(name), &bytes);
    ids
}

/// Writes the key file as an operator would: the key and a newline, readable by its owner only.
fn write_key_file(path: &Path, key: &str) {
    fs::write(path, format!("{key}\n")).expect("write the key file");
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod the key file");
}

/// How many times the log says a reload was applied (with or without sections needing a
/// restart).
fn reloads(agent: &Agent) -> usize {
    count_log_lines(&agent.logs(), "config reloaded")
}

/// SIGHUP, then waits for the log to say the reload was applied.
fn reload(agent: &mut Agent, what: &str) {
    let before = reloads(agent);
    agent.signal(libc::SIGHUP);
    assert!(
        crate::util::wait_until(PATIENCE, || reloads(agent) > before),
        "{what}: the reload was applied\n{}",
        agent.log_tail(30)
    );
}

/// Segment refuses the key in `segment.write_key_file` with 401: the agent reports
/// `auth_failed` and keeps the events. The operator writes the new key into the file and sends
/// SIGHUP: delivery resumes with the new key, every event arrives once, none is dead-lettered.
#[test]
fn a_write_key_rotated_in_its_file_and_sighup_resumes_delivery_after_auth_failed() {
    let mut env = new_env();
    let key_file = env.root().join("write_key");
    write_key_file(&key_file, "wk_OLD_REVOKED_71c2e");
    env.config.write_key = None;
    env.config.write_key_file = Some(key_file.clone());
    let mut agent = env.start_agent();

    let ids = drop_events(&env, "before-rotation.jsonl", ids_base(1), 20);
    let refused = wait_for_status(&env.config_path, PATIENCE, |s| s["state"] == "auth_failed");
    assert!(
        refused.is_some(),
        "auth_failed after the server refused the old key\n{}",
        agent.log_tail(30)
    );
    assert_eq!(env.server.accepted_count(), 0, "nothing accepted");
    assert!(
        env.server.requests().iter().all(|r| r.status == 401),
        "every request so far was refused"
    );

    write_key_file(&key_file, WRITE_KEY);
    let refused_requests = env.server.requests().len();
    reload(&mut agent, "the rotated key");
    wait_delivered(&env, &agent, &ids, "after the key was rotated");
    let more = drop_events(&env, "after-rotation.jsonl", ids_base(1) + 100, 5);
    wait_delivered(&env, &agent, &more, "a file dropped after the rotation");
    env.server
        .wait_for_quiet(std::time::Duration::from_millis(1000), PATIENCE);

    let all: Vec<String> = ids.iter().chain(&more).cloned().collect();
    assert_exactly_once(&env.server, &all, &agent, "across the key rotation");
    let requests = env.server.requests();
    assert!(
        requests[refused_requests..].iter().all(|r| r.auth_ok),
        "after the reload every request carries the new key"
    );
    let status = wait_for_status(&env.config_path, PATIENCE, |s| {
        s["state"] == "running" && s["spool_events"] == 0
    });
    assert!(
        status.is_some(),
        "running with nothing left\n{}",
        agent.log_tail(30)
    );
    assert_eq!(
        status.as_ref().map(|s| s["dead_lettered"].clone()),
        Some(Value::from(0)),
        "nothing dead-lettered: {status:?}"
    );
    let exit = agent.stop();
    assert_eq!(exit.and_then(|e| e.code()), Some(0));
}

/// The catalog files changed (a message moved from email to push) and named by SIGHUP: the
/// events read after the reload use the new channel, those before kept the old.
#[test]
fn sighup_applies_a_changed_channel_in_the_catalog_files() {
    let mut env = new_env();
    let mut agent = env.start_agent();
    let first = drop_events(&env, "email.jsonl", ids_base(2), 3);
    wait_delivered(&env, &agent, &first, "before the catalog change");

    // The same catalog, with the opened message now a push message, in a new directory.
    let catalog = env.root().join("catalog-b");
    fs::create_dir_all(&catalog).expect("create the new catalog dir");
    let messages = fs::read_to_string(repo_path("examples/catalog/messages.json"))
        .expect("read the shipped messages");
    let mut messages: Vec<Value> = serde_json::from_str(&messages).expect("messages parse");
    let message: u64 = crate::util::EMAIL_MESSAGE.parse().expect("a message id");
    let entry = messages
        .iter_mut()
        .find(|m| m["id"] == message)
        .expect("the email message is in the catalog");
    assert_eq!(entry["channel"], "email");
    entry["channel"] = "push".into();
    fs::write(
        catalog.join("messages.json"),
        serde_json::to_vec_pretty(&messages).expect("serialize"),
    )
    .expect("write messages.json");
    fs::copy(
        repo_path("examples/catalog/abtests.json"),
        catalog.join("abtests.json"),
    )
    .expect("copy abtests.json");
    env.config.catalog_dir = catalog;
    env.write_config();
    reload(&mut agent, "the new catalog");

    let second = drop_events(&env, "push.jsonl", ids_base(2) + 100, 3);
    wait_delivered(&env, &agent, &second, "after the catalog change");
    let names = |ids: &[String]| -> Vec<String> {
        env.server
            .accepted_events()
            .iter()
            .filter(|e| ids.iter().any(|id| e["messageId"] == id.as_str()))
            .map(|e| e["event"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(names(&first), vec!["Email Opened"; 3], "before the reload");
    assert_eq!(
        names(&second),
        vec!["Push Notification Tapped"; 3],
        "after the reload the message is a push message\n{}",
        agent.log_tail(20)
    );
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    assert_exactly_once(&env.server, &all, &agent, "across the catalog reload");
}

/// A smaller `max_batch_events` by SIGHUP: every batch after the reload holds at most the new
/// limit. A `[watch]` change in the same reload is accepted and logged as taking effect at the
/// next restart (naming the section); the delivery change applies at once.
#[test]
fn sighup_applies_a_smaller_max_batch_events_and_says_watch_needs_a_restart() {
    let mut env = new_env();
    env.config.max_batch_events = Some(100);
    let mut agent = env.start_agent();
    let first = drop_events(&env, "big-batches.jsonl", ids_base(3), 60);
    wait_delivered(&env, &agent, &first, "before the reload");
    assert!(
        env.server
            .accepted_requests()
            .iter()
            .any(|r| r.event_count > 5),
        "before the reload, batches hold more than 5 events"
    );

    env.config.max_batch_events = Some(5);
    env.config.settle_secs = Some(2);
    env.write_config();
    let sent_before = env.server.requests().len();
    reload(&mut agent, "max_batch_events 5, settle_secs 2");
    let logs = agent.logs();
    let line = logs
        .lines()
        .rev()
        .find(|l| l.contains("config reloaded"))
        .expect("found by reload()");
    assert!(
        line.contains("take effect at the next restart") && line.contains("watch"),
        "the [watch] change is reported as needing a restart: {line}"
    );

    let second = drop_events(&env, "small-batches.jsonl", ids_base(3) + 100, 60);
    wait_delivered(&env, &agent, &second, "after the reload");
    let after: Vec<usize> = env.server.requests()[sent_before..]
        .iter()
        .map(|r| r.event_count)
        .collect();
    assert!(
        after.iter().all(|&n| n <= 5) && after.len() >= 12,
        "batches after the reload hold at most 5 events: {after:?}\n{}",
        agent.log_tail(20)
    );
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    assert_exactly_once(&env.server, &all, &agent, "across the limits reload");
    assert!(
        all.contains(&lp_id(ids_base(3) + 159)),
        "the ids are the generated ones"
    );
}

/// `run` on a config that does not validate (an unknown key) exits 78, naming the key, and
/// never gets ready.
#[test]
fn run_exits_78_on_a_bad_config() {
    let env = TestEnv::new();
    let bad = env.config.clone().with_extra("segment", "bogus_key = 1");
    let config = env.root().join("bad.toml");
    bad.write(&config);
    let logs = Agent::run_until_exit(&config, EX_CONFIG);
    assert!(logs.contains("bogus_key"), "names the unknown key:\n{logs}");
    assert!(
        !logs.contains(": ready"),
        "the agent never got ready:\n{logs}"
    );
    assert!(env.server.requests().is_empty());
}
