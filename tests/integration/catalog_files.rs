//! The catalog files as operators' cron jobs really write them (SPEC section 5, "Files are
//! watched"): a running agent picks up `messages.json` rewritten atomically or in place without
//! a signal; a file that does not parse stops `check-config` and `run` with exit 78 naming it,
//! and while running is refused, the last good catalog mapping on, with the error in `status`
//! until a good file replaces it. No output ever quotes the broken file.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::util::{
    Agent, CmdOutput, EX_CONFIG, PATIENCE, TestEnv, count_log_lines, new_env, read_repo_file,
    ready_lines, run_cli, wait_delivered, wait_for_status, wait_until, write_atomically,
    write_slowly,
};

/// A new email message (not in the shipped catalog), its name, and a new push message.
const NEW_EMAIL: &str = "9100000000000000001";
const NEW_EMAIL_NAME: &str = "Autumn sale (added by cron)";
const NEW_PUSH: &str = "9100000000000000002";
const NEW_PUSH_NAME: &str = "Back in stock push";
/// The shipped catalog's message count.
const SHIPPED_MESSAGES: u64 = 40;

/// What a sync job writes into `messages.json` when the API answers with an error page. Every
/// needle in [`PAGE_NEEDLES`] is in it and must appear in no output.
const ERROR_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n\
    <body><h1>Bad Gateway</h1><p>upstream said: session=tok_PAGE_MARKER_77</p></body></html>\n";
const PAGE_NEEDLES: [&str; 4] = ["<html", "DOCTYPE", "Bad Gateway", "tok_PAGE_MARKER_77"];

fn assert_no_page(what: &str, text: &str) {
    for needle in PAGE_NEEDLES {
        assert!(
            !text.contains(needle),
            "{what} quotes the broken file ({needle:?}):\n{text}"
        );
    }
}

/// The shipped `messages.json` entries plus `extra`, as the flat form.
fn messages_with(extra: &[Value]) -> Vec<u8> {
    let mut all: Vec<Value> =
        serde_json::from_slice(&read_repo_file("examples/catalog/messages.json"))
            .expect("the shipped catalog is a JSON array");
    all.extend(extra.iter().cloned());
    serde_json::to_vec_pretty(&all).expect("JSON serializes")
}

fn new_email() -> Value {
    // No subject: `email_subject` is then the name, whichever `mapping.email_subject` says.
    json!({"id": NEW_EMAIL, "channel": "email", "name": NEW_EMAIL_NAME})
}

fn new_push() -> Value {
    json!({"id": NEW_PUSH, "channel": "push", "name": NEW_PUSH_NAME})
}

/// A test world whose catalog is a private copy of the shipped one (so the test may rewrite
/// it), with `messages.json` holding `messages`, and unknown messages skipped.
fn env_with_catalog(messages: &[u8]) -> (TestEnv, PathBuf) {
    let mut env = new_env();
    let catalog = env.root().join("catalog");
    std::fs::create_dir_all(&catalog).expect("create the catalog dir");
    std::fs::write(catalog.join("messages.json"), messages).expect("write messages.json");
    std::fs::write(
        catalog.join("abtests.json"),
        read_repo_file("examples/catalog/abtests.json"),
    )
    .expect("write abtests.json");
    env.config.catalog_dir = catalog.clone();
    // What a message the catalog does not know becomes is not what these tests are about.
    env.config.unknown_message_channel = Some("skip".into());
    (env, catalog)
}

/// Drops an engagement file with one `Open` of `message_id` (event id `event_id`, so Segment
/// `messageId` `lp-e-<event_id>`), waits for its event and returns it.
fn open_of(env: &TestEnv, agent: &Agent, message_id: &str, event_id: u64) -> Value {
    let record = json!({
        "event": "Open", "user_id": format!("u-{event_id}"), "device_id": format!("d-{event_id}"),
        "timestamp": "2026-11-01T10:00:00Z", "message_id": message_id,
        "event_id": event_id.to_string(),
    });
    write_atomically(
        &env.watch_dir().join(format!("opens-{event_id}.jsonl")),
        format!("{record}\n").as_bytes(),
    );
    let id = format!("lp-e-{event_id}");
    wait_delivered(env, agent, std::slice::from_ref(&id), "the open");
    let events: Vec<Value> = env
        .server
        .accepted_events()
        .into_iter()
        .filter(|e| e["messageId"] == id.as_str())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    events.into_iter().next().expect("one event")
}

