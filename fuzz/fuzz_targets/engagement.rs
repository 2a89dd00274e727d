//! Flat engagement records, both ways they arrive:
//! - JSON: `serde_json` into a map, `Engagement::from_json_map`, then `map_engagement`;
//! - CSV: a fixed header row plus the input, through `input::Reader` (framing, cell splitting,
//!   `Engagement::from_fields`), then `map_engagement` for every good row.
//!
//! Never panics; mapped events serialize.
#![no_main]

mod common;

use leanplum_segment_agent::config::DEFAULT_MAX_LINE_BYTES;
use leanplum_segment_agent::input::{Format, Reader, Record};
use leanplum_segment_agent::leanplum::Engagement;
use leanplum_segment_agent::mapping::{Output, map_engagement};
use libfuzzer_sys::fuzz_target;

const HEADER: &[u8] = b"event,user_id,device_id,timestamp,message_id,channel,event_id\n";

fn map(e: &Engagement) {
    for opts in common::all_options() {
        let mut out = Output::default();
        if map_engagement(e, common::catalog(), &opts, &mut out).is_ok() {
            common::serialize_output(&out);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data)
        && let Ok(e) = Engagement::from_json_map(&m)
    {
        assert!(!e.event.is_empty(), "a parsed engagement has an event");
        assert_eq!(e.canonical_hash.len(), 32);
        map(&e);
    }

    let path = common::scratch_path("engagement.csv");
    std::fs::write(&path, [HEADER, data].concat()).expect("write scratch file");
    let mut reader = Reader::open(&path, 0, DEFAULT_MAX_LINE_BYTES)
        .expect("a file with an `event` header opens");
    assert_eq!(reader.format(), Format::EngagementCsv);
    let mut items = 0usize;
    while let Some(item) = reader.next_item() {
        items += 1;
        assert!(items <= data.len() + 1, "more rows than bytes");
        let Ok(item) = item else {
            break;
        };
        match item.result {
            Ok(Record::Engagement(e)) => map(&e),
            Ok(Record::Session(_)) => panic!("a CSV row became a session"),
            Err(_) => {}
        }
    }
});
