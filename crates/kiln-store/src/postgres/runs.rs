//! Definitions, runs and the step journal on PostgreSQL. Every owner-checked
//! write locks the run's row (`FOR UPDATE`) and checks its owner in the same
//! transaction, so a replica whose run was just taken over cannot write to
//! it; claiming takes rows with `FOR UPDATE SKIP LOCKED`, so two replicas
//! claiming at once each get different runs. Resuming a waiting run locks
//! its row too, so of two resumes at once the second sees the run running.
//!
//! Saves of one definition take turns on a transaction-scoped advisory lock
//! keyed by its name, so two replicas never pick the same next version. As
//! a second line, an insert that finds its version taken saves again on top
//! of the other (up to [`PUT_ATTEMPTS`] times, then [`StoreError::Conflict`]).

use postgres::Row;

use super::{Db, PgStore};
use crate::error::{Result, StoreError};
use crate::runs::{
    cancel_requested, check_step_can_wait, check_step_waits, idempotency_key, not_owner,
    run_not_waiting, Definition, DefinitionKind, NewRun, NewStep, RunQuery, RunRecord, RunStatus,
    Runs, StepRecord, StepState,
};

/// The most runs one [`Runs::runs`] query returns.
const MAX_RUNS: usize = 1000;

/// The error [`Runs::cancel_run`] leaves on a run it cancels at once.
const CANCELLED: &str = "cancelled";

/// How many times [`Runs::put_definition`] saves again after losing a race
/// for a version number.
const PUT_ATTEMPTS: usize = 8;

const DEFINITION_COLUMNS: &str = "tenant_id, kind, name, version, body, created_at, created_by";

const RUN_COLUMNS: &str = "id, tenant_id, key_id, kind, name, version, input, status, result,
     error, owner, cancel_requested, steps, created_at, updated_at, finished_at";

// Steps journaled before paths existed have none: their seq stands in.
const STEP_COLUMNS: &str = "run_id, seq, kind, name, input, output, state, idempotency_key,
     attempts, started_at, finished_at, COALESCE(path, CAST(seq AS TEXT))";

fn definition_from_row(r: &Row) -> Result<Definition> {
    let tenant_id: String = r.get(0);
    let kind: String = r.get(1);
    let name: String = r.get(2);
    let version: i64 = r.get(3);
    let kind = DefinitionKind::parse(&kind).ok_or_else(|| StoreError::BadRow {
        table: "definitions",
        id: format!("{tenant_id}/{name}/{version}"),
        reason: format!("kind `{kind}`"),
    })?;
    Ok(Definition {
        tenant_id,
        kind,
        name,
        version,
        body: r.get(4),
        created_at_ms: r.get(5),
        created_by: r.get(6),
    })
}

fn run_from_row(r: &Row) -> Result<RunRecord> {
    let id: String = r.get(0);
    let bad = |reason: String| StoreError::BadRow {
        table: "runs",
        id: id.clone(),
        reason,
    };
    let kind: String = r.get(3);
    let kind = DefinitionKind::parse(&kind).ok_or_else(|| bad(format!("kind `{kind}`")))?;
    let status: String = r.get(7);
    let status = RunStatus::parse(&status).ok_or_else(|| bad(format!("status `{status}`")))?;
    Ok(RunRecord {
        id,
        tenant_id: r.get(1),
        key_id: r.get(2),
        kind,
        name: r.get(4),
        version: r.get(5),
        input: r.get(6),
        status,
        result: r.get(8),
        error: r.get(9),
        owner: r.get(10),
        cancel_requested: r.get(11),
        steps: r.get(12),
        created_at_ms: r.get(13),
        updated_at_ms: r.get(14),
        finished_at_ms: r.get(15),
    })
}

fn step_from_row(r: &Row) -> Result<StepRecord> {
    let run_id: String = r.get(0);
    let seq: i64 = r.get(1);
    let state: String = r.get(6);
    let state = StepState::parse(&state).ok_or_else(|| StoreError::BadRow {
        table: "run_steps",
        id: idempotency_key(&run_id, seq),
        reason: format!("state `{state}`"),
    })?;
    Ok(StepRecord {
        run_id,
        seq,
        path: r.get(11),
        kind: r.get(2),
        name: r.get(3),
        input: r.get(4),
        output: r.get(5),
        state,
        idempotency_key: r.get(7),
        attempts: r.get(8),
        started_at_ms: r.get(9),
        finished_at_ms: r.get(10),
    })
}

