//! The kernels of one routing config, compiled by NVRTC for the device and loaded once.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx, compile_ptx_with_opts};
use sluice_kernels::{
    DISPATCH_COUNT_KERNEL, DISPATCH_RANK_TOKENS_KERNEL, DISPATCH_SCATTER_KERNEL,
    DISPATCH_WORDS_KERNEL, FusedLayout, GemmKernel, HiddenKind, NVIDIA_WAVE_WIDTH,
    RESET_STATUS_KERNEL, ROUTE_BLOCK_KERNEL, ROUTE_BLOCK_LOGITS_KERNEL, ROUTE_DISPATCH_KERNEL,
    ROUTE_DISPATCH_LOGITS_KERNEL, ROUTE_KERNEL, ROUTE_LOGITS_KERNEL, RoutePlan, RouteTarget,
    RoutingConfig, SOURCE, SUM_PARTIALS_KERNEL, WeightKind,
};

use crate::error::CudaError;
use crate::ptx_cache::PtxCache;

/// The loaded module and its kernels.
#[derive(Debug)]
pub(crate) struct RouterModule {
    _module: Arc<CudaModule>,
    config: RoutingConfig,
    /// The routing kernels by name: the warp kernels, and the block-per-token ones that every
    /// ranked-score config has, with and without the layout of the ids (hash routing has only the
    /// warp kernels).
    routes: HashMap<&'static str, CudaFunction>,
    /// What the routing planner needs: whether `routes` has the block kernels, and the device's
    /// resident threads.
    route_target: RouteTarget,
    pub(crate) reset_status: CudaFunction,
    pub(crate) sum_partials: CudaFunction,
    /// The dispatch layout's many-block counting kernel.
    pub(crate) dispatch_count: CudaFunction,
    /// The dispatch layout's scatter kernel.
    pub(crate) dispatch_scatter: CudaFunction,
    /// The dispatch layout's distinct tokens per rank.
    pub(crate) dispatch_rank_tokens: CudaFunction,
    gemm: HashMap<GemmKernel, CudaFunction>,
}

