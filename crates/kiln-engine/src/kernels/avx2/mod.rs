//! AVX2 + FMA + F16C kernels: the [`super::scalar`] kernels' arithmetic with
//! 256-bit registers. Integer sums are exact, so any instruction sequence
//! that forms them is fine; every float operation (conversion of a sum,
//! scale product, fused multiply-add, lane fold) is the scalar code's, on the
//! same values in the same order, so results are bit-identical.
//!
//! Weights whose ggml kernel keeps one accumulator per output row (the
//! repacked Q4_0 / Q4_K) are done eight rows at a time, each row's integer
//! block sum landing in its own lane of one accumulator, as in ggml.
//!
//! With one input (a decode step of one sequence), the 32-value formats go
//! four rows at a time: each row keeps its own accumulator and operations,
//! so its bits are the one-row kernel's, but four chains of fused
//! multiply-adds overlap where one row alone waits out each add's latency.
//!
//! Only [`compute_rows`] is called from outside; every function here needs
//! AVX2, FMA and F16C, which the caller checks at run time.

use std::arch::x86_64::*;

use super::quantize::{Activations, Q8KRow, Q8Row, QK, QK_K};
use super::scalar::{self, add_q4k_mins, q4k_scales};
use super::DotKind;

pub(super) mod tiles;

/// Runs `$body` (an output value for weight row `$row`, input `$i`) over
/// every row and input; a macro rather than a closure so the body is
/// compiled with this module's target features.
macro_rules! each_row {
    ($w:expr, $row_bytes:expr, $outs:expr, |$row:ident, $i:ident| $body:expr) => {
        for (r, $row) in $w.chunks_exact($row_bytes).enumerate() {
            for ($i, out) in $outs.iter_mut().enumerate() {
                out[r] = $body;
            }
        }
    };
}

/// Like `each_row!` for kernels that produce eight rows at once.
macro_rules! each_8_rows {
    ($w:expr, $row_bytes:expr, $outs:expr, |$rows:ident, $i:ident| $body:expr) => {
        for (g, $rows) in $w.chunks_exact(8 * $row_bytes).enumerate() {
            for ($i, out) in $outs.iter_mut().enumerate() {
                let v: [f32; 8] = $body;
                out[8 * g..8 * g + 8].copy_from_slice(&v);
            }
        }
    };
}

/// For the one input of `$acts` (Q8 activations): `$quad` (four rows at
/// once, `[f32; 4]`) over the rows four at a time, `$one` over the rest.
macro_rules! each_4_rows {
    ($w:expr, $row_bytes:expr, $acts:expr, $out:expr, $quad:ident, $one:ident) => {{
        let y = $acts.q8_row(0);
        let quads = $w.chunks_exact(4 * $row_bytes);
        let rest = quads.remainder();
        let done = 4 * quads.len();
        for (rows, out) in quads.zip($out.chunks_exact_mut(4)) {
            out.copy_from_slice(&$quad(rows, $row_bytes, y));
        }
        for (row, out) in rest.chunks_exact($row_bytes).zip(&mut $out[done..]) {
            *out = $one(row, y);
        }
    }};
}

/// The AVX2 version of `super::compute_rows`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn compute_rows(
    kind: DotKind,
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    outs: &mut [&mut [f32]],
) {
    if outs.len() > 1 && tiles::compute_rows(kind, w, row_bytes, acts, outs).is_some() {
        return;
    }
    if let [out] = outs {
        // One input: the 32-value formats go four rows at a time.
        match kind {
            DotKind::Q4_0 => return each_4_rows!(w, row_bytes, acts, out, dot4_q4_0, dot_q4_0),
            DotKind::Q4_1 => return each_4_rows!(w, row_bytes, acts, out, dot4_q4_1, dot_q4_1),
            DotKind::Q5_0 => return each_4_rows!(w, row_bytes, acts, out, dot4_q5_0, dot_q5_0),
            DotKind::Q8_0 => return each_4_rows!(w, row_bytes, acts, out, dot4_q8_0, dot_q8_0),
            _ => {}
        }
    }
    match kind {
        DotKind::F32 => each_row!(w, row_bytes, outs, |row, i| dot_f32(row, acts.float_row(i))),
        DotKind::F16 => each_row!(w, row_bytes, outs, |row, i| dot_f16(row, acts.float_row(i))),
        DotKind::Q4_0 => each_row!(w, row_bytes, outs, |row, i| dot_q4_0(row, acts.q8_row(i))),
        DotKind::Q4_1 => each_row!(w, row_bytes, outs, |row, i| dot_q4_1(row, acts.q8_row(i))),
        DotKind::Q5_0 => each_row!(w, row_bytes, outs, |row, i| dot_q5_0(row, acts.q8_row(i))),
        DotKind::Q8_0 => each_row!(w, row_bytes, outs, |row, i| dot_q8_0(row, acts.q8_row(i))),
        DotKind::Q4K => each_row!(w, row_bytes, outs, |row, i| dot_q4_k(row, acts.q8k_row(i))),
        DotKind::Q6K => each_row!(w, row_bytes, outs, |row, i| dot_q6_k(row, acts.q8k_row(i))),
        DotKind::Q4_0Repacked => {
            each_8_rows!(w, row_bytes, outs, |rows, i| dot8_q4_0_repacked(
                rows,
                row_bytes,
                acts.q8_row(i)
            ))
        }
        DotKind::Q4KRepacked => {
            each_8_rows!(w, row_bytes, outs, |rows, i| dot8_q4_k_repacked(
                rows,
                row_bytes,
                acts.q8k_row(i)
            ))
        }
    }
}

