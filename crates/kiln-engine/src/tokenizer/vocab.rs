//! The vocabulary as read from GGUF `tokenizer.ggml.*` metadata.
//!
//! Owns token texts, scores and attributes, the special-token ids, the
//! end-of-generation set and the BPE merge ranks, with llama.cpp's loading
//! rules applied: its per-model defaults for BOS/EOS/UNK, the tokens it
//! recognises by their text (end-of-turn, fill-in-the-middle) and marks as
//! control tokens, and the special-token list the partition step scans, in
//! its order (longest text first).
//!
//! Invariant: every id stored here (`bos`, `eog`, `special_tokens`, ...) is
//! `< tokens.len()`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};

use super::pretokenize::PreTokenizer;
use crate::error::{EngineError, Result};

/// Token attribute bits (llama.cpp's `llama_token_attr`).
pub(super) mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;
    pub const LSTRIP: u16 = 1 << 7;
    pub const RSTRIP: u16 = 1 << 8;
}

/// Which algorithm turns a text fragment into tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Algorithm {
    /// SentencePiece: bigram merges by score, `▁` for spaces, byte fallback.
    Spm,
    /// Byte-level BPE with merge ranks, after a pre-tokenizer split.
    Bpe {
        pre: PreTokenizer,
        ignore_merges: bool,
    },
}

pub(super) struct Vocab {
    pub algorithm: Algorithm,
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub attrs: Vec<u16>,
    pub token_to_id: HashMap<String, u32>,
    /// `"left right"` -> rank (lower merges first).
    pub merges: HashMap<String, u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_space_prefix: bool,
    /// Sorted ascending.
    pub eog: Vec<u32>,
    /// Control, user-defined and unknown tokens, longest text first.
    pub special_tokens: Vec<u32>,
}

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

// Token texts llama.cpp recognises when the metadata names no such token.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Texts that end generation wherever they appear in the vocabulary.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

fn meta_err(msg: impl Into<String>) -> EngineError {
    EngineError::Metadata(msg.into())
}

fn get_str<'c>(content: &'c Content, key: &str) -> Result<Option<&'c str>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(meta_err(format!(
            "`{key}` must be a string, found {:?}",
            other.value_type()
        ))),
    }
}

fn get_bool(content: &Content, key: &str) -> Result<Option<bool>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(meta_err(format!(
            "`{key}` must be a bool, found {:?}",
            other.value_type()
        ))),
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::U8(x) => Some(i64::from(x)),
        Value::I8(x) => Some(i64::from(x)),
        Value::U16(x) => Some(i64::from(x)),
        Value::I16(x) => Some(i64::from(x)),
        Value::U32(x) => Some(i64::from(x)),
        Value::I32(x) => Some(i64::from(x)),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

fn get_array<'c>(content: &'c Content, key: &str) -> Result<Option<&'c [Value]>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(other) => Err(meta_err(format!(
            "`{key}` must be an array, found {:?}",
            other.value_type()
        ))),
    }
}

/// Reads a special-token id key: absent -> `None`; not an integer -> error.
fn get_token_id(content: &Content, key: &str) -> Result<Option<i64>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(v) => as_i64(v)
            .map(Some)
            .ok_or_else(|| meta_err(format!("`{key}` must be an integer token id"))),
    }
}

