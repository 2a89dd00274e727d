//! The control socket (`[control] socket`): a Unix stream socket where the commands (`status`,
//! `files`, `replay`, `dead-letter`, `catalog`) ask the running agent, and the client's side
//! of the wire ([`exchange`], used by [`super::protocol::ask`]).
//!
//! # Protocol
//!
//! One request per connection: one line of JSON each way, typed in [`super::protocol`]. Every
//! request is answered by the one handler the agent gives ([`Handler`]); a line that is not a
//! request gets `{"error":"unknown request"}`.
//!
//! The socket file has mode 0660, so the agent's user and group may ask; with systemd's
//! `RuntimeDirectory` the directory is the agent's own. Each connection runs in its own task;
//! a client gets [`REQUEST_TIMEOUT`] to send its request and to take the answer, so one that
//! connects and says nothing holds nobody up, while the answer itself may take longer (a status
//! over a big quarantine on a loaded machine) up to `ANSWER_LIMIT`. The socket file is removed on shutdown; one left by a crash is found stale (no
//! one accepts on it) and replaced at the next start, while one a live agent answers on is left
//! alone and the new agent refuses to start.

use std::io::{self, BufRead as _, Read as _, Write as _};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::protocol::{Answer, Request, decode_request, encode_answer};
use super::status::StatusReport;

/// How long a client may take to send its request, and to take the answer.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the agent works on one answer before it answers with an error instead.
const ANSWER_LIMIT: Duration = Duration::from_secs(60);

/// Owner and group read/write: `status` run by an operator in the agent's group works, others
/// cannot read the backlog or the endpoint.
const SOCKET_MODE: u32 = 0o660;

/// A request is one short line (a replay's paths are the longest); anything longer is not a
/// request we know.
const MAX_REQUEST_BYTES: u64 = 64 << 10;

/// Far above any real report; a bound so a wrong process on the socket cannot eat our memory.
const MAX_ANSWER_BYTES: u64 = 4 << 20;

/// How long the start-up probe waits for an agent already on the socket to accept.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Builds the report on demand; called from a blocking thread, because it reads the spool.
pub(crate) type ReportFn = Arc<dyn Fn() -> StatusReport + Send + Sync>;

/// The agent's one dispatcher: answers every [`Request`], or says why it cannot; called from a
/// blocking thread, because answers read the spool.
pub(crate) type Handler = Arc<dyn Fn(Request) -> Result<Answer, String> + Send + Sync>;

/// A bound control socket, not yet answering: lets the caller fail start-up on a bind error
/// and then spawn [`ControlSocket::run`].
#[derive(Debug)]
pub(crate) struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created: on shutdown we remove only that file,
    /// not one another process put at the same path meanwhile.
    identity: (u64, u64),
}

impl ControlSocket {
    /// Binds the control socket at `path`: creates the parent directory if missing and
    /// replaces a stale socket file. Fails with [`io::ErrorKind::AddrInUse`] if another agent
    /// answers on `path`, and with [`io::ErrorKind::AlreadyExists`] if `path` is something
    /// other than a socket; so the caller fails start-up here, before spawning [`Self::run`].
    pub(crate) async fn bind(path: &Path) -> io::Result<ControlSocket> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| annotate(e, parent))?;
        }
        remove_stale(path).await?;
        let listener = UnixListener::bind(path).map_err(|e| annotate(e, path))?;
        let identity = std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .and_then(|()| std::fs::symlink_metadata(path))
            .map(|m| (m.dev(), m.ino()));
        let identity = match identity {
            Ok(id) => id,
            Err(e) => {
                // Do not leave a socket behind with the wrong mode.
                let _ = std::fs::remove_file(path);
                return Err(annotate(e, path));
            }
        };
        tracing::info!(path = %path.display(), "control socket listening");
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            identity,
        })
    }

    /// Answers requests with `handler` until `shutdown`, then stops accepting, drops the
    /// connections still open and removes the socket file.
    pub(crate) async fn run(self, handler: Handler, shutdown: CancellationToken) {
        self.run_with_timeout(handler, shutdown, REQUEST_TIMEOUT)
            .await;
    }

    async fn run_with_timeout(
        self,
        handler: Handler,
        shutdown: CancellationToken,
        limit: Duration,
    ) {
        let mut conns = JoinSet::new();
        // Log an accept failure once, not every retry (EMFILE can last).
        let mut accept_failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                // Reap finished connections so the set does not grow.
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        if accept_failing {
                            tracing::info!("control socket accepting again");
                            accept_failing = false;
                        }
                        conns.spawn(handle(stream, handler.clone(), limit));
                    }
                    Err(e) => {
                        if !accept_failing {
                            tracing::warn!(path = %self.path.display(), error = %e, "control socket cannot accept; retrying");
                            accept_failing = true;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(conns);
        drop(self.listener);
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the control socket");
                }
            }
            _ => {}
        }
    }
}

