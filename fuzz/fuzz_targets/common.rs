//! Helpers shared by the fuzz targets (each target uses a subset).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use leanplum_segment_agent::leanplum::catalog::Catalog;
use leanplum_segment_agent::mapping::{MappingOptions, Output, UnknownChannel};

/// The catalog shipped in `examples/catalog`, loaded once per process.
pub fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/catalog");
        let catalog = Catalog::load_dir(&dir).expect("examples/catalog loads");
        assert!(
            catalog.len_messages() > 0,
            "examples/catalog has no messages"
        );
        catalog
    })
}

/// Every combination of the `[mapping]` settings that change what a record becomes.
pub fn all_options() -> [MappingOptions; 6] {
    let mut out = [MappingOptions::default(); 6];
    let channels = [
        UnknownChannel::Skip,
        UnknownChannel::Email,
        UnknownChannel::Push,
    ];
    for (i, o) in out.iter_mut().enumerate() {
        o.unknown_message_channel = channels[i % 3];
        o.send_experiment_viewed = i < 3;
    }
    out
}

/// What ingest does with mapped events next: serialize them for the spool.
pub fn serialize_output(out: &Output) {
    for event in &out.events {
        let bytes = serde_json::to_vec(event).expect("a TrackEvent always serializes");
        assert!(!bytes.is_empty());
    }
}

/// One scratch file per process and per name (`$TMPDIR/lsa-fuzz-<pid>/<name>`), rewritten on
/// every run. The directory is left behind when the process ends; it holds a few KiB.
pub fn scratch_path(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lsa-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    })
    .join(name)
}
