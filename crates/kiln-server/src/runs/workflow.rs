//! Workflow runs on this server: declarations checked against what the
//! tenant and the server have, the server as a workflow's environment
//! (models metered to the run's key, tools, knowledge bases, the tenant's
//! agents), pausing at an approval, and the decision that resumes it.

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_agents::workflow::{
    run_workflow, AgentFuture, Catalog, RetrieveFuture, Workflow, WorkflowEnv, WorkflowOutcome,
};
use kiln_agents::{AgentSpec, ChatModel, ToolBox};
use kiln_store::accounts::Role;
use kiln_store::runs::{DefinitionKind, RunRecord, RunStatus};
use kiln_types::error::ErrorCode;
use serde_json::{json, Value};

use super::{agent_spec, failed, tools_for_run, with_store, Ended, Prepared};
use crate::api::SharedState;
use crate::auth::Principal;
use crate::error::ApiError;

/// What a declaration may name: this server's tools and models, the
/// tenant's agents (`None`: any, when a stored workflow is run again).
struct ServerCatalog<'a> {
    state: &'a SharedState,
    tools: Arc<ToolBox>,
    /// Each agent of the tenant and its newest version.
    agents: Option<BTreeMap<String, i64>>,
}

impl Catalog for ServerCatalog<'_> {
    fn tools(&self) -> &ToolBox {
        &self.tools
    }

    fn has_model(&self, name: &str) -> bool {
        self.state.models.text.contains_key(name) || self.state.models.upstream.contains_key(name)
    }

    fn has_agent(&self, name: &str, version: Option<i64>) -> bool {
        match &self.agents {
            None => true,
            Some(agents) => agents
                .get(name)
                .is_some_and(|newest| version.is_none_or(|v| v <= *newest)),
        }
    }
}

/// Reads and checks a workflow declaration of `tenant_id`.
pub async fn workflow_spec(
    state: &SharedState,
    tenant_id: &str,
    body: &str,
) -> Result<Workflow, ApiError> {
    let tenant = tenant_id.to_string();
    let agents = crate::api::admin::store(state, move |db| {
        db.definitions(Some(&tenant), DefinitionKind::Agent)
    })
    .await?
    .into_iter()
    .map(|d| (d.name, d.version))
    .collect();
    let catalog = ServerCatalog {
        state,
        tools: state.tools.get(),
        agents: Some(agents),
    };
    Workflow::from_json(body, &catalog).map_err(|e| ApiError::invalid("workflow", e.to_string()))
}

/// A stored workflow, checked again against this server's tools and
/// models (its agents are looked up when its steps run).
pub(super) fn stored_workflow(state: &SharedState, body: &str) -> Result<Workflow, String> {
    let catalog = ServerCatalog {
        state,
        tools: state.tools.get(),
        agents: None,
    };
    Workflow::from_json(body, &catalog).map_err(|e| e.to_string())
}

/// The server as a run's environment.
struct RunEnv<'a> {
    state: &'a SharedState,
    run: &'a RunRecord,
    principal: Arc<Principal>,
    model: &'a dyn ChatModel,
    tools: ToolBox,
}

impl WorkflowEnv for RunEnv<'_> {
    fn model(&self) -> &dyn ChatModel {
        self.model
    }

    fn tools(&self) -> &ToolBox {
        &self.tools
    }

    fn retrieve<'a>(
        &'a self,
        knowledge_base: &'a str,
        query: &'a str,
        top_k: u32,
    ) -> RetrieveFuture<'a> {
        Box::pin(async move {
            let hits = crate::api::kb_search(
                self.state,
                &self.principal,
                knowledge_base,
                query,
                top_k as usize,
            )
            .await
            .map_err(|e| e.message)?;
            Ok(Value::Array(
                hits.iter()
                    .map(|h| {
                        json!({"document": h.document_name, "heading": h.heading,
                            "text": h.text, "score": h.score})
                    })
                    .collect(),
            ))
        })
    }

    fn agent<'a>(&'a self, name: &'a str, version: Option<i64>) -> AgentFuture<'a> {
        Box::pin(async move {
            let (tenant, lookup) = (self.run.tenant_id.clone(), name.to_string());
            let def = with_store(self.state, move |db| {
                db.definition(&tenant, DefinitionKind::Agent, &lookup, version)
            })
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| match version {
                Some(v) => format!("there is no version {v} of it"),
                None => "there is no such agent (or it was retired)".to_string(),
            })?;
            let spec: AgentSpec = agent_spec(self.state, &def.body).map_err(|e| e.message)?;
            self.principal
                .check_model(&spec.model)
                .map_err(|e| e.message)?;
            Ok((spec, def.version))
        })
    }
}

/// Runs a workflow's steps from its journal until it ends or waits.
pub(super) async fn drive(state: &SharedState, run: &RunRecord, ready: &Prepared) -> Ended {
    let workflow = match stored_workflow(state, &ready.body) {
        Ok(w) => w,
        Err(e) => {
            return failed(format!(
                "version {} of the workflow cannot run here: {e}",
                run.version
            ))
        }
    };
    let inputs: Value = serde_json::from_str(&run.input).unwrap_or(Value::Null);
    let inputs = match workflow.check_inputs(&inputs) {
        Ok(v) => v,
        Err(e) => return failed(e),
    };
    let env = RunEnv {
        state,
        run,
        principal: ready.principal.clone(),
        model: &ready.model,
        tools: tools_for_run(state, ready.principal.clone()),
    };
    let done = run_workflow(&workflow, &inputs, &env, &ready.journal).await;
    match done.outcome {
        WorkflowOutcome::Succeeded(output) => Ended::Finished(
            RunStatus::Succeeded,
            Some(
                json!({"output": output, "tokens": done.tokens,
                    "cost": super::cost(done.cost_nanos), "skipped": done.skipped})
                .to_string(),
            ),
            None,
        ),
        WorkflowOutcome::Failed(why) => failed(why),
        WorkflowOutcome::Stopped(why) => failed(format!("the run was stopped: {why}")),
        WorkflowOutcome::Cancelled => {
            Ended::Finished(RunStatus::Cancelled, None, Some("cancelled".into()))
        }
        WorkflowOutcome::Interrupted(why) => Ended::NotOurs(why),
        WorkflowOutcome::Waiting { path } => pause(state, run, ready, &path).await,
    }
}

