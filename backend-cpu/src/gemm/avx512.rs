//! AVX-512 microkernels: up to 6 tokens × 4 expert blocks of 16, 24 zmm accumulators.
//!
//! bf16 × bf16 uses `vdpbf16ps` (two exact bf16 products per lane, accumulated in f32); f32
//! hidden states use 512-bit FMA, widening bf16 weight pairs in registers, so they are never
//! rounded to bf16.

use super::{Geometry, Kind, TileFn};
use crate::kernel::Avx512Bf16Token;

pub(super) const GEOMETRY: Geometry = Geometry { mr: 6, nr: 4 };

/// The blocking per kind: f32 × bf16 keeps both widened halves of 4 blocks in registers (8) next
/// to 4 × 4 accumulators, so it takes 4 tokens; the others take 6.
pub(super) const fn geometry(kind: Kind) -> Geometry {
    match kind {
        Kind::F32Bf16 => Geometry { mr: 4, nr: 4 },
        Kind::Bf16Bf16 | Kind::F32F32 => GEOMETRY,
    }
}

/// The microkernel for `mr` tokens (`1..=6`) × `nr` blocks (`1..=4`), handed out only against the
/// token that proves the CPU runs it.
#[cfg(target_arch = "x86_64")]
pub(super) fn select(_: Avx512Bf16Token, kind: Kind, mr: usize, nr: usize) -> TileFn {
    use x86::*;
    macro_rules! by_mr_nr {
        ($kernel:ident) => {
            match (mr, nr) {
                (1, 1) => $kernel::<1, 1>,
                (1, 2) => $kernel::<1, 2>,
                (1, 3) => $kernel::<1, 3>,
                (1, _) => $kernel::<1, 4>,
                (2, 1) => $kernel::<2, 1>,
                (2, 2) => $kernel::<2, 2>,
                (2, 3) => $kernel::<2, 3>,
                (2, _) => $kernel::<2, 4>,
                (3, 1) => $kernel::<3, 1>,
                (3, 2) => $kernel::<3, 2>,
                (3, 3) => $kernel::<3, 3>,
                (3, _) => $kernel::<3, 4>,
                (4, 1) => $kernel::<4, 1>,
                (4, 2) => $kernel::<4, 2>,
                (4, 3) => $kernel::<4, 3>,
                (4, _) => $kernel::<4, 4>,
                (5, 1) => $kernel::<5, 1>,
                (5, 2) => $kernel::<5, 2>,
                (5, 3) => $kernel::<5, 3>,
                (5, _) => $kernel::<5, 4>,
                (_, 1) => $kernel::<6, 1>,
                (_, 2) => $kernel::<6, 2>,
                (_, 3) => $kernel::<6, 3>,
                (_, _) => $kernel::<6, 4>,
            }
        };
    }
    match kind {
        Kind::Bf16Bf16 => by_mr_nr!(bf16_bf16),
        Kind::F32Bf16 => by_mr_nr!(f32_bf16),
        Kind::F32F32 => by_mr_nr!(f32_f32),
    }
}

