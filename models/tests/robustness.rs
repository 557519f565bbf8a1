//! Hostile inputs: checkpoints from the internet and hidden states from other code. Each must end
//! in the exact typed error, with a message that names the file, the tensor or the row; none may
//! panic or read outside the file.
//!
//! The README's Robustness table points here; rows that other tests already pin (the shard index,
//! config.json, wrong hidden sizes, T = 0) are listed there with those tests.

mod common;

use std::fs;
use std::path::Path;

use common::{ReferenceBackend, f32_bytes};
use safetensors::SafeTensorError;
use sluice_models::{
    CONFIG_FILE, Checkpoint, CheckpointError, ModelError, MoeGate, SINGLE_FILE, SafetensorsBytes,
};
use sluice_tensor::{
    BackendError, NonFinitePolicy, RoutingSpec, ScoringFunc, Tensor, TensorError, TopkMethod,
};
use tempfile::TempDir;

const CONFIG: &str = r#"{"model_type": "deepseek_v3", "hidden_size": 2, "num_hidden_layers": 2,
    "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2,
    "topk_group": 1}"#;

/// A safetensors file from a header written as text and the data section after it.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// Two f32 tensors back to back: `a` [2] at 0..8 and `b` [3] at 8..20.
const GOOD_HEADER: &str = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[3],"data_offsets":[8,20]}}"#;

fn good_file() -> Vec<u8> {
    safetensors_bytes(GOOD_HEADER, &f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0]))
}

/// A checkpoint folder whose `model.safetensors` holds exactly `bytes`.
fn checkpoint_with_weights(bytes: &[u8]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(CONFIG_FILE), CONFIG).unwrap();
    fs::write(dir.path().join(SINGLE_FILE), bytes).unwrap();
    dir
}

/// What reading tensor `b` of a checkpoint holding `bytes` says; the same error must come out of
/// the in-memory parser.
fn header_error(bytes: &[u8]) -> (Option<String>, SafeTensorError, String) {
    let in_memory = SafetensorsBytes::parse(std::sync::Arc::new(bytes.to_vec()), "in-memory");
    let in_memory = in_memory.expect_err("the file is malformed").to_string();
    assert!(in_memory.starts_with("in-memory: malformed safetensors file"), "{in_memory}");

    let dir = checkpoint_with_weights(bytes);
    let checkpoint = Checkpoint::open(dir.path()).expect("opening maps no weights");
    let err = checkpoint.tensor("b").expect_err("the file is malformed");
    let message = err.to_string();
    assert!(message.contains(SINGLE_FILE), "names the file: {message}");
    match err {
        CheckpointError::Header { tensor, source, .. } => (tensor, source, message),
        other => panic!("expected CheckpointError::Header, got {other:?}"),
    }
}

#[test]
fn a_well_formed_file_reads_back() {
    let dir = checkpoint_with_weights(&good_file());
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(checkpoint.tensor_names().unwrap(), ["a", "b"]);
    assert_eq!(checkpoint.tensor("b").unwrap().to_vec::<f32>().unwrap(), [3.0, 4.0, 5.0]);
}

#[test]
fn a_truncated_file_is_refused() {
    let file = good_file();
    // Cut inside the data section, inside the header, and inside the 8-byte length.
    let (tensor, source, message) = header_error(&file[..file.len() - 1]);
    assert!(matches!(source, SafeTensorError::MetadataIncompleteBuffer), "{message}");
    assert_eq!(tensor.as_deref(), Some("b"), "names the tensor that runs past the end: {message}");
    let (_, source, message) = header_error(&file[..20]);
    assert!(matches!(source, SafeTensorError::InvalidHeaderLength), "{message}");
    let (_, source, message) = header_error(&file[..5]);
    assert!(matches!(source, SafeTensorError::HeaderTooSmall), "{message}");
    let (_, source, message) = header_error(&[]);
    assert!(matches!(source, SafeTensorError::HeaderTooSmall), "{message}");
}

