//! Gates of real models' shapes with random weights from a fixed seed, for `demo` and `bench`.

use clap::ValueEnum;
use half::bf16;
use sluice_models::MoeGate;
use sluice_tensor::{BiasRole, RoutingSpec, ScoringFunc, ScoringOrder, Tensor, TopkMethod};

use crate::error::CliError;

/// The model shapes `demo` and `bench` know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelShape {
    /// DeepSeek-V3 / R1: 7168 -> 256 experts, 8 groups keep 4, top-8, sigmoid + bias, scale 2.5.
    V3,
    /// Kimi-K2: 7168 -> 384 experts, one group, top-8, sigmoid + bias, scale 2.827.
    #[value(name = "kimi-k2")]
    KimiK2,
    /// DeepSeek-V2: 5120 -> 160 experts, 8 groups keep 3, top-6, softmax, scale 16.
    V2,
    /// DeepSeek-V2-Lite: 2048 -> 64 experts, top-6, softmax greedy, scale 1.
    #[value(name = "v2-lite")]
    V2Lite,
    /// DeepSeek-V4 (Flash), a top-k layer: 4096 -> 256 experts, no groups, top-6,
    /// sqrt-softplus + bias, scale 1.5.
    V4,
    /// DeepSeek-V4, a hash-routed layer: as `v4`, the experts from a table of 129280 token ids.
    #[value(name = "v4-hash")]
    V4Hash,
    /// Qwen3-235B-A22B: 4096 -> 128 experts, top-8, softmax, renormalised.
    #[value(name = "qwen3-moe")]
    Qwen3Moe,
    /// Mixtral-8x7B: 4096 -> 8 experts, top-2, softmax, renormalised.
    Mixtral,
    /// GLM-4.5: 5120 -> 160 experts, one group, top-8, sigmoid + bias, scale 2.5.
    #[value(name = "glm-4.5")]
    Glm45,
    /// gpt-oss-120b: 2880 -> 128 experts, router bias on the logits, top-4, softmax of the four.
    #[value(name = "gpt-oss")]
    GptOss,
    /// MiniMax-M2: 3072 -> 256 experts, top-8, sigmoid + bias, renormalised.
    #[value(name = "minimax-m2")]
    MinimaxM2,
    /// Llama-4-Maverick, an MoE layer: 5120 -> 128 experts, top-1, sigmoid of the selected logit.
    Llama4,
}

/// The rows of DeepSeek-V4's hash tables (its `vocab_size`).
const V4_VOCAB: usize = 129_280;

