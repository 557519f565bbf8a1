//! Device memory owned by the backend, handed out as DLPack tensors, and copies to and from the
//! host.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};
use sluice_tensor::argument_view;
use sluice_tensor::{
    BackendError, DType, Device, DeviceAllocation, Dlpack, DlpackView, Layout, Storage, Tensor,
};

use crate::error::CudaError;
use crate::gpu::Gpu;
use crate::input;

/// A zero-filled device buffer of `bytes` bytes, ordered on the backend's stream.
pub(crate) fn zeroed(gpu: &Gpu, bytes: usize) -> Result<CudaSlice<u8>, CudaError> {
    gpu.stream
        .alloc_zeros::<u8>(bytes.max(1))
        .map_err(CudaError::driver("allocating device memory"))
}

/// The device address of a buffer.
pub(crate) fn address(gpu: &Gpu, buffer: &CudaSlice<u8>) -> u64 {
    // Event tracking is off, so the returned guard records nothing.
    let (ptr, _guard) = buffer.device_ptr(&gpu.stream);
    ptr
}

/// Hands a device buffer to a DLPack consumer as a contiguous `shape` tensor of `dtype`; the
/// buffer is freed when the last view of the import is dropped.
pub(crate) fn export(
    gpu: &Gpu,
    buffer: CudaSlice<u8>,
    shape: &[usize],
    dtype: DType,
) -> Result<Dlpack, BackendError> {
    let layout = Layout::contiguous(shape).map_err(|e| device_error(e.to_string()))?;
    let ptr = address(gpu, &buffer);
    let len = buffer.len();
    if layout.elem_count() * dtype.size_in_bytes() > len {
        return Err(device_error("output buffer smaller than its shape".into()));
    }
    // SAFETY: `ptr` is the address of the `len` bytes `buffer` owns on this device; the release
    // closure owns `buffer` and frees it by dropping it (cudarc records, never raises, errors in
    // Drop), exactly once when the last tensor using the allocation goes.
    let allocation = unsafe {
        DeviceAllocation::new(ptr, len, Device::Cuda(gpu.ordinal), Box::new(move || drop(buffer)))
    };
    let tensor = Tensor::from_storage(Arc::new(Storage::device_memory(allocation)), layout, dtype)
        .map_err(|e| device_error(e.to_string()))?;
    tensor.to_dlpack().map_err(|source| BackendError::Argument {
        op: "export",
        arg: "output",
        source,
    })
}

/// The bytes of a contiguous host view.
pub(crate) fn host_bytes<'a>(
    op: &'static str,
    arg: &'static str,
    view: &DlpackView<'a>,
) -> Result<&'a [u8], BackendError> {
    input::check_device(op, arg, view, Device::Cpu)?;
    let contiguous = Layout::contiguous(view.shape()).is_ok_and(|l| l.strides() == view.strides());
    if !contiguous {
        return Err(BackendError::Layout {
            op,
            arg,
            shape: view.shape().to_vec(),
            strides: view.strides().to_vec(),
            requirement: "the CUDA backend copies contiguous tensors",
        });
    }
    let len = view.elem_count() * view.dtype().size_in_bytes();
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: the view was validated by the bridge (host memory, aligned, its extent addressable)
    // and is contiguous, so its `len` bytes start at `data_ptr`; they stay valid and unwritten
    // while the view's borrow `'a` lasts.
    Ok(unsafe { std::slice::from_raw_parts(view.data_ptr(), len) })
}

/// Copies a contiguous host tensor to a new device tensor.
pub(crate) fn upload(gpu: &Gpu, host: &Dlpack) -> Result<Dlpack, BackendError> {
    const OP: &str = "upload";
    let view = argument_view(OP, "host", host)?;
    let bytes = host_bytes(OP, "host", &view)?;
    let mut buffer = zeroed(gpu, bytes.len())?;
    if !bytes.is_empty() {
        gpu.stream
            .memcpy_htod(bytes, &mut buffer.slice_mut(..bytes.len()))
            .map_err(CudaError::driver("copying to the device"))?;
    }
    gpu.stream.synchronize().map_err(CudaError::driver("copying to the device"))?;
    export(gpu, buffer, view.shape(), view.dtype())
}

