//! Spool unit tests against a real sled in a temp dir.

use super::*;
use crate::clock::now_ms;
use crate::spool::letters::message_id_of;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

fn open(dir: &Path) -> Spool {
    Spool::open(dir, 8 << 20).expect("open spool")
}

/// Begins file `f` in `spool`; its id.
fn begin_f(spool: &Spool) -> u64 {
    spool
        .ledger()
        .begin(Path::new("f"), &file_record("f"))
        .unwrap()
}

fn file_record(path: &str) -> FileRecord {
    FileRecord {
        path: path.into(),
        ..FileRecord::default()
    }
}

fn event(id: &str) -> SpoolEvent {
    SpoolEvent::new(
        id.into(),
        format!("{{\"messageId\":\"{id}\"}}").into_bytes(),
        None,
    )
}

/// A new file `name` and one chunk of `events` in it; the file's id.
fn file_with(spool: &Spool, name: &str, events: Vec<SpoolEvent>) -> u64 {
    let fid = new_file(spool, name);
    spool
        .commit_file_chunk(&Chunk {
            file_id: fid,
            events,
            ..Chunk::default()
        })
        .unwrap();
    fid
}

fn ids(items: &[Queued]) -> Vec<String> {
    items.iter().map(|q| message_id_of(&q.json)).collect()
}

#[test]
fn chunks_commit_events_and_offset_together_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let fid;
    {
        let spool = open(dir.path());
        fid = spool
            .ledger()
            .begin(Path::new("a/b"), &file_record("a/b"))
            .unwrap();
        let out = spool
            .commit_file_chunk(&Chunk {
                file_id: fid,
                offset: 120,
                line: 3,
                events: vec![event("e1"), event("e2"), event("e1")],
                ..Chunk::default()
            })
            .unwrap();
        assert_eq!(out.spooled, 2);
        assert_eq!(out.duplicates, 1);
    }
    let spool = open(dir.path());
    let (id, rec) = spool
        .ledger()
        .file_by_path(Path::new("a/b"))
        .unwrap()
        .unwrap();
    assert_eq!(id, fid);
    assert_eq!((rec.offset, rec.line, rec.pending), (120, 3, 2));
    assert_eq!(spool.queue().depth().unwrap().events, 2);
    let q = spool.queue().peek(None, 10, 1 << 20).unwrap().items;
    assert_eq!(ids(&q), ["e1", "e2"]);
}

#[test]
fn fifo_order_across_chunks_and_ack_removes() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let fid = begin_f(&spool);
    for n in 0..5 {
        let events = (0..300).map(|i| event(&format!("e{n}-{i:03}"))).collect();
        spool
            .commit_file_chunk(&Chunk {
                file_id: fid,
                offset: n,
                events,
                file_done: n == 4,
                ..Chunk::default()
            })
            .unwrap();
    }
    // Keys above 255 must still sort after smaller ones (big-endian keys).
    let all = spool.queue().peek(None, 10_000, usize::MAX).unwrap().items;
    assert_eq!(all.len(), 1500);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(message_id_of(&all[299].json), "e0-299");
    assert_eq!(message_id_of(&all[300].json), "e1-000");
    // Reading after a cursor continues where the last batch ended.
    let first = spool.queue().peek(None, 100, usize::MAX).unwrap().items;
    let second = spool
        .queue()
        .peek(Some(first[99].key), 100, usize::MAX)
        .unwrap()
        .items;
    assert_eq!(message_id_of(&second[0].json), "e0-100");
    let done = spool.queue().ack(&all[..1499]).unwrap();
    assert!(done.is_empty(), "one event of the file is still pending");
    let done = spool.queue().ack(&all[1499..]).unwrap();
    assert_eq!(done, vec![fid]);
    assert_eq!(spool.queue().depth().unwrap(), Depth::default());
    assert!(spool.queue().peek(None, 10, 1000).unwrap().items.is_empty());
}

#[test]
fn peek_respects_the_byte_budget_but_always_returns_one() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let fid = begin_f(&spool);
    let events = (0..10).map(|i| event(&format!("e{i}"))).collect();
    spool
        .commit_file_chunk(&Chunk {
            file_id: fid,
            events,
            ..Chunk::default()
        })
        .unwrap();
    let one = spool.queue().peek(None, 10, 1).unwrap().items;
    assert_eq!(one.len(), 1);
    let len = one[0].json.len() + 1;
    assert_eq!(
        spool.queue().peek(None, 10, len * 3).unwrap().items.len(),
        3
    );
    assert_eq!(
        spool.queue().peek(None, 4, usize::MAX).unwrap().items.len(),
        4
    );
}

