//! Tenants and their API keys ([`Accounts`]).
//!
//! A key is a long random secret shown once when it is made; the store keeps
//! only its SHA-256 and a short prefix for listings. Every change to a tenant
//! or key moves the platform's `auth_epoch`, which servers poll to drop the
//! keys they cached: a revocation reaches every replica within one poll.

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::money::Money;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, for every tenant.
    PlatformAdmin,
    /// Manage its own tenant's keys and read its usage; call models.
    TenantAdmin,
    /// Call models.
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::PlatformAdmin => "platform_admin",
            Role::TenantAdmin => "tenant_admin",
            Role::Member => "member",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "platform_admin" => Some(Role::PlatformAdmin),
            "tenant_admin" => Some(Role::TenantAdmin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

/// Spending and rate settings shared by tenants and keys. `None` is "no
/// limit" (for a balance: no prepaid balance, usage is billed afterwards).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Limits {
    pub monthly_limit: Option<Money>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    /// `ten-<32 hex digits>`.
    pub id: String,
    pub name: String,
    pub created_at_ms: i64,
    pub disabled_at_ms: Option<i64>,
    /// Prepaid credit left; `None`: no prepaid balance.
    pub balance: Option<Money>,
    /// Worst-case cost of calls admitted and not yet settled.
    pub reserved: Money,
    #[serde(flatten)]
    pub limits: Limits,
}

/// A key as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// `key-<32 hex digits>`.
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// The secret's first characters, to recognise it.
    pub prefix: String,
    pub role: Role,
    /// Models it may use; `None`: all.
    pub models: Option<Vec<String>>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub rotated_at_ms: Option<i64>,
    pub balance: Option<Money>,
    pub reserved: Money,
    #[serde(flatten)]
    pub limits: Limits,
    /// Scheduling priority of its requests, and the most they may ask for.
    #[serde(default)]
    pub priority: i32,
    /// Knowledge-base groups: documents restricted to one of them are
    /// visible to this key.
    #[serde(default)]
    pub groups: Vec<String>,
}

impl ApiKey {
    /// Why the key cannot be used at `now_ms`, if it cannot.
    pub fn unusable_because(&self, now_ms: i64) -> Option<&'static str> {
        if self.revoked_at_ms.is_some() {
            Some("has been revoked")
        } else if self.expires_at_ms.is_some_and(|t| t <= now_ms) {
            Some("has expired")
        } else {
            None
        }
    }

    /// Whether the key may call `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

/// A key and its tenant, as authentication needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    pub key: ApiKey,
    pub tenant: Tenant,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NewTenant {
    pub name: String,
    #[serde(flatten)]
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewKey {
    pub tenant_id: String,
    pub name: String,
    pub role: Role,
    pub models: Option<Vec<String>>,
    pub expires_at_ms: Option<i64>,
    #[serde(flatten)]
    pub limits: Limits,
    /// Scheduling priority, -100 to 100 (default 0).
    #[serde(default)]
    pub priority: i32,
    /// Knowledge-base groups the key belongs to.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The range of key priorities.
pub const KEY_PRIORITIES: std::ops::RangeInclusive<i32> = -100..=100;

/// A group list as stored: a JSON array.
pub(crate) fn groups_json(groups: &[String]) -> String {
    serde_json::to_string(groups).unwrap_or_else(|_| "[]".into())
}

/// Group names: 1 to 128 printable characters without `,`, `=` or `*`;
/// at most 64 per key.
pub(crate) fn check_groups(groups: &[String]) -> crate::Result<()> {
    if groups.len() > 64 {
        return Err(crate::StoreError::Invalid(
            "a key may belong to at most 64 groups".into(),
        ));
    }
    for g in groups {
        if g.is_empty()
            || g.len() > 128
            || g.chars()
                .any(|c| c.is_control() || matches!(c, ',' | '=' | '*'))
        {
            return Err(crate::StoreError::Invalid(format!(
                "the group name `{}` is not allowed: use 1 to 128 printable characters without `,`, `=` or `*`",
                g.escape_debug()
            )));
        }
    }
    Ok(())
}

pub(crate) fn check_priority(priority: i32) -> crate::Result<()> {
    if KEY_PRIORITIES.contains(&priority) {
        Ok(())
    } else {
        Err(crate::StoreError::Invalid(format!(
            "a key's priority is {priority}; it must be between -100 and 100"
        )))
    }
}

/// Fields of a tenant to change; `None` leaves one as it is, `Some(None)`
/// clears a limit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TenantUpdate {
    pub name: Option<String>,
    pub disabled: Option<bool>,
    pub monthly_limit: Option<Option<Money>>,
    pub requests_per_minute: Option<Option<u32>>,
    pub tokens_per_minute: Option<Option<u32>>,
}

/// A key just made or rotated, with its secret: the only time it is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedKey {
    pub key: ApiKey,
    pub secret: String,
}

