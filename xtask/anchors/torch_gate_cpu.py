#!/usr/bin/env python3
# The PyTorch CPU anchor sluice compares against: run by `cargo xtask bench-vs-torch`.
"""CPU anchor for the DeepSeek-V3 / Kimi-K2 / DeepSeek-V2-Lite / DeepSeek-V4 MoE gate: PyTorch and numpy.

Columns (each cell: median milliseconds per call; the markdown also shows GEMM GFLOP/s):
  lin_f32    F.linear(x f32, W f32)                      router GEMM only, f32
  lin_bf16   F.linear(x bf16, W bf16)                    router GEMM only, bf16 in/out (f32 accumulation)
  gate_best  "torch best gate": F.linear(x bf16, W bf16).float() + the HF router's routing written
             directly in torch (see route() below; no transformers import)
  gate_hf    HF DeepseekV3TopkRouter / DeepseekV2TopkRouter / DeepseekV4TopKRouter .forward (x f32; f32
             GEMM + routing); only when transformers is importable
  np_f32     numpy x @ W.T in f32 (numpy's BLAS)

Routing (V3 / Kimi-K2, as DeepseekV3TopkRouter): s = sigmoid(logits); c = s + bias; group score = sum of
the top-2 c in each of n_group groups; keep topk_group groups (top-k); c of the other groups -> -inf;
top-k experts over c; weights = s (unbiased) gathered at those experts; divided by (sum + 1e-20)
(norm_topk_prob); * routed_scaling_factor.
Routing (V2-Lite, as DeepseekV2TopkRouter with topk_method "greedy"): s = softmax(logits, f32); top-k;
weights = s at those experts * routed_scaling_factor (no renormalisation).
Routing (V4 top-k layers, as DeepseekV4TopKRouter): s = sqrt(softplus(logits)); top-k experts over s + bias
(no groups); weights = s gathered at those experts, divided by (sum + 1e-20), * routed_scaling_factor.

Method: waits for a quiet machine (other processes using < 5% of the CPUs); every cell is the median
of >= 20 timed calls after warm-up (>= 0.25 s of calls for fast kernels), repeated if other processes
used > 5% of the CPUs meanwhile; --rounds interleaved sweeps over all shapes/T, and each cell keeps
the lowest per-round median.  Same weight every call (cache-resident: a best case).
GFLOP/s counts only the GEMM: 2*T*H*E.

Needs torch + numpy; transformers (HF gate column) and threadpoolctl (numpy BLAS thread limit) are
optional.  Run:  python3 torch_gate_cpu.py --tokens 1,64,512 --json out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

try:
    import transformers
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter
except Exception:  # noqa: BLE001  (optional: only the HF gate column needs it)
    transformers = None

try:
    import threadpoolctl
except ImportError:  # optional, only used to report/limit the numpy BLAS
    threadpoolctl = None

SHAPES = {
    # key: display name, hidden, experts, groups, kept groups, top-k, scoring, renorm, scaling factor
    "v3": dict(name="DeepSeek-V3", H=7168, E=256, n_group=8, topk_group=4, k=8,
               scoring="sigmoid", renorm=True, scale=2.5),
    "kimi": dict(name="Kimi-K2", H=7168, E=384, n_group=1, topk_group=1, k=8,
                 scoring="sigmoid", renorm=True, scale=2.827),
    "v2lite": dict(name="DeepSeek-V2-Lite", H=2048, E=64, n_group=1, topk_group=1, k=6,
                   scoring="softmax", renorm=False, scale=1.0),
    "v4": dict(name="DeepSeek-V4", H=4096, E=256, n_group=1, topk_group=1, k=6,
               scoring="sqrtsoftplus", renorm=True, scale=1.5),
}
SHAPE_ALIASES = {"v3": "v3", "kimi": "kimi", "k2": "kimi", "kimi-k2": "kimi",
                 "v2lite": "v2lite", "v2l": "v2lite", "v2-lite": "v2lite", "v4": "v4"}
DEFAULT_TOKENS = "1,8,64,512,2048"
DEFAULT_THREADS = 2
LABELS = {
    "lin_f32": "F.linear f32",
    "lin_bf16": "F.linear bf16",
    "gate_best": "torch best gate",
    "gate_hf": "HF gate f32",
    "np_f32": "numpy f32",
}
QUIET_THRESH = 0.05

try:
    NCPU = len(os.sched_getaffinity(0))
except AttributeError:  # not Linux
    NCPU = os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# routing, written directly in torch (same ops, same order as the HF routers)
# ---------------------------------------------------------------------------------------------
def route(logits: torch.Tensor, bias: torch.Tensor | None, cfg: dict):
    """logits [T, E] f32 -> (topk_weights f32 [T, k], topk_ids int64 [T, k]), as the HF router."""
    k, E = cfg["k"], cfg["E"]
    if cfg["scoring"] == "softmax":  # DeepseekV2TopkRouter, topk_method "greedy"
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        w, ids = torch.topk(scores, k=k, dim=-1, sorted=False)
    elif cfg["scoring"] == "sqrtsoftplus":  # DeepseekV4TopKRouter: no groups, always renormalised
        scores = F.softplus(logits).sqrt()
        ids = torch.topk(scores + bias, k, dim=-1, sorted=False).indices
        w = scores.gather(1, ids)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    else:  # DeepseekV3TopkRouter (noaux_tc)
        G, TG = cfg["n_group"], cfg["topk_group"]
        scores = logits.sigmoid()
        sfc = scores + bias
        group_scores = sfc.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=TG, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        sfc = sfc.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(sfc, k=k, dim=-1, sorted=False)[1]
        w = scores.gather(1, ids)
        if cfg["renorm"]:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * cfg["scale"]
    return w, ids


def best_gate(x_bf16, w_bf16, bias, cfg):
    return route(F.linear(x_bf16, w_bf16).float(), bias, cfg)


def ref_route_np(logits, bias, cfg):
    """float64 numpy reference of the same routing (lowest index wins ties)."""
    x = np.asarray(logits, dtype=np.float64)
    T, E = x.shape
    k = cfg["k"]
    if cfg["scoring"] == "softmax":
        z = np.exp(x - x.max(axis=1, keepdims=True))
        scores = z / z.sum(axis=1, keepdims=True)
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        w = np.take_along_axis(scores, ids, axis=1)
    elif cfg["scoring"] == "sqrtsoftplus":
        scores = np.sqrt(np.logaddexp(0.0, x))
        biased = scores + np.asarray(bias, dtype=np.float64)[None, :]
        ids = np.argsort(-biased, axis=1, kind="stable")[:, :k]
        w = np.take_along_axis(scores, ids, axis=1)
        w = w / (w.sum(axis=1, keepdims=True) + 1e-20)
    else:
        G, TG = cfg["n_group"], cfg["topk_group"]
        scores = 1.0 / (1.0 + np.exp(-x))
        biased = scores + np.asarray(bias, dtype=np.float64)[None, :]
        gs = -np.sort(-biased.reshape(T, G, E // G), axis=2)[:, :, :2].sum(axis=2)
        keep = np.argsort(-gs, axis=1, kind="stable")[:, :TG]
        gmask = np.zeros((T, G), dtype=bool)
        np.put_along_axis(gmask, keep, True, axis=1)
        masked = np.where(np.repeat(gmask, E // G, axis=1), biased, -np.inf)
        ids = np.argsort(-masked, axis=1, kind="stable")[:, :k]
        w = np.take_along_axis(scores, ids, axis=1)
        if cfg["renorm"]:
            w = w / (w.sum(axis=1, keepdims=True) + 1e-20)
    return ids, w * cfg["scale"]


def compare_routes(ids_a, w_a, ids_b, w_b):
    """(fraction of rows with equal id SETS, max |dw| over those rows, weights matched by id)."""
    ids_a, ids_b = np.asarray(ids_a, np.int64), np.asarray(ids_b, np.int64)
    w_a, w_b = np.asarray(w_a, np.float64), np.asarray(w_b, np.float64)
    oa, ob = np.argsort(ids_a, axis=1), np.argsort(ids_b, axis=1)
    same = (np.take_along_axis(ids_a, oa, 1) == np.take_along_axis(ids_b, ob, 1)).all(axis=1)
    wd = 0.0
    if same.any():
        wd = float(np.abs(np.take_along_axis(w_a, oa, 1)[same] - np.take_along_axis(w_b, ob, 1)[same]).max())
    return float(same.mean()) if len(same) else 1.0, wd


def hf_router(cfg, w32, bias):
    """The HF router module for this shape, holding W (f32) and the bias; None without transformers."""
    if transformers is None:
        return None
    if cfg["scoring"] == "softmax":
        hc = DeepseekV2Config(hidden_size=cfg["H"], n_routed_experts=cfg["E"], num_experts_per_tok=cfg["k"],
                              topk_method="greedy", n_group=cfg["n_group"], topk_group=cfg["topk_group"],
                              routed_scaling_factor=cfg["scale"])
        router = DeepseekV2TopkRouter(hc).eval()
    elif cfg["scoring"] == "sqrtsoftplus":
        hc = DeepseekV4Config(hidden_size=cfg["H"], n_routed_experts=cfg["E"], num_experts_per_tok=cfg["k"],
                              routed_scaling_factor=cfg["scale"])
        router = DeepseekV4TopKRouter(hc).eval()
        router.e_score_correction_bias.copy_(bias)
    else:
        hc = DeepseekV3Config(hidden_size=cfg["H"], n_routed_experts=cfg["E"], n_group=cfg["n_group"],
                              topk_group=cfg["topk_group"], num_experts_per_tok=cfg["k"],
                              routed_scaling_factor=cfg["scale"], norm_topk_prob=cfg["renorm"])
        router = DeepseekV3TopkRouter(hc).eval()
        router.e_score_correction_bias.copy_(bias)
    router.weight.copy_(w32)
    return router


# ---------------------------------------------------------------------------------------------
# quiet-machine detection and timing
# ---------------------------------------------------------------------------------------------
def _stat():
    """(busy jiffies of the whole machine, own process cpu seconds, wall seconds); None if unknown."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def foreign_load(a, b):
    """Fraction of the machine's CPUs used by OTHER processes between two _stat() samples."""
    if a is None or b is None:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK")
    wall = b[2] - a[2]
    foreign = (b[0] - a[0]) / hz - (b[1] - a[1])
    return max(0.0, foreign) / (wall * NCPU) if wall > 0 else 0.0


