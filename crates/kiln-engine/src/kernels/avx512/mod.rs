//! AVX-512 kernels (F, BW, VL, VNNI) for the 32-value block formats (Q4_0,
//! Q4_1, Q5_0, Q8_0): a register-tiled product of eight weight rows with up
//! to four inputs at a time, bit-identical to [`super::scalar`]; Q6_K, tiled
//! the same way, is in [`q6k`].
//!
//! Why it is the same arithmetic: the portable kernel forms, per block, eight
//! exact integer lane sums (lane `k` = Σ of values `4k..4k+4` times the
//! activations), converts them to f32, and fuses them into an 8-lane
//! accumulator with the scale `d_w · d_y`. Here a 512-bit register holds two
//! weight rows' 8-lane accumulators side by side (lanes 0..8 and 8..16), and
//! `vpdpbusd` forms exactly the same 4-value integer sums. It wants unsigned
//! weights, so each format's values are taken with a bias that makes them
//! non-negative (Q8_0 + 128, Q4_0 + 8, Q5_0 + 16, Q4_1 as stored) and the
//! bias times each lane's activation sum is subtracted first — integer
//! arithmetic, exact. The float steps (the scale product, the fused
//! multiply-add, the final `hsum_float_8` fold and Q4_1's `m · s` chain) are
//! the scalar code's, lane for lane.
//!
//! What the tiling buys: a tile decodes each weight block once for all its
//! inputs and loads each activation block once for all its eight rows, so a
//! block costs four vector instructions per row pair and input (integer dot,
//! convert, scale, fused add) instead of a dozen. Each output value is still
//! computed from its own row and input alone, so results do not depend on the
//! batch, the tile an input lands in, or the thread count.
//!
//! Single inputs (decode at batch 1), the other formats (Q4_K, F16, F32),
//! and rows past the last whole group of eight go to the AVX2 kernels (the
//! CPUs this variant runs on have AVX2).

use std::arch::x86_64::*;

use super::avx2::tiles::Q0;
use super::avx2::{self, load_u8x16, load_u8x32};
use super::quantize::{Activations, Q8Row, QK, QK_K};
use super::DotKind;

/// The first four bytes of block `at` of each of eight rows (`rows`, whole
/// rows of `row_bytes`), one i32 lane per row: the f16 `d` (and Q4_1's `m`,
/// Q4_K's `dmin`) in its halves. A macro so it is always inlined into the
/// tiles (a call per block costs several percent).
macro_rules! heads8 {
    ($rows:expr, $row_bytes:expr, $at:expr) => {{
        let (rows, row_bytes, at) = ($rows, $row_bytes, $at);
        _mm256_setr_epi32(
            head(rows, at),
            head(rows, row_bytes + at),
            head(rows, 2 * row_bytes + at),
            head(rows, 3 * row_bytes + at),
            head(rows, 4 * row_bytes + at),
            head(rows, 5 * row_bytes + at),
            head(rows, 6 * row_bytes + at),
            head(rows, 7 * row_bytes + at),
        )
    }};
}

mod q4k;
mod q6k;

/// Row pairs per tile (a tile is `2 * PAIRS` weight rows).
pub(super) const PAIRS: usize = 4;
pub(super) const TILE_ROWS: usize = 2 * PAIRS;
/// Batches smaller than this take the AVX2 kernels, which read one weight
/// row after another: with a single input the product is bound by reading
/// the weights, and that order streams them best.
const SINGLE_ROW_BELOW: usize = 2;
/// Inputs per tile (at most; a batch's last tile takes what is left).
const INPUTS: usize = 4;

impl Q0 {
    /// What is added to a signed value to make it the unsigned byte the
    /// kernel multiplies (Q4_1's values are unsigned already).
    fn bias(self) -> u8 {
        match self {
            Q0::Q4_0 => 8,
            Q0::Q4_1 => 0,
            Q0::Q5_0 => 16,
            Q0::Q8_0 => 128,
        }
    }
}

