//! Kiln's persistent state.
//!
//! One storage concern so far: the request log of model calls. Each concern
//! is a query trait ([`CallLog`]) with one implementation per database, so
//! the server holds an `Arc<dyn CallLog>` and does not care which:
//! - [`Store`]: SQLite in WAL mode, the single-machine default;
//! - PostgreSQL, shared by several `kiln serve` replicas, comes later
//!   (its migrations will sit in `migrations/postgres/`).
//!
//! Schema changes are numbered SQL files under `migrations/<database>/`,
//! embedded in the binary and recorded in `schema_migrations`; opening a
//! database applies the missing ones in order, each in its own transaction,
//! and refuses a database written by a newer Kiln rather than guessing at it.
//! Migrations already released are never edited: a change is a new file.

mod calls;
mod error;
mod sqlite;

pub use calls::{endpoint, now_ms, CallLog, CallRecord, ModelUsage, Outcome, StoredCall};
pub use error::{Result, StoreError};
pub use sqlite::{default_db_path, Store, SCHEMA_VERSION};
