//! Model-based property test of the input side (SPEC section 7, "Files"): random sequences of
//! what sync tools and writers do to files (create, append, leave a line unfinished and finish
//! it, rename, copy, truncate and rewrite, delete, drop a gzip file) and restarts (SIGTERM, and
//! `kill -9`), against the real binary (watcher, reader, spool) and a fake Segment server that
//! answers 200.
//!
//! The test waits for quiescence after every action (the file settled and was read, the spool
//! drained), which keeps the model exact:
//!
//! - **delivered**: every event of every complete line that was in a file when it settled,
//!   including lines of files later truncated or deleted, and an unfinished line only once
//!   finished. Nothing else.
//! - **once**: every `messageId` accepted exactly once, except a batch acknowledged shortly
//!   before a `kill -9` (its removal from the spool may not have been flushed): a re-delivery is
//!   allowed for ids first accepted before a kill.
//! - **read once**: per action, `events_read - quarantined` (records read and kept) grows by the
//!   number of new complete lines: 0 for a rename, a copy, a delete, a restart or an unfinished
//!   line; so a renamed or copied file is not even read, and a grown one is read from where it
//!   was left. `duplicates_skipped` stays 0, except where [`Relaxed`] explains it.
//!
//! `LSA_MODEL_CASES` (default 3) and `LSA_MODEL_STEPS` (default 8, the most actions per case)
//! make longer runs; `LSA_MODEL_SEED` replays one (the seed is printed); `LSA_MODEL_SHRINK` sets
//! proptest's shrink iterations (default 0: each one runs the agent again).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use serde_json::Value;

use crate::util::{
    Agent, PATIENCE, TestEnv, gzip_bytes, lp_id, open_session_line, quarantine_list, ready_lines,
    status_json, status_u64, write_atomically,
};

/// eventIds of this module: `BASE + case * 10_000_000 + i`.
const BASE: u64 = 8_300_000_000_000_000_000;

/// After an action, at least this long passes before quiescence is judged: settle_secs (1 s),
/// plus the watcher's tick (250 ms), plus the time to read and commit a few lines.
const MIN_WAIT: Duration = Duration::from_millis(1700);

/// Nothing may change in the status for this long for the agent to count as quiet.
const STABLE_FOR: Duration = Duration::from_millis(500);

/// One thing done to the watch dir. Indexes pick among the files that exist at that moment.
#[derive(Debug, Clone)]
enum Action {
    /// A new file of `lines` complete lines, under subdir `dir` (0: top level), written in
    /// place or atomically (temp name, then rename).
    Create {
        lines: usize,
        dir: u8,
        atomic: bool,
    },
    /// Complete lines appended to a plain file.
    Append {
        file: Index,
        lines: usize,
    },
    /// The first part of one more line (no newline) appended to a plain file.
    AppendPartial {
        file: Index,
        cut: Index,
    },
    /// The rest of an unfinished line, and its newline.
    FinishPartial {
        file: Index,
    },
    /// Renamed within the tree, into subdir `dir` (may be new).
    Rename {
        file: Index,
        dir: u8,
    },
    /// Copied under a new name (a re-sync), in place or atomically.
    Copy {
        file: Index,
        atomic: bool,
    },
    /// Truncated and rewritten in place with `lines` new lines.
    Rewrite {
        file: Index,
        lines: usize,
    },
    Delete {
        file: Index,
    },
    /// A gzipped file of `lines` lines, dropped atomically.
    DropGzip {
        lines: usize,
        dir: u8,
    },
    /// SIGTERM and start again, or `kill -9` and start again.
    Restart {
        kill: bool,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (1..5usize, 0..3u8, any::<bool>())
            .prop_map(|(lines, dir, atomic)| Action::Create { lines, dir, atomic }),
        2 => (any::<Index>(), 1..4usize).prop_map(|(file, lines)| Action::Append { file, lines }),
        1 => (any::<Index>(), any::<Index>())
            .prop_map(|(file, cut)| Action::AppendPartial { file, cut }),
        1 => any::<Index>().prop_map(|file| Action::FinishPartial { file }),
        2 => (any::<Index>(), 0..4u8).prop_map(|(file, dir)| Action::Rename { file, dir }),
        2 => (any::<Index>(), any::<bool>())
            .prop_map(|(file, atomic)| Action::Copy { file, atomic }),
        1 => (any::<Index>(), 1..4usize).prop_map(|(file, lines)| Action::Rewrite { file, lines }),
        1 => any::<Index>().prop_map(|file| Action::Delete { file }),
        1 => (1..5usize, 0..3u8).prop_map(|(lines, dir)| Action::DropGzip { lines, dir }),
        1 => any::<bool>().prop_map(|kill| Action::Restart { kill }),
    ]
}

