//! Agents, workflows and their runs under `/api`.
//!
//! ```text
//! GET    /api/agents                 the newest version of each of the tenant's agents
//! POST   /api/agents                 declare an agent (JSON, or YAML with a YAML content
//!                                    type); a changed body is a new version
//! GET    /api/agents/{name}          one agent; ?version=N for an older version
//! DELETE /api/agents/{name}          retire it (runs already started finish on their version)
//! GET    /api/workflows              the same four for workflows
//! POST   /api/workflows
//! GET    /api/workflows/{name}
//! DELETE /api/workflows/{name}
//! POST   /api/runs                   start {agent, input, version?, wait?} or
//!                                    {workflow, input: {...}, version?, wait?}: 201 with the run
//! GET    /api/runs                   the tenant's runs, newest first; ?status= &agent= &workflow= &limit=
//! GET    /api/runs/{id}              one run with its journaled steps
//! GET    /api/runs/{id}/events       server-sent events: each step as it begins and ends,
//!                                    then the run when it ends
//! POST   /api/runs/{id}/cancel       stop it before its next step
//! POST   /api/runs/{id}/approve      {comment?}: decide the approval a workflow waits at
//! POST   /api/runs/{id}/reject       {comment?}
//! ```
//!
//! Any key of a tenant may start and read the tenant's runs; declaring and
//! retiring agents and workflows needs a tenant admin (or the platform
//! admin). Deciding an approval needs a tenant admin or a key in the
//! group the step names, and not the key that started the run unless the
//! step allows it. The
//! platform admin sees every tenant's runs. Another tenant's agent or run
//! answers 404 like one that does not exist.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::Stream;
use kiln_store::accounts::Role;
use kiln_store::runs::{
    Definition, DefinitionKind, NewRun, RunQuery, RunRecord, RunStatus, StepRecord, StepState,
};
use kiln_types::error::ErrorCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::admin::store;
use super::SharedState;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::runs;

/// How often a waiting request or an event stream looks at the journal
/// when nothing on this replica said it changed (a run another replica
/// drives).
const POLL: Duration = Duration::from_millis(500);
/// Longest `wait` on a new run.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Longest input a run takes, in bytes.
const MAX_INPUT: usize = 256 * 1024;

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/api/agents", get(list_agents).post(declare_agent))
        .route("/api/agents/{name}", get(show_agent).delete(retire_agent))
        .route("/api/workflows", get(list_workflows).post(declare_workflow))
        .route(
            "/api/workflows/{name}",
            get(show_workflow).delete(retire_workflow),
        )
        .route("/api/runs", get(list_runs).post(start_run))
        .route("/api/runs/{id}", get(show_run))
        .route("/api/runs/{id}/events", get(run_events))
        .route("/api/runs/{id}/cancel", post(cancel_run))
        .route("/api/runs/{id}/approve", post(approve_run))
        .route("/api/runs/{id}/reject", post(reject_run))
}

type Caller = Extension<Arc<Principal>>;

fn require_admin(p: &Principal) -> Result<(), ApiError> {
    match p.role() {
        Role::PlatformAdmin | Role::TenantAdmin => Ok(()),
        Role::Member => Err(ApiError::new(
            ErrorCode::PermissionDenied,
            "declaring or retiring agents and workflows needs a tenant admin key",
        )),
    }
}

/// The tenants whose runs the caller sees: `None` for all.
fn run_scope(p: &Principal) -> Option<String> {
    (p.role() != Role::PlatformAdmin).then(|| p.tenant.id.clone())
}

fn no_definition(kind: DefinitionKind, name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no {} `{name}`", kind.as_str()),
    )
}

