//! A loaded text-generation model: weights, tokenizer, chat template and the
//! facts about it that the rest of Kiln needs ([`ModelInfo`]).
//!
//! The forward pass lives in [`transformer`]; one implementation covers the
//! llama, gemma3, qwen2 and qwen3 architectures, which differ only in the
//! switches collected in [`transformer::Config`].

pub mod kv;
pub mod transformer;

use std::path::Path;

use crate::error::{EngineError, Result};
use crate::gguf::{dtype_name, GgufFile};
use crate::template::{ChatMessage, ChatTemplate, RenderedPiece, TemplateOrigin};
use crate::tokenizer::{Segment, Tokenizer};
use crate::tools::{fold_tools, ToolSpec};
use kv::KvPool;
pub use transformer::BatchItem;
use transformer::{SequenceCache, Transformer};

/// What a loaded model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The name requests use to pick this model.
    pub name: String,
    pub architecture: String,
    /// Dominant weight type by bytes, e.g. "Q4_1".
    pub quantization: String,
    pub context_length: usize,
    pub parameters: u64,
    pub file_size: u64,
}

pub struct TextModel {
    info: ModelInfo,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    transformer: Transformer,
}

impl TextModel {
    /// Loads a GGUF model and names it `name`.
    pub fn load(path: &Path, name: &str) -> Result<TextModel> {
        let mut file = GgufFile::open(path)?;
        let architecture = file.architecture()?;
        let tokenizer = Tokenizer::from_gguf(file.content())?;
        let transformer = Transformer::load(&mut file, &architecture)?;
        let piece = |id: Option<u32>| {
            id.map(|t| tokenizer.token_str(t).to_string())
                .unwrap_or_default()
        };
        let template_source = match file.value("tokenizer.chat_template") {
            Some(_) => Some(file.get_string("tokenizer.chat_template")?),
            None => None,
        };
        let template = ChatTemplate::new(
            template_source,
            &architecture,
            piece(tokenizer.bos()),
            piece(tokenizer.eos()),
        )?;
        let mut by_type: std::collections::BTreeMap<&'static str, u64> = Default::default();
        let mut parameters = 0u64;
        for t in file.content().tensor_infos.values() {
            let elems = t.shape.elem_count() as u64;
            parameters += elems;
            let bytes =
                elems / t.ggml_dtype.block_size().max(1) as u64 * t.ggml_dtype.type_size() as u64;
            *by_type.entry(dtype_name(t.ggml_dtype)).or_default() += bytes;
        }
        let quantization = by_type
            .iter()
            .max_by_key(|(_, b)| **b)
            .map(|(n, _)| n.to_string())
            .unwrap_or_default();
        let info = ModelInfo {
            name: name.to_string(),
            architecture,
            quantization,
            context_length: transformer.config().context_length,
            parameters,
            file_size: file.size(),
        };
        tracing::info!(
            model = %info.name,
            arch = %info.architecture,
            quant = %info.quantization,
            ctx = info.context_length,
            template = ?template.origin(),
            "model loaded"
        );
        Ok(TextModel {
            info,
            tokenizer,
            template,
            transformer,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn template_origin(&self) -> TemplateOrigin {
        self.template.origin()
    }

    pub fn vocab_size(&self) -> usize {
        self.transformer.config().vocab_size
    }

    /// Renders and tokenizes a chat, ending with the assistant's turn opener.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.render_prompt(messages, &[])
    }

    /// [`TextModel::chat_prompt`] with `tools` offered and tool calls and
    /// results in the history: through the template when it renders tools,
    /// else in Kiln's built-in form ([`crate::tools::fold_tools`]).
    pub fn chat_prompt_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> Result<Vec<u32>> {
        let history = messages
            .iter()
            .any(|m| m.role == "tool" || !m.tool_calls.is_empty());
        if tools.is_empty() && !history {
            return self.render_prompt(messages, &[]);
        }
        if !self.template.supports_tools() {
            return self.render_prompt(&fold_tools(messages, tools), &[]);
        }
        // The template writes these as its own text, where control tokens
        // would be real: none may spell one.
        let specs: Vec<serde_json::Value> = tools.iter().map(ToolSpec::to_openai).collect();
        for (i, spec) in specs.iter().enumerate() {
            self.refuse_control_text(&spec.to_string(), &format!("tools[{i}]"))?;
        }
        for (i, m) in messages.iter().enumerate() {
            for c in &m.tool_calls {
                let what = format!("message {i}'s tool call");
                self.refuse_control_text(&c.name, &what)?;
                self.refuse_control_text(&c.arguments, &what)?;
                self.refuse_control_text(&c.id, &what)?;
            }
            if let Some(id) = &m.tool_call_id {
                self.refuse_control_text(id, &format!("message {i}'s tool_call_id"))?;
            }
        }
        self.render_prompt(messages, &specs)
    }

    fn refuse_control_text(&self, text: &str, what: &str) -> Result<()> {
        let ids = self
            .tokenizer
            .encode_segments(&[Segment::Template(text)], false);
        match ids.iter().find(|&&id| self.tokenizer.is_control(id)) {
            Some(&id) => Err(EngineError::InvalidRequest(format!(
                "{what} contains `{}`, a control token of this model",
                self.tokenizer.token_str(id)
            ))),
            None => Ok(()),
        }
    }

    fn render_prompt(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
    ) -> Result<Vec<u32>> {
        if messages.is_empty() {
            return Err(EngineError::InvalidRequest(
                "`messages` must not be empty".into(),
            ));
        }
        let pieces = self.template.render(messages, tools, true)?;
        // A template that writes the BOS token itself must not get a second one.
        let bos_text = self
            .tokenizer
            .bos()
            .map(|b| self.tokenizer.token_str(b).to_string());
        let starts_with_bos = match (pieces.first(), &bos_text) {
            (Some(RenderedPiece::Template(s)), Some(b)) => {
                !b.is_empty() && s.starts_with(b.as_str())
            }
            _ => false,
        };
        let segments: Vec<Segment<'_>> = pieces
            .iter()
            .map(|p| match p {
                RenderedPiece::Template(s) => Segment::Template(s),
                RenderedPiece::Text(s) => Segment::Text(s),
            })
            .collect();
        let add_bos = self.tokenizer.add_bos_by_default() && !starts_with_bos;
        Ok(self.tokenizer.encode_segments(&segments, add_bos))
    }

    /// Tokenizes a raw completion prompt as llama-server and vLLM do: special
    /// tokens written in the text (`<start_of_turn>`, `<|im_end|>`) are parsed
    /// as the tokens they name, and BOS is added per the model's default
    /// unless the prompt already starts with one.
    pub fn text_prompt(&self, text: &str) -> Vec<u32> {
        let mut ids = self
            .tokenizer
            .encode_segments(&[Segment::Template(text)], false);
        let bos = self.tokenizer.bos();
        if self.tokenizer.add_bos_by_default() && ids.first().copied() != bos {
            if let Some(bos) = bos {
                ids.insert(0, bos);
            }
        }
        ids
    }

    pub fn new_sequence(&self) -> SequenceCache {
        self.transformer.new_cache()
    }

    /// An empty KV pool of at most `budget_bytes` for this model.
    pub fn new_kv_pool(&self, budget_bytes: usize) -> KvPool {
        self.transformer.new_pool(budget_bytes)
    }

    /// Bytes of KV cache one position takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.transformer.kv_bytes_per_token()
    }

    /// One forward pass over several sequences (see [`Transformer::forward_batch`]).
    pub fn forward_batch(
        &self,
        pool: &mut KvPool,
        items: &mut [BatchItem<'_>],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        self.transformer.forward_batch(pool, items)
    }

    /// Feeds `tokens` (the next positions of `seq`) and returns the logits of the last one.
    pub fn forward(&self, tokens: &[u32], seq: &mut SequenceCache) -> Result<Vec<f32>> {
        self.transformer.forward(tokens, seq)
    }
}
