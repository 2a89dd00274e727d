//! The Segment `track` event: what the mapping produces, the spool stores (serialized) and the
//! drain sends. Its time format (RFC 3339, UTC, milliseconds) and the largest event Segment
//! takes live here too, so the mapping, delivery, the dead letters and the status agree.
//! Pure: no I/O, no clock (callers pass the time).

use std::sync::{Arc, OnceLock};

use serde::Serialize;
use serde::ser::Error as _;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A Segment `track` call as it goes into a batch (`sentAt` belongs to the batch envelope, set
/// per attempt, never stored).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TrackEvent {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub message_id: String,
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// RFC 3339, UTC, milliseconds: `2026-11-01T12:08:19.612Z` (see [`rfc3339_millis`]).
    pub timestamp: String,
    pub properties: Map<String, Value>,
    /// Shared by every event of one session: built once, serialized once, never copied.
    pub context: Arc<Context>,
}

/// An event's `context` (device, app, place, library): the same for every event of a session,
/// so it is serialized once, by the first event that needs it, and copied into the others as
/// it is.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    map: Map<String, Value>,
    json: OnceLock<Box<RawValue>>,
}

impl Context {
    pub(crate) fn new(map: Map<String, Value>) -> Context {
        Context {
            map,
            json: OnceLock::new(),
        }
    }
}

/// Read as the map it was built from.
impl std::ops::Deref for Context {
    type Target = Map<String, Value>;
    fn deref(&self) -> &Map<String, Value> {
        &self.map
    }
}

impl PartialEq for Context {
    fn eq(&self, other: &Context) -> bool {
        self.map == other.map
    }
}

impl PartialEq<Map<String, Value>> for Context {
    fn eq(&self, other: &Map<String, Value>) -> bool {
        self.map == *other
    }
}

/// Byte for byte what serializing the map gives (serde_json writes a raw value as it is).
impl Serialize for Context {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let json = match self.json.get() {
            Some(json) => json,
            None => {
                let json = serde_json::value::to_raw_value(&self.map).map_err(S::Error::custom)?;
                self.json.get_or_init(|| json)
            }
        };
        json.serialize(s)
    }
}

/// Events larger than this (serialized) are dead-lettered, never sent: Segment rejects them.
pub(crate) const MAX_EVENT_BYTES: usize = 32 * 1024;

/// Formats epoch milliseconds as Segment wants times: RFC 3339, UTC, millisecond precision
/// (`2026-11-01T12:08:19.612Z`, always 24 characters for years 0 to 9999). The one formatter
/// of event times: `timestamp`, a batch's `sentAt`, and the times of dead letters and status.
pub(crate) fn rfc3339_millis(ms: i64) -> String {
    use chrono::{DateTime, SecondsFormat};
    DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_serializes_as_its_map() {
        let map: Map<String, Value> = serde_json::from_str(
            r#"{"os":{"name":"iOS"},"library":{"name":"x","version":"1"},"locale":"en_US","q":"a\"b\u00e9"}"#,
        )
        .unwrap();
        let c = Context::new(map.clone());
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            serde_json::to_string(&map).unwrap()
        );
        assert_eq!(c, map);
        assert_eq!(c["locale"], "en_US");
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        assert_eq!(rfc3339_millis(1793534899612), "2026-11-01T12:08:19.612Z");
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
    }
}
