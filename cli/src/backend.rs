//! Choosing a backend from the command line.

use clap::{Args, ValueEnum};
use sluice_backend_cpu::{CpuBackend, DEFAULT_MAX_TOKENS};
use sluice_backend_cuda::CudaBackend;
use sluice_backend_rocm::RocmBackend;
use sluice_tensor::{Backend, BackendError};

use crate::error::CliError;

/// The backends this build can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// All cores of this machine.
    Cpu,
    /// An NVIDIA GPU (`--device` picks which); needs the driver and NVRTC, loaded at run time.
    Cuda,
    /// An AMD Instinct GPU (`--device` picks which); needs the HIP runtime, loaded at run time,
    /// and routes the configs compiled ahead of time (`sluice info` lists them).
    Rocm,
}

/// `--backend`, `--threads` and `--max-tokens`, shared by every command that computes.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The most tokens one call may route; more are refused before anything is allocated.
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    pub max_tokens: usize,
    /// The GPU ordinal (`--backend cuda` or `rocm`).
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

impl BackendArgs {
    /// Builds the chosen backend.
    pub fn build(&self) -> Result<Box<dyn Backend>, CliError> {
        match self.backend {
            BackendKind::Cpu => {
                let mut builder = CpuBackend::builder().max_tokens(self.max_tokens);
                if let Some(threads) = self.threads {
                    builder = builder.threads(threads);
                }
                let backend = builder.build().map_err(|e| CliError::Input(e.to_string()))?;
                tracing::info!(
                    kernel = ?backend.kernel(),
                    threads = backend.threads(),
                    max_tokens = backend.max_tokens(),
                    "cpu backend"
                );
                Ok(Box::new(backend))
            }
            BackendKind::Cuda => Ok(Box::new(self.cuda()?)),
            BackendKind::Rocm => Ok(Box::new(self.rocm()?)),
        }
    }

    /// The ROCm backend on `--device`.
    pub fn rocm(&self) -> Result<RocmBackend, CliError> {
        let backend = RocmBackend::new(self.device).map_err(BackendError::from)?;
        tracing::info!(
            device = self.device,
            name = backend.device_name(),
            hip = %backend.runtime_version(),
            "rocm backend"
        );
        Ok(backend)
    }

    /// The CUDA backend on `--device`.
    pub fn cuda(&self) -> Result<CudaBackend, CliError> {
        let backend = CudaBackend::new(self.device).map_err(BackendError::from)?;
        tracing::info!(
            device = self.device,
            compute_capability = ?backend.compute_capability(),
            multiprocessors = backend.multiprocessors(),
            "cuda backend"
        );
        Ok(backend)
    }

    /// Refuses a token count above `--max-tokens` the way the backend would, for commands that
    /// make their own hidden states: before those are allocated.
    pub fn check_tokens(&self, command: &'static str, tokens: usize) -> Result<(), CliError> {
        if tokens > self.max_tokens {
            return Err(BackendError::TooManyTokens {
                op: command,
                tokens,
                limit: self.max_tokens,
            }
            .into());
        }
        Ok(())
    }
}
