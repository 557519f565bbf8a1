//! Threads and work split: who computes which rectangle of the logits, and where rows are routed.
//!
//! - Few tokens: the expert blocks are split between threads (each streams its share of the
//!   weight once for all tokens); the rows are then routed, split between threads if there are
//!   enough of them.
//! - Many tokens: threads claim chunks of tokens; each computes a chunk's logits for all experts
//!   into its own buffer and routes the chunk right away, while the logits are still in cache.
//!
//! The calling thread always takes a share; the pool holds the other `threads - 1` workers, which
//! may spin between calls (see [`crate::pool`]).
//! Buffers live in thread-locals that grow once and are then reused, so in steady state a call
//! allocates nothing: it writes the caller's outputs.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ndarray::{ArrayView2, ArrayViewMut2};

use crate::gemm::{Gemm, GemmScratch, OutWindow};
use crate::kernel::Isa;
use crate::pack::{LANES, block_count};
use crate::pool::Pool;
use crate::routing::{RouteScratch, RowOutcome, RowRouter};

/// Below this many tokens per thread the expert blocks are split instead of the tokens.
const MIN_TOKENS_PER_THREAD: usize = 128;
/// Tokens per chunk when tokens are split: the chunk's logits (up to 96 x 384 f32 = 144 KiB) stay
/// in L2 until they are routed.
const TOKEN_CHUNK: usize = 96;
/// Below this many rows routing stays on the calling thread.
const MIN_ROWS_FOR_PARALLEL_ROUTING: usize = 16;

/// The kernel family, the threads and the per-call token limit of a backend.
#[derive(Debug)]
pub(crate) struct Engine {
    pub(crate) kernel: Isa,
    pub(crate) threads: usize,
    pub(crate) max_tokens: usize,
    /// How long the workers spin between calls before they park.
    pub(crate) idle_spin: Duration,
    /// `threads - 1` workers; `None` with one thread.
    pool: Option<Pool>,
}

/// Per-thread buffers.
#[derive(Debug, Default)]
struct Scratch {
    gemm: GemmScratch,
    logits: Vec<f32>,
    row: Vec<f32>,
    route: RouteScratch,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs `f` with this thread's buffers (fresh ones if they are somehow in use already).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Rows of a caller's `[rows, columns]` output that several threads write disjoint rows of. Rows
/// may lie further apart than `columns` (a window of a larger buffer); each row is contiguous.
pub(crate) struct OutRows<'a, T> {
    ptr: *mut T,
    rows: usize,
    columns: usize,
    stride: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: an `OutRows` is an exclusive borrow of the rows split between threads; handing it to
// another thread is sound when `T: Send`, and every access goes through `row`/`window`, whose
// callers guarantee that threads touch disjoint rows.
unsafe impl<T: Send> Send for OutRows<'_, T> {}
// SAFETY: as above; shared references only hand out disjoint parts.
unsafe impl<T: Send> Sync for OutRows<'_, T> {}

impl<'a, T> OutRows<'a, T> {
    /// The rows of a writable two-dimensional view whose rows are contiguous.
    pub(crate) fn new(mut view: ArrayViewMut2<'a, T>) -> Self {
        let (rows, columns) = view.dim();
        let stride = view.strides()[0];
        assert!(
            columns <= 1 || view.strides()[1] == 1,
            "output rows must be contiguous (checked with the arguments)"
        );
        OutRows {
            ptr: view.as_mut_ptr(),
            rows,
            columns,
            // Views made by the bridge have non-negative strides; one row has stride 0 at most.
            stride: usize::try_from(stride).unwrap_or(0),
            _borrow: PhantomData,
        }
    }

    /// Row `row`.
    ///
    /// # Safety
    ///
    /// No other live reference (from this or another thread) may overlap row `row`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, row: usize) -> &'a mut [T] {
        assert!(row < self.rows, "output row {row} of {}", self.rows);
        // SAFETY: row `row` exists (checked) and holds `columns` contiguous elements of the
        // exclusively borrowed output; the caller guarantees no overlapping live reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(row * self.stride), self.columns) }
    }
}

