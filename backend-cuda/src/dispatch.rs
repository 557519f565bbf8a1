//! The dispatch layout on the GPU: `dispatch_into` enqueues the kernels of `sluice-kernels`'
//! `dispatch.cuh` on the caller's stream, into the caller's outputs and workspace; `dispatch` is
//! the synchronous convenience for host ids and host outputs.
//!
//! Like `route_into`: every check first, then only enqueues kernels (and, with rank outputs, a
//! memset) with no allocation and no synchronisation, so a capture records the call. On a stream
//! the ids cannot be looked at before the kernels run: an id outside `[0, E)` other than `-1`, or
//! an expert whose rank-table entry is outside `[0, R)`, is skipped and counted in `invalid` like
//! a `-1`, never written out of bounds.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::cuMemsetD32Async;
use sluice_kernels::{
    DispatchBuffer, DispatchBuffers, DispatchPlan, NVIDIA_WAVE_WIDTH, check_host_dispatch,
    dispatch_args, host_i32_values, plan_dispatch,
};
use sluice_tensor::{
    BackendError, DType, Device, DeviceStream, DispatchInputs, DispatchOutputs, DispatchShape,
    DlpackError, DlpackView, DlpackViewMut, Execution, PreparedRouter, check_dispatch_into,
};

use crate::buffer::DeviceBuffer;
use crate::enqueue;
use crate::error::CudaError;
use crate::gpu::Gpu;
use crate::module::RouterModule;
use crate::prepared::CudaPreparedRouter;

/// What a dispatch needs of its router.
pub(crate) struct Dispatcher<'a> {
    pub(crate) router: &'a CudaPreparedRouter,
    pub(crate) gpu: &'a Arc<Gpu>,
    pub(crate) module: &'a RouterModule,
    pub(crate) dependent_launch: bool,
}

/// The plan of a dispatch of `tokens` tokens through `router`.
fn plan(router: &CudaPreparedRouter, tokens: usize) -> Result<DispatchPlan, CudaError> {
    let spec = router.spec();
    Ok(plan_dispatch(tokens, spec.top_k, spec.num_experts, NVIDIA_WAVE_WIDTH)?)
}

/// Bytes of workspace a dispatch of `tokens` tokens needs: the per-block counts of the
/// many-block path (0 up to `sluice_kernels::ONE_BLOCK_MAX_PAIRS` pairs). A size the kernels do
/// not take needs none: `dispatch_into` refuses it.
pub(crate) fn workspace_bytes(router: &CudaPreparedRouter, tokens: usize) -> usize {
    plan(router, tokens).map_or(0, |plan| plan.workspace_bytes)
}

