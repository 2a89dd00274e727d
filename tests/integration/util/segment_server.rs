//! The fake Segment Tracking API: records every request (or, for the benchmarks, only counts
//! them) and answers from a scriptable plan: a rule on the batch's `messageId`s, a script of
//! replies, a default, a delay.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde_json::Value;

use super::http;
use super::{WRITE_KEY, wait_until};

/// The `Authorization` header value Segment expects for `key`: `Basic base64(key + ":")`.
pub fn basic_auth(key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

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
    /// Events in the batch (in a counting server: `"messageId"` keys in the body).
    pub event_count: usize,
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
    /// The `Authorization` value that is accepted (401 otherwise).
    expected_auth: String,
    /// Keep bodies and parse them (tests), or only count the events (benchmarks).
    record: bool,
    plan: Mutex<Plan>,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
}

/// A fake Segment Tracking API on `127.0.0.1:<random port>`: records every request and answers
/// from a scriptable plan. Stops (and closes its port) when dropped.
pub struct SegmentServer {
    shared: Arc<Shared>,
    http: http::Server,
}

impl SegmentServer {
    /// Starts a server that expects [`WRITE_KEY`].
    pub fn start() -> SegmentServer {
        SegmentServer::start_with_key(WRITE_KEY)
    }

    /// Starts a server that expects `write_key` in Basic auth and answers 401 otherwise.
    pub fn start_with_key(write_key: &str) -> SegmentServer {
        SegmentServer::serve_on(http::bind(0), write_key, true)
    }

    /// Starts a server expecting [`WRITE_KEY`] on `127.0.0.1:port`, e.g. a port an agent was
    /// already told to use while nothing listened on it. Retries the bind for a few seconds.
    pub fn start_on(port: u16) -> SegmentServer {
        SegmentServer::serve_on(http::bind(port), WRITE_KEY, true)
    }

    /// A server for throughput (the benchmarks): requests are recorded without their bodies
    /// ([`RecordedRequest::event_count`] counts `"messageId"` keys, `json` is None; a body is
    /// gunzipped a piece at a time, never held whole, and is not parsed) and rules are not
    /// consulted (they need the ids); the script, the default and the delay apply.
    pub fn start_counting() -> SegmentServer {
        SegmentServer::serve_on(http::bind(0), WRITE_KEY, false)
    }

    fn serve_on(listener: std::net::TcpListener, write_key: &str, record: bool) -> SegmentServer {
        let shared = Arc::new(Shared {
            expected_auth: basic_auth(write_key),
            record,
            plan: Mutex::new(Plan {
                script: VecDeque::new(),
                default: Reply::ok(),
                delay: Duration::ZERO,
                rule: None,
            }),
            requests: Arc::default(),
        });
        let http = http::Server::serve(listener, Arc::clone(&shared) as Arc<dyn http::Handler>);
        SegmentServer { shared, http }
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.http.addr()
    }

    /// The endpoint to put in the config: `http://127.0.0.1:<port>` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
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

