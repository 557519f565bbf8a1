"""What the dispatch layout costs a Python engine on the CPU, side by side with torch.

For each token count, per call (the fastest of several repetitions of many calls, in
microseconds), on a DeepSeek-V3-shaped gate:

- `route_into`: the gate alone, into buffers made once;
- `route_and_dispatch_into`: the gate and the layout of its ids (padded to `--block-size`), into a
  layout made once with `empty_layout`: what the binding and the layout add is the difference;
- torch's layout of the same ids, the sort-based version engines write (`argsort` of the
  flattened ids, `bincount`, `cumsum`, the inverse, the padded layout), after `route_into`.

Both layouts are checked equal before timing.

    python python/bench/layout_call.py --tokens 1,8,64,512 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

import sluice
from v3_gate import EXPERTS, HIDDEN, TOP_K, v3_gate

def torch_layout(ids: torch.Tensor, block_size: int) -> dict[str, torch.Tensor]:
    """The sort-based layout with padding, as engines write it in torch."""
    pairs = ids.numel()
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=EXPERTS)
    offsets = torch.zeros(EXPERTS + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=offsets[1:])
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(pairs)
    padded_counts = (counts + block_size - 1) // block_size * block_size
    padded_offsets = torch.zeros(EXPERTS + 1, dtype=torch.long)
    torch.cumsum(padded_counts, 0, out=padded_offsets[1:])
    capacity = min(EXPERTS, pairs) * (block_size - 1) + pairs
    padded_pairs = torch.full((capacity,), pairs, dtype=torch.long)
    # Each sorted pair's place in the padded layout: its expert's padded start plus its rank in
    # the expert's run.
    expert_of_sorted = flat[order]
    rank = torch.arange(pairs) - offsets[expert_of_sorted]
    padded_pairs[padded_offsets[expert_of_sorted] + rank] = order
    blocks = torch.arange(capacity // block_size) * block_size
    block_experts = torch.searchsorted(padded_offsets[1:], blocks, right=True)
    block_experts[blocks >= padded_offsets[-1]] = -1
    return {
        "expert_counts": counts,
        "expert_offsets": offsets,
        "sorted_pairs": order,
        "inverse": inverse.reshape(ids.shape),
        "padded_pairs": padded_pairs,
        "block_experts": block_experts,
        "padded_total": padded_offsets[-1:],
    }


def fastest_per_call(step, calls: int, repetitions: int) -> float:
    """The fastest repetition's time per call, in microseconds: on a shared machine,
    interference only ever adds time."""
    best = float("inf")
    for _ in range(repetitions):
        started = time.perf_counter()
        for _ in range(calls):
            step()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,8,64,512")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repetitions", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gate = v3_gate(sluice.CpuBackend(threads=args.threads))
    block_size = args.block_size
    print(
        f"V3 gate ({HIDDEN} -> {EXPERTS}, top-{TOP_K}), bf16, CPU, {args.threads} thread(s), "
        f"block size {block_size}; us per call"
    )
    header = ("T", 6), ("route_into", 11), ("+layout", 9), ("added", 8), ("torch layout", 13)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'ratio':>6}")
    for tokens in [int(t) for t in args.tokens.split(",")]:
        hidden = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
        hidden = hidden.to(torch.bfloat16)
        ids = torch.empty(tokens, TOP_K, dtype=torch.int32)
        weights = torch.empty(tokens, TOP_K)
        layout = gate.empty_layout(tokens, block_size=block_size)

        def route():
            gate.route_into(hidden, ids, weights)

        def route_and_layout():
            gate.route_and_dispatch_into(hidden, ids, weights, layout, block_size=block_size)

        def route_then_torch():
            gate.route_into(hidden, ids, weights)
            torch_layout(ids, block_size)

        route_and_layout()
        reference = torch_layout(ids, block_size)
        for name, expected in reference.items():
            assert torch.equal(layout[name].long(), expected), name
        calls = max(20, 20_000 // max(tokens, 1))
        steps = (route, route_and_layout, route_then_torch)
        gate_us, fused_us, torch_us = [fastest_per_call(s, calls, args.repetitions) for s in steps]
        added, torch_added = fused_us - gate_us, torch_us - gate_us
        print(
            f"{tokens:>6} {gate_us:>11.1f} {fused_us:>9.1f} {added:>8.1f} {torch_added:>13.1f} "
            f"{torch_added / max(added, 1e-9):>5.1f}x"
        )


if __name__ == "__main__":
    main()
