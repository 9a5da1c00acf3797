//! Prices, credits, reservations and leases on PostgreSQL. Admission and
//! settlement lock the tenant row, then the key row (always in that order,
//! so two transactions never wait on each other crosswise) with `FOR
//! UPDATE`: replicas admitting calls for one tenant take turns on its
//! balance, exactly like SQLite's single writer.

use postgres::Row;

use super::ledger::{entry_by_id, insert_entry, price_columns, prices_at};
use super::{big, count, Db, PgStore, Tx};
use crate::billing::{
    accounts, interrupted, new_credit_id, new_usage_id, record_for, refusal_for,
    reservation_from_interrupted, utc_month, Account, AccountState, Billing, Budget, Caller,
    CreditEntry, CreditKind, NewCredit, Refusal, Reservation, ReservationRequest, Settlement,
    INTERRUPTED,
};
use crate::calls::{CallRecord, LedgerEntry, Outcome};
use crate::error::{Result, StoreError};
use crate::money::{Money, Prices, MAX_AMOUNT};

fn spent(c: &mut impl Db, account: &str, month: &str) -> Result<Money> {
    Ok(Money(
        c.query_opt(
            "SELECT spent_nanos FROM monthly_spend WHERE account = $1 AND month = $2",
            &[&account, &month],
        )?
        .map_or(0, |r| r.get(0)),
    ))
}

/// The account's state, locking its row when `lock`.
fn account_state(c: &mut impl Db, a: Account<'_>, lock: bool) -> Result<Option<AccountState>> {
    let sql = format!(
        "SELECT {} IS NOT NULL, balance_nanos, monthly_limit_nanos, reserved_nanos
         FROM {} WHERE id = $1{}",
        a.disabled_column(),
        a.table(),
        if lock { " FOR UPDATE" } else { "" }
    );
    Ok(c.query_opt(&sql, &[&a.id()])?.map(|r| AccountState {
        disabled: r.get(0),
        balance: r.get::<_, Option<i64>>(1).map(Money),
        monthly_limit: r.get::<_, Option<i64>>(2).map(Money),
        reserved: Money(r.get(3)),
    }))
}

fn apply(
    c: &mut impl Db,
    a: Account<'_>,
    reserved_delta: Money,
    cost: Money,
    month: &str,
) -> Result<()> {
    let sql = format!(
        "UPDATE {} SET reserved_nanos = GREATEST(0, reserved_nanos + $2),
             balance_nanos = balance_nanos - $3
         WHERE id = $1",
        a.table()
    );
    c.execute(&sql, &[&a.id(), &reserved_delta.nanos(), &cost.nanos()])?;
    if cost > Money::ZERO {
        c.execute(
            "INSERT INTO monthly_spend (account, month, spent_nanos) VALUES ($1, $2, $3)
             ON CONFLICT (account, month)
             DO UPDATE SET spent_nanos = monthly_spend.spent_nanos + EXCLUDED.spent_nanos",
            &[&a.id(), &month, &cost.nanos()],
        )?;
    }
    Ok(())
}

fn price_of(c: &mut impl Db, model: &str) -> Result<Option<Prices>> {
    Ok(c.query_opt(
        "SELECT (SELECT currency FROM platform WHERE id = 1), input_nanos_per_mtok,
                cached_input_nanos_per_mtok, output_nanos_per_mtok
         FROM model_prices WHERE model = $1",
        &[&model],
    )?
    .and_then(|r| prices_at(&r, 0)))
}

const RESERVATION_COLUMNS: &str = "id, replica_id, created_at, tenant_id, key_id, request_id,
     endpoint, model, backend, prompt_tokens, max_completion_tokens, amount_nanos, currency,
     input_nanos_per_mtok, cached_input_nanos_per_mtok, output_nanos_per_mtok";

fn reservation_from_row(r: &Row) -> Reservation {
    Reservation {
        id: r.get(0),
        replica_id: r.get(1),
        created_at_ms: r.get(2),
        caller: Caller {
            tenant_id: r.get(3),
            key_id: r.get(4),
        },
        request_id: r.get(5),
        endpoint: r.get(6),
        model: r.get(7),
        backend: r.get(8),
        prompt_tokens: count(r.get(9)),
        max_completion_tokens: count(r.get(10)),
        amount: Money(r.get(11)),
        prices: prices_at(r, 12),
    }
}

