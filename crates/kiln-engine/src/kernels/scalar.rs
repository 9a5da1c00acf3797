//! The portable kernels. They define Kiln's results: the SIMD variants must
//! reproduce them bit for bit.
//!
//! Each function is one output value, `Σ w·x` over a weight row, computed as
//! the ggml x86 kernel named on it computes it: exact integer sums per block
//! (or per 32-value sub-block) split over the same register lanes, combined
//! in f32 with the same fused multiply-adds in the same order, and the lanes
//! folded the same way at the end ([`hsum8`], [`hsum16`]).
//!
//! Block layouts (little-endian f16 scales):
//! - Q4_0 (18 B / 32): f16 d, 16 B nibbles (low nibbles are values 0..16,
//!   high nibbles 16..32); x = d·(q − 8).
//! - Q4_1 (20 B / 32): f16 d, f16 m, nibbles as Q4_0; x = d·q + m.
//! - Q5_0 (22 B / 32): f16 d, u32 high bits, nibbles; x = d·(q − 16).
//! - Q8_0 (34 B / 32): f16 d, 32 × i8; x = d·q.
//! - Q4_K (144 B / 256): f16 d, f16 dmin, 12 B of 6-bit scales and mins for
//!   8 sub-blocks of 32, 128 B nibbles (32-byte chunk c holds sub-block 2c in
//!   its low and 2c+1 in its high nibbles); x = d·sc·q − dmin·m.
//! - Q6_K (210 B / 256): 128 B low nibbles, 64 B high 2-bit pairs, 16 × i8
//!   scales (one per 16 values), f16 d; x = d·sc·(q − 32).

use half::f16;

use super::lanes::{hsum16, hsum8};
use super::quantize::{Q8KRow, Q8Row, QK, QK_K};

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The min correction of one Q4_K block in ggml's AVX2 order: lane `k` of
/// four takes sub-blocks 2k and 2k+1, fused with `dmin` (= −d_y · dmin_w).
#[inline]
pub(crate) fn add_q4k_mins(acc_m: &mut [f32; 4], dmin: f32, m: &[u8; 8], bs: &[i16]) {
    let p = |j: usize| i32::from(m[j]) * (i32::from(bs[2 * j]) + i32::from(bs[2 * j + 1]));
    for (k, a) in acc_m.iter_mut().enumerate() {
        *a = dmin.mul_add((p(2 * k) + p(2 * k + 1)) as f32, *a);
    }
}

/// The 8 scales and 8 mins of a Q4_K block from its 12 packed bytes
/// (ggml's `get_scale_min_k4`), a 32-bit word at a time: each byte's bits
/// stay in their byte.
#[inline]
pub(crate) fn q4k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    // Scales and mins 0..4: the low six bits of bytes 0..4 and 4..8.
    // Scales 4..8: the low nibbles of bytes 8..12 under the top two bits of
    // bytes 0..4; mins 4..8: the high nibbles of bytes 8..12 under the top
    // two bits of bytes 4..8.
    let sc_hi = (c & LOW4) | (((a >> 6) & LOW2) << 4);
    let m_hi = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
    let bytes = |lo: u32, hi: u32| (u64::from(lo) | (u64::from(hi) << 32)).to_le_bytes();
    (bytes(a & LOW6, sc_hi), bytes(b & LOW6, m_hi))
}

