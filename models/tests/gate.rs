//! MoeGate: loading from checkpoints, the grad-requiring parameter at the DLPack bridge, and
//! routing through a backend.

mod common;

use std::fs;

use common::{ReferenceBackend, bf16_bytes, f32_bytes, write_safetensors};
use half::bf16;
use safetensors::Dtype;
use sluice_models::reference::{self, Routing};
use sluice_models::{Checkpoint, GateTensorNames, ModelError, MoeGate};
use sluice_tensor::{BackendError, DlpackError, NonFinitePolicy, Tensor};
use tempfile::TempDir;

const EXPERTS: usize = 8;
const HIDDEN: usize = 4;

/// A V3-style model: layer 0 dense, layers 1 and 2 MoE with 8 experts in 4 groups.
const V3_CONFIG: &str = r#"{"model_type": "deepseek_v3", "hidden_size": 4, "num_hidden_layers": 3,
    "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4,
    "topk_group": 2, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "norm_topk_prob": true, "routed_scaling_factor": 2.5}"#;

type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

fn gate_weight(layer: usize) -> Vec<f32> {
    (0..EXPERTS * HIDDEN).map(|i| ((i * 7 + layer * 5) % 11) as f32 / 8.0 - 0.6).collect()
}

fn gate_bias(layer: usize) -> Vec<f32> {
    (0..EXPERTS).map(|e| (e as f32 - 3.5) * 0.013 + layer as f32 * 0.001).collect()
}

fn entry(name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Entry {
    (name.to_owned(), dtype, shape.to_vec(), bytes)
}

/// The gate tensors of `layer` under `prefix`, plus the decoys a real checkpoint holds.
fn layer_entries(prefix: &str, layer: usize) -> Vec<Entry> {
    let p = format!("{prefix}{layer}.mlp");
    vec![
        entry(
            &format!("{p}.gate.weight"),
            Dtype::BF16,
            &[EXPERTS, HIDDEN],
            bf16_bytes(&gate_weight(layer)),
        ),
        entry(
            &format!("{p}.gate.e_score_correction_bias"),
            Dtype::F32,
            &[EXPERTS],
            f32_bytes(&gate_bias(layer)),
        ),
        entry(
            &format!("{p}.experts.0.gate_proj.weight"),
            Dtype::BF16,
            &[2, HIDDEN],
            bf16_bytes(&[9.0; 8]),
        ),
        entry(
            &format!("{p}.shared_experts.gate_proj.weight"),
            Dtype::BF16,
            &[2, HIDDEN],
            bf16_bytes(&[9.0; 8]),
        ),
    ]
}

fn v3_entries() -> Vec<Entry> {
    let mut entries = vec![entry(
        "model.layers.0.mlp.gate_proj.weight",
        Dtype::BF16,
        &[2, HIDDEN],
        bf16_bytes(&[9.0; 8]),
    )];
    entries.extend(layer_entries("model.layers.", 1));
    entries.extend(layer_entries("model.layers.", 2));
    entries
}

fn checkpoint_dir(config: &str, entries: &[Entry]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("config.json"), config).unwrap();
    let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> =
        entries.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone())).collect();
    write_safetensors(&dir.path().join("model.safetensors"), &refs);
    dir
}

fn v3_gate(layer: usize) -> (TempDir, MoeGate) {
    let dir = checkpoint_dir(V3_CONFIG, &v3_entries());
    let gate = MoeGate::load(&Checkpoint::open(dir.path()).unwrap(), layer).unwrap();
    (dir, gate)
}

fn hidden_values(tokens: usize) -> Vec<f32> {
    (0..tokens * HIDDEN).map(|i| ((i * 13) % 17) as f32 / 4.0 - 2.0).collect()
}

/// What the gate should compute, straight from the reference router.
fn expected_routing(gate: &MoeGate, hidden: &[f32], tokens: usize) -> Routing {
    let weight: Vec<f32> =
        gate.weight().to_vec::<bf16>().unwrap().into_iter().map(f32::from).collect();
    let logits = reference::router_logits(hidden, &weight, tokens, HIDDEN, EXPERTS).unwrap();
    let bias = gate.bias().map(|b| b.to_vec::<f32>().unwrap());
    reference::route(&logits, tokens, bias.as_deref(), gate.spec()).unwrap()
}

