//! The agent's supervision seen from outside: the systemd watchdog is pinged only while every
//! loop goes round, and `run` exits 78 on a bad config.

use std::os::unix::net::UnixDatagram;

use crate::util::{Agent, BIN, EX_CONFIG, PATIENCE, TestEnv, scrubbed_command, wait_until};

/// What the agent told systemd: every datagram on a notify socket, in order.
struct Notified {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Notified {
    fn bind(path: &std::path::Path) -> Notified {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket.set_nonblocking(true).expect("non-blocking");
        Notified {
            socket,
            seen: Vec::new(),
        }
    }

    /// Reads what arrived: everything sent so far (a datagram is queued when it is sent).
    fn read(&mut self) -> usize {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = self.socket.recv(&mut buf) {
            self.seen
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.seen.len()
    }

    /// The indexes of the datagrams from `from` on with a line starting with `prefix`.
    fn find(&mut self, from: usize, prefix: &str) -> Vec<usize> {
        self.read();
        (from..self.seen.len())
            .filter(|i| self.seen[*i].lines().any(|l| l.starts_with(prefix)))
            .collect()
    }
}

/// A stalled ingest loop stops `WATCHDOG=1` (systemd then restarts the agent), while the
/// agent's other reports to systemd (`STATUS=`, every 10 s) go on.
#[test]
fn a_stalled_loop_stops_the_watchdog_pings() {
    let env = TestEnv::new();
    let config = env.write_config();
    let mut notify = Notified::bind(&env.root().join("notify.sock"));
    // sd-notify wants WATCHDOG_PID == its own pid: sh sets it to $$ and execs the agent.
    let mut cmd = scrubbed_command("sh");
    cmd.arg("-c")
        .arg(r#"WATCHDOG_PID=$$ exec "$0" run --config "$1""#)
        .arg(BIN)
        .arg(&config);
    cmd.env("NOTIFY_SOCKET", env.root().join("notify.sock"))
        .env("WATCHDOG_USEC", "2000000")
        .env("LSA_FAILPOINT", "ingest-stall");
    let mut agent = Agent::spawn_logged(cmd, &config);

    assert!(
        wait_until(PATIENCE, || !notify.find(0, "READY=1").is_empty()),
        "READY=1\n{}",
        agent.log_tail(30)
    );
    let noticed = |logs: String| {
        logs.lines()
            .any(|l| l.contains("not pinging the watchdog") && l.contains(r#"loops=["ingest"]"#))
    };
    assert!(
        wait_until(PATIENCE, || noticed(agent.logs())),
        "the stale ingest loop is noticed\n{}",
        agent.log_tail(30)
    );
    // Only the stalled loop: the drain went round all along.
    let logs = agent.logs();
    assert!(!logs.contains(r#"loops=["drain""#), "{logs}");
    // Every ping sent before the stall was logged is read now; none may follow.
    let stalled = notify.read();

    // Pinging every second, a live agent would send some 10 pings between two STATUS= lines.
    assert!(
        wait_until(PATIENCE, || notify.find(stalled, "STATUS=").len() >= 2),
        "two STATUS= lines after the stall was noticed\n{}",
        agent.log_tail(30)
    );
    let pings = notify.find(stalled, "WATCHDOG=1");
    assert!(
        pings.is_empty(),
        "no WATCHDOG=1 while the ingest loop is stalled: {:?}",
        &notify.seen[stalled..]
    );

    // The stalled loop still stops on SIGTERM.
    agent.signal(libc::SIGTERM);
    let exit = agent.wait_exit(PATIENCE);
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "{}",
        agent.log_tail(30)
    );
}

/// `run` refuses a bad config with exit 78 (systemd's `RestartPreventExitStatus=78`), naming
/// the problem.
#[test]
fn run_exits_78_on_a_bad_config() {
    let mut env = TestEnv::new();
    env.config.max_batch_events = Some(0);
    let config = env.write_config();
    let out = scrubbed_command(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run the agent");
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_batch_events"), "{stderr}");
}
