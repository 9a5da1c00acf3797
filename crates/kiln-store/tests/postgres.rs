//! The store suite on PostgreSQL: each test gets a fresh schema in the
//! database named by `KILN_TEST_PG_URL` (`scripts/pg.sh start` makes one and
//! prints it); the schema is dropped afterwards. Without the variable the
//! tests fail, unless `KILN_SKIP_PG=1` says to skip them.

mod suite;

use std::sync::Arc;

use kiln_store::{Database, PgStore, StoreError};
use suite::TestResult;

/// A fresh schema, dropped with this guard.
struct Fresh {
    admin_url: String,
    schema: String,
}

impl Fresh {
    fn new() -> Option<Fresh> {
        let url = match std::env::var("KILN_TEST_PG_URL") {
            Ok(u) if !u.is_empty() => u,
            _ if std::env::var("KILN_SKIP_PG").as_deref() == Ok("1") => return None,
            _ => panic!(
                "KILN_TEST_PG_URL is not set: run `eval \"$(scripts/pg.sh start)\"` and export it \
                 (or set KILN_SKIP_PG=1 to skip the PostgreSQL tests)"
            ),
        };
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap_or_else(|e| {
            panic!(
                "cannot connect to KILN_TEST_PG_URL ({}): {e:?}",
                with_password(&url, "***")
            )
        });
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap_or_else(|e| panic!("cannot create a schema: {e}"));
        Some(Fresh {
            admin_url: url,
            schema,
        })
    }

    fn url(&self) -> String {
        let sep = if self.admin_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{sep}options=-csearch_path%3D{}",
            self.admin_url, self.schema
        )
    }

    fn store(&self) -> PgStore {
        PgStore::connect(&self.url(), 8).unwrap_or_else(|e| panic!("PgStore: {e}"))
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin_url, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema));
        }
    }
}

macro_rules! on_postgres {
    ($name:ident) => {
        #[test]
        fn $name() -> TestResult {
            let Some(fresh) = Fresh::new() else {
                return Ok(());
            };
            suite::$name(&fresh.store())
        }
    };
}

on_postgres!(tenants_and_keys);
on_postgres!(prices_are_checked);
on_postgres!(reservations_settle_exactly);
on_postgres!(lapsed_leases_are_recovered);
on_postgres!(usage_reports_group);
on_postgres!(kb_directory);
on_postgres!(definitions_are_versioned);
on_postgres!(runs_lifecycle);
on_postgres!(runs_are_scoped_by_tenant);
on_postgres!(steps_are_journaled_once);
on_postgres!(a_taken_over_run_refuses_its_old_owner);
on_postgres!(only_lapsed_or_released_runs_are_claimed);
on_postgres!(cancel_rules);
on_postgres!(waiting_runs_pause_until_resumed);

/// Two replicas ask for the cluster secret at once: one is made.
#[test]
fn two_replicas_read_one_cluster_secret() -> TestResult {
    let Some(fresh) = Fresh::new() else {
        return Ok(());
    };
    let a: Arc<dyn Database> = Arc::new(fresh.store());
    let b: Arc<dyn Database> = Arc::new(fresh.store());
    suite::one_cluster_secret(&[a, b])
}

/// Two stores (two replicas' pools) race for one budget.
#[test]
fn concurrent_reservations_from_two_replicas_never_overspend() -> TestResult {
    let Some(fresh) = Fresh::new() else {
        return Ok(());
    };
    let a: Arc<dyn Database> = Arc::new(fresh.store());
    let b: Arc<dyn Database> = Arc::new(fresh.store());
    suite::concurrent_reservations_never_overspend(&[a, b])
}

/// Two stores (two replicas' pools) race for one set of lapsed runs.
#[test]
fn concurrent_claims_from_two_replicas_take_each_run_once() -> TestResult {
    let Some(fresh) = Fresh::new() else {
        return Ok(());
    };
    let a: Arc<dyn Database> = Arc::new(fresh.store());
    let b: Arc<dyn Database> = Arc::new(fresh.store());
    suite::concurrent_claims_take_each_run_once(&[a, b])
}

/// Two stores (two replicas' pools) race to resume one waiting run.
#[test]
fn concurrent_resumes_from_two_replicas_have_one_winner() -> TestResult {
    let Some(fresh) = Fresh::new() else {
        return Ok(());
    };
    let a: Arc<dyn Database> = Arc::new(fresh.store());
    let b: Arc<dyn Database> = Arc::new(fresh.store());
    suite::concurrent_resumes_have_one_winner(&[a, b])
}

/// Two replicas save one definition at once: no version is made twice.
#[test]
fn concurrent_saves_from_two_replicas_make_distinct_versions() -> TestResult {
    let Some(fresh) = Fresh::new() else {
        return Ok(());
    };
    let a: Arc<dyn Database> = Arc::new(fresh.store());
    let b: Arc<dyn Database> = Arc::new(fresh.store());
    suite::concurrent_saves_make_distinct_versions(&[a, b])
}

