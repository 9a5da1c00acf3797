//! Definitions, runs and the step journal on SQLite. Every check-and-write
//! is one IMMEDIATE transaction: SQLite takes its write lock at BEGIN, so
//! two stores on one file never both claim a run, both resume a waiting
//! one, both save the same version of a definition, or write to a run the
//! other just took over.

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use super::Store;
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

const DEFINITION_COLUMNS: &str = "tenant_id, kind, name, version, body, created_at, created_by";

const RUN_COLUMNS: &str = "id, tenant_id, key_id, kind, name, version, input, status, result,
     error, owner, cancel_requested, steps, created_at, updated_at, finished_at";

// Steps journaled before paths existed have none: their seq stands in.
const STEP_COLUMNS: &str = "run_id, seq, kind, name, input, output, state, idempotency_key,
     attempts, started_at, finished_at, COALESCE(path, CAST(seq AS TEXT))";

// Rows as read, their enum columns as stored text until `checked`.

struct RawDefinition {
    record: Definition,
    kind: String,
}

fn definition_from_row(r: &Row<'_>) -> rusqlite::Result<RawDefinition> {
    Ok(RawDefinition {
        record: Definition {
            tenant_id: r.get(0)?,
            kind: DefinitionKind::Agent,
            name: r.get(2)?,
            version: r.get(3)?,
            body: r.get(4)?,
            created_at_ms: r.get(5)?,
            created_by: r.get(6)?,
        },
        kind: r.get(1)?,
    })
}

impl RawDefinition {
    fn checked(self) -> Result<Definition> {
        let d = self.record;
        let kind = DefinitionKind::parse(&self.kind).ok_or_else(|| StoreError::BadRow {
            table: "definitions",
            id: format!("{}/{}/{}", d.tenant_id, d.name, d.version),
            reason: format!("kind `{}`", self.kind),
        })?;
        Ok(Definition { kind, ..d })
    }
}

struct RawRun {
    record: RunRecord,
    kind: String,
    status: String,
}

fn run_from_row(r: &Row<'_>) -> rusqlite::Result<RawRun> {
    Ok(RawRun {
        record: RunRecord {
            id: r.get(0)?,
            tenant_id: r.get(1)?,
            key_id: r.get(2)?,
            kind: DefinitionKind::Agent,
            name: r.get(4)?,
            version: r.get(5)?,
            input: r.get(6)?,
            status: RunStatus::Running,
            result: r.get(8)?,
            error: r.get(9)?,
            owner: r.get(10)?,
            cancel_requested: r.get(11)?,
            steps: r.get(12)?,
            created_at_ms: r.get(13)?,
            updated_at_ms: r.get(14)?,
            finished_at_ms: r.get(15)?,
        },
        kind: r.get(3)?,
        status: r.get(7)?,
    })
}

impl RawRun {
    fn checked(self) -> Result<RunRecord> {
        let run = self.record;
        let bad = |reason: String| StoreError::BadRow {
            table: "runs",
            id: run.id.clone(),
            reason,
        };
        let kind = DefinitionKind::parse(&self.kind)
            .ok_or_else(|| bad(format!("kind `{}`", self.kind)))?;
        let status = RunStatus::parse(&self.status)
            .ok_or_else(|| bad(format!("status `{}`", self.status)))?;
        Ok(RunRecord {
            kind,
            status,
            ..run
        })
    }
}

struct RawStep {
    record: StepRecord,
    state: String,
}

fn step_from_row(r: &Row<'_>) -> rusqlite::Result<RawStep> {
    Ok(RawStep {
        record: StepRecord {
            run_id: r.get(0)?,
            seq: r.get(1)?,
            path: r.get(11)?,
            kind: r.get(2)?,
            name: r.get(3)?,
            input: r.get(4)?,
            output: r.get(5)?,
            state: StepState::Started,
            idempotency_key: r.get(7)?,
            attempts: r.get(8)?,
            started_at_ms: r.get(9)?,
            finished_at_ms: r.get(10)?,
        },
        state: r.get(6)?,
    })
}

