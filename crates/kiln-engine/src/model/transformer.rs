//! The decoder-only transformer forward pass for llama, gemma3, qwen2 and qwen3.
//!
//! Weights stay quantized as in the GGUF file and are multiplied with candle's
//! quantized kernels (activations quantized to the weight's dot-product type,
//! as ggml does). Everything between the matrix products — norms, rotary
//! embeddings, attention, activations — is plain Rust over `f32` slices, so
//! the numerics are ours to control:
//! - the KV cache holds `f16`, and attention rounds the query and the softmax
//!   weights to `f16` before the two dot products, as llama.cpp's CPU path does
//!   with its default `f16` cache, so our logits track its logits closely;
//! - rotary angles are built by repeated multiplication in `f32`, like ggml,
//!   and applied with the fused multiply-adds GCC makes of ggml's rotation;
//! - the attention dot products, the softmax (ggml's vector `expf`) and SiLU
//!   replay ggml's AVX-512 lane orders ([`crate::kernels::lanes`]), so on the
//!   reference models our logits are llama.cpp's bit for bit where the same
//!   kernels run (see `kernels::dot` for the one known exception, Q6_K).
//!
//! Architecture differences are switches in [`Config`]:
//! - llama: interleaved RoPE (GGUF stores Q/K permuted for it), SiLU-gated FFN;
//! - qwen2: NeoX RoPE, biases on Q/K/V;
//! - qwen3: NeoX RoPE, RMS norms on each query/key head, explicit head size;
//! - gemma3: NeoX RoPE, embeddings scaled by √hidden, Q/K norms, norms after
//!   attention and FFN too, GELU(tanh)-gated FFN, five sliding-window layers
//!   (window 512, RoPE base 10 000) for every global one (the model's base).
//!
//! Invariant: a [`SequenceCache`] holds exactly the positions fed so far; the
//! next `forward` continues at `cache.len()`.

use candle_core::Device;
use half::f16;
use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kernels::{lanes, QMatrix};
use crate::model::kv::{BlockTable, KvPool, BLOCK_TOKENS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Gemma3,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Architecture::Llama),
            "gemma3" => Ok(Architecture::Gemma3),
            "qwen2" => Ok(Architecture::Qwen2),
            "qwen3" => Ok(Architecture::Qwen3),
            other => Err(EngineError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RopeStyle {
    /// Rotates pairs (2i, 2i+1).
    Interleaved,
    /// Rotates pairs (i, i + d/2).
    Neox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Silu,
    GeluTanh,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub architecture: Architecture,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_eps: f32,
    rope_style: RopeStyle,
    rope_dims: usize,
    rope_base: f32,
    rope_scale: f32,
    rope_base_local: f32,
    /// Sliding-window size of local layers, if the model has them.
    pub sliding_window: Option<usize>,
    /// Every `swa_period`-th layer (1-based) is global; the others are local.
    swa_period: usize,
    attn_scale: f32,
    embed_scale: Option<f32>,
    activation: Activation,
}

impl Config {
    fn from_gguf(file: &GgufFile, arch: Architecture, arch_name: &str) -> Result<Config> {
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden = file.get_usize(&key("embedding_length"))?;
        let heads = file.get_usize(&key("attention.head_count"))?;
        if heads == 0 {
            return Err(EngineError::Metadata("attention.head_count is 0".into()));
        }
        let kv_heads = file.get_usize_or(&key("attention.head_count_kv"), heads)?;
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(EngineError::Metadata(format!(
                "{heads} attention heads cannot be grouped over {kv_heads} key/value heads"
            )));
        }
        let head_dim = file.get_usize_or(&key("attention.key_length"), hidden / heads)?;
        let value_dim = file.get_usize_or(&key("attention.value_length"), head_dim)?;
        if value_dim != head_dim || head_dim == 0 || head_dim % 2 != 0 {
            return Err(EngineError::Metadata(format!(
                "unsupported head sizes: key {head_dim}, value {value_dim}"
            )));
        }
        let rope_dims = file.get_usize_or(&key("rope.dimension_count"), head_dim)?;
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(EngineError::Metadata(format!(
                "rope.dimension_count {rope_dims} does not fit head size {head_dim}"
            )));
        }
        let vocab_size = match file.value("tokenizer.ggml.tokens") {
            Some(candle_core::quantized::gguf_file::Value::Array(a)) => a.len(),
            _ => file.get_usize(&key("vocab_size"))?,
        };
        let rope_scale = match file.get_f32_or(&key("rope.scaling.factor"), 1.0)? {
            f if f > 0.0 => 1.0 / f,
            _ => 1.0,
        };
        let gemma = arch == Architecture::Gemma3;
        let sliding_window = if gemma {
            Some(file.get_usize_or(&key("attention.sliding_window"), 512)?)
        } else {
            None
        };
        Ok(Config {
            architecture: arch,
            hidden,
            layers: file.get_usize(&key("block_count"))?,
            heads,
            kv_heads,
            head_dim,
            ffn: file.get_usize(&key("feed_forward_length"))?,
            vocab_size,
            context_length: file.get_usize(&key("context_length"))?,
            rms_eps: file.get_f32_or(&key("attention.layer_norm_rms_epsilon"), 1e-6)?,
            rope_style: if arch == Architecture::Llama {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Neox
            },
            rope_dims,
            rope_base: file.get_f32_or(&key("rope.freq_base"), 10_000.0)?,
            rope_scale,
            rope_base_local: 10_000.0,
            sliding_window,
            swa_period: 6,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            embed_scale: gemma.then(|| (hidden as f32).sqrt()),
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
        })
    }

    fn is_local_layer(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && !(layer + 1).is_multiple_of(self.swa_period)
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
    post_ffn_norm: Option<Vec<f32>>,
}

