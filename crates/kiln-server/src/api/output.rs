//! What a chat request asks of the output's form: `tools` with
//! `tool_choice` and `parallel_tool_calls`, and `response_format`. Read off
//! the wire into the tools offered in the prompt and the grammar the
//! engine decodes under.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use kiln_engine::constrain::{Grammar, ToolSchema};
use kiln_engine::tools::{ToolCall, ToolSpec};
use kiln_types::openai::ChatCompletionRequest;
use serde_json::Value;

use crate::error::ApiError;

/// Most tools one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// The output rules of one chat request.
#[derive(Debug, Default)]
pub struct OutputRules {
    /// Tools to offer in the prompt.
    pub tools: Vec<ToolSpec>,
    /// The grammar the output follows, if any.
    pub grammar: Option<Arc<Grammar>>,
    /// Whether the output is split into text and tool calls.
    pub tool_calls: bool,
    /// Whether the grammar forces the whole output (JSON, a required call),
    /// where stop strings could only cut it short.
    pub forced: bool,
}

enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

pub fn output_rules(req: &ChatCompletionRequest) -> Result<OutputRules, ApiError> {
    let tools = tool_list(req.tools.as_ref())?;
    let choice = tool_choice(req.tool_choice.as_ref(), &tools)?;
    let format = response_format(req.response_format.as_ref())?;
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    let calling = !tools.is_empty() && !matches!(choice, Choice::None);
    if calling && format.is_some() {
        return Err(ApiError::invalid(
            "response_format",
            "`response_format` cannot be combined with tools the model may call; use `tool_choice: \"none\"` or leave one of them out",
        ));
    }
    if let Some(grammar) = format {
        return Ok(OutputRules {
            tools: Vec::new(),
            grammar: Some(grammar),
            tool_calls: false,
            forced: true,
        });
    }
    let (only, free_text, parallel) = match &choice {
        Choice::Auto => (None, true, parallel),
        Choice::Required => (None, false, parallel),
        Choice::Named(name) => (Some(name.as_str()), false, false),
        // `none`: the tools stay out of the prompt, so the model answers in prose.
        Choice::None => return Ok(OutputRules::default()),
    };
    if tools.is_empty() {
        return Ok(OutputRules::default());
    }
    let schemas = |only: Option<&str>| -> Vec<ToolSchema> {
        tools
            .iter()
            .filter(|(t, _)| only.is_none_or(|n| n == t.name))
            .map(|(t, strict)| ToolSchema {
                name: t.name.clone(),
                parameters: t.parameters.clone(),
                strict: *strict,
            })
            .collect()
    };
    let key = serde_json::json!(["tools", req.tools, only, free_text, parallel]).to_string();
    let grammar = cached(key, || {
        Grammar::tool_calls(&schemas(only), free_text, parallel)
            .map_err(|e| ApiError::invalid("tools", e.to_string()))
    })?;
    Ok(OutputRules {
        tools: tools.into_iter().map(|(t, _)| t).collect(),
        grammar: Some(grammar),
        tool_calls: true,
        forced: !free_text,
    })
}

/// Compiled grammars kept at most.
const GRAMMAR_CACHE: usize = 256;

/// The grammar compiled from `key`'s request fields: compiled once and shared
/// by later requests that send the same fields (an agent's tools, a client's
/// format), so they also share the token masks the engine cached for it.
/// Bounded: emptied when full.
fn cached(
    key: String,
    compile: impl FnOnce() -> Result<Grammar, ApiError>,
) -> Result<Arc<Grammar>, ApiError> {
    static GRAMMARS: OnceLock<Mutex<HashMap<String, Arc<Grammar>>>> = OnceLock::new();
    let cache = GRAMMARS.get_or_init(Default::default);
    if let Some(g) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(g.clone());
    }
    let grammar = Arc::new(compile()?);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= GRAMMAR_CACHE {
        map.clear();
    }
    Ok(map.entry(key).or_insert(grammar).clone())
}

