//! `input::detect` on arbitrary bytes: never panics, and an empty/whitespace head is `Empty`.
#![no_main]

use leanplum_segment_agent::input::{InputError, detect};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let result = detect(data);
    let blank = data
        .strip_prefix(b"\xEF\xBB\xBF".as_slice())
        .unwrap_or(data)
        .iter()
        .all(u8::is_ascii_whitespace);
    assert_eq!(
        blank,
        matches!(result, Err(InputError::Empty)),
        "Empty exactly when the head is blank: {result:?}"
    );
});
