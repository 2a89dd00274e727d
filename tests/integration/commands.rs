//! The agent's supervision seen from outside: the systemd watchdog is pinged only while every
//! loop goes round, a hung loop does not hold the exit past the shutdown deadline, and `run`
//! exits 78 on a bad config.

use std::os::unix::net::UnixDatagram;

use std::time::Duration;

use crate::util::{Agent, BIN, EX_CONFIG, PATIENCE, TestEnv, scrubbed_command, wait_until};

/// `app`'s shutdown deadline.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(25);

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
    let mut agent = Agent::spawn(cmd, &config);

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

/// A loop that never stops (here the ingest worker, stuck in a blocking call) does not hold
/// the exit: shutdown gives up at its 25 s deadline, inside the unit's `TimeoutStopSec=30`,
/// and the agent exits 1 saying so (the spool is crash-safe), instead of hanging until
/// systemd's SIGKILL.
#[test]
fn a_hung_loop_does_not_hold_the_exit_past_the_shutdown_deadline() {
    let env = TestEnv::new();
    let config = env.write_config();
    let mut cmd = scrubbed_command(BIN);
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("LSA_FAILPOINT", "ingest-hang");
    let mut agent = Agent::spawn(cmd, &config);
    assert!(
        wait_until(PATIENCE, || agent.logs().contains("failpoint ingest-hang")),
        "{}",
        agent.log_tail(30)
    );
    agent.signal(libc::SIGTERM);
    let exit = agent.wait_exit(SHUTDOWN_DEADLINE + PATIENCE);
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(1),
        "{}",
        agent.log_tail(30)
    );
    let logs = agent.logs();
    assert!(
        logs.contains("shutdown did not finish within 25 s"),
        "{logs}"
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
