//! Requests-per-minute and tokens-per-minute limits, per key and per tenant.
//!
//! Each limit is a token bucket holding up to one minute's allowance and
//! refilling continuously at limit/60 per second, so a client may burst up to
//! its per-minute allowance and then proceeds at the steady rate. A request
//! takes one request and its worst-case tokens (prompt plus `max_tokens`) from
//! every bucket that applies, all or nothing; when it ends, the tokens it did
//! not use are given back.
//!
//! With SQLite the buckets live in this process, which is exact for the one
//! replica; with PostgreSQL they live in the database
//! ([`kiln_store::billing::SharedRateLimits`], one row lock per bucket), so
//! replicas share one allowance.

use std::collections::HashMap;

use kiln_store::billing::{RateKind, RateLevel, RateOutcome, RateTake, SharedRateLimits};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One subject's limits (a key or a tenant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// `key:<id>` or `tenant:<id>`.
    pub subject: String,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

impl Limit {
    fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    capacity: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn new(capacity: u32, now: Instant) -> Bucket {
        Bucket {
            capacity: f64::from(capacity),
            level: f64::from(capacity),
            updated: now,
        }
    }

    /// Per second.
    fn rate(&self) -> f64 {
        self.capacity / 60.0
    }

    fn refill(&mut self, capacity: u32, now: Instant) {
        let capacity = f64::from(capacity);
        if capacity != self.capacity {
            // A changed limit applies at once, without a fresh burst.
            self.level = self.level.min(capacity);
            self.capacity = capacity;
        }
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.rate()).min(self.capacity);
        self.updated = now;
    }

    /// Seconds until `amount` is available.
    fn wait_for(&self, amount: f64) -> f64 {
        if self.level >= amount {
            0.0
        } else {
            (amount - self.level) / self.rate()
        }
    }

    fn until_full(&self) -> Duration {
        Duration::try_from_secs_f64(((self.capacity - self.level) / self.rate()).max(0.0))
            .unwrap_or(Duration::from_secs(60))
    }
}

#[derive(Debug, Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// What the response headers report: the tightest applicable limit.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RateStatus {
    pub requests: Option<(u32, u64, Duration)>,
    pub tokens: Option<(u32, u64, Duration)>,
}

impl RateStatus {
    /// OpenAI's `x-ratelimit-*` headers.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if let Some((limit, remaining, reset)) = self.requests {
            h.push(("x-ratelimit-limit-requests", limit.to_string()));
            h.push(("x-ratelimit-remaining-requests", remaining.to_string()));
            h.push(("x-ratelimit-reset-requests", format_reset(reset)));
        }
        if let Some((limit, remaining, reset)) = self.tokens {
            h.push(("x-ratelimit-limit-tokens", limit.to_string()));
            h.push(("x-ratelimit-remaining-tokens", remaining.to_string()));
            h.push(("x-ratelimit-reset-tokens", format_reset(reset)));
        }
        h
    }

    fn note(slot: &mut Option<(u32, u64, Duration)>, limit: u32, b: &Bucket) {
        let remaining = b.level.max(0.0).floor() as u64;
        if slot.is_none_or(|(_, r, _)| remaining < r) {
            *slot = Some((limit, remaining, b.until_full()));
        }
    }
}

/// `1.5s`, `6m0s`: the duration format OpenAI's reset headers use.
fn format_reset(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let ms = (secs * 1000.0).ceil() / 1000.0;
        format!("{ms}s")
    } else {
        let whole = secs.ceil() as u64;
        format!("{}m{}s", whole / 60, whole % 60)
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRefusal {
    pub message: String,
    /// `None` when waiting cannot help (the request is larger than a
    /// minute's allowance).
    pub retry_after: Option<Duration>,
    pub status: RateStatus,
}

#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Buckets>>,
}

impl RateLimiter {
    /// Takes one request and `tokens` from every bucket in `limits`, or
    /// nothing.
    pub fn acquire(&self, limits: &[Limit], tokens: u64) -> Result<RateStatus, RateRefusal> {
        self.acquire_at(limits, tokens, Instant::now())
    }

