//! Borrowed, validated DLPack views: how a backend reads its arguments and writes its caller's
//! outputs without owning either.
//!
//! A [`DlpackView`] (read-only) or [`DlpackViewMut`] (writable) is made from an owned DLPack tensor,
//! a sluice [`Tensor`], a host slice, or a raw `DLTensor` pointer handed over by C. Every
//! constructor validates through the bridge's one validation routine and copies the metadata into
//! the view itself, so making a view never allocates and the engine's hot loop can make them on
//! every call. A view of a tensor that requires grad is refused exactly as its export is: the
//! bridge stays the only door.
//!
//! Host data is read and written through typed `ndarray` views ([`DlpackView::as_array2`],
//! [`DlpackViewMut::as_array2_mut`], ...), so a backend needs no `unsafe` to use its arguments.

use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;

use dlpark::ffi::DLTensor;
use dlpark::{DlpackFlags, ManagedTensorBase};
use ndarray::{
    ArrayView1, ArrayView2, ArrayViewD, ArrayViewMut1, ArrayViewMut2, IxDyn, ShapeBuilder,
};
use thiserror::Error;

use crate::dlpack::{Checked, validate};
use crate::{DType, Device, Dlpack, DlpackError, Element, LegacyDlpack, Tensor};

/// The most dimensions a view holds. Views keep their metadata inline (no allocation); router
/// arguments have at most two dimensions.
pub const MAX_VIEW_RANK: usize = 8;

/// Why typed host access to a view was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ViewError {
    /// The view holds another element type.
    #[error("the view holds {actual}, {expected} was asked for")]
    DType {
        /// What was asked for.
        expected: DType,
        /// What the view holds.
        actual: DType,
    },
    /// The view has another number of dimensions.
    #[error("the view has {actual} dimensions, {expected} were asked for")]
    Rank {
        /// What was asked for.
        expected: usize,
        /// What the view has.
        actual: usize,
    },
    /// The data lives on a device, not in host memory.
    #[error("the view's data lives on {0}; host access needs cpu memory")]
    NotHost(Device),
}

/// Shape and strides (in elements), inline.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Dims {
    rank: usize,
    shape: [usize; MAX_VIEW_RANK],
    strides: [usize; MAX_VIEW_RANK],
}

impl Dims {
    fn new(shape: &[usize], strides: &[usize]) -> Result<Self, DlpackError> {
        let rank = shape.len();
        if rank > MAX_VIEW_RANK {
            return Err(DlpackError::RankTooLarge { ndim: rank, max: MAX_VIEW_RANK });
        }
        let mut dims = Dims { rank, shape: [0; MAX_VIEW_RANK], strides: [0; MAX_VIEW_RANK] };
        dims.shape[..rank].copy_from_slice(shape);
        dims.strides[..rank].copy_from_slice(strides);
        Ok(dims)
    }

    fn from_checked(checked: &Checked<'_>) -> Result<Self, DlpackError> {
        let rank = checked.shape.len();
        if rank > MAX_VIEW_RANK {
            return Err(DlpackError::RankTooLarge { ndim: rank, max: MAX_VIEW_RANK });
        }
        let mut dims = Dims { rank, shape: [0; MAX_VIEW_RANK], strides: [0; MAX_VIEW_RANK] };
        for axis in 0..rank {
            dims.shape[axis] = checked.extent(axis);
            dims.strides[axis] = checked.stride(axis);
        }
        Ok(dims)
    }

    fn shape(&self) -> &[usize] {
        &self.shape[..self.rank]
    }

    fn strides(&self) -> &[usize] {
        &self.strides[..self.rank]
    }

    fn elem_count(&self) -> usize {
        // Validated when the view was made: the product fits.
        self.shape().iter().product()
    }