pub struct Transformer {
    config: Config,
    embeddings: QMatrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    output: QMatrix,
}

/// One sequence's KV cache with a pool of its own, for callers that run a
/// single sequence (tests, tools); the engine shares one [`KvPool`] between
/// all its sequences instead.
pub struct SequenceCache {
    pool: KvPool,
    table: BlockTable,
}

impl SequenceCache {
    /// Positions stored so far.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// One sequence's share of a batched forward pass: `tokens` are fed at
/// positions `cache.len()..`, and the logits of the last one are returned
/// when `logits` is set (a prefill chunk that does not end the prompt needs
/// none).
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut BlockTable,
    pub logits: bool,
}

fn vector(file: &mut GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = file.tensor_shaped(name, &[len])?;
    Ok(t.dequantize(&Device::Cpu)?.to_vec1::<f32>()?)
}

fn optional_vector(file: &mut GgufFile, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
    if file.has_tensor(name) {
        vector(file, name, len).map(Some)
    } else {
        Ok(None)
    }
}

fn matrix(file: &mut GgufFile, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
    let t = file.tensor_shaped(name, &[rows, cols])?;
    QMatrix::from_qtensor(&t)
}

impl Transformer {
    pub fn load(file: &mut GgufFile, arch_name: &str) -> Result<Transformer> {
        let arch = Architecture::parse(arch_name)?;
        let c = Config::from_gguf(file, arch, arch_name)?;
        let q_dim = c.heads * c.head_dim;
        let kv_dim = c.kv_heads * c.head_dim;
        let embeddings = matrix(file, "token_embd.weight", c.vocab_size, c.hidden)?;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let needs_qk_norm = matches!(arch, Architecture::Qwen3 | Architecture::Gemma3);
            let needs_bias = arch == Architecture::Qwen2;
            let layer = Layer {
                attn_norm: vector(file, &n("attn_norm.weight"), c.hidden)?,
                wq: matrix(file, &n("attn_q.weight"), q_dim, c.hidden)?,
                wk: matrix(file, &n("attn_k.weight"), kv_dim, c.hidden)?,
                wv: matrix(file, &n("attn_v.weight"), kv_dim, c.hidden)?,
                wo: matrix(file, &n("attn_output.weight"), c.hidden, q_dim)?,
                bq: if needs_bias {
                    Some(vector(file, &n("attn_q.bias"), q_dim)?)
                } else {
                    optional_vector(file, &n("attn_q.bias"), q_dim)?
                },
                bk: if needs_bias {
                    Some(vector(file, &n("attn_k.bias"), kv_dim)?)
                } else {
                    optional_vector(file, &n("attn_k.bias"), kv_dim)?
                },
                bv: if needs_bias {
                    Some(vector(file, &n("attn_v.bias"), kv_dim)?)
                } else {
                    optional_vector(file, &n("attn_v.bias"), kv_dim)?
                },
                q_norm: if needs_qk_norm {
                    Some(vector(file, &n("attn_q_norm.weight"), c.head_dim)?)
                } else {
                    None
                },
                k_norm: if needs_qk_norm {
                    Some(vector(file, &n("attn_k_norm.weight"), c.head_dim)?)
                } else {
                    None
                },
                post_attn_norm: if arch == Architecture::Gemma3 {
                    Some(vector(file, &n("post_attention_norm.weight"), c.hidden)?)
                } else {
                    None
                },
                ffn_norm: vector(file, &n("ffn_norm.weight"), c.hidden)?,
                w_gate: matrix(file, &n("ffn_gate.weight"), c.ffn, c.hidden)?,
                w_up: matrix(file, &n("ffn_up.weight"), c.ffn, c.hidden)?,
                w_down: matrix(file, &n("ffn_down.weight"), c.hidden, c.ffn)?,
                post_ffn_norm: if arch == Architecture::Gemma3 {
                    Some(vector(file, &n("post_ffw_norm.weight"), c.hidden)?)
                } else {
                    None
                },
            };
            layers.push(layer);
        }
        let output_norm = vector(file, "output_norm.weight", c.hidden)?;
        let output = if file.has_tensor("output.weight") {
            matrix(file, "output.weight", c.vocab_size, c.hidden)?
        } else {
            // Tied embeddings: the embedding table doubles as the output layer.
            QMatrix::from_qtensor(&file.tensor("token_embd.weight")?)?
        };
        Ok(Transformer {
            config: c,
            embeddings,
            layers,
            output_norm,
            output,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Bytes of KV cache one position takes (all layers, keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        KvPool::bytes_per_block(self.config.layers, self.kv_dim()) / BLOCK_TOKENS
    }

    fn kv_dim(&self) -> usize {
        self.config.kv_heads * self.config.head_dim
    }

    /// An empty KV pool of at most `budget_bytes` for this model.
    pub fn new_pool(&self, budget_bytes: usize) -> KvPool {
        KvPool::new(self.config.layers, self.kv_dim(), budget_bytes)
    }

    /// A cache for one sequence, able to hold the whole context.
    pub fn new_cache(&self) -> SequenceCache {
        let blocks = crate::model::kv::blocks_for(self.config.context_length);
        SequenceCache {
            pool: KvPool::with_blocks(self.config.layers, self.kv_dim(), blocks),
            table: BlockTable::new(),
        }
    }

    /// Runs `tokens` at positions `cache.len()..` and returns the logits of the last token.
    pub fn forward(&self, tokens: &[u32], cache: &mut SequenceCache) -> Result<Vec<f32>> {
        let mut items = [BatchItem {
            tokens,
            cache: &mut cache.table,
            logits: true,
        }];
        let mut out = self.forward_batch(&mut cache.pool, &mut items)?;
        out.pop()
            .flatten()
            .ok_or_else(|| EngineError::InvalidRequest("no logits were computed".into()))
    }

    /// Checks that `item` can run and gives its cache the blocks it needs.
    fn prepare(&self, pool: &mut KvPool, item: &mut BatchItem<'_>) -> Result<()> {
        let c = &self.config;
        if item.tokens.is_empty() {
            return Err(EngineError::InvalidRequest("no tokens to run".into()));
        }
        if let Some(bad) = item.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is out of range (vocabulary of {})",
                c.vocab_size
            )));
        }
        let end = item.cache.len() + item.tokens.len();
        if end > c.context_length {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: end,
                context_length: c.context_length,
            });
        }
        if !pool.grow(item.cache, end) {
            return Err(EngineError::KvCacheFull {
                needed: end,
                capacity: pool.capacity() * BLOCK_TOKENS,
            });
        }
        Ok(())
    }

    /// One forward pass over several sequences at once, each at its own
    /// position: every matrix product runs once over the rows of all of
    /// them, so each weight is read once per step for the whole batch.
    /// Returns, per item, the logits of its last token when it asked for
    /// them. Each row's arithmetic is the same whatever else is in the batch
    /// (see [`crate::kernels`]), so results do not depend on batching.
    pub fn forward_batch(
        &self,
        pool: &mut KvPool,
        items: &mut [BatchItem<'_>],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        if rayon::current_thread_index().is_some() {
            return self.run_batch(pool, items);
        }
        // Run on a pool thread, so that each matrix product and attention
        // step forks from inside the pool. Called from outside, every one of
        // them would be injected into the pool with the caller asleep until
        // it is done: a wake-up and a sleep per step, dozens per token.
        rayon::scope(|_| self.run_batch(pool, items))
    }

    /// [`Self::forward_batch`], on the calling thread.
    fn run_batch(
        &self,
        pool: &mut KvPool,
        items: &mut [BatchItem<'_>],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.config;
        for item in items.iter_mut() {
            self.prepare(pool, item)?;
        }
        let rows: Vec<Row> = items
            .iter()
            .enumerate()
            .flat_map(|(i, item)| {
                let start = item.cache.len();
                (0..item.tokens.len()).map(move |j| Row {
                    item: i,
                    index: j,
                    pos: start + j,
                })
            })
            .collect();
        let n = rows.len();
        let mut x = vec![0f32; n * c.hidden];
        let tokens = items.iter().flat_map(|item| item.tokens.iter());
        for (row, &t) in x.chunks_exact_mut(c.hidden).zip(tokens) {
            self.embeddings.dequantize_row(t as usize, row)?;
        }
        if let Some(s) = c.embed_scale {
            x.iter_mut().for_each(|v| *v *= s);
        }
        let ropes: Vec<Ropes> = items
            .iter()
            .map(|item| {
                let (start, len) = (item.cache.len(), item.tokens.len());
                Ropes {
                    global: RopeTable::new(c, c.rope_base, c.rope_scale, start, len),
                    local: c
                        .sliding_window
                        .map(|_| RopeTable::new(c, c.rope_base_local, 1.0, start, len)),
                }
            })
            .collect();
        let tables: Vec<&BlockTable> = items.iter().map(|item| &*item.cache).collect();
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm_rows(&x, &layer.attn_norm, c.rms_eps);
            let attn = self.attention(layer, li, &h, &rows, &ropes, pool, &tables)?;
            let mut attn = matmul(&layer.wo, &attn, n, c.heads * c.head_dim)?;
            if let Some(w) = &layer.post_attn_norm {
                attn = rms_norm_rows(&attn, w, c.rms_eps);
            }
            add_in_place(&mut x, &attn);
            let h = rms_norm_rows(&x, &layer.ffn_norm, c.rms_eps);
            let [mut gate, up] = matmul_many([&layer.w_gate, &layer.w_up], &h, n)?;
            gated_activation(c.activation, &mut gate, &up);
            let mut down = matmul(&layer.w_down, &gate, n, c.ffn)?;
            if let Some(w) = &layer.post_ffn_norm {
                down = rms_norm_rows(&down, w, c.rms_eps);
            }
            add_in_place(&mut x, &down);
        }
        // The last row of each item that asked for logits, in item order.
        let mut wanted = Vec::new();
        let mut last = 0;
        for item in items.iter_mut() {
            last += item.tokens.len();
            let end = item.cache.len() + item.tokens.len();
            item.cache.set_len(end);
            if item.logits {
                wanted.extend_from_slice(&x[(last - 1) * c.hidden..last * c.hidden]);
            }
        }
        let count = wanted.len() / c.hidden;
        let mut logits = if count == 0 {
            Vec::new()
        } else {
            let normed = rms_norm_rows(&wanted, &self.output_norm, c.rms_eps);
            matmul(&self.output, &normed, count, c.hidden)?
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items.iter().rev() {
            out.push(if item.logits {
                let at = logits.len() - c.vocab_size;
                Some(logits.split_off(at))
            } else {
                None
            });
        }
        out.reverse();
        Ok(out)
    }

    /// Self-attention of every row in the batch: the rows' keys and values
    /// go into their sequences' caches first, then each query row attends
    /// over its own sequence's positions up to and including its own.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        li: usize,
        h: &[f32],
        rows: &[Row],
        ropes: &[Ropes],
        pool: &mut KvPool,
        tables: &[&BlockTable],
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = rows.len();
        let hd = c.head_dim;
        let q_dim = c.heads * hd;
        let kv_dim = c.kv_heads * hd;
        let [mut q, mut k, mut v] = matmul_many([&layer.wq, &layer.wk, &layer.wv], h, n)?;
        for (t, b) in [
            (&mut q, &layer.bq),
            (&mut k, &layer.bk),
            (&mut v, &layer.bv),
        ] {
            if let Some(b) = b {
                for row in t.chunks_exact_mut(b.len()) {
                    add_in_place(row, b);
                }
            }
        }
        if let Some(w) = &layer.q_norm {
            q = rms_norm_rows(&q, w, c.rms_eps);
        }
        if let Some(w) = &layer.k_norm {
            k = rms_norm_rows(&k, w, c.rms_eps);
        }
        let local = c.is_local_layer(li);
        let window = if local { c.sliding_window } else { None };
        for (r, row) in rows.iter().enumerate() {
            let rope = ropes[row.item].get(local);
            for head in q[r * q_dim..(r + 1) * q_dim].chunks_exact_mut(hd) {
                rope.rotate(head, row.index);
            }
            for head in k[r * kv_dim..(r + 1) * kv_dim].chunks_exact_mut(hd) {
                rope.rotate(head, row.index);
            }
            let at = r * kv_dim..(r + 1) * kv_dim;
            pool.write(tables[row.item], li, row.pos, &k[at.clone()], &v[at]);
        }
        let pool: &KvPool = pool;
        // Per item: its key rows and value rows of this layer, block by block.
        type Blocks<'p> = Vec<&'p [f16]>;
        let views: Vec<(Blocks<'_>, Blocks<'_>)> = tables
            .iter()
            .map(|t| (pool.layer_view(t, li, false), pool.layer_view(t, li, true)))
            .collect();

        let group = c.heads / c.kv_heads;
        // Gemma scales the query before the product, the others scale the
        // scores after it (llama.cpp's order, which matters after rounding).
        let (pre, post) = if c.architecture == Architecture::Gemma3 {
            (c.attn_scale, 1.0)
        } else {
            (1.0, c.attn_scale)
        };
        let fast = lanes::fma_available();
        // A task takes one row's query heads of one KV head (they read the
        // same keys and values, so the loops share each load among them),
        // unless that leaves too few tasks to share out (a decode step of a
        // few sequences): then one head each.
        let per_task = if n * c.kv_heads >= 4 * rayon::current_num_threads() {
            group
        } else {
            1
        };
        let tasks_per_row = c.heads / per_task;
        let mut out = vec![0f32; n * q_dim];
        // Rows of `out` are disjoint.
        out.par_chunks_mut(per_task * hd)
            .enumerate()
            .for_each(|(task, o)| {
                let (r, head) = (task / tasks_per_row, (task % tasks_per_row) * per_task);
                let row = &rows[r];
                let (keys, values) = &views[row.item];
                let at = r * q_dim + head * hd;
                let heads = HeadAttention {
                    q: &q[at..at + per_task * hd],
                    hd,
                    keys,
                    values,
                    kv_dim,
                    kv_offset: (head / group) * hd,
                    first: window.map_or(0, |w| (row.pos + 1).saturating_sub(w)),
                    pos: row.pos,
                    pre,
                    post,
                };
                if fast {
                    // SAFETY: fma_available() checked the CPU features.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        heads.run_fma(o)
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    heads.run(o, false)
                } else {
                    heads.run(o, false)
                }
            });
        Ok(out)
    }
}

