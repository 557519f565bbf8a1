//! One AMD GPU as the backend holds it: the device, the backend's own stream (for the synchronous
//! conveniences only) and the code objects loaded per routing config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sluice_kernels::{AMD_WAVE_WIDTH, GpuTarget, RoutingConfig, offline_config_for};
use sluice_tensor::RoutingSpec;

use crate::code_objects;
use crate::device::{LoadedModule, RocmDevice};
use crate::error::RocmError;
use crate::stream::HipStream;

#[derive(Debug)]
pub(crate) struct Gpu {
    pub(crate) device: Arc<RocmDevice>,
    /// The stream of the synchronous convenience calls (`route`, `upload`, ...).
    pub(crate) stream: HipStream,
    modules: Mutex<HashMap<&'static str, Arc<LoadedModule>>>,
}

/// What the GEMM planner needs to know about an AMD Instinct GPU. There are no tensor-core,
/// tiles or warpgroup kernels on AMD, and the scalar kernel's plan depends neither on the compute-unit
/// count nor on shared memory.
pub(crate) const TARGET: GpuTarget = GpuTarget {
    wave_width: AMD_WAVE_WIDTH,
    tensor_cores: false,
    multiprocessors: 1,
    bulk_copies: false,
    warpgroup_mma: false,
    shared_memory_per_block: 0,
};

impl Gpu {
    pub(crate) fn open(ordinal: usize) -> Result<Self, RocmError> {
        let device = Arc::new(RocmDevice::open(ordinal)?);
        let stream = HipStream::new(Arc::clone(&device))?;
        Ok(Gpu { device, stream, modules: Mutex::new(HashMap::new()) })
    }

    pub(crate) fn ordinal(&self) -> usize {
        self.device.ordinal()
    }

    /// The module of the embedded config that routes `spec`, loaded on first use and cached; a
    /// config that was not compiled ahead of time is [`RocmError::ConfigNotEmbedded`].
    pub(crate) fn module(&self, spec: &RoutingSpec) -> Result<Arc<LoadedModule>, RocmError> {
        self.module_named(embedded_config(spec)?)
    }

    /// The module for the router GEMM alone: every embedded object holds the GEMM kernels, so the
    /// first config's serves.
    pub(crate) fn gemm_module(&self) -> Result<Arc<LoadedModule>, RocmError> {
        let first =
            code_objects::configs().first().copied().ok_or(RocmError::BuiltWithoutKernels)?;
        self.module_named(first)
    }

    fn module_named(&self, name: &'static str) -> Result<Arc<LoadedModule>, RocmError> {
        let mut modules = self.modules.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(module) = modules.get(name) {
            return Ok(Arc::clone(module));
        }
        let _span = tracing::debug_span!("hip_module_load", config = name).entered();
        let module = Arc::new(self.device.load(name)?);
        modules.insert(name, Arc::clone(&module));
        Ok(module)
    }
}

/// The name of the embedded config that routes `spec`: a spec the kernels cannot route is a
/// [`RocmError::Kernel`], one they could but this build did not compile ahead of time (or a build
/// without kernels) [`RocmError::ConfigNotEmbedded`], naming the configs it embeds. Needs no
/// device: callers can tell which specs this build routes before opening one.
pub fn embedded_config(spec: &RoutingSpec) -> Result<&'static str, RocmError> {
    let config = RoutingConfig::new(spec)?;
    offline_config_for(&config)
        .map(|offline| offline.name)
        .filter(|name| code_objects::configs().contains(name))
        .ok_or_else(|| RocmError::ConfigNotEmbedded {
            config: spec.to_string(),
            embedded: code_objects::configs().join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_tensor::{ScoringFunc, TopkMethod};

    fn spec(experts: usize, groups: (usize, usize), top_k: usize) -> RoutingSpec {
        RoutingSpec::builder(experts, top_k)
            .scoring(ScoringFunc::Sigmoid)
            .method(TopkMethod::NoauxTc)
            .groups(groups.0, groups.1)
            .norm_topk_prob(true)
            .routed_scaling_factor(2.5)
            .build()
            .unwrap()
    }

    #[test]
    fn every_kernel_the_amd_plan_can_name_is_in_every_code_object() {
        use sluice_kernels::{DeviceMatrix, HIDDEN_DTYPES, WEIGHT_DTYPES, plan_router_gemm};
        let matrix = |ptr, rows, dtype| DeviceMatrix {
            ptr,
            rows,
            cols: 7168,
            row_stride: 7168,
            col_stride: 1,
            dtype,
        };
        // Routing, and every kernel the dispatch layout enqueues.
        let mut named: Vec<String> = [
            sluice_kernels::ROUTE_KERNEL,
            sluice_kernels::DISPATCH_COUNT_KERNEL,
            sluice_kernels::DISPATCH_SCATTER_KERNEL,
            sluice_kernels::DISPATCH_RANK_TOKENS_KERNEL,
        ]
        .map(str::to_owned)
        .into();
        for &x in HIDDEN_DTYPES {
            for &w in WEIGHT_DTYPES {
                // Aligned and unaligned rows, few and many tokens, one split or as many as wanted.
                for (ptr, tokens, splits) in [(4096, 1, usize::MAX), (4098, 3000, 1)] {
                    let plan = plan_router_gemm(
                        &TARGET,
                        &matrix(ptr, tokens, x),
                        &matrix(0, 256, w),
                        splits,
                    )
                    .unwrap();
                    assert_eq!(plan.splits, 1, "the partials are the logits on AMD");
                    named.push(plan.kernel.name());
                }
            }
        }
        for object in code_objects::CODE_OBJECTS {
            let kernels = object.inspect().unwrap().kernels;
            for name in &named {
                assert!(
                    kernels.contains(name),
                    "{name} missing from {}.{}",
                    object.config,
                    object.arch
                );
            }
        }
    }

    #[test]
    fn specs_map_to_embedded_configs_or_a_refusal_that_lists_them() {
        let v3 = embedded_config(&spec(256, (8, 4), 8));
        let generic = embedded_config(&spec(128, (4, 2), 4)).unwrap_err();
        if !code_objects::built_with_kernels() {
            assert!(matches!(v3, Err(RocmError::ConfigNotEmbedded { .. })), "{v3:?}");
            return;
        }
        assert_eq!(v3.unwrap(), "deepseek_v3");
        let message = generic.to_string();
        assert!(matches!(generic, RocmError::ConfigNotEmbedded { .. }));
        for name in ["deepseek_v3", "kimi_k2", "deepseek_v2", "deepseek_v2_lite"] {
            assert!(message.contains(name), "{message}");
        }
        assert!(message.contains("E=128"), "{message}");
        // A spec the kernels cannot route at all is the kernels' error, not a missing config.
        let too_many = embedded_config(&spec(2048, (1, 1), 8));
        assert!(matches!(too_many, Err(RocmError::Kernel(_))), "{too_many:?}");
    }
}
