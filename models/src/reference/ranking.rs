//! One token's scores, group choice and expert ranking: the part of routing that both the router
//! and the near-tie finder need.

use std::cmp::Ordering;

use sluice_tensor::{RoutingSpec, ScoringFunc, ScoringOrder, TopkMethod};

/// One token, scored and ranked.
pub(crate) struct RankedRow {
    /// Unbiased scores `s[E]` (the weights come from these). When scoring after the top-k, only
    /// the `top_k` selected experts have one (the others hold 0): softmax over their logits, or
    /// the sigmoid (or sqrt-softplus) of each.
    pub scores: Vec<f32>,
    /// Selection values `c[E]` (`s + bias` for `noaux_tc`, the logits when scoring after the
    /// top-k, else `s`).
    pub selection: Vec<f32>,
    /// Group scores and group indices, best first; empty when grouping cannot drop a group.
    pub ranked_groups: Vec<(f32, usize)>,
    /// The experts of the kept groups, best selection value first.
    pub ranked_experts: Vec<usize>,
}

/// Scores and ranks one token's finite logits. `bias`, if any, has `spec.num_experts` finite
/// entries; the caller has checked both.
pub(crate) fn rank_row(logits: &[f32], bias: Option<&[f32]>, spec: &RoutingSpec) -> RankedRow {
    if spec.scoring_order == ScoringOrder::AfterTopk {
        return rank_then_score(logits, spec);
    }
    let scores = scores(logits, spec.scoring);
    let selection: Vec<f32> = match bias {
        Some(bias) => scores.iter().zip(bias).map(|(&s, &b)| s + b).collect(),
        None => scores.clone(),
    };

    let per_group = spec.experts_per_group();
    let (ranked_groups, candidates): (Vec<(f32, usize)>, Vec<usize>) = if spec.groups_restrict() {
        let mut groups: Vec<(f32, usize)> = selection
            .chunks(per_group)
            .map(|members| group_score(members, spec.method))
            .zip(0..)
            .collect();
        groups.sort_by(|a, b| best_first(*a, *b));
        let candidates = groups
            .iter()
            .take(spec.topk_group)
            .flat_map(|&(_, group)| group * per_group..(group + 1) * per_group)
            .collect();
        (groups, candidates)
    } else {
        (Vec::new(), (0..spec.num_experts).collect())
    };

    let mut ranked_experts = candidates;
    ranked_experts.sort_by(|&a, &b| best_first((selection[a], a), (selection[b], b)));
    RankedRow { scores, selection, ranked_groups, ranked_experts }
}

/// Scoring after the top-k (plain top-k only, validated): the experts ranked by logit, then the
/// `top_k` best scored among themselves.
fn rank_then_score(logits: &[f32], spec: &RoutingSpec) -> RankedRow {
    let mut ranked_experts: Vec<usize> = (0..logits.len()).collect();
    ranked_experts.sort_by(|&a, &b| best_first((logits[a], a), (logits[b], b)));
    let selected = &ranked_experts[..spec.top_k];
    let selected_logits: Vec<f32> = selected.iter().map(|&e| logits[e]).collect();
    let mut scores_of_selected = vec![0.0; logits.len()];
    for (&expert, score) in selected.iter().zip(scores(&selected_logits, spec.scoring)) {
        scores_of_selected[expert] = score;
    }
    RankedRow {
        scores: scores_of_selected,
        selection: logits.to_vec(),
        ranked_groups: Vec::new(),
        ranked_experts,
    }
}

/// The total order used everywhere: larger value first, then lower index. Values are never NaN
/// here; were one to slip through, it would compare equal rather than panic.
pub(crate) fn best_first(a: (f32, usize), b: (f32, usize)) -> Ordering {
    b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1))
}

/// A group's score: its best value (V2), or the f32 sum of its two best values (V3).
fn group_score(members: &[f32], method: TopkMethod) -> f32 {
    let mut best = f32::NEG_INFINITY;
    let mut second = f32::NEG_INFINITY;
    for &value in members {
        if value > best {
            second = best;
            best = value;
        } else if value > second {
            second = value;
        }
    }
    match method {
        TopkMethod::NoauxTc => best + second,
        TopkMethod::Greedy | TopkMethod::GroupLimitedGreedy | TopkMethod::Hash => best,
    }
}

/// One token's scores, each computed in f64 and rounded once to f32.
pub(crate) fn scores(logits: &[f32], scoring: ScoringFunc) -> Vec<f32> {
    match scoring {
        ScoringFunc::Softmax => softmax(logits),
        ScoringFunc::Sigmoid => logits.iter().map(|&x| sigmoid(x)).collect(),
        ScoringFunc::SqrtSoftplus => logits.iter().map(|&x| sqrt_softplus(x)).collect(),
    }
}

/// `sqrt(ln(1 + e^x))` computed in f64 and rounded once to f32.
///
/// Written as `max(x, 0) + ln(1 + e^-|x|)`: `e^-|x|` never overflows, and `ln_1p` keeps full
/// precision where `e^x` is tiny, so very negative logits keep their (tiny, positive) score
/// instead of flushing to zero the way an f32 `ln(1 + e^x)` does below about -88.
fn sqrt_softplus(x: f32) -> f32 {
    let x = f64::from(x);
    (x.max(0.0) + (-x.abs()).exp().ln_1p()).sqrt() as f32
}

/// Correctly rounded f32 sigmoid (computed in f64).
fn sigmoid(x: f32) -> f32 {
    let x = f64::from(x);
    (1.0 / (1.0 + (-x).exp())) as f32
}

/// Softmax over one token's logits, computed in f64 and rounded once per probability.
fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let exps: Vec<f64> = logits.iter().map(|&x| (f64::from(x) - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / sum) as f32).collect()
}