#[test]
fn a_header_length_beyond_the_end_of_the_file_is_refused() {
    let mut file = good_file();
    let past_the_end = file.len() as u64;
    file[..8].copy_from_slice(&past_the_end.to_le_bytes());
    let (_, source, message) = header_error(&file);
    assert!(matches!(source, SafeTensorError::InvalidHeaderLength), "{message}");
    // A length no file has is refused before any arithmetic with it.
    file[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let (_, source, message) = header_error(&file);
    assert!(matches!(source, SafeTensorError::HeaderTooLarge), "{message}");
}

#[test]
fn a_header_that_is_not_json_is_refused() {
    let (_, source, message) = header_error(&safetensors_bytes("{not json, 8 bytes}", &[]));
    assert!(matches!(source, SafeTensorError::InvalidHeaderDeserialization(_)), "{message}");
    let (_, source, message) = header_error(&safetensors_bytes("\u{fffd}", &[]));
    assert!(matches!(source, SafeTensorError::InvalidHeaderDeserialization(_)), "{message}");
    let mut not_utf8 = safetensors_bytes("{}", &[]);
    not_utf8[8] = 0xff;
    let (_, source, message) = header_error(&not_utf8);
    assert!(matches!(source, SafeTensorError::InvalidHeader(_)), "{message}");
    // JSON, but not a safetensors header.
    let (_, source, message) = header_error(&safetensors_bytes(r#"{"b": [1, 2]}"#, &[]));
    assert!(matches!(source, SafeTensorError::InvalidHeaderDeserialization(_)), "{message}");
}

#[test]
fn data_offsets_out_of_range_are_refused_with_the_tensor_name() {
    let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[3],"data_offsets":[8,20]}}"#;
    // The data section holds 12 of the 20 bytes the header places.
    let (tensor, source, message) = header_error(&safetensors_bytes(header, &[0; 12]));
    assert!(matches!(source, SafeTensorError::MetadataIncompleteBuffer), "{message}");
    assert_eq!(tensor.as_deref(), Some("b"), "{message}");
    assert!(message.contains("tensor `b`"), "{message}");
    // Offsets near usize::MAX must not overflow anything.
    let huge = format!(
        r#"{{"b":{{"dtype":"U8","shape":[1],"data_offsets":[{},{}]}}}}"#,
        u64::MAX - 1,
        u64::MAX
    );
    let (tensor, source, message) = header_error(&safetensors_bytes(&huge, &[0]));
    assert!(matches!(source, SafeTensorError::InvalidOffset(ref name) if name == "b"), "{message}");
    assert_eq!(tensor.as_deref(), Some("b"), "{message}");
}

#[test]
fn overlapping_offsets_are_refused_with_the_tensor_name() {
    // `b` starts inside `a`.
    let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[3],"data_offsets":[4,16]}}"#;
    let (tensor, source, message) = header_error(&safetensors_bytes(header, &[0; 16]));
    assert!(matches!(source, SafeTensorError::InvalidOffset(ref name) if name == "b"), "{message}");
    assert_eq!(tensor.as_deref(), Some("b"), "{message}");
    // Both claim the same bytes.
    let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let (tensor, source, message) = header_error(&safetensors_bytes(header, &[0; 8]));
    assert!(matches!(source, SafeTensorError::InvalidOffset(_)), "{message}");
    assert!(tensor.is_some(), "{message}");
}

#[test]
fn dtype_and_shape_that_disagree_with_the_byte_length_are_refused_with_the_tensor_name() {
    // Three f32 need 12 bytes; `b` is given 8.
    let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[3],"data_offsets":[8,16]}}"#;
    let (tensor, source, message) = header_error(&safetensors_bytes(header, &[0; 16]));
    assert!(matches!(source, SafeTensorError::TensorInvalidInfo), "{message}");
    assert_eq!(tensor.as_deref(), Some("b"), "{message}");
    // A shape whose element count overflows.
    let header = format!(
        r#"{{"b":{{"dtype":"F32","shape":[{},{}],"data_offsets":[0,4]}}}}"#,
        u64::MAX,
        u64::MAX
    );
    let (tensor, source, message) = header_error(&safetensors_bytes(&header, &[0; 4]));
    assert!(matches!(source, SafeTensorError::ValidationOverflow), "{message}");
    assert_eq!(tensor.as_deref(), Some("b"), "{message}");
}

/// Found by fuzzing `checkpoint_header`: the safetensors parser accepts an empty tensor of any
/// shape, but a shape whose row-major strides overflow has no layout. That tensor is refused by
/// name; the rest of the file still reads.
#[test]
fn an_empty_tensor_whose_strides_overflow_is_refused_alone() {
    let header = format!(
        r#"{{"e":{{"dtype":"F32","shape":[0,{big},{big}],"data_offsets":[0,0]}},"x":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}}}"#,
        big = 1u64 << 62
    );
    let file = SafetensorsBytes::parse(
        std::sync::Arc::new(safetensors_bytes(&header, &[7])),
        "model.safetensors",
    )
    .expect("an empty tensor of any shape is valid safetensors");
    let err = file.tensor("e").unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Tensor { name, source: TensorError::Overflow(_), .. } if name == "e"),
        "{err:?}"
    );
    assert!(err.to_string().contains("model.safetensors: tensor `e`"), "{err}");
    assert_eq!(file.tensor("x").unwrap().unwrap().to_vec::<u8>().unwrap(), [7]);
}

