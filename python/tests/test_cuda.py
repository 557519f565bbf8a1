"""The CUDA path with torch as the client: routing equal to the CPU gate's for every model family
(DeepSeek-V4's hash-routed layers with token ids on the device), outputs written in place on the input's device, `route_into` captured in a
torch CUDA graph with a parameter weight and hidden states that require grad, and errors as
Python exceptions with sluice's message.

Every test but the first is marked `cuda`: it skips without a CUDA device, and fails there when
`SLUICE_REQUIRE_GPU` is set (see conftest.py)."""

import os
import subprocess
import sys

import pytest
import torch

import sluice
from conftest import FAMILIES, TESTDATA, Golden, GraphCase, assert_matches_golden, tiny_config
from dlpack_producers import PATHS

cuda = pytest.mark.cuda
CUDA = torch.device("cuda", 0)


def test_without_a_usable_device_only_choosing_cuda_fails():
    """The wheel imports and routes on the CPU where the CUDA backend cannot start (no driver
    here, no visible device on a GPU machine); choosing CUDA is a `RuntimeError` with sluice's
    message, never a crash."""
    script = "\n".join(
        [
            "import sluice, torch",
            f"gate = sluice.Gate.from_pretrained({str(Golden('v3').dir)!r}, 3)",
            "assert gate.route(torch.randn(2, gate.hidden_size))[0].shape == (2, 8)",
            "for choose in (lambda: sluice.CudaBackend(0),",
            f"               lambda: sluice.Gate.from_pretrained({str(Golden('v3').dir)!r}, 3,",
            "                                                  device='cuda')):",
            "    try:",
            "        choose()",
            "    except RuntimeError as error:",
            "        print('refused:', error)",
            "    else:",
            "        raise SystemExit('CUDA was chosen without a device')",
        ]
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    refusals = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 2, result.stdout
    for refusal in refusals:
        assert "CUDA" in refusal or "NVIDIA" in refusal, refusal


def hash_routed(golden: Golden, layer: int) -> bool:
    """Whether a layer of DeepSeek-V4 is routed by a table (`mlp_layer_types` `"hash_moe"` as
    transformers saves it, else one of the first `num_hash_layers`): it needs the token ids."""
    types = golden.config.get("mlp_layer_types")
    if types is not None:
        return types[layer] == "hash_moe"
    return layer < golden.config.get("num_hash_layers", 0)


@cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_route_matches_the_cpu_gate_and_transformers(family, kind):
    golden = Golden(family)
    hidden = golden.hidden(kind)
    # Hash-routed layers choose by these; every other layer ignores them.
    input_ids = golden.input_ids
    device_ids = None if input_ids is None else input_ids.to(CUDA)
    routed = 0
    for layer in golden.moe_layers:
        cpu = sluice.Gate.from_pretrained(golden.dir, layer)
        gpu = sluice.Gate.from_pretrained(golden.dir, layer, device="cuda")
        assert gpu.device == CUDA and cpu.device == torch.device("cpu")
        ids, weights = gpu.route(hidden.to(CUDA), device_ids)
        assert ids.device == CUDA and weights.device == CUDA
        assert ids.dtype == torch.int32 and weights.dtype == torch.float32
        golden_ids, golden_weights, near_ties = golden.expected(layer, kind)
        cpu_ids, cpu_weights = cpu.route(hidden, input_ids)
        assert_matches_golden(ids.cpu(), weights.cpu(), cpu_ids, cpu_weights, near_ties)
        assert_matches_golden(ids.cpu(), weights.cpu(), golden_ids, golden_weights, near_ties)
        routed += 1
    assert routed > 0, f"no layer of {family} routed on the GPU"


@cuda
def test_hash_routed_layers_on_the_gpu_need_device_token_ids():
    """int32 ids route like int64 ones; no ids, or ids left on the host, are refused."""
    checked = 0
    for family in FAMILIES:
        golden = Golden(family)
        for layer in golden.moe_layers:
            if not hash_routed(golden, layer):
                continue
            gpu = sluice.Gate.from_pretrained(golden.dir, layer, device="cuda")
            hidden = golden.hidden("f32").to(CUDA)
            wide = gpu.route(hidden, golden.input_ids.to(CUDA))
            narrow = gpu.route(hidden, golden.input_ids.to(torch.int32).to(CUDA))
            assert torch.equal(wide[0], narrow[0]) and torch.equal(wide[1], narrow[1])
            with pytest.raises(ValueError, match="token id"):
                gpu.route(hidden)
            with pytest.raises(ValueError, match="token_ids"):
                gpu.route(hidden, golden.input_ids)
            checked += 1
    assert checked > 0, "expected DeepSeek-V4's hash-routed layers among the fixtures"


def cuda_gate(*, dtype=torch.float32, seed=7, **options):
    """A seeded 16-expert gate whose weight is an `nn.Parameter` on the GPU, as in a model moved
    to it, and the same gate on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 32, generator=generator).to(dtype)
    bias = torch.randn(16, generator=generator) * 0.1
    parameter = torch.nn.Parameter(weight.to(CUDA))
    gpu = sluice.Gate.from_tensors(parameter, bias.to(CUDA), tiny_config(), **options)
    cpu = sluice.Gate.from_tensors(weight, bias, tiny_config(), **options)
    return gpu, cpu, parameter


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_gate_from_a_gpu_parameter_routes_on_its_device_like_the_cpu_gate(dtype):
    gpu, cpu, parameter = cuda_gate(dtype=dtype)
    assert gpu.device == parameter.device and gpu.weight.requires_grad
    assert gpu.weight.data_ptr == parameter.data_ptr()
    hidden = torch.randn(37, 32, generator=torch.Generator().manual_seed(1))
    ids, weights = gpu.route(hidden.to(CUDA))
    assert_matches_golden(ids.cpu(), weights.cpu(), *cpu.route(hidden), near_ties=[])


@cuda
def test_route_into_writes_the_callers_buffers_in_place():
    """Zero-copy both ways: sluice reads torch's memory where it is, and writes the routing into
    windows of the caller's buffers (rows further apart than K), touching nothing else."""
    gpu, _, _ = cuda_gate(mark_invalid=True)
    hidden = torch.randn(5, 32, device=CUDA)
    assert sluice.Tensor.from_dlpack(hidden).data_ptr == hidden.data_ptr()
    ids, weights = gpu.route(hidden)
    wide_ids = torch.full((8, 10), -3, dtype=torch.int32, device=CUDA)
    wide_weights = torch.full((8, 10), -3.0, device=CUDA)
    ids_window, weights_window = wide_ids[:5, 2:6], wide_weights[:5, 2:6]
    for window in (ids_window, weights_window):
        assert sluice.Tensor.from_dlpack(window).data_ptr == window.data_ptr()
    gpu.route_into(hidden, ids_window, weights_window)
    torch.cuda.synchronize()
    assert torch.equal(ids_window, ids) and torch.equal(weights_window, weights)
    outside = torch.ones_like(wide_ids, dtype=torch.bool)
    outside[:5, 2:6] = False
    assert bool((wide_ids[outside] == -3).all() and (wide_weights[outside] == -3.0).all())


@cuda
def test_route_into_runs_on_the_stream_it_is_given():
    gpu, _, _ = cuda_gate(mark_invalid=True)
    hidden = torch.randn(6, 32, device=CUDA)
    expected = gpu.route(hidden)
    workspace = torch.empty(gpu.workspace_bytes(6), dtype=torch.uint8, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # DLPack's numbers: 1 the legacy default stream, 2 the per-thread one, else a handle.
    for stream in (1, 2, side.cuda_stream):
        ids = torch.zeros(6, 4, dtype=torch.int32, device=CUDA)
        weights = torch.zeros(6, 4, device=CUDA)
        torch.cuda.synchronize()
        gpu.route_into(hidden, ids, weights, stream=stream, workspace=workspace)
        torch.cuda.synchronize()
        assert torch.equal(ids, expected[0]) and torch.equal(weights, expected[1]), stream
    # torch's current stream by default, a side stream included.
    ids = torch.zeros(6, 4, dtype=torch.int32, device=CUDA)
    weights = torch.zeros(6, 4, device=CUDA)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gpu.route_into(hidden, ids, weights)
    torch.cuda.synchronize()
    assert torch.equal(ids, expected[0]) and torch.equal(weights, expected[1])


@cuda
@pytest.mark.parametrize("workspace_from", ["caller", "gate"])
def test_route_into_is_captured_in_a_cuda_graph_with_grad_inputs(workspace_from):
    """The engine's use: a model's `nn.Parameter` gate weight, hidden states that require grad
    (made by a torch kernel inside the capture, from a parameter), the gate captured on torch's
    current stream and replayed after the static input changed, equal to eager routing."""
    case = GraphCase(seed=11, device=CUDA)
    weight = torch.nn.Parameter(case.weight.to(CUDA))
    gate = sluice.Gate.from_tensors(weight, case.bias.to(CUDA), case.config, mark_invalid=True)
    scale = torch.nn.Parameter(torch.tensor(1.5, device=CUDA))
    x = case.static_input()
    ids, weights = case.ids, case.weights
    workspace = None
    if workspace_from == "caller":
        workspace = torch.empty(gate.workspace_bytes(case.tokens), dtype=torch.uint8, device=CUDA)

    def step():
        hidden = x * scale  # bf16, requires grad
        assert hidden.requires_grad
        gate.route_into(hidden, ids, weights, workspace=workspace)

    gate.warm_up(case.tokens)  # cuBLASLt's algorithm for 12 bf16 rows, chosen before capture
    case.warm_up(step)
    eager = gate.route((x * scale).detach())
    assert torch.equal(ids, eager[0]) and torch.equal(weights, eager[1])

    graph = case.capture(step)

    for _ in range(2):
        x.copy_(case.static_input())
        graph.replay()
        torch.cuda.synchronize()
        expected = gate.route((x * scale).detach())
        assert torch.equal(ids, expected[0]) and torch.equal(weights, expected[1])
        assert not torch.equal(ids, eager[0])
    assert weight.requires_grad and scale.requires_grad


@cuda
@pytest.mark.parametrize("path", PATHS)
def test_requires_grad_is_carried_on_the_gpu_and_a_plain_reexport_refused(path):
    parameter = torch.nn.Parameter(torch.randn(4, 32, device=CUDA))
    imported = sluice.Tensor.from_dlpack(PATHS[path](parameter))
    assert imported.requires_grad
    assert imported.data_ptr == parameter.data_ptr()
    with pytest.raises(BufferError, match="cannot export a tensor that requires grad"):
        torch.from_dlpack(imported)
    detached = torch.from_dlpack(imported.detach())
    assert detached.device == CUDA and detached.data_ptr() == parameter.data_ptr()


@cuda
@pytest.mark.parametrize("path", PATHS)
def test_the_original_bug_on_the_gpu(path):
    """A gate weight that is an `nn.Parameter` on the GPU and hidden states that require grad,
    through every DLPack path: both are detached at sluice's bridge and route exactly like their
    detached selves, with `route` and with `route_into`."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(16, 32, generator=generator).to(CUDA))
    bias = (torch.randn(16, generator=generator) * 0.1).to(CUDA)
    hidden = torch.randn(6, 32, generator=generator).to(CUDA).requires_grad_()
    gate = sluice.Gate.from_tensors(PATHS[path](weight), bias, tiny_config(), device="cuda")
    assert gate.weight.requires_grad and gate.weight.data_ptr == weight.data_ptr()
    reference = sluice.Gate.from_tensors(weight.detach(), bias, tiny_config())
    expected = reference.route(hidden.detach())
    for got, want in zip(gate.route(PATHS[path](hidden)), expected):
        assert got.device == CUDA and torch.equal(got, want)
    marking = sluice.Gate.from_tensors(
        PATHS[path](weight), bias, tiny_config(), device="cuda", mark_invalid=True
    )
    ids_out = torch.empty(6, 4, dtype=torch.int32, device=CUDA)
    weights_out = torch.empty(6, 4, device=CUDA)
    marking.route_into(PATHS[path](hidden), ids_out, weights_out)
    torch.cuda.synchronize()
    assert torch.equal(ids_out, expected[0]) and torch.equal(weights_out, expected[1])
    assert hidden.requires_grad and weight.requires_grad


@cuda
def test_non_finite_rows_raise_from_route_or_are_marked():
    hidden = torch.randn(4, 32, device=CUDA)
    hidden[2, 5] = float("nan")
    raising, _, _ = cuda_gate()
    with pytest.raises(ValueError, match="non-finite router logits in row 2"):
        raising.route(hidden)
    marking, _, _ = cuda_gate(mark_invalid=True)
    ids, weights = marking.route(hidden)
    assert ids[2].tolist() == [-1] * 4 and weights[2].tolist() == [0.0] * 4
    assert bool((ids[[0, 1, 3]] >= 0).all())
    ids_out = torch.empty(4, 4, dtype=torch.int32, device=CUDA)
    weights_out = torch.empty(4, 4, device=CUDA)
    status = torch.empty(2, dtype=torch.int32, device=CUDA)
    marking.route_into(hidden, ids_out, weights_out, status=status)
    assert status.tolist() == [1, 2] and torch.equal(ids_out, ids)
    empty_ids, empty_weights = raising.route(torch.empty(0, 32, device=CUDA))
    assert empty_ids.shape == (0, 4) and empty_weights.shape == (0, 4)


@cuda
def test_errors_are_value_errors_with_sluices_message():
    gpu, cpu, _ = cuda_gate(mark_invalid=True)
    hidden = torch.randn(3, 32, device=CUDA)
    ids = torch.full((3, 4), -5, dtype=torch.int32, device=CUDA)
    weights = torch.full((3, 4), -5.0, device=CUDA)
    cases = [
        # Host memory for a GPU gate, and the other way round.
        (lambda: gpu.route(hidden.cpu()), "`hidden` is on cpu, this backend computes on cuda:0"),
        (lambda: gpu.route_into(hidden, ids.cpu(), weights), "`topk_ids` is on cpu"),
        (lambda: cpu.route(hidden), "`hidden` is on cuda:0, this backend computes on cpu"),
        (lambda: cpu.route_into(hidden, ids, weights), "`hidden` is on cuda:0"),
        (lambda: gpu.route_into(hidden, ids, weights, stream=0), "stream value 0"),
        (
            lambda: gpu.route_into(hidden, ids, weights, stream=1),
            "the workspace holds 0 bytes, this call needs",
        ),
        (
            lambda: gpu.route_into(
                hidden, ids, weights, workspace=torch.empty(16, dtype=torch.uint8, device=CUDA)
            ),
            "the workspace holds 16 bytes",
        ),
        (lambda: gpu.route_into(hidden, ids.long(), weights), "`topk_ids` has dtype i64"),
        (lambda: gpu.route_into(hidden, ids, weights[:2]), r"`topk_weights` has shape \[2, 4\]"),
        (lambda: gpu.route(torch.randn(3, 7, device=CUDA)), r"hidden states have shape \[3, 7\]"),
        (lambda: cuda_gate()[0].route_into(hidden, ids, weights), "error policy"),
        (
            lambda: sluice.Gate.from_tensors(
                torch.randn(16, 32, device=CUDA), torch.zeros(16), tiny_config(), device="cpu"
            ),
            "is on cuda:0",
        ),
        (
            lambda: sluice.Gate.from_tensors(
                torch.randn(16, 32),
                torch.zeros(16),
                tiny_config(),
                device="cuda:0",
                backend=sluice.CpuBackend(),
            ),
            "device='cuda:0' but backend=",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    torch.cuda.synchronize()
    assert bool((ids == -5).all() and (weights == -5.0).all()), "a refused call wrote nothing"
    grad_weights = torch.zeros(3, 4, device=CUDA, requires_grad=True)
    with pytest.raises(BufferError, match="requires grad"):
        gpu.route_into(hidden, ids, grad_weights)
