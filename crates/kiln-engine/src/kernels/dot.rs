//! Block formats, dequantization and the per-row dot products.
//!
//! Layouts (little-endian, as in GGUF):
//! - Q4_0 (18 B / 32): f16 d, 16 B nibbles; value j = low nibble of byte j,
//!   value j+16 = high nibble; x = d·(q − 8).
//! - Q4_1 (20 B / 32): f16 d, f16 m, nibbles as Q4_0; x = d·q + m.
//! - Q5_0 (22 B / 32): f16 d, u32 high bits, nibbles; x = d·(q − 16).
//! - Q8_0 (34 B / 32): f16 d, 32 × i8.
//! - Q4_K (144 B / 256): f16 d, f16 dmin, 12 B of packed 6-bit scales and
//!   mins for 8 sub-blocks of 32, 128 B nibbles (per 64 values: 32 low
//!   nibbles then 32 high); x = d·sc·q − dmin·m.
//! - Q6_K (210 B / 256): 128 B low nibbles, 64 B high 2-bit pairs, 16 × i8
//!   scales (one per 16 values), f16 d; x = d·sc·(q − 32).
//!
//! Dot products follow ggml's integer formulation: exact i32 sums per block
//! (per sub-block for K-quants), scaled in f32.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::quantize::{quantize_q8, quantize_q8k, Q8KRow, Q8Row, QK, QK_K};

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One input row, quantized for a given weight type.
pub enum Activations {
    Q8(Q8Row),
    Q8K(Q8KRow),
    /// F16 weights take f16-rounded activations; F32 weights the values as they are.
    Float(Vec<f32>),
}

impl Activations {
    pub fn quantize(weight: GgmlDType, x: &[f32]) -> Activations {
        match weight {
            GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => Activations::Q8(quantize_q8(x, false)),
            GgmlDType::Q4_1 => Activations::Q8(quantize_q8(x, true)),
            GgmlDType::Q4K | GgmlDType::Q6K => Activations::Q8K(quantize_q8k(x)),
            GgmlDType::F16 => Activations::Float(x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()),
            _ => Activations::Float(x.to_vec()),
        }
    }
}

/// Dot product of one weight row (raw blocks) with one input row.
pub fn dot_row(dtype: GgmlDType, w: &[u8], a: &Activations) -> f32 {
    match (dtype, a) {
        (GgmlDType::Q4_0, Activations::Q8(y)) => dot_q4_0(w, y),
        (GgmlDType::Q4_1, Activations::Q8(y)) => dot_q4_1(w, y),
        (GgmlDType::Q5_0, Activations::Q8(y)) => dot_q5_0(w, y),
        (GgmlDType::Q8_0, Activations::Q8(y)) => dot_q8_0(w, y),
        (GgmlDType::Q4K, Activations::Q8K(y)) => dot_q4_k(w, y),
        (GgmlDType::Q6K, Activations::Q8K(y)) => dot_q6_k(w, y),
        (GgmlDType::F16, Activations::Float(x)) => w
            .chunks_exact(2)
            .zip(x)
            .map(|(b, v)| f16::from_le_bytes([b[0], b[1]]).to_f32() * v)
            .sum(),
        (_, Activations::Float(x)) => w
            .chunks_exact(4)
            .zip(x)
            .map(|(b, v)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v)
            .sum(),
        // Activations are always made for the weight's own type (see
        // `Activations::quantize`), so no other pairing occurs.
        _ => 0.0,
    }
}

#[inline]
fn isum(a: impl Iterator<Item = i32>) -> i32 {
    a.sum()
}

fn dot_q4_0(w: &[u8], y: &Q8Row) -> f32 {
    let mut sumf = 0f32;
    for (i, b) in w.chunks_exact(18).enumerate() {
        let q = &y.qs[i * QK..(i + 1) * QK];
        let qs = &b[2..18];
        let s = isum((0..16).map(|j| {
            ((qs[j] & 0xF) as i32 - 8) * q[j] as i32 + ((qs[j] >> 4) as i32 - 8) * q[j + 16] as i32
        }));
        sumf += s as f32 * (f16_at(b, 0) * y.d[i]);
    }
    sumf
}

fn dot_q4_1(w: &[u8], y: &Q8Row) -> f32 {
    let mut sumf = 0f32;
    let mut summs = 0f32;
    for (i, b) in w.chunks_exact(20).enumerate() {
        let q = &y.qs[i * QK..(i + 1) * QK];
        let qs = &b[4..20];
        let s = isum((0..16).map(|j| (qs[j] & 0xF) as i32 * q[j] as i32 + (qs[j] >> 4) as i32 * q[j + 16] as i32));
        summs += f16_at(b, 2) * y.s[i];
        sumf += s as f32 * (f16_at(b, 0) * y.d[i]);
    }
    sumf + summs
}

