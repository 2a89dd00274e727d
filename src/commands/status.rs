//! `status`: how the running agent is doing, or, with none running, what its spool holds
//! (exit 3).

use std::path::Path;

use super::ask::{self, Asked};
use super::{CommandError, Outcome, load_for_inspect, print_json};
use crate::control::{self, Answer, Request, StatusReport};

pub(super) fn status(path: &Path, json: bool) -> Result<Outcome, CommandError> {
    let config = load_for_inspect(path)?;
    let (report, outcome) = match ask::agent_or_spool(&config, &Request::Status)? {
        Asked::Agent(Answer::Status(r)) => (*r, Outcome::Success),
        Asked::Agent(other) => return Err(ask::unexpected(&other)),
        Asked::Spool(Some(spool)) => (
            control::offline_report(&spool, &config.segment.endpoint)
                .map_err(CommandError::failed)?,
            Outcome::Stopped,
        ),
        Asked::Spool(None) => (
            StatusReport {
                state: control::STATE_STOPPED.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                endpoint: config.segment.endpoint.clone(),
                notes: vec![format!("no spool at {} yet", config.spool.dir.display())],
                ..StatusReport::default()
            },
            Outcome::Stopped,
        ),
    };
    if json {
        print_json(&report);
    } else {
        print!("{}", report.render_human());
    }
    Ok(outcome)
}
