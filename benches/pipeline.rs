//! The pipeline benchmark (`cargo bench --bench pipeline -- [--size-mb N] [--gzip-share F]`):
//! generates realistic Leanplum exports, runs the real daemon against a counting
//! Segment-compatible server on loopback, and reports what BENCHMARKS.md records:
//!
//! - parse-only floor: read, decompress, parse and map with the library, no spool;
//! - ingest: MB/s and events/s durably committed to the spool (Segment unreachable meanwhile);
//! - drain: events/s and requests/s from the full spool to the loopback server;
//! - end to end: ingest and drain together, export to accepted events;
//! - for the drain and end to end: the CPU seconds of the agent, of this process (the loopback
//!   server, the polling) and of the `status --json` commands it ran, with the load average;
//! - peak RSS during ingest and with the whole backlog spooled;
//! - restart-to-ready with the backlog spooled (READY=1 on a notify socket), after a `kill -9`
//!   at the end of the ingest and after a clean stop;
//! - spool bytes on disk per event.
//!
//! Options: `--size-mb` export size (default 1024; 7500 gives a backlog of about 5M events),
//! `--gzip-share` fraction of shards gzipped (default 0.25), `--keep DIR` to keep the work
//! directory, `--floor-only` to stop after the parse-only floor (which also prints its CPU
//! time and a CRC-32 of the serialized events, to compare builds, and the CPU of parse, map
//! and serialize on the plain shards held in memory).
//!
//! `--round-trip` runs the round-trip benchmark instead (issue 13): one backlog is spooled
//! (`--size-mb`, default 1024 there too), then for each server delay (`--delays`, ms, default
//! `50,150,300`) and each concurrency (`--modes`, default `4,16,adaptive`) a copy of that spool
//! drains to a server answering every request that much later, for at most `--secs` (default
//! 30) or until the copy is empty: events/s over the run (ramp included) and after its first 5
//! s (`--modes ''` skips these). Then, per delay, an adaptive run (and a fixed 16 one, to
//! compare) drains for `--warmup` s (default 10) or half the backlog, the server switches to
//! 429, and the bench reports how long until
//! at most 2 requests are in flight for good, and the most in flight from 3 s after the switch
//! (observed for 10 s). Retry settings are the defaults (backoff from 500 ms, no
//! `Retry-After`).
//!
//! `--tls h1|h2` (with `--round-trip`) drains to the harness's TLS server instead
//! ([`util::TlsSegmentServer`]: `h1` offers only HTTP/1.1 by ALPN, `h2` offers HTTP/2 first;
//! `h1,h2` runs both in turn for each delay and mode, back to back on the same backlog), the
//! agent trusting its test CA through `segment.ca_file`; the table then also gives the TLS
//! connections the server accepted and the requests' HTTP version, and the 429 part is
//! skipped (it is about the controller, not the transport). Every throughput row gives the
//! agent's CPU seconds (user + system, from `/proc/<pid>/stat`, start-up included).

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The daemon's allocator (`src/main.rs`), so the floor measures the daemon's own path.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use leanplum_segment_agent::bench::{
    floor_stages as floor_stages_of, parse_floor as parse_floor_of, thread_cpu_secs,
};

// The integration tests' harness: its counting Segment server, the agent process, the config
// builder. The benchmark uses a part of it.
mod common;
#[path = "common/cpu.rs"]
mod cpu;
#[allow(dead_code, unused_imports)]
#[path = "../tests/integration/util/mod.rs"]
mod util;

use common::bench_config;

use util::{
    AgentConfig, BIN, Offer, Reply, SegmentServer, TlsSegmentServer, dir_bytes, run_command,
    toml_str, try_status_json,
};

struct Args {
    size_mb: u64,
    gzip_share: f64,
    keep: Option<PathBuf>,
    round_trip: bool,
    delays: Vec<u64>,
    modes: Vec<String>,
    secs: u64,
    warmup: u64,
    floor_only: bool,
    /// `--tls`: the TLS servers to drain to, in turn; empty: plain HTTP.
    tls: Vec<Offer>,
}

