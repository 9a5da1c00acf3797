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
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

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
    /// Money per run at most, in the currency of the model's price: no
    /// model step starts once the run's calls have been charged this much
    /// (so the last step may pass it by what one step costs).
    #[serde(default)]
    pub max_cost: Option<f64>,
    /// Tokens one model reply may have.
    #[serde(default = "default_step_tokens")]
    pub step_tokens: u32,
    #[serde(default)]
    pub temperature: Option<f32>,
    /// The first step's `tool_choice` (`"auto"`, `"none"`, `"required"` or
    /// `{"type": "function", "function": {"name": ...}}`); later steps use
    /// `auto`, so a model made to call a tool can still answer. Small models
    /// seldom call a tool unless made to.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Seconds one step (a model call, a tool call) may take; a model call
    /// past it is retried, a tool call past it fails back to the model.
    #[serde(default = "default_step_timeout")]
    pub step_timeout_seconds: u64,
    /// Times a model step is tried again after a transient failure (a full
    /// queue, a rate limit, a timeout), waiting 1, 2, 4, ... seconds.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_step_timeout() -> u64 {
    300
}

fn default_retries() -> u32 {
    3
}

/// Why a `max_cost` cannot be used, if it cannot.
pub(crate) fn check_cost(max_cost: Option<f64>) -> Option<String> {
    match max_cost {
        Some(c) if !c.is_finite() || c <= 0.0 || c > 1e9 => {
            Some("must be a positive amount (at most 1e9)".into())
        }
        _ => None,
    }
}

/// A money amount in nanos of its currency.
pub(crate) fn nanos(amount: f64) -> u64 {
    (amount * 1e9).round() as u64
}

/// Most retries a declaration may ask for.
pub const MAX_RETRIES: u32 = 10;
/// Longest wait between two tries of a step.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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
        if let Some(why) = check_cost(self.max_cost) {
            return bad("max_cost", why);
        }
        if self
            .temperature
            .is_some_and(|t| !t.is_finite() || !(0.0..=2.0).contains(&t))
        {
            return bad("temperature", "must be between 0 and 2".into());
        }
        if let Some(choice) = &self.tool_choice {
            self.check_tool_choice(choice)?;
        }
        if !(1..=86_400).contains(&self.step_timeout_seconds) {
            return bad("step_timeout_seconds", "must be between 1 and 86400".into());
        }
        if self.retries > MAX_RETRIES {
            return bad("retries", format!("must be at most {MAX_RETRIES}"));
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

impl AgentSpec {
    fn check_tool_choice(&self, choice: &Value) -> Result<(), SpecError> {
        let bad = |message: String| {
            Err(SpecError {
                field: "tool_choice".into(),
                message,
            })
        };
        match choice {
            Value::String(s) if s == "auto" || s == "none" => Ok(()),
            Value::String(s) if s == "required" => match self.tools.is_empty() {
                true => bad("`required` needs at least one tool in `tools`".into()),
                false => Ok(()),
            },
            Value::Object(o) => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str);
                match (o.get("type").and_then(Value::as_str), name) {
                    (Some("function"), Some(name)) if self.tools.iter().any(|t| t == name) => {
                        Ok(())
                    }
                    (Some("function"), Some(name)) => bad(format!(
                        "names `{}`, which is not in `tools`",
                        name.chars().take(64).collect::<String>()
                    )),
                    _ => bad(
                        "must be {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                    ),
                }
            }
            _ => bad("must be \"auto\", \"none\", \"required\" or a named function".into()),
        }
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
    /// OpenAI `tool_choice`; `None` is `auto`.
    pub tool_choice: Option<Value>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    /// OpenAI `response_format` (a JSON Schema the reply is decoded under).
    pub response_format: Option<Value>,
    /// The journal's idempotency key of the step making the call (the same
    /// on every attempt), so the ledger can name the step.
    pub key: Option<String>,
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
    /// `stop`, `length` (cut at `max_tokens`), `tool_calls`, ...
    pub finish_reason: Option<String>,
    /// What the call was charged, in nanos of its price's currency.
    pub cost_nanos: u64,
}

/// A model call that failed: `transient` when trying again later may work
/// (the model's queue was full, a rate limit, the upstream did not answer),
/// else the run ends (no credit left, a bad request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ModelError {
    pub message: String,
    pub transient: bool,
}

