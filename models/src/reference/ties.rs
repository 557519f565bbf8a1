//! Rows where a correct fast path may choose differently from the reference.

use sluice_tensor::{RoutingSpec, TopkMethod};

use super::ranking::rank_row;
use super::router::{ReferenceError, check_inputs, with_logit_bias};

/// The rows of `logits` `[T, E]` whose routing hinges on a near tie, in increasing order.
///
/// A row is a near tie when the `top_k`-th and `(top_k + 1)`-th selection values among the
/// experts of the kept groups are within `rel_tol` of each other, or when grouping drops groups
/// and the `topk_group`-th and `(topk_group + 1)`-th group scores are. Two values `a`, `b` are
/// within `rel_tol` when `|a - b| <= rel_tol * max(|a|, |b|)`; equal values always are.
///
/// Rows with non-finite logits are not near ties (the non-finite policy decides them), and a
/// hash-routed spec has none: its table, not a ranking, chooses the experts. The inputs
/// are checked as [`route`](super::route) checks them, except that the non-finite policy is
/// ignored.
pub fn near_tie_rows(
    logits: &[f32],
    tokens: usize,
    bias: Option<&[f32]>,
    spec: &RoutingSpec,
    rel_tol: f32,
) -> Result<Vec<usize>, ReferenceError> {
    check_inputs(logits, tokens, bias, spec)?;
    if spec.method == TopkMethod::Hash {
        return Ok(Vec::new());
    }
    let (logits, bias) = with_logit_bias(logits, bias, spec);
    let rows = logits
        .chunks_exact(spec.num_experts)
        .enumerate()
        .filter(|(_, row)| row.iter().all(|x| x.is_finite()))
        .filter(|(_, row)| {
            let ranked = rank_row(row, bias, spec);
            let group_cut = ranked
                .ranked_groups
                .get(spec.topk_group.saturating_sub(1)..)
                .and_then(|rest| Some((rest.first()?.0, rest.get(1)?.0)));
            let expert_cut =
                ranked.ranked_experts.get(spec.top_k.saturating_sub(1)..).and_then(|rest| {
                    Some((ranked.selection[*rest.first()?], ranked.selection[*rest.get(1)?]))
                });
            [group_cut, expert_cut].into_iter().flatten().any(|(a, b)| close(a, b, rel_tol))
        })
        .map(|(row, _)| row)
        .collect::<Vec<_>>();
    tracing::debug!(tokens, near_ties = rows.len(), rel_tol, "near-tie rows");
    Ok(rows)
}

fn close(a: f32, b: f32, rel_tol: f32) -> bool {
    a == b || (a - b).abs() <= rel_tol * a.abs().max(b.abs())
}
