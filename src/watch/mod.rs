//! Which files are ready to read. inotify (through `notify`, recursive) says what changed; a
//! full scan at start and every `rescan_interval_secs` catches what inotify missed (queue
//! overflow, events lost across a restart of the watch). A file is ready when it was renamed
//! into place, or when its size and mtime have not changed for `settle_secs`.
//!
//! A ready file is sent (as a path relative to `watch.dir`) once per (size, mtime) it settles
//! at; the ingest decides from its content what, if anything, is new. Job manifests are never
//! sent: they release their shards when `require_manifest` is on.
//!
//! Symlinks are ignored, files and directories alike: following one could read outside the
//! watched tree, and sync tools do not create them.

pub(crate) mod manifest;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use globset::{Glob, GlobSet, GlobSetBuilder};
use notify::event::{EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::WatchConfig;

#[derive(Debug, Clone)]
pub(crate) struct WatchSettings {
    pub dir: PathBuf,
    pub include: GlobSet,
    pub exclude: GlobSet,
    pub settle: Duration,
    pub rescan: Duration,
    pub require_manifest: bool,
}

impl WatchSettings {
    /// `config.dir` must be set (validation guarantees it for `run`).
    pub(crate) fn from_config(c: &WatchConfig) -> Result<WatchSettings, globset::Error> {
        let set = |globs: &[String]| -> Result<GlobSet, globset::Error> {
            let mut b = GlobSetBuilder::new();
            for g in globs {
                b.add(Glob::new(g)?);
            }
            b.build()
        };
        Ok(WatchSettings {
            dir: c.dir.clone().unwrap_or_default(),
            include: set(&c.include)?,
            exclude: set(&c.exclude)?,
            settle: Duration::from_secs(c.settle_secs),
            rescan: Duration::from_secs(c.rescan_interval_secs.max(1)),
            require_manifest: c.require_manifest,
        })
    }

    fn wanted(&self, rel: &Path) -> bool {
        self.include.is_match(rel) && !self.exclude.is_match(rel)
    }
}

/// Size, mtime and ctime: a file whose signature holds still for `settle` is complete. ctime is
/// there so that a permission fix (chmod) makes an unreadable file worth another try.
type Signature = (u64, SystemTime, i64);

struct Tracked {
    sig: Signature,
    /// When the signature last changed (for files found by a scan: estimated from the mtime).
    changed_at: Instant,
    /// Renamed into place: complete now, whatever `settle` says.
    renamed_in: bool,
    /// The signature last sent to the ingest.
    sent: Option<Signature>,
}

/// How the watcher reports.
pub(crate) struct WatchHandles {
    /// Ready files, relative to the watch dir.
    pub ready: std::sync::mpsc::Sender<PathBuf>,
    /// SIGUSR1: rescan now.
    pub rescan_now: Arc<tokio::sync::Notify>,
    /// Fired once the first full scan is done (for READY=1).
    pub first_scan: Option<tokio::sync::oneshot::Sender<()>>,
}

struct Watcher {
    s: WatchSettings,
    tracked: HashMap<PathBuf, Tracked>,
    /// Shard file names a manifest has listed.
    released: HashSet<String>,
    ready: std::sync::mpsc::Sender<PathBuf>,
}

/// Runs until `shutdown`.
pub(crate) async fn run(s: WatchSettings, mut h: WatchHandles, shutdown: CancellationToken) {
    if !s.dir.is_dir() {
        // Ready all the same: the spool drains while we wait, and systemd should not time out.
        if let Some(tx) = h.first_scan.take() {
            let _ = tx.send(());
        }
    }
    if !wait_for_dir(&s.dir, &shutdown).await {
        return;
    }
    let (tx, mut events) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
    let watcher = notify::recommended_watcher(move |e| {
        let _ = tx.send(e);
    })
    .and_then(|mut w| w.watch(&s.dir, RecursiveMode::Recursive).map(|_| w));
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %s.dir.display(), error = %e, "inotify unavailable; relying on periodic rescans");
            None
        }
    };
    let mut w = Watcher {
        tracked: HashMap::new(),
        released: HashSet::new(),
        ready: h.ready.clone(),
        s,
    };
    w.scan_all().await;
    w.check_ready();
    if let Some(tx) = h.first_scan.take() {
        let _ = tx.send(());
    }
    let tick = (w.s.settle / 4).clamp(Duration::from_millis(100), Duration::from_millis(500));
    let mut ticker = tokio::time::interval(tick);
    let mut rescan = tokio::time::interval_at(Instant::now() + w.s.rescan, w.s.rescan);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(e) = events.recv() => w.on_event(e).await,
            _ = ticker.tick() => w.check_ready(),
            _ = rescan.tick() => w.scan_all().await,
            _ = h.rescan_now.notified() => {
                tracing::info!("rescan requested");
                w.scan_all().await;
                w.check_ready();
            }
        }
    }
}

