//! The platform API under `/api`: tenants, keys, prices, credits, budgets
//! and usage reports. Every route needs a key; what it may touch depends on
//! the key's role:
//! - a platform admin may do everything;
//! - a tenant admin manages its own tenant's keys and reads its budget and
//!   usage;
//! - a member reads its own key, the prices, and its own key's usage.
//!
//! Another tenant's objects answer 404, exactly like objects that do not
//! exist, so a key learns nothing about tenants it does not belong to.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use kiln_store::accounts::{ApiKey, Limits, NewKey, NewTenant, Role, Tenant, TenantUpdate};
use kiln_store::billing::{parse_utc_day, CreditKind, NewCredit};
use kiln_store::money::{Money, Prices};
use kiln_store::{Database, GroupBy, UsageQuery, UsageRow};
use kiln_types::error::ErrorCode;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;

use super::SharedState;
use crate::auth::Principal;
use crate::error::{store_unavailable, ApiError};
use crate::extract::ApiJson;

/// Most ledger rows one request returns.
const MAX_LEDGER_ROWS: usize = 1000;
/// Longest key lifetime a request may set: ten years.
const MAX_KEY_DAYS: i64 = 3650;

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/api/me", get(me))
        .route("/api/tenants", get(list_tenants).post(create_tenant))
        .route("/api/tenants/{id}", get(get_tenant).patch(update_tenant))
        .route(
            "/api/tenants/{id}/credits",
            get(list_credits).post(add_credit),
        )
        .route("/api/tenants/{id}/budget", get(budget))
        .route("/api/keys", get(list_keys).post(create_key))
        .route("/api/keys/{id}", get(get_key).patch(update_key))
        .route("/api/keys/{id}/revoke", post(revoke_key))
        .route("/api/keys/{id}/rotate", post(rotate_key))
        .route("/api/prices", get(list_prices))
        .route("/api/prices/{*model}", put(set_price).delete(delete_price))
        .route("/api/usage", get(usage))
        .route("/api/ledger", get(ledger))
}

type Caller = Extension<Arc<Principal>>;

/// Runs a store call on the blocking pool.
pub(crate) async fn store<T, F>(state: &SharedState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Database) -> kiln_store::Result<T> + Send + 'static,
{
    let db = state.db().clone();
    tokio::task::spawn_blocking(move || f(&*db))
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(store_unavailable)
}

/// After a change to keys or tenants: this replica forgets its cached keys
/// now (the others within one epoch poll).
async fn refresh_auth(state: &SharedState) {
    let auth = state.auth.clone();
    let _ = tokio::task::spawn_blocking(move || auth.poll_epoch()).await;
}

fn denied(what: &str) -> ApiError {
    ApiError::new(
        ErrorCode::PermissionDenied,
        format!("this key's role may not {what}"),
    )
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no {what} `{id}`"))
}

fn require_platform_admin(p: &Principal, what: &str) -> Result<(), ApiError> {
    if p.role() == Role::PlatformAdmin {
        Ok(())
    } else {
        Err(denied(what))
    }
}

/// The tenant, if the caller may see it (its own, or any for a platform
/// admin); otherwise the same 404 as for a tenant that does not exist.
async fn visible_tenant(state: &SharedState, p: &Principal, id: &str) -> Result<Tenant, ApiError> {
    let lookup = id.to_string();
    let t = store(state, move |db| db.tenant(&lookup)).await?;
    match t {
        Some(t) if p.role() == Role::PlatformAdmin || t.id == p.tenant.id => Ok(t),
        _ => Err(not_found("tenant", id)),
    }
}

/// The key, if the caller may manage it (members: only themselves, read-only
/// routes check that separately).
async fn visible_key(state: &SharedState, p: &Principal, id: &str) -> Result<ApiKey, ApiError> {
    let lookup = id.to_string();
    let k = store(state, move |db| db.key(&lookup)).await?;
    match k {
        Some(k)
            if p.may_manage(&k.tenant_id) || p.key.as_ref().is_some_and(|own| own.id == k.id) =>
        {
            Ok(k)
        }
        _ => Err(not_found("key", id)),
    }
}

async fn me(Extension(p): Caller) -> Json<serde_json::Value> {
    Json(json!({ "tenant": p.tenant, "key": p.key, "role": p.role() }))
}

