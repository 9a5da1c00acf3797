//! Tool calls in prompts and in generated text.
//!
//! Kiln's tool-call form is the one Qwen and Hermes models are trained on,
//! and the form [`crate::constrain::Grammar::tool_calls`] enforces:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Oslo"}}
//! </tool_call>
//! ```
//!
//! A model whose chat template renders tools itself (its template reads a
//! `tools` variable) gets the tools and the earlier calls through its
//! template. Any other model — SmolLM2's ChatML, Gemma's built-in turns —
//! gets the built-in form: [`fold_tools`] writes the tools and the calling
//! convention into the system message, an assistant's earlier calls into its
//! text as `<tool_call>` blocks, and tool results into a user turn as
//! `<tool_response>` blocks.

use serde_json::Value;

use crate::constrain::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};
use crate::template::ChatMessage;

/// A function offered to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub parameters: Option<Value>,
}

impl ToolSpec {
    /// The OpenAI form, `{"type": "function", "function": {...}}`, as
    /// templates expect it.
    pub fn to_openai(&self) -> Value {
        let mut f = serde_json::Map::new();
        f.insert("name".into(), Value::String(self.name.clone()));
        if let Some(d) = &self.description {
            f.insert("description".into(), Value::String(d.clone()));
        }
        if let Some(p) = &self.parameters {
            f.insert("parameters".into(), p.clone());
        }
        serde_json::json!({"type": "function", "function": Value::Object(f)})
    }
}

/// A call the assistant made, as it comes back in a later request's history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

impl ToolCall {
    /// The call as the model writes it.
    pub fn render(&self) -> String {
        let arguments = serde_json::from_str::<Value>(&self.arguments)
            .unwrap_or_else(|_| Value::String(self.arguments.clone()));
        let body = serde_json::json!({"name": self.name, "arguments": arguments});
        format!("{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}")
    }
}

/// The system text that offers `tools` in the built-in form.
pub fn tools_prompt(tools: &[ToolSpec]) -> String {
    let mut out = String::from(
        "You can call functions to answer. The functions, one per line, as JSON:\n<tools>\n",
    );
    for t in tools {
        out.push_str(&t.to_openai()["function"].to_string());
        out.push('\n');
    }
    out.push_str(
        "</tools>\nTo call a function, answer with only this, once per call:\n\
         <tool_call>\n{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}\n</tool_call>\n\
         The results come back inside <tool_response></tool_response>. \
         When you need no function, answer normally.",
    );
    out
}

/// Messages for a template without tool support: tools offered in the
/// system message, earlier calls written into the assistant's text, tool
/// results as user turns. Without tools and tool messages, `messages` as
/// they are.
pub fn fold_tools(messages: &[ChatMessage], tools: &[ToolSpec]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        out.push(ChatMessage::new("system", tools_prompt(tools)));
    }
    for m in messages {
        match m.role.as_str() {
            "system" if out.len() == 1 && !tools.is_empty() => {
                // The caller's system message first, then the tools.
                let tools_text = std::mem::take(&mut out[0].content);
                out[0].content = format!("{}\n\n{tools_text}", m.content);
            }
            "assistant" if !m.tool_calls.is_empty() => {
                let mut text = m.content.clone();
                for call in &m.tool_calls {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&call.render());
                }
                out.push(ChatMessage::new("assistant", text));
            }
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out.last_mut() {
                    // Results of parallel calls share one turn.
                    Some(last)
                        if last.role == "user" && last.content.ends_with("</tool_response>") =>
                    {
                        last.content.push('\n');
                        last.content.push_str(&block);
                    }
                    _ => out.push(ChatMessage::new("user", block)),
                }
            }
            _ => out.push(ChatMessage::new(m.role.clone(), m.content.clone())),
        }
    }
    out
}

/// A piece of generated text, split into prose and calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Call { name: String, arguments: String },
}

/// Splits generated text into prose and tool calls as it arrives. Text that
/// might be the start of `<tool_call>` is held back until it is known; a
/// call is released when its closing tag arrives. A call that does not parse
/// is released as text.
#[derive(Debug, Default)]
pub struct ToolCallParser {
    /// Text not released yet: a possible opening tag, or a call in progress.
    pending: String,
    in_call: bool,
    /// A call just ended: whitespace now is held, not prose yet.
    after_call: bool,
}

