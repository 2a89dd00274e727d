//! The agent's life in three steps, which [`serve`] runs in order:
//!
//! 1. **start** (`start`): open the spool (moving a damaged one aside) and load the catalog
//!    (the files, loaded and checked with the config, and with a `[leanplum]` section the
//!    cached API catalog, refreshed by a task of its own); then start the drain, the control
//!    socket (before `READY`: a second agent fails here), the watcher, the catalog files'
//!    watcher ([`crate::catalog::files::watch`]), the ingest worker and the background tasks.
//! 2. **run** (`Agent::supervise`), until SIGTERM / SIGINT or a task ends: `READY=1` once the
//!    first scan of the watch directory is done; SIGHUP loads and validates the config again
//!    and, if it is good, applies what can change live (Segment endpoint, key, proxy and CA
//!    roots, batch limits, timers, retry, log level, catalog and mapping options) and says
//!    which changes need a restart, else keeps the old one; `WATCHDOG=1` is sent from this
//!    loop only, while every task runs and the drain and ingest loops go round. A task that
//!    ends or panics stops the agent with an error naming it, so systemd restarts a whole
//!    process instead of leaving one that reads but never delivers (or the reverse).
//! 3. **shutdown** (`Agent::shutdown`): stop intake (watchers, ingest between chunks), let the
//!    drain finish or abandon in-flight batches within 10 s, flush the spool, close the
//!    control socket, all within [`SHUTDOWN_DEADLINE`]; then, with the runtime gone (its
//!    blocking threads given [`RUNTIME_STOP`]), checkpoint the spool for a fast next start.
//!
//! Blocking work (the spool, files, config and catalog loads, TLS roots) runs on blocking
//! threads, never on the async workers that the drain, the control socket and this
//! supervision share.
//!
//! - `answers.rs`: the control socket's one dispatcher, [`crate::control::Request`] to
//!   [`crate::control::Answer`].
//! - `daemon.rs`: `run --daemonize` (double fork, pid file).
//! - `systemd.rs`: the notify protocol and the watchdog.
//! - `workers.rs`: the ingest, after-ingest and maintenance workers.

mod answers;
pub(crate) mod daemon;
mod systemd;
mod workers;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::Poll;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch as watch_channel};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::catalog::files::FilesSeen;
use crate::catalog::{CatalogService, LoadedFiles};
use crate::clock::now_ms;
use crate::config::{Config, Purpose, Secret, WriteKey};
use crate::control::{self, signals::SignalTargets};
use crate::ingest::Ingestor;
use crate::leanplum::api::LeanplumApi;
use crate::mapping::{MappingOptions, MappingState, SharedMapping};
use crate::segment::client::Client;
use crate::segment::drain::{Drain, DrainConfig, DrainHandle, DrainSettings};
use crate::spool::Spool;
use crate::stats::Stats;
use crate::transport::Transport;
use crate::watch::{self, WatchHandles, WatchSettings};

/// sled's page cache. The spool is streamed, so a small cache costs little speed.
pub(crate) const SPOOL_CACHE_BYTES: u64 = 32 << 20;

