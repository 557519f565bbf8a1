//! The router GEMM `logits[T, E] = x[T, H] · W[E, H]ᵀ` over packed weight panels.
//!
//! [`Gemm::run`] computes one rectangle of the logits (a token range × a range of expert blocks);
//! the callers in [`crate::engine`] hand rectangles to threads. Inside a rectangle the loops are
//! blocked for the caches: for each K block of [`K_BLOCK`] steps, the hidden states of the
//! rectangle's tokens for that K block are staged once if needed, then every tile of `MR` tokens ×
//! `NR` expert blocks runs one register-blocked microkernel that adds its partial dot products
//! into the logits. A tile's weight panel (up to 128 KiB) stays in L2 across the token tiles, and
//! a token tile's hidden values (12 KiB of bf16) stay in L1 across the expert tiles.

mod avx2;
mod avx512;
mod scalar;

use std::ops::Range;

use half::{bf16, f16, slice::HalfFloatSliceExt};
use ndarray::ArrayView2;

use crate::input::Hidden;
use crate::kernel::Isa;
use crate::pack::{
    AlignedWords, LANES, PackedWeight, Panel, WeightFormat, WeightView, block_width, panel_words,
};

/// K steps per cache block: 512 rows of 64 bytes = 32 KiB per expert block. Measured against 128,
/// 256 and 1024 (bf16, one thread): 4-7% faster than 128 at T = 64-512, equal to 1024.
pub(crate) const K_BLOCK: usize = 512;

/// The element type and pairing a microkernel multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// bf16 hidden states against bf16 pairs: `vdpbf16ps`.
    Bf16Bf16,
    /// f32 hidden states against bf16 pairs widened to f32 in registers.
    F32Bf16,
    /// f32 hidden states against f32 weights.
    F32F32,
}

impl Kind {
    /// Whether the microkernel reads the hidden states as bf16 (else f32).
    const fn reads_bf16(self) -> bool {
        matches!(self, Kind::Bf16Bf16)
    }
}

/// Everything a microkernel needs for one tile of `MR` tokens × `NR` expert blocks.
///
/// The microkernels' safety contract: `x` points at `MR` rows (`x_stride` elements apart) of at
/// least `steps * positions_per_step` readable elements of the kind's x type; `panel` addresses
/// `NR` blocks of `steps` readable rows (the last block `width` lanes wide, the others 16);
/// `c` points at `MR` rows (`c_stride` apart) of `16 * (NR - 1) + width` f32s that nobody else
/// accesses during the call. A SIMD microkernel also needs its instructions, which the token its
/// family's `select` takes proves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tile {
    pub(crate) x: *const u8,
    pub(crate) x_stride: usize,
    pub(crate) panel: Panel,
    pub(crate) steps: usize,
    pub(crate) width: usize,
    pub(crate) c: *mut f32,
    pub(crate) c_stride: usize,
    /// Add to the logits already in `c` (later K blocks) instead of overwriting them.
    pub(crate) accumulate: bool,
}

/// A microkernel for one `(kind, MR, NR)`.
pub(crate) type TileFn = unsafe fn(&Tile);

/// Register blocking of a kernel family: at most `mr` tokens × `nr` expert blocks per tile.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) mr: usize,
    pub(crate) nr: usize,
}

impl Isa {
    /// The largest register blocking of this family (the work split rounds to it).
    pub(crate) fn geometry(self) -> Geometry {
        match self {
            Isa::Avx512Bf16(_) => avx512::GEOMETRY,
            Isa::Avx2Fma(_) => avx2::GEOMETRY,
            Isa::Scalar => scalar::GEOMETRY,
        }
    }

    /// The register blocking of this family's microkernel for `kind`.
    fn tile_geometry(self, kind: Kind) -> Geometry {
        match self {
            Isa::Avx512Bf16(_) => avx512::geometry(kind),
            _ => self.geometry(),
        }
    }

    /// The microkernel for a tile of `mr` tokens × `nr` blocks whose last block has `width`
    /// lanes (`mr`, `nr` within the geometry). A SIMD family's microkernels are handed out only
    /// against its token, so the one returned runs on this CPU.
    fn tile_fn(self, kind: Kind, mr: usize, nr: usize, width: usize) -> TileFn {
        match self {
            Isa::Avx512Bf16(token) => avx512::select(token, kind, mr, nr),
            Isa::Avx2Fma(token) => avx2::select(token, kind, mr, width == LANES),
            Isa::Scalar => scalar::select(kind, mr),
        }
    }
}

