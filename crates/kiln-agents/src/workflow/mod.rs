//! Workflows: a declared graph of steps, checked when it is registered and
//! run durably by [`run_workflow`].
//!
//! ```yaml
//! name: triage
//! inputs:
//!   ticket: {type: string}
//! steps:
//!   - id: classify
//!     kind: model
//!     model: smollm2-135m-instruct
//!     prompt: "Is this ticket urgent? {{ inputs.ticket }}"
//!     output:
//!       type: object
//!       properties: {urgent: {type: boolean}}
//!       required: [urgent]
//!   - id: route
//!     kind: branch
//!     if: "{{ steps.classify.output.urgent }}"
//!     then: [sign_off]
//!     else: [answer]
//!   - id: sign_off
//!     kind: approval
//!     message: "Escalate {{ inputs.ticket }}?"
//!   - id: answer
//!     kind: agent
//!     agent: helpdesk
//!     input: "{{ inputs.ticket }}"
//! output:
//!   urgent: "{{ steps.classify.output.urgent }}"
//!   reply: "{{ coalesce(steps.answer.output, 'escalated') }}"
//! ```
//!
//! # Steps
//!
//! Every step has an `id` and a `kind`, and may have `needs` (steps that
//! must run first) and `when` (a condition; false skips the step).
//!
//! | kind | does | its output |
//! |---|---|---|
//! | `model` | one chat call: `prompt`, optional `system`; with an `output` JSON Schema the reply is decoded under that schema | the text, or the parsed JSON of the schema's type |
//! | `tool` | calls a tool with `arguments` (a JSON object whose strings may be templates) | the tool's text |
//! | `retrieve` | searches `knowledge_base` for `query`, `top_k` passages | a list of `{document, heading, text, score}` |
//! | `branch` | evaluates `if`; the steps listed in `then` run when it is true, those in `else` when false | the boolean |
//! | `map` | runs `step` (a model, tool, retrieve or agent step) once per element of `over`, up to `concurrency` at a time; inside it `item` and `index` name the element | the list of outputs, in order |
//! | `approval` | pauses the run until someone with the right to approve does so through the API (no time limit) | `{approved, by, comment}` |
//! | `agent` | runs one of the tenant's agents on `input`, its steps journaled inside this run | the agent's answer |
//!
//! # The graph
//!
//! A step runs after the steps it `needs`, the steps its templates name
//! (`steps.<id>.output`) and the branch that lists it; those edges must not
//! form a cycle. Steps run one at a time in that order (ties in the order
//! they are declared), so a resumed run takes the same path; a `map` runs
//! its elements in parallel.
//!
//! A step is skipped when a branch did not choose it, when its `when` is
//! false, or — unless it has a `when` of its own — when a step it depends on
//! was skipped. A skipped step's output is null; `coalesce` joins branches.
//!
//! # Types
//!
//! Inputs are declared as JSON Schemas (an input with a `default` may be
//! left out), and each step's output has a type (see the table). Every
//! template and condition is type-checked at registration: a field that is
//! not there, a condition that is not a boolean, a map over something that
//! is not a list, a tool argument of the wrong type — each is an error that
//! names the step and the field.

mod expr;
mod run;
mod types;

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::tool::ToolBox;

pub use expr::{Env, Expr, Scope, Template, ValueTemplate};
pub use run::{
    run_workflow, AgentFuture, RetrieveFuture, Scoped, WorkflowEnv, WorkflowOutcome, WorkflowRun,
};
pub use types::{ObjectType, Type};

/// Most steps a workflow may declare.
pub const MAX_WORKFLOW_STEPS: usize = 100;
/// Most elements one map step runs over.
pub const MAX_MAP_ITEMS: usize = 1000;
/// Most map elements run at once.
pub const MAX_CONCURRENCY: u32 = 16;
/// Most journaled calls (model, tool, retrieval, agent steps) per run.
pub const MAX_WORKFLOW_CALLS: u32 = 10_000;

