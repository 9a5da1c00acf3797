//! Agents and their runs under `/api`.
//!
//! ```text
//! GET    /api/agents                 the newest version of each of the tenant's agents
//! POST   /api/agents                 declare an agent (JSON, or YAML with a YAML content
//!                                    type); a changed body is a new version
//! GET    /api/agents/{name}          one agent; ?version=N for an older version
//! DELETE /api/agents/{name}          retire it (runs already started finish on their version)
//! POST   /api/runs                   start {agent, input, version?, wait?}: 201 with the run
//! GET    /api/runs                   the tenant's runs, newest first; ?status= &agent= &limit=
//! GET    /api/runs/{id}              one run with its journaled steps
//! GET    /api/runs/{id}/events       server-sent events: each step as it begins and ends,
//!                                    then the run when it ends
//! POST   /api/runs/{id}/cancel       stop it before its next step
//! ```
//!
//! Any key of a tenant may start and read the tenant's runs; declaring and
//! retiring agents needs a tenant admin (or the platform admin). The
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
    Definition, DefinitionKind, NewRun, RunQuery, RunRecord, RunStatus, StepRecord,
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

/// How often a waiting request or an event stream looks at the journal.
const POLL: Duration = Duration::from_millis(200);
/// Longest `wait` on a new run.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Longest input a run takes, in bytes.
const MAX_INPUT: usize = 256 * 1024;

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/api/agents", get(list_agents).post(declare_agent))
        .route("/api/agents/{name}", get(show_agent).delete(retire_agent))
        .route("/api/runs", get(list_runs).post(start_run))
        .route("/api/runs/{id}", get(show_run))
        .route("/api/runs/{id}/events", get(run_events))
        .route("/api/runs/{id}/cancel", post(cancel_run))
}

type Caller = Extension<Arc<Principal>>;

fn require_admin(p: &Principal) -> Result<(), ApiError> {
    match p.role() {
        Role::PlatformAdmin | Role::TenantAdmin => Ok(()),
        Role::Member => Err(ApiError::new(
            ErrorCode::PermissionDenied,
            "declaring or retiring agents needs a tenant admin key",
        )),
    }
}

/// The tenants whose runs the caller sees: `None` for all.
fn run_scope(p: &Principal) -> Option<String> {
    (p.role() != Role::PlatformAdmin).then(|| p.tenant.id.clone())
}

fn no_agent(name: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no agent `{name}`"))
}