impl Vocab {
    pub fn from_gguf(content: &Content) -> Result<Vocab> {
        let model = get_str(content, KEY_MODEL)?
            .ok_or_else(|| meta_err(format!("`{KEY_MODEL}` is missing")))?;
        let pre_name = get_str(content, KEY_PRE)?.unwrap_or("");

        // Per-model defaults, before the metadata overrides them.
        let ModelDefaults {
            algorithm,
            bos,
            eos,
            unk,
            mut add_bos,
            mut add_space_prefix,
        } = ModelDefaults::for_model(model, pre_name)?;

        let (tokens, token_to_id) = read_tokens(content)?;
        let n = tokens.len();
        let scores = read_scores(content, n)?;
        let mut attrs = read_attrs(content, n)?;
        let merges = match algorithm {
            Algorithm::Bpe { .. } => read_merges(content)?,
            Algorithm::Spm => HashMap::new(),
        };

        let in_range = |id: Option<i64>| id.filter(|&i| i >= 0 && (i as u64) < n as u64);
        let to_u32 = |id: Option<i64>| id.and_then(|i| u32::try_from(i).ok());
        let special = |key: &str, default: Option<i64>| -> Result<Option<u32>> {
            let mut id = in_range(default);
            if let Some(new_id) = get_token_id(content, key)? {
                if in_range(Some(new_id)).is_some() {
                    id = Some(new_id);
                } else {
                    tracing::warn!("`{key}` = {new_id} is outside the vocabulary; ignored");
                }
            }
            Ok(to_u32(id))
        };
        let bos = special("tokenizer.ggml.bos_token_id", bos)?;
        let eos = special("tokenizer.ggml.eos_token_id", eos)?;
        let unk = special("tokenizer.ggml.unknown_token_id", unk)?;
        let mut eot = special("tokenizer.ggml.eot_token_id", None)?;
        let mut eom = special("tokenizer.ggml.eom_token_id", None)?;
        let mut fim_pre = special("tokenizer.ggml.fim_pre_token_id", None)?;
        let mut fim_suf = special("tokenizer.ggml.fim_suf_token_id", None)?;
        let mut fim_mid = special("tokenizer.ggml.fim_mid_token_id", None)?;
        let mut fim_pad = special("tokenizer.ggml.fim_pad_token_id", None)?;
        let mut fim_rep = special("tokenizer.ggml.fim_rep_token_id", None)?;
        let mut fim_sep = special("tokenizer.ggml.fim_sep_token_id", None)?;
        // deprecated spellings of the FIM keys
        fim_pre = fim_pre.or(special("tokenizer.ggml.prefix_token_id", None)?);
        fim_suf = fim_suf.or(special("tokenizer.ggml.suffix_token_id", None)?);
        fim_mid = fim_mid.or(special("tokenizer.ggml.middle_token_id", None)?);

        if let Some(b) = get_bool(content, "tokenizer.ggml.add_bos_token")? {
            add_bos = b;
        }
        if let Some(b) = get_bool(content, "tokenizer.ggml.add_space_prefix")? {
            add_space_prefix = b;
        }

        // Tokens recognised by their text; each one found becomes a control token.
        for (slot, texts) in [
            (&mut eot, EOT_TEXTS),
            (&mut eom, EOM_TEXTS),
            (&mut fim_pre, FIM_PRE_TEXTS),
            (&mut fim_suf, FIM_SUF_TEXTS),
            (&mut fim_mid, FIM_MID_TEXTS),
            (&mut fim_pad, FIM_PAD_TEXTS),
            (&mut fim_rep, FIM_REP_TEXTS),
            (&mut fim_sep, FIM_SEP_TEXTS),
        ] {
            if slot.is_none() {
                // llama.cpp takes whichever its hash map yields first; the
                // lowest id is the deterministic choice.
                *slot = texts
                    .iter()
                    .filter_map(|t| token_to_id.get(*t).copied())
                    .min();
                if let Some(id) = *slot {
                    set_attr(&mut attrs, id, attr::CONTROL, true);
                }
            }
        }

        for (a, text) in attrs.iter_mut().zip(&tokens) {
            if *a & attr::CONTROL != 0 && text.contains("unused") {
                *a |= attr::UNUSED;
            }
        }

        let mut eog: Vec<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        for text in EOG_TEXTS {
            if let Some(&id) = token_to_id.get(*text) {
                eog.push(id);
                set_attr(&mut attrs, id, attr::CONTROL, true);
            }
        }
        // gpt-oss renders these markers as text.
        for text in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = token_to_id.get(text) {
                if let Some(a) = attrs.get_mut(id as usize) {
                    *a = attr::USER_DEFINED;
                }
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();

        let eog_has = |eog: &[u32], text: &str| {
            token_to_id
                .get(text)
                .copied()
                .filter(|id| eog.binary_search(id).is_ok())
        };
        // o200k_harmony / solar-open: `<|end|>` ends a message, not generation.
        let has = |t| eog_has(&eog, t).is_some();
        if (has("<|return|>") && has("<|call|>")) || (has("<|calls|>") && has("<|flush|>")) {
            if let Some(end) = eog_has(&eog, "<|end|>") {
                eog.retain(|&id| id != end);
                if let Some(a) = attrs.get_mut(end as usize) {
                    *a = attr::USER_DEFINED;
                }
            }
        }
        // Vocabularies with another end marker have an ordinary `</s>`.
        let has = |t| eog_has(&eog, t).is_some();
        if has("<|tool_response>") || has("<|plamo:eos|>") {
            if let Some(s) = eog_has(&eog, "</s>") {
                eog.retain(|&id| id != s);
                if let Some(a) = attrs.get_mut(s as usize) {
                    *a = attr::NORMAL;
                }
            }
        }

        let mut special_tokens: Vec<u32> = (0..n)
            .filter(|&i| {
                attrs
                    .get(i)
                    .is_some_and(|a| a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
            })
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        special_tokens.sort_by_key(|&id| {
            let len = tokens.get(id as usize).map_or(0, String::len);
            (std::cmp::Reverse(len), id)
        });

        apply_model_specific_attrs(content, pre_name, &token_to_id, &special_tokens, &mut attrs)?;

        Ok(Vocab {
            algorithm,
            tokens,
            scores,
            attrs,
            token_to_id,
            merges,
            bos,
            eos,
            unk,
            add_bos,
            add_space_prefix,
            eog,
            special_tokens,
        })
    }

    pub fn attr(&self, id: u32) -> u16 {
        self.attrs.get(id as usize).copied().unwrap_or(0)
    }

    pub fn text(&self, id: u32) -> &str {
        self.tokens.get(id as usize).map_or("", String::as_str)
    }

    pub fn id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }
}

/// llama.cpp's settings for a tokenizer model before the metadata overrides
/// them (ids may be out of range; those are dropped).
struct ModelDefaults {
    algorithm: Algorithm,
    bos: Option<i64>,
    eos: Option<i64>,
    unk: Option<i64>,
    add_bos: bool,
    add_space_prefix: bool,
}

impl ModelDefaults {
    fn for_model(model: &str, pre_name: &str) -> Result<ModelDefaults> {
        match model {
            "llama" => Ok(ModelDefaults {
                algorithm: Algorithm::Spm,
                bos: Some(1),
                eos: Some(2),
                unk: Some(0),
                add_bos: true,
                add_space_prefix: true,
            }),
            "gpt2" => {
                let config = PreTokenizer::for_name(pre_name).ok_or_else(|| {
                    meta_err(format!(
                        "unknown or unsupported pre-tokenizer `{KEY_PRE}` = `{pre_name}`"
                    ))
                })?;
                if pre_name.is_empty() {
                    tracing::warn!("GGUF has no `{KEY_PRE}`; using the `default` pre-tokenizer");
                }
                Ok(ModelDefaults {
                    algorithm: Algorithm::Bpe {
                        pre: config.kind,
                        ignore_merges: config.ignore_merges,
                    },
                    bos: (!config.no_default_bos).then_some(11),
                    eos: Some(11),
                    unk: None,
                    add_bos: config.add_bos,
                    add_space_prefix: false,
                })
            }
            other => Err(meta_err(format!(
                "unsupported tokenizer model `{KEY_MODEL}` = `{other}` (supported: llama, gpt2)"
            ))),
        }
    }
}

fn set_attr(attrs: &mut [u16], id: u32, bit: u16, on: bool) {
    if let Some(a) = attrs.get_mut(id as usize) {
        if on {
            *a |= bit;
        } else {
            *a &= !bit;
        }
    }
}

fn read_tokens(content: &Content) -> Result<(Vec<String>, HashMap<String, u32>)> {
    let items = get_array(content, KEY_TOKENS)?
        .ok_or_else(|| meta_err(format!("`{KEY_TOKENS}` is missing")))?;
    if items.is_empty() || u32::try_from(items.len()).is_err() {
        return Err(meta_err(format!(
            "`{KEY_TOKENS}` has {} entries",
            items.len()
        )));
    }
    let mut tokens = Vec::with_capacity(items.len());
    let mut token_to_id = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::String(text) = item else {
            return Err(meta_err(format!("`{KEY_TOKENS}`[{i}] is not a string")));
        };
        let text = if text.is_empty() {
            format!("[EMPTY_{i}]")
        } else {
            text.clone()
        };
        let id = u32::try_from(i).map_err(|_| meta_err("vocabulary too large"))?;
        if token_to_id.insert(text.clone(), id).is_some() {
            return Err(meta_err(format!(
                "`{KEY_TOKENS}` lists {text:?} more than once"
            )));
        }
        tokens.push(text);
    }
    Ok((tokens, token_to_id))
}

