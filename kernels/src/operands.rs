//! Kernel operands as both GPU backends see them: arguments on the backend's device, read through
//! the bridge's validated views into addresses, shapes and strides, with errors that name the op
//! and the argument. No device memory is touched here.

use sluice_tensor::{BackendError, DType, Device, DlpackView, DlpackViewMut, ExpectedShape};

/// The hidden-state dtypes the GEMM kernels read.
pub const HIDDEN_DTYPES: &[DType] = &[DType::F32, DType::BF16, DType::F16];
/// The router-weight dtypes the GEMM kernels read.
pub const WEIGHT_DTYPES: &[DType] = &[DType::BF16, DType::F32];

/// A rank-2 device tensor: address of element `[0, 0]`, `[rows, cols]`, strides in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMatrix {
    /// Device address of element `[0, 0]`.
    pub ptr: u64,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Elements between consecutive rows.
    pub row_stride: usize,
    /// Elements between consecutive columns.
    pub col_stride: usize,
    /// Element type.
    pub dtype: DType,
}

impl DeviceMatrix {
    /// The matrix a rank-2 view describes; `None` for another rank.
    pub fn of(view: &DlpackView<'_>) -> Option<Self> {
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
    pub fn rows_are_16_byte_aligned(&self) -> bool {
        let size = self.dtype.size_in_bytes();
        (self.col_stride == 1 || self.cols <= 1)
            && self.ptr.is_multiple_of(16)
            && (self.row_stride * size).is_multiple_of(16)
            && (self.cols * size).is_multiple_of(16)
    }
}

/// The address and row stride (elements) of a checked output window whose rows are contiguous.
pub fn output_rows(output: &mut DlpackViewMut<'_>) -> (u64, usize) {
    let row_stride = output.strides().first().copied().unwrap_or(0);
    (output.data_ptr_mut() as u64, row_stride)
}

/// Checks that `view` is on `device`.
pub fn check_device(
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
pub fn matrix(
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

/// Checks that `dtype` is one of `dtypes` (one of the lists of this module, or f32 alone).
pub fn check_dtype(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_matrix_is_refused_for_a_device_with_the_argument_named() {
        let data = vec![0f32; 6];
        let view = DlpackView::from_slice(&data, &[2, 3]).unwrap();
        let expected = ExpectedShape(vec![None, Some(3)]);
        let on_host = matrix("op", "hidden", &view, Device::Cpu, HIDDEN_DTYPES, expected.clone());
        let m = on_host.unwrap();
        assert_eq!((m.rows, m.cols, m.row_stride, m.col_stride), (2, 3, 3, 1));
        let err = matrix("op", "hidden", &view, Device::Rocm(0), HIDDEN_DTYPES, expected);
        assert!(matches!(err, Err(BackendError::WrongDevice { arg: "hidden", .. })), "{err:?}");
        let err = matrix("op", "weight", &view, Device::Cpu, &[DType::BF16], ExpectedShape(vec![]));
        assert!(matches!(err, Err(BackendError::UnsupportedDType { arg: "weight", .. })));
        let wrong = matrix(
            "op",
            "hidden",
            &view,
            Device::Cpu,
            HIDDEN_DTYPES,
            ExpectedShape(vec![None, Some(4)]),
        );
        assert!(matches!(wrong, Err(BackendError::Shape { .. })));
    }

    #[test]
    fn sixteen_byte_rows_need_contiguous_aligned_rows() {
        let m = DeviceMatrix {
            ptr: 32,
            rows: 2,
            cols: 8,
            row_stride: 8,
            col_stride: 1,
            dtype: DType::BF16,
        };
        assert!(m.rows_are_16_byte_aligned());
        assert!(!DeviceMatrix { ptr: 34, ..m }.rows_are_16_byte_aligned());
        assert!(!DeviceMatrix { row_stride: 9, ..m }.rows_are_16_byte_aligned());
        assert!(!DeviceMatrix { col_stride: 2, ..m }.rows_are_16_byte_aligned());
    }
}