/// Makes room for our socket: nothing there is fine; a socket nobody accepts on is a crashed
/// agent's and is removed; a socket someone answers on belongs to a live agent and is kept.
async fn remove_stale(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(annotate(e, path)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "control socket {}: the path exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ));
        }
        Ok(_) => {}
    }
    let in_use = || {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "control socket {}: another agent is running and answers on it; stop it first \
                 or give this one its own [control] socket",
                path.display()
            ),
        )
    };
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(_live)) => Err(in_use()),
        // A listener whose backlog is full is alive too.
        Err(_elapsed) => Err(in_use()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a stale control socket");
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(annotate(e, path)),
            }
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) => Err(annotate(e, path)),
    }
}

/// Serves one connection within `limit`; a client that is slow or leaves is not an error
/// worth more than a debug line.
async fn handle(stream: UnixStream, handler: Handler, limit: Duration) {
    match answer(stream, handler, limit).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            tracing::debug!(error = %e, "control socket: client too slow; connection closed")
        }
        Err(e) => tracing::debug!(error = %e, "control socket: connection failed"),
    }
}

/// Reads one request and writes its answer. `limit` bounds the client's side of the talk
/// (reading the request, writing the answer): a client that connects and says nothing holds
/// nobody up. The answer itself takes what it takes (a status over a big quarantine on a
/// loaded machine can take seconds), up to [`ANSWER_LIMIT`]: cutting it at `limit` turned a
/// slow answer into a closed connection the operator could not tell from a crash.
async fn answer(mut stream: UnixStream, handler: Handler, limit: Duration) -> io::Result<()> {
    let timed_out = |what: &str| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} took longer than {limit:?}"),
        )
    };
    let (read, mut write) = stream.split();
    let mut line = Vec::new();
    tokio::time::timeout(
        limit,
        tokio::io::BufReader::new(read.take(MAX_REQUEST_BYTES)).read_until(b'\n', &mut line),
    )
    .await
    .map_err(|_| timed_out("reading the request"))??;
    if line.is_empty() {
        // Connected and left without a word: the start-up probe of another agent.
        return Ok(());
    }
    let answered = match decode_request(&line) {
        Ok(request) => {
            let work = tokio::task::spawn_blocking(move || handler(request));
            match tokio::time::timeout(ANSWER_LIMIT, work).await {
                Ok(Ok(answered)) => answered,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "answering a control request failed");
                    Err("internal error".to_owned())
                }
                Err(_) => {
                    tracing::warn!(limit = ?ANSWER_LIMIT, "a control request took too long to answer");
                    Err(format!("the answer took longer than {ANSWER_LIMIT:?}"))
                }
            }
        }
        Err(e) => Err(e),
    };
    let mut reply = encode_answer(&answered);
    reply.push(b'\n');
    tokio::time::timeout(limit, async {
        write.write_all(&reply).await?;
        write.shutdown().await
    })
    .await
    .map_err(|_| timed_out("writing the answer"))?
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
}

