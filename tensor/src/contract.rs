//! The arguments of the engine's call, [`PreparedRouter::route_into`](crate::PreparedRouter), and
//! the checks every backend makes before it writes or enqueues anything.
//!
//! The checks live here, once, so that every backend refuses the same arguments with the same
//! errors; a backend adds only what is its own (the dtypes its kernels take, its token limit).

use std::fmt;

use dlpark::ffi::DLManagedTensorVersioned;

use crate::dlpack::build;
use crate::view::Extent;
use crate::{
    BackendError, DType, Device, Dlpack, DlpackView, DlpackViewMut, Execution, NonFinitePolicy,
    PreparedRouter, RoutingSpec,
};

/// Validates an owned DLPack argument of `op` into a view; a refusal names the op and the argument.
pub fn argument_view<'a>(
    op: &'static str,
    arg: &'static str,
    tensor: &'a Dlpack,
) -> Result<DlpackView<'a>, BackendError> {
    DlpackView::from_dlpack(tensor).map_err(|source| BackendError::Argument { op, arg, source })
}

/// The inputs of one routing call.
#[derive(Debug, Clone, Copy)]
pub struct RouteInputs<'a> {
    /// Hidden states `[T, H]`.
    pub hidden: DlpackView<'a>,
    /// Token ids `[T]` (i32 or i64), for layers that route by token id; `None` elsewhere.
    pub token_ids: Option<DlpackView<'a>>,
}

impl<'a> RouteInputs<'a> {
    /// Hidden states alone.
    pub fn new(hidden: DlpackView<'a>) -> Self {
        RouteInputs { hidden, token_ids: None }
    }

    /// Adds the token ids.
    pub fn with_token_ids(mut self, token_ids: DlpackView<'a>) -> Self {
        self.token_ids = Some(token_ids);
        self
    }
}

/// The caller-owned outputs of one routing call, and its optional workspace.
#[derive(Debug)]
pub struct RouteOutputs<'a> {
    /// Expert ids, i32 `[T, K]`.
    pub topk_ids: DlpackViewMut<'a>,
    /// Expert weights, f32 `[T, K]`.
    pub topk_weights: DlpackViewMut<'a>,
    /// Router logits, f32 `[T, E]`, when the caller wants them too.
    pub logits: Option<DlpackViewMut<'a>>,
    /// i32 `[2]`: the number of rows marked invalid, and the first of them or `-1`. A row is
    /// marked for non-finite values; on a device stream also for a hash-routed token id that
    /// names no row of the table (on the host that id fails the call instead).
    pub status: Option<DlpackViewMut<'a>>,
    /// u8 `[N]` scratch of at least `workspace_bytes(T)` bytes, 16-byte aligned.
    pub workspace: Option<DlpackViewMut<'a>>,
}

/// The alignment a caller's workspace must have.
pub const WORKSPACE_ALIGN: usize = 16;

impl<'a> RouteOutputs<'a> {
    /// The two outputs every call writes.
    pub fn new(topk_ids: DlpackViewMut<'a>, topk_weights: DlpackViewMut<'a>) -> Self {
        RouteOutputs { topk_ids, topk_weights, logits: None, status: None, workspace: None }
    }

    /// Also write the router logits.
    pub fn with_logits(mut self, logits: DlpackViewMut<'a>) -> Self {
        self.logits = Some(logits);
        self
    }

    /// Also write the non-finite status.
    pub fn with_status(mut self, status: DlpackViewMut<'a>) -> Self {
        self.status = Some(status);
        self
    }

    /// Use this workspace.
    pub fn with_workspace(mut self, workspace: DlpackViewMut<'a>) -> Self {
        self.workspace = Some(workspace);
        self
    }
}

/// A shape an op needs: an exact extent per axis, or any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedShape(pub Vec<Option<usize>>);

impl ExpectedShape {
    /// Exactly `shape`.
    pub fn exact(shape: &[usize]) -> Self {
        ExpectedShape(shape.iter().copied().map(Some).collect())
    }
}

impl fmt::Display for ExpectedShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (axis, extent) in self.0.iter().enumerate() {
            if axis > 0 {
                f.write_str(", ")?;
            }
            match extent {
                Some(extent) => write!(f, "{extent}")?,
                None => f.write_str("any")?,
            }
        }
        f.write_str("]")
    }
}

