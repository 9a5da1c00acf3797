//! Kiln's CPU kernels for matrix products with GGUF-quantized weights.
//!
//! A [`QMatrix`] keeps a weight matrix in its file format (blocks of
//! quantized values with f16 scales; Q5_0 widened, below) and multiplies it with f32 activations
//! the way llama.cpp's CPU backend (ggml, x86, as built here with AVX-512)
//! does for a batch of one: the activations are first quantized to the weight
//! type's 8-bit partner format ([`quantize`]: Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1
//! for Q4_1, Q8_K for Q4_K/Q6_K, f16 for F16), each block's dot product is an
//! exact integer sum, and the sums are scaled and added in f32 with the same
//! fused multiply-adds, in the same order and register lanes, as ggml's
//! kernel for that type ([`scalar`] documents each one). Where llama.cpp
//! repacks a matrix (Q4_0 and Q4_K with a multiple of 8 rows, on any AVX2
//! CPU) we follow its repacked kernel's order instead.
//!
//! Invariants:
//! - Every output value depends only on its weight row and its input row:
//!   not on the batch size `n`, not on the thread count, not on the kernel
//!   variant (the SIMD variants in [`avx2`] / [`avx512`] reproduce the
//!   portable [`scalar`] code bit for bit). ggml itself changes its
//!   arithmetic with the batch for some types (tinyBLAS for F16/F32, the
//!   repacked GEMM for Q4_K, the tiled kernel for K-quants at n ≥ 8); we
//!   always follow its batch-of-one path.
//! - The raw block bytes were size-checked when the matrix was built, so the
//!   kernels index without further checks failing.
//!
//! The variant is chosen once at run time from the CPU's features
//! ([`KernelVariant::selected`], `KILN_KERNELS=scalar|avx2|avx512`).
//!
//! Q5_0 matrices are widened when they are built ([`Q5_0Layout`]): each
//! block's 32 five-bit values are stored as Q8_0's signed bytes, with the
//! same scale. Unpacking five-bit values costs more instructions than the
//! product itself, and with two threads those kernels are bound by the
//! instructions, not by the memory they read; Q8_0's are bound by the
//! memory. The block's integer sum is the same exact integer either way
//! and ggml's Q5_0 and Q8_0 kernels scale and add it alike, so the results
//! keep their bits. `KILN_Q5_0=keep` keeps the file's blocks (a third less
//! memory for those matrices).

pub mod attention;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod dequant;
mod dispatch;
pub mod lanes;
mod quantize;
mod scalar;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::quantized::{GgmlDType, QTensor};

use crate::error::{EngineError, Result};
pub use dispatch::{KernelVariant, KERNELS_ENV};
use quantize::{ActKind, Activations};

/// The weight types the kernels multiply.
pub const SUPPORTED_TYPES: [GgmlDType; 8] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
];

/// A weight format together with the ggml kernel whose arithmetic we follow
/// for it (Q4_0 and Q4_K have two, chosen by the matrix's row count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DotKind {
    F32,
    F16,
    /// `ggml_vec_dot_q4_0_q8_0`: rows not a multiple of 8.
    Q4_0,
    /// `ggml_gemv_q4_0_8x8_q8_0`: rows a multiple of 8.
    Q4_0Repacked,
    Q4_1,
    Q5_0,
    Q8_0,
    /// `ggml_vec_dot_q4_K_q8_K`: rows not a multiple of 8.
    Q4K,
    /// `ggml_gemv_q4_K_8x8_q8_K`: rows a multiple of 8.
    Q4KRepacked,
    Q6K,
}

