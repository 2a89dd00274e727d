//! The main path: every input format dropped into the watch dir reaches Segment exactly once,
//! mapped as SPEC section 5 says, in authenticated gzipped batches within the limits, and the
//! write key never reaches the log.

use std::time::Duration;

use serde_json::{Value, json};

use crate::events::{
    assert_same_events, assert_track_envelopes, derive_shard_1, expected_shard_0, message_id,
    parse_json_lines, timestamp_millis,
};
use crate::util::{
    PATIENCE, SHARD_0, SHARD_1, TestEnv, WRITE_KEY, copy_into, file_name, read_repo_file, run_cli,
    write_atomically, write_slowly,
};

/// Small, so the 75 events need at least 11 batches.
const MAX_BATCH_EVENTS: u64 = 7;

/// Engagement records as JSON lines (SPEC section 4.2): ids above 2^53 as strings and as
/// numbers, every timestamp form, a Segment event name and Leanplum actions, and a `Sent` that
/// must produce nothing.
const ENGAGEMENTS_JSONL: &str = r#"{"event":"Email Opened","user_id":"it-user-1","device_id":"IT-DEV-0001","timestamp":"2026-11-03T08:00:00.125Z","message_id":"5680127476129675","channel":"email","event_id":"18014398509481985"}
{"event":"Delivered","device_id":"IT-DEV-0002","timestamp":1793700000,"message_id":"5175843646007627","channel":"push"}
{"event":"Sent","user_id":"it-user-1","device_id":"IT-DEV-0001","timestamp":"2026-11-03T08:05:00Z","message_id":"5680127476129675","channel":"email","event_id":"18014398509481987"}
{"event":"Click","user_id":"it-user-3","timestamp":1793700000123,"message_id":4057833125182384,"event_id":18014398509481989,"link_url":"https://example.com/it?a=1&b=\"x\"","link_id":3}
"#;

/// Engagement records as CSV (SPEC section 4.3): empty cells are absent values, a channel
/// decided by the action (`Received`, `Unsubscribe`), a skipped `Held Back`, a time zone
/// offset, and a quoted URL with a comma and quotes.
const ENGAGEMENTS_CSV: &str = "event,user_id,device_id,timestamp,message_id,channel,event_id,link_url,link_id
Open,it-user-4,IT-DEV-0004,2026-11-03T09:00:00+02:00,5738448816825687,push,18014398509482001,,
Unsubscribe,it-user-5,,2026-11-03T09:30:00Z,6248311755595949,,18014398509482003,,
Held Back,it-user-5,,2026-11-03T09:31:00Z,6248311755595949,email,18014398509482005,,
Received,,IT-DEV-0006,1793703600,4350571203541773,,18014398509482007,,
Click,it-user-7,,2026-11-03T12:00:00.500Z,6634839652083743,email,18014398509482009,\"https://example.com/a,b?c=\"\"d\"\"\",1
";

/// Placeholder for the one hash-based messageId, filled in from what the agent sent.
const LP_H_PLACEHOLDER: &str = "lp-h-?";

