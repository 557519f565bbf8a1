"""The DeepSeek-V3-shaped gate the Python benchmarks time: seeded bf16 weight `[256, 7168]` and
bias, noaux_tc over 8 groups keeping 4, top-8."""

from __future__ import annotations

import torch

import sluice

HIDDEN, EXPERTS, TOP_K = 7168, 256, 8


def v3_gate(backend: sluice.CpuBackend) -> sluice.Gate:
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(EXPERTS, HIDDEN, generator=generator) * 0.02).to(torch.bfloat16)
    bias = torch.randn(EXPERTS, generator=generator) * 0.01
    config = {
        "model_type": "deepseek_v3",
        "hidden_size": HIDDEN,
        "num_hidden_layers": 1,
        "first_k_dense_replace": 0,
        "n_routed_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "n_group": 8,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    }
    return sluice.Gate.from_tensors(weight, bias, config, backend=backend)
