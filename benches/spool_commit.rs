//! The spool alone (`cargo bench --bench spool_commit -- [EVENTS] [CACHE_MB] [CHUNK]`): commits
//! chunks of CHUNK events (default 8000, as the ingest does; 2000 before session 6) of ~620
//! bytes the way the ingest does (one transaction each, flushed and fsynced), then drains them
//! the way the drain does (peek a batch, ack it), printing throughput, the process's CPU time
//! for the commits and its RSS as the backlog grows and shrinks.

use std::path::Path;
use std::time::Instant;

use leanplum_segment_agent::spool::{Chunk, FileRecord, Spool, SpoolEvent};

#[path = "common/cpu.rs"]
mod cpu;

fn rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// CPU time (user + system) of this process so far, in ms.
fn process_cpu_ms() -> u64 {
    cpu::cpu_time("/proc/self/stat").as_millis() as u64
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(200_000) as usize;
    let cache_mb = args.get(1).copied().unwrap_or(32);
    let chunk = args.get(2).copied().unwrap_or(8000).max(1) as usize;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), cache_mb << 20).unwrap();
    let fid = spool
        .ledger()
        .begin(Path::new("f"), &FileRecord::default())
        .unwrap();
    println!(
        "spool_commit: {n} events in chunks of {chunk}, sled cache {cache_mb} MB; RSS at start {} MB",
        rss_mb()
    );
    let pad = "x".repeat(580);
    let t = Instant::now();
    let cpu = process_cpu_ms();
    // The slowest single commit, and where: a growth of the dedupe table happens inside one.
    let mut slowest = (std::time::Duration::ZERO, 0usize);
    for start in (0..n).step_by(chunk) {
        let events = (start..(start + chunk).min(n))
            .map(|i| {
                SpoolEvent::new(
                    format!("lp-e-{}", 7_000_000_000_000_000_000u64 + i as u64),
                    format!("{{\"messageId\":\"lp-e-{i}\",\"pad\":\"{pad}\"}}").into_bytes(),
                    None,
                )
            })
            .collect();
        let one = Instant::now();
        spool
            .commit_file_chunk(&Chunk {
                file_id: fid,
                events,
                ..Chunk::default()
            })
            .unwrap();
        if one.elapsed() > slowest.0 {
            slowest = (one.elapsed(), start);
        }
        if start % (n / 5).max(chunk) < chunk {
            println!("  {start:>9} spooled, RSS {} MB", rss_mb());
        }
    }
    let d = t.elapsed();
    println!(
        "commit: {:.0} events/s ({n} in {d:.2?}, {} ms of CPU); RSS {} MB; {} MB on disk; slowest commit {:.2?} at {} events",
        n as f64 / d.as_secs_f64(),
        process_cpu_ms() - cpu,
        rss_mb(),
        spool.disk_bytes() >> 20,
        slowest.0,
        slowest.1
    );
    let t = Instant::now();
    let mut drained = 0;
    loop {
        let batch = spool.queue().peek(None, 2500, 475_000).unwrap().items;
        if batch.is_empty() {
            break;
        }
        drained += batch.len();
        spool.queue().ack(&batch).unwrap();
    }
    let d = t.elapsed();
    println!(
        "peek + ack: {:.0} events/s ({drained} in {d:.2?}); RSS {} MB",
        drained as f64 / d.as_secs_f64(),
        rss_mb()
    );
}