/// The engagement files' events, derived by hand from SPEC section 5 and the shipped catalog.
fn expected_engagements() -> Vec<Value> {
    vec![
        json!({"messageId": "lp-e-18014398509481985", "event": "Email Opened", "userId": "it-user-1",
            "anonymousId": "IT-DEV-0001", "timestamp": "2026-11-03T08:00:00.125Z",
            "properties": {"email_id": "5680127476129675", "email_subject": "Message 1",
                "message_id": "5680127476129675"}}),
        // No event_id: the messageId is lp-h-<32 hex of the canonical record's SHA-256>.
        json!({"messageId": LP_H_PLACEHOLDER, "event": "Push Notification Received",
            "anonymousId": "IT-DEV-0002", "timestamp": "2026-11-03T10:00:00.000Z",
            "properties": {"campaign": {"message_id": "5175843646007627", "message_name": "Message 2",
                "medium": "Push", "id": "6649447776444452", "name": "Campaign 1"}}}),
        // Message 30 has an empty subject: the message name stands in.
        json!({"messageId": "lp-e-18014398509481989", "event": "Email Link Clicked", "userId": "it-user-3",
            "timestamp": "2026-11-03T10:00:00.123Z",
            "properties": {"email_id": "4057833125182384", "email_subject": "Message 30",
                "message_id": "4057833125182384", "campaign_id": "1548446060687181",
                "campaign_name": "Campaign 15", "link_url": "https://example.com/it?a=1&b=\"x\"", "link_id": 3}}),
        json!({"messageId": "lp-e-18014398509482001", "event": "Push Notification Tapped", "userId": "it-user-4",
            "anonymousId": "IT-DEV-0004", "timestamp": "2026-11-03T07:00:00.000Z",
            "properties": {"campaign": {"message_id": "5738448816825687", "message_name": "Message 29",
                "medium": "Push"}}}),
        json!({"messageId": "lp-e-18014398509482003", "event": "Unsubscribed", "userId": "it-user-5",
            "timestamp": "2026-11-03T09:30:00.000Z",
            "properties": {"email_id": "6248311755595949", "email_subject": "Message 22",
                "message_id": "6248311755595949", "campaign_id": "7640037548832046",
                "campaign_name": "Campaign 11"}}),
        json!({"messageId": "lp-e-18014398509482007", "event": "Push Notification Received",
            "anonymousId": "IT-DEV-0006", "timestamp": "2026-11-03T11:00:00.000Z",
            "properties": {"campaign": {"message_id": "4350571203541773", "message_name": "Message 8",
                "medium": "Push", "id": "8539656990258901", "name": "Campaign 4"}}}),
        json!({"messageId": "lp-e-18014398509482009", "event": "Email Link Clicked", "userId": "it-user-7",
            "timestamp": "2026-11-03T12:00:00.500Z",
            "properties": {"email_id": "6634839652083743", "email_subject": "Message 6",
                "message_id": "6634839652083743", "campaign_id": "2500354499963034",
                "campaign_name": "Campaign 3", "link_url": "https://example.com/a,b?c=\"d\"", "link_id": 1}}),
    ]
}

