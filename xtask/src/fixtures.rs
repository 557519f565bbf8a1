//! `cargo xtask fixtures`: regenerates the golden router fixtures in `models/testdata`.
//!
//! The fixtures come from Hugging Face transformers' own router code, so this task needs Python
//! with the packages pinned in `xtask/fixtures/requirements.txt`. It is for developers; CI only
//! reads the committed outputs.

use std::path::Path;
use std::process::Command;

use crate::process::run_to_success;
use crate::python::{self, Requirements};

const SCRIPT: &str = "xtask/fixtures/make_fixtures.py";
const DEFAULT_OUT: &str = "models/testdata";
const NEEDS: Requirements = Requirements {
    file: "xtask/fixtures/requirements.txt",
    import_check: "import numpy, safetensors, torch, transformers",
};

/// Finds or creates the Python environment, then runs the generator. `args` go to the script;
/// `--out models/testdata` is added unless they name an output folder.
pub fn run(root: &Path, args: &[String]) -> Result<(), String> {
    let python = python::interpreter(root, &NEEDS, "fixtures")?;
    let mut command = Command::new(&python);
    command.arg(root.join(SCRIPT)).current_dir(root);
    if !args.iter().any(|arg| arg == "--out" || arg.starts_with("--out=")) {
        command.args(["--out", DEFAULT_OUT]);
    }
    command.args(args);
    run_to_success(&mut command, "the fixture generator")
}