#[test]
fn refused_events_are_dead_lettered_not_queued() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let fid = begin_f(&spool);
    let big = SpoolEvent {
        refused: Some("too big".into()),
        ..event("big")
    };
    let out = spool
        .commit_file_chunk(&Chunk {
            file_id: fid,
            events: vec![event("a"), big, event("b")],
            ..Chunk::default()
        })
        .unwrap();
    assert_eq!((out.spooled, out.dead_lettered), (2, 1));
    let dead = spool.letters().dead_letters().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1.message_id, "big");
    assert_eq!(
        (dead[0].1.reason.as_str(), dead[0].1.status),
        ("too big", None)
    );
    assert_eq!(dead[0].1.file_id, Some(fid));
    assert_eq!(
        ids(&spool.queue().peek(None, 10, usize::MAX).unwrap().items),
        ["a", "b"]
    );
}

#[test]
fn dead_lettering_from_the_queue_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    file_with(&spool, "f", vec![event("a"), event("b"), event("c")]);
    let q = spool.queue().peek(None, 10, usize::MAX).unwrap().items;
    spool
        .queue()
        .dead_letter(&q[1..2], "400 from Segment", Some(400))
        .unwrap();
    assert_eq!(
        ids(&spool.queue().peek(None, 10, usize::MAX).unwrap().items),
        ["a", "c"]
    );
    let dead = spool.letters().dead_letters().unwrap();
    assert_eq!(dead[0].1.message_id, "b");
    assert_eq!(dead[0].1.status, Some(400));
    assert_eq!(spool.queue().depth().unwrap().events, 2);
}

#[test]
fn quarantine_entries_commit_with_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let fid = begin_f(&spool);
    spool
        .commit_file_chunk(&Chunk {
            file_id: fid,
            offset: 10,
            line: 2,
            quarantine: vec![QuarantineEntry {
                reason: "malformed JSON".into(),
                file: "f".into(),
                line: 2,
                time_ms: 1,
                raw: "{oops".into(),
                ..QuarantineEntry::default()
            }],
            ..Chunk::default()
        })
        .unwrap();
    let q = spool.letters().quarantine_entries().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].1.line, 2);
}

fn fill(spool: &Spool, file_id: u64, n: usize, prefix: &str) {
    for start in (0..n).step_by(1000) {
        let events = (start..(start + 1000).min(n))
            .map(|i| {
                SpoolEvent::new(
                    format!("{prefix}-{i}"),
                    format!(
                        "{{\"messageId\":\"{prefix}-{i}\",\"pad\":\"{}\"}}",
                        "x".repeat(400)
                    )
                    .into_bytes(),
                    None,
                )
            })
            .collect();
        spool
            .commit_file_chunk(&Chunk {
                file_id,
                events,
                ..Chunk::default()
            })
            .unwrap();
    }
}

#[test]
fn compaction_gives_disk_back_and_keeps_everything_live() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let fid = begin_f(&spool);
    fill(&spool, fid, 60_000, "e");
    // Deliver all but the last 10.
    loop {
        let batch = spool.queue().peek(None, 2500, usize::MAX).unwrap().items;
        let keep = spool.queue().depth().unwrap().events as usize <= 10;
        if keep || batch.is_empty() {
            break;
        }
        let n = batch
            .len()
            .min(spool.queue().depth().unwrap().events as usize - 10);
        spool.queue().ack(&batch[..n]).unwrap();
    }
    spool.flush().unwrap();
    // The drained segments went as the drain went: what is left is the segment of the last
    // events (and the one being written, if they differ).
    let segments = segments::disk_bytes(&segments::dir(dir.path()));
    assert!(
        segments <= 2 * segments::SEGMENT_BYTES + 64 * 1024,
        "{segments} bytes of segments left for 10 events"
    );
    let before = spool.disk_bytes();
    eprintln!("{before} bytes on disk, {segments} of them segments");
    // sled's own files now hold only the index, the dedupe entries and the records, so a
    // compaction of them gives back little at this size (a fresh database starts with a few
    // MB of segments): it must keep everything and not grow the spool past that.
    let c = spool.compact().unwrap();
    eprintln!(
        "compaction: sled {} bytes before, {} after",
        c.disk_before, c.disk_after
    );
    assert!(
        spool.disk_bytes() < before + (8 << 20),
        "{c:?}, {before} bytes before in all"
    );
    let left = ids(&spool.queue().peek(None, 100, usize::MAX).unwrap().items);
    assert_eq!(left.len(), 10);
    assert_eq!(left[0], "e-59990");
    // Dedupe, files and new commits work on the new generation, and survive a reopen.
    fill(&spool, fid, 1, "e");
    assert_eq!(
        spool.queue().depth().unwrap().events,
        10,
        "e-0 is still a duplicate"
    );
    fill(&spool, fid, 1, "new");
    drop(spool);
    let spool = open(dir.path());
    assert_eq!(spool.queue().depth().unwrap().events, 11);
    assert_eq!(
        spool.ledger().file(fid).unwrap().unwrap().events_spooled,
        60_001
    );
    let gens: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    assert_eq!(gens, ["gen-2"], "the old generation is gone");
}

