//! The short-lived commands (SPEC section 2): `check-config` exit codes and messages naming the
//! key at fault, without ever printing the write key; `dry-run` prints the events and touches
//! neither the spool nor Segment.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;

use crate::events::{
    assert_same_events, assert_track_envelopes, expected_shard_0, parse_json_lines,
};
use crate::util::{
    CmdOutput, EX_CONFIG, PATIENCE, SHARD_0, TestEnv, WRITE_KEY, dir_is_absent_or_empty,
    long_session_line, open_session_line, repo_path, run_cli, thousands,
};

/// Runs `check-config --config <path>`.
fn check_config(path: &std::path::Path) -> CmdOutput {
    run_cli(
        &[
            "check-config".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
        ],
        PATIENCE,
    )
}

/// Writes `env`'s config and checks it.
fn check(env: &TestEnv) -> CmdOutput {
    check_config(&env.write_config())
}

/// The write key, in clear or base64 (alone or as the Basic credential), appears nowhere.
fn assert_no_secret(out: &CmdOutput, what: &str) {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let all = out.all_output();
    for secret in [
        WRITE_KEY.to_string(),
        b64(&format!("{WRITE_KEY}:")),
        b64(WRITE_KEY),
    ] {
        assert!(
            !all.contains(&secret),
            "{what}: the output contains the write key ({secret:?}):\n{all}"
        );
    }
}

#[test]
fn check_config_accepts_a_valid_config() {
    let env = TestEnv::new();
    let out = check(&env);
    assert_eq!(out.code(), 0, "a valid config: {out:?}");
    assert_no_secret(&out, "valid config");
}

#[test]
fn check_config_accepts_a_write_key_file() {
    let mut env = TestEnv::new();
    let key_file = env.root().join("write_key");
    std::fs::write(&key_file, format!("{WRITE_KEY}\n")).expect("write the key file");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600 the key file");
    env.config.write_key = None;
    env.config.write_key_file = Some(key_file);
    let out = check(&env);
    assert_eq!(out.code(), 0, "a config with write_key_file: {out:?}");
    assert_no_secret(&out, "write_key_file");
}

#[test]
fn check_config_rejects_a_missing_file() {
    let env = TestEnv::new();
    let out = check_config(&env.root().join("no-such-config.toml"));
    assert_eq!(out.code(), EX_CONFIG, "a missing config file: {out:?}");
}

#[test]
fn check_config_names_an_unknown_key() {
    let mut env = TestEnv::new();
    env.config
        .extra
        .push(("segment".into(), "bogus = 1".into()));
    let out = check(&env);
    assert_eq!(out.code(), EX_CONFIG, "an unknown key: {out:?}");
    assert!(
        out.all_output().contains("segment.bogus"),
        "the message names segment.bogus: {out:?}"
    );
    assert_no_secret(&out, "unknown key");
}

#[test]
fn check_config_names_an_invalid_value() {
    let mut env = TestEnv::new();
    env.config.max_batch_events = Some(0);
    let out = check(&env);
    assert_eq!(out.code(), EX_CONFIG, "max_batch_events = 0: {out:?}");
    assert!(
        out.all_output().contains("segment.max_batch_events"),
        "the message names segment.max_batch_events: {out:?}"
    );
    assert_no_secret(&out, "max_batch_events = 0");
}

#[test]
fn check_config_rejects_two_write_keys() {
    let mut env = TestEnv::new();
    let key_file = env.root().join("write_key");
    std::fs::write(&key_file, format!("{WRITE_KEY}\n")).expect("write the key file");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600 the key file");
    env.config.write_key_file = Some(key_file);
    let out = check(&env);
    assert_eq!(
        out.code(),
        EX_CONFIG,
        "write_key and write_key_file together: {out:?}"
    );
    assert!(
        out.all_output().contains("write_key"),
        "the message names the write key setting: {out:?}"
    );
    assert_no_secret(&out, "two write keys");
}

