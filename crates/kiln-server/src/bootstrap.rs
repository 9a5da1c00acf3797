//! What a fresh database needs before the server can take requests: the
//! `platform` tenant with a platform admin key (made on the first start and
//! printed once), and under `--no-auth` the `local` tenant that keyless
//! calls are charged to.

use kiln_store::accounts::{Limits, NewKey, NewTenant, Role, Tenant};
use kiln_store::{Database, StoreError};

use crate::auth::{Principal, LOCAL_TENANT, PLATFORM_TENANT};

/// The tenant named `name`, created if missing (another replica may create
/// it at the same moment: then its row is used).
pub fn ensure_tenant(db: &dyn Database, name: &str) -> Result<Tenant, StoreError> {
    if let Some(t) = db.tenant(name)?.filter(|t| t.name == name) {
        return Ok(t);
    }
    match db.create_tenant(&NewTenant {
        name: name.to_string(),
        limits: Limits::default(),
    }) {
        Ok(t) => Ok(t),
        Err(StoreError::Conflict(_)) => db
            .tenant(name)?
            .ok_or_else(|| StoreError::NotFound(format!("tenant `{name}` vanished"))),
        Err(e) => Err(e),
    }
}

/// Prepares the database; returns the principal of keyless calls when
/// `no_auth`, and the admin key's secret when one was just made.
pub fn run(
    db: &dyn Database,
    no_auth: bool,
) -> Result<(Option<Principal>, Option<String>), StoreError> {
    let platform = ensure_tenant(db, PLATFORM_TENANT)?;
    let now = kiln_store::now_ms();
    let has_admin = db
        .keys(None)?
        .iter()
        .any(|k| k.role == Role::PlatformAdmin && k.unusable_because(now).is_none());
    let secret = if has_admin {
        None
    } else {
        let issued = db.create_key(&NewKey {
            tenant_id: platform.id,
            name: "admin".into(),
            role: Role::PlatformAdmin,
            models: None,
            expires_at_ms: None,
            limits: Limits::default(),
            priority: 0,
            groups: Vec::new(),
        })?;
        Some(issued.secret)
    };
    let anonymous = if no_auth {
        Some(Principal {
            tenant: ensure_tenant(db, LOCAL_TENANT)?,
            key: None,
        })
    } else {
        None
    };
    Ok((anonymous, secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_store::Accounts as _;

    #[test]
    fn the_first_start_makes_one_admin_key() -> Result<(), StoreError> {
        let db = kiln_store::Store::open_in_memory()?;
        let (anon, first) = run(&db, false)?;
        assert!(anon.is_none());
        assert!(first.is_some());
        let (_, second) = run(&db, false)?;
        assert!(second.is_none(), "a usable admin key exists");
        let (anon, _) = run(&db, true)?;
        assert_eq!(anon.map(|p| p.tenant.name), Some(LOCAL_TENANT.to_string()));
        // Once every admin key is revoked, a restart makes a new one.
        for k in db.keys(None)? {
            db.revoke_key(&k.id)?;
        }
        let (_, again) = run(&db, false)?;
        assert!(again.is_some());
        Ok(())
    }
}
