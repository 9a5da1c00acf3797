//! The encoder's element-wise arithmetic on `f32` rows: `exp`, the erf form
//! of GELU, LayerNorm with a fused residual add, and softmax.
//!
//! Written once, generic over [`Arith`], branch-free and in fixed lane order
//! so that LLVM vectorises it under each variant's target features and the
//! variants produce the same bits (see [`super::isa`] for the one exception). Sums over a row run
//! in 16 lanes folded pairwise, never in an order that depends on the
//! vector width.
//!
//! Accuracy (checked by the tests below against `f64` references):
//! `exp` within 1e-7 relative on the range softmax uses; `1 + erf` within
//! 3e-7 absolute (2.5 ulp of 1), GELU within 5e-7 absolute and
//! 2e-7 · max(1, |x|): a few ulp of its input.

use super::isa::{multiversion, Arith};

/// LayerNorm parameters for rows of `weight.len()` values.
pub(super) struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

const LANES: usize = 16;

/// `e^x`: Cephes' `expf` (a degree-6 polynomial on `x - n ln 2`, then a
/// multiplication by `2^n` built in the exponent bits); 0 below -87, where
/// the result would be subnormal.
#[inline(always)]
pub(super) fn exp<A: Arith>(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = A::mul_add(xc, std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    // ln 2 split in a part exact in few bits and the rest.
    let r = A::mul_add(n, -0.693_359_4, xc);
    let r = A::mul_add(n, 2.121_944_4e-4, r);
    let mut p = A::mul_add(r, 1.987_569_1e-4, 1.398_199_9e-3);
    p = A::mul_add(p, r, 8.333_452e-3);
    p = A::mul_add(p, r, 4.166_579_6e-2);
    p = A::mul_add(p, r, 1.666_666_5e-1);
    p = A::mul_add(p, r, 0.5);
    let e = A::mul_add(p, r * r, r) + 1.0;
    // Wrapping ops (they never wrap here) keep overflow-checked builds
    // vectorised.
    let n_bits = t.to_bits().wrapping_sub(SHIFT.to_bits());
    let exponent = n_bits.wrapping_add(127).wrapping_shl(23);
    let scaled = e * f32::from_bits(exponent);
    if x < -87.0 {
        0.0
    } else {
        scaled
    }
}

/// `erf(x) / x` on `x² ≤ 2.25`, as a polynomial in `x²` (Chebyshev fit,
/// error 8e-10), highest degree first.
const ERF_SMALL: [f32; 9] = [
    6.205_873e-7,
    -1.132_887_4e-5,
    1.130_967_6e-4,
    -8.454_627e-4,
    5.216_919_3e-3,
    -2.686_314_8e-2,
    1.128_372_6e-1,
    -3.761_263_3e-1,
    std::f32::consts::FRAC_2_SQRT_PI,
];

/// `erfc(x) · e^{x²}` on `1.5 ≤ x ≤ 9.5`, as a polynomial in
/// `1/x - ERFC_CENTER` (Chebyshev fit, relative error 1e-8), highest degree
/// first.
const ERFC_SCALED: [f32; 9] = [
    -0.186_015_79,
    0.112_463_42,
    0.042_667_51,
    -0.129_485_1,
    0.126_584_08,
    -0.019_823_594,
    -0.186_846_8,
    0.469_925_9,
    0.204_247_77,
];
const ERFC_CENTER: f32 = 0.385_964_9;

/// `1 + erf(z)`, without cancellation for negative `z` (there it is
/// `erfc(|z|)`, computed directly).
#[inline(always)]
pub(super) fn one_plus_erf<A: Arith>(z: f32) -> f32 {
    let a = z.abs();
    let s = a * a;
    // |z| < 1.5: erf(|z|) = |z| P(z²).
    let sa = s.min(2.25);
    let mut p = ERF_SMALL[0];
    for &c in &ERF_SMALL[1..] {
        p = A::mul_add(p, sa, c);
    }
    let erf_small = a * p;
    // |z| ≥ 1.5: erfc(|z|) = e^{-z²} Q(1/|z|).
    let t = 1.0 / a.clamp(1.5, 9.5) - ERFC_CENTER;
    let mut q = ERFC_SCALED[0];
    for &c in &ERFC_SCALED[1..] {
        q = A::mul_add(q, t, c);
    }
    let erfc_large = if s > 80.0 { 0.0 } else { exp::<A>(-s) * q };
    let negative = z < 0.0;
    if a < 1.5 {
        if negative {
            1.0 - erf_small
        } else {
            1.0 + erf_small
        }
    } else if negative {
        erfc_large
    } else {
        2.0 - erfc_large
    }
}

/// GELU, the erf form: `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub(super) fn gelu<A: Arith>(x: f32) -> f32 {
    0.5 * x * one_plus_erf::<A>(x * std::f32::consts::FRAC_1_SQRT_2)
}

