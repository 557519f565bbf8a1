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
use sluice_kernels::{DispatchArgs, DispatchPlan, plan_dispatch};
use sluice_tensor::{
    BackendError, DType, Device, DeviceStream, DispatchInputs, DispatchOutputs, DispatchShape,
    DlpackError, DlpackView, DlpackViewMut, Execution, PaddedOutputs, PreparedRouter, RankOutputs,
    check_dispatch_into, check_dispatch_values,
};

use crate::buffer::DeviceBuffer;
use crate::enqueue;
use crate::error::CudaError;
use crate::gpu::Gpu;
use crate::input::{self, output_rows};
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
    Ok(plan_dispatch(tokens, spec.top_k, spec.num_experts)?)
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
        let plan = plan(self.router, shape.tokens)?;
        let mut args = arguments(OP, inputs, outputs, shape, ranks)?;
        plan.fill(&mut args);
        self.gpu.ctx.bind_to_thread().map_err(CudaError::driver("binding the context"))?;
        let stream = CudaPreparedRouter::stream(execution);
        let mut params: [*mut c_void; 1] = [(&raw mut args).cast()];
        if let Some(count) = plan.count {
            // SAFETY: the one parameter is a `DispatchArgs`, the device's `sluice_dispatch_args`
            // (same layout, checked against the PTX in CI); `check_dispatch_into` validated every
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
        // Host data is looked at first, as every host dispatch does.
        let spec = self.router.spec();
        let tokens = inputs.topk_ids.shape().first().copied().unwrap_or(0);
        let shape = DispatchShape { tokens, top_k: spec.top_k, experts: spec.num_experts };
        let ranks = outputs.ranks.as_ref().map_or(0, |r| r.rank_counts.shape().iter().product());
        input::check_device(OP, "topk_ids", &inputs.topk_ids, Device::Cpu)?;
        // A table without rank outputs (or the reverse) is refused by `dispatch_into`'s checks.
        if inputs.expert_ranks.is_some() == outputs.ranks.is_some() {
            check_dispatch_values(OP, inputs, shape, ranks)?;
        }
        let ids = upload(gpu, OP, "topk_ids", &inputs.topk_ids)?;
        let table =
            inputs.expert_ranks.map(|table| upload(gpu, OP, "expert_ranks", &table)).transpose()?;
        let mut device = DeviceOutputs::like(gpu, outputs)?;
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

/// The kernels' argument for checked inputs and outputs.
fn arguments(
    op: &'static str,
    inputs: &DispatchInputs<'_>,
    outputs: &mut DispatchOutputs<'_>,
    shape: DispatchShape,
    ranks: usize,
) -> Result<DispatchArgs, BackendError> {
    let address = |view: &mut DlpackViewMut<'_>| output_rows(view).0;
    let to_i32 = |arg: &'static str, value: usize| {
        i32::try_from(value).map_err(|_| BackendError::IndexOverflow { op, arg, entries: value })
    };
    let ids = &inputs.topk_ids;
    let (inverse, inverse_row_stride) = output_rows(&mut outputs.inverse);
    let mut args = DispatchArgs {
        ids: ids.data_ptr() as u64,
        expert_ranks: inputs.expert_ranks.map_or(0, |table| table.data_ptr() as u64),
        expert_counts: address(&mut outputs.expert_counts),
        expert_offsets: address(&mut outputs.expert_offsets),
        sorted_pairs: address(&mut outputs.sorted_pairs),
        inverse,
        invalid: outputs.invalid.as_mut().map_or(0, address),
        block_counts: outputs.workspace.as_mut().map_or(0, address),
        ids_row_stride: ids.strides().first().map_or(0, |&s| s as i64),
        inverse_row_stride: inverse_row_stride as i64,
        tokens: to_i32("topk_ids", shape.tokens)?,
        ranks: to_i32("rank_counts", ranks)?,
        ..DispatchArgs::default()
    };
    if let Some(padded) = outputs.padded.as_mut() {
        args.padded_pairs = address(&mut padded.padded_pairs);
        args.block_experts = address(&mut padded.block_experts);
        args.padded_total = address(&mut padded.padded_total);
        args.block_size = to_i32("block_size", padded.block_size)?;
        args.capacity = to_i32("padded_pairs", padded.padded_pairs.shape()[0])?;
    }
    if let Some(rank_outputs) = outputs.ranks.as_mut() {
        args.rank_counts = address(&mut rank_outputs.rank_counts);
        args.rank_offsets = address(&mut rank_outputs.rank_offsets);
        args.rank_pairs = address(&mut rank_outputs.rank_pairs);
        args.rank_tokens = address(&mut rank_outputs.rank_tokens);
    }
    Ok(args)
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
    input::check_device(op, arg, view, Device::Cpu)?;
    let view_error = |source| BackendError::View { op, arg, source };
    let values: Vec<i32> = match view.rank() {
        1 => view.as_array1::<i32>().map_err(view_error)?.iter().copied().collect(),
        _ => view.as_array2::<i32>().map_err(view_error)?.iter().copied().collect(),
    };
    let mut buffer = DeviceBuffer::zeroed(Arc::clone(gpu), view.dtype(), view.shape(), None)?;
    if !values.is_empty() {
        buffer.write(&values)?;
    }
    Ok(buffer)
}