/// Checks everything about a `route_into` call of `router` that does not depend on the backend's
/// kernels: where it runs, the devices, the hidden size, every output's dtype, shape and layout,
/// the workspace's size and that no output aliases another argument. Returns `T`.
pub fn check_route_into<R: PreparedRouter + ?Sized>(
    op: &'static str,
    router: &R,
    inputs: &RouteInputs<'_>,
    outputs: &RouteOutputs<'_>,
    execution: Execution,
    workspace_needed: usize,
) -> Result<usize, BackendError> {
    let (spec, hidden_size, device) = (router.spec(), router.hidden_size(), router.device());
    check_execution(op, device, execution)?;
    if let Execution::Stream(_) = execution
        && spec.non_finite == NonFinitePolicy::Error
    {
        return Err(BackendError::PolicyNeedsHost { op });
    }
    let tokens = check_hidden(op, hidden_size, device, &inputs.hidden)?;
    if let Some(token_ids) = &inputs.token_ids {
        check_on(op, "token_ids", device, token_ids)?;
        if !matches!(token_ids.dtype(), DType::I32 | DType::I64) {
            return Err(BackendError::UnsupportedDType {
                op,
                arg: "token_ids",
                dtype: token_ids.dtype(),
                supported: "i32, i64",
            });
        }
        check_shape(op, "token_ids", token_ids.shape(), &[tokens])?;
    }
    let k = spec.top_k;
    check_output(op, "topk_ids", device, &outputs.topk_ids, DType::I32, &[tokens, k])?;
    check_output(op, "topk_weights", device, &outputs.topk_weights, DType::F32, &[tokens, k])?;
    if let Some(logits) = &outputs.logits {
        check_output(op, "logits", device, logits, DType::F32, &[tokens, spec.num_experts])?;
    }
    if let Some(status) = &outputs.status {
        check_output(op, "status", device, status, DType::I32, &[2])?;
    }
    match &outputs.workspace {
        Some(workspace) => check_workspace(op, device, workspace, workspace_needed)?,
        None if workspace_needed > 0 => {
            return Err(BackendError::WorkspaceTooSmall { op, bytes: 0, needed: workspace_needed });
        }
        None => {}
    }
    let (written, read) = route_extents(inputs, outputs);
    check_disjoint(op, &written, &read)?;
    Ok(tokens)
}

/// What a `route_into` call writes and what it reads, by name.
pub(crate) fn route_extents(
    inputs: &RouteInputs<'_>,
    outputs: &RouteOutputs<'_>,
) -> ([Named; 5], [Named; 2]) {
    let written = [
        Some(("topk_ids", outputs.topk_ids.extent())),
        Some(("topk_weights", outputs.topk_weights.extent())),
        outputs.logits.as_ref().map(|v| ("logits", v.extent())),
        outputs.status.as_ref().map(|v| ("status", v.extent())),
        outputs.workspace.as_ref().map(|v| ("workspace", v.extent())),
    ];
    let read = [
        Some(("hidden", inputs.hidden.extent())),
        inputs.token_ids.map(|v| ("token_ids", v.extent())),
    ];
    (written, read)
}

/// The one rule for a router weight, shared by every backend and by gates built from tensors:
/// `[E, H]` with `E` the spec's expert count and `H` at least 1.
pub fn check_router_weight(
    op: &'static str,
    shape: &[usize],
    spec: &RoutingSpec,
) -> Result<(), BackendError> {
    match *shape {
        [experts, 0] if experts == spec.num_experts => {
            Err(BackendError::ZeroHiddenSize { op, arg: "weight" })
        }
        [experts, _] if experts == spec.num_experts => Ok(()),
        _ => Err(BackendError::Shape {
            op,
            arg: "weight",
            shape: shape.to_vec(),
            expected: ExpectedShape(vec![Some(spec.num_experts), None]),
        }),
    }
}

