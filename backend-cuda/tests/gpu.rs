//! The CUDA backend against the scalar reference router and the golden fixtures.
//!
//! Without a CUDA device every test prints why it skipped and passes; with
//! `SLUICE_REQUIRE_GPU=1` (set by the GPU bundle's `run.sh`) a missing device fails instead.
//! `SLUICE_TESTDATA` points at the fixtures where the source tree is not around.

mod common;

use std::path::PathBuf;

use common::{backend, dl, host_values};

use half::{bf16, f16};
use sluice_backend_cuda::CudaBackend;
use sluice_models::golden::{GoldenFixture, InputKind};
use sluice_models::reference::{self, Routing, Tolerance};
use sluice_models::{Checkpoint, MoeGate};
use sluice_tensor::{
    Backend, BackendError, BiasRole, Dlpack, NonFinitePolicy, RoutingSpec, ScoringFunc,
    ScoringOrder, Tensor, TopkMethod,
};

const WEIGHTS: Tolerance = Tolerance { abs: 1e-5, rel: 1e-5 };
/// Relative gap under which the GPU and the reference may choose differently: far above the f32
/// rounding of a logit, far below the gaps of random data.
const NEAR_TIE: f32 = 1e-4;

/// Deterministic pseudo-random numbers (xorshift64), roughly normal.
struct Rng(u64);

impl Rng {
    fn normal(&mut self, scale: f32) -> f32 {
        let mut sum = 0.0;
        for _ in 0..4 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            sum += (self.0 >> 40) as f32 / (1u64 << 24) as f32;
        }
        (sum - 2.0) * 1.7 * scale
    }

    fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal(scale)).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum HiddenType {
    F32,
    Bf16,
    F16,
}

struct Case {
    spec: RoutingSpec,
    tokens: usize,
    hidden: usize,
    x_type: HiddenType,
    w_bf16: bool,
    /// Warm the router up for `tokens` before routing (where cuBLASLt runs the GEMM this times its
    /// candidate algorithms and keeps the fastest).
    warm_up: bool,
}

fn spec(e: usize, method: TopkMethod, groups: (usize, usize), k: usize, norm: bool) -> RoutingSpec {
    let scoring =
        if method == TopkMethod::NoauxTc { ScoringFunc::Sigmoid } else { ScoringFunc::Softmax };
    RoutingSpec::builder(e, k)
        .scoring(scoring)
        .method(method)
        .groups(groups.0, groups.1)
        .norm_topk_prob(norm)
        .routed_scaling_factor(2.5)
        .build()
        .unwrap()
}