/// Device buffers for the outputs of a dispatch: of the shapes and dtypes of a call's host outputs
/// (so that `dispatch_into` checks them as it would check the host ones), or of a shape.
pub(crate) struct DeviceOutputs {
    expert_counts: DeviceBuffer,
    expert_offsets: DeviceBuffer,
    sorted_pairs: DeviceBuffer,
    inverse: DeviceBuffer,
    invalid: Option<DeviceBuffer>,
    padded: Option<(usize, [DeviceBuffer; 3])>,
    ranks: Option<[DeviceBuffer; 4]>,
}

impl DeviceOutputs {
    /// Zeroed i32 outputs of `shape`, padded to `block_size` when given (no rank outputs).
    pub(crate) fn of_shape(
        gpu: &Arc<Gpu>,
        shape: DispatchShape,
        block_size: Option<usize>,
    ) -> Result<Self, BackendError> {
        let (t, k, e) = (shape.tokens, shape.top_k, shape.experts);
        let buffer = |dims: &[usize]| DeviceBuffer::zeroed(Arc::clone(gpu), DType::I32, dims, None);
        let padded = match block_size {
            Some(block) => {
                let capacity = shape.padded_capacity(block).ok_or(BackendError::IndexOverflow {
                    op: "dispatch",
                    arg: "padded_pairs",
                    entries: usize::MAX,
                })?;
                Some((block, [buffer(&[capacity])?, buffer(&[capacity / block])?, buffer(&[1])?]))
            }
            None => None,
        };
        Ok(DeviceOutputs {
            expert_counts: buffer(&[e])?,
            expert_offsets: buffer(&[e + 1])?,
            sorted_pairs: buffer(&[t * k])?,
            inverse: buffer(&[t, k])?,
            invalid: Some(buffer(&[2])?),
            padded,
            ranks: None,
        })
    }

