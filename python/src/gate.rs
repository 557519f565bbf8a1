//! `Gate`: one MoE layer's gate, prepared on a backend (the CPU or a CUDA device), routing
//! tensors of any DLPack producer.

use std::path::PathBuf;

use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use sluice_models::{Checkpoint, ModelConfig, ModelError, MoeGate, PreparedGate};
use sluice_tensor::{
    BackendError, Device, DeviceStream, DispatchInputs, DispatchOutputs, DispatchShape, Dlpack,
    DlpackError, DlpackView, DlpackViewMut, Element, Execution, NonFiniteInput, NonFinitePolicy,
    PaddedOutputs, RankOutputs, RouteInputs, RouteOutputs, Tensor, export_vec,
};

use crate::backend::{PyCpuBackend, PyCudaBackend, default_backend};
use crate::errors;
use crate::tensor::{self, PyTensor};

/// The backend a gate is prepared on, as Python hands it over (`backend=`).
#[derive(FromPyObject)]
pub(crate) enum GateBackend<'py> {
    Cpu(Bound<'py, PyCpuBackend>),
    Cuda(Bound<'py, PyCudaBackend>),
}

/// One MoE layer's gate, prepared on a backend: the CPU (routing on the calling thread) or a
/// CUDA device (enqueueing on the caller's stream).
///
/// The weight is held as a parameter (`requires_grad = true`); the weight and the hidden states
/// are detached where they cross sluice's bridge, never before.
#[pyclass(frozen, module = "sluice._sluice", name = "Gate")]
pub(crate) struct Gate {
    gate: MoeGate,
    prepared: PreparedGate,
    /// Where the router lives, and so every tensor a call takes.
    device: Device,
    /// What a row with NaN or infinities does. A device router is prepared with the marking
    /// policy whatever this says: its kernels mark such rows (ids -1, weights 0) and count them
    /// in a status either way, and a call that only enqueues cannot raise. The error policy is
    /// applied here instead: `route_into` on a stream refuses it, as the Rust contract does, and
    /// `sluice.Gate.route` reads the status after the stream and raises through `check_status`.
    non_finite: NonFinitePolicy,
}

impl Gate {
    fn prepare(
        py: Python<'_>,
        gate: MoeGate,
        backend: Option<GateBackend<'_>>,
        apply_scaling: bool,
        mark_invalid: bool,
    ) -> PyResult<Self> {
        let non_finite =
            if mark_invalid { NonFinitePolicy::MarkInvalid } else { NonFinitePolicy::Error };
        let gate = gate.with_apply_scaling(apply_scaling).with_non_finite(non_finite);
        let prepared = match backend {
            None => {
                let cpu = default_backend()?;
                py.detach(|| gate.prepare(cpu))
            }
            Some(GateBackend::Cpu(backend)) => {
                let cpu = &backend.get().backend;
                py.detach(|| gate.prepare(cpu))
            }
            Some(GateBackend::Cuda(backend)) => {
                let cuda = &backend.get().backend;
                let marking = gate.clone().with_non_finite(NonFinitePolicy::MarkInvalid);
                py.detach(|| marking.prepare(cuda))
            }
        }
        .map_err(errors::model)?;
        let device = prepared.router().device();
        Ok(Gate { gate, prepared, device, non_finite })
    }

    /// Where a `route_into` call runs: on the host for a CPU gate, else on the stream of the
    /// gate's device that `stream` numbers as DLPack does.
    fn execution(&self, stream: Option<usize>) -> PyResult<Execution> {
        let raw = match (self.device, stream) {
            (Device::Cpu, None) => return Ok(Execution::Host),
            (Device::Cpu, Some(_)) => {
                return Err(PyValueError::new_err(
                    "`stream`: a CPU gate routes on the calling thread; pass `stream=None`",
                ));
            }
            (device, None) => {
                return Err(PyValueError::new_err(format!(
                    "`stream`: a gate on {device} only enqueues its work, on the stream it is \
                     given (`sluice.Gate` passes torch's current stream)"
                )));
            }
            (_, Some(raw)) => raw,
        };
        // SAFETY: `DeviceStream::new`'s contract (the stream and every buffer outlive the
        // enqueued work, inputs are ready on the stream, outputs are read only after it) is the
        // documented contract of `route_into(stream=...)`, which passes it on to the Python
        // caller exactly as torch does for kernels on an external stream. The `sluice` package
        // passes torch's current stream, on which torch's caching allocator orders any reuse of
        // the tensors' memory. The value is only checked here; a backend that cannot run on it
        // refuses it before any work.
        let stream = unsafe { DeviceStream::new(self.device, raw) }
            .map_err(|error| PyValueError::new_err(format!("`stream`: {error}")))?;
        Ok(Execution::Stream(stream))
    }
}

impl Gate {
    /// Runs a `route_and_dispatch_into` call where `stream` says; `counting` lets a device gate
    /// whose policy is to raise enqueue anyway (its caller reads the status back).
    fn route_and_dispatch(
        &self,
        py: Python<'_>,
        call: IntoCall,
        layout: LayoutCall,
        stream: Option<usize>,
        counting: bool,
    ) -> PyResult<()> {
        let execution = self.execution(stream)?;
        let enqueued = matches!(execution, Execution::Stream(_));
        if enqueued && !counting && self.non_finite == NonFinitePolicy::Error {
            let error = BackendError::PolicyNeedsHost { op: "route_and_dispatch_into" };
            return Err(errors::model(error.into()));
        }
        call.run_with_layout(py, &self.prepared, layout, execution)
    }
}

/// Hidden states (and token ids) as the gate's inputs: detached here, at the bridge, so a tensor
/// that requires grad routes while a plain export of it stays refused.
fn route_inputs<'a>(
    hidden: &'a Tensor,
    token_ids: Option<&'a Tensor>,
) -> Result<RouteInputs<'a>, ModelError> {
    let inputs = RouteInputs::new(DlpackView::from_tensor(hidden)?);
    Ok(match token_ids {
        Some(ids) => inputs.with_token_ids(DlpackView::from_tensor(ids)?),
        None => inputs,
    })
}