impl DotKind {
    fn new(dtype: GgmlDType, rows: usize) -> Option<DotKind> {
        let repacked = rows.is_multiple_of(8);
        Some(match dtype {
            GgmlDType::F32 => DotKind::F32,
            GgmlDType::F16 => DotKind::F16,
            GgmlDType::Q4_0 if repacked => DotKind::Q4_0Repacked,
            GgmlDType::Q4_0 => DotKind::Q4_0,
            GgmlDType::Q4_1 => DotKind::Q4_1,
            GgmlDType::Q5_0 => DotKind::Q5_0,
            GgmlDType::Q8_0 => DotKind::Q8_0,
            GgmlDType::Q4K if repacked => DotKind::Q4KRepacked,
            GgmlDType::Q4K => DotKind::Q4K,
            GgmlDType::Q6K => DotKind::Q6K,
            GgmlDType::BF16
            | GgmlDType::Q5_1
            | GgmlDType::Q8_1
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q5K
            | GgmlDType::Q8K => return None,
        })
    }

    /// (bytes per block, values per block).
    fn block(self) -> (usize, usize) {
        match self {
            DotKind::F32 => (4, 1),
            DotKind::F16 => (2, 1),
            DotKind::Q4_0 | DotKind::Q4_0Repacked => (18, 32),
            DotKind::Q4_1 => (20, 32),
            DotKind::Q5_0 => (22, 32),
            DotKind::Q8_0 => (34, 32),
            DotKind::Q4K | DotKind::Q4KRepacked => (144, 256),
            DotKind::Q6K => (210, 256),
        }
    }

    fn activations(self) -> ActKind {
        match self {
            DotKind::F32 => ActKind::F32,
            DotKind::F16 => ActKind::F16,
            DotKind::Q4_0 | DotKind::Q4_0Repacked | DotKind::Q5_0 | DotKind::Q8_0 => ActKind::Q8_0,
            DotKind::Q4_1 => ActKind::Q8_1,
            DotKind::Q4K | DotKind::Q4KRepacked | DotKind::Q6K => ActKind::Q8K,
        }
    }
}

/// How a Q5_0 matrix is kept in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q5_0Layout {
    /// The file's blocks: 22 bytes per 32 values.
    Kept,
    /// Each block as a Q8_0 block of the same values and scale: 34 bytes
    /// per 32 values, multiplied by the Q8_0 kernels. The default.
    Widened,
}

/// The environment variable that chooses the [`Q5_0Layout`]: `keep` or `widen`.
pub const Q5_0_ENV: &str = "KILN_Q5_0";

impl Q5_0Layout {
    pub fn parse(s: &str) -> Option<Q5_0Layout> {
        match s.trim().to_ascii_lowercase().as_str() {
            "keep" => Some(Q5_0Layout::Kept),
            "widen" => Some(Q5_0Layout::Widened),
            _ => None,
        }
    }

    /// The layout [`QMatrix::from_bytes`] uses: `KILN_Q5_0` if set to a
    /// layout, otherwise widened. Read once.
    pub fn selected() -> Q5_0Layout {
        static SELECTED: std::sync::OnceLock<Q5_0Layout> = std::sync::OnceLock::new();
        *SELECTED.get_or_init(|| {
            let raw = std::env::var(Q5_0_ENV).unwrap_or_default();
            if raw.trim().is_empty() {
                return Q5_0Layout::Widened;
            }
            Q5_0Layout::parse(&raw).unwrap_or_else(|| {
                tracing::warn!(
                    requested = raw,
                    "{Q5_0_ENV} must be keep or widen; widening"
                );
                Q5_0Layout::Widened
            })
        })
    }
}

/// A `rows × cols` weight matrix in a GGUF block format. Immutable once
/// built, so it is shared freely between threads.
pub struct QMatrix {
    /// The file's type.
    dtype: GgmlDType,
    /// The layout of `data` and the kernel that multiplies it: the file's,
    /// except for a widened Q5_0 matrix (Q8_0).
    kind: DotKind,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, {}x{})", self.dtype, self.rows, self.cols)
    }
}

impl QMatrix {
    /// From a 2-D tensor as read from GGUF (shape `[rows, cols]`, candle
    /// order), keeping its raw blocks.
    pub fn from_qtensor(t: &QTensor) -> Result<QMatrix> {
        let (rows, cols) = t.shape().dims2()?;
        let dtype = t.dtype();
        // Check the type before asking candle for the bytes.
        if DotKind::new(dtype, rows).is_none() {
            return Err(unsupported(dtype));
        }
        QMatrix::from_bytes(dtype, rows, cols, t.data()?.into_owned())
    }

