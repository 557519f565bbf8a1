use std::fs;

use half::bf16;

use super::*;

const CONFIG: &str = r#"{"model_type": "deepseek_v3", "hidden_size": 3, "num_hidden_layers": 2,
    "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2,
    "topk_group": 1}"#;

/// A tensor to write: name, safetensors dtype name, shape, raw little-endian bytes.
struct Entry<'a>(&'a str, &'a str, &'a [usize], Vec<u8>);

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect()
}

/// Writes a safetensors file by hand (so tests can also write broken ones): 8-byte header length,
/// JSON header padded with spaces to a multiple of 8, then the data in order.
fn write_safetensors(path: &Path, entries: &[Entry<'_>]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for Entry(name, dtype, shape, bytes) in entries {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    write_raw(path, &Value::Object(header).to_string(), &data);
}

fn write_raw(path: &Path, header: &str, data: &[u8]) {
    let mut header = header.as_bytes().to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(data);
    fs::write(path, file).unwrap();
}

fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(CONFIG_FILE), CONFIG).unwrap();
    dir
}

fn single_file_checkpoint(entries: &[Entry<'_>]) -> tempfile::TempDir {
    let dir = folder();
    write_safetensors(&dir.path().join(SINGLE_FILE), entries);
    dir
}

#[test]
fn single_file_tensors_are_mapped_lazily_and_zero_copy() {
    let weight: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
    let dir = single_file_checkpoint(&[
        Entry("model.layers.1.mlp.gate.weight", "BF16", &[4, 3], bf16_bytes(&weight)),
        Entry("model.layers.1.mlp.gate.e_score_correction_bias", "F32", &[4], f32_bytes(&[0.5; 4])),
    ]);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(checkpoint.config().hidden_size(), 3);
    assert!(checkpoint.mapped_files().is_empty(), "opening maps nothing");

    let tensor = checkpoint.tensor("model.layers.1.mlp.gate.weight").unwrap();
    assert_eq!((tensor.dtype(), tensor.shape()), (DType::BF16, &[4usize, 3][..]));
    assert!(tensor.is_read_only(), "a mapped tensor is a read-only view of the file");
    assert!(!tensor.requires_grad());
    let values: Vec<f32> = tensor.to_vec::<bf16>().unwrap().iter().map(|v| v.to_f32()).collect();
    assert_eq!(values, weight);
    assert_eq!(checkpoint.mapped_files(), vec![dir.path().join(SINGLE_FILE).as_path()]);

    let bias = checkpoint.tensor("model.layers.1.mlp.gate.e_score_correction_bias").unwrap();
    assert_eq!(bias.to_vec::<f32>().unwrap(), vec![0.5; 4]);
    let again = checkpoint.tensor("model.layers.1.mlp.gate.weight").unwrap();
    assert_eq!(again.data_ptr(), tensor.data_ptr(), "the file is mapped once");
}

#[test]
fn tensors_outlive_the_checkpoint() {
    let dir = single_file_checkpoint(&[Entry("x", "F32", &[2], f32_bytes(&[1.0, 2.0]))]);
    let tensor = Checkpoint::open(dir.path()).unwrap().tensor("x").unwrap();
    assert_eq!(tensor.to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
}

#[test]
fn lookup_is_by_exact_name() {
    let dir = single_file_checkpoint(&[
        Entry("model.layers.1.mlp.gate_proj.weight", "BF16", &[1, 3], bf16_bytes(&[1.0; 3])),
        Entry(
            "model.layers.1.mlp.experts.0.gate_proj.weight",
            "BF16",
            &[1, 3],
            bf16_bytes(&[1.0; 3]),
        ),
        Entry("model.layers.1.mlp.gate.weight.extra", "BF16", &[1, 3], bf16_bytes(&[1.0; 3])),
    ]);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let name = "model.layers.1.mlp.gate.weight";
    assert!(!checkpoint.contains(name).unwrap());
    let err = checkpoint.tensor(name).unwrap_err();
    assert!(matches!(&err, CheckpointError::TensorNotFound { name: n, .. } if n == name), "{err}");
    let message = err.to_string();
    assert!(message.contains(name) && message.contains(SINGLE_FILE), "{message}");
}

#[test]
fn supported_dtypes_map_exactly() {
    let cases = [
        ("F32", DType::F32, 4),
        ("F16", DType::F16, 2),
        ("BF16", DType::BF16, 2),
        ("F64", DType::F64, 8),
        ("I32", DType::I32, 4),
        ("I64", DType::I64, 8),
        ("U8", DType::U8, 1),
        ("BOOL", DType::Bool, 1),
        ("F8_E4M3", DType::F8E4M3, 1),
    ];
    // In this order every tensor's offset is a multiple of its element size.
    let entries: Vec<Entry<'_>> =
        cases.iter().map(|&(name, _, size)| Entry(name, name, &[2], vec![0; 2 * size])).collect();
    let dir = single_file_checkpoint(&entries);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    for (name, dtype, _) in cases {
        let tensor = checkpoint.tensor(name).unwrap();
        assert_eq!((tensor.dtype(), tensor.shape()), (dtype, &[2usize][..]), "{name}");
        assert!(tensor.is_read_only(), "{name} is a view of the file");
    }
}

#[test]
fn unsupported_dtypes_name_the_tensor() {
    let dir = single_file_checkpoint(&[
        Entry("model.layers.1.mlp.experts.0.w", "F8_E5M2", &[4], vec![0; 4]),
        Entry("scales", "U16", &[2], vec![0; 4]),
    ]);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    for (name, dtype) in [("model.layers.1.mlp.experts.0.w", "F8_E5M2"), ("scales", "U16")] {
        let err = checkpoint.tensor(name).unwrap_err();
        assert!(matches!(err, CheckpointError::UnsupportedDType { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(name) && message.contains(dtype), "{message}");
        assert!(message.contains(SINGLE_FILE), "{message}");
    }
}

#[test]
fn misaligned_tensors_are_copied() {
    // One byte before the f32 data puts it at an odd offset (the header is padded to 8).
    let values = [1.5f32, -2.25, 3.0];
    let dir = single_file_checkpoint(&[
        Entry("a_byte", "U8", &[1], vec![7]),
        Entry("odd", "F32", &[3], f32_bytes(&values)),
    ]);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let tensor = checkpoint.tensor("odd").unwrap();
    assert!(!tensor.is_read_only(), "a copy, not a view of the file");
    assert_eq!(tensor.data_ptr() as usize % 4, 0);
    assert_eq!(tensor.to_vec::<f32>().unwrap(), values);
    assert_eq!(checkpoint.tensor("a_byte").unwrap().to_vec::<u8>().unwrap(), vec![7]);
}

#[test]
fn malformed_headers_name_the_file() {
    let dir = folder();
    let path = dir.path().join(SINGLE_FILE);
    let bad_files: [(&str, &[u8]); 4] = [
        ("short", b"\x01\x02"),
        ("huge header length", b"\xff\xff\xff\xff\xff\xff\xff\x7f{}"),
        ("not json", b"\x08\x00\x00\x00\x00\x00\x00\x00{not js}"),
        ("empty", b""),
    ];
    for (what, bytes) in bad_files {
        fs::write(&path, bytes).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let err = checkpoint.tensor("x").unwrap_err();
        assert!(matches!(err, CheckpointError::Header { .. }), "{what}: {err}");
        assert!(err.to_string().contains(SINGLE_FILE), "{what}: {err}");
    }
}

#[test]
fn byte_ranges_disagreeing_with_dtype_and_shape_are_refused_with_the_tensor_name() {
    let dir = folder();
    let path = dir.path().join(SINGLE_FILE);
    // 3 f32 need 12 bytes; the header claims 8.
    let header = r#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#;
    write_raw(&path, header, &[0; 8]);
    let err = Checkpoint::open(dir.path()).unwrap().tensor("w").unwrap_err();
    assert!(matches!(&err, CheckpointError::Header { tensor: Some(t), .. } if t == "w"), "{err}");
    // The data section is shorter than the header says.
    let header = r#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}"#;
    write_raw(&path, header, &[0; 8]);
    let err = Checkpoint::open(dir.path()).unwrap().tensor("w").unwrap_err();
    assert!(matches!(err, CheckpointError::Header { .. }), "{err}");
    assert!(err.to_string().contains(SINGLE_FILE), "{err}");
}

/// Three shards; the index maps each tensor to its shard.
fn sharded_checkpoint() -> tempfile::TempDir {
    let dir = folder();
    let shards = [
        ("model-00001-of-00003.safetensors", "model.layers.0.mlp.gate_proj.weight"),
        ("model-00002-of-00003.safetensors", "model.layers.1.mlp.gate.weight"),
        ("model-00003-of-00003.safetensors", "model.layers.1.mlp.gate.e_score_correction_bias"),
    ];
    let mut weight_map = serde_json::Map::new();
    for (i, (file, tensor)) in shards.iter().enumerate() {
        let values = vec![i as f32; 4];
        write_safetensors(
            &dir.path().join(file),
            &[Entry(tensor, "F32", &[4], f32_bytes(&values))],
        );
        weight_map.insert((*tensor).to_owned(), Value::String((*file).to_owned()));
    }
    let index = serde_json::json!({"metadata": {"total_size": 48}, "weight_map": weight_map});
    fs::write(dir.path().join(SHARD_INDEX), index.to_string()).unwrap();
    dir
}

#[test]
fn sharded_checkpoints_map_only_the_shards_they_need() {
    let dir = sharded_checkpoint();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(checkpoint.files().len(), 3);
    assert!(checkpoint.contains("model.layers.1.mlp.gate.weight").unwrap());
    assert!(checkpoint.mapped_files().is_empty(), "the index alone answers `contains`");

    let weight = checkpoint.tensor("model.layers.1.mlp.gate.weight").unwrap();
    assert_eq!(weight.to_vec::<f32>().unwrap(), vec![1.0; 4]);
    let second = dir.path().join("model-00002-of-00003.safetensors");
    assert_eq!(checkpoint.mapped_files(), vec![second.as_path()]);
    checkpoint.tensor("model.layers.1.mlp.gate.weight").unwrap();
    assert_eq!(checkpoint.mapped_files().len(), 1);

    let bias = checkpoint.tensor("model.layers.1.mlp.gate.e_score_correction_bias").unwrap();
    assert_eq!(bias.to_vec::<f32>().unwrap(), vec![2.0; 4]);
    assert_eq!(checkpoint.mapped_files().len(), 2);

    let err = checkpoint.tensor("model.layers.1.mlp.gate_proj.weight").unwrap_err();
    assert!(err.to_string().contains(SHARD_INDEX), "{err}");
    assert_eq!(checkpoint.mapped_files().len(), 2, "a name the index lacks maps nothing");
}

#[test]
fn a_tensor_location_maps_exactly_its_bytes_and_only_while_the_file_holds_them() {
    let dir = sharded_checkpoint();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let name = "model.layers.1.mlp.gate.e_score_correction_bias";
    let location = checkpoint.tensor_location(name).unwrap();
    let shard = dir.path().join("model-00003-of-00003.safetensors");
    assert_eq!((location.name.as_str(), location.path.as_path()), (name, shard.as_path()));
    assert_eq!((location.dtype, location.shape.as_slice()), (safetensors::Dtype::F32, &[4][..]));
    let file = fs::read(&shard).unwrap();
    assert_eq!(location.range.end, file.len(), "the only tensor ends the file");
    assert_eq!(&*location.map().unwrap(), &f32_bytes(&[2.0; 4])[..]);
    assert_eq!(&*location.map().unwrap(), &file[location.range.clone()]);

    let err = checkpoint.tensor_location("model.layers.7.mlp.gate.weight").unwrap_err();
    assert!(matches!(err, CheckpointError::TensorNotFound { .. }), "{err}");

    // A file cut short after its header was read must be an error, not a fatal signal.
    fs::write(&shard, &file[..file.len() - 4]).unwrap();
    let message = location.map().unwrap_err().to_string();
    assert!(message.contains("model-00003-of-00003.safetensors"), "{message}");
    assert!(message.contains(name), "{message}");
}

fn edit_index(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join(SHARD_INDEX);
    let mut index: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut index);
    fs::write(path, index.to_string()).unwrap();
}

#[test]
fn an_index_naming_a_missing_shard_is_refused_at_open() {
    let dir = sharded_checkpoint();
    fs::remove_file(dir.path().join("model-00003-of-00003.safetensors")).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::MissingShard { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("model-00003-of-00003.safetensors"), "{message}");
    assert!(message.contains(SHARD_INDEX), "{message}");
}

#[test]
fn a_tensor_missing_from_its_shard_names_shard_and_index() {
    let dir = sharded_checkpoint();
    edit_index(dir.path(), |index| {
        index["weight_map"]["model.layers.1.mlp.gate.weight"] =
            Value::String("model-00001-of-00003.safetensors".to_owned());
    });
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let err = checkpoint.tensor("model.layers.1.mlp.gate.weight").unwrap_err();
    assert!(matches!(err, CheckpointError::TensorNotInShard { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("model.layers.1.mlp.gate.weight"), "{message}");
    assert!(message.contains("model-00001-of-00003.safetensors"), "{message}");
}

#[test]
fn malformed_indexes_are_refused() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: [(&str, Edit); 4] = [
        ("no weight_map", Box::new(|index| index["weight_map"] = Value::Null)),
        ("weight_map not an object", Box::new(|index| index["weight_map"] = 3.into())),
        (
            "shard not a string",
            Box::new(|index| index["weight_map"]["model.layers.1.mlp.gate.weight"] = 2.into()),
        ),
        (
            "shard outside the folder",
            Box::new(|index| {
                index["weight_map"]["model.layers.1.mlp.gate.weight"] =
                    "../model-00002-of-00003.safetensors".into();
            }),
        ),
    ];
    for (what, edit) in cases {
        let dir = sharded_checkpoint();
        edit_index(dir.path(), edit);
        let err = Checkpoint::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, CheckpointError::Index { .. } | CheckpointError::BadShardName { .. }),
            "{what}: {err}"
        );
        assert!(err.to_string().contains(SHARD_INDEX), "{what}: {err}");
    }
    let dir = sharded_checkpoint();
    fs::write(dir.path().join(SHARD_INDEX), "{\"weight_map\": ").unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::Index { .. }), "{err}");
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::Config(ConfigError::Read { .. })), "{err}");
    assert!(err.to_string().contains(CONFIG_FILE), "{err}");
    fs::write(dir.path().join(CONFIG_FILE), CONFIG).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::NoWeights { .. }), "{err}");
    assert!(err.to_string().contains(SHARD_INDEX), "{err}");
}