    /// Answers batches by `rule` (see [`ReplyRule`]) from now on, before the script.
    pub fn set_rule(&self, rule: impl Fn(&[String]) -> Option<Reply> + Send + Sync + 'static) {
        self.plan().rule = Some(Arc::new(rule));
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
            .map(|r| r.event_count)
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

impl http::Handler for Shared {
    /// Reads one request's body (gunzipped; parsed as JSON when recording, its `"messageId"`
    /// keys counted when counting) and answers it through [`Shared::reply`]: 400 for a body
    /// that does not gunzip or, when recording, is not JSON.
    fn answer(&self, request: http::Request) -> (http::Response, Option<http::Sent>) {
        let shared = self;
        let received_wall = SystemTime::now();
        let http::Request {
            received_at,
            method,
            path,
            headers,
            body: raw_body,
        } = request;
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let mut body_error = None;
        let gzipped =
            header("content-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("gzip"));
        if !shared.record {
            // Counting (the benchmarks): the same checks and count as below, without keeping
            // the plain body: gunzipped a piece at a time, so the server's share of the cores
            // stays small beside the agent it measures.
            let event_count = match count_message_ids(&raw_body, gzipped) {
                Ok(n) => n,
                Err(e) => {
                    body_error = Some(e);
                    0
                }
            };
            return shared.reply(
                RecordedRequest {
                    seq: 0,
                    received_at,
                    received_wall,
                    answered_at: None,
                    auth_ok: header("authorization").as_deref()
                        == Some(shared.expected_auth.as_str()),
                    method,
                    path,
                    headers,
                    raw_body: Vec::new(),
                    plain_body: Vec::new(),
                    json: None,
                    event_count,
                    body_error,
                    status: 0,
                    respond_error: None,
                },
                &[],
            );
        }
        let plain_body = if gzipped {
            let mut plain = Vec::with_capacity(raw_body.len() * 6);
            if let Err(e) =
                flate2::read::GzDecoder::new(raw_body.as_slice()).read_to_end(&mut plain)
            {
                body_error.get_or_insert(format!("gunzip: {e}"));
            }
            plain
        } else {
            raw_body.clone()
        };
        let (json, event_count) = match serde_json::from_slice::<Value>(&plain_body) {
            Ok(v) => {
                let n = v.get("batch").and_then(Value::as_array).map_or(0, Vec::len);
                (Some(v), n)
            }
            Err(e) => {
                body_error.get_or_insert(format!("json: {e}"));
                (None, 0)
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
        shared.reply(
            RecordedRequest {
                seq: 0,
                received_at,
                received_wall,
                answered_at: None,
                method,
                path,
                headers,
                raw_body,
                plain_body,
                json,
                event_count,
                body_error,
                auth_ok,
                status: 0,
                respond_error: None,
            },
            &batch_ids,
        )
    }
}

impl Shared {
    /// Picks the answer to a request read and checked (401 for a bad key, 404 off
    /// `/v1/batch`, 400 for a body that could not be read, else the plan), records the request
    /// with it, and answers after the planned delay.
    fn reply(
        &self,
        mut request: RecordedRequest,
        batch_ids: &[String],
    ) -> (http::Response, Option<http::Sent>) {
        let shared = self;
        let (reply, delay) = {
            let mut plan = shared.plan.lock().expect("fake Segment plan lock poisoned");
            let reply = if request.method != "POST" || request.path != "/v1/batch" {
                Reply::status(404)
            } else if !request.auth_ok {
                Reply::status(401)
            } else if request.body_error.is_some() {
                Reply::status(400)
            } else if let Some(reply) = plan
                .rule
                .as_ref()
                .filter(|_| shared.record)
                .and_then(|rule| rule(batch_ids))
            {
                reply
            } else {
                plan.script
                    .pop_front()
                    .unwrap_or_else(|| plan.default.clone())
            };
            let delay = plan.delay + reply.delay;
            (reply, delay)
        };
        request.status = reply.status;
        let seq = {
            let mut log = shared
                .requests
                .lock()
                .expect("fake Segment request log lock poisoned");
            let seq = log.len();
            request.seq = seq;
            log.push(request);
            seq
        };

        if !delay.is_zero() {
            thread::sleep(delay);
        }
        let mut response_headers =
            vec![("Content-Type".to_string(), "application/json".to_string())];
        response_headers.extend(reply.headers);
        let response = http::Response {
            status: reply.status,
            headers: response_headers,
            body: reply.body.into_bytes(),
        };
        let requests = Arc::clone(&shared.requests);
        let sent = move |error: Option<String>| {
            let mut log = requests
                .lock()
                .expect("fake Segment request log lock poisoned");
            log[seq].answered_at = Some(Instant::now());
            log[seq].respond_error = error;
        };
        (response, Some(Box::new(sent)))
    }
}

/// The `"messageId"` keys in a batch body, gunzipped first when `gzipped` (an error when it
/// does not gunzip: a broken stream, a wrong CRC-32 or length). The plain body is never held
/// whole: it is inflated 256 KiB at a time into one buffer per connection thread, each piece
/// starting with the last bytes of the one before, so a key cut in two is counted once (the
/// same count as one search of the whole plain body).
pub(crate) fn count_message_ids(body: &[u8], gzipped: bool) -> Result<usize, String> {
    const KEY: &[u8] = br#""messageId""#;
    if !gzipped {
        return Ok(memchr::memmem::find_iter(body, KEY).count());
    }
    thread_local! {
        static PIECE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 256 << 10]);
    }
    let finder = memchr::memmem::Finder::new(KEY);
    PIECE.with_borrow_mut(|piece| {
        let mut gz = flate2::read::GzDecoder::new(body);
        let (mut carried, mut count) = (0, 0);
        loop {
            let n = gz
                .read(&mut piece[carried..])
                .map_err(|e| format!("gunzip: {e}"))?;
            if n == 0 {
                return Ok(count);
            }
            let filled = carried + n;
            let mut counted_to = 0;
            for at in finder.find_iter(&piece[..filled]) {
                count += 1;
                counted_to = at + KEY.len();
            }
            // Fewer bytes than a key, and none of a key counted already: as one search over
            // the whole body would count.
            carried = (KEY.len() - 1).min(filled - counted_to);
            piece.copy_within(filled - carried..filled, 0);
        }
    })
}