#[test]
fn debris_of_an_interrupted_compaction_is_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        let fid = begin_f(&spool);
        fill(&spool, fid, 5, "e");
    }
    // A compaction that died before switching CURRENT leaves a half-built gen-2.
    std::fs::create_dir_all(dir.path().join("gen-2")).unwrap();
    std::fs::write(dir.path().join("gen-2/db"), b"half").unwrap();
    let spool = open(dir.path());
    assert!(spool.recovered().is_none());
    assert_eq!(spool.queue().depth().unwrap().events, 5);
    assert!(!dir.path().join("gen-2").exists());
}

#[test]
fn a_spool_sled_cannot_open_is_moved_aside_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        let fid = begin_f(&spool);
        fill(&spool, fid, 5, "e");
    }
    // Damage sled's files: its config file holds the segment size and version.
    std::fs::write(dir.path().join("gen-1/conf"), b"\xff\xfe garbage").unwrap();
    let spool = open(dir.path());
    let note = spool.recovered().expect("the repair is reported");
    assert!(note.contains("moved to"), "{note}");
    assert_eq!(spool.queue().depth().unwrap().events, 0);
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("corrupt-")
        })
        .count();
    assert_eq!(aside, 1);
    // And the new spool works.
    let fid = begin_f(&spool);
    fill(&spool, fid, 3, "e");
    assert_eq!(spool.queue().depth().unwrap().events, 3);
}

#[test]
fn dedupe_entries_older_than_the_window_are_pruned() {
    // Entries carry the day they were spooled; pruning drops whole days.
    const DAY: u64 = 86_400_000;
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let fid = begin_f(&spool);
    fill(&spool, fid, 3, "old");
    assert_eq!(spool.prune_dedupe(now_ms()).unwrap(), 0, "today is kept");
    fill(&spool, fid, 3, "old");
    assert_eq!(spool.queue().depth().unwrap().events, 3, "still duplicates");
    assert_eq!(spool.prune_dedupe(now_ms() + DAY).unwrap(), 3);
    assert_eq!(
        spool.prune_dedupe(now_ms() + DAY).unwrap(),
        0,
        "a day is pruned once"
    );
    // Pruned ids are new again.
    fill(&spool, fid, 3, "old");
    assert_eq!(spool.queue().depth().unwrap().events, 6);
}

#[test]
fn a_second_open_is_refused_and_never_taken_for_damage() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let fid = begin_f(&spool);
    fill(&spool, fid, 3, "e");
    let err = Spool::open(dir.path(), 8 << 20).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(matches!(
        Spool::open_existing(dir.path(), 8 << 20),
        Err(Error::Locked { .. })
    ));
    drop(spool);
    // Nothing was moved aside; the data is all there.
    let look = Spool::open_existing(dir.path(), 8 << 20).unwrap().unwrap();
    assert!(look.recovered().is_none());
    assert_eq!(look.queue().depth().unwrap().events, 3);
    let empty = tempfile::tempdir().unwrap();
    assert!(
        Spool::open_existing(empty.path(), 8 << 20)
            .unwrap()
            .is_none()
    );
    assert_eq!(
        std::fs::read_dir(empty.path()).unwrap().count(),
        0,
        "nothing created"
    );
}

#[test]
fn an_agent_opening_the_spool_waits_for_a_commands_look_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let fid = begin_f(&spool);
    fill(&spool, fid, 3, "e");
    drop(spool);
    // A command's look (offline `status`): not an agent, and held as long as it is open.
    let look = Spool::open_existing(dir.path(), 8 << 20).unwrap().unwrap();
    assert!(!Spool::is_locked(dir.path()), "a look is not an agent");
    // An agent starting meanwhile says it waits, and opens once the look is over (it used to
    // find sled's lock held and give up after 5 s, or open between the look's steps).
    let log = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let writer = {
        let log = log.clone();
        move || LogWriter(log.clone())
    };
    let look_over = Arc::new(AtomicBool::new(false));
    let agent = {
        let (dir, look_over) = (dir.path().to_owned(), look_over.clone());
        std::thread::spawn(move || {
            let subscriber = tracing_subscriber::fmt().with_writer(writer).finish();
            let spool = tracing::subscriber::with_default(subscriber, || open(&dir));
            (look_over.load(Ordering::SeqCst), spool)
        })
    };
    let said =
        || String::from_utf8_lossy(&log.lock().unwrap()).contains("waiting for it to finish");
    while !said() {
        assert!(!agent.is_finished(), "the agent did not wait");
        std::thread::yield_now();
    }
    assert_eq!(look.queue().depth().unwrap().events, 3);
    look_over.store(true, Ordering::SeqCst);
    drop(look);
    let (after_the_look, spool) = agent.join().unwrap();
    assert!(after_the_look, "opened only once the look was over");
    assert_eq!(spool.queue().depth().unwrap().events, 3);
    // And while the agent has it, a look is refused at once.
    assert!(Spool::is_locked(dir.path()));
    assert!(matches!(
        Spool::open_existing(dir.path(), 8 << 20),
        Err(Error::Locked { .. })
    ));
}

