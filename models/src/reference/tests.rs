//! Hand-computed cases for the reference router. Expected values come from the formulas written
//! out here in f64, not from the router.

use half::{bf16, f16};
use sluice_tensor::{
    BiasRole, NonFinitePolicy, RoutingSpec, ScoringFunc, ScoringOrder, SpecError, TopkMethod,
};

use super::*;

fn spec(
    experts: usize,
    method: TopkMethod,
    groups: (usize, usize),
    top_k: usize,
    renorm: bool,
    scale: f32,
) -> RoutingSpec {
    let scoring = match method {
        TopkMethod::NoauxTc => ScoringFunc::Sigmoid,
        _ => ScoringFunc::Softmax,
    };
    RoutingSpec::builder(experts, top_k)
        .scoring(scoring)
        .method(method)
        .groups(groups.0, groups.1)
        .norm_topk_prob(renorm)
        .routed_scaling_factor(scale)
        .build()
        .unwrap()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn assert_close(actual: &[f32], expected: &[f64], rel: f64) {
    assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
    for (&a, &e) in actual.iter().zip(expected) {
        assert!((f64::from(a) - e).abs() <= rel * e.abs(), "{actual:?} vs {expected:?}");
    }
}

/// A small deterministic generator (SplitMix64) for randomised invariant checks.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[test]
fn softmax_ties_go_to_the_lower_index() {
    let s = spec(5, TopkMethod::Greedy, (1, 1), 2, false, 1.0);
    let r = route(&[0.0, 1.0, 1.0, 0.0, 1.0], 1, None, &s).unwrap();
    assert_eq!(r.ids(), &[1, 2]);
    let e = 1f64.exp();
    let p = e / (3.0 * e + 2.0);
    assert_close(r.weights(), &[p, p], 1e-6);
}

/// Qwen3-MoE and Mixtral: softmax over all experts, top-k of the probabilities, renormalised
/// (Mixtral always, Qwen3-MoE when `norm_topk_prob`), which equals softmax over the selected
/// logits; without renormalisation the probabilities are kept as they are.
#[test]
fn softmax_top_k_renormalised_equals_softmax_over_the_selected_logits() {
    let logits = [0.5f32, -1.0, 2.0, 1.5, 0.0, 2.25];
    let exp: Vec<f64> = logits.iter().map(|&x| f64::from(x).exp()).collect();
    let total: f64 = exp.iter().sum();
    // The two largest logits: 2.25 (expert 5), then 2.0 (expert 2).
    let renormalised = spec(6, TopkMethod::Greedy, (1, 1), 2, true, 1.0);
    let r = route(&logits, 1, None, &renormalised).unwrap();
    assert_eq!(r.ids(), &[5, 2]);
    let selected = exp[5] + exp[2];
    assert_close(r.weights(), &[exp[5] / selected, exp[2] / selected], 1e-6);
    let kept = spec(6, TopkMethod::Greedy, (1, 1), 2, false, 1.0);
    let r = route(&logits, 1, None, &kept).unwrap();
    assert_eq!(r.ids(), &[5, 2]);
    assert_close(r.weights(), &[exp[5] / total, exp[2] / total], 1e-6);
}

/// gpt-oss: the router bias is added to the logits, the top-k is taken of the biased logits, and
/// the weights are the softmax over the selected biased logits only (no renormalisation needed:
/// they sum to 1). The bias changes the selection: expert 1 has the lowest logit but wins.
#[test]
fn gpt_oss_adds_its_bias_to_the_logits_and_takes_softmax_of_the_selected() {
    let logits = [0.5f32, -1.0, 2.0, 1.5, 0.0, 2.25];
    let bias = [0.0f32, 4.0, -0.25, 0.0, 0.125, -1.0];
    let s = RoutingSpec::builder(6, 3)
        .scoring_order(ScoringOrder::AfterTopk)
        .bias_role(BiasRole::Logits)
        .build()
        .unwrap();
    let r = route(&logits, 1, Some(&bias), &s).unwrap();
    // Biased logits: [0.5, 3.0, 1.75, 1.5, 0.125, 1.25]: experts 1, 2, 3.
    assert_eq!(r.ids(), &[1, 2, 3]);
    let exp = [3.0f64.exp(), 1.75f64.exp(), 1.5f64.exp()];
    let sum: f64 = exp.iter().sum();
    assert_close(r.weights(), &[exp[0] / sum, exp[1] / sum, exp[2] / sum], 1e-6);
    // Without the bias the logits select 5, 2, 3, and the weights are their own softmax.
    let r = route(&logits, 1, None, &s).unwrap();
    assert_eq!(r.ids(), &[5, 2, 3]);
    let exp = [2.25f64.exp(), 2.0f64.exp(), 1.5f64.exp()];
    let sum: f64 = exp.iter().sum();
    assert_close(r.weights(), &[exp[0] / sum, exp[1] / sum, exp[2] / sum], 1e-6);
    // Near ties are looked for among the biased logits: 1.75 vs 1.5 at the cut is no tie, a
    // bias that makes expert 4 equal expert 3 is.
    assert!(near_tie_rows(&logits, 1, Some(&bias), &s, 1e-6).unwrap().is_empty());
    let tied = [0.0f32, 4.0, -0.25, 0.0, 1.5, -1.0];
    assert_eq!(near_tie_rows(&logits, 1, Some(&tied), &s, 1e-6).unwrap(), vec![0]);
    // A bias is refused where the spec gives it no meaning.
    let plain = RoutingSpec::builder(6, 3).build().unwrap();
    let err = route(&logits, 1, Some(&bias), &plain).unwrap_err();
    assert_eq!(err, ReferenceError::UnexpectedBias(TopkMethod::Greedy));
}

/// Llama 4: the top-k of the logits, then the sigmoid of each selected logit, not renormalised.
#[test]
fn llama4_takes_the_sigmoid_of_the_selected_logits() {
    let logits = [0.5f32, -1.0, 2.0, 1.5, 0.0, 2.25];
    let s = RoutingSpec::builder(6, 2)
        .scoring(ScoringFunc::Sigmoid)
        .scoring_order(ScoringOrder::AfterTopk)
        .build()
        .unwrap();
    let r = route(&logits, 1, None, &s).unwrap();
    assert_eq!(r.ids(), &[5, 2]);
    assert_close(r.weights(), &[sigmoid(2.25), sigmoid(2.0)], 1e-7);
    // Ties between logits go to the lower index, before any score is taken.
    let r = route(&[1.0, 3.0, 3.0, 3.0], 1, None, &RoutingSpec { num_experts: 4, ..s }).unwrap();
    assert_eq!(r.ids(), &[1, 2]);
    // A logit bias overflowing a finite logit makes the row non-finite, as its logits would be.
    let bias = RoutingSpec { bias_role: BiasRole::Logits, ..s };
    let err = route(&[f32::MAX, 0.0, 0.0, 0.0, 0.0, 0.0], 1, Some(&[f32::MAX; 6]), &bias);
    assert_eq!(err.unwrap_err(), ReferenceError::NonFinite { row: 0 });
}

#[test]
fn group_ties_go_to_the_lower_group() {
    // All scores 0.5: every group scores 1.0; groups 0 and 1 are kept, then experts 0 and 1.
    let s = spec(8, TopkMethod::NoauxTc, (4, 2), 2, true, 2.0);
    let r = route(&[0.0; 8], 1, Some(&[0.0; 8]), &s).unwrap();
    assert_eq!(r.ids(), &[0, 1]);
    assert_eq!(r.weights(), &[1.0, 1.0], "0.5 / (1.0 + 1e-20) * 2");
}

#[test]
fn masked_groups_lose_to_negative_biased_scores() {
    // Group 0 = experts 0..3, group 1 = experts 3..6. Biased scores:
    // group 0: sigmoid(1) - 0.9 = -0.169, sigmoid(-1) - 0.3 = -0.031, 0.5 - 0.9 = -0.4 (top-2 sum -0.2)
    // group 1: 0.5 - 0.7 = -0.2 three times (top-2 sum -0.4).
    // Group 0 is kept; a 0.0 fill would pick the masked experts 3 and 4 over it.
    let s = spec(6, TopkMethod::NoauxTc, (2, 1), 2, true, 2.5);
    let logits = [1.0, -1.0, 0.0, 0.0, 0.0, 0.0];
    let bias = [-0.9, -0.3, -0.9, -0.7, -0.7, -0.7];
    let r = route(&logits, 1, Some(&bias), &s).unwrap();
    // Chosen by biased score: 1 then 0; output sorted by (unbiased) weight: 0 then 1.
    assert_eq!(r.ids(), &[0, 1]);
    let (a, b) = (sigmoid(1.0), sigmoid(-1.0));
    assert_close(r.weights(), &[a / (a + b) * 2.5, b / (a + b) * 2.5], 1e-6);
}

#[test]
fn v3_group_score_is_the_sum_of_the_two_best_biased_scores() {
    // Biased scores: group 0 = [0.9, 0.1, 0.1, 0.1] (best 0.9, top-2 sum 1.0),
    // group 1 = [0.6, 0.6, 0.0, 0.0] (best 0.6, top-2 sum 1.2). The top-2 sum keeps group 1.
    let s = spec(8, TopkMethod::NoauxTc, (2, 1), 2, true, 1.0);
    let bias = [0.4, -0.4, -0.4, -0.4, 0.1, 0.1, -0.5, -0.5];
    let r = route(&[0.0; 8], 1, Some(&bias), &s).unwrap();
    assert_eq!(r.ids(), &[4, 5]);
    assert_eq!(r.weights(), &[0.5, 0.5]);
}

#[test]
fn v2_group_score_is_the_best_probability() {
    // Group 0 = [2, 0, 0, 0] has the best single expert; group 1 = [1.5, 1.5, 0, 0] has the best
    // top-2 sum. V2 keeps group 0, then takes expert 0 and the lowest-index tie, expert 1.
    let s = spec(8, TopkMethod::GroupLimitedGreedy, (2, 1), 2, false, 16.0);
    let logits = [2.0, 0.0, 0.0, 0.0, 1.5, 1.5, 0.0, 0.0];
    let r = route(&logits, 1, None, &s).unwrap();
    assert_eq!(r.ids(), &[0, 1]);
    let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
    assert_close(r.weights(), &[2f64.exp() / z * 16.0, 1.0 / z * 16.0], 1e-6);
}

#[test]
fn weights_are_unbiased_scores_sorted_by_weight_not_by_selection() {
    // A large bias on expert 2 selects it first, but its sigmoid score is the smallest.
    let s = spec(4, TopkMethod::NoauxTc, (1, 1), 2, false, 1.0);
    let logits = [0.5, 2.0, -2.0, 0.0];
    let r = route(&logits, 1, Some(&[0.0, 0.0, 10.0, 0.0]), &s).unwrap();
    assert_eq!(r.ids(), &[1, 2]);
    assert_close(r.weights(), &[sigmoid(2.0), sigmoid(-2.0)], 1e-6);
}

#[test]
fn a_bias_near_twelve_keeps_tiny_scores_exact() {
    // Sigmoid scores near 1e-8 under biases near 12 (as in GLM-5.2): subtracting the bias back out
    // would give 0; carrying the unbiased score keeps the weights exact.
    let s = spec(4, TopkMethod::NoauxTc, (1, 1), 2, true, 1.0);
    let logits = [-18.0, -18.5, -30.0, -30.0];
    let bias = [12.0, 12.0, 11.0, 11.0];
    let r = route(&logits, 1, Some(&bias), &s).unwrap();
    assert_eq!(r.ids(), &[0, 1]);
    let (a, b) = (sigmoid(-18.0), sigmoid(-18.5));
    assert_close(r.weights(), &[a / (a + b), b / (a + b)], 1e-6);
}

#[test]
fn too_many_experts_per_token_for_the_kept_groups_is_refused() {
    let result = RoutingSpec::builder(8, 3)
        .scoring(ScoringFunc::Sigmoid)
        .method(TopkMethod::NoauxTc)
        .groups(4, 1)
        .norm_topk_prob(true)
        .routed_scaling_factor(1.0)
        .build();
    assert!(matches!(result, Err(SpecError::TooFewAllowedExperts { allowed: 2, .. })));
    // A spec built by hand is validated by the router too.
    let mut s = spec(8, TopkMethod::NoauxTc, (4, 1), 2, true, 1.0);
    s.top_k = 3;
    let err = route(&[0.0; 8], 1, None, &s).unwrap_err();
    assert!(matches!(err, ReferenceError::Spec(SpecError::TooFewAllowedExperts { .. })), "{err}");
}

#[test]
fn renormalising_underflowed_scores_gives_zero_not_nan() {
    let s = spec(4, TopkMethod::NoauxTc, (1, 1), 2, true, 2.5);
    let r = route(&[-200.0; 4], 1, None, &s).unwrap();
    assert_eq!(r.ids(), &[0, 1]);
    assert_eq!(r.weights(), &[0.0, 0.0]);
}

#[test]
fn renormalising_subnormal_scores_divides_by_the_epsilon() {
    // sigmoid(ln 1e-40) ~ 1e-40, a subnormal f32; the sum is absorbed by the 1e-20 epsilon.
    let x = (1e-40f64).ln();
    let logits = [x as f32, (x - 2f64.ln()) as f32, -200.0, -200.0];
    let s = spec(4, TopkMethod::NoauxTc, (1, 1), 2, true, 1.0);
    let r = route(&logits, 1, None, &s).unwrap();
    assert_eq!(r.ids(), &[0, 1]);
    assert_close(r.weights(), &[1e-40 / 1e-20, 0.5e-40 / 1e-20], 1e-3);
}

#[test]
fn scaling_is_applied_once_or_left_to_the_caller() {
    let mut s = spec(6, TopkMethod::NoauxTc, (2, 1), 2, true, 2.5);
    let logits = [0.3, -0.2, 1.1, 0.0, 0.4, -0.7];
    let scaled = route(&logits, 1, None, &s).unwrap();
    s.apply_scaling = false;
    let unscaled = route(&logits, 1, None, &s).unwrap();
    assert_eq!(scaled.ids(), unscaled.ids());
    let sum: f32 = unscaled.weights().iter().sum();
    assert!((sum - 1.0).abs() < 1e-6, "renormalised weights sum to 1, got {sum}");
    for (a, b) in scaled.weights().iter().zip(unscaled.weights()) {
        assert_eq!(*a, b * 2.5);
    }
}

#[test]
fn non_finite_rows_fail_or_are_marked_invalid() {
    let mut s = spec(4, TopkMethod::NoauxTc, (2, 1), 2, true, 1.0);
    let mut logits = vec![0.1, 0.2, 0.3, 0.4, 0.5, f32::NAN, 0.7, 0.8];
    logits.extend([0.9, 1.0, 1.1, 1.2, f32::INFINITY, 0.0, 0.0, 0.0]);
    let err = route(&logits, 4, None, &s).unwrap_err();
    assert_eq!(err, ReferenceError::NonFinite { row: 1 });
    assert!(err.to_string().contains("row 1"));

    s.non_finite = NonFinitePolicy::MarkInvalid;
    let r = route(&logits, 4, None, &s).unwrap();
    let rows: Vec<_> = r.rows().collect();
    assert_eq!(rows[1], (&[-1, -1][..], &[0.0, 0.0][..]));
    assert_eq!(rows[3], (&[-1, -1][..], &[0.0, 0.0][..]));
    for row in [0, 2] {
        let alone = route(&logits[row * 4..row * 4 + 4], 1, None, &s).unwrap();
        assert_eq!(rows[row], (alone.ids(), alone.weights()), "row {row} is routed normally");
    }
}

#[test]
fn zero_tokens_give_empty_outputs() {
    let s = spec(8, TopkMethod::NoauxTc, (4, 2), 2, true, 1.0);
    let r = route(&[], 0, Some(&[0.0; 8]), &s).unwrap();
    assert_eq!((r.tokens(), r.top_k(), r.ids().len(), r.weights().len()), (0, 2, 0, 0));
}

/// Plain biased top-k by rank counting: expert `e` is chosen when fewer than `K` experts beat it
/// (a larger biased score, or an equal one with a lower index).
fn plain_biased_top_k(logits: &[f32], bias: &[f32], top_k: usize, scale: f32) -> Vec<(i32, f32)> {
    let biased: Vec<f32> =
        logits.iter().zip(bias).map(|(&l, &b)| sigmoid(l.into()) as f32 + b).collect();
    let beats = |a: usize, e: usize| biased[a] > biased[e] || (biased[a] == biased[e] && a < e);
    let chosen: Vec<usize> = (0..biased.len())
        .filter(|&e| (0..biased.len()).filter(|&a| beats(a, e)).count() < top_k)
        .collect();
    let scores: Vec<f64> = chosen.iter().map(|&e| sigmoid(logits[e].into())).collect();
    let sum: f64 = scores.iter().sum();
    let mut out: Vec<(i32, f32)> =
        chosen.iter().zip(&scores).map(|(&e, &s)| (e as i32, (s / sum) as f32 * scale)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

#[test]
fn kimi_single_group_and_all_groups_kept_equal_plain_biased_top_k() {
    let mut rng = Rng(7);
    let tokens = 16;
    let experts = 384;
    let logits: Vec<f32> = (0..tokens * experts).map(|_| rng.uniform(-6.0, 6.0)).collect();
    let bias: Vec<f32> = (0..experts).map(|_| rng.uniform(-0.5, 0.5)).collect();
    let kimi = spec(experts, TopkMethod::NoauxTc, (1, 1), 8, true, 2.827);
    let all_kept = spec(experts, TopkMethod::NoauxTc, (8, 8), 8, true, 2.827);
    for s in [kimi, all_kept] {
        let r = route(&logits, tokens, Some(&bias), &s).unwrap();
        for (t, (ids, weights)) in r.rows().enumerate() {
            let expected = plain_biased_top_k(&logits[t * experts..][..experts], &bias, 8, 2.827);
            let expected_ids: Vec<i32> = expected.iter().map(|p| p.0).collect();
            assert_eq!(ids, expected_ids.as_slice(), "row {t} with {s}");
            let expected_w: Vec<f64> = expected.iter().map(|p| f64::from(p.1)).collect();
            assert_close(weights, &expected_w, 1e-5);
        }
    }
}

#[test]
fn random_inputs_never_give_bad_or_duplicate_ids() {
    let mut rng = Rng(42);
    let shapes = [
        (TopkMethod::NoauxTc, 256, (8, 4), 8),
        (TopkMethod::NoauxTc, 384, (1, 1), 8),
        (TopkMethod::NoauxTc, 16, (4, 1), 4),
        (TopkMethod::GroupLimitedGreedy, 160, (8, 3), 6),
        (TopkMethod::Greedy, 64, (1, 1), 6),
        // gpt-oss-like (bias on the logits, softmax of the selected) and Llama-4-like (sigmoid of
        // the selected).
        (TopkMethod::Greedy, 128, (1, 1), 4),
        (TopkMethod::Greedy, 16, (1, 1), 1),
    ];
    for (case, &(method, experts, groups, top_k)) in shapes.iter().cycle().take(56).enumerate() {
        let mut s = spec(experts, method, groups, top_k, case % 2 == 0, 1.5);
        s.non_finite = NonFinitePolicy::MarkInvalid;
        match (experts, top_k) {
            (128, 4) => {
                s.scoring_order = ScoringOrder::AfterTopk;
                s.bias_role = BiasRole::Logits;
            }
            (16, 1) => {
                s.scoring_order = ScoringOrder::AfterTopk;
                s.scoring = ScoringFunc::Sigmoid;
            }
            _ => {}
        }
        let tokens = rng.below(9);
        // Coarse values make exact ties common; some entries are non-finite.
        let mut logits: Vec<f32> =
            (0..tokens * experts).map(|_| (rng.uniform(-4.0, 4.0) * 2.0).round() / 2.0).collect();
        for _ in 0..rng.below(3) {
            if !logits.is_empty() {
                let at = rng.below(logits.len());
                logits[at] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.below(3)];
            }
        }
        let bias: Option<Vec<f32>> =
            s.takes_bias().then(|| (0..experts).map(|_| rng.uniform(-1.0, 1.0)).collect());
        let r = route(&logits, tokens, bias.as_deref(), &s).unwrap();
        compare_routings(&r, &r, experts, &[], Tolerance::absolute(0.0)).unwrap();
        check_sorted(&r).unwrap();
        for ((ids, _), row_logits) in r.rows().zip(logits.chunks_exact(experts)) {
            assert_eq!(ids[0] == -1, row_logits.iter().any(|x| !x.is_finite()));
        }
    }
}

#[test]
fn bad_inputs_are_refused() {
    let s = spec(4, TopkMethod::NoauxTc, (1, 1), 2, true, 1.0);
    let err = route(&[0.0; 7], 2, None, &s).unwrap_err();
    assert!(matches!(err, ReferenceError::Length { what: "logits", len: 7, expected: 8, .. }));
    let err = route(&[0.0; 4], 1, Some(&[0.0; 3]), &s).unwrap_err();
    assert!(matches!(err, ReferenceError::Length { what: "bias", .. }), "{err}");
    let err = route(&[0.0; 4], 1, Some(&[0.0, f32::NAN, 0.0, 0.0]), &s).unwrap_err();
    assert!(matches!(err, ReferenceError::NonFiniteBias { expert: 1, .. }), "{err}");
    let greedy = spec(4, TopkMethod::Greedy, (1, 1), 2, false, 1.0);
    let err = route(&[0.0; 4], 1, Some(&[0.0; 4]), &greedy).unwrap_err();
    assert_eq!(err, ReferenceError::UnexpectedBias(TopkMethod::Greedy));
    let err = route(&[0.0; 4], usize::MAX, None, &s).unwrap_err();
    assert!(matches!(err, ReferenceError::Overflow { .. }), "{err}");
}

#[test]
fn near_ties_at_the_expert_cut_and_the_group_cut() {
    // K = 2 of 4 experts, one group.
    let s = spec(4, TopkMethod::NoauxTc, (1, 1), 2, true, 1.0);
    let logits = [
        3.0, 2.0, 1.0, 0.0, // clear: 2nd (sigmoid 2) vs 3rd (sigmoid 1)
        3.0, 1.0, 1.0, 0.0, // exact tie between the 2nd and 3rd
        3.0, 1.0, 1.0001, -5.0, // near tie
        1.0, 1.0, 0.0, 0.0, // tie inside the top 2 only: not a near tie
    ];
    assert_eq!(near_tie_rows(&logits, 4, None, &s, 1e-3).unwrap(), vec![1, 2]);
    assert_eq!(near_tie_rows(&logits, 4, None, &s, 0.0).unwrap(), vec![1]);

    // Two groups of two, one kept, K = 1: the group cut decides.
    let s = spec(4, TopkMethod::NoauxTc, (2, 1), 1, true, 1.0);
    let logits = [
        2.0, 0.0, 0.0, 2.0, // group sums equal: a group-cut tie
        2.0, 0.0, 0.0, 1.0, // clear
    ];
    assert_eq!(near_tie_rows(&logits, 2, None, &s, 1e-6).unwrap(), vec![0]);
}

#[test]
fn non_finite_rows_are_not_near_ties() {
    let s = spec(4, TopkMethod::Greedy, (1, 1), 2, false, 1.0);
    let logits = [f32::NAN, 0.0, 0.0, 0.0];
    assert!(near_tie_rows(&logits, 1, None, &s, 1e-3).unwrap().is_empty());
}

fn routing(ids: &[i32], weights: &[f32], top_k: usize) -> Routing {
    Routing::new(ids.len() / top_k, top_k, ids.to_vec(), weights.to_vec()).unwrap()
}

#[test]
fn comparison_matches_by_expert_id_in_any_order() {
    let expected = routing(&[3, 1, 0, 2], &[0.6, 0.4, 0.7, 0.3], 2);
    let actual = routing(&[1, 3, 0, 2], &[0.4, 0.6 + 5e-6, 0.7, 0.3], 2);
    let summary = compare_routings(&expected, &actual, 4, &[], Tolerance::absolute(1e-5)).unwrap();
    assert_eq!(summary, ComparisonSummary { rows_compared: 2, rows_skipped: 0, rows_invalid: 0 });
    let err = check_sorted(&actual).unwrap_err();
    assert!(matches!(err, RoutingMismatch::Order { row: 0, .. }), "{err}");
    check_sorted(&expected).unwrap();
}

#[test]
fn comparison_reports_the_first_mismatch() {
    let expected = routing(&[3, 1, 0, 2], &[0.6, 0.4, 0.7, 0.3], 2);
    let other_set = routing(&[3, 1, 0, 1], &[0.6, 0.4, 0.7, 0.3], 2);
    let err =
        compare_routings(&expected, &other_set, 4, &[], Tolerance::absolute(1e-5)).unwrap_err();
    assert!(matches!(err, RoutingMismatch::ExpertSet { row: 1, .. }), "{err}");
    assert!(err.to_string().contains("row 1"), "{err}");
    let summary =
        compare_routings(&expected, &other_set, 4, &[1], Tolerance::absolute(1e-5)).unwrap();
    assert_eq!(summary.rows_skipped, 1);

    let off = routing(&[3, 1, 0, 2], &[0.6, 0.41, 0.7, 0.3], 2);
    let err = compare_routings(&expected, &off, 4, &[], Tolerance::absolute(1e-5)).unwrap_err();
    assert!(matches!(err, RoutingMismatch::Weight { row: 0, expert: 1, .. }), "{err}");
    compare_routings(&expected, &off, 4, &[], Tolerance::relative(0.05)).unwrap();

    let shape = routing(&[3, 1, 0, 2], &[0.6, 0.4, 0.7, 0.3], 4);
    let err = compare_routings(&expected, &shape, 4, &[], Tolerance::absolute(1e-5)).unwrap_err();
    assert!(matches!(err, RoutingMismatch::Shape { .. }), "{err}");
}

#[test]
fn comparison_refuses_malformed_rows_even_when_skipped() {
    let expected = routing(&[3, 1], &[0.6, 0.4], 2);
    let cases = [
        (routing(&[3, 3], &[0.6, 0.4], 2), "duplicate"),
        (routing(&[3, 4], &[0.6, 0.4], 2), "outside"),
        (routing(&[3, -1], &[0.6, 0.0], 2), "outside"),
        (routing(&[-1, -1], &[0.6, 0.0], 2), "zero weights"),
        (routing(&[-1, -1], &[0.0, 0.0], 2), "marked invalid"),
        (routing(&[3, 1], &[f32::NAN, 0.4], 2), "not finite"),
    ];
    for (actual, reason) in cases {
        let err =
            compare_routings(&expected, &actual, 4, &[0], Tolerance::absolute(1.0)).unwrap_err();
        assert!(matches!(err, RoutingMismatch::Malformed { side: "actual", row: 0, .. }), "{err}");
        assert!(err.to_string().contains(reason), "{reason}: {err}");
    }
    let invalid = routing(&[-1, -1], &[0.0, 0.0], 2);
    let summary = compare_routings(&invalid, &invalid, 4, &[], Tolerance::absolute(0.0)).unwrap();
    assert_eq!(summary.rows_invalid, 1);
}

#[test]
fn routing_buffers_must_match_their_shape() {
    assert!(matches!(
        Routing::new(2, 2, vec![0; 3], vec![0.0; 4]),
        Err(ReferenceError::Length { what: "topk_ids", .. })
    ));
    assert!(matches!(
        Routing::new(2, 2, vec![0; 4], vec![0.0; 5]),
        Err(ReferenceError::Length { what: "topk_weights", .. })
    ));
    assert_eq!(Routing::new(0, 0, vec![], vec![]), Err(ReferenceError::ZeroTopK));
}

#[test]
fn router_gemm_small_case() {
    let hidden = [1.0f32, 2.0, 3.0, 4.0];
    let weight = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
    let logits = router_logits(&hidden, &weight, 2, 2, 3).unwrap();
    assert_eq!(logits, vec![1.0, 2.0, 3.0, 3.0, 4.0, 7.0]);
}

#[test]
fn router_gemm_accumulates_beyond_f32() {
    // In f32, 1e8 + 1 - 1e8 = 0; the exact sum is 1.
    let logits = router_logits(&[1e8f32, 1.0, -1e8], &[1.0f32; 3], 1, 3, 1).unwrap();
    assert_eq!(logits, vec![1.0]);
}

#[test]
fn router_gemm_takes_half_precision_exactly() {
    let hidden: Vec<bf16> = [1.5f32, -0.25, 3.0].iter().map(|&x| bf16::from_f32(x)).collect();
    let weight: Vec<f16> = [0.5f32, 2.0, 1.0].iter().map(|&x| f16::from_f32(x)).collect();
    let logits = router_logits(&hidden, &weight, 1, 3, 1).unwrap();
    assert_eq!(logits, vec![0.75 - 0.5 + 3.0]);
    let err = router_logits(&hidden, &weight, 1, 0, 1).unwrap_err();
    assert!(matches!(err, ReferenceError::Length { what: "hidden", len: 3, expected: 0, .. }));
    assert_eq!(router_logits::<f32, f32>(&[], &[], 3, 0, 2).unwrap(), vec![0.0; 6]);
}
