//! Generated Leanplum inputs and the Segment `messageId`s they must produce: session exports of
//! any size, one-event session lines, one long session, gzip.

use std::io::Write;
use std::path::Path;

use super::write_atomically;

/// Catalog messages (`examples/catalog/messages.json`) and actions that each map to exactly one
/// Segment event, so a generated export's expected events are one per message event.
const GENERATED_ACTIONS: [(&str, &str, &str); 4] = [
    ("5680127476129675", "Open", "Email Opened"),
    (
        "5175843646007627",
        "Delivered",
        "Push Notification Received",
    ),
    ("4350571203541773", "Open", "Push Notification Tapped"),
    ("6634839652083743", "Click", "Email Link Clicked"),
];

/// Message events per generated session line.
const GENERATED_EVENTS_PER_SESSION: usize = 5;

/// A generated Leanplum session export and the Segment events it must produce.
#[derive(Debug, Clone)]
pub struct GeneratedExport {
    /// JSON lines, one session per line (SPEC section 4.1).
    pub bytes: Vec<u8>,
    /// `lp-e-<eventId>` of every message event, in file order.
    pub message_ids: Vec<String>,
}

/// A Leanplum session export (JSON lines) with `n` message events whose eventIds are
/// `first_event_id .. first_event_id + n`, five per session, cycling through catalog messages
/// and actions that map to one Segment event each. Give every test (and every file of a test)
/// its own id range, e.g. `7_000_000_000_000_000_000 + i`: above 2^53, as Leanplum's are.
pub fn session_export(first_event_id: u64, n: usize) -> GeneratedExport {
    let mut bytes = Vec::new();
    let mut message_ids = Vec::with_capacity(n);
    let mut i = 0usize;
    while i < n {
        let session_no = first_event_id / GENERATED_EVENTS_PER_SESSION as u64 + i as u64;
        let start = 1_793_800_000.0 + (i as f64) * 8.0;
        let mut events = Vec::new();
        for j in 0..GENERATED_EVENTS_PER_SESSION.min(n - i) {
            let event_id = first_event_id + (i + j) as u64;
            let (message, action, _) =
                GENERATED_ACTIONS[(event_id % GENERATED_ACTIONS.len() as u64) as usize];
            let mut event = serde_json::json!({
                "eventId": event_id,
                "name": format!(".m{message} {action}"),
                "time": start + 1.0 + j as f64,
                "value": 0.0,
            });
            if action == "Click" {
                event["parameters"] = serde_json::json!({"url": format!("https://example.com/it/{event_id}"), "index": 2});
            }
            events.push(event);
            message_ids.push(format!("lp-e-{event_id}"));
        }
        let session = serde_json::json!({
            "sessionId": (session_no % 9_000_000_000_000_000 + 1_000_000_000_000_000).to_string(),
            "userId": format!("gen-user-{}", session_no % 97),
            "deviceId": format!("GEN-DEV-{:08}", session_no % 1_000_003),
            "time": start,
            "locale": "en_US",
            "timezone": "Europe/Berlin",
            "country": "DE",
            "region": "BE",
            "city": "Berlin",
            "appVersion": "4.2.0",
            "systemName": "Android",
            "systemVersion": "14",
            "deviceModel": "Pixel 8",
            "experiments": [],
            "states": [{"stateId": 1, "events": events}],
        });
        serde_json::to_writer(&mut bytes, &session).expect("serialize a session");
        bytes.push(b'\n');
        i += GENERATED_EVENTS_PER_SESSION;
    }
    GeneratedExport { bytes, message_ids }
}

