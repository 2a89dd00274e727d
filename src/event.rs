//! The Segment `track` event: what the mapping produces, the spool stores (serialized) and the
//! drain sends. Its time format (RFC 3339, UTC, milliseconds) and the largest event Segment
//! takes live here too, so the mapping, delivery, the dead letters and the status agree.
//! Pure: no I/O, no clock (callers pass the time).
//!
//! An event is written as JSON by hand ([`TrackEvent::to_json`]), straight from typed parts:
//! no `serde_json::Value` tree, no key strings allocated, strings shared with the session and
//! the catalog rather than copied. The bytes are what serde_json's derive gave for the same
//! event (keys in the same order, properties and context keys sorted as a JSON map sorts them,
//! strings escaped the same way), so spooled events, `messageId`s and dedupe are unchanged;
//! the tests below check that against serde_json.

use std::sync::Arc;

use serde_json::value::RawValue;
#[cfg(test)]
use serde_json::{Map, Value};

use crate::leanplum::Id;

/// Text an event shares with others (a session's identity, the catalog's names): cloning it
/// is a reference count, not a copy.
pub(crate) type Text = Arc<str>;

/// A Segment `track` call as it goes into a batch (`sentAt` belongs to the batch envelope, set
/// per attempt, never stored).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TrackEvent {
    pub message_id: String,
    /// One of the Segment event names the mapping knows.
    pub event: &'static str,
    pub user_id: Option<Text>,
    pub anonymous_id: Option<Text>,
    /// Written as RFC 3339, UTC, milliseconds (see [`rfc3339_millis`]).
    pub timestamp: Timestamp,
    pub properties: Properties,
    /// Shared by every event of one session: built once, as JSON, never copied.
    pub context: Arc<Context>,
}

impl TrackEvent {
    /// The event as the spool stores it and Segment receives it.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        let mut w = Json::with_capacity(self.context.json.get().len() + 384);
        w.open();
        w.key("type");
        w.raw(b"\"track\"");
        w.key("messageId");
        w.string(&self.message_id);
        w.key("event");
        w.quoted_plain(self.event);
        if let Some(user_id) = &self.user_id {
            w.key("userId");
            w.string(user_id);
        }
        if let Some(anonymous_id) = &self.anonymous_id {
            w.key("anonymousId");
            w.string(anonymous_id);
        }
        w.key("timestamp");
        w.timestamp(self.timestamp.0);
        w.key("properties");
        self.properties.write(&mut w);
        w.key("context");
        w.raw(self.context.json.get().as_bytes());
        w.close();
        w.out
    }
}

/// An event's time, in milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timestamp(pub i64);

/// Compares as the text Segment receives (`"2026-11-01T12:08:19.612Z"`).
impl PartialEq<&str> for Timestamp {
    fn eq(&self, other: &&str) -> bool {
        rfc3339_millis(self.0) == *other
    }
}

/// An event's `properties`, by Segment spec (SPEC section 5). A field that is `None` is
/// omitted, as Segment properties omit what is unknown; ids are written as strings of their
/// digits, `link_id` as a number.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Properties {
    Email {
        email_id: Option<EmailId>,
        email_subject: Option<Text>,
        message_id: Option<Id>,
        campaign_id: Option<Id>,
        campaign_name: Option<Text>,
        /// Email Link Clicked only: `(link_url, link_id)`.
        link: Option<(Option<Text>, Option<i64>)>,
    },
    /// Everything sits in a `campaign` object (`medium` is always `"Push"`).
    Push {
        message_id: Option<Id>,
        message_name: Option<Text>,
        campaign_id: Option<Id>,
        campaign_name: Option<Text>,
    },
    Experiment {
        experiment_id: Id,
        experiment_name: Option<Text>,
        variant_id: Id,
        variant_name: Option<Text>,
    },
}

/// An email's `email_id`: the event's own parameter, else the message id.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum EmailId {
    Param(Text),
    Message(Id),
}

