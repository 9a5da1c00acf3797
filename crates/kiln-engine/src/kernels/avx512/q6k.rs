//! Q6_K with AVX-512 VNNI: eight weight rows times up to two inputs per
//! tile, bit-identical to `scalar::dot_q6_k` (ggml's AVX2 kernel).
//!
//! Per 256-value block the scalar kernel forms, in each of 8 lanes, the
//! exact integer `Σ sc · Σ(q6 · q8)` over four values of each 32-value chunk,
//! minus `32 · Σ bsum · sc`, then fuses it with `d_y · d_w` into an 8-lane
//! float accumulator. Here a 512-bit register holds two rows' lanes;
//! `vpmaddubsw` pairs the unsigned 6-bit values with the activations (no
//! saturation: 2 · 63 · 128 < 2¹⁵) and `vpdpwssd` multiplies each pair sum
//! by its sub-block scale and adds it into the lane — the same integers.
//! The float steps are the scalar code's.

use std::arch::x86_64::*;

use super::super::quantize::QK_K;
use super::{broadcast_i8x32, fold_pair, load_i16x16, load_u8x16, pair_u8x32, Q8KGroup, PAIRS};

/// Bytes per Q6_K block: 128 low-nibble bytes, 64 high-bit bytes, 16 i8
/// scales, the f16 `d`.
const BLOCK: usize = 210;

/// For chunk `k` (32 values) of a block, the 16-bit lanes that take each
/// value pair's scale from a row pair's 32 sign-extended scales: values
/// 0..16 of the chunk use scale `2k`, values 16..32 scale `2k + 1`; the
/// second row's scales sit 16 places on.
const SCALE_INDEX: [[i16; 32]; 8] = {
    let mut idx = [[0; 32]; 8];
    let mut k = 0;
    while k < 8 {
        let mut l = 0;
        while l < 32 {
            idx[k][l] = (16 * (l / 16) + 2 * k + (l % 16) / 8) as i16;
            l += 1;
        }
        k += 1;
    }
    idx
};

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) fn tile<const C: usize>(
    rows: &[u8],
    row_bytes: usize,
    g: &Q8KGroup,
    outs: &mut [&mut [f32]],
    r0: usize,
) {
    let m4 = _mm512_set1_epi8(0xF);
    let m2 = _mm512_set1_epi8(3);
    let index: [__m512i; 8] = std::array::from_fn(|k| {
        // SAFETY: each row of SCALE_INDEX is 32 readable i16s (64 bytes).
        unsafe { _mm512_loadu_si512(SCALE_INDEX[k].as_ptr().cast()) }
    });
    let mut acc = [[_mm512_setzero_ps(); C]; PAIRS];
    let blocks =
        g.qs.chunks_exact(C * QK_K)
            .zip(g.bsums.chunks_exact(C * 16))
            .zip(g.d.chunks_exact(C));
    for (blk, ((qs, bsums), d_y)) in blocks.enumerate() {
        let pair = |p: usize| {
            let at = 2 * p * row_bytes + blk * BLOCK;
            (
                &rows[at..at + BLOCK],
                &rows[at + row_bytes..at + row_bytes + BLOCK],
            )
        };
        // Each row pair's 16 + 16 scales as i16.
        let scales: [__m512i; PAIRS] = std::array::from_fn(|p| {
            let (a, b) = pair(p);
            _mm512_cvtepi8_epi16(_mm256_set_m128i(
                load_u8x16(&b[192..]),
                load_u8x16(&a[192..]),
            ))
        });
        // −32 · (bsum_2l · sc_2l + bsum_2l+1 · sc_2l+1) per lane.
        let mut sumi = [[_mm512_setzero_si512(); C]; PAIRS];
        for c in 0..C {
            let bs = _mm512_broadcast_i64x4(load_i16x16(&bsums[16 * c..]));
            for p in 0..PAIRS {
                sumi[p][c] = _mm512_sub_epi32(
                    _mm512_setzero_si512(),
                    _mm512_slli_epi32::<5>(_mm512_madd_epi16(scales[p], bs)),
                );
            }
        }
        for half in 0..2 {
            let bits: [[__m512i; 3]; PAIRS] = std::array::from_fn(|p| {
                let (a, b) = pair(p);
                [
                    pair_u8x32(a, b, 64 * half),
                    pair_u8x32(a, b, 64 * half + 32),
                    pair_u8x32(a, b, 128 + 32 * half),
                ]
            });
            for k in 0..4 {
                let chunk = 4 * half + k;
                let wv: [__m512i; PAIRS] = std::array::from_fn(|p| {
                    let [ql1, ql2, qh] = bits[p];
                    let (low, high) = match k {
                        0 => (ql1, qh),
                        1 => (ql2, _mm512_srli_epi16::<2>(qh)),
                        2 => (_mm512_srli_epi16::<4>(ql1), _mm512_srli_epi16::<4>(qh)),
                        _ => (_mm512_srli_epi16::<4>(ql2), _mm512_srli_epi16::<6>(qh)),
                    };
                    _mm512_or_si512(
                        _mm512_and_si512(low, m4),
                        _mm512_slli_epi16::<4>(_mm512_and_si512(high, m2)),
                    )
                });
                let sc: [__m512i; PAIRS] =
                    std::array::from_fn(|p| _mm512_permutexvar_epi16(index[chunk], scales[p]));
                for c in 0..C {
                    let x = broadcast_i8x32(&qs[c * QK_K + 32 * chunk..]);
                    for p in 0..PAIRS {
                        sumi[p][c] =
                            _mm512_dpwssd_epi32(sumi[p][c], _mm512_maddubs_epi16(wv[p], x), sc[p]);
                    }
                }
            }
        }
        for p in 0..PAIRS {
            let (a, b) = pair(p);
            let h = |s: &[u8]| i16::from_le_bytes([s[208], s[209]]);
            let dw = _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(h(b)), _mm_set1_epi16(h(a))));
            for c in 0..C {
                acc[p][c] = _mm512_fmadd_ps(
                    _mm512_mul_ps(_mm512_set1_ps(d_y[c]), dw),
                    _mm512_cvtepi32_ps(sumi[p][c]),
                    acc[p][c],
                );
            }
        }
    }
    for (p, lanes) in acc.iter().enumerate() {
        for (c, &v) in lanes.iter().enumerate() {
            let [lo, hi] = fold_pair(v);
            let out = &mut outs[g.first + c][r0 + 2 * p..r0 + 2 * p + 2];
            out[0] = lo;
            out[1] = hi;
        }
    }
}