def wait_quiet(max_wait_s=900.0, thresh=QUIET_THRESH):
    """Wait until other processes use < thresh of the CPUs for two consecutive 2 s windows.
    Returns True (quiet), False (gave up) or None (not checked: max_wait_s <= 0 or no /proc/stat)."""
    if _stat() is None or max_wait_s <= 0:
        return None
    t0, ok = time.perf_counter(), 0
    while time.perf_counter() - t0 < max_wait_s:
        a = _stat()
        time.sleep(2.0)
        fl = foreign_load(a, _stat())
        ok = ok + 1 if fl < thresh else 0
        if ok >= 2:
            return True
        if fl >= thresh:
            print(f"  waiting for a quiet machine (foreign load {fl:.0%})", flush=True)
    return False


def _bench_once(fn, min_runs, min_time, max_runs, warmup):
    for _ in range(warmup):
        fn()
    t_end = time.perf_counter() + 0.05
    while time.perf_counter() < t_end:  # a little extra warm-up for tiny kernels
        fn()
    times = []
    a = _stat()
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_time and len(times) < max_runs):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(times), len(times), foreign_load(a, _stat())


def bench(fn, min_runs=20, min_time=0.25, max_runs=2000, warmup=3, retries=4, thresh=QUIET_THRESH,
          requiet_s=120.0):
    """Median of >= min_runs timed calls after warm-up.  If other processes used more than `thresh`
    of the CPUs meanwhile, wait for quiet and measure again (keeping the least disturbed attempt);
    with requiet_s <= 0 (`--max-wait 0`: do not wait) one attempt is kept as it is."""
    best = None
    for _ in range(retries if requiet_s > 0 else 1):
        r = _bench_once(fn, min_runs, min_time, max_runs, warmup)
        if best is None or r[2] < best[2]:
            best = r
        if r[2] <= thresh:
            break
        wait_quiet(requiet_s, thresh)
    return best