fn assert_email_open(event: &Value, name: &str) {
    assert_eq!(event["event"], "Email Opened", "{event}");
    assert_eq!(event["properties"]["email_subject"], name, "{event}");
    assert_eq!(event["properties"]["message_id"], NEW_EMAIL, "{event}");
}

fn wait_ready(agent: &Agent) {
    assert!(
        wait_until(PATIENCE, || ready_lines(&agent.logs()) == 1),
        "the agent did not get ready\n{}",
        agent.log_tail(30)
    );
}

/// Waits until `status --json` shows `messages` catalog messages and `files_error` set or not.
fn wait_for_catalog(config: &Path, agent: &Agent, messages: u64, refused: bool) -> Value {
    wait_for_status(config, PATIENCE, |s| {
        s["catalog"]["messages"] == messages && s["catalog"]["files_error"].is_null() != refused
    })
    .unwrap_or_else(|| {
        panic!(
            "the catalog never had {messages} messages with refused = {refused}\n{}",
            agent.log_tail(30)
        )
    })
}

fn cli(args: &[&str], config: &Path) -> CmdOutput {
    let mut argv: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    argv.push("--config".as_ref());
    argv.push(config.as_os_str());
    run_cli(&argv, PATIENCE)
}

/// A cron job rewrites `messages.json` while the agent runs, once by rename and once in
/// place: each time the messages new in it map with their entries (name, channel), with no
/// signal sent.
#[test]
fn catalog_files_rewritten_while_running_are_reloaded_without_a_signal() {
    let (env, catalog) = env_with_catalog(&messages_with(&[]));
    let agent = env.start_agent();
    let config = env.config_path.clone();
    wait_ready(&agent);
    wait_for_catalog(&config, &agent, SHIPPED_MESSAGES, false);

    // 1. Written to a temp file and renamed into place.
    write_atomically(
        &catalog.join("messages.json"),
        &messages_with(&[new_email()]),
    );
    wait_for_catalog(&config, &agent, SHIPPED_MESSAGES + 1, false);
    let event = open_of(&env, &agent, NEW_EMAIL, 7_000_001);
    assert_email_open(&event, NEW_EMAIL_NAME);

    // 2. Rewritten in place (truncated, then written in parts, like `curl ... > file`).
    let text = messages_with(&[new_email(), new_push()]);
    let (head, tail) = text.split_at(text.len() / 2);
    write_slowly(
        &catalog.join("messages.json"),
        &[head, tail],
        std::time::Duration::from_millis(300),
    );
    wait_for_catalog(&config, &agent, SHIPPED_MESSAGES + 2, false);
    let event = open_of(&env, &agent, NEW_PUSH, 7_000_002);
    assert_eq!(event["event"], "Push Notification Tapped", "{event}");
    assert_eq!(
        event["properties"]["campaign"]["message_name"], NEW_PUSH_NAME,
        "{event}"
    );
    assert_eq!(
        event["properties"]["campaign"]["message_id"], NEW_PUSH,
        "{event}"
    );
    assert_email_open(&open_of(&env, &agent, NEW_EMAIL, 7_000_003), NEW_EMAIL_NAME);

    let logs = agent.logs();
    assert!(!logs.contains("SIGHUP"), "no signal was sent:\n{logs}");
    assert!(
        count_log_lines(&logs, "catalog files reloaded") >= 2,
        "{}",
        agent.log_tail(30)
    );
    let shown = cli(&["catalog", "show", NEW_PUSH], &config);
    assert_eq!(shown.code(), 0, "{shown:?}");
    assert!(
        shown.stdout.contains(&format!(
            "message {NEW_PUSH} [files] push {NEW_PUSH_NAME:?}"
        )),
        "{shown:?}"
    );
}