/// A run, its row locked until the transaction ends when `lock`.
fn run_by_id(
    c: &mut impl Db,
    tenant_id: Option<&str>,
    run_id: &str,
    lock: bool,
) -> Result<Option<RunRecord>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 AND ($2::TEXT IS NULL OR tenant_id = $2){}",
        if lock { " FOR UPDATE" } else { "" }
    );
    c.query_opt(&sql, &[&run_id, &tenant_id])?
        .map(|r| run_from_row(&r))
        .transpose()
}

fn step_by_seq(c: &mut impl Db, run_id: &str, seq: i64) -> Result<Option<StepRecord>> {
    let sql = format!("SELECT {STEP_COLUMNS} FROM run_steps WHERE run_id = $1 AND seq = $2");
    c.query_opt(&sql, &[&run_id, &seq])?
        .map(|r| step_from_row(&r))
        .transpose()
}

/// The run `owner` may write to, its row locked until the transaction
/// ends: it exists and `owner` holds it.
fn owned_run(c: &mut impl Db, owner: &str, run_id: &str) -> Result<RunRecord> {
    let run = run_by_id(c, None, run_id, true)?
        .ok_or_else(|| StoreError::NotFound(format!("no run `{run_id}`")))?;
    if run.owner.as_deref() != Some(owner) {
        return Err(not_owner(run_id));
    }
    Ok(run)
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Runs for PgStore {
    fn put_definition(
        &self,
        tenant_id: &str,
        kind: DefinitionKind,
        name: &str,
        body: &str,
        created_by: Option<&str>,
        now_ms: i64,
    ) -> Result<Definition> {
        let mut conn = self.conn()?;
        for _ in 0..PUT_ATTEMPTS {
            let mut tx = conn.transaction()?;
            // A hash collision only makes two unrelated saves take turns.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                &[&format!(
                    "kiln.definitions/{tenant_id}/{}/{name}",
                    kind.as_str()
                )],
            )?;
            // Locking the newest version makes a retire wait for this save.
            let newest = tx.query_opt(
                &format!(
                    "SELECT {DEFINITION_COLUMNS}, retired_at IS NOT NULL FROM definitions
                     WHERE tenant_id = $1 AND kind = $2 AND name = $3
                     ORDER BY version DESC LIMIT 1 FOR UPDATE"
                ),
                &[&tenant_id, &kind.as_str(), &name],
            )?;
            let version = match newest {
                Some(row) => {
                    let current = definition_from_row(&row)?;
                    let retired: bool = row.get(7);
                    if !retired && current.body == body {
                        return Ok(current);
                    }
                    current.version + 1
                }
                None => 1,
            };
            let saved = Definition {
                tenant_id: tenant_id.to_string(),
                kind,
                name: name.to_string(),
                version,
                body: body.to_string(),
                created_at_ms: now_ms,
                created_by: created_by.map(str::to_string),
            };
            let inserted = tx.execute(
                "INSERT INTO definitions (tenant_id, kind, name, version, body, created_at,
                     created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT DO NOTHING",
                &[
                    &saved.tenant_id,
                    &kind.as_str(),
                    &saved.name,
                    &saved.version,
                    &saved.body,
                    &saved.created_at_ms,
                    &saved.created_by,
                ],
            )?;
            if inserted == 1 {
                tx.commit()?;
                return Ok(saved);
            }
            // Another replica saved this version first: look again.
        }
        Err(StoreError::Conflict(format!(
            "the {} `{name}` is being saved by others at the same time; try again",
            kind.as_str()
        )))
    }

    fn definition(
        &self,
        tenant_id: &str,
        kind: DefinitionKind,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<Definition>> {
        let sql = format!(
            "SELECT {DEFINITION_COLUMNS} FROM definitions
             WHERE tenant_id = $1 AND kind = $2 AND name = $3
                 AND (version = $4 OR ($4::BIGINT IS NULL AND retired_at IS NULL))
             ORDER BY version DESC LIMIT 1"
        );
        self.conn()?
            .query_opt(&sql, &[&tenant_id, &kind.as_str(), &name, &version])?
            .map(|r| definition_from_row(&r))
            .transpose()
    }

    fn definitions(
        &self,
        tenant_id: Option<&str>,
        kind: DefinitionKind,
    ) -> Result<Vec<Definition>> {
        let sql = format!(
            "SELECT {DEFINITION_COLUMNS} FROM definitions d
             WHERE kind = $1 AND ($2::TEXT IS NULL OR tenant_id = $2) AND retired_at IS NULL
                 AND version = (SELECT MAX(version) FROM definitions n
                                WHERE n.tenant_id = d.tenant_id AND n.kind = d.kind
                                    AND n.name = d.name AND n.retired_at IS NULL)
             ORDER BY name, tenant_id"
        );
        self.conn()?
            .query(&sql, &[&kind.as_str(), &tenant_id])?
            .iter()
            .map(definition_from_row)
            .collect()
    }

    fn retire_definition(
        &self,
        tenant_id: &str,
        kind: DefinitionKind,
        name: &str,
        now_ms: i64,
    ) -> Result<bool> {
        let changed = self.conn()?.execute(
            "UPDATE definitions SET retired_at = $4
             WHERE tenant_id = $1 AND kind = $2 AND name = $3 AND retired_at IS NULL",
            &[&tenant_id, &kind.as_str(), &name, &now_ms],
        )?;
        Ok(changed > 0)
    }

    fn create_run(&self, run: &NewRun, owner: &str, now_ms: i64) -> Result<RunRecord> {
        let record = run.started(owner, now_ms);
        let inserted = self.conn()?.execute(
            "INSERT INTO runs (id, tenant_id, key_id, kind, name, version, input, status, owner,
                 created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)
             ON CONFLICT DO NOTHING",
            &[
                &record.id,
                &record.tenant_id,
                &record.key_id,
                &record.kind.as_str(),
                &record.name,
                &record.version,
                &record.input,
                &record.status.as_str(),
                &owner,
                &now_ms,
            ],
        )?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!(
                "a run with id `{}` already exists",
                run.id
            )));
        }
        Ok(record)
    }

    fn run(&self, tenant_id: Option<&str>, run_id: &str) -> Result<Option<RunRecord>> {
        run_by_id(&mut self.conn()?, tenant_id, run_id, false)
    }

    fn runs(&self, query: &RunQuery) -> Result<Vec<RunRecord>> {
        let n = match query.limit {
            0 => MAX_RUNS,
            n => n.min(MAX_RUNS),
        };
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs
             WHERE ($1::TEXT IS NULL OR tenant_id = $1) AND ($2::TEXT IS NULL OR status = $2)
                 AND ($3::TEXT IS NULL OR name = $3)
             ORDER BY created_at DESC, id DESC LIMIT $4"
        );
        self.conn()?
            .query(
                &sql,
                &[
                    &query.tenant_id,
                    &query.status.map(RunStatus::as_str),
                    &query.name,
                    &limit(n),
                ],
            )?
            .iter()
            .map(run_from_row)
            .collect()
    }

    fn claim_runs(&self, owner: &str, now_ms: i64, limit_to: usize) -> Result<Vec<RunRecord>> {
        // Rows another replica is claiming (or writing to) right now are
        // skipped, not waited on; MATERIALIZED keeps the locking subquery
        // from being run more than once.
        let sql = format!(
            "WITH free AS MATERIALIZED (
                 SELECT id FROM runs r
                 WHERE status = 'running'
                     AND (owner IS NULL OR NOT EXISTS (SELECT 1 FROM replicas p
                          WHERE p.id = r.owner AND p.lease_expires_at >= $2))
                 ORDER BY created_at, id LIMIT $3
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE runs SET owner = $1, updated_at = $2
             WHERE id IN (SELECT id FROM free)
             RETURNING {RUN_COLUMNS}"
        );
        let mut claimed = self
            .conn()?
            .query(&sql, &[&owner, &now_ms, &limit(limit_to)])?
            .iter()
            .map(run_from_row)
            .collect::<Result<Vec<_>>>()?;
        claimed.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(claimed)
    }

    fn release_runs(&self, owner: &str) -> Result<usize> {
        let released = self.conn()?.execute(
            "UPDATE runs SET owner = NULL
             WHERE owner = $1 AND status IN ('running', 'waiting')",
            &[&owner],
        )?;
        Ok(usize::try_from(released).unwrap_or(usize::MAX))
    }

    fn begin_step(&self, owner: &str, step: &NewStep, now_ms: i64) -> Result<StepRecord> {
        if step.seq < 0 {
            return Err(StoreError::Invalid(format!(
                "step numbers start at 0, not {}",
                step.seq
            )));
        }
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let run = owned_run(&mut tx, owner, &step.run_id)?;
        if run.status != RunStatus::Running {
            return Err(not_owner(&step.run_id));
        }
        // The run's row lock serialises every write to its steps.
        let begun = match step_by_seq(&mut tx, &step.run_id, step.seq)? {
            None => {
                let record = StepRecord {
                    run_id: step.run_id.clone(),
                    seq: step.seq,
                    path: step.path.clone(),
                    kind: step.kind.clone(),
                    name: step.name.clone(),
                    input: step.input.clone(),
                    output: None,
                    state: StepState::Started,
                    idempotency_key: idempotency_key(&step.run_id, step.seq),
                    attempts: 1,
                    started_at_ms: now_ms,
                    finished_at_ms: None,
                };
                tx.execute(
                    "INSERT INTO run_steps (run_id, seq, kind, name, input, state,
                         idempotency_key, attempts, started_at, path)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    &[
                        &record.run_id,
                        &record.seq,
                        &record.kind,
                        &record.name,
                        &record.input,
                        &record.state.as_str(),
                        &record.idempotency_key,
                        &record.attempts,
                        &record.started_at_ms,
                        &record.path,
                    ],
                )?;
                record
            }
            // The previous owner began it and died before it ended: its
            // effect may or may not have happened, so it runs again under
            // the same idempotency key.
            Some(mut started) if started.state == StepState::Started => {
                tx.execute(
                    "UPDATE run_steps SET attempts = attempts + 1 WHERE run_id = $1 AND seq = $2",
                    &[&step.run_id, &step.seq],
                )?;
                started.attempts += 1;
                started
            }
            Some(finished) => finished,
        };
        tx.commit()?;
        Ok(begun)
    }

    fn finish_step(
        &self,
        owner: &str,
        run_id: &str,
        seq: i64,
        state: StepState,
        output: &str,
        now_ms: i64,
    ) -> Result<StepRecord> {
        if state == StepState::Started {
            return Err(StoreError::Invalid(
                "a step finishes as done or failed, not started".into(),
            ));
        }
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let run = owned_run(&mut tx, owner, run_id)?;
        if run.status.is_final() {
            return Err(not_owner(run_id));
        }
        let step = step_by_seq(&mut tx, run_id, seq)?.ok_or_else(|| {
            StoreError::NotFound(format!("step {seq} of run `{run_id}` was never begun"))
        })?;
        if step.state != StepState::Started {
            return Ok(step);
        }
        tx.execute(
            "UPDATE run_steps SET state = $3, output = $4, finished_at = $5
             WHERE run_id = $1 AND seq = $2",
            &[&run_id, &seq, &state.as_str(), &output, &now_ms],
        )?;
        tx.execute(
            "UPDATE runs SET steps = steps + 1, updated_at = $2 WHERE id = $1",
            &[&run_id, &now_ms],
        )?;
        tx.commit()?;
        Ok(StepRecord {
            state,
            output: Some(output.to_string()),
            finished_at_ms: Some(now_ms),
            ..step
        })
    }

    fn steps(&self, run_id: &str) -> Result<Vec<StepRecord>> {
        let sql = format!("SELECT {STEP_COLUMNS} FROM run_steps WHERE run_id = $1 ORDER BY seq");
        self.conn()?
            .query(&sql, &[&run_id])?
            .iter()
            .map(step_from_row)
            .collect()
    }

    fn finish_run(
        &self,
        owner: &str,
        run_id: &str,
        status: RunStatus,
        result: Option<&str>,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<RunRecord> {
        if !status.is_final() {
            return Err(StoreError::Invalid(format!(
                "a run ends as succeeded, failed or cancelled, not {}",
                status.as_str()
            )));
        }
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let run = owned_run(&mut tx, owner, run_id)?;
        if run.status.is_final() {
            // Finishing again the same way (a retry) changes nothing; any
            // other end (it was cancelled meanwhile) is not this owner's.
            return if run.status == status {
                Ok(run)
            } else {
                Err(not_owner(run_id))
            };
        }
        tx.execute(
            "UPDATE runs SET status = $2, result = $3, error = $4, finished_at = $5,
                 updated_at = $5
             WHERE id = $1",
            &[&run_id, &status.as_str(), &result, &error, &now_ms],
        )?;
        tx.commit()?;
        Ok(RunRecord {
            status,
            result: result.map(str::to_string),
            error: error.map(str::to_string),
            finished_at_ms: Some(now_ms),
            updated_at_ms: now_ms,
            ..run
        })
    }

    fn wait_run(&self, owner: &str, run_id: &str, seq: i64, now_ms: i64) -> Result<RunRecord> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let run = owned_run(&mut tx, owner, run_id)?;
        if run.status != RunStatus::Running {
            return Err(not_owner(run_id));
        }
        let step = step_by_seq(&mut tx, run_id, seq)?;
        check_step_can_wait(run_id, seq, step.map(|s| s.state))?;
        if run.cancel_requested {
            return Err(cancel_requested(run_id));
        }
        // Nobody holds a waiting run: no replica claims it, and its old
        // owner's writes are refused until it is resumed.
        tx.execute(
            "UPDATE runs SET status = 'waiting', owner = NULL, updated_at = $2 WHERE id = $1",
            &[&run_id, &now_ms],
        )?;
        tx.commit()?;
        Ok(RunRecord {
            status: RunStatus::Waiting,
            owner: None,
            updated_at_ms: now_ms,
            ..run
        })
    }

    fn resume_run(
        &self,
        tenant_id: Option<&str>,
        run_id: &str,
        seq: i64,
        output: &str,
        owner: &str,
        now_ms: i64,
    ) -> Result<Option<RunRecord>> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // A second resume waits on the row lock, then reads the first one's
        // `running`.
        let Some(run) = run_by_id(&mut tx, tenant_id, run_id, true)? else {
            return Ok(None);
        };
        if run.status != RunStatus::Waiting {
            return Err(run_not_waiting(run_id, run.status));
        }
        let step = step_by_seq(&mut tx, run_id, seq)?;
        check_step_waits(run_id, seq, step.map(|s| s.state))?;
        tx.execute(
            "UPDATE run_steps SET state = 'done', output = $3, finished_at = $4
             WHERE run_id = $1 AND seq = $2",
            &[&run_id, &seq, &output, &now_ms],
        )?;
        tx.execute(
            "UPDATE runs SET status = 'running', owner = $2, steps = steps + 1, updated_at = $3
             WHERE id = $1",
            &[&run_id, &owner, &now_ms],
        )?;
        tx.commit()?;
        Ok(Some(RunRecord {
            status: RunStatus::Running,
            owner: Some(owner.to_string()),
            steps: run.steps + 1,
            updated_at_ms: now_ms,
            ..run
        }))
    }

    fn cancel_run(
        &self,
        tenant_id: Option<&str>,
        run_id: &str,
        now_ms: i64,
    ) -> Result<Option<RunRecord>> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let Some(run) = run_by_id(&mut tx, tenant_id, run_id, true)? else {
            return Ok(None);
        };
        if run.status.is_final() {
            return Ok(Some(run));
        }
        let held = match (&run.owner, run.status) {
            (Some(owner), RunStatus::Running) => tx
                .query_opt(
                    "SELECT 1 FROM replicas WHERE id = $1 AND lease_expires_at >= $2",
                    &[owner, &now_ms],
                )?
                .is_some(),
            _ => false,
        };
        let run = if held {
            // Its owner stops it before the next step.
            tx.execute(
                "UPDATE runs SET cancel_requested = TRUE, updated_at = $2 WHERE id = $1",
                &[&run_id, &now_ms],
            )?;
            RunRecord {
                cancel_requested: true,
                updated_at_ms: now_ms,
                ..run
            }
        } else {
            tx.execute(
                "UPDATE runs SET status = 'cancelled', error = $2, cancel_requested = TRUE,
                     finished_at = $3, updated_at = $3
                 WHERE id = $1",
                &[&run_id, &CANCELLED, &now_ms],
            )?;
            RunRecord {
                status: RunStatus::Cancelled,
                error: Some(CANCELLED.to_string()),
                cancel_requested: true,
                finished_at_ms: Some(now_ms),
                updated_at_ms: now_ms,
                ..run
            }
        };
        tx.commit()?;
        Ok(Some(run))
    }
}