#[test]
fn dry_run_prints_events_and_touches_nothing() {
    let env = TestEnv::new();
    let config = env.write_config();
    let shard = repo_path(SHARD_0);
    let args: [&OsStr; 4] = [
        "dry-run".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        shard.as_os_str(),
    ];
    let out = run_cli(&args, PATIENCE);
    assert_eq!(out.code(), 0, "dry-run: {out:?}");
    assert_no_secret(&out, "dry-run");

    let events = parse_json_lines(&out.stdout, "dry-run stdout");
    assert_track_envelopes(&events);
    assert_same_events(&events, &expected_shard_0(), "dry-run output");

    assert!(
        dir_is_absent_or_empty(&env.config.spool_dir),
        "dry-run touches no spool, yet {} has entries",
        env.config.spool_dir.display()
    );
    assert!(
        env.server.requests().is_empty(),
        "dry-run sends nothing, yet Segment got {:?}",
        env.server.requests()
    );
}

/// `dry-run` reads lines up to the configured `watch.max_line_bytes`: with 4 KiB a session of
/// 5 KB is a bad record naming its size and the lines beside it still print; with the default
/// (64 MiB) the same file gives every event. A limit under 1 KiB is refused, naming the key.
#[test]
fn dry_run_reads_lines_up_to_the_configured_max_line_bytes() {
    let base = 8_400_000_000_000_000_000;
    let (long, long_ids) = long_session_line(base + 100, 30, 2);
    assert!(long.len() > 4096, "{}", long.len());
    let mut text = Vec::new();
    for line in [
        open_session_line(base).as_bytes(),
        &long,
        open_session_line(base + 1).as_bytes(),
    ] {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    let mut env = TestEnv::new();
    let file = env.root().join("sessions.jsonl");
    std::fs::write(&file, &text).expect("write the sessions");
    let dry_run = |env: &TestEnv| {
        let config = env.write_config();
        let args: [&OsStr; 4] = [
            "dry-run".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            file.as_os_str(),
        ];
        let out = run_cli(&args, PATIENCE);
        let ids: Vec<String> = parse_json_lines(&out.stdout, "dry-run stdout")
            .iter()
            .map(|e| e["messageId"].as_str().unwrap_or("").to_owned())
            .collect();
        (out, ids)
    };

    let (out, ids) = dry_run(&env);
    assert_eq!(out.code(), 0, "{out:?}");
    let mut all = vec![format!("lp-e-{base}")];
    all.extend(long_ids);
    all.push(format!("lp-e-{}", base + 1));
    assert_eq!(ids, all, "the default limit takes the 5 KB line");

    env.config = env
        .config
        .clone()
        .with_extra("watch", "max_line_bytes = 4096");
    let (out, ids) = dry_run(&env);
    assert_eq!(out.code(), 0, "a bad record is not a failed run: {out:?}");
    assert_eq!(ids, [all[0].clone(), all[3].clone()]);
    let reason = format!(
        "sessions.jsonl:2: line of {} bytes is over watch.max_line_bytes (4,096)",
        thousands(long.len())
    );
    assert!(out.stderr.contains(&reason), "{reason:?} in {out:?}");

    env.config.extra.clear();
    env.config = env
        .config
        .clone()
        .with_extra("watch", "max_line_bytes = 1000");
    let out = check(&env);
    assert_eq!(out.code(), EX_CONFIG, "{out:?}");
    assert!(
        out.all_output().contains("watch.max_line_bytes"),
        "the message names watch.max_line_bytes: {out:?}"
    );
}

/// The write key can come from `$SEGMENT_WRITE_KEY` or a systemd credential
/// (`$CREDENTIALS_DIRECTORY/write_key`) when the config names none; without any, check-config
/// fails naming the key. The key itself is never printed.
#[test]
fn check_config_finds_the_write_key_in_the_environment_and_credentials() {
    let mut env = TestEnv::new();
    env.config.write_key = None;
    let config = env.write_config();
    let check = |vars: &[(&str, &std::path::Path)], key_env: Option<&str>| {
        let mut cmd = crate::util::scrubbed_command(crate::util::BIN);
        cmd.args(["check-config", "--config"]).arg(&config);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        if let Some(k) = key_env {
            cmd.env("SEGMENT_WRITE_KEY", k);
        }
        let out = cmd.output().expect("run check-config");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };

    let (code, text) = check(&[], None);
    assert_eq!(code, Some(EX_CONFIG), "{text}");
    assert!(text.contains("segment.write_key_file"), "{text}");

    let (code, text) = check(&[], Some(WRITE_KEY));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("$SEGMENT_WRITE_KEY"), "{text}");
    assert!(!text.contains(WRITE_KEY), "{text}");

    let creds = env.root().join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    let key_file = creds.join("write_key");
    std::fs::write(&key_file, format!("{WRITE_KEY}\n")).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, text) = check(&[("CREDENTIALS_DIRECTORY", creds.as_path())], None);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("systemd credential"), "{text}");
    assert!(!text.contains(WRITE_KEY), "{text}");
}

