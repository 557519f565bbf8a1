//! The router GEMM for many tokens through cuBLASLt: bf16 hidden states times the bf16 weight into
//! f32 logits with f32 accumulation, on the caller's stream, in the caller's workspace.
//!
//! Past a few tokens a tiled GEMM that reads the weight once for many tokens wins over the
//! backend's own kernels (measured on an H200, 7168 x 256: 6.7 us at T = 16 and 11.9 us at
//! T = 1024, against 11.6 us and 38.6 us for the split tensor-core kernel). The library is loaded
//! at run time like the driver; where it is missing the backend's kernels run instead.
//!
//! The hidden size may be split: the GEMM is then a strided batch of `S` GEMMs, one per slice of
//! the hidden size, each writing its own partial sums, which the routing kernel adds as it does
//! the backend's split kernels'. With too few output tiles to fill the GPU, cuBLASLt itself
//! splits the hidden size and adds the slices in a reduction kernel of its own; the batch fills
//! the GPU in one kernel and leaves the sum to routing. On an H200 the whole gate, graph-replayed,
//! went from 12.1 to 9.6 us for V3 at T = 256 (a batch of 8) and from 20.0 to 17.5 us for Kimi-K2
//! at T = 1024 (a batch of 2); for V3 at T = 1024 a batch of 8 made the gate slower (19.2 against
//! 17.2 us, though its GEMM alone was faster), and the timing below keeps the library's own split
//! there.
//!
//! Each problem shape gets its split, descriptors and algorithm once, kept with the router; a
//! call then only enqueues `cublasLtMatmul` with the caller's workspace, so engines capture it in
//! their graphs. `warm_up` chooses the split and the algorithm by timing the whole gate call
//! (status reset, GEMM, routing kernel) with each of the heuristic's candidates for each split
//! (up to [`MAX_CANDIDATES`] for the default split, [`OTHER_SPLIT_CANDIDATES`] for the others),
//! on scratch buffers of the real shape, each run after an L2 flush (a gate meets its weight cold
//! in an engine), and keeps the fastest by median where it beats the heuristic's first choice
//! for the default split by more than [`REPLACE_MARGIN`]. On an H200, the GEMM timed alone with
//! a warm L2 chose algorithms that made the whole gate slower in the benchmark (Kimi-K2,
//! T = 1024: 24.5 us against 19.3 us with the heuristic's first), so what is timed is what runs.
//! The choice is kept per shape for the whole backend. A shape first met in a call, without
//! `warm_up`, takes [`default_splits`] and the heuristic's first answer for it, a host-side query
//! with no device work.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys::{
    self as lt_sys, cublasComputeType_t, cublasLtHandle_t, cublasLtMatmulAlgo_t,
    cublasLtMatmulDesc_t, cublasLtMatmulDescAttributes_t, cublasLtMatmulHeuristicResult_t,
    cublasLtMatmulPreferenceAttributes_t, cublasLtMatrixLayout_t, cublasLtMatrixLayoutAttribute_t,
    cublasStatus_t, cudaDataType, cudaStream_t,
};
use cudarc::driver::sys::{CUevent_flags, CUstream, cuMemsetD32Async};
use cudarc::driver::{CudaEvent, CudaSlice};

use crate::error::CudaError;
use crate::gpu::Gpu;
use crate::input::DeviceMatrix;
use crate::memory;

/// The workspace cuBLASLt may use for `tokens` tokens: its heuristic asked for about 5 KiB per
/// token for this GEMM's shapes on an H200, so 8 KiB per token, at most 16 MiB.
pub(crate) fn workspace_bytes(tokens: usize) -> usize {
    tokens.saturating_mul(8 << 10).min(16 << 20)
}

/// The alignment cuBLASLt's workspace gets (what the library asks of a workspace).
pub(crate) const WORKSPACE_ALIGN: usize = 256;

/// How many of the heuristic's candidates `warm_up` times for the default split.
const MAX_CANDIDATES: usize = 8;

/// How many it times for each other split.
const OTHER_SPLIT_CANDIDATES: usize = 4;

/// The splits of the hidden size a GEMM may take (1: none).
const SPLIT_OPTIONS: [usize; 4] = [1, 2, 4, 8];

/// The most rows of partial sums (splits times tokens) a call's workspace holds: past 1024
/// tokens the splits fall (2048 tokens take 4 at most, 8192 none), as the output tiles alone
/// come to fill the GPU.
const MAX_SPLIT_ROWS: usize = 8192;

/// The output tile (tokens by experts) of the library's kernels at these shapes, which sets how
/// many blocks one split makes: 128 x 128 on an H200 once the hidden size is split.
const TILE: usize = 128;

/// Whether `splits` slices of `hidden` fit a call of `tokens` tokens: each slice a whole number
/// of 16-byte chunks (every batch's operands stay 16-byte aligned), and the partial sums within
/// [`MAX_SPLIT_ROWS`].
fn splits_fit(splits: usize, tokens: usize, hidden: usize) -> bool {
    splits == 1
        || (hidden.is_multiple_of(splits)
            && (hidden / splits).is_multiple_of(8)
            && splits.saturating_mul(tokens) <= MAX_SPLIT_ROWS)
}

