//! Output buffers: allocated without aborting on failure, handed out as owned DLPack tensors.

use sluice_tensor::{BackendError, Dlpack, Element, export_vec};

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
    BackendError::OutOfMemory { op, bytes }
}

/// Hands `data` over as the host DLPack output `arg` of `shape` (no copy).
pub(crate) fn export<T: Element>(
    arg: &'static str,
    data: Vec<T>,
    shape: &[usize],
) -> Result<Dlpack, BackendError> {
    export_vec(data, shape).map_err(|source| BackendError::Argument { op: "export", arg, source })
}