impl OutRows<'_, f32> {
    /// A GEMM output window whose first element is `(row, column)`.
    fn window(&self, row: usize, column: usize) -> OutWindow {
        assert!(row <= self.rows && column <= self.columns, "output window");
        OutWindow { ptr: self.ptr.wrapping_add(row * self.stride + column), stride: self.stride }
    }

    /// The rows as logits to route, once the GEMM has written them.
    fn as_logit_rows(&self) -> LogitRows<'_> {
        LogitRows::Strided {
            ptr: self.ptr,
            rows: self.rows,
            experts: self.columns,
            stride: self.stride,
            _borrow: PhantomData,
        }
    }
}

/// The routing outputs of one call.
pub(crate) struct Routed<'a> {
    pub(crate) ids: OutRows<'a, i32>,
    pub(crate) weights: OutRows<'a, f32>,
}

impl<'a> Routed<'a> {
    /// The id and weight rows of `token`.
    ///
    /// # Safety
    ///
    /// No other live reference may overlap row `token` of either output.
    unsafe fn row(&self, token: usize) -> (&'a mut [i32], &'a mut [f32]) {
        // SAFETY: forwarded.
        unsafe { (self.ids.row(token), self.weights.row(token)) }
    }
}

/// The rows whose hidden states or logits held a NaN or an infinity (marked invalid).
#[derive(Debug, Default)]
pub(crate) struct NonFiniteRows {
    count: AtomicUsize,
    first: AtomicUsize,
}

impl NonFiniteRows {
    fn new() -> Self {
        NonFiniteRows { count: AtomicUsize::new(0), first: AtomicUsize::new(usize::MAX) }
    }

    fn record(&self, row: usize) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.first.fetch_min(row, Ordering::Relaxed);
    }

    /// How many rows were marked.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// The first marked row.
    pub(crate) fn first(&self) -> Option<usize> {
        Some(self.first.load(Ordering::Relaxed)).filter(|&row| row != usize::MAX)
    }
}

/// How the expert blocks are split between `shares` threads: contiguous runs of whole tiles.
fn expert_share(blocks: usize, tile: usize, shares: usize, share: usize) -> Range<usize> {
    let tiles = blocks.div_ceil(tile);
    let bound = |s: usize| (tiles * s / shares * tile).min(blocks);
    bound(share)..bound(share + 1)
}

/// Token chunks for `tokens` split between `threads`: `(chunk length, number of chunks)`.
fn token_chunks(tokens: usize, threads: usize, mr: usize) -> (usize, usize) {
    let chunks = tokens.div_ceil(TOKEN_CHUNK).next_multiple_of(threads);
    let len = tokens.div_ceil(chunks).next_multiple_of(mr).max(1);
    (len, tokens.div_ceil(len))
}

impl Engine {
    pub(crate) fn new(
        kernel: Isa,
        threads: usize,
        max_tokens: usize,
        idle_spin: Duration,
    ) -> std::io::Result<Self> {
        let pool = if threads > 1 { Some(Pool::new(threads - 1, idle_spin)?) } else { None };
        Ok(Engine { kernel, threads, max_tokens, idle_spin, pool })
    }

    /// Runs `work(share)` for every share `0..shares`, share 0 on the calling thread.
    fn for_each_share(&self, shares: usize, work: impl Fn(usize) + Sync) {
        match &self.pool {
            Some(pool) => pool.run(shares, &work),
            None => (0..shares).for_each(work),
        }
    }

    /// Splits `tokens` into chunks that the threads claim one at a time; `f` gets each chunk's
    /// token range and the claiming thread's buffers.
    fn for_each_token_chunk(&self, tokens: usize, f: impl Fn(Range<usize>, &mut Scratch) + Sync) {
        let (len, chunks) = token_chunks(tokens, self.threads, self.kernel.geometry().mr);
        tracing::trace!(chunks, chunk_len = len, "token chunks");
        let next = AtomicUsize::new(0);
        self.for_each_share(self.threads, |_| {
            with_scratch(|scratch| {
                loop {
                    let chunk = next.fetch_add(1, Ordering::Relaxed);
                    if chunk >= chunks {
                        break;
                    }
                    f(chunk * len..((chunk + 1) * len).min(tokens), scratch);
                }
            });
        });
    }

    /// Whether `tokens` are few enough to split the experts instead.
    fn splits_experts(&self, tokens: usize) -> bool {
        tokens < MIN_TOKENS_PER_THREAD * self.threads
    }

