//! The reference dispatch layout: the one source of truth for what `dispatch_into` writes.
//!
//! Written to be obviously right: the valid pairs collected in pair order, then a stable sort by
//! expert (or by rank, then expert). Every backend's layout must equal it entry for entry, and
//! [`DispatchLayout::check_invariants`] states the properties the layout must have on its own.
//! What each output holds is described in [`sluice_tensor::dispatch`].

use std::collections::BTreeSet;

use sluice_tensor::DispatchShape;
use thiserror::Error;

use super::ReferenceError;

/// Every output of one dispatch, at the full size a backend writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchLayout {
    /// Valid pairs per expert, `[E]`.
    pub expert_counts: Vec<i32>,
    /// Prefix sums of the counts, `[E + 1]`.
    pub expert_offsets: Vec<i32>,
    /// Valid pairs sorted by expert (stable), then sentinels, `[T * K]`.
    pub sorted_pairs: Vec<i32>,
    /// Position of each pair in `sorted_pairs`, `-1` if skipped, `[T * K]`.
    pub inverse: Vec<i32>,
    /// Rows holding a skipped pair, and the first of them or `-1`.
    pub invalid: [i32; 2],
    /// The block-padded layout, when a block size was given.
    pub padded: Option<PaddedLayout>,
    /// The per-rank layout, when a rank table was given.
    pub ranks: Option<RankLayout>,
}

/// The block-padded layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedLayout {
    /// Rows per block.
    pub block_size: usize,
    /// Pairs and sentinels, `[padded_capacity]`.
    pub padded_pairs: Vec<i32>,
    /// The expert of each block, `-1` after the last, `[padded_capacity / block_size]`.
    pub block_experts: Vec<i32>,
    /// The padded length.
    pub padded_total: i32,
}

/// The per-rank layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankLayout {
    /// Valid pairs per rank, `[R]`.
    pub rank_counts: Vec<i32>,
    /// Prefix sums of `rank_counts`, `[R + 1]`.
    pub rank_offsets: Vec<i32>,
    /// Valid pairs by rank, then expert, then pair; sentinels after, `[T * K]`.
    pub rank_pairs: Vec<i32>,
    /// Distinct tokens per rank, `[R]`.
    pub rank_tokens: Vec<i32>,
}

/// An expert-to-rank table and the number of ranks.
#[derive(Debug, Clone, Copy)]
pub struct RankMap<'a> {
    /// The rank of each expert, `[E]`.
    pub expert_ranks: &'a [i32],
    /// `R`.
    pub ranks: usize,
}

/// The dispatch layout of row-major `ids` (`[T, K]`, `-1` skips a pair), optionally padded to
/// `block_size` and split by `rank_map`.
pub fn dispatch(
    ids: &[i32],
    shape: DispatchShape,
    block_size: Option<usize>,
    rank_map: Option<RankMap<'_>>,
) -> Result<DispatchLayout, ReferenceError> {
    let pairs = shape.pairs();
    if i32::try_from(pairs).is_err() {
        return Err(ReferenceError::Overflow {
            what: "topk_ids",
            shape: format!("[{}, {}] pairs as i32 positions", shape.tokens, shape.top_k),
        });
    }
    if ids.len() != pairs {
        return Err(ReferenceError::Length {
            what: "topk_ids",
            len: ids.len(),
            expected: pairs,
            shape: format!("[{}, {}]", shape.tokens, shape.top_k),
        });
    }
    let valid = valid_pairs(ids, shape)?;
    let sentinel = shape.sentinel();
    let (expert_counts, expert_offsets) =
        counts_and_offsets(valid.iter().map(|&(e, _)| e), shape.experts);
    let sorted_pairs =
        padded_to(valid.iter().map(|&(_, pair)| index(pair)).collect(), pairs, sentinel);
    let mut inverse = vec![-1; pairs];
    for (position, &(_, pair)) in valid.iter().enumerate() {
        inverse[pair] = index(position);
    }
    let invalid_rows: Vec<usize> = (0..shape.tokens)
        .filter(|&row| ids[row * shape.top_k..(row + 1) * shape.top_k].contains(&-1))
        .collect();
    let invalid = [index(invalid_rows.len()), invalid_rows.first().map_or(-1, |&row| index(row))];
    let padded = block_size.map(|block| padded_layout(&valid, shape, block)).transpose()?;
    let ranks = rank_map.map(|map| rank_layout(&valid, shape, map)).transpose()?;
    Ok(DispatchLayout {
        expert_counts,
        expert_offsets,
        sorted_pairs,
        inverse,
        invalid,
        padded,
        ranks,
    })
}

