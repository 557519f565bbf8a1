//! Routing of one token's f32 logits: the router bias on the logits, scores, group limit, top-k
//! (or the top-k of the logits, then the scores of the selected ones), renormalisation and
//! scaling.
//!
//! The semantics are the ones `sluice_tensor::RoutingSpec` documents and the scalar reference in
//! `sluice-models` implements, down to the roundings: scores are computed in f64 and rounded once
//! to f32, the bias is added in f32, the renormalising sum is taken in f64 and rounded to f32
//! before the epsilon is added. This is an independent implementation that reuses its buffers, so
//! routing a row never allocates.

mod hash;
mod score;
#[cfg(target_arch = "x86_64")]
mod select_avx512;
mod topk;

use sluice_tensor::{
    BackendError, ExpectedShape, RENORM_EPSILON, RoutingSpec, ScoringFunc, ScoringOrder, TopkMethod,
};

use crate::kernel::Isa;

use self::topk::TopK;

pub(crate) use self::hash::{HashSelection, TokenIds};

/// Buffers for routing rows one after another without allocating.
#[derive(Debug, Default)]
pub(crate) struct RouteScratch {
    /// The row's logits plus the router bias, when the spec adds it to the logits.
    biased_logits: Vec<f32>,
    /// Unbiased scores (softmax probabilities or sigmoids), one per expert.
    scores: Vec<f32>,
    /// Softmax numerators in f64.
    exps: Vec<f64>,
    /// Selection keys: the scores, plus the correction bias for `noaux_tc`.
    keys: Vec<f32>,
    /// One score per group.
    group_keys: Vec<f32>,
    /// Whether each group survived the group limit.
    group_kept: Vec<bool>,
    groups: TopK,
    experts: TopK,
    /// The chosen experts, best selection value first.
    picked: Vec<u32>,
}

/// What became of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowOutcome {
    /// The row was routed.
    Routed,
    /// The row's logits were not all finite; it was marked invalid (ids `-1`, weights `0`).
    NonFinite,
}

/// A validated routing spec with its bias, ready to route rows of logits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowRouter<'a> {
    spec: &'a RoutingSpec,
    /// The correction bias of `noaux_tc`, added to the scores for selection only.
    correction: Option<&'a [f32]>,
    /// The router bias added to every logit first (bias role `logits`).
    logit_bias: Option<&'a [f32]>,
    /// The table and token ids of a hash-routed call.
    hash: Option<HashSelection<'a>>,
    /// The instruction set the scores are computed with.
    kernel: Isa,
}

impl<'a> RowRouter<'a> {
    /// Validates the spec and that the bias, if any, has one finite value per expert.
    ///
    /// A bias is the correction bias of `noaux_tc`, or the router bias added to the logits when
    /// the spec's bias role says so; any other spec refuses it rather than silently ignore it.
    pub(crate) fn new(
        op: &'static str,
        spec: &'a RoutingSpec,
        bias: Option<&'a [f32]>,
        kernel: Isa,
    ) -> Result<Self, BackendError> {
        spec.validate()?;
        if spec.method == TopkMethod::Hash {
            return Err(BackendError::MissingHashTable { op });
        }
        if let Some(bias) = bias {
            if !spec.takes_bias() {
                return Err(BackendError::UnexpectedBias { op, method: spec.method });
            }
            if bias.len() != spec.num_experts {
                return Err(BackendError::Shape {
                    op,
                    arg: "bias",
                    shape: vec![bias.len()],
                    expected: ExpectedShape::exact(&[spec.num_experts]),
                });
            }
            if let Some((expert, value)) = bias.iter().enumerate().find(|(_, b)| !b.is_finite()) {
                return Err(BackendError::NonFiniteBias { op, expert, value: *value });
            }
        }
        let (correction, logit_bias) =
            if spec.bias_on_logits() { (None, bias) } else { (bias, None) };
        Ok(RowRouter { spec, correction, logit_bias, hash: None, kernel })
    }

    /// A router for a hash-routed spec, choosing experts by `hash`.
    pub(crate) fn hashed(
        op: &'static str,
        spec: &'a RoutingSpec,
        hash: HashSelection<'a>,
        kernel: Isa,
    ) -> Result<Self, BackendError> {
        spec.validate()?;
        if spec.method != TopkMethod::Hash {
            return Err(BackendError::UnexpectedHashTable { op, method: spec.method });
        }
        Ok(RowRouter { spec, correction: None, logit_bias: None, hash: Some(hash), kernel })
    }