#[test]
fn the_gate_weight_is_a_parameter_the_bridge_refuses() {
    let (_dir, gate) = v3_gate(1);
    assert!(gate.weight().requires_grad(), "loaded like a training framework's nn.Parameter");
    // The original bug: exporting the parameter itself.
    assert_eq!(gate.weight().to_dlpack().err(), Some(DlpackError::RequiresGrad));
    let row = gate.weight().narrow(0, 0, 1).unwrap();
    assert_eq!(row.to_dlpack().err(), Some(DlpackError::RequiresGrad), "views keep the flag");
    assert!(gate.weight().detach().to_dlpack().is_ok());
}

#[test]
fn routing_with_grad_requiring_weight_and_hidden_states_succeeds() {
    let (_dir, gate) = v3_gate(1);
    let backend = ReferenceBackend::default();
    let tokens = 5;
    let values = hidden_values(tokens);
    let hidden =
        Tensor::from_vec(values.clone(), &[tokens, HIDDEN]).unwrap().with_requires_grad(true);
    assert_eq!(hidden.to_dlpack().err(), Some(DlpackError::RequiresGrad));

    let routing = gate.route(&backend, &hidden).unwrap();
    assert_eq!(routing.to_routing().unwrap(), expected_routing(&gate, &values, tokens));
    assert_eq!((routing.tokens(), routing.top_k()), (tokens, 2));
    reference::check_sorted(&routing.to_routing().unwrap()).unwrap();
    assert!(
        hidden.requires_grad() && gate.weight().requires_grad(),
        "the caller's tensors are untouched"
    );

    // Detaching copied nothing: the backend read the very same memory.
    let received = backend.received();
    let weight_address = gate.weight().data_ptr() as usize;
    let bias_address = gate.bias().unwrap().data_ptr() as usize;
    let hidden_address = hidden.data_ptr() as usize;
    assert_eq!(received, vec![weight_address, bias_address, hidden_address]);
}

#[test]
fn a_prepared_gate_routes_many_times() {
    let (_dir, gate) = v3_gate(2);
    let backend = ReferenceBackend::default();
    let prepared = gate.prepare(&backend).unwrap();
    assert_eq!((prepared.layer(), prepared.hidden_size()), (2, HIDDEN));
    assert_eq!(prepared.spec(), gate.spec());
    for tokens in [1, 3, 7] {
        let values = hidden_values(tokens);
        let hidden = Tensor::from_vec(values.clone(), &[tokens, HIDDEN]).unwrap();
        let routing = prepared.route(&hidden).unwrap().to_routing().unwrap();
        assert_eq!(routing, expected_routing(&gate, &values, tokens));
    }
}

#[test]
fn router_gemm_gives_the_reference_logits() {
    let (_dir, gate) = v3_gate(1);
    let backend = ReferenceBackend::default();
    let values = hidden_values(3);
    let hidden = Tensor::from_vec(values.clone(), &[3, HIDDEN]).unwrap().with_requires_grad(true);
    let weight: Vec<f32> =
        gate.weight().to_vec::<bf16>().unwrap().into_iter().map(f32::from).collect();
    let expected = reference::router_logits(&values, &weight, 3, HIDDEN, EXPERTS).unwrap();
    let one_off = gate.router_gemm(&backend, &hidden).unwrap();
    assert_eq!(one_off.shape(), &[3, EXPERTS]);
    assert_eq!(one_off.to_vec::<f32>().unwrap(), expected);
    let prepared = gate.prepare(&backend).unwrap().router_gemm(&hidden).unwrap();
    assert_eq!(prepared.to_vec::<f32>().unwrap(), expected);
}

#[test]
fn zero_tokens_route_to_empty_outputs() {
    let (_dir, gate) = v3_gate(1);
    let hidden = Tensor::from_vec(Vec::<f32>::new(), &[0, HIDDEN]).unwrap();
    let routing = gate.route(&ReferenceBackend::default(), &hidden).unwrap();
    assert_eq!(routing.ids().shape(), &[0, 2]);
    assert_eq!(routing.weights().shape(), &[0, 2]);
}

