//! The long-running helpers of the agent besides the drain and the watcher: the ingest worker,
//! `after_ingest`, and spool maintenance.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::config::AfterIngest;
use crate::ingest::{Ingestor, Outcome};
use crate::spool::{FileStatus, Spool, Transition};

/// A file whose last line is unfinished and unparsable is held this many `settle_secs` after
/// its last change before the line is taken as final.
pub(super) const PARTIAL_LINE_HOLD_SETTLES: u64 = 10;

/// Reads ready files one at a time, in a blocking thread (sled and file reads block). A file
/// held on an unfinished last line is offered again every `retry_after`; one waiting on a
/// catalog lookup as soon as the catalog changes (or after [`CATALOG_WAIT_RECHECK`]).
pub(super) fn ingest_worker(
    ingestor: Ingestor,
    ready: std::sync::mpsc::Receiver<PathBuf>,
    replays: std::sync::mpsc::Receiver<(PathBuf, u64)>,
    retry_after: Duration,
    stop: CancellationToken,
    heartbeat_ms: Arc<AtomicU64>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    // Replays asked for (`replay PATH`), with when to try each (again).
    let mut replaying: Vec<(std::time::Instant, PathBuf, u64)> = Vec::new();
    let mut held: Vec<(std::time::Instant, PathBuf)> = Vec::new();
    // Files waiting on the catalog, with the generation they saw.
    let mut waiting: Vec<(u64, std::time::Instant, PathBuf)> = Vec::new();
    let generation = || ingestor.catalog.as_ref().map_or(0, |c| c.generation());
    super::failpoint_stall("ingest", &stop);
    loop {
        if stop.is_cancelled() {
            return;
        }
        heartbeat_ms.store(now_ms(), Ordering::Relaxed);
        let now = std::time::Instant::now();
        replaying.extend(replays.try_iter().map(|(abs, id)| (now, abs, id)));
        if let Some(i) = replaying.iter().position(|(at, _, _)| *at <= now) {
            let (_, abs, id) = replaying.remove(i);
            match ingestor.replay(&abs, id, &stop) {
                Ok(Outcome::Cancelled) => return,
                Ok(Outcome::WaitingOnCatalog(_)) | Ok(Outcome::Held) => {
                    replaying.push((now + retry_after, abs, id));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(path = %abs.display(), error = %e, "spool error while replaying a file; trying again");
                    replaying.push((now + retry_after.max(Duration::from_secs(5)), abs, id));
                }
            }
            continue;
        }
        let current = generation();
        waiting.retain(|(seen, at, path)| {
            let due = *seen != current || *at <= now;
            if due {
                held.push((now, path.clone()));
            }
            !due
        });
        let rel = if let Some(i) = held.iter().position(|(at, _)| *at <= now) {
            held.swap_remove(i).1
        } else {
            let poll = if waiting.is_empty() { 500 } else { 100 };
            let wait = held
                .iter()
                .map(|(at, _)| at.saturating_duration_since(now))
                .chain(
                    replaying
                        .iter()
                        .map(|(at, _, _)| at.saturating_duration_since(now)),
                )
                .min()
                .unwrap_or(Duration::from_millis(poll))
                .min(Duration::from_millis(poll));
            match ready.recv_timeout(wait) {
                Ok(rel) => rel,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        held.retain(|(_, p)| *p != rel);
        waiting.retain(|(_, _, p)| *p != rel);
        match ingestor.ingest(&rel, &stop) {
            Ok(Outcome::Cancelled) => return,
            Ok(Outcome::Held) => held.push((std::time::Instant::now() + retry_after, rel)),
            Ok(Outcome::WaitingOnCatalog(seen)) => {
                waiting.push((seen, std::time::Instant::now() + CATALOG_WAIT_RECHECK, rel))
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(path = %rel.display(), error = %e, "spool error while reading a file; it will be read again");
                held.push((
                    std::time::Instant::now() + retry_after.max(Duration::from_secs(5)),
                    rel,
                ));
            }
        }
    }
}

/// A file waiting on a catalog lookup is looked at again at least this often.
const CATALOG_WAIT_RECHECK: Duration = Duration::from_secs(30);

/// Deletes or moves a file once every one of its events was delivered (SPEC section 7). The
/// spool and the file system are worked on a blocking thread, one file at a time.
pub(super) async fn after_ingest_worker(
    spool: Arc<Spool>,
    watch_dir: PathBuf,
    action: AfterIngest,
    move_to: PathBuf,
    mut delivered: mpsc::UnboundedReceiver<u64>,
) {
    let place = Arc::new((watch_dir, move_to));
    while let Some(id) = delivered.recv().await {
        let (spool, place) = (spool.clone(), place.clone());
        let done = tokio::task::spawn_blocking(move || {
            after_ingest(&spool, id, action, &place.0, &place.1)
        })
        .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, file_id = id, "after_ingest failed; the file stays");
        }
    }
}