/// `count` zeroed host elements, or `MemoryError` instead of an abort.
fn host_buffer<T: Element + Default>(count: usize) -> PyResult<Vec<T>> {
    let mut buffer = Vec::new();
    buffer
        .try_reserve_exact(count)
        .map_err(|_| PyMemoryError::new_err(format!("cannot allocate {count} routing outputs")))?;
    buffer.resize(count, T::default());
    Ok(buffer)
}

/// A writable view of an output the caller handed over to `op`, with errors naming it.
fn output_view<'a>(
    output: &'a mut Dlpack,
    op: &'static str,
    arg: &'static str,
) -> Result<DlpackViewMut<'a>, ModelError> {
    DlpackViewMut::from_dlpack(output)
        .map_err(|source| BackendError::Argument { op, arg, source }.into())
}

/// The tensors of one `route_into` call, imported zero-copy: the inputs detached at the bridge,
/// the caller's outputs (and scratch) writable.
struct IntoCall {
    hidden: Tensor,
    token_ids: Option<Tensor>,
    outputs: RouteTensors,
}

/// The outputs (and scratch) of a `route_into` call.
struct RouteTensors {
    topk_ids: Dlpack,
    topk_weights: Dlpack,
    workspace: Option<Dlpack>,
    status: Option<Dlpack>,
}

impl RouteTensors {
    /// Writable views, as `op` names them in errors.
    fn views(&mut self, op: &'static str) -> Result<RouteOutputs<'_>, ModelError> {
        let mut outputs = RouteOutputs::new(
            output_view(&mut self.topk_ids, op, "topk_ids")?,
            output_view(&mut self.topk_weights, op, "topk_weights")?,
        );
        if let Some(workspace) = &mut self.workspace {
            outputs = outputs.with_workspace(output_view(workspace, op, "workspace")?);
        }
        if let Some(status) = &mut self.status {
            outputs = outputs.with_status(output_view(status, op, "status")?);
        }
        Ok(outputs)
    }
}

impl IntoCall {
    fn import(
        hidden: &Bound<'_, PyAny>,
        input_ids: Option<&Bound<'_, PyAny>>,
        topk_ids: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        workspace: Option<&Bound<'_, PyAny>>,
        status: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        Ok(IntoCall {
            hidden: tensor::import(hidden)?.detach(),
            token_ids: input_ids.map(tensor::import).transpose()?.map(|ids| ids.detach()),
            outputs: RouteTensors {
                topk_ids: tensor::import_output(topk_ids, "topk_ids")?,
                topk_weights: tensor::import_output(topk_weights, "topk_weights")?,
                workspace: workspace.map(|w| tensor::import_output(w, "workspace")).transpose()?,
                status: status.map(|s| tensor::import_output(s, "status")).transpose()?,
            },
        })
    }

