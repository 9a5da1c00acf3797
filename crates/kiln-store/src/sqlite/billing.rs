//! Prices, credits, reservations and leases on SQLite. Every check-and-write
//! is one IMMEDIATE transaction: SQLite takes its write lock at BEGIN, so
//! two admissions (threads, or processes on one file) never both see the
//! same balance.

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::ledger::{entry_by_id, insert_entry, price_columns, prices_at};
use super::Store;
use crate::billing::{
    accounts, interrupted, new_credit_id, new_usage_id, record_for, refusal_for,
    reservation_from_interrupted, utc_month, Account, AccountState, Billing, Budget, Caller,
    CreditEntry, CreditKind, NewCredit, Refusal, Reservation, ReservationRequest, Settlement,
    INTERRUPTED,
};
use crate::calls::{CallRecord, LedgerEntry, Outcome};
use crate::error::{Result, StoreError};
use crate::money::{Money, Prices};

fn spent(conn: &Connection, account: &str, month: &str) -> Result<Money> {
    Ok(Money(
        conn.prepare_cached(
            "SELECT spent_nanos FROM monthly_spend WHERE account = ?1 AND month = ?2",
        )?
        .query_row([account, month], |r| r.get(0))
        .optional()?
        .unwrap_or(0),
    ))
}

fn account_state(conn: &Connection, a: Account<'_>) -> Result<Option<AccountState>> {
    let sql = format!(
        "SELECT {} IS NOT NULL, balance_nanos, monthly_limit_nanos, reserved_nanos
         FROM {} WHERE id = ?1",
        a.disabled_column(),
        a.table()
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([a.id()], |r| {
            Ok(AccountState {
                disabled: r.get(0)?,
                balance: r.get::<_, Option<i64>>(1)?.map(Money),
                monthly_limit: r.get::<_, Option<i64>>(2)?.map(Money),
                reserved: Money(r.get(3)?),
            })
        })
        .optional()?)
}

/// Whether `amount` more can be held against the account.
fn refusal(
    conn: &Connection,
    a: Account<'_>,
    amount: Money,
    month: &str,
) -> Result<Option<Refusal>> {
    let state = account_state(conn, a)?;
    let spent = spent(conn, a.id(), month)?;
    Ok(refusal_for(a.label(), state, spent, amount))
}

/// Moves an account's reservation and balance, and adds to its month.
fn apply(
    conn: &Connection,
    a: Account<'_>,
    reserved_delta: Money,
    cost: Money,
    month: &str,
) -> Result<()> {
    let sql = format!(
        "UPDATE {} SET reserved_nanos = MAX(0, reserved_nanos + ?2),
             balance_nanos = balance_nanos - ?3
         WHERE id = ?1",
        a.table()
    );
    conn.prepare_cached(&sql)?
        .execute(params![a.id(), reserved_delta.nanos(), cost.nanos()])?;
    if cost > Money::ZERO {
        conn.prepare_cached(
            "INSERT INTO monthly_spend (account, month, spent_nanos) VALUES (?1, ?2, ?3)
             ON CONFLICT (account, month) DO UPDATE SET spent_nanos = spent_nanos + ?3",
        )?
        .execute(params![a.id(), month, cost.nanos()])?;
    }
    Ok(())
}

fn price_of(conn: &Connection, model: &str) -> Result<Option<Prices>> {
    Ok(conn
        .prepare_cached(
            "SELECT (SELECT currency FROM platform WHERE id = 1), input_nanos_per_mtok,
                    cached_input_nanos_per_mtok, output_nanos_per_mtok
             FROM model_prices WHERE model = ?1",
        )?
        .query_row([model], |r| prices_at(r, 0))
        .optional()?
        .flatten())
}

const RESERVATION_COLUMNS: &str = "id, replica_id, created_at, tenant_id, key_id, request_id,
     endpoint, model, backend, prompt_tokens, max_completion_tokens, amount_nanos, currency,
     input_nanos_per_mtok, cached_input_nanos_per_mtok, output_nanos_per_mtok";

fn reservation_from_row(r: &Row<'_>) -> rusqlite::Result<Reservation> {
    Ok(Reservation {
        id: r.get(0)?,
        replica_id: r.get(1)?,
        created_at_ms: r.get(2)?,
        caller: Caller {
            tenant_id: r.get(3)?,
            key_id: r.get(4)?,
        },
        request_id: r.get(5)?,
        endpoint: r.get(6)?,
        model: r.get(7)?,
        backend: r.get(8)?,
        prompt_tokens: r.get(9)?,
        max_completion_tokens: r.get(10)?,
        amount: Money(r.get(11)?),
        prices: prices_at(r, 12)?,
    })
}

fn reservation(conn: &Connection, id: &str) -> Result<Option<Reservation>> {
    let sql = format!("SELECT {RESERVATION_COLUMNS} FROM reservations WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id], reservation_from_row)
        .optional()?)
}

