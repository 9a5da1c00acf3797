//! The BERT encoder forward pass on `f32` slices, layer by layer as
//! HuggingFace `BertModel` computes it, followed by sentence-transformers'
//! pooling and L2 normalisation.
//!
//! Layout: a batch is packed without padding. The tokens of all inputs are
//! the rows of one `[tokens, hidden]` matrix for the dense layers (query, key
//! and value fused into one product); attention runs per (input, head) on
//! that input's own rows, so no work is spent on padding and no mask is
//! needed. Pooling averages each input's rows.
//!
//! Invariants:
//! - Every weight was shape-checked at load and packed for
//!   [`super::matmul`]; a forward pass only fails on a batch the caller
//!   failed to validate (ids, lengths), and then with an error, not a panic.
//! - A vector depends only on its own input: with the AVX-512 and AVX2
//!   kernels each output value is computed the same way whatever the batch,
//!   its order or the thread count, so an input embeds to the same bits alone
//!   or batched (with the portable kernels, the `gemm` crate's blocking may
//!   change the rounding with the batch size).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::bert::config::{BertConfig, Pooling};
use crate::bert::isa::{multiversion, Arith, Isa};
use crate::bert::math::{add_layer_norm, softmax, LayerNorm};
use crate::bert::matmul::{gemm_block_generic, matmul, Epilogue, PackedMatrix};
use crate::error::{EngineError, Result};

struct EncoderLayer {
    /// Query, key and value in one: `hidden → 3 * hidden`.
    qkv: PackedMatrix,
    attention_out: PackedMatrix,
    attention_norm: LayerNorm,
    intermediate: PackedMatrix,
    output: PackedMatrix,
    output_norm: LayerNorm,
}

/// The loaded encoder: embeddings, layers, the pooling mode and the
/// instruction set its kernels run with.
pub(crate) struct BertEncoder {
    /// `vocab_size × hidden`, row-major.
    word_embeddings: Vec<f32>,
    /// `max_position_embeddings × hidden`, row-major.
    position_embeddings: Vec<f32>,
    /// Row 0 of the token-type table: every input is a single segment.
    token_type_row: Vec<f32>,
    embeddings_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    intermediate: usize,
    pooling: Pooling,
    isa: Isa,
}

/// Named tensors from `model.safetensors`, checked and converted on access.
struct WeightFile<'a> {
    tensors: HashMap<String, Tensor>,
    /// `""` or `"bert."`, whichever the checkpoint's names use.
    prefix: &'static str,
    path: &'a Path,
}