impl Dispatcher<'_> {
    /// `PreparedRouter::dispatch_into`: checks, then enqueues on the caller's stream.
    pub(crate) fn dispatch_into(
        &self,
        inputs: &DispatchInputs<'_>,
        outputs: &mut DispatchOutputs<'_>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        const OP: &str = "dispatch_into";
        let (shape, ranks) = check_dispatch_into(OP, self.router, inputs, outputs, execution)?;
        self.enqueue_checked(OP, inputs, outputs, shape, ranks, execution)
    }

    /// A layout whose arguments were checked (`check_dispatch_into`, or
    /// `check_route_and_dispatch_into`, which returned `shape` and `ranks`): its kernels on the
    /// execution's stream.
    pub(crate) fn enqueue_checked(
        &self,
        op: &'static str,
        inputs: &DispatchInputs<'_>,
        outputs: &mut DispatchOutputs<'_>,
        shape: DispatchShape,
        ranks: usize,
        execution: Execution,
    ) -> Result<(), BackendError> {
        let plan = plan(self.router, shape.tokens)?;
        let mut args = dispatch_args(op, inputs, outputs, shape, ranks)?;
        plan.fill(&mut args);
        self.gpu.ctx.bind_to_thread().map_err(CudaError::driver("binding the context"))?;
        let stream = CudaPreparedRouter::stream(execution);
        let mut params: [*mut c_void; 1] = [(&raw mut args).cast()];
        if let Some(count) = plan.count {
            // SAFETY: the one parameter is a `DispatchArgs`, the device's `sluice_dispatch_args`
            // (same layout, checked against the PTX in CI); the caller's check validated every
            // address against the extents the kernel touches (the workspace against
            // `plan.workspace_bytes`), and `args` outlives the call.
            unsafe {
                enqueue::launch(
                    &self.module.dispatch_count,
                    count,
                    stream,
                    self.dependent_launch,
                    &mut params,
                )
            }?;
        }
        // SAFETY: as above, for the scatter kernel of the same argument.
        unsafe {
            enqueue::launch(
                &self.module.dispatch_scatter,
                plan.scatter,
                stream,
                self.dependent_launch,
                &mut params,
            )
        }?;
        if ranks > 0 {
            // The rank-tokens kernel adds into zeros. SAFETY: `rank_tokens` holds `ranks` i32
            // (checked by `check_dispatch_into`); the memset is ordered on the caller's stream.
            let zeroed = unsafe { cuMemsetD32Async(args.rank_tokens, 0, ranks, stream).result() };
            zeroed.map_err(CudaError::driver("zeroing the tokens per rank"))?;
        }
        if ranks > 0 && shape.tokens > 0 {
            // SAFETY: as above, for the rank-tokens kernel of the same argument.
            unsafe {
                enqueue::launch(
                    &self.module.dispatch_rank_tokens,
                    plan.rank_tokens,
                    stream,
                    self.dependent_launch,
                    &mut params,
                )
            }?;
        }
        Ok(())
    }

    /// `PreparedRouter::dispatch`: host ids and outputs, computed on the device on the backend's
    /// own stream, waited for and copied back.
    pub(crate) fn dispatch(
        &self,
        inputs: &DispatchInputs<'_>,
        outputs: &mut DispatchOutputs<'_>,
    ) -> Result<(), BackendError> {
        const OP: &str = "dispatch";
        let gpu = self.gpu;
        let tokens = check_host_dispatch(OP, self.router.spec(), inputs, outputs)?.tokens;
        let ids = upload(gpu, OP, "topk_ids", &inputs.topk_ids)?;
        let table =
            inputs.expert_ranks.map(|table| upload(gpu, OP, "expert_ranks", &table)).transpose()?;
        let mut device = DeviceOutputs::like(OP, outputs, zeroed(gpu))?;
        let workspace_len = workspace_bytes(self.router, tokens).max(1);
        let mut workspace =
            DeviceBuffer::zeroed(Arc::clone(gpu), DType::U8, &[workspace_len], None)?;
        // SAFETY: the backend's own stream lives as long as the backend; every buffer handed to
        // the call is owned here and outlives the synchronisation below.
        let stream = unsafe {
            DeviceStream::new(Device::Cuda(gpu.ordinal), gpu.stream.cu_stream() as usize)
        }
        .map_err(CudaError::from)?;
        let mut device_inputs = DispatchInputs::new(ids.view().map_err(argument(OP, "topk_ids"))?);
        if let Some(table) = &table {
            device_inputs = device_inputs
                .with_expert_ranks(table.view().map_err(argument(OP, "expert_ranks"))?);
        }
        let mut device_outputs = device.views(OP)?;
        device_outputs.workspace = Some(workspace.view_mut().map_err(argument(OP, "workspace"))?);
        self.dispatch_into(&device_inputs, &mut device_outputs, Execution::Stream(stream))?;
        device.copy_back(OP, outputs)
    }
}

fn argument(op: &'static str, arg: &'static str) -> impl Fn(DlpackError) -> BackendError {
    move |source| BackendError::Argument { op, arg, source }
}

/// A host i32 argument copied into a new contiguous device buffer of its shape.
fn upload(
    gpu: &Arc<Gpu>,
    op: &'static str,
    arg: &'static str,
    view: &DlpackView<'_>,
) -> Result<DeviceBuffer, BackendError> {
    let values = host_i32_values(op, arg, view)?;
    let mut buffer = DeviceBuffer::zeroed(Arc::clone(gpu), view.dtype(), view.shape(), None)?;
    if !values.is_empty() {
        buffer.write(&values)?;
    }
    Ok(buffer)
}

/// Device buffers for the outputs of a dispatch (`sluice-kernels`' shared logic over this
/// backend's buffers).
pub(crate) type DeviceOutputs = DispatchBuffers<DeviceBuffer>;

impl DispatchBuffer for DeviceBuffer {
    fn view_mut(&mut self, op: &'static str) -> Result<DlpackViewMut<'_>, BackendError> {
        DeviceBuffer::view_mut(self).map_err(argument(op, "outputs"))
    }

    fn read_i32(&self) -> Result<Vec<i32>, BackendError> {
        Ok(DeviceBuffer::read_i32(self)?)
    }
}

/// A zeroed contiguous device buffer, for [`DeviceOutputs`].
pub(crate) fn zeroed(
    gpu: &Arc<Gpu>,
) -> impl FnMut(DType, &[usize]) -> Result<DeviceBuffer, BackendError> + '_ {
    |dtype, dims| Ok(DeviceBuffer::zeroed(Arc::clone(gpu), dtype, dims, None)?)
}
