//! Bad input (SPEC section 8): one test per kind of damage. Each checks that the daemon stays
//! up, that the good records beside the bad one reach Segment, and that the damage is counted
//! (`quarantined` in `status --json`) and visible with its file and line in
//! `dead-letter list --json`. Plus the watch dir's own troubles (symlinks out of it, a
//! directory that comes and goes, the watch dir missing at start) and `dead-letter purge` /
//! `retry` on quarantined lines.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::util::{
    Agent, DeliveryReport, NOTHING_HAPPENS, PATIENCE, TestEnv, assert_exactly_once,
    count_log_lines, dead_letter_cmd, dead_letter_list, gzip_bytes, lp_id, new_env,
    open_session_line, open_session_lines, quarantine_list, run_command, running_as_root,
    status_json, status_u64, thousands, wait_delivered, wait_for_status, wait_until,
    write_atomically,
};

/// eventIds of this module: `BASE + test * 1_000_000 + i`.
const BASE: u64 = 8_200_000_000_000_000_000;

fn ids_base(test: u64) -> u64 {
    BASE + test * 1_000_000
}

/// Waits for a quarantine entry for `file` at `line` (None: a whole-file entry, line null) and
/// returns it, failing with the list and the log tail if it does not come.
fn expect_quarantine_entry(env: &TestEnv, agent: &Agent, file: &str, line: Option<u64>) -> Value {
    let mut found = None;
    let ok = wait_until(PATIENCE, || {
        found = quarantine_list(&env.config_path).into_iter().find(|e| {
            e["file"] == file
                && match line {
                    Some(l) => e["line"] == l,
                    None => e["line"].is_null() || e["line"] == 0,
                }
        });
        if found.is_none() {
            thread::sleep(Duration::from_millis(200));
        }
        found.is_some()
    });
    assert!(
        ok,
        "no quarantine entry for {file} line {line:?}: {:#?}\nagent log tail:\n{}",
        quarantine_list(&env.config_path),
        agent.log_tail(40)
    );
    found.unwrap()
}

/// The checks every kind shares: still running, the good ids delivered exactly once, exactly
/// `quarantined` bad records counted, and one quarantine entry per bad record in the list.
fn assert_survived(
    env: &TestEnv,
    agent: &mut Agent,
    good: &[String],
    quarantined: u64,
    what: &str,
) {
    wait_delivered(env, agent, good, what);
    // Anything sent twice would come within a quiet spell.
    env.server
        .wait_for_quiet(Duration::from_millis(1500), PATIENCE);
    assert!(
        agent.is_running(),
        "{what}: the daemon died\nagent log tail:\n{}",
        agent.log_tail(40)
    );
    assert_exactly_once(&env.server, good, agent, what);
    let status = status_json(&env.config_path);
    assert_eq!(
        status_u64(&status, "quarantined"),
        quarantined,
        "{what}: quarantined counter: {status}"
    );
    let entries = quarantine_list(&env.config_path);
    assert_eq!(
        entries.len() as u64,
        quarantined,
        "{what}: quarantine entries: {entries:#?}"
    );
}

/// Good lines around one bad line (at 1-based line `bad_line`): the file's bytes and the good
/// lines' messageIds.
fn file_with_bad_line(
    first_id: u64,
    good_lines: usize,
    bad_line: usize,
    bad: &[u8],
) -> (Vec<u8>, Vec<String>) {
    let mut bytes = Vec::new();
    let mut ids = Vec::new();
    let mut id = first_id;
    for line in 1..=good_lines + 1 {
        if line == bad_line {
            bytes.extend_from_slice(bad);
        } else {
            bytes.extend_from_slice(open_session_line(id).as_bytes());
            ids.push(lp_id(id));
            id += 1;
        }
        bytes.push(b'\n');
    }
    (bytes, ids)
}

#[test]
fn a_malformed_json_line_is_quarantined_and_its_neighbours_delivered() {
    let env = new_env();
    let mut agent = env.start_agent();
    let rel = "bad/malformed.jsonl";
    let (bytes, good) = file_with_bad_line(
        ids_base(1),
        4,
        3,
        br#"{"deviceId":"D-x","time":1793534899.6,"states":[{"events":[{"eventId":12,"name":}]}"#,
    );
    write_atomically(&env.watch_dir().join(rel), &bytes);
    assert_survived(&env, &mut agent, &good, 1, "malformed JSON");
    let entry = expect_quarantine_entry(&env, &agent, rel, Some(3));
    assert!(
        !entry["reason"].as_str().unwrap_or("").is_empty(),
        "{entry}"
    );
    assert_eq!(
        count_log_lines(&agent.logs(), "bad records quarantined"),
        1,
        "one log line for the incident"
    );
}

