//! Sentence embeddings with a sentence-transformers BERT model
//! (all-MiniLM-L6-v2 and its kin), on the CPU with Kiln's own kernels.
//!
//! [`BertEmbedder`] owns a model directory as sentence-transformers lays it
//! out: `config.json`, `tokenizer.json`, `model.safetensors`,
//! `sentence_bert_config.json` and `1_Pooling/config.json`. It computes what
//! `SentenceTransformer.encode(..., normalize_embeddings)` computes for such a
//! model: WordPiece tokens ([`wordpiece`]), the BERT encoder, mean (or CLS)
//! pooling and L2 normalisation (`encoder`). The encoder packs a batch
//! without padding and runs on f32 slices: packed-panel matrix products
//! (`matmul`: AVX-512 or AVX2 tiles chosen at run time in `isa`, the `gemm`
//! crate on other CPUs) and vectorised element-wise math (`math`), spread
//! over the rayon pool.
//!
//! Unlike sentence-transformers, nothing is silently truncated: an input over
//! [`BertEmbedder::max_tokens`] is refused with
//! [`EngineError::InvalidRequest`], so the caller decides (refuse, or cut and
//! say so).
//!
//! # Token arrays from API users
//! [`BertEmbedder::embed`] embeds its inputs exactly as given. Text should go
//! through [`BertEmbedder::tokenize`], which adds `[CLS]` ... `[SEP]` as the
//! model was trained. A token array supplied by an API user (the OpenAI
//! embeddings API's array-of-integers input means "these are the tokens") is
//! passed unchanged: no `[CLS]`/`[SEP]` is added or removed, so an array
//! without them gets a (somewhat different) vector for exactly those tokens,
//! and one copied from [`BertEmbedder::tokenize`] gets the same vector as the
//! text. Such arrays are checked like any input: non-empty, at most
//! [`BertEmbedder::max_tokens`] long, every id below
//! [`BertEmbedder::vocab_size`].

mod config;
mod encoder;
mod isa;
mod math;
mod matmul;
pub mod wordpiece;

use std::path::Path;

use crate::bert::config::BertConfig;
use crate::bert::encoder::BertEncoder;
use crate::bert::isa::Isa;
use crate::bert::wordpiece::WordPieceTokenizer;
use crate::error::{EngineError, Result};
use crate::kernels::KernelVariant;

/// Most tokens in one forward pass (one input may exceed it alone). Bounds
/// the activations to about `7 * hidden * 4` bytes a token: 44 MB at
/// hidden 384.
const TOKEN_BUDGET: usize = 4096;

/// A loaded sentence-embedding model. Immutable, `Send + Sync`: share it
/// behind an `Arc` and call [`BertEmbedder::embed`] from any thread.
pub struct BertEmbedder {
    tokenizer: WordPieceTokenizer,
    encoder: BertEncoder,
    max_tokens: usize,
    dimensions: usize,
    vocab_size: usize,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<BertEmbedder>();
};

