//! Top-k of up to 8 experts with AVX-512: sorting networks on packed 64-bit keys, no branches
//! per candidate.
//!
//! Each candidate becomes one `u64`: the selection value mapped to an order-preserving `u32` in
//! the high half, the bitwise complement of the expert index in the low half. Larger packed key
//! means "comes first" under the routing order (larger value, then lower index), so selection is
//! plain unsigned max/min. The 8 best so far stay sorted in one vector; a chunk of 8 candidates
//! that cannot beat the 8th best is skipped after one comparison, any other chunk is sorted by a
//! bitonic network and merged.

use std::arch::x86_64::*;

use crate::kernel::Avx512Bf16Token;

/// Lanes per vector (and the most experts this path selects).
pub(super) const MAX_K: usize = 8;

/// One compare-exchange layer of a bitonic network: lane `i` meets lane `i ^ distance`; lanes in
/// `keep_max` keep the larger key.
#[derive(Clone, Copy)]
struct Layer {
    distance: usize,
    keep_max: u8,
}

/// The layer where blocks of `block` lanes are sorted descending or ascending alternately (or all
/// descending when `block == 8`), exchanging lanes `distance` apart.
const fn layer(block: usize, distance: usize) -> Layer {
    let mut keep_max = 0u8;
    let mut lane = 0;
    while lane < MAX_K {
        let partner = lane ^ distance;
        let descending = block == MAX_K || lane & block == 0;
        // In a descending block the lower lane of each pair keeps the maximum.
        if (lane < partner) == descending {
            keep_max |= 1 << lane;
        }
        lane += 1;
    }
    Layer { distance, keep_max }
}

/// Sorts 8 lanes descending.
const SORT: [Layer; 6] =
    [layer(2, 1), layer(4, 2), layer(4, 1), layer(8, 4), layer(8, 2), layer(8, 1)];
/// Sorts a bitonic sequence of 8 lanes descending.
const MERGE: [Layer; 3] = [layer(8, 4), layer(8, 2), layer(8, 1)];

#[inline]
#[target_feature(enable = "avx512f")]
fn apply(v: __m512i, layers: &[Layer]) -> __m512i {
    let mut v = v;
    for l in layers {
        let d = l.distance as i64;
        let partner =
            _mm512_xor_si512(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(d));
        let other = _mm512_permutexvar_epi64(partner, v);
        let (low, high) = (_mm512_min_epu64(v, other), _mm512_max_epu64(v, other));
        v = _mm512_mask_blend_epi64(l.keep_max, low, high);
    }
    v
}

