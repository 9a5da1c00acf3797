//! Agents: a declared model, instructions, tools and limits, and the loop
//! that runs one conversation turn to its end.
//!
//! The loop asks the model (through [`ChatModel`], which the server wires to
//! its engines and metering) for the next step with the agent's tools
//! offered. A reply without tool calls is the answer. Each tool call is run
//! through the [`ToolBox`]; its output, or its error as text, goes back to
//! the model as a `tool` message, so a failing tool, a tool that does not
//! exist or arguments that do not parse are the model's to correct, never a
//! crash. The run stops cleanly at the step limit or when the next step
//! could overspend the token budget.
//!
//! This loop keeps its state in memory; the durable runner that journals each
//! step builds on the same step function.

use std::future::Future;
use std::pin::Pin;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::tool::ToolBox;

/// Most steps any agent may take per run.
pub const MAX_STEPS: u32 = 100;
/// Most characters of one tool output given back to the model.
pub const MAX_TOOL_TEXT: usize = 16 * 1024;

/// An agent as a tenant declares it (JSON).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// `[a-z0-9_-]`, 1 to 64 characters.
    pub name: String,
    /// The model that takes the steps.
    pub model: String,
    /// The system message.
    #[serde(default)]
    pub instructions: String,
    /// Names of the tools it may call.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Model calls per run at most.
    #[serde(default = "default_max_steps")]
    pub max_steps: u32,
    /// Tokens (prompt plus completion, over all steps) per run at most.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Tokens one model reply may have.
    #[serde(default = "default_step_tokens")]
    pub step_tokens: u32,
    #[serde(default)]
    pub temperature: Option<f32>,
}

fn default_max_steps() -> u32 {
    8
}

fn default_step_tokens() -> u32 {
    256
}

/// A declaration that cannot run, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent `{field}`: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl AgentSpec {
    /// Reads a JSON declaration and checks it against the tools there are.
    pub fn from_json(text: &str, tools: &ToolBox) -> Result<AgentSpec, SpecError> {
        let spec: AgentSpec = serde_json::from_str(text).map_err(|e| SpecError {
            field: "(document)".into(),
            message: e.to_string(),
        })?;
        spec.validate(tools)?;
        Ok(spec)
    }

    pub fn validate(&self, tools: &ToolBox) -> Result<(), SpecError> {
        let bad = |field: &str, message: String| {
            Err(SpecError {
                field: field.into(),
                message,
            })
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return bad("name", "must be 1 to 64 of a-z, 0-9, `_` and `-`".into());
        }
        if self.model.trim().is_empty() {
            return bad("model", "must name a model".into());
        }
        if self.max_steps == 0 || self.max_steps > MAX_STEPS {
            return bad("max_steps", format!("must be between 1 and {MAX_STEPS}"));
        }
        if self.step_tokens == 0 {
            return bad("step_tokens", "must be at least 1".into());
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens", "must be at least 1 when given".into());
        }
        if self
            .temperature
            .is_some_and(|t| !t.is_finite() || !(0.0..=2.0).contains(&t))
        {
            return bad("temperature", "must be between 0 and 2".into());
        }
        for (i, tool) in self.tools.iter().enumerate() {
            if tools.get(tool).is_none() {
                return bad(
                    &format!("tools[{i}]"),
                    format!(
                        "there is no tool `{tool}`; the tools are: {}",
                        tools.names().join(", ")
                    ),
                );
            }
            if self.tools[..i].contains(tool) {
                return bad(&format!("tools[{i}]"), format!("`{tool}` is listed twice"));
            }
        }
        Ok(())
    }
}

/// One model call of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    pub model: String,
    /// OpenAI chat messages.
    pub messages: Vec<Value>,
    /// OpenAI function definitions.
    pub tools: Vec<Value>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
}

/// A call the model asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedCall {
    pub id: String,
    pub name: String,
    /// The arguments as the model wrote them (JSON text).
    pub arguments: String,
}

