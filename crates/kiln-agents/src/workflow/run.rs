//! Running a workflow durably: each step that calls something (a model, a
//! tool, a search, a sub-agent's steps) goes through the [`Journal`] under
//! its path, so a replay after a crash takes recorded outputs from the
//! journal and the graph takes the same path; branches, conditions and
//! templates are computed again from those recorded outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use super::expr::{text, Env};
use super::MAX_MAP_ITEMS;
use super::{Action, AgentStep, ApprovalStep, ModelStep, RetrieveStep, Step, ToolStep, Workflow};
use crate::agent::{
    call_model, cap, journaled, reply_from_json, reply_json, run_durable, AgentSpec, Begun,
    ChatModel, Journal, JournalError, JournalFuture, ModelRequest, Outcome, StepKind, StepStart,
};
use crate::tool::ToolBox;

pub type RetrieveFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, String>> + Send + 'a>>;
pub type AgentFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(AgentSpec, i64), String>> + Send + 'a>>;

/// What a workflow run calls; the server wires it to its models (metered
/// to the run's key), tools, knowledge bases and the tenant's agents.
pub trait WorkflowEnv: Send + Sync {
    fn model(&self) -> &dyn ChatModel;
    fn tools(&self) -> &ToolBox;
    /// The `top_k` passages of the knowledge base most relevant to
    /// `query`, as a list of `{document, heading, text, score}`.
    fn retrieve<'a>(
        &'a self,
        knowledge_base: &'a str,
        query: &'a str,
        top_k: u32,
    ) -> RetrieveFuture<'a>;
    /// An agent of the run's tenant and its version (`None`: the newest).
    fn agent<'a>(&'a self, name: &'a str, version: Option<i64>) -> AgentFuture<'a>;
}

/// How a workflow run ended, or where it stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkflowOutcome {
    /// Every step ran (or was skipped); this is the workflow's output.
    Succeeded(Value),
    /// A step failed; the message names it.
    Failed(String),
    /// Paused at the approval step with this path until someone decides.
    Waiting {
        path: String,
    },
    Cancelled,
    /// The run may not go on (its key was revoked, its tenant disabled).
    Stopped(String),
    /// The journal could not be written; the run is what it says.
    Interrupted(String),
}

/// A workflow run's end and what it used.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowRun {
    pub outcome: WorkflowOutcome,
    /// Each step's output so far (null for a skipped step).
    pub outputs: BTreeMap<String, Value>,
    pub skipped: Vec<String>,
    /// Prompt and completion tokens of every model call.
    pub tokens: u64,
    /// What the model calls were charged, in nanos of their currency.
    pub cost_nanos: u64,
    /// Journaled calls made (or replayed).
    pub calls: u32,
}

/// Why a step did not give an output.
enum Halt {
    Failed(String),
    Waiting(String),
    Journal(JournalError),
}

impl From<JournalError> for Halt {
    fn from(e: JournalError) -> Halt {
        Halt::Journal(e)
    }
}

/// What a run has used against its limits; map elements share it.
struct Usage {
    max_tokens: Option<u64>,
    /// In nanos.
    max_cost: Option<u64>,
    max_calls: u32,
    inner: Mutex<Used>,
}

#[derive(Default)]
struct Used {
    tokens: u64,
    /// Tokens held for model calls under way.
    held: u64,
    calls: u32,
    cost_nanos: u64,
}

