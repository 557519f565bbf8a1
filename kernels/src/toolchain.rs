//! The one rule for finding the LLVM tools that build and inspect the device code without a
//! vendor SDK: `$SLUICE_CLANG` for the compiler, else the newest versioned Debian/Ubuntu binary
//! (`clang++-22` down to `clang++-19`) on `PATH`. clang 19 is the oldest that builds the AMD code
//! objects this project ships (code object v5 for gfx942); it is also the oldest the CI installs.
//!
//! The build script of `sluice-backend-rocm` and the tests that compile or inspect the kernels
//! all call these functions, so what a build uses and what a test checks cannot disagree.

use std::ops::RangeInclusive;
use std::process::Command;

/// The LLVM major versions searched, newest first when searching.
pub const LLVM_VERSIONS: RangeInclusive<u32> = 19..=22;

/// The environment variable that names a clang++ explicitly (any version the caller trusts).
pub const CLANG_ENV: &str = "SLUICE_CLANG";

/// The clang++ to build device code with: `$SLUICE_CLANG` when set, else the newest
/// `clang++-N` of [`LLVM_VERSIONS`] that answers `--version`.
pub fn find_clang() -> Option<String> {
    if let Some(clang) = std::env::var_os(CLANG_ENV) {
        return Some(clang.to_string_lossy().into_owned());
    }
    find_versioned("clang++")
}

/// The newest `<tool>-N` of [`LLVM_VERSIONS`] on `PATH` that answers `--version` (e.g.
/// `llvm-readelf`).
pub fn find_versioned(tool: &str) -> Option<String> {
    LLVM_VERSIONS.rev().map(|v| format!("{tool}-{v}")).find(|name| version_line(name).is_some())
}

/// The first line of `<tool> --version`, or `None` if it does not run or fails.
pub fn version_line(tool: &str) -> Option<String> {
    let output = Command::new(tool).arg("--version").output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    output.status.success().then(|| text.lines().next().unwrap_or_default().trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_that_does_not_exist_is_not_found() {
        assert_eq!(version_line("sluice-no-such-tool-19"), None);
        assert_eq!(find_versioned("sluice-no-such-tool"), None);
    }
}
