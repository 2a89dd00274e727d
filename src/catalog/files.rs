//! The catalog files, `catalog_dir/messages.json` and `abtests.json`: loading them, and the task
//! that reloads them when they change (SPEC section 5, "Files are watched").
//!
//! **Loading.** [`load_files`] is what `check-config`, `run` and SIGHUP use (through
//! [`crate::config::Config::load_and_validate`]): a missing directory or file is an empty part,
//! a file that cannot be read or parsed is an error naming it (and quoting none of it).
//!
//! **Watching.** [`watch`] watches `catalog_dir` itself with inotify (the directory, so an
//! atomic rename into place is seen as well as an in-place rewrite), and beside it stats the two
//! files every [`POLL_INTERVAL`] in case an event is missed (a directory created later, a
//! Kubernetes-style symlink swap, inotify unavailable). A change is a new [`FilesStamp`]
//! (device, inode, size, mtime, ctime of each file). Once the stamp has held still for
//! `settle` (`watch.settle_secs`), both files are read again: if both parse, the catalog
//! service takes them ([`CatalogService::reload_files`]); if not, the last good catalog stays
//! and the error is shown in `status` ([`CatalogService::refuse_files`]) until a good file
//! replaces it. A file that changes while it is read is read again after it settles.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher as _;
use notify::event::EventKind;
use tokio::sync::{mpsc, watch as watch_channel};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::CatalogService;
use crate::leanplum::catalog::{Catalog, CatalogError};

/// How often the two files are stat'ed beside inotify.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// The least time a change is given to settle, so a burst of events (a rename, a write in
/// several calls) is one reload even with `settle_secs = 0`.
const MIN_SETTLE: Duration = Duration::from_millis(200);

pub(crate) const MESSAGES_FILE: &str = "messages.json";
pub(crate) const ABTESTS_FILE: &str = "abtests.json";

/// What one catalog file looked like on disk, to tell a change: a rewrite in place changes its
/// size, mtime or ctime; a rename into place, its inode; ctime also catches a rewrite that
/// keeps size and mtime (`cp -p`, `rsync -t` into place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileStamp {
    Missing,
    /// `stat` failed for another reason (permissions): reading it will say why.
    Unreadable(io::ErrorKind),
    Present {
        dev: u64,
        ino: u64,
        size: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
    },
}

impl FileStamp {
    fn of(path: &Path) -> FileStamp {
        // Follows symlinks: what is read is the target, and a swapped link changes the inode.
        match std::fs::metadata(path) {
            Ok(m) => FileStamp::Present {
                dev: m.dev(),
                ino: m.ino(),
                size: m.size(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => FileStamp::Missing,
            Err(e) => FileStamp::Unreadable(e.kind()),
        }
    }
}

/// Both catalog files' [`FileStamp`]s: equal stamps, same files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FilesStamp {
    messages: FileStamp,
    abtests: FileStamp,
}

impl FilesStamp {
    /// The stamp of `dir`'s catalog files now (two `stat` calls).
    pub(crate) fn of(dir: &Path) -> FilesStamp {
        FilesStamp {
            messages: FileStamp::of(&dir.join(MESSAGES_FILE)),
            abtests: FileStamp::of(&dir.join(ABTESTS_FILE)),
        }
    }
}

/// The catalog files as loaded, with the stamp they had just before they were read (a change
/// during or after the read shows as a different stamp, so it is never taken as seen).
#[derive(Debug, Clone)]
pub(crate) struct LoadedFiles {
    pub dir: PathBuf,
    pub catalog: Catalog,
    pub stamp: FilesStamp,
}

/// Reads `dir/messages.json` and `dir/abtests.json` (see [`Catalog::load_dir`]).
pub(crate) fn load_files(dir: &Path) -> Result<LoadedFiles, CatalogError> {
    let stamp = FilesStamp::of(dir);
    let catalog = Catalog::load_dir(dir)?;
    Ok(LoadedFiles {
        dir: dir.to_owned(),
        catalog,
        stamp,
    })
}

/// Decides when the files are to be read again: when their stamp differs from the one last
/// read and has held still for `settle`. Fed by inotify events and the periodic check alike.
#[derive(Debug)]
struct Detector {
    /// The stamp of the files last read (taken before reading them).
    read: FilesStamp,
    /// The stamp last observed, and when it was first observed.
    seen: FilesStamp,
    seen_since: Instant,
}

impl Detector {
    fn new(read: FilesStamp, now: Instant) -> Detector {
        Detector {
            seen: read.clone(),
            read,
            seen_since: now,
        }
    }