/// One row of a batched forward pass: token `index` of batch item `item`,
/// at position `pos` of its sequence.
struct Row {
    item: usize,
    index: usize,
    pos: usize,
}

/// Rotary tables of one batch item: the model's, and the local layers' own
/// (Gemma's sliding-window layers use another base).
struct Ropes {
    global: RopeTable,
    local: Option<RopeTable>,
}

impl Ropes {
    fn get(&self, local_layer: bool) -> &RopeTable {
        match (&self.local, local_layer) {
            (Some(r), true) => r,
            _ => &self.global,
        }
    }
}

/// The query heads of one row that share a KV head, attending over cached
/// positions `first..=pos`, in llama.cpp's float order (attention without
/// flash attention: f16 K/V cache, f16-rounded query and softmax weights).
struct HeadAttention<'a> {
    /// The heads' queries one after another, `hd` values each.
    q: &'a [f32],
    hd: usize,
    /// The sequence's keys and values of this layer, block by block
    /// (layout: [`crate::model::kv::KvPool::layer_view`]).
    keys: &'a [&'a [f16]],
    values: &'a [&'a [f16]],
    kv_dim: usize,
    /// Offset of the KV head within a cached row.
    kv_offset: usize,
    first: usize,
    pos: usize,
    /// Scale applied to the query before the product / to the scores after it.
    pre: f32,
    post: f32,
}

