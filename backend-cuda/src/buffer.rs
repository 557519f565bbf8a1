//! `DeviceBuffer`: device memory of the backend's own, handed to `*_into` calls as borrowed views
//! (the timing of [`crate::timing`] routes through the engine's call, as an engine would).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};
use dlpark::ffi::{DLDevice, DLDeviceType, DLTensor};
use sluice_tensor::{DType, DlpackError, DlpackView, DlpackViewMut, Element};

use crate::error::CudaError;
use crate::gpu::Gpu;
use crate::memory;

/// A buffer on the backend's device with a shape and row-major strides (rows may be padded).
pub(crate) struct DeviceBuffer {
    gpu: Arc<Gpu>,
    memory: CudaSlice<u8>,
    shape: Vec<usize>,
    strides: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("shape", &self.shape)
            .field("strides", &self.strides)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl DeviceBuffer {
    /// A zero-filled buffer of `shape`; rows of a rank-2 shape `row_stride` elements apart (at
    /// least the row length).
    pub(crate) fn zeroed(
        gpu: Arc<Gpu>,
        dtype: DType,
        shape: &[usize],
        row_stride: Option<usize>,
    ) -> Result<Self, CudaError> {
        let mut strides = vec![1usize; shape.len()];
        for axis in (0..shape.len().saturating_sub(1)).rev() {
            strides[axis] = strides[axis + 1] * shape[axis + 1];
        }
        if let (Some(stride), [_, cols]) = (row_stride, shape) {
            strides[0] = stride.max(*cols);
        }
        let span =
            shape.iter().zip(&strides).map(|(&d, &s)| d.saturating_sub(1) * s).sum::<usize>()
                + usize::from(!shape.contains(&0));
        let memory = memory::zeroed(&gpu, span * dtype.size_in_bytes())?;
        Ok(DeviceBuffer { gpu, memory, shape: shape.to_vec(), strides, dtype })
    }

    fn address(&self) -> u64 {
        let (ptr, _guard) = self.memory.device_ptr(&self.gpu.stream);
        ptr
    }

    fn descriptor(&self, shape: &mut [i64; 8], strides: &mut [i64; 8]) -> DLTensor {
        for (axis, (&d, &s)) in self.shape.iter().zip(&self.strides).enumerate() {
            shape[axis] = d as i64;
            strides[axis] = s as i64;
        }
        DLTensor {
            data: self.address() as *mut std::ffi::c_void,
            device: DLDevice {
                device_type: DLDeviceType::CUDA,
                device_id: self.gpu.ordinal as i32,
            },
            ndim: self.shape.len() as i32,
            dtype: self.dtype.to_dlpack(),
            shape: shape.as_mut_ptr(),
            strides: strides.as_mut_ptr(),
            byte_offset: 0,
        }
    }

    /// A read-only view, for an input.
    pub(crate) fn view(&self) -> Result<DlpackView<'_>, DlpackError> {
        let (mut shape, mut strides) = ([0i64; 8], [0i64; 8]);
        let descriptor = self.descriptor(&mut shape, &mut strides);
        // SAFETY: the descriptor describes this buffer's own memory with its shape and strides
        // (the view copies them); the memory lives as long as `self`, which the view borrows, and
        // nothing writes it while the shared borrow lasts.
        unsafe { DlpackView::from_raw(&descriptor) }
    }

    /// A writable view, for an output or a workspace.
    pub(crate) fn view_mut(&mut self) -> Result<DlpackViewMut<'_>, DlpackError> {
        let (mut shape, mut strides) = ([0i64; 8], [0i64; 8]);
        let mut descriptor = self.descriptor(&mut shape, &mut strides);
        // SAFETY: as in `view`; the exclusive borrow of `self` keeps every other access away.
        unsafe { DlpackViewMut::from_raw(&mut descriptor) }
    }

    /// Copies `values` into the start of the buffer (at most its size) and waits.
    pub(crate) fn write<T: Element>(&mut self, values: &[T]) -> Result<(), CudaError> {
        let bytes: &[u8] = bytes_of(values);
        let len = bytes.len().min(self.memory.len());
        self.gpu
            .stream
            .memcpy_htod(&bytes[..len], &mut self.memory.slice_mut(..len))
            .map_err(CudaError::driver("copying to the device"))?;
        self.gpu.stream.synchronize().map_err(CudaError::driver("copying to the device"))
    }
}

impl DeviceBuffer {
    /// The buffer's first `len` i32 values (its whole shape), after the stream's work.
    pub(crate) fn read_i32(&self) -> Result<Vec<i32>, CudaError> {
        let mut values = vec![0i32; self.shape.iter().product()];
        if !values.is_empty() {
            memory::copy_to_host(&self.gpu, self.address(), &mut values)?;
        }
        Ok(values)
    }
}

fn bytes_of<T: Element>(values: &[T]) -> &[u8] {
    // SAFETY: `Element` types are plain numbers without padding, so all their bytes are
    // initialised; the byte slice covers exactly the values' memory, borrowed as long as they are.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), size_of_val(values)) }
}