    /// One past the furthest element index, or `None` if that overflows (0 when empty).
    fn span(&self) -> Option<usize> {
        if self.shape().contains(&0) {
            return Some(0);
        }
        self.shape()
            .iter()
            .zip(self.strides())
            .try_fold(0usize, |acc, (&d, &s)| acc.checked_add((d - 1).checked_mul(s)?))?
            .checked_add(1)
    }

    /// Whether every index reaches its own element, as a writable view needs: with the axes of
    /// extent > 1 ordered by stride, each stride is larger than the furthest offset that the
    /// smaller axes reach.
    fn is_one_to_one(&self) -> bool {
        if self.elem_count() == 0 {
            return true;
        }
        let mut axes = [(0usize, 0usize); MAX_VIEW_RANK];
        let mut len = 0;
        for (&extent, &stride) in self.shape().iter().zip(self.strides()) {
            if extent > 1 {
                axes[len] = (stride, extent);
                len += 1;
            }
        }
        let axes = &mut axes[..len];
        axes.sort_unstable();
        let mut reach = 0usize;
        for &(stride, extent) in axes.iter() {
            if stride <= reach {
                return false;
            }
            match (extent - 1).checked_mul(stride).and_then(|step| reach.checked_add(step)) {
                Some(next) => reach = next,
                None => return false,
            }
        }
        true
    }

    fn self_overlapping(&self) -> DlpackError {
        DlpackError::SelfOverlapping {
            shape: self.shape().to_vec(),
            strides: self.strides().to_vec(),
        }
    }
}

/// What both view kinds know: where the first element is, how the others lie, and what they are.
#[derive(Clone, Copy)]
struct RawView {
    base: *const u8,
    /// Bytes from `base` to one past the furthest element.
    len: usize,
    dims: Dims,
    dtype: DType,
    device: Device,
}

impl RawView {
    fn from_checked(checked: &Checked<'_>) -> Result<Self, DlpackError> {
        Ok(RawView {
            base: checked.base,
            len: checked.len,
            dims: Dims::from_checked(checked)?,
            dtype: checked.dtype,
            device: checked.device,
        })
    }

    /// A host slice of `T` as a view of `shape` and `strides`, checked to stay inside it.
    fn from_slice<T: Element>(
        data: &[T],
        shape: &[usize],
        strides: Option<&[usize]>,
    ) -> Result<Self, DlpackError> {
        let contiguous;
        let strides = match strides {
            Some(strides) => strides,
            None => {
                contiguous = row_major(shape)?;
                &contiguous.strides[..shape.len()]
            }
        };
        if strides.len() != shape.len() {
            return Err(DlpackError::MetadataOverflow("the strides' length differs from the rank"));
        }
        let dims = Dims::new(shape, strides)?;
        let span = dims.span().ok_or(DlpackError::ExtentOverflow("strides"))?;
        if span > data.len() {
            return Err(DlpackError::SliceTooShort { len: data.len(), needed: span });
        }
        Ok(RawView {
            base: data.as_ptr().cast(),
            len: span * size_of::<T>(),
            dims,
            dtype: T::DTYPE,
            device: Device::Cpu,
        })
    }

    fn host_check<T: Element>(&self, rank: usize) -> Result<(), ViewError> {
        if self.device != Device::Cpu {
            return Err(ViewError::NotHost(self.device));
        }
        if self.dtype != T::DTYPE {
            return Err(ViewError::DType { expected: T::DTYPE, actual: self.dtype });
        }
        if self.dims.rank != rank {
            return Err(ViewError::Rank { expected: rank, actual: self.dims.rank });
        }
        Ok(())
    }

    /// The first element as a pointer `ndarray` accepts: dangling (non-null, aligned) when the
    /// view is empty, since an empty DLPack tensor may have a null data pointer.
    fn element_ptr<T>(&self) -> *mut T {
        if self.dims.elem_count() == 0 {
            NonNull::<T>::dangling().as_ptr()
        } else {
            self.base.cast_mut().cast()
        }
    }

