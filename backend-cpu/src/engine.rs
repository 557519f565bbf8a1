//! Threads and work split: who computes which rectangle of the logits, and where rows are routed.
//!
//! - Few tokens: the expert blocks are split between threads (each streams its share of the
//!   weight once for all tokens); the rows are then routed, split between threads if there are
//!   enough of them.
//! - Many tokens: threads claim chunks of tokens; each computes a chunk's logits for all experts
//!   into its own buffer and routes the chunk right away, while the logits are still in cache.
//!
//! The calling thread always takes a share; the pool holds the other `threads - 1` workers, which
//! stay hot between calls (see [`crate::pool`]).
//! Buffers live in thread-locals and are reused, so a call allocates only its outputs.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::ArrayView2;

use crate::CpuKernel;
use crate::gemm::{Gemm, GemmScratch, OutWindow};
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
    pub(crate) kernel: CpuKernel,
    pub(crate) threads: usize,
    pub(crate) max_tokens: usize,
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

/// A mutable slice that several threads write disjoint parts of.
pub(crate) struct SharedSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: a `SharedSlice` is a `&mut [T]` split between threads; handing it to another thread is
// sound when `T: Send`, and every access goes through `range`/`window`, whose callers guarantee
// disjointness.
unsafe impl<T: Send> Send for SharedSlice<'_, T> {}
// SAFETY: as above; shared references only hand out disjoint parts.
unsafe impl<T: Send> Sync for SharedSlice<'_, T> {}

impl<'a, T> SharedSlice<'a, T> {
    pub(crate) fn new(slice: &'a mut [T]) -> Self {
        SharedSlice { ptr: slice.as_mut_ptr(), len: slice.len(), _borrow: PhantomData }
    }

    /// The elements `range`.
    ///
    /// # Safety
    ///
    /// No other live reference (from this or another thread) may overlap `range`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, range: Range<usize>) -> &'a mut [T] {
        assert!(range.start <= range.end && range.end <= self.len, "shared slice range");
        // SAFETY: in bounds (checked), the borrow `'a` is exclusive to this `SharedSlice`, and the
        // caller guarantees no overlap with other live parts.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }

