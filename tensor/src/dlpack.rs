//! The DLPack bridge: the only door between sluice tensors and compute backends.
//!
//! Export ([`Tensor::to_dlpack`](crate::Tensor::to_dlpack)) refuses a tensor that requires grad;
//! import ([`Tensor::from_dlpack`](crate::Tensor::from_dlpack)) is zero-copy and validates every
//! field a producer could get wrong.

use std::sync::Arc;

use dlpark::ffi::{DLManagedTensor, DLManagedTensorVersioned, DLTensor};
use dlpark::metadata::Dynamic;
use dlpark::{DlpackFlags, Managed, ManagedTensorBase, OpaqueContext};
use thiserror::Error;

use crate::storage::Storage;
use crate::{DType, Device, Element, Layout, Tensor};

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
    /// A buffer holds a different number of elements than its shape needs.
    #[error("a buffer of {len} elements was given for a shape of {needed} elements")]
    LengthMismatch {
        /// Elements given.
        len: usize,
        /// Elements the shape needs.
        needed: usize,
    },
    /// A strided view reaches past the end of the slice it was made from.
    #[error("the view reaches element {needed} but the slice holds only {len}")]
    SliceTooShort {
        /// Elements in the slice.
        len: usize,
        /// Elements the view spans.
        needed: usize,
    },
    /// A writable view was asked of a tensor its producer marked read-only.
    #[error("the DLPack tensor is marked read-only; a writable view needs a writable tensor")]
    ReadOnly,
    /// A writable view whose strides reach one element through two indices.
    #[error(
        "shape {shape:?} with strides {strides:?} reaches some element twice; a writable view \
         needs every element at its own address"
    )]
    SelfOverlapping {
        /// The shape.
        shape: Vec<usize>,
        /// The strides in elements.
        strides: Vec<usize>,
    },
    /// A view of more dimensions than views hold.
    #[error("a view holds at most {max} dimensions, the tensor has {ndim}")]
    RankTooLarge {
        /// The tensor's rank.
        ndim: usize,
        /// The most a view holds.
        max: usize,
    },
    /// A raw `DLTensor` pointer was null.
    #[error("the DLTensor pointer is null")]
    NullTensor,
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

/// Converts a tensor's `usize` metadata to DLPack's `i64`.
fn to_i64(values: &[usize], what: &'static str) -> Result<Vec<i64>, DlpackError> {
    values
        .iter()
        .map(|&v| i64::try_from(v).map_err(|_| DlpackError::MetadataOverflow(what)))
        .collect()
}

/// Builds a managed tensor of either ABI that owns `ctx` and points at `data`.
///
/// # Safety
///
/// `data + byte_offset` must address the tensor described by `shape`, `strides` and `dtype` on
/// `device`, valid for as long as `ctx` is alive; `read_only` must be set unless the consumer may
/// write the memory.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn build<M: ManagedTensorBase>(
    ctx: impl OpaqueContext,
    data: *const u8,
    byte_offset: usize,
    shape: &[usize],
    strides: &[usize],
    dtype: DType,
    device: Device,
    read_only: bool,
) -> Result<Managed<M>, DlpackError> {
    let dl_device = device.to_dlpack().ok_or(DlpackError::MetadataOverflow("device ordinal"))?;
    let byte_offset =
        u64::try_from(byte_offset).map_err(|_| DlpackError::MetadataOverflow("byte offset"))?;
    let mut init = Dynamic::new(to_i64(shape, "shape")?, to_i64(strides, "strides")?)
        .initialize_as::<M>(ctx)
        .map_err(|_| DlpackError::MetadataOverflow("rank"))?;
    init.set_data(data.cast_mut().cast())
        .set_byte_offset(byte_offset)
        .set_dtype(dtype.to_dlpack())
        .set_device(dl_device);
    if read_only {
        init.set_flags(DlpackFlags::READ_ONLY)
            .map_err(|_| DlpackError::MetadataOverflow("flags"))?;
    }
    // SAFETY: shape and explicit strides were copied from a validated layout; `data` stays valid
    // while `ctx` lives (caller's contract), and the generated deleter releases `ctx` exactly once.
    // READ_ONLY is as the caller decided; IS_COPIED is never asserted.
    Ok(unsafe { init.finish() })
}