/// Runs one case on the GPU and checks it against the reference: logits within the f32
/// accumulation bound, expert sets equal except on near ties, weights within 1e-5.
fn check(backend: &CudaBackend, case: &Case, seed: u64) {
    let (t, h, e) = (case.tokens, case.hidden, case.spec.num_experts);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let round = |v: Vec<f32>, ty: HiddenType| -> Vec<f32> {
        match ty {
            HiddenType::F32 => v,
            HiddenType::Bf16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
            HiddenType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        }
    };
    let x = round(rng.normals(t * h, 1.0), case.x_type);
    let w = rng.normals(e * h, 2.0 / (h as f32).sqrt());
    let w = if case.w_bf16 { round(w, HiddenType::Bf16) } else { w };
    let bias = case.spec.takes_bias().then(|| rng.normals(e, 0.1));

    let x_dl = match case.x_type {
        HiddenType::F32 => dl(x.clone(), &[t, h]),
        HiddenType::Bf16 => dl(x.iter().map(|&v| bf16::from_f32(v)).collect(), &[t, h]),
        HiddenType::F16 => dl(x.iter().map(|&v| f16::from_f32(v)).collect(), &[t, h]),
    };
    let w_dl = if case.w_bf16 {
        dl(w.iter().map(|&v| bf16::from_f32(v)).collect(), &[e, h])
    } else {
        dl(w.clone(), &[e, h])
    };
    let bias_dl = bias.as_ref().map(|b| dl(b.clone(), &[e]));
    let context =
        format!("{} T={t} H={h} x={:?} w_bf16={} seed={seed}", case.spec, case.x_type, case.w_bf16);

    let prepared = backend.prepare(&w_dl, bias_dl.as_ref(), &case.spec).unwrap();
    if case.warm_up {
        sluice_tensor::PreparedRouter::warm_up(&prepared, t)
            .unwrap_or_else(|e| panic!("{context}: warm_up: {e}"));
    }
    let exact = reference::router_logits(&x, &w, t, h, e).unwrap();

    let logits =
        host_values::<f32>(sluice_tensor::PreparedRouter::router_gemm(&prepared, &x_dl).unwrap());
    for i in 0..t {
        for j in 0..e {
            let magnitude: f32 = (0..h).map(|k| (x[i * h + k] * w[j * h + k]).abs()).sum();
            let bound = (h as f32 + 4.0) * f32::EPSILON * magnitude + f32::MIN_POSITIVE;
            let (got, want) = (logits[i * e + j], exact[i * e + j]);
            assert!((got - want).abs() <= bound, "{context}: logit [{i}, {j}] {got} vs {want}");
        }
    }

    let out = sluice_tensor::PreparedRouter::route(&prepared, &x_dl).unwrap();
    let ours =
        Routing::new(t, case.spec.top_k, host_values(out.topk_ids), host_values(out.topk_weights))
            .unwrap();
    reference::check_sorted(&ours).unwrap_or_else(|e| panic!("{context}: {e}"));
    let expected = reference::route(&exact, t, bias.as_deref(), &case.spec).unwrap();
    let near_ties =
        reference::near_tie_rows(&exact, t, bias.as_deref(), &case.spec, NEAR_TIE).unwrap();
    let summary = reference::compare_routings(&expected, &ours, e, &near_ties, WEIGHTS)
        .unwrap_or_else(|err| panic!("{context}: {err}"));
    assert!(summary.rows_compared + summary.rows_skipped == t, "{context}");

    // Routing alone, from the exact logits. The same near ties are skipped: the device's f32
    // scores may differ from the reference's correctly rounded ones by an ulp, which orders two
    // candidates within one either way (at 4000 tokens of 512 experts, a row whose 16th choice
    // was two candidates 1.2e-7 apart).
    let from_logits =
        backend.route_logits(&dl(exact.clone(), &[t, e]), bias_dl.as_ref(), &case.spec).unwrap();
    let ours = Routing::new(
        t,
        case.spec.top_k,
        host_values(from_logits.topk_ids),
        host_values(from_logits.topk_weights),
    )
    .unwrap();
    reference::compare_routings(&expected, &ours, e, &near_ties, WEIGHTS)
        .unwrap_or_else(|err| panic!("{context} (route_logits): {err}"));
}

/// The configs no engine's fused kernel accepts (each needs E / n_group <= 32 and K <= 8), the
/// known models' shapes, and small odd ones.
fn configs() -> Vec<RoutingSpec> {
    use TopkMethod::*;
    vec![
        spec(256, NoauxTc, (8, 4), 8, true),             // DeepSeek-V3
        spec(384, NoauxTc, (1, 1), 8, true),             // Kimi-K2
        spec(64, Greedy, (1, 1), 6, false),              // V2-Lite
        spec(160, GroupLimitedGreedy, (8, 3), 6, false), // DeepSeek-V2: 8 groups of 20
        spec(72, NoauxTc, (6, 3), 8, true),              // 6 groups of 12
        spec(72, GroupLimitedGreedy, (6, 2), 5, true),
        spec(512, NoauxTc, (16, 8), 16, true), // K = 16
        spec(1024, NoauxTc, (1, 1), 32, true), // E = 1024 in one group, K = 32
        spec(1024, GroupLimitedGreedy, (64, 5), 9, false),
        spec(7, Greedy, (1, 1), 3, true),
        spec(96, NoauxTc, (48, 10), 4, false), // more groups than lanes
        RoutingSpec { scoring: ScoringFunc::SqrtSoftplus, ..spec(256, NoauxTc, (1, 1), 6, true) },
        // Lanes past the last expert (200 experts, 7 a lane; 100, 4 a lane), and 4 groups of
        // 64: 8 whole lanes a group.
        RoutingSpec { scoring: ScoringFunc::Sigmoid, ..spec(200, Greedy, (1, 1), 8, true) },
        spec(100, NoauxTc, (1, 1), 4, false),
        spec(256, NoauxTc, (4, 2), 8, true),
        // Scoring after the top-k: gpt-oss (softmax of the selected logits, a bias on the
        // logits), Llama 4 (the sigmoid of each selected logit), and both renormalised.
        RoutingSpec::builder(128, 4)
            .scoring_order(ScoringOrder::AfterTopk)
            .bias_role(BiasRole::Logits)
            .build()
            .unwrap(),
        RoutingSpec::builder(16, 1)
            .scoring(ScoringFunc::Sigmoid)
            .scoring_order(ScoringOrder::AfterTopk)
            .build()
            .unwrap(),
        RoutingSpec::builder(160, 6)
            .scoring(ScoringFunc::Sigmoid)
            .scoring_order(ScoringOrder::AfterTopk)
            .norm_topk_prob(true)
            .routed_scaling_factor(2.5)
            .build()
            .unwrap(),
        // A bias on the logits with scores before the top-k.
        RoutingSpec::builder(64, 6).bias_role(BiasRole::Logits).build().unwrap(),
    ]
}