/// A `messages.json` that is an HTML error page at start: `check-config` and `run` both exit
/// 78 naming the file, and print none of it.
#[test]
fn a_broken_catalog_file_at_start_is_a_config_error() {
    let (env, catalog) = env_with_catalog(ERROR_PAGE.as_bytes());
    let config = env.write_config();
    let file = catalog.join("messages.json");
    let file = file.to_str().expect("UTF-8 path");

    let check = cli(&["check-config"], &config);
    assert_eq!(check.code(), EX_CONFIG, "{check:?}");
    assert!(check.stderr.contains(file), "names the file: {check:?}");
    assert!(
        check.stderr.contains("mapping.catalog_dir"),
        "names the key: {check:?}"
    );
    assert_no_page("check-config", &check.all_output());

    let logs = Agent::run_until_exit(&config, EX_CONFIG);
    assert!(logs.contains(file), "run names the file:\n{logs}");
    assert_no_page("run", &logs);

    // A half-written abtests.json (a rewrite caught in the middle) is named the same way.
    std::fs::write(file, messages_with(&[])).expect("repair messages.json");
    let abtests = read_repo_file("examples/catalog/abtests.json");
    std::fs::write(catalog.join("abtests.json"), &abtests[..abtests.len() / 2])
        .expect("truncate abtests.json");
    let check = cli(&["check-config"], &config);
    assert_eq!(check.code(), EX_CONFIG, "{check:?}");
    assert!(
        check
            .stderr
            .contains(&*catalog.join("abtests.json").to_string_lossy()),
        "{check:?}"
    );
    assert!(check.stderr.contains("line"), "says where: {check:?}");

    std::fs::write(catalog.join("abtests.json"), &abtests).expect("repair abtests.json");
    let check = cli(&["check-config"], &config);
    assert_eq!(check.code(), 0, "{check:?}");
    assert!(
        check
            .stdout
            .contains("catalog files: 40 messages, 6 A/B tests"),
        "{check:?}"
    );
}

/// A sync job writes an error page over `messages.json` while the agent runs: the last good
/// catalog maps on, `status` shows the error (logged once), and a good file clears it.
#[test]
fn a_broken_catalog_rewrite_keeps_the_last_good_catalog_until_a_good_one_comes() {
    let (env, catalog) = env_with_catalog(&messages_with(&[new_email()]));
    let mut agent = env.start_agent();
    let config = env.config_path.clone();
    wait_ready(&agent);
    let file = catalog.join("messages.json");
    let file_name = file.to_str().expect("UTF-8 path");

    write_atomically(&file, ERROR_PAGE.as_bytes());
    let status = wait_for_catalog(&config, &agent, SHIPPED_MESSAGES + 1, true);
    let error = status["catalog"]["files_error"]
        .as_str()
        .expect("files_error is a string");
    assert!(error.contains(file_name), "names the file: {error}");
    assert_no_page("status --json", &status.to_string());

    // The last good catalog maps on.
    let event = open_of(&env, &agent, NEW_EMAIL, 7_100_001);
    assert_email_open(&event, NEW_EMAIL_NAME);

    let text = cli(&["status"], &config);
    assert!(
        text.stdout.contains("catalog files:") && text.stdout.contains(file_name),
        "{text:?}"
    );
    let shown = cli(&["catalog", "show", NEW_EMAIL], &config);
    assert_eq!(shown.code(), 0, "{shown:?}");
    assert!(
        shown.stdout.contains("catalog files refused:") && shown.stdout.contains(file_name),
        "{shown:?}"
    );
    for (what, out) in [("status", &text), ("catalog show", &shown)] {
        assert_no_page(what, &out.all_output());
    }
    // Logged once, not at each look at the file (it is checked every 2 s, and looked at on
    // every inotify event; the delivery above took a few of those).
    let logs = agent.logs();
    assert_eq!(
        count_log_lines(&logs, "catalog file refused"),
        1,
        "{}",
        agent.log_tail(30)
    );
    assert_no_page("the log", &logs);

    // A good file (in place this time) replaces it: the error goes, the new entries map.
    std::fs::write(&file, messages_with(&[new_email(), new_push()])).expect("repair");
    wait_for_catalog(&config, &agent, SHIPPED_MESSAGES + 2, false);
    assert!(
        agent.wait_for_log("their error is cleared", PATIENCE),
        "{}",
        agent.log_tail(30)
    );
    let event = open_of(&env, &agent, NEW_PUSH, 7_100_002);
    assert_eq!(event["event"], "Push Notification Tapped", "{event}");
    assert!(agent.is_running());
    let exit = agent.stop();
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "{}",
        agent.log_tail(20)
    );
}