fn export<M: ManagedTensorBase>(tensor: &Tensor) -> Result<Managed<M>, DlpackError> {
    let _span = tracing::debug_span!(
        "dlpack_export",
        shape = ?tensor.shape(),
        dtype = %tensor.dtype(),
        device = %tensor.device(),
        requires_grad = tensor.requires_grad(),
    )
    .entered();
    if tensor.requires_grad() {
        tracing::debug!("refused: the tensor requires grad");
        return Err(DlpackError::RequiresGrad);
    }
    let storage: Arc<Storage> = Arc::clone(tensor.storage());
    let data = storage.as_ptr();
    let byte_offset = tensor
        .offset()
        .checked_mul(tensor.dtype().size_in_bytes())
        .ok_or(DlpackError::MetadataOverflow("byte offset"))?;
    // READ_ONLY is always set: sluice tensors are immutable and the exporter keeps sharing the
    // storage, so exclusivity can never be promised.
    // SAFETY: the storage Arc is the context, so `data` stays valid until the consumer's deleter
    // drops it; the layout was checked against the storage when the tensor was built.
    unsafe {
        build::<M>(
            storage,
            data,
            byte_offset,
            tensor.shape(),
            tensor.strides(),
            tensor.dtype(),
            tensor.device(),
            true,
        )
    }
}

/// Hands a host `Vec` to a DLPack consumer without a copy: the managed tensor owns the vector and
/// frees it in its deleter. This is how backends return host outputs.
pub fn export_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Dlpack, DlpackError> {
    let layout = Layout::contiguous(shape).map_err(|_| DlpackError::MetadataOverflow("shape"))?;
    if layout.elem_count() != data.len() {
        return Err(DlpackError::LengthMismatch { len: data.len(), needed: layout.elem_count() });
    }
    let ptr = data.as_ptr().cast::<u8>();
    let owner = Box::new(data);
    // SAFETY: moving the vector into the box does not move its heap buffer, so `ptr` stays valid
    // until the deleter drops the box; the buffer holds exactly `shape`'s elements, contiguous. The
    // consumer becomes the only owner, so the tensor is writable (no READ_ONLY).
    unsafe {
        build::<DLManagedTensorVersioned>(
            owner,
            ptr,
            0,
            layout.shape(),
            layout.strides(),
            T::DTYPE,
            Device::Cpu,
            false,
        )
    }
}

/// The fields of a DLPack descriptor after validation, borrowed from it (nothing is allocated, so
/// a backend can validate its arguments on every call of a hot loop).
pub(crate) struct Checked<'a> {
    /// The first element: the data pointer plus the byte offset.
    pub(crate) base: *const u8,
    /// Bytes from `base` to one past the furthest element (0 for an empty tensor).
    pub(crate) len: usize,
    /// The extents, each non-negative.
    pub(crate) shape: &'a [i64],
    /// The strides in elements, each non-negative; `None` means compact row-major.
    pub(crate) strides: Option<&'a [i64]>,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
}

impl Checked<'_> {
    /// The extent of `axis` (validated non-negative).
    pub(crate) fn extent(&self, axis: usize) -> usize {
        self.shape[axis] as usize
    }

    /// The stride of `axis` in elements (validated non-negative and, for row-major, computed
    /// without overflow).
    pub(crate) fn stride(&self, axis: usize) -> usize {
        match self.strides {
            Some(strides) => strides[axis] as usize,
            None => self.shape[axis + 1..].iter().map(|&d| d as usize).product(),
        }
    }
}