    /// From raw GGUF blocks, `rows` rows of `cols` values each; a Q5_0
    /// matrix laid out as [`Q5_0Layout::selected`] says.
    pub fn from_bytes(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<QMatrix> {
        QMatrix::from_bytes_with(dtype, rows, cols, data, Q5_0Layout::selected())
    }

    /// [`QMatrix::from_bytes`] with a given Q5_0 layout.
    pub fn from_bytes_with(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        q5_0: Q5_0Layout,
    ) -> Result<QMatrix> {
        let kind = DotKind::new(dtype, rows).ok_or_else(|| unsupported(dtype))?;
        let (block_bytes, block_len) = kind.block();
        if cols == 0 || !cols.is_multiple_of(block_len) {
            return Err(EngineError::Metadata(format!(
                "a {dtype:?} matrix needs rows of a positive multiple of {block_len} values, not {cols}"
            )));
        }
        let row_bytes = cols / block_len * block_bytes;
        if rows.checked_mul(row_bytes) != Some(data.len()) {
            return Err(EngineError::Metadata(format!(
                "a {rows}x{cols} {dtype:?} matrix needs {} bytes, got {}",
                rows.saturating_mul(row_bytes),
                data.len()
            )));
        }
        if kind == DotKind::Q5_0 && q5_0 == Q5_0Layout::Widened {
            return Ok(QMatrix {
                dtype,
                kind: DotKind::Q8_0,
                rows,
                cols,
                row_bytes: cols / block_len * DotKind::Q8_0.block().0,
                data: scalar::widen_q5_0(&data),
            });
        }
        Ok(QMatrix {
            dtype,
            kind,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// `y[n × rows] = x[n × cols] · Wᵀ` on every thread of the rayon pool.
    pub fn matmul(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        self.matmul_threads(x, n, rayon::current_num_threads())
    }

    /// `y[n × rows] = x[n × cols] · Wᵀ` with the process-wide kernel variant
    /// ([`KernelVariant::selected`]), the rows split over up to `threads`
    /// threads.
    pub fn matmul_threads(&self, x: &[f32], n: usize, threads: usize) -> Result<Vec<f32>> {
        self.matmul_with(x, n, threads, KernelVariant::selected())
    }

    /// [`QMatrix::matmul`] with a given kernel variant (for tests and
    /// benchmarks); an error if this CPU cannot run it.
    pub fn matmul_with(
        &self,
        x: &[f32],
        n: usize,
        threads: usize,
        variant: KernelVariant,
    ) -> Result<Vec<f32>> {
        let mut ys = QMatrix::matmul_many_with(&[self], x, n, threads, variant)?;
        Ok(ys.pop().unwrap_or_default())
    }

    /// `y_k = x · W_kᵀ` for several matrices that take the same input (a
    /// layer's Q, K and V projections; its gate and up projections) as one
    /// parallel job on every thread of the rayon pool: one fork-join instead
    /// of one per matrix, and the input quantized once per activation
    /// format. Each result is exactly what [`QMatrix::matmul`] gives.
    pub fn matmul_many(ws: &[&QMatrix], x: &[f32], n: usize) -> Result<Vec<Vec<f32>>> {
        QMatrix::matmul_many_with(
            ws,
            x,
            n,
            rayon::current_num_threads(),
            KernelVariant::selected(),
        )
    }

    /// [`QMatrix::matmul_many`] with a given thread count and kernel
    /// variant: the row groups of all the matrices are cut into chunks
    /// ([`chunk_count`]) that up to `threads` tasks take in turn.
    pub fn matmul_many_with(
        ws: &[&QMatrix],
        x: &[f32],
        n: usize,
        threads: usize,
        variant: KernelVariant,
    ) -> Result<Vec<Vec<f32>>> {
        let chunks = chunk_count(ws, n, threads);
        QMatrix::matmul_chunked(ws, x, n, threads, chunks, variant)
    }

    /// [`QMatrix::matmul_many_with`] cut into `chunks` chunks (at most one
    /// per row group, at least one).
    fn matmul_chunked(
        ws: &[&QMatrix],
        x: &[f32],
        n: usize,
        threads: usize,
        chunks: usize,
        variant: KernelVariant,
    ) -> Result<Vec<Vec<f32>>> {
        for w in ws {
            if n.checked_mul(w.cols) != Some(x.len()) {
                return Err(EngineError::InvalidRequest(format!(
                    "matmul input has {} values, expected {n}x{}",
                    x.len(),
                    w.cols
                )));
            }
        }
        if !variant.is_available() {
            return Err(EngineError::InvalidRequest(format!(
                "the {} kernels need CPU features this machine lacks",
                variant.name()
            )));
        }
        let mut acts: Vec<(ActKind, Activations)> = Vec::with_capacity(1);
        for w in ws {
            let kind = w.kind.activations();
            if !acts.iter().any(|(k, _)| *k == kind) {
                acts.push((kind, Activations::quantize_with(kind, x, w.cols, variant)));
            }
        }
        let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; n * w.rows]).collect();
        if n == 0 {
            return Ok(ys);
        }
        // Rows go in groups of ROW_GROUP (the SIMD kernels' unit), numbered
        // across the matrices and cut into chunks: chunk c takes groups
        // total·c/chunks onwards. The tasks take chunks in turn until none is
        // left, so a thread the machine holds back (another process on its
        // core, a late wake-up) costs the others only the chunk it holds, not
        // a fixed half of the work. Every row's sums are the same whichever
        // task computes it.
        let groups: Vec<usize> = ws.iter().map(|w| w.rows.div_ceil(ROW_GROUP)).collect();
        let total: usize = groups.iter().sum();
        let chunks = chunks.clamp(1, total.max(1));
        let tasks = threads.clamp(1, chunks);
        let start = |c: usize| total * c / chunks;
        let mut work: Vec<Vec<Piece<'_>>> = (0..chunks).map(|_| Vec::new()).collect();
        let mut next_group = 0;
        for ((w, y), &g) in ws.iter().zip(&mut ys).zip(&groups) {
            let offset = next_group;
            next_group += g;
            let Some((_, a)) = acts.iter().find(|(k, _)| *k == w.kind.activations()) else {
                continue;
            };
            if w.rows == 0 {
                continue;
            }
            // This matrix's row ranges per chunk (empty ones skipped).
            let ranges: Vec<(usize, usize, usize)> = (0..chunks)
                .filter_map(|c| {
                    let lo = start(c).clamp(offset, offset + g) - offset;
                    let hi = start(c + 1).clamp(offset, offset + g) - offset;
                    (lo < hi).then(|| (c, lo * ROW_GROUP, (hi * ROW_GROUP).min(w.rows)))
                })
                .collect();
            let mut outs: Vec<Vec<&mut [f32]>> =
                ranges.iter().map(|_| Vec::with_capacity(n)).collect();
            for row_out in y.chunks_exact_mut(w.rows) {
                let mut rest = row_out;
                for (share, &(_, lo, hi)) in outs.iter_mut().zip(&ranges) {
                    let (mine, tail) = rest.split_at_mut(hi - lo);
                    share.push(mine);
                    rest = tail;
                }
            }
            for ((c, lo, hi), outs) in ranges.into_iter().zip(outs) {
                work[c].push(Piece {
                    w,
                    rows: lo..hi,
                    acts: a,
                    outs,
                });
            }
        }
        let run = |pieces: &mut Vec<Piece<'_>>| {
            for p in pieces {
                let data = &p.w.data[p.rows.start * p.w.row_bytes..p.rows.end * p.w.row_bytes];
                compute_rows(variant, p.w.kind, data, p.w.row_bytes, p.acts, &mut p.outs);
            }
        };
        if tasks == 1 {
            for pieces in &mut work {
                run(pieces);
            }
        } else {
            let work: Vec<Mutex<Vec<Piece<'_>>>> = work.into_iter().map(Mutex::new).collect();
            let next = AtomicUsize::new(0);
            let take_turns = || {
                while let Some(chunk) = work.get(next.fetch_add(1, Ordering::Relaxed)) {
                    // Each chunk is taken once, so its lock is never
                    // contended (and a poisoned one is already unwinding).
                    if let Ok(mut pieces) = chunk.lock() {
                        run(&mut pieces);
                    }
                }
            };
            rayon::scope(|s| {
                for _ in 1..tasks {
                    s.spawn(|_| take_turns());
                }
                take_turns();
            });
        }
        Ok(ys)
    }

    /// Dequantizes row `r` into `out` (`cols` values): an embedding lookup,
    /// bit-identical to ggml's `get_rows`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows || out.len() != self.cols {
            return Err(EngineError::InvalidRequest(format!(
                "row {r} of a {}x{} matrix does not exist or does not fit {} values",
                self.rows,
                self.cols,
                out.len()
            )));
        }
        dequant::dequantize_row(
            self.kind,
            &self.data[r * self.row_bytes..(r + 1) * self.row_bytes],
            out,
        );
        Ok(())
    }
}

