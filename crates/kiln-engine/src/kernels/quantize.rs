//! Activations in the form each weight type's dot product takes them,
//! quantized number for number as ggml's x86 CPU backend does:
//! - Q8_0 / Q8_1 (blocks of 32, `quantize_row_q8_0/1` AVX2): `d = max|x| /
//!   127` stored as f16; values `x · (127 / max|x|)` rounded half to even
//!   (`_mm256_round_ps`), converted and saturated to i8 as `cvtps_epi32` and
//!   the `packs` instructions do; Q8_1 adds `s = f16(d · Σq)` with the f32 `d`.
//! - Q8_K (blocks of 256, `quantize_row_q8_K_ref`, which x86 uses): the scale
//!   comes from the *signed* value of largest magnitude (first one wins),
//!   `q = min(127, nearest_int(-127/max · x))`, `d = 1/iscale` kept in f32,
//!   and the sums of each 16 values.
//! - F16 weights take activations rounded to f16; F32 weights take them as is.
//!
//! A batch is stored structure-of-arrays (scales apart from quants) so the
//! kernels read each stream contiguously.

use half::f16;
use rayon::prelude::*;

use super::KernelVariant;

pub(crate) const QK: usize = 32;
/// Rows per parallel job when a batch is quantized (smaller batches stay on
/// the calling thread). Rows are independent, so the split changes no bits.
const PARALLEL_ROWS: usize = 16;
pub(crate) const QK_K: usize = 256;

/// The activation format a weight type's dot product consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActKind {
    F32,
    F16,
    Q8_0,
    Q8_1,
    Q8K,
}

/// `n` activation rows of `cols` values, quantized for one weight type.
pub(crate) struct Activations {
    cols: usize,
    /// F32 / F16: the values (F16: rounded to f16).
    values: Vec<f32>,
    /// Q8_*: per-block scale, as f32.
    d: Vec<f32>,
    /// Q8_1: per-block `d · Σq`, f16-rounded, as f32.
    s: Vec<f32>,
    qs: Vec<i8>,
    /// Q8_K: 16 sums of 16 quants per block.
    bsums: Vec<i16>,
}

/// One row of Q8_0 / Q8_1 activations.
#[derive(Clone, Copy)]
pub(crate) struct Q8Row<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub qs: &'a [i8],
}

/// One row of Q8_K activations.
#[derive(Clone, Copy)]
pub(crate) struct Q8KRow<'a> {
    pub d: &'a [f32],
    pub qs: &'a [i8],
    pub bsums: &'a [i16],
}

impl Activations {
    /// [`Activations::quantize_with`] with the portable code.
    #[cfg(test)]
    pub(crate) fn quantize(kind: ActKind, x: &[f32], cols: usize) -> Activations {
        Activations::quantize_with(kind, x, cols, KernelVariant::Scalar)
    }

    /// Quantizes `x` (`n × cols`, row-major; `cols` a multiple of the block
    /// length, checked by the caller), the rows with `variant`'s
    /// code (the same bits whichever runs); batches of more than
    /// `PARALLEL_ROWS` rows are spread over the rayon pool.
    pub(crate) fn quantize_with(
        kind: ActKind,
        x: &[f32],
        cols: usize,
        variant: KernelVariant,
    ) -> Activations {
        let (q8_row, q8k_row) = row_fns(variant);
        let n = x.len().checked_div(cols).unwrap_or(0);
        let mut a = Activations {
            cols,
            values: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
            qs: Vec::new(),
            bsums: Vec::new(),
        };
        match kind {
            ActKind::F32 => a.values = x.to_vec(),
            ActKind::F16 => a.values = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            ActKind::Q8_0 | ActKind::Q8_1 => {
                let nb = cols / QK;
                a.d = vec![0.0; n * nb];
                a.qs = vec![0; n * cols];
                let rows =
                    a.qs.par_chunks_mut(cols.max(1))
                        .zip(a.d.par_chunks_mut(nb.max(1)))
                        .zip(x.par_chunks(cols.max(1)))
                        .with_min_len(PARALLEL_ROWS);
                if kind == ActKind::Q8_1 {
                    a.s = vec![0.0; n * nb];
                    rows.zip(a.s.par_chunks_mut(nb.max(1)))
                        .for_each(|(((qs, d), row), s)| q8_row(row, d, Some(s), qs));
                } else {
                    rows.for_each(|((qs, d), row)| q8_row(row, d, None, qs));
                }
            }
            ActKind::Q8K => {
                let nb = cols / QK_K;
                a.d = vec![0.0; n * nb];
                a.qs = vec![0; n * cols];
                a.bsums = vec![0; n * nb * 16];
                a.qs.par_chunks_mut(cols.max(1))
                    .zip(a.d.par_chunks_mut(nb.max(1)))
                    .zip(a.bsums.par_chunks_mut((nb * 16).max(1)))
                    .zip(x.par_chunks(cols.max(1)))
                    .with_min_len(PARALLEL_ROWS)
                    .for_each(|(((qs, d), bsums), row)| q8k_row(row, d, qs, bsums));
            }
        }
        a
    }

