//! The usage ledger on PostgreSQL.

use postgres::types::ToSql;
use postgres::Row;

use super::{big, count, Db, PgStore};
use crate::billing::Caller;
use crate::calls::{
    new_call_id, CallLog, CallRecord, GroupBy, LedgerEntry, ModelUsage, Outcome, UsageQuery,
    UsageRow,
};
use crate::error::{Result, StoreError};
use crate::money::{Money, Prices};

pub(super) const LEDGER_COLUMNS: &str =
    "id, created_at, request_id, endpoint, model, prompt_tokens, cached_tokens,
     completion_tokens, outcome, latency_ms, time_to_first_token_ms, tenant_id, key_id,
     backend, currency, input_nanos_per_mtok, cached_input_nanos_per_mtok,
     output_nanos_per_mtok, cost_nanos";

/// Prices as four nullable columns.
pub(super) fn price_columns(
    p: Option<&Prices>,
) -> (Option<String>, Option<i64>, Option<i64>, Option<i64>) {
    match p {
        Some(p) => (
            Some(p.currency.clone()),
            Some(p.input.nanos()),
            Some(p.cached_input.nanos()),
            Some(p.output.nanos()),
        ),
        None => (None, None, None, None),
    }
}

/// Reads four price columns starting at `first`.
pub(super) fn prices_at(row: &Row, first: usize) -> Option<Prices> {
    let currency: Option<String> = row.get(first);
    let input: Option<i64> = row.get(first + 1);
    let cached: Option<i64> = row.get(first + 2);
    let output: Option<i64> = row.get(first + 3);
    match (currency, input, cached, output) {
        (Some(currency), Some(i), Some(c), Some(o)) => Some(Prices {
            currency,
            input: Money(i),
            cached_input: Money(c),
            output: Money(o),
        }),
        _ => None,
    }
}

pub(super) fn insert_entry(c: &mut impl Db, id: &str, r: &CallRecord) -> Result<()> {
    let (currency, input, cached, output) = price_columns(r.prices.as_ref());
    let tenant = r.caller.as_ref().map(|c| c.tenant_id.clone());
    let key = r.caller.as_ref().and_then(|c| c.key_id.clone());
    let ttft = r.ttft_ms.map(big);
    c.execute(
        "INSERT INTO usage_ledger (id, created_at, request_id, endpoint, model, prompt_tokens,
             cached_tokens, completion_tokens, outcome, latency_ms, time_to_first_token_ms,
             tenant_id, key_id, backend, currency, input_nanos_per_mtok,
             cached_input_nanos_per_mtok, output_nanos_per_mtok, cost_nanos)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
             $18, $19)",
        &[
            &id,
            &r.created_at_ms,
            &r.request_id,
            &r.endpoint,
            &r.model,
            &big(r.prompt_tokens),
            &big(r.cached_tokens),
            &big(r.completion_tokens),
            &r.outcome.as_db_text(),
            &big(r.latency_ms),
            &ttft,
            &tenant,
            &key,
            &r.backend,
            &currency,
            &input,
            &cached,
            &output,
            &r.cost.nanos(),
        ],
    )?;
    Ok(())
}

fn entry_from_row(r: &Row) -> Result<LedgerEntry> {
    let id: String = r.get(0);
    let outcome: String = r.get(8);
    let outcome = Outcome::from_db_text(&outcome).ok_or_else(|| StoreError::BadRow {
        table: "usage_ledger",
        id: id.clone(),
        reason: format!("unknown outcome `{outcome}`"),
    })?;
    let tenant_id: Option<String> = r.get(11);
    let key_id: Option<String> = r.get(12);
    Ok(LedgerEntry {
        id,
        record: CallRecord {
            created_at_ms: r.get(1),
            request_id: r.get(2),
            endpoint: r.get(3),
            model: r.get(4),
            prompt_tokens: count(r.get(5)),
            cached_tokens: count(r.get(6)),
            completion_tokens: count(r.get(7)),
            outcome,
            latency_ms: count(r.get(9)),
            ttft_ms: r.get::<_, Option<i64>>(10).map(count),
            caller: tenant_id.map(|tenant_id| Caller { tenant_id, key_id }),
            backend: r.get(13),
            prices: prices_at(r, 14),
            cost: Money(r.get(18)),
        },
    })
}

