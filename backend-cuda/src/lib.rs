//! NVIDIA backend for sluice.
//!
//! [`CudaBackend`] implements `sluice_tensor::Backend` on one NVIDIA GPU through cudarc, with the
//! driver and NVRTC loaded at run time: a binary built on a machine without CUDA runs wherever a
//! driver is, and reports [`CudaError::NoDriver`] elsewhere. The kernels come from
//! `sluice-kernels` and are compiled by NVRTC once per routing config, at prepare time, and their
//! PTX kept on disk for the next process (`ptx_cache`, `$SLUICE_KERNEL_CACHE`).
//!
//! Layers, bottom up:
//! - `cublaslt`: the router GEMM for many tokens through cuBLASLt (loaded at run time too; the
//!   backend's own kernels run where it is missing);
//! - `enqueue`: enqueue the GEMM and the routing on a given stream into given device addresses
//!   (with row strides), using given scratch: no allocation, compilation or synchronisation, so it
//!   can be captured in a CUDA graph;
//! - `gate`: the synchronous convenience calls on the backend's own stream (allocating outputs,
//!   copying host inputs up and outputs back when the caller passed host tensors);
//! - [`CudaBackend`] and [`CudaPreparedRouter`]: the trait implementations.
//!
//! cudarc's per-buffer event tracking is turned off right after the context is created, so that
//! nothing the backend does records events on streams outside a capture.
#![deny(unsafe_op_in_unsafe_fn)]

mod backend;
mod buffer;
mod cublaslt;
mod dispatch;
mod enqueue;
mod error;
mod gate;
mod gpu;
mod input;
mod memory;
mod module;
mod prepared;
mod ptx_cache;
mod tensor_map;
pub mod timing;

pub use backend::CudaBackend;
pub use error::CudaError;
pub use prepared::CudaPreparedRouter;
