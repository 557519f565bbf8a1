//! Launch geometry: which GEMM kernel, how many blocks, how the hidden size is split.
//!
//! The small-T router GEMM is memory-bound: it must stream the weight once with enough loads in
//! flight to cover DRAM latency on every multiprocessor. So the hidden dimension is split until
//! there are about [`WARPS_PER_MULTIPROCESSOR`] warps per multiprocessor, each warp streaming a
//! contiguous range of at least one 32-wide chunk; the warps of a block add their sums in shared
//! memory, and the routing kernel adds the blocks' partial sums.

use sluice_tensor::DType;

use crate::KernelError;
use crate::operands::DeviceMatrix;

/// Warps (waves) per block of the scalar GEMM kernel (`SLUICE_GEMM_WARPS`): one token each.
const GEMM_WARPS: usize = 4;
/// Threads per warp on NVIDIA GPUs.
pub const NVIDIA_WAVE_WIDTH: usize = 32;
/// Threads per wave on AMD Instinct GPUs (CDNA 2 and 3 run wave64), the kernels' `GPU_WARP`.
pub const AMD_WAVE_WIDTH: usize = 64;

/// Warps per block of the tensor-core kernel with `tiles` token tiles (`SLUICE_MMA_WARPS`).
const fn mma_warps(tiles: usize) -> usize {
    match tiles {
        1 | 2 => 16,
        4 => 8,
        _ => 4,
    }
}
/// Experts per GEMM block on tensor cores (two 16-row M tiles per warp).
const MMA_EXPERTS_PER_BLOCK: usize = 32;
/// Hidden values per chunk of the tensor-core kernel.
const MMA_CHUNK: usize = 32;
/// Warps per multiprocessor the split aims at: enough loads in flight to cover DRAM latency.
pub const WARPS_PER_MULTIPROCESSOR: usize = 16;
/// The most partial sums per logit: the routing kernel reads each of them, all at once, up to
/// its `SLUICE_MAX_PARTIALS`.
pub const MAX_PARTIALS: usize = 16;
/// The most tokens the matrix-vector kernel serves; beyond, a GEMM reads the weight once for many
/// tokens faster than it streams it once per token block (measured on an H200: 4.1 us at T = 8 for
/// a 7168 x 256 weight, against 6.5 us for cuBLASLt and more for the split tensor-core kernel).
pub const GEMV_MAX_TOKENS: usize = 8;
/// The most tokens the matrix-vector kernel serves where the tiles kernel exists, which takes over
/// sooner (measured on an H200, 7168 x 256 and 7168 x 384 weights: 2.5 and 2.9 us against 2.8 and
/// 3.0 at T = 2; 3.1 and 3.6 against 2.8 and 3.0 at T = 3; 4.1 and 6.9 against 2.9 and 3.1 at
/// T = 8).
pub const GEMV_MAX_TOKENS_BEFORE_TILES: usize = 2;
/// The most tokens the bulk-copy tiles kernel serves, in blocks of 16; past it the warpgroup kernel
/// does, where the device has it (graph-replayed gate on an H200, us, bulk-copy against warpgroup
/// kernel: V3 5.9 / 6.3 / 6.8 against 6.0 / 6.1 / 6.1 at T = 8 / 16 / 17, Kimi-K2 5.7 / 6.1 /
/// 6.8 against 6.2 / 6.3 / 6.3).
pub const TILES_MAX_TOKENS: usize = 16;
/// Tokens per block of the bulk-copy tiles kernel (`sluice_gemm_tiles_16`).
pub const TILE_TOKENS_PER_BLOCK: usize = 16;
/// The most tokens the warpgroup kernel serves: any count up to one token block (64 tokens), and
/// up to two blocks where every block of the split runs at once
/// (at most one per multiprocessor). Beyond, cuBLASLt writes the logits themselves. Measured on an
/// H200, whole gate graph-replayed, block-per-token routing after either GEMM, us: V3 (128 blocks)
/// 7.7 / 7.3 / 7.4 against 9.6 / 9.8 / 10.6 for cuBLASLt at T = 65 / 96 / 128; Kimi-K2, whose
/// 168 blocks take two turns, 10.0 / 10.9 / 11.1 against 9.5 / 9.9 / 10.9, and V3 at T = 160
/// likewise, 11.7 against 11.1.
pub const WARPGROUP_MAX_TOKENS: usize = 2 * WG_TOKENS;
/// Rows of the warpgroup kernel's token tiles (`SLUICE_WG_TOKENS`: the M of its `wgmma`), the most
/// tokens one of its blocks takes. (Blocks of 32 tokens at 33 to 64, twice the blocks over half
/// the splits, measured slower on an H200: V3 7.6 against 6.9 us at T = 64, Kimi-K2 9.6 against
/// 7.0.)
const WG_TOKENS: usize = 64;
/// Experts per block of the warpgroup kernel (`SLUICE_WG_EXPERTS`: the N of its `wgmma`), the
/// weight's box rows.
pub const WG_EXPERTS: usize = 32;
/// Hidden values per chunk of the warpgroup kernel (`SLUICE_WG_K`): one tensor copy per operand,
/// one barrier; every split is a whole number of chunks, and the boxes are this wide.
pub const WG_K: usize = 64;
/// Threads per block of the warpgroup kernel: one warpgroup (`SLUICE_WG_THREADS`).
const WG_THREADS: usize = 128;
/// The alignment of the warpgroup kernel's tiles in shared memory (`SLUICE_WG_ALIGN`), which its
/// dynamic shared memory leaves room for.
const WG_ALIGN: usize = 1024;
// The splits of `split_hidden` are whole chunks of the warpgroup kernel.
const _: () = assert!(TILE_K_ALIGN.is_multiple_of(WG_K));
/// Experts per block of the tiles kernel (`SLUICE_TILE_EXPERTS`).
const TILE_EXPERTS: usize = 32;
/// Shared-memory bytes of the tiles kernel's barriers, before its tiles
/// (`SLUICE_TILE_BARRIER_BYTES`).
const TILE_BARRIER_BYTES: usize = 32;
/// Hidden values per split of the tiles and warpgroup kernels are a multiple of this.
const TILE_K_ALIGN: usize = 64;
/// The matrix-vector kernel's most threads per block (`SLUICE_GEMV_MAX_THREADS`).
pub const GEMV_MAX_THREADS: usize = 512;
/// Tokens per block of the routing kernel (one warp each).
pub const ROUTE_TOKENS_PER_BLOCK: usize = 4;
const SUM_THREADS: usize = 256;
/// Grid limit of the y and z dimensions.
const MAX_GRID_YZ: usize = 65_535;

/// Element type of the hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HiddenKind {
    /// bf16.
    Bf16,
    /// f16.
    F16,
    /// f32.
    F32,
}

