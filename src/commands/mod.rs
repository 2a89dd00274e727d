//! One module per subcommand of [`crate::cli::Command`], each a function returning
//! `Result<Outcome, CommandError>`, and the one place where an outcome or an error becomes the
//! process's exit code ([`Outcome::code`], [`CommandError::code`]).
//!
//! | exit | when |
//! | --- | --- |
//! | 0 | done |
//! | 1 | failed ([`CommandError::Failed`]), or done in part ([`Outcome::Incomplete`]: `dry-run` with an unreadable file, `catalog show ID` with no such entry) |
//! | 3 | LSB "not running": `status` answered from a stopped agent's spool ([`Outcome::Stopped`]), `replay` with no agent ([`CommandError::NotRunning`]) |
//! | 78 | sysexits `EX_CONFIG`: the config, or a catalog file it names, is bad ([`CommandError::Config`]); systemd does not restart-loop on it (`RestartPreventExitStatus=78`) |
//!
//! `run` is the service ([`crate::app`]); the others are short-lived and talk to the running
//! agent over its control socket ([`crate::control::protocol`]), or, when none runs, read its
//! spool directly ([`ask`]).

mod ask;
mod catalog;
mod check_config;
mod dead_letter;
mod dry_run;
mod files;
mod replay;
mod run;
mod status;

use std::path::Path;
use std::process::ExitCode;

use crate::cli::Command;
use crate::config::{Config, Purpose};

/// sysexits.h `EX_CONFIG`.
pub(crate) const EX_CONFIG: u8 = 78;
/// LSB: program is not running.
pub(crate) const EX_STOPPED: u8 = 3;

/// How a command that did its job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 3: no agent runs; what was asked was answered from its spool.
    Stopped,
    /// Exit 1: the command did what it could and said what it could not.
    Incomplete,
}

impl Outcome {
    pub(crate) fn code(self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::Stopped => EX_STOPPED,
            Outcome::Incomplete => 1,
        }
    }
}

/// Why a command failed. Its `Display` is the message for the operator (never a secret).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The config or a catalog file it names is bad: exit 78.
    #[error("{0}")]
    Config(String),
    /// The command needs a running agent and none answers: exit 3.
    #[error("{0}")]
    NotRunning(String),
    /// Anything else: exit 1.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl CommandError {
    pub(crate) fn code(&self) -> u8 {
        match self {
            CommandError::Config(_) => EX_CONFIG,
            CommandError::NotRunning(_) => EX_STOPPED,
            CommandError::Failed(_) => 1,
        }
    }

    pub(crate) fn failed(message: impl std::fmt::Display) -> CommandError {
        CommandError::Failed(anyhow::anyhow!("{message}"))
    }
}

impl From<anyhow::Error> for CommandError {
    fn from(e: anyhow::Error) -> CommandError {
        CommandError::Failed(e)
    }
}

/// The exit code of a command's result; an error is first told to the operator: logged by
/// `run` once its logging is set up (its stderr may be a log file or the journal), printed on
/// stderr otherwise.
pub fn exit_code(result: Result<Outcome, CommandError>, logs: bool) -> ExitCode {
    match result {
        Ok(outcome) => ExitCode::from(outcome.code()),
        Err(e) => {
            if logs && tracing::dispatcher::has_been_set() {
                tracing::error!("{e}");
            } else {
                eprintln!("{e}");
            }
            ExitCode::from(e.code())
        }
    }
}

/// Runs one command. `run` sets up its own logging (the config says how); the others log
/// warnings on stderr.
pub fn dispatch(command: Command) -> Result<Outcome, CommandError> {
    if !matches!(command, Command::Run { .. }) {
        crate::logging::init("warn");
    }
    match command {
        Command::Run {
            config,
            daemonize,
            pidfile,
            log_file,
        } => run::run(&config, daemonize.then_some((pidfile, log_file))),
        Command::CheckConfig { config } => check_config::check_config(&config),
        Command::DryRun {
            config,
            explain,
            files,
        } => dry_run::dry_run(config.as_deref(), explain, &files),
        Command::Status { config, json } => status::status(&config, json),
        Command::DeadLetter { config, action } => dead_letter::dead_letter(&config, &action),
        Command::Catalog { config, action } => catalog::catalog(&config, &action),
        Command::Files {
            config,
            json,
            state,
        } => files::files(&config, json, state.as_deref()),
        Command::Replay { config, paths } => replay::replay(&config, &paths),
    }
}

/// Loads a config for the commands that inspect an agent (`status`, `files`, ...).
fn load_for_inspect(path: &Path) -> Result<Config, CommandError> {
    Config::load_and_validate(path, Purpose::Inspect)
        .map(|l| l.config)
        .map_err(|e| CommandError::Config(e.to_string()))
}

/// Prints `value` as one line of JSON.
fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string(value).expect("plain data serializes")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_and_error_has_its_documented_exit_code() {
        assert_eq!(Outcome::Success.code(), 0);
        assert_eq!(Outcome::Stopped.code(), 3);
        assert_eq!(Outcome::Incomplete.code(), 1);
        assert_eq!(CommandError::Config("bad".into()).code(), 78);
        assert_eq!(CommandError::NotRunning("no agent".into()).code(), 3);
        assert_eq!(CommandError::failed("boom").code(), 1);
    }

    #[test]
    fn a_failure_shows_its_whole_chain() {
        let e =
            CommandError::from(anyhow::anyhow!("disk on fire").context("cannot open the spool"));
        assert_eq!(e.to_string(), "cannot open the spool: disk on fire");
    }

    #[test]
    fn a_config_that_does_not_load_is_ex_config() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_for_inspect(&dir.path().join("missing.toml")).unwrap_err();
        assert_eq!(e.code(), EX_CONFIG, "{e}");
    }
}