/// Drops a reservation: releases what it held, charges, writes the ledger.
fn close(tx: &mut Tx<'_>, res: &Reservation, record: &CallRecord) -> Result<()> {
    let month = utc_month(record.created_at_ms);
    for a in accounts(&res.caller) {
        apply(tx, a, Money(-res.amount.0), record.cost, &month)?;
    }
    tx.execute("DELETE FROM reservations WHERE id = $1", &[&res.id])?;
    insert_entry(tx, &res.id, record)
}

fn platform_currency(c: &mut impl Db) -> Result<String> {
    Ok(
        c.query_one("SELECT currency FROM platform WHERE id = 1", &[])?
            .get(0),
    )
}

impl Billing for PgStore {
    fn shared_rate_limits(&self) -> Option<&dyn crate::billing::SharedRateLimits> {
        Some(self)
    }

    fn currency(&self) -> Result<String> {
        platform_currency(&mut self.conn()?)
    }

    fn set_price(&self, model: &str, p: &Prices) -> Result<()> {
        p.validate().map_err(StoreError::Invalid)?;
        if model.is_empty() {
            return Err(StoreError::Invalid("the model name is empty".into()));
        }
        let mut conn = self.conn()?;
        let currency = platform_currency(&mut conn)?;
        if p.currency != currency {
            return Err(StoreError::Invalid(format!(
                "prices must be in the platform currency {currency}, not {}",
                p.currency
            )));
        }
        conn.execute(
            "INSERT INTO model_prices (model, input_nanos_per_mtok, cached_input_nanos_per_mtok,
                 output_nanos_per_mtok, updated_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (model) DO UPDATE SET input_nanos_per_mtok = $2,
                 cached_input_nanos_per_mtok = $3, output_nanos_per_mtok = $4, updated_at = $5",
            &[
                &model,
                &p.input.nanos(),
                &p.cached_input.nanos(),
                &p.output.nanos(),
                &crate::now_ms(),
            ],
        )?;
        Ok(())
    }

    fn delete_price(&self, model: &str) -> Result<bool> {
        Ok(self
            .conn()?
            .execute("DELETE FROM model_prices WHERE model = $1", &[&model])?
            > 0)
    }