    /// The spec this router follows.
    pub(crate) fn spec(&self) -> &RoutingSpec {
        self.spec
    }

    /// Routes row `row` of the call, `E` logits, into `ids` and `weights` (`K` each), sorted by
    /// weight descending, then by id.
    pub(crate) fn route_row(
        &self,
        row: usize,
        logits: &[f32],
        scratch: &mut RouteScratch,
        ids: &mut [i32],
        weights: &mut [f32],
    ) -> RowOutcome {
        // Taken out of the scratch for the row (a move, no allocation) so that the logits can be
        // borrowed while the rest of the scratch is written.
        let mut biased_logits = std::mem::take(&mut scratch.biased_logits);
        let logits = match self.logit_bias {
            Some(bias) => {
                biased_logits.clear();
                biased_logits.extend(logits.iter().zip(bias).map(|(&l, &b)| l + b));
                &biased_logits[..]
            }
            None => logits,
        };
        let outcome = self.route_finite_row(row, logits, scratch, ids, weights);
        scratch.biased_logits = biased_logits;
        outcome
    }

    /// [`route_row`](Self::route_row) once the router bias is on the logits.
    fn route_finite_row(
        &self,
        row: usize,
        logits: &[f32],
        scratch: &mut RouteScratch,
        ids: &mut [i32],
        weights: &mut [f32],
    ) -> RowOutcome {
        let spec = self.spec;
        // A fold, not `all`: no early exit, so it vectorises.
        if !logits.iter().fold(true, |finite, l| finite & l.is_finite()) {
            ids.fill(-1);
            weights.fill(0.0);
            return RowOutcome::NonFinite;
        }
        match &self.hash {
            Some(hash) => {
                let experts = hash.experts_of(row);
                ids.copy_from_slice(experts);
                hash::score_chosen(spec.scoring, self.kernel, logits, experts, scratch, weights);
            }
            None if spec.scoring_order == ScoringOrder::AfterTopk => {
                // Plain top-k (validated): the logits are the keys, every group is kept.
                scratch.keys.clear();
                scratch.keys.extend_from_slice(logits);
                self.select_groups(scratch);
                self.select_experts(scratch);
                for (&expert, (id, weight)) in
                    scratch.picked.iter().zip(ids.iter_mut().zip(&mut *weights))
                {
                    *id = expert as i32;
                    *weight = logits[expert as usize];
                }
                score_selected(spec.scoring, weights);
            }
            None => {
                self.score(logits, scratch);
                self.select_groups(scratch);
                self.select_experts(scratch);
                let picked = scratch.picked.iter().zip(&mut *ids).zip(&mut *weights);
                for ((&expert, id), weight) in picked {
                    *id = expert as i32;
                    *weight = scratch.scores[expert as usize];
                }
            }
        }
        let sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let denominator = sum as f32 + RENORM_EPSILON;
        let scale = spec.output_scale();
        for weight in weights.iter_mut() {
            if spec.norm_topk_prob {
                *weight /= denominator;
            }
            *weight *= scale;
        }
        sort_by_weight_then_id(ids, weights);
        RowOutcome::Routed
    }

    /// Fills the scores and selection keys of a finite row.
    fn score(&self, logits: &[f32], scratch: &mut RouteScratch) {
        let RouteScratch { scores, exps, keys, .. } = scratch;
        keys.clear();
        match self.spec.scoring {
            ScoringFunc::Sigmoid => score::sigmoids(self.kernel, logits, scores),
            ScoringFunc::SqrtSoftplus => score::sqrt_softpluses(self.kernel, logits, scores),
            ScoringFunc::Softmax => score::softmax(self.kernel, logits, exps, scores),
        }
        match self.correction {
            Some(bias) => keys.extend(scores.iter().zip(bias).map(|(&s, &b)| s + b)),
            None => keys.extend_from_slice(scores),
        }
    }

