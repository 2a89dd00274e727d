//! The CSV export benchmark (`cargo bench --bench csv_export -- [--size-mb N] [--keep DIR]
//! [--only json|csv] [--generate-only]`): generates one job's sessions both as a JSON export
//! and as a CSV export (sessions, events, eventparameters, experiments tables, 4 shards), runs
//! the real daemon (`target/release`) on each with Segment unreachable, and reports how long the
//! ingest took (every file read, every event durably spooled or waiting), MB/s of each format's
//! own bytes, sessions/s, and the daemon's peak RSS (VmHWM).
//!
//! `--size-mb` is the size of the CSV export (default 256); the JSON export of the same
//! sessions is about 1.4 times larger. `--generate-only` writes the files and the configs
//! (`<dir>/json/config.toml`, `<dir>/csv/config.toml`) and stops, for a run under
//! `/usr/bin/time -v`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// The integration tests' harness: the config builder, the agent process, `status --json`. The
// benchmark uses a part of it.
mod common;
#[allow(dead_code, unused_imports)]
#[path = "../tests/integration/util/mod.rs"]
mod util;

use common::bench_config;

use util::{Agent, try_status_json};

const JOB: &str = "5629499534213120-0b7c3a52-bench-4bbb-8ccc-000000000001";
const SHARDS: usize = 4;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn catalog_ids() -> (Vec<u64>, Vec<u64>) {
    let catalog = std::fs::read_to_string(repo("examples/catalog/messages.json")).unwrap();
    let v: Vec<serde_json::Value> = serde_json::from_str(&catalog).unwrap();
    let (mut email, mut push) = (Vec::new(), Vec::new());
    for m in v {
        let id = m["id"].as_u64().unwrap();
        if m["channel"] == "email" {
            email.push(id)
        } else {
            push.push(id)
        }
    }
    (email, push)
}

struct Tables {
    sessions: std::io::BufWriter<std::fs::File>,
    events: std::io::BufWriter<std::fs::File>,
    params: std::io::BufWriter<std::fs::File>,
    experiments: std::io::BufWriter<std::fs::File>,
}

fn create(path: PathBuf, header: &str) -> std::io::BufWriter<std::fs::File> {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    w.write_all(header.as_bytes()).unwrap();
    w
}

