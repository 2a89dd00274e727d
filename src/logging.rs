//! Logging: plain lines on stderr, `log.format` lines on the daemon's log file, or structured
//! records to journald when stderr is the journal. `RUST_LOG` overrides the configured level.
//! The handles it returns change the level later and reopen the log file (both on SIGHUP).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::app::SetLogLevel;
use crate::config::{LogConfig, LogFormat};

/// Logging for a short-lived command: `level` lines on stderr (or the journal).
pub(crate) fn init(level: &str) {
    init_to(
        &LogConfig {
            level: level.to_owned(),
            ..LogConfig::default()
        },
        None,
    );
}

/// The daemon's log file (`run --daemonize --log-file`), written through a handle that SIGHUP
/// replaces with a fresh open of the same path, so logrotate needs no `copytruncate`.
#[derive(Clone)]
pub(crate) struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<std::fs::File>>,
}

impl LogFile {
    pub(crate) fn open(path: &Path) -> Result<LogFile, String> {
        Ok(LogFile {
            path: path.to_owned(),
            file: Arc::new(Mutex::new(Self::open_file(path)?)),
        })
    }

    fn open_file(path: &Path) -> Result<std::fs::File, String> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))
    }

    pub(crate) fn reopen(&self) -> Result<(), String> {
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
/// `file` (the daemon's log file) or stderr. Returns a handle that changes the level later,
/// `None` if a subscriber was installed already.
pub(crate) fn init_to(log: &LogConfig, file: Option<LogFile>) -> Option<SetLogLevel> {
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
                LogFormat::Text => tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(false)
                    .boxed(),
                LogFormat::Json => tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(writer)
                    .boxed(),
            };
            registry.with(layer).try_init()
        }
    };
    installed.ok()?;
    let pinned_by_env = from_env.is_some();
    Some(Arc::new(move |level: &str| {
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