/// A `tracing` writer into a shared buffer.
struct LogWriter(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn ids_handed_out_after_a_compaction_never_reuse_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let a = spool
        .ledger()
        .begin(Path::new("a"), &file_record("a"))
        .unwrap();
    let b = spool
        .ledger()
        .begin(Path::new("b"), &file_record("b"))
        .unwrap();
    spool.compact().unwrap();
    let c = spool
        .ledger()
        .begin(Path::new("c"), &file_record("c"))
        .unwrap();
    assert!(c > a && c > b, "{a} {b} {c}");
    assert_eq!(spool.ledger().file(a).unwrap().unwrap().path, "a");
    assert_eq!(spool.ledger().file(b).unwrap().unwrap().path, "b");
    drop(spool);
    let spool = open(dir.path());
    let d = spool
        .ledger()
        .begin(Path::new("d"), &file_record("d"))
        .unwrap();
    assert!(d > c);
}

#[test]
fn events_of_a_packet_are_acked_out_of_order_and_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        file_with(
            &spool,
            "f",
            (0..10).map(|i| event(&format!("e{i}"))).collect(),
        );
        let all = spool.queue().peek(None, 100, 1 << 20).unwrap().items;
        assert_eq!(all.len(), 10);
        assert!(all.iter().all(|q| q.packet == all[0].packet), "one packet");
        // The middle, then the end, delivered first (concurrent batches).
        spool.queue().ack(&all[4..6]).unwrap();
        spool.queue().ack(&all[8..]).unwrap();
        // Acking again changes nothing.
        spool.queue().ack(&all[4..5]).unwrap();
        assert_eq!(spool.queue().depth().unwrap().events, 6);
        spool.flush().unwrap();
    }
    let spool = open(dir.path());
    let left = spool.queue().peek(None, 100, 1 << 20).unwrap().items;
    assert_eq!(ids(&left), ["e0", "e1", "e2", "e3", "e6", "e7"]);
    // Peeking after a key inside the packet starts there.
    let after = spool
        .queue()
        .peek(Some(left[1].key), 100, 1 << 20)
        .unwrap()
        .items;
    assert_eq!(ids(&after), ["e2", "e3", "e6", "e7"]);
    let fid = left[0].file_id;
    let done = spool.queue().ack(&left).unwrap();
    assert_eq!(spool.queue().depth().unwrap().events, 0);
    assert_eq!(spool.ledger().file(fid).unwrap().unwrap().pending, 0);
    assert!(done.is_empty(), "the file is not read to its end");
    let s = spool.store();
    assert!(
        s.queue.is_empty() && s.acked.is_empty(),
        "packet and bitmap gone"
    );
}

#[test]
fn a_format_1_spool_is_upgraded_when_an_agent_opens_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        let s = spool.store();
        // What version 1 wrote: one event per queue key, one dedupe key per messageId.
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
        v1.extend_from_slice(&NO_FILE.to_be_bytes());
        v1.extend_from_slice(br#"{"messageId":"old-1"}"#);
        s.queue.insert(7u64.to_be_bytes(), v1).unwrap();
        s.dedupe.insert("old-1", &now_ms().to_be_bytes()).unwrap();
        s.meta
            .insert("format_version", &1u32.to_be_bytes())
            .unwrap();
        s.meta.insert("depth", &1u64.to_be_bytes()).unwrap();
        s.flush().unwrap();
    }
    let spool = open(dir.path());
    assert_eq!(spool.store().format_version().unwrap(), FORMAT_VERSION);
    assert!(
        spool
            .store()
            .dedupe
            .iter()
            .keys()
            .all(|k| k.unwrap().len() == 8),
        "only log values (none yet) are left in the dedupe tree"
    );
    let q = spool.queue().peek(None, 10, 1 << 20).unwrap().items;
    assert_eq!(ids(&q), ["old-1"]);
    assert_eq!(q[0].enqueued_ms, 1_700_000_000_000);
    // New events go after it; the old id is still a duplicate.
    let fid = begin_f(&spool);
    let out = spool
        .commit_file_chunk(&Chunk {
            file_id: fid,
            events: vec![event("old-1"), event("new-1")],
            ..Chunk::default()
        })
        .unwrap();
    assert_eq!((out.spooled, out.duplicates), (1, 1));
    let q = spool.queue().peek(None, 10, 1 << 20).unwrap().items;
    assert_eq!(ids(&q), ["old-1", "new-1"]);
    assert!(q[1].key > q[0].key);
    spool.queue().ack(&q[..1]).unwrap();
    assert_eq!(
        ids(&spool.queue().peek(None, 10, 1 << 20).unwrap().items),
        ["new-1"]
    );
}