impl HiddenKind {
    /// The kind of hidden states of `dtype`; f32 for anything that is not bf16 or f16 (callers
    /// check dtypes against [`HIDDEN_DTYPES`](crate::HIDDEN_DTYPES) first).
    pub fn of(dtype: DType) -> Self {
        match dtype {
            DType::BF16 => HiddenKind::Bf16,
            DType::F16 => HiddenKind::F16,
            _ => HiddenKind::F32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            HiddenKind::Bf16 => "bf16",
            HiddenKind::F16 => "f16",
            HiddenKind::F32 => "f32",
        }
    }
}

/// Element type of the router weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightKind {
    /// bf16 (tensor cores).
    Bf16,
    /// f32 (scalar path).
    F32,
}

impl WeightKind {
    /// The kind of a router weight of `dtype`; f32 for anything that is not bf16 (callers check
    /// dtypes against [`WEIGHT_DTYPES`](crate::WEIGHT_DTYPES) first).
    pub fn of(dtype: DType) -> Self {
        if dtype == DType::BF16 { WeightKind::Bf16 } else { WeightKind::F32 }
    }
}

/// Which GEMM kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmKernel {
    /// A few bf16 tokens and a bf16 weight: one pass over the weight with every load in flight,
    /// the logits written straight (`S = 1`).
    Gemv {
        /// Tokens per block: 1, 2, 4 or 8.
        tokens_per_block: usize,
        /// Consecutive experts per block: 1 or 2.
        experts_per_block: usize,
    },
    /// A few bf16 tokens and a bf16 weight (Hopper and later): tiles copied into shared memory
    /// whole by bulk copies, `mma.sync`; blocks of [`TILE_TOKENS_PER_BLOCK`] tokens.
    Tiles,
    /// Tens of bf16 tokens and a bf16 weight on Hopper: tiles brought into shared memory whole by
    /// tensor copies, warpgroup MMA. Its operands are passed as tensor maps
    /// ([`WarpgroupMaps`](crate::WarpgroupMaps)), the hidden states' with boxes of
    /// [`GemmPlan::token_rows`] rows.
    Warpgroup,
    /// Tensor cores, bf16 weight, `tiles` N tiles of 8 tokens per block.
    Mma {
        /// Hidden-state element type.
        hidden: HiddenKind,
        /// Token tiles of 8 per block: 1, 2, 4 or 8.
        tiles: usize,
    },
    /// The scalar path, any strides.
    Simt {
        /// Hidden-state element type.
        hidden: HiddenKind,
        /// Weight element type.
        weight: WeightKind,
    },
}

impl GemmKernel {
    /// The kernel's symbol in the device source.
    pub fn name(&self) -> String {
        match *self {
            GemmKernel::Gemv { tokens_per_block, experts_per_block } => {
                format!("sluice_gemv_{tokens_per_block}_{experts_per_block}")
            }
            GemmKernel::Tiles => format!("sluice_gemm_tiles_{TILE_TOKENS_PER_BLOCK}"),
            GemmKernel::Warpgroup => "sluice_gemm_warpgroup".to_owned(),
            GemmKernel::Mma { hidden, tiles } => {
                format!("sluice_gemm_mma_{}_{tiles}", hidden.name())
            }
            GemmKernel::Simt { hidden, weight } => {
                let weight = match weight {
                    WeightKind::Bf16 => "bf16",
                    WeightKind::F32 => "f32",
                };
                format!("sluice_gemm_simt_{}_{weight}", hidden.name())
            }
        }
    }
}

/// Grid and block dimensions of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Bytes of dynamic shared memory per block.
    pub shared_bytes: u32,
}

/// The router GEMM's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    /// Tokens `T` (at least 1).
    pub tokens: usize,
    /// Hidden size `H`.
    pub hidden: usize,
    /// Experts `E`.
    pub experts: usize,
}

/// How one router GEMM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmPlan {
    /// The kernel.
    pub kernel: GemmKernel,
    /// Its launch.
    pub launch: Launch,
    /// Hidden values per warp (tensor-core kernel), per split (tiles and warpgroup kernels), the
    /// whole row (scalar kernel).
    pub k_per_warp: usize,
    /// Partial sums per logit `S`.
    pub splits: usize,
}

impl GemmPlan {
    /// Bytes of the partial sums `[S, T, E]` f32.
    pub fn partials_bytes(&self, shape: GemmShape) -> usize {
        self.splits * shape.tokens * shape.experts * size_of::<f32>()
    }

    /// The warpgroup kernel's tokens per block (its `token_rows`, the rows of the hidden states'
    /// tensor-copy box) for `tokens` tokens: the tokens over its token blocks, rounded up to a
    /// multiple of 8; fewer tokens copy fewer rows (V3 at 32 tokens on an H200: 2.3 us per launch
    /// with boxes of 32 rows against 2.8 with 64, in a chain of GEMMs).
    pub fn token_rows(&self, tokens: usize) -> usize {
        let blocks = (self.launch.grid[2] as usize).max(1);
        tokens.max(1).div_ceil(blocks).next_multiple_of(8).min(WG_TOKENS)
    }
}

/// What the planner needs to know about the device the kernels run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuTarget {
    /// Threads per warp (wave) the kernels were compiled for: [`NVIDIA_WAVE_WIDTH`] or
    /// [`AMD_WAVE_WIDTH`]. Every block is a whole number of warps of this width, and the kernels
    /// give each warp one token, so a wrong width leaves tokens unrouted.
    pub wave_width: usize,
    /// Whether the device has the tensor-core GEMM kernels (NVIDIA compute capability 8.0 and
    /// later; never on AMD, which has no `mma.sync`).
    pub tensor_cores: bool,
    /// Multiprocessors (compute units), which the split of the hidden size aims to fill.
    pub multiprocessors: usize,
    /// Whether the device has the tiles kernel (bulk copies into shared memory: NVIDIA compute
    /// capability 9.0 and later).
    pub bulk_copies: bool,
    /// Whether the device has the warpgroup kernel: tensor copies and `wgmma`, NVIDIA compute
    /// capability 9.0 exactly (its source is compiled for the architecture-specific `sm_90a`).
    pub warpgroup_mma: bool,
    /// The most dynamic shared memory one block may use, in bytes.
    pub shared_memory_per_block: usize,
}

impl GpuTarget {
    /// The most bf16 tokens the matrix-vector kernel serves on this target.
    pub fn gemv_max_tokens(&self) -> usize {
        if self.bulk_copies { GEMV_MAX_TOKENS_BEFORE_TILES } else { GEMV_MAX_TOKENS }
    }
}