#[test]
fn load_all_loads_every_moe_layer() {
    let dir = checkpoint_dir(V3_CONFIG, &v3_entries());
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let gates = MoeGate::load_all(&checkpoint).unwrap();
    assert_eq!(gates.iter().map(MoeGate::layer).collect::<Vec<_>>(), vec![1, 2]);
    for gate in &gates {
        assert_eq!(gate.spec(), checkpoint.config().routing());
        assert_eq!((gate.num_experts(), gate.hidden_size()), (EXPERTS, HIDDEN));
        let bias = gate.bias().unwrap();
        assert!(bias.is_read_only(), "an f32 bias is a zero-copy view of the file");
        assert_eq!(bias.to_vec::<f32>().unwrap(), gate_bias(gate.layer()));
        let weight: Vec<f32> =
            gate.weight().to_vec::<bf16>().unwrap().into_iter().map(f32::from).collect();
        let stored: Vec<f32> =
            gate_weight(gate.layer()).iter().map(|&w| bf16::from_f32(w).into()).collect();
        assert_eq!(weight, stored, "the gate, not a gate_proj decoy");
    }
}

#[test]
fn layers_without_a_gate_are_refused() {
    let dir = checkpoint_dir(V3_CONFIG, &v3_entries());
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let err = MoeGate::load(&checkpoint, 0).unwrap_err();
    assert!(
        matches!(err, ModelError::DenseLayer { layer: 0, first_k_dense_replace: 1, .. }),
        "{err}"
    );
    let err = MoeGate::load(&checkpoint, 3).unwrap_err();
    assert!(matches!(err, ModelError::LayerOutOfRange { layer: 3, num_layers: 3, .. }), "{err}");

    let mut entries = v3_entries();
    entries.retain(|(name, ..)| !name.starts_with("model.layers.2.mlp.gate."));
    let dir = checkpoint_dir(V3_CONFIG, &entries);
    let err = MoeGate::load(&Checkpoint::open(dir.path()).unwrap(), 2).unwrap_err();
    assert!(matches!(err, ModelError::MissingGate { layer: 2, .. }), "{err}");
    assert!(err.to_string().contains("model.layers.2.mlp.gate.weight"), "{err}");
}

fn load_modified(config: &str, edit: impl FnOnce(&mut Vec<Entry>)) -> ModelError {
    let mut entries = v3_entries();
    edit(&mut entries);
    let dir = checkpoint_dir(config, &entries);
    MoeGate::load(&Checkpoint::open(dir.path()).unwrap(), 1).unwrap_err()
}

fn replace(entries: &mut [Entry], name: &str, new: Entry) {
    let slot = entries.iter_mut().find(|(n, ..)| n == name).unwrap();
    *slot = new;
}

#[test]
fn bad_gate_tensors_are_refused_with_their_names() {
    let weight = "model.layers.1.mlp.gate.weight";
    let bias = "model.layers.1.mlp.gate.e_score_correction_bias";
    let err = load_modified(V3_CONFIG, |e| {
        replace(e, weight, entry(weight, Dtype::BF16, &[EXPERTS, 5], bf16_bytes(&[0.0; 40])));
    });
    assert!(
        matches!(&err, ModelError::GateShape { expected, .. } if expected == &[EXPERTS, HIDDEN]),
        "{err}"
    );
    assert!(err.to_string().contains(weight), "{err}");

    let err = load_modified(V3_CONFIG, |e| {
        replace(e, weight, entry(weight, Dtype::F16, &[EXPERTS, HIDDEN], vec![0; 64]));
    });
    assert!(matches!(err, ModelError::GateDType { .. }), "{err}");
    assert!(err.to_string().contains(weight) && err.to_string().contains("f16"), "{err}");

    let err = load_modified(V3_CONFIG, |e| e.retain(|(n, ..)| n != bias));
    assert!(matches!(&err, ModelError::MissingBias { tensor, .. } if tensor == bias), "{err}");

    let err = load_modified(V3_CONFIG, |e| {
        replace(e, bias, entry(bias, Dtype::F32, &[EXPERTS - 1], f32_bytes(&[0.0; 7])));
    });
    assert!(matches!(&err, ModelError::GateShape { tensor, .. } if tensor == bias), "{err}");

    let err = load_modified(V3_CONFIG, |e| {
        replace(e, bias, entry(bias, Dtype::I32, &[EXPERTS], vec![0; 32]));
    });
    assert!(matches!(err, ModelError::GateDType { .. }), "{err}");

    // A V2 config with a V3 checkpoint: the bias has no place in softmax routing.
    let v2 = V3_CONFIG
        .replace("deepseek_v3", "deepseek_v2")
        .replace("noaux_tc", "group_limited_greedy")
        .replace("sigmoid", "softmax");
    let err = load_modified(&v2, |_| {});
    assert!(matches!(&err, ModelError::UnexpectedBias { tensor, .. } if tensor == bias), "{err}");
}

