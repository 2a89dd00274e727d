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
                    sink(&serde_json::to_vec(&ev).map_err(|e| e.to_string())?);
                }
            }
        }
    }
    Ok(())
}
