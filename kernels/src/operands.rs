//! Kernel operands as both GPU backends see them: arguments on the backend's device, read through
//! the bridge's validated views into addresses, shapes and strides, with errors that name the op
//! and the argument. No device memory is touched here.

use sluice_tensor::{
    BackendError, DType, Device, DlpackView, DlpackViewMut, ExpectedShape, HashTableError,
    RoutingSpec, check_hash_table, first_token_outside_table,
};

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

/// Token ids `[T]` on the device, as the hash-routed kernels read them: contiguous, i32 or i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceTokenIds {
    /// Device address of the first id.
    pub ptr: u64,
    /// 4 (i32) or 8 (i64).
    pub bytes_per_id: usize,
}

/// Validates token ids `[T]` on `device` for the kernels: i32 or i64, one axis, contiguous (the
/// kernels read id `t` at `ptr + t * bytes_per_id`). The length is checked against the hidden
/// states by the shared `route_into` checks.
pub fn token_ids(
    op: &'static str,
    view: &DlpackView<'_>,
    device: Device,
) -> Result<DeviceTokenIds, BackendError> {
    const ARG: &str = "token_ids";
    check_device(op, ARG, view, device)?;
    if !matches!(view.dtype(), DType::I32 | DType::I64) {
        return Err(BackendError::UnsupportedDType {
            op,
            arg: ARG,
            dtype: view.dtype(),
            supported: "i32, i64",
        });
    }
    let (&[len], &[stride]) = (view.shape(), view.strides()) else {
        return Err(BackendError::Shape {
            op,
            arg: ARG,
            shape: view.shape().to_vec(),
            expected: ExpectedShape(vec![None]),
        });
    };
    if stride != 1 && len > 1 {
        return Err(BackendError::Layout {
            op,
            arg: ARG,
            shape: vec![len],
            strides: vec![stride],
            requirement: "the GPU kernels read contiguous token ids",
        });
    }
    Ok(DeviceTokenIds { ptr: view.data_ptr() as u64, bytes_per_id: view.dtype().size_in_bytes() })
}

/// The values of a host hash table `tid2eid` (i32 `[vocab, K]`, any strides) in row-major order,
/// checked with [`check_hash_table`]: what a GPU backend copies to its device at preparation.
pub fn hash_table_values(
    op: &'static str,
    view: &DlpackView<'_>,
    spec: &RoutingSpec,
) -> Result<Vec<i32>, BackendError> {
    const ARG: &str = "table";
    check_device(op, ARG, view, Device::Cpu)?;
    if view.dtype() != DType::I32 {
        return Err(BackendError::UnsupportedDType {
            op,
            arg: ARG,
            dtype: view.dtype(),
            supported: "i32",
        });
    }
    let shape_error = |source| BackendError::HashTable { op, source };
    let table = view.as_array2::<i32>().map_err(|_| {
        shape_error(HashTableError::Shape { shape: view.shape().to_vec(), top_k: spec.top_k })
    })?;
    let values: Vec<i32> = table.iter().copied().collect();
    check_hash_table(&values, view.shape(), spec.top_k, spec.num_experts).map_err(shape_error)?;
    Ok(values)
}

