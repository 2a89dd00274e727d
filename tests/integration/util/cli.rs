//! Short-lived subcommands of the binary: `check-config`, `dry-run`, `status --json`,
//! `dead-letter`, each run to completion with a timeout.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{BIN, PATIENCE, scrubbed_command, wait_until};

/// What a short-lived command (`check-config`, `dry-run`, `status`) did.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// The exit code (panics if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self:?}"))
    }

    /// stdout and stderr together, for "the message names the key" checks.
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs the binary with `args` to completion, killing it after `timeout` (a hang is a test
/// failure, not a stuck test run).
pub fn run_cli(args: &[&OsStr], timeout: Duration) -> CmdOutput {
    let out = tempfile::tempfile().expect("temp file for stdout");
    let err = tempfile::tempfile().expect("temp file for stderr");
    let mut child = scrubbed_command(BIN)
        .args(args)
        .stdout(out.try_clone().expect("clone stdout file"))
        .stderr(err.try_clone().expect("clone stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().expect("poll the command");
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("`{BIN} {args:?}` did not finish within {timeout:?}");
    };
    let read_all = |mut f: File| {
        use std::io::Seek;
        f.rewind().expect("rewind output file");
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).expect("read output file");
        String::from_utf8_lossy(&bytes).into_owned()
    };
    CmdOutput {
        status,
        stdout: read_all(out),
        stderr: read_all(err),
    }
}

/// `status --config <config_path> --json` as JSON (works with the agent running or stopped).
pub fn status_json(config_path: &Path) -> Value {
    try_status_json(config_path).unwrap_or_else(|output| panic!("{output}"))
}

/// [`status_json`], or what the command said instead of a JSON object (e.g. while an agent is
/// starting and holds the spool without answering on its control socket yet).
pub fn try_status_json(config_path: &Path) -> Result<Value, String> {
    let out = run_cli(
        &[
            "status".as_ref(),
            "--config".as_ref(),
            config_path.as_os_str(),
            "--json".as_ref(),
        ],
        PATIENCE,
    );
    serde_json::from_str(out.stdout.trim()).map_err(|e| {
        format!(
            "`status --json` printed no JSON object ({e}); exit {:?}\n{}",
            out.status.code(),
            out.all_output()
        )
    })
}

/// One counter of [`status_json`] (panics when the field is missing or not a number).
pub fn status_u64(status: &Value, field: &str) -> u64 {
    status
        .get(field)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("status has no numeric {field:?}: {status}"))
}

/// Polls [`status_json`] every 200 ms until `cond` holds; the last report, or None on timeout.
pub fn wait_for_status(
    config_path: &Path,
    timeout: Duration,
    mut cond: impl FnMut(&Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = status_json(config_path);
        if cond(&status) {
            return Some(status);
        }
        if Instant::now() >= deadline {
            eprintln!("status never matched; last: {status}");
            return None;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `dead-letter list --config <config_path> --json`: every entry (quarantine and dead letters).
pub fn dead_letter_list(config_path: &Path) -> Vec<Value> {
    let out = run_cli(
        &[
            "dead-letter".as_ref(),
            "list".as_ref(),
            "--config".as_ref(),
            config_path.as_os_str(),
            "--json".as_ref(),
        ],
        PATIENCE,
    );
    assert_eq!(
        out.code(),
        0,
        "dead-letter list failed:\n{}",
        out.all_output()
    );
    match serde_json::from_str(out.stdout.trim()) {
        Ok(Value::Array(entries)) => entries,
        other => panic!(
            "`dead-letter list --json` printed no JSON array: {other:?}\n{}",
            out.all_output()
        ),
    }
}

/// The `quarantine` entries of [`dead_letter_list`].
pub fn quarantine_list(config_path: &Path) -> Vec<Value> {
    dead_letter_list(config_path)
        .into_iter()
        .filter(|e| e["kind"] == "quarantine")
        .collect()
}

/// Runs `dead-letter <verb> [args] --config <config_path>` and returns what it did.
pub fn dead_letter_cmd(config_path: &Path, verb: &str, args: &[&str]) -> CmdOutput {
    let mut argv: Vec<&OsStr> = vec!["dead-letter".as_ref(), verb.as_ref()];
    argv.extend(args.iter().map(|a| OsStr::new(*a)));
    argv.push("--config".as_ref());
    argv.push(config_path.as_os_str());
    run_cli(&argv, PATIENCE)
}

/// Lines of the agent's log that say it is ready (one per start that got that far).
pub fn ready_lines(logs: &str) -> usize {
    logs.lines()
        .filter(|l| l.trim_end().ends_with(": ready"))
        .count()
}
