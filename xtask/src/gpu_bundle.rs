//! `cargo xtask gpu-bundle`: everything a GPU machine without a Rust toolchain needs to run the
//! CUDA backend's tests, the Python module's CUDA tests (its wheel, installed there without
//! network), compute-sanitizer on the Rust tests, `sluice bench --backend cuda` and the PyTorch
//! anchors (the gate, and the sort-based dispatch layout) side by side, in one git-ignored folder
//! with a `run.sh`. The tests of device ordinal 1 are among them; `run.sh devices` runs only
//! those, on a machine with two GPUs, failing them rather than skipping where one is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::run_to_success;
use crate::python;

/// The folder the bundle is written to, under the workspace root (git-ignored).
pub const FOLDER: &str = "gpu-bundle";

/// The packages whose test binaries need a GPU.
const GPU_TEST_PACKAGES: &[&str] = &["sluice-backend-cuda"];

const RUN_SH: &str = include_str!("gpu_bundle/run.sh");
const SIDE_BY_SIDE: &str = include_str!("gpu_bundle/side_by_side.py");

/// Builds the bundle in `root/gpu-bundle` (or the folder given after `--out`).
pub fn run(root: &Path, args: &[String]) -> Result<(), String> {
    let out = match args {
        [] => root.join(FOLDER),
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        _ => return Err(format!("usage: cargo xtask gpu-bundle [--out DIR]; got {args:?}")),
    };
    let mut test_args = vec!["test", "--release", "--no-run", "--message-format=json"];
    for package in GPU_TEST_PACKAGES {
        test_args.extend(["-p", package]);
    }
    println!("gpu-bundle: building the GPU test binaries (release)");
    let tests: Vec<_> =
        crate::cargo::build(root, &test_args)?.into_iter().filter(|e| e.test).collect();
    println!("gpu-bundle: building sluice (release)");
    let sluice = crate::cargo::build(
        root,
        &["build", "--release", "-p", "sluice-cli", "--message-format=json-render-diagnostics"],
    )?
    .into_iter()
    .find(|e| e.target_name == "sluice" && !e.test)
    .ok_or("cargo built sluice-cli but reported no `sluice` binary")?;
    println!("gpu-bundle: building the sluice wheel (release)");
    let interpreter = python::interpreter(root, &python::WHEEL_NEEDS, "gpu-bundle")?;
    let (mut build, wheels) = python::wheel_build(root, &interpreter)?;
    run_to_success(&mut build, "maturin build")?;
    let wheel = python::the_wheel(&wheels)?;

    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    for dir in ["bin", "tests", "anchors", "python/tests"] {
        create_dir(&out.join(dir))?;
    }
    for test in &tests {
        // Test binaries are named `<target>-<hash>`; the target name is enough here.
        copy_stripped(&test.path, &out.join("tests").join(&test.target_name))?;
    }
    copy_stripped(&sluice.path, &out.join("bin/sluice"))?;
    // The fixtures and README.md where the repository has them, which the Python tests expect.
    copy_tree(&root.join("models/testdata"), &out.join("models/testdata"))?;
    copy(&root.join("README.md"), &out.join("README.md"))?;
    for anchor in ["torch_gate_gpu.py", "torch_dispatch_gpu.py"] {
        copy(&root.join("xtask/anchors").join(anchor), &out.join("anchors").join(anchor))?;
    }
    // pip takes the wheel's tags from its file name, so it keeps it.
    let wheel_name = wheel.file_name().ok_or("the wheel path has no file name")?;
    copy(&wheel, &out.join("python").join(wheel_name))?;
    copy_python_sources(&root.join("python/tests"), &out.join("python/tests"))?;
    write(&out.join("side_by_side.py"), SIDE_BY_SIDE)?;
    write(&out.join("run.sh"), RUN_SH)?;
    make_executable(&out.join("run.sh"))?;
    println!(
        "gpu-bundle: {} test binaries, sluice, the wheel, the Python tests, fixtures and the \
         anchor in {}; run `bash {}/run.sh` on the GPU machine",
        tests.len(),
        out.display(),
        out.file_name().map_or_else(|| out.display().to_string(), |n| n.to_string_lossy().into()),
    );
    Ok(())
}

/// Copies an executable without its debug sections (the line tables the release profile keeps
/// would make the bundle several times larger), or as it is where `strip` is missing.
fn copy_stripped(from: &Path, to: &Path) -> Result<(), String> {
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(to)
        .arg(from)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        println!("gpu-bundle: `strip` failed or is missing; copying {} as it is", from.display());
        copy(from, to)?;
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    create_dir(to)?;
    let entries = std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", from.display()))?;
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() { copy_tree(&path, &target)? } else { copy(&path, &target)? }
    }
    Ok(())
}

/// Copies the `.py` files of a folder (not its caches).
fn copy_python_sources(from: &Path, to: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", from.display()))?.path();
        if let (Some(name), Some("py")) =
            (path.file_name(), path.extension().and_then(|e| e.to_str()))
        {
            copy(&path, &to.join(name))?;
        }
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to).map(drop).map_err(|e| format!("copying {}: {e}", from.display()))
}

fn create_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn make_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", path.display()))
}
