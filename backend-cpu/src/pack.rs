//! The router weight in the layout the GEMM kernels read: panels of 16 experts.
//!
//! Experts are grouped in blocks of [`LANES`] (the last block may be narrower). A block is stored
//! as `depth` rows, one per K step, each row holding one 32-bit word per expert of the block:
//!
//! - bf16 weights: a K step covers two hidden positions `2s, 2s + 1`; the word holds
//!   `W[e, 2s]` in its low half and `W[e, 2s + 1]` in its high half (zero past an odd `H`). This is
//!   the operand order of `vdpbf16ps`, and widening either half to f32 is one shift or one mask.
//! - f32 weights: a K step is one hidden position; the word is `W[e, s]`.
//!
//! Blocks follow each other, so a block's rows are contiguous (one 64-byte line per step for a
//! full block) and the kernels stream them with sequential loads. The same layout serves panels
//! packed once for a prepared router and panel pieces packed on the fly for a one-off GEMM.

use std::fmt;
use std::ops::Range;

use half::bf16;
use ndarray::ArrayView2;
use sluice_tensor::DType;

/// Experts per block: one 512-bit vector of f32 lanes.
pub(crate) const LANES: usize = 16;

/// A router weight `[E, H]` borrowed from its DLPack tensor.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WeightView<'a> {
    /// bf16 weight (what checkpoints store).
    Bf16(ArrayView2<'a, bf16>),
    /// f32 weight.
    F32(ArrayView2<'a, f32>),
}

/// How K steps relate to hidden positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightFormat {
    /// Two bf16 values per word, two hidden positions per step.
    Bf16Pairs,
    /// One f32 per word, one hidden position per step.
    F32,
}

impl WeightFormat {
    /// Hidden positions per K step.
    pub(crate) const fn positions_per_step(self) -> usize {
        match self {
            WeightFormat::Bf16Pairs => 2,
            WeightFormat::F32 => 1,
        }
    }

    /// K steps covering `hidden` positions.
    pub(crate) const fn steps(self, hidden: usize) -> usize {
        hidden.div_ceil(self.positions_per_step())
    }

    /// The dtype of the weight values packed in this format.
    const fn dtype(self) -> DType {
        match self {
            WeightFormat::Bf16Pairs => DType::BF16,
            WeightFormat::F32 => DType::F32,
        }
    }
}

impl WeightView<'_> {
    /// `(E, H)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        match self {
            WeightView::Bf16(w) => w.dim(),
            WeightView::F32(w) => w.dim(),
        }
    }

    /// Bytes per weight value in the checkpoint dtype.
    pub(crate) fn bytes_per_value(&self) -> usize {
        match self {
            WeightView::Bf16(_) => 2,
            WeightView::F32(_) => 4,
        }
    }

    /// The packed format of this weight.
    pub(crate) fn format(&self) -> WeightFormat {
        match self {
            WeightView::Bf16(_) => WeightFormat::Bf16Pairs,
            WeightView::F32(_) => WeightFormat::F32,
        }
    }

    /// Packs expert blocks `blocks` over K steps `steps` into `out`, block after block, each block
    /// `steps.len()` rows of its width. `out` must hold [`panel_words`] words.
    pub(crate) fn pack_panel(&self, blocks: Range<usize>, steps: Range<usize>, out: &mut [u32]) {
        let (experts, hidden) = self.dims();
        let depth = steps.len();
        let mut offset = 0;
        for block in blocks {
            let width = block_width(experts, block);
            let panel = &mut out[offset..offset + width * depth];
            offset += width * depth;
            for lane in 0..width {
                let expert = block * LANES + lane;
                let column = panel.iter_mut().skip(lane).step_by(width);
                match self {
                    WeightView::Bf16(w) => {
                        let row = w.row(expert);
                        let at = |h: usize| row.get(h).map_or(0, |v| u32::from(v.to_bits()));
                        match row.as_slice() {
                            Some(row) if 2 * steps.end <= hidden => {
                                let pairs = row[2 * steps.start..2 * steps.end].chunks_exact(2);
                                for (word, pair) in column.zip(pairs) {
                                    *word = u32::from(pair[0].to_bits())
                                        | (u32::from(pair[1].to_bits()) << 16);
                                }
                            }
                            _ => {
                                for (word, step) in column.zip(steps.clone()) {
                                    *word = at(2 * step) | (at(2 * step + 1) << 16);
                                }
                            }
                        }
                    }
                    WeightView::F32(w) => {
                        let row = w.row(expert);
                        for (word, step) in column.zip(steps.clone()) {
                            *word = row[step].to_bits();
                        }
                    }
                }
            }
        }
    }
}