/// The most splits a GEMM of `tokens` tokens over a hidden size of `hidden` may take: what a
/// call's workspace holds partial sums for.
pub(crate) fn max_splits(tokens: usize, hidden: usize) -> usize {
    SPLIT_OPTIONS.into_iter().filter(|&s| splits_fit(s, tokens, hidden)).max().unwrap_or(1)
}

/// The splits a shape takes without timing: the most whose blocks (output tiles times splits)
/// all run at once on `multiprocessors`. Measured on an H200 as a GEMM alone, this is within
/// 10% of the best split for V3 and Kimi-K2 from 256 to 4096 tokens; the whole gate may still do
/// better with another, which `warm_up` finds.
fn default_splits(shape: Shape, multiprocessors: usize) -> usize {
    let tiles = shape.tokens.div_ceil(TILE) * shape.experts.div_ceil(TILE);
    SPLIT_OPTIONS
        .into_iter()
        .filter(|&s| splits_fit(s, shape.tokens, shape.hidden) && tiles * s <= multiprocessors)
        .max()
        .unwrap_or(1)
}

/// Untimed runs of a candidate before its timed ones: the first launch of a kernel loads it.
const WARMUP_RUNS: usize = 2;

/// Timed runs of a candidate, each after the L2 was flushed (a gate call finds the weight cold:
/// the layers between two calls of one gate stream far more than the L2 through it), each
/// between its own two events; the median of them is the candidate's time.
const TIMED_RUNS: usize = 15;

/// How much faster than the heuristic's first choice a candidate must measure to replace it: the
/// candidates are often within a few percent of each other, where one timing's noise would
/// otherwise decide (and routers of one shape would disagree).
const REPLACE_MARGIN: f64 = 0.03;

/// One cuBLASLt handle (cuBLASLt handles may be shared between threads).
#[derive(Debug)]
pub(crate) struct Lt {
    handle: cublasLtHandle_t,
    /// The splits and algorithms `warm_up` timed on this device, per shape: every router of the
    /// backend with that shape takes the same, timed once.
    timed: Mutex<HashMap<Shape, Choice>>,
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
            Ok(handle) => Some(Lt { handle, timed: Mutex::new(HashMap::new()) }),
            Err(error) => {
                tracing::warn!(%error, "cuBLASLt did not start: using the backend's kernels");
                None
            }
        }
    }
}

impl Lt {
    fn timed(&self) -> MutexGuard<'_, HashMap<Shape, Choice>> {
        self.timed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

impl Shape {
    fn of(hidden: &DeviceMatrix, weight: &DeviceMatrix) -> Self {
        Shape {
            tokens: hidden.rows,
            hidden: hidden.cols,
            experts: weight.rows,
            hidden_row_stride: hidden.row_stride,
            weight_row_stride: weight.row_stride,
        }
    }
}

/// How one shape's GEMM runs: its split of the hidden size and the algorithm.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Choice {
    splits: usize,
    algo: cublasLtMatmulAlgo_t,
}

/// The matmul and matrix descriptors of one shape and split.
struct Descriptors {
    desc: cublasLtMatmulDesc_t,
    layouts: [cublasLtMatrixLayout_t; 3],
}

