//! Metering each model call: admission before the model runs (rate limits,
//! then a budget reservation in the store), settlement into the usage ledger
//! when it ends.
//!
//! The order is what makes the ledger trustworthy:
//! - nothing runs before its reservation is committed, so no call is served
//!   unmetered and no budget is overspent;
//! - a response's last bytes (the JSON body, or a stream's final chunk) are
//!   sent only after its settlement is committed, so a response a client
//!   received in full is in the ledger even if the server is killed right
//!   after;
//! - a stream the client abandons is settled (in the background) as
//!   `cancelled` with the tokens actually generated.
//!
//! Calls that fail before admission (a bad request, a refusal) are recorded
//! at no cost, in the background.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kiln_engine::engine::{Completion, FinishReason};
use kiln_store::billing::{Refusal, ReservationRequest, Settlement};
use kiln_store::money::TokenCounts;
use kiln_store::{CallRecord, Database, Outcome};
use kiln_types::error::ErrorCode;

use super::SharedState;
use crate::auth::Principal;
use crate::error::{store_unavailable, ApiError};
use crate::ratelimit::{Limit, RateLimiter, RateRefusal, RateStatus};
use kiln_store::billing::RateKind;

/// The backend name recorded for the embedded engine.
pub const EMBEDDED_BACKEND: &str = "embedded";

/// The server's metering: the store, this replica's identity, rate limits.
pub struct Meter {
    pub db: Arc<dyn Database>,
    pub replica_id: String,
    pub limiter: RateLimiter,
    pub currency: String,
    /// Settlements that failed to commit (the database was unavailable),
    /// retried by the lease task so reservations are not held forever.
    pending: Mutex<Vec<Settlement>>,
}

impl Meter {
    pub fn new(db: Arc<dyn Database>, replica_id: String) -> Result<Meter, kiln_store::StoreError> {
        let currency = db.currency()?;
        Ok(Meter {
            db,
            replica_id,
            limiter: RateLimiter::default(),
            currency,
            pending: Mutex::new(Vec::new()),
        })
    }

    /// Retries settlements that failed earlier; keeps those that fail again.
    pub fn retry_pending(&self) {
        let batch =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        let mut failed = Vec::new();
        for s in batch {
            if let Err(e) = self.db.settle(&s) {
                tracing::warn!(error = %e, reservation = %s.reservation_id, "settlement retry failed");
                failed.push(s);
            }
        }
        if !failed.is_empty() {
            self.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(failed);
        }
    }

    /// Takes from the rate limits: the database's buckets when replicas
    /// share them, else this process's.
    async fn acquire_rate(
        &self,
        limits: &[Limit],
        tokens: u64,
    ) -> Result<Result<RateStatus, RateRefusal>, ApiError> {
        if limits
            .iter()
            .all(|l| l.requests_per_minute.is_none() && l.tokens_per_minute.is_none())
        {
            return Ok(Ok(RateStatus::default()));
        }
        if self.db.shared_rate_limits().is_none() {
            return Ok(self.limiter.acquire(limits, tokens));
        }
        let db = self.db.clone();
        let limits = limits.to_vec();
        tokio::task::spawn_blocking(move || match db.shared_rate_limits() {
            Some(shared) => crate::ratelimit::acquire_shared(shared, &limits, tokens),
            None => Ok(Ok(RateStatus::default())),
        })
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(store_unavailable)
    }

    /// Gives back `tokens` (and the request itself when `request` is set:
    /// the call never ran).
    fn refund_rate(&self, limits: &[Limit], tokens: u64, request: bool) {
        if self.db.shared_rate_limits().is_none() {
            self.limiter.refund(limits, tokens);
            if request {
                self.limiter.refund_request(limits);
            }
            return;
        }
        let mut back = crate::ratelimit::takes(limits, tokens);
        back.retain(|t| match t.kind {
            RateKind::Tokens => tokens > 0,
            RateKind::Requests => request,
        });
        if back.is_empty() {
            return;
        }
        let db = self.db.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn_blocking(move || {
                if let Some(shared) = db.shared_rate_limits() {
                    if let Err(e) = shared.give_back(&back, kiln_store::now_ms()) {
                        tracing::warn!(error = %e, "cannot give back rate-limit allowance");
                    }
                }
            });
        }
    }

    fn defer(&self, s: Settlement) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(s);
    }
}

