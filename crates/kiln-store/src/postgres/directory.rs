//! The knowledge-base directory on PostgreSQL.

use postgres::Row;

use super::{Db, PgStore};
use crate::directory::{KbDirectory, KbEntry};
use crate::error::{Result, StoreError};

const COLUMNS: &str = "id, tenant_id, name, replica_url, created_at";

fn entry(r: &Row) -> KbEntry {
    KbEntry {
        id: r.get(0),
        tenant_id: r.get(1),
        name: r.get(2),
        replica_url: r.get(3),
        created_at_ms: r.get(4),
    }
}

fn name_taken(e: &KbEntry) -> StoreError {
    StoreError::Conflict(format!(
        "a knowledge base named `{}` already exists",
        e.name
    ))
}

impl KbDirectory for PgStore {
    fn register_kb(&self, e: &KbEntry) -> Result<()> {
        let inserted = self.conn()?.execute(
            "INSERT INTO knowledge_bases (id, tenant_id, name, replica_url, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[
                &e.id,
                &e.tenant_id,
                &e.name,
                &e.replica_url,
                &e.created_at_ms,
            ],
        )?;
        if inserted == 0 {
            return Err(name_taken(e));
        }
        Ok(())
    }

    fn announce_kb(&self, e: &KbEntry) -> Result<()> {
        let mut conn = self.conn()?;
        let updated = conn.execute(
            "UPDATE knowledge_bases SET replica_url = $2 WHERE id = $1",
            &[&e.id, &e.replica_url],
        )?;
        if updated > 0 {
            return Ok(());
        }
        drop(conn);
        self.register_kb(e)
    }

    fn kb_entry(&self, tenant: Option<&str>, id_or_name: &str) -> Result<Option<KbEntry>> {
        let mut conn = self.conn()?;
        let sql = format!(
            "SELECT {COLUMNS} FROM knowledge_bases WHERE id = $1 AND ($2::TEXT IS NULL OR tenant_id = $2)
             UNION ALL
             SELECT {COLUMNS} FROM knowledge_bases WHERE $2::TEXT IS NOT NULL AND tenant_id = $2 AND name = $1
             LIMIT 1"
        );
        Ok(conn
            .query_opt(&sql, &[&id_or_name, &tenant])?
            .map(|r| entry(&r)))
    }

    fn kb_entries(&self, tenant: Option<&str>) -> Result<Vec<KbEntry>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM knowledge_bases WHERE $1::TEXT IS NULL OR tenant_id = $1 ORDER BY name, id"
        );
        Ok(self
            .conn()?
            .query(&sql, &[&tenant])?
            .iter()
            .map(entry)
            .collect())
    }

    fn unregister_kb(&self, id: &str) -> Result<()> {
        self.conn()?
            .execute("DELETE FROM knowledge_bases WHERE id = $1", &[&id])?;
        Ok(())
    }
}