    /// The address of element `offset` (in bounds), for a strided window.
    fn window(&self, offset: usize) -> *mut T {
        assert!(offset <= self.len, "shared slice offset");
        self.ptr.wrapping_add(offset)
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
        kernel: CpuKernel,
        threads: usize,
        max_tokens: usize,
    ) -> std::io::Result<Self> {
        let pool = if threads > 1 { Some(Pool::new(threads - 1)?) } else { None };
        Ok(Engine { kernel, threads, max_tokens, pool })
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
    pub(crate) fn logits(&self, gemm: &Gemm<'_>, out: &mut [f32]) {
        let (tokens, _) = gemm.hidden_dims();
        let experts = gemm.experts();
        if tokens == 0 || experts == 0 {
            return;
        }
        assert_eq!(out.len(), tokens * experts, "logits buffer");
        let blocks = block_count(experts);
        let out = SharedSlice::new(out);
        if self.splits_experts(tokens) {
            let tile = self.kernel.geometry().nr;
            let shares = self.threads.min(blocks.div_ceil(tile));
            tracing::debug!(tokens, shares, "logits: expert blocks split between threads");
            self.for_each_share(shares, |share| {
                let mine = expert_share(blocks, tile, shares, share);
                if mine.is_empty() {
                    return;
                }
                let window = OutWindow { ptr: out.window(mine.start * LANES), stride: experts };
                with_scratch(|scratch| {
                    // SAFETY: the shares' block ranges are disjoint, so each thread owns the
                    // columns of its blocks in every row; `window` addresses them.
                    unsafe { gemm.run(0..tokens, mine, window, &mut scratch.gemm) }
                });
            });
        } else {
            tracing::debug!(tokens, "logits: token chunks");
            self.for_each_token_chunk(tokens, |rows, scratch| {
                let window = OutWindow { ptr: out.window(rows.start * experts), stride: experts };
                // SAFETY: each chunk is claimed by exactly one thread, so its rows are owned by
                // this call; `window` addresses them.
                unsafe { gemm.run(rows, 0..blocks, window, &mut scratch.gemm) };
            });
        }
    }

    /// The fused route: logits and routing of every token into `ids` and `weights` (`[T, K]`
    /// each). Returns the first non-finite row, if any (those rows are marked invalid).
    pub(crate) fn route(
        &self,
        gemm: &Gemm<'_>,
        router: &RowRouter<'_>,
        ids: &mut [i32],
        weights: &mut [f32],
    ) -> Option<usize> {
        let (tokens, _) = gemm.hidden_dims();
        let experts = gemm.experts();
        let k = router.spec().top_k;
        if tokens == 0 {
            return None;
        }
        if self.splits_experts(tokens) {
            let mut logits = vec![0.0; tokens * experts];
            self.logits(gemm, &mut logits);
            let rows = LogitRows::Contiguous { data: &logits, experts };
            return self.route_rows(router, rows, ids, weights);
        }
        let blocks = block_count(experts);
        tracing::debug!(tokens, "route: token chunks, routed in cache");
        let first_bad = AtomicUsize::new(usize::MAX);
        let (ids, weights) = (SharedSlice::new(ids), SharedSlice::new(weights));
        self.for_each_token_chunk(tokens, |rows, scratch| {
            scratch.logits.clear();
            scratch.logits.resize(rows.len() * experts, 0.0);
            let window = OutWindow { ptr: scratch.logits.as_mut_ptr(), stride: experts };
            // SAFETY: the window is this thread's own buffer of `rows.len()` full rows.
            unsafe { gemm.run(rows.clone(), 0..blocks, window, &mut scratch.gemm) };
            // SAFETY: the chunk is claimed by this thread alone, so its output rows are not
            // touched by anyone else.
            let (ids, weights) = unsafe {
                (
                    ids.range(rows.start * k..rows.end * k),
                    weights.range(rows.start * k..rows.end * k),
                )
            };
            let bad = router.route_block(&scratch.logits, ids, weights, &mut scratch.route);
            if let Some(bad) = bad {
                first_bad.fetch_min(rows.start + bad, Ordering::Relaxed);
            }
        });
        Some(first_bad.into_inner()).filter(|&row| row != usize::MAX)
    }

    /// Routes rows of logits. Returns the first non-finite row, if any.
    pub(crate) fn route_rows(
        &self,
        router: &RowRouter<'_>,
        logits: LogitRows<'_>,
        ids: &mut [i32],
        weights: &mut [f32],
    ) -> Option<usize> {
        let tokens = logits.len();
        let k = router.spec().top_k;
        let shares = if tokens >= MIN_ROWS_FOR_PARALLEL_ROUTING { self.threads } else { 1 };
        let first_bad = AtomicUsize::new(usize::MAX);
        let (ids, weights) = (SharedSlice::new(ids), SharedSlice::new(weights));
        self.for_each_share(shares, |share| {
            let rows = tokens * share / shares..tokens * (share + 1) / shares;
            // SAFETY: the shares' row ranges are disjoint.
            let (ids, weights) = unsafe {
                (
                    ids.range(rows.start * k..rows.end * k),
                    weights.range(rows.start * k..rows.end * k),
                )
            };
            with_scratch(|scratch| {
                let Scratch { row: copy, route, .. } = scratch;
                let out = ids.chunks_exact_mut(k).zip(weights.chunks_exact_mut(k));
                for (token, (ids, weights)) in rows.zip(out) {
                    let row = logits.row(token, copy);
                    if router.route_row(row, route, ids, weights) == RowOutcome::NonFinite {
                        first_bad.fetch_min(token, Ordering::Relaxed);
                    }
                }
            });
        });
        Some(first_bad.into_inner()).filter(|&row| row != usize::MAX)
    }
}

/// Rows of f32 logits to route.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LogitRows<'a> {
    /// Row-major rows of `experts` values each.
    Contiguous { data: &'a [f32], experts: usize },
    /// Any strides; a row with a non-unit column stride is copied before it is routed.
    View(ArrayView2<'a, f32>),
}

impl<'a> LogitRows<'a> {
    fn len(&self) -> usize {
        match self {
            LogitRows::Contiguous { data, experts } => data.len() / (*experts).max(1),
            LogitRows::View(view) => view.nrows(),
        }
    }

    /// Row `token` (`< len`), borrowed in place or copied into `copy`.
    fn row<'b>(&'b self, token: usize, copy: &'b mut Vec<f32>) -> &'b [f32] {
        match self {
            LogitRows::Contiguous { data, experts } => {
                &data[token * experts..(token + 1) * experts]
            }
            LogitRows::View(view) => {
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