/// Lanes of expert block `block` when there are `experts` experts.
pub(crate) const fn block_width(experts: usize, block: usize) -> usize {
    let first = block * LANES;
    if experts - first < LANES { experts - first } else { LANES }
}

/// Number of expert blocks for `experts` experts.
pub(crate) const fn block_count(experts: usize) -> usize {
    experts.div_ceil(LANES)
}

/// Words a panel of `blocks` over `depth` steps takes.
pub(crate) fn panel_words(experts: usize, blocks: Range<usize>, depth: usize) -> usize {
    blocks.map(|b| block_width(experts, b)).sum::<usize>() * depth
}

/// One cache line of packed words.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; LANES]);

/// A buffer of 32-bit words that starts on a cache line, so every full block row is one aligned
/// 64-byte load.
#[derive(Default)]
pub(crate) struct AlignedWords {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedWords {
    /// Makes the buffer hold `len` words (contents unspecified but initialised), reusing its
    /// allocation when it is large enough; an allocation failure is returned, not an abort.
    pub(crate) fn try_resize(
        &mut self,
        len: usize,
    ) -> Result<(), std::collections::TryReserveError> {
        let lines = len.div_ceil(LANES);
        if lines > self.lines.len() {
            self.lines.try_reserve_exact(lines - self.lines.len())?;
            self.lines.resize(lines, Line([0; LANES]));
        }
        self.len = len;
        Ok(())
    }

    /// Like [`AlignedWords::try_resize`], for small scratch panels whose size does not depend on
    /// the caller's input.
    pub(crate) fn resize(&mut self, len: usize) {
        let lines = len.div_ceil(LANES);
        if lines > self.lines.len() {
            self.lines.resize(lines, Line([0; LANES]));
        }
        self.len = len;
    }

    /// The words.
    pub(crate) fn as_slice(&self) -> &[u32] {
        // SAFETY: `Line` is `repr(C)` around `[u32; 16]` with size 64 = 16 * 4 (no padding), so
        // the vector's buffer is `lines.len() * 16` initialised, contiguous `u32`s, and
        // `len <= lines.len() * 16` by `resize`. The borrow of `self` keeps the buffer alive.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u32>(), self.len) }
    }

    /// The words, mutably.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u32] {
        // SAFETY: as in `as_slice`; the exclusive borrow of `self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u32>(), self.len) }
    }

    /// Bytes allocated.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.lines.capacity() * size_of::<Line>()
    }
}

/// A summary, not the words: a packed weight holds about a million of them.
impl fmt::Debug for AlignedWords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedWords")
            .field("words", &self.len)
            .field("bytes", &self.allocated_bytes())
            .finish()
    }
}

/// Where the kernels find a tile of consecutive expert blocks over a range of K steps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Panel {
    /// The first block's row for the first step.
    pub(crate) base: *const u32,
    /// Words from one block's row to the next block's row for the same step.
    pub(crate) block_stride: usize,
    /// Words from one step's row to the next within a block: the first block's width.
    pub(crate) row: usize,
}

/// A router weight packed once into panels; the form a prepared router keeps.
pub(crate) struct PackedWeight {
    experts: usize,
    hidden: usize,
    format: WeightFormat,
    words: AlignedWords,
}

impl PackedWeight {
    /// Packs a whole weight.
    pub(crate) fn pack(weight: WeightView<'_>) -> Result<Self, std::collections::TryReserveError> {
        let (experts, hidden) = weight.dims();
        let format = weight.format();
        let depth = format.steps(hidden);
        let blocks = 0..block_count(experts);
        let mut words = AlignedWords::default();
        words.try_resize(panel_words(experts, blocks.clone(), depth))?;
        weight.pack_panel(blocks, 0..depth, words.as_mut_slice());
        Ok(PackedWeight { experts, hidden, format, words })
    }

    /// `(E, H)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.experts, self.hidden)
    }

    /// The packed format.
    pub(crate) fn format(&self) -> WeightFormat {
        self.format
    }

    /// Bytes held by the packed copy.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.words.allocated_bytes()
    }

    /// The panel of the tile starting at block `first_block`, from K step `first_step` on.
    pub(crate) fn panel(&self, first_block: usize, first_step: usize) -> Panel {
        let depth = self.format.steps(self.hidden);
        let block_stride = LANES * depth;
        let row = block_width(self.experts, first_block);
        let offset = first_block * block_stride + first_step * row;
        let words = self.words.as_slice();
        debug_assert!(offset <= words.len());
        Panel { base: words.as_ptr().wrapping_add(offset), block_stride, row }
    }
}

