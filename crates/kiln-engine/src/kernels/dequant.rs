//! Dequantization of one weight row, as ggml's `dequantize_row_*` computes
//! it (separate multiply and add, no fused operations — that is how
//! llama.cpp's get_rows produces embeddings).

use half::f16;

use super::scalar::{f16_at, q4k_scales, q6k_values};
use super::DotKind;

/// Dequantizes the raw blocks of one row into `out` (`out.len()` values;
/// the caller checked that the sizes agree).
pub(crate) fn dequantize_row(kind: DotKind, w: &[u8], out: &mut [f32]) {
    match kind {
        DotKind::F32 => {
            for (o, b) in out.iter_mut().zip(w.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DotKind::F16 => {
            for (o, b) in out.iter_mut().zip(w.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DotKind::Q4_0 | DotKind::Q4_0Repacked => {
            for (o, b) in out.chunks_exact_mut(32).zip(w.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    o[j] = (i32::from(b[2 + j] & 0xF) - 8) as f32 * d;
                    o[j + 16] = (i32::from(b[2 + j] >> 4) - 8) as f32 * d;
                }
            }
        }
        DotKind::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(w.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    o[j] = f32::from(b[4 + j] & 0xF) * d + m;
                    o[j + 16] = f32::from(b[4 + j] >> 4) * d + m;
                }
            }
        }
        DotKind::Q5_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(w.chunks_exact(22)) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for j in 0..16 {
                    let lo = (u32::from(b[6 + j] & 0xF) | ((qh >> j) & 1) << 4) as i32 - 16;
                    let hi = (u32::from(b[6 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4) as i32 - 16;
                    o[j] = lo as f32 * d;
                    o[j + 16] = hi as f32 * d;
                }
            }
        }
        DotKind::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(w.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..34]) {
                    *v = f32::from(q as i8) * d;
                }
            }
        }
        DotKind::Q4K | DotKind::Q4KRepacked => {
            for (o, b) in out.chunks_exact_mut(256).zip(w.chunks_exact(144)) {
                let (d, min) = (f16_at(b, 0), f16_at(b, 2));
                let (sc, m) = q4k_scales(&b[4..16]);
                for c in 0..4 {
                    let (d1, m1) = (d * f32::from(sc[2 * c]), min * f32::from(m[2 * c]));
                    let (d2, m2) = (d * f32::from(sc[2 * c + 1]), min * f32::from(m[2 * c + 1]));
                    let bytes = &b[16 + 32 * c..16 + 32 * (c + 1)];
                    let o = &mut o[64 * c..64 * (c + 1)];
                    for (l, &x) in bytes.iter().enumerate() {
                        o[l] = d1 * f32::from(x & 0xF) - m1;
                        o[l + 32] = d2 * f32::from(x >> 4) - m2;
                    }
                }
            }
        }
        DotKind::Q6K => {
            let mut vals = [0u8; 256];
            for (o, b) in out.chunks_exact_mut(256).zip(w.chunks_exact(210)) {
                let d = f16_at(b, 208);
                q6k_values(b, &mut vals);
                for (k, (v, &q)) in o.iter_mut().zip(&vals).enumerate() {
                    // ggml: d * sc * q, evaluated left to right.
                    *v = d * f32::from(b[192 + k / 16] as i8) * f32::from(q as i8 - 32);
                }
            }
        }
    }
}