fn no_run(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no run `{id}`"))
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn definition_json(d: &Definition) -> Value {
    json!({
        "object": d.kind.as_str(),
        "name": d.name,
        "version": d.version,
        "created_at": d.created_at_ms / 1000,
        "created_by": d.created_by,
        "spec": parse_json(&d.body),
    })
}

fn run_json(r: &RunRecord) -> Value {
    let mut run = json!({
        "object": "run",
        "id": r.id,
        "kind": r.kind.as_str(),
        "version": r.version,
        "status": r.status.as_str(),
        "input": parse_json(&r.input),
        "result": r.result.as_deref().map(parse_json),
        "error": r.error,
        "steps": r.steps,
        "cancel_requested": r.cancel_requested,
        // Seconds, as OpenAI's objects give them, and milliseconds, as
        // the journal's steps do.
        "created_at": r.created_at_ms / 1000,
        "updated_at": r.updated_at_ms / 1000,
        "finished_at": r.finished_at_ms.map(|t| t / 1000),
        "created_at_ms": r.created_at_ms,
        "updated_at_ms": r.updated_at_ms,
        "finished_at_ms": r.finished_at_ms,
    });
    run[r.kind.as_str()] = json!(r.name);
    run
}

fn step_json(s: &StepRecord) -> Value {
    json!({
        "seq": s.seq,
        "path": s.path,
        "kind": s.kind,
        "name": s.name,
        "state": s.state.as_str(),
        "input": parse_json(&s.input),
        "output": s.output.as_deref().map(parse_json),
        "attempts": s.attempts,
        "idempotency_key": s.idempotency_key,
        "started_at_ms": s.started_at_ms,
        "finished_at_ms": s.finished_at_ms,
    })
}

async fn list_definitions(state: &SharedState, p: &Principal, kind: DefinitionKind) -> Response {
    let tenant = p.tenant.id.clone();
    match store(state, move |db| db.definitions(Some(&tenant), kind)).await {
        Ok(defs) => Json(json!({
            "object": "list",
            "data": defs.iter().map(definition_json).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list_agents(State(state): State<SharedState>, Extension(p): Caller) -> Response {
    list_definitions(&state, &p, DefinitionKind::Agent).await
}

async fn list_workflows(State(state): State<SharedState>, Extension(p): Caller) -> Response {
    list_definitions(&state, &p, DefinitionKind::Workflow).await
}

/// A declaration's body: JSON, or YAML when the content type says so.
fn declaration(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.contains("yaml"));
    let parsed = if yaml {
        serde_norway::from_slice(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    };
    let form = if yaml { "YAML" } else { "JSON" };
    match parsed {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(ApiError::invalid(
            "agent",
            "the declaration must be a mapping of fields",
        )),
        Err(e) => Err(ApiError::invalid(
            "agent",
            format!("the declaration is not valid {form}: {e}"),
        )),
    }
}

/// Checks a declaration and saves it as the newest version: 201 when it
/// made a new version, 200 when the same body was saved already.
async fn declare(
    state: &SharedState,
    p: &Principal,
    kind: DefinitionKind,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    require_admin(p)?;
    let text = declaration(headers, body)?.to_string();
    let name = match kind {
        DefinitionKind::Agent => runs::agent_spec(state, &text)?.name,
        DefinitionKind::Workflow => runs::workflow_spec(state, &p.tenant.id, &text).await?.name,
    };
    let (tenant, by) = (p.tenant.id.clone(), p.key.as_ref().map(|k| k.id.clone()));
    let before = {
        let (tenant, name) = (tenant.clone(), name.clone());
        store(state, move |db| db.definition(&tenant, kind, &name, None)).await?
    };
    let saved = store(state, move |db| {
        db.put_definition(
            &tenant,
            kind,
            &name,
            &text,
            by.as_deref(),
            kiln_store::now_ms(),
        )
    })
    .await?;
    let status = if before.is_none_or(|b| b.version != saved.version) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(definition_json(&saved))).into_response())
}

async fn declare_agent(
    State(state): State<SharedState>,
    Extension(p): Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    declare(&state, &p, DefinitionKind::Agent, &headers, &body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn declare_workflow(
    State(state): State<SharedState>,
    Extension(p): Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    declare(&state, &p, DefinitionKind::Workflow, &headers, &body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Deserialize)]
struct VersionQuery {
    version: Option<i64>,
}

async fn show_definition(
    state: &SharedState,
    p: &Principal,
    kind: DefinitionKind,
    name: String,
    version: Option<i64>,
) -> Response {
    let (tenant, lookup) = (p.tenant.id.clone(), name.clone());
    match store(state, move |db| {
        db.definition(&tenant, kind, &lookup, version)
    })
    .await
    {
        Ok(Some(d)) => Json(definition_json(&d)).into_response(),
        Ok(None) => no_definition(kind, &name).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn show_agent(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Response {
    show_definition(&state, &p, DefinitionKind::Agent, name, q.version).await
}

async fn show_workflow(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Response {
    show_definition(&state, &p, DefinitionKind::Workflow, name, q.version).await
}

async fn retire(
    state: &SharedState,
    p: &Principal,
    kind: DefinitionKind,
    name: String,
) -> Response {
    if let Err(e) = require_admin(p) {
        return e.into_response();
    }
    let (tenant, lookup) = (p.tenant.id.clone(), name.clone());
    match store(state, move |db| {
        db.retire_definition(&tenant, kind, &lookup, kiln_store::now_ms())
    })
    .await
    {
        Ok(true) => {
            Json(json!({"object": kind.as_str(), "name": name, "deleted": true})).into_response()
        }
        Ok(false) => no_definition(kind, &name).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn retire_agent(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(name): Path<String>,
) -> Response {
    retire(&state, &p, DefinitionKind::Agent, name).await
}

async fn retire_workflow(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(name): Path<String>,
) -> Response {
    retire(&state, &p, DefinitionKind::Workflow, name).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRun {
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    workflow: Option<String>,
    /// A text for an agent; an object of the declared inputs for a workflow.
    #[serde(default)]
    input: Value,
    #[serde(default)]
    version: Option<i64>,
    /// Answer when the run has ended (or after `timeout` seconds) instead
    /// of at once.
    #[serde(default)]
    wait: bool,
    #[serde(default)]
    timeout: Option<u64>,
}

async fn start_run(
    State(state): State<SharedState>,
    Extension(p): Caller,
    ApiJson(body): ApiJson<Value>,
) -> Response {
    let result = async {
        let req: StartRun = crate::extract::from_value(body)?;
        let input_len = req.input.to_string().len();
        if input_len > MAX_INPUT {
            return Err(ApiError::invalid(
                "input",
                format!("the input is {input_len} bytes; the limit is {MAX_INPUT}"),
            ));
        }
        let wait = Duration::from_secs(req.timeout.unwrap_or(120)).min(MAX_WAIT);
        let (kind, name) = match (&req.agent, &req.workflow) {
            (Some(a), None) => (DefinitionKind::Agent, a.clone()),
            (None, Some(w)) => (DefinitionKind::Workflow, w.clone()),
            _ => {
                return Err(ApiError::invalid(
                    "agent",
                    "name either an `agent` or a `workflow` to run",
                ))
            }
        };
        let (tenant, lookup) = (p.tenant.id.clone(), name.clone());
        let def = store(&state, move |db| {
            db.definition(&tenant, kind, &lookup, req.version)
        })
        .await?
        .ok_or_else(|| no_definition(kind, &name))?;
        // The declaration was checked when saved; its models must still be
        // served, the key allowed to use them, and the input fit.
        let input = match kind {
            DefinitionKind::Agent => {
                let spec = runs::agent_spec(&state, &def.body)?;
                p.check_model(&spec.model)?;
                match req.input {
                    Value::String(text) => Value::String(text),
                    _ => return Err(ApiError::invalid("input", "an agent's input is a text")),
                }
            }
            DefinitionKind::Workflow => {
                let workflow = runs::workflow_spec(&state, &p.tenant.id, &def.body).await?;
                for model in workflow.models() {
                    p.check_model(model)?;
                }
                workflow
                    .check_inputs(&req.input)
                    .map_err(|e| ApiError::invalid("input", e))?
            }
        };
        let new = NewRun {
            id: format!("run-{}", uuid::Uuid::new_v4().simple()),
            tenant_id: p.tenant.id.clone(),
            key_id: p.key.as_ref().map(|k| k.id.clone()),
            kind,
            name: def.name.clone(),
            version: def.version,
            input: input.to_string(),
        };
        let owner = state.meter.replica_id.clone();
        let run = store(&state, move |db| {
            db.create_run(&new, &owner, kiln_store::now_ms())
        })
        .await?;
        runs::spawn_drive(state.clone(), run.clone());
        let run = if req.wait {
            wait_for_end(&state, &run.id, wait).await?
        } else {
            run
        };
        Ok((StatusCode::CREATED, Json(run_json(&run))).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The run once it has ended, or as it stands after `wait`.
async fn wait_for_end(
    state: &SharedState,
    id: &str,
    wait: Duration,
) -> Result<RunRecord, ApiError> {
    let started = Instant::now();
    let mut changed = state.run_watch.watch(id);
    loop {
        changed.borrow_and_update();
        let lookup = id.to_string();
        let run = store(state, move |db| db.run(None, &lookup))
            .await?
            .ok_or_else(|| no_run(id))?;
        if run.status.is_final() || run.status == RunStatus::Waiting || started.elapsed() >= wait {
            return Ok(run);
        }
        let left = wait.saturating_sub(started.elapsed());
        let _ = tokio::time::timeout(POLL.min(left), changed.changed()).await;
    }
}

#[derive(Debug, Deserialize)]
struct RunsQuery {
    status: Option<String>,
    agent: Option<String>,
    workflow: Option<String>,
    limit: Option<usize>,
}

async fn list_runs(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Query(q): Query<RunsQuery>,
) -> Response {
    let status = match q.status.as_deref().map(|s| (s, RunStatus::parse(s))) {
        None => None,
        Some((_, Some(s))) => Some(s),
        Some((s, None)) => {
            return ApiError::invalid(
                "status",
                format!(
                    "`{s}` is not a run status (running, waiting, succeeded, failed, cancelled)"
                ),
            )
            .into_response()
        }
    };
    let query = RunQuery {
        tenant_id: run_scope(&p),
        status,
        name: q.agent.or(q.workflow),
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
    };
    match store(&state, move |db| db.runs(&query)).await {
        Ok(runs) => Json(json!({
            "object": "list",
            "data": runs.iter().map(run_json).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn find_run(state: &SharedState, p: &Principal, id: &str) -> Result<RunRecord, ApiError> {
    let (scope, lookup) = (run_scope(p), id.to_string());
    store(state, move |db| db.run(scope.as_deref(), &lookup))
        .await?
        .ok_or_else(|| no_run(id))
}

async fn show_run(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let run = find_run(&state, &p, &id).await?;
        let run_id = run.id.clone();
        let steps = store(&state, move |db| db.steps(&run_id)).await?;
        let mut body = run_json(&run);
        if run.status == RunStatus::Waiting {
            let waiting = steps
                .iter()
                .rev()
                .find(|s| s.kind == "approval" && s.state == StepState::Started);
            if let Some(step) = waiting {
                let input = parse_json(&step.input);
                body["waiting_for"] = json!({"step": step.path, "message": input["message"],
                    "group": input["group"], "allow_self": input["allow_self"]});
            }
        }
        body["journal"] = steps.iter().map(step_json).collect();
        Ok::<_, ApiError>(Json(body).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn cancel_run(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
) -> Response {
    let (scope, lookup) = (run_scope(&p), id.clone());
    let cancelled = store(&state, move |db| {
        db.cancel_run(scope.as_deref(), &lookup, kiln_store::now_ms())
    })
    .await;
    state.run_changed(&id);
    match cancelled {
        Ok(Some(run)) => Json(run_json(&run)).into_response(),
        Ok(None) => no_run(&id).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    #[serde(default)]
    comment: String,
}

async fn decide(
    state: &SharedState,
    p: &Principal,
    id: &str,
    approved: bool,
    body: &[u8],
) -> Response {
    let parsed: Result<DecisionBody, _> = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(DecisionBody::default())
    } else {
        serde_json::from_slice(body)
    };
    let comment = match parsed {
        Ok(b) => b.comment,
        Err(e) => {
            return ApiError::invalid(
                "comment",
                format!("the body must be {{\"comment\": \"...\"}}: {e}"),
            )
            .into_response()
        }
    };
    match runs::approve(state, p, id, runs::Decision { approved, comment }).await {
        Ok(run) => Json(run_json(&run)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn approve_run(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    decide(&state, &p, &id, true, &body).await
}

async fn reject_run(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    decide(&state, &p, &id, false, &body).await
}

/// What an event stream has sent so far.
struct Watch {
    state: SharedState,
    run_id: String,
    /// Per step: the state last sent.
    sent: Vec<Option<String>>,
    /// The run status last sent (only `waiting` and final ones are sent).
    status: Option<RunStatus>,
    looked: bool,
    /// Wakes the stream when this replica changed a run.
    changed: tokio::sync::watch::Receiver<u64>,
    pending: std::collections::VecDeque<Event>,
    ended: bool,
}

async fn run_events(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
) -> Response {
    let run = match find_run(&state, &p, &id).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let watch = Watch {
        changed: state.run_watch.watch(&run.id),
        state,
        run_id: run.id,
        sent: Vec::new(),
        status: None,
        looked: false,
        pending: Default::default(),
        ended: false,
    };
    Sse::new(watch_events(watch))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn watch_events(watch: Watch) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(watch, |mut w| async move {
        loop {
            if let Some(e) = w.pending.pop_front() {
                return Some((Ok(e), w));
            }
            if w.ended {
                return None;
            }
            if w.looked {
                let _ = tokio::time::timeout(POLL, w.changed.changed()).await;
            }
            w.looked = true;
            w.changed.borrow_and_update();
            let id = w.run_id.clone();
            let seen = store(&w.state, move |db| Ok((db.run(None, &id)?, db.steps(&id)?))).await;
            let Ok((Some(run), steps)) = seen else {
                w.ended = true;
                let message = json!({"message": "the run's journal could not be read"});
                w.pending
                    .push_back(Event::default().event("error").data(message.to_string()));
                continue;
            };
            for s in &steps {
                let i = usize::try_from(s.seq).unwrap_or(usize::MAX);
                if i >= 100_000 {
                    continue;
                }
                if i >= w.sent.len() {
                    w.sent.resize(i + 1, None);
                }
                let now = Some(s.state.as_str().to_string());
                if w.sent[i] != now {
                    w.sent[i] = now;
                    w.pending.push_back(
                        Event::default()
                            .event("step")
                            .data(step_json(s).to_string()),
                    );
                }
            }
            let shown = run.status.is_final() || run.status == RunStatus::Waiting;
            if shown && w.status != Some(run.status) {
                w.status = Some(run.status);
                w.ended = run.status.is_final();
                w.pending.push_back(
                    Event::default()
                        .event("run")
                        .data(run_json(&run).to_string()),
                );
            }
        }
    })
}
