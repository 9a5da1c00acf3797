//! The store test suite: every test takes a fresh, empty database behind
//! `&dyn Database`, so the same tests run on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::Arc;

use kiln_store::accounts::{secret_hash, Limits, NewKey, NewTenant, Role, TenantUpdate};
use kiln_store::billing::{Caller, CreditKind, NewCredit, Refusal, ReservationRequest, Settlement};
use kiln_store::money::{Money, Prices, TokenCounts};
use kiln_store::{Database, GroupBy, KbEntry, Outcome, StoreError, UsageQuery, INTERRUPTED};

mod runs;

pub use runs::*;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

fn units(text: &str) -> Money {
    Money::parse(text).unwrap()
}

fn tenant(db: &dyn Database, name: &str) -> kiln_store::accounts::Tenant {
    db.create_tenant(&NewTenant {
        name: name.into(),
        limits: Limits::default(),
    })
    .unwrap()
}

fn key(db: &dyn Database, tenant_id: &str, role: Role) -> kiln_store::accounts::IssuedKey {
    db.create_key(&NewKey {
        tenant_id: tenant_id.into(),
        name: "k".into(),
        role,
        models: None,
        expires_at_ms: None,
        limits: Limits::default(),
        priority: 0,
        groups: Vec::new(),
    })
    .unwrap()
}

/// 1 unit per million input tokens, 0.5 cached, 2 output: one prompt token
/// costs 1000 nano-units, one completion token 2000.
fn prices() -> Prices {
    Prices {
        currency: "USD".into(),
        input: units("1"),
        cached_input: units("0.5"),
        output: units("2"),
    }
}

fn request(caller: &Caller, prompt: u64, max: u64) -> ReservationRequest {
    ReservationRequest {
        caller: caller.clone(),
        request_id: "req".into(),
        endpoint: "chat.completions".into(),
        model: "m".into(),
        backend: "embedded".into(),
        prompt_tokens: prompt,
        max_completion_tokens: max,
    }
}

fn settlement(id: &str, prompt: u64, completion: u64) -> Settlement {
    Settlement {
        reservation_id: id.into(),
        outcome: Outcome::Stop,
        tokens: TokenCounts {
            prompt,
            cached: 0,
            completion,
        },
        latency_ms: 5,
        ttft_ms: Some(1),
    }
}

fn credit(db: &dyn Database, tenant_id: &str, key_id: Option<&str>, amount: &str) {
    db.add_credit(&NewCredit {
        tenant_id: tenant_id.into(),
        key_id: key_id.map(str::to_string),
        kind: CreditKind::Prepaid,
        amount: units(amount),
        note: String::new(),
        created_by: None,
    })
    .unwrap();
}

