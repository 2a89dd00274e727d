//! The `leanplum-segment-agent` binary: parse the command line, set up logging, dispatch, and
//! turn the outcome into an exit code (78 for a bad config, so systemd does not restart-loop).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use leanplum_segment_agent::app::{self, Controls};
use leanplum_segment_agent::cli::{CatalogAction, Cli, Command, DeadLetterAction};
use leanplum_segment_agent::config::{self, Config, Purpose};
use leanplum_segment_agent::control::{self, QueryError};
use leanplum_segment_agent::deadletter;
use leanplum_segment_agent::ingest;
use leanplum_segment_agent::leanplum::catalog::Catalog;
use leanplum_segment_agent::spool::{self, Spool};

/// jemalloc instead of glibc's malloc: the agent allocates and frees small buffers at a high
/// rate (parsed records, mapped events, sled's pages), where glibc spent a quarter of the
/// ingest's CPU time (see BENCHMARKS.md). Its options are in `.cargo/config.toml`.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// sysexits.h EX_CONFIG.
const EX_CONFIG: u8 = 78;
/// LSB: program is not running.
const EX_STOPPED: u8 = 3;
/// How long `status` and `dead-letter` wait for the agent's answer.
const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            daemonize,
            pidfile,
            log_file,
        } => run(&config, daemonize.then_some((pidfile, log_file))),
        Command::CheckConfig { config } => check_config(&config),
        Command::DryRun {
            config,
            explain,
            files,
        } => dry_run(config.as_deref(), explain, &files),
        Command::Status { config, json } => status(&config, json),
        Command::DeadLetter { config, action } => dead_letter(&config, &action),
        Command::Catalog { config, action } => catalog(&config, &action),
        Command::Files {
            config,
            json,
            state,
        } => files(&config, json, state.as_deref()),
        Command::Replay { config, paths } => replay(&config, &paths),
    }
}

fn check_config(path: &Path) -> ExitCode {
    init_logging("warn");
    match Config::load_and_validate(path, Purpose::Run) {
        Ok(loaded) => {
            let source = loaded.key.map(|(_, s)| s.to_string()).unwrap_or_default();
            let leanplum = match (&loaded.config.leanplum, &loaded.content_key) {
                (Some(lp), Some((_, s))) => format!(
                    "; Leanplum catalog from {} for app {}, content key from {s}",
                    lp.api_base, lp.app_id
                ),
                _ => String::new(),
            };
            let catalog = loaded
                .catalog
                .map(|f| {
                    format!(
                        "; catalog files: {} messages, {} A/B tests",
                        f.catalog.len_messages(),
                        f.catalog.len_abtests()
                    )
                })
                .unwrap_or_default();
            println!(
                "{}: ok (write key from {source}{leanplum}{catalog})",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EX_CONFIG)
        }
    }
}

