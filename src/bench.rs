//! What the benchmarks in `benches/` need of the crate's insides, and nothing more: the parse
//! floor, which is the daemon's own read -> parse -> map -> serialize path run on one thread
//! with no spool. Not an API for anyone else (hidden from the docs).

use std::path::{Path, PathBuf};

use crate::config::DEFAULT_MAX_LINE_BYTES;
use crate::ingest::map_record;
use crate::input::Reader;
use crate::leanplum::catalog::Catalog;
use crate::mapping::{MappingOptions, Output};

/// Reads `paths` one record after the other, maps every record with the catalog in
/// `catalog_dir` and the default mapping options, serializes each event as the spool stores it
/// and hands its bytes to `sink`, in order.
pub fn parse_floor(
    paths: &[PathBuf],
    catalog_dir: &Path,
    mut sink: impl FnMut(&[u8]),
) -> Result<(), String> {
    let catalog = Catalog::load_dir(catalog_dir).map_err(|e| e.to_string())?;
    let opts = MappingOptions::default();
    for p in paths {
        let mut r = Reader::open(p, 0, DEFAULT_MAX_LINE_BYTES)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        let mut out = Output::default();
        while let Some(item) = r.next_item() {
            let item = item.map_err(|e| format!("{}: {e}", p.display()))?;
            if let Ok(rec) = item.result {
                let _ = map_record(&rec, &catalog, &opts, &mut out);
                for ev in out.events.drain(..) {
                    sink(&ev.to_json());
                }
            }
        }
    }
    Ok(())
}

/// Where the floor's time goes: the records of `paths` (plain files, one session per line),
/// held in memory, are parsed; then parsed and mapped; then parsed, mapped and serialized. For
/// each stage: the CPU seconds of the calling thread and the CRC-32 of the serialized events
/// (0 before serializing).
pub fn floor_stages(paths: &[PathBuf], catalog_dir: &Path) -> Result<Vec<(f64, u32)>, String> {
    use crate::input::{Format, parse_record};
    let catalog = Catalog::load_dir(catalog_dir).map_err(|e| e.to_string())?;
    let opts = MappingOptions::default();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for p in paths {
        let data = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        lines.extend(
            data.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec),
        );
    }
    let mut stages = Vec::new();
    for stage in 0..3 {
        let start = thread_cpu_secs();
        let mut crc = crc32fast::Hasher::new();
        let mut out = Output::default();
        for line in &lines {
            let Ok(record) = parse_record(Format::Sessions, &[], line) else {
                continue;
            };
            if stage >= 1 {
                let _ = map_record(&record, &catalog, &opts, &mut out);
                for ev in out.events.drain(..) {
                    if stage >= 2 {
                        crc.update(&ev.to_json());
                    }
                    std::hint::black_box(ev);
                }
            }
            std::hint::black_box(record);
        }
        stages.push((thread_cpu_secs() - start, crc.finalize()));
    }
    Ok(stages)
}

/// The CPU time of the calling thread, in seconds (nanosecond resolution, from the kernel's
/// scheduler statistics).
pub fn thread_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e9)
}
