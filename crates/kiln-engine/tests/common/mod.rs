//! Helpers shared by kiln-engine's integration tests (`mod common;`): the
//! tiny random-weight GGUF writer, and typed access to the llama.cpp golden
//! continuations in tests/fixtures/generation/ (written by
//! scripts/make_generation_fixtures.py).
//!
//! Each test binary uses only some of them.
#![allow(dead_code)]

pub mod tiny_gguf;

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use tiny_gguf::{write_tiny_model, TinyArch};

/// One fixture file: a model and its greedy continuations.
#[derive(Debug, Deserialize)]
pub struct GenerationFixture {
    pub model: FixtureModel,
    pub settings: FixtureSettings,
    /// Smallest top-1/top-2 logit gap over all steps.
    pub min_gap: f32,
    pub prompts: Vec<FixturePrompt>,
}

#[derive(Debug, Deserialize)]
pub struct FixtureModel {
    /// For real models: the path under `$KILN_TEST_HOME`, e.g. `models/smollm2-135m/model.gguf`.
    pub file: Option<String>,
    pub sha256: String,
    pub architecture: String,
    pub n_vocab: usize,
}

#[derive(Debug, Deserialize)]
pub struct FixtureSettings {
    pub add_bos: bool,
    pub parse_special: bool,
    pub steps: usize,
    pub kv_cache_type_k: String,
    pub flash_attn_resolved: String,
}

#[derive(Debug, Deserialize)]
pub struct FixturePrompt {
    pub name: String,
    /// `None` for prompts given directly as token ids (tiny models).
    pub text: Option<String>,
    pub prompt_tokens: Vec<u32>,
    pub generated_tokens: Vec<u32>,
    /// llama.cpp's default run: the prompt in one llama_decode call.
    pub steps: Vec<FixtureStep>,
    /// The same run with the prompt fed one token per llama_decode call, so
    /// llama.cpp uses its single-row kernels at every position.
    pub token_by_token_steps: Vec<FixtureStep>,
}

#[derive(Debug, Deserialize)]
pub struct FixtureStep {
    /// llama.cpp's greedy choice; the next step's input.
    pub token: u32,
    /// llama.cpp's 10 largest (id, logit), largest first.
    pub top: Vec<(u32, f32)>,
    /// top[0] - top[1]: below the comparison tolerance either token is right.
    pub gap: f32,
    /// Tiny models only: the same step from a float64 reference forward pass.
    #[serde(default)]
    pub f64_top: Option<Vec<(u32, f32)>>,
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The text of tests/fixtures/kernels/`name` (written by
/// scripts/make_dequant_fixtures.py).
pub fn kernel_fixture(name: &str) -> anyhow::Result<String> {
    let path = repo_root().join("tests/fixtures/kernels").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// A ggml type as the kernel fixtures name it.
pub fn ggml_dtype(name: &str) -> anyhow::Result<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType;
    Ok(match name {
        "F32" => GgmlDType::F32,
        "F16" => GgmlDType::F16,
        "Q4_0" => GgmlDType::Q4_0,
        "Q4_1" => GgmlDType::Q4_1,
        "Q5_0" => GgmlDType::Q5_0,
        "Q8_0" => GgmlDType::Q8_0,
        "Q4_K" => GgmlDType::Q4K,
        "Q6_K" => GgmlDType::Q6K,
        other => anyhow::bail!("unknown type {other}"),
    })
}

/// `$KILN_TEST_HOME`, default `$HOME/.cache/kiln/home`.
pub fn test_home() -> PathBuf {
    std::env::var_os("KILN_TEST_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/kiln/home")
        })
}

/// Reads tests/fixtures/generation/`name`.json (e.g. `smollm2-135m`, `tiny-qwen3`).
pub fn generation_fixture(name: &str) -> anyhow::Result<GenerationFixture> {
    let path = repo_root().join(format!("tests/fixtures/generation/{name}.json"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Writes the tiny model for `arch` into `dir` and checks it is byte-identical
/// to the file the fixture was made from (`tiny-qwen2` / `tiny-qwen3`).
pub fn write_checked_tiny_model(arch: TinyArch, dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("tiny-{}.gguf", arch.name()));
    write_tiny_model(arch, &path)?;
    let fixture = generation_fixture(&format!("tiny-{}", arch.name()))?;
    let sha = sha256_file(&path)?;
    ensure!(
        sha == fixture.model.sha256,
        "tiny {} GGUF differs from the one the fixture was made from ({sha} != {}); \
         if tiny_gguf.rs changed on purpose, rerun scripts/make_generation_fixtures.py",
        arch.name(),
        fixture.model.sha256
    );
    Ok(path)
}