// ---- loads: bounds-checked slices, unaligned loads -------------------------

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load_u8x32(s: &[u8]) -> __m256i {
    let s = &s[..32];
    // SAFETY: `s` is 32 readable bytes; the load has no alignment requirement.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_i8x32(s: &[i8]) -> __m256i {
    let s = &s[..32];
    // SAFETY: as in `load_u8x32`.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_i16x16(s: &[i16]) -> __m256i {
    let s = &s[..16];
    // SAFETY: as in `load_u8x32` (16 × 2 bytes).
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_i16x8(s: &[i16]) -> __m128i {
    let s = &s[..8];
    // SAFETY: as in `load_u8x32` (8 × 2 bytes).
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_u32x8(s: &[u32]) -> __m256i {
    let s = &s[..8];
    // SAFETY: as in `load_u8x32` (8 × 4 bytes).
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load_u8x16(s: &[u8]) -> __m128i {
    let s = &s[..16];
    // SAFETY: as in `load_u8x32` (16 bytes).
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load_f32x8(s: &[f32]) -> __m256 {
    let s = &s[..8];
    // SAFETY: as in `load_u8x32` (8 × 4 bytes).
    unsafe { _mm256_loadu_ps(s.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn store_f32x8(s: &mut [f32], v: __m256) {
    let s = &mut s[..8];
    // SAFETY: `s` is 8 writable f32s; the store has no alignment requirement.
    unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
}

/// Eight little-endian f16 values (16 bytes) as f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn load_f16x8(s: &[u8]) -> __m256 {
    _mm256_cvtph_ps(load_u8x16(s))
}

/// The f16 at `b[at..at + 2]` as f32 (exact).
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn f16_at(b: &[u8], at: usize) -> f32 {
    let h = u16::from_le_bytes([b[at], b[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
}

// ---- integer helpers --------------------------------------------------------

/// Unsigned bytes `a` times signed bytes `b`, products of 4 consecutive
/// bytes summed into each i32 lane (exact for |a| ≤ 128, |b| ≤ 127).
#[inline]
#[target_feature(enable = "avx2")]
fn dot_u8_i8(a: __m256i, b: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
}

/// Signed bytes times signed bytes, as [`dot_u8_i8`]: the sign of `a` moves
/// onto `b` so `maddubs` sees |a|.
#[inline]
#[target_feature(enable = "avx2")]
fn dot_i8_i8(a: __m256i, b: __m256i) -> __m256i {
    dot_u8_i8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
}

/// Eight vectors' lane sums as one vector: lane `k` = Σ lanes of `v[k]`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn transpose_sum(v: &[__m256i; 8]) -> __m256i {
    let a = _mm256_hadd_epi32(v[0], v[1]);
    let b = _mm256_hadd_epi32(v[2], v[3]);
    let c = _mm256_hadd_epi32(v[4], v[5]);
    let d = _mm256_hadd_epi32(v[6], v[7]);
    // ab: per 128-bit half, [s0 s1 s2 s3] partial sums of rows 0..4.
    let ab = _mm256_hadd_epi32(a, b);
    let cd = _mm256_hadd_epi32(c, d);
    let lo = _mm256_permute2x128_si256::<0x20>(ab, cd);
    let hi = _mm256_permute2x128_si256::<0x31>(ab, cd);
    _mm256_add_epi32(lo, hi)
}

/// 16 nibbles (low nibbles first, then high nibbles) as 32 bytes.
#[inline]
#[target_feature(enable = "avx2")]
fn nibbles(s: &[u8]) -> __m256i {
    let raw = load_u8x16(s);
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw);
    _mm256_and_si256(both, _mm256_set1_epi8(0xF))
}

/// The 32 bits of `qh` as 32 bytes, 0xFF where the bit is set.
#[inline]
#[target_feature(enable = "avx2")]
fn bits_to_bytes(qh: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
}

// ---- float helpers ----------------------------------------------------------

/// `hsum_float_8`: halves added, then (0+2) + (1+3).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum8(v: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

// ---- Q4_0 / Q5_0 / Q8_0 / Q4_1 ----------------------------------------------

/// The shared 8-lane loop of `scalar::dot_q0`: `values` turns a block into
/// 32 signed bytes.
macro_rules! dot_q0 {
    ($w:expr, $y:expr, $block_bytes:expr, |$b:ident| $values:expr) => {{
        let mut acc = _mm256_setzero_ps();
        for (($b, q), &dy) in $w
            .chunks_exact($block_bytes)
            .zip($y.qs.chunks_exact(QK))
            .zip($y.d)
        {
            let sums = dot_i8_i8($values, load_i8x32(q));
            acc = _mm256_fmadd_ps(
                _mm256_set1_ps(f16_at($b, 0) * dy),
                _mm256_cvtepi32_ps(sums),
                acc,
            );
        }
        hsum8(acc)
    }};
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q8_0(w: &[u8], y: Q8Row<'_>) -> f32 {
    dot_q0!(w, y, 34, |b| q8_0_values(b))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_0(w: &[u8], y: Q8Row<'_>) -> f32 {
    dot_q0!(w, y, 18, |b| q4_0_values(b))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q5_0(w: &[u8], y: Q8Row<'_>) -> f32 {
    dot_q0!(w, y, 22, |b| q5_0_values(b))
}

/// The scale products `d_w · d_y` of four blocks (`[b0, b1, b2, b3]`, each
/// starting with its f16 `d_w`) with `d_y`, each broadcast to eight lanes:
/// the same conversions and products as `f16_at(b, 0) * dy`, four at once.
/// A macro so that it is always inlined: as a function it was called, and
/// the call spilled the four-row kernels' accumulators every block.
macro_rules! quad_scales {
    ($blocks:expr, $dy:expr) => {{
        let [a, b, c, d]: [&[u8]; 4] = $blocks;
        let bits = _mm_setr_epi16(
            i16::from_le_bytes([a[0], a[1]]),
            i16::from_le_bytes([b[0], b[1]]),
            i16::from_le_bytes([c[0], c[1]]),
            i16::from_le_bytes([d[0], d[1]]),
            0,
            0,
            0,
            0,
        );
        let s = _mm_mul_ps(_mm_cvtph_ps(bits), _mm_set1_ps($dy));
        [
            _mm256_broadcastss_ps(s),
            _mm256_broadcastss_ps(_mm_permute_ps::<1>(s)),
            _mm256_broadcastss_ps(_mm_permute_ps::<2>(s)),
            _mm256_broadcastss_ps(_mm_permute_ps::<3>(s)),
        ]
    }};
}

/// [`dot_q0!`] for four weight rows (`$rows`, one after another, `$row_bytes`
/// each) with the same input: every row's blocks go through the same
/// operations in the same order, so each result has the one-row kernel's
/// bits. The four rows' chains of fused multiply-adds run side by side
/// (one row's chain alone waits out each add's latency) and each activation
/// block is loaded once for the four.
macro_rules! dot4_q0 {
    ($rows:expr, $row_bytes:expr, $y:expr, $block_bytes:expr, |$b:ident| $values:expr) => {{
        let (r0, rest) = $rows.split_at($row_bytes);
        let (r1, rest) = rest.split_at($row_bytes);
        let (r2, r3) = rest.split_at($row_bytes);
        let next = $rows.as_ptr().wrapping_add(4 * $row_bytes);
        let mut acc = [_mm256_setzero_ps(); 4];
        for (k, (((((b0, b1), b2), b3), q), &dy)) in r0
            .chunks_exact($block_bytes)
            .zip(r1.chunks_exact($block_bytes))
            .zip(r2.chunks_exact($block_bytes))
            .zip(r3.chunks_exact($block_bytes))
            .zip($y.qs.chunks_exact(QK))
            .zip($y.d)
            .enumerate()
        {
            let qy = load_i8x32(q);
            prefetch_next_quad(next, k, $block_bytes);
            let scales = quad_scales!([b0, b1, b2, b3], dy);
            for ((a, $b), s) in acc.iter_mut().zip([b0, b1, b2, b3]).zip(scales) {
                let sums = dot_i8_i8($values, qy);
                *a = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sums), *a);
            }
        }
        [hsum8(acc[0]), hsum8(acc[1]), hsum8(acc[2]), hsum8(acc[3])]
    }};
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_q8_0(rows: &[u8], row_bytes: usize, y: Q8Row<'_>) -> [f32; 4] {
    dot4_q0!(rows, row_bytes, y, 34, |b| q8_0_values(b))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_q4_0(rows: &[u8], row_bytes: usize, y: Q8Row<'_>) -> [f32; 4] {
    dot4_q0!(rows, row_bytes, y, 18, |b| q4_0_values(b))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_q5_0(rows: &[u8], row_bytes: usize, y: Q8Row<'_>) -> [f32; 4] {
    dot4_q0!(rows, row_bytes, y, 22, |b| q5_0_values(b))
}

/// While a four-row kernel is at block `k` of its rows, asks for block `k`'s
/// share of the next four rows (`next`: where they start): the `4 ·
/// block_bytes` bytes at `4k · block_bytes`, so over a pass the next rows
/// come in in memory order. The hardware's stream detection does not follow
/// four rows read side by side as it follows one row after another.
#[inline]
#[target_feature(enable = "avx2")]
fn prefetch_next_quad(next: *const u8, k: usize, block_bytes: usize) {
    let share = 4 * block_bytes;
    for line in 0..share.div_ceil(64) {
        // A prefetch never faults: an address past the matrix is harmless.
        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(k * share + 64 * line).cast());
    }
}

/// A Q8_0 block's 32 signed values.
#[inline]
#[target_feature(enable = "avx2")]
fn q8_0_values(b: &[u8]) -> __m256i {
    load_u8x32(&b[2..34])
}

/// A Q4_0 block's 32 values, `q − 8`.
#[inline]
#[target_feature(enable = "avx2")]
fn q4_0_values(b: &[u8]) -> __m256i {
    _mm256_sub_epi8(nibbles(&b[2..18]), _mm256_set1_epi8(8))
}

/// A Q5_0 block's 32 values, `(q | bit·16) − 16`.
#[inline]
#[target_feature(enable = "avx2")]
fn q5_0_values(b: &[u8]) -> __m256i {
    let high = bits_to_bytes(u32::from_le_bytes([b[2], b[3], b[4], b[5]]));
    // (q | bit·16) − 16 = q − 16 where the bit is clear: OR in 0xF0 there.
    _mm256_or_si256(
        nibbles(&b[6..22]),
        _mm256_andnot_si256(high, _mm256_set1_epi8(0xF0u8 as i8)),
    )
}

/// A Q4_1 block's 32 unsigned values (the nibbles as stored).
#[inline]
#[target_feature(enable = "avx2")]
fn q4_1_values(b: &[u8]) -> __m256i {
    nibbles(&b[4..20])
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_1(w: &[u8], y: Q8Row<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for (((b, q), &dy), &sy) in w
        .chunks_exact(20)
        .zip(y.qs.chunks_exact(QK))
        .zip(y.d)
        .zip(y.s)
    {
        summs = f16_at(b, 2).mul_add(sy, summs);
        let sums = dot_u8_i8(q4_1_values(b), load_i8x32(q));
        acc = _mm256_fmadd_ps(
            _mm256_set1_ps(f16_at(b, 0) * dy),
            _mm256_cvtepi32_ps(sums),
            acc,
        );
    }
    hsum8(acc) + summs
}

/// [`dot_q4_1`] for four weight rows with the same input, as [`dot4_q0!`]
/// does for the other 32-value formats: each row's two chains (the scaled
/// block sums and the `m · s` products) are the one-row kernel's.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_q4_1(rows: &[u8], row_bytes: usize, y: Q8Row<'_>) -> [f32; 4] {
    let (r0, rest) = rows.split_at(row_bytes);
    let (r1, rest) = rest.split_at(row_bytes);
    let (r2, r3) = rest.split_at(row_bytes);
    let next = rows.as_ptr().wrapping_add(4 * row_bytes);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0f32; 4];
    for (k, ((((((b0, b1), b2), b3), q), &dy), &sy)) in r0
        .chunks_exact(20)
        .zip(r1.chunks_exact(20))
        .zip(r2.chunks_exact(20))
        .zip(r3.chunks_exact(20))
        .zip(y.qs.chunks_exact(QK))
        .zip(y.d)
        .zip(y.s)
        .enumerate()
    {
        let qy = load_i8x32(q);
        prefetch_next_quad(next, k, 20);
        let scales = quad_scales!([b0, b1, b2, b3], dy);
        for (((a, m), b), s) in acc
            .iter_mut()
            .zip(&mut summs)
            .zip([b0, b1, b2, b3])
            .zip(scales)
        {
            *m = f16_at(b, 2).mul_add(sy, *m);
            let sums = dot_u8_i8(q4_1_values(b), qy);
            *a = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sums), *a);
        }
    }
    [
        hsum8(acc[0]) + summs[0],
        hsum8(acc[1]) + summs[1],
        hsum8(acc[2]) + summs[2],
        hsum8(acc[3]) + summs[3],
    ]
}

/// Eight rows of repacked Q4_0 (`scalar::dot_q4_0_repacked`), row `k`'s
/// block sums fused into lane `k`.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot8_q4_0_repacked(rows: &[u8], row_bytes: usize, y: Q8Row<'_>) -> [f32; 8] {
    let mut acc = _mm256_setzero_ps();
    for (blk, (q, &dy)) in y.qs.chunks_exact(QK).zip(y.d).enumerate() {
        let qy = load_i8x32(q);
        let mut sums = [_mm256_setzero_si256(); 8];
        let mut d = [0f32; 8];
        for (k, (s, dk)) in sums.iter_mut().zip(&mut d).enumerate() {
            let b = &rows[k * row_bytes + blk * 18..k * row_bytes + blk * 18 + 18];
            *s = dot_i8_i8(_mm256_sub_epi8(nibbles(&b[2..18]), _mm256_set1_epi8(8)), qy);
            *dk = f16_at(b, 0);
        }
        let dw = _mm256_setr_ps(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(dy));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(transpose_sum(&sums)), scale, acc);
    }
    let mut out = [0f32; 8];
    // SAFETY: `out` is 8 writable f32s; the store has no alignment requirement.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

// ---- Q4_K ---------------------------------------------------------------------

/// Per 32-value sub-block pair `c` of a Q4_K block: the low-nibble and
/// high-nibble dot products, each scaled by its sub-block scale, in 8 lanes
/// (lane `l`: values `4l..4l+4` of each sub-block).
#[inline]
#[target_feature(enable = "avx2")]
fn q4k_chunk(qs: &[u8], q8: &[i8], sc_lo: u8, sc_hi: u8) -> __m256i {
    let bits = load_u8x32(qs);
    let lo = _mm256_and_si256(bits, _mm256_set1_epi8(0xF));
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), _mm256_set1_epi8(0xF));
    let p_lo = _mm256_madd_epi16(
        _mm256_maddubs_epi16(lo, load_i8x32(&q8[..32])),
        _mm256_set1_epi16(i16::from(sc_lo)),
    );
    let p_hi = _mm256_madd_epi16(
        _mm256_maddubs_epi16(hi, load_i8x32(&q8[32..64])),
        _mm256_set1_epi16(i16::from(sc_hi)),
    );
    _mm256_add_epi32(p_lo, p_hi)
}

/// `Σ_j sc_j · Σ(q4 · q8)` of one block in 8 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn q4k_block_lanes(b: &[u8], sc: &[u8; 8], q8: &[i8]) -> __m256i {
    let mut sumi = _mm256_setzero_si256();
    for c in 0..4 {
        let part = q4k_chunk(
            &b[16 + 32 * c..48 + 32 * c],
            &q8[64 * c..64 * c + 64],
            sc[2 * c],
            sc[2 * c + 1],
        );
        sumi = _mm256_add_epi32(sumi, part);
    }
    sumi
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_k(w: &[u8], y: Q8KRow<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = [0f32; 4];
    for (i, b) in w.chunks_exact(144).enumerate() {
        let q8 = &y.qs[i * QK_K..(i + 1) * QK_K];
        let bs = &y.bsums[i * 16..(i + 1) * 16];
        let d = y.d[i] * f16_at(b, 0);
        let dmin = -y.d[i] * f16_at(b, 2);
        let (sc, m) = q4k_scales(&b[4..16]);
        add_q4k_mins(&mut acc_m, dmin, &m, bs);
        acc = _mm256_fmadd_ps(
            _mm256_set1_ps(d),
            _mm256_cvtepi32_ps(q4k_block_lanes(b, &sc, q8)),
            acc,
        );
    }
    let m = (acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]);
    hsum8(acc) + m
}

/// Eight rows of repacked Q4_K (`scalar::dot_q4_k_repacked`). Per block,
/// the mins' sums are one `madd` a row against the input's pairs of block
/// sums, folded by `hadd`s (exact integers either way), and the rows' `d`
/// and `dmin` are converted eight at a time.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot8_q4_k_repacked(rows: &[u8], row_bytes: usize, y: Q8KRow<'_>) -> [f32; 8] {
    let mut acc = _mm256_setzero_ps();
    let mut acc_min = _mm256_setzero_ps();
    for (blk, (q8, &dy)) in y.qs.chunks_exact(QK_K).zip(y.d).enumerate() {
        let bs = &y.bsums[blk * 16..(blk + 1) * 16];
        // bsum_2j + bsum_2j+1 in lane j: each sum is of 16 values of at
        // most 128 in magnitude, so a pair fits an i16.
        let pairs = _mm_hadd_epi16(load_i16x8(&bs[..8]), load_i16x8(&bs[8..]));
        let mut sums = [_mm256_setzero_si256(); 8];
        let mut mins = [_mm_setzero_si128(); 8];
        let mut scales = [0u32; 8];
        for k in 0..8 {
            let b = &rows[k * row_bytes + blk * 144..k * row_bytes + blk * 144 + 144];
            let (sc, m) = q4k_scales(&b[4..16]);
            sums[k] = q4k_block_lanes(b, &sc, q8);
            let m = _mm_cvtsi64_si128(i64::from_le_bytes(m));
            mins[k] = _mm_madd_epi16(_mm_cvtepu8_epi16(m), pairs);
            // d (bytes 0..2) and dmin (bytes 2..4).
            scales[k] = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        let fold4 =
            |m: &[__m128i]| _mm_hadd_epi32(_mm_hadd_epi32(m[0], m[1]), _mm_hadd_epi32(m[2], m[3]));
        let mins = _mm256_set_m128i(fold4(&mins[4..]), fold4(&mins[..4]));
        let scales = load_u32x8(&scales);
        let halves = |v: __m256i| {
            _mm256_cvtph_ps(_mm_packus_epi32(
                _mm256_castsi256_si128(v),
                _mm256_extracti128_si256::<1>(v),
            ))
        };
        let dw = halves(_mm256_and_si256(scales, _mm256_set1_epi32(0xFFFF)));
        let dminw = halves(_mm256_srli_epi32::<16>(scales));
        let dyv = _mm256_set1_ps(dy);
        acc = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(transpose_sum(&sums)),
            _mm256_mul_ps(dw, dyv),
            acc,
        );
        acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_mul_ps(dminw, dyv), acc_min);
    }
    let mut out = [0f32; 8];
    store_f32x8(&mut out, _mm256_sub_ps(acc, acc_min));
    out
}

// ---- Q6_K ---------------------------------------------------------------------

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q6_k(w: &[u8], y: Q8KRow<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (i, b) in w.chunks_exact(210).enumerate() {
        let q8 = &y.qs[i * QK_K..(i + 1) * QK_K];
        let scales16 = q6k_scales16(b);
        let halves = q6k_scale_halves(scales16);
        let mut sumi = _mm256_setzero_si256();
        for half in 0..2 {
            let q = q6k_values(b, half);
            for (k, &qk) in q.iter().enumerate() {
                let chunk = 4 * half + k;
                let p = _mm256_maddubs_epi16(qk, load_i8x32(&q8[32 * chunk..]));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(q6k_scale(&halves, chunk), p));
            }
        }
        let sumi = _mm256_sub_epi32(sumi, q6k_offset(scales16, &y.bsums[i * 16..]));
        acc = _mm256_fmadd_ps(
            _mm256_set1_ps(y.d[i] * f16_at(b, 208)),
            _mm256_cvtepi32_ps(sumi),
            acc,
        );
    }
    hsum8(acc)
}

