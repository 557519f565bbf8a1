//! Arguments that live on this backend's device, as validated views: the operand rules both GPU
//! backends share, from `sluice-kernels`.

pub(crate) use sluice_kernels::{
    DeviceMatrix, check_device, check_dtype, matrix, output_rows, token_ids,
};
