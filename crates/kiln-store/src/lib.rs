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

thread_local! {
    static NO_WAIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's store calls refusing to wait: a call that
/// finds the embedded store's connection in use for more than a moment, or
/// another process holding the database's write lock, fails at once, having
/// done nothing, with an error whose [`StoreError::would_wait`] is true.
/// The server runs its short metering calls this way on its async threads
/// and hands only those that would wait to a thread that may block.
pub fn without_waiting<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            NO_WAIT.with(|w| w.set(self.0));
        }
    }
    let _reset = Reset(NO_WAIT.with(|w| w.replace(true)));
    f()
}

/// Whether this thread is inside [`without_waiting`].
pub(crate) fn waiting_refused() -> bool {
    NO_WAIT.with(std::cell::Cell::get)
}

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
