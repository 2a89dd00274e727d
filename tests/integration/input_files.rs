//! Input files over their life (SPEC section 7, "Files"): renamed, copied, grown, truncated,
//! replaced, written slowly, ending without a newline, gzipped, waiting for a job manifest,
//! deleted or moved after delivery, shared lines across files, and restarts (clean and
//! `kill -9`). Every test runs the real binary with settle 1 s and rescan 1 s against the fake
//! Segment server, and checks what Segment received by `messageId`, the counters of
//! `status --json`, and the one log line the agent writes per incident.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{
    Agent, DeliveryReport, NOTHING_HAPPENS, PATIENCE, Reply, TestEnv, assert_exactly_once,
    count_log_lines, gzip_bytes, long_session_line, new_env, open_session_line, open_session_lines,
    quarantine_list, ready_lines, status_json, status_u64, wait_delivered, wait_for_status,
    wait_until, write_atomically, write_slowly,
};

/// eventIds of this module: `BASE + test * 1_000_000 + i`, above 2^53 as Leanplum's are.
const BASE: u64 = 8_100_000_000_000_000_000;

fn ids_base(test: u64) -> u64 {
    BASE + test * 1_000_000
}

/// Sleeps [`NOTHING_HAPPENS`] and asserts that Segment accepted no event in the meantime.
fn assert_no_new_deliveries(env: &TestEnv, agent: &Agent, what: &str) {
    let before = env.server.accepted_count();
    thread::sleep(NOTHING_HAPPENS);
    let after = env.server.accepted_count();
    assert_eq!(
        after,
        before,
        "{what}: {} more events were delivered: {:?}\nagent log tail:\n{}",
        after - before,
        &env.server.accepted_message_ids()[before..],
        agent.log_tail(30)
    );
}

/// Appends `bytes` to the file at `path` (which exists), as a writer that keeps it open would.
fn append(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for append: {e}", path.display()));
    f.write_all(bytes).expect("append");
    f.flush().expect("flush");
}

/// Waits until no file is being read or may still grow (`files_in_progress` 0): the files so
/// far are done, so a change from now on is a new one.
fn wait_done(env: &TestEnv, agent: &Agent) {
    let done = wait_for_status(&env.config_path, PATIENCE, |s| {
        status_u64(s, "files_in_progress") == 0
    });
    assert!(
        done.is_some(),
        "the files are done\nagent log tail:\n{}",
        agent.log_tail(20)
    );
}

/// Rewrites `path` in place: truncate, then write `bytes` (no temp file, no rename).
fn rewrite_in_place(path: &Path, bytes: &[u8]) {
    let mut f =
        fs::File::create(path).unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
    f.write_all(bytes).expect("rewrite");
    f.flush().expect("flush");
}

#[test]
fn a_file_renamed_inside_the_tree_is_not_read_again() {
    let env = new_env();
    let mut agent = env.start_agent();
    let (bytes, ids) = open_session_lines(ids_base(1), 6);
    let first = env.watch_dir().join("20261101/export-a");
    write_atomically(&first, &bytes);
    wait_delivered(&env, &agent, &ids, "the original file");
    let read_before = status_u64(&status_json(&env.config_path), "events_read");
    assert_eq!(read_before, 6, "six lines read once");

    // Into a directory that did not exist: the watcher must pick up the new subtree too.
    let renamed = env.watch_dir().join("moved/deeper/export-a-renamed");
    fs::create_dir_all(renamed.parent().unwrap()).unwrap();
    fs::rename(&first, &renamed).unwrap();
    assert!(
        agent.wait_for_log("same content as a file already read", PATIENCE),
        "the rename is recognised and logged\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    assert_no_new_deliveries(&env, &agent, "after the rename");
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "duplicates_skipped"), 0, "{status}");
    assert_eq!(
        status_u64(&status, "events_read"),
        read_before,
        "a renamed file is not even read: {status}"
    );
    assert_exactly_once(&env.server, &ids, &agent, "renamed file");
    assert!(agent.is_running());
}

