"""Type stubs of the native module ``sluice._sluice``."""

from typing import Any

DEFAULT_IDLE_SPIN_US: int

class Tensor:
    """A sluice tensor; ``torch.from_dlpack(t)`` imports it without a copy."""

    @staticmethod
    def from_dlpack(obj: Any) -> Tensor: ...
    @property
    def requires_grad(self) -> bool: ...
    def detach(self) -> Tensor: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def strides(self) -> list[int]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def data_ptr(self) -> int: ...
    def __dlpack__(
        self,
        *,
        stream: Any | None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...

class CpuBackend:
    def __init__(
        self,
        *,
        threads: int | None = None,
        idle_spin_us: int | None = None,
        max_tokens: int | None = None,
    ) -> None: ...
    @property
    def threads(self) -> int: ...
    @property
    def idle_spin_us(self) -> int: ...

class CudaBackend:
    """The CUDA backend on one device; ``RuntimeError`` where no driver, NVRTC or device is."""

    def __init__(self, ordinal: int = 0) -> None: ...
    @property
    def ordinal(self) -> int: ...
    @property
    def compute_capability(self) -> tuple[int, int]: ...

class Gate:
    @staticmethod
    def from_pretrained(
        path: str,
        layer: int,
        *,
        backend: CpuBackend | CudaBackend | None = None,
        apply_scaling: bool = True,
        mark_invalid: bool = False,
    ) -> Gate: ...
    @staticmethod
    def from_tensors(
        weight: Any,
        bias: Any | None,
        config_json: str,
        *,
        layer: int = 0,
        backend: CpuBackend | CudaBackend | None = None,
        apply_scaling: bool = True,
        mark_invalid: bool = False,
    ) -> Gate: ...
    def route(self, hidden: Any, input_ids: Any | None = None) -> tuple[Tensor, Tensor]: ...
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
    ) -> None: ...
    def _route_into_counting(
        self,
        hidden: Any,
        topk_ids: Any,
        topk_weights: Any,
        status: Any,
        *,
        input_ids: Any | None = None,
        stream: int | None = None,
        workspace: Any | None = None,
    ) -> None: ...
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
    ) -> None: ...
    def _route_and_dispatch_into_counting(
        self,
        hidden: Any,
        topk_ids: Any,
        topk_weights: Any,
        layout: dict[str, Any],
        status: Any,
        *,
        block_size: int | None = None,
        expert_ranks: Any | None = None,
        input_ids: Any | None = None,
        stream: int | None = None,
        workspace: Any | None = None,
    ) -> None: ...
    def dispatch_into(
        self,
        topk_ids: Any,
        layout: dict[str, Any],
        *,
        block_size: int | None = None,
        expert_ranks: Any | None = None,
        stream: int | None = None,
    ) -> None: ...
    def dispatch_workspace_bytes(self, tokens: int) -> int: ...
    def padded_capacity(self, tokens: int, block_size: int) -> int: ...
    def _check_status(self, count: int, first_row: int) -> None: ...
    def workspace_bytes(self, tokens: int) -> int: ...
    def warm_up(self, tokens: int) -> None: ...
    @property
    def device(self) -> str: ...
    @property
    def mark_invalid(self) -> bool: ...
    @property
    def layer(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def top_k(self) -> int: ...
    @property
    def weight(self) -> Tensor: ...
    @property
    def bias(self) -> Tensor | None: ...