#[test]
fn random_configs_match_the_reference() {
    let Some(backend) = backend("random_configs_match_the_reference") else { return };
    let mut seed = 1;
    // Tokens of more than 64 experts (K <= 16) are routed a block per token up to 64 on any device
    // and while one wave of the device's threads holds their blocks (130 tokens on an H200), a
    // warp per token past that wave (4001 tokens, even at 96 threads a block, the last block's
    // warps not all used): every config goes through both routing kernels.
    for spec in configs() {
        for (tokens, hidden, x_type, w_bf16) in [
            (1, 256, HiddenType::Bf16, true),
            (3, 136, HiddenType::Bf16, true),
            (5, 72, HiddenType::F32, true),
            (64, 136, HiddenType::F16, true),
            (130, 264, HiddenType::Bf16, true),
            (4001, 40, HiddenType::Bf16, true),
            (9, 40, HiddenType::F32, false),
            // The tiles kernels, with hidden sizes that are not a multiple of their 64-value steps:
            // the bulk-copy kernel at 5 tokens, the warpgroup one (the copy unit filling zeros
            // past the hidden size and the tokens) at 24 and 64, and with two token blocks at 100.
            (5, 2056, HiddenType::Bf16, true),
            (24, 40, HiddenType::Bf16, true),
            (64, 1032, HiddenType::Bf16, true),
            (100, 1032, HiddenType::Bf16, true),
        ] {
            seed += 1;
            check(&backend, &Case { spec, tokens, hidden, x_type, w_bf16, warm_up: false }, seed);
        }
    }
}

/// DeepSeek-V3's and Kimi-K2's routing specs.
fn model_specs() -> (RoutingSpec, RoutingSpec) {
    (
        spec(256, TopkMethod::NoauxTc, (8, 4), 8, true),
        spec(384, TopkMethod::NoauxTc, (1, 1), 8, true),
    )
}

/// Checks bf16 tokens and weights of each `(spec, tokens, hidden)`, the router warmed up for its
/// token count first, with seeds from `first_seed` on.
fn check_warmed_bf16(
    backend: &CudaBackend,
    cases: &[(RoutingSpec, usize, usize)],
    first_seed: u64,
) {
    for (seed, &(spec, tokens, hidden)) in (first_seed..).zip(cases) {
        let case =
            Case { spec, tokens, hidden, x_type: HiddenType::Bf16, w_bf16: true, warm_up: true };
        check(backend, &case, seed);
    }
}

/// `warm_up` times cuBLASLt's candidate algorithms for bf16 token counts past the backend's own
/// kernels (64, or 128 for V3's shape, on Hopper; 8 before it) and keeps the fastest; whichever it
/// keeps, the gate must still route like the reference at that count.
#[test]
fn cublaslt_algorithms_chosen_by_timing_route_like_the_reference() {
    let Some(backend) = backend("cublaslt_algorithms_chosen_by_timing_route_like_the_reference")
    else {
        return;
    };
    let (v3, kimi) = model_specs();
    // The models' hidden size where the CPU reference stays quick, a smaller one at T = 1024.
    let cases = [(v3, 129, 7168), (kimi, 96, 7168), (v3, 1024, 1024), (kimi, 1024, 1024)];
    check_warmed_bf16(&backend, &cases, 1001);
}

