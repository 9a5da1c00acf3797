//! Durable agent runs: the store as the journal, the served models as the
//! agent's model (every step metered to the run's key), and the task that
//! drives each run this replica owns.
//!
//! A run is started by a request and driven by a task on the replica that
//! made it, which owns it (see [`kiln_store::runs`]). Every step goes
//! through the journal: its input is recorded before it runs and its output
//! before the next one starts, so after a crash the replica that claims the
//! run (this machine's next start, or another replica once this one's lease
//! has lapsed) replays the finished steps from the journal and runs again
//! only the step that was interrupted, with the same idempotency key.
//!
//! Before each step the journal checks that the run was not cancelled and
//! that its key and tenant may still spend: a key revoked mid-run ends the
//! run as `failed`, saying so, before its next step.
//!
//! Steps are named by path (an agent's `0`, `1`, ...; a workflow's step
//! ids, `each[2]`, `research/3`); the journal numbers them in the order they
//! first begin and finds a replayed step by its path. A workflow that
//! reaches an approval step is set `waiting` and let go: nobody holds it
//! until the API records a decision ([`approve`]) and drives it on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kiln_agents::{
    AgentSpec, Begun, ChatModel, Journal, JournalError, JournalFuture, ModelError, ModelFuture,
    ModelReply, ModelRequest, Outcome, RequestedCall, StepKind, StepStart,
};
use kiln_store::billing::Caller;
use kiln_store::runs::{DefinitionKind, NewStep, RunRecord, RunStatus, StepRecord, StepState};
use kiln_store::{CallRecord, Outcome as CallOutcome, StoreError};
use serde_json::{json, Value};

use crate::api::calls::{CallContext, Used};
use crate::api::SharedState;
use crate::auth::Principal;
use crate::error::ApiError;

mod crash;
mod tools;
mod workflow;

use tools::tools_for_run;
pub use tools::{
    add_mcp_tools, default_toolbox, toolbox, HttpToolConfig, SecretHeaderConfig, ServerTools,
};
pub use workflow::{approve, workflow_spec, Decision};

/// Who waits on which run: a request with `wait`, an event stream. Each
/// watched run has a counter its watchers wake on.
#[derive(Default)]
pub struct RunWatch {
    runs: Mutex<HashMap<String, tokio::sync::watch::Sender<u64>>>,
}

