use proptest::prelude::*;
use sluice_tensor::{BiasRole, RoutingSpec, ScoringFunc, ScoringOrder, TopkMethod};

use super::*;
use crate::CpuKernel;
use crate::kernel::testing::detect_or_report_skip;

fn spec(
    e: usize,
    method: TopkMethod,
    groups: (usize, usize),
    k: usize,
    norm: bool,
    scale: f32,
) -> RoutingSpec {
    let scoring =
        if method == TopkMethod::NoauxTc { ScoringFunc::Sigmoid } else { ScoringFunc::Softmax };
    RoutingSpec::builder(e, k)
        .scoring(scoring)
        .method(method)
        .groups(groups.0, groups.1)
        .norm_topk_prob(norm)
        .routed_scaling_factor(scale)
        .build()
        .unwrap()
}

/// Routes one row on every kernel family this CPU supports (the others are reported skipped); they
/// must agree bit for bit.
fn route(spec: &RoutingSpec, bias: Option<&[f32]>, logits: &[f32]) -> (Vec<i32>, Vec<f32>) {
    let mut results =
        CpuKernel::CONCRETE.into_iter().filter_map(detect_or_report_skip).map(|isa| {
            let router = RowRouter::new("test", spec, bias, isa).unwrap();
            let mut ids = vec![0; spec.top_k];
            let mut weights = vec![0.0; spec.top_k];
            let outcome =
                router.route_row(0, logits, &mut RouteScratch::default(), &mut ids, &mut weights);
            assert_eq!(outcome, RowOutcome::Routed);
            (isa, ids, weights)
        });
    let (_, ids, weights) = results.next().unwrap();
    for (isa, other_ids, other_weights) in results {
        assert_eq!((&other_ids, &other_weights), (&ids, &weights), "{isa}");
    }
    (ids, weights)
}

#[test]
fn biased_selection_with_unbiased_weights_and_group_mask() {
    // 8 experts in 4 groups of 2, keep 2 groups, top-2, renormalise, scale 2.
    let s = spec(8, TopkMethod::NoauxTc, (4, 2), 2, true, 2.0);
    let logits = [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0];
    let bias = [0.0, 0.0, 0.3, 0.2, 0.0, 0.0, 0.05, 0.9];
    // keys: e0 .881 e1 .5 | e2 .8 e3 .7 | e4 .5 e5 .5 | e6 .55 e7 1.169
    // group sums: 1.381, 1.5, 1.0, 1.719 -> groups 3 and 1; best keys there: e7, e2.
    // Expert 0 has the largest unbiased score but its group is dropped.
    let (ids, weights) = route(&s, Some(&bias), &logits);
    let s7 = 1.0 / (1.0 + 1f64.exp());
    let s2 = 0.5;
    let expected = [(2, 2.0 * s2 / (s2 + s7)), (7, 2.0 * s7 / (s2 + s7))];
    assert_eq!(ids, vec![expected[0].0, expected[1].0]);
    for (w, (_, e)) in weights.iter().zip(expected) {
        assert!((f64::from(*w) - e).abs() < 1e-6, "{weights:?}");
    }
}

#[test]
fn equal_weights_are_sorted_by_id() {
    let s = spec(8, TopkMethod::NoauxTc, (4, 2), 2, true, 2.0);
    let bias = [0.1, 0.0, 0.3, 0.2, 0.0, 0.0, 0.05, 0.5];
    // All scores 0.5; keys select e7 (1.0) then e2 (0.8); equal weights -> id order.
    let (ids, weights) = route(&s, Some(&bias), &[0.0; 8]);
    assert_eq!(ids, vec![2, 7]);
    assert_eq!(weights, vec![1.0, 1.0]);
}

#[test]
fn ties_in_keys_go_to_the_lower_expert() {
    let s = spec(8, TopkMethod::Greedy, (1, 1), 3, false, 1.0);
    let logits = [0.5, 0.7, 0.7, 0.1, 0.7, 0.2, 0.7, 0.7];
    let (ids, _) = route(&s, None, &logits);
    assert_eq!(ids, vec![1, 2, 4]);
}

