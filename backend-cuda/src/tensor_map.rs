//! Tensor maps for the warpgroup kernel: the copy unit's description of the hidden states and the
//! weight, made by the driver on the host for each call (the hidden states' address and token
//! count change from call to call) and passed to the kernel by value. Encoding one touches no
//! device and no stream, so it is allowed while a stream is being captured.

use cudarc::driver::sys::{
    CUresult, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
    CUtensorMapL2promotion, CUtensorMapSwizzle, cuTensorMapEncodeTiled,
};
use sluice_kernels::{DeviceMatrix, TensorMap, WG_EXPERTS, WG_K, WarpgroupMaps};

use crate::error::CudaError;

/// The warpgroup kernel's two maps for a call on `hidden` `[T, H]` with `weight` `[E, H]`, both
/// bf16 with rows that start on 16 bytes and unit column stride (what the planner requires of the
/// kernel), the hidden states' read `token_rows` rows at a time.
pub(crate) fn warpgroup_maps(
    hidden: &DeviceMatrix,
    weight: &DeviceMatrix,
    token_rows: usize,
) -> Result<WarpgroupMaps, CudaError> {
    Ok(WarpgroupMaps { hidden: encode(hidden, token_rows)?, weight: encode(weight, WG_EXPERTS)? })
}

/// A bf16 matrix as a 2-D tensor, k innermost, read in boxes of [`WG_K`] values by `box_rows`
/// rows, 128-byte swizzle (a box row is 128 bytes: what `wgmma` reads without bank conflicts),
/// zeros for whatever a box holds past the matrix.
fn encode(matrix: &DeviceMatrix, box_rows: usize) -> Result<TensorMap, CudaError> {
    let element = matrix.dtype.size_in_bytes() as u64;
    let dims = [matrix.cols as u64, matrix.rows as u64];
    let row_bytes = [matrix.row_stride as u64 * element];
    let boxes = [WG_K as u32, box_rows as u32];
    let steps = [1u32, 1];
    let mut map = CUtensorMap { opaque: [0; 16] };
    // SAFETY: every pointer is to a live local of the length the call reads for a rank of 2
    // (`dims` and `boxes` and `steps` two values, `row_bytes` one: the strides past the first
    // dimension); `map` is the driver's own aligned type, written in full. The matrix's address
    // is a device address the host never dereferences: the driver only encodes it, checking the
    // address (16-byte aligned), sizes, strides (multiples of 16 bytes) and box against the type,
    // swizzle and limits and reporting a violation as an error; it touches no device memory.
    let result = unsafe {
        cuTensorMapEncodeTiled(
            &raw mut map,
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            matrix.ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            row_bytes.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    match result {
        CUresult::CUDA_SUCCESS => Ok(TensorMap(map.opaque)),
        error => Err(CudaError::Driver {
            doing: "describing a matrix to the tensor-copy unit",
            source: cudarc::driver::DriverError(error),
        }),
    }
}
