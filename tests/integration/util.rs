//! The harness every integration test shares: a fake Segment server, the agent as a child
//! process, a config builder, file helpers (atomic and slow writes) and polling.
// Later tests (crash, outage, status) use helpers that the current ones do not.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde_json::Value;

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

/// The `Authorization` header value Segment expects for `key`: `Basic base64(key + ":")`.
pub fn basic_auth(key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
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

// ---------------------------------------------------------------------------------------------
// Fake Segment server
// ---------------------------------------------------------------------------------------------

/// One scripted answer of the fake Segment server.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait this long before answering (on top of the server-wide delay), e.g. to provoke the
    /// agent's request timeout.
    pub delay: Duration,
}

impl Reply {
    /// What Segment answers to a good batch: 200 `{"success":true}`.
    pub fn ok() -> Reply {
        Reply::status(200)
    }

    /// An answer with this status and a Segment-like JSON body.
    pub fn status(status: u16) -> Reply {
        let body = if (200..300).contains(&status) {
            r#"{"success":true}"#.to_string()
        } else {
            format!(r#"{{"success":false,"status":{status}}}"#)
        };
        Reply {
            status,
            headers: Vec::new(),
            body,
            delay: Duration::ZERO,
        }
    }

    /// Adds a response header, e.g. `Retry-After`.
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Answers only after `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// One request the fake server received, and what it answered.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Arrival order, from 0.
    pub seq: usize,
    pub received_at: Instant,
    /// Wall-clock arrival, to compare with the request's `sentAt`.
    pub received_wall: SystemTime,
    /// When the answer was written (None while the server is still delaying it).
    pub answered_at: Option<Instant>,
    pub method: String,
    /// Path and query as sent, e.g. `/v1/batch`.
    pub path: String,
    /// Headers in arrival order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body exactly as received (gzip when `Content-Encoding: gzip`).
    pub raw_body: Vec<u8>,
    /// The body after undoing `Content-Encoding` (what `max_batch_bytes` limits).
    pub plain_body: Vec<u8>,
    /// `plain_body` parsed as JSON, when it parses.
    pub json: Option<Value>,
    /// Why the body could not be read, gunzipped or parsed, if it could not.
    pub body_error: Option<String>,
    /// Whether `Authorization` carried the expected write key.
    pub auth_ok: bool,
    /// The status the server answered (401 when `auth_ok` is false).
    pub status: u16,
    /// Writing the answer failed (the agent had hung up, e.g. after its request timeout).
    pub respond_error: Option<String>,
}

impl RecordedRequest {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Answered 2xx: Segment took the batch.
    pub fn is_accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The events of `batch` (empty when the body is not a batch).
    pub fn events(&self) -> Vec<Value> {
        self.json
            .as_ref()
            .and_then(|j| j.get("batch"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// The `messageId` of every event in the batch, in batch order.
    pub fn message_ids(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| {
                e.get("messageId")
                    .and_then(Value::as_str)
                    .unwrap_or("<no messageId>")
                    .to_string()
            })
            .collect()
    }

    /// The batch envelope's `sentAt`.
    pub fn sent_at(&self) -> Option<String> {
        self.json
            .as_ref()?
            .get("sentAt")?
            .as_str()
            .map(str::to_string)
    }

    fn batch_len(&self) -> usize {
        self.json
            .as_ref()
            .and_then(|j| j.get("batch"))
            .and_then(Value::as_array)
            .map_or(0, Vec::len)
    }
}

/// How the server answers: a queue consumed one reply per authenticated batch request, then
/// a default; plus a delay applied to every answer.
struct Plan {
    script: VecDeque<Reply>,
    default: Reply,
    delay: Duration,
    /// Consulted before the script: see [`SegmentServer::set_rule`].
    rule: Option<ReplyRule>,
}

/// Decides the answer to an authenticated, well-formed batch from its `messageId`s (in batch
/// order): `Some` answers, `None` falls through to the script and the default.
pub type ReplyRule = Arc<dyn Fn(&[String]) -> Option<Reply> + Send + Sync>;

struct Shared {
    expected_auth: String,
    plan: Mutex<Plan>,
    requests: Mutex<Vec<RecordedRequest>>,
}

/// Number of threads serving requests at once: above the most requests the agent sends at once
/// (`max_concurrency`, default 32, since `concurrency = "adaptive"` became the default), so a
/// delayed answer never holds up the others.
const SERVER_WORKERS: usize = 40;

/// A fake Segment Tracking API on `127.0.0.1:<random port>`: records every request and answers
/// from a scriptable plan. Stops (and closes its port) when dropped.
pub struct SegmentServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl SegmentServer {
    /// Starts a server that expects [`WRITE_KEY`].
    pub fn start() -> SegmentServer {
        SegmentServer::start_with_key(WRITE_KEY)
    }

    /// Starts a server that expects `write_key` in Basic auth and answers 401 otherwise.
    pub fn start_with_key(write_key: &str) -> SegmentServer {
        let http = tiny_http::Server::http("127.0.0.1:0").expect("bind the fake Segment server");
        SegmentServer::serve_on(http, write_key)
    }

    /// Starts a server expecting [`WRITE_KEY`] on `127.0.0.1:port`, e.g. a port an agent was
    /// already told to use while nothing listened on it. Retries the bind for a few seconds.
    pub fn start_on(port: u16) -> SegmentServer {
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let http = loop {
            match tiny_http::Server::http(&addr) {
                Ok(http) => break http,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("bind {addr}: {e}; retrying");
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("bind the fake Segment server on {addr}: {e}"),
            }
        };
        SegmentServer::serve_on(http, WRITE_KEY)
    }

    fn serve_on(http: tiny_http::Server, write_key: &str) -> SegmentServer {
        let http = Arc::new(http);
        let addr = http
            .server_addr()
            .to_ip()
            .expect("fake Segment server listens on TCP");
        let shared = Arc::new(Shared {
            expected_auth: basic_auth(write_key),
            plan: Mutex::new(Plan {
                script: VecDeque::new(),
                default: Reply::ok(),
                delay: Duration::ZERO,
                rule: None,
            }),
            requests: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..SERVER_WORKERS)
            .map(|i| {
                let (http, shared, stop) =
                    (Arc::clone(&http), Arc::clone(&shared), Arc::clone(&stop));
                thread::Builder::new()
                    .name(format!("fake-segment-{i}"))
                    .spawn(move || serve(&http, &shared, &stop))
                    .expect("spawn a fake Segment server thread")
            })
            .collect();
        SegmentServer {
            addr,
            shared,
            stop,
            workers,
        }
    }

    /// Where the server listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The endpoint to put in the config: `http://127.0.0.1:<port>` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues replies, consumed one per authenticated `POST /v1/batch`, before the default.
    pub fn push_replies(&self, replies: impl IntoIterator<Item = Reply>) {
        self.plan().script.extend(replies);
    }

    /// Replaces what the server answers once the script is used up (e.g. 503 for an outage,
    /// then back to [`Reply::ok`]).
    pub fn set_default(&self, reply: Reply) {
        self.plan().default = reply;
    }

    /// Delays every answer by `delay` from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.plan().delay = delay;
    }