fn run(path: &Path, daemon: Option<(PathBuf, Option<PathBuf>)>) -> ExitCode {
    // SIGHUP reads the file again, after --daemonize has changed directory to /.
    let path = &std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let loaded = match Config::load_and_validate(path, Purpose::Run) {
        Ok(l) => l,
        Err(e) => {
            init_logging("info");
            tracing::error!("{e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Some((pidfile, log_file)) = &daemon {
        // Before any thread or runtime exists: fork() keeps only the calling thread.
        let log_file = log_file
            .clone()
            .unwrap_or_else(|| loaded.config.spool.dir.join("agent.log"));
        if let Err(e) = daemonize(pidfile, &log_file, &loaded.config.spool.dir) {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    }
    let (set_log_level, reopen_log) = match &daemon {
        Some((_, log_file)) => {
            let path = log_file
                .clone()
                .unwrap_or_else(|| loaded.config.spool.dir.join("agent.log"));
            match LogFile::open(&path) {
                Ok(file) => {
                    let reopen: app::ReopenLog = {
                        let file = file.clone();
                        std::sync::Arc::new(move || file.reopen())
                    };
                    (
                        init_logging_to(&loaded.config.log, Some(file)),
                        Some(reopen),
                    )
                }
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => (init_logging_to(&loaded.config.log, None), None),
    };
    let (Some((key, source)), Some(catalog_files)) = (loaded.key, loaded.catalog) else {
        return ExitCode::from(EX_CONFIG);
    };
    let spool_dir = loaded.config.spool.dir.clone();
    let content_key = loaded.content_key.map(|(k, s)| {
        tracing::info!(key_source = %s, "Leanplum content key found");
        k
    });
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %path.display(),
        key_source = %source,
        "starting"
    );
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| {
            rt.block_on(async {
                let controls = Controls {
                    set_log_level,
                    reopen_log,
                    ..Controls::default()
                };
                spawn_signal_handlers(&controls)?;
                app::run(
                    loaded.config,
                    key,
                    content_key,
                    catalog_files,
                    path.to_owned(),
                    controls,
                )
                .await
            })
        });
    match result {
        Ok(()) => {
            // Every task and the runtime are gone, so the spool is closed: open it once more
            // so the next start is fast (see `Spool::checkpoint`).
            checkpoint(spool_dir);
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long an exiting agent gives the spool checkpoint: with the drain's 10 s, well inside the
/// unit's `TimeoutStopSec=30`.
const CHECKPOINT_BUDGET: std::time::Duration = std::time::Duration::from_secs(15);

/// [`Spool::checkpoint`] within [`CHECKPOINT_BUDGET`]. Past it the process exits anyway: the
/// checkpoint only reads the closed spool and swaps in sled's snapshot file by a rename, so
/// cutting it short costs nothing but the next start's speed.
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

/// Becomes a classic daemon (double fork, setsid, chdir /, stdin/stdout to /dev/null, stderr to
/// `log_file`, pid written to a locked `pidfile`). A second start is refused here, in the
/// foreground, with a clear message: once forked, its errors would only reach the log.
fn daemonize(pidfile: &Path, log_file: &Path, spool_dir: &Path) -> Result<(), String> {
    if pidfile_is_locked(pidfile) {
        let pid = std::fs::read_to_string(pidfile).unwrap_or_default();
        return Err(format!(
            "already running: {} is locked by pid {}",
            pidfile.display(),
            pid.trim()
        ));
    }
    if Spool::is_locked(spool_dir) {
        return Err(format!(
            "another agent is running on the spool {}",
            spool_dir.display()
        ));
    }
    for dir in [pidfile.parent(), log_file.parent()].into_iter().flatten() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(|e| format!("cannot open the log file {}: {e}", log_file.display()))?;
    daemonize::Daemonize::new()
        .pid_file(pidfile)
        .working_directory("/")
        .umask(0o027)
        .stdout(daemonize::Stdio::devnull())
        .stderr(log)
        .start()
        .map_err(|e| format!("cannot daemonize (pid file {}): {e}", pidfile.display()))
}

/// Whether another process holds the pid file's lock (daemonize takes an flock on it).
fn pidfile_is_locked(pidfile: &Path) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pidfile)
    {
        Ok(f) => matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

/// SIGTERM/SIGINT stop, SIGHUP reloads, SIGUSR1 drains now (SPEC section 9).
fn spawn_signal_handlers(controls: &Controls) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut hup = signal(SignalKind::hangup())?;
    let shutdown = controls.shutdown.clone();
    let drain_now = controls.drain_now.clone();
    let reload = controls.reload.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT received"); shutdown.cancel(); }
                _ = usr1.recv() => { tracing::info!("SIGUSR1 received: draining now"); drain_now.notify_one(); }
                _ = hup.recv() => { tracing::info!("SIGHUP received: reloading the config"); reload.notify_one(); }
            }
        }
    });
    Ok(())
}

fn dry_run(config: Option<&Path>, explain: bool, files: &[PathBuf]) -> ExitCode {
    init_logging("warn");
    let default = Path::new(config::DEFAULT_PATH);
    let config = match config {
        Some(p) => Config::load_and_validate(p, Purpose::DryRun).map(|l| l.config),
        None if default.exists() => {
            Config::load_and_validate(default, Purpose::DryRun).map(|l| l.config)
        }
        None => Ok(Config::default()),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let catalog = match Catalog::load_dir(&config.mapping.catalog_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut err = std::io::stderr();
    match ingest::dry_run(
        files,
        &catalog,
        &app::mapping_options(&config),
        config.watch.max_line_bytes,
        explain,
        &mut out,
        &mut err,
    ) {
        Ok(s) => {
            eprintln!("{}", s.render());
            if s.unreadable_files > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dry-run: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Loads a config for `status` / `dead-letter`, printing the problem on failure.
fn load_for_inspect(path: &Path) -> Result<Config, ExitCode> {
    Config::load_and_validate(path, Purpose::Inspect)
        .map(|l| l.config)
        .map_err(|e| {
            eprintln!("{e}");
            ExitCode::from(EX_CONFIG)
        })
}

/// What answers for the agent: itself over the control socket, or, when none runs, its spool.
enum Answerer {
    Agent,
    Spool(Option<Box<Spool>>),
}

/// Asks the agent (`ask` returns `Err(no daemon)` when nothing answers) and falls back to the
/// spool when no agent runs. An agent that holds the spool but does not answer yet is starting:
/// both are tried again for a few seconds.
fn ask_agent_or_spool<T>(
    config: &Config,
    mut ask: impl FnMut() -> Result<T, QueryError>,
) -> Result<(Option<T>, Answerer), ExitCode> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match ask() {
            Ok(v) => return Ok((Some(v), Answerer::Agent)),
            Err(e) if e.is_no_daemon() => {}
            Err(e) => {
                eprintln!("{e}");
                if let QueryError::Io { source, .. } = &e
                    && source.kind() == std::io::ErrorKind::PermissionDenied
                {
                    eprintln!("hint: run as root or as a member of the agent's group");
                }
                return Err(ExitCode::FAILURE);
            }
        }
        match Spool::open_existing(&config.spool.dir, 8 << 20) {
            Ok(s) => return Ok((None, Answerer::Spool(s.map(Box::new)))),
            Err(spool::Error::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(spool::Error::Locked { path }) => {
                eprintln!(
                    "an agent holds the spool {} but does not answer on its control socket {}",
                    path.display(),
                    config.control.socket.display()
                );
                return Err(ExitCode::FAILURE);
            }
            Err(e) => {
                eprintln!("{e}");
                return Err(ExitCode::FAILURE);
            }
        }
    }
}

fn files(path: &Path, json: bool, state: Option<&str>) -> ExitCode {
    init_logging("warn");
    let config = match load_for_inspect(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let request = match state {
        Some(s) => format!("files {s}"),
        None => "files".to_string(),
    };
    let asked = ask_agent_or_spool(&config, || {
        control::request(&config.control.socket, &request, ASK_TIMEOUT)
    });
    let entries: Vec<control::files::FileEntry> = match asked {
        Ok((Some(answer), _)) => {
            if let Some(err) = answer.get("error") {
                eprintln!("{err}");
                return ExitCode::FAILURE;
            }
            serde_json::from_value(answer["files"].clone()).unwrap_or_default()
        }
        Ok((None, Answerer::Spool(Some(spool)))) => {
            match control::files::list(&spool, None, state) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Ok((None, _)) => Vec::new(),
        Err(code) => return code,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&entries).expect("plain data serializes")
        );
    } else {
        print!("{}", control::files::render(&entries));
    }
    ExitCode::SUCCESS
}

fn replay(path: &Path, paths: &[PathBuf]) -> ExitCode {
    init_logging("warn");
    let config = match load_for_inspect(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut absolute = Vec::with_capacity(paths.len());
    for p in paths {
        match std::fs::canonicalize(p) {
            Ok(a) => absolute.push(a),
            Err(e) => {
                eprintln!("{}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        }
    }
    let request = format!(
        "replay {}",
        serde_json::to_string(&absolute).expect("paths serialize")
    );
    match control::request(&config.control.socket, &request, ASK_TIMEOUT) {
        Ok(answer) => {
            if let Some(err) = answer.get("error") {
                eprintln!("{}", err.as_str().unwrap_or(&err.to_string()));
                return ExitCode::FAILURE;
            }
            let started = answer["started"].as_array().cloned().unwrap_or_default();
            for s in &started {
                println!(
                    "replaying {} (file id {})",
                    s["path"].as_str().unwrap_or(""),
                    s["id"]
                );
            }
            println!(
                "{} files handed to the agent; see `files` for their progress",
                started.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) if e.is_no_daemon() => {
            eprintln!(
                "no agent answers on {}: replay goes through the running agent (start it, e.g. \
                 `systemctl start leanplum-segment-agent`, then replay again)",
                config.control.socket.display()
            );
            ExitCode::from(EX_STOPPED)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn status(path: &Path, json: bool) -> ExitCode {
    init_logging("warn");
    let config = match load_for_inspect(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let asked = ask_agent_or_spool(&config, || {
        control::query_status(&config.control.socket, ASK_TIMEOUT)
    });
    let (report, code) = match asked {
        Ok((Some(r), _)) => (r, ExitCode::SUCCESS),
        Ok((None, Answerer::Spool(Some(spool)))) => {
            match control::offline_report(&spool, &config.segment.endpoint) {
                Ok(r) => (r, ExitCode::from(EX_STOPPED)),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Ok((None, _)) => (
            control::StatusReport {
                state: control::STATE_STOPPED.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                endpoint: config.segment.endpoint.clone(),
                notes: vec![format!("no spool at {} yet", config.spool.dir.display())],
                ..control::StatusReport::default()
            },
            ExitCode::from(EX_STOPPED),
        ),
        Err(code) => return code,
    };
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        print!("{}", report.render_human());
    }
    code
}

fn dead_letter(path: &Path, action: &DeadLetterAction) -> ExitCode {
    init_logging("warn");
    let config = match load_for_inspect(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let ids = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
    let request = match action {
        DeadLetterAction::List { .. } => "dead-letter list".to_string(),
        DeadLetterAction::Show { id, .. } => format!("dead-letter show {id}"),
        DeadLetterAction::Retry { ids: i } => format!("dead-letter retry {}", ids(i)),
        DeadLetterAction::Purge { ids: i } => format!("dead-letter purge {}", ids(i)),
    };
    let asked = ask_agent_or_spool(&config, || {
        control::request(&config.control.socket, &request, ASK_TIMEOUT)
    });
    let answer = match asked {
        Ok((Some(v), _)) => v,
        Ok((None, Answerer::Spool(Some(spool)))) => {
            let catalog = Catalog::load_dir(&config.mapping.catalog_dir).unwrap_or_else(|e| {
                eprintln!("warning: {e}; retrying with an empty catalog");
                Catalog::empty()
            });
            match deadletter::handle_request(
                &request,
                &spool,
                &catalog,
                &app::mapping_options(&config),
                config.watch.max_line_bytes,
            ) {
                Some(v) => v,
                None => return ExitCode::FAILURE,
            }
        }
        Ok((None, _)) => {
            println!("no spool at {} yet", config.spool.dir.display());
            return ExitCode::SUCCESS;
        }
        Err(code) => return code,
    };
    if let Some(err) = answer.get("error") {
        eprintln!("{err}");
        return ExitCode::FAILURE;
    }
    match action {
        DeadLetterAction::List { json, kind, file } => {
            let entries: Vec<deadletter::Entry> =
                serde_json::from_value(answer["entries"].clone()).unwrap_or_default();
            let entries = deadletter::filter(entries, kind.as_deref(), file.as_deref());
            if *json {
                println!(
                    "{}",
                    serde_json::to_string(&entries).expect("plain data serializes")
                );
            } else {
                print!("{}", deadletter::render(&entries));
            }
        }
        DeadLetterAction::Show { json, .. } => {
            let shown: Option<deadletter::Shown> =
                serde_json::from_value(answer["shown"].clone()).ok();
            match (shown, json) {
                (Some(_), true) => println!("{}", answer["shown"]),
                (Some(s), false) => print!("{}", deadletter::render_shown(&s)),
                (None, _) => {
                    eprintln!("unexpected answer: {answer}");
                    return ExitCode::FAILURE;
                }
            }
        }
        DeadLetterAction::Retry { .. } => {
            let o: deadletter::RetryOutcome =
                serde_json::from_value(answer["retry"].clone()).unwrap_or_default();
            println!(
                "{} dead letters requeued, {} quarantined records recovered, {} still bad",
                o.requeued,
                o.recovered,
                o.still_bad.len()
            );
            for (id, why) in o.still_bad {
                println!("  {id}: {why}");
            }
        }
        DeadLetterAction::Purge { .. } => println!("{} entries purged", answer["purged"]),
    }
    ExitCode::SUCCESS
}

fn catalog(path: &Path, action: &CatalogAction) -> ExitCode {
    init_logging("warn");
    let config = match load_for_inspect(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let CatalogAction::Show { id, json } = action;
    let parsed = match leanplum_segment_agent::catalog::parse_id(id.as_deref()) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let request = match id {
        Some(id) => format!("catalog show {id}"),
        None => "catalog show".to_string(),
    };
    let asked = ask_agent_or_spool(&config, || {
        control::request(&config.control.socket, &request, ASK_TIMEOUT)
    });
    let answer = match asked {
        Ok((Some(v), _)) => v,
        Ok((None, answerer)) => {
            let files = match Catalog::load_dir(&config.mapping.catalog_dir) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let spool = match &answerer {
                Answerer::Spool(Some(s)) => Some(s.as_ref()),
                _ => None,
            };
            leanplum_segment_agent::catalog::offline_show(
                files,
                spool,
                config.leanplum.is_some(),
                parsed,
            )
        }
        Err(code) => return code,
    };
    if let Some(err) = answer.get("error") {
        eprintln!("{}", err.as_str().unwrap_or_default());
        return ExitCode::FAILURE;
    }
    if *json {
        println!("{answer}");
    } else {
        print!(
            "{}",
            leanplum_segment_agent::catalog::render_show(&answer, id.as_deref())
        );
    }
    let found = answer["entries"].as_array().is_some_and(|e| !e.is_empty());
    if id.is_some() && !found {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Plain lines on stderr, or structured records to journald when stderr is the journal
/// (systemd sets `$JOURNAL_STREAM` to stderr's device:inode). `RUST_LOG` overrides the
/// configured level. Returns a handle that changes the level later (SIGHUP).
fn init_logging(level: &str) -> Option<app::SetLogLevel> {
    init_logging_to(
        &config::LogConfig {
            level: level.to_owned(),
            ..config::LogConfig::default()
        },
        None,
    )
}

/// The daemon's log file (`run --daemonize --log-file`), written through a handle that SIGHUP
/// replaces with a fresh open of the same path, so logrotate needs no `copytruncate`.
#[derive(Clone)]
struct LogFile {
    path: PathBuf,
    file: std::sync::Arc<std::sync::Mutex<std::fs::File>>,
}

impl LogFile {
    fn open(path: &Path) -> Result<LogFile, String> {
        Ok(LogFile {
            path: path.to_owned(),
            file: std::sync::Arc::new(std::sync::Mutex::new(Self::open_file(path)?)),
        })
    }

    fn open_file(path: &Path) -> Result<std::fs::File, String> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))
    }

    fn reopen(&self) -> Result<(), String> {
        let fresh = Self::open_file(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

/// One formatted event per write (the fmt layer buffers an event and writes it whole).
impl std::io::Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// Logging as configured: journald when stderr is the journal, else `log.format` lines on
/// `file` (the daemon's log file) or stderr.
fn init_logging_to(log: &config::LogConfig, file: Option<LogFile>) -> Option<app::SetLogLevel> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, reload};
    let level = log.level.as_str();
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let filter = from_env
        .as_deref()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let journald = stderr_is_journal()
        .then(|| tracing_journald::layer().ok())
        .flatten();
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match journald {
        Some(j) if file.is_none() => registry.with(j).try_init(),
        _ => {
            let writer = match file {
                Some(f) => BoxMakeWriter::new(move || f.clone()),
                None => BoxMakeWriter::new(std::io::stderr),
            };
            let layer = match log.format {
                config::LogFormat::Text => tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(false)
                    .boxed(),
                config::LogFormat::Json => tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(writer)
                    .boxed(),
            };
            registry.with(layer).try_init()
        }
    };
    installed.ok()?;
    let pinned_by_env = from_env.is_some();
    Some(std::sync::Arc::new(move |level: &str| {
        if pinned_by_env {
            // RUST_LOG wins over the config, at start and on reload alike.
            return Ok(());
        }
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}

/// Whether stderr is connected to the journal (see systemd.exec(5), `$JOURNAL_STREAM`).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}
