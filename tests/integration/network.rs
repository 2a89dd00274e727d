//! Proxies and extra CA roots (SPEC section 3, `segment.proxy`, `segment.ca_file`), through
//! the real binary:
//!
//! - a loopback HTTP proxy run by the test (absolute-form requests forwarded, `CONNECT`
//!   tunnelled, every request counted): with `segment.proxy`, every request the fake Segment
//!   server received went through it, with the proxy's credentials, which appear nowhere in
//!   logs or status; a reload without the key goes direct again;
//! - the environment: `HTTP_PROXY` is used when `segment.proxy` is unset, `NO_PROXY` bypasses
//!   it, and an explicit `segment.proxy` wins over both;
//! - `ca_file`: a loopback TLS server whose certificate a test CA signed; without `ca_file`
//!   delivery fails with a certificate error in `status`, and with it (applied by a reload)
//!   the events arrive;
//! - HTTP/2 over TLS: a TLS server offering `h2` by ALPN gets the batches over HTTP/2, one
//!   offering only `http/1.1` over HTTP/1.1, every event exactly once;
//! - a broken `proxy` or `ca_file` is refused at load with its key.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use base64::Engine as _;

use crate::util::{
    Agent, BIN, EX_CONFIG, Offer, PATIENCE, TestEnv, TestPki, TlsSegmentServer, new_env,
    open_session_lines, run_cli, run_command, status_json, test_pki, toml_str, wait_delivered,
    wait_for_status, write_atomically,
};

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 message reader and relay
// ---------------------------------------------------------------------------------------------

/// One HTTP/1.1 request or response: start line, headers, and a `Content-Length` body (all the
/// agent sends and the fake Segment server answers).
struct Message {
    start: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Message {
    /// The next message on `r`; `None` when the peer closed the connection before one.
    fn read(r: &mut impl BufRead) -> io::Result<Option<Message>> {
        let mut start = String::new();
        if r.read_line(&mut start)? == 0 {
            return Ok(None);
        }
        let start = start.trim_end().to_owned();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "in headers"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| io::Error::other(format!("bad header line {line:?}")))?;
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        let mut message = Message {
            start,
            headers,
            body: Vec::new(),
        };
        assert!(
            message.header("transfer-encoding").is_none(),
            "the relay reads Content-Length bodies only: {}",
            message.start
        );
        let length: usize = message
            .header("content-length")
            .map(|v| v.parse().expect("a numeric Content-Length"))
            .unwrap_or(0);
        message.body.resize(length, 0);
        r.read_exact(&mut message.body)?;
        Ok(Some(message))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn remove_header(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut head = format!("{}\r\n", self.start);
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        w.write_all(head.as_bytes())?;
        w.write_all(&self.body)?;
        w.flush()
    }
}

/// A kept-alive connection to the fake Segment server, reopened when it closed.
struct Upstream {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Upstream {
    fn new(addr: SocketAddr) -> Upstream {
        Upstream { addr, conn: None }
    }