/// An admitted call's handle on its reservation.
#[derive(Debug, Clone)]
struct Admission {
    reservation_id: String,
    limits: Vec<Limit>,
    /// Tokens taken from the rate limits (prompt plus max_tokens).
    tokens_taken: u64,
    prompt_tokens: u64,
}

/// Holds an admitted call's reservation until the call settles it. When
/// every handle on the call is dropped first (the client disconnected and
/// the server dropped the unfinished request), dropping this settles the
/// call as `cancelled`, with the tokens used so far, in the background: no
/// reservation outlives its request.
struct AdmissionSlot {
    state: SharedState,
    received: Instant,
    inner: Mutex<Option<Admission>>,
    used: Mutex<Used>,
}

impl Drop for AdmissionSlot {
    fn drop(&mut self) {
        let Some(a) = self
            .inner
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let used = *self.used.get_mut().unwrap_or_else(PoisonError::into_inner);
        let s = Settlement {
            reservation_id: a.reservation_id.clone(),
            outcome: Outcome::Cancelled,
            tokens: used.tokens(a.prompt_tokens),
            latency_ms: millis(self.received.elapsed()),
            ttft_ms: None,
        };
        let spent = s.tokens.prompt + s.tokens.completion;
        self.state
            .meter
            .refund_rate(&a.limits, a.tokens_taken.saturating_sub(spent), false);
        tracing::info!(reservation = %a.reservation_id, "the client went away before the response; settling the call as cancelled");
        let state = self.state.clone();
        let settle = move || {
            if let Err(e) = state.meter.db.settle(&s) {
                tracing::warn!(error = %e, "settling an abandoned call failed; retrying later");
                state.meter.defer(s);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(settle);
            }
            Err(_) => settle(),
        }
    }
}

/// What is known about a call while it runs.
#[derive(Clone)]
pub struct CallContext {
    pub state: SharedState,
    pub request_id: String,
    pub endpoint: &'static str,
    pub model: String,
    pub received: Instant,
    pub principal: Arc<Principal>,
    admission: Arc<AdmissionSlot>,
    rate: Arc<Mutex<RateStatus>>,
    /// Set once the call is settled or recorded, so it is never recorded twice.
    ended: Arc<AtomicBool>,
    /// `embedded`, or the upstream serving the call.
    backend: Arc<Mutex<String>>,
    /// What the call was charged once settled, in nanos of its currency.
    charged: Arc<AtomicI64>,
}

/// What a call that ended early is charged for.
enum Spent {
    /// Tokens used so far, the prompt as admission counted it.
    SoFar(Used),
    /// Tokens counted by the backend.
    Counted(TokenCounts),
}

/// Tokens a call used so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Used {
    /// Whether the prompt was processed (a first token came out).
    pub prompt_done: bool,
    /// Of the prompt, tokens served from the prefix cache (known once the
    /// prompt is processed).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

impl Used {
    /// What to charge for a call of `prompt_tokens` that stopped here: the
    /// prompt only once it was processed, with its cached part priced as such.
    fn tokens(&self, prompt_tokens: u64) -> TokenCounts {
        let prompt = if self.prompt_done { prompt_tokens } else { 0 };
        TokenCounts {
            prompt,
            cached: (self.cached_tokens as u64).min(prompt),
            completion: self.completion_tokens as u64,
        }
    }
}

impl CallContext {
    pub fn new(
        state: SharedState,
        request_id: String,
        endpoint: &'static str,
        model: String,
        principal: Arc<Principal>,
    ) -> CallContext {
        let received = Instant::now();
        CallContext {
            admission: Arc::new(AdmissionSlot {
                state: state.clone(),
                received,
                inner: Mutex::new(None),
                used: Mutex::new(Used::default()),
            }),
            state,
            request_id,
            endpoint,
            model,
            received,
            principal,
            rate: Arc::new(Mutex::new(RateStatus::default())),
            ended: Arc::new(AtomicBool::new(false)),
            backend: Arc::new(Mutex::new(EMBEDDED_BACKEND.to_string())),
            charged: Arc::new(AtomicI64::new(0)),
        }
    }

