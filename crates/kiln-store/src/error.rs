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
    // The PostgreSQL variants say the whole reason in their own text (see
    // `pg_reason`) and so do not also chain the client error as a source:
    // `{:#}` would print it twice.
    #[error("the PostgreSQL URL is not valid: {reason}")]
    PgConfig { reason: String },
    #[error("cannot connect to PostgreSQL at {target}: {}", pg_reason(.error))]
    PgConnect {
        /// `user@host:port/dbname`, never the password.
        target: String,
        error: postgres::Error,
    },
    #[error("PostgreSQL {target}: applying migration {version} ({name}): {}", pg_reason(.error))]
    PgMigration {
        target: String,
        version: i64,
        name: &'static str,
        error: postgres::Error,
    },
    #[error(
        "PostgreSQL {target}: all {size} connections of this server's pool stayed in use for \
         {waited_ms} ms"
    )]
    PgPoolExhausted {
        target: String,
        size: usize,
        waited_ms: u64,
    },
    #[error("PostgreSQL query failed: {}", pg_reason(.0))]
    Postgres(postgres::Error),
    /// A call made [`crate::without_waiting`] found the database in use.
    #[error("the database is in use; the call would have to wait")]
    WouldWait,
    /// The database file was deleted or replaced while in use.
    #[error(
        "the database file {path} was deleted or replaced while Kiln was using it; \
         restore it (or restart Kiln to start a new one): nothing is written meanwhile"
    )]
    Gone { path: PathBuf },
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

impl From<postgres::Error> for StoreError {
    fn from(error: postgres::Error) -> Self {
        StoreError::Postgres(error)
    }
}

/// A PostgreSQL error as one line. The client's own text is only "db error"
/// or "error connecting to server"; what an operator needs is the server's
/// severity, SQLSTATE and message, or the I/O cause underneath. The server's
/// DETAIL is left out: it can quote row values.
pub(crate) fn pg_reason(error: &postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(c) = cause {
        let more = c.to_string();
        // Some causes repeat the text above them.
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

impl StoreError {
    /// Whether a call made [`crate::without_waiting`] gave up because it
    /// would have had to wait (for this process's connection or for another
    /// process's write lock): nothing was done, and it may be run again.
    pub fn would_wait(&self) -> bool {
        match self {
            StoreError::WouldWait => true,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            _ => false,
        }
    }
}