    fn extent(&self) -> Extent {
        Extent { device: self.device, start: self.base as usize, len: self.len }
    }
}

/// Where a view's bytes lie: all it takes to tell whether two views share memory, small enough
/// to gather for every argument of a call (a whole view carries its shape and strides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    device: Device,
    start: usize,
    len: usize,
}

impl Extent {
    /// Whether the two share any byte on the same device.
    pub(crate) fn overlaps(&self, other: &Extent) -> bool {
        self.device == other.device
            && self.len > 0
            && other.len > 0
            && self.start < other.start.saturating_add(other.len)
            && other.start < self.start.saturating_add(self.len)
    }
}

/// Row-major strides of `shape`, inline.
fn row_major(shape: &[usize]) -> Result<Dims, DlpackError> {
    let mut strides = [0usize; MAX_VIEW_RANK];
    if shape.len() > MAX_VIEW_RANK {
        return Err(DlpackError::RankTooLarge { ndim: shape.len(), max: MAX_VIEW_RANK });
    }
    let mut next = 1usize;
    for axis in (0..shape.len()).rev() {
        strides[axis] = next;
        next = next.checked_mul(shape[axis]).ok_or(DlpackError::ExtentOverflow("element count"))?;
    }
    Dims::new(shape, &strides[..shape.len()])
}

/// The descriptor inside an owned DLPack tensor of either ABI, with its version and flags.
fn header<M: ManagedTensorBase>(
    managed: &dlpark::Managed<M>,
) -> (&DLTensor, Option<(u32, u32)>, bool) {
    // SAFETY: the managed tensor owns its descriptor, which stays alive and unchanged while the
    // borrow of `managed` lasts.
    let header: &M = unsafe { &*managed.as_ptr() };
    let version = header.version().map(|v| (v.major, v.minor));
    let read_only = header.flags().contains(DlpackFlags::READ_ONLY);
    (header.tensor(), version, read_only)
}

/// Validates the descriptor of an owned DLPack tensor.
fn checked_managed<M: ManagedTensorBase>(
    managed: &dlpark::Managed<M>,
) -> Result<(RawView, bool), DlpackError> {
    let (tensor, version, read_only) = header(managed);
    // SAFETY: the producer's DLPack contract: shape and strides hold `ndim` values that live as
    // long as the managed tensor, which is borrowed for as long as the view.
    let checked = unsafe { validate(tensor, version) }?;
    Ok((RawView::from_checked(&checked)?, read_only))
}

/// A borrowed, validated, read-only DLPack tensor: a backend's input.
///
/// It is `Copy`, holds its shape and strides inline, and borrows the data for `'a`. Typed host
/// access ([`as_array2`](DlpackView::as_array2) and friends) checks the device, the dtype and the
/// rank; device memory is reached through [`data_ptr`](DlpackView::data_ptr) by the backend that
/// owns the device.
#[derive(Clone, Copy)]
pub struct DlpackView<'a> {
    raw: RawView,
    _data: PhantomData<&'a [u8]>,
}

// SAFETY: a `DlpackView` is a shared borrow of immutable memory (`&'a [u8]` with metadata); like a
// shared slice it may be sent to and read from any thread.
unsafe impl Send for DlpackView<'_> {}
// SAFETY: as above; there is no interior mutability.
unsafe impl Sync for DlpackView<'_> {}

impl<'a> DlpackView<'a> {
    fn new(raw: RawView) -> Self {
        DlpackView { raw, _data: PhantomData }
    }

    /// A view of an owned versioned DLPack tensor.
    pub fn from_dlpack(tensor: &'a Dlpack) -> Result<Self, DlpackError> {
        Ok(Self::new(checked_managed(tensor)?.0))
    }

    /// A view of an owned legacy DLPack tensor.
    pub fn from_legacy(tensor: &'a LegacyDlpack) -> Result<Self, DlpackError> {
        Ok(Self::new(checked_managed(tensor)?.0))
    }

