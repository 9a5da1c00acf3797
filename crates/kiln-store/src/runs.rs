//! Agents and workflows as tenants declare them, and the journal of their
//! durable runs ([`Runs`]).
//!
//! A *definition* (an agent or a workflow) is stored as versions: saving a
//! changed body adds version `n + 1`, saving the same body again changes
//! nothing, and retiring one hides it from new runs while the runs already
//! pinned to one of its versions still find it.
//!
//! A *run* is owned by one replica at a time. Its *steps* are journaled with
//! this protocol:
//! 1. [`Runs::begin_step`] records the step's input before it runs; a step
//!    already begun (the previous owner died mid-way) is handed back with
//!    one more attempt and the same idempotency key, and a step already
//!    finished is handed back as it is, so its effect is never repeated;
//! 2. [`Runs::finish_step`] records its output;
//! 3. [`Runs::finish_run`] records how the run ended.
//!
//! Every write checks, in the same transaction, that the writer still owns
//! the run; a replica whose run was taken over (its lease lapsed while it
//! was paused) gets [`StoreError::Conflict`] and must stop working on it.
//! [`Runs::claim_runs`] hands a replica the unfinished runs nobody holds:
//! runs whose owner's lease (in `replicas`, see [`crate::Billing`]) lapsed or
//! that were let go at a clean shutdown.
//!
//! A run can pause on a begun step until someone acts on it (a human
//! approval):
//! 1. its owner calls [`Runs::wait_run`] with the step's seq: the run becomes
//!    `waiting` and nobody holds it, so no replica claims it meanwhile and
//!    its old owner can write to it no more;
//! 2. [`Runs::resume_run`] finishes that step as `done` with what was
//!    decided and hands the run, `running` again, to the replica that
//!    resumes it. Of two resumes at once exactly one wins; the other gets
//!    [`StoreError::Conflict`].
//!
//! [`Runs::cancel_run`] ends a waiting run at once.
//!
//! Steps are keyed by their seq; each also has a path, its readable name
//! within the run (`classify`, `each[2]`, `research/3`), by which workflows
//! find their steps in the journal. Steps journaled before paths existed
//! read back with their seq as their path.

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

/// What a definition declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefinitionKind {
    Agent,
    Workflow,
}

impl DefinitionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DefinitionKind::Agent => "agent",
            DefinitionKind::Workflow => "workflow",
        }
    }

    pub fn parse(text: &str) -> Option<DefinitionKind> {
        match text {
            "agent" => Some(DefinitionKind::Agent),
            "workflow" => Some(DefinitionKind::Workflow),
            _ => None,
        }
    }
}

/// One version of an agent or a workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub tenant_id: String,
    pub kind: DefinitionKind,
    pub name: String,
    /// 1 for the first body saved, then one more per change.
    pub version: i64,
    /// The declaration as JSON text; the server checks it before saving.
    pub body: String,
    pub created_at_ms: i64,
    /// The key that saved this version (`None` without a key).
    pub created_by: Option<String>,
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Being worked on (or waiting for a replica to take it over).
    Running,
    /// Paused until someone acts (an approval).
    Waiting,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Waiting => "waiting",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<RunStatus> {
        match text {
            "running" => Some(RunStatus::Running),
            "waiting" => Some(RunStatus::Waiting),
            "succeeded" => Some(RunStatus::Succeeded),
            "failed" => Some(RunStatus::Failed),
            "cancelled" => Some(RunStatus::Cancelled),
            _ => None,
        }
    }

    /// Succeeded, failed or cancelled: nothing more happens to the run.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

/// A run as it is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRun {
    /// Made by the caller (the server uses `run-<uuid>`).
    pub id: String,
    pub tenant_id: String,
    /// The key every inner call is charged to (`None` without a key).
    pub key_id: Option<String>,
    pub kind: DefinitionKind,
    pub name: String,
    /// The version the run is pinned to.
    pub version: i64,
    /// JSON text.
    pub input: String,
}

impl NewRun {
    /// The run as [`Runs::create_run`] records it: `running`, owned by
    /// `owner`, no step taken.
    pub(crate) fn started(&self, owner: &str, now_ms: i64) -> RunRecord {
        RunRecord {
            id: self.id.clone(),
            tenant_id: self.tenant_id.clone(),
            key_id: self.key_id.clone(),
            kind: self.kind,
            name: self.name.clone(),
            version: self.version,
            input: self.input.clone(),
            status: RunStatus::Running,
            result: None,
            error: None,
            owner: Some(owner.to_string()),
            cancel_requested: false,
            steps: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            finished_at_ms: None,
        }
    }
}

