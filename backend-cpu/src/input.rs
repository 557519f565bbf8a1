//! Reading the DLPack arguments of an op as typed `ndarray` views, with errors that name the op,
//! the argument and what was wrong.
//!
//! Strides are taken as they come (any non-negative strides, null strides meaning row-major):
//! hidden states and logits are read row by row (a row with a non-unit stride is copied once per
//! use), and the weight is packed into panels, which reads any layout. Negative strides are refused
//! with [`BackendError::Layout`].

use dlpark::DlpackElement;
use dlpark::ffi::DLDeviceType;
use dlpark::tensor::{Error as TensorError, TensorRef};
use half::{bf16, f16};
use ndarray::{ArrayView1, ArrayView2, ArrayViewD, IxDyn, ShapeBuilder};
use sluice_tensor::{BackendError, DType, Device, Dlpack, DlpackError};

use crate::pack::WeightView;

/// Hidden states `[T, H]` in one of the accepted dtypes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Hidden<'a> {
    /// f32.
    F32(ArrayView2<'a, f32>),
    /// bf16.
    Bf16(ArrayView2<'a, bf16>),
    /// f16.
    F16(ArrayView2<'a, f16>),
}

impl Hidden<'_> {
    /// `(T, H)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        match self {
            Hidden::F32(x) => x.dim(),
            Hidden::Bf16(x) => x.dim(),
            Hidden::F16(x) => x.dim(),
        }
    }
}

const HIDDEN_DTYPES: &str = "f32, bf16, f16";
const WEIGHT_DTYPES: &str = "bf16, f32";

/// Reads hidden states `[T, H]`.
pub(crate) fn hidden<'a>(op: &'static str, dl: &'a Dlpack) -> Result<Hidden<'a>, BackendError> {
    let (tensor, dtype) = describe(op, "hidden", dl)?;
    let expected = "[T, H] (tokens x hidden size)";
    Ok(match dtype {
        DType::F32 => Hidden::F32(matrix(op, "hidden", &tensor, expected)?),
        DType::BF16 => Hidden::Bf16(matrix(op, "hidden", &tensor, expected)?),
        DType::F16 => Hidden::F16(matrix(op, "hidden", &tensor, expected)?),
        other => return Err(unsupported(op, "hidden", other, HIDDEN_DTYPES)),
    })
}

/// Reads a router weight `[E, H]`.
pub(crate) fn weight<'a>(op: &'static str, dl: &'a Dlpack) -> Result<WeightView<'a>, BackendError> {
    let (tensor, dtype) = describe(op, "weight", dl)?;
    let expected = "[E, H] (experts x hidden size)";
    Ok(match dtype {
        DType::BF16 => WeightView::Bf16(matrix(op, "weight", &tensor, expected)?),
        DType::F32 => WeightView::F32(matrix(op, "weight", &tensor, expected)?),
        other => return Err(unsupported(op, "weight", other, WEIGHT_DTYPES)),
    })
}

/// Reads f32 logits `[T, E]`.
pub(crate) fn logits<'a>(
    op: &'static str,
    dl: &'a Dlpack,
) -> Result<ArrayView2<'a, f32>, BackendError> {
    let (tensor, dtype) = describe(op, "logits", dl)?;
    if dtype != DType::F32 {
        return Err(unsupported(op, "logits", dtype, "f32"));
    }
    matrix(op, "logits", &tensor, "[T, E] (tokens x experts)")
}

/// Reads an f32 correction bias `[E]`.
pub(crate) fn bias<'a>(
    op: &'static str,
    dl: &'a Dlpack,
) -> Result<ArrayView1<'a, f32>, BackendError> {
    let (tensor, dtype) = describe(op, "bias", dl)?;
    if dtype != DType::F32 {
        return Err(unsupported(op, "bias", dtype, "f32"));
    }
    let (shape, strides, ptr) =
        layout::<f32>(op, "bias", &tensor, Some((1, "[E] (one value per expert)")))?;
    // SAFETY: `layout` checked the device, dtype, alignment and non-null pointer, and that the
    // furthest element offset fits `isize`; the DLPack producer guarantees the data covers the
    // described extent for as long as `dl` (borrowed for `'a`) lives.
    Ok(unsafe { ArrayView1::from_shape_ptr(shape[0].strides(strides[0]), ptr) })
}