    /// A view of a sluice tensor. A tensor that requires grad is refused with
    /// [`DlpackError::RequiresGrad`], exactly as its export is; call [`Tensor::detach`] first.
    pub fn from_tensor(tensor: &'a Tensor) -> Result<Self, DlpackError> {
        if tensor.requires_grad() {
            return Err(DlpackError::RequiresGrad);
        }
        let dims = Dims::new(tensor.shape(), tensor.strides())?;
        let size = tensor.dtype().size_in_bytes();
        let span = dims.span().ok_or(DlpackError::ExtentOverflow("strides"))?;
        Ok(Self::new(RawView {
            base: tensor.data_ptr(),
            // The tensor's layout was checked against its storage when it was built.
            len: span * size,
            dims,
            dtype: tensor.dtype(),
            device: tensor.device(),
        }))
    }

    /// A contiguous row-major view of a host slice; its length must equal the shape's element
    /// count.
    pub fn from_slice<T: Element>(data: &'a [T], shape: &[usize]) -> Result<Self, DlpackError> {
        check_len(data.len(), shape)?;
        Ok(Self::new(RawView::from_slice(data, shape, None)?))
    }

    /// A strided view of a host slice (strides in elements), checked to stay inside it.
    pub fn from_slice_strided<T: Element>(
        data: &'a [T],
        shape: &[usize],
        strides: &[usize],
    ) -> Result<Self, DlpackError> {
        Ok(Self::new(RawView::from_slice(data, shape, Some(strides))?))
    }

    /// A view of a bare `DLTensor`, as C callers hand one over (null strides mean row-major).
    ///
    /// # Safety
    ///
    /// `tensor` is null or points to a `DLTensor` whose shape and strides arrays hold `ndim`
    /// values, and whose data covers the described extent on its device; all of it stays valid and
    /// unwritten by anyone else for `'a`.
    pub unsafe fn from_raw(tensor: *const DLTensor) -> Result<Self, DlpackError> {
        if tensor.is_null() {
            return Err(DlpackError::NullTensor);
        }
        // SAFETY: non-null and valid for `'a` by this function's contract.
        let tensor: &'a DLTensor = unsafe { &*tensor };
        // SAFETY: shape and strides hold `ndim` values valid for `'a` (this function's contract).
        let checked = unsafe { validate(tensor, None) }?;
        Ok(Self::new(RawView::from_checked(&checked)?))
    }

    /// The extents.
    pub fn shape(&self) -> &[usize] {
        self.raw.dims.shape()
    }

    /// The strides, in elements.
    pub fn strides(&self) -> &[usize] {
        self.raw.dims.strides()
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.raw.dims.rank
    }

    /// The number of elements.
    pub fn elem_count(&self) -> usize {
        self.raw.dims.elem_count()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.raw.dtype
    }

    /// Where the data lives.
    pub fn device(&self) -> Device {
        self.raw.device
    }

    /// The address of the first element (data pointer plus byte offset), on [`device`](Self::device).
    pub fn data_ptr(&self) -> *const u8 {
        self.raw.base
    }

    /// Bytes from the first element to one past the furthest.
    pub fn byte_len(&self) -> usize {
        self.raw.len
    }

    /// Whether the two views share any byte on the same device.
    pub fn overlaps(&self, other: &DlpackView<'_>) -> bool {
        self.raw.extent().overlaps(&other.raw.extent())
    }

    /// Where the view's bytes lie.
    pub(crate) fn extent(&self) -> Extent {
        self.raw.extent()
    }

