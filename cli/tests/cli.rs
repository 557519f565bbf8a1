//! The `sluice` binary end to end: commands on the committed fixtures, and bad input that must end
//! in one line on stderr, a non-zero exit and nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, TensorView};
use sluice_models::reference::{self, DispatchLayout, PaddedLayout, RankLayout, RankMap};
use sluice_tensor::{DispatchShape, contiguous_ranks};

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

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Writes an f32 `hidden_states` `[t, h]` input file.
fn write_input(path: &Path, values: &[f32], t: usize, h: usize) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![t, h], &bytes).unwrap();
    std::fs::write(path, safetensors::serialize([("hidden_states", view)], None).unwrap()).unwrap();
}

/// The golden f32 hidden states of a fixture.
fn golden_hidden(name: &str) -> (Vec<f32>, usize, usize) {
    let bytes = std::fs::read(Path::new(&fixture(name)).join("golden.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor("hidden_states.f32").unwrap();
    let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
    (values.collect(), view.shape()[0], view.shape()[1])
}

fn read_i32(path: &Path, name: &str) -> (Vec<i32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor(name).unwrap();
    assert_eq!(view.dtype(), Dtype::I32, "{name}");
    let values = view.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()));
    (values.collect(), view.shape().to_vec())
}

fn read_f32(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor(name).unwrap();
    assert_eq!(view.dtype(), Dtype::F32, "{name}");
    view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Scratch { dir: tempfile::tempdir().unwrap() }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

#[test]
fn demo_checks_itself_and_reports_a_time() {
    let out = sluice(&["demo", "--tokens", "8", "--show", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("matches the reference router on 8 of 8 tokens"), "{text}");
    assert!(text.contains("token  1"), "{text}");
    assert!(text.contains("selections per group"), "{text}");
    assert!(text.contains("time per call"), "{text}");
}

#[test]
fn inspect_describes_every_fixture() {
    let v3 = sluice(&["inspect", &fixture("v3")]);
    assert!(v3.status.success(), "{}", stderr(&v3));
    let text = stdout(&v3);
    assert!(text.contains("DeepSeek-V3"), "{text}");
    assert!(text.contains("layer   3  weight bf16 [256, 7168]  bias f32 [256]"), "{text}");
    let v2 = stdout(&sluice(&["inspect", &fixture("v2")]));
    assert!(v2.contains("2 MoE: 2, 4"), "{v2}");
    assert!(v2.contains("group_limited_greedy"), "{v2}");
    for name in ["v2-lite", "kimi-k2", "saved-by-transformers", "qwen3-moe-sparse-step"] {
        let out = sluice(&["inspect", &fixture(name)]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
    }
}

#[test]
fn inspect_names_the_qwen3_moe_and_mixtral_families_and_their_moe_layers() {
    let qwen3 = stdout(&sluice(&["inspect", &fixture("qwen3-moe")]));
    assert!(qwen3.contains("Qwen3-MoE (model_type \"qwen3_moe\")"), "{qwen3}");
    assert!(qwen3.contains("3 MoE: 0, 2-3"), "layer 1 is in mlp_only_layers: {qwen3}");
    assert!(qwen3.contains("softmax + greedy") && qwen3.contains("renorm=true"), "{qwen3}");
    let mixtral = sluice(&["inspect", &fixture("mixtral"), "--json"]);
    assert!(mixtral.status.success(), "{}", stderr(&mixtral));
    let document: serde_json::Value = serde_json::from_str(&stdout(&mixtral)).unwrap();
    assert_eq!(document["family"], "Mixtral");
    assert_eq!(document["moe_layers"], serde_json::json!([0, 1]));
    assert_eq!(document["gates_present"], 2);
}

#[test]
fn inspect_names_the_newer_families_their_moe_layers_and_biases() {
    for (name, family, layers, routing, bias) in [
        (
            "glm4-moe",
            "GLM-4.5 (model_type \"glm4_moe\")",
            "2 MoE: 1-2",
            "sigmoid + noaux_tc",
            "f32 [32]",
        ),
        (
            "gpt-oss",
            "gpt-oss (model_type \"gpt_oss\")",
            "2 MoE: 0-1",
            "softmax of the selected logits + greedy, bias on logits",
            "f32 [16]",
        ),
        (
            "minimax-m2",
            "MiniMax-M2 (model_type \"minimax_m2\")",
            "2 MoE: 0-1",
            "sigmoid + noaux_tc",
            "f32 [32]",
        ),
        (
            "llama4",
            "Llama 4 (model_type \"llama4_text\", fields under text_config)",
            "2 MoE: 1, 3",
            "sigmoid of the selected logits + greedy",
            "none",
        ),
    ] {
        let out = sluice(&["inspect", &fixture(name)]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains(family), "{name}: {text}");
        assert!(text.contains(layers), "{name}: {text}");
        assert!(text.contains(routing), "{name}: {text}");
        assert!(text.contains(&format!("bias {bias}")), "{name}: {text}");
    }
}

#[test]
fn demo_and_bench_take_the_newer_families() {
    for (model, shape) in [
        ("qwen3-moe", "4096 -> 128"),
        ("mixtral", "4096 -> 8"),
        ("glm-4.5", "5120 -> 160"),
        ("gpt-oss", "2880 -> 128"),
        ("minimax-m2", "3072 -> 256"),
        ("llama4", "5120 -> 128"),
    ] {
        let out = sluice(&["demo", "--model", model, "--tokens", "8", "--show", "1"]);
        assert!(out.status.success(), "{model}: {}", stderr(&out));
        assert!(stdout(&out).contains("matches the reference router on 8 of 8 tokens"), "{model}");
        let out = sluice(&["bench", "--model", model, "--tokens", "1,8", "--min-seconds", "0"]);
        assert!(out.status.success(), "{model}: {}", stderr(&out));
        assert!(stdout(&out).contains(shape), "{model}: {}", stdout(&out));
    }
}

#[test]
fn route_matches_the_golden_expert_sets() {
    let scratch = Scratch::new();
    let (hidden, t, h) = golden_hidden("v3");
    write_input(&scratch.path("in.safetensors"), &hidden, t, h);
    let out = sluice(&[
        "route",
        "--checkpoint",
        &fixture("v3"),
        "--layer",
        "3",
        "--input",
        &scratch.s("in.safetensors"),
        "--output",
        &scratch.s("out.safetensors"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (ids, shape) = read_i32(&scratch.path("out.safetensors"), "topk_ids");
    assert_eq!(shape, vec![t, 8]);
    let golden = std::fs::read(Path::new(&fixture("v3")).join("golden.safetensors")).unwrap();
    let golden = safetensors::SafeTensors::deserialize(&golden).unwrap();
    let expected: Vec<i64> = golden
        .tensor("layers.3.f32.topk_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (row, (got, want)) in ids.chunks(8).zip(expected.chunks(8)).enumerate() {
        let mut got: Vec<i64> = got.iter().map(|&i| i64::from(i)).collect();
        let mut want = want.to_vec();
        got.sort();
        want.sort();
        assert_eq!(got, want, "row {row}");
    }
    let weights = read_f32(&scratch.path("out.safetensors"), "topk_weights");
    let row_sum: f32 = weights[..8].iter().sum();
    assert!((row_sum - 2.5).abs() < 1e-4, "scaled by routed_scaling_factor: {row_sum}");
}

#[test]
fn route_all_layers_and_no_scale() {
    let scratch = Scratch::new();
    let (hidden, t, h) = golden_hidden("v2");
    write_input(&scratch.path("in.safetensors"), &hidden, t, h);
    let out = sluice(&[
        "route",
        "--checkpoint",
        &fixture("v2"),
        "--all-layers",
        "--no-scale",
        "--input",
        &scratch.s("in.safetensors"),
        "--output",
        &scratch.s("out.safetensors"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for layer in [2, 4] {
        let (ids, shape) =
            read_i32(&scratch.path("out.safetensors"), &format!("layers.{layer}.topk_ids"));
        assert_eq!(shape, vec![t, 6]);
        assert!(ids.iter().all(|&i| (0..160).contains(&i)));
        let weights =
            read_f32(&scratch.path("out.safetensors"), &format!("layers.{layer}.topk_weights"));
        // Softmax probabilities without the factor of 16: each below 1.
        assert!(weights.iter().all(|&w| w > 0.0 && w < 1.0), "{weights:?}");
    }
}

#[test]
fn non_finite_rows_fail_by_default_and_can_be_marked_invalid() {
    let scratch = Scratch::new();
    let (mut hidden, t, h) = golden_hidden("kimi-k2");
    hidden[2 * h + 5] = f32::NAN;
    write_input(&scratch.path("in.safetensors"), &hidden, t, h);
    let args = |extra: &'static [&'static str]| {
        let mut v = vec![
            "route".to_owned(),
            "--checkpoint".to_owned(),
            fixture("kimi-k2"),
            "--layer".to_owned(),
            "1".to_owned(),
            "--input".to_owned(),
            scratch.s("in.safetensors"),
            "--output".to_owned(),
            scratch.s("out.safetensors"),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let failed = Command::new(env!("CARGO_BIN_EXE_sluice")).args(args(&[])).output().unwrap();
    assert!(!failed.status.success());
    assert!(stderr(&failed).contains("row 2"), "{}", stderr(&failed));
    assert!(!scratch.path("out.safetensors").exists());
    let marked = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args(&["--mark-invalid"]))
        .output()
        .unwrap();
    assert!(marked.status.success(), "{}", stderr(&marked));
    let (ids, _) = read_i32(&scratch.path("out.safetensors"), "topk_ids");
    assert!(ids[16..24].iter().all(|&i| i == -1));
    assert!(ids[..16].iter().chain(&ids[24..]).all(|&i| (0..384).contains(&i)));
}

#[test]
fn bad_input_is_one_line_a_failure_and_no_output() {
    let scratch = Scratch::new();
    let (hidden, t, h) = golden_hidden("v3");
    write_input(&scratch.path("in.safetensors"), &hidden, t, h);
    write_input(&scratch.path("narrow.safetensors"), &hidden[..t * 100], t, 100);
    std::fs::write(scratch.path("garbage.safetensors"), b"\xff\xff\xff\xff not a header").unwrap();
    std::fs::write(scratch.path("short.safetensors"), [8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
    let v3 = fixture("v3");
    let input = scratch.s("in.safetensors");
    let out = scratch.s("out.safetensors");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--layer".into(), "0".into()], "dense"),
        (vec!["--layer".into(), "99".into()], "does not exist"),
        (vec!["--input".into(), scratch.s("missing.safetensors")], "missing.safetensors"),
        (vec!["--input".into(), scratch.s("garbage.safetensors")], "safetensors"),
        (vec!["--input".into(), scratch.s("short.safetensors")], "safetensors"),
        (vec!["--input".into(), scratch.s("narrow.safetensors")], "hidden"),
        (vec!["--output".into(), scratch.s("no/such/dir/out.safetensors")], "does not exist"),
        (vec!["--checkpoint".into(), scratch.s("nowhere")], "nowhere"),
        (vec!["--checkpoint".into(), fixture("../../README.md")], "README.md"),
    ];
    for (overrides, expected) in cases {
        let mut args: Vec<String> = vec!["route".into()];
        let mut set = |flag: &str, default: &str| {
            let value = overrides
                .iter()
                .position(|a| a == flag)
                .map(|i| overrides[i + 1].clone())
                .unwrap_or_else(|| default.to_owned());
            args.push(flag.to_owned());
            args.push(value);
        };
        set("--checkpoint", &v3);
        set("--layer", "3");
        set("--input", &input);
        set("--output", &out);
        let result = Command::new(env!("CARGO_BIN_EXE_sluice")).args(&args).output().unwrap();
        let err = stderr(&result);
        assert!(!result.status.success(), "{overrides:?} succeeded");
        assert_eq!(err.lines().count(), 1, "{overrides:?}: one line on stderr, got {err:?}");
        assert!(err.starts_with("sluice: "), "{err}");
        assert!(err.contains(expected), "{overrides:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(
            scratch.files(),
            vec![
                "garbage.safetensors",
                "in.safetensors",
                "narrow.safetensors",
                "short.safetensors"
            ],
            "{overrides:?} left files behind"
        );
    }
}

#[test]
fn bench_writes_the_documented_json() {
    let scratch = Scratch::new();
    let out = sluice(&[
        "bench",
        "--model",
        "v2-lite",
        "--tokens",
        "1,3",
        "--dtype",
        "f32",
        "--min-seconds",
        "0",
        "--min-calls",
        "2",
        "--json",
        &scratch.s("bench.json"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(scratch.path("bench.json")).unwrap()).unwrap();
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (result, tokens) in results.iter().zip([1, 3]) {
        assert_eq!(result["model"], "v2-lite");
        assert_eq!(result["tokens"], tokens);
        assert_eq!(result["dtype"], "f32");
        assert_eq!(result["backend"], "cpu");
        assert!(result["median_ms"].as_f64().unwrap() > 0.0);
        assert!(result["gflops"].as_f64().unwrap() > 0.0);
    }
}

/// Every tensor of a checkpoint folder (single file or shards) as (dtype, shape, bytes), by name.
fn checkpoint_tensors(
    dir: &Path,
) -> std::collections::BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        let mut files: Vec<PathBuf> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|file| dir.join(file.as_str().unwrap()))
            .collect();
        files.sort();
        files.dedup();
        files
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut tensors = std::collections::BTreeMap::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        for (name, view) in safetensors::SafeTensors::deserialize(&bytes).unwrap().tensors() {
            let entry = (view.dtype(), view.shape().to_vec(), view.data().to_vec());
            assert!(tensors.insert(name.clone(), entry).is_none(), "{name} twice");
        }
    }
    tensors
}

/// Routes the fixture's golden f32 hidden states through every MoE layer of `checkpoint` and
/// returns the output file's bytes.
fn route_all_layers(
    scratch: &Scratch,
    fixture_name: &str,
    checkpoint: &str,
    extra: &[&str],
) -> Output {
    let (hidden, t, h) = golden_hidden(fixture_name);
    write_input(&scratch.path("in.safetensors"), &hidden, t, h);
    let mut args = vec![
        "route",
        "--checkpoint",
        checkpoint,
        "--all-layers",
        "--input",
        scratch.dir.path().join("in.safetensors").to_str().unwrap(),
        "--output",
        scratch.dir.path().join("out.safetensors").to_str().unwrap(),
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_sluice")).args(&args).output().unwrap()
}

fn extract(source: &str, output: &Path, extra: &[&str]) -> Output {
    let mut args =
        vec!["extract-gates", "--checkpoint", source, "--output", output.to_str().unwrap()];
    args.extend_from_slice(extra);
    sluice(&args)
}

#[test]
fn extracted_gates_are_the_source_gates_and_route_every_layer_bit_identically() {
    // v3 is sharded (gate weight and bias in different shards, fp8 decoys beside them), the
    // others are single files; saved-by-transformers keeps its gate weight in f32. Each is also
    // extracted into shards, with a limit below the size of one gate weight.
    let cases = [
        ("v3", "1MB", 2),
        ("kimi-k2", "300KB", 4),
        ("v2", "100KB", 2),
        ("v2-lite", "40KB", 2),
        ("saved-by-transformers", "3KB", 4),
    ];
    for (name, shard_size, shards) in cases {
        let scratch = Scratch::new();
        let source = fixture(name);
        let source_tensors = checkpoint_tensors(Path::new(&source));
        let routed = route_all_layers(&scratch, name, &source, &[]);
        assert!(routed.status.success(), "{name}: {}", stderr(&routed));
        let expected_routing = std::fs::read(scratch.path("out.safetensors")).unwrap();

        for (folder, extra) in
            [("gates", vec![]), ("sharded", vec!["--max-shard-size", shard_size])]
        {
            let what = format!("{name} into {folder}");
            let output = scratch.path(folder);
            let out = extract(&source, &output, &extra);
            assert!(out.status.success(), "{what}: {}", stderr(&out));
            assert!(stdout(&out).contains("MoE gates"), "{what}: {}", stdout(&out));
            assert_eq!(
                std::fs::read(output.join("config.json")).unwrap(),
                std::fs::read(Path::new(&source).join("config.json")).unwrap(),
                "{what}: config.json is copied unchanged"
            );
            let files = std::fs::read_dir(&output).unwrap().count();
            if extra.is_empty() {
                assert_eq!(files, 2, "{what}: config.json and model.safetensors");
                assert!(output.join("model.safetensors").exists(), "{what}");
            } else {
                assert_eq!(files, shards + 2, "{what}: config, index and {shards} shards");
            }

            let extracted = checkpoint_tensors(&output);
            let gate_names: Vec<&String> = source_tensors
                .keys()
                .filter(|n| {
                    n.ends_with(".mlp.gate.weight") || n.ends_with(".e_score_correction_bias")
                })
                .collect();
            assert_eq!(extracted.keys().collect::<Vec<_>>(), gate_names, "{what}: only the gates");
            for (tensor, copy) in &extracted {
                assert!(
                    copy == &source_tensors[tensor],
                    "{what}: {tensor} differs from the source"
                );
            }

            let routed = route_all_layers(&scratch, name, output.to_str().unwrap(), &[]);
            assert!(routed.status.success(), "{what}: {}", stderr(&routed));
            assert!(
                std::fs::read(scratch.path("out.safetensors")).unwrap() == expected_routing,
                "{what}: the extracted gates route differently"
            );
        }
    }
}

/// A scratch folder holding `layer-2/`: the gate of Kimi-K2 fixture's layer 2, not of layer 1.
fn partial_kimi_k2() -> (Scratch, String) {
    let scratch = Scratch::new();
    let partial = scratch.path("layer-2");
    let out = extract(&fixture("kimi-k2"), &partial, &["--layers", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let partial = partial.to_string_lossy().into_owned();
    (scratch, partial)
}

#[test]
fn inspect_lists_the_present_and_missing_gates_of_a_partial_checkpoint() {
    let (_scratch, partial) = partial_kimi_k2();
    let partial = partial.as_str();

    let inspect = sluice(&["inspect", partial]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    let text = stdout(&inspect);
    assert!(
        text.contains("layer   1  missing (looked for model.layers.1.mlp.gate.weight)"),
        "{text}"
    );
    assert!(text.contains("layer   2  weight bf16 [384, 512]  bias f32 [384]"), "{text}");
    assert!(text.trim_end().ends_with("1 of 2 MoE gates present"), "{text}");

    let json = sluice(&["inspect", "--json", partial]);
    assert!(json.status.success(), "{}", stderr(&json));
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["gates_present"], 1);
    assert_eq!(json["moe_layers"], serde_json::json!([1, 2]));
    let gates = json["gates"].as_array().unwrap();
    assert_eq!(gates[0]["layer"], 1);
    assert_eq!(gates[0]["present"], false);
    assert_eq!(gates[0]["looked_for"], serde_json::json!(["model.layers.1.mlp.gate.weight"]));
    assert_eq!(gates[1]["present"], true);
    assert_eq!(gates[1]["weight"], serde_json::json!({"dtype": "bf16", "shape": [384, 512]}));
    assert_eq!(gates[1]["bias"], serde_json::json!({"dtype": "f32", "shape": [384]}));
}

#[test]
fn route_all_layers_refuses_a_partial_checkpoint_or_skips_its_missing_layers() {
    let (scratch, partial) = partial_kimi_k2();
    let partial = partial.as_str();
    // --all-layers refuses a partial checkpoint by default, naming what is missing...
    let refused = route_all_layers(&scratch, "kimi-k2", partial, &[]);
    assert!(!refused.status.success());
    let err = stderr(&refused);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("1 of 2 MoE gates are missing (layer 1;"), "{err}");
    assert!(err.contains("--skip-missing"), "{err}");
    assert!(!scratch.path("out.safetensors").exists());
    // ...and routes the present layers, naming the skipped ones, when asked to.
    let skipped = route_all_layers(&scratch, "kimi-k2", partial, &["--skip-missing"]);
    assert!(skipped.status.success(), "{}", stderr(&skipped));
    assert!(stderr(&skipped).contains("skipped MoE layer 1 "), "{}", stderr(&skipped));
    let routed = std::fs::read(scratch.path("out.safetensors")).unwrap();
    let routed = safetensors::SafeTensors::deserialize(&routed).unwrap();
    let mut names = routed.names();
    names.sort();
    assert_eq!(names, ["layers.2.topk_ids", "layers.2.topk_weights"]);
    let full = route_all_layers(&scratch, "kimi-k2", &fixture("kimi-k2"), &[]);
    assert!(full.status.success(), "{}", stderr(&full));
    let full = std::fs::read(scratch.path("out.safetensors")).unwrap();
    let full = safetensors::SafeTensors::deserialize(&full).unwrap();
    for name in names {
        assert_eq!(
            routed.tensor(name).unwrap().data(),
            full.tensor(name).unwrap().data(),
            "{name}"
        );
    }
}

#[test]
fn bench_times_the_gate_a_checkpoint_holds() {
    let (scratch, partial) = partial_kimi_k2();
    let partial = partial.as_str();
    let bench = sluice(&[
        "bench",
        "--checkpoint",
        partial,
        "--tokens",
        "2",
        "--min-seconds",
        "0",
        "--min-calls",
        "2",
        "--json",
        &scratch.s("bench.json"),
    ]);
    assert!(bench.status.success(), "{}", stderr(&bench));
    assert!(stdout(&bench).contains("Kimi-K2 layer 2 gate (512 -> 384"), "{}", stdout(&bench));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(scratch.path("bench.json")).unwrap()).unwrap();
    assert_eq!(json["results"][0]["model"], "Kimi-K2 layer 2");
    assert_eq!(json["meta"]["layer"], 2);
    assert_eq!(json["meta"]["weight_dtype"], "bf16");
    let missing = sluice(&["bench", "--checkpoint", partial, "--layer", "1", "--tokens", "1"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("model.layers.1.mlp.gate.weight"), "{}", stderr(&missing));
}

#[test]
fn extraction_refuses_what_it_cannot_do_and_leaves_nothing_behind() {
    let scratch = Scratch::new();
    std::fs::create_dir(scratch.path("taken")).unwrap();
    let partial = scratch.path("partial");
    assert!(extract(&fixture("kimi-k2"), &partial, &["--layers", "1"]).status.success());
    let before = scratch.files();
    let partial = partial.to_str().unwrap().to_owned();
    let cases: [(&str, &str, &[&str], &str); 7] = [
        ("an existing output", "taken", &[], "already exists"),
        ("a dense layer", "new", &["--layers", "0"], "dense"),
        ("a layer past the end", "new", &["--layers", "2,9"], "does not exist"),
        ("a bad layer list", "new", &["--layers", "1,x"], "`x`"),
        ("a bad shard size", "new", &["--max-shard-size", "1 parsec"], "size"),
        ("an output folder inside a missing one", "no/such/new", &[], "does not exist"),
        ("a checkpoint that is not one", "new", &[], "config.json"),
    ];
    for (what, output, extra, expected) in cases {
        let source =
            if what.starts_with("a checkpoint") { scratch.s("taken") } else { fixture("v2") };
        let out = extract(&source, &scratch.path(output), extra);
        let err = stderr(&out);
        assert!(!out.status.success(), "{what}: succeeded");
        assert!(err.contains(expected), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(scratch.files(), before, "{what}: left files behind");
    }
    for (layers, expected) in [(None, "choose the layers that are present"), (Some("2"), "layer 2")]
    {
        let extra: Vec<&str> = layers.iter().flat_map(|l| ["--layers", *l]).collect();
        let out = extract(&partial, &scratch.path("new"), &extra);
        let err = stderr(&out);
        assert!(!out.status.success(), "{layers:?}: extracting a missing gate succeeded");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(expected), "{layers:?}: {err}");
        assert_eq!(scratch.files(), before, "{layers:?}: left files behind");
    }
}

/// The layout tensors of `route --dispatch` in `path` (with `prefix`), as the reference's type.
fn read_layout(path: &Path, prefix: &str, block: bool, ranks: bool) -> DispatchLayout {
    let get = |name: &str| read_i32(path, &format!("{prefix}{name}")).0;
    let invalid = get("invalid");
    DispatchLayout {
        expert_counts: get("expert_counts"),
        expert_offsets: get("expert_offsets"),
        sorted_pairs: get("sorted_pairs"),
        inverse: get("inverse"),
        invalid: [invalid[0], invalid[1]],
        padded: block.then(|| PaddedLayout {
            block_size: 16,
            padded_pairs: get("padded_pairs"),
            block_experts: get("block_experts"),
            padded_total: get("padded_total")[0],
        }),
        ranks: ranks.then(|| RankLayout {
            rank_counts: get("rank_counts"),
            rank_offsets: get("rank_offsets"),
            rank_pairs: get("rank_pairs"),
            rank_tokens: get("rank_tokens"),
        }),
    }
}

#[test]
fn route_dispatch_writes_the_reference_layout_beside_the_routing() {
    let scratch = Scratch::new();
    let (mut hidden, t, h) = golden_hidden("v3");
    hidden[h + 3] = f32::INFINITY;
    write_input(&scratch.path("in.safetensors"), &hidden, t, h);
    let out = scratch.s("out.safetensors");
    let input = scratch.s("in.safetensors");
    let args = ["route", "--checkpoint", &fixture("v3"), "--layer", "3", "--input", &input];
    let routed = sluice(&[&args[..], &["--output", &out, "--mark-invalid", "--dispatch"]].concat());
    assert!(routed.status.success(), "{}", stderr(&routed));
    let path = scratch.path("out.safetensors");
    let (ids, shape) = read_i32(&path, "topk_ids");
    let layout_shape = DispatchShape { tokens: t, top_k: 8, experts: 256 };
    let expected = reference::dispatch(&ids, layout_shape, None, None).unwrap();
    assert_eq!(read_layout(&path, "", false, false), expected);
    assert_eq!(expected.invalid, [1, 1], "the row with an infinity is counted, not dispatched");
    assert_eq!(read_i32(&path, "inverse").1, shape);

    let padded = sluice(
        &[
            &args[..],
            &[
                "--output",
                &out,
                "--mark-invalid",
                "--dispatch",
                "--block-size",
                "16",
                "--ranks",
                "4",
            ],
        ]
        .concat(),
    );
    assert!(padded.status.success(), "{}", stderr(&padded));
    let mut table = vec![0; 256];
    contiguous_ranks(&mut table, 4);
    let map = RankMap { expert_ranks: &table, ranks: 4 };
    let expected = reference::dispatch(&ids, layout_shape, Some(16), Some(map)).unwrap();
    assert_eq!(read_layout(&path, "", true, true), expected);
}

#[test]
fn the_load_plot_is_well_formed_svg_whose_numbers_are_the_counts() {
    let scratch = Scratch::new();
    let (hidden, t, h) = golden_hidden("v2");
    write_input(&scratch.path("in.safetensors"), &hidden, t, h);
    let out = sluice(&[
        "route",
        "--checkpoint",
        &fixture("v2"),
        "--all-layers",
        "--input",
        &scratch.s("in.safetensors"),
        "--output",
        &scratch.s("out.safetensors"),
        "--ranks",
        "4",
        "--load-plot",
        &scratch.s("load.svg"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg = std::fs::read_to_string(scratch.path("load.svg")).unwrap();
    let document = roxmltree::Document::parse(&svg).expect("well-formed XML");
    assert_eq!(document.root_element().tag_name().name(), "svg");
    let mut table = vec![0; 160];
    contiguous_ranks(&mut table, 4);
    let map = RankMap { expert_ranks: &table, ranks: 4 };
    let mut cells = 0;
    for layer in [2, 4] {
        let (ids, _) =
            read_i32(&scratch.path("out.safetensors"), &format!("layers.{layer}.topk_ids"));
        let shape = DispatchShape { tokens: t, top_k: 6, experts: 160 };
        let expected = reference::dispatch(&ids, shape, None, Some(map)).unwrap();
        for node in
            document.descendants().filter(|n| n.attribute("data-layer") == Some(&layer.to_string()))
        {
            if let Some(count) = node.attribute("data-count") {
                let expert: usize = node.attribute("data-expert").unwrap().parse().unwrap();
                assert_eq!(count.parse::<i32>().unwrap(), expected.expert_counts[expert]);
                cells += 1;
            }
            if let Some(imbalance) = node.attribute("data-imbalance") {
                let rank_counts = &expected.ranks.as_ref().unwrap().rank_counts;
                let mean = rank_counts.iter().sum::<i32>() as f64 / 4.0;
                let busiest = *rank_counts.iter().max().unwrap() as f64;
                assert!((imbalance.parse::<f64>().unwrap() - busiest / mean).abs() < 1e-3);
            }
        }
    }
    assert_eq!(cells, 2 * 160);
    // The plot alone does not add layout tensors to the output.
    let bytes = std::fs::read(scratch.path("out.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(file.len(), 4, "{:?}", file.names());
}

#[test]
fn bad_layout_options_fail_and_leave_no_output() {
    let scratch = Scratch::new();
    let (hidden, t, h) = golden_hidden("v3");
    write_input(&scratch.path("in.safetensors"), &hidden, t, h);
    let input = scratch.s("in.safetensors");
    let out = scratch.s("out.safetensors");
    let base = [
        "route",
        "--checkpoint",
        &fixture("v3"),
        "--layer",
        "3",
        "--input",
        &input,
        "--output",
        &out,
    ];
    let missing_folder = scratch.s("missing/load.svg");
    for extra in [
        &["--dispatch", "--block-size", "0"][..],
        &["--ranks", "4"],
        &["--block-size", "16"],
        &["--dispatch", "--ranks", "0"],
        &["--load-plot", &missing_folder],
    ] {
        let failed = sluice(&[&base[..], extra].concat());
        assert!(!failed.status.success(), "{extra:?}");
        assert!(!stderr(&failed).trim().is_empty(), "{extra:?}");
        assert_eq!(scratch.files(), ["in.safetensors"], "{extra:?}");
    }
    // Past argument parsing, a failure is one line naming the problem.
    let failed = sluice(&[&base[..], &["--load-plot", &missing_folder]].concat());
    let message = stderr(&failed);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.starts_with("sluice: ") && message.contains("does not exist"), "{message}");
}