    /// All logits `[T, E]` into `out`.
    pub(crate) fn logits(&self, gemm: &Gemm<'_>, out: &OutRows<'_, f32>) {
        let (tokens, _) = gemm.hidden_dims();
        let experts = gemm.experts();
        if tokens == 0 || experts == 0 {
            return;
        }
        assert_eq!((out.rows, out.columns), (tokens, experts), "logits buffer");
        let blocks = block_count(experts);
        if self.splits_experts(tokens) {
            let tile = self.kernel.geometry().nr;
            let shares = self.threads.min(blocks.div_ceil(tile));
            tracing::debug!(tokens, shares, "logits: expert blocks split between threads");
            self.for_each_share(shares, |share| {
                let mine = expert_share(blocks, tile, shares, share);
                if mine.is_empty() {
                    return;
                }
                let window = out.window(0, mine.start * LANES);
                with_scratch(|scratch| {
                    // SAFETY: the shares' block ranges are disjoint, so each thread owns the
                    // columns of its blocks in every row; `window` addresses them.
                    unsafe { gemm.run(0..tokens, mine, window, &mut scratch.gemm) }
                });
            });
        } else {
            tracing::debug!(tokens, "logits: token chunks");
            self.for_each_token_chunk(tokens, |rows, scratch| {
                let window = out.window(rows.start, 0);
                // SAFETY: each chunk is claimed by exactly one thread, so its rows are owned by
                // this call; `window` addresses them.
                unsafe { gemm.run(rows, 0..blocks, window, &mut scratch.gemm) };
            });
        }
    }

    /// The fused route: logits and routing of every token into `out`, and the logits into
    /// `logits` when the caller wants them. Rows with non-finite logits are marked invalid and
    /// reported.
    pub(crate) fn route(
        &self,
        gemm: &Gemm<'_>,
        router: &RowRouter<'_>,
        out: &Routed<'_>,
        logits: Option<&OutRows<'_, f32>>,
    ) -> NonFiniteRows {
        let (tokens, _) = gemm.hidden_dims();
        let experts = gemm.experts();
        if tokens == 0 {
            return NonFiniteRows::new();
        }
        if self.splits_experts(tokens) {
            return match logits {
                Some(logits) => {
                    self.logits(gemm, logits);
                    self.route_rows(router, logits.as_logit_rows(), out)
                }
                None => with_full_logits(tokens * experts, |buffer| {
                    let logits = OutRows::new(
                        ArrayViewMut2::from_shape((tokens, experts), buffer)
                            .expect("the buffer holds tokens x experts values"),
                    );
                    self.logits(gemm, &logits);
                    self.route_rows(router, logits.as_logit_rows(), out)
                }),
            };
        }
        let blocks = block_count(experts);
        tracing::debug!(tokens, "route: token chunks, routed in cache");
        let bad = NonFiniteRows::new();
        self.for_each_token_chunk(tokens, |rows, scratch| {
            let Scratch { gemm: gemm_scratch, logits: chunk, route, .. } = scratch;
            let (window, stride) = match logits {
                Some(logits) => (logits.window(rows.start, 0), logits.stride),
                None => {
                    chunk.clear();
                    chunk.resize(rows.len() * experts, 0.0);
                    (OutWindow { ptr: chunk.as_mut_ptr(), stride: experts }, experts)
                }
            };
            // SAFETY: the window is either this thread's own buffer of `rows.len()` full rows, or
            // the caller's logits rows of this chunk, which only this thread claimed.
            unsafe { gemm.run(rows.clone(), 0..blocks, window, gemm_scratch) };
            for (index, token) in rows.enumerate() {
                // SAFETY: the GEMM above wrote this row completely and nothing writes it while it
                // is read; `stride` is the distance between the window's rows.
                let row =
                    unsafe { std::slice::from_raw_parts(window.ptr.add(index * stride), experts) };
                // SAFETY: the chunk is claimed by this thread alone, so its output rows are not
                // touched by anyone else.
                let (ids, weights) = unsafe { out.row(token) };
                if router.route_row(token, row, route, ids, weights) == RowOutcome::NonFinite {
                    bad.record(token);
                }
            }
        });
        bad
    }