impl ModelError {
    /// A failure that ends the run.
    pub fn fatal(message: impl Into<String>) -> ModelError {
        ModelError {
            message: message.into(),
            transient: false,
        }
    }

    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> ModelError {
        ModelError {
            message: message.into(),
            transient: true,
        }
    }
}

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
    /// The run's calls have been charged `max_cost`.
    CostBudget,
    /// The model could not be called.
    ModelFailed(String),
    /// Someone asked the run to stop; it stopped before its next step.
    Cancelled,
    /// The run may not go on (its key was revoked, its tenant disabled).
    Stopped(String),
    /// The journal could not be written (the store failed, or another
    /// replica took the run over): this worker stops, and the run is
    /// whatever its journal says.
    Interrupted(String),
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
    /// What its model calls were charged, in nanos.
    pub cost_nanos: u64,
    /// Why the last model reply ended (`length`: the answer was cut at
    /// `step_tokens`).
    pub finish_reason: Option<String>,
}

/// What a journaled step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Model,
    Tool,
    /// A knowledge-base search of a workflow.
    Retrieve,
    /// A workflow's pause for a person's approval.
    Approval,
    /// The version of a workflow's sub-agent, fixed when it first runs.
    Agent,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Model => "model",
            StepKind::Tool => "tool",
            StepKind::Retrieve => "retrieve",
            StepKind::Approval => "approval",
            StepKind::Agent => "agent",
        }
    }
}

/// A step about to run, as the journal records it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStart {
    /// Names the step within its run: the same step has the same path when
    /// the run is replayed (an agent's steps are `0`, `1`, ... in order; a
    /// workflow's are its step ids, `each[2]` inside a map, `research/3`
    /// inside a sub-agent).
    pub path: String,
    pub kind: StepKind,
    /// The model or tool.
    pub name: String,
    pub input: Value,
}

/// What the journal knows of a step being begun.
#[derive(Debug, Clone, PartialEq)]
pub enum Begun {
    /// Run it; `key` is the same on every attempt.
    Run { key: String, attempt: u32 },
    /// It ran before and this is what it gave: use that, do not run it again.
    Recorded { ok: bool, output: Value },
}

/// Why a journal refused a step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("the run was cancelled")]
    Cancelled,
    /// The run may not go on, for this reason.
    #[error("{0}")]
    Stopped(String),
    #[error("{0}")]
    Lost(String),
}

pub type JournalFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, JournalError>> + Send + 'a>>;

/// Where a durable run's steps are recorded: each step's input before it
/// runs, its output before the next one starts.
pub trait Journal: Send + Sync {
    fn begin<'a>(&'a self, step: &'a StepStart) -> JournalFuture<'a, Begun>;
    fn finish<'a>(&'a self, path: &'a str, ok: bool, output: &'a Value) -> JournalFuture<'a, ()>;
}

/// A journaled step: what it was given and, once it ended, whether it
/// succeeded and what it gave.
pub type JournaledStep = (StepStart, Option<(bool, Value)>);

/// A journal in memory: runs are not durable, but take the same path.
#[derive(Debug, Default)]
pub struct MemoryJournal {
    steps: Mutex<Vec<JournaledStep>>,
}

impl MemoryJournal {
    pub fn new() -> MemoryJournal {
        MemoryJournal::default()
    }