impl<'a> HeadAttention<'a> {
    /// The same arithmetic compiled with FMA and F16C instructions (the
    /// portable build calls libm's `fmaf` for every fused multiply-add);
    /// results are identical bits.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_fma(&self, out: &mut [f32]) {
        self.run(out, true)
    }

    /// `out`: each head's output, `hd` values, one after another. `simd`:
    /// use the AVX2 loops (only [`Self::run_fma`] sets it, after its caller
    /// checked the CPU).
    #[inline(always)]
    fn run(&self, out: &mut [f32], simd: bool) {
        let heads = self.q.len() / self.hd.max(1);
        let cells = self.pos + 1 - self.first;
        // The queries scaled and rounded to f16 as the softmax weights are.
        let mut qh = self.q.to_vec();
        head_ops::weights(simd, &mut qh, self.pre);
        let mut scores = vec![0f32; heads * cells];
        head_ops::key_dots(simd, &qh, self, &mut scores);
        for s in scores.chunks_exact_mut(cells) {
            self.softmax(s, simd);
        }
        // V·P as ggml_vec_dot_f16 over the cache cells (cell = position
        // here) with the weights rounded to f16: for each output dimension,
        // four 16-lane accumulators taking 64 cells per step, so cell p adds
        // into lane p % 64; the cache keeps values transposed, so a
        // dimension's cells are contiguous.
        head_ops::values(simd, self, heads, &scores, out);
    }

    /// One head's scores over the cells, turned into its softmax weights
    /// rounded to f16.
    #[inline(always)]
    fn softmax(&self, scores: &mut [f32], simd: bool) {
        let mut max = f32::NEG_INFINITY;
        for s in scores.iter_mut() {
            *s *= self.post;
            max = max.max(*s);
        }
        // ggml_vec_soft_max_f32: exp in 16-wide chunks of cache cells (cell =
        // position here), each chunk folded in f32 and added in f64; masked
        // cells are exact zeros.
        let mut sum = 0f64;
        let mut chunk = [0f32; 16];
        let mut current = self.first / 16;
        head_ops::exp(simd, scores, max);
        for (j, p) in (self.first..=self.pos).enumerate() {
            if p / 16 != current {
                sum += f64::from(lanes::hsum16(&chunk));
                chunk = [0f32; 16];
                current = p / 16;
            }
            chunk[p % 16] = scores[j];
        }
        sum += f64::from(lanes::hsum16(&chunk));
        let inv = (1.0 / sum) as f32;
        head_ops::weights(simd, scores, inv);
    }
}

