//! The TOML configuration (SPEC section 3): serde types with every default documented,
//! `load` (deserialize only), `validate` (every problem with its key path), and the write key,
//! which is a secret and never printed.
//!
//! `check-config`, `run` and SIGHUP all go through [`Config::load_and_validate`], so what the
//! check accepts is exactly what the daemon runs with, the catalog files of
//! `mapping.catalog_dir` included.

use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::mapping::{EmailSubject, UnknownChannel};

/// Where the config lives unless `--config` says otherwise.
pub(crate) const DEFAULT_PATH: &str = "/etc/leanplum-segment-agent/config.toml";

/// `watch.max_line_bytes` unless set: 64 MiB.
pub(crate) const DEFAULT_MAX_LINE_BYTES: usize = 64 << 20;
/// The smallest `watch.max_line_bytes` accepted.
pub(crate) const MIN_MAX_LINE_BYTES: usize = 1 << 10;
/// The largest `watch.max_line_bytes` accepted: one line is held in memory whole.
pub(crate) const MAX_MAX_LINE_BYTES: usize = 1 << 30;
/// The most `watch.ingest_threads` accepted.
pub(crate) const MAX_INGEST_THREADS: usize = 256;

/// A config that cannot be used. `check-config` and `run` exit 78 (EX_CONFIG) on it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The file could not be read (missing, permissions).
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// The file parsed but some values are unusable; one entry per problem.
    #[error("invalid config {path}:\n{}", problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// One bad value, named by its key path (`segment.max_batch_events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    #[serde(default)]
    pub segment: SegmentConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub watch: WatchConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub mapping: MappingConfig,
    #[serde(default)]
    pub leanplum: Option<LeanplumConfig>,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SegmentConfig {
    /// File holding the write key (trailing whitespace ignored). Not with `write_key`.
    pub write_key_file: Option<PathBuf>,
    /// The write key inline. Prefer `write_key_file` or systemd credentials.
    pub write_key: Option<WriteKey>,
    /// `https://api.segment.io`; EU workspaces use `https://events.eu1.segmentapis.com`.
    pub endpoint: String,
    /// Serialized request body, envelope included, before gzip. Segment's limit is 500 KB.
    pub max_batch_bytes: usize,
    /// Segment silently drops the excess of a larger batch.
    pub max_batch_events: usize,
    /// A partial batch is sent after this long.
    pub flush_interval_ms: u64,
    pub request_timeout_secs: u64,
    pub gzip: bool,
    /// Batches in flight at once (retries stay inside this): a number, or `"adaptive"`.
    pub concurrency: Concurrency,
    /// The ceiling of `concurrency = "adaptive"`.
    pub max_concurrency: usize,
    /// A token bucket over events sent; 0 = unlimited.
    pub max_events_per_sec: u64,
    /// `http(s)://[user:password@]host:port`; empty: the environment's proxy, if any
    /// (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`). See [`crate::transport`].
    pub proxy: ProxyUrl,
    /// A PEM file of extra CA roots (a TLS-inspecting proxy); empty: the built-in roots only.
    pub ca_file: PathBuf,
}

impl SegmentConfig {
    /// The most requests ever in flight: the fixed number, or `max_concurrency`.
    pub(crate) fn max_in_flight(&self) -> usize {
        match self.concurrency {
            Concurrency::Fixed(n) => n,
            Concurrency::Adaptive => self.max_concurrency,
        }
    }
}

/// The largest `segment.concurrency` and `segment.max_concurrency` accepted.
pub(crate) const MAX_CONCURRENCY: usize = 64;