// SAFETY: descriptors are plain host objects that nothing else references; they are used by one
// thread at a time (under the router's mutex, or by the `warm_up` that created them) and
// destroyed once, by `Drop`.
unsafe impl Send for Descriptors {}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by `Descriptors::new` (a null layout, left by an
        // error there, is skipped) and is destroyed only here.
        unsafe {
            for layout in self.layouts {
                if !layout.is_null() {
                    let _ = lt::destroy_matrix_layout(layout);
                }
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// The device operands of one GEMM.
#[derive(Clone, Copy)]
struct Operands<'a> {
    hidden: &'a DeviceMatrix,
    weight: &'a DeviceMatrix,
    /// `S * T * E` f32: the partial sums of the `S` splits, one `[T, E]` after another.
    logits: u64,
    /// [`workspace_bytes`]`(T)` bytes, [`WORKSPACE_ALIGN`]-aligned.
    workspace: u64,
}

impl Descriptors {
    /// Logits `[T, E]` (f32, rows `E` apart) = hidden `[T, H]` . weight `[E, H]`^T, written in
    /// cuBLASLt's column-major terms: D `[E, T]` = op(A) `[E, H]` . B `[H, T]` with A the weight
    /// transposed (column-major `[H, E]`, leading dimension the weight's row stride) and B the
    /// hidden states (column-major `[H, T]`). With `splits` > 1, a strided batch of `splits` such
    /// GEMMs over consecutive slices of `H / splits` (which [`splits_fit`]), each into its own
    /// `[T, E]` of partial sums.
    fn new(shape: Shape, splits: usize) -> Result<Self, CublasError> {
        let (t, e) = (shape.tokens as u64, shape.experts as u64);
        let h = (shape.hidden / splits) as u64;
        let desc = lt::create_matmul_desc(
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cudaDataType::CUDA_R_32F,
        )?;
        // Owned from here on, so that an error below destroys what exists.
        let mut descriptors = Descriptors { desc, layouts: [std::ptr::null_mut(); 3] };
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
        descriptors.layouts[0] = lt::create_matrix_layout(
            cudaDataType::CUDA_R_16BF,
            h,
            e,
            shape.weight_row_stride as i64,
        )?;
        descriptors.layouts[1] = lt::create_matrix_layout(
            cudaDataType::CUDA_R_16BF,
            h,
            t,
            shape.hidden_row_stride as i64,
        )?;
        descriptors.layouts[2] =
            lt::create_matrix_layout(cudaDataType::CUDA_R_32F, e, t, e as i64)?;
        if splits > 1 {
            // Batch b reads the b-th slice of the weight's and the hidden states' rows and writes
            // the b-th `[T, E]`.
            let count = splits as i32;
            let offsets = [h as i64, h as i64, (e * t) as i64];
            for (layout, offset) in descriptors.layouts.into_iter().zip(offsets) {
                // SAFETY: each attribute and its size match (an `int32_t` count, an `int64_t`
                // offset in elements); the layout is live.
                unsafe {
                    lt::set_matrix_layout_attribute(
                        layout,
                        cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&raw const count).cast::<c_void>(),
                        size_of::<i32>(),
                    )?;
                    lt::set_matrix_layout_attribute(
                        layout,
                        cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&raw const offset).cast::<c_void>(),
                        size_of::<i64>(),
                    )?;
                }
            }
        }
        Ok(descriptors)
    }

    /// Up to `count` (at most [`MAX_CANDIDATES`]) of the heuristic's algorithms for `shape`, in
    /// its order (its first choice first), that run within [`workspace_bytes`]`(T)` on operands
    /// aligned to 16 bytes. A host-side query: no device work. Fails with `NOT_SUPPORTED` where
    /// none does.
    fn candidates(
        &self,
        lt: &Lt,
        shape: Shape,
        count: usize,
    ) -> Result<Vec<Candidate>, CublasError> {
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
        let requested = count.clamp(1, MAX_CANDIDATES);
        let mut results = [unanswered(); MAX_CANDIDATES];
        let mut returned: c_int = 0;
        let [a, b, c] = self.layouts;
        // SAFETY: every descriptor and the preference are live; `results` has room for
        // `requested` answers (at most its length) and `returned` receives how many were written;
        // the query runs on the host only.
        unsafe {
            lt_sys::cublasLtMatmulAlgoGetHeuristic(
                lt.handle,
                self.desc,
                a,
                b,
                c,
                c,
                preference.0,
                requested as c_int,
                results.as_mut_ptr(),
                &raw mut returned,
            )
        }
        .result()?;
        let returned = usize::try_from(returned).unwrap_or(0).min(requested);
        let found = usable(&results[..returned], limit);
        if found.is_empty() {
            return Err(CublasError(cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED));
        }
        Ok(found)
    }

    /// Enqueues the GEMM with `algo` on `stream`.
    ///
    /// # Safety
    ///
    /// `operands` must describe live device memory of this descriptors' shape, accepted by
    /// [`LtGemm::accepts`], with the extents [`Operands`] documents, on the current context's
    /// device and not read or written by anything else until the work on `stream` is done;
    /// `algo` must be one of the heuristic's candidates for this shape.
    unsafe fn matmul(
        &self,
        lt: &Lt,
        algo: &cublasLtMatmulAlgo_t,
        stream: CUstream,
        operands: Operands<'_>,
    ) -> Result<(), CublasError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let [a, b, c] = self.layouts;
        // SAFETY: the caller vouches for every address and extent; the descriptors describe
        // exactly those extents; `algo` fits the workspace of `workspace_bytes(T)` bytes passed
        // with it (`candidates` kept only those); alpha and beta are host f32 (the default
        // pointer mode) read before the call returns; the stream handle is the caller's.
        unsafe {
            lt::matmul(
                lt.handle,
                self.desc,
                (&raw const alpha).cast(),
                (&raw const beta).cast(),
                operands.weight.ptr as *const c_void,
                a,
                operands.hidden.ptr as *const c_void,
                b,
                operands.logits as *const c_void,
                c,
                operands.logits as *mut c_void,
                c,
                algo,
                operands.workspace as *mut c_void,
                workspace_bytes(operands.hidden.rows),
                stream as cudaStream_t,
            )
        }
    }
}

/// A heuristic result slot before the query fills it.
fn unanswered() -> cublasLtMatmulHeuristicResult_t {
    cublasLtMatmulHeuristicResult_t {
        algo: cublasLtMatmulAlgo_t { data: [0; 8] },
        workspaceSize: 0,
        state: cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED,
        wavesCount: 0.0,
        reserved: [0; 4],
    }
}

/// One algorithm the heuristic proposed for a shape.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    algo: cublasLtMatmulAlgo_t,
    /// Workspace bytes it needs.
    workspace: usize,
    /// The heuristic's estimate of its waves over the GPU.
    waves: f32,
}