impl RawStep {
    fn checked(self) -> Result<StepRecord> {
        let step = self.record;
        let state = StepState::parse(&self.state).ok_or_else(|| StoreError::BadRow {
            table: "run_steps",
            id: idempotency_key(&step.run_id, step.seq),
            reason: format!("state `{}`", self.state),
        })?;
        Ok(StepRecord { state, ..step })
    }
}

fn run_by_id(
    conn: &Connection,
    tenant_id: Option<&str>,
    run_id: &str,
) -> Result<Option<RunRecord>> {
    let sql =
        format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1 AND (?2 IS NULL OR tenant_id = ?2)");
    conn.prepare_cached(&sql)?
        .query_row(params![run_id, tenant_id], run_from_row)
        .optional()?
        .map(RawRun::checked)
        .transpose()
}

fn step_by_seq(conn: &Connection, run_id: &str, seq: i64) -> Result<Option<StepRecord>> {
    let sql = format!("SELECT {STEP_COLUMNS} FROM run_steps WHERE run_id = ?1 AND seq = ?2");
    conn.prepare_cached(&sql)?
        .query_row(params![run_id, seq], step_from_row)
        .optional()?
        .map(RawStep::checked)
        .transpose()
}

/// The run `owner` may write to: it exists, `owner` holds it, and it has
/// not ended. Runs inside the caller's transaction.
fn owned_run(conn: &Connection, owner: &str, run_id: &str) -> Result<RunRecord> {
    let run = run_by_id(conn, None, run_id)?
        .ok_or_else(|| StoreError::NotFound(format!("no run `{run_id}`")))?;
    if run.owner.as_deref() != Some(owner) {
        return Err(not_owner(run_id));
    }
    Ok(run)
}

