//! AVX2 register tiles for the 32-value block formats (Q4_0, Q4_1, Q5_0,
//! Q8_0) and Q6_K when a product has more than one input (prefill, batched
//! decode).
//!
//! The per-row kernels in the parent module decode a weight block for every
//! input it meets and reload an activation block for every row. A tile of
//! [`ROWS`] weight rows times up to [`INPUTS`] inputs decodes each weight
//! block once for all its inputs and loads each activation block once for
//! all its rows, which leaves, per row, input and block, the integer dot
//! product (`vpsignb`, `vpmaddubsw`, `vpmaddwd`), its conversion, the scale
//! product and one fused multiply-add. A Q6_K tile is one row (its decoded
//! values and chunk scales fill the registers) times up to [`INPUTS`]
//! inputs.
//!
//! It is the same arithmetic as the per-row kernels and so as
//! [`super::super::scalar`]: every accumulator is one row's and one input's
//! 8-lane sum, fed block by block in the same order with the same exact
//! integer lane sums and the same `d_w · d_y` scale, folded by the same
//! `hsum_float_8`; Q4_1's `m · s` chain is the same scalar fused multiply-add
//! per block. No value depends on which tile or batch its row and input
//! landed in.
//!
//! Inputs are taken [`CHUNK`] at a time, and every row of the share passes
//! over one chunk before the next: the chunk's activations stay in the
//! core's first caches while the weights stream past them.

use std::arch::x86_64::*;

use super::super::quantize::{Activations, Q8KRow, Q8Row, QK, QK_K};
use super::super::DotKind;
use super::{
    dot_u8_i8, f16_at, hsum8, load_i8x32, q4_0_values, q4_1_values, q5_0_values, q6k_offset,
    q6k_scale, q6k_scales16, q6k_values, q8_0_values,
};

/// Weight rows per tile: each needs two registers (its values and their
/// magnitudes), and with [`INPUTS`] inputs the eight accumulators, the
/// activation block and the temporaries fill the sixteen.
const ROWS: usize = 2;
/// Inputs per tile (at most; a chunk's last tile takes what is left).
const INPUTS: usize = 4;
/// Inputs whose activations every row of the share meets before the next
/// ones: 64 rows of Q8 activations of a 2,048-wide matrix are 136 KiB, well
/// inside a core's second-level cache.
const CHUNK: usize = 64;

/// A 32-value block format; a tile's `const F: u8` parameter is one of
/// these discriminants, so every format gets its own compiled copy.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(in crate::kernels) enum Q0 {
    Q4_0 = 0,
    Q4_1 = 1,
    Q5_0 = 2,
    Q8_0 = 3,
}

impl Q0 {
    pub(in crate::kernels) fn of(kind: DotKind) -> Option<Q0> {
        match kind {
            DotKind::Q4_0 => Some(Q0::Q4_0),
            DotKind::Q4_1 => Some(Q0::Q4_1),
            DotKind::Q5_0 => Some(Q0::Q5_0),
            DotKind::Q8_0 => Some(Q0::Q8_0),
            _ => None,
        }
    }

    /// The format a `const F: u8` parameter stands for (its discriminant).
    pub(in crate::kernels) const fn from_const(f: u8) -> Q0 {
        match f {
            0 => Q0::Q4_0,
            1 => Q0::Q4_1,
            2 => Q0::Q5_0,
            _ => Q0::Q8_0,
        }
    }

    pub(in crate::kernels) fn kind(self) -> DotKind {
        match self {
            Q0::Q4_0 => DotKind::Q4_0,
            Q0::Q4_1 => DotKind::Q4_1,
            Q0::Q5_0 => DotKind::Q5_0,
            Q0::Q8_0 => DotKind::Q8_0,
        }
    }

    pub(in crate::kernels) fn block_bytes(self) -> usize {
        match self {
            Q0::Q4_0 => 18,
            Q0::Q4_1 => 20,
            Q0::Q5_0 => 22,
            Q0::Q8_0 => 34,
        }
    }
}

