//! Flat engagement records (SPEC section 4, formats 2 and 3): one engagement per JSON line or
//! CSV row, from postbacks and data feeds rather than session exports. Owns their field-by-field
//! parsing and the canonical hash behind `lp-h-` messageIds.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{Channel, Id};

/// One engagement record, already validated field by field. `event` is either a Segment event
/// name (`"Email Opened"`) or a Leanplum action (`"Open"`), which the mapping resolves by channel.
/// Serialized only as a parked record (see `crate::catalog::parking`), read back as is.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Engagement {
    pub event: String,
    pub user_id: Option<String>,
    pub device_id: Option<String>,
    /// Milliseconds since the epoch (from RFC 3339, epoch seconds, or epoch milliseconds).
    pub timestamp_ms: i64,
    pub message_id: Option<Id>,
    pub channel: Option<Channel>,
    pub event_id: Option<Id>,
    pub email_id: Option<String>,
    pub email_subject: Option<String>,
    pub message_name: Option<String>,
    pub campaign_id: Option<Id>,
    pub campaign_name: Option<String>,
    pub link_url: Option<String>,
    pub link_id: Option<i64>,
    /// First 32 hex digits of SHA-256 of the canonical record (see `canonical_hash`), the
    /// fallback `messageId` (`lp-h-...`) when the record has no `event_id`.
    pub canonical_hash: String,
}

impl Engagement {
    /// From one JSON object (an engagement JSON line). Values may be strings or numbers; `null`
    /// and `""` are absent. Unknown keys are ignored here but are part of the canonical hash.
    pub(crate) fn from_json_map(m: &Map<String, Value>) -> Result<Engagement, String> {
        Engagement::from_raw(m.iter().map(|(k, v)| (k.as_str(), Raw::Json(v))))
    }

    /// From one CSV row: header names -> cell text, empty cells already removed. Every value is
    /// text, so `"4057833125182384"` is read the same as the JSON number `4057833125182384`.
    pub(crate) fn from_fields(fields: &[(String, String)]) -> Result<Engagement, String> {
        Engagement::from_raw(
            fields
                .iter()
                .map(|(k, v)| (k.as_str(), Raw::Text(v.as_str()))),
        )
    }

    fn from_raw<'a>(
        fields: impl Iterator<Item = (&'a str, Raw<'a>)>,
    ) -> Result<Engagement, String> {
        let mut canonical: Vec<(&'a str, Cow<'a, str>)> = Vec::new();
        let mut known: BTreeMap<&'a str, Raw<'a>> = BTreeMap::new();
        for (key, raw) in fields {
            let Some(text) = raw.canonical_text() else {
                continue;
            };
            canonical.push((key, text));
            known.insert(key, raw);
        }
        let get = |name: &str| known.get(name).copied();

        let event = match get("event") {
            Some(raw) => text_field("event", raw)?.trim().to_owned(),
            None => String::new(),
        };
        if event.is_empty() {
            return Err("event: missing".into());
        }
        let timestamp_ms = match get("timestamp") {
            Some(raw) => timestamp_field(raw)?,
            None => return Err("timestamp: missing".into()),
        };
        let text = |name: &'static str| get(name).map(|raw| text_field(name, raw)).transpose();
        let id = |name: &'static str| get(name).map(|raw| id_field(name, raw)).transpose();
        Ok(Engagement {
            event,
            user_id: text("user_id")?,
            device_id: text("device_id")?,
            timestamp_ms,
            message_id: id("message_id")?,
            channel: get("channel").map(channel_field).transpose()?,
            event_id: id("event_id")?,
            email_id: text("email_id")?,
            email_subject: text("email_subject")?,
            message_name: text("message_name")?,
            campaign_id: id("campaign_id")?,
            campaign_name: text("campaign_name")?,
            link_url: text("link_url")?,
            link_id: get("link_id").map(link_id_field).transpose()?,
            canonical_hash: canonical_hash(canonical.iter().map(|(k, v)| (*k, v.as_ref()))),
        })
    }
}