/// The 6-bit values of half `half` (128 values) of a Q6_K block, unsigned
/// (the `−32` is taken off apart, [`q6k_offset`]), as four 32-value chunks.
#[inline]
#[target_feature(enable = "avx2")]
fn q6k_values(b: &[u8], half: usize) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    let ql1 = load_u8x32(&b[64 * half..]);
    let ql2 = load_u8x32(&b[64 * half + 32..]);
    let qh = load_u8x32(&b[128 + 32 * half..]);
    [
        _mm256_or_si256(
            _mm256_and_si256(ql1, m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql2, m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql2), m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2)),
        ),
    ]
}

/// A Q6_K block's scales 0..8 in both 128-bit halves, and scales 8..16 in
/// both (`scales16`: [`q6k_scales16`] of the block), for [`q6k_scale`].
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q6k_scale_halves(scales16: __m256i) -> [__m256i; 2] {
    [
        _mm256_permute2x128_si256::<0x00>(scales16, scales16),
        _mm256_permute2x128_si256::<0x11>(scales16, scales16),
    ]
}

/// `vpshufb` masks: for chunk `c` of a half, the i16 scale `2c` in every
/// lane of the low 128 bits and the scale `2c + 1` in the high 128 bits.
static Q6K_SCALE_MASKS: [[u8; 32]; 4] = {
    let mut masks = [[0u8; 32]; 4];
    let mut c = 0;
    while c < 4 {
        let mut i = 0;
        while i < 16 {
            let byte = (i % 2) as u8;
            masks[c][i] = 4 * c as u8 + byte;
            masks[c][16 + i] = 4 * c as u8 + 2 + byte;
            i += 1;
        }
        c += 1;
    }
    masks
};

