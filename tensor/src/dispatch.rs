//! The dispatch layout: the step after the gate, from `topk_ids [T, K]` to work per expert.
//!
//! Every engine turns the gate's ids into the order its expert kernels and its all-to-all consume.
//! A *pair* is one (token, slot) of `topk_ids`, named by its flat index `t * K + k`; the layout
//! says where each valid pair goes. [`PreparedRouter::dispatch_into`](crate::PreparedRouter) fills
//! [`DispatchOutputs`] the caller owns, under the same contract as `route_into`, and
//! [`check_dispatch_into`] holds the checks every backend makes before it writes.
//!
//! | output | shape (i32) | holds |
//! | --- | --- | --- |
//! | `expert_counts` | `[E]` | valid pairs per expert |
//! | `expert_offsets` | `[E + 1]` | prefix sums of the counts; `expert_offsets[E]` is the number of valid pairs `V` |
//! | `sorted_pairs` | `[T * K]` | the valid pairs sorted by expert, in pair order within an expert (stable); positions `V..` hold the sentinel `T * K` |
//! | `inverse` | `[T, K]` | where each pair sits in `sorted_pairs`, `-1` for a skipped pair: the gather a combine step uses to scatter expert outputs back to their tokens |
//! | `invalid` (optional) | `[2]` | rows holding a skipped pair, and the first of them (or `-1`) |
//! | padded (optional) | | each expert's pairs padded to a multiple of `block_size`, the layout a grouped GEMM iterates over (what vLLM and sglang call `moe_align_block_size`): |
//! | `padded_pairs` | `[padded_capacity]` | the pairs, each expert's run followed by sentinels (`T * K`) up to a multiple of the block size; sentinels after the padded total too |
//! | `block_experts` | `[padded_capacity / block_size]` | the expert of each block, `-1` after the last |
//! | `padded_total` | `[1]` | the padded length, a multiple of the block size |
//! | ranks (optional, with an `expert_ranks [E]` table) | | what an expert-parallel all-to-all sends (sluice does no communication): |
//! | `rank_counts` | `[R]` | valid pairs per destination rank |
//! | `rank_offsets` | `[R + 1]` | prefix sums of `rank_counts` |
//! | `rank_pairs` | `[T * K]` | the valid pairs in packing order: by rank, then expert, then pair; sentinels after |
//! | `rank_tokens` | `[R]` | distinct tokens per rank (what a dispatch that sends a token once per rank, like DeepEP's, moves) |
//! | `workspace` (u8, when needed) | `[N]` | scratch of at least [`PreparedRouter::dispatch_workspace_bytes`] bytes, 16-byte aligned (a GPU's per-block counts at large `T`; 0 bytes on the host) |
//!
//! A pair whose id is `-1` (a row marked invalid under
//! [`NonFinitePolicy::MarkInvalid`](crate::NonFinitePolicy)) is skipped: counted in `invalid`,
//! never dispatched. Any other id outside `[0, E)`, or a rank outside `[0, R)`, is refused on the
//! host by [`check_dispatch_values`] before anything is written.

use crate::contract::{
    ExpectedShape, Named, check_disjoint, check_execution, check_output, check_rows,
    check_workspace, route_extents,
};
use crate::{
    BackendError, DType, DlpackView, DlpackViewMut, Execution, PreparedRouter, RouteInputs,
    RouteOutputs, check_route_into,
};

/// The inputs of one dispatch call.
#[derive(Debug, Clone, Copy)]
pub struct DispatchInputs<'a> {
    /// Expert ids, i32 `[T, K]`, rows contiguous; `-1` marks a pair to skip.
    pub topk_ids: DlpackView<'a>,
    /// The rank that holds each expert, i32 `[E]`; needed exactly when rank outputs are asked for.
    pub expert_ranks: Option<DlpackView<'a>>,
}

impl<'a> DispatchInputs<'a> {
    /// The ids alone.
    pub fn new(topk_ids: DlpackView<'a>) -> Self {
        DispatchInputs { topk_ids, expert_ranks: None }
    }