fn unsupported(dtype: GgmlDType) -> EngineError {
    EngineError::Metadata(format!(
        "weight type {dtype:?} is not supported by Kiln's CPU kernels (supported: {})",
        SUPPORTED_TYPES.map(|t| format!("{t:?}")).join(", ")
    ))
}

/// Rows per unit of work: the SIMD kernels' row tile.
const ROW_GROUP: usize = 8;

/// The chunks a product is cut into, per thread, at most: enough that a
/// thread held back by the machine leaves little for the others to wait on.
const CHUNKS_PER_TASK: usize = 8;

/// Weight bytes (times inputs) below which a product is not cut further: a
/// chunk's turn costs an atomic add and a lock.
const MIN_CHUNK_BYTES: usize = 16 << 10;

/// Rows below which a product is not cut further: the tiles of a batched
/// product stream a chunk's rows past each group of inputs, and a short
/// chunk would restart that stream too often.
const MIN_CHUNK_ROWS: usize = 64;

/// The chunks a product of `ws` with `n` inputs is cut into on `threads`
/// threads: about [`MIN_CHUNK_BYTES`] of work and [`MIN_CHUNK_ROWS`] rows
/// each at least, [`CHUNKS_PER_TASK`] per thread at most, one per thread at
/// least when the work is worth sharing, and never more than the row
/// groups. One thread takes the product whole.
fn chunk_count(ws: &[&QMatrix], n: usize, threads: usize) -> usize {
    if threads <= 1 {
        return 1;
    }
    let rows: usize = ws.iter().map(|w| w.rows).sum();
    let groups: usize = ws.iter().map(|w| w.rows.div_ceil(ROW_GROUP)).sum();
    let work_bytes = ws.iter().map(|w| w.rows * w.row_bytes).sum::<usize>() * n;
    let by_work = work_bytes / MIN_CHUNK_BYTES;
    by_work
        .min(rows / MIN_CHUNK_ROWS)
        .min(threads * CHUNKS_PER_TASK)
        .max(by_work.min(threads))
        .clamp(1, groups.max(1))
}

