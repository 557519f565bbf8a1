//! The CPU backend of sluice: router GEMM and fused MoE routing on the host.
//!
//! [`CpuBackend`] implements [`sluice_tensor::Backend`]. Its router GEMM
//! (`x[T, H] · W[E, H]ᵀ → f32 [T, E]`, x f32/bf16/f16, W bf16/f32) runs on one of three kernel
//! families chosen at run time ([`CpuKernel`]): AVX-512 BF16 (`vdpbf16ps` for bf16 × bf16, 512-bit
//! FMA for f32 inputs), AVX2 + FMA, or portable Rust. All of them accumulate in f32, and f32 (or
//! f16) hidden states are never rounded to bf16: bf16 weights are widened exactly instead.
//!
//! [`Backend::prepare_router`](sluice_tensor::Backend::prepare_router) packs the weight once into
//! panels of 16 experts ([`CpuPreparedRouter`]); a one-off
//! [`router_gemm`](sluice_tensor::Backend::router_gemm) packs each small panel on the fly instead.
//! Work is split over all cores: over experts for a few tokens, over token chunks for many, and the
//! fused route routes each chunk while its logits are still in cache.
//!
//! Inputs may have any non-negative strides (hidden states and logits are read row by row and
//! copied only when a row is not contiguous; weights are packed from any layout). Negative strides
//! are refused with [`BackendError::Layout`](sluice_tensor::BackendError::Layout).

mod backend;
mod builder;
mod dispatch;
mod engine;
mod gemm;
mod input;
mod kernel;
mod ops;
mod output;
mod pack;
mod pool;
mod prepared;
mod routing;

pub use backend::CpuBackend;
pub use builder::{CpuBackendBuilder, CpuBuildError, DEFAULT_IDLE_SPIN, DEFAULT_MAX_TOKENS};
pub use kernel::CpuKernel;
pub use prepared::CpuPreparedRouter;

/// The README's examples, compiled (and where they need no files, run) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
