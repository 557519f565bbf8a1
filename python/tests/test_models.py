"""Every model family of models/testdata, routed from torch, against transformers' own routers
(the golden fixtures the Rust reference router is tested against)."""

import pytest
import torch

import sluice
from conftest import FAMILIES, Golden, assert_matches_golden


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_route_matches_the_golden_outputs(family, kind):
    golden = Golden(family)
    hidden = golden.hidden(kind)
    for layer in golden.moe_layers:
        gate = sluice.Gate.from_pretrained(golden.dir, layer)
        ids, weights = gate.route(hidden, golden.input_ids)
        assert ids.dtype == torch.int32 and weights.dtype == torch.float32
        assert_matches_golden(ids, weights, *golden.expected(layer, kind))


@pytest.mark.parametrize("family", FAMILIES)
def test_route_into_writes_what_route_returns(family):
    golden = Golden(family)
    hidden = golden.hidden("f32")
    for layer in golden.moe_layers:
        gate = sluice.Gate.from_pretrained(golden.dir, layer)
        ids, weights = gate.route(hidden, golden.input_ids)
        ids_out = torch.full_like(ids, -7)
        weights_out = torch.full_like(weights, -7.0)
        gate.route_into(hidden, ids_out, weights_out, input_ids=golden.input_ids)
        assert torch.equal(ids_out, ids) and torch.equal(weights_out, weights)


def test_a_hash_routed_layer_needs_the_token_ids():
    golden = Golden("v4")
    gate = sluice.Gate.from_pretrained(golden.dir, 0)
    with pytest.raises(ValueError, match="layer 0 is hash-routed"):
        gate.route(golden.hidden("f32"))


def test_a_gate_from_a_models_parameters_routes_like_the_checkpoint():
    """The engine's case: the weight is an `nn.Parameter` of a loaded model and the config a
    dict; the gate holds the parameter's memory and routes exactly like the loaded gate."""
    golden = Golden("v3")
    layer = golden.moe_layers[0]
    loaded = sluice.Gate.from_pretrained(golden.dir, layer)
    weight = torch.nn.Parameter(torch.from_dlpack(loaded.weight.detach()).clone())
    bias = torch.from_dlpack(loaded.bias).clone()
    gate = sluice.Gate.from_tensors(weight, bias, golden.config, layer=layer)
    assert gate.weight.data_ptr == weight.data_ptr()
    assert gate.weight.requires_grad
    hidden = golden.hidden("bf16")
    for got, want in zip(gate.route(hidden), loaded.route(hidden)):
        assert torch.equal(got, want)


