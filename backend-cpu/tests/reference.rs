//! Property tests: every kernel family, with one and two threads, against the scalar reference
//! router of `sluice-models` on random configs and inputs.

mod common;

use common::{Rng, backends, dl, label, read, read_routing};
use half::{bf16, f16};
use proptest::prelude::*;
use sluice_models::reference::{self, Routing, Tolerance};
use sluice_tensor::{
    Backend, BackendError, BiasRole, DlpackView, DlpackViewMut, Execution, NonFinitePolicy,
    RouteInputs, RouteOutputs, RoutingSpec, ScoringFunc, ScoringOrder, TopkMethod,
};

/// Relative closeness under which two selection values count as a near tie: well above the
/// rounding differences of an f32 GEMM, far below the gaps of random data.
const NEAR_TIE: f32 = 1e-4;
const WEIGHTS: Tolerance = Tolerance { abs: 1e-5, rel: 1e-5 };

#[derive(Debug, Clone)]
struct Case {
    spec: RoutingSpec,
    tokens: usize,
    hidden: usize,
    /// 0: f32, 1: bf16, 2: f16.
    x_type: u8,
    w_bf16: bool,
    seed: u64,
}

fn arb_spec() -> impl Strategy<Value = RoutingSpec> {
    let method = prop::sample::select(vec![
        TopkMethod::Greedy,
        TopkMethod::GroupLimitedGreedy,
        TopkMethod::NoauxTc,
    ]);
    (method, 1usize..=8, 1usize..=20, any::<bool>(), any::<bool>())
        .prop_flat_map(|(method, n_group, per_group, norm, apply_scaling)| {
            // noaux_tc scores with sigmoid (V3) or sqrt-softplus (V4), chosen by a coin below.
            let per_group =
                if method == TopkMethod::NoauxTc { per_group.max(2) } else { per_group };
            let n_group = if method == TopkMethod::Greedy { 1 } else { n_group };
            (Just((method, n_group, per_group, norm, apply_scaling)), 1..=n_group)
        })
        .prop_flat_map(|((method, n_group, per_group, norm, apply_scaling), topk_group)| {
            let allowed =
                if method.uses_groups() { topk_group * per_group } else { n_group * per_group };
            let k = 1..=allowed.min(12);
            (Just((method, n_group, per_group, norm, apply_scaling, topk_group)), k)
        })
        .prop_flat_map(|(parts, k)| (Just(parts), Just(k), any::<bool>(), 0u8..4))
        .prop_map(
            |((method, n_group, per_group, norm, apply_scaling, topk_group), k, v4, after)| {
                let scoring = match (method, v4) {
                    (TopkMethod::NoauxTc, false) => ScoringFunc::Sigmoid,
                    (TopkMethod::NoauxTc, true) => ScoringFunc::SqrtSoftplus,
                    // Llama 4: the sigmoid of the selected logits.
                    (TopkMethod::Greedy, true) if after > 0 => ScoringFunc::Sigmoid,
                    _ => ScoringFunc::Softmax,
                };
                // Greedy specs also score after the top-k (gpt-oss, Llama 4), with a bias on the
                // logits half the time (gpt-oss).
                let (order, bias_role) = match (method, after) {
                    (TopkMethod::Greedy, 1) => (ScoringOrder::AfterTopk, BiasRole::Correction),
                    (TopkMethod::Greedy, 2) => (ScoringOrder::AfterTopk, BiasRole::Logits),
                    (TopkMethod::Greedy, 3) => (ScoringOrder::BeforeTopk, BiasRole::Logits),
                    _ => (ScoringOrder::BeforeTopk, BiasRole::Correction),
                };
                let mut spec = RoutingSpec::builder(n_group * per_group, k)
                    .scoring(scoring)
                    .method(method)
                    .groups(n_group, topk_group)
                    .norm_topk_prob(norm)
                    .routed_scaling_factor(2.5)
                    .scoring_order(order)
                    .bias_role(bias_role)
                    .build()
                    .unwrap();
                spec.apply_scaling = apply_scaling;
                spec
            },
        )
}

