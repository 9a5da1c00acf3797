//! Who is calling: the API key in `Authorization: Bearer ...` resolved to a
//! [`Principal`] (the key and its tenant).
//!
//! Keys are looked up by the SHA-256 of the secret and cached in memory.
//! Every replica polls the store's `auth_epoch` (moved by any change to a
//! tenant or key) every [`EPOCH_POLL`] and drops its whole cache when it
//! moved, so a revocation, rotation or tenant suspension made on any replica
//! (or by `kiln keys` on the database) takes effect everywhere within that
//! interval. Expiry is checked against the clock on every request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::http::{header, HeaderMap};
use kiln_store::accounts::{secret_hash, ApiKey, KeyOwner, Role, Tenant, SECRET_PREFIX};
use kiln_store::billing::Caller;
use kiln_store::Database;
use kiln_types::error::ErrorCode;

use crate::error::ApiError;

/// How often each replica checks for changed keys and tenants.
pub const EPOCH_POLL: Duration = Duration::from_millis(250);
/// Most cached lookups (found or not) before the cache is emptied: bounds
/// the memory a stream of random keys can take.
const CACHE_LIMIT: usize = 100_000;
/// The tenant calls are charged to under `--no-auth`.
pub const LOCAL_TENANT: &str = "local";
/// The tenant the platform admin key belongs to.
pub const PLATFORM_TENANT: &str = "platform";

/// The caller of a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant: Tenant,
    /// `None` under `--no-auth`.
    pub key: Option<ApiKey>,
}

impl Principal {
    pub fn caller(&self) -> Caller {
        Caller {
            tenant_id: self.tenant.id.clone(),
            key_id: self.key.as_ref().map(|k| k.id.clone()),
        }
    }

    /// The scheduling priority of the key's requests (0 without a key).
    pub fn priority(&self) -> i32 {
        self.key.as_ref().map_or(0, |k| k.priority)
    }

    pub fn role(&self) -> Role {
        self.key.as_ref().map_or(Role::Member, |k| k.role)
    }

    /// A key restricted to some models may call only those.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        match &self.key {
            Some(k) if !k.allows_model(model) => Err(ApiError {
                code: ErrorCode::PermissionDenied,
                message: format!("this API key may not use the model `{model}`"),
                param: Some("model"),
                headers: Vec::new(),
            }),
            _ => Ok(()),
        }
    }

    /// Whether the principal may manage `tenant_id`.
    pub fn may_manage(&self, tenant_id: &str) -> bool {
        match self.role() {
            Role::PlatformAdmin => true,
            Role::TenantAdmin => self.tenant.id == tenant_id,
            Role::Member => false,
        }
    }
}

/// Looked-up keys by secret hash (`None` remembers an unknown key). Each
/// emptying starts a new generation, and a lookup that began in an earlier
/// one is not stored: it may have read the key before the change that
/// emptied the cache, and would otherwise outlive it.
#[derive(Default)]
struct KeyCache {
    /// The generation, and the lookups made in it.
    inner: RwLock<(u64, Lookups)>,
}

/// Key lookups by secret hash.
type Lookups = HashMap<String, Option<Arc<KeyOwner>>>;

impl KeyCache {
    fn get(&self, hash: &str) -> Option<Option<Arc<KeyOwner>>> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner.1.get(hash).cloned()
    }

    /// The generation a lookup starts in; pass it to [`KeyCache::insert`].
    fn generation(&self) -> u64 {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).0
    }

    fn insert(&self, since: u64, hash: String, owner: Option<Arc<KeyOwner>>) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if inner.0 != since {
            return;
        }
        if inner.1.len() >= CACHE_LIMIT {
            inner.1.clear();
        }
        inner.1.insert(hash, owner);
    }

    fn clear(&self) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        inner.0 += 1;
        inner.1.clear();
    }
}

pub struct Auth {
    db: Arc<dyn Database>,
    cache: KeyCache,
    epoch: AtomicI64,
    /// Under `--no-auth`: every `/v1` request is this principal.
    anonymous: Option<Arc<Principal>>,
}

impl Auth {
    pub fn new(
        db: Arc<dyn Database>,
        anonymous: Option<Principal>,
    ) -> Result<Auth, kiln_store::StoreError> {
        let epoch = db.auth_epoch()?;
        Ok(Auth {
            db,
            cache: KeyCache::default(),
            epoch: AtomicI64::new(epoch),
            anonymous: anonymous.map(Arc::new),
        })
    }

    /// Whether `/v1` accepts requests without a key.
    pub fn is_open(&self) -> bool {
        self.anonymous.is_some()
    }

    /// The principal for `/v1`: the anonymous one under `--no-auth` when no
    /// key is sent (a key that is sent is still checked).
    pub async fn for_model_api(&self, headers: &HeaderMap) -> Result<Arc<Principal>, ApiError> {
        match (&self.anonymous, bearer(headers)?) {
            (Some(p), None) => Ok(p.clone()),
            (_, secret) => self.by_secret(secret).await,
        }
    }