#[test]
fn a_file_copied_under_a_new_name_is_not_read_again() {
    let env = new_env();
    let mut agent = env.start_agent();
    let (bytes, ids) = open_session_lines(ids_base(2), 6);
    let first = env.watch_dir().join("20261101/export-b");
    write_atomically(&first, &bytes);
    wait_delivered(&env, &agent, &ids, "the original file");
    let read_before = status_u64(&status_json(&env.config_path), "events_read");

    // A re-sync under another name: once as sync tools do (temp file + rename), once copied in
    // place (the watcher sees it grow, then settle).
    write_atomically(&env.watch_dir().join("resync/export-b"), &bytes);
    fs::copy(&first, env.watch_dir().join("20261101/export-b.copy")).unwrap();
    assert!(
        wait_until(PATIENCE, || count_log_lines(
            &agent.logs(),
            "same content as a file already read"
        ) >= 2),
        "both copies are recognised and logged\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    assert_no_new_deliveries(&env, &agent, "after the copies");
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "duplicates_skipped"), 0, "{status}");
    assert_eq!(
        status_u64(&status, "events_read"),
        read_before,
        "a copy is not even read: {status}"
    );
    assert_exactly_once(&env.server, &ids, &agent, "copied file");
    assert!(agent.is_running());
}

#[test]
fn a_growing_file_delivers_only_its_new_lines() {
    let env = new_env();
    let agent = env.start_agent();
    let path = env.watch_dir().join("feed/sessions.jsonl");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let (first, mut ids) = open_session_lines(ids_base(3), 4);
    rewrite_in_place(&path, &first);
    wait_delivered(&env, &agent, &ids, "the first lines");

    // Grown twice, each time after it settled and was read: the second growth takes the file
    // past the 1 KiB head, so its identity widens on the way.
    for round in 0..2u64 {
        wait_done(&env, &agent);
        let (more, more_ids) = open_session_lines(ids_base(3) + 100 * (round + 1), 5);
        append(&path, &more);
        wait_delivered(&env, &agent, &more_ids, "the appended lines");
        ids.extend(more_ids);
    }
    assert_no_new_deliveries(&env, &agent, "after the last append");
    assert_exactly_once(&env.server, &ids, &agent, "growing file");
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "duplicates_skipped"), 0, "{status}");
    assert_eq!(
        status_u64(&status, "events_read"),
        ids.len() as u64,
        "each line read once: {status}"
    );
    assert!(
        agent
            .logs()
            .contains("reading on from the committed offset"),
        "the file is read on, not from the start\nagent log tail:\n{}",
        agent.log_tail(30)
    );
}

#[test]
fn a_truncated_and_rewritten_file_is_read_as_new() {
    let env = new_env();
    let agent = env.start_agent();
    let path = env.watch_dir().join("feed/rotating.jsonl");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let (old, old_ids) = open_session_lines(ids_base(4), 8);
    rewrite_in_place(&path, &old);
    wait_delivered(&env, &agent, &old_ids, "the first content");

    wait_done(&env, &agent);
    // Shorter, and different from the first byte on.
    let (new, new_ids) = open_session_lines(ids_base(4) + 500, 3);
    rewrite_in_place(&path, &new);
    wait_delivered(&env, &agent, &new_ids, "the new content");
    assert!(
        agent
            .logs()
            .contains("file content changed; reading it as a new file"),
        "the log says the content changed\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    assert_no_new_deliveries(&env, &agent, "after the rewrite");
    let all: Vec<String> = old_ids.iter().chain(&new_ids).cloned().collect();
    assert_exactly_once(&env.server, &all, &agent, "truncated and rewritten file");
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "duplicates_skipped"), 0, "{status}");
}

#[test]
fn a_file_replaced_by_other_content_of_the_same_length_is_read_as_new() {
    let env = new_env();
    let agent = env.start_agent();
    let path = env.watch_dir().join("20261101/export-c-output-0");
    let (old, old_ids) = open_session_lines(ids_base(5), 6);
    let (new, new_ids) = open_session_lines(ids_base(5) + 600, 6);
    assert_eq!(old.len(), new.len(), "the replacement has the same length");
    write_atomically(&path, &old);
    wait_delivered(&env, &agent, &old_ids, "the first content");

    wait_done(&env, &agent);
    write_atomically(&path, &new);
    wait_delivered(&env, &agent, &new_ids, "the replacement");
    assert!(
        agent.logs().contains("file content changed"),
        "the log says the content changed\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    assert_no_new_deliveries(&env, &agent, "after the replacement");
    let all: Vec<String> = old_ids.iter().chain(&new_ids).cloned().collect();
    assert_exactly_once(&env.server, &all, &agent, "replaced file");
}

#[test]
fn a_file_written_slowly_in_place_is_read_exactly_once() {
    let env = new_env();
    let agent = env.start_agent();
    let (bytes, ids) = open_session_lines(ids_base(6), 12);
    // 14 chunks of uneven size: most end in the middle of a line, and the writer pauses 300 ms
    // (well under settle_secs = 1) between them.
    let n = bytes.len();
    let mut cuts: Vec<usize> = (1..14).map(|i| i * n / 14 + (i * 37) % 50).collect();
    cuts.push(n);
    let mut chunks = Vec::new();
    let mut from = 0;
    for cut in cuts {
        chunks.push(bytes[from..cut].to_vec());
        from = cut;
    }
    assert!(
        chunks.iter().filter(|c| c.last() != Some(&b'\n')).count() >= 10,
        "most chunks end mid-line"
    );
    write_slowly(
        &env.watch_dir().join("slow/download.jsonl"),
        &chunks,
        Duration::from_millis(300),
    );
    wait_delivered(&env, &agent, &ids, "the slowly written file");
    assert_no_new_deliveries(&env, &agent, "after the slow write");
    assert_exactly_once(&env.server, &ids, &agent, "slowly written file");
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "quarantined"), 0, "{status}");
    assert_eq!(status_u64(&status, "duplicates_skipped"), 0, "{status}");
    assert!(
        quarantine_list(&env.config_path).is_empty(),
        "no line was quarantined"
    );
}

