//! Where a tensor's bytes live, and who frees them.
//!
//! A [`Storage`] is never mutated after construction (sluice tensors are immutable), which is what
//! makes sharing it between tensors, threads and DLPack consumers sound.

use std::alloc::{self, Layout as AllocLayout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use dlpark::AllocationDeleter;

use crate::{DType, Device, TensorError};

/// Alignment of host memory that sluice allocates: a cache line, and enough for any SIMD load.
pub const HOST_ALIGN: usize = 64;

/// A read-only region of bytes owned by someone else, such as a memory-mapped file.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// The bytes behind one or more tensors.
pub struct Storage {
    kind: Kind,
}

enum Kind {
    /// Host memory allocated by sluice, aligned to [`HOST_ALIGN`].
    Owned(AlignedBuffer),
    /// A read-only window into a shared region (a memory-mapped checkpoint).
    Mapped { region: SharedBytes, offset: usize, len: usize },
    /// Memory imported through DLPack; the deleter returns it to its producer.
    Foreign {
        data: *const u8,
        len: usize,
        device: Device,
        read_only: bool,
        _release: AllocationDeleter,
    },
    /// Device memory owned by a backend.
    Device(DeviceAllocation),
}

// SAFETY: `Kind::Foreign` holds a raw pointer, which makes `Storage` neither `Send` nor `Sync` by
// default. The pointed-to memory is never written through this storage (there is no mutable access),
// DLPack requires the producer's deleter to be callable from any thread (and `AllocationDeleter` is
// itself `Send + Sync`), and the other variants hold only `Send + Sync` data.
unsafe impl Send for Storage {}
// SAFETY: see the `Send` impl: shared access only ever reads immutable memory.
unsafe impl Sync for Storage {}

impl Storage {
    /// A new zero-filled host allocation of `len` bytes, aligned to [`HOST_ALIGN`].
    pub(crate) fn owned_zeroed(len: usize) -> Result<Self, TensorError> {
        Ok(Storage { kind: Kind::Owned(AlignedBuffer::zeroed(len)?) })
    }

    /// A host allocation holding a copy of `bytes`.
    pub(crate) fn owned_copy(bytes: &[u8]) -> Result<Self, TensorError> {
        let mut buffer = AlignedBuffer::zeroed(bytes.len())?;
        buffer.as_mut_slice().copy_from_slice(bytes);
        Ok(Storage { kind: Kind::Owned(buffer) })
    }

    /// A read-only window `[offset, offset + len)` of `region`.
    pub(crate) fn mapped(
        region: SharedBytes,
        offset: usize,
        len: usize,
    ) -> Result<Self, TensorError> {
        let available = (*region).as_ref().len();
        match offset.checked_add(len) {
            Some(end) if end <= available => {}
            _ => return Err(TensorError::OutOfBounds { needed: len, offset, region: available }),
        }
        Ok(Storage { kind: Kind::Mapped { region, offset, len } })
    }

    /// Memory imported through DLPack.
    ///
    /// # Safety
    ///
    /// `data` must be valid for reads of `len` bytes on `device` until `release` is dropped, and must
    /// not be written by anyone while this storage exists unless `device` is not the host.
    pub(crate) unsafe fn foreign(
        data: *const u8,
        len: usize,
        device: Device,
        read_only: bool,
        release: AllocationDeleter,
    ) -> Self {
        Storage { kind: Kind::Foreign { data, len, device, read_only, _release: release } }
    }

    /// Device memory owned by a backend.
    pub fn device_memory(allocation: DeviceAllocation) -> Self {
        Storage { kind: Kind::Device(allocation) }
    }

    /// The device the bytes live on.
    pub fn device(&self) -> Device {
        match &self.kind {
            Kind::Owned(_) | Kind::Mapped { .. } => Device::Cpu,
            Kind::Foreign { device, .. } => *device,
            Kind::Device(allocation) => allocation.device,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match &self.kind {
            Kind::Owned(buffer) => buffer.len,
            Kind::Mapped { len, .. } | Kind::Foreign { len, .. } => *len,
            Kind::Device(allocation) => allocation.len,
        }
    }

    /// Whether the storage holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the bytes must never be written (memory-mapped files, read-only imports).
    pub fn is_read_only(&self) -> bool {
        match &self.kind {
            Kind::Owned(_) | Kind::Device(_) => false,
            Kind::Mapped { .. } => true,
            Kind::Foreign { read_only, .. } => *read_only,
        }
    }

    /// The address of the first byte, on the storage's device.
    pub fn as_ptr(&self) -> *const u8 {
        match &self.kind {
            Kind::Owned(buffer) => buffer.ptr.as_ptr(),
            Kind::Mapped { region, offset, .. } => {
                // `offset` was checked against the region's length at construction.
                (**region).as_ref()[*offset..].as_ptr()
            }
            Kind::Foreign { data, .. } => *data,
            Kind::Device(allocation) => allocation.ptr as *const u8,
        }
    }

    /// The bytes, if they live in host memory.
    pub fn host_bytes(&self) -> Result<&[u8], TensorError> {
        match &self.kind {
            Kind::Owned(buffer) => Ok(buffer.as_slice()),
            Kind::Mapped { region, offset, len } => {
                Ok(&(**region).as_ref()[*offset..*offset + *len])
            }
            Kind::Foreign { data, len, device: Device::Cpu, .. } => {
                if *len == 0 {
                    return Ok(&[]);
                }
                // SAFETY: `Storage::foreign`'s contract: `data` is readable for `len` bytes on the
                // host until the deleter (owned by `self`) runs, and nobody writes it meanwhile.
                Ok(unsafe { std::slice::from_raw_parts(*data, *len) })
            }
            Kind::Foreign { device, .. } => Err(TensorError::NotHost(*device)),
            Kind::Device(allocation) => Err(TensorError::NotHost(allocation.device)),
        }
    }

    /// A short description of the storage kind, for debugging.
    fn kind_name(&self) -> &'static str {
        match &self.kind {
            Kind::Owned(_) => "owned",
            Kind::Mapped { .. } => "mapped",
            Kind::Foreign { .. } => "foreign",
            Kind::Device(_) => "device",
        }
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("kind", &self.kind_name())
            .field("device", &self.device())
            .field("len", &self.len())
            .finish()
    }
}

/// Checks that `ptr` is aligned for `dtype`.
pub(crate) fn check_alignment(ptr: *const u8, dtype: DType) -> Result<(), TensorError> {
    if (ptr as usize).is_multiple_of(dtype.size_in_bytes()) {
        Ok(())
    } else {
        Err(TensorError::Misaligned { address: ptr as usize, dtype })
    }
}

/// Zero-initialised host bytes aligned to [`HOST_ALIGN`].
struct AlignedBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

impl AlignedBuffer {
    fn zeroed(len: usize) -> Result<Self, TensorError> {
        if len == 0 {
            // A dangling but aligned pointer: never dereferenced for zero bytes, never freed.
            let ptr = NonNull::new(HOST_ALIGN as *mut u8).unwrap_or(NonNull::dangling());
            return Ok(AlignedBuffer { ptr, len });
        }
        let layout = AllocLayout::from_size_align(len, HOST_ALIGN)
            .map_err(|_| TensorError::Overflow(vec![len]))?;
        // SAFETY: `layout` has a non-zero size (checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        match NonNull::new(raw) {
            Some(ptr) => Ok(AlignedBuffer { ptr, len }),
            None => alloc::handle_alloc_error(layout),
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised (zeroed or copied) bytes, owned by `self`;
        // for `len == 0` a dangling aligned pointer is valid for an empty slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        if let Ok(layout) = AllocLayout::from_size_align(self.len, HOST_ALIGN) {
            // SAFETY: `ptr` was allocated in `zeroed` with exactly this layout and is freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

// SAFETY: `AlignedBuffer` uniquely owns its allocation, like a `Box<[u8]>`.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared access only reads.
unsafe impl Sync for AlignedBuffer {}

/// Device memory handed to sluice by a backend, with the backend's own release.
pub struct DeviceAllocation {
    ptr: u64,
    len: usize,
    device: Device,
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl DeviceAllocation {
    /// Wraps a device allocation.
    ///
    /// # Safety
    ///
    /// `ptr` must be the address of `len` bytes of memory on `device` that stay valid until `release`
    /// is called, and `release` must free it (or do nothing if someone else does) without unwinding.
    /// `release` runs exactly once, when the last tensor that uses the allocation is dropped.
    pub unsafe fn new(
        ptr: u64,
        len: usize,
        device: Device,
        release: Box<dyn FnOnce() + Send + Sync>,
    ) -> Self {
        DeviceAllocation { ptr, len, device, release: Some(release) }
    }
}

impl Drop for DeviceAllocation {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_storage_is_aligned() {
        for len in [1, 3, 64, 1000, 4096 + 7] {
            let storage = Storage::owned_zeroed(len).unwrap();
            assert_eq!(storage.as_ptr() as usize % HOST_ALIGN, 0, "len {len}");
            assert_eq!(storage.len(), len);
            assert!(storage.host_bytes().unwrap().iter().all(|&b| b == 0));
        }
        let empty = Storage::owned_zeroed(0).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.as_ptr() as usize % HOST_ALIGN, 0);
        assert_eq!(empty.host_bytes().unwrap(), &[] as &[u8]);
    }

    #[test]
    fn mapped_windows_are_bounds_checked_and_read_only() {
        let region: SharedBytes = Arc::new(vec![1u8, 2, 3, 4, 5]);
        let storage = Storage::mapped(Arc::clone(&region), 1, 3).unwrap();
        assert_eq!(storage.host_bytes().unwrap(), &[2, 3, 4]);
        assert!(storage.is_read_only());
        assert!(matches!(
            Storage::mapped(Arc::clone(&region), 3, 3),
            Err(TensorError::OutOfBounds { needed: 3, offset: 3, region: 5 })
        ));
        assert!(Storage::mapped(region, usize::MAX, 2).is_err());
    }

    #[test]
    fn device_memory_is_released_once_and_not_host_readable() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let released = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&released);
        // SAFETY: the address is never dereferenced by this test; the release only counts.
        let allocation = unsafe {
            DeviceAllocation::new(
                0x1000,
                16,
                Device::Cuda(0),
                Box::new(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                }),
            )
        };
        let storage = Storage::device_memory(allocation);
        assert_eq!(storage.device(), Device::Cuda(0));
        assert_eq!(storage.host_bytes(), Err(TensorError::NotHost(Device::Cuda(0))));
        drop(storage);
        assert_eq!(released.load(Ordering::SeqCst), 1);
    }
}
