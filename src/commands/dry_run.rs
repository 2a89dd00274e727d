//! `dry-run`: the Segment events files would produce, as JSON lines on stdout; spools and
//! sends nothing.

use std::path::{Path, PathBuf};

use super::{CommandError, Outcome};
use crate::config::{self, Config, Purpose};
use crate::leanplum::catalog::Catalog;

pub(super) fn dry_run(
    config: Option<&Path>,
    explain: bool,
    files: &[PathBuf],
) -> Result<Outcome, CommandError> {
    let default = Path::new(config::DEFAULT_PATH);
    let config = match config {
        Some(p) => Config::load_and_validate(p, Purpose::DryRun).map(|l| l.config),
        None if default.exists() => {
            Config::load_and_validate(default, Purpose::DryRun).map(|l| l.config)
        }
        None => Ok(Config::default()),
    }
    .map_err(|e| CommandError::Config(e.to_string()))?;
    let catalog = Catalog::load_dir(&config.mapping.catalog_dir)
        .map_err(|e| CommandError::Config(e.to_string()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut err = std::io::stderr();
    match crate::ingest::dry_run(
        files,
        &catalog,
        &crate::app::mapping_options(&config),
        config.watch.max_line_bytes,
        explain,
        &mut out,
        &mut err,
    ) {
        Ok(s) => {
            eprintln!("{}", s.render());
            Ok(if s.unreadable_files > 0 {
                Outcome::Incomplete
            } else {
                Outcome::Success
            })
        }
        // `dry-run ... | head`: the reader has seen enough.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Outcome::Success),
        Err(e) => Err(CommandError::failed(format_args!("dry-run: {e}"))),
    }
}
