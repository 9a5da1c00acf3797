//! The BERT encoder forward pass on candle tensors, layer by layer as
//! HuggingFace `BertModel` computes it, followed by sentence-transformers'
//! pooling and L2 normalisation.
//!
//! Shapes: token rows are kept flat as `[batch * seq, hidden]` for the dense
//! layers and reshaped to `[batch, heads, seq, head_dim]` only for attention.
//! Padding is invisible to real tokens: padded keys get an additive
//! `f32::MIN` bias before the softmax (as HF's extended attention mask), and
//! pooling averages only unpadded rows, so a sentence's vector does not depend
//! on what it was batched with (up to float rounding).
//!
//! Invariant: every weight was shape-checked at load, so a forward pass can
//! only fail on a batch the caller failed to validate (ids, lengths).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use crate::bert::config::{BertConfig, Pooling};
use crate::error::{EngineError, Result};

/// A dense layer, `y = x W^T + b`; `W^T` is kept contiguous (`[in, out]`).
struct Linear {
    weight_t: Tensor,
    bias: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight_t)?.broadcast_add(&self.bias)?)
    }
}

/// LayerNorm over the last dimension (biased variance, as torch).
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// The loaded encoder: embeddings, layers and the pooling mode.
pub(crate) struct BertEncoder {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    /// Row 0 of the token-type table: every input is a single segment.
    token_type_row: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    pooling: Pooling,
    device: Device,
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

    fn linear(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear> {
        Ok(Linear {
            weight_t: self
                .get(&format!("{name}.weight"), &[out_dim, in_dim])?
                .t()?
                .contiguous()?,
            bias: self.get(&format!("{name}.bias"), &[out_dim])?,
        })
    }

    fn layer_norm(&self, name: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.get(&format!("{name}.weight"), &[dim])?,
            bias: self.get(&format!("{name}.bias"), &[dim])?,
            eps,
        })
    }
}

impl BertEncoder {
    /// Loads and shape-checks every weight in `model.safetensors`.
    pub(crate) fn load(path: &Path, config: &BertConfig, pooling: Pooling) -> Result<BertEncoder> {
        let device = Device::Cpu;
        if !path.is_file() {
            return Err(EngineError::bad_file(
                path,
                "file is missing; pull the model again",
            ));
        }
        let tensors = candle_core::safetensors::load(path, &device).map_err(|e| {
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
        let token_types = w.get(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(EncoderLayer {
                query: w.linear(&format!("{p}.attention.self.query"), h, h)?,
                key: w.linear(&format!("{p}.attention.self.key"), h, h)?,
                value: w.linear(&format!("{p}.attention.self.value"), h, h)?,
                attention_out: w.linear(&format!("{p}.attention.output.dense"), h, h)?,
                attention_norm: w.layer_norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
                intermediate: w.linear(&format!("{p}.intermediate.dense"), i, h)?,
                output: w.linear(&format!("{p}.output.dense"), h, i)?,
                output_norm: w.layer_norm(&format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        Ok(BertEncoder {
            word_embeddings: w.get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position_embeddings: w.get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type_row: token_types.get(0)?,
            embeddings_norm: w.layer_norm("embeddings.LayerNorm", h, eps)?,
            layers,
            heads: config.num_attention_heads,
            head_dim: config.head_dim(),
            hidden: h,
            pooling,
            device,
        })
    }

    /// Embeds one batch. Every input must be non-empty, no longer than the
    /// position table, with ids inside the vocabulary (the caller checks).
    /// Returns one L2-normalised vector per input.
    pub(crate) fn embed_batch(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let batch = inputs.len();
        let seq = inputs.iter().map(|ids| ids.len()).max().unwrap_or(0);
        if batch == 0 || seq == 0 {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(batch * seq);
        let mut mask = Vec::with_capacity(batch * seq);
        for input in inputs {
            ids.extend_from_slice(input);
            ids.resize(ids.len() + seq - input.len(), 0);
            mask.extend((0..seq).map(|t| if t < input.len() { 1f32 } else { 0f32 }));
        }
        let ids = Tensor::from_vec(ids, batch * seq, &self.device)?;
        let mask = Tensor::from_vec(mask, (batch, seq), &self.device)?;

        let mut x = self.embeddings(&ids, batch, seq)?;
        // Additive bias per key: 0 for tokens, f32::MIN for padding.
        let bias =
            ((mask.ones_like()? - &mask)? * f64::from(f32::MIN))?.reshape((batch, 1, 1, seq))?;
        for layer in &self.layers {
            x = self.layer(layer, &x, &bias, batch, seq)?;
        }
        let x = x.reshape((batch, seq, self.hidden))?;
        let pooled = match self.pooling {
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?;
                let summed = x.broadcast_mul(&m)?.sum(1)?;
                let counts = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
                summed.broadcast_div(&counts)?
            }
            Pooling::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let norms = pooled
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?;
        Ok(pooled.broadcast_div(&norms)?.to_vec2::<f32>()?)
    }

    /// Word + absolute position + token-type-0 embeddings, then LayerNorm.
    fn embeddings(&self, ids: &Tensor, batch: usize, seq: usize) -> Result<Tensor> {
        let words = self
            .word_embeddings
            .embedding(ids)?
            .reshape((batch, seq, self.hidden))?;
        let positions = self.position_embeddings.narrow(0, 0, seq)?;
        let x = words
            .broadcast_add(&positions)?
            .broadcast_add(&self.token_type_row)?
            .reshape((batch * seq, self.hidden))?;
        self.embeddings_norm.forward(&x)
    }

    fn layer(
        &self,
        layer: &EncoderLayer,
        x: &Tensor,
        bias: &Tensor,
        batch: usize,
        seq: usize,
    ) -> Result<Tensor> {
        let split_heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split_heads(layer.query.forward(x)?)?;
        let k = split_heads(layer.key.forward(x)?)?;
        let v = split_heads(layer.value.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
        let probs = softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch * seq, self.hidden))?;
        let attended = layer
            .attention_norm
            .forward(&(layer.attention_out.forward(&context)? + x)?)?;
        let inner = layer.intermediate.forward(&attended)?.gelu_erf()?;
        layer
            .output_norm
            .forward(&(layer.output.forward(&inner)? + &attended)?)
    }
}

fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    Ok(exp.broadcast_div(&sum)?)
}
