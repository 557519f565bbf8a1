//! The synchronous convenience calls, built on the enqueue layer: stage inputs on the device,
//! allocate outputs and scratch, enqueue on the backend's own stream, wait, check the status.
//!
//! Outputs live where the hidden states (or logits) live: device inputs give device outputs, host
//! inputs are copied up and the outputs copied back, so host-side callers (the models crate, the
//! CLI) can use this backend unchanged.

use sluice_kernels::{
    DeviceMatrix, GemmPlan, HashInputs, Partials, RoutingTargets, check_dtype, matrix,
    plan_router_gemm,
};
use sluice_tensor::{
    BackendError, DType, Device, Dlpack, ExpectedShape, NonFiniteInput, NonFinitePolicy,
    RoutingOutput, RoutingSpec, argument_view,
};

use crate::device::LoadedModule;
use crate::enqueue;
use crate::error::RocmError;
use crate::gpu::{Gpu, TARGET};
use crate::memory::{self, DeviceMemory};

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
    let device = Device::Rocm(gpu.ordinal());
    let view = argument_view(op, arg, dl)?;
    if view.device() != Device::Cpu {
        let matrix = matrix(op, arg, &view, device, dtypes, expected)?;
        return Ok(Staged { matrix, from_host: false, copy: None });
    }
    check_dtype(op, arg, view.dtype(), dtypes)?;
    let copy = memory::upload(&gpu.stream, dl)?;
    let matrix = matrix(op, arg, &argument_view(op, arg, &copy)?, device, dtypes, expected)?;
    Ok(Staged { matrix, from_host: true, copy: Some(copy) })
}

/// A private contiguous device copy of a matrix on the host or on this device.
pub(crate) fn copy_matrix(
    gpu: &Gpu,
    op: &'static str,
    arg: &'static str,
    dl: &Dlpack,
    dtypes: &[DType],
    expected: ExpectedShape,
) -> Result<Staged, BackendError> {
    if argument_view(op, arg, dl)?.device() == Device::Cpu {
        return stage_matrix(gpu, op, arg, dl, dtypes, expected);
    }
    // Through the host: preparation only, where a copy's cost does not matter.
    let host = memory::download(&gpu.stream, dl)?;
    stage_matrix(gpu, op, arg, &host, dtypes, expected)
}

/// The f32 correction bias `[E]` (host or device) as host values, refused if not finite or if
/// the spec's method takes no bias.
pub(crate) fn bias_values(
    gpu: &Gpu,
    op: &'static str,
    dl: &Dlpack,
    spec: &RoutingSpec,
) -> Result<Vec<f32>, BackendError> {
    let on_device = argument_view(op, "bias", dl)?.device() != Device::Cpu;
    let downloaded = if on_device { Some(memory::download(&gpu.stream, dl)?) } else { None };
    sluice_tensor::host_bias_values(
        op,
        &argument_view(op, "bias", downloaded.as_ref().unwrap_or(dl))?,
        spec,
    )
}

/// The f32 bias on the device.
pub(crate) fn upload_bias(gpu: &Gpu, values: &[f32]) -> Result<DeviceMemory, RocmError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    memory::upload_bytes(&gpu.stream, &bytes)
}

/// A hash table's i32 values on the device.
pub(crate) fn upload_table(gpu: &Gpu, values: &[i32]) -> Result<DeviceMemory, RocmError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    memory::upload_bytes(&gpu.stream, &bytes)
}

/// The GEMM plan for these operands on an AMD GPU, with at most `max_splits` partial sums.
pub(crate) fn plan(
    hidden: &DeviceMatrix,
    weight: &DeviceMatrix,
    max_splits: usize,
) -> Result<GemmPlan, RocmError> {
    Ok(plan_router_gemm(&TARGET, hidden, weight, max_splits)?)
}