fn read_scores(content: &Content, n: usize) -> Result<Vec<f32>> {
    let Some(items) = get_array(content, KEY_SCORES)? else {
        return Ok(vec![0.0; n]);
    };
    if items.len() < n {
        return Err(meta_err(format!(
            "`{KEY_SCORES}` has {} entries for {n} tokens",
            items.len()
        )));
    }
    items
        .iter()
        .take(n)
        .map(|v| match *v {
            Value::F32(x) => Ok(x),
            Value::I32(x) => Ok(x as f32),
            _ => Err(meta_err(format!(
                "`{KEY_SCORES}` must hold f32 or i32 values"
            ))),
        })
        .collect()
}

fn read_attrs(content: &Content, n: usize) -> Result<Vec<u16>> {
    let Some(items) = get_array(content, KEY_TOKEN_TYPE)? else {
        return Ok(vec![attr::NORMAL; n]);
    };
    if items.len() < n {
        return Err(meta_err(format!(
            "`{KEY_TOKEN_TYPE}` has {} entries for {n} tokens",
            items.len()
        )));
    }
    items
        .iter()
        .take(n)
        .map(|v| {
            let t = as_i64(v)
                .ok_or_else(|| meta_err(format!("`{KEY_TOKEN_TYPE}` must hold integers")))?;
            // GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined,
            // 5 unused, 6 byte; anything else is "undefined" (no attribute).
            Ok(match t {
                1 => attr::NORMAL,
                2 => attr::UNKNOWN,
                3 => attr::CONTROL,
                4 => attr::USER_DEFINED,
                5 => attr::UNUSED,
                6 => attr::BYTE,
                _ => 0,
            })
        })
        .collect()
}