    /// Adds the expert-to-rank table (see [`contiguous_ranks`] for the usual one).
    pub fn with_expert_ranks(mut self, expert_ranks: DlpackView<'a>) -> Self {
        self.expert_ranks = Some(expert_ranks);
        self
    }
}

/// The caller-owned outputs of one dispatch call (see the [module docs](self) for each one).
#[derive(Debug)]
pub struct DispatchOutputs<'a> {
    /// Valid pairs per expert, i32 `[E]`.
    pub expert_counts: DlpackViewMut<'a>,
    /// Prefix sums of the counts, i32 `[E + 1]`.
    pub expert_offsets: DlpackViewMut<'a>,
    /// Valid pairs sorted by expert, stable, then sentinels; i32 `[T * K]`.
    pub sorted_pairs: DlpackViewMut<'a>,
    /// Position of each pair in `sorted_pairs`, `-1` if skipped; i32 `[T, K]`.
    pub inverse: DlpackViewMut<'a>,
    /// Rows with a skipped pair, and the first of them or `-1`; i32 `[2]`.
    pub invalid: Option<DlpackViewMut<'a>>,
    /// The block-padded layout of a grouped GEMM.
    pub padded: Option<PaddedOutputs<'a>>,
    /// Rows per destination rank of an expert-parallel all-to-all.
    pub ranks: Option<RankOutputs<'a>>,
    /// u8 `[N]` scratch of at least `dispatch_workspace_bytes(T)` bytes, 16-byte aligned.
    pub workspace: Option<DlpackViewMut<'a>>,
}

impl<'a> DispatchOutputs<'a> {
    /// The four outputs every call writes.
    pub fn new(
        expert_counts: DlpackViewMut<'a>,
        expert_offsets: DlpackViewMut<'a>,
        sorted_pairs: DlpackViewMut<'a>,
        inverse: DlpackViewMut<'a>,
    ) -> Self {
        DispatchOutputs {
            expert_counts,
            expert_offsets,
            sorted_pairs,
            inverse,
            invalid: None,
            padded: None,
            ranks: None,
            workspace: None,
        }
    }

    /// Also count the rows with skipped pairs.
    pub fn with_invalid(mut self, invalid: DlpackViewMut<'a>) -> Self {
        self.invalid = Some(invalid);
        self
    }

    /// Also write the block-padded layout.
    pub fn with_padding(mut self, padded: PaddedOutputs<'a>) -> Self {
        self.padded = Some(padded);
        self
    }

    /// Also write the per-rank layout (the inputs must carry `expert_ranks`).
    pub fn with_ranks(mut self, ranks: RankOutputs<'a>) -> Self {
        self.ranks = Some(ranks);
        self
    }

    /// Use this workspace.
    pub fn with_workspace(mut self, workspace: DlpackViewMut<'a>) -> Self {
        self.workspace = Some(workspace);
        self
    }
}

/// The block-padded layout: each expert's pairs padded to a multiple of `block_size`.
#[derive(Debug)]
pub struct PaddedOutputs<'a> {
    /// The grouped GEMM's block size (rows per block), at least 1.
    pub block_size: usize,
    /// Pairs and sentinels, i32 `[padded_capacity]` ([`DispatchShape::padded_capacity`]).
    pub padded_pairs: DlpackViewMut<'a>,
    /// The expert of each block, `-1` after the last; i32 `[padded_capacity / block_size]`.
    pub block_experts: DlpackViewMut<'a>,
    /// The padded length, i32 `[1]`.
    pub padded_total: DlpackViewMut<'a>,
}

/// The per-rank layout of an expert-parallel all-to-all, for `R` ranks.
#[derive(Debug)]
pub struct RankOutputs<'a> {
    /// Valid pairs per rank, i32 `[R]`.
    pub rank_counts: DlpackViewMut<'a>,
    /// Prefix sums of `rank_counts`, i32 `[R + 1]`.
    pub rank_offsets: DlpackViewMut<'a>,
    /// Valid pairs by rank, then expert, then pair; sentinels after; i32 `[T * K]`.
    pub rank_pairs: DlpackViewMut<'a>,
    /// Distinct tokens per rank, i32 `[R]`.
    pub rank_tokens: DlpackViewMut<'a>,
}