/// Enum text the schema would refuse, read back anyway, is a bad row.
#[test]
fn unknown_run_enum_text_is_a_bad_row() -> TestResult {
    use kiln_store::runs::{DefinitionKind, NewRun, NewStep, RunQuery};
    use kiln_store::Runs as _;
    let Some(fresh) = Fresh::new() else {
        return Ok(());
    };
    let store = fresh.store();
    store.create_run(
        &NewRun {
            id: "run-1".into(),
            tenant_id: "t1".into(),
            key_id: None,
            kind: DefinitionKind::Agent,
            name: "a".into(),
            version: 1,
            input: "{}".into(),
        },
        "r1",
        1,
    )?;
    store.begin_step(
        "r1",
        &NewStep {
            run_id: "run-1".into(),
            seq: 0,
            path: "t".into(),
            kind: "tool".into(),
            name: "t".into(),
            input: "{}".into(),
        },
        2,
    )?;
    let mut c = postgres::Client::connect(&fresh.url(), postgres::NoTls)?;
    assert!(c
        .execute("UPDATE runs SET status = 'exploded'", &[])
        .is_err());
    c.batch_execute(
        "ALTER TABLE runs DROP CONSTRAINT runs_status_check;
         ALTER TABLE run_steps DROP CONSTRAINT run_steps_state_check;
         UPDATE runs SET status = 'exploded';
         UPDATE run_steps SET state = 'melted';",
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
    Ok(())
}

#[test]
fn migrations_are_idempotent_and_concurrent() -> TestResult {
    let Some(fresh) = Fresh::new() else {
        return Ok(());
    };
    let url = fresh.url();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PgStore::connect(&url, 1).map(|s| s.schema_version()))
        })
        .collect();
    for h in handles {
        let version = h.join().map_err(|_| "thread panicked")???;
        assert_eq!(version, kiln_store::PG_SCHEMA_VERSION);
    }
    let mut c = postgres::Client::connect(&url, postgres::NoTls)?;
    let applied: i64 = c
        .query_one("SELECT COUNT(*) FROM schema_migrations", &[])?
        .get(0);
    assert_eq!(applied, kiln_store::PG_SCHEMA_VERSION);
    // A database from a newer Kiln is refused.
    c.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, 'future', 0)",
        &[&(kiln_store::PG_SCHEMA_VERSION + 1)],
    )?;
    let err = PgStore::connect(&url, 1).err().ok_or("must refuse")?;
    assert!(matches!(err, StoreError::NewerSchema { .. }), "{err}");
    Ok(())
}

#[test]
fn a_wrong_password_is_a_clear_error_without_the_password() {
    let Some(fresh) = Fresh::new() else {
        return;
    };
    let url = with_password(&fresh.admin_url, "wrong-pw");
    let err = PgStore::connect(&url, 1).err().map(|e| e.to_string());
    let err = err.unwrap_or_default();
    assert!(err.contains("cannot connect to PostgreSQL at"), "{err}");
    assert!(
        err.contains("28P01: password authentication failed"),
        "{err}"
    );
    assert!(!err.contains("wrong-pw"), "{err}");
}

/// Replicas share rate buckets: what one takes, the other cannot.
#[test]
fn rate_buckets_are_shared() -> TestResult {
    use kiln_store::billing::{Billing as _, RateKind, RateOutcome, RateTake};
    let Some(fresh) = Fresh::new() else {
        return Ok(());
    };
    let a = fresh.store();
    let b = fresh.store();
    let take = |amount| {
        vec![
            RateTake {
                subject: "key:k".into(),
                kind: RateKind::Requests,
                per_minute: 3,
                amount: 1,
            },
            RateTake {
                subject: "tenant:t".into(),
                kind: RateKind::Tokens,
                per_minute: 1000,
                amount,
            },
        ]
    };
    let now = kiln_store::now_ms();
    let shared_a = a.shared_rate_limits().ok_or("PostgreSQL shares buckets")?;
    let shared_b = b.shared_rate_limits().ok_or("PostgreSQL shares buckets")?;
    assert!(matches!(
        shared_a.take(&take(400), now)?,
        RateOutcome::Taken(_)
    ));
    assert!(matches!(
        shared_b.take(&take(400), now)?,
        RateOutcome::Taken(_)
    ));
    // 200 tokens left for the tenant: refused, and nothing taken.
    match shared_a.take(&take(300), now)? {
        RateOutcome::Refused { wait_ms, short, .. } => {
            assert_eq!(short.kind, RateKind::Tokens);
            assert_eq!(wait_ms, 6000, "100 tokens at 1000/min");
        }
        other => panic!("{other:?}"),
    }
    match shared_b.take(&take(200), now)? {
        RateOutcome::Taken(levels) => {
            let req = levels.iter().find(|l| l.kind == RateKind::Requests);
            assert_eq!(req.map(|l| l.remaining), Some(0));
        }
        other => panic!("{other:?}"),
    }
    // Three requests per minute: the fourth waits 20 s.
    match shared_a.take(&take(1), now)? {
        RateOutcome::Refused { wait_ms, .. } => assert_eq!(wait_ms, 20_000),
        other => panic!("{other:?}"),
    }
    shared_a.give_back(&take(500)[1..], now)?;
    assert!(matches!(
        shared_b.take(&take(500)[1..], now)?,
        RateOutcome::Taken(_)
    ));
    // A minute later everything is back.
    assert!(matches!(
        shared_a.take(&take(1000), now + 60_000)?,
        RateOutcome::Taken(_)
    ));
    Ok(())
}

#[test]
fn a_missing_database_is_named_in_the_error() {
    let Some(fresh) = Fresh::new() else {
        return;
    };
    let Some((base, _db)) = fresh
        .admin_url
        .split('?')
        .next()
        .and_then(|u| u.rsplit_once('/'))
    else {
        panic!("KILN_TEST_PG_URL has no database");
    };
    let err = PgStore::connect(&format!("{base}/kiln_no_such_db"), 1)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("/kiln_no_such_db"), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

/// `url` with its password replaced (or added), whatever the test URL's
/// credentials are.
fn with_password(url: &str, password: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (user, host) = match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, _)) => (
            userinfo.split(':').next().unwrap_or(""),
            &rest[userinfo.len() + 1..],
        ),
        None => ("kiln", rest),
    };
    format!("{scheme}://{user}:{password}@{host}")
}