    fn prices(&self) -> Result<Vec<(String, Prices)>> {
        let rows = self.conn()?.query(
            "SELECT model, (SELECT currency FROM platform WHERE id = 1), input_nanos_per_mtok,
                    cached_input_nanos_per_mtok, output_nanos_per_mtok
             FROM model_prices ORDER BY model",
            &[],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| prices_at(r, 1).map(|p| (r.get(0), p)))
            .collect())
    }

    fn price(&self, model: &str) -> Result<Option<Prices>> {
        price_of(&mut self.conn()?, model)
    }

    fn add_credit(&self, c: &NewCredit) -> Result<CreditEntry> {
        if !c.amount.is_reasonable() {
            return Err(StoreError::Invalid(format!(
                "the amount {} is beyond ±{MAX_AMOUNT}",
                c.amount
            )));
        }
        if c.kind != CreditKind::Adjustment && c.amount <= Money::ZERO {
            return Err(StoreError::Invalid(format!(
                "a {} credit must be positive; use an adjustment to take credit away",
                c.kind.as_str()
            )));
        }
        let account = match &c.key_id {
            Some(k) => Account::Key(k),
            None => Account::Tenant(&c.tenant_id),
        };
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let sql = format!(
            "UPDATE {} SET balance_nanos = COALESCE(balance_nanos, 0) + $2 WHERE id = $1 {}",
            account.table(),
            if c.key_id.is_some() {
                "AND tenant_id = $3"
            } else {
                "AND $3::TEXT IS NOT NULL"
            }
        );
        let changed = tx.execute(&sql, &[&account.id(), &c.amount.nanos(), &c.tenant_id])?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!(
                "no {} `{}` (of tenant `{}`)",
                account.label(),
                account.id(),
                c.tenant_id
            )));
        }
        let entry = CreditEntry {
            id: new_credit_id(),
            created_at_ms: crate::now_ms(),
            tenant_id: c.tenant_id.clone(),
            key_id: c.key_id.clone(),
            kind: c.kind,
            amount: c.amount,
            note: c.note.clone(),
            created_by: c.created_by.clone(),
        };
        tx.execute(
            "INSERT INTO credit_entries (id, created_at, tenant_id, key_id, kind, amount_nanos,
                 note, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &entry.id,
                &entry.created_at_ms,
                &entry.tenant_id,
                &entry.key_id,
                &entry.kind.as_str(),
                &entry.amount.nanos(),
                &entry.note,
                &entry.created_by,
            ],
        )?;
        tx.commit()?;
        Ok(entry)
    }

    fn credits(&self, tenant_id: &str) -> Result<Vec<CreditEntry>> {
        let rows = self.conn()?.query(
            "SELECT id, created_at, tenant_id, key_id, kind, amount_nanos, note, created_by
             FROM credit_entries WHERE tenant_id = $1 ORDER BY created_at DESC, seq DESC",
            &[&tenant_id],
        )?;
        rows.iter()
            .map(|r| {
                let id: String = r.get(0);
                let kind: String = r.get(4);
                let kind = CreditKind::parse(&kind).ok_or_else(|| StoreError::BadRow {
                    table: "credit_entries",
                    id: id.clone(),
                    reason: format!("kind `{kind}`"),
                })?;
                Ok(CreditEntry {
                    id,
                    created_at_ms: r.get(1),
                    tenant_id: r.get(2),
                    key_id: r.get(3),
                    kind,
                    amount: Money(r.get(5)),
                    note: r.get(6),
                    created_by: r.get(7),
                })
            })
            .collect()
    }

    fn budget(&self, tenant_id: &str, key_id: Option<&str>) -> Result<Option<Budget>> {
        let mut conn = self.conn()?;
        let account = match key_id {
            Some(k) => {
                let owner: Option<String> = conn
                    .query_opt("SELECT tenant_id FROM api_keys WHERE id = $1", &[&k])?
                    .map(|r| r.get(0));
                if owner.as_deref() != Some(tenant_id) {
                    return Ok(None);
                }
                Account::Key(k)
            }
            None => Account::Tenant(tenant_id),
        };
        let Some(s) = account_state(&mut conn, account, false)? else {
            return Ok(None);
        };
        let month = utc_month(crate::now_ms());
        Ok(Some(Budget {
            balance: s.balance,
            reserved: s.reserved,
            monthly_limit: s.monthly_limit,
            spent_this_month: spent(&mut conn, account.id(), &month)?,
            month,
        }))
    }

    fn renew_lease(&self, replica_id: &str, until_ms: i64) -> Result<()> {
        self.conn()?.execute(
            "INSERT INTO replicas (id, started_at, lease_expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET lease_expires_at = $3",
            &[&replica_id, &crate::now_ms(), &until_ms],
        )?;
        Ok(())
    }

    fn drop_lease(&self, replica_id: &str) -> Result<()> {
        self.conn()?
            .execute("DELETE FROM replicas WHERE id = $1", &[&replica_id])?;
        Ok(())
    }

    fn recover_lapsed(&self, now_ms: i64) -> Result<usize> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // Rows another replica is settling right now are skipped, not waited on.
        let sql = format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservations r
             WHERE NOT EXISTS (SELECT 1 FROM replicas p
                               WHERE p.id = r.replica_id AND p.lease_expires_at >= $1)
             ORDER BY id FOR UPDATE SKIP LOCKED"
        );
        let orphans: Vec<Reservation> = tx
            .query(&sql, &[&now_ms])?
            .iter()
            .map(reservation_from_row)
            .collect();
        for res in &orphans {
            close(
                &mut tx,
                res,
                &record_for(res, &interrupted(res, now_ms), now_ms),
            )?;
        }
        tx.execute(
            "DELETE FROM replicas WHERE lease_expires_at < $1",
            &[&now_ms],
        )?;
        tx.commit()?;
        Ok(orphans.len())
    }

    fn reserve(
        &self,
        replica_id: &str,
        req: &ReservationRequest,
    ) -> Result<std::result::Result<Reservation, Refusal>> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let prices = price_of(&mut tx, &req.model)?;
        let amount = prices.as_ref().map_or(Money::ZERO, |p| {
            p.worst_case(req.prompt_tokens, req.max_completion_tokens)
        });
        let now = crate::now_ms();
        let month = utc_month(now);
        for a in accounts(&req.caller) {
            let state = account_state(&mut tx, a, true)?;
            let spent = spent(&mut tx, a.id(), &month)?;
            if let Some(r) = refusal_for(a.label(), state, spent, amount) {
                return Ok(Err(r));
            }
        }
        let res = Reservation {
            id: new_usage_id(),
            replica_id: replica_id.to_string(),
            created_at_ms: now,
            caller: req.caller.clone(),
            request_id: req.request_id.clone(),
            endpoint: req.endpoint.clone(),
            model: req.model.clone(),
            backend: req.backend.clone(),
            prompt_tokens: req.prompt_tokens,
            max_completion_tokens: req.max_completion_tokens,
            amount,
            prices,
        };
        let (currency, input, cached, output) = price_columns(res.prices.as_ref());
        tx.execute(
            "INSERT INTO reservations (id, replica_id, created_at, tenant_id, key_id, request_id,
                 endpoint, model, backend, prompt_tokens, max_completion_tokens, amount_nanos,
                 currency, input_nanos_per_mtok, cached_input_nanos_per_mtok,
                 output_nanos_per_mtok)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            &[
                &res.id,
                &res.replica_id,
                &res.created_at_ms,
                &res.caller.tenant_id,
                &res.caller.key_id,
                &res.request_id,
                &res.endpoint,
                &res.model,
                &res.backend,
                &big(res.prompt_tokens),
                &big(res.max_completion_tokens),
                &res.amount.nanos(),
                &currency,
                &input,
                &cached,
                &output,
            ],
        )?;
        for a in accounts(&res.caller) {
            apply(&mut tx, a, amount, Money::ZERO, &month)?;
        }
        tx.commit()?;
        Ok(Ok(res))
    }

    fn settle(&self, s: &Settlement) -> Result<Option<LedgerEntry>> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let now = crate::now_ms();
        let sql =
            format!("SELECT {RESERVATION_COLUMNS} FROM reservations WHERE id = $1 FOR UPDATE");
        let open = tx
            .query_opt(&sql, &[&s.reservation_id])?
            .map(|r| reservation_from_row(&r));
        let entry = match open {
            Some(res) => {
                let record = record_for(&res, s, now);
                close(&mut tx, &res, &record)?;
                LedgerEntry { id: res.id, record }
            }
            None => {
                // Settled already, or recovered as interrupted while this
                // replica's lease had lapsed: the real settlement replaces
                // the interrupted row and is charged now.
                let Some(prev) = entry_by_id(&mut tx, &s.reservation_id)? else {
                    return Ok(None);
                };
                if prev.record.outcome != Outcome::Error(INTERRUPTED.into()) {
                    return Ok(None);
                }
                let res = reservation_from_interrupted(&prev);
                tx.execute("DELETE FROM usage_ledger WHERE id = $1", &[&prev.id])?;
                let record = record_for(&res, s, now);
                close(&mut tx, &res, &record)?;
                LedgerEntry { id: res.id, record }
            }
        };
        tx.commit()?;
        Ok(Some(entry))
    }

    fn open_reservations(&self) -> Result<Vec<Reservation>> {
        let sql = format!("SELECT {RESERVATION_COLUMNS} FROM reservations ORDER BY created_at");
        Ok(self
            .conn()?
            .query(&sql, &[])?
            .iter()
            .map(reservation_from_row)
            .collect())
    }
}