fn no_run(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no run `{id}`"))
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn agent_json(d: &Definition) -> Value {
    json!({
        "object": "agent",
        "name": d.name,
        "version": d.version,
        "created_at": d.created_at_ms / 1000,
        "created_by": d.created_by,
        "spec": parse_json(&d.body),
    })
}

fn run_json(r: &RunRecord) -> Value {
    json!({
        "object": "run",
        "id": r.id,
        "agent": r.name,
        "version": r.version,
        "status": r.status.as_str(),
        "input": parse_json(&r.input),
        "result": r.result.as_deref().map(parse_json),
        "error": r.error,
        "steps": r.steps,
        "cancel_requested": r.cancel_requested,
        "created_at": r.created_at_ms / 1000,
        "updated_at": r.updated_at_ms / 1000,
        "finished_at": r.finished_at_ms.map(|t| t / 1000),
    })
}

fn step_json(s: &StepRecord) -> Value {
    json!({
        "seq": s.seq,
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

async fn list_agents(State(state): State<SharedState>, Extension(p): Caller) -> Response {
    let tenant = p.tenant.id.clone();
    match store(&state, move |db| {
        db.definitions(Some(&tenant), DefinitionKind::Agent)
    })
    .await
    {
        Ok(defs) => Json(json!({
            "object": "list",
            "data": defs.iter().map(agent_json).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
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

async fn declare_agent(
    State(state): State<SharedState>,
    Extension(p): Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        require_admin(&p)?;
        let text = declaration(&headers, &body)?.to_string();
        let spec = runs::agent_spec(&state, &text)?;
        let (tenant, by) = (p.tenant.id.clone(), p.key.as_ref().map(|k| k.id.clone()));
        let before = {
            let (tenant, name) = (tenant.clone(), spec.name.clone());
            store(&state, move |db| {
                db.definition(&tenant, DefinitionKind::Agent, &name, None)
            })
            .await?
        };
        let name = spec.name.clone();
        let saved = store(&state, move |db| {
            db.put_definition(
                &tenant,
                DefinitionKind::Agent,
                &name,
                &text,
                by.as_deref(),
                kiln_store::now_ms(),
            )
        })
        .await?;
        let created = before.is_none_or(|b| b.version != saved.version);
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok::<_, ApiError>((status, Json(agent_json(&saved))).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Deserialize)]
struct VersionQuery {
    version: Option<i64>,
}

async fn show_agent(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Response {
    let (tenant, lookup) = (p.tenant.id.clone(), name.clone());
    match store(&state, move |db| {
        db.definition(&tenant, DefinitionKind::Agent, &lookup, q.version)
    })
    .await
    {
        Ok(Some(d)) => Json(agent_json(&d)).into_response(),
        Ok(None) => no_agent(&name).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn retire_agent(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(name): Path<String>,
) -> Response {
    if let Err(e) = require_admin(&p) {
        return e.into_response();
    }
    let (tenant, lookup) = (p.tenant.id.clone(), name.clone());
    match store(&state, move |db| {
        db.retire_definition(
            &tenant,
            DefinitionKind::Agent,
            &lookup,
            kiln_store::now_ms(),
        )
    })
    .await
    {
        Ok(true) => Json(json!({"object": "agent", "name": name, "deleted": true})).into_response(),
        Ok(false) => no_agent(&name).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRun {
    agent: String,
    input: String,
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
        if req.input.len() > MAX_INPUT {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "the input is {} bytes; the limit is {MAX_INPUT}",
                    req.input.len()
                ),
            ));
        }
        let wait = Duration::from_secs(req.timeout.unwrap_or(120)).min(MAX_WAIT);
        let (tenant, name) = (p.tenant.id.clone(), req.agent.clone());
        let def = store(&state, move |db| {
            db.definition(&tenant, DefinitionKind::Agent, &name, req.version)
        })
        .await?
        .ok_or_else(|| no_agent(&req.agent))?;
        // The declaration was checked when saved; the model must still be
        // served, and the key allowed to use it.
        let spec = runs::agent_spec(&state, &def.body)?;
        p.check_model(&spec.model)?;
        let new = NewRun {
            id: format!("run-{}", uuid::Uuid::new_v4().simple()),
            tenant_id: p.tenant.id.clone(),
            key_id: p.key.as_ref().map(|k| k.id.clone()),
            kind: DefinitionKind::Agent,
            name: def.name.clone(),
            version: def.version,
            input: Value::String(req.input).to_string(),
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
    loop {
        let lookup = id.to_string();
        let run = store(state, move |db| db.run(None, &lookup))
            .await?
            .ok_or_else(|| no_run(id))?;
        if run.status.is_final() || run.status == RunStatus::Waiting || started.elapsed() >= wait {
            return Ok(run);
        }
        tokio::time::sleep(POLL).await;
    }
}

#[derive(Debug, Deserialize)]
struct RunsQuery {
    status: Option<String>,
    agent: Option<String>,
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
        name: q.agent,
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
    match store(&state, move |db| {
        db.cancel_run(scope.as_deref(), &lookup, kiln_store::now_ms())
    })
    .await
    {
        Ok(Some(run)) => Json(run_json(&run)).into_response(),
        Ok(None) => no_run(&id).into_response(),
        Err(e) => e.into_response(),
    }
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
                tokio::time::sleep(POLL).await;
            }
            w.looked = true;
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
