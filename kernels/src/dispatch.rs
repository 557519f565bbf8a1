//! Launch geometry of the dispatch layout (`gpu/dispatch.cuh`): one block up to
//! [`ONE_BLOCK_MAX_PAIRS`] pairs, else tiles of rows over many blocks with a workspace of
//! per-block counts, in warps of the vendor's width; the layout fused into block-per-token routing
//! (`gpu/route_dispatch.cuh`, [`FusedLayout`]); and the kernels' argument, [`DispatchArgs`], made
//! from checked operands by [`dispatch_args`].

use sluice_tensor::{BackendError, DispatchInputs, DispatchOutputs, DispatchShape, DlpackViewMut};

use crate::geometry::{Launch, RouteKernel, RoutePlan};
use crate::operands::output_rows;
use crate::{KernelError, MAX_EXPERTS, MAX_TOP_K};

/// Name of the many-block path's counting kernel.
pub const DISPATCH_COUNT_KERNEL: &str = "sluice_dispatch_count";
/// Name of the kernel that writes the layout.
pub const DISPATCH_SCATTER_KERNEL: &str = "sluice_dispatch_scatter";
/// Name of the kernel that counts distinct tokens per rank, after the scatter (rank outputs only).
pub const DISPATCH_RANK_TOKENS_KERNEL: &str = "sluice_dispatch_rank_tokens";

/// Name of the block-per-token routing kernel that adds up to `MAX_PARTIALS` partial sums and lays
/// out the call's ids.
pub const ROUTE_DISPATCH_KERNEL: &str = "sluice_route_block_dispatch";
/// Name of the block-per-token routing kernel that reads finished logits and lays out the call's
/// ids.
pub const ROUTE_DISPATCH_LOGITS_KERNEL: &str = "sluice_route_block_dispatch_logits";
/// Name of the kernel that lays out the ids of those two past [`LAST_BLOCK_MAX_ROWS`] rows, a
/// word of [`WORD_ROWS`] rows per block.
pub const DISPATCH_WORDS_KERNEL: &str = "sluice_dispatch_words";

/// Threads per block of the rank-tokens kernel, one row each (`SLUICE_DISPATCH_RANK_THREADS`).
pub const RANK_TOKENS_THREADS: usize = 256;

/// Shared slots of the per-warp counts, `[warps][E]` (`SLUICE_DISPATCH_HIST_SLOTS`).
const HIST_SLOTS: usize = 6144;
/// The most threads a dispatch block has (`SLUICE_DISPATCH_MAX_THREADS`).
const MAX_THREADS: usize = 1024;
/// Pairs per lane of a warp that a block is sized for: enough to pay for a warp's share of the
/// per-expert work (its counts are zeroed, scanned and read by every block).
const PAIRS_PER_LANE: usize = 4;
/// Fewest warps a block gets, so that the per-expert loops over `E` are spread.
const MIN_WARPS: usize = 4;
/// Up to this many pairs the whole layout is one block: one launch and no workspace, against a
/// many-block path that launches twice and reads every block's counts in every block. Measured on
/// an H200 (E = 256, K = 8, graph-replayed layout alone): at T = 1024 one block of 8192 pairs took
/// 18.4 us, four blocks of 2048 11.5 us.
pub const ONE_BLOCK_MAX_PAIRS: usize = 2048;
/// Pairs per block on the many-block path. Measured on an H200 at T = 16384 (E = 256, K = 8):
/// 19.3 us with 4096 pairs per block (32 blocks), 15.6 us with 2048 (64), 25.9 us with 1024
/// (128), where every block reads every block's counts.
pub const PAIRS_PER_BLOCK: usize = 2048;

