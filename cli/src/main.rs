//! `sluice`: MoE gating for DeepSeek V2/V3/V3.2/V4 and Kimi-K2 checkpoints, from the command line.
//!
//! Every failure ends the same way: one line on stderr naming the problem, a non-zero exit code, and
//! nothing written at the output path.

mod backend;
mod bench;
mod bench_layout;
mod check;
mod demo;
mod error;
mod extract;
mod gates;
mod info;
mod inspect;
mod io;
mod layout;
mod load_plot;
mod logging;
mod route;
mod selftest;
mod synthetic;
mod timing;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// MoE gating for DeepSeek V2/V3/V3.2/V4 and Kimi-K2: router GEMM, grouped top-k, bias correction,
/// hash-routed layers, renormalisation and scaling, from real Hugging Face checkpoints.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, propagate_version = true)]
struct Cli {
    /// Log what happens (`-v` info, `-vv` debug, `-vvv` trace); `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Route a batch through a DeepSeek-V3-shaped gate, check it against the reference, and show
    /// where the tokens went.
    Demo(demo::DemoArgs),
    /// Describe a checkpoint: model family, MoE layers, gate shapes and dtypes (or missing),
    /// routing config.
    Inspect(inspect::InspectArgs),
    /// Route hidden states from a safetensors file through a checkpoint's gate(s).
    Route(route::RouteArgs),
    /// Time the full gate (router GEMM + routing) on synthetic weights of a real model's shape,
    /// or on a checkpoint's gate.
    Bench(bench::BenchArgs),
    /// Copy a checkpoint's MoE gates (config.json and the gate tensors, nothing else) into a new
    /// checkpoint folder.
    ExtractGates(extract::ExtractArgs),
    /// Which backends this build has, whether each can run on this machine or why not, and for
    /// ROCm the embedded AMD architectures and kernels and the HIP runtime found.
    Info(info::InfoArgs),
    /// Route random inputs of every model family and of generic configs on one backend, compare
    /// with the reference router, and print a verdict and what to send back.
    Selftest(selftest::SelftestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.verbose);
    let result = match &cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Route(args) => route::run(args),
        Command::Bench(args) => bench::run(args),
        Command::ExtractGates(args) => extract::run(args),
        Command::Info(args) => info::run(args),
        Command::Selftest(args) => selftest::run(args),
    };
    logging::report_peak_memory();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice: {}", error.one_line());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