/// The sizes of one dispatch: `T` tokens of `K` picks among `E` experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchShape {
    /// `T`.
    pub tokens: usize,
    /// `K`.
    pub top_k: usize,
    /// `E`.
    pub experts: usize,
}

impl DispatchShape {
    /// The number of pairs, `T * K` (saturating; checked calls keep it within i32).
    pub fn pairs(&self) -> usize {
        self.tokens.saturating_mul(self.top_k)
    }

    /// The value that marks padding and unused positions: `T * K`, one past the last pair, so that
    /// `pair < T * K` tells a real pair (as in vLLM's `moe_align_block_size`).
    pub fn sentinel(&self) -> i32 {
        i32::try_from(self.pairs()).unwrap_or(i32::MAX)
    }

    /// The length of `padded_pairs` for `block_size`: the most the padded layout can need, each
    /// expert that receives a pair rounding up by at most `block_size - 1`. `None` on overflow.
    pub fn padded_capacity(&self, block_size: usize) -> Option<usize> {
        let busy = self.experts.min(self.pairs());
        busy.checked_mul(block_size.checked_sub(1)?)?.checked_add(self.pairs())
    }
}

/// The expert-to-rank table of `experts` experts spread in contiguous ranges over `ranks` ranks
/// (expert `e` on rank `e * R / E`, as engines place them), written into `table`.
pub fn contiguous_ranks(table: &mut [i32], ranks: usize) {
    let experts = table.len();
    for (expert, rank) in table.iter_mut().enumerate() {
        *rank = i32::try_from(expert * ranks / experts.max(1)).unwrap_or(i32::MAX);
    }
}

/// Checks everything about a `dispatch_into` call of `router` that needs no look at the data:
/// where it runs, devices, dtypes, shapes and layouts, the block size, that the indices fit i32,
/// that ranks come with their table, the workspace against
/// [`PreparedRouter::dispatch_workspace_bytes`], and that no output aliases another argument.
/// Returns the shape and the number of ranks (0 without rank outputs).
pub fn check_dispatch_into<R: PreparedRouter + ?Sized>(
    op: &'static str,
    router: &R,
    inputs: &DispatchInputs<'_>,
    outputs: &DispatchOutputs<'_>,
    execution: Execution,
) -> Result<(DispatchShape, usize), BackendError> {
    let (spec, device) = (router.spec(), router.device());
    check_execution(op, device, execution)?;
    let ids = &inputs.topk_ids;
    let tokens = match *ids.shape() {
        [tokens, top_k] if top_k == spec.top_k => tokens,
        _ => {
            return Err(BackendError::Shape {
                op,
                arg: "topk_ids",
                shape: ids.shape().to_vec(),
                expected: ExpectedShape(vec![None, Some(spec.top_k)]),
            });
        }
    };
    check_rows(op, "topk_ids", device, ids, DType::I32, &[tokens, spec.top_k])?;
    let shape = DispatchShape { tokens, top_k: spec.top_k, experts: spec.num_experts };
    let pairs = fits_i32(op, "sorted_pairs", tokens.checked_mul(spec.top_k))?;
    let experts = shape.experts;
    let i32_output = |arg: &'static str, view: &DlpackViewMut<'_>, dims: &[usize]| {
        check_output(op, arg, device, view, DType::I32, dims)
    };
    i32_output("expert_counts", &outputs.expert_counts, &[experts])?;
    i32_output("expert_offsets", &outputs.expert_offsets, &[experts + 1])?;
    i32_output("sorted_pairs", &outputs.sorted_pairs, &[pairs])?;
    i32_output("inverse", &outputs.inverse, &[tokens, spec.top_k])?;
    if let Some(invalid) = &outputs.invalid {
        i32_output("invalid", invalid, &[2])?;
    }
    if let Some(padded) = &outputs.padded {
        if padded.block_size == 0 {
            return Err(BackendError::ZeroBlockSize { op });
        }
        let capacity = fits_i32(op, "padded_pairs", shape.padded_capacity(padded.block_size))?;
        i32_output("padded_pairs", &padded.padded_pairs, &[capacity])?;
        i32_output("block_experts", &padded.block_experts, &[capacity / padded.block_size])?;
        i32_output("padded_total", &padded.padded_total, &[1])?;
    }
    let ranks = match (&outputs.ranks, &inputs.expert_ranks) {
        (None, None) => 0,
        (Some(_), None) => {
            return Err(BackendError::MissingArgument {
                op,
                arg: "expert_ranks",
                needed_by: "rank outputs",
            });
        }
        (None, Some(_)) => {
            return Err(BackendError::MissingArgument {
                op,
                arg: "rank outputs",
                needed_by: "expert_ranks",
            });
        }
        (Some(rank_outputs), Some(table)) => {
            check_rows(op, "expert_ranks", device, table, DType::I32, &[experts])?;
            let ranks = match *rank_outputs.rank_counts.shape() {
                [ranks] if ranks > 0 => ranks,
                _ => {
                    return Err(BackendError::Shape {
                        op,
                        arg: "rank_counts",
                        shape: rank_outputs.rank_counts.shape().to_vec(),
                        expected: ExpectedShape(vec![None]),
                    });
                }
            };
            i32_output("rank_counts", &rank_outputs.rank_counts, &[ranks])?;
            i32_output("rank_offsets", &rank_outputs.rank_offsets, &[ranks + 1])?;
            i32_output("rank_pairs", &rank_outputs.rank_pairs, &[pairs])?;
            i32_output("rank_tokens", &rank_outputs.rank_tokens, &[ranks])?;
            ranks
        }
    };
    let workspace_needed = router.dispatch_workspace_bytes(tokens);
    match &outputs.workspace {
        Some(workspace) => check_workspace(op, device, workspace, workspace_needed)?,
        None if workspace_needed > 0 => {
            return Err(BackendError::WorkspaceTooSmall { op, bytes: 0, needed: workspace_needed });
        }
        None => {}
    }
    let written = dispatch_written(outputs);
    let read = [
        named("topk_ids", &inputs.topk_ids),
        inputs.expert_ranks.and_then(|v| named("expert_ranks", &v)),
    ];
    check_disjoint(op, &written, &read)?;
    Ok((shape, ranks))
}