/// A missing watch dir is waited for (it may be a mount not up yet), with one log line.
async fn wait_for_dir(dir: &Path, shutdown: &CancellationToken) -> bool {
    let mut logged = false;
    loop {
        if dir.is_dir() {
            if logged {
                tracing::info!(dir = %dir.display(), "watch directory appeared");
            }
            return true;
        }
        if !logged {
            tracing::warn!(dir = %dir.display(), "watch directory missing; waiting for it");
            logged = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

impl Watcher {
    fn rel<'a>(&self, path: &'a Path) -> Option<&'a Path> {
        path.strip_prefix(&self.s.dir).ok()
    }

    async fn on_event(&mut self, e: notify::Result<notify::Event>) {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                tracing::warn!(error = %err, "inotify error; rescanning");
                self.scan_all().await;
                return;
            }
        };
        if e.need_rescan() {
            tracing::warn!("inotify queue overflowed; rescanning");
            self.scan_all().await;
            return;
        }
        // Reads and opens say nothing about readiness; reacting to them made our own
        // directory walks (which open directories) trigger more walks, forever.
        if matches!(e.kind, EventKind::Access(_) | EventKind::Other) {
            return;
        }
        let renamed_to = |i: usize| match e.kind {
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => true,
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => i == 1,
            _ => false,
        };
        // Only a directory that appears (created, or moved in with its files) needs a walk.
        let appeared = matches!(
            e.kind,
            EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_))
        );
        for (i, path) in e.paths.iter().enumerate() {
            self.look_at(path, renamed_to(i), appeared).await;
        }
    }

    /// Re-reads one path's state after an event (one `lstat`; a directory that appeared is
    /// walked off the async workers).
    async fn look_at(&mut self, path: &Path, renamed_in: bool, appeared: bool) {
        let Some(rel) = self.rel(path).map(Path::to_path_buf) else {
            return;
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                if appeared {
                    self.scan(path).await;
                }
            }
            Ok(m) if m.is_file() => self.track(rel, &m, renamed_in),
            _ => {
                // Gone: the file, or a whole directory and what was under it.
                self.tracked.retain(|p, _| !p.starts_with(&rel));
            }
        }
    }

    async fn scan_all(&mut self) {
        let dir = self.s.dir.clone();
        let Some(found) = walk(self.s.dir.clone(), dir.clone()).await else {
            tracing::warn!(dir = %dir.display(), "watch directory is gone");
            self.tracked.clear();
            return;
        };
        let present: HashSet<PathBuf> = found.iter().map(|(rel, _)| rel.clone()).collect();
        for (rel, m) in found {
            self.track(rel, &m, false);
        }
        self.tracked.retain(|p, _| present.contains(p));
    }

    async fn scan(&mut self, dir: &Path) {
        for (rel, m) in walk(self.s.dir.clone(), dir.to_path_buf())
            .await
            .unwrap_or_default()
        {
            self.track(rel, &m, false);
        }
    }

    fn track(&mut self, rel: PathBuf, m: &std::fs::Metadata, renamed_in: bool) {
        if !self.s.wanted(&rel) {
            return;
        }
        let mtime = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let sig = (
            m.len(),
            mtime,
            std::os::unix::fs::MetadataExt::ctime_nsec(m)
                + std::os::unix::fs::MetadataExt::ctime(m) * 1_000_000_000,
        );
        let now = Instant::now();
        match self.tracked.get_mut(&rel) {
            Some(t) => {
                if t.sig != sig {
                    t.sig = sig;
                    t.changed_at = now;
                    t.renamed_in = false;
                }
                t.renamed_in |= renamed_in;
            }
            None => {
                // A file first seen by a scan has been still since its mtime.
                let age = crate::clock::age(mtime).unwrap_or(Duration::ZERO);
                let changed_at = now.checked_sub(age).unwrap_or(now);
                self.tracked.insert(
                    rel,
                    Tracked {
                        sig,
                        changed_at,
                        renamed_in,
                        sent: None,
                    },
                );
            }
        }
    }

    /// Sends every file that has settled and was not sent at its current signature.
    fn check_ready(&mut self) {
        let now = Instant::now();
        let settle = self.s.settle;
        let due: Vec<PathBuf> = self
            .tracked
            .iter()
            .filter(|(_, t)| {
                t.sent != Some(t.sig)
                    && (t.renamed_in || now.duration_since(t.changed_at) >= settle)
            })
            .map(|(p, _)| p.clone())
            .collect();
        // Manifests first, so shards they release go out in the same pass.
        let (manifests, files): (Vec<_>, Vec<_>) = due
            .into_iter()
            .partition(|p| manifest::is_manifest(&file_name(p)));
        for rel in manifests {
            self.read_manifest(&rel);
        }
        for rel in files {
            let name = file_name(&rel);
            if self.s.require_manifest
                && manifest::is_shard(&name)
                && !self.released.contains(&name)
            {
                continue;
            }
            let Some(t) = self.tracked.get_mut(&rel) else {
                continue;
            };
            t.sent = Some(t.sig);
            tracing::debug!(path = %rel.display(), "file ready");
            let _ = self.ready.send(rel);
        }
    }

    fn read_manifest(&mut self, rel: &Path) {
        let Some(t) = self.tracked.get_mut(rel) else {
            return;
        };
        t.sent = Some(t.sig);
        match std::fs::read(self.s.dir.join(rel)).map_err(|e| e.to_string()) {
            Ok(bytes) => match manifest::shard_names(&bytes) {
                Ok(names) => {
                    tracing::info!(path = %rel.display(), shards = names.len(), "job manifest read");
                    self.released.extend(names);
                }
                Err(e) => {
                    tracing::warn!(path = %rel.display(), error = %e, "job manifest unreadable; waiting for it to change")
                }
            },
            Err(e) => {
                tracing::warn!(path = %rel.display(), error = %e, "job manifest unreadable; waiting for it to change")
            }
        }
    }
}