/// The valid pairs as (expert, pair), sorted by expert and, stably, in pair order within one.
fn valid_pairs(ids: &[i32], shape: DispatchShape) -> Result<Vec<(usize, usize)>, ReferenceError> {
    let mut valid = Vec::with_capacity(ids.len());
    for (pair, &id) in ids.iter().enumerate() {
        match usize::try_from(id) {
            Ok(expert) if expert < shape.experts => valid.push((expert, pair)),
            _ if id == -1 => {}
            _ => {
                return Err(ReferenceError::ExpertId {
                    row: pair / shape.top_k,
                    slot: pair % shape.top_k,
                    id,
                    experts: shape.experts,
                });
            }
        }
    }
    valid.sort_by_key(|&(expert, _)| expert);
    Ok(valid)
}

/// Counts of `keys` in `[0, n)` and their prefix sums.
fn counts_and_offsets(keys: impl Iterator<Item = usize>, n: usize) -> (Vec<i32>, Vec<i32>) {
    let mut counts = vec![0i32; n];
    for key in keys {
        counts[key] += 1;
    }
    let mut offsets = vec![0i32; n + 1];
    for key in 0..n {
        offsets[key + 1] = offsets[key] + counts[key];
    }
    (counts, offsets)
}

fn padded_layout(
    valid: &[(usize, usize)],
    shape: DispatchShape,
    block: usize,
) -> Result<PaddedLayout, ReferenceError> {
    let capacity = shape.padded_capacity(block).ok_or(ReferenceError::ZeroBlockSize)?;
    let sentinel = shape.sentinel();
    let mut padded_pairs = Vec::with_capacity(capacity);
    let mut block_experts = Vec::new();
    for expert in 0..shape.experts {
        let run: Vec<i32> =
            valid.iter().filter(|&&(e, _)| e == expert).map(|&(_, pair)| index(pair)).collect();
        let blocks = run.len().div_ceil(block);
        padded_pairs.extend(padded_to(run, blocks * block, sentinel));
        block_experts.extend(std::iter::repeat_n(index(expert), blocks));
    }
    let padded_total = index(padded_pairs.len());
    Ok(PaddedLayout {
        block_size: block,
        padded_pairs: padded_to(padded_pairs, capacity, sentinel),
        block_experts: padded_to(block_experts, capacity / block, -1),
        padded_total,
    })
}

fn rank_layout(
    valid: &[(usize, usize)],
    shape: DispatchShape,
    map: RankMap<'_>,
) -> Result<RankLayout, ReferenceError> {
    let rank_of = |expert: usize| -> Result<usize, ReferenceError> {
        let rank = map.expert_ranks.get(expert).copied().unwrap_or(-1);
        usize::try_from(rank).ok().filter(|&rank| rank < map.ranks).ok_or(ReferenceError::Rank {
            expert,
            rank,
            ranks: map.ranks,
        })
    };
    if map.expert_ranks.len() != shape.experts {
        return Err(ReferenceError::Length {
            what: "expert_ranks",
            len: map.expert_ranks.len(),
            expected: shape.experts,
            shape: format!("[{}]", shape.experts),
        });
    }
    for expert in 0..shape.experts {
        rank_of(expert)?;
    }
    let mut by_rank: Vec<(usize, usize, usize)> = Vec::with_capacity(valid.len());
    for &(expert, pair) in valid {
        by_rank.push((rank_of(expert)?, expert, pair));
    }
    // Stable: pairs stay in their expert order, which is pair order within an expert.
    by_rank.sort_by_key(|&(rank, expert, _)| (rank, expert));
    let (rank_counts, rank_offsets) =
        counts_and_offsets(by_rank.iter().map(|&(r, _, _)| r), map.ranks);
    let rank_pairs = padded_to(
        by_rank.iter().map(|&(_, _, pair)| index(pair)).collect(),
        shape.pairs(),
        shape.sentinel(),
    );
    let mut tokens_per_rank = vec![BTreeSet::new(); map.ranks];
    for &(rank, _, pair) in &by_rank {
        tokens_per_rank[rank].insert(pair / shape.top_k);
    }
    let rank_tokens = tokens_per_rank.iter().map(|tokens| index(tokens.len())).collect();
    Ok(RankLayout { rank_counts, rank_offsets, rank_pairs, rank_tokens })
}

