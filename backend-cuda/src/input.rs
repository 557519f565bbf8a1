//! Arguments that live on this backend's device, as validated views: addresses, shapes and
//! strides, with errors that name the op and the argument. No device memory is touched.

use sluice_tensor::{BackendError, DType, Device, DlpackView, DlpackViewMut, ExpectedShape};

/// A rank-2 device tensor: address of element `[0, 0]`, `[rows, cols]`, strides in elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceMatrix {
    pub(crate) ptr: u64,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
    pub(crate) dtype: DType,
}

impl DeviceMatrix {
    /// The matrix a rank-2 view describes.
    pub(crate) fn of(view: &DlpackView<'_>) -> Option<Self> {
        let ([rows, cols], [row_stride, col_stride]) = (view.shape(), view.strides()) else {
            return None;
        };
        Some(DeviceMatrix {
            ptr: view.data_ptr() as u64,
            rows: *rows,
            cols: *cols,
            row_stride: *row_stride,
            col_stride: *col_stride,
            dtype: view.dtype(),
        })
    }

    /// Whether rows are contiguous and start on 16-byte boundaries (what 16-byte loads need).
    pub(crate) fn rows_are_16_byte_aligned(&self) -> bool {
        let size = self.dtype.size_in_bytes();
        (self.col_stride == 1 || self.cols <= 1)
            && self.ptr.is_multiple_of(16)
            && (self.row_stride * size).is_multiple_of(16)
            && (self.cols * size).is_multiple_of(16)
    }
}

/// The address and row stride (elements) of a checked output window whose rows are contiguous.
pub(crate) fn output_rows(output: &mut DlpackViewMut<'_>) -> (u64, usize) {
    let row_stride = output.strides().first().copied().unwrap_or(0);
    (output.data_ptr_mut() as u64, row_stride)
}

/// Checks that `view` is on `device`.
pub(crate) fn check_device(
    op: &'static str,
    arg: &'static str,
    view: &DlpackView<'_>,
    device: Device,
) -> Result<(), BackendError> {
    if view.device() != device {
        return Err(BackendError::WrongDevice { op, arg, actual: view.device(), expected: device });
    }
    Ok(())
}

/// `view` as a matrix on `device` in one of `dtypes`, of shape `expected`.
pub(crate) fn matrix(
    op: &'static str,
    arg: &'static str,
    view: &DlpackView<'_>,
    device: Device,
    dtypes: &[DType],
    expected: ExpectedShape,
) -> Result<DeviceMatrix, BackendError> {
    check_device(op, arg, view, device)?;
    check_dtype(op, arg, view.dtype(), dtypes)?;
    let fits = view.rank() == 2
        && view.shape().iter().zip(&expected.0).all(|(&d, e)| e.is_none_or(|e| e == d));
    if !fits {
        return Err(BackendError::Shape { op, arg, shape: view.shape().to_vec(), expected });
    }
    DeviceMatrix::of(view).ok_or(BackendError::Shape {
        op,
        arg,
        shape: view.shape().to_vec(),
        expected: ExpectedShape(vec![None, None]),
    })
}

pub(crate) fn check_dtype(
    op: &'static str,
    arg: &'static str,
    dtype: DType,
    dtypes: &[DType],
) -> Result<(), BackendError> {
    if dtypes.contains(&dtype) {
        return Ok(());
    }
    let supported = match dtypes {
        [DType::F32] => "f32",
        [DType::BF16, DType::F32] => "bf16, f32",
        _ => "f32, bf16, f16",
    };
    Err(BackendError::UnsupportedDType { op, arg, dtype, supported })
}
