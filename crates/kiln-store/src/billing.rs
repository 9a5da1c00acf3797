//! Prices, credits, budgets, and the reservation protocol that keeps them
//! exact under concurrency ([`Billing`]).
//!
//! A call is admitted by *reserving* its worst-case cost (every prompt token
//! uncached, `max_tokens` generated) against its tenant's and key's budgets,
//! in one transaction that also checks them; no admitted set of calls can
//! spend more than a budget holds. When the call ends it is *settled*, again
//! in one transaction: the usage ledger row is written (its id is the
//! reservation's, so a second settlement of the same call changes nothing),
//! the reservation is dropped, and the actual cost is taken from the
//! balances and added to the month's spend.
//!
//! Each reservation belongs to the replica that made it. A replica holds a
//! lease in the store and renews it; reservations of a replica whose lease
//! lapsed are settled by whichever replica notices first (including the same
//! machine after a restart) under this rule: the call is recorded in the
//! ledger as `error:interrupted` with no tokens and no cost, and its
//! reservation is released. A client whose call was interrupted by a crash
//! never received a whole response, so nothing is charged for it; a response
//! that was delivered in full was settled before its last byte was sent. If a
//! replica that was only paused (its lease lapsed while it was alive) later
//! settles such a call, the settlement replaces the `interrupted` row and the
//! cost is charged then.

use serde::{Deserialize, Serialize};

use crate::calls::{CallRecord, LedgerEntry, Outcome};
use crate::error::Result;
use crate::money::{Money, Prices, TokenCounts};

/// Who a call is charged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Caller {
    pub tenant_id: String,
    /// `None` for calls made without a key (`--no-auth`).
    pub key_id: Option<String>,
}

/// A call asking to be admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRequest {
    pub caller: Caller,
    pub request_id: String,
    pub endpoint: String,
    pub model: String,
    /// `embedded`, or the name of an upstream backend.
    pub backend: String,
    pub prompt_tokens: u64,
    pub max_completion_tokens: u64,
}

/// An admitted call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// `use-<32 hex digits>`; the ledger row's id once settled.
    pub id: String,
    pub replica_id: String,
    pub created_at_ms: i64,
    pub caller: Caller,
    pub request_id: String,
    pub endpoint: String,
    pub model: String,
    pub backend: String,
    pub prompt_tokens: u64,
    pub max_completion_tokens: u64,
    /// The worst-case cost held.
    pub amount: Money,
    /// The model's prices when admitted; `None`: the model has no price.
    pub prices: Option<Prices>,
}

/// Why a call was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Refusal {
    /// The prepaid balance left (after other calls' reservations) is less
    /// than the call's worst case.
    InsufficientCredit {
        /// `tenant` or `key`.
        account: String,
        available: Money,
        needed: Money,
    },
    /// The month's spend plus reservations plus this call would pass the
    /// monthly limit.
    MonthlyLimit {
        account: String,
        limit: Money,
        committed: Money,
        needed: Money,
    },
    /// The tenant is disabled, or the key was revoked meanwhile.
    AccountDisabled { account: String },
}

impl Refusal {
    /// A message for the client.
    pub fn message(&self, currency: &str) -> String {
        match self {
            Refusal::InsufficientCredit {
                account,
                available,
                needed,
            } => format!(
                "the {account}'s credit balance cannot cover this request: it may cost up to {needed} {currency} (prompt plus max_tokens), and {available} {currency} is available; lower max_tokens or add credit"
            ),
            Refusal::MonthlyLimit {
                account,
                limit,
                committed,
                needed,
            } => format!(
                "this request would pass the {account}'s monthly spending limit of {limit} {currency}: {committed} {currency} is spent or reserved this month and the request may cost up to {needed} {currency}"
            ),
            Refusal::AccountDisabled { account } => {
                format!("the {account} is disabled")
            }
        }
    }
}

/// How an admitted call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub reservation_id: String,
    pub outcome: Outcome,
    pub tokens: TokenCounts,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
}

/// One change to a balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditEntry {
    pub id: String,
    pub created_at_ms: i64,
    pub tenant_id: String,
    /// `None`: the tenant's balance.
    pub key_id: Option<String>,
    pub kind: CreditKind,
    pub amount: Money,
    pub note: String,
    pub created_by: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditKind {
    /// Credit the tenant paid for.
    Prepaid,
    /// Credit given (a trial, a compensation).
    Grant,
    /// A correction, positive or negative.
    Adjustment,
}