/// Packs 8 selection values (lanes past `valid` become 0, below every real candidate) with the
/// indices `first_index + lane`. `-0.0` is packed as `+0.0`: the routing order treats them as
/// equal.
#[inline]
#[target_feature(enable = "avx512f")]
fn pack(values: __m256, first_index: u32, valid: u8) -> __m512i {
    let values = _mm256_castps_si256(_mm256_add_ps(values, _mm256_setzero_ps()));
    let sign = _mm256_srai_epi32::<31>(values);
    let ordered = _mm256_xor_si256(values, _mm256_or_si256(sign, _mm256_set1_epi32(i32::MIN)));
    let high = _mm512_slli_epi64::<32>(_mm512_cvtepu32_epi64(ordered));
    let lanes = _mm256_add_epi32(
        _mm256_set1_epi32(first_index as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let low = _mm512_cvtepu32_epi64(_mm256_xor_si256(lanes, _mm256_set1_epi32(-1)));
    _mm512_maskz_mov_epi64(valid, _mm512_or_si512(high, low))
}

/// The best `k` (`1..=8`) experts among candidate runs `(selection values, index of the first)`,
/// written best first into `ids`, on a CPU the token proves has AVX-512F.
///
/// The values must not be NaN and the runs must hold at least `k` candidates in all; otherwise the
/// experts chosen are unspecified (NaN has no place in the order; missing candidates come out as
/// id `u32::MAX`), though memory stays safe. Debug builds check both.
#[target_feature(enable = "avx512f")]
pub(super) fn select<'a>(
    _: Avx512Bf16Token,
    runs: impl Iterator<Item = (&'a [f32], u32)>,
    k: usize,
    ids: &mut [u32],
) {
    debug_assert!((1..=MAX_K).contains(&k), "k = {k} is outside 1..={MAX_K}");
    let mut candidates = 0;
    let kth = _mm512_set1_epi64(k as i64 - 1);
    let reverse = _mm512_setr_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    let mut best = _mm512_setzero_si512();
    for (values, first) in runs {
        debug_assert!(!values.iter().any(|v| v.is_nan()), "NaN selection value");
        candidates += values.len();
        let chunks = values.chunks_exact(MAX_K);
        let tail = chunks.remainder();
        let mut index = first;
        let mut offer = |candidates: __m512i| {
            let threshold = _mm512_permutexvar_epi64(kth, best);
            if _mm512_cmpgt_epu64_mask(candidates, threshold) != 0 {
                let sorted_ascending = _mm512_permutexvar_epi64(reverse, apply(candidates, &SORT));
                best = apply(_mm512_max_epu64(best, sorted_ascending), &MERGE);
            }
        };
        for chunk in chunks {
            // SAFETY: the chunk holds 8 f32s.
            let values = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
            offer(pack(values, index, u8::MAX));
            index += MAX_K as u32;
        }
        if !tail.is_empty() {
            let mut padded = [0.0f32; MAX_K];
            padded[..tail.len()].copy_from_slice(tail);
            // SAFETY: the padded copy holds 8 f32s.
            let values = unsafe { _mm256_loadu_ps(padded.as_ptr()) };
            offer(pack(values, index, ((1u16 << tail.len()) - 1) as u8));
        }
    }
    debug_assert!(candidates >= k, "{candidates} candidates for k = {k}");
    let mut packed = [0u64; MAX_K];
    // SAFETY: `packed` holds 8 u64s.
    unsafe { _mm512_storeu_si512(packed.as_mut_ptr().cast(), best) };
    for (id, &p) in ids.iter_mut().zip(&packed).take(k) {
        *id = !(p as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuKernel;
    use crate::kernel::Isa;
    use crate::kernel::testing::detect_or_report_skip;

    /// The AVX-512 token, or `None` (reported as a skip) on a CPU without AVX-512.
    fn token() -> Option<Avx512Bf16Token> {
        match detect_or_report_skip(CpuKernel::Avx512Bf16)? {
            Isa::Avx512Bf16(token) => Some(token),
            other => unreachable!("detection of avx512-bf16 gave {other}"),
        }
    }

    fn reference(runs: &[(&[f32], u32)], k: usize) -> Vec<u32> {
        let mut all: Vec<(f32, u32)> = runs
            .iter()
            .flat_map(|&(v, first)| v.iter().enumerate().map(move |(i, &x)| (x, first + i as u32)))
            .collect();
        all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        all.iter().take(k).map(|&(_, i)| i).collect()
    }

    fn run(token: Avx512Bf16Token, runs: &[(&[f32], u32)], k: usize) -> Vec<u32> {
        let mut ids = vec![0; k];
        // SAFETY: `token` proves that the CPU supports AVX-512F.
        unsafe { select(token, runs.iter().copied(), k, &mut ids) };
        ids
    }

    #[test]
    fn networks_sort_every_permutation_of_distinct_keys() {
        let Some(token) = token() else { return };
        // All 8! orders would be slow to list; rotations and reversals of several patterns cover
        // every lane position for every rank.
        let base: Vec<f32> = vec![0.5, -3.0, 7.25, 0.0, 1e-30, -1e30, 2.0, 3.0];
        for shift in 0..8 {
            for reversed in [false, true] {
                let mut v = base.clone();
                v.rotate_left(shift);
                if reversed {
                    v.reverse();
                }
                for k in 1..=8 {
                    assert_eq!(run(token, &[(&v, 0)], k), reference(&[(&v, 0)], k), "{v:?} k={k}");
                }
            }
        }
    }

    #[test]
    fn ties_negative_values_and_several_runs_follow_the_routing_order() {
        let Some(token) = token() else { return };
        let a: Vec<f32> = (0..37).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        let b: Vec<f32> = (0..20).map(|i| ((i * 3) % 4) as f32 * 0.5).collect();
        let c = [-0.0f32, 0.0, -1e-38, 1e-38, 2.0];
        let runs = [(&a[..], 0), (&b[..], 100), (&c[..], 300)];
        for k in 1..=8 {
            assert_eq!(run(token, &runs, k), reference(&runs, k), "k={k}");
        }
    }

    #[test]
    fn random_rows_match_a_full_sort() {
        let Some(token) = token() else { return };
        let mut state = 0x2545_f491_u32;
        for n in [8, 9, 15, 64, 130, 384] {
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    (state % 1000) as f32 / 100.0 - 5.0
                })
                .collect();
            for k in [1, 6, 8] {
                let runs = [(&values[..n / 2], 0u32), (&values[n / 2..], (n / 2) as u32)];
                assert_eq!(run(token, &runs, k), reference(&runs, k), "n={n} k={k}");
            }
        }
    }
}
