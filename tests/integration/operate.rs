//! Operating the agent (SPEC section 2): `files` shows every file and where it stands, with the
//! agent running and stopped; `replay` re-ingests files or directories through the running
//! agent, inside `watch.dir` or not, read before or not.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::util::{
    PATIENCE, Reply, TestEnv, count_log_lines, new_env, open_session_lines, run_cli, status_json,
    try_status_json, wait_delivered, wait_until, write_atomically,
};

const BASE: u64 = 8_600_000_000_000_000_000;

fn files(config: &Path, extra: &[&str]) -> (i32, Vec<Value>) {
    let mut args: Vec<&OsStr> = vec![
        "files".as_ref(),
        "--json".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let out = run_cli(&args, PATIENCE);
    let entries = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("files --json: {e}: {out:?}"));
    (out.code(), entries)
}

fn state_of(entries: &[Value], path: &str) -> String {
    entries
        .iter()
        .find(|e| e["path"] == path)
        .map(|e| e["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_else(|| format!("<no entry for {path}: {entries:?}>"))
}

#[test]
fn files_shows_each_state_running_and_stopped() {
    let env: TestEnv = new_env();
    let config = env.write_config();
    let mut agent = env.start_agent();
    // Delivered.
    let (bytes, ids) = open_session_lines(BASE, 3);
    write_atomically(&env.watch_dir().join("a-delivered.jsonl"), &bytes);
    wait_delivered(&env, &agent, &ids, "delivered file");
    // Failed: a gzip file cut short (the records before the cut are kept).
    let (plain, _) = open_session_lines(BASE + 5, 50);
    let gz = crate::util::gzip_bytes(&plain);
    write_atomically(
        &env.watch_dir().join("b-failed.jsonl.gz"),
        &gz[..gz.len() / 2],
    );
    // Held: a last line still being written (no newline, not parseable).
    let (mut held, _) = open_session_lines(BASE + 10, 1);
    held.extend_from_slice(br#"{"deviceId":"D-half","time":17935"#);
    std::fs::write(env.watch_dir().join("c-held.jsonl"), &held).unwrap();
    // Done, with events waiting: Segment down from now on.
    env.server.set_default(Reply::status(503));
    let (bytes, _) = open_session_lines(BASE + 20, 2);
    write_atomically(&env.watch_dir().join("d-done.jsonl"), &bytes);

    let ok = wait_until(PATIENCE, || {
        let (code, e) = files(&config, &[]);
        code == 0
            && state_of(&e, "a-delivered.jsonl") == "delivered"
            && state_of(&e, "c-held.jsonl") == "held"
            && state_of(&e, "d-done.jsonl") == "done"
            && state_of(&e, "b-failed.jsonl.gz") == "failed"
    });
    let (_, entries) = files(&config, &[]);
    assert!(ok, "{entries:#?}\n{}", agent.log_tail(30));
    let done = entries
        .iter()
        .find(|e| e["path"] == "d-done.jsonl")
        .unwrap();
    assert_eq!(done["events_read"], 2);
    assert_eq!(done["events_queued"], 2);
    assert!(
        done["reason"]
            .as_str()
            .unwrap()
            .contains("2 events waiting"),
        "{done}"
    );
    let delivered = entries
        .iter()
        .find(|e| e["path"] == "a-delivered.jsonl")
        .unwrap();
    assert_eq!(delivered["events_delivered"], 3);
    assert_eq!(delivered["format"], "sessions", "{delivered}");
    let held_entry = entries
        .iter()
        .find(|e| e["path"] == "c-held.jsonl")
        .unwrap();
    assert!(
        held_entry["reason"]
            .as_str()
            .unwrap()
            .contains("unfinished"),
        "{held_entry}"
    );
    let failed = entries
        .iter()
        .find(|e| e["path"] == "b-failed.jsonl.gz")
        .unwrap();
    assert!(
        !failed["reason"].as_str().unwrap_or("").is_empty(),
        "{failed}"
    );
    assert_eq!(failed["gzip"], true, "{failed}");
    let (_, only_done) = files(&config, &["--state", "done"]);
    assert_eq!(only_done.len(), 1, "{only_done:?}");

    // Stopped: the spool alone answers (held is a live state: a stopped agent says reading).
    assert!(agent.stop().is_some_and(|s| s.success()));
    let (code, stopped) = files(&config, &[]);
    assert_eq!(code, 0);
    assert_eq!(state_of(&stopped, "a-delivered.jsonl"), "delivered");
    assert_eq!(state_of(&stopped, "d-done.jsonl"), "done");
    assert_eq!(state_of(&stopped, "c-held.jsonl"), "reading");
}

#[test]
fn replay_re_sends_a_delivered_file_once_more_and_reads_a_directory_outside_watch_dir() {
    let env: TestEnv = new_env();
    let config = env.write_config();
    let agent = env.start_agent();
    let (bytes, ids) = open_session_lines(BASE + 100, 4);
    let inside = env.watch_dir().join("e-replayed.jsonl");
    write_atomically(&inside, &bytes);
    wait_delivered(&env, &agent, &ids, "first delivery");
    env.server.wait_for_quiet(Duration::from_secs(1), PATIENCE);
    assert_eq!(env.server.accepted_count(), 4);

    // Dropping the same content again is skipped (the dedupe index), replay is not.
    let out = run_cli(
        &[
            "replay".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            inside.as_os_str(),
        ],
        PATIENCE,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stdout.contains("1 files handed to the agent"),
        "{out:?}"
    );
    assert!(
        wait_until(PATIENCE, || env.server.accepted_count() == 8),
        "{}",
        agent.log_tail(20)
    );
    env.server.wait_for_quiet(Duration::from_secs(1), PATIENCE);
    let counts = env.server.accepted_id_counts();
    assert!(
        ids.iter().all(|id| counts[id] == 2),
        "exactly once more: {counts:?}"
    );

    // A directory outside watch.dir, never seen.
    let outside = env.root().join("backfill/2025");
    std::fs::create_dir_all(&outside).unwrap();
    let (one, ids_one) = open_session_lines(BASE + 200, 3);
    let (two, ids_two) = open_session_lines(BASE + 300, 2);
    std::fs::write(outside.join("export-1-output-0"), one).unwrap();
    std::fs::write(outside.join("export-1-output-1"), two).unwrap();
    std::fs::write(outside.join("export-1-output-manifest"), b"{}").unwrap();
    let out = run_cli(
        &[
            "replay".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            env.root().join("backfill").as_os_str(),
        ],
        PATIENCE,
    );
    assert!(
        out.stdout.contains("2 files handed to the agent"),
        "{out:?}"
    );
    let all: Vec<String> = ids_one.iter().chain(&ids_two).cloned().collect();
    wait_delivered(&env, &agent, &all, "replayed directory");
    let (_, entries) = files(&config, &[]);
    let replays: Vec<&Value> = entries.iter().filter(|e| e["replay"] == true).collect();
    assert_eq!(replays.len(), 3, "{entries:#?}");
    assert!(
        wait_until(PATIENCE, || {
            let (_, e) = files(&config, &[]);
            e.iter()
                .filter(|e| e["replay"] == true)
                .all(|e| e["state"] == "delivered")
        }),
        "{:#?}",
        files(&config, &[]).1
    );
    assert!(inside.exists(), "a replayed file is left where it is");
}

#[test]
fn replay_without_a_running_agent_exits_3_with_a_hint() {
    let env: TestEnv = new_env();
    let config = env.write_config();
    let file = env.root().join("x.jsonl");
    std::fs::write(&file, b"{}\n").unwrap();
    let out = run_cli(
        &[
            "replay".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            file.as_os_str(),
        ],
        PATIENCE,
    );
    assert_eq!(out.code(), 3, "{out:?}");
    assert!(out.stderr.contains("start it"), "{out:?}");
}

#[test]
fn an_agent_starting_while_a_command_reads_its_spool_waits_for_it_then_runs() {
    let env = new_env();
    let config = env.write_config();
    let mut agent = env.start_agent();
    assert!(
        agent.wait_for_log("app: ready", PATIENCE),
        "{}",
        agent.log_tail(30)
    );
    assert!(agent.stop().is_some_and(|s| s.success()), "clean stop");
    let lock_path = env.config.spool_dir.join("LOCK");
    // The agents of one test append to one log file.
    let readies = |agent: &crate::util::Agent| count_log_lines(&agent.logs(), "app: ready");

    // A command reading the stopped agent's spool (`status`, `dead-letter list`) holds a shared
    // flock on LOCK while it has the spool open; this test holds one the same way, for as long
    // as it likes.
    let look = std::fs::File::open(&lock_path).expect("open LOCK");
    look.lock_shared().expect("a shared flock");
    let mut agent = env.start_agent();
    let before = readies(&agent);
    assert!(
        agent.wait_for_log("waiting for it to finish", PATIENCE),
        "the agent says it waits\n{}",
        agent.log_tail(30)
    );
    assert!(
        agent.is_running(),
        "waiting, not refused\n{}",
        agent.log_tail(30)
    );
    assert_eq!(readies(&agent), before, "{}", agent.log_tail(30));
    drop(look);
    assert!(
        wait_until(PATIENCE, || readies(&agent) > before),
        "ready once the look is over\n{}",
        agent.log_tail(30)
    );
    assert_eq!(status_json(&config)["state"], "running");
    assert!(agent.stop().is_some_and(|s| s.success()), "clean stop");

    // The race that one real run hit: `status` asked again and again while agents start (each
    // look reads the spool while no agent answers). Every agent gets to ready and answers.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asker = {
        let (stop, config) = (stop.clone(), config.clone());
        std::thread::spawn(move || {
            let mut asked = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = try_status_json(&config);
                asked += 1;
            }
            asked
        })
    };
    for round in 0..3 {
        let mut agent = env.start_agent();
        let before = readies(&agent);
        assert!(
            wait_until(PATIENCE, || readies(&agent) > before),
            "round {round}: not ready\n{}",
            agent.log_tail(30)
        );
        assert!(
            agent.stop().is_some_and(|s| s.success()),
            "round {round}: clean stop\n{}",
            agent.log_tail(30)
        );
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(asker.join().unwrap() > 0);
}
