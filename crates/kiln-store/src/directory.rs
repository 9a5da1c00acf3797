//! The knowledge-base directory: which replica serves each knowledge base.
//!
//! A knowledge base's files (its documents, indexes and vectors) live on the
//! replica that created it. Every replica sharing a database can find it
//! here and forward a request for it to that replica's advertised URL. The
//! directory also keeps names unique within a tenant across replicas.

use crate::error::Result;

/// One knowledge base and where it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KbEntry {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// The serving replica's advertised base URL; `None` when it advertises
    /// none (then only requests sent to it directly reach the knowledge base).
    pub replica_url: Option<String>,
    pub created_at_ms: i64,
}

pub trait KbDirectory: Send + Sync {
    /// Records a new knowledge base. [`crate::StoreError::Conflict`] when
    /// its tenant already has one by that name.
    fn register_kb(&self, entry: &KbEntry) -> Result<()>;
    /// Records a knowledge base a replica holds (at its start): inserts it,
    /// or updates the URL of an entry with the same id. Conflict when
    /// another knowledge base of the tenant has the name.
    fn announce_kb(&self, entry: &KbEntry) -> Result<()>;
    /// A knowledge base by id, or by name within `tenant` (`None`: any
    /// tenant, for the platform admin; then names are not looked up).
    fn kb_entry(&self, tenant: Option<&str>, id_or_name: &str) -> Result<Option<KbEntry>>;
    /// Knowledge bases of `tenant` (`None`: all), by name.
    fn kb_entries(&self, tenant: Option<&str>) -> Result<Vec<KbEntry>>;
    /// Forgets a knowledge base; removing one that is not there is no error.
    fn unregister_kb(&self, id: &str) -> Result<()>;
}
