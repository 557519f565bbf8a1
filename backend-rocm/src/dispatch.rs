//! The dispatch layout on an AMD GPU: `dispatch_into` enqueues the kernels of `sluice-kernels`'
//! `dispatch.cuh` (built into every code object) on the caller's `hipStream_t`, into the caller's
//! outputs and workspace; `dispatch` is the synchronous convenience for host ids and host outputs.
//!
//! The same contract and code as on NVIDIA: `check_dispatch_into` first, then the shared plan (in
//! 64-wide waves), the shared argument, and only enqueues (the kernels and, with rank outputs, a
//! memset of the tokens per rank): no allocation and no synchronisation, so a HIP graph capture
//! records the call. On a stream the ids cannot be looked at before the kernels run: an id outside
//! `[0, E)` other than `-1`, or an expert whose rank-table entry is outside `[0, R)`, is skipped
//! and counted in `invalid` like a `-1`, never written out of bounds.

use std::ffi::c_void;
use std::sync::Arc;

use dlpark::ffi::{DLDevice, DLDeviceType, DLTensor};
use sluice_kernels::{
    AMD_WAVE_WIDTH, DispatchBuffer, DispatchBuffers, DispatchPlan, check_host_dispatch,
    dispatch_args, host_i32_values, plan_dispatch,
};
use sluice_tensor::{
    BackendError, DType, Device, DeviceStream, DispatchInputs, DispatchOutputs, DlpackError,
    DlpackView, DlpackViewMut, Execution, PreparedRouter, check_dispatch_into,
};

use crate::device::LoadedModule;
use crate::enqueue;
use crate::error::RocmError;
use crate::gpu::Gpu;
use crate::memory::{self, DeviceMemory};
use crate::prepared::RocmPreparedRouter;
use crate::stream::HipStream;

/// What a dispatch needs of its router.
pub(crate) struct Dispatcher<'a> {
    pub(crate) router: &'a RocmPreparedRouter,
    pub(crate) gpu: &'a Arc<Gpu>,
    pub(crate) module: &'a LoadedModule,
}

/// The plan of a dispatch of `tokens` tokens through `router`, in AMD's waves.
fn plan(router: &RocmPreparedRouter, tokens: usize) -> Result<DispatchPlan, RocmError> {
    let spec = router.spec();
    Ok(plan_dispatch(tokens, spec.top_k, spec.num_experts, AMD_WAVE_WIDTH)?)
}

/// Bytes of workspace a dispatch of `tokens` tokens needs: the per-block counts of the
/// many-block path (0 up to `sluice_kernels::ONE_BLOCK_MAX_PAIRS` pairs). A size the kernels do
/// not take needs none: `dispatch_into` refuses it.
pub(crate) fn workspace_bytes(router: &RocmPreparedRouter, tokens: usize) -> usize {
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
        let mut args = dispatch_args(OP, inputs, outputs, shape, ranks)?;
        plan.fill(&mut args);
        // The calling thread's current device is what HIP launches refer to; setting it is not a
        // stream operation, so a capture stays valid.
        self.gpu.device.make_current()?;
        let stream = RocmPreparedRouter::stream(execution);
        // SAFETY: `check_dispatch_into` validated every address in `args` against the extents the
        // kernels touch for this shape (the workspace against `plan.workspace_bytes`) on this
        // device, and `rank_tokens` holds `ranks` i32 when `ranks > 0`; `stream` is the caller's
        // stream of this device (or its null stream).
        unsafe { enqueue::dispatch(stream, self.module, &plan, &mut args) }?;
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
        let stream = &self.gpu.stream;
        let tokens = check_host_dispatch(OP, self.router.spec(), inputs, outputs)?.tokens;
        let ids = DeviceBuffer::upload(stream, OP, "topk_ids", &inputs.topk_ids)?;
        let table = inputs
            .expert_ranks
            .map(|table| DeviceBuffer::upload(stream, OP, "expert_ranks", &table))
            .transpose()?;
        let mut device = DispatchBuffers::like(OP, outputs, |dtype, dims| {
            Ok(DeviceBuffer::zeroed(stream, dtype, dims)?)
        })?;
        let workspace_len = workspace_bytes(self.router, tokens);
        let mut workspace = DeviceBuffer::zeroed(stream, DType::U8, &[workspace_len.max(1)])?;
        let (rocm, raw) = (Device::Rocm(self.gpu.ordinal()), stream.raw() as usize);
        // SAFETY: the backend's own stream lives as long as the backend; every buffer handed to
        // the call is owned here and outlives the synchronisation below.
        let device_stream = unsafe { DeviceStream::new(rocm, raw) }.map_err(RocmError::from)?;
        let mut device_inputs = DispatchInputs::new(ids.view().map_err(argument(OP, "topk_ids"))?);
        if let Some(table) = &table {
            device_inputs = device_inputs
                .with_expert_ranks(table.view().map_err(argument(OP, "expert_ranks"))?);
        }
        let mut device_outputs = device.views(OP)?;
        device_outputs.workspace = Some(workspace.view_mut().map_err(argument(OP, "workspace"))?);
        self.dispatch_into(&device_inputs, &mut device_outputs, Execution::Stream(device_stream))?;
        stream.synchronize()?;
        device.copy_back(OP, outputs)
    }
}