    /// The steps so far.
    pub fn steps(&self) -> Vec<JournaledStep> {
        self.steps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Journal for MemoryJournal {
    fn begin<'a>(&'a self, step: &'a StepStart) -> JournalFuture<'a, Begun> {
        let mut steps = self.steps.lock().unwrap_or_else(PoisonError::into_inner);
        let begun = match steps.iter().position(|(s, _)| s.path == step.path) {
            Some(i) => match &steps[i].1 {
                Some((ok, output)) => Begun::Recorded {
                    ok: *ok,
                    output: output.clone(),
                },
                None => Begun::Run {
                    key: i.to_string(),
                    attempt: 2,
                },
            },
            None => {
                steps.push((step.clone(), None));
                Begun::Run {
                    key: (steps.len() - 1).to_string(),
                    attempt: 1,
                }
            }
        };
        Box::pin(std::future::ready(Ok(begun)))
    }

    fn finish<'a>(&'a self, path: &'a str, ok: bool, output: &'a Value) -> JournalFuture<'a, ()> {
        let mut steps = self.steps.lock().unwrap_or_else(PoisonError::into_inner);
        let done = match steps.iter_mut().find(|(s, _)| s.path == path) {
            Some(step) => {
                step.1.get_or_insert((ok, output.clone()));
                Ok(())
            }
            None => Err(JournalError::Lost(format!("step {path} was never begun"))),
        };
        Box::pin(std::future::ready(done))
    }
}

/// Runs `spec` on `input` until it answers or a limit stops it, keeping its
/// steps in memory.
pub async fn run_agent(
    spec: &AgentSpec,
    input: &str,
    model: &dyn ChatModel,
    tools: &ToolBox,
) -> Run {
    run_durable(spec, input, model, tools, &MemoryJournal::new()).await
}

