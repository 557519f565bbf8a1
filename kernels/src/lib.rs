//! GPU device source for the sluice router kernels, written once for CUDA and HIP, and the host
//! side both GPU backends share: launch geometry (by wave width), operands read from validated
//! views, kernel arguments packed in signature order, the device buffers of the synchronous
//! dispatch layout, the offline configs, and the rule for
//! finding the LLVM tools that build and inspect the device code ([`toolchain`]).
//!
//! The source lives in `gpu/` beside this crate as plain C++ behind a small compatibility header
//! of our own (`compat.h`: wave width, shuffles, lane masks, launch bounds, programmatic dependent
//! launch). [`SOURCE`] is that text in one piece, for run-time compilers (NVRTC), with the routing
//! config supplied as defines by [`RoutingConfig::defines`]. `cargo xtask ci` compiles the same
//! files with clang for NVPTX and AMDGPU, so a kernel that does not compile fails CI, not a GPU run.
//!
//! Kernels:
//!
//! | kernel | what |
//! | --- | --- |
//! | `sluice_gemv_{1,2,4,8}_{1,2}` | router GEMM for up to 2 bf16 tokens on Hopper, 8 before it: every weight load in flight at once, logits written straight |
//! | `sluice_gemm_tiles_16` | router GEMM for 3 to 16 bf16 tokens on Hopper: weight rows and hidden states brought into shared memory by bulk copies, tensor cores, partial sums `[S, T, E]` |
//! | `sluice_gemm_warpgroup` | router GEMM for 17 to 64 bf16 tokens on compute capability 9.0 (to 128 where its blocks all run at once): weight and hidden states brought into shared memory by tensor copies from tensor maps the backend makes, warpgroup MMA (`wgmma`), partial sums `[S, T, E]` |
//! | `sluice_gemm_mma_{bf16,f16,f32}_{1,2,4,8}` | router GEMM on tensor cores (bf16 weight), split over the hidden size, partial sums `[S, T, E]` |
//! | `sluice_gemm_simt_{x}_{w}` | the scalar router GEMM for any strides and f32 weights (`S = 1`) |
//! | `sluice_sum_partials` | logits from the partial sums |
//! | `sluice_route` | scores, groups, top-k, renormalisation and scaling, one warp per token, adding up to 16 partial sums per logit |
//! | `sluice_route_logits` | the same from finished logits (much smaller code) |
//! | `sluice_route_block`, `sluice_route_block_logits` | the same, a block per token and a thread per expert, while one wave of the device's threads holds the blocks (NVIDIA, ranked scores) |
//! | `sluice_route_block_dispatch`, `_logits` | block-per-token routing with the dispatch layout of its ids (no rank outputs): up to 64 rows laid out by the block that finishes last, from 64-bit masks of the rows that chose each expert; past them each block adds its row to counts per expert and word of 64 rows |
//! | `sluice_dispatch_words` | after those past 64 rows: the layout of a word of 64 rows per block, from the counts and the word's own masks |
//! | `sluice_reset_status` | the routing status set to `[0, -1]`, the fused layout's ticket and counts to 0, ordered after the previous kernel (for a GEMM not of ours; the GEMM kernels reset them themselves) |
//! | `sluice_dispatch_count` | the dispatch layout's many-block path: each block's per-expert counts into the caller's workspace |
//! | `sluice_dispatch_scatter` | the dispatch layout (counts, offsets, sorted pairs, inverse, padding, ranks): the whole of it in one block, or one tile per block after `sluice_dispatch_count` |
//! | `sluice_dispatch_rank_tokens` | with rank outputs, after the scatter: distinct tokens per rank, one row per thread |
#![deny(unsafe_op_in_unsafe_fn)]

mod args;
mod config;
mod dispatch;
mod dispatch_buffers;
mod geometry;
mod offline;
mod operands;
pub mod toolchain;

