//! Configuration of a [`CpuBackend`]: threads, kernel family, token limit.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::engine::Engine;
use crate::kernel::Isa;
use crate::{CpuBackend, CpuKernel};

/// The default limit on tokens per call.
pub const DEFAULT_MAX_TOKENS: usize = 1 << 20;

/// How long idle worker threads spin for the next call before they park, by default: long enough
/// that calls made back to back (a benchmark, layer after layer) find them awake, short enough
/// that a caller who computes between two calls (an engine's experts) loses at most this much of
/// one core per call. Measured in BENCHMARKS.md: a 2 ms spin made a gate-then-matmul loop slower
/// than the two alone.
pub const DEFAULT_IDLE_SPIN: Duration = Duration::from_micros(50);

/// Builds a [`CpuBackend`]. Defaults: one thread per available core, [`CpuKernel::Auto`], at most
/// [`DEFAULT_MAX_TOKENS`] tokens per call, workers that spin [`DEFAULT_IDLE_SPIN`] between calls.
#[derive(Debug, Clone)]
pub struct CpuBackendBuilder {
    threads: Option<usize>,
    kernel: CpuKernel,
    max_tokens: usize,
    idle_spin: Duration,
}

impl Default for CpuBackendBuilder {
    fn default() -> Self {
        CpuBackendBuilder {
            threads: None,
            kernel: CpuKernel::Auto,
            max_tokens: DEFAULT_MAX_TOKENS,
            idle_spin: DEFAULT_IDLE_SPIN,
        }
    }
}

/// Why a [`CpuBackend`] could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CpuBuildError {
    /// The forced kernel family needs CPU features this CPU lacks.
    #[error("the {kernel} kernel needs CPU features this CPU lacks: {missing}")]
    KernelUnavailable {
        /// The family asked for.
        kernel: CpuKernel,
        /// The features it needs.
        missing: &'static str,
    },
    /// Zero threads, or a zero token limit.
    #[error("`{field}` must be at least 1, got 0")]
    Zero {
        /// The setting.
        field: &'static str,
    },
    /// The worker threads could not be started.
    #[error("cannot start the CPU backend's worker threads: {0}")]
    ThreadPool(#[from] std::io::Error),
}

impl CpuBackendBuilder {
    /// Threads to compute with, the calling thread included (default: available cores).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// The kernel family (default [`CpuKernel::Auto`]). A family the CPU lacks makes
    /// [`build`](Self::build) fail.
    pub fn kernel(mut self, kernel: CpuKernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The most tokens one call may take; larger calls fail with
    /// [`BackendError::TooManyTokens`](sluice_tensor::BackendError::TooManyTokens) before
    /// allocating anything.
    pub fn max_tokens(mut self, max_tokens: usize) -> Self {
        self.max_tokens = max_tokens;
        self
    }

    /// How long the worker threads spin, waiting for the next call, before they park (default
    /// [`DEFAULT_IDLE_SPIN`]). Spinning saves the wake-up of a parked thread (tens of
    /// microseconds on a virtual machine) when calls come back to back, but it holds cores that
    /// the caller's own work between two calls (an engine's experts, its own thread pool) may
    /// need. `Duration::ZERO` parks at once.
    pub fn idle_spin(mut self, idle_spin: Duration) -> Self {
        self.idle_spin = idle_spin;
        self
    }

    /// Checks the settings, resolves the kernel family and starts the worker threads.
    pub fn build(self) -> Result<CpuBackend, CpuBuildError> {
        let Some(kernel) = Isa::detect(self.kernel) else {
            let missing = self.kernel.missing_features().unwrap_or_default();
            return Err(CpuBuildError::KernelUnavailable { kernel: self.kernel, missing });
        };
        let threads = match self.threads {
            Some(0) => return Err(CpuBuildError::Zero { field: "threads" }),
            Some(threads) => threads,
            None => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        };
        if self.max_tokens == 0 {
            return Err(CpuBuildError::Zero { field: "max_tokens" });
        }
        tracing::debug!(
            %kernel,
            threads,
            max_tokens = self.max_tokens,
            idle_spin = ?self.idle_spin,
            "cpu backend"
        );
        let engine = Engine::new(kernel, threads, self.max_tokens, self.idle_spin)?;
        Ok(CpuBackend { engine: Arc::new(engine) })
    }
}