/// The hash behind `lp-h-` messageIds, for engagement records without an `event_id`. It is
/// part of the agent's contract with Segment's dedupe: changing it re-sends every such record,
/// so it must never change.
///
/// The canonical record is built from the record's fields as they arrived (all of them, known
/// or not):
/// 1. fields whose value is JSON `null` or the empty string are dropped (an empty CSV cell and
///    a missing JSON key are the same record);
/// 2. each value is replaced by its text: a JSON string's content, a JSON number's literal as
///    `serde_json` prints it (`4057833125182384`, `1793610000.5`), `true`/`false`, and for an
///    array or object its compact JSON; a CSV cell is its text as is;
/// 3. keys are sorted by their UTF-8 bytes; when a key repeats, the last value wins;
/// 4. the result is serialized as one compact JSON object whose values are all strings,
///    `{"event":"Open","timestamp":"1793610000123"}`, with `serde_json`'s escaping (only `"`,
///    `\` and control characters are escaped).
///
/// The hash is the first 32 lowercase hex digits of SHA-256 of those bytes. A JSON line and a
/// CSV row with the same keys and the same texts hash the same (CSV header names are trimmed and
/// lowercased by the reader before they get here).
pub(crate) fn canonical_hash<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let sorted: BTreeMap<&str, &str> = fields.into_iter().filter(|(_, v)| !v.is_empty()).collect();
    // Inserted in sorted order, so the bytes do not depend on whether serde_json's
    // `preserve_order` feature is on somewhere in the build.
    let mut object = Map::new();
    for (k, v) in sorted {
        object.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    let canonical = Value::Object(object).to_string();
    let digest = Sha256::digest(canonical.as_bytes());
    let mut hex = hex::encode(digest);
    hex.truncate(32);
    hex
}

/// A field value as it arrived: CSV cells are always text, JSON values keep their type.
#[derive(Clone, Copy)]
enum Raw<'a> {
    Text(&'a str),
    Json(&'a Value),
}

impl<'a> Raw<'a> {
    /// The value's text for the canonical record; `None` when it counts as absent (null, "").
    fn canonical_text(self) -> Option<Cow<'a, str>> {
        match self {
            Raw::Json(Value::Null) => None,
            Raw::Json(Value::Number(n)) => Some(Cow::Owned(n.to_string())),
            Raw::Json(Value::Bool(b)) => Some(Cow::Owned(b.to_string())),
            // Only unknown fields can hold these and still parse; compact JSON is their text.
            Raw::Json(v @ (Value::Array(_) | Value::Object(_))) => Some(Cow::Owned(v.to_string())),
            Raw::Text(s) => (!s.is_empty()).then_some(Cow::Borrowed(s)),
            Raw::Json(Value::String(s)) => (!s.is_empty()).then_some(Cow::Borrowed(s.as_str())),
        }
    }

    /// The text of a CSV cell or a JSON string.
    fn as_str(self) -> Option<&'a str> {
        match self {
            Raw::Text(s) => Some(s),
            Raw::Json(Value::String(s)) => Some(s),
            Raw::Json(_) => None,
        }
    }

    /// What the value is, for error messages.
    fn kind(self) -> &'static str {
        match self {
            Raw::Text(_) | Raw::Json(Value::String(_)) => "a string",
            Raw::Json(Value::Null) => "null",
            Raw::Json(Value::Bool(_)) => "a boolean",
            Raw::Json(Value::Number(_)) => "a number",
            Raw::Json(Value::Array(_)) => "an array",
            Raw::Json(Value::Object(_)) => "an object",
        }
    }
}

/// Free text (names, identities, URLs): strings, and numbers or booleans as their text, since
/// feeds write `user_id` as a number as often as not.
fn text_field(name: &str, raw: Raw<'_>) -> Result<String, String> {
    match raw {
        Raw::Json(Value::Array(_) | Value::Object(_)) => Err(format!(
            "{name}: expected a string or a number, found {}",
            raw.kind()
        )),
        _ => Ok(raw.canonical_text().unwrap_or_default().into_owned()),
    }
}

