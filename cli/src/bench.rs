//! `sluice bench`: the full gate (router GEMM + routing) timed on synthetic weights of a real
//! model's shape, or on a checkpoint's own gate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::json;
use sluice_models::{Checkpoint, MoeGate};

use crate::backend::{BackendArgs, BackendKind};
use crate::bench_layout::{self, LayoutTimes};
use crate::error::CliError;
use crate::gates::Gates;
use crate::io;
use crate::synthetic::{self, ModelShape};
use crate::timing::{self, Budget};

/// The hidden states' dtype (the synthetic weight is bf16, as in real checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputDType {
    /// bf16 hidden states.
    Bf16,
    /// f32 hidden states (never rounded to bf16).
    F32,
}

impl InputDType {
    pub(crate) fn name(self) -> &'static str {
        match self {
            InputDType::Bf16 => "bf16",
            InputDType::F32 => "f32",
        }
    }
}

mod device;

/// Arguments of `sluice bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The model whose gate shape to time, with synthetic weights.
    #[arg(long, value_enum, default_value_t = ModelShape::V3, conflicts_with = "checkpoint")]
    pub model: ModelShape,
    /// Time a checkpoint's own gate instead (a full checkpoint, or one made by extract-gates).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The MoE layer of --checkpoint whose gate to time (default: the first one it holds).
    #[arg(long, requires = "checkpoint")]
    pub layer: Option<usize>,
    /// Token counts T to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 64, 512, 2048])]
    pub tokens: Vec<usize>,
    /// Hidden-state dtype.
    #[arg(long, value_enum, default_value_t = InputDType::Bf16)]
    pub dtype: InputDType,
    /// Minimum seconds of timed calls per T (after warm-up).
    #[arg(long, default_value_t = 0.5)]
    pub min_seconds: f64,
    /// Minimum timed calls per T.
    #[arg(long, default_value_t = 20)]
    pub min_calls: usize,
    /// Also time the dispatch layout of each routing (`dispatch_into` into buffers allocated
    /// once), alone and after the gate, and report what it adds to the gate (with
    /// `--backend cuda`: both replayed from CUDA graphs).
    #[arg(long)]
    pub dispatch: bool,
    /// With --dispatch, pad the layout to blocks of N rows.
    #[arg(long, requires = "dispatch", value_parser = clap::value_parser!(u32).range(1..))]
    pub block_size: Option<u32>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// One measured cell.
struct Row {
    tokens: usize,
    median: Duration,
    min: Duration,
    calls: usize,
    gflops: f64,
    layout: Option<LayoutTimes>,
}

