//! The reference router against golden outputs of transformers 5.24's own routers, on checkpoints
//! in Hugging Face layout (`testdata/`, written by `cargo xtask fixtures`).

mod common;

use std::path::PathBuf;

use common::ReferenceBackend;
use half::bf16;
use sluice_models::golden::{GoldenFixture, InputKind};
use sluice_models::reference::{self, Tolerance};
use sluice_models::{Checkpoint, MoeGate};

const FIXTURES: [&str; 16] = [
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
    "gpt-oss",
    "gpt-oss-real-shape",
    "minimax-m2",
    "minimax-m2-real-shape",
    "llama4",
    "llama4-real-shape",
];

/// Relative gap under which the reference and transformers may legitimately choose differently:
/// far above the f32 rounding of the logits (about 1e-7 relative here), far below the smallest
/// gap any fixture has (1.6e-5).
const NEAR_TIE: f32 = 1e-6;

/// Both sides see the same input values (the bf16 fixtures route the bf16-rounded hidden states,
/// and so does the reference), so weights differ only through the f32 rounding of transformers'
/// logits: 1e-5 absolute as the design asks for f32 inputs, plus 1e-5 relative because V2 scales
/// the probabilities by 16, rounding error included (measured: at most 7.3e-6 relative, 1.5e-5
/// absolute, over all fixtures and both kinds).
const WEIGHTS: Tolerance = Tolerance { abs: 1e-5, rel: 1e-5 };

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
}

fn hidden_as_f32(golden: &GoldenFixture, kind: InputKind) -> Vec<f32> {
    let hidden = golden.hidden_states(kind).unwrap();
    match kind {
        InputKind::F32 => hidden.to_vec::<f32>().unwrap(),
        InputKind::Bf16 => hidden.to_vec::<bf16>().unwrap().into_iter().map(f32::from).collect(),
    }
}

fn weight_as_f32(gate: &MoeGate) -> Vec<f32> {
    let weight = gate.weight();
    match weight.dtype() {
        sluice_tensor::DType::BF16 => {
            weight.to_vec::<bf16>().unwrap().into_iter().map(f32::from).collect()
        }
        _ => weight.to_vec::<f32>().unwrap(),
    }
}

#[test]
fn every_fixture_loads_all_its_moe_gates() {
    for name in FIXTURES {
        let checkpoint = Checkpoint::open(fixture_dir(name)).unwrap();
        let golden = GoldenFixture::in_checkpoint(checkpoint.dir()).unwrap();
        let gates = MoeGate::load_all(&checkpoint).unwrap();
        let layers: Vec<usize> = gates.iter().map(MoeGate::layer).collect();
        assert_eq!(layers, golden.moe_layers(), "{name}");
        for gate in &gates {
            assert!(gate.weight().requires_grad(), "{name}");
            let takes_bias = gate.spec().takes_bias();
            assert_eq!(gate.bias().is_some(), takes_bias, "{name} layer {}", gate.layer());
        }
    }
}

#[test]
fn the_sharded_fixture_maps_only_the_gate_shards() {
    let checkpoint = Checkpoint::open(fixture_dir("v3")).unwrap();
    assert_eq!(checkpoint.files().len(), 2);
    assert!(checkpoint.mapped_files().is_empty());
    let gate = MoeGate::load(&checkpoint, 3).unwrap();
    assert_eq!(gate.weight().dtype(), sluice_tensor::DType::BF16);
    assert_eq!(gate.bias().unwrap().dtype(), sluice_tensor::DType::F32);
    // The weight lives in the first shard, the bias in the second.
    assert_eq!(checkpoint.mapped_files().len(), 2);
}

#[test]
fn reference_logits_match_the_golden_logits() {
    for name in FIXTURES {
        let checkpoint = Checkpoint::open(fixture_dir(name)).unwrap();
        let golden = GoldenFixture::in_checkpoint(checkpoint.dir()).unwrap();
        for gate in MoeGate::load_all(&checkpoint).unwrap() {
            let weight = weight_as_f32(&gate);
            let (h, e) = (gate.hidden_size(), gate.num_experts());
            for kind in InputKind::ALL {
                let hidden = hidden_as_f32(&golden, kind);
                let t = golden.tokens();
                let ours = reference::router_logits(&hidden, &weight, t, h, e).unwrap();
                let theirs = golden.logits(gate.layer(), kind).unwrap();
                assert_eq!(ours.len(), theirs.len());
                // transformers accumulates in f32: its error is bounded by H ulps of the sum of
                // absolute products (a loose bound; blocked summation does much better).
                for (i, (&o, &g)) in ours.iter().zip(&theirs).enumerate() {
                    let (row, expert) = (i / e, i % e);
                    let x = &hidden[row * h..][..h];
                    let w = &weight[expert * h..][..h];
                    let magnitude: f64 =
                        x.iter().zip(w).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
                    let bound = h as f64 * f64::from(f32::EPSILON) * magnitude + 1e-30;
                    let diff = (f64::from(o) - f64::from(g)).abs();
                    assert!(
                        diff <= bound,
                        "{name} layer {} {kind}: logit [{row}, {expert}] {o} vs golden {g}",
                        gate.layer()
                    );
                }
            }
        }
    }
}

#[test]
fn reference_routing_matches_transformers_on_every_fixture() {
    let backend = ReferenceBackend::default();
    for name in FIXTURES {
        let checkpoint = Checkpoint::open(fixture_dir(name)).unwrap();
        let golden = GoldenFixture::in_checkpoint(checkpoint.dir()).unwrap();
        for gate in MoeGate::load_all(&checkpoint).unwrap() {
            let prepared = gate.prepare(&backend).unwrap();
            let bias = gate.bias().map(|b| b.to_vec::<f32>().unwrap());
            for kind in InputKind::ALL {
                let context = format!("{name} layer {} {kind}", gate.layer());
                // Hidden states as the framework would hand them over: requiring grad.
                let hidden = golden.hidden_states(kind).unwrap().with_requires_grad(true);
                let ours = prepared.route(&hidden).unwrap().to_routing().unwrap();
                reference::check_sorted(&ours).unwrap();

                let expected = golden.routing(gate.layer(), kind).unwrap();
                let logits = golden.logits(gate.layer(), kind).unwrap();
                let mut near_ties = reference::near_tie_rows(
                    &logits,
                    golden.tokens(),
                    bias.as_deref(),
                    gate.spec(),
                    NEAR_TIE,
                )
                .unwrap();
                near_ties.extend_from_slice(golden.near_ties(gate.layer(), kind));

                let summary = reference::compare_routings(
                    &expected,
                    &ours,
                    gate.num_experts(),
                    &near_ties,
                    WEIGHTS,
                )
                .unwrap_or_else(|e| panic!("{context}: {e}"));
                assert_eq!(summary.rows_invalid, 0, "{context}");
                assert_eq!(
                    summary.rows_compared + summary.rows_skipped,
                    golden.tokens(),
                    "{context}"
                );
                assert!(summary.rows_compared > golden.tokens() / 2, "{context}: {summary:?}");
            }
        }
    }
}

#[test]
fn a_file_that_is_not_a_fixture_is_refused_with_its_name() {
    let weights = fixture_dir("kimi-k2").join("model.safetensors");
    let err = GoldenFixture::open(&weights).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("model.safetensors") && message.contains("tokens"), "{message}");
    let golden = GoldenFixture::in_checkpoint(fixture_dir("kimi-k2")).unwrap();
    let err = golden.routing(0, InputKind::F32).unwrap_err();
    assert!(err.to_string().contains("layers.0.f32.topk_ids"), "{err}");
}
