//! Big files parsed on several threads (`watch.ingest_threads`, here more threads than cores)
//! and committed in file order: the spool holds every good event once, in file order; bad lines
//! are quarantined with their exact line numbers; damage keeps exactly what came before it; a
//! `kill -9` while parsed batches wait for their commit loses and repeats nothing (the spool's
//! crash story, `src/ingest/parallel.rs`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use leanplum_segment_agent::spool::Spool;

use crate::util::{
    Agent, PATIENCE, Reply, TestEnv, assert_exactly_once, count_log_lines, gzip_bytes, lp_id,
    new_env, open_session_line, quarantine_list, status_json, status_u64, wait_delivered,
    wait_for_status, write_atomically,
};

/// eventIds of this module: `BASE + test * 1_000_000 + i`.
const BASE: u64 = 8_400_000_000_000_000_000;

fn ids_base(test: u64) -> u64 {
    BASE + test * 1_000_000
}

/// More parse threads than the machine's cores, so batches finish out of order.
const THREADS: &str = "ingest_threads = 4";

/// A session export of many one-event lines, with bad lines, blank lines and CRLF endings
/// spread through it.
struct BigFile {
    bytes: Vec<u8>,
    /// The messageIds of the good lines, in file order.
    ids: Vec<String>,
    /// The 1-based line number of each good line, in the same order.
    id_lines: Vec<u64>,
    /// The 1-based line number of each bad line, in file order.
    bad_lines: Vec<u64>,
}

/// `lines` records from eventId `first` on: every 997th (from the 500th) is bad, in turn
/// malformed JSON, not an object, invalid UTF-8 and an eventId that is not an integer; a blank
/// line (or one of spaces) follows every 301st record; every 7th record ends in CRLF.
fn big_file(first: u64, lines: usize) -> BigFile {
    let mut file = BigFile {
        bytes: Vec::new(),
        ids: Vec::new(),
        id_lines: Vec::new(),
        bad_lines: Vec::new(),
    };
    let mut line = 1u64;
    for i in 0..lines as u64 {
        if i % 997 == 500 {
            let bad: Vec<u8> = match (i / 997) % 4 {
                0 => b"{\"sessionId\": }".to_vec(),
                1 => b"[1,2,3]".to_vec(),
                2 => b"{\"sessionId\":\"\xff\xfe\"}".to_vec(),
                _ => format!(
                    r#"{{"deviceId":"D","time":1,"states":[{{"events":[{{"eventId":{}.5,"name":"x","time":1}}]}}]}}"#,
                    first + i
                )
                .into_bytes(),
            };
            file.bytes.extend_from_slice(&bad);
            file.bad_lines.push(line);
        } else {
            file.bytes
                .extend_from_slice(open_session_line(first + i).as_bytes());
            file.ids.push(lp_id(first + i));
            file.id_lines.push(line);
        }
        if i % 7 == 3 {
            file.bytes.push(b'\r');
        }
        file.bytes.push(b'\n');
        line += 1;
        if i % 301 == 150 {
            file.bytes
                .extend_from_slice(if i % 2 == 0 { b"\n" } else { b"   \n" });
            line += 1;
        }
    }
    file
}

/// The events of a stopped agent's spool, in queue order: (file id, messageId).
fn spooled(spool_dir: &Path) -> Vec<(u64, String)> {
    let spool = Spool::open(spool_dir, 8 << 20)
        .unwrap_or_else(|e| panic!("open the spool {}: {e}", spool_dir.display()));
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let peeked = spool
            .queue()
            .peek(after, 10_000, usize::MAX)
            .expect("peek the spool");
        let Some(last) = peeked.items.last() else {
            return out;
        };
        after = Some(last.key);
        for q in &peeked.items {
            let event: serde_json::Value = serde_json::from_slice(&q.json).expect("event JSON");
            let id = event["messageId"].as_str().expect("a messageId").to_owned();
            out.push((q.file_id, id));
        }
    }
}

/// The quarantine entries' line numbers by file name (the last path component).
fn quarantined_lines(env: &TestEnv) -> BTreeMap<String, Vec<u64>> {
    let mut lines: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in quarantine_list(&env.config_path) {
        let file = e["file"].as_str().expect("a file").rsplit('/').next();
        lines
            .entry(file.unwrap_or_default().to_owned())
            .or_default()
            .push(e["line"].as_u64().expect("a line"));
    }
    for l in lines.values_mut() {
        l.sort_unstable();
    }
    lines
}

