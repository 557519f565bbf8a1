//! Device memory owned by the backend, handed out as DLPack tensors, and copies between the host
//! and the device on the backend's own stream. Used by preparation and the synchronous
//! conveniences only: `route_into` allocates and copies nothing.

use std::ffi::c_void;
use std::sync::Arc;

use sluice_kernels::check_device;
use sluice_tensor::{
    BackendError, DType, Device, DeviceAllocation, Dlpack, DlpackView, Layout, Storage, Tensor,
    argument_view,
};

use crate::device::RocmDevice;
use crate::error::RocmError;
use crate::stream::HipStream;

/// `len` bytes of device memory from `hipMalloc`, freed on drop.
#[derive(Debug)]
pub(crate) struct DeviceMemory {
    device: Arc<RocmDevice>,
    ptr: u64,
    len: usize,
}

impl DeviceMemory {
    /// `bytes` (at least 1) zeroed bytes on the stream's device, the zeroing finished on return.
    pub(crate) fn zeroed(stream: &HipStream, bytes: usize) -> Result<Self, RocmError> {
        let device = Arc::clone(stream.device());
        let api = device.runtime().api();
        device.make_current()?;
        let len = bytes.max(1);
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one device address into `ptr`.
        let status = unsafe { (api.hipMalloc)(&mut ptr, len) };
        device.runtime().check("hipMalloc", status)?;
        let memory = DeviceMemory { device: Arc::clone(&device), ptr: ptr as u64, len };
        // SAFETY: `ptr` addresses the `len` bytes just allocated; the stream is synchronised
        // before the memory can be used.
        let status = unsafe { (api.hipMemsetAsync)(ptr, 0, len, stream.raw()) };
        device.runtime().check("hipMemsetAsync", status)?;
        stream.synchronize()?;
        Ok(memory)
    }

    /// Its device address.
    pub(crate) fn address(&self) -> u64 {
        self.ptr
    }

    /// Its size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `hipMalloc` and is freed exactly once, here; `hipFree` waits for
        // work that uses it. A failure cannot be reported from drop and leaves nothing unsafe.
        let _ = unsafe { (self.device.runtime().api().hipFree)(self.ptr as *mut c_void) };
    }
}

/// Copies `bytes` to device address `dst` (which holds at least that many) and waits.
///
/// # Safety
///
/// `dst` must address at least `bytes.len()` bytes of live device memory of the stream's device
/// that nothing else uses until this returns.
pub(crate) unsafe fn copy_to_device(
    stream: &HipStream,
    dst: u64,
    bytes: &[u8],
) -> Result<(), RocmError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let runtime = stream.device().runtime();
    // SAFETY: `dst` as the caller promises; `bytes` stays borrowed until the stream is
    // synchronised below.
    let status = unsafe {
        (runtime.api().hipMemcpyHtoDAsync)(
            dst as *mut c_void,
            bytes.as_ptr().cast(),
            bytes.len(),
            stream.raw(),
        )
    };
    runtime.check("hipMemcpyHtoDAsync", status)?;
    stream.synchronize()
}

/// Copies `bytes.len()` bytes from device address `src`, after the work queued on the stream.
///
/// # Safety
///
/// `src` must address at least `bytes.len()` bytes of live device memory of the stream's device.
pub(crate) unsafe fn copy_to_host(
    stream: &HipStream,
    src: u64,
    bytes: &mut [u8],
) -> Result<(), RocmError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let runtime = stream.device().runtime();
    // SAFETY: `src` as the caller promises; `bytes` stays borrowed until the stream is
    // synchronised below.
    let status = unsafe {
        (runtime.api().hipMemcpyDtoHAsync)(
            bytes.as_mut_ptr().cast(),
            src as *const c_void,
            bytes.len(),
            stream.raw(),
        )
    };
    runtime.check("hipMemcpyDtoHAsync", status)?;
    stream.synchronize()
}

/// A new device buffer holding `bytes`.
pub(crate) fn upload_bytes(stream: &HipStream, bytes: &[u8]) -> Result<DeviceMemory, RocmError> {
    let memory = DeviceMemory::zeroed(stream, bytes.len())?;
    // SAFETY: the buffer was just allocated with room for `bytes` and is ours alone.
    unsafe { copy_to_device(stream, memory.address(), bytes) }?;
    Ok(memory)
}