impl Properties {
    /// Keys in sorted order, as a JSON map writes them.
    fn write(&self, w: &mut Json) {
        w.open();
        match self {
            Properties::Email {
                email_id,
                email_subject,
                message_id,
                campaign_id,
                campaign_name,
                link,
            } => {
                w.opt_id("campaign_id", *campaign_id);
                w.opt_string("campaign_name", campaign_name.as_deref());
                match email_id {
                    Some(EmailId::Param(text)) => w.opt_string("email_id", Some(text)),
                    Some(EmailId::Message(id)) => w.opt_id("email_id", Some(*id)),
                    None => {}
                }
                w.opt_string("email_subject", email_subject.as_deref());
                if let Some((url, index)) = link {
                    if let Some(index) = index {
                        w.key("link_id");
                        w.raw(itoa::Buffer::new().format(*index).as_bytes());
                    }
                    w.opt_string("link_url", url.as_deref());
                }
                w.opt_id("message_id", *message_id);
            }
            Properties::Push {
                message_id,
                message_name,
                campaign_id,
                campaign_name,
            } => {
                w.key("campaign");
                w.open();
                w.opt_id("id", *campaign_id);
                w.opt_string("medium", Some("Push"));
                w.opt_id("message_id", *message_id);
                w.opt_string("message_name", message_name.as_deref());
                w.opt_string("name", campaign_name.as_deref());
                w.close();
            }
            Properties::Experiment {
                experiment_id,
                experiment_name,
                variant_id,
                variant_name,
            } => {
                w.opt_id("experiment_id", Some(*experiment_id));
                w.opt_string("experiment_name", experiment_name.as_deref());
                w.opt_id("variant_id", Some(*variant_id));
                w.opt_string("variant_name", variant_name.as_deref());
            }
        }
        w.close();
    }

    /// As a JSON map (for tests and tools that look at single properties).
    #[cfg(test)]
    pub(crate) fn to_map(&self) -> Map<String, Value> {
        let mut w = Json::with_capacity(128);
        self.write(&mut w);
        serde_json::from_slice(&w.out).expect("properties are a JSON object")
    }
}

/// An event's `context` (device, app, place, library): the same for every event of a session,
/// so it is written once, as JSON, and copied into each event as it is.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    json: Box<RawValue>,
}

