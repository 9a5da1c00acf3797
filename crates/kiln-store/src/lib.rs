//! Kiln's persistent state.
//!
//! Each concern is a query trait with one implementation per database —
//! [`CallLog`] (the usage ledger), [`Accounts`] (tenants and API keys),
//! [`Billing`] (prices, credits, budget reservations, replica leases),
//! [`KbDirectory`] (which replica serves each knowledge base), [`Runs`]
//! (agents, workflows and the journal of their durable runs) — and
//! [`Database`] is all of them, so the server holds an `Arc<dyn Database>`
//! and does not care which database is behind it:
//! - [`Store`]: SQLite in WAL mode, the single-machine default;
//! - [`PgStore`]: PostgreSQL, shared by several `kiln serve` replicas.
//!
//! [`open_database`] picks by the setting: a `postgres://` URL or a file.
//!
//! Schema changes are numbered SQL files under `migrations/<database>/`,
//! embedded in the binary and recorded in `schema_migrations`; opening a
//! database applies the missing ones in order, each in its own transaction,
//! and refuses a database written by a newer Kiln rather than guessing at it.
//! Migrations already released are never edited: a change is a new file.

pub mod accounts;
pub mod billing;
mod calls;
pub mod directory;
mod error;
pub mod money;
mod postgres;
pub mod runs;
mod sqlite;

pub use accounts::Accounts;
pub use billing::Billing;
pub use billing::INTERRUPTED;
pub use calls::{
    endpoint, now_ms, CallLog, CallRecord, GroupBy, LedgerEntry, ModelUsage, Outcome, UsageQuery,
    UsageRow,
};
pub use directory::{KbDirectory, KbEntry};
pub use error::{Result, StoreError};
pub use postgres::{is_postgres_url, PgStore, PG_SCHEMA_VERSION};
pub use runs::Runs;
pub use sqlite::{default_db_path, Store, SCHEMA_VERSION};

/// Connections each server keeps to PostgreSQL.
pub const PG_POOL_SIZE: usize = 16;

/// Opens the database a setting names: a `postgres://` URL, or a SQLite
/// file path.
pub fn open_database(spec: &std::path::Path) -> Result<std::sync::Arc<dyn Database>> {
    match spec.to_str().filter(|s| is_postgres_url(s)) {
        Some(url) => Ok(std::sync::Arc::new(PgStore::connect(url, PG_POOL_SIZE)?)),
        None => Ok(std::sync::Arc::new(Store::open(spec)?)),
    }
}

/// Everything a server needs from its database, as one object.
pub trait Database: CallLog + Accounts + Billing + KbDirectory + Runs {}

impl<T: CallLog + Accounts + Billing + KbDirectory + Runs> Database for T {}
