"""sluice: DeepSeek V2/V3 and Kimi-K2 MoE gates for Python engines.

Tensors go in and out through DLPack without a copy; torch is the tested client, and any object
with ``__dlpack__`` is accepted. A tensor that requires grad (an ``nn.Parameter`` gate weight,
hidden states under autograd) keeps that flag inside sluice, whose bridge refuses to export it;
the gate detaches weight and hidden states at that door, so routing them works and nothing else
can hand them to a backend by mistake.

    gate = sluice.Gate.from_pretrained("path/to/DeepSeek-V3", layer=3)
    topk_ids, topk_weights = gate.route(hidden_states)
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from . import _sluice
from ._sluice import DEFAULT_IDLE_SPIN_US, CpuBackend, Tensor

__all__ = ["CpuBackend", "DEFAULT_IDLE_SPIN_US", "Gate", "Tensor"]


def _to_torch(tensor: Tensor) -> Any:
    """A sluice-allocated output as a torch tensor (zero-copy), or as is without torch."""
    try:
        import torch
    except ImportError:
        return tensor
    return torch.from_dlpack(tensor)


def _current_stream(tensor: Any) -> int | None:
    """The DLPack number of torch's current stream for a device tensor; ``None`` on the host.

    torch reports the legacy default stream as 0, which DLPack numbers 1 on CUDA (0 on ROCm).
    """
    device = getattr(tensor, "device", None)
    if device is None or getattr(device, "type", "cpu") == "cpu":
        return None
    import torch

    handle = torch.cuda.current_stream(device).cuda_stream
    if handle == 0 and torch.version.hip is None:
        return 1
    return handle


class Gate:
    """One MoE layer's gate: router GEMM, scoring, grouped top-k, bias correction,
    renormalisation and scaling, as the model's config says."""

    __slots__ = ("_gate",)

    def __init__(self, native: _sluice.Gate) -> None:
        self._gate = native

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        layer: int,
        *,
        backend: CpuBackend | None = None,
        apply_scaling: bool = True,
        mark_invalid: bool = False,
    ) -> "Gate":
        """The gate of MoE layer ``layer`` in a Hugging Face checkpoint folder (``config.json``
        and safetensors, single or sharded). The weight is memory-mapped, not copied.

        ``apply_scaling=False`` leaves ``routed_scaling_factor`` to the caller; ``mark_invalid``
        gives rows with NaN or infinite values ids -1 and weights 0 instead of raising.
        """
        return cls(
            _sluice.Gate.from_pretrained(
                str(path),
                layer,
                backend=backend,
                apply_scaling=apply_scaling,
                mark_invalid=mark_invalid,
            )
        )

    @classmethod
    def from_tensors(
        cls,
        weight: Any,
        bias: Any | None,
        config: Mapping[str, Any] | str | Any,
        *,
        layer: int = 0,
        backend: CpuBackend | None = None,
        apply_scaling: bool = True,
        mark_invalid: bool = False,
    ) -> "Gate":
        """A gate from a router weight ``[E, H]`` (bf16 or f32, e.g. the ``nn.Parameter`` of a
        loaded model), the f32 correction bias ``[E]`` (for ``noaux_tc`` routing, else ``None``)
        and the model config: a ``config.json`` dict, its text, or a transformers config
        (anything with ``to_dict()``).

        ``gate.weight`` shares the parameter's memory (no copy); the CPU backend packs the weight
        once, here, so later in-place changes to the parameter do not reach routing."""
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        config_json = config if isinstance(config, str) else json.dumps(config)
        return cls(
            _sluice.Gate.from_tensors(
                weight,
                bias,
                config_json,
                layer=layer,
                backend=backend,
                apply_scaling=apply_scaling,
                mark_invalid=mark_invalid,
            )
        )

    def route(self, hidden: Any, input_ids: Any | None = None) -> tuple[Any, Any]:
        """Routes hidden states ``[T, H]`` (f32, bf16 or f16) to ``top_k`` experts per token.

        Returns ``(topk_ids, topk_weights)``: int32 and float32 ``[T, K]`` torch tensors on the
        input's device, each row sorted by weight (descending) then expert id. ``input_ids``
        (``[T]``, int32 or int64) is for layers that route by token id.
        """
        ids, weights = self._gate.route(hidden, input_ids)
        return _to_torch(ids), _to_torch(weights)

    def route_into(
        self,
        hidden: Any,
        topk_ids: Any,
        topk_weights: Any,
        *,
        input_ids: Any | None = None,
        stream: int | None = None,
    ) -> None:
        """Routes into caller-owned ``topk_ids`` (int32 ``[T, K]``) and ``topk_weights``
        (float32 ``[T, K]``), which may be row windows of larger buffers; nothing is allocated.

        For device tensors the work is enqueued on ``stream``, numbered as DLPack numbers
        streams; by default torch's current stream, so that a CUDA graph being captured on it
        records the call.
        """
        if stream is None:
            stream = _current_stream(hidden)
        self._gate.route_into(
            hidden, topk_ids, topk_weights, input_ids=input_ids, stream=stream
        )

    @property
    def layer(self) -> int:
        return self._gate.layer

    @property
    def hidden_size(self) -> int:
        return self._gate.hidden_size

    @property
    def num_experts(self) -> int:
        return self._gate.num_experts

    @property
    def top_k(self) -> int:
        return self._gate.top_k

    @property
    def weight(self) -> Tensor:
        """The router weight, held as a parameter (``requires_grad`` is True)."""
        return self._gate.weight

    @property
    def bias(self) -> Tensor | None:
        return self._gate.bias

    def __repr__(self) -> str:
        return repr(self._gate)