/// A run and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub id: String,
    pub tenant_id: String,
    pub key_id: Option<String>,
    pub kind: DefinitionKind,
    pub name: String,
    pub version: i64,
    pub input: String,
    pub status: RunStatus,
    /// JSON text, once it succeeded.
    pub result: Option<String>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// The replica working on it; `None` when let go.
    pub owner: Option<String>,
    pub cancel_requested: bool,
    /// Steps finished so far.
    pub steps: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Begun; its output is not journaled (it is running, or its replica
    /// died before it ended).
    Started,
    Done,
    Failed,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Started => "started",
            StepState::Done => "done",
            StepState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<StepState> {
        match text {
            "started" => Some(StepState::Started),
            "done" => Some(StepState::Done),
            "failed" => Some(StepState::Failed),
            _ => None,
        }
    }
}

/// A step about to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewStep {
    pub run_id: String,
    /// 0, 1, 2, ... in the order the run takes them.
    pub seq: i64,
    /// Its readable name within the run: `classify`, `each[2]`,
    /// `research/3`, ...
    pub path: String,
    /// `model`, `tool`, ...
    pub kind: String,
    /// The model or tool it calls.
    pub name: String,
    /// JSON text. Never an operator secret: the journal is readable by the
    /// run's tenant.
    pub input: String,
}

/// A journaled step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    pub run_id: String,
    pub seq: i64,
    /// As first begun; the seq, as text, for steps journaled before paths
    /// existed.
    pub path: String,
    pub kind: String,
    pub name: String,
    pub input: String,
    /// JSON text, once it ended.
    pub output: Option<String>,
    pub state: StepState,
    /// `<run id>:<seq>`, the same on every attempt, for tools that take one.
    pub idempotency_key: String,
    /// 1 on the first attempt; one more each time a new owner begins it again.
    pub attempts: i64,
    pub started_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

/// Which runs to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunQuery {
    /// `None`: every tenant (the platform admin).
    pub tenant_id: Option<String>,
    pub status: Option<RunStatus>,
    /// Runs of this agent or workflow only.
    pub name: Option<String>,
    /// Newest first; at most this many (the store caps it at 1000).
    pub limit: usize,
}

/// The idempotency key of step `seq` of `run_id`.
pub fn idempotency_key(run_id: &str, seq: i64) -> String {
    format!("{run_id}:{seq}")
}

/// The error every owner-checked write returns once the run is no longer
/// the writer's.
pub(crate) fn not_owner(run_id: &str) -> StoreError {
    StoreError::Conflict(format!(
        "run {run_id} is not owned by this replica any more (its lease lapsed and another replica took it over, or it ended)"
    ))
}

/// The error [`Runs::wait_run`] returns for a run asked to stop.
pub(crate) fn cancel_requested(run_id: &str) -> StoreError {
    StoreError::Conflict(format!(
        "run {run_id} was asked to stop; end it as cancelled instead of waiting"
    ))
}

/// The error [`Runs::resume_run`] returns for a run that is not waiting.
pub(crate) fn run_not_waiting(run_id: &str, status: RunStatus) -> StoreError {
    StoreError::Conflict(format!(
        "run {run_id} is not waiting (it is {})",
        status.as_str()
    ))
}

/// Whether [`Runs::wait_run`] may pause on step `seq` of `run_id`, found
/// in `state` (`None`: never begun): only a begun step waits.
pub(crate) fn check_step_can_wait(run_id: &str, seq: i64, state: Option<StepState>) -> Result<()> {
    let why = match state {
        Some(StepState::Started) => return Ok(()),
        Some(ended) => format!("it is {}", ended.as_str()),
        None => "it was never begun".to_string(),
    };
    Err(StoreError::Invalid(format!(
        "step {seq} of run {run_id} cannot wait ({why}); a run waits on a begun step"
    )))
}

/// Whether [`Runs::resume_run`] may end step `seq` of `run_id`, found in
/// `state` (`None`: never begun): only the begun step the run waits on.
pub(crate) fn check_step_waits(run_id: &str, seq: i64, state: Option<StepState>) -> Result<()> {
    let why = match state {
        Some(StepState::Started) => return Ok(()),
        Some(ended) => format!("it is {}", ended.as_str()),
        None => "it was never begun".to_string(),
    };
    Err(StoreError::Conflict(format!(
        "step {seq} of run {run_id} is not waiting ({why})"
    )))
}