impl RunWatch {
    /// A receiver that wakes when this replica changes run `id`.
    pub fn watch(&self, id: &str) -> tokio::sync::watch::Receiver<u64> {
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        runs.retain(|_, tx| tx.receiver_count() > 0);
        runs.entry(id.to_string())
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    /// Wakes the watchers of run `id`, if it has any.
    pub fn changed(&self, id: &str) {
        let runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = runs.get(id) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// The endpoint an agent's model calls are recorded under in the ledger.
pub const RUNS_ENDPOINT: &str = "/api/runs";

/// Largest upstream reply an agent step reads.
const MAX_UPSTREAM_REPLY: usize = 16 * 1024 * 1024;

/// How long a step waits for the store to come back before the run is
/// left for a later claim.
const STORE_RETRY: Duration = Duration::from_secs(30);

/// Reads and checks an agent declaration against the tools and models this
/// server has.
pub fn agent_spec(state: &SharedState, body: &str) -> Result<AgentSpec, ApiError> {
    let spec = AgentSpec::from_json(body, &state.tools.get())
        .map_err(|e| ApiError::invalid("agent", e.to_string()))?;
    let served = state.models.text.contains_key(&spec.model)
        || state.models.upstream.contains_key(&spec.model);
    if !served {
        return Err(ApiError::invalid(
            "agent",
            format!(
                "agent `model`: `{}` is not a chat model this server serves",
                spec.model
            ),
        ));
    }
    Ok(spec)
}

/// Why a run may not act as its key.
pub(crate) enum NoPrincipal {
    /// The key or tenant may not be used any more: the run must stop.
    Refused(String),
    /// The store could not be asked: try again later.
    Unavailable(String),
}

/// Who a run acts as: its key, if that key (and its tenant) may still be
/// used, else why not.
async fn principal_for(
    state: &SharedState,
    run: &RunRecord,
) -> Result<Arc<Principal>, NoPrincipal> {
    principal_of(state, &run.tenant_id, run.key_id.as_deref()).await
}

/// Who acts as key `key_id` of tenant `tenant_id` (no key: the tenant
/// itself, as under `--no-auth`), if that key and tenant may still be
/// used, else why not.
pub(crate) async fn principal_of(
    state: &SharedState,
    tenant_id: &str,
    key_id: Option<&str>,
) -> Result<Arc<Principal>, NoPrincipal> {
    let db = state.db().clone();
    let (tenant_id, key_id) = (tenant_id.to_string(), key_id.map(str::to_string));
    tokio::task::spawn_blocking(move || check_principal(&*db, &tenant_id, key_id.as_deref()))
        .await
        .map_err(|_| NoPrincipal::Unavailable("the key check did not finish".into()))?
        .map_err(|e| NoPrincipal::Unavailable(format!("the key could not be checked: {e}")))?
}

/// [`principal_of`] on the calling thread: the outer error is the store's,
/// the inner one the refusal.
fn check_principal(
    db: &dyn kiln_store::Database,
    tenant_id: &str,
    key_id: Option<&str>,
) -> kiln_store::Result<Result<Arc<Principal>, NoPrincipal>> {
    use NoPrincipal::Refused;
    let Some(tenant) = db.tenant(tenant_id)? else {
        return Ok(Err(Refused("the run's tenant no longer exists".into())));
    };
    if tenant.disabled_at_ms.is_some() {
        return Ok(Err(Refused(format!(
            "the tenant `{}` is disabled",
            tenant.name
        ))));
    }
    let key = match key_id {
        None => None,
        Some(id) => match db.key(id)? {
            None => return Ok(Err(Refused("the run's API key no longer exists".into()))),
            Some(k) if k.tenant_id != tenant.id => {
                return Ok(Err(Refused("the API key belongs to another tenant".into())))
            }
            Some(k) => {
                if let Some(why) = k.unusable_because(kiln_store::now_ms()) {
                    return Ok(Err(Refused(format!("the run's API key {why}"))));
                }
                Some(k)
            }
        },
    };
    Ok(Ok(Arc::new(Principal { tenant, key })))
}

/// Runs a store call on the blocking pool, retrying while the store is
/// unavailable (for up to [`STORE_RETRY`]); a refusal by the store (the run
/// is not ours any more) is not retried.
async fn with_store<T, F>(state: &SharedState, f: F) -> Result<T, JournalError>
where
    T: Send + 'static,
    F: Fn(&dyn kiln_store::Database) -> kiln_store::Result<T> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let started = std::time::Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        let db = state.db().clone();
        let g = f.clone();
        let result = tokio::task::spawn_blocking(move || g(&*db))
            .await
            .map_err(|_| JournalError::Lost("a journal write did not finish".into()))?;
        match result {
            Ok(v) => return Ok(v),
            Err(
                e @ (StoreError::Conflict(_) | StoreError::NotFound(_) | StoreError::Invalid(_)),
            ) => return Err(JournalError::Lost(e.to_string())),
            Err(e) if started.elapsed() >= STORE_RETRY => {
                return Err(JournalError::Lost(format!(
                    "the journal is unavailable: {e}"
                )))
            }
            Err(e) => {
                tracing::warn!(error = %e, "the run journal is unavailable; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The store as a run's journal.
struct StoreJournal {
    state: SharedState,
    run_id: String,
    owner: String,
    /// Who the run's tool calls are recorded against.
    caller: Caller,
    /// Each journaled step's seq by path, and the next seq.
    seqs: Mutex<(HashMap<String, i64>, i64)>,
    /// Tool steps this worker is running: their tool and start.
    tools_running: Mutex<HashMap<i64, (String, Instant)>>,
}

impl StoreJournal {
    fn new(
        state: &SharedState,
        run: &RunRecord,
        owner: &str,
        steps: &[StepRecord],
    ) -> StoreJournal {
        let seqs = steps.iter().map(|s| (s.path.clone(), s.seq)).collect();
        let next = steps.iter().map(|s| s.seq + 1).max().unwrap_or(0);
        StoreJournal {
            state: state.clone(),
            run_id: run.id.clone(),
            owner: owner.to_string(),
            caller: Caller {
                tenant_id: run.tenant_id.clone(),
                key_id: run.key_id.clone(),
            },
            seqs: Mutex::new((seqs, next)),
            tools_running: Mutex::new(HashMap::new()),
        }
    }

    /// The seq of the step at `path`, numbering it when it is new.
    fn seq(&self, path: &str) -> i64 {
        let mut seqs = self.seqs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(seq) = seqs.0.get(path) {
            return *seq;
        }
        let seq = seqs.1;
        seqs.0.insert(path.to_string(), seq);
        seqs.1 += 1;
        seq
    }

    /// The seq of a step already begun.
    fn known_seq(&self, path: &str) -> Result<i64, JournalError> {
        let seqs = self.seqs.lock().unwrap_or_else(PoisonError::into_inner);
        seqs.0
            .get(path)
            .copied()
            .ok_or_else(|| JournalError::Lost(format!("step {path} was never begun")))
    }

    async fn begin_step(&self, step: &StepStart) -> Result<Begun, JournalError> {
        let seq = self.seq(&step.path);
        let new = NewStep {
            run_id: self.run_id.clone(),
            seq,
            path: step.path.clone(),
            kind: step.kind.as_str().to_string(),
            name: step.name.clone(),
            input: step.input.to_string(),
        };
        let owner = self.owner.clone();
        // One trip to the store: the run is still ours and not cancelled,
        // its key may still act, then the step is begun.
        let record = with_store(&self.state, move |db| {
            let Some(run) = db.run(None, &new.run_id)? else {
                return Ok(Err(JournalError::Lost("the run was deleted".into())));
            };
            if run.cancel_requested || run.status == RunStatus::Cancelled {
                return Ok(Err(JournalError::Cancelled));
            }
            if run.owner.as_deref() != Some(owner.as_str()) || run.status != RunStatus::Running {
                return Ok(Err(JournalError::Lost(
                    "the run is no longer this replica's to run".into(),
                )));
            }
            if let Err(NoPrincipal::Refused(why)) =
                check_principal(db, &run.tenant_id, run.key_id.as_deref())?
            {
                return Ok(Err(JournalError::Stopped(why)));
            }
            db.begin_step(&owner, &new, kiln_store::now_ms()).map(Ok)
        })
        .await??;
        self.state.run_changed(&self.run_id);
        let begun = begun(&record)?;
        if matches!(begun, Begun::Run { .. }) {
            if step.kind == StepKind::Tool {
                self.tools_running
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(seq, (step.name.clone(), Instant::now()));
            }
            crash::point("begun");
        }
        Ok(begun)
    }
}

impl StoreJournal {
    /// A tool step that ran is recorded in the ledger against the run's
    /// key (at no cost), beside the model calls: `tool:<name>`, endpoint
    /// [`RUNS_ENDPOINT`]. The journal stays the record of what it did; a
    /// failure here is logged, not fatal.
    async fn record_tool_call(&self, seq: i64, ok: bool) {
        let Some((tool, started)) = self
            .tools_running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&seq)
        else {
            return;
        };
        let record = CallRecord {
            created_at_ms: kiln_store::now_ms(),
            request_id: format!("{}-t{seq}", self.run_id),
            endpoint: RUNS_ENDPOINT.to_string(),
            model: format!("tool:{tool}"),
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            outcome: if ok {
                CallOutcome::Ok
            } else {
                CallOutcome::Error("tool_failed".into())
            },
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ttft_ms: None,
            caller: Some(self.caller.clone()),
            backend: "tool".into(),
            prices: None,
            cost: kiln_store::money::Money::ZERO,
        };
        let db = self.state.db().clone();
        let recorded = tokio::task::spawn_blocking(move || db.record_call(&record)).await;
        if let Ok(Err(e)) = recorded {
            tracing::warn!(run = %self.run_id, error = %e, "could not record a tool call in the ledger");
        }
    }
}

fn begun(record: &StepRecord) -> Result<Begun, JournalError> {
    let output = || -> Result<Value, JournalError> {
        let text = record.output.as_deref().unwrap_or("null");
        serde_json::from_str(text).map_err(|e| {
            JournalError::Lost(format!(
                "step {} of the journal has an unreadable output: {e}",
                record.seq
            ))
        })
    };
    Ok(match record.state {
        StepState::Started => Begun::Run {
            key: record.idempotency_key.clone(),
            attempt: u32::try_from(record.attempts).unwrap_or(u32::MAX),
        },
        StepState::Done => Begun::Recorded {
            ok: true,
            output: output()?,
        },
        StepState::Failed => Begun::Recorded {
            ok: false,
            output: output()?,
        },
    })
}

impl Journal for StoreJournal {
    fn begin<'a>(&'a self, step: &'a StepStart) -> JournalFuture<'a, Begun> {
        Box::pin(self.begin_step(step))
    }

    fn finish<'a>(&'a self, path: &'a str, ok: bool, output: &'a Value) -> JournalFuture<'a, ()> {
        Box::pin(async move {
            let seq = self.known_seq(path)?;
            let (owner, run_id, text) =
                (self.owner.clone(), self.run_id.clone(), output.to_string());
            let state = if ok {
                StepState::Done
            } else {
                StepState::Failed
            };
            crash::point("worked");
            let written = with_store(&self.state, move |db| {
                db.finish_step(&owner, &run_id, seq, state, &text, kiln_store::now_ms())
            })
            .await
            .map(|_| ());
            self.state.run_changed(&self.run_id);
            crash::point("finished");
            if written.is_ok() {
                self.record_tool_call(seq, ok).await;
            }
            written
        })
    }
}

/// The served models as an agent's model: each step is one chat call,
/// admitted, metered and recorded against the run's key like any other.
struct ServedModel {
    state: SharedState,
    run_id: String,
    /// The run's key as of its start; the journal checks it again before
    /// every step.
    principal: Arc<Principal>,
}

impl ServedModel {
    async fn step(&self, request: &ModelRequest) -> Result<ModelReply, ModelError> {
        let principal = self.principal.clone();
        let mut body = json!({
            "model": request.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "stream": false,
        });
        if !request.tools.is_empty() {
            body["tools"] = Value::Array(request.tools.clone());
        }
        if let Some(choice) = &request.tool_choice {
            body["tool_choice"] = choice.clone();
        }
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(format) = &request.response_format {
            body["response_format"] = format.clone();
        }
        // `<run>-m<seq>`: the ledger names the journal step of each call.
        let seq = request
            .key
            .as_deref()
            .and_then(|k| k.rsplit(':').next())
            .unwrap_or("0");
        let call = CallContext::new(
            self.state.clone(),
            format!("{}-m{seq}", self.run_id),
            RUNS_ENDPOINT,
            request.model.clone(),
            principal,
        );
        let result = match self.state.models.upstream.get(&request.model).cloned() {
            Some(up) => upstream_step(&call, &up, body).await,
            None => match crate::extract::from_value(body) {
                Ok(req) => crate::api::chat_complete(&call, req)
                    .await
                    .and_then(|c| serde_json::to_value(c).map_err(|_| ApiError::internal())),
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(completion) => reply_from(&completion)
                .map(|reply| ModelReply {
                    cost_nanos: u64::try_from(call.charged_nanos()).unwrap_or(0),
                    ..reply
                })
                .ok_or_else(|| {
                    ModelError::fatal(format!(
                        "the model `{}` gave a reply without a message",
                        request.model
                    ))
                }),
            Err(e) => {
                call.failed(e.code.as_str(), Used::default());
                use kiln_types::error::ErrorCode;
                let transient = matches!(
                    e.code,
                    ErrorCode::ServerBusy
                        | ErrorCode::RateLimitExceeded
                        | ErrorCode::LedgerUnavailable
                        | ErrorCode::UpstreamError
                        | ErrorCode::UpstreamTimeout
                        | ErrorCode::ServiceUnavailable
                );
                Err(ModelError {
                    message: e.message,
                    transient,
                })
            }
        }
    }
}

impl ChatModel for ServedModel {
    fn chat<'a>(&'a self, request: &'a ModelRequest) -> ModelFuture<'a> {
        Box::pin(self.step(request))
    }
}

/// A step on a model an upstream serves: proxied (and metered) like a
/// client's call, its JSON reply read back.
async fn upstream_step(
    call: &CallContext,
    up: &Arc<crate::upstream::Upstream>,
    body: Value,
) -> Result<Value, ApiError> {
    let response = crate::upstream::proxy(call, up, crate::upstream::Endpoint::Chat, body).await?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), MAX_UPSTREAM_REPLY)
        .await
        .map_err(|e| crate::upstream::upstream_error(up, format!("reading the reply: {e}")))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| crate::upstream::upstream_error(up, format!("the reply is not JSON: {e}")))?;
    if !status.is_success() {
        let message = value["error"]["message"]
            .as_str()
            .unwrap_or("the upstream refused the call");
        return Err(crate::upstream::upstream_error(up, message.to_string()));
    }
    Ok(value)
}

/// An OpenAI chat completion (JSON) as the agent loop's reply.
fn reply_from(completion: &Value) -> Option<ModelReply> {
    let message = completion["choices"].get(0)?.get("message")?;
    let tool_calls = match message.get("tool_calls") {
        Some(Value::Array(calls)) => calls
            .iter()
            .map(|c| {
                Some(RequestedCall {
                    id: c["id"].as_str()?.to_string(),
                    name: c["function"]["name"].as_str()?.to_string(),
                    arguments: c["function"]["arguments"].as_str()?.to_string(),
                })
            })
            .collect::<Option<Vec<_>>>()?,
        _ => Vec::new(),
    };
    Some(ModelReply {
        content: message["content"].as_str().map(str::to_string),
        tool_calls,
        prompt_tokens: completion["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        completion_tokens: completion["usage"]["completion_tokens"]
            .as_u64()
            .unwrap_or(0),
        finish_reason: completion["choices"][0]["finish_reason"]
            .as_str()
            .map(str::to_string),
        // Set from the call's settlement by the caller.
        cost_nanos: 0,
    })
}

/// Drives `run` in the background (see [`drive`]). A bug that panics the
/// task does not leave the run stuck as `running`: it is ended as failed.
pub fn spawn_drive(state: SharedState, run: RunRecord) {
    use futures::FutureExt;
    tokio::spawn(async move {
        let work = std::panic::AssertUnwindSafe(drive(state.clone(), run.clone()));
        if work.catch_unwind().await.is_err() {
            tracing::error!(run = %run.id, "driving a run panicked; ending it as failed");
            let owner = state.meter.replica_id.clone();
            let ended = with_store(&state, move |db| {
                db.finish_run(
                    &owner,
                    &run.id,
                    RunStatus::Failed,
                    None,
                    Some("an internal error stopped the run"),
                    kiln_store::now_ms(),
                )
            })
            .await;
            if let Err(e) = ended {
                tracing::warn!(error = %e, "could not end a run whose task panicked");
            }
        }
    });
}

/// Drives a run this replica owns to its end (or until it is no longer
/// this replica's, or it waits for a person), then records how it ended.
async fn drive(state: SharedState, run: RunRecord) {
    let owner = state.meter.replica_id.clone();
    let mut wait = Duration::from_secs(1);
    loop {
        let (status, result, error) = match drive_once(&state, &run, &owner).await {
            Ended::Finished(status, result, error) => (status, result, error),
            Ended::Paused => {
                tracing::info!(run = %run.id, "run waiting for an approval");
                return;
            }
            Ended::NotOurs(why) => {
                tracing::info!(run = %run.id, reason = %why, "stopped working on a run");
                return;
            }
            Ended::StoreDown(why) => {
                // Still ours: try again later from the journal.
                tracing::warn!(run = %run.id, reason = %why, "the run's journal is unavailable; resuming later");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
                continue;
            }
        };
        crash::point("ending");
        let (id, o) = (run.id.clone(), owner.clone());
        let finished = with_store(&state, move |db| {
            db.finish_run(
                &o,
                &id,
                status,
                result.as_deref(),
                error.as_deref(),
                kiln_store::now_ms(),
            )
        })
        .await;
        state.run_changed(&run.id);
        match finished {
            Ok(r) => tracing::info!(run = %r.id, status = r.status.as_str(), "run ended"),
            Err(e) => {
                tracing::warn!(run = %run.id, error = %e, "could not record the end of a run")
            }
        }
        return;
    }
}

enum Ended {
    Finished(RunStatus, Option<String>, Option<String>),
    /// Waiting for an approval; nobody holds it meanwhile.
    Paused,
    NotOurs(String),
    StoreDown(String),
}

/// A charge in nanos as a decimal amount.
fn cost(nanos: u64) -> String {
    kiln_store::money::Money(i64::try_from(nanos).unwrap_or(i64::MAX)).to_string()
}

fn failed(why: String) -> Ended {
    Ended::Finished(RunStatus::Failed, None, Some(why))
}

/// What a run needs to take its steps: its definition's body, who it acts
/// as, its journal so far.
struct Prepared {
    body: String,
    principal: Arc<Principal>,
    journal: StoreJournal,
    model: ServedModel,
}

async fn prepare(state: &SharedState, run: &RunRecord, owner: &str) -> Result<Prepared, Ended> {
    let (tenant, name, version, kind) = (
        run.tenant_id.clone(),
        run.name.clone(),
        run.version,
        run.kind,
    );
    let def = with_store(state, move |db| {
        db.definition(&tenant, kind, &name, Some(version))
    })
    .await
    .map_err(|e| Ended::StoreDown(e.to_string()))?
    .ok_or_else(|| {
        failed(format!(
            "version {} of {} `{}` is gone",
            run.version,
            run.kind.as_str(),
            run.name
        ))
    })?;
    let principal = match principal_for(state, run).await {
        Ok(p) => p,
        Err(NoPrincipal::Refused(why)) => {
            return Err(failed(format!("the run was stopped: {why}")))
        }
        Err(NoPrincipal::Unavailable(why)) => return Err(Ended::StoreDown(why)),
    };
    let id = run.id.clone();
    let steps = with_store(state, move |db| db.steps(&id))
        .await
        .map_err(|e| Ended::StoreDown(e.to_string()))?;
    Ok(Prepared {
        body: def.body,
        journal: StoreJournal::new(state, run, owner, &steps),
        model: ServedModel {
            state: state.clone(),
            run_id: run.id.clone(),
            principal: principal.clone(),
        },
        principal,
    })
}

async fn drive_once(state: &SharedState, run: &RunRecord, owner: &str) -> Ended {
    let ready = match prepare(state, run, owner).await {
        Ok(p) => p,
        Err(ended) => return ended,
    };
    let ended = match run.kind {
        DefinitionKind::Agent => drive_agent(state, run, &ready).await,
        DefinitionKind::Workflow => workflow::drive(state, run, &ready).await,
    };
    match ended {
        Ended::NotOurs(why) => {
            // Lost the journal: still ours (the store was down), or not?
            let id = run.id.clone();
            match with_store(state, move |db| db.run(None, &id)).await {
                Ok(Some(r)) if r.owner.as_deref() == Some(owner) && !r.status.is_final() => {
                    Ended::StoreDown(why)
                }
                _ => Ended::NotOurs(why),
            }
        }
        other => other,
    }
}

async fn drive_agent(state: &SharedState, run: &RunRecord, ready: &Prepared) -> Ended {
    let spec = match AgentSpec::from_json(&ready.body, &state.tools.get()) {
        Ok(s) => s,
        Err(e) => {
            return failed(format!(
                "version {} of the agent cannot run here: {e}",
                run.version
            ))
        }
    };
    let input: String = serde_json::from_str(&run.input).unwrap_or_else(|_| run.input.clone());
    let tools = tools_for_run(state, ready.principal.clone());
    let done = kiln_agents::run_durable(&spec, &input, &ready.model, &tools, &ready.journal).await;
    let tokens = done.tokens;
    match done.outcome {
        Outcome::Answered(answer) => Ended::Finished(
            RunStatus::Succeeded,
            Some(
                json!({"answer": answer, "tokens": tokens, "cost": cost(done.cost_nanos),
                    "finish_reason": done.finish_reason})
                .to_string(),
            ),
            None,
        ),
        Outcome::StepLimit => failed(format!(
            "the agent took its {} steps without answering",
            spec.max_steps
        )),
        Outcome::CostBudget => failed(format!(
            "the run was charged its budget of {} ({} spent); no step was started after that",
            spec.max_cost.unwrap_or(0.0),
            cost(done.cost_nanos)
        )),
        Outcome::TokenBudget => failed(format!(
            "the next step could have gone past the run's budget of {} tokens ({tokens} used)",
            spec.max_tokens.unwrap_or(0)
        )),
        Outcome::ModelFailed(why) => failed(format!("the model call failed: {why}")),
        Outcome::Stopped(why) => failed(format!("the run was stopped: {why}")),
        Outcome::Cancelled => Ended::Finished(RunStatus::Cancelled, None, Some("cancelled".into())),
        Outcome::Interrupted(why) => Ended::NotOurs(why),
    }
}

/// Takes over the runs nobody drives (their replica stopped or died) and
/// drives them; called at start and then with every lease renewal.
pub async fn claim_orphans(state: &SharedState) {
    let owner = state.meter.replica_id.clone();
    let claimed = with_store(state, move |db| {
        db.claim_runs(&owner, kiln_store::now_ms(), 16)
    })
    .await;
    match claimed {
        Ok(runs) => {
            for run in runs {
                tracing::info!(run = %run.id, steps = run.steps, "resuming a run from its journal");
                spawn_drive(state.clone(), run);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot look for runs to resume"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_wake_on_their_runs_changes_only() {
        let watch = RunWatch::default();
        let mut a = watch.watch("run-a");
        let mut b = watch.watch("run-b");
        watch.changed("run-a");
        watch.changed("run-nobody-watches");
        assert!(a.has_changed().unwrap());
        assert!(!b.has_changed().unwrap());
        a.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(5), async {
            watch.changed("run-b");
            b.changed().await.unwrap();
        })
        .await
        .unwrap();
        drop(a);
        let _c = watch.watch("run-c");
        let runs = watch.runs.lock().unwrap();
        assert!(
            !runs.contains_key("run-a"),
            "a run nobody watches is forgotten"
        );
        assert!(runs.contains_key("run-b") && runs.contains_key("run-c"));
    }

    #[test]
    fn replies_are_read_from_completions() {
        let c = json!({
            "choices": [{"message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\":\"1+1\"}"}}
            ]}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7},
        });
        let r = reply_from(&c).unwrap();
        assert_eq!(r.content, None);
        assert_eq!(r.tool_calls[0].name, "calculator");
        assert_eq!((r.prompt_tokens, r.completion_tokens), (12, 7));
        assert!(reply_from(&json!({"choices": []})).is_none());
        let bad_call = json!({"choices": [{"message": {"tool_calls": [{"id": 1}]}}]});
        assert!(reply_from(&bad_call).is_none());
    }

    #[test]
    fn journal_records_become_replays() {
        let mut record = StepRecord {
            run_id: "run-1".into(),
            seq: 2,
            path: "2".into(),
            kind: "tool".into(),
            name: "calculator".into(),
            input: "{}".into(),
            output: None,
            state: StepState::Started,
            idempotency_key: "run-1:2".into(),
            attempts: 2,
            started_at_ms: 0,
            finished_at_ms: None,
        };
        assert_eq!(
            begun(&record).unwrap(),
            Begun::Run {
                key: "run-1:2".into(),
                attempt: 2
            }
        );
        record.state = StepState::Done;
        record.output = Some(r#"{"text": "2"}"#.into());
        assert_eq!(
            begun(&record).unwrap(),
            Begun::Recorded {
                ok: true,
                output: json!({"text": "2"})
            }
        );
        record.output = Some("{".into());
        assert!(begun(&record).is_err());
    }
}
