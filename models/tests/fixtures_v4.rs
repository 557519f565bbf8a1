//! The reference router and the gate loader against golden outputs of transformers 5.24's
//! `DeepseekV4TopKRouter`, `DeepseekV4HashRouter` and `DeepseekV32TopkRouter`, on checkpoints
//! under the released and the transformers-saved names (`testdata/`, written by
//! `cargo xtask fixtures`).

use std::path::PathBuf;

use half::bf16;
use sluice_models::golden::{GoldenFixture, InputKind};
use sluice_models::reference::{self, Tolerance};
use sluice_models::{Checkpoint, ModelError, MoeGate};
use sluice_tensor::{DType, Tensor, TopkMethod};

/// Fixtures with sqrt-softplus and hash layers, and the V3.2 fixture; with their hash layers.
const FIXTURES: [(&str, &[usize]); 4] =
    [("v4", &[0, 1]), ("v4-saved-by-transformers", &[0, 2]), ("v4-real-shape", &[]), ("v32", &[])];

/// As for the V2/V3 fixtures: both sides route the same input values, so the weights differ only
/// through the f32 rounding of transformers' logits and scores.
const WEIGHTS: Tolerance = Tolerance { abs: 1e-5, rel: 1e-5 };
const NEAR_TIE: f32 = 1e-6;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
}

fn token_ids(golden: &GoldenFixture) -> Vec<i64> {
    golden.input_ids().unwrap().map(|ids| ids.to_vec::<i64>().unwrap()).unwrap_or_default()
}

#[test]
fn both_naming_schemes_load_weight_bias_and_hash_tables() {
    for (name, hash_layers) in FIXTURES {
        let checkpoint = Checkpoint::open(fixture_dir(name)).unwrap();
        let golden = GoldenFixture::in_checkpoint(checkpoint.dir()).unwrap();
        let gates = MoeGate::load_all(&checkpoint).unwrap();
        let layers: Vec<usize> = gates.iter().map(MoeGate::layer).collect();
        assert_eq!(layers, golden.moe_layers(), "{name}");
        for gate in &gates {
            let hashed = hash_layers.contains(&gate.layer());
            assert_eq!(gate.spec().method == TopkMethod::Hash, hashed, "{name} {}", gate.layer());
            assert_eq!(gate.hash_table().is_some(), hashed, "{name} {}", gate.layer());
            assert_eq!(gate.bias().is_some(), !hashed, "{name} {}", gate.layer());
            if let Some(table) = gate.hash_table() {
                assert_eq!(table.dtype(), DType::I32, "int64 tables are narrowed once, exactly");
                assert_eq!(table.shape()[1], gate.spec().top_k);
            }
        }
    }
}