    /// Row `i` of F32 / F16 activations.
    pub(crate) fn float_row(&self, i: usize) -> &[f32] {
        &self.values[i * self.cols..(i + 1) * self.cols]
    }

    /// Row `i` of Q8_0 / Q8_1 activations.
    #[inline]
    pub(crate) fn q8_row(&self, i: usize) -> Q8Row<'_> {
        let nb = self.cols / QK;
        Q8Row {
            d: &self.d[i * nb..(i + 1) * nb],
            s: if self.s.is_empty() {
                &[]
            } else {
                &self.s[i * nb..(i + 1) * nb]
            },
            qs: &self.qs[i * self.cols..(i + 1) * self.cols],
        }
    }

    /// Row `i` of Q8_K activations.
    #[inline]
    pub(crate) fn q8k_row(&self, i: usize) -> Q8KRow<'_> {
        let nb = self.cols / QK_K;
        Q8KRow {
            d: &self.d[i * nb..(i + 1) * nb],
            qs: &self.qs[i * self.cols..(i + 1) * self.cols],
            bsums: &self.bsums[i * nb * 16..(i + 1) * nb * 16],
        }
    }
}

/// `_mm256_round_ps(v, _MM_ROUND_NEAREST)` then `_mm256_cvtps_epi32`: half to
/// even; NaN and values out of i32 range give `i32::MIN` as the instruction
/// does.
#[inline]
fn round_cvt(v: f32) -> i32 {
    // Adding 1.5·2^23 rounds to an integer (half to even) for |v| < 2^22.
    const MAGIC: f32 = 12_582_912.0;
    if v.abs() < 4_194_304.0 {
        ((v + MAGIC) - MAGIC) as i32
    } else if v.abs() < 2_147_483_648.0 {
        v as i32 // already an integer
    } else {
        i32::MIN // NaN, ±inf, out of range
    }
}

/// ggml's `nearest_int`: the magic-number rounding (half to even for
/// |v| < 2^22), bit for bit — including what it returns outside that range.
#[inline]
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0).to_bits();
    (bits & 0x007f_ffff) as i32 - 0x0040_0000
}

/// One row into Q8_0 (or Q8_1 when `s` is given) blocks.
/// The functions that quantize a Q8_0 / Q8_1 row and a Q8_K row.
type Q8RowFn = fn(&[f32], &mut [f32], Option<&mut [f32]>, &mut [i8]);
type Q8KRowFn = fn(&[f32], &mut [f32], &mut [i8], &mut [i16]);

/// The row quantizers `variant` uses (the same bits whichever runs).
fn row_fns(variant: KernelVariant) -> (Q8RowFn, Q8KRowFn) {
    #[cfg(target_arch = "x86_64")]
    if variant != KernelVariant::Scalar && variant.is_available() {
        return (
            |x, d, s, qs| {
                // SAFETY: the variant's features (AVX2 at least) were
                // checked available on this CPU just above.
                unsafe { super::avx2::quantize_q8_row(x, d, s, qs) }
            },
            |x, d, qs, bsums| {
                // SAFETY: as above.
                unsafe { super::avx2::quantize_q8k_row(x, d, qs, bsums) }
            },
        );
    }
    let _ = variant;
    (quantize_q8_row, quantize_q8k_row)
}

