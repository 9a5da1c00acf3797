//! Dense matrix products for the encoder, `C = A·B + bias`, with `B` packed
//! once into panels the tile kernels ([`super::isa`]) stream through.
//!
//! A [`PackedMatrix`] holds `B` (`k × n`) as `⌈n / NR⌉` panels of `k` rows
//! of [`NR`] columns, zero-padded on the right, plus a bias padded the same
//! way. Weights are packed at load; attention packs its keys and values into
//! a reused one per (sequence, head).
//!
//! [`matmul`] splits the work over the rayon pool: by blocks of rows when
//! there are enough rows (each task streams all of `B`, which stays in the
//! shared cache), otherwise by panels (each task streams a share of `B`,
//! which is what a single short query is bound by). With the tiled
//! variants an output value is the same sum in the same order either way,
//! so results do not depend on the batch, the split or the thread count.

use rayon::prelude::*;

use super::isa::{multiversion, Arith, Isa, Portable, Tiled, NR};
use super::math::{add_layer_norm, gelu_slice, LayerNorm};

/// Most rows per block: a block of `A` (up to 96 × 1536 floats) stays in L2
/// while every panel of `B` passes over it. (192 measured no faster.)
const MC: usize = 96;

/// `B` (`k × n`) in panels of [`NR`] columns, and a bias of `n` values.
pub(super) struct PackedMatrix {
    k: usize,
    n: usize,
    /// Panel `p` is `data[p * k * NR..(p + 1) * k * NR]`, row-major `k × NR`.
    data: Vec<f32>,
    /// One bias row per panel, zero past `n`.
    bias: Vec<[f32; NR]>,
}

impl PackedMatrix {
    pub(super) fn new() -> PackedMatrix {
        PackedMatrix {
            k: 0,
            n: 0,
            data: Vec::new(),
            bias: Vec::new(),
        }
    }

    /// A torch `Linear` (`y = x Wᵀ + b`): `weight` is `n × k` row-major.
    /// The caller has checked `weight.len() == n * k`, `bias.len() == n`.
    pub(super) fn from_linear(weight: &[f32], bias: &[f32], n: usize, k: usize) -> PackedMatrix {
        let mut packed = PackedMatrix::new();
        packed.pack_transposed(weight, k, n, k);
        for (j, &b) in bias.iter().enumerate().take(n) {
            packed.bias[j / NR][j % NR] = b;
        }
        packed
    }

    fn panels(&self) -> usize {
        self.bias.len()
    }

    fn reset(&mut self, k: usize, n: usize) {
        let panels = n.div_ceil(NR);
        self.k = k;
        self.n = n;
        self.data.clear();
        self.data.resize(panels * k * NR, 0.0);
        self.bias.clear();
        self.bias.resize(panels, [0.0; NR]);
    }

    /// Packs `B = Sᵀ`, with `S` the `n` rows `s[j * ld..j * ld + k]`; zero bias.
    pub(super) fn pack_transposed(&mut self, s: &[f32], ld: usize, n: usize, k: usize) {
        self.reset(k, n);
        for (j, row) in s.chunks(ld).take(n).enumerate() {
            let panel = &mut self.data[(j / NR) * k * NR..(j / NR + 1) * k * NR];
            for (kk, &v) in row[..k].iter().enumerate() {
                panel[kk * NR + j % NR] = v;
            }
        }
    }

    /// Packs `B` given as the `k` rows `s[kk * ld..kk * ld + n]`; zero bias.
    pub(super) fn pack_rows(&mut self, s: &[f32], ld: usize, k: usize, n: usize) {
        self.reset(k, n);
        for (kk, row) in s.chunks(ld).take(k).enumerate() {
            for (p, cols) in row[..n].chunks(NR).enumerate() {
                let at = p * k * NR + kk * NR;
                self.data[at..at + cols.len()].copy_from_slice(cols);
            }
        }
    }
}

/// [`Arith::product`] for `A`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_block_generic<A: Arith>(
    a: &[f32],
    lda: usize,
    m: usize,
    b: &PackedMatrix,
    p0: usize,
    p1: usize,
    c: &mut [f32],
    ldc: usize,
    gelu: bool,
) {
    A::product(a, lda, m, b, p0, p1, c, ldc, gelu);
}