fn read_merges(content: &Content) -> Result<HashMap<String, u32>> {
    let items = get_array(content, KEY_MERGES)?
        .ok_or_else(|| meta_err(format!("`{KEY_MERGES}` is missing (required for gpt2 BPE)")))?;
    let mut merges = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::String(line) = item else {
            return Err(meta_err(format!("`{KEY_MERGES}`[{i}] is not a string")));
        };
        let rank = u32::try_from(i).map_err(|_| meta_err("too many merges"))?;
        // The separator is the first space after the first byte.
        let split = line
            .as_bytes()
            .iter()
            .skip(1)
            .position(|&b| b == b' ')
            .map(|p| p + 1);
        let pair = split.and_then(|at| Some((line.get(..at)?, line.get(at + 1..)?)));
        let Some((left, right)) = pair else {
            continue; // cannot match any pair of non-empty symbols
        };
        // First occurrence of a pair wins.
        merges.entry(format!("{left} {right}")).or_insert(rank);
    }
    Ok(merges)
}

/// Attributes llama.cpp sets by model or pre-tokenizer name.
fn apply_model_specific_attrs(
    content: &Content,
    pre_name: &str,
    token_to_id: &HashMap<String, u32>,
    special_tokens: &[u32],
    attrs: &mut [u16],
) -> Result<()> {
    let name = get_str(content, "general.name")?
        .unwrap_or("")
        .to_lowercase();
    let arch = get_str(content, "general.architecture")?.unwrap_or("");
    let set_by_text = |attrs: &mut [u16], text: &str, bit: u16, on: bool| {
        if let Some(&id) = token_to_id.get(text) {
            set_attr(attrs, id, bit, on);
        }
    };
    if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
        .iter()
        .any(|p| pre_name.contains(p))
        || ["nomic-bert-moe", "jina-bert-v3"]
            .iter()
            .any(|a| arch.contains(a))
    {
        set_by_text(attrs, "<mask>", attr::LSTRIP, true);
    } else if name.contains("phi-3") || name.contains("phi3") {
        for &id in special_tokens {
            set_attr(attrs, id, attr::RSTRIP, true);
        }
        set_by_text(attrs, "</s>", attr::RSTRIP, true);
        for text in ["<unk>", "<s>", "<|endoftext|>"] {
            set_by_text(attrs, text, attr::RSTRIP, false);
        }
    } else if name.contains("modern-bert") {
        set_by_text(attrs, "[MASK]", attr::LSTRIP, true);
    }
    Ok(())
}
