//! `cargo xtask fixtures`: regenerates the golden router fixtures in `models/testdata`.
//!
//! The fixtures come from Hugging Face transformers' own router code, so this task needs Python
//! with the packages pinned in `xtask/fixtures/requirements.txt`. It is for developers; CI only
//! reads the committed outputs.

use std::path::{Path, PathBuf};
use std::process::Command;

const SCRIPT: &str = "xtask/fixtures/make_fixtures.py";
const REQUIREMENTS: &str = "xtask/fixtures/requirements.txt";
const DEFAULT_OUT: &str = "models/testdata";
/// Names a Python to use instead of the project's `.venv`.
const PYTHON_ENV: &str = "SLUICE_PYTHON";
/// The modules the script imports; checked before it runs so a half-made venv gets repaired.
const IMPORT_CHECK: &str = "import numpy, safetensors, torch, transformers";

/// Finds or creates the Python environment, then runs the generator. `args` go to the script;
/// `--out models/testdata` is added unless they name an output folder.
pub fn run(root: &Path, args: &[String]) -> Result<(), String> {
    let python = python(root)?;
    let mut command = Command::new(&python);
    command.arg(root.join(SCRIPT)).current_dir(root);
    if !args.iter().any(|arg| arg == "--out" || arg.starts_with("--out=")) {
        command.args(["--out", DEFAULT_OUT]);
    }
    command.args(args);
    run_to_success(&mut command, "the fixture generator")
}

/// `$SLUICE_PYTHON` if set (it must already have the packages), else `<root>/.venv`, created and
/// filled from the requirements when it is missing or lacks a package.
fn python(root: &Path) -> Result<PathBuf, String> {
    if let Some(chosen) = std::env::var_os(PYTHON_ENV) {
        let python = PathBuf::from(chosen);
        if !imports_ok(&python)? {
            let shown = python.display();
            return Err(format!(
                "{PYTHON_ENV}={shown} cannot import the fixture packages; \
                 run `{shown} -m pip install -r {REQUIREMENTS}`"
            ));
        }
        return Ok(python);
    }
    let venv = root.join(".venv");
    let python = venv_python(&venv);
    if !python.exists() {
        println!("fixtures: creating .venv");
        let mut create = Command::new("python3");
        create.args(["-m", "venv"]).arg(&venv).current_dir(root);
        run_to_success(&mut create, "python3 -m venv .venv")?;
    }
    if !imports_ok(&python)? {
        println!("fixtures: installing {REQUIREMENTS} into .venv");
        let mut install = Command::new(&python);
        install.args(["-m", "pip", "install", "-r", REQUIREMENTS]).current_dir(root);
        run_to_success(&mut install, "pip install")?;
    }
    Ok(python)
}

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

/// Whether `python` can import every module the script needs (its own errors stay quiet).
fn imports_ok(python: &Path) -> Result<bool, String> {
    let output = Command::new(python)
        .args(["-c", IMPORT_CHECK])
        .output()
        .map_err(|e| spawn_error(&python.display().to_string(), &e))?;
    Ok(output.status.success())
}

/// Runs `command`, inheriting stdout/stderr; an error names `what` and the exit status.
fn run_to_success(command: &mut Command, what: &str) -> Result<(), String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let status = command.status().map_err(|e| spawn_error(&program, &e))?;
    if status.success() { Ok(()) } else { Err(format!("{what} failed ({status})")) }
}

fn spawn_error(program: &str, error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::NotFound {
        format!(
            "{program} not found (install Python 3, or set {PYTHON_ENV} to a Python that has \
             the packages in {REQUIREMENTS})"
        )
    } else {
        format!("could not start {program}: {error}")
    }
}
