use super::*;

/// DeepSeek-V2-Lite-Chat as its authors wrote it (routing-relevant fields plus some others).
const V2_LITE: &str = r#"{
  "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
  "hidden_size": 2048, "num_hidden_layers": 27, "first_k_dense_replace": 1, "moe_layer_freq": 1,
  "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
  "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax",
  "norm_topk_prob": false, "routed_scaling_factor": 1.0, "q_lora_rank": null,
  "torch_dtype": "bfloat16", "transformers_version": "4.33.1"
}"#;

/// DeepSeek-V2 (and V2.5, which shares the routing fields).
const V2: &str = r#"{
  "model_type": "deepseek_v2", "hidden_size": 5120, "num_hidden_layers": 60,
  "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 160, "n_shared_experts": 2,
  "num_experts_per_tok": 6, "n_group": 8, "topk_group": 3, "topk_method": "group_limited_greedy",
  "scoring_func": "softmax", "norm_topk_prob": false, "routed_scaling_factor": 16.0
}"#;

/// DeepSeek-V3 / R1.
const V3: &str = r#"{
  "model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61,
  "num_nextn_predict_layers": 1, "first_k_dense_replace": 3, "moe_layer_freq": 1,
  "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8,
  "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
  "routed_scaling_factor": 2.5,
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                          "quant_method": "fp8", "weight_block_size": [128, 128]}
}"#;

/// Kimi-K2 (Instruct) as Moonshot wrote it.
const KIMI_K2: &str = r#"{
  "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168,
  "num_hidden_layers": 61, "first_k_dense_replace": 1, "moe_layer_freq": 1,
  "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1,
  "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
  "routed_scaling_factor": 2.827
}"#;

fn parse(json: &str) -> Result<ModelConfig, ConfigError> {
    ModelConfig::from_json(json, "some/dir/config.json")
}

fn expect_spec(
    config: &ModelConfig,
    scoring: ScoringFunc,
    method: TopkMethod,
    groups: (usize, usize),
    top_k: usize,
    renorm: bool,
    scale: f32,
) {
    let spec = config.routing();
    assert_eq!(spec.scoring, scoring, "{spec}");
    assert_eq!(spec.method, method, "{spec}");
    assert_eq!((spec.n_group, spec.topk_group), groups, "{spec}");
    assert_eq!(spec.top_k, top_k, "{spec}");
    assert_eq!(spec.norm_topk_prob, renorm, "{spec}");
    assert_eq!(spec.routed_scaling_factor, scale, "{spec}");
    assert!(spec.apply_scaling, "scaling is applied in the gate by default");
}

#[test]
fn deepseek_v2_lite() {
    let c = parse(V2_LITE).unwrap();
    assert_eq!(c.family(), ModelFamily::DeepseekV2);
    assert_eq!((c.hidden_size(), c.num_layers(), c.routing().num_experts), (2048, 27, 64));
    expect_spec(&c, ScoringFunc::Softmax, TopkMethod::Greedy, (1, 1), 6, false, 1.0);
    assert!(!c.is_moe_layer(0));
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), (1..27).collect::<Vec<_>>());
}

#[test]
fn deepseek_v2_and_v2_5() {
    let c = parse(V2).unwrap();
    assert_eq!((c.hidden_size(), c.num_layers(), c.routing().num_experts), (5120, 60, 160));
    expect_spec(&c, ScoringFunc::Softmax, TopkMethod::GroupLimitedGreedy, (8, 3), 6, false, 16.0);
    assert_eq!(c.moe_layers().count(), 59);
}

#[test]
fn deepseek_v3_and_r1() {
    let c = parse(V3).unwrap();
    assert_eq!(c.family(), ModelFamily::DeepseekV3);
    assert_eq!((c.hidden_size(), c.num_layers(), c.routing().num_experts), (7168, 61, 256));
    expect_spec(&c, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (8, 4), 8, true, 2.5);
    assert!(!c.is_moe_layer(2) && c.is_moe_layer(3) && c.is_moe_layer(60));
    assert!(!c.is_moe_layer(61), "the multi-token-prediction layer is not a decoder layer");
    assert_eq!(c.moe_layers().count(), 58);
}

#[test]
fn kimi_k2_under_either_model_type() {
    for json in [KIMI_K2.to_owned(), KIMI_K2.replace("kimi_k2", "deepseek_v3")] {
        let c = parse(&json).unwrap();
        assert_eq!(c.routing().num_experts, 384);
        expect_spec(&c, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (1, 1), 8, true, 2.827);
        assert_eq!(c.moe_layers().count(), 60);
        assert!(!c.has_nested_text_config());
    }
    assert_eq!(parse(KIMI_K2).unwrap().family(), ModelFamily::KimiK2);
}

