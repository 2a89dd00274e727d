//! One session export line: `serde_json` into `Session`, then `mapping::map_session` with the
//! example catalog under every mapping option, then serialization of the events. Never panics.
#![no_main]

mod common;

use leanplum_segment_agent::leanplum::Session;
use leanplum_segment_agent::mapping::{Output, map_session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(session) = serde_json::from_slice::<Session>(data) else {
        return;
    };
    for opts in common::all_options() {
        let mut out = Output::default();
        if map_session(&session, common::catalog(), &opts, &mut out).is_ok() {
            common::serialize_output(&out);
        } else {
            assert_eq!(
                out,
                Output::default(),
                "a failed map leaves the output untouched"
            );
        }
    }
});
