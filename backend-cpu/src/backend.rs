//! [`CpuBackend`]: the `Backend` trait on the host.

use std::sync::Arc;

use sluice_tensor::{
    Backend, BackendError, Device, Dlpack, Element, PreparedRouter, RoutingOutput, RoutingSpec,
};

use crate::builder::{CpuBackendBuilder, CpuBuildError};
use crate::engine::{Engine, LogitRows};
use crate::gemm::Weights;
use crate::input::{self, AnyView};
use crate::ops;
use crate::output::export;
use crate::pack::{PackedWeight, WeightView};
use crate::prepared::CpuPreparedRouter;
use crate::routing::RowRouter;
use crate::{CpuKernel, output};

/// The CPU backend: router GEMM with run-time selected SIMD kernels and fused routing, on all
/// cores.
///
/// Cloning is cheap and shares the worker threads.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    pub(crate) engine: Arc<Engine>,
}

impl CpuBackend {
    /// A backend with the default settings (all cores, the fastest kernel family).
    pub fn new() -> Result<Self, CpuBuildError> {
        Self::builder().build()
    }

    /// A builder for other settings.
    pub fn builder() -> CpuBackendBuilder {
        CpuBackendBuilder::default()
    }

    /// The kernel family in use (never [`CpuKernel::Auto`]).
    pub fn kernel(&self) -> CpuKernel {
        self.engine.kernel
    }

    /// Threads computing each call, the calling thread included.
    pub fn threads(&self) -> usize {
        self.engine.threads
    }

    /// The most tokens one call takes.
    pub fn max_tokens(&self) -> usize {
        self.engine.max_tokens
    }

    /// Packs a router weight (and keeps an f32 bias) for repeated routing; the typed form of
    /// [`Backend::prepare_router`].
    pub fn prepare(
        &self,
        weight: &Dlpack,
        bias: Option<&Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<CpuPreparedRouter, BackendError> {
        const OP: &str = "prepare_router";
        spec.validate()?;
        let view = input::weight(OP, weight)?;
        let (experts, hidden) = view.dims();
        if experts != spec.num_experts {
            return Err(BackendError::Shape {
                op: OP,
                arg: "weight",
                shape: vec![experts as i64, hidden as i64],
                expected: format!("[{}, H] (E = the spec's num_experts)", spec.num_experts),
            });
        }
        let bias = bias.map(|b| input::bias(OP, b).map(|b| b.to_vec())).transpose()?;
        RowRouter::new(OP, spec, bias.as_deref(), self.engine.kernel)?;
        let _span = tracing::debug_span!("cpu_prepare_router", experts, hidden, %spec).entered();
        let packed = PackedWeight::pack(view).map_err(|_| {
            output::out_of_memory(OP, experts * hidden * WeightView::bytes_per_value(&view))
        })?;
        Ok(CpuPreparedRouter::new(Arc::clone(&self.engine), *spec, packed, bias))
    }
}

/// Copies a host tensor into a new contiguous host tensor of the same dtype and shape.
fn copy_to_host(op: &'static str, tensor: &Dlpack) -> Result<Dlpack, BackendError> {
    fn copy<T: Element>(view: ndarray::ArrayViewD<'_, T>) -> Result<Dlpack, BackendError> {
        let shape = view.shape().to_vec();
        export(view.iter().copied().collect(), &shape)
    }
    match input::any(op, "tensor", tensor)? {
        AnyView::F32(v) => copy(v),
        AnyView::F16(v) => copy(v),
        AnyView::Bf16(v) => copy(v),
        AnyView::F64(v) => copy(v),
        AnyView::I32(v) => copy(v),
        AnyView::I64(v) => copy(v),
        AnyView::U8(v) => copy(v),
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn upload(&self, host: &Dlpack) -> Result<Dlpack, BackendError> {
        copy_to_host("upload", host)
    }

    fn download(&self, tensor: &Dlpack) -> Result<Dlpack, BackendError> {
        copy_to_host("download", tensor)
    }

    fn router_gemm(&self, hidden: &Dlpack, weight: &Dlpack) -> Result<Dlpack, BackendError> {
        const OP: &str = "router_gemm";
        let hidden = input::hidden(OP, hidden)?;
        let weight = input::weight(OP, weight)?;
        ops::check_hidden_size(OP, &hidden, weight.dims().1)?;
        ops::logits(&self.engine, OP, hidden, Weights::Raw(weight))
    }

    fn route_logits(
        &self,
        logits: &Dlpack,
        bias: Option<&Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<RoutingOutput, BackendError> {
        const OP: &str = "route_logits";
        spec.validate()?;
        let logits = input::logits(OP, logits)?;
        let (tokens, experts) = logits.dim();
        if experts != spec.num_experts {
            return Err(BackendError::Shape {
                op: OP,
                arg: "logits",
                shape: vec![tokens as i64, experts as i64],
                expected: format!("[T, {}] (E = the spec's num_experts)", spec.num_experts),
            });
        }
        let bias = bias.map(|b| input::bias(OP, b).map(|b| b.to_vec())).transpose()?;
        let router = RowRouter::new(OP, spec, bias.as_deref(), self.engine.kernel)?;
        ops::route_logits(&self.engine, OP, LogitRows::View(logits), tokens, &router)
    }

    fn prepare_router(
        &self,
        weight: Dlpack,
        bias: Option<Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<Box<dyn PreparedRouter>, BackendError> {
        Ok(Box::new(self.prepare(&weight, bias.as_ref(), spec)?))
    }
}
