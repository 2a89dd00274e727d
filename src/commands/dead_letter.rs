//! `dead-letter list | show | retry | purge`: the quarantine, parked records and dead letters,
//! through the running agent or, with none running, on its spool.

use std::path::Path;

use super::ask::{self, Asked};
use super::{CommandError, Outcome, load_for_inspect, print_json};
use crate::cli::DeadLetterAction;
use crate::control::{Answer, DeadLetterRequest, Request};
use crate::deadletter;
use crate::leanplum::catalog::Catalog;

pub(super) fn dead_letter(path: &Path, action: &DeadLetterAction) -> Result<Outcome, CommandError> {
    let config = load_for_inspect(path)?;
    let request = match action {
        DeadLetterAction::List { .. } => DeadLetterRequest::List,
        DeadLetterAction::Show { id, .. } => DeadLetterRequest::Show { id: *id },
        DeadLetterAction::Retry { ids } => DeadLetterRequest::Retry { ids: ids.clone() },
        DeadLetterAction::Purge { ids } => DeadLetterRequest::Purge { ids: ids.clone() },
    };
    let answer = match ask::agent_or_spool(&config, &Request::DeadLetter(request.clone()))? {
        Asked::Agent(answer) => answer,
        Asked::Spool(Some(spool)) => {
            let catalog = Catalog::load_dir(&config.mapping.catalog_dir).unwrap_or_else(|e| {
                eprintln!("warning: {e}; retrying with an empty catalog");
                Catalog::empty()
            });
            deadletter::answer(
                &request,
                &spool,
                &catalog,
                &crate::app::mapping_options(&config),
                config.watch.max_line_bytes,
            )
            .map_err(CommandError::failed)?
        }
        Asked::Spool(None) => {
            println!("no spool at {} yet", config.spool.dir.display());
            return Ok(Outcome::Success);
        }
    };
    match (action, answer) {
        (DeadLetterAction::List { json, kind, file }, Answer::DeadLetters(entries)) => {
            let entries = deadletter::filter(entries, kind.as_deref(), file.as_deref());
            if *json {
                print_json(&entries);
            } else {
                print!("{}", deadletter::render(&entries));
            }
        }
        (DeadLetterAction::Show { json, .. }, Answer::DeadLetter(shown)) => {
            if *json {
                print_json(&shown);
            } else {
                print!("{}", deadletter::render_shown(&shown));
            }
        }
        (DeadLetterAction::Retry { .. }, Answer::Retried(o)) => {
            println!(
                "{} dead letters requeued, {} quarantined records recovered, {} still bad",
                o.requeued,
                o.recovered,
                o.still_bad.len()
            );
            for (id, why) in o.still_bad {
                println!("  {id}: {why}");
            }
        }
        (DeadLetterAction::Purge { .. }, Answer::Purged(n)) => println!("{n} entries purged"),
        (_, other) => return Err(ask::unexpected(&other)),
    }
    Ok(Outcome::Success)
}