/// Whether `replica` holds a lease that has not lapsed at `now_ms`.
fn lease_holds(conn: &Connection, replica: &str, now_ms: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM replicas WHERE id = ?1 AND lease_expires_at >= ?2")?
        .query_row(params![replica, now_ms], |_| Ok(()))
        .optional()?
        .is_some())
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Runs for Store {
    fn put_definition(
        &self,
        tenant_id: &str,
        kind: DefinitionKind,
        name: &str,
        body: &str,
        created_by: Option<&str>,
        now_ms: i64,
    ) -> Result<Definition> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let newest = tx
            .prepare_cached(&format!(
                "SELECT {DEFINITION_COLUMNS}, retired_at IS NOT NULL FROM definitions
                 WHERE tenant_id = ?1 AND kind = ?2 AND name = ?3
                 ORDER BY version DESC LIMIT 1"
            ))?
            .query_row(params![tenant_id, kind.as_str(), name], |r| {
                Ok((definition_from_row(r)?, r.get::<_, bool>(7)?))
            })
            .optional()?;
        let version = match newest {
            Some((raw, false)) if raw.record.body == body => return raw.checked(),
            Some((raw, _)) => raw.record.version + 1,
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
        tx.prepare_cached(
            "INSERT INTO definitions (tenant_id, kind, name, version, body, created_at,
                 created_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            saved.tenant_id,
            kind.as_str(),
            saved.name,
            saved.version,
            saved.body,
            saved.created_at_ms,
            saved.created_by
        ])?;
        tx.commit()?;
        Ok(saved)
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
             WHERE tenant_id = ?1 AND kind = ?2 AND name = ?3
                 AND (version = ?4 OR (?4 IS NULL AND retired_at IS NULL))
             ORDER BY version DESC LIMIT 1"
        );
        self.lock()?
            .prepare_cached(&sql)?
            .query_row(
                params![tenant_id, kind.as_str(), name, version],
                definition_from_row,
            )
            .optional()?
            .map(RawDefinition::checked)
            .transpose()
    }

    fn definitions(
        &self,
        tenant_id: Option<&str>,
        kind: DefinitionKind,
    ) -> Result<Vec<Definition>> {
        let sql = format!(
            "SELECT {DEFINITION_COLUMNS} FROM definitions d
             WHERE kind = ?1 AND (?2 IS NULL OR tenant_id = ?2) AND retired_at IS NULL
                 AND version = (SELECT MAX(version) FROM definitions n
                                WHERE n.tenant_id = d.tenant_id AND n.kind = d.kind
                                    AND n.name = d.name AND n.retired_at IS NULL)
             ORDER BY name, tenant_id"
        );
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![kind.as_str(), tenant_id], definition_from_row)?;
        rows.map(|r| r?.checked()).collect()
    }

    fn retire_definition(
        &self,
        tenant_id: &str,
        kind: DefinitionKind,
        name: &str,
        now_ms: i64,
    ) -> Result<bool> {
        let changed = self.lock()?.execute(
            "UPDATE definitions SET retired_at = ?4
             WHERE tenant_id = ?1 AND kind = ?2 AND name = ?3 AND retired_at IS NULL",
            params![tenant_id, kind.as_str(), name, now_ms],
        )?;
        Ok(changed > 0)
    }

    fn create_run(&self, run: &NewRun, owner: &str, now_ms: i64) -> Result<RunRecord> {
        let record = run.started(owner, now_ms);
        let inserted = self.lock()?.execute(
            "INSERT INTO runs (id, tenant_id, key_id, kind, name, version, input, status, owner,
                 created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)
             ON CONFLICT DO NOTHING",
            params![
                record.id,
                record.tenant_id,
                record.key_id,
                record.kind.as_str(),
                record.name,
                record.version,
                record.input,
                record.status.as_str(),
                owner,
                now_ms
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
        run_by_id(&*self.lock()?, tenant_id, run_id)
    }

    fn runs(&self, query: &RunQuery) -> Result<Vec<RunRecord>> {
        let n = match query.limit {
            0 => MAX_RUNS,
            n => n.min(MAX_RUNS),
        };
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs
             WHERE (?1 IS NULL OR tenant_id = ?1) AND (?2 IS NULL OR status = ?2)
                 AND (?3 IS NULL OR name = ?3)
             ORDER BY created_at DESC, id DESC LIMIT ?4"
        );
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(
            params![
                query.tenant_id,
                query.status.map(RunStatus::as_str),
                query.name,
                limit(n)
            ],
            run_from_row,
        )?;
        rows.map(|r| r?.checked()).collect()
    }

    fn claim_runs(&self, owner: &str, now_ms: i64, limit_to: usize) -> Result<Vec<RunRecord>> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs r
             WHERE status = 'running'
                 AND (owner IS NULL OR NOT EXISTS (SELECT 1 FROM replicas p
                      WHERE p.id = r.owner AND p.lease_expires_at >= ?1))
             ORDER BY created_at, id LIMIT ?2"
        );
        let found = tx
            .prepare_cached(&sql)?
            .query_map(params![now_ms, limit(limit_to)], run_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut claimed = Vec::with_capacity(found.len());
        for raw in found {
            let mut run = raw.checked()?;
            tx.prepare_cached("UPDATE runs SET owner = ?2, updated_at = ?3 WHERE id = ?1")?
                .execute(params![run.id, owner, now_ms])?;
            run.owner = Some(owner.to_string());
            run.updated_at_ms = now_ms;
            claimed.push(run);
        }
        tx.commit()?;
        Ok(claimed)
    }

    fn release_runs(&self, owner: &str) -> Result<usize> {
        Ok(self.lock()?.execute(
            "UPDATE runs SET owner = NULL
             WHERE owner = ?1 AND status IN ('running', 'waiting')",
            [owner],
        )?)
    }

    fn begin_step(&self, owner: &str, step: &NewStep, now_ms: i64) -> Result<StepRecord> {
        if step.seq < 0 {
            return Err(StoreError::Invalid(format!(
                "step numbers start at 0, not {}",
                step.seq
            )));
        }
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let run = owned_run(&tx, owner, &step.run_id)?;
        if run.status != RunStatus::Running {
            return Err(not_owner(&step.run_id));
        }
        let begun = match step_by_seq(&tx, &step.run_id, step.seq)? {
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
                tx.prepare_cached(
                    "INSERT INTO run_steps (run_id, seq, kind, name, input, state,
                         idempotency_key, attempts, started_at, path)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?
                .execute(params![
                    record.run_id,
                    record.seq,
                    record.kind,
                    record.name,
                    record.input,
                    record.state.as_str(),
                    record.idempotency_key,
                    record.attempts,
                    record.started_at_ms,
                    record.path
                ])?;
                record
            }
            // The previous owner began it and died before it ended: its
            // effect may or may not have happened, so it runs again under
            // the same idempotency key.
            Some(mut started) if started.state == StepState::Started => {
                tx.prepare_cached(
                    "UPDATE run_steps SET attempts = attempts + 1 WHERE run_id = ?1 AND seq = ?2",
                )?
                .execute(params![step.run_id, step.seq])?;
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
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let run = owned_run(&tx, owner, run_id)?;
        if run.status.is_final() {
            return Err(not_owner(run_id));
        }
        let step = step_by_seq(&tx, run_id, seq)?.ok_or_else(|| {
            StoreError::NotFound(format!("step {seq} of run `{run_id}` was never begun"))
        })?;
        if step.state != StepState::Started {
            return Ok(step);
        }
        tx.prepare_cached(
            "UPDATE run_steps SET state = ?3, output = ?4, finished_at = ?5
             WHERE run_id = ?1 AND seq = ?2",
        )?
        .execute(params![run_id, seq, state.as_str(), output, now_ms])?;
        tx.prepare_cached("UPDATE runs SET steps = steps + 1, updated_at = ?2 WHERE id = ?1")?
            .execute(params![run_id, now_ms])?;
        tx.commit()?;
        Ok(StepRecord {
            state,
            output: Some(output.to_string()),
            finished_at_ms: Some(now_ms),
            ..step
        })
    }

    fn steps(&self, run_id: &str) -> Result<Vec<StepRecord>> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {STEP_COLUMNS} FROM run_steps WHERE run_id = ?1 ORDER BY seq"
        ))?;
        let rows = stmt.query_map([run_id], step_from_row)?;
        rows.map(|r| r?.checked()).collect()
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
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let run = owned_run(&tx, owner, run_id)?;
        if run.status.is_final() {
            // Finishing again the same way (a retry) changes nothing; any
            // other end (it was cancelled meanwhile) is not this owner's.
            return if run.status == status {
                Ok(run)
            } else {
                Err(not_owner(run_id))
            };
        }
        tx.prepare_cached(
            "UPDATE runs SET status = ?2, result = ?3, error = ?4, finished_at = ?5,
                 updated_at = ?5
             WHERE id = ?1",
        )?
        .execute(params![run_id, status.as_str(), result, error, now_ms])?;
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
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let run = owned_run(&tx, owner, run_id)?;
        if run.status != RunStatus::Running {
            return Err(not_owner(run_id));
        }
        let step = step_by_seq(&tx, run_id, seq)?;
        check_step_can_wait(run_id, seq, step.map(|s| s.state))?;
        if run.cancel_requested {
            return Err(cancel_requested(run_id));
        }
        // Nobody holds a waiting run: no replica claims it, and its old
        // owner's writes are refused until it is resumed.
        tx.prepare_cached(
            "UPDATE runs SET status = 'waiting', owner = NULL, updated_at = ?2 WHERE id = ?1",
        )?
        .execute(params![run_id, now_ms])?;
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
        let mut conn = self.lock()?;
        // The write lock taken at BEGIN makes a second resume see the first
        // one's `running`.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(run) = run_by_id(&tx, tenant_id, run_id)? else {
            return Ok(None);
        };
        if run.status != RunStatus::Waiting {
            return Err(run_not_waiting(run_id, run.status));
        }
        let step = step_by_seq(&tx, run_id, seq)?;
        check_step_waits(run_id, seq, step.map(|s| s.state))?;
        tx.prepare_cached(
            "UPDATE run_steps SET state = 'done', output = ?3, finished_at = ?4
             WHERE run_id = ?1 AND seq = ?2",
        )?
        .execute(params![run_id, seq, output, now_ms])?;
        tx.prepare_cached(
            "UPDATE runs SET status = 'running', owner = ?2, steps = steps + 1, updated_at = ?3
             WHERE id = ?1",
        )?
        .execute(params![run_id, owner, now_ms])?;
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
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(run) = run_by_id(&tx, tenant_id, run_id)? else {
            return Ok(None);
        };
        if run.status.is_final() {
            return Ok(Some(run));
        }
        let held = match (&run.owner, run.status) {
            (Some(owner), RunStatus::Running) => lease_holds(&tx, owner, now_ms)?,
            _ => false,
        };
        let run = if held {
            // Its owner stops it before the next step.
            tx.prepare_cached(
                "UPDATE runs SET cancel_requested = 1, updated_at = ?2 WHERE id = ?1",
            )?
            .execute(params![run_id, now_ms])?;
            RunRecord {
                cancel_requested: true,
                updated_at_ms: now_ms,
                ..run
            }
        } else {
            tx.prepare_cached(
                "UPDATE runs SET status = 'cancelled', error = ?2, cancel_requested = 1,
                     finished_at = ?3, updated_at = ?3
                 WHERE id = ?1",
            )?
            .execute(params![run_id, CANCELLED, now_ms])?;
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

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn run(id: &str) -> NewRun {
        NewRun {
            id: id.into(),
            tenant_id: "t1".into(),
            key_id: None,
            kind: DefinitionKind::Workflow,
            name: "flow".into(),
            version: 1,
            input: "{}".into(),
        }
    }

    #[test]
    fn unknown_enum_text_is_a_bad_row() -> TestResult {
        let store = Store::open_in_memory()?;
        store.create_run(&run("run-1"), "r1", 10)?;
        store.begin_step(
            "r1",
            &NewStep {
                run_id: "run-1".into(),
                seq: 0,
                path: "search".into(),
                kind: "tool".into(),
                name: "search".into(),
                input: "{}".into(),
            },
            11,
        )?;
        store.put_definition("t1", DefinitionKind::Agent, "a", "{}", None, 12)?;
        // The CHECK constraints refuse such text; a row that slipped past
        // them is an error naming the row, not a panic or a default.
        assert!(store
            .conn_unchecked()
            .execute("UPDATE runs SET status = 'exploded'", [])
            .is_err());
        store.conn_unchecked().execute_batch(
            "PRAGMA ignore_check_constraints = ON;
             UPDATE runs SET status = 'exploded';
             UPDATE run_steps SET state = 'melted';
             UPDATE definitions SET kind = 'robot';",
        )?;
        let err = store.run(None, "run-1").err().ok_or("must fail")?;
        assert!(
            matches!(err, StoreError::BadRow { table: "runs", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("exploded"), "{err}");
        assert!(store.runs(&RunQuery::default()).is_err());
        let err = store.steps("run-1").err().ok_or("must fail")?;
        assert!(
            matches!(
                err,
                StoreError::BadRow {
                    table: "run_steps",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("melted"), "{err}");
        // Definitions are looked up by kind, so one of no known kind is
        // simply not found.
        assert!(store
            .definition("t1", DefinitionKind::Agent, "a", Some(1))?
            .is_none());
        Ok(())
    }

    #[test]
    fn steps_journaled_before_paths_read_their_seq_as_path() -> TestResult {
        let store = Store::open_in_memory()?;
        store.create_run(&run("run-1"), "r1", 10)?;
        for (seq, path) in [(0, "classify"), (7, "each[2]")] {
            let step = NewStep {
                run_id: "run-1".into(),
                seq,
                path: path.into(),
                kind: "model".into(),
                name: "m".into(),
                input: "{}".into(),
            };
            store.begin_step("r1", &step, 11)?;
        }
        store
            .conn_unchecked()
            .execute("UPDATE run_steps SET path = NULL", [])?;
        let paths: Vec<String> = store.steps("run-1")?.into_iter().map(|s| s.path).collect();
        assert_eq!(paths, ["0", "7"]);
        // Begun again, the old row keeps no path: its seq still stands in.
        let step = NewStep {
            run_id: "run-1".into(),
            seq: 7,
            path: "each[2]".into(),
            kind: "model".into(),
            name: "m".into(),
            input: "{}".into(),
        };
        let again = store.begin_step("r1", &step, 12)?;
        assert_eq!((again.path.as_str(), again.attempts), ("7", 2));
        Ok(())
    }
}