/// The AVX-512 version of `super::compute_rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) fn compute_rows(
    kind: DotKind,
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    outs: &mut [&mut [f32]],
) {
    if outs.len() < SINGLE_ROW_BELOW {
        return avx2::compute_rows(kind, w, row_bytes, acts, outs);
    }
    // The format is a const parameter so each gets its own compiled copy.
    match Q0::of(kind) {
        Some(Q0::Q4_0) => tiles::<{ Q0::Q4_0 as u8 }>(w, row_bytes, acts, outs),
        Some(Q0::Q4_1) => tiles::<{ Q0::Q4_1 as u8 }>(w, row_bytes, acts, outs),
        Some(Q0::Q5_0) => tiles::<{ Q0::Q5_0 as u8 }>(w, row_bytes, acts, outs),
        Some(Q0::Q8_0) => tiles::<{ Q0::Q8_0 as u8 }>(w, row_bytes, acts, outs),
        None if matches!(kind, DotKind::Q6K | DotKind::Q4KRepacked) => {
            k_tiles(kind, w, row_bytes, acts, outs)
        }
        None => avx2::compute_rows(kind, w, row_bytes, acts, outs),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn tiles<const F: u8>(w: &[u8], row_bytes: usize, acts: &Activations, outs: &mut [&mut [f32]]) {
    let fmt = Q0::from_const(F);
    let rows = w.len() / row_bytes;
    let tiled = rows - rows % TILE_ROWS;
    let n = outs.len();
    let groups: Vec<Group> = (0..n)
        .step_by(INPUTS)
        .map(|first| Group::pack(fmt, acts, first, INPUTS.min(n - first)))
        .collect();
    for t in 0..tiled / TILE_ROWS {
        let tile_w = &w[t * TILE_ROWS * row_bytes..(t + 1) * TILE_ROWS * row_bytes];
        let r0 = t * TILE_ROWS;
        for g in &groups {
            match g.inputs {
                4 => tile::<F, 4>(tile_w, row_bytes, g, outs, r0),
                3 => tile::<F, 3>(tile_w, row_bytes, g, outs, r0),
                2 => tile::<F, 2>(tile_w, row_bytes, g, outs, r0),
                _ => tile::<F, 1>(tile_w, row_bytes, g, outs, r0),
            }
        }
    }
    if tiled < rows {
        let mut rest: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[tiled..]).collect();
        avx2::compute_rows(
            fmt.kind(),
            &w[tiled * row_bytes..],
            row_bytes,
            acts,
            &mut rest,
        );
    }
}

/// Up to [`INPUTS`] consecutive activation rows interleaved block by block,
/// so a tile walks one stream per kind of data: block `b` of input `c` is
/// `qs[(b·C + c)·32..]`, its bias correction `offsets[(b·C + c)·8..]` (eight
/// lanes), its scale `d[b·C + c]` and Q4_1's `s[b·C + c]`.
struct Group {
    first: usize,
    inputs: usize,
    qs: Vec<i8>,
    offsets: Vec<i32>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Group {
    fn pack(fmt: Q0, acts: &Activations, first: usize, inputs: usize) -> Group {
        let rows: Vec<Q8Row<'_>> = (first..first + inputs).map(|i| acts.q8_row(i)).collect();
        let nb = rows[0].d.len();
        let bias = i32::from(fmt.bias());
        let mut g = Group {
            first,
            inputs,
            qs: Vec::with_capacity(nb * inputs * QK),
            offsets: Vec::with_capacity(nb * inputs * 8),
            d: Vec::with_capacity(nb * inputs),
            s: Vec::with_capacity(if fmt == Q0::Q4_1 { nb * inputs } else { 0 }),
        };
        for b in 0..nb {
            for y in &rows {
                let q = &y.qs[b * QK..(b + 1) * QK];
                g.qs.extend_from_slice(q);
                // −bias · Σ of each lane's four activations: exact in i32.
                g.offsets.extend(
                    q.chunks_exact(4)
                        .map(|l| -bias * l.iter().map(|&v| i32::from(v)).sum::<i32>()),
                );
                g.d.push(y.d[b]);
                if fmt == Q0::Q4_1 {
                    g.s.push(y.s[b]);
                }
            }
        }
        g
    }
}

/// Inputs per K-quant tile: two i32 accumulators per row pair and input,
/// with the pairs' weights and scales, fill the 32 registers.
const K_INPUTS: usize = 2;

/// The Q6_K and repacked Q4_K products: eight-row tiles times groups of
/// [`K_INPUTS`] inputs ([`q6k::tile`], [`q4k::tile`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn k_tiles(kind: DotKind, w: &[u8], row_bytes: usize, acts: &Activations, outs: &mut [&mut [f32]]) {
    let rows = w.len() / row_bytes;
    let tiled = rows - rows % TILE_ROWS;
    let n = outs.len();
    let groups: Vec<Q8KGroup> = (0..n)
        .step_by(K_INPUTS)
        .map(|first| Q8KGroup::pack(acts, first, K_INPUTS.min(n - first)))
        .collect();
    for t in 0..tiled / TILE_ROWS {
        let tile_w = &w[t * TILE_ROWS * row_bytes..(t + 1) * TILE_ROWS * row_bytes];
        let r0 = t * TILE_ROWS;
        for g in &groups {
            match (kind, g.inputs) {
                (DotKind::Q6K, 2) => q6k::tile::<2>(tile_w, row_bytes, g, outs, r0),
                (DotKind::Q6K, _) => q6k::tile::<1>(tile_w, row_bytes, g, outs, r0),
                (_, 2) => q4k::tile::<2>(tile_w, row_bytes, g, outs, r0),
                _ => q4k::tile::<1>(tile_w, row_bytes, g, outs, r0),
            }
        }
    }
    if tiled < rows {
        // Only Q6_K (a repacked Q4_K matrix has a multiple of 8 rows, and
        // shares split at multiples of 8).
        let mut rest: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[tiled..]).collect();
        avx2::compute_rows(kind, &w[tiled * row_bytes..], row_bytes, acts, &mut rest);
    }
}