/// gpt-oss: the bias joins the logits (and changes the selection), then softmax over the selected.
#[test]
fn a_logit_bias_changes_selection_and_softmax_is_over_the_selected() {
    let s = RoutingSpec::builder(10, 3)
        .scoring_order(ScoringOrder::AfterTopk)
        .bias_role(BiasRole::Logits)
        .build()
        .unwrap();
    let logits = [0.5, -1.0, 2.0, 1.5, 0.0, 2.25, -3.0, 1.0, 0.25, -0.5];
    let bias = [0.0, 4.0, -0.25, 0.0, 0.125, -1.0, 0.0, 0.0, 0.0, 0.0];
    // Biased: [0.5, 3.0, 1.75, 1.5, 0.125, 1.25, -3, 1, 0.25, -0.5] -> experts 1, 2, 3.
    let (ids, weights) = route(&s, Some(&bias), &logits);
    assert_eq!(ids, vec![1, 2, 3]);
    let exps = [3.0f64.exp(), 1.75f64.exp(), 1.5f64.exp()];
    let sum: f64 = exps.iter().sum();
    for (w, e) in weights.iter().zip(exps) {
        assert!((f64::from(*w) - e / sum).abs() < 1e-7, "{weights:?}");
    }
    // The same row through a spec whose bias is a correction bias is refused: greedy takes none.
    let plain = RoutingSpec { bias_role: BiasRole::Correction, ..s };
    let err = RowRouter::new("route", &plain, Some(&bias), Isa::Scalar).unwrap_err();
    assert!(matches!(err, BackendError::UnexpectedBias { .. }), "{err}");
}

/// Llama 4: the top-k of the logits, then the sigmoid of each, not renormalised; also with the
/// AVX-512 selection's widest case (K = 8) and ties at the cut.
#[test]
fn sigmoid_of_the_selected_logits() {
    let s = RoutingSpec::builder(16, 1)
        .scoring(ScoringFunc::Sigmoid)
        .scoring_order(ScoringOrder::AfterTopk)
        .build()
        .unwrap();
    let logits: Vec<f32> = (0..16).map(|i| (i as f32 - 9.0) * 0.5).collect();
    let (ids, weights) = route(&s, None, &logits);
    assert_eq!(ids, vec![15]);
    assert_eq!(weights, vec![score::sigmoid(3.0)]);
    let eight = RoutingSpec { top_k: 8, ..s };
    let mut tied = logits.clone();
    tied[3] = tied[8];
    let (ids, weights) = route(&eight, None, &tied);
    assert_eq!(ids, vec![15, 14, 13, 12, 11, 10, 9, 3]);
    assert_eq!(weights[7], score::sigmoid(tied[8]));
}

#[test]
fn a_row_made_non_finite_by_the_logit_bias_is_marked() {
    let s = RoutingSpec::builder(4, 2)
        .scoring_order(ScoringOrder::AfterTopk)
        .bias_role(BiasRole::Logits)
        .build()
        .unwrap();
    let bias = [f32::MAX, 0.0, 0.0, 0.0];
    let router = RowRouter::new("test", &s, Some(&bias), Isa::Scalar).unwrap();
    let (mut ids, mut weights) = ([7; 2], [7.0; 2]);
    let mut scratch = RouteScratch::default();
    let outcome =
        router.route_row(0, &[f32::MAX, 0.0, 1.0, 2.0], &mut scratch, &mut ids, &mut weights);
    assert_eq!(outcome, RowOutcome::NonFinite);
    assert_eq!((ids, weights), ([-1, -1], [0.0, 0.0]));
    let outcome = router.route_row(1, &[1.0, 0.0, 1.0, 2.0], &mut scratch, &mut ids, &mut weights);
    assert_eq!((outcome, ids), (RowOutcome::Routed, [0, 3]));
}

#[test]
fn group_ties_go_to_the_lower_group() {
    // Two groups with identical contents, keep one: group 0 wins.
    let s = spec(4, TopkMethod::GroupLimitedGreedy, (2, 1), 1, false, 1.0);
    let (ids, _) = route(&s, None, &[1.0, 0.0, 1.0, 0.0]);
    assert_eq!(ids, vec![0]);
    let s = spec(4, TopkMethod::NoauxTc, (2, 1), 2, true, 1.0);
    let (ids, _) = route(&s, Some(&[0.0; 4]), &[1.0, 0.0, 0.0, 1.0]);
    assert_eq!(ids, vec![0, 1]);
}

