//! The layer everything else is built on: enqueue the gate on a given stream, into given device
//! addresses (with row strides), using a given workspace. Nothing here allocates, compiles, loads
//! or synchronises, so every call can be captured into a CUDA graph.
//!
//! Kernels are launched through the driver's `cuLaunchKernelEx`, which takes the caller's raw
//! stream and the programmatic-dependent-launch attribute.

use std::ffi::c_void;

use cudarc::driver::CudaFunction;
use cudarc::driver::sys::{
    CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig, CUresult,
    CUstream, cuLaunchKernelEx, cuMemsetD32Async,
};
use sluice_kernels::{GemmKernel, GemmPlan, Launch, route_launch, sum_partials_launch};

use crate::error::CudaError;
use crate::input::DeviceMatrix;
use crate::module::RouterModule;

/// Where the routing results go: device addresses with row strides in elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoutingTargets {
    /// i32 `[T, K]`.
    pub(crate) ids: u64,
    pub(crate) ids_row_stride: usize,
    /// f32 `[T, K]`.
    pub(crate) weights: u64,
    pub(crate) weights_row_stride: usize,
    /// f32 `[T, E]`, if the caller wants the logits.
    pub(crate) logits: Option<(u64, usize)>,
    /// i32 `[2]`: non-finite rows and the first of them (or -1).
    pub(crate) status: Option<u64>,
}

/// Partial sums of the logits, `splits` slices of `[T, E]` (`split_stride` elements apart, rows
/// `row_stride` apart); one slice is the logits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Partials {
    pub(crate) ptr: u64,
    pub(crate) splits: usize,
    pub(crate) split_stride: usize,
    pub(crate) row_stride: usize,
}

/// The router weight on the device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Weight {
    pub(crate) matrix: DeviceMatrix,
}

/// Enqueues the router GEMM: `plan.splits` partial sums into `partials` (the logits themselves
/// when there is one split), and, if `status` is given, its reset to `[0, -1]` (ordered after the
/// previous kernel on the stream).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    stream: CUstream,
    module: &RouterModule,
    plan: &GemmPlan,
    hidden: &DeviceMatrix,
    weight: &Weight,
    partials: &Partials,
    status: Option<u64>,
    dependent_launch: bool,
) -> Result<(), CudaError> {
    let function = module.gemm(plan.kernel)?;
    let mut x = hidden.ptr;
    let mut w = weight.matrix.ptr;
    let mut tokens = hidden.rows as i32;
    let mut hidden_size = hidden.cols as i32;
    let mut experts = weight.matrix.rows as i32;
    let mut out = partials.ptr;
    let mut out_row = partials.row_stride as i64;
    let mut status = status.unwrap_or(0);
    let mut x_row = hidden.row_stride as i64;
    let mut w_row = weight.matrix.row_stride as i64;
    match plan.kernel {
        GemmKernel::Gemv { .. } => {
            let mut params: [*mut c_void; 10] = [
                (&raw mut x).cast(),
                (&raw mut x_row).cast(),
                (&raw mut w).cast(),
                (&raw mut w_row).cast(),
                (&raw mut tokens).cast(),
                (&raw mut hidden_size).cast(),
                (&raw mut experts).cast(),
                (&raw mut out).cast(),
                (&raw mut out_row).cast(),
                (&raw mut status).cast(),
            ];
            // SAFETY: the parameters match the matrix-vector kernel's signature in type and order
            // (pointers as 64-bit addresses, `long long` as i64, `int` as i32); the planner chose
            // it for bf16 rows that are 16-byte aligned with a hidden size that is a multiple of 8,
            // every address was validated to cover the extents it reads or writes (one split), and
            // the values outlive the call.
            unsafe { launch(function, plan.launch, stream, dependent_launch, &mut params) }
        }
        GemmKernel::Mma { .. } => {
            let mut split_stride = partials.split_stride as i64;
            let mut k_per_warp = plan.k_per_warp as i32;
            let mut params: [*mut c_void; 12] = [
                (&raw mut x).cast(),
                (&raw mut x_row).cast(),
                (&raw mut w).cast(),
                (&raw mut w_row).cast(),
                (&raw mut tokens).cast(),
                (&raw mut hidden_size).cast(),
                (&raw mut experts).cast(),
                (&raw mut k_per_warp).cast(),
                (&raw mut out).cast(),
                (&raw mut split_stride).cast(),
                (&raw mut out_row).cast(),
                (&raw mut status).cast(),
            ];
            // SAFETY: the parameters match the kernel's signature in type and order (pointers as
            // 64-bit addresses, `long long` as i64, `int` as i32), every address was validated to
            // cover the extents the plan reads or writes, and the values outlive the call.
            unsafe { launch(function, plan.launch, stream, dependent_launch, &mut params) }
        }
        GemmKernel::Simt { .. } => {
            let mut x_col = hidden.col_stride as i64;
            let mut w_col = weight.matrix.col_stride as i64;
            let mut params: [*mut c_void; 12] = [
                (&raw mut x).cast(),
                (&raw mut x_row).cast(),
                (&raw mut x_col).cast(),
                (&raw mut w).cast(),
                (&raw mut w_row).cast(),
                (&raw mut w_col).cast(),
                (&raw mut tokens).cast(),
                (&raw mut hidden_size).cast(),
                (&raw mut experts).cast(),
                (&raw mut out).cast(),
                (&raw mut out_row).cast(),
                (&raw mut status).cast(),
            ];
            // SAFETY: as above, for the scalar kernel's signature.
            unsafe { launch(function, plan.launch, stream, dependent_launch, &mut params) }
        }
    }
}