/// A Leanplum id: a JSON integer (serde_json keeps u64 exactly) or a string of digits, never
/// through an f64, since ids exceed 2^53.
fn id_field(name: &str, raw: Raw<'_>) -> Result<Id, String> {
    match raw {
        Raw::Json(Value::Number(n)) => n
            .as_u64()
            .map(Id)
            .ok_or_else(|| format!("{name}: {n} is not an integer id")),
        _ => match raw.as_str() {
            Some(s) => s
                .parse::<Id>()
                .map_err(|_| format!("{name}: {s:?} is not an integer id")),
            None => Err(format!(
                "{name}: expected an integer id, found {}",
                raw.kind()
            )),
        },
    }
}

fn link_id_field(raw: Raw<'_>) -> Result<i64, String> {
    match raw {
        Raw::Json(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| format!("link_id: {n} is not an integer")),
        _ => match raw.as_str() {
            Some(s) => s
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("link_id: {s:?} is not an integer")),
            None => Err(format!(
                "link_id: expected an integer, found {}",
                raw.kind()
            )),
        },
    }
}

fn channel_field(raw: Raw<'_>) -> Result<Channel, String> {
    match raw.as_str() {
        Some(s) => s.parse::<Channel>().map_err(|e| format!("channel: {e}")),
        None => Err(format!(
            "channel: expected \"email\" or \"push\", found {}",
            raw.kind()
        )),
    }
}

/// Epoch numbers at or above this are milliseconds, below it seconds: 1e11 seconds is the year
/// 5138, 1e11 milliseconds is March 1973, so no real engagement time is ambiguous.
const MILLIS_THRESHOLD: u64 = 100_000_000_000;

/// 9999-12-31T23:59:59.999Z: RFC 3339 (and so Segment's `timestamp`) ends with the year 9999.
const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

fn timestamp_field(raw: Raw<'_>) -> Result<i64, String> {
    let out_of_range = |shown: &dyn std::fmt::Display| {
        format!("timestamp: {shown} is out of range (1970 to 9999)")
    };
    match raw {
        Raw::Json(Value::Number(n)) => {
            let ms = match (n.as_u64(), n.as_f64()) {
                (Some(int), _) => millis_from_int(int),
                (None, Some(float)) => millis_from_float(float),
                (None, None) => None,
            };
            ms.ok_or_else(|| out_of_range(n))
        }
        _ => {
            let Some(s) = raw.as_str() else {
                return Err(format!(
                    "timestamp: expected RFC 3339 or epoch time, found {}",
                    raw.kind()
                ));
            };
            let t = s.trim();
            if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                // Digits only: an integer, kept exact (epoch ms do not fit f64's fraction bits
                // comfortably, and there is no reason to round them).
                return t
                    .parse::<u64>()
                    .ok()
                    .and_then(millis_from_int)
                    .ok_or_else(|| out_of_range(&t));
            }
            if looks_numeric(t)
                && let Ok(float) = t.parse::<f64>()
            {
                return millis_from_float(float).ok_or_else(|| out_of_range(&t));
            }
            match chrono::DateTime::parse_from_rfc3339(t) {
                Ok(dt) => {
                    // Rounded to the nearest millisecond, like epoch times (`LpTime::millis`).
                    let ms = dt.timestamp() * 1000
                        + i64::from((dt.timestamp_subsec_nanos() + 500_000) / 1_000_000);
                    if (0..=MAX_TIMESTAMP_MS).contains(&ms) {
                        Ok(ms)
                    } else {
                        Err(out_of_range(&t))
                    }
                }
                Err(_) => Err(format!("timestamp: {s:?} is not RFC 3339 or epoch time")),
            }
        }
    }
}

/// A number-like string (`1793610000.5`, `1.7936E+09`), not `inf` or `NaN`, which Rust's f64
/// parser would also accept.
fn looks_numeric(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    body.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && body
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
}

fn millis_from_int(v: u64) -> Option<i64> {
    let ms = if v >= MILLIS_THRESHOLD {
        v
    } else {
        v.checked_mul(1000)?
    };
    i64::try_from(ms).ok().filter(|&ms| ms <= MAX_TIMESTAMP_MS)
}