fn arb_case() -> impl Strategy<Value = Case> {
    // T crosses the switch from the expert split to the token split (256 tokens with 2 threads,
    // 128 with one) and the token chunk size; H covers odd sizes and more than one K block of
    // bf16 pairs.
    (
        arb_spec(),
        0usize..=300,
        prop::sample::select(vec![1usize, 2, 7, 32, 33, 100, 258, 300, 1030]),
        0u8..3,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(spec, tokens, hidden, x_type, w_bf16, seed)| Case {
            spec,
            tokens,
            hidden,
            x_type,
            w_bf16,
            seed,
        })
}

/// The case's tensors: hidden states and weight as DLPack (in their dtypes), the values the
/// reference sees, and the bias.
struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl Inputs {
    fn new(case: &Case) -> Self {
        let mut rng = Rng::new(case.seed);
        let e = case.spec.num_experts;
        let x = rng.normals(case.tokens * case.hidden, 1.0);
        let w = rng.normals(e * case.hidden, 2.0 / (case.hidden as f32).sqrt());
        let bias = case.spec.takes_bias().then(|| rng.normals(e, 0.1));
        // Round to the dtypes the backend will see, so the reference multiplies the same values.
        let x = match case.x_type {
            0 => x,
            1 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
            _ => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        };
        let w =
            if case.w_bf16 { w.iter().map(|&v| bf16::from_f32(v).to_f32()).collect() } else { w };
        Inputs { x, w, bias }
    }

    fn x_dl(&self, case: &Case) -> sluice_tensor::Dlpack {
        let shape = [case.tokens, case.hidden];
        match case.x_type {
            0 => dl(self.x.clone(), &shape),
            1 => dl(self.x.iter().map(|&v| bf16::from_f32(v)).collect(), &shape),
            _ => dl(self.x.iter().map(|&v| f16::from_f32(v)).collect(), &shape),
        }
    }

    fn w_dl(&self, case: &Case) -> sluice_tensor::Dlpack {
        let shape = [case.spec.num_experts, case.hidden];
        if case.w_bf16 {
            dl(self.w.iter().map(|&v| bf16::from_f32(v)).collect(), &shape)
        } else {
            dl(self.w.clone(), &shape)
        }
    }

    fn bias_dl(&self) -> Option<sluice_tensor::Dlpack> {
        self.bias.as_ref().map(|b| dl(b.clone(), &[b.len()]))
    }
}

/// `|logit - exact| <= (H + 4) * eps * sum |x w|`: the error bound of f32 accumulation.
fn check_logits(
    case: &Case,
    inputs: &Inputs,
    exact: &[f32],
    got: &[f32],
    what: &str,
) -> Result<(), TestCaseError> {
    let (t, e, h) = (case.tokens, case.spec.num_experts, case.hidden);
    prop_assert_eq!(got.len(), t * e);
    for i in 0..t {
        for j in 0..e {
            let abs: f64 = (0..h)
                .map(|k| {
                    f64::from(inputs.x[i * h + k]).abs() * f64::from(inputs.w[j * h + k]).abs()
                })
                .sum();
            let bound = (h as f64 + 4.0) * f64::from(f32::EPSILON) * abs + 1e-30;
            let (g, x) = (f64::from(got[i * e + j]), f64::from(exact[i * e + j]));
            prop_assert!(
                (g - x).abs() <= bound + x.abs() * f64::from(f32::EPSILON),
                "{what}: logit [{i}, {j}] = {g}, reference {x}, bound {bound}"
            );
        }
    }
    Ok(())
}

