//! [`RocmBackend`]: the `Backend` trait on one AMD GPU.

use std::sync::Arc;

use sluice_kernels::{HIDDEN_DTYPES, WEIGHT_DTYPES};
use sluice_tensor::{
    Backend, BackendError, DType, Device, Dlpack, ExpectedShape, PreparedRouter, RoutingOutput,
    RoutingSpec, TopkMethod,
};

use crate::error::RocmError;
use crate::gate::{self, Source};
use crate::gpu::Gpu;
use crate::memory;
use crate::prepared::{RocmPreparedRouter, Selector};

/// The ROCm backend: the scalar router GEMM and fused routing on one AMD Instinct GPU, from the
/// code objects embedded at build time.
///
/// The HIP runtime is loaded at run time, so a binary built without ROCm runs wherever one is,
/// and [`RocmBackend::new`] fails with a [`RocmError`] (no kernels embedded, no runtime, no
/// device) elsewhere. Routing configs outside the embedded list are refused with
/// [`RocmError::ConfigNotEmbedded`], which names the embedded ones. Cloning is cheap and shares
/// the device, the backend's stream and the loaded code objects.
#[derive(Debug, Clone)]
pub struct RocmBackend {
    gpu: Arc<Gpu>,
}

impl RocmBackend {
    /// The backend on AMD GPU `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self, RocmError> {
        Ok(RocmBackend { gpu: Arc::new(Gpu::open(ordinal)?) })
    }

    /// Accepted for parity with `CudaBackend::with_dependent_launch`, so that an engine can
    /// configure both backends the same way, and ignored: programmatic dependent launch has no
    /// AMD equivalent (the kernels' hooks for it compile to nothing for AMD).
    pub fn with_dependent_launch(self, enabled: bool) -> Self {
        if enabled {
            tracing::debug!("programmatic dependent launch has no AMD equivalent; ignored");
        }
        self
    }

    /// The device's name as the runtime reports it.
    pub fn device_name(&self) -> &str {
        self.gpu.device.name()
    }

    /// The HIP runtime's version.
    pub fn runtime_version(&self) -> crate::HipVersion {
        self.gpu.device.runtime().version()
    }

    /// The device it computes on (for streams and graphs of the caller's own).
    pub fn rocm_device(&self) -> &Arc<crate::RocmDevice> {
        &self.gpu.device
    }

    /// Copies a router weight (and bias) to the device and loads the kernels for `spec`; the
    /// typed form of [`Backend::prepare_router`].
    pub fn prepare(
        &self,
        weight: &Dlpack,
        bias: Option<&Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<RocmPreparedRouter, BackendError> {
        RocmPreparedRouter::new(Arc::clone(&self.gpu), weight, Selector::TopK { bias }, spec)
    }

    /// Copies a router weight and the hash table `tid2eid` (i32 `[vocab, K]`, host or device,
    /// checked with [`check_hash_table`](sluice_tensor::check_hash_table)) of a hash-routed layer
    /// to the device and loads its kernels; the typed form of [`Backend::prepare_hash_router`].
    pub fn prepare_hashed(
        &self,
        weight: &Dlpack,
        table: &Dlpack,
        spec: &RoutingSpec,
    ) -> Result<RocmPreparedRouter, BackendError> {
        RocmPreparedRouter::new(Arc::clone(&self.gpu), weight, Selector::Hash { table }, spec)
    }
}

/// A rank-2 shape of any extents.
fn any2() -> ExpectedShape {
    ExpectedShape(vec![None, None])
}

impl Backend for RocmBackend {
    fn name(&self) -> &str {
        "rocm"
    }

    fn device(&self) -> Device {
        Device::Rocm(self.gpu.ordinal())
    }

    fn upload(&self, host: &Dlpack) -> Result<Dlpack, BackendError> {
        memory::upload(&self.gpu.stream, host)
    }

    fn download(&self, tensor: &Dlpack) -> Result<Dlpack, BackendError> {
        memory::download(&self.gpu.stream, tensor)
    }

    fn router_gemm(&self, hidden: &Dlpack, weight: &Dlpack) -> Result<Dlpack, BackendError> {
        const OP: &str = "router_gemm";
        let gpu = &self.gpu;
        let hidden = gate::stage_matrix(gpu, OP, "hidden", hidden, HIDDEN_DTYPES, any2())?;
        let weight = gate::stage_matrix(gpu, OP, "weight", weight, WEIGHT_DTYPES, any2())?;
        if hidden.matrix.cols != weight.matrix.cols {
            return Err(BackendError::Shape {
                op: OP,
                arg: "hidden",
                shape: vec![hidden.matrix.rows, hidden.matrix.cols],
                expected: ExpectedShape(vec![None, Some(weight.matrix.cols)]),
            });
        }
        let module = gpu.gemm_module()?;
        gate::logits(gpu, &module, &hidden, &weight.matrix)
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
        let module = gpu.module(spec)?;
        let expected = ExpectedShape(vec![None, Some(spec.num_experts)]);
        let logits = gate::stage_matrix(gpu, OP, "logits", logits, &[DType::F32], expected)?;
        let bias = bias.map(|b| gate::bias_values(gpu, OP, b, spec)).transpose()?;
        let bias = bias.as_deref().map(|b| gate::upload_bias(gpu, b)).transpose()?;
        let bias_ptr = bias.as_ref().map(memory::DeviceMemory::address);
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