/// The regular files under `dir` (symlinks not followed), relative to `root`, with their
/// metadata; `None` if `dir` is not a directory. Walked on tokio's blocking pool: a large tree
/// (or a slow mount) never stalls the async workers.
async fn walk(root: PathBuf, dir: PathBuf) -> Option<Vec<(PathBuf, std::fs::Metadata)>> {
    let walked = tokio::task::spawn_blocking(move || {
        if !dir.is_dir() {
            return None;
        }
        let mut found = Vec::new();
        for entry in walkdir::WalkDir::new(&dir).follow_links(false) {
            let Ok(entry) = entry else { continue };
            if !entry.file_type().is_file() {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(&root) else {
                continue;
            };
            if let Ok(m) = entry.metadata() {
                found.push((rel.to_path_buf(), m));
            }
        }
        Some(found)
    })
    .await;
    match walked {
        Ok(found) => found,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // The runtime is shutting down: the watcher goes with it.
            Err(_) => Some(Vec::new()),
        },
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(include: &[&str], exclude: Option<&[&str]>) -> WatchSettings {
        let mut c = WatchConfig::default();
        if !include.is_empty() {
            c.include = include.iter().map(|s| s.to_string()).collect();
        }
        if let Some(e) = exclude {
            c.exclude = e.iter().map(|s| s.to_string()).collect();
        }
        WatchSettings::from_config(&c).unwrap()
    }

    #[test]
    fn default_globs_skip_sync_tools_temporary_names_at_any_depth() {
        let s = settings(&[], None);
        for wanted in [
            "20261101/export-5629499534213120-06e7df8e-output-0",
            "feed.csv",
            "a/b/c/postbacks.jsonl",
        ] {
            assert!(s.wanted(Path::new(wanted)), "{wanted}");
        }
        for skipped in [
            "x.tmp",
            "20261101/.export-1-output-0.tmp",
            "a/b/part.partial",
            ".hidden",
            "a/.gsutil-temp",
        ] {
            assert!(!s.wanted(Path::new(skipped)), "{skipped}");
        }
    }

    #[test]
    fn include_narrows_and_exclude_wins() {
        let s = settings(&["**/*.jsonl"], Some(&["old/**"]));
        assert!(s.wanted(Path::new("a/b.jsonl")));
        assert!(s.wanted(Path::new("b.jsonl")));
        assert!(!s.wanted(Path::new("b.csv")));
        assert!(!s.wanted(Path::new("old/b.jsonl")));
    }
}
