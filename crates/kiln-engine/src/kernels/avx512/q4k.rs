//! Q4_K of matrices llama.cpp repacks (a multiple of 8 rows) with AVX-512
//! VNNI: eight weight rows times up to two inputs per tile, bit-identical to
//! `scalar::dot_q4_k_repacked` (ggml's `gemv_q4_K_8x8_q8_K`), where each
//! output row owns one float lane.
//!
//! Per 256-value block a row's exact integers are `Σ_j sc_j · Σ(q4 · q8)`
//! over its eight 32-value sub-blocks and `Σ_j m_j · (bsum_2j + bsum_2j+1)`.
//! A 512-bit register holds a row pair's partial sums: `vpmaddubsw` pairs
//! the nibbles with the activations (2 · 15 · 128 < 2¹⁵, no saturation) and
//! `vpdpwssd` multiplies each pair by its sub-block scale into 16 i32 lanes,
//! which are then summed per row. The float steps — `fma(float(sum), d_w ·
//! d_y, acc)`, the same for the mins with `dmin`, and `acc − acc_min` — run
//! with one lane per row, as in the scalar code.

use std::arch::x86_64::*;

use super::super::avx2;
use super::super::quantize::QK_K;
use super::{broadcast_i8x32, head, pair_u8x32, Q8KGroup, PAIRS, TILE_ROWS};

/// Bytes per Q4_K block: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit
/// scales and mins, 128 bytes of nibbles.
const BLOCK: usize = 144;

/// A block's eight 6-bit scales and eight 6-bit mins (bytes 4..16), each
/// eight bytes packed little-endian into a u64, as ggml unpacks them.
#[inline]
fn scales_and_mins(b: &[u8]) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |k: usize| u32::from_le_bytes([b[4 + k], b[5 + k], b[6 + k], b[7 + k]]);
    let (u0, u1, u2) = (word(0), word(4), word(8));
    let sc_lo = u0 & LOW6;
    let sc_hi = (u2 & LOW4) | (((u0 >> 6) & LOW2) << 4);
    let m_lo = u1 & LOW6;
    let m_hi = ((u2 >> 4) & LOW4) | (((u1 >> 6) & LOW2) << 4);
    (
        u64::from(sc_lo) | u64::from(sc_hi) << 32,
        u64::from(m_lo) | u64::from(m_hi) << 32,
    )
}