    /// Routes (on the host) or enqueues (on a stream) without the GIL; nothing is allocated.
    fn run(mut self, py: Python<'_>, gate: &PreparedGate, execution: Execution) -> PyResult<()> {
        py.detach(|| {
            let inputs = route_inputs(&self.hidden, self.token_ids.as_ref())?;
            gate.route_into(&inputs, &mut self.outputs.views("route_into")?, execution)
        })
        .map_err(errors::model)
    }

    /// Routes and lays the ids out into `layout`, as `run` does.
    fn run_with_layout(
        mut self,
        py: Python<'_>,
        gate: &PreparedGate,
        mut layout: LayoutCall,
        execution: Execution,
    ) -> PyResult<()> {
        const OP: &str = "route_and_dispatch_into";
        py.detach(|| {
            let inputs = route_inputs(&self.hidden, self.token_ids.as_ref())?;
            let expert_ranks = layout.expert_ranks.as_ref().map(DlpackView::from_tensor);
            let expert_ranks = expert_ranks.transpose()?;
            let mut outputs = self.outputs.views(OP)?;
            let mut layout_outputs = layout.outputs.views(OP)?;
            gate.route_and_dispatch_into(
                &inputs,
                &mut outputs,
                &mut layout_outputs,
                expert_ranks,
                execution,
            )
        })
        .map_err(errors::model)
    }
}

/// The dispatch layout's outputs, by the names a `layout` mapping gives them (the names of
/// `sluice_tensor::DispatchOutputs`).
const LAYOUT_OUTPUTS: [&str; 4] = ["expert_counts", "expert_offsets", "sorted_pairs", "inverse"];
const PADDED_OUTPUTS: [&str; 3] = ["padded_pairs", "block_experts", "padded_total"];
const RANK_OUTPUTS: [&str; 4] = ["rank_counts", "rank_offsets", "rank_pairs", "rank_tokens"];
const OPTIONAL_OUTPUTS: [&str; 2] = ["invalid", "workspace"];

/// The layout tensors of one call, imported zero-copy from the caller's mapping: every output
/// writable, the expert-to-rank table detached at the bridge.
struct LayoutCall {
    outputs: LayoutTensors,
    expert_ranks: Option<Tensor>,
}

/// The outputs of a layout.
struct LayoutTensors {
    /// `LAYOUT_OUTPUTS`, in order.
    required: [Dlpack; 4],
    invalid: Option<Dlpack>,
    workspace: Option<Dlpack>,
    /// The block size and `PADDED_OUTPUTS`, in order.
    padded: Option<(usize, [Dlpack; 3])>,
    /// `RANK_OUTPUTS`, in order.
    ranks: Option<[Dlpack; 4]>,
}

/// The tensor the caller's `layout` names `name`, imported as an output, if it names one.
fn layout_output(layout: &Bound<'_, PyDict>, name: &'static str) -> PyResult<Option<Dlpack>> {
    layout.get_item(name)?.map(|tensor| tensor::import_output(&tensor, name)).transpose()
}

/// The outputs of a group of `names`: all of them where `wanted` (the group's `switch` is on),
/// none of them otherwise; anything in between is refused.
fn layout_group<const N: usize>(
    layout: &Bound<'_, PyDict>,
    names: &[&'static str; N],
    switch: &str,
    wanted: bool,
) -> PyResult<Option<[Dlpack; N]>> {
    let found = names.iter().map(|&name| layout_output(layout, name));
    let found: Vec<Dlpack> = found.collect::<PyResult<Vec<_>>>()?.into_iter().flatten().collect();
    let listed = names.join(", ");
    match (wanted, found.len()) {
        (false, 0) => Ok(None),
        (false, _) => Err(PyValueError::new_err(format!("`layout`: {listed} need {switch}"))),
        (true, _) => found
            .try_into()
            .map(Some)
            .map_err(|_| PyValueError::new_err(format!("`layout`: {switch} asks for {listed}"))),
    }
}

impl LayoutCall {
    /// Takes the outputs out of `layout`, refusing a name it does not know, a missing output,
    /// and padded or rank outputs without their block size or table (or the other way round).
    fn import(
        layout: &Bound<'_, PyDict>,
        block_size: Option<usize>,
        expert_ranks: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let known = [&LAYOUT_OUTPUTS[..], &PADDED_OUTPUTS, &RANK_OUTPUTS, &OPTIONAL_OUTPUTS];
        for key in layout.keys() {
            let name: String = key.extract()?;
            if !known.iter().any(|names| names.contains(&name.as_str())) {
                return Err(PyValueError::new_err(format!(
                    "`layout`: no output is named {name:?} (outputs: {})",
                    known.concat().join(", ")
                )));
            }
        }
        // A wanted group is all of its outputs or an error, never `None`.
        let required = layout_group(layout, &LAYOUT_OUTPUTS, "every layout", true)?
            .ok_or_else(|| PyValueError::new_err("`layout`: the layout's outputs are missing"))?;
        let padded = layout_group(layout, &PADDED_OUTPUTS, "`block_size`", block_size.is_some())?;
        let outputs = LayoutTensors {
            required,
            invalid: layout_output(layout, "invalid")?,
            workspace: layout_output(layout, "workspace")?,
            padded: block_size.zip(padded),
            ranks: layout_group(layout, &RANK_OUTPUTS, "`expert_ranks`", expert_ranks.is_some())?,
        };
        let expert_ranks = expert_ranks.map(tensor::import).transpose()?.map(|t| t.detach());
        Ok(LayoutCall { outputs, expert_ranks })
    }
}

impl LayoutCall {
    /// Lays out `topk_ids` into the outputs (on the host) or enqueues the layout (on a stream),
    /// without the GIL; nothing is allocated.
    fn run(
        mut self,
        py: Python<'_>,
        gate: &PreparedGate,
        topk_ids: &Tensor,
        execution: Execution,
    ) -> PyResult<()> {
        const OP: &str = "dispatch_into";
        py.detach(|| {
            let mut inputs = DispatchInputs::new(DlpackView::from_tensor(topk_ids)?);
            if let Some(ranks) = &self.expert_ranks {
                inputs = inputs.with_expert_ranks(DlpackView::from_tensor(ranks)?);
            }
            let mut outputs = self.outputs.views(OP)?;
            Ok(gate.router().dispatch_into(&inputs, &mut outputs, execution)?)
        })
        .map_err(errors::model)
    }
}

impl LayoutTensors {
    /// Writable views, as `op` names them in errors.
    fn views(&mut self, op: &'static str) -> Result<DispatchOutputs<'_>, ModelError> {
        let [counts, offsets, sorted, inverse] = &mut self.required;
        let mut outputs = DispatchOutputs::new(
            output_view(counts, op, LAYOUT_OUTPUTS[0])?,
            output_view(offsets, op, LAYOUT_OUTPUTS[1])?,
            output_view(sorted, op, LAYOUT_OUTPUTS[2])?,
            output_view(inverse, op, LAYOUT_OUTPUTS[3])?,
        );
        if let Some(invalid) = &mut self.invalid {
            outputs = outputs.with_invalid(output_view(invalid, op, "invalid")?);
        }
        if let Some(workspace) = &mut self.workspace {
            outputs = outputs.with_workspace(output_view(workspace, op, "workspace")?);
        }
        if let Some((block_size, [pairs, blocks, total])) = &mut self.padded {
            outputs = outputs.with_padding(PaddedOutputs {
                block_size: *block_size,
                padded_pairs: output_view(pairs, op, PADDED_OUTPUTS[0])?,
                block_experts: output_view(blocks, op, PADDED_OUTPUTS[1])?,
                padded_total: output_view(total, op, PADDED_OUTPUTS[2])?,
            });
        }
        if let Some([counts, offsets, pairs, tokens]) = &mut self.ranks {
            outputs = outputs.with_ranks(RankOutputs {
                rank_counts: output_view(counts, op, RANK_OUTPUTS[0])?,
                rank_offsets: output_view(offsets, op, RANK_OUTPUTS[1])?,
                rank_pairs: output_view(pairs, op, RANK_OUTPUTS[2])?,
                rank_tokens: output_view(tokens, op, RANK_OUTPUTS[3])?,
            });
        }
        Ok(outputs)
    }
}

#[pymethods]
impl Gate {
    /// The gate of MoE layer `layer` in a Hugging Face checkpoint folder.
    /// `backend`: a `CpuBackend` or a `CudaBackend` (default: a shared CPU backend).
    #[staticmethod]
    #[pyo3(signature = (path, layer, *, backend=None, apply_scaling=true, mark_invalid=false))]
    fn from_pretrained(
        py: Python<'_>,
        path: PathBuf,
        layer: usize,
        backend: Option<GateBackend<'_>>,
        apply_scaling: bool,
        mark_invalid: bool,
    ) -> PyResult<Self> {
        let gate =
            py.detach(|| MoeGate::load(&Checkpoint::open(&path)?, layer)).map_err(errors::model)?;
        Self::prepare(py, gate, backend, apply_scaling, mark_invalid)
    }

    /// A gate from a router weight `[E, H]` (bf16 or f32; an `nn.Parameter` is fine), the f32
    /// correction bias `[E]` (`noaux_tc` only) and the model's `config.json` text. A CUDA backend
    /// copies them (host or device memory) once; the producer's work on them must be done.
    #[staticmethod]
    #[pyo3(signature = (
        weight, bias, config_json, *, layer=0, backend=None, apply_scaling=true,
        mark_invalid=false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn from_tensors(
        py: Python<'_>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        config_json: &str,
        layer: usize,
        backend: Option<GateBackend<'_>>,
        apply_scaling: bool,
        mark_invalid: bool,
    ) -> PyResult<Self> {
        let config = ModelConfig::from_json(config_json, "config")
            .map_err(|error| errors::model(error.into()))?;
        let weight = tensor::import(weight)?;
        let bias = bias.map(tensor::import).transpose()?;
        if let [_, hidden] = *weight.shape()
            && hidden != config.hidden_size()
        {
            return Err(PyValueError::new_err(format!(
                "the weight has hidden size {hidden}, the config says hidden_size = {}",
                config.hidden_size()
            )));
        }
        let gate = MoeGate::new(layer, *config.routing(), weight, bias).map_err(errors::model)?;
        Self::prepare(py, gate, backend, apply_scaling, mark_invalid)
    }

    /// Routes hidden states `[T, H]` on a CPU gate: `(topk_ids, topk_weights)`, i32 and f32
    /// `[T, K]`, host tensors sluice allocated (import them with `torch.from_dlpack`, zero-copy).
    /// A device gate routes into buffers its caller made (`sluice.Gate.route` makes them with
    /// torch on the device).
    #[pyo3(signature = (hidden, input_ids=None))]
    fn route(
        &self,
        py: Python<'_>,
        hidden: &Bound<'_, PyAny>,
        input_ids: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(PyTensor, PyTensor)> {
        if self.device != Device::Cpu {
            return Err(PyValueError::new_err(format!(
                "`route` here returns host tensors; a gate on {} routes into device buffers \
                 with `route_into` (`sluice.Gate.route` allocates them with torch)",
                self.device
            )));
        }
        let hidden = tensor::import(hidden)?.detach();
        let token_ids = input_ids.map(tensor::import).transpose()?.map(|ids| ids.detach());
        let tokens = match *hidden.shape() {
            [tokens, _] => tokens,
            _ => 0, // refused by the gate, naming the layer and the shape
        };
        let shape = [tokens, self.gate.spec().top_k];
        let count = tokens
            .checked_mul(shape[1])
            .ok_or_else(|| errors::dlpack(DlpackError::ExtentOverflow("routing outputs")))?;
        let (mut ids, mut weights) = (host_buffer::<i32>(count)?, host_buffer::<f32>(count)?);
        py.detach(|| {
            let inputs = route_inputs(&hidden, token_ids.as_ref())?;
            let mut outputs = RouteOutputs::new(
                DlpackViewMut::from_slice(&mut ids, &shape)?,
                DlpackViewMut::from_slice(&mut weights, &shape)?,
            );
            self.prepared.route_into(&inputs, &mut outputs, Execution::Host)
        })
        .map_err(errors::model)?;
        let into_tensor = |exported| Tensor::from_dlpack(exported).map_err(errors::dlpack);
        let ids = into_tensor(export_vec(ids, &shape).map_err(errors::dlpack)?)?;
        let weights = into_tensor(export_vec(weights, &shape).map_err(errors::dlpack)?)?;
        Ok((ids.into(), weights.into()))
    }

    /// Routes into the caller's `topk_ids` (i32 `[T, K]`) and `topk_weights` (f32 `[T, K]`),
    /// zero-copy, allocating nothing; `workspace` (u8, at least `workspace_bytes(T)` bytes) is
    /// the scratch a device gate needs, `status` (i32 `[2]`) receives the count of rows with
    /// NaN or infinities and the first of them (-1: none).
    ///
    /// A CPU gate runs on the host (`stream=None`) and is done on return. A device gate only
    /// enqueues on `stream`, numbered as DLPack's `__dlpack__(stream=...)` (CUDA: 1 the legacy
    /// default stream, 2 the per-thread one, larger values a `cudaStream_t`), and the caller
    /// promises what any kernel launch on that stream needs: the stream and every tensor outlive
    /// the work, the inputs are ready on the stream, and the outputs are read only after it.
    /// Nothing is synchronised, so the call is captured by a CUDA graph recording the stream; a
    /// row with NaN or infinities cannot raise there, so the gate must mark it
    /// (`mark_invalid=True`).
    #[pyo3(signature = (
        hidden, topk_ids, topk_weights, *, input_ids=None, stream=None, workspace=None,
        status=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn route_into(
        &self,
        py: Python<'_>,
        hidden: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        input_ids: Option<&Bound<'_, PyAny>>,
        stream: Option<usize>,
        workspace: Option<&Bound<'_, PyAny>>,
        status: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let execution = self.execution(stream)?;
        if matches!(execution, Execution::Stream(_)) && self.non_finite == NonFinitePolicy::Error {
            return Err(errors::model(BackendError::PolicyNeedsHost { op: "route_into" }.into()));
        }
        IntoCall::import(hidden, input_ids, topk_ids, topk_weights, workspace, status)?.run(
            py,
            &self.prepared,
            execution,
        )
    }

    /// `route_into` whatever the policy, rows with NaN or infinities marked and counted in
    /// `status`: `sluice.Gate.route` calls this on a device gate, reads `status` after the
    /// stream and applies the policy with `_check_status`.
    #[pyo3(
        name = "_route_into_counting",
        signature = (hidden, topk_ids, topk_weights, status, *, input_ids=None, stream=None,
                     workspace=None)
    )]
    #[allow(clippy::too_many_arguments)]
    fn route_into_counting(
        &self,
        py: Python<'_>,
        hidden: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        status: &Bound<'_, PyAny>,
        input_ids: Option<&Bound<'_, PyAny>>,
        stream: Option<usize>,
        workspace: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let execution = self.execution(stream)?;
        IntoCall::import(hidden, input_ids, topk_ids, topk_weights, workspace, Some(status))?.run(
            py,
            &self.prepared,
            execution,
        )
    }

    /// `route_into`, and the dispatch layout of the ids it writes into `layout`: a dict of
    /// caller-owned int32 tensors by name (`expert_counts` `[E]`, `expert_offsets` `[E + 1]`,
    /// `sorted_pairs` `[T * K]`, `inverse` `[T, K]`; optionally `invalid` `[2]`, `workspace`
    /// (uint8, at least `dispatch_workspace_bytes(T)` bytes); with `block_size`, `padded_pairs`
    /// `[padded_capacity(T, block_size)]`, `block_experts` `[padded_capacity / block_size]`
    /// and `padded_total` `[1]`; with `expert_ranks` (int32 `[E]`, the rank of each expert, `R`
    /// ranks), `rank_counts` `[R]`, `rank_offsets` `[R + 1]`, `rank_pairs` `[T * K]` and
    /// `rank_tokens` `[R]`). One call, under `route_into`'s contract: on a CUDA stream, where
    /// routing is a block per token, up to 512 tokens of V3 (704 of Kimi-K2) are routed and
    /// laid out by one kernel.
    #[pyo3(signature = (
        hidden, topk_ids, topk_weights, layout, *, block_size=None, expert_ranks=None,
        input_ids=None, stream=None, workspace=None, status=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn route_and_dispatch_into(
        &self,
        py: Python<'_>,
        hidden: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        layout: &Bound<'_, PyDict>,
        block_size: Option<usize>,
        expert_ranks: Option<&Bound<'_, PyAny>>,
        input_ids: Option<&Bound<'_, PyAny>>,
        stream: Option<usize>,
        workspace: Option<&Bound<'_, PyAny>>,
        status: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let call = IntoCall::import(hidden, input_ids, topk_ids, topk_weights, workspace, status)?;
        let layout = LayoutCall::import(layout, block_size, expert_ranks)?;
        self.route_and_dispatch(py, call, layout, stream, false)
    }

    /// `route_and_dispatch_into` whatever the policy, as `_route_into_counting` is beside
    /// `route_into` (for `sluice.Gate.route_and_dispatch` on a device gate).
    #[pyo3(
        name = "_route_and_dispatch_into_counting",
        signature = (hidden, topk_ids, topk_weights, layout, status, *, block_size=None,
                     expert_ranks=None, input_ids=None, stream=None, workspace=None)
    )]
    #[allow(clippy::too_many_arguments)]
    fn route_and_dispatch_into_counting(
        &self,
        py: Python<'_>,
        hidden: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        layout: &Bound<'_, PyDict>,
        status: &Bound<'_, PyAny>,
        block_size: Option<usize>,
        expert_ranks: Option<&Bound<'_, PyAny>>,
        input_ids: Option<&Bound<'_, PyAny>>,
        stream: Option<usize>,
        workspace: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let status = Some(status);
        let call = IntoCall::import(hidden, input_ids, topk_ids, topk_weights, workspace, status)?;
        let layout = LayoutCall::import(layout, block_size, expert_ranks)?;
        self.route_and_dispatch(py, call, layout, stream, true)
    }