/// Changes the log filter of the running process (`log.level` on reload).
pub(crate) type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
/// Opens the daemon's log file again at its path.
pub(crate) type ReopenLog = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What signals ask of a running agent, and what it may change in the process around it.
#[derive(Clone, Default)]
pub(crate) struct Controls {
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

pub(crate) fn mapping_options(c: &Config) -> MappingOptions {
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

/// What `run` hands the agent: the config as loaded and checked, its secrets, the catalog
/// files loaded with it.
pub(crate) struct Startup {
    pub config: Config,
    pub key: WriteKey,
    pub content_key: Option<Secret>,
    pub catalog_files: LoadedFiles,
    /// Read again on SIGHUP.
    pub config_path: PathBuf,
}

/// The service of `run`: the async runtime, the signal handlers, the agent's three steps and,
/// once the runtime is gone, the spool checkpoint. `Err` when it could not start, or stopped
/// because a task failed or shutdown overran its deadline.
pub(crate) fn serve(
    startup: Startup,
    set_log_level: Option<SetLogLevel>,
    reopen_log: Option<ReopenLog>,
) -> anyhow::Result<()> {
    let spool_dir = startup.config.spool.dir.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(async {
        let controls = Controls {
            set_log_level,
            reopen_log,
            ..Controls::default()
        };
        control::signals::spawn_handlers(SignalTargets {
            shutdown: controls.shutdown.clone(),
            drain_now: controls.drain_now.clone(),
            reload: controls.reload.clone(),
        })
        .context("cannot install the signal handlers")?;
        run(startup, controls).await
    });
    // Dropping the runtime would wait for every blocking thread, however long (a compaction, a
    // read stuck in the kernel), and hold the exit past the unit's TimeoutStopSec.
    rt.shutdown_timeout(RUNTIME_STOP);
    result?;
    // Every task and the runtime are gone, so the spool is closed: open it once more so the
    // next start is fast (see `Spool::checkpoint`).
    checkpoint(spool_dir);
    Ok(())
}

/// Runs the agent until `controls.shutdown` is cancelled or a task fails: start, run, shutdown.
async fn run(startup: Startup, controls: Controls) -> anyhow::Result<()> {
    let mut agent = start(startup, &controls).await?;
    let failed = agent.supervise(&controls).await;
    agent.shutdown(&controls, failed).await
}

/// A task the agent supervises: it runs until shutdown, and one that ends before is a failure
/// named by `name`.
struct Task {
    name: &'static str,
    /// `None` once it has ended (and been reported).
    handle: Option<JoinHandle<()>>,
}

impl Task {
    fn spawn(name: &'static str, task: impl Future<Output = ()> + Send + 'static) -> Task {
        Task {
            name,
            handle: Some(tokio::spawn(task)),
        }
    }

    fn blocking(name: &'static str, task: impl FnOnce() + Send + 'static) -> Task {
        Task {
            name,
            handle: Some(tokio::task::spawn_blocking(task)),
        }
    }

    /// Waits for the task to end (at shutdown, after its stop was asked for).
    async fn join(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }

    fn abort(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// Every supervised task, by the order shutdown stops them in.
struct Tasks {
    /// The watcher, the catalog files' watcher, then the ingest worker: stopped first.
    intake: Vec<Task>,
    drain: Task,
    /// Aborted once the drain is done.
    background: Vec<Task>,
    /// The control socket and the metrics endpoint: they answer until the end.
    control: Vec<Task>,
}

impl Tasks {
    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Task> {
        self.intake
            .iter_mut()
            .chain(std::iter::once(&mut self.drain))
            .chain(self.background.iter_mut())
            .chain(self.control.iter_mut())
    }

    /// Why the first task to end ended; pending while they all run.
    async fn first_ended(&mut self) -> String {
        std::future::poll_fn(|cx| {
            for task in self.iter_mut() {
                if let Some(h) = task.handle.as_mut()
                    && let Poll::Ready(r) = Pin::new(h).poll(cx)
                {
                    task.handle = None;
                    return Poll::Ready(task_ended(task.name, r));
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// A started agent: its tasks and what the run and shutdown steps need.
struct Agent {
    tasks: Tasks,
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    /// The config in force (replaced by a good reload).
    config: Config,
    reloader: Arc<Reloader>,
    first_scan: Option<oneshot::Receiver<()>>,
    watchdog: Option<systemd::Watchdog>,
    drain_stop: CancellationToken,
    control_stop: CancellationToken,
}

/// Runs blocking work (the spool, files, TLS roots) on a blocking thread, off the async
/// workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("a blocking step of the agent failed")
}

/// The Leanplum content API client and its refresh interval, with a `[leanplum]` section and
/// a content key.
fn leanplum_api(
    config: &Config,
    content_key: Option<Secret>,
) -> anyhow::Result<Option<(LeanplumApi, Duration)>> {
    let (Some(lp), Some(key)) = (&config.leanplum, content_key) else {
        return Ok(None);
    };
    let transport = Transport::new(&lp.proxy, &lp.ca_file)
        .map_err(|e| anyhow::anyhow!("leanplum.proxy / leanplum.ca_file: {e}"))?;
    tracing::info!(
        proxy = %transport.route(&lp.api_base),
        extra_ca_roots = transport.extra_roots(),
        "Leanplum API client ready"
    );
    let api = LeanplumApi::new(
        &lp.api_base,
        &lp.app_id,
        key,
        Duration::from_secs(lp.request_timeout_secs),
        &transport,
    )
    .context("cannot build the Leanplum API client")?;
    Ok(Some((api, Duration::from_secs(lp.refresh_interval_secs))))
}

/// Step 1: opens the spool, loads the catalog and starts every task. An error here stops the
/// agent before `READY`.
async fn start(startup: Startup, controls: &Controls) -> anyhow::Result<Agent> {
    let Startup {
        config,
        key,
        content_key,
        catalog_files,
        config_path,
    } = startup;
    let stats = Arc::new(Stats::default());
    let spool = Arc::new(open_spool(&config.spool.dir, &controls.shutdown).await?);
    if let Some(note) = spool.recovered() {
        tracing::warn!("{note}");
    }
    let depth = blocking({
        let spool = spool.clone();
        move || spool.queue().depth()
    })
    .await??;
    tracing::info!(
        path = %spool.path().display(),
        events = depth.events,
        bytes = depth.bytes,
        "spool open"
    );

    let mapping: SharedMapping =
        Arc::new(std::sync::RwLock::new(Arc::new(MappingState::default())));
    let api = blocking({
        let config = config.clone();
        move || leanplum_api(&config, content_key)
    })
    .await??;
    log_files_loaded(&catalog_files);
    let (files_seen_tx, files_seen_rx) =
        watch_channel::channel((catalog_files.dir.clone(), catalog_files.stamp.clone()));
    let catalog = blocking({
        let (opts, spool, api_enabled) = (mapping_options(&config), spool.clone(), api.is_some());
        let (files, mapping) = (catalog_files.catalog, mapping.clone());
        move || CatalogService::new(files, opts, Some(spool), api_enabled, mapping)
    })
    .await?;

    let first_drain_config = blocking({
        let (config, key) = (config.clone(), key.clone());
        move || drain_config(&config, &key)
    })
    .await??;
    let (drain_config_tx, drain_config_rx) = watch_channel::channel(first_drain_config);
    tracing::info!(endpoint = %config.segment.endpoint, "delivering to Segment");
    let handle = DrainHandle::default();
    // Alive from the start, as the ingest's: the watchdog's first check may come before the
    // drain's first round.
    handle
        .heartbeat_ms
        .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    let (delivered_tx, delivered_rx) = mpsc::unbounded_channel();
    let drain = Drain::new(
        spool.clone(),
        drain_config_rx,
        stats.clone(),
        handle.clone(),
        Some(delivered_tx.clone()),
    );
    let drain_stop = CancellationToken::new();
    let drain_task = Task::spawn("drain", drain.run(drain_stop.clone()));

    // The control socket comes before READY: a second agent must fail here, not later.
    let started = std::time::Instant::now();
    let report: control::ReportFn = {
        let (stats, spool, drain) = (stats.clone(), spool.clone(), handle.status.clone());
        let catalog = catalog.clone();
        let (endpoint, max) = (config.segment.endpoint.clone(), config.spool.max_bytes);
        let parked = crate::catalog::parking::SummaryMemo::default();
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
                parked: &parked,
            })
        })
    };
    let holding: Arc<std::sync::Mutex<std::collections::HashSet<std::path::PathBuf>>> =
        Default::default();
    let (replay_tx, replay_rx) = std::sync::mpsc::channel();
    let answers = answers::Answers {
        report: report.clone(),
        spool: spool.clone(),
        catalog: catalog.clone(),
        mapping: mapping.clone(),
        holding: holding.clone(),
        replay: replay_tx,
        max_line_bytes: config.watch.max_line_bytes,
    };
    let handler: control::Handler = Arc::new(move |request| answers.answer(request));
    let socket = control::ControlSocket::bind(&config.control.socket)
        .await
        .with_context(|| {
            format!(
                "cannot open the control socket {}",
                config.control.socket.display()
            )
        })?;
    let control_stop = CancellationToken::new();
    let mut control_tasks = vec![Task::spawn(
        "control socket",
        socket.run(handler, control_stop.clone()),
    )];
    if let Some(addr) = &config.control.metrics_listen {
        let listener = control::metrics::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        tracing::info!(addr = %addr, "metrics endpoint listening");
        control_tasks.push(Task::spawn(
            "metrics endpoint",
            control::metrics::serve(
                listener,
                report.clone(),
                stats.clone(),
                control_stop.clone(),
            ),
        ));
    }

    let intake_stop = controls.shutdown.child_token();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rescan_now = Arc::new(tokio::sync::Notify::new());
    let (first_scan_tx, first_scan_rx) = oneshot::channel();
    let watch_task = Task::spawn(
        "watcher",
        watch::run(
            WatchSettings::from_config(&config.watch)?,
            WatchHandles {
                ready: ready_tx,
                rescan_now: rescan_now.clone(),
                first_scan: Some(first_scan_tx),
            },
            intake_stop.clone(),
        ),
    );

    let catalog_watch_task = Task::spawn(
        "catalog file watcher",
        crate::catalog::files::watch(
            catalog.clone(),
            files_seen_rx,
            Duration::from_secs(config.watch.settle_secs),
            controls.shutdown.child_token(),
        ),
    );

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
        ingest_threads: config.watch.ingest_threads(),
    };
    let retry_after = Duration::from_secs(config.watch.settle_secs.max(1));
    let ingest_task = Task::blocking("ingest", {
        let (stop, heartbeat) = (intake_stop.clone(), ingest_heartbeat.clone());
        move || workers::ingest_worker(ingestor, ready_rx, replay_rx, retry_after, stop, heartbeat)
    });

    let mut background = vec![
        Task::spawn(
            "after-ingest",
            workers::after_ingest_worker(
                spool.clone(),
                config.watch.dir.clone().unwrap_or_default(),
                config.watch.after_ingest,
                config.watch.move_to.clone(),
                delivered_rx,
            ),
        ),
        Task::spawn(
            "spool maintenance",
            workers::maintenance(
                spool.clone(),
                Duration::from_secs(config.spool.dedupe_window_days * 86_400),
                Duration::from_secs(config.spool.keep_bad_days * 86_400),
            ),
        ),
        Task::spawn("systemd status", systemd::status_loop(report)),
        Task::spawn(
            "parking",
            crate::catalog::parking::run(
                spool.clone(),
                catalog.clone(),
                mapping.clone(),
                stats.clone(),
                handle.wake.clone(),
                controls.shutdown.child_token(),
            ),
        ),
    ];
    if let Some((api, interval)) = api {
        tracing::info!(api_base = %config.leanplum.as_ref().map(|l| l.api_base.as_str()).unwrap_or(""), "fetching the catalog from Leanplum");
        background.push(Task::spawn(
            "catalog refresh",
            crate::catalog::run(
                catalog.clone(),
                api,
                interval,
                controls.shutdown.child_token(),
            ),
        ));
    }
    {
        // SIGUSR1: skip the backoff wait and rescan.
        let (kick, drain_now) = (handle.kick.clone(), controls.drain_now.clone());
        background.push(Task::spawn("SIGUSR1 forwarder", async move {
            loop {
                drain_now.notified().await;
                kick.notify_one();
                rescan_now.notify_one();
            }
        }));
    }

    Ok(Agent {
        tasks: Tasks {
            intake: vec![watch_task, catalog_watch_task, ingest_task],
            drain: drain_task,
            background,
            control: control_tasks,
        },
        spool,
        stats,
        config,
        reloader: Arc::new(Reloader {
            path: config_path,
            set_log_level: controls.set_log_level.clone(),
            drain_tx: drain_config_tx,
            catalog,
            files_seen: files_seen_tx,
        }),
        first_scan: Some(first_scan_rx),
        watchdog: systemd::Watchdog::from_env(vec![
            ("drain", handle.heartbeat_ms.clone()),
            ("ingest", ingest_heartbeat),
        ]),
        drain_stop,
        control_stop,
    })
}

impl Agent {
    /// Step 2: answers signals until shutdown is asked for (`None`) or a task ends (`Some`,
    /// why). The task arms come first (`biased`), so the watchdog is never pinged in the turn
    /// a task ended in.
    async fn supervise(&mut self, controls: &Controls) -> Option<String> {
        loop {
            tokio::select! {
                biased;
                why = self.tasks.first_ended() => break Some(why),
                _ = controls.shutdown.cancelled() => break None,
                Ok(()) = async { self.first_scan.as_mut().expect("guarded").await }, if self.first_scan.is_some() => {
                    self.first_scan = None;
                    systemd::notify(&[sd_notify::NotifyState::Ready]);
                    tracing::info!("ready");
                }
                _ = controls.reload.notified() => self.reload(controls).await,
                () = systemd::Watchdog::tick(&mut self.watchdog) => {
                    if let Some(w) = &mut self.watchdog {
                        w.ping_if_alive();
                    }
                }
            }
        }
    }

    /// SIGHUP: the log file reopened, then the config loaded, checked and applied (off the
    /// async workers: it reads files and builds TLS clients).
    async fn reload(&mut self, controls: &Controls) {
        systemd::reloading();
        // First, whatever the new config says: logrotate moved the file and sent HUP.
        if let Some(reopen) = &controls.reopen_log {
            match reopen() {
                Ok(()) => tracing::info!("log file reopened"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reopen the log file; logging on to the old one")
                }
            }
        }
        let (reloader, old) = (self.reloader.clone(), self.config.clone());
        match blocking(move || reloader.apply(&old)).await {
            Ok(Some(new)) => self.config = new,
            Ok(None) => {}
            Err(e) => tracing::error!("reload refused, the running config stays: {e:#}"),
        }
        systemd::notify(&[sd_notify::NotifyState::Ready]);
    }

    /// Step 3: stops the tasks in order within [`SHUTDOWN_DEADLINE`] and flushes the spool.
    /// `failed` is why supervision ended, if a task did.
    async fn shutdown(self, controls: &Controls, failed: Option<String>) -> anyhow::Result<()> {
        // A task that ends because shutdown began is not a failure.
        let failed = failed.filter(|_| !controls.shutdown.is_cancelled());
        if let Some(why) = &failed {
            tracing::error!(reason = %why, "a task stopped unexpectedly; shutting down so the service restarts");
            controls.shutdown.cancel();
        }
        systemd::notify(&[sd_notify::NotifyState::Stopping]);
        tracing::info!("shutting down: intake stopped, draining in-flight batches");
        let Agent {
            mut tasks,
            spool,
            stats,
            drain_stop,
            control_stop,
            ..
        } = self;
        let steps = async {
            for task in &mut tasks.intake {
                task.join().await;
            }
            drain_stop.cancel();
            tasks.drain.join().await;
            for task in &mut tasks.background {
                task.abort();
            }
            let spool = spool.clone();
            blocking(move || spool.flush())
                .await?
                .context("cannot flush the spool")?;
            control_stop.cancel();
            for task in &mut tasks.control {
                task.join().await;
            }
            anyhow::Ok(())
        };
        // Inside the unit's TimeoutStopSec (30 s), so the exit is ours, not a SIGKILL: what is
        // not flushed by then is re-read or re-sent at the next start.
        match tokio::time::timeout(SHUTDOWN_DEADLINE, steps).await {
            Ok(result) => result?,
            Err(_) => anyhow::bail!(
                "shutdown did not finish within {} s; exiting (the spool is crash-safe: what was \
                 not flushed is read or sent again at the next start)",
                SHUTDOWN_DEADLINE.as_secs()
            ),
        }
        let depth = blocking(move || spool.queue().depth()).await??;
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
}

/// How long the runtime's blocking threads get once the agent has stopped.
const RUNTIME_STOP: Duration = Duration::from_secs(2);

/// How long an exiting agent gives the spool checkpoint: with the drain's 10 s, well inside the
/// unit's `TimeoutStopSec=30`.
const CHECKPOINT_BUDGET: Duration = Duration::from_secs(15);

/// [`Spool::checkpoint`] within [`CHECKPOINT_BUDGET`], on a thread of its own (the runtime is
/// gone). Past it the process exits anyway: the checkpoint only reads the closed spool and
/// swaps in sled's snapshot file by a rename, so cutting it short costs nothing but the next
/// start's speed.
fn checkpoint(spool_dir: PathBuf) {
    let t = std::time::Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Spool::checkpoint(&spool_dir));
    });
    match rx.recv_timeout(CHECKPOINT_BUDGET) {
        Ok(Ok(())) => tracing::info!(
            took_ms = t.elapsed().as_millis() as u64,
            "spool checkpointed for a fast start"
        ),
        Ok(Err(e)) => tracing::warn!(
            error = %e,
            "cannot checkpoint the spool; the next start reads the log written since this one"
        ),
        Err(_) => tracing::warn!(
            "spool checkpoint not done within 15 s; exiting without it; the next start reads the log written since this one"
        ),
    }
}

/// A test's way to make a task fail (debug builds only): `LSA_FAILPOINT=<task>` panics the task
/// of that name when it starts, so the supervision can be tested through the real binary.
pub(crate) fn failpoint(task: &str) {
    if cfg!(debug_assertions) && std::env::var("LSA_FAILPOINT").is_ok_and(|t| t == task) {
        panic!("failpoint {task}");
    }
}

/// A test's way to make a loop hang (debug builds only): `LSA_FAILPOINT=<task>-stall` stops
/// the loop of that name from going round, without its heartbeat, until `stop`;
/// `LSA_FAILPOINT=<task>-hang` for good, `stop` or not. So the watchdog's reaction to a hung
/// loop, and the shutdown deadline, can be tested through the real binary. Blocks: for the
/// loops on blocking threads.
pub(crate) fn failpoint_stall(task: &str, stop: &CancellationToken) {
    if !cfg!(debug_assertions) {
        return;
    }
    let Ok(point) = std::env::var("LSA_FAILPOINT") else {
        return;
    };
    let hang = point.strip_suffix("-hang") == Some(task);
    if !hang && point.strip_suffix("-stall") != Some(task) {
        return;
    }
    tracing::warn!("failpoint {point}: the {task} loop stops going round");
    while hang || !stop.is_cancelled() {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long shutdown may take in all: the drain's grace for in-flight requests and the flush,
/// inside the shipped unit's `TimeoutStopSec=30`.
pub(crate) const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(25);

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

/// What a SIGHUP changes in the running agent.
struct Reloader {
    path: PathBuf,
    set_log_level: Option<SetLogLevel>,
    drain_tx: watch_channel::Sender<DrainConfig>,
    catalog: Arc<CatalogService>,
    files_seen: watch_channel::Sender<FilesSeen>,
}

impl Reloader {
    /// Loads the config again; returns it when it was valid and applied. On any problem logs
    /// it once and keeps everything as it was. Blocking.
    fn apply(&self, old: &Config) -> Option<Config> {
        let loaded = match Config::load_and_validate(&self.path, Purpose::Run) {
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
        if let Some(set) = &self.set_log_level
            && let Err(e) = set(&new.log.level)
        {
            tracing::error!("reload refused, the running config stays: log.level: {e}");
            return None;
        }
        let _ = self.drain_tx.send(drain);
        // The API catalog is fetched again too.
        log_files_loaded(&files);
        self.catalog.reload(files.catalog, mapping_options(&new));
        // The files' watcher follows a moved catalog_dir, and need not read what was just read.
        self.files_seen.send_replace((files.dir, files.stamp));
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
}