/// Where the weight comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Weights<'a> {
    /// Packed once (a prepared router).
    Packed(&'a PackedWeight),
    /// A one-off call: each panel is packed on the fly into per-thread scratch, the way a BLAS
    /// GEMM packs its operands.
    Raw(WeightView<'a>),
}

/// Per-thread buffers of the GEMM, reused across calls.
#[derive(Debug, Default)]
pub(crate) struct GemmScratch {
    x_f32: Vec<f32>,
    x_bf16: Vec<u16>,
    panel: AlignedWords,
}

/// A rectangle of the logits that one thread owns while it runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutWindow {
    /// The logit of the rectangle's first token and first expert.
    pub(crate) ptr: *mut f32,
    /// f32s between consecutive tokens.
    pub(crate) stride: usize,
}

/// One router GEMM: hidden states, a weight, and the kernel family to run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gemm<'a> {
    isa: Isa,
    kind: Kind,
    hidden: Hidden<'a>,
    weights: Weights<'a>,
    experts: usize,
    format: WeightFormat,
}

impl<'a> Gemm<'a> {
    /// Plans the GEMM; the shapes must agree (`H` of both).
    pub(crate) fn new(isa: Isa, hidden: Hidden<'a>, weights: Weights<'a>) -> Self {
        let ((experts, _), format) = match weights {
            Weights::Packed(packed) => (packed.dims(), packed.format()),
            Weights::Raw(view) => (view.dims(), view.format()),
        };
        let kind = match (format, hidden) {
            (WeightFormat::F32, _) => Kind::F32F32,
            (WeightFormat::Bf16Pairs, Hidden::Bf16(_)) if matches!(isa, Isa::Avx512Bf16(_)) => {
                Kind::Bf16Bf16
            }
            (WeightFormat::Bf16Pairs, _) => Kind::F32Bf16,
        };
        Gemm { isa, kind, hidden, weights, experts, format }
    }

    /// `(T, H)`.
    pub(crate) fn hidden_dims(&self) -> (usize, usize) {
        self.hidden.dims()
    }

    /// Number of experts `E`.
    pub(crate) fn experts(&self) -> usize {
        self.experts
    }

    /// Computes the logits of `tokens` × expert blocks `blocks` into `out`.
    ///
    /// # Safety
    ///
    /// `out.ptr` must address `tokens.len()` rows, `out.stride` f32s apart, of the columns of
    /// `blocks` (relative to the first block), and nothing else may access them during the call.
    /// `tokens` must lie within `T` and `blocks` within the weight's blocks.
    pub(crate) unsafe fn run(
        &self,
        tokens: Range<usize>,
        blocks: Range<usize>,
        out: OutWindow,
        scratch: &mut GemmScratch,
    ) {
        let (_, hidden) = self.hidden.dims();
        let depth = self.format.steps(hidden);
        let geometry = self.isa.tile_geometry(self.kind);
        let k_blocks = depth.div_ceil(K_BLOCK).max(1);
        for k_block in 0..k_blocks {
            let steps = k_block * K_BLOCK..((k_block + 1) * K_BLOCK).min(depth);
            let GemmScratch { x_f32, x_bf16, panel: panel_scratch } = &mut *scratch;
            let staged = self.stage(tokens.clone(), steps.clone(), x_f32, x_bf16);
            for (first, nr, width) in tiles(self.experts, blocks.clone(), geometry.nr) {
                let panel = match self.weights {
                    Weights::Packed(packed) => packed.panel(first, steps.start),
                    Weights::Raw(view) => {
                        let words = panel_words(self.experts, first..first + nr, steps.len());
                        panel_scratch.resize(words);
                        view.pack_panel(
                            first..first + nr,
                            steps.clone(),
                            panel_scratch.as_mut_slice(),
                        );
                        Panel {
                            base: panel_scratch.as_slice().as_ptr(),
                            block_stride: LANES * steps.len(),
                            row: block_width(self.experts, first),
                        }
                    }
                };
                let column = (first - blocks.start) * LANES;
                for row in tokens.clone().step_by(geometry.mr) {
                    let mr = geometry.mr.min(tokens.end - row);
                    let local = row - tokens.start;
                    let tile = Tile {
                        x: staged.ptr.wrapping_add(local * staged.stride * staged.elem_bytes),
                        x_stride: staged.stride,
                        panel,
                        steps: steps.len(),
                        width,
                        c: out.ptr.wrapping_add(local * out.stride + column),
                        c_stride: out.stride,
                        accumulate: k_block > 0,
                    };
                    let kernel = self.isa.tile_fn(self.kind, mr, nr, width);
                    // SAFETY: the microkernel is of `self.isa`'s family, whose token proves that
                    // the CPU has its instructions. `staged` holds rows `tokens` of the hidden
                    // states over `steps` (in place or copied), `panel` holds blocks
                    // `first..first + nr` over `steps`, and the caller owns `out` for these
                    // tokens and blocks; see `Tile`.
                    unsafe { kernel(&tile) };
                }
            }
        }
    }