    /// Scripted replies not yet consumed.
    pub fn pending_replies(&self) -> usize {
        self.plan().script.len()
    }

    /// Answers batches by `rule` (see [`ReplyRule`]) from now on, before the script.
    pub fn set_rule(&self, rule: impl Fn(&[String]) -> Option<Reply> + Send + Sync + 'static) {
        self.plan().rule = Some(Arc::new(rule));
    }

    /// Back to the script and the default only.
    pub fn clear_rule(&self) {
        self.plan().rule = None;
    }

    /// Answers `status` to any batch holding one of `ids` (a bad event, as Segment's 400
    /// does), and as usual otherwise.
    pub fn reject_message_ids(&self, ids: HashSet<String>, status: u16) {
        self.set_rule(move |batch| {
            batch
                .iter()
                .any(|id| ids.contains(id))
                .then(|| Reply::status(status))
        });
    }

    /// How many times each `messageId` was accepted (in requests answered 2xx).
    pub fn accepted_id_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for id in self.accepted_message_ids() {
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    /// Waits until every id in `ids` was accepted at least once; false on timeout.
    pub fn wait_for_ids(&self, ids: &[String], timeout: Duration) -> bool {
        wait_until(timeout, || {
            let counts = self.accepted_id_counts();
            ids.iter().all(|id| counts.contains_key(id))
        })
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.recorded().clone()
    }

    /// Requests answered 2xx, in arrival order.
    pub fn accepted_requests(&self) -> Vec<RecordedRequest> {
        self.recorded()
            .iter()
            .filter(|r| r.is_accepted())
            .cloned()
            .collect()
    }

    /// Events of requests answered 2xx, in arrival order (duplicates kept, so tests can count).
    pub fn accepted_events(&self) -> Vec<Value> {
        self.recorded()
            .iter()
            .filter(|r| r.is_accepted())
            .flat_map(RecordedRequest::events)
            .collect()
    }

    /// `messageId`s of [`Self::accepted_events`], in the same order.
    pub fn accepted_message_ids(&self) -> Vec<String> {
        self.recorded()
            .iter()
            .filter(|r| r.is_accepted())
            .flat_map(|r| r.message_ids())
            .collect()
    }

    /// Number of events in requests answered 2xx (duplicates counted).
    pub fn accepted_count(&self) -> usize {
        self.recorded()
            .iter()
            .filter(|r| r.is_accepted())
            .map(RecordedRequest::batch_len)
            .sum()
    }

    /// Waits until at least `n` events were accepted; false on timeout.
    pub fn wait_for_accepted(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.accepted_count() >= n)
    }