/// The attention loops of [`HeadAttention::run`], AVX2 or portable (the
/// same bits either way).
mod head_ops {
    use super::HeadAttention;
    use crate::kernels::attention;

    /// Each query head's scores (`out`, one head after another) with the
    /// cached keys of cells `head.first..`.
    #[inline(always)]
    pub(super) fn key_dots(simd: bool, xs: &[f32], head: &HeadAttention<'_>, out: &mut [f32]) {
        let (keys, kv_dim, kv_offset, first) = (head.keys, head.kv_dim, head.kv_offset, head.first);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is set only under `run_fma`, whose caller
            // checked that the CPU has AVX2, FMA and F16C.
            return unsafe {
                attention::avx2::group_key_dots(xs, head.hd, keys, kv_dim, kv_offset, first, out)
            };
        }
        let _ = simd;
        attention::group_key_dots(xs, head.hd, keys, kv_dim, kv_offset, first, out)
    }

    #[inline(always)]
    pub(super) fn exp(simd: bool, v: &mut [f32], max: f32) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: as in `key_dots`.
            return unsafe { attention::avx2::exp_shifted(v, max) };
        }
        let _ = simd;
        attention::exp_shifted(v, max)
    }

    #[inline(always)]
    pub(super) fn weights(simd: bool, v: &mut [f32], scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: as in `key_dots`.
            return unsafe { attention::avx2::round_weights(v, scale) };
        }
        let _ = simd;
        attention::round_weights(v, scale)
    }

    /// Each query head's output (`out`, one head after another) from its
    /// weights `w` over the cached values of cells `head.first..`.
    #[inline(always)]
    pub(super) fn values(
        simd: bool,
        head: &HeadAttention<'_>,
        heads: usize,
        w: &[f32],
        out: &mut [f32],
    ) {
        let (values, offset, first) = (head.values, head.kv_offset, head.first);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: as in `key_dots`.
            return unsafe {
                attention::avx2::group_weighted_values(values, offset, first, heads, w, out)
            };
        }
        let _ = simd;
        attention::group_weighted_values(values, offset, first, heads, w, out)
    }
}

