"""One table from a GPU bundle run: sluice's gate (graph-replayed and eager, `sluice bench
--backend cuda --json`) beside the PyTorch anchor's (`torch_gate_gpu.py --json`), same machine,
same run. Usage: side_by_side.py OUT_DIR (reads sluice-v3.json, sluice-kimi-k2.json, torch.json).

"torch GEMM alone" is the anchor's router GEMM by itself (`torch.mm` to f32 logits, one cuBLAS
call, graph-replayed): what a gate built on the vendor's GEMM pays before it routes anything."""
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
torch = json.loads((out / "torch.json").read_text())
meta = torch.get("meta", {})
print("ceilings (torch run): copy %.2f TB/s, bf16 matmul %.0f TFLOP/s"
      % (meta.get("copy_bw_Bps", 0) / 1e12, meta.get("bf16_flops", 0) / 1e12))
print()
print("| model | T | sluice graph us | sluice eager us | torch graph us | torch compile+graph us "
      "| torch GEMM alone us | floor us | sluice / floor | torch c+g / sluice |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for model, anchor in (("v3", "V3"), ("kimi-k2", "K2")):
    path = out / ("sluice-%s.json" % model)
    if not path.exists():
        continue
    for row in json.loads(path.read_text())["results"]:
        t = str(row["tokens"])
        cols = torch["results"].get(anchor, {}).get(t, {})
        floors = torch["floors"].get(anchor, {}).get(t, {})
        floor = max(floors.get("mem_us", 0.0), floors.get("cmp_us", 0.0)) or row["floor_mem_us"]
        graph, cgraph = cols.get("gate_graph"), cols.get("gate_cgraph")
        gemm = cols.get("gemm_f32out_g")
        fmt = lambda v: "-" if v is None else "%.2f" % v
        print("| %s | %s | %.2f | %.2f | %s | %s | %s | %.2f | %.2fx | %s |" % (
            model, t, row["graph_us"], row["eager_us"], fmt(graph), fmt(cgraph), fmt(gemm), floor,
            row["graph_us"] / floor,
            "-" if cgraph is None else "%.1fx" % (cgraph / row["graph_us"])))