#[test]
fn softmax_weights_are_probabilities_and_scaling_applies_once() {
    let mut s = spec(4, TopkMethod::Greedy, (1, 1), 2, false, 16.0);
    let logits = [1.0f32, 3.0, 2.0, 0.0];
    let total: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
    let p = |l: f32| f64::from(l).exp() / total;
    let (ids, weights) = route(&s, None, &logits);
    assert_eq!(ids, vec![1, 2]);
    assert!((f64::from(weights[0]) - 16.0 * p(3.0)).abs() < 1e-5);
    assert!((f64::from(weights[1]) - 16.0 * p(2.0)).abs() < 1e-5);
    s.apply_scaling = false;
    let (_, unscaled) = route(&s, None, &logits);
    assert!((f64::from(unscaled[0]) - p(3.0)).abs() < 1e-6);
}

#[test]
fn renormalisation_survives_underflowed_weights() {
    // Sigmoid of -200 underflows to 0: the epsilon keeps 0/0 out.
    let s = spec(4, TopkMethod::NoauxTc, (1, 1), 2, true, 2.5);
    let (ids, weights) = route(&s, Some(&[1.0, 0.0, 2.0, 0.0]), &[-200.0; 4]);
    assert_eq!(ids, vec![0, 2]);
    assert_eq!(weights, vec![0.0, 0.0]);
}

#[test]
fn non_finite_rows_are_marked_and_counted() {
    let s = spec(4, TopkMethod::NoauxTc, (1, 1), 2, true, 1.0);
    let router = RowRouter::new("test", &s, None, Isa::Scalar).unwrap();
    let mut logits = [0.0f32; 12];
    logits[5] = f32::NAN;
    logits[8] = f32::INFINITY;
    let mut ids = [7; 6];
    let mut weights = [7.0; 6];
    let mut scratch = RouteScratch::default();
    let outcomes: Vec<RowOutcome> = logits
        .chunks_exact(4)
        .zip(ids.chunks_exact_mut(2).zip(weights.chunks_exact_mut(2)))
        .enumerate()
        .map(|(index, (row, (ids, weights)))| {
            router.route_row(index, row, &mut scratch, ids, weights)
        })
        .collect();
    assert_eq!(outcomes, [RowOutcome::Routed, RowOutcome::NonFinite, RowOutcome::NonFinite]);
    assert_eq!(&ids[2..], &[-1, -1, -1, -1]);
    assert_eq!(&weights[2..], &[0.0; 4]);
    assert_eq!(&ids[..2], &[0, 1]);
}

#[test]
fn a_hashed_row_takes_the_experts_of_its_token_and_weighs_them_by_score() {
    let mut s = spec(8, TopkMethod::NoauxTc, (1, 1), 3, true, 1.5);
    s.method = TopkMethod::Hash;
    s.scoring = ScoringFunc::SqrtSoftplus;
    // Token id 1 -> experts 6, 0, 3; token id 0 -> experts 0, 1, 2.
    let table = [0, 1, 2, 6, 0, 3];
    let ids = ndarray::arr1(&[1i64, 0]);
    let logits = [1.0f32, 9.0, 9.0, -2.0, 9.0, 9.0, 0.5, 9.0];
    for isa in CpuKernel::CONCRETE.into_iter().filter_map(detect_or_report_skip) {
        let hash = HashSelection::new("t", &table, 3, TokenIds::I64(ids.view()), 2).unwrap();
        let router = RowRouter::hashed("t", &s, hash, isa).unwrap();
        let (mut out_ids, mut out_weights) = (vec![0; 3], vec![0.0; 3]);
        let mut scratch = RouteScratch::default();
        assert_eq!(
            router.route_row(0, &logits, &mut scratch, &mut out_ids, &mut out_weights),
            RowOutcome::Routed
        );
        // The experts with the largest logits (1, 2, 4, 5, 7) are not in the row: hash layers do
        // not rank.
        let score = |x: f64| x.exp().ln_1p().sqrt();
        let (s0, s3, s6) = (score(1.0), score(-2.0), score(0.5));
        let sum = s0 + s3 + s6;
        assert_eq!(out_ids, vec![0, 6, 3], "{isa}");
        for (w, s) in out_weights.iter().zip([s0, s6, s3]) {
            assert!((f64::from(*w) - 1.5 * s / sum).abs() < 1e-6, "{isa}: {out_weights:?}");
        }
    }
}

