//! [`Tensor`]: shared storage, a strided layout, a dtype and an explicit `requires_grad` flag.

use std::fmt;
use std::sync::Arc;

use crate::storage::{SharedBytes, Storage, check_alignment};
use crate::{DType, Device, Element, Layout, TensorError};

/// An n-dimensional array over shared, immutable storage.
///
/// Cloning a tensor, [`detach`](Tensor::detach)ing it and taking views (`narrow`, `transpose`,
/// `permute`, `reshape`) are O(1) and share the storage. The `requires_grad` flag has no autograd
/// behind it: it records what a training framework would say about the tensor, and the
/// [DLPack bridge](crate::dlpack) refuses to export a tensor that has it set.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    layout: Layout,
    dtype: DType,
    requires_grad: bool,
}

impl Tensor {
    /// Assembles a tensor from parts, checking that the layout fits the storage and that the first
    /// element is aligned for the dtype.
    pub(crate) fn from_parts(
        storage: Arc<Storage>,
        layout: Layout,
        dtype: DType,
    ) -> Result<Self, TensorError> {
        let size = dtype.size_in_bytes();
        let overflow = || TensorError::Overflow(layout.shape().to_vec());
        let needed = layout.span().checked_mul(size).ok_or_else(overflow)?;
        if needed > storage.len() {
            return Err(TensorError::OutOfBounds {
                needed,
                offset: layout.offset() * size,
                region: storage.len(),
            });
        }
        if layout.elem_count() > 0 {
            check_alignment(storage.as_ptr().wrapping_add(layout.offset() * size), dtype)?;
        }
        Ok(Tensor { storage, layout, dtype, requires_grad: false })
    }

