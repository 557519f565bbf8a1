//! AVX2 + FMA microkernels: up to 4 tokens × one 16-expert block (two 8-lane halves), 8
//! accumulators. bf16 weights are widened to f32 in registers (a shift or a mask per pair word).

use super::{Geometry, Kind, TileFn};
use crate::kernel::Avx2FmaToken;

pub(super) const GEOMETRY: Geometry = Geometry { mr: 4, nr: 1 };

/// The microkernel for `mr` tokens (`1..=GEOMETRY.mr`) and one block, full (`full`) or narrower,
/// handed out only against the token that proves the CPU runs it. bf16 hidden states are staged
/// as f32 for this family (see `Gemm::new`).
#[cfg(target_arch = "x86_64")]
pub(super) fn select(_: Avx2FmaToken, kind: Kind, mr: usize, full: bool) -> TileFn {
    use x86::*;
    macro_rules! by_mr {
        ($kernel:ident, $full:literal) => {
            match mr {
                1 => $kernel::<1, $full>,
                2 => $kernel::<2, $full>,
                3 => $kernel::<3, $full>,
                _ => $kernel::<4, $full>,
            }
        };
    }
    match (kind, full) {
        (Kind::F32F32, true) => by_mr!(f32_f32, true),
        (Kind::F32F32, false) => by_mr!(f32_f32, false),
        (_, true) => by_mr!(f32_bf16, true),
        (_, false) => by_mr!(f32_bf16, false),
    }
}

