//! The agent's config as a builder: test defaults (fast timers, the shipped catalog), one field
//! per key, raw lines for the rest.

use std::fs;
use std::path::{Path, PathBuf};

use super::{WRITE_KEY, repo_path};

/// The agent's TOML config (SPEC section 3) as fields, so a test can tweak one key and write
/// it. `None` leaves a key out (the agent's default applies).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub write_key: Option<String>,
    pub write_key_file: Option<PathBuf>,
    pub endpoint: String,
    pub max_batch_bytes: Option<u64>,
    pub max_batch_events: Option<u64>,
    pub flush_interval_ms: Option<u64>,
    pub request_timeout_secs: Option<u64>,
    pub gzip: Option<bool>,
    pub concurrency: Option<u64>,
    pub initial_backoff_ms: Option<u64>,
    pub max_backoff_secs: Option<u64>,
    pub watch_dir: PathBuf,
    pub include: Option<Vec<String>>,
    pub exclude: Option<Vec<String>>,
    pub settle_secs: Option<u64>,
    pub rescan_interval_secs: Option<u64>,
    pub require_manifest: Option<bool>,
    pub after_ingest: Option<String>,
    pub move_to: Option<PathBuf>,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: Option<u64>,
    pub dedupe_window_days: Option<u64>,
    pub catalog_dir: PathBuf,
    pub unknown_message_channel: Option<String>,
    pub send_experiment_viewed: Option<bool>,
    pub control_socket: PathBuf,
    pub log_level: Option<String>,
    /// Raw TOML lines added to a section, as `(section, line)`: for unknown or malformed keys,
    /// or sections the builder does not know (`[leanplum]`).
    pub extra: Vec<(String, String)>,
}

impl AgentConfig {
    /// The test defaults: everything under `root` (`in/`, `spool/`, `control.sock`), the
    /// shipped catalog, fast timers (flush 200 ms, settle 1 s, rescan 1 s, backoff 100 ms to
    /// 2 s), gzip on, debug logs, and [`WRITE_KEY`] inline.
    pub fn new(root: &Path, endpoint: &str) -> AgentConfig {
        AgentConfig {
            write_key: Some(WRITE_KEY.to_string()),
            write_key_file: None,
            endpoint: endpoint.to_string(),
            max_batch_bytes: None,
            max_batch_events: None,
            flush_interval_ms: Some(200),
            // Under PATIENCE: a request whose answer is lost (seen under load with this fake
            // server) is retried in time for the test's wait.
            request_timeout_secs: Some(10),
            gzip: Some(true),
            concurrency: None,
            initial_backoff_ms: Some(100),
            max_backoff_secs: Some(2),
            watch_dir: root.join("in"),
            include: None,
            exclude: None,
            settle_secs: Some(1),
            rescan_interval_secs: Some(1),
            require_manifest: None,
            after_ingest: None,
            move_to: None,
            spool_dir: root.join("spool"),
            spool_max_bytes: None,
            dedupe_window_days: None,
            catalog_dir: repo_path("examples/catalog"),
            unknown_message_channel: None,
            send_experiment_viewed: None,
            control_socket: root.join("control.sock"),
            log_level: Some("debug".to_string()),
            extra: Vec::new(),
        }
    }

