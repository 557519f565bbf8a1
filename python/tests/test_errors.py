"""Every refusal is a Python exception carrying sluice's message, never a crash."""

import numpy as np
import pytest
import torch

import sluice
from conftest import TESTDATA, tiny_config, tiny_gate


def test_bad_hidden_states_are_value_errors(gate):
    with pytest.raises(ValueError, match=r"layer 0: hidden states have shape \[5, 7\]"):
        gate.route(torch.randn(5, 7))
    with pytest.raises(ValueError, match="hidden states have shape"):
        gate.route(torch.randn(32))
    with pytest.raises(ValueError, match="dtype i64"):
        gate.route(torch.ones(2, 32, dtype=torch.int64))


def test_non_finite_rows_fail_or_are_marked():
    hidden = torch.randn(4, 32)
    hidden[2, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite hidden states in row 2"):
        tiny_gate()[0].route(hidden)
    ids, weights = tiny_gate(mark_invalid=True)[0].route(hidden)
    assert ids[2].tolist() == [-1] * 4 and weights[2].tolist() == [0.0] * 4
    assert bool((ids[[0, 1, 3]] >= 0).all())


def test_bad_outputs_are_refused_before_anything_is_written(gate):
    hidden = torch.randn(3, 32)
    ids, weights = torch.full((3, 4), -5, dtype=torch.int32), torch.full((3, 4), -5.0)
    cases = [
        ((ids.long(), weights), "`topk_ids` has dtype i64"),
        ((ids, weights[:2]), r"`topk_weights` has shape \[2, 4\]"),
        ((ids, weights.t().contiguous().t()), "last stride 1"),
        ((ids, ids.view(torch.float32)), "overlap"),
    ]
    for outputs, message in cases:
        with pytest.raises(ValueError, match=message):
            gate.route_into(hidden, *outputs)
        assert bool((ids == -5).all() and (weights == -5.0).all())


def test_refused_exports_are_buffer_errors(gate):
    hidden = torch.randn(3, 32)
    read_only = np.zeros((3, 4), dtype=np.float32)
    read_only.flags.writeable = False
    with pytest.raises(BufferError, match="read-only"):
        gate.route_into(hidden, torch.empty(3, 4, dtype=torch.int32), read_only)
    grad_weights = torch.zeros(3, 4, requires_grad=True)
    with pytest.raises(BufferError, match="requires grad"):
        gate.route_into(hidden, torch.empty(3, 4, dtype=torch.int32), grad_weights)


def test_legacy_outputs_are_refused(gate):
    with pytest.raises(ValueError, match="versioned DLPack"):
        gate.route_into(
            torch.randn(3, 32),
            torch.utils.dlpack.to_dlpack(torch.empty(3, 4, dtype=torch.int32)),
            torch.empty(3, 4),
        )


def test_host_tensors_take_no_stream(gate):
    with pytest.raises(ValueError, match="stream"):
        gate.route_into(
            torch.randn(3, 32), torch.empty(3, 4, dtype=torch.int32), torch.empty(3, 4), stream=7
        )


def test_token_ids_reach_the_contract_checks(gate):
    hidden = torch.randn(3, 32)
    ids, weights = gate.route(hidden, input_ids=torch.arange(3))
    assert torch.equal(ids, gate.route(hidden)[0])
    with pytest.raises(ValueError, match=r"`token_ids` has shape \[5\]"):
        gate.route(hidden, input_ids=torch.arange(5))
    with pytest.raises(ValueError, match="`token_ids` has dtype f32"):
        gate.route(hidden, input_ids=torch.zeros(3))


def test_bad_checkpoints_and_configs():
    with pytest.raises(OSError, match="config.json"):
        sluice.Gate.from_pretrained(TESTDATA / "no-such-model", 3)
    with pytest.raises(ValueError, match="dense"):
        sluice.Gate.from_pretrained(TESTDATA / "v3", 0)
    with pytest.raises(ValueError, match="out of range|num_layers|layer 99"):
        sluice.Gate.from_pretrained(TESTDATA / "v3", 99)
    weight = torch.randn(16, 32)
    with pytest.raises(ValueError, match="n_group"):
        sluice.Gate.from_tensors(weight, torch.zeros(16), tiny_config(n_group=5))
    with pytest.raises(ValueError, match="hidden size 32"):
        sluice.Gate.from_tensors(weight, torch.zeros(16), tiny_config(hidden_size=64))
    with pytest.raises(ValueError, match="bias"):
        sluice.Gate.from_tensors(weight, None, tiny_config())
    with pytest.raises(ValueError):
        sluice.Gate.from_tensors(weight, torch.zeros(16), "{not json")


def test_objects_without_dlpack_are_type_errors(gate):
    with pytest.raises(TypeError, match="DLPack"):
        gate.route([[0.0] * 32])


def test_backend_settings():
    backend = sluice.CpuBackend(threads=2, idle_spin_us=0)
    assert (backend.threads, backend.idle_spin_us) == (2, 0)
    assert sluice.CpuBackend().idle_spin_us == sluice.DEFAULT_IDLE_SPIN_US
    with pytest.raises(ValueError, match="threads"):
        sluice.CpuBackend(threads=0)
    hidden = torch.randn(9, 32)
    parked, _, _ = tiny_gate(backend=backend)
    spinning, _, _ = tiny_gate(backend=sluice.CpuBackend(threads=2, idle_spin_us=5000))
    for got, want in zip(parked.route(hidden), spinning.route(hidden)):
        assert torch.equal(got, want)


def test_devices_are_named_as_torch_names_them(gate):
    assert gate.device == torch.device("cpu") and gate.workspace_bytes(64) == 0
    assert gate.warm_up(64) is None  # nothing to prepare on the host
    assert sluice.Gate.from_pretrained(TESTDATA / "v3", 3, device="cpu").device == gate.device
    for device in ("tpu", "cuda:x", "mps:0"):
        with pytest.raises(ValueError, match="sluice routes on 'cpu' or 'cuda"):
            sluice.Gate.from_pretrained(TESTDATA / "v3", 3, device=device)
    with pytest.raises(TypeError):
        sluice.Gate.from_pretrained(TESTDATA / "v3", 3, backend="cuda")


def test_the_status_counts_the_rows_a_marking_gate_marks():
    hidden = torch.randn(5, 32)
    hidden[3, 0] = float("inf")
    gate = tiny_gate(mark_invalid=True)[0]
    assert gate.mark_invalid and not tiny_gate()[0].mark_invalid
    ids, weights = torch.empty(5, 4, dtype=torch.int32), torch.empty(5, 4)
    status = torch.full((2,), 7, dtype=torch.int32)
    gate.route_into(hidden, ids, weights, status=status)
    assert status.tolist() == [1, 3] and ids[3].tolist() == [-1] * 4
    gate.route_into(hidden[:3], ids[:3], weights[:3], status=status)
    assert status.tolist() == [0, -1]
    with pytest.raises(ValueError, match="`status` has shape"):
        gate.route_into(hidden, ids, weights, status=torch.empty(3, dtype=torch.int32))
