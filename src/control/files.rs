//! `files` and `replay` (SPEC section 2): every input file the agent knows, where it stands and
//! why, and the operator's explicit re-ingest of files or directories through the running
//! agent. `files` works on a stopped agent's spool too (without the live states `held` and
//! `waiting`, which only the running agent knows).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::protocol::{ReplayStarted, Replayed};
use crate::spool::{self, FileRecord, FileStatus, Spool};

/// One line of `files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileEntry {
    pub id: u64,
    /// Relative to `watch.dir`; absolute for a replay.
    pub path: String,
    /// The detected format, once read (`sessions`, `engagements-json`, ...).
    pub format: Option<String>,
    pub gzip: bool,
    /// Bytes of the file when last seen.
    pub size: u64,
    /// Decompressed bytes committed, and lines.
    pub offset: u64,
    pub line: u64,
    pub events_read: u64,
    pub events_queued: u64,
    pub events_delivered: u64,
    /// `waiting`, `reading`, `held`, `done`, `delivered` or `failed`.
    pub state: String,
    /// Why it waits or failed; none when there is nothing to say.
    pub reason: Option<String>,
    pub replay: bool,
}

/// What only the running agent knows about files being read.
#[derive(Debug, Clone, Default)]
pub(crate) struct LiveFiles {
    /// Files held on an unfinished last line (the ingestor's set).
    pub holding: Arc<Mutex<HashSet<PathBuf>>>,
    /// Files waiting for the catalog, with what they wait for.
    pub waiting: Vec<(String, String)>,
}

/// The state and reason of a record.
fn state(rec: &FileRecord, live: Option<&LiveFiles>) -> (&'static str, Option<String>) {
    match rec.status {
        FileStatus::Failed => ("failed", rec.error.clone()),
        FileStatus::Done => ("delivered", None),
        FileStatus::Read if rec.pending == 0 => ("delivered", None),
        FileStatus::Read => (
            "done",
            Some(format!(
                "read to the end; {} events waiting for delivery",
                rec.pending
            )),
        ),
        FileStatus::Reading => {
            if let Some(live) = live {
                let held = live
                    .holding
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(Path::new(&rec.path));
                if held {
                    return (
                        "held",
                        Some("last line unfinished; waiting for its writer to finish it".into()),
                    );
                }
                if let Some((_, why)) = live.waiting.iter().find(|(p, _)| *p == rec.path) {
                    return ("waiting", Some(why.clone()));
                }
            }
            ("reading", None)
        }
    }
}

/// Every file record, oldest first; only those in `state_filter` when given.
pub(crate) fn list(
    spool: &Spool,
    live: Option<&LiveFiles>,
    state_filter: Option<&str>,
) -> Result<Vec<FileEntry>, spool::Error> {
    Ok(spool
        .ledger()
        .files()?
        .into_iter()
        .map(|(id, rec)| {
            let (state, reason) = state(&rec, live);
            FileEntry {
                id,
                path: rec.path.clone(),
                format: (!rec.format.is_empty()).then(|| rec.format.clone()),
                gzip: rec.gzip,
                size: rec.raw_len,
                offset: rec.offset,
                line: rec.line,
                events_read: rec.events_spooled,
                events_queued: rec.pending,
                events_delivered: rec.events_spooled.saturating_sub(rec.pending),
                state: state.to_owned(),
                reason,
                replay: rec.replay,
            }
        })
        .filter(|e| state_filter.is_none_or(|s| e.state == s))
        .collect())
}

/// `files` for people: one line per file.
pub(crate) fn render(entries: &[FileEntry]) -> String {
    if entries.is_empty() {
        return "no files\n".into();
    }
    let mut out = format!(
        "{:<9} {:>10} {:>8} {:>8} {:>9}  {:<16} {}\n",
        "STATE", "SIZE", "READ", "QUEUED", "DELIVERED", "FORMAT", "PATH"
    );
    for e in entries {
        let format = match (&e.format, e.gzip) {
            (Some(f), true) => format!("{f}.gz"),
            (Some(f), false) => f.clone(),
            (None, _) => "-".into(),
        };
        let replay = if e.replay { " (replay)" } else { "" };
        out.push_str(&format!(
            "{:<9} {:>10} {:>8} {:>8} {:>9}  {:<16} {}{replay}\n",
            e.state, e.size, e.events_read, e.events_queued, e.events_delivered, format, e.path
        ));
        if let Some(r) = &e.reason {
            out.push_str(&format!("          {r}\n"));
        }
    }
    out
}

/// The files `paths` name for a replay: files as they are, directories walked (sorted, hidden
/// files and Leanplum job manifests left out). Paths must be absolute.
pub(crate) fn replay_targets(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if !p.is_absolute() {
            return Err(format!("{}: not an absolute path", p.display()));
        }
        let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.is_file() {
            out.push(p.clone());
            continue;
        }
        let mut files: Vec<PathBuf> = walkdir::WalkDir::new(p)
            .follow_links(false)
            .into_iter()
            .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .filter(|e| !crate::watch::manifest::is_manifest(&e.file_name().to_string_lossy()))
            .map(|e| e.into_path())
            .collect();
        files.sort();
        out.extend(files);
    }
    Ok(out)
}

/// Starts the replay of `paths` (absolute files or directories, see [`replay_targets`]):
/// creates each file's record and hands it to the reader through `reader`. `Err` when the
/// paths are refused as a whole; a file that cannot be handed over ends the replay with the
/// files before it started.
pub(crate) fn replay(
    paths: &[PathBuf],
    spool: &Spool,
    reader: &std::sync::mpsc::Sender<(PathBuf, u64)>,
) -> Result<Replayed, String> {
    let mut replayed = Replayed::default();
    for abs in replay_targets(paths)? {
        match crate::ingest::begin_replay(spool, &abs) {
            Ok(id) => {
                tracing::info!(path = %abs.display(), file_id = id, "replay requested");
                let _ = reader.send((abs.clone(), id));
                replayed.started.push(ReplayStarted { path: abs, id });
            }
            Err(e) => {
                replayed.error = Some(e.to_string());
                break;
            }
        }
    }
    Ok(replayed)
}