impl WeightFile<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let tensor = self.tensors.get(&full).ok_or_else(|| {
            EngineError::bad_file(self.path, format!("tensor `{full}` is missing"))
        })?;
        if tensor.dims() != shape {
            return Err(EngineError::bad_file(
                self.path,
                format!(
                    "tensor `{full}` has shape {:?}, expected {shape:?}",
                    tensor.dims()
                ),
            ));
        }
        match tensor.dtype() {
            DType::F32 => Ok(tensor.clone()),
            DType::F16 | DType::BF16 | DType::F64 => Ok(tensor.to_dtype(DType::F32)?),
            other => Err(EngineError::bad_file(
                self.path,
                format!("tensor `{full}` has dtype {other:?}, expected a float type"),
            )),
        }
    }

    /// The tensor's values, row-major.
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.get(name, shape)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// `name.weight` (`out_dim × in_dim`) and `name.bias` (`out_dim`).
    fn linear_parts(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<[Vec<f32>; 2]> {
        Ok([
            self.values(&format!("{name}.weight"), &[out_dim, in_dim])?,
            self.values(&format!("{name}.bias"), &[out_dim])?,
        ])
    }

    fn linear(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<PackedMatrix> {
        let [weight, bias] = self.linear_parts(name, out_dim, in_dim)?;
        Ok(PackedMatrix::from_linear(&weight, &bias, out_dim, in_dim))
    }

    /// Several linears with the same input, as one with their outputs
    /// concatenated.
    fn fused_linear(
        &self,
        names: &[String],
        out_dim: usize,
        in_dim: usize,
    ) -> Result<PackedMatrix> {
        let (mut weight, mut bias) = (Vec::new(), Vec::new());
        for name in names {
            let [w, b] = self.linear_parts(name, out_dim, in_dim)?;
            weight.extend_from_slice(&w);
            bias.extend_from_slice(&b);
        }
        Ok(PackedMatrix::from_linear(
            &weight,
            &bias,
            out_dim * names.len(),
            in_dim,
        ))
    }

    fn layer_norm(&self, name: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.values(&format!("{name}.weight"), &[dim])?,
            bias: self.values(&format!("{name}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }
}

/// Where one input's rows are in the packed batch.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
}

impl BertEncoder {
    /// Loads, shape-checks and packs every weight in `model.safetensors`.
    pub(crate) fn load(
        path: &Path,
        config: &BertConfig,
        pooling: Pooling,
        isa: Isa,
    ) -> Result<BertEncoder> {
        if !path.is_file() {
            return Err(EngineError::bad_file(
                path,
                "file is missing; pull the model again",
            ));
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            EngineError::bad_file(path, format!("not a readable safetensors file: {e}"))
        })?;
        let prefix = if tensors.contains_key("embeddings.word_embeddings.weight") {
            ""
        } else {
            "bert."
        };
        let w = WeightFile {
            tensors,
            prefix,
            path,
        };
        let (h, i, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.layer_norm_eps,
        );
        let token_types = w.values(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let qkv = ["query", "key", "value"].map(|n| format!("{p}.attention.self.{n}"));
            layers.push(EncoderLayer {
                qkv: w.fused_linear(&qkv, h, h)?,
                attention_out: w.linear(&format!("{p}.attention.output.dense"), h, h)?,
                attention_norm: w.layer_norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
                intermediate: w.linear(&format!("{p}.intermediate.dense"), i, h)?,
                output: w.linear(&format!("{p}.output.dense"), h, i)?,
                output_norm: w.layer_norm(&format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        Ok(BertEncoder {
            word_embeddings: w
                .values("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position_embeddings: w.values(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type_row: token_types[..h].to_vec(),
            embeddings_norm: w.layer_norm("embeddings.LayerNorm", h, eps)?,
            layers,
            heads: config.num_attention_heads,
            head_dim: config.head_dim(),
            hidden: h,
            intermediate: i,
            pooling,
            isa,
        })
    }

    /// Embeds one batch. Every input must be non-empty, no longer than the
    /// position table, with ids inside the vocabulary (the caller checks;
    /// a violation is [`EngineError::InvalidRequest`]). Returns one
    /// L2-normalised vector per input.
    pub(crate) fn embed_batch(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let h = self.hidden;
        let vocab = self.word_embeddings.len() / h;
        let positions = self.position_embeddings.len() / h;
        let mut spans = Vec::with_capacity(inputs.len());
        let mut tokens = 0;
        for (index, input) in inputs.iter().enumerate() {
            if input.is_empty() || input.len() > positions {
                return Err(EngineError::InvalidRequest(format!(
                    "input {index} has {} tokens; 1 to {positions} are allowed",
                    input.len()
                )));
            }
            if let Some(&id) = input.iter().find(|&&id| id as usize >= vocab) {
                return Err(EngineError::InvalidRequest(format!(
                    "input {index} contains token id {id}, outside the vocabulary of {vocab}"
                )));
            }
            spans.push(Span {
                start: tokens,
                len: input.len(),
            });
            tokens += input.len();
        }
        if tokens == 0 {
            return Ok(Vec::new());
        }
        // Run on a pool thread, so the parallel steps below are forked from
        // inside the pool rather than each injected from outside.
        Ok(rayon::scope(|_| self.forward(inputs, &spans, tokens)))
    }

    fn forward(&self, inputs: &[&[u32]], spans: &[Span], tokens: usize) -> Vec<Vec<f32>> {
        let h = self.hidden;
        let mut x = vec![0f32; tokens * h];
        self.embeddings(inputs, &mut x);
        // Query/key/value plus attention output by head, or the FFN's inner
        // activations: never both at once.
        let mut wide = vec![0f32; tokens * self.intermediate.max(4 * h)];
        let mut context = vec![0f32; tokens * h];
        let mut projected = vec![0f32; tokens * h];
        for layer in &self.layers {
            self.layer(
                layer,
                spans,
                &mut x,
                &mut wide,
                &mut context,
                &mut projected,
            );
        }
        self.pool(&x, spans)
    }

    /// Word + absolute position + token-type-0 embeddings, then LayerNorm.
    fn embeddings(&self, inputs: &[&[u32]], x: &mut [f32]) {
        let h = self.hidden;
        let rows: Vec<(u32, usize)> = inputs
            .iter()
            .flat_map(|ids| ids.iter().enumerate().map(|(p, &id)| (id, p)))
            .collect();
        const ROWS_PER_TASK: usize = 64;
        x.par_chunks_mut(ROWS_PER_TASK * h)
            .zip(rows.par_chunks(ROWS_PER_TASK))
            .for_each(|(x, rows)| {
                for (out, &(id, p)) in x.chunks_exact_mut(h).zip(rows) {
                    let word = &self.word_embeddings[id as usize * h..(id as usize + 1) * h];
                    let position = &self.position_embeddings[p * h..(p + 1) * h];
                    for (((o, w), q), t) in out
                        .iter_mut()
                        .zip(word)
                        .zip(position)
                        .zip(&self.token_type_row)
                    {
                        *o = w + q + t;
                    }
                }
                add_layer_norm(self.isa, x, None, &self.embeddings_norm);
            });
    }

    fn layer(
        &self,
        layer: &EncoderLayer,
        spans: &[Span],
        x: &mut Vec<f32>,
        wide: &mut [f32],
        context: &mut [f32],
        projected: &mut Vec<f32>,
    ) {
        let (h, isa) = (self.hidden, self.isa);
        let tokens = x.len() / h;
        {
            let (qkv, rest) = wide.split_at_mut(tokens * 3 * h);
            let by_head = &mut rest[..tokens * h];
            matmul(isa, x, tokens, &layer.qkv, qkv, Epilogue::Plain);
            self.attention(spans, qkv, by_head, context);
        }
        let norm = Epilogue::AddNorm {
            residual: x,
            norm: &layer.attention_norm,
        };
        matmul(isa, context, tokens, &layer.attention_out, projected, norm);
        std::mem::swap(x, projected);

        let inner = &mut wide[..tokens * self.intermediate];
        matmul(isa, x, tokens, &layer.intermediate, inner, Epilogue::Gelu);
        let norm = Epilogue::AddNorm {
            residual: x,
            norm: &layer.output_norm,
        };
        matmul(isa, inner, tokens, &layer.output, projected, norm);
        std::mem::swap(x, projected);
    }

    /// Scaled dot-product attention per (input, head). Each task writes its
    /// `len × head_dim` result to its own slice of `by_head` (input by input,
    /// head by head); those are then interleaved into `context`'s rows.
    fn attention(&self, spans: &[Span], qkv: &[f32], by_head: &mut [f32], context: &mut [f32]) {
        let (h, d, isa) = (self.hidden, self.head_dim, self.isa);
        let scale = 1.0 / (d as f32).sqrt();
        let mut tasks = Vec::with_capacity(spans.len() * self.heads);
        let mut rest = &mut *by_head;
        for &span in spans {
            for head in 0..self.heads {
                let (out, tail) = std::mem::take(&mut rest).split_at_mut(span.len * d);
                tasks.push((span, head, out));
                rest = tail;
            }
        }
        tasks
            .into_par_iter()
            .for_each_init(AttentionScratch::new, |scratch, (span, head, out)| {
                let rows = &qkv[span.start * 3 * h..(span.start + span.len) * 3 * h];
                attend(isa, rows, span.len, h, head * d, d, scale, out, scratch);
            });

        let mut per_input = Vec::with_capacity(spans.len());
        let mut rest = &mut *context;
        for &span in spans {
            let (rows, tail) = std::mem::take(&mut rest).split_at_mut(span.len * h);
            per_input.push((span, rows));
            rest = tail;
        }
        per_input.into_par_iter().for_each(|(span, rows)| {
            let heads = &by_head[span.start * h..(span.start + span.len) * h];
            for (head, part) in heads.chunks_exact(span.len * d).enumerate() {
                for (row, part) in rows.chunks_exact_mut(h).zip(part.chunks_exact(d)) {
                    row[head * d..(head + 1) * d].copy_from_slice(part);
                }
            }
        });
    }

    /// One vector per input: the mean of its rows, or its first row, then
    /// L2-normalised.
    fn pool(&self, x: &[f32], spans: &[Span]) -> Vec<Vec<f32>> {
        let h = self.hidden;
        spans
            .iter()
            .map(|span| {
                let rows = &x[span.start * h..(span.start + span.len) * h];
                let mut v = match self.pooling {
                    Pooling::Mean => {
                        let mut sum = vec![0f32; h];
                        for row in rows.chunks_exact(h) {
                            for (s, r) in sum.iter_mut().zip(row) {
                                *s += r;
                            }
                        }
                        let count = span.len as f32;
                        sum.iter_mut().for_each(|s| *s /= count);
                        sum
                    }
                    Pooling::Cls => rows[..h].to_vec(),
                };
                let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|a| *a /= norm);
                v
            })
            .collect()
    }
}

/// Per-task buffers for [`attend`], reused across the tasks a rayon job runs.
struct AttentionScratch {
    keys: PackedMatrix,
    values: PackedMatrix,
    scores: Vec<f32>,
}

impl AttentionScratch {
    fn new() -> AttentionScratch {
        AttentionScratch {
            keys: PackedMatrix::new(),
            values: PackedMatrix::new(),
            scores: Vec::new(),
        }
    }
}

/// One head of one input: `softmax(Q Kᵀ · scale) V` into `out` (`len × d`).
/// `rows` are the input's `len` rows of query | key | value (`3 * hidden`
/// wide); the head's columns start at `col` within each of the three.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_generic<A: Arith>(
    rows: &[f32],
    len: usize,
    hidden: usize,
    col: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut AttentionScratch,
) {
    let ld = 3 * hidden;
    let queries = &rows[col..];
    let keys = &rows[hidden + col..];
    let values = &rows[2 * hidden + col..];
    scratch.keys.pack_transposed(keys, ld, len, d);
    scratch.scores.clear();
    scratch.scores.resize(len * len, 0.0);
    let scores = &mut scratch.scores;
    gemm_block_generic::<A>(
        queries,
        ld,
        len,
        &scratch.keys,
        0,
        usize::MAX,
        scores,
        len,
        false,
    );
    for row in scores.chunks_exact_mut(len) {
        softmax::<A>(row, scale);
    }
    scratch.values.pack_rows(values, ld, len, d);
    gemm_block_generic::<A>(
        scores,
        len,
        len,
        &scratch.values,
        0,
        usize::MAX,
        out,
        d,
        false,
    );
}

multiversion! {
    /// [`attend_generic`] for `isa`.
    fn attend = attend_generic(
        rows: &[f32],
        len: usize,
        hidden: usize,
        col: usize,
        d: usize,
        scale: f32,
        out: &mut [f32],
        scratch: &mut AttentionScratch,
    );
}
