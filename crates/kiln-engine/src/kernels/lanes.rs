//! ggml's SIMD float arithmetic, replayed lane by lane in portable Rust.
//!
//! Floating-point sums depend on their order, and llama.cpp's CPU backend
//! (built for AVX-512 / AVX2 with FMA, as the reference wheels are) sums in
//! the order its vector registers impose. To track its logits we replay that
//! order with plain arrays of lanes and `f32::mul_add` for every fused
//! multiply-add — no `target_feature` needed, the results are the same bits
//! on every platform:
//! - [`hsum8`]: `hsum_float_8` (fold the 256-bit halves, then pairs);
//! - [`hsum16`]: `_mm512_reduce_add_ps` as GCC expands it (fold 512 → 256 →
//!   128 bits, then pairs);
//! - [`expf`]: `ggml_v_expf`, the AVX-512 polynomial softmax and SiLU use;
//! - [`silu`]: `ggml_v_silu`, `x / (1 + expf(-x))` with that `expf`;
//! - [`fold_f16_accumulators`]: the end of `ggml_vec_dot_f16` (four 16-lane
//!   accumulators folded pairwise); the attention loops built on it are in
//!   [`super::attention`].

/// `hsum_float_8`: lanes i and i+4 first, then (0+2) + (1+3).
#[inline(always)]
pub fn hsum8(x: &[f32; 8]) -> f32 {
    let a = [x[4] + x[0], x[5] + x[1], x[6] + x[2], x[7] + x[3]];
    (a[0] + a[2]) + (a[1] + a[3])
}

/// `_mm512_reduce_add_ps` (GCC): lanes i and i+8, then i and i+4, then
/// (0+2) + (1+3).
#[inline(always)]
pub fn hsum16(x: &[f32; 16]) -> f32 {
    let mut h = [0f32; 8];
    for i in 0..8 {
        h[i] = x[i + 8] + x[i];
    }
    let q = [h[4] + h[0], h[5] + h[1], h[6] + h[2], h[7] + h[3]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// `ggml_v_expf` (AVX-512 form), one lane: a degree-5 polynomial on the
/// reduced argument, scaled by 2^n exactly (`_mm512_scalef_ps`); |n| > 192
/// gives 0 or +inf.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // 0x1.715476p+0
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010) // 0x1.0e4020p-7
        .mul_add(b, f32::from_bits(0x3d2b_9f17)) // 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)),
        ) // 0x1.555e66p-3, 0x1.fffdb6p-2
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0)); // 0x1.ffffecp-1
    if n.abs() > 192.0 {
        // NaN compares false here and falls through, as in the vector code.
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    // j · 2^n rounded once: the product is exact in f64 (|n| ≤ 192, so
    // 2^n is a normal f64 built from its exponent bits).
    let two_n = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (f64::from(j) * two_n) as f32
}

/// `ggml_v_silu`: `x / (1 + expf(0 - x))`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(0.0 - x))
}

/// Whether the CPU has the FMA and F16C instructions the `_fma` variants of
/// the float code are compiled for (checked once).
pub fn fma_available() -> bool {
    super::KernelVariant::selected() != super::KernelVariant::Scalar
}

/// The end of `ggml_vec_dot_f16`'s vector loop: registers 0+2 and 1+3, their
/// sum, then `hsum16`.
#[inline(always)]
pub fn fold_f16_accumulators(acc: &[[f32; 16]; 4]) -> f32 {
    let mut s = [0f32; 16];
    for (l, v) in s.iter_mut().enumerate() {
        *v = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    hsum16(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_is_close_to_exp_and_handles_extremes() {
        for i in -800..=800 {
            let x = i as f32 * 0.11;
            let e = x.exp();
            let got = expf(x);
            assert!(
                (got - e).abs() <= 4e-7 * e.max(f32::MIN_POSITIVE),
                "{x}: {got} vs {e}"
            );
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(200.0), f32::INFINITY);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    }

    #[test]
    fn reductions_sum_everything() {
        let v: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let mut a = [0f32; 16];
        a.copy_from_slice(&v);
        assert_eq!(hsum16(&a), 120.0);
        let mut b = [0f32; 8];
        b.copy_from_slice(&v[..8]);
        assert_eq!(hsum8(&b), 28.0);
    }
}
