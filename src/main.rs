//! The `leanplum-segment-agent` binary: parse the command line, dispatch the command (each in
//! `commands/`, which sets up logging), and exit with the code its outcome or error maps to
//! (`commands::exit_code`: 78 for a bad config, so systemd does not restart-loop).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use leanplum_segment_agent::cli::{Cli, Command};
use leanplum_segment_agent::commands;

/// jemalloc instead of glibc's malloc: the agent allocates and frees small buffers at a high
/// rate (parsed records, mapped events, sled's pages), where glibc spent a quarter of the
/// ingest's CPU time (see BENCHMARKS.md). Its options are in `.cargo/config.toml`.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` reports its errors in its log, once that is set up; the others on stderr.
    let logs = matches!(cli.command, Command::Run { .. });
    commands::exit_code(commands::dispatch(cli.command), logs)
}