/// What a dispatch call writes, by name.
fn dispatch_written(outputs: &DispatchOutputs<'_>) -> [Named; 13] {
    let padded = outputs.padded.as_ref();
    let rank_outputs = outputs.ranks.as_ref();
    [
        named_mut("expert_counts", &outputs.expert_counts),
        named_mut("expert_offsets", &outputs.expert_offsets),
        named_mut("sorted_pairs", &outputs.sorted_pairs),
        named_mut("inverse", &outputs.inverse),
        outputs.invalid.as_ref().and_then(|v| named_mut("invalid", v)),
        padded.and_then(|p| named_mut("padded_pairs", &p.padded_pairs)),
        padded.and_then(|p| named_mut("block_experts", &p.block_experts)),
        padded.and_then(|p| named_mut("padded_total", &p.padded_total)),
        rank_outputs.and_then(|r| named_mut("rank_counts", &r.rank_counts)),
        rank_outputs.and_then(|r| named_mut("rank_offsets", &r.rank_offsets)),
        rank_outputs.and_then(|r| named_mut("rank_pairs", &r.rank_pairs)),
        rank_outputs.and_then(|r| named_mut("rank_tokens", &r.rank_tokens)),
        outputs.workspace.as_ref().and_then(|v| named_mut("workspace", v)),
    ]
}