#[test]
fn invalid_utf8_in_a_line_is_quarantined_and_its_neighbours_delivered() {
    let env = new_env();
    let mut agent = env.start_agent();
    let rel = "bad/latin1.jsonl";
    let (bytes, good) = file_with_bad_line(
        ids_base(2),
        4,
        2,
        b"{\"deviceId\":\"D-\xe9\xff\xfe\",\"time\":1793534899.6,\"states\":[]}",
    );
    write_atomically(&env.watch_dir().join(rel), &bytes);
    assert_survived(&env, &mut agent, &good, 1, "invalid UTF-8");
    let entry = expect_quarantine_entry(&env, &agent, rel, Some(2));
    assert!(
        entry["reason"].as_str().unwrap_or("").contains("UTF-8"),
        "{entry}"
    );
}

#[test]
fn a_truncated_gzip_keeps_the_records_before_the_cut() {
    let env = new_env();
    let mut agent = env.start_agent();
    let (plain, ids) = open_session_lines(ids_base(3), 3000);
    let full = gzip_bytes(&plain);
    let cut = &full[..full.len() / 2];
    // What a gzip reader gets out of the cut file: the complete lines before the cut.
    let mut decoded = Vec::new();
    let err = flate2::read::GzDecoder::new(cut)
        .read_to_end(&mut decoded)
        .expect_err("a cut gzip stream ends in an error");
    let complete = decoded.iter().filter(|&&b| b == b'\n').count();
    assert!(
        complete > 100 && complete < ids.len(),
        "the cut falls mid-file: {complete} lines ({err})"
    );
    let rel = "20261101/export-t-job-output-0";
    write_atomically(&env.watch_dir().join(rel), cut);
    let before_cut = &ids[..complete];
    assert_survived(&env, &mut agent, before_cut, 1, "truncated gzip");
    let entry = expect_quarantine_entry(&env, &agent, rel, Some(complete as u64 + 1));
    assert!(
        entry["reason"].as_str().unwrap_or("").contains("truncated"),
        "{entry}"
    );
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "files_failed"), 1, "{status}");
    assert!(
        agent.logs().contains("records before the damage were kept"),
        "the log says what was kept"
    );
}

#[test]
fn a_binary_file_gets_one_whole_file_entry() {
    let env = new_env();
    let mut agent = env.start_agent();
    let mut rng = fastrand::Rng::with_seed(0xb1a5);
    let mut garbage: Vec<u8> = (0..64 * 1024).map(|_| rng.u8(..)).collect();
    garbage[0] = 0x00; // not gzip magic, not `{`
    let rel = "20261101/export-bin-job-output-0";
    write_atomically(&env.watch_dir().join(rel), &garbage);
    let (bytes, good) = open_session_lines(ids_base(4), 5);
    write_atomically(&env.watch_dir().join("20261101/beside.jsonl"), &bytes);
    assert_survived(&env, &mut agent, &good, 1, "binary file");
    expect_quarantine_entry(&env, &agent, rel, None);
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "files_failed"), 1, "{status}");
    assert_eq!(
        count_log_lines(&agent.logs(), "file cannot be read"),
        1,
        "logged once"
    );
    // Rescans do not repeat the incident.
    thread::sleep(NOTHING_HAPPENS);
    assert_eq!(count_log_lines(&agent.logs(), "file cannot be read"), 1);
    assert_eq!(quarantine_list(&env.config_path).len(), 1);
}

#[test]
fn an_empty_file_is_no_error_and_no_entry() {
    let env = new_env();
    let mut agent = env.start_agent();
    fs::File::create(env.watch_dir().join("empty")).unwrap();
    write_atomically(&env.watch_dir().join("empty-too.jsonl"), b"");
    let (bytes, good) = open_session_lines(ids_base(5), 3);
    write_atomically(&env.watch_dir().join("beside.jsonl"), &bytes);
    assert_survived(&env, &mut agent, &good, 0, "empty file");
    thread::sleep(NOTHING_HAPPENS);
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "files_failed"), 0, "{status}");
    assert!(dead_letter_list(&env.config_path).is_empty());
    assert_eq!(
        env.server.accepted_count(),
        good.len(),
        "nothing else delivered"
    );
    assert!(
        !agent.logs().contains("file cannot be read"),
        "an empty file is not an error"
    );
}