/// What a gzip stream cut at `cut` of `gz` still gives: its complete lines.
fn decodable_lines(gz: &[u8], cut: usize) -> Vec<u8> {
    let mut decoder = flate2::read::MultiGzDecoder::new(&gz[..cut]);
    let mut out = Vec::new();
    let mut buf = [0u8; 1 << 16];
    loop {
        match decoder.read(&mut buf) {
            Ok(0) => panic!("a cut gzip stream ends in an error"),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let complete = out.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    out.truncate(complete);
    out
}

#[test]
fn bad_lines_through_big_files_keep_their_line_numbers_and_the_events_their_file_order() {
    let mut env = new_env();
    env.config = env.config.clone().with_extra("watch", THREADS);
    // Segment down: every event stays in the spool, to be read back in queue order.
    env.server.set_default(Reply::status(503));
    let plain = big_file(ids_base(1), 24_000);
    let gzipped = big_file(ids_base(1) + 100_000, 24_000);
    let cut = big_file(ids_base(1) + 200_000, 24_000);
    let cut_gz = gzip_bytes(&cut.bytes);
    let cut_at = cut_gz.len() * 3 / 5;
    // What the cut file still holds: its complete lines before the cut; the damage is reported
    // on the line after the last record read.
    let readable = decodable_lines(&cut_gz, cut_at);
    let readable_lines = readable.iter().filter(|b| **b == b'\n').count() as u64;
    let last_record = readable
        .split(|b| *b == b'\n')
        .enumerate()
        .take(readable_lines as usize)
        .filter(|(_, l)| !l.trim_ascii().is_empty())
        .map(|(i, _)| i as u64 + 1)
        .last()
        .expect("records before the cut");
    let cut_ids: Vec<String> = cut
        .ids
        .iter()
        .zip(&cut.id_lines)
        .take_while(|(_, line)| **line <= readable_lines)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(cut_ids.len() > 5000 && cut_ids.len() < cut.ids.len());
    let mut cut_bad: Vec<u64> = cut
        .bad_lines
        .iter()
        .copied()
        .filter(|l| *l <= last_record)
        .collect();
    cut_bad.push(last_record + 1);

    let mut agent = env.start_agent();
    let dir = env.watch_dir().join("20261201");
    write_atomically(&dir.join("export-par-output-0"), &plain.bytes);
    write_atomically(
        &dir.join("export-par-output-1"),
        &gzip_bytes(&gzipped.bytes),
    );
    write_atomically(&dir.join("export-par-output-2"), &cut_gz[..cut_at]);
    let expected = plain.ids.len() + gzipped.ids.len() + cut_ids.len();
    wait_for_status(&env.config_path, PATIENCE * 2, |s| {
        s["files_done"] == 2 && s["files_failed"] == 1
    })
    .unwrap_or_else(|| panic!("files read\nagent log tail:\n{}", agent.log_tail(40)));
    assert!(agent.stop().is_some_and(|s| s.success()), "SIGTERM exits 0");
    // Stopped: the counts are the spool's own.
    let status = status_json(&env.config_path);
    assert_eq!(
        status_u64(&status, "spool_events"),
        expected as u64,
        "{status}"
    );

    // Every good event once, and each file's events in the order of its lines.
    let mut by_file: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (file, id) in spooled(&env.config.spool_dir) {
        by_file.entry(file).or_default().push(id);
    }
    let mut files: Vec<Vec<String>> = by_file.into_values().collect();
    files.sort_by_key(|ids| ids.first().cloned());
    assert_eq!(files.len(), 3);
    for (got, want, what) in [
        (&files[0], &plain.ids, "plain"),
        (&files[1], &gzipped.ids, "gzipped"),
        (&files[2], &cut_ids, "cut gzip"),
    ] {
        assert_eq!(got.len(), want.len(), "{what}: events spooled");
        if let Some(i) = (0..got.len()).find(|i| got[*i] != want[*i]) {
            panic!(
                "{what}: event {i} is {} where {} was expected",
                got[i], want[i]
            );
        }
    }
    // Each bad line once, at its line.
    let lines = quarantined_lines(&env);
    assert_eq!(lines["export-par-output-0"], plain.bad_lines);
    assert_eq!(lines["export-par-output-1"], gzipped.bad_lines);
    assert_eq!(lines["export-par-output-2"], cut_bad);
    let quarantined = plain.bad_lines.len() + gzipped.bad_lines.len() + cut_bad.len();
    assert_eq!(
        status_u64(&status, "quarantined"),
        quarantined as u64,
        "{status}"
    );
    let damage = quarantine_list(&env.config_path)
        .into_iter()
        .find(|e| e["line"] == last_record + 1 && e["file"].as_str().unwrap().ends_with("-2"))
        .expect("the damage entry");
    assert!(
        damage["reason"].as_str().unwrap().contains("truncated"),
        "{damage}"
    );
}

#[test]
fn kill_9_while_parsed_batches_wait_for_their_commit_delivers_every_event_once() {
    let mut env = new_env();
    env.config = env.config.clone().with_extra("watch", THREADS);
    // Room for a couple of chunks only: reading pauses mid-file with batches parsed ahead.
    env.config.spool_max_bytes = Some(2 << 20);
    env.server.set_default(Reply::status(503));
    let file = big_file(ids_base(2), 30_000);
    let mut agent = env.start_agent();
    write_atomically(
        &env.watch_dir().join("big/export-kill-output-0"),
        &file.bytes,
    );
    const PAUSED: &str = "spool full (spool.max_bytes); reading paused";
    for (kill, room) in [(1, 6 << 20), (2, 0)] {
        assert!(
            wait_until_logged(&agent, PAUSED, kill),
            "kill {kill}: reading pauses mid-file\nagent log tail:\n{}",
            agent.log_tail(30)
        );
        agent.kill();
        // More room (then all of it) for the next agent, on the same spool.
        env.config.spool_max_bytes = (room > 0).then_some(room);
        if room == 0 {
            env.server.set_default(Reply::ok());
        }
        agent = env.start_agent();
    }
    wait_delivered(&env, &agent, &file.ids, "after two kills -9 mid-file");
    env.server
        .wait_for_quiet(std::time::Duration::from_secs(1), PATIENCE);
    assert_exactly_once(
        &env.server,
        &file.ids,
        &agent,
        "after two kills -9 mid-file",
    );
    let status = wait_for_status(&env.config_path, PATIENCE, |s| s["files_done"] == 1)
        .unwrap_or_else(|| panic!("the file is done\n{}", agent.log_tail(30)));
    assert_eq!(status_u64(&status, "duplicates_skipped"), 0, "{status}");
    let lines = quarantined_lines(&env);
    assert_eq!(lines["export-kill-output-0"], file.bad_lines);
}

/// Waits until `needle` was logged at least `times` times (the agents of a test share a log).
fn wait_until_logged(agent: &Agent, needle: &str, times: usize) -> bool {
    crate::util::wait_until(PATIENCE, || count_log_lines(&agent.logs(), needle) >= times)
}
