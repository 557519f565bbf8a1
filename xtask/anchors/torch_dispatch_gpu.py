#!/usr/bin/env python3
"""PyTorch anchor for the dispatch layout: the sort-based version engines write without a
dedicated kernel, side by side with `sluice bench --backend cuda --dispatch`.

For expert ids [T, K] among E experts (each row K distinct experts, uniformly drawn):
  sorted   torch.argsort(ids.flatten(), stable=True)   the (token, slot) pairs by expert
  counts   per-expert counts (bincount)
  offsets  torch.cumsum(counts)
  inverse  inverse[sorted] = arange(T * K)              where each pair sits
`bincount` reads the largest id back to the host to size its output, which a CUDA graph cannot
capture; the graph-replayed version counts with `scatter_add_` into E zeros instead (the same
counts). Timing as in torch_gate_gpu.py: CUDA events around repetitions of a replay of a graph of
--calls layouts, median over repetitions, divided by --calls (sluice's LAYOUT_CALLS is 20 too).

Writes --json (times and meta) and, given --sluice-json (the JSON of `sluice bench --backend cuda
--dispatch`), a markdown table of both to --markdown: what the layout adds to the graph-replayed
gate at every T (target <= 1.5 us at T <= 1024), and sluice's layout against the sort-based one at
the anchor's T (target >= 5x faster).  `--selftest` checks the reference and the report without
torch.

Run:  python3 torch_dispatch_gpu.py [--tokens 16384] [--experts 256] [--top-k 8]
                                    [--json PATH] [--sluice-json PATH --markdown PATH]
"""
import argparse
import json
import os
import statistics
import sys
import time

ADDED_TARGET_US = 1.5
ADDED_TARGET_MAX_T = 1024
SPEEDUP_TARGET = 5.0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--calls", type=int, default=20, help="layouts per graph replay")
    p.add_argument("--target-s", type=float, default=0.3, help="seconds per measurement")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--sluice-json", help="sluice bench --backend cuda --dispatch results")
    p.add_argument("--markdown", help="write the side-by-side table here")
    p.add_argument("--selftest", action="store_true")
    return p.parse_args(argv)


def reference_layout(flat, experts):
    """Plain Python, from the flattened ids: counts, exclusive offsets [E + 1], the stably sorted
    pairs, the inverse."""
    order = sorted(range(len(flat)), key=lambda pair: flat[pair])  # sorted() is stable
    counts = [0] * experts
    for e in flat:
        counts[e] += 1
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    inverse = [0] * len(flat)
    for position, pair in enumerate(order):
        inverse[pair] = position
    return counts, offsets, order, inverse


def side_by_side(sluice, torch_result):
    """Markdown of the sluice bench JSON beside the sort-based anchor's result."""
    lines = ["## Dispatch layout on the GPU", ""]
    meta = sluice.get("meta", {})
    lines.append("sluice: %s, block size %s; graph-replayed medians in us." % (
        meta.get("routing", "?"), meta.get("layout_block_size")))
    lines.append("")
    lines.append("| T | gate | gate + layout | added | target | layout alone |")
    lines.append("| ---: | ---: | ---: | ---: | :--- | ---: |")
    for r in sluice.get("results", []):
        added = r.get("layout_added_us")
        if added is None:
            continue
        target = ""
        if r["tokens"] <= ADDED_TARGET_MAX_T:
            target = "<= %.1f: %s" % (ADDED_TARGET_US, "met" if added <= ADDED_TARGET_US else "MISSED")
        lines.append("| %d | %.2f | %.2f | %.2f | %s | %.2f |" % (
            r["tokens"], r["graph_us"], r["graph_with_layout_us"], added, target,
            r["layout_graph_us"]))
    lines.append("")
    t = torch_result["tokens"]
    ours = [r for r in sluice.get("results", []) if r["tokens"] == t and r.get("layout_graph_us")]
    sort_us = torch_result["sort_graph_us"]
    lines.append("At T = %d, K = %d, E = %d: sort-based PyTorch (argsort + counts + cumsum + "
                 "inverse, graph-replayed) %.2f us, eager with bincount %.2f us." % (
                     t, torch_result["top_k"], torch_result["experts"], sort_us,
                     torch_result["sort_eager_us"]))
    if ours:
        speedup = sort_us / ours[0]["layout_graph_us"]
        lines.append("sluice `dispatch_into` %.2f us: %.1fx faster (target >= %.0fx: %s)." % (
            ours[0]["layout_graph_us"], speedup, SPEEDUP_TARGET,
            "met" if speedup >= SPEEDUP_TARGET else "MISSED"))
    else:
        lines.append("sluice has no layout time at T = %d in %s." % (t, "the given JSON"))
    return "\n".join(lines) + "\n"


