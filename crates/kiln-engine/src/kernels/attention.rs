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
    pub fn key_dots(
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
    pub fn weighted_values(
        values: &[&[f16]],
        offset: usize,
        first: usize,
        w: &[f32],
        out: &mut [f32],
    ) {
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

    thread_local! {
        /// [`weighted_values`]' accumulators, kept per thread from call to
        /// call: 64 lanes per output dimension (64 KiB for a 256-wide head)
        /// would otherwise be allocated and cleared for every row and head.
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
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
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
                    // The query with every key of the cells, eight at a
                    // time or one by one, gives dot_f16's bits.
                    let q: Vec<f32> = (0..hd).map(|_| f16::from_f32(next()).to_f32()).collect();
                    let mut d1 = vec![0f32; last + 1 - first];
                    let mut d2 = d1.clone();
                    key_dots(&q, &views, kv_dim, hd, first, &mut d1);
                    // SAFETY: as above.
                    unsafe { avx2::key_dots(&q, &views, kv_dim, hd, first, &mut d2) };
                    for (j, (a, b)) in d1.iter().zip(&d2).enumerate() {
                        let at = ((first + j) % BLOCK_TOKENS) * kv_dim + hd;
                        let one = dot_f16(&q, &views[(first + j) / BLOCK_TOKENS][at..at + hd]);
                        assert_eq!(a.to_bits(), one.to_bits(), "key {j}, hd {hd}");
                        assert_eq!(b.to_bits(), one.to_bits(), "avx2 key {j}, hd {hd}");
                    }
                    let w: Vec<f32> = (first..=last).map(|_| next()).collect();
                    let (mut o1, mut o2) = (vec![0f32; hd], vec![0f32; hd]);
                    weighted_values(&views, hd, first, &w, &mut o1);
                    // SAFETY: as above.
                    unsafe { avx2::weighted_values(&views, hd, first, &w, &mut o2) };
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&o1),
                        bits(&o2),
                        "values, hd {hd}, cells {first}..={last}"
                    );
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
                    let views: Vec<&[f16]> = poisoned.iter().map(|b| &b[..]).collect();
                    // SAFETY: as above.
                    unsafe { avx2::weighted_values(&views, hd, first, &w, &mut o2) };
                    assert_eq!(bits(&o1), bits(&o2), "poisoned, hd {hd}, {first}..={last}");
                }
            }
        }
    }
}