fn dot_q5_0(w: &[u8], y: &Q8Row) -> f32 {
    let mut sumf = 0f32;
    for (i, b) in w.chunks_exact(22).enumerate() {
        let q = &y.qs[i * QK..(i + 1) * QK];
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let s = isum((0..16).map(|j| {
            let lo = ((qs[j] & 0xF) as u32 | ((qh >> j) & 1) << 4) as i32 - 16;
            let hi = ((qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32 - 16;
            lo * q[j] as i32 + hi * q[j + 16] as i32
        }));
        sumf += s as f32 * (f16_at(b, 0) * y.d[i]);
    }
    sumf
}

fn dot_q8_0(w: &[u8], y: &Q8Row) -> f32 {
    let mut sumf = 0f32;
    for (i, b) in w.chunks_exact(34).enumerate() {
        let q = &y.qs[i * QK..(i + 1) * QK];
        let s = isum(b[2..34].iter().zip(q).map(|(&x, &v)| x as i8 as i32 * v as i32));
        sumf += s as f32 * (f16_at(b, 0) * y.d[i]);
    }
    sumf
}

/// Scales and mins of the 8 sub-blocks of a Q4_K block.
fn q4k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            m[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            m[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, m)
}

fn dot_q4_k(w: &[u8], y: &Q8KRow) -> f32 {
    let mut sumf = 0f32;
    for (i, b) in w.chunks_exact(144).enumerate() {
        let q8 = &y.qs[i * QK_K..(i + 1) * QK_K];
        let (sc, m) = q4k_scales(&b[4..16]);
        let qs = &b[16..144];
        let mut total = 0i32;
        for chunk in 0..4 {
            let bytes = &qs[chunk * 32..(chunk + 1) * 32];
            let lo = &q8[chunk * 64..chunk * 64 + 32];
            let hi = &q8[chunk * 64 + 32..chunk * 64 + 64];
            let s_lo = isum(bytes.iter().zip(lo).map(|(&x, &v)| (x & 0xF) as i32 * v as i32));
            let s_hi = isum(bytes.iter().zip(hi).map(|(&x, &v)| (x >> 4) as i32 * v as i32));
            total += sc[2 * chunk] as i32 * s_lo + sc[2 * chunk + 1] as i32 * s_hi;
        }
        let bs = &y.bsums[i * 16..(i + 1) * 16];
        let mins = isum((0..16).map(|j| bs[j] * m[j / 2] as i32));
        let d = f16_at(b, 0) * y.d[i];
        let dmin = f16_at(b, 2) * y.d[i];
        sumf += d * total as f32 - dmin * mins as f32;
    }
    sumf
}

/// The 256 signed 6-bit values of a Q6_K block, in order.
fn q6k_values(b: &[u8], out: &mut [i8; 256]) {
    let (ql, rest) = b.split_at(128);
    let qh = &rest[..64];
    for half in 0..2 {
        let ql = &ql[half * 64..];
        let qh = &qh[half * 32..];
        let o = &mut out[half * 128..];
        for l in 0..32 {
            o[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            o[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            o[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            o[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
}

fn dot_q6_k(w: &[u8], y: &Q8KRow) -> f32 {
    let mut sumf = 0f32;
    let mut vals = [0i8; 256];
    for (i, b) in w.chunks_exact(210).enumerate() {
        let q8 = &y.qs[i * QK_K..(i + 1) * QK_K];
        q6k_values(b, &mut vals);
        let scales = &b[192..208];
        let mut total = 0i32;
        for g in 0..16 {
            let s = isum(vals[g * 16..(g + 1) * 16].iter().zip(&q8[g * 16..]).map(|(&x, &v)| x as i32 * v as i32));
            total += scales[g] as i8 as i32 * s;
        }
        sumf += f16_at(b, 208) * y.d[i] * total as f32;
    }
    sumf
}

/// Dequantizes one row of raw blocks into `out`.
pub fn dequantize_row(dtype: GgmlDType, w: &[u8], out: &mut [f32]) {
    match dtype {
        GgmlDType::F32 => {
            for (o, b) in out.iter_mut().zip(w.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlDType::F16 => {
            for (o, b) in out.iter_mut().zip(w.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlDType::Q4_0 => {
            for (b, o) in w.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    o[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
                    o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlDType::Q4_1 => {
            for (b, o) in w.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    o[j] = (b[4 + j] & 0xF) as f32 * d + m;
                    o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlDType::Q5_0 => {
            for (b, o) in w.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for j in 0..16 {
                    let lo = ((b[6 + j] & 0xF) as u32 | ((qh >> j) & 1) << 4) as i32 - 16;
                    let hi = ((b[6 + j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32 - 16;
                    o[j] = lo as f32 * d;
                    o[j + 16] = hi as f32 * d;
                }
            }
        }
        GgmlDType::Q8_0 => {
            for (b, o) in w.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..34]) {
                    *v = q as i8 as f32 * d;
                }
            }
        }
        GgmlDType::Q4K => {
            for (b, o) in w.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (sc, m) = q4k_scales(&b[4..16]);
                for chunk in 0..4 {
                    let bytes = &b[16 + chunk * 32..16 + (chunk + 1) * 32];
                    let (d1, m1) = (d * sc[2 * chunk] as f32, dmin * m[2 * chunk] as f32);
                    let (d2, m2) = (d * sc[2 * chunk + 1] as f32, dmin * m[2 * chunk + 1] as f32);
                    for (l, &x) in bytes.iter().enumerate() {
                        o[chunk * 64 + l] = d1 * (x & 0xF) as f32 - m1;
                        o[chunk * 64 + 32 + l] = d2 * (x >> 4) as f32 - m2;
                    }
                }
            }
        }
        GgmlDType::Q6K => {
            let mut vals = [0i8; 256];
            for (b, o) in w.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
                let d = f16_at(b, 208);
                q6k_values(b, &mut vals);
                for (k, (v, &q)) in o.iter_mut().zip(&vals).enumerate() {
                    *v = d * (b[192 + k / 16] as i8 as f32) * q as f32;
                }
            }
        }
        // Matrices of other types are refused in `QMatrix::from_bytes`.
        _ => out.fill(0.0),
    }
}