/// A host tensor of any rank and dtype, for copies.
pub(crate) enum AnyView<'a> {
    /// f32.
    F32(ArrayViewD<'a, f32>),
    /// f16.
    F16(ArrayViewD<'a, f16>),
    /// bf16.
    Bf16(ArrayViewD<'a, bf16>),
    /// f64.
    F64(ArrayViewD<'a, f64>),
    /// i32.
    I32(ArrayViewD<'a, i32>),
    /// i64.
    I64(ArrayViewD<'a, i64>),
    /// u8.
    U8(ArrayViewD<'a, u8>),
}

/// Reads a host tensor of any rank in one of the dtypes the host can copy.
pub(crate) fn any<'a>(
    op: &'static str,
    arg: &'static str,
    dl: &'a Dlpack,
) -> Result<AnyView<'a>, BackendError> {
    let (tensor, dtype) = describe(op, arg, dl)?;
    fn view<'a, T: DlpackElement>(
        op: &'static str,
        arg: &'static str,
        tensor: &TensorRef<'a>,
    ) -> Result<ArrayViewD<'a, T>, BackendError> {
        let (shape, strides, ptr) = layout::<T>(op, arg, tensor, None)?;
        // SAFETY: as in `matrix`: checked layout, pointer and extent; data alive for `'a`.
        Ok(unsafe { ArrayViewD::from_shape_ptr(IxDyn(&shape).strides(IxDyn(&strides)), ptr) })
    }
    Ok(match dtype {
        DType::F32 => AnyView::F32(view(op, arg, &tensor)?),
        DType::F16 => AnyView::F16(view(op, arg, &tensor)?),
        DType::BF16 => AnyView::Bf16(view(op, arg, &tensor)?),
        DType::F64 => AnyView::F64(view(op, arg, &tensor)?),
        DType::I32 => AnyView::I32(view(op, arg, &tensor)?),
        DType::I64 => AnyView::I64(view(op, arg, &tensor)?),
        DType::U8 => AnyView::U8(view(op, arg, &tensor)?),
        other => return Err(unsupported(op, arg, other, "f32, f16, bf16, f64, i32, i64, u8")),
    })
}

/// Validates the descriptor, the device and the dtype.
fn describe<'a>(
    op: &'static str,
    arg: &'static str,
    dl: &'a Dlpack,
) -> Result<(TensorRef<'a>, DType), BackendError> {
    let tensor = dl.validate().map_err(dlpack_error)?;
    let device = tensor.device();
    if device.device_type != DLDeviceType::CPU {
        let actual = Device::from_dlpack(device).map_or_else(
            || format!("DLPack device type {} (id {})", device.device_type.0, device.device_id),
            |d| d.to_string(),
        );
        return Err(BackendError::WrongDevice { op, arg, actual, expected: Device::Cpu });
    }
    let raw = tensor.dtype();
    let dtype = DType::from_dlpack(raw)
        .filter(|_| raw.lanes == 1)
        .ok_or(BackendError::UnknownDType { op, arg, code: raw.code.0, bits: raw.bits })?;
    Ok((tensor, dtype))
}

/// A rank-2 view of the tensor's data.
fn matrix<'a, T: DlpackElement>(
    op: &'static str,
    arg: &'static str,
    tensor: &TensorRef<'a>,
    expected: &'static str,
) -> Result<ArrayView2<'a, T>, BackendError> {
    let (shape, strides, ptr) = layout::<T>(op, arg, tensor, Some((2, expected)))?;
    // SAFETY: `layout` checked the device, dtype, alignment and non-null pointer, and that the
    // furthest element offset fits `isize`; the DLPack producer guarantees the data covers the
    // described extent for as long as the tensor (borrowed for `'a`) lives.
    Ok(unsafe {
        ArrayView2::from_shape_ptr((shape[0], shape[1]).strides((strides[0], strides[1])), ptr)
    })
}