/// Sets the run waiting at its approval step `path` and lets it go.
async fn pause(state: &SharedState, run: &RunRecord, ready: &Prepared, path: &str) -> Ended {
    let seq = match ready.journal.known_seq(path) {
        Ok(s) => s,
        Err(e) => return Ended::NotOurs(e.to_string()),
    };
    let (owner, id) = (ready.journal.owner.clone(), run.id.clone());
    match with_store(state, move |db| {
        db.wait_run(&owner, &id, seq, kiln_store::now_ms())
    })
    .await
    {
        Ok(_) => {
            state.run_changed(&run.id);
            Ended::Paused
        }
        Err(e) => {
            // A cancel asked for meanwhile ends it; anything else means the
            // run is not ours any more.
            let id = run.id.clone();
            match with_store(state, move |db| db.run(None, &id)).await {
                Ok(Some(r))
                    if r.cancel_requested
                        && r.owner.as_deref() == Some(ready.journal.owner.as_str()) =>
                {
                    Ended::Finished(RunStatus::Cancelled, None, Some("cancelled".into()))
                }
                _ => Ended::NotOurs(e.to_string()),
            }
        }
    }
}

/// A person's decision on a waiting approval step.
#[derive(Debug, Clone)]
pub struct Decision {
    pub approved: bool,
    pub comment: String,
}

/// Longest comment on a decision, in bytes.
const MAX_COMMENT: usize = 4096;

/// Records `p`'s decision on the approval run `run_id` is waiting at and
/// drives the run on. A tenant admin may decide any approval of the
/// tenant; a member key only one whose step names a group the key is in.
/// The key that started the run may not decide it unless the step allows
/// it. Two decisions racing: one is recorded, the other gets a conflict.
pub async fn approve(
    state: &SharedState,
    p: &Principal,
    run_id: &str,
    decision: Decision,
) -> Result<RunRecord, ApiError> {
    if decision.comment.len() > MAX_COMMENT {
        return Err(ApiError::invalid(
            "comment",
            format!("the comment is longer than {MAX_COMMENT} bytes"),
        ));
    }
    let scope = (p.role() != Role::PlatformAdmin).then(|| p.tenant.id.clone());
    let no_run = || ApiError::new(ErrorCode::NotFound, format!("no run `{run_id}`"));
    let (s, id) = (scope.clone(), run_id.to_string());
    let found = crate::api::admin::store(state, move |db| {
        let Some(run) = db.run(s.as_deref(), &id)? else {
            return Ok(None);
        };
        let steps = db.steps(&run.id)?;
        Ok(Some((run, steps)))
    })
    .await?;
    let Some((run, steps)) = found else {
        return Err(no_run());
    };
    let not_waiting = |status: &str| {
        ApiError::new(
            ErrorCode::Conflict,
            format!("run `{run_id}` is not waiting for an approval (it is {status})"),
        )
    };
    if run.status != RunStatus::Waiting {
        return Err(not_waiting(run.status.as_str()));
    }
    let Some(step) = steps
        .iter()
        .rev()
        .find(|s| s.kind == "approval" && s.state == kiln_store::runs::StepState::Started)
    else {
        return Err(not_waiting("waiting, but for no approval step"));
    };
    let input: Value = serde_json::from_str(&step.input).unwrap_or(Value::Null);
    let group = input["group"].as_str();
    let admin = matches!(p.role(), Role::PlatformAdmin | Role::TenantAdmin);
    let in_group = group.is_some_and(|g| {
        p.key
            .as_ref()
            .is_some_and(|k| k.groups.iter().any(|x| x == g))
    });
    if !admin && !in_group {
        return Err(ApiError::new(
            ErrorCode::PermissionDenied,
            match group {
                Some(g) => format!(
                    "deciding this approval needs a tenant admin key or a key in the group `{g}`"
                ),
                None => "deciding this approval needs a tenant admin key".to_string(),
            },
        ));
    }
    let own = p
        .key
        .as_ref()
        .is_some_and(|k| run.key_id.as_deref() == Some(k.id.as_str()));
    if own && input["allow_self"] != Value::Bool(true) {
        return Err(ApiError::new(
            ErrorCode::PermissionDenied,
            "the key that started the run cannot decide its approval (the step does not set `allow_self`)",
        ));
    }
    let by = match &p.key {
        Some(k) => format!("{} ({})", k.name, k.id),
        None => "local".to_string(),
    };
    let output = json!({
        "approved": decision.approved,
        "by": by,
        "comment": decision.comment,
        "at_ms": kiln_store::now_ms(),
    })
    .to_string();
    let (owner, id, seq) = (state.meter.replica_id.clone(), run.id.clone(), step.seq);
    let resumed = crate::api::admin::store(state, move |db| {
        db.resume_run(
            scope.as_deref(),
            &id,
            seq,
            &output,
            &owner,
            kiln_store::now_ms(),
        )
    })
    .await?
    .ok_or_else(no_run)?;
    state.run_changed(&resumed.id);
    tracing::info!(run = %resumed.id, approved = decision.approved, by = %by, "approval decided");
    super::spawn_drive(state.clone(), resumed.clone());
    Ok(resumed)
}
