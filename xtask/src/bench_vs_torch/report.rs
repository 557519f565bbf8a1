//! The markdown report: machine and method, one table pair per model, the commands that ran.

use std::fmt::Write as _;

use super::measurements::{Measurements, TORCH_BF16_GATE, TORCH_F32_GATE, TORCH_F32_GEMM};
use super::options::{InputDType, Model, Options};
use super::quiet::Quiet;
use crate::json::Value;

/// What the run knows besides the numbers.
pub struct RunInfo {
    /// Start and end, UTC.
    pub started: String,
    /// End, UTC.
    pub finished: String,
    /// CPU model from `/proc/cpuinfo`.
    pub cpu: String,
    /// CPUs available.
    pub nproc: usize,
    /// sluice's commit.
    pub commit: String,
    /// Outcome of the quiet-machine wait before each `sluice bench` run.
    pub quiet: Vec<Quiet>,
    /// Every command, in the order it ran, as a shell line.
    pub commands: Vec<String>,
    /// The raw JSON files written, relative to the project root where possible.
    pub files: Vec<String>,
}

/// One compared cell, as the tables show it.
struct Row {
    tokens: usize,
    sluice_ms: Option<f64>,
    torch_ms: Option<f64>,
    /// The torch column is the GEMM alone (no HF gate without transformers).
    torch_gemm_only: bool,
    target: Option<f64>,
}

impl Row {
    /// torch / sluice: above 1 means sluice is faster.
    fn speedup(&self) -> Option<f64> {
        Some(self.torch_ms? / self.sluice_ms?)
    }

    fn met(&self) -> Option<bool> {
        Some(self.speedup()? >= self.target?)
    }
}