/// Drops a reservation: releases what it held, charges `cost`, writes the
/// ledger row.
fn close(tx: &Transaction<'_>, res: &Reservation, record: &CallRecord) -> Result<()> {
    let month = utc_month(record.created_at_ms);
    for a in accounts(&res.caller) {
        apply(tx, a, Money(-res.amount.0), record.cost, &month)?;
    }
    tx.prepare_cached("DELETE FROM reservations WHERE id = ?1")?
        .execute([&res.id])?;
    insert_entry(tx, &res.id, record)
}

impl Billing for Store {
    fn answers_without_waiting(&self) -> bool {
        true
    }

    fn currency(&self) -> Result<String> {
        Ok(self
            .lock()?
            .prepare_cached("SELECT currency FROM platform WHERE id = 1")?
            .query_row([], |r| r.get(0))?)
    }

    fn set_price(&self, model: &str, p: &Prices) -> Result<()> {
        p.validate().map_err(StoreError::Invalid)?;
        if model.is_empty() {
            return Err(StoreError::Invalid("the model name is empty".into()));
        }
        let conn = self.lock()?;
        let currency: String =
            conn.query_row("SELECT currency FROM platform WHERE id = 1", [], |r| {
                r.get(0)
            })?;
        if p.currency != currency {
            return Err(StoreError::Invalid(format!(
                "prices must be in the platform currency {currency}, not {}",
                p.currency
            )));
        }
        conn.execute(
            "INSERT INTO model_prices (model, input_nanos_per_mtok, cached_input_nanos_per_mtok,
                 output_nanos_per_mtok, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (model) DO UPDATE SET input_nanos_per_mtok = ?2,
                 cached_input_nanos_per_mtok = ?3, output_nanos_per_mtok = ?4, updated_at = ?5",
            params![
                model,
                p.input.nanos(),
                p.cached_input.nanos(),
                p.output.nanos(),
                crate::now_ms()
            ],
        )?;
        Ok(())
    }

    fn delete_price(&self, model: &str) -> Result<bool> {
        Ok(self
            .lock()?
            .execute("DELETE FROM model_prices WHERE model = ?1", [model])?
            > 0)
    }

