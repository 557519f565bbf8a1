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
    CUstream, cuLaunchKernelEx,
};
use sluice_kernels::{
    DispatchArgs, FusedLayout, GemmKernel, GemmPlan, Launch, NVIDIA_WAVE_WIDTH, RouteDispatchArgs,
    WarpgroupArgs, gemm_args, reset_status_args, reset_status_launch, route_args,
    sum_partials_args, sum_partials_launch,
};
pub(crate) use sluice_kernels::{HashInputs, Partials, RouteCounters, RoutingTargets};

use crate::error::CudaError;
use crate::input::DeviceMatrix;
use crate::module::RouterModule;
use crate::tensor_map::warpgroup_maps;

/// The router weight on the device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Weight {
    pub(crate) matrix: DeviceMatrix,
}

/// Enqueues the router GEMM: `plan.splits` partial sums into `partials` (the logits themselves
/// when there is one split), and the reset of `counters` (ordered after the previous kernel on the
/// stream).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    stream: CUstream,
    module: &RouterModule,
    plan: &GemmPlan,
    hidden: &DeviceMatrix,
    weight: &Weight,
    partials: &Partials,
    counters: RouteCounters,
    dependent_launch: bool,
) -> Result<(), CudaError> {
    let function = module.gemm(plan.kernel)?;
    let mut args = gemm_args(plan, hidden, &weight.matrix, partials, counters);
    // Whichever holds the values lives to the launch: the pointers point into it.
    let mut warpgroup;
    let params = &mut if plan.kernel == GemmKernel::Warpgroup {
        let maps = warpgroup_maps(hidden, &weight.matrix, plan.token_rows(hidden.rows))?;
        warpgroup = WarpgroupArgs::new(maps, args);
        warpgroup.pointers()
    } else {
        args.pointers()
    };
    // SAFETY: the arguments are packed in the kernel's parameter order and C types (checked
    // against the source by `sluice-kernels`), the warpgroup kernel's tensor maps first, and
    // outlive the call; every address was validated to cover the extents the plan reads or
    // writes, and the maps describe exactly those matrices (the copy unit reads nothing outside
    // a map's extents, filling zeros there).
    unsafe { launch(function, plan.launch, stream, dependent_launch, params) }
}

/// Enqueues routing of `tokens` rows of `partials` into `targets`, with the table and token ids
/// of a hash-routed module.
#[allow(clippy::too_many_arguments)]
pub(crate) fn route(
    stream: CUstream,
    module: &RouterModule,
    partials: &Partials,
    bias: Option<u64>,
    tokens: usize,
    scale: f32,
    targets: &RoutingTargets,
    hash: Option<&HashInputs>,
    dependent_launch: bool,
) -> Result<(), CudaError> {
    let mut args = route_args(partials, bias, tokens, scale, targets, hash);
    let (function, plan) = module.route(tokens, partials.splits)?;
    // SAFETY: the arguments match the signature every routing kernel shares (`sluice_route`,
    // `sluice_route_logits` and their block-per-token forms), in type and order (checked against
    // the source by `sluice-kernels`); the callers validated every address against the extents
    // `tokens`, E and K of the compiled config; the plan launches a warp per token for
    // `tokens` tokens or one block per token (one thread per expert) for exactly `tokens`, and
    // the compact kernels are chosen only for one partial sum. A hash-routed module gets `hash`
    // (its callers make one for every call of such a router), and only warp kernels: a table of
    // `table_rows` checked rows of K experts of [0, E), and `tokens` contiguous ids, each looked
    // at before it indexes the table.
    unsafe { launch(function, plan.launch, stream, dependent_launch, &mut args.pointers()) }
}