    /// Chooses the `top_k` experts of the kept groups into `picked`, best first.
    fn select_experts(&self, scratch: &mut RouteScratch) {
        let RouteScratch { keys, group_kept, experts, picked, .. } = scratch;
        let per_group = self.spec.experts_per_group();
        let k = self.spec.top_k;
        let runs = group_kept.iter().enumerate().filter(|(_, kept)| **kept).map(|(group, _)| {
            (&keys[group * per_group..(group + 1) * per_group], (group * per_group) as u32)
        });
        picked.clear();
        #[cfg(target_arch = "x86_64")]
        if let Isa::Avx512Bf16(token) = self.kernel
            && k <= select_avx512::MAX_K
        {
            picked.resize(k, 0);
            // Keys are finite (finite logits, finite bias) and the kept groups hold at least
            // `top_k` experts (validated spec), as the selection requires.
            // SAFETY: `token` proves that the CPU supports AVX-512F.
            unsafe { select_avx512::select(token, runs, k, picked) };
            return;
        }
        experts.reset(k);
        for (values, first) in runs {
            experts.offer_all(values, first);
        }
        picked.extend(experts.sorted().iter().map(|&(_, expert)| expert));
    }

    /// Marks which groups take part in the expert selection.
    fn select_groups(&self, scratch: &mut RouteScratch) {
        let spec = self.spec;
        let RouteScratch { keys, group_keys, group_kept, groups, .. } = scratch;
        group_kept.clear();
        if !spec.groups_restrict() {
            group_kept.resize(spec.n_group, true);
            return;
        }
        group_kept.resize(spec.n_group, false);
        group_keys.clear();
        group_keys.extend(keys.chunks_exact(spec.experts_per_group()).map(
            |group| match spec.method {
                TopkMethod::NoauxTc => sum_of_two_largest(group),
                TopkMethod::Greedy | TopkMethod::GroupLimitedGreedy | TopkMethod::Hash => {
                    group.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                }
            },
        ));
        groups.reset(spec.topk_group);
        groups.offer_all(group_keys, 0);
        for &(_, group) in groups.sorted() {
            group_kept[group as usize] = true;
        }
    }
}

/// Replaces the selected logits, best first, by their scores: softmax over them alone (in f64,
/// summed in this order, each rounded once, as the reference does), or the score of each.
fn score_selected(scoring: ScoringFunc, selected: &mut [f32]) {
    match scoring {
        ScoringFunc::Softmax => {
            // The first is the largest: the best-first order of the selection.
            let max = f64::from(selected[0]);
            let sum: f64 = selected.iter().map(|&l| (f64::from(l) - max).exp()).sum();
            for value in selected.iter_mut() {
                *value = ((f64::from(*value) - max).exp() / sum) as f32;
            }
        }
        ScoringFunc::Sigmoid => selected.iter_mut().for_each(|l| *l = score::sigmoid(*l)),
        ScoringFunc::SqrtSoftplus => {
            selected.iter_mut().for_each(|l| *l = score::sqrt_softplus(*l));
        }
    }
}

/// The sum of the two largest values of a group (which holds at least two).
///
/// Eight independent running pairs (largest, second largest) over interleaved lanes, merged at
/// the end: branch-free selects the compiler turns into vector max/min.
fn sum_of_two_largest(values: &[f32]) -> f32 {
    const WAYS: usize = 8;
    let larger = |a: f32, b: f32| if a > b { a } else { b };
    let smaller = |a: f32, b: f32| if a > b { b } else { a };
    let mut first = [f32::NEG_INFINITY; WAYS];
    let mut second = [f32::NEG_INFINITY; WAYS];
    let chunks = values.chunks_exact(WAYS);
    let rest = chunks.remainder();
    for chunk in chunks {
        for ((f, s), &v) in first.iter_mut().zip(&mut second).zip(chunk) {
            *s = larger(*s, smaller(*f, v));
            *f = larger(*f, v);
        }
    }
    for &v in rest {
        second[0] = larger(second[0], smaller(first[0], v));
        first[0] = larger(first[0], v);
    }
    let (mut best, mut runner_up) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (&f, &s) in first.iter().zip(&second) {
        runner_up = larger(larger(runner_up, s), smaller(best, f));
        best = larger(best, f);
    }
    best + runner_up
}

/// Sorts a row's experts by weight descending, then by id ascending (insertion sort: K is small).
fn sort_by_weight_then_id(ids: &mut [i32], weights: &mut [f32]) {
    for i in 1..ids.len() {
        let mut j = i;
        while j > 0
            && (weights[j] > weights[j - 1]
                || (weights[j] == weights[j - 1] && ids[j] < ids[j - 1]))
        {
            ids.swap(j, j - 1);
            weights.swap(j, j - 1);
            j -= 1;
        }
    }
}

#[cfg(test)]
mod tests;
