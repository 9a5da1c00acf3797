//! The JSON files of a sentence-transformers BERT directory, read and
//! validated: `config.json` (the encoder's shape), `sentence_bert_config.json`
//! (the token limit) and `1_Pooling/config.json` (how token vectors become one
//! sentence vector).
//!
//! Invariant: a [`BertConfig`] that loaded is internally consistent (hidden
//! size divisible by the head count, a token limit within the position table,
//! an activation and pooling mode this module implements), so the encoder
//! never meets a shape it cannot build.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{EngineError, Result};

/// Reads and parses one JSON file; a missing or malformed file is a
/// [`EngineError::BadModelFile`] that names it.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let reason = if e.kind() == std::io::ErrorKind::NotFound {
            "file is missing; pull the model again".to_string()
        } else {
            format!("cannot be read: {e}")
        };
        EngineError::bad_file(path, reason)
    })?;
    serde_json::from_str(&text)
        .map_err(|e| EngineError::bad_file(path, format!("is not valid for this model: {e}")))
}

/// The encoder hyper-parameters from `config.json` (HuggingFace `BertConfig`).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_hidden_act() -> String {
    "gelu".to_string()
}
fn default_position_embedding_type() -> String {
    "absolute".to_string()
}

impl BertConfig {
    pub(crate) fn load(path: &Path) -> Result<BertConfig> {
        let config: BertConfig = read_json(path)?;
        let bad = |reason: String| Err(EngineError::bad_file(path, reason));
        if config.hidden_act != "gelu" {
            return bad(format!(
                "hidden_act `{}` is not supported (only `gelu`, the erf form)",
                config.hidden_act
            ));
        }
        if config.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                config.position_embedding_type
            ));
        }
        let positive = [
            ("vocab_size", config.vocab_size),
            ("hidden_size", config.hidden_size),
            ("num_hidden_layers", config.num_hidden_layers),
            ("num_attention_heads", config.num_attention_heads),
            ("intermediate_size", config.intermediate_size),
            ("max_position_embeddings", config.max_position_embeddings),
            ("type_vocab_size", config.type_vocab_size),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be positive"));
        }
        if config.head_dim() * config.num_attention_heads != config.hidden_size {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            ));
        }
        if config.vocab_size > u32::MAX as usize {
            return bad(format!(
                "vocab_size {} does not fit u32 ids",
                config.vocab_size
            ));
        }
        if !(config.layer_norm_eps.is_finite() && config.layer_norm_eps > 0.0) {
            return bad(format!(
                "layer_norm_eps {} must be a positive number",
                config.layer_norm_eps
            ));
        }
        Ok(config)
    }

    pub(crate) fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// `sentence_bert_config.json`: the longest input sentence-transformers feeds
/// the encoder.
#[derive(Debug, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

/// Reads the token limit and checks it fits the position table.
pub(crate) fn load_max_tokens(path: &Path, config: &BertConfig) -> Result<usize> {
    let sb: SentenceBertConfig = read_json(path)?;
    if sb.max_seq_length < 2 || sb.max_seq_length > config.max_position_embeddings {
        return Err(EngineError::bad_file(
            path,
            format!(
                "max_seq_length {} must be between 2 and max_position_embeddings ({})",
                sb.max_seq_length, config.max_position_embeddings
            ),
        ));
    }
    Ok(sb.max_seq_length)
}

/// How token vectors are reduced to one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pooling {
    /// Average of the token vectors under the attention mask.
    Mean,
    /// The vector of the first token ([CLS]).
    Cls,
}

/// `1_Pooling/config.json` (sentence-transformers `models.Pooling`).
#[derive(Debug, Deserialize)]
struct PoolingConfig {
    word_embedding_dimension: usize,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

/// Reads the pooling mode; exactly one of the implemented modes must be on.
pub(crate) fn load_pooling(path: &Path, config: &BertConfig) -> Result<Pooling> {
    let p: PoolingConfig = read_json(path)?;
    let bad = |reason: String| Err(EngineError::bad_file(path, reason));
    if p.word_embedding_dimension != config.hidden_size {
        return bad(format!(
            "word_embedding_dimension {} differs from the encoder's hidden_size {}",
            p.word_embedding_dimension, config.hidden_size
        ));
    }
    let unsupported = p.pooling_mode_max_tokens
        || p.pooling_mode_mean_sqrt_len_tokens
        || p.pooling_mode_weightedmean_tokens
        || p.pooling_mode_lasttoken;
    match (p.pooling_mode_mean_tokens, p.pooling_mode_cls_token, unsupported) {
        (true, false, false) => Ok(Pooling::Mean),
        (false, true, false) => Ok(Pooling::Cls),
        _ => bad("unsupported pooling: exactly one of pooling_mode_mean_tokens or pooling_mode_cls_token must be true".to_string()),
    }
}