/// Validates a raw descriptor: the one validation routine of the bridge, shared by the owning
/// import ([`Tensor::from_dlpack`]) and the borrowed views ([`DlpackView`](crate::DlpackView)).
/// `version` is `None` for the legacy ABI and for a bare `DLTensor`.
///
/// # Safety
///
/// `dl.shape` (and `dl.strides` if non-null) must point to `dl.ndim` readable `i64`s that stay
/// valid and unchanged for `'a`, as the DLPack contract of the producer promises.
pub(crate) unsafe fn validate<'a>(
    dl: &'a DLTensor,
    version: Option<(u32, u32)>,
) -> Result<Checked<'a>, DlpackError> {
    if dl.ndim < 0 {
        return Err(DlpackError::NegativeNdim(dl.ndim));
    }
    let ndim = dl.ndim as usize;
    if ndim > 0 && dl.shape.is_null() {
        return Err(DlpackError::NullShape(dl.ndim));
    }
    if dl.dtype.lanes != 1 {
        return Err(DlpackError::Lanes(dl.dtype.lanes));
    }
    let dtype = DType::from_dlpack(dl.dtype)
        .ok_or(DlpackError::UnsupportedDType { code: dl.dtype.code.0, bits: dl.dtype.bits })?;
    let device = Device::from_dlpack(dl.device).ok_or(DlpackError::UnsupportedDevice {
        device_type: dl.device.device_type.0,
        device_id: dl.device.device_id,
    })?;
    let shape: &'a [i64] = if ndim == 0 {
        &[]
    } else {
        // SAFETY: non-null (checked above), `ndim` entries long and valid for `'a` by the caller's
        // contract.
        unsafe { std::slice::from_raw_parts(dl.shape, ndim) }
    };
    if let Some((axis, &value)) = shape.iter().enumerate().find(|(_, d)| **d < 0) {
        return Err(DlpackError::NegativeDimension { axis, value });
    }
    let strides: Option<&'a [i64]> = if dl.strides.is_null() {
        if let Some((major, minor)) = version
            && (major, minor) >= (1, 2)
            && ndim > 0
        {
            return Err(DlpackError::MissingStrides { major, minor, ndim: dl.ndim });
        }
        None
    } else {
        // SAFETY: non-null, `ndim` entries long and valid for `'a` by the caller's contract.
        let strides = unsafe { std::slice::from_raw_parts(dl.strides, ndim) };
        if let Some((axis, &value)) = strides.iter().enumerate().find(|(_, s)| **s < 0) {
            return Err(DlpackError::NegativeStride { axis, value });
        }
        Some(strides)
    };
    // Row-major strides are suffix products of the shape: they must fit even when the tensor is
    // empty, because consumers compute addresses with them.
    let mut suffix = 1usize;
    for &extent in shape.iter().rev() {
        suffix = suffix
            .checked_mul(extent as usize)
            .ok_or(DlpackError::ExtentOverflow("element count"))?;
    }
    let elem_count = suffix;
    let mut furthest = 0usize;
    if elem_count > 0 {
        for axis in 0..ndim {
            let stride = match strides {
                Some(strides) => strides[axis] as usize,
                None => shape[axis + 1..].iter().map(|&d| d as usize).product(),
            };
            furthest = (shape[axis] as usize - 1)
                .checked_mul(stride)
                .and_then(|step| furthest.checked_add(step))
                .ok_or(DlpackError::ExtentOverflow("strides"))?;
        }
    }
    let span = if elem_count == 0 { 0 } else { furthest + 1 };
    let len = span
        .checked_mul(dtype.size_in_bytes())
        .filter(|&len| isize::try_from(len).is_ok())
        .ok_or(DlpackError::ExtentOverflow("byte length"))?;
    let byte_offset =
        usize::try_from(dl.byte_offset).map_err(|_| DlpackError::ExtentOverflow("byte offset"))?;
    let data = dl.data as usize;
    if elem_count > 0 && data == 0 {
        return Err(DlpackError::NullData(elem_count));
    }
    let base = data.checked_add(byte_offset).ok_or(DlpackError::ExtentOverflow("byte offset"))?;
    base.checked_add(len).ok_or(DlpackError::ExtentOverflow("address space"))?;
    if elem_count > 0 && !base.is_multiple_of(dtype.size_in_bytes()) {
        return Err(DlpackError::Misaligned { address: base, align: dtype.size_in_bytes(), dtype });
    }
    Ok(Checked {
        base: (dl.data as *const u8).wrapping_add(byte_offset),
        len,
        shape,
        strides,
        dtype,
        device,
    })
}

