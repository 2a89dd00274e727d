use leanplum_segment_agent::spool::*;
use std::path::Path;
use std::time::Instant;
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 32 << 20).unwrap();
    let fid = spool
        .begin_file(Path::new("f"), &FileRecord::default())
        .unwrap();
    let t = Instant::now();
    let n = 100_000;
    for start in (0..n).step_by(2000) {
        let events = (start..start + 2000)
            .map(|i| SpoolEvent {
                message_id: format!("lp-e-{i}"),
                json: format!(
                    "{{\"messageId\":\"lp-e-{i}\",\"pad\":\"{}\"}}",
                    "x".repeat(600)
                )
                .into_bytes(),
            })
            .collect();
        spool
            .commit_file_chunk(&Chunk {
                file_id: fid,
                events,
                ..Chunk::default()
            })
            .unwrap();
    }
    let d = t.elapsed();
    println!(
        "{} events committed in {:?}: {:.0} events/s",
        n,
        d,
        n as f64 / d.as_secs_f64()
    );
}