    /// The dispatch layout of `topk_ids` (int32 `[T, K]`, rows contiguous, -1 a pair to skip:
    /// ids the caller routed itself, or an earlier call's) into `layout`, the dict
    /// `route_and_dispatch_into` takes, with the same `block_size` and `expert_ranks`. Under
    /// `route_into`'s contract: on a stream it only enqueues (a stray id is skipped and counted
    /// like -1 there; on the host it is an error before anything is written).
    #[pyo3(signature = (topk_ids, layout, *, block_size=None, expert_ranks=None, stream=None))]
    fn dispatch_into(
        &self,
        py: Python<'_>,
        topk_ids: &Bound<'_, PyAny>,
        layout: &Bound<'_, PyDict>,
        block_size: Option<usize>,
        expert_ranks: Option<&Bound<'_, PyAny>>,
        stream: Option<usize>,
    ) -> PyResult<()> {
        // An input, detached at the bridge as hidden states are.
        let topk_ids = tensor::import(topk_ids)?.detach();
        let layout = LayoutCall::import(layout, block_size, expert_ranks)?;
        layout.run(py, &self.prepared, &topk_ids, self.execution(stream)?)
    }

    /// Bytes of scratch the layout of `tokens` rows needs in `layout["workspace"]` (0 for a
    /// CPU gate, and for the few rows a GPU lays out in one block).
    fn dispatch_workspace_bytes(&self, tokens: usize) -> usize {
        self.prepared.router().dispatch_workspace_bytes(tokens)
    }