impl Usage {
    fn lock(&self) -> std::sync::MutexGuard<'_, Used> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one more call; holds `reply_tokens` of the token budget for a
    /// model call (given back by [`Usage::settle`]).
    fn start(&self, what: &str, reply_tokens: u64) -> Result<(), Halt> {
        let mut used = self.lock();
        if let Some(limit) = self.max_cost {
            if reply_tokens > 0 && used.cost_nanos >= limit {
                return Err(Halt::Failed(format!(
                    "{what} was not started: the run has been charged its budget of {} ({} spent)",
                    money(limit),
                    money(used.cost_nanos)
                )));
            }
        }
        if used.calls >= self.max_calls {
            return Err(Halt::Failed(format!(
                "{what} would be call {} of a run limited to {} (`max_steps`)",
                used.calls + 1,
                self.max_calls
            )));
        }
        if let Some(limit) = self.max_tokens {
            if used.tokens + used.held + reply_tokens > limit {
                return Err(Halt::Failed(format!(
                    "{what} could go past the run's budget of {limit} tokens ({} used)",
                    used.tokens
                )));
            }
        }
        used.calls += 1;
        used.held += reply_tokens;
        Ok(())
    }

    fn settle(&self, held: u64, tokens: u64, cost_nanos: u64) {
        let mut used = self.lock();
        used.held = used.held.saturating_sub(held);
        used.tokens += tokens;
        used.cost_nanos += cost_nanos;
    }

    /// Money left for a sub-agent.
    fn cost_left(&self) -> Option<f64> {
        let used = self.lock();
        self.max_cost
            .map(|l| l.saturating_sub(used.cost_nanos) as f64 / 1e9)
    }

    /// Tokens left for a sub-agent.
    fn tokens_left(&self) -> Option<u64> {
        let used = self.lock();
        self.max_tokens
            .map(|l| l.saturating_sub(used.tokens + used.held))
    }

    fn calls_left(&self) -> u32 {
        self.max_calls.saturating_sub(self.lock().calls)
    }
}

/// Nanos as an amount with up to nine decimals.
fn money(nanos: u64) -> String {
    let text = format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A journal whose paths are under `prefix/`: a sub-agent's steps inside a
/// workflow's run.
pub struct Scoped<'a> {
    pub inner: &'a dyn Journal,
    pub prefix: String,
}

impl Journal for Scoped<'_> {
    fn begin<'a>(&'a self, step: &'a StepStart) -> JournalFuture<'a, Begun> {
        Box::pin(async move {
            let scoped = StepStart {
                path: format!("{}/{}", self.prefix, step.path),
                ..step.clone()
            };
            self.inner.begin(&scoped).await
        })
    }

    fn finish<'a>(&'a self, path: &'a str, ok: bool, output: &'a Value) -> JournalFuture<'a, ()> {
        Box::pin(async move {
            let scoped = format!("{}/{path}", self.prefix);
            self.inner.finish(&scoped, ok, output).await
        })
    }
}

struct Runner<'a> {
    workflow: &'a Workflow,
    inputs: &'a Value,
    env: &'a dyn WorkflowEnv,
    journal: &'a dyn Journal,
    usage: Usage,
}

/// Runs `workflow` on `inputs` (already checked with
/// [`Workflow::check_inputs`]) through `journal`.
pub async fn run_workflow(
    workflow: &Workflow,
    inputs: &Value,
    env: &dyn WorkflowEnv,
    journal: &dyn Journal,
) -> WorkflowRun {
    let runner = Runner {
        workflow,
        inputs,
        env,
        journal,
        usage: Usage {
            max_tokens: workflow.max_tokens,
            max_cost: workflow.max_cost.map(crate::agent::nanos),
            max_calls: workflow.max_steps,
            inner: Mutex::new(Used::default()),
        },
    };
    let mut outputs: BTreeMap<String, Value> = BTreeMap::new();
    let mut skipped: BTreeSet<String> = BTreeSet::new();
    let mut chosen: BTreeMap<String, bool> = BTreeMap::new();
    let outcome = 'run: {
        for step in &workflow.steps {
            let env = Env {
                inputs,
                steps: &outputs,
                item: None,
            };
            match runner.should_run(step, &env, &skipped, &chosen) {
                Ok(true) => {}
                Ok(false) => {
                    outputs.insert(step.id.clone(), Value::Null);
                    skipped.insert(step.id.clone());
                    continue;
                }
                Err(why) => break 'run WorkflowOutcome::Failed(why),
            }
            let output = match runner.step(step, &outputs).await {
                Ok(v) => v,
                Err(halt) => break 'run runner.halted(halt),
            };
            if matches!(step.action, Action::Branch(_)) {
                chosen.insert(step.id.clone(), output == Value::Bool(true));
            }
            outputs.insert(step.id.clone(), output);
        }
        let env = Env {
            inputs,
            steps: &outputs,
            item: None,
        };
        match &workflow.output {
            None => WorkflowOutcome::Succeeded(Value::Object(
                outputs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )),
            Some(t) => match t.eval(&env) {
                Ok(v) => WorkflowOutcome::Succeeded(v),
                Err(why) => WorkflowOutcome::Failed(format!("the workflow's `output`: {why}")),
            },
        }
    };
    let used = runner.usage.lock();
    WorkflowRun {
        outcome,
        outputs: outputs.clone(),
        skipped: skipped.into_iter().collect(),
        tokens: used.tokens,
        cost_nanos: used.cost_nanos,
        calls: used.calls,
    }
}