#[test]
fn reference_routing_matches_transformers_v4_and_v3_2_routers() {
    for (name, _) in FIXTURES {
        let checkpoint = Checkpoint::open(fixture_dir(name)).unwrap();
        let golden = GoldenFixture::in_checkpoint(checkpoint.dir()).unwrap();
        let ids = token_ids(&golden);
        for gate in MoeGate::load_all(&checkpoint).unwrap() {
            let bias = gate.bias().map(|b| b.to_vec::<f32>().unwrap());
            let table = gate.hash_table().map(|t| t.to_vec::<i32>().unwrap());
            for kind in InputKind::ALL {
                let context = format!("{name} layer {} {kind}", gate.layer());
                let logits = golden.logits(gate.layer(), kind).unwrap();
                let tokens = golden.tokens();
                let ours = match &table {
                    Some(table) => {
                        reference::route_hashed(&logits, tokens, table, &ids, gate.spec())
                    }
                    None => reference::route(&logits, tokens, bias.as_deref(), gate.spec()),
                }
                .unwrap();
                reference::check_sorted(&ours).unwrap();
                let expected = golden.routing(gate.layer(), kind).unwrap();
                let mut near_ties = reference::near_tie_rows(
                    &logits,
                    tokens,
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
                assert_eq!(summary.rows_compared, tokens, "{context}: no near ties expected");
            }
        }
    }
}

#[test]
fn hash_layers_without_token_ids_or_with_ids_outside_the_table_are_refused_naming_the_layer() {
    let checkpoint = Checkpoint::open(fixture_dir("v4")).unwrap();
    let gate = MoeGate::load(&checkpoint, 1).unwrap();
    let golden = GoldenFixture::in_checkpoint(checkpoint.dir()).unwrap();
    let hidden = golden.hidden_states(InputKind::F32).unwrap();
    let backend = ReferenceOnly;
    let err = gate.route(&backend, &hidden).unwrap_err();
    assert!(matches!(err, ModelError::MissingTokenIds { layer: 1 }), "{err}");
    assert!(err.to_string().contains("layer 1"), "{err}");

    let tokens = golden.tokens();
    let vocab = gate.hash_table().unwrap().shape()[0];
    let mut ids = vec![0i64; tokens];
    ids[5] = vocab as i64;
    let ids = Tensor::from_vec(ids, &[tokens]).unwrap();
    let err = gate.route_with_token_ids(&backend, &hidden, Some(&ids)).unwrap_err();
    assert!(matches!(err, ModelError::TokenIdOutsideTable { layer: 1, row: 5, .. }), "{err}");
    let negative = Tensor::from_vec(vec![-1i32; tokens], &[tokens]).unwrap();
    let err = gate.route_with_token_ids(&backend, &hidden, Some(&negative)).unwrap_err();
    assert!(matches!(err, ModelError::TokenIdOutsideTable { id: -1, row: 0, .. }), "{err}");
    let floats = Tensor::from_vec(vec![0.0f32; tokens], &[tokens]).unwrap();
    let err = gate.route_with_token_ids(&backend, &hidden, Some(&floats)).unwrap_err();
    assert!(matches!(err, ModelError::TokenIds { layer: 1, .. }), "{err}");
    let short = Tensor::from_vec(vec![0i64; tokens - 1], &[tokens - 1]).unwrap();
    let err = gate.route_with_token_ids(&backend, &hidden, Some(&short)).unwrap_err();
    assert!(matches!(err, ModelError::TokenIds { .. }), "{err}");
}

#[test]
fn hash_layers_route_bf16_values_like_the_f32_reference() {
    // The bf16 hidden states, widened, give the golden bf16 logits' routing: a check that the
    // fixture's two input kinds hold the same values.
    let golden = GoldenFixture::in_checkpoint(fixture_dir("v4")).unwrap();
    let bf16 = golden.hidden_states(InputKind::Bf16).unwrap().to_vec::<bf16>().unwrap();
    let f32 = golden.hidden_states(InputKind::F32).unwrap().to_vec::<f32>().unwrap();
    assert!(bf16.iter().zip(&f32).all(|(b, f)| (f32::from(*b) - f).abs() <= f.abs() / 128.0));
}

/// A backend that must never be reached: every call above is refused before it.
#[derive(Debug)]
struct ReferenceOnly;

impl sluice_tensor::Backend for ReferenceOnly {
    fn name(&self) -> &str {
        "unreachable"
    }
    fn device(&self) -> sluice_tensor::Device {
        sluice_tensor::Device::Cpu
    }
    fn upload(
        &self,
        _: &sluice_tensor::Dlpack,
    ) -> Result<sluice_tensor::Dlpack, sluice_tensor::BackendError> {
        unreachable!("upload")
    }
    fn download(
        &self,
        _: &sluice_tensor::Dlpack,
    ) -> Result<sluice_tensor::Dlpack, sluice_tensor::BackendError> {
        unreachable!("download")
    }
    fn router_gemm(
        &self,
        _: &sluice_tensor::Dlpack,
        _: &sluice_tensor::Dlpack,
    ) -> Result<sluice_tensor::Dlpack, sluice_tensor::BackendError> {
        unreachable!("router_gemm")
    }
    fn route_logits(
        &self,
        _: &sluice_tensor::Dlpack,
        _: Option<&sluice_tensor::Dlpack>,
        _: &sluice_tensor::RoutingSpec,
    ) -> Result<sluice_tensor::RoutingOutput, sluice_tensor::BackendError> {
        unreachable!("route_logits")
    }
    fn prepare_router(
        &self,
        _: sluice_tensor::Dlpack,
        _: Option<sluice_tensor::Dlpack>,
        _: &sluice_tensor::RoutingSpec,
    ) -> Result<Box<dyn sluice_tensor::PreparedRouter>, sluice_tensor::BackendError> {
        unreachable!("prepare_router")
    }
    fn prepare_hash_router(
        &self,
        _: sluice_tensor::Dlpack,
        _: sluice_tensor::Dlpack,
        spec: &sluice_tensor::RoutingSpec,
    ) -> Result<Box<dyn sluice_tensor::PreparedRouter>, sluice_tensor::BackendError> {
        Ok(Box::new(Unreachable(*spec)))
    }
}

/// A prepared router that only knows its spec.
#[derive(Debug)]
struct Unreachable(sluice_tensor::RoutingSpec);

impl sluice_tensor::PreparedRouter for Unreachable {
    fn spec(&self) -> &sluice_tensor::RoutingSpec {
        &self.0
    }
    fn hidden_size(&self) -> usize {
        unreachable!("hidden_size")
    }
    fn router_gemm(
        &self,
        _: &sluice_tensor::Dlpack,
    ) -> Result<sluice_tensor::Dlpack, sluice_tensor::BackendError> {
        unreachable!("router_gemm")
    }
    fn route(
        &self,
        _: &sluice_tensor::Dlpack,
    ) -> Result<sluice_tensor::RoutingOutput, sluice_tensor::BackendError> {
        unreachable!("route")
    }
}
