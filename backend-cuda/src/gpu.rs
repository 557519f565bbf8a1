//! One CUDA device: its context, the backend's own stream, and the compiled modules per routing
//! config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaStream};
use sluice_kernels::{GpuTarget, NVIDIA_WAVE_WIDTH, RoutingConfig};
use sluice_tensor::{RoutingSpec, ScoringFunc, TopkMethod};

use crate::cublaslt::Lt;
use crate::error::CudaError;
use crate::module::RouterModule;
use crate::ptx_cache::PtxCache;

#[derive(Debug)]
pub(crate) struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    /// The stream of the synchronous convenience calls (`route`, `upload`, ...).
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) ordinal: usize,
    pub(crate) multiprocessors: usize,
    /// Threads one multiprocessor holds at once.
    pub(crate) threads_per_multiprocessor: usize,
    /// The most dynamic shared memory a block may opt in to, in bytes.
    pub(crate) shared_memory_per_block: usize,
    /// Bytes of L2 cache.
    pub(crate) l2_bytes: usize,
    pub(crate) compute_capability: (i32, i32),
    /// cuBLASLt, where the library is installed.
    pub(crate) lt: Option<Arc<Lt>>,
    /// Where the PTX of each routing config is kept between processes.
    ptx_cache: PtxCache,
    modules: Mutex<HashMap<RoutingConfig, Arc<RouterModule>>>,
}

impl Gpu {
    pub(crate) fn open(ordinal: usize) -> Result<Self, CudaError> {
        // SAFETY: only tries to dlopen the driver library by its usual names; nothing is called.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        // SAFETY: as above, for NVRTC.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::NoNvrtc);
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|source| CudaError::NoDevice { ordinal, source })?;
        // SAFETY: called right after creating the context, before this backend allocates anything
        // or creates a stream, so no slice exists whose events tracking would have to cover. The
        // backend orders its own work by stream order and explicit synchronisation instead, which
        // keeps every launch capturable (tracking events would be recorded on other streams).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(CudaError::driver("creating a stream"))?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(CudaError::driver("reading the multiprocessor count"))?;
        let threads_per_multiprocessor = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)
            .map_err(CudaError::driver("reading the threads per multiprocessor"))?;
        let shared_memory_per_block = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(CudaError::driver("reading the shared memory per block"))?;
        let l2_bytes = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(CudaError::driver("reading the L2 size"))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(CudaError::driver("reading the compute capability"))?;
        Ok(Gpu {
            ctx,
            stream,
            ordinal,
            multiprocessors: usize::try_from(multiprocessors).unwrap_or(1),
            threads_per_multiprocessor: usize::try_from(threads_per_multiprocessor).unwrap_or(0),
            shared_memory_per_block: usize::try_from(shared_memory_per_block).unwrap_or(0),
            l2_bytes: usize::try_from(l2_bytes).unwrap_or(0),
            compute_capability,
            lt: Lt::open().map(Arc::new),
            ptx_cache: PtxCache::from_env(nvrtc_version()),
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Whether the tensor-core GEMM kernels exist on this device.
    pub(crate) fn has_tensor_cores(&self) -> bool {
        self.compute_capability.0 >= 8
    }

    /// Whether the tiles GEMM kernel (bulk copies into shared memory) exists on this device.
    pub(crate) fn has_bulk_copies(&self) -> bool {
        self.compute_capability.0 >= 9
    }

    /// Whether the warpgroup GEMM kernel (tensor copies and `wgmma`) exists on this device:
    /// compute capability 9.0, whose module is compiled for the architecture-specific `sm_90a`.
    pub(crate) fn has_warpgroup_mma(&self) -> bool {
        self.compute_capability == (9, 0)
    }

    /// What the GEMM planner needs to know about this device.
    pub(crate) fn target(&self) -> GpuTarget {
        GpuTarget {
            wave_width: NVIDIA_WAVE_WIDTH,
            tensor_cores: self.has_tensor_cores(),
            multiprocessors: self.multiprocessors,
            bulk_copies: self.has_bulk_copies(),
            warpgroup_mma: self.has_warpgroup_mma(),
            shared_memory_per_block: self.shared_memory_per_block,
        }
    }

    /// The module for `config`, compiled on first use and cached.
    pub(crate) fn module(&self, config: &RoutingConfig) -> Result<Arc<RouterModule>, CudaError> {
        let mut modules = self.modules.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(module) = modules.get(config) {
            return Ok(Arc::clone(module));
        }
        let module = Arc::new(RouterModule::compile(
            &self.ctx,
            config,
            self.compute_capability,
            self.has_warpgroup_mma(),
            self.shared_memory_per_block,
            self.multiprocessors * self.threads_per_multiprocessor,
            &self.ptx_cache,
        )?);
        modules.insert(config.clone(), Arc::clone(&module));
        Ok(module)
    }

    /// The module used for the router GEMM alone. The GEMM kernels do not depend on the routing
    /// config, but the source's routing kernel needs one to compile: the smallest greedy config.
    pub(crate) fn gemm_module(&self) -> Result<Arc<RouterModule>, CudaError> {
        let spec = RoutingSpec::builder(1, 1)
            .scoring(ScoringFunc::Softmax)
            .method(TopkMethod::Greedy)
            .groups(1, 1)
            .norm_topk_prob(false)
            .routed_scaling_factor(1.0)
            .build()
            .map_err(sluice_kernels::KernelError::from)?;
        self.module(&RoutingConfig::new(&spec)?)
    }
}

/// The loaded NVRTC's version, `(major, minor)`, or `None` if it does not say (then nothing is
/// cached: an entry could not tell which NVRTC made it).
fn nvrtc_version() -> Option<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC was found loadable in `Gpu::open` before this runs; the call writes two
    // `int`s through pointers to these two locals, which outlive it.
    let result = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&raw mut major, &raw mut minor) };
    (result == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}