impl CreditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CreditKind::Prepaid => "prepaid",
            CreditKind::Grant => "grant",
            CreditKind::Adjustment => "adjustment",
        }
    }

    pub fn parse(text: &str) -> Option<CreditKind> {
        match text {
            "prepaid" => Some(CreditKind::Prepaid),
            "grant" => Some(CreditKind::Grant),
            "adjustment" => Some(CreditKind::Adjustment),
            _ => None,
        }
    }
}

/// A credit to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCredit {
    pub tenant_id: String,
    pub key_id: Option<String>,
    pub kind: CreditKind,
    pub amount: Money,
    pub note: String,
    pub created_by: Option<String>,
}

/// An account's budget as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    pub balance: Option<Money>,
    pub reserved: Money,
    pub monthly_limit: Option<Money>,
    /// Settled spend this UTC month.
    pub spent_this_month: Money,
    pub month: String,
}

/// Which per-minute allowance a rate bucket holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateKind {
    Requests,
    Tokens,
}

impl RateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RateKind::Requests => "requests",
            RateKind::Tokens => "tokens",
        }
    }
}

/// An amount to take from (or give back to) one subject's bucket, which
/// holds up to `per_minute` and refills at `per_minute` per minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateTake {
    /// `key:<id>` or `tenant:<id>`.
    pub subject: String,
    pub kind: RateKind,
    pub per_minute: u32,
    pub amount: u64,
}

/// A bucket after a take: what the `x-ratelimit-*` headers report.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLevel {
    pub subject: String,
    pub kind: RateKind,
    pub per_minute: u32,
    pub remaining: u64,
    /// Milliseconds until the bucket is full again.
    pub reset_ms: u64,
}

/// The result of [`SharedRateLimits::take`].
#[derive(Debug, Clone, PartialEq)]
pub enum RateOutcome {
    /// Everything was taken.
    Taken(Vec<RateLevel>),
    /// Nothing was taken; the first bucket short of its amount is `short`,
    /// and waiting `wait_ms` would make every amount available.
    Refused {
        wait_ms: u64,
        short: RateTake,
        levels: Vec<RateLevel>,
    },
}

/// Refills a bucket of `per_minute` that held `level` at `updated_ms`, to
/// `now_ms`; a changed allowance applies at once, without a fresh burst.
/// Returns the new level. The one token-bucket rule shared by every store.
pub fn refill(
    level: f64,
    capacity_before: f64,
    updated_ms: i64,
    per_minute: u32,
    now_ms: i64,
) -> f64 {
    let capacity = f64::from(per_minute);
    let level = if capacity_before == capacity {
        level
    } else {
        level.min(capacity)
    };
    let elapsed = (now_ms - updated_ms).max(0) as f64 / 60_000.0;
    (level + elapsed * capacity).min(capacity)
}

/// Milliseconds until a bucket of `per_minute` at `level` holds `amount`.
pub fn wait_ms(level: f64, per_minute: u32, amount: f64) -> u64 {
    if level >= amount || per_minute == 0 {
        0
    } else {
        ((amount - level) * 60_000.0 / f64::from(per_minute)).ceil() as u64
    }
}

/// Rate buckets kept in the database, so replicas share one allowance.
/// Every method blocks.
pub trait SharedRateLimits: Send + Sync {
    /// Takes every amount, or none.
    fn take(&self, takes: &[RateTake], now_ms: i64) -> Result<RateOutcome>;
    /// Gives amounts back (never above a bucket's capacity).
    fn give_back(&self, takes: &[RateTake], now_ms: i64) -> Result<()>;
}

/// Prices, credits, reservations and leases. Every method blocks.
pub trait Billing: Send + Sync {
    /// Rate buckets in the database, when it is shared by replicas; `None`:
    /// each server keeps its own (exact for a single replica).
    fn shared_rate_limits(&self) -> Option<&dyn SharedRateLimits> {
        None
    }

