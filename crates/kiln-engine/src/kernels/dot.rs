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
//! Dot products follow ggml's integer formulation — exact i32 sums per block
//! (per sub-block for K-quants), scaled in f32 — and its float order: the
//! integer sums are split over the lanes of ggml's 8-lane registers, fused
//! into 8 lane accumulators block by block, and folded at the end as ggml
//! folds them (see [`super::lanes`]).

use candle_core::quantized::GgmlDType;
use half::f16;

use super::lanes;
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
            // tinyBLAS takes f32 activations as they are when rows are a
            // multiple of 16 long; otherwise ggml rounds them to f16.
            GgmlDType::F16 if x.len() % 16 == 0 => Activations::Float(x.to_vec()),
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
        (GgmlDType::F16, Activations::Float(x)) => dot_float(w, x, |b| f16::from_le_bytes([b[0], b[1]]).to_f32(), 2),
        (_, Activations::Float(x)) => dot_float(w, x, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]), 4),
        // Activations are always made for the weight's own type (see
        // `Activations::quantize`), so no other pairing occurs.
        _ => 0.0,
    }
}

/// Integer partial sums of a 32-value block as ggml's 256-bit registers hold
/// them: lane `l` sums the products of values `4l..4l+4`.
#[inline]
fn lane_sums(w: &[i32; 32], q: &[i8]) -> [i32; 8] {
    let mut s = [0i32; 8];
    for (l, lane) in s.iter_mut().enumerate() {
        let b = 4 * l;
        *lane = w[b] * q[b] as i32 + w[b + 1] * q[b + 1] as i32 + w[b + 2] * q[b + 2] as i32 + w[b + 3] * q[b + 3] as i32;
    }
    s
}

/// One block's contribution to ggml's 8-lane accumulator:
/// `acc = fma(d, float(lane sums), acc)`.
#[inline]
fn fma_lanes(acc: &mut [f32; 8], d: f32, s: &[i32; 8]) {
    for (a, &v) in acc.iter_mut().zip(s) {
        *a = d.mul_add(v as f32, *a);
    }
}

/// Q4_0 / Q5_0 / Q8_0 against Q8_0 activations: `ggml_vec_dot_*_q8_0` on
/// AVX2 and tinyBLAS_Q0_AVX compute the same thing — per block an 8-lane
/// integer sum, scaled by `d_w · d_y` and fused into an 8-lane accumulator,
/// folded by `hsum_float_8` at the end.
fn dot_q0(w: &[u8], block_bytes: usize, y: &Q8Row, values: impl Fn(&[u8], &mut [i32; 32])) -> f32 {
    let mut acc = [0f32; 8];
    let mut vals = [0i32; 32];
    for (i, b) in w.chunks_exact(block_bytes).enumerate() {
        values(b, &mut vals);
        let s = lane_sums(&vals, &y.qs[i * QK..(i + 1) * QK]);
        fma_lanes(&mut acc, f16_at(b, 0) * y.d[i], &s);
    }
    lanes::hsum8(&acc)
}

fn dot_q4_0(w: &[u8], y: &Q8Row) -> f32 {
    dot_q0(w, 18, y, |b, v| {
        for j in 0..16 {
            v[j] = (b[2 + j] & 0xF) as i32 - 8;
            v[j + 16] = (b[2 + j] >> 4) as i32 - 8;
        }
    })
}

