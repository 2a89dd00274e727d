//! The integration test binary: drives the real `leanplum-segment-agent` binary against a fake
//! Segment server on `127.0.0.1:0`, real files in a temporary watch directory, and a real sled
//! spool, checking the contract of SPEC sections 2, 3, 5 and 6 from the outside.
//!
//! # Layout
//! - [`util`]: the harness (also included by the benchmarks): a threaded HTTP server under the
//!   fake Segment and Leanplum servers, the agent as a child process, config builder, test
//!   world, subcommands and `status --json`, files, generated exports, delivery checks.
//! - [`harness`]: the fake Segment server answers every request, many at once, in both modes.
//! - [`events`]: expected Segment events (the shipped fixture and ones derived from it) and the
//!   comparison that reports missing, extra and duplicated events field by field.
//! - [`end_to_end`]: every input format through the daemon into Segment, exactly once.
//! - [`retries`]: 503 / 429 answers re-send the same events, honouring `Retry-After`.
//! - [`batch_limits`]: uncompressed batches within a small `max_batch_bytes`.
//! - [`concurrency`]: the adaptive concurrency limit against a server whose delay and answers
//!   the test controls, and `max_events_per_sec` measured at the server.
//! - [`cli`]: `check-config` exit codes and messages, `dry-run`.
//! - [`commands`]: the supervision seen from outside: the watchdog stops on a stalled loop,
//!   `run` exits 78 on a bad config.
//! - [`delivery_faults`]: Segment misbehaving: 400 bisection, oversize events, 401, outages,
//!   connection refused, timeouts, `Retry-After` dates, backoff reset (SPEC section 6).
//! - [`spool_limits`]: `spool.max_bytes`, a full disk, a corrupt spool (SPEC section 7).
//! - [`crash`]: `kill -9` at random moments loses nothing (SPEC section 7).
//! - [`csv_export`]: Leanplum's CSV export joined into the same events as its JSON export,
//!   whatever order a job's tables arrive in (SPEC section 4).
//! - [`input_files`]: files renamed, copied, grown, truncated, replaced, written slowly,
//!   gzipped, waiting for a manifest, deleted or moved after delivery; restarts (SPEC section 7).
//! - [`bad_input`]: each kind of bad input is quarantined with its file and line, and the good
//!   records beside it arrive (SPEC section 8).
//! - [`catalog_api`]: the catalog fetched from a Leanplum-compatible API, cached, refreshed,
//!   looked up on demand; files waiting while Leanplum is down (SPEC sections 3 and 5).
//! - [`catalog_files`]: the catalog files rewritten while running (by rename, in place) are
//!   reloaded without a signal; a broken one is refused (exit 78 at start, the last good
//!   catalog kept while running) and shown in `status` (SPEC section 5).
//! - [`parallel_ingest`]: big files parsed on several threads: file order, exact line numbers,
//!   damage, and `kill -9` while parsed batches wait for their commit (SPEC sections 7 and 8).
//! - [`parking`]: records of messages the catalog does not know are parked, delivered once it
//!   learns them, listed and purged otherwise (SPEC section 5).
//! - [`network`]: `segment.proxy` (a loopback proxy counting what goes through it), the
//!   environment's `HTTP_PROXY` / `NO_PROXY`, and `ca_file` with a loopback TLS server and a
//!   test CA (SPEC section 3).
//! - [`reload`]: SIGHUP: a write key rotated in its file after `auth_failed`, a catalog with a
//!   changed channel, a smaller `max_batch_events`, a `[watch]` change needing a restart; `run`
//!   exiting 78 on a bad config.
//! - [`operate`]: `files` in each state, running and stopped; `replay` of files and directories.
//! - [`power_cut`]: power cuts during ingest, on [`powercut_fs`] (a FUSE file system that drops
//!   what was not fsynced), lose no committed event (SPEC section 7).
//! - [`input_model`]: random file histories and restarts against a model of what must be
//!   delivered, exactly once (SPEC section 7).
#![deny(unsafe_code)]

mod bad_input;
mod batch_limits;
mod catalog_api;
mod catalog_files;
mod cli;
mod commands;
mod concurrency;
mod crash;
mod csv_export;
mod delivery_faults;
mod end_to_end;
mod events;
mod harness;
mod input_files;
mod input_model;
mod network;
mod operate;
mod parallel_ingest;
mod parking;
mod power_cut;
mod powercut_fs;
mod reload;
mod retries;
mod service;
mod spool_limits;
mod util;