/// The kernels' argument, passed by value: the layout of `struct sluice_dispatch_args` (addresses
/// as u64, 0 for an output not asked for).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchArgs {
    /// i32 `[T, K]`, rows `ids_row_stride` apart.
    pub ids: u64,
    /// i32 `[E]`, or 0 without rank outputs.
    pub expert_ranks: u64,
    /// i32 `[E]`.
    pub expert_counts: u64,
    /// i32 `[E + 1]`.
    pub expert_offsets: u64,
    /// i32 `[T * K]`.
    pub sorted_pairs: u64,
    /// i32 `[T, K]`, rows `inverse_row_stride` apart.
    pub inverse: u64,
    /// i32 `[2]`, or 0.
    pub invalid: u64,
    /// i32 `[capacity]`, or 0 without padding.
    pub padded_pairs: u64,
    /// i32 `[capacity / block_size]`.
    pub block_experts: u64,
    /// i32 `[1]`.
    pub padded_total: u64,
    /// i32 `[R]`, or 0 without rank outputs.
    pub rank_counts: u64,
    /// i32 `[R + 1]`.
    pub rank_offsets: u64,
    /// i32 `[T * K]`.
    pub rank_pairs: u64,
    /// i32 `[R]`.
    pub rank_tokens: u64,
    /// The workspace of the many-block path ([`DispatchPlan::workspace_bytes`]), or 0.
    pub block_counts: u64,
    /// Elements between rows of `ids`.
    pub ids_row_stride: i64,
    /// Elements between rows of `inverse`.
    pub inverse_row_stride: i64,
    /// `T`.
    pub tokens: i32,
    /// Rows per padded block, 0 without padding.
    pub block_size: i32,
    /// Length of `padded_pairs`.
    pub capacity: i32,
    /// `R`, 0 without rank outputs.
    pub ranks: i32,
    /// Set by [`DispatchPlan::fill`].
    pub rows_per_block: i32,
    /// Set by [`DispatchPlan::fill`].
    pub blocks: i32,
    /// Set by [`DispatchPlan::fill`].
    pub threads: i32,
}

/// How one dispatch of `T` tokens runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchPlan {
    /// The counting kernel's launch, on the many-block path only.
    pub count: Option<Launch>,
    /// The scatter kernel's launch (the same grid as `count`).
    pub scatter: Launch,
    /// The rank-tokens kernel's launch, when there are rank outputs and rows.
    pub rank_tokens: Launch,
    /// Rows of `topk_ids` per block.
    pub rows_per_block: usize,
    /// Bytes of caller workspace: per-block counts, `blocks * (E + 2)` i32 on the many-block
    /// path, 0 on the one-block path.
    pub workspace_bytes: usize,
}

impl DispatchPlan {
    /// Writes the plan's share of the kernels' argument. The kernels take the one-block path
    /// exactly when `block_counts` is null, so on that path it is cleared whatever workspace the
    /// caller passed (a workspace sized for more tokens is still a valid argument).
    pub fn fill(&self, args: &mut DispatchArgs) {
        if self.count.is_none() {
            args.block_counts = 0;
        }
        args.rows_per_block = i32::try_from(self.rows_per_block).unwrap_or(i32::MAX);
        args.blocks = self.scatter.grid[0] as i32;
        args.threads = self.scatter.block[0] as i32;
    }
}

/// Rows of a word of the layout inside routing (`SLUICE_WORD_ROWS`): a bit each in a 64-bit mask
/// of the rows that chose each expert, laid out by one block.
pub const WORD_ROWS: usize = 64;

/// Rows up to which the routing block that finishes last lays out every row itself (one word):
/// past them `sluice_dispatch_words` lays out a word per block after routing. The words' kernel
/// from 2 rows on measured slower on an H200 (V3, added to the graph-replayed gate: 2.7 / 4.2 /
/// 5.1 us at 2 / 32 / 64 rows, against 2.0 / 3.0 / 5.0 by the last block).
pub const LAST_BLOCK_MAX_ROWS: usize = WORD_ROWS;

/// Where the counts of the layout inside routing start, in bytes after the ticket.
pub const FUSED_COUNTS_OFFSET: usize = 16;

/// Counts per expert in the fused layout's counts of `tokens` rows: one per word of
/// [`WORD_ROWS`] rows, a multiple of 4 (`sluice_fused_count_stride`).
fn fused_count_stride(tokens: usize) -> usize {
    tokens.div_ceil(4 * WORD_ROWS) * 4
}

/// Bytes of the counts that a fused layout of `tokens` rows keeps after its ticket
/// ([`FUSED_COUNTS_OFFSET`] bytes on): an i32 per word for each of the `experts` experts and
/// for the rows marked invalid; 0 where the last routing block lays out.
pub fn fused_counts_bytes(experts: usize, tokens: usize) -> usize {
    if tokens <= LAST_BLOCK_MAX_ROWS {
        return 0;
    }
    (experts + 1) * fused_count_stride(tokens) * size_of::<i32>()
}