/// cos/sin of the rotary angles for `n` consecutive positions.
struct RopeTable {
    style: RopeStyle,
    dims: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn new(c: &Config, base: f32, scale: f32, start: usize, n: usize) -> RopeTable {
        let half = c.rope_dims / 2;
        let theta_scale = base.powf(-2.0 / c.rope_dims as f32);
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for i in 0..n {
            let mut theta = (start + i) as f32;
            for _ in 0..half {
                let t = theta * scale;
                cos.push(t.cos());
                sin.push(t.sin());
                theta *= theta_scale;
            }
        }
        RopeTable {
            style: c.rope_style,
            dims: c.rope_dims,
            cos,
            sin,
        }
    }

    /// Rotates one head of row `row`: [`Self::apply`], compiled with FMA
    /// instructions where the CPU has them (the portable build calls libm's
    /// `fmaf` for each fused multiply-add); the same bits either way.
    fn rotate(&self, head: &mut [f32], row: usize) {
        #[cfg(target_arch = "x86_64")]
        if lanes::fma_available() {
            // SAFETY: fma_available() checked the CPU features.
            return unsafe { self.apply_fma(head, row) };
        }
        self.apply(head, row)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_fma(&self, head: &mut [f32], row: usize) {
        self.apply(head, row)
    }

    #[inline(always)]
    fn apply(&self, head: &mut [f32], row: usize) {
        let half = self.dims / 2;
        let cos = &self.cos[row * half..(row + 1) * half];
        let sin = &self.sin[row * half..(row + 1) * half];
        for i in 0..half {
            let (a, b) = match self.style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            // ggml's rotate_pairs as GCC contracts it (-ffp-contract=fast):
            // the first product of each line fused with the rounded second.
            head[a] = x0.mul_add(cos[i], -(x1 * sin[i]));
            head[b] = x0.mul_add(sin[i], x1 * cos[i]);
        }
    }
}

/// Products of matrices that share their input, in one parallel job.
fn matmul_many<const K: usize>(ws: [&QMatrix; K], x: &[f32], rows: usize) -> Result<[Vec<f32>; K]> {
    let ys = QMatrix::matmul_many(&ws, x, rows)?;
    ys.try_into()
        .map_err(|_| EngineError::InvalidRequest("matmul lost a result".into()))
}

fn matmul(w: &QMatrix, x: &[f32], rows: usize, _cols: usize) -> Result<Vec<f32>> {
    w.matmul(x, rows)
}

/// RMS-normalises each `w.len()`-wide row of `x` and scales it by `w`; a
/// prompt's rows in parallel (each row's arithmetic is its own, so the bits
/// do not depend on how they are shared out).
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    /// Fewer rows than this (decode steps) are not worth a parallel job.
    const PARALLEL_ROWS: usize = 64;
    let d = w.len();
    if d == 0 {
        return Vec::new();
    }
    let mut out = vec![0f32; x.len() / d * d];
    let norm = |(out, row): (&mut [f32], &[f32])| {
        // Squares in f32, summed in f64, as ggml does.
        let ss: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
        let scale = 1.0 / ((ss / d as f64) as f32 + eps).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
            *o = v * scale * g;
        }
    };
    if out.len() / d >= PARALLEL_ROWS {
        out.par_chunks_mut(d)
            .zip(x.par_chunks_exact(d))
            .for_each(norm);
    } else {
        out.chunks_mut(d).zip(x.chunks_exact(d)).for_each(norm);
    }
    out
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// `gate ← act(gate) · up`, in parallel chunks.
fn gated_activation(activation: Activation, gate: &mut [f32], up: &[f32]) {
    const CHUNK: usize = 4096;
    let fast = lanes::fma_available();
    gate.par_chunks_mut(CHUNK)
        .zip(up.par_chunks(CHUNK))
        .for_each(|(g, u)| match activation {
            Activation::Silu if fast => {
                // SAFETY: fma_available() checked the CPU features.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    swiglu_fma(g, u)
                }
                #[cfg(not(target_arch = "x86_64"))]
                swiglu(g, u)
            }
            Activation::Silu => swiglu(g, u),
            Activation::GeluTanh => geglu(g, u),
        });
}

