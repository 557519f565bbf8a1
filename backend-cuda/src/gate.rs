//! The synchronous convenience calls, built on the enqueue layer: stage inputs on the device,
//! allocate outputs and scratch, enqueue on the backend's stream, wait, check the status.
//!
//! Outputs live where the hidden states (or logits) live: device inputs give device outputs, host
//! inputs are copied up and the outputs copied back, so host-side callers (the models crate, the
//! CLI) can use this backend unchanged.

use cudarc::driver::CudaSlice;
use sluice_kernels::{GemmPlan, GemmShape, plan_router_gemm};
pub(crate) use sluice_kernels::{HIDDEN_DTYPES, WEIGHT_DTYPES};
use sluice_tensor::argument_view;
use sluice_tensor::{
    BackendError, DType, Device, Dlpack, ExpectedShape, NonFiniteInput, NonFinitePolicy,
    RoutingOutput, RoutingSpec,
};

use crate::enqueue::{self, HashInputs, Partials, RouteCounters, RoutingTargets, Weight};
use crate::error::CudaError;
use crate::gpu::Gpu;
use crate::input::{self, DeviceMatrix};
use crate::memory;
use crate::module::RouterModule;
use crate::prepared::CudaPreparedRouter;

/// A device input, and the device copy that backs it when it came from the host.
pub(crate) struct Staged {
    pub(crate) matrix: DeviceMatrix,
    pub(crate) from_host: bool,
    copy: Option<Dlpack>,
}

impl Staged {
    /// The device copy made from a host argument, if any.
    pub(crate) fn into_copy(self) -> Option<Dlpack> {
        self.copy
    }
}

/// Validates a matrix argument on this device, or copies a host one to it first.
pub(crate) fn stage_matrix(
    gpu: &Gpu,
    op: &'static str,
    arg: &'static str,
    dl: &Dlpack,
    dtypes: &[DType],
    expected: ExpectedShape,
) -> Result<Staged, BackendError> {
    let device = Device::Cuda(gpu.ordinal);
    let view = argument_view(op, arg, dl)?;
    if view.device() != Device::Cpu {
        let matrix = input::matrix(op, arg, &view, device, dtypes, expected)?;
        return Ok(Staged { matrix, from_host: false, copy: None });
    }
    input::check_dtype(op, arg, view.dtype(), dtypes)?;
    let copy = memory::upload(gpu, dl)?;
    let matrix = input::matrix(op, arg, &argument_view(op, arg, &copy)?, device, dtypes, expected)?;
    Ok(Staged { matrix, from_host: true, copy: Some(copy) })
}

/// A private contiguous device copy of a device matrix (through the host: preparation only). A
/// matrix on another device is refused naming the weight, before any copy.
pub(crate) fn copy_matrix(
    gpu: &Gpu,
    op: &'static str,
    dl: &Dlpack,
    expected: ExpectedShape,
) -> Result<Staged, BackendError> {
    let view = argument_view(op, "weight", dl)?;
    input::check_device(op, "weight", &view, Device::Cuda(gpu.ordinal))?;
    let host = memory::download(gpu, dl)?;
    stage_matrix(gpu, op, "weight", &host, WEIGHT_DTYPES, expected)
}

/// The f32 correction bias `[E]` (host or this device) as host values, refused if on another
/// device, not finite, or if the spec's method takes no bias.
pub(crate) fn bias_values(
    gpu: &Gpu,
    op: &'static str,
    dl: &Dlpack,
    spec: &RoutingSpec,
) -> Result<Vec<f32>, BackendError> {
    let view = argument_view(op, "bias", dl)?;
    let on_device = view.device() != Device::Cpu;
    if on_device {
        input::check_device(op, "bias", &view, Device::Cuda(gpu.ordinal))?;
    }
    let downloaded = if on_device { Some(memory::download(gpu, dl)?) } else { None };
    sluice_tensor::host_bias_values(
        op,
        &argument_view(op, "bias", downloaded.as_ref().unwrap_or(dl))?,
        spec,
    )
}

/// The GEMM plan for these operands on this device, with at most `max_splits` partial sums.
pub(crate) fn plan(
    gpu: &Gpu,
    hidden: &DeviceMatrix,
    weight: &Weight,
    max_splits: usize,
) -> Result<GemmPlan, CudaError> {
    Ok(plan_router_gemm(&gpu.target(), hidden, &weight.matrix, max_splits)?)
}

fn sync(gpu: &Gpu) -> Result<(), CudaError> {
    gpu.stream.synchronize().map_err(CudaError::driver("waiting for the router kernels"))
}