/// The whole report, also what the task prints.
pub fn markdown(options: &Options, measurements: &Measurements, info: &RunInfo) -> String {
    let mut out = String::new();
    let meta = |key: &str| meta_text(measurements.anchor_metas.last(), key);
    let (sluice_spread, torch_spread) = measurements.worst_spread();
    let tables: Vec<(&Model, InputDType, Vec<Row>)> = options
        .models
        .iter()
        .flat_map(|&model| options.dtypes.iter().map(move |&dtype| (model, dtype)))
        .map(|(model, dtype)| (model, dtype, rows(options, measurements, model, dtype)))
        .collect();
    let mut met = 0;
    let mut missed = Vec::new();
    for (model, dtype, rows) in &tables {
        for row in rows {
            match row.met() {
                Some(true) => met += 1,
                Some(false) => missed.push(format!(
                    "{} {} T = {} ({:.2}x < {}x)",
                    model.name,
                    dtype.name(),
                    row.tokens,
                    row.speedup().unwrap_or(0.0),
                    row.target.unwrap_or(0.0)
                )),
                None => {}
            }
        }
    }

    let _ = writeln!(out, "# sluice vs PyTorch: the MoE gate on the CPU\n");
    let _ = writeln!(out, "- Date: {} to {}.", info.started, info.finished);
    let _ = writeln!(
        out,
        "- Machine: {} (flags: {}), nproc {}; {} threads on both sides.",
        info.cpu,
        meta("cpu_flags"),
        info.nproc,
        options.threads
    );
    let _ =
        writeln!(out, "- sluice: commit {}, `cargo build --release -p sluice-cli`.", info.commit);
    let _ = writeln!(
        out,
        "- PyTorch side (`xtask/anchors/torch_gate_cpu.py`): python {}, torch {} (CPU capability \
         {}; {}; {}), transformers {}, numpy {} (BLAS: {}).",
        meta("python"),
        meta("torch"),
        meta("torch_cpu_capability"),
        meta("torch_mkl"),
        meta("torch_onednn"),
        meta("transformers"),
        meta("numpy"),
        meta("numpy_blas")
    );
    let rounds = match options.rounds {
        1 => "1 round".to_owned(),
        n => {
            format!("{n} interleaved rounds (sluice first in odd rounds, torch first in even ones)")
        }
    };
    let _ = writeln!(
        out,
        "- Method: {rounds}; a round runs `sluice bench` once per model and input dtype and the \
         anchor once (`--rounds 1`). Each cell below is the lowest of its per-round medians. Both \
         sides time the whole gate with the same weight every call (cache-resident: a best case)."
    );
    let sluice_budget = match measurements.sluice_metas.first() {
        Some(m) if m.get("min_calls").is_some() && m.get("min_seconds").is_some() => format!(
            ">= {} timed calls and >= {} s per cell",
            meta_text(Some(m), "min_calls"),
            meta_text(Some(m), "min_seconds")
        ),
        _ => "its own budget (not in its JSON)".to_owned(),
    };
    let _ = writeln!(
        out,
        "- Medians after warm-up: `sluice bench` {sluice_budget}; the anchor >= {} timed calls and \
         >= 0.25 s per cell{}.",
        meta("min_calls_per_median"),
        if options.quick { " (`--quick`)" } else { "" }
    );
    let _ = writeln!(
        out,
        "- Quiet machine (other processes < 5% of the CPUs for two 2 s windows): before each \
         `sluice bench` run {}; at each anchor run's start (its own wait) {}. Worst CPU share \
         other processes used during a kept anchor measurement: {}.",
        quiet_summary(&info.quiet),
        anchor_quiet(&measurements.anchor_metas),
        worst_foreign_share(&measurements.anchor_metas)
    );
    let _ = writeln!(
        out,
        "- Round-to-round spread (max/min of a cell's medians), worst cell: sluice {sluice_spread:.2}x, \
         torch {torch_spread:.2}x."
    );
    let _ = writeln!(
        out,
        "- Ratio = torch ms / sluice ms (> 1: sluice is faster). GFLOP/s = 2*T*H*E / sluice's time \
         (GEMM flops only, also for the whole gate)."
    );
    let _ = writeln!(
        out,
        "- Targets (V3 and Kimi-K2): bf16 input vs torch best gate 3x at T = 1, 1.5x at T = 8 and \
         64, 1x at T = 512 and 2048; f32 input vs HF gate f32 1x at every T."
    );
    let total = met + missed.len();
    if missed.is_empty() {
        let _ = writeln!(out, "- Targets met: {met} of {total}.");
    } else {
        let _ = writeln!(out, "- Targets met: {met} of {total}; missed: {}.", missed.join(", "));
    }

    for &model in &options.models {
        let _ = writeln!(
            out,
            "\n## {}: hidden {} -> {} experts (`--model {}`)",
            model.title, model.hidden, model.experts, model.name
        );
        for (_, dtype, rows) in tables.iter().filter(|(m, _, _)| *m == model) {
            write_table(&mut out, model, *dtype, rows);
        }
    }

    let _ = writeln!(out, "\n## Commands\n\n```sh");
    for command in &info.commands {
        let _ = writeln!(out, "{command}");
    }
    let _ = writeln!(out, "```\n\nRaw results: {}.", info.files.join(", "));
    out
}

fn rows(options: &Options, m: &Measurements, model: &Model, dtype: InputDType) -> Vec<Row> {
    options
        .tokens
        .iter()
        .map(|&tokens| {
            let torch = |column: &str| m.torch_ms(model.anchor_shape?, tokens, column);
            let (torch_ms, torch_gemm_only) = match dtype {
                InputDType::Bf16 => (torch(TORCH_BF16_GATE), false),
                InputDType::F32 => match torch(TORCH_F32_GATE) {
                    Some(ms) => (Some(ms), false),
                    None => (torch(TORCH_F32_GEMM), true),
                },
            };
            Row {
                tokens,
                sluice_ms: m.sluice_ms(model, dtype, tokens),
                torch_ms,
                torch_gemm_only: torch_gemm_only && torch_ms.is_some(),
                target: dtype.target_speedup(tokens).filter(|_| model.has_targets),
            }
        })
        .collect()
}