/// `gate ← gelu_tanh(gate) · up`, the GELU table read for a run of
/// values at a time: `half`'s slice conversions round and widen the whole
/// run with one CPU check (F16C where there is one, as the value-by-value
/// conversion does), so the bits are those of one value at a time.
fn geglu(gate: &mut [f32], up: &[f32]) {
    use half::slice::HalfFloatSliceExt;
    const RUN: usize = 256;
    let table = gelu_table();
    let mut h = [f16::ZERO; RUN];
    let mut y = [0f32; RUN];
    for (g, u) in gate.chunks_mut(RUN).zip(up.chunks(RUN)) {
        let (h, y) = (&mut h[..g.len()], &mut y[..g.len()]);
        h.convert_from_f32_slice(g);
        for x in h.iter_mut() {
            *x = table[usize::from(x.to_bits())];
        }
        h.convert_to_f32_slice(y);
        for ((g, &y), &u) in g.iter_mut().zip(y.iter()).zip(u) {
            *g = gelu_clamped(*g, y) * u;
        }
    }
}

#[inline(always)]
fn swiglu(gate: &mut [f32], up: &[f32]) {
    gate.iter_mut().zip(up).for_each(|(g, u)| *g = silu(*g) * u);
}

/// [`swiglu`] compiled with FMA instructions (identical results).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_fma(gate: &mut [f32], up: &[f32]) {
    swiglu(gate, up)
}

