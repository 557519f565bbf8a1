//! `sluice route`: hidden states in, `topk_ids` and `topk_weights` out.

use std::path::PathBuf;

use clap::Args;
use sluice_models::{Checkpoint, GateRouting, MoeGate};
use sluice_tensor::NonFinitePolicy;

use crate::backend::BackendArgs;
use crate::error::CliError;
use crate::gates::Gates;
use crate::io::{self, Output};

/// Arguments of `sluice route`.
#[derive(Debug, Args)]
pub struct RouteArgs {
    /// The checkpoint folder (config.json + safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The MoE layer whose gate routes.
    #[arg(long, required_unless_present = "all_layers", conflicts_with = "all_layers")]
    pub layer: Option<usize>,
    /// Route through every MoE layer's gate; outputs are named `layers.{L}.topk_ids` and
    /// `layers.{L}.topk_weights`. A checkpoint that lacks some gates is refused, listing them.
    #[arg(long)]
    pub all_layers: bool,
    /// With --all-layers, route the layers whose gates the checkpoint holds and skip the others
    /// (named on stderr) instead of refusing a partial checkpoint.
    #[arg(long, requires = "all_layers")]
    pub skip_missing: bool,
    /// A safetensors file holding `hidden_states` [tokens, hidden] (f32, bf16 or f16).
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write `topk_ids` (int32 [tokens, top_k]) and `topk_weights` (float32).
    #[arg(long)]
    pub output: PathBuf,
    /// Leave `routed_scaling_factor` to the caller instead of applying it in the gate.
    #[arg(long)]
    pub no_scale: bool,
    /// Route tokens with non-finite values as invalid (ids -1, weights 0) instead of failing.
    #[arg(long)]
    pub mark_invalid: bool,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Loads the gate(s), routes, and writes the output file atomically.
pub fn run(args: &RouteArgs) -> Result<(), CliError> {
    io::check_output_path(&args.output)?;
    let checkpoint = Checkpoint::open(&args.checkpoint)?;
    let hidden = io::read_hidden_states(&args.input)?;
    let backend = args.backend.build()?;
    let gates = match args.layer {
        Some(layer) => vec![MoeGate::load(&checkpoint, layer)?],
        None => all_gates(&checkpoint, args.skip_missing)?,
    };
    let policy =
        if args.mark_invalid { NonFinitePolicy::MarkInvalid } else { NonFinitePolicy::Error };
    let mut routings: Vec<(usize, GateRouting)> = Vec::with_capacity(gates.len());
    for gate in gates {
        let gate = gate.with_apply_scaling(!args.no_scale).with_non_finite(policy);
        let layer = gate.layer();
        let routing = gate
            .route(backend.as_ref(), &hidden)
            .map_err(|error| CliError::in_layer(layer, error))?;
        tracing::info!(layer, tokens = routing.tokens(), top_k = routing.top_k(), "routed");
        routings.push((layer, routing));
    }
    let name = |layer: usize, what: &str| {
        if args.all_layers { format!("layers.{layer}.{what}") } else { what.to_owned() }
    };
    let outputs: Vec<Output<'_>> = routings
        .iter()
        .flat_map(|(layer, routing)| {
            [
                Output { name: name(*layer, "topk_ids"), tensor: routing.ids() },
                Output { name: name(*layer, "topk_weights"), tensor: routing.weights() },
            ]
        })
        .collect();
    io::write_safetensors(&args.output, &outputs)?;
    tracing::info!(output = %args.output.display(), tensors = outputs.len(), "written");
    Ok(())
}

/// Every MoE layer's gate. A partial checkpoint is refused unless `skip_missing`: a caller who
/// asks for all layers and gets fewer, without having said that is fine, would compare or feed
/// forward an incomplete routing without noticing. With `skip_missing`, the skipped layers are
/// named on stderr, and the output's tensor names say which layers it holds.
fn all_gates(checkpoint: &Checkpoint, skip_missing: bool) -> Result<Vec<MoeGate>, CliError> {
    let gates = Gates::load_all(checkpoint)?;
    if !skip_missing {
        return gates.require_all(
            checkpoint.dir(),
            "pass --skip-missing to route the layers that are present",
        );
    }
    if gates.present.is_empty() {
        return Err(CliError::Input(format!(
            "{}: holds none of the {} MoE gates, nothing to route",
            checkpoint.dir().display(),
            gates.missing.len()
        )));
    }
    if !gates.missing.is_empty() {
        eprintln!(
            "sluice: skipped MoE {} (no gate in {})",
            gates.missing_layers(),
            checkpoint.dir().display()
        );
    }
    Ok(gates.present)
}
