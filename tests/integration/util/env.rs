//! One test's world: a temp dir, a fake Segment server and a config pointing at both.

use std::fs;
use std::path::{Path, PathBuf};

use super::{Agent, AgentConfig, DeliveryReport, PATIENCE, SegmentServer};

/// A test's private world: a temp dir (holding `in/`, `spool/`, the config, the agent's logs),
/// a fake Segment server, and a config pointing at both. Tweak `config` before
/// [`TestEnv::start_agent`].
pub struct TestEnv {
    pub server: SegmentServer,
    pub config: AgentConfig,
    pub config_path: PathBuf,
    // Last, so the agent (held by the test) and server go before the files they use.
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    /// A fresh temp dir with an empty watch dir (the spool dir is left for the agent to
    /// create), a server expecting [`WRITE_KEY`], and the default test config.
    pub fn new() -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("lsa-it-")
            .tempdir()
            .expect("create a temp dir");
        let server = SegmentServer::start();
        let config = AgentConfig::new(dir.path(), &server.url());
        fs::create_dir_all(&config.watch_dir).expect("create the watch dir");
        let config_path = dir.path().join("config.toml");
        TestEnv {
            server,
            config,
            config_path,
            dir,
        }
    }

    /// The test's temp dir.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The watched directory (`<root>/in`, created empty).
    pub fn watch_dir(&self) -> &Path {
        &self.config.watch_dir
    }

    /// Writes the current config to `config_path` and returns that path.
    pub fn write_config(&self) -> PathBuf {
        self.config.write(&self.config_path);
        self.config_path.clone()
    }

    /// Writes the config and starts `run --config` on it.
    pub fn start_agent(&self) -> Agent {
        Agent::start(&self.write_config())
    }
}

/// A test world whose agent logs its own debug lines but not sled's, so a failure's log tail
/// shows what the agent did.
pub fn new_env() -> TestEnv {
    let mut env = TestEnv::new();
    env.config.log_level = Some("info,leanplum_segment_agent=debug".into());
    env
}

/// Waits until every id in `ids` was accepted, or fails with the delivery report and log tail.
pub fn wait_delivered(env: &TestEnv, agent: &Agent, ids: &[String], what: &str) {
    if !env.server.wait_for_ids(ids, PATIENCE) {
        panic!(
            "{what}: not delivered in time: {}\nagent log tail:\n{}",
            DeliveryReport::of(&env.server, ids).summary(),
            agent.log_tail(40)
        );
    }
}

/// Set `LSA_IT_KEEP=1` to keep every test's temp dir (config, logs, spool) for a post-mortem.
impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::env::var_os("LSA_IT_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept {}", self.dir.path().display());
        }
    }
}