/// `outs[i][r]` = weight row `r` of `w` (whole rows of `row_bytes`) times
/// input `i`, for a 32-value block format or Q6_K; `None` for the other
/// formats, which the caller multiplies row by row. (Repacked Q4_K already
/// takes eight rows per input in the parent module; a tile over inputs,
/// measured, was slower.)
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn compute_rows(
    kind: DotKind,
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    outs: &mut [&mut [f32]],
) -> Option<()> {
    match kind {
        DotKind::Q6K => q6k_tiles(w, row_bytes, acts, outs),
        _ => q0_tiles(kind, w, row_bytes, acts, outs)?,
    }
    Some(())
}

/// The 32-value block formats' products; `None` for any other format.
#[target_feature(enable = "avx2,fma,f16c")]
fn q0_tiles(
    kind: DotKind,
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    outs: &mut [&mut [f32]],
) -> Option<()> {
    match Q0::of(kind)? {
        Q0::Q4_0 => tiles::<{ Q0::Q4_0 as u8 }>(w, row_bytes, acts, outs),
        Q0::Q4_1 => tiles::<{ Q0::Q4_1 as u8 }>(w, row_bytes, acts, outs),
        Q0::Q5_0 => tiles::<{ Q0::Q5_0 as u8 }>(w, row_bytes, acts, outs),
        Q0::Q8_0 => tiles::<{ Q0::Q8_0 as u8 }>(w, row_bytes, acts, outs),
    }
    Some(())
}

#[target_feature(enable = "avx2,fma,f16c")]
fn tiles<const F: u8>(w: &[u8], row_bytes: usize, acts: &Activations, outs: &mut [&mut [f32]]) {
    let n = outs.len();
    let ys: Vec<Q8Row<'_>> = (0..n).map(|i| acts.q8_row(i)).collect();
    for first in (0..n).step_by(CHUNK) {
        let last = (first + CHUNK).min(n);
        for (t, tile_w) in w.chunks(ROWS * row_bytes).enumerate() {
            let r0 = t * ROWS;
            for c0 in (first..last).step_by(INPUTS) {
                let ys = &ys[c0..last.min(c0 + INPUTS)];
                match (tile_w.len() / row_bytes, ys.len()) {
                    (2, 4) => tile::<F, 2, 4>(tile_w, row_bytes, ys, outs, r0, c0),
                    (2, 3) => tile::<F, 2, 3>(tile_w, row_bytes, ys, outs, r0, c0),
                    (2, 2) => tile::<F, 2, 2>(tile_w, row_bytes, ys, outs, r0, c0),
                    (2, _) => tile::<F, 2, 1>(tile_w, row_bytes, ys, outs, r0, c0),
                    (_, 4) => tile::<F, 1, 4>(tile_w, row_bytes, ys, outs, r0, c0),
                    (_, 3) => tile::<F, 1, 3>(tile_w, row_bytes, ys, outs, r0, c0),
                    (_, 2) => tile::<F, 1, 2>(tile_w, row_bytes, ys, outs, r0, c0),
                    _ => tile::<F, 1, 1>(tile_w, row_bytes, ys, outs, r0, c0),
                }
            }
        }
    }
}

/// A block's 32 values: signed for Q4_0, Q5_0 and Q8_0, unsigned for Q4_1.
#[inline]
#[target_feature(enable = "avx2")]
fn values<const F: u8>(b: &[u8]) -> __m256i {
    match Q0::from_const(F) {
        Q0::Q4_0 => q4_0_values(b),
        Q0::Q4_1 => q4_1_values(b),
        Q0::Q5_0 => q5_0_values(b),
        Q0::Q8_0 => q8_0_values(b),
    }
}

