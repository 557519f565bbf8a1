//! Output buffers: allocated without aborting on failure, handed out as owned DLPack tensors.

use sluice_tensor::dlpack::export_vec;
use sluice_tensor::{BackendError, Dlpack, Element};

/// A vector of `len` default values; an allocation failure becomes an error, not an abort.
pub(crate) fn filled<T: Copy + Default>(
    op: &'static str,
    len: usize,
) -> Result<Vec<T>, BackendError> {
    let mut data = Vec::new();
    data.try_reserve_exact(len).map_err(|_| out_of_memory(op, len * size_of::<T>()))?;
    data.resize(len, T::default());
    Ok(data)
}

/// The error for a failed allocation of `bytes`.
pub(crate) fn out_of_memory(op: &'static str, bytes: usize) -> BackendError {
    BackendError::Device { backend: "cpu", message: format!("{op}: cannot allocate {bytes} bytes") }
}

/// Hands `data` over as a host DLPack tensor of `shape` (no copy).
pub(crate) fn export<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Dlpack, BackendError> {
    Ok(export_vec(data, shape)?)
}
