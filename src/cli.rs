//! The command line (SPEC section 2).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_PATH;

#[derive(Debug, Parser)]
#[command(
    name = "leanplum-segment-agent",
    version,
    about = "Turns Leanplum engagement exports into Segment track events, durably"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground (what systemd starts), or as a classic daemon.
    Run {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Double-fork into the background (for hosts without systemd).
        #[arg(long)]
        daemonize: bool,
        /// With --daemonize: the pid file, locked while the daemon runs.
        #[arg(
            long,
            default_value = "/run/leanplum-segment-agent/agent.pid",
            requires = "daemonize"
        )]
        pidfile: PathBuf,
        /// With --daemonize: where the logs go [default: <spool.dir>/agent.log].
        #[arg(long, requires = "daemonize")]
        log_file: Option<PathBuf>,
    },
    /// Load and validate the config exactly as `run` does; exit 0, or 78 with every problem.
    CheckConfig {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Ask the running agent how it is doing; with none running, read the spool. Exit 0 when
    /// running, 3 when stopped, 1 on error.
    Status {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// One JSON object with stable field names instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, requeue or drop quarantined records and events Segment refused for good.
    DeadLetter {
        #[arg(long, default_value = DEFAULT_PATH, global = true)]
        config: PathBuf,
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// What the agent knows of a message or A/B test, and where it came from (files, API,
    /// cache); without ID, everything. Asks the running agent; with none, reads the files and
    /// the spool's cache.
    Catalog {
        #[arg(long, default_value = DEFAULT_PATH, global = true)]
        config: PathBuf,
        #[command(subcommand)]
        action: CatalogAction,
    },
    /// Every input file the agent knows: path, format, size, events read / queued / delivered,
    /// state (waiting, reading, held, done, delivered, failed) and why it waits or failed.
    /// Asks the running agent; with none, reads the spool.
    Files {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// Only files in this state.
        #[arg(long, value_parser = ["waiting", "reading", "held", "done", "delivered", "failed"])]
        state: Option<String>,
    },
    /// Have the running agent (re-)ingest these files or directories, inside watch.dir or not,
    /// read before or not, skipping the dedupe check for them: an explicit backfill, or a
    /// re-send after a catalog fix. Progress shows in `files`. Needs a running agent (exit 3
    /// without one).
    Replay {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the Segment events FILEs would produce, as JSON lines; spools and sends nothing.
    DryRun {
        /// Config for the catalog and mapping options. Without it (and with no file at the
        /// default path) the defaults apply and the catalog is empty.
        #[arg(long)]
        config: Option<PathBuf>,
        /// One line on stderr per record not sent (or not wholly): why.
        #[arg(long)]
        explain: bool,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CatalogAction {
    /// Print the catalog's source and age, and every entry (or the one with ID).
    Show {
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// List quarantined records, parked records and dead letters: id, kind, time, file:line,
    /// reason.
    List {
        #[arg(long)]
        json: bool,
        /// Only this kind: quarantine (bad input), parked (waiting for the catalog), dead-letter
        /// (refused by Segment), waiting (CSV export records waiting in the join).
        #[arg(long, value_parser = ["quarantine", "parked", "dead-letter", "waiting"])]
        kind: Option<String>,
        /// Only entries of this file (its path under watch.dir, or the end of it).
        #[arg(long)]
        file: Option<String>,
    },
    /// One entry in full: the record or event kept, why, from which file and line, and when.
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Requeue dead letters and re-parse quarantined records (all, or only IDs).
    Retry { ids: Vec<u64> },
    /// Drop entries for good (all, or only IDs).
    Purge { ids: Vec<u64> },
}
