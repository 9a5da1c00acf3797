//! The [`Tool`] abstraction, its output and error types, and the [`ToolBox`]
//! registry that dispatches a model's tool call by name.
//!
//! Invariant: a tool call never panics on model input; every failure is a
//! [`ToolError`] whose `Display` text is safe to show to the model (it never
//! contains an operator secret).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// The future a [`Tool::call`] returns.
pub type ToolFuture<'a> = Pin<Box<dyn Future<Output = Result<ToolOutput, ToolError>> + Send + 'a>>;

/// A tool an agent can call.
pub trait Tool: Send + Sync {
    /// The name the model calls the tool by (`[a-z_]+`).
    fn name(&self) -> &str;
    /// One or two sentences telling the model what the tool does.
    fn description(&self) -> &str;
    /// JSON Schema of the arguments object.
    fn parameters(&self) -> Value;
    /// Runs the tool. `args` is the model's arguments object.
    fn call<'a>(&'a self, args: &'a Value) -> ToolFuture<'a>;
    /// Runs the tool as one step of a durable run: `key` is the same on
    /// every attempt of the step, so a tool with effects elsewhere can pass
    /// it on (as an `Idempotency-Key` header, say) and take effect once.
    fn call_keyed<'a>(&'a self, args: &'a Value, key: &'a str) -> ToolFuture<'a> {
        let _ = key;
        self.call(args)
    }
}

/// What a tool returns to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    /// The text shown to the model.
    pub text: String,
    /// True when the text was cut short (for example a response body over the
    /// size limit).
    pub truncated: bool,
}

impl ToolOutput {
    /// A complete (not truncated) output.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            truncated: false,
        }
    }
}

/// Why a tool call failed. The `Display` text is written for the model: it
/// says what was wrong and, where it helps, what is allowed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ToolError {
    /// No tool with this name is registered.
    #[error("unknown tool `{name}`; available tools: {available}")]
    UnknownTool { name: String, available: String },
    /// The arguments do not fit the tool's schema.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The calculator could not evaluate the expression.
    #[error("{0}")]
    Calculation(#[from] crate::calculator::CalcError),
    /// The request was refused by policy before any connection was made.
    #[error("request refused: {0}")]
    Refused(String),
    /// The request was allowed but failed on the way (connect, protocol).
    #[error("request failed: {0}")]
    RequestFailed(String),
    /// The call did not finish in time.
    #[error("timed out after {}", format_duration(*.0))]
    Timeout(Duration),
}

impl ToolError {
    /// A stable machine-readable code for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            ToolError::UnknownTool { .. } => "unknown_tool",
            ToolError::InvalidArguments(_) => "invalid_arguments",
            ToolError::Calculation(_) => "calculation_error",
            ToolError::Refused(_) => "refused",
            ToolError::RequestFailed(_) => "request_failed",
            ToolError::Timeout(_) => "timeout",
        }
    }
}

fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Deserialises a tool's arguments object into `T`, turning serde's error
/// into a message for the model.
pub(crate) fn parse_args<T: serde::de::DeserializeOwned>(args: &Value) -> Result<T, ToolError> {
    T::deserialize(args).map_err(|e| ToolError::InvalidArguments(e.to_string()))
}

/// The tools an agent may call, looked up by name.
#[derive(Clone, Default)]
pub struct ToolBox {
    tools: BTreeMap<String, Arc<dyn Tool>>,
}

impl std::fmt::Debug for ToolBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolBox")
            .field("tools", &self.tools.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ToolBox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tool, replacing any tool of the same name.
    pub fn register(&mut self, tool: impl Tool + 'static) -> &mut Self {
        self.tools.insert(tool.name().to_owned(), Arc::new(tool));
        self
    }

    /// Builder form of [`ToolBox::register`].
    pub fn with(mut self, tool: impl Tool + 'static) -> Self {
        self.register(tool);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.get(name)
    }

    /// Registered tool names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tools.keys().map(String::as_str).collect()
    }

    /// OpenAI-style function definitions
    /// (`{"type":"function","function":{name,description,parameters}}`),
    /// sorted by name, for putting in a chat request's `tools`.
    pub fn definitions(&self) -> Vec<Value> {
        self.tools
            .values()
            .map(|t| {
                serde_json::json!({
                    "type": "function",
                    "function": {
                        "name": t.name(),
                        "description": t.description(),
                        "parameters": t.parameters(),
                    }
                })
            })
            .collect()
    }

    /// Calls the tool `name` with `args`, which must be a JSON object.
    pub async fn call(&self, name: &str, args: &Value) -> Result<ToolOutput, ToolError> {
        self.call_keyed(name, args, None).await
    }

    /// [`ToolBox::call`] as a step of a durable run, with the step's
    /// idempotency key (see [`Tool::call_keyed`]).
    pub async fn call_keyed(
        &self,
        name: &str,
        args: &Value,
        key: Option<&str>,
    ) -> Result<ToolOutput, ToolError> {
        let Some(tool) = self.tools.get(name) else {
            let available = if self.tools.is_empty() {
                "none".to_owned()
            } else {
                self.names().join(", ")
            };
            return Err(ToolError::UnknownTool {
                name: truncate_for_message(name, 64),
                available,
            });
        };
        if !args.is_object() {
            return Err(ToolError::InvalidArguments(format!(
                "arguments must be a JSON object, got {}",
                json_kind(args)
            )));
        }
        let result = match key {
            Some(key) => tool.call_keyed(args, key).await,
            None => tool.call(args).await,
        };
        if let Err(e) = &result {
            tracing::debug!(tool = name, code = e.code(), "tool call failed");
        }
        result
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Shortens model-controlled text before echoing it in an error.
pub(crate) fn truncate_for_message(s: &str, max_chars: usize) -> String {
    let mut out: String = s.chars().take(max_chars).collect();
    if s.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn unknown_tool_lists_available_tools() {
        let tools = ToolBox::new().with(crate::Calculator);
        let err = tools.call("nope", &json!({})).await.unwrap_err();
        assert_eq!(err.code(), "unknown_tool");
        assert_eq!(
            err.to_string(),
            "unknown tool `nope`; available tools: calculator"
        );
    }

    #[tokio::test]
    async fn non_object_arguments_are_refused() {
        let tools = ToolBox::new().with(crate::Calculator);
        let err = tools.call("calculator", &json!("1+1")).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid arguments: arguments must be a JSON object, got a string"
        );
    }

    #[tokio::test]
    async fn dispatches_by_name() {
        let tools = ToolBox::new()
            .with(crate::Calculator)
            .with(crate::CurrentTime::new());
        assert_eq!(tools.names(), vec!["calculator", "current_time"]);
        let out = tools
            .call("calculator", &json!({"expression": "1+2"}))
            .await
            .unwrap();
        assert_eq!(out, ToolOutput::text("3"));
        let defs = tools.definitions();
        assert_eq!(defs[0]["function"]["name"], "calculator");
        assert_eq!(defs[0]["function"]["parameters"]["type"], "object");
    }

    #[test]
    fn long_names_are_shortened_in_messages() {
        let s = "x".repeat(100);
        assert_eq!(truncate_for_message(&s, 3), "xxx…");
        assert_eq!(truncate_for_message("ab", 3), "ab");
    }
}