/// A file as the model knows it.
#[derive(Debug, Clone)]
struct ModelFile {
    rel: PathBuf,
    gzip: bool,
    /// eventIds of its complete lines, in order.
    lines: Vec<u64>,
    partial: Option<Partial>,
}

/// An unfinished last line.
#[derive(Debug, Clone)]
struct Partial {
    event_id: u64,
    /// Its 1-based line number in the file.
    line: u64,
    /// What finishing it appends (the rest of the line and its newline).
    rest: Vec<u8>,
    /// Every path it has been read at (renames), to find its quarantine entry.
    paths: Vec<String>,
}

/// Why `duplicates_skipped` (and the read count of one action) may legitimately be off.
#[derive(Debug, Clone)]
#[allow(
    dead_code,
    reason = "the paths are read through Debug, in the test's report"
)]
enum Relaxed {
    /// The unfinished line had already been taken as final (the file settled for good and the
    /// line was quarantined) when its writer finished it: a committed line changed, so the file
    /// counts as rewritten and is read anew (the dedupe index keeps its events from going out
    /// twice).
    FinishedAfterHoldExpired(String),
}

/// One case's world: the agent, the files, and what must have been delivered.
struct World {
    env: TestEnv,
    agent: Agent,
    next_id: u64,
    next_name: u64,
    files: Vec<ModelFile>,
    /// messageIds that must be delivered.
    expected: BTreeSet<String>,
    /// When each `kill -9` happened.
    kills: Vec<Instant>,
    relaxed: Vec<Relaxed>,
    /// `duplicates_skipped` of agent processes that have stopped.
    carried_duplicates: u64,
    /// `events_read - quarantined` of the running process at the last quiescence.
    net_read: u64,
    /// The actions as done (after resolving indexes), for the failure message.
    done: Vec<String>,
}

fn seed() -> u64 {
    match std::env::var("LSA_MODEL_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("LSA_MODEL_SEED={v:?}: {e}")),
        Err(_) => fastrand::u64(..),
    }
}

fn env_number(name: &str, default: u32) -> u32 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
        Err(_) => default,
    }
}

#[test]
fn input_model_random_file_histories() {
    let seed = seed();
    let cases = env_number("LSA_MODEL_CASES", 3);
    let steps = env_number("LSA_MODEL_STEPS", 8).max(1) as usize;
    eprintln!(
        "input model: seed {seed} (LSA_MODEL_SEED={seed} replays), {cases} cases of up to {steps} actions"
    );
    let config = Config {
        cases,
        max_shrink_iters: env_number("LSA_MODEL_SHRINK", 0),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let case_no = std::sync::atomic::AtomicU64::new(0);
    let result = runner.run(
        &proptest::collection::vec(action(), steps.div_ceil(2)..=steps),
        |actions| {
            let n = case_no.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            eprintln!("input model case {n}: {actions:?}");
            run_case(n, &actions).map_err(TestCaseError::fail)
        },
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, actions)) => panic!(
            "input model failed (seed {seed}; replay with LSA_MODEL_SEED={seed})\n\
             actions: {actions:#?}\n{why}"
        ),
        Err(e) => panic!("input model: {e} (seed {seed})"),
    }
}

