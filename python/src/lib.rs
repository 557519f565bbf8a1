//! `sluice._sluice`, the native half of the `sluice` Python package: DeepSeek and Kimi MoE gates
//! that take and return tensors of any DLPack producer (torch is the tested one), zero-copy, on
//! the CPU or a CUDA device. The CUDA backend loads the driver and NVRTC when one is made, so the
//! module imports everywhere and only choosing CUDA fails where there is none.
//!
//! Every tensor enters through [`tensor::import`], which carries the producer's `requires_grad`
//! into the sluice tensor, so sluice's own bridge decides what may reach a backend; the gate
//! detaches at that door, as [`MoeGate`](sluice_models::MoeGate) does in Rust.

mod backend;
mod errors;
mod gate;
mod tensor;

use pyo3::prelude::*;

#[pymodule]
fn _sluice(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<tensor::PyTensor>()?;
    module.add_class::<gate::Gate>()?;
    module.add_class::<backend::PyCpuBackend>()?;
    module.add_class::<backend::PyCudaBackend>()?;
    module.add("DEFAULT_IDLE_SPIN_US", backend::micros(sluice_backend_cpu::DEFAULT_IDLE_SPIN))?;
    Ok(())
}
