//! Tenants and keys on PostgreSQL.

use postgres::Row;

use super::{Db, PgStore};
use crate::accounts::{
    check_groups, check_limits, check_priority, groups_json, new_key_id, new_secret, new_tenant_id,
    secret_hash, shown_prefix, validate_name, Accounts, ApiKey, IssuedKey, KeyOwner, Limits,
    NewKey, NewTenant, Role, Tenant, TenantUpdate,
};
use crate::error::{Result, StoreError};
use crate::money::Money;

const TENANT_COLUMNS: &str = "id, name, created_at, disabled_at, balance_nanos,
     monthly_limit_nanos, reserved_nanos, requests_per_minute, tokens_per_minute";

const KEY_COLUMNS: &str = "id, tenant_id, name, prefix, role, models, created_at, expires_at,
     revoked_at, rotated_at, balance_nanos, monthly_limit_nanos, reserved_nanos,
     requests_per_minute, tokens_per_minute, priority, groups";

fn per_minute(v: Option<i64>) -> Option<u32> {
    v.map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn tenant_from_row(r: &Row) -> Tenant {
    Tenant {
        id: r.get(0),
        name: r.get(1),
        created_at_ms: r.get(2),
        disabled_at_ms: r.get(3),
        balance: r.get::<_, Option<i64>>(4).map(Money),
        reserved: Money(r.get(6)),
        limits: Limits {
            monthly_limit: r.get::<_, Option<i64>>(5).map(Money),
            requests_per_minute: per_minute(r.get(7)),
            tokens_per_minute: per_minute(r.get(8)),
        },
    }
}

fn key_from_row(r: &Row) -> Result<ApiKey> {
    let id: String = r.get(0);
    let bad = |reason: String| StoreError::BadRow {
        table: "api_keys",
        id: id.clone(),
        reason,
    };
    let role_text: String = r.get(4);
    let role = Role::parse(&role_text).ok_or_else(|| bad(format!("role `{role_text}`")))?;
    let models: Option<String> = r.get(5);
    let models = models
        .map(|t| serde_json::from_str::<Vec<String>>(&t))
        .transpose()
        .map_err(|e| bad(format!("model list: {e}")))?;
    let groups: String = r.get(16);
    let groups = serde_json::from_str::<Vec<String>>(&groups)
        .map_err(|e| bad(format!("group list: {e}")))?;
    Ok(ApiKey {
        tenant_id: r.get(1),
        name: r.get(2),
        prefix: r.get(3),
        role,
        models,
        created_at_ms: r.get(6),
        expires_at_ms: r.get(7),
        revoked_at_ms: r.get(8),
        rotated_at_ms: r.get(9),
        balance: r.get::<_, Option<i64>>(10).map(Money),
        reserved: Money(r.get(12)),
        limits: Limits {
            monthly_limit: r.get::<_, Option<i64>>(11).map(Money),
            requests_per_minute: per_minute(r.get(13)),
            tokens_per_minute: per_minute(r.get(14)),
        },
        priority: r.get(15),
        groups,
        id,
    })
}

fn bump_epoch(c: &mut impl Db) -> Result<()> {
    c.execute("UPDATE platform SET auth_epoch = auth_epoch + 1", &[])?;
    Ok(())
}

fn tenant_by(c: &mut impl Db, id_or_name: &str) -> Result<Option<Tenant>> {
    let sql = format!(
        "SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1
         UNION ALL SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1 LIMIT 1"
    );
    Ok(c.query_opt(&sql, &[&id_or_name])?
        .map(|r| tenant_from_row(&r)))
}

fn key_by(c: &mut impl Db, column: &str, value: &str) -> Result<Option<ApiKey>> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE {column} = $1");
    c.query_opt(&sql, &[&value])?
        .map(|r| key_from_row(&r))
        .transpose()
}

fn rpm(v: Option<u32>) -> Option<i64> {
    v.map(i64::from)
}