fn import<M: ManagedTensorBase>(managed: Managed<M>) -> Result<Tensor, DlpackError> {
    // SAFETY: `managed` owns a descriptor that stays alive and unmodified until it is dropped.
    let header: &M = unsafe { &*managed.as_ptr() };
    let version = header.version().map(|v| (v.major, v.minor));
    let read_only = header.flags().contains(DlpackFlags::READ_ONLY);
    let _span = tracing::debug_span!("dlpack_import", ?version, read_only).entered();
    // SAFETY: the producer's DLPack contract: shape/strides point to `ndim` readable values that
    // live as long as the managed tensor.
    let checked = match unsafe { validate(header.tensor(), version) } {
        Ok(checked) => checked,
        Err(error) => {
            tracing::debug!(%error, "refused");
            // Dropping `managed` runs the producer's deleter exactly once.
            return Err(error);
        }
    };
    let (base, len, dtype, device) = (checked.base, checked.len, checked.dtype, checked.device);
    let shape: Vec<usize> = (0..checked.shape.len()).map(|axis| checked.extent(axis)).collect();
    let strides: Vec<usize> = (0..shape.len()).map(|axis| checked.stride(axis)).collect();
    tracing::debug!(?shape, %dtype, %device, "imported");
    let release = managed.into_deleter();
    // SAFETY: validation proved `base` addresses `len` bytes spanning the whole view (on
    // `device`); the producer keeps them valid until its deleter runs, which happens when
    // `release` is dropped together with the storage. sluice never writes storage, and the
    // producer promised (see `Tensor::from_dlpack`) not to write it while sluice holds it.
    let storage = unsafe { Storage::foreign(base, len, device, read_only, release) };
    let layout =
        Layout::strided(&shape, &strides, 0).map_err(|_| DlpackError::ExtentOverflow("strides"))?;
    Tensor::from_parts(Arc::new(storage), layout, dtype)
        .map_err(|_| DlpackError::ExtentOverflow("layout"))
}

impl Tensor {
    /// Exports the tensor as a versioned DLPack tensor, sharing its storage (no copy).
    ///
    /// The consumer may outlive `self`: the managed tensor holds a reference to the storage.
    /// `READ_ONLY` is always set. A tensor that requires grad is refused with
    /// [`DlpackError::RequiresGrad`]; call [`detach`](Tensor::detach) first.
    pub fn to_dlpack(&self) -> Result<Dlpack, DlpackError> {
        export::<DLManagedTensorVersioned>(self)
    }

    /// Like [`to_dlpack`](Tensor::to_dlpack), as a legacy (pre-1.0) `DLManagedTensor`.
    ///
    /// Legacy DLPack has no flags, so nothing tells the consumer that the memory is shared and must
    /// not be written: only hand a legacy export to a consumer that reads. Prefer
    /// [`to_dlpack`](Tensor::to_dlpack), which sets `READ_ONLY`.
    pub fn to_dlpack_legacy(&self) -> Result<LegacyDlpack, DlpackError> {
        export::<DLManagedTensor>(self)
    }

    /// Imports a versioned DLPack tensor without a copy, after validating every field.
    ///
    /// The producer's deleter runs exactly once: when the last tensor sharing the import is dropped,
    /// or right away if validation fails. Imported tensors do not require grad.
    ///
    /// A sluice tensor is immutable, and safe code reads it freely from any thread. That holds only
    /// if the producer does not write the memory while sluice holds it: handing a tensor over
    /// through DLPack transfers the right to read it, and a producer that keeps writing (an engine
    /// reusing the buffer for the next step, say) must wait until the import is dropped, or hand
    /// over a copy.
    pub fn from_dlpack(tensor: Dlpack) -> Result<Tensor, DlpackError> {
        import(tensor)
    }

    /// Imports a legacy `DLManagedTensor` (strides may be null: compact row-major). The producer
    /// must not write the memory while sluice holds it, as for [`from_dlpack`](Tensor::from_dlpack).
    pub fn from_dlpack_legacy(tensor: LegacyDlpack) -> Result<Tensor, DlpackError> {
        import(tensor)
    }

    /// Imports a raw versioned managed tensor, as handed over by C or a Python capsule.
    ///
    /// # Safety
    ///
    /// `ptr` is null or points to a `DLManagedTensorVersioned` the caller owns (ownership moves to
    /// sluice) whose shape and strides arrays hold `ndim` values and whose deleter may be called
    /// once from any thread.
    pub unsafe fn from_raw_dlpack(
        ptr: *mut DLManagedTensorVersioned,
    ) -> Result<Tensor, DlpackError> {
        if ptr.is_null() {
            return Err(DlpackError::NullManagedTensor);
        }
        // SAFETY: non-null and pointing to an initialised managed tensor (this function's contract).
        let declared = unsafe { (*ptr).version };
        // SAFETY: forwarded from this function's contract. On a version mismatch dlpark releases
        // the tensor through its deleter before returning the error.
        match unsafe { Managed::from_raw(ptr) } {
            Ok(managed) => import(managed),
            Err(_) => Err(DlpackError::IncompatibleVersion {
                major: declared.major,
                minor: declared.minor,
            }),
        }
    }
}
