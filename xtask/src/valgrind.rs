//! `cargo xtask valgrind`: runs the tensor and CPU backend test suites under valgrind memcheck.
//!
//! Any memory error or definite leak fails the task. Valgrind's CPU model has no AVX-512, so the
//! CPU backend's runtime dispatch takes its AVX2 and scalar paths there; those are the paths that
//! handle raw DLPack memory the same way.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The packages whose test binaries run under memcheck.
const PACKAGES: &[&str] = &["sluice-tensor", "sluice-backend-cpu"];

/// Builds the test binaries, then runs each one under memcheck.
pub fn run(root: &Path) -> Result<(), String> {
    let valgrind_found = Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !valgrind_found {
        return Err("valgrind not found (Debian: apt-get install valgrind)".to_owned());
    }
    let binaries = test_binaries(root)?;
    for binary in &binaries {
        let name = binary.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        println!("valgrind: {name}");
        let status = Command::new("valgrind")
            .args([
                "--tool=memcheck",
                "--error-exitcode=99",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
                "--quiet",
            ])
            .arg(binary)
            .args(["--test-threads=2"])
            // Keep property tests to a size valgrind finishes in minutes.
            .env("PROPTEST_CASES", "16")
            // Timed soaks lower their call-count floor under valgrind's slowdown.
            .env("SLUICE_UNDER_VALGRIND", "1")
            .current_dir(root)
            .status()
            .map_err(|e| format!("could not start valgrind: {e}"))?;
        if !status.success() {
            return Err(format!("{name}: memcheck reported errors (exit {status})"));
        }
    }
    println!("valgrind: {} test binaries clean", binaries.len());
    Ok(())
}

/// Builds the packages' tests and returns the test executables cargo reports.
fn test_binaries(root: &Path) -> Result<Vec<PathBuf>, String> {
    let mut args = vec!["test", "--no-run", "--message-format=json"];
    for package in PACKAGES {
        args.extend(["-p", package]);
    }
    let built = crate::cargo::build(root, &args)?;
    let binaries: Vec<PathBuf> =
        built.into_iter().filter(|executable| executable.test).map(|e| e.path).collect();
    if binaries.is_empty() {
        return Err("cargo reported no test binaries".to_owned());
    }
    Ok(binaries)
}
