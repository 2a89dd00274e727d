//! Format detection by content (SPEC section 4): shards have no extension, so the first bytes
//! of the decompressed stream decide between session JSON lines, engagement JSON lines and
//! engagement CSV. Pure: no I/O, safe to fuzz.
//!
//! Leanplum's CSV export (format 4) is told by name *and* content before any of this: a file
//! named `export-<appId>-<jobId>-output<table>-<n>[.gz]` is read by `super::leanplum_csv`, which
//! requires the header of that table (`eventId`, `sessionId`, ... by name) and refuses any
//! other. Its tables have no `event` column, so content detection alone never takes one for an
//! engagement CSV either (see the test below).

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::{Format, InputError};

/// The UTF-8 byte order mark some tools (Excel) write at the start of a file.
pub(crate) const BOM: &[u8] = b"\xEF\xBB\xBF";

/// How much of the decompressed stream `Reader::open` shows to [`detect`] (not to be confused
/// with the 1 KiB that identifies a file, the ingest's `fingerprint::IDENTITY_HEAD_BYTES`).
pub(crate) const FORMAT_PROBE_BYTES: usize = 64 * 1024;

/// The format of a stream whose first (decompressed) bytes are `head`. `head` may be cut
/// anywhere; a session line longer than `head` is still recognised by its first keys.
pub(crate) fn detect(head: &[u8]) -> Result<Format, InputError> {
    let head = head.strip_prefix(BOM).unwrap_or(head);
    let start = head.iter().position(|b| !b.is_ascii_whitespace());
    let Some(start) = start else {
        return Err(InputError::Empty);
    };
    let body = &head[start..];
    if body.first() == Some(&b'{') {
        return detect_json(body);
    }
    detect_csv(body)
}

fn detect_json(body: &[u8]) -> Result<Format, InputError> {
    // The first line is usually decisive; later ones are tried so a file whose first line is
    // damaged is still read (the damaged line becomes a bad record, not a lost file).
    let mut lines = body.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        // The last piece of the head has no newline after it: it may be cut mid-object.
        let may_be_cut = lines.peek().is_none();
        let line = line.trim_ascii();
        if !line.starts_with(b"{") {
            continue;
        }
        let mut keys = Vec::new();
        let mut de = serde_json::Deserializer::from_slice(line);
        let parsed = TopLevelKeys(&mut keys)
            .deserialize(&mut de)
            .and_then(|()| de.end());
        match parsed {
            Ok(()) => {}
            // A cut object's first keys are still evidence (`sessionId` comes first in exports).
            Err(e) if may_be_cut && e.is_eof() => {}
            Err(_) => continue,
        }
        if let Some(format) = json_format(&keys) {
            return Ok(format);
        }
    }
    Err(InputError::UnknownFormat {
        reason: "JSON lines, but no object in the first 64 KiB has `event` or session fields"
            .into(),
    })
}

/// Sessions vs engagements from an object's top-level keys (SPEC section 4).
fn json_format(keys: &[String]) -> Option<Format> {
    let has = |k: &str| keys.iter().any(|key| key == k);
    if has("states") || has("sessionId") {
        Some(Format::Sessions)
    } else if has("event") {
        Some(Format::EngagementJson)
    } else if (has("deviceId") || has("userId")) && has("time") {
        Some(Format::Sessions)
    } else {
        None
    }
}

fn detect_csv(body: &[u8]) -> Result<Format, InputError> {
    let unknown = |reason: &str| {
        Err(InputError::UnknownFormat {
            reason: reason.into(),
        })
    };
    // The header row may itself hold a quoted newline: frame it like any CSV record.
    let mut scan = super::lines::CsvScan::StartOfField;
    let mut end = None;
    for (i, &b) in body.iter().enumerate() {
        if b == b'\n' && scan != super::lines::CsvScan::Quoted {
            end = Some(i);
            break;
        }
        scan = scan.step(b);
    }
    let header = match end {
        Some(i) => &body[..i],
        // A header-only file with no newline is complete; a 64 KiB header is not a header.
        None if body.len() < FORMAT_PROBE_BYTES => body,
        None => return unknown("first line is longer than 64 KiB and not a JSON object"),
    };
    let header = header.strip_suffix(b"\r").unwrap_or(header);
    if header.contains(&0) {
        return unknown("binary data");
    }
    let Ok(header) = std::str::from_utf8(header) else {
        return unknown("binary data (first line is not UTF-8)");
    };
    if super::csv::header_names(header)
        .iter()
        .any(|n| n == "event")
    {
        Ok(Format::EngagementCsv)
    } else {
        unknown("first line is neither a JSON object nor a CSV header with an `event` column")
    }
}

