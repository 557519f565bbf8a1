//! Scores of a row of logits: sigmoid, sqrt-softplus or softmax, computed in f64 and rounded once
//! to f32, as the reference does.
//!
//! The SIMD paths evaluate `exp` in f64 with a degree-13 polynomial after Cody-Waite range
//! reduction (error a few f64 ulps), and `ln(1 + e)` for `e` in `[0, 1]` as `2 atanh(e / (2 + e))`
//! with an odd series of 18 terms (argument at most 1/3, truncation below 1e-18), so the rounded
//! f32 scores equal the reference's except when the exact value lies within about 1e-15
//! (relative) of an f32 rounding boundary; the portable path calls the same `f64::exp` and
//! `f64::ln_1p` as the reference.

use crate::kernel::Isa;

/// The logistic function, computed in f64 and rounded once.
pub(super) fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-f64::from(x)).exp())) as f32
}

/// `out = sigmoid(logits)`.
pub(super) fn sigmoids(isa: Isa, logits: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.resize(logits.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `token` proves that the CPU supports AVX-512F.
        Isa::Avx512Bf16(token) => return unsafe { x86::sigmoids_avx512(token, logits, out) },
        // SAFETY: `token` proves that the CPU supports AVX2 and FMA.
        Isa::Avx2Fma(token) => return unsafe { x86::sigmoids_avx2(token, logits, out) },
        Isa::Scalar => {}
    }
    let _ = isa;
    out.iter_mut().zip(logits).for_each(|(s, &l)| *s = sigmoid(l));
}

/// `sqrt(ln(1 + e^x))`, computed in f64 as `sqrt(max(x, 0) + ln_1p(e^-|x|))` (no overflow for
/// large `x`, full precision for very negative `x`) and rounded once.
pub(super) fn sqrt_softplus(x: f32) -> f32 {
    let x = f64::from(x);
    (x.max(0.0) + (-x.abs()).exp().ln_1p()).sqrt() as f32
}

/// `out = sqrt(softplus(logits))`.
pub(super) fn sqrt_softpluses(isa: Isa, logits: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.resize(logits.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512Bf16(token) => {
            // SAFETY: `token` proves that the CPU supports AVX-512F.
            return unsafe { x86::sqrt_softpluses_avx512(token, logits, out) };
        }
        // SAFETY: `token` proves that the CPU supports AVX2 and FMA.
        Isa::Avx2Fma(token) => return unsafe { x86::sqrt_softpluses_avx2(token, logits, out) },
        Isa::Scalar => {}
    }
    let _ = isa;
    out.iter_mut().zip(logits).for_each(|(s, &l)| *s = sqrt_softplus(l));
}

