//! The backends from Python: the CPU backend's settings (and the one gates use when given none),
//! and the CUDA backend, which only starts where a driver is.

use std::sync::OnceLock;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use sluice_backend_cpu::CpuBackend;
use sluice_backend_cuda::CudaBackend;

use crate::errors;

/// A CPU backend: its worker threads and how long they spin between calls.
#[pyclass(frozen, module = "sluice._sluice", name = "CpuBackend")]
pub(crate) struct PyCpuBackend {
    pub(crate) backend: CpuBackend,
}

/// A duration in whole microseconds, as Python sees the spin setting.
pub(crate) fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[pymethods]
impl PyCpuBackend {
    /// `threads`: threads to compute with, the caller's included (default: available cores).
    /// `idle_spin_us`: how long idle workers spin for the next call before they park.
    /// `max_tokens`: the most tokens one call may take.
    #[new]
    #[pyo3(signature = (*, threads=None, idle_spin_us=None, max_tokens=None))]
    fn new(
        threads: Option<usize>,
        idle_spin_us: Option<u64>,
        max_tokens: Option<usize>,
    ) -> PyResult<Self> {
        let mut builder = CpuBackend::builder();
        if let Some(threads) = threads {
            builder = builder.threads(threads);
        }
        if let Some(spin) = idle_spin_us {
            builder = builder.idle_spin(Duration::from_micros(spin));
        }
        if let Some(max_tokens) = max_tokens {
            builder = builder.max_tokens(max_tokens);
        }
        let backend = builder.build().map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PyCpuBackend { backend })
    }

    /// Threads the backend computes with.
    #[getter]
    fn threads(&self) -> usize {
        self.backend.threads()
    }

    /// How long idle workers spin between calls, in microseconds.
    #[getter]
    fn idle_spin_us(&self) -> u64 {
        micros(self.backend.idle_spin())
    }

    fn __repr__(&self) -> String {
        format!(
            "sluice.CpuBackend(threads={}, idle_spin_us={}, kernel={})",
            self.backend.threads(),
            self.idle_spin_us(),
            self.backend.kernel()
        )
    }
}

/// The CUDA backend on one device: its context (the device's primary context, the one torch
/// uses), the router kernels it compiled, and its own stream for preparation.
///
/// The driver and NVRTC are loaded when one is made, so the module imports on machines without
/// CUDA and only making one fails there (`RuntimeError`, sluice's message).
#[pyclass(frozen, module = "sluice._sluice", name = "CudaBackend")]
pub(crate) struct PyCudaBackend {
    pub(crate) backend: CudaBackend,
    ordinal: usize,
}

#[pymethods]
impl PyCudaBackend {
    /// The backend on CUDA device `ordinal` (torch's `cuda:<ordinal>`).
    #[new]
    #[pyo3(signature = (ordinal=0))]
    fn new(py: Python<'_>, ordinal: usize) -> PyResult<Self> {
        let backend = py.detach(|| CudaBackend::new(ordinal)).map_err(errors::cuda)?;
        Ok(PyCudaBackend { backend, ordinal })
    }

    /// The device ordinal.
    #[getter]
    fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's compute capability `(major, minor)`.
    #[getter]
    fn compute_capability(&self) -> (i32, i32) {
        self.backend.compute_capability()
    }

    fn __repr__(&self) -> String {
        let (major, minor) = self.backend.compute_capability();
        format!(
            "sluice.CudaBackend(ordinal={}, compute_capability={major}.{minor}, multiprocessors={})",
            self.ordinal,
            self.backend.multiprocessors()
        )
    }
}

/// The backend of gates made without one: built with the defaults on first use, then shared.
pub(crate) fn default_backend() -> PyResult<&'static CpuBackend> {
    static DEFAULT: OnceLock<CpuBackend> = OnceLock::new();
    if let Some(backend) = DEFAULT.get() {
        return Ok(backend);
    }
    let backend = CpuBackend::new().map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(DEFAULT.get_or_init(|| backend))
}
