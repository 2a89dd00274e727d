//! Segment's side: the `track` event we produce, batch assembly within Segment's limits, the
//! HTTP client for `/v1/batch`, and the retry policy that reads its answers.

pub mod batch;
pub mod client;
pub mod concurrency;
pub mod rate;
pub mod retry;

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
    /// RFC 3339, UTC, milliseconds: `2026-11-01T12:08:19.612Z`.
    pub timestamp: String,
    pub properties: Map<String, Value>,
    /// Shared by every event of one session: built once, never copied.
    pub context: std::sync::Arc<Map<String, Value>>,
}

/// Events larger than this (serialized) are dead-lettered, never sent: Segment rejects them.
pub const MAX_EVENT_BYTES: usize = 32 * 1024;

/// Formats epoch milliseconds as Segment wants timestamps: RFC 3339, UTC, millisecond precision.
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