/// Every replica reads the same cluster secret, made once.
pub fn one_cluster_secret(dbs: &[Arc<dyn Database>]) -> TestResult {
    let secrets = std::thread::scope(|s| {
        let handles: Vec<_> = dbs
            .iter()
            .cycle()
            .take(8)
            .map(|db| s.spawn(move || db.cluster_secret()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a thread panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    assert!(secrets[0].len() >= 32, "{}", secrets[0]);
    assert!(secrets.iter().all(|s| *s == secrets[0]), "{secrets:?}");
    Ok(())
}

pub fn tenants_and_keys(db: &dyn Database) -> TestResult {
    let epoch0 = db.auth_epoch()?;
    let acme = tenant(db, "acme");
    assert!(db.auth_epoch()? > epoch0);
    let dup = db.create_tenant(&NewTenant {
        name: "acme".into(),
        limits: Limits::default(),
    });
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let bad = db.create_tenant(&NewTenant {
        name: "no spaces".into(),
        limits: Limits::default(),
    });
    assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");
    assert_eq!(db.tenant("acme")?.map(|t| t.id), Some(acme.id.clone()));
    assert_eq!(db.tenant(&acme.id)?.map(|t| t.name), Some("acme".into()));
    assert!(db.tenant("nobody")?.is_none());

    let issued = key(db, &acme.id, Role::TenantAdmin);
    assert!(issued.secret.starts_with(&issued.key.prefix));
    let owner = db.key_by_hash(&secret_hash(&issued.secret))?.unwrap();
    assert_eq!(owner.key.id, issued.key.id);
    assert_eq!(owner.key.role, Role::TenantAdmin);
    assert_eq!(owner.tenant.id, acme.id);
    assert!(db.key_by_hash(&secret_hash("kiln-sk-wrong"))?.is_none());

    // Rotation: same key, new secret; the old one is gone.
    let epoch = db.auth_epoch()?;
    let rotated = db.rotate_key(&issued.key.id)?.unwrap();
    assert_ne!(rotated.secret, issued.secret);
    assert_eq!(rotated.key.id, issued.key.id);
    assert!(rotated.key.rotated_at_ms.is_some());
    assert!(db.key_by_hash(&secret_hash(&issued.secret))?.is_none());
    assert!(db.key_by_hash(&secret_hash(&rotated.secret))?.is_some());
    assert!(db.auth_epoch()? > epoch);

    // Revocation is idempotent and visible to authentication.
    let revoked = db.revoke_key(&issued.key.id)?.unwrap();
    let when = revoked.revoked_at_ms.unwrap();
    assert_eq!(revoked.unusable_because(when), Some("has been revoked"));
    let again = db.revoke_key(&issued.key.id)?.unwrap();
    assert_eq!(again.revoked_at_ms, Some(when));
    let owner = db.key_by_hash(&secret_hash(&rotated.secret))?.unwrap();
    assert!(owner.key.revoked_at_ms.is_some());
    assert!(
        db.rotate_key(&issued.key.id)?.is_none(),
        "a revoked key stays revoked"
    );
    assert!(db.revoke_key("key-none")?.is_none());

    let other = tenant(db, "globex");
    let k2 = key(db, &other.id, Role::Member);
    assert_eq!(db.keys(Some(&other.id))?.len(), 1);
    assert_eq!(db.keys(None)?.len(), 2);
    assert_eq!(db.keys(Some(&acme.id))?[0].id, issued.key.id);
    assert!(db.key(&k2.key.id)?.is_some());

    let new_key = |tenant_id: &str, priority: i32| NewKey {
        tenant_id: tenant_id.into(),
        name: "k".into(),
        role: Role::Member,
        models: None,
        expires_at_ms: None,
        limits: Limits::default(),
        priority,
        groups: Vec::new(),
    };
    let missing = db.create_key(&new_key("ten-missing", 0));
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
    // A key's scheduling priority is kept, and bounded.
    let urgent = db.create_key(&new_key(&other.id, 100))?;
    assert_eq!(db.key(&urgent.key.id)?.map(|k| k.priority), Some(100));
    let rotated = db.rotate_key(&urgent.key.id)?.map(|k| k.key.priority);
    assert_eq!(rotated, Some(100), "rotation keeps the priority");
    for bad in [101, -101, i32::MIN] {
        let refused = db.create_key(&new_key(&other.id, bad));
        assert!(
            matches!(refused, Err(StoreError::Invalid(_))),
            "{refused:?}"
        );
    }
    db.revoke_key(&urgent.key.id)?;

    // A key's knowledge-base groups are kept, and checked.
    let grouped = db.create_key(&NewKey {
        groups: vec!["hr".into(), "财务".into()],
        ..new_key(&other.id, 0)
    })?;
    assert_eq!(
        db.key(&grouped.key.id)?.map(|k| k.groups),
        Some(vec!["hr".to_string(), "财务".to_string()])
    );
    for bad in ["", "a,b", "*", "x=y", "tab\t"] {
        let refused = db.create_key(&NewKey {
            groups: vec![bad.into()],
            ..new_key(&other.id, 0)
        });
        assert!(
            matches!(refused, Err(StoreError::Invalid(_))),
            "{bad:?}: {refused:?}"
        );
    }
    db.revoke_key(&grouped.key.id)?;

    // Updates, and a rename onto a taken name.
    let up = db
        .update_tenant(
            &other.id,
            &TenantUpdate {
                disabled: Some(true),
                requests_per_minute: Some(Some(60)),
                ..TenantUpdate::default()
            },
        )?
        .unwrap();
    assert!(up.disabled_at_ms.is_some());
    assert_eq!(up.limits.requests_per_minute, Some(60));
    let clash = db.update_tenant(
        &other.id,
        &TenantUpdate {
            name: Some("acme".into()),
            ..TenantUpdate::default()
        },
    );
    assert!(matches!(clash, Err(StoreError::Conflict(_))), "{clash:?}");
    let zero = db.update_tenant(
        &other.id,
        &TenantUpdate {
            tokens_per_minute: Some(Some(0)),
            ..TenantUpdate::default()
        },
    );
    assert!(matches!(zero, Err(StoreError::Invalid(_))), "{zero:?}");
    let negative = db.update_tenant(
        &other.id,
        &TenantUpdate {
            monthly_limit: Some(Some(units("-1"))),
            ..TenantUpdate::default()
        },
    );
    assert!(
        matches!(negative, Err(StoreError::Invalid(_))),
        "{negative:?}"
    );
    assert!(db
        .update_tenant("ten-none", &TenantUpdate::default())?
        .is_none());
    Ok(())
}

pub fn prices_are_checked(db: &dyn Database) -> TestResult {
    assert_eq!(db.currency()?, "USD");
    db.set_price("m", &prices())?;
    assert_eq!(db.price("m")?, Some(prices()));
    assert_eq!(db.prices()?, vec![("m".to_string(), prices())]);
    let mut eur = prices();
    eur.currency = "EUR".into();
    assert!(matches!(
        db.set_price("m", &eur),
        Err(StoreError::Invalid(_))
    ));
    let mut negative = prices();
    negative.output = units("-1");
    assert!(matches!(
        db.set_price("m", &negative),
        Err(StoreError::Invalid(_))
    ));
    let mut absurd = prices();
    absurd.input = units("100000000");
    assert!(matches!(
        db.set_price("m", &absurd),
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(
        db.price("m")?,
        Some(prices()),
        "refused changes changed nothing"
    );
    assert!(db.delete_price("m")?);
    assert!(!db.delete_price("m")?);
    Ok(())
}

pub fn reservations_settle_exactly(db: &dyn Database) -> TestResult {
    db.set_price("m", &prices())?;
    db.renew_lease("r1", kiln_store::now_ms() + 60_000)?;
    let t = tenant(db, "acme");
    let k = key(db, &t.id, Role::Member);
    let caller = Caller {
        tenant_id: t.id.clone(),
        key_id: Some(k.key.id.clone()),
    };
    // No prepaid balance: admitted, billed afterwards.
    let res = db.reserve("r1", &request(&caller, 100, 50))?.unwrap();
    assert_eq!(res.amount, Money(100 * 1000 + 50 * 2000));
    assert_eq!(db.budget(&t.id, None)?.unwrap().reserved, res.amount);
    let entry = db.settle(&settlement(&res.id, 100, 10))?.unwrap();
    assert_eq!(entry.id, res.id);
    assert_eq!(entry.record.cost, Money(100 * 1000 + 10 * 2000));
    assert_eq!(entry.record.prices, Some(prices()));
    assert!(
        db.settle(&settlement(&res.id, 100, 10))?.is_none(),
        "settled once"
    );
    let b = db.budget(&t.id, None)?.unwrap();
    assert_eq!(b.reserved, Money::ZERO);
    assert_eq!(b.balance, None);
    assert_eq!(b.spent_this_month, Money(120_000));
    let kb = db.budget(&t.id, Some(&k.key.id))?.unwrap();
    assert_eq!(kb.spent_this_month, Money(120_000));
    assert!(db.budget("ten-other", Some(&k.key.id))?.is_none());

    // A prepaid balance: the worst case must fit what is not reserved.
    credit(db, &t.id, None, "0.001"); // 1_000_000 nano-units
    let big = db.reserve("r1", &request(&caller, 100, 1000))?;
    assert!(
        matches!(big, Err(Refusal::InsufficientCredit { ref account, .. }) if account == "tenant"),
        "{big:?}"
    );
    let a = db.reserve("r1", &request(&caller, 100, 200))?.unwrap(); // 500_000
    let b2 = db.reserve("r1", &request(&caller, 100, 200))?.unwrap(); // 500_000
    let c = db.reserve("r1", &request(&caller, 1, 0))?;
    assert!(
        matches!(c, Err(Refusal::InsufficientCredit { .. })),
        "{c:?}"
    );
    db.settle(&settlement(&a.id, 100, 0))?.unwrap();
    let after = db.budget(&t.id, None)?.unwrap();
    assert_eq!(after.balance, Some(Money(1_000_000 - 100_000)));
    assert_eq!(after.reserved, b2.amount);
    db.settle(&settlement(&b2.id, 100, 200))?.unwrap();
    assert_eq!(
        db.budget(&t.id, None)?.unwrap().balance,
        Some(Money(400_000))
    );

    // A key's monthly limit binds the key only.
    let limits = Limits {
        monthly_limit: Some(Money(120_000 + 100_000 + 500_000 + 100_000)),
        requests_per_minute: Some(7),
        tokens_per_minute: Some(9000),
    };
    let updated = db.update_key_limits(&k.key.id, &limits)?.unwrap();
    assert_eq!(updated.limits, limits);
    assert_eq!(db.key(&k.key.id)?.unwrap().limits, limits);
    assert_eq!(updated.reserved, Money::ZERO);
    let over = db.reserve("r1", &request(&caller, 100, 1))?;
    assert!(
        matches!(over, Err(Refusal::MonthlyLimit { ref account, .. }) if account == "key"),
        "{over:?}"
    );
    let fits = db.reserve("r1", &request(&caller, 100, 0))?.unwrap();
    db.settle(&settlement(&fits.id, 100, 0))?.unwrap();

    // A disabled tenant is refused.
    db.update_tenant(
        &t.id,
        &TenantUpdate {
            disabled: Some(true),
            ..TenantUpdate::default()
        },
    )?;
    let off = db.reserve("r1", &request(&caller, 1, 1))?;
    assert!(
        matches!(off, Err(Refusal::AccountDisabled { .. })),
        "{off:?}"
    );

    // Credits: only positive prepaid/grants; adjustments may be negative.
    let neg = db.add_credit(&NewCredit {
        tenant_id: t.id.clone(),
        key_id: None,
        kind: CreditKind::Grant,
        amount: units("-5"),
        note: String::new(),
        created_by: None,
    });
    assert!(matches!(neg, Err(StoreError::Invalid(_))), "{neg:?}");
    let absurd = db.add_credit(&NewCredit {
        tenant_id: t.id.clone(),
        key_id: None,
        kind: CreditKind::Prepaid,
        amount: Money(i64::MAX),
        note: String::new(),
        created_by: None,
    });
    assert!(matches!(absurd, Err(StoreError::Invalid(_))), "{absurd:?}");
    let wrong_owner = db.add_credit(&NewCredit {
        tenant_id: "ten-other".into(),
        key_id: Some(k.key.id.clone()),
        kind: CreditKind::Prepaid,
        amount: units("1"),
        note: String::new(),
        created_by: None,
    });
    assert!(
        matches!(wrong_owner, Err(StoreError::NotFound(_))),
        "{wrong_owner:?}"
    );
    assert_eq!(db.credits(&t.id)?.len(), 1);
    assert!(db.open_reservations()?.is_empty());
    Ok(())
}

/// 50 threads race for a budget that covers exactly 20 worst cases; thread
/// `i` uses `dbs[i % dbs.len()]` (several connections stand for replicas).
pub fn concurrent_reservations_never_overspend(dbs: &[Arc<dyn Database>]) -> TestResult {
    let db = dbs[0].clone();
    db.set_price("m", &prices())?;
    db.renew_lease("r1", kiln_store::now_ms() + 60_000)?;
    let t = tenant(&*db, "acme");
    let caller = Caller {
        tenant_id: t.id.clone(),
        key_id: None,
    };
    // Worst case 100*1000 + 50*2000 = 200_000; balance 4_000_000 = 20 of them.
    credit(&*db, &t.id, None, "0.004");
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let db = dbs[i % dbs.len()].clone();
            let caller = caller.clone();
            std::thread::spawn(move || -> Result<bool, StoreError> {
                match db.reserve("r1", &request(&caller, 100, 50))? {
                    Ok(res) => {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        db.settle(&settlement(&res.id, 100, 50))?;
                        Ok(true)
                    }
                    Err(_) => Ok(false),
                }
            })
        })
        .collect();
    let mut admitted = 0;
    for h in handles {
        if h.join().map_err(|_| "thread panicked")?? {
            admitted += 1;
        }
    }
    let b = db.budget(&t.id, None)?.unwrap();
    assert!(b.balance.unwrap() >= Money::ZERO, "{b:?}");
    assert_eq!(b.balance, Some(Money(4_000_000 - admitted * 200_000)));
    assert_eq!(b.reserved, Money::ZERO);
    assert!((20..=50).contains(&admitted), "{admitted}");
    let usage = db.usage(&UsageQuery::default())?;
    assert_eq!(usage[0].calls, admitted as u64);
    assert_eq!(usage[0].cost, Money(admitted * 200_000));
    Ok(())
}

pub fn lapsed_leases_are_recovered(db: &dyn Database) -> TestResult {
    db.set_price("m", &prices())?;
    let now = kiln_store::now_ms();
    db.renew_lease("dead", now - 1)?;
    db.renew_lease("alive", now + 60_000)?;
    let t = tenant(db, "acme");
    credit(db, &t.id, None, "1");
    let caller = Caller {
        tenant_id: t.id.clone(),
        key_id: None,
    };
    let lost = db.reserve("dead", &request(&caller, 10, 10))?.unwrap();
    let late = db.reserve("dead", &request(&caller, 10, 10))?.unwrap();
    let live = db.reserve("alive", &request(&caller, 10, 10))?.unwrap();
    assert_eq!(db.recover_lapsed(now)?, 2);
    assert_eq!(db.recover_lapsed(now)?, 0);
    let open = db.open_reservations()?;
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].id, live.id);
    let row = db.ledger_entry(&lost.id)?.unwrap();
    assert_eq!(row.record.outcome, Outcome::Error(INTERRUPTED.into()));
    assert_eq!(row.record.cost, Money::ZERO);
    let b = db.budget(&t.id, None)?.unwrap();
    assert_eq!(b.reserved, live.amount);
    assert_eq!(b.balance, Some(units("1")));
    // The "dead" replica was only paused: its settlement replaces the row.
    let entry = db.settle(&settlement(&late.id, 10, 3))?.unwrap();
    assert_eq!(entry.record.outcome, Outcome::Stop);
    assert_eq!(entry.record.cost, Money(10 * 1000 + 3 * 2000));
    assert_eq!(
        db.ledger_entry(&late.id)?.unwrap().record.outcome,
        Outcome::Stop
    );
    assert!(db.settle(&settlement(&late.id, 10, 3))?.is_none());
    let b = db.budget(&t.id, None)?.unwrap();
    assert_eq!(b.balance, Some(Money(units("1").0 - 16_000)));
    assert_eq!(b.reserved, live.amount);
    Ok(())
}

pub fn usage_reports_group(db: &dyn Database) -> TestResult {
    db.set_price("m", &prices())?;
    db.renew_lease("r1", kiln_store::now_ms() + 60_000)?;
    let a = tenant(db, "a");
    let b = tenant(db, "b");
    let ka = key(db, &a.id, Role::Member);
    for (t, k, n) in [(&a, Some(&ka), 3), (&b, None, 2)] {
        let caller = Caller {
            tenant_id: t.id.clone(),
            key_id: k.map(|k| k.key.id.clone()),
        };
        for _ in 0..n {
            let r = db.reserve("r1", &request(&caller, 10, 5))?.unwrap();
            db.settle(&settlement(&r.id, 10, 5))?.unwrap();
        }
    }
    let by_tenant = db.usage(&UsageQuery {
        group_by: vec![GroupBy::Tenant, GroupBy::Model, GroupBy::Day],
        ..UsageQuery::default()
    })?;
    assert_eq!(by_tenant.len(), 2);
    let ra = by_tenant
        .iter()
        .find(|r| r.tenant_id.as_deref() == Some(&a.id))
        .unwrap();
    assert_eq!(
        (ra.calls, ra.prompt_tokens, ra.completion_tokens),
        (3, 30, 15)
    );
    assert_eq!(ra.cost, Money(3 * (10_000 + 10_000)));
    assert_eq!(ra.model.as_deref(), Some("m"));
    assert_eq!(
        ra.day.as_deref(),
        Some(kiln_store::billing::utc_day(kiln_store::now_ms()).as_str())
    );
    let only_b = db.usage(&UsageQuery {
        tenant_id: Some(b.id.clone()),
        ..UsageQuery::default()
    })?;
    assert_eq!(only_b.len(), 1);
    assert_eq!(only_b[0].calls, 2);
    let by_key = db.usage(&UsageQuery {
        group_by: vec![GroupBy::Key],
        tenant_id: Some(a.id.clone()),
        ..UsageQuery::default()
    })?;
    assert_eq!(by_key.len(), 1);
    assert_eq!(by_key[0].key_id.as_deref(), Some(ka.key.id.as_str()));
    let future = db.usage(&UsageQuery {
        from_ms: Some(kiln_store::now_ms() + 86_400_000),
        ..UsageQuery::default()
    })?;
    assert!(future.is_empty());
    assert_eq!(db.recent_calls(Some(&b.id), 10)?.len(), 2);
    assert_eq!(db.recent_calls(None, 10)?.len(), 5);
    Ok(())
}

/// The knowledge-base directory: names unique per tenant across replicas,
/// lookups by id or by name within the tenant, re-announcing moves the URL.
pub fn kb_directory(db: &dyn Database) -> TestResult {
    let entry = |id: &str, tenant: &str, name: &str, url: Option<&str>| KbEntry {
        id: id.into(),
        tenant_id: tenant.into(),
        name: name.into(),
        replica_url: url.map(String::from),
        created_at_ms: 1,
    };
    let a = entry("kb_a", "t1", "handbook", Some("http://10.0.0.1:8080"));
    db.register_kb(&a)?;
    db.register_kb(&entry("kb_b", "t2", "handbook", None))?;
    assert!(matches!(
        db.register_kb(&entry("kb_c", "t1", "handbook", None)),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        db.announce_kb(&entry("kb_c", "t1", "handbook", None)),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(db.kb_entry(Some("t1"), "kb_a")?, Some(a.clone()));
    assert_eq!(db.kb_entry(Some("t1"), "handbook")?, Some(a.clone()));
    assert_eq!(db.kb_entry(None, "kb_a")?, Some(a.clone()));
    // Another tenant's knowledge base is not found, by id or by name.
    assert_eq!(db.kb_entry(Some("t2"), "kb_a")?, None);
    assert_eq!(
        db.kb_entry(Some("t2"), "handbook")?.map(|e| e.id),
        Some("kb_b".into())
    );
    assert_eq!(db.kb_entry(None, "handbook")?, None);
    let moved = entry("kb_a", "t1", "handbook", Some("http://10.0.0.2:8080"));
    db.announce_kb(&moved)?;
    assert_eq!(db.kb_entry(Some("t1"), "kb_a")?, Some(moved));
    db.announce_kb(&entry("kb_d", "t1", "manuals", None))?;
    let names = |t: Option<&str>| -> Result<Vec<String>, StoreError> {
        Ok(db.kb_entries(t)?.into_iter().map(|e| e.id).collect())
    };
    assert_eq!(names(Some("t1"))?, ["kb_a", "kb_d"]);
    assert_eq!(names(None)?.len(), 3);
    db.unregister_kb("kb_a")?;
    db.unregister_kb("kb_a")?;
    assert_eq!(db.kb_entry(Some("t1"), "handbook")?, None);
    db.register_kb(&entry("kb_e", "t1", "handbook", None))?;
    Ok(())
}
