//! Kiln's persistent state.
//!
//! For now one concern: the request log of model calls ([`CallLog`]), kept
//! in SQLite ([`Store`]) in WAL mode with a busy timeout so several writers
//! (threads, or processes sharing the file) wait instead of failing.
//!
//! Schema changes are numbered migrations embedded in the binary and
//! recorded in `schema_migrations`; opening applies the missing ones in
//! order, each in its own transaction. A database written by a newer Kiln
//! (a version this build does not know) is refused rather than guessed at.
//! Each storage concern is a trait so a PostgreSQL implementation can sit
//! beside the SQLite one.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

/// How long a writer waits for another writer's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// SQLite migrations, in order: (version, name, SQL).
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "request_log",
    include_str!("../migrations/sqlite/0001_request_log.sql"),
)];

/// The newest schema version this build understands.
pub const SCHEMA_VERSION: i64 = 1;

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
        "database {path} has schema version {found}, but this Kiln supports up to {supported}; \
         it was written by a newer Kiln: upgrade Kiln or point it at another database"
    )]
    NewerSchema {
        path: String,
        found: i64,
        supported: i64,
    },
    #[error("applying migration {version} ({name}): {source}")]
    Migration {
        version: i64,
        name: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("row {id} of {table} is invalid: {reason}")]
    BadRow {
        table: &'static str,
        id: i64,
        reason: String,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How a model call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Finished naturally (end of generation or a stop sequence).
    Stop,
    /// Hit `max_tokens` or the context length.
    Length,
    /// The client went away or cancelled.
    Cancelled,
    /// Failed; the stable error code (`busy`, `context_length_exceeded`, ...).
    Error(String),
}

impl Outcome {
    /// The text stored in the `outcome` column.
    pub fn as_db_text(&self) -> String {
        match self {
            Outcome::Stop => "stop".into(),
            Outcome::Length => "length".into(),
            Outcome::Cancelled => "cancelled".into(),
            Outcome::Error(code) => format!("error:{code}"),
        }
    }

    /// Parses the `outcome` column; `None` for text this build does not know.
    pub fn from_db_text(text: &str) -> Option<Outcome> {
        match text {
            "stop" => Some(Outcome::Stop),
            "length" => Some(Outcome::Length),
            "cancelled" => Some(Outcome::Cancelled),
            other => other
                .strip_prefix("error:")
                .map(|code| Outcome::Error(code.to_string())),
        }
    }
}

/// One model call, as the server records it when the call finishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// Unix milliseconds; [`now_ms`] gives the current time.
    pub created_at_ms: i64,
    pub request_id: String,
    pub endpoint: String,
    pub model: String,
    pub prompt_tokens: u64,
    /// Prompt tokens served from a prefix cache (a subset of `prompt_tokens`).
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub outcome: Outcome,
    pub latency_ms: u64,
    /// Time to first token; `None` for embeddings and calls that produced none.
    pub ttft_ms: Option<u64>,
}

/// A [`CallRecord`] read back, with its row id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCall {
    pub id: i64,
    #[serde(flatten)]
    pub record: CallRecord,
}

/// Totals for one model over the whole log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotals {
    pub model: String,
    pub calls: u64,
    /// Calls whose outcome was an error.
    pub errors: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
}

/// The request log of model calls. Implemented for SQLite by [`Store`].
pub trait CallLog: Send + Sync {
    /// Appends one call; returns its row id.
    fn record_call(&self, call: &CallRecord) -> Result<i64>;
    /// The newest `limit` calls, newest first.
    fn recent_calls(&self, limit: usize) -> Result<Vec<StoredCall>>;
    /// Per-model totals, ordered by model name.
    fn usage_totals(&self) -> Result<Vec<UsageTotals>>;
}

/// Where `kiln serve` keeps its SQLite database inside its home directory.
pub fn default_db_path(home: &Path) -> PathBuf {
    home.join("kiln.db")
}

