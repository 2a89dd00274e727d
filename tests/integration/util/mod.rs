//! The harness every integration test shares (and the benchmarks include): the real binary
//! driven against loopback servers, real files and a real spool.
//!
//! - [`http`]: a small threaded HTTP/1.1 server (one thread per connection) under both fakes;
//! - [`segment_server`]: the fake Segment Tracking API, recording (tests) or counting (benches);
//! - [`tls_segment_server`]: the same API over TLS with HTTP/2 and HTTP/1.1 by ALPN (hyper), and
//!   the test CA;
//! - [`agent`]: the agent as a child process: one way to spawn it, one environment scrub, one
//!   signal wrapper;
//! - [`config`]: the config builder;
//! - [`env`]: one test's world (temp dir, server, config);
//! - [`cli`]: short-lived subcommands, `status --json`, `dead-letter`;
//! - [`files`]: atomic and slow writes, repository files;
//! - [`generate`]: generated Leanplum exports and session lines;
//! - [`checks`]: what was delivered against what was expected.

pub mod agent;
pub mod checks;
pub mod cli;
pub mod config;
pub mod env;
pub mod files;
pub mod generate;
pub mod http;
pub mod segment_server;
pub mod tls_segment_server;

pub use agent::*;
pub use checks::*;
pub use cli::*;
pub use config::*;
pub use env::*;
pub use files::*;
pub use generate::*;
pub use segment_server::*;
pub use tls_segment_server::*;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// The binary under test, built by cargo for this test target.
pub const BIN: &str = env!("CARGO_BIN_EXE_leanplum-segment-agent");

/// A write key recognizable in any output, so a leak is easy to grep for.
pub const WRITE_KEY: &str = "wk_TEST_SECRET_5f3a9";

/// `EX_CONFIG`: what the agent exits with on a bad or missing config (SPEC section 2).
pub const EX_CONFIG: i32 = 78;

/// The Leanplum sample shard (plain JSON lines) that `tests/data/expected-segment-events.jsonl`
/// describes, relative to the repository root.
pub const SHARD_0: &str = "examples/export/20261101/export-5629499534213120-06e7df8e-1eb1-c66e-79f7-4d60ac03031e-output-0";

/// The sample shard's gzipped sibling (no extension), derived from [`SHARD_0`] by renumbering
/// ids and renaming devices and users (see `events::derive_shard_1`).
pub const SHARD_1: &str = "examples/export/20261101/export-5629499534213120-06e7df8e-1eb1-c66e-79f7-4d60ac03031e-output-1";

/// How long a test waits for anything that should happen "soon": generous, because CI runs on
/// a loaded 2-core machine and a timeout only costs time when something is already broken.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Long enough for a file to settle (1 s), be picked up (tick 250 ms, rescan 1 s), read and, if
/// it were read, delivered (flush 200 ms): a window in which "nothing happens" means something.
pub const NOTHING_HAPPENS: Duration = Duration::from_secs(3);

/// How long the agent may take to exit after SIGTERM: SPEC section 9 allows 10 s, plus slack.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// An absolute path inside the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Polls `cond` every 50 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}
