//! The store's error type: what failed, on which database, and for schema
//! problems what to do about it.

use std::path::PathBuf;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("creating directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "database {path} could not switch to WAL journaling (it reports `{mode}`); \
         put it on a local filesystem"
    )]
    NoWal { path: PathBuf, mode: String },
    #[error(
        "database {path} has schema version {found}, but this Kiln supports up to {supported}; \
         it was written by a newer Kiln: upgrade Kiln or point it at another database"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("database {path}: applying migration {version} ({name}): {source}")]
    Migration {
        path: PathBuf,
        version: i64,
        name: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the PostgreSQL URL is not valid: {reason}")]
    PgConfig { reason: String },
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    PgConnect {
        target: String,
        #[source]
        source: postgres::Error,
    },
    #[error("PostgreSQL {target}: applying migration {version} ({name}): {source}")]
    PgMigration {
        target: String,
        version: i64,
        name: &'static str,
        #[source]
        source: postgres::Error,
    },
    #[error("PostgreSQL query failed: {0}")]
    Postgres(#[from] postgres::Error),
    /// A value the caller gave is not allowed.
    #[error("{0}")]
    Invalid(String),
    /// The change clashes with what is stored (a duplicate name).
    #[error("{0}")]
    Conflict(String),
    /// What the change refers to does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error("row {id} of {table} is invalid: {reason}")]
    BadRow {
        table: &'static str,
        id: String,
        reason: String,
    },
}