/// Writes the job into `json_dir` and `csv_dir`; returns (json bytes, csv bytes, sessions).
fn generate(json_dir: &Path, csv_dir: &Path, csv_size: u64) -> (u64, u64, u64) {
    std::fs::create_dir_all(json_dir).unwrap();
    std::fs::create_dir_all(csv_dir).unwrap();
    let ids = catalog_ids();
    let mut rng = fastrand::Rng::with_seed(42);
    let mut next_event = 7_000_000_000_000_000_000u64;
    let mut json: Vec<std::io::BufWriter<std::fs::File>> = (0..SHARDS)
        .map(|n| create(json_dir.join(format!("export-{JOB}-output-{n}")), ""))
        .collect();
    let mut csv: Vec<Tables> = (0..SHARDS)
        .map(|n| {
            let name = |t: &str| csv_dir.join(format!("export-{JOB}-output{t}-{n}"));
            Tables {
                sessions: create(name("sessions"), "sessionId,userId,userBucket,userStart,country,region,city,start,duration,lat,lon,locale,timezone,timezoneOffset,appVersion,client,sdkVersion,osName,osVersion,deviceModel,browserName,browserVersion,deviceId,priorEvents,priorSessions,priorTimeSpentInApp,priorStates,isDeveloper,isSession,sourcePublisherId,sourcePublisher,sourceSubPublisher,sourceSite,sourceCampaign,sourceAdGroup,sourceAd\n"),
                events: create(name("events"), "eventId,stateId,sessionId,eventName,start,value,info,timeUntilFirstForUser\n"),
                params: create(name("eventparameters"), "eventId,name,value\n"),
                experiments: create(name("experiments"), "experimentId,sessionId,variantId\n"),
            }
        })
        .collect();
    let (mut json_bytes, mut csv_bytes, mut sessions) = (0u64, 0u64, 0u64);
    let mut line = String::new();
    let mut rows = String::new();
    while csv_bytes < csv_size {
        let shard = (sessions as usize) % SHARDS;
        let sid = 1_000_000_000_000_000_000u64 + sessions;
        sessions += 1;
        let t = 1_793_500_000.0 + rng.f64() * 86_400.0;
        let user = rng.u32(..200_000);
        let device = format!("DEV-{user:08X}-4E8F-9DD8-904F07489671");
        line.clear();
        let _ = write!(
            line,
            r#"{{"sessionId":"{sid}","deviceId":"{device}","userId":"user-{user}","time":{t:.3},"isSession":true,"country":"US","region":"CA","city":"San Francisco","locale":"en_US","timezone":"America/Los_Angeles","appVersion":"2.0.1","systemName":"iOS","systemVersion":"17.1","deviceModel":"iPhone15,2","experiments":[{{"id":491150281,"variantId":491150284,"impressed":true}}],"states":[{{"stateId":-3,"events":["#
        );
        let t_csv = &mut csv[shard];
        rows.clear();
        let _ = writeln!(
            rows,
            "{sid},user-{user},7,{t:.3},US,CA,San Francisco,{t:.3},312.5,37.7,-122.4,en_US,America/Los_Angeles,-25200,2.0.1,ios,6.0.0,iOS,17.1,\"iPhone15,2\",,,{device},12,3,1200,4,false,true,,,,,,,"
        );
        t_csv.sessions.write_all(rows.as_bytes()).unwrap();
        csv_bytes += rows.len() as u64;
        rows.clear();
        let _ = writeln!(rows, "491150281,{sid},491150284");
        t_csv.experiments.write_all(rows.as_bytes()).unwrap();
        csv_bytes += rows.len() as u64;
        let app_events = rng.usize(5..=30);
        let msg_events = rng.usize(1..=4);
        for i in 0..app_events + msg_events {
            if i > 0 {
                line.push(',');
            }
            next_event += 1;
            let et = t + rng.f64() * 300.0;
            rows.clear();
            let mut params = String::new();
            if i < msg_events {
                let (pool, actions): (&Vec<u64>, &[&str]) = if rng.bool() {
                    (
                        &ids.0,
                        &[
                            "Open",
                            "Click",
                            "Delivered",
                            "Bounce",
                            "Unsubscribe",
                            "Sent",
                        ],
                    )
                } else {
                    (&ids.1, &["Open", "Delivered", "Bounce", "Held Back"])
                };
                let id = pool[rng.usize(..pool.len())];
                let action = actions[rng.usize(..actions.len())];
                let (p, x) = (rng.u32(..1000), rng.u32(..5));
                let _ = write!(
                    line,
                    r#"{{"eventId":{next_event},"name":".m{id} {action}","time":{et:.3},"value":0.0,"parameters":{{"url":"https://example.com/p/{p}","index":{x}}}}}"#
                );
                let _ = writeln!(rows, "{next_event},-3,{sid},.m{id} {action},{et:.3},0,,");
                let _ = writeln!(params, "{next_event},url,https://example.com/p/{p}");
                let _ = writeln!(params, "{next_event},index,{x}");
            } else {
                let (v, sku, q) = (rng.f64() * 10.0, rng.u32(..100), rng.u32(1..5));
                let _ = write!(
                    line,
                    r#"{{"eventId":{next_event},"name":"Add To Cart","time":{et:.3},"value":{v:.2},"parameters":{{"sku":"A{sku}","qty":{q}}}}}"#
                );
                let _ = writeln!(rows, "{next_event},-3,{sid},Add To Cart,{et:.3},{v:.2},,");
                let _ = writeln!(params, "{next_event},sku,A{sku}");
                let _ = writeln!(params, "{next_event},qty,{q}");
            }
            t_csv.events.write_all(rows.as_bytes()).unwrap();
            t_csv.params.write_all(params.as_bytes()).unwrap();
            csv_bytes += (rows.len() + params.len()) as u64;
        }
        line.push_str("]}]}\n");
        json[shard].write_all(line.as_bytes()).unwrap();
        json_bytes += line.len() as u64;
    }
    for mut w in json {
        w.flush().unwrap();
    }
    for t in csv {
        for mut w in [t.sessions, t.events, t.params, t.experiments] {
            w.flush().unwrap();
        }
    }
    (json_bytes, csv_bytes, sessions)
}

