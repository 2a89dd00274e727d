//! `run`: the agent itself, in the foreground (what systemd starts) or as a classic daemon.
//! The service is [`crate::app::serve`]; this is what comes before it: the config, the fork,
//! the logging.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{CommandError, Outcome};
use crate::app::{self, ReopenLog, Startup};
use crate::config::{Config, Purpose};
use crate::logging::{self, LogFile};

/// `daemon` is `--daemonize`'s pid file and log file.
pub(super) fn run(
    path: &Path,
    daemon: Option<(PathBuf, Option<PathBuf>)>,
) -> Result<Outcome, CommandError> {
    // SIGHUP reads the file again, after --daemonize has changed directory to /.
    let path = &std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let loaded = Config::load_and_validate(path, Purpose::Run)
        .map_err(|e| CommandError::Config(e.to_string()))?;
    let log_file = daemon.map(|(pidfile, log_file)| {
        let log_file = log_file.unwrap_or_else(|| loaded.config.spool.dir.join("agent.log"));
        (pidfile, log_file)
    });
    if let Some((pidfile, log_file)) = &log_file {
        // Before any thread or runtime exists: fork() keeps only the calling thread.
        app::daemon::daemonize(pidfile, log_file, &loaded.config.spool.dir)
            .map_err(CommandError::failed)?;
    }
    let (set_log_level, reopen_log) = match log_file {
        Some((_, path)) => {
            let file = LogFile::open(&path).map_err(CommandError::failed)?;
            let reopen: ReopenLog = {
                let file = file.clone();
                Arc::new(move || file.reopen())
            };
            (
                logging::init_to(&loaded.config.log, Some(file)),
                Some(reopen),
            )
        }
        None => (logging::init_to(&loaded.config.log, None), None),
    };
    let (Some((key, source)), Some(catalog_files)) = (loaded.key, loaded.catalog) else {
        // `Purpose::Run` resolves both or fails.
        return Err(CommandError::Config(
            "the write key or the catalog files were not loaded".into(),
        ));
    };
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
    app::serve(
        Startup {
            config: loaded.config,
            key,
            content_key,
            catalog_files,
            config_path: path.to_owned(),
        },
        set_log_level,
        reopen_log,
    )?;
    Ok(Outcome::Success)
}
