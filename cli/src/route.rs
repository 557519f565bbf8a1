//! `sluice route`: hidden states in, `topk_ids` and `topk_weights` out (and, when asked, the
//! dispatch layout and a load heatmap).

use std::path::PathBuf;

use clap::{ArgGroup, Args};
use sluice_models::reference::DispatchLayout;
use sluice_models::{Checkpoint, GateRouting, MoeGate};
use sluice_tensor::{NonFinitePolicy, Tensor};

use crate::backend::BackendArgs;
use crate::error::CliError;
use crate::gates::Gates;
use crate::io::{self, Output};
use crate::layout::{self, ContiguousRanks};
use crate::load_plot::{self, LayerLoad, PlotInfo};

/// Arguments of `sluice route`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("layout").multiple(true).args(["dispatch", "load_plot"])))]
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
    /// A safetensors file holding `hidden_states` [tokens, hidden] (f32, bf16 or f16) and, for
    /// hash-routed layers (DeepSeek-V4), `input_ids` of one id per token (int32 or int64).
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
    /// Also write the dispatch layout of each routing: `expert_counts`, `expert_offsets`,
    /// `sorted_pairs`, `inverse` and `invalid` (prefixed `layers.{L}.` with --all-layers).
    #[arg(long)]
    pub dispatch: bool,
    /// With --dispatch, also write the layout padded to blocks of N rows for a grouped GEMM:
    /// `padded_pairs`, `block_experts`, `padded_total`.
    #[arg(long, requires = "dispatch", value_parser = clap::value_parser!(u32).range(1..))]
    pub block_size: Option<u32>,
    /// Spread the experts over R ranks in contiguous ranges: --dispatch also writes
    /// `rank_counts`, `rank_offsets`, `rank_pairs`, `rank_tokens`; --load-plot shows each layer's
    /// rank imbalance.
    #[arg(long, requires = "layout", value_parser = clap::value_parser!(u32).range(1..))]
    pub ranks: Option<u32>,
    /// Draw the tokens routed to each expert of each layer as an SVG heatmap at this path.
    #[arg(long)]
    pub load_plot: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Loads the gate(s), routes (and lays out), and writes the output file (and the plot)
/// atomically, each only once everything is computed.
pub fn run(args: &RouteArgs) -> Result<(), CliError> {
    io::check_output_path(&args.output)?;
    if let Some(plot) = &args.load_plot {
        io::check_output_path(plot)?;
    }
    let checkpoint = Checkpoint::open(&args.checkpoint)?;
    let (hidden, input_ids) = io::read_hidden_states(&args.input)?;
    let backend = args.backend.build()?;
    let gates = match args.layer {
        Some(layer) => vec![MoeGate::load(&checkpoint, layer)?],
        None => all_gates(&checkpoint, args.skip_missing)?,
    };
    let policy =
        if args.mark_invalid { NonFinitePolicy::MarkInvalid } else { NonFinitePolicy::Error };
    let experts = checkpoint.config().routing().num_experts;
    let ranks = args.ranks.map(|ranks| ContiguousRanks::new(experts, ranks as usize));
    let lays_out = args.dispatch || args.load_plot.is_some();
    let mut routed = Vec::with_capacity(gates.len());
    for gate in gates {
        let gate = gate.with_apply_scaling(!args.no_scale).with_non_finite(policy);
        let layer = gate.layer();
        let in_layer = |error| CliError::in_layer(layer, error);
        let prepared = gate.prepare(backend.as_ref()).map_err(in_layer)?;
        let routing =
            prepared.route_with_token_ids(&hidden, input_ids.as_ref()).map_err(in_layer)?;
        tracing::info!(layer, tokens = routing.tokens(), top_k = routing.top_k(), "routed");
        let block_size = args.block_size.map(|block| block as usize);
        let layout = lays_out
            .then(|| layout::dispatch(&prepared, &routing, block_size, ranks.as_ref()))
            .transpose()?;
        routed.push(Routed { layer, routing, layout });
    }
    let name = |layer: usize, what: &str| {
        if args.all_layers { format!("layers.{layer}.{what}") } else { what.to_owned() }
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for Routed { layer, routing, layout } in &routed {
        tensors.push((name(*layer, "topk_ids"), routing.ids().clone()));
        tensors.push((name(*layer, "topk_weights"), routing.weights().clone()));
        if let (true, Some(layout)) = (args.dispatch, layout) {
            for (what, tensor) in layout::named_tensors(layout, routing.top_k())? {
                tensors.push((name(*layer, what), tensor));
            }
        }
    }
    let outputs: Vec<Output<'_>> =
        tensors.iter().map(|(name, tensor)| Output { name: name.clone(), tensor }).collect();
    let plot = args.load_plot.as_ref().map(|path| (path, plot(args, &routed, ranks.as_ref())));
    io::write_safetensors(&args.output, &outputs)?;
    tracing::info!(output = %args.output.display(), tensors = outputs.len(), "written");
    if let Some((path, svg)) = plot {
        io::write_atomically(path, svg.as_bytes())?;
        tracing::info!(plot = %path.display(), "written");
    }
    Ok(())
}

/// One layer's routing and, when asked for, its layout.
struct Routed {
    layer: usize,
    routing: GateRouting,
    layout: Option<DispatchLayout>,
}

/// The load heatmap of every routed layer.
fn plot(args: &RouteArgs, routed: &[Routed], ranks: Option<&ContiguousRanks>) -> String {
    let loads: Vec<LayerLoad> = routed
        .iter()
        .filter_map(|Routed { layer, layout, .. }| {
            let layout = layout.as_ref()?;
            Some(LayerLoad {
                layer: *layer,
                counts: layout.expert_counts.clone(),
                rank_counts: layout.ranks.as_ref().map(|r| r.rank_counts.clone()),
            })
        })
        .collect();
    let first = routed.first().map(|r| &r.routing);
    let name = args.checkpoint.file_name().unwrap_or(args.checkpoint.as_os_str());
    let info = PlotInfo {
        checkpoint: &name.to_string_lossy(),
        tokens: first.map_or(0, GateRouting::tokens),
        top_k: first.map_or(0, GateRouting::top_k),
        expert_ranks: ranks.map(|r| r.map().expert_ranks),
    };
    load_plot::render(&info, &loads)
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
