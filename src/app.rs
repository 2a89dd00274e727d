//! Wires the tasks together and owns the order of startup and shutdown:
//!
//! 1. open the spool and load the catalog;
//! 2. start the drain, then the watcher and the ingest worker;
//! 3. on shutdown: stop intake (watcher, ingest between chunks), let the drain finish or
//!    abandon in-flight batches within 10 s, flush the spool, return.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{AfterIngest, Config, WriteKey};
use crate::control;
use crate::drain::{Drain, DrainHandle, DrainSettings};
use crate::ingest::{Ingestor, Outcome};
use crate::leanplum::catalog::Catalog;
use crate::mapping::MappingOptions;
use crate::segment::client::Client;
use crate::spool::{FileStatus, Spool};
use crate::stats::Stats;
use crate::watch::{self, WatchHandles, WatchSettings};

/// sled's page cache. The spool is streamed, so a small cache costs little speed.
pub const SPOOL_CACHE_BYTES: u64 = 32 << 20;

/// What signals ask of a running agent.
#[derive(Debug, Clone, Default)]
pub struct Controls {
    /// SIGTERM / SIGINT.
    pub shutdown: CancellationToken,
    /// SIGUSR1: skip the backoff wait and rescan.
    pub drain_now: Arc<tokio::sync::Notify>,
}

pub fn mapping_options(c: &Config) -> MappingOptions {
    MappingOptions {
        unknown_message_channel: c.mapping.unknown_message_channel,
        send_experiment_viewed: c.mapping.send_experiment_viewed,
    }
}

/// Runs the agent until `controls.shutdown` is cancelled.
pub async fn run(config: Config, key: WriteKey, controls: Controls) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    let spool_dir = config.spool.dir.clone();
    let spool = tokio::task::spawn_blocking(move || Spool::open(&spool_dir, SPOOL_CACHE_BYTES))
        .await?
        .context("cannot open the spool")?;
    let spool = Arc::new(spool);
    if let Some(note) = spool.recovered() {
        tracing::warn!("{note}");
    }
    let depth = spool.depth()?;
    tracing::info!(
        path = %spool.path().display(),
        events = depth.events,
        bytes = depth.bytes,
        "spool open"
    );

    let catalog = Catalog::load_dir(&config.mapping.catalog_dir).with_context(|| {
        format!(
            "cannot load the catalog from {}",
            config.mapping.catalog_dir.display()
        )
    })?;
    tracing::info!(
        dir = %config.mapping.catalog_dir.display(),
        messages = catalog.len_messages(),
        abtests = catalog.len_abtests(),
        "catalog loaded"
    );
    let catalog = Arc::new(catalog);

    let client = Client::new(
        &config.segment.endpoint,
        &key,
        Duration::from_secs(config.segment.request_timeout_secs),
        config.segment.gzip,
    )
    .context("cannot build the HTTP client")?;
    tracing::info!(endpoint = %config.segment.endpoint, "delivering to Segment");

    let handle = DrainHandle::default();
    let (delivered_tx, delivered_rx) = mpsc::unbounded_channel();
    let drain = Drain::new(
        spool.clone(),
        client,
        DrainSettings::from_config(&config),
        stats.clone(),
        handle.clone(),
        Some(delivered_tx),
    );
    let drain_stop = CancellationToken::new();
    let drain_task = tokio::spawn(drain.run(drain_stop.clone()));

    let intake_stop = controls.shutdown.child_token();
    let watch_settings = WatchSettings::from_config(&config.watch)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rescan_now = Arc::new(tokio::sync::Notify::new());
    let (first_scan_tx, first_scan_rx) = tokio::sync::oneshot::channel();
    let watch_task = tokio::spawn(watch::run(
        watch_settings,
        WatchHandles {
            ready: ready_tx,
            rescan_now: rescan_now.clone(),
            first_scan: Some(first_scan_tx),
        },
        intake_stop.clone(),
    ));

    let ingestor = Ingestor {
        spool: spool.clone(),
        catalog: catalog.clone(),
        opts: mapping_options(&config),
        stats: stats.clone(),
        watch_dir: config.watch.dir.clone().unwrap_or_default(),
        max_spool_bytes: config.spool.max_bytes,
        drain_wake: handle.wake.clone(),
        partial_line_hold: Duration::from_secs(
            config.watch.settle_secs.max(1) * PARTIAL_LINE_HOLD_SETTLES,
        ),
        holding: Default::default(),
    };
    let retry_after = Duration::from_secs(config.watch.settle_secs.max(1));
    let ingest_stop = intake_stop.clone();
    let ingest_task = tokio::task::spawn_blocking(move || {
        ingest_worker(ingestor, ready_rx, retry_after, ingest_stop)
    });

    let after_task = tokio::spawn(after_ingest_worker(
        spool.clone(),
        config.watch.dir.clone().unwrap_or_default(),
        config.watch.after_ingest,
        config.watch.move_to.clone(),
        delivered_rx,
    ));

    let maintenance_task = tokio::spawn(maintenance(
        spool.clone(),
        Duration::from_secs(config.spool.dedupe_window_days * 86_400),
    ));

    // Signals that are not shutdown.
    let kick = handle.kick.clone();
    let drain_now = controls.drain_now.clone();
    let usr1_task = tokio::spawn(async move {
        loop {
            drain_now.notified().await;
            kick.notify_one();
            rescan_now.notify_one();
        }
    });

    let started = std::time::Instant::now();
    let report: control::ReportFn = {
        let (stats, spool, drain) = (stats.clone(), spool.clone(), handle.status.clone());
        let (endpoint, max) = (config.segment.endpoint.clone(), config.spool.max_bytes);
        Arc::new(move || {
            let drain = drain.lock().unwrap_or_else(|e| e.into_inner()).clone();
            control::live_report(&control::LiveSources {
                stats: &stats,
                drain: &drain,
                spool: &spool,
                endpoint: &endpoint,
                started,
                max_spool_bytes: max,
                notes: &[],
            })
        })
    };
    let socket = control::ControlSocket::bind(&config.control.socket)
        .await
        .with_context(|| {
            format!(
                "cannot open the control socket {}",
                config.control.socket.display()
            )
        })?;
    let control_stop = CancellationToken::new();
    let commands: control::CommandFn = {
        let (spool, catalog, opts) = (spool.clone(), catalog.clone(), mapping_options(&config));
        Arc::new(move |request: &str| {
            crate::deadletter::handle_request(request, &spool, &catalog, &opts)
        })
    };
    let control_task =
        tokio::spawn(socket.run_with_commands(report.clone(), commands, control_stop.clone()));
    let status_task = tokio::spawn(systemd_status(report));

    tokio::select! {
        _ = first_scan_rx => {
            notify_systemd(&[sd_notify::NotifyState::Ready]);
            tracing::info!("ready");
        }
        _ = controls.shutdown.cancelled() => {}
    }
    controls.shutdown.cancelled().await;
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: intake stopped, draining in-flight batches");
    let _ = watch_task.await;
    let _ = ingest_task.await;
    drain_stop.cancel();
    let _ = drain_task.await;
    usr1_task.abort();
    maintenance_task.abort();
    status_task.abort();
    after_task.abort();
    let spool_flush = spool.clone();
    tokio::task::spawn_blocking(move || spool_flush.flush())
        .await?
        .context("cannot flush the spool")?;
    control_stop.cancel();
    let _ = control_task.await;
    let depth = spool.depth()?;
    tracing::info!(
        queued = depth.events,
        delivered = Stats::get(&stats.events_delivered),
        "stopped"
    );
    Ok(())
}