/// Enqueues routing of `tokens` rows of `partials` into `targets`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn route(
    stream: CUstream,
    module: &RouterModule,
    partials: &Partials,
    bias: Option<u64>,
    tokens: usize,
    scale: f32,
    targets: &RoutingTargets,
    dependent_launch: bool,
) -> Result<(), CudaError> {
    let geometry = route_launch(tokens)?;
    let mut src = partials.ptr;
    let mut splits = partials.splits as i32;
    let mut split_stride = partials.split_stride as i64;
    let mut row_stride = partials.row_stride as i64;
    let mut bias = bias.unwrap_or(0);
    let mut tokens = tokens as i32;
    let mut scale = scale;
    let mut ids = targets.ids;
    let mut ids_row = targets.ids_row_stride as i64;
    let mut weights = targets.weights;
    let mut weights_row = targets.weights_row_stride as i64;
    let (mut logits, mut logits_row) = targets.logits.map_or((0, 0), |(p, s)| (p, s as i64));
    let mut status = targets.status.unwrap_or(0);
    let mut params: [*mut c_void; 14] = [
        (&raw mut src).cast(),
        (&raw mut splits).cast(),
        (&raw mut split_stride).cast(),
        (&raw mut row_stride).cast(),
        (&raw mut bias).cast(),
        (&raw mut tokens).cast(),
        (&raw mut scale).cast(),
        (&raw mut ids).cast(),
        (&raw mut ids_row).cast(),
        (&raw mut weights).cast(),
        (&raw mut weights_row).cast(),
        (&raw mut logits).cast(),
        (&raw mut logits_row).cast(),
        (&raw mut status).cast(),
    ];
    let function = module.route(partials.splits);
    // SAFETY: the parameters match the signature `sluice_route` and `sluice_route_logits` share,
    // in type and order; the callers validated every address against the extents `tokens`, E and
    // K of the compiled config, and the compact kernel is chosen only for one partial sum.
    unsafe { launch(function, geometry, stream, dependent_launch, &mut params) }
}

/// Enqueues the reset of `status` to `[0, -1]`, which the GEMM kernels do themselves, for a GEMM
/// that is not one of them.
pub(crate) fn reset_status(stream: CUstream, status: u64) -> Result<(), CudaError> {
    for (offset, value) in [(0, 0u32), (4, u32::MAX)] {
        // SAFETY: `status` is the caller's checked i32 `[2]` on this context's device (current on
        // this thread); one 32-bit word is written at each offset, in stream order.
        let result = unsafe { cuMemsetD32Async(status + offset, value, 1, stream) };
        if result != CUresult::CUDA_SUCCESS {
            return Err(CudaError::Driver {
                doing: "resetting the routing status",
                source: cudarc::driver::DriverError(result),
            });
        }
    }
    Ok(())
}

/// Enqueues the sum of the partials into logits `[T, E]` with row stride `logits_row_stride`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sum_partials(
    stream: CUstream,
    module: &RouterModule,
    partials: &Partials,
    tokens: usize,
    experts: usize,
    logits: u64,
    logits_row_stride: usize,
    dependent_launch: bool,
) -> Result<(), CudaError> {
    let geometry = sum_partials_launch(tokens, experts)?;
    let mut src = partials.ptr;
    let mut splits = partials.splits as i32;
    let mut tokens = tokens as i32;
    let mut experts = experts as i32;
    let mut out = logits;
    let mut out_row = logits_row_stride as i64;
    let mut params: [*mut c_void; 6] = [
        (&raw mut src).cast(),
        (&raw mut splits).cast(),
        (&raw mut tokens).cast(),
        (&raw mut experts).cast(),
        (&raw mut out).cast(),
        (&raw mut out_row).cast(),
    ];
    // SAFETY: the parameters match `sluice_sum_partials`; the partials hold `splits` contiguous
    // `[T, E]` slices and the logits cover `[T, E]` with the given row stride.
    unsafe { launch(&module.sum_partials, geometry, stream, dependent_launch, &mut params) }
}

/// Launches `function` on `stream`, with programmatic dependent launch if asked.
///
/// # Safety
///
/// `params` must point to one value per kernel parameter, of the parameter's type, alive for the
/// call; the kernel must only touch memory its arguments entitle it to; the function's context
/// must be the one current on this thread (cudarc binds it when the module is loaded and the
/// backend binds it before every call).
unsafe fn launch(
    function: &CudaFunction,
    geometry: Launch,
    stream: CUstream,
    dependent_launch: bool,
    params: &mut [*mut c_void],
) -> Result<(), CudaError> {
    // SAFETY: a zeroed attribute value is a valid bit pattern of this plain C union.
    let mut value: CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.programmaticStreamSerializationAllowed = 1;
    let mut attribute = CUlaunchAttribute {
        id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value,
    };
    let config = CUlaunchConfig {
        gridDimX: geometry.grid[0],
        gridDimY: geometry.grid[1],
        gridDimZ: geometry.grid[2],
        blockDimX: geometry.block[0],
        blockDimY: geometry.block[1],
        blockDimZ: geometry.block[2],
        sharedMemBytes: 0,
        hStream: stream,
        attrs: &raw mut attribute,
        numAttrs: u32::from(dependent_launch),
    };
    // SAFETY: `config` and `attribute` live across the call; `params` as promised by the caller;
    // the function handle comes from a loaded module that `function` keeps alive.
    let result = unsafe {
        cuLaunchKernelEx(
            &raw const config,
            function.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    match result {
        CUresult::CUDA_SUCCESS => Ok(()),
        error => Err(CudaError::Driver {
            doing: "launching a router kernel",
            source: cudarc::driver::DriverError(error),
        }),
    }
}