/// Six Leanplum sessions (SPEC section 4.1) with users and event ids of their own, one per
/// line. Times are binary fractions so that milliseconds are exact.
fn slow_sessions() -> Vec<Value> {
    let place = json!({"country": "US", "region": "NY", "city": "New York", "locale": "en_US",
        "timezone": "America/New_York", "appVersion": "3.1.0", "systemName": "Android",
        "systemVersion": "14", "deviceModel": "Pixel 8"});
    let session = |fields: Value| {
        let mut s = place.clone();
        s.as_object_mut()
            .expect("object")
            .extend(fields.as_object().expect("object").clone());
        s
    };
    vec![
        session(
            json!({"sessionId": "7100000000000001", "userId": "it-slow-1", "deviceId": "SLOW-DEV-0001",
            "time": 1793800000.5,
            "experiments": [{"id": 316460575u64, "variantId": 316460576u64, "impressed": true}],
            "states": [{"stateId": 1, "events": [
                {"eventId": 9100000000000000001u64, "name": ".m5680127476129675 Open", "time": 1793800010.25, "value": 0.0},
                {"eventId": 9100000000000000002u64, "name": "Add To Cart", "time": 1793800011.0, "value": 1.5,
                    "parameters": {"sku": "S1"}}]}]}),
        ),
        // No userId; the time is a string; an experiment not impressed; a send.
        session(
            json!({"sessionId": "7100000000000002", "deviceId": "SLOW-DEV-0002", "time": "1793800100.75",
            "experiments": [{"id": 491150281u64, "variantId": 491150283u64, "impressed": false}],
            "states": [{"stateId": 2, "events": [
                {"eventId": 9100000000000000004u64, "name": ".m5175843646007627", "time": 1793800104.0, "value": 0.0},
                {"eventId": 9100000000000000003u64, "name": ".m5175843646007627 Delivered", "time": 1793800105.125,
                    "value": 0.0}]}]}),
        ),
        // userId equal to deviceId: no userId; impressed absent counts as impressed.
        session(
            json!({"sessionId": "7100000000000003", "userId": "SLOW-DEV-0003", "deviceId": "SLOW-DEV-0003",
            "time": 1793800200.375,
            "experiments": [{"id": 925553235u64, "variantId": 925553237u64}],
            "states": [{"stateId": 3, "events": [
                {"eventId": 9100000000000000005u64, "name": ".m4057833125182384 Click", "time": 1793800210.875,
                    "value": 0.0, "parameters": {"url": "https://example.com/slow", "index": 2}}]}]}),
        ),
        // An eventId given as a string.
        session(
            json!({"sessionId": "7100000000000004", "userId": "it-slow-4", "deviceId": "SLOW-DEV-0004",
            "time": 1793800300.625, "experiments": [],
            "states": [{"stateId": 4, "events": [
                {"eventId": 9100000000000000007u64, "name": ".m6248311755595949 Unsubscribe", "time": 1793800310.875,
                    "value": 0.0},
                {"eventId": "9100000000000000009", "name": ".m5738448816825687 Bounce", "time": 1793800320.5,
                    "value": 0.0}]}]}),
        ),
        // A skipped SENT and a message the catalog does not know (unknown_message_channel = skip).
        session(
            json!({"sessionId": "7100000000000005", "userId": "it-slow-5", "deviceId": "SLOW-DEV-0005",
            "time": 1793800400.25,
            "states": [{"stateId": 5, "events": [
                {"eventId": 9100000000000000011u64, "name": ".m6684137765502369 Marked as spam",
                    "time": 1793800410.125, "value": 0.0},
                {"eventId": 9100000000000000012u64, "name": ".m5680127476129675 SENT", "time": 1793800405.0,
                    "value": 0.0},
                {"eventId": 9100000000000000013u64, "name": ".m1234567 Open", "time": 1793800406.0,
                    "value": 0.0}]}]}),
        ),
        session(
            json!({"sessionId": "7100000000000006", "userId": "it-slow-6", "deviceId": "SLOW-DEV-0006",
            "time": 1793800500.875,
            "experiments": [{"id": 850075082u64, "variantId": 850075084u64, "impressed": true}],
            "states": [{"stateId": 6, "events": [
                {"eventId": 9100000000000000015u64, "name": ".m5357051456714618 Received", "time": 1793800505.5,
                    "value": 0.0}]}]}),
        ),
    ]
}

