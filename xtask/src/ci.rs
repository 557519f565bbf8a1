//! `cargo xtask ci`: the checks every change must pass, in the order that fails fastest.
//!
//! First the workspace (fmt, clippy, test, doc), then the Python module in `python/`, which stays
//! outside the workspace: its own fmt and clippy, the wheel built by maturin and installed into
//! the project's `.venv`, and the pytest suite with torch as the client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sluice_kernels::toolchain;

use crate::cargo;
use crate::python::{self, Requirements};

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

/// The Python module's crate, its tests, and what building and testing them needs.
const PYTHON_MANIFEST: &str = "python/Cargo.toml";
const PYTHON_TESTS: &str = "python/tests";
const PYTHON_NEEDS: Requirements = Requirements {
    file: "python/requirements-test.txt",
    import_check: "import maturin, numpy, pytest, torch",
};
/// Where the Python crate builds, under the workspace's `target/` (it has its own lockfile and
/// features, so it does not share the workspace's artifacts).
const PYTHON_TARGET: &str = "target/python";

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
    let target = root.join(PYTHON_TARGET);
    let cargo_in_python = |args: &[&str]| {
        let mut command = Command::new(cargo::program());
        command.args(args).env("CARGO_TARGET_DIR", &target);
        command
    };
    let manifest = ["--manifest-path", PYTHON_MANIFEST];
    timed("py-fmt", &mut cargo_in_python(&[&["fmt"], &manifest[..], &["--check"]].concat()), root)?;

    let venv_started = Instant::now();
    let python = python::interpreter(root, &PYTHON_NEEDS, "ci")?;
    println!("ci: {:<7} ok     ({:.1} s)", "py-env", venv_started.elapsed().as_secs_f64());

    let clippy = [&["clippy"], &manifest[..], &["--all-targets", "--", "-D", "warnings"]].concat();
    timed("py-clippy", cargo_in_python(&clippy).env("PYO3_PYTHON", &python), root)?;

    let wheels = target.join("wheels");
    if wheels.exists() {
        std::fs::remove_dir_all(&wheels)
            .map_err(|e| format!("cannot clear {}: {e}", wheels.display()))?;
    }
    let mut build = Command::new(&python);
    build.args(["-m", "maturin", "build", "--release", "--manifest-path", PYTHON_MANIFEST]);
    build.arg("--out").arg(&wheels).arg("--interpreter").arg(&python);
    timed("wheel", build.env("CARGO_TARGET_DIR", &target), root)?;
    let wheel = the_wheel(&wheels)?;

    let mut install = Command::new(&python);
    install.args(["-m", "pip", "install", "-q", "--force-reinstall", "--no-deps"]).arg(&wheel);
    timed("install", &mut install, root)?;

    let mut pytest = Command::new(&python);
    pytest.args(["-m", "pytest", "-q", PYTHON_TESTS]);
    timed("pytest", &mut pytest, root)?;
    Ok(6)
}

/// The one wheel maturin wrote into `dir`.
fn the_wheel(dir: &Path) -> Result<PathBuf, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let wheels: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .collect();
    match wheels.as_slice() {
        [wheel] => Ok(wheel.clone()),
        _ => Err(format!("expected one wheel in {}, found {}", dir.display(), wheels.len())),
    }
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
