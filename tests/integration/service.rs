//! The agent as a service (SPEC sections 2, 3 and 9): SIGTERM exits 0 within the 10 s grace,
//! SIGHUP reloads a valid config and keeps the old one on an invalid one, SIGUSR1 cuts a backoff
//! short, systemd's notify protocol on a real datagram socket, `status` in every state,
//! `run --daemonize` with its pid file, the write key never printed, the metrics endpoint.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use crate::util::{
    Agent, BIN, CmdOutput, EX_CONFIG, PATIENCE, Reply, SegmentServer, TestEnv, WRITE_KEY,
    assert_exactly_once, count_log_lines, free_port, kill_pid, open_session_lines, pid_alive,
    ready_lines, run_cli, run_command, scrubbed_command, status_json, wait_for_status, wait_until,
    write_atomically,
};

/// SPEC section 9: in-flight batches are finished or abandoned within 10 s of SIGTERM.
const GRACE: Duration = Duration::from_secs(10);

/// Drops a file of `n` one-event sessions (eventIds from `first`) into the watch dir; returns
/// their messageIds.
fn drop_events(env: &TestEnv, name: &str, first: u64, n: usize) -> Vec<String> {
    let (bytes, ids) = open_session_lines(first, n);
    write_atomically(&env.watch_dir().join(name), &bytes);
    ids
}

/// SIGTERM, then the exit status and how long the exit took (None if it did not exit within
/// `timeout`).
fn sigterm_and_time(
    agent: &mut Agent,
    timeout: Duration,
) -> (Option<std::process::ExitStatus>, Duration) {
    let started = Instant::now();
    agent.signal(libc::SIGTERM);
    let exit = agent.wait_exit(timeout);
    (exit, started.elapsed())
}