/// `values` followed by `fill` up to `len`.
fn padded_to(mut values: Vec<i32>, len: usize, fill: i32) -> Vec<i32> {
    values.resize(len.max(values.len()), fill);
    values
}

/// A position or count as the i32 the layout holds (the caller checked that `T * K` fits).
fn index(value: usize) -> i32 {
    i32::try_from(value).expect("dispatch positions fit i32 (checked against T * K)")
}

/// A property of a dispatch layout that does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("dispatch layout: {0}")]
pub struct LayoutViolation(pub String);

impl DispatchLayout {
    /// Checks the layout's properties against the ids it was made from, independently of how it
    /// was made: the counts sum to the valid pairs and are each expert's; the offsets are their
    /// prefix sums; the sorted pairs are a permutation of the valid pairs, grouped by expert and
    /// in pair order within one; the inverse inverts it; unused positions hold the sentinel; a
    /// padded layout has a total that is a multiple of the block size, every expert's run padded
    /// exactly with sentinels, and the right expert per block; a rank layout packs each rank's
    /// pairs in expert order.
    pub fn check_invariants(
        &self,
        ids: &[i32],
        shape: DispatchShape,
        rank_map: Option<RankMap<'_>>,
    ) -> Result<(), LayoutViolation> {
        let fail = |message: String| Err(LayoutViolation(message));
        let pairs = shape.pairs();
        let sentinel = shape.sentinel();
        let valid = ids.iter().filter(|&&id| id >= 0).count();
        let total: i64 = self.expert_counts.iter().map(|&c| i64::from(c)).sum();
        if total != valid as i64 {
            return fail(format!("counts sum to {total}, {valid} pairs are valid"));
        }
        for expert in 0..shape.experts {
            let expected = ids.iter().filter(|&&id| id == index(expert)).count();
            if self.expert_counts[expert] != index(expected) {
                return fail(format!(
                    "expert {expert} counts {}, not {expected}",
                    self.expert_counts[expert]
                ));
            }
            if self.expert_offsets[expert + 1] - self.expert_offsets[expert]
                != self.expert_counts[expert]
            {
                return fail(format!("offsets are not the prefix sums at expert {expert}"));
            }
        }
        if self.expert_offsets.first() != Some(&0) {
            return fail("offsets do not start at 0".into());
        }
        let mut seen = vec![false; pairs];
        for (position, &pair) in self.sorted_pairs.iter().enumerate() {
            if position >= valid {
                if pair != sentinel {
                    return fail(format!("position {position} past the valid pairs holds {pair}"));
                }
                continue;
            }
            let Some(&id) = usize::try_from(pair).ok().and_then(|p| ids.get(p)) else {
                return fail(format!("position {position} holds {pair}, not a pair"));
            };
            let pair = pair as usize;
            if id < 0 || seen[pair] {
                return fail(format!("pair {pair} is skipped or appears twice"));
            }
            seen[pair] = true;
            let expert = id as usize;
            let run =
                self.expert_offsets[expert] as usize..self.expert_offsets[expert + 1] as usize;
            if !run.contains(&position) {
                return fail(format!(
                    "pair {pair} of expert {expert} sits at {position}, outside {run:?}"
                ));
            }
            if position > run.start && self.sorted_pairs[position - 1] >= index(pair) {
                return fail(format!(
                    "expert {expert}'s pairs are not in pair order at {position}"
                ));
            }
            if self.inverse[pair] != index(position) {
                return fail(format!(
                    "inverse of pair {pair} is {}, not {position}",
                    self.inverse[pair]
                ));
            }
        }
        for (pair, &id) in ids.iter().enumerate() {
            if id < 0 && self.inverse[pair] != -1 {
                return fail(format!("skipped pair {pair} has inverse {}", self.inverse[pair]));
            }
        }
        if let Some(padded) = &self.padded {
            padded.check_invariants(
                &self.expert_counts,
                &self.sorted_pairs,
                &self.expert_offsets,
                sentinel,
            )?;
        }
        if let (Some(ranks), Some(map)) = (&self.ranks, rank_map) {
            ranks.check_invariants(shape, &self.sorted_pairs, &self.expert_offsets, map)?;
        }
        Ok(())
    }
}

