//! Project automation for sluice, in the `cargo xtask` style.
//!
//! `cargo xtask ci` is the one test command. Other tasks are for developers and need more than the
//! Rust toolchain (Python with torch and transformers for `fixtures` and `bench-vs-torch`).

mod bench_vs_torch;
mod cargo;
mod ci;
mod fixtures;
mod fuzz;
mod gpu_bundle;
mod json;
mod process;
mod python;
mod valgrind;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  ci        fmt --check, clippy -D warnings, test, doc (warnings denied), then the Python module:
            its fmt and clippy, the wheel (maturin), pytest with torch (installed into .venv from
            $SLUICE_WHEELHOUSE, else ~/.cache/sluice/wheels); stops at the first failure
  fixtures  regenerate models/testdata: golden router outputs from Hugging Face transformers
            (Python: $SLUICE_PYTHON, else .venv, created from xtask/fixtures/requirements.txt)
  fuzz [--seconds 60] [TARGET...]
            run the cargo-fuzz targets under fuzz/ (all by default) for that long each
            (needs nightly and `cargo install cargo-fuzz`)
  valgrind  run the tensor and CPU backend test suites under valgrind memcheck
  gpu-bundle [--out DIR]
            release builds of the GPU tests and sluice, the fixtures, the PyTorch anchor and a
            run.sh, in gpu-bundle/ (git-ignored), for a GPU machine without a Rust toolchain
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci::run(&project_root()),
        Some("fixtures") => fixtures::run(&project_root(), &args[1..]),
        Some("fuzz") => fuzz::run(&project_root(), &args[1..]),
        Some("valgrind") => valgrind::run(&project_root()),
        Some("gpu-bundle") => gpu_bundle::run(&project_root(), &args[1..]),
        Some("bench-vs-torch") => bench_vs_torch::run(&project_root(), &args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}{}", bench_vs_torch::USAGE);
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(format!("unknown task `{other}`\n{USAGE}{}", bench_vs_torch::USAGE)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of this crate's manifest directory.
fn project_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}