impl ModelShape {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            ModelShape::V3 => "v3",
            ModelShape::KimiK2 => "kimi-k2",
            ModelShape::V2 => "v2",
            ModelShape::V2Lite => "v2-lite",
            ModelShape::V4 => "v4",
            ModelShape::V4Hash => "v4-hash",
            ModelShape::Qwen3Moe => "qwen3-moe",
            ModelShape::Mixtral => "mixtral",
            ModelShape::Glm45 => "glm-4.5",
            ModelShape::GptOss => "gpt-oss",
            ModelShape::MinimaxM2 => "minimax-m2",
            ModelShape::Llama4 => "llama4",
        }
    }

    /// The gate, in words, for titles.
    pub fn description(self) -> &'static str {
        match self {
            ModelShape::V3 => "a DeepSeek-V3-shaped gate",
            ModelShape::KimiK2 => "a Kimi-K2-shaped gate",
            ModelShape::V2 => "a DeepSeek-V2-shaped gate",
            ModelShape::V2Lite => "a DeepSeek-V2-Lite-shaped gate",
            ModelShape::V4 => "a DeepSeek-V4-shaped top-k gate",
            ModelShape::V4Hash => "a DeepSeek-V4-shaped hash-routed gate (random token ids)",
            ModelShape::Qwen3Moe => "a Qwen3-235B-A22B-shaped gate",
            ModelShape::Mixtral => "a Mixtral-8x7B-shaped gate",
            ModelShape::Glm45 => "a GLM-4.5-shaped gate",
            ModelShape::GptOss => "a gpt-oss-120b-shaped gate",
            ModelShape::MinimaxM2 => "a MiniMax-M2-shaped gate",
            ModelShape::Llama4 => "a Llama-4-Maverick-shaped MoE gate",
        }
    }

    /// The hidden size `H`.
    pub fn hidden_size(self) -> usize {
        match self {
            ModelShape::V3 | ModelShape::KimiK2 => 7168,
            ModelShape::V2 => 5120,
            ModelShape::V2Lite => 2048,
            ModelShape::V4 | ModelShape::V4Hash | ModelShape::Qwen3Moe | ModelShape::Mixtral => {
                4096
            }
            ModelShape::Glm45 | ModelShape::Llama4 => 5120,
            ModelShape::GptOss => 2880,
            ModelShape::MinimaxM2 => 3072,
        }
    }

    /// The routing config of the real model.
    pub fn spec(self) -> RoutingSpec {
        use ScoringFunc::{Sigmoid, Softmax, SqrtSoftplus};
        use TopkMethod::{Greedy, GroupLimitedGreedy, Hash, NoauxTc};
        let (e, scoring, method, groups, keep, k, renorm, scale) = match self {
            ModelShape::V3 => (256, Sigmoid, NoauxTc, 8, 4, 8, true, 2.5),
            ModelShape::KimiK2 => (384, Sigmoid, NoauxTc, 1, 1, 8, true, 2.827),
            ModelShape::V2 => (160, Softmax, GroupLimitedGreedy, 8, 3, 6, false, 16.0),
            ModelShape::V2Lite => (64, Softmax, Greedy, 1, 1, 6, false, 1.0),
            ModelShape::V4 => (256, SqrtSoftplus, NoauxTc, 1, 1, 6, true, 1.5),
            ModelShape::V4Hash => (256, SqrtSoftplus, Hash, 1, 1, 6, true, 1.5),
            ModelShape::Qwen3Moe => (128, Softmax, Greedy, 1, 1, 8, true, 1.0),
            ModelShape::Mixtral => (8, Softmax, Greedy, 1, 1, 2, true, 1.0),
            ModelShape::Glm45 => (160, Sigmoid, NoauxTc, 1, 1, 8, true, 2.5),
            ModelShape::GptOss => (128, Softmax, Greedy, 1, 1, 4, false, 1.0),
            ModelShape::MinimaxM2 => (256, Sigmoid, NoauxTc, 1, 1, 8, true, 1.0),
            ModelShape::Llama4 => (128, Sigmoid, Greedy, 1, 1, 1, false, 1.0),
        };
        let (order, bias_role) = match self {
            ModelShape::GptOss => (ScoringOrder::AfterTopk, BiasRole::Logits),
            ModelShape::Llama4 => (ScoringOrder::AfterTopk, BiasRole::Correction),
            _ => (ScoringOrder::BeforeTopk, BiasRole::Correction),
        };
        RoutingSpec::builder(e, k)
            .scoring(scoring)
            .method(method)
            .groups(groups, keep)
            .norm_topk_prob(renorm)
            .routed_scaling_factor(scale)
            .scoring_order(order)
            .bias_role(bias_role)
            .build()
            .expect("the real models' routing configs are valid")
    }

    /// A gate of this shape with random weights drawn from `seed` (see [`gate`]).
    pub fn gate(self, seed: u64) -> Result<MoeGate, CliError> {
        gate(self.spec(), self.hidden_size(), seed)
    }
}

/// A gate for `spec` with bf16 weights `N(0, 1) * 2 / sqrt(H)` and, where the spec takes a bias,
/// an f32 bias (a correction bias `0.05 * N(0, 1)`, a bias on the logits `0.5 * N(0, 1)`), or for
/// a hash-routed layer a table whose rows hold `top_k` distinct experts, drawn from `seed`.
pub fn gate(spec: RoutingSpec, h: usize, seed: u64) -> Result<MoeGate, CliError> {
    let e = spec.num_experts;
    let mut rng = Normal::new(seed);
    let scale = 2.0 / (h as f32).sqrt();
    let weight: Vec<bf16> = (0..e * h).map(|_| bf16::from_f32(rng.sample() * scale)).collect();
    let weight = Tensor::from_vec(weight, &[e, h])?;
    let bias = match spec.method {
        _ if spec.takes_bias() => {
            let spread = if spec.bias_on_logits() { 0.5 } else { 0.05 };
            let bias: Vec<f32> = (0..e).map(|_| spread * rng.sample()).collect();
            Some(Tensor::from_vec(bias, &[e])?)
        }
        TopkMethod::Hash => {
            let table = hash_table(&mut rng, V4_VOCAB, e, spec.top_k);
            let table = Tensor::from_vec(table, &[V4_VOCAB, spec.top_k])?;
            return Ok(MoeGate::hashed(0, spec, weight, table)?);
        }
        _ => None,
    };
    Ok(MoeGate::new(0, spec, weight, bias)?)
}

