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
        match self {
            _ if self.is_supported() => None,
            CpuKernel::Avx512Bf16 => Some("avx512f, avx512bf16"),
            _ => Some("avx2, fma"),
        }
    }

    /// Whether this family can run on this CPU.
    pub fn is_supported(self) -> bool {
        Isa::detect(self).is_some()
    }

    /// The concrete family `Auto` stands for on this CPU; a concrete family is returned unchanged.
    pub fn resolve(self) -> CpuKernel {
        Isa::detect(self).map_or(self, Isa::family)
    }
}

impl fmt::Display for CpuKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A concrete kernel family that run-time feature detection found on this CPU, carrying the proof.
///
/// This is what the code paths hold once the configured [`CpuKernel`] is resolved. The SIMD
/// variants carry tokens that only [`Isa::detect`] can create, and every `#[target_feature]`
/// entry point takes (or is only handed out for) its family's token: so the `SAFETY` comments
/// that call AVX-512 or AVX2 code rest on a value that cannot exist on a CPU without those
/// instructions, not on a convention about an enum.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F and AVX-512 BF16.
    Avx512Bf16(Avx512Bf16Token),
    /// AVX2 and FMA.
    Avx2Fma(Avx2FmaToken),
    /// Portable code; needs nothing.
    Scalar,
}

/// Proof that the running CPU supports AVX-512F and AVX-512 BF16. Zero-sized; the private field
/// keeps its only constructor in [`Isa::detect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx512Bf16Token(());

/// Proof that the running CPU supports AVX2 and FMA. Zero-sized; the private field keeps its only
/// constructor in [`Isa::detect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2FmaToken(());

impl Isa {
    /// The concrete family `kernel` stands for on this CPU (the fastest supported one for
    /// [`CpuKernel::Auto`]), or `None` if the CPU lacks its instructions.
    pub(crate) fn detect(kernel: CpuKernel) -> Option<Isa> {
        match kernel {
            CpuKernel::Auto => CpuKernel::CONCRETE.into_iter().find_map(Isa::detect),
            CpuKernel::Avx512Bf16 => {
                has_avx512_bf16().then_some(Isa::Avx512Bf16(Avx512Bf16Token(())))
            }
            CpuKernel::Avx2Fma => has_avx2_fma().then_some(Isa::Avx2Fma(Avx2FmaToken(()))),
            CpuKernel::Scalar => Some(Isa::Scalar),
        }
    }

    /// The configuration value naming this family.
    pub(crate) const fn family(self) -> CpuKernel {
        match self {
            Isa::Avx512Bf16(_) => CpuKernel::Avx512Bf16,
            Isa::Avx2Fma(_) => CpuKernel::Avx2Fma,
            Isa::Scalar => CpuKernel::Scalar,
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.family().name())
    }
}

/// As the family it proves (`Avx512Bf16`), so that a backend prints as it did with the enum.
impl fmt::Debug for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.family(), f)
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

/// What the unit tests of the SIMD paths use to run once per kernel family.
///
/// A test of a family the CPU lacks cannot run, and `#[ignore]` cannot say so: it is decided at
/// compile time, and `cfg(target_feature = ...)` describes the build target, not the CPU running
/// the tests (a default build would ignore the AVX-512 tests on every machine). So each family
/// gets its own test, named after it ([`family_tests!`]), and one that cannot run writes a skip
/// line straight to the process's stderr: the test harness captures `eprintln!` of passing tests,
/// but not writes to the stream itself, so the line shows in plain `cargo test` output.
#[cfg(test)]
pub(crate) mod testing {
    use std::cell::RefCell;
    use std::io::Write;

    use super::{CpuKernel, Isa};

    thread_local! {
        /// The families reported skipped for the test running on this thread: the harness runs
        /// each test on a thread of its own, and a test that asks many times (a property test)
        /// is reported once.
        static REPORTED: RefCell<Vec<CpuKernel>> = const { RefCell::new(Vec::new()) };
    }

    /// The family's proof on this CPU, or `None` after telling the test run (once per test) that
    /// the current test skips the family and why.
    pub(crate) fn detect_or_report_skip(kernel: CpuKernel) -> Option<Isa> {
        let isa = Isa::detect(kernel);
        let first_time = || {
            REPORTED.with_borrow_mut(|reported| {
                let first = !reported.contains(&kernel);
                if first {
                    reported.push(kernel);
                }
                first
            })
        };
        if isa.is_none() && first_time() {
            let test = std::thread::current().name().unwrap_or("a test").to_owned();
            let missing = kernel.missing_features().unwrap_or_default();
            let line = format!(
                "SKIPPED {test}: the {kernel} kernel needs {missing}, which this CPU lacks\n"
            );
            // One write, so that parallel tests do not interleave within the line. A failed
            // write to stderr leaves nothing better to report it to.
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        isa
    }

    /// Declares, for each named function `fn(Isa)`, one test per concrete kernel family, in
    /// modules `avx512_bf16`, `avx2_fma` and `scalar`; a family the CPU lacks is reported as
    /// skipped (see the module's doc).
    macro_rules! family_tests {
        ($($check:ident),+ $(,)?) => {
            $crate::kernel::testing::family_tests!(@family avx512_bf16, Avx512Bf16, $($check),+);
            $crate::kernel::testing::family_tests!(@family avx2_fma, Avx2Fma, $($check),+);
            $crate::kernel::testing::family_tests!(@family scalar, Scalar, $($check),+);
        };
        (@family $module:ident, $kernel:ident, $($check:ident),+) => {
            mod $module {
                $(
                    #[test]
                    fn $check() {
                        let kernel = $crate::CpuKernel::$kernel;
                        if let Some(isa) = $crate::kernel::testing::detect_or_report_skip(kernel) {
                            super::$check(isa);
                        }
                    }
                )+
            }
        };
    }
    pub(crate) use family_tests;

    // `family_tests!` names the families one by one: a new family must be added there too.
    const _: () = assert!(CpuKernel::CONCRETE.len() == 3);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_hands_out_the_family_asked_for() {
        for kernel in CpuKernel::CONCRETE {
            if let Some(isa) = Isa::detect(kernel) {
                assert_eq!(isa.family(), kernel);
                assert_eq!(kernel.resolve(), kernel);
            }
        }
        assert_eq!(Isa::detect(CpuKernel::Scalar), Some(Isa::Scalar));
        assert_eq!(Isa::detect(CpuKernel::Auto).map(Isa::family), Some(CpuKernel::Auto.resolve()));
    }

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