/// `tools`: each `{"type": "function", "function": {"name", "description",
/// "parameters", "strict"}}`, with unique names.
fn tool_list(tools: Option<&Value>) -> Result<Vec<(ToolSpec, bool)>, ApiError> {
    let bad = |msg: String| ApiError::invalid("tools", msg);
    let list = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad("`tools` must be a list".into())),
    };
    if list.len() > MAX_TOOLS {
        return Err(bad(format!("at most {MAX_TOOLS} tools may be given")));
    }
    let mut out: Vec<(ToolSpec, bool)> = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(format!("tools[{i}] must have `type: \"function\"`")));
        }
        let Some(f) = tool.get("function").filter(|f| f.is_object()) else {
            return Err(bad(format!("tools[{i}] needs a `function` object")));
        };
        let name = f.get("name").and_then(Value::as_str).unwrap_or("");
        check_name(name).map_err(|m| bad(format!("tools[{i}]: {m}")))?;
        if out.iter().any(|(t, _)| t.name == name) {
            return Err(bad(format!("tools[{i}]: the name `{name}` is used twice")));
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.clone()),
            Some(_) => return Err(bad(format!("tools[{i}]: `description` must be a string"))),
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => None,
            Some(p @ Value::Object(_)) => Some(p.clone()),
            Some(_) => {
                return Err(bad(format!(
                    "tools[{i}]: `parameters` must be a JSON Schema object"
                )))
            }
        };
        let strict = f.get("strict").and_then(Value::as_bool).unwrap_or(false);
        out.push((
            ToolSpec {
                name: name.to_string(),
                description,
                parameters,
            },
            strict,
        ));
    }
    Ok(out)
}

/// Function names as OpenAI allows them: 1 to 64 of `a-z A-Z 0-9 _ -`.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the function name `{name}` must be 1 to 64 letters, digits, `_` or `-`"
        ))
    }
}

fn tool_choice(choice: Option<&Value>, tools: &[(ToolSpec, bool)]) -> Result<Choice, ApiError> {
    let bad = |msg: String| ApiError::invalid("tool_choice", msg);
    let choice = match choice {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => {
                return Err(bad(format!(
                    "`tool_choice` is `{other}`; it must be none, auto, required or a function"
                )))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad("a named `tool_choice` is `{\"type\": \"function\", \"function\": {\"name\": ...}}`".into())
                })?;
            if !tools.iter().any(|(t, _)| t.name == name) {
                return Err(bad(format!(
                    "`tool_choice` names `{name}`, which is not among the `tools`"
                )));
            }
            Choice::Named(name.to_string())
        }
    };
    if tools.is_empty() && matches!(choice, Choice::Required | Choice::Named(_)) {
        return Err(bad(
            "`tool_choice` asks for a call but no `tools` are given".into(),
        ));
    }
    Ok(choice)
}

/// `response_format`: `text`, `json_object`, or `json_schema` with
/// `{"name", "schema", "strict"}`.
fn response_format(format: Option<&Value>) -> Result<Option<Arc<Grammar>>, ApiError> {
    let bad = |msg: String| ApiError::invalid("response_format", msg);
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => {
            cached("json_object".into(), || Ok(Grammar::json_object())).map(Some)
        }
        Some("json_schema") => {
            let Some(spec) = format.get("json_schema").filter(|s| s.is_object()) else {
                return Err(bad(
                    "`json_schema` needs a `json_schema` object with a `schema`".into(),
                ));
            };
            let schema = spec
                .get("schema")
                .cloned()
                .unwrap_or(Value::Object(Default::default()));
            let strict = spec.get("strict").and_then(Value::as_bool).unwrap_or(false);
            let key = serde_json::json!(["json_schema", schema, strict]).to_string();
            let grammar = cached(key, || {
                Grammar::json_schema(&schema, strict).map_err(|e| bad(e.to_string()))
            })?;
            let loose: Vec<&str> = grammar.unenforced().collect();
            if !loose.is_empty() {
                tracing::debug!(keywords = ?loose, "response_format keywords left unenforced");
            }
            Ok(Some(grammar))
        }
        _ => Err(bad(
            "`response_format.type` must be text, json_object or json_schema".into(),
        )),
    }
}

