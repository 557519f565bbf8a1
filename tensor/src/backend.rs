//! The contract between sluice and a compute backend.
//!
//! A backend never sees a [`Tensor`](crate::Tensor): every data argument is a DLPack tensor made by
//! the [bridge](crate::dlpack), and every result comes back as a DLPack tensor that the bridge
//! imports without a copy. Because the bridge refuses tensors that require grad, no backend can be
//! handed one, whatever it does with its inputs. A backend could be a C library on the other side of
//! an FFI call and this trait would read the same.
//!
//! Shapes, with `T` tokens, `H` the hidden size, `E` routed experts and `K = spec.top_k`:
//!
//! | argument | shape | dtypes |
//! | --- | --- | --- |
//! | hidden states `x` | `[T, H]` | f32, bf16, f16 |
//! | router weight `W` | `[E, H]` | bf16, f32 |
//! | correction bias | `[E]` | f32 |
//! | logits | `[T, E]` | f32 |
//! | `topk_ids` | `[T, K]` | i32 (`-1` marks an invalid row) |
//! | `topk_weights` | `[T, K]` | f32 |

use std::fmt;

use thiserror::Error;

use crate::dlpack::{Dlpack, DlpackError};
use crate::{DType, Device, RoutingSpec, SpecError};

/// The two outputs of routing, as DLPack tensors owned by the backend until imported.
pub struct RoutingOutput {
    /// Selected expert ids, i32 `[T, K]`, each row sorted by weight descending then by id.
    pub topk_ids: Dlpack,
    /// The weights of those experts, f32 `[T, K]`.
    pub topk_weights: Dlpack,
}

impl fmt::Debug for RoutingOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shape = |t: &Dlpack| t.validate().map(|v| v.shape().to_vec()).unwrap_or_default();
        f.debug_struct("RoutingOutput")
            .field("topk_ids", &shape(&self.topk_ids))
            .field("topk_weights", &shape(&self.topk_weights))
            .finish()
    }
}

/// A router weight (and bias) turned once into whatever form the backend computes fastest with:
/// packed on the host, uploaded to a device, or simply kept.
///
/// Created by [`Backend::prepare_router`]; it owns what it needs, so the caller's tensors may be
/// dropped.
pub trait PreparedRouter: Send + Sync + fmt::Debug {
    /// The routing spec this router was prepared for.
    fn spec(&self) -> &RoutingSpec;

    /// The hidden size `H` the weight expects.
    fn hidden_size(&self) -> usize;

    /// Router logits `x · Wᵀ`, f32 `[T, E]`.
    fn router_gemm(&self, hidden: &Dlpack) -> Result<Dlpack, BackendError>;

    /// The fused route: router GEMM and routing in one call.
    fn route(&self, hidden: &Dlpack) -> Result<RoutingOutput, BackendError>;
}

/// A compute backend: a device plus the router ops, all taking DLPack tensors.
///
/// Implementations must be usable from many threads at once (`Send + Sync`) and through a trait
/// object. Results must match the scalar reference router in `sluice-models`; a backend may fuse and
/// reorder work however it likes.
pub trait Backend: Send + Sync + fmt::Debug {
    /// A short name for messages and benchmarks (`"cpu"`, `"cuda"`, ...).
    fn name(&self) -> &str;

    /// The device this backend computes on.
    fn device(&self) -> Device;

    /// Copies a host tensor to the backend's device (a plain copy for the CPU backend).
    fn upload(&self, host: &Dlpack) -> Result<Dlpack, BackendError>;

    /// Copies a tensor on the backend's device to host memory.
    fn download(&self, tensor: &Dlpack) -> Result<Dlpack, BackendError>;

    /// Router logits `x[T, H] · W[E, H]ᵀ`, f32 `[T, E]`, accumulated in f32. f32 inputs are never
    /// rounded to bf16.
    fn router_gemm(&self, hidden: &Dlpack, weight: &Dlpack) -> Result<Dlpack, BackendError>;

