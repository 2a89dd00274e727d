//! `catalog show [ID]`: what the agent knows of a message or A/B test and where it came from;
//! from the running agent, or from the files and the spool's cache when none runs.

use std::path::Path;

use super::ask::{self, Asked};
use super::{CommandError, Outcome, load_for_inspect, print_json};
use crate::catalog;
use crate::cli::CatalogAction;
use crate::control::{Answer, Request};
use crate::leanplum::catalog::Catalog;

pub(super) fn catalog(path: &Path, action: &CatalogAction) -> Result<Outcome, CommandError> {
    let config = load_for_inspect(path)?;
    let CatalogAction::Show { id, json } = action;
    let parsed = catalog::parse_id(id.as_deref()).map_err(CommandError::failed)?;
    let request = Request::CatalogShow {
        id: parsed.map(|i| i.0),
    };
    let shown = match ask::agent_or_spool(&config, &request)? {
        Asked::Agent(Answer::Catalog(shown)) => *shown,
        Asked::Agent(other) => return Err(ask::unexpected(&other)),
        Asked::Spool(spool) => {
            let files =
                Catalog::load_dir(&config.mapping.catalog_dir).map_err(CommandError::failed)?;
            catalog::offline_show(files, spool.as_deref(), config.leanplum.is_some(), parsed)
        }
    };
    if *json {
        print_json(&shown);
    } else {
        print!("{}", catalog::render_show(&shown, id.as_deref()));
    }
    if id.is_some() && shown.entries.is_empty() {
        return Ok(Outcome::Incomplete);
    }
    Ok(Outcome::Success)
}
