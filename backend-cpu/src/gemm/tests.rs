use half::{bf16, f16};
use ndarray::{Array2, ArrayView2};

use super::*;
use crate::kernel::testing::family_tests;
use crate::pack::block_count;

/// Deterministic pseudo-random values in [-1, 1) with varied magnitudes.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * unit - 1.0) * if state & 3 == 0 { 8.0 } else { 1.0 }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum XType {
    F32,
    Bf16,
    F16,
}

struct Case {
    x: Array2<f32>,
    x_bf16: Array2<bf16>,
    x_f16: Array2<f16>,
    w_bf16: Array2<bf16>,
    w_f32: Array2<f32>,
}

impl Case {
    fn new(t: usize, e: usize, h: usize, seed: u64) -> Self {
        let x = Array2::from_shape_vec((t, h), values(t * h, seed)).unwrap();
        let w = Array2::from_shape_vec((e, h), values(e * h, seed + 1)).unwrap();
        Case {
            x_bf16: x.mapv(bf16::from_f32),
            x_f16: x.mapv(f16::from_f32),
            w_bf16: w.mapv(bf16::from_f32),
            w_f32: w,
            x,
        }
    }

    fn hidden(&self, xt: XType) -> Hidden<'_> {
        match xt {
            XType::F32 => Hidden::F32(self.x.view()),
            XType::Bf16 => Hidden::Bf16(self.x_bf16.view()),
            XType::F16 => Hidden::F16(self.x_f16.view()),
        }
    }

    fn x_f64(&self, xt: XType) -> Array2<f64> {
        match xt {
            XType::F32 => self.x.mapv(f64::from),
            XType::Bf16 => self.x_bf16.mapv(|v| f64::from(v.to_f32())),
            XType::F16 => self.x_f16.mapv(|v| f64::from(v.to_f32())),
        }
    }
}

/// Exact dot products and the bound on f32 accumulation error for each logit.
fn reference(x: &Array2<f64>, w: ArrayView2<'_, f64>) -> (Array2<f64>, Array2<f64>) {
    let (t, h) = x.dim();
    let e = w.nrows();
    let mut exact = Array2::zeros((t, e));
    let mut bound = Array2::zeros((t, e));
    for i in 0..t {
        for j in 0..e {
            let (mut sum, mut abs) = (0.0, 0.0);
            for k in 0..h {
                sum += x[[i, k]] * w[[j, k]];
                abs += (x[[i, k]] * w[[j, k]]).abs();
            }
            exact[[i, j]] = sum;
            bound[[i, j]] = (h as f64 + 4.0) * f64::from(f32::EPSILON) * abs + 1e-30;
        }
    }
    (exact, bound)
}

fn run_full(gemm: &Gemm<'_>, t: usize, e: usize) -> Array2<f32> {
    let mut out = Array2::from_elem((t, e), f32::NAN);
    let window = OutWindow { ptr: out.as_mut_ptr(), stride: e };
    // SAFETY: `out` is `t x e`, row stride `e`, owned here.
    unsafe { gemm.run(0..t, 0..block_count(e), window, &mut GemmScratch::default()) };
    out
}

fn check(got: &Array2<f32>, exact: &Array2<f64>, bound: &Array2<f64>, what: &str) {
    for ((idx, &g), (&x, &b)) in got.indexed_iter().zip(exact.iter().zip(bound)) {
        assert!(
            (f64::from(g) - x).abs() <= b,
            "{what}: logit {idx:?} = {g}, exact {x}, allowed error {b}"
        );
    }
}

family_tests!(
    every_dtype_matches_exact_dot_products,
    f32_inputs_are_not_rounded_to_bf16,
    sub_rectangles_write_only_their_window,
    strided_hidden_states_are_staged,
    empty_hidden_size_gives_zero_logits,
);

fn every_dtype_matches_exact_dot_products(isa: Isa) {
    // Odd sizes: H not a multiple of 32 (and odd), E not a multiple of 16 or of the tile, T odd
    // and larger than one register tile, K longer than one cache block.
    let shapes = [(1, 16, 64), (7, 40, 33), (13, 70, 300), (3, 5, 1), (6, 64, 2 * K_BLOCK + 6)];
    for &(t, e, h) in &shapes {
        let case = Case::new(t, e, h, (t * 1000 + e * 10 + h) as u64);
        for xt in [XType::F32, XType::Bf16, XType::F16] {
            let x = case.x_f64(xt);
            for w_bf16 in [true, false] {
                let (weights, w64) = if w_bf16 {
                    (
                        WeightView::Bf16(case.w_bf16.view()),
                        case.w_bf16.mapv(|v| f64::from(v.to_f32())),
                    )
                } else {
                    (WeightView::F32(case.w_f32.view()), case.w_f32.mapv(f64::from))
                };
                let (exact, bound) = reference(&x, w64.view());
                let packed = PackedWeight::pack(weights).unwrap();
                let what = format!("{isa} x={xt:?} w_bf16={w_bf16} T={t} E={e} H={h}");
                let gemm = Gemm::new(isa, case.hidden(xt), Weights::Packed(&packed));
                check(&run_full(&gemm, t, e), &exact, &bound, &format!("{what} packed"));
                let gemm = Gemm::new(isa, case.hidden(xt), Weights::Raw(weights));
                check(&run_full(&gemm, t, e), &exact, &bound, &format!("{what} raw"));
            }
        }
    }
}

