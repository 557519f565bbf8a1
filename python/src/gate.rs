//! `Gate`: one MoE layer's gate, prepared on a backend, routing tensors of any DLPack producer.

use std::path::PathBuf;

use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;
use sluice_models::{Checkpoint, ModelConfig, ModelError, MoeGate, PreparedGate};
use sluice_tensor::{
    BackendError, Device, DeviceStream, DlpackError, DlpackView, DlpackViewMut, Element, Execution,
    NonFinitePolicy, RouteInputs, RouteOutputs, Tensor, export_vec,
};

use crate::backend::{PyCpuBackend, default_backend};
use crate::errors;
use crate::tensor::{self, PyTensor};

/// One MoE layer's gate, prepared on a CPU backend.
///
/// The weight is held as a parameter (`requires_grad = true`); the weight and the hidden states
/// are detached where they cross sluice's bridge, never before.
#[pyclass(frozen, module = "sluice._sluice", name = "Gate")]
pub(crate) struct Gate {
    gate: MoeGate,
    prepared: PreparedGate,
}

impl Gate {
    fn prepare(
        gate: MoeGate,
        backend: Option<&Bound<'_, PyCpuBackend>>,
        apply_scaling: bool,
        mark_invalid: bool,
    ) -> PyResult<Self> {
        let policy =
            if mark_invalid { NonFinitePolicy::MarkInvalid } else { NonFinitePolicy::Error };
        let gate = gate.with_apply_scaling(apply_scaling).with_non_finite(policy);
        let prepared = match backend {
            Some(backend) => gate.prepare(&backend.get().backend),
            None => gate.prepare(default_backend()?),
        }
        .map_err(errors::model)?;
        Ok(Gate { gate, prepared })
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

/// A writable view of an output the caller handed over, with errors naming it.
fn output_view<'a>(
    output: &'a mut sluice_tensor::Dlpack,
    arg: &'static str,
) -> Result<DlpackViewMut<'a>, ModelError> {
    DlpackViewMut::from_dlpack(output)
        .map_err(|source| BackendError::Argument { op: "route_into", arg, source }.into())
}

/// Where `route_into` runs: on the host without a stream, else on the stream of `device` that
/// `stream` numbers as DLPack does.
fn execution(device: Device, stream: Option<usize>) -> PyResult<Execution> {
    let Some(raw) = stream else { return Ok(Execution::Host) };
    if device == Device::Cpu {
        return Err(PyValueError::new_err(
            "`stream`: host tensors are routed on the calling thread; pass `stream=None`",
        ));
    }
    // SAFETY: `DeviceStream::new`'s contract (the stream and every buffer outlive the enqueued
    // work, inputs are ready on the stream, outputs are read only after it) is the documented
    // contract of `route_into(stream=...)`, which passes it on to the Python caller exactly as
    // torch does for kernels on an external stream. The `sluice` package passes torch's current
    // stream, on which torch's caching allocator orders any reuse of the tensors' memory. The
    // value is only checked here; a backend that cannot run on it refuses it before any work.
    let stream = unsafe { DeviceStream::new(device, raw) }
        .map_err(|error| PyValueError::new_err(format!("`stream`: {error}")))?;
    Ok(Execution::Stream(stream))
}

#[pymethods]
impl Gate {
    /// The gate of MoE layer `layer` in a Hugging Face checkpoint folder.
    #[staticmethod]
    #[pyo3(signature = (path, layer, *, backend=None, apply_scaling=true, mark_invalid=false))]
    fn from_pretrained(
        py: Python<'_>,
        path: PathBuf,
        layer: usize,
        backend: Option<&Bound<'_, PyCpuBackend>>,
        apply_scaling: bool,
        mark_invalid: bool,
    ) -> PyResult<Self> {
        let gate =
            py.detach(|| MoeGate::load(&Checkpoint::open(&path)?, layer)).map_err(errors::model)?;
        Self::prepare(gate, backend, apply_scaling, mark_invalid)
    }

    /// A gate from a router weight `[E, H]` (bf16 or f32; an `nn.Parameter` is fine), the f32
    /// correction bias `[E]` (`noaux_tc` only) and the model's `config.json` text.
    #[staticmethod]
    #[pyo3(signature = (
        weight, bias, config_json, *, layer=0, backend=None, apply_scaling=true,
        mark_invalid=false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn from_tensors(
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        config_json: &str,
        layer: usize,
        backend: Option<&Bound<'_, PyCpuBackend>>,
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
        Self::prepare(gate, backend, apply_scaling, mark_invalid)
    }

    /// Routes hidden states `[T, H]`: `(topk_ids, topk_weights)`, i32 and f32 `[T, K]`, host
    /// tensors sluice allocated (import them with `torch.from_dlpack`, zero-copy).
    #[pyo3(signature = (hidden, input_ids=None))]
    fn route(
        &self,
        py: Python<'_>,
        hidden: &Bound<'_, PyAny>,
        input_ids: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(PyTensor, PyTensor)> {
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
    /// zero-copy, allocating nothing. Without `stream` the work runs on the host and is done on
    /// return. With `stream` (numbered as DLPack's `__dlpack__(stream=...)`: CUDA 1 is the legacy
    /// default stream, 2 the per-thread one, larger values a `cudaStream_t`) it is only enqueued
    /// there, and the caller promises what any kernel launch on that stream needs: the stream and
    /// every tensor outlive the work, the inputs are ready on the stream, and the outputs are read
    /// only after it.
    #[pyo3(signature = (hidden, topk_ids, topk_weights, *, input_ids=None, stream=None))]
    fn route_into(
        &self,
        py: Python<'_>,
        hidden: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        input_ids: Option<&Bound<'_, PyAny>>,
        stream: Option<usize>,
    ) -> PyResult<()> {
        let hidden = tensor::import(hidden)?.detach();
        let token_ids = input_ids.map(tensor::import).transpose()?.map(|ids| ids.detach());
        let mut ids_out = tensor::import_output(topk_ids, "topk_ids")?;
        let mut weights_out = tensor::import_output(topk_weights, "topk_weights")?;
        let execution = execution(hidden.device(), stream)?;
        py.detach(|| {
            let inputs = route_inputs(&hidden, token_ids.as_ref())?;
            let mut outputs = RouteOutputs::new(
                output_view(&mut ids_out, "topk_ids")?,
                output_view(&mut weights_out, "topk_weights")?,
            );
            self.prepared.route_into(&inputs, &mut outputs, execution)
        })
        .map_err(errors::model)
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
            "sluice.Gate(layer={}, experts={}, hidden_size={}, top_k={}, method={}, scoring={})",
            self.gate.layer(),
            spec.num_experts,
            self.gate.hidden_size(),
            spec.top_k,
            spec.method.name(),
            spec.scoring.name(),
        )
    }
}