    /// Waits until at least `n` requests arrived; false on timeout.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.recorded().len() >= n)
    }

    /// Waits until `quiet` passes with no new request, i.e. the agent has nothing left to send
    /// (or has stopped trying); false when requests keep coming until `timeout`.
    pub fn wait_for_quiet(&self, quiet: Duration, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut seen = self.recorded().len();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            let now = self.recorded().len();
            if now != seen {
                seen = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return true;
            }
        }
        false
    }

    fn plan(&self) -> MutexGuard<'_, Plan> {
        self.shared
            .plan
            .lock()
            .expect("fake Segment plan lock poisoned")
    }

    fn recorded(&self) -> MutexGuard<'_, Vec<RecordedRequest>> {
        self.shared
            .requests
            .lock()
            .expect("fake Segment request log lock poisoned")
    }
}

impl Drop for SegmentServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// One worker's loop: take requests until told to stop (checked every 100 ms).
fn serve(http: &tiny_http::Server, shared: &Shared, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match http.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(request)) => handle(shared, request),
            Ok(None) => {}
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Records one request, picks its answer (401 for a bad key, 404 off `/v1/batch`, 400 for a
/// body that is not JSON, else the plan), and answers after the planned delay.
fn handle(shared: &Shared, mut request: tiny_http::Request) {
    let received_at = Instant::now();
    let received_wall = SystemTime::now();
    let method = request.method().as_str().to_string();
    let path = request.url().to_string();
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_string(),
                h.value.as_str().to_string(),
            )
        })
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };

    let mut raw_body = Vec::new();
    let mut body_error = request
        .as_reader()
        .read_to_end(&mut raw_body)
        .err()
        .map(|e| format!("read: {e}"));
    let gzipped =
        header("content-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("gzip"));
    let plain_body = if gzipped {
        let mut plain = Vec::new();
        if let Err(e) = flate2::read::GzDecoder::new(raw_body.as_slice()).read_to_end(&mut plain) {
            body_error.get_or_insert(format!("gunzip: {e}"));
        }
        plain
    } else {
        raw_body.clone()
    };
    let json = match serde_json::from_slice::<Value>(&plain_body) {
        Ok(v) => Some(v),
        Err(e) => {
            body_error.get_or_insert(format!("json: {e}"));
            None
        }
    };
    let auth_ok = header("authorization").as_deref() == Some(shared.expected_auth.as_str());
    let batch_ids: Vec<String> = json
        .as_ref()
        .and_then(|j| j.get("batch"))
        .and_then(Value::as_array)
        .map(|events| {
            events
                .iter()
                .map(|e| {
                    e.get("messageId")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default();

    let (reply, delay) = {
        let mut plan = shared.plan.lock().expect("fake Segment plan lock poisoned");
        let reply = if method != "POST" || path != "/v1/batch" {
            Reply::status(404)
        } else if !auth_ok {
            Reply::status(401)
        } else if body_error.is_some() {
            Reply::status(400)
        } else if let Some(reply) = plan.rule.as_ref().and_then(|rule| rule(&batch_ids)) {
            reply
        } else {
            plan.script
                .pop_front()
                .unwrap_or_else(|| plan.default.clone())
        };
        let delay = plan.delay + reply.delay;
        (reply, delay)
    };

    let seq = {
        let mut log = shared
            .requests
            .lock()
            .expect("fake Segment request log lock poisoned");
        let seq = log.len();
        log.push(RecordedRequest {
            seq,
            received_at,
            received_wall,
            answered_at: None,
            method,
            path,
            headers,
            raw_body,
            plain_body,
            json,
            body_error,
            auth_ok,
            status: reply.status,
            respond_error: None,
        });
        seq
    };

    if !delay.is_zero() {
        thread::sleep(delay);
    }
    let mut response = tiny_http::Response::from_data(reply.body.into_bytes())
        .with_status_code(reply.status)
        .with_header(
            tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                .expect("a valid header"),
        );
    for (name, value) in &reply.headers {
        response = response.with_header(
            tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes())
                .expect("a valid scripted header"),
        );
    }
    let result = request.respond(response);

    let mut log = shared
        .requests
        .lock()
        .expect("fake Segment request log lock poisoned");
    log[seq].answered_at = Some(Instant::now());
    log[seq].respond_error = result.err().map(|e| e.to_string());
}

// ---------------------------------------------------------------------------------------------
// Config builder
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// One test's world
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// The agent as a child process
// ---------------------------------------------------------------------------------------------

/// A `Command` for the binary with an environment that cannot change what a test means:
/// no `RUST_LOG` (the config's level applies), no key from the environment, no systemd
/// variables (which would send logs to journald or notifications to a foreign socket), and no
/// proxy variables.
pub fn agent_command() -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "RUST_LOG",
        "SEGMENT_WRITE_KEY",
        "CREDENTIALS_DIRECTORY",
        "NOTIFY_SOCKET",
        "JOURNAL_STREAM",
        "INVOCATION_ID",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        // A proxy of the machine running the tests would carry (or break) the requests to
        // the loopback servers; the proxy tests set these themselves.
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "REQUEST_METHOD",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// The daemon (`run --config PATH`) running in the background. Its stderr and stdout are
/// appended to `agent.stderr.log` / `agent.stdout.log` beside the config, so restarts of the
/// same test share one log. Dropping it kills the process (SIGKILL) so no orphan outlives a
/// failed test.
pub struct Agent {
    child: Child,
    exit: Option<ExitStatus>,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
}

impl Agent {
    /// Spawns `run --config config_path`.
    pub fn start(config_path: &Path) -> Agent {
        let dir = config_path.parent().expect("config path has a parent dir");
        let stderr_path = dir.join("agent.stderr.log");
        let stdout_path = dir.join("agent.stdout.log");
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        };
        let child = agent_command()
            .arg("run")
            .arg("--config")
            .arg(config_path)
            .current_dir(dir)
            .stdout(open(&stdout_path))
            .stderr(open(&stderr_path))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        Agent {
            child,
            exit: None,
            stderr_path,
            stdout_path,
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) unless the process has already been reaped.
    pub fn signal(&mut self, signal: i32) {
        if self.try_exit().is_none() {
            send_signal(self.pid(), signal);
        }
    }

    /// SIGTERM, then waits up to [`STOP_TIMEOUT`]; the exit status, or None if it did not exit
    /// in time (it is killed when dropped).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_within(STOP_TIMEOUT)
    }

    /// SIGTERM, then waits up to `timeout`.
    pub fn stop_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// SIGKILL (a crash: nothing flushed on the way out) and reap; the exit status.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.try_exit() {
            return status;
        }
        send_signal(self.pid(), libc::SIGKILL);
        self.wait_exit(STOP_TIMEOUT)
            .expect("a SIGKILLed process exits")
    }

    /// The exit status if the process has exited (on its own or after a signal).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("poll the agent process");
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.try_exit().is_some());
        self.exit
    }

    /// Not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Everything the agent wrote to stderr so far (its log).
    pub fn logs(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// Everything the agent wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// The last `lines` lines of the log, to explain a failure.
    pub fn log_tail(&self, lines: usize) -> String {
        let logs = self.logs();
        let all: Vec<&str> = logs.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the log contains `needle`; false on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.logs().contains(needle))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends a signal to a process we spawned and have not reaped yet.
#[allow(unsafe_code)]
fn send_signal(pid: u32, signal: i32) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; `pid` is our own
    // unreaped child, so it cannot have been recycled for another process.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

/// A file's text (lossy UTF-8), empty when it does not exist yet.
fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// What a short-lived command (`check-config`, `dry-run`, `status`) did.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// The exit code (panics if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self:?}"))
    }

    /// stdout and stderr together, for "the message names the key" checks.
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs the binary with `args` to completion, killing it after `timeout` (a hang is a test
/// failure, not a stuck test run).
pub fn run_cli(args: &[&std::ffi::OsStr], timeout: Duration) -> CmdOutput {
    let out = tempfile::tempfile().expect("temp file for stdout");
    let err = tempfile::tempfile().expect("temp file for stderr");
    let mut child = agent_command()
        .args(args)
        .stdout(out.try_clone().expect("clone stdout file"))
        .stderr(err.try_clone().expect("clone stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().expect("poll the command");
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("`{BIN} {args:?}` did not finish within {timeout:?}");
    };
    let read_all = |mut f: File| {
        use std::io::Seek;
        f.rewind().expect("rewind output file");
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).expect("read output file");
        String::from_utf8_lossy(&bytes).into_owned()
    };
    CmdOutput {
        status,
        stdout: read_all(out),
        stderr: read_all(err),
    }
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// Writes `path` the way sync tools do: all of it to `.<name>.tmp` beside it, then a rename
/// into place, so the watcher only ever sees the complete file under its final name.
pub fn write_atomically(path: &Path, contents: &[u8]) {
    let parent = path.parent().expect("file has a parent dir");
    fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    let name = path
        .file_name()
        .expect("file has a name")
        .to_str()
        .expect("UTF-8 file name");
    let tmp = parent.join(format!(".{name}.tmp"));
    let mut file = File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
    file.write_all(contents).expect("write temp file");
    file.sync_all().expect("sync temp file");
    drop(file);
    fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), path.display()));
}