    /// The length of `padded_pairs` for `tokens` rows and `block_size`: the most the padded
    /// layout can need.
    fn padded_capacity(&self, tokens: usize, block_size: usize) -> PyResult<usize> {
        let shape = DispatchShape {
            tokens,
            top_k: self.gate.spec().top_k,
            experts: self.gate.num_experts(),
        };
        shape.padded_capacity(block_size).ok_or_else(|| {
            PyValueError::new_err(format!(
                "no padded layout of {tokens} rows in blocks of {block_size}: the block size \
                 must be at least 1, and the capacity must fit"
            ))
        })
    }

    /// Raises sluice's error for rows with NaN or infinities when a status read back after the
    /// stream (`count`, `first_row`) counts any and the gate does not mark them.
    #[pyo3(name = "_check_status")]
    fn check_status(&self, count: i64, first_row: i64) -> PyResult<()> {
        if count > 0 && self.non_finite == NonFinitePolicy::Error {
            // The kernels look at the logits; a NaN in the hidden states shows there too.
            let row = usize::try_from(first_row).unwrap_or(0);
            let error = BackendError::NonFinite { op: "route", row, input: NonFiniteInput::Logits };
            return Err(errors::model(error.into()));
        }
        Ok(())
    }

    /// Bytes of scratch a call on `tokens` rows needs in `workspace` (0 for a CPU gate).
    fn workspace_bytes(&self, tokens: usize) -> usize {
        self.prepared.router().workspace_bytes(tokens)
    }