    /// Whether a call can run [`crate::without_waiting`]: the embedded
    /// store's are a local transaction of well under a millisecond when
    /// nothing else holds the database; a networked store's are round trips.
    fn answers_without_waiting(&self) -> bool {
        false
    }

    /// The platform currency every price and balance is in.
    fn currency(&self) -> Result<String>;
    fn set_price(&self, model: &str, prices: &Prices) -> Result<()>;
    /// `false` when the model had no price.
    fn delete_price(&self, model: &str) -> Result<bool>;
    fn prices(&self) -> Result<Vec<(String, Prices)>>;
    fn price(&self, model: &str) -> Result<Option<Prices>>;

    /// Adds a credit entry and moves the balance it names (a balance that
    /// was `None` starts at zero).
    fn add_credit(&self, credit: &NewCredit) -> Result<CreditEntry>;
    fn credits(&self, tenant_id: &str) -> Result<Vec<CreditEntry>>;
    /// The tenant's budget, or a key's when `key_id` is given.
    fn budget(&self, tenant_id: &str, key_id: Option<&str>) -> Result<Option<Budget>>;

    /// Registers (or re-registers) a replica with a lease until `until_ms`.
    fn renew_lease(&self, replica_id: &str, until_ms: i64) -> Result<()>;
    /// Removes a replica's lease at a clean shutdown (after its calls ended).
    fn drop_lease(&self, replica_id: &str) -> Result<()>;
    /// Settles, under the rule in this module's docs, every reservation of
    /// a replica whose lease ended before `now_ms`; returns how many.
    fn recover_lapsed(&self, now_ms: i64) -> Result<usize>;

    /// Admits a call or says why not.
    fn reserve(
        &self,
        replica_id: &str,
        req: &ReservationRequest,
    ) -> Result<std::result::Result<Reservation, Refusal>>;
    /// Settles a call; `None` when it was settled already (nothing changes).
    fn settle(&self, s: &Settlement) -> Result<Option<LedgerEntry>>;
    /// Reservations still open (all replicas).
    fn open_reservations(&self) -> Result<Vec<Reservation>>;
}

/// A budget-holding row: a tenant or a key.
#[derive(Clone, Copy)]
pub(crate) enum Account<'a> {
    Tenant(&'a str),
    Key(&'a str),
}

impl Account<'_> {
    pub fn id(&self) -> &str {
        match self {
            Account::Tenant(id) | Account::Key(id) => id,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Account::Tenant(_) => "tenant",
            Account::Key(_) => "key",
        }
    }

    pub fn table(&self) -> &'static str {
        match self {
            Account::Tenant(_) => "tenants",
            Account::Key(_) => "api_keys",
        }
    }

    pub fn disabled_column(&self) -> &'static str {
        match self {
            Account::Tenant(_) => "disabled_at",
            Account::Key(_) => "revoked_at",
        }
    }
}

/// The accounts a caller's calls are held against, tenant first: also the
/// order rows are locked in, so two transactions never wait crosswise.
pub(crate) fn accounts(caller: &Caller) -> Vec<Account<'_>> {
    let mut a = vec![Account::Tenant(&caller.tenant_id)];
    if let Some(k) = &caller.key_id {
        a.push(Account::Key(k));
    }
    a
}

/// A budget-holding account's state, as both databases read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AccountState {
    pub disabled: bool,
    pub balance: Option<Money>,
    pub monthly_limit: Option<Money>,
    pub reserved: Money,
}

/// Whether `amount` more can be held against an account (`label` is
/// `tenant` or `key`), given what it spent this month. The one admission
/// rule, shared by every database.
pub(crate) fn refusal_for(
    label: &str,
    state: Option<AccountState>,
    spent_this_month: Money,
    amount: Money,
) -> Option<Refusal> {
    let account = label.to_string();
    let Some(s) = state.filter(|s| !s.disabled) else {
        return Some(Refusal::AccountDisabled { account });
    };
    if let Some(balance) = s.balance {
        let available = balance.saturating_sub(s.reserved);
        if amount > available {
            return Some(Refusal::InsufficientCredit {
                account,
                available: available.max(Money::ZERO),
                needed: amount,
            });
        }
    }
    if let Some(limit) = s.monthly_limit {
        let committed = Money(spent_this_month.0.saturating_add(s.reserved.0));
        if Money(committed.0.saturating_add(amount.0)) > limit {
            return Some(Refusal::MonthlyLimit {
                account,
                limit,
                committed,
                needed: amount,
            });
        }
    }
    None
}

