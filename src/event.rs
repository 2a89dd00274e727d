//! The Segment `track` event: what the mapping produces, the spool stores (serialized) and the
//! drain sends. Its time format (RFC 3339, UTC, milliseconds) and the largest event Segment
//! takes live here too, so the mapping, delivery, the dead letters and the status agree.
//! Pure: no I/O, no clock (callers pass the time).

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

/// A Segment `track` call as it goes into a batch (`sentAt` belongs to the batch envelope, set
/// per attempt, never stored).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackEvent {
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
    /// Shared by every event of one session: built once, never copied.
    pub context: Arc<Map<String, Value>>,
}

/// Events larger than this (serialized) are dead-lettered, never sent: Segment rejects them.
pub const MAX_EVENT_BYTES: usize = 32 * 1024;

/// Formats epoch milliseconds as Segment wants times: RFC 3339, UTC, millisecond precision
/// (`2026-11-01T12:08:19.612Z`, always 24 characters for years 0 to 9999). The one formatter
/// of event times: `timestamp`, a batch's `sentAt`, and the times of dead letters and status.
pub fn rfc3339_millis(ms: i64) -> String {
    use chrono::{DateTime, SecondsFormat};
    DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        assert_eq!(rfc3339_millis(1793534899612), "2026-11-01T12:08:19.612Z");
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
    }
}
