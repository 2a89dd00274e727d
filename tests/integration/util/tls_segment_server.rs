//! A Segment-compatible server over TLS on loopback that offers HTTP/2 and HTTP/1.1 by ALPN
//! (or HTTP/1.1 alone), for the tests and the round-trip benchmark's `--tls h1|h2`.
//!
//! Built on hyper 1 (its HTTP/1.1 and HTTP/2 server connections) and tokio-rustls on a tokio
//! runtime of its own, since the threaded [`super::http`] server speaks HTTP/1.1 only. Every
//! request is answered like the counting [`super::SegmentServer`]: the body gunzipped when
//! `Content-Encoding: gzip`, its events counted (`"messageId"` keys), 200 `{"success":true}`
//! after the configured delay; 401 when `Authorization` does not carry [`super::WRITE_KEY`].
//! It also counts the TLS connections (by the protocol ALPN chose) and the requests by HTTP
//! version, and can keep every accepted `messageId` ([`TlsSegmentServer::start_recording`]).
//!
//! [`TestPki`] is the test CA and the server certificate it signs for `localhost` and
//! `127.0.0.1`, shared with the `ca_file` tests; the agent trusts it through `segment.ca_file`.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::segment_server::count_message_ids;
use super::{WRITE_KEY, basic_auth, wait_until};

/// A test CA and a server certificate it signed for `localhost` and `127.0.0.1`.
pub struct TestPki {
    pub ca_pem: String,
    pub server_cert: rustls::pki_types::CertificateDer<'static>,
    pub server_key: Vec<u8>,
}

/// A fresh [`TestPki`].
pub fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "leanplum-segment-agent test root");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    TestPki {
        ca_pem: ca.pem(),
        server_cert: cert.der().clone(),
        server_key: key.serialize_der(),
    }
}

impl TestPki {
    /// A rustls server config with this certificate (ring, TLS 1.2 and 1.3), offering the
    /// `alpn` protocols (none: no ALPN, the client speaks HTTP/1.1).
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(self.server_key.clone());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key.into())
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// What the server offers by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// `http/1.1` only.
    H1,
    /// `h2`, then `http/1.1`: a client that can speak HTTP/2 picks it.
    H2,
}

impl Offer {
    /// `h1` or `h2`, as the benchmark's `--tls` takes it.
    pub fn parse(text: &str) -> Option<Offer> {
        match text {
            "h1" => Some(Offer::H1),
            "h2" => Some(Offer::H2),
            _ => None,
        }
    }

    fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Offer::H1 => &[b"http/1.1"],
            Offer::H2 => &[b"h2", b"http/1.1"],
        }
    }
}

#[derive(Default)]
struct State {
    delay_ms: AtomicU64,
    events: AtomicU64,
    accepted_requests: AtomicU64,
    first_request: OnceLock<Instant>,
    /// TLS connections that completed their handshake, by the protocol ALPN chose
    /// (`none` when it chose none).
    connections: Mutex<BTreeMap<String, u64>>,
    /// Requests by HTTP version (`HTTP/1.1`, `HTTP/2.0`).
    versions: Mutex<BTreeMap<String, u64>>,
    /// Every accepted `messageId`, in arrival order, when recording.
    ids: Option<Mutex<Vec<String>>>,
}

