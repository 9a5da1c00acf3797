//! The knowledge-base directory on SQLite.

use rusqlite::{params, OptionalExtension, Row};

use super::Store;
use crate::directory::{KbDirectory, KbEntry};
use crate::error::{Result, StoreError};

const COLUMNS: &str = "id, tenant_id, name, replica_url, created_at";

fn entry(r: &Row<'_>) -> rusqlite::Result<KbEntry> {
    Ok(KbEntry {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        name: r.get(2)?,
        replica_url: r.get(3)?,
        created_at_ms: r.get(4)?,
    })
}

fn name_taken(e: &KbEntry) -> StoreError {
    StoreError::Conflict(format!(
        "a knowledge base named `{}` already exists",
        e.name
    ))
}

impl KbDirectory for Store {
    fn register_kb(&self, e: &KbEntry) -> Result<()> {
        let inserted = self.lock()?.execute(
            "INSERT INTO knowledge_bases (id, tenant_id, name, replica_url, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            params![e.id, e.tenant_id, e.name, e.replica_url, e.created_at_ms],
        )?;
        if inserted == 0 {
            return Err(name_taken(e));
        }
        Ok(())
    }

    fn announce_kb(&self, e: &KbEntry) -> Result<()> {
        let changed = self.lock()?.execute(
            "INSERT INTO knowledge_bases (id, tenant_id, name, replica_url, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET replica_url = excluded.replica_url
             ON CONFLICT DO NOTHING",
            params![e.id, e.tenant_id, e.name, e.replica_url, e.created_at_ms],
        )?;
        if changed == 0 {
            return Err(name_taken(e));
        }
        Ok(())
    }

    fn kb_entry(&self, tenant: Option<&str>, id_or_name: &str) -> Result<Option<KbEntry>> {
        let conn = self.lock()?;
        let by_id = conn
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM knowledge_bases WHERE id = ?1 AND (?2 IS NULL OR tenant_id = ?2)"
                ),
                params![id_or_name, tenant],
                entry,
            )
            .optional()?;
        match (by_id, tenant) {
            (Some(e), _) => Ok(Some(e)),
            (None, None) => Ok(None),
            (None, Some(t)) => Ok(conn
                .query_row(
                    &format!(
                        "SELECT {COLUMNS} FROM knowledge_bases WHERE tenant_id = ?1 AND name = ?2"
                    ),
                    params![t, id_or_name],
                    entry,
                )
                .optional()?),
        }
    }

    fn kb_entries(&self, tenant: Option<&str>) -> Result<Vec<KbEntry>> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM knowledge_bases WHERE ?1 IS NULL OR tenant_id = ?1 ORDER BY name, id"
        ))?;
        let rows = stmt.query_map(params![tenant], entry)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn unregister_kb(&self, id: &str) -> Result<()> {
        self.lock()?
            .execute("DELETE FROM knowledge_bases WHERE id = ?1", params![id])?;
        Ok(())
    }
}