/// The models' own shapes through the tiles kernels (3 to 64 bf16 tokens on Hopper, and V3's to
/// 128): the bulk-copy kernel up to 16 tokens, the warpgroup kernel's token boxes of 24 to 64 rows
/// past it, V3's 16 splits and Kimi-K2's 11, and V3's two token blocks of 33 and 64 rows over 8
/// splits at 65 and 128 tokens.
#[test]
fn tens_of_tokens_at_the_models_shapes_route_like_the_reference() {
    let Some(backend) = backend("tens_of_tokens_at_the_models_shapes_route_like_the_reference")
    else {
        return;
    };
    let (v3, kimi) = model_specs();
    let cases =
        [(v3, 5), (kimi, 8), (v3, 16), (kimi, 17), (v3, 33), (kimi, 48), (v3, 64), (kimi, 64)]
            .into_iter()
            .chain([(v3, 65), (v3, 128)])
            .map(|(spec, tokens)| (spec, tokens, 7168))
            .collect::<Vec<_>>();
    check_warmed_bf16(&backend, &cases, 2001);
}

#[test]
fn unscaled_and_mark_invalid_specs_route_like_the_reference() {
    let Some(backend) = backend("unscaled_and_mark_invalid_specs_route_like_the_reference") else {
        return;
    };
    let mut s = spec(256, TopkMethod::NoauxTc, (8, 4), 8, true);
    s.apply_scaling = false;
    check(
        &backend,
        &Case {
            spec: s,
            tokens: 33,
            hidden: 128,
            x_type: HiddenType::F32,
            w_bf16: true,
            warm_up: false,
        },
        7,
    );

    // A NaN and an infinity in two rows: those rows are marked, the others routed. Six tokens
    // of 64 experts take the warp kernel (softmax and sigmoid scores), three of 128 the
    // block-per-token one.
    for (t, e, scoring) in [
        (6, 64, ScoringFunc::Softmax),
        (6, 64, ScoringFunc::Sigmoid),
        (3, 128, ScoringFunc::Softmax),
    ] {
        let mut s = RoutingSpec { scoring, ..spec(e, TopkMethod::Greedy, (1, 1), 4, true) };
        s.non_finite = NonFinitePolicy::MarkInvalid;
        let mut rng = Rng(99);
        let mut logits = rng.normals(t * e, 1.0);
        logits[2 * e + 5] = f32::NAN;
        logits[e] = f32::INFINITY;
        let out = backend.route_logits(&dl(logits.clone(), &[t, e]), None, &s).unwrap();
        let ours =
            Routing::new(t, 4, host_values(out.topk_ids), host_values(out.topk_weights)).unwrap();
        let expected = reference::route(&logits, t, None, &s).unwrap();
        reference::compare_routings(&expected, &ours, e, &[], WEIGHTS).unwrap();
        assert_eq!(&ours.ids()[4..12], &[-1; 8], "{t} x {e}");

        s.non_finite = NonFinitePolicy::Error;
        let error = backend.route_logits(&dl(logits, &[t, e]), None, &s).unwrap_err();
        assert!(matches!(error, BackendError::NonFinite { row: 1, .. }), "{error}");
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    let Some(backend) = backend("bad_arguments_are_typed_errors") else { return };
    let s = spec(256, TopkMethod::NoauxTc, (8, 4), 8, true);
    let w = dl(vec![bf16::ZERO; 255 * 16], &[255, 16]);
    assert!(matches!(backend.prepare(&w, None, &s), Err(BackendError::Shape { .. })));
    let w = dl(vec![bf16::ZERO; 256 * 16], &[256, 16]);
    let nan_bias = dl(vec![f32::NAN; 256], &[256]);
    assert!(matches!(
        backend.prepare(&w, Some(&nan_bias), &s),
        Err(BackendError::NonFiniteBias { expert: 0, .. })
    ));
    let prepared = backend.prepare(&w, None, &s).unwrap();
    let x = dl(vec![1i32; 2 * 16], &[2, 16]);
    assert!(matches!(
        sluice_tensor::PreparedRouter::route(&prepared, &x),
        Err(BackendError::UnsupportedDType { .. })
    ));
    let x = dl(vec![1f32; 2 * 15], &[2, 15]);
    assert!(matches!(
        sluice_tensor::PreparedRouter::route(&prepared, &x),
        Err(BackendError::Shape { .. })
    ));
    let empty =
        sluice_tensor::PreparedRouter::route(&prepared, &dl(Vec::<f32>::new(), &[0, 16])).unwrap();
    assert!(host_values::<i32>(empty.topk_ids).is_empty());
}

#[test]
fn device_tensors_keep_their_pointer_and_device() {
    let Some(backend) = backend("device_tensors_keep_their_pointer_and_device") else { return };
    let host = dl((0..24).map(|v| v as f32).collect::<Vec<f32>>(), &[4, 6]);
    let device = backend.upload(&host).unwrap();
    let address = device.validate().unwrap().data_ptr() as usize;
    let tensor = Tensor::from_dlpack(device).unwrap();
    assert_eq!(tensor.device(), sluice_tensor::Device::Cuda(0));
    assert_eq!(tensor.data_ptr() as usize, address);
    let again = tensor.to_dlpack().unwrap();
    assert_eq!(again.validate().unwrap().data_ptr() as usize, address);
    let back = host_values::<f32>(backend.download(&again).unwrap());
    assert_eq!(back, (0..24).map(|v| v as f32).collect::<Vec<_>>());
}

fn testdata() -> PathBuf {
    std::env::var_os("SLUICE_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/testdata"))
}

