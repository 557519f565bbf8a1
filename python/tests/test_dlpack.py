"""The DLPack door with torch as the client: zero-copy both ways, outputs freed exactly once,
single-use capsules, and `requires_grad` carried through every path torch offers."""

import sys
import threading
import time

import numpy as np
import pytest
import torch

import sluice
from conftest import tiny_config, tiny_gate
from dlpack_producers import (
    PATHS,
    LegacyProducer,
    PreVersionedProducer,
    VersionedProducer,
)


def test_torch_offers_the_c_exchange_api():
    """The `c-exchange-api` path of `PATHS` is torch itself, which dlpark asks through this API
    first; torch's `__dlpack__` refuses a tensor that requires grad, the API does not."""
    assert hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
    with pytest.raises(BufferError):
        torch.nn.Parameter(torch.ones(2)).__dlpack__()


@pytest.mark.parametrize("path", PATHS)
def test_requires_grad_is_carried_and_a_plain_reexport_refused(path):
    parameter = torch.nn.Parameter(torch.randn(4, 32))
    imported = sluice.Tensor.from_dlpack(PATHS[path](parameter))
    assert imported.requires_grad
    assert imported.data_ptr == parameter.data_ptr()
    with pytest.raises(BufferError, match="cannot export a tensor that requires grad"):
        torch.from_dlpack(imported)
    with pytest.raises(BufferError, match="call `.detach\\(\\)` first"):
        imported.__dlpack__(max_version=(1, 0))
    detached = torch.from_dlpack(imported.detach())
    assert detached.data_ptr() == parameter.data_ptr()