async fn list_tenants(
    State(state): State<SharedState>,
    Extension(p): Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenants = if p.role() == Role::PlatformAdmin {
        store(&state, |db| db.tenants()).await?
    } else {
        vec![visible_tenant(&state, &p, &p.tenant.id.clone()).await?]
    };
    Ok(Json(json!({ "object": "list", "data": tenants })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    name: String,
    #[serde(default)]
    monthly_limit: Option<Money>,
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    tokens_per_minute: Option<u32>,
}

async fn create_tenant(
    State(state): State<SharedState>,
    Extension(p): Caller,
    ApiJson(body): ApiJson<CreateTenant>,
) -> Result<Response, ApiError> {
    require_platform_admin(&p, "create tenants")?;
    let new = NewTenant {
        name: body.name,
        limits: Limits {
            monthly_limit: body.monthly_limit,
            requests_per_minute: body.requests_per_minute,
            tokens_per_minute: body.tokens_per_minute,
        },
    };
    let t = store(&state, move |db| db.create_tenant(&new)).await?;
    Ok((axum::http::StatusCode::CREATED, Json(t)).into_response())
}

async fn get_tenant(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    Ok(Json(visible_tenant(&state, &p, &id).await?))
}

/// `Some(None)` for an explicit `null`, `None` for a missing field.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsPatch {
    #[serde(default, deserialize_with = "nullable")]
    monthly_limit: Option<Option<Money>>,
    #[serde(default, deserialize_with = "nullable")]
    requests_per_minute: Option<Option<u32>>,
    #[serde(default, deserialize_with = "nullable")]
    tokens_per_minute: Option<Option<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateTenant {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    disabled: Option<bool>,
    #[serde(flatten)]
    limits: LimitsPatch,
}

async fn update_tenant(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateTenant>,
) -> Result<Json<Tenant>, ApiError> {
    require_platform_admin(&p, "change tenants")?;
    let t = visible_tenant(&state, &p, &id).await?;
    let update = TenantUpdate {
        name: body.name,
        disabled: body.disabled,
        monthly_limit: body.limits.monthly_limit,
        requests_per_minute: body.limits.requests_per_minute,
        tokens_per_minute: body.limits.tokens_per_minute,
    };
    let tid = t.id.clone();
    let updated = store(&state, move |db| db.update_tenant(&tid, &update)).await?;
    refresh_auth(&state).await;
    updated.map(Json).ok_or_else(|| not_found("tenant", &id))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddCredit {
    amount: Money,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    note: Option<String>,
    #[serde(default)]
    key_id: Option<String>,
}

async fn add_credit(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AddCredit>,
) -> Result<Response, ApiError> {
    require_platform_admin(&p, "add credit")?;
    let t = visible_tenant(&state, &p, &id).await?;
    let kind_text = body.kind.as_deref().unwrap_or("prepaid");
    let kind = CreditKind::parse(kind_text).ok_or_else(|| {
        ApiError::invalid(
            "kind",
            format!("`kind` is `{kind_text}`; it must be prepaid, grant or adjustment"),
        )
    })?;
    let note = body.note.unwrap_or_default();
    if note.len() > 1000 {
        return Err(ApiError::invalid(
            "note",
            "`note` is longer than 1000 bytes",
        ));
    }
    let credit = NewCredit {
        tenant_id: t.id,
        key_id: body.key_id,
        kind,
        amount: body.amount,
        note,
        created_by: p.key.as_ref().map(|k| k.id.clone()),
    };
    let entry = store(&state, move |db| db.add_credit(&credit)).await?;
    Ok((axum::http::StatusCode::CREATED, Json(entry)).into_response())
}

async fn list_credits(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let t = visible_tenant(&state, &p, &id).await?;
    if !p.may_manage(&t.id) {
        return Err(denied("read credits"));
    }
    let credits = store(&state, move |db| db.credits(&t.id)).await?;
    Ok(Json(json!({ "object": "list", "data": credits })))
}

#[derive(Debug, Deserialize)]
struct BudgetQuery {
    key_id: Option<String>,
}

async fn budget(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
    Query(q): Query<BudgetQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let t = visible_tenant(&state, &p, &id).await?;
    let own_key = p.key.as_ref().map(|k| k.id.as_str());
    let allowed = p.may_manage(&t.id) || (q.key_id.is_some() && q.key_id.as_deref() == own_key);
    if !allowed {
        return Err(denied("read this budget"));
    }
    let currency = state.meter.currency.clone();
    let (tid, kid) = (t.id.clone(), q.key_id.clone());
    let b = store(&state, move |db| db.budget(&tid, kid.as_deref()))
        .await?
        .ok_or_else(|| not_found("key", q.key_id.as_deref().unwrap_or(&id)))?;
    Ok(Json(
        json!({ "tenant_id": t.id, "key_id": q.key_id, "currency": currency, "budget": b }),
    ))
}

#[derive(Debug, Deserialize)]
struct KeysQuery {
    tenant_id: Option<String>,
}

async fn list_keys(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Query(q): Query<KeysQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = match p.role() {
        Role::PlatformAdmin => q.tenant_id,
        Role::TenantAdmin => Some(p.tenant.id.clone()),
        Role::Member => {
            let own = p.key.clone().into_iter().collect::<Vec<_>>();
            return Ok(Json(json!({ "object": "list", "data": own })));
        }
    };
    let keys = store(&state, move |db| db.keys(tenant.as_deref())).await?;
    Ok(Json(json!({ "object": "list", "data": keys })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    models: Option<Vec<String>>,
    /// Days from now.
    #[serde(default)]
    expires_in_days: Option<i64>,
    #[serde(default)]
    monthly_limit: Option<Money>,
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    tokens_per_minute: Option<u32>,
    /// Scheduling priority, -100 to 100; above 0 only a platform admin may give.
    #[serde(default)]
    priority: Option<i32>,
    /// Knowledge-base groups whose restricted documents the key may see.
    #[serde(default)]
    groups: Vec<String>,
}

async fn create_key(
    State(state): State<SharedState>,
    Extension(p): Caller,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<Response, ApiError> {
    let tenant_id = body
        .tenant_id
        .clone()
        .unwrap_or_else(|| p.tenant.id.clone());
    let t = visible_tenant(&state, &p, &tenant_id).await?;
    if !p.may_manage(&t.id) {
        return Err(denied("create keys"));
    }
    let role_text = body.role.as_deref().unwrap_or("member");
    let role = Role::parse(role_text).ok_or_else(|| {
        ApiError::invalid(
            "role",
            format!("`role` is `{role_text}`; it must be member, tenant_admin or platform_admin"),
        )
    })?;
    if role == Role::PlatformAdmin && p.role() != Role::PlatformAdmin {
        return Err(denied("create platform admin keys"));
    }
    let priority = body.priority.unwrap_or(0);
    if priority > 0 && p.role() != Role::PlatformAdmin {
        // Raising one tenant's keys above the others is the operator's call.
        return Err(denied("give keys a priority above 0"));
    }
    let expires_at_ms = match body.expires_in_days {
        None => None,
        Some(d) if (1..=MAX_KEY_DAYS).contains(&d) => Some(kiln_store::now_ms() + d * 86_400_000),
        Some(d) => {
            return Err(ApiError::invalid(
                "expires_in_days",
                format!("`expires_in_days` is {d}; it must be between 1 and {MAX_KEY_DAYS}"),
            ))
        }
    };
    let new = NewKey {
        tenant_id: t.id,
        name: body.name,
        role,
        models: body.models,
        expires_at_ms,
        limits: Limits {
            monthly_limit: body.monthly_limit,
            requests_per_minute: body.requests_per_minute,
            tokens_per_minute: body.tokens_per_minute,
        },
        priority,
        groups: body.groups,
    };
    let issued = store(&state, move |db| db.create_key(&new)).await?;
    Ok((axum::http::StatusCode::CREATED, Json(issued)).into_response())
}

async fn get_key(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    Ok(Json(visible_key(&state, &p, &id).await?))
}

async fn update_key(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<LimitsPatch>,
) -> Result<Json<ApiKey>, ApiError> {
    let k = visible_key(&state, &p, &id).await?;
    if !p.may_manage(&k.tenant_id) {
        return Err(denied("change keys"));
    }
    let limits = Limits {
        monthly_limit: body.monthly_limit.unwrap_or(k.limits.monthly_limit),
        requests_per_minute: body
            .requests_per_minute
            .unwrap_or(k.limits.requests_per_minute),
        tokens_per_minute: body.tokens_per_minute.unwrap_or(k.limits.tokens_per_minute),
    };
    let updated = store(&state, move |db| db.update_key_limits(&k.id, &limits)).await?;
    refresh_auth(&state).await;
    updated.map(Json).ok_or_else(|| not_found("key", &id))
}

async fn revoke_key(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    let k = visible_key(&state, &p, &id).await?;
    if !p.may_manage(&k.tenant_id) {
        return Err(denied("revoke keys"));
    }
    let revoked = store(&state, move |db| db.revoke_key(&k.id))
        .await?
        .ok_or_else(|| not_found("key", &id))?;
    refresh_auth(&state).await;
    Ok(Json(revoked))
}

async fn rotate_key(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<kiln_store::accounts::IssuedKey>, ApiError> {
    let k = visible_key(&state, &p, &id).await?;
    if !p.may_manage(&k.tenant_id) {
        return Err(denied("rotate keys"));
    }
    let issued = store(&state, move |db| db.rotate_key(&k.id))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Conflict,
                format!("the key `{id}` is revoked and cannot be rotated"),
            )
        })?;
    refresh_auth(&state).await;
    Ok(Json(issued))
}

#[derive(Debug, Serialize)]
struct PriceCard {
    model: String,
    #[serde(flatten)]
    prices: Prices,
    per: &'static str,
}

async fn list_prices(
    State(state): State<SharedState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let prices = store(&state, |db| db.prices()).await?;
    let data: Vec<PriceCard> = prices
        .into_iter()
        .map(|(model, prices)| PriceCard {
            model,
            prices,
            per: "1M tokens",
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPrice {
    input: Money,
    /// Defaults to the input price.
    #[serde(default)]
    cached_input: Option<Money>,
    output: Money,
    /// Must be the platform currency when given.
    #[serde(default)]
    currency: Option<String>,
}

async fn set_price(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(model): Path<String>,
    ApiJson(body): ApiJson<SetPrice>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_platform_admin(&p, "set prices")?;
    let prices = Prices {
        currency: body
            .currency
            .unwrap_or_else(|| state.meter.currency.clone()),
        input: body.input,
        cached_input: body.cached_input.unwrap_or(body.input),
        output: body.output,
    };
    let (m, pr) = (model.clone(), prices.clone());
    store(&state, move |db| db.set_price(&m, &pr)).await?;
    Ok(Json(json!(PriceCard {
        model,
        prices,
        per: "1M tokens"
    })))
}

async fn delete_price(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_platform_admin(&p, "delete prices")?;
    let m = model.clone();
    if store(&state, move |db| db.delete_price(&m)).await? {
        Ok(Json(json!({ "model": model, "deleted": true })))
    } else {
        Err(not_found("price for model", &model))
    }
}

#[derive(Debug, Deserialize)]
struct UsageParams {
    group_by: Option<String>,
    /// `YYYY-MM-DD`, inclusive (UTC).
    from: Option<String>,
    /// `YYYY-MM-DD`, inclusive (UTC).
    to: Option<String>,
    tenant_id: Option<String>,
    key_id: Option<String>,
    model: Option<String>,
    /// `json` (default) or `csv`.
    format: Option<String>,
}

/// Reads a usage request's fields (shared by `/api/usage` and `kiln usage`).
pub fn parse_usage_query(params: &UsageParamsView<'_>) -> Result<UsageQuery, ApiError> {
    let group_by = match params.group_by {
        None | Some("") => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|g| {
                GroupBy::parse(g.trim()).ok_or_else(|| {
                    ApiError::invalid(
                        "group_by",
                        format!(
                            "`group_by` has `{g}`; use tenant, key, model and day, comma-separated"
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let day = |param: &'static str, text: Option<&str>| -> Result<Option<i64>, ApiError> {
        text.map(|t| {
            parse_utc_day(t).ok_or_else(|| {
                ApiError::invalid(
                    param,
                    format!("`{param}` is `{t}`; use a date as YYYY-MM-DD"),
                )
            })
        })
        .transpose()
    };
    let from_ms = day("from", params.from)?;
    let to_ms = day("to", params.to)?.map(|t| t + 86_400_000);
    Ok(UsageQuery {
        from_ms,
        to_ms,
        tenant_id: params.tenant_id.map(str::to_string),
        key_id: params.key_id.map(str::to_string),
        model: params.model.map(str::to_string),
        group_by,
    })
}

/// Narrows a query to what the caller may see: a tenant admin its tenant, a
/// member its own key, whatever they asked for.
fn scope_usage_query(p: &Principal, q: &mut UsageQuery) {
    match p.role() {
        Role::PlatformAdmin => {}
        Role::TenantAdmin => q.tenant_id = Some(p.tenant.id.clone()),
        Role::Member => {
            q.tenant_id = Some(p.tenant.id.clone());
            q.key_id = p.key.as_ref().map(|k| k.id.clone());
        }
    }
}

/// The text fields of a usage request, borrowed (shared with the CLI).
pub struct UsageParamsView<'a> {
    pub group_by: Option<&'a str>,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub tenant_id: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub model: Option<&'a str>,
}

/// A report as CSV: the grouping columns asked for, then the totals.
pub fn usage_csv(group_by: &[GroupBy], rows: &[UsageRow], currency: &str) -> String {
    let mut out = String::new();
    let mut header: Vec<&str> = group_by
        .iter()
        .map(|g| match g {
            GroupBy::Tenant => "tenant_id",
            GroupBy::Key => "key_id",
            GroupBy::Model => "model",
            GroupBy::Day => "day",
        })
        .collect();
    header.extend([
        "calls",
        "errors",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "cost",
        "currency",
    ]);
    out.push_str(&header.join(","));
    out.push('\n');
    for r in rows {
        let mut cells: Vec<String> = group_by
            .iter()
            .map(|g| {
                let v = match g {
                    GroupBy::Tenant => &r.tenant_id,
                    GroupBy::Key => &r.key_id,
                    GroupBy::Model => &r.model,
                    GroupBy::Day => &r.day,
                };
                csv_cell(v.as_deref().unwrap_or(""))
            })
            .collect();
        cells.extend([
            r.calls.to_string(),
            r.errors.to_string(),
            r.prompt_tokens.to_string(),
            r.cached_tokens.to_string(),
            r.completion_tokens.to_string(),
            r.cost.to_string(),
            csv_cell(currency),
        ]);
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn csv_cell(v: &str) -> String {
    // Quote anything a spreadsheet could misread, including formula starts.
    if v.contains([',', '"', '\n', '\r']) || v.starts_with(['=', '+', '-', '@']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// Sums rows into one totals row.
pub fn totals(rows: &[UsageRow]) -> UsageRow {
    let mut t = UsageRow::default();
    for r in rows {
        t.calls += r.calls;
        t.errors += r.errors;
        t.prompt_tokens += r.prompt_tokens;
        t.cached_tokens += r.cached_tokens;
        t.completion_tokens += r.completion_tokens;
        t.cost = Money(t.cost.0.saturating_add(r.cost.0));
    }
    t
}

async fn usage(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Query(params): Query<UsageParams>,
) -> Result<Response, ApiError> {
    let view = UsageParamsView {
        group_by: params.group_by.as_deref(),
        from: params.from.as_deref(),
        to: params.to.as_deref(),
        tenant_id: params.tenant_id.as_deref(),
        key_id: params.key_id.as_deref(),
        model: params.model.as_deref(),
    };
    let mut q = parse_usage_query(&view)?;
    scope_usage_query(&p, &mut q);
    let group_by = q.group_by.clone();
    let rows = store(&state, move |db| db.usage(&q)).await?;
    let currency = state.meter.currency.clone();
    match params.format.as_deref() {
        None | Some("json") => Ok(Json(json!({
            "object": "usage_report",
            "currency": currency,
            "group_by": group_by,
            "data": rows,
            "totals": totals(&rows),
        }))
        .into_response()),
        Some("csv") => Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            usage_csv(&group_by, &rows, &currency),
        )
            .into_response()),
        Some(other) => Err(ApiError::invalid(
            "format",
            format!("`format` is `{other}`; use json or csv"),
        )),
    }
}

#[derive(Debug, Deserialize)]
struct LedgerParams {
    limit: Option<usize>,
}

async fn ledger(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Query(params): Query<LedgerParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = params.limit.unwrap_or(100).min(MAX_LEDGER_ROWS);
    let tenant = match p.role() {
        Role::PlatformAdmin => None,
        Role::TenantAdmin => Some(p.tenant.id.clone()),
        Role::Member => return Err(denied("read the ledger")),
    };
    let rows = store(&state, move |db| db.recent_calls(tenant.as_deref(), limit)).await?;
    Ok(Json(json!({ "object": "list", "data": rows })))
}