/// The scales of 32-value chunk `chunk` of a Q6_K block as 16 i16 lanes:
/// lanes 0..8 take the first 16 values' scale, 8..16 the next (`halves`:
/// [`q6k_scale_halves`] of the block).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q6k_scale(halves: &[__m256i; 2], chunk: usize) -> __m256i {
    let mask = load_u8x32(&Q6K_SCALE_MASKS[chunk % 4]);
    _mm256_shuffle_epi8(halves[chunk / 4], mask)
}

/// A Q6_K block's 16 scales as i16 lanes (for [`q6k_offset`]).
#[inline]
#[target_feature(enable = "avx2")]
fn q6k_scales16(b: &[u8]) -> __m256i {
    _mm256_cvtepi8_epi16(load_u8x16(&b[192..208]))
}

/// `32 · (bsum_2l·sc_2l + bsum_2l+1·sc_2l+1)` in lane `l`: what the block's
/// `−32` offset takes off each lane (`scales16`: [`q6k_scales16`] of the
/// block; `bsums`: the input's 16 sums of this block).
#[inline]
#[target_feature(enable = "avx2")]
fn q6k_offset(scales16: __m256i, bsums: &[i16]) -> __m256i {
    _mm256_slli_epi32::<5>(_mm256_madd_epi16(load_i16x16(bsums), scales16))
}

