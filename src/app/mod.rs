//! Wires the tasks together and owns the order of startup, reload and shutdown:
//!
//! 1. open the spool (moving a damaged one aside) and load the catalog (the files, loaded and
//!    checked with the config, and with a `[leanplum]` section the cached API catalog,
//!    refreshed by a task of its own);
//! 2. start the drain, the control socket, the watcher, the catalog files' watcher
//!    ([`crate::catalog::files::watch`]) and the ingest worker; `READY=1` once the first scan
//!    of the watch directory is done;
//! 3. SIGHUP: load and validate the config again; if it is good, apply what can change live
//!    (Segment endpoint, key, proxy and CA roots, batch limits, timers, retry, log level,
//!    catalog and mapping options) and say which changes need a restart; if not, keep the old
//!    one;
//! 4. on shutdown: stop intake (watcher, ingest between chunks), let the drain finish or
//!    abandon in-flight batches within 10 s, flush the spool, return.

mod systemd;
mod workers;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch as watch_channel};
use tokio_util::sync::CancellationToken;

use crate::catalog::{CatalogService, LoadedFiles};
use crate::config::{Config, Purpose, Secret, WriteKey};
use crate::control;
use crate::ingest::Ingestor;
use crate::leanplum::api::LeanplumApi;
use crate::mapping::{MappingOptions, MappingState, SharedMapping};
use crate::segment::client::Client;
use crate::segment::drain::{Drain, DrainConfig, DrainHandle, DrainSettings};
use crate::spool::{Spool, now_ms};
use crate::stats::Stats;
use crate::transport::Transport;
use crate::watch::{self, WatchHandles, WatchSettings};

/// sled's page cache. The spool is streamed, so a small cache costs little speed.
pub const SPOOL_CACHE_BYTES: u64 = 32 << 20;

/// Changes the log filter of the running process (`log.level` on reload).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
/// Opens the daemon's log file again at its path.
pub type ReopenLog = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What signals ask of a running agent, and what it may change in the process around it.
#[derive(Clone, Default)]
pub struct Controls {
    /// SIGTERM / SIGINT.
    pub shutdown: CancellationToken,
    /// SIGUSR1: skip the backoff wait and rescan.
    pub drain_now: Arc<tokio::sync::Notify>,
    /// SIGHUP: reload the config.
    pub reload: Arc<tokio::sync::Notify>,
    pub set_log_level: Option<SetLogLevel>,
    /// Opens the log file again (`--daemonize --log-file`): SIGHUP after logrotate moved it.
    pub reopen_log: Option<ReopenLog>,
}

pub fn mapping_options(c: &Config) -> MappingOptions {
    MappingOptions {
        unknown_message_channel: c.mapping.unknown_message_channel,
        email_subject: c.mapping.email_subject,
        send_experiment_viewed: c.mapping.send_experiment_viewed,
    }
}

/// The Segment client and the drain's settings. Built again on SIGHUP, so a new endpoint,
/// key, proxy or `ca_file` applies to the next request.
fn drain_config(config: &Config, key: &WriteKey) -> anyhow::Result<DrainConfig> {
    let s = &config.segment;
    let transport = Transport::new(&s.proxy, &s.ca_file)
        .map_err(|e| anyhow::anyhow!("segment.proxy / segment.ca_file: {e}"))?;
    let client = Client::new(
        &s.endpoint,
        key,
        Duration::from_secs(s.request_timeout_secs),
        s.gzip,
        s.max_in_flight(),
        &transport,
    )
    .context("cannot build the HTTP client")?;
    tracing::info!(
        endpoint = %s.endpoint,
        proxy = %transport.route(&s.endpoint),
        extra_ca_roots = transport.extra_roots(),
        "Segment client ready"
    );
    Ok(DrainConfig {
        settings: DrainSettings::from_config(config),
        client,
    })
}

fn log_files_loaded(files: &LoadedFiles) {
    tracing::info!(
        dir = %files.dir.display(),
        messages = files.catalog.len_messages(),
        abtests = files.catalog.len_abtests(),
        "catalog files loaded"
    );
}

