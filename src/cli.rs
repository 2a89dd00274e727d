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
    /// Run the agent in the foreground (what systemd starts).
    Run {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Load and validate the config exactly as `run` does; exit 0, or 78 with every problem.
    CheckConfig {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Print the Segment events FILEs would produce, as JSON lines; spools and sends nothing.
    DryRun {
        /// Config for the catalog and mapping options. Without it (and with no file at the
        /// default path) the defaults apply and the catalog is empty.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}