#[test]
fn kimi_k2_5_nests_routing_under_text_config() {
    for text_model_type in ["kimi_k2", "deepseek_v3"] {
        let text = KIMI_K2.replace("kimi_k2", text_model_type);
        let json = format!(
            r#"{{"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
                "vision_config": {{"hidden_size": 1152, "model_type": "kimi_k25_vision"}},
                "text_config": {text}}}"#
        );
        let c = parse(&json).unwrap();
        assert!(c.has_nested_text_config());
        assert_eq!(c.family(), ModelFamily::KimiK2);
        assert_eq!(c.model_type(), text_model_type);
        assert_eq!(c.hidden_size(), 7168, "the text model's hidden size, not the vision tower's");
        expect_spec(&c, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (1, 1), 8, true, 2.827);
    }
}

#[test]
fn nested_errors_name_the_text_config_field() {
    let json = r#"{"model_type": "kimi_k25", "text_config": {"model_type": "kimi_k2",
        "hidden_size": 7168, "num_hidden_layers": 61, "n_routed_experts": 384}}"#;
    let message = parse(json).unwrap_err().to_string();
    assert!(message.contains("text_config.num_experts_per_tok"), "{message}");
    assert!(message.contains("some/dir/config.json"), "{message}");
}

/// What `DeepseekV3Config(...).save_pretrained()` writes: no `scoring_func`, `topk_method` or
/// `moe_layer_freq`.
#[test]
fn v3_saved_by_transformers_defaults_to_sigmoid_noaux_tc() {
    let json = r#"{"model_type": "deepseek_v3", "transformers_version": "5.24.0",
        "hidden_size": 64, "num_hidden_layers": 4, "first_k_dense_replace": 1,
        "n_routed_experts": 32, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "norm_topk_prob": true, "routed_scaling_factor": 2.5, "q_lora_rank": null}"#;
    let c = parse(json).unwrap();
    expect_spec(&c, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (4, 2), 4, true, 2.5);
    assert_eq!(c.moe_layer_freq(), 1);
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), vec![1, 2, 3]);
}

/// What `DeepseekV2Config(...).save_pretrained()` writes for a greedy model: `n_group` and
/// `topk_group` are `null`, and there is no `scoring_func`.
#[test]
fn v2_saved_by_transformers_reads_null_groups_as_ungrouped() {
    let json = r#"{"model_type": "deepseek_v2", "hidden_size": 64, "num_hidden_layers": 3,
        "first_k_dense_replace": 0, "n_routed_experts": 16, "num_experts_per_tok": 4,
        "n_group": null, "topk_group": null, "topk_method": "greedy", "norm_topk_prob": false,
        "routed_scaling_factor": 1.0}"#;
    let c = parse(json).unwrap();
    expect_spec(&c, ScoringFunc::Softmax, TopkMethod::Greedy, (1, 1), 4, false, 1.0);
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), vec![0, 1, 2]);
}

#[test]
fn absent_knobs_take_the_family_defaults() {
    let v2 = r#"{"model_type": "deepseek_v2", "hidden_size": 8, "num_hidden_layers": 2,
        "n_routed_experts": 8, "num_experts_per_tok": 2}"#;
    let c = parse(v2).unwrap();
    expect_spec(&c, ScoringFunc::Softmax, TopkMethod::Greedy, (1, 1), 2, false, 1.0);
    assert_eq!((c.first_k_dense_replace(), c.moe_layer_freq()), (0, 1));

    let v3 = r#"{"model_type": "deepseek_v3", "hidden_size": 8, "num_hidden_layers": 5,
        "n_routed_experts": 64, "num_experts_per_tok": 8}"#;
    let c = parse(v3).unwrap();
    expect_spec(&c, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (8, 4), 8, true, 2.5);
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), vec![3, 4]);
}

