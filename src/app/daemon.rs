//! `run --daemonize`: the classic daemon for hosts without systemd (double fork, setsid, chdir
//! /, a locked pid file), and refusing a second start while one runs.

use std::path::Path;

use crate::spool::Spool;

/// Becomes a classic daemon (double fork, setsid, chdir /, stdin/stdout to /dev/null, stderr to
/// `log_file`, pid written to a locked `pidfile`). A second start is refused here, in the
/// foreground, with a clear message: once forked, its errors would only reach the log.
///
/// Call it before any thread or runtime exists: fork() keeps only the calling thread.
pub(crate) fn daemonize(pidfile: &Path, log_file: &Path, spool_dir: &Path) -> Result<(), String> {
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