impl PaddedLayout {
    fn check_invariants(
        &self,
        counts: &[i32],
        sorted: &[i32],
        offsets: &[i32],
        sentinel: i32,
    ) -> Result<(), LayoutViolation> {
        let fail = |message: String| Err(LayoutViolation(message));
        let block = self.block_size;
        let total = self.padded_total as usize;
        if !total.is_multiple_of(block) {
            return fail(format!("padded total {total} is not a multiple of {block}"));
        }
        let mut start = 0;
        for (expert, &count) in counts.iter().enumerate() {
            let count = count as usize;
            let padded = count.div_ceil(block) * block;
            let run = &self.padded_pairs[start..start + padded];
            let expected = &sorted[offsets[expert] as usize..offsets[expert + 1] as usize];
            if &run[..count] != expected || run[count..].iter().any(|&p| p != sentinel) {
                return fail(format!(
                    "expert {expert}'s padded run differs from its pairs plus sentinels"
                ));
            }
            let blocks = &self.block_experts[start / block..(start + padded) / block];
            if blocks.iter().any(|&e| e != expert as i32) {
                return fail(format!("a block of expert {expert} names another expert"));
            }
            start += padded;
        }
        if start != total {
            return fail(format!("padded runs end at {start}, the total says {total}"));
        }
        if self.padded_pairs[total..].iter().any(|&p| p != sentinel)
            || self.block_experts[total / block..].iter().any(|&e| e != -1)
        {
            return fail("positions past the padded total are not sentinels".into());
        }
        Ok(())
    }
}