/// Checks a `route_and_dispatch_into` call: everything [`check_route_into`] checks of the routing
/// (with the router's `workspace_bytes(T)` of route workspace), everything [`check_dispatch_into`]
/// checks of the layout of the call's own `topk_ids` (with `expert_ranks`), and that no layout
/// output overlaps what routing reads or writes. Returns the layout's shape and rank count (0
/// without rank outputs), as `check_dispatch_into` does.
pub fn check_route_and_dispatch_into<R: PreparedRouter + ?Sized>(
    op: &'static str,
    router: &R,
    inputs: &RouteInputs<'_>,
    outputs: &RouteOutputs<'_>,
    layout: &DispatchOutputs<'_>,
    expert_ranks: Option<DlpackView<'_>>,
    execution: Execution,
) -> Result<(DispatchShape, usize), BackendError> {
    let tokens = inputs.hidden.shape().first().copied().unwrap_or(0);
    let needed = router.workspace_bytes(tokens);
    check_route_into(op, router, inputs, outputs, execution, needed)?;
    let ids = DispatchInputs { topk_ids: outputs.topk_ids.as_view(), expert_ranks };
    let (shape, ranks) = check_dispatch_into(op, router, &ids, layout, execution)?;
    let (route_written, route_read) = route_extents(inputs, outputs);
    let layout_written = dispatch_written(layout);
    check_disjoint(op, &layout_written, &route_written)?;
    check_disjoint(op, &layout_written, &route_read)?;
    Ok((shape, ranks))
}

/// The checks of a dispatch's data, for backends that compute on the host: every id is `-1` or
/// in `[0, E)`, and every rank in the table is in `[0, ranks)`. Made before anything is written.
pub fn check_dispatch_values(
    op: &'static str,
    inputs: &DispatchInputs<'_>,
    shape: DispatchShape,
    ranks: usize,
) -> Result<(), BackendError> {
    let view_error = |arg| move |source| BackendError::View { op, arg, source };
    let ids = inputs.topk_ids.as_array2::<i32>().map_err(view_error("topk_ids"))?;
    for ((row, slot), &id) in ids.indexed_iter() {
        if id < -1 || usize::try_from(id).is_ok_and(|id| id >= shape.experts) {
            return Err(BackendError::ExpertIdOutOfRange {
                op,
                row,
                slot,
                id,
                experts: shape.experts,
            });
        }
    }
    if let Some(table) = &inputs.expert_ranks {
        let table = table.as_array1::<i32>().map_err(view_error("expert_ranks"))?;
        for (expert, &rank) in table.iter().enumerate() {
            if usize::try_from(rank).map_or(true, |rank| rank >= ranks) {
                return Err(BackendError::RankOutOfRange { op, expert, rank, ranks });
            }
        }
    }
    Ok(())
}

fn named(name: &'static str, view: &DlpackView<'_>) -> Named {
    Some((name, view.extent()))
}

fn named_mut(name: &'static str, view: &DlpackViewMut<'_>) -> Named {
    Some((name, view.extent()))
}

/// `count` if it is known and fits an i32 index, else [`BackendError::IndexOverflow`].
fn fits_i32(
    op: &'static str,
    arg: &'static str,
    count: Option<usize>,
) -> Result<usize, BackendError> {
    count.filter(|&count| i32::try_from(count).is_ok()).ok_or(BackendError::IndexOverflow {
        op,
        arg,
        entries: count.unwrap_or(usize::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_capacity_bounds_every_expert_rounding_up() {
        let shape = DispatchShape { tokens: 3, top_k: 2, experts: 256 };
        // Six pairs reach at most six experts, each padded by at most 15.
        assert_eq!(shape.padded_capacity(16), Some(6 + 6 * 15));
        assert_eq!(shape.padded_capacity(1), Some(6));
        assert_eq!(shape.padded_capacity(0), None);
        let many = DispatchShape { tokens: 4096, top_k: 8, experts: 256 };
        assert_eq!(many.padded_capacity(128), Some(4096 * 8 + 256 * 127));
        assert_eq!(
            DispatchShape { tokens: 0, top_k: 8, experts: 256 }.padded_capacity(64),
            Some(0)
        );
    }

    #[test]
    fn contiguous_ranks_split_experts_evenly_in_order() {
        let mut table = [0i32; 8];
        contiguous_ranks(&mut table, 4);
        assert_eq!(table, [0, 0, 1, 1, 2, 2, 3, 3]);
        let mut uneven = [0i32; 5];
        contiguous_ranks(&mut uneven, 2);
        assert_eq!(uneven, [0, 0, 0, 1, 1]);
    }
}
