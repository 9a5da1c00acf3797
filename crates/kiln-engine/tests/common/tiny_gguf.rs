//! Tiny Qwen2 / Qwen3 GGUF files with seeded random weights, for checking
//! Kiln's forward pass against llama.cpp without real Qwen weights.
//!
//! `write_tiny_model` is deterministic: the same arch always gives the same
//! bytes (the fixtures in tests/fixtures/generation/tiny-*.json record the
//! sha256 that scripts/make_generation_fixtures.py saw, which ran this very
//! code through `examples/write_tiny_gguf.rs`). Keep it that way: changing a
//! shape, a seed, a key or the draw order changes the file, and the fixtures
//! must then be regenerated.
//!
//! Invariants:
//! - Random numbers come from splitmix64 and only exact IEEE arithmetic (no
//!   libm `ln`/`cos`), so every platform draws the same f32 values.
//! - All tensors are stored as F32, so llama.cpp and Kiln read identical
//!   weights; the only reference-side rounding is llama.cpp's f16 KV cache.
//! - The vocabulary is the 256 GPT-2 byte tokens with id == byte value, then
//!   [`MERGES`] in order, then [`SPECIAL_TOKENS`]; `tokenizer.ggml.model` is
//!   `gpt2` with pre-tokenizer `qwen2`, as in real Qwen GGUFs.
//! - `output.weight` is untied and drawn with a large spread, so the top two
//!   logits are usually far apart and a greedy comparison means something.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::Context;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Which architecture to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    /// Qwen2: q/k/v projections carry biases; head_dim = hidden / heads.
    Qwen2,
    /// Qwen3: per-head RMS norms on q and k, no biases; head_dim (32) differs
    /// from hidden / heads (16), so `key_length` / `value_length` are set.
    Qwen3,
}

impl TinyArch {
    pub fn name(self) -> &'static str {
        match self {
            TinyArch::Qwen2 => "qwen2",
            TinyArch::Qwen3 => "qwen3",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "qwen2" => Some(TinyArch::Qwen2),
            "qwen3" => Some(TinyArch::Qwen3),
            _ => None,
        }
    }

    /// The shapes and hyper-parameters written for this arch.
    pub fn config(self) -> TinyConfig {
        match self {
            TinyArch::Qwen2 => TinyConfig {
                arch: self,
                hidden: 64,
                n_layer: 2,
                n_head: 4,
                n_head_kv: 2,
                head_dim: 16,
                ffn: 128,
                context_length: 512,
                rope_freq_base: 1_000_000.0,
                rms_eps: 1e-6,
                seed: 0x5157_454e_3200_0001,
            },
            TinyArch::Qwen3 => TinyConfig {
                arch: self,
                hidden: 64,
                n_layer: 3,
                n_head: 4,
                n_head_kv: 2,
                head_dim: 32,
                ffn: 128,
                context_length: 512,
                rope_freq_base: 1_000_000.0,
                rms_eps: 1e-6,
                seed: 0x5157_454e_3300_0001,
            },
        }
    }
}

/// Hyper-parameters of a tiny model (see [`TinyArch::config`]).
#[derive(Debug, Clone, Copy)]
pub struct TinyConfig {
    pub arch: TinyArch,
    pub hidden: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub context_length: u32,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    pub seed: u64,
}

/// BPE merges after the 256 byte tokens, in rank order, in GPT-2's
/// byte-to-unicode spelling (`Ġ` is a space). Each merge's result is a token.
pub const MERGES: [(&str, &str); 8] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
];

/// Control tokens at the end of the vocabulary, as in Qwen's.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Id of `<|endoftext|>` (BOS and padding, never added automatically).
pub const ENDOFTEXT_ID: u32 = 256 + MERGES.len() as u32;
/// Id of `<|im_start|>`.
pub const IM_START_ID: u32 = ENDOFTEXT_ID + 1;
/// Id of `<|im_end|>` (EOS).
pub const IM_END_ID: u32 = ENDOFTEXT_ID + 2;
/// Vocabulary size: bytes, merges, specials.
pub const VOCAB_SIZE: usize = 256 + MERGES.len() + SPECIAL_TOKENS.len();

const CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n\
{{ message['content'] }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;

/// GPT-2's reversible byte -> printable char mapping: printable Latin-1 bytes
/// stand for themselves, the rest are shifted to U+0100 and up, in order.
pub fn byte_token(byte: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(byte) {
        return char::from(byte);
    }
    let shifted = (0..byte).filter(|&b| !printable(b)).count() as u32;
    // 256 + at most 68: always a valid scalar value.
    char::from_u32(256 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// The token strings, by id.
pub fn vocab() -> Vec<String> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_token(b).to_string()).collect();
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.extend(SPECIAL_TOKENS.iter().map(|s| s.to_string()));
    tokens
}

/// splitmix64, with normal deviates from the Irwin-Hall sum of 12 uniforms:
/// close enough to Gaussian for random weights, and bit-exact everywhere.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), a multiple of 2^-53.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Approximately N(0, 1): mean 0, variance 1, support [-6, 6].
    fn normal(&mut self) -> f64 {
        (0..12).map(|_| self.uniform()).sum::<f64>() - 6.0
    }

    fn values(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (mean + std * self.normal()) as f32)
            .collect()
    }
}

/// Tensors in the order they are drawn and written.
struct TensorSet {
    rng: Rng,
    tensors: Vec<(String, QTensor)>,
}

impl TensorSet {
    /// `shape` is candle's (rows, cols) order: GGUF stores it reversed, so a
    /// (out, in) matrix becomes ne = [in, out] as llama.cpp expects.
    fn add(&mut self, name: &str, shape: &[usize], mean: f64, std: f64) -> anyhow::Result<()> {
        let n = shape.iter().product();
        let data = self.rng.values(n, mean, std);
        let tensor = Tensor::from_vec(data, shape, &Device::Cpu)?;
        let q = QTensor::quantize(&tensor, GgmlDType::F32)
            .with_context(|| format!("storing {name} as F32"))?;
        self.tensors.push((name.to_string(), q));
        Ok(())
    }
}

fn metadata(cfg: &TinyConfig) -> Vec<(String, Value)> {
    let arch = cfg.arch.name();
    let u32v = |v: usize| Value::U32(v as u32);
    let mut md = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.to_string()),
        ),
        (
            "general.name".to_string(),
            Value::String(format!("kiln-tiny-{arch}")),
        ),
        ("general.file_type".to_string(), Value::U32(0)), // all F32
        (
            format!("{arch}.context_length"),
            Value::U32(cfg.context_length),
        ),
        (format!("{arch}.embedding_length"), u32v(cfg.hidden)),
        (format!("{arch}.block_count"), u32v(cfg.n_layer)),
        (format!("{arch}.feed_forward_length"), u32v(cfg.ffn)),
        (format!("{arch}.attention.head_count"), u32v(cfg.n_head)),
        (
            format!("{arch}.attention.head_count_kv"),
            u32v(cfg.n_head_kv),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(cfg.rope_freq_base),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_eps),
        ),
    ];
    if cfg.head_dim * cfg.n_head != cfg.hidden {
        md.push((format!("{arch}.attention.key_length"), u32v(cfg.head_dim)));
        md.push((format!("{arch}.attention.value_length"), u32v(cfg.head_dim)));
    }

    let tokens = vocab();
    let types: Vec<Value> = (0..tokens.len())
        .map(|id| {
            Value::I32(if id >= ENDOFTEXT_ID as usize {
                TOKEN_TYPE_CONTROL
            } else {
                TOKEN_TYPE_NORMAL
            })
        })
        .collect();
    md.extend([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("qwen2".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".to_string(),
            Value::Array(
                MERGES
                    .iter()
                    .map(|(a, b)| Value::String(format!("{a} {b}")))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.bos_token_id".to_string(),
            Value::U32(ENDOFTEXT_ID),
        ),
        (
            "tokenizer.ggml.eos_token_id".to_string(),
            Value::U32(IM_END_ID),
        ),
        (
            "tokenizer.ggml.padding_token_id".to_string(),
            Value::U32(ENDOFTEXT_ID),
        ),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(false),
        ),
        (
            "tokenizer.chat_template".to_string(),
            Value::String(CHAT_TEMPLATE.into()),
        ),
    ]);
    md
}

