//! Element types a tensor can hold, and their DLPack codes.

use std::fmt;

use dlpark::ffi::{DLDataType, DLDataTypeCode};
use half::{bf16, f16};

/// The element type of a tensor.
///
/// Every dtype is recognised by the tensor core and the DLPack bridge; an op that does not support
/// one refuses it with an error naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16: the upper half of an f32.
    BF16,
    /// IEEE 754 binary64.
    F64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned byte.
    U8,
    /// Boolean, one byte per element (0 or 1).
    Bool,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits, finite only (`float8_e4m3fn`), as in
    /// DeepSeek-V3's FP8 expert weights.
    F8E4M3,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 9] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F64,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::Bool,
        DType::F8E4M3,
    ];

    /// Size of one element in bytes.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 | DType::Bool | DType::F8E4M3 => 1,
        }
    }

    /// The short lower-case name used in messages and file formats (`"bf16"`, `"f8e4m3"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::Bool => "bool",
            DType::F8E4M3 => "f8e4m3",
        }
    }

    /// Whether the dtype is a floating-point type.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64 | DType::F8E4M3)
    }

    /// The DLPack type descriptor (code, bits, lanes = 1).
    pub const fn to_dlpack(self) -> DLDataType {
        let (code, bits) = match self {
            DType::F32 => (DLDataTypeCode::FLOAT, 32),
            DType::F16 => (DLDataTypeCode::FLOAT, 16),
            DType::BF16 => (DLDataTypeCode::BFLOAT, 16),
            DType::F64 => (DLDataTypeCode::FLOAT, 64),
            DType::I32 => (DLDataTypeCode::INT, 32),
            DType::I64 => (DLDataTypeCode::INT, 64),
            DType::U8 => (DLDataTypeCode::UINT, 8),
            DType::Bool => (DLDataTypeCode::BOOL, 8),
            DType::F8E4M3 => (DLDataTypeCode::FLOAT8_E4M3FN, 8),
        };
        DLDataType::new(code, bits, 1)
    }

    /// The dtype for a DLPack type descriptor with one lane, if sluice knows it.
    ///
    /// Lanes are not checked here; the bridge refuses `lanes != 1` with its own error first.
    pub fn from_dlpack(dtype: DLDataType) -> Option<DType> {
        DType::ALL.into_iter().find(|d| {
            let known = d.to_dlpack();
            known.code == dtype.code && known.bits == dtype.bits
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type that is the element type of some [`DType`].
///
/// Implemented for the plain-old-data element types sluice reads and writes on the host.
///
/// # Safety
///
/// `Self` must have size and alignment equal to `DTYPE.size_in_bytes()`, and every bit pattern of
/// that size must be a valid `Self` (host data of this dtype is reinterpreted in place).
pub unsafe trait Element: Copy + Send + Sync + fmt::Debug + 'static {
    /// The dtype whose elements are `Self`.
    const DTYPE: DType;
}

macro_rules! element {
    ($($ty:ty => $dtype:ident),* $(,)?) => {$(
        // SAFETY: each of these types is plain old data whose size and alignment equal the dtype's
        // element size, and every bit pattern is a valid value.
        unsafe impl Element for $ty {
            const DTYPE: DType = DType::$dtype;
        }
    )*};
}

element!(f32 => F32, f16 => F16, bf16 => BF16, f64 => F64, i32 => I32, i64 => I64, u8 => U8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dlpack_codes_round_trip_for_every_dtype() {
        for dtype in DType::ALL {
            let dl = dtype.to_dlpack();
            assert_eq!(dl.lanes, 1);
            assert_eq!(usize::from(dl.bits) / 8, dtype.size_in_bytes(), "{dtype}");
            assert_eq!(DType::from_dlpack(dl), Some(dtype));
        }
    }

    #[test]
    fn known_codes_match_the_dlpack_header() {
        assert_eq!(DType::BF16.to_dlpack().code.0, 4);
        assert_eq!(DType::F32.to_dlpack().code.0, 2);
        assert_eq!(DType::I32.to_dlpack().code.0, 0);
        assert_eq!(DType::Bool.to_dlpack().code.0, 6);
    }

    #[test]
    fn unknown_dtypes_are_not_guessed() {
        let complex = DLDataType::new(DLDataTypeCode::COMPLEX, 64, 1);
        assert_eq!(DType::from_dlpack(complex), None);
        let u16 = DLDataType::new(DLDataTypeCode::UINT, 16, 1);
        assert_eq!(DType::from_dlpack(u16), None);
    }

    #[test]
    fn element_sizes_match_rust_types() {
        fn check<T: Element>() {
            assert_eq!(size_of::<T>(), T::DTYPE.size_in_bytes());
            assert_eq!(align_of::<T>(), T::DTYPE.size_in_bytes());
        }
        check::<f32>();
        check::<f16>();
        check::<bf16>();
        check::<f64>();
        check::<i32>();
        check::<i64>();
        check::<u8>();
    }
}
