//! What a model file says about itself, read from headers only: GGUF
//! metadata and tensor infos (no tensor data), or an embedding model's
//! `config.json` and safetensors header.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{CatalogError, CatalogResult, ModelKind, ModelLocation};
use crate::gguf::{dtype_name, GgufFile};

/// Largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// A model's vital statistics, for `kiln models` and `/v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelSummary {
    pub name: String,
    pub kind: ModelKind,
    pub path: PathBuf,
    /// Bytes on disk: the GGUF file, or the weights file of an embedding model.
    pub size_bytes: u64,
    /// GGUF `general.architecture`, or config.json `model_type`.
    pub architecture: String,
    /// The tensor type holding the most bytes (`Q4_1`, `Q4_K`, `F32`, ...).
    /// For small models with big vocabularies this is often the embedding
    /// table's type; `file_type` is the quantization the file was made with.
    pub quantization: String,
    /// GGUF `general.file_type` as llama.cpp names it (`Q4_K_M`), if declared.
    pub file_type: Option<String>,
    /// Maximum positions the model was trained for, when declared (GGUF
    /// `<arch>.context_length`, config.json `max_position_embeddings`).
    pub context_length: Option<u64>,
    /// The longest input the model is fed: the context length for GGUF
    /// models; sentence-transformers' `max_seq_length` (inputs are truncated
    /// to it) for embedding models.
    pub max_input_tokens: Option<u64>,
    /// Number of weights across all tensors.
    pub parameters: u64,
    /// Hidden size (the embedding dimension for embedding models).
    pub embedding_length: Option<u64>,
    /// Whether the GGUF carries its own `tokenizer.chat_template`.
    pub has_chat_template: bool,
}

/// Reads a model's summary without loading its tensors.
pub fn describe(location: &ModelLocation) -> CatalogResult<ModelSummary> {
    match location {
        ModelLocation::Gguf { path, .. } => describe_gguf(location, path),
        ModelLocation::SentenceEmbedding { dir, .. } => describe_embedding(location, dir),
    }
}

fn describe_gguf(location: &ModelLocation, path: &Path) -> CatalogResult<ModelSummary> {
    let gguf = GgufFile::open(path).map_err(|e| CatalogError::BadModel {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let architecture = gguf.architecture().map_err(|e| CatalogError::BadModel {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let context_length = gguf.get_u64(&format!("{architecture}.context_length")).ok();
    let mut parameters = 0u64;
    let mut bytes_by_type: HashMap<&'static str, u64> = HashMap::new();
    for info in gguf.content().tensor_infos.values() {
        let elems = info.shape.elem_count() as u64;
        parameters += elems;
        let block = info.ggml_dtype.block_size().max(1) as u64;
        let bytes = elems / block * info.ggml_dtype.type_size() as u64;
        *bytes_by_type
            .entry(dtype_name(info.ggml_dtype))
            .or_default() += bytes;
    }
    Ok(ModelSummary {
        name: location.display_name(),
        kind: ModelKind::Gguf,
        path: path.to_path_buf(),
        size_bytes: gguf.size(),
        quantization: dominant(&bytes_by_type),
        file_type: gguf.get_u64("general.file_type").ok().map(file_type_name),
        context_length,
        max_input_tokens: context_length,
        embedding_length: gguf
            .get_u64(&format!("{architecture}.embedding_length"))
            .ok(),
        has_chat_template: gguf.value("tokenizer.chat_template").is_some(),
        parameters,
        architecture,
    })
}

/// llama.cpp's `llama_ftype` names. Bit 10 (1024) marks a type that
/// llama.cpp guessed for an old file.
fn file_type_name(code: u64) -> String {
    const GUESSED: u64 = 1024;
    let name = match code & !GUESSED {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_1_SOME_F16",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        other => return format!("type {other}"),
    };
    if code & GUESSED != 0 {
        format!("{name} (guessed)")
    } else {
        name.to_string()
    }
}

fn dominant(bytes_by_type: &HashMap<&str, u64>) -> String {
    bytes_by_type
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(name, _)| (*name).to_string())
        .unwrap_or_else(|| "none".to_string())
}

fn describe_embedding(location: &ModelLocation, dir: &Path) -> CatalogResult<ModelSummary> {
    let config_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| CatalogError::io(&config_path, e))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CatalogError::BadModel {
            path: config_path.clone(),
            reason: format!("invalid JSON: {e}"),
        })?;
    let architecture = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("unknown")
        .to_string();
    let weights = dir.join("model.safetensors");
    let (parameters, bytes_by_type, size_bytes) = safetensors_stats(&weights)?;
    let by_type: HashMap<&str, u64> = bytes_by_type
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    Ok(ModelSummary {
        name: location.display_name(),
        kind: ModelKind::SentenceEmbedding,
        path: dir.to_path_buf(),
        size_bytes,
        architecture,
        quantization: dominant(&by_type),
        file_type: None,
        context_length: config
            .get("max_position_embeddings")
            .and_then(|v| v.as_u64()),
        max_input_tokens: sentence_max_seq_length(dir)?,
        parameters,
        embedding_length: config.get("hidden_size").and_then(|v| v.as_u64()),
        has_chat_template: false,
    })
}

/// `max_seq_length` from `sentence_bert_config.json`, if the file exists.
fn sentence_max_seq_length(dir: &Path) -> CatalogResult<Option<u64>> {
    let path = dir.join("sentence_bert_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CatalogError::io(&path, e)),
    };
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CatalogError::BadModel {
            path: path.clone(),
            reason: format!("invalid JSON: {e}"),
        })?;
    Ok(config.get("max_seq_length").and_then(|v| v.as_u64()))
}