#[test]
fn v2_without_topk_method_but_with_groups_is_ambiguous() {
    let json = V2.replace(r#""topk_method": "group_limited_greedy","#, "");
    let err = parse(&json).unwrap_err();
    assert!(matches!(&err, ConfigError::Missing { field, .. } if field == "topk_method"), "{err}");
    assert!(err.to_string().contains("n_group"), "{err}");
}

#[test]
fn grouped_v2_needs_its_group_fields() {
    let json = V2.replace(r#""topk_group": 3,"#, "");
    let err = parse(&json).unwrap_err();
    assert!(matches!(&err, ConfigError::Missing { field, .. } if field == "topk_group"), "{err}");
}

#[test]
fn moe_layer_freq_selects_every_other_layer() {
    let json = V3.replace(r#""moe_layer_freq": 1"#, r#""moe_layer_freq": 2"#);
    let c = parse(&json).unwrap();
    let layers: Vec<_> = c.moe_layers().collect();
    assert_eq!(layers.first(), Some(&4));
    assert!(layers.iter().all(|l| l % 2 == 0 && *l >= 3));
    assert!(!c.is_moe_layer(3) && !c.is_moe_layer(5));
    let err = parse(&V3.replace(r#""moe_layer_freq": 1"#, r#""moe_layer_freq": 0"#)).unwrap_err();
    assert!(err.to_string().contains("moe_layer_freq"), "{err}");
}

#[test]
fn moe_layers_take_one_step_per_moe_layer_however_large_the_counts() {
    // A hostile config: a layer count no model has. Walking every layer would not finish.
    let json = V3
        .replace(r#""num_hidden_layers": 61"#, r#""num_hidden_layers": 1000000000000000000"#)
        .replace(r#""first_k_dense_replace": 3"#, r#""first_k_dense_replace": 999999999999999997"#)
        .replace(r#""moe_layer_freq": 1"#, r#""moe_layer_freq": 2"#);
    let c = parse(&json).unwrap();
    let layers: Vec<_> = c.moe_layers().collect();
    assert_eq!(layers, [999_999_999_999_999_998]);
    // The naive definition, on a small model with every combination of the rule.
    for (layers, dense, freq) in [(10, 0, 1), (10, 3, 2), (10, 4, 3), (5, 7, 1), (9, 0, 9)] {
        let json = V3
            .replace(r#""num_hidden_layers": 61"#, &format!(r#""num_hidden_layers": {layers}"#))
            .replace(
                r#""first_k_dense_replace": 3"#,
                &format!(r#""first_k_dense_replace": {dense}"#),
            )
            .replace(r#""moe_layer_freq": 1"#, &format!(r#""moe_layer_freq": {freq}"#));
        let c = parse(&json).unwrap();
        let naive: Vec<usize> = (0..layers).filter(|&l| l >= dense && l % freq == 0).collect();
        assert_eq!(c.moe_layers().collect::<Vec<_>>(), naive, "{layers} {dense} {freq}");
    }
}

#[test]
fn missing_sizes_are_named() {
    for field in ["hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok"] {
        let mut value: Value = serde_json::from_str(V3).unwrap();
        value.as_object_mut().unwrap().remove(field);
        let err = parse(&value.to_string()).unwrap_err();
        assert!(matches!(&err, ConfigError::Missing { field: f, .. } if f == field), "{err}");
        let message = err.to_string();
        assert!(message.contains(field) && message.contains("some/dir/config.json"), "{message}");
    }
}

#[test]
fn wrong_json_types_name_field_and_value() {
    let cases = [
        (r#""n_group": 8,"#, r#""n_group": "8","#, "n_group", "\"8\""),
        (r#""n_group": 8,"#, r#""n_group": -8,"#, "n_group", "-8"),
        (r#""n_group": 8,"#, r#""n_group": 8.5,"#, "n_group", "8.5"),
        (r#""norm_topk_prob": true,"#, r#""norm_topk_prob": 1,"#, "norm_topk_prob", "1"),
        (r#""scoring_func": "sigmoid","#, r#""scoring_func": 3,"#, "scoring_func", "3"),
        (
            r#""routed_scaling_factor": 2.5"#,
            r#""routed_scaling_factor": "2.5""#,
            "routed_scaling_factor",
            "\"2.5\"",
        ),
    ];
    for (from, to, field, value) in cases {
        let json = V3.replace(from, to);
        assert_ne!(json, V3, "{from}");
        let err = parse(&json).unwrap_err();
        assert!(matches!(&err, ConfigError::WrongType { field: f, .. } if f == field), "{err}");
        let message = err.to_string();
        assert!(message.contains(field) && message.contains(value), "{message}");
    }
}

#[test]
fn unknown_names_are_refused_with_their_value() {
    let cases = [
        (r#""model_type": "deepseek_v3""#, r#""model_type": "llama""#, "\"llama\""),
        (r#""scoring_func": "sigmoid""#, r#""scoring_func": "tanh""#, "\"tanh\""),
        (r#""topk_method": "noaux_tc""#, r#""topk_method": "gready""#, "\"gready\""),
    ];
    for (from, to, value) in cases {
        let err = parse(&V3.replace(from, to)).unwrap_err();
        assert!(matches!(err, ConfigError::BadValue { .. }), "{err}");
        assert!(err.to_string().contains(value), "{err}");
    }
}

#[test]
fn inconsistent_groups_are_refused_by_spec_validation() {
    let err = parse(&V3.replace(r#""n_group": 8"#, r#""n_group": 7"#)).unwrap_err();
    assert!(
        matches!(err, ConfigError::Spec { source: SpecError::UnevenGroups { n_group: 7, .. }, .. }),
        "{err}"
    );
    let err = parse(&V3.replace(r#""topk_group": 4"#, r#""topk_group": 9"#)).unwrap_err();
    assert!(err.to_string().contains("topk_group") && err.to_string().contains("config.json"));
    let err = parse(&V3.replace(r#""scoring_func": "sigmoid""#, r#""scoring_func": "softmax""#))
        .unwrap_err();
    assert!(
        matches!(&err, ConfigError::BadValue { field, .. } if field == "scoring_func"),
        "the V3 router scores with sigmoid only: {err}"
    );
    let err = parse(&V2.replace(r#""scoring_func": "softmax""#, r#""scoring_func": "sigmoid""#))
        .unwrap_err();
    assert!(matches!(err, ConfigError::Spec { source: SpecError::ScoringMismatch { .. }, .. }));
}

#[test]
fn malformed_json_names_the_file() {
    for bad in ["{", "[1, 2]", "", "{\"model_type\": }"] {
        let err = parse(bad).unwrap_err();
        assert!(matches!(err, ConfigError::Json { .. }), "{bad}: {err}");
        assert!(err.to_string().contains("some/dir/config.json"), "{err}");
    }
    let err = parse(r#"{"text_config": 3}"#).unwrap_err();
    assert!(matches!(&err, ConfigError::WrongType { field, .. } if field == "text_config"));
}

#[test]
fn reading_a_missing_file_names_it() {
    let err = ModelConfig::from_file("no/such/dir/config.json").unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("no/such/dir/config.json"), "{err}");
}

/// The routing fields of a released DeepSeek-V4 config: no `mlp_layer_types`, the older
/// `num_hash_layers`.
const V4: &str = r#"{
  "model_type": "deepseek_v4", "hidden_size": 4096, "num_hidden_layers": 43,
  "n_routed_experts": 256, "num_experts_per_tok": 6, "scoring_func": "sqrtsoftplus",
  "norm_topk_prob": true, "routed_scaling_factor": 1.5, "num_hash_layers": 3, "vocab_size": 129280
}"#;

#[test]
fn deepseek_v4_hash_layers_come_first_and_the_rest_rank_sqrt_softplus_scores() {
    let c = parse(V4).unwrap();
    assert_eq!(c.family(), ModelFamily::DeepseekV4);
    expect_spec(&c, ScoringFunc::SqrtSoftplus, TopkMethod::NoauxTc, (1, 1), 6, true, 1.5);
    assert_eq!(c.moe_layers().count(), 43, "every V4 layer is MoE");
    assert_eq!((0..43).filter(|&l| c.is_hash_layer(l)).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(c.layer_routing(2).method, TopkMethod::Hash);
    assert_eq!(c.layer_routing(3).method, TopkMethod::NoauxTc);
    assert_eq!(c.mlp_kind(43), None);
    assert_eq!(c.vocab_size(), Some(129_280));
}

#[test]
fn deepseek_v4_defaults_by_model_type() {
    let minimal = r#"{"model_type": "deepseek_v4", "hidden_size": 64, "num_hidden_layers": 5,
        "n_routed_experts": 16, "num_experts_per_tok": 4}"#;
    let c = parse(minimal).unwrap();
    expect_spec(&c, ScoringFunc::SqrtSoftplus, TopkMethod::NoauxTc, (1, 1), 4, true, 1.5);
    assert_eq!(c.moe_layers().filter(|&l| c.is_hash_layer(l)).count(), 3);
    assert_eq!(c.vocab_size(), Some(129_280));
    let sigmoid = minimal
        .replace("\"n_routed_experts\"", "\"scoring_func\": \"sigmoid\", \"n_routed_experts\"");
    assert_eq!(parse(&sigmoid).unwrap().routing().scoring, ScoringFunc::Sigmoid);
}

#[test]
fn deepseek_v4_saved_by_transformers_lists_layer_types() {
    let saved = r#"{"model_type": "deepseek_v4", "hidden_size": 64, "num_hidden_layers": 4,
        "n_routed_experts": 16, "num_experts_per_tok": 4, "num_hash_layers": null,
        "mlp_layer_types": ["hash_moe", "moe", "hash_moe", "moe"], "vocab_size": 64,
        "topk_method": null, "n_group": null}"#;
    let c = parse(saved).unwrap();
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert!(c.is_hash_layer(0) && !c.is_hash_layer(1) && c.is_hash_layer(2));
    assert!(c.lists_layer_types());
}

#[test]
fn deepseek_v4_refuses_what_its_routers_would_ignore() {
    for (from, to, field) in [
        (r#""norm_topk_prob": true"#, r#""norm_topk_prob": false"#, "norm_topk_prob"),
        (r#""num_hash_layers": 3"#, r#""n_group": 8, "topk_group": 4"#, "n_group"),
        (r#""num_hash_layers": 3"#, r#""topk_method": "greedy""#, "topk_method"),
        (r#""sqrtsoftplus""#, r#""tanh""#, "scoring_func"),
        (r#""num_hash_layers": 3"#, r#""mlp_layer_types": ["moe"]"#, "mlp_layer_types"),
    ] {
        let err = parse(&V4.replace(from, to)).unwrap_err();
        assert!(
            matches!(&err, ConfigError::BadValue { field: f, .. } if f == field),
            "{to}: {err}"
        );
    }
    let err = parse(&V4.replace(r#""num_hash_layers": 3"#, r#""mlp_layer_types": 3"#)).unwrap_err();
    assert!(matches!(err, ConfigError::WrongType { .. }), "{err}");
}

#[test]
fn deepseek_v3_2_is_the_v3_router_with_listed_dense_layers() {
    let released = V3.replace("\"deepseek_v3\"", "\"deepseek_v32\"");
    let c = parse(&released).unwrap();
    assert_eq!(c.family(), ModelFamily::DeepseekV32);
    expect_spec(&c, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (8, 4), 8, true, 2.5);
    assert_eq!(c.moe_layers().count(), 58);
    assert!(!c.is_hash_layer(3));
    let saved = r#"{"model_type": "deepseek_v32", "hidden_size": 64, "num_hidden_layers": 4,
        "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "first_k_dense_replace": 3, "mlp_layer_types": ["dense", "sparse", "dense", "sparse"]}"#;
    let c = parse(saved).unwrap();
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), vec![1, 3], "the list wins over the rule");
    assert_eq!(c.first_k_dense_replace(), 1);
    let hash = saved.replace("\"sparse\", \"dense\"", "\"hash_moe\", \"dense\"");
    assert!(matches!(parse(&hash).unwrap_err(), ConfigError::BadValue { .. }));
}

/// Qwen3-30B-A3B as its authors wrote it (routing-relevant fields plus some others).
const QWEN3_30B_A3B: &str = r#"{
  "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
  "num_hidden_layers": 48, "decoder_sparse_step": 1, "mlp_only_layers": [],
  "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
  "moe_intermediate_size": 768, "output_router_logits": false, "router_aux_loss_coef": 0.001,
  "torch_dtype": "bfloat16", "transformers_version": "4.51.0"
}"#;

/// Mixtral-8x7B-v0.1 as its authors wrote it.
const MIXTRAL_8X7B: &str = r#"{
  "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
  "num_hidden_layers": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
  "router_aux_loss_coef": 0.02, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0"
}"#;

#[test]
fn qwen3_moe_is_softmax_greedy_renormalised_as_its_config_says() {
    let c = parse(QWEN3_30B_A3B).unwrap();
    assert_eq!(c.family(), ModelFamily::Qwen3Moe);
    assert_eq!((c.hidden_size(), c.num_layers(), c.routing().num_experts), (2048, 48, 128));
    expect_spec(&c, ScoringFunc::Softmax, TopkMethod::Greedy, (1, 1), 8, true, 1.0);
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), (0..48).collect::<Vec<_>>());
    let without_renorm = parse(&QWEN3_30B_A3B.replace(r#""norm_topk_prob": true,"#, "")).unwrap();
    assert!(!without_renorm.routing().norm_topk_prob, "transformers defaults it to false");
}

#[test]
fn qwen3_moe_layers_follow_sparse_step_and_mlp_only_layers() {
    let json = QWEN3_30B_A3B
        .replace(r#""decoder_sparse_step": 1"#, r#""decoder_sparse_step": 2"#)
        .replace(r#""mlp_only_layers": []"#, r#""mlp_only_layers": [3, 4, 47]"#);
    let c = parse(&json).unwrap();
    let expected: Vec<usize> = (0..48).filter(|l| l % 2 == 1 && ![3, 47].contains(l)).collect();
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), expected);
    assert_eq!(c.first_k_dense_replace(), 1);
    assert!(!c.is_moe_layer(0) && c.is_moe_layer(1) && !c.is_moe_layer(3) && !c.is_moe_layer(4));
    let absent = QWEN3_30B_A3B.replace(r#""decoder_sparse_step": 1, "mlp_only_layers": [],"#, "");
    assert_eq!(parse(&absent).unwrap().moe_layers().count(), 48, "every layer by default");
}

#[test]
fn qwen3_moe_refuses_layer_rules_that_name_no_layer() {
    let zero_step =
        QWEN3_30B_A3B.replace(r#""decoder_sparse_step": 1"#, r#""decoder_sparse_step": 0"#);
    let message = parse(&zero_step).unwrap_err().to_string();
    assert!(message.contains("decoder_sparse_step") && message.contains('0'), "{message}");
    let past_the_end =
        QWEN3_30B_A3B.replace(r#""mlp_only_layers": []"#, r#""mlp_only_layers": [48]"#);
    let message = parse(&past_the_end).unwrap_err().to_string();
    assert!(message.contains("mlp_only_layers") && message.contains("48"), "{message}");
    let not_numbers =
        QWEN3_30B_A3B.replace(r#""mlp_only_layers": []"#, r#""mlp_only_layers": ["1"]"#);
    assert!(
        matches!(parse(&not_numbers), Err(ConfigError::WrongType { field, .. }) if field == "mlp_only_layers")
    );
    let zero_experts = QWEN3_30B_A3B.replace(r#""num_experts": 128"#, r#""num_experts": 0"#);
    assert!(matches!(parse(&zero_experts), Err(ConfigError::BadValue { field, value, .. })
        if field == "num_experts" && value == "0"));
    let no_experts = QWEN3_30B_A3B.replace(r#""num_experts": 128, "#, "");
    assert!(
        matches!(parse(&no_experts), Err(ConfigError::Missing { field, .. }) if field == "num_experts")
    );
}

#[test]
fn mixtral_always_renormalises_on_every_layer() {
    let c = parse(MIXTRAL_8X7B).unwrap();
    assert_eq!(c.family(), ModelFamily::Mixtral);
    assert_eq!((c.hidden_size(), c.num_layers(), c.routing().num_experts), (4096, 32, 8));
    expect_spec(&c, ScoringFunc::Softmax, TopkMethod::Greedy, (1, 1), 2, true, 1.0);
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), (0..32).collect::<Vec<_>>());
    let stray_false = MIXTRAL_8X7B
        .replace(r#""num_local_experts""#, r#""norm_topk_prob": false, "num_local_experts""#);
    let message = parse(&stray_false).unwrap_err().to_string();
    assert!(message.contains("norm_topk_prob") && message.contains("false"), "{message}");
    let too_many =
        MIXTRAL_8X7B.replace(r#""num_experts_per_tok": 2"#, r#""num_experts_per_tok": 9"#);
    assert!(matches!(parse(&too_many), Err(ConfigError::Spec { .. })));
}

/// GLM-4.5 as its authors wrote it (routing-relevant fields plus some others).
const GLM_4_5: &str = r#"{
  "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": 5120,
  "num_hidden_layers": 92, "num_nextn_predict_layers": 1, "first_k_dense_replace": 3,
  "n_routed_experts": 160, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1,
  "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 2.5, "use_qk_norm": true,
  "torch_dtype": "bfloat16", "transformers_version": "4.54.0"
}"#;

/// gpt-oss-20b as its authors wrote it.
const GPT_OSS_20B: &str = r#"{
  "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
  "num_hidden_layers": 24, "num_local_experts": 32, "num_experts_per_tok": 4,
  "experts_per_token": 4, "router_aux_loss_coef": 0.9, "sliding_window": 128,
  "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
    "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}
}"#;

/// MiniMax-M2 as its authors wrote it.
const MINIMAX_M2: &str = r#"{
  "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "hidden_size": 3072,
  "num_hidden_layers": 62, "num_local_experts": 256, "num_experts_per_tok": 8,
  "scoring_func": "sigmoid", "use_routing_bias": true, "use_mtp": true, "num_mtp_modules": 3,
  "rotary_dim": 64, "torch_dtype": "bfloat16"
}"#;

/// Llama-4-Maverick-17B-128E as Meta wrote it: the text model under `text_config`.
const LLAMA_4_MAVERICK: &str = r#"{
  "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
  "text_config": {
    "model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48,
    "num_local_experts": 128, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2,
    "intermediate_size": 8192, "intermediate_size_mlp": 16384, "router_aux_loss_coef": 0.001
  },
  "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 1408}
}"#;

#[test]
fn glm4_moe_is_the_v3_router_with_glm_defaults() {
    let c = parse(GLM_4_5).unwrap();
    assert_eq!(c.family(), ModelFamily::Glm4Moe);
    assert_eq!((c.hidden_size(), c.num_layers(), c.routing().num_experts), (5120, 92, 160));
    expect_spec(&c, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (1, 1), 8, true, 2.5);
    assert!(c.routing().takes_bias() && !c.routing().bias_on_logits());
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), (3..92).collect::<Vec<_>>());
    assert_eq!(c.first_k_dense_replace(), 3);
    // transformers' defaults: one group kept, scale 1, one dense layer, renormalised.
    let bare = r#"{"model_type": "glm4_moe", "hidden_size": 4096, "num_hidden_layers": 46,
                   "n_routed_experts": 128, "num_experts_per_tok": 8}"#;
    let c = parse(bare).unwrap();
    expect_spec(&c, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (1, 1), 8, true, 1.0);
    assert_eq!(c.moe_layers().next(), Some(1));
    // Groups, as the V3 router reads them.
    let grouped = GLM_4_5.replace(r#""n_group": 1,"#, r#""n_group": 8,"#);
    let grouped = grouped.replace(r#""topk_group": 1"#, r#""topk_group": 4"#);
    expect_spec(
        &parse(&grouped).unwrap(),
        ScoringFunc::Sigmoid,
        TopkMethod::NoauxTc,
        (8, 4),
        8,
        true,
        2.5,
    );
}

#[test]
fn glm4_moe_refuses_what_its_router_would_ignore() {
    let softmax = GLM_4_5.replace(r#""n_group""#, r#""scoring_func": "softmax", "n_group""#);
    assert!(
        matches!(parse(&softmax), Err(ConfigError::BadValue { field, .. }) if field == "scoring_func")
    );
    let greedy = GLM_4_5.replace(r#""n_group""#, r#""topk_method": "greedy", "n_group""#);
    assert!(
        matches!(parse(&greedy), Err(ConfigError::BadValue { field, .. }) if field == "topk_method")
    );
    let uneven = GLM_4_5.replace(r#""n_group": 1"#, r#""n_group": 7"#);
    assert!(matches!(parse(&uneven), Err(ConfigError::Spec { .. })));
    let no_experts = GLM_4_5.replace(r#""n_routed_experts": 160,"#, "");
    assert!(
        matches!(parse(&no_experts), Err(ConfigError::Missing { field, .. }) if field == "n_routed_experts")
    );
}

#[test]
fn gpt_oss_adds_its_bias_to_the_logits_and_scores_after_the_top_k() {
    let c = parse(GPT_OSS_20B).unwrap();
    assert_eq!(c.family(), ModelFamily::GptOss);
    assert_eq!((c.hidden_size(), c.num_layers(), c.routing().num_experts), (2880, 24, 32));
    expect_spec(&c, ScoringFunc::Softmax, TopkMethod::Greedy, (1, 1), 4, false, 1.0);
    let spec = c.routing();
    assert_eq!(spec.scoring_order, sluice_tensor::ScoringOrder::AfterTopk);
    assert_eq!(spec.bias_role, sluice_tensor::BiasRole::Logits);
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), (0..24).collect::<Vec<_>>());
    let no_k = GPT_OSS_20B.replace(r#""num_experts_per_tok": 4,"#, "");
    assert!(
        matches!(parse(&no_k), Err(ConfigError::Missing { field, .. }) if field == "num_experts_per_tok")
    );
    let zero = GPT_OSS_20B.replace(r#""num_local_experts": 32"#, r#""num_local_experts": 0"#);
    assert!(matches!(parse(&zero), Err(ConfigError::BadValue { field, value, .. })
        if field == "num_local_experts" && value == "0"));
}

#[test]
fn minimax_m2_selects_with_its_correction_bias_and_renormalises() {
    let c = parse(MINIMAX_M2).unwrap();
    assert_eq!(c.family(), ModelFamily::MinimaxM2);
    assert_eq!((c.hidden_size(), c.num_layers(), c.routing().num_experts), (3072, 62, 256));
    expect_spec(&c, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (1, 1), 8, true, 1.0);
    assert_eq!(c.routing().scoring_order, sluice_tensor::ScoringOrder::BeforeTopk);
    assert_eq!(c.moe_layers().count(), 62);
    for (from, to, field) in [
        (r#""scoring_func": "sigmoid""#, r#""scoring_func": "softmax""#, "scoring_func"),
        (r#""use_routing_bias": true"#, r#""use_routing_bias": false"#, "use_routing_bias"),
        (r#""use_mtp""#, r#""norm_topk_prob": false, "use_mtp""#, "norm_topk_prob"),
    ] {
        let error = parse(&MINIMAX_M2.replace(from, to)).unwrap_err();
        assert!(
            matches!(&error, ConfigError::BadValue { field: f, .. } if f == field),
            "{field}: {error}"
        );
    }
}

#[test]
fn llama4_reads_its_text_config_and_interleaved_moe_layers() {
    let c = parse(LLAMA_4_MAVERICK).unwrap();
    assert_eq!(c.family(), ModelFamily::Llama4);
    assert!(c.has_nested_text_config());
    assert_eq!(c.model_type(), "llama4_text");
    assert_eq!((c.hidden_size(), c.num_layers(), c.routing().num_experts), (5120, 48, 128));
    expect_spec(&c, ScoringFunc::Sigmoid, TopkMethod::Greedy, (1, 1), 1, false, 1.0);
    assert_eq!(c.routing().scoring_order, sluice_tensor::ScoringOrder::AfterTopk);
    assert!(!c.routing().takes_bias());
    let odd: Vec<usize> = (0..48).filter(|l| l % 2 == 1).collect();
    assert_eq!(c.moe_layers().collect::<Vec<_>>(), odd);
    assert!(!c.is_moe_layer(0) && c.is_moe_layer(1) && c.first_k_dense_replace() == 1);
    // Scout: every layer (the step defaults to 1).
    let scout = LLAMA_4_MAVERICK.replace(r#""interleave_moe_layer_step": 2,"#, "");
    assert_eq!(parse(&scout).unwrap().moe_layers().count(), 48);
    // `moe_layers` overrides the step.
    let listed = LLAMA_4_MAVERICK.replace(
        r#""interleave_moe_layer_step": 2,"#,
        r#""interleave_moe_layer_step": 2, "moe_layers": [0, 5, 47],"#,
    );
    assert_eq!(parse(&listed).unwrap().moe_layers().collect::<Vec<_>>(), vec![0, 5, 47]);
    // A text-only config.
    let text_only = r#"{"model_type": "llama4_text", "hidden_size": 64, "num_hidden_layers": 4,
                        "num_local_experts": 16, "num_experts_per_tok": 1}"#;
    let c = parse(text_only).unwrap();
    assert!(!c.has_nested_text_config() && c.family() == ModelFamily::Llama4);
}

#[test]
fn llama4_refusals_name_the_field() {
    let past_the_end =
        LLAMA_4_MAVERICK.replace(r#""interleave_moe_layer_step": 2,"#, r#""moe_layers": [1, 48],"#);
    let message = parse(&past_the_end).unwrap_err().to_string();
    assert!(message.contains("text_config.moe_layers") && message.contains("48"), "{message}");
    let zero_step = LLAMA_4_MAVERICK
        .replace(r#""interleave_moe_layer_step": 2"#, r#""interleave_moe_layer_step": 0"#);
    assert!(
        matches!(parse(&zero_step), Err(ConfigError::BadValue { field, .. }) if field == "text_config.interleave_moe_layer_step")
    );
    let not_numbers =
        LLAMA_4_MAVERICK.replace(r#""interleave_moe_layer_step": 2,"#, r#""moe_layers": "all","#);
    assert!(
        matches!(parse(&not_numbers), Err(ConfigError::WrongType { field, .. }) if field == "text_config.moe_layers")
    );
    let flat = r#"{"model_type": "llama4", "hidden_size": 64, "num_hidden_layers": 4}"#;
    assert!(
        matches!(parse(flat), Err(ConfigError::Missing { field, .. }) if field == "text_config")
    );
    let no_experts = LLAMA_4_MAVERICK.replace(r#""num_local_experts": 128,"#, "");
    assert!(
        matches!(parse(&no_experts), Err(ConfigError::Missing { field, .. }) if field == "text_config.num_local_experts")
    );
}