/// Checks the rank (if `rank` names one, with the expected shape in words), the strides and the
/// data pointer; returns shape, strides (in elements) and the pointer to the first element.
#[allow(clippy::type_complexity)]
fn layout<T: DlpackElement>(
    op: &'static str,
    arg: &'static str,
    tensor: &TensorRef<'_>,
    rank: Option<(usize, &'static str)>,
) -> Result<(Vec<usize>, Vec<usize>, *const T), BackendError> {
    let shape_i64 = tensor.shape();
    let strides_i64 = tensor.strides_or_compact().map_err(dlpack_error)?;
    if let Some((rank, expected)) = rank
        && shape_i64.len() != rank
    {
        return Err(BackendError::Shape {
            op,
            arg,
            shape: shape_i64.to_vec(),
            expected: expected.to_owned(),
        });
    }
    // `validate` refused negative dimensions.
    let shape: Vec<usize> = shape_i64.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
    let strides = strides_i64
        .iter()
        .map(|&s| usize::try_from(s).ok())
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| BackendError::Layout {
            op,
            arg,
            shape: shape_i64.to_vec(),
            strides: strides_i64.to_vec(),
            requirement: "strides must be non-negative",
        })?;
    let empty = shape.contains(&0);
    let furthest = shape.iter().zip(&strides).try_fold(0usize, |acc, (&d, &s)| {
        if empty { Some(0) } else { acc.checked_add((d - 1).checked_mul(s)?) }
    });
    let in_range = furthest
        .and_then(|f| f.checked_add(1)?.checked_mul(size_of::<T>()))
        .is_some_and(|bytes| isize::try_from(bytes).is_ok());
    if !in_range {
        return Err(BackendError::Dlpack(DlpackError::ExtentOverflow("strides times shape")));
    }
    // SAFETY: `offset_data_ptr` only computes and checks the address (dtype, null, alignment,
    // overflow); the descriptor was validated by `Dlpack::validate` and stays borrowed.
    let ptr = unsafe { tensor.offset_data_ptr::<T>() }.map_err(|error| match error {
        TensorError::MisalignedData { ptr, align } => {
            let dtype = DType::from_dlpack(T::DTYPE).unwrap_or(DType::U8);
            BackendError::Dlpack(DlpackError::Misaligned { address: ptr, align, dtype })
        }
        TensorError::NullData => BackendError::Dlpack(DlpackError::NullData(tensor.num_elements())),
        other => dlpack_error(other),
    })?;
    Ok((shape, strides, ptr))
}

fn unsupported(
    op: &'static str,
    arg: &'static str,
    dtype: DType,
    supported: &'static str,
) -> BackendError {
    BackendError::UnsupportedDType { op, arg, dtype, supported }
}

/// Maps dlpark's validation errors onto the bridge's error type.
fn dlpack_error(error: TensorError) -> BackendError {
    let error = match error {
        TensorError::NullShapePtr { ndim } => DlpackError::NullShape(ndim),
        TensorError::NegativeNdim { ndim } => DlpackError::NegativeNdim(ndim),
        TensorError::NegativeDimension { axis, value } => {
            DlpackError::NegativeDimension { axis, value }
        }
        TensorError::ZeroDtypeLanes => DlpackError::Lanes(0),
        TensorError::MismatchedStrides { .. } => {
            DlpackError::ExtentOverflow("the strides' length differs from the rank")
        }
        TensorError::MissingVersionedStrides { major, minor, ndim } => {
            DlpackError::MissingStrides { major, minor, ndim }
        }
        _ => DlpackError::ExtentOverflow("the descriptor's extent or offset overflows"),
    };
    BackendError::Dlpack(error)
}
