//! [`CudaBackend`]: the `Backend` trait on one NVIDIA GPU.

use std::sync::Arc;

use sluice_tensor::{
    Backend, BackendError, DType, Device, Dlpack, ExpectedShape, PreparedRouter, RoutingOutput,
    RoutingSpec, TopkMethod,
};

use crate::enqueue::Weight;
use crate::error::CudaError;
use crate::gate::{self, Source};
use crate::gpu::Gpu;
use crate::memory;
use crate::prepared::{CudaPreparedRouter, Selector};

/// The CUDA backend: router GEMM on tensor cores and fused routing, on one GPU.
///
/// The driver and NVRTC are loaded at run time, so a binary built without CUDA runs wherever a
/// driver is, and [`CudaBackend::new`] fails with [`CudaError::NoDriver`] where none is. Cloning is
/// cheap and shares the context, the stream and the compiled kernels.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    pub(crate) gpu: Arc<Gpu>,
    dependent_launch: bool,
}

impl CudaBackend {
    /// The backend on CUDA device `ordinal`.
    ///
    /// Programmatic dependent launch is on where the device has it (compute capability 9.0 and
    /// later): the router GEMM issues its weight loads before it waits for the previous kernel.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        let gpu = Arc::new(Gpu::open(ordinal)?);
        let dependent_launch = gpu.compute_capability.0 >= 9;
        Ok(CudaBackend { gpu, dependent_launch })
    }

    /// The same backend with programmatic dependent launch turned on or off for the routers it
    /// prepares from now on (it is ignored by devices older than compute capability 9.0).
    pub fn with_dependent_launch(mut self, enabled: bool) -> Self {
        self.dependent_launch = enabled && self.gpu.compute_capability.0 >= 9;
        self
    }

    /// The device's compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.gpu.compute_capability
    }

    /// The device's multiprocessor count.
    pub fn multiprocessors(&self) -> usize {
        self.gpu.multiprocessors
    }

    /// Copies a router weight (and bias) to the device and compiles the kernels for `spec`; the
    /// typed form of [`Backend::prepare_router`].
    pub fn prepare(
        &self,
        weight: &Dlpack,
        bias: Option<&Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<CudaPreparedRouter, BackendError> {
        let selector = Selector::TopK { bias };
        CudaPreparedRouter::new(
            Arc::clone(&self.gpu),
            weight,
            selector,
            spec,
            self.dependent_launch,
        )
    }

    /// Copies a router weight and the hash table `tid2eid` (i32 `[vocab, K]`, host or device,
    /// checked with [`check_hash_table`](sluice_tensor::check_hash_table)) of a hash-routed layer
    /// to the device and compiles its kernels; the typed form of
    /// [`Backend::prepare_hash_router`].
    pub fn prepare_hashed(
        &self,
        weight: &Dlpack,
        table: &Dlpack,
        spec: &RoutingSpec,
    ) -> Result<CudaPreparedRouter, BackendError> {
        let selector = Selector::Hash { table };
        CudaPreparedRouter::new(
            Arc::clone(&self.gpu),
            weight,
            selector,
            spec,
            self.dependent_launch,
        )
    }
}

/// A rank-2 shape of any extents.
fn any2() -> ExpectedShape {
    ExpectedShape(vec![None, None])
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        "cuda"
    }

    fn device(&self) -> Device {
        Device::Cuda(self.gpu.ordinal)
    }

    fn upload(&self, host: &Dlpack) -> Result<Dlpack, BackendError> {
        memory::upload(&self.gpu, host)
    }

    fn download(&self, tensor: &Dlpack) -> Result<Dlpack, BackendError> {
        memory::download(&self.gpu, tensor)
    }

    fn router_gemm(&self, hidden: &Dlpack, weight: &Dlpack) -> Result<Dlpack, BackendError> {
        const OP: &str = "router_gemm";
        let gpu = &self.gpu;
        let hidden = gate::stage_matrix(gpu, OP, "hidden", hidden, gate::HIDDEN_DTYPES, any2())?;
        let weight = gate::stage_matrix(gpu, OP, "weight", weight, gate::WEIGHT_DTYPES, any2())?;
        if hidden.matrix.cols != weight.matrix.cols {
            return Err(BackendError::Shape {
                op: OP,
                arg: "hidden",
                shape: vec![hidden.matrix.rows, hidden.matrix.cols],
                expected: ExpectedShape(vec![None, Some(weight.matrix.cols)]),
            });
        }
        let module = gpu.gemm_module()?;
        gate::logits(gpu, &module, &hidden, &Weight { matrix: weight.matrix })
    }

    fn route_logits(
        &self,
        logits: &Dlpack,
        bias: Option<&Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<RoutingOutput, BackendError> {
        const OP: &str = "route_logits";
        if spec.method == TopkMethod::Hash {
            // Logits alone cannot say which token each row is.
            return Err(BackendError::MissingHashTable { op: OP });
        }
        let gpu = &self.gpu;
        let config = sluice_kernels::RoutingConfig::new(spec).map_err(CudaError::from)?;
        let expected = ExpectedShape(vec![None, Some(spec.num_experts)]);
        let logits = gate::stage_matrix(gpu, OP, "logits", logits, &[DType::F32], expected)?;
        let bias = bias.map(|b| gate::bias_values(gpu, OP, b, spec)).transpose()?;
        let bias = bias.as_deref().map(|b| memory::upload_f32(gpu, b)).transpose()?;
        let module = gpu.module(&config)?;
        let bias_ptr = bias.as_ref().map(|b| memory::address(gpu, b));
        gate::route(OP, gpu, &module, spec, bias_ptr, Source::Logits(&logits))
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
