//! `sluice` on DeepSeek-V4 checkpoints: hash layers shown by `inspect`, `route` with `input_ids`
//! beside `hidden_states`, and the one-line failures when the token ids are missing or wrong.

use std::path::Path;
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, TensorView};

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).output().expect("sluice runs")
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/testdata")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A tensor of the V4 fixture's golden file: (dtype, shape, bytes).
fn golden(name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(Path::new(&fixture("v4")).join("golden.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor(name).unwrap();
    (view.dtype(), view.shape().to_vec(), view.data().to_vec())
}

/// Token ids to write and the dtype to write them as (I32 or I64).
type InputIds<'a> = Option<(Dtype, &'a [i64])>;

/// Writes `hidden_states` and, if given, `input_ids`.
fn write_input(path: &Path, ids: InputIds<'_>) {
    let (dtype, shape, hidden) = golden("hidden_states.f32");
    let ids_bytes: Option<(Dtype, Vec<u8>, usize)> = ids.map(|(dtype, ids)| {
        let bytes = match dtype {
            Dtype::I32 => ids.iter().flat_map(|&i| (i as i32).to_le_bytes()).collect(),
            _ => ids.iter().flat_map(|&i| i.to_le_bytes()).collect(),
        };
        (dtype, bytes, ids.len())
    });
    let mut tensors = vec![("hidden_states", TensorView::new(dtype, shape, &hidden).unwrap())];
    if let Some((dtype, bytes, len)) = &ids_bytes {
        tensors.push(("input_ids", TensorView::new(*dtype, vec![*len], bytes).unwrap()));
    }
    std::fs::write(path, safetensors::serialize(tensors, None).unwrap()).unwrap();
}

fn golden_ids() -> Vec<i64> {
    let (_, _, bytes) = golden("input_ids");
    bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn inspect_shows_the_hash_layers_and_their_tables() {
    for name in ["v4", "v4-saved-by-transformers"] {
        let out = sluice(&["inspect", &fixture(name)]);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains("DeepSeek-V4") && stdout.contains("sqrtsoftplus"), "{stdout}");
        assert!(stdout.contains("2 layers route by token id"), "{stdout}");
        assert!(
            stdout.contains("layer   0  weight bf16") && stdout.contains("hash table i32"),
            "{stdout}"
        );
    }
    let out = sluice(&["inspect", &fixture("v4")]);
    assert!(text(&out.stdout).contains("hash table i32 [1024, 6]"));
}

#[test]
fn route_takes_int32_or_int64_input_ids_and_matches_the_golden_hash_rows() {
    let dir = tempfile::tempdir().unwrap();
    let ids = golden_ids();
    let (_, _, expected) = golden("layers.0.f32.topk_ids");
    let expected: Vec<i64> =
        expected.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    for dtype in [Dtype::I32, Dtype::I64] {
        let input = dir.path().join("in.safetensors");
        let output = dir.path().join("out.safetensors");
        write_input(&input, Some((dtype, &ids)));
        let out = sluice(&[
            "route",
            "--checkpoint",
            &fixture("v4"),
            "--all-layers",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{dtype:?}: {}", text(&out.stderr));
        let bytes = std::fs::read(&output).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let got = file.tensor("layers.0.topk_ids").unwrap();
        let got: Vec<i32> =
            got.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
        for (row, (got, want)) in got.chunks(6).zip(expected.chunks(6)).enumerate() {
            let mut got: Vec<i64> = got.iter().map(|&i| i64::from(i)).collect();
            let mut want = want.to_vec();
            got.sort();
            want.sort();
            assert_eq!(got, want, "{dtype:?} row {row}: the experts of its token's table row");
        }
        assert!(file.tensor("layers.3.topk_ids").is_ok(), "top-k layers route too");
    }
}

#[test]
fn missing_or_bad_input_ids_are_one_line_naming_the_layer_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = golden_ids().len();
    let mut outside = vec![0i64; tokens];
    outside[3] = 1024;
    let cases: [(InputIds<'_>, &str); 3] = [
        (None, "layer 0 is hash-routed"),
        (Some((Dtype::I64, &outside)), "token id 1024 (row 3) is outside"),
        (Some((Dtype::I64, &outside[..tokens - 1])), "input_ids"),
    ];
    for (ids, expected) in cases {
        let input = dir.path().join("in.safetensors");
        let output = dir.path().join("out.safetensors");
        write_input(&input, ids);
        let out = sluice(&[
            "route",
            "--checkpoint",
            &fixture("v4"),
            "--layer",
            "0",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{expected}");
        assert!(stderr.starts_with("sluice: ") && stderr.contains(expected), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(!output.exists(), "{expected}: nothing written");
    }
}

#[test]
fn demo_and_bench_take_the_v4_shapes() {
    for model in ["v4", "v4-hash"] {
        let out = sluice(&["demo", "--model", model, "--tokens", "8", "--show", "1"]);
        assert!(out.status.success(), "{model}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("matches the reference router on 8 of 8 tokens"));
        let out = sluice(&["bench", "--model", model, "--tokens", "1,8", "--min-seconds", "0"]);
        assert!(out.status.success(), "{model}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("4096 -> 256"), "{}", text(&out.stdout));
    }
    // A checkpoint's hash-routed layer is timed with token ids drawn over its own table.
    let out = sluice(&[
        "bench",
        "--checkpoint",
        &fixture("v4"),
        "--layer",
        "0",
        "--tokens",
        "1,8",
        "--min-seconds",
        "0",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("sqrtsoftplus + hash"), "{}", text(&out.stdout));
}

#[test]
fn extract_gates_keeps_the_hash_tables() {
    let dir = tempfile::tempdir().unwrap();
    let gates = dir.path().join("v4-gates");
    let out = sluice(&[
        "extract-gates",
        "--checkpoint",
        &fixture("v4"),
        "--output",
        gates.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = sluice(&["inspect", gates.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("layer   0  weight bf16 [64, 192]  hash table i32 [1024, 6]"),
        "{stdout}"
    );
    assert!(stdout.contains("layer   2  weight bf16 [64, 192]  bias f32 [64]"), "{stdout}");
    assert!(stdout.contains("4 of 4 MoE gates present"), "{stdout}");
}