    /// Adds a raw line to `section` (see [`Self::extra`]).
    pub fn with_extra(mut self, section: &str, line: &str) -> AgentConfig {
        self.extra.push((section.to_string(), line.to_string()));
        self
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        let mut sections: Vec<(&str, Vec<String>)> = Vec::new();
        let mut segment = Vec::new();
        opt_line(
            &mut segment,
            "write_key",
            self.write_key.as_deref().map(toml_str),
        );
        opt_line(
            &mut segment,
            "write_key_file",
            self.write_key_file.as_deref().map(toml_path),
        );
        segment.push(format!("endpoint = {}", toml_str(&self.endpoint)));
        opt_line(
            &mut segment,
            "max_batch_bytes",
            self.max_batch_bytes.map(|v| v.to_string()),
        );
        opt_line(
            &mut segment,
            "max_batch_events",
            self.max_batch_events.map(|v| v.to_string()),
        );
        opt_line(
            &mut segment,
            "flush_interval_ms",
            self.flush_interval_ms.map(|v| v.to_string()),
        );
        opt_line(
            &mut segment,
            "request_timeout_secs",
            self.request_timeout_secs.map(|v| v.to_string()),
        );
        opt_line(&mut segment, "gzip", self.gzip.map(|v| v.to_string()));
        opt_line(
            &mut segment,
            "concurrency",
            self.concurrency.map(|v| v.to_string()),
        );
        sections.push(("segment", segment));

        let mut retry = Vec::new();
        opt_line(
            &mut retry,
            "initial_backoff_ms",
            self.initial_backoff_ms.map(|v| v.to_string()),
        );
        opt_line(
            &mut retry,
            "max_backoff_secs",
            self.max_backoff_secs.map(|v| v.to_string()),
        );
        sections.push(("retry", retry));

        let mut watch = vec![format!("dir = {}", toml_path(&self.watch_dir))];
        opt_line(
            &mut watch,
            "include",
            self.include.as_deref().map(toml_str_array),
        );
        opt_line(
            &mut watch,
            "exclude",
            self.exclude.as_deref().map(toml_str_array),
        );
        opt_line(
            &mut watch,
            "settle_secs",
            self.settle_secs.map(|v| v.to_string()),
        );
        opt_line(
            &mut watch,
            "rescan_interval_secs",
            self.rescan_interval_secs.map(|v| v.to_string()),
        );
        opt_line(
            &mut watch,
            "require_manifest",
            self.require_manifest.map(|v| v.to_string()),
        );
        opt_line(
            &mut watch,
            "after_ingest",
            self.after_ingest.as_deref().map(toml_str),
        );
        opt_line(
            &mut watch,
            "move_to",
            self.move_to.as_deref().map(toml_path),
        );
        sections.push(("watch", watch));

        let mut spool = vec![format!("dir = {}", toml_path(&self.spool_dir))];
        opt_line(
            &mut spool,
            "max_bytes",
            self.spool_max_bytes.map(|v| v.to_string()),
        );
        opt_line(
            &mut spool,
            "dedupe_window_days",
            self.dedupe_window_days.map(|v| v.to_string()),
        );
        sections.push(("spool", spool));

        let mut mapping = vec![format!("catalog_dir = {}", toml_path(&self.catalog_dir))];
        opt_line(
            &mut mapping,
            "unknown_message_channel",
            self.unknown_message_channel.as_deref().map(toml_str),
        );
        opt_line(
            &mut mapping,
            "send_experiment_viewed",
            self.send_experiment_viewed.map(|v| v.to_string()),
        );
        sections.push(("mapping", mapping));

        sections.push((
            "control",
            vec![format!("socket = {}", toml_path(&self.control_socket))],
        ));

        let mut log = Vec::new();
        opt_line(&mut log, "level", self.log_level.as_deref().map(toml_str));
        sections.push(("log", log));

        for (section, line) in &self.extra {
            match sections.iter_mut().find(|(name, _)| name == section) {
                Some((_, lines)) => lines.push(line.clone()),
                None => sections.push((section.as_str(), vec![line.clone()])),
            }
        }

        let mut out = String::new();
        for (name, lines) in sections {
            if lines.is_empty() {
                continue;
            }
            out.push_str(&format!("[{name}]\n"));
            for line in lines {
                out.push_str(&line);
                out.push('\n');
            }
            out.push('\n');
        }
        out
    }

    /// Writes [`Self::to_toml`] to `path`.
    pub fn write(&self, path: &Path) {
        fs::write(path, self.to_toml())
            .unwrap_or_else(|e| panic!("write config {}: {e}", path.display()));
    }
}

/// Adds `key = value` when there is a value.
fn opt_line(lines: &mut Vec<String>, key: &str, value: Option<String>) {
    if let Some(value) = value {
        lines.push(format!("{key} = {value}"));
    }
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A path as a TOML string.
fn toml_path(p: &Path) -> String {
    toml_str(p.to_str().expect("test paths are UTF-8"))
}

/// A TOML array of strings.
fn toml_str_array(items: &[String]) -> String {
    format!(
        "[{}]",
        items
            .iter()
            .map(|s| toml_str(s))
            .collect::<Vec<_>>()
            .join(", ")
    )
}
