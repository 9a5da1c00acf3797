//! The vector loops of one attention head over an f16 K/V cache, in the
//! float order of llama.cpp's CPU attention (without flash attention):
//! - [`dot_f16`]: a query row (f16-rounded, held as f32) with one cached key
//!   row, as `ggml_vec_dot_f16` (AVX-512: four 16-lane accumulators over
//!   steps of 64, folded `(0+2) + (1+3)`, reduced as `_mm512_reduce_add_ps`,
//!   the tail added in f64);
//! - [`exp_shifted`], [`round_weights`]: the softmax's exponentials
//!   (`ggml_v_expf`) and its weights rounded to f16;
//! - [`weighted_values`]: for each output dimension, `ggml_vec_dot_f16` of
//!   the cached values of that dimension (stored transposed, positions
//!   contiguous) with the weights: cell `p` goes to lane `p % 64` of four
//!   16-lane accumulators, which are then folded.
//!
//! The portable functions define the results; [`avx2`] computes the same
//! bits with 256-bit registers, reading the f16 rows directly (F16C).

use half::f16;

use super::lanes;
use crate::model::kv::BLOCK_TOKENS;

/// `ggml_vec_dot_f16(x, y)` with the query `x` already f16-rounded.
#[inline]
pub fn dot_f16(x: &[f32], y: &[f16]) -> f32 {
    let n = x.len().min(y.len());
    let np = n & !63;
    let mut acc = [[0f32; 16]; 4];
    for i in (0..np).step_by(64) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, a) in lanes.iter_mut().enumerate() {
                let k = i + 16 * j + l;
                *a = x[k].mul_add(y[k].to_f32(), *a);
            }
        }
    }
    let mut sum = 0f64;
    if np > 0 {
        sum = f64::from(lanes::fold_f16_accumulators(&acc));
    }
    for k in np..n {
        sum += f64::from(x[k] * y[k].to_f32());
    }
    sum as f32
}

/// `out[j]` = [`dot_f16`] of `x` with the cached key row of cell `first +
/// j`: `keys[b]` is block `b` of the cache (`BLOCK_TOKENS` rows of
/// `kv_dim`), the row's head at `kv_offset`.
#[inline]
pub fn key_dots(
    x: &[f32],
    keys: &[&[f16]],
    kv_dim: usize,
    kv_offset: usize,
    first: usize,
    out: &mut [f32],
) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_f16(x, key_row(keys, kv_dim, kv_offset, x.len(), first + j));
    }
}

/// Cell `p`'s key row of one head (`hd` values at `kv_offset`).
#[inline]
fn key_row<'k>(
    keys: &[&'k [f16]],
    kv_dim: usize,
    kv_offset: usize,
    hd: usize,
    p: usize,
) -> &'k [f16] {
    let at = (p % BLOCK_TOKENS) * kv_dim + kv_offset;
    &keys[p / BLOCK_TOKENS][at..at + hd]
}

/// `v[i] = expf(v[i] − max)` ([`lanes::expf`], ggml's `ggml_v_expf`).
#[inline]
pub fn exp_shifted(v: &mut [f32], max: f32) {
    for x in v {
        *x = lanes::expf(*x - max);
    }
}

/// `v[i] = f16(v[i] · scale)`: the softmax weights as the f16 values
/// `ggml_vec_dot_f16` multiplies the value rows by.
#[inline]
pub fn round_weights(v: &mut [f32], scale: f32) {
    for x in v {
        *x = f16::from_f32(*x * scale).to_f32();
    }
}

/// `out[d]` = `ggml_vec_dot_f16` over cells `first..first + w.len()` of
/// value dimension `offset + d` with the weights `w`: `values[b]` is block
/// `b` of the cache (`BLOCK_TOKENS` positions, value dimension `e` of slot
/// `s` at `e·BLOCK_TOKENS + s`). Cell `p` adds into lane `p % 64`, in cell
/// order; lanes no cell reaches stay untouched zeros.
#[inline]
pub fn weighted_values(values: &[&[f16]], offset: usize, first: usize, w: &[f32], out: &mut [f32]) {
    for (d, o) in out.iter_mut().enumerate() {
        let mut acc = [[0f32; 16]; 4];
        for (j, &wj) in w.iter().enumerate() {
            let p = first + j;
            let v = values[p / BLOCK_TOKENS][(offset + d) * BLOCK_TOKENS + p % BLOCK_TOKENS];
            let lane = &mut acc[(p % 64) / 16][p % 16];
            *lane = v.to_f32().mul_add(wj, *lane);
        }
        *o = lanes::fold_f16_accumulators(&acc);
    }
}