/// The 256 unsigned 6-bit values (0..64) of a Q6_K block, in order.
#[inline]
pub(crate) fn q6k_values(b: &[u8], out: &mut [u8; 256]) {
    let (ql, qh) = (&b[..128], &b[128..192]);
    for half in 0..2 {
        let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
        let o = &mut out[half * 128..];
        for l in 0..32 {
            o[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            o[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
}

/// The integer partial sums of a 32-value block as ggml's 256-bit registers
/// hold them: lane `l` sums the products of values `4l..4l+4`.
#[inline]
fn lane_sums(w: &[i32; 32], q: &[i8]) -> [i32; 8] {
    let mut s = [0i32; 8];
    for (l, lane) in s.iter_mut().enumerate() {
        let b = 4 * l;
        *lane = w[b] * i32::from(q[b])
            + w[b + 1] * i32::from(q[b + 1])
            + w[b + 2] * i32::from(q[b + 2])
            + w[b + 3] * i32::from(q[b + 3]);
    }
    s
}

/// `acc = fma(d, float(s), acc)` lane by lane (`_mm256_fmadd_ps(d, s, acc)`).
#[inline]
fn fma_lanes(acc: &mut [f32; 8], d: f32, s: &[i32; 8]) {
    for (a, &v) in acc.iter_mut().zip(s) {
        *a = d.mul_add(v as f32, *a);
    }
}

#[inline]
fn q4_0_values(b: &[u8], v: &mut [i32; 32]) {
    for j in 0..16 {
        v[j] = i32::from(b[2 + j] & 0xF) - 8;
        v[j + 16] = i32::from(b[2 + j] >> 4) - 8;
    }
}

#[inline]
fn q5_0_values(b: &[u8], v: &mut [i32; 32]) {
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        v[j] = (u32::from(b[6 + j] & 0xF) | ((qh >> j) & 1) << 4) as i32 - 16;
        v[j + 16] = (u32::from(b[6 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4) as i32 - 16;
    }
}

/// Q5_0 blocks (22 bytes each) as Q8_0 blocks (34 bytes each) of the same
/// scale and values.
pub(crate) fn widen_q5_0(blocks: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks.len() / 22 * 34);
    let mut v = [0i32; 32];
    for b in blocks.chunks_exact(22) {
        q5_0_values(b, &mut v);
        out.extend_from_slice(&b[..2]);
        // Each value is in -16..=15, so it fits its byte.
        out.extend(v.iter().map(|&x| x as i8 as u8));
    }
    out
}

#[inline]
fn q8_0_values(b: &[u8], v: &mut [i32; 32]) {
    for (o, &x) in v.iter_mut().zip(&b[2..34]) {
        *o = i32::from(x as i8);
    }
}

/// `ggml_vec_dot_{q4_0,q5_0,q8_0}_q8_0` (AVX2), which tinyBLAS_Q0_AVX
/// matches: per block an 8-lane integer sum scaled by `d_w · d_y` and fused
/// into an 8-lane accumulator, folded by `hsum_float_8`.
fn dot_q0(w: &[u8], block_bytes: usize, y: Q8Row<'_>, values: fn(&[u8], &mut [i32; 32])) -> f32 {
    let mut acc = [0f32; 8];
    let mut v = [0i32; 32];
    for ((b, q), &dy) in w
        .chunks_exact(block_bytes)
        .zip(y.qs.chunks_exact(QK))
        .zip(y.d)
    {
        values(b, &mut v);
        fma_lanes(&mut acc, f16_at(b, 0) * dy, &lane_sums(&v, q));
    }
    hsum8(&acc)
}

pub(crate) fn dot_q4_0(w: &[u8], y: Q8Row<'_>) -> f32 {
    dot_q0(w, 18, y, q4_0_values)
}

pub(crate) fn dot_q5_0(w: &[u8], y: Q8Row<'_>) -> f32 {
    dot_q0(w, 22, y, q5_0_values)
}

pub(crate) fn dot_q8_0(w: &[u8], y: Q8Row<'_>) -> f32 {
    dot_q0(w, 34, y, q8_0_values)
}

/// Q4_0 as llama.cpp runs it when the matrix has a multiple of 8 rows: the
/// weights are repacked eight rows at a time (`block_q4_0x8`) and multiplied
/// by `ggml_gemv/gemm_q4_0_8x8_q8_0`, where each output row owns one lane:
/// `acc = fma(float(Σ w·q), d_w · d_y, acc)` block by block.
pub(crate) fn dot_q4_0_repacked(w: &[u8], y: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    let mut v = [0i32; 32];
    for ((b, q), &dy) in w.chunks_exact(18).zip(y.qs.chunks_exact(QK)).zip(y.d) {
        q4_0_values(b, &mut v);
        let sum: i32 = v.iter().zip(q).map(|(&a, &c)| a * i32::from(c)).sum();
        acc = (sum as f32).mul_add(f16_at(b, 0) * dy, acc);
    }
    acc
}

/// `ggml_vec_dot_q4_1_q8_1` (AVX2): the 8-lane accumulator as for Q8_0 with
/// unsigned nibbles; the `m · s` terms fused into one f32 apart and added
/// after the fold.
pub(crate) fn dot_q4_1(w: &[u8], y: Q8Row<'_>) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    let mut v = [0i32; 32];
    for (((b, q), &dy), &sy) in w
        .chunks_exact(20)
        .zip(y.qs.chunks_exact(QK))
        .zip(y.d)
        .zip(y.s)
    {
        for j in 0..16 {
            v[j] = i32::from(b[4 + j] & 0xF);
            v[j + 16] = i32::from(b[4 + j] >> 4);
        }
        summs = f16_at(b, 2).mul_add(sy, summs);
        fma_lanes(&mut acc, f16_at(b, 0) * dy, &lane_sums(&v, q));
    }
    hsum8(&acc) + summs
}

/// Per Q4_K block: `Σ_j sc_j · Σ(q4 · q8)` over the 8 sub-blocks of 32, and
/// `Σ_j m_j · (bsum_2j + bsum_2j+1)` — both exact.
#[inline]
fn q4k_block_sums(b: &[u8], q8: &[i8], bsums: &[i16]) -> (i32, i32) {
    let (sc, m) = q4k_scales(&b[4..16]);
    let qs = &b[16..144];
    let mut sum = 0i32;
    for c in 0..4 {
        let bytes = &qs[c * 32..(c + 1) * 32];
        let lo = &q8[c * 64..c * 64 + 32];
        let hi = &q8[c * 64 + 32..c * 64 + 64];
        let s_lo: i32 = bytes
            .iter()
            .zip(lo)
            .map(|(&x, &v)| i32::from(x & 0xF) * i32::from(v))
            .sum();
        let s_hi: i32 = bytes
            .iter()
            .zip(hi)
            .map(|(&x, &v)| i32::from(x >> 4) * i32::from(v))
            .sum();
        sum += i32::from(sc[2 * c]) * s_lo + i32::from(sc[2 * c + 1]) * s_hi;
    }
    let mins: i32 = (0..8)
        .map(|j| i32::from(m[j]) * (i32::from(bsums[2 * j]) + i32::from(bsums[2 * j + 1])))
        .sum();
    (sum, mins)
}

/// Q4_K as llama.cpp runs it on x86 when the matrix has a multiple of 8
/// rows: repacked (`block_q4_Kx8`) and multiplied by
/// `ggml_gemv_q4_K_8x8_q8_K`, one lane per output row. Per block the two
/// exact sums go to their own accumulators, `fma(float(sum), d_w · d_y,
/// acc)`; the result is `acc − acc_min`.
pub(crate) fn dot_q4_k_repacked(w: &[u8], y: Q8KRow<'_>) -> f32 {
    let mut acc = 0f32;
    let mut acc_min = 0f32;
    for (i, b) in w.chunks_exact(144).enumerate() {
        let (sum, mins) = q4k_block_sums(
            b,
            &y.qs[i * QK_K..(i + 1) * QK_K],
            &y.bsums[i * 16..(i + 1) * 16],
        );
        acc = (sum as f32).mul_add(f16_at(b, 0) * y.d[i], acc);
        acc_min = (mins as f32).mul_add(f16_at(b, 2) * y.d[i], acc_min);
    }
    acc - acc_min
}

/// `ggml_vec_dot_q4_K_q8_K` (AVX2), for matrices llama.cpp does not repack:
/// lane `l` of 8 sums `sc_j · Σ` of values `4l..4l+4` of each sub-block,
/// fused with `d = d_y · d_w`; the mins in 4 lanes (lane `k` takes
/// sub-blocks 2k and 2k+1), fused with `−d_y · dmin`; both folded and added.
pub(crate) fn dot_q4_k(w: &[u8], y: Q8KRow<'_>) -> f32 {
    let mut acc = [0f32; 8];
    let mut acc_m = [0f32; 4];
    for (i, b) in w.chunks_exact(144).enumerate() {
        let q8 = &y.qs[i * QK_K..(i + 1) * QK_K];
        let bs = &y.bsums[i * 16..(i + 1) * 16];
        let d = y.d[i] * f16_at(b, 0);
        let dmin = -y.d[i] * f16_at(b, 2);
        let (sc, m) = q4k_scales(&b[4..16]);
        add_q4k_mins(&mut acc_m, dmin, &m, bs);
        let qs = &b[16..144];
        let mut sumi = [0i32; 8];
        for (l, s) in sumi.iter_mut().enumerate() {
            for j in 0..8 {
                let bytes = &qs[(j / 2) * 32 + 4 * l..(j / 2) * 32 + 4 * l + 4];
                let q = &q8[j * 32 + 4 * l..j * 32 + 4 * l + 4];
                let part: i32 = bytes
                    .iter()
                    .zip(q)
                    .map(|(&x, &v)| {
                        i32::from(if j % 2 == 0 { x & 0xF } else { x >> 4 }) * i32::from(v)
                    })
                    .sum();
                *s += i32::from(sc[j]) * part;
            }
        }
        fma_lanes(&mut acc, d, &sumi);
    }
    let m = (acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]);
    hsum8(&acc) + m
}

/// `ggml_vec_dot_q6_K_q8_K` (AVX2): the 6-bit values are multiplied
/// unsigned and the `−32` offset is taken off apart, as `32 · Σ bsum·sc`.
/// Lane `l` of 8 holds `Σ sc · Σ(q6 · q8)` over values `4l..4l+4` of each
/// 32-value chunk, minus `32 · (bsum_2l·sc_2l + bsum_2l+1·sc_2l+1)`; fused
/// with `d_y · d_w` block by block and folded by `hsum_float_8`.
pub(crate) fn dot_q6_k(w: &[u8], y: Q8KRow<'_>) -> f32 {
    let mut acc = [0f32; 8];
    let mut vals = [0u8; 256];
    for (i, b) in w.chunks_exact(210).enumerate() {
        let q8 = &y.qs[i * QK_K..(i + 1) * QK_K];
        let bs = &y.bsums[i * 16..(i + 1) * 16];
        q6k_values(b, &mut vals);
        let sc = |k: usize| i32::from(b[192 + k] as i8);
        let mut sumi = [0i32; 8];
        for (l, s) in sumi.iter_mut().enumerate() {
            for chunk in 0..8 {
                let at = chunk * 32 + 4 * l;
                let part: i32 = (at..at + 4)
                    .map(|k| i32::from(vals[k]) * i32::from(q8[k]))
                    .sum();
                *s += sc(at / 16) * part;
            }
            *s -=
                32 * (i32::from(bs[2 * l]) * sc(2 * l) + i32::from(bs[2 * l + 1]) * sc(2 * l + 1));
        }
        fma_lanes(&mut acc, y.d[i] * f16_at(b, 208), &sumi);
    }
    hsum8(&acc)
}

/// `ggml_vec_dot_f16` / `ggml_vec_dot_f32` on AVX-512 (the path batch-1
/// decode takes): four 16-lane accumulators over steps of 64 values, folded
/// `(0+2) + (1+3)` and reduced by `_mm512_reduce_add_ps`, then the tail
/// ([`f16_tail`], [`f32_tail`]).
fn dot_float(w: &[u8], x: &[f32], width: usize, value: fn(&[u8]) -> f32) -> f32 {
    let np = x.len() & !63;
    let mut acc = [[0f32; 16]; 4];
    for (wc, xc) in w.chunks_exact(64 * width).zip(x[..np].chunks_exact(64)) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, a) in lanes.iter_mut().enumerate() {
                let k = 16 * j + l;
                *a = xc[k].mul_add(value(&wc[k * width..]), *a);
            }
        }
    }
    let mut folded = [0f32; 16];
    for (l, v) in folded.iter_mut().enumerate() {
        *v = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let head = hsum16(&folded);
    if width == 2 {
        f16_tail(head, &w[np * 2..], &x[np..])
    } else {
        f32_tail(head, &w[np * 4..], &x[np..])
    }
}

/// The last `n % 64` values of `ggml_vec_dot_f16`: summed in order in f64.
pub(crate) fn f16_tail(head: f32, w: &[u8], x: &[f32]) -> f32 {
    let mut sum = f64::from(head);
    for (b, &v) in w.chunks_exact(2).zip(x) {
        sum += f64::from(v * f16::from_le_bytes([b[0], b[1]]).to_f32());
    }
    sum as f32
}

/// The last `n % 64` values of `ggml_vec_dot_f32`, `sumf += x[i]*y[i]` in
/// f32 as GCC compiled it: groups of 16, then one of 8, with the products
/// rounded before each add; the last `< 8` fused.
pub(crate) fn f32_tail(head: f32, w: &[u8], x: &[f32]) -> f32 {
    let value = |k: usize| f32::from_le_bytes([w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]]);
    let n = x.len();
    let unfused = (n & !15) + (n & 8);
    let mut sum = head;
    for (k, &v) in x.iter().enumerate() {
        sum = if k < unfused {
            sum + v * value(k)
        } else {
            v.mul_add(value(k), sum)
        };
    }
    sum
}

pub(crate) fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    dot_float(w, x, 2, |b| f16::from_le_bytes([b[0], b[1]]).to_f32())
}

pub(crate) fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    dot_float(w, x, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}