#[test]
fn hashed_calls_refuse_token_ids_outside_the_table_or_of_the_wrong_length() {
    let table = [0, 1, 2, 3];
    let ids = ndarray::arr1(&[0i32, 2]);
    let err = HashSelection::new("route", &table, 2, TokenIds::I32(ids.view()), 2).unwrap_err();
    assert!(
        matches!(err, BackendError::TokenIdOutsideTable { row: 1, id: 2, vocab: 2, .. }),
        "{err}"
    );
    let err = HashSelection::new("route", &table, 2, TokenIds::I32(ids.view()), 3).unwrap_err();
    assert!(matches!(err, BackendError::Shape { arg: "token_ids", .. }), "{err}");
}

#[test]
fn a_non_finite_bias_is_refused_with_the_expert_named() {
    let s = spec(4, TopkMethod::NoauxTc, (1, 1), 2, true, 1.0);
    let bias = [0.0, 0.0, f32::NEG_INFINITY, 0.0];
    let err = RowRouter::new("route", &s, Some(&bias), Isa::Scalar).unwrap_err();
    assert!(err.to_string().contains("expert 2"), "{err}");
}

#[test]
fn bias_shape_and_method_are_checked() {
    let s = spec(4, TopkMethod::NoauxTc, (1, 1), 2, true, 1.0);
    let err = RowRouter::new("route", &s, Some(&[0.0; 3]), Isa::Scalar).unwrap_err();
    assert!(err.to_string().contains("[4]"), "{err}");
    let s = spec(4, TopkMethod::Greedy, (1, 1), 2, false, 1.0);
    let err = RowRouter::new("route", &s, Some(&[0.0; 4]), Isa::Scalar).unwrap_err();
    assert!(err.to_string().contains("greedy"), "{err}");
    let mut bad = s;
    bad.top_k = 9;
    assert!(matches!(RowRouter::new("route", &bad, None, Isa::Scalar), Err(BackendError::Spec(_))));
}

/// An independent, deliberately plain routing: full sorts and -inf masks.
fn naive(spec: &RoutingSpec, bias: Option<&[f32]>, logits: &[f32]) -> (Vec<i32>, Vec<f32>) {
    let e = spec.num_experts;
    let biased: Vec<f32>;
    let (logits, bias) = match bias {
        Some(b) if spec.bias_role == BiasRole::Logits => {
            biased = logits.iter().zip(b).map(|(l, b)| l + b).collect();
            (biased.as_slice(), None)
        }
        _ => (logits, bias),
    };
    let score_all = |logits: &[f32]| -> Vec<f32> {
        match spec.scoring {
            ScoringFunc::Sigmoid => {
                logits.iter().map(|&l| (1.0 / (1.0 + (-f64::from(l)).exp())) as f32).collect()
            }
            ScoringFunc::SqrtSoftplus => {
                logits.iter().map(|&l| (f64::from(l).exp().ln_1p()).sqrt() as f32).collect()
            }
            ScoringFunc::Softmax => {
                let max = logits.iter().map(|&l| f64::from(l)).fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = logits.iter().map(|&l| (f64::from(l) - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                exps.iter().map(|&x| (x / sum) as f32).collect()
            }
        }
    };
    let order = |v: &[f32]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap().then(a.cmp(&b)));
        idx
    };
    let (scores, mut keys) = if spec.scoring_order == ScoringOrder::AfterTopk {
        let chosen = order(logits)[..spec.top_k].to_vec();
        let chosen_logits: Vec<f32> = chosen.iter().map(|&i| logits[i]).collect();
        let mut scores = vec![0.0; e];
        for (&i, s) in chosen.iter().zip(score_all(&chosen_logits)) {
            scores[i] = s;
        }
        (scores, logits.to_vec())
    } else {
        let scores = score_all(logits);
        let keys = match bias {
            Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
            None => scores.clone(),
        };
        (scores, keys)
    };
    if spec.groups_restrict() {
        let p = e / spec.n_group;
        let gkeys: Vec<f32> = keys
            .chunks(p)
            .map(|g| {
                let o = order(g);
                if spec.method == TopkMethod::NoauxTc { g[o[0]] + g[o[1]] } else { g[o[0]] }
            })
            .collect();
        let kept: Vec<usize> = order(&gkeys)[..spec.topk_group].to_vec();
        for (i, key) in keys.iter_mut().enumerate() {
            if !kept.contains(&(i / p)) {
                *key = f32::NEG_INFINITY;
            }
        }
    }
    let chosen: Vec<usize> = order(&keys)[..spec.top_k].to_vec();
    let mut w: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
    let sum = w.iter().map(|&x| f64::from(x)).sum::<f64>() as f32;
    for x in &mut w {
        if spec.norm_topk_prob {
            *x /= sum + RENORM_EPSILON;
        }
        *x *= spec.output_scale();
    }
    let mut rows: Vec<(i32, f32)> = chosen.iter().map(|&i| i as i32).zip(w).collect();
    rows.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
    rows.into_iter().unzip()
}