/// What [`slow_sessions`] must produce, by hand from SPEC section 5. Experiment Viewed ids hash
/// the identity: sha256("it-slow-1")[..16] = 193589948473e6a4, sha256("SLOW-DEV-0003")[..16] =
/// 2702f074cdcaff47, sha256("it-slow-6")[..16] = c9125226a7715fef.
fn expected_slow_sessions() -> Vec<Value> {
    vec![
        json!({"messageId": "lp-x-316460575-316460576-193589948473e6a4", "event": "Experiment Viewed",
            "userId": "it-slow-1", "anonymousId": "SLOW-DEV-0001", "timestamp": "2026-11-04T13:46:40.500Z",
            "properties": {"experiment_id": "316460575", "experiment_name": "AB test 0",
                "variant_id": "316460576", "variant_name": "Variant A"}}),
        json!({"messageId": "lp-e-9100000000000000001", "event": "Email Opened",
            "userId": "it-slow-1", "anonymousId": "SLOW-DEV-0001", "timestamp": "2026-11-04T13:46:50.250Z",
            "properties": {"email_id": "5680127476129675", "email_subject": "Message 1",
                "message_id": "5680127476129675"}}),
        json!({"messageId": "lp-e-9100000000000000003", "event": "Push Notification Received",
            "anonymousId": "SLOW-DEV-0002", "timestamp": "2026-11-04T13:48:25.125Z",
            "properties": {"campaign": {"message_id": "5175843646007627", "message_name": "Message 2",
                "medium": "Push", "id": "6649447776444452", "name": "Campaign 1"}}}),
        json!({"messageId": "lp-x-925553235-925553237-2702f074cdcaff47", "event": "Experiment Viewed",
            "anonymousId": "SLOW-DEV-0003", "timestamp": "2026-11-04T13:50:00.375Z",
            "properties": {"experiment_id": "925553235", "experiment_name": "AB test 2",
                "variant_id": "925553237", "variant_name": "Variant B"}}),
        json!({"messageId": "lp-e-9100000000000000005", "event": "Email Link Clicked",
            "anonymousId": "SLOW-DEV-0003", "timestamp": "2026-11-04T13:50:10.875Z",
            "properties": {"email_id": "4057833125182384", "email_subject": "Message 30",
                "message_id": "4057833125182384", "campaign_id": "1548446060687181",
                "campaign_name": "Campaign 15", "link_url": "https://example.com/slow", "link_id": 2}}),
        json!({"messageId": "lp-e-9100000000000000007", "event": "Unsubscribed",
            "userId": "it-slow-4", "anonymousId": "SLOW-DEV-0004", "timestamp": "2026-11-04T13:51:50.875Z",
            "properties": {"email_id": "6248311755595949", "email_subject": "Message 22",
                "message_id": "6248311755595949", "campaign_id": "7640037548832046",
                "campaign_name": "Campaign 11"}}),
        json!({"messageId": "lp-e-9100000000000000009", "event": "Push Notification Bounced",
            "userId": "it-slow-4", "anonymousId": "SLOW-DEV-0004", "timestamp": "2026-11-04T13:52:00.500Z",
            "properties": {"campaign": {"message_id": "5738448816825687", "message_name": "Message 29",
                "medium": "Push"}}}),
        json!({"messageId": "lp-e-9100000000000000011", "event": "Email Marked as Spam",
            "userId": "it-slow-5", "anonymousId": "SLOW-DEV-0005", "timestamp": "2026-11-04T13:53:30.125Z",
            "properties": {"email_id": "6684137765502369", "email_subject": "Message 19",
                "message_id": "6684137765502369"}}),
        json!({"messageId": "lp-x-850075082-850075084-c9125226a7715fef", "event": "Experiment Viewed",
            "userId": "it-slow-6", "anonymousId": "SLOW-DEV-0006", "timestamp": "2026-11-04T13:55:00.875Z",
            "properties": {"experiment_id": "850075082", "experiment_name": "AB test 4",
                "variant_id": "850075084", "variant_name": "Variant B"}}),
        json!({"messageId": "lp-e-9100000000000000015", "event": "Push Notification Received",
            "userId": "it-slow-6", "anonymousId": "SLOW-DEV-0006", "timestamp": "2026-11-04T13:55:05.500Z",
            "properties": {"campaign": {"message_id": "5357051456714618", "message_name": "Message 26",
                "medium": "Push", "id": "8787183657783603", "name": "Campaign 13"}}}),
    ]
}

/// Splits JSON lines into one chunk per line, each cut in the middle of a line (except the
/// last), so the agent keeps seeing a partial last line while the file grows.
fn chunks_cut_mid_line(lines: &[String]) -> Vec<Vec<u8>> {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let mut cuts = Vec::new();
    let mut offset = 0;
    for line in &lines[..lines.len() - 1] {
        cuts.push(offset + line.len() / 2);
        offset += line.len() + 1;
    }
    cuts.push(text.len());
    let mut start = 0;
    cuts.into_iter()
        .map(|end| {
            let chunk = text.as_bytes()[start..end].to_vec();
            start = end;
            chunk
        })
        .collect()
}