fn millis_from_float(v: f64) -> Option<i64> {
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    let ms = if v >= MILLIS_THRESHOLD as f64 {
        v
    } else {
        v * 1000.0
    };
    let ms = ms.round();
    // The range check happens on the float, so the cast below cannot saturate.
    (ms <= MAX_TIMESTAMP_MS as f64).then_some(ms as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(line: &str) -> Result<Engagement, String> {
        let map: Map<String, Value> = serde_json::from_str(line).expect("test JSON is an object");
        Engagement::from_json_map(&map)
    }

    fn row(pairs: &[(&str, &str)]) -> Result<Engagement, String> {
        let fields: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Engagement::from_fields(&fields)
    }

    fn ts(value: &str) -> Result<i64, String> {
        json(&format!(r#"{{"event":"Open","timestamp":{value}}}"#)).map(|e| e.timestamp_ms)
    }

    #[test]
    fn timestamps_in_every_form() {
        // 2026-11-02T09:15:00.250Z
        let ms = 1_793_610_900_250;
        assert_eq!(ts(r#""2026-11-02T09:15:00.250Z""#), Ok(ms));
        assert_eq!(ts(r#""2026-11-02T10:15:00.250+01:00""#), Ok(ms));
        assert_eq!(ts(r#""2026-11-02T09:15:00.2504999Z""#), Ok(ms));
        assert_eq!(ts(r#""2026-11-02T09:15:00.2495Z""#), Ok(ms));
        assert_eq!(ts("1793610900250"), Ok(ms));
        assert_eq!(ts(r#""1793610900250""#), Ok(ms));
        assert_eq!(ts("1793610900.25"), Ok(ms));
        assert_eq!(ts(r#"" 1793610900.25 ""#), Ok(ms));
        assert_eq!(ts(r#""1.79361090025E+09""#), Ok(ms));
        assert_eq!(ts("1793610900"), Ok(ms - 250));
        assert_eq!(ts(r#""1793610900""#), Ok(ms - 250));
        assert_eq!(ts("1793610900250.4"), Ok(ms));
        assert_eq!(ts("99999999999"), Ok(99_999_999_999_000));
        assert_eq!(ts("100000000000"), Ok(100_000_000_000));
        assert_eq!(
            ts(r#""yesterday""#),
            Err(r#"timestamp: "yesterday" is not RFC 3339 or epoch time"#.into())
        );
        assert!(ts(r#""inf""#).unwrap_err().contains("not RFC 3339"));
        assert!(ts(r#""NaN""#).unwrap_err().contains("not RFC 3339"));
        assert!(ts("-5").unwrap_err().contains("out of range"));
        assert!(ts("1e300").unwrap_err().contains("out of range"));
        assert!(
            ts("99999999999999999999")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(ts("true").unwrap_err().starts_with("timestamp: expected"));
        assert_eq!(
            json(r#"{"event":"Open"}"#),
            Err("timestamp: missing".into())
        );
        assert_eq!(
            json(r#"{"event":"Open","timestamp":null}"#),
            Err("timestamp: missing".into())
        );
    }

    #[test]
    fn ids_above_2_pow_53_survive_as_strings_and_numbers() {
        let e = json(
            r#"{"event":"Click","timestamp":1,"message_id":9007199254740993,
                "event_id":"18446744073709551615","campaign_id":" 9007199254740995 "}"#,
        )
        .unwrap();
        assert_eq!(e.message_id, Some(Id(9_007_199_254_740_993)));
        assert_eq!(e.event_id, Some(Id(u64::MAX)));
        assert_eq!(e.campaign_id, Some(Id(9_007_199_254_740_995)));
        let c = row(&[
            ("event", "Click"),
            ("timestamp", "1"),
            ("message_id", "9007199254740993"),
            ("event_id", "18446744073709551615"),
        ])
        .unwrap();
        assert_eq!((c.message_id, c.event_id), (e.message_id, e.event_id));
        let err = |line: &str| json(line).unwrap_err();
        assert_eq!(
            err(r#"{"event":"x","timestamp":1,"event_id":1.5}"#),
            "event_id: 1.5 is not an integer id"
        );
        assert_eq!(
            err(r#"{"event":"x","timestamp":1,"message_id":-3}"#),
            "message_id: -3 is not an integer id"
        );
        assert_eq!(
            err(r#"{"event":"x","timestamp":1,"message_id":"12a"}"#),
            r#"message_id: "12a" is not an integer id"#
        );
        assert_eq!(
            err(r#"{"event":"x","timestamp":1,"campaign_id":[1]}"#),
            "campaign_id: expected an integer id, found an array"
        );
    }

    #[test]
    fn fields_parse_and_errors_name_the_field() {
        let e = json(
            r#"{"event":" Click ","user_id":42,"device_id":"d","timestamp":1,"channel":"EMAIL",
                "email_id":"e","email_subject":"Hi","message_name":"m","campaign_name":"c",
                "link_url":"https://x","link_id":"2","extra":{"a":1},"empty":""}"#,
        )
        .unwrap();
        assert_eq!(e.event, "Click");
        assert_eq!(e.user_id.as_deref(), Some("42"));
        assert_eq!(e.channel, Some(Channel::Email));
        assert_eq!(e.link_id, Some(2));
        assert_eq!(e.link_url.as_deref(), Some("https://x"));
        assert_eq!(e.email_subject.as_deref(), Some("Hi"));
        assert_eq!(e.canonical_hash.len(), 32);

        // Identity is the mapping's business, not the parser's.
        let anon = json(r#"{"event":"Open","timestamp":1}"#).unwrap();
        assert_eq!((anon.user_id, anon.device_id), (None, None));

        let err = |line: &str| json(line).unwrap_err();
        assert_eq!(err(r#"{"timestamp":1}"#), "event: missing");
        assert_eq!(err(r#"{"event":"  ","timestamp":1}"#), "event: missing");
        assert!(err(r#"{"event":"x","timestamp":1,"channel":"sms"}"#).starts_with("channel: "));
        assert!(err(r#"{"event":"x","timestamp":1,"channel":1}"#).starts_with("channel: "));
        assert!(err(r#"{"event":"x","timestamp":1,"link_id":1.5}"#).starts_with("link_id: "));
        assert!(err(r#"{"event":"x","timestamp":1,"user_id":{}}"#).starts_with("user_id: "));
        assert_eq!(
            row(&[("event", "x"), ("timestamp", "1"), ("channel", "Push")])
                .unwrap()
                .channel,
            Some(Channel::Push)
        );
    }

    #[test]
    fn canonical_hash_is_the_same_for_a_json_line_and_its_csv_row() {
        let line = json(
            r#"{"event":"Click","user_id":"user-7","device_id":null,"timestamp":1793610000123,
                "message_id":4057833125182384,"link_url":"https://example.com/\"q\"","link_id":2,
                "email_subject":""}"#,
        )
        .unwrap();
        let csv = row(&[
            ("link_id", "2"),
            ("event", "Click"),
            ("user_id", "user-7"),
            ("timestamp", "1793610000123"),
            ("message_id", "4057833125182384"),
            ("link_url", "https://example.com/\"q\""),
        ])
        .unwrap();
        assert_eq!(line, csv);
        // Pinned: this value is a messageId in Segment forever (`lp-h-...`).
        let canonical = r#"{"event":"Click","link_id":"2","link_url":"https://example.com/\"q\"","message_id":"4057833125182384","timestamp":"1793610000123","user_id":"user-7"}"#;
        let expected = hex::encode(Sha256::digest(canonical.as_bytes()));
        assert_eq!(line.canonical_hash, expected[..32]);
        // Unknown fields count; a different value is a different record.
        let other = row(&[
            ("event", "Click"),
            ("timestamp", "1793610000123"),
            ("x", "1"),
        ])
        .unwrap();
        let base = row(&[("event", "Click"), ("timestamp", "1793610000123")]).unwrap();
        assert_ne!(other.canonical_hash, base.canonical_hash);
    }
}
