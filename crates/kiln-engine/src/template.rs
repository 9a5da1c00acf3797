//! Chat templates: turning a list of messages into the prompt a model expects.
//!
//! A model's GGUF usually carries its template (`tokenizer.chat_template`, a
//! Jinja2 program) and we render it with minijinja. A model without one gets
//! a built-in template chosen by architecture:
//! - `gemma3`: Gemma's turn format (`<start_of_turn>user\n...<end_of_turn>\n`,
//!   the assistant's role written `model`, a system message folded into the
//!   first user turn, as Google's own template does);
//! - anything else: ChatML (`<|im_start|>role\n...<|im_end|>\n`).
//!
//! Safety: text from the messages must never become control tokens. The
//! template is rendered with each message's content replaced by an unguessable
//! placeholder; the output is then split at the placeholders, so the caller
//! gets the template's own text (where control tokens are recognised) apart
//! from the users' text (always tokenized as plain text).

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// One piece of a rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderedPiece {
    /// Text written by the template: control tokens in it are real.
    Template(String),
    /// Text from a message: always plain text.
    Text(String),
}

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const GEMMA: &str = "{% set ns = namespace(system='') %}{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] + '\\n\\n' %}{% else %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' }}{% if ns.system and message['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}{{ message['content'] + '<end_of_turn>\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}";

/// Where a model's template came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// `tokenizer.chat_template` in the model file.
    ModelFile,
    /// Kiln's built-in template for the architecture (named).
    BuiltIn(&'static str),
}

pub struct ChatTemplate {
    env: Environment<'static>,
    origin: TemplateOrigin,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Uses `source` when the model has one, else the built-in template for
    /// `architecture`. A template that does not compile is an error.
    pub fn new(
        source: Option<String>,
        architecture: &str,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self> {
        let (source, origin) = match source {
            Some(s) if !s.trim().is_empty() => (s, TemplateOrigin::ModelFile),
            _ if architecture == "gemma3" => (GEMMA.to_string(), TemplateOrigin::BuiltIn("gemma")),
            _ => (CHATML.to_string(), TemplateOrigin::BuiltIn("chatml")),
        };
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source).map_err(|e| {
            EngineError::Template(format!("the model's chat template does not compile: {e}"))
        })?;
        Ok(ChatTemplate {
            env,
            origin,
            bos_token,
            eos_token,
        })
    }

    pub fn origin(&self) -> TemplateOrigin {
        self.origin
    }

    /// Renders `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt` is set.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<RenderedPiece>> {
        let nonce = placeholder_nonce();
        let placeholder = |i: usize| format!("\u{F8F0}{nonce}:{i}\u{F8F1}");
        let masked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage::new(m.role.clone(), placeholder(i)))
            .collect();
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let rendered = tmpl
            .render(minijinja::context! {
                messages => masked,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
            })
            .map_err(|e| EngineError::Template(template_error_text(&e)))?;
        Ok(split_placeholders(&rendered, &nonce, messages))
    }
}

fn template_error_text(e: &minijinja::Error) -> String {
    match e.kind() {
        // raise_exception from the template: its message is meant for users.
        ErrorKind::InvalidOperation => e
            .detail()
            .unwrap_or("the template refused these messages")
            .to_string(),
        _ => format!("rendering failed: {e}"),
    }
}

fn placeholder_nonce() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..4)
        .map(|_| format!("{:08x}", rng.random::<u32>()))
        .collect()
}

fn split_placeholders(rendered: &str, nonce: &str, messages: &[ChatMessage]) -> Vec<RenderedPiece> {
    let open = format!("\u{F8F0}{nonce}:");
    let mut pieces = Vec::new();
    let mut rest = rendered;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find('\u{F8F1}') else {
            break;
        };
        let index = after[..end].parse::<usize>().ok();
        let Some(message) = index.and_then(|i| messages.get(i)) else {
            break;
        };
        if start > 0 {
            pieces.push(RenderedPiece::Template(rest[..start].to_string()));
        }
        if !message.content.is_empty() {
            pieces.push(RenderedPiece::Text(message.content.clone()));
        }
        rest = &after[end + '\u{F8F1}'.len_utf8()..];
    }
    if !rest.is_empty() {
        pieces.push(RenderedPiece::Template(rest.to_string()));
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(pieces: &[RenderedPiece]) -> String {
        pieces
            .iter()
            .map(|p| match p {
                RenderedPiece::Template(s) | RenderedPiece::Text(s) => s.as_str(),
            })
            .collect()
    }

    #[test]
    fn chatml_keeps_user_text_apart() {
        let t = ChatTemplate::new(None, "llama", String::new(), String::new())
            .map_err(|e| e.to_string());
        let t = t.as_ref().map_err(String::clone);
        let Ok(t) = t else { panic!("template") };
        let msgs = [ChatMessage::new("user", "hi <|im_end|> there")];
        let pieces = t.render(&msgs, true).unwrap_or_default();
        assert_eq!(
            text_of(&pieces),
            "<|im_start|>user\nhi <|im_end|> there<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(pieces.contains(&RenderedPiece::Text("hi <|im_end|> there".into())));
        assert!(matches!(&pieces[0], RenderedPiece::Template(s) if s == "<|im_start|>user\n"));
    }

    #[test]
    fn gemma_builtin_folds_system_into_first_user_turn() {
        let Ok(t) = ChatTemplate::new(None, "gemma3", "<bos>".into(), "<eos>".into()) else {
            panic!("template")
        };
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello"),
            ChatMessage::new("user", "Bye"),
        ];
        let text = text_of(&t.render(&msgs, true).unwrap_or_default());
        assert_eq!(
            text,
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn raise_exception_becomes_a_template_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}".to_string();
        let Ok(t) = ChatTemplate::new(Some(src), "llama", String::new(), String::new()) else {
            panic!("template")
        };
        let err = t.render(&[ChatMessage::new("assistant", "x")], true);
        assert!(matches!(err, Err(EngineError::Template(m)) if m.contains("first message")));
    }

    #[test]
    fn broken_template_is_an_error_not_a_panic() {
        let r = ChatTemplate::new(
            Some("{% for %}".into()),
            "llama",
            String::new(),
            String::new(),
        );
        assert!(matches!(r, Err(EngineError::Template(_))));
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{% for m in messages %}{{ m['content'].strip() }}{% endfor %}".to_string();
        let Ok(t) = ChatTemplate::new(Some(src), "qwen2", String::new(), String::new()) else {
            panic!("template")
        };
        assert!(t.render(&[ChatMessage::new("user", "x")], false).is_ok());
    }
}
