//! What the CUDA backend's GPU tests share: the skip where no device is found, seeded values and
//! the DeepSeek-V3 routing spec they route with, host tensors through DLPack, test streams and
//! the `Execution` of one, device buffers of a test seen through DLPack descriptors, and
//! `route_into`'s outputs in them.

// Every test file is a crate of its own that compiles this whole module with `mod common;`, and
// none of them uses every helper: what one file leaves out would be reported as dead in it.
#![allow(dead_code, reason = "each test crate uses only some of the shared helpers")]

use std::ffi::c_void;
use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use dlpark::ffi::{DLDataType, DLDevice, DLDeviceType, DLTensor};
use sluice_backend_cuda::CudaBackend;
use sluice_tensor::{
    Device, DeviceStream, Dlpack, DlpackViewMut, Element, Execution, NonFinitePolicy, RouteOutputs,
    RoutingSpec, ScoringFunc, Tensor, TopkMethod, export_vec,
};

/// What a test's device buffers hold before a call, so that a write shows.
pub const MARKER: i32 = -123_456;

/// The backend of device 0, or `None` after a visible skip where there is none and
/// `SLUICE_REQUIRE_GPU` is not set.
pub fn backend(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(backend) => Some(backend),
        Err(error) if std::env::var_os("SLUICE_REQUIRE_GPU").is_some() => {
            panic!("{test}: SLUICE_REQUIRE_GPU is set but the CUDA backend failed: {error}")
        }
        Err(error) => {
            // Written past the test harness's capture, so the skip is visible in every run.
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no CUDA device ({error})");
            None
        }
    }
}