#[test]
fn a_format_2_spool_drains_its_packets_from_sled_then_from_segments() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        let s = spool.store();
        // What version 2 wrote: the packet itself as the queue value.
        let v2 = packet::encode(
            1_700_000_000_000,
            NO_FILE,
            [
                br#"{"messageId":"old-1"}"#.as_slice(),
                br#"{"messageId":"old-2"}"#,
            ]
            .into_iter(),
        );
        s.queue.insert(0u64.to_be_bytes(), v2).unwrap();
        s.meta
            .insert("format_version", &2u32.to_be_bytes())
            .unwrap();
        s.meta.insert("depth", &2u64.to_be_bytes()).unwrap();
        s.flush().unwrap();
    }
    let spool = open(dir.path());
    assert_eq!(spool.store().format_version().unwrap(), FORMAT_VERSION);
    let fid = begin_f(&spool);
    // Enough new events to fill more than one (test-sized) segment.
    fill(&spool, fid, 6000, "new");
    let segs = segments::dir(dir.path());
    let on_disk = segments::disk_bytes(&segs);
    assert!(on_disk > segments::SEGMENT_BYTES, "{on_disk}");
    let q = spool.queue().peek(None, 3, 1 << 20).unwrap().items;
    assert_eq!(ids(&q), ["old-1", "old-2", "new-0"]);
    assert_eq!(q[0].enqueued_ms, 1_700_000_000_000);
    // Delivering new events while the old packet is queued deletes no segment: the old packet
    // comes first in the queue.
    let first_new = spool
        .queue()
        .peek(Some(q[1].key), 4000, usize::MAX)
        .unwrap()
        .items;
    spool.queue().ack(&first_new).unwrap();
    assert_eq!(segments::disk_bytes(&segs), on_disk);
    // Once it is delivered, the drained segments go.
    spool.queue().ack(&q[..2]).unwrap();
    assert!(segments::disk_bytes(&segs) < on_disk);
    drop(spool);
    let spool = open(dir.path());
    let rest = spool.queue().peek(None, 10_000, usize::MAX).unwrap().items;
    assert_eq!(rest.len(), 2000);
    assert_eq!(ids(&rest[..1]), ["new-4000"]);
}

#[test]
fn dedupe_entries_the_table_lost_come_back_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let table = dedupe::path(dir.path());
    let saved = dir.path().join("saved.tab");
    {
        let spool = open(dir.path());
        let fid = begin_f(&spool);
        fill(&spool, fid, 3, "a");
        spool.checkpoint_dedupe().unwrap();
        std::fs::copy(&table, &saved).unwrap();
        fill(&spool, fid, 3, "b");
        // A crash: the table's writes since the checkpoint are lost (here: the file as it was
        // at the checkpoint comes back), and no checkpoint runs at close.
        spool.writer().dedupe = None;
    }
    std::fs::copy(&saved, &table).unwrap();
    let spool = open(dir.path());
    let fid = spool.ledger().files().unwrap()[0].0;
    fill(&spool, fid, 3, "a");
    fill(&spool, fid, 3, "b");
    assert_eq!(
        spool.queue().depth().unwrap().events,
        6,
        "a-* and b-* are duplicates"
    );
    // After the close's checkpoint, the log is empty and the table has it all.
    drop(spool);
    let spool = open(dir.path());
    assert_eq!(spool.store().dedupe.len(), 0, "log trimmed");
    let fid = spool.ledger().files().unwrap()[0].0;
    fill(&spool, fid, 3, "b");
    assert_eq!(spool.queue().depth().unwrap().events, 6);
}

