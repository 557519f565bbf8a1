//! Portable microkernels: one expert block at a time, plain Rust the compiler may vectorise.

use super::{Geometry, Kind, Tile, TileFn};
use crate::pack::LANES;

pub(super) const GEOMETRY: Geometry = Geometry { mr: 4, nr: 1 };

/// The microkernel for `mr` tokens (`1..=GEOMETRY.mr`) and one block. bf16 hidden states are
/// staged as f32 for this family, so the bf16 dot kind never reaches it; it is served by the
/// f32 kernel over the same bf16 panel in case it does.
pub(super) fn select(kind: Kind, mr: usize) -> TileFn {
    match (kind, mr) {
        (Kind::F32F32, 1) => f32_f32::<1>,
        (Kind::F32F32, 2) => f32_f32::<2>,
        (Kind::F32F32, 3) => f32_f32::<3>,
        (Kind::F32F32, _) => f32_f32::<4>,
        (_, 1) => f32_bf16::<1>,
        (_, 2) => f32_bf16::<2>,
        (_, 3) => f32_bf16::<3>,
        (_, _) => f32_bf16::<4>,
    }
}

/// The rows of the tile's hidden states, `len` elements each.
///
/// # Safety
///
/// The tile contract of [`Tile`] with `len = steps * positions per step`.
unsafe fn x_rows<'a, const MR: usize>(tile: &Tile, len: usize) -> [&'a [f32]; MR] {
    let x = tile.x.cast::<f32>();
    std::array::from_fn(|i| {
        // SAFETY: row `i < MR` of the tile holds `len` readable f32s (tile contract).
        unsafe { std::slice::from_raw_parts(x.wrapping_add(i * tile.x_stride), len) }
    })
}

/// Stores (or adds) the accumulators into the tile's logits.
///
/// # Safety
///
/// The tile contract of [`Tile`] (one block of `width` lanes).
unsafe fn store<const MR: usize>(tile: &Tile, acc: &[[f32; LANES]; MR]) {
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: row `i < MR` of the tile's logits holds `width` f32s this call owns.
        let c = unsafe {
            std::slice::from_raw_parts_mut(tile.c.wrapping_add(i * tile.c_stride), tile.width)
        };
        for (c, &a) in c.iter_mut().zip(acc) {
            *c = if tile.accumulate { *c + a } else { a };
        }
    }
}

/// The panel row of K step `step`.
///
/// # Safety
///
/// The tile contract of [`Tile`], `step < steps`.
unsafe fn panel_row<'a>(tile: &Tile, step: usize) -> &'a [u32] {
    // SAFETY: the block has `steps` rows of `width` readable words, `row` words apart.
    unsafe {
        std::slice::from_raw_parts(tile.panel.base.wrapping_add(step * tile.panel.row), tile.width)
    }
}

/// f32 hidden states × bf16 pairs, widened exactly.
///
/// # Safety
///
/// The tile contract of [`Tile`] (f32 hidden states, bf16 pair panel, one block).
unsafe fn f32_bf16<const MR: usize>(tile: &Tile) {
    // SAFETY: forwarded tile contract; two hidden positions per step.
    let x = unsafe { x_rows::<MR>(tile, 2 * tile.steps) };
    let mut acc = [[0.0f32; LANES]; MR];
    for step in 0..tile.steps {
        // SAFETY: `step < steps`.
        let row = unsafe { panel_row(tile, step) };
        for (acc, x) in acc.iter_mut().zip(&x) {
            let (x0, x1) = (x[2 * step], x[2 * step + 1]);
            for (a, &word) in acc.iter_mut().zip(row) {
                *a += f32::from_bits(word << 16) * x0;
                *a += f32::from_bits(word & 0xffff_0000) * x1;
            }
        }
    }
    // SAFETY: forwarded tile contract.
    unsafe { store(tile, &acc) };
}

/// f32 hidden states × f32 weights.
///
/// # Safety
///
/// The tile contract of [`Tile`] (f32 hidden states, f32 panel, one block).
unsafe fn f32_f32<const MR: usize>(tile: &Tile) {
    // SAFETY: forwarded tile contract; one hidden position per step.
    let x = unsafe { x_rows::<MR>(tile, tile.steps) };
    let mut acc = [[0.0f32; LANES]; MR];
    for step in 0..tile.steps {
        // SAFETY: `step < steps`.
        let row = unsafe { panel_row(tile, step) };
        for (acc, x) in acc.iter_mut().zip(&x) {
            let x0 = x[step];
            for (a, &word) in acc.iter_mut().zip(row) {
                *a += f32::from_bits(word) * x0;
            }
        }
    }
    // SAFETY: forwarded tile contract.
    unsafe { store(tile, &acc) };
}