/// Runs `spec` on `input` through `journal`: steps the journal has
/// recorded are replayed from it (not run again), so a run resumed after a
/// crash continues from its last finished step, and a step begun but not
/// finished is run again with the same idempotency key.
pub async fn run_durable(
    spec: &AgentSpec,
    input: &str,
    model: &dyn ChatModel,
    tools: &ToolBox,
    journal: &dyn Journal,
) -> Run {
    let mut run = Run {
        outcome: Outcome::StepLimit,
        messages: Vec::new(),
        events: Vec::new(),
        tokens: 0,
        cost_nanos: 0,
        finish_reason: None,
    };
    if !spec.instructions.is_empty() {
        run.messages
            .push(json!({"role": "system", "content": spec.instructions}));
    }
    run.messages.push(json!({"role": "user", "content": input}));
    let definitions: Vec<Value> = tools
        .definitions()
        .into_iter()
        .filter(|d| {
            d["function"]["name"]
                .as_str()
                .is_some_and(|n| spec.tools.iter().any(|t| t == n))
        })
        .collect();
    let mut seq: u32 = 0;
    // The next prompt holds at least the last prompt and its reply.
    let mut next_prompt: u64 = 0;
    let mut tool_choice = spec.tool_choice.clone();
    for step in 0..spec.max_steps {
        // The next call's worst case: that prompt plus a full reply.
        if let Some(limit) = spec.max_tokens {
            if run.tokens + next_prompt + u64::from(spec.step_tokens) > limit {
                run.outcome = Outcome::TokenBudget;
                return run;
            }
        }
        if spec.max_cost.is_some_and(|c| run.cost_nanos >= nanos(c)) {
            run.outcome = Outcome::CostBudget;
            return run;
        }
        let request = ModelRequest {
            model: spec.model.clone(),
            messages: run.messages.clone(),
            tools: definitions.clone(),
            tool_choice: tool_choice.clone(),
            max_tokens: spec.step_tokens,
            temperature: spec.temperature,
            response_format: None,
            key: None,
        };
        let start = StepStart {
            path: seq.to_string(),
            kind: StepKind::Model,
            name: spec.model.clone(),
            input: json!({
                "step": step,
                "messages": request.messages.len(),
                "tool_choice": request.tool_choice,
                "max_tokens": request.max_tokens,
            }),
        };
        seq += 1;
        let reply = match journaled(journal, &start, |key| async {
            let request = ModelRequest {
                key: Some(key),
                ..request.clone()
            };
            match call_model(model, &request, spec.step_timeout_seconds, spec.retries).await {
                Ok(reply) => (true, reply_json(&reply)),
                Err(e) => (false, json!({"error": e.message})),
            }
        })
        .await
        {
            Ok((true, output)) => match reply_from_json(&output) {
                Some(reply) => reply,
                None => {
                    run.outcome = Outcome::Interrupted(format!(
                        "step {} of the journal does not hold a model reply",
                        start.path
                    ));
                    return run;
                }
            },
            Ok((false, output)) => {
                let why = output["error"].as_str().unwrap_or("the model call failed");
                run.outcome = Outcome::ModelFailed(why.to_string());
                return run;
            }
            Err(e) => {
                run.outcome = stopped(e);
                return run;
            }
        };
        run.tokens += reply.prompt_tokens + reply.completion_tokens;
        run.cost_nanos += reply.cost_nanos;
        run.finish_reason.clone_from(&reply.finish_reason);
        next_prompt = reply.prompt_tokens + reply.completion_tokens;
        run.events.push(Event::Model {
            step,
            prompt_tokens: reply.prompt_tokens,
            completion_tokens: reply.completion_tokens,
            calls: reply.tool_calls.len(),
        });
        if reply.tool_calls.is_empty() {
            let answer = reply.content.unwrap_or_default();
            run.messages
                .push(json!({"role": "assistant", "content": answer}));
            run.outcome = Outcome::Answered(answer);
            return run;
        }
        // Forcing a call once is a way to start; forcing every step would
        // never let the model answer.
        tool_choice = None;
        let calls: Vec<Value> = reply
            .tool_calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect();
        run.messages
            .push(json!({"role": "assistant", "content": reply.content, "tool_calls": calls}));
        for call in &reply.tool_calls {
            let start = StepStart {
                path: seq.to_string(),
                kind: StepKind::Tool,
                name: call.name.clone(),
                input: json!({"id": call.id, "arguments": call.arguments}),
            };
            seq += 1;
            let result = journaled(journal, &start, |key| async move {
                let (text, ok, truncated) = call_tool(spec, tools, call, &key).await;
                (ok, json!({"text": text, "truncated": truncated}))
            })
            .await;
            let (ok, output) = match result {
                Ok(r) => r,
                Err(e) => {
                    run.outcome = stopped(e);
                    return run;
                }
            };
            let text = output["text"].as_str().unwrap_or_default().to_string();
            run.events.push(Event::Tool {
                step,
                name: call.name.clone(),
                ok,
                truncated: output["truncated"].as_bool().unwrap_or(false),
            });
            run.messages
                .push(json!({"role": "tool", "tool_call_id": call.id, "content": text}));
        }
    }
    run
}

/// One model step: each try under the step timeout, transient failures
/// tried again after 1, 2, 4, ... seconds, up to `retries` times.
pub(crate) async fn call_model(
    model: &dyn ChatModel,
    request: &ModelRequest,
    timeout_seconds: u64,
    retries: u32,
) -> Result<ModelReply, ModelError> {
    let limit = Duration::from_secs(timeout_seconds);
    let mut wait = Duration::from_secs(1);
    let mut tries = 0;
    loop {
        let error = match tokio::time::timeout(limit, model.chat(request)).await {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(e)) => e,
            Err(_) => ModelError::transient(format!(
                "the model did not answer within {timeout_seconds} s"
            )),
        };
        if !error.transient || tries >= retries {
            return Err(match tries {
                0 => error,
                n => ModelError {
                    message: format!("{} (after {} tries)", error.message, n + 1),
                    ..error
                },
            });
        }
        tries += 1;
        tracing::info!(error = %error, tries, "a model step failed; trying it again");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_BACKOFF);
    }
}