/// A copy of the directory tree `from` at `to` (files only; the spool has no links).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn a_dedupe_table_ahead_of_the_database_is_not_trusted() {
    // A power cut that takes flushed sled transactions (as sled did with unsynced blob files)
    // but not the dedupe table's checkpoint: the table holds ids whose events the database
    // lost. Their file is read again from the older offset, and its events must be spooled.
    let dir = tempfile::tempdir().unwrap();
    let old_db = dir.path().join("old-gen");
    let fid;
    {
        let spool = open(dir.path());
        fid = spool
            .ledger()
            .begin(Path::new("f"), &file_record("f"))
            .unwrap();
        fill(&spool, fid, 3, "a");
        // The database as a power cut would bring it back: copied while closed.
        let gen_dir = spool.path();
        drop(spool);
        copy_tree(&gen_dir, &old_db);
        let spool = open(dir.path());
        fill(&spool, fid, 3, "b");
        spool.checkpoint_dedupe().unwrap();
        drop(spool);
        std::fs::remove_dir_all(&gen_dir).unwrap();
        std::fs::rename(&old_db, &gen_dir).unwrap();
    }
    let spool = open(dir.path());
    let depth = spool.queue().depth().unwrap().events;
    assert_eq!(depth, 3, "the database went back to a-* only");
    fill(&spool, fid, 3, "b");
    assert_eq!(
        spool.queue().depth().unwrap().events,
        6,
        "b-* spooled again: the table that held them was not trusted"
    );
}

#[test]
fn a_packet_damaged_on_disk_is_set_aside_and_the_drain_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let fid = spool
        .ledger()
        .begin(Path::new("f.json"), &file_record("f.json"))
        .unwrap();
    fill(&spool, fid, 3000, "e");
    // Flip a byte inside the second packet of the first segment.
    let all = spool.queue().peek(None, 10_000, usize::MAX).unwrap().items;
    let second = all.iter().find(|q| q.packet != all[0].packet).unwrap();
    let s = spool.store();
    let loc =
        segments::Location::decode(&s.queue.get(second.packet.to_be_bytes()).unwrap().unwrap())
            .unwrap();
    drop(s);
    let seg = segments::dir(dir.path()).join(format!("{:020}.seg", loc.segment));
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"\xff", loc.offset + 100).unwrap();
    let lost = u64::from(loc.events);
    // The drain reads past it; its events are gone, the others all there, in order.
    let left = spool.queue().peek(None, 10_000, usize::MAX).unwrap().items;
    assert_eq!(left.len() as u64, 3000 - lost);
    assert!(left.iter().all(|q| q.packet != second.packet));
    assert!(left.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(spool.queue().depth().unwrap().events, 3000 - lost);
    let q = spool.letters().quarantine_entries().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].1.file, "f.json");
    assert!(
        q[0].1.reason.contains(&format!("{lost} queued events"))
            && q[0].1.reason.contains("f.json"),
        "{}",
        q[0].1.reason
    );
    // Delivering the rest empties the queue; the file is not taken for delivered.
    spool.queue().ack(&left).unwrap();
    assert_eq!(spool.queue().depth().unwrap().events, 0);
    assert_eq!(spool.ledger().file(fid).unwrap().unwrap().pending, lost);
}

#[test]
fn a_drained_spool_keeps_no_segment_and_writes_on_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let segs = segments::dir(dir.path());
    {
        let spool = open(dir.path());
        let fid = begin_f(&spool);
        fill(&spool, fid, 6000, "a");
        assert!(segments::disk_bytes(&segs) > segments::SEGMENT_BYTES);
        let all = spool.queue().peek(None, 10_000, usize::MAX).unwrap().items;
        spool.queue().ack(&all).unwrap();
        // Everything delivered: the segment being written went too.
        assert_eq!(segments::disk_bytes(&segs), 0);
        fill(&spool, fid, 10, "b");
        assert_eq!(
            ids(&spool.queue().peek(None, 100, usize::MAX).unwrap().items)[0],
            "b-0"
        );
        let all = spool.queue().peek(None, 100, usize::MAX).unwrap().items;
        spool.queue().ack(&all).unwrap();
        assert_eq!(segments::disk_bytes(&segs), 0);
    }
    // The committed end names a segment that is gone: the next commit starts a new one.
    let spool = open(dir.path());
    let fid = spool.ledger().files().unwrap()[0].0;
    fill(&spool, fid, 10, "c");
    assert_eq!(spool.queue().depth().unwrap().events, 10);
    drop(spool);
    let spool = open(dir.path());
    assert_eq!(
        ids(&spool.queue().peek(None, 100, usize::MAX).unwrap().items),
        (0..10).map(|i| format!("c-{i}")).collect::<Vec<_>>()
    );
}