impl RankLayout {
    fn check_invariants(
        &self,
        shape: DispatchShape,
        sorted: &[i32],
        offsets: &[i32],
        map: RankMap<'_>,
    ) -> Result<(), LayoutViolation> {
        let fail = |message: String| Err(LayoutViolation(message));
        let mut position = 0usize;
        for rank in 0..map.ranks {
            if self.rank_offsets[rank] as usize != position {
                return fail(format!(
                    "rank {rank} starts at {}, not {position}",
                    self.rank_offsets[rank]
                ));
            }
            let mut tokens = BTreeSet::new();
            for (expert, _) in
                map.expert_ranks.iter().enumerate().filter(|&(_, &r)| r as usize == rank)
            {
                let run = &sorted[offsets[expert] as usize..offsets[expert + 1] as usize];
                if self.rank_pairs[position..position + run.len()] != *run {
                    return fail(format!(
                        "rank {rank} does not pack expert {expert}'s pairs in order"
                    ));
                }
                tokens.extend(run.iter().map(|&pair| pair as usize / shape.top_k));
                position += run.len();
            }
            let count = position - self.rank_offsets[rank] as usize;
            if self.rank_counts[rank] as usize != count {
                return fail(format!(
                    "rank {rank} counts {}, packs {count}",
                    self.rank_counts[rank]
                ));
            }
            if self.rank_tokens[rank] as usize != tokens.len() {
                return fail(format!(
                    "rank {rank} counts {} tokens, receives {}",
                    self.rank_tokens[rank],
                    tokens.len()
                ));
            }
        }
        if self.rank_pairs[position..].iter().any(|&p| p != shape.sentinel()) {
            return fail("rank positions past the valid pairs are not sentinels".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three tokens of two picks among four experts; the middle row is marked invalid.
    const IDS: [i32; 6] = [2, 0, -1, -1, 0, 3];
    const SHAPE: DispatchShape = DispatchShape { tokens: 3, top_k: 2, experts: 4 };
    const TABLE: [i32; 4] = [1, 0, 0, 1];

    fn worked_example() -> DispatchLayout {
        let map = RankMap { expert_ranks: &TABLE, ranks: 2 };
        dispatch(&IDS, SHAPE, Some(2), Some(map)).unwrap()
    }

    #[test]
    fn a_worked_example_by_hand() {
        let layout = worked_example();
        assert_eq!(layout.expert_counts, [2, 0, 1, 1]);
        assert_eq!(layout.expert_offsets, [0, 2, 2, 3, 4]);
        // Expert 0 gets pairs 1 and 4 in that order, then 0 (expert 2) and 5 (expert 3).
        assert_eq!(layout.sorted_pairs, [1, 4, 0, 5, 6, 6]);
        assert_eq!(layout.inverse, [2, 0, -1, -1, 1, 3]);
        assert_eq!(layout.invalid, [1, 1]);
        let padded = layout.padded.as_ref().unwrap();
        assert_eq!(padded.padded_pairs, [1, 4, 0, 6, 5, 6, 6, 6, 6, 6]);
        assert_eq!(padded.block_experts, [0, 2, 3, -1, -1]);
        assert_eq!(padded.padded_total, 6);
        let ranks = layout.ranks.as_ref().unwrap();
        assert_eq!(ranks.rank_counts, [1, 3]);
        assert_eq!(ranks.rank_offsets, [0, 1, 4]);
        assert_eq!(ranks.rank_pairs, [0, 1, 4, 5, 6, 6]);
        assert_eq!(ranks.rank_tokens, [1, 2]);
        let map = RankMap { expert_ranks: &TABLE, ranks: 2 };
        layout.check_invariants(&IDS, SHAPE, Some(map)).unwrap();
    }

    #[test]
    fn the_invariants_catch_a_broken_layout() {
        let map = Some(RankMap { expert_ranks: &TABLE, ranks: 2 });
        let breakages: [fn(&mut DispatchLayout); 7] = [
            |l| l.expert_counts[1] = 1,
            |l| l.sorted_pairs.swap(0, 1),
            |l| l.sorted_pairs[5] = 0,
            |l| l.inverse[2] = 0,
            |l| l.padded.as_mut().unwrap().padded_pairs[3] = 0,
            |l| l.padded.as_mut().unwrap().block_experts[1] = 1,
            |l| l.ranks.as_mut().unwrap().rank_tokens[1] = 3,
        ];
        for (index, broken) in breakages.iter().enumerate() {
            let mut layout = worked_example();
            broken(&mut layout);
            assert!(layout.check_invariants(&IDS, SHAPE, map).is_err(), "breakage {index}");
        }
    }

    #[test]
    fn ids_and_ranks_outside_their_range_are_refused() {
        let bad = [2, 0, -2, -1, 0, 3];
        assert!(matches!(
            dispatch(&bad, SHAPE, None, None),
            Err(ReferenceError::ExpertId { row: 1, slot: 0, id: -2, experts: 4 })
        ));
        let too_large = [2, 0, 4, 1, 0, 3];
        assert!(matches!(
            dispatch(&too_large, SHAPE, None, None),
            Err(ReferenceError::ExpertId { id: 4, .. })
        ));
        let map = RankMap { expert_ranks: &[0, 1, 2, 0], ranks: 2 };
        assert!(matches!(
            dispatch(&IDS, SHAPE, None, Some(map)),
            Err(ReferenceError::Rank { expert: 2, rank: 2, ranks: 2 })
        ));
        assert!(matches!(dispatch(&IDS, SHAPE, Some(0), None), Err(ReferenceError::ZeroBlockSize)));
    }
}