/// The model's reply to one step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelReply {
    pub content: Option<String>,
    pub tool_calls: Vec<RequestedCall>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A model failure that ends the run (the model could not be reached, the
/// key ran out of credit, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModelError(pub String);

pub type ModelFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ModelReply, ModelError>> + Send + 'a>>;

/// The models an agent runs on; the server meters every call to the run's key.
pub trait ChatModel: Send + Sync {
    fn chat<'a>(&'a self, request: &'a ModelRequest) -> ModelFuture<'a>;
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The model answered without calling a tool.
    Answered(String),
    /// `max_steps` model calls were made without an answer.
    StepLimit,
    /// The next step could overspend `max_tokens`.
    TokenBudget,
    /// The model could not be called.
    ModelFailed(String),
}

/// What happened in a run, step by step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Model {
        step: u32,
        prompt_tokens: u64,
        completion_tokens: u64,
        calls: usize,
    },
    Tool {
        step: u32,
        name: String,
        ok: bool,
        truncated: bool,
    },
}

/// A finished run: the outcome, the conversation and the events.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub outcome: Outcome,
    pub messages: Vec<Value>,
    pub events: Vec<Event>,
    pub tokens: u64,
}

/// Runs `spec` on `input` until it answers or a limit stops it.
pub async fn run_agent(
    spec: &AgentSpec,
    input: &str,
    model: &dyn ChatModel,
    tools: &ToolBox,
) -> Run {
    let mut messages = Vec::new();
    if !spec.instructions.is_empty() {
        messages.push(json!({"role": "system", "content": spec.instructions}));
    }
    messages.push(json!({"role": "user", "content": input}));
    let definitions: Vec<Value> = tools
        .definitions()
        .into_iter()
        .filter(|d| {
            d["function"]["name"]
                .as_str()
                .is_some_and(|n| spec.tools.iter().any(|t| t == n))
        })
        .collect();
    let mut events = Vec::new();
    let mut tokens: u64 = 0;
    // The next prompt holds at least the last prompt and its reply.
    let mut next_prompt: u64 = 0;
    for step in 0..spec.max_steps {
        // The next call's worst case: that prompt plus a full reply.
        if let Some(limit) = spec.max_tokens {
            if tokens + next_prompt + u64::from(spec.step_tokens) > limit {
                return Run {
                    outcome: Outcome::TokenBudget,
                    messages,
                    events,
                    tokens,
                };
            }
        }
        let request = ModelRequest {
            model: spec.model.clone(),
            messages: messages.clone(),
            tools: definitions.clone(),
            max_tokens: spec.step_tokens,
            temperature: spec.temperature,
        };
        let reply = match model.chat(&request).await {
            Ok(r) => r,
            Err(e) => {
                return Run {
                    outcome: Outcome::ModelFailed(e.0),
                    messages,
                    events,
                    tokens,
                }
            }
        };
        tokens += reply.prompt_tokens + reply.completion_tokens;
        next_prompt = reply.prompt_tokens + reply.completion_tokens;
        events.push(Event::Model {
            step,
            prompt_tokens: reply.prompt_tokens,
            completion_tokens: reply.completion_tokens,
            calls: reply.tool_calls.len(),
        });
        if reply.tool_calls.is_empty() {
            let answer = reply.content.unwrap_or_default();
            messages.push(json!({"role": "assistant", "content": answer}));
            return Run {
                outcome: Outcome::Answered(answer),
                messages,
                events,
                tokens,
            };
        }
        let calls: Vec<Value> = reply
            .tool_calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect();
        messages.push(json!({"role": "assistant", "content": reply.content, "tool_calls": calls}));
        for call in &reply.tool_calls {
            let (text, ok, truncated) = call_tool(spec, tools, call).await;
            events.push(Event::Tool {
                step,
                name: call.name.clone(),
                ok,
                truncated,
            });
            messages.push(json!({"role": "tool", "tool_call_id": call.id, "content": text}));
        }
    }
    Run {
        outcome: Outcome::StepLimit,
        messages,
        events,
        tokens,
    }
}