/// A registered workflow, checked and in the order its steps run.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub name: String,
    pub description: String,
    /// Each input's schema, by name.
    pub inputs: BTreeMap<String, Value>,
    /// The inputs as one object type.
    pub input_type: Type,
    /// In the order they run.
    pub steps: Vec<Step>,
    /// `None`: an object of every step's output.
    pub output: Option<ValueTemplate>,
    /// Journaled calls per run at most.
    pub max_steps: u32,
    /// Tokens (prompt plus completion) per run at most.
    pub max_tokens: Option<u64>,
    /// Money per run at most, in the currency of the models' prices; no
    /// model step starts once the run has been charged this much.
    pub max_cost: Option<f64>,
    pub step_timeout_seconds: u64,
    pub retries: u32,
}

/// One checked step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    /// Every step that must run before it.
    pub needs: Vec<String>,
    pub when: Option<Expr>,
    /// The branch that lists it, and on which side.
    pub gate: Option<(String, bool)>,
    pub action: Action,
    pub output_type: Type,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Model(ModelStep),
    Tool(ToolStep),
    Retrieve(RetrieveStep),
    Agent(AgentStep),
    Branch(Expr),
    Map(MapStep),
    Approval(ApprovalStep),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelStep {
    pub model: String,
    pub system: Option<Template>,
    pub prompt: Template,
    /// The JSON Schema the reply is decoded under, and the type it gives
    /// the reply.
    pub schema: Option<(Value, Type)>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolStep {
    pub tool: String,
    pub arguments: ValueTemplate,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetrieveStep {
    pub knowledge_base: Template,
    pub query: Template,
    pub top_k: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentStep {
    pub agent: String,
    /// `None`: the newest version when the step first runs (then kept).
    pub version: Option<i64>,
    pub input: Template,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MapStep {
    pub over: Template,
    pub concurrency: u32,
    /// A model, tool, retrieve or agent step.
    pub step: Box<Action>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalStep {
    pub message: Template,
    /// Keys of this group may approve (tenant admins always may).
    pub group: Option<String>,
    /// The key that started the run may approve it too.
    pub allow_self: bool,
    /// A rejection lets the run go on (the output says `approved: false`)
    /// instead of failing it.
    pub continue_on_reject: bool,
}

/// What a workflow may refer to, as the registering tenant sees it.
pub trait Catalog {
    fn tools(&self) -> &ToolBox;
    fn has_model(&self, name: &str) -> bool;
    /// Whether the tenant has this agent (this version of it).
    fn has_agent(&self, name: &str, version: Option<i64>) -> bool;
}

/// Why a workflow cannot be registered, pointing at the step and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct WorkflowError {
    /// `steps[2] (route)`, or `None` for the workflow's own fields.
    pub step: Option<String>,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.step {
            Some(step) => write!(
                f,
                "workflow step {step}, `{}`: {}",
                self.field, self.message
            ),
            None => write!(f, "workflow `{}`: {}", self.field, self.message),
        }
    }
}

fn top(field: &str, message: impl Into<String>) -> WorkflowError {
    WorkflowError {
        step: None,
        field: field.into(),
        message: message.into(),
    }
}

/// The output of a `retrieve` step.
pub fn passages_type() -> Type {
    Type::Array(Box::new(Type::record(&[
        ("document", Type::String),
        ("heading", Type::String),
        ("text", Type::String),
        ("score", Type::Number),
    ])))
}

/// The output of an `approval` step.
pub fn approval_type() -> Type {
    Type::record(&[
        ("approved", Type::Boolean),
        ("by", Type::String),
        ("comment", Type::String),
    ])
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    inputs: BTreeMap<String, Value>,
    steps: Vec<Value>,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default = "default_max_steps")]
    max_steps: u32,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_cost: Option<f64>,
    #[serde(default = "default_timeout")]
    step_timeout_seconds: u64,
    #[serde(default = "default_retries")]
    retries: u32,
}

fn default_max_steps() -> u32 {
    100
}
fn default_timeout() -> u64 {
    300
}
fn default_retries() -> u32 {
    3
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFields {
    model: String,
    #[serde(default)]
    system: Option<String>,
    prompt: String,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default = "default_step_tokens")]
    max_tokens: u32,
    #[serde(default)]
    temperature: Option<f32>,
}

