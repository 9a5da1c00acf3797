//! Kiln's scalar dequantization (`QMatrix::dequantize_row`, what an
//! embedding lookup uses) against the `gguf` Python package's
//! `gguf.quants.dequantize` and, where the fixture has it, ggml's own
//! `dequantize_row_*`: tests/fixtures/kernels/dequant.json, written by
//! scripts/make_dequant_fixtures.py from random blocks of every weight type
//! the kernels support. Both references must be matched bit for bit.

use anyhow::{ensure, Result};
use kiln_engine::kernels::{QMatrix, SUPPORTED_TYPES};
use serde::Deserialize;

mod common;

#[derive(Deserialize)]
struct Fixture {
    generator: serde_json::Value,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    #[serde(rename = "type")]
    dtype: String,
    values: usize,
    blocks_hex: String,
    gguf_f32_hex: String,
    ggml_f32_hex: Option<String>,
}

fn f32_bits(h: &str) -> Result<Vec<u32>> {
    Ok(hex::decode(h)?
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[test]
fn dequantization_matches_the_gguf_package_and_ggml() -> Result<()> {
    let fixture: Fixture = serde_json::from_str(&common::kernel_fixture("dequant.json")?)?;
    ensure!(
        fixture.generator.get("gguf").is_some(),
        "the fixture names the gguf package version it was made with"
    );
    let mut covered = Vec::new();
    let mut ggml_checked = 0;
    for case in &fixture.cases {
        let t = common::ggml_dtype(&case.dtype)?;
        // One row; the row count only changes which kernel a matmul uses.
        let m = QMatrix::from_bytes(t, 1, case.values, hex::decode(&case.blocks_hex)?)?;
        let mut out = vec![0f32; case.values];
        m.dequantize_row(0, &mut out)?;
        let ours: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
        let gguf = f32_bits(&case.gguf_f32_hex)?;
        ensure!(
            gguf.len() == case.values,
            "{}: fixture has {} values",
            case.dtype,
            gguf.len()
        );
        if let Some(i) = (0..case.values).find(|&i| ours[i] != gguf[i]) {
            anyhow::bail!(
                "{} value {i}: ours {} vs gguf {}",
                case.dtype,
                out[i],
                f32::from_bits(gguf[i])
            );
        }
        if let Some(h) = &case.ggml_f32_hex {
            ensure!(
                f32_bits(h)? == ours,
                "{}: not ggml's dequantize_row bits",
                case.dtype
            );
            ggml_checked += 1;
        }
        covered.push(t);
    }
    for t in SUPPORTED_TYPES {
        ensure!(covered.contains(&t), "no dequantization case for {t:?}");
    }
    ensure!(
        ggml_checked >= 6,
        "ggml's dequantize_row checked for only {ggml_checked} types"
    );
    Ok(())
}
