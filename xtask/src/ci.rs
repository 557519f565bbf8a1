//! `cargo xtask ci`: the checks every change must pass, in the order that fails fastest.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// One CI step: a name for the summary line and the cargo arguments that run it.
struct Step {
    name: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

const STEPS: &[Step] = &[
    Step { name: "fmt", args: &["fmt", "--all", "--check"], env: &[] },
    Step {
        name: "clippy",
        args: &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"],
        env: &[],
    },
    Step { name: "test", args: &["test", "--workspace"], env: &[] },
    Step {
        name: "doc",
        args: &["doc", "--workspace", "--no-deps"],
        env: &[("RUSTDOCFLAGS", "-D warnings")],
    },
];

/// Says up front whether the test step will compile the GPU kernels with clang (the test in
/// `kernels/tests/clang.rs` skips where no clang is found, unless `SLUICE_REQUIRE_CLANG` is set).
fn report_kernel_compiler() {
    let found = std::env::var_os("SLUICE_CLANG")
        .map(|c| c.to_string_lossy().into_owned())
        .into_iter()
        .chain((16..=19).rev().map(|v| format!("clang++-{v}")))
        .find(|name| {
            Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success())
        });
    match found {
        Some(clang) => {
            println!("ci: kernels: {clang} compiles the device source for NVPTX and AMDGPU")
        }
        None => {
            println!("ci: kernels: SKIPPED, no clang++ (16 to 19) found; .ci/run installs clang-19")
        }
    }
}

/// Runs every step in `root`, printing one summary line per step; stops at the first failure.
pub fn run(root: &Path) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    report_kernel_compiler();
    for step in STEPS {
        let started = Instant::now();
        let status = Command::new(&cargo)
            .args(step.args)
            .envs(step.env.iter().copied())
            .current_dir(root)
            .status()
            .map_err(|e| format!("could not start `cargo {}`: {e}", step.args.join(" ")))?;
        let seconds = started.elapsed().as_secs_f64();
        if status.success() {
            println!("ci: {:<7} ok     ({seconds:.1} s)", step.name);
        } else {
            println!("ci: {:<7} FAILED ({seconds:.1} s)", step.name);
            return Err(format!("step `{}` failed: cargo {}", step.name, step.args.join(" ")));
        }
    }
    println!("ci: all {} steps passed", STEPS.len());
    Ok(())
}