#[test]
fn a_half_precision_bias_is_widened_exactly_to_f32() {
    let bias = "model.layers.1.mlp.gate.e_score_correction_bias";
    let mut entries = v3_entries();
    replace(&mut entries, bias, entry(bias, Dtype::BF16, &[EXPERTS], bf16_bytes(&gate_bias(1))));
    let dir = checkpoint_dir(V3_CONFIG, &entries);
    let gate = MoeGate::load(&Checkpoint::open(dir.path()).unwrap(), 1).unwrap();
    let loaded = gate.bias().unwrap().to_vec::<f32>().unwrap();
    let stored: Vec<f32> = gate_bias(1).iter().map(|&b| bf16::from_f32(b).into()).collect();
    assert_eq!(loaded, stored);
}

#[test]
fn kimi_k2_5_checkpoints_prefix_the_language_model() {
    let kimi = r#"{"model_type": "kimi_k25", "text_config": {"model_type": "kimi_k2",
        "hidden_size": 4, "num_hidden_layers": 2, "first_k_dense_replace": 1,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
        "routed_scaling_factor": 2.827}}"#;
    for prefix in ["language_model.model.layers.", "model.language_model.layers."] {
        let dir = checkpoint_dir(kimi, &layer_entries(prefix, 1));
        let gates = MoeGate::load_all(&Checkpoint::open(dir.path()).unwrap()).unwrap();
        assert_eq!(gates.len(), 1, "{prefix}");
        assert_eq!(gates[0].bias().unwrap().to_vec::<f32>().unwrap(), gate_bias(1));
    }
    let dir = checkpoint_dir(kimi, &layer_entries("model.layers.", 1));
    let err = MoeGate::load(&Checkpoint::open(dir.path()).unwrap(), 1).unwrap_err();
    assert!(matches!(err, ModelError::MissingGate { .. }), "{err}");
}

#[test]
fn the_gate_tensor_names_are_those_of_the_convention_the_checkpoint_uses() {
    let kimi = r#"{"model_type": "kimi_k25", "text_config": {"model_type": "kimi_k2",
        "hidden_size": 4, "num_hidden_layers": 2, "first_k_dense_replace": 1,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1}}"#;
    let dir = checkpoint_dir(kimi, &layer_entries("model.language_model.layers.", 1));
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let candidates = GateTensorNames::candidates(checkpoint.config(), 1);
    assert_eq!(candidates.len(), 2, "both Kimi-K2.5 conventions are looked for");
    let names = MoeGate::find_tensor_names(&checkpoint, 1).unwrap();
    assert_eq!(names, candidates[1]);
    assert_eq!(
        names.all(),
        [
            "model.language_model.layers.1.mlp.gate.weight",
            "model.language_model.layers.1.mlp.gate.e_score_correction_bias"
        ]
    );
    for name in names.all() {
        assert!(checkpoint.contains(name).unwrap(), "{name}");
    }
    let err = MoeGate::find_tensor_names(&checkpoint, 0).unwrap_err();
    assert!(matches!(err, ModelError::DenseLayer { layer: 0, .. }), "{err}");

    let text_model = checkpoint_dir(V3_CONFIG, &[]);
    let text_model = Checkpoint::open(text_model.path()).unwrap();
    let err = MoeGate::find_tensor_names(&text_model, 2).unwrap_err();
    let ModelError::MissingGate { layer: 2, tried, .. } = err else { panic!("{err}") };
    assert_eq!(tried, ["model.layers.2.mlp.gate.weight"]);
}

#[test]
fn scaling_can_be_left_to_the_caller() {
    let (_dir, gate) = v3_gate(1);
    let backend = ReferenceBackend::default();
    let hidden = Tensor::from_vec(hidden_values(4), &[4, HIDDEN]).unwrap();
    let scaled = gate.route(&backend, &hidden).unwrap().to_routing().unwrap();
    let gate = gate.with_apply_scaling(false);
    assert!(!gate.spec().apply_scaling);
    let unscaled = gate.route(&backend, &hidden).unwrap().to_routing().unwrap();
    assert_eq!(scaled.ids(), unscaled.ids());
    for (s, u) in scaled.weights().iter().zip(unscaled.weights()) {
        assert_eq!(*s, u * 2.5);
    }
}