impl std::fmt::Debug for BertEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertEmbedder")
            .field("dimensions", &self.dimensions)
            .field("max_tokens", &self.max_tokens)
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl BertEmbedder {
    /// Loads a sentence-transformers model directory. A missing, unreadable
    /// or inconsistent file is [`EngineError::BadModelFile`] naming the file
    /// and what is wrong with it. The kernels are the variant
    /// [`KernelVariant::selected`] names (`KILN_KERNELS`, else the CPU's best).
    pub fn load(dir: &Path) -> Result<Self> {
        let isa = Isa::new(KernelVariant::selected()).unwrap_or(Isa::Portable);
        Self::load_with(dir, isa)
    }

    /// [`BertEmbedder::load`] with the kernels forced to `variant` (tests,
    /// benchmarks). A variant this CPU cannot run is
    /// [`EngineError::InvalidRequest`]. Every variant gives the same vectors
    /// up to float rounding (bit for bit between the SIMD ones).
    pub fn load_with_kernels(dir: &Path, variant: KernelVariant) -> Result<Self> {
        let isa = Isa::new(variant).ok_or_else(|| {
            EngineError::InvalidRequest(format!(
                "the {} kernels need CPU features this machine lacks",
                variant.name()
            ))
        })?;
        Self::load_with(dir, isa)
    }

    /// The tokenizer of a sentence-transformers model directory and the
    /// longest input the model takes (special tokens included), without
    /// loading its weights: what counting tokens for a copy of the model
    /// served elsewhere needs.
    pub fn load_tokenizer(dir: &Path) -> Result<(WordPieceTokenizer, usize)> {
        let config = BertConfig::load(&dir.join("config.json"))?;
        Self::tokenizer_of(dir, &config)
    }

    fn tokenizer_of(dir: &Path, config: &BertConfig) -> Result<(WordPieceTokenizer, usize)> {
        let max_tokens = config::load_max_tokens(&dir.join("sentence_bert_config.json"), config)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = WordPieceTokenizer::from_file(&tokenizer_path)?;
        if tokenizer.max_id() as usize >= config.vocab_size {
            return Err(EngineError::bad_file(
                tokenizer_path,
                format!(
                    "token id {} is outside the model's vocab_size {}",
                    tokenizer.max_id(),
                    config.vocab_size
                ),
            ));
        }
        Ok((tokenizer, max_tokens))
    }

    fn load_with(dir: &Path, isa: Isa) -> Result<Self> {
        let config = BertConfig::load(&dir.join("config.json"))?;
        let (tokenizer, max_tokens) = Self::tokenizer_of(dir, &config)?;
        let pooling = config::load_pooling(&dir.join("1_Pooling").join("config.json"), &config)?;
        let encoder = BertEncoder::load(&dir.join("model.safetensors"), &config, pooling, isa)?;
        Ok(BertEmbedder {
            tokenizer,
            encoder,
            max_tokens,
            dimensions: config.hidden_size,
            vocab_size: config.vocab_size,
        })
    }

    /// Token ids for `text`, wrapped in `[CLS]` ... `[SEP]`, identical to
    /// HuggingFace `tokenizers`. Not truncated: compare the length with
    /// [`BertEmbedder::max_tokens`].
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text)
    }

    /// The longest input [`BertEmbedder::embed`] accepts, special tokens
    /// included (`max_seq_length` from `sentence_bert_config.json`).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Length of each embedding vector.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Number of token ids; valid ids are `0..vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Embeds a batch of token arrays, used exactly as given (see the module
    /// docs: text goes through [`BertEmbedder::tokenize`] first; raw arrays
    /// get no `[CLS]`/`[SEP]` added). Each input must be non-empty, at most
    /// [`BertEmbedder::max_tokens`] long, with ids below
    /// [`BertEmbedder::vocab_size`]; otherwise
    /// [`EngineError::InvalidRequest`] naming the input and the limit.
    ///
    /// Returns one L2-normalised vector per input, in input order. Inputs are
    /// packed into forward passes of up to 4096 tokens without
    /// padding; a vector does not depend on the other inputs (with the AVX2
    /// and AVX-512 kernels it is the same bits alone or batched).
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        for (index, input) in inputs.iter().enumerate() {
            self.check_input(index, input)?;
        }
        let mut out = Vec::with_capacity(inputs.len());
        let mut start = 0;
        while start < inputs.len() {
            let mut end = start + 1;
            let mut tokens = inputs[start].len();
            while end < inputs.len() && tokens + inputs[end].len() <= TOKEN_BUDGET {
                tokens += inputs[end].len();
                end += 1;
            }
            let group: Vec<&[u32]> = inputs[start..end].iter().map(Vec::as_slice).collect();
            let vectors = self.encoder.embed_batch(&group)?;
            if vectors.len() != group.len() {
                return Err(EngineError::Tensor(candle_core::Error::Msg(format!(
                    "encoder returned {} vectors for {} inputs",
                    vectors.len(),
                    group.len()
                ))));
            }
            out.extend(vectors);
            start = end;
        }
        Ok(out)
    }

    fn check_input(&self, index: usize, input: &[u32]) -> Result<()> {
        if input.is_empty() {
            return Err(EngineError::InvalidRequest(format!(
                "input {index} has no tokens; each input needs at least one"
            )));
        }
        if input.len() > self.max_tokens {
            return Err(EngineError::InvalidRequest(format!(
                "input {index} has {} tokens, more than this model's limit of {} tokens",
                input.len(),
                self.max_tokens
            )));
        }
        if let Some(&id) = input.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "input {index} contains token id {id}, but this model's token ids are 0 to {}",
                self.vocab_size - 1
            )));
        }
        Ok(())
    }
}