/// Parameter count, bytes per dtype and file size from a safetensors header.
fn safetensors_stats(path: &Path) -> CatalogResult<(u64, HashMap<String, u64>, u64)> {
    let bad = |reason: String| CatalogError::BadModel {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(|e| CatalogError::io(path, e))?;
    let size = file
        .metadata()
        .map_err(|e| CatalogError::io(path, e))?
        .len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_SAFETENSORS_HEADER || header_len + 8 > size {
        return Err(bad(format!(
            "safetensors header length {header_len} does not fit a {size}-byte file"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("truncated safetensors header: {e}")))?;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("invalid safetensors header: {e}")))?;
    let mut parameters = 0u64;
    let mut bytes_by_type: HashMap<String, u64> = HashMap::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info
            .get("dtype")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad(format!("tensor `{name}` has no dtype")))?;
        let shape = info
            .get("shape")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad(format!("tensor `{name}` has no shape")))?;
        let elems = shape
            .iter()
            .map(|d| d.as_u64().unwrap_or(0))
            .fold(1u64, |a, d| a.saturating_mul(d));
        parameters = parameters.saturating_add(elems);
        let bytes = info
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .and_then(|o| Some(o.get(1)?.as_u64()?.saturating_sub(o.first()?.as_u64()?)))
            .unwrap_or(0);
        *bytes_by_type.entry(dtype.to_string()).or_default() += bytes;
    }
    Ok((parameters, bytes_by_type, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_file_types() {
        assert_eq!(file_type_name(3), "Q4_1");
        assert_eq!(file_type_name(15), "Q4_K_M");
        assert_eq!(file_type_name(1024 + 15), "Q4_K_M (guessed)");
        assert_eq!(file_type_name(99), "type 99");
    }

    #[test]
    fn dominant_type_is_the_one_with_most_bytes() {
        let by_type: HashMap<&str, u64> = [("Q4_K", 10), ("Q6_K", 30), ("F32", 5)].into();
        assert_eq!(dominant(&by_type), "Q6_K");
        assert_eq!(dominant(&HashMap::new()), "none");
    }
}