#[test]
fn golden_fixtures_route_like_transformers() {
    let Some(backend) = backend("golden_fixtures_route_like_transformers") else { return };
    let (mut checked, mut hashed_layers) = (0, 0);
    for name in [
        "v2-lite",
        "v2",
        "v3",
        "kimi-k2",
        "saved-by-transformers",
        "qwen3-moe",
        "qwen3-moe-sparse-step",
        "mixtral",
        "glm4-moe",
        "glm4-moe-real-shape",
        "minimax-m2",
        "minimax-m2-real-shape",
        "gpt-oss",
        "gpt-oss-real-shape",
        "llama4",
        "llama4-real-shape",
        "v32",
        "v4",
        "v4-real-shape",
        "v4-saved-by-transformers",
    ] {
        let checkpoint = Checkpoint::open(testdata().join(name)).unwrap();
        let golden = GoldenFixture::in_checkpoint(checkpoint.dir()).unwrap();
        // DeepSeek-V4's hash-routed layers choose their experts by these token ids.
        let input_ids = golden.input_ids().unwrap();
        for gate in MoeGate::load_all(&checkpoint).unwrap() {
            let hashed = gate.spec().method == TopkMethod::Hash;
            hashed_layers += usize::from(hashed);
            let prepared = gate.prepare(&backend).unwrap();
            let bias = gate.bias().map(|b| b.to_vec::<f32>().unwrap());
            for kind in InputKind::ALL {
                let context = format!("{name} layer {} {kind}", gate.layer());
                // As the framework hands them over: requiring grad; the gate detaches them.
                let hidden = golden.hidden_states(kind).unwrap().with_requires_grad(true);
                let routed = prepared.route_with_token_ids(&hidden, input_ids.as_ref());
                let ours =
                    routed.unwrap_or_else(|e| panic!("{context}: {e}")).to_routing().unwrap();
                reference::check_sorted(&ours).unwrap();
                let logits = golden.logits(gate.layer(), kind).unwrap();
                let mut near_ties = reference::near_tie_rows(
                    &logits,
                    golden.tokens(),
                    bias.as_deref(),
                    gate.spec(),
                    1e-6,
                )
                .unwrap();
                near_ties.extend_from_slice(golden.near_ties(gate.layer(), kind));
                let expected = golden.routing(gate.layer(), kind).unwrap();
                let summary = reference::compare_routings(
                    &expected,
                    &ours,
                    gate.num_experts(),
                    &near_ties,
                    WEIGHTS,
                )
                .unwrap_or_else(|e| panic!("{context}: {e}"));
                assert!(summary.rows_compared > golden.tokens() / 2, "{context}: {summary:?}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} fixture layers checked");
    assert!(hashed_layers >= 4, "only {hashed_layers} hash-routed fixture layers");
}

/// A hash-routed spec: `e` experts, `k` per token, scored by `scoring`.
fn hash_spec(e: usize, k: usize, scoring: ScoringFunc, norm: bool, scale: f32) -> RoutingSpec {
    RoutingSpec::builder(e, k)
        .scoring(scoring)
        .method(TopkMethod::Hash)
        .norm_topk_prob(norm)
        .routed_scaling_factor(scale)
        .build()
        .unwrap()
}

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    /// A table `[vocab, k]` whose rows are `k` distinct experts of `[0, e)`, in random order.
    fn hash_table(&mut self, vocab: usize, k: usize, e: usize) -> Vec<i32> {
        let mut table = Vec::with_capacity(vocab * k);
        let mut experts: Vec<i32> = (0..e as i32).collect();
        for _ in 0..vocab {
            for i in 0..k {
                let j = i + self.below(e - i);
                experts.swap(i, j);
            }
            table.extend_from_slice(&experts[..k]);
        }
        table
    }
}

/// Token ids as the caller has them: i32 or i64 `[T]`.
fn token_ids_dl(ids: &[i64], i32_ids: bool) -> Dlpack {
    if i32_ids {
        dl(ids.iter().map(|&id| id as i32).collect(), &[ids.len()])
    } else {
        dl(ids.to_vec(), &[ids.len()])
    }
}

/// Hash-routed configs, none of which a fused kernel of another engine takes (every expert count
/// up to 1024, K up to 32, the three scoring functions), with i32 and i64 token ids, from host and
/// device memory, against the reference on the exact logits.
#[test]
fn random_hash_configs_match_the_reference() {
    let Some(backend) = backend("random_hash_configs_match_the_reference") else { return };
    use ScoringFunc::*;
    let configs = [
        hash_spec(256, 6, SqrtSoftplus, true, 1.5), // DeepSeek-V4
        hash_spec(1024, 32, Softmax, false, 1.0),
        hash_spec(512, 16, SqrtSoftplus, true, 2.0),
        hash_spec(72, 8, Sigmoid, true, 2.5),
        hash_spec(7, 3, Softmax, true, 1.0),
        hash_spec(64, 1, Sigmoid, false, 1.0),
    ];
    let mut seed: u64 = 100;
    for spec in configs {
        let (e, k) = (spec.num_experts, spec.top_k);
        for (tokens, hidden, vocab, i32_ids, w_bf16) in
            [(1, 64, 3, true, true), (5, 72, 50, false, false), (130, 136, 1000, true, true)]
        {
            seed += 1;
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let table = rng.hash_table(vocab, k, e);
            let ids: Vec<i64> = (0..tokens).map(|_| rng.below(vocab) as i64).collect();
            let x = rng.normals(tokens * hidden, 1.0);
            let w = rng.normals(e * hidden, 2.0 / (hidden as f32).sqrt());
            let (w, w_dl) = if w_bf16 {
                let w: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                (w.iter().map(|v| v.to_f32()).collect(), dl(w, &[e, hidden]))
            } else {
                (w.clone(), dl(w, &[e, hidden]))
            };
            let context = format!("{spec} T={tokens} vocab={vocab} i32 ids={i32_ids} seed={seed}");
            let prepared =
                backend.prepare_hashed(&w_dl, &dl(table.clone(), &[vocab, k]), &spec).unwrap();
            let exact = reference::router_logits(&x, &w, tokens, hidden, e).unwrap();
            let expected = reference::route_hashed(&exact, tokens, &table, &ids, &spec).unwrap();
            let x_dl = dl(x.clone(), &[tokens, hidden]);
            let host_ids = token_ids_dl(&ids, i32_ids);
            let device_ids = backend.upload(&host_ids).unwrap();
            for (where_, ids_dl) in [("host ids", &host_ids), ("device ids", &device_ids)] {
                let out =
                    sluice_tensor::PreparedRouter::route_with_token_ids(&prepared, &x_dl, ids_dl)
                        .unwrap_or_else(|err| panic!("{context} {where_}: {err}"));
                let ours = Routing::new(
                    tokens,
                    k,
                    host_values(out.topk_ids),
                    host_values(out.topk_weights),
                )
                .unwrap();
                reference::check_sorted(&ours).unwrap_or_else(|e| panic!("{context}: {e}"));
                let summary = reference::compare_routings(&expected, &ours, e, &[], WEIGHTS)
                    .unwrap_or_else(|err| panic!("{context} {where_}: {err}"));
                assert_eq!(summary.rows_compared, tokens, "{context} {where_}");
            }
        }
    }
}

/// What a hash-routed call cannot do is refused with the CPU backend's typed errors.
#[test]
fn hash_routing_refusals_are_typed_errors() {
    let Some(backend) = backend("hash_routing_refusals_are_typed_errors") else { return };
    let (e, k, h, vocab) = (16, 2, 32, 4);
    let spec = hash_spec(e, k, ScoringFunc::SqrtSoftplus, true, 1.5);
    let weight = || dl(Rng(5).normals(e * h, 0.3), &[e, h]);
    let table: Vec<i32> = vec![0, 1, 2, 3, 15, 4, 9, 8];
    let table_dl = || dl(table.clone(), &[vocab, k]);
    let err = backend.prepare(&weight(), None, &spec).unwrap_err();
    assert!(matches!(err, BackendError::MissingHashTable { .. }), "{err}");
    let topk = RoutingSpec { method: TopkMethod::NoauxTc, ..spec };
    let err = backend.prepare_hashed(&weight(), &table_dl(), &topk).unwrap_err();
    assert!(matches!(err, BackendError::UnexpectedHashTable { .. }), "{err}");
    let mut bad = table.clone();
    bad[5] = 16;
    let err = backend.prepare_hashed(&weight(), &dl(bad, &[vocab, k]), &spec).unwrap_err();
    assert!(matches!(err, BackendError::HashTable { .. }), "{err}");
    let wide: Vec<i64> = table.iter().map(|&id| i64::from(id)).collect();
    let err = backend.prepare_hashed(&weight(), &dl(wide, &[vocab, k]), &spec).unwrap_err();
    assert!(matches!(err, BackendError::UnsupportedDType { arg: "table", .. }), "{err}");
    let err = backend.route_logits(&dl(vec![0f32; 2 * e], &[2, e]), None, &spec).unwrap_err();
    assert!(matches!(err, BackendError::MissingHashTable { .. }), "{err}");

    // The table may come from device memory too.
    let prepared =
        backend.prepare_hashed(&weight(), &backend.upload(&table_dl()).unwrap(), &spec).unwrap();
    let x = dl(Rng(6).normals(3 * h, 1.0), &[3, h]);
    let err = sluice_tensor::PreparedRouter::route(&prepared, &x).unwrap_err();
    assert!(matches!(err, BackendError::MissingTokenIds { .. }), "{err}");
    let route = |ids: Dlpack| {
        sluice_tensor::PreparedRouter::route_with_token_ids(&prepared, &x, &ids)
            .map(|out| (host_values::<i32>(out.topk_ids), host_values::<f32>(out.topk_weights)))
    };
    let err = route(dl(vec![0i64, 4, 1], &[3])).unwrap_err();
    assert!(
        matches!(err, BackendError::TokenIdOutsideTable { row: 1, id: 4, vocab: 4, .. }),
        "{err}"
    );
    let err = route(backend.upload(&dl(vec![0i32, 1, -1], &[3])).unwrap()).unwrap_err();
    assert!(matches!(err, BackendError::TokenIdOutsideTable { row: 2, id: -1, .. }), "{err}");
    let err = route(dl(vec![0i32, 1], &[2])).unwrap_err();
    assert!(matches!(err, BackendError::Shape { arg: "token_ids", .. }), "{err}");
    let err = route(dl(vec![0f32, 1.0, 2.0], &[3])).unwrap_err();
    assert!(matches!(err, BackendError::UnsupportedDType { arg: "token_ids", .. }), "{err}");
    // The third row of the batch is token 3's: experts 9 and 8.
    let (ids, weights) = route(dl(vec![0i32, 2, 3], &[3])).unwrap();
    assert_eq!(ids.len(), 6);
    let mut third: Vec<i32> = ids[4..].to_vec();
    third.sort_unstable();
    assert_eq!(third, [8, 9]);
    assert!((weights[4] + weights[5] - 1.5).abs() < 1e-5, "renormalised, then scaled by 1.5");
}
