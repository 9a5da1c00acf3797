//! The store suite's part on agents, workflows and run journals.

use std::sync::Arc;

use kiln_store::runs::{
    Definition, DefinitionKind, NewRun, NewStep, RunQuery, RunRecord, RunStatus, StepRecord,
    StepState,
};
use kiln_store::{Database, StoreError};

use super::*;

fn new_run(id: &str, tenant_id: &str, name: &str) -> NewRun {
    NewRun {
        id: id.into(),
        tenant_id: tenant_id.into(),
        key_id: Some("key-1".into()),
        kind: DefinitionKind::Workflow,
        name: name.into(),
        version: 1,
        input: format!("{{\"run\":\"{id}\"}}"),
    }
}

fn new_step(run_id: &str, seq: i64, input: &str) -> NewStep {
    NewStep {
        run_id: run_id.into(),
        seq,
        path: format!("search[{seq}]"),
        kind: "tool".into(),
        name: "search".into(),
        input: input.into(),
    }
}

fn is_conflict<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Conflict(ref m)) if m.contains("not owned by this replica"))
}

/// The message of a [`StoreError::Conflict`], or what came instead.
fn conflict<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Err(StoreError::Conflict(m)) => m,
        other => format!("not a conflict: {other:?}"),
    }
}

/// The message of a [`StoreError::Invalid`], or what came instead.
fn invalid<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Err(StoreError::Invalid(m)) => m,
        other => format!("not invalid: {other:?}"),
    }
}

/// Saving a changed body adds a version, saving it unchanged does nothing;
/// retiring hides every version from new runs, not from pinned ones.
pub fn definitions_are_versioned(db: &dyn Database) -> TestResult {
    use DefinitionKind::{Agent, Workflow};
    let v1 = db.put_definition("t1", Agent, "helper", "{\"a\":1}", Some("key-1"), 100)?;
    assert_eq!(
        v1,
        Definition {
            tenant_id: "t1".into(),
            kind: Agent,
            name: "helper".into(),
            version: 1,
            body: "{\"a\":1}".into(),
            created_at_ms: 100,
            created_by: Some("key-1".into()),
        }
    );
    assert_eq!(
        db.put_definition("t1", Agent, "helper", "{\"a\":1}", None, 200)?,
        v1
    );
    let v2 = db.put_definition("t1", Agent, "helper", "{\"a\":2}", None, 300)?;
    assert_eq!((v2.version, v2.created_by.as_deref()), (2, None));
    // Going back to an older body is a change too.
    let v3 = db.put_definition("t1", Agent, "helper", "{\"a\":1}", None, 400)?;
    assert_eq!(v3.version, 3);
    assert_eq!(
        db.definition("t1", Agent, "helper", None)?,
        Some(v3.clone())
    );
    assert_eq!(db.definition("t1", Agent, "helper", Some(1))?, Some(v1));
    assert_eq!(db.definition("t1", Agent, "helper", Some(4))?, None);
    assert_eq!(db.definition("t1", Workflow, "helper", None)?, None);
    assert_eq!(db.definition("t2", Agent, "helper", None)?, None);
    // Kinds and tenants have versions of their own.
    let flow = db.put_definition("t1", Workflow, "helper", "{}", None, 500)?;
    assert_eq!(flow.version, 1);
    let theirs = db.put_definition("t2", Agent, "helper", "{}", None, 500)?;
    assert_eq!(theirs.version, 1);
    let alpha = db.put_definition("t1", Agent, "alpha", "{}", None, 600)?;
    let names = |t: Option<&str>, kind| -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(db
            .definitions(t, kind)?
            .into_iter()
            .map(|d| (d.tenant_id, d.name, d.version))
            .collect())
    };
    let row = |t: &str, n: &str, v: i64| (t.to_string(), n.to_string(), v);
    assert_eq!(
        names(Some("t1"), Agent)?,
        [row("t1", "alpha", 1), row("t1", "helper", 3)]
    );
    assert_eq!(
        names(None, Agent)?,
        [
            row("t1", "alpha", 1),
            row("t1", "helper", 3),
            row("t2", "helper", 1)
        ]
    );
    assert_eq!(names(Some("t1"), Workflow)?, [row("t1", "helper", 1)]);
    assert_eq!(db.definitions(Some("t1"), Agent)?[0], alpha);

    assert!(db.retire_definition("t1", Agent, "helper", 700)?);
    assert!(!db.retire_definition("t1", Agent, "helper", 701)?);
    assert!(!db.retire_definition("t1", Agent, "nobody", 701)?);
    assert_eq!(db.definition("t1", Agent, "helper", None)?, None);
    // Runs pinned to a retired version still find it.
    assert_eq!(db.definition("t1", Agent, "helper", Some(2))?, Some(v2));
    assert_eq!(names(Some("t1"), Agent)?, [row("t1", "alpha", 1)]);
    // Only that one: the workflow and the other tenant's agent stay.
    assert_eq!(db.definition("t1", Workflow, "helper", None)?, Some(flow));
    assert_eq!(db.definition("t2", Agent, "helper", None)?, Some(theirs));
    // Saving a retired definition again, even unchanged, is a new version.
    let v4 = db.put_definition("t1", Agent, "helper", "{\"a\":1}", None, 800)?;
    assert_eq!((v4.version, v4.created_at_ms), (4, 800));
    assert_eq!(db.definition("t1", Agent, "helper", None)?, Some(v4));
    assert_eq!(db.definition("t1", Agent, "helper", Some(3))?, Some(v3));
    assert_eq!(
        names(Some("t1"), Agent)?,
        [row("t1", "alpha", 1), row("t1", "helper", 4)]
    );
    Ok(())
}