fn argument(op: &'static str, arg: &'static str) -> impl Fn(DlpackError) -> BackendError {
    move |source| BackendError::Argument { op, arg, source }
}

/// A contiguous buffer of the backend's own on its device, for the synchronous `dispatch`: handed
/// to `dispatch_into` as a borrowed view, as an engine's buffer would be.
#[derive(Debug)]
struct DeviceBuffer<'a> {
    stream: &'a HipStream,
    memory: DeviceMemory,
    /// The shape, as DLPack holds it.
    shape: Vec<i64>,
    /// Row-major strides of `shape`, in elements.
    strides: Vec<i64>,
    dtype: DType,
}

impl<'a> DeviceBuffer<'a> {
    /// A zero-filled contiguous buffer of `shape` on the stream's device.
    fn zeroed(stream: &'a HipStream, dtype: DType, shape: &[usize]) -> Result<Self, RocmError> {
        let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        let memory = DeviceMemory::zeroed(stream, bytes)?;
        let mut strides = vec![1i64; shape.len()];
        for axis in (0..shape.len().saturating_sub(1)).rev() {
            strides[axis] = strides[axis + 1] * shape[axis + 1] as i64;
        }
        let shape = shape.iter().map(|&d| d as i64).collect();
        Ok(DeviceBuffer { stream, memory, shape, strides, dtype })
    }

    /// A host i32 argument (any strides) copied into a new buffer of its shape.
    fn upload(
        stream: &'a HipStream,
        op: &'static str,
        arg: &'static str,
        view: &DlpackView<'_>,
    ) -> Result<Self, BackendError> {
        let values = host_i32_values(op, arg, view)?;
        let buffer = DeviceBuffer::zeroed(stream, view.dtype(), view.shape())?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        // SAFETY: the buffer was just allocated with room for the view's elements, which are
        // exactly `values`, and is ours alone.
        unsafe { memory::copy_to_device(stream, buffer.memory.address(), &bytes) }?;
        Ok(buffer)
    }

    /// A DLPack descriptor of the buffer. The shape and strides pointers are `*mut` only because
    /// C declares them so: the views below read them, and copy them.
    fn descriptor(&self) -> DLTensor {
        DLTensor {
            data: self.memory.address() as *mut c_void,
            device: DLDevice {
                device_type: DLDeviceType::ROCM,
                device_id: self.stream.device().ordinal() as i32,
            },
            ndim: self.shape.len() as i32,
            dtype: self.dtype.to_dlpack(),
            shape: self.shape.as_ptr().cast_mut(),
            strides: self.strides.as_ptr().cast_mut(),
            byte_offset: 0,
        }
    }

    /// A read-only view, for an input.
    fn view(&self) -> Result<DlpackView<'_>, DlpackError> {
        let descriptor = self.descriptor();
        // SAFETY: the descriptor describes this buffer's own memory, contiguous in its shape,
        // with `ndim` entries of shape and strides that the view copies; the memory lives as long
        // as `self`, which the view borrows, and nothing writes it meanwhile.
        unsafe { DlpackView::from_raw(&descriptor) }
    }

    /// A writable view, for an output or the workspace.
    fn view_mut(&mut self) -> Result<DlpackViewMut<'_>, DlpackError> {
        let mut descriptor = self.descriptor();
        // SAFETY: as in `view`; the exclusive borrow of `self` keeps every other access away.
        unsafe { DlpackViewMut::from_raw(&mut descriptor) }
    }
}

impl DispatchBuffer for DeviceBuffer<'_> {
    fn view_mut(&mut self, op: &'static str) -> Result<DlpackViewMut<'_>, BackendError> {
        DeviceBuffer::view_mut(self).map_err(argument(op, "outputs"))
    }

    fn read_i32(&self) -> Result<Vec<i32>, BackendError> {
        if self.dtype != DType::I32 {
            return Err(memory::device_error(format!("read {} as i32", self.dtype)));
        }
        let elements: i64 = self.shape.iter().product();
        let mut bytes = vec![0u8; elements as usize * size_of::<i32>()];
        // SAFETY: an i32 buffer of this shape holds exactly `bytes.len()` bytes on the stream's
        // device, alive while `self` is borrowed; the copy follows the stream's queued work.
        unsafe { memory::copy_to_host(self.stream, self.memory.address(), &mut bytes) }?;
        let words = bytes.chunks_exact(4).map(|w| i32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
        Ok(words.collect())
    }
}