    /// The hidden states of `tokens` over K steps `steps`, in place when the kernel can read them
    /// as they are, else converted or copied into scratch.
    fn stage(
        &self,
        tokens: Range<usize>,
        steps: Range<usize>,
        x_f32: &mut Vec<f32>,
        x_bf16: &mut Vec<u16>,
    ) -> Staged {
        let per_step = self.format.positions_per_step();
        let (_, hidden) = self.hidden.dims();
        let columns = steps.start * per_step..steps.end * per_step;
        let in_place = columns.end <= hidden;
        // `Gemm::new` chooses the bf16 microkernel for bf16 hidden states only.
        match (self.hidden, self.kind.reads_bf16()) {
            (Hidden::Bf16(x), true) => match in_place_rows(&x, tokens.start, columns.start) {
                Some((ptr, stride)) if in_place => Staged::new(ptr, stride),
                _ => {
                    stage_rows(&x, tokens, columns, hidden, x_bf16, |v: &[bf16], out| {
                        out.iter_mut().zip(v).for_each(|(o, v)| *o = v.to_bits());
                    });
                    Staged::new(x_bf16.as_ptr(), columns_len(&steps, per_step))
                }
            },
            (Hidden::F32(x), _) => match in_place_rows(&x, tokens.start, columns.start) {
                Some((ptr, stride)) if in_place => Staged::new(ptr, stride),
                _ => {
                    stage_rows(&x, tokens, columns, hidden, x_f32, |v, out| out.copy_from_slice(v));
                    Staged::new(x_f32.as_ptr(), columns_len(&steps, per_step))
                }
            },
            (Hidden::Bf16(x), false) => {
                stage_rows(&x, tokens, columns, hidden, x_f32, |v: &[bf16], out| {
                    v.convert_to_f32_slice(out);
                });
                Staged::new(x_f32.as_ptr(), columns_len(&steps, per_step))
            }
            (Hidden::F16(x), _) => {
                stage_rows(&x, tokens, columns, hidden, x_f32, |v: &[f16], out| {
                    v.convert_to_f32_slice(out);
                });
                Staged::new(x_f32.as_ptr(), columns_len(&steps, per_step))
            }
        }
    }
}

/// Hidden-state rows as the microkernel reads them.
struct Staged {
    ptr: *const u8,
    /// Elements between rows.
    stride: usize,
    elem_bytes: usize,
}

impl Staged {
    fn new<T>(ptr: *const T, stride: usize) -> Self {
        Staged { ptr: ptr.cast(), stride, elem_bytes: size_of::<T>() }
    }
}

fn columns_len(steps: &Range<usize>, per_step: usize) -> usize {
    steps.len() * per_step
}

/// The address of `x[row, column]` and the row stride, if rows are contiguous (unit column
/// stride).
fn in_place_rows<T>(x: &ArrayView2<'_, T>, row: usize, column: usize) -> Option<(*const T, usize)> {
    let [row_stride, column_stride] = [x.strides()[0], x.strides()[1]];
    let (rows, columns) = x.dim();
    if column_stride != 1 && columns > 1 {
        return None;
    }
    let row_stride = usize::try_from(row_stride).ok()?;
    if rows == 0 {
        return Some((x.as_ptr(), row_stride));
    }
    Some((x.as_ptr().wrapping_add(row * row_stride + column), row_stride))
}

/// Copies `x[tokens, columns]` into `out` row after row (`columns.len()` elements per row),
/// converting with `convert` and writing zeros past the last hidden position.
fn stage_rows<T: Copy, U: Copy + Default>(
    x: &ArrayView2<'_, T>,
    tokens: Range<usize>,
    columns: Range<usize>,
    hidden: usize,
    out: &mut Vec<U>,
    convert: impl Fn(&[T], &mut [U]),
) {
    let width = columns.len();
    out.clear();
    out.resize(tokens.len() * width, U::default());
    let real = columns.start.min(hidden)..columns.end.min(hidden);
    let mut gathered = Vec::new();
    for (token, dst) in tokens.zip(out.chunks_exact_mut(width.max(1))) {
        let row = x.row(token);
        let segment = row.slice(ndarray::s![real.clone()]);
        let dst = &mut dst[..real.len()];
        match segment.as_slice() {
            Some(src) => convert(src, dst),
            None => {
                gathered.clear();
                gathered.extend(segment.iter().copied());
                convert(&gathered, dst);
            }
        }
    }
}

/// The tiles of `blocks`: runs of up to `nr` full blocks, and the narrow last block alone.
/// Yields `(first block, blocks in the tile, lanes of its last block)`.
fn tiles(
    experts: usize,
    blocks: Range<usize>,
    nr: usize,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let mut next = blocks.start;
    std::iter::from_fn(move || {
        if next >= blocks.end {
            return None;
        }
        let first = next;
        let width = block_width(experts, first);
        if width < LANES {
            next += 1;
            return Some((first, 1, width));
        }
        let full = (first..blocks.end).take(nr).take_while(|&b| block_width(experts, b) == LANES);
        let count = full.count();
        next += count;
        Some((first, count, LANES))
    })
}

#[cfg(test)]
mod tests;