/// Plans the router GEMM of `hidden` `[T, H]` by `weight` `[E, H]` on `target`: the tensor-core
/// kernel where the target has it, the weight is bf16 and both operands' rows are contiguous and
/// 16-byte aligned, else the scalar kernel. At most `max_splits` partial sums.
pub fn plan_router_gemm(
    target: &GpuTarget,
    hidden: &DeviceMatrix,
    weight: &DeviceMatrix,
    max_splits: usize,
) -> Result<GemmPlan, KernelError> {
    let tensor_cores = target.tensor_cores
        && weight.dtype == DType::BF16
        && hidden.rows_are_16_byte_aligned()
        && weight.rows_are_16_byte_aligned();
    let shape = GemmShape { tokens: hidden.rows, hidden: hidden.cols, experts: weight.rows };
    let (x, w) = (HiddenKind::of(hidden.dtype), WeightKind::of(weight.dtype));
    plan_gemm(target, shape, x, w, tensor_cores, max_splits)
}

/// Plans the router GEMM. `tensor_cores` says whether the tensor-core kernel may run: a bf16
/// weight, rows of both operands 16-byte aligned with unit column stride, and a device that has
/// `mma.sync` (compute capability 8.0 or later); otherwise the scalar kernel runs. At most
/// `max_splits` partial sums are planned (1: the GEMM writes the logits themselves).
pub fn plan_gemm(
    target: &GpuTarget,
    shape: GemmShape,
    hidden: HiddenKind,
    weight: WeightKind,
    tensor_cores: bool,
    max_splits: usize,
) -> Result<GemmPlan, KernelError> {
    check_i32("tokens", shape.tokens)?;
    check_i32("hidden size", shape.hidden)?;
    check_i32("experts", shape.experts)?;
    let tokens = shape.tokens.max(1);
    if !tensor_cores || weight == WeightKind::F32 {
        let token_blocks = tokens.div_ceil(GEMM_WARPS);
        check_grid("tokens", token_blocks, tokens)?;
        return Ok(GemmPlan {
            kernel: GemmKernel::Simt { hidden, weight },
            launch: Launch {
                grid: [shape.experts as u32, token_blocks as u32, 1],
                block: [(GEMM_WARPS * target.wave_width) as u32, 1, 1],
                shared_bytes: 0,
            },
            k_per_warp: shape.hidden,
            splits: 1,
        });
    }
    if hidden == HiddenKind::Bf16 && tokens <= target.gemv_max_tokens() {
        return Ok(plan_gemv(target, shape));
    }
    if hidden == HiddenKind::Bf16
        && tokens <= TILES_MAX_TOKENS
        && let Some(plan) = plan_tiles(target, shape, max_splits)
    {
        return Ok(plan);
    }
    if hidden == HiddenKind::Bf16
        && tokens <= WARPGROUP_MAX_TOKENS
        && let Some(plan) = plan_warpgroup(target, shape, max_splits)
    {
        return Ok(plan);
    }
    let tiles = match tokens {
        1..=8 => 1,
        9..=16 => 2,
        17..=32 => 4,
        _ => 8,
    };
    let token_blocks = tokens.div_ceil(8 * tiles);
    check_grid("tokens", token_blocks, tokens)?;
    let expert_blocks = shape.experts.div_ceil(MMA_EXPERTS_PER_BLOCK);
    let warps = mma_warps(tiles);
    let wanted_warps = (WARPS_PER_MULTIPROCESSOR * target.multiprocessors.max(1))
        .div_ceil(expert_blocks * token_blocks * warps);
    let most = shape.hidden.div_ceil(warps * MMA_CHUNK).max(1);
    let wanted = wanted_warps.clamp(1, most.min(max_splits.clamp(1, MAX_PARTIALS)));
    let k_per_warp =
        shape.hidden.div_ceil(wanted * warps).next_multiple_of(MMA_CHUNK).max(MMA_CHUNK);
    let splits = shape.hidden.div_ceil(warps * k_per_warp).max(1);
    Ok(GemmPlan {
        kernel: GemmKernel::Mma { hidden, tiles },
        launch: Launch {
            grid: [expert_blocks as u32, splits as u32, token_blocks as u32],
            block: [(warps * 32) as u32, 1, 1],
            shared_bytes: 0,
        },
        k_per_warp,
        splits,
    })
}

/// Warps along k per block of the tiles kernel (its instance's `WK`).
const TILE_K_WARPS: usize = 4;

/// Dynamic shared memory of a tiles block (`sluice_gemm_tiles_16`): the barriers, then the expert
/// and token tiles of `k_per_split + 8` bf16 per row, which the block's sums `[WK, TB, 32]` f32
/// reuse.
pub fn tile_shared_bytes(k_per_split: usize) -> usize {
    let tiles = (TILE_EXPERTS + TILE_TOKENS_PER_BLOCK) * (k_per_split + 8) * 2;
    let sums = TILE_K_WARPS * TILE_TOKENS_PER_BLOCK * TILE_EXPERTS * 4;
    TILE_BARRIER_BYTES + tiles.max(sums)
}

/// Dynamic shared memory of a warpgroup block (`sluice_gemm_warpgroup`): room to align its
/// tiles, then for each chunk of `k_per_split` a token tile of 64 rows (`SLUICE_WG_TOKENS`) and
/// a weight tile of [`WG_EXPERTS`] rows (128 bytes each), and a barrier (8 bytes) per chunk.
pub fn warpgroup_shared_bytes(k_per_split: usize) -> usize {
    let chunks = k_per_split.div_ceil(WG_K);
    WG_ALIGN + chunks * ((WG_TOKENS + WG_EXPERTS) * WG_K * 2 + 8)
}

/// How a kernel that holds its whole k range in shared memory splits the hidden size: so that its
/// `blocks` blocks per split about fill the multiprocessors once, into at most `max_splits` and
/// [`MAX_PARTIALS`] splits of a multiple of [`TILE_K_ALIGN`] values, each block's
/// `shared_bytes(k_per_split)` within the target's. `(launch, k_per_split, splits)` with the
/// grid's y the splits, or `None` when no split that many fits.
fn split_hidden(
    target: &GpuTarget,
    shape: GemmShape,
    [expert_blocks, token_blocks]: [usize; 2],
    threads: usize,
    max_splits: usize,
    shared_bytes: impl Fn(usize) -> usize,
) -> Option<(Launch, usize, usize)> {
    let most = max_splits.clamp(1, MAX_PARTIALS);
    let mut splits = (target.multiprocessors / (expert_blocks * token_blocks)).clamp(1, most);
    loop {
        let k_per_split =
            shape.hidden.div_ceil(splits).next_multiple_of(TILE_K_ALIGN).max(TILE_K_ALIGN);
        let shared = shared_bytes(k_per_split);
        if shared <= target.shared_memory_per_block {
            let splits = shape.hidden.div_ceil(k_per_split).max(1);
            let launch = Launch {
                grid: [expert_blocks as u32, splits as u32, token_blocks as u32],
                block: [threads as u32, 1, 1],
                shared_bytes: shared as u32,
            };
            return Some((launch, k_per_split, splits));
        }
        if splits >= most {
            return None;
        }
        splits += 1;
    }
}