/// Agents, workflows and run journals. Every method blocks.
pub trait Runs: Send + Sync {
    /// Saves `body` as the newest version of `name`: a new version when it
    /// differs from the newest (or the definition was retired), else the
    /// newest as it is.
    fn put_definition(
        &self,
        tenant_id: &str,
        kind: DefinitionKind,
        name: &str,
        body: &str,
        created_by: Option<&str>,
        now_ms: i64,
    ) -> Result<Definition>;
    /// A version of a definition; `None` asks for the newest one not retired.
    /// A given version is found even when retired (runs pinned to it need it).
    fn definition(
        &self,
        tenant_id: &str,
        kind: DefinitionKind,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<Definition>>;
    /// The newest version of each definition of `kind` not retired, by
    /// name; `tenant_id` `None`: every tenant's.
    fn definitions(&self, tenant_id: Option<&str>, kind: DefinitionKind)
        -> Result<Vec<Definition>>;
    /// Retires a definition (every version); `false` when there was none.
    fn retire_definition(
        &self,
        tenant_id: &str,
        kind: DefinitionKind,
        name: &str,
        now_ms: i64,
    ) -> Result<bool>;

    /// Records a new run, `running` and owned by `owner`.
    /// [`StoreError::Conflict`] when the id is taken.
    fn create_run(&self, run: &NewRun, owner: &str, now_ms: i64) -> Result<RunRecord>;
    /// A run by id, within `tenant_id` (`None`: any tenant).
    fn run(&self, tenant_id: Option<&str>, run_id: &str) -> Result<Option<RunRecord>>;
    fn runs(&self, query: &RunQuery) -> Result<Vec<RunRecord>>;
    /// Gives `owner` up to `limit` `running` runs that nobody holds: no
    /// owner, or an owner whose lease ended before `now_ms` (or that has no
    /// lease at all), oldest first.
    fn claim_runs(&self, owner: &str, now_ms: i64, limit: usize) -> Result<Vec<RunRecord>>;
    /// Lets go of `owner`'s unfinished runs (a clean shutdown), so another
    /// replica or the next start takes them at once; returns how many.
    fn release_runs(&self, owner: &str) -> Result<usize>;
    /// Journals a step before it runs (see the module docs). Conflict when
    /// `owner` does not own the run or the run is not `running`.
    fn begin_step(&self, owner: &str, step: &NewStep, now_ms: i64) -> Result<StepRecord>;
    /// Journals a step's output and whether it is `Done` or `Failed`.
    fn finish_step(
        &self,
        owner: &str,
        run_id: &str,
        seq: i64,
        state: StepState,
        output: &str,
        now_ms: i64,
    ) -> Result<StepRecord>;
    /// A run's steps in order.
    fn steps(&self, run_id: &str) -> Result<Vec<StepRecord>>;
    /// Ends an owned run with its result or error. `status` must be final
    /// ([`StoreError::Invalid`] otherwise); a cancel asked for meanwhile
    /// does not change it (the runner checks for one before each step).
    fn finish_run(
        &self,
        owner: &str,
        run_id: &str,
        status: RunStatus,
        result: Option<&str>,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<RunRecord>;
    /// Pauses a run its owner is driving until someone acts on its begun
    /// step `seq` (see the module docs): the run becomes `waiting` and
    /// nobody's. Conflict when `owner` does not own the run or it is not
    /// `running`, and when a cancel was asked for (the owner then ends the
    /// run as cancelled instead); [`StoreError::Invalid`] when step `seq`
    /// was never begun or already ended; NotFound when there is no run.
    fn wait_run(&self, owner: &str, run_id: &str, seq: i64, now_ms: i64) -> Result<RunRecord>;
    /// Ends the wait of a run of `tenant_id` (`None`: any tenant): its step
    /// `seq` is finished as `done` with `output`, and the run is `running`
    /// again, owned by `owner`. `None` when there is no such run; Conflict,
    /// saying where it stands, when the run is not `waiting` (it was
    /// resumed or cancelled meanwhile) or step `seq` is not the begun one.
    fn resume_run(
        &self,
        tenant_id: Option<&str>,
        run_id: &str,
        seq: i64,
        output: &str,
        owner: &str,
        now_ms: i64,
    ) -> Result<Option<RunRecord>>;
    /// Asks a run of `tenant_id` to stop: a run nobody holds, or one
    /// waiting, is cancelled at once; a running one stops at its next step.
    /// `None` when there is no such run; a finished run is returned as it is.
    fn cancel_run(
        &self,
        tenant_id: Option<&str>,
        run_id: &str,
        now_ms: i64,
    ) -> Result<Option<RunRecord>>;
}
