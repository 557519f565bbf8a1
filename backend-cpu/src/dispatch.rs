//! The dispatch layout on the host: a counting sort of the pairs by expert, written straight into
//! the caller's outputs.
//!
//! No scratch is needed: the counts output doubles as the per-expert cursor of the scatter (zeroed
//! after the offsets are known, it counts again while the pairs are placed and ends where it
//! started), and the rank counts do the same for the per-rank packing. Everything is read through
//! the bridge's views; nothing is allocated.
//!
//! One thread: the layout touches `T * K` ids a few times (32 Ki ids at T = 4096, K = 8, tens of
//! microseconds), against a gate that streams the whole router weight; splitting it between
//! threads would cost more in hand-offs than it saves.

use ndarray::{ArrayView2, ArrayViewMut1, ArrayViewMut2};
use sluice_tensor::{
    BackendError, DispatchInputs, DispatchOutputs, DispatchShape, DlpackViewMut, PaddedOutputs,
    RankOutputs, check_dispatch_values,
};

/// Computes the layout of `inputs` into `outputs`, both checked by `check_dispatch_into` (which
/// gave `shape` and `ranks`). The ids and the rank table are checked here before any write.
pub(crate) fn dispatch_into(
    op: &'static str,
    inputs: &DispatchInputs<'_>,
    outputs: &mut DispatchOutputs<'_>,
    shape: DispatchShape,
    ranks: usize,
) -> Result<(), BackendError> {
    check_dispatch_values(op, inputs, shape, ranks)?;
    let view_error = |arg| move |source| BackendError::View { op, arg, source };
    let ids = inputs.topk_ids.as_array2::<i32>().map_err(view_error("topk_ids"))?;
    let counts = slice(op, "expert_counts", &mut outputs.expert_counts)?;
    let offsets = slice(op, "expert_offsets", &mut outputs.expert_offsets)?;
    let sorted = slice(op, "sorted_pairs", &mut outputs.sorted_pairs)?;
    let inverse = outputs.inverse.as_array2_mut::<i32>().map_err(view_error("inverse"))?;
    let invalid = count_experts(ids, counts);
    prefix_sums(counts, offsets);
    scatter(ids, offsets, counts, sorted, inverse, shape.sentinel());
    if let Some(status) = outputs.invalid.as_mut() {
        let status = slice(op, "invalid", status)?;
        status[0] = invalid.rows;
        status[1] = invalid.first;
    }
    let runs = ExpertRuns { counts, offsets, sorted, sentinel: shape.sentinel() };
    if let Some(padded) = outputs.padded.as_mut() {
        pad(op, padded, &runs)?;
    }
    if let (Some(rank_outputs), Some(table)) = (outputs.ranks.as_mut(), &inputs.expert_ranks) {
        let table = table.as_array1::<i32>().map_err(view_error("expert_ranks"))?;
        let table = table.as_slice().ok_or_else(|| not_contiguous(op, "expert_ranks"))?;
        pack_ranks(op, rank_outputs, table, ids, &runs)?;
    }
    Ok(())
}

/// The contiguous elements of a checked one-dimensional i32 output.
fn slice<'a>(
    op: &'static str,
    arg: &'static str,
    view: &'a mut DlpackViewMut<'_>,
) -> Result<&'a mut [i32], BackendError> {
    let array: ArrayViewMut1<'a, i32> =
        view.as_array1_mut().map_err(|source| BackendError::View { op, arg, source })?;
    array.into_slice().ok_or_else(|| not_contiguous(op, arg))
}

/// Views that passed `check_dispatch_into` are contiguous; this names the argument if one is not.
fn not_contiguous(op: &'static str, arg: &'static str) -> BackendError {
    BackendError::Layout {
        op,
        arg,
        shape: Vec::new(),
        strides: Vec::new(),
        requirement: "a one-dimensional dispatch argument must be contiguous",
    }
}

/// Rows holding a skipped pair, and the first of them (`-1`: none), as the `invalid` output holds.
struct InvalidRows {
    rows: i32,
    first: i32,
}

/// Counts the valid pairs of each expert into `counts`; ids were checked to be `-1` or in range.
fn count_experts(ids: ArrayView2<'_, i32>, counts: &mut [i32]) -> InvalidRows {
    counts.fill(0);
    let mut invalid = InvalidRows { rows: 0, first: -1 };
    for (row, picks) in ids.outer_iter().enumerate() {
        let mut skipped = false;
        for &id in picks {
            match usize::try_from(id) {
                Ok(expert) => counts[expert] += 1,
                Err(_) => skipped = true,
            }
        }
        if skipped {
            if invalid.rows == 0 {
                invalid.first = to_i32(row);
            }
            invalid.rows += 1;
        }
    }
    invalid
}

/// `offsets[0] = 0`, `offsets[i + 1] = offsets[i] + counts[i]`.
fn prefix_sums(counts: &[i32], offsets: &mut [i32]) {
    let mut sum = 0;
    offsets[0] = 0;
    for (count, offset) in counts.iter().zip(&mut offsets[1..]) {
        sum += count;
        *offset = sum;
    }
}