/// The heuristic's answers that can run: those it reports as usable, needing at most
/// `workspace_limit` bytes of workspace, in its order.
fn usable(answers: &[cublasLtMatmulHeuristicResult_t], workspace_limit: usize) -> Vec<Candidate> {
    answers
        .iter()
        .filter(|answer| {
            answer.state == cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && answer.workspaceSize <= workspace_limit
        })
        .map(|answer| Candidate {
            algo: answer.algo,
            workspace: answer.workspaceSize,
            waves: answer.wavesCount,
        })
        .collect()
}

/// The candidate to keep from those measured (microseconds per run), skipping those whose
/// measurement failed or is not a finite, non-negative time: the fastest, unless the heuristic's
/// first choice (index 0) measured within [`REPLACE_MARGIN`] of it, and the earliest (which the
/// heuristic ranked higher) on a tie. `None` where nothing was measured.
fn chosen<E>(measured: &[Result<f64, E>]) -> Option<usize> {
    let time = |index: usize| match measured.get(index) {
        Some(Ok(micros)) if micros.is_finite() && *micros >= 0.0 => Some(*micros),
        _ => None,
    };
    let mut best: Option<(usize, f64)> = None;
    for index in 0..measured.len() {
        let Some(micros) = time(index) else { continue };
        if best.is_none_or(|(_, fastest)| micros < fastest) {
            best = Some((index, micros));
        }
    }
    let (index, fastest) = best?;
    match time(0) {
        Some(first) if first <= fastest * (1.0 + REPLACE_MARGIN) => Some(0),
        _ => Some(index),
    }
}

/// The median of some times.
fn median(mut micros: Vec<f64>) -> f64 {
    micros.sort_by(f64::total_cmp);
    micros[micros.len() / 2]
}

/// The split and algorithm chosen for one shape, with their descriptors.
struct Plan {
    choice: Choice,
    descriptors: Descriptors,
    /// Chosen by timing candidates (`warm_up`) rather than as the heuristic's first answer; such
    /// a plan is never replaced.
    timed: bool,
}

impl Plan {
    /// `splits` with the heuristic's first answer for it: a host-side query, no device work.
    fn from_heuristic(lt: &Lt, shape: Shape, splits: usize) -> Result<Self, CublasError> {
        let descriptors = Descriptors::new(shape, splits)?;
        let first = descriptors.candidates(lt, shape, 1)?[0];
        Ok(Plan { choice: Choice { splits, algo: first.algo }, descriptors, timed: false })
    }

    /// The timed `choice`, with descriptors for its split.
    fn from_choice(shape: Shape, choice: Choice) -> Result<Self, CublasError> {
        Ok(Plan { choice, descriptors: Descriptors::new(shape, choice.splits)?, timed: true })
    }

    /// Takes `choice`, with new descriptors where its split differs from the plan's.
    fn take(&mut self, shape: Shape, choice: Choice) -> Result<(), CublasError> {
        if choice.splits != self.choice.splits {
            self.descriptors = Descriptors::new(shape, choice.splits)?;
        }
        self.choice = choice;
        Ok(())
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
    /// The device's multiprocessors, which [`default_splits`] fills.
    multiprocessors: usize,
    plans: Mutex<HashMap<Shape, Plan>>,
}

impl std::fmt::Debug for LtGemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LtGemm").finish_non_exhaustive()
    }
}

/// One candidate `warm_up` times: a split and one of the heuristic's algorithms for it.
#[derive(Debug, Clone, Copy)]
struct Timed {
    choice: Choice,
    candidate: Candidate,
}

impl LtGemm {
    pub(crate) fn new(lt: Arc<Lt>, multiprocessors: usize) -> Self {
        LtGemm { lt, multiprocessors, plans: Mutex::new(HashMap::new()) }
    }

    /// Whether cuBLASLt takes this GEMM: bf16 on both sides, rows 16-byte aligned.
    pub(crate) fn accepts(hidden: &DeviceMatrix, weight: &DeviceMatrix) -> bool {
        use sluice_tensor::DType;
        hidden.dtype == DType::BF16
            && weight.dtype == DType::BF16
            && hidden.rows_are_16_byte_aligned()
            && weight.rows_are_16_byte_aligned()
    }