    /// Routing of f32 logits `[T, E]` as `spec` says, with an optional f32 correction bias `[E]`.
    fn route_logits(
        &self,
        logits: &Dlpack,
        bias: Option<&Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<RoutingOutput, BackendError>;

    /// Prepares a router weight (and bias) for repeated fused routing. The backend takes ownership of
    /// the DLPack tensors and may keep them, pack them or upload them.
    fn prepare_router(
        &self,
        weight: Dlpack,
        bias: Option<Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<Box<dyn PreparedRouter>, BackendError>;

    /// The fused route for a single call: prepares the router, then routes. Callers that route more
    /// than once should keep the [`PreparedRouter`] instead.
    fn route(
        &self,
        hidden: &Dlpack,
        weight: Dlpack,
        bias: Option<Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<RoutingOutput, BackendError> {
        self.prepare_router(weight, bias, spec)?.route(hidden)
    }
}

/// Why a backend op refused its inputs or failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// An argument's dtype is not supported by the op.
    #[error(
        "{op}: `{arg}` has dtype {dtype}, which this op does not support (supported: {supported})"
    )]
    UnsupportedDType {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// The dtype it had.
        dtype: DType,
        /// What the op takes.
        supported: &'static str,
    },
    /// An argument's DLPack dtype is not one sluice knows.
    #[error("{op}: `{arg}` has a DLPack dtype sluice does not know (code {code}, {bits} bits)")]
    UnknownDType {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// DLPack type code.
        code: u8,
        /// Bits per element.
        bits: u8,
    },
    /// An argument's shape does not fit the op.
    #[error("{op}: `{arg}` has shape {shape:?}, expected {expected}")]
    Shape {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// The shape it had.
        shape: Vec<i64>,
        /// What was expected, in words.
        expected: String,
    },
    /// An argument lives on a device this backend cannot read.
    #[error("{op}: `{arg}` is on {actual}, this backend computes on {expected}")]
    WrongDevice {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// Where it is.
        actual: String,
        /// Where it must be.
        expected: Device,
    },
    /// An argument's strides are not supported by the op.
    #[error("{op}: `{arg}` has strides {strides:?} for shape {shape:?}; {requirement}")]
    Layout {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// Its shape.
        shape: Vec<i64>,
        /// Its strides.
        strides: Vec<i64>,
        /// What the op needs.
        requirement: &'static str,
    },
    /// More tokens than the backend is configured to take in one call.
    #[error("{op}: {tokens} tokens exceed the limit of {limit} per call")]
    TooManyTokens {
        /// The op.
        op: &'static str,
        /// Tokens given.
        tokens: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A token's logits hold a NaN or an infinity, under [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error).
    #[error(
        "non-finite router logits in row {row} (token {row}); pass the mark-invalid policy to route the other rows"
    )]
    NonFinite {
        /// The first bad row.
        row: usize,
    },
    /// The correction bias holds a NaN or an infinity, which would make selection meaningless.
    #[error("{op}: the correction bias of expert {expert} is {value}, not a finite number")]
    NonFiniteBias {
        /// The op.
        op: &'static str,
        /// The first bad expert.
        expert: usize,
        /// Its value.
        value: f32,
    },
    /// The routing spec is invalid.
    #[error("invalid routing spec: {0}")]
    Spec(#[from] SpecError),
    /// A DLPack tensor failed validation.
    #[error(transparent)]
    Dlpack(#[from] DlpackError),
    /// The device or its runtime failed.
    #[error("{backend} backend: {message}")]
    Device {
        /// The backend's name.
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_is_object_safe_and_thread_safe() {
        fn assert_send_sync<T: Send + Sync + ?Sized>() {}
        assert_send_sync::<dyn Backend>();
        assert_send_sync::<dyn PreparedRouter>();
        let _: Option<&dyn Backend> = None;
    }
}