/// One chunk's share of one matrix: rows `rows` against every input,
/// `outs[i]` receiving those rows' results for input `i`.
struct Piece<'a> {
    w: &'a QMatrix,
    rows: std::ops::Range<usize>,
    acts: &'a Activations,
    outs: Vec<&'a mut [f32]>,
}

/// One share of the work: the weight rows `w` (whole rows) against every
/// input, `outs[i][r]` receiving row `r`'s result for input `i`.
fn compute_rows(
    variant: KernelVariant,
    kind: DotKind,
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    outs: &mut [&mut [f32]],
) {
    match variant {
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Avx2 if variant.is_available() => {
            // SAFETY: `is_available` checked at run time that this CPU has
            // AVX2, FMA and F16C, the features `avx2::compute_rows` enables.
            unsafe { avx2::compute_rows(kind, w, row_bytes, acts, outs) }
        }
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Avx512 if variant.is_available() => {
            // SAFETY: `is_available` checked at run time that this CPU has
            // AVX-512 F/BW/VL/VNNI besides AVX2, FMA and F16C, the features
            // `avx512::compute_rows` enables.
            unsafe { avx512::compute_rows(kind, w, row_bytes, acts, outs) }
        }
        _ => scalar_rows(kind, w, row_bytes, acts, outs),
    }
}