#[test]
fn a_malformed_shard_is_refused_when_a_tensor_in_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(CONFIG_FILE), CONFIG).unwrap();
    let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors"}}"#;
    fs::write(dir.path().join(sluice_models::SHARD_INDEX), index).unwrap();
    let good =
        safetensors_bytes(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, &[0; 4]);
    fs::write(dir.path().join("model-00001-of-00002.safetensors"), good).unwrap();
    let bad =
        safetensors_bytes(r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, &[0; 3]);
    fs::write(dir.path().join("model-00002-of-00002.safetensors"), bad).unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert!(checkpoint.tensor("a").is_ok(), "the good shard is unaffected");
    let err = checkpoint.tensor("b").unwrap_err();
    assert!(matches!(&err, CheckpointError::Header { tensor: Some(t), .. } if t == "b"), "{err:?}");
    assert!(err.to_string().contains("model-00002-of-00002.safetensors"), "{err}");
}

/// A V3-style gate from tensors in memory: 8 experts in 4 groups, top-2, hidden size 4.
fn v3_gate() -> MoeGate {
    let spec = RoutingSpec::builder(8, 2)
        .scoring(ScoringFunc::Sigmoid)
        .method(TopkMethod::NoauxTc)
        .groups(4, 2)
        .norm_topk_prob(true)
        .routed_scaling_factor(2.5)
        .build()
        .unwrap();
    let weight: Vec<f32> = (0..32).map(|i| ((i * 7) % 11) as f32 / 8.0 - 0.6).collect();
    let bias: Vec<f32> = (0..8).map(|e| (e as f32 - 3.5) * 0.013).collect();
    MoeGate::new(
        1,
        spec,
        Tensor::from_vec(weight, &[8, 4]).unwrap(),
        Some(Tensor::from_vec(bias, &[8]).unwrap()),
    )
    .unwrap()
}

#[test]
fn infinite_hidden_states_fail_or_mark_their_row_under_each_policy() {
    let backend = ReferenceBackend::default();
    let gate = v3_gate();
    let clean: Vec<f32> = (0..12).map(|i| ((i * 13) % 17) as f32 / 4.0 - 2.0).collect();
    for (row, bad) in [(0, f32::INFINITY), (2, f32::NEG_INFINITY), (1, f32::NAN)] {
        let mut values = clean.clone();
        values[row * 4 + 3] = bad;
        let hidden = Tensor::from_vec(values, &[3, 4]).unwrap();

        let err = gate.route(&backend, &hidden).unwrap_err();
        assert!(
            matches!(err, ModelError::Backend(BackendError::NonFinite { row: r, .. }) if r == row),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains(&format!("row {row}")), "{err}");

        let marking = gate.clone().with_non_finite(NonFinitePolicy::MarkInvalid);
        let routed = marking.route(&backend, &hidden).unwrap().to_routing().unwrap();
        let expected = marking
            .route(&backend, &Tensor::from_vec(clean.clone(), &[3, 4]).unwrap())
            .unwrap()
            .to_routing()
            .unwrap();
        for (r, (got, want)) in routed.rows().zip(expected.rows()).enumerate() {
            if r == row {
                assert_eq!(got, (&[-1, -1][..], &[0.0, 0.0][..]), "{bad}: the bad row is marked");
            } else {
                assert_eq!(got, want, "{bad}: row {r} is untouched");
            }
        }
    }
}

#[test]
fn zero_tokens_route_to_empty_outputs_of_width_top_k() {
    let hidden = Tensor::from_vec(Vec::<f32>::new(), &[0, 4]).unwrap();
    let routing = v3_gate().route(&ReferenceBackend::default(), &hidden).unwrap();
    assert_eq!((routing.tokens(), routing.top_k()), (0, 2));
    assert_eq!(routing.ids().shape(), &[0, 2]);
    assert_eq!(routing.weights().shape(), &[0, 2]);
    assert!(routing.to_routing().unwrap().ids().is_empty());
}

#[test]
fn loading_one_gate_of_the_sharded_fixture_maps_only_the_shards_the_index_names_for_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/v3");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    assert!(checkpoint.mapped_files().is_empty(), "opening maps nothing");
    // The index puts layer 3's weight in the first shard and its bias in the second.
    checkpoint.tensor("model.layers.3.mlp.gate.weight").unwrap();
    let first = dir.join("model-00001-of-00002.safetensors");
    assert_eq!(checkpoint.mapped_files(), [first.as_path()], "the weight needs only its shard");
    MoeGate::load(&checkpoint, 3).unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join(sluice_models::SHARD_INDEX)).unwrap())
            .unwrap();
    let mut needed: Vec<_> = ["weight", "e_score_correction_bias"]
        .iter()
        .map(|part| {
            let shard =
                index["weight_map"][format!("model.layers.3.mlp.gate.{part}")].as_str().unwrap();
            dir.join(shard)
        })
        .collect();
    needed.sort();
    needed.dedup();
    let mut mapped = checkpoint.mapped_files();
    mapped.sort();
    assert_eq!(mapped, needed);
}
