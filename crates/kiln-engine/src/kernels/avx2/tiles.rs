//! AVX2 register tiles for the 32-value block formats (Q4_0, Q4_1, Q5_0,
//! Q8_0), repacked Q4_K and Q6_K when a product has more than one input
//! (prefill, batched decode).
//!
//! The per-row kernels in the parent module decode a weight block for every
//! input it meets. A tile is one weight row times up to [`INPUTS`] inputs:
//! each weight block is decoded once for all of them, which leaves, per
//! input and block, the integer dot product and its scaling. For the
//! 32-value formats that is `vpsignb`, `vpmaddubsw`, `vpmaddwd`, the
//! conversion, the scale product and one fused multiply-add per 32 values;
//! the K-quants keep a whole 256-value block in integers and scale it once.
//!
//! It is the same arithmetic as the per-row kernels and so as
//! [`super::super::scalar`], and no value depends on which tile or batch
//! its row and input landed in:
//! - 32-value formats and Q6_K: every accumulator is one row's and one
//!   input's 8-lane sum, fed block by block in the same order with the same
//!   exact integer lane sums and the same `d_w · d_y` scale, folded by the
//!   same `hsum_float_8`; Q4_1's `m · s` chain is the same fused
//!   multiply-add per block (one lane per input).
//! - Repacked Q4_K: as the eight-row kernel keeps one lane per row, the tile
//!   keeps one lane per input: the block's exact integer sum and mins, each
//!   fused with its scale product block by block.
//!
//! Lengths are checked once per tile and the block loops read the inputs'
//! quants through pointers: bounds checks there cost as many instructions as
//! the arithmetic and spilled the registers.
//!
//! Inputs are taken [`CHUNK`] at a time, and every row of the share passes
//! over one chunk before the next: the chunk's activations stay in the
//! core's caches while the weights stream past them.

use std::arch::x86_64::*;

use super::super::quantize::{Activations, Q8KRow, Q8Row, QK, QK_K};
use super::super::scalar::q4k_scales;
use super::super::DotKind;
use super::{
    dot_u8_i8, f16_at, hsum8, load_f32x8, load_u8x32, q4_0_values, q4_1_values, q5_0_values,
    q6k_offset, q6k_scale, q6k_scale_halves, q6k_scales16, q6k_values, q8_0_values, store_f32x8,
    transpose_sum,
};

/// Inputs per 32-value-format tile (at most; the last group takes what is
/// left): one accumulator each, and with the row's values and magnitudes,
/// the activation block and the temporaries they fit the sixteen registers.
const INPUTS: usize = 8;
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
/// input `i`, for a 32-value block format, repacked Q4_K or Q6_K; `None`
/// for the other formats, which the caller multiplies row by row.
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
        DotKind::Q4KRepacked => q4k_tiles(w, row_bytes, acts, outs),
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

/// Up to [`INPUTS`] inputs as a tile reads them: their activation rows,
/// and per block their scales side by side (Q4_1: their sums too, zero for
/// the other formats), so one multiply forms a weight block's scale product
/// with every input of the group.
struct Group<'a> {
    /// Index of the group's first input.
    first: usize,
    ys: Vec<Q8Row<'a>>,
    d: Vec<[f32; INPUTS]>,
    s: Vec<[f32; INPUTS]>,
}

