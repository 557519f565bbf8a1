//! A test-only backend that computes with the scalar reference router, and checkpoint writers.
//!
//! It reads its DLPack inputs the way a backend written outside this workspace would, through the
//! bridge's validated views (no `unsafe`), and records the data pointers it was handed, so tests
//! can prove that detaching copied nothing.

#![allow(dead_code)] // Each test binary uses part of this module.

use std::path::Path;
use std::sync::{Arc, Mutex};

use half::{bf16, f16};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sluice_models::reference;
use sluice_tensor::{
    Backend, BackendError, DType, Device, Dlpack, DlpackView, NonFiniteInput, PreparedRouter,
    RoutingOutput, RoutingSpec, argument_view, export_vec,
};

/// Routes with [`reference`], on the host.
#[derive(Debug, Default)]
pub struct ReferenceBackend {
    /// Data addresses of every tensor handed over (to the backend or a router it prepared), in
    /// order.
    pub received: Arc<Mutex<Vec<usize>>>,
    /// Return `topk_ids` one column too wide (a backend that breaks the contract).
    pub break_output_shape: bool,
}

/// A host tensor read out of a DLPack descriptor, widened exactly to f32.
struct HostValues {
    shape: Vec<usize>,
    values: Vec<f32>,
}

fn read(op: &'static str, arg: &'static str, dl: &Dlpack) -> Result<HostValues, BackendError> {
    let view = argument_view(op, arg, dl)?;
    if view.device() != Device::Cpu {
        return Err(BackendError::WrongDevice {
            op,
            arg,
            actual: view.device(),
            expected: Device::Cpu,
        });
    }
    let access = |source| BackendError::View { op, arg, source };
    let values: Vec<f32> = match view.dtype() {
        DType::F32 => view.as_array_dyn::<f32>().map_err(access)?.iter().copied().collect(),
        DType::BF16 => {
            view.as_array_dyn::<bf16>().map_err(access)?.iter().map(|&v| v.into()).collect()
        }
        DType::F16 => {
            view.as_array_dyn::<f16>().map_err(access)?.iter().map(|&v| v.into()).collect()
        }
        dtype => {
            return Err(BackendError::UnsupportedDType {
                op,
                arg,
                dtype,
                supported: "f32, bf16, f16",
            });
        }
    };
    Ok(HostValues { shape: view.shape().to_vec(), values })
}

fn backend_error(message: String) -> BackendError {
    BackendError::Device { backend: "reference", message }
}

fn reference_error(e: reference::ReferenceError) -> BackendError {
    match e {
        reference::ReferenceError::NonFinite { row } => {
            BackendError::NonFinite { op: "route", row, input: NonFiniteInput::Logits }
        }
        other => backend_error(other.to_string()),
    }
}

fn gemm(hidden: &HostValues, weight: &HostValues) -> Result<Dlpack, BackendError> {
    let (&[tokens, h], &[experts, wh]) = (hidden.shape.as_slice(), weight.shape.as_slice()) else {
        return Err(backend_error("router_gemm: hidden and weight must be rank 2".to_owned()));
    };
    if h != wh {
        return Err(backend_error(format!("router_gemm: hidden size {h} vs weight {wh}")));
    }
    let logits = reference::router_logits(&hidden.values, &weight.values, tokens, h, experts)
        .map_err(reference_error)?;
    export_vec(logits, &[tokens, experts]).map_err(|source| BackendError::Argument {
        op: "router_gemm",
        arg: "logits",
        source,
    })
}

fn route_values(
    logits: &[f32],
    tokens: usize,
    bias: Option<&[f32]>,
    spec: &RoutingSpec,
    break_shape: bool,
) -> Result<RoutingOutput, BackendError> {
    let routing = reference::route(logits, tokens, bias, spec).map_err(reference_error)?;
    let top_k = routing.top_k();
    let (mut ids, weights) = routing.into_parts();
    let ids_shape = if break_shape {
        ids.extend(std::iter::repeat_n(0, tokens));
        [tokens, top_k + 1]
    } else {
        [tokens, top_k]
    };
    let argument = |arg| move |source| BackendError::Argument { op: "route", arg, source };
    Ok(RoutingOutput {
        topk_ids: export_vec(ids, &ids_shape).map_err(argument("topk_ids"))?,
        topk_weights: export_vec(weights, &[tokens, top_k]).map_err(argument("topk_weights"))?,
    })
}

