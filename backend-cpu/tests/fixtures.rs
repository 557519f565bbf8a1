//! The golden router fixtures (outputs of transformers' own routers on small checkpoints) routed
//! through the CPU backend, on every kernel family, via the models crate's gate.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::{backends, label};
use half::bf16;
use safetensors::{Dtype, SafeTensors};
use sluice_models::reference::{self, Routing, Tolerance};
use sluice_models::{Checkpoint, MoeGate};
use sluice_tensor::Tensor;

const WEIGHTS: Tolerance = Tolerance { abs: 1e-5, rel: 1e-5 };

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/testdata")
}

/// Every fixture folder (a checkpoint with a `golden.safetensors`), nested ones included.
fn fixture_dirs() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![testdata()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name().is_some_and(|n| n == "golden.safetensors") {
                found.push(dir.clone());
            }
        }
    }
    found.sort();
    found
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

struct Golden {
    bytes: Vec<u8>,
    near_ties: HashMap<String, Vec<usize>>,
}

impl Golden {
    fn open(dir: &std::path::Path) -> Self {
        let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        let near_ties = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("near_ties"))
            .map(|json| serde_json::from_str(json).unwrap())
            .unwrap_or_default();
        Golden { bytes, near_ties }
    }

    fn tensor(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (view.dtype(), view.shape().to_vec(), view.data().to_vec())
    }

    fn hidden(&self, kind: &str) -> Tensor {
        let (dtype, shape, data) = self.tensor(&format!("hidden_states.{kind}"));
        match dtype {
            Dtype::F32 => Tensor::from_vec(f32s(&data), &shape).unwrap(),
            Dtype::BF16 => {
                let values: Vec<bf16> =
                    data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect();
                Tensor::from_vec(values, &shape).unwrap()
            }
            other => panic!("hidden states of dtype {other:?}"),
        }
    }

    /// The token ids of the hash-routed layers, if the fixture has any.
    fn input_ids(&self) -> Option<Tensor> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor("input_ids").ok()?;
        let ids: Vec<i64> = view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Some(Tensor::from_vec(ids, view.shape()).unwrap())
    }

    fn routing(&self, key: &str) -> Routing {
        let (_, shape, ids) = self.tensor(&format!("{key}.topk_ids"));
        let ids: Vec<i32> =
            ids.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as i32).collect();
        let (_, _, weights) = self.tensor(&format!("{key}.topk_weights"));
        Routing::new(shape[0], shape[1], ids, f32s(&weights)).unwrap()
    }
}

#[test]
fn golden_fixtures_route_identically_on_every_kernel() {
    let dirs = fixture_dirs();
    assert!(dirs.len() >= 4, "expected the golden fixtures under models/testdata, found {dirs:?}");
    let backends = backends();
    for dir in dirs {
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let golden = Golden::open(&dir);
        let gates = MoeGate::load_all(&checkpoint).unwrap();
        assert!(!gates.is_empty(), "{}", dir.display());
        let input_ids = golden.input_ids();
        for gate in &gates {
            for kind in ["f32", "bf16"] {
                let key = format!("layers.{}.{kind}", gate.layer());
                let expected = golden.routing(&key);
                let near = golden.near_ties.get(&key).cloned().unwrap_or_default();
                let hidden = golden.hidden(kind);
                for backend in &backends {
                    let what = format!("{} {key} on {}", dir.display(), label(backend));
                    let prepared = gate.prepare(backend).unwrap();
                    let routing = prepared.route_with_token_ids(&hidden, input_ids.as_ref());
                    let routing = routing.unwrap_or_else(|e| panic!("{what}: {e}"));
                    let actual = routing.to_routing().unwrap();
                    reference::check_sorted(&actual).unwrap_or_else(|m| panic!("{what}: {m}"));
                    let summary = reference::compare_routings(
                        &expected,
                        &actual,
                        gate.num_experts(),
                        &near,
                        WEIGHTS,
                    )
                    .unwrap_or_else(|m| panic!("{what}: {m}"));
                    assert_eq!(summary.rows_compared + summary.rows_skipped, expected.tokens());
                }
            }
        }
    }
}
