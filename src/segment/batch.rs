//! The `/v1/batch` request body: `{"batch":[...],"sentAt":"..."}`, its exact size before
//! sending, and gzip.

use std::io::Write;

/// Bytes of the envelope around the events: `{"batch":[` + `],"sentAt":"` + 24-char timestamp
/// + `"}`. `sentAt` is always `YYYY-MM-DDTHH:MM:SS.mmmZ`, 24 characters.
pub(crate) const ENVELOPE_BYTES: usize = r#"{"batch":[],"sentAt":""}"#.len() + 24;

/// The JSON budget for events in a batch of at most `max_batch_bytes`, counting each event as
/// its length plus one separator (one more than the commas actually needed, so never over).
pub(crate) fn event_budget(max_batch_bytes: usize) -> usize {
    max_batch_bytes.saturating_sub(ENVELOPE_BYTES)
}

/// The request body for `events` (each a serialized track event) sent at `sent_at`.
pub(crate) fn encode_body<'a>(
    events: impl IntoIterator<Item = &'a [u8]>,
    sent_at: &str,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 * 1024);
    body.extend_from_slice(br#"{"batch":["#);
    for (i, e) in events.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.extend_from_slice(br#"],"sentAt":""#);
    body.extend_from_slice(sent_at.as_bytes());
    body.extend_from_slice(br#""}"#);
    body
}

pub(crate) fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    enc.write_all(body)?;
    enc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_valid_json_and_its_size_is_predicted() {
        let sent_at = crate::event::rfc3339_millis(1_793_534_899_612);
        let events: Vec<&[u8]> = vec![br#"{"a":1}"#, br#"{"b":2}"#];
        let body = encode_body(events.iter().copied(), &sent_at);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["batch"].as_array().unwrap().len(), 2);
        assert_eq!(v["sentAt"], sent_at.as_str());
        let predicted = ENVELOPE_BYTES + events.iter().map(|e| e.len() + 1).sum::<usize>();
        assert_eq!(body.len() + 1, predicted);
        assert_eq!(encode_body([], &sent_at).len(), ENVELOPE_BYTES);
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let body = encode_body([&b"{}"[..]], "2026-11-01T12:08:19.612Z");
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gzip(&body).unwrap()[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
    }
}
