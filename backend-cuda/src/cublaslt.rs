//! The router GEMM for many tokens through cuBLASLt: bf16 hidden states times the bf16 weight into
//! f32 logits with f32 accumulation, on the caller's stream, in the caller's workspace.
//!
//! Past a few tokens a tiled GEMM that reads the weight once for many tokens wins over the
//! backend's own kernels (measured on an H200, 7168 x 256: 6.7 us at T = 16 and 11.9 us at
//! T = 1024, against 11.6 us and 38.6 us for the split tensor-core kernel). The library is loaded
//! at run time like the driver; where it is missing the backend's kernels run instead.
//!
//! Each problem shape gets its descriptors and algorithm once, from the library's heuristic (a
//! host-side query: no device work), kept with the router; a call then only enqueues
//! `cublasLtMatmul` with the caller's workspace, so engines capture it in their graphs.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys::{
    cublasComputeType_t, cublasLtHandle_t, cublasLtMatmulAlgo_t, cublasLtMatmulDesc_t,
    cublasLtMatmulDescAttributes_t, cublasLtMatmulPreferenceAttributes_t, cublasLtMatrixLayout_t,
    cudaDataType, cudaStream_t,
};
use cudarc::driver::sys::CUstream;

use crate::error::CudaError;
use crate::input::DeviceMatrix;

/// The workspace cuBLASLt may use for `tokens` tokens: its heuristic asked for about 5 KiB per
/// token for this GEMM's shapes on an H200, so 8 KiB per token, at most 16 MiB.
pub(crate) fn workspace_bytes(tokens: usize) -> usize {
    tokens.saturating_mul(8 << 10).min(16 << 20)
}

/// One cuBLASLt handle (cuBLASLt handles may be shared between threads).
#[derive(Debug)]
pub(crate) struct Lt {
    handle: cublasLtHandle_t,
}

// SAFETY: a cuBLASLt handle holds no per-thread state; the library documents it as thread safe
// for concurrent `cublasLtMatmul` calls, and it is destroyed once, by `Drop`.
unsafe impl Send for Lt {}
// SAFETY: see `Send`; shared access only passes the handle to the library.
unsafe impl Sync for Lt {}

impl Lt {
    /// The library's handle, or `None` where cuBLASLt is not installed or does not start.
    pub(crate) fn open() -> Option<Self> {
        // SAFETY: only tries to dlopen the library by its usual names; nothing is called.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            tracing::info!("cuBLASLt not found: many-token router GEMMs use the backend's kernels");
            return None;
        }
        match lt::create_handle() {
            Ok(handle) => Some(Lt { handle }),
            Err(error) => {
                tracing::warn!(%error, "cuBLASLt did not start: using the backend's kernels");
                None
            }
        }
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `open` and is destroyed only here.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// What fixes a GEMM's descriptors and algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    tokens: usize,
    hidden: usize,
    experts: usize,
    hidden_row_stride: usize,
    weight_row_stride: usize,
}

/// The descriptors of one shape and the algorithm the heuristic chose for it.
struct Plan {
    desc: cublasLtMatmulDesc_t,
    layouts: [cublasLtMatrixLayout_t; 3],
    algo: cublasLtMatmulAlgo_t,
}

// SAFETY: descriptors are plain host objects that nothing else references; the plan is used under
// the router's mutex and destroyed once, by `Drop`.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by `Plan::new` and is destroyed only here.
        unsafe {
            for layout in self.layouts {
                let _ = lt::destroy_matrix_layout(layout);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

impl Plan {
    /// Logits `[T, E]` (f32, rows `E` apart) = hidden `[T, H]` . weight `[E, H]`^T, written in
    /// cuBLASLt's column-major terms: D `[E, T]` = op(A) `[E, H]` . B `[H, T]` with A the weight
    /// transposed (column-major `[H, E]`, leading dimension the weight's row stride) and B the
    /// hidden states (column-major `[H, T]`).
    fn new(lt: &Lt, shape: Shape) -> Result<Self, CublasError> {
        let (t, h, e) = (shape.tokens as u64, shape.hidden as u64, shape.experts as u64);
        let desc = lt::create_matmul_desc(
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cudaDataType::CUDA_R_32F,
        )?;
        // Owned from here on, so that an error below destroys what exists.
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            // SAFETY: an all-zero algorithm is a valid bit pattern of this plain C struct; it is
            // overwritten by the heuristic's answer before any use.
            algo: unsafe { std::mem::zeroed() },
        };
        // `cublasOperation_t` (a C enum, 32 bits) `CUBLAS_OP_T`; cudarc's cuBLASLt bindings do not
        // carry the enum itself.
        let transpose: i32 = 1;
        // SAFETY: the attribute and its size match (a 32-bit `cublasOperation_t`), the
        // descriptor is live.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&raw const transpose).cast::<c_void>(),
                size_of::<i32>(),
            )?;
        }
        plan.layouts[0] = lt::create_matrix_layout(
            cudaDataType::CUDA_R_16BF,
            h,
            e,
            shape.weight_row_stride as i64,
        )?;
        plan.layouts[1] = lt::create_matrix_layout(
            cudaDataType::CUDA_R_16BF,
            h,
            t,
            shape.hidden_row_stride as i64,
        )?;
        plan.layouts[2] = lt::create_matrix_layout(cudaDataType::CUDA_R_32F, e, t, e as i64)?;
        let preference = Preference(lt::create_matmul_pref()?);
        let limit = workspace_bytes(shape.tokens);
        // SAFETY: the attribute and its size match (a `size_t`), the preference is live.
        unsafe {
            lt::set_matmul_pref_attribute(
                preference.0,
                cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&raw const limit).cast::<c_void>(),
                size_of::<usize>(),
            )?;
        }
        // Operands are only promised 16-byte alignment (a row of a caller's tensor, or the
        // logits at the start of the caller's workspace): algorithms that need more are excluded.
        let alignment = 16u32;
        for attribute in [
            cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ] {
            // SAFETY: the attribute and its size match (a `uint32_t`), the preference is live.
            unsafe {
                lt::set_matmul_pref_attribute(
                    preference.0,
                    attribute,
                    (&raw const alignment).cast::<c_void>(),
                    size_of::<u32>(),
                )?;
            }
        }
        let [a, b, c] = plan.layouts;
        // SAFETY: every descriptor is live; the query runs on the host only.
        let heuristic =
            unsafe { lt::get_matmul_algo_heuristic(lt.handle, desc, a, b, c, c, preference.0)? };
        plan.algo = heuristic.algo;
        Ok(plan)
    }
}

