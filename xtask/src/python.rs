//! Finding or creating the Python that `ci` (the Python tests) and the developer tasks
//! (`fixtures`, `bench-vs-torch`, `gpu-bundle`) run, and building the `sluice` wheel with it.
//!
//! `$SLUICE_PYTHON` wins when set, and must already have the packages. Otherwise the project's
//! `.venv` is used, created with `python3 -m venv` when missing and filled from the task's
//! requirements file when it cannot import what the task needs.
//!
//! Packages are installed from a wheelhouse that outlives the clone (`$SLUICE_WHEELHOUSE`, else
//! `~/.cache/sluice/wheels`): `pip download` fills it with what is missing, then `pip install
//! --no-index` installs from it. torch's default wheel and its CUDA libraries are gigabytes, and
//! pip's own HTTP cache keeps nothing from an index that answers `no-store`, so without the
//! wheelhouse every fresh clone downloads them again.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::run_to_success;

/// The Python module's crate, outside the workspace.
pub const MANIFEST: &str = "python/Cargo.toml";
/// What building the wheel and running `python/tests` needs (torch is the client the tests
/// exercise).
pub const TEST_NEEDS: Requirements = Requirements {
    file: "python/requirements-test.txt",
    import_check: "import maturin, numpy, pytest, torch",
};
/// What building the wheel alone needs (`gpu-bundle`); the file is the tests', so a venv made
/// for one task serves the other.
pub const WHEEL_NEEDS: Requirements =
    Requirements { file: "python/requirements-test.txt", import_check: "import maturin" };
/// Where the Python crate builds, under the workspace's `target/` (it has its own lockfile and
/// features, so it does not share the workspace's artifacts).
pub const TARGET: &str = "target/python";

/// Names a Python to use instead of the project's `.venv`.
const PYTHON_ENV: &str = "SLUICE_PYTHON";
/// Names the wheelhouse packages are downloaded into and installed from.
const WHEELHOUSE_ENV: &str = "SLUICE_WHEELHOUSE";
/// The project's virtual environment, relative to the root.
const VENV: &str = ".venv";

/// What a task needs from Python.
pub struct Requirements {
    /// The pip requirements file that provides it, relative to the project root.
    pub file: &'static str,
    /// A Python statement that succeeds only when every module the task imports is there; it is
    /// checked before the task runs so a half-made venv gets repaired.
    pub import_check: &'static str,
}

/// The Python to run `task` with: `$SLUICE_PYTHON`, else `<root>/.venv`, created or completed
/// from `needs.file` first when it lacks a package.
pub fn interpreter(root: &Path, needs: &Requirements, task: &str) -> Result<PathBuf, String> {
    if let Some(chosen) = std::env::var_os(PYTHON_ENV) {
        let python = PathBuf::from(chosen);
        if !imports_ok(&python, needs)? {
            let shown = python.display();
            return Err(format!(
                "{PYTHON_ENV}={shown} cannot import what {task} needs; \
                 run `{shown} -m pip install -r {}`",
                needs.file
            ));
        }
        return Ok(python);
    }
    let venv = root.join(VENV);
    let python = venv_python(&venv);
    if !python.exists() {
        println!("{task}: creating {VENV}");
        let mut create = Command::new("python3");
        create.args(["-m", "venv"]).arg(&venv).current_dir(root);
        match create.status() {
            Err(e) => return Err(spawn_error("python3", &e, needs)),
            Ok(status) if !status.success() => {
                return Err(format!("python3 -m venv {VENV} failed ({status})"));
            }
            Ok(_) => {}
        }
    }
    if !imports_ok(&python, needs)? {
        let wheelhouse = wheelhouse()?;
        println!("{task}: installing {} into {VENV} from {}", needs.file, wheelhouse.display());
        let mut download = Command::new(&python);
        download.args(["-m", "pip", "download", "-q", "-r", needs.file, "-d"]);
        run_to_success(download.arg(&wheelhouse).current_dir(root), "pip download")?;
        let mut install = Command::new(&python);
        install.args(["-m", "pip", "install", "-q", "--no-index", "--find-links"]);
        install.arg(&wheelhouse).args(["-r", needs.file]).current_dir(root);
        run_to_success(&mut install, "pip install")?;
    }
    Ok(python)
}

/// Where downloaded wheels are kept between clones.
fn wheelhouse() -> Result<PathBuf, String> {
    if let Some(chosen) = std::env::var_os(WHEELHOUSE_ENV) {
        return Ok(PathBuf::from(chosen));
    }
    let cache = match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(cache), _) => PathBuf::from(cache),
        (None, Some(home)) => PathBuf::from(home).join(".cache"),
        (None, None) => {
            return Err(format!("neither HOME nor XDG_CACHE_HOME is set; set {WHEELHOUSE_ENV}"));
        }
    };
    Ok(cache.join("sluice").join("wheels"))
}

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

/// Whether `python` can import every module the task needs (its own errors stay quiet).
fn imports_ok(python: &Path, needs: &Requirements) -> Result<bool, String> {
    let output = Command::new(python)
        .args(["-c", needs.import_check])
        .output()
        .map_err(|e| spawn_error(&python.display().to_string(), &e, needs))?;
    Ok(output.status.success())
}

fn spawn_error(program: &str, error: &std::io::Error, needs: &Requirements) -> String {
    if error.kind() == std::io::ErrorKind::NotFound {
        format!(
            "{program} not found (install Python 3, or set {PYTHON_ENV} to a Python that has \
             the packages in {})",
            needs.file
        )
    } else {
        format!("could not start {program}: {error}")
    }
}

/// The command that builds the `sluice` wheel (release, abi3) with maturin run by `python`, and
/// the folder it writes the wheel to, emptied first so that [`the_wheel`] finds this one.
pub fn wheel_build(root: &Path, python: &Path) -> Result<(Command, PathBuf), String> {
    let target = root.join(TARGET);
    let wheels = target.join("wheels");
    if wheels.exists() {
        std::fs::remove_dir_all(&wheels)
            .map_err(|e| format!("cannot clear {}: {e}", wheels.display()))?;
    }
    let mut build = Command::new(python);
    build.args(["-m", "maturin", "build", "--release", "--manifest-path", MANIFEST]);
    build.arg("--out").arg(&wheels).arg("--interpreter").arg(python);
    build.env("CARGO_TARGET_DIR", &target).current_dir(root);
    Ok((build, wheels))
}

/// The one wheel maturin wrote into `dir`.
pub fn the_wheel(dir: &Path) -> Result<PathBuf, String> {
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
