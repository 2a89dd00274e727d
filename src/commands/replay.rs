//! `replay`: have the running agent (re-)ingest files or directories. Needs a running agent.

use std::path::{Path, PathBuf};

use super::ask::{self, ASK_TIMEOUT};
use super::{CommandError, Outcome, load_for_inspect};
use crate::control::{self, Answer, Request};

pub(super) fn replay(path: &Path, paths: &[PathBuf]) -> Result<Outcome, CommandError> {
    let config = load_for_inspect(path)?;
    let paths = paths
        .iter()
        .map(|p| {
            std::fs::canonicalize(p)
                .map_err(|e| CommandError::failed(format_args!("{}: {e}", p.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let replayed = match control::ask(
        &config.control.socket,
        &Request::Replay { paths },
        ASK_TIMEOUT,
    ) {
        Ok(Answer::Replay(r)) => r,
        Ok(other) => return Err(ask::unexpected(&other)),
        Err(e) if e.is_no_daemon() => {
            return Err(CommandError::NotRunning(format!(
                "no agent answers on {}: replay goes through the running agent (start it, e.g. \
                 `systemctl start leanplum-segment-agent`, then replay again)",
                config.control.socket.display()
            )));
        }
        Err(e) => return Err(ask::query_failed(e)),
    };
    for s in &replayed.started {
        println!("replaying {} (file id {})", s.path.display(), s.id);
    }
    if let Some(error) = replayed.error {
        return Err(CommandError::failed(error));
    }
    println!(
        "{} files handed to the agent; see `files` for their progress",
        replayed.started.len()
    );
    Ok(Outcome::Success)
}
