//! Kiln's CPU kernels for matrix products with GGUF-quantized weights.
//!
//! A [`QMatrix`] keeps a weight matrix in its file format (blocks of
//! quantized values with f16 scales) and multiplies it with f32 activations
//! the way ggml's CPU backend does: the activations are first quantized to the
//! weight type's 8-bit partner format ([`quantize`]), each block's dot product
//! is an exact integer sum, and the integer sums are scaled and added in f32
//! ([`dot`]). Matching ggml's activation quantization (rounding mode, scale
//! formula, the Q8_1 block sum) is what makes our logits track llama.cpp's.
//!
//! Invariants: a row's result depends only on that weight row and that input
//! row — not on the batch size or the thread count (batch invariance); the
//! raw block bytes were size-checked when the matrix was built, so the inner
//! loops index without further checks failing.

pub mod dot;
pub mod lanes;
pub mod quantize;

use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

use crate::error::{EngineError, Result};
use dot::Activations;

/// Bytes per block and values per block of each supported type.
pub fn block_layout(dtype: GgmlDType) -> Option<(usize, usize)> {
    match dtype {
        GgmlDType::F32 => Some((4, 1)),
        GgmlDType::F16 => Some((2, 1)),
        GgmlDType::Q4_0 => Some((18, 32)),
        GgmlDType::Q4_1 => Some((20, 32)),
        GgmlDType::Q5_0 => Some((22, 32)),
        GgmlDType::Q8_0 => Some((34, 32)),
        GgmlDType::Q4K => Some((144, 256)),
        GgmlDType::Q6K => Some((210, 256)),
        GgmlDType::BF16
        | GgmlDType::Q5_1
        | GgmlDType::Q8_1
        | GgmlDType::Q2K
        | GgmlDType::Q3K
        | GgmlDType::Q5K
        | GgmlDType::Q8K => None,
    }
}

/// A `rows × cols` weight matrix in a GGUF block format.
pub struct QMatrix {
    dtype: GgmlDType,
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
    /// Takes a 2-D tensor as read from GGUF (`[rows, cols]`).
    pub fn from_qtensor(t: &QTensor) -> Result<QMatrix> {
        let (rows, cols) = t.shape().dims2()?;
        let data = t.data()?.into_owned();
        QMatrix::from_bytes(t.dtype(), rows, cols, data)
    }

