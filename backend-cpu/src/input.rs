//! The op arguments as typed `ndarray` views, read through the bridge's validated
//! [`DlpackView`]s, with errors that name the op and the argument.
//!
//! Strides are taken as they come (any non-negative strides): hidden states and logits are read
//! row by row (a row with a non-unit stride is copied once per use), and the weight is packed into
//! panels, which reads any layout.

use half::{bf16, f16};
use ndarray::{ArrayView1, ArrayView2, ArrayViewD};
use sluice_tensor::{BackendError, DType, Device, DlpackView, Element};

use crate::pack::WeightView;
use crate::routing::TokenIds;

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

    /// Whether row `token` holds a NaN or an infinity.
    pub(crate) fn row_is_finite(&self, token: usize) -> bool {
        match self {
            Hidden::F32(x) => x.row(token).iter().all(|v| v.is_finite()),
            Hidden::Bf16(x) => x.row(token).iter().all(|v| v.is_finite()),
            Hidden::F16(x) => x.row(token).iter().all(|v| v.is_finite()),
        }
    }
}

const HIDDEN_DTYPES: &str = "f32, bf16, f16";
const WEIGHT_DTYPES: &str = "bf16, f32";

/// Reads hidden states `[T, H]`.
pub(crate) fn hidden<'a>(
    op: &'static str,
    view: &DlpackView<'a>,
) -> Result<Hidden<'a>, BackendError> {
    const ARG: &str = "hidden";
    on_host(op, ARG, view)?;
    Ok(match view.dtype() {
        DType::F32 => Hidden::F32(matrix(op, ARG, view)?),
        DType::BF16 => Hidden::Bf16(matrix(op, ARG, view)?),
        DType::F16 => Hidden::F16(matrix(op, ARG, view)?),
        other => return Err(unsupported(op, ARG, other, HIDDEN_DTYPES)),
    })
}

/// Reads a router weight `[E, H]`.
pub(crate) fn weight<'a>(
    op: &'static str,
    view: &DlpackView<'a>,
) -> Result<WeightView<'a>, BackendError> {
    const ARG: &str = "weight";
    on_host(op, ARG, view)?;
    Ok(match view.dtype() {
        DType::BF16 => WeightView::Bf16(matrix(op, ARG, view)?),
        DType::F32 => WeightView::F32(matrix(op, ARG, view)?),
        other => return Err(unsupported(op, ARG, other, WEIGHT_DTYPES)),
    })
}

/// Reads f32 logits `[T, E]`.
pub(crate) fn logits<'a>(
    op: &'static str,
    view: &DlpackView<'a>,
) -> Result<ArrayView2<'a, f32>, BackendError> {
    const ARG: &str = "logits";
    on_host(op, ARG, view)?;
    if view.dtype() != DType::F32 {
        return Err(unsupported(op, ARG, view.dtype(), "f32"));
    }
    matrix(op, ARG, view)
}

/// Reads an f32 correction bias `[E]`.
pub(crate) fn bias<'a>(
    op: &'static str,
    view: &DlpackView<'a>,
) -> Result<ArrayView1<'a, f32>, BackendError> {
    const ARG: &str = "bias";
    on_host(op, ARG, view)?;
    if view.dtype() != DType::F32 {
        return Err(unsupported(op, ARG, view.dtype(), "f32"));
    }
    if view.rank() != 1 {
        return Err(BackendError::Shape {
            op,
            arg: ARG,
            shape: view.shape().to_vec(),
            expected: sluice_tensor::ExpectedShape(vec![None]),
        });
    }
    view.as_array1().map_err(|source| BackendError::View { op, arg: ARG, source })
}

/// Reads token ids `[T]`, i32 or i64.
pub(crate) fn token_ids<'a>(
    op: &'static str,
    view: &DlpackView<'a>,
) -> Result<TokenIds<'a>, BackendError> {
    let refused = |source| BackendError::View { op, arg: "token_ids", source };
    match view.dtype() {
        DType::I32 => Ok(TokenIds::I32(view.as_array1::<i32>().map_err(refused)?)),
        DType::I64 => Ok(TokenIds::I64(view.as_array1::<i64>().map_err(refused)?)),
        other => Err(unsupported(op, "token_ids", other, "i32, i64")),
    }
}

/// Reads a hash table `tid2eid` `[vocab, K]` of i32 expert ids into a row-major copy.
pub(crate) fn hash_table(
    op: &'static str,
    view: &DlpackView<'_>,
) -> Result<(Vec<i32>, Vec<usize>), BackendError> {
    match any(op, "table", view)? {
        AnyView::I32(table) => Ok((table.iter().copied().collect(), table.shape().to_vec())),
        _ => Err(unsupported(op, "table", view.dtype(), "i32")),
    }
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
    view: &DlpackView<'a>,
) -> Result<AnyView<'a>, BackendError> {
    on_host(op, arg, view)?;
    fn typed<'a, T: Element>(
        op: &'static str,
        arg: &'static str,
        view: &DlpackView<'a>,
    ) -> Result<ArrayViewD<'a, T>, BackendError> {
        view.as_array_dyn().map_err(|source| BackendError::View { op, arg, source })
    }
    Ok(match view.dtype() {
        DType::F32 => AnyView::F32(typed(op, arg, view)?),
        DType::F16 => AnyView::F16(typed(op, arg, view)?),
        DType::BF16 => AnyView::Bf16(typed(op, arg, view)?),
        DType::F64 => AnyView::F64(typed(op, arg, view)?),
        DType::I32 => AnyView::I32(typed(op, arg, view)?),
        DType::I64 => AnyView::I64(typed(op, arg, view)?),
        DType::U8 => AnyView::U8(typed(op, arg, view)?),
        other => return Err(unsupported(op, arg, other, "f32, f16, bf16, f64, i32, i64, u8")),
    })
}

/// Refuses data that is not in host memory.
fn on_host(op: &'static str, arg: &'static str, view: &DlpackView<'_>) -> Result<(), BackendError> {
    if view.device() != Device::Cpu {
        return Err(BackendError::WrongDevice {
            op,
            arg,
            actual: view.device(),
            expected: Device::Cpu,
        });
    }
    Ok(())
}

/// A rank-2 view of the data, or a shape error naming `[rows, columns]`.
fn matrix<'a, T: Element>(
    op: &'static str,
    arg: &'static str,
    view: &DlpackView<'a>,
) -> Result<ArrayView2<'a, T>, BackendError> {
    if view.rank() != 2 {
        return Err(BackendError::Shape {
            op,
            arg,
            shape: view.shape().to_vec(),
            expected: sluice_tensor::ExpectedShape(vec![None, None]),
        });
    }
    view.as_array2().map_err(|source| BackendError::View { op, arg, source })
}

fn unsupported(
    op: &'static str,
    arg: &'static str,
    dtype: DType,
    supported: &'static str,
) -> BackendError {
    BackendError::UnsupportedDType { op, arg, dtype, supported }
}
