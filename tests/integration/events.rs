//! Expected Segment events: the fixture for the sample shard, the events of its gzipped sibling
//! derived from it, and the comparison of what the server got against what was expected.

use std::collections::BTreeMap;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::util::repo_path;

/// The fixture describing [`crate::util::SHARD_0`]'s 29 events (envelope without `type` and
/// `context`).
pub const EXPECTED_SHARD_0: &str = "tests/data/expected-segment-events.jsonl";

/// The fields compared between an expected and a sent event (the fixture's envelope).
pub const COMPARED_FIELDS: [&str; 4] = ["event", "userId", "anonymousId", "properties"];

/// Parses JSON lines (blank lines skipped).
pub fn parse_json_lines(text: &str, what: &str) -> Vec<Value> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{what} line {}: {e}: {line}", i + 1))
        })
        .collect()
}

/// The expected events of the sample shard, from the fixture.
pub fn expected_shard_0() -> Vec<Value> {
    let path = repo_path(EXPECTED_SHARD_0);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let events = parse_json_lines(&text, EXPECTED_SHARD_0);
    assert_eq!(events.len(), 29, "the fixture describes 29 events");
    events
}

/// First 16 hex digits of SHA-256 of `s`: the identity part of an Experiment Viewed messageId.
pub fn sha256_16(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))[..16].to_string()
}

/// The device-id prefixes the gzipped sibling shard renamed.
const DEVICE_PREFIXES: [(&str, &str); 4] = [
    ("6102DD70-63E8", "7203EE81-74F9"),
    ("781B9A43", "892CAB54"),
    ("21BADE02", "32CBEF13"),
    ("C35D7D3B", "D46E8E4C"),
];

/// The expected events of [`crate::util::SHARD_1`], derived from the sample shard's by the
/// transformation that made the shard: event ids XOR `0x0F0F0F0F`, device-id prefixes
/// replaced, user `ü-3` renamed `user-42`, and Experiment Viewed ids re-hashed on the new
/// identity (userId when present, else anonymousId).
pub fn derive_shard_1(shard_0: &[Value]) -> Vec<Value> {
    shard_0
        .iter()
        .map(|event| {
            let mut e = event.clone();
            let obj = e.as_object_mut().expect("an expected event is an object");
            if let Some(Value::String(anon)) = obj.get_mut("anonymousId") {
                let (old, new) = DEVICE_PREFIXES
                    .iter()
                    .find(|(old, _)| anon.starts_with(old))
                    .unwrap_or_else(|| panic!("no device prefix rule for {anon}"));
                *anon = format!("{new}{}", &anon[old.len()..]);
            }
            if let Some(Value::String(user)) = obj.get_mut("userId") {
                assert_eq!(user, "ü-3", "the only user id in the sample shard");
                *user = "user-42".to_string();
            }
            let identity = obj
                .get("userId")
                .or_else(|| obj.get("anonymousId"))
                .and_then(Value::as_str)
                .expect("an event has userId or anonymousId")
                .to_string();
            let id = obj["messageId"]
                .as_str()
                .expect("messageId is a string")
                .to_string();
            let new_id = if let Some(event_id) = id.strip_prefix("lp-e-") {
                let n: u64 = event_id.parse().unwrap_or_else(|e| panic!("{id}: {e}"));
                format!("lp-e-{}", n ^ 0x0F0F_0F0F)
            } else if let Some(rest) = id.strip_prefix("lp-x-") {
                let parts: Vec<&str> = rest.split('-').collect();
                assert_eq!(parts.len(), 3, "lp-x-<experiment>-<variant>-<hash>: {id}");
                format!("lp-x-{}-{}-{}", parts[0], parts[1], sha256_16(&identity))
            } else {
                panic!("unexpected messageId form in the fixture: {id}");
            };
            obj.insert("messageId".to_string(), Value::String(new_id));
            e
        })
        .collect()
}

/// The event's `messageId` (or a placeholder naming the problem).
pub fn message_id(event: &Value) -> String {
    event
        .get("messageId")
        .and_then(Value::as_str)
        .unwrap_or("<no messageId>")
        .to_string()
}

/// Epoch milliseconds of an RFC 3339 timestamp that must be UTC.
pub fn timestamp_millis(ts: &str) -> Result<i64, String> {
    let parsed = chrono::DateTime::parse_from_rfc3339(ts).map_err(|e| format!("{ts:?}: {e}"))?;
    if parsed.offset().local_minus_utc() != 0 {
        return Err(format!("{ts:?} is not UTC"));
    }
    Ok(parsed.timestamp_millis())
}