/// A key file others can read is accepted, with a warning that says how to fix it (and never
/// the key).
#[test]
fn a_write_key_file_readable_by_others_is_warned_about() {
    let mut env = TestEnv::new();
    let key_file = env.root().join("write_key");
    std::fs::write(&key_file, format!("{WRITE_KEY}\n")).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.config.write_key = None;
    env.config.write_key_file = Some(key_file.clone());
    let config = env.write_config();
    let out = check_config(&config);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("readable by group or others"), "{text}");
    assert!(!text.contains(WRITE_KEY), "{text}");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let quiet = check_config(&config);
    assert!(
        !format!("{}{}", quiet.stdout, quiet.stderr).contains("readable by group"),
        "no warning at 0600"
    );
}

/// `dry-run` ends with what was not sent and why; `--explain` gives one line per record not
/// (wholly) sent.
#[test]
fn dry_run_says_what_was_not_sent_and_why() {
    let env = TestEnv::new();
    let config = env.write_config();
    let base = 8_500_000_000_000_000_000u64;
    let session = |id: u64, name: &str| {
        format!(
            r#"{{"deviceId":"D-{id}","time":1793534899.612,"states":[{{"events":[{{"eventId":{id},"name":"{name}","time":1793534900.5}}]}}]}}"#
        )
    };
    let text = [
        session(base, ".m5680127476129675 Open"),
        session(base + 1, ".m5680127476129675 Held Back"),
        session(base + 2, ".m9999999999999999 Open"),
        session(base, ".m5680127476129675 Open"),
        "{oops".to_string(),
    ]
    .join("\n")
        + "\n";
    let file = env.root().join("mixed.jsonl");
    std::fs::write(&file, text).unwrap();
    let run = |explain: bool| {
        let mut args: Vec<&OsStr> =
            vec!["dry-run".as_ref(), "--config".as_ref(), config.as_os_str()];
        if explain {
            args.push("--explain".as_ref());
        }
        args.push(file.as_os_str());
        run_cli(&args, PATIENCE)
    };
    let out = run(false);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout.lines().count(), 1, "one event: {out:?}");
    let summary = out.stderr.lines().last().unwrap_or_default();
    for part in [
        "1 events",
        "1 skipped by action (Held Back: 1)",
        "1 parked",
        "1 duplicates",
        "1 bad records",
    ] {
        assert!(summary.contains(part), "{part:?} not in {summary:?}");
    }
    assert!(!out.stderr.contains("not sent: Held Back"), "{out:?}");
    let explained = run(true);
    assert!(
        explained
            .stderr
            .contains("mixed.jsonl:2: not sent: Held Back x1"),
        "{explained:?}"
    );
    assert!(
        explained.stderr.contains(
            "mixed.jsonl:3: 1 engagement(s) of message(s) not in the catalog (9999999999999999)"
        ),
        "{explained:?}"
    );
    assert!(
        explained.stderr.contains("mixed.jsonl:5: "),
        "{explained:?}"
    );
}