/// SiLU as ggml's SwiGLU computes it (`ggml_v_silu`).
#[inline(always)]
fn silu(x: f32) -> f32 {
    lanes::silu(x)
}

/// `ggml_gelu_f32`, `0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²)))`, as GCC
/// compiles it for llama.cpp's table (`-ffp-contract=fast` with FMA): the
/// inner `1 + (0.044715·x)·x` becomes one fused multiply-add, the rest stays
/// rounded product by product.
fn gelu_tanh_exact(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (0.044_715 * x).mul_add(x, 1.0)).tanh())
}

/// GELU (tanh form) through a table indexed by the input rounded to `f16`,
/// holding `f16` results — llama.cpp's CPU definition, which our logits track.
/// The fused multiply-add in [`gelu_tanh_exact`] matters: without it one
/// entry (x = -1.999) comes out one `f16` step away from llama.cpp's, enough
/// to move a Gemma logit by 0.07 when a prompt hits it. One value at a time;
/// the forward pass runs [`geglu`], whose bits the tests hold to this.
#[cfg(test)]
fn gelu_tanh(x: f32) -> f32 {
    gelu_clamped(
        x,
        gelu_table()[usize::from(f16::from_f32(x).to_bits())].to_f32(),
    )
}

/// GELU of `x` given the table's entry for it: the table covers
/// `-10 < x < 10`; below, 0; above, `x` itself.
#[inline(always)]
fn gelu_clamped(x: f32, from_table: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        from_table
    }
}

/// [`gelu_tanh_exact`] of every `f16`, rounded to `f16`, indexed by its bits.
fn gelu_table() -> &'static [f16] {
    static TABLE: std::sync::OnceLock<Vec<f16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu_tanh_exact(f16::from_bits(bits).to_f32())))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let out = rms_norm_rows(&[2.0, 2.0, 2.0, 2.0], &[1.0, 2.0, 3.0, 4.0], 0.0);
        for (o, e) in out.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!((o - e).abs() < 1e-6);
        }
    }

    #[test]
    fn geglu_gives_the_bits_of_one_value_at_a_time() {
        let mut x: Vec<f32> = (0..3000).map(|i| (i as f32 - 1500.0) * 0.0083).collect();
        x.extend([
            -10.0,
            10.0,
            -10.001,
            9.999,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e-40,
            65504.0,
            70000.0,
        ]);
        let up: Vec<f32> = (0..x.len())
            .map(|i| ((i % 7) as f32 - 3.0) * 0.37)
            .collect();
        let mut g = x.clone();
        geglu(&mut g, &up);
        for ((x, u), g) in x.iter().zip(&up).zip(&g) {
            let one = gelu_tanh(*x) * u;
            assert!(
                one.to_bits() == g.to_bits() || (one.is_nan() && g.is_nan()),
                "x {x}: {one} against {g}"
            );
        }
    }

    #[test]
    fn gelu_and_silu_known_values() {
        assert!((gelu_tanh_exact(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-3);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert_eq!(gelu_tanh(0.0), 0.0);
    }
}
