//! Why the CUDA backend could not start or run.

use cudarc::driver::DriverError;
use sluice_kernels::KernelError;
use sluice_tensor::BackendError;
use thiserror::Error;

/// A failure of the CUDA backend itself (as opposed to bad arguments, which are
/// [`BackendError`]s).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No CUDA driver library could be loaded on this machine.
    #[error("no CUDA driver found (libcuda.so could not be loaded)")]
    NoDriver,
    /// The NVRTC library could not be loaded.
    #[error(
        "NVRTC not found (libnvrtc.so could not be loaded); the kernels are compiled at run time"
    )]
    NoNvrtc,
    /// The driver loaded but has no device with that ordinal.
    #[error("CUDA device {ordinal} not available: {source}")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// The driver's answer.
        source: DriverError,
    },
    /// A driver call failed.
    #[error("CUDA driver call failed while {doing}: {source}")]
    Driver {
        /// What the backend was doing.
        doing: &'static str,
        /// The driver's error.
        source: DriverError,
    },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt call failed while {doing}: {source}")]
    Cublas {
        /// What the backend was doing.
        doing: &'static str,
        /// The library's status.
        source: cudarc::cublaslt::result::CublasError,
    },
    /// NVRTC refused the kernel source.
    #[error("NVRTC could not compile the router kernels for {config}: {log}")]
    Compile {
        /// The routing config (or "the router GEMM").
        config: String,
        /// The compiler's log.
        log: String,
    },
    /// A kernel the plan names was not built for this device (the tensor-core kernels need
    /// compute capability 8.0).
    #[error("the kernel {0} is not built for this device")]
    MissingKernel(String),
    /// A stream handle was refused.
    #[error(transparent)]
    Stream(#[from] sluice_tensor::StreamError),
    /// A graph capture recorded no work.
    #[error("the CUDA graph capture recorded no work")]
    EmptyCapture,
    /// The routing config or a shape is outside what the kernels take.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

impl CudaError {
    pub(crate) fn driver(doing: &'static str) -> impl FnOnce(DriverError) -> CudaError {
        move |source| CudaError::Driver { doing, source }
    }
}

impl From<CudaError> for BackendError {
    fn from(error: CudaError) -> Self {
        match error {
            CudaError::Kernel(KernelError::Spec(spec)) => BackendError::Spec(spec),
            other => BackendError::Device { backend: "cuda", message: other.to_string() },
        }
    }
}
