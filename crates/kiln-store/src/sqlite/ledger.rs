//! The usage ledger on SQLite: writing rows and the reports over them.

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};

use super::Store;
use crate::billing::Caller;
use crate::calls::{
    new_call_id, CallLog, CallRecord, GroupBy, LedgerEntry, ModelUsage, Outcome, UsageQuery,
    UsageRow,
};
use crate::error::{Result, StoreError};
use crate::money::{Money, Prices};

/// The columns [`entry_from_row`] reads, in its order.
pub(super) const LEDGER_COLUMNS: &str =
    "id, created_at, request_id, endpoint, model, prompt_tokens, cached_tokens,
     completion_tokens, outcome, latency_ms, time_to_first_token_ms, tenant_id, key_id,
     backend, currency, input_nanos_per_mtok, cached_input_nanos_per_mtok,
     output_nanos_per_mtok, cost_nanos";

/// Writes one ledger row under `id`; fails if the id exists.
pub(super) fn insert_entry(conn: &Connection, id: &str, r: &CallRecord) -> Result<()> {
    let (currency, input, cached, output) = price_columns(r.prices.as_ref());
    conn.prepare_cached(
        "INSERT INTO usage_ledger (id, created_at, request_id, endpoint, model, prompt_tokens,
             cached_tokens, completion_tokens, outcome, latency_ms, time_to_first_token_ms,
             tenant_id, key_id, backend, currency, input_nanos_per_mtok,
             cached_input_nanos_per_mtok, output_nanos_per_mtok, cost_nanos)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
             ?18, ?19)",
    )?
    .execute(params![
        id,
        r.created_at_ms,
        r.request_id,
        r.endpoint,
        r.model,
        r.prompt_tokens,
        r.cached_tokens,
        r.completion_tokens,
        r.outcome.as_db_text(),
        r.latency_ms,
        r.ttft_ms,
        r.caller.as_ref().map(|c| c.tenant_id.as_str()),
        r.caller.as_ref().and_then(|c| c.key_id.as_deref()),
        r.backend,
        currency,
        input,
        cached,
        output,
        r.cost.nanos(),
    ])?;
    Ok(())
}

/// Prices as the four nullable columns every table stores them in.
pub(super) fn price_columns(
    p: Option<&Prices>,
) -> (Option<&str>, Option<i64>, Option<i64>, Option<i64>) {
    match p {
        Some(p) => (
            Some(p.currency.as_str()),
            Some(p.input.nanos()),
            Some(p.cached_input.nanos()),
            Some(p.output.nanos()),
        ),
        None => (None, None, None, None),
    }
}

/// Reads four price columns starting at `first`.
pub(super) fn prices_at(row: &Row<'_>, first: usize) -> rusqlite::Result<Option<Prices>> {
    let currency: Option<String> = row.get(first)?;
    let input: Option<i64> = row.get(first + 1)?;
    let cached: Option<i64> = row.get(first + 2)?;
    let output: Option<i64> = row.get(first + 3)?;
    Ok(match (currency, input, cached, output) {
        (Some(currency), Some(i), Some(c), Some(o)) => Some(Prices {
            currency,
            input: Money(i),
            cached_input: Money(c),
            output: Money(o),
        }),
        _ => None,
    })
}

/// A row selected with [`LEDGER_COLUMNS`]; the outcome text is returned
/// separately to be checked.
fn entry_from_row(r: &Row<'_>) -> rusqlite::Result<(LedgerEntry, String)> {
    let tenant_id: Option<String> = r.get(11)?;
    let key_id: Option<String> = r.get(12)?;
    let entry = LedgerEntry {
        id: r.get(0)?,
        record: CallRecord {
            created_at_ms: r.get(1)?,
            request_id: r.get(2)?,
            endpoint: r.get(3)?,
            model: r.get(4)?,
            prompt_tokens: r.get(5)?,
            cached_tokens: r.get(6)?,
            completion_tokens: r.get(7)?,
            // Replaced once the text is checked.
            outcome: Outcome::Ok,
            latency_ms: r.get(9)?,
            ttft_ms: r.get(10)?,
            caller: tenant_id.map(|tenant_id| Caller { tenant_id, key_id }),
            backend: r.get(13)?,
            prices: prices_at(r, 14)?,
            cost: Money(r.get(18)?),
        },
    };
    Ok((entry, r.get(8)?))
}

fn checked((mut entry, outcome): (LedgerEntry, String)) -> Result<LedgerEntry> {
    entry.record.outcome = Outcome::from_db_text(&outcome).ok_or_else(|| StoreError::BadRow {
        table: "usage_ledger",
        id: entry.id.clone(),
        reason: format!("unknown outcome `{outcome}`"),
    })?;
    Ok(entry)
}