// ---- activations -----------------------------------------------------------

/// `quantize::quantize_q8_row` eight values at a time: the same maximum
/// (NaN skipped, as `f32::max` skips it: `maxps` returns its second operand
/// when either is NaN), the same products, `roundps` + `cvtps2dq` for the
/// magic-number rounding (half to even; NaN and out-of-range give
/// `i32::MIN` in both), wrapping integer sums, and saturating packs for the
/// clamp to i8.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quantize_q8_row(x: &[f32], d: &mut [f32], mut s: Option<&mut [f32]>, qs: &mut [i8]) {
    let sign = _mm256_set1_ps(-0.0);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, (block, q)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
        let v: [__m256; 4] = std::array::from_fn(|k| load_f32x8(&block[8 * k..]));
        let mut m = _mm256_setzero_ps();
        for &vk in &v {
            m = _mm256_max_ps(_mm256_andnot_ps(sign, vk), m);
        }
        let m = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let max = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let scale = max / 127.0;
        let id = if max != 0.0 { 127.0 / max } else { 0.0 };
        d[b] = half::f16::from_f32(scale).to_f32();
        let idv = _mm256_set1_ps(id);
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(_mm256_mul_ps(v[k], idv)))
        });
        if let Some(s) = s.as_deref_mut() {
            let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let sum = _mm_add_epi32(
                _mm256_extracti128_si256::<1>(sum),
                _mm256_castsi256_si128(sum),
            );
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b01_00_11_10>(sum));
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b10_11_00_01>(sum));
            s[b] = half::f16::from_f32(scale * _mm_cvtsi128_si32(sum) as f32).to_f32();
        }
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let packed = _mm256_permutevar8x32_epi32(packed, order);
        let q = &mut q[..32];
        // SAFETY: `q` is 32 writable bytes; unaligned store.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), packed) };
    }
}

