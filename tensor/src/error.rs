//! Errors of the tensor core itself (layouts, host access, construction).

use thiserror::Error;

use crate::{DType, Device};

/// Why a tensor could not be built, viewed or read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TensorError {
    /// Host access asked for one element type, the tensor holds another.
    #[error("dtype mismatch: the tensor holds {actual}, {expected} was asked for")]
    DTypeMismatch {
        /// What the caller asked for.
        expected: DType,
        /// What the tensor holds.
        actual: DType,
    },
    /// A contiguous view was needed.
    #[error(
        "the tensor is not contiguous (shape {shape:?}, strides {strides:?}); use `to_vec` for a copy"
    )]
    NotContiguous {
        /// Shape.
        shape: Vec<usize>,
        /// Strides in elements.
        strides: Vec<usize>,
    },
    /// Host access to memory that lives on a device.
    #[error("the tensor lives on {0}; host access needs a cpu tensor")]
    NotHost(Device),
    /// The data does not hold as many elements (or bytes) as the shape needs.
    #[error("{what}: shape {shape:?} needs {needed} but {given} were given")]
    SizeMismatch {
        /// Elements or bytes.
        what: &'static str,
        /// The shape.
        shape: Vec<usize>,
        /// How many the shape needs.
        needed: usize,
        /// How many there are.
        given: usize,
    },
    /// Shape or stride arithmetic does not fit `usize`.
    #[error("shape {0:?} overflows the address space")]
    Overflow(Vec<usize>),
    /// A dimension index past the rank.
    #[error("dimension {dim} is out of range for a tensor of rank {rank}")]
    DimOutOfRange {
        /// The dimension.
        dim: usize,
        /// The rank.
        rank: usize,
    },
    /// A narrow past the end of a dimension.
    #[error("narrow({dim}, {start}, {len}) is out of range for size {size}")]
    NarrowOutOfRange {
        /// The dimension.
        dim: usize,
        /// Start index.
        start: usize,
        /// Length.
        len: usize,
        /// The dimension's size.
        size: usize,
    },
    /// A permutation that is not one.
    #[error("{perm:?} is not a permutation of the {rank} dimensions")]
    InvalidPermutation {
        /// The permutation given.
        perm: Vec<usize>,
        /// The rank.
        rank: usize,
    },
    /// A reshape that would need a copy.
    #[error("cannot view shape {from:?} with strides {strides:?} as {to:?} without a copy")]
    ReshapeNeedsCopy {
        /// Old shape.
        from: Vec<usize>,
        /// Old strides.
        strides: Vec<usize>,
        /// New shape.
        to: Vec<usize>,
    },
    /// A memory region too short for the tensor placed in it.
    #[error("tensor of {needed} bytes at offset {offset} does not fit a region of {region} bytes")]
    OutOfBounds {
        /// Bytes the tensor spans.
        needed: usize,
        /// Where it starts.
        offset: usize,
        /// The region's length.
        region: usize,
    },
    /// Host memory for a copy could not be allocated.
    #[error("cannot allocate {bytes} bytes for a copy of the tensor")]
    Allocation {
        /// Bytes requested.
        bytes: usize,
    },
    /// Data not aligned for its dtype.
    #[error("data at {address:#x} is not aligned for {dtype}")]
    Misaligned {
        /// The address.
        address: usize,
        /// The dtype.
        dtype: DType,
    },
}