/// The tiles plan for at most [`TILES_MAX_TOKENS`] bf16 tokens, where the target has the kernel:
/// token blocks of [`TILE_TOKENS_PER_BLOCK`], expert blocks of 32, the hidden size split by
/// [`split_hidden`]. `None` when no split fits the target's shared memory.
fn plan_tiles(target: &GpuTarget, shape: GemmShape, max_splits: usize) -> Option<GemmPlan> {
    if !target.bulk_copies {
        return None;
    }
    let blocks =
        [shape.experts.div_ceil(TILE_EXPERTS), shape.tokens.max(1).div_ceil(TILE_TOKENS_PER_BLOCK)];
    let threads = TILE_TOKENS_PER_BLOCK / 16 * TILE_K_WARPS * NVIDIA_WAVE_WIDTH;
    let (launch, k_per_warp, splits) =
        split_hidden(target, shape, blocks, threads, max_splits, tile_shared_bytes)?;
    Some(GemmPlan { kernel: GemmKernel::Tiles, launch, k_per_warp, splits })
}

/// The warpgroup plan for at most [`WARPGROUP_MAX_TOKENS`] bf16 tokens, where the target has the
/// kernel: token blocks of [`WG_TOKENS`], expert blocks of [`WG_EXPERTS`], the hidden size split
/// by [`split_hidden`] into whole chunks of [`WG_K`]. `None` when no split fits the target's
/// shared memory, or past one token block when the blocks would not all run at once.
fn plan_warpgroup(target: &GpuTarget, shape: GemmShape, max_splits: usize) -> Option<GemmPlan> {
    if !target.warpgroup_mma {
        return None;
    }
    let [expert_blocks, token_blocks] =
        [shape.experts.div_ceil(WG_EXPERTS), shape.tokens.max(1).div_ceil(WG_TOKENS)];
    let (launch, k_per_warp, splits) = split_hidden(
        target,
        shape,
        [expert_blocks, token_blocks],
        WG_THREADS,
        max_splits,
        warpgroup_shared_bytes,
    )?;
    // Past one token block, only where every block runs at once.
    if token_blocks > 1 && expert_blocks * token_blocks * splits > target.multiprocessors {
        return None;
    }
    Some(GemmPlan { kernel: GemmKernel::Warpgroup, launch, k_per_warp, splits })
}

/// The matrix-vector plan for at most [`GEMV_MAX_TOKENS`] tokens. Tokens and experts per block as
/// measured best on an H200 for 7168 x 256 and 7168 x 384 weights: one token per block alone, pairs
/// of experts once there are two tokens or more (their loads overlap), and four tokens per block
/// from three on; 16-byte chunks spread over up to [`GEMV_MAX_THREADS`] threads.
fn plan_gemv(target: &GpuTarget, shape: GemmShape) -> GemmPlan {
    let tokens = shape.tokens.max(1);
    let tokens_per_block = match tokens {
        1 => 1,
        2 => 2,
        _ => 4,
    };
    let experts_per_block = if tokens == 1 { 1 } else { 2 };
    let chunks = (shape.hidden / 8).max(1);
    let threads = chunks.next_multiple_of(target.wave_width).min(GEMV_MAX_THREADS);
    GemmPlan {
        kernel: GemmKernel::Gemv { tokens_per_block, experts_per_block },
        launch: Launch {
            grid: [
                shape.experts.div_ceil(experts_per_block) as u32,
                tokens.div_ceil(tokens_per_block) as u32,
                1,
            ],
            block: [threads as u32, 1, 1],
            shared_bytes: 0,
        },
        k_per_warp: shape.hidden,
        splits: 1,
    }
}

/// The routing kernel that reads `splits` partial sums per logit: the compact one when the GEMM
/// wrote the logits themselves.
pub fn route_kernel(splits: usize) -> &'static str {
    if splits <= 1 { crate::ROUTE_LOGITS_KERNEL } else { crate::ROUTE_KERNEL }
}

/// The tokens routed a block per token (`sluice_route_block*`, a thread per expert) on any
/// device: decode batches. The block kernels run the selection as a few block-wide steps where the
/// warp kernel runs K serial rounds; measured on an H200, routing alone, graph-replayed, at one
/// token and at 64: DeepSeek-V3 2.7 and 3.0 us against 3.4 and 3.8, Kimi-K2 2.3 and 2.6 against
/// 3.5 and 3.8, and ahead at 64 tokens for every config of more than 64 experts tried but
/// DeepSeek-V2 (3.0 against 2.9: its groups of 20 do not align with warps). Past them, as many
/// tokens as one wave of the device's resident threads holds ([`plan_route`]).
pub const BLOCK_ROUTE_TOKENS: usize = 64;
/// With more experts per token than this, block routing only for one token: a bound that K
/// candidates reach lists more of them than one warp ranks (E = 1024 with K = 32: 10.1 against
/// 13.5 us at one token, 14.4 against 13.4 at four).
pub const BLOCK_ROUTE_MAX_TOP_K: usize = 16;
/// The fewest experts routed a block per token: with one or two warps of experts there is nothing
/// to spread, and the warp kernel's single chain is shorter (V2-Lite's 64, gpt-oss, Mixtral).
pub const BLOCK_ROUTE_MIN_EXPERTS: usize = 65;

/// Which routing kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKernel {
    /// One warp per token, four tokens per block (`sluice_route`, `sluice_route_logits`).
    Warp,
    /// One block per token, a thread per expert (`sluice_route_block`,
    /// `sluice_route_block_logits`).
    Block,
}

/// How one routing launch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutePlan {
    /// The kernel.
    pub kernel: RouteKernel,
    /// Its launch.
    pub launch: Launch,
}

impl RoutePlan {
    /// The kernel's symbol, for logits given as `splits` partial sums.
    pub fn name(&self, splits: usize) -> &'static str {
        match self.kernel {
            RouteKernel::Warp => route_kernel(splits),
            RouteKernel::Block if splits <= 1 => crate::ROUTE_BLOCK_LOGITS_KERNEL,
            RouteKernel::Block => crate::ROUTE_BLOCK_KERNEL,
        }
    }
}

/// What the routing planner needs to know about the module and the device it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTarget {
    /// Threads per warp (wave) the kernels were compiled for.
    pub wave_width: usize,
    /// Whether the module has the block-per-token kernels (every ranked-score config's module on
    /// NVIDIA).
    pub block_kernels: bool,
    /// The threads the device holds at once: multiprocessors x threads per multiprocessor.
    pub resident_threads: usize,
}