/// Times the gate at every T and prints (and optionally writes) the results.
pub fn run(args: &BenchArgs) -> Result<(), CliError> {
    if let Some(path) = &args.json {
        io::check_output_path(path)?;
    }
    if !(args.min_seconds.is_finite() && args.min_seconds >= 0.0) {
        return Err(CliError::Input(format!(
            "--min-seconds must be >= 0, got {}",
            args.min_seconds
        )));
    }
    for &tokens in &args.tokens {
        args.backend.check_tokens("bench", tokens)?;
    }
    if args.backend.backend == BackendKind::Cuda {
        return device::run(args);
    }
    let backend = args.backend.build()?;
    let (model, gate) = match &args.checkpoint {
        Some(dir) => checkpoint_gate(dir, args.layer)?,
        None => (args.model.name().to_owned(), args.model.gate(1)?),
    };
    let prepared = gate.prepare(backend.as_ref())?;
    let (h, e) = (gate.hidden_size(), gate.num_experts());
    let weight_dtype = gate.weight().dtype().name();
    println!(
        "sluice bench: {model} gate ({h} -> {e}, {}), {} input, {weight_dtype} weight, {} backend",
        gate.spec(),
        args.dtype.name(),
        backend.name()
    );
    print!("{:>6}  {:>10}  {:>10}  {:>9}  {:>6}", "T", "median ms", "min ms", "GFLOP/s", "calls");
    if args.dispatch {
        print!("  {:>12}  {:>15}  {:>8}", "layout ms", "gate+layout ms", "added");
    }
    println!();
    let mut rows = Vec::with_capacity(args.tokens.len());
    for &tokens in &args.tokens {
        let hidden = synthetic::hidden_states(tokens, h, args.dtype == InputDType::Bf16, 2)?;
        let token_ids = synthetic::token_ids(&gate, tokens, 3)?;
        let budget = Budget {
            warmup_calls: 3,
            min_calls: args.min_calls,
            min_time: Duration::from_secs_f64(args.min_seconds),
            max_calls: 1_000_000,
        };
        let route = || prepared.route_with_token_ids(&hidden, token_ids.as_ref()).map(drop);
        let samples = timing::measure(budget, route)?;
        let median = samples.median();
        let flops = 2.0 * tokens as f64 * h as f64 * e as f64;
        let gflops = if median.is_zero() { 0.0 } else { flops / median.as_secs_f64() / 1e9 };
        print!(
            "{tokens:>6}  {:>10.4}  {:>10.4}  {gflops:>9.1}  {:>6}",
            median.as_secs_f64() * 1e3,
            samples.min().as_secs_f64() * 1e3,
            samples.len()
        );
        let block_size = args.block_size.map(|block| block as usize);
        let layout = args
            .dispatch
            .then(|| bench_layout::time_layout(&prepared, &hidden, block_size, budget))
            .transpose()?;
        if let Some(layout) = &layout {
            print!(
                "  {:>12.4}  {:>15.4}  {:>7.2}%",
                layout.alone.median().as_secs_f64() * 1e3,
                layout.with_gate.median().as_secs_f64() * 1e3,
                added_percent(layout, median)
            );
        }
        println!();
        rows.push(Row { tokens, median, min: samples.min(), calls: samples.len(), gflops, layout });
    }
    if let Some(path) = &args.json {
        let results: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "model": model,
                    "tokens": r.tokens,
                    "dtype": args.dtype.name(),
                    "backend": backend.name(),
                    "median_ms": r.median.as_secs_f64() * 1e3,
                    "min_ms": r.min.as_secs_f64() * 1e3,
                    "calls": r.calls,
                    "gflops": r.gflops,
                    "layout_median_ms": r.layout.as_ref().map(|l| l.alone.median().as_secs_f64() * 1e3),
                    "gate_and_layout_median_ms":
                        r.layout.as_ref().map(|l| l.with_gate.median().as_secs_f64() * 1e3),
                    "layout_added_percent": r.layout.as_ref().map(|l| added_percent(l, r.median)),
                })
            })
            .collect();
        let document = json!({
            "results": results,
            "meta": {
                "hidden_size": h,
                "num_experts": e,
                "routing": gate.spec().to_string(),
                "weight_dtype": weight_dtype,
                "checkpoint": args.checkpoint.as_ref().map(|dir| dir.display().to_string()),
                "layer": args.checkpoint.as_ref().map(|_| gate.layer()),
                "threads": args.backend.threads,
                "min_seconds": args.min_seconds,
                "min_calls": args.min_calls,
                "layout_block_size": args.block_size,
            },
        });
        let text = serde_json::to_string_pretty(&document)
            .map_err(|e| CliError::Input(format!("cannot encode the results: {e}")))?;
        io::write_atomically(path, text.as_bytes())?;
    }
    Ok(())
}

/// What the layout adds to the gate: its own median over the gate's, in percent (the difference
/// of the two medians, gate alone and gate + layout, is the same quantity with the noise of two
/// separate measurements of the gate in it; both are printed).
fn added_percent(layout: &LayoutTimes, gate: Duration) -> f64 {
    if gate.is_zero() {
        return 0.0;
    }
    layout.alone.median().as_secs_f64() / gate.as_secs_f64() * 100.0
}

/// The gate of `layer` of a checkpoint, or of its first MoE layer that has one, and the name to
/// report it under (`DeepSeek-V3 layer 3`).
fn checkpoint_gate(dir: &Path, layer: Option<usize>) -> Result<(String, MoeGate), CliError> {
    let checkpoint = Checkpoint::open(dir)?;
    let gate = match layer {
        Some(layer) => MoeGate::load(&checkpoint, layer)?,
        None => Gates::load_all(&checkpoint)?.present.into_iter().next().ok_or_else(|| {
            CliError::Input(format!("{}: holds no MoE gate to time", dir.display()))
        })?,
    };
    let name = format!("{} layer {}", checkpoint.config().family(), gate.layer());
    Ok((name, gate))
}
