//! The DLPack bridge: the only door between sluice tensors and compute backends.
//!
//! Export ([`Tensor::to_dlpack`](crate::Tensor::to_dlpack)) refuses a tensor that requires grad;
//! import ([`Tensor::from_dlpack`](crate::Tensor::from_dlpack)) is zero-copy and validates every
//! field a producer could get wrong.

use thiserror::Error;

use crate::DType;

/// An owned versioned DLPack tensor (`DLManagedTensorVersioned`, DLPack 1.x). Dropping it calls the
/// producer's deleter once.
pub type Dlpack = dlpark::versioned::Dlpack;

/// An owned legacy DLPack tensor (`DLManagedTensor`), for consumers that predate DLPack 1.0.
pub type LegacyDlpack = dlpark::legacy::Dlpack;

/// Why a tensor could not cross the DLPack bridge.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DlpackError {
    /// Export of a tensor that requires grad.
    #[error(
        "cannot export a tensor that requires grad through DLPack; call `.detach()` first \
         (it shares storage, no copy)"
    )]
    RequiresGrad,
    /// A rank, extent or stride does not fit DLPack's `i64`/`i32` fields.
    #[error("tensor metadata does not fit DLPack: {0}")]
    MetadataOverflow(&'static str),
    /// The producer handed over a null managed-tensor pointer.
    #[error("DLPack import: the managed tensor pointer is null")]
    NullManagedTensor,
    /// The producer speaks a DLPack major version sluice does not.
    #[error("DLPack import: incompatible DLPack version {major}.{minor}")]
    IncompatibleVersion {
        /// Major version declared.
        major: u32,
        /// Minor version declared.
        minor: u32,
    },
    /// The rank is negative.
    #[error("DLPack import: negative ndim {0}")]
    NegativeNdim(i32),
    /// The shape pointer is null although the rank is positive.
    #[error("DLPack import: null shape pointer with ndim {0}")]
    NullShape(i32),
    /// A dimension is negative.
    #[error("DLPack import: dimension {axis} is negative ({value})")]
    NegativeDimension {
        /// The axis.
        axis: usize,
        /// Its extent.
        value: i64,
    },
    /// A stride is negative (sluice views only address memory forwards).
    #[error(
        "DLPack import: stride {axis} is negative ({value}); negative strides are not supported"
    )]
    NegativeStride {
        /// The axis.
        axis: usize,
        /// Its stride.
        value: i64,
    },
    /// The vector width is not 1.
    #[error("DLPack import: dtype has {0} lanes; only scalar element types (1 lane) are supported")]
    Lanes(u16),
    /// A DLPack dtype sluice does not know.
    #[error("DLPack import: unsupported dtype (code {code}, {bits} bits)")]
    UnsupportedDType {
        /// Type code.
        code: u8,
        /// Bits per element.
        bits: u8,
    },
    /// A DLPack device type sluice does not handle, or a negative ordinal.
    #[error("DLPack import: unsupported device (type {device_type}, id {device_id})")]
    UnsupportedDevice {
        /// DLPack device type code.
        device_type: u32,
        /// Device ordinal.
        device_id: i32,
    },
    /// The data pointer is null but the tensor has elements.
    #[error("DLPack import: null data pointer for a tensor with {0} elements")]
    NullData(usize),
    /// The data pointer plus byte offset is not aligned for the dtype.
    #[error("DLPack import: data at {address:#x} is not aligned to {align} bytes as {dtype} needs")]
    Misaligned {
        /// The effective address.
        address: usize,
        /// The alignment the dtype needs.
        align: usize,
        /// The dtype.
        dtype: DType,
    },
    /// The extents, strides or offset overflow the address space.
    #[error("DLPack import: tensor extent overflows ({0})")]
    ExtentOverflow(&'static str),
    /// Strides are null where the DLPack version requires them.
    #[error(
        "DLPack import: DLPack {major}.{minor} requires strides for a tensor of rank {ndim}, got null"
    )]
    MissingStrides {
        /// Major version.
        major: u32,
        /// Minor version.
        minor: u32,
        /// Rank.
        ndim: i32,
    },
}