/// `quantize::quantize_q8k_row` eight values at a time: the same signed
/// maximum (the first value of largest magnitude; NaN skipped), the same
/// products and magic-number rounding, the clamp at 127 and the C
/// conversion's low byte, and exact 16-value sums.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quantize_q8k_row(x: &[f32], d: &mut [f32], qs: &mut [i8], bsums: &mut [i16]) {
    let sign = _mm256_set1_ps(-0.0);
    let low_byte = _mm256_set1_epi32(0xFF);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, (block, q)) in x
        .chunks_exact(QK_K)
        .zip(qs.chunks_exact_mut(QK_K))
        .enumerate()
    {
        let mut m = _mm256_setzero_ps();
        for k in (0..QK_K).step_by(8) {
            m = _mm256_max_ps(_mm256_andnot_ps(sign, load_f32x8(&block[k..])), m);
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        let sums = &mut bsums[b * 16..(b + 1) * 16];
        if amax == 0.0 {
            d[b] = 0.0;
            q.fill(0);
            sums.fill(0);
            continue;
        }
        // The first value whose magnitude is the maximum.
        let target = _mm256_set1_ps(amax);
        let max = (0..QK_K)
            .step_by(8)
            .find_map(|k| {
                let v = load_f32x8(&block[k..]);
                let hit = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, v), target);
                let bits = _mm256_movemask_ps(hit);
                (bits != 0).then(|| block[k + bits.trailing_zeros() as usize])
            })
            .unwrap_or(amax);
        let iscale = -127.0 / max;
        let scale = _mm256_set1_ps(iscale);
        let magic = _mm256_set1_ps(12_582_912.0);
        for k in (0..QK_K).step_by(32) {
            let i: [__m256i; 4] = std::array::from_fn(|j| {
                let t = _mm256_add_ps(_mm256_mul_ps(scale, load_f32x8(&block[k + 8 * j..])), magic);
                let v = _mm256_sub_epi32(
                    _mm256_and_si256(_mm256_castps_si256(t), _mm256_set1_epi32(0x007f_ffff)),
                    _mm256_set1_epi32(0x0040_0000),
                );
                // min(·, 127), then the low byte (as a value 0..=255).
                _mm256_and_si256(_mm256_min_epi32(v, _mm256_set1_epi32(127)), low_byte)
            });
            let packed = _mm256_packus_epi16(
                _mm256_packus_epi32(i[0], i[1]),
                _mm256_packus_epi32(i[2], i[3]),
            );
            let packed = _mm256_permutevar8x32_epi32(packed, order);
            let out = &mut q[k..k + 32];
            // SAFETY: `out` is 32 writable bytes; unaligned store.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), packed) };
        }
        for (sum, group) in sums.iter_mut().zip(q.chunks_exact(16)) {
            let g = &group[..16];
            // SAFETY: `g` is 16 readable bytes; unaligned load.
            let bytes = unsafe { _mm_loadu_si128(g.as_ptr().cast()) };
            let s = _mm256_madd_epi16(_mm256_cvtepi8_epi16(bytes), _mm256_set1_epi16(1));
            let s = _mm_add_epi32(_mm256_extracti128_si256::<1>(s), _mm256_castsi256_si128(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            *sum = _mm_cvtsi128_si32(s) as i16;
        }
        d[b] = 1.0 / iscale;
    }
}

