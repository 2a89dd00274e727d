//! The integration test binary: drives the real `leanplum-segment-agent` binary against a fake
//! Segment server on `127.0.0.1:0`, real files in a temporary watch directory, and a real sled
//! spool, checking the contract of SPEC sections 2, 3, 5 and 6 from the outside.
//!
//! # Layout
//! - [`util`]: the harness: fake Segment server, the agent as a child process, config builder,
//!   file helpers, polling.
//! - [`events`]: expected Segment events (the shipped fixture and ones derived from it) and the
//!   comparison that reports missing, extra and duplicated events field by field.
//! - [`end_to_end`]: every input format through the daemon into Segment, exactly once.
//! - [`retries`]: 503 / 429 answers re-send the same events, honouring `Retry-After`.
//! - [`batch_limits`]: uncompressed batches within a small `max_batch_bytes`.
//! - [`cli`]: `check-config` exit codes and messages, `dry-run`.
#![deny(unsafe_code)]

mod batch_limits;
mod cli;
mod end_to_end;
mod events;
mod retries;
mod util;