/// Writes `path` in place, chunk by chunk with `pause` between chunks, as a slow download
/// would: the watcher sees the file grow (possibly with a partial last line) until it settles.
pub fn write_slowly<C: AsRef<[u8]>>(path: &Path, chunks: &[C], pause: Duration) {
    let parent = path.parent().expect("file has a parent dir");
    fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    let mut file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            thread::sleep(pause);
        }
        file.write_all(chunk.as_ref()).expect("write a chunk");
        file.flush().expect("flush a chunk");
    }
}

/// Copies a repository file (e.g. [`SHARD_0`]) to `dest` in place, creating parent dirs.
pub fn copy_into(relative: &str, dest: &Path) {
    let parent = dest.parent().expect("destination has a parent dir");
    fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    fs::copy(repo_path(relative), dest)
        .unwrap_or_else(|e| panic!("copy {relative} -> {}: {e}", dest.display()));
}

/// Reads a repository file.
pub fn read_repo_file(relative: &str) -> Vec<u8> {
    fs::read(repo_path(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

/// The file name part of a repository path.
pub fn file_name(relative: &str) -> &str {
    relative
        .rsplit('/')
        .next()
        .expect("a path has a last component")
}

/// True when `dir` does not exist or holds nothing.
pub fn dir_is_absent_or_empty(dir: &Path) -> bool {
    match fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => panic!("read dir {}: {e}", dir.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// Generated inputs and delivery checks (fault, crash and spool-limit tests)
// ---------------------------------------------------------------------------------------------

/// Catalog messages (`examples/catalog/messages.json`) and actions that each map to exactly one
/// Segment event, so a generated export's expected events are one per message event.
const GENERATED_ACTIONS: [(&str, &str, &str); 4] = [
    ("5680127476129675", "Open", "Email Opened"),
    (
        "5175843646007627",
        "Delivered",
        "Push Notification Received",
    ),
    ("4350571203541773", "Open", "Push Notification Tapped"),
    ("6634839652083743", "Click", "Email Link Clicked"),
];

/// Message events per generated session line.
const GENERATED_EVENTS_PER_SESSION: usize = 5;

/// A generated Leanplum session export and the Segment events it must produce.
#[derive(Debug, Clone)]
pub struct GeneratedExport {
    /// JSON lines, one session per line (SPEC section 4.1).
    pub bytes: Vec<u8>,
    /// `lp-e-<eventId>` of every message event, in file order.
    pub message_ids: Vec<String>,
    /// The Segment event name of each, in the same order.
    pub event_names: Vec<String>,
}

/// A Leanplum session export (JSON lines) with `n` message events whose eventIds are
/// `first_event_id .. first_event_id + n`, five per session, cycling through catalog messages
/// and actions that map to one Segment event each. Give every test (and every file of a test)
/// its own id range, e.g. `7_000_000_000_000_000_000 + i`: above 2^53, as Leanplum's are.
pub fn session_export(first_event_id: u64, n: usize) -> GeneratedExport {
    let mut bytes = Vec::new();
    let mut message_ids = Vec::with_capacity(n);
    let mut event_names = Vec::with_capacity(n);
    let mut i = 0usize;
    while i < n {
        let session_no = first_event_id / GENERATED_EVENTS_PER_SESSION as u64 + i as u64;
        let start = 1_793_800_000.0 + (i as f64) * 8.0;
        let mut events = Vec::new();
        for j in 0..GENERATED_EVENTS_PER_SESSION.min(n - i) {
            let event_id = first_event_id + (i + j) as u64;
            let (message, action, segment_name) =
                GENERATED_ACTIONS[(event_id % GENERATED_ACTIONS.len() as u64) as usize];
            let mut event = serde_json::json!({
                "eventId": event_id,
                "name": format!(".m{message} {action}"),
                "time": start + 1.0 + j as f64,
                "value": 0.0,
            });
            if action == "Click" {
                event["parameters"] = serde_json::json!({"url": format!("https://example.com/it/{event_id}"), "index": 2});
            }
            events.push(event);
            message_ids.push(format!("lp-e-{event_id}"));
            event_names.push(segment_name.to_string());
        }
        let session = serde_json::json!({
            "sessionId": (session_no % 9_000_000_000_000_000 + 1_000_000_000_000_000).to_string(),
            "userId": format!("gen-user-{}", session_no % 97),
            "deviceId": format!("GEN-DEV-{:08}", session_no % 1_000_003),
            "time": start,
            "locale": "en_US",
            "timezone": "Europe/Berlin",
            "country": "DE",
            "region": "BE",
            "city": "Berlin",
            "appVersion": "4.2.0",
            "systemName": "Android",
            "systemVersion": "14",
            "deviceModel": "Pixel 8",
            "experiments": [],
            "states": [{"stateId": 1, "events": events}],
        });
        serde_json::to_writer(&mut bytes, &session).expect("serialize a session");
        bytes.push(b'\n');
        i += GENERATED_EVENTS_PER_SESSION;
    }
    GeneratedExport {
        bytes,
        message_ids,
        event_names,
    }
}

/// One Leanplum session line (no newline) of an active user: `app_events` app events with
/// parameters (about 130 bytes each: 40,000 make 5 MB), spread over states of 500, and
/// `engagements` message engagements among them, eventIds `first_event_id ..`, cycling through
/// catalog messages and actions that map to one Segment event each. Returns the line and the
/// engagements' messageIds in line order.
pub fn long_session_line(
    first_event_id: u64,
    app_events: usize,
    engagements: usize,
) -> (Vec<u8>, Vec<String>) {
    use std::fmt::Write as _;
    let start = 1_793_900_000.0;
    let every = (app_events / engagements.max(1)).max(1);
    let mut events: Vec<String> = Vec::with_capacity(app_events + engagements);
    let mut ids = Vec::with_capacity(engagements);
    for i in 0..app_events {
        if i % every == 0 && ids.len() < engagements {
            let event_id = first_event_id + ids.len() as u64;
            let (message, action, _) =
                GENERATED_ACTIONS[(event_id % GENERATED_ACTIONS.len() as u64) as usize];
            let params = if action == "Click" {
                format!(
                    r#","parameters":{{"url":"https://example.com/long/{event_id}","index":1}}"#
                )
            } else {
                String::new()
            };
            events.push(format!(
                r#"{{"eventId":{event_id},"name":".m{message} {action}","time":{},"value":0.0{params}}}"#,
                start + i as f64 * 0.5 + 0.25
            ));
            ids.push(lp_id(event_id));
        }
        events.push(format!(
            r#"{{"eventId":{},"name":"View Item","time":{},"value":1.5,"parameters":{{"sku":"SKU-{i:08}","query":"long session {i} of an active user","qty":{}}}}}"#,
            first_event_id + 500_000 + i as u64,
            start + i as f64 * 0.5,
            i % 9 + 1
        ));
    }
    while ids.len() < engagements {
        let event_id = first_event_id + ids.len() as u64;
        events.push(format!(
            r#"{{"eventId":{event_id},"name":".m{EMAIL_MESSAGE} Open","time":{start}}}"#
        ));
        ids.push(lp_id(event_id));
    }
    let mut line = format!(
        r#"{{"sessionId":"{first_event_id}","userId":"long-user","deviceId":"LONG-{first_event_id}","time":{start},"locale":"en_US","country":"DE","experiments":[],"states":["#
    );
    for (n, state) in events.chunks(500).enumerate() {
        if n > 0 {
            line.push(',');
        }
        let _ = write!(line, r#"{{"stateId":{n},"events":[{}]}}"#, state.join(","));
    }
    line.push_str("]}");
    (line.into_bytes(), ids)
}

/// A size as the agent writes it in reasons: `1572916` -> `1,572,916`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Writes `count` generated export files of `per_file` events each into `dir` (atomically,
/// as sync tools do), eventIds from `first_event_id` on; returns every expected messageId.
pub fn drop_session_files(
    dir: &Path,
    prefix: &str,
    first_event_id: u64,
    count: usize,
    per_file: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(count * per_file);
    for f in 0..count {
        let export = session_export(first_event_id + (f * per_file) as u64, per_file);
        write_atomically(&dir.join(format!("{prefix}-{f:03}")), &export.bytes);
        ids.extend(export.message_ids);
    }
    ids
}

/// What the server accepted, compared with what was expected, by messageId.
#[derive(Debug, Default)]
pub struct DeliveryReport {
    /// Expected, never accepted.
    pub missing: Vec<String>,
    /// Accepted, never expected.
    pub unexpected: Vec<String>,
    /// Accepted more than once: (messageId, times).
    pub repeated: Vec<(String, usize)>,
    /// Deliveries beyond the first, summed over all messageIds.
    pub extra_deliveries: usize,
}

impl DeliveryReport {
    /// Compares the server's accepted messageIds with `expected`.
    pub fn of(server: &SegmentServer, expected: &[String]) -> DeliveryReport {
        let counts = server.accepted_id_counts();
        let wanted: HashSet<&str> = expected.iter().map(String::as_str).collect();
        let mut report = DeliveryReport {
            missing: expected
                .iter()
                .filter(|id| !counts.contains_key(*id))
                .cloned()
                .collect(),
            ..DeliveryReport::default()
        };
        for (id, n) in counts {
            if !wanted.contains(id.as_str()) {
                report.unexpected.push(id.clone());
            }
            if n > 1 {
                report.extra_deliveries += n - 1;
                report.repeated.push((id, n));
            }
        }
        report
    }

    /// Every expected id accepted at least once, nothing else.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }

    /// Complete, and nothing accepted twice.
    pub fn is_exactly_once(&self) -> bool {
        self.is_complete() && self.repeated.is_empty()
    }

    /// A short account for assertion messages (first few ids of each kind).
    pub fn summary(&self) -> String {
        let few = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>();
        format!(
            "{} missing {:?}, {} unexpected {:?}, {} accepted more than once {:?} ({} extra deliveries)",
            self.missing.len(),
            few(&self.missing),
            self.unexpected.len(),
            few(&self.unexpected),
            self.repeated.len(),
            self.repeated.iter().take(5).collect::<Vec<_>>(),
            self.extra_deliveries
        )
    }
}

/// Asserts that every id in `expected` was accepted exactly once and nothing else was.
pub fn assert_exactly_once(server: &SegmentServer, expected: &[String], agent: &Agent, what: &str) {
    let report = DeliveryReport::of(server, expected);
    assert!(
        report.is_exactly_once(),
        "{what}: {}\nstatuses: {:?}\nagent log tail:\n{}",
        report.summary(),
        server
            .requests()
            .iter()
            .map(|r| r.status)
            .collect::<Vec<_>>(),
        agent.log_tail(40)
    );
}

/// A loopback port nothing listens on (bound, read, released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// How many log lines contain `needle`.
pub fn count_log_lines(logs: &str, needle: &str) -> usize {
    logs.lines().filter(|l| l.contains(needle)).count()
}

/// Opens a stopped agent's spool with the library (the agent must not be running: sled locks
/// its files) and returns its dead letters.
pub fn dead_letters(spool_dir: &Path) -> Vec<leanplum_segment_agent::spool::DeadLetter> {
    let spool = leanplum_segment_agent::spool::Spool::open(spool_dir, 8 << 20)
        .unwrap_or_else(|e| panic!("open the spool {}: {e}", spool_dir.display()));
    spool
        .letters()
        .dead_letters()
        .expect("read the dead letters")
        .into_iter()
        .map(|(_, d)| d)
        .collect()
}

/// Requests that arrived in `[from, to)`.
pub fn requests_between(
    requests: &[RecordedRequest],
    from: Instant,
    to: Instant,
) -> Vec<RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.received_at >= from && r.received_at < to)
        .cloned()
        .collect()
}

// =============================================================================================
// Input-file helpers (input_files, bad_input, input_model): `status --json` and
// `dead-letter list --json` through the CLI, one-event session lines, gzip, and an agent run as
// an unprivileged user. (Block added for the input-file tests; helpers above are unchanged.)
// =============================================================================================

/// A catalog email message (`examples/catalog/messages.json`): `.m<id> Open` in a session maps to
/// exactly one "Email Opened" event.
pub const EMAIL_MESSAGE: &str = "5680127476129675";

/// The Segment `messageId` of a Leanplum message event: `lp-e-<eventId>`.
pub fn lp_id(event_id: u64) -> String {
    format!("lp-e-{event_id}")
}

/// One Leanplum session line (no newline) holding one email open, with eventId `event_id` and
/// device `D-<event_id>`: it maps to one "Email Opened" event with messageId `lp-e-<event_id>`.
pub fn open_session_line(event_id: u64) -> String {
    format!(
        r#"{{"deviceId":"D-{event_id}","time":1793534899.612,"experiments":[],"states":[{{"events":[{{"eventId":{event_id},"name":".m{EMAIL_MESSAGE} Open","time":1793534900.5}}]}}]}}"#
    )
}

/// `n` newline-terminated session lines for eventIds `first .. first + n` (one event each),
/// and their messageIds in file order.
pub fn open_session_lines(first: u64, n: usize) -> (Vec<u8>, Vec<String>) {
    let mut bytes = Vec::new();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n as u64 {
        bytes.extend_from_slice(open_session_line(first + i).as_bytes());
        bytes.push(b'\n');
        ids.push(lp_id(first + i));
    }
    (bytes, ids)
}

/// `bytes` gzipped (one member).
pub fn gzip_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip in memory");
    enc.finish().expect("gzip in memory")
}

/// `status --config <config_path> --json` as JSON (works with the agent running or stopped).
pub fn status_json(config_path: &Path) -> Value {
    let out = run_cli(
        &[
            "status".as_ref(),
            "--config".as_ref(),
            config_path.as_os_str(),
            "--json".as_ref(),
        ],
        PATIENCE,
    );
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "`status --json` printed no JSON object ({e}); exit {:?}\n{}",
            out.status.code(),
            out.all_output()
        )
    })
}

