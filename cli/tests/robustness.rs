//! Hostile input on the command line: broken checkpoints, broken configs, bad hidden states and
//! too many tokens. Every failure must be one line on stderr starting `sluice: `, a non-zero exit,
//! nothing on stdout for commands that write there, and no output or temporary file left behind.

use std::path::{Path, PathBuf};
use std::process::Output;

use safetensors::tensor::{Dtype, TensorView};

const EXPERTS: usize = 8;
const HIDDEN: usize = 4;
const TOP_K: usize = 2;
const GATE: &str = "model.layers.1.mlp.gate.weight";
const BIAS: &str = "model.layers.1.mlp.gate.e_score_correction_bias";

const CONFIG: &str = r#"{"model_type": "deepseek_v3", "hidden_size": 4, "num_hidden_layers": 2,
    "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4,
    "topk_group": 2, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}"#;

fn sluice(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).output().expect("runs")
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A safetensors file from a header written as text and the data section after it.
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// The gate tensors of layer 1, as (name, f32 values, shape).
fn gate_tensors() -> [(&'static str, Vec<f32>, Vec<usize>); 2] {
    let weight = (0..EXPERTS * HIDDEN).map(|i| ((i * 7) % 11) as f32 / 8.0 - 0.6).collect();
    let bias = (0..EXPERTS).map(|e| (e as f32 - 3.5) * 0.013).collect();
    [(GATE, weight, vec![EXPERTS, HIDDEN]), (BIAS, bias, vec![EXPERTS])]
}

fn serialize(tensors: &[(&str, Vec<f32>, Vec<usize>)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, v, _)| f32_bytes(v)).collect();
    let views = tensors.iter().zip(&bytes).map(|((name, _, shape), data)| {
        (name.to_string(), TensorView::new(Dtype::F32, shape.clone(), data).unwrap())
    });
    safetensors::serialize(views, None).unwrap()
}

/// A scratch folder holding a checkpoint (`ckpt/`), an input file and room for the output.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// A valid single-file checkpoint and a valid input of `tokens` tokens.
    fn new(tokens: usize) -> Self {
        let scratch = Scratch { dir: tempfile::tempdir().unwrap() };
        std::fs::create_dir(scratch.ckpt()).unwrap();
        scratch.write("ckpt/config.json", CONFIG.as_bytes());
        scratch.write("ckpt/model.safetensors", &serialize(&gate_tensors()));
        let hidden: Vec<f32> =
            (0..tokens * HIDDEN).map(|i| ((i * 13) % 17) as f32 / 4.0 - 2.0).collect();
        scratch.write_input(&hidden, tokens, HIDDEN);
        scratch
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ckpt(&self) -> PathBuf {
        self.path("ckpt")
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap();
    }

    fn write_input(&self, values: &[f32], tokens: usize, hidden: usize) {
        let bytes = f32_bytes(values);
        let view = TensorView::new(Dtype::F32, vec![tokens, hidden], &bytes).unwrap();
        let file = safetensors::serialize([("hidden_states", view)], None).unwrap();
        self.write("in.safetensors", &file);
    }

    /// Every file name in the scratch folder, recursively, sorted.
    fn files(&self) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, root, out);
                } else {
                    out.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        let mut out = Vec::new();
        walk(self.dir.path(), self.dir.path(), &mut out);
        out.sort();
        out
    }

    fn route(&self, extra: &[&str]) -> Output {
        let (ckpt, input, output) =
            (self.ckpt(), self.path("in.safetensors"), self.path("out.safetensors"));
        let mut args = vec![
            "route",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--layer",
            "1",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        sluice(&args)
    }
}