/// Checks that every sent event is a Segment `track` call with our library in its context.
pub fn assert_track_envelopes(events: &[Value]) {
    for e in events {
        let id = message_id(e);
        assert_eq!(
            e.get("type").and_then(Value::as_str),
            Some("track"),
            "{id}: type: {e}"
        );
        assert_eq!(
            e.pointer("/context/library/name").and_then(Value::as_str),
            Some("leanplum-segment-agent"),
            "{id}: context.library.name: {e}"
        );
        assert!(
            e.get("userId").is_some() || e.get("anonymousId").is_some(),
            "{id}: no identity: {e}"
        );
    }
}

/// Asserts `actual` is exactly `expected`, keyed by messageId: none missing, none extra, none
/// twice, and for each one the compared fields equal and the timestamp equal to the
/// millisecond. A field absent on one side must be absent (or null) on the other. Reports
/// every difference at once.
pub fn assert_same_events(actual: &[Value], expected: &[Value], what: &str) {
    let mut problems = Vec::new();

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in actual {
        *counts.entry(message_id(e)).or_default() += 1;
    }
    for (id, n) in &counts {
        if *n > 1 {
            problems.push(format!("sent {n} times: {id}"));
        }
    }
    let expected_by_id: BTreeMap<String, &Value> =
        expected.iter().map(|e| (message_id(e), e)).collect();
    assert_eq!(
        expected_by_id.len(),
        expected.len(),
        "{what}: the expected events repeat a messageId"
    );
    let actual_by_id: BTreeMap<String, &Value> =
        actual.iter().map(|e| (message_id(e), e)).collect();

    for id in expected_by_id
        .keys()
        .filter(|id| !actual_by_id.contains_key(*id))
    {
        problems.push(format!("missing: {id} {}", expected_by_id[id]));
    }
    for id in actual_by_id
        .keys()
        .filter(|id| !expected_by_id.contains_key(*id))
    {
        problems.push(format!("unexpected: {id} {}", actual_by_id[id]));
    }
    for (id, want) in &expected_by_id {
        let Some(got) = actual_by_id.get(id) else {
            continue;
        };
        for field in COMPARED_FIELDS {
            let w = want.get(field).filter(|v| !v.is_null());
            let g = got.get(field).filter(|v| !v.is_null());
            if w != g {
                problems.push(format!("{id}: {field}: expected {w:?}, got {g:?}"));
            }
        }
        let w = want
            .get("timestamp")
            .and_then(Value::as_str)
            .map(timestamp_millis);
        let g = got
            .get("timestamp")
            .and_then(Value::as_str)
            .map(timestamp_millis);
        match (w, g) {
            (Some(Ok(w)), Some(Ok(g))) if w == g => {}
            (w, g) => problems.push(format!(
                "{id}: timestamp: expected {:?} ({w:?} ms), got {:?} ({g:?} ms)",
                want.get("timestamp"),
                got.get("timestamp")
            )),
        }
    }

    assert!(
        problems.is_empty(),
        "{what}: {} sent vs {} expected events; {} problem(s):\n  {}",
        actual.len(),
        expected.len(),
        problems.len(),
        problems.join("\n  ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{SHARD_1, read_repo_file};
    use std::io::Read;

    /// The derivation must describe the shipped gzipped shard: every event id and identity it
    /// predicts exists in the shard, so a wrong derivation fails here and not as a daemon bug.
    #[test]
    fn derived_shard_1_matches_the_shipped_file() {
        let derived = derive_shard_1(&expected_shard_0());
        let mut text = String::new();
        flate2::read::GzDecoder::new(read_repo_file(SHARD_1).as_slice())
            .read_to_string(&mut text)
            .expect("output-1 is gzipped UTF-8");
        for e in &derived {
            let id = message_id(e);
            if let Some(event_id) = id.strip_prefix("lp-e-") {
                assert!(
                    text.contains(&format!("\"eventId\":{event_id},")),
                    "{id} not in output-1"
                );
            }
            let anon = e["anonymousId"]
                .as_str()
                .expect("every fixture event has an anonymousId");
            assert!(text.contains(anon), "{anon} not in output-1");
        }
        assert!(text.contains("\"userId\":\"user-42\""));
        assert_eq!(
            sha256_16("6102DD70-63E8-540E-9DD8-904F07489671"),
            "6de15d86827a5570"
        );
        assert_eq!(sha256_16("ü-3"), "c581fa4bc78689eb");
    }
}