/// GELU in place over a slice.
#[inline(always)]
pub(super) fn gelu_slice<A: Arith>(xs: &mut [f32]) {
    for x in xs {
        *x = gelu::<A>(*x);
    }
}

/// Folds 16 lane sums pairwise: lanes i and i+8, then i and i+4, ...
#[inline(always)]
fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            acc[l] += chunk[l];
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] += x;
    }
    fold(acc)
}

/// `Σ (x - mean)²`.
#[inline(always)]
fn sum_sq_dev<A: Arith>(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            let d = chunk[l] - mean;
            acc[l] = A::mul_add(d, d, acc[l]);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        let d = x - mean;
        acc[l] = A::mul_add(d, d, acc[l]);
    }
    fold(acc)
}

#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(chunk[l]);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] = acc[l].max(x);
    }
    acc.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

/// For each row of `x` (rows of `norm.weight.len()`): adds the matching row
/// of `residual` if any, then normalises (biased variance, as torch).
#[inline(always)]
fn add_layer_norm_generic<A: Arith>(x: &mut [f32], residual: Option<&[f32]>, norm: &LayerNorm) {
    let h = norm.weight.len();
    if h == 0 {
        return;
    }
    for (i, row) in x.chunks_exact_mut(h).enumerate() {
        if let Some(residual) = residual {
            for (v, r) in row.iter_mut().zip(&residual[i * h..(i + 1) * h]) {
                *v += r;
            }
        }
        let mean = sum(row) / h as f32;
        let var = sum_sq_dev::<A>(row, mean) / h as f32;
        let inv = 1.0 / (var + norm.eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
            *v = A::mul_add((*v - mean) * inv, *w, *b);
        }
    }
}

multiversion! {
    /// [`add_layer_norm_generic`] for `isa`.
    pub(super) fn add_layer_norm = add_layer_norm_generic(
        x: &mut [f32],
        residual: Option<&[f32]>,
        norm: &LayerNorm,
    );
}

/// `softmax(row · scale)` in place.
#[inline(always)]
pub(super) fn softmax<A: Arith>(row: &mut [f32], scale: f32) {
    let top = max(row);
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            let e = exp::<A>((chunk[l] - top) * scale);
            chunk[l] = e;
            acc[l] += e;
        }
    }
    for (l, x) in chunks.into_remainder().iter_mut().enumerate() {
        let e = exp::<A>((*x - top) * scale);
        *x = e;
        acc[l] += e;
    }
    let inv = 1.0 / fold(acc);
    for x in row {
        *x *= inv;
    }
}