    fn plans(&self) -> MutexGuard<'_, HashMap<Shape, Plan>> {
        self.plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The plan of `shape`, made where there is none: the choice another router of the backend
    /// timed where there is one, otherwise [`default_splits`] with the heuristic's first answer
    /// (host-side queries, no device work). A call finds its plan here, so an existing plan is
    /// returned as it is.
    fn plan<'a>(
        &self,
        plans: &'a mut HashMap<Shape, Plan>,
        shape: Shape,
    ) -> Result<&'a mut Plan, CublasError> {
        match plans.entry(shape) {
            Entry::Occupied(found) => Ok(found.into_mut()),
            Entry::Vacant(slot) => {
                let timed = self.lt.timed().get(&shape).copied();
                let plan = match timed {
                    Some(choice) => Plan::from_choice(shape, choice)?,
                    None => {
                        let _span = tracing::debug_span!("cublaslt_heuristic", ?shape).entered();
                        let splits = default_splits(shape, self.multiprocessors);
                        Plan::from_heuristic(&self.lt, shape, splits)?
                    }
                };
                Ok(slot.insert(plan))
            }
        }
    }

    /// Whether `hidden`'s shape (its address is not read) has a timed plan here, taking the one
    /// another router of the backend timed where there is one; otherwise the shape gets its
    /// untimed plan if it has none yet (host-side queries). So `warm_up` asks before it
    /// allocates anything to time with.
    pub(crate) fn has_timed_plan(
        &self,
        hidden: &DeviceMatrix,
        weight: &DeviceMatrix,
    ) -> Result<bool, CudaError> {
        let shape = Shape::of(hidden, weight);
        let mut plans = self.plans();
        let plan = self.plan(&mut plans, shape).map_err(choosing)?;
        if !plan.timed {
            let timed = self.lt.timed().get(&shape).copied();
            if let Some(choice) = timed {
                plan.take(shape, choice).map_err(choosing)?;
                plan.timed = true;
            }
        }
        Ok(plan.timed)
    }

    /// The candidates `tune` times for `shape`: the heuristic's for the default split first (its
    /// first answer, the untimed plan's, at index 0), then those for every other split that fits.
    fn candidates(&self, shape: Shape) -> Result<Vec<Timed>, CublasError> {
        let default = default_splits(shape, self.multiprocessors);
        let others = SPLIT_OPTIONS
            .into_iter()
            .filter(|&s| s != default && splits_fit(s, shape.tokens, shape.hidden));
        let mut all = Vec::new();
        for splits in std::iter::once(default).chain(others) {
            let count = if splits == default { MAX_CANDIDATES } else { OTHER_SPLIT_CANDIDATES };
            let found = Descriptors::new(shape, splits)
                .and_then(|descriptors| descriptors.candidates(&self.lt, shape, count));
            let found = match found {
                Ok(found) => found,
                // A split the library has no algorithm for is left out; the default split's
                // answer is the plan's, so its failure is the caller's.
                Err(_) if splits != default => continue,
                Err(error) => return Err(error),
            };
            all.extend(found.into_iter().map(|candidate| Timed {
                choice: Choice { splits, algo: candidate.algo },
                candidate,
            }));
        }
        Ok(all)
    }

    /// Chooses the split and algorithm for `hidden`'s shape (its address is not read) by timing
    /// what `run_gate` enqueues on `gpu`'s stream (the whole gate call, whose GEMM takes the
    /// shape's plan) with each of [`candidates`](Self::candidates) in the plan in turn, each timed
    /// run after an L2 flush; keeps the fastest by median where it beats the untimed plan by
    /// more than [`REPLACE_MARGIN`], for this router and every router of the backend. A
    /// candidate with which `run_gate` fails is skipped; where none ran (or the flush buffer
    /// could not be allocated) the untimed plan is kept, and a later call times again. Nothing is
    /// timed where [`has_timed_plan`](Self::has_timed_plan) holds. Returns with the stream's work
    /// done.
    pub(crate) fn tune(
        &self,
        gpu: &Gpu,
        hidden: &DeviceMatrix,
        weight: &DeviceMatrix,
        run_gate: &dyn Fn() -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        if self.has_timed_plan(hidden, weight)? {
            return Ok(());
        }
        let shape = Shape::of(hidden, weight);
        let candidates = self.candidates(shape).map_err(choosing)?;
        let _span = tracing::debug_span!("cublaslt_tune", ?shape).entered();
        let measured = match memory::zeroed(gpu, 2 * gpu.l2_bytes.max(1 << 20)) {
            Ok(flush) => {
                let measured = self.time_candidates(gpu, shape, &candidates, &flush, run_gate);
                // The flush buffer goes only after every run on it is done.
                gpu.stream.synchronize().map_err(CudaError::driver("waiting for the timing"))?;
                measured?
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    "no memory to time cuBLASLt's candidates: keeping its heuristic's first"
                );
                Vec::new()
            }
        };
        let chosen = chosen(&measured);
        let index = chosen.unwrap_or(0);
        match chosen {
            Some(index) => tracing::info!(
                ?shape,
                candidate = index,
                splits = candidates[index].choice.splits,
                micros = measured[index].as_ref().ok(),
                heuristic_first_micros = measured[0].as_ref().ok(),
                candidates = candidates.len(),
                "cuBLASLt split and algorithm chosen by timing the gate"
            ),
            None => tracing::info!(
                ?shape,
                candidates = candidates.len(),
                "no cuBLASLt candidate could be timed: keeping the untimed plan"
            ),
        }
        let choice = match chosen {
            Some(_) => *self.lt.timed().entry(shape).or_insert(candidates[index].choice),
            None => candidates[index].choice,
        };
        if let Some(plan) = self.plans().get_mut(&shape) {
            plan.take(shape, choice).map_err(choosing)?;
            plan.timed = chosen.is_some();
        }
        Ok(())
    }

    /// Times `run_gate` with each candidate in the shape's plan (see [`tune`](Self::tune)):
    /// microseconds per call by median, or why it failed with that candidate. A failure of the
    /// driver itself (events, the flush) is an error.
    fn time_candidates(
        &self,
        gpu: &Gpu,
        shape: Shape,
        candidates: &[Timed],
        flush: &CudaSlice<u8>,
        run_gate: &dyn Fn() -> Result<(), CudaError>,
    ) -> Result<Vec<Result<f64, CudaError>>, CudaError> {
        let event = || -> Result<CudaEvent, CudaError> {
            gpu.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(CudaError::driver("creating an event"))
        };
        let (start, end) = (event()?, event()?);
        let stream = &gpu.stream;
        let flush_address = memory::address(gpu, flush);
        let flush_words = flush.len() / size_of::<u32>();
        let flush_l2 = || -> Result<(), CudaError> {
            // SAFETY: the flush buffer holds `flush_words` u32, is only written here, on this
            // stream, and lives until `tune` has synchronised the stream.
            unsafe { cuMemsetD32Async(flush_address, 0x5a5a_5a5a, flush_words, stream.cu_stream()) }
                .result()
                .map_err(CudaError::driver("flushing the L2"))
        };
        let mut measured = Vec::with_capacity(candidates.len());
        for (index, timed) in candidates.iter().enumerate() {
            if let Some(plan) = self.plans().get_mut(&shape) {
                plan.take(shape, timed.choice).map_err(choosing)?;
            }
            let outcome = (|| -> Result<Result<f64, CudaError>, CudaError> {
                for _ in 0..WARMUP_RUNS {
                    if let Err(refused) = run_gate() {
                        return Ok(Err(refused));
                    }
                }
                let mut runs = Vec::with_capacity(TIMED_RUNS);
                for _ in 0..TIMED_RUNS {
                    flush_l2()?;
                    start.record(stream).map_err(CudaError::driver("recording an event"))?;
                    if let Err(refused) = run_gate() {
                        return Ok(Err(refused));
                    }
                    end.record(stream).map_err(CudaError::driver("recording an event"))?;
                    let millis = start
                        .elapsed_ms(&end)
                        .map_err(CudaError::driver("timing a GEMM algorithm"))?;
                    runs.push(f64::from(millis) * 1e3);
                }
                Ok(Ok(median(runs)))
            })()?;
            match &outcome {
                Ok(micros) => tracing::debug!(
                    candidate = index,
                    splits = timed.choice.splits,
                    micros,
                    workspace = timed.candidate.workspace,
                    waves = timed.candidate.waves,
                    "cuBLASLt candidate timed in the gate"
                ),
                Err(refused) => tracing::debug!(
                    candidate = index,
                    splits = timed.choice.splits,
                    error = %refused,
                    "cuBLASLt candidate skipped: the gate did not run with it"
                ),
            }
            measured.push(outcome);
        }
        Ok(measured)
    }

    /// Enqueues the partial sums of the logits `[T, E]` (f32, contiguous rows, one `[T, E]` per
    /// split) at `logits` on `stream`, using [`workspace_bytes`]`(T)` bytes at `workspace`, with
    /// the shape's plan (the untimed one, from host-side queries, where `warm_up` made none).
    /// Returns the split count: `logits` must hold that many `[T, E]`, which [`max_splits`]
    /// bounds.
    ///
    /// # Safety
    ///
    /// `hidden` and `weight` must describe live device memory accepted by [`accepts`](Self::accepts);
    /// `logits` must hold `max_splits(T, H) * T * E` f32 and `workspace` `workspace_bytes(T)`
    /// bytes, 256-byte aligned, both on this context's device and not read or written by
    /// anything else until the work on `stream` is done; the context must be current on this
    /// thread.
    pub(crate) unsafe fn enqueue(
        &self,
        stream: CUstream,
        hidden: &DeviceMatrix,
        weight: &DeviceMatrix,
        logits: u64,
        workspace: u64,
    ) -> Result<usize, CudaError> {
        let shape = Shape::of(hidden, weight);
        let mut plans = self.plans();
        let plan = self.plan(&mut plans, shape).map_err(choosing)?;
        let operands = Operands { hidden, weight, logits, workspace };
        // SAFETY: the caller vouches for the operands, as `matmul` asks, and for room for the
        // partial sums of up to `max_splits` splits, which the plan's split never exceeds (every
        // split the plan takes fits the shape); the algorithm is one of the heuristic's
        // candidates for the plan's descriptors.
        unsafe { plan.descriptors.matmul(&self.lt, &plan.choice.algo, stream, operands) }
            .map_err(|source| CudaError::Cublas { doing: "enqueueing the router GEMM", source })?;
        Ok(plan.choice.splits)
    }
}