#[test]
fn non_finite_hidden_states_fail_or_mark_their_row() {
    let (_dir, gate) = v3_gate(1);
    let backend = ReferenceBackend::default();
    let mut values = hidden_values(3);
    values[HIDDEN + 2] = f32::NAN;
    let hidden = Tensor::from_vec(values.clone(), &[3, HIDDEN]).unwrap();
    let err = gate.route(&backend, &hidden).unwrap_err();
    assert!(matches!(err, ModelError::Backend(BackendError::NonFinite { row: 1, .. })), "{err}");

    let gate = gate.with_non_finite(NonFinitePolicy::MarkInvalid);
    let routing = gate.route(&backend, &hidden).unwrap().to_routing().unwrap();
    let rows: Vec<_> = routing.rows().collect();
    assert_eq!(rows[1], (&[-1, -1][..], &[0.0, 0.0][..]));
    let clean = Tensor::from_vec(values[..HIDDEN].to_vec(), &[1, HIDDEN]).unwrap();
    let first = gate.route(&backend, &clean).unwrap().to_routing().unwrap();
    assert_eq!(rows[0], (first.ids(), first.weights()));
}

#[test]
fn hidden_states_of_the_wrong_shape_are_refused() {
    let (_dir, gate) = v3_gate(1);
    let backend = ReferenceBackend::default();
    for shape in [&[2, HIDDEN + 1][..], &[2 * HIDDEN][..], &[1, 2, HIDDEN][..]] {
        let count = shape.iter().product();
        let hidden = Tensor::from_vec(vec![0.0f32; count], shape).unwrap();
        let err = gate.route(&backend, &hidden).unwrap_err();
        assert!(matches!(err, ModelError::HiddenShape { layer: 1, .. }), "{shape:?}: {err}");
        let err = gate.router_gemm(&backend, &hidden).unwrap_err();
        assert!(matches!(err, ModelError::HiddenShape { .. }), "{shape:?}: {err}");
    }
}

#[test]
fn bf16_hidden_states_route() {
    let (_dir, gate) = v3_gate(1);
    let values: Vec<f32> = hidden_values(4).iter().map(|&v| bf16::from_f32(v).into()).collect();
    let as_bf16: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    let hidden = Tensor::from_vec(as_bf16, &[4, HIDDEN]).unwrap().with_requires_grad(true);
    let routing = gate.route(&ReferenceBackend::default(), &hidden).unwrap().to_routing().unwrap();
    assert_eq!(routing, expected_routing(&gate, &values, 4));
}

#[test]
fn a_backend_breaking_the_output_contract_is_caught() {
    let (_dir, gate) = v3_gate(1);
    let backend = ReferenceBackend { break_output_shape: true, ..Default::default() };
    let hidden = Tensor::from_vec(hidden_values(2), &[2, HIDDEN]).unwrap();
    let err = gate.route(&backend, &hidden).unwrap_err();
    assert!(matches!(err, ModelError::BackendOutput { output: "topk_ids", .. }), "{err}");
    assert!(err.to_string().contains("reference"), "{err}");
}

#[test]
fn gates_from_tensors_in_memory_are_validated() {
    use sluice_models::{ModelError, MoeGate};
    use sluice_tensor::{RoutingSpec, ScoringFunc, Tensor, TopkMethod};
    let spec = RoutingSpec::builder(8, 2)
        .scoring(ScoringFunc::Sigmoid)
        .method(TopkMethod::NoauxTc)
        .groups(2, 1)
        .norm_topk_prob(true)
        .routed_scaling_factor(2.5)
        .build()
        .unwrap();
    let weight = || Tensor::from_vec(vec![0.25f32; 8 * 4], &[8, 4]).unwrap();
    let bias = || Some(Tensor::from_vec(vec![0.0f32; 8], &[8]).unwrap());
    let gate = MoeGate::new(5, spec, weight(), bias()).unwrap();
    assert_eq!((gate.layer(), gate.hidden_size(), gate.num_experts()), (5, 4, 8));
    assert!(gate.weight().requires_grad(), "held as a parameter");

    let part = |r: Result<MoeGate, ModelError>| match r {
        Err(ModelError::GatePart { part, .. }) => part,
        other => panic!("expected GatePart, got {other:?}"),
    };
    let wrong_experts = Tensor::from_vec(vec![0.0f32; 7 * 4], &[7, 4]).unwrap();
    assert_eq!(part(MoeGate::new(0, spec, wrong_experts, bias())), "weight");
    let ints = Tensor::from_vec(vec![0i32; 8 * 4], &[8, 4]).unwrap();
    assert_eq!(part(MoeGate::new(0, spec, ints, bias())), "weight");
    assert_eq!(part(MoeGate::new(0, spec, weight(), None)), "bias");
    let short_bias = Some(Tensor::from_vec(vec![0.0f32; 4], &[4]).unwrap());
    assert_eq!(part(MoeGate::new(0, spec, weight(), short_bias)), "bias");
    let mut bad = spec;
    bad.topk_group = 3;
    assert!(MoeGate::new(0, bad, weight(), bias()).is_err());
}