#[test]
fn segments_an_ack_could_not_retire_go_at_the_maintenance_tick() {
    let dir = tempfile::tempdir().unwrap();
    let segs = segments::dir(dir.path());
    let spool = open(dir.path());
    let fid = begin_f(&spool);
    fill(&spool, fid, 100, "a");
    let all = spool.queue().peek(None, 1000, usize::MAX).unwrap().items;
    {
        // A commit holds the writer lock while the last ack comes in.
        let _busy = spool.writer();
        spool.queue().ack(&all).unwrap();
    }
    assert!(
        segments::disk_bytes(&segs) > 0,
        "the segment being written stays while a commit may be adding to it"
    );
    spool.queue().remove_drained_segments().unwrap();
    assert_eq!(segments::disk_bytes(&segs), 0);
    fill(&spool, fid, 3, "b");
    assert_eq!(spool.queue().depth().unwrap().events, 3);
}

/// A new file `name` in the ledger; its id.
fn new_file(spool: &Spool, name: &str) -> u64 {
    spool
        .ledger()
        .begin(Path::new(name), &file_record(name))
        .unwrap()
}

/// Chunk `n` of a file: events `{prefix}-{n}-0..per`, the offset past them.
fn chunk_of(file_id: u64, prefix: &str, n: u64, per: usize) -> Chunk {
    Chunk {
        file_id,
        offset: (n + 1) * 1000,
        line: (n + 1) * 10,
        events: (0..per)
            .map(|i| event(&format!("{prefix}-{n}-{i}")))
            .collect(),
        ..Chunk::default()
    }
}

/// Every queued event's id, in queue order.
fn queued_ids(spool: &Spool) -> Vec<String> {
    ids(&spool.queue().peek(None, 1 << 20, usize::MAX).unwrap().items)
}

#[test]
fn a_committer_commits_chunks_in_order_as_single_commits_do() {
    let (piped, single) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open(piped.path()), open(single.path()));
    let (fa, fb) = (new_file(&a, "f"), new_file(&b, "f"));
    // Enough chunks to roll over segments (1 MiB in unit tests) with commits in flight.
    let mut done = Vec::new();
    a.with_committer(|c| {
        for n in 0..40 {
            done.extend(c.submit(chunk_of(fa, "e", n, 500), n).unwrap());
        }
        done.extend(c.finish().unwrap());
    });
    for n in 0..40 {
        b.commit_file_chunk(&chunk_of(fb, "e", n, 500)).unwrap();
    }
    // Every chunk handed back once, in order, with what its commit did.
    assert_eq!(
        done.iter().map(|d| d.tag).collect::<Vec<_>>(),
        (0..40).collect::<Vec<_>>()
    );
    assert!(done.iter().all(|d| d.outcome.spooled == 500));
    assert_eq!(queued_ids(&a), queued_ids(&b));
    assert_eq!(queued_ids(&a).len(), 20_000);
    let rec = |s: &Spool| {
        let (_, r) = s.ledger().file_by_path(Path::new("f")).unwrap().unwrap();
        (r.offset, r.line, r.pending, r.events_spooled)
    };
    assert_eq!(rec(&a), (40_000, 400, 20_000, 20_000));
    assert_eq!(rec(&a), rec(&b));
    // And all of it is there after a restart.
    drop(a);
    let a = open(piped.path());
    assert_eq!(queued_ids(&a), queued_ids(&b));
    assert_eq!(a.queue().depth().unwrap(), b.queue().depth().unwrap());
}

#[test]
fn a_chunk_staged_while_the_one_before_commits_sees_its_ids() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let f = new_file(&spool, "f");
    let mut outcomes = Vec::new();
    spool.with_committer(|c| {
        let first = chunk_of(f, "e", 0, 100);
        // The second chunk repeats half of the first, which is still in flight when it is
        // staged; the third repeats the second's new ones.
        let mut second = chunk_of(f, "e", 1, 50);
        second
            .events
            .extend((0..50).map(|i| event(&format!("e-0-{i}"))));
        let mut third = chunk_of(f, "e", 2, 0);
        third
            .events
            .extend((0..50).map(|i| event(&format!("e-1-{i}"))));
        for (n, chunk) in [first, second, third].into_iter().enumerate() {
            outcomes.extend(c.submit(chunk, n).unwrap());
        }
        outcomes.extend(c.finish().unwrap());
    });
    let counts: Vec<_> = outcomes
        .iter()
        .map(|d| (d.outcome.spooled, d.outcome.duplicates))
        .collect();
    assert_eq!(counts, [(100, 0), (50, 50), (0, 50)]);
    assert_eq!(queued_ids(&spool).len(), 150);
}