/// Many saves of one definition at once: each different body gets a
/// version of its own, and the same body saved at once is one version.
pub fn concurrent_saves_make_distinct_versions(dbs: &[Arc<dyn Database>]) -> TestResult {
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let db = dbs[i % dbs.len()].clone();
            std::thread::spawn(move || -> Result<(i64, i64), StoreError> {
                let changed = db.put_definition(
                    "t1",
                    DefinitionKind::Agent,
                    "busy",
                    &format!("{{\"n\":{i}}}"),
                    None,
                    1,
                )?;
                let same =
                    db.put_definition("t1", DefinitionKind::Workflow, "calm", "{}", None, 1)?;
                Ok((changed.version, same.version))
            })
        })
        .collect();
    let mut versions = Vec::new();
    for h in handles {
        let (changed, same) = h.join().map_err(|_| "thread panicked")??;
        assert_eq!(same, 1);
        versions.push(changed);
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=16).collect::<Vec<i64>>());
    let newest = dbs[0]
        .definition("t1", DefinitionKind::Agent, "busy", None)?
        .unwrap();
    assert_eq!(newest.version, 16);
    Ok(())
}

/// A run from creation to its end, and the queries over runs.
pub fn runs_lifecycle(db: &dyn Database) -> TestResult {
    let now = kiln_store::now_ms();
    db.renew_lease("r1", now + 60_000)?;
    let run = db.create_run(&new_run("run-1", "t1", "flow"), "r1", 1_000)?;
    assert_eq!(
        run,
        RunRecord {
            id: "run-1".into(),
            tenant_id: "t1".into(),
            key_id: Some("key-1".into()),
            kind: DefinitionKind::Workflow,
            name: "flow".into(),
            version: 1,
            input: "{\"run\":\"run-1\"}".into(),
            status: RunStatus::Running,
            result: None,
            error: None,
            owner: Some("r1".into()),
            cancel_requested: false,
            steps: 0,
            created_at_ms: 1_000,
            updated_at_ms: 1_000,
            finished_at_ms: None,
        }
    );
    assert!(matches!(
        db.create_run(&new_run("run-1", "t2", "other"), "r2", 1_001),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(db.run(Some("t1"), "run-1")?, Some(run.clone()));
    assert_eq!(db.run(None, "run-1")?, Some(run.clone()));
    assert_eq!(db.run(None, "run-none")?, None);

    db.begin_step("r1", &new_step("run-1", 0, "{}"), 1_100)?;
    db.finish_step("r1", "run-1", 0, StepState::Done, "{\"ok\":1}", 1_200)?;
    let mid = db.run(None, "run-1")?.unwrap();
    assert_eq!((mid.steps, mid.updated_at_ms), (1, 1_200));

    for status in [RunStatus::Running, RunStatus::Waiting] {
        assert!(matches!(
            db.finish_run("r1", "run-1", status, None, None, 1_300),
            Err(StoreError::Invalid(_))
        ));
    }
    assert!(matches!(
        db.finish_run("r1", "run-none", RunStatus::Failed, None, None, 1_300),
        Err(StoreError::NotFound(_))
    ));
    let done = db.finish_run(
        "r1",
        "run-1",
        RunStatus::Succeeded,
        Some("{\"answer\":42}"),
        None,
        1_300,
    )?;
    assert_eq!(
        done,
        RunRecord {
            status: RunStatus::Succeeded,
            result: Some("{\"answer\":42}".into()),
            steps: 1,
            updated_at_ms: 1_300,
            finished_at_ms: Some(1_300),
            ..run.clone()
        }
    );
    assert_eq!(db.run(Some("t1"), "run-1")?, Some(done.clone()));
    // A retry of the same end changes nothing; another end is refused, and
    // so is any step after the end.
    assert_eq!(
        db.finish_run("r1", "run-1", RunStatus::Succeeded, None, None, 1_400)?,
        done
    );
    assert!(is_conflict(db.finish_run(
        "r1",
        "run-1",
        RunStatus::Failed,
        None,
        Some("late"),
        1_400
    )));
    assert!(is_conflict(db.begin_step(
        "r1",
        &new_step("run-1", 1, "{}"),
        1_400
    )));
    assert!(is_conflict(db.finish_step(
        "r1",
        "run-1",
        0,
        StepState::Done,
        "{}",
        1_400
    )));
    assert_eq!(db.run(None, "run-1")?, Some(done.clone()));

    let failed = db.create_run(&new_run("run-2", "t1", "flow"), "r1", 2_000)?;
    let failed = db.finish_run(
        "r1",
        &failed.id,
        RunStatus::Failed,
        None,
        Some("the tool broke"),
        2_100,
    )?;
    assert_eq!(failed.error.as_deref(), Some("the tool broke"));
    assert_eq!(failed.result, None);

    // Letting go at a clean shutdown: only unfinished runs lose their owner.
    db.create_run(&new_run("run-3", "t1", "flow"), "r1", 3_000)?;
    db.create_run(&new_run("run-4", "t1", "flow"), "r1", 3_000)?;
    db.create_run(&new_run("run-5", "t1", "flow"), "r2", 3_000)?;
    assert_eq!(db.release_runs("r1")?, 2);
    assert_eq!(db.release_runs("r1")?, 0);
    assert_eq!(db.run(None, "run-3")?.unwrap().owner, None);
    assert_eq!(db.run(None, "run-4")?.unwrap().owner, None);
    assert_eq!(db.run(None, "run-5")?.unwrap().owner.as_deref(), Some("r2"));
    assert_eq!(db.run(None, "run-1")?.unwrap().owner.as_deref(), Some("r1"));
    // A run let go is nobody's to write to.
    assert!(is_conflict(db.begin_step(
        "r1",
        &new_step("run-3", 0, "{}"),
        3_100
    )));
    Ok(())
}

/// `run` and `runs` see only the tenant asked for; `runs` lists newest
/// first, filters by status and name, and caps its limit.
pub fn runs_are_scoped_by_tenant(db: &dyn Database) -> TestResult {
    for (id, tenant, name, at) in [
        ("run-a", "t1", "flow", 10),
        ("run-b", "t1", "other", 20),
        ("run-c", "t2", "flow", 30),
        ("run-d", "t1", "flow", 40),
        ("run-e", "t1", "flow", 40),
    ] {
        db.create_run(&new_run(id, tenant, name), "r1", at)?;
    }
    db.finish_run("r1", "run-d", RunStatus::Succeeded, None, None, 50)?;
    assert_eq!(db.run(Some("t2"), "run-a")?, None);
    assert_eq!(db.run(Some("t1"), "run-c")?, None);
    assert_eq!(db.run(Some("t2"), "run-c")?.unwrap().tenant_id, "t2");
    // A cancel for another tenant finds nothing and changes nothing.
    assert_eq!(db.cancel_run(Some("t2"), "run-a", 60)?, None);
    assert_eq!(db.cancel_run(Some("t1"), "run-none", 60)?, None);
    assert_eq!(db.run(None, "run-a")?.unwrap().status, RunStatus::Running);
    let ids = |q: RunQuery| -> Result<Vec<String>, StoreError> {
        Ok(db.runs(&q)?.into_iter().map(|r| r.id).collect())
    };
    let t1 = || RunQuery {
        tenant_id: Some("t1".into()),
        ..RunQuery::default()
    };
    // Newest first; the same millisecond by id, descending.
    assert_eq!(ids(t1())?, ["run-e", "run-d", "run-b", "run-a"]);
    assert_eq!(
        ids(RunQuery::default())?,
        ["run-e", "run-d", "run-c", "run-b", "run-a"]
    );
    assert_eq!(
        ids(RunQuery {
            tenant_id: Some("t2".into()),
            ..RunQuery::default()
        })?,
        ["run-c"]
    );
    assert!(ids(RunQuery {
        tenant_id: Some("t3".into()),
        ..RunQuery::default()
    })?
    .is_empty());
    assert_eq!(
        ids(RunQuery {
            status: Some(RunStatus::Running),
            ..t1()
        })?,
        ["run-e", "run-b", "run-a"]
    );
    assert_eq!(
        ids(RunQuery {
            status: Some(RunStatus::Succeeded),
            ..RunQuery::default()
        })?,
        ["run-d"]
    );
    assert_eq!(
        ids(RunQuery {
            name: Some("flow".into()),
            ..t1()
        })?,
        ["run-e", "run-d", "run-a"]
    );
    assert_eq!(
        ids(RunQuery {
            name: Some("flow".into()),
            status: Some(RunStatus::Running),
            limit: 1,
            ..RunQuery::default()
        })?,
        ["run-e"]
    );
    assert_eq!(ids(RunQuery { limit: 2, ..t1() })?, ["run-e", "run-d"]);
    // 0 means as many as allowed; more than the cap is the cap.
    for i in 0..1_005 {
        db.create_run(&new_run(&format!("bulk-{i:04}"), "t9", "flow"), "r1", 100)?;
    }
    let t9 = |limit| RunQuery {
        tenant_id: Some("t9".into()),
        limit,
        ..RunQuery::default()
    };
    assert_eq!(db.runs(&t9(0))?.len(), 1000);
    assert_eq!(db.runs(&t9(5_000))?.len(), 1000);
    assert_eq!(ids(t9(1))?, ["bulk-1004"]);
    Ok(())
}

/// The step protocol: begun before it runs, finished once, a begun step
/// handed back with one more attempt, a finished one as it is.
pub fn steps_are_journaled_once(db: &dyn Database) -> TestResult {
    db.create_run(&new_run("run-1", "t1", "flow"), "r1", 1_000)?;
    let begun = db.begin_step("r1", &new_step("run-1", 0, "{\"q\":\"a\"}"), 1_100)?;
    assert_eq!(
        begun,
        StepRecord {
            run_id: "run-1".into(),
            seq: 0,
            path: "search[0]".into(),
            kind: "tool".into(),
            name: "search".into(),
            input: "{\"q\":\"a\"}".into(),
            output: None,
            state: StepState::Started,
            idempotency_key: "run-1:0".into(),
            attempts: 1,
            started_at_ms: 1_100,
            finished_at_ms: None,
        }
    );
    assert_eq!(
        begun.idempotency_key,
        kiln_store::runs::idempotency_key("run-1", 0)
    );
    // Begun again before it finished: what was first recorded, one more
    // attempt, the same idempotency key.
    let mut changed = new_step("run-1", 0, "{\"q\":\"b\"}");
    changed.name = "fetch".into();
    changed.path = "fetch".into();
    let again = db.begin_step("r1", &changed, 1_150)?;
    assert_eq!(
        again,
        StepRecord {
            attempts: 2,
            ..begun.clone()
        }
    );
    assert!(matches!(
        db.finish_step("r1", "run-1", 1, StepState::Done, "{}", 1_200),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        db.finish_step("r1", "run-1", 0, StepState::Started, "{}", 1_200),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        db.begin_step("r1", &new_step("run-none", 0, "{}"), 1_200),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(db.run(None, "run-1")?.unwrap().steps, 0);
    let done = db.finish_step("r1", "run-1", 0, StepState::Done, "{\"hits\":3}", 1_200)?;
    assert_eq!(
        done,
        StepRecord {
            output: Some("{\"hits\":3}".into()),
            state: StepState::Done,
            finished_at_ms: Some(1_200),
            ..again.clone()
        }
    );
    let run = db.run(None, "run-1")?.unwrap();
    assert_eq!((run.steps, run.updated_at_ms), (1, 1_200));
    // Finishing again changes nothing, whatever it says.
    assert_eq!(
        db.finish_step("r1", "run-1", 0, StepState::Failed, "{}", 1_300)?,
        done
    );
    let run = db.run(None, "run-1")?.unwrap();
    assert_eq!((run.steps, run.updated_at_ms), (1, 1_200));
    // A finished step is handed back as it is: its effect is not repeated.
    assert_eq!(db.begin_step("r1", &changed, 1_400)?, done);

    db.begin_step("r1", &new_step("run-1", 1, "{}"), 1_500)?;
    let failed = db.finish_step("r1", "run-1", 1, StepState::Failed, "{\"e\":1}", 1_600)?;
    assert_eq!(failed.state, StepState::Failed);
    assert_eq!(
        db.begin_step("r1", &new_step("run-1", 1, "{}"), 1_700)?,
        failed
    );
    assert_eq!(db.run(None, "run-1")?.unwrap().steps, 2);
    assert_eq!(db.steps("run-1")?, [done, failed]);
    assert!(db.steps("run-none")?.is_empty());
    assert!(matches!(
        db.begin_step("r1", &new_step("run-1", -1, "{}"), 1_800),
        Err(StoreError::Invalid(_))
    ));

    // Paths are the steps' readable names, kept as given whatever their
    // order; the seq stays the key.
    let paths = ["classify", "each[2]", "research/3", "résumé · 2"];
    for (i, path) in paths.iter().enumerate() {
        let seq = 10 - i as i64;
        let step = NewStep {
            path: path.to_string(),
            ..new_step("run-1", seq, "{}")
        };
        assert_eq!(db.begin_step("r1", &step, 1_900)?.path, *path);
        let ended = db.finish_step("r1", "run-1", seq, StepState::Done, "{}", 1_950)?;
        assert_eq!(ended.path, *path);
    }
    let journaled: Vec<(i64, String)> = db
        .steps("run-1")?
        .into_iter()
        .map(|s| (s.seq, s.path))
        .collect();
    let expected = [
        (0, "search[0]"),
        (1, "search[1]"),
        (7, "résumé · 2"),
        (8, "research/3"),
        (9, "each[2]"),
        (10, "classify"),
    ];
    assert_eq!(
        journaled,
        expected.map(|(seq, p)| (seq, p.to_string())).to_vec()
    );
    Ok(())
}

/// A replica paused past its lease loses its run to another, which resumes
/// the step it left begun; the paused one's every write is then refused.
pub fn a_taken_over_run_refuses_its_old_owner(db: &dyn Database) -> TestResult {
    let now = kiln_store::now_ms();
    db.renew_lease("paused", now - 1)?;
    db.renew_lease("alive", now + 60_000)?;
    db.create_run(&new_run("run-1", "t1", "flow"), "paused", now - 10)?;
    db.begin_step("paused", &new_step("run-1", 0, "{}"), now - 9)?;
    db.finish_step("paused", "run-1", 0, StepState::Done, "{}", now - 8)?;
    let first = db.begin_step("paused", &new_step("run-1", 1, "{\"n\":1}"), now - 7)?;
    assert_eq!(first.attempts, 1);

    let claimed = db.claim_runs("alive", now, 10)?;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].owner.as_deref(), Some("alive"));
    assert_eq!(claimed[0].steps, 1);
    assert_eq!(db.run(None, "run-1")?, Some(claimed[0].clone()));

    assert!(is_conflict(db.begin_step(
        "paused",
        &new_step("run-1", 2, "{}"),
        now
    )));
    assert!(is_conflict(db.finish_step(
        "paused",
        "run-1",
        1,
        StepState::Done,
        "{}",
        now
    )));
    assert!(is_conflict(db.finish_run(
        "paused",
        "run-1",
        RunStatus::Succeeded,
        None,
        None,
        now
    )));
    // The paused replica renewing its lease does not give the run back.
    db.renew_lease("paused", now + 60_000)?;
    assert!(is_conflict(db.begin_step(
        "paused",
        &new_step("run-1", 1, "{}"),
        now
    )));

    // The new owner resumes: the begun step again, under the same key.
    let resumed = db.begin_step("alive", &new_step("run-1", 1, "{\"n\":2}"), now + 1)?;
    assert_eq!(
        resumed,
        StepRecord {
            attempts: 2,
            ..first.clone()
        }
    );
    assert_eq!(resumed.idempotency_key, "run-1:1");
    db.finish_step("alive", "run-1", 1, StepState::Done, "{}", now + 2)?;
    let end = db.finish_run("alive", "run-1", RunStatus::Succeeded, None, None, now + 3)?;
    assert_eq!((end.steps, end.owner.as_deref()), (2, Some("alive")));
    assert_eq!(db.steps("run-1")?[1].attempts, 2);
    assert!(db.claim_runs("alive", now + 1_000_000, 10)?.is_empty());
    Ok(())
}

/// Claiming takes `running` runs whose owner's lease lapsed, whose owner
/// has none, or that were let go; oldest first, up to the limit.
pub fn only_lapsed_or_released_runs_are_claimed(db: &dyn Database) -> TestResult {
    let now = kiln_store::now_ms();
    db.renew_lease("live", now + 60_000)?;
    db.renew_lease("lapsed", now - 1)?;
    db.renew_lease("edge", now)?;
    db.renew_lease("claimer", now + 60_000)?;
    db.renew_lease("leaving", now + 60_000)?;
    for (id, owner, at) in [
        ("run-done", "lapsed", now - 60),
        ("run-lapsed", "lapsed", now - 50),
        ("run-ghost", "no-lease", now - 40),
        ("run-free", "leaving", now - 30),
        ("run-live", "live", now - 20),
        ("run-edge", "edge", now - 10),
    ] {
        db.create_run(&new_run(id, "t1", "flow"), owner, at)?;
    }
    db.finish_run(
        "lapsed",
        "run-done",
        RunStatus::Failed,
        None,
        Some("x"),
        now - 55,
    )?;
    assert_eq!(db.release_runs("leaving")?, 1);
    assert!(db.claim_runs("claimer", now, 0)?.is_empty());
    let first = db.claim_runs("claimer", now, 2)?;
    let ids: Vec<&str> = first.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["run-lapsed", "run-ghost"]);
    assert!(first
        .iter()
        .all(|r| r.owner.as_deref() == Some("claimer") && r.status == RunStatus::Running));
    assert_eq!(
        db.run(None, "run-lapsed")?.unwrap().owner.as_deref(),
        Some("claimer")
    );
    let rest = db.claim_runs("claimer", now, 10)?;
    assert_eq!(
        rest.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["run-free"]
    );
    assert!(db.claim_runs("claimer", now, 10)?.is_empty());
    // A lease ending exactly now still holds; a millisecond later it lapsed.
    let later = db.claim_runs("claimer", now + 1, 10)?;
    assert_eq!(
        later.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["run-edge"]
    );
    let live = db.run(None, "run-live")?.unwrap();
    assert_eq!(live.owner.as_deref(), Some("live"));
    let done = db.run(None, "run-done")?.unwrap();
    assert_eq!(
        (done.status, done.owner.as_deref()),
        (RunStatus::Failed, Some("lapsed"))
    );
    // Let go at shutdown, they go to the next replica at once.
    assert_eq!(db.release_runs("claimer")?, 4);
    assert_eq!(db.claim_runs("live", now, 10)?.len(), 4);
    Ok(())
}

/// A run nobody holds is cancelled at once; a held one is asked to stop;
/// a finished one is left as it is.
pub fn cancel_rules(db: &dyn Database) -> TestResult {
    let now = kiln_store::now_ms();
    db.renew_lease("live", now + 60_000)?;
    db.renew_lease("lapsed", now - 1)?;
    for (id, owner) in [
        ("run-held", "live"),
        ("run-lapsed", "lapsed"),
        ("run-ghost", "no-lease"),
        ("run-free", "leaving"),
        ("run-done", "live"),
        ("run-finishes", "live"),
    ] {
        db.create_run(&new_run(id, "t1", "flow"), owner, now - 100)?;
    }
    db.release_runs("leaving")?;
    let done = db.finish_run(
        "live",
        "run-done",
        RunStatus::Succeeded,
        Some("1"),
        None,
        now - 50,
    )?;

    let asked = db.cancel_run(Some("t1"), "run-held", now)?.unwrap();
    assert_eq!(
        (asked.status, asked.cancel_requested, asked.finished_at_ms),
        (RunStatus::Running, true, None)
    );
    assert_eq!(asked.updated_at_ms, now);
    assert_eq!(db.run(None, "run-held")?, Some(asked.clone()));
    assert_eq!(
        db.cancel_run(None, "run-held", now)?.unwrap().status,
        RunStatus::Running
    );
    // The owner sees the request and stops the run itself.
    let stopped = db.finish_run(
        "live",
        "run-held",
        RunStatus::Cancelled,
        None,
        Some("cancelled"),
        now + 1,
    )?;
    assert_eq!(stopped.status, RunStatus::Cancelled);
    assert_eq!(db.cancel_run(None, "run-held", now + 2)?, Some(stopped));

    for id in ["run-lapsed", "run-ghost", "run-free"] {
        let cancelled = db.cancel_run(Some("t1"), id, now)?.unwrap();
        assert_eq!(cancelled.status, RunStatus::Cancelled, "{id}");
        assert_eq!(cancelled.error.as_deref(), Some("cancelled"), "{id}");
        assert_eq!(cancelled.finished_at_ms, Some(now), "{id}");
        assert_eq!(db.run(None, id)?, Some(cancelled.clone()), "{id}");
        // Cancelled again, it stays as it was.
        assert_eq!(db.cancel_run(None, id, now + 5)?, Some(cancelled));
    }
    // The lapsed owner comes back: the run is over for it.
    assert!(is_conflict(db.begin_step(
        "lapsed",
        &new_step("run-lapsed", 0, "{}"),
        now
    )));
    assert!(is_conflict(db.finish_run(
        "lapsed",
        "run-lapsed",
        RunStatus::Succeeded,
        None,
        None,
        now
    )));
    assert_eq!(
        db.run(None, "run-lapsed")?.unwrap().status,
        RunStatus::Cancelled
    );
    // Nor does anyone claim a cancelled run.
    db.renew_lease("claimer", now + 60_000)?;
    assert!(db.claim_runs("claimer", now, 10)?.is_empty());

    assert_eq!(db.cancel_run(Some("t1"), "run-done", now)?, Some(done));
    // A cancel asked for does not change how the owner ends the run.
    db.cancel_run(Some("t1"), "run-finishes", now)?;
    let ended = db.finish_run(
        "live",
        "run-finishes",
        RunStatus::Succeeded,
        Some("{}"),
        None,
        now + 1,
    )?;
    assert_eq!(
        (ended.status, ended.cancel_requested),
        (RunStatus::Succeeded, true)
    );

    // A waiting run is nobody's: a cancel ends it at once, and nobody can
    // resume it after.
    db.create_run(&new_run("run-waits", "t1", "flow"), "live", now)?;
    db.begin_step("live", &new_step("run-waits", 0, "{}"), now)?;
    let waiting = db.wait_run("live", "run-waits", 0, now + 1)?;
    let cancelled = db.cancel_run(Some("t1"), "run-waits", now + 2)?.unwrap();
    assert_eq!(
        cancelled,
        RunRecord {
            status: RunStatus::Cancelled,
            error: Some("cancelled".into()),
            cancel_requested: true,
            finished_at_ms: Some(now + 2),
            updated_at_ms: now + 2,
            ..waiting
        }
    );
    assert_eq!(db.run(None, "run-waits")?, Some(cancelled.clone()));
    assert_eq!(
        conflict(db.resume_run(Some("t1"), "run-waits", 0, "{}", "live", now + 3)),
        "run run-waits is not waiting (it is cancelled)"
    );
    assert_eq!(db.run(None, "run-waits")?, Some(cancelled));
    assert!(db.claim_runs("claimer", now + 1_000_000, 10)?.is_empty());
    Ok(())
}

/// A run waits on a begun step (an approval) with nobody holding it, so
/// nothing claims it, until a resume finishes that step and hands the run
/// to the resuming replica.
pub fn waiting_runs_pause_until_resumed(db: &dyn Database) -> TestResult {
    let now = kiln_store::now_ms();
    db.renew_lease("r1", now + 1_000)?;
    db.create_run(&new_run("run-1", "t1", "flow"), "r1", now)?;
    db.begin_step("r1", &new_step("run-1", 0, "{}"), now)?;
    db.finish_step("r1", "run-1", 0, StepState::Done, "{}", now + 1)?;
    let approval = NewStep {
        path: "approve".into(),
        kind: "approval".into(),
        ..new_step("run-1", 1, "{\"ask\":\"ship it?\"}")
    };
    let asked = db.begin_step("r1", &approval, now + 2)?;

    // Only the owner of a running run waits, and only on a begun step.
    assert!(is_conflict(db.wait_run("r2", "run-1", 1, now + 3)));
    assert!(matches!(
        db.wait_run("r1", "run-none", 1, now + 3),
        Err(StoreError::NotFound(_))
    ));
    let why = invalid(db.wait_run("r1", "run-1", 0, now + 3));
    assert!(
        why.contains("step 0 of run run-1") && why.contains("done"),
        "{why}"
    );
    let why = invalid(db.wait_run("r1", "run-1", 5, now + 3));
    assert!(
        why.contains("step 5 of run run-1") && why.contains("never begun"),
        "{why}"
    );
    let running = db.run(None, "run-1")?.unwrap();
    assert_eq!(
        (running.status, running.owner.as_deref()),
        (RunStatus::Running, Some("r1"))
    );

    let waiting = db.wait_run("r1", "run-1", 1, now + 10)?;
    assert_eq!(
        waiting,
        RunRecord {
            status: RunStatus::Waiting,
            owner: None,
            updated_at_ms: now + 10,
            ..running
        }
    );
    assert_eq!(db.run(Some("t1"), "run-1")?, Some(waiting.clone()));
    // Its old owner can write to it no more, nor wait again.
    assert!(is_conflict(db.wait_run("r1", "run-1", 1, now + 11)));
    assert!(is_conflict(db.begin_step(
        "r1",
        &new_step("run-1", 2, "{}"),
        now + 11
    )));
    assert!(is_conflict(db.finish_step(
        "r1",
        "run-1",
        1,
        StepState::Done,
        "{}",
        now + 11
    )));
    assert!(is_conflict(db.finish_run(
        "r1",
        "run-1",
        RunStatus::Succeeded,
        None,
        None,
        now + 11
    )));
    // Long after its owner's lease lapsed, nobody claims it or lets it go.
    db.renew_lease("claimer", now + 10_000_000)?;
    assert!(db.claim_runs("claimer", now + 1_000_000, 10)?.is_empty());
    assert_eq!(db.release_runs("r1")?, 0);
    assert_eq!(db.run(None, "run-1")?, Some(waiting.clone()));
    assert_eq!(db.steps("run-1")?[1], asked);

    // Resumes: not another tenant's, not a step it does not wait on.
    assert_eq!(
        db.resume_run(Some("t2"), "run-1", 1, "{}", "r2", now + 20)?,
        None
    );
    assert_eq!(
        db.resume_run(Some("t1"), "run-none", 1, "{}", "r2", now + 20)?,
        None
    );
    assert_eq!(
        conflict(db.resume_run(Some("t1"), "run-1", 0, "{}", "r2", now + 20)),
        "step 0 of run run-1 is not waiting (it is done)"
    );
    assert_eq!(
        conflict(db.resume_run(None, "run-1", 9, "{}", "r2", now + 20)),
        "step 9 of run run-1 is not waiting (it was never begun)"
    );
    assert_eq!(db.run(None, "run-1")?, Some(waiting.clone()));

    let resumed = db
        .resume_run(
            Some("t1"),
            "run-1",
            1,
            "{\"approved\":true}",
            "r2",
            now + 30,
        )?
        .unwrap();
    assert_eq!(
        resumed,
        RunRecord {
            status: RunStatus::Running,
            owner: Some("r2".into()),
            steps: 2,
            updated_at_ms: now + 30,
            ..waiting
        }
    );
    assert_eq!(db.run(None, "run-1")?, Some(resumed.clone()));
    let approved = StepRecord {
        output: Some("{\"approved\":true}".into()),
        state: StepState::Done,
        finished_at_ms: Some(now + 30),
        ..asked
    };
    assert_eq!(db.steps("run-1")?[1], approved);
    assert_eq!(approved.path, "approve");
    // Begun again by the new owner, the step is handed back as it ended.
    assert_eq!(db.begin_step("r2", &approval, now + 31)?, approved);
    assert_eq!(
        conflict(db.resume_run(Some("t1"), "run-1", 1, "{}", "r3", now + 32)),
        "run run-1 is not waiting (it is running)"
    );

    // The new owner carries on and ends it; the old one stays refused.
    db.begin_step("r2", &new_step("run-1", 2, "{}"), now + 40)?;
    assert!(is_conflict(db.begin_step(
        "r1",
        &new_step("run-1", 2, "{}"),
        now + 40
    )));
    db.finish_step("r2", "run-1", 2, StepState::Done, "{}", now + 41)?;
    let done = db.finish_run("r2", "run-1", RunStatus::Succeeded, None, None, now + 42)?;
    assert_eq!((done.steps, done.status), (3, RunStatus::Succeeded));
    assert_eq!(
        conflict(db.resume_run(None, "run-1", 2, "{}", "r3", now + 43)),
        "run run-1 is not waiting (it is succeeded)"
    );
    // A finished run waits no more.
    assert!(is_conflict(db.wait_run("r2", "run-1", 2, now + 43)));

    // A run asked to stop does not wait: its owner cancels it instead.
    db.renew_lease("live", now + 60_000)?;
    db.create_run(&new_run("run-2", "t1", "flow"), "live", now)?;
    db.begin_step("live", &new_step("run-2", 0, "{}"), now)?;
    let asked_to_stop = db.cancel_run(Some("t1"), "run-2", now + 1)?.unwrap();
    assert!(asked_to_stop.cancel_requested);
    let why = conflict(db.wait_run("live", "run-2", 0, now + 2));
    assert!(why.contains("run run-2 was asked to stop"), "{why}");
    assert_eq!(db.run(None, "run-2")?, Some(asked_to_stop));
    Ok(())
}

/// Resumers on every store race to end one wait: exactly one wins and
/// owns the run; the others are told it is running again.
pub fn concurrent_resumes_have_one_winner(dbs: &[Arc<dyn Database>]) -> TestResult {
    let now = kiln_store::now_ms();
    let racers = 8;
    for round in 0..4 {
        let run_id = format!("run-{round}");
        let db = &dbs[0];
        db.create_run(&new_run(&run_id, "t1", "flow"), "r0", now)?;
        db.begin_step("r0", &new_step(&run_id, 0, "{}"), now)?;
        db.wait_run("r0", &run_id, 0, now + 1)?;
        let start = Arc::new(std::sync::Barrier::new(racers));
        let handles: Vec<_> = (0..racers)
            .map(|i| {
                let db = dbs[i % dbs.len()].clone();
                let start = start.clone();
                let run_id = run_id.clone();
                std::thread::spawn(move || {
                    start.wait();
                    let output = format!("{{\"by\":{i}}}");
                    let me = format!("resumer-{i}");
                    (
                        i,
                        db.resume_run(Some("t1"), &run_id, 0, &output, &me, now + 2),
                    )
                })
            })
            .collect();
        let mut winners = Vec::new();
        for h in handles {
            let (i, outcome) = h.join().map_err(|_| "thread panicked")?;
            match outcome {
                Ok(Some(run)) => winners.push((i, run)),
                Err(StoreError::Conflict(m)) => {
                    assert_eq!(m, format!("run {run_id} is not waiting (it is running)"))
                }
                other => panic!("resumer {i}: {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "{round}: {winners:?}");
        let (i, won) = winners.remove(0);
        let me = format!("resumer-{i}");
        assert_eq!(
            (won.status, won.owner.as_deref(), won.steps),
            (RunStatus::Running, Some(me.as_str()), 1)
        );
        assert_eq!(db.run(None, &run_id)?, Some(won));
        let steps = db.steps(&run_id)?;
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].output, Some(format!("{{\"by\":{i}}}")));
        assert_eq!(steps[0].state, StepState::Done);
    }
    Ok(())
}

/// Claimers on every store race for one set of lapsed runs: each run goes
/// to exactly one of them, and ends up owned by it.
pub fn concurrent_claims_take_each_run_once(dbs: &[Arc<dyn Database>]) -> TestResult {
    let db = dbs[0].clone();
    let now = kiln_store::now_ms();
    db.renew_lease("dead", now - 1)?;
    let runs = 120;
    for i in 0..runs {
        db.create_run(
            &new_run(&format!("run-{i:03}"), "t1", "flow"),
            "dead",
            now - 1_000 + i,
        )?;
    }
    let claimers = 8;
    for c in 0..claimers {
        db.renew_lease(&format!("claimer-{c}"), now + 600_000)?;
    }
    let handles: Vec<_> = (0..claimers)
        .map(|c| {
            let db = dbs[c % dbs.len()].clone();
            std::thread::spawn(move || -> Result<Vec<(String, String)>, StoreError> {
                let me = format!("claimer-{c}");
                let mut got = Vec::new();
                loop {
                    let batch = db.claim_runs(&me, now, 3)?;
                    if batch.is_empty() {
                        return Ok(got);
                    }
                    for r in batch {
                        assert_eq!(r.owner.as_deref(), Some(me.as_str()));
                        got.push((r.id, me.clone()));
                    }
                }
            })
        })
        .collect();
    let mut claimed = std::collections::BTreeMap::new();
    for h in handles {
        for (id, owner) in h.join().map_err(|_| "thread panicked")?? {
            if let Some(first) = claimed.insert(id.clone(), owner.clone()) {
                panic!("{id} was claimed by both {first} and {owner}");
            }
        }
    }
    assert_eq!(claimed.len(), runs as usize);
    for (id, owner) in &claimed {
        assert_eq!(
            db.run(None, id)?.unwrap().owner.as_ref(),
            Some(owner),
            "{id}"
        );
    }
    db.renew_lease("late", now + 600_000)?;
    assert!(db.claim_runs("late", now, 1_000)?.is_empty());
    Ok(())
}
