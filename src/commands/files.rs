//! `files`: every input file the agent knows and where it stands; from the running agent, or
//! from its spool when none runs.

use std::path::Path;

use super::ask::{self, Asked};
use super::{CommandError, Outcome, load_for_inspect, print_json};
use crate::control::files;
use crate::control::{Answer, Request};

pub(super) fn files(path: &Path, json: bool, state: Option<&str>) -> Result<Outcome, CommandError> {
    let config = load_for_inspect(path)?;
    let request = Request::Files {
        state: state.map(str::to_owned),
    };
    let entries = match ask::agent_or_spool(&config, &request)? {
        Asked::Agent(Answer::Files(entries)) => entries,
        Asked::Agent(other) => return Err(ask::unexpected(&other)),
        Asked::Spool(Some(spool)) => {
            files::list(&spool, None, state).map_err(CommandError::failed)?
        }
        Asked::Spool(None) => Vec::new(),
    };
    if json {
        print_json(&entries);
    } else {
        print!("{}", files::render(&entries));
    }
    Ok(Outcome::Success)
}