    /// Records what the files look like at `now`.
    fn observe(&mut self, stamp: FilesStamp, now: Instant) {
        if stamp != self.seen {
            self.seen = stamp;
            self.seen_since = now;
        }
    }

    /// When the files are due to be read: `None` while they are as last read.
    fn due_at(&self, settle: Duration) -> Option<Instant> {
        (self.seen != self.read).then(|| self.seen_since + settle)
    }

    fn is_due(&self, now: Instant, settle: Duration) -> bool {
        self.due_at(settle).is_some_and(|at| at <= now)
    }

    /// The files with stamp `stamp` were read (and taken or refused).
    fn read(&mut self, stamp: FilesStamp) {
        self.read = stamp;
    }
}

/// The catalog directory and the stamp of the files last loaded from it, as SIGHUP sends it to
/// [`watch`] (it may move the directory, and it read the files itself).
pub(crate) type FilesSeen = (PathBuf, FilesStamp);

/// Watches the catalog files until `stop`; `current` starts with what the agent loaded at
/// start and changes at each SIGHUP reload.
pub(crate) async fn watch(
    service: Arc<CatalogService>,
    mut current: watch_channel::Receiver<FilesSeen>,
    settle: Duration,
    stop: CancellationToken,
) {
    let settle = settle.max(MIN_SETTLE);
    let (mut dir, stamp) = current.borrow_and_update().clone();
    let mut detector = Detector::new(stamp, Instant::now());
    let (tx, mut events) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
    let mut inotify = DirWatch::new(tx);
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = detector.due_at(settle);
        tokio::select! {
            _ = stop.cancelled() => return,
            Ok(()) = current.changed() => {
                let (new_dir, stamp) = current.borrow_and_update().clone();
                if new_dir != dir {
                    tracing::info!(dir = %new_dir.display(), "watching the new catalog directory");
                    dir = new_dir;
                    inotify.disarm();
                }
                detector.read(stamp);
                inotify.arm(&dir);
            }
            Some(event) = events.recv() => {
                let mut dir_gone = inotify.dir_gone(&event, &dir);
                // One look for a burst of events.
                while let Ok(e) = events.try_recv() {
                    dir_gone |= inotify.dir_gone(&e, &dir);
                }
                if dir_gone {
                    inotify.disarm();
                }
            }
            _ = poll.tick() => inotify.arm(&dir),
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
        }
        detector.observe(FilesStamp::of(&dir), Instant::now());
        if !detector.is_due(Instant::now(), settle) {
            continue;
        }
        let epoch = service.files_epoch();
        let read_dir = dir.clone();
        let read = tokio::task::spawn_blocking(move || {
            let before = FilesStamp::of(&read_dir);
            let result = Catalog::load_dir(&read_dir);
            (before, result, FilesStamp::of(&read_dir))
        })
        .await;
        let Ok((before, result, after)) = read else {
            continue;
        };
        if before != after {
            // Changed while being read: read it again once it settles.
            detector.observe(after, Instant::now());
            continue;
        }
        match result {
            Ok(catalog) => service.reload_files(catalog, epoch),
            Err(e) => service.refuse_files(e.to_string(), epoch),
        };
        detector.read(before);
    }
}

/// The inotify watch on the catalog directory, armed while the directory exists.
struct DirWatch {
    tx: mpsc::UnboundedSender<notify::Result<notify::Event>>,
    /// The watcher and the (device, inode) of the directory it watches.
    armed: Option<(notify::RecommendedWatcher, (u64, u64))>,
    /// An arming error already logged (logged again only when it changes).
    last_error: Option<String>,
}

impl DirWatch {
    fn new(tx: mpsc::UnboundedSender<notify::Result<notify::Event>>) -> DirWatch {
        DirWatch {
            tx,
            armed: None,
            last_error: None,
        }
    }

    fn disarm(&mut self) {
        self.armed = None;
    }

