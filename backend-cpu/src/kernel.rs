//! Which instruction set the router GEMM runs on, chosen at run time.

use std::fmt;

/// The GEMM kernel family a [`CpuBackend`](crate::CpuBackend) uses.
///
/// Every family computes the same thing (f32 logits, f32 accumulation, f32 inputs never rounded to
/// bf16) and passes the same tests; they differ in speed only. [`CpuKernel::Auto`] picks the
/// fastest one the CPU supports. Forcing a family the CPU lacks is refused when the backend is
/// built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CpuKernel {
    /// The fastest family this CPU supports.
    #[default]
    Auto,
    /// AVX-512F with AVX-512 BF16: `vdpbf16ps` for bf16 × bf16, 512-bit FMA for f32 inputs.
    Avx512Bf16,
    /// AVX2 with FMA: 256-bit FMA; bf16 values are widened to f32 exactly.
    Avx2Fma,
    /// Portable Rust, no target-specific instructions.
    Scalar,
}

impl CpuKernel {
    /// Every concrete family, fastest first.
    pub const CONCRETE: [CpuKernel; 3] =
        [CpuKernel::Avx512Bf16, CpuKernel::Avx2Fma, CpuKernel::Scalar];

    /// A short name for messages and benchmarks.
    pub const fn name(self) -> &'static str {
        match self {
            CpuKernel::Auto => "auto",
            CpuKernel::Avx512Bf16 => "avx512-bf16",
            CpuKernel::Avx2Fma => "avx2-fma",
            CpuKernel::Scalar => "scalar",
        }
    }

    /// The CPU features this family needs that the running CPU lacks, or `None` if it can run
    /// here. `Auto` and `Scalar` can always run.
    pub fn missing_features(self) -> Option<&'static str> {
        let supported = match self {
            CpuKernel::Auto | CpuKernel::Scalar => true,
            CpuKernel::Avx512Bf16 => has_avx512_bf16(),
            CpuKernel::Avx2Fma => has_avx2_fma(),
        };
        if supported {
            return None;
        }
        Some(match self {
            CpuKernel::Avx512Bf16 => "avx512f, avx512bf16",
            _ => "avx2, fma",
        })
    }

    /// Whether this family can run on this CPU.
    pub fn is_supported(self) -> bool {
        self.missing_features().is_none()
    }

    /// The concrete family `Auto` stands for on this CPU; a concrete family is returned unchanged.
    pub fn resolve(self) -> CpuKernel {
        match self {
            CpuKernel::Auto => CpuKernel::CONCRETE
                .into_iter()
                .find(|kernel| kernel.is_supported())
                .unwrap_or(CpuKernel::Scalar),
            concrete => concrete,
        }
    }
}

impl fmt::Display for CpuKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512_bf16() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2_fma() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_to_a_supported_concrete_family() {
        let kernel = CpuKernel::Auto.resolve();
        assert_ne!(kernel, CpuKernel::Auto);
        assert!(kernel.is_supported());
        // Nothing faster than the chosen family is supported.
        for faster in CpuKernel::CONCRETE.iter().take_while(|k| **k != kernel) {
            assert!(!faster.is_supported(), "{faster} is supported but {kernel} was chosen");
        }
    }

    #[test]
    fn scalar_runs_everywhere_and_missing_features_are_named() {
        assert!(CpuKernel::Scalar.is_supported());
        for kernel in CpuKernel::CONCRETE {
            if let Some(missing) = kernel.missing_features() {
                assert!(missing.contains("avx"), "{kernel}: {missing}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_bf16_implies_avx2_fma_on_real_cpus() {
        if CpuKernel::Avx512Bf16.is_supported() {
            assert!(CpuKernel::Avx2Fma.is_supported());
        }
    }
}