    /// A contiguous host tensor holding `data`, copied into 64-byte aligned storage.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Self, TensorError> {
        Self::from_slice(&data, shape)
    }

    /// A contiguous host tensor holding a copy of `data`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Self, TensorError> {
        let layout = Layout::contiguous(shape)?;
        if layout.elem_count() != data.len() {
            return Err(TensorError::SizeMismatch {
                what: "elements",
                shape: shape.to_vec(),
                needed: layout.elem_count(),
                given: data.len(),
            });
        }
        // SAFETY: `T: Element` is plain old data without padding (the trait's contract), so its
        // memory is `size_of_val(data)` initialised bytes, readable for the borrow's lifetime.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data))
        };
        let storage = Storage::owned_copy(bytes)?;
        Self::from_parts(Arc::new(storage), layout, T::DTYPE)
    }

    /// A contiguous host tensor holding a copy of `bytes`, read as `dtype` in native byte order.
    pub fn from_bytes(bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Self, TensorError> {
        let layout = Layout::contiguous(shape)?;
        let needed = layout
            .elem_count()
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| TensorError::Overflow(shape.to_vec()))?;
        if needed != bytes.len() {
            return Err(TensorError::SizeMismatch {
                what: "bytes",
                shape: shape.to_vec(),
                needed,
                given: bytes.len(),
            });
        }
        Self::from_parts(Arc::new(Storage::owned_copy(bytes)?), layout, dtype)
    }

    /// A zero-filled contiguous host tensor.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Self, TensorError> {
        let layout = Layout::contiguous(shape)?;
        let bytes = layout
            .elem_count()
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| TensorError::Overflow(shape.to_vec()))?;
        Self::from_parts(Arc::new(Storage::owned_zeroed(bytes)?), layout, dtype)
    }

    /// A zero-copy, read-only tensor over `region[byte_offset..]`, such as a tensor inside a
    /// memory-mapped checkpoint. The region is kept alive as long as any view of it.
    pub fn from_mapped(
        region: SharedBytes,
        byte_offset: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Self, TensorError> {
        let layout = Layout::contiguous(shape)?;
        let len = layout
            .elem_count()
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| TensorError::Overflow(shape.to_vec()))?;
        let storage = Storage::mapped(region, byte_offset, len)?;
        Self::from_parts(Arc::new(storage), layout, dtype)
    }

    /// A tensor over an existing storage with the given layout (checked against the storage).
    ///
    /// The new tensor does not require grad, whatever other tensors share the storage: built from
    /// `w.storage().clone()`, it is exactly [`detach`](Tensor::detach) with a new layout, and the
    /// bridge exports it. That is deliberate (a view of a parameter's memory is how the gate hands
    /// it to a backend); call [`with_requires_grad`](Tensor::with_requires_grad) to keep a
    /// parameter a parameter.
    pub fn from_storage(
        storage: Arc<Storage>,
        layout: Layout,
        dtype: DType,
    ) -> Result<Self, TensorError> {
        Self::from_parts(storage, layout, dtype)
    }

    /// The extent of each dimension.
    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }

    /// Strides in elements.
    pub fn strides(&self) -> &[usize] {
        self.layout.strides()
    }

    /// Offset of the first element in the storage, in elements.
    pub fn offset(&self) -> usize {
        self.layout.offset()
    }

    /// The full layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The shared storage.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.layout.rank()
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.layout.elem_count()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where the data lives.
    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// Whether the elements are row-major and gap-free.
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }

    /// Whether the storage must never be written (memory-mapped or imported read-only).
    pub fn is_read_only(&self) -> bool {
        self.storage.is_read_only()
    }

    /// Address of the first element (on the tensor's device).
    pub fn data_ptr(&self) -> *const u8 {
        self.storage.as_ptr().wrapping_add(self.layout.offset() * self.dtype.size_in_bytes())
    }

    /// Whether a training framework would track gradients for this tensor.
    pub fn requires_grad(&self) -> bool {
        self.requires_grad
    }

    /// The same tensor (shared storage) with the flag set to `requires_grad`.
    pub fn with_requires_grad(&self, requires_grad: bool) -> Tensor {
        Tensor { requires_grad, ..self.clone() }
    }

    /// The same data with `requires_grad = false`: O(1), same storage and data pointer; `self` is
    /// untouched. This is what a tensor needs before it can cross the DLPack bridge.
    pub fn detach(&self) -> Tensor {
        self.with_requires_grad(false)
    }

    fn with_layout(&self, layout: Layout) -> Tensor {
        Tensor { layout, ..self.clone() }
    }

    /// The view `start .. start + len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor, TensorError> {
        Ok(self.with_layout(self.layout.narrow(dim, start, len)?))
    }

    /// The view with two dimensions swapped.
    pub fn transpose(&self, dim0: usize, dim1: usize) -> Result<Tensor, TensorError> {
        Ok(self.with_layout(self.layout.transpose(dim0, dim1)?))
    }

    /// The view with dimensions reordered: dimension `i` of the result is `perm[i]` of `self`.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor, TensorError> {
        Ok(self.with_layout(self.layout.permute(perm)?))
    }

    /// The view with a new shape; an error if the strides do not allow it without a copy.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor, TensorError> {
        Ok(self.with_layout(self.layout.reshape(shape)?))
    }

    fn check_dtype<T: Element>(&self) -> Result<(), TensorError> {
        if T::DTYPE == self.dtype {
            Ok(())
        } else {
            Err(TensorError::DTypeMismatch { expected: T::DTYPE, actual: self.dtype })
        }
    }

    /// The storage's elements as `T` (host only; dtype checked).
    fn storage_elements<T: Element>(&self) -> Result<&[T], TensorError> {
        self.check_dtype::<T>()?;
        let bytes = self.storage.host_bytes()?;
        let count = bytes.len() / size_of::<T>();
        if count == 0 {
            return Ok(&[]);
        }
        check_alignment(bytes.as_ptr(), T::DTYPE)?;
        // SAFETY: `bytes` is initialised host memory alive for `&self`, its address is aligned for
        // `T` (checked above), `count * size_of::<T>() <= bytes.len()`, and every bit pattern is a
        // valid `T` (`Element`'s contract). Storage is never mutated, so sharing it is sound.
        Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), count) })
    }

    /// The elements as a slice, for a contiguous host tensor of dtype `T`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T], TensorError> {
        let elements = self.storage_elements::<T>()?;
        if !self.is_contiguous() {
            return Err(TensorError::NotContiguous {
                shape: self.shape().to_vec(),
                strides: self.strides().to_vec(),
            });
        }
        let start = self.layout.offset();
        // `from_parts` checked that the span fits the storage.
        Ok(&elements[start..start + self.elem_count()])
    }

    /// The elements in row-major order of the view, copied (works for any strides, host only).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, TensorError> {
        if self.is_contiguous() {
            return Ok(self.as_slice::<T>()?.to_vec());
        }
        let elements = self.storage_elements::<T>()?;
        // A view with zero strides may name far more elements than its storage holds: allocate
        // fallibly instead of aborting.
        let mut out = Vec::new();
        out.try_reserve_exact(self.elem_count()).map_err(|_| TensorError::Allocation {
            bytes: self.elem_count().saturating_mul(size_of::<T>()),
        })?;
        out.extend(self.layout.indices().map(|i| elements[i]));
        Ok(out)
    }

    /// An ndarray view of a host tensor of dtype `T` (any strides), sharing the data.
    pub fn to_ndarray_view<T: Element>(&self) -> Result<ndarray::ArrayViewD<'_, T>, TensorError> {
        let elements = self.storage_elements::<T>()?;
        let shape = ndarray::IxDyn(self.shape());
        let strides = ndarray::IxDyn(self.strides());
        let span = &elements[self.layout.offset()..self.layout.span().max(self.layout.offset())];
        ndarray::ArrayView::from_shape(ndarray::ShapeBuilder::strides(shape, strides), span)
            .map_err(|_| TensorError::NotContiguous {
                shape: self.shape().to_vec(),
                strides: self.strides().to_vec(),
            })
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape())
            .field("strides", &self.strides())
            .field("offset", &self.offset())
            .field("dtype", &self.dtype)
            .field("device", &self.device())
            .field("requires_grad", &self.requires_grad)
            .field("storage", &self.storage)
            .finish()
    }
}