    /// What the call was charged, in nanos of its price's currency (0
    /// before it is settled, or for a model without a price).
    pub fn charged_nanos(&self) -> i64 {
        self.charged.load(Ordering::Relaxed)
    }

    fn limits(&self) -> Vec<Limit> {
        let p = &self.principal;
        let mut limits = vec![Limit {
            subject: format!("tenant:{}", p.tenant.id),
            requests_per_minute: p.tenant.limits.requests_per_minute,
            tokens_per_minute: p.tenant.limits.tokens_per_minute,
        }];
        if let Some(k) = &p.key {
            limits.push(Limit {
                subject: format!("key:{}", k.id),
                requests_per_minute: k.limits.requests_per_minute,
                tokens_per_minute: k.limits.tokens_per_minute,
            });
        }
        limits
    }

    /// The `x-ratelimit-*` headers for the response.
    pub fn rate_headers(&self) -> Vec<(&'static str, String)> {
        self.rate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .headers()
    }

    /// Admits a call to the embedded engine; see [`CallContext::admit_to`].
    pub async fn admit(&self, prompt_tokens: usize, max_tokens: usize) -> Result<(), ApiError> {
        self.admit_to(prompt_tokens, max_tokens, EMBEDDED_BACKEND)
            .await
    }

    /// Admits the call to `backend`: rate limits first, then the worst-case
    /// cost is reserved against the tenant's and key's budgets.
    pub async fn admit_to(
        &self,
        prompt_tokens: usize,
        max_tokens: usize,
        backend: &str,
    ) -> Result<(), ApiError> {
        *self.backend.lock().unwrap_or_else(PoisonError::into_inner) = backend.to_string();
        let started = Instant::now();
        let result = self.admit_inner(prompt_tokens, max_tokens, backend).await;
        self.state
            .metrics
            .phase
            .with_label_values(&["admission"])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn admit_inner(
        &self,
        prompt_tokens: usize,
        max_tokens: usize,
        backend: &str,
    ) -> Result<(), ApiError> {
        let meter = &self.state.meter;
        let limits = self.limits();
        let tokens = (prompt_tokens + max_tokens) as u64;
        match meter.acquire_rate(&limits, tokens).await? {
            Ok(status) => *self.rate.lock().unwrap_or_else(PoisonError::into_inner) = status,
            Err(refusal) => {
                self.state
                    .metrics
                    .refusals
                    .with_label_values(&["rate_limit"])
                    .inc();
                let mut e = ApiError::new(ErrorCode::RateLimitExceeded, refusal.message);
                if let Some(wait) = refusal.retry_after {
                    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                    e = e
                        .with_header("retry-after", secs)
                        .with_header("retry-after-ms", wait.as_millis().max(1));
                }
                e.headers.extend(refusal.status.headers());
                return Err(e);
            }
        }
        let req = ReservationRequest {
            caller: self.principal.caller(),
            request_id: self.request_id.clone(),
            endpoint: self.endpoint.to_string(),
            model: self.model.clone(),
            backend: backend.to_string(),
            prompt_tokens: prompt_tokens as u64,
            max_completion_tokens: max_tokens as u64,
        };
        let db = meter.db.clone();
        let replica = meter.replica_id.clone();
        let reserved = run_store(&meter.db, move || db.reserve(&replica, &req)).await;
        let refund_all = || {
            meter.refund_rate(&limits, tokens, true);
        };
        let reserved = match reserved {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                refund_all();
                return Err(store_unavailable(e));
            }
            Err(e) => {
                refund_all();
                return Err(e);
            }
        };
        match reserved {
            Ok(res) => {
                *self
                    .admission
                    .inner
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Admission {
                    reservation_id: res.id,
                    limits,
                    tokens_taken: tokens,
                    prompt_tokens: prompt_tokens as u64,
                });
                Ok(())
            }
            Err(refusal) => {
                refund_all();
                let reason = match refusal {
                    Refusal::InsufficientCredit { .. } => "insufficient_credit",
                    Refusal::MonthlyLimit { .. } => "monthly_limit",
                    Refusal::AccountDisabled { .. } => "account_disabled",
                };
                self.state
                    .metrics
                    .refusals
                    .with_label_values(&[reason])
                    .inc();
                let code = match refusal {
                    Refusal::AccountDisabled { .. } => ErrorCode::AccountDisabled,
                    _ => ErrorCode::InsufficientQuota,
                };
                Err(ApiError::new(code, refusal.message(&meter.currency)))
            }
        }
    }

    fn take_admission(&self) -> Option<Admission> {
        self.ended.store(true, Ordering::Release);
        self.admission
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Records what a running call has used, for settling it if the client
    /// goes away.
    pub fn progress(&self, used: Used) {
        *self
            .admission
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = used;
    }

    /// The settlement of `a` for `tokens` (the cached part kept within the
    /// prompt, whoever counted it).
    fn settlement(
        &self,
        a: &Admission,
        outcome: Outcome,
        tokens: TokenCounts,
        ttft: Option<Duration>,
    ) -> Settlement {
        Settlement {
            reservation_id: a.reservation_id.clone(),
            outcome,
            tokens: TokenCounts {
                cached: tokens.cached.min(tokens.prompt),
                ..tokens
            },
            latency_ms: millis(self.received.elapsed()),
            ttft_ms: ttft.map(millis),
        }
    }

    /// Commits a settlement; on failure the call is re-settled later as
    /// failed (at no charge) and the client gets an error instead of its
    /// response.
    async fn settle(&self, a: Admission, s: Settlement) -> Result<(), ApiError> {
        let meter = &self.state.meter;
        let used = s.tokens.prompt + s.tokens.completion;
        meter.refund_rate(&a.limits, a.tokens_taken.saturating_sub(used), false);
        let cost_model = self.model.clone();
        let db = meter.db.clone();
        let s2 = s.clone();
        let started = Instant::now();
        let result = run_store(&meter.db, move || db.settle(&s2)).await;
        self.state
            .metrics
            .phase
            .with_label_values(&["settlement"])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(entry)) => {
                if let Some(e) = entry {
                    self.charged.store(e.record.cost.nanos(), Ordering::Relaxed);
                    self.state
                        .metrics
                        .cost_nanos
                        .with_label_values(&[&cost_model])
                        .inc_by(e.record.cost.nanos().max(0) as u64);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, request_id = %self.request_id, "settling the call failed");
                meter.defer(Settlement {
                    outcome: Outcome::Error(ErrorCode::LedgerUnavailable.as_str().into()),
                    tokens: TokenCounts::default(),
                    ..s
                });
                Err(store_unavailable(e))
            }
            Err(_) => Err(ApiError::internal()),
        }
    }

    /// A generation finished; must be awaited before its last bytes go out.
    pub async fn finished(
        &self,
        c: &Completion,
        first_token: Option<Duration>,
    ) -> Result<(), ApiError> {
        let outcome = match c.finish_reason {
            FinishReason::Stop => Outcome::Stop,
            FinishReason::Length => Outcome::Length,
        };
        let Some(a) = self.take_admission() else {
            tracing::error!(request_id = %self.request_id, "a call finished without being admitted");
            return Err(ApiError::internal());
        };
        let tokens = TokenCounts {
            prompt: c.prompt_tokens as u64,
            cached: c.cached_tokens as u64,
            completion: c.completion_tokens as u64,
        };
        let s = self.settlement(&a, outcome, tokens, first_token);
        self.settle(a, s).await
    }

    /// A call to an upstream finished with the tokens it reported (or that
    /// were counted); must be awaited before its last bytes go out.
    pub async fn settle_tokens(
        &self,
        tokens: TokenCounts,
        outcome: Outcome,
        first_token: Option<Duration>,
    ) -> Result<(), ApiError> {
        let Some(a) = self.take_admission() else {
            return Err(ApiError::internal());
        };
        let s = self.settlement(&a, outcome, tokens, first_token);
        self.settle(a, s).await
    }

    /// Embeddings computed; must be awaited before the response goes out.
    pub async fn embedded(&self, prompt_tokens: usize) -> Result<(), ApiError> {
        let Some(a) = self.take_admission() else {
            return Err(ApiError::internal());
        };
        let tokens = TokenCounts {
            prompt: prompt_tokens as u64,
            ..TokenCounts::default()
        };
        let s = self.settlement(&a, Outcome::Ok, tokens, None);
        self.settle(a, s).await
    }

    /// The call failed with `code` after using `used`.
    pub fn failed(&self, code: &str, used: Used) {
        let outcome = Outcome::Error(code.to_string());
        self.end_in_background(outcome, Spent::SoFar(used), None);
    }

    /// The client went away after `used`.
    pub fn cancelled(&self, used: Used, first_token: Option<Duration>) {
        self.end_in_background(Outcome::Cancelled, Spent::SoFar(used), first_token);
    }

    /// The call ended early with `outcome` (an error, or `cancelled`) after
    /// using `tokens`, counted by the caller (an upstream's report).
    pub fn ended_early(
        &self,
        outcome: Outcome,
        tokens: TokenCounts,
        first_token: Option<Duration>,
    ) {
        self.end_in_background(outcome, Spent::Counted(tokens), first_token);
    }

    fn end_in_background(&self, outcome: Outcome, spent: Spent, first_token: Option<Duration>) {
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        match self.take_admission() {
            Some(a) => {
                let tokens = match spent {
                    Spent::SoFar(used) => used.tokens(a.prompt_tokens),
                    Spent::Counted(t) => t,
                };
                let s = self.settlement(&a, outcome, tokens, first_token);
                let call = self.clone();
                runtime.spawn(async move {
                    let _ = call.settle(a, s).await;
                });
            }
            None => {
                let record = CallRecord {
                    created_at_ms: kiln_store::now_ms(),
                    request_id: self.request_id.clone(),
                    endpoint: self.endpoint.to_string(),
                    model: self.model.clone(),
                    prompt_tokens: 0,
                    cached_tokens: 0,
                    completion_tokens: 0,
                    outcome,
                    latency_ms: millis(self.received.elapsed()),
                    ttft_ms: None,
                    caller: Some(self.principal.caller()),
                    backend: self
                        .backend
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone(),
                    prices: None,
                    cost: kiln_store::money::Money::ZERO,
                };
                let db = self.state.meter.db.clone();
                runtime.spawn_blocking(move || {
                    if let Err(e) = db.record_call(&record) {
                        tracing::error!(error = %e, request_id = %record.request_id, "recording the call failed");
                    }
                });
            }
        }
    }
}

