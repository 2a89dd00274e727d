//! Parked records (`unknown_message_channel = "park"`, the default; SPEC section 5): an
//! engagement of a message the catalog does not know waits in the quarantine, is mapped again
//! when the catalog changes, and is delivered exactly once with the catalog's names; one whose
//! message never becomes known stays parked, listed, and can be purged.

use std::path::Path;

use serde_json::{Value, json};

use crate::util::{
    PATIENCE, TestEnv, count_log_lines, dead_letter_cmd, dead_letter_list, new_env, status_json,
    status_u64, wait_for_status, wait_until,
};

/// Known from the start.
const KNOWN: u64 = 7_100_000_000_000_000_001;
/// Unknown at first; the catalog learns it later.
const LATE: u64 = 7_100_000_000_000_000_002;
/// Never known.
const NEVER: u64 = 7_100_000_000_000_000_003;

/// A flat-form catalog of email messages `(id, name)`.
fn write_catalog(dir: &Path, messages: &[(u64, &str)]) {
    let list: Vec<Value> = messages
        .iter()
        .map(|(id, name)| json!({"id": id.to_string(), "channel": "email", "name": name, "subject": format!("Subject of {name}")}))
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("messages.json"),
        serde_json::to_vec(&list).unwrap(),
    )
    .unwrap();
}

/// One session per message: an Open (and, for the late message, a Click with its link), on
/// one device each; eventIds `base + n`.
fn export(base: u64) -> String {
    let session = |device: &str, events: Value| {
        json!({"userId": format!("u-{device}"), "deviceId": device, "time": 1793534899.612,
               "locale": "de_DE", "states": [{"events": events}]})
        .to_string()
    };
    [
        session(
            "D-known",
            json!([{"eventId": base + 1, "name": format!(".m{KNOWN} Open"), "time": 1793534900.5},
                   {"eventId": base + 2, "name": "Add To Cart", "time": 1793534901.0}]),
        ),
        session(
            "D-late",
            json!([{"eventId": base + 3, "name": format!(".m{LATE} Open"), "time": 1793534902.25},
                   {"eventId": base + 4, "name": format!(".m{KNOWN} Delivered"), "time": 1793534902.5},
                   {"eventId": base + 5, "name": format!(".m{LATE} Click"), "time": 1793534903.0,
                    "parameters": {"url": "https://example.com/late", "index": 2}},
                   {"eventId": base + 6, "name": format!(".m{LATE}"), "time": 1793534899.7}]),
        ),
        session(
            "D-never",
            json!([{"eventId": base + 7, "name": format!(".m{NEVER} Open"), "time": 1793534904.0}]),
        ),
    ]
    .join("\n")
        + "\n"
}