fn dot_q5_0(w: &[u8], y: &Q8Row) -> f32 {
    dot_q0(w, 22, y, |b, v| {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        for j in 0..16 {
            v[j] = ((b[6 + j] & 0xF) as u32 | ((qh >> j) & 1) << 4) as i32 - 16;
            v[j + 16] = ((b[6 + j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32 - 16;
        }
    })
}

fn dot_q8_0(w: &[u8], y: &Q8Row) -> f32 {
    dot_q0(w, 34, y, |b, v| {
        for (o, &x) in v.iter_mut().zip(&b[2..34]) {
            *o = x as i8 as i32;
        }
    })
}

/// `ggml_vec_dot_q4_1_q8_1` (AVX2): the 8-lane accumulator as for Q8_0, the
/// `m · s` terms summed apart in f32 and added after the fold.
fn dot_q4_1(w: &[u8], y: &Q8Row) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    let mut vals = [0i32; 32];
    for (i, b) in w.chunks_exact(20).enumerate() {
        for j in 0..16 {
            vals[j] = (b[4 + j] & 0xF) as i32;
            vals[j + 16] = (b[4 + j] >> 4) as i32;
        }
        summs += f16_at(b, 2) * y.s[i];
        let s = lane_sums(&vals, &y.qs[i * QK..(i + 1) * QK]);
        fma_lanes(&mut acc, f16_at(b, 0) * y.d[i], &s);
    }
    lanes::hsum8(&acc) + summs
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

/// Q4_K as llama.cpp runs it on x86: its weights are repacked eight rows at
/// a time (`block_q4_Kx8`) and multiplied by `ggml_gemv_q4_K_8x8_q8_K` /
/// `ggml_gemm_q4_K_8x8_q8_K`, where each output row owns one lane. Per block
/// the integer sums are exact — `Σ scale · (q4 · q8)` and `Σ min · bsum` —
/// and each goes into its own accumulator, `fma(float(sum), d_w · d_y, acc)`;
/// the result is `acc − acc_min`.
fn dot_q4_k(w: &[u8], y: &Q8KRow) -> f32 {
    let mut acc = 0f32;
    let mut acc_min = 0f32;
    for (i, b) in w.chunks_exact(144).enumerate() {
        let q8 = &y.qs[i * QK_K..(i + 1) * QK_K];
        let (sc, m) = q4k_scales(&b[4..16]);
        let qs = &b[16..144];
        let mut sum = 0i32;
        for chunk in 0..4 {
            let bytes = &qs[chunk * 32..(chunk + 1) * 32];
            let lo = &q8[chunk * 64..chunk * 64 + 32];
            let hi = &q8[chunk * 64 + 32..chunk * 64 + 64];
            let s_lo: i32 = bytes.iter().zip(lo).map(|(&x, &v)| (x & 0xF) as i32 * v as i32).sum();
            let s_hi: i32 = bytes.iter().zip(hi).map(|(&x, &v)| (x >> 4) as i32 * v as i32).sum();
            sum += sc[2 * chunk] as i32 * s_lo + sc[2 * chunk + 1] as i32 * s_hi;
        }
        let bs = &y.bsums[i * 16..(i + 1) * 16];
        let mins: i32 = (0..8).map(|j| m[j] as i32 * (bs[2 * j] + bs[2 * j + 1])).sum();
        acc = (sum as f32).mul_add(f16_at(b, 0) * y.d[i], acc);
        acc_min = (mins as f32).mul_add(f16_at(b, 2) * y.d[i], acc_min);
    }
    acc - acc_min
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

/// `ggml_vec_dot_q6_K_q8_K` (AVX2): lane `l` sums, over the eight 32-value
/// chunks, `scale · Σ` of values `4l..4l+4` (a chunk's first 16 values take
/// one scale, the next 16 the next).
fn dot_q6_k(w: &[u8], y: &Q8KRow) -> f32 {
    let mut acc = [0f32; 8];
    let mut vals = [0i8; 256];
    for (i, b) in w.chunks_exact(210).enumerate() {
        let q8 = &y.qs[i * QK_K..(i + 1) * QK_K];
        q6k_values(b, &mut vals);
        let scales = &b[192..208];
        let mut sumi = [0i32; 8];
        for (l, t) in sumi.iter_mut().enumerate() {
            for chunk in 0..8 {
                let at = chunk * 32 + 4 * l;
                let sc = scales[at / 16] as i8 as i32;
                let s: i32 = (at..at + 4).map(|k| vals[k] as i32 * q8[k] as i32).sum();
                *t += sc * s;
            }
        }
        fma_lanes(&mut acc, y.d[i] * f16_at(b, 208), &sumi);
    }
    lanes::hsum8(&acc)
}

/// tinyBLAS on AVX-512 for F32 and F16 weights with f32 activations: 16
/// lanes, lane `l` fusing every 16th product, folded by `hsum16`. Rows whose
/// length is not a multiple of 16 are summed in order.
fn dot_float(w: &[u8], x: &[f32], value: impl Fn(&[u8]) -> f32, width: usize) -> f32 {
    let n = x.len();
    if n % 16 != 0 {
        return w.chunks_exact(width).zip(x).map(|(b, v)| value(b) * v).sum();
    }
    let mut acc = [0f32; 16];
    for (wc, xc) in w.chunks_exact(16 * width).zip(x.chunks_exact(16)) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = value(&wc[l * width..]).mul_add(xc[l], *a);
        }
    }
    lanes::hsum16(&acc)
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