/// Refuses host token ids (i32 or i64 `[tokens]`) of which one names no row of a table of `vocab`
/// rows, as the CPU backend does: what a GPU backend's synchronous call checks before it launches
/// (a call that only enqueues cannot look, and marks such rows instead).
pub fn check_host_token_ids(
    op: &'static str,
    view: &DlpackView<'_>,
    tokens: usize,
    vocab: usize,
) -> Result<(), BackendError> {
    const ARG: &str = "token_ids";
    check_device(op, ARG, view, Device::Cpu)?;
    if view.shape() != [tokens] {
        return Err(BackendError::Shape {
            op,
            arg: ARG,
            shape: view.shape().to_vec(),
            expected: ExpectedShape::exact(&[tokens]),
        });
    }
    let refused = |source| BackendError::View { op, arg: ARG, source };
    let outside = match view.dtype() {
        DType::I32 => first_token_outside_table(
            view.as_array1::<i32>().map_err(refused)?.iter().map(|&id| i64::from(id)),
            vocab,
        ),
        DType::I64 => first_token_outside_table(
            view.as_array1::<i64>().map_err(refused)?.iter().copied(),
            vocab,
        ),
        dtype => {
            return Err(BackendError::UnsupportedDType {
                op,
                arg: ARG,
                dtype,
                supported: "i32, i64",
            });
        }
    };
    match outside {
        Some((row, id)) => Err(BackendError::TokenIdOutsideTable { op, row, id, vocab }),
        None => Ok(()),
    }
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

    #[test]
    fn token_ids_are_i32_or_i64_contiguous_on_the_device() {
        let ids = [3i64, 1, 4, 1];
        let view = DlpackView::from_slice(&ids, &[4]).unwrap();
        let read = token_ids("op", &view, Device::Cpu).unwrap();
        assert_eq!(read, DeviceTokenIds { ptr: ids.as_ptr() as u64, bytes_per_id: 8 });
        let narrow = [3i32, 1];
        let view = DlpackView::from_slice(&narrow, &[2]).unwrap();
        assert_eq!(token_ids("op", &view, Device::Cpu).unwrap().bytes_per_id, 4);
        let err = token_ids("op", &view, Device::Cuda(0)).unwrap_err();
        assert!(matches!(err, BackendError::WrongDevice { arg: "token_ids", .. }), "{err}");
        let every_other = DlpackView::from_slice_strided(&ids, &[2], &[2]).unwrap();
        let err = token_ids("op", &every_other, Device::Cpu).unwrap_err();
        assert!(matches!(err, BackendError::Layout { arg: "token_ids", .. }), "{err}");
        let one = DlpackView::from_slice_strided(&ids, &[1], &[2]).unwrap();
        assert!(token_ids("op", &one, Device::Cpu).is_ok(), "one id has no stride to speak of");
        let floats = [0f32; 2];
        let view = DlpackView::from_slice(&floats, &[2]).unwrap();
        let err = token_ids("op", &view, Device::Cpu).unwrap_err();
        assert!(matches!(err, BackendError::UnsupportedDType { arg: "token_ids", .. }), "{err}");
        let matrix = DlpackView::from_slice(&ids, &[2, 2]).unwrap();
        let err = token_ids("op", &matrix, Device::Cpu).unwrap_err();
        assert!(matches!(err, BackendError::Shape { arg: "token_ids", .. }), "{err}");
    }

    #[test]
    fn hash_tables_are_read_row_major_and_checked() {
        let spec =
            RoutingSpec::builder(8, 2).method(sluice_tensor::TopkMethod::Hash).build().unwrap();
        // Column-major storage of the rows [0, 1], [2, 3], [7, 5]: read back row by row.
        let columns = [0i32, 2, 7, 1, 3, 5];
        let view = DlpackView::from_slice_strided(&columns, &[3, 2], &[1, 3]).unwrap();
        assert_eq!(hash_table_values("op", &view, &spec).unwrap(), [0, 1, 2, 3, 7, 5]);
        let repeated = [0i32, 0];
        let view = DlpackView::from_slice(&repeated, &[1, 2]).unwrap();
        let err = hash_table_values("op", &view, &spec).unwrap_err();
        assert!(matches!(err, BackendError::HashTable { .. }), "{err}");
        let wide = [0i64, 1];
        let view = DlpackView::from_slice(&wide, &[1, 2]).unwrap();
        let err = hash_table_values("op", &view, &spec).unwrap_err();
        assert!(matches!(err, BackendError::UnsupportedDType { arg: "table", .. }), "{err}");
    }

    #[test]
    fn host_token_ids_outside_the_table_are_refused_with_their_row() {
        let ids = [0i64, 3, 4];
        let view = DlpackView::from_slice(&ids, &[3]).unwrap();
        assert!(check_host_token_ids("op", &view, 3, 5).is_ok());
        let err = check_host_token_ids("op", &view, 3, 4).unwrap_err();
        assert!(
            matches!(err, BackendError::TokenIdOutsideTable { row: 2, id: 4, vocab: 4, .. }),
            "{err}"
        );
        let negative = [1i32, -1];
        let view = DlpackView::from_slice(&negative, &[2]).unwrap();
        let err = check_host_token_ids("op", &view, 2, 4).unwrap_err();
        assert!(matches!(err, BackendError::TokenIdOutsideTable { row: 1, id: -1, .. }), "{err}");
        let err = check_host_token_ids("op", &view, 3, 4).unwrap_err();
        assert!(matches!(err, BackendError::Shape { arg: "token_ids", .. }), "{err}");
    }
}