#[test]
fn a_complete_last_line_without_a_newline_is_delivered() {
    let env = new_env();
    let agent = env.start_agent();
    let (mut bytes, mut ids) = open_session_lines(ids_base(7), 3);
    let last = ids_base(7) + 3;
    bytes.extend_from_slice(open_session_line(last).as_bytes());
    ids.push(crate::util::lp_id(last));
    write_atomically(&env.watch_dir().join("no-newline.jsonl"), &bytes);
    wait_delivered(&env, &agent, &ids, "a file whose last line has no newline");
    assert_no_new_deliveries(&env, &agent, "afterwards");
    assert_exactly_once(&env.server, &ids, &agent, "last line without newline");
    assert!(quarantine_list(&env.config_path).is_empty());
}

#[test]
fn a_broken_last_line_is_quarantined_once_the_file_settles() {
    let env = new_env();
    let agent = env.start_agent();
    let (mut bytes, ids) = open_session_lines(ids_base(8), 3);
    let broken = open_session_line(ids_base(8) + 3);
    bytes.extend_from_slice(&broken.as_bytes()[..broken.len() / 2]);
    let rel = "cut/broken-tail.jsonl";
    write_atomically(&env.watch_dir().join(rel), &bytes);
    wait_delivered(
        &env,
        &agent,
        &ids,
        "the complete lines before the broken one",
    );

    // The agent may hold an unfinished last line for a while (its writer may still finish
    // it); once the file has settled for good the line must land in the quarantine.
    let entry = wait_for_quarantine(&env, Duration::from_secs(25), |e| {
        e["file"] == rel && e["line"] == 4
    });
    assert!(
        entry.is_some(),
        "the broken last line is quarantined with its file and line: {:?}\nagent log tail:\n{}",
        quarantine_list(&env.config_path),
        agent.log_tail(30)
    );
    assert!(
        agent.logs().contains("bad records quarantined"),
        "the log says so"
    );
    assert_exactly_once(&env.server, &ids, &agent, "file with a broken last line");
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "quarantined"), 1, "{status}");
}

