//! `input::Reader` over arbitrary file contents, plain and gzipped. Never panics, never loops,
//! and keeps its offset contract:
//! - `end_offset` strictly increases, `line` never decreases, `end_offset <= decompressed length`;
//! - after a clean end, `Reader::offset()` is the decompressed length;
//! - a stream error is returned once, then `None`;
//! - only the last item may be incomplete;
//! - re-opening at an item's `end_offset` yields exactly the items after it (and the same
//!   stream error, if any), checked for the first, a middle and the last item;
//! - opening at an arbitrary offset either fails cleanly or keeps the invariants above.
#![no_main]

mod common;

use std::io::{Read, Write};
use std::path::Path;

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use leanplum_segment_agent::input::{Item, Reader};
use libfuzzer_sys::fuzz_target;

/// The reader's `watch.max_line_bytes`: the smallest the config accepts, so inputs of a few KiB
/// reach the over-the-limit path too.
const MAX_LINE_BYTES: usize = 1024;

/// Everything one `Reader` yielded from a start offset.
struct Run {
    items: Vec<Item>,
    /// The stream error that ended the run, as displayed.
    error: Option<String>,
}

/// Decompressed length of a file, the way `Reader` decides whether it is gzipped. For a damaged
/// gzip stream, what decodes before the error (read in small steps, so nothing decoded is
/// dropped along with the error).
fn decoded_len(file: &[u8]) -> u64 {
    if !file.starts_with(&[0x1f, 0x8b]) {
        return file.len() as u64;
    }
    let mut decoder = MultiGzDecoder::new(file);
    let mut buf = [0u8; 512];
    let mut total = 0u64;
    loop {
        match decoder.read(&mut buf) {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n as u64,
        }
    }
}

/// Reads every item from `start`, checking the per-item invariants as it goes (so a runaway
/// reader fails fast instead of filling memory). `None` when `open` fails.
fn read_all(path: &Path, start: u64, len: u64) -> Option<Run> {
    let mut reader = Reader::open(path, start, MAX_LINE_BYTES).ok()?;
    let mut items: Vec<Item> = Vec::new();
    let mut error = None;
    let mut prev_end = start;
    let mut prev_line = 1;
    while let Some(next) = reader.next_item() {
        let item = match next {
            Ok(item) => item,
            Err(e) => {
                error = Some(e.to_string());
                assert!(
                    reader.next_item().is_none(),
                    "a stream error is returned once, then None"
                );
                break;
            }
        };
        assert!(
            item.end_offset > prev_end,
            "end_offset must strictly increase: {} after {prev_end} (start {start})",
            item.end_offset
        );
        assert!(
            item.end_offset <= len,
            "end_offset {} past the decompressed length {len}",
            item.end_offset
        );
        assert!(
            item.line >= prev_line,
            "line went back from {prev_line} to {}",
            item.line
        );
        if let Some(last) = items.last() {
            assert!(last.complete, "an incomplete item was followed by another");
        }
        prev_end = item.end_offset;
        prev_line = item.line;
        items.push(item);
    }
    assert!(reader.next_item().is_none(), "None is final");
    if error.is_none() {
        assert_eq!(
            reader.offset(),
            len,
            "after a clean end, offset() is the decompressed length"
        );
    }
    Some(Run { items, error })
}

fn shown(items: &[Item]) -> Vec<String> {
    items.iter().map(|i| format!("{i:?}")).collect()
}

fn check_file(file: &[u8], arbitrary_offset: u64) {
    let path = common::scratch_path("reader");
    std::fs::write(&path, file).expect("write scratch file");
    let len = decoded_len(file);

    let Some(full) = read_all(&path, 0, len) else {
        // Opening failed (empty, unknown format, gzip cut in its header...). Opening elsewhere
        // must fail too, without panicking.
        let _ = Reader::open(&path, arbitrary_offset, MAX_LINE_BYTES);
        return;
    };

    let n = full.items.len();
    let mut sample = vec![0, n / 2, n.saturating_sub(1)];
    sample.dedup();
    for i in sample.into_iter().filter(|&i| i < n) {
        let offset = full.items[i].end_offset;
        let Some(rest) = read_all(&path, offset, len) else {
            panic!("cannot re-open at item {i}'s end_offset {offset} (of {n} items)");
        };
        assert_eq!(
            shown(&rest.items),
            shown(&full.items[i + 1..]),
            "resuming after item {i} (offset {offset})"
        );
        assert_eq!(
            rest.error, full.error,
            "resuming after item {i} (offset {offset})"
        );
    }

    // Any other offset: refused, or read with the same invariants.
    let _ = read_all(&path, arbitrary_offset, len);
}

fuzz_target!(|data: &[u8]| {
    let arbitrary_offset = match data {
        [.., a, b] => u64::from(u16::from_le_bytes([*a, *b])) % (data.len() as u64 + 2),
        _ => 1,
    };
    check_file(data, arbitrary_offset);
    if data.first().is_some_and(|b| b % 2 == 0) {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(data).expect("gzip in memory");
        let gz = enc.finish().expect("gzip in memory");
        check_file(&gz, arbitrary_offset);
    }
});