    pub fn from_bytes(dtype: GgmlDType, rows: usize, cols: usize, data: Vec<u8>) -> Result<QMatrix> {
        let (block_bytes, block_len) = block_layout(dtype).ok_or_else(|| {
            EngineError::Metadata(format!("weight type {dtype:?} is not supported by Kiln's kernels"))
        })?;
        if cols % block_len != 0 {
            return Err(EngineError::Metadata(format!(
                "a {dtype:?} matrix needs rows of a multiple of {block_len} values, not {cols}"
            )));
        }
        let row_bytes = cols / block_len * block_bytes;
        if data.len() != rows * row_bytes {
            return Err(EngineError::Metadata(format!(
                "a {rows}x{cols} {dtype:?} matrix needs {} bytes, got {}",
                rows * row_bytes,
                data.len()
            )));
        }
        Ok(QMatrix {
            dtype,
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

    fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// `y[n × rows] = x[n × cols] · Wᵀ`, spread over the rayon pool.
    pub fn matmul(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        if x.len() != n * self.cols {
            return Err(EngineError::InvalidRequest(format!(
                "matmul input has {} values, expected {n}x{}",
                x.len(),
                self.cols
            )));
        }
        let acts: Vec<Activations> = x
            .chunks_exact(self.cols)
            .map(|row| Activations::quantize(self.dtype, row))
            .collect();
        // Work in units of rows; each unit computes all n inputs for its rows.
        const ROWS_PER_TASK: usize = 16;
        let mut by_row = vec![0f32; self.rows * n];
        by_row
            .par_chunks_mut(ROWS_PER_TASK * n)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * ROWS_PER_TASK;
                for (k, per_input) in out.chunks_exact_mut(n).enumerate() {
                    let w = self.row(first + k);
                    for (o, a) in per_input.iter_mut().zip(&acts) {
                        *o = dot::dot_row(self.dtype, w, a);
                    }
                }
            });
        if n == 1 {
            return Ok(by_row);
        }
        let mut y = vec![0f32; n * self.rows];
        for r in 0..self.rows {
            for i in 0..n {
                y[i * self.rows + r] = by_row[r * n + i];
            }
        }
        Ok(y)
    }

    /// Dequantizes row `r` into `out` (`cols` values): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows || out.len() != self.cols {
            return Err(EngineError::InvalidRequest(format!(
                "row {r} of a {}x{} matrix does not exist or does not fit",
                self.rows, self.cols
            )));
        }
        dot::dequantize_row(self.dtype, self.row(r), out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn check_type(dtype: GgmlDType, tol: f32) {
        let (rows, cols) = (40, 512);
        let w = random(rows * cols, 1);
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).map_err(|e| e.to_string());
        let Ok(t) = t else { panic!("tensor") };
        let Ok(q) = QTensor::quantize(&t, dtype) else { panic!("quantize") };
        let Ok(m) = QMatrix::from_qtensor(&q) else { panic!("matrix") };
        let Ok(deq) = q.dequantize(&Device::Cpu).and_then(|d| d.to_vec2::<f32>()) else {
            panic!("dequantize")
        };
        // Dequantized rows equal candle's dequantization.
        let mut row = vec![0f32; cols];
        for (r, expected) in deq.iter().enumerate() {
            assert!(m.dequantize_row(r, &mut row).is_ok());
            assert_eq!(&row, expected, "{dtype:?} row {r}");
        }
        // matmul ≈ dequantized weights · x, and batch invariant.
        let n = 3;
        let x = random(n * cols, 2);
        let Ok(y) = m.matmul(&x, n) else { panic!("matmul") };
        for i in 0..n {
            let Ok(single) = m.matmul(&x[i * cols..(i + 1) * cols], 1) else { panic!("matmul") };
            assert_eq!(&single[..], &y[i * rows..(i + 1) * rows], "{dtype:?}: batch invariance");
            for r in 0..rows {
                let exact: f32 = deq[r].iter().zip(&x[i * cols..]).map(|(a, b)| a * b).sum();
                let got = y[i * rows + r];
                assert!((got - exact).abs() <= tol * (1.0 + exact.abs()), "{dtype:?} [{i},{r}]: {got} vs {exact}");
            }
        }
    }

    #[test]
    fn every_type_matches_the_float_reference() {
        check_type(GgmlDType::F32, 1e-5);
        check_type(GgmlDType::F16, 2e-2);
        check_type(GgmlDType::Q8_0, 5e-2);
        check_type(GgmlDType::Q4_0, 5e-2);
        check_type(GgmlDType::Q4_1, 5e-2);
        check_type(GgmlDType::Q5_0, 5e-2);
        check_type(GgmlDType::Q4K, 5e-2);
        check_type(GgmlDType::Q6K, 5e-2);
    }

    #[test]
    fn unsupported_type_and_bad_sizes_are_errors() {
        assert!(QMatrix::from_bytes(GgmlDType::Q2K, 1, 256, vec![0; 84]).is_err());
        assert!(QMatrix::from_bytes(GgmlDType::Q8_0, 2, 32, vec![0; 34]).is_err());
        assert!(QMatrix::from_bytes(GgmlDType::Q8_0, 1, 33, vec![0; 34]).is_err());
        let Ok(m) = QMatrix::from_bytes(GgmlDType::Q8_0, 1, 32, vec![0; 34]) else { panic!() };
        assert!(m.matmul(&[0.0; 31], 1).is_err());
        assert!(m.dequantize_row(1, &mut [0.0; 32]).is_err());
    }
}