fn event_by_id(events: &[Value], id: &str) -> Value {
    events
        .iter()
        .find(|e| e["messageId"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no event {id} among {events:?}"))
}

#[test]
fn parked_records_are_delivered_once_the_catalog_knows_their_message() {
    let mut env: TestEnv = new_env();
    let catalog = env.root().join("catalog");
    write_catalog(&catalog, &[(KNOWN, "Known")]);
    env.config.catalog_dir = catalog.clone();
    let config = env.write_config();
    let mut agent = env.start_agent();
    let base = 8_000_000_000_000_000_000;
    std::fs::write(env.watch_dir().join("export-1-output-0"), export(base)).unwrap();

    // The known message's events go; the others wait, parked, and every file is done.
    let known = [format!("lp-e-{}", base + 1), format!("lp-e-{}", base + 4)];
    assert!(
        env.server.wait_for_ids(&known, PATIENCE),
        "{}",
        agent.log_tail(30)
    );
    let status = wait_for_status(&config, PATIENCE, |s| {
        s["parked"] == 2 && s["files_in_progress"] == 0
    })
    .unwrap_or_else(|| panic!("{}", agent.log_tail(30)));
    let top: Vec<&str> = status["parked_messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert!(
        top.contains(&LATE.to_string().as_str()) && top.contains(&NEVER.to_string().as_str()),
        "{status}"
    );
    let parked: Vec<Value> = dead_letter_list(&config)
        .into_iter()
        .filter(|e| e["kind"] == "parked")
        .collect();
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert!(
        parked
            .iter()
            .any(|e| e["message_id"] == LATE.to_string().as_str() && e["line"] == 2),
        "{parked:?}"
    );
    assert_eq!(
        env.server.accepted_count(),
        2,
        "only the known message's events were sent"
    );

    // The catalog learns the late message: the rewritten file is reloaded (no signal), and
    // the parked records are mapped again.
    write_catalog(&catalog, &[(KNOWN, "Known"), (LATE, "Late")]);
    let late = [format!("lp-e-{}", base + 3), format!("lp-e-{}", base + 5)];
    assert!(
        env.server.wait_for_ids(&late, PATIENCE),
        "{}",
        agent.log_tail(30)
    );
    let status = wait_for_status(&config, PATIENCE, |s| s["parked"] == 1)
        .unwrap_or_else(|| panic!("{}", agent.log_tail(30)));
    assert_eq!(
        status["parked_messages"][0]["message_id"],
        NEVER.to_string()
    );
    env.server
        .wait_for_quiet(std::time::Duration::from_secs(1), PATIENCE);
    let events = env.server.accepted_events();
    assert_eq!(events.len(), 4, "each event once: {events:?}");
    assert!(
        env.server.accepted_id_counts().values().all(|n| *n == 1),
        "{:?}",
        env.server.accepted_id_counts()
    );
    let open = event_by_id(&events, &late[0]);
    assert_eq!(open["event"], "Email Opened");
    assert_eq!(open["properties"]["email_subject"], "Late", "{open}");
    assert_eq!(open["timestamp"], "2026-11-01T12:08:22.250Z", "{open}");
    assert_eq!(open["userId"], "u-D-late");
    assert_eq!(open["context"]["locale"], "de_DE", "{open}");
    let click = event_by_id(&events, &late[1]);
    assert_eq!(click["event"], "Email Link Clicked");
    assert_eq!(click["properties"]["link_url"], "https://example.com/late");
    assert_eq!(click["properties"]["link_id"], 2);

    // Another catalog change (a SIGHUP) maps the never-known record again: still parked,
    // nothing sent twice.
    agent.signal(libc::SIGHUP);
    assert!(wait_until(PATIENCE, || count_log_lines(
        &agent.logs(),
        "config reloaded"
    ) >= 1));
    let status = status_json(&config);
    assert_eq!(status_u64(&status, "parked"), 1, "{status}");

    // Purged by hand: gone from the list and from status.
    let id = dead_letter_list(&config)
        .into_iter()
        .find(|e| e["kind"] == "parked")
        .and_then(|e| e["id"].as_u64())
        .unwrap();
    let purge = dead_letter_cmd(&config, "purge", &[&id.to_string()]);
    assert_eq!(purge.code(), 0, "{purge:?}");
    assert!(wait_until(PATIENCE, || status_json(&config)["parked"] == 0));
    assert_eq!(env.server.accepted_count(), 4);
}

/// `unknown_message_channel = "skip"` keeps the old behaviour: counted, dropped, nothing parked.
#[test]
fn skip_drops_unknown_messages_without_parking() {
    let mut env: TestEnv = new_env();
    let catalog = env.root().join("catalog");
    write_catalog(&catalog, &[(KNOWN, "Known")]);
    env.config.catalog_dir = catalog;
    env.config.unknown_message_channel = Some("skip".into());
    let config = env.write_config();
    let agent = env.start_agent();
    let base = 8_100_000_000_000_000_000;
    std::fs::write(env.watch_dir().join("export-2-output-0"), export(base)).unwrap();
    let known = [format!("lp-e-{}", base + 1), format!("lp-e-{}", base + 4)];
    assert!(
        env.server.wait_for_ids(&known, PATIENCE),
        "{}",
        agent.log_tail(30)
    );
    let status = wait_for_status(&config, PATIENCE, |s| s["files_in_progress"] == 0)
        .unwrap_or_else(|| panic!("{}", agent.log_tail(30)));
    assert_eq!(status_u64(&status, "parked"), 0, "{status}");
    // The Opens of unknown messages are skipped; the Click decides its channel itself and
    // goes without a name, as before parking existed.
    assert_eq!(
        status["skipped_by_action"]["unknown message"], 2,
        "{status}"
    );
    let click = format!("lp-e-{}", base + 5);
    assert!(
        env.server
            .wait_for_ids(std::slice::from_ref(&click), PATIENCE)
    );
    let click = event_by_id(&env.server.accepted_events(), &click);
    assert_eq!(click["event"], "Email Link Clicked");
    assert!(
        click["properties"].get("email_subject").is_none(),
        "{click}"
    );
}