impl Runner<'_> {
    fn halted(&self, halt: Halt) -> WorkflowOutcome {
        match halt {
            Halt::Failed(why) => WorkflowOutcome::Failed(why),
            Halt::Waiting(path) => WorkflowOutcome::Waiting { path },
            Halt::Journal(JournalError::Cancelled) => WorkflowOutcome::Cancelled,
            Halt::Journal(JournalError::Stopped(why)) => WorkflowOutcome::Stopped(why),
            Halt::Journal(JournalError::Lost(why)) => WorkflowOutcome::Interrupted(why),
        }
    }

    /// Whether a step runs: its branch chose it, its `when` holds, or
    /// (without a `when`) none of its dependencies was skipped.
    fn should_run(
        &self,
        step: &Step,
        env: &Env<'_>,
        skipped: &BTreeSet<String>,
        chosen: &BTreeMap<String, bool>,
    ) -> Result<bool, String> {
        if let Some((branch, side)) = &step.gate {
            if chosen.get(branch) != Some(side) {
                return Ok(false);
            }
        }
        match &step.when {
            Some(condition) => match condition.eval(env) {
                Ok(Value::Bool(b)) => Ok(b),
                Ok(other) => Err(format!(
                    "step `{}`: `when` gave {}, not true or false",
                    step.id,
                    super::types::kind_of(&other)
                )),
                Err(why) => Err(format!("step `{}`: `when`: {why}", step.id)),
            },
            None => Ok(!step.needs.iter().any(|n| skipped.contains(n))),
        }
    }

    async fn step(&self, step: &Step, outputs: &BTreeMap<String, Value>) -> Result<Value, Halt> {
        let env = Env {
            inputs: self.inputs,
            steps: outputs,
            item: None,
        };
        let id = &step.id;
        let failed = |why: String| Halt::Failed(format!("step `{id}`: {why}"));
        match &step.action {
            Action::Branch(condition) => match condition.eval(&env).map_err(failed)? {
                Value::Bool(b) => Ok(Value::Bool(b)),
                other => Err(failed(format!(
                    "`if` gave {}, not true or false",
                    super::types::kind_of(&other)
                ))),
            },
            Action::Approval(a) => self.approval(id, a, &env).await,
            Action::Map(m) => {
                let list = match m
                    .over
                    .eval(&env)
                    .map_err(|e| failed(format!("`over`: {e}")))?
                {
                    Value::Array(items) => items,
                    other => {
                        return Err(failed(format!(
                            "`over` gave {}, not a list",
                            super::types::kind_of(&other)
                        )))
                    }
                };
                if list.len() > MAX_MAP_ITEMS {
                    return Err(failed(format!(
                        "`over` gave {} elements; a map takes at most {MAX_MAP_ITEMS}",
                        list.len()
                    )));
                }
                // Built first, not in a stream adapter's closure, so the
                // future stays `Send` for any lifetime.
                let mut items = Vec::with_capacity(list.len());
                for (i, item) in list.iter().enumerate() {
                    items.push(self.element(id, &m.step, outputs, item, i));
                }
                let results: Vec<Result<Value, Halt>> = futures::stream::iter(items)
                    .buffered(m.concurrency as usize)
                    .collect()
                    .await;
                results
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()
                    .map(Value::Array)
            }
            action => self.action(id, action, &env).await,
        }
    }

    /// One element of a map: the map's step with `item` and `index` set.
    async fn element(
        &self,
        id: &str,
        action: &Action,
        outputs: &BTreeMap<String, Value>,
        item: &Value,
        index: usize,
    ) -> Result<Value, Halt> {
        let env = Env {
            inputs: self.inputs,
            steps: outputs,
            item: Some((item, index)),
        };
        self.action(&format!("{id}[{index}]"), action, &env).await
    }

    /// A step that calls something: a model, a tool, a search, an agent.
    async fn action(&self, path: &str, action: &Action, env: &Env<'_>) -> Result<Value, Halt> {
        match action {
            Action::Model(m) => self.model(path, m, env).await,
            Action::Tool(t) => self.tool(path, t, env).await,
            Action::Retrieve(r) => self.retrieve(path, r, env).await,
            Action::Agent(a) => self.agent(path, a, env).await,
            Action::Branch(_) | Action::Map(_) | Action::Approval(_) => Err(Halt::Failed(format!(
                "step `{path}`: only a model, tool, retrieve or agent step can be mapped"
            ))),
        }
    }

    async fn model(&self, path: &str, m: &ModelStep, env: &Env<'_>) -> Result<Value, Halt> {
        let failed = |why: String| Halt::Failed(format!("step `{path}`: {why}"));
        let prompt = m
            .prompt
            .render(env)
            .map_err(|e| failed(format!("`prompt`: {e}")))?;
        let system = match &m.system {
            Some(t) => Some(
                t.render(env)
                    .map_err(|e| failed(format!("`system`: {e}")))?,
            ),
            None => None,
        };
        let mut messages = Vec::new();
        if let Some(s) = &system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": prompt}));
        let response_format = m.schema.as_ref().map(|(schema, _)| {
            json!({"type": "json_schema",
                "json_schema": {"name": "output", "schema": schema, "strict": true}})
        });
        let request = ModelRequest {
            model: m.model.clone(),
            messages,
            tools: Vec::new(),
            tool_choice: None,
            max_tokens: m.max_tokens,
            temperature: m.temperature,
            response_format,
            key: None,
        };
        let start = StepStart {
            path: path.to_string(),
            kind: StepKind::Model,
            name: m.model.clone(),
            input: json!({"system": system, "prompt": prompt, "max_tokens": m.max_tokens,
                "output": m.schema.as_ref().map(|(schema, _)| schema)}),
        };
        let held = u64::from(m.max_tokens);
        self.usage.start(&format!("step `{path}`"), held)?;
        let result = journaled(self.journal, &start, |key| async {
            let w = self.workflow;
            let request = ModelRequest {
                key: Some(key),
                ..request
            };
            match call_model(
                self.env.model(),
                &request,
                w.step_timeout_seconds,
                w.retries,
            )
            .await
            {
                Ok(reply) => (true, reply_json(&reply)),
                Err(e) => (false, json!({"error": e.message})),
            }
        })
        .await;
        let (ok, output) = match result {
            Ok(r) => r,
            Err(e) => {
                self.usage.settle(held, 0, 0);
                return Err(e.into());
            }
        };
        if !ok {
            self.usage.settle(held, 0, 0);
            let why = output["error"].as_str().unwrap_or("the model call failed");
            return Err(failed(format!("the model call failed: {why}")));
        }
        let Some(reply) = reply_from_json(&output) else {
            self.usage.settle(held, 0, 0);
            return Err(Halt::Journal(JournalError::Lost(format!(
                "step {path} of the journal does not hold a model reply"
            ))));
        };
        self.usage.settle(
            held,
            reply.prompt_tokens + reply.completion_tokens,
            reply.cost_nanos,
        );
        let content = reply.content.unwrap_or_default();
        let Some((_, want)) = &m.schema else {
            return Ok(Value::String(content));
        };
        if reply.finish_reason.as_deref() == Some("length") {
            return Err(failed(format!(
                "the reply was cut at `max_tokens` ({}) before its JSON was complete",
                m.max_tokens
            )));
        }
        let value: Value = serde_json::from_str(&content)
            .map_err(|e| failed(format!("the reply is not the JSON asked for: {e}")))?;
        if let Some(why) = want.check(&value) {
            return Err(failed(format!("the reply does not fit `output`: {why}")));
        }
        Ok(value)
    }

    async fn tool(&self, path: &str, t: &ToolStep, env: &Env<'_>) -> Result<Value, Halt> {
        let failed = |why: String| Halt::Failed(format!("step `{path}`: {why}"));
        let arguments = t
            .arguments
            .eval(env)
            .map_err(|e| failed(format!("`arguments`: {e}")))?;
        let start = StepStart {
            path: path.to_string(),
            kind: StepKind::Tool,
            name: t.tool.clone(),
            input: json!({"arguments": arguments}),
        };
        self.usage.start(&format!("step `{path}`"), 0)?;
        let limit = Duration::from_secs(self.workflow.step_timeout_seconds);
        let (ok, output) = journaled(self.journal, &start, |key| async move {
            let called =
                tokio::time::timeout(limit, self.env.tools().call_keyed(&t.tool, &arguments, Some(&key)))
                    .await;
            match called {
                Ok(Ok(out)) => {
                    let (text, cut) = cap(out.text);
                    (true, json!({"text": text, "truncated": out.truncated || cut}))
                }
                Ok(Err(e)) => (false, json!({"error": e.to_string()})),
                Err(_) => (
                    false,
                    json!({"error": format!("the tool did not finish within {} s", limit.as_secs())}),
                ),
            }
        })
        .await?;
        if !ok {
            let why = output["error"].as_str().unwrap_or("it failed");
            return Err(failed(format!("the tool `{}` failed: {why}", t.tool)));
        }
        Ok(Value::String(text(&output["text"])))
    }

    async fn retrieve(&self, path: &str, r: &RetrieveStep, env: &Env<'_>) -> Result<Value, Halt> {
        let failed = |why: String| Halt::Failed(format!("step `{path}`: {why}"));
        let kb = r
            .knowledge_base
            .render(env)
            .map_err(|e| failed(format!("`knowledge_base`: {e}")))?;
        let query = r
            .query
            .render(env)
            .map_err(|e| failed(format!("`query`: {e}")))?;
        let start = StepStart {
            path: path.to_string(),
            kind: StepKind::Retrieve,
            name: kb.clone(),
            input: json!({"query": query, "top_k": r.top_k}),
        };
        self.usage.start(&format!("step `{path}`"), 0)?;
        let (ok, output) = journaled(self.journal, &start, |_| async {
            match self.env.retrieve(&kb, &query, r.top_k).await {
                Ok(passages) => (true, passages),
                Err(e) => (false, json!({"error": e})),
            }
        })
        .await?;
        if !ok {
            let why = output["error"].as_str().unwrap_or("it failed");
            return Err(failed(format!("the search of `{kb}` failed: {why}")));
        }
        Ok(output)
    }

    async fn agent(&self, path: &str, a: &AgentStep, env: &Env<'_>) -> Result<Value, Halt> {
        let failed = |why: String| Halt::Failed(format!("step `{path}`: {why}"));
        let input = a
            .input
            .render(env)
            .map_err(|e| failed(format!("`input`: {e}")))?;
        // The version is fixed the first time the step runs, so a replay
        // runs the same agent even if a newer one was saved meanwhile.
        let start = StepStart {
            path: format!("{path}/version"),
            kind: StepKind::Agent,
            name: a.agent.clone(),
            input: json!({"version": a.version}),
        };
        let (ok, found) = journaled(self.journal, &start, |_| async {
            match self.env.agent(&a.agent, a.version).await {
                Ok((_, version)) => (true, json!({"version": version})),
                Err(e) => (false, json!({"error": e})),
            }
        })
        .await?;
        if !ok {
            let why = found["error"].as_str().unwrap_or("it cannot be found");
            return Err(failed(format!("the agent `{}`: {why}", a.agent)));
        }
        let version = found["version"].as_i64();
        let (mut spec, _) = self
            .env
            .agent(&a.agent, version)
            .await
            .map_err(|e| failed(format!("the agent `{}`: {e}", a.agent)))?;
        // The sub-agent spends from what the run has left.
        if let Some(left) = self.usage.tokens_left() {
            spec.max_tokens = Some(spec.max_tokens.map_or(left, |m| m.min(left)).max(1));
        }
        if let Some(left) = self.usage.cost_left() {
            spec.max_cost = Some(spec.max_cost.map_or(left, |m| m.min(left)).max(1e-9));
        }
        spec.max_steps = spec.max_steps.min(self.usage.calls_left().max(1));
        let scoped = Scoped {
            inner: self.journal,
            prefix: path.to_string(),
        };
        let run = run_durable(&spec, &input, self.env.model(), self.env.tools(), &scoped).await;
        {
            let mut used = self.usage.lock();
            used.tokens += run.tokens;
            used.cost_nanos += run.cost_nanos;
            used.calls += u32::try_from(run.events.len()).unwrap_or(u32::MAX);
        }
        match run.outcome {
            Outcome::Answered(answer) => Ok(Value::String(answer)),
            Outcome::StepLimit => Err(failed(format!(
                "the agent `{}` took its {} steps without answering",
                a.agent, spec.max_steps
            ))),
            Outcome::TokenBudget => Err(failed(format!(
                "the agent `{}` reached the token budget",
                a.agent
            ))),
            Outcome::CostBudget => Err(failed(format!(
                "the agent `{}` reached the cost budget",
                a.agent
            ))),
            Outcome::ModelFailed(why) => Err(failed(format!(
                "the agent `{}`: the model call failed: {why}",
                a.agent
            ))),
            Outcome::Cancelled => Err(Halt::Journal(JournalError::Cancelled)),
            Outcome::Stopped(why) => Err(Halt::Journal(JournalError::Stopped(why))),
            Outcome::Interrupted(why) => Err(Halt::Journal(JournalError::Lost(why))),
        }
    }

    async fn approval(&self, id: &str, a: &ApprovalStep, env: &Env<'_>) -> Result<Value, Halt> {
        let failed = |why: String| Halt::Failed(format!("step `{id}`: {why}"));
        let message = a
            .message
            .render(env)
            .map_err(|e| failed(format!("`message`: {e}")))?;
        let start = StepStart {
            path: id.to_string(),
            kind: StepKind::Approval,
            name: "approval".into(),
            input: json!({"message": message, "group": a.group, "allow_self": a.allow_self}),
        };
        match self.journal.begin(&start).await? {
            // Begun (again): wait for a person; the API records the decision
            // as this step's output.
            Begun::Run { .. } => Err(Halt::Waiting(id.to_string())),
            Begun::Recorded { output, .. } => {
                let decision = json!({
                    "approved": output["approved"].as_bool().unwrap_or(false),
                    "by": text(&output["by"]),
                    "comment": text(&output["comment"]),
                });
                if decision["approved"] == Value::Bool(false) && !a.continue_on_reject {
                    let comment = match decision["comment"].as_str() {
                        Some(c) if !c.is_empty() => format!(": {c}"),
                        _ => String::new(),
                    };
                    return Err(failed(format!(
                        "rejected by {}{comment}",
                        decision["by"].as_str().unwrap_or("someone")
                    )));
                }
                Ok(decision)
            }
        }
    }
}