    fn prices(&self) -> Result<Vec<(String, Prices)>> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT model, (SELECT currency FROM platform WHERE id = 1), input_nanos_per_mtok,
                    cached_input_nanos_per_mtok, output_nanos_per_mtok
             FROM model_prices ORDER BY model",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, prices_at(r, 1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            if let (model, Some(p)) = row? {
                out.push((model, p));
            }
        }
        Ok(out)
    }

    fn price(&self, model: &str) -> Result<Option<Prices>> {
        price_of(&*self.lock()?, model)
    }

    fn add_credit(&self, c: &NewCredit) -> Result<CreditEntry> {
        if !c.amount.is_reasonable() {
            return Err(StoreError::Invalid(format!(
                "the amount {} is beyond ±{}",
                c.amount,
                crate::money::MAX_AMOUNT
            )));
        }
        if c.kind != CreditKind::Adjustment && c.amount <= Money::ZERO {
            return Err(StoreError::Invalid(format!(
                "a {} credit must be positive; use an adjustment to take credit away",
                c.kind.as_str()
            )));
        }
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let account = match &c.key_id {
            Some(k) => Account::Key(k),
            None => Account::Tenant(&c.tenant_id),
        };
        let sql = format!(
            "UPDATE {} SET balance_nanos = COALESCE(balance_nanos, 0) + ?2
             WHERE id = ?1 {}",
            account.table(),
            if c.key_id.is_some() {
                "AND tenant_id = ?3"
            } else {
                "AND ?3 = ?3"
            }
        );
        let changed = tx.execute(&sql, params![account.id(), c.amount.nanos(), c.tenant_id])?;
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
                 note, created_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                entry.id,
                entry.created_at_ms,
                entry.tenant_id,
                entry.key_id,
                entry.kind.as_str(),
                entry.amount.nanos(),
                entry.note,
                entry.created_by
            ],
        )?;
        tx.commit()?;
        Ok(entry)
    }

    fn credits(&self, tenant_id: &str) -> Result<Vec<CreditEntry>> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT id, created_at, tenant_id, key_id, kind, amount_nanos, note, created_by
             FROM credit_entries WHERE tenant_id = ?1 ORDER BY created_at DESC, rowid DESC",
        )?;
        let rows = stmt.query_map([tenant_id], |r| {
            Ok((
                CreditEntry {
                    id: r.get(0)?,
                    created_at_ms: r.get(1)?,
                    tenant_id: r.get(2)?,
                    key_id: r.get(3)?,
                    kind: CreditKind::Grant,
                    amount: Money(r.get(5)?),
                    note: r.get(6)?,
                    created_by: r.get(7)?,
                },
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut entry, kind) = row?;
            entry.kind = CreditKind::parse(&kind).ok_or_else(|| StoreError::BadRow {
                table: "credit_entries",
                id: entry.id.clone(),
                reason: format!("kind `{kind}`"),
            })?;
            out.push(entry);
        }
        Ok(out)
    }

    fn budget(&self, tenant_id: &str, key_id: Option<&str>) -> Result<Option<Budget>> {
        let conn = self.lock()?;
        let account = match key_id {
            Some(k) => {
                let owner: Option<String> = conn
                    .query_row("SELECT tenant_id FROM api_keys WHERE id = ?1", [k], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if owner.as_deref() != Some(tenant_id) {
                    return Ok(None);
                }
                Account::Key(k)
            }
            None => Account::Tenant(tenant_id),
        };
        let Some(s) = account_state(&conn, account)? else {
            return Ok(None);
        };
        let month = utc_month(crate::now_ms());
        Ok(Some(Budget {
            balance: s.balance,
            reserved: s.reserved,
            monthly_limit: s.monthly_limit,
            spent_this_month: spent(&conn, account.id(), &month)?,
            month,
        }))
    }

    fn renew_lease(&self, replica_id: &str, until_ms: i64) -> Result<()> {
        self.lock()?
            .prepare_cached(
                "INSERT INTO replicas (id, started_at, lease_expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET lease_expires_at = ?3",
            )?
            .execute(params![replica_id, crate::now_ms(), until_ms])?;
        Ok(())
    }

    fn drop_lease(&self, replica_id: &str) -> Result<()> {
        self.lock()?
            .execute("DELETE FROM replicas WHERE id = ?1", [replica_id])?;
        Ok(())
    }

    fn recover_lapsed(&self, now_ms: i64) -> Result<usize> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Reservations whose replica's lease lapsed, or whose replica is gone.
        let sql = format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservations r
             WHERE NOT EXISTS (SELECT 1 FROM replicas p
                               WHERE p.id = r.replica_id AND p.lease_expires_at >= ?1)"
        );
        let orphans = tx
            .prepare(&sql)?
            .query_map([now_ms], reservation_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for res in &orphans {
            close(
                &tx,
                res,
                &record_for(res, &interrupted(res, now_ms), now_ms),
            )?;
        }
        tx.execute("DELETE FROM replicas WHERE lease_expires_at < ?1", [now_ms])?;
        tx.commit()?;
        Ok(orphans.len())
    }

    fn reserve(
        &self,
        replica_id: &str,
        req: &ReservationRequest,
    ) -> Result<std::result::Result<Reservation, Refusal>> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let prices = price_of(&tx, &req.model)?;
        let amount = prices.as_ref().map_or(Money::ZERO, |p| {
            p.worst_case(req.prompt_tokens, req.max_completion_tokens)
        });
        let now = crate::now_ms();
        let month = utc_month(now);
        for a in accounts(&req.caller) {
            if let Some(r) = refusal(&tx, a, amount, &month)? {
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
        tx.prepare_cached(
            "INSERT INTO reservations (id, replica_id, created_at, tenant_id, key_id, request_id,
                 endpoint, model, backend, prompt_tokens, max_completion_tokens, amount_nanos,
                 currency, input_nanos_per_mtok, cached_input_nanos_per_mtok,
                 output_nanos_per_mtok)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?
        .execute(params![
            res.id,
            res.replica_id,
            res.created_at_ms,
            res.caller.tenant_id,
            res.caller.key_id,
            res.request_id,
            res.endpoint,
            res.model,
            res.backend,
            res.prompt_tokens,
            res.max_completion_tokens,
            res.amount.nanos(),
            currency,
            input,
            cached,
            output,
        ])?;
        for a in accounts(&res.caller) {
            apply(&tx, a, amount, Money::ZERO, &month)?;
        }
        tx.commit()?;
        Ok(Ok(res))
    }

    fn settle(&self, s: &Settlement) -> Result<Option<LedgerEntry>> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = crate::now_ms();
        let entry = match reservation(&tx, &s.reservation_id)? {
            Some(res) => {
                let record = record_for(&res, s, now);
                close(&tx, &res, &record)?;
                LedgerEntry { id: res.id, record }
            }
            None => {
                // Settled already, or recovered as interrupted while this
                // replica was alive but its lease had lapsed: then the real
                // settlement replaces the interrupted row and is charged now.
                let Some(prev) = entry_by_id(&tx, &s.reservation_id)? else {
                    return Ok(None);
                };
                if prev.record.outcome != Outcome::Error(INTERRUPTED.into()) {
                    return Ok(None);
                }
                let res = reservation_from_interrupted(&prev);
                tx.execute("DELETE FROM usage_ledger WHERE id = ?1", [&prev.id])?;
                let record = record_for(&res, s, now);
                close(&tx, &res, &record)?;
                LedgerEntry { id: res.id, record }
            }
        };
        tx.commit()?;
        Ok(Some(entry))
    }

    fn open_reservations(&self) -> Result<Vec<Reservation>> {
        let conn = self.lock()?;
        let sql = format!("SELECT {RESERVATION_COLUMNS} FROM reservations ORDER BY created_at");
        let rows = conn
            .prepare(&sql)?
            .query_map([], reservation_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}