    /// The host data as a typed one-dimensional array.
    pub fn as_array1<T: Element>(&self) -> Result<ArrayView1<'a, T>, ViewError> {
        self.raw.host_check::<T>(1)?;
        let (len, stride) = (self.shape()[0], self.strides()[0]);
        // SAFETY: host memory of `T` (checked), covering `len` elements at `stride` from a non-null
        // aligned pointer (validated when the view was made), borrowed immutably for `'a`.
        Ok(unsafe { ArrayView1::from_shape_ptr(len.strides(stride), self.raw.element_ptr()) })
    }

    /// The host data as a typed two-dimensional array.
    pub fn as_array2<T: Element>(&self) -> Result<ArrayView2<'a, T>, ViewError> {
        self.raw.host_check::<T>(2)?;
        let (shape, strides) = (self.shape(), self.strides());
        let dim = (shape[0], shape[1]).strides((strides[0], strides[1]));
        // SAFETY: host memory of `T` (checked), covering the shape at these strides from a
        // non-null aligned pointer (validated when the view was made), borrowed immutably for
        // `'a`.
        Ok(unsafe { ArrayView2::from_shape_ptr(dim, self.raw.element_ptr()) })
    }

    /// The host data as a typed array of any rank (for copies; building the dynamic shape may
    /// allocate).
    pub fn as_array_dyn<T: Element>(&self) -> Result<ArrayViewD<'a, T>, ViewError> {
        self.raw.host_check::<T>(self.rank())?;
        let dim = IxDyn(self.shape()).strides(IxDyn(self.strides()));
        // SAFETY: as in `as_array2`.
        Ok(unsafe { ArrayViewD::from_shape_ptr(dim, self.raw.element_ptr()) })
    }
}

impl fmt::Debug for DlpackView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_view("DlpackView", &self.raw, f)
    }
}

fn debug_view(name: &str, raw: &RawView, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.debug_struct(name)
        .field("shape", &raw.dims.shape())
        .field("strides", &raw.dims.strides())
        .field("dtype", &raw.dtype)
        .field("device", &raw.device)
        .finish()
}

fn check_len(len: usize, shape: &[usize]) -> Result<(), DlpackError> {
    let needed = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or(DlpackError::ExtentOverflow("element count"))?;
    if needed != len {
        return Err(DlpackError::LengthMismatch { len, needed });
    }
    Ok(())
}

/// A borrowed, validated, writable DLPack tensor: an output the caller owns.
///
/// Every constructor refuses memory marked read-only and strides that reach one element through
/// two indices, so writes through it never alias each other. [`as_view`](Self::as_view) reads it.
pub struct DlpackViewMut<'a> {
    raw: RawView,
    _data: PhantomData<&'a mut [u8]>,
}

// SAFETY: a `DlpackViewMut` is an exclusive borrow of memory (`&'a mut [u8]` with metadata); like
// a mutable slice it may move to another thread, and shared references to it only read metadata
// or hand out read-only views.
unsafe impl Send for DlpackViewMut<'_> {}
// SAFETY: as above.
unsafe impl Sync for DlpackViewMut<'_> {}

impl<'a> DlpackViewMut<'a> {
    fn new(raw: RawView) -> Result<Self, DlpackError> {
        if !raw.dims.is_one_to_one() {
            return Err(raw.dims.self_overlapping());
        }
        Ok(DlpackViewMut { raw, _data: PhantomData })
    }

    /// A writable view of an owned versioned DLPack tensor; refused if its producer marked it
    /// read-only.
    pub fn from_dlpack(tensor: &'a mut Dlpack) -> Result<Self, DlpackError> {
        let (raw, read_only) = checked_managed(tensor)?;
        if read_only {
            return Err(DlpackError::ReadOnly);
        }
        Self::new(raw)
    }

    /// A writable contiguous row-major view of a host slice; its length must equal the shape's
    /// element count.
    pub fn from_slice<T: Element>(data: &'a mut [T], shape: &[usize]) -> Result<Self, DlpackError> {
        check_len(data.len(), shape)?;
        Self::new(RawView::from_slice(data, shape, None)?)
    }

