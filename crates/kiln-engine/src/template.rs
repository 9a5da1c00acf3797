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
use crate::tools::ToolCall;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// Calls an assistant made (a later request's history).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a `tool` message: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// The message as a template sees it, with `content` in its place:
    /// tool calls in OpenAI's shape, arguments as an object when they parse.
    fn for_template(&self, content: String) -> Value {
        let calls: Vec<serde_json::Value> = self
            .tool_calls
            .iter()
            .map(|c| {
                let arguments = serde_json::from_str::<serde_json::Value>(&c.arguments)
                    .unwrap_or_else(|_| serde_json::Value::String(c.arguments.clone()));
                serde_json::json!({"id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": arguments}})
            })
            .collect();
        let mut m = serde_json::json!({"role": self.role, "content": content});
        if !calls.is_empty() {
            m["tool_calls"] = serde_json::Value::Array(calls);
        }
        if let Some(id) = &self.tool_call_id {
            m["tool_call_id"] = serde_json::Value::String(id.clone());
        }
        Value::from_serialize(&m)
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

    /// Whether the template renders tools itself (it reads `tools`).
    pub fn supports_tools(&self) -> bool {
        self.env
            .get_template("chat")
            .is_ok_and(|t| t.undeclared_variables(false).contains("tools"))
    }

    /// Renders `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt` is set. `tools` (OpenAI's shape) are given
    /// to a template that reads them.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<Vec<RenderedPiece>> {
        let nonce = placeholder_nonce();
        let placeholder = |i: usize| format!("\u{F8F0}{nonce}:{i}\u{F8F1}");
        let masked: Vec<Value> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| m.for_template(placeholder(i)))
            .collect();
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let tools = (!tools.is_empty()).then(|| Value::from_serialize(tools));
        let rendered = tmpl
            .render(minijinja::context! {
                messages => masked,
                tools => tools,
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
        let pieces = t.render(&msgs, &[], true).unwrap_or_default();
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
        let text = text_of(&t.render(&msgs, &[], true).unwrap_or_default());
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
        let err = t.render(&[ChatMessage::new("assistant", "x")], &[], true);
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
    fn a_template_with_tools_gets_them_and_the_calls() {
        let src = "{% if tools %}T:{{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}\n{% endfor %}".to_string();
        let Ok(t) = ChatTemplate::new(Some(src), "qwen2", String::new(), String::new()) else {
            panic!("template")
        };
        assert!(t.supports_tools());
        let Ok(plain) = ChatTemplate::new(None, "llama", String::new(), String::new()) else {
            panic!("template")
        };
        assert!(!plain.supports_tools());
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls.push(ToolCall {
            id: "c1".into(),
            name: "now".into(),
            arguments: "{\"tz\":\"UTC\"}".into(),
        });
        let mut result = ChatMessage::new("tool", "12:00");
        result.tool_call_id = Some("c1".into());
        let tools = [serde_json::json!({"type": "function", "function": {"name": "now"}})];
        let text = text_of(
            &t.render(
                &[ChatMessage::new("user", "t?"), call, result],
                &tools,
                false,
            )
            .unwrap_or_default(),
        );
        assert!(text.starts_with("T:[{"), "{text}");
        assert!(
            text.contains("assistant:[now {\"tz\":\"UTC\"}]") && text.contains("tool:12:00(c1)"),
            "{text}"
        );
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{% for m in messages %}{{ m['content'].strip() }}{% endfor %}".to_string();
        let Ok(t) = ChatTemplate::new(Some(src), "qwen2", String::new(), String::new()) else {
            panic!("template")
        };
        assert!(t
            .render(&[ChatMessage::new("user", "x")], &[], false)
            .is_ok());
    }
}