def selftest():
    import random
    rng = random.Random(0)
    flat = [e for _ in range(9) for e in rng.sample(range(16), 4)]
    counts, offsets, order, inverse = reference_layout(flat, 16)
    assert sum(counts) == len(flat) and offsets[-1] == len(flat)
    for e in range(16):
        run = order[offsets[e]:offsets[e + 1]]
        assert all(flat[p] == e for p in run) and run == sorted(run)  # stable
    assert [order[i] for i in inverse] == list(range(len(flat)))
    sluice = {"meta": {"routing": "x", "layout_block_size": None}, "results": [
        {"tokens": 1, "graph_us": 10.0, "graph_with_layout_us": 11.0, "layout_added_us": 1.0,
         "layout_graph_us": 2.0},
        {"tokens": 16384, "graph_us": 90.0, "graph_with_layout_us": 95.0,
         "layout_added_us": 5.0, "layout_graph_us": 4.0}]}
    torch_result = {"tokens": 16384, "top_k": 8, "experts": 256, "sort_graph_us": 40.0,
                    "sort_eager_us": 80.0}
    md = side_by_side(sluice, torch_result)
    assert "10.0x faster" in md and "<= 1.5: met" in md, md
    print(md)
    print("selftest ok")
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.selftest:
        return selftest()
    import torch
    dev = torch.device("cuda")
    T, E, K = args.tokens, args.experts, args.top_k
    torch.manual_seed(0)
    ids = torch.rand(T, E, device=dev).topk(K, dim=1).indices.to(torch.int32).contiguous()
    pairs = T * K
    ones = torch.ones(pairs, dtype=torch.int32, device=dev)
    positions = torch.arange(pairs, device=dev)

    def layout_graphable():
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(E, dtype=torch.int32, device=dev).scatter_add_(0, flat.long(), ones)
        offsets = torch.cumsum(counts, 0)
        inverse = torch.empty_like(order)
        inverse[order] = positions
        return counts, offsets, order, inverse

    def layout_eager():
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        offsets = torch.cumsum(counts, 0)
        inverse = torch.empty_like(order)
        inverse[order] = positions
        return counts, offsets, order, inverse

    # Both versions against the numpy reference.
    want = reference_layout(ids.reshape(-1).tolist(), E)
    for name, fn in (("graphable", layout_graphable), ("eager", layout_eager)):
        counts, offsets, order, inverse = (x.tolist() for x in fn())
        assert counts == want[0], name
        assert offsets == want[1][1:], name
        assert order == want[2], name
        assert inverse == want[3], name

    def time_loop(fn, n_calls):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = time.perf_counter() - t0
        reps = max(5, min(100, int(args.target_s / max(est, 1e-7))))
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        evs[0].record()
        for i in range(reps):
            fn()
            evs[i + 1].record()
        torch.cuda.synchronize()
        ms = [evs[i].elapsed_time(evs[i + 1]) for i in range(reps)]
        return statistics.median(ms) * 1e3 / n_calls, min(ms) * 1e3 / n_calls

    def calls(fn):
        def run():
            for _ in range(args.calls):
                fn()
        return run

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        calls(layout_graphable)()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls(layout_graphable)()
    sort_graph_us, sort_graph_min_us = time_loop(graph.replay, args.calls)
    sort_eager_us, _ = time_loop(calls(layout_eager), args.calls)
    result = {
        "script": "torch_dispatch_gpu.py", "unit": "us", "tokens": T, "experts": E, "top_k": K,
        "calls_per_replay": args.calls, "sort_graph_us": sort_graph_us,
        "sort_graph_min_us": sort_graph_min_us, "sort_eager_us": sort_eager_us,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "method": "argsort(stable) + scatter_add_ counts + cumsum + inverse scatter, a graph of "
                  "calls_per_replay layouts replayed, CUDA events, median / calls; eager: the "
                  "same with bincount",
    }
    print("sort-based layout T=%d K=%d E=%d: graph %.2f us (min %.2f), eager %.2f us" % (
        T, K, E, sort_graph_us, sort_graph_min_us, sort_eager_us))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.sluice_json:
        with open(args.sluice_json) as f:
            md = side_by_side(json.load(f), result)
        print(md)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