/// The server; it stops (its runtime shut down) when dropped.
pub struct TlsSegmentServer {
    addr: SocketAddr,
    pki: TestPki,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TlsSegmentServer {
    /// Counts events and keeps no ids (the benchmark's server).
    pub fn start_counting(offer: Offer) -> TlsSegmentServer {
        TlsSegmentServer::start(offer, None)
    }

    /// Also keeps every accepted `messageId` ([`Self::accepted_ids`]).
    pub fn start_recording(offer: Offer) -> TlsSegmentServer {
        TlsSegmentServer::start(offer, Some(Mutex::default()))
    }

    fn start(offer: Offer, ids: Option<Mutex<Vec<String>>>) -> TlsSegmentServer {
        let pki = test_pki();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(offer.alpn()));
        let state = Arc::new(State {
            ids,
            ..State::default()
        });
        // Two workers: the machine's cores; gunzipping a body is short.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tls-segment-server")
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let served = state.clone();
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(serve_connection(acceptor.clone(), tcp, served.clone()));
            }
        });
        TlsSegmentServer {
            addr,
            pki,
            state,
            runtime: Some(runtime),
        }
    }

    /// `https://127.0.0.1:<port>`, the agent's `segment.endpoint`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// The PEM of the CA that signed the server's certificate, for `segment.ca_file`.
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// Answers every request `delay` after reading it, from now on.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Events in the requests answered 200 so far.
    pub fn accepted_count(&self) -> u64 {
        self.state.events.load(Ordering::SeqCst)
    }

    /// Requests answered 200 so far.
    pub fn accepted_requests(&self) -> u64 {
        self.state.accepted_requests.load(Ordering::SeqCst)
    }

    /// When the first request was read.
    pub fn first_request(&self) -> Option<Instant> {
        self.state.first_request.get().copied()
    }

    /// TLS connections by the protocol ALPN chose (`h2`, `http/1.1`, `none`).
    pub fn connections(&self) -> BTreeMap<String, u64> {
        self.state.connections.lock().unwrap().clone()
    }

    /// Requests by HTTP version (`HTTP/2.0`, `HTTP/1.1`).
    pub fn versions(&self) -> BTreeMap<String, u64> {
        self.state.versions.lock().unwrap().clone()
    }

    /// Every accepted `messageId`, in arrival order (empty unless recording).
    pub fn accepted_ids(&self) -> Vec<String> {
        self.state
            .ids
            .as_ref()
            .map(|ids| ids.lock().unwrap().clone())
            .unwrap_or_default()
    }

    /// Waits until at least `n` events were accepted.
    pub fn wait_for_accepted(&self, n: u64, timeout: Duration) -> bool {
        wait_until(timeout, || self.accepted_count() >= n)
    }
}

impl Drop for TlsSegmentServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
    *map.lock().unwrap().entry(key.to_owned()).or_default() += 1;
}

/// One TLS connection: the handshake, then HTTP/2 or HTTP/1.1 as ALPN chose.
async fn serve_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    state: Arc<State>,
) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let protocol = tls
        .get_ref()
        .1
        .alpn_protocol()
        .map_or("none".to_owned(), |p| {
            String::from_utf8_lossy(p).into_owned()
        });
    bump(&state.connections, &protocol);
    let io = TokioIo::new(tls);
    let service = hyper::service::service_fn(move |request| answer(state.clone(), request));
    // Errors are the client hanging up; nothing to do about them.
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    }
}

/// Reads, checks and counts one request, and answers it after the delay.
async fn answer(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    state.first_request.get_or_init(Instant::now);
    bump(&state.versions, &format!("{:?}", request.version()));
    let auth_ok = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == basic_auth(WRITE_KEY).as_bytes());
    let gzip = request
        .headers()
        .get(hyper::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let is_batch = request.method() == hyper::Method::POST && request.uri().path() == "/v1/batch";
    let body = request.into_body().collect().await?.to_bytes();
    let delay = Duration::from_millis(state.delay_ms.load(Ordering::SeqCst));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (status, text) = if !is_batch {
        (StatusCode::NOT_FOUND, r#"{"success":false,"status":404}"#)
    } else if !auth_ok {
        (
            StatusCode::UNAUTHORIZED,
            r#"{"success":false,"status":401}"#,
        )
    } else {
        match count(&state, &body, gzip) {
            Some(events) => {
                state.events.fetch_add(events as u64, Ordering::SeqCst);
                state.accepted_requests.fetch_add(1, Ordering::SeqCst);
                (StatusCode::OK, r#"{"success":true}"#)
            }
            None => (StatusCode::BAD_REQUEST, r#"{"success":false,"status":400}"#),
        }
    };
    Ok(Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(text.as_bytes())))
        .unwrap())
}

/// An accepted batch's events, counted as the plain server counts them (and their ids kept
/// when recording); None when the body does not gunzip.
fn count(state: &State, body: &[u8], gzip: bool) -> Option<usize> {
    let Some(ids) = &state.ids else {
        return count_message_ids(body, gzip).ok();
    };
    let mut plain = Vec::new();
    if gzip {
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut plain)
            .ok()?;
    } else {
        plain.extend_from_slice(body);
    }
    let batch: serde_json::Value = serde_json::from_slice(&plain).unwrap_or_default();
    let batch_ids: Vec<String> = batch["batch"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["messageId"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let n = batch_ids.len();
    ids.lock().unwrap().extend(batch_ids);
    Some(n)
}