/// Begins a step in the journal, runs it unless the journal has its
/// output, and records the output.
pub(crate) async fn journaled<F, Fut>(
    journal: &dyn Journal,
    start: &StepStart,
    work: F,
) -> Result<(bool, Value), JournalError>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = (bool, Value)>,
{
    match journal.begin(start).await? {
        Begun::Recorded { ok, output } => Ok((ok, output)),
        Begun::Run { key, attempt } => {
            if attempt > 1 {
                tracing::info!(
                    step = %start.path,
                    attempt,
                    "running again a step whose worker stopped before it ended"
                );
            }
            let (ok, output) = work(key).await;
            journal.finish(&start.path, ok, &output).await?;
            Ok((ok, output))
        }
    }
}

fn stopped(e: JournalError) -> Outcome {
    match e {
        JournalError::Cancelled => Outcome::Cancelled,
        JournalError::Stopped(why) => Outcome::Stopped(why),
        JournalError::Lost(why) => Outcome::Interrupted(why),
    }
}

pub(crate) fn reply_json(reply: &ModelReply) -> Value {
    json!({
        "content": reply.content,
        "tool_calls": reply.tool_calls.iter().map(|c| json!({
            "id": c.id, "name": c.name, "arguments": c.arguments,
        })).collect::<Vec<_>>(),
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "finish_reason": reply.finish_reason,
        "cost_nanos": reply.cost_nanos,
    })
}