/// Runs the agent until `controls.shutdown` is cancelled. `config_path` is read again on
/// SIGHUP. `catalog_files` are the catalog files loaded with the config.
pub async fn run(
    config: Config,
    key: WriteKey,
    content_key: Option<Secret>,
    catalog_files: LoadedFiles,
    config_path: PathBuf,
    controls: Controls,
) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    let spool = open_spool(&config.spool.dir, &controls.shutdown).await?;
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

    let mapping: SharedMapping =
        Arc::new(std::sync::RwLock::new(Arc::new(MappingState::default())));
    let api = match (&config.leanplum, content_key) {
        (Some(lp), Some(key)) => {
            let transport = Transport::new(&lp.proxy, &lp.ca_file)
                .map_err(|e| anyhow::anyhow!("leanplum.proxy / leanplum.ca_file: {e}"))?;
            tracing::info!(
                proxy = %transport.route(&lp.api_base),
                extra_ca_roots = transport.extra_roots(),
                "Leanplum API client ready"
            );
            Some((
                LeanplumApi::new(
                    &lp.api_base,
                    &lp.app_id,
                    key,
                    Duration::from_secs(lp.request_timeout_secs),
                    &transport,
                )
                .context("cannot build the Leanplum API client")?,
                Duration::from_secs(lp.refresh_interval_secs),
            ))
        }
        _ => None,
    };
    log_files_loaded(&catalog_files);
    let (files_seen_tx, files_seen_rx) =
        watch_channel::channel((catalog_files.dir.clone(), catalog_files.stamp.clone()));
    let catalog = CatalogService::new(
        catalog_files.catalog,
        mapping_options(&config),
        Some(spool.clone()),
        api.is_some(),
        mapping.clone(),
    );

    let (drain_config_tx, drain_config_rx) = watch_channel::channel(drain_config(&config, &key)?);
    tracing::info!(endpoint = %config.segment.endpoint, "delivering to Segment");
    let handle = DrainHandle::default();
    let (delivered_tx, delivered_rx) = mpsc::unbounded_channel();
    let drain = Drain::new(
        spool.clone(),
        drain_config_rx,
        stats.clone(),
        handle.clone(),
        Some(delivered_tx.clone()),
    );
    let drain_stop = CancellationToken::new();
    let drain_task = tokio::spawn(drain.run(drain_stop.clone()));

    // The control socket comes before READY: a second agent must fail here, not later.
    let started = std::time::Instant::now();
    let report: control::ReportFn = {
        let (stats, spool, drain) = (stats.clone(), spool.clone(), handle.status.clone());
        let catalog = catalog.clone();
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
                catalog: Some(catalog.status()),
            })
        })
    };
    let holding: Arc<std::sync::Mutex<std::collections::HashSet<std::path::PathBuf>>> =
        Default::default();
    let (replay_tx, replay_rx) = std::sync::mpsc::channel();
    let commands: control::CommandFn = {
        let (spool, mapping, catalog) = (spool.clone(), mapping.clone(), catalog.clone());
        // A `[watch]` change takes effect at the next restart, for retries too.
        let max_line_bytes = config.watch.max_line_bytes;
        let holding = holding.clone();
        Arc::new(move |request: &str| {
            if let Some(answer) = crate::catalog::handle_request(request, &catalog) {
                return Some(answer);
            }
            if request.starts_with("files") || request.starts_with("replay") {
                let waiting = catalog
                    .status()
                    .waiting
                    .into_iter()
                    .flat_map(|w| {
                        let why =
                            format!("waits for the catalog: {} {} ({})", w.kind, w.id, w.reason);
                        w.files.into_iter().map(move |f| (f, why.clone()))
                    })
                    .collect();
                let live = control::files::LiveFiles {
                    holding: holding.clone(),
                    waiting,
                };
                return control::files::handle_request(request, &spool, &live, &replay_tx);
            }
            let m = crate::mapping::current(&mapping);
            crate::deadletter::handle_request(request, &spool, &m.catalog, &m.opts, max_line_bytes)
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
    if let Some(addr) = &config.control.metrics_listen {
        let listener = control::metrics::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        tracing::info!(addr = %addr, "metrics endpoint listening");
        tokio::spawn(control::metrics::serve(
            listener,
            report.clone(),
            stats.clone(),
            control_stop.clone(),
        ));
    }
    let control_task =
        tokio::spawn(socket.run_with_commands(report.clone(), commands, control_stop.clone()));

    let intake_stop = controls.shutdown.child_token();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rescan_now = Arc::new(tokio::sync::Notify::new());
    let (first_scan_tx, first_scan_rx) = tokio::sync::oneshot::channel();
    let watch_task = tokio::spawn(watch::run(
        WatchSettings::from_config(&config.watch)?,
        WatchHandles {
            ready: ready_tx,
            rescan_now: rescan_now.clone(),
            first_scan: Some(first_scan_tx),
        },
        intake_stop.clone(),
    ));

    let catalog_watch_task = tokio::spawn(crate::catalog::files::watch(
        catalog.clone(),
        files_seen_rx,
        Duration::from_secs(config.watch.settle_secs),
        controls.shutdown.child_token(),
    ));

    let ingest_heartbeat = Arc::new(AtomicU64::new(now_ms()));
    let ingestor = Ingestor {
        spool: spool.clone(),
        mapping: mapping.clone(),
        stats: stats.clone(),
        watch_dir: config.watch.dir.clone().unwrap_or_default(),
        max_spool_bytes: config.spool.max_bytes,
        max_line_bytes: config.watch.max_line_bytes,
        drain_wake: handle.wake.clone(),
        partial_line_hold: Duration::from_secs(
            config.watch.settle_secs.max(1) * workers::PARTIAL_LINE_HOLD_SETTLES,
        ),
        holding,
        heartbeat_ms: ingest_heartbeat.clone(),
        files_delivered: Some(delivered_tx.clone()),
        catalog: catalog.api_enabled().then(|| catalog.clone()),
    };
    let retry_after = Duration::from_secs(config.watch.settle_secs.max(1));
    let ingest_stop = intake_stop.clone();
    let ingest_hb = ingest_heartbeat.clone();
    let ingest_task = tokio::task::spawn_blocking(move || {
        workers::ingest_worker(
            ingestor,
            ready_rx,
            replay_rx,
            retry_after,
            ingest_stop,
            ingest_hb,
        )
    });

    let mut background = tokio::task::JoinSet::new();
    background.spawn(workers::after_ingest_worker(
        spool.clone(),
        config.watch.dir.clone().unwrap_or_default(),
        config.watch.after_ingest,
        config.watch.move_to.clone(),
        delivered_rx,
    ));
    background.spawn(workers::maintenance(
        spool.clone(),
        Duration::from_secs(config.spool.dedupe_window_days * 86_400),
        Duration::from_secs(config.spool.keep_bad_days * 86_400),
    ));
    background.spawn(systemd::status_loop(report));
    background.spawn(crate::catalog::parking::run(
        spool.clone(),
        catalog.clone(),
        mapping.clone(),
        stats.clone(),
        handle.wake.clone(),
        controls.shutdown.child_token(),
    ));
    if let Some((api, interval)) = api {
        tracing::info!(api_base = %config.leanplum.as_ref().map(|l| l.api_base.as_str()).unwrap_or(""), "fetching the catalog from Leanplum");
        background.spawn(crate::catalog::run(
            catalog.clone(),
            api,
            interval,
            controls.shutdown.child_token(),
        ));
    }
    background.spawn(systemd::watchdog_loop(vec![
        ("drain", handle.heartbeat_ms.clone()),
        ("ingest", ingest_heartbeat),
    ]));
    {
        // SIGUSR1: skip the backoff wait and rescan.
        let (kick, drain_now) = (handle.kick.clone(), controls.drain_now.clone());
        background.spawn(async move {
            loop {
                drain_now.notified().await;
                kick.notify_one();
                rescan_now.notify_one();
            }
        });
    }

    let mut first_scan = Some(first_scan_rx);
    let mut current = config;
    // Supervision: every task runs until shutdown. One that ends or panics before stops the
    // agent with an error naming it, so systemd restarts a whole process instead of leaving
    // one that reads but never delivers (or the reverse).
    let (mut drain_task, mut ingest_task) = (Some(drain_task), Some(ingest_task));
    let (mut watch_task, mut catalog_watch_task) = (Some(watch_task), Some(catalog_watch_task));
    let mut control_task = Some(control_task);
    let failed: Option<String> = loop {
        tokio::select! {
            r = async { drain_task.as_mut().expect("guarded").await }, if drain_task.is_some() => {
                drain_task = None;
                break Some(task_ended("drain", r));
            }
            r = async { ingest_task.as_mut().expect("guarded").await }, if ingest_task.is_some() => {
                ingest_task = None;
                break Some(task_ended("ingest", r));
            }
            r = async { watch_task.as_mut().expect("guarded").await }, if watch_task.is_some() => {
                watch_task = None;
                break Some(task_ended("watcher", r));
            }
            r = async { catalog_watch_task.as_mut().expect("guarded").await }, if catalog_watch_task.is_some() => {
                catalog_watch_task = None;
                break Some(task_ended("catalog file watcher", r));
            }
            r = async { control_task.as_mut().expect("guarded").await }, if control_task.is_some() => {
                control_task = None;
                break Some(task_ended("control socket", r));
            }
            Some(r) = background.join_next() => break Some(task_ended("background", r)),
            Ok(()) = async { first_scan.as_mut().expect("guarded").await }, if first_scan.is_some() => {
                first_scan = None;
                systemd::notify(&[sd_notify::NotifyState::Ready]);
                tracing::info!("ready");
            }
            _ = controls.reload.notified() => {
                systemd::reloading();
                // First, whatever the new config says: logrotate moved the file and sent HUP.
                if let Some(reopen) = &controls.reopen_log {
                    match reopen() {
                        Ok(()) => tracing::info!("log file reopened"),
                        Err(e) => tracing::error!(error = %e, "cannot reopen the log file; logging on to the old one"),
                    }
                }
                if let Some(new) = reload(&config_path, &current, &controls, &drain_config_tx, &catalog, &files_seen_tx) {
                    current = new;
                }
                systemd::notify(&[sd_notify::NotifyState::Ready]);
            }
            _ = controls.shutdown.cancelled() => break None,
        }
    };
    // A task that ends because shutdown began is not a failure.
    let failed = failed.filter(|_| !controls.shutdown.is_cancelled());
    if let Some(why) = &failed {
        tracing::error!(reason = %why, "a task stopped unexpectedly; shutting down so the service restarts");
        controls.shutdown.cancel();
    }

    systemd::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: intake stopped, draining in-flight batches");
    let shutdown = async {
        for task in [watch_task, catalog_watch_task].into_iter().flatten() {
            let _ = task.await;
        }
        if let Some(task) = ingest_task {
            let _ = task.await;
        }
        drain_stop.cancel();
        if let Some(task) = drain_task {
            let _ = task.await;
        }
        background.abort_all();
        let spool_flush = spool.clone();
        tokio::task::spawn_blocking(move || spool_flush.flush())
            .await?
            .context("cannot flush the spool")?;
        control_stop.cancel();
        if let Some(task) = control_task {
            let _ = task.await;
        }
        anyhow::Ok(())
    };
    // Inside the unit's TimeoutStopSec (30 s), so the exit is ours, not a SIGKILL: what is
    // not flushed by then is re-read or re-sent at the next start.
    match tokio::time::timeout(SHUTDOWN_DEADLINE, shutdown).await {
        Ok(result) => result?,
        Err(_) => anyhow::bail!(
            "shutdown did not finish within {} s; exiting (the spool is crash-safe: what was not \
             flushed is read or sent again at the next start)",
            SHUTDOWN_DEADLINE.as_secs()
        ),
    }
    let depth = spool.depth()?;
    tracing::info!(
        queued = depth.events,
        delivered = Stats::get(&stats.events_delivered),
        "stopped"
    );
    match failed {
        Some(why) => anyhow::bail!("stopped because a task failed: {why}"),
        None => Ok(()),
    }
}

/// A test's way to make a task fail (debug builds only): `LSA_FAILPOINT=<task>` panics the task
/// of that name when it starts, so the supervision can be tested through the real binary.
pub(crate) fn failpoint(task: &str) {
    if cfg!(debug_assertions) && std::env::var("LSA_FAILPOINT").is_ok_and(|t| t == task) {
        panic!("failpoint {task}");
    }
}

/// How long shutdown may take in all: the drain's grace for in-flight requests and the flush,
/// inside the shipped unit's `TimeoutStopSec=30`.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(25);

/// Why a supervised task ended before shutdown: its panic, or that it returned.
fn task_ended<T>(name: &str, r: Result<T, tokio::task::JoinError>) -> String {
    match r {
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let what = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".to_owned());
            format!("the {name} task panicked: {what}")
        }
        Err(e) => format!("the {name} task was cancelled: {e}"),
        Ok(_) => format!("the {name} task ended"),
    }
}

/// Opens the spool; on a full disk, waits for room (logging once) instead of exiting into a
/// restart loop.
async fn open_spool(dir: &Path, shutdown: &CancellationToken) -> anyhow::Result<Spool> {
    let mut logged = false;
    loop {
        let d = dir.to_owned();
        match tokio::task::spawn_blocking(move || Spool::open(&d, SPOOL_CACHE_BYTES)).await? {
            Ok(s) => return Ok(s),
            Err(e) if e.is_disk_full() => {
                if !logged {
                    tracing::error!(error = %e, "disk full: cannot open the spool; waiting for free space");
                    logged = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => anyhow::bail!("stopped while waiting for disk space"),
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
            Err(e) => return Err(e).context("cannot open the spool"),
        }
    }
}

/// SIGHUP. Returns the new config when it was valid and applied; on any problem logs it once
/// and keeps everything as it was.
fn reload(
    path: &Path,
    old: &Config,
    controls: &Controls,
    drain_tx: &watch_channel::Sender<DrainConfig>,
    catalog: &CatalogService,
    files_seen: &watch_channel::Sender<crate::catalog::files::FilesSeen>,
) -> Option<Config> {
    let loaded = match Config::load_and_validate(path, Purpose::Run) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("reload refused, the running config stays: {e}");
            return None;
        }
    };
    let new = loaded.config;
    let (key, _) = loaded.key?;
    let files = loaded.catalog?;
    // Build everything first, so a failure changes nothing.
    let drain = match drain_config(&new, &key) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("reload refused, the running config stays: {e:#}");
            return None;
        }
    };
    if let Some(set) = &controls.set_log_level
        && let Err(e) = set(&new.log.level)
    {
        tracing::error!("reload refused, the running config stays: log.level: {e}");
        return None;
    }
    let _ = drain_tx.send(drain);
    // The API catalog is fetched again too.
    log_files_loaded(&files);
    catalog.reload(files.catalog, mapping_options(&new));
    // The files' watcher follows a moved catalog_dir, and need not read what was just read.
    files_seen.send_replace((files.dir, files.stamp));
    let restart_needed: Vec<&str> = [
        ("watch", old.watch != new.watch),
        ("spool", old.spool != new.spool),
        ("control", old.control != new.control),
        ("leanplum", old.leanplum != new.leanplum),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(section, _)| section)
    .collect();
    if restart_needed.is_empty() {
        tracing::info!("config reloaded");
    } else {
        tracing::warn!(
            sections = ?restart_needed,
            "config reloaded; changes in these sections take effect at the next restart"
        );
    }
    Some(new)
}