impl RouterModule {
    /// Compiles the source with `config`'s defines for a device of compute capability
    /// `(major, minor)` (for the architecture-specific target where `warpgroup_mma` says the
    /// device has the warpgroup kernel) and loads every kernel; the tiles and warpgroup kernels may
    /// use up to `shared_memory_per_block` bytes of dynamic shared memory. `resident_threads`, the
    /// threads the device holds at once, bounds block-per-token routing. The PTX comes from
    /// `ptx_cache` where it holds this compilation's.
    pub(crate) fn compile(
        ctx: &Arc<CudaContext>,
        config: &RoutingConfig,
        (major, minor): (i32, i32),
        warpgroup_mma: bool,
        shared_memory_per_block: usize,
        resident_threads: usize,
        ptx_cache: &PtxCache,
    ) -> Result<Self, CudaError> {
        // `wgmma` exists only in code for the architecture-specific target.
        let suffix = if warpgroup_mma { "a" } else { "" };
        let mut options =
            vec![format!("--gpu-architecture=sm_{major}{minor}{suffix}"), "--std=c++17".into()];
        options.extend(config.compiler_options());
        let key = ptx_cache.key(&options, SOURCE);
        let ptx = ptx_cache.get_or_compile(&key, || {
            let _span = tracing::debug_span!("nvrtc_compile", ?options).entered();
            let ptx =
                compile_ptx_with_opts(SOURCE, CompileOptions { options, ..Default::default() })
                    .map_err(|error| CudaError::Compile {
                        config: format!("{config:?}"),
                        log: match error {
                            CompileError::CompileError { log, .. } => {
                                log.to_string_lossy().into_owned()
                            }
                            other => other.to_string(),
                        },
                    })?;
            ptx_text(&ptx).ok_or_else(|| CudaError::Compile {
                config: format!("{config:?}"),
                log: "NVRTC returned PTX that is not text".to_owned(),
            })
        })?;
        let ptx = Ptx::from_src(ptx);
        let module =
            ctx.load_module(ptx).map_err(CudaError::driver("loading the router kernels"))?;
        let load = |name: &str| {
            module.load_function(name).map_err(CudaError::driver("looking up a router kernel"))
        };
        let mut gemm = HashMap::new();
        for tokens_per_block in [1, 2, 4, 8] {
            for experts_per_block in [1, 2] {
                let kernel = GemmKernel::Gemv { tokens_per_block, experts_per_block };
                gemm.insert(kernel, load(&kernel.name())?);
            }
        }
        for hidden in [HiddenKind::Bf16, HiddenKind::F16, HiddenKind::F32] {
            for weight in [WeightKind::Bf16, WeightKind::F32] {
                let kernel = GemmKernel::Simt { hidden, weight };
                gemm.insert(kernel, load(&kernel.name())?);
            }
            // The tensor-core kernels exist from compute capability 8.0 on (`mma.sync` bf16).
            if major >= 8 {
                for tiles in [1, 2, 4, 8] {
                    let kernel = GemmKernel::Mma { hidden, tiles };
                    gemm.insert(kernel, load(&kernel.name())?);
                }
            }
        }
        // The tiles kernel, from compute capability 9.0 on (bulk copies), and the warpgroup
        // kernel, on 9.0, opt in to the device's most shared memory per block: their plans use up
        // to that much.
        let shared = i32::try_from(shared_memory_per_block).unwrap_or(i32::MAX);
        for (present, kernel) in
            [(major >= 9, GemmKernel::Tiles), (warpgroup_mma, GemmKernel::Warpgroup)]
        {
            if !present {
                continue;
            }
            let function = load(&kernel.name())?;
            function
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared,
                )
                .map_err(CudaError::driver("allowing a kernel its shared memory"))?;
            gemm.insert(kernel, function);
        }
        let block_kernels: &[&'static str] = if config.is_hashed() {
            &[]
        } else {
            &[
                ROUTE_BLOCK_KERNEL,
                ROUTE_BLOCK_LOGITS_KERNEL,
                ROUTE_DISPATCH_KERNEL,
                ROUTE_DISPATCH_LOGITS_KERNEL,
                DISPATCH_WORDS_KERNEL,
            ]
        };
        let mut routes = HashMap::new();
        for &name in [ROUTE_KERNEL, ROUTE_LOGITS_KERNEL].iter().chain(block_kernels) {
            routes.insert(name, load(name)?);
        }
        let route_target = RouteTarget {
            wave_width: NVIDIA_WAVE_WIDTH,
            block_kernels: routes.contains_key(ROUTE_BLOCK_KERNEL),
            resident_threads,
        };
        Ok(RouterModule {
            config: config.clone(),
            routes,
            route_target,
            reset_status: load(RESET_STATUS_KERNEL)?,
            sum_partials: load(SUM_PARTIALS_KERNEL)?,
            dispatch_count: load(DISPATCH_COUNT_KERNEL)?,
            dispatch_scatter: load(DISPATCH_SCATTER_KERNEL)?,
            dispatch_rank_tokens: load(DISPATCH_RANK_TOKENS_KERNEL)?,
            gemm,
            _module: module,
        })
    }

    /// The routing kernel and its launch for `tokens` tokens of logits given as `splits` partial
    /// sums.
    pub(crate) fn route(
        &self,
        tokens: usize,
        splits: usize,
    ) -> Result<(&CudaFunction, RoutePlan), CudaError> {
        let plan = sluice_kernels::plan_route(&self.config, tokens, &self.route_target)?;
        let name = plan.name(splits);
        let function =
            self.routes.get(name).ok_or_else(|| CudaError::MissingKernel(name.to_owned()))?;
        Ok((function, plan))
    }

    /// The fused routing and layout of `tokens` tokens, where this module has it for that call
    /// (block-per-token routing, no rank outputs), else `None`. Arithmetic only, as every gate
    /// call's workspace size asks: the plan routes a block per token only where the module has the
    /// block kernels, and the fused ones are loaded with them.
    pub(crate) fn fused_layout(&self, tokens: usize, rank_outputs: bool) -> Option<FusedLayout> {
        let plan = sluice_kernels::plan_route(&self.config, tokens, &self.route_target).ok()?;
        FusedLayout::plan(&plan, rank_outputs)
    }

    /// A fused kernel of this module (present whenever `fused_layout` planned one).
    pub(crate) fn route_dispatch(
        &self,
        fused: &FusedLayout,
        splits: usize,
    ) -> Result<&CudaFunction, CudaError> {
        let name = fused.name(splits);
        self.routes.get(name).ok_or_else(|| CudaError::MissingKernel(name.to_owned()))
    }

    /// The layout after a fused kernel past its last-block rows (present with the fused kernels).
    pub(crate) fn dispatch_words(&self) -> Result<&CudaFunction, CudaError> {
        self.routes
            .get(DISPATCH_WORDS_KERNEL)
            .ok_or_else(|| CudaError::MissingKernel(DISPATCH_WORDS_KERNEL.to_owned()))
    }

    /// A GEMM kernel of this module (every kernel the planner can name for this device is loaded).
    pub(crate) fn gemm(&self, kernel: GemmKernel) -> Result<&CudaFunction, CudaError> {
        self.gemm.get(&kernel).ok_or_else(|| CudaError::MissingKernel(kernel.name()))
    }
}

/// The text of PTX that NVRTC made (its image, up to the terminating NUL), or `None` if it is not
/// UTF-8.
fn ptx_text(ptx: &Ptx) -> Option<String> {
    let bytes = ptx.as_bytes()?;
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8(bytes[..end].to_vec()).ok()
}