#[test]
fn a_failed_commit_hands_back_the_chunk_staged_after_it_and_the_retry_commits_both_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let f = new_file(&spool, "f");
    // A chunk naming a file the ledger does not have: its transaction aborts.
    let bad = chunk_of(f + 100, "e", 1, 300);
    let result = spool.with_committer(|c| {
        let first = c.submit(chunk_of(f, "e", 0, 300), 0).unwrap();
        assert!(first.is_empty(), "in flight");
        let before = c.submit(bad, 1).unwrap();
        assert_eq!(before.iter().map(|d| d.tag).collect::<Vec<_>>(), [0]);
        // Staged while the bad one is in flight: abandoned with it.
        c.submit(chunk_of(f, "e", 2, 300), 2)
    });
    let failed = result.expect_err("the bad chunk fails");
    assert!(
        failed.error.to_string().contains("file record"),
        "{}",
        failed.error
    );
    assert!(failed.done.is_empty());
    assert_eq!(
        failed.undone.iter().map(|(_, t)| *t).collect::<Vec<_>>(),
        [1, 2]
    );
    // Only the first chunk is the spool's: its events, its offset.
    assert_eq!(queued_ids(&spool).len(), 300);
    let (_, rec) = spool
        .ledger()
        .file_by_path(Path::new("f"))
        .unwrap()
        .unwrap();
    assert_eq!((rec.offset, rec.pending), (1000, 300));
    // The chunks handed back, fixed, commit once; the abandoned bytes are written over.
    spool.with_committer(|c| {
        for (mut chunk, tag) in failed.undone {
            chunk.file_id = f;
            c.submit(chunk, tag).unwrap();
        }
        c.finish().unwrap();
    });
    let want: Vec<String> = [0, 1, 2]
        .iter()
        .flat_map(|n| (0..300).map(move |i| format!("e-{n}-{i}")))
        .collect();
    assert_eq!(queued_ids(&spool), want);
    // The abandoned appends were written over: the segments hold what three commits that never
    // failed write.
    let clean = tempfile::tempdir().unwrap();
    let reference = open(clean.path());
    let g = new_file(&reference, "f");
    for n in 0..3 {
        reference
            .commit_file_chunk(&chunk_of(g, "e", n, 300))
            .unwrap();
    }
    let segment_bytes = |d: &Path| segments::disk_bytes(&segments::dir(d));
    assert_eq!(segment_bytes(dir.path()), segment_bytes(clean.path()));
    drop(spool);
    let spool = open(dir.path());
    assert_eq!(queued_ids(&spool), want);
    let (_, rec) = spool
        .ledger()
        .file_by_path(Path::new("f"))
        .unwrap()
        .unwrap();
    assert_eq!((rec.offset, rec.pending), (3000, 900));
}

#[test]
fn a_committer_lets_another_writer_in_between_two_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let f = new_file(&spool, "f");
    let other_done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        spool.with_committer(|c| {
            c.submit(chunk_of(f, "e", 0, 100), 0).unwrap();
            // Another thread wants the writer lock (a dedupe checkpoint, as the maintenance
            // tick does) while the committer holds it.
            let other = scope.spawn(|| {
                spool.checkpoint_dedupe().unwrap();
                other_done.store(true, Ordering::SeqCst);
            });
            while spool.writer_waiting.load(Ordering::SeqCst) == 0 && !other.is_finished() {
                std::thread::yield_now();
            }
            // The committer goes on; the waiter gets its turn before the next chunk.
            let mut n = 1;
            while !other_done.load(Ordering::SeqCst) {
                assert!(n < 10_000, "the waiting thread never got the lock");
                c.submit(chunk_of(f, "e", n, 10), n).unwrap();
                n += 1;
            }
            c.finish().unwrap();
        });
    });
    assert!(queued_ids(&spool).len() >= 110);
}

#[test]
fn a_chunk_submitted_while_the_one_in_flight_fails_and_a_writer_waits_is_handed_back() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let f = new_file(&spool, "f");
    std::thread::scope(|scope| {
        let failed = spool.with_committer(|c| {
            c.submit(chunk_of(f, "e", 0, 100), 0).unwrap();
            // In flight and bound to fail: its file is not in the ledger.
            c.submit(chunk_of(f + 100, "e", 1, 100), 1).unwrap();
            // Another thread waits for the writer lock, so the next submit settles first.
            let other = scope.spawn(|| spool.checkpoint_dedupe().unwrap());
            while spool.writer_waiting.load(Ordering::SeqCst) == 0 && !other.is_finished() {
                std::thread::yield_now();
            }
            c.submit(chunk_of(f, "e", 2, 100), 2)
                .expect_err("the chunk in flight fails")
        });
        // The chunk submitted is handed back after the failed one, not dropped.
        assert_eq!(
            failed.undone.iter().map(|(_, t)| *t).collect::<Vec<_>>(),
            [1, 2]
        );
    });
    let (_, rec) = spool
        .ledger()
        .file_by_path(Path::new("f"))
        .unwrap()
        .unwrap();
    assert_eq!((rec.offset, rec.pending), (1000, 100));
}
