//! The agent as a child process: one environment scrub ([`scrubbed_command`]), one way to
//! spawn it with its logs beside the config ([`Agent::spawn`]), one signal wrapper
//! ([`kill_pid`]).

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::{BIN, PATIENCE, STOP_TIMEOUT, read_lossy, wait_until};

/// A `Command` for `program` (the agent, or e.g. `sh` wrapping it) with an environment that
/// cannot change what a test means:
/// no `RUST_LOG` (the config's level applies), no key from the environment, no systemd
/// variables (which would send logs to journald or notifications to a foreign socket), and no
/// proxy variables.
pub fn scrubbed_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "RUST_LOG",
        "SEGMENT_WRITE_KEY",
        "CREDENTIALS_DIRECTORY",
        "NOTIFY_SOCKET",
        "JOURNAL_STREAM",
        "INVOCATION_ID",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        // A proxy of the machine running the tests would carry (or break) the requests to
        // the loopback servers; the proxy tests set these themselves.
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "REQUEST_METHOD",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// `<binary> run --config <config_path>` in the scrubbed environment: add variables, a uid, or
/// wrap it before [`Agent::spawn`].
pub fn run_command(binary: impl AsRef<OsStr>, config_path: &Path) -> Command {
    let mut cmd = scrubbed_command(binary);
    cmd.arg("run").arg("--config").arg(config_path);
    cmd
}

/// The daemon (`run --config PATH`) running in the background. Its stderr and stdout are
/// appended to `agent.stderr.log` / `agent.stdout.log` beside the config, so restarts of the
/// same test share one log. Dropping it kills the process (SIGKILL) so no orphan outlives a
/// failed test.
pub struct Agent {
    child: Child,
    exit: Option<ExitStatus>,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
}

impl Agent {
    /// Spawns `run --config config_path` ([`run_command`] of [`BIN`]).
    pub fn start(config_path: &Path) -> Agent {
        Agent::spawn(run_command(BIN, config_path), config_path)
    }

    /// Runs `run --config config_path` until it exits by itself (within [`PATIENCE`]), asserts
    /// the exit code, and returns its log: for configs `run` must refuse.
    pub fn run_until_exit(config_path: &Path, code: i32) -> String {
        let mut agent = Agent::start(config_path);
        let exit = agent.wait_exit(PATIENCE);
        assert_eq!(
            exit.and_then(|e| e.code()),
            Some(code),
            "exit code of run\n{}",
            agent.log_tail(30)
        );
        agent.logs()
    }

    /// Spawns a prepared `cmd` (see [`run_command`]) in the config's directory, stdout and
    /// stderr appended to the log files beside the config. `cmd` must end up exec'ing the agent
    /// in the spawned process, so that [`Agent::pid`] and signals reach the agent.
    pub fn spawn(mut cmd: Command, config_path: &Path) -> Agent {
        let dir = config_path.parent().expect("config path has a parent dir");
        let stderr_path = dir.join("agent.stderr.log");
        let stdout_path = dir.join("agent.stdout.log");
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        };
        let child = cmd
            .current_dir(dir)
            .stdout(open(&stdout_path))
            .stderr(open(&stderr_path))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Agent {
            child,
            exit: None,
            stderr_path,
            stdout_path,
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) unless the process has already been reaped.
    pub fn signal(&mut self, signal: i32) {
        if self.try_exit().is_none() {
            // Our own unreaped child: its pid cannot have been recycled for another process.
            kill_pid(self.pid(), signal)
                .unwrap_or_else(|e| panic!("kill({}, {signal}): {e}", self.pid()));
        }
    }

    /// SIGTERM, then waits up to [`STOP_TIMEOUT`]; the exit status, or None if it did not exit
    /// in time (it is killed when dropped).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_within(STOP_TIMEOUT)
    }

    /// SIGTERM, then waits up to `timeout`.
    pub fn stop_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// SIGKILL (a crash: nothing flushed on the way out) and reap; the exit status.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.try_exit() {
            return status;
        }
        self.signal(libc::SIGKILL);
        self.wait_exit(STOP_TIMEOUT)
            .expect("a SIGKILLed process exits")
    }

    /// The exit status if the process has exited (on its own or after a signal).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("poll the agent process");
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.try_exit().is_some());
        self.exit
    }

    /// Not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Everything the agent wrote to stderr so far (its log).
    pub fn logs(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// Everything the agent wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// The last `lines` lines of the log, to explain a failure.
    pub fn log_tail(&self, lines: usize) -> String {
        let logs = self.logs();
        let all: Vec<&str> = logs.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the log contains `needle`; false on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.logs().contains(needle))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `signal` to a process: our agent, or one that is not our child (a daemon).
#[allow(unsafe_code)]
pub fn kill_pid(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    match unsafe { libc::kill(pid, signal) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Whether `pid` is a live process: present in `/proc` and not a zombie (a daemon's parent is
/// pid 1, which in a container may never reap it).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A file's text (lossy UTF-8), empty when it does not exist yet.
/// Whether this process runs as root (which reads any file, whatever its mode).
#[allow(unsafe_code)]
pub fn running_as_root() -> bool {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() == 0 }
}