/// Hands a device buffer to a DLPack consumer as a contiguous `shape` tensor of `dtype`; the
/// buffer is freed when the last view of the import is dropped.
pub(crate) fn export(
    memory: DeviceMemory,
    shape: &[usize],
    dtype: DType,
) -> Result<Dlpack, BackendError> {
    let layout = Layout::contiguous(shape).map_err(|e| device_error(e.to_string()))?;
    let (ptr, len, ordinal) = (memory.address(), memory.len(), memory.device.ordinal());
    if layout.elem_count() * dtype.size_in_bytes() > len {
        return Err(device_error("output buffer smaller than its shape".into()));
    }
    // SAFETY: `ptr` is the address of the `len` bytes `memory` owns on this device; the release
    // closure owns `memory` and frees it by dropping it (errors are ignored, never raised, in
    // its Drop), exactly once when the last tensor using the allocation goes.
    let allocation = unsafe {
        DeviceAllocation::new(ptr, len, Device::Rocm(ordinal), Box::new(move || drop(memory)))
    };
    let tensor = Tensor::from_storage(Arc::new(Storage::device_memory(allocation)), layout, dtype)
        .map_err(|e| device_error(e.to_string()))?;
    tensor.to_dlpack().map_err(|source| BackendError::Argument {
        op: "export",
        arg: "output",
        source,
    })
}

/// The bytes of a contiguous view, which must be on the host.
pub(crate) fn host_bytes<'a>(
    op: &'static str,
    arg: &'static str,
    view: &DlpackView<'a>,
) -> Result<&'a [u8], BackendError> {
    check_device(op, arg, view, Device::Cpu)?;
    check_contiguous(op, arg, view)?;
    let len = view.elem_count() * view.dtype().size_in_bytes();
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: the view was validated by the bridge (host memory, aligned, its extent addressable)
    // and is contiguous, so its `len` bytes start at `data_ptr`; they stay valid and unwritten
    // while the view's borrow `'a` lasts.
    Ok(unsafe { std::slice::from_raw_parts(view.data_ptr(), len) })
}

fn check_contiguous(
    op: &'static str,
    arg: &'static str,
    view: &DlpackView<'_>,
) -> Result<(), BackendError> {
    let contiguous = Layout::contiguous(view.shape()).is_ok_and(|l| l.strides() == view.strides());
    if !contiguous {
        return Err(BackendError::Layout {
            op,
            arg,
            shape: view.shape().to_vec(),
            strides: view.strides().to_vec(),
            requirement: "the ROCm backend copies contiguous tensors",
        });
    }
    Ok(())
}

/// Copies a contiguous host tensor to a new device tensor.
pub(crate) fn upload(stream: &HipStream, host: &Dlpack) -> Result<Dlpack, BackendError> {
    const OP: &str = "upload";
    let view = argument_view(OP, "host", host)?;
    let memory = upload_bytes(stream, host_bytes(OP, "host", &view)?)?;
    export(memory, view.shape(), view.dtype())
}

/// Copies a contiguous device tensor of this backend's device to a new host tensor.
pub(crate) fn download(stream: &HipStream, tensor: &Dlpack) -> Result<Dlpack, BackendError> {
    const OP: &str = "download";
    let view = argument_view(OP, "tensor", tensor)?;
    check_device(OP, "tensor", &view, Device::Rocm(stream.device().ordinal()))?;
    check_contiguous(OP, "tensor", &view)?;
    let mut bytes = vec![0u8; view.elem_count() * view.dtype().size_in_bytes()];
    stream.device().make_current()?;
    // SAFETY: the view addresses `bytes.len()` contiguous bytes on this device (validated by the
    // bridge, contiguous), alive while `tensor` is borrowed.
    unsafe { copy_to_host(stream, view.data_ptr() as u64, &mut bytes) }?;
    let host = Tensor::from_bytes(&bytes, view.dtype(), view.shape())
        .map_err(|e| device_error(e.to_string()))?;
    host.to_dlpack().map_err(|source| BackendError::Argument { op: OP, arg: "tensor", source })
}

pub(crate) fn device_error(message: String) -> BackendError {
    BackendError::Device { backend: "rocm", message }
}