    /// Watches `dir` unless already watching that very directory (a directory deleted and
    /// created again is a new inode and needs a new watch). A missing directory is an empty
    /// catalog, watched from when it appears (found by the periodic check).
    fn arm(&mut self, dir: &Path) {
        let id = match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => (m.dev(), m.ino()),
            _ => {
                self.armed = None;
                return;
            }
        };
        if self.armed.as_ref().is_some_and(|(_, armed)| *armed == id) {
            return;
        }
        let tx = self.tx.clone();
        let watcher = notify::recommended_watcher(move |e| {
            let _ = tx.send(e);
        })
        .and_then(|mut w| w.watch(dir, notify::RecursiveMode::NonRecursive).map(|_| w));
        match watcher {
            Ok(w) => {
                if self.last_error.take().is_some() {
                    tracing::info!(dir = %dir.display(), "watching the catalog directory with inotify again");
                }
                self.armed = Some((w, id));
            }
            Err(e) => {
                let e = e.to_string();
                if self.last_error.as_ref() != Some(&e) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the catalog directory with inotify; checking its files every 2 s instead");
                    self.last_error = Some(e);
                }
                self.armed = None;
            }
        }
    }

    /// Whether `event` says the watched directory itself went away (its watch is then dead).
    fn dir_gone(&self, event: &notify::Result<notify::Event>, dir: &Path) -> bool {
        match event {
            Ok(e) => matches!(e.kind, EventKind::Remove(_)) && e.paths.iter().any(|p| p == dir),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(1);

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn stamp_sees_in_place_rewrites_renames_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let missing = FilesStamp::of(d);
        assert_eq!(missing.messages, FileStamp::Missing);
        assert_eq!(FilesStamp::of(&d.join("no-such-dir")), missing);

        write(d, MESSAGES_FILE, "[]");
        let first = FilesStamp::of(d);
        assert_ne!(first, missing);
        assert_eq!(FilesStamp::of(d), first, "nothing changed, same stamp");

        // In place, same size: ctime (and mtime) move.
        std::thread::sleep(Duration::from_millis(20));
        write(d, MESSAGES_FILE, "{}");
        let rewritten = FilesStamp::of(d);
        assert_ne!(rewritten, first);

        // Atomic replace: a new inode, even with the same size and the same mtime.
        write(d, ".messages.json.tmp", "[]");
        let tmp = d.join(".messages.json.tmp");
        let old = std::fs::metadata(d.join(MESSAGES_FILE)).unwrap();
        let f = std::fs::File::options().write(true).open(&tmp).unwrap();
        f.set_modified(old.modified().unwrap()).unwrap();
        drop(f);
        std::fs::rename(&tmp, d.join(MESSAGES_FILE)).unwrap();
        let renamed = FilesStamp::of(d);
        assert_ne!(renamed, rewritten);
        assert_eq!(renamed.abtests, FileStamp::Missing);

        write(d, ABTESTS_FILE, "[]");
        assert_ne!(FilesStamp::of(d), renamed, "abtests.json counts too");
        std::fs::remove_file(d.join(MESSAGES_FILE)).unwrap();
        assert_eq!(FilesStamp::of(d).messages, FileStamp::Missing);
    }

    fn stamp(dir: &Path, text: &str) -> FilesStamp {
        write(dir, MESSAGES_FILE, text);
        FilesStamp::of(dir)
    }

    #[test]
    fn a_change_is_due_once_it_has_held_still_for_settle() {
        let dir = tempfile::tempdir().unwrap();
        let a = stamp(dir.path(), "[]");
        let b = stamp(dir.path(), "[ ]");
        let c = stamp(dir.path(), "[  ]");
        let t0 = Instant::now();
        let mut d = Detector::new(a.clone(), t0);

        d.observe(a.clone(), t0 + SETTLE * 5);
        assert_eq!(d.due_at(SETTLE), None, "unchanged files are never due");

        // A write seen at t0+1s; another at t0+1.5s (still being written) moves the deadline.
        d.observe(b.clone(), t0 + SETTLE);
        assert_eq!(d.due_at(SETTLE), Some(t0 + SETTLE * 2));
        d.observe(c.clone(), t0 + SETTLE * 3 / 2);
        assert!(!d.is_due(t0 + SETTLE * 2, SETTLE));
        // The same stamp seen again (the periodic check) does not move it.
        d.observe(c.clone(), t0 + SETTLE * 2);
        assert!(d.is_due(t0 + SETTLE * 5 / 2, SETTLE));

        // Read (taken or refused): nothing due until the next change.
        d.read(c.clone());
        assert_eq!(d.due_at(SETTLE), None);

        // Back to an earlier content is a change too.
        d.observe(a.clone(), t0 + SETTLE * 4);
        assert!(d.is_due(t0 + SETTLE * 5, SETTLE));
    }

    #[test]
    fn a_change_between_load_and_watch_is_not_missed() {
        // The stamp of the start's load is taken before reading; if the file changed after
        // that, the watcher's first look differs and reads again.
        let dir = tempfile::tempdir().unwrap();
        let loaded = load_files(dir.path()).unwrap();
        let t0 = Instant::now();
        let mut d = Detector::new(loaded.stamp, t0);
        write(dir.path(), MESSAGES_FILE, "[]");
        d.observe(FilesStamp::of(dir.path()), t0);
        assert!(d.is_due(t0 + SETTLE, SETTLE));
    }
}