fn run_case(case: u64, actions: &[Action]) -> Result<(), String> {
    let mut env = TestEnv::new();
    env.config.log_level = Some("info,leanplum_segment_agent=debug".into());
    let agent = env.start_agent();
    let mut w = World {
        env,
        agent,
        next_id: BASE + case * 10_000_000,
        next_name: 0,
        files: Vec::new(),
        expected: BTreeSet::new(),
        kills: Vec::new(),
        relaxed: Vec::new(),
        carried_duplicates: 0,
        net_read: 0,
        done: Vec::new(),
    };
    if !crate::util::wait_until(PATIENCE, || ready_lines(&w.agent.logs()) >= 1) {
        return Err(w.failure("the agent did not become ready"));
    }
    for a in actions {
        w.step(a)?;
    }
    w.final_checks()
}

impl World {
    fn step(&mut self, a: &Action) -> Result<(), String> {
        let plain: Vec<usize> = (0..self.files.len())
            .filter(|&i| !self.files[i].gzip)
            .collect();
        let any: Vec<usize> = (0..self.files.len()).collect();
        let with_partial: Vec<usize> = (0..self.files.len())
            .filter(|&i| self.files[i].partial.is_some())
            .collect();
        let fallback = Action::Create {
            lines: 2,
            dir: 0,
            atomic: true,
        };
        // Resolve what to do with the files that exist now.
        match a {
            Action::Create { lines, dir, atomic } => self.create(*lines, *dir, *atomic),
            Action::DropGzip { lines, dir } => self.drop_gzip(*lines, *dir),
            Action::Append { file, lines } => match pick(&plain, file) {
                Some(i) if self.files[i].partial.is_some() => self.finish_partial(i),
                Some(i) => self.append(i, *lines),
                None => self.step(&fallback),
            },
            Action::AppendPartial { file, cut } => match pick(&plain, file) {
                Some(i) if self.files[i].partial.is_some() => self.finish_partial(i),
                Some(i) => self.append_partial(i, cut),
                None => self.step(&fallback),
            },
            Action::FinishPartial { file } => match pick(&with_partial, file) {
                Some(i) => self.finish_partial(i),
                None => match pick(&plain, file) {
                    Some(i) => self.append_partial(i, file),
                    None => self.step(&fallback),
                },
            },
            Action::Rename { file, dir } => match pick(&any, file) {
                Some(i) => self.rename(i, *dir),
                None => self.step(&fallback),
            },
            Action::Copy { file, atomic } => match pick(&any, file) {
                Some(i) => self.copy(i, *atomic),
                None => self.step(&fallback),
            },
            Action::Rewrite { file, lines } => match pick(&any, file) {
                Some(i) => self.rewrite(i, *lines),
                None => self.step(&fallback),
            },
            Action::Delete { file } => match pick(&any, file) {
                Some(i) => self.delete(i),
                None => self.step(&fallback),
            },
            Action::Restart { kill } => self.restart(*kill),
        }
    }

    fn new_ids(&mut self, n: usize) -> Vec<u64> {
        let ids = (self.next_id..self.next_id + n as u64).collect();
        self.next_id += n as u64;
        ids
    }

    fn new_rel(&mut self, dir: u8, what: &str) -> PathBuf {
        self.next_name += 1;
        let name = format!("{what}-{:03}", self.next_name);
        if dir == 0 {
            PathBuf::from(name)
        } else {
            PathBuf::from(format!("d{dir}")).join(name)
        }
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.env.watch_dir().join(rel)
    }