/// One MoE layer (layer 0) of each newer family, under its released tensor names: the weight,
/// the bias where the family has one, and whether that bias is refused or required.
#[test]
fn newer_families_load_their_gates_under_their_own_names() {
    let weight =
        |name: &str| entry(name, Dtype::BF16, &[EXPERTS, HIDDEN], bf16_bytes(&gate_weight(0)));
    let bias = |name: &str| entry(name, Dtype::F32, &[EXPERTS], f32_bytes(&gate_bias(0)));
    let sizes = r#""hidden_size": 4, "num_hidden_layers": 1, "num_experts_per_tok": 2"#;
    let cases = [
        (
            format!(
                r#"{{"model_type": "glm4_moe", "first_k_dense_replace": 0,
                       "n_routed_experts": 8, {sizes}}}"#
            ),
            "model.layers.0.mlp.gate.weight",
            Some("model.layers.0.mlp.gate.e_score_correction_bias"),
        ),
        (
            format!(r#"{{"model_type": "gpt_oss", "num_local_experts": 8, {sizes}}}"#),
            "model.layers.0.mlp.router.weight",
            Some("model.layers.0.mlp.router.bias"),
        ),
        (
            format!(r#"{{"model_type": "minimax_m2", "num_local_experts": 8, {sizes}}}"#),
            "model.layers.0.block_sparse_moe.gate.weight",
            Some("model.layers.0.block_sparse_moe.e_score_correction_bias"),
        ),
        (
            format!(
                r#"{{"model_type": "llama4", "text_config": {{"model_type": "llama4_text",
                       "num_local_experts": 8, {sizes}}}}}"#
            ),
            "language_model.model.layers.0.feed_forward.router.weight",
            None,
        ),
        (
            format!(r#"{{"model_type": "llama4_text", "num_local_experts": 8, {sizes}}}"#),
            "model.layers.0.feed_forward.router.weight",
            None,
        ),
    ];
    for (config, weight_name, bias_name) in cases {
        let mut entries = vec![weight(weight_name)];
        entries.extend(bias_name.map(bias));
        let dir = checkpoint_dir(&config, &entries);
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let names = MoeGate::find_tensor_names(&checkpoint, 0).unwrap();
        assert_eq!(names.weight, weight_name);
        let gate = MoeGate::load(&checkpoint, 0).unwrap();
        let loaded_bias = gate.bias().map(|b| b.to_vec::<f32>().unwrap());
        assert_eq!(loaded_bias, bias_name.map(|_| gate_bias(0)), "{weight_name}");
        // The gate routes as the reference does, bias included.
        let hidden = hidden_values(5);
        let tensor = Tensor::from_vec(hidden.clone(), &[5, HIDDEN]).unwrap();
        let routed = gate.route(&ReferenceBackend::default(), &tensor).unwrap();
        assert_eq!(routed.to_routing().unwrap(), expected_routing(&gate, &hidden, 5));

        match bias_name {
            // A family with a bias needs it.
            Some(_) => {
                let dir = checkpoint_dir(&config, &[weight(weight_name)]);
                let err = MoeGate::load(&Checkpoint::open(dir.path()).unwrap(), 0).unwrap_err();
                assert!(matches!(err, ModelError::MissingBias { .. }), "{err}");
            }
            // Llama 4's router has none: one in the checkpoint is refused.
            None => {
                let stray = weight_name.replace(".weight", ".bias");
                let dir = checkpoint_dir(&config, &[weight(weight_name), bias(&stray)]);
                let err = MoeGate::load(&Checkpoint::open(dir.path()).unwrap(), 0).unwrap_err();
                assert!(matches!(err, ModelError::UnexpectedBias { .. }), "{err}");
            }
        }
    }
}