/// The lengths per head when `heads` heads share each of `lens` one after
/// another; `None` when there is no head or a head would get nothing.
#[inline]
fn per_head<const N: usize>(heads: usize, lens: [usize; N]) -> Option<[usize; N]> {
    let each = lens.map(|len| len.checked_div(heads).unwrap_or(0));
    each.iter().all(|&n| n > 0).then_some(each)
}

/// [`key_dots`] for the query heads that share one KV head: `xs` holds
/// them one after another (`hd` values each), `out` their scores in the same
/// order (`out.len() / heads` cells each).
#[inline]
pub fn group_key_dots(
    xs: &[f32],
    hd: usize,
    keys: &[&[f16]],
    kv_dim: usize,
    kv_offset: usize,
    first: usize,
    out: &mut [f32],
) {
    let heads = xs.len().checked_div(hd).unwrap_or(0);
    let Some([cells]) = per_head(heads, [out.len()]) else {
        return;
    };
    for (x, o) in xs.chunks_exact(hd).zip(out.chunks_exact_mut(cells)) {
        key_dots(x, keys, kv_dim, kv_offset, first, o);
    }
}

/// [`weighted_values`] for `heads` query heads that share one KV head: `w`
/// holds their weights one after another (`w.len() / heads` cells each),
/// `out` their outputs (`out.len() / heads` dimensions each).
#[inline]
pub fn group_weighted_values(
    values: &[&[f16]],
    offset: usize,
    first: usize,
    heads: usize,
    w: &[f32],
    out: &mut [f32],
) {
    let Some([cells, hd]) = per_head(heads, [w.len(), out.len()]) else {
        return;
    };
    for (w, o) in w.chunks_exact(cells).zip(out.chunks_exact_mut(hd)) {
        weighted_values(values, offset, first, w, o);
    }
}