/// Runs the binary with string arguments (see [`run_cli`]).
fn cli(args: &[&str]) -> CmdOutput {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    run_cli(&args, PATIENCE)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Drops a server whose worker threads may be sleeping on a held answer without waiting for
/// them: the test does not need to outlive the delay.
fn drop_in_background(server: SegmentServer) {
    thread::spawn(move || drop(server));
}

#[test]
fn sigterm_exits_0_quickly() {
    let mut env = TestEnv::new();
    // A held request must stay in flight, not time out on the agent's side.
    env.config.request_timeout_secs = Some(60);
    let mut agent = env.start_agent();
    let first = drop_events(&env, "first.jsonl", 1_000, 20);
    assert!(
        env.server.wait_for_ids(&first, PATIENCE),
        "first file delivered\n{}",
        agent.log_tail(30)
    );
    let (exit, took) = sigterm_and_time(&mut agent, Duration::from_secs(20));
    eprintln!("SIGTERM with nothing in flight: exit {exit:?} after {took:?}");
    let exit =
        exit.unwrap_or_else(|| panic!("no exit within 20 s of SIGTERM\n{}", agent.log_tail(30)));
    assert_eq!(
        exit.code(),
        Some(0),
        "SIGTERM exits 0\n{}",
        agent.log_tail(30)
    );
    assert!(
        took < GRACE,
        "idle agent took {took:?} to exit after SIGTERM"
    );
    // On its way out the agent opens the closed spool once, so sled snapshots its log and the
    // next start does not scan it.
    assert!(
        agent.logs().contains("spool checkpointed for a fast start"),
        "{}",
        agent.log_tail(10)
    );

    // A batch in flight that Segment holds for 30 s: abandoned after the grace, kept spooled.
    let slow = SegmentServer::start();
    slow.set_delay(Duration::from_secs(30));
    env.config.endpoint = slow.url();
    let mut agent = env.start_agent();
    let second = drop_events(&env, "second.jsonl", 2_000, 20);
    assert!(
        slow.wait_for_requests(1, PATIENCE),
        "the second file's batch reached the slow server\n{}",
        agent.log_tail(30)
    );
    let (exit, took) = sigterm_and_time(&mut agent, Duration::from_secs(25));
    eprintln!("SIGTERM with a batch held 30 s by Segment: exit {exit:?} after {took:?}");
    let exit =
        exit.unwrap_or_else(|| panic!("no exit within 25 s of SIGTERM\n{}", agent.log_tail(30)));
    assert_eq!(
        exit.code(),
        Some(0),
        "SIGTERM exits 0 with a batch in flight\n{}",
        agent.log_tail(30)
    );
    // Under 25 s (the wait above), while Segment holds the batch 30 s: the agent abandoned it
    // rather than waiting for the answer. (No tighter bound: a loaded machine stretches it.)
    assert!(
        agent.logs().contains("abandoned"),
        "the log says the in-flight batch was abandoned\n{}",
        agent.log_tail(30)
    );
    drop_in_background(slow);

    // Back to a fast Segment: the abandoned events are still there and go out.
    env.config.endpoint = env.server.url();
    let mut agent = env.start_agent();
    assert!(
        env.server.wait_for_ids(&second, PATIENCE),
        "events abandoned at shutdown are delivered after the restart\n{}",
        agent.log_tail(30)
    );
    env.server
        .wait_for_quiet(Duration::from_millis(800), PATIENCE);
    let (exit, took) = sigterm_and_time(&mut agent, Duration::from_secs(20));
    eprintln!("SIGTERM after the restart: exit {exit:?} after {took:?}");
    assert_eq!(exit.and_then(|e| e.code()), Some(0));
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    assert_exactly_once(&env.server, &all, &agent, "both files, across the restart");
}

#[test]
fn sighup_applies_a_valid_config_and_keeps_the_old_on_an_invalid_one() {
    let mut env = TestEnv::new();
    env.config.log_level = Some("info".into());
    let server_b = SegmentServer::start();
    let mut agent = env.start_agent();

    let ids1 = drop_events(&env, "one.jsonl", 10_000, 5);
    assert!(
        env.server.wait_for_ids(&ids1, PATIENCE),
        "A got the first file\n{}",
        agent.log_tail(30)
    );

    let reloads = |agent: &Agent| count_log_lines(&agent.logs(), "config reloaded");
    let applied = |agent: &Agent| count_log_lines(&agent.logs(), "delivery settings reloaded");

    // 1. endpoint -> B.
    env.config.endpoint = server_b.url();
    env.write_config();
    agent.signal(libc::SIGHUP);
    assert!(
        wait_until(PATIENCE, || reloads(&agent) == 1 && applied(&agent) == 1),
        "the log says the config was reloaded and the drain took it\n{}",
        agent.log_tail(30)
    );
    let a_before = env.server.requests().len();
    let ids2 = drop_events(&env, "two.jsonl", 20_000, 5);
    assert!(
        server_b.wait_for_ids(&ids2, PATIENCE),
        "B got the file dropped after the reload\n{}",
        agent.log_tail(30)
    );
    assert_eq!(
        env.server.requests().len(),
        a_before,
        "nothing went to A after the reload"
    );

    // 2. an unknown key: refused, the running config (endpoint B) stays.
    let good = env.config.clone();
    env.config = good.clone().with_extra("segment", "bogus_reload_key = 1");
    env.write_config();
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_for_log("reload refused", PATIENCE),
        "the log says the reload was refused\n{}",
        agent.log_tail(30)
    );
    // The problem list may span lines: look just after the refusal.
    let logs = agent.logs();
    let refused: String = logs[logs.find("reload refused").expect("found above")..]
        .chars()
        .take(600)
        .collect();
    assert!(
        refused.contains("bogus_reload_key"),
        "the refusal names the key: {refused}"
    );
    assert!(
        agent.is_running(),
        "an invalid config does not stop the agent"
    );
    let ids3 = drop_events(&env, "three.jsonl", 30_000, 5);
    assert!(
        server_b.wait_for_ids(&ids3, PATIENCE),
        "B still gets events after a refused reload\n{}",
        agent.log_tail(30)
    );
    assert_eq!(
        env.server.requests().len(),
        a_before,
        "nothing went to A after the refused reload"
    );
    assert_eq!(
        reloads(&agent),
        1,
        "the refused reload did not say 'config reloaded'"
    );
    assert!(
        !agent.logs().contains("batch delivered"),
        "no debug line at log.level = info\n{}",
        agent.log_tail(30)
    );

    // 3. log.level info -> debug, live.
    env.config = good;
    env.config.log_level = Some("debug".into());
    env.write_config();
    agent.signal(libc::SIGHUP);
    assert!(
        wait_until(PATIENCE, || reloads(&agent) == 2),
        "the debug reload was applied\n{}",
        agent.log_tail(30)
    );
    let ids4 = drop_events(&env, "four.jsonl", 40_000, 5);
    assert!(
        server_b.wait_for_ids(&ids4, PATIENCE),
        "B got the fourth file\n{}",
        agent.log_tail(30)
    );
    assert!(
        agent.wait_for_log("batch delivered", Duration::from_secs(5)),
        "a debug line appears after log.level became debug\n{}",
        agent.log_tail(30)
    );
    let logs = agent.logs();
    let after = logs.rfind("config reloaded").expect("reloaded line");
    assert!(
        logs[after..].contains("DEBUG"),
        "debug lines come after the reload"
    );

    server_b.wait_for_quiet(Duration::from_millis(800), PATIENCE);
    let exit = agent.stop();
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "{}",
        agent.log_tail(20)
    );
    let on_b: Vec<String> = ids2.iter().chain(&ids3).chain(&ids4).cloned().collect();
    assert_exactly_once(&server_b, &on_b, &agent, "B after the reload");
    assert_exactly_once(&env.server, &ids1, &agent, "A before the reload");
}