    /// The principal for `/api`: a key is always required.
    pub async fn for_admin_api(&self, headers: &HeaderMap) -> Result<Arc<Principal>, ApiError> {
        self.by_secret(bearer(headers)?).await
    }

    async fn by_secret(&self, secret: Option<&str>) -> Result<Arc<Principal>, ApiError> {
        let Some(secret) = secret else {
            return Err(ApiError::new(
                ErrorCode::MissingApiKey,
                "no API key: send `Authorization: Bearer <key>`",
            ));
        };
        let hash = secret_hash(secret);
        let owner = match self.cache.get(&hash) {
            Some(found) => found,
            None => {
                let since = self.cache.generation();
                let db = self.db.clone();
                let lookup = hash.clone();
                let found = tokio::task::spawn_blocking(move || db.key_by_hash(&lookup))
                    .await
                    .map_err(|_| ApiError::internal())?
                    .map_err(crate::error::store_unavailable)?
                    .map(Arc::new);
                self.cache.insert(since, hash, found.clone());
                found
            }
        };
        let invalid =
            |why: &str| ApiError::new(ErrorCode::InvalidApiKey, format!("the API key {why}"));
        let Some(owner) = owner else {
            let hint = if secret.starts_with(SECRET_PREFIX) {
                ""
            } else {
                " (Kiln keys begin with `kiln-sk-`)"
            };
            return Err(invalid(&format!("is not valid{hint}")));
        };
        if let Some(why) = owner.key.unusable_because(kiln_store::now_ms()) {
            return Err(invalid(why));
        }
        if owner.tenant.disabled_at_ms.is_some() {
            return Err(ApiError::new(
                ErrorCode::AccountDisabled,
                format!("the tenant `{}` is disabled", owner.tenant.name),
            ));
        }
        Ok(Arc::new(Principal {
            tenant: owner.tenant.clone(),
            key: Some(owner.key.clone()),
        }))
    }

    /// Checks the epoch once; empties the cache when it moved.
    pub fn poll_epoch(&self) {
        match self.db.auth_epoch() {
            Ok(e) => {
                if self.epoch.swap(e, Ordering::AcqRel) != e {
                    self.cache.clear();
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the auth epoch"),
        }
    }

    /// Polls the epoch every [`EPOCH_POLL`] until the runtime stops.
    pub fn spawn_epoch_watch(self: &Arc<Self>) {
        let auth = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EPOCH_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let a = auth.clone();
                let _ = tokio::task::spawn_blocking(move || a.poll_epoch()).await;
            }
        });
    }
}

/// The key in `Authorization: Bearer <key>` (or `api-key: <key>`, as Azure
/// OpenAI clients send it). A malformed header is an error, not "no key".
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let bad = || {
        ApiError::new(
            ErrorCode::InvalidApiKey,
            "the Authorization header must be `Bearer <key>`",
        )
    };
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let text = v.to_str().map_err(|_| bad())?;
        let (scheme, key) = text.trim().split_once(' ').ok_or_else(bad)?;
        if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
            return Err(bad());
        }
        return Ok(Some(key.trim()));
    }
    match headers.get("api-key") {
        Some(v) => Ok(Some(v.to_str().map_err(|_| bad())?.trim())),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                *k,
                HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")),
            );
        }
        h
    }

    /// A lookup that began before the cache was emptied (by a revocation
    /// seen in the epoch) does not put what it read back in the cache.
    #[test]
    fn a_lookup_from_before_an_emptying_is_not_kept() {
        let cache = KeyCache::default();
        let before = cache.generation();
        cache.clear();
        cache.insert(before, "stale".into(), None);
        assert!(cache.get("stale").is_none(), "the stale lookup was kept");
        let now = cache.generation();
        cache.insert(now, "fresh".into(), None);
        assert!(cache.get("fresh").is_some());
        cache.clear();
        assert!(cache.get("fresh").is_none());
    }

    #[test]
    fn bearer_forms() {
        let ok = headers(&[("authorization", "Bearer kiln-sk-abc")]);
        assert_eq!(bearer(&ok).ok().flatten(), Some("kiln-sk-abc"));
        let lower = headers(&[("authorization", "bearer  kiln-sk-abc ")]);
        assert_eq!(bearer(&lower).ok().flatten(), Some("kiln-sk-abc"));
        assert!(bearer(&headers(&[("authorization", "Basic abc")])).is_err());
        assert!(bearer(&headers(&[("authorization", "Bearer")])).is_err());
        assert!(bearer(&headers(&[("authorization", "Bearer ")])).is_err());
        assert_eq!(bearer(&headers(&[])).ok().flatten(), None);
        let azure = headers(&[("api-key", "kiln-sk-x")]);
        assert_eq!(bearer(&azure).ok().flatten(), Some("kiln-sk-x"));
    }
}