impl Context {
    /// A context of `fields`, in the order given (callers give keys sorted, as a JSON map
    /// writes them): each is a string or an object of strings; absent and empty ones are left
    /// out, and an object with nothing left is too.
    pub(crate) fn build(fields: &[(&str, ContextField<'_>)]) -> Context {
        let mut w = Json::with_capacity(256);
        w.open();
        for (key, field) in fields {
            match field {
                ContextField::Raw(json) => {
                    w.key(key);
                    w.raw(json.as_bytes());
                }
                ContextField::Text(text) => {
                    w.opt_string(key, text.filter(|t| !t.is_empty()));
                }
                ContextField::Object(members) => {
                    let mut known = members
                        .iter()
                        .filter_map(|(k, v)| Some((*k, v.filter(|v| !v.is_empty())?)))
                        .peekable();
                    if known.peek().is_some() {
                        w.key(key);
                        w.open();
                        for (k, v) in known {
                            w.opt_string(k, Some(v));
                        }
                        w.close();
                    }
                }
            }
        }
        w.close();
        let json = String::from_utf8(w.out).expect("the writer writes UTF-8");
        Context {
            json: RawValue::from_string(json).expect("the writer writes JSON"),
        }
    }

    /// A context holding `map` as it is (tests).
    #[cfg(test)]
    pub(crate) fn from_map(map: Map<String, Value>) -> Context {
        Context {
            json: serde_json::value::to_raw_value(&map).expect("a map serializes"),
        }
    }

    /// As a JSON map (for tests that look inside).
    #[cfg(test)]
    pub(crate) fn to_map(&self) -> Map<String, Value> {
        serde_json::from_str(self.json.get()).expect("a context is a JSON object")
    }
}

/// One field of a [`Context`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum ContextField<'a> {
    /// Written as it is (a constant object).
    Raw(&'a str),
    Text(Option<&'a str>),
    Object(&'a [(&'a str, Option<&'a str>)]),
}

impl PartialEq for Context {
    fn eq(&self, other: &Context) -> bool {
        self.json.get() == other.json.get()
    }
}

/// Events larger than this (serialized) are dead-lettered, never sent: Segment rejects them.
pub(crate) const MAX_EVENT_BYTES: usize = 32 * 1024;

/// Formats epoch milliseconds as Segment wants times: RFC 3339, UTC, millisecond precision
/// (`2026-11-01T12:08:19.612Z`, always 24 characters for years 0 to 9999). The one formatter
/// of event times: `timestamp`, a batch's `sentAt`, and the times of dead letters and status.
pub(crate) fn rfc3339_millis(ms: i64) -> String {
    match rfc3339_bytes(ms) {
        Some(text) => String::from_utf8_lossy(&text).into_owned(),
        None => rfc3339_millis_chrono(ms),
    }
}

/// Years outside 0 to 9999 (garbage times, written as chrono writes them: a sign and more
/// digits, or the epoch beyond chrono's range).
#[cold]
fn rfc3339_millis_chrono(ms: i64) -> String {
    use chrono::{DateTime, SecondsFormat};
    DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// [`rfc3339_millis`] for years 0 to 9999, without allocating.
fn rfc3339_bytes(ms: i64) -> Option<[u8; 24]> {
    // Milliseconds from 1970-01-01 to 0000-01-01 and to 10000-01-01.
    const MIN: i64 = -62_167_219_200_000;
    const MAX: i64 = 253_402_300_800_000;
    if !(MIN..MAX).contains(&ms) {
        return None;
    }
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let (h, m, s, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: i64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, h);
    put(14, 2, m);
    put(17, 2, s);
    put(20, 3, milli);
    Some(out)
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The index of the first `"`, `\\` or control character in `b` from `at`, eight bytes at a
/// time (as serde_json looks for the end of a string): where a string must be escaped, or
/// where a string being read ends or needs a closer look.
pub(crate) fn special(b: &[u8], mut at: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = b.get(at..at + 8) {
        let v = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let quote = v ^ (ONES * u64::from(b'"'));
        let backslash = v ^ (ONES * u64::from(b'\\'));
        // A byte is flagged when it is zero (after the XOR) or below 0x20; the lowest flagged
        // byte is exact (borrows only run upwards).
        let found = (quote.wrapping_sub(ONES) & !quote
            | backslash.wrapping_sub(ONES) & !backslash
            | v.wrapping_sub(ONES * 0x20) & !v)
            & HIGH;
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    b[at..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|i| at + i)
}

/// A compact JSON writer for the event's fixed shape. Keys are constants the callers give in
/// order; strings are escaped as serde_json escapes them.
struct Json {
    out: Vec<u8>,
    /// Whether the innermost open object has a member yet (a comma goes before the next).
    first: Vec<bool>,
}

impl Json {
    fn with_capacity(n: usize) -> Json {
        Json {
            out: Vec::with_capacity(n),
            first: Vec::with_capacity(4),
        }
    }

    fn open(&mut self) {
        self.out.push(b'{');
        self.first.push(true);
    }

    fn close(&mut self) {
        self.out.push(b'}');
        self.first.pop();
    }

    fn key(&mut self, key: &str) {
        if let Some(first) = self.first.last_mut() {
            if !*first {
                self.out.push(b',');
            }
            *first = false;
        }
        self.quoted_plain(key);
        self.out.push(b':');
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    fn string(&mut self, s: &str) {
        if special(s.as_bytes(), 0).is_some() {
            // Rare: let serde_json escape it, byte for byte as it always has.
            serde_json::to_writer(&mut self.out, s).expect("writing to a Vec cannot fail");
        } else {
            self.out.push(b'"');
            self.out.extend_from_slice(s.as_bytes());
            self.out.push(b'"');
        }
    }

    /// A string known to need no escape (a constant).
    fn quoted_plain(&mut self, s: &str) {
        debug_assert!(special(s.as_bytes(), 0).is_none(), "{s}");
        self.out.push(b'"');
        self.out.extend_from_slice(s.as_bytes());
        self.out.push(b'"');
    }

    fn opt_string(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.key(key);
            self.string(value);
        }
    }

    /// An id as a string of its digits.
    fn opt_id(&mut self, key: &str, id: Option<Id>) {
        if let Some(id) = id {
            self.key(key);
            self.out.push(b'"');
            self.out
                .extend_from_slice(itoa::Buffer::new().format(id.0).as_bytes());
            self.out.push(b'"');
        }
    }

    fn timestamp(&mut self, ms: i64) {
        match rfc3339_bytes(ms) {
            Some(text) => {
                self.out.push(b'"');
                self.out.extend_from_slice(&text);
                self.out.push(b'"');
            }
            None => self.string(&rfc3339_millis_chrono(ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_context_is_written_as_serde_json_writes_its_map() {
        let c = Context::build(&[
            ("app", ContextField::Object(&[("version", None)])),
            (
                "device",
                ContextField::Object(&[("id", Some("d\"1\u{1}")), ("model", Some(""))]),
            ),
            (
                "library",
                ContextField::Raw(r#"{"name":"x","version":"1"}"#),
            ),
            ("locale", ContextField::Text(Some("en_US"))),
            ("q", ContextField::Text(Some("a\\b\u{e9}\n"))),
            ("timezone", ContextField::Text(None)),
        ]);
        let map = json!({
            "device": {"id": "d\"1\u{1}"},
            "library": {"name": "x", "version": "1"},
            "locale": "en_US",
            "q": "a\\b\u{e9}\n",
        });
        assert_eq!(c.json.get(), serde_json::to_string(&map).unwrap());
        assert_eq!(c.to_map()["locale"], "en_US");
        assert_eq!(c.to_map(), *map.as_object().unwrap());
        let from_map = Context::from_map(map.as_object().unwrap().clone());
        assert_eq!(from_map, c);
    }

    /// What serde_json's derive wrote for the event before it was written by hand.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Derived<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        message_id: &'a str,
        event: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        anonymous_id: Option<&'a str>,
        timestamp: String,
        properties: Map<String, Value>,
        context: &'a RawValue,
    }

    fn derived(e: &TrackEvent, properties: Value) -> Vec<u8> {
        serde_json::to_vec(&Derived {
            kind: "track",
            message_id: &e.message_id,
            event: e.event,
            user_id: e.user_id.as_deref(),
            anonymous_id: e.anonymous_id.as_deref(),
            timestamp: rfc3339_millis(e.timestamp.0),
            properties: properties.as_object().unwrap().clone(),
            context: &e.context.json,
        })
        .unwrap()
    }

    #[test]
    fn events_are_written_as_the_derived_serializer_wrote_them() {
        let context = Arc::new(Context::build(&[
            ("device", ContextField::Object(&[("id", Some("dev"))])),
            ("locale", ContextField::Text(Some("en"))),
        ]));
        let base = TrackEvent {
            message_id: "lp-e-1".into(),
            event: "Email Link Clicked",
            user_id: Some("u\"ser\t\u{7f}\u{2028}".into()),
            anonymous_id: Some("dev".into()),
            timestamp: Timestamp(1793534899612),
            properties: Properties::Email {
                email_id: Some(EmailId::Param("e-\\1".into())),
                email_subject: Some("Hi \u{1F600}".into()),
                message_id: Some(Id(u64::MAX)),
                campaign_id: Some(Id(9178288208762825810)),
                campaign_name: Some("C".into()),
                link: Some((Some("https://x/?a=1&b=\"2\"".into()), Some(-3))),
            },
            context,
        };
        let cases = [
            (
                base.clone(),
                json!({"campaign_id": "9178288208762825810", "campaign_name": "C",
                       "email_id": "e-\\1", "email_subject": "Hi \u{1F600}",
                       "link_id": -3, "link_url": "https://x/?a=1&b=\"2\"",
                       "message_id": u64::MAX.to_string()}),
            ),
            (
                TrackEvent {
                    user_id: None,
                    properties: Properties::Email {
                        email_id: Some(EmailId::Message(Id(5))),
                        email_subject: None,
                        message_id: Some(Id(5)),
                        campaign_id: None,
                        campaign_name: None,
                        link: Some((None, None)),
                    },
                    ..base.clone()
                },
                json!({"email_id": "5", "message_id": "5"}),
            ),
            (
                TrackEvent {
                    anonymous_id: None,
                    properties: Properties::Email {
                        email_id: None,
                        email_subject: None,
                        message_id: None,
                        campaign_id: None,
                        campaign_name: None,
                        link: None,
                    },
                    ..base.clone()
                },
                json!({}),
            ),
            (
                TrackEvent {
                    properties: Properties::Push {
                        message_id: Some(Id(7)),
                        message_name: Some("Sale".into()),
                        campaign_id: Some(Id(8)),
                        campaign_name: Some("Camp".into()),
                    },
                    ..base.clone()
                },
                json!({"campaign": {"id": "8", "medium": "Push", "message_id": "7",
                                    "message_name": "Sale", "name": "Camp"}}),
            ),
            (
                TrackEvent {
                    properties: Properties::Push {
                        message_id: None,
                        message_name: None,
                        campaign_id: None,
                        campaign_name: None,
                    },
                    ..base.clone()
                },
                json!({"campaign": {"medium": "Push"}}),
            ),
            (
                TrackEvent {
                    properties: Properties::Experiment {
                        experiment_id: Id(1),
                        experiment_name: Some("Test".into()),
                        variant_id: Id(2),
                        variant_name: None,
                    },
                    ..base.clone()
                },
                json!({"experiment_id": "1", "experiment_name": "Test", "variant_id": "2"}),
            ),
        ];
        for (event, properties) in cases {
            assert_eq!(event.properties.to_map(), *properties.as_object().unwrap());
            let ours = event.to_json();
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                String::from_utf8(derived(&event, properties)).unwrap()
            );
        }
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        assert_eq!(rfc3339_millis(1793534899612), "2026-11-01T12:08:19.612Z");
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(Timestamp(1793534899612), "2026-11-01T12:08:19.612Z");
    }

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        use chrono::{DateTime, SecondsFormat};
        let chrono = |ms: i64| {
            DateTime::from_timestamp_millis(ms)
                .unwrap_or_default()
                .to_rfc3339_opts(SecondsFormat::Millis, true)
        };
        let mut rng = fastrand::Rng::with_seed(7);
        // The edges of years 0 to 9999 and past them, leap days, and random times.
        let edges = [
            -62_167_219_200_000,
            -62_167_219_200_001,
            951_782_400_000,
            4_107_542_400_000,
            253_402_300_799_999,
            253_402_300_800_000,
            i64::MIN,
            i64::MAX,
        ];
        for ms in edges
            .into_iter()
            .chain((0..200_000).map(|_| rng.i64(-62_167_219_200_000..253_402_300_800_000)))
        {
            assert_eq!(rfc3339_millis(ms), chrono(ms), "{ms}");
        }
    }
}