/// `segment.concurrency`: a fixed number of requests in flight, or adaptive (SPEC section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Concurrency {
    #[default]
    Adaptive,
    Fixed(usize),
}

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Concurrency;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a positive integer or "adaptive""#)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Concurrency, E> {
                // 0 and the upper bound are `validate`'s, which names the range.
                Ok(Concurrency::Fixed(usize::try_from(v).unwrap_or(usize::MAX)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Concurrency, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Concurrency, E> {
                match v {
                    "adaptive" => Ok(Concurrency::Adaptive),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for Concurrency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Concurrency::Adaptive => f.write_str("adaptive"),
            Concurrency::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl Default for SegmentConfig {
    fn default() -> Self {
        SegmentConfig {
            write_key_file: None,
            write_key: None,
            endpoint: "https://api.segment.io".into(),
            max_batch_bytes: 475_000,
            max_batch_events: 2500,
            flush_interval_ms: 1000,
            request_timeout_secs: 30,
            gzip: true,
            concurrency: Concurrency::Adaptive,
            max_concurrency: 32,
            max_events_per_sec: 0,
            proxy: ProxyUrl::default(),
            ca_file: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RetryConfig {
    pub initial_backoff_ms: u64,
    /// Exponential with full jitter up to this; `Retry-After` is honoured up to this too.
    pub max_backoff_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff_ms: 500,
            max_backoff_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AfterIngest {
    #[default]
    Keep,
    Delete,
    Move,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct WatchConfig {
    /// Required: the directory the exports land in, watched recursively.
    pub dir: Option<PathBuf>,
    /// Globs on the path relative to `dir`, any depth.
    pub include: Vec<String>,
    /// Temp names of sync tools.
    pub exclude: Vec<String>,
    /// A file with no change for this long is complete.
    pub settle_secs: u64,
    /// Full scan beside inotify, which can overflow or miss events.
    pub rescan_interval_secs: u64,
    /// The longest line (CSV: record) read; a longer one is quarantined with its size. One
    /// session is one line, and an active user's is megabytes. At most this much of one line is
    /// held in memory at a time.
    pub max_line_bytes: usize,
    /// Threads that parse, map and serialize a file's records (its commits stay in order, on
    /// one thread); 0, the default, is one per core.
    pub ingest_threads: usize,
    /// Leanplum shards wait for their job's `-output-manifest`.
    pub require_manifest: bool,
    pub after_ingest: AfterIngest,
    pub move_to: PathBuf,
}

impl WatchConfig {
    /// `ingest_threads` with 0 resolved: one per core (at least 1).
    pub(crate) fn ingest_threads(&self) -> usize {
        match self.ingest_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            dir: None,
            include: vec!["**/*".into()],
            exclude: vec!["**/*.tmp".into(), "**/.*".into(), "**/*.partial".into()],
            settle_secs: 5,
            rescan_interval_secs: 30,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            ingest_threads: 0,
            require_manifest: false,
            after_ingest: AfterIngest::Keep,
            move_to: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SpoolConfig {
    pub dir: PathBuf,
    /// Live spooled bytes beyond which reading stops (draining goes on; nothing is dropped).
    pub max_bytes: u64,
    /// An event id seen within this many days is skipped (Leanplum re-exports sessions).
    pub dedupe_window_days: u64,
    /// Quarantined, parked and dead-lettered entries older than this are dropped (logged).
    pub keep_bad_days: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from("/var/lib/leanplum-segment-agent"),
            max_bytes: 10_737_418_240,
            dedupe_window_days: 14,
            keep_bad_days: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MappingConfig {
    /// `messages.json` and `abtests.json`, flat form or Leanplum API responses.
    pub catalog_dir: PathBuf,
    pub unknown_message_channel: UnknownChannel,
    pub send_experiment_viewed: bool,
    /// `name` (as Leanplum's own Segment source) or `subject` (the catalog's, else the name).
    pub email_subject: EmailSubject,
}

impl Default for MappingConfig {
    fn default() -> Self {
        MappingConfig {
            catalog_dir: PathBuf::from("/etc/leanplum-segment-agent/catalog"),
            unknown_message_channel: UnknownChannel::Park,
            send_experiment_viewed: true,
            email_subject: EmailSubject::Name,
        }
    }
}

/// Fetching the catalog from Leanplum's API (SPEC section 3). The content read-only key comes
/// from `content_key_file`, `$LEANPLUM_CONTENT_KEY` or `$CREDENTIALS_DIRECTORY/leanplum_content_key`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LeanplumConfig {
    pub app_id: String,
    /// Empty means unset (the default in SPEC's sample config).
    pub content_key_file: PathBuf,
    pub api_base: String,
    pub refresh_interval_secs: u64,
    /// For each API call, connect to end.
    pub request_timeout_secs: u64,
    /// As `segment.proxy`, for the calls to Leanplum.
    pub proxy: ProxyUrl,
    /// As `segment.ca_file`, for the calls to Leanplum.
    pub ca_file: PathBuf,
}

impl Default for LeanplumConfig {
    fn default() -> Self {
        LeanplumConfig {
            app_id: String::new(),
            content_key_file: PathBuf::new(),
            api_base: "https://api.leanplum.com".into(),
            refresh_interval_secs: 3600,
            request_timeout_secs: 30,
            proxy: ProxyUrl::default(),
            ca_file: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ControlConfig {
    pub socket: PathBuf,
    /// A loopback `host:port` for a Prometheus text endpoint (`GET /metrics`); off when unset.
    pub metrics_listen: Option<String>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from("/run/leanplum-segment-agent/control.sock"),
            metrics_listen: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LogConfig {
    /// A tracing filter (`info`, `debug`, `leanplum_segment_agent=debug`); `RUST_LOG` overrides.
    pub level: String,
    /// `text` or `json` (one object per line), for logs not going to journald.
    pub format: LogFormat,
}

/// How log lines are written when they do not go to journald.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// A secret: the Segment write key or Leanplum's content key. Debug and Display print a
/// placeholder, so a key can never reach a log line or an error message by accident; only
/// [`Secret::expose`] gives the text.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub(crate) struct Secret(String);

/// The Segment write key.
pub(crate) type WriteKey = Secret;

impl Secret {
    #[cfg(test)]
    pub(crate) fn new(key: impl Into<String>) -> Secret {
        Secret(key.into())
    }
    /// The key itself, for the request that needs it and nothing else.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A proxy URL (`segment.proxy`, `leanplum.proxy`), empty when unset. It may carry
/// `user:password@`: Debug and Display show it without them; only [`ProxyUrl::expose`] gives
/// the text.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub(crate) struct ProxyUrl(String);

impl ProxyUrl {
    #[cfg(test)]
    pub(crate) fn new(url: impl Into<String>) -> ProxyUrl {
        ProxyUrl(url.into())
    }
    pub(crate) fn is_set(&self) -> bool {
        !self.0.trim().is_empty()
    }
    /// The URL itself, credentials included, for the HTTP client and nothing else.
    pub(crate) fn expose(&self) -> &str {
        self.0.trim()
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({:?})", crate::transport::redact(&self.0))
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::transport::redact(&self.0))
    }
}

/// Where a key came from, for a log line that says so without saying the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeySource {
    File(PathBuf),
    Inline,
    /// The environment variable's name.
    Env(&'static str),
    Credential(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "file {}", p.display()),
            KeySource::Inline => f.write_str("segment.write_key"),
            KeySource::Env(var) => write!(f, "${var}"),
            KeySource::Credential(p) => write!(f, "systemd credential {}", p.display()),
        }
    }
}

/// What the daemon will do with a config: `run` needs everything, `dry-run` only the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Run,
    DryRun,
    /// `status` and `dead-letter`: they need the socket and spool paths, not the key.
    Inspect,
}

impl Config {
    /// Deserializes only; see [`Config::validate`].
    pub(crate) fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|message| Error::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text. The error is toml's message, which names the key and the line; values
    /// are never echoed for the write key because toml reports positions, not contents, for it.
    pub(crate) fn parse(text: &str) -> Result<Config, String> {
        toml::from_str::<Config>(text).map_err(|e| describe_toml_error(text, &e))
    }

    /// Loads, validates for `purpose`, and resolves the write key (for `Run`).
    pub(crate) fn load_and_validate(path: &Path, purpose: Purpose) -> Result<Loaded, Error> {
        let config = Config::load(path)?;
        let mut problems = config.validate(purpose);
        let mut resolve = |found: Result<(Secret, KeySource), Problem>| match found {
            Ok(k) => Some(k),
            Err(p) => {
                problems.push(p);
                None
            }
        };
        let key = (purpose == Purpose::Run).then(|| resolve(config.resolve_write_key()));
        let content_key = (purpose == Purpose::Run && config.leanplum.is_some())
            .then(|| resolve(config.resolve_content_key()));
        // The catalog files are part of what `run` starts with: one that cannot be read or
        // parsed is a config problem (exit 78), so systemd does not restart into it forever.
        let catalog_dir = &config.mapping.catalog_dir;
        let catalog = (purpose == Purpose::Run && catalog_dir.is_absolute()).then(|| {
            crate::catalog::load_files(catalog_dir)
                .map_err(|e| {
                    problems.push(Problem {
                        key: "mapping.catalog_dir".into(),
                        message: e.to_string(),
                    })
                })
                .ok()
        });
        if !problems.is_empty() {
            return Err(Error::Invalid {
                path: path.to_owned(),
                problems,
            });
        }
        Ok(Loaded {
            config,
            key: key.flatten(),
            content_key: content_key.flatten(),
            catalog: catalog.flatten(),
        })
    }

    /// Every problem, each with its key path. Does not touch the write key (see
    /// [`Config::resolve_write_key`]) beyond checking that at most one inline source is set.
    pub(crate) fn validate(&self, purpose: Purpose) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut bad = |key: &str, message: String| {
            p.push(Problem {
                key: key.into(),
                message,
            })
        };
        let s = &self.segment;
        if s.write_key.is_some() && s.write_key_file.is_some() {
            bad(
                "segment.write_key",
                "set write_key or write_key_file, not both".into(),
            );
        }
        if let Err(e) = validate_endpoint(&s.endpoint) {
            bad("segment.endpoint", e);
        }
        if s.max_batch_bytes < 1024 || s.max_batch_bytes > 500_000 {
            bad(
                "segment.max_batch_bytes",
                format!(
                    "{} is outside 1024..=500000 (Segment rejects bodies over 500 KB)",
                    s.max_batch_bytes
                ),
            );
        }
        if s.max_batch_events == 0 || s.max_batch_events > 2500 {
            bad(
                "segment.max_batch_events",
                format!(
                    "{} is outside 1..=2500 (Segment drops the excess of a larger batch)",
                    s.max_batch_events
                ),
            );
        }
        // Upper bounds keep every sum of a time and a setting from overflowing (an Instant
        // plus u64::MAX seconds panics) and catch a unit mistake (ms given as s).
        let mut within = |key: &str, value: u64, lo: u64, hi: u64, unit: &str| {
            if !(lo..=hi).contains(&value) {
                bad(key, format!("{value} is outside {lo}..={hi} ({unit})"));
            }
        };
        within(
            "segment.flush_interval_ms",
            s.flush_interval_ms,
            1,
            3_600_000,
            "milliseconds",
        );
        within(
            "segment.request_timeout_secs",
            s.request_timeout_secs,
            1,
            3600,
            "seconds",
        );
        within(
            "retry.initial_backoff_ms",
            self.retry.initial_backoff_ms,
            1,
            3_600_000,
            "milliseconds",
        );
        within(
            "retry.max_backoff_secs",
            self.retry.max_backoff_secs,
            1,
            86_400,
            "seconds",
        );
        within(
            "watch.settle_secs",
            self.watch.settle_secs,
            0,
            86_400,
            "seconds",
        );
        within(
            "watch.rescan_interval_secs",
            self.watch.rescan_interval_secs,
            1,
            86_400,
            "seconds",
        );
        within(
            "spool.dedupe_window_days",
            self.spool.dedupe_window_days,
            1,
            3650,
            "days",
        );
        if let Some(lp) = &self.leanplum {
            within(
                "leanplum.refresh_interval_secs",
                lp.refresh_interval_secs,
                10,
                2_592_000,
                "seconds",
            );
        }
        if let Concurrency::Fixed(n) = s.concurrency
            && !(1..=MAX_CONCURRENCY).contains(&n)
        {
            bad(
                "segment.concurrency",
                format!("{n} is outside 1..={MAX_CONCURRENCY} (or \"adaptive\")"),
            );
        }
        if !(1..=MAX_CONCURRENCY).contains(&s.max_concurrency) {
            bad(
                "segment.max_concurrency",
                format!("{} is outside 1..={MAX_CONCURRENCY}", s.max_concurrency),
            );
        }
        let mut network = vec![("segment", &s.proxy, &s.ca_file)];
        if let Some(lp) = &self.leanplum {
            network.push(("leanplum", &lp.proxy, &lp.ca_file));
        }
        for (section, proxy, ca_file) in network {
            if proxy.is_set()
                && let Err(e) = crate::transport::check_proxy(proxy.expose())
            {
                bad(&format!("{section}.proxy"), e);
            }
            // Read and parsed here, so `check-config` and a reload catch a broken file; `dry-run`
            // sends nothing and `status` connects nowhere.
            if !ca_file.as_os_str().is_empty() {
                if !ca_file.is_absolute() {
                    bad(
                        &format!("{section}.ca_file"),
                        format!("{} must be an absolute path", ca_file.display()),
                    );
                } else if purpose == Purpose::Run
                    && let Err(e) = crate::transport::load_ca_file(ca_file)
                {
                    bad(&format!("{section}.ca_file"), e);
                }
            }
        }
        let r = &self.retry;
        if r.initial_backoff_ms > r.max_backoff_secs.saturating_mul(1000) {
            bad(
                "retry.initial_backoff_ms",
                "is larger than retry.max_backoff_secs".into(),
            );
        }
        let w = &self.watch;
        if purpose == Purpose::Run {
            match &w.dir {
                None => bad("watch.dir", "is required".into()),
                Some(d) if !d.is_absolute() => bad(
                    "watch.dir",
                    format!("{} must be an absolute path", d.display()),
                ),
                _ => {}
            }
            // The daemon may change directory (--daemonize), so relative paths would move.
            for (key, path) in [
                ("spool.dir", &self.spool.dir),
                ("mapping.catalog_dir", &self.mapping.catalog_dir),
                ("control.socket", &self.control.socket),
            ] {
                if !path.is_absolute() {
                    bad(key, format!("{} must be an absolute path", path.display()));
                }
            }
        }
        for (key, globs) in [("watch.include", &w.include), ("watch.exclude", &w.exclude)] {
            for g in globs {
                if let Err(e) = globset::Glob::new(g) {
                    bad(key, format!("{g:?}: {e}"));
                }
            }
        }
        if !(MIN_MAX_LINE_BYTES..=MAX_MAX_LINE_BYTES).contains(&w.max_line_bytes) {
            bad(
                "watch.max_line_bytes",
                format!(
                    "{} is outside {MIN_MAX_LINE_BYTES}..={MAX_MAX_LINE_BYTES} (1 KiB to 1 GiB)",
                    w.max_line_bytes
                ),
            );
        }
        if w.ingest_threads > MAX_INGEST_THREADS {
            bad(
                "watch.ingest_threads",
                format!(
                    "{} is over {MAX_INGEST_THREADS} (0 is one per core)",
                    w.ingest_threads
                ),
            );
        }
        if w.after_ingest == AfterIngest::Move {
            if w.move_to.as_os_str().is_empty() {
                bad(
                    "watch.move_to",
                    "is required when after_ingest = \"move\"".into(),
                );
            } else if let Some(dir) = &w.dir
                && w.move_to.starts_with(dir)
            {
                bad(
                    "watch.move_to",
                    "must be outside watch.dir (moved files would be read again)".into(),
                );
            }
        }
        if self.spool.max_bytes < 1 << 20 {
            bad("spool.max_bytes", "must be at least 1 MiB".into());
        }
        if !(1..=36_500).contains(&self.spool.keep_bad_days) {
            bad(
                "spool.keep_bad_days",
                "must be from 1 to 36500 (days)".into(),
            );
        }
        if let Some(lp) = &self.leanplum {
            if lp.app_id.is_empty() {
                bad(
                    "leanplum.app_id",
                    "is required in a [leanplum] section".into(),
                );
            }
            if let Err(e) = validate_endpoint(&lp.api_base) {
                bad("leanplum.api_base", e);
            }
            if !(1..=600).contains(&lp.request_timeout_secs) {
                bad(
                    "leanplum.request_timeout_secs",
                    "must be between 1 and 600".into(),
                );
            }
        }
        if let Some(listen) = &self.control.metrics_listen {
            match listen.parse::<std::net::SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => {}
                Ok(_) => bad(
                    "control.metrics_listen",
                    format!("{listen} is not a loopback address (the endpoint has no auth)"),
                ),
                Err(e) => bad("control.metrics_listen", format!("{listen:?}: {e}")),
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            bad("log.level", format!("{:?}: {e}", self.log.level));
        }
        p
    }

    /// Finds the write key: `write_key_file`, `write_key`, `$SEGMENT_WRITE_KEY`, then
    /// `$CREDENTIALS_DIRECTORY/write_key` (systemd `LoadCredential=`), in that order.
    pub(crate) fn resolve_write_key(&self) -> Result<(WriteKey, KeySource), Problem> {
        let problem = |message: String| Problem {
            key: "segment.write_key_file".into(),
            message,
        };
        if let Some(path) = &self.segment.write_key_file {
            let key = read_key_file(path).map_err(problem)?;
            return Ok((key, KeySource::File(path.clone())));
        }
        if let Some(key) = &self.segment.write_key {
            if key.expose().trim().is_empty() {
                return Err(Problem {
                    key: "segment.write_key".into(),
                    message: "is empty".into(),
                });
            }
            return Ok((key.clone(), KeySource::Inline));
        }
        if let Some(found) = key_from_environment("SEGMENT_WRITE_KEY", "write_key") {
            return found.map_err(problem);
        }
        Err(Problem {
            key: "segment.write_key_file".into(),
            message: "no write key: set segment.write_key_file, segment.write_key, \
                      $SEGMENT_WRITE_KEY, or a systemd credential named write_key"
                .into(),
        })
    }

    /// Finds Leanplum's content read-only key: `leanplum.content_key_file`,
    /// `$LEANPLUM_CONTENT_KEY`, then `$CREDENTIALS_DIRECTORY/leanplum_content_key`.
    pub(crate) fn resolve_content_key(&self) -> Result<(Secret, KeySource), Problem> {
        let problem = |message: String| Problem {
            key: "leanplum.content_key_file".into(),
            message,
        };
        let configured = self
            .leanplum
            .as_ref()
            .map(|l| l.content_key_file.clone())
            .filter(|p| !p.as_os_str().is_empty());
        if let Some(path) = configured {
            let key = read_key_file(&path).map_err(problem)?;
            return Ok((key, KeySource::File(path)));
        }
        if let Some(found) = key_from_environment("LEANPLUM_CONTENT_KEY", "leanplum_content_key") {
            return found.map_err(problem);
        }
        Err(problem(
            "no content key: set leanplum.content_key_file, $LEANPLUM_CONTENT_KEY, \
             or a systemd credential named leanplum_content_key"
                .into(),
        ))
    }
}

/// A validated config and, for `run`, its write key, (with a `[leanplum]` section) the
/// Leanplum content key, and the catalog files of `mapping.catalog_dir`.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub config: Config,
    pub key: Option<(WriteKey, KeySource)>,
    pub content_key: Option<(Secret, KeySource)>,
    pub catalog: Option<crate::catalog::LoadedFiles>,
}

/// A key from the environment variable `var`, else from the systemd credential `credential`
/// (`$CREDENTIALS_DIRECTORY/<credential>`); `None` when neither is set.
fn key_from_environment(
    var: &'static str,
    credential: &str,
) -> Option<Result<(Secret, KeySource), String>> {
    if let Ok(key) = std::env::var(var)
        && !key.trim().is_empty()
    {
        return Some(Ok((Secret(key.trim().to_owned()), KeySource::Env(var))));
    }
    let path = Path::new(&std::env::var_os("CREDENTIALS_DIRECTORY")?).join(credential);
    path.exists()
        .then(|| read_key_file(&path).map(|key| (key, KeySource::Credential(path))))
}

fn read_key_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    warn_if_readable_by_others(path);
    Ok(Secret(key.to_owned()))
}

/// The key file should be private to the service user (mode 0600 or 0640 with a trusted group is
/// common; others reading it is never right).
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o044 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "key file is readable by group or others; chmod 600 it"
            );
        }
    }
}

fn validate_endpoint(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} must start with https:// or http://"))?;
    if rest.trim_end_matches('/').is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}

/// Turns toml's error into `key.path: message (line N)`. toml's own text quotes the source line,
/// which could be the write key's: we keep its message, never the quoted source, and for the
/// write key not even the message (it may echo the value).
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    let table_of = |l: &str| {
        l.strip_prefix('[')
            .and_then(|l| l.split(']').next())
            .map(|t| t.trim_matches(|c| c == '[' || c == ' ').to_owned())
    };
    let key = match table_of(line) {
        Some(table) => table,
        None => {
            let table = before.lines().rev().find_map(|l| table_of(l.trim()));
            let lhs = line.split('=').next().unwrap_or("").trim();
            match table {
                Some(t) if !lhs.is_empty() => format!("{t}.{lhs}"),
                Some(t) => t,
                None => lhs.to_owned(),
            }
        }
    };
    let mut message = e.message().trim().to_owned();
    if let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split('`').next())
        && !key.ends_with(field)
    {
        // The span points at the table, the field is the unknown key inside it.
        message = format!("unknown key `{field}`: {message}");
    }
    if key.ends_with("write_key") {
        message = "invalid value (expected a string)".into();
    }
    format!("{key}: {} (line {line_no})", without_values(&message))
}

/// serde's messages quote the value they refused (``unknown variant `x` ``, `invalid type:
/// string "x"`), and a secret pasted into the wrong key would be printed: the values go.
fn without_values(message: &str) -> String {
    let mut out = message.to_owned();
    if let Some(rest) = out.strip_prefix("unknown variant `")
        && let Some((_, tail)) = rest.split_once('`')
    {
        out = format!("unknown value{tail}");
    }
    while let Some(start) = out.find("string \"") {
        let after = start + "string \"".len();
        match out[after..].find('"') {
            Some(end) => out.replace_range(start..after + end + 1, "a string"),
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_values_are_not_quoted_back() {
        assert_eq!(
            without_values("unknown variant `wk_secret`, expected `text` or `json`"),
            "unknown value, expected `text` or `json`"
        );
        assert_eq!(
            without_values("invalid type: string \"wk_secret\", expected u64"),
            "invalid type: a string, expected u64"
        );
        let e =
            Config::parse(&format!("{}[log]\nformat = \"wk_secret\"\n", minimal())).unwrap_err();
        assert!(e.contains("log.format") && !e.contains("wk_secret"), "{e}");
    }

    fn minimal() -> &'static str {
        "[segment]\nwrite_key = \"wk_secret\"\n[watch]\ndir = \"/tmp/in\"\n"
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::parse(minimal()).unwrap();
        assert_eq!(c.segment.endpoint, "https://api.segment.io");
        assert_eq!(c.segment.max_batch_bytes, 475_000);
        assert_eq!(c.segment.max_batch_events, 2500);
        assert_eq!(c.segment.flush_interval_ms, 1000);
        assert_eq!(c.segment.request_timeout_secs, 30);
        assert!(c.segment.gzip);
        assert_eq!(c.segment.concurrency, Concurrency::Adaptive);
        assert_eq!(c.segment.max_concurrency, 32);
        assert_eq!(c.segment.max_events_per_sec, 0);
        assert_eq!(c.retry.initial_backoff_ms, 500);
        assert_eq!(c.retry.max_backoff_secs, 300);
        assert_eq!(c.watch.include, vec!["**/*"]);
        assert_eq!(c.watch.exclude, vec!["**/*.tmp", "**/.*", "**/*.partial"]);
        assert_eq!(c.watch.settle_secs, 5);
        assert_eq!(c.watch.rescan_interval_secs, 30);
        assert_eq!(c.watch.max_line_bytes, 67_108_864);
        assert_eq!(c.watch.ingest_threads, 0);
        assert!(c.watch.ingest_threads() >= 1);
        assert!(!c.watch.require_manifest);
        assert_eq!(c.watch.after_ingest, AfterIngest::Keep);
        assert_eq!(
            c.spool.dir,
            PathBuf::from("/var/lib/leanplum-segment-agent")
        );
        assert_eq!(c.spool.max_bytes, 10_737_418_240);
        assert_eq!(c.spool.dedupe_window_days, 14);
        assert_eq!(
            c.mapping.catalog_dir,
            PathBuf::from("/etc/leanplum-segment-agent/catalog")
        );
        assert_eq!(c.mapping.unknown_message_channel, UnknownChannel::Park);
        assert_eq!(c.mapping.email_subject, EmailSubject::Name);
        assert!(c.mapping.send_experiment_viewed);
        assert!(c.leanplum.is_none());
        assert_eq!(
            c.control.socket,
            PathBuf::from("/run/leanplum-segment-agent/control.sock")
        );
        assert_eq!(c.log.level, "info");
        assert!(!c.segment.proxy.is_set());
        assert_eq!(c.segment.ca_file, PathBuf::new());
        assert!(c.validate(Purpose::Run).is_empty());
    }

    /// `proxy` and `ca_file` in both sections: checked at load with the key named, and the
    /// proxy's credentials never in a problem, Debug or Display.
    #[test]
    fn proxy_and_ca_file_are_checked_with_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let config = |segment: &str, leanplum: &str| {
            Config::parse(&format!(
                "[segment]\nwrite_key = \"wk\"\n{segment}\n[watch]\ndir = \"/tmp/in\"\n\
                 [leanplum]\napp_id = \"a\"\n{leanplum}\n"
            ))
            .unwrap()
        };
        let keys = |c: &Config, purpose| -> Vec<String> {
            c.validate(purpose).into_iter().map(|p| p.key).collect()
        };
        let c = config(
            "proxy = \"http://alice:s3cret@proxy.corp:3128\"",
            "proxy = \"https://proxy.corp:443\"",
        );
        assert_eq!(keys(&c, Purpose::Run), Vec::<String>::new());
        assert_eq!(
            c.segment.proxy.expose(),
            "http://alice:s3cret@proxy.corp:3128"
        );
        assert!(!format!("{c:?} {}", c.segment.proxy).contains("s3cret"));

        let c = config(
            &format!(
                "proxy = \"ftp://alice:s3cret@proxy.corp:21\"\nca_file = {:?}",
                missing.to_str().unwrap()
            ),
            &format!(
                "proxy = \"http://proxy.corp\"\nca_file = {:?}",
                not_pem.to_str().unwrap()
            ),
        );
        let problems = c.validate(Purpose::Run);
        assert_eq!(
            keys(&c, Purpose::Run),
            [
                "segment.proxy",
                "segment.ca_file",
                "leanplum.proxy",
                "leanplum.ca_file"
            ]
        );
        let text = format!("{problems:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("cannot read"), "{text}");
        assert!(text.contains("no certificate"), "{text}");
        // dry-run and status reach no network: the files are not read for them.
        assert_eq!(
            keys(&c, Purpose::DryRun),
            ["segment.proxy", "leanplum.proxy"]
        );
        let relative = Config::parse("[segment]\nca_file = \"ca.pem\"\n").unwrap();
        assert_eq!(keys(&relative, Purpose::DryRun), ["segment.ca_file"]);
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/config.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.validate(Purpose::Run), vec![]);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse("[segment]\nendpoint = \"http://x\"\nbogus = 1\n").unwrap_err();
        assert!(err.starts_with("segment.bogus: unknown field"), "{err}");
        assert!(err.ends_with("(line 3)"), "{err}");
        let err = Config::parse("[nope]\n").unwrap_err();
        assert!(err.starts_with("nope: unknown field"), "{err}");
        let err = Config::parse("[watch]\nsettle_secs = \"x\"\n").unwrap_err();
        assert!(err.starts_with("watch.settle_secs: invalid type"), "{err}");
    }

    #[test]
    fn validate_names_every_bad_key() {
        let c = Config::parse(
            "[segment]\nwrite_key = \"k\"\nwrite_key_file = \"/k\"\nmax_batch_events = 0\n\
             max_batch_bytes = 900000\nconcurrency = 0\nendpoint = \"ftp://x\"\n\
             [watch]\nafter_ingest = \"move\"\ninclude = [\"[\"]\n[log]\nlevel = \"=[\"\n",
        )
        .unwrap();
        let keys: Vec<String> = c
            .validate(Purpose::Run)
            .into_iter()
            .map(|p| p.key)
            .collect();
        for k in [
            "segment.write_key",
            "segment.max_batch_events",
            "segment.max_batch_bytes",
            "segment.concurrency",
            "segment.endpoint",
            "watch.dir",
            "watch.move_to",
            "watch.include",
            "log.level",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn times_have_upper_bounds() {
        let c = Config::parse(&format!(
            "{}flush_interval_ms = 9223372036854775807\nrequest_timeout_secs = 0\n\
             [retry]\nmax_backoff_secs = 999999999\n[watch]\nsettle_secs = 99999999\n\
             [spool]\ndedupe_window_days = 100000\n",
            minimal().replace("[watch]\ndir = \"/tmp/in\"\n", "")
        ))
        .unwrap();
        let problems = c.validate(Purpose::Run);
        for k in [
            "segment.flush_interval_ms",
            "segment.request_timeout_secs",
            "retry.max_backoff_secs",
            "watch.settle_secs",
            "spool.dedupe_window_days",
        ] {
            assert!(
                problems
                    .iter()
                    .any(|p| p.key == k && p.message.contains("outside")),
                "{k}: {problems:?}"
            );
        }
        assert!(
            Config::parse(minimal())
                .unwrap()
                .validate(Purpose::Run)
                .is_empty()
        );
    }

    #[test]
    fn concurrency_is_a_positive_number_or_adaptive() {
        let parse = |v: &str| Config::parse(&format!("[segment]\nconcurrency = {v}\n"));
        assert_eq!(
            parse("\"adaptive\"").unwrap().segment.concurrency,
            Concurrency::Adaptive
        );
        assert_eq!(
            parse("16").unwrap().segment.concurrency,
            Concurrency::Fixed(16)
        );
        for wrong in ["\"fast\"", "-1", "2.5", "true"] {
            let err = parse(wrong).unwrap_err();
            assert!(err.starts_with("segment.concurrency: "), "{wrong}: {err}");
            assert!(err.contains(r#"a positive integer or "adaptive""#), "{err}");
        }
        for (text, key) in [
            ("concurrency = 0", "segment.concurrency"),
            ("concurrency = 65", "segment.concurrency"),
            ("max_concurrency = 0", "segment.max_concurrency"),
            ("max_concurrency = 100", "segment.max_concurrency"),
        ] {
            let c = Config::parse(&format!("[segment]\n{text}\n")).unwrap();
            let p = c.validate(Purpose::DryRun);
            assert_eq!(p.len(), 1, "{text}: {p:?}");
            assert_eq!(p[0].key, key);
        }
        let c = Config::parse("[segment]\nmax_events_per_sec = 200\n").unwrap();
        assert_eq!(c.segment.max_events_per_sec, 200);
    }

    #[test]
    fn max_line_bytes_is_bounded_and_named() {
        let problems = |value: u64| {
            Config::parse(&format!("{}max_line_bytes = {value}\n", minimal()))
                .unwrap()
                .validate(Purpose::DryRun)
        };
        for ok in [1024, 67_108_864, 1 << 30] {
            assert_eq!(problems(ok), vec![], "{ok}");
        }
        for wrong in [0, 1023, (1 << 30) + 1] {
            let p = problems(wrong);
            assert_eq!(p.len(), 1, "{wrong}: {p:?}");
            assert_eq!(p[0].key, "watch.max_line_bytes");
            assert!(p[0].message.starts_with(&wrong.to_string()), "{}", p[0]);
        }
        let err = Config::parse("[watch]\nmax_line_bytes = -1\n").unwrap_err();
        assert!(err.starts_with("watch.max_line_bytes"), "{err}");
    }

    #[test]
    fn ingest_threads_default_to_the_cores_and_are_bounded() {
        let parse = |line: &str| Config::parse(&format!("{}{line}\n", minimal())).unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(parse("ingest_threads = 0").watch.ingest_threads(), cores);
        let three = parse("ingest_threads = 3");
        assert_eq!(three.watch.ingest_threads(), 3);
        assert_eq!(three.validate(Purpose::DryRun), vec![]);
        let p = parse("ingest_threads = 257").validate(Purpose::DryRun);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "watch.ingest_threads");
        assert!(p[0].message.starts_with("257 is over 256"), "{}", p[0]);
    }

    #[test]
    fn dry_run_needs_no_watch_dir() {
        let c = Config::parse("").unwrap();
        assert!(c.validate(Purpose::DryRun).is_empty());
        assert!(!c.validate(Purpose::Run).is_empty());
    }

    #[test]
    fn the_write_key_never_prints() {
        let c = Config::parse(minimal()).unwrap();
        let (key, source) = c.resolve_write_key().unwrap();
        assert_eq!(key.expose(), "wk_secret");
        assert_eq!(source, KeySource::Inline);
        assert!(!format!("{key} {key:?} {c:?}").contains("wk_secret"));
        // A TOML error on the key's own line must not quote it.
        let err = Config::parse("[segment]\nwrite_key = \"wk_secret\" junk\n").unwrap_err();
        assert!(!err.contains("wk_secret"), "{err}");
        let err = Config::parse("[segment]\nwrite_key = 12345678\n").unwrap_err();
        assert!(!err.contains("12345678"), "{err}");
    }

    #[test]
    fn the_write_key_comes_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("write_key");
        std::fs::write(&path, "wk_from_file\n").unwrap();
        let c = Config::parse(&format!(
            "[segment]\nwrite_key_file = {:?}\n",
            path.to_str().unwrap()
        ))
        .unwrap();
        let (key, source) = c.resolve_write_key().unwrap();
        assert_eq!(key.expose(), "wk_from_file");
        assert_eq!(source, KeySource::File(path));
        let missing = Config::parse("[segment]\nwrite_key_file = \"/nonexistent/k\"\n").unwrap();
        let p = missing.resolve_write_key().unwrap_err();
        assert_eq!(p.key, "segment.write_key_file");
    }

    /// `check-config`, `run` and SIGHUP load the catalog files with the config: a file that
    /// does not parse is a problem of `mapping.catalog_dir` naming the file (exit 78), and the
    /// files that do parse come back with the config.
    #[test]
    fn the_catalog_files_are_loaded_and_checked_with_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = dir.path().join("catalog");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[segment]\nwrite_key = \"wk\"\n[watch]\ndir = \"/tmp/in\"\n\
                 [mapping]\ncatalog_dir = {:?}\n",
                catalog.to_str().unwrap()
            ),
        )
        .unwrap();
        // No directory yet: an empty catalog, as at start.
        let loaded = Config::load_and_validate(&config, Purpose::Run).unwrap();
        assert_eq!(loaded.catalog.unwrap().catalog.len_messages(), 0);

        std::fs::create_dir(&catalog).unwrap();
        std::fs::write(
            catalog.join("messages.json"),
            r#"[{"id": 1, "channel": "email"}]"#,
        )
        .unwrap();
        let loaded = Config::load_and_validate(&config, Purpose::Run).unwrap();
        assert_eq!(loaded.catalog.unwrap().catalog.len_messages(), 1);
        assert!(
            Config::load_and_validate(&config, Purpose::Inspect)
                .unwrap()
                .catalog
                .is_none()
        );

        std::fs::write(
            catalog.join("messages.json"),
            "<html><title>500 Internal Server Error</title></html>",
        )
        .unwrap();
        let err = Config::load_and_validate(&config, Purpose::Run).unwrap_err();
        let Error::Invalid { problems, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(problems.len(), 1, "{err}");
        assert_eq!(problems[0].key, "mapping.catalog_dir");
        let text = err.to_string();
        assert!(
            text.contains(&*catalog.join("messages.json").to_string_lossy()),
            "{text}"
        );
        assert!(!text.contains("Internal Server Error"), "{text}");
    }
}