fn default_step_tokens() -> u32 {
    256
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolFields {
    tool: String,
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetrieveFields {
    knowledge_base: String,
    query: String,
    #[serde(default = "default_top_k")]
    top_k: u32,
}

fn default_top_k() -> u32 {
    5
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFields {
    agent: String,
    #[serde(default)]
    version: Option<i64>,
    input: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BranchFields {
    #[serde(rename = "if")]
    condition: String,
    #[serde(default)]
    then: Vec<String>,
    #[serde(default, rename = "else")]
    otherwise: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFields {
    over: String,
    step: Value,
    #[serde(default = "default_concurrency")]
    concurrency: u32,
}

fn default_concurrency() -> u32 {
    4
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalFields {
    #[serde(default)]
    message: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    allow_self: bool,
    #[serde(default)]
    on_reject: Option<String>,
}

/// A step as parsed, before the graph is known.
struct Parsed {
    id: String,
    needs: Vec<String>,
    when: Option<Expr>,
    action: Action,
    /// Its then/else lists, for a branch.
    arms: Option<(Vec<String>, Vec<String>)>,
}

/// Is this a step id: `[a-z][a-z0-9_]*`, at most 64 characters.
fn valid_id(id: &str) -> bool {
    id.len() <= 64
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The form conditions take: `{{ expr }}` or the bare expression.
fn condition(text: &str) -> Result<Expr, String> {
    let t = text.trim();
    match t.strip_prefix("{{").and_then(|t| t.strip_suffix("}}")) {
        Some(inner) if !inner.contains("{{") => Expr::parse(inner),
        _ => Expr::parse(t),
    }
}

fn template(text: &str) -> Result<Template, String> {
    Template::parse(text)
}

impl Workflow {
    /// Reads a JSON declaration and checks it against what `catalog` has.
    pub fn from_json(text: &str, catalog: &dyn Catalog) -> Result<Workflow, WorkflowError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| top("(document)", e.to_string()))?;
        Workflow::from_value(&value, catalog)
    }

    pub fn from_value(value: &Value, catalog: &dyn Catalog) -> Result<Workflow, WorkflowError> {
        let doc = Document::deserialize(value).map_err(|e| top("(document)", e.to_string()))?;
        let name_ok = !doc.name.is_empty()
            && doc.name.len() <= 64
            && doc
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(top("name", "must be 1 to 64 of a-z, 0-9, `_` and `-`"));
        }
        if doc.steps.is_empty() {
            return Err(top("steps", "a workflow needs at least one step"));
        }
        if doc.steps.len() > MAX_WORKFLOW_STEPS {
            return Err(top(
                "steps",
                format!(
                    "has {} steps; at most {MAX_WORKFLOW_STEPS}",
                    doc.steps.len()
                ),
            ));
        }
        if doc.max_steps == 0 || doc.max_steps > MAX_WORKFLOW_CALLS {
            return Err(top(
                "max_steps",
                format!("must be between 1 and {MAX_WORKFLOW_CALLS}"),
            ));
        }
        if doc.max_tokens == Some(0) {
            return Err(top("max_tokens", "must be at least 1 when given"));
        }
        if let Some(why) = crate::agent::check_cost(doc.max_cost) {
            return Err(top("max_cost", why));
        }
        if !(1..=86_400).contains(&doc.step_timeout_seconds) {
            return Err(top("step_timeout_seconds", "must be between 1 and 86400"));
        }
        if doc.retries > crate::agent::MAX_RETRIES {
            return Err(top(
                "retries",
                format!("must be at most {}", crate::agent::MAX_RETRIES),
            ));
        }
        let input_type = input_type(&doc.inputs)?;

        // Each step on its own.
        let mut parsed: Vec<Parsed> = Vec::with_capacity(doc.steps.len());
        let mut labels: BTreeMap<String, String> = BTreeMap::new();
        for (i, raw) in doc.steps.iter().enumerate() {
            let id = raw.get("id").and_then(Value::as_str).unwrap_or_default();
            let label = if id.is_empty() {
                format!("steps[{i}]")
            } else {
                format!("`{}` (steps[{i}])", id.chars().take(64).collect::<String>())
            };
            let p = parse_step(raw).map_err(|(field, message)| WorkflowError {
                step: Some(label.clone()),
                field,
                message,
            })?;
            if labels.insert(p.id.clone(), label.clone()).is_some() {
                return Err(WorkflowError {
                    step: Some(label),
                    field: "id".into(),
                    message: format!("another step is also called `{}`", p.id),
                });
            }
            parsed.push(p);
        }
        let err = |id: &str, field: &str, message: String| WorkflowError {
            step: labels.get(id).cloned(),
            field: field.into(),
            message,
        };

        // The edges: needs, names in templates, branches.
        let mut gates: BTreeMap<String, (String, bool)> = BTreeMap::new();
        for p in &parsed {
            if let Some((then, otherwise)) = &p.arms {
                for (field, side, ids) in [("then", true, then), ("else", false, otherwise)] {
                    for target in ids {
                        if !labels.contains_key(target) {
                            return Err(err(&p.id, field, format!("names no step `{target}`")));
                        }
                        if *target == p.id {
                            return Err(err(&p.id, field, "a branch cannot list itself".into()));
                        }
                        if let Some((other, _)) = gates.insert(target.clone(), (p.id.clone(), side))
                        {
                            return Err(err(
                                &p.id,
                                field,
                                format!("`{target}` is already listed by the branch `{other}`; a step can be on one side of one branch"),
                            ));
                        }
                    }
                }
            }
        }
        let mut needs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for p in &parsed {
            let mut named = Vec::new();
            for n in &p.needs {
                if !labels.contains_key(n) {
                    return Err(err(&p.id, "needs", format!("names no step `{n}`")));
                }
                named.push(n.clone());
            }
            let mut referenced = Vec::new();
            action_steps_named(&p.action, &mut referenced);
            if let Some(w) = &p.when {
                w.steps_named(&mut referenced);
            }
            for r in &referenced {
                if !labels.contains_key(r) {
                    let known: Vec<&str> = labels.keys().map(String::as_str).collect();
                    return Err(err(
                        &p.id,
                        "(template)",
                        format!(
                            "`steps.{r}` names no step (the steps: {})",
                            known.join(", ")
                        ),
                    ));
                }
            }
            named.extend(referenced);
            if let Some((branch, _)) = gates.get(&p.id) {
                named.push(branch.clone());
            }
            if named.contains(&p.id) {
                return Err(err(&p.id, "needs", "a step cannot depend on itself".into()));
            }
            needs.insert(p.id.clone(), named.into_iter().collect());
        }
        let order = run_order(&parsed, &needs).map_err(|cycle| {
            err(
                &cycle[0],
                "needs",
                format!(
                    "the steps form a cycle: {} (a step's templates and `needs` must only name steps that can run before it)",
                    cycle.join(" → ")
                ),
            )
        })?;

        // Types, in run order.
        let mut by_id: BTreeMap<String, Parsed> =
            parsed.into_iter().map(|p| (p.id.clone(), p)).collect();
        let mut types: BTreeMap<String, Type> = BTreeMap::new();
        let mut steps = Vec::with_capacity(order.len());
        for id in order {
            let Some(p) = by_id.remove(&id) else { continue };
            let scope = Scope {
                inputs: &input_type,
                steps: &types,
                item: None,
            };
            let fail = |field: &str, message: String| err(&id, field, message);
            if let Some(w) = &p.when {
                match w.type_of(&scope).map_err(|m| fail("when", m))? {
                    Type::Boolean | Type::Any => {}
                    other => {
                        return Err(fail("when", format!("must be true or false, not {other}")))
                    }
                }
            }
            let output_type =
                check_action(&p.action, &scope, catalog).map_err(|(f, m)| fail(&f, m))?;
            types.insert(id.clone(), output_type.clone());
            steps.push(Step {
                gate: gates.get(&id).cloned(),
                needs: needs.remove(&id).unwrap_or_default().into_iter().collect(),
                id,
                when: p.when,
                action: p.action,
                output_type,
            });
        }
        let output = match &doc.output {
            None => None,
            Some(v) => {
                let t = ValueTemplate::parse(v).map_err(|m| top("output", m))?;
                let scope = Scope {
                    inputs: &input_type,
                    steps: &types,
                    item: None,
                };
                t.type_of(&scope).map_err(|m| top("output", m))?;
                Some(t)
            }
        };
        Ok(Workflow {
            name: doc.name,
            description: doc.description,
            inputs: doc.inputs,
            input_type,
            steps,
            output,
            max_steps: doc.max_steps,
            max_tokens: doc.max_tokens,
            max_cost: doc.max_cost,
            step_timeout_seconds: doc.step_timeout_seconds,
            retries: doc.retries,
        })
    }

    /// The models its model steps call (its agents' models not included).
    pub fn models(&self) -> Vec<&str> {
        let mut models: Vec<&str> = Vec::new();
        for step in &self.steps {
            let action = match &step.action {
                Action::Map(m) => &*m.step,
                other => other,
            };
            if let Action::Model(m) = action {
                if !models.contains(&m.model.as_str()) {
                    models.push(&m.model);
                }
            }
        }
        models
    }

    /// A run's inputs, checked against the declared types, with defaults
    /// filled in; `Err` says which input is wrong and how.
    pub fn check_inputs(&self, inputs: &Value) -> Result<Value, String> {
        let mut given = match inputs {
            Value::Object(map) => map.clone(),
            Value::Null if self.inputs.is_empty() => Map::new(),
            other => {
                return Err(format!(
                    "the inputs must be an object of {}, not {}",
                    self.inputs.keys().cloned().collect::<Vec<_>>().join(", "),
                    types::kind_of(other)
                ))
            }
        };
        if let Some(extra) = given.keys().find(|k| !self.inputs.contains_key(*k)) {
            return Err(format!("there is no input `{extra}`"));
        }
        for (name, schema) in &self.inputs {
            if !given.contains_key(name) {
                match schema.get("default") {
                    Some(d) => {
                        given.insert(name.clone(), d.clone());
                    }
                    None => return Err(format!("the input `{name}` is missing")),
                }
            }
        }
        let value = Value::Object(given);
        match self.input_type.check(&value) {
            Some(why) => Err(format!("inputs: {why}")),
            None => Ok(value),
        }
    }
}

fn input_type(inputs: &BTreeMap<String, Value>) -> Result<Type, WorkflowError> {
    let mut fields = BTreeMap::new();
    let mut required = Vec::new();
    for (name, schema) in inputs {
        if !valid_id(name) {
            return Err(top(
                "inputs",
                format!(
                    "`{name}` is not an input name: use a-z, 0-9 and `_`, starting with a letter"
                ),
            ));
        }
        let t = Type::from_schema(schema).map_err(|m| top(&format!("inputs.{name}"), m))?;
        if let Some(d) = schema.get("default") {
            if let Some(why) = t.check(d) {
                return Err(top(
                    &format!("inputs.{name}"),
                    format!("the default: {why}"),
                ));
            }
        } else {
            required.push(name.clone());
        }
        fields.insert(name.clone(), t);
    }
    Ok(Type::Object(ObjectType {
        fields: Some(fields),
        required,
        closed: true,
    }))
}

type FieldError = (String, String);

fn parse_step(raw: &Value) -> Result<Parsed, FieldError> {
    let f = |field: &str, m: String| (field.to_string(), m);
    let Value::Object(map) = raw else {
        return Err(f(
            "(step)",
            "a step must be an object with an `id` and a `kind`".into(),
        ));
    };
    let mut map = map.clone();
    let id = match map.remove("id") {
        Some(Value::String(id)) if valid_id(&id) => id,
        Some(Value::String(_)) => {
            return Err(f(
                "id",
                "must be a-z, 0-9 and `_`, starting with a letter, at most 64 characters".into(),
            ))
        }
        _ => return Err(f("id", "every step needs an `id`".into())),
    };
    let needs = match map.remove("needs") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(v) => Vec::<String>::deserialize(&v)
            .map_err(|_| f("needs", "must be a list of step ids".into()))?,
    };
    let when = match map.remove("when") {
        None => None,
        Some(Value::String(s)) => Some(condition(&s).map_err(|m| f("when", m))?),
        Some(Value::Bool(b)) => Some(Expr::Literal(Value::Bool(b))),
        Some(_) => {
            return Err(f(
                "when",
                "must be a condition such as \"{{ inputs.n > 2 }}\"".into(),
            ))
        }
    };
    map.remove("description");
    let kind =
        match map.remove("kind") {
            Some(Value::String(k)) => k,
            _ => return Err(f(
                "kind",
                "every step needs a `kind`: model, tool, retrieve, branch, map, approval or agent"
                    .into(),
            )),
        };
    let rest = Value::Object(map);
    let (action, arms) = parse_action(&kind, &rest, false)?;
    Ok(Parsed {
        id,
        needs,
        when,
        action,
        arms,
    })
}

type Arms = Option<(Vec<String>, Vec<String>)>;

/// One step's kind-specific fields; `inner` for a map's step (no branch,
/// map or approval there).
fn parse_action(kind: &str, rest: &Value, inner: bool) -> Result<(Action, Arms), FieldError> {
    fn fields<T: for<'de> Deserialize<'de>>(kind: &str, rest: &Value) -> Result<T, FieldError> {
        T::deserialize(rest).map_err(|e| (format!("({kind} step)"), e.to_string()))
    }
    let f = |field: &str, m: String| (field.to_string(), m);
    if inner && matches!(kind, "branch" | "map" | "approval") {
        return Err(f(
            "kind",
            format!("a map's step is a model, tool, retrieve or agent step, not {kind}"),
        ));
    }
    Ok(match kind {
        "model" => {
            let m: ModelFields = fields(kind, rest)?;
            if m.model.trim().is_empty() {
                return Err(f("model", "must name a model".into()));
            }
            if !(1..=8192).contains(&m.max_tokens) {
                return Err(f("max_tokens", "must be between 1 and 8192".into()));
            }
            if m.temperature.is_some_and(|t| !t.is_finite() || !(0.0..=2.0).contains(&t)) {
                return Err(f("temperature", "must be between 0 and 2".into()));
            }
            let system = m
                .system
                .as_deref()
                .map(template)
                .transpose()
                .map_err(|e| f("system", e))?;
            let prompt = template(&m.prompt).map_err(|e| f("prompt", e))?;
            let schema = match m.output {
                None => None,
                Some(schema) => {
                    if schema.get("type").and_then(Value::as_str) != Some("object") {
                        return Err(f(
                            "output",
                            "must be a JSON Schema of `type: object`".into(),
                        ));
                    }
                    let t = Type::from_schema(&schema).map_err(|e| f("output", e))?;
                    Some((schema, t))
                }
            };
            (
                Action::Model(ModelStep {
                    model: m.model,
                    system,
                    prompt,
                    schema,
                    max_tokens: m.max_tokens,
                    temperature: m.temperature,
                }),
                None,
            )
        }
        "tool" => {
            let t: ToolFields = fields(kind, rest)?;
            let args = t.arguments.unwrap_or_else(|| json!({}));
            if !args.is_object() {
                return Err(f("arguments", "must be an object".into()));
            }
            let arguments = ValueTemplate::parse(&args).map_err(|e| f("arguments", e))?;
            (
                Action::Tool(ToolStep {
                    tool: t.tool,
                    arguments,
                }),
                None,
            )
        }
        "retrieve" => {
            let r: RetrieveFields = fields(kind, rest)?;
            if !(1..=20).contains(&r.top_k) {
                return Err(f("top_k", "must be between 1 and 20".into()));
            }
            (
                Action::Retrieve(RetrieveStep {
                    knowledge_base: template(&r.knowledge_base).map_err(|e| f("knowledge_base", e))?,
                    query: template(&r.query).map_err(|e| f("query", e))?,
                    top_k: r.top_k,
                }),
                None,
            )
        }
        "agent" => {
            let a: AgentFields = fields(kind, rest)?;
            if a.version.is_some_and(|v| v < 1) {
                return Err(f("version", "must be 1 or more".into()));
            }
            (
                Action::Agent(AgentStep {
                    agent: a.agent,
                    version: a.version,
                    input: template(&a.input).map_err(|e| f("input", e))?,
                }),
                None,
            )
        }
        "branch" => {
            let b: BranchFields = fields(kind, rest)?;
            if b.then.is_empty() && b.otherwise.is_empty() {
                return Err(f("then", "a branch lists the steps of at least one side".into()));
            }
            let c = condition(&b.condition).map_err(|e| f("if", e))?;
            (Action::Branch(c), Some((b.then, b.otherwise)))
        }
        "map" => {
            let m: MapFields = fields(kind, rest)?;
            if !(1..=MAX_CONCURRENCY).contains(&m.concurrency) {
                return Err(f(
                    "concurrency",
                    format!("must be between 1 and {MAX_CONCURRENCY}"),
                ));
            }
            let Value::Object(mut inner_map) = m.step else {
                return Err(f("step", "must be a step object with a `kind`".into()));
            };
            let inner_kind = match inner_map.remove("kind") {
                Some(Value::String(k)) => k,
                _ => return Err(f("step.kind", "the map's step needs a `kind`".into())),
            };
            let (action, _) = parse_action(&inner_kind, &Value::Object(inner_map), true)
                .map_err(|(field, m)| (format!("step.{field}"), m))?;
            (
                Action::Map(MapStep {
                    over: template(&m.over).map_err(|e| f("over", e))?,
                    concurrency: m.concurrency,
                    step: Box::new(action),
                }),
                None,
            )
        }
        "approval" => {
            let a: ApprovalFields = fields(kind, rest)?;
            let continue_on_reject = match a.on_reject.as_deref() {
                None | Some("fail") => false,
                Some("continue") => true,
                Some(_) => return Err(f("on_reject", "must be `fail` or `continue`".into())),
            };
            if a.group.as_ref().is_some_and(|g| g.trim().is_empty()) {
                return Err(f("group", "must name a group".into()));
            }
            (
                Action::Approval(ApprovalStep {
                    message: template(&a.message).map_err(|e| f("message", e))?,
                    group: a.group,
                    allow_self: a.allow_self,
                    continue_on_reject,
                }),
                None,
            )
        }
        other => {
            return Err(f(
                "kind",
                format!("`{other}` is not a step kind: model, tool, retrieve, branch, map, approval or agent"),
            ))
        }
    })
}

fn action_steps_named(action: &Action, out: &mut Vec<String>) {
    match action {
        Action::Model(m) => {
            if let Some(s) = &m.system {
                s.steps_named(out);
            }
            m.prompt.steps_named(out);
        }
        Action::Tool(t) => t.arguments.steps_named(out),
        Action::Retrieve(r) => {
            r.knowledge_base.steps_named(out);
            r.query.steps_named(out);
        }
        Action::Agent(a) => a.input.steps_named(out),
        Action::Branch(c) => c.steps_named(out),
        Action::Map(m) => {
            m.over.steps_named(out);
            action_steps_named(&m.step, out);
        }
        Action::Approval(a) => a.message.steps_named(out),
    }
}

/// The order steps run in: dependencies first, ties in declaration order;
/// `Err` holds a cycle (first step repeated at the end).
fn run_order(
    parsed: &[Parsed],
    needs: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Vec<String>, Vec<String>> {
    use std::cmp::Reverse;
    let mut waiting: Vec<usize> = parsed
        .iter()
        .map(|p| needs.get(&p.id).map_or(0, BTreeSet::len))
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = waiting
        .iter()
        .enumerate()
        .filter(|(_, n)| **n == 0)
        .map(|(i, _)| Reverse(i))
        .collect();
    let mut order = Vec::with_capacity(parsed.len());
    while let Some(Reverse(i)) = ready.pop() {
        let id = &parsed[i].id;
        order.push(id.clone());
        for (j, p) in parsed.iter().enumerate() {
            if needs.get(&p.id).is_some_and(|n| n.contains(id)) {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.push(Reverse(j));
                }
            }
        }
    }
    if order.len() == parsed.len() {
        return Ok(order);
    }
    // A cycle among the steps left: walk dependencies until one repeats.
    let left: BTreeSet<&str> = parsed
        .iter()
        .map(|p| p.id.as_str())
        .filter(|id| !order.iter().any(|o| o == id))
        .collect();
    let mut path: Vec<String> = Vec::new();
    let mut at = left
        .iter()
        .next()
        .map(|s| (*s).to_string())
        .unwrap_or_default();
    loop {
        if let Some(pos) = path.iter().position(|p| *p == at) {
            let mut cycle: Vec<String> = path[pos..].to_vec();
            cycle.reverse();
            let first = cycle[0].clone();
            cycle.push(first);
            return Err(cycle);
        }
        path.push(at.clone());
        let next = needs
            .get(&at)
            .and_then(|n| n.iter().find(|d| left.contains(d.as_str())))
            .cloned();
        match next {
            Some(n) => at = n,
            None => return Err(path),
        }
    }
}

/// Checks a step's kind-specific part and gives its output type.
fn check_action(
    action: &Action,
    scope: &Scope<'_>,
    catalog: &dyn Catalog,
) -> Result<Type, FieldError> {
    let f = |field: &str, m: String| (field.to_string(), m);
    Ok(match action {
        Action::Model(m) => {
            if !catalog.has_model(&m.model) {
                return Err(f(
                    "model",
                    format!("`{}` is not a chat model this server serves", m.model),
                ));
            }
            if let Some(s) = &m.system {
                s.type_of(scope).map_err(|e| f("system", e))?;
            }
            m.prompt.type_of(scope).map_err(|e| f("prompt", e))?;
            m.schema.as_ref().map_or(Type::String, |(_, t)| t.clone())
        }
        Action::Tool(t) => {
            let Some(tool) = catalog.tools().get(&t.tool) else {
                return Err(f(
                    "tool",
                    format!(
                        "there is no tool `{}`; the tools are: {}",
                        t.tool,
                        catalog.tools().names().join(", ")
                    ),
                ));
            };
            let have = t.arguments.type_of(scope).map_err(|e| f("arguments", e))?;
            if let Ok(want) = Type::from_schema(&tool.parameters()) {
                if let Some(why) = have.mismatch(&want) {
                    return Err(f(
                        "arguments",
                        format!("the tool `{}` takes {want}; these arguments {why}", t.tool),
                    ));
                }
            }
            Type::String
        }
        Action::Retrieve(r) => {
            r.knowledge_base
                .type_of(scope)
                .map_err(|e| f("knowledge_base", e))?;
            r.query.type_of(scope).map_err(|e| f("query", e))?;
            passages_type()
        }
        Action::Agent(a) => {
            if !catalog.has_agent(&a.agent, a.version) {
                return Err(f(
                    "agent",
                    match a.version {
                        Some(v) => {
                            format!("the tenant has no version {v} of an agent `{}`", a.agent)
                        }
                        None => format!("the tenant has no agent `{}`", a.agent),
                    },
                ));
            }
            a.input.type_of(scope).map_err(|e| f("input", e))?;
            Type::String
        }
        Action::Branch(c) => match c.type_of(scope).map_err(|e| f("if", e))? {
            Type::Boolean | Type::Any => Type::Boolean,
            other => return Err(f("if", format!("must be true or false, not {other}"))),
        },
        Action::Map(m) => {
            let item = match m.over.type_of(scope).map_err(|e| f("over", e))? {
                Type::Array(item) => *item,
                Type::Any => Type::Any,
                other => return Err(f("over", format!("must be a list, not {other}"))),
            };
            let inner = Scope {
                inputs: scope.inputs,
                steps: scope.steps,
                item: Some(&item),
            };
            let t = check_action(&m.step, &inner, catalog)
                .map_err(|(field, m)| (format!("step.{field}"), m))?;
            Type::Array(Box::new(t))
        }
        Action::Approval(a) => {
            a.message.type_of(scope).map_err(|e| f("message", e))?;
            approval_type()
        }
    })
}

#[cfg(test)]
mod tests;