/// The dispatch layout computed with block-per-token routing (`gpu/route_dispatch.cuh`), for every
/// row count that routing takes a block per token: up to [`LAST_BLOCK_MAX_ROWS`] rows the block
/// that finishes last lays out every row; past them each routing block counts its row per
/// expert and word of [`WORD_ROWS`] rows (in the gate call's workspace after the ticket), and
/// `sluice_dispatch_words` lays out a word per block after routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedLayout {
    /// Rows routed, one block each.
    pub tokens: usize,
    /// Threads per routing block: a thread per expert, in whole warps; the layout blocks' too.
    pub threads: usize,
    /// Blocks of `sluice_dispatch_words`, a word of rows each; 0 where the last routing block
    /// lays out.
    pub layout_blocks: usize,
}

impl FusedLayout {
    /// The fused kernels' layout for a routing launch `route`, where they take it:
    /// block-per-token routing (every ranked-score config has the fused kernels beside the block
    /// ones) and no rank outputs (their distinct tokens per rank are a kernel of their own).
    /// `None` otherwise: the layout is then a launch of its own after routing.
    ///
    /// On an H200, graph-replayed, the layout added to V3's gate 4.3 / 4.1 / 4.6 / 8.2 us at
    /// 65 / 256 / 512 / 1024 rows a word per block, where the last routing block laying out every
    /// row had added 3.3 / 6.2 / 11.2 / 25.9 us (alone with 32 pairs a thread at 1024 rows) and
    /// the layout's own general launches add 6.7 / 8.1 / 13.7 / 20.0 us.
    pub fn plan(route: &RoutePlan, rank_outputs: bool) -> Option<Self> {
        let (tokens, threads) = (route.launch.grid[0] as usize, route.launch.block[0] as usize);
        let fused = route.kernel == RouteKernel::Block && !rank_outputs;
        let layout_blocks =
            if tokens <= LAST_BLOCK_MAX_ROWS { 0 } else { tokens.div_ceil(WORD_ROWS) };
        fused.then_some(FusedLayout { tokens, threads, layout_blocks })
    }

    /// The fused kernel's launch: the routing's, a block per row.
    pub fn launch(&self) -> Launch {
        Launch {
            grid: [self.tokens as u32, 1, 1],
            block: [self.threads as u32, 1, 1],
            shared_bytes: 0,
        }
    }

    /// The launch of `sluice_dispatch_words` after the fused kernel, where it lays out.
    pub fn layout_launch(&self) -> Option<Launch> {
        (self.layout_blocks > 0).then_some(Launch {
            grid: [self.layout_blocks as u32, 1, 1],
            block: [self.threads as u32, 1, 1],
            shared_bytes: 0,
        })
    }

    /// The kernel's symbol, for logits given as `splits` partial sums.
    pub fn name(&self, splits: usize) -> &'static str {
        if splits <= 1 { ROUTE_DISPATCH_LOGITS_KERNEL } else { ROUTE_DISPATCH_KERNEL }
    }

    /// Writes the launch's share of the argument: rows laid out a word per block by
    /// [`layout_blocks`](Self::layout_blocks) blocks (0: every row by the last routing block),
    /// of the routing block's threads, with no per-block counts.
    pub fn fill(&self, args: &mut DispatchArgs) {
        args.block_counts = 0;
        args.rows_per_block = self.tokens.min(WORD_ROWS) as i32;
        args.blocks = self.layout_blocks as i32;
        args.threads = self.threads as i32;
    }
}

