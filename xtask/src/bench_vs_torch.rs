//! `cargo xtask bench-vs-torch`: times sluice's CPU gate and the PyTorch anchor side by side, in
//! one invocation on one machine, and reports both times, their ratio and the project's targets.
//!
//! Each round runs `sluice bench` once per model and input dtype and the anchor
//! (`xtask/anchors/torch_gate_cpu.py --rounds 1`) once; the order of the two sides alternates
//! between rounds, so slow drift in the machine's state hits both. Every cell keeps its lowest
//! per-round median, the anchor's own rule. Missed targets are reported, not failures.

mod machine;
mod measurements;
mod options;
mod quiet;
mod report;
#[cfg(test)]
mod test_file;

use std::path::{Path, PathBuf};
use std::process::Command;

use measurements::Measurements;
pub use options::USAGE;
use options::{InputDType, Model, Options};
use quiet::Quiet;

use crate::process::{command_line, relative_to, run_to_success};
use crate::python::{self, Requirements};

const ANCHOR: &str = "xtask/anchors/torch_gate_cpu.py";
const NEEDS: Requirements = Requirements {
    file: "xtask/anchors/requirements.txt",
    import_check: "import numpy, threadpoolctl, torch, transformers",
};
const REPORT: &str = "bench-vs-torch.md";
const BUILD_ARGS: &[&str] =
    &["build", "--release", "-p", "sluice-cli", "--message-format=json-render-diagnostics"];

/// Parses `args`, builds sluice, runs the rounds, prints the report and writes it with the raw
/// JSON files to the output folder.
pub fn run(root: &Path, args: &[String]) -> Result<(), String> {
    let options = Options::parse(args, machine::nproc())?;
    let started = machine::utc_now();
    let mut commands = vec![reproduce_line(args)];
    let python = if options.anchor_shapes().is_empty() {
        None // only v2, which the anchor lacks: time sluice alone
    } else {
        Some(python::interpreter(root, &NEEDS, "bench-vs-torch")?)
    };
    let sluice = match &options.sluice_bin {
        Some(path) if root.join(path).is_file() => root.join(path),
        Some(path) => return Err(format!("--sluice-bin: no file at {}", path.display())),
        None => build_sluice(root, &mut commands)?,
    };
    let out_dir = root.join(&options.out);
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;

    let mut measurements = Measurements::default();
    let mut round = Round {
        root,
        options: &options,
        out_dir: &out_dir,
        commands,
        files: Vec::new(),
        quiet: Vec::new(),
    };
    for number in 1..=options.rounds {
        println!("bench-vs-torch: round {number} of {}", options.rounds);
        let torch_first = number % 2 == 0;
        if torch_first && let Some(python) = &python {
            round.torch(python, number, &mut measurements)?;
        }
        for &model in &options.models {
            for &dtype in &options.dtypes {
                round.sluice(&sluice, model, dtype, number, &mut measurements)?;
            }
        }
        if !torch_first && let Some(python) = &python {
            round.torch(python, number, &mut measurements)?;
        }
    }

    let info = report::RunInfo {
        started,
        finished: machine::utc_now(),
        cpu: machine::cpu_model(),
        nproc: machine::nproc(),
        commit: machine::commit(root),
        quiet: round.quiet,
        commands: round.commands,
        files: round.files,
    };
    let text = report::markdown(&options, &measurements, &info);
    let report_path = out_dir.join(REPORT);
    std::fs::write(&report_path, &text)
        .map_err(|e| format!("cannot write {}: {e}", report_path.display()))?;
    println!("\n{text}");
    println!("bench-vs-torch: wrote {}", relative_to(report_path.as_os_str(), root));
    Ok(())
}

/// What every step of the rounds shares, and what they record.
struct Round<'a> {
    root: &'a Path,
    options: &'a Options,
    out_dir: &'a Path,
    commands: Vec<String>,
    files: Vec<String>,
    /// How the wait for a quiet machine before each `sluice bench` run ended.
    quiet: Vec<Quiet>,
}

impl Round<'_> {
    /// `sluice bench` for one model and input dtype, all token counts, once the machine is quiet
    /// (the anchor waits by itself, after its set-up).
    fn sluice(
        &mut self,
        sluice: &Path,
        model: &'static Model,
        dtype: InputDType,
        number: usize,
        measurements: &mut Measurements,
    ) -> Result<(), String> {
        let json =
            self.out_dir.join(format!("round{number}-sluice-{}-{}.json", model.name, dtype.name()));
        let mut command = Command::new(sluice);
        command
            .args(["bench", "--model", model.name, "--tokens", &self.options.tokens_list()])
            .args(["--dtype", dtype.name(), "--threads", &self.options.threads.to_string()])
            .arg("--json")
            .arg(&json)
            .current_dir(self.root);
        self.quiet.push(quiet::wait(self.options.max_wait));
        self.record(&command, &json);
        let what = format!("`sluice bench` ({}, {}, round {number})", model.name, dtype.name());
        run_to_success(&mut command, &what)?;
        measurements.add_sluice(&json, model, dtype, &self.options.tokens)
    }

    /// The anchor, one round over every shape it has among the chosen models.
    fn torch(
        &mut self,
        python: &Path,
        number: usize,
        measurements: &mut Measurements,
    ) -> Result<(), String> {
        let json = self.out_dir.join(format!("round{number}-torch.json"));
        let shapes = self.options.anchor_shapes();
        let mut command = Command::new(python);
        command
            .arg(self.root.join(ANCHOR))
            .args(["--shapes", &shapes.join(","), "--tokens", &self.options.tokens_list()])
            .args(["--threads", &self.options.threads.to_string(), "--rounds", "1"])
            .args(["--max-wait", &self.options.max_wait.as_secs().to_string()])
            .args(self.options.quick.then_some("--quick"))
            .arg("--json")
            .arg(&json)
            .current_dir(self.root);
        self.record(&command, &json);
        run_to_success(&mut command, &format!("the PyTorch anchor (round {number})"))?;
        measurements.add_torch(&json, &shapes, &self.options.tokens)
    }

    fn record(&mut self, command: &Command, json: &Path) {
        self.commands.push(command_line(command, self.root));
        self.files.push(relative_to(json.as_os_str(), self.root));
    }
}

/// `cargo build --release -p sluice-cli`; returns the binary cargo reports.
fn build_sluice(root: &Path, commands: &mut Vec<String>) -> Result<PathBuf, String> {
    commands.push(format!("cargo {}", BUILD_ARGS.join(" ")));
    println!("bench-vs-torch: building sluice (release)");
    crate::cargo::build(root, BUILD_ARGS)?
        .into_iter()
        .find(|e| e.target_name == "sluice" && !e.test)
        .map(|e| e.path)
        .ok_or_else(|| "cargo built sluice-cli but reported no `sluice` binary".to_owned())
}

/// The command that reproduces this run.
fn reproduce_line(args: &[String]) -> String {
    let mut command = Command::new("cargo");
    command.args(["xtask", "bench-vs-torch"]).args(args);
    command_line(&command, Path::new(""))
}