pub(crate) fn quantize_q8_row(x: &[f32], d: &mut [f32], mut s: Option<&mut [f32]>, qs: &mut [i8]) {
    for (b, (block, q)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = max / 127.0;
        let id = if max != 0.0 { 127.0 / max } else { 0.0 };
        d[b] = f16::from_f32(scale).to_f32();
        let mut sum = 0i32;
        for (o, &v) in q.iter_mut().zip(block) {
            let i = round_cvt(v * id);
            sum = sum.wrapping_add(i);
            *o = i.clamp(-128, 127) as i8;
        }
        if let Some(s) = s.as_deref_mut() {
            s[b] = f16::from_f32(scale * sum as f32).to_f32();
        }
    }
}

/// One row into Q8_K blocks (`quantize_row_q8_K_ref`).
pub(crate) fn quantize_q8k_row(x: &[f32], d: &mut [f32], qs: &mut [i8], bsums: &mut [i16]) {
    for (b, (block, q)) in x
        .chunks_exact(QK_K)
        .zip(qs.chunks_exact_mut(QK_K))
        .enumerate()
    {
        let mut amax = 0f32;
        let mut max = 0f32;
        for &v in block {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let sums = &mut bsums[b * 16..(b + 1) * 16];
        if amax == 0.0 {
            d[b] = 0.0;
            q.fill(0);
            sums.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (o, &v) in q.iter_mut().zip(block) {
            // C's int -> int8_t conversion keeps the low byte.
            *o = nearest_int(iscale * v).min(127) as i8;
        }
        for (sum, group) in sums.iter_mut().zip(q.chunks_exact(16)) {
            *sum = group.iter().map(|&v| i32::from(v)).sum::<i32>() as i16;
        }
        d[b] = 1.0 / iscale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's `quantize_row_q8_0/q8_1/q8_K` as llama.cpp's CPU backend runs
    /// them here (tests/fixtures/kernels/ggml_matmul.json, written by
    /// scripts/make_dequant_fixtures.py): the same blocks, byte for byte.
    #[test]
    fn activation_blocks_match_ggml() -> anyhow::Result<()> {
        #[derive(serde::Deserialize)]
        struct Fixture {
            quantize: Vec<Case>,
        }
        #[derive(serde::Deserialize)]
        struct Case {
            kind: String,
            x_f32_hex: String,
            ggml_hex: String,
        }
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/kernels/ggml_matmul.json");
        let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let mut kinds = Vec::new();
        for case in &fixture.quantize {
            let x: Vec<f32> = hex::decode(&case.x_f32_hex)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let want = hex::decode(&case.ggml_hex)?;
            let f16_bytes = |v: f32| f16::from_f32(v).to_le_bytes();
            let mut ours = Vec::new();
            match case.kind.as_str() {
                "Q8_0" | "Q8_1" => {
                    let kind = if case.kind == "Q8_0" {
                        ActKind::Q8_0
                    } else {
                        ActKind::Q8_1
                    };
                    let a = Activations::quantize(kind, &x, x.len());
                    let r = a.q8_row(0);
                    for (b, q) in r.qs.chunks_exact(QK).enumerate() {
                        ours.extend(f16_bytes(r.d[b]));
                        if kind == ActKind::Q8_1 {
                            ours.extend(f16_bytes(r.s[b]));
                        }
                        ours.extend(q.iter().map(|&v| v as u8));
                    }
                }
                "Q8_K" => {
                    let a = Activations::quantize(ActKind::Q8K, &x, x.len());
                    let r = a.q8k_row(0);
                    for (b, q) in r.qs.chunks_exact(QK_K).enumerate() {
                        ours.extend(r.d[b].to_le_bytes());
                        ours.extend(q.iter().map(|&v| v as u8));
                        for s in &r.bsums[16 * b..16 * b + 16] {
                            ours.extend(s.to_le_bytes());
                        }
                    }
                }
                other => anyhow::bail!("unknown activation kind {other}"),
            }
            assert_eq!(ours, want, "{} blocks differ from ggml's", case.kind);
            kinds.push(case.kind.clone());
        }
        for k in ["Q8_0", "Q8_1", "Q8_K"] {
            anyhow::ensure!(kinds.iter().any(|c| c == k), "no {k} case");
        }
        Ok(())
    }

    /// Every variant's Q8_0 / Q8_1 / Q8_K rows are the portable code's, also
    /// for zeros, halves, huge values, infinities and NaN.
    #[test]
    fn every_variant_quantizes_the_same_bits() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut x: Vec<f32> = (0..32 * 40).map(|_| rng.random_range(-3f32..3.0)).collect();
        x[..32].fill(0.0);
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = i as f32 - 15.5;
        }
        x[64] = 1e30;
        x[100] = f32::INFINITY;
        x[140] = f32::NAN;
        x[170] = -1e-30;
        x[200] = 5e9;
        // A block with its largest magnitude twice (the first one counts)
        // and one of only zeros.
        x[300] = -2.5;
        x[301] = 2.5;
        x[512..768].fill(0.0);
        for (kind, cols) in [
            (ActKind::Q8_0, 256),
            (ActKind::Q8_1, 256),
            (ActKind::Q8K, 256),
        ] {
            let want = Activations::quantize(kind, &x, cols);
            for variant in KernelVariant::available() {
                let got = Activations::quantize_with(kind, &x, cols, variant);
                assert_eq!(got.bsums, want.bsums, "{kind:?} {}", variant.name());
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(got.qs, want.qs, "{kind:?} {}", variant.name());
                assert_eq!(bits(&got.d), bits(&want.d), "{kind:?} {}", variant.name());
                assert_eq!(bits(&got.s), bits(&want.s), "{kind:?} {}", variant.name());
            }
        }
    }

    #[test]
    fn q8_rounds_half_to_even_and_keeps_sum() {
        // max 127 → id 1: 0.5 → 0, 1.5 → 2, 2.5 → 2, -2.5 → -2.
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = 1.5;
        x[3] = 2.5;
        x[4] = -2.5;
        let a = Activations::quantize(ActKind::Q8_1, &x, 32);
        let r = a.q8_row(0);
        assert_eq!(&r.qs[..5], &[127, 0, 2, 2, -2]);
        assert_eq!(r.d[0], 1.0);
        assert_eq!(r.s[0], 129.0);
    }

    #[test]
    fn q8k_uses_signed_max() {
        let mut x = vec![0.25f32; 256];
        x[7] = -2.0;
        let a = Activations::quantize(ActKind::Q8K, &x, 256);
        let r = a.q8k_row(0);
        // The value of largest magnitude maps to -127 whatever its sign.
        assert_eq!(r.qs[7], -127);
        assert_eq!(r.qs[0], 16, "0.25 · 63.5 = 15.875 rounds to 16");
        assert!((r.d[0] - 2.0 / 127.0).abs() < 1e-9);
        assert_eq!(r.bsums.len(), 16);
        assert_eq!(r.bsums[0], -127 + 16 * 15);
        // A positive largest value maps to -127 too.
        let a = Activations::quantize(ActKind::Q8K, &x.iter().map(|v| -v).collect::<Vec<_>>(), 256);
        assert_eq!(a.q8k_row(0).qs[7], -127);
        assert_eq!(a.q8k_row(0).qs[0], 16);
    }

    #[test]
    fn zero_and_non_finite_blocks_do_not_panic() {
        let a = Activations::quantize(ActKind::Q8K, &[0.0; 256], 256);
        assert!(a.q8k_row(0).qs.iter().all(|&q| q == 0) && a.q8k_row(0).d[0] == 0.0);
        let a = Activations::quantize(ActKind::Q8_1, &[0.0; 32], 32);
        assert!(a.q8_row(0).qs.iter().all(|&q| q == 0) && a.q8_row(0).s[0] == 0.0);
        let mut x = vec![1.0f32; 256];
        x[3] = f32::INFINITY;
        x[4] = f32::NAN;
        let _ = Activations::quantize(ActKind::Q8_1, &x, 256);
        let _ = Activations::quantize(ActKind::Q8K, &x, 256);
        assert_eq!(round_cvt(f32::NAN), i32::MIN);
        assert_eq!(round_cvt(-3.5), -4);
        assert_eq!(nearest_int(-3.5), -4);
        assert_eq!(nearest_int(2.5), 2);
    }
}