fn args() -> Args {
    let mut a = Args {
        size_mb: 1024,
        gzip_share: 0.25,
        keep: None,
        round_trip: false,
        delays: vec![50, 150, 300],
        modes: vec!["4".into(), "16".into(), "adaptive".into()],
        secs: 30,
        warmup: 10,
        floor_only: false,
        tls: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--size-mb" => a.size_mb = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.size_mb),
            "--gzip-share" => {
                a.gzip_share = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(a.gzip_share)
            }
            "--keep" => a.keep = it.next().map(PathBuf::from),
            "--round-trip" => a.round_trip = true,
            "--floor-only" => a.floor_only = true,
            "--delays" => {
                a.delays = it
                    .next()
                    .map(|v| v.split(',').filter_map(|d| d.parse().ok()).collect())
                    .unwrap_or(a.delays)
            }
            "--modes" => {
                a.modes = it
                    .next()
                    .map(|v| {
                        v.split(',')
                            .filter(|m| !m.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or(a.modes)
            }
            "--secs" => a.secs = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.secs),
            "--warmup" => a.warmup = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.warmup),
            "--tls" => {
                let v = it.next().unwrap_or_default();
                a.tls = v
                    .split(',')
                    .map(|o| Offer::parse(o).unwrap_or_else(|| panic!("--tls h1|h2, not {o:?}")))
                    .collect();
            }
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

// ---------------------------------------------------------------------------------------------
// Export generator
// ---------------------------------------------------------------------------------------------

/// Message ids of the shipped catalog, by channel, so the events map.
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

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// One session line: 5 to 30 app events and 1 to 4 message events, like a busy app's export.
fn session(
    rng: &mut fastrand::Rng,
    ids: &(Vec<u64>, Vec<u64>),
    next_event: &mut u64,
    out: &mut String,
) -> u64 {
    use std::fmt::Write as _;
    let t = 1_793_500_000.0 + rng.f64() * 86_400.0;
    let user = rng.u32(..200_000);
    let _ = write!(
        out,
        r#"{{"sessionId":"{}","deviceId":"DEV-{user:08X}-4E8F-9DD8-904F07489671","userId":"user-{user}","time":{t:.6},"isSession":true,"duration":{:.3},"country":"US","region":"CA","city":"San Francisco","locale":"en_US","timezone":"America/Los_Angeles","appVersion":"2.0.1","systemName":"iOS","systemVersion":"17.1","deviceModel":"iPhone15,2","client":"ios","sdkVersion":"6.0.0","userAttributes":{{"plan":"pro","visits":{}}},"experiments":[{{"id":491150281,"variantId":491150284,"impressed":true}}],"states":["#,
        rng.u64(..u64::MAX / 2),
        rng.f64() * 600.0,
        rng.u32(..100),
    );
    let app_events = rng.usize(5..=30);
    let msg_events = rng.usize(1..=4);
    let mut events = 0;
    for s in 0..2 {
        if s > 0 {
            out.push(',');
        }
        let _ = write!(out, r#"{{"stateId":{},"events":["#, rng.i64(..));
        let (a, m) = if s == 0 {
            (app_events / 2, msg_events / 2)
        } else {
            (app_events - app_events / 2, msg_events - msg_events / 2)
        };
        for i in 0..a + m {
            if i > 0 {
                out.push(',');
            }
            *next_event += 1;
            let et = t + rng.f64() * 300.0;
            if i < m {
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
                let _ = write!(
                    out,
                    r#"{{"eventId":{},"name":".m{id} {action}","time":{et:.6},"value":0.0,"parameters":{{"url":"https://example.com/p/{}","index":{}}}}}"#,
                    *next_event,
                    rng.u32(..1000),
                    rng.u32(..5)
                );
                if action != "Sent" && action != "Held Back" {
                    events += 1;
                }
            } else {
                let _ = write!(
                    out,
                    r#"{{"eventId":{},"name":"Add To Cart","time":{et:.6},"value":{:.2},"parameters":{{"sku":"A{}","qty":{}}}}}"#,
                    *next_event,
                    rng.f64() * 10.0,
                    rng.u32(..100),
                    rng.u32(1..5)
                );
            }
        }
        out.push_str("]}");
    }
    out.push_str("]}\n");
    events + 1 // the Experiment Viewed (deduplicated per user later, so an upper bound)
}

/// Writes shards of about 64 MB into `dir` until `size` bytes of (uncompressed) export exist.
/// Returns (bytes of export uncompressed, bytes on disk, shard paths).
fn generate(dir: &Path, size: u64, gzip_share: f64, seed: u64) -> (u64, u64, Vec<PathBuf>) {
    let ids = catalog_ids();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut next_event = 7_000_000_000_000_000_000u64;
    let shard_bytes = 64 << 20;
    let (mut total, mut on_disk, mut shards) = (0u64, 0u64, Vec::new());
    let mut n = 0;
    while total < size {
        let gzip = rng.f64() < gzip_share;
        let name = format!("export-5629499534213120-bench-output-{n}");
        let path = dir.join(&name);
        let mut text = String::with_capacity(shard_bytes + 8192);
        while text.len() < shard_bytes && total + (text.len() as u64) < size {
            session(&mut rng, &ids, &mut next_event, &mut text);
        }
        total += text.len() as u64;
        let tmp = dir.join(format!(".{name}.tmp"));
        if gzip {
            let f = std::fs::File::create(&tmp).unwrap();
            let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            enc.write_all(text.as_bytes()).unwrap();
            enc.finish().unwrap();
        } else {
            std::fs::write(&tmp, text.as_bytes()).unwrap();
        }
        on_disk += std::fs::metadata(&tmp).unwrap().len();
        shards.push((tmp, path));
        n += 1;
    }
    let paths = shards.iter().map(|(_, p)| p.clone()).collect();
    // Renamed into place only when the caller drops them into the watch dir.
    for (tmp, path) in shards {
        std::fs::rename(tmp, path).unwrap();
    }
    (total, on_disk, paths)
}

// ---------------------------------------------------------------------------------------------
// The daemon and the server, from the harness
// ---------------------------------------------------------------------------------------------

/// The harness's server in counting mode: every `POST /v1/batch` answered 200 (or the default
/// set: 503 while "down", 429 in the round-trip benchmark), events counted by `"messageId"`.
fn counting_server() -> SegmentServer {
    SegmentServer::start_counting()
}

/// Events and requests the server accepted so far.
fn accepted(server: &SegmentServer) -> (u64, u64) {
    (
        server.accepted_count() as u64,
        server.accepted_requests().len() as u64,
    )
}

/// Events the server accepted so far (cheap: nothing copied).
fn accepted_events(server: &SegmentServer) -> u64 {
    server.accepted_count() as u64
}

/// The benchmark's config: fast timers, 4 requests at once, a spool that never fills.
fn write_config(root: &Path, server: &SegmentServer) -> PathBuf {
    let mut c = bench_config(root, &server.url());
    c.concurrency = Some(4);
    c.max_backoff_secs = Some(1);
    let config = root.join("config.toml");
    c.write(&config);
    config
}

/// The daemon, with its pid's memory figures.
struct Agent {
    agent: util::Agent,
    config: PathBuf,
}

impl Agent {
    fn start(config: &Path, notify: Option<&Path>) -> Agent {
        let mut cmd = run_command(BIN, config);
        if let Some(n) = notify {
            cmd.env("NOTIFY_SOCKET", n);
        }
        Agent {
            agent: util::Agent::spawn(cmd, config),
            config: config.to_owned(),
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        try_status_json(&self.config).ok()
    }

    fn rss_peak_kb(&self) -> u64 {
        proc_status_kb(self.agent.pid(), "VmHWM:")
    }

    fn rss_kb(&self) -> u64 {
        proc_status_kb(self.agent.pid(), "VmRSS:")
    }

    fn stop(mut self) {
        self.agent.stop_within(Duration::from_secs(3600));
    }

    fn kill(mut self) {
        self.agent.kill();
    }

    /// The daemon's CPU time so far, all threads.
    fn cpu(&self) -> Duration {
        cpu::cpu_time(&format!("/proc/{}/stat", self.agent.pid()))
    }
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn du(path: &Path) -> u64 {
    dir_bytes(path)
}

/// The time of the last line of `logs` holding `needle`, by its timestamp (UTC, RFC 3339 as
/// the agent writes it).
fn last_logged(logs: &str, needle: &str) -> Option<std::time::SystemTime> {
    let line = logs.lines().rfind(|l| l.contains(needle))?;
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (day, clock) = stamp.split_once('T')?;
    let mut d = day.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    // Days since 1970-01-01 (the civil-from-days inverse, proleptic Gregorian).
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + dd - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let secs = days * 86_400 + t.next()?? * 3600 + t.next()?? * 60 + t.next()??;
    let nanos: u32 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    Some(std::time::UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, nanos))
}

fn field(v: &serde_json::Value, name: &str) -> u64 {
    v[name].as_u64().unwrap_or(0)
}

/// Polls `status --json` until `done` holds; returns the last report.
fn wait_status(
    agent: &Agent,
    mut done: impl FnMut(&serde_json::Value) -> bool,
    mut tick: impl FnMut(),
) -> serde_json::Value {
    loop {
        tick();
        if let Some(s) = agent.status()
            && done(&s)
        {
            return s;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------

/// The parse floor: (wall time, CPU time of this thread, events, serialized bytes, CRC-32 of
/// every serialized event in order: the same export must give the same bytes).
fn parse_floor(paths: &[PathBuf]) -> (Duration, Duration, u64, u64, u32) {
    let start = Instant::now();
    let cpu_start = thread_cpu_secs();
    let mut digest = crc32fast::Hasher::new();
    let (mut events, mut bytes) = (0u64, 0u64);
    parse_floor_of(paths, &repo("examples/catalog"), |json| {
        bytes += json.len() as u64;
        events += 1;
        digest.update(json);
    })
    .unwrap();
    // On a loaded machine the wall time of the floor says more about the neighbours than the
    // code: the thread's own CPU time is printed beside it.
    let cpu = Duration::from_secs_f64(thread_cpu_secs() - cpu_start);
    (start.elapsed(), cpu, events, bytes, digest.finalize())
}

/// With `--floor-only`: where the floor's CPU goes, on the plain shards held in memory
/// (reading and framing excluded).
fn floor_stages(shards: &[PathBuf]) {
    let plain: Vec<PathBuf> = shards
        .iter()
        .filter(|p| {
            let mut magic = [0u8; 2];
            std::fs::File::open(p)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .is_ok_and(|()| magic != [0x1f, 0x8b])
        })
        .cloned()
        .collect();
    let bytes: u64 = plain
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let stages = floor_stages_of(&plain, &repo("examples/catalog")).unwrap();
    let names = ["parse", "parse + map", "parse + map + serialize"];
    for ((cpu, crc), name) in stages.iter().zip(names) {
        println!(
            "  in memory, {name}: {:.3} s CPU, {:.1} MB per CPU second{}",
            cpu,
            mb(bytes) / cpu.max(1e-3),
            if *crc != 0 {
                format!(" (events CRC-32 {crc:08x})")
            } else {
                String::new()
            }
        );
    }
}

/// CPU seconds spent during one phase: by the agent, by the bench process (its loopback
/// Segment server and its polling) and by the `status --json` commands it ran meanwhile. On 2
/// shared cores these compare builds where wall clock cannot.
struct PhaseCpu {
    agent_pid: u32,
    agent: Duration,
    bench: Duration,
    children: Duration,
    loadavg: String,
}

impl PhaseCpu {
    fn start(agent: &Agent) -> PhaseCpu {
        let pid = agent.agent.pid();
        let (bench, children) = cpu::stat_cpu("/proc/self/stat");
        PhaseCpu {
            agent_pid: pid,
            agent: cpu::cpu_time(&format!("/proc/{pid}/stat")),
            bench,
            children,
            loadavg: std::fs::read_to_string("/proc/loadavg").unwrap_or_default(),
        }
    }

    /// One line: the CPU seconds since `start` (the agent still running) and the load then.
    fn report(&self, phase: &str) -> String {
        let agent = cpu::cpu_time(&format!("/proc/{}/stat", self.agent_pid));
        let (bench, children) = cpu::stat_cpu("/proc/self/stat");
        format!(
            "{phase} CPU: agent {:.2} s, bench {:.2} s (server and polling), status commands {:.2} s; load at start {}",
            agent.saturating_sub(self.agent).as_secs_f64(),
            bench.saturating_sub(self.bench).as_secs_f64(),
            children.saturating_sub(self.children).as_secs_f64(),
            self.loadavg
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        )
    }
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn main() {
    let a = args();
    if a.round_trip {
        return round_trip::run(&a);
    }
    let root = match &a.keep {
        Some(d) => {
            std::fs::create_dir_all(d).unwrap();
            d.clone()
        }
        None => std::env::temp_dir().join(format!("lsa-bench-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("gen")).unwrap();
    std::fs::create_dir_all(root.join("in")).unwrap();
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        BIN
    );

    let t = Instant::now();
    let (export_bytes, disk_bytes, shards) =
        generate(&root.join("gen"), a.size_mb << 20, a.gzip_share, 42);
    println!(
        "generated {} shards: {:.0} MB of export ({:.0} MB on disk, {:.0}% gzipped shards) in {:.1?}",
        shards.len(),
        mb(export_bytes),
        mb(disk_bytes),
        a.gzip_share * 100.0,
        t.elapsed()
    );

    // 1. Parse-only floor (one core, one record after the other: the daemon parses a file on
    // every core, see `ingest/parallel.rs`).
    let (d, cpu, floor_events, event_bytes, digest) = parse_floor(&shards);
    let floor_mbs = mb(export_bytes) / d.as_secs_f64();
    println!(
        "parse-only floor: {:.1} MB/s, {:.0} events/s ({} events, {:.1?}); per CPU second of the thread: {:.1} MB/s ({:.1?} CPU); events CRC-32 {:08x}",
        floor_mbs,
        floor_events as f64 / d.as_secs_f64(),
        floor_events,
        d,
        mb(export_bytes) / cpu.as_secs_f64().max(0.01),
        cpu,
        digest
    );
    if a.floor_only {
        floor_stages(&shards);
        if a.keep.is_none() {
            let _ = std::fs::remove_dir_all(&root);
        }
        return;
    }

    // 2. Ingest with Segment down: durable commits only.
    let server = counting_server();
    server.set_default(Reply::status(503));
    let config = write_config(&root, &server);
    let agent = Agent::start(&config, None);
    wait_status(&agent, |s| s["state"].is_string(), || {});
    let t = Instant::now();
    let t_wall = std::time::SystemTime::now();
    for p in &shards {
        std::fs::rename(p, root.join("in").join(p.file_name().unwrap())).unwrap();
    }
    let mut rss_ingest = 0;
    // RSS against the backlog while it grows: it must stay flat (SPEC 7, bounded memory).
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let mut last_sample = Instant::now();
    let s = loop {
        rss_ingest = rss_ingest.max(agent.rss_kb());
        if let Some(s) = agent.status() {
            if last_sample.elapsed() >= Duration::from_secs(2) {
                samples.push((field(&s, "spool_events"), agent.rss_kb()));
                last_sample = Instant::now();
            }
            if field(&s, "files_done") + field(&s, "files_failed") >= shards.len() as u64 {
                break s;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The end is the agent's own time of its last "file ingested" line; the poll that saw it
    // came up to 200 ms (and a status command) later.
    let polled = t.elapsed();
    let ingest = last_logged(&agent.agent.logs(), "file ingested")
        .and_then(|end| end.duration_since(t_wall).ok())
        .unwrap_or(polled);
    let spooled = field(&s, "spool_events");
    println!(
        "ingest (Segment down): {:.1} MB/s, {:.0} events/s durably spooled ({} events, {:.2?}); {:.0}% of the parse floor; {:.1} MB/s by the status poll that saw it ({:.2?})",
        mb(export_bytes) / ingest.as_secs_f64(),
        spooled as f64 / ingest.as_secs_f64(),
        spooled,
        ingest,
        100.0 * (mb(export_bytes) / ingest.as_secs_f64()) / floor_mbs,
        mb(export_bytes) / polled.as_secs_f64(),
        polled
    );
    let spool_disk = du(&root.join("spool"));
    println!(
        "spool on disk: {:.0} MB for {} events = {:.0} bytes/event; serialized events {:.0} bytes/event ({:.2}x)",
        mb(spool_disk),
        spooled,
        spool_disk as f64 / spooled.max(1) as f64,
        field(&s, "spool_bytes") as f64 / spooled.max(1) as f64,
        spool_disk as f64 / field(&s, "spool_bytes").max(1) as f64
    );
    println!(
        "peak RSS during ingest: {} MB (VmHWM {} MB)",
        rss_ingest / 1024,
        agent.rss_peak_kb() / 1024
    );
    println!("RSS with the backlog spooled: {} MB", agent.rss_kb() / 1024);
    println!("RSS while the backlog grew (events spooled -> RSS MB):");
    for (events, rss) in &samples {
        println!("  {events:>10} -> {}", rss / 1024);
    }

    // 3. Restart-to-ready with the backlog spooled: first after a crash (`kill -9` as the
    // ingest ends: nothing checkpointed at exit), then after a clean stop (the agent
    // checkpoints the spool on its way out).
    let notify_path = root.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let start_until_ready = || {
        let t = Instant::now();
        let agent = Agent::start(&config, Some(&notify_path));
        let mut buf = [0u8; 4096];
        loop {
            let n = notify.recv(&mut buf).unwrap();
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
        }
        (agent, t.elapsed())
    };
    agent.kill();
    let (agent, ready) = start_until_ready();
    println!("restart to READY=1 after kill -9, {spooled} events spooled: {ready:.2?}");
    let t = Instant::now();
    agent.stop();
    println!(
        "stop (SIGTERM to exit) with {} events spooled: {:.2?}",
        spooled,
        t.elapsed()
    );
    let (agent, ready) = start_until_ready();
    println!("restart to READY=1 after a clean stop, {spooled} events spooled: {ready:.2?}");

    // 4. Drain from the full spool.
    let cpu = PhaseCpu::start(&agent);
    let t = Instant::now();
    server.set_default(Reply::ok());
    let mut rss_drain = 0;
    wait_status(
        &agent,
        |s| field(s, "spool_events") == 0,
        || rss_drain = rss_drain.max(agent.rss_kb()),
    );
    let drain = t.elapsed();
    let (events, requests) = accepted(&server);
    println!(
        "drain: {:.0} events/s, {:.0} requests/s ({} events in {} requests, {:.1?}); peak RSS while draining {} MB",
        events as f64 / drain.as_secs_f64(),
        requests as f64 / drain.as_secs_f64(),
        events,
        requests,
        drain,
        rss_drain / 1024
    );
    println!("{}", cpu.report("drain"));
    let after = du(&root.join("spool"));
    println!("spool on disk after draining: {:.0} MB", mb(after));
    agent.stop();

    // 5. End to end: a fresh spool, Segment up, the export dropped in.
    let _ = std::fs::remove_dir_all(root.join("spool"));
    let _ = std::fs::remove_dir_all(root.join("in"));
    std::fs::create_dir_all(root.join("in")).unwrap();
    let gen2 = root.join("gen2");
    std::fs::create_dir_all(&gen2).unwrap();
    let (_, _, shards2) = generate(&gen2, a.size_mb << 20, a.gzip_share, 43);
    let server2 = counting_server();
    let config2 = write_config(&root, &server2);
    let agent = Agent::start(&config2, None);
    wait_status(&agent, |s| s["state"].is_string(), || {});
    let cpu = PhaseCpu::start(&agent);
    let t = Instant::now();
    for p in &shards2 {
        std::fs::rename(p, root.join("in").join(p.file_name().unwrap())).unwrap();
    }
    let mut rss_e2e = 0;
    let s = wait_status(
        &agent,
        |s| field(s, "files_done") >= shards2.len() as u64 && field(s, "spool_events") == 0,
        || rss_e2e = rss_e2e.max(agent.rss_kb()),
    );
    // The end is the server's answer to the last request it accepted; the poll that saw the
    // spool empty came up to 200 ms (and a status command) later.
    let polled = t.elapsed();
    let e2e = server2
        .accepted_requests()
        .iter()
        .filter_map(|r| r.answered_at)
        .max()
        .map_or(polled, |end| end.duration_since(t));
    // Nothing failed, so every event spooled was sent once: the server's count proves it.
    let ((accepted, requests), spooled) = (accepted(&server2), field(&s, "events_spooled"));
    println!(
        "end to end: {:.0} MB of export delivered in {:.2?} ({:.1} MB/s by the last answer, {:.1} MB/s by the status poll that saw the spool empty; {} events accepted in {} requests{}); peak RSS {} MB",
        mb(export_bytes),
        e2e,
        mb(export_bytes) / e2e.as_secs_f64(),
        mb(export_bytes) / polled.as_secs_f64(),
        accepted,
        requests,
        if accepted == spooled {
            ", every event spooled once".to_string()
        } else {
            format!(", BUT {spooled} SPOOLED")
        },
        rss_e2e / 1024
    );
    println!("{}", cpu.report("end to end"));
    agent.stop();
    let _ = event_bytes;
    if a.keep.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
}

// ---------------------------------------------------------------------------------------------
// The round-trip benchmark (`--round-trip`)
// ---------------------------------------------------------------------------------------------

mod round_trip {
    use super::*;

    /// A config for one run: the endpoint `url` (trusting `ca_file` when given), the spool
    /// `spool`, concurrency `concurrency` (a number or "adaptive"), every other delivery and
    /// retry setting at its default.
    fn config(
        root: &Path,
        url: &str,
        ca_file: Option<&Path>,
        spool: &Path,
        concurrency: &str,
    ) -> PathBuf {
        let mut c = bench_config(root, url);
        c.flush_interval_ms = None;
        c.initial_backoff_ms = None;
        c.max_backoff_secs = None;
        c.watch_dir = root.join("rt-in");
        c.settle_secs = None;
        c.rescan_interval_secs = None;
        c.spool_dir = spool.to_owned();
        c.control_socket = root.join("rt.sock");
        let c = match concurrency.parse::<u64>() {
            Ok(n) => AgentConfig {
                concurrency: Some(n),
                ..c
            },
            Err(_) => c.with_extra("segment", &format!("concurrency = {concurrency:?}")),
        };
        let c = match ca_file {
            Some(ca) => c.with_extra(
                "segment",
                &format!("ca_file = {}", toml_str(ca.to_str().unwrap())),
            ),
            None => c,
        };
        let path = root.join("rt-config.toml");
        c.write(&path);
        path
    }

    /// When the server received its first request.
    fn first_request(server: &SegmentServer) -> Option<Instant> {
        server.requests().first().map(|r| r.received_at)
    }

    /// Every change of the number of requests in flight at the server (read, not yet
    /// answered), with its time.
    fn in_flight_changes(server: &SegmentServer) -> Vec<(Instant, u64)> {
        let mut steps: Vec<(Instant, i64)> = Vec::new();
        for r in server.requests() {
            steps.push((r.received_at, 1));
            if let Some(at) = r.answered_at {
                steps.push((at, -1));
            }
        }
        steps.sort_by_key(|(at, _)| *at);
        let mut n = 0i64;
        steps
            .into_iter()
            .map(|(at, step)| {
                n += step;
                (at, n.max(0) as u64)
            })
            .collect()
    }

    fn copy_spool(master: &Path, to: &Path) {
        let _ = std::fs::remove_dir_all(to);
        let ok = Command::new("cp")
            .arg("-a")
            .arg(master)
            .arg(to)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cp -a {} {}", master.display(), to.display());
    }

    /// The server a throughput run drains to: the counting one on plain HTTP, or the TLS one.
    enum Drain {
        Plain(SegmentServer),
        Tls(TlsSegmentServer),
    }

    impl Drain {
        fn start(tls: Option<Offer>) -> Drain {
            match tls {
                Some(offer) => Drain::Tls(TlsSegmentServer::start_counting(offer)),
                None => Drain::Plain(counting_server()),
            }
        }

        fn set_delay(&self, delay: Duration) {
            match self {
                Drain::Plain(s) => s.set_delay(delay),
                Drain::Tls(s) => s.set_delay(delay),
            }
        }

        fn url(&self) -> String {
            match self {
                Drain::Plain(s) => s.url(),
                Drain::Tls(s) => s.url(),
            }
        }

        fn accepted_events(&self) -> u64 {
            match self {
                Drain::Plain(s) => accepted_events(s),
                Drain::Tls(s) => s.accepted_count(),
            }
        }

        fn first_request(&self) -> Option<Instant> {
            match self {
                Drain::Plain(s) => first_request(s),
                Drain::Tls(s) => s.first_request(),
            }
        }

        /// TLS connections by ALPN protocol and requests by HTTP version, for the table.
        fn protocols(&self) -> String {
            match self {
                Drain::Plain(_) => "plain HTTP/1.1".into(),
                Drain::Tls(s) => {
                    let show = |m: std::collections::BTreeMap<String, u64>| {
                        m.iter()
                            .map(|(k, v)| format!("{v} {k}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    format!(
                        "connections: {}; requests: {}",
                        show(s.connections()),
                        show(s.versions())
                    )
                }
            }
        }
    }

    struct Throughput {
        events_per_sec: f64,
        after_5s: Option<f64>,
        events: u64,
        secs: f64,
        drained: bool,
        last_limit: Option<u64>,
        rtt_ms: Option<f64>,
        agent_cpu: Duration,
        protocols: String,
    }

    /// Drains a copy of the master spool to a server `delay_ms` away (over TLS with `tls`),
    /// for at most `secs` or until `total` events arrived.
    fn throughput(
        root: &Path,
        master: &Path,
        total: u64,
        delay_ms: u64,
        mode: &str,
        secs: u64,
        tls: Option<Offer>,
    ) -> Throughput {
        let spool = root.join("rt-spool");
        copy_spool(master, &spool);
        let server = Drain::start(tls);
        server.set_delay(Duration::from_millis(delay_ms));
        let ca_file = root.join("rt-ca.pem");
        if let Drain::Tls(s) = &server {
            std::fs::write(&ca_file, s.ca_pem()).unwrap();
        }
        let ca_file = tls.map(|_| ca_file.as_path());
        let cfg = config(root, &server.url(), ca_file, &spool, mode);
        let agent = Agent::start(&cfg, None);
        let cap = Duration::from_secs(secs);
        let mut samples: Vec<(Instant, u64)> = Vec::new();
        let mut first = None;
        let mut status_at = Instant::now();
        let (mut last_limit, mut rtt_ms) = (None, None);
        let drained = loop {
            std::thread::sleep(Duration::from_millis(100));
            let events = server.accepted_events();
            let now = Instant::now();
            samples.push((now, events));
            if status_at.elapsed() >= Duration::from_secs(2)
                && let Some(s) = agent.status()
            {
                last_limit = s["concurrency_limit"].as_u64();
                rtt_ms = s["rtt_ms"].as_f64();
                status_at = Instant::now();
            }
            if events >= total {
                break true;
            }
            // Looked up until the first request arrived (the log is copied to look).
            first = first.or_else(|| server.first_request());
            if first.is_some_and(|f| now.duration_since(f) >= cap) {
                break false;
            }
        };
        let agent_cpu = agent.cpu();
        agent.kill();
        let start = server.first_request().expect("a request arrived");
        let (end, events) = *samples.last().unwrap();
        let span = end.duration_since(start).as_secs_f64();
        let after_5s = samples
            .iter()
            .find(|(t, _)| t.duration_since(start) >= Duration::from_secs(5))
            .filter(|(t, _)| end.duration_since(*t) >= Duration::from_secs(3))
            .map(|(t, e)| (events - e) as f64 / end.duration_since(*t).as_secs_f64());
        Throughput {
            events_per_sec: events as f64 / span,
            after_5s,
            events,
            secs: span,
            drained,
            last_limit,
            rtt_ms,
            agent_cpu,
            protocols: server.protocols(),
        }
    }

    struct Backoff {
        /// Switch to the moment the server saw at most 2 in flight for good.
        settled: Duration,
        in_flight_at_switch: u64,
        peak_after_3s: u64,
        limit_before: Option<u64>,
        limit_after: Option<u64>,
    }

    /// Drains for `warmup`, switches the server to 429, watches the requests in flight.
    fn after_429(
        root: &Path,
        master: &Path,
        total: u64,
        delay_ms: u64,
        mode: &str,
        warmup: u64,
    ) -> Backoff {
        let spool = root.join("rt-spool");
        copy_spool(master, &spool);
        let server = counting_server();
        server.set_delay(Duration::from_millis(delay_ms));
        let cfg = config(root, &server.url(), None, &spool, mode);
        let agent = Agent::start(&cfg, None);
        // Switch while there is plenty left to send: after `warmup`, or once half the
        // backlog arrived.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(warmup) && accepted_events(&server) < total / 2 {
            std::thread::sleep(Duration::from_millis(50));
        }
        let limit_before = agent.status().and_then(|s| s["concurrency_limit"].as_u64());
        let switch = Instant::now();
        server.set_default(Reply::status(429));
        let in_flight_at_switch = server
            .requests()
            .iter()
            .filter(|r| r.answered_at.is_none())
            .count() as u64;
        let observe = Duration::from_secs(10);
        std::thread::sleep(observe);
        let limit_after = agent.status().and_then(|s| s["concurrency_limit"].as_u64());
        agent.kill();
        let changes = in_flight_changes(&server);
        let after: Vec<&(Instant, u64)> = changes
            .iter()
            .filter(|(t, _)| *t >= switch && t.duration_since(switch) <= observe)
            .collect();
        // The first change after the last time more than 2 were in flight.
        let settled = match after.iter().rposition(|(_, n)| *n > 2) {
            Some(i) => after
                .get(i + 1)
                .map_or(observe, |(t, _)| t.duration_since(switch)),
            None => Duration::ZERO,
        };
        let peak_after_3s = after
            .iter()
            .filter(|(t, _)| t.duration_since(switch) >= Duration::from_secs(3))
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        Backoff {
            settled,
            in_flight_at_switch,
            peak_after_3s,
            limit_before,
            limit_after,
        }
    }

    pub fn run(a: &Args) {
        let root = match &a.keep {
            Some(d) => d.clone(),
            None => std::env::temp_dir().join(format!("lsa-rt-bench-{}", std::process::id())),
        };
        let _ = std::fs::remove_dir_all(&root);
        for d in ["gen", "in", "rt-in"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        println!(
            "machine: {} cores, {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            BIN
        );

        // One backlog, spooled once with Segment down, copied for every run.
        let (export_bytes, _, shards) =
            generate(&root.join("gen"), a.size_mb << 20, a.gzip_share, 42);
        let server = counting_server();
        server.set_default(Reply::status(503));
        let cfg = write_config(&root, &server);
        let agent = Agent::start(&cfg, None);
        wait_status(&agent, |s| s["state"].is_string(), || {});
        for p in &shards {
            std::fs::rename(p, root.join("in").join(p.file_name().unwrap())).unwrap();
        }
        let s = wait_status(
            &agent,
            |s| field(s, "files_done") + field(s, "files_failed") >= shards.len() as u64,
            || {},
        );
        let total = field(&s, "spool_events");
        agent.stop();
        let _ = std::fs::remove_dir_all(root.join("gen"));
        let master = root.join("spool");
        println!(
            "backlog: {total} events from {:.0} MB of export, {:.0} MB spooled",
            mb(export_bytes),
            mb(du(&master))
        );

        println!(
            "\n| delay | concurrency | events/s (run) | events/s after 5 s | events | s | drained | limit at end | rtt_ms | agent CPU s | CPU s per 1M events | protocols |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for &delay in &a.delays {
            for mode in &a.modes {
                let servers: Vec<Option<Offer>> = if a.tls.is_empty() {
                    vec![None]
                } else {
                    a.tls.iter().copied().map(Some).collect()
                };
                for tls in servers {
                    let t = throughput(&root, &master, total, delay, mode, a.secs, tls);
                    println!(
                        "| {delay} ms | {mode} | {:.0} | {} | {} | {:.1} | {} | {} | {} | {:.2} | {:.2} | {} |",
                        t.events_per_sec,
                        t.after_5s.map_or("-".into(), |r| format!("{r:.0}")),
                        t.events,
                        t.secs,
                        if t.drained { "yes" } else { "no" },
                        t.last_limit.map_or("-".into(), |l| l.to_string()),
                        t.rtt_ms.map_or("-".into(), |r| format!("{r:.1}")),
                        t.agent_cpu.as_secs_f64(),
                        t.agent_cpu.as_secs_f64() / (t.events.max(1) as f64 / 1e6),
                        t.protocols,
                    );
                }
            }
        }

        // The 429 part is about the controller, not the transport: plain HTTP only.
        if !a.tls.is_empty() {
            if a.keep.is_none() {
                let _ = std::fs::remove_dir_all(&root);
            }
            return;
        }
        println!(
            "\n| delay | concurrency | limit before | in flight at the switch | until <= 2 in flight | most in flight 3-10 s after | limit after 10 s |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        for &delay in &a.delays {
            for mode in ["adaptive", "16"] {
                let b = after_429(&root, &master, total, delay, mode, a.warmup);
                println!(
                    "| {delay} ms | {mode} | {} | {} | {:.2} s | {} | {} |",
                    b.limit_before.map_or("-".into(), |l| l.to_string()),
                    b.in_flight_at_switch,
                    b.settled.as_secs_f64(),
                    b.peak_after_3s,
                    b.limit_after.map_or("-".into(), |l| l.to_string()),
                );
            }
        }
        if a.keep.is_none() {
            let _ = std::fs::remove_dir_all(&root);
        }
    }
}
