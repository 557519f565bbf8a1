"""Shared helpers: the golden fixtures of models/testdata, read without sluice, small gates, the
gate of the CUDA graph tests, and the `cuda` marker.

Tests marked `cuda` need a CUDA device: without one they skip, unless `SLUICE_REQUIRE_GPU` is set
(as the GPU bundle's `run.sh` does), where a missing device fails them instead, as it fails the
Rust GPU tests. Tests marked `second_cuda_device` need two: with fewer they skip whatever
`SLUICE_REQUIRE_GPU` says (machines with one GPU run the suite with it set), and fail instead
when `SLUICE_REQUIRE_GPUS` asks for two or more (`run.sh devices`). `SLUICE_TESTDATA` points at
the fixtures where the source tree is not around."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

import sluice

TESTDATA = Path(
    os.environ.get("SLUICE_TESTDATA") or Path(__file__).resolve().parents[2] / "models" / "testdata"
)
# Every fixture checkpoint, nested ones included, as the Rust golden tests find them.
FAMILIES = sorted(
    str(path.parent.relative_to(TESTDATA)) for path in TESTDATA.rglob("golden.safetensors")
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cuda: needs a CUDA device (skipped without one unless SLUICE_REQUIRE_GPU is set)",
    )
    config.addinivalue_line(
        "markers",
        "second_cuda_device: needs two CUDA devices (skipped with fewer unless "
        "SLUICE_REQUIRE_GPUS is 2 or more)",
    )


def required_cuda_devices() -> int:
    """How many CUDA devices `SLUICE_REQUIRE_GPUS` says the machine must have (0 when unset)."""
    value = os.environ.get("SLUICE_REQUIRE_GPUS")
    if value is None:
        return 0
    if not value.isdigit():
        pytest.fail(f"SLUICE_REQUIRE_GPUS={value!r} is not a number of CUDA devices", pytrace=False)
    return int(value)


def pytest_runtest_setup(item):
    if item.get_closest_marker("second_cuda_device") is not None:
        count = torch.cuda.device_count()
        if count >= 2:
            return
        if required_cuda_devices() >= 2:
            pytest.fail(
                f"SLUICE_REQUIRE_GPUS asks for two CUDA devices but torch sees {count}",
                pytrace=False,
            )
        pytest.skip(f"needs two CUDA devices, torch sees {count}")
    if item.get_closest_marker("cuda") is None or torch.cuda.is_available():
        return
    if "SLUICE_REQUIRE_GPU" in os.environ:
        pytest.fail("SLUICE_REQUIRE_GPU is set but torch sees no CUDA device", pytrace=False)
    pytest.skip("no CUDA device")


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (copied into torch) and its metadata: an independent
    reader, so that the fixtures do not go through the code under test."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.pop("__metadata__", {})
    body = data[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        raw = bytearray(body[start:end])
        tensors[name] = torch.frombuffer(raw, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors, metadata


class Golden:
    """transformers' own router outputs for one fixture checkpoint."""

    def __init__(self, family: str) -> None:
        self.dir = TESTDATA / family
        self.tensors, metadata = read_safetensors(self.dir / "golden.safetensors")
        self.moe_layers: list[int] = json.loads(metadata["moe_layers"])
        self.near_ties: dict[str, list[int]] = json.loads(metadata["near_ties"])
        self.config = json.loads((self.dir / "config.json").read_text())
        # The token ids DeepSeek-V4's hash-routed layers were called with; None elsewhere.
        self.input_ids: torch.Tensor | None = self.tensors.get("input_ids")

    def hidden(self, kind: str) -> torch.Tensor:
        return self.tensors[f"hidden_states.{kind}"]

    def expected(self, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        key = f"layers.{layer}.{kind}"
        ids = self.tensors[f"{key}.topk_ids"]
        weights = self.tensors[f"{key}.topk_weights"]
        return ids, weights, self.near_ties[key]


def assert_matches_golden(ids, weights, golden_ids, golden_weights, near_ties):
    """Expert sets exactly (transformers does not sort its rows), weights matched by id within
    1e-5 absolute plus 1e-5 relative, as the Rust golden tests; near-tie rows skipped."""
    assert ids.shape == golden_ids.shape and weights.shape == golden_weights.shape
    for row in range(ids.shape[0]):
        if row in near_ties:
            continue
        got = dict(zip(ids[row].tolist(), weights[row].tolist()))
        want = dict(zip(golden_ids[row].tolist(), golden_weights[row].tolist()))
        assert set(got) == set(want), f"row {row}: experts {sorted(got)} != {sorted(want)}"
        for expert, expected in want.items():
            actual = got[expert]
            assert abs(actual - expected) <= 1e-5 + 1e-5 * abs(expected), (row, expert, actual)


def tiny_config(**overrides) -> dict:
    """A DeepSeek-V3-shaped config of 16 experts and hidden size 32, in config.json form."""
    config = {
        "model_type": "deepseek_v3",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 0,
        "moe_layer_freq": 1,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    }
    config.update(overrides)
    return config


def tiny_gate(**options) -> tuple[sluice.Gate, torch.nn.Parameter, torch.Tensor]:
    """A seeded gate from tensors: the weight is an `nn.Parameter`, as in a loaded model."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.nn.Parameter(torch.randn(16, 32, generator=generator))
    bias = torch.randn(16, generator=generator) * 0.1
    return sluice.Gate.from_tensors(weight, bias, tiny_config(), **options), weight, bias


class GraphCase:
    """The gate and buffers of a CUDA graph test on `device`: 64 experts of hidden size 256, 6
    picks from 4 of 8 groups, for 12 tokens. The seeded bf16 weight `[64, 256]` and bias `[64]`
    are on the host, for each test to place; the same generator then draws the static inputs of
    the replays. `ids` and `weights` `[tokens, top_k]` are on `device`, -1 until a call writes
    them."""

    experts, hidden_size, top_k, tokens = 64, 256, 6, 12

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.config = tiny_config(
            hidden_size=self.hidden_size,
            n_routed_experts=self.experts,
            num_experts_per_tok=self.top_k,
            n_group=8,
            topk_group=4,
        )
        self.weight = (
            torch.randn(self.experts, self.hidden_size, generator=self.generator) * 0.05
        ).to(torch.bfloat16)
        self.bias = torch.randn(self.experts, generator=self.generator) * 0.1
        shape = (self.tokens, self.top_k)
        self.ids = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.weights = torch.full(shape, -1.0, device=device)

    def static_input(self) -> torch.Tensor:
        """The next bf16 hidden states `[tokens, hidden_size]` of the generator, on the device."""
        hidden = torch.randn(self.tokens, self.hidden_size, generator=self.generator)
        return hidden.to(torch.bfloat16).to(self.device)

    def warm_up(self, step) -> None:
        """Runs `step` once on a side stream of the device and waits for it, as torch asks
        before a capture."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)

    def capture(self, step) -> torch.cuda.CUDAGraph:
        """`step` captured in a CUDA graph on torch's current device, which must be the case's,
        after `ids` and `weights` are set to -1; asserts that the capture wrote none of the ids."""
        self.ids.fill_(-1)
        self.weights.fill_(-1.0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize(self.device)
        assert bool((self.ids == -1).all()), "a capture records the work, it does not run it"
        return graph


@pytest.fixture
def gate():
    return tiny_gate()[0]
