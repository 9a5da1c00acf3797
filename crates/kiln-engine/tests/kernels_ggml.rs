//! Kiln's quantized matmul against ggml itself: tests/fixtures/kernels/
//! ggml_matmul.json holds `ggml_mul_mat` results computed by the CPU backend
//! of the llama.cpp build in llama-cpp-python (scripts/make_dequant_fixtures.py).
//!
//! Every kernel variant this CPU runs must reproduce ggml's batch-of-one
//! results bit for bit, and its results for larger batches wherever ggml's
//! own arithmetic does not change with the batch (Q4_0, Q4_1, Q5_0, Q8_0;
//! the rows of a Q4_K batch that ggml's repacked kernel runs as a GEMV; Q6_K
//! below 8 rows). Elsewhere ggml switches kernels with the batch (tinyBLAS
//! for F16/F32, its Q4_K GEMM, the tiled K-quant kernel) while Kiln stays on
//! the batch-of-one arithmetic: those outputs must agree to within a few
//! float rounding steps.

use anyhow::{ensure, Result};
use kiln_engine::kernels::{KernelVariant, QMatrix};
use serde::Deserialize;

mod common;

#[derive(Deserialize)]
struct Fixture {
    matmul: Vec<MatmulCase>,
}

#[derive(Deserialize)]
struct MatmulCase {
    #[serde(rename = "type")]
    dtype: String,
    rows: usize,
    cols: usize,
    n: usize,
    weights_hex: String,
    x_f32_hex: String,
    y_f32_hex: String,
}

fn fixture() -> Result<Fixture> {
    Ok(serde_json::from_str(&common::kernel_fixture(
        "ggml_matmul.json",
    )?)?)
}

fn floats(h: &str) -> Result<Vec<f32>> {
    Ok(hex::decode(h)?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Whether ggml computes input row `i` of this case with its batch-of-one
/// arithmetic.
fn ggml_uses_decode_path(case: &MatmulCase, i: usize) -> bool {
    match case.dtype.as_str() {
        _ if case.n == 1 => true,
        "Q4_0" | "Q4_1" | "Q5_0" | "Q8_0" => true,
        // Repacked Q4_K: GEMM for the first n − n%4 rows, GEMV for the rest;
        // not repacked: vec_dot below 8 rows, the tiled kernel from 8.
        "Q4_K" if case.rows.is_multiple_of(8) => i >= case.n - case.n % 4,
        "Q4_K" | "Q6_K" => case.n < 8,
        _ => false,
    }
}

#[test]
fn matmul_matches_ggml_cpu_backend() -> Result<()> {
    let fixture = fixture()?;
    ensure!(!fixture.matmul.is_empty());
    let mut failures = Vec::new();
    for variant in KernelVariant::available() {
        let mut exact = 0;
        for case in &fixture.matmul {
            let m = QMatrix::from_bytes(
                common::ggml_dtype(&case.dtype)?,
                case.rows,
                case.cols,
                hex::decode(&case.weights_hex)?,
            )?;
            let x = floats(&case.x_f32_hex)?;
            let want = floats(&case.y_f32_hex)?;
            let got = m.matmul_with(&x, case.n, 2, variant)?;
            ensure!(got.len() == want.len());
            for i in 0..case.n {
                let (g, w) = (
                    &got[i * case.rows..(i + 1) * case.rows],
                    &want[i * case.rows..(i + 1) * case.rows],
                );
                let label = format!(
                    "{} {}x{} n={} input {i} ({})",
                    case.dtype,
                    case.rows,
                    case.cols,
                    case.n,
                    variant.name()
                );
                if ggml_uses_decode_path(case, i) {
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    if bits(g) != bits(w) {
                        failures.push(format!(
                            "{label}: not bit-identical to ggml\n ours {g:?}\n ggml {w:?}"
                        ));
                    }
                    exact += 1;
                } else {
                    // A different summation order: a few roundings of the
                    // partial sums apart.
                    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                    if let Some((a, b)) = g
                        .iter()
                        .zip(w)
                        .find(|(a, b)| (*a - *b).abs() > 2e-5 * scale)
                    {
                        failures.push(format!("{label}: {a} vs ggml {b}"));
                    }
                }
            }
        }
        ensure!(exact > 20, "too few bit-exact comparisons ({exact})");
    }
    ensure!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