/// The ledger row a settlement writes for a reservation, at `now_ms`.
pub(crate) fn record_for(res: &Reservation, s: &Settlement, now_ms: i64) -> CallRecord {
    let cost = res
        .prices
        .as_ref()
        .map_or(Money::ZERO, |p| p.cost(s.tokens));
    CallRecord {
        created_at_ms: now_ms,
        request_id: res.request_id.clone(),
        endpoint: res.endpoint.clone(),
        model: res.model.clone(),
        prompt_tokens: s.tokens.prompt,
        cached_tokens: s.tokens.cached.min(s.tokens.prompt),
        completion_tokens: s.tokens.completion,
        outcome: s.outcome.clone(),
        latency_ms: s.latency_ms,
        ttft_ms: s.ttft_ms,
        caller: Some(res.caller.clone()),
        backend: res.backend.clone(),
        prices: res.prices.clone(),
        cost,
    }
}

/// The settlement recovery writes for a reservation whose replica died.
pub(crate) fn interrupted(res: &Reservation, now_ms: i64) -> Settlement {
    Settlement {
        reservation_id: res.id.clone(),
        outcome: Outcome::Error(INTERRUPTED.into()),
        tokens: TokenCounts::default(),
        latency_ms: u64::try_from(now_ms - res.created_at_ms).unwrap_or(0),
        ttft_ms: None,
    }
}

/// A reservation rebuilt from an `interrupted` ledger row, for a replica
/// that settles late: it holds nothing, so settling it only charges.
pub(crate) fn reservation_from_interrupted(prev: &LedgerEntry) -> Reservation {
    Reservation {
        id: prev.id.clone(),
        replica_id: String::new(),
        created_at_ms: prev.record.created_at_ms,
        caller: prev.record.caller.clone().unwrap_or(Caller {
            tenant_id: String::new(),
            key_id: None,
        }),
        request_id: prev.record.request_id.clone(),
        endpoint: prev.record.endpoint.clone(),
        model: prev.record.model.clone(),
        backend: prev.record.backend.clone(),
        prompt_tokens: 0,
        max_completion_tokens: 0,
        amount: Money::ZERO,
        prices: prev.record.prices.clone(),
    }
}

/// The outcome recorded for calls whose replica died before settling them.
pub const INTERRUPTED: &str = "interrupted";

/// A fresh reservation (and ledger) id.
pub(crate) fn new_usage_id() -> String {
    format!("use-{}", uuid::Uuid::new_v4().simple())
}

/// A fresh credit entry id.
pub(crate) fn new_credit_id() -> String {
    format!("crd-{}", uuid::Uuid::new_v4().simple())
}

/// `YYYY-MM` of a unix-millisecond time, in UTC.
pub fn utc_month(unix_ms: i64) -> String {
    let (y, m, _) = civil_from_days(unix_ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}")
}

/// `YYYY-MM-DD` of a unix-millisecond time, in UTC.
pub fn utc_day(unix_ms: i64) -> String {
    let (y, m, d) = civil_from_days(unix_ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Unix milliseconds at the start of a UTC day given as `YYYY-MM-DD`.
pub fn parse_utc_day(text: &str) -> Option<i64> {
    let mut parts = text.split('-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, m, d);
    // Reject 2025-02-30 and the like: it must print back the same.
    (civil_from_days(days) == (y, m, d)).then_some(days * 86_400_000)
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_month(0), "1970-01");
        // 2026-11-25T22:00:00Z
        assert_eq!(utc_day(1_795_644_000_000), "2026-11-25");
        assert_eq!(utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(utc_day(-1), "1969-12-31");
        assert_eq!(parse_utc_day("2000-02-29"), Some(951_782_400_000));
        assert_eq!(parse_utc_day("1970-01-01"), Some(0));
        for bad in ["2025-02-30", "2025-13-01", "x", "2025-1", "2025-01-01-01"] {
            assert_eq!(parse_utc_day(bad), None, "{bad}");
        }
        for day in [-800_000i64, -1, 0, 59, 10_957, 20_416, 2_932_896] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }
}
