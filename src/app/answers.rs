//! The agent's one dispatcher for the control socket: every [`Request`] a command sends, and
//! the [`Answer`] built from the running agent's spool, catalog and tasks.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::catalog::CatalogService;
use crate::control::files::{self, LiveFiles};
use crate::control::{Answer, ReportFn, Request};
use crate::leanplum::Id;
use crate::mapping::SharedMapping;
use crate::spool::Spool;

/// What the answers are built from.
pub(super) struct Answers {
    pub report: ReportFn,
    pub spool: Arc<Spool>,
    pub catalog: Arc<CatalogService>,
    pub mapping: SharedMapping,
    /// Files held on an unfinished last line (the ingestor's set).
    pub holding: Arc<Mutex<HashSet<PathBuf>>>,
    /// Where a replay hands its files to the ingest worker.
    pub replay: std::sync::mpsc::Sender<(PathBuf, u64)>,
    /// `watch.max_line_bytes` as started: a `[watch]` change takes effect at the next restart,
    /// for retries too.
    pub max_line_bytes: usize,
}

impl Answers {
    /// Answers `request`; blocking (reads the spool), so called off the async workers.
    pub(super) fn answer(&self, request: Request) -> Result<Answer, String> {
        match request {
            Request::Status => Ok(Answer::Status(Box::new((self.report)()))),
            Request::Files { state } => {
                files::list(&self.spool, Some(&self.live_files()), state.as_deref())
                    .map(Answer::Files)
                    .map_err(|e| e.to_string())
            }
            Request::Replay { paths } => {
                files::replay(&paths, &self.spool, &self.replay).map(Answer::Replay)
            }
            Request::DeadLetter(r) => {
                let m = crate::mapping::current(&self.mapping);
                crate::deadletter::answer(&r, &self.spool, &m.catalog, &m.opts, self.max_line_bytes)
            }
            Request::CatalogShow { id } => {
                Ok(Answer::Catalog(Box::new(self.catalog.show(id.map(Id)))))
            }
        }
    }

    /// What only the running agent knows of the files being read.
    fn live_files(&self) -> LiveFiles {
        let waiting = self
            .catalog
            .status()
            .waiting
            .into_iter()
            .flat_map(|w| {
                let why = format!("waits for the catalog: {} {} ({})", w.kind, w.id, w.reason);
                w.files.into_iter().map(move |f| (f, why.clone()))
            })
            .collect();
        LiveFiles {
            holding: self.holding.clone(),
            waiting,
        }
    }
}