#[test]
fn every_input_reaches_segment_exactly_once() {
    let mut env = TestEnv::new();
    env.config.max_batch_events = Some(MAX_BATCH_EVENTS);
    let max_batch_bytes: usize = 475_000; // the default, stated so the test can check it
    env.config.max_batch_bytes = Some(max_batch_bytes as u64);
    let mut agent = env.start_agent();

    // (a) The sample shard, written to a temp name and renamed in, in a subdirectory created
    // after the agent started (the watch is recursive).
    let shard_dir = env.watch_dir().join("20261101");
    write_atomically(
        &shard_dir.join(file_name(SHARD_0)),
        &read_repo_file(SHARD_0),
    );
    // (b) Its gzipped sibling (no extension: detected by content), copied in place.
    copy_into(SHARD_1, &shard_dir.join(file_name(SHARD_1)));
    // (c) Engagement records, JSON lines and CSV.
    let postbacks = env.watch_dir().join("feeds").join("postbacks-it.jsonl");
    write_atomically(&postbacks, ENGAGEMENTS_JSONL.as_bytes());
    write_atomically(
        &env.watch_dir().join("feeds").join("feed-it.csv"),
        ENGAGEMENTS_CSV.as_bytes(),
    );
    // (d) A session shard written slowly in place: 6 chunks 250 ms apart (well under
    // settle_secs = 1), each but the last ending mid-line.
    let lines: Vec<String> = slow_sessions().iter().map(Value::to_string).collect();
    let slow_path = env
        .watch_dir()
        .join("20261104")
        .join("export-5629499534213120-0b5c2a8e-7f3d-4c1e-9a6b-2d8e4f1a3c5b-output-0");
    write_slowly(
        &slow_path,
        &chunks_cut_mid_line(&lines),
        Duration::from_millis(250),
    );

    let shard_0 = expected_shard_0();
    let shard_1 = derive_shard_1(&shard_0);
    let mut expected: Vec<Value> = Vec::new();
    expected.extend(shard_0.iter().cloned());
    expected.extend(shard_1);
    expected.extend(expected_engagements());
    expected.extend(expected_slow_sessions());
    assert_eq!(expected.len(), 75);

    let arrived = env.server.wait_for_accepted(expected.len(), PATIENCE);
    // A quiet spell after the last event catches duplicates and extras sent late.
    env.server
        .wait_for_quiet(Duration::from_millis(1500), PATIENCE);
    let exit = agent.stop();
    let accepted = env.server.accepted_events();
    assert!(
        arrived,
        "only {} of {} events accepted within {PATIENCE:?}; got {:?}\nagent log tail:\n{}",
        accepted.len(),
        expected.len(),
        env.server.accepted_message_ids(),
        agent.log_tail(40)
    );
    let exit = exit.expect("the agent exits within 15 s of SIGTERM");
    assert!(
        exit.success(),
        "SIGTERM exits 0, got {exit}\nagent log tail:\n{}",
        agent.log_tail(40)
    );

    // Exactly the expected events; the hash-based messageId is checked for form, then
    // substituted so the rest of it is compared like the others.
    let hashed: Vec<&Value> = accepted
        .iter()
        .filter(|e| message_id(e).starts_with("lp-h-"))
        .collect();
    assert_eq!(
        hashed.len(),
        1,
        "exactly one event has a hash-based messageId: {hashed:?}"
    );
    let lp_h = message_id(hashed[0]);
    let hex_part = &lp_h["lp-h-".len()..];
    assert!(
        hex_part.len() == 32 && hex_part.chars().all(|c| c.is_ascii_hexdigit()),
        "lp-h-<32 hex digits>, got {lp_h}"
    );
    for e in &mut expected {
        if message_id(e) == LP_H_PLACEHOLDER {
            e["messageId"] = Value::String(lp_h.clone());
        }
    }
    assert_track_envelopes(&accepted);
    assert_same_events(&accepted, &expected, "accepted by Segment");

    // The session's context, for one event of the sample shard.
    let bounce = accepted
        .iter()
        .find(|e| message_id(e) == "lp-e-8508066449657143657")
        .expect("the sample shard's push bounce was sent");
    for (pointer, want) in [
        ("/context/device/id", "6102DD70-63E8-540E-9DD8-904F07489671"),
        ("/context/os/name", "iOS"),
        ("/context/app/version", "2.0.1"),
        ("/context/location/city", "San Francisco"),
        ("/context/library/name", "leanplum-segment-agent"),
    ] {
        assert_eq!(
            bounce.pointer(pointer).and_then(Value::as_str),
            Some(want),
            "{pointer} in {bounce}"
        );
    }

    // Every request: the batch endpoint, authenticated, gzipped JSON, fresh sentAt, within
    // both limits, and answered 200 (nothing in this run should be refused or retried).
    let requests = env.server.requests();
    assert!(
        requests.len() >= expected.len().div_ceil(MAX_BATCH_EVENTS as usize),
        "{} events in batches of at most {MAX_BATCH_EVENTS} need several requests, got {}",
        expected.len(),
        requests.len()
    );
    for r in &requests {
        let n = r.seq;
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/batch"),
            "request {n}"
        );
        assert!(
            r.auth_ok,
            "request {n}: Authorization {:?}",
            r.header("authorization")
        );
        assert_eq!(r.header("content-encoding"), Some("gzip"), "request {n}");
        assert!(
            r.header("content-type")
                .is_some_and(|v| v.starts_with("application/json")),
            "request {n}: Content-Type {:?}",
            r.header("content-type")
        );
        assert_eq!(r.body_error, None, "request {n}: body");
        assert_eq!(r.status, 200, "request {n} was answered {}", r.status);
        let sent_at = r
            .sent_at()
            .unwrap_or_else(|| panic!("request {n} has no sentAt"));
        let sent_ms =
            timestamp_millis(&sent_at).unwrap_or_else(|e| panic!("request {n}: sentAt: {e}"));
        let received_ms = r
            .received_wall
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis() as i64;
        assert!(
            (received_ms - sent_ms).abs() < 60_000,
            "request {n}: sentAt {sent_at} is not the time of sending"
        );
        let events = r.events();
        assert!(
            !events.is_empty() && events.len() <= MAX_BATCH_EVENTS as usize,
            "request {n}: {} events, limit {MAX_BATCH_EVENTS}",
            events.len()
        );
        assert!(
            r.plain_body.len() <= max_batch_bytes,
            "request {n}: {} bytes before gzip, limit {max_batch_bytes}",
            r.plain_body.len()
        );
    }

    // The hash-based messageId is stable: dry-run of the same file computes the same one.
    let dry = run_cli(
        &[
            "dry-run".as_ref(),
            "--config".as_ref(),
            env.config_path.as_os_str(),
            postbacks.as_os_str(),
        ],
        PATIENCE,
    );
    assert_eq!(dry.code(), 0, "dry-run: {dry:?}");
    let dry_ids: Vec<String> = parse_json_lines(&dry.stdout, "dry-run stdout")
        .iter()
        .map(message_id)
        .collect();
    assert!(
        dry_ids.contains(&lp_h),
        "dry-run of the same records gives {dry_ids:?}, the run sent {lp_h}"
    );

    // The write key never reaches the log, in clear or as the Basic credential.
    let logs = agent.logs();
    assert!(!logs.is_empty(), "the agent logs to stderr");
    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    for secret in [
        WRITE_KEY.to_string(),
        b64(&format!("{WRITE_KEY}:")),
        b64(WRITE_KEY),
    ] {
        assert!(
            !logs.contains(&secret),
            "the log contains the write key (as {secret:?})"
        );
    }
}