    /// A writable strided view of a host slice (a window of a larger buffer, say), checked to stay
    /// inside it.
    pub fn from_slice_strided<T: Element>(
        data: &'a mut [T],
        shape: &[usize],
        strides: &[usize],
    ) -> Result<Self, DlpackError> {
        Self::new(RawView::from_slice(data, shape, Some(strides))?)
    }

    /// A writable view of a bare `DLTensor` (null strides mean row-major).
    ///
    /// # Safety
    ///
    /// As for [`DlpackView::from_raw`], and the memory may be written: nobody else reads or
    /// writes it for `'a`.
    pub unsafe fn from_raw(tensor: *mut DLTensor) -> Result<Self, DlpackError> {
        // SAFETY: forwarded from this function's contract, which is stronger.
        let view = unsafe { DlpackView::from_raw(tensor) }?;
        Self::new(view.raw)
    }

    /// A read-only view of the same memory, for as long as this borrow lasts.
    pub fn as_view(&self) -> DlpackView<'_> {
        DlpackView::new(self.raw)
    }

    /// Where the view's bytes lie.
    pub(crate) fn extent(&self) -> Extent {
        self.raw.extent()
    }

    /// A shorter-lived writable view of the same memory.
    pub fn reborrow(&mut self) -> DlpackViewMut<'_> {
        DlpackViewMut { raw: self.raw, _data: PhantomData }
    }

    /// The extents.
    pub fn shape(&self) -> &[usize] {
        self.raw.dims.shape()
    }

    /// The strides, in elements.
    pub fn strides(&self) -> &[usize] {
        self.raw.dims.strides()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.raw.dtype
    }

    /// Where the data lives.
    pub fn device(&self) -> Device {
        self.raw.device
    }

    /// The address of the first element, on [`device`](Self::device), for a backend to write.
    pub fn data_ptr_mut(&mut self) -> *mut u8 {
        self.raw.base.cast_mut()
    }

    /// The host data as a writable typed one-dimensional array.
    pub fn as_array1_mut<T: Element>(&mut self) -> Result<ArrayViewMut1<'_, T>, ViewError> {
        self.raw.host_check::<T>(1)?;
        let (len, stride) = (self.shape()[0], self.strides()[0]);
        // SAFETY: host memory of `T` (checked) covering the extent from a non-null aligned pointer,
        // borrowed exclusively for as long as `self` is; every index reaches its own element
        // (checked when the view was made).
        Ok(unsafe { ArrayViewMut1::from_shape_ptr(len.strides(stride), self.raw.element_ptr()) })
    }

    /// The host data as a writable typed two-dimensional array.
    pub fn as_array2_mut<T: Element>(&mut self) -> Result<ArrayViewMut2<'_, T>, ViewError> {
        self.raw.host_check::<T>(2)?;
        let (shape, strides) = (self.shape(), self.strides());
        let dim = (shape[0], shape[1]).strides((strides[0], strides[1]));
        // SAFETY: as in `as_array1_mut`.
        Ok(unsafe { ArrayViewMut2::from_shape_ptr(dim, self.raw.element_ptr()) })
    }
}

impl fmt::Debug for DlpackViewMut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_view("DlpackViewMut", &self.raw, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_to_one_strides() {
        let dims = |shape: &[usize], strides: &[usize]| Dims::new(shape, strides).unwrap();
        assert!(dims(&[3, 4], &[4, 1]).is_one_to_one());
        assert!(dims(&[3, 4], &[10, 1]).is_one_to_one());
        assert!(dims(&[3, 4], &[1, 3]).is_one_to_one());
        assert!(dims(&[1, 4], &[0, 1]).is_one_to_one());
        assert!(!dims(&[3, 4], &[0, 1]).is_one_to_one());
        assert!(!dims(&[3, 4], &[2, 1]).is_one_to_one());
        assert!(!dims(&[2, 2], &[1, 1]).is_one_to_one());
        // An empty view reaches no element at all.
        assert!(dims(&[0, 4], &[0, 0]).is_one_to_one());
    }
}