fn as_routing(case: &Case, ids: Vec<i32>, weights: Vec<f32>) -> Routing {
    Routing::new(case.tokens, case.spec.top_k, ids, weights).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn every_path_matches_the_reference(case in arb_case()) {
        let inputs = Inputs::new(&case);
        let (t, e, h) = (case.tokens, case.spec.num_experts, case.hidden);
        let exact = reference::router_logits(&inputs.x, &inputs.w, t, h, e).unwrap();
        let bias = inputs.bias.as_deref();
        let expected = reference::route(&exact, t, bias, &case.spec).unwrap();
        let near = reference::near_tie_rows(&exact, t, bias, &case.spec, NEAR_TIE).unwrap();
        for backend in backends() {
            let what = format!("{} {case:?}", label(&backend));
            // Routing of given logits is exact: the same f64-rounded scores, order and sums.
            let logits = dl(exact.clone(), &[t, e]);
            let out = backend.route_logits(&logits, inputs.bias_dl().as_ref(), &case.spec).unwrap();
            let (shape, ids, weights) = read_routing(out);
            prop_assert_eq!(shape, vec![t, case.spec.top_k]);
            prop_assert_eq!(&ids, expected.ids(), "{}", what);
            prop_assert_eq!(&weights, expected.weights(), "{}", what);

            let one_off = backend.router_gemm(&inputs.x_dl(&case), &inputs.w_dl(&case)).unwrap();
            let (shape, logits) = read::<f32>(one_off);
            prop_assert_eq!(shape, vec![t, e]);
            check_logits(&case, &inputs, &exact, &logits, &format!("one-off {what}"))?;

            let prepared =
                backend.prepare_router(inputs.w_dl(&case), inputs.bias_dl(), &case.spec).unwrap();
            let (_, logits) = read::<f32>(prepared.router_gemm(&inputs.x_dl(&case)).unwrap());
            check_logits(&case, &inputs, &exact, &logits, &format!("prepared {what}"))?;

            let (shape, ids, weights) = read_routing(prepared.route(&inputs.x_dl(&case)).unwrap());
            prop_assert_eq!(shape, vec![t, case.spec.top_k]);
            let actual = as_routing(&case, ids, weights);
            reference::check_sorted(&actual)
                .map_err(|m| TestCaseError::fail(format!("{what}: {m}")))?;
            reference::compare_routings(&expected, &actual, e, &near, WEIGHTS)
                .map_err(|m| TestCaseError::fail(format!("{what}: {m}")))?;
        }
    }
}

/// A hash-routed case: the spec, the table `[vocab, K]` and one token id per row.
#[derive(Debug, Clone)]
struct HashCase {
    case: Case,
    table: Vec<i32>,
    token_ids: Vec<i64>,
    ids_i32: bool,
}