pub(crate) fn reply_from_json(v: &Value) -> Option<ModelReply> {
    let calls = v["tool_calls"]
        .as_array()?
        .iter()
        .map(|c| {
            Some(RequestedCall {
                id: c["id"].as_str()?.to_string(),
                name: c["name"].as_str()?.to_string(),
                arguments: c["arguments"].as_str()?.to_string(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(ModelReply {
        content: v["content"].as_str().map(str::to_string),
        tool_calls: calls,
        prompt_tokens: v["prompt_tokens"].as_u64()?,
        completion_tokens: v["completion_tokens"].as_u64()?,
        finish_reason: v["finish_reason"].as_str().map(str::to_string),
        cost_nanos: v["cost_nanos"].as_u64().unwrap_or(0),
    })
}

/// Runs one requested call; its output or its error as the text the model
/// sees, whether it succeeded, and whether the text was cut.
async fn call_tool(
    spec: &AgentSpec,
    tools: &ToolBox,
    call: &RequestedCall,
    key: &str,
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
    let limit = Duration::from_secs(spec.step_timeout_seconds);
    let called = tokio::time::timeout(limit, tools.call_keyed(&call.name, &args, Some(key))).await;
    let Ok(called) = called else {
        return (
            format!(
                "error: the tool did not finish within {} s",
                spec.step_timeout_seconds
            ),
            false,
            false,
        );
    };
    match called {
        Ok(out) => {
            let (text, cut) = cap(out.text);
            (text, true, out.truncated || cut)
        }
        Err(e) => (format!("error: {e}"), false, false),
    }
}

/// At most [`MAX_TOOL_TEXT`] characters, marked when cut.
pub(crate) fn cap(text: String) -> (String, bool) {
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
            Box::pin(async move { next.unwrap_or_else(|| Err(ModelError::fatal("script ended"))) })
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

        let broken = Scripted::new(vec![Err(ModelError::fatal("the key has no credit left"))]);
        let run = run_agent(&looping, "x", &broken, &toolbox()).await;
        assert_eq!(
            run.outcome,
            Outcome::ModelFailed("the key has no credit left".into())
        );
    }

    #[tokio::test]
    async fn a_replayed_run_takes_recorded_steps_from_the_journal() {
        let agent = spec(
            r#"{"name": "maths", "model": "m", "tools": ["calculator"], "tool_choice": "required"}"#,
        );
        let journal = MemoryJournal::new();
        let model = Scripted::new(vec![
            Ok(call("c1", "calculator", r#"{"expression": "6*7"}"#)),
            Ok(answer("42")),
        ]);
        let first = run_durable(&agent, "6*7?", &model, &toolbox(), &journal).await;
        assert_eq!(first.outcome, Outcome::Answered("42".into()));
        {
            let seen = model.seen.lock().unwrap();
            assert_eq!(seen[0].tool_choice, Some(json!("required")));
            assert_eq!(seen[1].tool_choice, None, "auto after the first call");
        }
        let steps = journal.steps();
        let kinds: Vec<StepKind> = steps.iter().map(|(s, _)| s.kind).collect();
        assert_eq!(kinds, [StepKind::Model, StepKind::Tool, StepKind::Model]);
        assert!(steps.iter().all(|(_, out)| out.is_some()));

        // Every step recorded: the replay calls nothing and ends the same.
        let silent = Scripted::new(Vec::new());
        let again = run_durable(&agent, "6*7?", &silent, &toolbox(), &journal).await;
        assert_eq!(again, first);
        assert!(silent.seen.lock().unwrap().is_empty());
    }

    /// Counts its calls and the keys it was given.
    struct Effect {
        keys: Mutex<Vec<String>>,
    }

    impl crate::Tool for Effect {
        fn name(&self) -> &str {
            "effect"
        }
        fn description(&self) -> &str {
            "has an effect"
        }
        fn parameters(&self) -> Value {
            json!({"type": "object"})
        }
        fn call<'a>(&'a self, _: &'a Value) -> crate::ToolFuture<'a> {
            Box::pin(async { Ok(crate::ToolOutput::text("unkeyed")) })
        }
        fn call_keyed<'a>(&'a self, _: &'a Value, key: &'a str) -> crate::ToolFuture<'a> {
            self.keys.lock().unwrap().push(key.to_string());
            Box::pin(async move { Ok(crate::ToolOutput::text(format!("done once for {key}"))) })
        }
    }

    #[tokio::test]
    async fn a_step_begun_but_not_finished_runs_again_with_its_key() {
        let effect = std::sync::Arc::new(Effect {
            keys: Mutex::new(Vec::new()),
        });
        struct Shared(std::sync::Arc<Effect>);
        impl crate::Tool for Shared {
            fn name(&self) -> &str {
                self.0.name()
            }
            fn description(&self) -> &str {
                self.0.description()
            }
            fn parameters(&self) -> Value {
                self.0.parameters()
            }
            fn call<'a>(&'a self, args: &'a Value) -> crate::ToolFuture<'a> {
                self.0.call(args)
            }
            fn call_keyed<'a>(&'a self, args: &'a Value, key: &'a str) -> crate::ToolFuture<'a> {
                self.0.call_keyed(args, key)
            }
        }
        let tools = ToolBox::new().with(Shared(effect.clone()));
        let agent = AgentSpec::from_json(
            r#"{"name": "a", "model": "m", "tools": ["effect"]}"#,
            &tools,
        )
        .unwrap();
        // The model step ended and the tool step began; then the worker died.
        let journal = MemoryJournal::new();
        let first = call("c1", "effect", "{}");
        let start = |seq: u32, kind, name: &str| StepStart {
            path: seq.to_string(),
            kind,
            name: name.into(),
            input: json!({}),
        };
        let model_step = start(0, StepKind::Model, "m");
        journal.begin(&model_step).await.unwrap();
        journal
            .finish("0", true, &reply_json(&first))
            .await
            .unwrap();
        journal
            .begin(&start(1, StepKind::Tool, "effect"))
            .await
            .unwrap();

        let model = Scripted::new(vec![Ok(answer("ok"))]);
        let run = run_durable(&agent, "go", &model, &tools, &journal).await;
        assert_eq!(run.outcome, Outcome::Answered("ok".into()));
        assert_eq!(
            *effect.keys.lock().unwrap(),
            ["1"],
            "run again, once, keyed"
        );
        assert_eq!(
            model.seen.lock().unwrap().len(),
            1,
            "step 0 was not re-asked"
        );
        assert_eq!(run.tokens, 60 + 85);
    }

    /// A journal whose run was cancelled (or lost) before step `at`.
    struct StopsAt(MemoryJournal, u32, JournalError);

    impl Journal for StopsAt {
        fn begin<'a>(&'a self, step: &'a StepStart) -> JournalFuture<'a, Begun> {
            if step.path.parse::<u32>().is_ok_and(|seq| seq >= self.1) {
                return Box::pin(std::future::ready(Err(self.2.clone())));
            }
            self.0.begin(step)
        }
        fn finish<'a>(
            &'a self,
            path: &'a str,
            ok: bool,
            output: &'a Value,
        ) -> JournalFuture<'a, ()> {
            self.0.finish(path, ok, output)
        }
    }

    #[tokio::test]
    async fn a_cancelled_or_lost_run_stops_before_its_next_step() {
        let agent = spec(r#"{"name": "a", "model": "m", "tools": ["calculator"]}"#);
        for (error, outcome) in [
            (JournalError::Cancelled, Outcome::Cancelled),
            (
                JournalError::Lost("taken over".into()),
                Outcome::Interrupted("taken over".into()),
            ),
        ] {
            let journal = StopsAt(MemoryJournal::new(), 1, error);
            let model = Scripted::new(vec![Ok(call("1", "calculator", r#"{"expression": "2"}"#))]);
            let run = run_durable(&agent, "x", &model, &toolbox(), &journal).await;
            assert_eq!(run.outcome, outcome);
            assert_eq!(journal.0.steps().len(), 1, "the tool step never began");
        }
    }

    #[tokio::test]
    async fn transient_failures_are_tried_again_and_fatal_ones_end_the_run() {
        let agent = spec(r#"{"name": "a", "model": "m", "retries": 1}"#);
        let model = Scripted::new(vec![
            Err(ModelError::transient("the queue is full")),
            Ok(answer("fine")),
        ]);
        let run = run_agent(&agent, "x", &model, &toolbox()).await;
        assert_eq!(run.outcome, Outcome::Answered("fine".into()));
        assert_eq!(model.seen.lock().unwrap().len(), 2);

        let model = Scripted::new(vec![
            Err(ModelError::transient("the queue is full")),
            Err(ModelError::transient("the queue is still full")),
            Ok(answer("never asked")),
        ]);
        let run = run_agent(&agent, "x", &model, &toolbox()).await;
        assert_eq!(
            run.outcome,
            Outcome::ModelFailed("the queue is still full (after 2 tries)".into())
        );
    }

    /// Answers after `delay`.
    struct Slow(Duration);

    impl ChatModel for Slow {
        fn chat<'a>(&'a self, _: &'a ModelRequest) -> ModelFuture<'a> {
            Box::pin(async move {
                tokio::time::sleep(self.0).await;
                Ok(answer("late"))
            })
        }
    }

    #[tokio::test]
    async fn a_step_past_its_timeout_fails() {
        let agent = spec(r#"{"name": "a", "model": "m", "step_timeout_seconds": 1, "retries": 0}"#);
        let run = run_agent(&agent, "x", &Slow(Duration::from_secs(5)), &toolbox()).await;
        assert_eq!(
            run.outcome,
            Outcome::ModelFailed("the model did not answer within 1 s".into())
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
            (
                r#"{"name": "a", "model": "m", "tool_choice": "required"}"#,
                "tool_choice",
            ),
            (
                r#"{"name": "a", "model": "m", "tools": ["calculator"], "tool_choice": {"type": "function", "function": {"name": "current_time"}}}"#,
                "tool_choice",
            ),
            (
                r#"{"name": "a", "model": "m", "tool_choice": "always"}"#,
                "tool_choice",
            ),
            (r#"{"name": "a", "model": "m", "retries": 11}"#, "retries"),
            (
                r#"{"name": "a", "model": "m", "step_timeout_seconds": 0}"#,
                "step_timeout_seconds",
            ),
        ];
        for (json, field) in cases {
            let err = AgentSpec::from_json(json, &tools).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
        assert!(cap("x".repeat(MAX_TOOL_TEXT + 5)).1);
    }
}
