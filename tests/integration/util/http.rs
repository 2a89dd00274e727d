//! A small HTTP/1.1 server on `127.0.0.1` for the fake Segment and Leanplum servers: one thread
//! accepts, one thread per connection reads requests (keep-alive, `Content-Length` or chunked
//! bodies) and answers each from the handler, in order. Nothing is queued behind a fixed pool of
//! workers, so a delayed answer holds up only its own connection (the agent never pipelines),
//! and every request read is answered unless the client hung up first.
//!
//! It replaced `tiny_http` behind a fixed pool of worker threads taking requests from one
//! queue: a request the agent sent while every worker slept on a delayed answer waited in that
//! queue, unanswered, for as long as the delays lasted (the pool had 8 workers, then 40, against
//! an adaptive concurrency of up to 32).

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A request as read off the connection.
pub(crate) struct Request {
    /// When its head was read.
    pub(crate) received_at: Instant,
    pub(crate) method: String,
    /// Path and query as sent, e.g. `/v1/batch`.
    pub(crate) path: String,
    /// Headers in arrival order, names as sent.
    pub(crate) headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes, or the chunks joined), still content-encoded.
    pub(crate) body: Vec<u8>,
}

impl Request {
    /// The first header with this name (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An answer: status, extra headers (`Content-Length` is added) and body.
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

/// Told what became of writing an answer: `None` written, `Some(error)` the client was gone.
pub(crate) type Sent = Box<dyn FnOnce(Option<String>)>;

/// Turns a request into its answer; may block (a delayed answer). The answer may come with a
/// [`Sent`] to call once it was written.
pub(crate) trait Handler: Send + Sync + 'static {
    fn answer(&self, request: Request) -> (Response, Option<Sent>);
}

/// The server; stops accepting, and hangs up every open connection, when dropped.
pub(crate) struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `handler` on `listener` until dropped.
    pub(crate) fn serve(listener: TcpListener, handler: Arc<dyn Handler>) -> Server {
        let addr = listener.local_addr().expect("the listener's address");
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let acceptor = {
            let (stop, connections) = (Arc::clone(&stop), Arc::clone(&connections));
            thread::Builder::new()
                .name(format!("http-accept-{}", addr.port()))
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(conn) = conn else { continue };
                        let _ = conn.set_nodelay(true);
                        if let Ok(clone) = conn.try_clone() {
                            connections.lock().expect("connections lock").push(clone);
                        }
                        let handler = Arc::clone(&handler);
                        let _ = thread::Builder::new()
                            .name(format!("http-conn-{}", addr.port()))
                            .spawn(move || serve_connection(conn, handler.as_ref()));
                    }
                })
                .expect("spawn the accept thread")
        };
        Server {
            addr,
            stop,
            connections,
            acceptor: Some(acceptor),
        }
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept thread, which then sees `stop` and closes the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for conn in self.connections.lock().expect("connections lock").drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

/// Reads requests off one connection and answers each, until the client closes it, sends
/// `Connection: close`, or sends something that is not HTTP/1.1.
fn serve_connection(conn: TcpStream, handler: &dyn Handler) {
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(1 << 20, conn);
    let mut writer = write_half;
    loop {
        let request = match read_request(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) | Err(_) => return,
        };
        let close = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let (response, sent) = handler.answer(request);
        let written = write_response(&mut writer, &response);
        if let Some(sent) = sent {
            sent(written.as_ref().err().map(ToString::to_string));
        }
        if written.is_err() || close {
            return;
        }
    }
}

/// One request, or None at a clean end of the connection.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let received_at = Instant::now();
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(io::Error::other(format!("not a request line: {line:?}")));
    };
    let (method, path) = (method.to_string(), path.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    let mut request = Request {
        received_at,
        method,
        path,
        headers,
        body: Vec::new(),
    };
    if request
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        request.body = read_chunked(reader)?;
    } else if let Some(len) = request.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|e| io::Error::other(format!("Content-Length {len:?}: {e}")))?;
        request.body.resize(len, 0);
        reader.read_exact(&mut request.body)?;
    }
    Ok(Some(request))
}

/// A chunked body, trailers skipped.
fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let size = size.trim().split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size, 16)
            .map_err(|e| io::Error::other(format!("chunk size {size:?}: {e}")))?;
        if size == 0 {
            loop {
                let mut trailer = String::new();
                if reader.read_line(&mut trailer)? == 0 || trailer.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
    }
}

fn write_response(writer: &mut impl Write, response: &Response) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\n",
        response.status,
        reason(response.status),
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&response.body);
    writer.write_all(&bytes)?;
    writer.flush()
}

/// The reason phrase (clients ignore it; it makes a captured exchange readable).
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Binds `127.0.0.1:port` (0: any free port), retrying for a few seconds while the port is
/// still taken (e.g. a port an agent was told to use, released by another server just now).
pub(crate) fn bind(port: u16) -> TcpListener {
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(&addr) {
            Ok(listener) => return listener,
            Err(e) if Instant::now() < deadline => {
                eprintln!("bind {addr}: {e}; retrying");
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}