impl Accounts for PgStore {
    fn create_tenant(&self, new: &NewTenant) -> Result<Tenant> {
        validate_name("the tenant name", &new.name).map_err(StoreError::Invalid)?;
        check_limits(&new.limits)?;
        let tenant = Tenant {
            id: new_tenant_id(),
            name: new.name.clone(),
            created_at_ms: crate::now_ms(),
            disabled_at_ms: None,
            balance: None,
            reserved: Money::ZERO,
            limits: new.limits.clone(),
        };
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let inserted = tx.execute(
            "INSERT INTO tenants (id, name, created_at, monthly_limit_nanos, requests_per_minute,
                 tokens_per_minute)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
            &[
                &tenant.id,
                &tenant.name,
                &tenant.created_at_ms,
                &tenant.limits.monthly_limit.map(Money::nanos),
                &rpm(tenant.limits.requests_per_minute),
                &rpm(tenant.limits.tokens_per_minute),
            ],
        )?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!(
                "a tenant named `{}` already exists",
                new.name
            )));
        }
        bump_epoch(&mut tx)?;
        tx.commit()?;
        Ok(tenant)
    }

    fn tenants(&self) -> Result<Vec<Tenant>> {
        let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name");
        Ok(self
            .conn()?
            .query(&sql, &[])?
            .iter()
            .map(tenant_from_row)
            .collect())
    }

    fn tenant(&self, id_or_name: &str) -> Result<Option<Tenant>> {
        tenant_by(&mut self.conn()?, id_or_name)
    }

    fn update_tenant(&self, id: &str, u: &TenantUpdate) -> Result<Option<Tenant>> {
        if let Some(name) = &u.name {
            validate_name("the tenant name", name).map_err(StoreError::Invalid)?;
        }
        check_limits(&Limits {
            monthly_limit: u.monthly_limit.flatten(),
            requests_per_minute: u.requests_per_minute.flatten(),
            tokens_per_minute: u.tokens_per_minute.flatten(),
        })?;
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1 FOR UPDATE");
        let Some(current) = tx.query_opt(&sql, &[&id])?.map(|r| tenant_from_row(&r)) else {
            return Ok(None);
        };
        let name = u.name.clone().unwrap_or(current.name.clone());
        let disabled_at = match u.disabled {
            None => current.disabled_at_ms,
            Some(false) => None,
            Some(true) => current.disabled_at_ms.or(Some(crate::now_ms())),
        };
        let monthly = u.monthly_limit.unwrap_or(current.limits.monthly_limit);
        let r = u
            .requests_per_minute
            .unwrap_or(current.limits.requests_per_minute);
        let t = u
            .tokens_per_minute
            .unwrap_or(current.limits.tokens_per_minute);
        let taken = tx.query_opt(
            "SELECT 1 FROM tenants WHERE name = $1 AND id <> $2",
            &[&name, &id],
        )?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!(
                "a tenant named `{name}` already exists"
            )));
        }
        tx.execute(
            "UPDATE tenants SET name = $2, disabled_at = $3, monthly_limit_nanos = $4,
                 requests_per_minute = $5, tokens_per_minute = $6 WHERE id = $1",
            &[
                &id,
                &name,
                &disabled_at,
                &monthly.map(Money::nanos),
                &rpm(r),
                &rpm(t),
            ],
        )?;
        bump_epoch(&mut tx)?;
        let updated = tenant_by(&mut tx, id)?;
        tx.commit()?;
        Ok(updated)
    }

    fn create_key(&self, new: &NewKey) -> Result<IssuedKey> {
        validate_name("the key name", &new.name).map_err(StoreError::Invalid)?;
        check_limits(&new.limits)?;
        check_priority(new.priority)?;
        check_groups(&new.groups)?;
        if new
            .models
            .as_ref()
            .is_some_and(|m| m.iter().any(String::is_empty))
        {
            return Err(StoreError::Invalid(
                "a key's model names must not be empty".into(),
            ));
        }
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let Some(tenant) = tenant_by(&mut tx, &new.tenant_id)?.filter(|t| t.id == new.tenant_id)
        else {
            return Err(StoreError::NotFound(format!(
                "no tenant with id `{}`",
                new.tenant_id
            )));
        };
        let secret = new_secret();
        let key = ApiKey {
            id: new_key_id(),
            tenant_id: tenant.id,
            name: new.name.clone(),
            prefix: shown_prefix(&secret),
            role: new.role,
            models: new.models.clone(),
            created_at_ms: crate::now_ms(),
            expires_at_ms: new.expires_at_ms,
            revoked_at_ms: None,
            rotated_at_ms: None,
            balance: None,
            reserved: Money::ZERO,
            limits: new.limits.clone(),
            priority: new.priority,
            groups: new.groups.clone(),
        };
        let models = key
            .models
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Invalid(format!("model list: {e}")))?;
        tx.execute(
            "INSERT INTO api_keys (id, tenant_id, name, prefix, secret_sha256, role, models,
                 created_at, expires_at, monthly_limit_nanos, requests_per_minute,
                 tokens_per_minute, priority, groups)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            &[
                &key.id,
                &key.tenant_id,
                &key.name,
                &key.prefix,
                &secret_hash(&secret),
                &key.role.as_str(),
                &models,
                &key.created_at_ms,
                &key.expires_at_ms,
                &key.limits.monthly_limit.map(Money::nanos),
                &rpm(key.limits.requests_per_minute),
                &rpm(key.limits.tokens_per_minute),
                &key.priority,
                &groups_json(&key.groups),
            ],
        )?;
        bump_epoch(&mut tx)?;
        tx.commit()?;
        Ok(IssuedKey { key, secret })
    }

    fn keys(&self, tenant_id: Option<&str>) -> Result<Vec<ApiKey>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE $1::TEXT IS NULL OR tenant_id = $1
             ORDER BY created_at DESC, id DESC"
        );
        self.conn()?
            .query(&sql, &[&tenant_id])?
            .iter()
            .map(key_from_row)
            .collect()
    }

    fn key(&self, id: &str) -> Result<Option<ApiKey>> {
        key_by(&mut self.conn()?, "id", id)
    }

    fn revoke_key(&self, id: &str) -> Result<Option<ApiKey>> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let changed = tx.execute(
            "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
            &[&id, &crate::now_ms()],
        )?;
        if changed > 0 {
            bump_epoch(&mut tx)?;
        }
        let key = key_by(&mut tx, "id", id)?;
        tx.commit()?;
        Ok(key)
    }

    fn rotate_key(&self, id: &str) -> Result<Option<IssuedKey>> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let secret = new_secret();
        let changed = tx.execute(
            "UPDATE api_keys SET secret_sha256 = $2, prefix = $3, rotated_at = $4
             WHERE id = $1 AND revoked_at IS NULL",
            &[
                &id,
                &secret_hash(&secret),
                &shown_prefix(&secret),
                &crate::now_ms(),
            ],
        )?;
        if changed == 0 {
            return Ok(None);
        }
        bump_epoch(&mut tx)?;
        let key = key_by(&mut tx, "id", id)?;
        tx.commit()?;
        Ok(key.map(|key| IssuedKey { key, secret }))
    }

    fn key_by_hash(&self, secret_sha256: &str) -> Result<Option<KeyOwner>> {
        let mut conn = self.conn()?;
        let Some(key) = key_by(&mut conn, "secret_sha256", secret_sha256)? else {
            return Ok(None);
        };
        let tenant = tenant_by(&mut conn, &key.tenant_id)?.ok_or_else(|| StoreError::BadRow {
            table: "api_keys",
            id: key.id.clone(),
            reason: format!("its tenant `{}` does not exist", key.tenant_id),
        })?;
        Ok(Some(KeyOwner { key, tenant }))
    }

    fn auth_epoch(&self) -> Result<i64> {
        Ok(self
            .conn()?
            .query_one("SELECT auth_epoch FROM platform WHERE id = 1", &[])?
            .get(0))
    }

    fn cluster_secret(&self) -> Result<String> {
        let mut conn = self.conn()?;
        conn.execute(
            "UPDATE platform SET cluster_secret = $1 WHERE id = 1 AND cluster_secret IS NULL",
            &[&crate::accounts::new_secret()],
        )?;
        Ok(conn
            .query_one("SELECT cluster_secret FROM platform WHERE id = 1", &[])?
            .get(0))
    }

    fn update_key_limits(&self, id: &str, limits: &Limits) -> Result<Option<ApiKey>> {
        check_limits(limits)?;
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let changed = tx.execute(
            "UPDATE api_keys SET monthly_limit_nanos = $2, requests_per_minute = $3,
                 tokens_per_minute = $4 WHERE id = $1",
            &[
                &id,
                &limits.monthly_limit.map(Money::nanos),
                &rpm(limits.requests_per_minute),
                &rpm(limits.tokens_per_minute),
            ],
        )?;
        if changed == 0 {
            return Ok(None);
        }
        bump_epoch(&mut tx)?;
        let key = key_by(&mut tx, "id", id)?;
        tx.commit()?;
        Ok(key)
    }
}