/// Shape, dtype and size, not the packed words (about 917k words for one DeepSeek-V3 layer).
impl fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackedWeight")
            .field("shape", &[self.experts, self.hidden])
            .field("dtype", &format_args!("{}", self.format.dtype()))
            .field("bytes", &self.allocated_bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use ndarray::Array2;

    use super::*;

    fn weight(e: usize, h: usize) -> Array2<bf16> {
        Array2::from_shape_fn((e, h), |(e, h)| bf16::from_f32((e * 100 + h) as f32))
    }

    fn unpack_bf16(words: &[u32], experts: usize, hidden: usize) -> Array2<f32> {
        let depth = WeightFormat::Bf16Pairs.steps(hidden);
        let mut out = Array2::zeros((experts, hidden));
        let mut offset = 0;
        for block in 0..block_count(experts) {
            let width = block_width(experts, block);
            for step in 0..depth {
                for lane in 0..width {
                    let word = words[offset + step * width + lane];
                    for (half, h) in [(word & 0xffff, 2 * step), (word >> 16, 2 * step + 1)] {
                        let value = bf16::from_bits(half as u16).to_f32();
                        if h < hidden {
                            out[[block * LANES + lane, h]] = value;
                        } else {
                            assert_eq!(value, 0.0, "padding past an odd H must be zero");
                        }
                    }
                }
            }
            offset += width * depth;
        }
        assert_eq!(offset, words.len());
        out
    }

    #[test]
    fn bf16_packing_round_trips_with_odd_sizes() {
        for (e, h) in [(1, 1), (16, 2), (17, 5), (40, 33), (3, 64)] {
            let w = weight(e, h);
            let packed = PackedWeight::pack(WeightView::Bf16(w.view())).unwrap();
            let back = unpack_bf16(packed.words.as_slice(), e, h);
            assert_eq!(back, w.mapv(|v| v.to_f32()), "E={e} H={h}");
        }
    }

    #[test]
    fn strided_weights_pack_like_contiguous_ones() {
        let w = weight(20, 9);
        let transposed = w.t().as_standard_layout().into_owned();
        let strided = transposed.t();
        assert!(strided.as_slice().is_none());
        let a = PackedWeight::pack(WeightView::Bf16(w.view())).unwrap();
        let b = PackedWeight::pack(WeightView::Bf16(strided)).unwrap();
        assert_eq!(a.words.as_slice(), b.words.as_slice());
    }

    #[test]
    fn f32_packing_and_panels_address_the_right_words() {
        let w = Array2::from_shape_fn((35, 7), |(e, h)| (e * 10 + h) as f32);
        let packed = PackedWeight::pack(WeightView::F32(w.view())).unwrap();
        for (block, step) in [(0, 0), (1, 3), (2, 6)] {
            let panel = packed.panel(block, step);
            let width = block_width(35, block);
            assert_eq!(panel.row, width);
            for lane in 0..width {
                // SAFETY: the panel points into `packed`, which holds every block's rows.
                let word = unsafe { *panel.base.add(lane) };
                assert_eq!(f32::from_bits(word), w[[block * LANES + lane, step]]);
            }
        }
        let next = packed.panel(0, 2);
        // SAFETY: block 1 exists (35 experts), so one block stride further is inside the buffer.
        let word = unsafe { *next.base.add(next.block_stride) };
        assert_eq!(f32::from_bits(word), w[[16, 2]]);
    }

    #[test]
    fn a_partial_panel_matches_the_whole_packing() {
        let w = weight(40, 20);
        let view = WeightView::Bf16(w.view());
        let whole = PackedWeight::pack(view).unwrap();
        let mut piece = vec![0u32; panel_words(40, 1..3, 4)];
        view.pack_panel(1..3, 3..7, &mut piece);
        // Block 1, steps 3..7, full width.
        let panel = whole.panel(1, 3);
        for (i, &word) in piece[..4 * LANES].iter().enumerate() {
            // SAFETY: steps 3..7 of block 1 lie inside the whole packing.
            assert_eq!(unsafe { *panel.base.add(i) }, word);
        }
        // Block 2 is the narrow last block (8 experts).
        let panel = whole.panel(2, 3);
        assert_eq!(panel.row, 8);
        for (i, &word) in piece[4 * LANES..].iter().enumerate() {
            // SAFETY: steps 3..7 of block 2 lie inside the whole packing.
            assert_eq!(unsafe { *panel.base.add(i) }, word);
        }
    }

    #[test]
    fn packed_copy_is_the_size_of_the_checkpoint_tensor() {
        let w = weight(256, 7168 / 16);
        let packed = PackedWeight::pack(WeightView::Bf16(w.view())).unwrap();
        let checkpoint = 256 * (7168 / 16) * 2;
        assert!(packed.allocated_bytes() <= checkpoint + 64, "{}", packed.allocated_bytes());
    }
}