/// Asserts the failure contract and that the message mentions every one of `expected`.
fn assert_refused(what: &str, output: &Output, expected: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{what}: succeeded");
    assert_eq!(stderr.lines().count(), 1, "{what}: one line on stderr, got {stderr:?}");
    assert!(stderr.starts_with("sluice: "), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    for needle in expected {
        assert!(stderr.contains(needle), "{what}: `{needle}` not in {stderr}");
    }
    assert!(
        output.stdout.is_empty(),
        "{what}: printed {:?}",
        String::from_utf8_lossy(&output.stdout)
    );
    stderr
}

/// Routes and inspects a checkpoint that `break_it` damaged: both commands must refuse it, and
/// route must leave no file behind.
fn refuse_broken_checkpoint(what: &str, expected: &[&str], break_it: impl FnOnce(&Scratch)) {
    let scratch = Scratch::new(3);
    break_it(&scratch);
    let before = scratch.files();
    assert_refused(what, &scratch.route(&[]), expected);
    assert_eq!(scratch.files(), before, "{what}: route left files behind");
    let inspect = sluice(&["inspect", scratch.ckpt().to_str().unwrap()]);
    assert_refused(&format!("{what} (inspect)"), &inspect, expected);
}

#[test]
fn a_valid_checkpoint_routes() {
    let scratch = Scratch::new(3);
    let out = scratch.route(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(scratch.path("out.safetensors").exists());
}

#[test]
fn malformed_safetensors_checkpoints_are_refused() {
    let good = serialize(&gate_tensors());
    let len = good.len();
    refuse_broken_checkpoint("truncated file", &["model.safetensors", "malformed"], |s| {
        s.write("ckpt/model.safetensors", &good[..len - 3]);
    });
    refuse_broken_checkpoint("header length past the end", &["model.safetensors"], |s| {
        let mut bytes = good.clone();
        bytes[..8].copy_from_slice(&(len as u64).to_le_bytes());
        s.write("ckpt/model.safetensors", &bytes);
    });
    refuse_broken_checkpoint("header not JSON", &["model.safetensors", "JSON"], |s| {
        s.write("ckpt/model.safetensors", &raw_safetensors("{this is not json}", &[]));
    });
    let weight = format!(r#""{GATE}":{{"dtype":"F32","shape":[8,4],"data_offsets":[0,128]}}"#);
    refuse_broken_checkpoint("offsets out of range", &["model.safetensors", BIAS], |s| {
        let header = format!(
            r#"{{{weight},"{BIAS}":{{"dtype":"F32","shape":[8],"data_offsets":[128,160]}}}}"#
        );
        s.write("ckpt/model.safetensors", &raw_safetensors(&header, &[0; 140]));
    });
    refuse_broken_checkpoint("overlapping offsets", &["model.safetensors", BIAS], |s| {
        let header = format!(
            r#"{{{weight},"{BIAS}":{{"dtype":"F32","shape":[8],"data_offsets":[100,132]}}}}"#
        );
        s.write("ckpt/model.safetensors", &raw_safetensors(&header, &[0; 132]));
    });
    refuse_broken_checkpoint("dtype/shape vs byte length", &["model.safetensors", BIAS], |s| {
        let header = format!(
            r#"{{{weight},"{BIAS}":{{"dtype":"F32","shape":[9],"data_offsets":[128,160]}}}}"#
        );
        s.write("ckpt/model.safetensors", &raw_safetensors(&header, &[0; 160]));
    });
}

/// Splits the checkpoint into two shards (weight, bias) with an index, then lets `edit` break it.
fn shard(s: &Scratch, index: &str) {
    std::fs::remove_file(s.path("ckpt/model.safetensors")).unwrap();
    let [weight, bias] = gate_tensors();
    s.write("ckpt/model-00001-of-00002.safetensors", &serialize(&[weight]));
    s.write("ckpt/model-00002-of-00002.safetensors", &serialize(&[bias]));
    s.write("ckpt/model.safetensors.index.json", index.as_bytes());
}

#[test]
fn broken_shard_indexes_are_refused() {
    let index = |weight_shard: &str, bias_shard: &str| {
        format!(r#"{{"weight_map": {{"{GATE}": "{weight_shard}", "{BIAS}": "{bias_shard}"}}}}"#)
    };
    let (first, second) = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors");
    let valid = Scratch::new(3);
    shard(&valid, &index(first, second));
    assert!(valid.route(&[]).status.success(), "the sharded checkpoint itself is valid");

    refuse_broken_checkpoint(
        "index naming a missing shard",
        &["model.safetensors.index.json", "model-00003-of-00003.safetensors", "does not exist"],
        |s| shard(s, &index(first, "model-00003-of-00003.safetensors")),
    );
    refuse_broken_checkpoint(
        "index mapping a tensor to a shard that lacks it",
        &["model.safetensors.index.json", BIAS, first],
        |s| shard(s, &index(first, first)),
    );
}

#[test]
fn broken_configs_are_refused() {
    let cases = [
        ("missing hidden_size", r#""hidden_size": 4,"#, "", &["config.json", "hidden_size"][..]),
        (
            "wrong type",
            r#""n_group": 4,"#,
            r#""n_group": "4","#,
            &["config.json", "n_group", "\"4\""][..],
        ),
        (
            "inconsistent groups",
            r#""n_group": 4,"#,
            r#""n_group": 3,"#,
            &["config.json", "n_group", "3", "not divisible"][..],
        ),
    ];
    for (what, from, to, expected) in cases {
        let config = CONFIG.replace(from, to);
        assert_ne!(config, CONFIG, "{what}");
        refuse_broken_checkpoint(what, expected, |s| {
            s.write("ckpt/config.json", config.as_bytes())
        });
    }
}

#[test]
fn hidden_states_with_infinities_fail_by_default_and_can_be_marked_invalid() {
    let scratch = Scratch::new(3);
    let mut hidden: Vec<f32> = (0..3 * HIDDEN).map(|i| i as f32 / 10.0).collect();
    hidden[HIDDEN + 1] = f32::INFINITY;
    scratch.write_input(&hidden, 3, HIDDEN);
    assert_refused("inf", &scratch.route(&[]), &["row 1"]);
    assert_eq!(scratch.files(), ["ckpt/config.json", "ckpt/model.safetensors", "in.safetensors"]);
    let marked = scratch.route(&["--mark-invalid"]);
    assert!(marked.status.success(), "{}", String::from_utf8_lossy(&marked.stderr));
    let bytes = std::fs::read(scratch.path("out.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<i32> = file
        .tensor("topk_ids")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ids[TOP_K..2 * TOP_K], [-1, -1]);
    assert!(
        ids[..TOP_K].iter().chain(&ids[2 * TOP_K..]).all(|&i| (0..EXPERTS as i32).contains(&i))
    );
}

#[test]
fn hidden_states_of_the_wrong_size_name_the_layer_once() {
    let scratch = Scratch::new(2);
    scratch.write_input(&[0.5; 2 * (HIDDEN + 1)], 2, HIDDEN + 1);
    let stderr = assert_refused("wrong H", &scratch.route(&[]), &["hidden states have shape"]);
    assert_eq!(stderr.matches("layer 1").count(), 1, "{stderr}");
    assert!(!scratch.path("out.safetensors").exists());
}

#[test]
fn zero_tokens_write_valid_empty_outputs() {
    let scratch = Scratch::new(0);
    let out = scratch.route(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(scratch.path("out.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, dtype) in [("topk_ids", Dtype::I32), ("topk_weights", Dtype::F32)] {
        let view = file.tensor(name).unwrap();
        assert_eq!((view.dtype(), view.shape()), (dtype, &[0, TOP_K][..]), "{name}");
        assert!(view.data().is_empty());
    }
}

#[test]
fn more_tokens_than_max_tokens_are_refused() {
    let scratch = Scratch::new(5);
    let out = scratch.route(&["--max-tokens", "4"]);
    assert_refused("route", &out, &["5 tokens exceed the limit of 4"]);
    assert!(!scratch.path("out.safetensors").exists());
    assert!(scratch.route(&["--max-tokens", "5"]).status.success(), "the bound itself routes");

    // demo and bench make their own hidden states: they refuse before allocating them.
    let demo = sluice(&["demo", "--tokens", "1000000000000", "--max-tokens", "4"]);
    assert_refused("demo", &demo, &["demo: 1000000000000 tokens exceed the limit of 4"]);
    let bench = sluice(&["bench", "--model", "v2-lite", "--tokens", "1,5", "--max-tokens", "4"]);
    assert_refused("bench", &bench, &["bench: 5 tokens exceed the limit of 4"]);
    assert_refused("zero bound", &sluice(&["demo", "--max-tokens", "0"]), &["max_tokens"]);
}

/// The peak memory that `-v` logged, in MiB.
fn peak_memory_mib(what: &str, output: &Output) -> f64 {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr.lines().find(|l| l.contains("peak memory"));
    let line = line.unwrap_or_else(|| panic!("{what}: no peak memory line in {stderr}"));
    line.split("peak_rss_mib=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("{what}: no number in {line}"))
}

#[test]
fn verbose_demo_and_route_report_peak_memory() {
    let demo = sluice(&["-v", "demo", "--tokens", "4", "--show", "0"]);
    assert!(demo.status.success(), "{}", String::from_utf8_lossy(&demo.stderr));
    let scratch = Scratch::new(3);
    let route = scratch.route(&["-v"]);
    assert!(route.status.success(), "{}", String::from_utf8_lossy(&route.stderr));
    for (what, output) in [("demo", &demo), ("route", &route)] {
        let mib = peak_memory_mib(what, output);
        assert!(mib > 1.0 && mib < 4096.0, "{what}: {mib} MiB");
    }
    let quiet = scratch.route(&[]);
    assert!(quiet.stderr.is_empty(), "without -v nothing is logged");
}

/// Copies a fixture checkpoint into `dir`.
fn copy_fixture(name: &str, dir: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/testdata").join(name);
    std::fs::create_dir(dir).unwrap();
    for entry in std::fs::read_dir(fixture).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
}

#[test]
fn a_source_shard_cut_in_half_fails_extraction_with_one_line_and_no_output() {
    for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        let scratch = Scratch::new(1);
        let source = scratch.path("v3");
        copy_fixture("v3", &source);
        let bytes = std::fs::read(source.join(shard)).unwrap();
        std::fs::write(source.join(shard), &bytes[..bytes.len() / 2]).unwrap();
        let before = scratch.files();
        let output = scratch.path("gates");
        let out = sluice(&[
            "extract-gates",
            "--checkpoint",
            source.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        assert_refused(shard, &out, &[shard, "malformed"]);
        assert_eq!(scratch.files(), before, "{shard}: files left behind");
        let names: Vec<_> = std::fs::read_dir(scratch.dir.path()).unwrap().collect();
        assert_eq!(names.len(), 3, "{shard}: ckpt, in.safetensors, v3 and no hidden folder");
    }
}

/// A V3-routed single-file checkpoint with `layers` MoE layers whose gate weights are f32
/// `[8, hidden]`, each beside an expert decoy of the same size that must not be read.
fn wide_checkpoint(dir: &Path, layers: usize, hidden: usize) {
    std::fs::create_dir(dir).unwrap();
    let config = CONFIG
        .replace("\"hidden_size\": 4", &format!("\"hidden_size\": {hidden}"))
        .replace("\"num_hidden_layers\": 2", &format!("\"num_hidden_layers\": {}", layers + 1));
    std::fs::write(dir.join("config.json"), config).unwrap();
    let weight: Vec<f32> = (0..EXPERTS * hidden).map(|i| (i % 13) as f32 * 0.01).collect();
    let names: Vec<(String, Vec<f32>, Vec<usize>)> = (1..=layers)
        .flat_map(|layer| {
            let gate = format!("model.layers.{layer}.mlp");
            [
                (format!("{gate}.gate.weight"), weight.clone(), vec![EXPERTS, hidden]),
                (
                    format!("{gate}.experts.0.gate_proj.weight"),
                    weight.clone(),
                    vec![EXPERTS, hidden],
                ),
                (
                    format!("{gate}.gate.e_score_correction_bias"),
                    vec![0.01; EXPERTS],
                    vec![EXPERTS],
                ),
            ]
        })
        .collect();
    let tensors: Vec<(&str, Vec<f32>, Vec<usize>)> =
        names.iter().map(|(n, v, s)| (n.as_str(), v.clone(), s.clone())).collect();
    std::fs::write(dir.join("model.safetensors"), serialize(&tensors)).unwrap();
}

#[test]
fn extraction_needs_memory_for_the_largest_gate_tensor_not_for_all_of_them() {
    const LAYERS: usize = 6;
    const WIDE: usize = 256 * 1024; // an 8 MiB f32 gate weight per layer, 48 MiB in all
    let scratch = Scratch::new(1);
    let extract_peak = |name: &str| {
        let out = sluice(&[
            "-v",
            "extract-gates",
            "--checkpoint",
            scratch.path(name).to_str().unwrap(),
            "--output",
            scratch.path(&format!("{name}-gates")).to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        peak_memory_mib(name, &out)
    };
    wide_checkpoint(&scratch.path("narrow"), LAYERS, HIDDEN);
    wide_checkpoint(&scratch.path("wide"), LAYERS, WIDE);
    let baseline = extract_peak("narrow");
    let peak = extract_peak("wide");
    let largest_tensor_mib = (EXPERTS * WIDE * 4) as f64 / (1 << 20) as f64;
    let small_constant_mib = 4.0;
    assert!(
        peak - baseline < largest_tensor_mib + small_constant_mib,
        "extracting {LAYERS} gates of {largest_tensor_mib} MiB took {peak} MiB at peak, the same \
         command on tiny gates {baseline} MiB"
    );
}