/// For sub-block `j`, the 16-bit lanes that spread a row pair's scale `j`
/// (row `a`'s eight scales in lanes 0..8 of the source, row `b`'s in 8..16)
/// over lanes 0..16 and 16..32.
const SCALE_INDEX: [[i16; 32]; 8] = {
    let mut idx = [[0; 32]; 8];
    let mut j = 0;
    while j < 8 {
        let mut l = 0;
        while l < 32 {
            idx[j][l] = (8 * (l / 16) + j) as i16;
            l += 1;
        }
        j += 1;
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
    let index: [__m512i; 8] = std::array::from_fn(|j| {
        // SAFETY: each row of SCALE_INDEX is 32 readable i16s (64 bytes).
        unsafe { _mm512_loadu_si512(SCALE_INDEX[j].as_ptr().cast()) }
    });
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut acc = [_mm256_setzero_ps(); C];
    let mut acc_min = [_mm256_setzero_ps(); C];
    let blocks =
        g.qs.chunks_exact(C * QK_K)
            .zip(g.pair_sums.chunks_exact(C * 8))
            .zip(g.d.chunks_exact(C));
    for (blk, ((qs, pair_sums), d_y)) in blocks.enumerate() {
        let at = blk * BLOCK;
        let row = |r: usize| &rows[r * row_bytes + at..r * row_bytes + at + BLOCK];
        // `d` and `dmin` of the eight rows, one lane each.
        let heads = heads8!(rows, row_bytes, at);
        let d = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(heads));
        let dmin = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32::<16>(heads)));
        // Per row pair: the 8 + 8 scales and the 8 + 8 mins as i16.
        let mut scales = [_mm512_setzero_si512(); PAIRS];
        let mut mins = [_mm256_setzero_si256(); PAIRS];
        for p in 0..PAIRS {
            let (sa, ma) = scales_and_mins(row(2 * p));
            let (sb, mb) = scales_and_mins(row(2 * p + 1));
            scales[p] =
                _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_set_epi64x(sb as i64, sa as i64)));
            mins[p] = _mm256_cvtepu8_epi16(_mm_set_epi64x(mb as i64, ma as i64));
        }
        let mut sums = [[_mm512_setzero_si512(); C]; PAIRS];
        for chunk in 0..4 {
            let mut lo = [_mm512_setzero_si512(); PAIRS];
            let mut hi = [_mm512_setzero_si512(); PAIRS];
            for p in 0..PAIRS {
                let bits = pair_u8x32(row(2 * p), row(2 * p + 1), 16 + 32 * chunk);
                lo[p] = _mm512_and_si512(bits, m4);
                hi[p] = _mm512_and_si512(_mm512_srli_epi16::<4>(bits), m4);
            }
            let sc_lo: [__m512i; PAIRS] =
                std::array::from_fn(|p| _mm512_permutexvar_epi16(index[2 * chunk], scales[p]));
            let sc_hi: [__m512i; PAIRS] =
                std::array::from_fn(|p| _mm512_permutexvar_epi16(index[2 * chunk + 1], scales[p]));
            for c in 0..C {
                let x_lo = broadcast_i8x32(&qs[c * QK_K + 64 * chunk..]);
                let x_hi = broadcast_i8x32(&qs[c * QK_K + 64 * chunk + 32..]);
                for p in 0..PAIRS {
                    let s = _mm512_dpwssd_epi32(
                        sums[p][c],
                        _mm512_maddubs_epi16(lo[p], x_lo),
                        sc_lo[p],
                    );
                    sums[p][c] =
                        _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(hi[p], x_hi), sc_hi[p]);
                }
            }
        }
        for c in 0..C {
            // Each row's sum of its eight lanes, rows in lane order.
            let halves: [__m256i; 8] = std::array::from_fn(|k| {
                let v = sums[k / 2][c];
                if k % 2 == 0 {
                    _mm512_castsi512_si256(v)
                } else {
                    _mm512_extracti64x4_epi64::<1>(v)
                }
            });
            let sum = avx2::transpose_sum(&halves);
            // Σ_j m_j · (bsum_2j + bsum_2j+1): four partial sums per row,
            // added pairwise into row order.
            let ps = _mm256_broadcastsi128_si256(load_i16x8(&pair_sums[8 * c..]));
            let part: [__m256i; PAIRS] = std::array::from_fn(|p| _mm256_madd_epi16(mins[p], ps));
            let min = _mm256_hadd_epi32(
                _mm256_hadd_epi32(part[0], part[1]),
                _mm256_hadd_epi32(part[2], part[3]),
            );
            let min = _mm256_permutevar8x32_epi32(min, order);
            let dy = _mm256_set1_ps(d_y[c]);
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, dy), acc[c]);
            acc_min[c] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(min), _mm256_mul_ps(dmin, dy), acc_min[c]);
        }
    }
    for c in 0..C {
        let out = &mut outs[g.first + c][r0..r0 + TILE_ROWS];
        // SAFETY: `out` is 8 writable f32s; unaligned store.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(acc[c], acc_min[c])) };
    }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_i16x8(s: &[i16]) -> __m128i {
    let s = &s[..8];
    // SAFETY: `s` is 8 readable i16s; unaligned load.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::scalar::q4k_scales;

    #[test]
    fn scales_unpack_as_the_portable_code() {
        let mut seed = 1u32;
        for _ in 0..200 {
            let mut b = [0u8; BLOCK];
            for v in &mut b[4..16] {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *v = (seed >> 16) as u8;
            }
            let (sc, m) = q4k_scales(&b[4..16]);
            let (s_packed, m_packed) = scales_and_mins(&b);
            assert_eq!(s_packed.to_le_bytes(), sc);
            assert_eq!(m_packed.to_le_bytes(), m);
        }
    }
}