fn f32_inputs_are_not_rounded_to_bf16(isa: Isa) {
    // x = 1 + 2^-20 is not a bf16 value; with a bf16 weight of 1 the logit must keep the low bits.
    let x = Array2::from_elem((1, 2), 1.0f32 + 2f32.powi(-20));
    let w = Array2::from_elem((1, 2), bf16::ONE);
    let packed = PackedWeight::pack(WeightView::Bf16(w.view())).unwrap();
    let gemm = Gemm::new(isa, Hidden::F32(x.view()), Weights::Packed(&packed));
    let out = run_full(&gemm, 1, 1);
    assert_eq!(out[[0, 0]], 2.0 + 2f32.powi(-19), "{isa}");
}

fn sub_rectangles_write_only_their_window(isa: Isa) {
    let (t, e, h) = (11, 70, 45);
    let case = Case::new(t, e, h, 7);
    let w64 = case.w_bf16.mapv(|v| f64::from(v.to_f32()));
    let (exact, bound) = reference(&case.x_f64(XType::Bf16), w64.view());
    let packed = PackedWeight::pack(WeightView::Bf16(case.w_bf16.view())).unwrap();
    let gemm = Gemm::new(isa, case.hidden(XType::Bf16), Weights::Packed(&packed));
    let mut out = Array2::from_elem((t, e), f32::NAN);
    let blocks = block_count(e);
    // Four rectangles: token halves x block halves.
    for tokens in [0..5, 5..t] {
        for part in [0..2, 2..blocks] {
            let offset = tokens.start * e + part.start * LANES;
            let window = OutWindow { ptr: out.as_mut_ptr().wrapping_add(offset), stride: e };
            // SAFETY: the rectangles are disjoint and inside `out`.
            unsafe { gemm.run(tokens.clone(), part, window, &mut GemmScratch::default()) };
        }
    }
    check(&out, &exact, &bound, &format!("{isa} rectangles"));
}

fn strided_hidden_states_are_staged(isa: Isa) {
    let (t, e, h) = (5, 20, 31);
    let case = Case::new(t, e, h, 3);
    let w64 = case.w_f32.mapv(f64::from);
    let packed = PackedWeight::pack(WeightView::F32(case.w_f32.view())).unwrap();
    // A column-major copy of x: rows are not contiguous.
    let x_t = case.x.t().as_standard_layout().into_owned();
    let x_strided = x_t.t();
    assert_eq!(x_strided.strides(), &[1, t as isize]);
    let (exact, bound) = reference(&case.x_f64(XType::F32), w64.view());
    let gemm = Gemm::new(isa, Hidden::F32(x_strided), Weights::Packed(&packed));
    check(&run_full(&gemm, t, e), &exact, &bound, &format!("{isa} strided"));
}

fn empty_hidden_size_gives_zero_logits(isa: Isa) {
    let x = Array2::<f32>::zeros((3, 0));
    let w = Array2::from_elem((20, 0), bf16::ZERO);
    let packed = PackedWeight::pack(WeightView::Bf16(w.view())).unwrap();
    let gemm = Gemm::new(isa, Hidden::F32(x.view()), Weights::Packed(&packed));
    assert!(run_full(&gemm, 3, 20).iter().all(|&v| v == 0.0), "{isa}");
}

#[test]
fn tiles_cover_blocks_with_the_narrow_block_alone() {
    let collect = |e, blocks, nr| tiles(e, blocks, nr).collect::<Vec<_>>();
    assert_eq!(collect(256, 0..16, 4), vec![(0, 4, 16), (4, 4, 16), (8, 4, 16), (12, 4, 16)]);
    assert_eq!(collect(70, 0..5, 4), vec![(0, 4, 16), (4, 1, 6)]);
    assert_eq!(collect(70, 2..5, 4), vec![(2, 2, 16), (4, 1, 6)]);
    assert_eq!(collect(5, 0..1, 4), vec![(0, 1, 5)]);
    assert_eq!(collect(48, 0..3, 1), vec![(0, 1, 16), (1, 1, 16), (2, 1, 16)]);
}
