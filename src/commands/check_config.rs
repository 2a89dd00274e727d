//! `check-config`: load and validate the config exactly as `run` does.

use std::path::Path;

use super::{CommandError, Outcome};
use crate::config::{Config, Purpose};

pub(super) fn check_config(path: &Path) -> Result<Outcome, CommandError> {
    let loaded = Config::load_and_validate(path, Purpose::Run)
        .map_err(|e| CommandError::Config(e.to_string()))?;
    let source = loaded.key.map(|(_, s)| s.to_string()).unwrap_or_default();
    let leanplum = match (&loaded.config.leanplum, &loaded.content_key) {
        (Some(lp), Some((_, s))) => format!(
            "; Leanplum catalog from {} for app {}, content key from {s}",
            lp.api_base, lp.app_id
        ),
        _ => String::new(),
    };
    let catalog = loaded
        .catalog
        .map(|f| {
            format!(
                "; catalog files: {} messages, {} A/B tests",
                f.catalog.len_messages(),
                f.catalog.len_abtests()
            )
        })
        .unwrap_or_default();
    println!(
        "{}: ok (write key from {source}{leanplum}{catalog})",
        path.display()
    );
    Ok(Outcome::Success)
}