fn write_table(out: &mut String, model: &Model, dtype: InputDType, rows: &[Row]) {
    let gemm_only = rows.iter().any(|r| r.torch_gemm_only);
    let (heading, torch_label) = match dtype {
        InputDType::Bf16 => (
            "bf16 input, bf16 weight: sluice's whole gate vs torch best gate (F.linear bf16, \
             .float(), routing in torch)",
            "torch best gate ms",
        ),
        InputDType::F32 if gemm_only => (
            "f32 input: sluice's whole gate (bf16 weight) vs torch F.linear f32 -- the GEMM alone, \
             as the anchor ran without transformers (no HF gate column)",
            "torch F.linear f32 ms",
        ),
        InputDType::F32 => (
            "f32 input: sluice's whole gate (bf16 weight) vs HF gate f32 (transformers router \
             forward: f32 weight, f32 GEMM + routing)",
            "HF gate f32 ms",
        ),
    };
    let _ = writeln!(out, "\n{heading}\n");
    let _ = writeln!(
        out,
        "| T | sluice {} ms | sluice GFLOP/s | {torch_label} | torch / sluice | target | |",
        dtype.name()
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---|");
    for row in rows {
        let gflops = row.sluice_ms.map(|ms| model.gemm_flops(row.tokens) / (ms * 1e6));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.tokens,
            row.sluice_ms.map_or("-".to_owned(), format_ms),
            gflops.map_or("-".to_owned(), |g| format!("{g:.1}")),
            row.torch_ms.map_or("n/a".to_owned(), format_ms),
            row.speedup().map_or("-".to_owned(), |s| format!("{s:.2}x")),
            row.target.map_or("-".to_owned(), |t| format!("{t}x")),
            match row.met() {
                Some(true) => "pass",
                Some(false) => "**miss**",
                None => "",
            }
        );
    }
    if model.anchor_shape.is_none() {
        let _ = writeln!(out, "\n(The anchor has no {} shape.)", model.title);
    }
}

/// Milliseconds with about four significant digits.
fn format_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms:.4}")
    } else if ms < 100.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.1}")
    }
}

/// A `meta` field as text ("?" when absent; `null` as "none").
fn meta_text(meta: Option<&Value>, key: &str) -> String {
    match meta.and_then(|m| m.get(key)) {
        None => "?".to_owned(),
        Some(Value::Null) => "none".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(_) => "(structured)".to_owned(),
    }
}

/// "quiet 3 of 4, gave up waiting 1", or "not checked".
fn quiet_summary(waits: &[Quiet]) -> String {
    let count = |outcome| waits.iter().filter(|&&q| q == outcome).count();
    let (reached, gave_up) = (count(Quiet::Reached), count(Quiet::GaveUp));
    match (reached + gave_up, gave_up) {
        (0, _) => Quiet::NotChecked.describe().to_owned(),
        (checked, 0) => format!("quiet {reached} of {checked}"),
        (checked, _) => {
            format!("quiet {reached} of {checked}, {} {gave_up}", Quiet::GaveUp.describe())
        }
    }
}

/// The anchor's `quiet_at_start` of each run, in words.
fn anchor_quiet(metas: &[Value]) -> String {
    let words: Vec<&str> = metas
        .iter()
        .map(|m| match m.get("quiet_at_start") {
            Some(Value::Bool(true)) => Quiet::Reached.describe(),
            Some(Value::Bool(false)) => Quiet::GaveUp.describe(),
            _ => Quiet::NotChecked.describe(),
        })
        .collect();
    if words.is_empty() { "?".to_owned() } else { words.join(", ") }
}

