//! Helpers shared by the integration tests: backends for every kernel family, DLPack in and out.

#![allow(dead_code)]

use std::io::Write;

use half::bf16;
use sluice_backend_cpu::{CpuBackend, CpuKernel};
use sluice_models::MoeGate;
use sluice_tensor::dlpack::export_vec;
use sluice_tensor::{
    BiasRole, Dlpack, Element, RoutingOutput, RoutingSpec, ScoringFunc, ScoringOrder, Tensor,
    TopkMethod,
};

/// A backend for every kernel family this CPU supports, with one and with two threads. A family
/// the CPU lacks is reported as skipped for the calling test.
pub fn backends() -> Vec<CpuBackend> {
    let mut out = Vec::new();
    for kernel in CpuKernel::CONCRETE {
        if let Some(missing) = kernel.missing_features() {
            let test = std::thread::current().name().unwrap_or("a test").to_owned();
            let line = format!("SKIPPED {test} on the {kernel} kernel: this CPU lacks {missing}\n");
            // Straight to the stream: the harness captures `eprintln!` of a passing test, which
            // would hide that a family went untested. A failed write has nowhere to be reported.
            let _ = std::io::stderr().write_all(line.as_bytes());
            continue;
        }
        for threads in [1, 2] {
            out.push(CpuBackend::builder().kernel(kernel).threads(threads).build().unwrap());
        }
    }
    out
}

/// A short label for messages.
pub fn label(backend: &CpuBackend) -> String {
    format!("{} x{}", backend.kernel(), backend.threads())
}

/// A host DLPack tensor owning `data`.
pub fn dl<T: Element>(data: Vec<T>, shape: &[usize]) -> Dlpack {
    export_vec(data, shape).unwrap()
}

/// The elements of a host DLPack tensor, in row-major order.
pub fn read<T: Element>(dl: Dlpack) -> (Vec<usize>, Vec<T>) {
    let tensor = Tensor::from_dlpack(dl).unwrap();
    (tensor.shape().to_vec(), tensor.to_vec::<T>().unwrap())
}

/// Ids and weights of a routing output.
pub fn read_routing(out: RoutingOutput) -> (Vec<usize>, Vec<i32>, Vec<f32>) {
    let (shape, ids) = read::<i32>(out.topk_ids);
    let (weight_shape, weights) = read::<f32>(out.topk_weights);
    assert_eq!(shape, weight_shape);
    (shape, ids, weights)
}

/// Deterministic pseudo-random numbers (xorshift64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly normal (sum of uniforms), mean 0, standard deviation about `scale`.
    pub fn normal(&mut self, scale: f32) -> f32 {
        let sum: f32 = (0..4).map(|_| self.unit()).sum();
        (sum - 2.0) * 1.7 * scale
    }

    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal(scale)).collect()
    }
}

/// A gate with V3's routing (sigmoid, `noaux_tc`, renormalised, scale 2.5) for `experts` experts in
/// `groups` groups keeping `keep`, top-`top_k`, with random bf16 weights `N(0, weight_std)` and an
/// f32 bias `N(0, 0.05)` drawn from `seed`. A small hidden size keeps debug builds fast.
pub fn noaux_gate(
    experts: usize,
    hidden: usize,
    (groups, keep, top_k): (usize, usize, usize),
    weight_std: f32,
    seed: u64,
) -> MoeGate {
    let spec = RoutingSpec::builder(experts, top_k)
        .scoring(ScoringFunc::Sigmoid)
        .method(TopkMethod::NoauxTc)
        .groups(groups, keep)
        .norm_topk_prob(true)
        .routed_scaling_factor(2.5)
        .build()
        .unwrap();
    let mut rng = Rng::new(seed);
    let weight: Vec<bf16> =
        rng.normals(experts * hidden, weight_std).into_iter().map(bf16::from_f32).collect();
    let bias = rng.normals(experts, 0.05);
    MoeGate::new(
        3,
        spec,
        Tensor::from_vec(weight, &[experts, hidden]).unwrap(),
        Some(Tensor::from_vec(bias, &[experts]).unwrap()),
    )
    .unwrap()
}

/// One gate per model family sluice knows, at a small hidden size: V2-Lite (softmax, greedy),
/// V2 (softmax, group-limited greedy, scale 16), V3 (sigmoid, `noaux_tc`, 8 groups keep 4) and
/// Kimi-K2 (sigmoid, `noaux_tc`, one group of 384), with random bf16 weights from `seed`.
pub fn family_gates(hidden: usize, seed: u64) -> Vec<(&'static str, MoeGate)> {
    let softmax = |experts, (groups, keep), top_k, method, scale| {
        let spec = RoutingSpec::builder(experts, top_k)
            .scoring(ScoringFunc::Softmax)
            .method(method)
            .groups(groups, keep)
            .routed_scaling_factor(scale)
            .build()
            .unwrap();
        let mut rng = Rng::new(seed);
        let weight: Vec<bf16> =
            rng.normals(experts * hidden, 0.3).into_iter().map(bf16::from_f32).collect();
        MoeGate::new(1, spec, Tensor::from_vec(weight, &[experts, hidden]).unwrap(), None).unwrap()
    };
    // gpt-oss (a bias on the logits, softmax of the selected) and Llama 4 (sigmoid of the
    // selected): scored after the top-k.
    let after_top_k = |experts, top_k, scoring, bias_role| {
        let spec = RoutingSpec::builder(experts, top_k)
            .scoring(scoring)
            .scoring_order(ScoringOrder::AfterTopk)
            .bias_role(bias_role)
            .build()
            .unwrap();
        let mut rng = Rng::new(seed);
        let weight: Vec<bf16> =
            rng.normals(experts * hidden, 0.3).into_iter().map(bf16::from_f32).collect();
        let bias = spec
            .takes_bias()
            .then(|| Tensor::from_vec(rng.normals(experts, 0.5), &[experts]).unwrap());
        MoeGate::new(1, spec, Tensor::from_vec(weight, &[experts, hidden]).unwrap(), bias).unwrap()
    };
    vec![
        ("v2-lite", softmax(64, (1, 1), 6, TopkMethod::Greedy, 1.0)),
        ("v2", softmax(160, (8, 3), 6, TopkMethod::GroupLimitedGreedy, 16.0)),
        ("v3", noaux_gate(256, hidden, (8, 4, 8), 0.3, seed)),
        ("kimi-k2", noaux_gate(384, hidden, (1, 1, 8), 0.3, seed)),
        ("gpt-oss", after_top_k(128, 4, ScoringFunc::Softmax, BiasRole::Logits)),
        ("llama4", after_top_k(128, 1, ScoringFunc::Sigmoid, BiasRole::Correction)),
    ]
}