/// Runs a short store call (a transaction of well under a millisecond) for
/// a request. The embedded store's run in place on the async thread,
/// refusing to wait ([`kiln_store::without_waiting`]): handing a call to
/// another thread costs thread wake-ups, which on a busy two-core machine
/// were most of the gateway's latency (8.5 context switches a request,
/// against 3 in place). A call that would wait (the connection held by a
/// long report, the file locked by another process), and every call to a
/// networked store, runs where blocking is allowed instead: in place with
/// the runtime told this worker blocks (its other tasks move on), or on the
/// blocking pool outside the multi-threaded runtime.
async fn run_store<T, F>(
    db: &Arc<dyn Database>,
    f: F,
) -> Result<Result<T, kiln_store::StoreError>, ApiError>
where
    T: Send + 'static,
    F: Fn() -> Result<T, kiln_store::StoreError> + Send + 'static,
{
    use tokio::runtime::{Handle, RuntimeFlavor};
    if db.answers_without_waiting() {
        match kiln_store::without_waiting(&f) {
            Err(e) if e.would_wait() => {}
            done => return Ok(done),
        }
    }
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => Ok(tokio::task::block_in_place(f)),
        _ => tokio::task::spawn_blocking(f)
            .await
            .map_err(|_| ApiError::internal()),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