fn worst_foreign_share(metas: &[Value]) -> String {
    metas
        .iter()
        .filter_map(|m| m.get("worst_foreign_cpu_share").and_then(Value::as_f64))
        .reduce(f64::max)
        .map_or("?".to_owned(), |share| format!("{:.1}%", share * 100.0))
}

#[cfg(test)]
mod tests {
    use super::super::options::MODELS;
    use super::super::test_file::TempFile;
    use super::*;

    /// Two rounds of made-up numbers for V3 and V2 (which the anchor lacks), T = 1 and 16, from
    /// an anchor run without transformers (no `gate_hf`).
    #[test]
    fn whole_report_from_two_rounds() {
        let args: Vec<String> = ["--models", "v3,v2", "--tokens", "1,16", "--rounds", "2"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        let options = Options::parse(&args, 2).expect("valid arguments");
        let sluice = |model: &str, dtype: &str, ms1: f64, ms16: f64| {
            format!(
                r#"{{"results": [
                  {{"model": "{model}", "tokens": 1, "dtype": "{dtype}", "backend": "cpu", "median_ms": {ms1}}},
                  {{"model": "{model}", "tokens": 16, "dtype": "{dtype}", "backend": "cpu", "median_ms": {ms16}}}],
                  "meta": {{"min_calls": 20, "min_seconds": 0.5}}}}"#
            )
        };
        let torch = |gate_best_1: f64, quiet: &str| {
            format!(
                r#"{{"meta": {{"torch": "2.15.0", "worst_foreign_cpu_share": 0.02, "quiet_at_start": {quiet},
                    "min_calls_per_median": 20}},
                  "results": {{"v3": {{"1": {{"gate_best": {gate_best_1}, "lin_f32": 0.1}},
                                      "16": {{"gate_best": 0.4, "lin_f32": 0.8}}}}}}}}"#
            )
        };
        let files = [
            (TempFile::new("r1-v3-bf16", &sluice("v3", "bf16", 0.02, 0.2)), "v3", InputDType::Bf16),
            (TempFile::new("r2-v3-bf16", &sluice("v3", "bf16", 0.03, 0.3)), "v3", InputDType::Bf16),
            (TempFile::new("r1-v3-f32", &sluice("v3", "f32", 0.05, 1.0)), "v3", InputDType::F32),
            (TempFile::new("r2-v3-f32", &sluice("v3", "f32", 0.05, 1.0)), "v3", InputDType::F32),
            (TempFile::new("r1-v2-bf16", &sluice("v2", "bf16", 0.01, 0.1)), "v2", InputDType::Bf16),
            (TempFile::new("r1-v2-f32", &sluice("v2", "f32", 0.01, 0.1)), "v2", InputDType::F32),
        ];
        let mut m = Measurements::default();
        for (file, model, dtype) in &files {
            let model = MODELS.iter().find(|m| m.name == *model).expect("known model");
            m.add_sluice(file.path(), model, *dtype, &options.tokens).expect("sluice file");
        }
        let torch_files = [
            TempFile::new("r1-torch", &torch(0.08, "true")),
            TempFile::new("r2-torch", &torch(0.05, "null")),
        ];
        for file in &torch_files {
            m.add_torch(file.path(), &options.anchor_shapes(), &options.tokens)
                .expect("anchor file");
        }
        let info = RunInfo {
            started: "start".into(),
            finished: "end".into(),
            cpu: "Test CPU".into(),
            nproc: 2,
            commit: "abc1234".into(),
            quiet: vec![Quiet::Reached, Quiet::GaveUp, Quiet::Reached, Quiet::NotChecked],
            commands: vec!["cmd one".into()],
            files: vec!["a.json".into(), "b.json".into()],
        };
        let text = markdown(&options, &m, &info);
        // V3 bf16: sluice min(0.02, 0.03) = 0.02 ms, torch min(0.08, 0.05) = 0.05 ms: 2.50x < 3x.
        let flops_t1 = 2.0 * 7168.0 * 256.0 / (0.02 * 1e6);
        let expected = format!("| 1 | 0.0200 | {flops_t1:.1} | 0.0500 | 2.50x | 3x | **miss** |");
        assert!(text.contains(&expected), "{expected}\n{text}");
        // T = 16 has no bf16 target; sluice 0.2 vs torch 0.4 is still reported.
        assert!(text.contains("| 16 | 0.2000 | "), "{text}");
        assert!(text.contains("| 0.4000 | 2.00x | - |  |"), "{text}");
        // f32 falls back to the GEMM column and says so; 0.1 / 0.05 and 0.8 / 1.0.
        assert!(text.contains("torch F.linear f32 ms"), "{text}");
        assert!(text.contains("| 0.1000 | 2.00x | 1x | pass |"), "{text}");
        assert!(text.contains("| 0.8000 | 0.80x | 1x | **miss** |"), "{text}");
        // V2 has no anchor shape and no targets.
        assert!(text.contains("(The anchor has no DeepSeek-V2 shape.)"), "{text}");
        assert!(text.contains("| n/a | - | - |  |"), "{text}");
        assert!(
            text.contains("Targets met: 1 of 3; missed: v3 bf16 T = 1 (2.50x < 3x), v3 f32 T = 16")
        );
        assert!(
            text.contains(
                "before each `sluice bench` run quiet 2 of 3, gave up waiting (busy) 1; at each \
                 anchor run's start (its own wait) quiet, not checked."
            ),
            "{text}"
        );
        assert!(text.contains("worst cell: sluice 1.50x, torch 1.60x"), "{text}");
        assert!(text.contains("`sluice bench` >= 20 timed calls and >= 0.5 s per cell;"), "{text}");
        assert!(text.contains("```sh\ncmd one\n```\n\nRaw results: a.json, b.json."), "{text}");
    }

    fn row(sluice_ms: f64, torch_ms: f64, target: Option<f64>) -> Row {
        Row {
            tokens: 1,
            sluice_ms: Some(sluice_ms),
            torch_ms: Some(torch_ms),
            torch_gemm_only: false,
            target,
        }
    }

    #[test]
    fn ratio_is_torch_over_sluice_and_checks_the_target() {
        let faster = row(0.01, 0.05, Some(3.0));
        assert!((faster.speedup().unwrap_or(0.0) - 5.0).abs() < 1e-12);
        assert_eq!(faster.met(), Some(true));
        assert_eq!(row(0.02, 0.05, Some(3.0)).met(), Some(false));
        assert_eq!(row(0.05, 0.05, Some(1.0)).met(), Some(true));
        assert_eq!(row(0.05, 0.05, None).met(), None);
        let no_torch = Row { torch_ms: None, ..row(0.05, 0.0, Some(1.0)) };
        assert_eq!((no_torch.speedup(), no_torch.met()), (None, None));
    }

    #[test]
    fn milliseconds_keep_about_four_digits() {
        assert_eq!(format_ms(0.012345), "0.0123");
        assert_eq!(format_ms(4.2734), "4.273");
        assert_eq!(format_ms(123.456), "123.5");
    }

    #[test]
    fn meta_fields_render_as_text() {
        let meta = crate::json::parse(r#"{"torch": "2.15.0", "nproc": 2, "quiet": null, "x": []}"#)
            .expect("valid");
        let text = |key| meta_text(Some(&meta), key);
        assert_eq!(
            [text("torch"), text("nproc"), text("quiet"), text("x"), text("none")],
            ["2.15.0", "2", "none", "(structured)", "?"]
        );
        let metas = [
            crate::json::parse(r#"{"worst_foreign_cpu_share": 0.012}"#).expect("valid"),
            crate::json::parse(r#"{"worst_foreign_cpu_share": 0.04}"#).expect("valid"),
        ];
        assert_eq!(worst_foreign_share(&metas), "4.0%");
        assert_eq!(worst_foreign_share(&[]), "?");
    }
}
