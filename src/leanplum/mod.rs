//! Leanplum's data as it arrives: session exports, flat engagement records, and the ids and times
//! they carry. Types here only describe and parse; turning them into Segment events is
//! `crate::mapping`'s job.

pub(crate) mod api;
pub(crate) mod catalog;
pub(crate) mod csv_export;
pub(crate) mod engagement;
mod scan;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

pub(crate) use engagement::Engagement;

impl Session {
    /// Reads one session export line (valid UTF-8). The scanner of `scan` reads the lines
    /// Leanplum writes; whatever it leaves is read by serde, which also words the errors.
    pub(crate) fn from_line(text: &str) -> Result<Session, serde_json::Error> {
        match scan::session(text) {
            Some(session) => Ok(session),
            None => serde_json::from_str(text),
        }
    }
}

/// A Leanplum id (event, message, campaign, experiment, variant). These are 64-bit integers that
/// exceed 2^53, written as JSON numbers or as strings: never let one pass through an f64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Id(pub u64);

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Id {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse::<u64>().map(Id)
    }
}

impl serde::Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer id, as a JSON number or a string of digits")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                Ok(Id(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                u64::try_from(v)
                    .map(Id)
                    .map_err(|_| E::custom(format!("negative id {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Id, E> {
                // A float id has already lost digits above 2^53; refuse rather than guess.
                Err(E::custom(format!("id {v} is not an integer")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                v.parse::<Id>()
                    .map_err(|_| E::custom(format!("id {v:?} is not an integer")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A Leanplum time: seconds since the epoch as a double, sometimes written as a string
/// (`"1.793534899612E+09"`). Kept as f64 seconds; [`LpTime::millis`] rounds to the nearest ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LpTime(pub f64);

impl LpTime {
    /// Milliseconds since the epoch, rounded to the nearest millisecond (the Leanplum Segment
    /// source rounds, it does not truncate: 1793533949.8537455 is ...949.854).
    pub(crate) fn millis(self) -> i64 {
        (self.0 * 1000.0).round() as i64
    }
}

/// As the number of seconds: serde_json writes the shortest text that reads back as the same
/// f64, so a parked session keeps its exact times.
impl serde::Serialize for LpTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for LpTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = LpTime;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("seconds since the epoch, as a number or a string")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LpTime, E> {
                Ok(LpTime(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LpTime, E> {
                Ok(LpTime(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<LpTime, E> {
                if v.is_finite() {
                    Ok(LpTime(v))
                } else {
                    Err(E::custom("time is not finite"))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LpTime, E> {
                match v.trim().parse::<f64>() {
                    Ok(t) if t.is_finite() => Ok(LpTime(t)),
                    _ => Err(E::custom(format!("time {v:?} is not a number"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Accepts a JSON string or number where Leanplum is inconsistent (user ids, versions) and keeps
/// it as text; `null` and `""` become `None`.
pub(crate) fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or a number")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(V)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok((!v.is_empty()).then(|| v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok((!v.is_empty()).then_some(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
    }
    d.deserialize_option(V)
}

/// One line of a Leanplum session export (`exportData`, `exportFormat=json`). Only the fields
/// the mapping uses are named; everything else is skipped by serde without being kept, and of
/// the events only the message events are kept (see [`Events`]). A session of an active user
/// is megabytes of app events: parsed, it holds its engagements, not a copy of the line.
#[derive(Debug, Clone, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Session {
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub user_id: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub device_id: Option<String>,
    /// Session start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<LpTime>,
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub locale: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub timezone: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub country: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub region: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub city: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub app_version: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub system_name: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub system_version: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub device_model: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experiments: Vec<Experiment>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<State>,
}

#[derive(Debug, Clone, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Experiment {
    pub id: Id,
    pub variant_id: Id,
    /// Absent means impressed (SPEC section 5).
    pub impressed: Option<bool>,
}

#[derive(Debug, Clone, Default, serde::Serialize, Deserialize)]
pub(crate) struct State {
    #[serde(default)]
    pub events: Events,
}

/// A state's `events` as kept: its message events (`.m<id>`, `.m<id> <Action>`), in order, and
/// how many app events it had. App events are parsed and checked like any event (a bad one
/// still makes the line a bad record), then dropped: nothing is sent for them, they are only
/// counted, and keeping them would hold most of a long session's line in memory a second time.
#[derive(Debug, Clone, Default)]
pub(crate) struct Events {
    pub messages: Vec<Event>,
    /// Events that are not message events (`"Add To Cart"`).
    pub app_events: u64,
}

impl Events {
    /// The message events of `events`, and a count of the rest, as parsing keeps them.
    pub(crate) fn from_events(events: impl IntoIterator<Item = Event>) -> Events {
        let mut out = Events::default();
        for e in events {
            out.push(e);
        }
        out
    }

    /// Keeps `event` if it is a message event, else counts it.
    pub(crate) fn push(&mut self, event: Event) {
        if parse_message_event(&event.name).is_some() {
            self.messages.push(event);
        } else {
            self.app_events += 1;
        }
    }
}

/// As the list of message events alone (a parked session keeps only what it waits for).
impl serde::Serialize for Events {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.messages.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Events {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Events;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of events")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Events, A::Error> {
                let mut out = Events::default();
                while let Some(kept) = seq.next_element_seed(KeptEvent)? {
                    match kept {
                        Some(event) => out.messages.push(event),
                        None => out.app_events += 1,
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

/// One element of a state's `events`, checked as an [`Event`] is (a bad app event still makes
/// the line a bad record) but kept only if it is a message event. Most of a session's events
/// are app events: their names are borrowed from the line where they can be and their
/// parameters skipped, not copied, so an app event costs no allocation.
struct KeptEvent;

/// The fields of an [`Event`], and the rest (skipped).
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum EventField {
    EventId,
    Name,
    Time,
    Parameters,
    #[serde(other)]
    Other,
}

const EVENT_FIELDS: &[&str] = &["eventId", "name", "time", "parameters"];

impl<'de> DeserializeSeed<'de> for KeptEvent {
    type Value = Option<Event>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Event>, D::Error> {
        d.deserialize_struct("Event", EVENT_FIELDS, self)
    }
}

impl<'de> Visitor<'de> for KeptEvent {
    type Value = Option<Event>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct Event")
    }

    /// `[eventId, name, time, parameters?]`, as serde reads any struct from an array.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Event>, A::Error> {
        let event_id: Id = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &"struct Event with 4 elements"))?;
        let name = seq
            .next_element_seed(Text)?
            .ok_or_else(|| de::Error::invalid_length(1, &"struct Event with 4 elements"))?;
        let time: LpTime = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(2, &"struct Event with 4 elements"))?;
        let parameters: Option<Option<RawJson>> = seq.next_element()?;
        Ok(kept(event_id, name, time, parameters.flatten()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Event>, A::Error> {
        let mut event_id: Option<Id> = None;
        let mut name: Option<Cow<'de, str>> = None;
        let mut time: Option<LpTime> = None;
        let mut parameters: Option<Option<RawJson>> = None;
        while let Some(field) = map.next_key::<EventField>()? {
            match field {
                EventField::EventId => once(&mut event_id, "eventId", || map.next_value())?,
                EventField::Name => once(&mut name, "name", || map.next_value_seed(Text))?,
                EventField::Time => once(&mut time, "time", || map.next_value())?,
                EventField::Parameters => {
                    // Kept unless the name already says this is an app event.
                    let app_event = name
                        .as_deref()
                        .is_some_and(|n| parse_message_event(n).is_none());
                    once(&mut parameters, "parameters", || {
                        if app_event {
                            map.next_value::<de::IgnoredAny>().map(|_| None)
                        } else {
                            map.next_value()
                        }
                    })?
                }
                EventField::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        let event_id = event_id.ok_or_else(|| de::Error::missing_field("eventId"))?;
        let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
        let time = time.ok_or_else(|| de::Error::missing_field("time"))?;
        Ok(kept(event_id, name, time, parameters.flatten()))
    }
}

/// Fills `slot` with `value()`, once: a field given twice is refused as serde's derive does.
fn once<T, E: de::Error>(
    slot: &mut Option<T>,
    field: &'static str,
    value: impl FnOnce() -> Result<T, E>,
) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(field));
    }
    *slot = Some(value()?);
    Ok(())
}

/// The event if it is a message event (`None`: an app event, only counted).
fn kept(
    event_id: Id,
    name: Cow<'_, str>,
    time: LpTime,
    parameters: Option<RawJson>,
) -> Option<Event> {
    parse_message_event(&name)?;
    Some(Event {
        event_id,
        name: name.into_owned(),
        time,
        parameters,
    })
}

/// A JSON string, borrowed from the input when it has no escapes.
struct Text;

impl<'de> DeserializeSeed<'de> for Text {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Text {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

/// Splits a message event name: `".m123"` -> `(123, None)`, `".m123 Open"` ->
/// `(123, Some("Open"))`. Anything else (an app event) -> `None`.
pub(crate) fn parse_message_event(name: &str) -> Option<(Id, Option<&str>)> {
    let rest = name.strip_prefix(".m")?;
    let digits_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let (digits, tail) = rest.split_at(digits_end);
    // Also rejects ids too long for a u64: such a name is not one Leanplum writes.
    let id = digits.parse::<u64>().ok().map(Id)?;
    if tail.is_empty() {
        return Some((id, None));
    }
    let action = tail.strip_prefix(' ')?.trim();
    Some((id, (!action.is_empty()).then_some(action)))
}

/// An event inside a session: an app event (`"Add To Cart"`) or a message event
/// (`".m<messageId>"`, `".m<messageId> <Action>"`).
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Event {
    pub event_id: Id,
    pub name: String,
    pub time: LpTime,
    /// Kept raw (message events only, see [`Events`]): building a map for every event was the
    /// largest cost of parsing an export. The mapping parses it on demand.
    #[serde(default)]
    pub parameters: Option<RawJson>,
}

/// One JSON value as it was written (an event's `parameters`), known to be valid JSON: checked
/// when made from text, or found by a parser that checked it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawJson(Box<str>);

impl RawJson {
    /// `text` if it is one JSON value.
    #[cfg(test)]
    pub(crate) fn new(text: String) -> Result<RawJson, serde_json::Error> {
        RawValue::from_string(text).map(RawJson::from)
    }

    /// Text a parser has already checked to be one JSON value.
    fn checked(text: &str) -> RawJson {
        RawJson(text.into())
    }

    /// The JSON text.
    pub(crate) fn get(&self) -> &str {
        &self.0
    }
}

impl From<Box<RawValue>> for RawJson {
    fn from(raw: Box<RawValue>) -> RawJson {
        RawJson(raw.into())
    }
}

/// As the JSON value itself (a parked session keeps its events' parameters as they were).
impl serde::Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let raw: &RawValue = serde_json::from_str(&self.0).map_err(S::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(d).map(RawJson::from)
    }
}

/// A message channel: which Segment spec (Email or Push) an engagement belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Channel {
    Email,
    Push,
}

impl std::str::FromStr for Channel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "email" => Ok(Channel::Email),
            "push" => Ok(Channel::Push),
            other => Err(format!(
                "unknown channel {other:?} (expected \"email\" or \"push\")"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_beyond_2_pow_53_survive_as_numbers_and_strings() {
        let n: Id = serde_json::from_str("9178288208762825810").unwrap();
        assert_eq!(n.0, 9178288208762825810);
        let s: Id = serde_json::from_str("\"9178288208762825811\"").unwrap();
        assert_eq!(s.to_string(), "9178288208762825811");
        assert!(serde_json::from_str::<Id>("1.5").is_err());
        assert!(serde_json::from_str::<Id>("-3").is_err());
    }

    #[test]
    fn only_message_events_are_kept_and_app_events_counted() {
        let line = r#"{"deviceId":"d","states":[
            {"events":[{"eventId":1,"name":"Add To Cart","time":1,"parameters":{"sku":"A"}},
                       {"eventId":2,"name":".m5 Open","time":2,"parameters":{"x":1}},
                       {"eventId":3,"name":".mobile Login","time":3}]},
            {"events":[]},
            {"events":[{"eventId":4,"name":".m6","time":4}]}]}"#;
        let s: Session = serde_json::from_str(line).unwrap();
        let kept: Vec<(u64, &str)> = s
            .states
            .iter()
            .flat_map(|st| &st.events.messages)
            .map(|e| (e.event_id.0, e.name.as_str()))
            .collect();
        assert_eq!(kept, [(2, ".m5 Open"), (4, ".m6")]);
        let apps: Vec<u64> = s.states.iter().map(|st| st.events.app_events).collect();
        assert_eq!(apps, [2, 0, 0]);
        let params = s.states[0].events.messages[0].parameters.as_ref().unwrap();
        assert_eq!(params.get(), r#"{"x":1}"#);
        // A bad app event is still a bad line, not silently dropped.
        let bad = r#"{"states":[{"events":[{"eventId":1.5,"name":"Add To Cart","time":1}]}]}"#;
        let err = serde_json::from_str::<Session>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an integer"), "{err}");
        assert!(serde_json::from_str::<Session>(r#"{"states":[{"events":null}]}"#).is_err());
    }

    #[test]
    fn events_keep_what_the_derived_event_would_and_refuse_the_same_lines() {
        // The events list as `KeptEvent` reads it against a plain `Vec<Event>`, filtered: the
        // same events kept, the same count of app events, the same errors word for word.
        let cases = [
            r#"{"eventId":1,"name":"Add To Cart","time":1,"parameters":{"sku":"A"}}"#,
            r#"{"eventId":2,"name":".m5 Open","time":2,"parameters":{"x":[1,{"y":"\"z"}]}}"#,
            r#"{"parameters":{"a":1},"eventId":"3","name":".m5","time":"3.5"}"#,
            r#"{"parameters":{"a":1},"eventId":3,"name":"App","time":3}"#,
            r#"{"eventId":4,"name":".m6 Cl\u0069ck","time":4,"value":1.5,"extra":[null]}"#,
            r#"{"eventId":5,"name":"Esc\"aped","time":5,"parameters":null}"#,
            r#"{"eventId":6,"name":".m7","time":6,"parameters":null}"#,
            r#"[7,".m8 Open",7]"#,
            r#"[7,"App",7,{"p":1}]"#,
            r#"{"eventId":1.5,"name":"Add To Cart","time":1}"#,
            r#"{"eventId":1,"name":5,"time":1}"#,
            r#"{"eventId":1,"name":null,"time":1}"#,
            r#"{"eventId":1,"name":"App","time":"soon"}"#,
            r#"{"eventId":1,"time":1}"#,
            r#"{"name":"App","time":1}"#,
            r#"{"eventId":1,"name":"App"}"#,
            r#"{"eventId":1,"name":"App","name":"B","time":1}"#,
            r#"{"eventId":1,"eventId":2,"name":"App","time":1}"#,
            r#"{"eventId":1,"name":"App","time":1,"parameters":{"a":1},"parameters":2}"#,
            r#"{"eventId":1,"name":"App","time":1,"parameters":{"a":}}"#,
            r#"[7]"#,
            r#"7"#,
            r#"null"#,
        ];
        fn summary(events: &[Event]) -> Vec<(u64, String, f64, Option<String>)> {
            events
                .iter()
                .map(|e| {
                    let p = e.parameters.as_ref().map(|p| p.get().to_owned());
                    (e.event_id.0, e.name.clone(), e.time.0, p)
                })
                .collect()
        }
        for case in cases {
            let line = format!("[{case}]");
            let ours = serde_json::from_str::<Events>(&line)
                .map(|e| (summary(&e.messages), e.app_events))
                .map_err(|e| e.to_string());
            let derived = serde_json::from_str::<Vec<Event>>(&line)
                .map(|all| {
                    let e = Events::from_events(all);
                    (summary(&e.messages), e.app_events)
                })
                .map_err(|e| e.to_string());
            assert_eq!(ours, derived, "{case}");
        }
        // Also when the input cannot be borrowed from.
        let value: serde_json::Value = serde_json::from_str(
            r#"[{"eventId":2,"name":".m5 Open","time":2},{"eventId":3,"name":"App","time":3}]"#,
        )
        .unwrap();
        let e: Events = serde_json::from_value(value).unwrap();
        assert_eq!((e.messages.len(), e.app_events), (1, 1));
    }

    #[test]
    fn times_parse_from_numbers_and_strings_and_round_to_the_millisecond() {
        let t: LpTime = serde_json::from_str("\"1.793534899612E+09\"").unwrap();
        assert_eq!(t.millis(), 1793534899612);
        let t: LpTime = serde_json::from_str("1793533949.8537455").unwrap();
        assert_eq!(t.millis(), 1793533949854);
        let t: LpTime = serde_json::from_str("1793533949").unwrap();
        assert_eq!(t.millis(), 1793533949000);
        assert!(serde_json::from_str::<LpTime>("\"soon\"").is_err());
    }
}