/// `after_ingest` for the file `id`, once delivered.
fn after_ingest(spool: &Spool, id: u64, action: AfterIngest, watch_dir: &Path, move_to: &Path) {
    let Ok(Some(rec)) = spool.ledger().file(id) else {
        return;
    };
    if rec.status != FileStatus::Read || rec.replay {
        // A replayed file is the operator's, wherever it lies: left alone.
        return;
    }
    let src = watch_dir.join(&rec.path);
    let result = match action {
        AfterIngest::Keep => Ok(()),
        AfterIngest::Delete => std::fs::remove_file(&src),
        AfterIngest::Move => {
            let dst = move_to.join(&rec.path);
            dst.parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|_| std::fs::rename(&src, &dst))
        }
    };
    match result {
        Ok(()) => {
            if action != AfterIngest::Keep {
                tracing::info!(path = %rec.path, action = ?action, "file delivered and removed from the watch directory");
            }
            let _ = spool.ledger().transition(id, Transition::Delivered);
        }
        Err(e) => {
            tracing::warn!(path = %rec.path, error = %e, "after_ingest failed; the file stays")
        }
    }
}

/// How often the spool is tidied: dedupe entries past the window pruned (and the table
/// checkpointed), drained segments deleted, finished CSV export jobs' join state removed (and
/// the join table checkpointed), and sled's files compacted when they have grown far past the
/// live data.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(300);
/// Compaction pauses commits and the drain for the copy, so only when it gives back a lot.
const COMPACT_MIN_DISK_BYTES: u64 = 256 << 20;
const COMPACT_RATIO: u64 = 4;

pub(super) async fn maintenance(spool: Arc<Spool>, dedupe_window: Duration, keep_bad: Duration) {
    let mut every = tokio::time::interval(MAINTENANCE_INTERVAL);
    loop {
        every.tick().await;
        let spool = spool.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<(), crate::spool::Error> {
            let cutoff = now_ms().saturating_sub(dedupe_window.as_millis() as u64);
            let pruned = spool.prune_dedupe(cutoff)?;
            if pruned > 0 {
                tracing::info!(pruned, "dedupe entries older than the window removed");
            }
            spool.queue().remove_drained_segments()?;
            // Finished CSV export jobs' join state (see `spool::join`), and a checkpoint of it.
            let day_ms = 86_400_000;
            spool.sweep_join(
                now_ms().saturating_sub(crate::spool::join::JOIN_RETENTION_DAYS * day_ms),
            )?;
            spool.checkpoint_join()?;
            let cutoff = now_ms().saturating_sub(keep_bad.as_millis() as u64);
            let (quarantined, dead) = spool.letters().drop_letters_before(cutoff)?;
            if quarantined + dead > 0 {
                tracing::info!(
                    quarantined,
                    dead_letters = dead,
                    "entries older than spool.keep_bad_days dropped"
                );
            }
            if spool.is_bloated(COMPACT_MIN_DISK_BYTES, COMPACT_RATIO)? {
                let c = spool.compact()?;
                tracing::info!(
                    disk_before = c.disk_before,
                    disk_after = c.disk_after,
                    "spool compacted"
                );
            }
            Ok(())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "spool maintenance failed; will try again"),
            Err(e) => tracing::warn!(error = %e, "spool maintenance task failed"),
        }
    }
}