/// The kernels' argument for inputs and outputs that `sluice_tensor::check_dispatch_into` accepted
/// (`shape` and `ranks` are what it returned), before [`DispatchPlan::fill`]: every address, row
/// stride and size, 0 for an output not asked for. A size beyond the kernels' `int` is refused.
pub fn dispatch_args(
    op: &'static str,
    inputs: &DispatchInputs<'_>,
    outputs: &mut DispatchOutputs<'_>,
    shape: DispatchShape,
    ranks: usize,
) -> Result<DispatchArgs, BackendError> {
    let address = |view: &mut DlpackViewMut<'_>| output_rows(view).0;
    let to_i32 = |arg: &'static str, value: usize| {
        i32::try_from(value).map_err(|_| BackendError::IndexOverflow { op, arg, entries: value })
    };
    let ids = &inputs.topk_ids;
    let (inverse, inverse_row_stride) = output_rows(&mut outputs.inverse);
    let mut args = DispatchArgs {
        ids: ids.data_ptr() as u64,
        expert_ranks: inputs.expert_ranks.map_or(0, |table| table.data_ptr() as u64),
        expert_counts: address(&mut outputs.expert_counts),
        expert_offsets: address(&mut outputs.expert_offsets),
        sorted_pairs: address(&mut outputs.sorted_pairs),
        inverse,
        invalid: outputs.invalid.as_mut().map_or(0, address),
        block_counts: outputs.workspace.as_mut().map_or(0, address),
        ids_row_stride: ids.strides().first().map_or(0, |&s| s as i64),
        inverse_row_stride: inverse_row_stride as i64,
        tokens: to_i32("topk_ids", shape.tokens)?,
        ranks: to_i32("rank_counts", ranks)?,
        ..DispatchArgs::default()
    };
    if let Some(padded) = outputs.padded.as_mut() {
        args.padded_pairs = address(&mut padded.padded_pairs);
        args.block_experts = address(&mut padded.block_experts);
        args.padded_total = address(&mut padded.padded_total);
        args.block_size = to_i32("block_size", padded.block_size)?;
        args.capacity = to_i32("padded_pairs", padded.padded_pairs.shape()[0])?;
    }
    if let Some(rank_outputs) = outputs.ranks.as_mut() {
        args.rank_counts = address(&mut rank_outputs.rank_counts);
        args.rank_offsets = address(&mut rank_outputs.rank_offsets);
        args.rank_pairs = address(&mut rank_outputs.rank_pairs);
        args.rank_tokens = address(&mut rank_outputs.rank_tokens);
    }
    Ok(args)
}

/// The most warps of `wave_width` lanes a block of a layout over `experts` experts takes (its
/// counts are `[warps][E]` in shared memory).
fn max_warps(experts: usize, wave_width: usize) -> usize {
    (HIST_SLOTS / experts.max(1)).min(MAX_THREADS / wave_width)
}