/// Plans the routing of `tokens` tokens (at least 1) for `config`: a block per token (a thread
/// per expert) for a config the block kernels take (ranked scores, at least
/// [`BLOCK_ROUTE_MIN_EXPERTS`] experts) while one wave of the target's resident threads holds
/// every token's block, and always up to [`BLOCK_ROUTE_TOKENS`] (one token past
/// [`BLOCK_ROUTE_MAX_TOP_K`] experts per token); one warp per token otherwise.
///
/// The wave is where the block kernel stops winning. On an H200 (132 x 2048 threads: 1056
/// tokens of V3's 256 experts, 704 of Kimi-K2's 384), whole gate graph-replayed, us, block against
/// warp routing: V3 12.7 / 14.5 / 17.1 against 18.8 / 20.9 / 18.4 at T = 256 / 512 / 1024, and
/// 25.6 against 23.8 at 2048; Kimi-K2 9.5 / 15.7 against 10.4 / 17.9 at T = 65 / 512, and 21.7
/// against 19.9 at 1024.
///
/// Past the wave the warp kernel stays: a thread per token (a warp scoring 32 rows, then each
/// thread selecting its row's K best in registers) made the gate 1.3 to 5 times slower there,
/// with too few warps for its latency and its insertions taken by some thread at nearly every
/// expert (BENCHMARKS.md, fourteenth session).
pub fn plan_route(
    config: &crate::RoutingConfig,
    tokens: usize,
    target: &RouteTarget,
) -> Result<RoutePlan, KernelError> {
    let experts = config.experts();
    let threads = experts.div_ceil(target.wave_width) * target.wave_width;
    let most_tokens = if config.top_k() <= BLOCK_ROUTE_MAX_TOP_K {
        BLOCK_ROUTE_TOKENS.max(target.resident_threads / threads)
    } else {
        1
    };
    if target.block_kernels
        && !config.is_hashed()
        && experts >= BLOCK_ROUTE_MIN_EXPERTS
        && tokens <= most_tokens
    {
        return Ok(RoutePlan {
            kernel: RouteKernel::Block,
            launch: Launch {
                grid: [tokens.max(1) as u32, 1, 1],
                block: [threads as u32, 1, 1],
                shared_bytes: 0,
            },
        });
    }
    Ok(RoutePlan { kernel: RouteKernel::Warp, launch: route_launch(tokens, target.wave_width)? })
}

/// The routing kernel's launch for `tokens` tokens (at least 1), one warp of `wave_width`
/// threads per token.
pub fn route_launch(tokens: usize, wave_width: usize) -> Result<Launch, KernelError> {
    check_i32("tokens", tokens)?;
    let blocks = tokens.div_ceil(ROUTE_TOKENS_PER_BLOCK) as u32;
    let threads = (ROUTE_TOKENS_PER_BLOCK * wave_width) as u32;
    Ok(Launch { grid: [blocks, 1, 1], block: [threads, 1, 1], shared_bytes: 0 })
}

/// The launch of `sluice_reset_status`: one warp.
pub fn reset_status_launch(wave_width: usize) -> Launch {
    Launch { grid: [1, 1, 1], block: [wave_width as u32, 1, 1], shared_bytes: 0 }
}

/// The launch of `sluice_sum_partials` for a `[T, E]` output.
pub fn sum_partials_launch(tokens: usize, experts: usize) -> Result<Launch, KernelError> {
    let elements = tokens.checked_mul(experts).ok_or(KernelError::TooLarge {
        what: "tokens x experts",
        value: usize::MAX,
        limit: i32::MAX as usize,
    })?;
    check_i32("tokens x experts", elements)?;
    Ok(Launch {
        grid: [elements.div_ceil(SUM_THREADS) as u32, 1, 1],
        block: [SUM_THREADS as u32, 1, 1],
        shared_bytes: 0,
    })
}

fn check_i32(what: &'static str, value: usize) -> Result<(), KernelError> {
    if value > i32::MAX as usize {
        return Err(KernelError::TooLarge { what, value, limit: i32::MAX as usize });
    }
    Ok(())
}

fn check_grid(what: &'static str, blocks: usize, value: usize) -> Result<(), KernelError> {
    if blocks > MAX_GRID_YZ {
        return Err(KernelError::TooLarge { what, value, limit: value / blocks * MAX_GRID_YZ });
    }
    Ok(())
}

/// An H200's routing target, for tests: 132 multiprocessors of 2048 threads, a module with the
/// block kernels.
#[cfg(test)]
pub(crate) const H200_ROUTE: RouteTarget = RouteTarget {
    wave_width: NVIDIA_WAVE_WIDTH,
    block_kernels: true,
    resident_threads: 132 * 2048,
};

#[cfg(test)]
mod tests {
    use super::*;

    const V3: GemmShape = GemmShape { tokens: 1, hidden: 7168, experts: 256 };
    const H200: GpuTarget = GpuTarget {
        wave_width: NVIDIA_WAVE_WIDTH,
        tensor_cores: true,
        multiprocessors: 132,
        bulk_copies: true,
        warpgroup_mma: true,
        shared_memory_per_block: 227 * 1024,
    };
    const MI300X: GpuTarget = GpuTarget {
        wave_width: AMD_WAVE_WIDTH,
        tensor_cores: false,
        multiprocessors: 304,
        bulk_copies: false,
        warpgroup_mma: false,
        shared_memory_per_block: 64 * 1024,
    };
    /// An A100: tensor cores, no bulk copies.
    const A100: GpuTarget =
        GpuTarget { bulk_copies: false, warpgroup_mma: false, multiprocessors: 108, ..H200 };
    /// A device past Hopper: bulk copies, no `wgmma`.
    const LATER: GpuTarget = GpuTarget { warpgroup_mma: false, multiprocessors: 148, ..H200 };

    fn matrix(rows: usize, cols: usize, dtype: DType) -> DeviceMatrix {
        DeviceMatrix { ptr: 4096, rows, cols, row_stride: cols, col_stride: 1, dtype }
    }

    #[test]
    fn every_token_gets_a_whole_wave_of_its_target() {
        for target in [H200, MI300X] {
            for tokens in [1, 3, 4, 5, 64, 1001] {
                let hidden = matrix(tokens, 7168, DType::BF16);
                let plan =
                    plan_router_gemm(&target, &hidden, &matrix(256, 7168, DType::F32), usize::MAX)
                        .unwrap();
                let waves_per_block = plan.launch.block[0] as usize / target.wave_width;
                assert_eq!(plan.launch.block[0] as usize % target.wave_width, 0);
                assert_eq!(waves_per_block, GEMM_WARPS, "one token per wave, {target:?}");
                assert!(plan.launch.grid[1] as usize * waves_per_block >= tokens);
                let route = route_launch(tokens, target.wave_width).unwrap();
                assert_eq!(route.block[0] as usize, ROUTE_TOKENS_PER_BLOCK * target.wave_width);
                assert!(route.grid[0] as usize * ROUTE_TOKENS_PER_BLOCK >= tokens);
            }
        }
    }

    #[test]
    fn blocks_hold_as_many_warps_as_the_kernels_give_tokens_to() {
        let gemm = format!("#define SLUICE_GEMM_WARPS {GEMM_WARPS}\n");
        let route = format!("#define SLUICE_ROUTE_WARPS {ROUTE_TOKENS_PER_BLOCK}\n");
        assert!(crate::SOURCE.contains(&gemm) && crate::SOURCE.contains(&route));
    }

