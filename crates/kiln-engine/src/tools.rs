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
use crate::engine::longest_suffix_prefix;
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
    /// A call begins; its name is known.
    CallStart {
        name: String,
    },
    /// More of the current call's arguments, as JSON text.
    Arguments(String),
}

/// Where a call in progress stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// Reading `{"name": "…", "arguments": ` (nothing released yet).
    Header,
    /// Releasing the arguments' JSON as it comes.
    Arguments(Scan),
    /// The arguments ended; waiting for the closing tag.
    Tail,
    /// The call is not laid out as usual: it is read whole at its closing
    /// tag.
    Whole,
}

/// Where a JSON value being read stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Scan {
    started: bool,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// A number or literal (no brackets, no quotes).
    bare: bool,
}

impl Scan {
    /// Takes `c`; `Some(true)` when it was the value's last character,
    /// `Some(false)` when the value goes on, `None` when `c` is not part of
    /// it (it ended just before).
    fn take(&mut self, c: char) -> Option<bool> {
        if !self.started {
            if c.is_whitespace() {
                return Some(false);
            }
            self.started = true;
            match c {
                '{' | '[' => self.depth = 1,
                '"' => self.in_string = true,
                _ => self.bare = true,
            }
            return Some(false);
        }
        if self.bare {
            return if c.is_alphanumeric() || matches!(c, '.' | '-' | '+') {
                Some(false)
            } else {
                None
            };
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if c == '\\' {
                self.escaped = true;
            } else if c == '"' {
                self.in_string = false;
                return Some(self.depth == 0);
            }
            return Some(false);
        }
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' => {
                self.depth = self.depth.saturating_sub(1);
                return Some(self.depth == 0);
            }
            _ => {}
        }
        Some(false)
    }
}

/// Splits generated text into prose and tool calls as it arrives.
///
/// Text that might be the start of `<tool_call>` is held back until it is
/// known. A call laid out as `{"name": …, "arguments": …}` is released as it
/// comes: its name once known, then its arguments piece by piece. A call laid
/// out otherwise is released whole at its closing tag, and one that does not
/// parse then is released as text.
#[derive(Debug, Default)]
pub struct ToolCallParser {
    /// Text not released yet: a possible opening tag, or a call's unread part.
    pending: String,
    call: Option<Call>,
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
            if let Some(state) = self.call {
                if !self.step_call(state, &mut out) {
                    return out;
                }
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
                    self.call = Some(Call::Header);
                }
                None => {
                    // Keep back a tail that may still become the opening tag
                    // (ASCII, so the cut falls between characters).
                    let keep =
                        longest_suffix_prefix(self.pending.as_bytes(), TOOL_CALL_OPEN.as_bytes());
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

    /// Moves the call in progress on; false when it needs more text.
    fn step_call(&mut self, state: Call, out: &mut Vec<Piece>) -> bool {
        match state {
            Call::Header => match header(&self.pending) {
                Header::Incomplete => false,
                Header::Other => {
                    self.call = Some(Call::Whole);
                    true
                }
                Header::Done { name, len } => {
                    out.push(Piece::CallStart { name });
                    self.pending.drain(..len);
                    self.call = Some(Call::Arguments(Scan::default()));
                    true
                }
            },
            Call::Arguments(mut scan) => {
                // Whitespace before the value is not part of it.
                let (mut lead, mut used, mut ended) = (0, 0, false);
                for (i, c) in self.pending.char_indices() {
                    let started = scan.started;
                    match scan.take(c) {
                        Some(last) => {
                            used = i + c.len_utf8();
                            if !started && !scan.started {
                                lead = used;
                            }
                            if last {
                                ended = true;
                                break;
                            }
                        }
                        None => {
                            ended = true;
                            break;
                        }
                    }
                }
                let taken = self.pending[lead..used].to_string();
                self.pending.drain(..used);
                if !taken.is_empty() {
                    out.push(Piece::Arguments(taken));
                }
                self.call = Some(if ended {
                    Call::Tail
                } else {
                    Call::Arguments(scan)
                });
                ended
            }
            Call::Tail | Call::Whole => {
                let Some(end) = self.pending.find(TOOL_CALL_CLOSE) else {
                    return false;
                };
                let body: String = self.pending[..end].to_string();
                self.pending.drain(..end + TOOL_CALL_CLOSE.len());
                if state == Call::Whole {
                    match parse_call(&body) {
                        Some((name, arguments)) => {
                            out.push(Piece::CallStart { name });
                            out.push(Piece::Arguments(arguments));
                        }
                        None => out.push(Piece::Text(format!(
                            "{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"
                        ))),
                    }
                }
                self.call = None;
                self.after_call = true;
                true
            }
        }
    }

    /// The end of the text: whatever is held back. Prose and an unfinished
    /// call's unreleased text come out as text (the call's tag included when
    /// nothing of it was released).
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut rest = std::mem::take(&mut self.pending);
        if std::mem::take(&mut self.after_call) && rest.trim().is_empty() {
            rest.clear();
        }
        let rest = match self.call.take() {
            Some(Call::Header | Call::Whole) => format!("{TOOL_CALL_OPEN}{rest}"),
            Some(Call::Arguments(_)) if !rest.is_empty() => {
                return vec![Piece::Arguments(rest)];
            }
            // What is left of a call whose arguments were released is its tail.
            Some(_) => String::new(),
            None => rest,
        };
        if rest.is_empty() {
            Vec::new()
        } else {
            vec![Piece::Text(rest)]
        }
    }
}