/// Where keys begin: recognisable in logs and by secret scanners.
pub const SECRET_PREFIX: &str = "kiln-sk-";
/// Random characters after the prefix (base62: about 238 bits).
const SECRET_RANDOM_CHARS: usize = 40;
/// Characters of a secret shown in listings.
const SHOWN_PREFIX_CHARS: usize = SECRET_PREFIX.len() + 6;

/// A fresh secret from the operating system's CSPRNG (through rand's
/// ChaCha-based thread generator, seeded from it).
pub fn new_secret() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let mut s = String::with_capacity(SECRET_PREFIX.len() + SECRET_RANDOM_CHARS);
    s.push_str(SECRET_PREFIX);
    for _ in 0..SECRET_RANDOM_CHARS {
        s.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
    }
    s
}

/// The stored form of a secret: lowercase hex SHA-256.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The part of a secret shown in listings.
pub fn shown_prefix(secret: &str) -> String {
    secret.chars().take(SHOWN_PREFIX_CHARS).collect()
}

/// A tenant name: 1 to 64 characters of letters, digits, `-`, `_` and `.`.
pub fn validate_name(what: &str, name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} `{name}` must be 1 to 64 letters, digits, `-`, `_` or `.`"
        ))
    }
}

/// Checks limits before they are stored: a monthly limit between 0 and
/// [`crate::money::MAX_AMOUNT`], per-minute limits of at least 1.
pub(crate) fn check_limits(l: &Limits) -> crate::Result<()> {
    if let Some(m) = l.monthly_limit {
        if m < Money::ZERO || !m.is_reasonable() {
            return Err(crate::StoreError::Invalid(format!(
                "the monthly limit {m} must be between 0 and {}",
                crate::money::MAX_AMOUNT
            )));
        }
    }
    for (what, v) in [
        ("requests_per_minute", l.requests_per_minute),
        ("tokens_per_minute", l.tokens_per_minute),
    ] {
        if v == Some(0) {
            return Err(crate::StoreError::Invalid(format!(
                "{what} must be at least 1 (leave it out for no limit)"
            )));
        }
    }
    Ok(())
}

/// Tenants and keys. Every method blocks.
pub trait Accounts: Send + Sync {
    fn create_tenant(&self, new: &NewTenant) -> Result<Tenant>;
    fn tenants(&self) -> Result<Vec<Tenant>>;
    /// By id, or by name when no id matches.
    fn tenant(&self, id_or_name: &str) -> Result<Option<Tenant>>;
    fn update_tenant(&self, id: &str, update: &TenantUpdate) -> Result<Option<Tenant>>;

    /// Makes a key with a fresh secret.
    fn create_key(&self, new: &NewKey) -> Result<IssuedKey>;
    /// Keys of one tenant, or of all tenants; newest first.
    fn keys(&self, tenant_id: Option<&str>) -> Result<Vec<ApiKey>>;
    fn key(&self, id: &str) -> Result<Option<ApiKey>>;
    /// Marks a key revoked (idempotent); `None` when there is no such key.
    fn revoke_key(&self, id: &str) -> Result<Option<ApiKey>>;
    /// Gives a key a new secret; the old one stops working. Its id, budget,
    /// limits and history stay. `None` when there is no such key, or it is
    /// revoked.
    fn rotate_key(&self, id: &str) -> Result<Option<IssuedKey>>;
    /// The key whose secret has this hash, with its tenant.
    fn key_by_hash(&self, secret_sha256: &str) -> Result<Option<KeyOwner>>;
    /// Moves whenever a tenant or key changes.
    fn auth_epoch(&self) -> Result<i64>;
    /// A secret every replica sharing this database reads, made the first
    /// time one asks for it: replicas sign what they ask each other on a
    /// run's behalf with it.
    fn cluster_secret(&self) -> Result<String>;
    /// Sets a key's monthly limit and rate limits.
    fn update_key_limits(&self, id: &str, limits: &Limits) -> Result<Option<ApiKey>>;
}

/// A fresh tenant id.
pub(crate) fn new_tenant_id() -> String {
    format!("ten-{}", uuid::Uuid::new_v4().simple())
}

/// A fresh key id.
pub(crate) fn new_key_id() -> String {
    format!("key-{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_hashed() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert!(a.starts_with(SECRET_PREFIX) && a.len() == 48, "{a}");
        assert!(a[SECRET_PREFIX.len()..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric()));
        let h = secret_hash(&a);
        assert_eq!(h.len(), 64);
        assert_ne!(h, secret_hash(&b));
        assert_eq!(shown_prefix(&a).len(), 14);
        assert!(a.starts_with(&shown_prefix(&a)));
    }

    #[test]
    fn roles_round_trip() {
        for r in [Role::PlatformAdmin, Role::TenantAdmin, Role::Member] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn names_are_plain() {
        assert!(validate_name("tenant", "acme-bank_2.eu").is_ok());
        for bad in ["", "a b", "ünï", "x/y", &"a".repeat(65)] {
            assert!(validate_name("tenant", bad).is_err(), "{bad}");
        }
    }
}