/// [`Arith::product`] with `A`'s tiles: for each block of up to [`MC`]
/// rows, every panel passes over the block a tile of rows at a time; GELU
/// is applied to each tile while it is hot.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn tiled_product<A: Tiled>(
    a: &[f32],
    lda: usize,
    m: usize,
    b: &PackedMatrix,
    p0: usize,
    p1: usize,
    c: &mut [f32],
    ldc: usize,
    gelu: bool,
) {
    let k = b.k;
    let mut block = 0;
    while block < m {
        let block_end = (block + MC).min(m);
        for p in p0..p1.min(b.panels()) {
            let panel = &b.data[p * k * NR..(p + 1) * k * NR];
            let col0 = (p - p0) * NR;
            let cols = (b.n - p * NR).min(NR);
            let mut r = block;
            while r < block_end {
                let rows = A::MR.min(block_end - r);
                let out = &mut c[r * ldc + col0..];
                A::tile(
                    rows,
                    &a[r * lda..],
                    lda,
                    panel,
                    k,
                    &b.bias[p],
                    out,
                    ldc,
                    cols,
                );
                if gelu {
                    for i in 0..rows {
                        gelu_slice::<A>(&mut out[i * ldc..i * ldc + cols]);
                    }
                }
                r += rows;
            }
        }
        block = block_end;
    }
}