/// The error of choosing a split and an algorithm.
fn choosing(source: CublasError) -> CudaError {
    CudaError::Cublas { doing: "choosing a GEMM algorithm", source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(id: u64, state: cublasStatus_t, workspace: usize) -> cublasLtMatmulHeuristicResult_t {
        cublasLtMatmulHeuristicResult_t {
            algo: cublasLtMatmulAlgo_t { data: [id; 8] },
            workspaceSize: workspace,
            state,
            ..unanswered()
        }
    }

    /// The device, where one with cuBLASLt is around; otherwise says why the test skips (or, with
    /// `SLUICE_REQUIRE_GPU` set, fails).
    fn gpu_with_cublaslt(test: &str) -> Option<Gpu> {
        let missing = match Gpu::open(0) {
            Ok(gpu) if gpu.lt.is_some() => return Some(gpu),
            Ok(_) => "cuBLASLt not found".to_owned(),
            Err(error) => format!("no CUDA device ({error})"),
        };
        assert!(
            std::env::var_os("SLUICE_REQUIRE_GPU").is_none(),
            "{test}: SLUICE_REQUIRE_GPU is set but {missing}"
        );
        // Written past the test harness's capture, so the skip is visible in every run.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {missing}");
        None
    }

    /// A plan made by a call takes the default split and the heuristic's first answer for it;
    /// `warm_up`'s timing then keeps one of the candidates (of any split) in its place, and
    /// neither a later call nor a second timing replaces it.
    #[test]
    fn a_timed_choice_replaces_the_heuristics_and_is_shared() {
        const TEST: &str = "a_timed_choice_replaces_the_heuristics_and_is_shared";
        let Some(gpu) = gpu_with_cublaslt(TEST) else { return };
        let Some(lt) = gpu.lt.clone() else { return };
        let gemm = LtGemm::new(lt, gpu.multiprocessors);
        let (tokens, hidden_size, experts) = (64, 7168, 256);
        let matrix = |ptr, rows| DeviceMatrix {
            ptr,
            rows,
            cols: hidden_size,
            row_stride: hidden_size,
            col_stride: 1,
            dtype: sluice_tensor::DType::BF16,
        };
        let weight_buffer = memory::zeroed(&gpu, experts * hidden_size * 2).unwrap();
        let weight = matrix(memory::address(&gpu, &weight_buffer), experts);
        let shape = Shape {
            tokens,
            hidden: hidden_size,
            experts,
            hidden_row_stride: hidden_size,
            weight_row_stride: hidden_size,
        };
        let hidden_buffer = memory::zeroed(&gpu, tokens * hidden_size * 2).unwrap();
        let splits = max_splits(tokens, hidden_size);
        let logits_buffer = memory::zeroed(&gpu, splits * tokens * experts * 4).unwrap();
        let workspace_buffer =
            memory::zeroed(&gpu, workspace_bytes(tokens) + WORKSPACE_ALIGN).unwrap();
        let hidden = matrix(memory::address(&gpu, &hidden_buffer), tokens);
        assert_eq!(Shape::of(&hidden, &weight), shape);
        let logits = memory::address(&gpu, &logits_buffer);
        let workspace =
            memory::address(&gpu, &workspace_buffer).next_multiple_of(WORKSPACE_ALIGN as u64);
        gpu.ctx.bind_to_thread().unwrap();
        let call = |gemm: &LtGemm| {
            // SAFETY: the buffers hold this shape's hidden states, logits, aligned workspace and
            // weight; all live until the end of the test, after the stream is synchronised; the
            // context is current.
            unsafe { gemm.enqueue(gpu.stream.cu_stream(), &hidden, &weight, logits, workspace) }
        };
        let plan = |gemm: &LtGemm| {
            let plans = gemm.plans();
            let plan = &plans[&shape];
            (plan.choice, plan.timed)
        };
        let candidates = gemm.candidates(shape).unwrap();
        let default = default_splits(shape, gpu.multiprocessors);
        assert_eq!(candidates[0].choice.splits, default);
        assert!(
            candidates.iter().any(|c| c.choice.splits != default),
            "other splits are timed too"
        );

        assert_eq!(call(&gemm).unwrap(), default);
        assert_eq!(plan(&gemm), (candidates[0].choice, false));

        let tune = |gemm: &LtGemm| {
            gemm.tune(&gpu, &hidden, &weight, &|| call(gemm).map(|_| ())).unwrap();
        };
        tune(&gemm);
        let (timed_choice, timed) = plan(&gemm);
        assert!(timed, "no candidate of {} could be timed", candidates.len());
        assert!(candidates.iter().any(|c| c.choice == timed_choice));

        assert_eq!(call(&gemm).unwrap(), timed_choice.splits);
        tune(&gemm);
        assert_eq!(plan(&gemm), (timed_choice, true));

        // Another router of the backend takes the same choice, without timing again.
        let other = LtGemm::new(Arc::clone(&gemm.lt), gpu.multiprocessors);
        tune(&other);
        assert_eq!(plan(&other), (timed_choice, true));
        gpu.stream.synchronize().unwrap();
    }

    fn shape(tokens: usize, hidden: usize, experts: usize) -> Shape {
        Shape { tokens, hidden, experts, hidden_row_stride: hidden, weight_row_stride: hidden }
    }

    #[test]
    fn splits_keep_slices_aligned_and_partial_sums_within_the_workspace() {
        // V3's and Kimi-K2's hidden size: 8 slices of 896.
        assert_eq!(max_splits(1024, 7168), 8);
        assert_eq!(max_splits(1025, 7168), 4);
        assert_eq!(max_splits(2048, 7168), 4);
        assert_eq!(max_splits(4096, 7168), 2);
        assert_eq!(max_splits(8192, 7168), 1);
        assert_eq!(max_splits(16384, 7168), 1);
        // Slices must be whole 16-byte chunks of bf16: 5120 / 8 = 640 is, 1032 / 2 = 516 is not.
        assert_eq!(max_splits(256, 5120), 8);
        assert_eq!(max_splits(256, 1032), 1);
        assert_eq!(max_splits(256, 48), 2);
        for tokens in [1, 129, 1000, 3000, 20000] {
            for hidden in [8, 48, 1032, 2048, 7168] {
                let most = max_splits(tokens, hidden);
                assert!(splits_fit(most, tokens, hidden));
                assert!(most * tokens <= MAX_SPLIT_ROWS || most == 1);
            }
        }
    }

    #[test]
    fn the_default_split_fills_one_wave_of_tiles() {
        // An H200's 132 multiprocessors; the splits each shape measured best with as a GEMM.
        let sms = 132;
        let v3 = |t| default_splits(shape(t, 7168, 256), sms);
        let kimi = |t| default_splits(shape(t, 7168, 384), sms);
        assert_eq!([v3(129), v3(256), v3(1024), v3(2048), v3(4096), v3(16384)], [8, 8, 8, 4, 2, 1]);
        assert_eq!([kimi(256), kimi(1024), kimi(2048), kimi(4096)], [8, 4, 2, 1]);
        // Never more than the workspace holds, nor slices that break alignment.
        assert_eq!(default_splits(shape(1025, 7168, 256), sms), 4);
        assert_eq!(default_splits(shape(256, 1032, 256), sms), 1);
        // A small device splits less.
        assert_eq!(default_splits(shape(1024, 7168, 256), 40), 2);
    }

    #[test]
    fn usable_candidates_keep_the_heuristic_order_and_fit_the_workspace() {
        use cublasStatus_t::*;
        let answers = [
            answer(1, CUBLAS_STATUS_SUCCESS, 0),
            answer(2, CUBLAS_STATUS_NOT_SUPPORTED, 0),
            answer(3, CUBLAS_STATUS_SUCCESS, 4096),
            answer(4, CUBLAS_STATUS_SUCCESS, 4097),
            answer(5, CUBLAS_STATUS_SUCCESS, 1024),
        ];
        let ids: Vec<u64> = usable(&answers, 4096).iter().map(|c| c.algo.data[0]).collect();
        assert_eq!(ids, [1, 3, 5]);
        assert!(usable(&answers[1..2], 4096).is_empty());
        assert!(usable(&[], 4096).is_empty());
    }

    #[test]
    fn the_fastest_measured_candidate_wins_and_failures_are_skipped() {
        let measured: [Result<f64, &str>; 5] =
            [Ok(12.48), Err("not supported"), Ok(11.9), Ok(12.0), Err("not supported")];
        assert_eq!(chosen(&measured), Some(2));
        // A failed first choice leaves the others in the race.
        let measured: [Result<f64, &str>; 3] = [Err("not supported"), Ok(9.0), Ok(8.5)];
        assert_eq!(chosen(&measured), Some(2));
    }

    #[test]
    fn the_heuristics_first_choice_stays_unless_beaten_by_the_margin() {
        let within: [Result<f64, ()>; 3] = [Ok(10.2), Ok(10.0), Ok(10.1)];
        assert_eq!(chosen(&within), Some(0));
        let beaten: [Result<f64, ()>; 3] = [Ok(10.4), Ok(10.0), Ok(10.1)];
        assert_eq!(chosen(&beaten), Some(1));
    }

    #[test]
    fn ties_go_to_the_heuristics_earlier_candidate() {
        let measured: [Result<f64, ()>; 3] = [Ok(10.0), Ok(7.0), Ok(7.0)];
        assert_eq!(chosen(&measured), Some(1));
    }

    #[test]
    fn times_that_are_not_times_are_skipped() {
        let measured: [Result<f64, ()>; 4] = [Ok(f64::NAN), Ok(-1.0), Ok(f64::INFINITY), Ok(3.0)];
        assert_eq!(chosen(&measured), Some(3));
    }

    #[test]
    fn nothing_measured_chooses_nothing() {
        assert_eq!(chosen::<()>(&[]), None);
        let measured: [Result<f64, &str>; 2] = [Err("not supported"), Err("not supported")];
        assert_eq!(chosen(&measured), None);
    }

    #[test]
    fn the_median_is_the_middle_time() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0, 1.0, 9.0, 2.0, 7.0]), 5.0);
    }
}