#[test]
fn sigusr1_cuts_a_long_backoff_short() {
    let mut env = TestEnv::new();
    env.config.initial_backoff_ms = Some(30_000);
    env.config.max_backoff_secs = Some(60);
    env.config.concurrency = Some(1);
    // Backoff is full jitter (0 ..= 30 s): Retry-After makes the wait at least 30 s for sure.
    env.server
        .push_replies([Reply::status(503).with_header("Retry-After", "30")]);
    let mut agent = env.start_agent();
    let ids = drop_events(&env, "events.jsonl", 50_000, 10);

    assert!(
        env.server.wait_for_requests(1, PATIENCE),
        "first attempt\n{}",
        agent.log_tail(30)
    );
    let refused_at = env.server.requests()[0].received_at;
    assert_eq!(env.server.requests()[0].status, 503);
    let status = wait_for_status(&env.config_path, Duration::from_secs(5), |s| {
        s["state"] == "backing_off" && s["current_backoff_ms"].is_u64()
    })
    .expect("status shows the backoff after the 503");
    let backoff_ms = status["current_backoff_ms"].as_u64().unwrap_or_default();
    assert!(backoff_ms >= 15_000, "the wait in force is long: {status}");

    let signal_at = refused_at + Duration::from_secs(1);
    thread::sleep(signal_at.saturating_duration_since(Instant::now()));
    assert_eq!(env.server.requests().len(), 1, "no retry before SIGUSR1");
    let signalled = Instant::now();
    agent.signal(libc::SIGUSR1);
    assert!(
        env.server.wait_for_requests(2, PATIENCE),
        "a retry after SIGUSR1\n{}",
        agent.log_tail(30)
    );
    let retry = env.server.requests()[1].clone();
    let after = retry.received_at.saturating_duration_since(signalled);
    eprintln!("backoff in force {backoff_ms} ms; retry {after:?} after SIGUSR1");
    // Before the wait in force (Retry-After: 30 s) was over: SIGUSR1 cut it short.
    assert!(
        retry.received_at < refused_at + Duration::from_millis(backoff_ms),
        "retry {after:?} after SIGUSR1, not before the {backoff_ms} ms backoff ended\n{}",
        agent.log_tail(30)
    );
    assert!(
        env.server.wait_for_ids(&ids, PATIENCE),
        "all delivered\n{}",
        agent.log_tail(30)
    );
    env.server
        .wait_for_quiet(Duration::from_millis(800), PATIENCE);
    let exit = agent.stop();
    assert_eq!(exit.and_then(|e| e.code()), Some(0));
    assert_exactly_once(&env.server, &ids, &agent, "after SIGUSR1");
}

/// Datagrams received on a fake `$NOTIFY_SOCKET`, collected by a thread.
struct NotifySocket {
    path: PathBuf,
    received: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> NotifySocket {
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::downgrade(&received);
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            // Stops once the test has dropped the socket's collection.
            while let Some(sink) = sink.upgrade() {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock()
                        .expect("notify log")
                        .push((Instant::now(), text));
                }
            }
        });
        NotifySocket { path, received }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.received.lock().expect("notify log").clone()
    }

    /// Index of the first datagram at or after `from` that has `line` as one of its lines.
    fn find(&self, from: usize, line: &str) -> Option<usize> {
        self.all()
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, (_, d))| d.lines().any(|l| l == line))
            .map(|(i, _)| i)
    }

    fn wait_for(&self, from: usize, line: &str, timeout: Duration) -> Option<usize> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.find(from, line);
            found.is_some()
        });
        found
    }
}