/// One Leanplum session line (no newline) of an active user: `app_events` app events with
/// parameters (about 130 bytes each: 40,000 make 5 MB), spread over states of 500, and
/// `engagements` message engagements among them, eventIds `first_event_id ..`, cycling through
/// catalog messages and actions that map to one Segment event each. Returns the line and the
/// engagements' messageIds in line order.
pub fn long_session_line(
    first_event_id: u64,
    app_events: usize,
    engagements: usize,
) -> (Vec<u8>, Vec<String>) {
    use std::fmt::Write as _;
    let start = 1_793_900_000.0;
    let every = (app_events / engagements.max(1)).max(1);
    let mut events: Vec<String> = Vec::with_capacity(app_events + engagements);
    let mut ids = Vec::with_capacity(engagements);
    for i in 0..app_events {
        if i % every == 0 && ids.len() < engagements {
            let event_id = first_event_id + ids.len() as u64;
            let (message, action, _) =
                GENERATED_ACTIONS[(event_id % GENERATED_ACTIONS.len() as u64) as usize];
            let params = if action == "Click" {
                format!(
                    r#","parameters":{{"url":"https://example.com/long/{event_id}","index":1}}"#
                )
            } else {
                String::new()
            };
            events.push(format!(
                r#"{{"eventId":{event_id},"name":".m{message} {action}","time":{},"value":0.0{params}}}"#,
                start + i as f64 * 0.5 + 0.25
            ));
            ids.push(lp_id(event_id));
        }
        events.push(format!(
            r#"{{"eventId":{},"name":"View Item","time":{},"value":1.5,"parameters":{{"sku":"SKU-{i:08}","query":"long session {i} of an active user","qty":{}}}}}"#,
            first_event_id + 500_000 + i as u64,
            start + i as f64 * 0.5,
            i % 9 + 1
        ));
    }
    while ids.len() < engagements {
        let event_id = first_event_id + ids.len() as u64;
        events.push(format!(
            r#"{{"eventId":{event_id},"name":".m{EMAIL_MESSAGE} Open","time":{start}}}"#
        ));
        ids.push(lp_id(event_id));
    }
    let mut line = format!(
        r#"{{"sessionId":"{first_event_id}","userId":"long-user","deviceId":"LONG-{first_event_id}","time":{start},"locale":"en_US","country":"DE","experiments":[],"states":["#
    );
    for (n, state) in events.chunks(500).enumerate() {
        if n > 0 {
            line.push(',');
        }
        let _ = write!(line, r#"{{"stateId":{n},"events":[{}]}}"#, state.join(","));
    }
    line.push_str("]}");
    (line.into_bytes(), ids)
}

/// A size as the agent writes it in reasons: `1572916` -> `1,572,916`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Writes `count` generated export files of `per_file` events each into `dir` (atomically,
/// as sync tools do), eventIds from `first_event_id` on; returns every expected messageId.
pub fn drop_session_files(
    dir: &Path,
    prefix: &str,
    first_event_id: u64,
    count: usize,
    per_file: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(count * per_file);
    for f in 0..count {
        let export = session_export(first_event_id + (f * per_file) as u64, per_file);
        write_atomically(&dir.join(format!("{prefix}-{f:03}")), &export.bytes);
        ids.extend(export.message_ids);
    }
    ids
}

/// A catalog email message (`examples/catalog/messages.json`): `.m<id> Open` in a session maps to
/// exactly one "Email Opened" event.
pub const EMAIL_MESSAGE: &str = "5680127476129675";

/// The Segment `messageId` of a Leanplum message event: `lp-e-<eventId>`.
pub fn lp_id(event_id: u64) -> String {
    format!("lp-e-{event_id}")
}

/// One Leanplum session line (no newline) holding one email open, with eventId `event_id` and
/// device `D-<event_id>`: it maps to one "Email Opened" event with messageId `lp-e-<event_id>`.
pub fn open_session_line(event_id: u64) -> String {
    format!(
        r#"{{"deviceId":"D-{event_id}","time":1793534899.612,"experiments":[],"states":[{{"events":[{{"eventId":{event_id},"name":".m{EMAIL_MESSAGE} Open","time":1793534900.5}}]}}]}}"#
    )
}

/// `n` newline-terminated session lines for eventIds `first .. first + n` (one event each),
/// and their messageIds in file order.
pub fn open_session_lines(first: u64, n: usize) -> (Vec<u8>, Vec<String>) {
    let mut bytes = Vec::new();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n as u64 {
        bytes.extend_from_slice(open_session_line(first + i).as_bytes());
        bytes.push(b'\n');
        ids.push(lp_id(first + i));
    }
    (bytes, ids)
}

/// `bytes` gzipped (one member).
pub fn gzip_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip in memory");
    enc.finish().expect("gzip in memory")
}

/// `n` newline-terminated session lines, one email link click each (eventIds `first ..`), whose
/// link URL is `url_bytes` long: large events, for a spool of many bytes from few events.
/// Returns the lines and their messageIds.
pub fn click_session_lines(first: u64, n: usize, url_bytes: usize) -> (Vec<u8>, Vec<String>) {
    let (message, action, _) = GENERATED_ACTIONS[3];
    let path = "p".repeat(url_bytes.saturating_sub(20));
    let mut bytes = Vec::new();
    let mut ids = Vec::with_capacity(n);
    for event_id in first..first + n as u64 {
        bytes.extend_from_slice(
            format!(
                r#"{{"deviceId":"CLICK-{event_id}","time":1793534899.5,"experiments":[],"states":[{{"events":[{{"eventId":{event_id},"name":".m{message} {action}","time":1793534900.5,"parameters":{{"url":"https://example.com/{path}","index":1}}}}]}}]}}"#
            )
            .as_bytes(),
        );
        bytes.push(b'\n');
        ids.push(lp_id(event_id));
    }
    (bytes, ids)
}