impl crate::billing::SharedRateLimits for PgStore {
    fn take(
        &self,
        takes: &[crate::billing::RateTake],
        now_ms: i64,
    ) -> Result<crate::billing::RateOutcome> {
        use crate::billing::{refill, wait_ms, RateLevel, RateOutcome};
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // A fixed lock order across replicas: by subject, then kind.
        let mut order: Vec<&crate::billing::RateTake> = takes.iter().collect();
        order.sort_by(|a, b| (&a.subject, a.kind.as_str()).cmp(&(&b.subject, b.kind.as_str())));
        let mut levels = Vec::new();
        let mut short: Option<(u64, &crate::billing::RateTake)> = None;
        let mut wait = 0u64;
        for t in &order {
            let capacity = f64::from(t.per_minute);
            tx.execute(
                "INSERT INTO rate_buckets (subject, kind, capacity, level, updated_at)
                 VALUES ($1, $2, $3, $3, $4) ON CONFLICT DO NOTHING",
                &[&t.subject, &t.kind.as_str(), &capacity, &now_ms],
            )?;
            let row = tx.query_one(
                "SELECT capacity, level, updated_at FROM rate_buckets
                 WHERE subject = $1 AND kind = $2 FOR UPDATE",
                &[&t.subject, &t.kind.as_str()],
            )?;
            let level = refill(row.get(1), row.get(0), row.get(2), t.per_minute, now_ms);
            let amount = t.amount as f64;
            let w = wait_ms(level, t.per_minute, amount);
            if w > 0 {
                wait = wait.max(w);
                short.get_or_insert((w, t));
            }
            levels.push((*t, level));
        }
        let report = |levels: &[(&crate::billing::RateTake, f64)], taken: bool| -> Vec<RateLevel> {
            levels
                .iter()
                .map(|(t, level)| {
                    let left = if taken {
                        level - t.amount as f64
                    } else {
                        *level
                    };
                    RateLevel {
                        subject: t.subject.clone(),
                        kind: t.kind,
                        per_minute: t.per_minute,
                        remaining: left.max(0.0).floor() as u64,
                        reset_ms: wait_ms(left, t.per_minute, f64::from(t.per_minute)),
                    }
                })
                .collect()
        };
        if let Some((_, t)) = short {
            let out = RateOutcome::Refused {
                wait_ms: wait,
                short: t.clone(),
                levels: report(&levels, false),
            };
            // Nothing taken: the refills need not be stored.
            tx.rollback()?;
            return Ok(out);
        }
        for (t, level) in &levels {
            tx.execute(
                "UPDATE rate_buckets SET capacity = $3, level = $4, updated_at = $5
                 WHERE subject = $1 AND kind = $2",
                &[
                    &t.subject,
                    &t.kind.as_str(),
                    &f64::from(t.per_minute),
                    &(level - t.amount as f64),
                    &now_ms,
                ],
            )?;
        }
        tx.commit()?;
        Ok(RateOutcome::Taken(report(&levels, true)))
    }

    fn give_back(&self, takes: &[crate::billing::RateTake], now_ms: i64) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let mut order: Vec<&crate::billing::RateTake> = takes.iter().collect();
        order.sort_by(|a, b| (&a.subject, a.kind.as_str()).cmp(&(&b.subject, b.kind.as_str())));
        for t in order {
            let row = tx.query_opt(
                "SELECT capacity, level, updated_at FROM rate_buckets
                 WHERE subject = $1 AND kind = $2 FOR UPDATE",
                &[&t.subject, &t.kind.as_str()],
            )?;
            let Some(row) = row else { continue };
            let level =
                crate::billing::refill(row.get(1), row.get(0), row.get(2), t.per_minute, now_ms);
            let level = (level + t.amount as f64).min(f64::from(t.per_minute));
            tx.execute(
                "UPDATE rate_buckets SET capacity = $3, level = $4, updated_at = $5
                 WHERE subject = $1 AND kind = $2",
                &[
                    &t.subject,
                    &t.kind.as_str(),
                    &f64::from(t.per_minute),
                    &level,
                    &now_ms,
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}
