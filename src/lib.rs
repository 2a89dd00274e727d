//! `leanplum-segment-agent`: watches a directory of Leanplum exports, turns each message
//! engagement and A/B-test impression into a Segment `track` event, spools the events durably
//! (append-only segment files indexed by sled), and drains the spool to Segment's HTTP
//! Tracking API in batches, with backoff.
//!
//! Data flows one way:
//!
//! ```text
//! watch (inotify + rescan, settle, manifests) --ready file--> ingest
//! ingest: input (detect, decompress, lines/CSV) -> leanplum types -> mapping -> spool chunk
//!         (events + the file's new offset in one sled transaction, flushed)
//! drain:  spool (FIFO) -> segment batches -> HTTP -> 2xx removes, else retry policy
//! ```
//!
//! `ARCHITECTURE.md` at the top of the repository is the code map: each part, what it must
//! never do, and the invariants.
//!
//! # Layout
//! - `cli`: the command line (clap).
//! - `commands`: one module per subcommand, and the one mapping of outcomes and errors to
//!   exit codes; `logging` sets up the log for them.
//! - `config`: the TOML config, its defaults, `validate()`, and the write key (a secret).
//! - `clock`: the wall clock (`now_ms`, file times); every "now" of the crate comes from it.
//! - `app`: the agent's life: start the tasks, supervise them (SIGHUP, the watchdog, a task
//!   that ends), shut down under a deadline; `run --daemonize`.
//! - `watch`: which files are ready to read.
//! - `input`: format detection and streaming readers that yield records with offsets.
//! - `leanplum`: Leanplum's record types, ids, times, the message / A/B-test catalog files,
//!   and the read-only content API client.
//! - `catalog`: the catalog the mapping uses: files over the API (fetched, cached in the
//!   spool, refreshed, looked up on demand while the reader waits). The files are loaded with
//!   the config and watched by a task of their own ([`catalog::files`]: inotify on
//!   `catalog_dir` plus a periodic stat), reloaded when they change, refused when they do not
//!   parse.
//! - `event`: the Segment track event, its time format and size limit; pure.
//! - `mapping`: Leanplum record -> Segment events; pure, no I/O.
//! - `ingest`: one file through input and mapping into the spool, chunk by chunk; the join
//!   of Leanplum's CSV export tables (on disk, in the spool).
//! - `spool`: segment files for the events, sled for where they are, read offsets and the rest,
//!   a hash table file for dedupe; its module doc is the on-disk format. Its parts: the queue,
//!   the file ledger (identity, state transitions), letters (quarantine, dead letters), meta.
//! - `segment`: delivery: batch budget, HTTP client, the decision table, the drain loop.
//! - `backoff`: exponential backoff with jitter, for Segment and the Leanplum API.
//! - `deadletter`: `dead-letter list | retry | purge` over the quarantine and dead letters.
//! - `stats`: counters shared by the tasks, read by status.
//! - `control`: the typed control protocol, the control socket, the status report, signals.
//! - `bench`: the parse floor the benchmarks run (hidden; the one door they have into the
//!   crate's insides).
//! - `transport`: the proxy and extra CA roots both HTTP clients (Segment, Leanplum) use.
#![forbid(unsafe_code)]

pub(crate) mod app;
pub(crate) mod backoff;
#[doc(hidden)]
pub mod bench;
pub(crate) mod catalog;
pub mod cli;
pub(crate) mod clock;
pub mod commands;
pub(crate) mod config;
pub(crate) mod control;
pub(crate) mod deadletter;
pub(crate) mod event;
pub(crate) mod ingest;
pub(crate) mod input;
pub(crate) mod leanplum;
mod logging;
pub(crate) mod mapping;
pub(crate) mod segment;
pub mod spool;
pub(crate) mod stats;
pub(crate) mod transport;
pub(crate) mod watch;
