"""The gate on a second CUDA device (`cuda:1`) with torch as the client: made from host tensors
and from a parameter already there, routing there like the CPU gate; `route_into` on torch's
current stream of device 1 captured in a torch CUDA graph on that device and replayed; tensors
on `cuda:0` refused with sluice's message, nothing written; torch's current device left as it was.

Every test is marked `second_cuda_device`: it skips where torch sees fewer than two CUDA devices,
whatever `SLUICE_REQUIRE_GPU` says, and fails there instead under `SLUICE_REQUIRE_GPUS=2` (the GPU
bundle's `devices` step; see conftest.py)."""

import pytest
import torch

import sluice
from conftest import GraphCase, assert_matches_golden, tiny_config

pytestmark = pytest.mark.second_cuda_device

FIRST = torch.device("cuda", 0)
SECOND = torch.device("cuda", 1)


def host_tensors(dtype=torch.float32, seed=5):
    """A seeded 16-expert router weight `[16, 32]`, its bias and hidden states `[9, 32]`."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 32, generator=generator).to(dtype)
    bias = torch.randn(16, generator=generator) * 0.1
    hidden = torch.randn(9, 32, generator=generator)
    return weight, bias, hidden


@pytest.mark.parametrize("weight_from", ["host", "cuda:1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_gate_on_cuda_1_routes_there_like_the_cpu_gate(weight_from, dtype):
    current = torch.cuda.current_device()
    weight, bias, hidden = host_tensors(dtype)
    cpu = sluice.Gate.from_tensors(weight, bias, tiny_config())
    if weight_from == "host":
        gate = sluice.Gate.from_tensors(weight, bias, tiny_config(), device="cuda:1")
    else:
        # A model moved to the second GPU: the gate goes where its parameter is.
        parameter = torch.nn.Parameter(weight.to(SECOND))
        gate = sluice.Gate.from_tensors(parameter, bias.to(SECOND), tiny_config())
        assert gate.weight.data_ptr == parameter.data_ptr()
    assert gate.device == SECOND
    ids, weights = gate.route(hidden.to(SECOND))
    assert ids.device == SECOND and weights.device == SECOND
    assert_matches_golden(ids.cpu(), weights.cpu(), *cpu.route(hidden), near_ties=[])
    assert torch.cuda.current_device() == current, "sluice changed torch's current device"


@pytest.mark.parametrize("stream_from", ["default", "explicit"])
def test_route_into_on_cuda_1_is_captured_in_a_cuda_graph_there(stream_from):
    """`route_into` on `torch.cuda.current_stream(1)` inside `torch.cuda.graph` on device 1: by
    default (the gate names torch's current stream and allocates the workspace in the capture),
    or with that stream's handle and a workspace of the caller's."""
    case = GraphCase(seed=13, device=SECOND)
    gate = sluice.Gate.from_tensors(
        torch.nn.Parameter(case.weight), case.bias, case.config, device="cuda:1", mark_invalid=True
    )
    x = case.static_input()
    ids, weights = case.ids, case.weights
    workspace = torch.empty(gate.workspace_bytes(case.tokens), dtype=torch.uint8, device=SECOND)

    def step():
        if stream_from == "default":
            gate.route_into(x, ids, weights)
        else:
            stream = torch.cuda.current_stream(SECOND)
            assert stream.device == SECOND
            gate.route_into(x, ids, weights, stream=stream.cuda_stream, workspace=workspace)

    with torch.cuda.device(SECOND):
        case.warm_up(step)
        eager = gate.route(x)
        assert torch.equal(ids, eager[0]) and torch.equal(weights, eager[1])

        graph = case.capture(step)

        for _ in range(2):
            x.copy_(case.static_input())
            graph.replay()
            torch.cuda.synchronize(SECOND)
            expected = gate.route(x)
            assert torch.equal(ids, expected[0]) and torch.equal(weights, expected[1])
            assert not torch.equal(ids, eager[0])


def test_tensors_on_cuda_0_are_refused_by_a_cuda_1_gate_and_nothing_is_written():
    weight, bias, hidden = host_tensors()
    gate = sluice.Gate.from_tensors(weight.to(SECOND), bias.to(SECOND), tiny_config())
    marking = sluice.Gate.from_tensors(
        weight, bias, tiny_config(), device="cuda:1", mark_invalid=True
    )
    ids = torch.full((9, 4), -5, dtype=torch.int32, device=SECOND)
    weights = torch.full((9, 4), -5.0, device=SECOND)
    elsewhere = "is on cuda:0, this backend computes on cuda:1"
    cases = [
        (lambda: gate.route(hidden.to(FIRST)), f"`hidden` {elsewhere}"),
        (lambda: marking.route(hidden.to(FIRST)), f"`hidden` {elsewhere}"),
        (lambda: marking.route_into(hidden.to(FIRST), ids, weights), f"`hidden` {elsewhere}"),
        (
            lambda: marking.route_into(hidden.to(SECOND), ids.to(FIRST), weights),
            f"`topk_ids` {elsewhere}",
        ),
        (
            lambda: sluice.Gate.from_tensors(
                weight.to(FIRST), bias, tiny_config(), device="cuda:1"
            ),
            f"`weight` {elsewhere}",
        ),
        (
            lambda: sluice.Gate.from_tensors(
                weight, bias.to(FIRST), tiny_config(), device="cuda:1"
            ),
            f"`bias` {elsewhere}",
        ),
        (
            lambda: sluice.Gate.from_tensors(
                weight, bias, tiny_config(), device="cuda:1", backend=sluice.CudaBackend(0)
            ),
            "device='cuda:1' but backend=",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    torch.cuda.synchronize(SECOND)
    assert bool((ids == -5).all() and (weights == -5.0).all()), "a refused call wrote"