    /// Routes rows of logits into `out`. Rows with non-finite logits are marked invalid and
    /// reported.
    pub(crate) fn route_rows(
        &self,
        router: &RowRouter<'_>,
        logits: LogitRows<'_>,
        out: &Routed<'_>,
    ) -> NonFiniteRows {
        let tokens = logits.len();
        let shares = if tokens >= MIN_ROWS_FOR_PARALLEL_ROUTING { self.threads } else { 1 };
        let bad = NonFiniteRows::new();
        self.for_each_share(shares, |share| {
            let rows = tokens * share / shares..tokens * (share + 1) / shares;
            with_scratch(|scratch| {
                let Scratch { row: copy, route, .. } = scratch;
                for token in rows {
                    let row = logits.row(token, copy);
                    // SAFETY: the shares' row ranges are disjoint.
                    let (ids, weights) = unsafe { out.row(token) };
                    if router.route_row(token, row, route, ids, weights) == RowOutcome::NonFinite {
                        bad.record(token);
                    }
                }
            });
        });
        bad
    }
}

thread_local! {
    /// The calling thread's buffer for all logits of a call that splits the experts.
    static FULL_LOGITS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `len` zeroed values of this thread's logits buffer, which grows once and is then
/// reused (a fresh buffer if it is somehow in use already).
fn with_full_logits<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    FULL_LOGITS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            buffer.clear();
            buffer.resize(len, 0.0);
            f(&mut buffer)
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Rows of f32 logits to route.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LogitRows<'a> {
    /// Rows of `experts` contiguous values, `stride` apart, written by this call's GEMM.
    Strided {
        ptr: *const f32,
        rows: usize,
        experts: usize,
        stride: usize,
        _borrow: PhantomData<&'a [f32]>,
    },
    /// Any strides; a row with a non-unit column stride is copied before it is routed.
    View(ArrayView2<'a, f32>),
}

// SAFETY: both variants are shared borrows of f32 rows that nothing writes while they are routed.
unsafe impl Send for LogitRows<'_> {}
// SAFETY: as above.
unsafe impl Sync for LogitRows<'_> {}

impl<'a> LogitRows<'a> {
    fn len(&self) -> usize {
        match self {
            LogitRows::Strided { rows, .. } => *rows,
            LogitRows::View(view) => view.nrows(),
        }
    }

    /// Row `token` (`< len`), borrowed in place or copied into `copy`.
    fn row<'b>(&'b self, token: usize, copy: &'b mut Vec<f32>) -> &'b [f32] {
        match *self {
            LogitRows::Strided { ptr, rows, experts, stride, .. } => {
                assert!(token < rows, "logit row {token} of {rows}");
                // SAFETY: row `token` exists and holds `experts` contiguous values that the GEMM
                // wrote before routing started; nothing writes them while they are read.
                unsafe { std::slice::from_raw_parts(ptr.add(token * stride), experts) }
            }
            LogitRows::View(ref view) => {
                let row = view.row(token);
                match row.to_slice() {
                    Some(row) => row,
                    None => {
                        copy.clear();
                        copy.extend(row.iter().copied());
                        copy
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_shares_cover_all_blocks_in_whole_tiles() {
        for (blocks, shares) in [(16, 2), (24, 2), (5, 2), (1, 2), (16, 3), (24, 16)] {
            let mut covered = 0;
            for share in 0..shares {
                let range = expert_share(blocks, 4, shares, share);
                assert_eq!(range.start, covered, "blocks {blocks} shares {shares}");
                if range.end < blocks {
                    assert_eq!(range.end % 4, 0);
                }
                covered = range.end;
            }
            assert_eq!(covered, blocks);
        }
        assert_eq!(expert_share(16, 4, 2, 0), 0..8);
        assert_eq!(expert_share(24, 4, 2, 1), 12..24);
    }

    #[test]
    fn token_chunks_cover_all_tokens_and_balance_threads() {
        for (tokens, threads, mr) in
            [(100, 2, 6), (2048, 2, 6), (97, 1, 4), (5000, 3, 6), (1, 2, 6)]
        {
            let (len, chunks) = token_chunks(tokens, threads, mr);
            assert!(len * chunks >= tokens && len * (chunks - 1) < tokens);
            assert!(len <= TOKEN_CHUNK + mr);
        }
        // 100 tokens on 2 threads: two chunks of about 50, not 96 + 4.
        assert_eq!(token_chunks(100, 2, 6), (54, 2));
    }
}