fn record(received: &Mutex<Vec<usize>>, dl: &Dlpack) {
    if let Ok(view) = DlpackView::from_dlpack(dl) {
        received.lock().unwrap().push(view.data_ptr() as usize);
    }
}

impl ReferenceBackend {
    /// The data addresses handed over so far.
    pub fn received(&self) -> Vec<usize> {
        self.received.lock().unwrap().clone()
    }
}

impl Backend for ReferenceBackend {
    fn name(&self) -> &str {
        "reference"
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn upload(&self, _host: &Dlpack) -> Result<Dlpack, BackendError> {
        Err(backend_error("upload: the reference backend only computes on the host".to_owned()))
    }

    fn download(&self, _tensor: &Dlpack) -> Result<Dlpack, BackendError> {
        Err(backend_error("download: the reference backend only computes on the host".to_owned()))
    }

    fn router_gemm(&self, hidden: &Dlpack, weight: &Dlpack) -> Result<Dlpack, BackendError> {
        record(&self.received, hidden);
        record(&self.received, weight);
        gemm(&read("router_gemm", "hidden", hidden)?, &read("router_gemm", "weight", weight)?)
    }

    fn route_logits(
        &self,
        logits: &Dlpack,
        bias: Option<&Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<RoutingOutput, BackendError> {
        let logits = read("route_logits", "logits", logits)?;
        let bias = bias.map(|b| read("route_logits", "bias", b)).transpose()?;
        let tokens = logits.shape.first().copied().unwrap_or(0);
        let bias = bias.as_ref().map(|b| b.values.as_slice());
        route_values(&logits.values, tokens, bias, spec, self.break_output_shape)
    }

    fn prepare_router(
        &self,
        weight: Dlpack,
        bias: Option<Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<Box<dyn PreparedRouter>, BackendError> {
        record(&self.received, &weight);
        if let Some(bias) = &bias {
            record(&self.received, bias);
        }
        let weight = read("prepare_router", "weight", &weight)?;
        let bias = bias.map(|b| read("prepare_router", "bias", &b)).transpose()?;
        let hidden_size = weight.shape.get(1).copied().unwrap_or(0);
        Ok(Box::new(Prepared {
            spec: *spec,
            hidden_size,
            weight,
            bias: bias.map(|b| b.values),
            break_output_shape: self.break_output_shape,
            received: Arc::clone(&self.received),
        }))
    }
}

/// A prepared reference router: the weight (and bias) copied to f32 once.
struct Prepared {
    spec: RoutingSpec,
    hidden_size: usize,
    weight: HostValues,
    bias: Option<Vec<f32>>,
    break_output_shape: bool,
    received: Arc<Mutex<Vec<usize>>>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Prepared({})", self.spec)
    }
}

impl PreparedRouter for Prepared {
    fn spec(&self) -> &RoutingSpec {
        &self.spec
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    fn router_gemm(&self, hidden: &Dlpack) -> Result<Dlpack, BackendError> {
        record(&self.received, hidden);
        gemm(&read("router_gemm", "hidden", hidden)?, &self.weight)
    }

    fn route(&self, hidden: &Dlpack) -> Result<RoutingOutput, BackendError> {
        record(&self.received, hidden);
        let hidden = read("route", "hidden", hidden)?;
        let logits = gemm(&hidden, &self.weight)?;
        let logits = read("route", "logits", &logits)?;
        let tokens = logits.shape.first().copied().unwrap_or(0);
        route_values(
            &logits.values,
            tokens,
            self.bias.as_deref(),
            &self.spec,
            self.break_output_shape,
        )
    }
}

/// Writes a safetensors file with the real writer. Entries: name, dtype, shape, raw bytes.
pub fn write_safetensors(path: &Path, entries: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            ((*name).to_owned(), TensorView::new(*dtype, shape.clone(), bytes).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian bytes of f32 values rounded to bf16.
pub fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect()
}
