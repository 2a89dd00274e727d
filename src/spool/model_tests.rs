//! Property test: the spool against a VecDeque model across simulated restarts.
//!
//! Random sequences of what the ingest and the drain do to a spool (commit a chunk with new,
//! repeated and refused events (dead-lettered by the commit); peek a batch after the drain's
//! cursor or from the start; ack or dead-letter a peeked batch; flush; drop and reopen the
//! spool) run against a real sled in a temp dir and against a plain model. After every step the whole queue (order, keys,
//! payloads), the depth counters, the files' pending counts and the dead letters must match.
//!
//! Set `LSA_PROPTEST_CASES` to run more (or fewer) than the default 24 cases.

use std::collections::{HashSet, VecDeque};

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use super::*;
use crate::spool::letters::message_id_of;

/// Files the chunks go to; their ids come from `begin_file`.
const FILES: usize = 3;

fn cases() -> u32 {
    std::env::var("LSA_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

#[derive(Debug, Clone)]
enum Op {
    /// One chunk for file `file`: `fresh` new events (their padding lengths), then repeats of
    /// ids already spooled (`repeats`), and, with `repeat_within`, its own first event again.
    Commit {
        file: usize,
        fresh: Vec<usize>,
        repeats: Vec<prop::sample::Index>,
        repeat_within: bool,
        refused: bool,
        done: bool,
    },
    /// What the drain does: a batch after its cursor (claiming it), or a look from the start
    /// (also kept, so later acks may overlap: a batch acked twice).
    Peek {
        from_start: bool,
        max_events: usize,
        budget: usize,
    },
    /// Ack an outstanding peeked batch (it is consumed).
    Ack(prop::sample::Index),
    /// Dead-letter an outstanding peeked batch (it is consumed).
    DeadLetter(prop::sample::Index, Option<u16>),
    Flush,
    /// Drop the spool and reopen it: the drain's cursor and its batches are gone.
    Restart,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let commit = (
        0..FILES,
        prop::collection::vec(0usize..300, 0..6),
        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(file, fresh, repeats, repeat_within, refused, done)| Op::Commit {
                file,
                fresh,
                repeats,
                repeat_within,
                refused,
                done,
            },
        );
    let peek = (
        prop::bool::weighted(0.3),
        prop_oneof![1usize..6, Just(usize::MAX)],
        prop_oneof![Just(1usize), 100usize..1500, Just(usize::MAX)],
    )
        .prop_map(|(from_start, max_events, budget)| Op::Peek {
            from_start,
            max_events,
            budget,
        });
    prop_oneof![
        3 => commit,
        3 => peek,
        2 => any::<prop::sample::Index>().prop_map(Op::Ack),
        1 => (any::<prop::sample::Index>(), prop_oneof![Just(Some(400u16)), Just(None)])
            .prop_map(|(i, s)| Op::DeadLetter(i, s)),
        1 => Just(Op::Flush),
        1 => Just(Op::Restart),
    ]
}

/// A queued event as the model knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    key: u64,
    file_id: u64,
    json: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Letter {
    message_id: String,
    status: Option<u16>,
    file_id: Option<u64>,
    event: String,
}

#[derive(Debug, Clone, Copy, Default)]
struct ModelFile {
    id: u64,
    pending: u64,
    read: bool,
}

#[derive(Default)]
struct Model {
    queue: VecDeque<Item>,
    /// Every messageId ever committed (the dedupe index, never pruned here).
    seen: HashSet<String>,
    seen_order: Vec<String>,
    next_key: u64,
    next_event: u64,
    files: Vec<ModelFile>,
    dead: Vec<Letter>,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.queue.iter().map(|i| i.json.len() as u64).sum()
    }

    fn file_mut(&mut self, id: u64) -> &mut ModelFile {
        self.files
            .iter_mut()
            .find(|f| f.id == id)
            .expect("a known file")
    }

    /// What `peek(after, max_events, budget)` must return.
    fn peek(&self, after: Option<u64>, max_events: usize, budget: usize) -> (Vec<Item>, bool) {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut full = false;
        for item in self
            .queue
            .iter()
            .filter(|i| after.is_none_or(|a| i.key > a))
        {
            let size = item.json.len() + 1;
            if !out.is_empty() && (out.len() >= max_events || bytes + size > budget) {
                full = true;
                break;
            }
            bytes += size;
            out.push(item.clone());
        }
        if out.len() >= max_events {
            full = true;
        }
        (out, full)
    }

    /// Removes the batch's events still queued; dead-letters those (and only those) when
    /// `dead` is set; returns the files now fully delivered, in order of first appearance.
    fn remove(&mut self, batch: &[Queued], dead: Option<(&str, Option<u16>)>) -> Vec<u64> {
        let mut per_file: Vec<(u64, u64)> = Vec::new();
        for q in batch {
            if !per_file.iter().any(|(f, _)| *f == q.file_id) {
                per_file.push((q.file_id, 0));
            }
            let Some(pos) = self.queue.iter().position(|i| i.key == q.key) else {
                continue;
            };
            let item = self.queue.remove(pos).expect("position is valid");
            per_file
                .iter_mut()
                .find(|(f, _)| *f == q.file_id)
                .expect("added above")
                .1 += 1;
            if let Some((_, status)) = dead {
                self.dead.push(Letter {
                    message_id: message_id_of(&item.json),
                    status,
                    file_id: Some(item.file_id),
                    event: String::from_utf8_lossy(&item.json).into_owned(),
                });
            }
        }
        let mut done = Vec::new();
        for (file_id, n) in per_file {
            let f = self.file_mut(file_id);
            f.pending = f.pending.saturating_sub(n);
            if f.pending == 0 && f.read {
                done.push(file_id);
            }
        }
        done
    }
}

fn open(dir: &Path) -> Spool {
    Spool::open(dir, 4 << 20).expect("open spool")
}

fn event_json(id: &str, pad: usize) -> Vec<u8> {
    format!("{{\"messageId\":\"{id}\",\"pad\":\"{}\"}}", "p".repeat(pad)).into_bytes()
}

/// Compares everything observable with the model.
fn check(spool: &Spool, model: &Model, step: usize, op: &Op) -> Result<(), TestCaseError> {
    let ctx = || format!("after step {step} ({op:?})");
    let all = spool
        .queue()
        .peek(None, usize::MAX, usize::MAX)
        .map_err(|e| TestCaseError::fail(format!("{}: peek: {e}", ctx())))?;
    let got: Vec<Item> = all
        .items
        .iter()
        .map(|q| Item {
            key: q.key,
            file_id: q.file_id,
            json: q.json.to_vec(),
        })
        .collect();
    let want: Vec<Item> = model.queue.iter().cloned().collect();
    if got != want {
        let ids = |v: &[Item]| {
            v.iter()
                .map(|i| (i.key, message_id_of(&i.json)))
                .collect::<Vec<_>>()
        };
        return Err(TestCaseError::fail(format!(
            "{}: queue differs\n spool {:?}\n model {:?}",
            ctx(),
            ids(&got),
            ids(&want)
        )));
    }
    let depth = spool.queue().depth().expect("depth");
    prop_assert_eq!(
        depth,
        Depth {
            events: model.queue.len() as u64,
            bytes: model.bytes()
        },
        "{}: depth",
        ctx()
    );
    let letters: Vec<Letter> = spool
        .letters()
        .dead_letters()
        .expect("dead letters")
        .into_iter()
        .map(|(_, d)| Letter {
            message_id: d.message_id,
            status: d.status,
            file_id: d.file_id,
            event: d.event,
        })
        .collect();
    if letters != model.dead {
        let ids = |v: &[Letter]| {
            v.iter()
                .map(|l| (l.message_id.clone(), l.status))
                .collect::<Vec<_>>()
        };
        return Err(TestCaseError::fail(format!(
            "{}: dead letters differ\n spool {:?}\n model {:?}",
            ctx(),
            ids(&letters),
            ids(&model.dead)
        )));
    }
    for f in &model.files {
        let rec = spool
            .ledger()
            .file(f.id)
            .expect("file")
            .expect("file record exists");
        prop_assert_eq!(rec.pending, f.pending, "{}: file {} pending", ctx(), f.id);
        prop_assert_eq!(
            rec.status == FileStatus::Read,
            f.read,
            "{}: file {} status {:?}",
            ctx(),
            f.id,
            rec.status
        );
    }
    Ok(())
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut spool = Some(open(dir.path()));
    let mut model = Model::default();
    for n in 0..FILES {
        let path = format!("f{n}");
        let record = FileRecord {
            path: path.clone(),
            ..FileRecord::default()
        };
        let id = spool
            .as_ref()
            .expect("open")
            .ledger()
            .begin(Path::new(&path), &record)
            .expect("begin file");
        model.files.push(ModelFile {
            id,
            ..ModelFile::default()
        });
    }
    // The drain's state: its cursor and the batches it holds.
    let mut cursor: Option<u64> = None;
    let mut batches: Vec<Vec<Queued>> = Vec::new();

    for (step, op) in ops.iter().enumerate() {
        let s = spool.as_ref().expect("open");
        match op {
            Op::Commit {
                file,
                fresh,
                repeats,
                repeat_within,
                refused,
                done,
            } => {
                let file_id = model.files[*file].id;
                let mut events = Vec::new();
                for pad in fresh {
                    let id = format!("m-{}", model.next_event);
                    model.next_event += 1;
                    events.push(SpoolEvent::new(id.clone(), event_json(&id, *pad), None));
                }
                if *refused {
                    let id = format!("m-{}", model.next_event);
                    model.next_event += 1;
                    events.push(SpoolEvent::new(
                        id.clone(),
                        event_json(&id, 64),
                        Some("refused by the producer".into()),
                    ));
                }
                if !model.seen_order.is_empty() {
                    for r in repeats {
                        let id = r.get(&model.seen_order).clone();
                        events.push(SpoolEvent::new(id.clone(), event_json(&id, 7), None));
                    }
                }
                if *repeat_within && let Some(first) = events.first().cloned() {
                    events.push(first);
                }

                let mut want = ChunkOutcome::default();
                for ev in &events {
                    if !model.seen.insert(ev.message_id.clone()) {
                        want.duplicates += 1;
                        continue;
                    }
                    model.seen_order.push(ev.message_id.clone());
                    if ev.refused.is_some() {
                        want.dead_lettered += 1;
                        model.dead.push(Letter {
                            message_id: ev.message_id.clone(),
                            status: None,
                            file_id: Some(file_id),
                            event: String::from_utf8_lossy(&ev.json).into_owned(),
                        });
                        continue;
                    }
                    model.queue.push_back(Item {
                        key: model.next_key,
                        file_id,
                        json: ev.json.clone(),
                    });
                    model.next_key += 1;
                    want.spooled += 1;
                }
                let f = model.file_mut(file_id);
                f.pending += want.spooled;
                f.read |= *done;

                let got = s
                    .commit_file_chunk(&Chunk {
                        file_id,
                        offset: step as u64,
                        line: step as u64,
                        events,
                        file_done: *done,
                        ..Chunk::default()
                    })
                    .map_err(|e| TestCaseError::fail(format!("step {step}: commit: {e}")))?;
                prop_assert_eq!(got, want, "step {}: commit outcome", step);
            }
            Op::Peek {
                from_start,
                max_events,
                budget,
            } => {
                let after = if *from_start { None } else { cursor };
                let got = s
                    .queue()
                    .peek(after, *max_events, *budget)
                    .map_err(|e| TestCaseError::fail(format!("step {step}: peek: {e}")))?;
                let (want, want_full) = model.peek(after, *max_events, *budget);
                let got_items: Vec<Item> = got
                    .items
                    .iter()
                    .map(|q| Item {
                        key: q.key,
                        file_id: q.file_id,
                        json: q.json.to_vec(),
                    })
                    .collect();
                prop_assert_eq!(&got_items, &want, "step {}: peek({:?})", step, after);
                prop_assert_eq!(got.full, want_full, "step {}: peek full flag", step);
                if !got.items.is_empty() {
                    if !*from_start {
                        cursor = got.items.last().map(|q| q.key);
                    }
                    batches.push(got.items);
                }
            }
            Op::Ack(index) => {
                if batches.is_empty() {
                    continue;
                }
                let batch = batches.remove(index.index(batches.len()));
                let want = model.remove(&batch, None);
                let got = s
                    .queue()
                    .ack(&batch)
                    .map_err(|e| TestCaseError::fail(format!("step {step}: ack: {e}")))?;
                prop_assert_eq!(got, want, "step {}: files delivered by the ack", step);
            }
            Op::DeadLetter(index, status) => {
                if batches.is_empty() {
                    continue;
                }
                let batch = batches.remove(index.index(batches.len()));
                let want = model.remove(&batch, Some(("rejected", *status)));
                let got = s
                    .queue()
                    .dead_letter(&batch, "rejected", *status)
                    .map_err(|e| TestCaseError::fail(format!("step {step}: dead_letter: {e}")))?;
                prop_assert_eq!(got, want, "step {}: files done by the dead letters", step);
            }
            Op::Flush => {
                s.flush()
                    .map_err(|e| TestCaseError::fail(format!("step {step}: flush: {e}")))?;
            }
            Op::Restart => {
                drop(spool.take());
                let reopened = open(dir.path());
                prop_assert!(
                    reopened.recovered().is_none(),
                    "step {}: a clean reopen",
                    step
                );
                // Keys continue past the last queued packet: past the last queued event, or
                // further when that packet's last events were delivered (0 when the queue was
                // emptied).
                let next = reopened.queue().watermark();
                let last = model.queue.back().map_or(0, |i| i.key + 1);
                prop_assert!(
                    next >= last && (next == 0) == model.queue.is_empty(),
                    "step {}: next key {} after the last queued {}",
                    step,
                    next,
                    last
                );
                model.next_key = next;
                spool = Some(reopened);
                cursor = None;
                batches.clear();
            }
        }
        check(spool.as_ref().expect("open"), &model, step, op)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Never write regression files into the source tree.
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    })]

    #[test]
    fn spool_matches_a_queue_model_across_restarts(
        ops in prop::collection::vec(op_strategy(), 1..48)
    ) {
        run(&ops)?;
    }
}
