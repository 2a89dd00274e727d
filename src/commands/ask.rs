//! Asking the agent, or its spool when none runs: the offline fallback of `status`, `files`,
//! `dead-letter` and `catalog`.

use std::time::{Duration, Instant};

use super::CommandError;
use crate::config::Config;
use crate::control::{self, Answer, QueryError, Request};
use crate::spool::{self, Spool};

/// How long a command waits for the agent's answer.
pub(super) const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an agent that holds the spool but does not answer yet (it is starting) is waited
/// for.
const STARTING_AGENT_WAIT: Duration = Duration::from_secs(5);

/// Who answered.
pub(super) enum Asked {
    /// The running agent, over its control socket.
    Agent(Answer),
    /// No agent runs: its spool, for the command to read (`None`: no spool yet).
    Spool(Option<Box<Spool>>),
}

/// Asks the agent on `config`'s control socket and falls back to the spool when no agent
/// runs. An agent that holds the spool but does not answer yet is starting: both are tried
/// again for a few seconds.
pub(super) fn agent_or_spool(config: &Config, request: &Request) -> Result<Asked, CommandError> {
    let deadline = Instant::now() + STARTING_AGENT_WAIT;
    loop {
        match control::ask(&config.control.socket, request, ASK_TIMEOUT) {
            Ok(answer) => return Ok(Asked::Agent(answer)),
            Err(e) if e.is_no_daemon() => {}
            Err(e) => return Err(query_failed(e)),
        }
        match Spool::open_existing(&config.spool.dir, 8 << 20) {
            Ok(s) => return Ok(Asked::Spool(s.map(Box::new))),
            Err(spool::Error::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(spool::Error::Locked { path }) => {
                return Err(CommandError::failed(format_args!(
                    "an agent holds the spool {} but does not answer on its control socket {}",
                    path.display(),
                    config.control.socket.display()
                )));
            }
            Err(e) => return Err(CommandError::failed(e)),
        }
    }
}

/// A failed exchange with the agent, with a hint when the socket is not ours to use.
pub(super) fn query_failed(e: QueryError) -> CommandError {
    let hint = match &e {
        QueryError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            "\nhint: run as root or as a member of the agent's group"
        }
        _ => "",
    };
    CommandError::failed(format_args!("{e}{hint}"))
}

/// An answer that does not fit the request: an agent of another version.
pub(super) fn unexpected(answer: &Answer) -> CommandError {
    CommandError::failed(format_args!(
        "unexpected answer from the agent: {}",
        String::from_utf8_lossy(&control::protocol::encode_answer(&Ok(answer.clone())))
    ))
}