/// Token ids `[tokens]` uniform over a hash-routed gate's table (a synthetic one or a checkpoint's);
/// `None` for a gate that ranks scores and needs none.
pub fn token_ids(gate: &MoeGate, tokens: usize, seed: u64) -> Result<Option<Tensor>, CliError> {
    let Some(&vocab) = gate.hash_table().and_then(|table| table.shape().first()) else {
        return Ok(None);
    };
    let mut rng = Normal::new(seed);
    let ids: Vec<i64> = (0..tokens).map(|_| rng.below(vocab) as i64).collect();
    Ok(Some(Tensor::from_vec(ids, &[tokens])?))
}

/// `vocab` rows of `top_k` distinct experts of `[0, experts)` (a partial Fisher-Yates shuffle per
/// row), row-major.
fn hash_table(rng: &mut Normal, vocab: usize, experts: usize, top_k: usize) -> Vec<i32> {
    let mut order: Vec<i32> = (0..experts as i32).collect();
    let mut table = Vec::with_capacity(vocab * top_k);
    for _ in 0..vocab {
        for i in 0..top_k {
            let j = i + rng.below(experts - i);
            order.swap(i, j);
        }
        table.extend_from_slice(&order[..top_k]);
    }
    table
}

/// Hidden states `[tokens, hidden]` drawn from `N(0, 1)`, as f32 or rounded to bf16.
pub fn hidden_states(
    tokens: usize,
    hidden: usize,
    bf16_input: bool,
    seed: u64,
) -> Result<Tensor, CliError> {
    let len = tokens.checked_mul(hidden).ok_or_else(|| {
        CliError::Input(format!("{tokens} tokens x {hidden} values do not fit in memory"))
    })?;
    let mut values: Vec<f32> = Vec::new();
    values.try_reserve_exact(len).map_err(|_| {
        CliError::Input(format!("cannot allocate hidden states of {tokens} x {hidden} f32"))
    })?;
    let mut rng = Normal::new(seed);
    values.extend((0..len).map(|_| rng.sample()));
    if bf16_input {
        let rounded: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        Ok(Tensor::from_vec(rounded, &[tokens, hidden])?)
    } else {
        Ok(Tensor::from_vec(values, &[tokens, hidden])?)
    }
}

/// Standard normal samples from SplitMix64 through Box-Muller: small, deterministic, good enough
/// for synthetic weights.
struct Normal {
    state: u64,
    spare: Option<f32>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Normal { state: seed, spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (`n > 0`; the modulo bias is negligible for the small `n` used here).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f32 {
        if let Some(spare) = self.spare.take() {
            return spare;
        }
        let radius = (-2.0 * self.uniform().ln()).sqrt();
        let angle = std::f64::consts::TAU * self.uniform();
        self.spare = Some((radius * angle.sin()) as f32);
        (radius * angle.cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_has_a_valid_spec() {
        for shape in ModelShape::value_variants() {
            shape.spec().validate().unwrap();
        }
    }

    #[test]
    fn hash_tables_hold_distinct_experts_per_row() {
        let mut rng = Normal::new(5);
        let table = hash_table(&mut rng, 500, 16, 6);
        sluice_tensor::check_hash_table(&table, &[500, 6], 6, 16).unwrap();
        let mut used = [0usize; 16];
        table.iter().for_each(|&e| used[e as usize] += 1);
        assert!(used.iter().all(|&n| n > 100), "every expert is used: {used:?}");
    }

    #[test]
    fn samples_are_deterministic_and_roughly_standard() {
        let draw = |seed| {
            let mut rng = Normal::new(seed);
            (0..20_000).map(|_| rng.sample()).collect::<Vec<f32>>()
        };
        let a = draw(3);
        assert_eq!(a, draw(3));
        assert_ne!(a, draw(4));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }
}