// ---- F16 / F32 ----------------------------------------------------------------

/// `scalar::dot_float` with each 16-lane accumulator as two 8-lane halves.
macro_rules! dot_float {
    ($w:expr, $x:expr, $width:expr, $load:ident) => {{
        let n = $x.len();
        let np = n & !63;
        let mut acc = [_mm256_setzero_ps(); 8];
        for (wc, xc) in $w.chunks_exact(64 * $width).zip($x[..np].chunks_exact(64)) {
            for (h, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(load_f32x8(&xc[8 * h..]), $load(&wc[8 * h * $width..]), *a);
            }
        }
        (fold_f16_accumulators(&acc), &$w[np * $width..], &$x[np..])
    }};
}

/// `lanes::fold_f16_accumulators` on registers: the four 16-lane
/// accumulators of `ggml_vec_dot_f16`, accumulator j's lanes 0..8 in
/// `acc[2j]` and lanes 8..16 in `acc[2j + 1]`, folded (0+2) + (1+3), then
/// `_mm512_reduce_add_ps` (16 → 8 lanes, then as `hsum_float_8`).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn fold_f16_accumulators(acc: &[__m256; 8]) -> f32 {
    hsum8(fold_to_8(acc))
}

/// The first stage of [`fold_f16_accumulators`]: the 16 lanes (0+2) + (1+3),
/// then 16 → 8.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn fold_to_8(acc: &[__m256; 8]) -> __m256 {
    let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
    let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
    _mm256_add_ps(hi, lo)
}