#[cfg(test)]
multiversion! {
    /// [`gelu_slice`] for `isa`, for tests.
    pub(super) fn gelu_in_place = gelu_slice(xs: &mut [f32]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bert::isa::{Isa, Portable, PORTABLE_FUSED};
    use candle_core::cpu::erf::erf_f64;

    fn softmax_rows<A: Arith>(x: &mut [f32], n: usize) {
        for row in x.chunks_exact_mut(n) {
            softmax::<A>(row, 0.125);
        }
    }

    multiversion! {
        fn softmax_all = softmax_rows(x: &mut [f32], n: usize);
    }

    /// Reference `1 + erf(z)` without cancellation for negative z.
    fn one_plus_erf_f64(z: f64) -> f64 {
        if z < -3.0 {
            candle_core::cpu::erf::erfc_f64(-z)
        } else {
            1.0 + erf_f64(z)
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 10.0 {
            let got = f64::from(exp::<Portable>(x));
            let want = f64::from(x).exp();
            worst = worst.max((got - want).abs() / want);
            x += 1.0 / 512.0;
        }
        assert!(worst < 1e-7, "exp relative error {worst:e}");
        assert_eq!(exp::<Portable>(-88.0), 0.0);
        assert_eq!(exp::<Portable>(-1e30), 0.0);
        assert_eq!(exp::<Portable>(0.0), 1.0);
    }

    fn one_plus_erf_slice<A: Arith>(xs: &mut [f32]) {
        for x in xs {
            *x = one_plus_erf::<A>(*x);
        }
    }

    multiversion! {
        fn one_plus_erf_in_place = one_plus_erf_slice(xs: &mut [f32]);
    }

    /// In every variant: `1 + erf` within 2.5 ulp of 1; GELU within 5e-7
    /// absolute and 2e-7 · max(1, |x|) (about 2 ulp of x where |x| ≥ 1).
    #[test]
    fn erf_and_gelu_are_accurate() {
        let xs: Vec<f32> = (-16 * 1024..16 * 1024).map(|i| i as f32 / 1024.0).collect();
        let zs: Vec<f32> = xs
            .iter()
            .map(|x| x * std::f32::consts::FRAC_1_SQRT_2)
            .collect();
        for isa in Isa::all_available() {
            let mut erf = zs.clone();
            one_plus_erf_in_place(isa, &mut erf);
            let mut g = xs.clone();
            gelu_in_place(isa, &mut g);
            let (mut worst_erf, mut worst_abs, mut worst_scaled) = (0f64, 0f64, 0f64);
            for ((&x, &z), (&e, &g)) in xs.iter().zip(&zs).zip(erf.iter().zip(&g)) {
                let want = one_plus_erf_f64(f64::from(z));
                worst_erf = worst_erf.max((f64::from(e) - want).abs());
                let want = 0.5 * f64::from(x) * one_plus_erf_f64(f64::from(x) / 2f64.sqrt());
                worst_abs = worst_abs.max((f64::from(g) - want).abs());
                let scaled = (f64::from(g) - want).abs() / f64::from(x.abs()).max(1.0);
                worst_scaled = worst_scaled.max(scaled);
            }
            let report = format!(
                "{isa:?}: 1 + erf {worst_erf:e}, gelu {worst_abs:e} abs, \
                 {worst_scaled:e} / max(1, |x|)"
            );
            eprintln!("{report}");
            assert!(
                worst_erf < 3e-7 && worst_abs < 5e-7 && worst_scaled < 2e-7,
                "{report}"
            );
        }
        assert_eq!(gelu::<Portable>(0.0), 0.0);
        assert_eq!(gelu::<Portable>(-1e4), 0.0);
        assert_eq!(gelu::<Portable>(1e4), 1e4);
    }

    #[test]
    fn layer_norm_matches_f64() {
        let h = 40;
        let norm = LayerNorm {
            weight: (0..h).map(|i| 1.0 + i as f32 / 50.0).collect(),
            bias: (0..h).map(|i| i as f32 / 100.0).collect(),
            eps: 1e-12,
        };
        let x: Vec<f32> = (0..3 * h)
            .map(|i| ((i * 37) % 23) as f32 / 7.0 - 1.5)
            .collect();
        let residual: Vec<f32> = (0..3 * h).map(|i| (i % 5) as f32 / 3.0).collect();
        let mut got = x.clone();
        add_layer_norm(Isa::Portable, &mut got, Some(&residual), &norm);
        for (r, row) in got.chunks_exact(h).enumerate() {
            let v: Vec<f64> = (0..h)
                .map(|j| f64::from(x[r * h + j]) + f64::from(residual[r * h + j]))
                .collect();
            let mean = v.iter().sum::<f64>() / h as f64;
            let var = v.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / h as f64;
            for j in 0..h {
                let want = (v[j] - mean) / (var + 1e-12).sqrt() * f64::from(norm.weight[j])
                    + f64::from(norm.bias[j]);
                assert!((f64::from(row[j]) - want).abs() < 1e-5, "row {r} col {j}");
            }
        }
    }

    /// The SIMD variants agree bit for bit with each other, and with the
    /// portable code wherever it fuses multiply-adds too.
    #[test]
    fn variants_agree() {
        let xs: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.5) / 97.0).collect();
        let scores: Vec<f32> = (0..37 * 37)
            .map(|i| ((i * 7919) % 211) as f32 / 9.0)
            .collect();
        let residual = xs[400..800].to_vec();
        let norm = LayerNorm {
            weight: (0..40).map(|i| 1.0 + i as f32 / 50.0).collect(),
            bias: (0..40).map(|i| i as f32 / 100.0).collect(),
            eps: 1e-12,
        };
        let run = |isa: Isa| {
            let mut g = xs.clone();
            gelu_in_place(isa, &mut g);
            let mut s = scores.clone();
            softmax_all(isa, &mut s, 37);
            let mut n = xs[..400].to_vec();
            add_layer_norm(isa, &mut n, Some(&residual), &norm);
            [g, s, n]
        };
        let portable = run(Isa::Portable);
        for row in portable[1].chunks_exact(37) {
            assert!((row.iter().map(|&p| f64::from(p)).sum::<f64>() - 1.0).abs() < 1e-6);
        }
        let mut first_simd: Option<[Vec<f32>; 3]> = None;
        for isa in Isa::all_available()
            .into_iter()
            .filter(|&i| i != Isa::Portable)
        {
            let got = run(isa);
            if PORTABLE_FUSED {
                assert!(got == portable, "{isa:?} differs from portable");
            }
            for (a, b) in got.iter().zip(&portable) {
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                    .fold(0.0, f32::max);
                assert!(worst < 1e-6, "{isa:?} vs portable: {worst:e}");
            }
            match &first_simd {
                Some(first) => {
                    assert!(&got == first, "{isa:?} differs from the other SIMD variant")
                }
                None => first_simd = Some(got),
            }
        }
    }
}