impl ToolCallParser {
    pub fn new() -> ToolCallParser {
        ToolCallParser::default()
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.pending.find(TOOL_CALL_CLOSE) else {
                    return out;
                };
                let body: String = self.pending[..end].to_string();
                self.pending.drain(..end + TOOL_CALL_CLOSE.len());
                self.in_call = false;
                out.push(parse_call(&body).unwrap_or_else(|| {
                    Piece::Text(format!("{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"))
                }));
                self.after_call = true;
                continue;
            }
            if self.after_call {
                // Whitespace between calls (or after the last) is not prose.
                let ws = self.pending.len() - self.pending.trim_start().len();
                let next = &self.pending[ws..];
                if next.starts_with(TOOL_CALL_OPEN) {
                    self.pending.drain(..ws);
                } else if TOOL_CALL_OPEN.starts_with(next) {
                    return out;
                } else {
                    self.after_call = false;
                }
            }
            match self.pending.find(TOOL_CALL_OPEN) {
                Some(start) => {
                    if start > 0 {
                        out.push(Piece::Text(self.pending[..start].to_string()));
                    }
                    self.pending.drain(..start + TOOL_CALL_OPEN.len());
                    self.in_call = true;
                }
                None => {
                    // Keep back a tail that may still become the opening tag.
                    let keep = partial_suffix(&self.pending, TOOL_CALL_OPEN);
                    let release = self.pending.len() - keep;
                    if release > 0 {
                        out.push(Piece::Text(self.pending[..release].to_string()));
                        self.pending.drain(..release);
                    }
                    return out;
                }
            }
        }
    }

    /// The end of the text: whatever is held back, as text (an unfinished
    /// call included, tag and all).
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut rest = std::mem::take(&mut self.pending);
        if std::mem::take(&mut self.after_call) && rest.trim().is_empty() {
            rest.clear();
        }
        let rest = if std::mem::take(&mut self.in_call) {
            format!("{TOOL_CALL_OPEN}{rest}")
        } else {
            rest
        };
        if rest.is_empty() {
            Vec::new()
        } else {
            vec![Piece::Text(rest)]
        }
    }
}

/// Splits a whole generated text (see [`ToolCallParser`]).
pub fn parse_output(text: &str) -> Vec<Piece> {
    let mut p = ToolCallParser::new();
    let mut out = p.push(text);
    out.extend(p.finish());
    out
}

/// The length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

/// `{"name": ..., "arguments": ...}` (or `parameters`); arguments given as a
/// JSON string are taken as that string.
fn parse_call(body: &str) -> Option<Piece> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some(Piece::Call { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_then_calls_in_any_split() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": [1, \"<\"]}}\n</tool_call>\n<tool_call>{\"name\":\"g\",\"arguments\":\"{}\"}</tool_call>";
        let whole = parse_output(text);
        assert_eq!(
            whole,
            vec![
                Piece::Text("Let me look.\n".into()),
                Piece::Call {
                    name: "f".into(),
                    arguments: "{\"x\":[1,\"<\"]}".into()
                },
                Piece::Call {
                    name: "g".into(),
                    arguments: "{}".into()
                },
            ]
        );
        // Fed a character at a time, the same pieces come out (text merged).
        let mut p = ToolCallParser::new();
        let mut pieces = Vec::new();
        for c in text.chars() {
            pieces.extend(p.push(&c.to_string()));
        }
        pieces.extend(p.finish());
        let mut merged: Vec<Piece> = Vec::new();
        for piece in pieces {
            match (merged.last_mut(), piece) {
                (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (_, piece) => merged.push(piece),
            }
        }
        assert_eq!(merged, whole);
    }

    #[test]
    fn broken_or_unfinished_calls_stay_text() {
        assert_eq!(
            parse_output("a <tool_ b"),
            vec![Piece::Text("a <tool_ b".into())]
        );
        assert_eq!(
            parse_output("<tool_call>{oops}</tool_call>"),
            vec![Piece::Text("<tool_call>{oops}</tool_call>".into())]
        );
        assert_eq!(
            parse_output("x<tool_call>{\"name\""),
            vec![
                Piece::Text("x".into()),
                Piece::Text("<tool_call>{\"name\"".into())
            ]
        );
    }

    #[test]
    fn history_is_folded_for_templates_without_tools() {
        let tools = [ToolSpec {
            name: "now".into(),
            description: Some("The time".into()),
            parameters: None,
        }];
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls.push(ToolCall {
            id: "call_1".into(),
            name: "now".into(),
            arguments: "{}".into(),
        });
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Time?"),
            call,
            ChatMessage::new("tool", "12:00"),
            ChatMessage::new("tool", "UTC"),
        ];
        let folded = fold_tools(&msgs, &tools);
        let roles: Vec<&str> = folded.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(
            folded[0].content.starts_with("Be brief.\n\n") && folded[0].content.contains("\"now\"")
        );
        assert_eq!(
            folded[2].content,
            "<tool_call>\n{\"name\":\"now\",\"arguments\":{}}\n</tool_call>"
        );
        assert_eq!(
            folded[3].content,
            "<tool_response>\n12:00\n</tool_response>\n<tool_response>\nUTC\n</tool_response>"
        );
    }
}