/// Why [`super::protocol::ask`] got no answer. [`QueryError::NoDaemon`] means no agent runs (`status`
/// then reads the spool and exits 3); every other variant is a failure (exit 1).
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueryError {
    /// The socket file is missing, or nobody accepts on it (a crashed agent's leftover).
    #[error("no agent is running (nothing answers on {})", path.display())]
    NoDaemon { path: PathBuf },
    /// Connecting or talking failed otherwise, e.g. permission denied on the socket.
    #[error("control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An agent accepted the connection but did not answer in time (hung, or overloaded).
    #[error("control socket {}: the agent did not answer within {timeout:?}", path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    /// The answer is not a status report: something else listens there, or a version mismatch.
    #[error("control socket {}: unexpected answer: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
    /// The agent answered with an error object.
    #[error("control socket {}: the agent answered: {message}", path.display())]
    Agent { path: PathBuf, message: String },
}

impl QueryError {
    /// True when no agent runs: the caller reports from the spool instead.
    pub(crate) fn is_no_daemon(&self) -> bool {
        matches!(self, QueryError::NoDaemon { .. })
    }
}

/// One request, one answer line.
pub(crate) fn exchange(
    path: &Path,
    request: &str,
    timeout: Duration,
) -> Result<Vec<u8>, QueryError> {
    let io_err = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            QueryError::Timeout {
                path: path.to_path_buf(),
                timeout,
            }
        } else {
            QueryError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => QueryError::NoDaemon {
            path: path.to_path_buf(),
        },
        _ => io_err(e),
    })?;
    // A zero timeout is an error for std; treat it as the shortest wait.
    let timeout = timeout.max(Duration::from_millis(1));
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    // Something that answers without reading (not an agent) may close before our write: read
    // what it said all the same, so the caller learns what is on the socket.
    if let Err(e) = (&stream).write_all(format!("{request}\n").as_bytes())
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        return Err(io_err(e));
    }
    let mut line = Vec::new();
    io::BufReader::new((&stream).take(MAX_ANSWER_BYTES))
        .read_until(b'\n', &mut line)
        .map_err(io_err)?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

    fn report() -> StatusReport {
        StatusReport {
            state: "running".into(),
            version: "0.1.0".into(),
            pid: Some(7),
            endpoint: "https://api.segment.io".into(),
            spool_events: 42,
            notes: vec!["hello".into()],
            ..StatusReport::default()
        }
    }

    /// An agent that answers `status` only.
    fn report_fn() -> Handler {
        Arc::new(|request| match request {
            Request::Status => Ok(Answer::Status(Box::new(report()))),
            _ => Err("not here".into()),
        })
    }

    /// [`super::super::protocol::ask`] for the status report.
    fn query_status(path: &Path, timeout: Duration) -> Result<StatusReport, QueryError> {
        match super::super::protocol::ask(path, &Request::Status, timeout)? {
            Answer::Status(r) => Ok(*r),
            other => panic!("not a report: {other:?}"),
        }
    }

    /// Binds at `path` and answers until `shutdown`.
    async fn serve(path: &Path, handler: Handler, shutdown: CancellationToken) -> io::Result<()> {
        ControlSocket::bind(path)
            .await?
            .run(handler, shutdown)
            .await;
        Ok(())
    }

    /// Binds and serves in a task; returns the token that stops it and the task.
    async fn start(
        path: &Path,
        limit: Duration,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let sock = ControlSocket::bind(path).await.expect("bind");
        let stop = CancellationToken::new();
        let task = tokio::spawn(sock.run_with_timeout(report_fn(), stop.clone(), limit));
        (stop, task)
    }

    /// `query_status` blocks: run it off the runtime's threads.
    async fn query(path: &Path) -> Result<StatusReport, QueryError> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || query_status(&path, QUERY_TIMEOUT))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn serve_then_query_returns_the_same_report() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/sub/control.sock");
        let stop = CancellationToken::new();
        let server = {
            let (path, stop) = (path.clone(), stop.clone());
            tokio::spawn(async move { serve(&path, report_fn(), stop).await })
        };
        let mut got = query(&path).await;
        for _ in 0..100 {
            if got.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            got = query(&path).await;
        }
        assert_eq!(got.unwrap(), report());
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    /// An answer slower than the client's limit is still answered: the limit is for the client
    /// (say nothing, take nothing), not for the agent's work. Before, the connection was closed
    /// and `status` said "the connection closed without an answer".
    #[tokio::test]
    async fn a_slow_answer_is_answered_not_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let sock = ControlSocket::bind(&path).await.expect("bind");
        let stop = CancellationToken::new();
        let limit = Duration::from_millis(100);
        let slow: Handler = Arc::new(move |_| {
            std::thread::sleep(limit * 5);
            Ok(Answer::Status(Box::new(report())))
        });
        let task = tokio::spawn(sock.run_with_timeout(slow, stop.clone(), limit));
        assert_eq!(query(&path).await.unwrap(), report());
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn socket_mode_is_0660() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (stop, task) = start(&path, REQUEST_TIMEOUT).await;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_removes_the_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (stop, task) = start(&path, REQUEST_TIMEOUT).await;
        assert!(path.exists());
        stop.cancel();
        task.await.unwrap();
        assert!(!path.exists());
        assert!(query(&path).await.unwrap_err().is_no_daemon());
    }

    #[tokio::test]
    async fn stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // A crashed agent's leftover: the file stays, nobody listens.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(query(&path).await.unwrap_err().is_no_daemon());
        let (stop, task) = start(&path, REQUEST_TIMEOUT).await;
        assert_eq!(query(&path).await.unwrap(), report());
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn second_serve_on_a_live_socket_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (stop, task) = start(&path, REQUEST_TIMEOUT).await;
        let err = serve(&path, report_fn(), CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("another agent"), "{err}");
        // The first agent still answers.
        assert_eq!(query(&path).await.unwrap(), report());
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_path_that_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        std::fs::write(&path, "precious").unwrap();
        let err = ControlSocket::bind(&path).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[tokio::test]
    async fn a_silent_client_does_not_block_a_second_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (stop, task) = start(&path, REQUEST_TIMEOUT).await;
        let _silent = UnixStream::connect(&path).await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(query(&path).await.unwrap(), report());
        assert!(started.elapsed() < Duration::from_secs(2));
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_client_is_disconnected_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (stop, task) = start(&path, Duration::from_millis(100)).await;
        let mut silent = UnixStream::connect(&path).await.unwrap();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(3), silent.read_to_end(&mut buf))
            .await
            .expect("closed by the server")
            .unwrap();
        assert_eq!(n, 0);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn unknown_request_gets_an_error_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (stop, task) = start(&path, REQUEST_TIMEOUT).await;
        let mut client = UnixStream::connect(&path).await.unwrap();
        client.write_all(b"reload\n").await.unwrap();
        let mut buf = String::new();
        client.read_to_string(&mut buf).await.unwrap();
        assert_eq!(buf, "{\"error\":\"unknown request\"}\n");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn query_on_a_missing_socket_is_no_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let err = query(&dir.path().join("nope/control.sock"))
            .await
            .unwrap_err();
        assert!(err.is_no_daemon(), "{err:?}");
        assert!(err.to_string().contains("no agent is running"), "{err}");
    }

    #[test]
    fn query_on_a_hung_agent_is_an_error_not_no_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // Listening but never accepting: the kernel completes the connect, nobody answers.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = query_status(&path, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, QueryError::Timeout { .. }), "{err:?}");
    }

    #[test]
    fn query_on_something_else_is_a_protocol_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n").unwrap();
        });
        let err = query_status(&path, QUERY_TIMEOUT).unwrap_err();
        assert!(matches!(err, QueryError::Protocol { .. }), "{err:?}");
        assert!(!err.is_no_daemon());
        server.join().unwrap();
    }
}