/// A line over `watch.max_line_bytes` (set to 1 MiB here; the default is 64 MiB) is one
/// quarantine entry whose reason and log line give its size; the lines after it are read.
#[test]
fn a_line_over_max_line_bytes_is_one_entry_with_its_size_and_the_next_line_still_arrives() {
    let mut env = new_env();
    env.config = env
        .config
        .clone()
        .with_extra("watch", "max_line_bytes = 1048576");
    let mut agent = env.start_agent();
    let mut long = br#"{"deviceId":"D-long","time":1793534899.6,"pad":""#.to_vec();
    long.extend(std::iter::repeat_n(b'x', 1536 * 1024));
    long.extend_from_slice(br#""}"#);
    let rel = "big/long-line.jsonl";
    let (bytes, good) = file_with_bad_line(ids_base(6), 3, 2, &long);
    write_atomically(&env.watch_dir().join(rel), &bytes);
    assert_survived(&env, &mut agent, &good, 1, "line over max_line_bytes");
    let entry = expect_quarantine_entry(&env, &agent, rel, Some(2));
    let reason = format!(
        "line of {} bytes is over watch.max_line_bytes (1,048,576)",
        thousands(long.len())
    );
    assert_eq!(entry["reason"], reason.as_str(), "{entry}");
    assert_eq!(
        count_log_lines(&agent.logs(), &reason),
        1,
        "logged once, with the size\n{}",
        agent.log_tail(20)
    );
}

#[test]
fn a_record_with_no_identity_is_quarantined() {
    let env = new_env();
    let mut agent = env.start_agent();
    let anonymous = ids_base(7) + 999;
    let line = format!(
        r#"{{"time":1793534899.612,"experiments":[],"states":[{{"events":[{{"eventId":{anonymous},"name":".m5680127476129675 Open","time":1793534900.5}}]}}]}}"#
    );
    let rel = "who/anonymous.jsonl";
    let (bytes, good) = file_with_bad_line(ids_base(7), 3, 2, line.as_bytes());
    write_atomically(&env.watch_dir().join(rel), &bytes);
    assert_survived(&env, &mut agent, &good, 1, "no identity");
    let entry = expect_quarantine_entry(&env, &agent, rel, Some(2));
    assert!(
        entry["reason"].as_str().unwrap_or("").contains("user id"),
        "{entry}"
    );
    assert!(
        !env.server
            .accepted_message_ids()
            .contains(&lp_id(anonymous)),
        "the event without identity is never sent"
    );
}

/// The agent binary, runnable by an unprivileged user: the build's own when every directory
/// above it lets others through, else a copy in `dir`.
fn binary_for_others(dir: &Path) -> PathBuf {
    let bin = PathBuf::from(crate::util::BIN);
    let others_can_reach = bin
        .ancestors()
        .skip(1)
        .all(|d| fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
        && fs::metadata(&bin).is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005);
    if others_can_reach {
        return bin;
    }
    let copy = dir.join("leanplum-segment-agent");
    fs::copy(&bin, &copy).expect("copy the agent binary");
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

#[test]
fn an_unreadable_file_is_quarantined_and_read_once_it_becomes_readable() {
    // Root reads any file whatever its mode, so as root the agent runs as `nobody` here.
    let as_root = running_as_root();
    let mut env = new_env();
    let (uid, gid) = (65534, 65534);
    if as_root {
        // `nobody` needs to reach the temp dir (spool, socket) and a catalog it can read.
        fs::set_permissions(env.root(), fs::Permissions::from_mode(0o777)).unwrap();
        let catalog = env.root().join("catalog");
        fs::create_dir_all(&catalog).unwrap();
        for f in ["messages.json", "abtests.json"] {
            fs::copy(
                crate::util::repo_path(&format!("examples/catalog/{f}")),
                catalog.join(f),
            )
            .unwrap();
        }
        env.config.catalog_dir = catalog;
    }
    let rel = "locked/export-u-job-output-0";
    let path = env.watch_dir().join(rel);
    let (bytes, locked_ids) = open_session_lines(ids_base(8), 4);
    write_atomically(&path, &bytes);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o000)).unwrap();
    if !as_root {
        // The mode is only a test when we are not root and cannot read it ourselves either.
        assert!(fs::File::open(&path).is_err(), "mode 000 locks us out");
    }

    let mut agent = if as_root {
        let bin = binary_for_others(env.root());
        env.write_config();
        let mut cmd = run_command(&bin, &env.config_path);
        cmd.uid(uid).gid(gid);
        Agent::spawn(cmd, &env.config_path)
    } else {
        env.start_agent()
    };
    let (good_bytes, good) = open_session_lines(ids_base(8) + 100, 3);
    write_atomically(&env.watch_dir().join("readable.jsonl"), &good_bytes);
    assert_survived(&env, &mut agent, &good, 1, "unreadable file");
    expect_quarantine_entry(&env, &agent, rel, None);
    assert_eq!(
        count_log_lines(&agent.logs(), "file cannot be read"),
        1,
        "logged once\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    // Checked last, so a wrong count does not hide what follows.
    let status_while_locked = status_json(&env.config_path);

    // The operator fixes the mode: the file is read (files_failed: "retried when they change").
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    wait_delivered(&env, &agent, &locked_ids, "the file once readable");
    let all: Vec<String> = good.iter().chain(&locked_ids).cloned().collect();
    assert_exactly_once(&env.server, &all, &agent, "unreadable, then readable");
    assert_eq!(
        status_u64(&status_while_locked, "files_failed"),
        1,
        "a file that cannot be opened is a file that could not be read: {status_while_locked}"
    );
}

#[test]
fn a_file_deleted_while_it_is_read_does_not_stop_the_daemon() {
    let env = new_env();
    let mut agent = env.start_agent();
    let rel = "vanish/export-v-job-output-0";
    let (bytes, ids) = open_session_lines(ids_base(9), 30_000);
    write_atomically(&env.watch_dir().join(rel), &bytes);
    // Delete it the moment the agent starts reading it.
    let needle = format!("reading file path={rel}");
    assert!(
        wait_until(PATIENCE, || agent.logs().contains(&needle)),
        "the agent starts reading\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    fs::remove_file(env.watch_dir().join(rel)).unwrap();

    // Whatever was committed is delivered, nothing twice, nothing foreign.
    // The agent's pass over the file ends one way or another (the open descriptor may well
    // read it all); then the spool drains. Generous: a loaded machine reads 30k lines slowly.
    let ended = [
        format!("file ingested path={rel}"),
        format!("file cannot be read path={rel}"),
        format!("file damaged; records before the damage were kept path={rel}"),
    ];
    assert!(
        wait_until(3 * PATIENCE, || {
            let logs = agent.logs();
            ended.iter().any(|e| logs.contains(e.as_str()))
        }),
        "the pass over the vanished file ends\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    let settled = wait_for_status(&env.config_path, 3 * PATIENCE, |s| {
        status_u64(s, "spool_events") == 0
    })
    .expect("the spool drains");
    assert!(env.server.wait_for_quiet(Duration::from_secs(1), PATIENCE));
    assert!(
        agent.is_running(),
        "the daemon survives\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    let spooled = status_u64(&status_json(&env.config_path), "events_spooled");
    let report = DeliveryReport::of(&env.server, &ids);
    assert!(
        report.unexpected.is_empty() && report.repeated.is_empty(),
        "{}",
        report.summary()
    );
    assert_eq!(
        env.server.accepted_count() as u64,
        spooled,
        "every committed event delivered ({settled})"
    );
    eprintln!(
        "file deleted mid-read: {spooled} of {} events had been committed",
        ids.len()
    );

    // And the daemon still reads new files.
    let (more, more_ids) = open_session_lines(ids_base(9) + 100_000, 3);
    write_atomically(&env.watch_dir().join("vanish/after.jsonl"), &more);
    wait_delivered(&env, &agent, &more_ids, "a file after the vanished one");
}

#[test]
fn a_symlink_out_of_the_watch_dir_is_never_read() {
    let env = new_env();
    let outside = env.root().join("outside");
    fs::create_dir_all(outside.join("dir")).unwrap();
    let (bytes, outside_ids) = open_session_lines(ids_base(10), 5);
    fs::write(outside.join("shard"), &bytes).unwrap();
    let (bytes2, outside_ids2) = open_session_lines(ids_base(10) + 100, 5);
    fs::write(outside.join("dir/shard"), &bytes2).unwrap();
    std::os::unix::fs::symlink(outside.join("shard"), env.watch_dir().join("linked-file")).unwrap();
    std::os::unix::fs::symlink(outside.join("dir"), env.watch_dir().join("linked-dir")).unwrap();
    let mut agent = env.start_agent();
    // One more made while the agent runs.
    std::os::unix::fs::symlink(outside.join("shard"), env.watch_dir().join("late-link")).unwrap();
    let (good_bytes, good) = open_session_lines(ids_base(10) + 200, 3);
    write_atomically(&env.watch_dir().join("real.jsonl"), &good_bytes);
    assert_survived(&env, &mut agent, &good, 0, "symlinks");
    thread::sleep(NOTHING_HAPPENS);
    let accepted = env.server.accepted_message_ids();
    assert!(
        outside_ids
            .iter()
            .chain(&outside_ids2)
            .all(|id| !accepted.contains(id)),
        "nothing from outside the watch dir was delivered"
    );
    assert_eq!(
        status_u64(&status_json(&env.config_path), "events_read"),
        good.len() as u64,
        "the links are not even read"
    );
}

#[test]
fn a_directory_that_comes_and_goes_does_not_disturb_the_daemon() {
    let env = new_env();
    let mut agent = env.start_agent();

    // A directory synced in whole (built beside the tree, then renamed into it), read, removed.
    let staging = env.root().join("staging-a");
    let (a, a_ids) = open_session_lines(ids_base(11), 4);
    let (b, b_ids) = open_session_lines(ids_base(11) + 100, 4);
    fs::create_dir_all(staging.join("nested")).unwrap();
    fs::write(staging.join("one.jsonl"), &a).unwrap();
    fs::write(staging.join("nested/two.jsonl"), &b).unwrap();
    fs::rename(&staging, env.watch_dir().join("batch-a")).unwrap();
    let ab: Vec<String> = a_ids.iter().chain(&b_ids).cloned().collect();
    wait_delivered(&env, &agent, &ab, "a directory that appeared");
    fs::remove_dir_all(env.watch_dir().join("batch-a")).unwrap();

    // A directory that appears with files and is gone before they settle.
    let (c, c_ids) = open_session_lines(ids_base(11) + 200, 4);
    let flash = env.watch_dir().join("batch-b/deep");
    fs::create_dir_all(&flash).unwrap();
    fs::write(flash.join("three.jsonl"), &c).unwrap();
    // The scenario: gone well within settle_secs (1 s).
    thread::sleep(Duration::from_millis(200));
    fs::remove_dir_all(env.watch_dir().join("batch-b")).unwrap();

    thread::sleep(NOTHING_HAPPENS);
    assert!(
        agent.is_running(),
        "the daemon survives\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    let accepted = env.server.accepted_message_ids();
    assert!(
        c_ids.iter().all(|id| !accepted.contains(id)),
        "files gone before they settled are not read"
    );
    // Still watching: a new file (in a re-created directory of the same name) arrives.
    let (d, d_ids) = open_session_lines(ids_base(11) + 300, 3);
    write_atomically(&env.watch_dir().join("batch-a/after.jsonl"), &d);
    wait_delivered(&env, &agent, &d_ids, "a file after the directories went");
    let all: Vec<String> = ab.iter().chain(&d_ids).cloned().collect();
    assert_exactly_once(&env.server, &all, &agent, "directories that come and go");
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "quarantined"), 0, "{status}");
    assert_eq!(status_u64(&status, "files_failed"), 0, "{status}");
}

#[test]
fn a_watch_dir_missing_at_start_is_waited_for() {
    let env = new_env();
    fs::remove_dir(env.watch_dir()).unwrap();
    let mut agent = env.start_agent();
    assert!(
        agent.wait_for_log("watch directory missing; waiting for it", PATIENCE),
        "the agent says it waits\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    // A window in which an exit would show (the agent must keep waiting).
    thread::sleep(Duration::from_secs(2));
    assert!(
        agent.is_running(),
        "a missing watch dir is no reason to exit"
    );
    // `status` answers while it waits.
    let status = status_json(&env.config_path);
    assert_eq!(status["state"], "running", "{status}");

    let (bytes, ids) = open_session_lines(ids_base(12), 4);
    write_atomically(&env.watch_dir().join("first.jsonl"), &bytes);
    wait_delivered(&env, &agent, &ids, "a file in the late watch dir");
    assert_eq!(
        count_log_lines(&agent.logs(), "waiting for it"),
        1,
        "the wait is logged exactly once\nagent log tail:\n{}",
        agent.log_tail(30)
    );
    assert_survived(&env, &mut agent, &ids, 0, "late watch dir");
}

/// A file with one unparsable line, delivered around it; returns the entry.
fn quarantine_one_bad_line(env: &TestEnv, agent: &mut Agent, test: u64) -> Value {
    let rel = format!("dl/bad-{test}.jsonl");
    let (bytes, good) = file_with_bad_line(ids_base(test), 2, 2, b"{\"deviceId\": oops}");
    write_atomically(&env.watch_dir().join(&rel), &bytes);
    assert_survived(env, agent, &good, 1, "one bad line");
    expect_quarantine_entry(env, agent, &rel, Some(2))
}

#[test]
fn dead_letter_purge_empties_the_list() {
    let env = new_env();
    let mut agent = env.start_agent();
    quarantine_one_bad_line(&env, &mut agent, 13);
    let out = dead_letter_cmd(&env.config_path, "purge", &[]);
    assert_eq!(out.code(), 0, "{}", out.all_output());
    assert!(
        dead_letter_list(&env.config_path).is_empty(),
        "purge leaves nothing: {:?}",
        dead_letter_list(&env.config_path)
    );
    assert!(agent.is_running());
}

#[test]
fn dead_letter_retry_keeps_a_line_that_still_cannot_parse() {
    let env = new_env();
    let mut agent = env.start_agent();
    let before = quarantine_one_bad_line(&env, &mut agent, 14);
    let out = dead_letter_cmd(&env.config_path, "retry", &[]);
    assert_eq!(out.code(), 0, "{}", out.all_output());
    let after = quarantine_list(&env.config_path);
    assert_eq!(after.len(), 1, "the entry stays: {after:#?}");
    assert_eq!(after[0]["id"], before["id"], "the same entry");
    assert_eq!(after[0]["line"], 2);
    assert!(
        after[0]["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("retry failed"),
        "{:#}",
        after[0]
    );
    assert!(agent.is_running());
}

/// A file of 100,000 malformed lines (and a good one at each end) writes a handful of log
/// lines, not one per record; `status` and `dead-letter list` have the counts.
#[test]
fn a_hundred_thousand_bad_lines_log_one_line_per_kind() {
    let env = new_env();
    let agent = env.start_agent();
    let first = ids_base(40);
    let mut bytes = Vec::new();
    bytes.extend_from_slice(open_session_line(first).as_bytes());
    bytes.push(b'\n');
    for i in 0..100_000 {
        bytes.extend_from_slice(format!("{{\"deviceId\": oops {i}\n").as_bytes());
    }
    bytes.extend_from_slice(open_session_line(first + 1).as_bytes());
    bytes.push(b'\n');
    write_atomically(&env.watch_dir().join("many-bad.jsonl"), &bytes);
    // 100,000 quarantine entries take a debug build on a loaded machine well over PATIENCE
    // (seen: over 30 s with the suite running beside it).
    let ids = [lp_id(first), lp_id(first + 1)];
    assert!(
        env.server.wait_for_ids(&ids, PATIENCE * 4),
        "many bad lines: {}\n{}",
        DeliveryReport::of(&env.server, &ids).summary(),
        agent.log_tail(20)
    );
    let status = wait_for_status(&env.config_path, PATIENCE * 4, |s| {
        s["quarantined"] == 100_000
    })
    .unwrap_or_else(|| panic!("{}", agent.log_tail(20)));
    assert_eq!(status["files_in_progress"], 0, "{status}");
    let logs = agent.logs();
    let lines = count_log_lines(&logs, "bad records quarantined");
    assert!(
        (1..=3).contains(&lines),
        "{lines} log lines for 100,000 bad records"
    );
    let line = logs
        .lines()
        .find(|l| l.contains("bad records quarantined"))
        .unwrap();
    assert!(line.contains("records=100000"), "{line}");
    assert!(line.contains("first_line=2"), "{line}");
}

/// `spool.keep_bad_days`: entries older than it are dropped (at start, then every maintenance
/// tick), with one log line; newer ones stay.
#[test]
fn entries_older_than_keep_bad_days_are_dropped() {
    use leanplum_segment_agent::spool::{QuarantineEntry, Spool};
    let env = new_env();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    {
        // Written while no agent runs, as an agent would have months ago.
        let spool = Spool::open(&env.config.spool_dir, 8 << 20).unwrap();
        for (age_days, line) in [(400u64, 1u64), (31, 2), (29, 3), (0, 4)] {
            spool
                .letters()
                .quarantine(&QuarantineEntry {
                    reason: "malformed JSON".into(),
                    file: "old.jsonl".into(),
                    line,
                    time_ms: now - age_days * 86_400_000,
                    raw: "{".into(),
                    ..QuarantineEntry::default()
                })
                .unwrap();
        }
    }
    let agent = env.start_agent();
    assert!(
        agent.wait_for_log("entries older than spool.keep_bad_days dropped", PATIENCE),
        "{}",
        agent.log_tail(20)
    );
    assert!(
        agent.logs().contains("quarantined=2"),
        "{}",
        agent.log_tail(20)
    );
    let mut left: Vec<u64> = quarantine_list(&env.config_path)
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, [3, 4], "only the entries within 30 days stay");
}

/// `dead-letter show ID` for a malformed line and for an event Segment refused with 400, and
/// `dead-letter list --kind --file`.
#[test]
fn dead_letter_show_and_list_filters() {
    let env = new_env();
    let first = ids_base(41);
    let rejected = lp_id(first + 1);
    env.server
        .reject_message_ids(std::iter::once(rejected.clone()).collect(), 400);
    let agent = env.start_agent();
    let mut bytes = Vec::new();
    for line in [
        open_session_line(first),
        open_session_line(first + 1),
        r#"{"deviceId": "D-9", "states": [oops]}"#.to_string(),
    ] {
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
    }
    write_atomically(&env.watch_dir().join("show-me.jsonl"), &bytes);
    wait_delivered(&env, &agent, &[lp_id(first)], "show");
    assert!(wait_until(PATIENCE, || dead_letter_list(&env.config_path)
        .len()
        == 2));

    let list = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = dead_letter_cmd(&env.config_path, "list", &all);
        assert_eq!(out.code(), 0, "{out:?}");
        serde_json::from_str(out.stdout.trim()).unwrap()
    };
    let quarantined = list(&["--kind", "quarantine", "--file", "show-me.jsonl"]);
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(list(&["--kind", "dead-letter"]).len(), 1);
    assert_eq!(list(&["--kind", "parked"]).len(), 0);
    assert_eq!(list(&["--file", "other.jsonl"]).len(), 0);

    let id = quarantined[0]["id"].as_u64().unwrap().to_string();
    let shown = dead_letter_cmd(&env.config_path, "show", &[&id]);
    assert_eq!(shown.code(), 0, "{shown:?}");
    assert!(shown.stdout.contains("file:    show-me.jsonl"), "{shown:?}");
    assert!(shown.stdout.contains("line:    3"), "{shown:?}");
    assert!(
        shown
            .stdout
            .contains(r#"{"deviceId": "D-9", "states": [oops]}"#),
        "{shown:?}"
    );

    let dead = &list(&["--kind", "dead-letter"])[0];
    let id = dead["id"].as_u64().unwrap().to_string();
    let shown = dead_letter_cmd(&env.config_path, "show", &[&id, "--json"]);
    assert_eq!(shown.code(), 0, "{shown:?}");
    let v: Value = serde_json::from_str(shown.stdout.trim()).unwrap();
    assert_eq!(v["status"], 400, "{v}");
    assert_eq!(v["content_kind"], "event");
    let event: Value = serde_json::from_str(v["content"].as_str().unwrap()).unwrap();
    assert_eq!(event["messageId"], rejected.as_str());
    assert_eq!(v["file"], "show-me.jsonl", "{v}");

    let missing = dead_letter_cmd(&env.config_path, "show", &["999999999"]);
    assert_eq!(missing.code(), 1, "{missing:?}");
}