/// The benchmark's config: Segment unreachable (nothing listens on port 9), a spool that never
/// fills.
fn write_config(root: &Path) -> PathBuf {
    let mut c = bench_config(root, "http://127.0.0.1:9");
    c.flush_interval_ms = None;
    c.initial_backoff_ms = Some(1000);
    c.max_backoff_secs = Some(5);
    let config = root.join("config.toml");
    c.write(&config);
    config
}

fn status(config: &Path) -> Option<serde_json::Value> {
    try_status_json(config).ok()
}

fn proc_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Runs the daemon on `root` until its `files` files are read; (elapsed, peak RSS kB, status).
fn run(root: &Path, files: u64) -> (Duration, u64, serde_json::Value) {
    let config = root.join("config.toml");
    let started = Instant::now();
    let mut agent = Agent::start(&config);
    let pid = agent.pid();
    let mut peak = 0;
    let last = loop {
        std::thread::sleep(Duration::from_millis(200));
        peak = peak.max(proc_kb(pid, "VmHWM:"));
        if let Some(s) = status(&config)
            && s["files_done"].as_u64() == Some(files)
        {
            break s;
        }
    };
    let elapsed = started.elapsed();
    peak = peak.max(proc_kb(pid, "VmHWM:"));
    agent.stop_within(Duration::from_secs(3600));
    (elapsed, peak, last)
}

fn main() {
    let (mut size_mb, mut keep, mut only, mut generate_only) = (256u64, None, None, false);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--size-mb" => size_mb = it.next().and_then(|v| v.parse().ok()).unwrap_or(size_mb),
            "--keep" => keep = it.next().map(PathBuf::from),
            "--only" => only = it.next(),
            "--generate-only" => generate_only = true,
            _ => {}
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("lsa-csvbench-")
        .tempdir()
        .unwrap();
    let root = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let (json_root, csv_root) = (root.join("json"), root.join("csv"));
    let t = Instant::now();
    let (json_bytes, csv_bytes, sessions) =
        generate(&json_root.join("in"), &csv_root.join("in"), size_mb << 20);
    write_config(&json_root);
    write_config(&csv_root);
    println!(
        "generated {sessions} sessions: JSON {:.1} MB ({SHARDS} shards), CSV {:.1} MB ({} tables) in {:.1} s",
        json_bytes as f64 / 1e6,
        csv_bytes as f64 / 1e6,
        SHARDS * 4,
        t.elapsed().as_secs_f64()
    );
    if generate_only {
        println!(
            "configs: {}/config.toml, {}/config.toml",
            json_root.display(),
            csv_root.display()
        );
        if keep.is_none() {
            std::mem::forget(tmp);
        }
        return;
    }
    for (name, dir, bytes, files) in [
        ("json", &json_root, json_bytes, SHARDS as u64),
        ("csv", &csv_root, csv_bytes, 4 * SHARDS as u64),
    ] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let (elapsed, peak_kb, s) = run(dir, files);
        println!(
            "{name}: {:.1} s, {:.1} MB/s of its own bytes, {:.0} sessions/s, {} events spooled, {} waiting, peak RSS {:.0} MB",
            elapsed.as_secs_f64(),
            bytes as f64 / 1e6 / elapsed.as_secs_f64(),
            sessions as f64 / elapsed.as_secs_f64(),
            s["spool_events"],
            s["waiting"],
            peak_kb as f64 / 1024.0
        );
    }
}