/// The one rule for a router's bias, shared by the GPU backends, which read it on the host before
/// they copy it to the device: the spec must take one ([`RoutingSpec::takes_bias`]), and it is f32
/// `[E]` with every value finite. Returns the values.
pub fn host_bias_values(
    op: &'static str,
    view: &DlpackView<'_>,
    spec: &RoutingSpec,
) -> Result<Vec<f32>, BackendError> {
    if !spec.takes_bias() {
        return Err(BackendError::UnexpectedBias { op, method: spec.method });
    }
    check_on(op, "bias", Device::Cpu, view)?;
    if view.dtype() != DType::F32 {
        let dtype = view.dtype();
        return Err(BackendError::UnsupportedDType { op, arg: "bias", dtype, supported: "f32" });
    }
    if view.shape() != [spec.num_experts] {
        return Err(BackendError::Shape {
            op,
            arg: "bias",
            shape: view.shape().to_vec(),
            expected: ExpectedShape::exact(&[spec.num_experts]),
        });
    }
    let values = view
        .as_array1::<f32>()
        .map_err(|source| BackendError::View { op, arg: "bias", source })?
        .to_vec();
    if let Some((expert, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(BackendError::NonFiniteBias { op, expert, value });
    }
    Ok(values)
}

/// The checks of a `router_gemm_into` call. Returns `T`.
pub fn check_logits_into<R: PreparedRouter + ?Sized>(
    op: &'static str,
    router: &R,
    hidden: &DlpackView<'_>,
    logits: &DlpackViewMut<'_>,
    execution: Execution,
) -> Result<usize, BackendError> {
    let (spec, hidden_size, device) = (router.spec(), router.hidden_size(), router.device());
    check_execution(op, device, execution)?;
    let tokens = check_hidden(op, hidden_size, device, hidden)?;
    check_output(op, "logits", device, logits, DType::F32, &[tokens, spec.num_experts])?;
    check_disjoint(op, &[Some(("logits", logits.extent()))], &[Some(("hidden", hidden.extent()))])?;
    Ok(tokens)
}

pub(crate) fn check_execution(
    op: &'static str,
    device: Device,
    execution: Execution,
) -> Result<(), BackendError> {
    let fits = match execution {
        Execution::Host => device == Device::Cpu,
        Execution::Stream(stream) => stream.device() == device,
    };
    if !fits {
        return Err(BackendError::UnsupportedExecution { op, execution });
    }
    Ok(())
}

pub(crate) fn check_on(
    op: &'static str,
    arg: &'static str,
    device: Device,
    view: &DlpackView<'_>,
) -> Result<(), BackendError> {
    if view.device() != device {
        return Err(BackendError::WrongDevice { op, arg, actual: view.device(), expected: device });
    }
    Ok(())
}

pub(crate) fn check_shape(
    op: &'static str,
    arg: &'static str,
    shape: &[usize],
    expected: &[usize],
) -> Result<(), BackendError> {
    if shape != expected {
        return Err(BackendError::Shape {
            op,
            arg,
            shape: shape.to_vec(),
            expected: ExpectedShape::exact(expected),
        });
    }
    Ok(())
}

/// Hidden states `[T, H]` on the device; returns `T`.
fn check_hidden(
    op: &'static str,
    hidden_size: usize,
    device: Device,
    hidden: &DlpackView<'_>,
) -> Result<usize, BackendError> {
    check_on(op, "hidden", device, hidden)?;
    match *hidden.shape() {
        [tokens, h] if h == hidden_size => Ok(tokens),
        _ => Err(BackendError::Shape {
            op,
            arg: "hidden",
            shape: hidden.shape().to_vec(),
            expected: ExpectedShape(vec![None, Some(hidden_size)]),
        }),
    }
}

/// An output of `dtype` and `shape` on the device, each row contiguous (rows may be further apart).
pub(crate) fn check_output(
    op: &'static str,
    arg: &'static str,
    device: Device,
    output: &DlpackViewMut<'_>,
    dtype: DType,
    shape: &[usize],
) -> Result<(), BackendError> {
    check_rows(op, arg, device, &output.as_view(), dtype, shape)
}

/// A tensor of `dtype` and `shape` on the device, each row contiguous (rows may be further apart).
pub(crate) fn check_rows(
    op: &'static str,
    arg: &'static str,
    device: Device,
    view: &DlpackView<'_>,
    dtype: DType,
    shape: &[usize],
) -> Result<(), BackendError> {
    check_on(op, arg, device, view)?;
    if view.dtype() != dtype {
        return Err(BackendError::UnsupportedDType {
            op,
            arg,
            dtype: view.dtype(),
            supported: dtype.name(),
        });
    }
    check_shape(op, arg, view.shape(), shape)?;
    let last = view.rank() - 1;
    if view.shape()[last] > 1 && view.strides()[last] != 1 {
        return Err(BackendError::Layout {
            op,
            arg,
            shape: view.shape().to_vec(),
            strides: view.strides().to_vec(),
            requirement: "the elements of a row must be contiguous (last stride 1)",
        });
    }
    Ok(())
}

pub(crate) fn check_workspace(
    op: &'static str,
    device: Device,
    workspace: &DlpackViewMut<'_>,
    needed: usize,
) -> Result<(), BackendError> {
    let view = workspace.as_view();
    check_on(op, "workspace", device, &view)?;
    if view.dtype() != DType::U8 {
        return Err(BackendError::UnsupportedDType {
            op,
            arg: "workspace",
            dtype: view.dtype(),
            supported: "u8",
        });
    }
    let contiguous = view.rank() == 1 && (view.shape()[0] <= 1 || view.strides()[0] == 1);
    if !contiguous || !(view.data_ptr() as usize).is_multiple_of(WORKSPACE_ALIGN) {
        return Err(BackendError::Layout {
            op,
            arg: "workspace",
            shape: view.shape().to_vec(),
            strides: view.strides().to_vec(),
            requirement: "a workspace is one contiguous run of bytes, 16-byte aligned",
        });
    }
    if view.byte_len() < needed {
        return Err(BackendError::WorkspaceTooSmall { op, bytes: view.byte_len(), needed });
    }
    Ok(())
}

/// An argument's name and where its bytes lie, if it was given.
pub(crate) type Named = Option<(&'static str, Extent)>;

/// Refuses an output that shares memory with another output or with an input.
pub(crate) fn check_disjoint(
    op: &'static str,
    written: &[Named],
    read: &[Named],
) -> Result<(), BackendError> {
    for (index, entry) in written.iter().enumerate() {
        let Some((name, extent)) = entry else { continue };
        let mut others = written[..index].iter().flatten().chain(read.iter().flatten());
        if let Some((other, _)) = others.find(|(_, other)| extent.overlaps(other)) {
            return Err(BackendError::Overlap { op, first: other, second: name });
        }
    }
    Ok(())
}

/// Writes the status output: the number of `invalid` rows and the first of them (or `-1`).
pub(crate) fn write_status(
    op: &'static str,
    status: &mut DlpackViewMut<'_>,
    invalid: impl Iterator<Item = usize>,
) -> Result<(), BackendError> {
    let (mut count, mut first) = (0usize, None);
    for row in invalid {
        count += 1;
        first = first.or(Some(row));
    }
    let mut status = status.as_array1_mut::<i32>().map_err(|source| BackendError::View {
        op,
        arg: "status",
        source,
    })?;
    status[0] = i32::try_from(count).unwrap_or(i32::MAX);
    status[1] = first.and_then(|row| i32::try_from(row).ok()).unwrap_or(-1);
    Ok(())
}

/// Runs `f` with a versioned DLPack tensor that describes a view's memory without owning it, for
/// the default `*_into` bodies that call the owning API. The tensor cannot outlive the call.
pub(crate) fn with_borrowed_dlpack<R>(
    op: &'static str,
    arg: &'static str,
    view: &DlpackView<'_>,
    f: impl FnOnce(&Dlpack) -> Result<R, BackendError>,
) -> Result<R, BackendError> {
    // SAFETY: the view's memory stays valid and unwritten while the view is borrowed, which
    // outlasts this function; the tensor is dropped before it returns, and `f` only borrows it (a
    // `Dlpack` cannot be cloned). The `Box<()>` context owns nothing. READ_ONLY is set.
    let borrowed = unsafe {
        build::<DLManagedTensorVersioned>(
            Box::new(()),
            view.data_ptr(),
            0,
            view.shape(),
            view.strides(),
            view.dtype(),
            view.device(),
            true,
        )
    }
    .map_err(|source| BackendError::Argument { op, arg, source })?;
    f(&borrowed)
}