/// The launches of one dispatch of `tokens` tokens of `top_k` picks among `experts` experts, for
/// kernels compiled with warps (waves) of `wave_width` lanes (`NVIDIA_WAVE_WIDTH` or
/// `AMD_WAVE_WIDTH`): every block is a whole number of them.
pub fn plan_dispatch(
    tokens: usize,
    top_k: usize,
    experts: usize,
    wave_width: usize,
) -> Result<DispatchPlan, KernelError> {
    debug_assert!(matches!(wave_width, 32 | 64), "a backend's wave width, not {wave_width}");
    if experts > MAX_EXPERTS {
        return Err(KernelError::TooManyExperts(experts));
    }
    if top_k > MAX_TOP_K {
        return Err(KernelError::TopKTooLarge(top_k));
    }
    let too_large = KernelError::TooLarge {
        what: "tokens x top_k",
        value: usize::MAX,
        limit: i32::MAX as usize,
    };
    let pairs = tokens.checked_mul(top_k).ok_or(too_large.clone())?;
    if pairs > i32::MAX as usize {
        return Err(KernelError::TooLarge {
            what: "tokens x top_k",
            value: pairs,
            limit: i32::MAX as usize,
        });
    }
    let one_block = pairs <= ONE_BLOCK_MAX_PAIRS;
    let rows_per_block =
        if one_block { tokens.max(1) } else { (PAIRS_PER_BLOCK / top_k.max(1)).max(1) };
    let blocks = if one_block { 1 } else { tokens.div_ceil(rows_per_block) };
    let tile_pairs = rows_per_block.min(tokens.max(1)) * top_k;
    let warps = tile_pairs
        .div_ceil(PAIRS_PER_LANE * wave_width)
        .clamp(MIN_WARPS, MAX_THREADS / wave_width)
        .min(max_warps(experts, wave_width));
    let launch = Launch {
        grid: [blocks as u32, 1, 1],
        block: [(warps * wave_width) as u32, 1, 1],
        shared_bytes: 0,
    };
    let workspace_bytes = if one_block { 0 } else { blocks * (experts + 2) * 4 };
    let rank_blocks = tokens.div_ceil(RANK_TOKENS_THREADS).max(1) as u32;
    Ok(DispatchPlan {
        count: (!one_block).then_some(launch),
        scatter: launch,
        rank_tokens: Launch {
            grid: [rank_blocks, 1, 1],
            block: [RANK_TOKENS_THREADS as u32, 1, 1],
            shared_bytes: 0,
        },
        rows_per_block,
        workspace_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AMD_WAVE_WIDTH, NVIDIA_WAVE_WIDTH as NVIDIA};

    #[test]
    fn few_pairs_take_one_block_and_no_workspace() {
        for tokens in [0, 1, 7, 64, 256] {
            let plan = plan_dispatch(tokens, 8, 256, NVIDIA).unwrap();
            assert_eq!(plan.count, None, "T = {tokens}");
            assert_eq!(plan.scatter.grid, [1, 1, 1]);
            assert_eq!(plan.workspace_bytes, 0);
            assert!(plan.rows_per_block >= tokens);
        }
        // Small tiles get the fewest warps; a full one-block tile gets as many as fit.
        assert_eq!(plan_dispatch(1, 8, 256, NVIDIA).unwrap().scatter.block, [128, 1, 1]);
        assert_eq!(plan_dispatch(256, 8, 256, NVIDIA).unwrap().scatter.block, [512, 1, 1]);
        // AMD's waves are twice as wide: as many pairs per lane, half the waves.
        assert_eq!(plan_dispatch(1, 8, 256, AMD_WAVE_WIDTH).unwrap().scatter.block, [256, 1, 1]);
        assert_eq!(plan_dispatch(256, 8, 256, AMD_WAVE_WIDTH).unwrap().scatter.block, [512, 1, 1]);
    }

    #[test]
    fn the_layout_is_fused_into_block_routing_wherever_routing_takes_a_block_per_token() {
        use crate::geometry::{H200_ROUTE, RouteKernel, RouteTarget, plan_route};
        use sluice_tensor::{RoutingSpec, ScoringFunc, TopkMethod};
        let config = |experts, top_k| {
            let spec = RoutingSpec::builder(experts, top_k)
                .scoring(ScoringFunc::Sigmoid)
                .method(TopkMethod::NoauxTc)
                .build()
                .unwrap();
            crate::RoutingConfig::new(&spec).unwrap()
        };
        let v3 = config(256, 8);
        for tokens in [1, 7, LAST_BLOCK_MAX_ROWS, LAST_BLOCK_MAX_ROWS + 1, 300, 1024, 1056] {
            let route = plan_route(&v3, tokens, &H200_ROUTE).unwrap();
            let fused = FusedLayout::plan(&route, false).expect("V3 is fused");
            assert_eq!((fused.tokens, fused.threads), (tokens, 256));
            assert_eq!(fused.launch(), route.launch, "the routing's own launch");
            // The last routing block lays out a word of rows; past it a block a word, of the
            // routing block's threads, after routing.
            let words = if tokens <= LAST_BLOCK_MAX_ROWS { 0 } else { tokens.div_ceil(64) };
            assert_eq!(fused.layout_blocks, words);
            assert_eq!(
                fused.layout_launch().map(|l| (l.grid, l.block)),
                (words > 0).then_some(([words as u32, 1, 1], [256, 1, 1]))
            );
            let mut args = DispatchArgs { block_counts: 4096, ..DispatchArgs::default() };
            fused.fill(&mut args);
            assert_eq!((args.block_counts, args.blocks), (0, words as i32));
            assert_eq!((args.rows_per_block, args.threads), (tokens.min(64) as i32, 256));
            assert_eq!(fused.name(1), ROUTE_DISPATCH_LOGITS_KERNEL);
            assert_eq!(fused.name(6), ROUTE_DISPATCH_KERNEL);
            // Rank outputs keep their own launches.
            assert_eq!(FusedLayout::plan(&route, true), None);
        }
        // Past the wave (1056 rows of V3, 704 of Kimi-K2's) routing is a warp per token, and the
        // layout a launch of its own.
        let kimi = config(384, 8);
        let wave = plan_route(&kimi, 704, &H200_ROUTE).unwrap();
        assert_eq!(FusedLayout::plan(&wave, false).map(|f| f.layout_blocks), Some(11));
        for (config, tokens) in [(&v3, 1057), (&kimi, 705), (&v3, 4096)] {
            let warp = plan_route(config, tokens, &H200_ROUTE).unwrap();
            assert_eq!(warp.kernel, RouteKernel::Warp);
            assert_eq!(FusedLayout::plan(&warp, false), None);
        }
        // Up to 1024 experts (a thread each), K = 32 for one row.
        let large = config(1024, 32);
        let one = plan_route(&large, 1, &H200_ROUTE).unwrap();
        assert_eq!(FusedLayout::plan(&one, false).map(|f| f.threads), Some(1024));
        // No block kernels in the module (hash routing), no fusion.
        let no_block_kernels = RouteTarget { block_kernels: false, ..H200_ROUTE };
        let warp_only = plan_route(&v3, 1, &no_block_kernels).unwrap();
        assert_eq!(FusedLayout::plan(&warp_only, false), None);
        // The rows of a word and the counts' place as the device has them.
        for define in [
            format!("#define SLUICE_WORD_ROWS {WORD_ROWS}\n"),
            format!("#define SLUICE_LAST_BLOCK_MAX_ROWS {LAST_BLOCK_MAX_ROWS}\n"),
            format!("(int *)(ticket + {})", FUSED_COUNTS_OFFSET / 4),
        ] {
            assert!(crate::SOURCE.contains(&define), "{define}");
        }
    }

    #[test]
    fn the_fused_counts_hold_a_count_per_expert_and_word_of_rows() {
        assert_eq!(fused_counts_bytes(256, 1), 0, "the last block lays out");
        assert_eq!(fused_counts_bytes(256, LAST_BLOCK_MAX_ROWS), 0);
        // A multiple of 4 counts per expert and for the invalid rows: 16-byte loads and stores.
        assert_eq!(fused_counts_bytes(256, LAST_BLOCK_MAX_ROWS + 1), 257 * 4 * 4);
        assert_eq!(fused_counts_bytes(256, 256), 257 * 4 * 4);
        assert_eq!(fused_counts_bytes(256, 257), 257 * 8 * 4);
        assert_eq!(fused_counts_bytes(256, 1024), 257 * 16 * 4);
        assert_eq!(fused_counts_bytes(1024, 1056), 1025 * 20 * 4);
        // The device's counts per expert.
        assert!(crate::SOURCE.contains("return (tokens + 255) / 256 * 4;"));
    }

    #[test]
    fn the_one_block_path_ignores_a_workspace_the_caller_passed() {
        let mut args = DispatchArgs { block_counts: 4096, ..DispatchArgs::default() };
        plan_dispatch(64, 8, 256, NVIDIA).unwrap().fill(&mut args);
        assert_eq!(args.block_counts, 0, "the kernels would take the many-block path");
        let mut args = DispatchArgs { block_counts: 4096, ..DispatchArgs::default() };
        plan_dispatch(16_384, 8, 256, NVIDIA).unwrap().fill(&mut args);
        assert_eq!(args.block_counts, 4096);
    }

    #[test]
    fn many_pairs_are_tiled_by_rows_with_a_workspace_of_block_counts() {
        let plan = plan_dispatch(16_384, 8, 256, NVIDIA).unwrap();
        assert_eq!(plan.rows_per_block, PAIRS_PER_BLOCK / 8);
        assert_eq!(plan.scatter.grid[0] as usize, 16_384usize.div_ceil(256));
        assert_eq!(plan.count, Some(plan.scatter));
        assert_eq!(plan.workspace_bytes, 64 * 258 * 4);
        // A last tile shorter than the others still gets its block.
        let uneven = plan_dispatch(4097, 8, 256, NVIDIA).unwrap();
        assert_eq!(uneven.scatter.grid[0], 17);
        assert!(uneven.rows_per_block * 8 < 4097 * 8);
    }

    #[test]
    fn warps_never_outgrow_the_shared_counts() {
        for (experts, wave) in [1, 8, 64, 256, 384, 1000, 1024]
            .into_iter()
            .flat_map(|e| [(e, NVIDIA), (e, AMD_WAVE_WIDTH)])
        {
            for tokens in [0, 1, 300, 4096, 100_000] {
                for top_k in [1, 2, 8, 32] {
                    let plan = plan_dispatch(tokens, top_k, experts, wave).unwrap();
                    let threads = plan.scatter.block[0] as usize;
                    assert!(threads.is_multiple_of(wave) && threads <= MAX_THREADS, "{wave}");
                    assert!(threads / wave >= MIN_WARPS.min(max_warps(experts, wave)));
                    assert!(threads / wave * experts <= HIST_SLOTS, "E = {experts}, {wave}");
                    let blocks = plan.scatter.grid[0] as usize;
                    assert!(blocks * plan.rows_per_block >= tokens, "every row has a block");
                    assert!(blocks == 1 || (blocks - 1) * plan.rows_per_block < tokens);
                }
            }
        }
    }

    #[test]
    fn sizes_beyond_the_kernels_are_refused() {
        assert!(matches!(
            plan_dispatch(1, 8, 2048, NVIDIA),
            Err(KernelError::TooManyExperts(2048))
        ));
        // One thread per row for the tokens per rank.
        let plan = plan_dispatch(1000, 8, 256, NVIDIA).unwrap();
        assert_eq!(plan.rank_tokens.grid[0] as usize * RANK_TOKENS_THREADS, 1024);
        assert!(matches!(plan_dispatch(1, 33, 256, NVIDIA), Err(KernelError::TopKTooLarge(33))));
        assert!(matches!(
            plan_dispatch(1 << 29, 8, 256, NVIDIA),
            Err(KernelError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_argument_has_the_device_struct_layout() {
        // 15 addresses, 2 strides, 7 ints, padded to the 8-byte alignment.
        assert_eq!(size_of::<DispatchArgs>(), 15 * 8 + 2 * 8 + 7 * 4 + 4);
        assert_eq!(align_of::<DispatchArgs>(), 8);
        let mut args = DispatchArgs::default();
        plan_dispatch(16_384, 8, 256, NVIDIA).unwrap().fill(&mut args);
        assert_eq!((args.rows_per_block, args.blocks), (256, 64));
    }

    #[test]
    fn the_argument_holds_every_address_stride_and_size_and_zero_for_what_was_not_asked() {
        use sluice_tensor::{DlpackView, PaddedOutputs};
        let (t, k, e) = (3, 2, 4);
        // The ids and the inverse are windows of rows 5 and 3 wide.
        let ids = vec![0i32; t * 5];
        let (mut counts, mut offsets, mut pairs) = (vec![0; e], vec![0; e + 1], vec![0; t * k]);
        let mut inverse = vec![0i32; t * 3];
        let (mut padded, mut blocks, mut total) = (vec![0i32; 16], vec![0i32; 4], vec![0i32; 1]);
        let inputs =
            DispatchInputs::new(DlpackView::from_slice_strided(&ids, &[t, k], &[5, 1]).unwrap());
        let mut outputs = DispatchOutputs::new(
            DlpackViewMut::from_slice(&mut counts, &[e]).unwrap(),
            DlpackViewMut::from_slice(&mut offsets, &[e + 1]).unwrap(),
            DlpackViewMut::from_slice(&mut pairs, &[t * k]).unwrap(),
            DlpackViewMut::from_slice_strided(&mut inverse, &[t, k], &[3, 1]).unwrap(),
        )
        .with_padding(PaddedOutputs {
            block_size: 4,
            padded_pairs: DlpackViewMut::from_slice(&mut padded, &[16]).unwrap(),
            block_experts: DlpackViewMut::from_slice(&mut blocks, &[4]).unwrap(),
            padded_total: DlpackViewMut::from_slice(&mut total, &[1]).unwrap(),
        });
        let shape = DispatchShape { tokens: t, top_k: k, experts: e };
        let args = dispatch_args("dispatch_into", &inputs, &mut outputs, shape, 0).unwrap();
        assert_eq!(args.ids, ids.as_ptr() as u64);
        assert_eq!((args.ids_row_stride, args.inverse_row_stride), (5, 3));
        assert_eq!((args.tokens, args.block_size, args.capacity, args.ranks), (3, 4, 16, 0));
        assert_ne!(args.padded_total, 0);
        // Not asked for: no invalid counts, no rank outputs or table, no workspace.
        assert_eq!(args.invalid, 0);
        assert_eq!((args.expert_ranks, args.rank_counts, args.rank_tokens), (0, 0, 0));
        assert_eq!(args.block_counts, 0);
        assert_eq!(args.inverse, inverse.as_ptr() as u64);
        assert_eq!(args.expert_counts, counts.as_ptr() as u64);
    }
}