/// [`hsum8`] of eight vectors at once, `[hsum8(v[0]), …, hsum8(v[7])]`: the
/// same additions of the same lanes (each of its three steps pairs the
/// lanes `hsum8` pairs), done across registers instead of within one.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum8_x8(v: &[__m256; 8]) -> __m256 {
    // Halves added: [r(a) | r(b)], r = hi + lo of each.
    let halves = |a: __m256, b: __m256| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x31>(a, b),
            _mm256_permute2f128_ps::<0x20>(a, b),
        )
    };
    let (t01, t23) = (halves(v[0], v[1]), halves(v[2], v[3]));
    let (t45, t67) = (halves(v[4], v[5]), halves(v[6], v[7]));
    // r0 + r2 and r1 + r3 of each.
    let pairs = |a: __m256, b: __m256| {
        _mm256_add_ps(
            _mm256_shuffle_ps::<0x44>(a, b),
            _mm256_shuffle_ps::<0xEE>(a, b),
        )
    };
    let (u0123, u4567) = (pairs(t01, t23), pairs(t45, t67));
    // Their sum: lanes hold vectors 0, 2, 4, 6 | 1, 3, 5, 7.
    let s = _mm256_add_ps(
        _mm256_shuffle_ps::<0x88>(u0123, u4567),
        _mm256_shuffle_ps::<0xDD>(u0123, u4567),
    );
    _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_f32_bytes(s: &[u8]) -> __m256 {
    let s = &s[..32];
    // SAFETY: `s` is 32 readable bytes (8 f32); unaligned load.
    unsafe { _mm256_loadu_ps(s.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    let (head, w_tail, x_tail) = dot_float!(w, x, 2, load_f16x8);
    scalar::f16_tail(head, w_tail, x_tail)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    let (head, w_tail, x_tail) = dot_float!(w, x, 4, load_f32_bytes);
    scalar::f32_tail(head, w_tail, x_tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_helpers() {
        if !super::super::KernelVariant::Avx2.is_available() {
            return;
        }
        // SAFETY: AVX2 checked above.
        unsafe { check_helpers() }
    }

    #[target_feature(enable = "avx2")]
    fn check_helpers() {
        let v: [__m256i; 8] =
            std::array::from_fn(|k| _mm256_setr_epi32(k as i32, 1, 2, 3, 4, 5, 6, 100 * k as i32));
        let mut got = [0i32; 8];
        // SAFETY: `got` is 8 writable i32s.
        unsafe { _mm256_storeu_si256(got.as_mut_ptr().cast(), transpose_sum(&v)) };
        assert_eq!(got, std::array::from_fn(|k| 101 * k as i32 + 21));
        let mut bytes = [0u8; 32];
        // SAFETY: `bytes` is 32 writable bytes.
        unsafe { _mm256_storeu_si256(bytes.as_mut_ptr().cast(), bits_to_bytes(0x8000_0005)) };
        let want: [u8; 32] =
            std::array::from_fn(|k| if [0, 2, 31].contains(&k) { 0xFF } else { 0 });
        assert_eq!(bytes, want);
    }
}
