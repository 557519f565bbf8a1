//! Arbitrary bytes as `model.safetensors.index.json` next to a valid config and one tiny valid
//! shard. Opening must succeed or fail with a typed error; an index that opens must only ever name
//! files inside the checkpoint folder, and every tensor it lists must read or fail with a typed
//! error.
#![no_main]

use std::path::{Component, Path};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_models::{CONFIG_FILE, Checkpoint, SHARD_INDEX};

const CONFIG: &str = r#"{"model_type": "deepseek_v3", "hidden_size": 2, "num_hidden_layers": 2,
    "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2,
    "topk_group": 1}"#;

/// The shard the seed corpus points at: layer 1's gate weight (bf16 [4, 2]) and bias (f32 [4]).
const SHARD: &str = "model-00001-of-00001.safetensors";

fn shard_bytes() -> Vec<u8> {
    let header = br#"{"model.layers.1.mlp.gate.e_score_correction_bias":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"model.layers.1.mlp.gate.weight":{"dtype":"BF16","shape":[4,2],"data_offsets":[16,32]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend((0u8..32).map(|i| i % 7));
    bytes
}

/// A checkpoint folder, made once per process; only the index changes between inputs.
fn folder() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        std::fs::write(dir.path().join(CONFIG_FILE), CONFIG).expect("config written");
        std::fs::write(dir.path().join(SHARD), shard_bytes()).expect("shard written");
        dir
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    let dir = folder();
    std::fs::write(dir.join(SHARD_INDEX), data).expect("index written");
    let Ok(checkpoint) = Checkpoint::open(dir) else { return };
    for file in checkpoint.files() {
        let inside = file.strip_prefix(dir).expect("every shard is inside the checkpoint folder");
        assert!(
            inside.components().all(|c| matches!(c, Component::Normal(_))),
            "shard {} escapes the folder",
            file.display()
        );
    }
    let names = checkpoint.tensor_names().expect("a sharded checkpoint lists its index");
    for name in &names {
        assert!(checkpoint.contains(name).expect("the index answers `contains`"));
        if let Ok(tensor) = checkpoint.tensor(name) {
            assert!(tensor.storage().host_bytes().is_ok(), "`{name}`");
        }
    }
    // Whatever the index says, nothing is mapped that no tensor was read from.
    assert!(checkpoint.mapped_files().len() <= checkpoint.files().len());
    if names.is_empty() {
        assert!(checkpoint.mapped_files().is_empty());
    }
    let _ = sluice_models::MoeGate::load(&checkpoint, 1);
});