    #[test]
    fn a_target_without_tensor_cores_always_takes_the_scalar_kernel() {
        let (hidden, weight) = (
            matrix(GEMV_MAX_TOKENS_BEFORE_TILES, 7168, DType::BF16),
            matrix(256, 7168, DType::BF16),
        );
        let amd = plan_router_gemm(&MI300X, &hidden, &weight, usize::MAX).unwrap();
        assert_eq!(amd.kernel.name(), "sluice_gemm_simt_bf16_bf16");
        assert_eq!((amd.splits, amd.launch.block[0]), (1, 256));
        let nvidia = plan_router_gemm(&H200, &hidden, &weight, usize::MAX).unwrap();
        assert!(matches!(nvidia.kernel, GemmKernel::Gemv { .. }), "{:?}", nvidia.kernel);
        let many = matrix(GEMV_MAX_TOKENS_BEFORE_TILES + 1, 7168, DType::BF16);
        let nvidia = plan_router_gemm(&H200, &many, &weight, usize::MAX).unwrap();
        assert_eq!(nvidia.kernel, GemmKernel::Tiles);
        let ampere = matrix(GEMV_MAX_TOKENS + 1, 7168, DType::BF16);
        let ampere = plan_router_gemm(&A100, &ampere, &weight, usize::MAX).unwrap();
        assert!(matches!(ampere.kernel, GemmKernel::Mma { .. }), "no bulk copies before Hopper");
        // A row that does not start on 16 bytes keeps NVIDIA on the scalar kernel too.
        let unaligned = DeviceMatrix { ptr: 4098, ..hidden };
        let plan = plan_router_gemm(&H200, &unaligned, &weight, usize::MAX).unwrap();
        assert!(matches!(plan.kernel, GemmKernel::Simt { hidden: HiddenKind::Bf16, .. }));
    }

    #[test]
    fn f32_tokens_at_one_token_fill_an_h200_and_cover_the_hidden_size() {
        let plan =
            plan_gemm(&H200, V3, HiddenKind::F32, WeightKind::Bf16, true, usize::MAX).unwrap();
        assert_eq!(plan.kernel, GemmKernel::Mma { hidden: HiddenKind::F32, tiles: 1 });
        let warps = plan.launch.grid.iter().product::<u32>() * plan.launch.block[0] / 32;
        assert!(warps >= 132 * 8, "{warps} warps");
        assert!(plan.splits <= 16, "{} partial sums to add", plan.splits);
        assert_eq!(plan.k_per_warp % 32, 0);
        let per_block = plan.launch.block[0] as usize / 32 * plan.k_per_warp;
        assert!(plan.splits * per_block >= V3.hidden);
        assert!((plan.splits - 1) * per_block < V3.hidden, "no empty split");
        assert_eq!(plan.launch.grid[1] as usize, plan.splits);
    }

    #[test]
    fn a_few_bf16_tokens_take_the_matrix_vector_kernel_with_every_chunk_covered() {
        for tokens in 1..=GEMV_MAX_TOKENS_BEFORE_TILES {
            for (hidden, experts) in [(7168, 256), (7168, 384), (2048, 160), (8, 1), (4104, 72)] {
                let shape = GemmShape { tokens, hidden, experts };
                let plan =
                    plan_gemm(&H200, shape, HiddenKind::Bf16, WeightKind::Bf16, true, usize::MAX)
                        .unwrap();
                let GemmKernel::Gemv { tokens_per_block, experts_per_block } = plan.kernel else {
                    panic!("{shape:?}: {:?}", plan.kernel);
                };
                assert_eq!(plan.splits, 1, "the logits are written straight");
                let [x, y, z] = plan.launch.grid;
                assert!(x as usize * experts_per_block >= experts);
                assert!((x as usize - 1) * experts_per_block < experts, "no empty expert block");
                assert!(y as usize * tokens_per_block >= tokens && z == 1);
                let threads = plan.launch.block[0] as usize;
                assert!(threads.is_multiple_of(32) && threads <= GEMV_MAX_THREADS);
            }
        }
        let beyond = GemmShape { tokens: GEMV_MAX_TOKENS_BEFORE_TILES + 1, ..V3 };
        let plan = plan_gemm(&H200, beyond, HiddenKind::Bf16, WeightKind::Bf16, true, usize::MAX);
        assert_eq!(plan.unwrap().kernel, GemmKernel::Tiles);
        let f16 = plan_gemm(&H200, V3, HiddenKind::F16, WeightKind::Bf16, true, usize::MAX);
        assert!(matches!(f16.unwrap().kernel, GemmKernel::Mma { .. }), "bf16 tokens only");
    }

    /// Checks a tiles or warpgroup plan for `shape`: expert and token blocks covering both, whole
    /// splits of a multiple of the chunk covering the hidden size with none empty, at most
    /// [`MAX_PARTIALS`], one wave unless shared memory forced more splits, and the launch's shared
    /// memory `shared_bytes(k_per_split)`.
    fn check_whole_k_plan(
        target: &GpuTarget,
        plan: &GemmPlan,
        shape: GemmShape,
        [experts_per_block, tokens_per_block]: [usize; 2],
        shared_bytes: fn(usize) -> usize,
    ) {
        let GemmShape { tokens, hidden, experts } = shape;
        let [x, y, z] = plan.launch.grid.map(|n| n as usize);
        assert!(x * experts_per_block >= experts && (x - 1) * experts_per_block < experts);
        assert!(z * tokens_per_block >= tokens && (z - 1) * tokens_per_block < tokens);
        let k = plan.k_per_warp;
        assert_eq!((y, k % TILE_K_ALIGN), (plan.splits, 0), "{shape:?}");
        assert!(y * k >= hidden && (y - 1) * k < hidden, "{shape:?}: no empty split");
        assert!(y <= MAX_PARTIALS);
        let shared = plan.launch.shared_bytes as usize;
        assert_eq!(shared, shared_bytes(k));
        assert!(shared <= target.shared_memory_per_block);
        assert!(
            x * y * z <= target.multiprocessors
                || shared_bytes(k * 2) > target.shared_memory_per_block,
            "{shape:?}: {x} x {y} x {z} blocks"
        );
    }

    const SHAPES: [(usize, usize); 6] =
        [(7168, 256), (7168, 384), (2048, 160), (4104, 72), (8, 1), (16384, 1024)];