# ---------------------------------------------------------------------------------------------
# machine description
# ---------------------------------------------------------------------------------------------
def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                fl = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                                            "avx512_vnni", "amx_bf16", "amx_tile") if f in fl)
    except OSError:
        pass
    return "?"


def loadavg():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="CPU anchor for the DeepSeek/Kimi MoE gate (PyTorch, numpy).")
    ap.add_argument("--shapes", default="v3,kimi,v2lite,v4",
                    help="comma list of v3, kimi, v2lite, v4 (default: all four)")
    ap.add_argument("--tokens", default=DEFAULT_TOKENS, help=f"comma list of T (default {DEFAULT_TOKENS})")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help=f"torch and numpy-BLAS threads (default {DEFAULT_THREADS})")
    ap.add_argument("--rounds", type=int, default=3, help="sweeps; each cell = lowest per-round median (default 3)")
    ap.add_argument("--quick", action="store_true", help="fewer calls per median (5 instead of 20): smoke test")
    ap.add_argument("--max-wait", type=float, default=900.0,
                    help="seconds to wait for a quiet machine at start (default 900; 0 = do not wait)")
    ap.add_argument("--json", metavar="PATH", help="write machine-readable results (median ms per shape/T/column)")
    ap.add_argument("--md", metavar="PATH", help="also write the markdown report to PATH")
    args = ap.parse_args(argv)
    shapes = []
    for s in (x.strip().lower() for x in args.shapes.split(",") if x.strip()):
        if s not in SHAPE_ALIASES:
            ap.error(f"unknown shape {s!r}; choose from v3, kimi, v2lite, v4")
        if SHAPE_ALIASES[s] not in shapes:
            shapes.append(SHAPE_ALIASES[s])
    try:
        tokens = [int(x) for x in args.tokens.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--tokens must be a comma list of integers, got {args.tokens!r}")
    if not shapes or not tokens or min(tokens) < 1:
        ap.error("need at least one shape and token counts >= 1")
    if args.threads < 1 or args.rounds < 1:
        ap.error("--threads and --rounds must be >= 1")
    args.shape_keys, args.token_list = shapes, tokens
    return args


# ---------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    min_runs = 5 if args.quick else 20
    torch.set_num_threads(args.threads)
    limiter = threadpoolctl.threadpool_limits(limits=args.threads, user_api="blas") if threadpoolctl else None
    blas_info = threadpoolctl.threadpool_info() if threadpoolctl else []
    np_blas = ", ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, "
                        f"{i.get('num_threads')} thr)" for i in blas_info if i.get("user_api") == "blas") or "?"
    torch_cfg = torch.__config__.show()
    mkl = next((ln.strip(" -") for ln in torch_cfg.splitlines() if "Math Kernel Library" in ln), "MKL ?")
    dnnl = next((ln.strip(" -") for ln in torch_cfg.splitlines() if "MKL-DNN" in ln or "oneDNN" in ln), "oneDNN ?")
    keys = ["lin_f32", "lin_bf16", "gate_best"] + (["gate_hf"] if transformers is not None else []) + ["np_f32"]

    # ---- setup and correctness checks (before any timing) ----
    torch.manual_seed(0)
    setups = []  # (row dict, {key: fn})
    checks, check_failed = [], False
    with torch.inference_mode():
        for sk in args.shape_keys:
            cfg = SHAPES[sk]
            H, E = cfg["H"], cfg["E"]
            w32 = torch.randn(E, H) * (2.0 / H**0.5)
            bias = torch.randn(E) * 0.05 if cfg["scoring"] != "softmax" else None
            wbf = w32.to(torch.bfloat16)
            w_np = w32.numpy()
            router = hf_router(cfg, w32, bias)

            xc = torch.randn(16, H)
            w_d, id_d = route(F.linear(xc, w32), bias, cfg)
            ref_ids, ref_w = ref_route_np(F.linear(xc, w32).double().numpy(),
                                          None if bias is None else bias.double().numpy(), cfg)
            m, d = compare_routes(id_d.numpy(), w_d.numpy(), ref_ids, ref_w)
            msg = f"{cfg['name']}: torch routing vs float64 numpy (same f32 logits) ids match {m:.3f}, max|dw| {d:.1e}"
            if router is not None:
                _, w_h, id_h = router(xc)
                m2, d2 = compare_routes(id_d.numpy(), w_d.numpy(), id_h.numpy(), w_h.numpy())
                msg += f"; vs HF router ids match {m2:.3f}, max|dw| {d2:.1e}"
                if m2 != 1.0 or d2 > 1e-6:
                    check_failed = True
                    msg += "  <-- MISMATCH"
            w_b, id_b = best_gate(xc.to(torch.bfloat16), wbf, bias, cfg)
            m3, d3 = compare_routes(id_b.numpy(), w_b.numpy(), ref_ids, ref_w)
            msg += (f"; torch best gate (x, W rounded to bf16) vs that reference: ids match {m3:.3f} "
                    "(informational: bf16 rounding moves near-boundary choices)")
            print("check", msg, flush=True)
            checks.append(msg)

            for T in args.token_list:
                x32 = torch.randn(T, H)
                xbf = x32.to(torch.bfloat16)
                x_np = x32.numpy()
                fns = {
                    "lin_f32": (lambda x=x32, w=w32: F.linear(x, w)),
                    "lin_bf16": (lambda x=xbf, w=wbf: F.linear(x, w)),
                    "gate_best": (lambda x=xbf, w=wbf, b=bias, c=cfg: best_gate(x, w, b, c)),
                    "np_f32": (lambda x=x_np, w=w_np: x @ w.T),
                }
                if router is not None:
                    fns["gate_hf"] = lambda x=x32, r=router: r(x)
                row = {"shape": sk, "T": T, "flops": 2.0 * T * H * E}
                for k in keys:
                    row["all_" + k], row["n_" + k], row["fl_" + k] = [], 10**9, 0.0
                setups.append((row, fns))

        quiet = wait_quiet(args.max_wait)
        la0 = loadavg()
        # rounds interleave the whole sweep so a transient disturbance hits one round only;
        # each cell reports the lowest of its per-round medians
        for rd in range(args.rounds):
            for row, fns in setups:
                for k in keys:
                    med, n, fl = bench(fns[k], min_runs, requiet_s=min(args.max_wait, 120.0))
                    row["all_" + k].append(med)
                    row["n_" + k] = min(row["n_" + k], n)
                    row["fl_" + k] = max(row["fl_" + k], fl)
                print(f"round {rd + 1}/{args.rounds} {SHAPES[row['shape']]['name']:16s} T={row['T']:5d}  "
                      + "  ".join(f"{k} {row['all_' + k][-1]:8.3f} ms" for k in keys), flush=True)
    if limiter is not None:
        limiter.restore_original_limits()
    la1 = loadavg()
    rows = []
    for row, _ in setups:
        for k in keys:
            row[k] = min(row["all_" + k])
            row["spread_" + k] = max(row["all_" + k]) / min(row["all_" + k])
        rows.append(row)
    worst = max(r["fl_" + k] for r in rows for k in keys)
    nmin = min(r["n_" + k] for r in rows for k in keys)
    spreads = [r["spread_" + k] for r in rows for k in keys]

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "nproc": NCPU, "threads": torch.get_num_threads(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_mkl": mkl, "torch_onednn": dnnl,
        "transformers": transformers.__version__ if transformers is not None else None,
        "numpy": np.__version__, "numpy_blas": np_blas,
        "rounds": args.rounds, "min_calls_per_median": min_runs, "calls_per_median_min": nmin,
        "quiet_at_start": quiet, "loadavg_start": la0, "loadavg_end": la1,
        "worst_foreign_cpu_share": worst,
        "round_spread_median": statistics.median(spreads), "round_spread_worst": max(spreads),
        "checks": checks,
    }

    # ---- reports ----
    def cell(ms, flops):
        return f"{ms:9.4f} ms / {flops / ms / 1e6:6.1f}"

    hf = "gate_hf" in keys
    lines = ["# CPU anchor: MoE gate (PyTorch, numpy)", ""]
    lines.append(f"- date: {meta['date']}")
    lines.append(f"- cpu: {meta['cpu']}, {meta['threads']} threads used (nproc {NCPU}); flags: {meta['cpu_flags']}")
    lines.append(f"- python {meta['python']}, torch {meta['torch']} (CPU capability {meta['torch_cpu_capability']}; "
                 f"{mkl}; {dnnl}), transformers {meta['transformers'] or 'not installed (no HF gate column)'}, "
                 f"numpy {meta['numpy']} (BLAS: {np_blas})")
    lines.append(f"- method: median of >= {min_runs} timed calls after warm-up (more for fast kernels, >= 0.25 s); "
                 "same weight every call, so it stays cache-resident -- a best case vs. a real model.")
    quiet_s = "not checked" if quiet is None else str(quiet)
    lines.append(f"- calls per median: >= {nmin}; quiet machine at start: {quiet_s}; loadavg start {la0}, end {la1}; "
                 f"worst CPU share used by other processes during a kept measurement: {worst:.1%} "
                 "(a measurement disturbed by > 5% is repeated)")
    lines.append(f"- {args.rounds} interleaved round(s) over the whole sweep; each cell is the lowest per-round median. "
                 f"Round-to-round spread (max/min of the medians): median {meta['round_spread_median']:.2f}x, "
                 f"worst {meta['round_spread_worst']:.2f}x.")
    lines.append("- cell = median ms / GFLOP/s, GFLOP/s = 2*T*H*E / time (GEMM flops only, also for the gates).")
    lines.append("- columns: `F.linear f32` (x, W f32); `F.linear bf16` (x, W bf16, bf16 out); `torch best gate` = "
                 "F.linear bf16 + .float() + the HF routing in plain torch (sigmoid, +bias, group top-2 sum, group "
                 "top-k, -inf mask, top-k, gather unbiased, renorm (+1e-20), scale; V2-Lite: softmax, top-k, scale); "
                 "`best-gate routing` = torch best gate - F.linear bf16"
                 + ("; `HF gate f32` = DeepseekV3TopkRouter / DeepseekV2TopkRouter forward (x f32, f32 GEMM + "
                    "routing); `HF routing` = HF gate - F.linear f32" if hf else "")
                 + "; `numpy f32` = x @ W.T.")
    for c in checks:
        lines.append(f"- check: {c}")
    lines.append("")
    for sk in args.shape_keys:
        cfg = SHAPES[sk]
        lines.append(f"## {cfg['name']}: hidden {cfg['H']} -> {cfg['E']} experts, top-{cfg['k']}")
        lines.append("")
        hdr = ["T", "F.linear f32", "F.linear bf16", "torch best gate", "best-gate routing"]
        if hf:
            hdr += ["HF gate f32 (full)", "HF routing"]
        hdr += ["numpy f32"]
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "|".join(["---:"] * len(hdr)) + "|")
        for r in (r for r in rows if r["shape"] == sk):
            cells = [str(r["T"]), cell(r["lin_f32"], r["flops"]), cell(r["lin_bf16"], r["flops"]),
                     cell(r["gate_best"], r["flops"]), f"{r['gate_best'] - r['lin_bf16']:8.4f} ms"]
            if hf:
                cells += [cell(r["gate_hf"], r["flops"]), f"{r['gate_hf'] - r['lin_f32']:8.4f} ms"]
            cells += [cell(r["np_f32"], r["flops"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines) + "\n"

    if args.json:
        out = {
            "script": "torch_gate_cpu.py", "unit": "ms",
            "value": "lowest per-round median of the timed calls, milliseconds per call",
            "meta": meta,
            "columns": {k: LABELS[k] for k in keys},
            "shapes": {sk: SHAPES[sk] for sk in args.shape_keys},
            "results": {}, "per_round_medians": {},
        }
        for r in rows:
            out["results"].setdefault(r["shape"], {})[str(r["T"])] = {k: round(r[k], 6) for k in keys}
            out["per_round_medians"].setdefault(r["shape"], {})[str(r["T"])] = {
                k: [round(v, 6) for v in r["all_" + k]] for k in keys}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
        print(f"wrote {args.md}")
    if check_failed:
        print("WARNING: the torch routing disagreed with the HF router (see 'check' lines)", flush=True)
    print()
    print(text, end="", flush=True)
    return 1 if check_failed else 0


if __name__ == "__main__":
    sys.exit(main())