/// Up to a few Q8_K activation rows interleaved block by block for the
/// K-quant tiles: block `b` of input `c` is `qs[(b·C + c)·256..]`,
/// `bsums[(b·C + c)·16..]`, `pair_sums[(b·C + c)·8..]` (`bsum_2j +
/// bsum_2j+1`, the sums of each 32-value sub-block) and `d[b·C + c]`.
pub(super) struct Q8KGroup {
    first: usize,
    inputs: usize,
    qs: Vec<i8>,
    bsums: Vec<i16>,
    pair_sums: Vec<i16>,
    d: Vec<f32>,
}

impl Q8KGroup {
    pub(super) fn pack(acts: &Activations, first: usize, inputs: usize) -> Q8KGroup {
        let rows: Vec<_> = (first..first + inputs).map(|i| acts.q8k_row(i)).collect();
        let nb = rows[0].d.len();
        let mut g = Q8KGroup {
            first,
            inputs,
            qs: Vec::with_capacity(nb * inputs * QK_K),
            bsums: Vec::with_capacity(nb * inputs * 16),
            pair_sums: Vec::with_capacity(nb * inputs * 8),
            d: Vec::with_capacity(nb * inputs),
        };
        for b in 0..nb {
            for y in &rows {
                let bs = &y.bsums[b * 16..(b + 1) * 16];
                g.qs.extend_from_slice(&y.qs[b * QK_K..(b + 1) * QK_K]);
                g.bsums.extend_from_slice(bs);
                // |Σ of 32 quants| ≤ 32 · 128: an i16.
                g.pair_sums.extend(bs.chunks_exact(2).map(|p| p[0] + p[1]));
                g.d.push(y.d[b]);
            }
        }
        g
    }
}

/// A row pair's 32 bytes at `at` of each row, row `a`'s in the low half.
#[inline]
#[target_feature(enable = "avx512f,avx2")]
pub(super) fn pair_u8x32(a: &[u8], b: &[u8], at: usize) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(load_u8x32(&a[at..])),
        load_u8x32(&b[at..]),
    )
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load_i16x16(s: &[i16]) -> __m256i {
    let s = &s[..16];
    // SAFETY: `s` is 16 readable i16s; unaligned load.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// Lane indices that spread row `2p`'s value over lanes 0..8 and row
/// `2p + 1`'s over lanes 8..16.
const PAIR_INDEX: [[i32; 16]; PAIRS] = {
    let mut idx = [[0; 16]; PAIRS];
    let mut p = 0;
    while p < PAIRS {
        let mut l = 0;
        while l < 16 {
            idx[p][l] = (2 * p + l / 8) as i32;
            l += 1;
        }
        p += 1;
    }
    idx
};

/// Eight weight rows (`rows`, whole rows) times the `C` inputs of group `g`,
/// into `outs[g.first + c][r0..r0 + 8]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn tile<const F: u8, const C: usize>(
    rows: &[u8],
    row_bytes: usize,
    g: &Group,
    outs: &mut [&mut [f32]],
    r0: usize,
) {
    let fmt = Q0::from_const(F);
    let bb = fmt.block_bytes();
    let index = PAIR_INDEX.map(|i| load_i32x16(&i));
    let mut acc = [[_mm512_setzero_ps(); C]; PAIRS];
    // Q4_1's `m · s` chains, one lane per row.
    let mut mins = [_mm256_setzero_ps(); C];
    let blocks =
        g.qs.chunks_exact(C * QK)
            .zip(g.offsets.chunks_exact(C * 8))
            .zip(g.d.chunks_exact(C));
    for (blk, ((qs, offsets), d_y)) in blocks.enumerate() {
        let at = blk * bb;
        // The first four bytes of each row's block: `d` (and Q4_1's `m`).
        let heads = heads8!(rows, row_bytes, at);
        let d = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm256_cvtepi32_epi16(heads)));
        let mut wv = [_mm512_setzero_si512(); PAIRS];
        let mut dw = [_mm512_setzero_ps(); PAIRS];
        for p in 0..PAIRS {
            let a = 2 * p * row_bytes + at;
            wv[p] = values::<F>(&rows[a..a + bb], &rows[a + row_bytes..a + row_bytes + bb]);
            dw[p] = _mm512_permutexvar_ps(index[p], d);
        }
        for c in 0..C {
            let x = broadcast_i8x32(&qs[c * QK..]);
            let offset = if fmt.bias() == 0 {
                _mm512_setzero_si512()
            } else {
                broadcast_i32x8(&offsets[c * 8..])
            };
            let dy = _mm512_set1_ps(d_y[c]);
            for p in 0..PAIRS {
                let sums = _mm512_dpbusd_epi32(offset, wv[p], x);
                acc[p][c] = _mm512_fmadd_ps(
                    _mm512_mul_ps(dw[p], dy),
                    _mm512_cvtepi32_ps(sums),
                    acc[p][c],
                );
            }
        }
        if fmt == Q0::Q4_1 {
            let m = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32::<16>(heads)));
            for (c, min) in mins.iter_mut().enumerate() {
                *min = _mm256_fmadd_ps(m, _mm256_set1_ps(g.s[blk * C + c]), *min);
            }
        }
    }
    for c in 0..C {
        let mut min = [0f32; TILE_ROWS];
        // SAFETY: `min` is 8 writable f32s; unaligned store.
        unsafe { _mm256_storeu_ps(min.as_mut_ptr(), mins[c]) };
        let out = &mut outs[g.first + c][r0..r0 + TILE_ROWS];
        for (p, v) in acc.iter().map(|lanes| lanes[c]).enumerate() {
            let [lo, hi] = fold_pair(v);
            if fmt == Q0::Q4_1 {
                out[2 * p] = lo + min[2 * p];
                out[2 * p + 1] = hi + min[2 * p + 1];
            } else {
                out[2 * p] = lo;
                out[2 * p + 1] = hi;
            }
        }
    }
}

