//! What the pipeline and CSV export benchmarks share beyond the test harness (which both
//! include as `util`): the config every benchmark starts from.

use std::path::Path;

use crate::util::AgentConfig;

/// The harness's config for `endpoint` under `root`, with the agent's own defaults for the
/// request timeout and gzip (the tests shorten or fix them), a rescan every 5 s, a spool that
/// never fills and warnings only in the log, but for the ingest's two lines per file (their
/// times end the ingest phase).
pub(crate) fn bench_config(root: &Path, endpoint: &str) -> AgentConfig {
    let mut c = AgentConfig::new(root, endpoint);
    c.request_timeout_secs = None;
    c.gzip = None;
    c.rescan_interval_secs = Some(5);
    c.spool_max_bytes = Some(107_374_182_400);
    c.log_level = Some("warn,leanplum_segment_agent::ingest=info".into());
    c
}