impl<'a> Group<'a> {
    fn new(acts: &'a Activations, first: usize, len: usize, blocks: usize, sums: bool) -> Self {
        let ys: Vec<Q8Row<'a>> = (first..first + len).map(|i| acts.q8_row(i)).collect();
        let side_by_side = |field: fn(&Q8Row<'a>) -> &'a [f32]| -> Vec<[f32; INPUTS]> {
            (0..blocks)
                .map(|blk| std::array::from_fn(|c| ys.get(c).map_or(0.0, |y| field(y)[blk])))
                .collect()
        };
        let d = side_by_side(|y| y.d);
        let s = if sums {
            side_by_side(|y| y.s)
        } else {
            vec![[0.0; INPUTS]; blocks]
        };
        Group { first, ys, d, s }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn tiles<const F: u8>(w: &[u8], row_bytes: usize, acts: &Activations, outs: &mut [&mut [f32]]) {
    let fmt = Q0::from_const(F);
    let blocks = row_bytes / fmt.block_bytes();
    let n = outs.len();
    let groups: Vec<Group<'_>> = (0..n)
        .step_by(INPUTS)
        .map(|first| Group::new(acts, first, INPUTS.min(n - first), blocks, fmt == Q0::Q4_1))
        .collect();
    let mut scales = vec![[0f32; INPUTS]; blocks];
    for chunk in groups.chunks(CHUNK / INPUTS) {
        for (r, row) in w.chunks_exact(row_bytes).enumerate() {
            for g in chunk {
                let s = &mut scales;
                match g.ys.len() {
                    8 => tile::<F, 8>(row, g, s, outs, r),
                    7 => tile::<F, 7>(row, g, s, outs, r),
                    6 => tile::<F, 6>(row, g, s, outs, r),
                    5 => tile::<F, 5>(row, g, s, outs, r),
                    4 => tile::<F, 4>(row, g, s, outs, r),
                    3 => tile::<F, 3>(row, g, s, outs, r),
                    2 => tile::<F, 2>(row, g, s, outs, r),
                    _ => tile::<F, 1>(row, g, s, outs, r),
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

/// One weight row (`row`, `row_bytes` long) times the group's `C` inputs,
/// into `outs[g.first + c][r]`.
///
/// The quants' lengths are checked once on entry and read through pointers
/// in the block loop: bounds checks there cost as many instructions as the
/// arithmetic and spill the tile's registers.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn tile<const F: u8, const C: usize>(
    row: &[u8],
    g: &Group<'_>,
    scales: &mut [[f32; INPUTS]],
    outs: &mut [&mut [f32]],
    r: usize,
) {
    let fmt = Q0::from_const(F);
    let signed = fmt != Q0::Q4_1;
    let bb = fmt.block_bytes();
    let blocks = row.len() / bb;
    let ys = &g.ys[..C];
    assert!(ys.iter().all(|y| y.qs.len() >= blocks * QK));
    let qs: [*const i8; C] = std::array::from_fn(|c| ys[c].qs.as_ptr());
    // `d_w · d_y` of every block and input, the scalar code's products,
    // formed ahead so the block loop broadcasts each from memory (a load)
    // rather than from a register (a shuffle and a broadcast).
    for ((sc, b), d) in scales.iter_mut().zip(row.chunks_exact(bb)).zip(&g.d) {
        store_f32x8(
            sc,
            _mm256_mul_ps(_mm256_set1_ps(f16_at(b, 0)), load_f32x8(d)),
        );
    }
    let mut acc = [_mm256_setzero_ps(); C];
    // Q4_1's `m · s` chains, one lane per input.
    let mut mins = _mm256_setzero_ps();
    for (blk, ((b, sc), s)) in row
        .chunks_exact(bb)
        .zip(scales.iter())
        .zip(&g.s)
        .enumerate()
    {
        let wv = values::<F>(b);
        let magnitude = if signed { _mm256_sign_epi8(wv, wv) } else { wv };
        if !signed {
            mins = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b, 2)), load_f32x8(s), mins);
        }
        for c in 0..C {
            // SAFETY: input `c` has at least `blocks · QK` quants (checked
            // on entry) and `blk < blocks`.
            let x = unsafe { _mm256_loadu_si256(qs[c].add(blk * QK).cast()) };
            // Signed weights: |w| times x with w's sign, as `dot_i8_i8`.
            let sums = if signed {
                dot_u8_i8(magnitude, _mm256_sign_epi8(x, wv))
            } else {
                dot_u8_i8(wv, x)
            };
            let scale = _mm256_broadcast_ss(&sc[c]);
            acc[c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[c]);
        }
    }
    let mut m = [0f32; INPUTS];
    store_f32x8(&mut m, mins);
    for c in 0..C {
        let v = hsum8(acc[c]);
        outs[g.first + c][r] = if signed { v } else { v + m[c] };
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
                    8 => q6k_tile::<8>(row, ys, outs, r, c0),
                    7 => q6k_tile::<7>(row, ys, outs, r, c0),
                    6 => q6k_tile::<6>(row, ys, outs, r, c0),
                    5 => q6k_tile::<5>(row, ys, outs, r, c0),
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
/// per input, `dot_q6_k`'s lane sums, offset, scale and fused add. The
/// quants are read through pointers, their lengths checked once on entry.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_tile<const C: usize>(
    row: &[u8],
    ys: &[Q8KRow<'_>],
    outs: &mut [&mut [f32]],
    r: usize,
    c0: usize,
) {
    let blocks = row.len() / 210;
    let ys: [Q8KRow<'_>; C] = std::array::from_fn(|c| ys[c]);
    assert!(ys.iter().all(|y| y.qs.len() >= blocks * QK_K));
    let qs: [*const i8; C] = std::array::from_fn(|c| ys[c].qs.as_ptr());
    let mut acc = [_mm256_setzero_ps(); C];
    for (i, b) in row.chunks_exact(210).enumerate() {
        let mut sumi = [_mm256_setzero_si256(); C];
        let scales16 = q6k_scales16(b);
        let halves = q6k_scale_halves(scales16);
        for half in 0..2 {
            let q = q6k_values(b, half);
            for (k, &qk) in q.iter().enumerate() {
                let chunk = 4 * half + k;
                let sc = q6k_scale(&halves, chunk);
                for (s, x) in sumi.iter_mut().zip(qs) {
                    // SAFETY: every input has at least `blocks · QK_K` quants
                    // (checked on entry), `i < blocks` and `32 · chunk + 32 ≤ QK_K`.
                    let x = unsafe { _mm256_loadu_si256(x.add(i * QK_K + 32 * chunk).cast()) };
                    let p = _mm256_maddubs_epi16(qk, x);
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(sc, p));
                }
            }
        }
        let dw = f16_at(b, 208);
        for ((a, s), y) in acc.iter_mut().zip(sumi).zip(&ys) {
            let s = _mm256_sub_epi32(s, q6k_offset(scales16, &y.bsums[i * 16..]));
            *a = _mm256_fmadd_ps(_mm256_set1_ps(y.d[i] * dw), _mm256_cvtepi32_ps(s), *a);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        outs[c0 + c][r] = hsum8(*a);
    }
}

/// Up to [`INPUTS`] Q8_K inputs as a Q4_K tile reads them: their activation
/// rows and, per block, their scales side by side and the sums of each of
/// the eight 32-quant sub-blocks side by side (as f32: exact, |Σ| ≤ 4,064).
struct KGroup<'a> {
    /// Index of the group's first input.
    first: usize,
    ys: Vec<Q8KRow<'a>>,
    d: Vec<[f32; INPUTS]>,
    sub_sums: Vec<[[f32; INPUTS]; 8]>,
}

impl<'a> KGroup<'a> {
    fn new(acts: &'a Activations, first: usize, len: usize, blocks: usize) -> Self {
        let ys: Vec<Q8KRow<'a>> = (first..first + len).map(|i| acts.q8k_row(i)).collect();
        let d = (0..blocks)
            .map(|blk| std::array::from_fn(|c| ys.get(c).map_or(0.0, |y| y.d[blk])))
            .collect();
        let sub_sums = (0..blocks)
            .map(|blk| {
                std::array::from_fn(|j| {
                    std::array::from_fn(|c| {
                        ys.get(c).map_or(0.0, |y| {
                            let bs = &y.bsums[blk * 16 + 2 * j..];
                            f32::from(bs[0]) + f32::from(bs[1])
                        })
                    })
                })
            })
            .collect();
        KGroup {
            first,
            ys,
            d,
            sub_sums,
        }
    }
}

/// The repacked Q4_K product (`scalar::dot_q4_k_repacked`): one weight row
/// at a time times up to [`INPUTS`] inputs, each block's scales and nibbles
/// decoded once for all of them ([`q4k_tile`]).
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_tiles(w: &[u8], row_bytes: usize, acts: &Activations, outs: &mut [&mut [f32]]) {
    let blocks = row_bytes / 144;
    let n = outs.len();
    let groups: Vec<KGroup<'_>> = (0..n)
        .step_by(INPUTS)
        .map(|first| KGroup::new(acts, first, INPUTS.min(n - first), blocks))
        .collect();
    for chunk in groups.chunks(CHUNK / INPUTS) {
        for (r, row) in w.chunks_exact(row_bytes).enumerate() {
            for g in chunk {
                match g.ys.len() {
                    8 => q4k_tile::<8>(row, g, outs, r),
                    7 => q4k_tile::<7>(row, g, outs, r),
                    6 => q4k_tile::<6>(row, g, outs, r),
                    5 => q4k_tile::<5>(row, g, outs, r),
                    4 => q4k_tile::<4>(row, g, outs, r),
                    3 => q4k_tile::<3>(row, g, outs, r),
                    2 => q4k_tile::<2>(row, g, outs, r),
                    _ => q4k_tile::<1>(row, g, outs, r),
                }
            }
        }
    }
}

/// One Q4_K weight row times the group's `C` inputs, into
/// `outs[g.first + c][r]`: per input, the block's exact integer sum
/// `Σ sc · Σ q4 · q8` and mins `Σ m · Σ q8` (one lane per input, as the
/// eight-row kernel has one lane per row), each fused with its scale
/// product block by block, then `acc − acc_min`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_tile<const C: usize>(row: &[u8], g: &KGroup<'_>, outs: &mut [&mut [f32]], r: usize) {
    let blocks = row.len() / 144;
    let ys = &g.ys[..C];
    assert!(ys.iter().all(|y| y.qs.len() >= blocks * QK_K));
    let qs: [*const i8; C] = std::array::from_fn(|c| ys[c].qs.as_ptr());
    let nibble = _mm256_set1_epi8(0xF);
    let mut acc = _mm256_setzero_ps();
    let mut acc_min = _mm256_setzero_ps();
    for (blk, ((b, d), sub_sums)) in row.chunks_exact(144).zip(&g.d).zip(&g.sub_sums).enumerate() {
        let (sc, m) = q4k_scales(&b[4..16]);
        let mut sums = [_mm256_setzero_si256(); INPUTS];
        for k in 0..4 {
            let bits = load_u8x32(&b[16 + 32 * k..]);
            let lo = _mm256_and_si256(bits, nibble);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), nibble);
            let sc_lo = _mm256_set1_epi16(i16::from(sc[2 * k]));
            let sc_hi = _mm256_set1_epi16(i16::from(sc[2 * k + 1]));
            for (c, sum) in sums.iter_mut().take(C).enumerate() {
                // SAFETY: input `c` has at least `blocks · QK_K` quants
                // (checked on entry), `blk < blocks` and `64 · k + 64 ≤ QK_K`.
                let (x_lo, x_hi) = unsafe {
                    let x = qs[c].add(blk * QK_K + 64 * k);
                    (
                        _mm256_loadu_si256(x.cast()),
                        _mm256_loadu_si256(x.add(32).cast()),
                    )
                };
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x_lo), sc_lo);
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x_hi), sc_hi);
                *sum = _mm256_add_epi32(*sum, _mm256_add_epi32(p_lo, p_hi));
            }
        }
        // Σ m_j · (sub-block sum j): integers below 2^24, so exact in f32.
        let mut mins = _mm256_setzero_ps();
        for (&mj, s) in m.iter().zip(sub_sums) {
            mins = _mm256_fmadd_ps(_mm256_set1_ps(f32::from(mj)), load_f32x8(s), mins);
        }
        let dy = load_f32x8(d);
        acc = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(transpose_sum(&sums)),
            _mm256_mul_ps(_mm256_set1_ps(f16_at(b, 0)), dy),
            acc,
        );
        acc_min = _mm256_fmadd_ps(
            mins,
            _mm256_mul_ps(_mm256_set1_ps(f16_at(b, 2)), dy),
            acc_min,
        );
    }
    let mut out = [0f32; INPUTS];
    store_f32x8(&mut out, _mm256_sub_ps(acc, acc_min));
    for (c, v) in out.iter().take(C).enumerate() {
        outs[g.first + c][r] = *v;
    }
}