/// Places every valid pair at its expert's next position, in pair order (so stable), and records
/// where in `inverse`. `counts` is the cursor: zeroed here, it holds the counts again at the end.
fn scatter(
    ids: ArrayView2<'_, i32>,
    offsets: &[i32],
    counts: &mut [i32],
    sorted: &mut [i32],
    mut inverse: ArrayViewMut2<'_, i32>,
    sentinel: i32,
) {
    counts.fill(0);
    let top_k = ids.ncols();
    for ((row, picks), mut inverse_row) in
        ids.outer_iter().enumerate().zip(inverse.outer_iter_mut())
    {
        for (slot, (&id, position_of)) in picks.iter().zip(inverse_row.iter_mut()).enumerate() {
            let Ok(expert) = usize::try_from(id) else {
                *position_of = -1;
                continue;
            };
            let position = offsets[expert] + counts[expert];
            counts[expert] += 1;
            sorted[position as usize] = to_i32(row * top_k + slot);
            *position_of = position;
        }
    }
    let valid = offsets[offsets.len() - 1] as usize;
    sorted[valid..].fill(sentinel);
}

/// The sorted layout once it is written: each expert's run of pairs.
struct ExpertRuns<'a> {
    counts: &'a [i32],
    offsets: &'a [i32],
    sorted: &'a [i32],
    sentinel: i32,
}

impl ExpertRuns<'_> {
    /// Expert `expert`'s pairs, in pair order.
    fn run(&self, expert: usize) -> &[i32] {
        &self.sorted[self.offsets[expert] as usize..self.offsets[expert + 1] as usize]
    }

    /// The number of valid pairs.
    fn valid(&self) -> usize {
        self.offsets[self.offsets.len() - 1] as usize
    }
}

/// Each expert's run padded with sentinels to a multiple of the block size, the expert of every
/// block, and the padded total; sentinels (blocks: `-1`) after it.
fn pad(
    op: &'static str,
    padded: &mut PaddedOutputs<'_>,
    runs: &ExpertRuns<'_>,
) -> Result<(), BackendError> {
    let (block, sentinel) = (padded.block_size, runs.sentinel);
    let pairs = slice(op, "padded_pairs", &mut padded.padded_pairs)?;
    let blocks = slice(op, "block_experts", &mut padded.block_experts)?;
    let mut end = 0;
    // Only experts that received a pair take space; at small T that is a few of hundreds.
    for expert in (0..runs.counts.len()).filter(|&expert| runs.counts[expert] > 0) {
        let run = runs.run(expert);
        let padded_len = run.len().div_ceil(block) * block;
        pairs[end..end + run.len()].copy_from_slice(run);
        pairs[end + run.len()..end + padded_len].fill(sentinel);
        blocks[end / block..(end + padded_len) / block].fill(to_i32(expert));
        end += padded_len;
    }
    pairs[end..].fill(sentinel);
    blocks[end / block..].fill(-1);
    slice(op, "padded_total", &mut padded.padded_total)?[0] = to_i32(end);
    Ok(())
}

/// The pairs packed by rank (then expert, then pair), the pairs and distinct tokens per rank.
fn pack_ranks(
    op: &'static str,
    outputs: &mut RankOutputs<'_>,
    table: &[i32],
    ids: ArrayView2<'_, i32>,
    runs: &ExpertRuns<'_>,
) -> Result<(), BackendError> {
    let rank_counts = slice(op, "rank_counts", &mut outputs.rank_counts)?;
    let rank_offsets = slice(op, "rank_offsets", &mut outputs.rank_offsets)?;
    let rank_pairs = slice(op, "rank_pairs", &mut outputs.rank_pairs)?;
    let rank_tokens = slice(op, "rank_tokens", &mut outputs.rank_tokens)?;
    // The table was checked to hold ranks in [0, R).
    let rank_of = |expert: usize| table[expert] as usize;
    rank_counts.fill(0);
    for (expert, &count) in runs.counts.iter().enumerate() {
        rank_counts[rank_of(expert)] += count;
    }
    prefix_sums(rank_counts, rank_offsets);
    // The rank counts are the cursor now, as the expert counts were in `scatter`.
    rank_counts.fill(0);
    for expert in (0..runs.counts.len()).filter(|&expert| runs.counts[expert] > 0) {
        let rank = rank_of(expert);
        let run = runs.run(expert);
        let start = (rank_offsets[rank] + rank_counts[rank]) as usize;
        rank_pairs[start..start + run.len()].copy_from_slice(run);
        rank_counts[rank] += runs.counts[expert];
    }
    rank_pairs[runs.valid()..].fill(runs.sentinel);
    rank_tokens.fill(0);
    for picks in ids.outer_iter() {
        for (slot, &id) in picks.iter().enumerate() {
            let Ok(expert) = usize::try_from(id) else { continue };
            let rank = rank_of(expert);
            let earlier = picks.iter().take(slot);
            if !earlier.filter_map(|&e| usize::try_from(e).ok()).any(|e| rank_of(e) == rank) {
                rank_tokens[rank] += 1;
            }
        }
    }
    Ok(())
}

/// A position, count or pair index as i32; `check_dispatch_into` made sure `T * K` (and the
/// padded capacity) fit.
fn to_i32(value: usize) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}