    /// Sends `request` and returns the answer (retrying once on a fresh connection when a
    /// kept-alive one turns out closed).
    fn exchange(&mut self, request: &Message) -> io::Result<Message> {
        for _ in 0..2 {
            if self.conn.is_none() {
                self.conn = Some(BufReader::new(TcpStream::connect(self.addr)?));
            }
            let conn = self.conn.as_mut().expect("just set");
            let answer = request
                .write_to(conn.get_mut())
                .and_then(|()| Message::read(conn));
            match answer {
                Ok(Some(response)) => {
                    if response
                        .header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                    {
                        self.conn = None;
                    }
                    return Ok(response);
                }
                Ok(None) | Err(_) => self.conn = None,
            }
        }
        Err(io::Error::other("the upstream closed the connection twice"))
    }
}

/// A thread accepting connections on `127.0.0.1:0` until the returned flag is set (and one
/// more connection wakes it).
fn serve(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = listener.local_addr().expect("a local address");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let handle = Arc::new(handle);
    thread::spawn(move || {
        for conn in listener.incoming() {
            if stopped.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            let handle = handle.clone();
            thread::spawn(move || handle(conn));
        }
    });
    (addr, stop)
}

fn stop_serving(addr: SocketAddr, stop: &AtomicBool) {
    stop.store(true, Ordering::SeqCst);
    let _ = TcpStream::connect(addr);
}

// ---------------------------------------------------------------------------------------------
// The loopback proxy
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct ProxyLog {
    /// Absolute-form requests forwarded and answered.
    forwarded: AtomicUsize,
    /// `CONNECT` tunnels opened.
    tunnels: AtomicUsize,
    /// The `Proxy-Authorization` of each request or tunnel (None: absent).
    auth: Mutex<Vec<Option<String>>>,
}

/// An HTTP proxy on `127.0.0.1:<random port>`: `POST http://host:port/path` is forwarded to
/// `host:port` in origin form (the connection to it kept alive), `CONNECT host:port` is
/// tunnelled. Counts both. Stops accepting when dropped.
struct LoopbackProxy {
    addr: SocketAddr,
    log: Arc<ProxyLog>,
    stop: Arc<AtomicBool>,
}

impl LoopbackProxy {
    fn start() -> LoopbackProxy {
        let log = Arc::new(ProxyLog::default());
        let for_conns = log.clone();
        let (addr, stop) = serve(move |conn| {
            let _ = proxy_connection(conn, &for_conns);
        });
        LoopbackProxy { addr, log, stop }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn forwarded(&self) -> usize {
        self.log.forwarded.load(Ordering::SeqCst)
    }

    fn tunnels(&self) -> usize {
        self.log.tunnels.load(Ordering::SeqCst)
    }

    fn auth_seen(&self) -> Vec<Option<String>> {
        self.log.auth.lock().unwrap().clone()
    }
}

impl Drop for LoopbackProxy {
    fn drop(&mut self) {
        stop_serving(self.addr, &self.stop);
    }
}

fn proxy_connection(conn: TcpStream, log: &ProxyLog) -> io::Result<()> {
    let mut client = BufReader::new(conn);
    let mut upstream: Option<(String, Upstream)> = None;
    while let Some(mut request) = Message::read(&mut client)? {
        log.auth
            .lock()
            .unwrap()
            .push(request.header("proxy-authorization").map(str::to_owned));
        let mut parts = request.start.split_whitespace();
        let (method, target, version) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        if method == "CONNECT" {
            log.tunnels.fetch_add(1, Ordering::SeqCst);
            let server = TcpStream::connect(&target)?;
            client
                .get_mut()
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
            return tunnel(client, server);
        }
        let rest = target
            .strip_prefix("http://")
            .ok_or_else(|| io::Error::other(format!("not an absolute-form request: {target}")))?;
        let (host_port, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let addr: SocketAddr = host_port
            .parse()
            .map_err(|_| io::Error::other(format!("not host:port: {host_port}")))?;
        request.start = format!("{method} {path} {version}");
        request.remove_header("proxy-authorization");
        request.remove_header("proxy-connection");
        if upstream.as_ref().is_none_or(|(hp, _)| hp != host_port) {
            upstream = Some((host_port.to_owned(), Upstream::new(addr)));
        }
        let (_, to) = upstream.as_mut().expect("just set");
        let response = to.exchange(&request)?;
        response.write_to(client.get_mut())?;
        log.forwarded.fetch_add(1, Ordering::SeqCst);
    }
    Ok(())
}

/// Copies bytes both ways until either side closes.
fn tunnel(client: BufReader<TcpStream>, mut server: TcpStream) -> io::Result<()> {
    // Whatever the client sent after the CONNECT head is already in the reader's buffer.
    server.write_all(client.buffer())?;
    let mut client = client.into_inner();
    let (mut client_r, mut server_w) = (client.try_clone()?, server.try_clone()?);
    let up = thread::spawn(move || {
        let _ = io::copy(&mut client_r, &mut server_w);
        let _ = server_w.shutdown(std::net::Shutdown::Write);
    });
    let _ = io::copy(&mut server, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The loopback TLS server
// ---------------------------------------------------------------------------------------------

/// HTTPS on `127.0.0.1:<random port>` with `pki`'s server certificate, relaying each request
/// to `backend` (the fake Segment server) in plain HTTP. Stops accepting when dropped.
struct TlsFront {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TlsFront {
    fn start(pki: &TestPki, backend: SocketAddr) -> TlsFront {
        // No ALPN: the agent speaks HTTP/1.1, which is all this relay reads.
        let config = pki.server_config(&[]);
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        let (addr, stop) = serve(move |conn| {
            let Ok(tls) = rustls::ServerConnection::new(config.clone()) else {
                return;
            };
            let mut stream = rustls::StreamOwned::new(tls, conn);
            // The handshake happens on first use; count the ones that complete.
            while stream.conn.is_handshaking() {
                if stream.conn.complete_io(&mut stream.sock).is_err() {
                    return;
                }
            }
            counted.fetch_add(1, Ordering::SeqCst);
            let mut client = BufReader::new(stream);
            let mut upstream = Upstream::new(backend);
            while let Ok(Some(request)) = Message::read(&mut client) {
                let Ok(response) = upstream.exchange(&request) else {
                    return;
                };
                if response.write_to(client.get_mut()).is_err() {
                    return;
                }
            }
        });
        TlsFront {
            addr,
            handshakes,
            stop,
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        stop_serving(self.addr, &self.stop);
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const PROXY_USER: &str = "lsa";
const PROXY_PASSWORD: &str = "pr0xy-s3cret-77";

fn proxy_auth() -> String {
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("{PROXY_USER}:{PROXY_PASSWORD}"));
    format!("Basic {token}")
}

/// Drops `n` one-event session lines starting at `first` into the watch dir as `name`.
fn drop_sessions(env: &TestEnv, name: &str, first: u64, n: usize) -> Vec<String> {
    let (bytes, ids) = open_session_lines(first, n);
    write_atomically(&env.watch_dir().join(name), &bytes);
    ids
}

/// Starts the agent on `env`'s config with `vars` in its (otherwise scrubbed) environment.
fn start_with_env(env: &TestEnv, vars: &[(&str, String)]) -> Agent {
    let config_path = env.write_config();
    let mut cmd = run_command(BIN, &config_path);
    for (name, value) in vars {
        cmd.env(name, value);
    }
    Agent::spawn(cmd, &config_path)
}

/// Waits until the fake Segment server has been quiet for a second, and returns how many
/// requests it received.
fn settled_requests(env: &TestEnv) -> usize {
    assert!(
        env.server
            .wait_for_quiet(Duration::from_millis(1000), PATIENCE),
        "the fake Segment server never went quiet"
    );
    env.server.requests().len()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// `segment.proxy` with credentials: every request the fake Segment server received came
/// through the proxy, each with `Proxy-Authorization`; the password is in no log line and not
/// in `status`. A reload that removes the key sends the next batches direct.
#[test]
fn segment_proxy_carries_every_request_and_a_reload_drops_it() {
    let mut env = new_env();
    let proxy = LoopbackProxy::start();
    let with_credentials = format!("http://{PROXY_USER}:{PROXY_PASSWORD}@{}", proxy.addr);
    env.config = env.config.clone().with_extra(
        "segment",
        &format!("proxy = {}", toml_str(&with_credentials)),
    );
    let mut agent = env.start_agent();

    let first = drop_sessions(&env, "first.jsonl", 1_000, 30);
    wait_delivered(&env, &agent, &first, "through the proxy");
    let received = settled_requests(&env);
    assert!(received > 0);
    assert_eq!(
        proxy.forwarded(),
        received,
        "the fake Segment server got {received} requests, the proxy forwarded {}",
        proxy.forwarded()
    );
    assert_eq!(proxy.tunnels(), 0, "an http:// endpoint needs no CONNECT");
    let auth = proxy.auth_seen();
    assert!(
        auth.iter()
            .all(|a| a.as_deref() == Some(proxy_auth().as_str())),
        "every request carries the proxy's credentials: {auth:?}"
    );
    let status = status_json(&env.config_path).to_string();
    assert!(
        !status.contains(PROXY_PASSWORD),
        "status shows the password"
    );
    let logs = agent.logs();
    assert!(!logs.contains(PROXY_PASSWORD), "the log shows the password");
    assert!(
        logs.contains("<redacted>@127.0.0.1"),
        "the log says which proxy is used, without credentials:\n{}",
        agent.log_tail(40)
    );

    // Reload without the key: the Segment client is built again, direct.
    env.config.extra.clear();
    env.write_config();
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_for_log("config reloaded", PATIENCE),
        "no reload:\n{}",
        agent.log_tail(40)
    );
    let through_proxy = proxy.forwarded();
    let second = drop_sessions(&env, "second.jsonl", 2_000, 30);
    wait_delivered(&env, &agent, &second, "direct after the reload");
    let after = settled_requests(&env);
    assert!(after > received);
    assert_eq!(
        proxy.forwarded(),
        through_proxy,
        "requests still went through the proxy after the reload removed it"
    );
    assert!(agent.stop().is_some_and(|s| s.success()));
}

/// Without `segment.proxy`, `HTTP_PROXY` applies (reqwest exempts no host by default, loopback
/// included); `NO_PROXY=127.0.0.1` bypasses it; an explicit `segment.proxy` wins over both
/// (`NO_PROXY` applies to the environment's proxy only).
#[test]
fn environment_proxy_no_proxy_and_the_explicit_key() {
    let mut env = new_env();
    let from_env = LoopbackProxy::start();
    let explicit = LoopbackProxy::start();

    // 1. HTTP_PROXY alone.
    let mut agent = start_with_env(&env, &[("HTTP_PROXY", from_env.url())]);
    let ids = drop_sessions(&env, "one.jsonl", 10_000, 20);
    wait_delivered(&env, &agent, &ids, "through $HTTP_PROXY");
    let received = settled_requests(&env);
    assert!(received > 0);
    assert_eq!(
        from_env.forwarded(),
        received,
        "not every request went through $HTTP_PROXY:\n{}",
        agent.log_tail(30)
    );
    assert!(
        agent.logs().contains("$HTTP_PROXY"),
        "the log says the environment's proxy is used:\n{}",
        agent.log_tail(30)
    );
    assert!(agent.stop().is_some_and(|s| s.success()));

    // 2. The lowercase name and NO_PROXY naming the endpoint's host: direct.
    let mut agent = start_with_env(
        &env,
        &[
            ("http_proxy", from_env.url()),
            ("NO_PROXY", "localhost,127.0.0.1".into()),
        ],
    );
    let before = from_env.forwarded();
    let ids = drop_sessions(&env, "two.jsonl", 20_000, 20);
    wait_delivered(&env, &agent, &ids, "direct under NO_PROXY");
    let after = settled_requests(&env);
    assert!(after > received);
    assert_eq!(from_env.forwarded(), before, "NO_PROXY was not honoured");
    assert!(agent.stop().is_some_and(|s| s.success()));

    // 3. segment.proxy set: it carries everything, whatever the environment says.
    env.config = env
        .config
        .clone()
        .with_extra("segment", &format!("proxy = {}", toml_str(&explicit.url())));
    let mut agent = start_with_env(
        &env,
        &[
            ("HTTP_PROXY", from_env.url()),
            ("NO_PROXY", "127.0.0.1".into()),
        ],
    );
    let ids = drop_sessions(&env, "three.jsonl", 30_000, 20);
    wait_delivered(&env, &agent, &ids, "through segment.proxy");
    let last = settled_requests(&env);
    assert_eq!(
        explicit.forwarded(),
        last - after,
        "segment.proxy did not carry every request"
    );
    assert_eq!(from_env.forwarded(), before, "$HTTP_PROXY was used");
    assert!(agent.stop().is_some_and(|s| s.success()));
}

/// An `https://` endpoint whose certificate a private CA signed: refused without `ca_file`
/// (`status` says why), delivered once a reload adds `ca_file` with the CA. The same through
/// a proxy goes by `CONNECT`.
#[test]
fn ca_file_adds_a_private_root() {
    let mut env = new_env();
    let pki = test_pki();
    let front = TlsFront::start(&pki, env.server.addr());
    let ca_path = env.root().join("corp-root.pem");
    std::fs::write(&ca_path, &pki.ca_pem).unwrap();
    env.config.endpoint = format!("https://127.0.0.1:{}", front.addr.port());
    let mut agent = env.start_agent();

    let ids = drop_sessions(&env, "tls.jsonl", 40_000, 25);
    let refused = wait_for_status(&env.config_path, PATIENCE, |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("certificate"))
    });
    assert!(
        refused.is_some(),
        "no certificate error in status:\n{}",
        agent.log_tail(30)
    );
    assert_eq!(env.server.requests().len(), 0, "a request got through");

    env.config = env.config.clone().with_extra(
        "segment",
        &format!("ca_file = {}", toml_str(ca_path.to_str().unwrap())),
    );
    env.write_config();
    agent.signal(libc::SIGHUP);
    assert!(agent.wait_for_log("config reloaded", PATIENCE));
    wait_delivered(&env, &agent, &ids, "with ca_file");
    assert!(front.handshakes.load(Ordering::SeqCst) > 0);
    assert!(agent.stop().is_some_and(|s| s.success()));

    // Through a proxy, HTTPS goes by CONNECT, and the CA still applies end to end.
    let proxy = LoopbackProxy::start();
    env.config = env
        .config
        .clone()
        .with_extra("segment", &format!("proxy = {}", toml_str(&proxy.url())));
    let agent = env.start_agent();
    let ids = drop_sessions(&env, "tls-proxied.jsonl", 50_000, 25);
    wait_delivered(&env, &agent, &ids, "with ca_file through CONNECT");
    assert!(proxy.tunnels() > 0, "no CONNECT tunnel");
    assert_eq!(proxy.forwarded(), 0);
}

/// An `https://` endpoint offering HTTP/2 by ALPN gets every batch over HTTP/2; one offering
/// only HTTP/1.1 gets them over HTTP/1.1. Small batches, so several are in flight at once;
/// every event arrives exactly once either way.
#[test]
fn https_uses_http2_when_the_endpoint_offers_it() {
    for (offer, alpn, version) in [
        (Offer::H2, "h2", "HTTP/2.0"),
        (Offer::H1, "http/1.1", "HTTP/1.1"),
    ] {
        let mut env = new_env();
        let server = TlsSegmentServer::start_recording(offer);
        server.set_delay(Duration::from_millis(20));
        let ca_path = env.root().join("test-root.pem");
        std::fs::write(&ca_path, server.ca_pem()).unwrap();
        env.config.endpoint = server.url();
        env.config.max_batch_events = Some(10);
        env.config.concurrency = Some(8);
        env.config = env.config.clone().with_extra(
            "segment",
            &format!("ca_file = {}", toml_str(ca_path.to_str().unwrap())),
        );
        let mut agent = env.start_agent();
        let mut ids = drop_sessions(&env, "tls.jsonl", 70_000, 300);
        assert!(
            server.wait_for_accepted(ids.len() as u64, PATIENCE),
            "{alpn}: {} of {} accepted\n{}",
            server.accepted_count(),
            ids.len(),
            agent.log_tail(30)
        );
        let mut accepted = server.accepted_ids();
        accepted.sort();
        ids.sort();
        assert_eq!(accepted, ids, "{alpn}: not every event exactly once");
        let requests = server.accepted_requests();
        assert!(requests >= 30, "{alpn}: {requests} requests");
        let versions = server.versions();
        assert_eq!(
            versions.keys().collect::<Vec<_>>(),
            [version],
            "{alpn}: {versions:?}"
        );
        let connections = server.connections();
        assert_eq!(
            connections.keys().collect::<Vec<_>>(),
            [alpn],
            "{alpn}: {connections:?}"
        );
        assert!(agent.stop().is_some_and(|s| s.success()));
    }
}

/// A proxy URL that is not one and a CA file that holds no certificate are refused at load,
/// each naming its key, and the proxy's password is not printed.
#[test]
fn bad_proxy_and_ca_file_are_refused_with_their_keys() {
    let mut env = new_env();
    let not_pem = env.root().join("not.pem");
    std::fs::write(&not_pem, "<html>proxy login</html>\n").unwrap();
    env.config = env
        .config
        .clone()
        .with_extra(
            "segment",
            &format!("proxy = \"socks5://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:1080\""),
        )
        .with_extra(
            "segment",
            &format!("ca_file = {}", toml_str(not_pem.to_str().unwrap())),
        );
    let config_path = env.write_config();
    let out = run_cli(
        &[
            "check-config".as_ref(),
            "--config".as_ref(),
            config_path.as_os_str(),
        ],
        PATIENCE,
    );
    let all = out.all_output();
    assert_eq!(out.code(), EX_CONFIG, "{all}");
    assert!(all.contains("segment.proxy"), "{all}");
    assert!(all.contains("segment.ca_file"), "{all}");
    assert!(all.contains("no certificate"), "{all}");
    assert!(!all.contains(PROXY_PASSWORD), "{all}");
}
