//! The catalog from Leanplum's API (SPEC sections 3 and 5): a Leanplum-compatible server on
//! `127.0.0.1:0` answering `getMessages`, `getAbTests` and `getMessage` in the real API's
//! envelope, and the agent fetching, caching, refreshing and looking up against it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

use crate::events::{assert_same_events, expected_shard_0};
use crate::util::http;
use crate::util::{
    NOTHING_HAPPENS, PATIENCE, SHARD_0, TestEnv, copy_into, repo_path, run_cli, toml_str,
    wait_until,
};

const APP_ID: &str = "app_5629499534213120";
/// A content key recognizable in any output, so a leak is easy to grep for.
const CONTENT_KEY: &str = "ck_CONTENT_SECRET_8d21e";

/// One request the fake Leanplum server received.
#[derive(Debug, Clone)]
struct LpRequest {
    action: String,
    params: BTreeMap<String, String>,
    at: std::time::Instant,
}

#[derive(Default)]
struct LpState {
    /// What `getMessages` lists, in the API's shape.
    listed: Vec<Value>,
    /// What `getMessage` knows beyond the list (created since the last refresh).
    unlisted: Vec<Value>,
    abtests: Vec<Value>,
    /// Answer 503 to everything, with a body that echoes the key (a careless proxy).
    down: bool,
    requests: Vec<LpRequest>,
}

/// A Leanplum API stand-in: `GET /api?appId&clientKey&apiVersion&action[&id]`.
struct LeanplumServer {
    url: String,
    state: Arc<LpStateLock>,
    /// Serves until dropped.
    _http: http::Server,
}

/// The server's state, shared with the connections it serves.
struct LpStateLock(Mutex<LpState>);

impl http::Handler for LpStateLock {
    fn answer(&self, request: http::Request) -> (http::Response, Option<http::Sent>) {
        let (status, body) = answer(&self.0, &request.path);
        let response = http::Response {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.into_bytes(),
        };
        (response, None)
    }
}