/// One counter of [`status_json`] (panics when the field is missing or not a number).
pub fn status_u64(status: &Value, field: &str) -> u64 {
    status
        .get(field)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("status has no numeric {field:?}: {status}"))
}

/// Polls [`status_json`] every 200 ms until `cond` holds; the last report, or None on timeout.
pub fn wait_for_status(
    config_path: &Path,
    timeout: Duration,
    mut cond: impl FnMut(&Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = status_json(config_path);
        if cond(&status) {
            return Some(status);
        }
        if Instant::now() >= deadline {
            eprintln!("status never matched; last: {status}");
            return None;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `dead-letter list --config <config_path> --json`: every entry (quarantine and dead letters).
pub fn dead_letter_list(config_path: &Path) -> Vec<Value> {
    let out = run_cli(
        &[
            "dead-letter".as_ref(),
            "list".as_ref(),
            "--config".as_ref(),
            config_path.as_os_str(),
            "--json".as_ref(),
        ],
        PATIENCE,
    );
    assert_eq!(
        out.code(),
        0,
        "dead-letter list failed:\n{}",
        out.all_output()
    );
    match serde_json::from_str(out.stdout.trim()) {
        Ok(Value::Array(entries)) => entries,
        other => panic!(
            "`dead-letter list --json` printed no JSON array: {other:?}\n{}",
            out.all_output()
        ),
    }
}

/// The `quarantine` entries of [`dead_letter_list`].
pub fn quarantine_list(config_path: &Path) -> Vec<Value> {
    dead_letter_list(config_path)
        .into_iter()
        .filter(|e| e["kind"] == "quarantine")
        .collect()
}

/// Runs `dead-letter <verb> [args] --config <config_path>` and returns what it did.
pub fn dead_letter_cmd(config_path: &Path, verb: &str, args: &[&str]) -> CmdOutput {
    let mut argv: Vec<&std::ffi::OsStr> = vec!["dead-letter".as_ref(), verb.as_ref()];
    argv.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    argv.push("--config".as_ref());
    argv.push(config_path.as_os_str());
    run_cli(&argv, PATIENCE)
}

/// Lines of the agent's log that say it is ready (one per start that got that far).
pub fn ready_lines(logs: &str) -> usize {
    logs.lines()
        .filter(|l| l.trim_end().ends_with(": ready"))
        .count()
}

/// Whether this process runs as root (which reads any file, whatever its mode).
#[allow(unsafe_code)]
pub fn running_as_root() -> bool {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() == 0 }
}

impl Agent {
    /// Spawns `<binary> run --config config_path` as `uid`:`gid` (the test must be root), with
    /// the same log files as [`Agent::start`]. For tests of file permissions, which root ignores.
    pub fn start_as(binary: &Path, config_path: &Path, uid: u32, gid: u32) -> Agent {
        use std::os::unix::process::CommandExt as _;
        let dir = config_path.parent().expect("config path has a parent dir");
        let stderr_path = dir.join("agent.stderr.log");
        let stdout_path = dir.join("agent.stdout.log");
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        };
        // The same scrubbed environment as `agent_command`, for another program path.
        let template = agent_command();
        let mut cmd = Command::new(binary);
        for (name, value) in template.get_envs() {
            match value {
                Some(value) => cmd.env(name, value),
                None => cmd.env_remove(name),
            };
        }
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(config_path)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(open(&stdout_path))
            .stderr(open(&stderr_path))
            .uid(uid)
            .gid(gid)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} as {uid}: {e}", binary.display()));
        Agent {
            child,
            exit: None,
            stderr_path,
            stdout_path,
        }
    }
}