/// Without x86-64 detection never makes the token, so this is never called; it keeps the match in
/// `Isa::tile_fn` the same on every target.
#[cfg(not(target_arch = "x86_64"))]
pub(super) fn select(_: Avx2FmaToken, kind: Kind, mr: usize, _full: bool) -> TileFn {
    super::scalar::select(kind, mr)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::Tile;

    /// Load masks for the two halves of a block with `width` lanes.
    #[target_feature(enable = "avx2,fma")]
    fn half_masks(width: usize) -> [__m256i; 2] {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let width = width as i32;
        [
            _mm256_cmpgt_epi32(_mm256_set1_epi32(width), lanes),
            _mm256_cmpgt_epi32(_mm256_set1_epi32(width - 8), lanes),
        ]
    }

    /// Loads the 8 words of half `h` of a panel row.
    ///
    /// # Safety
    ///
    /// `row` addresses a panel row of the tile (16 readable words if `FULL`, else the lanes
    /// enabled in `masks`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_half<const FULL: bool>(
        row: *const u32,
        h: usize,
        masks: &[__m256i; 2],
    ) -> __m256i {
        let ptr = row.wrapping_add(8 * h).cast::<i32>();
        if FULL {
            // SAFETY: a full block row has 16 readable words (caller).
            unsafe { _mm256_loadu_si256(ptr.cast()) }
        } else {
            // SAFETY: only the lanes enabled by the mask, which lie inside the row, are read.
            unsafe { _mm256_maskload_epi32(ptr, masks[h]) }
        }
    }

    /// Stores (or adds) the accumulators into the tile's logits.
    ///
    /// # Safety
    ///
    /// The tile contract of [`Tile`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store<const MR: usize, const FULL: bool>(tile: &Tile, acc: &[[__m256; 2]; MR]) {
        let masks = half_masks(tile.width);
        for (i, acc) in acc.iter().enumerate() {
            for (h, &value) in acc.iter().enumerate() {
                let c = tile.c.wrapping_add(i * tile.c_stride + 8 * h);
                let value = if tile.accumulate {
                    let old = if FULL {
                        // SAFETY: the tile owns 16 logits per row of a full block.
                        unsafe { _mm256_loadu_ps(c) }
                    } else {
                        // SAFETY: only the tile's `width` lanes are read.
                        unsafe { _mm256_maskload_ps(c, masks[h]) }
                    };
                    _mm256_add_ps(old, value)
                } else {
                    value
                };
                if FULL {
                    // SAFETY: the tile owns 16 logits per row of a full block.
                    unsafe { _mm256_storeu_ps(c, value) };
                } else {
                    // SAFETY: only the tile's `width` lanes are written.
                    unsafe { _mm256_maskstore_ps(c, masks[h], value) };
                }
            }
        }
    }

    /// Broadcasts the f32 hidden value at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` is readable (tile contract).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn broadcast(ptr: *const f32) -> __m256 {
        // SAFETY: caller.
        _mm256_set1_ps(unsafe { ptr.read_unaligned() })
    }

    /// f32 hidden states × bf16 pairs.
    ///
    /// # Safety
    ///
    /// The tile contract of [`Tile`] (f32 hidden states, bf16 pair panel, one block); the CPU
    /// supports AVX2 and FMA (what the token `select` takes proves).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn f32_bf16<const MR: usize, const FULL: bool>(tile: &Tile) {
        let masks = half_masks(tile.width);
        let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        let x = tile.x.cast::<f32>();
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        // With one or two tokens the FMA latency, not throughput, would bound the loop: the odd
        // products then get their own accumulators (unused, and optimised away, otherwise).
        let mut acc_odd = [[_mm256_setzero_ps(); 2]; MR];
        for step in 0..tile.steps {
            let row = tile.panel.base.wrapping_add(step * tile.panel.row);
            for h in 0..2 {
                // SAFETY: `row` is row `step < steps` of the tile's block.
                let words = unsafe { load_half::<FULL>(row, h, &masks) };
                let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(words));
                let odd = _mm256_castsi256_ps(_mm256_and_si256(words, high));
                for i in 0..MR {
                    let xi = x.wrapping_add(i * tile.x_stride + 2 * step);
                    // SAFETY: row `i < MR` holds `2 * steps` hidden values.
                    let x0 = unsafe { broadcast(xi) };
                    // SAFETY: as above, position `2 * step + 1 < 2 * steps`.
                    let x1 = unsafe { broadcast(xi.wrapping_add(1)) };
                    acc[i][h] = _mm256_fmadd_ps(even, x0, acc[i][h]);
                    if MR <= 2 {
                        acc_odd[i][h] = _mm256_fmadd_ps(odd, x1, acc_odd[i][h]);
                    } else {
                        acc[i][h] = _mm256_fmadd_ps(odd, x1, acc[i][h]);
                    }
                }
            }
        }
        if MR <= 2 {
            merge(&mut acc, &acc_odd);
        }
        // SAFETY: forwarded tile contract.
        unsafe { store::<MR, FULL>(tile, &acc) };
    }

    /// Adds a second set of accumulators into the first.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn merge<const MR: usize>(acc: &mut [[__m256; 2]; MR], other: &[[__m256; 2]; MR]) {
        for (acc, other) in acc.iter_mut().zip(other) {
            for (a, &o) in acc.iter_mut().zip(other) {
                *a = _mm256_add_ps(*a, o);
            }
        }
    }

    /// f32 hidden states × f32 weights.
    ///
    /// # Safety
    ///
    /// The tile contract of [`Tile`] (f32 hidden states, f32 panel, one block); the CPU supports
    /// AVX2 and FMA (what the token `select` takes proves).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn f32_f32<const MR: usize, const FULL: bool>(tile: &Tile) {
        let masks = half_masks(tile.width);
        let x = tile.x.cast::<f32>();
        let accumulate = |acc: &mut [[__m256; 2]; MR], step: usize| {
            let row = tile.panel.base.wrapping_add(step * tile.panel.row);
            // SAFETY: `row` is row `step < steps` of the tile's block.
            let low = unsafe { load_half::<FULL>(row, 0, &masks) };
            // SAFETY: as above.
            let high = unsafe { load_half::<FULL>(row, 1, &masks) };
            let w = [_mm256_castsi256_ps(low), _mm256_castsi256_ps(high)];
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row `i < MR` holds `steps` hidden values.
                let xi = unsafe { broadcast(x.wrapping_add(i * tile.x_stride + step)) };
                acc[0] = _mm256_fmadd_ps(w[0], xi, acc[0]);
                acc[1] = _mm256_fmadd_ps(w[1], xi, acc[1]);
            }
        };
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        // With one or two tokens, odd steps go to a second set of accumulators so that two FMA
        // chains per register run in parallel.
        let paired = if MR <= 2 { tile.steps / 2 } else { 0 };
        let mut acc_odd = [[_mm256_setzero_ps(); 2]; MR];
        for pair in 0..paired {
            accumulate(&mut acc, 2 * pair);
            accumulate(&mut acc_odd, 2 * pair + 1);
        }
        for step in 2 * paired..tile.steps {
            accumulate(&mut acc, step);
        }
        if MR <= 2 {
            merge(&mut acc, &acc_odd);
        }
        // SAFETY: forwarded tile contract.
        unsafe { store::<MR, FULL>(tile, &acc) };
    }
}
