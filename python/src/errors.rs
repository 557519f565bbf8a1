//! sluice's typed errors as Python exceptions, with sluice's messages: `BufferError` when the
//! bridge refuses a tensor (it requires grad, or is read-only where it would be written),
//! `OSError` when a file cannot be read, `RuntimeError` when the CUDA backend cannot start (no
//! driver, no NVRTC, no such device), `ValueError` for every other bad input.

use pyo3::PyErr;
use pyo3::exceptions::{PyBufferError, PyOSError, PyRuntimeError, PyValueError};
use sluice_backend_cuda::CudaError;
use sluice_models::{CheckpointError, ConfigError, ModelError};
use sluice_tensor::{BackendError, DlpackError};

/// A bridge refusal, or any other invalid DLPack tensor.
pub(crate) fn dlpack(error: DlpackError) -> PyErr {
    match error {
        DlpackError::RequiresGrad | DlpackError::ReadOnly => {
            PyBufferError::new_err(error.to_string())
        }
        _ => PyValueError::new_err(error.to_string()),
    }
}

/// Anything between a checkpoint folder and routed tokens.
pub(crate) fn model(error: ModelError) -> PyErr {
    let message = error.to_string();
    match error {
        ModelError::Dlpack(source) | ModelError::Backend(BackendError::Argument { source, .. }) => {
            match source {
                DlpackError::RequiresGrad | DlpackError::ReadOnly => {
                    PyBufferError::new_err(message)
                }
                _ => PyValueError::new_err(message),
            }
        }
        ModelError::Config(ConfigError::Read { .. })
        | ModelError::Checkpoint(
            CheckpointError::Io { .. } | CheckpointError::Config(ConfigError::Read { .. }),
        ) => PyOSError::new_err(message),
        _ => PyValueError::new_err(message),
    }
}

/// The CUDA backend could not start on this machine: the driver or NVRTC is missing, or the device
/// is not there. Nothing the caller passed is at fault, so it is not a `ValueError`.
pub(crate) fn cuda(error: CudaError) -> PyErr {
    PyRuntimeError::new_err(error.to_string())
}