    fn like(gpu: &Arc<Gpu>, host: &DispatchOutputs<'_>) -> Result<Self, BackendError> {
        let like = |view: &DlpackViewMut<'_>| -> Result<DeviceBuffer, BackendError> {
            input::check_device("dispatch", "outputs", &view.as_view(), Device::Cpu)?;
            Ok(DeviceBuffer::zeroed(Arc::clone(gpu), view.dtype(), view.shape(), None)?)
        };
        Ok(DeviceOutputs {
            expert_counts: like(&host.expert_counts)?,
            expert_offsets: like(&host.expert_offsets)?,
            sorted_pairs: like(&host.sorted_pairs)?,
            inverse: like(&host.inverse)?,
            invalid: host.invalid.as_ref().map(like).transpose()?,
            padded: match &host.padded {
                Some(p) => Some((
                    p.block_size,
                    [like(&p.padded_pairs)?, like(&p.block_experts)?, like(&p.padded_total)?],
                )),
                None => None,
            },
            ranks: match &host.ranks {
                Some(r) => Some([
                    like(&r.rank_counts)?,
                    like(&r.rank_offsets)?,
                    like(&r.rank_pairs)?,
                    like(&r.rank_tokens)?,
                ]),
                None => None,
            },
        })
    }

    /// The buffers as the outputs of `dispatch_into`.
    pub(crate) fn views(&mut self, op: &'static str) -> Result<DispatchOutputs<'_>, BackendError> {
        let view = |buffer| device_view(op, buffer);
        let mut outputs = DispatchOutputs::new(
            view(&mut self.expert_counts)?,
            view(&mut self.expert_offsets)?,
            view(&mut self.sorted_pairs)?,
            view(&mut self.inverse)?,
        );
        outputs.invalid = self.invalid.as_mut().map(view).transpose()?;
        if let Some((block_size, [pairs, blocks, total])) = &mut self.padded {
            outputs.padded = Some(PaddedOutputs {
                block_size: *block_size,
                padded_pairs: view(pairs)?,
                block_experts: view(blocks)?,
                padded_total: view(total)?,
            });
        }
        if let Some([counts, offsets, pairs, tokens]) = &mut self.ranks {
            outputs.ranks = Some(RankOutputs {
                rank_counts: view(counts)?,
                rank_offsets: view(offsets)?,
                rank_pairs: view(pairs)?,
                rank_tokens: view(tokens)?,
            });
        }
        Ok(outputs)
    }

    /// Copies every device output into its host output (after the stream's work).
    fn copy_back(
        &self,
        op: &'static str,
        host: &mut DispatchOutputs<'_>,
    ) -> Result<(), BackendError> {
        copy_back(op, "expert_counts", &self.expert_counts, &mut host.expert_counts)?;
        copy_back(op, "expert_offsets", &self.expert_offsets, &mut host.expert_offsets)?;
        copy_back(op, "sorted_pairs", &self.sorted_pairs, &mut host.sorted_pairs)?;
        copy_back(op, "inverse", &self.inverse, &mut host.inverse)?;
        if let (Some(device), Some(host)) = (&self.invalid, host.invalid.as_mut()) {
            copy_back(op, "invalid", device, host)?;
        }
        if let (Some((_, [pairs, blocks, total])), Some(host)) =
            (&self.padded, host.padded.as_mut())
        {
            copy_back(op, "padded_pairs", pairs, &mut host.padded_pairs)?;
            copy_back(op, "block_experts", blocks, &mut host.block_experts)?;
            copy_back(op, "padded_total", total, &mut host.padded_total)?;
        }
        if let (Some([counts, offsets, pairs, tokens]), Some(host)) =
            (&self.ranks, host.ranks.as_mut())
        {
            copy_back(op, "rank_counts", counts, &mut host.rank_counts)?;
            copy_back(op, "rank_offsets", offsets, &mut host.rank_offsets)?;
            copy_back(op, "rank_pairs", pairs, &mut host.rank_pairs)?;
            copy_back(op, "rank_tokens", tokens, &mut host.rank_tokens)?;
        }
        Ok(())
    }
}

/// A device output's view, for `dispatch_into`.
fn device_view<'b>(
    op: &'static str,
    buffer: &'b mut DeviceBuffer,
) -> Result<DlpackViewMut<'b>, BackendError> {
    buffer.view_mut().map_err(argument(op, "outputs"))
}

/// Copies a device i32 output into the host output of the same shape (any strides).
fn copy_back(
    op: &'static str,
    arg: &'static str,
    device: &DeviceBuffer,
    host: &mut DlpackViewMut<'_>,
) -> Result<(), BackendError> {
    let values = device.read_i32()?;
    let view_error = |source| BackendError::View { op, arg, source };
    match host.shape().len() {
        1 => host
            .as_array1_mut::<i32>()
            .map_err(view_error)?
            .iter_mut()
            .zip(values)
            .for_each(|(to, from)| *to = from),
        _ => host
            .as_array2_mut::<i32>()
            .map_err(view_error)?
            .iter_mut()
            .zip(values)
            .for_each(|(to, from)| *to = from),
    }
    Ok(())
}