pub use args::{
    HashInputs, KernelArg, KernelArgs, MAX_KERNEL_ARGS, Partials, RouteCounters, RouteDispatchArgs,
    RoutingTargets, TensorMap, WarpgroupArgs, WarpgroupMaps, gemm_args, reset_status_args,
    route_args, sum_partials_args,
};
pub use config::{KernelError, MAX_EXPERTS, MAX_TOP_K, RoutingConfig, check_hash_table_rows};
pub use dispatch::{
    DISPATCH_COUNT_KERNEL, DISPATCH_RANK_TOKENS_KERNEL, DISPATCH_SCATTER_KERNEL,
    DISPATCH_WORDS_KERNEL, DispatchArgs, DispatchPlan, FUSED_COUNTS_OFFSET, FusedLayout,
    LAST_BLOCK_MAX_ROWS, RANK_TOKENS_THREADS, ROUTE_DISPATCH_KERNEL, ROUTE_DISPATCH_LOGITS_KERNEL,
    WORD_ROWS, dispatch_args, fused_counts_bytes, plan_dispatch,
};
pub use dispatch_buffers::{DispatchBuffer, DispatchBuffers, check_host_dispatch, host_i32_values};
pub use geometry::{
    AMD_WAVE_WIDTH, BLOCK_ROUTE_MAX_TOP_K, BLOCK_ROUTE_MIN_EXPERTS, BLOCK_ROUTE_TOKENS,
    GEMV_MAX_THREADS, GEMV_MAX_TOKENS, GEMV_MAX_TOKENS_BEFORE_TILES, GemmKernel, GemmPlan,
    GemmShape, GpuTarget, HiddenKind, Launch, NVIDIA_WAVE_WIDTH, ROUTE_TOKENS_PER_BLOCK,
    RouteKernel, RoutePlan, RouteTarget, TILE_TOKENS_PER_BLOCK, TILES_MAX_TOKENS,
    WARPGROUP_MAX_TOKENS, WG_EXPERTS, WG_K, WeightKind, plan_gemm, plan_route, plan_router_gemm,
    reset_status_launch, route_kernel, route_launch, sum_partials_launch, tile_shared_bytes,
    warpgroup_shared_bytes,
};
pub use offline::{OfflineConfig, offline_config_for, offline_configs};
pub use operands::{
    DeviceMatrix, DeviceTokenIds, HIDDEN_DTYPES, WEIGHT_DTYPES, check_device, check_dtype,
    check_host_token_ids, hash_table_values, matrix, output_rows, token_ids,
};

/// The complete device source, in the order `gpu/sluice_router.cu` includes it.
pub const SOURCE: &str = concat!(
    include_str!("../gpu/compat.h"),
    "\n",
    include_str!("../gpu/router_gemm.cuh"),
    "\n",
    include_str!("../gpu/routing.cuh"),
    "\n",
    include_str!("../gpu/route_block.cuh"),
    "\n",
    include_str!("../gpu/dispatch.cuh"),
    "\n",
    include_str!("../gpu/route_dispatch.cuh"),
);

/// Name of the routing kernel that adds up to `MAX_PARTIALS` partial sums per logit.
pub const ROUTE_KERNEL: &str = "sluice_route";

/// Name of the routing kernel that reads finished logits (one partial sum per logit).
pub const ROUTE_LOGITS_KERNEL: &str = "sluice_route_logits";

/// Name of the block-per-token routing kernel that adds up to `MAX_PARTIALS` partial sums.
pub const ROUTE_BLOCK_KERNEL: &str = "sluice_route_block";

/// Name of the block-per-token routing kernel that reads finished logits.
pub const ROUTE_BLOCK_LOGITS_KERNEL: &str = "sluice_route_block_logits";

/// Name of the kernel that resets the routing status where no GEMM kernel of ours does.
pub const RESET_STATUS_KERNEL: &str = "sluice_reset_status";

/// Name of the kernel that adds the split partial sums into logits.
pub const SUM_PARTIALS_KERNEL: &str = "sluice_sum_partials";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_defines_every_kernel_the_geometry_names() {
        let mut names = vec![
            ROUTE_KERNEL.to_owned(),
            ROUTE_LOGITS_KERNEL.to_owned(),
            ROUTE_BLOCK_KERNEL.to_owned(),
            ROUTE_BLOCK_LOGITS_KERNEL.to_owned(),
            RESET_STATUS_KERNEL.to_owned(),
            SUM_PARTIALS_KERNEL.to_owned(),
            DISPATCH_COUNT_KERNEL.to_owned(),
            DISPATCH_SCATTER_KERNEL.to_owned(),
            DISPATCH_RANK_TOKENS_KERNEL.to_owned(),
            ROUTE_DISPATCH_KERNEL.to_owned(),
            ROUTE_DISPATCH_LOGITS_KERNEL.to_owned(),
        ];
        for tokens_per_block in [1, 2, 4, 8] {
            for experts_per_block in [1, 2] {
                names.push(GemmKernel::Gemv { tokens_per_block, experts_per_block }.name());
            }
        }
        for hidden in [HiddenKind::Bf16, HiddenKind::F16, HiddenKind::F32] {
            for weight in [WeightKind::Bf16, WeightKind::F32] {
                names.push(GemmKernel::Simt { hidden, weight }.name());
            }
            for tiles in [1, 2, 4, 8] {
                names.push(GemmKernel::Mma { hidden, tiles }.name());
            }
        }
        names.push(GemmKernel::Tiles.name());
        names.push(GemmKernel::Warpgroup.name());
        for name in names {
            // Kernels are either spelled out or built by an instantiation macro from a prefix.
            let (prefix, _) = name.rsplit_once('_').unwrap();
            assert!(
                [format!(" {name}("), format!("({name},"), format!("({prefix},")]
                    .iter()
                    .any(|pattern| SOURCE.contains(pattern.as_str())),
                "{name} is not in the source"
            );
        }
    }

    #[test]
    fn source_is_self_contained() {
        assert!(!SOURCE.contains("#include"), "NVRTC gets no headers");
    }
}