fn arb_spec() -> impl Strategy<Value = RoutingSpec> {
    (arb_top_k_spec(), prop::sample::select(vec![0u8, 1, 2, 3])).prop_map(|(spec, variant)| {
        // Greedy specs also as gpt-oss and Llama 4 route: scoring after the top-k (softmax or
        // sigmoid), with or without a bias on the logits.
        if spec.method != TopkMethod::Greedy || variant == 0 {
            return spec;
        }
        let scoring = if variant == 1 { ScoringFunc::Softmax } else { ScoringFunc::Sigmoid };
        let bias_role = if variant == 3 { BiasRole::Logits } else { BiasRole::Correction };
        RoutingSpec { scoring, scoring_order: ScoringOrder::AfterTopk, bias_role, ..spec }
    })
}

fn arb_top_k_spec() -> impl Strategy<Value = RoutingSpec> {
    (1usize..5, 1usize..9, prop::bool::ANY, prop::sample::select(vec![0u8, 1, 2, 3]))
        .prop_flat_map(|(n_group, per_group, norm, method)| {
            // 3: noaux_tc scoring with sqrt(softplus) instead of sigmoid.
            let sqrt_softplus = method == 3;
            let method = method.min(2);
            let method = [TopkMethod::Greedy, TopkMethod::GroupLimitedGreedy, TopkMethod::NoauxTc]
                [method as usize];
            let per_group =
                if method == TopkMethod::NoauxTc { per_group.max(2) } else { per_group };
            let n_group = if method == TopkMethod::Greedy { 1 } else { n_group };
            (Just((n_group, per_group, (norm, sqrt_softplus), method)), 1..=n_group)
        })
        .prop_flat_map(|((n_group, per_group, norm, method), topk_group)| {
            let allowed = if method == TopkMethod::Greedy {
                n_group * per_group
            } else {
                topk_group * per_group
            };
            (Just((n_group, per_group, norm, method, topk_group)), 1..=allowed)
        })
        .prop_map(|((n_group, per_group, (norm, sqrt_softplus), method, topk_group), k)| {
            let mut s = spec(n_group * per_group, method, (n_group, topk_group), k, norm, 2.5);
            if sqrt_softplus {
                s.scoring = ScoringFunc::SqrtSoftplus;
            }
            s
        })
}

proptest! {
    #[test]
    fn matches_a_naive_sort_based_router(
        spec in arb_spec(),
        seed in prop::collection::vec(-4.0f32..4.0, 64),
        bias_seed in prop::collection::vec(-0.5f32..0.5, 64),
    ) {
        let e = spec.num_experts;
        // Distinct values keep the comparison away from float near-ties.
        let logits: Vec<f32> = (0..e).map(|i| seed[i] + i as f32 * 1e-3).collect();
        let bias: Vec<f32> = bias_seed[..e].to_vec();
        let bias = spec.takes_bias().then_some(bias.as_slice());
        let (ids, weights) = route(&spec, bias, &logits);
        let (naive_ids, naive_weights) = naive(&spec, bias, &logits);
        prop_assert_eq!(&ids, &naive_ids);
        for (a, b) in weights.iter().zip(&naive_weights) {
            prop_assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{:?} vs {:?}",
                weights,
                naive_weights
            );
        }
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        prop_assert_eq!(sorted.len(), spec.top_k);
        prop_assert!(ids.iter().all(|&i| i >= 0 && (i as usize) < e));
    }
}