/// `R` weight rows (`rows`, whole rows) times the `C` inputs `ys`, into
/// `outs[c0 + c][r0 + r]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn tile<const F: u8, const R: usize, const C: usize>(
    rows: &[u8],
    row_bytes: usize,
    ys: &[Q8Row<'_>],
    outs: &mut [&mut [f32]],
    r0: usize,
    c0: usize,
) {
    let fmt = Q0::from_const(F);
    let signed = fmt != Q0::Q4_1;
    let bb = fmt.block_bytes();
    let ys: [Q8Row<'_>; C] = std::array::from_fn(|c| ys[c]);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    // Q4_1's `m · s` chains.
    let mut mins = [[0f32; C]; R];
    for blk in 0..row_bytes / bb {
        let at = blk * bb;
        let mut wv = [_mm256_setzero_si256(); R];
        let mut magnitude = [_mm256_setzero_si256(); R];
        let mut dw = [_mm256_setzero_ps(); R];
        let mut mw = [0f32; R];
        for r in 0..R {
            let b = &rows[r * row_bytes + at..r * row_bytes + at + bb];
            dw[r] = _mm256_set1_ps(f16_at(b, 0));
            wv[r] = values::<F>(b);
            if signed {
                magnitude[r] = _mm256_sign_epi8(wv[r], wv[r]);
            } else {
                mw[r] = f16_at(b, 2);
            }
        }
        for (c, y) in ys.iter().enumerate() {
            let x = load_i8x32(&y.qs[blk * QK..]);
            let dy = _mm256_set1_ps(y.d[blk]);
            for r in 0..R {
                // Signed weights: |w| times x with w's sign, as `dot_i8_i8`.
                let sums = if signed {
                    dot_u8_i8(magnitude[r], _mm256_sign_epi8(x, wv[r]))
                } else {
                    dot_u8_i8(wv[r], x)
                };
                // `d_w · d_y` in every lane: the scalar code's product.
                acc[r][c] = _mm256_fmadd_ps(
                    _mm256_mul_ps(dw[r], dy),
                    _mm256_cvtepi32_ps(sums),
                    acc[r][c],
                );
                if !signed {
                    mins[r][c] = mw[r].mul_add(y.s[blk], mins[r][c]);
                }
            }
        }
    }
    for c in 0..C {
        let out = &mut outs[c0 + c][r0..r0 + R];
        for r in 0..R {
            let v = hsum8(acc[r][c]);
            out[r] = if signed { v } else { v + mins[r][c] };
        }
    }
}

/// The Q6_K product: one weight row at a time times up to [`INPUTS`]
/// inputs, each block's values and chunk scales decoded once for all of
/// them ([`q6k_tile`]).
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_tiles(w: &[u8], row_bytes: usize, acts: &Activations, outs: &mut [&mut [f32]]) {
    let n = outs.len();
    let ys: Vec<Q8KRow<'_>> = (0..n).map(|i| acts.q8k_row(i)).collect();
    for first in (0..n).step_by(CHUNK) {
        let last = (first + CHUNK).min(n);
        for (r, row) in w.chunks_exact(row_bytes).enumerate() {
            for c0 in (first..last).step_by(INPUTS) {
                let ys = &ys[c0..last.min(c0 + INPUTS)];
                match ys.len() {
                    4 => q6k_tile::<4>(row, ys, outs, r, c0),
                    3 => q6k_tile::<3>(row, ys, outs, r, c0),
                    2 => q6k_tile::<2>(row, ys, outs, r, c0),
                    _ => q6k_tile::<1>(row, ys, outs, r, c0),
                }
            }
        }
    }
}

/// Weight row `r` (`row`) times the `C` inputs `ys`, into `outs[c0 + c][r]`:
/// per input, `dot_q6_k`'s lane sums, offset, scale and fused add.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_tile<const C: usize>(
    row: &[u8],
    ys: &[Q8KRow<'_>],
    outs: &mut [&mut [f32]],
    r: usize,
    c0: usize,
) {
    let ys: [Q8KRow<'_>; C] = std::array::from_fn(|c| ys[c]);
    let mut acc = [_mm256_setzero_ps(); C];
    for (i, b) in row.chunks_exact(210).enumerate() {
        let mut sumi = [_mm256_setzero_si256(); C];
        for half in 0..2 {
            let q = q6k_values(b, half);
            for (k, &qk) in q.iter().enumerate() {
                let chunk = 4 * half + k;
                let sc = q6k_scale(b, chunk);
                for (s, y) in sumi.iter_mut().zip(&ys) {
                    let x = load_i8x32(&y.qs[i * QK_K + 32 * chunk..]);
                    let p = _mm256_maddubs_epi16(qk, x);
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(sc, p));
                }
            }
        }
        let dw = f16_at(b, 208);
        let scales16 = q6k_scales16(b);
        for ((a, s), y) in acc.iter_mut().zip(sumi).zip(&ys) {
            let s = _mm256_sub_epi32(s, q6k_offset(scales16, &y.bsums[i * 16..]));
            *a = _mm256_fmadd_ps(_mm256_set1_ps(y.d[i] * dw), _mm256_cvtepi32_ps(s), *a);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        outs[c0 + c][r] = hsum8(*a);
    }
}