/// Without x86-64 detection never makes the token, so this is never called; it keeps the match in
/// `Isa::tile_fn` the same on every target.
#[cfg(not(target_arch = "x86_64"))]
pub(super) fn select(_: Avx512Bf16Token, kind: Kind, mr: usize, _nr: usize) -> TileFn {
    super::scalar::select(kind, mr.min(super::scalar::GEOMETRY.mr))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::Tile;

    /// The lanes of the tile's last block.
    fn last_mask(tile: &Tile) -> __mmask16 {
        (u32::MAX >> (32 - tile.width.min(16))) as __mmask16
    }

    /// Loads block `j`'s row of K step `step` (the last block through `mask`).
    ///
    /// # Safety
    ///
    /// The tile contract of [`Tile`], `j < NR`, `step < steps`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_row<const NR: usize>(
        tile: &Tile,
        j: usize,
        step: usize,
        mask: __mmask16,
    ) -> __m512i {
        let block = tile.panel.base.wrapping_add(j * tile.panel.block_stride);
        if j + 1 < NR {
            let row = block.wrapping_add(step * 16);
            // SAFETY: blocks before the last are full: 16 readable words per row.
            unsafe { _mm512_loadu_si512(row.cast()) }
        } else {
            let row = block.wrapping_add(step * tile.panel.row);
            // SAFETY: the mask enables only the block's `width` lanes, which are readable.
            unsafe { _mm512_maskz_loadu_epi32(mask, row.cast()) }
        }
    }

    /// Stores (or adds) the accumulators into the tile's logits.
    ///
    /// # Safety
    ///
    /// The tile contract of [`Tile`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const MR: usize, const NR: usize>(tile: &Tile, acc: &[[__m512; NR]; MR]) {
        let mask = last_mask(tile);
        for (i, acc) in acc.iter().enumerate() {
            for (j, &value) in acc.iter().enumerate() {
                let c = tile.c.wrapping_add(i * tile.c_stride + 16 * j);
                let lanes = if j + 1 < NR { 0xffff } else { mask };
                let value = if tile.accumulate {
                    // SAFETY: the tile owns the enabled lanes of this row.
                    _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(lanes, c) }, value)
                } else {
                    value
                };
                // SAFETY: the tile owns the enabled lanes of this row.
                unsafe { _mm512_mask_storeu_ps(c, lanes, value) };
            }
        }
    }

    /// bf16 hidden states × bf16 pairs through `vdpbf16ps`.
    ///
    /// # Safety
    ///
    /// The tile contract of [`Tile`] (bf16 hidden states, bf16 pair panel); the CPU supports
    /// AVX-512F and AVX-512 BF16 (what the token `select` takes proves).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn bf16_bf16<const MR: usize, const NR: usize>(tile: &Tile) {
        let mask = last_mask(tile);
        let x = tile.x.cast::<u16>();
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        for step in 0..tile.steps {
            let mut w = [_mm512_setzero_si512(); NR];
            for (j, w) in w.iter_mut().enumerate() {
                // SAFETY: `j < NR`, `step < steps`.
                *w = unsafe { load_row::<NR>(tile, j, step, mask) };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let pair = x.wrapping_add(i * tile.x_stride + 2 * step).cast::<u32>();
                // SAFETY: row `i < MR` holds `2 * steps` bf16 values; the pair is read unaligned.
                let pair = unsafe { pair.read_unaligned() };
                let xb = as_bh(_mm512_set1_epi32(pair as i32));
                for (acc, &w) in acc.iter_mut().zip(&w) {
                    *acc = _mm512_dpbf16_ps(*acc, as_bh(w), xb);
                }
            }
        }
        // SAFETY: forwarded tile contract.
        unsafe { store::<MR, NR>(tile, &acc) };
    }

    /// Reinterprets 32 bf16 bit patterns as a bf16 vector.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn as_bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 64-byte vectors for which every bit pattern is valid.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// f32 hidden states × bf16 pairs widened to f32 in registers.
    ///
    /// # Safety
    ///
    /// The tile contract of [`Tile`] (f32 hidden states, bf16 pair panel); the CPU supports
    /// AVX-512F (what the token `select` takes proves).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f32_bf16<const MR: usize, const NR: usize>(tile: &Tile) {
        let mask = last_mask(tile);
        let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
        let x = tile.x.cast::<f32>();
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        for step in 0..tile.steps {
            // Widen every block's pair row once: W[e, 2s] (low halves) and W[e, 2s + 1].
            let mut even = [_mm512_setzero_ps(); NR];
            let mut odd = [_mm512_setzero_ps(); NR];
            for j in 0..NR {
                // SAFETY: `j < NR`, `step < steps`.
                let words = unsafe { load_row::<NR>(tile, j, step, mask) };
                even[j] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(words));
                odd[j] = _mm512_castsi512_ps(_mm512_and_si512(words, high));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let xi = x.wrapping_add(i * tile.x_stride + 2 * step);
                // SAFETY: row `i < MR` holds `2 * steps` f32 hidden values.
                let x0 = _mm512_set1_ps(unsafe { xi.read_unaligned() });
                // SAFETY: as above, position `2 * step + 1 < 2 * steps`.
                let x1 = _mm512_set1_ps(unsafe { xi.wrapping_add(1).read_unaligned() });
                for j in 0..NR {
                    acc[j] = _mm512_fmadd_ps(even[j], x0, acc[j]);
                    acc[j] = _mm512_fmadd_ps(odd[j], x1, acc[j]);
                }
            }
        }
        // SAFETY: forwarded tile contract.
        unsafe { store::<MR, NR>(tile, &acc) };
    }

    /// f32 hidden states × f32 weights.
    ///
    /// # Safety
    ///
    /// The tile contract of [`Tile`] (f32 hidden states, f32 panel); the CPU supports AVX-512F
    /// (what the token `select` takes proves).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f32_f32<const MR: usize, const NR: usize>(tile: &Tile) {
        let mask = last_mask(tile);
        let x = tile.x.cast::<f32>();
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        for step in 0..tile.steps {
            let mut w = [_mm512_setzero_ps(); NR];
            for (j, w) in w.iter_mut().enumerate() {
                // SAFETY: `j < NR`, `step < steps`.
                *w = _mm512_castsi512_ps(unsafe { load_row::<NR>(tile, j, step, mask) });
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row `i < MR` holds `steps` f32 hidden values.
                let xi = _mm512_set1_ps(unsafe {
                    x.wrapping_add(i * tile.x_stride + step).read_unaligned()
                });
                for (acc, &w) in acc.iter_mut().zip(&w) {
                    *acc = _mm512_fmadd_ps(w, xi, *acc);
                }
            }
        }
        // SAFETY: forwarded tile contract.
        unsafe { store::<MR, NR>(tile, &acc) };
    }
}
