//! The store suite on SQLite: an in-memory database per test, and a file
//! shared by two `Store`s (two processes' worth of connections) for the race.

mod suite;

use std::sync::Arc;

use kiln_store::{Database, Store};
use suite::TestResult;

fn fresh() -> Store {
    Store::open_in_memory().unwrap_or_else(|e| panic!("in-memory store: {e}"))
}

#[test]
fn tenants_and_keys() -> TestResult {
    suite::tenants_and_keys(&fresh())
}

#[test]
fn prices_are_checked() -> TestResult {
    suite::prices_are_checked(&fresh())
}

#[test]
fn reservations_settle_exactly() -> TestResult {
    suite::reservations_settle_exactly(&fresh())
}

#[test]
fn concurrent_reservations_never_overspend() -> TestResult {
    suite::concurrent_reservations_never_overspend(&[Arc::new(fresh())])
}

#[test]
fn one_cluster_secret() -> TestResult {
    suite::one_cluster_secret(&[Arc::new(fresh())])
}

#[test]
fn concurrent_reservations_on_a_shared_file_never_overspend() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kiln.db");
    let first: Arc<dyn Database> = Arc::new(Store::open(&path)?);
    let second: Arc<dyn Database> = Arc::new(Store::open(&path)?);
    suite::concurrent_reservations_never_overspend(&[first, second])
}

#[test]
fn lapsed_leases_are_recovered() -> TestResult {
    suite::lapsed_leases_are_recovered(&fresh())
}

#[test]
fn usage_reports_group() -> TestResult {
    suite::usage_reports_group(&fresh())
}

#[test]
fn kb_directory() -> TestResult {
    suite::kb_directory(&fresh())
}

#[test]
fn definitions_are_versioned() -> TestResult {
    suite::definitions_are_versioned(&fresh())
}

#[test]
fn concurrent_saves_on_a_shared_file_make_distinct_versions() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kiln.db");
    let first: Arc<dyn Database> = Arc::new(Store::open(&path)?);
    let second: Arc<dyn Database> = Arc::new(Store::open(&path)?);
    suite::concurrent_saves_make_distinct_versions(&[first, second])
}

#[test]
fn runs_lifecycle() -> TestResult {
    suite::runs_lifecycle(&fresh())
}

#[test]
fn runs_are_scoped_by_tenant() -> TestResult {
    suite::runs_are_scoped_by_tenant(&fresh())
}

#[test]
fn steps_are_journaled_once() -> TestResult {
    suite::steps_are_journaled_once(&fresh())
}

#[test]
fn a_taken_over_run_refuses_its_old_owner() -> TestResult {
    suite::a_taken_over_run_refuses_its_old_owner(&fresh())
}

#[test]
fn only_lapsed_or_released_runs_are_claimed() -> TestResult {
    suite::only_lapsed_or_released_runs_are_claimed(&fresh())
}

#[test]
fn cancel_rules() -> TestResult {
    suite::cancel_rules(&fresh())
}

#[test]
fn concurrent_claims_take_each_run_once() -> TestResult {
    suite::concurrent_claims_take_each_run_once(&[Arc::new(fresh())])
}

#[test]
fn concurrent_claims_on_a_shared_file_take_each_run_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kiln.db");
    let first: Arc<dyn Database> = Arc::new(Store::open(&path)?);
    let second: Arc<dyn Database> = Arc::new(Store::open(&path)?);
    suite::concurrent_claims_take_each_run_once(&[first, second])
}

#[test]
fn waiting_runs_pause_until_resumed() -> TestResult {
    suite::waiting_runs_pause_until_resumed(&fresh())
}

#[test]
fn concurrent_resumes_have_one_winner() -> TestResult {
    suite::concurrent_resumes_have_one_winner(&[Arc::new(fresh())])
}

#[test]
fn concurrent_resumes_on_a_shared_file_have_one_winner() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kiln.db");
    let first: Arc<dyn Database> = Arc::new(Store::open(&path)?);
    let second: Arc<dyn Database> = Arc::new(Store::open(&path)?);
    suite::concurrent_resumes_have_one_winner(&[first, second])
}