/// A row pair's accumulators folded as `hsum_float_8` folds each: lanes
/// 0..8 (the pair's first row), then lanes 8..16.
#[inline]
#[target_feature(enable = "avx512f,avx2")]
pub(super) fn fold_pair(v: __m512) -> [f32; 2] {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    [avx2::hsum8(_mm512_castps512_ps256(v)), avx2::hsum8(hi)]
}

/// The four bytes at `at` as an i32 (a block's f16 scale, then Q4_1's min).
#[inline]
pub(super) fn head(rows: &[u8], at: usize) -> i32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&rows[at..at + 4]);
    i32::from_le_bytes(b)
}

/// A block pair's 64 values as unsigned bytes (row `a`'s 32 in bytes 0..32,
/// row `b`'s in 32..64), each its signed value plus the format's bias.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
fn values<const F: u8>(a: &[u8], b: &[u8]) -> __m512i {
    match Q0::from_const(F) {
        Q0::Q8_0 => _mm512_xor_si512(
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(load_u8x32(&a[2..])),
                load_u8x32(&b[2..]),
            ),
            _mm512_set1_epi8(0x80u8 as i8),
        ),
        Q0::Q4_0 => nibble_pair(&a[2..], &b[2..]),
        Q0::Q4_1 => nibble_pair(&a[4..], &b[4..]),
        Q0::Q5_0 => {
            let nib = nibble_pair(&a[6..], &b[6..]);
            let high = u64::from(u32_at(a, 2)) | u64::from(u32_at(b, 2)) << 32;
            _mm512_mask_add_epi8(nib, high, nib, _mm512_set1_epi8(16))
        }
    }
}

/// Two blocks' 16 bytes of nibbles as 64 bytes: row `a`'s low nibbles, its
/// high nibbles, then row `b`'s.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
fn nibble_pair(a: &[u8], b: &[u8]) -> __m512i {
    let both = _mm256_set_m128i(load_u8x16(b), load_u8x16(a));
    // 128-bit lanes: a, b, a >> 4, b >> 4 ...
    let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(both), _mm256_srli_epi16::<4>(both));
    // ... reordered to a, a >> 4, b, b >> 4.
    let z = _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z);
    _mm512_and_si512(z, _mm512_set1_epi8(0xF))
}

#[inline]
fn u32_at(b: &[u8], at: usize) -> u32 {
    head(b, at) as u32
}

/// 32 activation bytes in both 256-bit halves.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn broadcast_i8x32(s: &[i8]) -> __m512i {
    let s = &s[..32];
    // SAFETY: `s` is 32 readable bytes; unaligned load.
    _mm512_broadcast_i64x4(unsafe { _mm256_loadu_si256(s.as_ptr().cast()) })
}

/// Eight i32s in both 256-bit halves.
#[inline]
#[target_feature(enable = "avx512f")]
fn broadcast_i32x8(s: &[i32]) -> __m512i {
    let s = &s[..8];
    // SAFETY: `s` is 8 readable i32s; unaligned load.
    _mm512_broadcast_i64x4(unsafe { _mm256_loadu_si256(s.as_ptr().cast()) })
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load_i32x16(s: &[i32; 16]) -> __m512i {
    // SAFETY: `s` is 16 readable i32s; unaligned load.
    unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
}