/// Collects an object's top-level keys, skipping values; keys read before an error are kept.
struct TopLevelKeys<'a>(&'a mut Vec<String>);

impl<'de> DeserializeSeed<'de> for TopLevelKeys<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevelKeys<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            self.0.push(key);
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown(head: &[u8]) -> bool {
        matches!(detect(head), Err(InputError::UnknownFormat { .. }))
    }

    #[test]
    fn detection_table() {
        let session = br#"{"sessionId":"1","deviceId":"d","time":1.5,"states":[]}"#;
        assert_eq!(detect(session).unwrap(), Format::Sessions);
        let bare = br#"{"deviceId":"d","time":1.5}"#;
        assert_eq!(detect(bare).unwrap(), Format::Sessions);
        let eng = br#"{"event":"Open","user_id":"u","timestamp":1}"#;
        assert_eq!(detect(eng).unwrap(), Format::EngagementJson);
        // `event` plus a session's identity keys is an engagement: `time` alone is not enough.
        let eng2 = br#"{"userId":"u","time":1,"event":"Open"}"#;
        assert_eq!(detect(eng2).unwrap(), Format::EngagementJson);
        assert_eq!(
            detect(b"event,user_id\nOpen,u\n").unwrap(),
            Format::EngagementCsv
        );
        assert_eq!(detect(b" Event , ts\r\n").unwrap(), Format::EngagementCsv);
        assert_eq!(detect(b"\"ev\nx\",event\n").unwrap(), Format::EngagementCsv);
        let bom = [BOM, b"\n  event,timestamp\n"].concat();
        assert_eq!(detect(&bom).unwrap(), Format::EngagementCsv);
        let bom_json = [BOM, &eng[..]].concat();
        assert_eq!(detect(&bom_json).unwrap(), Format::EngagementJson);
        assert!(matches!(detect(b""), Err(InputError::Empty)));
        assert!(matches!(detect(b" \n\t\r\n"), Err(InputError::Empty)));
        assert!(matches!(detect(BOM), Err(InputError::Empty)));
        assert!(unknown(b"\x00\x01\x02event\xff\n"));
        assert!(unknown(b"\x7fELF\x02\x01\x01\x00\x00"));
        assert!(unknown(b"\x1f\x8b\x08\x00"));
        assert!(unknown(br#"[{"event":"Open"}]"#));
        assert!(unknown(b"user_id,timestamp\nu,1\n"));
        assert!(unknown(b"{}\n{\"a\":1}\n"));
    }

    #[test]
    fn csv_export_tables_are_never_engagement_csv() {
        for header in [
            "eventId,stateId,sessionId,eventName,start,value,info,timeUntilFirstForUser\n",
            "sessionId,userId,userBucket,userStart,country,region,city,start\n",
            "eventId,name,value\n",
            "experimentId,sessionId,variantId\n",
        ] {
            assert!(unknown(header.as_bytes()), "{header}");
        }
    }

    #[test]
    fn a_damaged_first_line_does_not_hide_the_format() {
        let head = b"{\"event\": oops}\n{\"event\":\"Open\",\"timestamp\":1}\n";
        assert_eq!(detect(head).unwrap(), Format::EngagementJson);
    }

    #[test]
    fn a_session_cut_by_the_head_limit_is_recognised_by_its_first_keys() {
        let head = br#"{"sessionId":"1","deviceId":"d","states":[{"events":[{"eventId":1,"na"#;
        assert_eq!(detect(head).unwrap(), Format::Sessions);
    }
}
