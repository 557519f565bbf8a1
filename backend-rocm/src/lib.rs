//! AMD ROCm backend for sluice.
//!
//! The HIP runtime is loaded at run time (`libamdhip64.so.7`, `.6`, `.5`; `$ROCM_PATH/lib` first)
//! through a small table of our own ([`HipApi`]): no ROCm is needed to build, and a missing library,
//! symbol or device is a [`RocmError`], never a panic or an abort. The kernels are the shared source
//! of `sluice-kernels`, compiled by clang at build time into AMD code objects for gfx90a and gfx942
//! (gfx950 where the compiler accepts it) and embedded ([`CODE_OBJECTS`]). AMD has no run-time
//! compiler this crate can rely on (hiprtc aborts inside comgr for gfx942 on some installs), so the
//! routing configs are the fixed list `kernels/gpu/offline_configs.txt`.
//!
//! [`RocmBackend`] implements `sluice_tensor::Backend` on one AMD GPU, and its
//! [`RocmPreparedRouter`] the engine's calls `route_into` and `dispatch_into` (the dispatch layout
//! after the gate) on the caller's `hipStream_t` under the same contract as the CUDA backend: everything costly in `prepare_router`, nothing allocated,
//! copied or synchronised while enqueuing, so HIP graph capture records it. AMD has no `mma.sync`:
//! the router GEMM is the scalar kernel, launched in blocks of 64-wide waves.
//!
//! Layers, bottom up:
//! - `api`: the resolved HIP functions;
//! - `runtime`: finding and loading the library, version and device checks, return codes as errors;
//! - `elf`, `code_objects`: the embedded code objects and what their ELF says;
//! - `device`: opening one GPU (kernels embedded, runtime loaded, device present) and loading the
//!   code objects of a routing config on it;
//! - `stream`: streams, capture and graphs ([`HipStream`], [`HipGraph`]);
//! - `memory`: device memory, DLPack export, copies (preparation and conveniences only);
//! - `enqueue`: the kernels on a given stream into given addresses, with the argument packing and
//!   plans of `sluice-kernels`;
//! - `gate`: the synchronous conveniences on the backend's own stream;
//! - `dispatch`: the dispatch layout, enqueued after the shared checks, and its synchronous form;
//! - [`RocmBackend`] and [`RocmPreparedRouter`]: the trait implementations;
//! - `info`: the summary `sluice info` prints.
#![deny(unsafe_op_in_unsafe_fn)]

mod api;
mod backend;
mod code_objects;
mod device;
mod dispatch;
mod elf;
mod enqueue;
mod error;
mod gate;
mod gpu;
mod info;
mod memory;
mod prepared;
mod runtime;
mod stream;

pub use api::{Handle, HipApi, HipStatus};
pub use backend::RocmBackend;
pub use code_objects::{
    CODE_OBJECTS, COMPILER, CodeObject, architectures, built_with_kernels, configs,
};
pub use device::{LoadedModule, RocmDevice};
pub use elf::{CodeObjectInfo, inspect};
pub use error::{HIP_ERROR_INVALID_DEVICE, HIP_ERROR_NO_DEVICE, HipError, HipVersion, RocmError};
pub use gpu::embedded_config;
pub use info::{RocmInfo, probe};
pub use prepared::RocmPreparedRouter;
pub use runtime::HipRuntime;
pub use stream::{CaptureStatus, HipGraph, HipStream};