/// Current time in unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The SQLite store. One connection behind a mutex: SQLite serialises
/// writers anyway, and WAL lets other processes read meanwhile.
pub struct Store {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`, with its parent
    /// directory, and brings the schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // journal_mode returns the resulting mode as a row.
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .map_err(open_err)?;
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(open_err)?;
        Self::with_connection(conn, &path.display().to_string())
    }

    /// A private in-memory database (tests, `--no-store` runs).
    pub fn open_in_memory() -> Result<Store> {
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: PathBuf::from(":memory:"),
            source,
        })?;
        Self::with_connection(conn, ":memory:")
    }

    fn with_connection(mut conn: Connection, label: &str) -> Result<Store> {
        migrate(&mut conn, label)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64> {
        current_version(&self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied write:
        // every write is one statement or one transaction.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn current_version(conn: &Connection) -> Result<i64> {
    Ok(conn
        .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .optional()?
        .flatten()
        .unwrap_or(0))
}

/// Applies every migration newer than the database's version, each in an
/// IMMEDIATE transaction so two processes opening at once do not both apply it.
fn migrate(conn: &mut Connection, label: &str) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT    NOT NULL,
             applied_at INTEGER NOT NULL
         )",
    )?;
    for &(version, name, sql) in SQLITE_MIGRATIONS {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = current_version(&tx)?;
        if current > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: label.to_string(),
                found: current,
                supported: SCHEMA_VERSION,
            });
        }
        if version <= current {
            continue;
        }
        let err = |source| StoreError::Migration {
            version,
            name,
            source,
        };
        tx.execute_batch(sql).map_err(err)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![version, name, now_ms()],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    let current = current_version(conn)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: label.to_string(),
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

impl CallLog for Store {
    fn record_call(&self, call: &CallRecord) -> Result<i64> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO request_log (created_at, request_id, endpoint, model, prompt_tokens,
                 cached_tokens, completion_tokens, outcome, latency_ms, ttft_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                call.created_at_ms,
                call.request_id,
                call.endpoint,
                call.model,
                call.prompt_tokens,
                call.cached_tokens,
                call.completion_tokens,
                call.outcome.as_db_text(),
                call.latency_ms,
                call.ttft_ms,
            ],
        )?;
        Ok(conn.last_insert_rowid())
    }

    fn recent_calls(&self, limit: usize) -> Result<Vec<StoredCall>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT id, created_at, request_id, endpoint, model, prompt_tokens, cached_tokens,
                    completion_tokens, outcome, latency_ms, ttft_ms
             FROM request_log ORDER BY id DESC LIMIT ?1",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map([limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(8)?,
                CallRecord {
                    created_at_ms: r.get(1)?,
                    request_id: r.get(2)?,
                    endpoint: r.get(3)?,
                    model: r.get(4)?,
                    prompt_tokens: r.get(5)?,
                    cached_tokens: r.get(6)?,
                    completion_tokens: r.get(7)?,
                    outcome: Outcome::Stop,
                    latency_ms: r.get(9)?,
                    ttft_ms: r.get(10)?,
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, outcome, mut record) = row?;
            record.outcome = Outcome::from_db_text(&outcome).ok_or_else(|| StoreError::BadRow {
                table: "request_log",
                id,
                reason: format!("unknown outcome `{outcome}`"),
            })?;
            out.push(StoredCall { id, record });
        }
        Ok(out)
    }

    fn usage_totals(&self) -> Result<Vec<UsageTotals>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT model, COUNT(*), SUM(outcome LIKE 'error:%'), SUM(prompt_tokens),
                    SUM(cached_tokens), SUM(completion_tokens)
             FROM request_log GROUP BY model ORDER BY model",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(UsageTotals {
                model: r.get(0)?,
                calls: r.get(1)?,
                errors: r.get(2)?,
                prompt_tokens: r.get(3)?,
                cached_tokens: r.get(4)?,
                completion_tokens: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn call(model: &str, outcome: Outcome, prompt: u64, completion: u64) -> CallRecord {
        CallRecord {
            created_at_ms: now_ms(),
            request_id: format!("req-{model}-{prompt}-{completion}"),
            endpoint: "/v1/chat/completions".into(),
            model: model.into(),
            prompt_tokens: prompt,
            cached_tokens: prompt / 2,
            completion_tokens: completion,
            outcome,
            latency_ms: 120,
            ttft_ms: Some(15),
        }
    }

    #[test]
    fn migrations_are_idempotent() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("nested/kiln.db");
        let store = Store::open(&path)?;
        assert_eq!(store.schema_version()?, SCHEMA_VERSION);
        store.record_call(&call("m", Outcome::Stop, 3, 4))?;
        drop(store);
        let store = Store::open(&path)?;
        assert_eq!(store.schema_version()?, SCHEMA_VERSION);
        assert_eq!(store.recent_calls(10)?.len(), 1);
        let rows: i64 =
            store
                .lock()
                .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))?;
        assert_eq!(rows, SQLITE_MIGRATIONS.len() as i64);
        Ok(())
    }

    #[test]
    fn a_newer_schema_is_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kiln.db");
        let store = Store::open(&path)?;
        store.lock().execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, 'future', 0)",
            [SCHEMA_VERSION + 1],
        )?;
        drop(store);
        let err = Store::open(&path).err().ok_or("must refuse")?;
        assert!(
            matches!(err, StoreError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1)
        );
        assert!(err.to_string().contains("newer Kiln"), "{err}");
        Ok(())
    }

    #[test]
    fn calls_round_trip_and_total() -> TestResult {
        let store = Store::open_in_memory()?;
        let a = call("smollm2-135m", Outcome::Stop, 10, 5);
        let mut b = call("smollm2-135m", Outcome::Error("busy".into()), 7, 0);
        b.ttft_ms = None;
        let c = call("all-minilm-l6-v2", Outcome::Length, 4, 0);
        let d = call("smollm2-135m", Outcome::Cancelled, 1, 1);
        for r in [&a, &b, &c, &d] {
            store.record_call(r)?;
        }
        let recent = store.recent_calls(3)?;
        let got: Vec<_> = recent.iter().map(|s| s.record.clone()).collect();
        assert_eq!(got, vec![d.clone(), c.clone(), b.clone()]);
        assert!(recent[0].id > recent[1].id);
        let totals = store.usage_totals()?;
        assert_eq!(
            totals,
            vec![
                UsageTotals {
                    model: "all-minilm-l6-v2".into(),
                    calls: 1,
                    errors: 0,
                    prompt_tokens: 4,
                    cached_tokens: 2,
                    completion_tokens: 0
                },
                UsageTotals {
                    model: "smollm2-135m".into(),
                    calls: 3,
                    errors: 1,
                    prompt_tokens: 18,
                    cached_tokens: 8,
                    completion_tokens: 6
                },
            ]
        );
        Ok(())
    }

    #[test]
    fn outcome_text_round_trips() {
        for o in [
            Outcome::Stop,
            Outcome::Length,
            Outcome::Cancelled,
            Outcome::Error("context_length_exceeded".into()),
        ] {
            assert_eq!(Outcome::from_db_text(&o.as_db_text()), Some(o));
        }
        assert_eq!(Outcome::from_db_text("weird"), None);
    }

    #[test]
    fn an_unknown_outcome_is_a_clear_error() -> TestResult {
        let store = Store::open_in_memory()?;
        let id = store.record_call(&call("m", Outcome::Stop, 1, 1))?;
        store.lock().execute(
            "UPDATE request_log SET outcome = 'exploded' WHERE id = ?1",
            [id],
        )?;
        let err = store.recent_calls(1).err().ok_or("must fail")?;
        assert!(matches!(err, StoreError::BadRow { .. }), "{err}");
        Ok(())
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kiln.db");
        std::fs::write(
            &path,
            b"this is not an SQLite database, just some text padding it out",
        )?;
        let err = Store::open(&path).err().ok_or("must fail")?;
        assert!(err.to_string().contains("kiln.db"), "{err}");
        Ok(())
    }

    #[test]
    fn files_use_wal() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("kiln.db"))?;
        let mode: String = store
            .lock()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        assert_eq!(mode, "wal");
        Ok(())
    }

    #[test]
    fn concurrent_writers_lose_nothing() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kiln.db");
        // Two stores on one file stand for two processes; four threads each.
        let stores = [Arc::new(Store::open(&path)?), Arc::new(Store::open(&path)?)];
        let per_thread = 50u64;
        let mut handles = Vec::new();
        for (s, store) in stores.iter().enumerate() {
            for t in 0..4u64 {
                let store = Arc::clone(store);
                handles.push(std::thread::spawn(move || -> Result<()> {
                    for i in 0..per_thread {
                        let mut r = call("m", Outcome::Stop, 1, 1);
                        r.request_id = format!("{s}-{t}-{i}");
                        store.record_call(&r)?;
                    }
                    Ok(())
                }));
            }
        }
        for h in handles {
            h.join().map_err(|_| "writer panicked")??;
        }
        let reader = Store::open(&path)?;
        let totals = reader.usage_totals()?;
        assert_eq!(totals.len(), 1);
        assert_eq!(totals[0].calls, 2 * 4 * per_thread);
        let distinct: i64 = reader.lock().query_row(
            "SELECT COUNT(DISTINCT request_id) FROM request_log",
            [],
            |r| r.get(0),
        )?;
        assert_eq!(distinct as u64, 2 * 4 * per_thread);
        Ok(())
    }

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Store>();
        let _: Option<Box<dyn CallLog>> = None;
    }
}