    fn create(&mut self, lines: usize, dir: u8, atomic: bool) -> Result<(), String> {
        let ids = self.new_ids(lines);
        let rel = self.new_rel(dir, "f");
        let bytes = lines_bytes(&ids);
        let path = self.abs(&rel);
        if atomic {
            write_atomically(&path, &bytes);
        } else {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, &bytes).unwrap();
        }
        self.done.push(format!(
            "create {} ({lines} lines, {})",
            rel.display(),
            if atomic { "atomic" } else { "in place" }
        ));
        self.files.push(ModelFile {
            rel,
            gzip: false,
            lines: ids.clone(),
            partial: None,
        });
        self.after(Some(ids.len() as u64), &ids)
    }

    fn drop_gzip(&mut self, lines: usize, dir: u8) -> Result<(), String> {
        let ids = self.new_ids(lines);
        let rel = self.new_rel(dir, "g");
        write_atomically(&self.abs(&rel), &gzip_bytes(&lines_bytes(&ids)));
        self.done
            .push(format!("drop gzip {} ({lines} lines)", rel.display()));
        self.files.push(ModelFile {
            rel,
            gzip: true,
            lines: ids.clone(),
            partial: None,
        });
        self.after(Some(ids.len() as u64), &ids)
    }

    fn append(&mut self, i: usize, lines: usize) -> Result<(), String> {
        let ids = self.new_ids(lines);
        append_to(&self.abs(&self.files[i].rel), &lines_bytes(&ids));
        self.done.push(format!(
            "append {lines} lines to {}",
            self.files[i].rel.display()
        ));
        self.files[i].lines.extend(&ids);
        self.after(Some(ids.len() as u64), &ids)
    }

    fn append_partial(&mut self, i: usize, cut: &Index) -> Result<(), String> {
        let id = self.new_ids(1)[0];
        let line = open_session_line(id);
        // Strictly inside the line: a prefix of a JSON object is never a whole one.
        let at = 1 + cut.index(line.len() - 2);
        append_to(&self.abs(&self.files[i].rel), &line.as_bytes()[..at]);
        let mut rest = line.as_bytes()[at..].to_vec();
        rest.push(b'\n');
        let f = &mut self.files[i];
        f.partial = Some(Partial {
            event_id: id,
            line: f.lines.len() as u64 + 1,
            rest,
            paths: vec![f.rel.to_string_lossy().into_owned()],
        });
        self.done.push(format!(
            "append an unfinished line ({at} of {} bytes) to {}",
            line.len(),
            self.files[i].rel.display()
        ));
        self.after(Some(0), &[])
    }

    fn finish_partial(&mut self, i: usize) -> Result<(), String> {
        let p = self.files[i]
            .partial
            .take()
            .expect("a file with a partial line");
        let rel = self.files[i].rel.clone();
        let expired_before = self.partial_quarantined(&p);
        append_to(&self.abs(&rel), &p.rest);
        self.files[i].lines.push(p.event_id);
        self.done.push(format!(
            "finish the unfinished line of {}{}",
            rel.display(),
            if expired_before {
                " (the agent had already quarantined it)"
            } else {
                ""
            }
        ));
        let relaxed = expired_before;
        if relaxed {
            self.relaxed
                .push(Relaxed::FinishedAfterHoldExpired(rel.display().to_string()));
        }
        let result = self.after(if relaxed { None } else { Some(1) }, &[p.event_id]);
        if result.is_err() && !relaxed && self.partial_quarantined(&p) {
            // The hold ran out in the instant between the check and the write.
            self.relaxed
                .push(Relaxed::FinishedAfterHoldExpired(rel.display().to_string()));
            return Ok(());
        }
        result
    }

    /// Whether the agent has quarantined this unfinished line (its hold ran out).
    fn partial_quarantined(&self, p: &Partial) -> bool {
        quarantine_list(&self.env.config_path)
            .iter()
            .any(|e| e["line"] == p.line && p.paths.iter().any(|path| e["file"] == path.as_str()))
    }

    fn rename(&mut self, i: usize, dir: u8) -> Result<(), String> {
        let to = self.new_rel(dir, "r");
        let from = self.files[i].rel.clone();
        let abs_to = self.abs(&to);
        fs::create_dir_all(abs_to.parent().unwrap()).unwrap();
        fs::rename(self.abs(&from), &abs_to).unwrap();
        self.done
            .push(format!("rename {} -> {}", from.display(), to.display()));
        let f = &mut self.files[i];
        f.rel = to.clone();
        if let Some(p) = &mut f.partial {
            p.paths.push(to.to_string_lossy().into_owned());
        }
        self.after(Some(0), &[])
    }

    fn copy(&mut self, i: usize, atomic: bool) -> Result<(), String> {
        let to = self.new_rel(0, "c");
        let from = self.files[i].rel.clone();
        let bytes = fs::read(self.abs(&from)).unwrap();
        let abs_to = self.abs(&to);
        if atomic {
            write_atomically(&abs_to, &bytes);
        } else {
            fs::copy(self.abs(&from), &abs_to).unwrap();
        }
        self.done.push(format!(
            "copy {} -> {} ({})",
            from.display(),
            to.display(),
            if atomic { "atomic" } else { "in place" }
        ));
        let mut copy = self.files[i].clone();
        copy.rel = to.clone();
        if let Some(p) = &mut copy.partial {
            // The same content: a quarantine entry under either path is about this line.
            p.paths.push(to.to_string_lossy().into_owned());
        }
        self.files.push(copy);
        self.after(Some(0), &[])
    }

    fn rewrite(&mut self, i: usize, lines: usize) -> Result<(), String> {
        let ids = self.new_ids(lines);
        let rel = self.files[i].rel.clone();
        let mut f = fs::File::create(self.abs(&rel)).unwrap();
        f.write_all(&lines_bytes(&ids)).unwrap();
        drop(f);
        self.done.push(format!(
            "truncate and rewrite {} with {lines} new lines",
            rel.display()
        ));
        let m = &mut self.files[i];
        m.gzip = false;
        m.lines = ids.clone();
        m.partial = None;
        self.after(Some(ids.len() as u64), &ids)
    }

    fn delete(&mut self, i: usize) -> Result<(), String> {
        let f = self.files.remove(i);
        fs::remove_file(self.abs(&f.rel)).unwrap();
        self.done.push(format!("delete {}", f.rel.display()));
        self.after(Some(0), &[])
    }

    fn restart(&mut self, kill: bool) -> Result<(), String> {
        let status = status_json(&self.env.config_path);
        self.carried_duplicates += status_u64(&status, "duplicates_skipped");
        let starts = ready_lines(&self.agent.logs());
        if kill {
            self.agent.kill();
            self.kills.push(Instant::now());
        } else {
            match self.agent.stop() {
                Some(s) if s.success() => {}
                other => return Err(self.failure(&format!("SIGTERM: exit {other:?}"))),
            }
        }
        self.done.push(if kill {
            "kill -9 and start".into()
        } else {
            "SIGTERM and start".into()
        });
        self.agent = Agent::start(&self.env.config_path);
        if !crate::util::wait_until(PATIENCE, || ready_lines(&self.agent.logs()) > starts) {
            return Err(self.failure("the agent did not come back"));
        }
        self.net_read = 0;
        self.after(Some(0), &[])
    }

    /// Waits for quiescence after an action and checks what it read: `net_read` (records read
    /// and kept) grew by `read` (None: not checked), and `ids` (eventIds) were delivered.
    fn after(&mut self, read: Option<u64>, ids: &[u64]) -> Result<(), String> {
        let ids: Vec<String> = ids.iter().map(|&id| lp_id(id)).collect();
        self.expected.extend(ids.iter().cloned());
        thread::sleep(MIN_WAIT);
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if Instant::now() > deadline {
                return Err(self.failure(&format!(
                    "no quiescence within {PATIENCE:?} (waiting for {ids:?})"
                )));
            }
            let first = status_json(&self.env.config_path);
            let delivered = self.env.server.accepted_id_counts();
            if status_u64(&first, "spool_events") != 0
                || !ids.iter().all(|id| delivered.contains_key(id))
                || read.is_some_and(|r| net_read(&first) < self.net_read + r)
            {
                thread::sleep(Duration::from_millis(200));
                continue;
            }
            thread::sleep(STABLE_FOR);
            let second = status_json(&self.env.config_path);
            let same = [
                "events_read",
                "events_spooled",
                "quarantined",
                "spool_events",
            ]
            .iter()
            .all(|f| first[f] == second[f]);
            if same {
                break second;
            }
        };
        let now = net_read(&status);
        if let Some(r) = read
            && now != self.net_read + r
        {
            return Err(self.failure(&format!(
                "`{}` should have read {r} new line(s), but events_read - quarantined went from {} to {now}: {status}",
                self.done.last().map_or("", String::as_str),
                self.net_read
            )));
        }
        self.net_read = now;
        Ok(())
    }

    fn final_checks(&mut self) -> Result<(), String> {
        let status = status_json(&self.env.config_path);
        let counts = self.env.server.accepted_id_counts();
        let missing: Vec<&String> = self
            .expected
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .collect();
        let unexpected: Vec<&String> = counts
            .keys()
            .filter(|id| !self.expected.contains(*id))
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(self.failure(&format!(
                "delivered set differs from the model: missing {missing:?}, unexpected {unexpected:?}"
            )));
        }
        let first_accept = first_accept_times(&self.env);
        let unexplained: BTreeMap<&String, usize> = counts
            .iter()
            .filter(|&(id, &n)| {
                n > 1
                    && !self
                        .kills
                        .iter()
                        .any(|&k| first_accept.get(id).is_some_and(|&t| t < k))
            })
            .map(|(id, &n)| (id, n))
            .collect();
        if !unexplained.is_empty() {
            return Err(self.failure(&format!(
                "delivered more than once without a kill -9 to explain it: {unexplained:?}"
            )));
        }
        let duplicates = self.carried_duplicates + status_u64(&status, "duplicates_skipped");
        if duplicates != 0 && self.relaxed.is_empty() {
            return Err(self.failure(&format!(
                "duplicates_skipped = {duplicates}: some content was read twice without being \
                 recognised (no documented limit applies): {status}"
            )));
        }
        if !self.relaxed.is_empty() {
            eprintln!(
                "input model: duplicates_skipped {duplicates} not checked because of {:?}",
                self.relaxed
            );
        }
        match self.agent.stop() {
            Some(s) if s.success() => Ok(()),
            other => Err(self.failure(&format!("final SIGTERM: exit {other:?}"))),
        }
    }

    /// A failure message: what was done, and the agent's recent log.
    fn failure(&self, what: &str) -> String {
        let logs = self.agent.logs();
        let ours: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("leanplum_segment_agent"))
            .collect();
        format!(
            "{what}\nactions done:\n  {}\nagent log (its own lines, last 40):\n{}",
            self.done.join("\n  "),
            ours[ours.len().saturating_sub(40)..].join("\n")
        )
    }
}

/// `events_read - quarantined`: records read and kept.
fn net_read(status: &Value) -> u64 {
    status_u64(status, "events_read").saturating_sub(status_u64(status, "quarantined"))
}

/// When each messageId was first accepted.
fn first_accept_times(env: &TestEnv) -> BTreeMap<String, Instant> {
    let mut first = BTreeMap::new();
    for r in env.server.accepted_requests() {
        for id in r.message_ids() {
            first.entry(id).or_insert(r.received_at);
        }
    }
    first
}

fn pick(candidates: &[usize], index: &Index) -> Option<usize> {
    (!candidates.is_empty()).then(|| candidates[index.index(candidates.len())])
}

fn lines_bytes(ids: &[u64]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for &id in ids {
        bytes.extend_from_slice(open_session_line(id).as_bytes());
        bytes.push(b'\n');
    }
    bytes
}

fn append_to(path: &Path, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for append: {e}", path.display()));
    f.write_all(bytes).expect("append");
}