/// An assistant message's `tool_calls` from the wire.
pub fn history_calls(i: usize, calls: Option<&Value>) -> Result<Vec<ToolCall>, ApiError> {
    let bad = |msg: String| ApiError::invalid("messages", format!("message {i}: {msg}"));
    let list = match calls {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad("`tool_calls` must be a list".into())),
    };
    list.iter()
        .enumerate()
        .map(|(j, c)| {
            let f = c.get("function");
            let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
            let Some(name) = name else {
                return Err(bad(format!("tool_calls[{j}] needs `function.name`")));
            };
            let arguments = match f.and_then(|f| f.get("arguments")) {
                None | Some(Value::Null) => "{}".to_string(),
                Some(Value::String(a)) => a.clone(),
                Some(other) => other.to_string(),
            };
            Ok(ToolCall {
                id: c
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                name: name.to_string(),
                arguments,
            })
        })
        .collect()
}

/// A fresh id for a call the model made.
pub fn call_id() -> String {
    format!("call_{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(extra: Value) -> ChatCompletionRequest {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        serde_json::from_value(body).unwrap_or_else(|e| panic!("{e}"))
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn choices_shape_the_rules() {
        let auto = output_rules(&req(json!({"tools": weather()})));
        assert!(auto
            .as_ref()
            .is_ok_and(|r| r.tool_calls && !r.forced && r.tools.len() == 1));
        let none = output_rules(&req(json!({"tools": weather(), "tool_choice": "none"})));
        assert!(none
            .as_ref()
            .is_ok_and(|r| !r.tool_calls && r.grammar.is_none() && r.tools.is_empty()));
        let named = output_rules(&req(json!({"tools": weather(),
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})));
        assert!(named.as_ref().is_ok_and(|r| r.forced));
        let json = output_rules(&req(json!({"response_format": {"type": "json_object"}})));
        assert!(json.as_ref().is_ok_and(|r| r.forced && !r.tool_calls));
    }

    #[test]
    fn repeated_requests_share_one_compiled_grammar() {
        let grammar = |extra: Value| output_rules(&req(extra)).ok().and_then(|r| r.grammar);
        let fmt = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "p",
            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}});
        let (a, b) = (grammar(fmt.clone()), grammar(fmt));
        assert!(matches!((&a, &b), (Some(a), Some(b)) if Arc::ptr_eq(a, b)));
        let (c, d) = (
            grammar(json!({"tools": weather()})),
            grammar(json!({"tools": weather(), "tool_choice": "required"})),
        );
        assert!(
            matches!((&c, &d), (Some(c), Some(d)) if !Arc::ptr_eq(c, d)),
            "another choice, another grammar"
        );
    }

    #[test]
    fn bad_tools_and_formats_name_the_problem() {
        let cases = [
            (json!({"tools": {"a": 1}}), "list"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "a b",
            ),
            (
                json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "nope",
            ),
            (json!({"tool_choice": "required"}), "no `tools`"),
            (
                json!({"tools": weather(), "response_format": {"type": "json_object"}}),
                "cannot be combined",
            ),
            (json!({"response_format": {"type": "yaml"}}), "json_schema"),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true,
                "schema": {"type": "string", "format": "email"}}}}),
                "format",
            ),
        ];
        for (extra, needle) in cases {
            let err = output_rules(&req(extra.clone())).err().map(|e| e.message);
            assert!(
                err.as_deref().is_some_and(|m| m.contains(needle)),
                "{extra}: {err:?}"
            );
        }
    }
}