/// Logits `[T, E]` f32 of `hidden` and `weight`, written by the GEMM itself (one split).
pub(crate) fn logits(
    gpu: &Gpu,
    module: &LoadedModule,
    hidden: &Staged,
    weight: &DeviceMatrix,
) -> Result<Dlpack, BackendError> {
    let (tokens, experts) = (hidden.matrix.rows, weight.rows);
    let out = DeviceMemory::zeroed(&gpu.stream, tokens * experts * 4)?;
    if tokens > 0 {
        let plan = plan(&hidden.matrix, weight, 1)?;
        let logits =
            Partials { ptr: out.address(), splits: 1, split_stride: 0, row_stride: experts };
        gpu.device.make_current()?;
        enqueue::gemm(gpu.stream.raw(), module, &plan, &hidden.matrix, weight, &logits, None)?;
        gpu.stream.synchronize()?;
    }
    finish(gpu, out, &[tokens, experts], DType::F32, hidden.from_host)
}

/// What to route from: hidden states through a prepared router, or caller logits.
pub(crate) enum Source<'a> {
    /// Hidden states through `router`, with the table and token ids where it is hash-routed.
    Gemm {
        hidden: &'a Staged,
        router: &'a crate::prepared::RocmPreparedRouter,
        hash: Option<HashInputs>,
    },
    /// Finished logits.
    Logits(&'a Staged),
}

/// Routes on the backend's stream, waits, and checks the status against the spec's policy.
pub(crate) fn route(
    op: &'static str,
    gpu: &Gpu,
    module: &LoadedModule,
    spec: &RoutingSpec,
    bias: Option<u64>,
    source: Source<'_>,
) -> Result<RoutingOutput, BackendError> {
    let (tokens, from_host) = match &source {
        Source::Gemm { hidden, .. } => (hidden.matrix.rows, hidden.from_host),
        Source::Logits(logits) => (logits.matrix.rows, logits.from_host),
    };
    let k = spec.top_k;
    let ids = DeviceMemory::zeroed(&gpu.stream, tokens * k * 4)?;
    let weights = DeviceMemory::zeroed(&gpu.stream, tokens * k * 4)?;
    let status = DeviceMemory::zeroed(&gpu.stream, 8)?;
    if tokens > 0 {
        let stream = gpu.stream.raw();
        let targets = RoutingTargets {
            ids: ids.address(),
            ids_row_stride: k,
            weights: weights.address(),
            weights_row_stride: k,
            logits: None,
            status: Some(status.address()),
        };
        let _workspace = match source {
            Source::Gemm { hidden, router, hash } => {
                let workspace =
                    DeviceMemory::zeroed(&gpu.stream, router.partials_bytes(&hidden.matrix)?)?;
                let address = workspace.address();
                router.enqueue(stream, &hidden.matrix, address, &targets, hash.as_ref())?;
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
                let start: Vec<u8> = [0i32, -1].iter().flat_map(|v| v.to_ne_bytes()).collect();
                // SAFETY: `status` holds 8 bytes of this device's memory, ours alone.
                unsafe { memory::copy_to_device(&gpu.stream, status.address(), &start) }?;
                let partials =
                    Partials { ptr: m.ptr, splits: 1, split_stride: 0, row_stride: m.row_stride };
                gpu.device.make_current()?;
                let scale = spec.output_scale();
                enqueue::route(stream, module, &partials, bias, tokens, scale, &targets, None)?;
                None
            }
        };
        gpu.stream.synchronize()?;
        let mut host_status = [0u8; 8];
        // SAFETY: `status` holds 8 bytes of this device's memory.
        unsafe { memory::copy_to_host(&gpu.stream, status.address(), &mut host_status) }?;
        let count =
            i32::from_ne_bytes([host_status[0], host_status[1], host_status[2], host_status[3]]);
        let first =
            i32::from_ne_bytes([host_status[4], host_status[5], host_status[6], host_status[7]]);
        if count > 0 && spec.non_finite == NonFinitePolicy::Error {
            let row = usize::try_from(first).unwrap_or(0);
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
    memory: DeviceMemory,
    shape: &[usize],
    dtype: DType,
    to_host: bool,
) -> Result<Dlpack, BackendError> {
    let device = memory::export(memory, shape, dtype)?;
    if to_host { memory::download(&gpu.stream, &device) } else { Ok(device) }
}
