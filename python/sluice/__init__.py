"""sluice: DeepSeek V2/V3 and Kimi-K2 MoE gates for Python engines, on the CPU or a CUDA GPU.

Tensors go in and out through DLPack without a copy; torch is the tested client, and any object
with ``__dlpack__`` is accepted. A tensor that requires grad (an ``nn.Parameter`` gate weight,
hidden states under autograd) keeps that flag inside sluice, whose bridge refuses to export it;
the gate detaches weight and hidden states at that door, so routing them works and nothing else
can hand them to a backend by mistake.

    gate = sluice.Gate.from_pretrained("path/to/DeepSeek-V3", layer=3)
    topk_ids, topk_weights = gate.route(hidden_states)

On a GPU the gate enqueues on torch's current stream, so a CUDA graph captures it:

    gate = sluice.Gate.from_pretrained("path/to/DeepSeek-V3", 3, device="cuda", mark_invalid=True)
    gate.route_into(hidden_states, topk_ids, topk_weights, workspace=workspace)
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any, Mapping

from . import _sluice
from ._sluice import DEFAULT_IDLE_SPIN_US, CpuBackend, CudaBackend, Tensor

__all__ = ["CpuBackend", "CudaBackend", "DEFAULT_IDLE_SPIN_US", "Gate", "Tensor"]

# DLPack's device type codes (`DLDeviceType`).
_DLPACK_CPU, _DLPACK_CUDA = 1, 2


def _to_torch(tensor: Tensor) -> Any:
    """A sluice-allocated output as a torch tensor (zero-copy), or as is without torch."""
    try:
        import torch
    except ImportError:
        return tensor
    return torch.from_dlpack(tensor)


def _parse_device(device: Any) -> tuple[str, int | None]:
    """A device as torch writes it (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``)
    as ``(type, index)``; the index is ``None`` where none is written."""
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise ValueError(f"device {str(device)!r}: sluice routes on 'cpu' or 'cuda[:N]'")
    return kind, int(index) if index else None


def _producer_device(tensor: Any) -> str | None:
    """The device of a DLPack producer as torch names it; ``None`` when it does not say, or is
    on a device sluice has no backend for (the gate then refuses it with sluice's message)."""
    dlpack_device = getattr(tensor, "__dlpack_device__", None)
    if dlpack_device is None:
        return None
    kind, index = dlpack_device()
    if kind == _DLPACK_CPU:
        return "cpu"
    if kind == _DLPACK_CUDA:
        return f"cuda:{index}"
    return None


@functools.lru_cache(maxsize=None)
def _shared_cuda_backend(ordinal: int) -> CudaBackend:
    """The backend of gates made with ``device="cuda:N"``: one per device, sharing the kernels
    it compiled between the gates of a model (a failure to start is not cached)."""
    return CudaBackend(ordinal)


def _torch_with_cuda() -> Any | None:
    """torch, where it can use a CUDA device; ``None`` without torch or without a device, where
    sluice's own backend says why it cannot start rather than torch."""
    try:
        import torch
    except ImportError:
        return None
    if torch.cuda.is_initialized() or torch.cuda.is_available():
        return torch
    return None


def _on_cuda_device(ordinal: int) -> contextlib.AbstractContextManager:
    """torch's current device set to ``ordinal`` for a native call, and restored after it:
    sluice makes the device's context current, which torch would otherwise see as a change of
    its current device."""
    torch = _torch_with_cuda()
    return contextlib.nullcontext() if torch is None else torch.cuda.device(ordinal)


def _backend_device(backend: CpuBackend | CudaBackend | None) -> contextlib.AbstractContextManager:
    """torch's current device kept across a preparation on ``backend``."""
    if isinstance(backend, CudaBackend):
        return _on_cuda_device(backend.ordinal)
    return contextlib.nullcontext()


def _choose_backend(
    device: Any, backend: CpuBackend | CudaBackend | None, default_device: str | None = None
) -> CpuBackend | CudaBackend | None:
    """The backend a gate is prepared on: ``backend`` when given (it must agree with
    ``device``), else the shared backend of ``device``, else of ``default_device``; ``None``
    means the default CPU backend."""
    if device is None and backend is not None:
        return backend
    if device is None:
        device = default_device
    if device is None:
        return backend
    kind, index = _parse_device(device)
    if kind == "cpu":
        if isinstance(backend, CudaBackend):
            raise ValueError(f"device={str(device)!r} but backend={backend!r}")
        return backend
    if index is None:
        # "cuda" is torch's current device, as in torch.
        torch = _torch_with_cuda()
        index = 0 if torch is None else torch.cuda.current_device()
    if backend is None:
        with _on_cuda_device(index):
            return _shared_cuda_backend(index)
    if not isinstance(backend, CudaBackend) or backend.ordinal != index:
        raise ValueError(f"device={str(device)!r} but backend={backend!r}")
    return backend


def _cuda_stream(ordinal: int) -> int:
    """torch's current stream on CUDA device ``ordinal``, numbered as DLPack numbers streams:
    its handle, except the legacy default stream, which torch reports as 0 and DLPack as 1."""
    import torch

    handle = torch.cuda.current_stream(ordinal).cuda_stream
    return 1 if handle == 0 else handle


def _with_rows(hidden: Any) -> tuple[Any, int]:
    """The hidden states and their row count ``T``. A producer without ``shape`` (a capsule) is
    imported first; anything not of rank 2 counts 0 rows, which the gate refuses naming the
    shape it got."""
    if not hasattr(hidden, "shape"):
        hidden = Tensor.from_dlpack(hidden)
    shape = tuple(hidden.shape)
    return hidden, shape[0] if len(shape) == 2 else 0


def _wait_for_torch(backend: CpuBackend | CudaBackend | None) -> None:
    """Waits for torch's work on a CUDA backend's device before the backend copies a gate's
    weight and bias there: it copies on its own stream, which torch's streams do not order."""
    torch = _torch_with_cuda()
    if isinstance(backend, CudaBackend) and torch is not None:
        torch.cuda.synchronize(backend.ordinal)


class Gate:
    """One MoE layer's gate: router GEMM, scoring, grouped top-k, bias correction,
    renormalisation and scaling, as the model's config says; on the CPU or a CUDA device."""

    __slots__ = ("_gate", "_cuda_ordinal")

    def __init__(self, native: _sluice.Gate) -> None:
        self._gate = native
        kind, index = _parse_device(native.device)
        # The CUDA device the gate routes on, or None for a CPU gate.
        self._cuda_ordinal = index if kind == "cuda" else None

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        layer: int,
        *,
        device: Any = None,
        backend: CpuBackend | CudaBackend | None = None,
        apply_scaling: bool = True,
        mark_invalid: bool = False,
    ) -> "Gate":
        """The gate of MoE layer ``layer`` in a Hugging Face checkpoint folder (``config.json``
        and safetensors, single or sharded). The weight is memory-mapped, not copied; on a CUDA
        device it is copied there once.

        ``device`` is ``"cpu"`` (the default) or ``"cuda[:N]"`` (a string or ``torch.device``);
        ``backend`` a configured ``CpuBackend`` or ``CudaBackend`` instead. ``apply_scaling=False``
        leaves ``routed_scaling_factor`` to the caller; ``mark_invalid`` gives rows with NaN or
        infinite values ids -1 and weights 0 instead of raising (``route_into`` on a CUDA stream
        needs it: enqueued work cannot raise).
        """
        backend = _choose_backend(device, backend)
        with _backend_device(backend):
            native = _sluice.Gate.from_pretrained(
                str(path),
                layer,
                backend=backend,
                apply_scaling=apply_scaling,
                mark_invalid=mark_invalid,
            )
        return cls(native)

    @classmethod
    def from_tensors(
        cls,
        weight: Any,
        bias: Any | None,
        config: Mapping[str, Any] | str | Any,
        *,
        layer: int = 0,
        device: Any = None,
        backend: CpuBackend | CudaBackend | None = None,
        apply_scaling: bool = True,
        mark_invalid: bool = False,
    ) -> "Gate":
        """A gate from a router weight ``[E, H]`` (bf16 or f32, e.g. the ``nn.Parameter`` of a
        loaded model), the f32 correction bias ``[E]`` (for ``noaux_tc`` routing, else ``None``)
        and the model config: a ``config.json`` dict, its text, or a transformers config
        (anything with ``to_dict()``).

        The gate routes on ``device`` (or ``backend``), by default the weight's device, as a
        torch module runs where its parameters are. ``gate.weight`` shares the parameter's
        memory (no copy); the backend packs (CPU) or copies (CUDA) the weight once, here, so
        later in-place changes to the parameter do not reach routing."""
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        config_json = config if isinstance(config, str) else json.dumps(config)
        backend = _choose_backend(device, backend, default_device=_producer_device(weight))
        _wait_for_torch(backend)
        with _backend_device(backend):
            native = _sluice.Gate.from_tensors(
                weight,
                bias,
                config_json,
                layer=layer,
                backend=backend,
                apply_scaling=apply_scaling,
                mark_invalid=mark_invalid,
            )
        return cls(native)

    def _workspace(self, tokens: int, ordinal: int) -> Any | None:
        """A workspace for ``tokens`` rows from torch's allocator on the gate's device, ordered
        on torch's current stream like the call that uses it; ``None`` when none is needed."""
        import torch

        size = self._gate.workspace_bytes(tokens)
        if size == 0:
            return None
        return torch.empty(size, dtype=torch.uint8, device=torch.device("cuda", ordinal))

    def route(self, hidden: Any, input_ids: Any | None = None) -> tuple[Any, Any]:
        """Routes hidden states ``[T, H]`` (f32, bf16 or f16) to ``top_k`` experts per token.

        Returns ``(topk_ids, topk_weights)``: int32 and float32 ``[T, K]`` torch tensors on the
        input's device (which must be the gate's), each row sorted by weight (descending) then
        expert id. ``input_ids`` (``[T]``, int32 or int64) is for layers that route by token id.

        On a CUDA device the outputs are allocated by torch and the gate enqueued on torch's
        current stream; unless the gate marks rows with NaN or infinities (``mark_invalid``),
        this waits for the result to raise on such a row.
        """
        ordinal = self._cuda_ordinal
        if ordinal is None:
            ids, weights = self._gate.route(hidden, input_ids)
            return _to_torch(ids), _to_torch(weights)
        import torch

        hidden, tokens = _with_rows(hidden)
        device = torch.device("cuda", ordinal)
        with torch.cuda.device(ordinal):
            ids = torch.empty(tokens, self.top_k, dtype=torch.int32, device=device)
            weights = torch.empty(tokens, self.top_k, dtype=torch.float32, device=device)
            workspace = self._workspace(tokens, ordinal)
            stream = _cuda_stream(ordinal)
            if self._gate.mark_invalid:
                self._gate.route_into(
                    hidden, ids, weights, input_ids=input_ids, stream=stream, workspace=workspace
                )
                return ids, weights
            # Zeros: with no rows no kernel runs to write the status.
            status = torch.zeros(2, dtype=torch.int32, device=device)
            self._gate._route_into_counting(
                hidden,
                ids,
                weights,
                status,
                input_ids=input_ids,
                stream=stream,
                workspace=workspace,
            )
            self._gate._check_status(*status.tolist())  # waits for the stream
        return ids, weights

    def route_into(
        self,
        hidden: Any,
        topk_ids: Any,
        topk_weights: Any,
        *,
        input_ids: Any | None = None,
        stream: int | None = None,
        workspace: Any | None = None,
        status: Any | None = None,
    ) -> None:
        """Routes into caller-owned ``topk_ids`` (int32 ``[T, K]``) and ``topk_weights``
        (float32 ``[T, K]``), which may be row windows of larger buffers; nothing is allocated
        but, on a CUDA device without a ``workspace``, the workspace (from torch's allocator).

        A CPU gate routes on the calling thread. A CUDA gate only enqueues, on ``stream``
        (numbered as DLPack numbers streams), by default torch's current stream, so that a CUDA
        graph being captured on it records the call; nothing is synchronised. It needs
        ``mark_invalid=True`` (enqueued work cannot raise; ``status``, int32 ``[2]``, receives
        the count of marked rows and the first of them) and ``workspace``, uint8 of at least
        ``workspace_bytes(T)`` bytes, made here when ``stream`` is torch's current one.
        """
        ordinal = self._cuda_ordinal
        on_device = contextlib.nullcontext() if ordinal is None else _on_cuda_device(ordinal)
        with on_device:
            if ordinal is not None and stream is None:
                stream = _cuda_stream(ordinal)
                if workspace is None:
                    hidden, tokens = _with_rows(hidden)
                    workspace = self._workspace(tokens, ordinal)
            self._gate.route_into(
                hidden,
                topk_ids,
                topk_weights,
                input_ids=input_ids,
                stream=stream,
                workspace=workspace,
                status=status,
            )

    def route_and_dispatch(
        self,
        hidden: Any,
        *,
        block_size: int | None = None,
        expert_ranks: Any | None = None,
        ranks: int | None = None,
        input_ids: Any | None = None,
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Routes as ``route`` does and lays the ids out for the expert step, in one call (on a
        GPU, where routing is a block per token, up to 512 tokens of V3 are routed and laid out
        by one kernel).

        Returns ``(topk_ids, topk_weights, layout)``, ``layout`` the dict of int32 torch tensors
        on the gate's device that ``empty_layout`` makes, filled: ``expert_counts``,
        ``expert_offsets``, ``sorted_pairs`` (the pairs ``t * K + k`` grouped by expert in
        token order, then the sentinel ``T * K``), ``inverse`` (each pair's place in
        ``sorted_pairs``, -1 for the pairs of a row marked invalid) and ``invalid``; with
        ``block_size``, the layout padded for a grouped GEMM (``padded_pairs``,
        ``block_experts``, ``padded_total``); with ``expert_ranks`` (int32 ``[E]``, the rank
        of each expert among ``ranks``), what an expert-parallel all-to-all sends
        (``rank_counts``, ``rank_offsets``, ``rank_pairs``, ``rank_tokens``). Needs torch.
        """
        import torch

        if (expert_ranks is None) != (ranks is None):
            raise ValueError("`expert_ranks` and `ranks` go together: the table and its rank count")
        hidden, tokens = _with_rows(hidden)
        ordinal = self._cuda_ordinal
        device = torch.device("cpu") if ordinal is None else torch.device("cuda", ordinal)
        on_device = contextlib.nullcontext() if ordinal is None else torch.cuda.device(ordinal)
        with on_device:
            ids = torch.empty(tokens, self.top_k, dtype=torch.int32, device=device)
            weights = torch.empty(tokens, self.top_k, dtype=torch.float32, device=device)
            layout = self.empty_layout(tokens, block_size=block_size, ranks=ranks)
            options = dict(block_size=block_size, expert_ranks=expert_ranks, input_ids=input_ids)
            if ordinal is None:
                self._gate.route_and_dispatch_into(hidden, ids, weights, layout, **options)
                return ids, weights, layout
            options.update(stream=_cuda_stream(ordinal), workspace=self._workspace(tokens, ordinal))
            if self._gate.mark_invalid:
                self._gate.route_and_dispatch_into(hidden, ids, weights, layout, **options)
                return ids, weights, layout
            # Zeros: with no rows no kernel runs to write the status.
            status = torch.zeros(2, dtype=torch.int32, device=device)
            self._gate._route_and_dispatch_into_counting(
                hidden, ids, weights, layout, status, **options
            )
            self._gate._check_status(*status.tolist())  # waits for the stream
        return ids, weights, layout

    def route_and_dispatch_into(
        self,
        hidden: Any,
        topk_ids: Any,
        topk_weights: Any,
        layout: dict[str, Any],
        *,
        block_size: int | None = None,
        expert_ranks: Any | None = None,
        input_ids: Any | None = None,
        stream: int | None = None,
        workspace: Any | None = None,
        status: Any | None = None,
    ) -> None:
        """``route_into``, and the layout of the ids it writes into ``layout``: caller-owned
        int32 tensors by name, as ``empty_layout`` makes them (``block_size`` with the padded
        outputs, ``expert_ranks`` with the rank outputs). Under ``route_into``'s contract:
        nothing is allocated but, on a CUDA device on torch's current stream, the workspaces
        left out; nothing is synchronised, so a CUDA graph captures the call."""
        ordinal = self._cuda_ordinal
        on_device = contextlib.nullcontext() if ordinal is None else _on_cuda_device(ordinal)
        with on_device:
            if ordinal is not None and stream is None:
                stream = _cuda_stream(ordinal)
                hidden, tokens = _with_rows(hidden)
                if workspace is None:
                    workspace = self._workspace(tokens, ordinal)
                layout = self._with_dispatch_workspace(layout, tokens)
            self._gate.route_and_dispatch_into(
                hidden,
                topk_ids,
                topk_weights,
                layout,
                block_size=block_size,
                expert_ranks=expert_ranks,
                input_ids=input_ids,
                stream=stream,
                workspace=workspace,
                status=status,
            )

    def dispatch_into(
        self,
        topk_ids: Any,
        layout: dict[str, Any],
        *,
        block_size: int | None = None,
        expert_ranks: Any | None = None,
        stream: int | None = None,
    ) -> None:
        """The layout of ids the caller has (routed by its own kernel, or by an earlier call)
        into ``layout``, as ``route_and_dispatch_into`` writes it: ``topk_ids`` int32 ``[T, K]``
        on the gate's device, rows contiguous, -1 a pair to skip. Under ``route_into``'s
        contract: on a CUDA device it is enqueued on torch's current stream (or ``stream``),
        with a workspace from torch's allocator where ``layout`` has none and the rows need
        one, and nothing is synchronised."""
        ordinal = self._cuda_ordinal
        on_device = contextlib.nullcontext() if ordinal is None else _on_cuda_device(ordinal)
        with on_device:
            if ordinal is not None and stream is None:
                stream = _cuda_stream(ordinal)
                layout = self._with_dispatch_workspace(layout, int(topk_ids.shape[0]))
            self._gate.dispatch_into(
                topk_ids, layout, block_size=block_size, expert_ranks=expert_ranks, stream=stream
            )

    def empty_layout(
        self, tokens: int, *, block_size: int | None = None, ranks: int | None = None
    ) -> dict[str, Any]:
        """The layout's buffers for ``tokens`` rows on the gate's device, from torch's allocator
        (for ``route_and_dispatch_into`` and ``dispatch_into``; a CUDA graph replays into buffers
        made once):
        ``expert_counts`` ``[E]``, ``expert_offsets`` ``[E + 1]``, ``sorted_pairs``
        ``[T * K]``, ``inverse`` ``[T, K]`` and ``invalid`` ``[2]`` (rows with a skipped pair,
        the first of them); with ``block_size``, ``padded_pairs``
        ``[padded_capacity(T, block_size)]``, ``block_experts`` and ``padded_total`` ``[1]``;
        with ``ranks``, ``rank_counts`` ``[R]``, ``rank_offsets`` ``[R + 1]``, ``rank_pairs``
        ``[T * K]`` and ``rank_tokens`` ``[R]``; and ``workspace`` where the layout of that
        many rows needs one."""
        import torch

        ordinal = self._cuda_ordinal
        device = torch.device("cpu") if ordinal is None else torch.device("cuda", ordinal)
        experts, pairs = self.num_experts, tokens * self.top_k

        def empty(*shape: int) -> Any:
            return torch.empty(shape, dtype=torch.int32, device=device)

        layout = {
            "expert_counts": empty(experts),
            "expert_offsets": empty(experts + 1),
            "sorted_pairs": empty(pairs),
            "inverse": empty(tokens, self.top_k),
            "invalid": empty(2),
        }
        if block_size is not None:
            capacity = self._gate.padded_capacity(tokens, block_size)
            layout["padded_pairs"] = empty(capacity)
            layout["block_experts"] = empty(capacity // block_size)
            layout["padded_total"] = empty(1)
        if ranks is not None:
            layout["rank_counts"] = empty(ranks)
            layout["rank_offsets"] = empty(ranks + 1)
            layout["rank_pairs"] = empty(pairs)
            layout["rank_tokens"] = empty(ranks)
        if ordinal is not None and self._gate.dispatch_workspace_bytes(tokens) > 0:
            layout["workspace"] = self._dispatch_workspace(tokens)
        return layout

    def _with_dispatch_workspace(self, layout: dict[str, Any], tokens: int) -> dict[str, Any]:
        """``layout`` with a workspace from torch's allocator where it has none and the layout of
        ``tokens`` rows needs one (a device gate's call on torch's current stream)."""
        if "workspace" not in layout and self._gate.dispatch_workspace_bytes(tokens) > 0:
            return {**layout, "workspace": self._dispatch_workspace(tokens)}
        return layout

    def _dispatch_workspace(self, tokens: int) -> Any:
        """The layout's workspace for ``tokens`` rows, from torch's allocator on the device."""
        import torch

        size = self._gate.dispatch_workspace_bytes(tokens)
        return torch.empty(size, dtype=torch.uint8, device=torch.device("cuda", self._cuda_ordinal))

    def workspace_bytes(self, tokens: int) -> int:
        """Bytes of scratch ``route_into`` needs for ``tokens`` rows (0 on the CPU)."""
        return self._gate.workspace_bytes(tokens)

    def dispatch_workspace_bytes(self, tokens: int) -> int:
        """Bytes of scratch the layout of ``tokens`` rows needs in ``layout["workspace"]`` (0 on
        the CPU, and for the rows a GPU lays out in one block)."""
        return self._gate.dispatch_workspace_bytes(tokens)

    def warm_up(self, tokens: int) -> None:
        """Does now what the first call on ``tokens`` rows would otherwise do, so that a captured
        ``route_into`` only enqueues its kernels: on a GPU, where cuBLASLt runs the GEMM (past 64
        or 128 bf16 rows on Hopper, 8 before it),
        times the whole gate with each of cuBLASLt's candidate algorithms for ``tokens`` rows on
        the backend's own stream and keeps the fastest (nothing on the CPU). Call it once per row
        count an engine captures, before capturing."""
        self._gate.warm_up(tokens)

    @property
    def device(self) -> Any:
        """The device the gate routes on: a ``torch.device`` (its name without torch)."""
        try:
            import torch
        except ImportError:
            return self._gate.device
        return torch.device(self._gate.device)

    @property
    def mark_invalid(self) -> bool:
        """Whether rows with NaN or infinities get ids -1 and weights 0 (else they raise)."""
        return self._gate.mark_invalid

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