    fn acquire_at(
        &self,
        limits: &[Limit],
        tokens: u64,
        now: Instant,
    ) -> Result<RateStatus, RateRefusal> {
        if limits.iter().all(Limit::is_empty) {
            return Ok(RateStatus::default());
        }
        let mut map = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let want = tokens as f64;
        let mut wait = 0.0f64;
        let mut reason = None;
        for l in limits.iter().filter(|l| !l.is_empty()) {
            let b = map.entry(l.subject.clone()).or_default();
            if let Some(rpm) = l.requests_per_minute {
                let bucket = b.requests.get_or_insert_with(|| Bucket::new(rpm, now));
                bucket.refill(rpm, now);
                let w = bucket.wait_for(1.0);
                if w > 0.0 {
                    wait = wait.max(w);
                    reason.get_or_insert(format!(
                        "the limit of {rpm} requests per minute for this {} is reached",
                        kind(&l.subject)
                    ));
                }
            }
            if let Some(tpm) = l.tokens_per_minute {
                let bucket = b.tokens.get_or_insert_with(|| Bucket::new(tpm, now));
                bucket.refill(tpm, now);
                if want > f64::from(tpm) {
                    let status = status_of(&map, limits);
                    return Err(RateRefusal {
                        message: format!(
                            "this request may use {tokens} tokens (prompt plus max_tokens), more than the limit of {tpm} tokens per minute for this {}; lower max_tokens",
                            kind(&l.subject)
                        ),
                        retry_after: None,
                        status,
                    });
                }
                let w = bucket.wait_for(want);
                if w > 0.0 {
                    wait = wait.max(w);
                    reason.get_or_insert(format!(
                        "the limit of {tpm} tokens per minute for this {} is reached",
                        kind(&l.subject)
                    ));
                }
            }
        }
        if let Some(message) = reason {
            return Err(RateRefusal {
                message,
                retry_after: Some(
                    Duration::try_from_secs_f64(wait).unwrap_or(Duration::from_secs(60)),
                ),
                status: status_of(&map, limits),
            });
        }
        for l in limits {
            if let Some(b) = map.get_mut(&l.subject) {
                if let Some(r) = b.requests.as_mut() {
                    r.level -= 1.0;
                }
                if let Some(t) = b.tokens.as_mut() {
                    t.level -= want;
                }
            }
        }
        Ok(status_of(&map, limits))
    }

    /// Gives back the request a refused or failed-to-admit call took.
    pub fn refund_request(&self, limits: &[Limit]) {
        let mut map = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for l in limits {
            if let Some(r) = map.get_mut(&l.subject).and_then(|b| b.requests.as_mut()) {
                r.level = (r.level + 1.0).min(r.capacity);
            }
        }
    }

    /// Gives back tokens a request took but did not use.
    pub fn refund(&self, limits: &[Limit], tokens: u64) {
        if tokens == 0 || limits.iter().all(|l| l.tokens_per_minute.is_none()) {
            return;
        }
        let mut map = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for l in limits {
            if let Some(t) = map.get_mut(&l.subject).and_then(|b| b.tokens.as_mut()) {
                t.level = (t.level + tokens as f64).min(t.capacity);
            }
        }
    }
}

/// The amounts a request takes from each bucket that applies.
pub fn takes(limits: &[Limit], tokens: u64) -> Vec<RateTake> {
    let mut out = Vec::new();
    for l in limits {
        if let Some(rpm) = l.requests_per_minute {
            out.push(RateTake {
                subject: l.subject.clone(),
                kind: RateKind::Requests,
                per_minute: rpm,
                amount: 1,
            });
        }
        if let Some(tpm) = l.tokens_per_minute {
            out.push(RateTake {
                subject: l.subject.clone(),
                kind: RateKind::Tokens,
                per_minute: tpm,
                amount: tokens,
            });
        }
    }
    out
}

/// A request larger than a minute's token allowance: waiting cannot help.
pub fn too_large(limits: &[Limit], tokens: u64) -> Option<RateRefusal> {
    limits.iter().find_map(|l| {
        let tpm = l.tokens_per_minute?;
        (tokens > u64::from(tpm)).then(|| RateRefusal {
            message: format!(
                "this request may use {tokens} tokens (prompt plus max_tokens), more than the limit of {tpm} tokens per minute for this {}; lower max_tokens",
                kind(&l.subject)
            ),
            retry_after: None,
            status: RateStatus::default(),
        })
    })
}