fn scalar_rows(
    kind: DotKind,
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    outs: &mut [&mut [f32]],
) {
    for (r, row) in w.chunks_exact(row_bytes).enumerate() {
        for (i, out) in outs.iter_mut().enumerate() {
            out[r] = scalar_dot(kind, row, acts, i);
        }
    }
}

/// One output value with the portable kernels.
fn scalar_dot(kind: DotKind, row: &[u8], acts: &Activations, i: usize) -> f32 {
    match kind {
        DotKind::F32 => scalar::dot_f32(row, acts.float_row(i)),
        DotKind::F16 => scalar::dot_f16(row, acts.float_row(i)),
        DotKind::Q4_0 => scalar::dot_q4_0(row, acts.q8_row(i)),
        DotKind::Q4_0Repacked => scalar::dot_q4_0_repacked(row, acts.q8_row(i)),
        DotKind::Q4_1 => scalar::dot_q4_1(row, acts.q8_row(i)),
        DotKind::Q5_0 => scalar::dot_q5_0(row, acts.q8_row(i)),
        DotKind::Q8_0 => scalar::dot_q8_0(row, acts.q8_row(i)),
        DotKind::Q4K => scalar::dot_q4_k(row, acts.q8k_row(i)),
        DotKind::Q4KRepacked => scalar::dot_q4_k_repacked(row, acts.q8k_row(i)),
        DotKind::Q6K => scalar::dot_q6_k(row, acts.q8k_row(i)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several matrices in one job give each one's own product, whatever
    /// the thread and chunk counts (chunks cross matrix boundaries).
    #[test]
    fn many_matrices_in_one_job_give_their_own_products() -> Result<()> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ms = [
            random_matrix(&mut rng, GgmlDType::Q4_1, 21, 64)?,
            random_matrix(&mut rng, GgmlDType::Q8_0, 8, 64)?,
            random_matrix(&mut rng, GgmlDType::Q4_0, 16, 64)?,
            random_matrix(&mut rng, GgmlDType::F32, 3, 64)?,
        ];
        let refs: Vec<&QMatrix> = ms.iter().collect();
        for n in [1, 3, 6] {
            let x: Vec<f32> = (0..n * 64).map(|_| rng.random_range(-1f32..1.0)).collect();
            for variant in KernelVariant::available() {
                for (threads, chunks) in [1, 2, 3, 16]
                    .into_iter()
                    .flat_map(|t| [1, 2, 3, 5, 64].map(|c| (t, c)))
                {
                    let ys = QMatrix::matmul_chunked(&refs, &x, n, threads, chunks, variant)?;
                    for (m, y) in ms.iter().zip(&ys) {
                        let alone = m.matmul_with(&x, n, 1, KernelVariant::Scalar)?;
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(y),
                            bits(&alone),
                            "{m:?} n={n} threads={threads} chunks={chunks}"
                        );
                    }
                }
            }
        }
        assert!(QMatrix::matmul_many(&refs, &[0.0; 63], 1).is_err());
        assert!(QMatrix::matmul_many(&[], &[0.0; 64], 1)?.is_empty());
        // A matrix without rows (a degenerate file) gives empty products.
        let empty = QMatrix::from_bytes(GgmlDType::Q8_0, 0, 64, Vec::new())?;
        let ys = QMatrix::matmul_many(&[&empty, &ms[1]], &[0.5; 128], 2)?;
        assert!(ys[0].is_empty() && ys[1].len() == 16);
        Ok(())
    }

    /// Small products stay whole, large ones are cut for every thread and
    /// a few more chunks each, never into chunks of a few rows.
    #[test]
    fn products_are_cut_by_their_size() -> Result<()> {
        let matrix =
            |rows, cols| QMatrix::from_bytes(GgmlDType::F32, rows, cols, vec![0; rows * cols * 4]);
        let (tiny, output) = (matrix(8, 64)?, matrix(4096, 640)?);
        assert_eq!(chunk_count(&[&tiny], 1, 2), 1);
        assert_eq!(chunk_count(&[&tiny], 512, 2), 1, "8 rows are one chunk");
        assert_eq!(chunk_count(&[&output], 1, 1), 1);
        assert_eq!(chunk_count(&[&output], 1, 2), 2 * CHUNKS_PER_TASK);
        assert_eq!(chunk_count(&[&output], 512, 2), 2 * CHUNKS_PER_TASK);
        // Enough work for two threads but not for more chunks.
        let small = matrix(64, 64)?;
        assert_eq!(chunk_count(&[&small], 1, 2), 1);
        assert_eq!(chunk_count(&[&small], 2, 2), 2);
        assert_eq!(chunk_count(&[&small, &small], 1, 2), 2);
        Ok(())
    }

    /// Random blocks of `dtype` with finite, moderate f16 scales.
    fn random_matrix(
        rng: &mut rand::rngs::StdRng,
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
    ) -> Result<QMatrix> {
        let data = random_blocks(rng, dtype, rows, cols)?;
        QMatrix::from_bytes(dtype, rows, cols, data)
    }

    fn random_blocks(
        rng: &mut rand::rngs::StdRng,
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<u8>> {
        use rand::Rng;
        let kind = DotKind::new(dtype, rows).ok_or_else(|| unsupported(dtype))?;
        let (block_bytes, block_len) = kind.block();
        let mut data = vec![0u8; rows * cols / block_len * block_bytes];
        rng.fill(&mut data[..]);
        let f16_at = |b: &mut [u8], at: usize, rng: &mut rand::rngs::StdRng| {
            let v = half::f16::from_f32(rng.random_range(-0.05f32..0.05));
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        };
        for b in data.chunks_exact_mut(block_bytes) {
            match dtype {
                GgmlDType::F32 => b.copy_from_slice(&rng.random_range(-1f32..1.0).to_le_bytes()),
                GgmlDType::F16 => f16_at(b, 0, rng),
                GgmlDType::Q4_1 | GgmlDType::Q4K => {
                    f16_at(b, 0, rng);
                    f16_at(b, 2, rng);
                }
                GgmlDType::Q6K => f16_at(b, 208, rng),
                _ => f16_at(b, 0, rng),
            }
        }
        Ok(data)
    }

    /// Every variant this CPU runs gives the portable kernels' bits, for
    /// every type, at row counts around the SIMD tiles (8 rows) and batch
    /// sizes around the input tiles (and past a chunk of the AVX2 tiles), on
    /// one and two threads; a widened Q5_0 matrix gives the bits of the
    /// portable Q5_0 kernel on the file's blocks.
    #[test]
    fn every_variant_matches_the_scalar_kernels() -> Result<()> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(20261129);
        for dtype in SUPPORTED_TYPES {
            let block_len = DotKind::new(dtype, 1)
                .ok_or_else(|| unsupported(dtype))?
                .block()
                .1;
            for rows in [1, 7, 8, 13, 24] {
                let cols = block_len.max(32) * 3;
                let data = random_blocks(&mut rng, dtype, rows, cols)?;
                let build =
                    |layout| QMatrix::from_bytes_with(dtype, rows, cols, data.clone(), layout);
                let kept = build(Q5_0Layout::Kept)?;
                let widened = build(Q5_0Layout::Widened)?;
                assert_eq!(kept.kind == widened.kind, dtype != GgmlDType::Q5_0);
                for n in [1, 2, 3, 4, 5, 6, 7, 9, 17, 67] {
                    let x: Vec<f32> = (0..n * cols)
                        .map(|_| rng.random_range(-2f32..2.0))
                        .collect();
                    let want = kept.matmul_with(&x, n, 1, KernelVariant::Scalar)?;
                    for (m, variant) in [&kept, &widened]
                        .into_iter()
                        .flat_map(|m| KernelVariant::available().into_iter().map(move |v| (m, v)))
                    {
                        for threads in [1, 2] {
                            let got = m.matmul_with(&x, n, threads, variant)?;
                            let bits =
                                |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&got),
                                bits(&want),
                                "{dtype:?} as {:?} {rows}x{cols} n={n} {} threads={threads}",
                                m.kind,
                                variant.name()
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A widened Q5_0 matrix holds the file's values: its rows dequantize
    /// (embedding lookups) to the same bits, and it takes 34 bytes a block.
    #[test]
    fn widened_q5_0_keeps_the_values() -> Result<()> {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (rows, cols) = (9, 128);
        let data = random_blocks(&mut rng, GgmlDType::Q5_0, rows, cols)?;
        let kept =
            QMatrix::from_bytes_with(GgmlDType::Q5_0, rows, cols, data.clone(), Q5_0Layout::Kept)?;
        let widened =
            QMatrix::from_bytes_with(GgmlDType::Q5_0, rows, cols, data, Q5_0Layout::Widened)?;
        assert_eq!(
            (widened.kind, widened.dtype()),
            (DotKind::Q8_0, GgmlDType::Q5_0)
        );
        assert_eq!(widened.data.len(), rows * cols / 32 * 34);
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        for r in 0..rows {
            kept.dequantize_row(r, &mut a)?;
            widened.dequantize_row(r, &mut b)?;
            assert_eq!(
                a.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
                "row {r}"
            );
        }
        // Every five-bit value, both ends included, survives the widening.
        let mut block = [0u8; 22];
        block[1] = 0x3c; // d = 1.0
        block[2..6].copy_from_slice(&0xffff_0000u32.to_le_bytes());
        for (j, b) in block[6..].iter_mut().enumerate() {
            *b = (j as u8) | (15 - j as u8) << 4;
        }
        let m =
            QMatrix::from_bytes_with(GgmlDType::Q5_0, 1, 32, block.to_vec(), Q5_0Layout::Widened)?;
        m.dequantize_row(0, &mut a[..32])?;
        let want: Vec<f32> = (0..16)
            .map(|j| j as f32 - 16.0)
            .chain((0..16).map(|j| 15.0 - j as f32))
            .collect();
        assert_eq!(&a[..32], &want[..]);
        assert_eq!(Q5_0Layout::parse(" Keep "), Some(Q5_0Layout::Kept));
        assert_eq!(Q5_0Layout::parse("widen"), Some(Q5_0Layout::Widened));
        assert_eq!(Q5_0Layout::parse("wide"), None);
        Ok(())
    }

    #[test]
    fn unsupported_types_and_bad_sizes_are_errors() {
        let e = QMatrix::from_bytes(GgmlDType::Q2K, 1, 256, vec![0; 84]);
        assert!(
            matches!(e, Err(EngineError::Metadata(m)) if m.contains("Q2K") && m.contains("Q4K"))
        );
        assert!(QMatrix::from_bytes(GgmlDType::Q8_0, 2, 32, vec![0; 34]).is_err());
        assert!(QMatrix::from_bytes(GgmlDType::Q8_0, 1, 33, vec![0; 34]).is_err());
        assert!(QMatrix::from_bytes(GgmlDType::Q8_0, 1, 0, vec![]).is_err());
        assert!(QMatrix::from_bytes(GgmlDType::Q8_0, usize::MAX, 32, vec![0; 34]).is_err());
        let Ok(m) = QMatrix::from_bytes(GgmlDType::Q8_0, 1, 32, vec![0; 34]) else {
            panic!("a valid matrix")
        };
        assert!(m.matmul(&[0.0; 31], 1).is_err());
        assert!(m.matmul_threads(&[0.0; 32], 2, 1).is_err());
        assert!(m.dequantize_row(1, &mut [0.0; 32]).is_err());
        assert!(m.dequantize_row(0, &mut [0.0; 31]).is_err());
        assert_eq!(m.matmul_threads(&[], 0, 2).ok(), Some(vec![]));
    }
}