#[test]
fn notify_protocol() {
    let env = TestEnv::new();
    let early = drop_events(&env, "before-start.jsonl", 60_000, 3);
    let notify = NotifySocket::bind(env.root().join("notify.sock"));
    let config = env.write_config();
    // sd-notify 0.4.5's watchdog_enabled() wants WATCHDOG_PID == its own pid, unknown before the
    // spawn: sh sets it to $$ and execs the agent, which keeps that pid.
    let mut cmd = scrubbed_command("sh");
    cmd.args([
        "-c",
        r#"WATCHDOG_PID=$$ exec "$0" "$@""#,
        BIN,
        "run",
        "--config",
    ])
    .arg(&config)
    .env("NOTIFY_SOCKET", &notify.path)
    .env("WATCHDOG_USEC", "2000000");
    let started = Instant::now();
    let mut agent = Agent::spawn(cmd, &config);

    let ready = notify.wait_for(0, "READY=1", Duration::from_secs(15));
    let dump = |notify: &NotifySocket, agent: &Agent| {
        format!(
            "datagrams: {:?}\nagent log:\n{}",
            notify.all().iter().map(|(_, d)| d).collect::<Vec<_>>(),
            agent.log_tail(30)
        )
    };
    let ready = ready.unwrap_or_else(|| panic!("READY=1\n{}", dump(&notify, &agent)));
    let ready_at = notify.all()[ready].0;
    eprintln!("READY=1 {:?} after the spawn", ready_at - started);
    let logs = agent.logs();
    assert!(
        logs.contains("spool open"),
        "READY comes after the spool is open\n{logs}"
    );

    // The watchdog: WATCHDOG_USEC = 2 s, pinged every 1 s.
    assert!(
        wait_until(Duration::from_secs(4), || notify
            .all()
            .iter()
            .filter(|(at, d)| *at >= ready_at && d.lines().any(|l| l == "WATCHDOG=1"))
            .count()
            >= 2),
        "two WATCHDOG=1 within ~3 s of READY\n{}",
        dump(&notify, &agent)
    );
    assert!(
        env.server.wait_for_ids(&early, PATIENCE),
        "the file present at start is delivered"
    );

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC in the same datagram, then READY=1 again.
    let from = notify.all().len();
    agent.signal(libc::SIGHUP);
    let reloading = notify
        .wait_for(from, "RELOADING=1", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("RELOADING=1\n{}", dump(&notify, &agent)));
    let datagram = notify.all()[reloading].1.clone();
    assert!(
        datagram.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))),
        "MONOTONIC_USEC=<digits> beside RELOADING=1: {datagram:?}"
    );
    notify
        .wait_for(reloading + 1, "READY=1", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("READY=1 after the reload\n{}", dump(&notify, &agent)));

    // STATUS= every 10 s (the first at start); wait for one if none came yet.
    let has_status = |n: &NotifySocket| {
        n.all()
            .iter()
            .any(|(_, d)| d.lines().any(|l| l.starts_with("STATUS=") && l.len() > 7))
    };
    assert!(
        wait_until(
            (started + Duration::from_secs(11)).saturating_duration_since(Instant::now()),
            || has_status(&notify)
        ),
        "a STATUS= line within 11 s of the start\n{}",
        dump(&notify, &agent)
    );

    // SIGTERM: STOPPING=1, exit 0.
    let from = notify.all().len();
    agent.signal(libc::SIGTERM);
    let exit = agent.wait_exit(Duration::from_secs(15));
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "{}",
        dump(&notify, &agent)
    );
    assert!(
        notify
            .wait_for(from, "STOPPING=1", Duration::from_secs(2))
            .is_some(),
        "STOPPING=1 at shutdown\n{}",
        dump(&notify, &agent)
    );
    assert!(
        !agent.logs().contains("cannot notify systemd"),
        "{}",
        agent.log_tail(30)
    );
    let statuses: Vec<String> = notify
        .all()
        .iter()
        .flat_map(|(_, d)| {
            d.lines()
                .filter(|l| l.starts_with("STATUS="))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    eprintln!(
        "STATUS lines: {statuses:?}; test took {:?}",
        started.elapsed()
    );
}

/// Every field `status --json` promises (SPEC section 9, `control::status` module doc).
const STATUS_FIELDS: &[&str] = &[
    "state",
    "version",
    "pid",
    "uptime_secs",
    "endpoint",
    "spool_events",
    "spool_bytes",
    "oldest_event_age_secs",
    "events_read",
    "events_spooled",
    "events_delivered",
    "duplicates_skipped",
    "skipped",
    "skipped_by_action",
    "quarantined",
    "dead_lettered",
    "files_seen",
    "files_in_progress",
    "files_done",
    "files_failed",
    "last_success",
    "last_error",
    "current_backoff_ms",
    "last_rejected_status",
    "notes",
];

/// `status` and `status --json`: (human output, JSON, exit codes of both).
fn status_both(config: &Path) -> (CmdOutput, CmdOutput) {
    let human = cli(&["status", "--config", path_str(config)]);
    let json = cli(&["status", "--config", path_str(config), "--json"]);
    (human, json)
}

fn parse_json(out: &CmdOutput) -> Value {
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json: {e}\n{}", out.all_output()))
}

fn assert_no_key(what: &str, text: &str) {
    for needle in secret_forms() {
        assert!(
            !text.contains(&needle),
            "{what} shows the write key ({needle}):\n{text}"
        );
    }
}

/// The write key as it could leak: plain, base64, and base64 of the Basic-auth `key:`.
fn secret_forms() -> Vec<String> {
    let b64 = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .encode(s)
            .trim_end_matches('=')
            .to_string()
    };
    vec![
        WRITE_KEY.to_string(),
        b64(WRITE_KEY),
        b64(&format!("{WRITE_KEY}:")),
    ]
}