/// Enqueues routing of `tokens` rows of `partials` into `targets` with the dispatch layout of
/// the ids it writes, by the fused kernel `fused` planned (`layout` filled by it), counting its
/// blocks and their rows at `ticket` (which the GEMM before it reset), then, past the rows the
/// last routing block lays out, `sluice_dispatch_words`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn route_dispatch(
    stream: CUstream,
    module: &RouterModule,
    partials: &Partials,
    bias: Option<u64>,
    scale: f32,
    targets: &RoutingTargets,
    fused: &FusedLayout,
    layout: DispatchArgs,
    ticket: u64,
    dependent_launch: bool,
) -> Result<(), CudaError> {
    let function = module.route_dispatch(fused, partials.splits)?;
    let route = route_args(partials, bias, fused.tokens, scale, targets, None);
    let mut args = RouteDispatchArgs::new(route, layout, ticket);
    // SAFETY: the arguments match the fused kernels' signature (the routing kernels', then
    // `sluice_dispatch_args` by value and the ticket pointer; checked against the source by
    // `sluice-kernels`), and outlive the call. The routing part is as in `route`: `fused` was
    // planned from the block-per-token plan, whose launch `fused.launch()` is (one block per
    // token, a thread per expert; never a hash-routed module, which has no fused kernels).
    // `layout` was made by `dispatch_args` from outputs that `check_route_and_dispatch_into`
    // validated, its ids being `targets.ids` itself, and filled by `fused` for blocks of the
    // routing block's threads. `ticket` is a 4-byte word inside the caller's checked route
    // workspace, past the partials, followed there by the counts of `fused_counts_bytes` for
    // the call's rows; the GEMM enqueued before this resets both after its wait.
    unsafe { launch(function, fused.launch(), stream, dependent_launch, &mut args.pointers())? };
    let Some(geometry) = fused.layout_launch() else { return Ok(()) };
    let words = module.dispatch_words()?;
    // SAFETY: `sluice_dispatch_words` takes the same layout argument and ticket (signature
    // checked against the source by `sluice-kernels`); `layout.blocks` is its grid, a word of
    // rows each, within the `tokens` rows the counts after the ticket were sized for, and its
    // blocks have the routing block's threads, one per expert, as `fill` set.
    unsafe { launch(words, geometry, stream, dependent_launch, &mut args.layout_pointers()) }
}

/// Enqueues the reset of `counters` for a call of `tokens` rows, which the GEMM kernels do
/// themselves, for a GEMM that is not one of them, ordered after the previous kernel on the
/// stream.
pub(crate) fn reset_status(
    stream: CUstream,
    module: &RouterModule,
    counters: RouteCounters,
    tokens: usize,
    dependent_launch: bool,
) -> Result<(), CudaError> {
    let mut args = reset_status_args(counters, tokens);
    let geometry = reset_status_launch(NVIDIA_WAVE_WIDTH);
    // SAFETY: the arguments match `sluice_reset_status`'s two pointers and row count; each
    // pointer is null or a checked device address of this context: the caller's i32 `[2]`
    // status, the ticket word inside the caller's checked route workspace, which holds the
    // fused layout's counts for `tokens` rows after it (`fused_counts_bytes`) wherever the call
    // passes a ticket.
    unsafe {
        launch(&module.reset_status, geometry, stream, dependent_launch, &mut args.pointers())
    }
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
    let mut args = sum_partials_args(partials, tokens, experts, logits, logits_row_stride);
    let params = &mut args.pointers();
    // SAFETY: the parameters match `sluice_sum_partials`; the partials hold `splits` contiguous
    // `[T, E]` slices and the logits cover `[T, E]` with the given row stride.
    unsafe { launch(&module.sum_partials, geometry, stream, dependent_launch, params) }
}

/// Launches `function` on `stream`, with programmatic dependent launch if asked.
///
/// # Safety
///
/// `params` must point to one value per kernel parameter, of the parameter's type, alive for the
/// call; the kernel must only touch memory its arguments entitle it to; the function's context
/// must be the one current on this thread (cudarc binds it when the module is loaded and the
/// backend binds it before every call).
pub(crate) unsafe fn launch(
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
        sharedMemBytes: geometry.shared_bytes,
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