/// `n` seeded pseudo-random values in `[-scale / 2, scale / 2)`.
pub fn values(seed: u32, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = (i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(0x9e37_79b9);
            let v = v.wrapping_mul(0x85eb_ca6b) ^ (v >> 13);
            ((v >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

/// DeepSeek-V3's gate over `experts`: sigmoid scores, `noaux_tc` top-`top_k` from 4 of 8 groups,
/// normalised and scaled by 2.5, non-finite rows marked invalid.
pub fn deepseek_v3_spec(experts: usize, top_k: usize) -> RoutingSpec {
    RoutingSpec::builder(experts, top_k)
        .scoring(ScoringFunc::Sigmoid)
        .method(TopkMethod::NoauxTc)
        .groups(8, 4)
        .norm_topk_prob(true)
        .routed_scaling_factor(2.5)
        .non_finite(NonFinitePolicy::MarkInvalid)
        .build()
        .unwrap()
}

/// A host tensor of `data` in `shape`, exported.
pub fn dl<T: Element>(data: Vec<T>, shape: &[usize]) -> Dlpack {
    export_vec(data, shape).unwrap()
}

/// The values of a host tensor.
pub fn host_values<T: Element>(tensor: Dlpack) -> Vec<T> {
    Tensor::from_dlpack(tensor).unwrap().to_vec::<T>().unwrap()
}

/// `count` copies of [`MARKER`]'s little-endian bytes.
pub fn marker_bytes(count: usize) -> Vec<u8> {
    std::iter::repeat_n(MARKER.to_le_bytes(), count).flatten().collect()
}

/// A stream of the test on `ordinal`'s primary context, with cudarc's event tracking off.
pub fn test_stream(ordinal: usize) -> Arc<CudaStream> {
    let ctx = CudaContext::new(ordinal).unwrap();
    // SAFETY: before this test allocates anything on the context; the test orders its work by
    // stream order and synchronisation.
    unsafe { ctx.disable_event_tracking() };
    ctx.new_stream().unwrap()
}

/// The execution of calls on `stream`, on the device of the stream's context.
///
/// # Safety
///
/// The rest of [`DeviceStream::new`]'s contract, for every call made with it: `stream` lives
/// until the calls' work is done, and every buffer handed to them stays allocated and is read
/// only after synchronising with it.
pub unsafe fn on_stream(stream: &CudaStream) -> Execution {
    let device = Device::Cuda(stream.context().ordinal());
    // SAFETY: the stream belongs to its context's device; the caller keeps the rest.
    Execution::Stream(unsafe { DeviceStream::new(device, stream.cu_stream() as usize) }.unwrap())
}

/// A device buffer of a test (the engine's memory in real life) on its stream's device, and the
/// shape, element strides and byte offset of the view of it a call takes.
pub struct Buffer {
    pub memory: CudaSlice<u8>,
    pub shape: Vec<i64>,
    pub strides: Vec<i64>,
    pub byte_offset: u64,
    pub dtype: DLDataType,
}

impl Buffer {
    /// `memory` seen as `shape` with element `strides`, from its first byte.
    fn view(memory: CudaSlice<u8>, shape: &[usize], strides: &[usize], dtype: DLDataType) -> Self {
        Buffer {
            memory,
            shape: shape.iter().map(|&d| d as i64).collect(),
            strides: strides.iter().map(|&s| s as i64).collect(),
            byte_offset: 0,
            dtype,
        }
    }

    /// `bytes` copied to the device, seen as `shape` with element `strides`.
    pub fn new(
        stream: &Arc<CudaStream>,
        bytes: &[u8],
        shape: &[usize],
        strides: &[usize],
        dtype: DLDataType,
    ) -> Self {
        Self::view(stream.clone_htod(bytes).unwrap(), shape, strides, dtype)
    }

    /// `bytes` copied to the device, seen as a contiguous `shape`.
    pub fn contiguous(
        stream: &Arc<CudaStream>,
        bytes: &[u8],
        shape: &[usize],
        dtype: DLDataType,
    ) -> Self {
        let mut strides: Vec<usize> = shape
            .iter()
            .rev()
            .scan(1, |stride, &d| Some(std::mem::replace(stride, *stride * d)))
            .collect();
        strides.reverse();
        Self::new(stream, bytes, shape, &strides, dtype)
    }

    /// `len` zero bytes, seen as `shape` with element `strides`.
    pub fn zeroed(
        stream: &Arc<CudaStream>,
        len: usize,
        shape: &[usize],
        strides: &[usize],
        dtype: DLDataType,
    ) -> Self {
        Self::view(stream.alloc_zeros::<u8>(len).unwrap(), shape, strides, dtype)
    }

    /// `[rows, row_stride]` 4-byte values filled with [`MARKER`], seen as the window of columns
    /// `window` of every row.
    pub fn marked_window(
        stream: &Arc<CudaStream>,
        rows: usize,
        window: Range<usize>,
        row_stride: usize,
        dtype: DLDataType,
    ) -> Self {
        let shape = [rows, window.len()];
        Buffer {
            byte_offset: (window.start * 4) as u64,
            ..Self::new(stream, &marker_bytes(rows * row_stride), &shape, &[row_stride, 1], dtype)
        }
    }

    /// The descriptor of the buffer's view, for a call on `stream`.
    pub fn descriptor(&mut self, stream: &CudaStream) -> DLTensor {
        DLTensor {
            data: self.memory.device_ptr(stream).0 as *mut c_void,
            device: DLDevice {
                device_type: DLDeviceType::CUDA,
                device_id: stream.context().ordinal() as i32,
            },
            ndim: self.shape.len() as i32,
            dtype: self.dtype,
            shape: self.shape.as_mut_ptr(),
            strides: self.strides.as_mut_ptr(),
            byte_offset: self.byte_offset,
        }
    }

    /// The whole buffer's 4-byte values (i32, or f32 bits), after the stream's work.
    pub fn read(&self, stream: &Arc<CudaStream>) -> Vec<i32> {
        let bytes = stream.clone_dtoh(&self.memory).unwrap();
        stream.synchronize().unwrap();
        bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
}

/// `route_into`'s outputs in device buffers of a test (ids, weights, status and workspace), with
/// the descriptors the call's views are made of.
pub struct RouteBuffers {
    pub ids: Buffer,
    pub weights: Buffer,
    pub status: Buffer,
    /// Never read: kept for its descriptor.
    _workspace: Buffer,
    descriptors: [DLTensor; 4],
}

impl RouteBuffers {
    /// The outputs in these buffers, for calls on `stream`.
    pub fn new(
        stream: &CudaStream,
        mut ids: Buffer,
        mut weights: Buffer,
        mut status: Buffer,
        mut workspace: Buffer,
    ) -> Self {
        let descriptors = [
            ids.descriptor(stream),
            weights.descriptor(stream),
            status.descriptor(stream),
            workspace.descriptor(stream),
        ];
        RouteBuffers { ids, weights, status, _workspace: workspace, descriptors }
    }

    /// The call's writable views.
    pub fn views(&mut self) -> RouteOutputs<'_> {
        let [ids, weights, status, workspace] = &mut self.descriptors;
        // SAFETY: each descriptor points at a live device buffer of `self` (kept alive, and its
        // shape and strides unmoved, by the borrow of `self`), inside it with its shape, strides
        // and offset; nothing else reads or writes those buffers while the views are alive.
        unsafe {
            RouteOutputs::new(
                DlpackViewMut::from_raw(ids).unwrap(),
                DlpackViewMut::from_raw(weights).unwrap(),
            )
            .with_status(DlpackViewMut::from_raw(status).unwrap())
            .with_workspace(DlpackViewMut::from_raw(workspace).unwrap())
        }
    }
}