#[test]
fn status_running_backing_off_and_stopped() {
    let env = TestEnv::new();
    let mut agent = env.start_agent();
    let config = env.config_path.clone();
    let ids = drop_events(&env, "one.jsonl", 70_000, 6);
    assert!(
        env.server.wait_for_ids(&ids, PATIENCE),
        "delivered\n{}",
        agent.log_tail(30)
    );
    let running = wait_for_status(&config, PATIENCE, |s| s["events_delivered"] == 6)
        .expect("status counts the delivered events");

    let (human, json) = status_both(&config);
    assert_eq!(
        human.code(),
        0,
        "status while running\n{}",
        human.all_output()
    );
    assert_eq!(
        json.code(),
        0,
        "status --json while running\n{}",
        json.all_output()
    );
    assert_no_key("status", &human.all_output());
    assert_no_key("status --json", &json.all_output());
    let s = parse_json(&json);
    for field in STATUS_FIELDS {
        assert!(s.get(*field).is_some(), "status --json has {field:?}: {s}");
    }
    assert_eq!(s["state"], "running", "{s}");
    assert!(
        human
            .stdout
            .lines()
            .next()
            .unwrap_or_default()
            .contains("running"),
        "{}",
        human.stdout
    );
    assert_eq!(s["pid"].as_u64(), Some(u64::from(agent.pid())), "{s}");
    assert_eq!(s["endpoint"], env.server.url().as_str(), "{s}");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"), "{s}");
    assert!(s["uptime_secs"].is_u64(), "{s}");
    assert!(s["last_success"].is_string(), "{s}");
    assert_eq!(s["spool_events"], 0, "{s}");
    assert_eq!(running["events_delivered"], 6);

    // Segment answers 503: backing_off, events queued, the error and the wait shown.
    env.server.set_default(Reply::status(503));
    let left = drop_events(&env, "two.jsonl", 71_000, 4);
    let s = wait_for_status(&config, PATIENCE, |s| {
        s["state"] == "backing_off" && s["spool_events"] == 4
    })
    .unwrap_or_else(|| panic!("backing_off with 4 queued\n{}", agent.log_tail(30)));
    assert!(
        s["last_error"].as_str().is_some_and(|e| e.contains("503")),
        "last_error mentions 503: {s}"
    );
    assert!(
        s["current_backoff_ms"].is_u64(),
        "current_backoff_ms set: {s}"
    );
    assert!(s["oldest_event_age_secs"].is_u64(), "{s}");
    let (human, json) = status_both(&config);
    assert_eq!(human.code(), 0, "{}", human.all_output());
    assert!(human.stdout.contains("backing_off"), "{}", human.stdout);
    assert!(human.stdout.contains("503"), "{}", human.stdout);
    assert_no_key("status (backing off)", &human.all_output());
    assert_no_key("status --json (backing off)", &json.all_output());

    // Stopped: exit 3, the backlog read from the spool.
    let exit = agent.stop();
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "{}",
        agent.log_tail(20)
    );
    let (human, json) = status_both(&config);
    assert_eq!(
        human.code(),
        3,
        "status when stopped\n{}",
        human.all_output()
    );
    assert_eq!(
        json.code(),
        3,
        "status --json when stopped\n{}",
        json.all_output()
    );
    let s = parse_json(&json);
    for field in STATUS_FIELDS {
        assert!(
            s.get(*field).is_some(),
            "stopped status --json has {field:?}: {s}"
        );
    }
    assert_eq!(s["state"], "stopped", "{s}");
    assert_eq!(
        s["spool_events"].as_u64(),
        Some(left.len() as u64),
        "what was left: {s}"
    );
    assert!(human.stdout.contains("stopped"), "{}", human.stdout);
    assert_no_key("status (stopped)", &human.all_output());
    assert_no_key("status --json (stopped)", &json.all_output());

    // A 401: auth_failed, with the status code.
    env.server.set_default(Reply::status(401));
    let mut agent = env.start_agent();
    // Not before the agent is up: an offline `status` takes the spool lock for a moment, and
    // an agent starting in that moment is refused (see the report on this race).
    assert!(
        wait_until(PATIENCE, || ready_lines(&agent.logs()) == 2),
        "the restarted agent is ready\n{}",
        agent.log_tail(30)
    );
    let s = wait_for_status(&config, PATIENCE, |s| s["state"] == "auth_failed")
        .unwrap_or_else(|| panic!("auth_failed after a 401\n{}", agent.log_tail(30)));
    assert_eq!(s["last_rejected_status"], 401, "{s}");
    assert_eq!(
        s["spool_events"].as_u64(),
        Some(left.len() as u64),
        "nothing dropped on 401: {s}"
    );
    let (human, json) = status_both(&config);
    assert!(human.stdout.contains("auth_failed"), "{}", human.stdout);
    assert_no_key("status (auth_failed)", &human.all_output());
    assert_no_key("status --json (auth_failed)", &json.all_output());
    let exit = agent.stop();
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "{}",
        agent.log_tail(20)
    );
}