pub(super) fn entry_by_id(c: &mut impl Db, id: &str) -> Result<Option<LedgerEntry>> {
    let sql = format!("SELECT {LEDGER_COLUMNS} FROM usage_ledger WHERE id = $1");
    c.query_opt(&sql, &[&id])?
        .map(|r| entry_from_row(&r))
        .transpose()
}

impl CallLog for PgStore {
    fn record_call(&self, call: &CallRecord) -> Result<()> {
        insert_entry(&mut self.conn()?, &new_call_id(), call)
    }

    fn recent_calls(&self, tenant_id: Option<&str>, limit: usize) -> Result<Vec<LedgerEntry>> {
        let sql = format!(
            "SELECT {LEDGER_COLUMNS} FROM usage_ledger
             WHERE $1::TEXT IS NULL OR tenant_id = $1
             ORDER BY created_at DESC, seq DESC LIMIT $2"
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.conn()?
            .query(&sql, &[&tenant_id, &limit])?
            .iter()
            .map(entry_from_row)
            .collect()
    }

    fn usage_totals(&self) -> Result<Vec<ModelUsage>> {
        let rows = self.conn()?.query(
            "SELECT model, COUNT(*), COUNT(*) FILTER (WHERE outcome LIKE 'error:%'),
                    SUM(prompt_tokens)::BIGINT, SUM(cached_tokens)::BIGINT,
                    SUM(completion_tokens)::BIGINT
             FROM usage_ledger GROUP BY model ORDER BY model",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| ModelUsage {
                model: r.get(0),
                calls: count(r.get(1)),
                errors: count(r.get(2)),
                prompt_tokens: count(r.get(3)),
                cached_tokens: count(r.get(4)),
                completion_tokens: count(r.get(5)),
            })
            .collect())
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
                GroupBy::Day => {
                    "to_char(to_timestamp(created_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
                }
            })
            .collect();
        let mut select = key_sql.join(", ");
        if !select.is_empty() {
            select.push_str(", ");
        }
        let mut sql = format!(
            "SELECT {select} COUNT(*), COUNT(*) FILTER (WHERE outcome LIKE 'error:%'),
                    COALESCE(SUM(prompt_tokens), 0)::BIGINT, COALESCE(SUM(cached_tokens), 0)::BIGINT,
                    COALESCE(SUM(completion_tokens), 0)::BIGINT, COALESCE(SUM(cost_nanos), 0)::BIGINT
             FROM usage_ledger WHERE TRUE"
        );
        let mut ints: Vec<(String, i64)> = Vec::new();
        let mut texts: Vec<(String, String)> = Vec::new();
        if let Some(t) = q.from_ms {
            ints.push(("created_at >=".into(), t));
        }
        if let Some(t) = q.to_ms {
            ints.push(("created_at <".into(), t));
        }
        for (column, v) in [
            ("tenant_id =", &q.tenant_id),
            ("key_id =", &q.key_id),
            ("model =", &q.model),
        ] {
            if let Some(v) = v {
                texts.push((column.into(), v.clone()));
            }
        }
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for (column, v) in &ints {
            params.push(v);
            sql.push_str(&format!(" AND {column} ${}", params.len()));
        }
        for (column, v) in &texts {
            params.push(v);
            sql.push_str(&format!(" AND {column} ${}", params.len()));
        }
        if !keys.is_empty() {
            let list = key_sql.join(", ");
            sql.push_str(&format!(" GROUP BY {list} ORDER BY {list}"));
        }
        let rows = self.conn()?.query(&sql, &params)?;
        let n = keys.len();
        let mut out = Vec::new();
        for r in &rows {
            let mut row = UsageRow {
                calls: count(r.get(n)),
                errors: count(r.get(n + 1)),
                prompt_tokens: count(r.get(n + 2)),
                cached_tokens: count(r.get(n + 3)),
                completion_tokens: count(r.get(n + 4)),
                cost: Money(r.get(n + 5)),
                ..UsageRow::default()
            };
            for (i, g) in keys.iter().enumerate() {
                let v: Option<String> = r.get(i);
                match g {
                    GroupBy::Tenant => row.tenant_id = v,
                    GroupBy::Key => row.key_id = v,
                    GroupBy::Model => row.model = v,
                    GroupBy::Day => row.day = v,
                }
            }
            out.push(row);
        }
        if keys.is_empty() && out.first().is_some_and(|r| r.calls == 0) {
            out.clear();
        }
        Ok(out)
    }

    fn ledger_entry(&self, id: &str) -> Result<Option<LedgerEntry>> {
        entry_by_id(&mut self.conn()?, id)
    }
}