    #[test]
    fn a_few_bf16_tokens_take_the_tiles_kernel_in_one_wave_with_every_k_covered() {
        for target in [H200, LATER] {
            for tokens in GEMV_MAX_TOKENS_BEFORE_TILES + 1..=TILES_MAX_TOKENS {
                for (hidden, experts) in SHAPES {
                    let shape = GemmShape { tokens, hidden, experts };
                    let plan = plan_gemm(
                        &target,
                        shape,
                        HiddenKind::Bf16,
                        WeightKind::Bf16,
                        true,
                        usize::MAX,
                    )
                    .unwrap();
                    assert_eq!(plan.kernel, GemmKernel::Tiles, "{shape:?}");
                    let blocks = [TILE_EXPERTS, TILE_TOKENS_PER_BLOCK];
                    check_whole_k_plan(&target, &plan, shape, blocks, tile_shared_bytes);
                    let warps = TILE_TOKENS_PER_BLOCK / 16 * TILE_K_WARPS;
                    assert_eq!(plan.launch.block, [warps as u32 * 32, 1, 1]);
                }
            }
        }
        // One split allowed: the whole hidden size must fit one block's shared memory.
        let few = GemmShape { tokens: 9, ..V3 };
        let one = plan_gemm(&H200, few, HiddenKind::Bf16, WeightKind::Bf16, true, 1).unwrap();
        assert!(matches!(one.kernel, GemmKernel::Mma { .. }), "7168 values do not fit");
        let small = GemmShape { tokens: 9, hidden: 2048, experts: 64 };
        let one = plan_gemm(&H200, small, HiddenKind::Bf16, WeightKind::Bf16, true, 1).unwrap();
        assert_eq!((one.kernel, one.splits), (GemmKernel::Tiles, 1));
    }

    #[test]
    fn tens_of_bf16_tokens_take_the_warpgroup_kernel_on_hopper_alone() {
        for tokens in TILES_MAX_TOKENS + 1..=WARPGROUP_MAX_TOKENS {
            for (hidden, experts) in SHAPES {
                let shape = GemmShape { tokens, hidden, experts };
                let kinds = (HiddenKind::Bf16, WeightKind::Bf16);
                let plan = plan_gemm(&H200, shape, kinds.0, kinds.1, true, usize::MAX).unwrap();
                let [x, y, z] = plan.launch.grid.map(|blocks| blocks as usize);
                if tokens > WG_TOKENS && x * y * z > H200.multiprocessors {
                    // Two token blocks whose split would not run at once: the library GEMM.
                    assert!(matches!(plan.kernel, GemmKernel::Mma { .. }), "{shape:?}");
                    continue;
                }
                assert_eq!(plan.kernel, GemmKernel::Warpgroup, "{shape:?}");
                let rows = plan.token_rows(tokens);
                let blocks = [WG_EXPERTS, rows];
                check_whole_k_plan(&H200, &plan, shape, blocks, warpgroup_shared_bytes);
                assert_eq!(plan.launch.block, [WG_THREADS as u32, 1, 1]);
                assert!(rows.is_multiple_of(8) && rows <= WG_TOKENS);
                let per_block = tokens.div_ceil(plan.launch.grid[2] as usize);
                assert!(rows >= per_block && rows < per_block + 8, "{shape:?}");
                // Without `wgmma`, past the tiles kernel's tokens: the library GEMM's plan.
                let later = plan_gemm(&LATER, shape, kinds.0, kinds.1, true, usize::MAX).unwrap();
                assert!(matches!(later.kernel, GemmKernel::Mma { .. }), "{shape:?}");
            }
        }
        let kernel = |tokens, experts| {
            let shape = GemmShape { tokens, experts, ..V3 };
            plan_gemm(&H200, shape, HiddenKind::Bf16, WeightKind::Bf16, true, usize::MAX)
                .unwrap()
                .kernel
        };
        // V3's two token blocks: 8 expert blocks x 8 splits x 2 = 128 blocks at once.
        assert_eq!(kernel(WARPGROUP_MAX_TOKENS, 256), GemmKernel::Warpgroup);
        // Kimi-K2's: 12 x 7 x 2 = 168 (its shared memory takes at least 7 splits), two turns.
        assert!(matches!(kernel(WG_TOKENS + 1, 384), GemmKernel::Mma { .. }));
        assert_eq!(kernel(WG_TOKENS, 384), GemmKernel::Warpgroup);
        assert!(matches!(kernel(WARPGROUP_MAX_TOKENS + 1, 256), GemmKernel::Mma { .. }));
    }

    #[test]
    fn the_tiles_kernels_share_their_constants_with_the_source() {
        for define in [
            format!("#define SLUICE_TILE_EXPERTS {TILE_EXPERTS}\n"),
            format!("#define SLUICE_TILE_BARRIER_BYTES {TILE_BARRIER_BYTES}\n"),
            format!("#define SLUICE_WG_EXPERTS {WG_EXPERTS}\n"),
            format!("#define SLUICE_WG_TOKENS {WG_TOKENS}\n"),
            format!("#define SLUICE_WG_K {WG_K}\n"),
            format!("#define SLUICE_WG_THREADS {WG_THREADS}\n"),
            format!("#define SLUICE_WG_ALIGN {WG_ALIGN}\n"),
            format!(
                "SLUICE_INSTANTIATE_TILES({}, {TILE_TOKENS_PER_BLOCK}, {TILE_K_WARPS})",
                GemmKernel::Tiles.name()
            ),
        ] {
            assert!(crate::SOURCE.contains(&define), "{define}");
        }
    }

