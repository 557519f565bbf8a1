"""The dispatch layout from Python: `Gate.route_and_dispatch` and `route_and_dispatch_into` give
the ids `route` gives and the layout a sort-based torch reference computes from them (counts,
offsets, the stable order, its inverse, the padded layout of a grouped GEMM and the per-rank
rows of an all-to-all), and `dispatch_into` that layout of ids the caller has, on the CPU and on a CUDA device, where the call is also captured in a
CUDA graph; a malformed `layout` mapping is a `ValueError` naming what is wrong.

Tests marked `cuda` skip without a CUDA device unless `SLUICE_REQUIRE_GPU` is set (see
conftest.py)."""

from __future__ import annotations

import pytest
import torch

import sluice
from conftest import FAMILIES, Golden, GraphCase, tiny_config, tiny_gate

cuda = pytest.mark.cuda
CUDA = torch.device("cuda", 0)


def reference_layout(
    ids: torch.Tensor,
    experts: int,
    block_size: int | None = None,
    expert_ranks: torch.Tensor | None = None,
    ranks: int | None = None,
) -> dict[str, torch.Tensor]:
    """The layout of `ids [T, K]` (-1: a skipped pair) by sorting, independent of sluice's
    kernels: what engines compute with `argsort` + `bincount` + `cumsum`."""
    ids = ids.cpu().long()
    tokens, top_k = ids.shape
    pairs = tokens * top_k
    flat = ids.reshape(-1)
    valid = flat >= 0
    counts = torch.bincount(flat[valid], minlength=experts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    used = int(offsets[-1])
    order = torch.sort(torch.where(valid, flat, experts), stable=True).indices[:used]
    sorted_pairs = torch.full((pairs,), pairs, dtype=torch.long)
    sorted_pairs[:used] = order
    inverse = torch.full((pairs,), -1, dtype=torch.long)
    inverse[order] = torch.arange(used)
    skipped_rows = (~valid).reshape(tokens, top_k).any(dim=1).nonzero().flatten()
    first = int(skipped_rows[0]) if len(skipped_rows) else -1
    layout = {
        "expert_counts": counts,
        "expert_offsets": offsets,
        "sorted_pairs": sorted_pairs,
        "inverse": inverse.reshape(tokens, top_k),
        "invalid": torch.tensor([len(skipped_rows), first]),
    }
    if block_size is not None:
        padded_counts = (counts + block_size - 1) // block_size * block_size
        padded_offsets = torch.cat([torch.zeros(1, dtype=torch.long), padded_counts.cumsum(0)])
        capacity = min(experts, pairs) * (block_size - 1) + pairs
        padded_pairs = torch.full((capacity,), pairs, dtype=torch.long)
        block_experts = torch.full((capacity // block_size,), -1, dtype=torch.long)
        for expert in range(experts):
            start, count = int(padded_offsets[expert]), int(counts[expert])
            run = sorted_pairs[int(offsets[expert]) : int(offsets[expert]) + count]
            padded_pairs[start : start + count] = run
            end = int(padded_offsets[expert + 1])
            block_experts[start // block_size : end // block_size] = expert
        layout.update(
            padded_pairs=padded_pairs,
            block_experts=block_experts,
            padded_total=padded_offsets[-1:],
        )
    if expert_ranks is not None:
        table = expert_ranks.cpu().long()
        rank_of = torch.where(valid, table[flat.clamp(min=0)], ranks)
        rank_counts = torch.bincount(rank_of[valid], minlength=ranks)
        # By rank, then expert, then pair.
        key = torch.where(valid, rank_of * experts + flat, ranks * experts)
        rank_order = torch.sort(key, stable=True).indices[:used]
        rank_pairs = torch.full((pairs,), pairs, dtype=torch.long)
        rank_pairs[:used] = rank_order
        token_of = torch.arange(pairs) // top_k
        rank_tokens = torch.tensor(
            [len(set(token_of[valid & (rank_of == r)].tolist())) for r in range(ranks)]
        )
        layout.update(
            rank_counts=rank_counts,
            rank_offsets=torch.cat([torch.zeros(1, dtype=torch.long), rank_counts.cumsum(0)]),
            rank_pairs=rank_pairs,
            rank_tokens=rank_tokens,
        )
    return layout


def assert_layout(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every expected output, int32, equal; the workspace (scratch) aside."""
    assert set(got) - {"workspace"} == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == torch.int32, name
        assert torch.equal(got[name].cpu().long(), want), name


def contiguous_ranks(experts: int, ranks: int, device: torch.device) -> torch.Tensor:
    """Expert `e` on rank `e * R // E`, as engines place them."""
    return (torch.arange(experts) * ranks // experts).to(torch.int32).to(device)


@pytest.mark.parametrize("tokens", [0, 1, 7, 64])
@pytest.mark.parametrize("block_size", [None, 1, 16])
@pytest.mark.parametrize("ranks", [None, 3])
def test_route_and_dispatch_on_the_cpu_is_route_then_the_reference_layout(
    tokens, block_size, ranks
):
    gate, _, _ = tiny_gate()
    hidden = torch.randn(tokens, gate.hidden_size, generator=torch.Generator().manual_seed(tokens))
    cpu = torch.device("cpu")
    table = None if ranks is None else contiguous_ranks(gate.num_experts, ranks, cpu)
    ids, weights, layout = gate.route_and_dispatch(
        hidden, block_size=block_size, expert_ranks=table, ranks=ranks
    )
    expected_ids, expected_weights = gate.route(hidden)
    assert torch.equal(ids, expected_ids) and torch.equal(weights, expected_weights)
    assert_layout(layout, reference_layout(ids, gate.num_experts, block_size, table, ranks))


def test_a_row_marked_invalid_is_skipped_and_counted():
    gate, _, _ = tiny_gate(mark_invalid=True)
    hidden = torch.randn(5, gate.hidden_size, generator=torch.Generator().manual_seed(3))
    hidden[2, 4] = float("nan")
    ids, _, layout = gate.route_and_dispatch(hidden, block_size=4)
    assert bool((ids[2] == -1).all())
    assert layout["invalid"].tolist() == [1, 2]
    assert bool((layout["inverse"][2] == -1).all())
    assert_layout(layout, reference_layout(ids, gate.num_experts, 4))


def test_route_and_dispatch_into_writes_windows_of_the_callers_buffers():
    """Outputs that are row windows of larger buffers, as an engine's preallocated ones."""
    gate, _, _ = tiny_gate()
    tokens, top_k = 6, gate.top_k
    hidden = torch.randn(tokens, gate.hidden_size, generator=torch.Generator().manual_seed(9))
    ids = torch.full((10, top_k), -7, dtype=torch.int32)
    weights = torch.zeros(10, top_k)
    layout = gate.empty_layout(tokens, block_size=8)
    gate.route_and_dispatch_into(hidden, ids[2:8], weights[2:8], layout, block_size=8)
    assert bool((ids[:2] == -7).all()) and bool((ids[8:] == -7).all())
    assert torch.equal(ids[2:8], gate.route(hidden)[0])
    assert_layout(layout, reference_layout(ids[2:8], gate.num_experts, 8))


def some_ids(tokens: int, top_k: int, experts: int, seed: int) -> torch.Tensor:
    """Ids an engine routed itself: K distinct experts a row, every fifth pair skipped (-1)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)]
    ids = torch.stack(rows) if rows else torch.empty(0, top_k, dtype=torch.long)
    ids.view(-1)[::5] = -1
    return ids.to(torch.int32)


@pytest.mark.parametrize("tokens", [0, 1, 7, 64])
@pytest.mark.parametrize("block_size, ranks", [(None, None), (16, None), (4, 3)])
def test_dispatch_into_lays_out_ids_the_caller_has(tokens, block_size, ranks):
    gate, _, _ = tiny_gate()
    experts, cpu = gate.num_experts, torch.device("cpu")
    ids = some_ids(tokens, gate.top_k, experts, seed=tokens)
    table = None if ranks is None else contiguous_ranks(experts, ranks, cpu)
    layout = gate.empty_layout(tokens, block_size=block_size, ranks=ranks)
    gate.dispatch_into(ids, layout, block_size=block_size, expert_ranks=table)
    assert_layout(layout, reference_layout(ids, experts, block_size, table, ranks))


def test_dispatch_into_of_routed_ids_is_the_layout_route_and_dispatch_gives():
    gate, _, _ = tiny_gate()
    hidden = torch.randn(9, gate.hidden_size, generator=torch.Generator().manual_seed(4))
    ids, _, together = gate.route_and_dispatch(hidden, block_size=8)
    layout = gate.empty_layout(9, block_size=8)
    gate.dispatch_into(ids, layout, block_size=8)
    assert all(torch.equal(layout[name], together[name]) for name in together)


def test_dispatch_into_refuses_an_id_outside_the_experts_before_anything_is_written():
    gate, _, _ = tiny_gate()
    ids = some_ids(4, gate.top_k, gate.num_experts, seed=2)
    ids[3, 0] = gate.num_experts
    layout = gate.empty_layout(4)
    for output in layout.values():
        output.fill_(-5)
    with pytest.raises(ValueError, match="topk_ids"):
        gate.dispatch_into(ids, layout)
    assert all(bool((output == -5).all()) for output in layout.values())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda layout: layout.update(expert_count=layout["expert_counts"]), "no output is named"),
        (lambda layout: layout.pop("sorted_pairs"), "every layout asks for"),
        (lambda layout: layout.pop("padded_total"), "`block_size` asks for"),
    ],
)
def test_a_malformed_layout_is_refused_before_anything_is_written(change, message):
    gate, _, _ = tiny_gate()
    hidden = torch.randn(3, gate.hidden_size)
    ids = torch.full((3, gate.top_k), -7, dtype=torch.int32)
    weights = torch.zeros(3, gate.top_k)
    layout = gate.empty_layout(3, block_size=4)
    change(layout)
    with pytest.raises(ValueError, match=message):
        gate.route_and_dispatch_into(hidden, ids, weights, layout, block_size=4)
    assert bool((ids == -7).all())


def test_padded_or_rank_outputs_without_their_switch_are_refused():
    gate, _, _ = tiny_gate()
    hidden = torch.randn(3, gate.hidden_size)
    ids, weights = torch.empty(3, gate.top_k, dtype=torch.int32), torch.empty(3, gate.top_k)
    with pytest.raises(ValueError, match="need `block_size`"):
        gate.route_and_dispatch_into(hidden, ids, weights, gate.empty_layout(3, block_size=4))
    with pytest.raises(ValueError, match="need `expert_ranks`"):
        gate.route_and_dispatch_into(hidden, ids, weights, gate.empty_layout(3, ranks=2))
    with pytest.raises(ValueError, match="go together"):
        gate.route_and_dispatch(hidden, ranks=2)


def test_a_layout_output_over_the_routing_outputs_is_refused():
    """The layout reads the ids routing writes: an output laid over them would change them."""
    gate, _, _ = tiny_gate()
    hidden = torch.randn(3, gate.hidden_size)
    ids = torch.full((3, gate.top_k), -7, dtype=torch.int32)
    weights = torch.zeros(3, gate.top_k)
    layout = gate.empty_layout(3)
    layout["sorted_pairs"] = ids.view(-1)
    with pytest.raises(ValueError, match="sorted_pairs"):
        gate.route_and_dispatch_into(hidden, ids, weights, layout)
    assert bool((ids == -7).all())


def test_a_layout_output_of_the_wrong_dtype_is_sluices_error_naming_it():
    gate, _, _ = tiny_gate()
    hidden = torch.randn(3, gate.hidden_size)
    ids, weights = torch.empty(3, gate.top_k, dtype=torch.int32), torch.empty(3, gate.top_k)
    layout = gate.empty_layout(3)
    layout["expert_counts"] = torch.empty(gate.num_experts, dtype=torch.int64)
    with pytest.raises(ValueError, match="expert_counts"):
        gate.route_and_dispatch_into(hidden, ids, weights, layout)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_fixture_family_lays_out_its_own_routing(family):
    """Every layer of every golden fixture (DeepSeek-V4's hash-routed ones with their token ids):
    the ids `route` gives, laid out as the reference lays them out."""
    golden = Golden(family)
    hidden = golden.hidden("f32")
    for layer in golden.moe_layers:
        gate = sluice.Gate.from_pretrained(golden.dir, layer)
        ids, weights, layout = gate.route_and_dispatch(
            hidden, block_size=4, input_ids=golden.input_ids
        )
        expected_ids, expected_weights = gate.route(hidden, golden.input_ids)
        assert torch.equal(ids, expected_ids) and torch.equal(weights, expected_weights)
        assert_layout(layout, reference_layout(ids, gate.num_experts, 4))


def large_gate(device: torch.device, experts: int, top_k: int, **options) -> sluice.Gate:
    """A V3-shaped gate of `experts` experts (hidden size 256, 8 groups keep 4) on `device`."""
    generator = torch.Generator().manual_seed(experts)
    config = tiny_config(
        hidden_size=256,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_group=8,
        topk_group=4,
    )
    weight = (torch.randn(experts, 256, generator=generator) * 0.05).to(torch.bfloat16)
    bias = torch.randn(experts, generator=generator) * 0.1
    return sluice.Gate.from_tensors(weight.to(device), bias.to(device), config, **options)


@cuda
@pytest.mark.parametrize("tokens", [1, 3, 8, 64, 65, 300])
def test_route_and_dispatch_on_a_cuda_device_is_route_then_the_reference_layout(tokens):
    """One kernel for decode batches (up to 64 rows of 256 experts), two launches past them."""
    gate = large_gate(CUDA, 256, 8)
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 256, generator=generator).to(torch.bfloat16).to(CUDA)
    for block_size, ranks in [(None, None), (16, None), (64, 4)]:
        table = None if ranks is None else contiguous_ranks(256, ranks, CUDA)
        ids, weights, layout = gate.route_and_dispatch(
            hidden, block_size=block_size, expert_ranks=table, ranks=ranks
        )
        assert ids.device == CUDA and layout["sorted_pairs"].device == CUDA
        expected_ids, expected_weights = gate.route(hidden)
        assert torch.equal(ids, expected_ids) and torch.equal(weights, expected_weights)
        assert_layout(layout, reference_layout(ids, 256, block_size, table, ranks))


@cuda
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_dispatch_into_on_a_cuda_device_is_the_reference_layout(tokens):
    """Ids the caller has, laid out on torch's current stream (one block for few rows, row
    tiles with a workspace from torch's allocator past them)."""
    gate = large_gate(CUDA, 256, 8)
    ids = some_ids(tokens, 8, 256, seed=tokens)
    table = contiguous_ranks(256, 4, CUDA)
    layout = gate.empty_layout(tokens, block_size=16, ranks=4)
    gate.dispatch_into(ids.to(CUDA), layout, block_size=16, expert_ranks=table)
    assert_layout(layout, reference_layout(ids, 256, 16, table, 4))


@cuda
def test_route_and_dispatch_into_is_captured_in_a_cuda_graph():
    """Graph replays with new hidden states lay out the new ids, the buffers made once."""
    case = GraphCase(seed=5, device=CUDA)
    gate = sluice.Gate.from_tensors(
        case.weight.to(CUDA), case.bias.to(CUDA), case.config, mark_invalid=True
    )
    x = case.static_input()
    layout = gate.empty_layout(case.tokens, block_size=16)
    workspace = torch.empty(gate.workspace_bytes(case.tokens), dtype=torch.uint8, device=CUDA)

    def step():
        gate.route_and_dispatch_into(
            x, case.ids, case.weights, layout, block_size=16, workspace=workspace
        )

    gate.warm_up(case.tokens)
    case.warm_up(step)
    graph = case.capture(step)
    for _ in range(2):
        x.copy_(case.static_input())
        for output in layout.values():
            output.fill_(-5)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(case.ids, gate.route(x)[0])
        assert_layout(layout, reference_layout(case.ids, case.experts, 16))