/// Takes from the database's buckets (replicas sharing PostgreSQL).
pub fn acquire_shared(
    shared: &dyn SharedRateLimits,
    limits: &[Limit],
    tokens: u64,
) -> Result<Result<RateStatus, RateRefusal>, kiln_store::StoreError> {
    if let Some(r) = too_large(limits, tokens) {
        return Ok(Err(r));
    }
    let takes = takes(limits, tokens);
    if takes.is_empty() {
        return Ok(Ok(RateStatus::default()));
    }
    let status_of = |levels: &[RateLevel]| {
        let mut s = RateStatus::default();
        for l in levels {
            let slot = match l.kind {
                RateKind::Requests => &mut s.requests,
                RateKind::Tokens => &mut s.tokens,
            };
            if slot.is_none_or(|(_, r, _)| l.remaining < r) {
                *slot = Some((l.per_minute, l.remaining, Duration::from_millis(l.reset_ms)));
            }
        }
        s
    };
    Ok(match shared.take(&takes, kiln_store::now_ms())? {
        RateOutcome::Taken(levels) => Ok(status_of(&levels)),
        RateOutcome::Refused {
            wait_ms,
            short,
            levels,
        } => Err(RateRefusal {
            message: format!(
                "the limit of {} {} per minute for this {} is reached",
                short.per_minute,
                short.kind.as_str(),
                kind(&short.subject)
            ),
            retry_after: Some(Duration::from_millis(wait_ms)),
            status: status_of(&levels),
        }),
    })
}

fn kind(subject: &str) -> &str {
    subject.split(':').next().unwrap_or("key")
}

fn status_of(map: &HashMap<String, Buckets>, limits: &[Limit]) -> RateStatus {
    let mut s = RateStatus::default();
    for l in limits {
        let Some(b) = map.get(&l.subject) else {
            continue;
        };
        if let (Some(rpm), Some(bucket)) = (l.requests_per_minute, &b.requests) {
            RateStatus::note(&mut s.requests, rpm, bucket);
        }
        if let (Some(tpm), Some(bucket)) = (l.tokens_per_minute, &b.tokens) {
            RateStatus::note(&mut s.tokens, tpm, bucket);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(subject: &str, rpm: Option<u32>, tpm: Option<u32>) -> Limit {
        Limit {
            subject: subject.into(),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    #[test]
    fn requests_burst_then_refill() {
        let rl = RateLimiter::default();
        let t0 = Instant::now();
        let l = [limit("key:a", Some(3), None)];
        for left in [2, 1, 0] {
            let s = rl.acquire_at(&l, 10, t0).map_err(|r| r.message);
            assert_eq!(s.map(|s| s.requests.map(|r| r.1)), Ok(Some(left)));
        }
        let refused = rl.acquire_at(&l, 10, t0).err();
        let wait = refused.as_ref().and_then(|r| r.retry_after);
        // 3 per minute: one more after 20 s.
        assert!(
            wait.is_some_and(|w| (w.as_secs_f64() - 20.0).abs() < 0.01),
            "{wait:?}"
        );
        assert!(rl.acquire_at(&l, 10, t0 + Duration::from_secs(21)).is_ok());
    }

    #[test]
    fn tokens_are_all_or_nothing_and_refunded() {
        let rl = RateLimiter::default();
        let t0 = Instant::now();
        let key = limit("key:a", None, Some(1000));
        let tenant = limit("tenant:t", Some(100), Some(500));
        let both = [key.clone(), tenant.clone()];
        assert!(rl.acquire_at(&both, 400, t0).is_ok());
        // The tenant has 100 left: refused, and the key keeps its 600.
        assert!(rl.acquire_at(&both, 200, t0).is_err());
        let s = rl.acquire_at(std::slice::from_ref(&key), 600, t0);
        assert_eq!(s.map(|s| s.tokens.map(|t| t.1)).ok(), Some(Some(0)));
        rl.refund(&both, 300);
        let s = rl.acquire_at(&[tenant], 350, t0);
        assert_eq!(s.map(|s| s.tokens.map(|t| t.1)).ok(), Some(Some(50)));
        // Larger than a minute's allowance: waiting cannot help.
        let huge = rl.acquire_at(&[key], 5000, t0).err();
        assert!(huge.is_some_and(|r| r.retry_after.is_none() && r.message.contains("5000")));
    }

    #[test]
    fn no_limits_no_bookkeeping() {
        let rl = RateLimiter::default();
        let s = rl.acquire(&[limit("key:a", None, None)], 1 << 40);
        assert_eq!(s, Ok(RateStatus::default()));
        assert!(rl.buckets.lock().map(|m| m.is_empty()).unwrap_or(false));
    }

    #[test]
    fn headers_use_openai_names() {
        let s = RateStatus {
            requests: Some((60, 59, Duration::from_millis(1000))),
            tokens: Some((1000, 10, Duration::from_secs(90))),
        };
        let h = s.headers();
        assert!(h.contains(&("x-ratelimit-remaining-requests", "59".into())));
        assert!(h.contains(&("x-ratelimit-reset-requests", "1s".into())));
        assert!(h.contains(&("x-ratelimit-reset-tokens", "1m30s".into())));
    }
}