    #[test]
    fn tokens_of_many_experts_are_routed_a_block_per_token_while_one_wave_holds_them() {
        use sluice_tensor::{RoutingSpec, ScoringFunc, TopkMethod};
        let spec = |e, k, method| {
            RoutingSpec::builder(e, k).scoring(ScoringFunc::Sigmoid).method(method).build().unwrap()
        };
        let v3 = crate::RoutingConfig::new(&spec(256, 8, TopkMethod::NoauxTc)).unwrap();
        // 132 x 2048 threads hold 1056 blocks of 256.
        for tokens in [1, 2, BLOCK_ROUTE_TOKENS, BLOCK_ROUTE_TOKENS + 1, 1024, 1056] {
            let plan = plan_route(&v3, tokens, &H200_ROUTE).unwrap();
            assert_eq!(plan.kernel, RouteKernel::Block, "{tokens} tokens");
            assert_eq!(plan.launch.grid, [tokens as u32, 1, 1], "a block per token");
            assert_eq!(plan.launch.block, [256, 1, 1], "a thread per expert");
            assert_eq!(plan.name(1), crate::ROUTE_BLOCK_LOGITS_KERNEL);
            assert_eq!(plan.name(3), crate::ROUTE_BLOCK_KERNEL);
        }
        let beyond = plan_route(&v3, 1057, &H200_ROUTE).unwrap();
        assert_eq!(
            beyond,
            RoutePlan { kernel: RouteKernel::Warp, launch: route_launch(1057, 32).unwrap() }
        );
        // Kimi-K2's blocks of 384: 704 tokens.
        let kimi = crate::RoutingConfig::new(&spec(384, 8, TopkMethod::NoauxTc)).unwrap();
        assert_eq!(plan_route(&kimi, 704, &H200_ROUTE).unwrap().kernel, RouteKernel::Block);
        assert_eq!(plan_route(&kimi, 705, &H200_ROUTE).unwrap().kernel, RouteKernel::Warp);
        // A small device still routes decode batches a block per token.
        let small = RouteTarget { resident_threads: 4 * 1024, ..H200_ROUTE };
        assert_eq!(plan_route(&v3, BLOCK_ROUTE_TOKENS, &small).unwrap().kernel, RouteKernel::Block);
        assert_eq!(
            plan_route(&v3, BLOCK_ROUTE_TOKENS + 1, &small).unwrap().kernel,
            RouteKernel::Warp
        );
        // A module without the block kernels, too few experts, and hash routing: warp kernels.
        let no_block_kernels = RouteTarget { block_kernels: false, ..H200_ROUTE };
        assert_eq!(plan_route(&v3, 1, &no_block_kernels).unwrap().kernel, RouteKernel::Warp);
        let few = crate::RoutingConfig::new(&spec(64, 6, TopkMethod::Greedy)).unwrap();
        assert_eq!(plan_route(&few, 1, &H200_ROUTE).unwrap().kernel, RouteKernel::Warp);
        let odd = crate::RoutingConfig::new(&spec(72, 8, TopkMethod::Greedy)).unwrap();
        assert_eq!(plan_route(&odd, 2, &H200_ROUTE).unwrap().launch.block, [96, 1, 1]);
        // Past 16 experts per token, one token only.
        let wide = crate::RoutingConfig::new(&spec(1024, 32, TopkMethod::NoauxTc)).unwrap();
        assert_eq!(plan_route(&wide, 1, &H200_ROUTE).unwrap().kernel, RouteKernel::Block);
        assert_eq!(plan_route(&wide, 2, &H200_ROUTE).unwrap().kernel, RouteKernel::Warp);
        let hashed = RoutingSpec::builder(256, 6).method(TopkMethod::Hash).build().unwrap();
        let hashed = crate::RoutingConfig::new(&hashed).unwrap();
        assert_eq!(plan_route(&hashed, 1, &H200_ROUTE).unwrap().kernel, RouteKernel::Warp);
    }

    #[test]
    fn the_block_kernels_exist_for_ranked_scores_only() {
        assert!(crate::SOURCE.contains(
            "#if !defined(GPU_AMD) && SLUICE_METHOD != SLUICE_HASH\n#define SLUICE_HAS_ROUTE_BLOCK"
        ));
    }

    #[test]
    fn finished_logits_are_routed_by_the_compact_kernel() {
        assert_eq!(route_kernel(1), crate::ROUTE_LOGITS_KERNEL);
        assert_eq!(route_kernel(2), crate::ROUTE_KERNEL);
        assert_eq!(route_kernel(MAX_PARTIALS), crate::ROUTE_KERNEL);
    }

    #[test]
    fn token_tiles_grow_with_tokens_and_splits_shrink() {
        let tiles = |tokens| {
            let shape = GemmShape { tokens, ..V3 };
            let plan = plan_gemm(&H200, shape, HiddenKind::F32, WeightKind::Bf16, true, usize::MAX)
                .unwrap();
            match plan.kernel {
                GemmKernel::Mma { tiles, .. } => (tiles, plan.splits, plan.launch.grid[2]),
                other => panic!("tensor cores expected, got {other:?}"),
            }
        };
        assert_eq!(tiles(8), (1, tiles(8).1, 1));
        assert_eq!(tiles(16).0, 2);
        assert_eq!(tiles(64).0, 8);
        assert_eq!(tiles(65).2, 2);
        assert!(tiles(4096).1 < tiles(1).1);
        assert_eq!(tiles(16384).1, 1);
    }

    #[test]
    fn the_routing_kernel_reads_as_many_partials_as_the_plan_writes() {
        let define = format!("#define SLUICE_MAX_PARTIALS {MAX_PARTIALS}\n");
        assert!(crate::SOURCE.contains(&define));
        for tokens in [1, 2, 8, 9, 64, 65, 1000, 16384] {
            let shape = GemmShape { tokens, ..V3 };
            let plan =
                plan_gemm(&H200, shape, HiddenKind::Bf16, WeightKind::Bf16, true, usize::MAX)
                    .unwrap();
            assert!(plan.splits <= MAX_PARTIALS, "T = {tokens}: {} splits", plan.splits);
        }
    }

    #[test]
    fn one_split_writes_the_logits_directly() {
        let shape = GemmShape { tokens: 3, ..V3 };
        let plan = plan_gemm(&H200, shape, HiddenKind::Bf16, WeightKind::Bf16, true, 1).unwrap();
        assert_eq!((plan.splits, plan.launch.grid[1]), (1, 1));
        assert!(plan.launch.block[0] as usize / 32 * plan.k_per_warp >= V3.hidden);
    }

    #[test]
    fn f32_weights_and_unaligned_rows_take_the_scalar_path() {
        let plan =
            plan_gemm(&H200, V3, HiddenKind::Bf16, WeightKind::F32, true, usize::MAX).unwrap();
        assert!(matches!(plan.kernel, GemmKernel::Simt { weight: WeightKind::F32, .. }));
        assert_eq!(plan.splits, 1);
        let plan =
            plan_gemm(&H200, V3, HiddenKind::Bf16, WeightKind::Bf16, false, usize::MAX).unwrap();
        assert_eq!(plan.kernel.name(), "sluice_gemm_simt_bf16_bf16");
    }

    #[test]
    fn tiny_and_odd_shapes_plan_without_empty_splits() {
        for (tokens, hidden, experts) in [(1, 8, 1), (3, 40, 72), (100, 1000, 160), (7, 32, 1024)] {
            let shape = GemmShape { tokens, hidden, experts };
            let plan =
                plan_gemm(&H200, shape, HiddenKind::Bf16, WeightKind::Bf16, true, usize::MAX)
                    .unwrap();
            // The tiles and warpgroup kernels' k range is per split, the others' per warp.
            let per_block = match plan.kernel {
                GemmKernel::Tiles | GemmKernel::Warpgroup => plan.k_per_warp,
                _ => plan.launch.block[0] as usize / 32 * plan.k_per_warp,
            };
            assert!((plan.splits - 1) * per_block < hidden, "{shape:?}");
            assert_eq!(plan.partials_bytes(shape), plan.splits * tokens * experts * 4);
        }
    }

    #[test]
    fn oversized_shapes_are_errors() {
        let shape = GemmShape { tokens: usize::MAX, ..V3 };
        assert!(
            plan_gemm(&H200, shape, HiddenKind::Bf16, WeightKind::Bf16, true, usize::MAX).is_err()
        );
        assert!(route_launch(1 << 40, NVIDIA_WAVE_WIDTH).is_err());
        assert!(sum_partials_launch(1 << 40, 1 << 40).is_err());
        assert_eq!(route_launch(5, NVIDIA_WAVE_WIDTH).unwrap().grid, [2, 1, 1]);
    }
}