// =============================================================================================
// Service helpers (service.rs): the agent spawned from a prepared command (systemd variables,
// a wrapper), signals to processes that are not our children (a daemon), process liveness.
// (Block added for the service tests; helpers above are unchanged.)
// =============================================================================================

/// A `Command` for `program` with [`agent_command`]'s scrubbed environment, e.g. `sh` wrapping
/// the agent; add `NOTIFY_SOCKET` and friends with `.env()` afterwards.
pub fn scrubbed_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (name, value) in agent_command().get_envs() {
        match value {
            Some(value) => cmd.env(name, value),
            None => cmd.env_remove(name),
        };
    }
    cmd.stdin(Stdio::null());
    cmd
}

impl Agent {
    /// Spawns a prepared `cmd` (program, arguments, environment) with the working directory
    /// and log files of [`Agent::start`]. `cmd` must end up exec'ing the agent in the spawned
    /// process, so that [`Agent::pid`] and signals reach the agent.
    pub fn spawn_logged(mut cmd: Command, config_path: &Path) -> Agent {
        let dir = config_path.parent().expect("config path has a parent dir");
        let stderr_path = dir.join("agent.stderr.log");
        let stdout_path = dir.join("agent.stdout.log");
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        };
        let child = cmd
            .current_dir(dir)
            .stdout(open(&stdout_path))
            .stderr(open(&stderr_path))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Agent {
            child,
            exit: None,
            stderr_path,
            stdout_path,
        }
    }
}

/// Sends `signal` to any process, e.g. a daemon that is not our child.
#[allow(unsafe_code)]
pub fn kill_pid(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    match unsafe { libc::kill(pid, signal) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Whether `pid` is a live process: present in `/proc` and not a zombie (a daemon's parent is
/// pid 1, which in a container may never reap it).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
