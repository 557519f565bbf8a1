//! Choosing a backend from the command line.

use clap::{Args, ValueEnum};
use sluice_backend_cpu::CpuBackend;
use sluice_tensor::Backend;

use crate::error::CliError;

/// The backends this build can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// All cores of this machine.
    Cpu,
}

/// `--backend` and `--threads`, shared by every command that computes.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl BackendArgs {
    /// Builds the chosen backend.
    pub fn build(&self) -> Result<Box<dyn Backend>, CliError> {
        match self.backend {
            BackendKind::Cpu => {
                let mut builder = CpuBackend::builder();
                if let Some(threads) = self.threads {
                    builder = builder.threads(threads);
                }
                let backend = builder.build().map_err(|e| CliError::Input(e.to_string()))?;
                tracing::info!(kernel = ?backend.kernel(), threads = backend.threads(), "cpu backend");
                Ok(Box::new(backend))
            }
        }
    }
}
