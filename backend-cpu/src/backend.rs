//! [`CpuBackend`]: the `Backend` trait on the host.

use std::sync::Arc;

use sluice_tensor::argument_view;
use sluice_tensor::{
    Backend, BackendError, Device, Dlpack, DlpackViewMut, Element, ExpectedShape, PreparedRouter,
    RoutingOutput, RoutingSpec, TopkMethod, check_hash_table, check_router_weight,
};

use crate::builder::{CpuBackendBuilder, CpuBuildError};
use crate::engine::{Engine, LogitRows};
use crate::gemm::Weights;
use crate::input::{self, AnyView};
use crate::ops;
use crate::output::export;
use crate::pack::{PackedWeight, WeightView};
use crate::prepared::{CpuPreparedRouter, Selector};
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
        self.engine.kernel.family()
    }

    /// Threads computing each call, the calling thread included.
    pub fn threads(&self) -> usize {
        self.engine.threads
    }

    /// The most tokens one call takes.
    pub fn max_tokens(&self) -> usize {
        self.engine.max_tokens
    }

    /// How long the worker threads spin between calls before they park.
    pub fn idle_spin(&self) -> std::time::Duration {
        self.engine.idle_spin
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
        let bias = match bias {
            Some(bias) => Some(input::bias(OP, &argument_view(OP, "bias", bias)?)?.to_vec()),
            None => None,
        };
        RowRouter::new(OP, spec, bias.as_deref(), self.engine.kernel)?;
        self.pack(OP, weight, spec, Selector::TopK { bias })
    }

    /// Packs a router weight and keeps a checked hash table (i32 `[vocab, K]`) for a
    /// hash-routed layer; the typed form of [`Backend::prepare_hash_router`].
    pub fn prepare_hashed(
        &self,
        weight: &Dlpack,
        table: &Dlpack,
        spec: &RoutingSpec,
    ) -> Result<CpuPreparedRouter, BackendError> {
        const OP: &str = "prepare_hash_router";
        spec.validate()?;
        if spec.method != TopkMethod::Hash {
            return Err(BackendError::UnexpectedHashTable { op: OP, method: spec.method });
        }
        let (table, shape) = input::hash_table(OP, &argument_view(OP, "table", table)?)?;
        check_hash_table(&table, &shape, spec.top_k, spec.num_experts)
            .map_err(|source| BackendError::HashTable { op: OP, source })?;
        self.pack(OP, weight, spec, Selector::Hash { table })
    }

    /// Packs the weight of a router whose spec and selector are checked.
    fn pack(
        &self,
        op: &'static str,
        weight: &Dlpack,
        spec: &RoutingSpec,
        selector: Selector,
    ) -> Result<CpuPreparedRouter, BackendError> {
        let weight_view = argument_view(op, "weight", weight)?;
        check_router_weight(op, weight_view.shape(), spec)?;
        let view = input::weight(op, &weight_view)?;
        let (experts, hidden) = view.dims();
        let _span = tracing::debug_span!("cpu_prepare_router", experts, hidden, %spec).entered();
        let packed = PackedWeight::pack(view).map_err(|_| {
            output::out_of_memory(op, experts * hidden * WeightView::bytes_per_value(&view))
        })?;
        Ok(CpuPreparedRouter::new(Arc::clone(&self.engine), *spec, packed, selector))
    }
}

/// Copies a host tensor into a new contiguous host tensor of the same dtype and shape.
fn copy_to_host(op: &'static str, tensor: &Dlpack) -> Result<Dlpack, BackendError> {
    fn copy<T: Element>(view: ndarray::ArrayViewD<'_, T>) -> Result<Dlpack, BackendError> {
        let shape = view.shape().to_vec();
        export("tensor", view.iter().copied().collect(), &shape)
    }
    match input::any(op, "tensor", &argument_view(op, "tensor", tensor)?)? {
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
        let hidden_view = argument_view(OP, "hidden", hidden)?;
        let weight_view = argument_view(OP, "weight", weight)?;
        let hidden = input::hidden(OP, &hidden_view)?;
        let weight = input::weight(OP, &weight_view)?;
        let (experts, hidden_size) = weight.dims();
        ops::check_hidden_size(OP, &hidden, hidden_size)?;
        let tokens = hidden.dims().0;
        ops::check_tokens(&self.engine, OP, tokens)?;
        let mut logits = ops::new_logits(OP, tokens, experts)?;
        let mut out = DlpackViewMut::from_slice(&mut logits, &[tokens, experts])
            .map_err(|source| BackendError::Argument { op: OP, arg: "logits", source })?;
        ops::logits_into(&self.engine, OP, hidden, Weights::Raw(weight), &mut out)?;
        ops::export_logits(logits, tokens, experts)
    }

    fn route_logits(
        &self,
        logits: &Dlpack,
        bias: Option<&Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<RoutingOutput, BackendError> {
        const OP: &str = "route_logits";
        spec.validate()?;
        let logits_view = argument_view(OP, "logits", logits)?;
        let logits = input::logits(OP, &logits_view)?;
        let (tokens, experts) = logits.dim();
        if experts != spec.num_experts {
            return Err(BackendError::Shape {
                op: OP,
                arg: "logits",
                shape: vec![tokens, experts],
                expected: ExpectedShape(vec![None, Some(spec.num_experts)]),
            });
        }
        let bias = match bias {
            Some(bias) => Some(input::bias(OP, &argument_view(OP, "bias", bias)?)?.to_vec()),
            None => None,
        };
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

    fn prepare_hash_router(
        &self,
        weight: Dlpack,
        table: Dlpack,
        spec: &RoutingSpec,
    ) -> Result<Box<dyn PreparedRouter>, BackendError> {
        Ok(Box::new(self.prepare_hashed(&weight, &table, spec)?))
    }
}