/// Copies f32 values into a new device buffer.
pub(crate) fn upload_f32(gpu: &Gpu, values: &[f32]) -> Result<CudaSlice<u8>, CudaError> {
    upload_bytes(gpu, values.iter().flat_map(|v| v.to_ne_bytes()).collect())
}

/// Copies i32 values into a new device buffer.
pub(crate) fn upload_i32(gpu: &Gpu, values: &[i32]) -> Result<CudaSlice<u8>, CudaError> {
    upload_bytes(gpu, values.iter().flat_map(|v| v.to_ne_bytes()).collect())
}

/// Copies bytes into a new device buffer.
fn upload_bytes(gpu: &Gpu, bytes: Vec<u8>) -> Result<CudaSlice<u8>, CudaError> {
    let mut buffer = zeroed(gpu, bytes.len())?;
    gpu.stream
        .memcpy_htod(&bytes, &mut buffer.slice_mut(..bytes.len()))
        .map_err(CudaError::driver("copying to the device"))?;
    gpu.stream.synchronize().map_err(CudaError::driver("copying to the device"))?;
    Ok(buffer)
}

/// Copies a contiguous device tensor of this backend to a new host tensor.
pub(crate) fn download(gpu: &Gpu, tensor: &Dlpack) -> Result<Dlpack, BackendError> {
    const OP: &str = "download";
    let view = argument_view(OP, "tensor", tensor)?;
    input::check_device(OP, "tensor", &view, Device::Cuda(gpu.ordinal))?;
    let contiguous = Layout::contiguous(view.shape()).is_ok_and(|l| l.strides() == view.strides());
    if !contiguous {
        return Err(BackendError::Layout {
            op: OP,
            arg: "tensor",
            shape: view.shape().to_vec(),
            strides: view.strides().to_vec(),
            requirement: "the CUDA backend copies contiguous tensors",
        });
    }
    let mut bytes = vec![0u8; view.elem_count() * view.dtype().size_in_bytes()];
    if !bytes.is_empty() {
        gpu.ctx.bind_to_thread().map_err(CudaError::driver("binding the context"))?;
        // SAFETY: the view addresses `bytes.len()` contiguous bytes on this device (validated by
        // the bridge, contiguous); the copy is ordered on the backend's stream, which is
        // synchronised before `bytes` is read or dropped.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut bytes,
                view.data_ptr() as u64,
                gpu.stream.cu_stream(),
            )
        }
        .map_err(CudaError::driver("copying to the host"))?;
        gpu.stream.synchronize().map_err(CudaError::driver("copying to the host"))?;
    }
    let host = Tensor::from_bytes(&bytes, view.dtype(), view.shape())
        .map_err(|e| device_error(e.to_string()))?;
    host.to_dlpack().map_err(|source| BackendError::Argument { op: OP, arg: "tensor", source })
}

/// Copies `values` to device address `dst` on the backend's stream (the values are copied before
/// the call returns).
pub(crate) fn copy_to_device(gpu: &Gpu, dst: u64, values: &[i32]) -> Result<(), CudaError> {
    gpu.ctx.bind_to_thread().map_err(CudaError::driver("binding the context"))?;
    // SAFETY: `dst` addresses at least `values.len()` i32 of a live buffer of this backend; the
    // stream is synchronised before `values` can go away.
    unsafe { cudarc::driver::result::memcpy_htod_async(dst, values, gpu.stream.cu_stream()) }
        .map_err(CudaError::driver("copying to the device"))?;
    gpu.stream.synchronize().map_err(CudaError::driver("copying to the device"))
}

/// Copies `values.len()` i32 from device address `src` after the work queued on the stream.
pub(crate) fn copy_to_host(gpu: &Gpu, src: u64, values: &mut [i32]) -> Result<(), CudaError> {
    gpu.ctx.bind_to_thread().map_err(CudaError::driver("binding the context"))?;
    // SAFETY: `src` addresses at least `values.len()` i32 of a live buffer of this backend; the
    // stream is synchronised before `values` is read.
    unsafe { cudarc::driver::result::memcpy_dtoh_async(values, src, gpu.stream.cu_stream()) }
        .map_err(CudaError::driver("copying to the host"))?;
    gpu.stream.synchronize().map_err(CudaError::driver("copying to the host"))
}

pub(crate) fn device_error(message: String) -> BackendError {
    BackendError::Device { backend: "cuda", message }
}
