//! `sluice demo`: the whole mission in a few seconds, on a gate of a real model's shape
//! (DeepSeek-V3 unless `--model` says otherwise).

use std::time::Duration;

use clap::Args;
use sluice_models::reference::{self, DispatchLayout, Routing};
use sluice_tensor::DispatchShape;

use crate::backend::BackendArgs;
use crate::check;
use crate::error::CliError;
use crate::synthetic::{self, ModelShape};
use crate::timing::{self, Budget};

/// Arguments of `sluice demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The model whose gate shape to build (`v4-hash`: a DeepSeek-V4 hash-routed layer, routed
    /// with random token ids).
    #[arg(long, value_enum, default_value_t = ModelShape::V3)]
    pub model: ModelShape,
    /// Tokens in the batch.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Seed for the synthetic weights and hidden states.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// How many tokens' routing to print.
    #[arg(long, default_value_t = 4)]
    pub show: usize,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Builds the gate, routes, checks against the reference, times it, and only then prints what
/// happened and how fast: a failure at any step prints nothing on stdout.
pub fn run(args: &DemoArgs) -> Result<(), CliError> {
    let backend = args.backend.build()?;
    args.backend.check_tokens("demo", args.tokens)?;
    let shape = args.model;
    let gate = shape.gate(args.seed)?;
    let spec = *gate.spec();
    let (h, e) = (gate.hidden_size(), gate.num_experts());
    let hidden = synthetic::hidden_states(args.tokens, h, true, args.seed.wrapping_add(1))?
        .with_requires_grad(true);
    let token_ids = synthetic::token_ids(&gate, args.tokens, args.seed.wrapping_add(2))?;
    let token_ids = token_ids.as_ref();

    let prepared = gate.prepare(backend.as_ref())?;
    let routed = prepared.route_with_token_ids(&hidden, token_ids)?;
    let routing = routed.to_routing()?;
    let (checked, skipped) = check::against_reference(&gate, &hidden, token_ids, &routing)?;
    let layout = prepared.dispatch(&routed, Some(GEMM_BLOCK), None)?;
    check_layout(&layout, &routing, e)?;
    let budget = Budget {
        warmup_calls: 3,
        min_calls: 20,
        min_time: Duration::from_millis(300),
        max_calls: 100_000,
    };
    let samples =
        timing::measure(budget, || prepared.route_with_token_ids(&hidden, token_ids).map(drop))?;

    let mut report = vec![
        format!("sluice demo: {} ({h} -> {e} experts; {spec})", shape.description()),
        format!(
            "  weight {} {:?} from seed {}, held as a parameter (requires_grad = {})",
            gate.weight().dtype(),
            gate.weight().shape(),
            args.seed,
            gate.weight().requires_grad()
        ),
        format!(
            "  {} tokens of bf16 hidden states (requires_grad = true), {} backend",
            args.tokens,
            backend.name()
        ),
        format!(
            "\ncheck: matches the reference router on {checked} of {} tokens ({skipped} near ties \
             skipped)",
            args.tokens
        ),
    ];
    report_tokens(&mut report, &routing, args.show);
    report_load(&mut report, &layout.expert_counts, spec.n_group);
    report_layout(&mut report, &layout);
    report.push(format!(
        "\ntime per call: {:.3} ms (median of {} calls; router GEMM + routing, {} tokens)",
        samples.median().as_secs_f64() * 1e3,
        samples.len(),
        args.tokens
    ));
    println!("{}", report.join("\n"));
    Ok(())
}

/// The block size of the grouped GEMM the demo's dispatch layout is padded for.
const GEMM_BLOCK: usize = 64;

/// Compares the backend's dispatch layout with the reference's, entry for entry.
fn check_layout(
    layout: &DispatchLayout,
    routing: &Routing,
    experts: usize,
) -> Result<(), CliError> {
    let shape = DispatchShape { tokens: routing.tokens(), top_k: routing.top_k(), experts };
    let expected = reference::dispatch(routing.ids(), shape, Some(GEMM_BLOCK), None)
        .map_err(|e| CliError::SelfCheck(e.to_string()))?;
    if *layout != expected {
        return Err(CliError::SelfCheck("the dispatch layout differs from the reference".into()));
    }
    Ok(())
}

/// What the expert kernels would iterate over next.
fn report_layout(report: &mut Vec<String>, layout: &DispatchLayout) {
    let valid = layout.expert_offsets.last().copied().unwrap_or(0);
    let busy = layout.expert_counts.iter().filter(|&&c| c > 0).count();
    if let Some(padded) = &layout.padded {
        report.push(format!(
            "
dispatch layout (matches the reference): {valid} (token, slot) pairs sorted by \
             expert over {busy} busy experts; padded to {}-row blocks for a grouped GEMM: {} rows \
             in {} blocks",
            padded.block_size,
            padded.padded_total,
            padded.padded_total as usize / padded.block_size
        ));
    }
}

fn report_tokens(report: &mut Vec<String>, routing: &Routing, show: usize) {
    if show == 0 || routing.tokens() == 0 {
        return;
    }
    report.push(format!(
        "\nrouting of the first {} tokens (expert: weight), sorted by weight:",
        show.min(routing.tokens())
    ));
    for (t, (ids, weights)) in routing.rows().take(show).enumerate() {
        let picks: Vec<String> =
            ids.iter().zip(weights).map(|(id, w)| format!("{id:>3}: {w:.3}")).collect();
        report.push(format!("  token {t:>2}  {}", picks.join("  ")));
    }
}

/// One character per expert (its load relative to the busiest expert), one row per group, then the
/// selections per group as bars. The load is the dispatch layout's per-expert count.
fn report_load(report: &mut Vec<String>, counts: &[i32], n_group: usize) {
    const LEVELS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let load: Vec<usize> = counts.iter().map(|&c| usize::try_from(c).unwrap_or(0)).collect();
    let num_experts = load.len();
    let busiest = load.iter().copied().max().unwrap_or(0).max(1);
    let per_group = num_experts / n_group.max(1);
    report.push(format!(
        "\nexpert load ({} picks; one row per group, one column per expert, busiest expert {} picks):",
        load.iter().sum::<usize>(),
        busiest
    ));
    let group_totals: Vec<usize> = load.chunks(per_group).map(|c| c.iter().sum()).collect();
    for (g, experts) in load.chunks(per_group).enumerate() {
        let row: String = experts.iter().map(|&n| LEVELS[(n * 8).div_ceil(busiest)]).collect();
        report.push(format!("  group {g}  |{row}|"));
    }
    let top = group_totals.iter().copied().max().unwrap_or(0).max(1);
    report.push("\nselections per group:".to_owned());
    for (g, &total) in group_totals.iter().enumerate() {
        report.push(format!("  group {g}  {:<40} {total}", "█".repeat((total * 40).div_ceil(top))));
    }
}