impl LeanplumServer {
    fn start(listed: Vec<Value>, abtests: Vec<Value>) -> LeanplumServer {
        let state = Arc::new(LpStateLock(Mutex::new(LpState {
            listed,
            abtests,
            ..LpState::default()
        })));
        let http = http::Server::serve(http::bind(0), state.clone());
        LeanplumServer {
            url: format!("http://{}", http.addr()),
            state,
            _http: http,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LpState> {
        self.state.0.lock().expect("fake Leanplum lock")
    }

    fn requests(&self, action: &str) -> Vec<LpRequest> {
        self.state()
            .requests
            .iter()
            .filter(|r| r.action == action)
            .cloned()
            .collect()
    }
}

/// Leanplum's answer to `getMessage` for a message that does not exist, verbatim, with HTTP 404
/// (as recorded from the real API in public client libraries' fixtures).
const NOT_FOUND_BODY: &str =
    r#"{"response":[{"success":false,"error":{"message":"Message not found."}}]}"#;

fn envelope(result: Value) -> String {
    json!({ "response": [result] }).to_string()
}

/// What Leanplum answers to `url`.
fn answer(state: &Mutex<LpState>, url: &str) -> (u16, String) {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut st = state.lock().expect("fake Leanplum lock");
    let action = params.get("action").cloned().unwrap_or_default();
    st.requests.push(LpRequest {
        action: action.clone(),
        params: params.clone(),
        at: std::time::Instant::now(),
    });
    if st.down {
        let echoed = params.get("clientKey").cloned().unwrap_or_default();
        return (
            503,
            envelope(
                json!({"success": false, "error": {"message": format!("maintenance (request had clientKey={echoed})")}}),
            ),
        );
    }
    if params.get("appId").map(String::as_str) != Some(APP_ID)
        || params.get("clientKey").map(String::as_str) != Some(CONTENT_KEY)
    {
        return (
            401,
            envelope(
                json!({"success": false, "error": {"message": "Invalid appId or clientKey."}}),
            ),
        );
    }
    match action.as_str() {
        "getMessages" => (
            200,
            envelope(json!({"success": true, "messages": st.listed})),
        ),
        "getAbTests" => (
            200,
            envelope(json!({"success": true, "abTests": st.abtests})),
        ),
        "getMessage" => {
            let id = params.get("id").cloned().unwrap_or_default();
            let found = st
                .listed
                .iter()
                .chain(&st.unlisted)
                .find(|m| m["id"].to_string().trim_matches('"') == id);
            match found {
                Some(m) => (200, envelope(json!({"success": true, "message": m}))),
                // What the real API answers for a deleted message (or one of another app).
                None => (404, NOT_FOUND_BODY.to_string()),
            }
        }
        _ => (
            400,
            envelope(json!({"success": false, "error": {"message": "Unknown action"}})),
        ),
    }
}

/// The shipped catalog (flat form) in the API's shape: `messageType`, `campaignID`,
/// `campaignName`; ids as strings, as Leanplum writes those beyond 2^53.
fn api_messages() -> Vec<Value> {
    let text = std::fs::read_to_string(repo_path("examples/catalog/messages.json")).unwrap();
    let flat: Vec<Value> = serde_json::from_str(&text).unwrap();
    flat.into_iter()
        .map(|m| {
            let kind = match m["channel"].as_str() {
                Some("email") => "Email",
                Some("push") => "Push Notification",
                _ => "In-App Message",
            };
            let mut api = json!({
                "id": m["id"].to_string(),
                "name": m["name"],
                "messageType": kind,
                "subject": m.get("subject").cloned().unwrap_or(Value::Null),
            });
            if let Some(c) = m.get("campaign_id") {
                api["campaignID"] = json!(c.to_string());
                api["campaignName"] = m["campaign_name"].clone();
            }
            api
        })
        .collect()
}

fn api_abtests() -> Vec<Value> {
    let text = std::fs::read_to_string(repo_path("examples/catalog/abtests.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A test world whose catalog comes from `lp` alone (an empty `catalog_dir`), with the content
/// key in a file.
fn env_with_api(lp_url: &str) -> TestEnv {
    let mut env = TestEnv::new();
    let empty = env.root().join("catalog");
    std::fs::create_dir_all(&empty).unwrap();
    let key_file = env.root().join("content_key");
    std::fs::write(&key_file, format!("{CONTENT_KEY}\n")).unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    env.config.catalog_dir = empty;
    env.config = env
        .config
        .clone()
        .with_extra("leanplum", &format!("app_id = {}", toml_str(APP_ID)))
        .with_extra(
            "leanplum",
            &format!(
                "content_key_file = {}",
                toml_str(key_file.to_str().unwrap())
            ),
        )
        .with_extra("leanplum", &format!("api_base = {}", toml_str(lp_url)))
        .with_extra("leanplum", "refresh_interval_secs = 10")
        .with_extra("leanplum", "request_timeout_secs = 2");
    env
}

fn status_json(config: &Path) -> Value {
    let out = run_cli(
        &[
            "status".as_ref(),
            "--json".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        PATIENCE,
    );
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json: {e}: {out:?}"))
}

fn catalog_show(config: &Path, id: &str) -> crate::util::CmdOutput {
    run_cli(
        &[
            "catalog".as_ref(),
            "show".as_ref(),
            id.as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        PATIENCE,
    )
}

fn assert_no_content_key(what: &str, text: &str) {
    assert!(
        !text.contains(CONTENT_KEY),
        "{what} holds the content key:\n{text}"
    );
}

fn shard_path(env: &TestEnv) -> std::path::PathBuf {
    env.watch_dir()
        .join(Path::new(SHARD_0).strip_prefix("examples/export").unwrap())
}

/// Drops the sample shard in and checks that its events arrive, exactly as expected.
fn deliver_the_sample(env: &TestEnv, agent: &crate::util::Agent, what: &str) {
    copy_into(SHARD_0, &shard_path(env));
    expect_the_sample(env, agent, what);
}

/// Waits for the sample shard's events and checks they arrived exactly as expected.
fn expect_the_sample(env: &TestEnv, agent: &crate::util::Agent, what: &str) {
    let expected = expected_shard_0();
    assert!(
        env.server.wait_for_accepted(expected.len(), PATIENCE),
        "{}",
        agent.log_tail(30)
    );
    env.server.wait_for_quiet(Duration::from_secs(1), PATIENCE);
    assert_same_events(&env.server.accepted_events(), &expected, what);
}

/// The whole catalog from the API, none from files: the sample maps exactly as with the
/// shipped files, and status and `catalog show` say where it came from.
#[test]
fn catalog_fetched_from_the_api_maps_the_sample_exactly() {
    let lp = LeanplumServer::start(api_messages(), api_abtests());
    let env = env_with_api(&lp.url);
    let config = env.write_config();
    let check = run_cli(
        &[
            "check-config".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        PATIENCE,
    );
    assert_eq!(check.code(), 0, "{check:?}");
    assert!(check.stdout.contains("content key from file"), "{check:?}");

    let agent = env.start_agent();
    assert!(
        agent.wait_for_log("catalog fetched from Leanplum", PATIENCE),
        "{}",
        agent.log_tail(30)
    );
    deliver_the_sample(&env, &agent, "API catalog");

    let req = &lp.requests("getMessages")[0];
    assert_eq!(req.params["appId"], APP_ID);
    assert_eq!(
        req.params["recent"], "false",
        "finished messages are included"
    );
    assert!(
        lp.requests("getMessage").is_empty(),
        "every message was known"
    );

    let status = status_json(&config);
    assert_eq!(status["catalog"]["source"], "files+api", "{status}");
    assert_eq!(status["catalog"]["messages"], 40, "{status}");
    assert!(status["catalog"]["last_error"].is_null(), "{status}");

    let shown = catalog_show(&config, "5175843646007627");
    assert_eq!(shown.code(), 0, "{shown:?}");
    assert!(
        shown
            .stdout
            .contains(r#"message 5175843646007627 [api] push "Message 2""#),
        "{shown:?}"
    );
    let missing = catalog_show(&config, "42");
    assert_eq!(missing.code(), 1, "{missing:?}");
    for (what, text) in [
        ("logs", agent.logs()),
        ("status", status.to_string()),
        ("catalog show", shown.all_output()),
    ] {
        assert_no_content_key(what, &text);
    }
}

/// A message created after the last refresh is looked up with `getMessage` before its
/// engagements are mapped; one the API says does not exist maps with `unknown_message_channel`;
/// the periodic refresh picks up a message added to the list.
#[test]
fn unknown_messages_are_looked_up_and_refresh_picks_up_new_ones() {
    let mut listed = api_messages();
    // The push message the shard opens is not listed yet, but getMessage knows it. Guessing
    // with unknown_message_channel = email would make its Open an "Email Opened".
    let pos = listed
        .iter()
        .position(|m| m["id"] == "5738448816825687")
        .unwrap();
    let unlisted = listed.remove(pos);
    let lp = LeanplumServer::start(listed, api_abtests());
    lp.state().unlisted.push(unlisted);
    let mut env = env_with_api(&lp.url);
    env.config.unknown_message_channel = Some("email".into());
    let agent = env.start_agent();
    assert!(agent.wait_for_log("catalog fetched from Leanplum", PATIENCE));

    copy_into(SHARD_0, &shard_path(&env));
    // An engagement naming a message Leanplum never had.
    std::fs::write(
        env.watch_dir().join("engagements.jsonl"),
        r#"{"event":"Open","user_id":"u-1","device_id":"d-1","timestamp":"2026-11-01T10:00:00Z","message_id":"9000000000000000001","event_id":"77"}"#.to_string() + "\n",
    )
    .unwrap();
    let expected = expected_shard_0();
    assert!(
        env.server.wait_for_accepted(expected.len() + 1, PATIENCE),
        "{}",
        agent.log_tail(40)
    );
    env.server.wait_for_quiet(Duration::from_secs(1), PATIENCE);
    let events = env.server.accepted_events();
    let (ghost, shard): (Vec<Value>, Vec<Value>) = events
        .into_iter()
        .partition(|e| e["messageId"] == "lp-e-77");
    assert_same_events(&shard, &expected, "shard with a looked-up message");
    assert_eq!(ghost.len(), 1);
    assert_eq!(
        ghost[0]["event"], "Email Opened",
        "unknown_message_channel = email"
    );
    let looked_up: Vec<String> = lp
        .requests("getMessage")
        .iter()
        .map(|r| r.params["id"].clone())
        .collect();
    assert!(
        looked_up.contains(&"5738448816825687".to_string()),
        "{looked_up:?}"
    );
    assert!(
        looked_up.contains(&"9000000000000000001".to_string()),
        "{looked_up:?}"
    );
    let config = env.config_path.clone();
    let shown = catalog_show(&config, "9000000000000000001");
    assert!(
        shown
            .stdout
            .contains("Leanplum says this message does not exist"),
        "{shown:?}"
    );

    // A message added to the list shows up at the next refresh (every 10 s here).
    let fetches = lp.requests("getMessages").len();
    lp.state()
        .listed
        .push(json!({"id": "123456789", "name": "Brand new", "messageType": "Email"}));
    assert!(
        wait_until(Duration::from_secs(25), || lp.requests("getMessages").len()
            > fetches),
        "no refresh within 25 s"
    );
    assert!(wait_until(PATIENCE, || catalog_show(&config, "123456789")
        .code()
        == 0));
    assert_no_content_key("logs", &agent.logs());
}

/// Leanplum unreachable at start, with the catalog cached by an earlier run: mapping is right
/// from the first event, and status says where the catalog came from and what failed.
#[test]
fn api_down_at_start_with_a_warm_cache_maps_from_the_cache() {
    let lp = LeanplumServer::start(api_messages(), api_abtests());
    let mut env = env_with_api(&lp.url);
    let mut agent = env.start_agent();
    assert!(agent.wait_for_log("catalog fetched from Leanplum", PATIENCE));
    assert!(agent.stop().is_some_and(|s| s.success()));
    drop(lp);

    // Nothing listens there any more: connection refused.
    let extra: Vec<(String, String)> = env
        .config
        .extra
        .iter()
        .filter(|(_, l)| !l.starts_with("api_base"))
        .cloned()
        .collect();
    env.config.extra = extra;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    env.config = env
        .config
        .clone()
        .with_extra("leanplum", &format!("api_base = {}", toml_str(&dead_url)));
    let agent = env.start_agent();
    assert!(
        agent.wait_for_log("loaded from the cache", PATIENCE),
        "{}",
        agent.log_tail(20)
    );
    deliver_the_sample(&env, &agent, "cached catalog");
    let status = status_json(&env.config_path);
    assert_eq!(status["catalog"]["source"], "files+cache", "{status}");
    assert!(
        status["catalog"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot reach Leanplum")),
        "{status}"
    );
    assert_no_content_key("logs", &agent.logs());
}

/// Leanplum down and nothing cached: reading waits on the first record that needs the
/// catalog (nothing dropped, nothing guessed), status says why; once Leanplum answers, every
/// event arrives exactly once.
#[test]
fn api_down_with_a_cold_cache_waits_then_delivers_everything_once() {
    let lp = LeanplumServer::start(api_messages(), api_abtests());
    lp.state().down = true;
    let env = env_with_api(&lp.url);
    let agent = env.start_agent();
    copy_into(SHARD_0, &shard_path(&env));
    let config = env.config_path.clone();
    assert!(
        wait_until(PATIENCE, || {
            let s = status_json(&config);
            s["catalog"]["waiting"]
                .as_array()
                .is_some_and(|w| !w.is_empty())
        }),
        "{}",
        agent.log_tail(30)
    );
    let status = status_json(&config);
    let waiting = &status["catalog"]["waiting"][0];
    assert!(
        waiting["files"][0].as_str().unwrap().contains("output-0"),
        "{status}"
    );
    assert!(
        waiting["reason"].as_str().unwrap().contains("HTTP 503"),
        "{status}"
    );
    // The server echoed the key in its error body: scrubbed.
    assert!(
        waiting["reason"].as_str().unwrap().contains("<redacted>"),
        "{status}"
    );
    assert_no_content_key("status", &status.to_string());
    // A window in which a file that did not wait would be delivered.
    thread::sleep(NOTHING_HAPPENS);
    let early = env.server.accepted_count();
    assert!(
        early < expected_shard_0().len(),
        "the file waits: {early} events sent"
    );
    assert_eq!(status["files_done"], 0, "{status}");

    // Logged once each, though retried all along.
    assert!(
        wait_until(PATIENCE, || lp.requests("getMessages").len() >= 2
            && lp.requests("getMessage").len() >= 3),
        "retried"
    );
    // Lookups are rate-limited (5 a second), even when several ids wait at once.
    let lookups = lp.requests("getMessage");
    for pair in lookups.windows(2) {
        let gap = pair[1].at.saturating_duration_since(pair[0].at);
        assert!(
            gap >= Duration::from_millis(180),
            "getMessage {} then {} only {gap:?} apart",
            pair[0].params["id"],
            pair[1].params["id"]
        );
    }
    let logs = agent.logs();
    assert_eq!(
        logs.matches("cannot fetch the catalog from Leanplum")
            .count(),
        1,
        "{logs}"
    );
    assert_eq!(
        logs.matches("cannot look the message up in Leanplum")
            .count(),
        1,
        "{logs}"
    );

    lp.state().down = false;
    expect_the_sample(&env, &agent, "after the outage");
    assert!(wait_until(PATIENCE, || {
        status_json(&config)["catalog"]["waiting"]
            .as_array()
            .is_some_and(|w| w.is_empty())
    }));
    assert_no_content_key("logs", &agent.logs());
}

/// `check-config` verifies the section: a missing content key and a bad base URL are named.
#[test]
fn check_config_verifies_the_leanplum_section() {
    let env = env_with_api("ftp://nowhere");
    let mut config = env.config.clone();
    config
        .extra
        .retain(|(_, l)| !l.starts_with("content_key_file"));
    config.write(&env.config_path);
    let out = run_cli(
        &[
            "check-config".as_ref(),
            "--config".as_ref(),
            env.config_path.as_os_str(),
        ],
        PATIENCE,
    );
    assert_eq!(out.code(), crate::util::EX_CONFIG, "{out:?}");
    let text = out.all_output();
    assert!(text.contains("leanplum.content_key_file"), "{text}");
    assert!(text.contains("leanplum.api_base"), "{text}");
}

/// A `getMessages` entry in the shape the real API lists: `messageType`, a float `created`,
/// `active`, a numeric id, and no campaign fields.
fn real_message(id: u64, name: &str, kind: &str) -> Value {
    json!({"messageType": kind, "created": 1.506018056324E9, "name": name, "active": true, "id": id})
}

/// An email message Leanplum lists.
const KNOWN: u64 = 5342363864268800;
/// A push message created after the last `getMessages`: only `getMessage` finds it.
const LATE: u64 = 5342363864268801;

/// A Leanplum that lists [`KNOWN`] and finds [`LATE`] when asked.
fn known_and_late() -> LeanplumServer {
    let lp = LeanplumServer::start(
        vec![real_message(KNOWN, "Welcome mail", "Email")],
        Vec::new(),
    );
    lp.state()
        .unlisted
        .push(real_message(LATE, "Black Friday push", "Push Notification"));
    lp
}

/// Real-world catalog trouble at once: files naming messages deleted in Leanplum (`getMessage`
/// answers 404 "Message not found.") and a message created after the last `getMessages` (found
/// by `getMessage`). Every other event arrives exactly once, the late message maps with its
/// name, the deleted ones are parked (the default), and every file ends done.
#[test]
fn deleted_and_late_messages_as_leanplum_answers_them() {
    const DELETED: [u64; 2] = [5342363864268802, 5342363864268803];
    let lp = known_and_late();
    let env = env_with_api(&lp.url);
    let config = env.write_config();
    let agent = env.start_agent();
    assert!(agent.wait_for_log("catalog fetched from Leanplum", PATIENCE));

    // Three shards; each session opens one message, in turn known, late, deleted, deleted.
    let messages = [KNOWN, LATE, DELETED[0], DELETED[1]];
    let mut expected = Vec::new();
    let mut parked = 0;
    for shard in 0..3u64 {
        let mut lines = String::new();
        for n in 0..40u64 {
            let event_id = 6_000_000_000_000_000_000 + shard * 1000 + n;
            let message = messages[(n % 4) as usize];
            lines.push_str(
                &json!({"deviceId": format!("D-{shard}-{n}"), "time": 1793534899.612,
                        "states": [{"events": [{"eventId": event_id, "name": format!(".m{message} Open"), "time": 1793534900.5}]}]})
                .to_string(),
            );
            lines.push('\n');
            if DELETED.contains(&message) {
                parked += 1;
            } else {
                expected.push((format!("lp-e-{event_id}"), message));
            }
        }
        std::fs::write(
            env.watch_dir()
                .join(format!("export-{APP_ID}-job-output-{shard}")),
            lines,
        )
        .unwrap();
    }
    let ids: Vec<String> = expected.iter().map(|(id, _)| id.clone()).collect();
    assert!(
        env.server.wait_for_ids(&ids, PATIENCE),
        "{}",
        agent.log_tail(40)
    );
    let status = crate::util::wait_for_status(&config, PATIENCE, |s| {
        s["parked"] == parked && s["files_in_progress"] == 0 && s["files_done"] == 3
    })
    .unwrap_or_else(|| panic!("{}", agent.log_tail(40)));
    env.server.wait_for_quiet(Duration::from_secs(1), PATIENCE);
    assert!(
        env.server.accepted_id_counts().values().all(|n| *n == 1),
        "each event once"
    );
    assert_eq!(env.server.accepted_count(), expected.len());
    for e in env.server.accepted_events() {
        let (_, message) = expected
            .iter()
            .find(|(id, _)| e["messageId"] == id.as_str())
            .expect("an expected event");
        if *message == LATE {
            assert_eq!(e["event"], "Push Notification Tapped", "{e}");
            assert_eq!(
                e["properties"]["campaign"]["message_name"],
                "Black Friday push"
            );
        } else {
            assert_eq!(e["event"], "Email Opened", "{e}");
            assert_eq!(e["properties"]["email_subject"], "Welcome mail");
        }
    }
    let mut parked_ids: Vec<String> = status["parked_messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect();
    parked_ids.sort();
    assert_eq!(parked_ids, DELETED.map(|d| d.to_string()), "{status}");
    // Each deleted message was asked about once (the 404 is an answer, not an outage), the
    // late one once, and status shows no catalog error.
    let looked_up: Vec<String> = lp
        .requests("getMessage")
        .iter()
        .map(|r| r.params["id"].clone())
        .collect();
    for id in [LATE, DELETED[0], DELETED[1]] {
        assert_eq!(
            looked_up.iter().filter(|l| **l == id.to_string()).count(),
            1,
            "{looked_up:?}"
        );
    }
    assert!(status["catalog"]["last_error"].is_null(), "{status}");
    assert!(
        status["catalog"]["waiting"].as_array().unwrap().is_empty(),
        "{status}"
    );
    assert_no_content_key("logs", &agent.logs());
}

/// A bad content key (401, `Invalid clientKey`) is a catalog error shown in status; files
/// naming unknown messages wait for it, and nothing is guessed.
#[test]
fn a_refused_content_key_is_a_catalog_error_and_files_wait() {
    let lp = LeanplumServer::start(
        vec![real_message(5342363864268800, "Welcome mail", "Email")],
        Vec::new(),
    );
    let mut env = env_with_api(&lp.url);
    let key_file = env.root().join("content_key");
    std::fs::write(&key_file, "ck_wrong_key\n").unwrap();
    env.config.unknown_message_channel = Some("email".into());
    let config = env.write_config();
    let agent = env.start_agent();
    std::fs::write(
        env.watch_dir().join("export-1-job-output-0"),
        json!({"deviceId": "D-1", "time": 1793534899.612,
               "states": [{"events": [{"eventId": 42, "name": ".m5342363864268800 Open", "time": 1793534900.5}]}]})
        .to_string() + "\n",
    )
    .unwrap();
    let status = crate::util::wait_for_status(&config, PATIENCE, |s| {
        s["catalog"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused the content key"))
            && s["catalog"]["waiting"]
                .as_array()
                .is_some_and(|w| !w.is_empty())
    })
    .unwrap_or_else(|| panic!("{}", agent.log_tail(40)));
    assert_eq!(status["files_in_progress"], 1, "{status}");
    assert_eq!(
        env.server.accepted_count(),
        0,
        "nothing guessed while the key is refused"
    );
    assert!(!status.to_string().contains("ck_wrong_key"), "{status}");
    assert!(!agent.logs().contains("ck_wrong_key"));
    // `files` says the file waits, and for what.
    let files = run_cli(
        &[
            "files".as_ref(),
            "--json".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        PATIENCE,
    );
    let files: Value = serde_json::from_str(files.stdout.trim()).unwrap();
    assert_eq!(files[0]["state"], "waiting", "{files}");
    assert!(
        files[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("5342363864268800")),
        "{files}"
    );
}

/// A record naming a message the catalog must look up, in the middle of a big file parsed on
/// several threads (`watch.ingest_threads`, more than the cores), while Leanplum is down: every
/// event before it is delivered and none after it, though the threads parsed past it; once
/// Leanplum answers, the rest arrives, each event once, the looked-up message with its kind.
#[test]
fn a_lookup_in_the_middle_of_a_big_file_holds_back_exactly_what_follows_it() {
    const LINES: usize = 20_000;
    /// The line (0-based) naming the late message.
    const AT: usize = 12_345;
    let lp = known_and_late();
    let mut env = env_with_api(&lp.url);
    env.config = env.config.clone().with_extra("watch", "ingest_threads = 4");
    let config = env.write_config();
    let agent = env.start_agent();
    assert!(agent.wait_for_log("catalog fetched from Leanplum", PATIENCE));
    lp.state().down = true;

    let mut lines = String::new();
    let mut ids = Vec::with_capacity(LINES);
    for n in 0..LINES {
        let event_id = 6_100_000_000_000_000_000 + n as u64;
        let message = if n == AT { LATE } else { KNOWN };
        lines.push_str(
            &json!({"deviceId": format!("D-{n}"), "time": 1793534899.612,
                    "states": [{"events": [{"eventId": event_id, "name": format!(".m{message} Open"), "time": 1793534900.5}]}]})
            .to_string(),
        );
        lines.push('\n');
        ids.push(format!("lp-e-{event_id}"));
    }
    std::fs::write(
        env.watch_dir()
            .join(format!("export-{APP_ID}-job-output-0")),
        lines,
    )
    .unwrap();
    let (before, after) = ids.split_at(AT);
    assert!(
        env.server.wait_for_ids(before, PATIENCE),
        "{}",
        agent.log_tail(40)
    );
    crate::util::wait_for_status(&config, PATIENCE, |s| {
        s["catalog"]["waiting"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
    })
    .unwrap_or_else(|| panic!("the file waits\n{}", agent.log_tail(40)));
    env.server.wait_for_quiet(Duration::from_secs(1), PATIENCE);
    let accepted = env.server.accepted_id_counts();
    let past: Vec<&String> = after
        .iter()
        .filter(|id| accepted.contains_key(*id))
        .collect();
    assert!(
        past.is_empty(),
        "{} events past the waiting record were sent, e.g. {:?}",
        past.len(),
        &past[..past.len().min(3)]
    );
    assert_eq!(accepted.len(), before.len());

    lp.state().down = false;
    assert!(
        env.server.wait_for_ids(&ids, PATIENCE),
        "{}",
        agent.log_tail(40)
    );
    env.server.wait_for_quiet(Duration::from_secs(1), PATIENCE);
    assert!(
        env.server.accepted_id_counts().values().all(|n| *n == 1),
        "each event once"
    );
    assert_eq!(env.server.accepted_count(), ids.len());
    let late = env
        .server
        .accepted_events()
        .into_iter()
        .find(|e| e["messageId"] == ids[AT].as_str())
        .expect("the looked-up message's event");
    assert_eq!(late["event"], "Push Notification Tapped", "{late}");
    crate::util::wait_for_status(&config, PATIENCE, |s| s["files_done"] == 1)
        .unwrap_or_else(|| panic!("the file is done\n{}", agent.log_tail(40)));
}