@pytest.mark.parametrize("path", PATHS)
def test_the_original_bug_a_parameter_weight_and_grad_hidden_states_route(path):
    """The crash sluice exists for: a gate weight that is an `nn.Parameter`, and hidden states
    that require grad. The gate detaches both at sluice's bridge; routing matches the detached
    inputs' exactly."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(16, 32, generator=generator))
    bias = torch.randn(16, generator=generator) * 0.1
    hidden = torch.randn(6, 32, generator=generator).requires_grad_()
    gate = sluice.Gate.from_tensors(PATHS[path](weight), bias, tiny_config())
    assert gate.weight.requires_grad and gate.weight.data_ptr == weight.data_ptr()
    reference = sluice.Gate.from_tensors(weight.detach(), bias, tiny_config())
    for got, want in zip(gate.route(PATHS[path](hidden)), reference.route(hidden.detach())):
        assert torch.equal(got, want)
    ids_out = torch.empty(6, 4, dtype=torch.int32)
    weights_out = torch.empty(6, 4)
    gate.route_into(PATHS[path](hidden), ids_out, weights_out)
    assert torch.equal(ids_out, reference.route(hidden.detach())[0])
    assert hidden.requires_grad and weight.requires_grad


def test_the_paths_are_the_ones_named():
    tensor = torch.randn(2, 32)
    versioned, legacy = VersionedProducer(tensor), LegacyProducer(tensor)
    pre_versioned = PreVersionedProducer(tensor)
    for producer in (versioned, legacy, pre_versioned):
        assert sluice.Tensor.from_dlpack(producer).data_ptr == tensor.data_ptr()
    assert versioned.calls and versioned.calls[0].get("max_version", (0, 0))[0] >= 1
    assert legacy.calls == [{}]
    assert pre_versioned.calls == [{"stream": None}]


class DeviceClaimingProducer:
    """Says its tensor is on cuda:0 and records how `__dlpack__` is asked, then stops there;
    `pre_versioned` takes no `max_version`, as producers from before DLPack 1.0."""

    def __init__(self, pre_versioned=False):
        self.calls = []
        self.pre_versioned = pre_versioned

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None, **kwargs):
        if self.pre_versioned and kwargs:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        self.calls.append({"stream": stream, **kwargs})
        raise BufferError("recorded")


@pytest.mark.parametrize("pre_versioned", [False, True])
def test_device_producers_are_asked_not_to_synchronise(pre_versioned):
    """sluice enqueues on the caller's stream, where the caller has the inputs ready: a device
    producer is asked for `stream=-1`, never for the legacy default stream (what no stream means
    to some torch versions), which would make that stream wait on the current one and break a
    CUDA graph capture. Host producers are asked for no stream at all."""
    producer = DeviceClaimingProducer(pre_versioned)
    with pytest.raises(BufferError, match="recorded"):
        sluice.Tensor.from_dlpack(producer)
    assert [call["stream"] for call in producer.calls] == [-1]
    host = VersionedProducer(torch.randn(2, 3))
    sluice.Tensor.from_dlpack(host)
    assert "stream" not in host.calls[0]


def test_a_producer_that_refuses_a_grad_tensor_is_a_buffer_error():
    """Without `requires_grad` or `detach` sluice cannot know; torch's own refusal comes
    through as the `BufferError` it is, not a crash."""
    hidden = VersionedProducer(
        torch.randn(2, 32).requires_grad_(), tell_requires_grad=False, offer_detach=False
    )
    with pytest.raises(BufferError, match="require gradient"):
        tiny_gate()[0].route(hidden)


def test_zero_copy_both_ways(gate):
    hidden = torch.randn(5, 32)
    assert sluice.Tensor.from_dlpack(hidden).data_ptr == hidden.data_ptr()
    ids, weights = gate._gate.route(hidden)
    for native in (ids, weights):
        assert torch.from_dlpack(native).data_ptr() == native.data_ptr
    ids_buffer = torch.zeros(8, 4, dtype=torch.int32)
    weights_buffer = torch.zeros(8, 4)
    pointers = (ids_buffer.data_ptr(), weights_buffer.data_ptr())
    gate.route_into(hidden, ids_buffer[:5], weights_buffer[:5])
    assert (ids_buffer.data_ptr(), weights_buffer.data_ptr()) == pointers
    assert torch.equal(ids_buffer[:5], torch.from_dlpack(ids))
    assert torch.count_nonzero(ids_buffer[5:]) == 0


def test_outputs_may_be_windows_with_rows_further_apart(gate):
    hidden = torch.randn(5, 32)
    ids, weights = gate.route(hidden)
    wide_ids = torch.full((5, 10), -3, dtype=torch.int32)
    wide_weights = torch.full((5, 10), -3.0)
    gate.route_into(hidden, wide_ids[:, 2:6], wide_weights[:, 2:6])
    assert torch.equal(wide_ids[:, 2:6], ids) and torch.equal(wide_weights[:, 2:6], weights)
    assert bool((wide_ids[:, :2] == -3).all() and (wide_ids[:, 6:] == -3).all())


def test_any_dlpack_producer_numpy(gate):
    hidden = torch.randn(3, 32)
    ids, _ = gate.route(hidden.numpy())
    assert torch.equal(ids, gate.route(hidden)[0])


def test_a_consumed_capsule_is_refused(gate):
    capsule = torch.utils.dlpack.to_dlpack(torch.randn(3, 32))
    gate.route(capsule)
    with pytest.raises(ValueError, match="already been consumed"):
        gate.route(capsule)


def _rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _rss_growth(step, calls=100_000, warmup=2_000):
    for _ in range(warmup):
        step()
    before = _rss_bytes()
    for _ in range(calls):
        step()
    return _rss_bytes() - before


LEAK_LIMIT = 4 << 20  # 100k leaked [2, 4] outputs would be at least 6 MB


def test_route_outputs_are_freed_exactly_once(gate):
    hidden = torch.randn(2, 32)
    assert _rss_growth(lambda: gate.route(hidden)) < LEAK_LIMIT


def test_capsules_are_freed_whether_consumed_or_not(gate):
    ids, _ = gate._gate.route(torch.randn(2, 32))
    assert _rss_growth(lambda: ids.__dlpack__(max_version=(1, 0))) < LEAK_LIMIT
    assert _rss_growth(lambda: torch.from_dlpack(ids)) < LEAK_LIMIT


def test_exports_are_versioned_because_they_are_read_only(gate):
    """sluice keeps sharing what it exports, so every export is marked read-only, which only
    versioned DLPack can say: a legacy request is refused rather than handed writable memory."""
    ids, _ = gate._gate.route(torch.randn(2, 32))
    with pytest.raises(BufferError, match="legacy"):
        ids.__dlpack__()


def test_route_into_leaks_nothing(gate):
    hidden = torch.randn(2, 32)
    ids, weights = torch.empty(2, 4, dtype=torch.int32), torch.empty(2, 4)
    assert _rss_growth(lambda: gate.route_into(hidden, ids, weights)) < LEAK_LIMIT


def test_the_gil_is_released_while_routing():
    """The main thread runs Python while another thread is inside `route`.

    The switch interval is made so long that a thread holding the GIL is never made to drop it:
    the main thread gets the GIL back from the routing thread only if `route` releases it. A call
    that held it (a long regular expression match, say) leaves no tick inside its window."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(256, 7168, generator=generator).to(torch.bfloat16)
    gate = sluice.Gate.from_tensors(
        weight,
        torch.zeros(256),
        {
            **tiny_config(),
            "hidden_size": 7168,
            "n_routed_experts": 256,
            "num_experts_per_tok": 8,
            "n_group": 8,
            "topk_group": 4,
        },
        backend=sluice.CpuBackend(threads=1),
    )
    hidden = torch.randn(1024, 7168, generator=generator)
    calls = []

    def route_three_times():
        for _ in range(3):
            started = time.perf_counter()
            gate.route(hidden)
            calls.append((started, time.perf_counter()))

    routing = threading.Thread(target=route_three_times)
    ticks = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        routing.start()
        while routing.is_alive():
            ticks.append(time.perf_counter())
            time.sleep(0.0002)  # hands the GIL to the routing thread
    finally:
        sys.setswitchinterval(interval)
    ticks = np.array(ticks)
    inside = sum(int(((ticks > start) & (ticks < end)).sum()) for start, end in calls)
    assert len(calls) == 3 and inside > 10, f"{inside} ticks inside the calls {calls}"