fn arb_hash_case() -> impl Strategy<Value = HashCase> {
    let scoring = prop::sample::select(vec![
        ScoringFunc::SqrtSoftplus,
        ScoringFunc::Sigmoid,
        ScoringFunc::Softmax,
    ]);
    (2usize..=64, scoring, 1usize..=40, 0usize..=300, any::<u64>(), any::<bool>(), any::<bool>())
        .prop_flat_map(|(e, scoring, vocab, tokens, seed, x_bf16, ids_i32)| {
            (Just((e, scoring, vocab, tokens, seed, x_bf16, ids_i32)), 1..=e.min(8))
        })
        .prop_map(|((e, scoring, vocab, tokens, seed, x_bf16, ids_i32), k)| {
            let spec = RoutingSpec::builder(e, k)
                .scoring(scoring)
                .method(TopkMethod::Hash)
                .norm_topk_prob(true)
                .routed_scaling_factor(1.5)
                .build()
                .unwrap();
            let mut rng = Rng::new(seed ^ 0x5eed);
            // Each row: the first K of a shuffle of the experts, so K distinct ids.
            let mut table = Vec::with_capacity(vocab * k);
            for _ in 0..vocab {
                let mut experts: Vec<i32> = (0..e as i32).collect();
                for i in (1..e).rev() {
                    let j = (rng.unit() * (i + 1) as f32) as usize % (i + 1);
                    experts.swap(i, j);
                }
                table.extend_from_slice(&experts[..k]);
            }
            let token_ids =
                (0..tokens).map(|_| (rng.unit() * vocab as f32) as i64 % vocab as i64).collect();
            let hidden = [7usize, 33, 100][seed as usize % 3];
            let case = Case { spec, tokens, hidden, x_type: u8::from(x_bf16), w_bf16: true, seed };
            HashCase { case, table, token_ids, ids_i32 }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn hash_layers_match_the_reference_on_every_path(hash in arb_hash_case()) {
        let case = &hash.case;
        let inputs = Inputs::new(case);
        let (t, e, h, k) = (case.tokens, case.spec.num_experts, case.hidden, case.spec.top_k);
        let exact = reference::router_logits(&inputs.x, &inputs.w, t, h, e).unwrap();
        let expected =
            reference::route_hashed(&exact, t, &hash.table, &hash.token_ids, &case.spec).unwrap();
        let vocab = hash.table.len() / k;
        for backend in backends() {
            let what = format!("{} {hash:?}", label(&backend));
            let table = dl(hash.table.clone(), &[vocab, k]);
            let prepared = backend.prepare_hash_router(inputs.w_dl(case), table, &case.spec).unwrap();
            let x = inputs.x_dl(case);
            let hidden = DlpackView::from_dlpack(&x).unwrap();
            let ids32: Vec<i32> = hash.token_ids.iter().map(|&id| id as i32).collect();
            let token_ids = if hash.ids_i32 {
                DlpackView::from_slice(&ids32, &[t]).unwrap()
            } else {
                DlpackView::from_slice(&hash.token_ids, &[t]).unwrap()
            };
            let (mut ids, mut weights) = (vec![0i32; t * k], vec![0.0f32; t * k]);
            let mut outputs = RouteOutputs::new(
                DlpackViewMut::from_slice(&mut ids, &[t, k]).unwrap(),
                DlpackViewMut::from_slice(&mut weights, &[t, k]).unwrap(),
            );
            let inputs_with_ids = RouteInputs::new(hidden).with_token_ids(token_ids);
            prepared.route_into(&inputs_with_ids, &mut outputs, Execution::Host).unwrap();
            let actual = as_routing(case, ids, weights);
            reference::check_sorted(&actual)
                .map_err(|m| TestCaseError::fail(format!("{what}: {m}")))?;
            // The table fixes the experts, so every row is compared: no near ties.
            let summary = reference::compare_routings(&expected, &actual, e, &[], WEIGHTS)
                .map_err(|m| TestCaseError::fail(format!("{what}: {m}")))?;
            prop_assert_eq!(summary.rows_compared, t);
            // Without the token ids the hash router refuses, naming what is missing.
            let missing = prepared.route(&x);
            prop_assert!(matches!(missing, Err(BackendError::MissingTokenIds { .. })), "{}", what);
        }
    }
}

#[test]
fn hash_tables_with_bad_rows_are_refused_naming_the_row() {
    let spec = RoutingSpec::builder(8, 2)
        .scoring(ScoringFunc::SqrtSoftplus)
        .method(TopkMethod::Hash)
        .norm_topk_prob(true)
        .build()
        .unwrap();
    let weight = || dl(vec![0.5f32; 8 * 4], &[8, 4]);
    for backend in backends() {
        for (table, row) in [(vec![0, 1, 2, 8], 1), (vec![3, 3, 0, 1], 0), (vec![0, 1, -2, 1], 1)] {
            let err = backend.prepare_hash_router(weight(), dl(table, &[2, 2]), &spec).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, BackendError::HashTable { .. })
                    && message.contains(&format!("row {row}")),
                "{message}"
            );
        }
        let err = backend.prepare_hash_router(weight(), dl(vec![0i64, 1], &[1, 2]), &spec);
        assert!(matches!(err, Err(BackendError::UnsupportedDType { .. })), "{err:?}");
        let prepared = backend.prepare_hash_router(weight(), dl(vec![0, 1, 2, 3], &[2, 2]), &spec);
        let prepared = prepared.unwrap();
        let x = dl(vec![0.1f32; 3 * 4], &[3, 4]);
        let hidden = DlpackView::from_dlpack(&x).unwrap();
        let ids = [0i64, 2, 1];
        let token_ids = DlpackView::from_slice(&ids, &[3]).unwrap();
        let (mut out_ids, mut out_weights) = (vec![7i32; 6], vec![7.0f32; 6]);
        let mut outputs = RouteOutputs::new(
            DlpackViewMut::from_slice(&mut out_ids, &[3, 2]).unwrap(),
            DlpackViewMut::from_slice(&mut out_weights, &[3, 2]).unwrap(),
        );
        let inputs = RouteInputs::new(hidden).with_token_ids(token_ids);
        let err = prepared.route_into(&inputs, &mut outputs, Execution::Host).unwrap_err();
        assert!(
            matches!(err, BackendError::TokenIdOutsideTable { row: 1, id: 2, vocab: 2, .. }),
            "{err}"
        );
        assert_eq!(out_ids, vec![7; 6], "refused before any output was written");
    }
}

