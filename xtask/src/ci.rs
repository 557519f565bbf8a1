//! `cargo xtask ci`: the checks every change must pass, in the order that fails fastest.
//!
//! First the workspace (fmt, clippy, test, doc), then the Python module in `python/`, which stays
//! outside the workspace: its own fmt and clippy, the wheel built by maturin and installed into
//! the project's `.venv`, and the pytest suite with torch as the client.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use sluice_kernels::toolchain;

use crate::cargo;
use crate::python;

/// One workspace step: a name for the summary line and the cargo arguments that run it.
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

/// The Python module's tests.
const PYTHON_TESTS: &str = "python/tests";

/// Says up front whether the test step will compile the GPU kernels with clang (the test in
/// `kernels/tests/clang.rs` skips where no clang is found, unless `SLUICE_REQUIRE_CLANG` is set),
/// finding it by the rule the test and `backend-rocm/build.rs` use.
fn report_kernel_compiler() {
    let versions = toolchain::LLVM_VERSIONS;
    match toolchain::find_clang() {
        Some(clang) => {
            println!("ci: kernels: {clang} compiles the device source for NVPTX and AMDGPU")
        }
        None => println!(
            "ci: kernels: SKIPPED, no clang++ ({} to {}) found; .ci/run installs clang-19",
            versions.start(),
            versions.end()
        ),
    }
}

/// Runs every step in `root`, printing one summary line per step; stops at the first failure.
pub fn run(root: &Path) -> Result<(), String> {
    report_kernel_compiler();
    let started = Instant::now();
    let mut steps = 0;
    for step in STEPS {
        let mut command = Command::new(cargo::program());
        command.args(step.args).envs(step.env.iter().copied());
        timed(step.name, &mut command, root)?;
        steps += 1;
    }
    steps += python_steps(root)?;
    println!("ci: all {steps} steps passed ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}

/// The Python module: fmt, clippy, wheel, install, pytest. Returns the number of steps run.
fn python_steps(root: &Path) -> Result<usize, String> {
    let target = root.join(python::TARGET);
    let cargo_in_python = |args: &[&str]| {
        let mut command = Command::new(cargo::program());
        command.args(args).env("CARGO_TARGET_DIR", &target);
        command
    };
    let manifest = ["--manifest-path", python::MANIFEST];
    timed("py-fmt", &mut cargo_in_python(&[&["fmt"], &manifest[..], &["--check"]].concat()), root)?;

    let venv_started = Instant::now();
    let python = python::interpreter(root, &python::TEST_NEEDS, "ci")?;
    println!("ci: {:<7} ok     ({:.1} s)", "py-env", venv_started.elapsed().as_secs_f64());

    let clippy = [&["clippy"], &manifest[..], &["--all-targets", "--", "-D", "warnings"]].concat();
    timed("py-clippy", cargo_in_python(&clippy).env("PYO3_PYTHON", &python), root)?;

    let (mut build, wheels) = python::wheel_build(root, &python)?;
    timed("wheel", &mut build, root)?;
    let wheel = python::the_wheel(&wheels)?;

    let mut install = Command::new(&python);
    install.args(["-m", "pip", "install", "-q", "--force-reinstall", "--no-deps"]).arg(&wheel);
    timed("install", &mut install, root)?;

    let mut pytest = Command::new(&python);
    pytest.args(["-m", "pytest", "-q", PYTHON_TESTS]);
    timed("pytest", &mut pytest, root)?;
    Ok(6)
}

/// Runs `command` in `root` as the step `name`, printing its summary line.
fn timed(name: &str, command: &mut Command, root: &Path) -> Result<(), String> {
    let started = Instant::now();
    let shown = crate::process::command_line(command, root);
    let status = command
        .current_dir(root)
        .status()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    if status.success() {
        println!("ci: {name:<7} ok     ({seconds:.1} s)");
        Ok(())
    } else {
        println!("ci: {name:<7} FAILED ({seconds:.1} s)");
        Err(format!("step `{name}` failed: {shown}"))
    }
}