/// A matmul preference, destroyed when dropped.
struct Preference(cudarc::cublaslt::sys::cublasLtMatmulPreference_t);

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_pref` and destroyed only here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// A router's GEMM through cuBLASLt, with the plans of the shapes it has seen.
pub(crate) struct LtGemm {
    lt: Arc<Lt>,
    plans: Mutex<HashMap<Shape, Plan>>,
}

impl std::fmt::Debug for LtGemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LtGemm").finish_non_exhaustive()
    }
}

impl LtGemm {
    pub(crate) fn new(lt: Arc<Lt>) -> Self {
        LtGemm { lt, plans: Mutex::new(HashMap::new()) }
    }

    /// Whether cuBLASLt takes this GEMM: bf16 on both sides, rows 16-byte aligned.
    pub(crate) fn accepts(hidden: &DeviceMatrix, weight: &DeviceMatrix) -> bool {
        use sluice_tensor::DType;
        hidden.dtype == DType::BF16
            && weight.dtype == DType::BF16
            && hidden.rows_are_16_byte_aligned()
            && weight.rows_are_16_byte_aligned()
    }

    /// Chooses the algorithm for this shape now (host-side only), so that later calls find it.
    pub(crate) fn prepare(
        &self,
        hidden: &DeviceMatrix,
        weight: &DeviceMatrix,
    ) -> Result<(), CudaError> {
        self.with_plan(hidden, weight, |_| Ok(()))
    }

    /// Enqueues logits `[T, E]` (f32, contiguous rows) at `logits` on `stream`, using
    /// [`workspace_bytes`]`(T)` bytes at `workspace`.
    ///
    /// # Safety
    ///
    /// `hidden` and `weight` must describe live device memory accepted by [`accepts`](Self::accepts);
    /// `logits` must hold `T * E` f32 and `workspace` `workspace_bytes(T)` bytes, 256-byte aligned,
    /// both on this context's device and not read or written by anything else until the work on
    /// `stream` is done; the context must be current on this thread.
    pub(crate) unsafe fn enqueue(
        &self,
        stream: CUstream,
        hidden: &DeviceMatrix,
        weight: &DeviceMatrix,
        logits: u64,
        workspace: u64,
    ) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let workspace_len = workspace_bytes(hidden.rows);
        self.with_plan(hidden, weight, |plan| {
            let [a, b, c] = plan.layouts;
            // SAFETY: the caller vouches for every address and extent; the descriptors describe
            // exactly those extents; alpha and beta are host f32 (the default pointer mode) read
            // before the call returns; the stream handle is the caller's.
            unsafe {
                lt::matmul(
                    self.lt.handle,
                    plan.desc,
                    (&raw const alpha).cast(),
                    (&raw const beta).cast(),
                    weight.ptr as *const c_void,
                    a,
                    hidden.ptr as *const c_void,
                    b,
                    logits as *const c_void,
                    c,
                    logits as *mut c_void,
                    c,
                    &raw const plan.algo,
                    workspace as *mut c_void,
                    workspace_len,
                    stream as cudaStream_t,
                )
            }
            .map_err(|source| CudaError::Cublas { doing: "enqueueing the router GEMM", source })
        })
    }

    fn with_plan(
        &self,
        hidden: &DeviceMatrix,
        weight: &DeviceMatrix,
        run: impl FnOnce(&Plan) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        let shape = Shape {
            tokens: hidden.rows,
            hidden: hidden.cols,
            experts: weight.rows,
            hidden_row_stride: hidden.row_stride,
            weight_row_stride: weight.row_stride,
        };
        let mut plans = self.plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let plan = match plans.entry(shape) {
            Entry::Occupied(found) => found.into_mut(),
            Entry::Vacant(slot) => {
                let _span = tracing::debug_span!("cublaslt_heuristic", ?shape).entered();
                slot.insert(Plan::new(&self.lt, shape).map_err(|source| CudaError::Cublas {
                    doing: "choosing a GEMM algorithm",
                    source,
                })?)
            }
        };
        run(plan)
    }
}
