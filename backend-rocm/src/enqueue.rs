//! The layer everything else is built on: enqueue the gate on a given HIP stream, into given
//! device addresses (with row strides), using a given workspace. Nothing here allocates, loads,
//! copies or synchronises, so every call can be captured into a HIP graph.
//!
//! The arguments are packed by `sluice-kernels` in the kernels' signature order (the same as on
//! NVIDIA); launches go through `hipModuleLaunchKernel` with blocks of whole 64-wide waves. The
//! GEMM plan on AMD is always the scalar kernel with one split (no `mma.sync`), so the partial
//! sums are the logits and `sluice_sum_partials` is never needed.
//! The dispatch layout's kernels take their one argument, `DispatchArgs`, by value.
//! Programmatic dependent launch has no AMD equivalent: the kernels' hooks compile to nothing.

use std::ffi::c_void;

use sluice_kernels::{
    AMD_WAVE_WIDTH, DISPATCH_COUNT_KERNEL, DISPATCH_RANK_TOKENS_KERNEL, DISPATCH_SCATTER_KERNEL,
    DeviceMatrix, DispatchArgs, DispatchPlan, GemmPlan, HashInputs, Launch, Partials,
    RouteCounters, RoutingTargets, gemm_args, route_args, route_launch,
};

use crate::api::Handle;
use crate::device::LoadedModule;
use crate::error::RocmError;
use crate::runtime::HipRuntime;

/// Enqueues the router GEMM of `plan` into `partials` (the logits themselves with one split),
/// and, if `status` is given, its reset to `[0, -1]`.
pub(crate) fn gemm(
    stream: Handle,
    module: &LoadedModule,
    plan: &GemmPlan,
    hidden: &DeviceMatrix,
    weight: &DeviceMatrix,
    partials: &Partials,
    status: Option<u64>,
) -> Result<(), RocmError> {
    let function = module.kernel(&plan.kernel.name())?;
    let counters = RouteCounters { status, ticket: None };
    let mut args = gemm_args(plan, hidden, weight, partials, counters);
    // SAFETY: the arguments are packed in the kernel's parameter order and C types (checked
    // against the source by `sluice-kernels`) and outlive the call; every address was validated
    // to cover the extents the plan reads or writes.
    unsafe { launch(module, function, plan.launch, stream, &mut args.pointers()) }
}

/// Enqueues routing of `tokens` rows of `partials` (plus `bias`) into `targets`, with the table
/// and token ids of a hash-routed module.
#[allow(clippy::too_many_arguments)]
pub(crate) fn route(
    stream: Handle,
    module: &LoadedModule,
    partials: &Partials,
    bias: Option<u64>,
    tokens: usize,
    scale: f32,
    targets: &RoutingTargets,
    hash: Option<&HashInputs>,
) -> Result<(), RocmError> {
    let geometry = route_launch(tokens, AMD_WAVE_WIDTH)?;
    let function = module.kernel(sluice_kernels::ROUTE_KERNEL)?;
    let mut args = route_args(partials, bias, tokens, scale, targets, hash);
    // SAFETY: the arguments match `sluice_route`'s signature in type and order; the callers
    // validated every address against the extents `tokens`, E and K of the loaded config. A
    // hash-routed module gets `hash` (its callers make one for every call of such a router): a
    // table of `table_rows` checked rows of K experts of [0, E), and `tokens` contiguous ids, each
    // looked at before it indexes the table.
    unsafe { launch(module, function, geometry, stream, &mut args.pointers()) }
}

/// Enqueues the dispatch layout of `plan` with argument `args` (which `plan` filled): the
/// many-block path's counts, the scatter, and with rank outputs (`args.ranks > 0`) the tokens per
/// rank zeroed, then counted when there are rows.
///
/// # Safety
///
/// Every address in `args` must cover what the kernels touch for its sizes (the workspace
/// `plan.workspace_bytes`, `rank_tokens` `args.ranks` i32), on the module's device; `stream` as
/// for [`launch`].
pub(crate) unsafe fn dispatch(
    stream: Handle,
    module: &LoadedModule,
    plan: &DispatchPlan,
    args: &mut DispatchArgs,
) -> Result<(), RocmError> {
    let ranks = usize::try_from(args.ranks).unwrap_or(0);
    let rows = args.tokens > 0;
    let rank_tokens = args.rank_tokens;
    let mut params: [*mut c_void; 1] = [std::ptr::from_mut(args).cast()];
    if let Some(count) = plan.count {
        let function = module.kernel(DISPATCH_COUNT_KERNEL)?;
        // SAFETY: the one parameter is a `DispatchArgs`, the device's `sluice_dispatch_args` (same
        // layout: the code-object test checks the argument segment's size), alive for the call;
        // its addresses as the caller promises.
        unsafe { launch(module, function, count, stream, &mut params) }?;
    }
    let function = module.kernel(DISPATCH_SCATTER_KERNEL)?;
    // SAFETY: as above, for the scatter kernel of the same argument.
    unsafe { launch(module, function, plan.scatter, stream, &mut params) }?;
    if ranks > 0 {
        // The rank-tokens kernel adds into zeros.
        let runtime = module.device().runtime();
        // SAFETY: `rank_tokens` holds `ranks` i32 (the caller's promise); the memset is ordered
        // on `stream` after the scatter and before the kernel below.
        let status = unsafe {
            (runtime.api().hipMemsetAsync)(
                rank_tokens as *mut c_void,
                0,
                ranks * size_of::<i32>(),
                stream,
            )
        };
        runtime.check("hipMemsetAsync", status)?;
    }
    if ranks > 0 && rows {
        let function = module.kernel(DISPATCH_RANK_TOKENS_KERNEL)?;
        // SAFETY: as above, for the rank-tokens kernel of the same argument.
        unsafe { launch(module, function, plan.rank_tokens, stream, &mut params) }?;
    }
    Ok(())
}

/// Launches `function` of `module` on `stream`.
///
/// # Safety
///
/// `params` must point to one value per kernel parameter, of the parameter's type, alive for the
/// call; the kernel must only touch memory its arguments entitle it to; `stream` must be a live
/// stream of the module's device (or 0, its null stream).
unsafe fn launch(
    module: &LoadedModule,
    function: Handle,
    geometry: Launch,
    stream: Handle,
    params: &mut [*mut c_void],
) -> Result<(), RocmError> {
    let runtime: &HipRuntime = module.device().runtime();
    let [gx, gy, gz] = geometry.grid;
    let [bx, by, bz] = geometry.block;
    // SAFETY: `function` belongs to `module`, which is loaded while borrowed; `params` and
    // `stream` as promised by the caller; no extra launch options are passed (null).
    let status = unsafe {
        (runtime.api().hipModuleLaunchKernel)(
            function,
            gx,
            gy,
            gz,
            bx,
            by,
            bz,
            geometry.shared_bytes,
            stream,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    Ok(runtime.check("hipModuleLaunchKernel", status)?)
}
