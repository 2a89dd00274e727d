//! Leanplum export jobs: shard names (`export-<appId>-<uuid>-output-<n>`) and the job's
//! `-output-manifest`, written last, which lists them.

use serde::Deserialize;

/// A job manifest names its shards relative to the export root; we match them by file name so
/// a sync that lands them under another prefix still works.
pub(crate) fn is_manifest(file_name: &str) -> bool {
    file_name.ends_with("-output-manifest")
}

/// `...-output-<digits>` with an optional extension (`.gz`, `.json`), or a table of a CSV
/// export job (`...-output<table>-<n>`, see `leanplum::csv_export`): a shard that, with
/// `require_manifest`, waits for its manifest.
pub(crate) fn is_shard(file_name: &str) -> bool {
    if crate::leanplum::csv_export::table_file(file_name).is_some() {
        return true;
    }
    match file_name.rfind("-output-") {
        Some(i) => file_name[i + "-output-".len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit()),
        None => false,
    }
}

#[derive(Deserialize)]
struct Manifest {
    files: Vec<String>,
}

/// The file names of the shards a manifest lists.
pub(crate) fn shard_names(json: &[u8]) -> Result<Vec<String>, String> {
    let m: Manifest = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    Ok(m.files
        .iter()
        .map(|f| f.rsplit('/').next().unwrap_or(f).to_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let job = "export-5629499534213120-06e7df8e-1eb1-c66e-79f7-4d60ac03031e";
        assert!(is_manifest(&format!("{job}-output-manifest")));
        assert!(!is_shard(&format!("{job}-output-manifest")));
        assert!(is_shard(&format!("{job}-output-0")));
        assert!(is_shard(&format!("{job}-output-12.gz")));
        assert!(!is_shard("postbacks.jsonl"));
        assert!(!is_manifest(&format!("{job}-output-0")));
        assert!(is_shard(&format!("{job}-outputevents-0")));
        assert!(is_shard(&format!("{job}-outputsessions-3.gz")));
    }

    #[test]
    fn the_sample_manifest_lists_its_shard() {
        let text =
            br#"{"jobId": "j", "files": ["20261101/export-1-j-output-0", "export-1-j-output-1"]}"#;
        assert_eq!(
            shard_names(text).unwrap(),
            ["export-1-j-output-0", "export-1-j-output-1"]
        );
        assert!(shard_names(b"{\"files\": [").is_err());
    }
}