enum Header {
    Incomplete,
    /// Not `{"name": "…", "arguments": `.
    Other,
    /// The name, and the header's length in bytes.
    Done {
        name: String,
        len: usize,
    },
}

/// Reads `{"name": "<name>", "arguments": ` (any whitespace) off `text`.
fn header(text: &str) -> Header {
    let mut at = 0;
    let skip_ws = |at: &mut usize| {
        *at += text[*at..].len() - text[*at..].trim_start().len();
    };
    let expect = |at: &mut usize, lit: &str| -> Option<bool> {
        skip_ws(at);
        let rest = &text[*at..];
        if rest.starts_with(lit) {
            *at += lit.len();
            Some(true)
        } else if lit.starts_with(rest) {
            None
        } else {
            Some(false)
        }
    };
    for lit in ["{", "\"name\"", ":"] {
        match expect(&mut at, lit) {
            None => return Header::Incomplete,
            Some(false) => return Header::Other,
            Some(true) => {}
        }
    }
    skip_ws(&mut at);
    let rest = &text[at..];
    if rest.is_empty() {
        return Header::Incomplete;
    }
    if !rest.starts_with('"') {
        return Header::Other;
    }
    let mut scan = Scan::default();
    let mut end = None;
    for (i, c) in rest.char_indices() {
        if scan.take(c) == Some(true) {
            end = Some(i + 1);
            break;
        }
    }
    let Some(end) = end else {
        return Header::Incomplete;
    };
    let Ok(name) = serde_json::from_str::<String>(&rest[..end]) else {
        return Header::Other;
    };
    at += end;
    for lit in [",", "\"arguments\"", ":"] {
        match expect(&mut at, lit) {
            None => return Header::Incomplete,
            Some(false) => return Header::Other,
            Some(true) => {}
        }
    }
    Header::Done { name, len: at }
}

/// Prose and calls `(name, arguments)` of a whole generated text (see
/// [`ToolCallParser`]).
pub fn split_output(text: &str) -> (String, Vec<(String, String)>) {
    let mut p = ToolCallParser::new();
    let mut pieces = p.push(text);
    pieces.extend(p.finish());
    let mut prose = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => prose.push_str(&t),
            Piece::CallStart { name } => calls.push((name, String::new())),
            Piece::Arguments(a) => {
                if let Some(last) = calls.last_mut() {
                    last.1.push_str(&a);
                }
            }
        }
    }
    (prose, calls)
}

/// `{"name": ..., "arguments": ...}` (or `parameters`) in any layout;
/// arguments given as a JSON string are taken as that string.
fn parse_call(body: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some((name, arguments))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect()
    }

    #[test]
    fn text_then_calls_in_any_split() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": [1, \"</tool_call>}\"]}}\n</tool_call>\n<tool_call>{\"arguments\":{},\"name\":\"g\"}</tool_call>";
        let whole = split_output(text);
        assert_eq!(
            whole,
            (
                "Let me look.\n".to_string(),
                calls(&[("f", "{\"x\": [1, \"</tool_call>}\"]}"), ("g", "{}")])
            )
        );
        // Fed a character at a time, the same comes out, and the first
        // call's arguments arrive in many pieces.
        let mut p = ToolCallParser::new();
        let mut pieces = Vec::new();
        for c in text.chars() {
            pieces.extend(p.push(&c.to_string()));
        }
        pieces.extend(p.finish());
        let args = pieces
            .iter()
            .filter(|p| matches!(p, Piece::Arguments(_)))
            .count();
        assert!(args > 10, "{pieces:?}");
        let mut prose = String::new();
        let mut got: Vec<(String, String)> = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => prose.push_str(&t),
                Piece::CallStart { name } => got.push((name, String::new())),
                Piece::Arguments(a) => got.last_mut().map_or((), |l| l.1.push_str(&a)),
            }
        }
        assert_eq!((prose, got), whole);
    }

    #[test]
    fn broken_or_unfinished_calls_stay_text() {
        assert_eq!(
            split_output("a <tool_ b"),
            ("a <tool_ b".to_string(), vec![])
        );
        assert_eq!(
            split_output("<tool_call>{oops}</tool_call>"),
            ("<tool_call>{oops}</tool_call>".to_string(), vec![])
        );
        assert_eq!(
            split_output("x<tool_call>{\"name\""),
            ("x<tool_call>{\"name\"".to_string(), vec![])
        );
        // Cut inside the arguments: the call is there with what was written.
        assert_eq!(
            split_output("<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1"),
            (String::new(), calls(&[("f", "{\"a\": 1")]))
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