    /// Does now what the first call on `tokens` rows would otherwise do, so that a captured
    /// `route_into` only enqueues its kernels. On a CUDA gate it checks the launch limits and,
    /// where cuBLASLt runs the GEMM (past 64 or 128 bf16 rows on Hopper, 8 before it), chooses
    /// cuBLASLt's split of the hidden size and algorithm for exactly `tokens`
    /// rows by timing the whole gate with each candidate (device work on the backend's own
    /// stream, waited for; the choice is shared by every gate of the backend with that shape);
    /// nothing on a CPU gate.
    /// Call it once for each row count an engine captures, before capturing.
    fn warm_up(&self, py: Python<'_>, tokens: usize) -> PyResult<()> {
        let router = self.prepared.router();
        py.detach(|| router.warm_up(tokens)).map_err(|error| errors::model(error.into()))
    }

    /// The device the gate routes on (`cpu`, `cuda:0`, ...): the device of every tensor a call
    /// takes.
    #[getter]
    fn device(&self) -> String {
        self.device.to_string()
    }

    /// Whether rows with NaN or infinities get ids -1 and weights 0 (else routing them raises).
    #[getter]
    fn mark_invalid(&self) -> bool {
        self.non_finite == NonFinitePolicy::MarkInvalid
    }

    /// The decoder layer.
    #[getter]
    fn layer(&self) -> usize {
        self.gate.layer()
    }

    /// The hidden size `H`.
    #[getter]
    fn hidden_size(&self) -> usize {
        self.gate.hidden_size()
    }

    /// The number of routed experts `E`.
    #[getter]
    fn num_experts(&self) -> usize {
        self.gate.num_experts()
    }

    /// Experts per token `K`.
    #[getter]
    fn top_k(&self) -> usize {
        self.gate.spec().top_k
    }

    /// The router weight `[E, H]`, a parameter (`requires_grad = true`), sharing the memory it
    /// was loaded from or handed over in.
    #[getter]
    fn weight(&self) -> PyTensor {
        self.gate.weight().clone().into()
    }

    /// The f32 correction bias `[E]`, or `None`.
    #[getter]
    fn bias(&self) -> Option<PyTensor> {
        self.gate.bias().cloned().map(PyTensor::from)
    }

    fn __repr__(&self) -> String {
        let spec = self.gate.spec();
        format!(
            "sluice.Gate(layer={}, experts={}, hidden_size={}, top_k={}, method={}, scoring={}, \
             device={})",
            self.gate.layer(),
            spec.num_experts,
            self.gate.hidden_size(),
            spec.top_k,
            spec.method.name(),
            spec.scoring.name(),
            self.device,
        )
    }
}