/// [`Arith::product`] for [`Portable`]: the `gemm` crate, one panel at a time
/// (a panel is a `k × NR` matrix of row stride `NR`), onto `c` pre-filled with
/// the bias.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_crate_product(
    a: &[f32],
    lda: usize,
    m: usize,
    b: &PackedMatrix,
    p0: usize,
    p1: usize,
    c: &mut [f32],
    ldc: usize,
    gelu: bool,
) {
    let k = b.k;
    if m == 0 || k == 0 {
        return;
    }
    let a = &a[..(m - 1) * lda + k];
    for p in p0..p1.min(b.panels()) {
        let panel = &b.data[p * k * NR..(p + 1) * k * NR];
        let col0 = (p - p0) * NR;
        let cols = (b.n - p * NR).min(NR);
        let out = &mut c[col0..col0 + (m - 1) * ldc + cols];
        for r in 0..m {
            out[r * ldc..r * ldc + cols].copy_from_slice(&b.bias[p][..cols]);
        }
        // SAFETY: `gemm` reads lhs[r * lda + kk] (r < m, kk < k), inside `a`
        // as cut above; rhs[kk * NR + j] (j < cols ≤ NR), inside `panel`; and
        // reads and writes dst[r * ldc + j], inside `out`. `out` is borrowed
        // mutably, so it overlaps neither input.
        unsafe {
            gemm::gemm(
                m,
                cols,
                k,
                out.as_mut_ptr(),
                1,
                ldc as isize,
                true,
                a.as_ptr(),
                1,
                lda as isize,
                panel.as_ptr(),
                1,
                NR as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        if gelu {
            for r in 0..m {
                gelu_slice::<Portable>(&mut out[r * ldc..r * ldc + cols]);
            }
        }
    }
}

multiversion! {
    /// [`gemm_block_generic`] for `isa`, on the calling thread.
    pub(super) fn gemm_block = gemm_block_generic(
        a: &[f32],
        lda: usize,
        m: usize,
        b: &PackedMatrix,
        p0: usize,
        p1: usize,
        c: &mut [f32],
        ldc: usize,
        gelu: bool,
    );
}

/// What [`matmul`] does to its output after `A·B + bias`.
pub(super) enum Epilogue<'a> {
    /// Nothing.
    Plain,
    /// GELU (erf form), element-wise.
    Gelu,
    /// Adds `residual` (same shape as the output) and applies `norm` per row.
    AddNorm {
        residual: &'a [f32],
        norm: &'a LayerNorm,
    },
}

/// `c = epilogue(a·B + bias)` for the `m` rows of `a` (`m × B.k`, contiguous)
/// into `c` (`m × B.n`), split over the rayon pool.
pub(super) fn matmul(
    isa: Isa,
    a: &[f32],
    m: usize,
    b: &PackedMatrix,
    c: &mut [f32],
    epilogue: Epilogue<'_>,
) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let a = &a[..m * k];
    let c = &mut c[..m * n];
    let gelu = matches!(epilogue, Epilogue::Gelu);
    let threads = rayon::current_num_threads().max(1);
    let panels = b.panels();
    if threads == 1 || m >= 2 * threads * isa.tile_rows() || panels == 1 {
        // By rows: at least two blocks per thread, for balance when a
        // thread is busy elsewhere, a multiple of the thread count, and
        // none over MC rows.
        let tasks = (2 * threads).max(m.div_ceil(MC)).next_multiple_of(threads);
        let rows = m.div_ceil(tasks);
        a.par_chunks(rows * k)
            .zip(c.par_chunks_mut(rows * n))
            .enumerate()
            .for_each(|(i, (a, c))| {
                let m = c.len() / n;
                gemm_block(isa, a, k, m, b, 0, panels, c, n, gelu);
                if let Epilogue::AddNorm { residual, norm } = &epilogue {
                    let residual = &residual[i * rows * n..i * rows * n + m * n];
                    add_layer_norm(isa, c, Some(residual), norm);
                }
            });
        return;
    }
    // By panels, each share into its own buffer, then gathered.
    let per_task = panels.div_ceil(threads);
    let shares: Vec<(usize, Vec<f32>)> = (0..panels)
        .step_by(per_task)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|p0| {
            let p1 = (p0 + per_task).min(panels);
            let width = (n - p0 * NR).min((p1 - p0) * NR);
            let mut out = vec![0f32; m * width];
            gemm_block(isa, a, k, m, b, p0, p1, &mut out, width, gelu);
            (p0 * NR, out)
        })
        .collect();
    for (col0, share) in &shares {
        let width = share.len() / m;
        for (row, part) in c.chunks_exact_mut(n).zip(share.chunks_exact(width)) {
            row[*col0..col0 + width].copy_from_slice(part);
        }
    }
    if let Epilogue::AddNorm { residual, norm } = epilogue {
        add_layer_norm(isa, c, Some(&residual[..m * n]), norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// `x Wᵀ + b` in f64.
    fn reference(x: &[f32], w: &[f32], bias: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|kk| f64::from(x[i * k + kk]) * f64::from(w[j * k + kk]))
                    .sum();
                out[i * n + j] = dot + f64::from(bias[j]);
            }
        }
        out
    }

    /// Every variant, every split, odd shapes (partial tiles and panels):
    /// close to f64, and the SIMD variants identical to each other.
    #[test]
    fn products_match_f64_in_every_variant() {
        let pools: Vec<rayon::ThreadPool> = [1, 3]
            .into_iter()
            .filter_map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().ok())
            .collect();
        assert_eq!(pools.len(), 2);
        let shapes = [
            (1, 1, 1),
            (1, 64, 384),
            (5, 37, 33),
            (13, 64, 31),
            (25, 17, 100),
            (50, 130, 65),
            (200, 48, 96),
        ];
        for (seed, &(m, k, n)) in shapes.iter().enumerate() {
            let x = values(m * k, seed as u32);
            let w = values(n * k, seed as u32 + 100);
            let bias = values(n, seed as u32 + 200);
            let packed = PackedMatrix::from_linear(&w, &bias, n, k);
            let want = reference(&x, &w, &bias, m, n, k);
            let mut simd: Option<Vec<f32>> = None;
            for isa in Isa::all_available() {
                for pool in &pools {
                    let mut got = vec![f32::NAN; m * n];
                    pool.install(|| matmul(isa, &x, m, &packed, &mut got, Epilogue::Plain));
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (f64::from(*g) - w).abs() < 1e-5 * (k as f64).sqrt(),
                            "{isa:?} {m}x{k}x{n}: {g} vs {w}"
                        );
                    }
                    if isa != Isa::Portable {
                        match &simd {
                            Some(first) => assert!(&got == first, "{isa:?} {m}x{k}x{n}"),
                            None => simd = Some(got),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn epilogues_and_packing_from_rows() {
        let (m, k, n) = (7, 20, 45);
        let x = values(m * k, 1);
        let w = values(n * k, 2);
        let bias = values(n, 3);
        let residual = values(m * n, 4);
        let norm = LayerNorm {
            weight: values(n, 5),
            bias: values(n, 6),
            eps: 1e-12,
        };
        // The same B packed from its rows (k × n) rather than from Wᵀ.
        let mut b_rows = vec![0f32; k * n];
        for j in 0..n {
            for kk in 0..k {
                b_rows[kk * n + j] = w[j * k + kk];
            }
        }
        let mut from_rows = PackedMatrix::new();
        from_rows.pack_rows(&b_rows, n, k, n);
        let no_bias = PackedMatrix::from_linear(&w, &vec![0.0; n], n, k);
        assert!(from_rows.data == no_bias.data && from_rows.bias == no_bias.bias);
        let packed = PackedMatrix::from_linear(&w, &bias, n, k);
        for isa in Isa::all_available() {
            let mut plain = vec![0f32; m * n];
            matmul(isa, &x, m, &packed, &mut plain, Epilogue::Plain);
            let mut gelu = vec![0f32; m * n];
            matmul(isa, &x, m, &packed, &mut gelu, Epilogue::Gelu);
            let mut want_gelu = plain.clone();
            crate::bert::math::gelu_in_place(isa, &mut want_gelu);
            assert!(gelu == want_gelu, "{isa:?}");
            let mut normed = vec![0f32; m * n];
            let epilogue = Epilogue::AddNorm {
                residual: &residual,
                norm: &norm,
            };
            matmul(isa, &x, m, &packed, &mut normed, epilogue);
            let mut want_norm = plain.clone();
            add_layer_norm(isa, &mut want_norm, Some(&residual), &norm);
            assert!(normed == want_norm, "{isa:?}");
        }
    }
}