/// Logits `[T, E]` f32 of `hidden` and `weight`.
pub(crate) fn logits(
    gpu: &Gpu,
    module: &RouterModule,
    hidden: &Staged,
    weight: &Weight,
) -> Result<Dlpack, BackendError> {
    let (tokens, experts) = (hidden.matrix.rows, weight.matrix.rows);
    let out = memory::zeroed(gpu, tokens * experts * 4)?;
    if tokens > 0 {
        let plan = plan(gpu, &hidden.matrix, weight, usize::MAX)?;
        let shape = GemmShape { tokens, hidden: hidden.matrix.cols, experts };
        let scratch = memory::zeroed(gpu, plan.partials_bytes(shape))?;
        let partials = Partials {
            ptr: memory::address(gpu, &scratch),
            splits: plan.splits,
            split_stride: tokens * experts,
            row_stride: experts,
        };
        gpu.ctx.bind_to_thread().map_err(CudaError::driver("binding the context"))?;
        let stream = gpu.stream.cu_stream();
        enqueue::gemm(
            stream,
            module,
            &plan,
            &hidden.matrix,
            weight,
            &partials,
            RouteCounters::default(),
            false,
        )?;
        enqueue::sum_partials(
            stream,
            module,
            &partials,
            tokens,
            experts,
            memory::address(gpu, &out),
            experts,
            false,
        )?;
        sync(gpu)?;
    }
    finish(gpu, out, &[tokens, experts], DType::F32, hidden.from_host)
}

/// What to route from: hidden states through a prepared router, or caller logits.
pub(crate) enum Source<'a> {
    /// Hidden states through `router`, with the table and token ids where it is hash-routed.
    Gemm { hidden: &'a Staged, router: &'a CudaPreparedRouter, hash: Option<HashInputs> },
    /// Finished logits.
    Logits(&'a Staged),
}

/// Routes on the backend's stream, waits, and checks the status against the spec's policy.
pub(crate) fn route(
    op: &'static str,
    gpu: &Gpu,
    module: &RouterModule,
    spec: &RoutingSpec,
    bias: Option<u64>,
    source: Source<'_>,
) -> Result<RoutingOutput, BackendError> {
    let (tokens, from_host) = match &source {
        Source::Gemm { hidden, .. } => (hidden.matrix.rows, hidden.from_host),
        Source::Logits(logits) => (logits.matrix.rows, logits.from_host),
    };
    let k = spec.top_k;
    let ids = memory::zeroed(gpu, tokens * k * 4)?;
    let weights = memory::zeroed(gpu, tokens * k * 4)?;
    let status = memory::zeroed(gpu, 8)?;
    if tokens > 0 {
        let stream = gpu.stream.cu_stream();
        let targets = RoutingTargets {
            ids: memory::address(gpu, &ids),
            ids_row_stride: k,
            weights: memory::address(gpu, &weights),
            weights_row_stride: k,
            logits: None,
            status: Some(memory::address(gpu, &status)),
        };
        let _workspace = match source {
            Source::Gemm { hidden, router, hash } => {
                let workspace = memory::zeroed(gpu, router.call_workspace_bytes(&hidden.matrix)?)?;
                let address = memory::address(gpu, &workspace);
                router.enqueue(
                    stream,
                    &hidden.matrix,
                    address,
                    &targets,
                    hash.as_ref(),
                    None,
                    false,
                )?;
                Some(workspace)
            }
            Source::Logits(logits) => {
                let m = logits.matrix;
                if m.cols > 1 && m.col_stride != 1 {
                    return Err(BackendError::Layout {
                        op,
                        arg: "logits",
                        shape: vec![m.rows, m.cols],
                        strides: vec![m.row_stride, m.col_stride],
                        requirement: "logit rows must be contiguous",
                    });
                }
                // The routing kernel counts into a status that starts at [0, -1].
                memory::copy_to_device(gpu, memory::address(gpu, &status), &[0i32, -1])?;
                let partials =
                    Partials { ptr: m.ptr, splits: 1, split_stride: 0, row_stride: m.row_stride };
                gpu.ctx.bind_to_thread().map_err(CudaError::driver("binding the context"))?;
                enqueue::route(
                    stream,
                    module,
                    &partials,
                    bias,
                    tokens,
                    spec.output_scale(),
                    &targets,
                    None,
                    false,
                )?;
                None
            }
        };
        sync(gpu)?;
        let mut host_status = [0i32; 2];
        memory::copy_to_host(gpu, memory::address(gpu, &status), &mut host_status)?;
        if host_status[0] > 0 && spec.non_finite == NonFinitePolicy::Error {
            let row = usize::try_from(host_status[1]).unwrap_or(0);
            // The kernels look at logits only; a NaN in the hidden states shows there too.
            return Err(BackendError::NonFinite { op, row, input: NonFiniteInput::Logits });
        }
    }
    Ok(RoutingOutput {
        topk_ids: finish(gpu, ids, &[tokens, k], DType::I32, from_host)?,
        topk_weights: finish(gpu, weights, &[tokens, k], DType::F32, from_host)?,
    })
}

/// Exports a device result, or copies it to the host when the inputs came from there.
fn finish(
    gpu: &Gpu,
    buffer: CudaSlice<u8>,
    shape: &[usize],
    dtype: DType,
    to_host: bool,
) -> Result<Dlpack, BackendError> {
    let device = memory::export(gpu, buffer, shape, dtype)?;
    if to_host { memory::download(gpu, &device) } else { Ok(device) }
}
