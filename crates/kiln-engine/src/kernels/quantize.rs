//! Quantizing activations to the 8-bit formats the weight dot products take,
//! following ggml's x86 CPU backend number for number:
//! - Q8_0 / Q8_1 (blocks of 32): `d = max|x| / 127` stored as f16, values
//!   `x · (127 / max|x|)` rounded half to even (the SIMD path's rounding);
//!   Q8_1 also stores `s = f16(d · Σq)` with the f32 `d`.
//! - Q8_K (blocks of 256): ggml's reference quantizer: scale from the signed
//!   value of largest magnitude, `q = min(127, round_even(-127/max · x))`,
//!   `d = 1/iscale` kept in f32, plus sums of every 16 values.

use half::f16;

pub const QK: usize = 32;
pub const QK_K: usize = 256;

/// Round half to even, as `_mm256_round_ps(.., _MM_ROUND_NEAREST)` and ggml's
/// `nearest_int` do.
#[inline]
fn round_even(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// A row of activations in Q8_0 or Q8_1 blocks.
pub struct Q8Row {
    /// Per block: f16-rounded scale as f32.
    pub d: Vec<f32>,
    /// Per block (Q8_1 only): f16-rounded `d · Σq` as f32.
    pub s: Vec<f32>,
    pub qs: Vec<i8>,
}

pub fn quantize_q8(x: &[f32], with_sum: bool) -> Q8Row {
    let nb = x.len() / QK;
    let mut row = Q8Row {
        d: Vec::with_capacity(nb),
        s: Vec::with_capacity(if with_sum { nb } else { 0 }),
        qs: Vec::with_capacity(nb * QK),
    };
    for block in x.chunks_exact(QK) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max / 127.0;
        let id = if max != 0.0 { 127.0 / max } else { 0.0 };
        row.d.push(f16::from_f32(d).to_f32());
        let mut sum = 0i32;
        for &v in block {
            let q = round_even(v * id).clamp(-128, 127);
            sum += q;
            row.qs.push(q as i8);
        }
        if with_sum {
            row.s.push(f16::from_f32(d * sum as f32).to_f32());
        }
    }
    row
}

/// A row of activations in Q8_K blocks.
pub struct Q8KRow {
    pub d: Vec<f32>,
    pub qs: Vec<i8>,
    /// Per block, 16 sums of 16 consecutive values.
    pub bsums: Vec<i32>,
}

pub fn quantize_q8k(x: &[f32]) -> Q8KRow {
    let nb = x.len() / QK_K;
    let mut row = Q8KRow {
        d: Vec::with_capacity(nb),
        qs: Vec::with_capacity(nb * QK_K),
        bsums: Vec::with_capacity(nb * 16),
    };
    for block in x.chunks_exact(QK_K) {
        let mut amax = 0f32;
        let mut max = 0f32;
        for &v in block {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            row.d.push(0.0);
            row.qs.extend(std::iter::repeat_n(0i8, QK_K));
            row.bsums.extend(std::iter::repeat_n(0i32, 16));
            continue;
        }
        let iscale = -127.0 / max;
        for group in block.chunks_exact(16) {
            let mut sum = 0i32;
            for &v in group {
                let q = round_even(iscale * v).min(127);
                sum += q;
                row.qs.push(q as i8);
            }
            row.bsums.push(sum);
        }
        row.d.push(1.0 / iscale);
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_rounds_half_to_even_and_keeps_sum() {
        // max 127 → id 1: 0.5 → 0, 1.5 → 2, 2.5 → 2.
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = 1.5;
        x[3] = 2.5;
        let r = quantize_q8(&x, true);
        assert_eq!(&r.qs[..4], &[127, 0, 2, 2]);
        assert_eq!(r.d[0], 1.0);
        assert_eq!(r.s[0], 131.0);
    }

    #[test]
    fn q8k_uses_signed_max() {
        let mut x = vec![0.25f32; 256];
        x[7] = -2.0;
        let r = quantize_q8k(&x);
        // The value of largest magnitude maps to -127 whatever its sign.
        assert_eq!(r.qs[7], -127);
        assert!((r.d[0] - 2.0 / 127.0).abs() < 1e-9);
        assert_eq!(r.qs[0], 16, "0.25 · 63.5 = 15.875 rounds to 16");
        assert_eq!(r.bsums.len(), 16);
    }

    #[test]
    fn zero_blocks_are_zero() {
        let r = quantize_q8k(&[0.0; 256]);
        assert!(r.qs.iter().all(|&q| q == 0) && r.d[0] == 0.0);
        let r = quantize_q8(&[0.0; 32], true);
        assert!(r.qs.iter().all(|&q| q == 0) && r.s[0] == 0.0);
    }
}