/// `out = softmax(logits)`, with `exps` as f64 scratch.
pub(super) fn softmax(isa: Isa, logits: &[f32], exps: &mut Vec<f64>, out: &mut Vec<f32>) {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l)));
    exps.clear();
    exps.resize(logits.len(), 0.0);
    let simd = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `token` proves that the CPU supports AVX-512F.
        Isa::Avx512Bf16(token) => unsafe { x86::shifted_exps_avx512(token, logits, max, exps) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `token` proves that the CPU supports AVX2 and FMA.
        Isa::Avx2Fma(token) => unsafe { x86::shifted_exps_avx2(token, logits, max, exps) },
        _ => 0,
    };
    for (e, &l) in exps[simd..].iter_mut().zip(&logits[simd..]) {
        *e = (f64::from(l) - max).exp();
    }
    let sum: f64 = exps.iter().sum();
    out.clear();
    out.extend(exps.iter().map(|&e| (e / sum) as f32));
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{sigmoid, sqrt_softplus};
    use crate::kernel::{Avx2FmaToken, Avx512Bf16Token};

    /// `ln 2` split so that `n * LN2_HI` is exact for `|n| < 2^11` (the fdlibm constants).
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    /// `1/13!, 1/12!, ..., 1/1!, 1`: the Taylor polynomial of `e^r`, highest degree first.
    const TAYLOR: [f64; 14] = {
        let mut c = [0.0; 14];
        let mut k = 13;
        let mut factorial = 1.0;
        let mut i = 1;
        while i <= 13 {
            factorial *= i as f64;
            i += 1;
        }
        // c[0] = 1/13!, then multiply by k going down: 1/12! = 13 * 1/13!, ...
        c[0] = 1.0 / factorial;
        let mut j = 1;
        while j < 14 {
            c[j] = c[j - 1] * k as f64;
            k -= 1;
            j += 1;
        }
        c
    };
    /// `1/1, 1/3, ..., 1/35`, highest degree first: `atanh(s)/s` as a series in `s^2`.
    const ATANH_SERIES: [f64; 18] = {
        let mut c = [0.0; 18];
        let mut i = 0;
        while i < 18 {
            c[i] = 1.0 / (2 * (17 - i) + 1) as f64;
            i += 1;
        }
        c
    };
    /// Arguments are clamped here: `e^800` is infinite and `e^-800` zero in f64 either way.
    const CLAMP: f64 = 800.0;
    /// Softmax arguments below this give exponentials that vanish in the sum and round to 0 in
    /// f32; clamping keeps `2^n` normal for the AVX2 path.
    const SOFTMAX_FLOOR: f64 = -708.0;

    /// `e^x` for `x` in `[-800, 800]` (f64 lanes), via `scalef`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp_avx512(x: __m512d) -> __m512d {
        let n = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_pd(x, _mm512_set1_pd(std::f64::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_HI), x);
        let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_LO), r);
        let mut p = _mm512_set1_pd(TAYLOR[0]);
        for &c in &TAYLOR[1..] {
            p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(c));
        }
        _mm512_scalef_pd(p, n)
    }

    /// Loads 8 logits as f64.
    ///
    /// # Safety
    ///
    /// `ptr` addresses 8 readable f32s.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load8_avx512(ptr: *const f32) -> __m512d {
        // SAFETY: caller.
        _mm512_cvtps_pd(unsafe { _mm256_loadu_ps(ptr) })
    }

    /// Sigmoids of `logits` into `out` (same length), on a CPU the token proves has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) fn sigmoids_avx512(_: Avx512Bf16Token, logits: &[f32], out: &mut [f32]) {
        let one = _mm512_set1_pd(1.0);
        let (lo, hi) = (_mm512_set1_pd(-CLAMP), _mm512_set1_pd(CLAMP));
        let mut chunks = logits.chunks_exact(8).zip(out.chunks_exact_mut(8));
        for (l, s) in &mut chunks {
            // SAFETY: the chunk holds 8 f32s.
            let x = unsafe { load8_avx512(l.as_ptr()) };
            let e = exp_avx512(_mm512_min_pd(
                _mm512_max_pd(_mm512_sub_pd(_mm512_setzero_pd(), x), lo),
                hi,
            ));
            let v = _mm512_cvtpd_ps(_mm512_div_pd(one, _mm512_add_pd(one, e)));
            // SAFETY: the output chunk holds 8 f32s.
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) };
        }
        let done = logits.len() / 8 * 8;
        for (s, &l) in out[done..].iter_mut().zip(&logits[done..]) {
            *s = sigmoid(l);
        }
    }

    /// `ln(1 + e)` for `e` in `[0, 1]` (f64 lanes): `2 atanh(s)` with `s = e / (2 + e) <= 1/3`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn ln_1p_unit_avx512(e: __m512d) -> __m512d {
        let s = _mm512_div_pd(e, _mm512_add_pd(_mm512_set1_pd(2.0), e));
        let s2 = _mm512_mul_pd(s, s);
        let mut p = _mm512_set1_pd(ATANH_SERIES[0]);
        for &c in &ATANH_SERIES[1..] {
            p = _mm512_fmadd_pd(p, s2, _mm512_set1_pd(c));
        }
        _mm512_mul_pd(_mm512_add_pd(s, s), p)
    }

    /// Sqrt-softpluses of `logits` into `out` (same length), on a CPU the token proves has
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) fn sqrt_softpluses_avx512(_: Avx512Bf16Token, logits: &[f32], out: &mut [f32]) {
        let (zero, lo) = (_mm512_setzero_pd(), _mm512_set1_pd(-CLAMP));
        for (l, s) in logits.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
            // SAFETY: the chunk holds 8 f32s.
            let x = unsafe { load8_avx512(l.as_ptr()) };
            let e = exp_avx512(_mm512_max_pd(_mm512_sub_pd(zero, _mm512_abs_pd(x)), lo));
            let softplus = _mm512_add_pd(_mm512_max_pd(x, zero), ln_1p_unit_avx512(e));
            let v = _mm512_cvtpd_ps(_mm512_sqrt_pd(softplus));
            // SAFETY: the output chunk holds 8 f32s.
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) };
        }
        let done = logits.len() / 8 * 8;
        for (s, &l) in out[done..].iter_mut().zip(&logits[done..]) {
            *s = sqrt_softplus(l);
        }
    }

    /// `exps[i] = e^(logits[i] - max)` for the first multiple of 8 entries; returns how many. On a
    /// CPU the token proves has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) fn shifted_exps_avx512(
        _: Avx512Bf16Token,
        logits: &[f32],
        max: f64,
        exps: &mut [f64],
    ) -> usize {
        let (max, floor) = (_mm512_set1_pd(max), _mm512_set1_pd(SOFTMAX_FLOOR));
        for (l, e) in logits.chunks_exact(8).zip(exps.chunks_exact_mut(8)) {
            // SAFETY: the chunk holds 8 f32s.
            let x = _mm512_max_pd(_mm512_sub_pd(unsafe { load8_avx512(l.as_ptr()) }, max), floor);
            // SAFETY: the output chunk holds 8 f64s.
            unsafe { _mm512_storeu_pd(e.as_mut_ptr(), exp_avx512(x)) };
        }
        logits.len() / 8 * 8
    }

    /// `e^x` for `x` in `[-708, 709]` (f64 lanes), building `2^n` in the exponent bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp_avx2(x: __m256d) -> __m256d {
        let n = _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_pd(x, _mm256_set1_pd(std::f64::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_HI), x);
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_LO), r);
        let mut p = _mm256_set1_pd(TAYLOR[0]);
        for &c in &TAYLOR[1..] {
            p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c));
        }
        // n + 1.5 * 2^52 holds n in its low mantissa bits; add the bias and move it to the
        // exponent field: the bits of 2^n.
        let magic = _mm256_set1_pd(6_755_399_441_055_744.0);
        let bits = _mm256_sub_epi64(
            _mm256_castpd_si256(_mm256_add_pd(n, magic)),
            _mm256_castpd_si256(magic),
        );
        let scale = _mm256_slli_epi64::<52>(_mm256_add_epi64(bits, _mm256_set1_epi64x(1023)));
        _mm256_mul_pd(p, _mm256_castsi256_pd(scale))
    }

    /// Sigmoids of `logits` into `out` (same length), on a CPU the token proves has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sigmoids_avx2(_: Avx2FmaToken, logits: &[f32], out: &mut [f32]) {
        let one = _mm256_set1_pd(1.0);
        let (lo, hi) = (_mm256_set1_pd(SOFTMAX_FLOOR), _mm256_set1_pd(709.0));
        for (l, s) in logits.chunks_exact(4).zip(out.chunks_exact_mut(4)) {
            // SAFETY: the chunk holds 4 f32s.
            let x = _mm256_cvtps_pd(unsafe { _mm_loadu_ps(l.as_ptr()) });
            let minus_x =
                _mm256_min_pd(_mm256_max_pd(_mm256_sub_pd(_mm256_setzero_pd(), x), lo), hi);
            let v = _mm256_cvtpd_ps(_mm256_div_pd(one, _mm256_add_pd(one, exp_avx2(minus_x))));
            // SAFETY: the output chunk holds 4 f32s.
            unsafe { _mm_storeu_ps(s.as_mut_ptr(), v) };
        }
        let done = logits.len() / 4 * 4;
        for (s, &l) in out[done..].iter_mut().zip(&logits[done..]) {
            *s = sigmoid(l);
        }
    }

    /// Sqrt-softpluses of `logits` into `out` (same length), on a CPU the token proves has AVX2
    /// and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sqrt_softpluses_avx2(_: Avx2FmaToken, logits: &[f32], out: &mut [f32]) {
        let (zero, lo) = (_mm256_setzero_pd(), _mm256_set1_pd(SOFTMAX_FLOOR));
        let (two, sign) = (_mm256_set1_pd(2.0), _mm256_set1_pd(-0.0));
        for (l, s) in logits.chunks_exact(4).zip(out.chunks_exact_mut(4)) {
            // SAFETY: the chunk holds 4 f32s.
            let x = _mm256_cvtps_pd(unsafe { _mm_loadu_ps(l.as_ptr()) });
            // -|x|, floored where e^x is far below anything f32 keeps after the square root.
            let e = exp_avx2(_mm256_max_pd(_mm256_or_pd(x, sign), lo));
            let t = _mm256_div_pd(e, _mm256_add_pd(two, e));
            let t2 = _mm256_mul_pd(t, t);
            let mut p = _mm256_set1_pd(ATANH_SERIES[0]);
            for &c in &ATANH_SERIES[1..] {
                p = _mm256_fmadd_pd(p, t2, _mm256_set1_pd(c));
            }
            let ln_1p = _mm256_mul_pd(_mm256_add_pd(t, t), p);
            let softplus = _mm256_add_pd(_mm256_max_pd(x, zero), ln_1p);
            let v = _mm256_cvtpd_ps(_mm256_sqrt_pd(softplus));
            // SAFETY: the output chunk holds 4 f32s.
            unsafe { _mm_storeu_ps(s.as_mut_ptr(), v) };
        }
        let done = logits.len() / 4 * 4;
        for (s, &l) in out[done..].iter_mut().zip(&logits[done..]) {
            *s = sqrt_softplus(l);
        }
    }

    /// `exps[i] = e^(logits[i] - max)` for the first multiple of 4 entries; returns how many. On a
    /// CPU the token proves has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn shifted_exps_avx2(
        _: Avx2FmaToken,
        logits: &[f32],
        max: f64,
        exps: &mut [f64],
    ) -> usize {
        let (max, floor) = (_mm256_set1_pd(max), _mm256_set1_pd(SOFTMAX_FLOOR));
        for (l, e) in logits.chunks_exact(4).zip(exps.chunks_exact_mut(4)) {
            // SAFETY: the chunk holds 4 f32s.
            let x = _mm256_cvtps_pd(unsafe { _mm_loadu_ps(l.as_ptr()) });
            let x = _mm256_max_pd(_mm256_sub_pd(x, max), floor);
            // SAFETY: the output chunk holds 4 f64s.
            unsafe { _mm256_storeu_pd(e.as_mut_ptr(), exp_avx2(x)) };
        }
        logits.len() / 4 * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testing::family_tests;

    /// Logits from every range: tiny, ordinary, where sigmoid saturates in f32, huge.
    fn logits() -> Vec<f32> {
        let mut v = vec![0.0, -0.0, 1e-30, -1e-30, 17.0, 18.0, -87.0, -103.0, -104.0, -110.0];
        v.extend([-120.0, 120.0, 700.0, -700.0, -750.0, 800.0, f32::MAX, f32::MIN, 3e38, -3e38]);
        let mut state = 0x1234_5678_u32;
        for _ in 0..4000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let unit = state as f32 / u32::MAX as f32;
            v.push((unit - 0.5) * if state & 1 == 0 { 20.0 } else { 240.0 });
        }
        v
    }

    fn sigmoids_round_like_the_f64_reference(isa: Isa) {
        let logits = logits();
        let mut out = Vec::new();
        sigmoids(isa, &logits, &mut out);
        for (&l, &s) in logits.iter().zip(&out) {
            assert_eq!(s.to_bits(), sigmoid(l).to_bits(), "{isa}: sigmoid({l}) = {s}");
        }
    }

    fn sqrt_softpluses_round_like_the_f64_reference(isa: Isa) {
        let logits = logits();
        let mut out = Vec::new();
        sqrt_softpluses(isa, &logits, &mut out);
        for (&l, &s) in logits.iter().zip(&out) {
            let expected = sqrt_softplus(l);
            assert_eq!(s.to_bits(), expected.to_bits(), "{isa}: sqrtsoftplus({l}) = {s}");
        }
    }

    #[test]
    fn sqrt_softplus_keeps_precision_at_both_ends() {
        // Large logits: softplus(x) = x, no overflow through e^x.
        assert_eq!(sqrt_softplus(1e30), 1e15);
        assert_eq!(sqrt_softplus(f32::MAX), (f64::from(f32::MAX)).sqrt() as f32);
        // Very negative logits: softplus(x) = e^x to f64 precision, so the score is e^(x/2), a
        // normal f32 down to x = -174, where an f32 ln(1 + e^x) would already be zero.
        for x in [-30.0f32, -90.0, -120.0, -170.0] {
            let expected = (f64::from(x) / 2.0).exp();
            let got = f64::from(sqrt_softplus(x));
            assert!((got - expected).abs() <= 1e-7 * expected, "{x}: {got} vs {expected}");
        }
        assert_eq!(sqrt_softplus(-1000.0), 0.0);
        assert_eq!(sqrt_softplus(0.0), (2f64.ln().sqrt()) as f32);
    }

    fn softmax_rounds_like_the_f64_reference(isa: Isa) {
        let logits = logits();
        for row in logits.chunks(37) {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l)));
            let exps: Vec<f64> = row.iter().map(|&l| (f64::from(l) - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            let expected: Vec<f32> = exps.iter().map(|&e| (e / sum) as f32).collect();
            let mut out = Vec::new();
            softmax(isa, row, &mut Vec::new(), &mut out);
            assert_eq!(out, expected, "{isa}");
        }
    }

    family_tests!(
        sigmoids_round_like_the_f64_reference,
        sqrt_softpluses_round_like_the_f64_reference,
        softmax_rounds_like_the_f64_reference
    );
}