fn tensors(cfg: &TinyConfig) -> anyhow::Result<Vec<(String, QTensor)>> {
    let h = cfg.hidden;
    let q_dim = cfg.n_head * cfg.head_dim;
    let kv_dim = cfg.n_head_kv * cfg.head_dim;
    let inv_sqrt = |n: usize| 1.0 / (n as f64).sqrt();
    let mut set = TensorSet {
        rng: Rng(cfg.seed),
        tensors: Vec::new(),
    };

    set.add("token_embd.weight", &[VOCAB_SIZE, h], 0.0, 1.0)?;
    for l in 0..cfg.n_layer {
        let t = |s: &str| format!("blk.{l}.{s}");
        set.add(&t("attn_norm.weight"), &[h], 1.0, 0.2)?;
        // Larger q/k spread gives peaked, position-dependent attention, so a
        // wrong rope or mask shows up in the logits.
        set.add(&t("attn_q.weight"), &[q_dim, h], 0.0, 1.5 * inv_sqrt(h))?;
        set.add(&t("attn_k.weight"), &[kv_dim, h], 0.0, 1.5 * inv_sqrt(h))?;
        set.add(&t("attn_v.weight"), &[kv_dim, h], 0.0, inv_sqrt(h))?;
        match cfg.arch {
            TinyArch::Qwen2 => {
                set.add(&t("attn_q.bias"), &[q_dim], 0.0, 0.5)?;
                set.add(&t("attn_k.bias"), &[kv_dim], 0.0, 0.5)?;
                set.add(&t("attn_v.bias"), &[kv_dim], 0.0, 0.2)?;
            }
            TinyArch::Qwen3 => {
                set.add(&t("attn_q_norm.weight"), &[cfg.head_dim], 1.0, 0.2)?;
                set.add(&t("attn_k_norm.weight"), &[cfg.head_dim], 1.0, 0.2)?;
            }
        }
        set.add(&t("attn_output.weight"), &[h, q_dim], 0.0, inv_sqrt(q_dim))?;
        set.add(&t("ffn_norm.weight"), &[h], 1.0, 0.2)?;
        set.add(&t("ffn_gate.weight"), &[cfg.ffn, h], 0.0, inv_sqrt(h))?;
        set.add(&t("ffn_up.weight"), &[cfg.ffn, h], 0.0, inv_sqrt(h))?;
        set.add(&t("ffn_down.weight"), &[h, cfg.ffn], 0.0, inv_sqrt(cfg.ffn))?;
    }
    set.add("output_norm.weight", &[h], 1.0, 0.2)?;
    // Std 1 over a unit-RMS hidden state of width 64: logits spread ~8.
    set.add("output.weight", &[VOCAB_SIZE, h], 0.0, 1.0)?;
    Ok(set.tensors)
}

/// Writes the tiny model for `arch` to `path` (overwriting it).
pub fn write_tiny_model(arch: TinyArch, path: &Path) -> anyhow::Result<()> {
    let cfg = arch.config();
    let md = metadata(&cfg);
    let ts = tensors(&cfg)?;
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts_refs: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(file);
    gguf_file::write(&mut w, &md_refs, &ts_refs)
        .with_context(|| format!("writing {}", path.display()))?;
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("flushing {}", path.display()))?;
    file.sync_all()?;
    Ok(())
}