/// Polls the quarantine until an entry matches; that entry, or None on timeout.
fn wait_for_quarantine(
    env: &TestEnv,
    timeout: Duration,
    mut matches: impl FnMut(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let mut found = None;
    wait_until(timeout, || {
        found = quarantine_list(&env.config_path)
            .into_iter()
            .find(|e| matches(e));
        if found.is_none() {
            thread::sleep(Duration::from_millis(250));
        }
        found.is_some()
    });
    found
}

#[test]
fn a_gzipped_shard_is_delivered_once_and_not_again_after_a_restart() {
    let env = new_env();
    let mut agent = env.start_agent();
    let (plain, ids) = open_session_lines(ids_base(9), 40);
    write_atomically(
        &env.watch_dir().join("20261101/export-g-job-output-0"),
        &gzip_bytes(&plain),
    );
    wait_delivered(&env, &agent, &ids, "the gzipped shard");
    assert!(agent.logs().contains("gzip=true"), "read as gzip");
    assert_eq!(agent.stop().and_then(|s| s.code()), Some(0), "clean stop");

    let agent = Agent::start(&env.config_path);
    assert!(
        wait_until(PATIENCE, || ready_lines(&agent.logs()) >= 2),
        "the agent comes back\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    assert_no_new_deliveries(&env, &agent, "after the restart");
    assert_exactly_once(&env.server, &ids, &agent, "gzipped shard across a restart");
    let status = status_json(&env.config_path);
    assert_eq!(
        status_u64(&status, "events_read"),
        0,
        "nothing read again: {status}"
    );
    assert_eq!(status_u64(&status, "duplicates_skipped"), 0, "{status}");
}

const JOB_DIR: &str = "20261101";

fn shard(env: &TestEnv, n: u32) -> std::path::PathBuf {
    env.watch_dir()
        .join(format!("{JOB_DIR}/export-1-job-output-{n}"))
}

const MANIFEST: &str = r#"{"jobId":"job","files":["20261101/export-1-job-output-0","20261101/export-1-job-output-1"]}"#;

#[test]
fn with_require_manifest_shards_wait_for_the_manifest_that_lists_them() {
    let mut env = new_env();
    env.config.require_manifest = Some(true);
    let agent = env.start_agent();
    let (s0, ids0) = open_session_lines(ids_base(10), 5);
    let (s1, ids1) = open_session_lines(ids_base(10) + 100, 5);
    let (s2, ids2) = open_session_lines(ids_base(10) + 200, 5);
    write_atomically(&shard(&env, 0), &s0);
    write_atomically(&shard(&env, 1), &s1);
    // Written in place, so it also has to settle.
    let p2 = shard(&env, 2);
    rewrite_in_place(&p2, &s2);

    // At least three times settle_secs without a manifest: nothing goes out.
    thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        env.server.requests().len(),
        0,
        "no shard is read before its manifest\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    assert_eq!(
        status_u64(&status_json(&env.config_path), "events_read"),
        0,
        "not even read"
    );

    write_atomically(
        &env.watch_dir()
            .join(format!("{JOB_DIR}/export-1-job-output-manifest")),
        MANIFEST.as_bytes(),
    );
    let listed: Vec<String> = ids0.iter().chain(&ids1).cloned().collect();
    wait_delivered(&env, &agent, &listed, "the shards the manifest lists");
    assert!(
        agent.logs().contains("job manifest read"),
        "the manifest is logged"
    );
    assert_no_new_deliveries(&env, &agent, "after the manifest");
    let report = DeliveryReport::of(&env.server, &listed);
    assert!(
        report.is_exactly_once(),
        "only the listed shards, once each: {}; the unlisted shard's ids {:?} must not appear",
        report.summary(),
        &ids2[..2]
    );
    let accepted: HashSet<String> = env.server.accepted_message_ids().into_iter().collect();
    assert!(
        ids2.iter().all(|id| !accepted.contains(id)),
        "a shard the manifest does not list stays undelivered"
    );
    assert!(
        quarantine_list(&env.config_path).is_empty(),
        "the manifest is not data"
    );
}

#[test]
fn without_require_manifest_shards_go_out_as_soon_as_they_settle() {
    let env = new_env();
    let agent = env.start_agent();
    let (s0, ids0) = open_session_lines(ids_base(11), 5);
    let (s1, ids1) = open_session_lines(ids_base(11) + 100, 5);
    write_atomically(&shard(&env, 0), &s0);
    rewrite_in_place(&shard(&env, 1), &s1);
    let all: Vec<String> = ids0.iter().chain(&ids1).cloned().collect();
    let started = Instant::now();
    wait_delivered(&env, &agent, &all, "shards without a manifest");
    eprintln!(
        "delivered {:?} after the shards were written",
        started.elapsed()
    );
    // A manifest arriving afterwards changes nothing and is not read as data.
    write_atomically(
        &env.watch_dir()
            .join(format!("{JOB_DIR}/export-1-job-output-manifest")),
        MANIFEST.as_bytes(),
    );
    assert_no_new_deliveries(&env, &agent, "after the manifest");
    assert_exactly_once(&env.server, &all, &agent, "shards without manifest");
    assert!(
        quarantine_list(&env.config_path).is_empty(),
        "the manifest is not data"
    );
}

#[test]
fn after_ingest_delete_removes_the_file_only_after_segment_accepted_its_events() {
    let mut env = new_env();
    env.config.after_ingest = Some("delete".into());
    env.server.set_default(Reply::status(503));
    let agent = env.start_agent();
    let (bytes, ids) = open_session_lines(ids_base(12), 5);
    let path = env.watch_dir().join("deliver-then-delete.jsonl");
    write_atomically(&path, &bytes);

    assert!(
        env.server.wait_for_requests(2, PATIENCE),
        "the agent tries (and gets 503)\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    // Several seconds of 503s: the file must stay.
    let outage_end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < outage_end {
        assert!(
            path.exists(),
            "file deleted before any event was accepted\nagent log tail:\n{}",
            agent.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(env.server.accepted_count(), 0);

    env.server.set_default(Reply::ok());
    let gone = wait_until(PATIENCE, || !path.exists());
    let gone_at = Instant::now();
    assert!(
        gone,
        "the file is deleted once delivered\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    let accepts: Vec<_> = env
        .server
        .accepted_requests()
        .into_iter()
        .filter(|r| r.message_ids().iter().any(|id| ids.contains(id)))
        .collect();
    let last_accept = accepts
        .iter()
        .map(|r| r.answered_at.unwrap_or(r.received_at))
        .max()
        .expect("an accepted request carried the file's events");
    assert!(
        last_accept <= gone_at,
        "the accept must come before the deletion ({:?} after it was seen gone)",
        last_accept - gone_at
    );
    // The file went after its events were sent: `gone_at` (when the test saw it gone) is
    // after the deletion. (No slack against the test's polling: that breaks under load.)
    assert!(
        accepts.iter().all(|r| r.received_at <= gone_at),
        "the file was still there when its events were sent"
    );
    assert_exactly_once(&env.server, &ids, &agent, "delete after delivery");
    assert!(agent.logs().contains("removed from the watch directory"));
}

#[test]
fn after_ingest_move_puts_the_file_under_move_to_with_its_relative_path() {
    let mut env = new_env();
    let done = env.root().join("done");
    env.config.after_ingest = Some("move".into());
    env.config.move_to = Some(done.clone());
    let agent = env.start_agent();
    let (bytes, ids) = open_session_lines(ids_base(13), 5);
    let rel = "20261101/sub/export-m-job-output-0";
    write_atomically(&env.watch_dir().join(rel), &bytes);
    wait_delivered(&env, &agent, &ids, "the file to move");
    let moved = done.join(rel);
    assert!(
        wait_until(PATIENCE, || moved.exists()),
        "the file ends up under move_to with its relative path\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    assert!(
        !env.watch_dir().join(rel).exists(),
        "and leaves the watch dir"
    );
    assert_eq!(fs::read(&moved).unwrap(), bytes, "unchanged");
    assert_no_new_deliveries(&env, &agent, "after the move");
    assert_exactly_once(&env.server, &ids, &agent, "move after delivery");
}

#[test]
fn shared_lines_in_two_different_files_are_delivered_once_and_counted_as_duplicates() {
    let env = new_env();
    let agent = env.start_agent();
    let (a, shared_ids) = open_session_lines(ids_base(14), 6);
    write_atomically(&env.watch_dir().join("export-day1.jsonl"), &a);
    wait_delivered(&env, &agent, &shared_ids, "the first file");

    // A re-export: one new session first, then the same sessions again.
    let extra = ids_base(14) + 900;
    let mut b = format!("{}\n", open_session_line(extra)).into_bytes();
    b.extend_from_slice(&a);
    write_atomically(&env.watch_dir().join("export-day1-reexport.jsonl"), &b);
    let extra_id = vec![crate::util::lp_id(extra)];
    wait_delivered(&env, &agent, &extra_id, "the new session of the re-export");
    assert_no_new_deliveries(&env, &agent, "after the re-export");
    let all: Vec<String> = shared_ids.iter().chain(&extra_id).cloned().collect();
    assert_exactly_once(&env.server, &all, &agent, "shared lines");
    let status = status_json(&env.config_path);
    assert_eq!(
        status_u64(&status, "duplicates_skipped"),
        shared_ids.len() as u64,
        "the shared events are counted as duplicates: {status}"
    );
}

#[test]
fn a_clean_restart_with_everything_read_delivers_nothing_again() {
    let env = new_env();
    let mut agent = env.start_agent();
    let mut ids = Vec::new();
    for f in 0..3u64 {
        let (bytes, more) = open_session_lines(ids_base(15) + f * 100, 5);
        write_atomically(&env.watch_dir().join(format!("day/f-{f}.jsonl")), &bytes);
        ids.extend(more);
    }
    // One plain file written in place too (identified by head and tail, not by rename).
    let (bytes, more) = open_session_lines(ids_base(15) + 900, 5);
    rewrite_in_place(&env.watch_dir().join("in-place.jsonl"), &bytes);
    ids.extend(more);
    wait_delivered(&env, &agent, &ids, "before the restart");
    assert_eq!(agent.stop().and_then(|s| s.code()), Some(0), "clean stop");

    let agent = Agent::start(&env.config_path);
    assert!(wait_until(PATIENCE, || ready_lines(&agent.logs()) >= 2));
    assert_no_new_deliveries(&env, &agent, "after the restart");
    assert_exactly_once(&env.server, &ids, &agent, "clean restart");
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "events_read"), 0, "{status}");
    assert_eq!(status_u64(&status, "duplicates_skipped"), 0, "{status}");
}

#[test]
fn kill_9_in_the_middle_of_a_file_loses_nothing() {
    let mut env = new_env();
    env.config.max_batch_events = Some(200);
    let mut agent = env.start_agent();
    // Slow answers keep batches in flight, so the kill lands mid-delivery if not mid-read.
    env.server.set_delay(Duration::from_millis(150));
    let (bytes, ids) = open_session_lines(ids_base(16), 12_000);
    write_atomically(&env.watch_dir().join("big/export-k-job-output-0"), &bytes);
    assert!(
        env.server.wait_for_requests(1, PATIENCE),
        "delivery starts\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    agent.kill();
    let delivered_before = env.server.accepted_count();
    assert!(
        delivered_before < ids.len(),
        "the kill came before everything was delivered ({delivered_before})"
    );
    env.server.set_delay(Duration::ZERO);

    let agent = Agent::start(&env.config_path);
    wait_delivered(&env, &agent, &ids, "after kill -9 and restart");
    let report = DeliveryReport::of(&env.server, &ids);
    assert!(
        report.is_complete(),
        "everything delivered at least once, nothing else: {}",
        report.summary()
    );
    eprintln!(
        "kill -9 mid-file: {delivered_before} accepted before the kill, {} re-deliveries",
        report.extra_deliveries
    );
}

#[test]
fn a_copy_stays_recognised_after_the_original_grows() {
    let env = new_env();
    let mut agent = env.start_agent();
    let original = env.watch_dir().join("feed/day.jsonl");
    fs::create_dir_all(original.parent().unwrap()).unwrap();
    let (first, mut ids) = open_session_lines(ids_base(17), 5);
    rewrite_in_place(&original, &first);
    wait_delivered(&env, &agent, &ids, "the original");
    // A re-sync copy of it, recognised as read.
    let copy = env.watch_dir().join("mirror/day.jsonl");
    write_atomically(&copy, &first);
    assert!(
        agent.wait_for_log("same content as a file already read", PATIENCE),
        "the copy is recognised\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    // The original grows (its writer appends); the copy stays as it was.
    wait_done(&env, &agent);
    let (more, more_ids) = open_session_lines(ids_base(17) + 100, 3);
    append(&original, &more);
    wait_delivered(&env, &agent, &more_ids, "the appended lines");
    ids.extend(more_ids);
    assert_no_new_deliveries(&env, &agent, "after the append");
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "duplicates_skipped"), 0, "{status}");

    // A restart offers every file again: the copy holds nothing that was not read.
    assert_eq!(agent.stop().and_then(|s| s.code()), Some(0), "clean stop");
    let agent = Agent::start(&env.config_path);
    assert!(wait_until(PATIENCE, || ready_lines(&agent.logs()) >= 2));
    assert_no_new_deliveries(&env, &agent, "after the restart");
    let status = status_json(&env.config_path);
    assert_eq!(
        (
            status_u64(&status, "events_read"),
            status_u64(&status, "duplicates_skipped")
        ),
        (0, 0),
        "the unchanged copy is not read again after the restart: {status}\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    assert_exactly_once(&env.server, &ids, &agent, "copy of a grown file");
}

/// CPU time (user + system) the process has used so far, from `/proc/<pid>/stat` (in USER_HZ
/// ticks, 100 per second on Linux).
fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[test]
fn an_idle_agent_with_subdirectories_stays_idle() {
    let env = new_env();
    // The layout of a Leanplum export sync: a directory per day, files read long ago.
    let (bytes, ids) = open_session_lines(ids_base(18), 3);
    write_atomically(
        &env.watch_dir().join("20261101/export-i-job-output-0"),
        &bytes,
    );
    fs::create_dir_all(env.watch_dir().join("20261102/empty")).unwrap();
    let agent = env.start_agent();
    wait_delivered(&env, &agent, &ids, "the one file");
    wait_done(&env, &agent);

    // Nothing changes in the watch dir now: the agent has nothing to do but its 1 s rescan.
    let window = Duration::from_secs(4);
    let before = cpu_time(agent.pid());
    thread::sleep(window);
    let used = cpu_time(agent.pid()) - before;
    assert!(
        used < window / 5,
        "an idle agent used {used:?} of CPU in {window:?}; the watcher is spinning?\n{} \
         'inotify queue overflowed' lines in the log; agent log tail:\n{}",
        count_log_lines(&agent.logs(), "inotify queue overflowed"),
        agent.log_tail(20)
    );
}

/// A file deleted while its unfinished last line is held is no longer "in progress": status
/// counts it failed, and what was complete in it was delivered.
#[test]
fn a_file_deleted_while_its_last_line_is_held_leaves_progress() {
    let env = new_env();
    let agent = env.start_agent();
    let (mut bytes, ids) = open_session_lines(ids_base(8) + 100, 2);
    let broken = open_session_line(ids_base(8) + 102);
    bytes.extend_from_slice(&broken.as_bytes()[..broken.len() / 2]);
    let path = env.watch_dir().join("held.jsonl");
    write_atomically(&path, &bytes);
    wait_delivered(&env, &agent, &ids, "the complete lines before the held one");
    assert!(
        wait_until(PATIENCE, || agent
            .logs()
            .contains("holding it until it is complete")),
        "the last line is held\n{}",
        agent.log_tail(20)
    );
    std::fs::remove_file(&path).expect("delete the file");
    let settled = wait_for_status(&env.config_path, PATIENCE, |s| {
        status_u64(s, "files_in_progress") == 0 && status_u64(s, "files_failed") == 1
    });
    assert!(
        settled.is_some(),
        "the vanished file leaves progress: {}\n{}",
        status_json(&env.config_path),
        agent.log_tail(20)
    );
    assert!(
        agent
            .logs()
            .contains("file vanished before it was read to the end")
    );
}

/// Files the `exclude` globs match (a sync tool's `.partial`) are never read, even once they
/// settle; the rest of the directory is.
#[test]
fn excluded_files_are_never_read() {
    let env = new_env();
    let agent = env.start_agent();
    let (partial, partial_ids) = open_session_lines(ids_base(8) + 200, 3);
    fs::write(env.watch_dir().join("in-transit.partial"), &partial).expect("write .partial");
    let (good, ids) = open_session_lines(ids_base(8) + 210, 2);
    write_atomically(&env.watch_dir().join("landed.jsonl"), &good);
    wait_delivered(&env, &agent, &ids, "the file the globs include");
    // Well past settle_secs and a rescan: the .partial file stays unread.
    thread::sleep(Duration::from_secs(3));
    let accepted: HashSet<String> = env.server.accepted_message_ids().into_iter().collect();
    for id in &partial_ids {
        assert!(!accepted.contains(id), "{id} came from an excluded file");
    }
    assert!(
        !agent.logs().contains("in-transit.partial"),
        "{}",
        agent.log_tail(20)
    );
}

/// A copy of a copy that grew: two known files share its first bytes, and the one read
/// furthest (the grown copy) is the match, so nothing is read again (found by the model test,
/// seed 5087048231753532487).
#[test]
fn a_copy_of_a_grown_copy_is_matched_to_the_furthest_read_file() {
    let env = new_env();
    let agent = env.start_agent();
    // Over 1 KiB, so both known files are identified by the same first KiB.
    let (first, mut ids) = open_session_lines(ids_base(17) + 500, 8);
    assert!(first.len() > 1024);
    write_atomically(&env.watch_dir().join("f-001"), &first);
    wait_delivered(&env, &agent, &ids, "the original");
    let second = env.watch_dir().join("c-002");
    write_atomically(&second, &first);
    assert!(
        agent.wait_for_log("(a copy)", PATIENCE),
        "{}",
        agent.log_tail(20)
    );
    wait_done(&env, &agent);
    let (more, more_ids) = open_session_lines(ids_base(17) + 600, 1);
    append(&second, &more);
    wait_delivered(&env, &agent, &more_ids, "the line appended to the copy");
    ids.extend(more_ids);
    let before = status_json(&env.config_path);
    let grown = fs::read(&second).expect("read c-002");
    write_atomically(&env.watch_dir().join("c-003"), &grown);
    assert!(
        wait_until(PATIENCE, || count_log_lines(&agent.logs(), "(a copy)") >= 2),
        "{}",
        agent.log_tail(20)
    );
    assert_no_new_deliveries(&env, &agent, "after the second copy");
    let after = status_json(&env.config_path);
    assert_eq!(
        (
            status_u64(&after, "events_read"),
            status_u64(&after, "duplicates_skipped")
        ),
        (status_u64(&before, "events_read"), 0),
        "the copy of the grown copy is not read: {after}\n{}",
        agent.log_tail(20)
    );
    assert_exactly_once(&env.server, &ids, &agent, "copy of a grown copy");
}

/// Sessions bigger than a megabyte (issue 16): one line of an active user's session, 5 MB of
/// app events with parameters and 60 engagements of catalog messages, plain and gzipped, is
/// read whole under the default `watch.max_line_bytes` (64 MiB), and every engagement reaches
/// Segment exactly once. Under the old 1 MiB cap the whole line was quarantined and none did.
#[test]
fn a_session_of_megabytes_delivers_every_engagement_exactly_once() {
    let env = new_env();
    let agent = env.start_agent();
    let (plain, mut ids) = long_session_line(ids_base(19), 40_000, 60);
    let (zipped, zipped_ids) = long_session_line(ids_base(20), 40_000, 60);
    assert!(plain.len() > 5_000_000, "{} bytes", plain.len());
    assert_eq!((ids.len(), zipped_ids.len()), (60, 60));
    let with_newline = |line: Vec<u8>| [line, b"\n".to_vec()].concat();
    write_atomically(
        &env.watch_dir().join("long/session-plain.jsonl"),
        &with_newline(plain),
    );
    write_atomically(
        &env.watch_dir().join("long/session-gzip"),
        &gzip_bytes(&with_newline(zipped)),
    );
    ids.extend(zipped_ids);
    wait_delivered(&env, &agent, &ids, "the engagements of two long sessions");
    // Both files read to their end and the spool empty: nothing is left to send again.
    let settled = wait_for_status(&env.config_path, PATIENCE, |s| {
        status_u64(s, "files_in_progress") == 0 && status_u64(s, "spool_events") == 0
    });
    assert!(
        settled.is_some(),
        "the files are read and the spool drained
{}",
        agent.log_tail(20)
    );
    assert!(env.server.wait_for_quiet(Duration::from_secs(1), PATIENCE));
    assert_exactly_once(&env.server, &ids, &agent, "sessions of megabytes");
    let status = status_json(&env.config_path);
    assert_eq!(
        (
            status_u64(&status, "events_spooled"),
            status_u64(&status, "quarantined")
        ),
        (120, 0),
        "{status}"
    );
    assert!(quarantine_list(&env.config_path).is_empty());
}

/// Writes `growing.jsonl`: three complete one-event lines (eventIds from `first`) and half of a
/// fourth, no newline; waits until the three are delivered and the log says the last line is
/// held. Returns the file, the ids of all four lines, and the bytes that finish the fourth.
fn write_with_a_cut_last_line(
    env: &TestEnv,
    agent: &Agent,
    first: u64,
) -> (std::path::PathBuf, Vec<String>, Vec<u8>) {
    let (mut bytes, mut ids) = open_session_lines(first, 3);
    let last = open_session_line(first + 3);
    let (head, tail) = last.as_bytes().split_at(last.len() / 2);
    bytes.extend_from_slice(head);
    let path = env.watch_dir().join("growing.jsonl");
    fs::write(&path, &bytes).expect("write the file with its last line cut");
    wait_delivered(env, agent, &ids, "the complete lines before the cut");
    assert!(
        agent.wait_for_log("holding it until it is complete", PATIENCE),
        "the last line is held\n{}",
        agent.log_tail(20)
    );
    ids.push(crate::util::lp_id(first + 3));
    let mut rest = tail.to_vec();
    rest.push(b'\n');
    (path, ids, rest)
}

/// Every line of the file delivered once, nothing quarantined.
fn assert_finished_line_delivered_once(env: &TestEnv, agent: &Agent, ids: &[String], what: &str) {
    wait_delivered(env, agent, ids, what);
    env.server
        .wait_for_quiet(Duration::from_millis(1500), PATIENCE);
    assert_exactly_once(&env.server, ids, agent, what);
    assert!(
        quarantine_list(&env.config_path).is_empty(),
        "{what}: nothing quarantined: {:?}",
        quarantine_list(&env.config_path)
    );
}

/// A file whose last line has no newline yet: the complete lines are delivered, the last one
/// is held (the log says so), and once its writer finishes it, within the hold, it is
/// delivered once and nothing goes to the quarantine.
#[test]
fn a_partial_last_line_finished_within_the_hold_is_delivered_once() {
    let env = new_env();
    let agent = env.start_agent();
    let (path, ids, rest) = write_with_a_cut_last_line(&env, &agent, ids_base(21));
    append(&path, &rest);
    assert_finished_line_delivered_once(&env, &agent, &ids, "a last line finished in the hold");
}

/// The same across a restart: the agent holding the cut line is stopped (SIGTERM), the writer
/// finishes the line, the agent starts again and delivers that line once, and the lines it
/// had delivered not again.
#[test]
fn a_partial_last_line_held_across_a_sigterm_is_delivered_once_when_finished() {
    let env = new_env();
    let mut agent = env.start_agent();
    let (path, ids, rest) = write_with_a_cut_last_line(&env, &agent, ids_base(22));
    let exit = agent.stop();
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "SIGTERM exits 0\n{}",
        agent.log_tail(20)
    );
    append(&path, &rest);
    let agent = env.start_agent();
    assert_finished_line_delivered_once(
        &env,
        &agent,
        &ids,
        "a held line finished across a restart",
    );
}
