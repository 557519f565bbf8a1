//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the cargo-fuzz targets under `fuzz/`.
//!
//! Needs the nightly toolchain and `cargo install cargo-fuzz`. Each target starts from its committed
//! seed corpus in `fuzz/corpus/<target>`; new inputs are added there and crashes land in
//! `fuzz/artifacts/<target>`.

use std::path::Path;
use std::process::Command;

const DEFAULT_SECONDS: u64 = 60;

/// Parses the arguments and runs every requested target (all of them by default).
pub fn run(root: &Path, args: &[String]) -> Result<(), String> {
    let mut seconds = DEFAULT_SECONDS;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args.next().ok_or("--seconds needs a value")?;
                seconds = value.parse().map_err(|_| format!("--seconds: not a number: {value}"))?;
            }
            other if other.starts_with('-') => return Err(format!("fuzz: unknown flag {other}")),
            target => targets.push(target.to_owned()),
        }
    }
    let fuzz_dir = root.join("fuzz");
    if targets.is_empty() {
        targets = list_targets(&fuzz_dir)?;
    }
    for target in &targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .map_err(|e| format!("cannot create {}: {e}", corpus.display()))?;
        println!("fuzz: {target} for {seconds} s");
        let status = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(&fuzz_dir)
            .status()
            .map_err(|e| format!("could not start cargo fuzz: {e}"))?;
        if !status.success() {
            return Err(format!(
                "fuzz target `{target}` failed; the crashing input is in fuzz/artifacts/{target} \
                 (is cargo-fuzz installed? `cargo install cargo-fuzz`)"
            ));
        }
        println!("fuzz: {target} ok");
    }
    Ok(())
}

/// The `[[bin]]` names declared in `fuzz/Cargo.toml`.
fn list_targets(fuzz_dir: &Path) -> Result<Vec<String>, String> {
    let manifest = std::fs::read_to_string(fuzz_dir.join("Cargo.toml"))
        .map_err(|e| format!("cannot read fuzz/Cargo.toml: {e}"))?;
    let targets: Vec<String> = manifest
        .split("[[bin]]")
        .skip(1)
        .filter_map(|section| {
            let line = section.lines().find(|l| l.trim_start().starts_with("name"))?;
            Some(line.split('"').nth(1)?.to_owned())
        })
        .collect();
    if targets.is_empty() {
        return Err("fuzz/Cargo.toml declares no targets".to_owned());
    }
    Ok(targets)
}
