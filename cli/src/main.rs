//! `sluice`: MoE gating from the command line.

use std::process::ExitCode;

use clap::Parser;

/// MoE gating for DeepSeek V2/V3 and Kimi-K2 checkpoints.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    /// More output (repeat for more); `RUST_LOG` works too.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

fn main() -> ExitCode {
    let _cli = Cli::parse();
    ExitCode::SUCCESS
}