/// Kills a daemon (not our child) if the test ends early.
struct DaemonGuard(Option<u32>);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0
            && pid_alive(pid)
        {
            let _ = kill_pid(pid, libc::SIGKILL);
        }
    }
}

#[test]
fn daemon_mode() {
    let env = TestEnv::new();
    let config = env.write_config();
    let pidfile = env.root().join("run").join("agent.pid");
    let logfile = env.root().join("agent.log");
    let daemon_args = [
        "run",
        "--daemonize",
        "--pidfile",
        path_str(&pidfile),
        "--log-file",
        path_str(&logfile),
        "--config",
        path_str(&config),
    ];
    let mut guard = DaemonGuard(None);

    let t = Instant::now();
    let out = cli(&daemon_args);
    let took = t.elapsed();
    eprintln!(
        "run --daemonize returned {:?} after {took:?}",
        out.status.code()
    );
    // Returned at all (run_cli would fail after PATIENCE): the daemon went to the background.
    assert_eq!(out.code(), 0, "run --daemonize\n{}", out.all_output());

    let mut pid = None;
    wait_until(Duration::from_secs(5), || {
        pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        pid.is_some()
    });
    let pid = pid.unwrap_or_else(|| panic!("the pid file {} holds a pid", pidfile.display()));
    guard.0 = Some(pid);
    let daemon_log = || std::fs::read_to_string(&logfile).unwrap_or_default();
    assert!(
        pid_alive(pid),
        "pid {pid} from the pid file is alive\n{}",
        daemon_log()
    );

    let ids = drop_events(&env, "daemon.jsonl", 80_000, 5);
    assert!(
        env.server.wait_for_ids(&ids, PATIENCE),
        "the daemon delivers\n{}",
        daemon_log()
    );
    let s = status_json(&config);
    assert_eq!(
        s["pid"].as_u64(),
        Some(u64::from(pid)),
        "status reaches the daemon: {s}"
    );

    // logrotate without copytruncate: the file is moved away and the daemon gets SIGHUP; it
    // logs on into a new file at the same path, the old one keeps what was written before.
    let rotated = env.root().join("agent.log.1");
    std::fs::rename(&logfile, &rotated).expect("rotate the log");
    kill_pid(pid, libc::SIGHUP).expect("signal the daemon");
    assert!(
        wait_until(PATIENCE, || daemon_log().contains("log file reopened")),
        "the daemon writes to the new log file after SIGHUP; rotated:\n{}",
        std::fs::read_to_string(&rotated).unwrap_or_default()
    );
    assert!(
        std::fs::read_to_string(&rotated)
            .unwrap_or_default()
            .contains("ready"),
        "the rotated file kept the earlier lines"
    );

    // A second daemon on the same pid file: refused at once, in the foreground.
    let t = Instant::now();
    let out = cli(&daemon_args);
    let took = t.elapsed();
    assert_ne!(
        out.code(),
        0,
        "a second run --daemonize fails\n{}",
        out.all_output()
    );
    assert!(
        out.all_output().contains("already running"),
        "{}",
        out.all_output()
    );
    eprintln!("second run --daemonize refused after {took:?}");

    // A foreground agent on the same spool: refused at once, naming the spool.
    let t = Instant::now();
    let out = cli(&["run", "--config", path_str(&config)]);
    let took = t.elapsed();
    eprintln!(
        "foreground run on a busy spool: exit {:?} after {took:?}",
        out.status.code()
    );
    assert_ne!(
        out.code(),
        0,
        "a foreground run on a busy spool fails\n{}",
        out.all_output()
    );
    let msg = out.all_output();
    assert!(
        msg.contains("spool") && msg.contains("in use"),
        "the message says the spool is in use:\n{msg}"
    );
    assert!(
        pid_alive(pid),
        "the daemon survived the refused starts\n{}",
        daemon_log()
    );
    assert!(
        status_json(&config)["state"] == "running",
        "still answering"
    );

    // SIGTERM: the daemon exits and lets go of the pid file.
    let t = Instant::now();
    kill_pid(pid, libc::SIGTERM).expect("signal the daemon");
    assert!(
        wait_until(Duration::from_secs(15), || !pid_alive(pid)),
        "the daemon exits after SIGTERM\n{}",
        daemon_log()
    );
    eprintln!("daemon exited {:?} after SIGTERM", t.elapsed());
    guard.0 = None;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pidfile)
        .expect("open the pid file");
    // The group leader shows as a zombie while its other threads are still exiting, holding
    // the open files for a moment longer: poll.
    assert!(
        wait_until(Duration::from_secs(5), || f.try_lock().is_ok()),
        "the pid file is no longer locked"
    );
    let log = daemon_log();
    assert!(
        log.contains("starting") && log.contains("stopped"),
        "the daemon logged to --log-file:\n{log}"
    );
    assert_no_key("daemon log", &log);
}

