//! Arbitrary bytes as `config.json`. Parsing must succeed or fail with a typed error; a config
//! that parses must describe a routing that is well-defined: a valid spec, MoE layers that agree
//! with `is_moe_layer`, and a gate of its shape that routes a token to `top_k` distinct experts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_models::reference;
use sluice_models::{ModelConfig, MoeGate};
use sluice_tensor::Tensor;

/// How many MoE layers and how large a gate the checks go through, to keep each input fast.
const MAX_LAYERS_CHECKED: usize = 512;
const MAX_GATE_ELEMENTS: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = ModelConfig::from_json(text, "config.json") else { return };
    let spec = *config.routing();
    spec.validate().expect("a parsed config has a valid routing spec");
    assert!(config.hidden_size() > 0 && config.moe_layer_freq() > 0);

    let layers: Vec<usize> = config.moe_layers().take(MAX_LAYERS_CHECKED).collect();
    assert!(layers.windows(2).all(|w| w[0] < w[1]), "MoE layers in increasing order");
    for &layer in &layers {
        assert!(config.is_moe_layer(layer), "layer {layer}");
        assert!(layer < config.num_layers() && layer >= config.first_k_dense_replace());
    }
    // Every layer below the last one listed is MoE exactly when it is listed.
    let listed_up_to = layers.last().map_or(config.num_layers(), |&last| last + 1);
    for layer in 0..listed_up_to.min(MAX_LAYERS_CHECKED) {
        assert_eq!(config.is_moe_layer(layer), layers.contains(&layer), "layer {layer}");
    }

    let (experts, hidden) = (spec.num_experts, config.hidden_size());
    if experts.checked_mul(hidden).is_none_or(|n| n > MAX_GATE_ELEMENTS) {
        return;
    }
    let weight = Tensor::from_vec(vec![0.0f32; experts * hidden], &[experts, hidden]).unwrap();
    let bias = spec
        .takes_bias()
        .then(|| Tensor::from_vec((0..experts).map(|e| e as f32 * 1e-3).collect(), &[experts]))
        .transpose()
        .unwrap();
    let layer = layers.first().copied().unwrap_or(0);
    MoeGate::new(layer, spec, weight, bias).expect("a parsed config makes a valid gate");
    let logits: Vec<f32> = (0..experts).map(|e| ((e * 37) % 11) as f32 - 5.0).collect();
    let bias: Vec<f32> = (0..experts).map(|e| e as f32 * 1e-3).collect();
    let bias = spec.takes_bias().then_some(bias.as_slice());
    let routing = reference::route(&logits, 1, bias, &spec).expect("one finite token routes");
    let mut ids = routing.ids().to_vec();
    assert_eq!(ids.len(), spec.top_k);
    assert!(ids.iter().all(|&id| usize::try_from(id).is_ok_and(|id| id < experts)));
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), spec.top_k, "top_k distinct experts");
});