/// A file whose last line is unfinished and unparsable is held this many `settle_secs` after
/// its last change before the line is taken as final.
const PARTIAL_LINE_HOLD_SETTLES: u64 = 10;

/// Reads ready files one at a time, in a blocking thread (sled and file reads block). A file
/// held on an unfinished last line is offered again every `retry_after`.
fn ingest_worker(
    ingestor: Ingestor,
    ready: std::sync::mpsc::Receiver<PathBuf>,
    retry_after: Duration,
    stop: CancellationToken,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut held: Vec<(std::time::Instant, PathBuf)> = Vec::new();
    loop {
        if stop.is_cancelled() {
            return;
        }
        let now = std::time::Instant::now();
        let rel = if let Some(i) = held.iter().position(|(at, _)| *at <= now) {
            held.swap_remove(i).1
        } else {
            let wait = held
                .iter()
                .map(|(at, _)| at.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_millis(500))
                .min(Duration::from_millis(500));
            match ready.recv_timeout(wait) {
                Ok(rel) => rel,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        held.retain(|(_, p)| *p != rel);
        match ingestor.ingest(&rel, &stop) {
            Ok(Outcome::Cancelled) => return,
            Ok(Outcome::Held) => held.push((std::time::Instant::now() + retry_after, rel)),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(path = %rel.display(), error = %e, "spool error while reading a file; it will be read again");
            }
        }
    }
}

/// Deletes or moves a file once every one of its events was delivered (SPEC section 7).
async fn after_ingest_worker(
    spool: Arc<Spool>,
    watch_dir: PathBuf,
    action: AfterIngest,
    move_to: PathBuf,
    mut delivered: mpsc::UnboundedReceiver<u64>,
) {
    while let Some(id) = delivered.recv().await {
        let Ok(Some(rec)) = spool.file(id) else {
            continue;
        };
        if rec.status != FileStatus::Read {
            continue;
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
                let _ = spool.update_file(id, |r| r.status = FileStatus::Done);
            }
            Err(e) => {
                tracing::warn!(path = %rec.path, error = %e, "after_ingest failed; the file stays")
            }
        }
    }
}

/// `STATUS=` for `systemctl status`, refreshed every few seconds (only under systemd).
async fn systemd_status(report: control::ReportFn) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        every.tick().await;
        let report = report.clone();
        if let Ok(line) = tokio::task::spawn_blocking(move || report().one_line()).await {
            notify_systemd(&[sd_notify::NotifyState::Status(&line)]);
        }
    }
}

/// Tells systemd (`Type=notify`) where we are; a no-op without `$NOTIFY_SOCKET`.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(false, state)
    {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// How often the spool is tidied: dedupe entries past the window pruned, and the files
/// compacted when sled has grown far past the live data.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(300);
/// Compaction pauses commits and the drain for the copy, so only when it gives back a lot.
const COMPACT_MIN_DISK_BYTES: u64 = 256 << 20;
const COMPACT_RATIO: u64 = 4;

async fn maintenance(spool: Arc<Spool>, dedupe_window: Duration) {
    let mut every = tokio::time::interval(MAINTENANCE_INTERVAL);
    loop {
        every.tick().await;
        let spool = spool.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<(), crate::spool::Error> {
            let cutoff = crate::spool::now_ms().saturating_sub(dedupe_window.as_millis() as u64);
            let pruned = spool.prune_dedupe(cutoff)?;
            if pruned > 0 {
                tracing::info!(pruned, "dedupe entries older than the window removed");
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