#[test]
fn write_key_never_leaks() {
    let mut env = TestEnv::new();
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut keep = |what: &str, out: &CmdOutput| outputs.push((what.to_string(), out.all_output()));
    let config = env.write_config();
    keep(
        "check-config (good)",
        &cli(&["check-config", "--config", path_str(&config)]),
    );

    let mut agent = env.start_agent();
    let ids = drop_events(&env, "one.jsonl", 90_000, 5);
    assert!(
        env.server.wait_for_ids(&ids, PATIENCE),
        "delivered\n{}",
        agent.log_tail(30)
    );
    keep(
        "status (running)",
        &cli(&["status", "--config", path_str(&config)]),
    );
    keep(
        "status --json (running)",
        &cli(&["status", "--config", path_str(&config), "--json"]),
    );

    // A 401 phase.
    env.server.set_default(Reply::status(401));
    drop_events(&env, "two.jsonl", 91_000, 5);
    wait_for_status(&config, PATIENCE, |s| s["state"] == "auth_failed")
        .unwrap_or_else(|| panic!("auth_failed\n{}", agent.log_tail(30)));
    keep(
        "status (auth_failed)",
        &cli(&["status", "--config", path_str(&config)]),
    );
    keep(
        "status --json (auth_failed)",
        &cli(&["status", "--config", path_str(&config), "--json"]),
    );
    keep(
        "dead-letter list",
        &cli(&["dead-letter", "list", "--config", path_str(&config)]),
    );
    keep(
        "dead-letter list --json",
        &cli(&[
            "dead-letter",
            "list",
            "--json",
            "--config",
            path_str(&config),
        ]),
    );

    // A valid reload, then an invalid one with the key in the file.
    env.config.flush_interval_ms = Some(300);
    env.write_config();
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_for_log("config reloaded", PATIENCE),
        "{}",
        agent.log_tail(30)
    );
    let good = env.config.clone();
    env.config = good.clone().with_extra("segment", "bogus = true");
    env.write_config();
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_for_log("reload refused", PATIENCE),
        "{}",
        agent.log_tail(30)
    );
    env.config = good.clone();
    env.write_config();

    // Bad configs through check-config, each with the key in the file.
    let bad = env.root().join("bad.toml");
    let key_file = env.root().join("write_key");
    std::fs::write(&key_file, format!("{WRITE_KEY}\n")).expect("write the key file");
    let good_text = good.to_toml();
    let key_line = format!("write_key = \"{WRITE_KEY}\"");
    let cases = [
        (
            "unknown key",
            good.clone().with_extra("segment", "bogus = true").to_toml(),
        ),
        ("both key sources", {
            let mut c = good.clone();
            c.write_key_file = Some(key_file.clone());
            c.to_toml()
        }),
        (
            "unterminated key string",
            good_text.replace(&key_line, &format!("write_key = \"{WRITE_KEY}")),
        ),
        (
            "bare key",
            good_text.replace(&key_line, &format!("write_key = {WRITE_KEY}")),
        ),
        (
            "key in another field",
            good_text.replace("[log]", &format!("[log]\nformat = \"{WRITE_KEY}\"")),
        ),
    ];
    for (what, text) in &cases {
        assert!(text.contains(WRITE_KEY), "case {what} holds the key");
        std::fs::write(&bad, text).expect("write the bad config");
        let out = cli(&["check-config", "--config", path_str(&bad)]);
        assert_eq!(
            out.code(),
            EX_CONFIG,
            "check-config ({what}) exits 78\n{}",
            out.all_output()
        );
        keep(&format!("check-config ({what})"), &out);
    }
    // A key file others can read: a warning, never the key.
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod the key file");
    let mut from_file = good.clone();
    from_file.write_key = None;
    from_file.write_key_file = Some(key_file.clone());
    from_file.write(&bad);
    keep(
        "check-config (key file 0644)",
        &cli(&["check-config", "--config", path_str(&bad)]),
    );

    let exit = agent.stop();
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "{}",
        agent.log_tail(20)
    );
    keep(
        "status (stopped)",
        &cli(&["status", "--config", path_str(&config)]),
    );
    keep(
        "status --json (stopped)",
        &cli(&["status", "--config", path_str(&config), "--json"]),
    );
    keep(
        "dead-letter list (stopped)",
        &cli(&["dead-letter", "list", "--config", path_str(&config)]),
    );
    outputs.push(("agent log".into(), agent.logs()));
    outputs.push(("agent stdout".into(), agent.stdout()));

    let mut leaks = Vec::new();
    for (what, text) in &outputs {
        for needle in secret_forms() {
            if let Some(line) = text.lines().find(|l| l.contains(&needle)) {
                leaks.push(format!("{what}: {line}"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "the write key leaked:\n{}",
        leaks.join("\n")
    );
    assert!(
        env.server.requests().iter().all(|r| r.auth_ok),
        "the key was sent where it belongs, every time"
    );
}

/// `GET path` on `addr` with a plain TcpStream: (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the answer");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// The value of an unlabelled sample `name` in a Prometheus text body.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn metrics_endpoint() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut env = TestEnv::new();
    env.config = env
        .config
        .clone()
        .with_extra("control", &format!("metrics_listen = \"{addr}\""));
    let mut agent = env.start_agent();
    assert!(
        agent.wait_for_log("metrics endpoint listening", PATIENCE),
        "{}",
        agent.log_tail(30)
    );
    let ids = drop_events(&env, "metrics.jsonl", 95_000, 7);
    assert!(
        env.server.wait_for_ids(&ids, PATIENCE),
        "delivered\n{}",
        agent.log_tail(30)
    );

    let mut last = (String::new(), String::new());
    let counted = wait_until(Duration::from_secs(10), || {
        last = http_get(&addr, "/metrics");
        sample(&last.1, "lsa_events_delivered_total") == Some(ids.len() as f64)
    });
    let (status_line, body) = last;
    assert!(status_line.contains(" 200 "), "GET /metrics: {status_line}");
    assert!(
        counted,
        "lsa_events_delivered_total is {}:\n{body}",
        ids.len()
    );
    assert_eq!(
        sample(&body, "lsa_delivery_latency_seconds_count"),
        Some(ids.len() as f64),
        "one latency observation per delivered event:\n{body}"
    );
    assert!(
        body.contains("# TYPE lsa_delivery_latency_seconds histogram"),
        "{body}"
    );
    assert_no_key("metrics", &body);
    let (status_line, _) = http_get(&addr, "/nope");
    assert!(status_line.contains(" 404 "), "GET /nope: {status_line}");
    let exit = agent.stop();
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "{}",
        agent.log_tail(20)
    );

    // Not loopback: the endpoint has no auth, so check-config refuses it.
    let mut open = env.config.clone();
    open.extra.retain(|(section, _)| section != "control");
    let open = open.with_extra("control", "metrics_listen = \"0.0.0.0:9464\"");
    let path = env.root().join("open-metrics.toml");
    open.write(&path);
    let out = cli(&["check-config", "--config", path_str(&path)]);
    assert_eq!(out.code(), EX_CONFIG, "{}", out.all_output());
    assert!(
        out.all_output().contains("control.metrics_listen"),
        "{}",
        out.all_output()
    );
}

/// `log.format = "json"` (hosts without journald): every log line is one JSON object.
#[test]
fn json_logs_are_one_object_per_line() {
    let mut env = TestEnv::new();
    env.config = env.config.clone().with_extra("log", "format = \"json\"");
    env.config.log_level = Some("info".into());
    let mut agent = env.start_agent();
    assert!(
        agent.wait_for_log("ready", PATIENCE),
        "{}",
        agent.log_tail(10)
    );
    assert!(agent.stop().is_some_and(|s| s.success()));
    let logs = agent.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{logs}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

/// Supervision (SPEC section 9): a task that panics stops the agent with a non-zero exit and a
/// message naming the task, so systemd restarts a whole process; the spool stays as it was.
#[test]
fn a_panicking_task_stops_the_agent_with_an_error_naming_it() {
    let env = TestEnv::new();
    let config = env.write_config();
    let mut cmd = run_command(BIN, &config);
    cmd.env("LSA_FAILPOINT", "drain");
    let mut agent = Agent::spawn(cmd, &config);
    let exit = agent
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("the agent kept running\n{}", agent.log_tail(20)));
    assert!(!exit.success(), "non-zero exit: {exit}");
    let logs = agent.logs();
    assert!(
        logs.contains("the drain task panicked: failpoint drain"),
        "{}",
        agent.log_tail(20)
    );
    // The next start, without the fault, runs normally on the same spool.
    let before = crate::util::ready_lines(&logs);
    let agent = env.start_agent();
    assert!(
        wait_until(PATIENCE, || crate::util::ready_lines(&agent.logs())
            > before),
        "{}",
        agent.log_tail(20)
    );
    assert_eq!(status_json(&config)["state"], "running");
}
