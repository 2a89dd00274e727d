//! The `leanplum-segment-agent` binary: parse the command line, set up logging, dispatch, and
//! turn the outcome into an exit code (78 for a bad config, so systemd does not restart-loop).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use leanplum_segment_agent::app::{self, Controls};
use leanplum_segment_agent::cli::{Cli, Command};
use leanplum_segment_agent::config::{self, Config, Purpose};
use leanplum_segment_agent::ingest;
use leanplum_segment_agent::leanplum::catalog::Catalog;

/// sysexits.h EX_CONFIG.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckConfig { config } => check_config(&config),
        Command::DryRun { config, files } => dry_run(config.as_deref(), &files),
    }
}

fn check_config(path: &Path) -> ExitCode {
    init_logging("warn");
    match Config::load_and_validate(path, Purpose::Run) {
        Ok(loaded) => {
            let source = loaded.key.map(|(_, s)| s.to_string()).unwrap_or_default();
            println!("{}: ok (write key from {source})", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EX_CONFIG)
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let loaded = match Config::load_and_validate(path, Purpose::Run) {
        Ok(l) => l,
        Err(e) => {
            init_logging("info");
            tracing::error!("{e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    init_logging(&loaded.config.log.level);
    let Some((key, source)) = loaded.key else {
        return ExitCode::from(EX_CONFIG);
    };
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
                let controls = Controls::default();
                spawn_signal_handlers(&controls)?;
                app::run(loaded.config, key, controls).await
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM/SIGINT stop; SIGUSR1 drains now; SIGHUP is logged and ignored (reload is not
/// implemented yet; ignoring it beats the default action, which kills the process).
fn spawn_signal_handlers(controls: &Controls) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut hup = signal(SignalKind::hangup())?;
    let shutdown = controls.shutdown.clone();
    let drain_now = controls.drain_now.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT received"); shutdown.cancel(); }
                _ = usr1.recv() => { tracing::info!("SIGUSR1 received: draining now"); drain_now.notify_one(); }
                _ = hup.recv() => { tracing::warn!("SIGHUP received: config reload is not supported yet; restart to apply changes"); }
            }
        }
    });
    Ok(())
}

fn dry_run(config: Option<&Path>, files: &[PathBuf]) -> ExitCode {
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
        &mut out,
        &mut err,
    ) {
        Ok(s) => {
            eprintln!(
                "{} events, {} duplicates skipped, {} bad records, {} unreadable files",
                s.events, s.duplicates, s.bad_records, s.unreadable_files
            );
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

/// Plain lines on stderr; `RUST_LOG` overrides the configured level.
fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