pub(super) fn entry_by_id(conn: &Connection, id: &str) -> Result<Option<LedgerEntry>> {
    let sql = format!("SELECT {LEDGER_COLUMNS} FROM usage_ledger WHERE id = ?1");
    let row = conn
        .prepare_cached(&sql)?
        .query_row([id], entry_from_row)
        .optional()?;
    row.map(checked).transpose()
}

impl CallLog for Store {
    fn record_call(&self, call: &CallRecord) -> Result<()> {
        insert_entry(&*self.lock()?, &new_call_id(), call)
    }

    fn recent_calls(&self, tenant_id: Option<&str>, limit: usize) -> Result<Vec<LedgerEntry>> {
        let conn = self.lock()?;
        let sql = format!(
            "SELECT {LEDGER_COLUMNS} FROM usage_ledger
             WHERE ?1 IS NULL OR tenant_id = ?1
             ORDER BY created_at DESC, rowid DESC LIMIT ?2"
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![tenant_id, limit], entry_from_row)?;
        rows.map(|row| checked(row?)).collect()
    }

    fn usage_totals(&self) -> Result<Vec<ModelUsage>> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT model, COUNT(*), SUM(outcome LIKE 'error:%'), SUM(prompt_tokens),
                    SUM(cached_tokens), SUM(completion_tokens)
             FROM usage_ledger GROUP BY model ORDER BY model",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ModelUsage {
                model: r.get(0)?,
                calls: r.get(1)?,
                errors: r.get(2)?,
                prompt_tokens: r.get(3)?,
                cached_tokens: r.get(4)?,
                completion_tokens: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>> {
        let mut keys = Vec::new();
        for g in &q.group_by {
            if !keys.contains(g) {
                keys.push(*g);
            }
        }
        let key_sql: Vec<&str> = keys
            .iter()
            .map(|g| match g {
                GroupBy::Tenant => "tenant_id",
                GroupBy::Key => "key_id",
                GroupBy::Model => "model",
                GroupBy::Day => "strftime('%Y-%m-%d', created_at / 1000, 'unixepoch')",
            })
            .collect();
        let mut select = key_sql.join(", ");
        if !select.is_empty() {
            select.push_str(", ");
        }
        let mut sql = format!(
            "SELECT {select} COUNT(*), COALESCE(SUM(outcome LIKE 'error:%'), 0),
                    COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(cached_tokens), 0),
                    COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cost_nanos), 0)
             FROM usage_ledger WHERE 1 = 1"
        );
        let mut args: Vec<SqlValue> = Vec::new();
        let mut filter = |column: &str, value: SqlValue| {
            args.push(value);
            sql.push_str(&format!(" AND {column} ?{}", args.len()));
        };
        if let Some(t) = q.from_ms {
            filter("created_at >=", SqlValue::Integer(t));
        }
        if let Some(t) = q.to_ms {
            filter("created_at <", SqlValue::Integer(t));
        }
        if let Some(t) = &q.tenant_id {
            filter("tenant_id =", SqlValue::Text(t.clone()));
        }
        if let Some(k) = &q.key_id {
            filter("key_id =", SqlValue::Text(k.clone()));
        }
        if let Some(m) = &q.model {
            filter("model =", SqlValue::Text(m.clone()));
        }
        if !keys.is_empty() {
            let list = key_sql.join(", ");
            sql.push_str(&format!(" GROUP BY {list} ORDER BY {list}"));
        }
        let conn = self.lock()?;
        let mut stmt = conn.prepare(&sql)?;
        let n = keys.len();
        let rows = stmt.query_map(params_from_iter(args), |r| {
            let mut row = UsageRow {
                calls: r.get(n)?,
                errors: r.get(n + 1)?,
                prompt_tokens: r.get(n + 2)?,
                cached_tokens: r.get(n + 3)?,
                completion_tokens: r.get(n + 4)?,
                cost: Money(r.get(n + 5)?),
                ..UsageRow::default()
            };
            for (i, g) in keys.iter().enumerate() {
                let v: Option<String> = r.get(i)?;
                match g {
                    GroupBy::Tenant => row.tenant_id = v,
                    GroupBy::Key => row.key_id = v,
                    GroupBy::Model => row.model = v,
                    GroupBy::Day => row.day = v,
                }
            }
            Ok(row)
        })?;
        let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        // With no grouping and no rows, SQLite still returns one row of zeros.
        if keys.is_empty() && out.first().is_some_and(|r| r.calls == 0) {
            out.clear();
        }
        Ok(out)
    }

    fn ledger_entry(&self, id: &str) -> Result<Option<LedgerEntry>> {
        entry_by_id(&*self.lock()?, id)
    }
}