/// Runs one requested call; its output or its error as the text the model
/// sees, whether it succeeded, and whether the text was cut.
async fn call_tool(
    spec: &AgentSpec,
    tools: &ToolBox,
    call: &RequestedCall,
) -> (String, bool, bool) {
    if !spec.tools.contains(&call.name) {
        let text = format!(
            "error: there is no tool `{}` here; the tools are: {}",
            call.name.chars().take(64).collect::<String>(),
            spec.tools.join(", ")
        );
        return (text, false, false);
    }
    let args: Value = match serde_json::from_str(&call.arguments) {
        Ok(v) => v,
        Err(e) => {
            return (
                format!("error: the arguments are not JSON: {e}"),
                false,
                false,
            )
        }
    };
    match tools.call(&call.name, &args).await {
        Ok(out) => {
            let (text, cut) = cap(out.text);
            (text, true, out.truncated || cut)
        }
        Err(e) => (format!("error: {e}"), false, false),
    }
}

/// At most [`MAX_TOOL_TEXT`] characters, marked when cut.
fn cap(text: String) -> (String, bool) {
    match text.char_indices().nth(MAX_TOOL_TEXT) {
        Some((end, _)) => (
            format!(
                "{}\n[output cut at {MAX_TOOL_TEXT} characters]",
                &text[..end]
            ),
            true,
        ),
        None => (text, false),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{Calculator, CurrentTime};

    /// A model that replies from a script and records what it was asked.
    struct Scripted {
        replies: Mutex<Vec<Result<ModelReply, ModelError>>>,
        seen: Mutex<Vec<ModelRequest>>,
    }

    impl Scripted {
        fn new(mut replies: Vec<Result<ModelReply, ModelError>>) -> Scripted {
            replies.reverse();
            Scripted {
                replies: Mutex::new(replies),
                seen: Mutex::new(Vec::new()),
            }
        }
    }

    impl ChatModel for Scripted {
        fn chat<'a>(&'a self, request: &'a ModelRequest) -> ModelFuture<'a> {
            self.seen.lock().unwrap().push(request.clone());
            let next = self.replies.lock().unwrap().pop();
            Box::pin(async move { next.unwrap_or_else(|| Err(ModelError("script ended".into()))) })
        }
    }

    fn call(id: &str, name: &str, arguments: &str) -> ModelReply {
        ModelReply {
            tool_calls: vec![RequestedCall {
                id: id.into(),
                name: name.into(),
                arguments: arguments.into(),
            }],
            prompt_tokens: 50,
            completion_tokens: 10,
            ..ModelReply::default()
        }
    }

    fn answer(text: &str) -> ModelReply {
        ModelReply {
            content: Some(text.into()),
            prompt_tokens: 80,
            completion_tokens: 5,
            ..ModelReply::default()
        }
    }

    fn toolbox() -> ToolBox {
        ToolBox::new().with(Calculator).with(CurrentTime::new())
    }

    fn spec(json: &str) -> AgentSpec {
        AgentSpec::from_json(json, &toolbox()).unwrap()
    }

    #[tokio::test]
    async fn a_tool_result_goes_back_and_the_answer_ends_the_run() {
        let agent = spec(
            r#"{"name": "maths", "model": "smollm2-135m", "instructions": "Use the calculator.", "tools": ["calculator"]}"#,
        );
        let model = Scripted::new(vec![
            Ok(call("c1", "calculator", r#"{"expression": "6*7"}"#)),
            Ok(answer("42")),
        ]);
        let run = run_agent(&agent, "What is 6 times 7?", &model, &toolbox()).await;
        assert_eq!(run.outcome, Outcome::Answered("42".into()));
        assert_eq!(run.tokens, 145);
        let seen = model.seen.lock().unwrap();
        assert_eq!(
            seen[0].tools.len(),
            1,
            "only the agent's own tools are offered"
        );
        let tool_msg = &seen[1].messages[3];
        assert_eq!(tool_msg["role"], "tool");
        assert_eq!(tool_msg["tool_call_id"], "c1");
        assert!(
            tool_msg["content"].as_str().unwrap().contains("42"),
            "{tool_msg}"
        );
    }

    #[tokio::test]
    async fn bad_calls_are_fed_back_not_crashed_on() {
        let agent = spec(r#"{"name": "a", "model": "m", "tools": ["calculator"]}"#);
        let model = Scripted::new(vec![
            Ok(call("1", "rm_rf", "{}")),
            Ok(call("2", "current_time", "{}")),
            Ok(call("3", "calculator", "not json")),
            Ok(call("4", "calculator", r#"{"expression": "1/0"}"#)),
            Ok(answer("sorry")),
        ]);
        let run = run_agent(&agent, "x", &model, &toolbox()).await;
        assert_eq!(run.outcome, Outcome::Answered("sorry".into()));
        let errors: Vec<String> = run
            .messages
            .iter()
            .filter(|m| m["role"] == "tool")
            .map(|m| m["content"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(errors.len(), 4);
        assert!(errors[0].contains("no tool `rm_rf`"), "{errors:?}");
        assert!(
            errors[1].contains("no tool `current_time`"),
            "a tool the agent was not given: {errors:?}"
        );
        assert!(errors[2].contains("not JSON"), "{errors:?}");
        assert!(errors[3].starts_with("error:"), "{errors:?}");
        assert!(run
            .events
            .iter()
            .all(|e| !matches!(e, Event::Tool { ok: true, .. })));
    }

    #[tokio::test]
    async fn limits_stop_the_run_cleanly() {
        let looping =
            spec(r#"{"name": "a", "model": "m", "tools": ["calculator"], "max_steps": 3}"#);
        let model = Scripted::new(
            (0..5)
                .map(|i| Ok(call(&i.to_string(), "calculator", r#"{"expression": "1"}"#)))
                .collect(),
        );
        let run = run_agent(&looping, "x", &model, &toolbox()).await;
        assert_eq!(run.outcome, Outcome::StepLimit);
        assert_eq!(model.seen.lock().unwrap().len(), 3);

        let thrifty = spec(
            r#"{"name": "a", "model": "m", "tools": ["calculator"], "max_tokens": 200, "step_tokens": 20}"#,
        );
        let model = Scripted::new(
            (0..5)
                .map(|i| Ok(call(&i.to_string(), "calculator", r#"{"expression": "1"}"#)))
                .collect(),
        );
        let run = run_agent(&thrifty, "x", &model, &toolbox()).await;
        assert_eq!(run.outcome, Outcome::TokenBudget);
        assert!(run.tokens <= 200, "{}", run.tokens);

        let broken = Scripted::new(vec![Err(ModelError("the key has no credit left".into()))]);
        let run = run_agent(&looping, "x", &broken, &toolbox()).await;
        assert_eq!(
            run.outcome,
            Outcome::ModelFailed("the key has no credit left".into())
        );
    }

    #[test]
    fn declarations_are_checked_field_by_field() {
        let tools = toolbox();
        let cases = [
            (r#"{"name": "A B", "model": "m"}"#, "name"),
            (r#"{"name": "a", "model": " "}"#, "model"),
            (
                r#"{"name": "a", "model": "m", "max_steps": 0}"#,
                "max_steps",
            ),
            (
                r#"{"name": "a", "model": "m", "tools": ["shell"]}"#,
                "tools[0]",
            ),
            (
                r#"{"name": "a", "model": "m", "tools": ["calculator", "calculator"]}"#,
                "tools[1]",
            ),
            (
                r#"{"name": "a", "model": "m", "temperature": 3}"#,
                "temperature",
            ),
            (r#"{"name": "a", "model": "m", "toolz": []}"#, "(document)"),
        ];
        for (json, field) in cases {
            let err = AgentSpec::from_json(json, &tools).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
        assert!(cap("x".repeat(MAX_TOOL_TEXT + 5)).1);
    }
}