/// A V3-like spec with `e` experts.
fn v3_like(e: usize, non_finite: NonFinitePolicy) -> RoutingSpec {
    let mut spec = RoutingSpec::builder(e, 8)
        .scoring(ScoringFunc::Sigmoid)
        .method(TopkMethod::NoauxTc)
        .groups(8, 4)
        .norm_topk_prob(true)
        .routed_scaling_factor(2.5)
        .build()
        .unwrap();
    spec.non_finite = non_finite;
    spec
}

#[test]
fn non_finite_rows_follow_the_policy_on_every_path() {
    // 300 tokens: the token split with chunks on two threads; bad rows in different chunks.
    let (t, e, h) = (300, 64, 40);
    let case = Case {
        spec: v3_like(e, NonFinitePolicy::Error),
        tokens: t,
        hidden: h,
        x_type: 0,
        w_bf16: true,
        seed: 9,
    };
    let mut inputs = Inputs::new(&case);
    inputs.x[250 * h + 3] = f32::NAN;
    inputs.x[37 * h] = f32::INFINITY;
    inputs.x[200 * h + 1] = f32::NEG_INFINITY;
    let exact = reference::router_logits(&inputs.x, &inputs.w, t, h, e).unwrap();
    let bias = inputs.bias.as_deref();
    for backend in backends() {
        let what = label(&backend);
        let prepared =
            backend.prepare_router(inputs.w_dl(&case), inputs.bias_dl(), &case.spec).unwrap();
        match prepared.route(&inputs.x_dl(&case)) {
            Err(BackendError::NonFinite { row, .. }) => assert_eq!(row, 37, "{what}"),
            other => panic!("{what}: expected a non-finite error, got {other:?}"),
        }
        // Small T goes through the expert split and the second routing pass.
        let few = Case { tokens: 40, ..case.clone() };
        let err = prepared
            .route(&Inputs { x: inputs.x[..40 * h].to_vec(), ..Inputs::new(&few) }.x_dl(&few));
        assert!(matches!(err, Err(BackendError::NonFinite { row: 37, .. })), "{what}: {err:?}");

        let spec = v3_like(e, NonFinitePolicy::MarkInvalid);
        let expected = reference::route(&exact, t, bias, &spec).unwrap();
        let near = reference::near_tie_rows(&exact, t, bias, &spec, NEAR_TIE).unwrap();
        let prepared = backend.prepare_router(inputs.w_dl(&case), inputs.bias_dl(), &spec).unwrap();
        let (_, ids, weights) = read_routing(prepared.route(&inputs.x_dl(&case)).unwrap());
        for row in [37, 200, 250] {
            assert_eq!(&ids[row * 8..row * 8 + 8], &[-1; 8], "{what}");
            assert_eq!(&weights[row * 8..row * 8 + 8], &[0.0; 8], "{what}");
        }
        let summary = reference::compare_routings(
            &expected,
            &as_routing(&case, ids, weights),
            e,
            &near,
            WEIGHTS,
        )
        .unwrap_or_else(|m| panic!("{what}: {m}"));
        assert_eq!(summary.rows_invalid, 3);
    }
}