/// The same loops with AVX2, FMA and F16C; callers check the CPU has
/// them ([`super::KernelVariant::Avx2`]'s features).
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::super::avx2::{fold_f16_accumulators, fold_to_8, hsum8_x8, load_f32x8, store_f32x8};
    use crate::model::kv::BLOCK_TOKENS;

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn load_f16x8(s: &[f16]) -> __m256 {
        let s = &s[..8];
        // SAFETY: `s` is 8 readable f16s (16 bytes); unaligned load.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(s.as_ptr().cast()) })
    }

    /// [`super::dot_f16`].
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_f16(x: &[f32], y: &[f16]) -> f32 {
        let n = x.len().min(y.len());
        let np = n & !63;
        // Accumulator j's lanes 0..8 are acc[2j], lanes 8..16 acc[2j + 1].
        let mut acc = [_mm256_setzero_ps(); 8];
        for i in (0..np).step_by(64) {
            for (h, a) in acc.iter_mut().enumerate() {
                let k = i + 8 * h;
                *a = _mm256_fmadd_ps(load_f32x8(&x[k..]), load_f16x8(&y[k..]), *a);
            }
        }
        let mut sum = 0f64;
        if np > 0 {
            sum = f64::from(fold_f16_accumulators(&acc));
        }
        for k in np..n {
            sum += f64::from(x[k] * y[k].to_f32());
        }
        sum as f32
    }

    /// [`super::key_dots`]: for a head width that is a multiple of 64 (no
    /// f64 tail), eight keys at a time, their accumulators folded to eight
    /// lanes each and the eight horizontal sums done together
    /// ([`hsum8_x8`]); the same sums as [`dot_f16`] key by key.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn key_dots(
        x: &[f32],
        keys: &[&[f16]],
        kv_dim: usize,
        kv_offset: usize,
        first: usize,
        out: &mut [f32],
    ) {
        let hd = x.len();
        // (Loops, not closures, so everything inlines with this function's
        // target features.)
        if hd == 0 || !hd.is_multiple_of(64) {
            for (j, o) in out.iter_mut().enumerate() {
                *o = dot_f16(x, super::key_row(keys, kv_dim, kv_offset, hd, first + j));
            }
            return;
        }
        let mut groups = out.chunks_exact_mut(8);
        let mut p = first;
        for group in &mut groups {
            let mut v = [_mm256_setzero_ps(); 8];
            for lanes in &mut v {
                *lanes = key_lanes(x, super::key_row(keys, kv_dim, kv_offset, hd, p));
                p += 1;
            }
            store_f32x8(group, hsum8_x8(&v));
        }
        for o in groups.into_remainder() {
            *o = dot_f16(x, super::key_row(keys, kv_dim, kv_offset, hd, p));
            p += 1;
        }
    }

    /// [`dot_f16`]'s accumulators for `x · y` (`x.len()` a multiple of 64,
    /// `y` as long), folded to eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn key_lanes(x: &[f32], y: &[f16]) -> __m256 {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (xs, ys) in x.chunks_exact(64).zip(y.chunks_exact(64)) {
            for (h, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(load_f32x8(&xs[8 * h..]), load_f16x8(&ys[8 * h..]), *a);
            }
        }
        fold_to_8(&acc)
    }

    /// [`super::group_key_dots`]. For a head width that is a multiple of 64
    /// (no f64 tail) the heads go in tiles of two to four ([`key_tile`]), a
    /// head left alone through [`key_dots`], whose loop suits one query
    /// better; for other widths every head goes through [`key_dots`]. The
    /// same sums as [`dot_f16`] key by key either way.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn group_key_dots(
        xs: &[f32],
        hd: usize,
        keys: &[&[f16]],
        kv_dim: usize,
        kv_offset: usize,
        first: usize,
        out: &mut [f32],
    ) {
        let heads = xs.len().checked_div(hd).unwrap_or(0);
        let Some([cells]) = super::per_head(heads, [out.len()]) else {
            return;
        };
        // The tiles need whole 64-value steps (no f64 tail).
        let most = if hd.is_multiple_of(64) { 4 } else { 1 };
        let mut done = 0;
        while done < heads {
            let t = (heads - done).min(most);
            let x = &xs[done * hd..(done + t) * hd];
            let o = &mut out[done * cells..(done + t) * cells];
            // (Calls, not a closure, so each inlines with these features.)
            match t {
                4 => key_tile::<4>(x, hd, keys, kv_dim, kv_offset, first, o),
                3 => key_tile::<3>(x, hd, keys, kv_dim, kv_offset, first, o),
                2 => key_tile::<2>(x, hd, keys, kv_dim, kv_offset, first, o),
                _ => key_dots(x, keys, kv_dim, kv_offset, first, o),
            }
            done += t;
        }
    }

    /// The scores of `T` queries (`hd` a multiple of 64) over the cells,
    /// keys two at a time: each key and query load serves several products.
    /// A product's 64 lanes are built eight at a time (lanes `8h..8h + 8` of
    /// every 64-value step, in step order, as [`dot_f16`]'s accumulator `h`
    /// takes them), folded ([`fold_to_8`]), and the horizontal sums of eight
    /// keys done together ([`hsum8_x8`]); the cells past the last eight are
    /// summed one by one.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    fn key_tile<const T: usize>(
        x: &[f32],
        hd: usize,
        keys: &[&[f16]],
        kv_dim: usize,
        kv_offset: usize,
        first: usize,
        out: &mut [f32],
    ) {
        let cells = out.len() / T;
        let x = &x[..T * hd];
        let mut j = 0;
        while j + 8 <= cells {
            let mut folded = [[_mm256_setzero_ps(); 8]; T];
            for pair in 0..4 {
                let p = first + j + 2 * pair;
                let k0 = super::key_row(keys, kv_dim, kv_offset, hd, p);
                let k1 = super::key_row(keys, kv_dim, kv_offset, hd, p + 1);
                // fold_to_8's sums, ((l1 + l5) + (l3 + l7)) + ((l0 + l4) +
                // (l2 + l6)), without holding all eight lane groups.
                let lo = add_tiles(
                    add_tiles(
                        pair_lanes::<T>(x, hd, k0, k1, 0),
                        pair_lanes::<T>(x, hd, k0, k1, 4),
                    ),
                    add_tiles(
                        pair_lanes::<T>(x, hd, k0, k1, 2),
                        pair_lanes::<T>(x, hd, k0, k1, 6),
                    ),
                );
                let hi = add_tiles(
                    add_tiles(
                        pair_lanes::<T>(x, hd, k0, k1, 1),
                        pair_lanes::<T>(x, hd, k0, k1, 5),
                    ),
                    add_tiles(
                        pair_lanes::<T>(x, hd, k0, k1, 3),
                        pair_lanes::<T>(x, hd, k0, k1, 7),
                    ),
                );
                for (f, s) in folded.iter_mut().zip(add_tiles(hi, lo)) {
                    f[2 * pair] = s[0];
                    f[2 * pair + 1] = s[1];
                }
            }
            for (t, f) in folded.iter().enumerate() {
                store_f32x8(&mut out[t * cells + j..], hsum8_x8(f));
            }
            j += 8;
        }
        for j in j..cells {
            let y = super::key_row(keys, kv_dim, kv_offset, hd, first + j);
            for t in 0..T {
                out[t * cells + j] = dot_f16(&x[t * hd..(t + 1) * hd], y);
            }
        }
    }

    /// Lanes `8h..8h + 8` of the 64-lane accumulators of `T` queries (`x`)
    /// with two keys, over every 64-value step in order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn pair_lanes<const T: usize>(
        x: &[f32],
        hd: usize,
        k0: &[f16],
        k1: &[f16],
        h: usize,
    ) -> [[__m256; 2]; T] {
        let (x, k0, k1) = (&x[..T * hd], &k0[..hd], &k1[..hd]);
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        for e in (8 * h..hd).step_by(64) {
            // SAFETY: callers pass `h < 8` and `hd` a multiple of 64, so
            // `e + 8 <= hd`: the eight values at `e` of `k0`, `k1` (`hd`
            // long) and of each query in `x` (`T · hd`) are in bounds.
            unsafe {
                let y0 = _mm256_cvtph_ps(_mm_loadu_si128(k0.as_ptr().add(e).cast()));
                let y1 = _mm256_cvtph_ps(_mm_loadu_si128(k1.as_ptr().add(e).cast()));
                for (t, a) in acc.iter_mut().enumerate() {
                    let q = _mm256_loadu_ps(x.as_ptr().add(t * hd + e));
                    a[0] = _mm256_fmadd_ps(q, y0, a[0]);
                    a[1] = _mm256_fmadd_ps(q, y1, a[1]);
                }
            }
        }
        acc
    }

    /// Lane by lane sums of two tiles of accumulators.
    #[inline]
    #[target_feature(enable = "avx")]
    fn add_tiles<const T: usize, const D: usize>(
        mut a: [[__m256; D]; T],
        b: [[__m256; D]; T],
    ) -> [[__m256; D]; T] {
        for (a, b) in a.iter_mut().zip(&b) {
            for (a, b) in a.iter_mut().zip(b) {
                *a = _mm256_add_ps(*a, *b);
            }
        }
        a
    }

    /// [`super::exp_shifted`], eight lanes at a time: the same fused
    /// multiply-adds, and the final `j · 2ⁿ` formed in f64 and rounded once
    /// to f32, as the scalar code does.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn exp_shifted(v: &mut [f32], max: f32) {
        let whole = v.len() & !7;
        let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
        let m = _mm256_set1_ps(max);
        for k in (0..whole).step_by(8) {
            let x = _mm256_sub_ps(load_f32x8(&v[k..]), m);
            let r = c(0x4b40_0000);
            let z = _mm256_fmadd_ps(x, c(0x3fb8_aa3b), r);
            let n = _mm256_sub_ps(z, r);
            let neg_n = _mm256_sub_ps(_mm256_setzero_ps(), n);
            let b = _mm256_fmadd_ps(
                neg_n,
                c(0x35bf_be8e),
                _mm256_fmadd_ps(neg_n, c(0x3f31_7200), x),
            );
            let u = _mm256_mul_ps(b, b);
            let t1 = _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17));
            let t2 = _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb));
            let t4 = _mm256_fmadd_ps(c(0x3f7f_fff6), b, _mm256_set1_ps(1.0));
            let j = _mm256_fmadd_ps(_mm256_fmadd_ps(t1, u, t2), u, t4);
            // j · 2^n in f64, four lanes at a time (n is an integer here).
            let ni = _mm256_cvtps_epi32(n);
            let scale = |half: __m128i, jh: __m128| {
                let e = _mm256_slli_epi64::<52>(_mm256_add_epi64(
                    _mm256_cvtepi32_epi64(half),
                    _mm256_set1_epi64x(1023),
                ));
                _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(jh), _mm256_castsi256_pd(e)))
            };
            let lo = scale(_mm256_castsi256_si128(ni), _mm256_castps256_ps128(j));
            let hi = scale(
                _mm256_extracti128_si256::<1>(ni),
                _mm256_extractf128_ps::<1>(j),
            );
            let scaled = _mm256_set_m128(hi, lo);
            // |n| > 192: 0 or +inf (NaN compares false and keeps `scaled`).
            let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
            let big = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
            let special = _mm256_blendv_ps(
                _mm256_set1_ps(f32::INFINITY),
                _mm256_setzero_ps(),
                _mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps()),
            );
            store_f32x8(&mut v[k..], _mm256_blendv_ps(scaled, special, big));
        }
        super::exp_shifted(&mut v[whole..], max);
    }

    /// [`super::round_weights`] with `vcvtps2ph` (round to nearest even, the
    /// instruction the `half` crate uses on this CPU).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn round_weights(v: &mut [f32], scale: f32) {
        let whole = v.len() & !7;
        let s = _mm256_set1_ps(scale);
        for k in (0..whole).step_by(8) {
            let h = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm256_mul_ps(
                load_f32x8(&v[k..]),
                s,
            ));
            store_f32x8(&mut v[k..], _mm256_cvtph_ps(h));
        }
        super::round_weights(&mut v[whole..], scale);
    }

    /// [`super::weighted_values`]: per output dimension, the 64 lanes as
    /// eight 8-lane accumulators (kept in memory, `acc[8·d + k]`), walked
    /// 64 cells (four blocks) at a time so each block's cells meet fixed
    /// accumulators and the chunk's weights stay in registers over all
    /// dimensions. Each accumulator still takes its cells in cell order, so
    /// the sums are the portable code's. Cells outside `first..first +
    /// w.len()` leave their lanes as they are (masked to +0 with +0 weights,
    /// in the first and last chunks only).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn weighted_values(values: &[&[f16]], offset: usize, first: usize, w: &[f32], out: &mut [f32]) {
        const CHUNK: usize = 4 * BLOCK_TOKENS;
        let Some(last) = (first + w.len()).checked_sub(1) else {
            return super::weighted_values(values, offset, first, w, out);
        };
        let hd = out.len();
        let (c0, c1) = (first / CHUNK, last / CHUNK);
        // The weights of every cell of the chunks (zero where no cell is
        // taken) and whether each is taken.
        let mut weights = vec![0f32; CHUNK * (c1 - c0 + 1)];
        let mut taken = vec![0f32; weights.len()];
        for (j, &wj) in w.iter().enumerate() {
            let at = first + j - c0 * CHUNK;
            weights[at] = wj;
            taken[at] = f32::from_bits(u32::MAX);
        }
        // This thread's accumulators from its last call, stale: the first
        // chunk writes every one of them (a product added to +0, or +0 for
        // a block it does not reach), as zeroed accumulators would hold.
        let mut acc = VALUE_ACCUMULATORS.take();
        acc.resize(8 * hd, _mm256_setzero_ps());
        for chunk in c0..=c1 {
            let opening = chunk == c0;
            let base = (chunk - c0) * CHUNK;
            let partial = chunk * CHUNK < first || chunk * CHUNK + CHUNK - 1 > last;
            let mut wv = [_mm256_setzero_ps(); 8];
            let mut mask = [_mm256_setzero_ps(); 8];
            for k in 0..8 {
                wv[k] = load_f32x8(&weights[base + 8 * k..]);
                if partial {
                    mask[k] = load_f32x8(&taken[base + 8 * k..]);
                }
            }
            for q in 0..4 {
                let b = chunk * 4 + q;
                if (b + 1) * BLOCK_TOKENS <= first || b * BLOCK_TOKENS > last {
                    if opening {
                        for a in acc.chunks_exact_mut(8) {
                            a[2 * q] = _mm256_setzero_ps();
                            a[2 * q + 1] = _mm256_setzero_ps();
                        }
                    }
                    continue;
                }
                let column = &values[b][offset * BLOCK_TOKENS..(offset + hd) * BLOCK_TOKENS];
                for (cells, a) in column
                    .chunks_exact(BLOCK_TOKENS)
                    .zip(acc.chunks_exact_mut(8))
                {
                    for h in 0..2 {
                        let k = 2 * q + h;
                        let v = load_f16x8(&cells[8 * h..]);
                        // A cell not taken meets +0 · +0: its lane keeps
                        // its value (an accumulator that starts at +0 never
                        // becomes −0, so adding +0 changes no bit), whatever
                        // the cache holds there, infinities and NaN included.
                        // (A blend here compiles to a masked store, which
                        // is microcoded and slow on AMD cores.)
                        let v = if partial {
                            _mm256_and_ps(v, mask[k])
                        } else {
                            v
                        };
                        let sum = if opening { _mm256_setzero_ps() } else { a[k] };
                        a[k] = _mm256_fmadd_ps(v, wv[k], sum);
                    }
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc.chunks_exact(8)) {
            let mut lanes = [_mm256_setzero_ps(); 8];
            lanes.copy_from_slice(a);
            *o = fold_f16_accumulators(&lanes);
        }
        VALUE_ACCUMULATORS.set(acc);
    }

    /// [`super::group_weighted_values`]: the heads in tiles of two to four
    /// ([`value_tile`]), a head left alone through [`weighted_values`],
    /// whose loop suits one head better.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn group_weighted_values(
        values: &[&[f16]],
        offset: usize,
        first: usize,
        heads: usize,
        w: &[f32],
        out: &mut [f32],
    ) {
        let Some([cells, hd]) = super::per_head(heads, [w.len(), out.len()]) else {
            return;
        };
        let mut done = 0;
        while done < heads {
            let t = (heads - done).min(4);
            let w = &w[done * cells..(done + t) * cells];
            let o = &mut out[done * hd..(done + t) * hd];
            match t {
                4 => value_tile::<4>(values, offset, first, w, o),
                3 => value_tile::<3>(values, offset, first, w, o),
                2 => value_tile::<2>(values, offset, first, w, o),
                _ => weighted_values(values, offset, first, w, o),
            }
            done += t;
        }
    }

    /// [`super::weighted_values`] for `T` heads over the same cells. The
    /// cells go in chunks of 64 (four blocks), cell `p` at lane `p % 64`:
    /// accumulator `k` of a dimension (lanes `8k..8k + 8`) takes block
    /// `4c + k / 2` of each chunk `c`, eight cells of it, in cell order. A
    /// pass takes `64 / T` dimensions of every head: their accumulators (16
    /// KiB, kept per thread) stay in the first-level cache while the pass
    /// walks the chunks and, in each block, the dimensions' cells in memory
    /// order; each value load serves `T` products. The chunk's weights stay
    /// in registers over all dimensions. The sums are the portable code's:
    /// the opening chunk writes every accumulator (a product added to +0,
    /// or +0 for a block it does not reach), and in the first and last
    /// blocks the cells outside `first..first + w.len()` are masked to +0
    /// and meet +0 weights, so their lanes keep their values (an
    /// accumulator that starts at +0 never becomes −0), whatever the cache
    /// holds there, infinities and NaN included. (A blend here would compile
    /// to a masked store, which is microcoded and slow on AMD cores.)
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn value_tile<const T: usize>(
        values: &[&[f16]],
        offset: usize,
        first: usize,
        w: &[f32],
        out: &mut [f32],
    ) {
        const CHUNK: usize = 4 * BLOCK_TOKENS;
        let (cells, hd) = (w.len() / T, out.len() / T);
        let Some(last) = (first + cells).checked_sub(1) else {
            return;
        };
        let (c0, c1) = (first / CHUNK, last / CHUNK);
        let (b0, b1) = (first / BLOCK_TOKENS, last / BLOCK_TOKENS);
        // Each head's weights over whole chunks (+0 where no cell is taken),
        // and the mask of the cells taken.
        let span = CHUNK * (c1 - c0 + 1);
        let mut weights = vec![0f32; T * span];
        let mut taken = vec![0f32; span];
        let start = first - c0 * CHUNK;
        for (wt, w) in weights.chunks_exact_mut(span).zip(w.chunks_exact(cells)) {
            wt[start..start + cells].copy_from_slice(w);
        }
        taken[start..start + cells].fill(f32::from_bits(u32::MAX));
        // Accumulator k of dimension dg + i of head t: acc[8 · (T·i + t) + k].
        let dims = 64 / T;
        let mut acc = VALUE_ACCUMULATORS.take();
        acc.resize(8 * T * dims, _mm256_setzero_ps());
        for dg in (0..hd).step_by(dims) {
            let dn = dims.min(hd - dg);
            for c in c0..=c1 {
                let opening = c == c0;
                let base = (c - c0) * CHUNK;
                for q in 0..4 {
                    let b = 4 * c + q;
                    if b < b0 || b > b1 {
                        if opening {
                            for a in acc.chunks_exact_mut(8) {
                                a[2 * q] = _mm256_setzero_ps();
                                a[2 * q + 1] = _mm256_setzero_ps();
                            }
                        }
                        continue;
                    }
                    let at = base + 16 * q;
                    let mut wv = [[_mm256_setzero_ps(); 2]; T];
                    for (t, wv) in wv.iter_mut().enumerate() {
                        wv[0] = load_f32x8(&weights[t * span + at..]);
                        wv[1] = load_f32x8(&weights[t * span + at + 8..]);
                    }
                    let partial = b == b0 || b == b1;
                    let mask = [load_f32x8(&taken[at..]), load_f32x8(&taken[at + 8..])];
                    let column = &values[b][(offset + dg) * BLOCK_TOKENS..][..dn * BLOCK_TOKENS];
                    for (cells, a) in column
                        .chunks_exact(BLOCK_TOKENS)
                        .zip(acc.chunks_exact_mut(8 * T))
                    {
                        for h in 0..2 {
                            let v = load_f16x8(&cells[8 * h..]);
                            let v = if partial {
                                _mm256_and_ps(v, mask[h])
                            } else {
                                v
                            };
                            for (a, wv) in a.chunks_exact_mut(8).zip(&wv) {
                                let sum = if opening {
                                    _mm256_setzero_ps()
                                } else {
                                    a[2 * q + h]
                                };
                                a[2 * q + h] = _mm256_fmadd_ps(v, wv[h], sum);
                            }
                        }
                    }
                }
            }
            for (i, a) in acc.chunks_exact(8 * T).take(dn).enumerate() {
                for (t, a) in a.chunks_exact(8).enumerate() {
                    let mut lanes = [_mm256_setzero_ps(); 8];
                    lanes.copy_from_slice(a);
                    out[t * hd + dg + i] = fold_f16_accumulators(&lanes);
                }
            }
        }
        VALUE_ACCUMULATORS.set(acc);
    }

    thread_local! {
        /// The accumulators of [`weighted_values`] (64 lanes per output
        /// dimension, 64 KiB for a 256-wide head) and of [`value_tile`] (16
        /// KiB), kept per thread from call to call: they would otherwise be
        /// allocated and cleared for every row and head. Each call writes
        /// every accumulator it reads before reading it.
        static VALUE_ACCUMULATORS: std::cell::RefCell<Vec<__m256>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_sums_every_product() {
        let x: Vec<f32> = (0..70).map(|i| i as f32 * 0.5).collect();
        let y = vec![f16::from_f32(2.0); 70];
        assert_eq!(dot_f16(&x, &y), (0..70).map(|i| i as f32).sum::<f32>());
    }

    #[test]
    fn avx2_loops_give_the_portable_bits() {
        #[cfg(target_arch = "x86_64")]
        {
            if !super::super::KernelVariant::Avx2.is_available() {
                return;
            }
            let mut seed = 7u32;
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                (seed % 20_000) as f32 / 10_000.0 - 1.0
            };
            let mut v: Vec<f32> = (0..1000).map(|i| (i as f32 - 700.0) * 0.37).collect();
            v.extend([
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                0.0,
                -0.0,
                1e-40,
                88.0,
                89.0,
            ]);
            for max in [0.0f32, 3.5, -200.0, 250.0] {
                let (mut a, mut b) = (v.clone(), v.clone());
                exp_shifted(&mut a, max);
                // SAFETY: as below.
                unsafe { avx2::exp_shifted(&mut b, max) };
                assert_eq!(bits(&a), bits(&b), "exp, max {max}");
                round_weights(&mut a, 0.013);
                // SAFETY: as below.
                unsafe { avx2::round_weights(&mut b, 0.013) };
                assert_eq!(bits(&a), bits(&b), "weights, max {max}");
            }
            for hd in [64usize, 72, 256, 5] {
                let x: Vec<f32> = (0..hd).map(|_| f16::from_f32(next()).to_f32()).collect();
                let y: Vec<f16> = (0..hd).map(|_| f16::from_f32(next())).collect();
                // SAFETY: AVX2, FMA and F16C checked above.
                let fast = unsafe { avx2::dot_f16(&x, &y) };
                assert_eq!(fast.to_bits(), dot_f16(&x, &y).to_bits(), "dot, hd {hd}");
                // Value blocks of 16 cells for 3 KV heads of width hd.
                let kv_dim = 3 * hd;
                let blocks: Vec<Vec<f16>> = (0..13)
                    .map(|_| {
                        (0..kv_dim * BLOCK_TOKENS)
                            .map(|_| f16::from_f32(next()))
                            .collect()
                    })
                    .collect();
                let views: Vec<&[f16]> = blocks.iter().map(|b| &b[..]).collect();
                for (first, last) in [
                    (0usize, 0usize),
                    (3, 40),
                    (16, 79),
                    (0, 63),
                    (17, 18),
                    (5, 70),
                    (5, 200),
                    (64, 191),
                ] {
                    for heads in [1usize, 3, 4, 5] {
                        grouped_loops_match(&views, hd, heads, first, last, &mut next);
                    }
                    // Whatever the cache holds outside the cells (stale
                    // slots, infinities, NaN) changes nothing.
                    let mut poisoned = blocks.clone();
                    for (b, block) in poisoned.iter_mut().enumerate() {
                        for (i, v) in block.iter_mut().enumerate() {
                            let p = b * BLOCK_TOKENS + i % BLOCK_TOKENS;
                            if p < first || p > last {
                                *v = [f16::NAN, f16::INFINITY, f16::NEG_INFINITY][i % 3];
                            }
                        }
                    }
                    let poisoned: Vec<&[f16]> = poisoned.iter().map(|b| &b[..]).collect();
                    // Five heads: a tile of four and one alone.
                    let w: Vec<f32> = (0..5 * (last + 1 - first)).map(|_| next()).collect();
                    let (mut o1, mut o2) = (vec![0f32; 5 * hd], vec![0f32; 5 * hd]);
                    group_weighted_values(&views, hd, first, 5, &w, &mut o1);
                    // SAFETY: as above.
                    unsafe { avx2::group_weighted_values(&poisoned, hd, first, 5, &w, &mut o2) };
                    assert_eq!(bits(&o1), bits(&o2), "poisoned, hd {hd}, {first}..={last}");
                }
            }
        }
    }

    #[test]
    fn grouped_loops_leave_shapes_without_a_cell_alone() {
        let block = vec![f16::from_f32(1.0); 64 * BLOCK_TOKENS];
        let views: Vec<&[f16]> = vec![&block[..]];
        // Three heads of 64 but room for two scores; no head width; no weights.
        let q = vec![0.5f32; 3 * 64];
        let mut out = vec![7f32; 2];
        group_key_dots(&q, 64, &views, 64, 0, 0, &mut out);
        group_key_dots(&q, 0, &views, 64, 0, 0, &mut out);
        group_weighted_values(&views, 0, 0, 3, &[0.25; 2], &mut out);
        group_weighted_values(&views, 0, 0, 0, &[0.25; 2], &mut out);
        #[cfg(target_arch = "x86_64")]
        if super::super::KernelVariant::Avx2.is_available() {
            // SAFETY: AVX2, FMA and F16C checked just above.
            unsafe {
                avx2::group_key_dots(&q, 64, &views, 64, 0, 0, &mut out);
                avx2::group_key_dots(&q, 0, &views, 64, 0, 0, &mut out);
                avx2::group_weighted_values(&views, 0, 0, 3, &[0.25; 2], &mut out);
                avx2::group_weighted_values(&views, 0, 0, 0, &[0.25; 2], &mut out);
            }
        }
        assert_eq!(out, [7.0, 7.0]);
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// `heads` queries sharing the KV head at `hd` of `views` over cells
    /// `first..=last`: the grouped loops, portable and AVX2, give each
    /// head's single-query results.
    #[cfg(target_arch = "x86_64")]
    fn grouped_loops_match(
        views: &[&[f16]],
        hd: usize,
        heads: usize,
        first: usize,
        last: usize,
        next: &mut impl FnMut() -> f32,
    ) {
        let kv_dim = 3 * hd;
        let cells = last + 1 - first;
        let q: Vec<f32> = (0..heads * hd)
            .map(|_| f16::from_f32(next()).to_f32())
            .collect();
        let mut d1 = vec![0f32; heads * cells];
        let mut d2 = d1.clone();
        group_key_dots(&q, hd, views, kv_dim, hd, first, &mut d1);
        // SAFETY: the caller checked AVX2, FMA and F16C.
        unsafe { avx2::group_key_dots(&q, hd, views, kv_dim, hd, first, &mut d2) };
        for h in 0..heads {
            let x = &q[h * hd..(h + 1) * hd];
            for j in 0..cells {
                let at = ((first + j) % BLOCK_TOKENS) * kv_dim + hd;
                let one = dot_f16(x, &views[(first + j) / BLOCK_TOKENS][at..at + hd]);
                let i = h * cells + j;
                assert_eq!(d1[i].to_bits(), one.to_bits(), "key {j}, head {h}, hd {hd}");
                assert_eq!(
                    d2[i].to_bits(),
                    one.to_bits(),
                    "avx2 key {j}, head {h}, hd {hd}"
                );
            }
        }
        let w: Vec<f32> = (0..heads * cells).map(|_| next()).collect();
        let (mut o1, mut o2) = (vec![0f32; heads * hd], vec![0f32; heads * hd]);
        group_weighted_values(views, hd, first, heads, &w, &mut o1);
        // SAFETY: as above.
        unsafe { avx2::group_weighted_values(views, hd, first, heads, &w, &mut o2) };
        for h in 0..heads {
            let mut one = vec![0f32; hd];
            weighted_values(views, hd, first, &w[h * cells..(h + 1) * cells], &mut one);
            assert_eq!(bits(&o1[h * hd..(h + 1) * hd]), bits(&one), "head {h}");
        }
        assert_eq!(
            bits(&o1),
            bits(&o2),
            "values, hd {hd}, {heads} heads, cells {first}..={last}"
        );
    }
}
