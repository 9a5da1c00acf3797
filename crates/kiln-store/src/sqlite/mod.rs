//! The SQLite store: one file (`<home>/kiln.db`) in WAL mode, so readers
//! never block the writer, with a busy timeout so concurrent writers (other
//! threads, or other processes on the same file) wait instead of failing.
//!
//! Invariant: a database is used only at exactly [`SCHEMA_VERSION`]; opening
//! migrates an older one forward and refuses a newer one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::error::{Result, StoreError};

mod accounts;
mod billing;
mod directory;
mod ledger;
mod runs;

/// How long a writer waits for another writer's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A numbered migration.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// SQLite migrations, in order, numbered from 1 without gaps.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "request_log",
        sql: include_str!("../../migrations/sqlite/0001_request_log.sql"),
    },
    Migration {
        version: 2,
        name: "request_log_text_ids",
        sql: include_str!("../../migrations/sqlite/0002_request_log_text_ids.sql"),
    },
    Migration {
        version: 3,
        name: "tenants_keys_billing",
        sql: include_str!("../../migrations/sqlite/0003_tenants_keys_billing.sql"),
    },
    Migration {
        version: 4,
        name: "key_priority",
        sql: include_str!("../../migrations/sqlite/0004_key_priority.sql"),
    },
    Migration {
        version: 5,
        name: "key_groups",
        sql: include_str!("../../migrations/sqlite/0005_key_groups.sql"),
    },
    Migration {
        version: 6,
        name: "knowledge_bases",
        sql: include_str!("../../migrations/sqlite/0006_knowledge_bases.sql"),
    },
    Migration {
        version: 7,
        name: "runs",
        sql: include_str!("../../migrations/sqlite/0007_runs.sql"),
    },
    Migration {
        version: 8,
        name: "step_paths",
        sql: include_str!("../../migrations/sqlite/0008_step_paths.sql"),
    },
    Migration {
        version: 9,
        name: "cluster_secret",
        sql: include_str!("../../migrations/sqlite/0009_cluster_secret.sql"),
    },
    Migration {
        version: 10,
        name: "compact_billing_tables",
        sql: include_str!("../../migrations/sqlite/0010_compact_billing_tables.sql"),
    },
];

/// The newest schema version this build understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Where `kiln serve` keeps its SQLite database inside its home directory.
pub fn default_db_path(home: &Path) -> PathBuf {
    home.join("kiln.db")
}

/// The SQLite store. One connection behind a mutex: SQLite serialises
/// writers anyway, and WAL lets other processes read meanwhile.
pub struct Store {
    conn: Mutex<Connection>,
    /// Set by the checkpointer when writers outrun it: the next user of
    /// the connection finishes the checkpoint first (see [`Checkpointer`]).
    catch_up: Arc<AtomicBool>,
    /// Stops the background checkpointer (file databases only) when the
    /// store is dropped.
    checkpointer: Option<Checkpointer>,
    /// The file as opened, checked before each use (file databases only).
    file: Option<FileIdentity>,
}

/// A database file's identity when it was opened. If the file is deleted or
/// replaced while the server runs, SQLite would go on writing into the
/// unlinked inode and every write would be lost at the next start; checking
/// the path still names the same file (one `stat`, about a microsecond)
/// turns that into an error instead.
struct FileIdentity {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> Option<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileIdentity {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    fn check(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => Ok(()),
            _ => Err(StoreError::Gone {
                path: self.path.clone(),
            }),
        }
    }
}

/// Copies the WAL back into the database file from its own thread and
/// connection, so no request pays for a checkpoint's fsync (the request
/// connection's automatic checkpoints are off). A passive checkpoint never
/// waits for readers or writers.
///
/// Under steady writes a passive checkpoint never quite catches up: frames
/// land while it copies, the log is never wholly in the database, so SQLite
/// never starts it over and the WAL file grows without end (hundreds of
/// megabytes a minute under gateway load, each new frame also paying for
/// the file system to allocate and zero its block). So when a passive pass
/// finds more than [`WAL_CATCH_UP_FRAMES`] in the log, the store's next user
/// runs one more pass on the store's own connection before its work, when
/// no write of this process can land: it copies only what came in since
/// the checkpointer's passes, and the next write starts the log over. The file then
/// keeps the size of the largest round; it no longer grows.
struct Checkpointer {
    stop: Arc<AtomicBool>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Prepared statements kept per connection: every statement of a request's
/// path (authentication, admission, settlement) stays parsed, with the
/// runs', reports' and knowledge bases' beside them.
const STATEMENT_CACHE: usize = 128;

/// How long a call made [`crate::without_waiting`] tries for the
/// connection before giving up.
const NO_WAIT_SPIN: Duration = Duration::from_micros(200);

/// How often the checkpointer runs: every half second, and every tenth of
/// one while writers keep the log past [`WAL_CATCH_UP_FRAMES`].
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
const CHECKPOINT_BUSY_EVERY: Duration = Duration::from_millis(100);

/// Frames the log may hold (64 MiB of WAL at 4 KiB pages) before the
/// store's connection checkpoints it, so that its next write starts it
/// over. A bounded log keeps writes in blocks the file already has: each
/// frame past the file's end costs the file system a newly zeroed block,
/// which under gateway load cost more than the writes themselves. A long
/// bound makes the catch-up rare: its pass (and the database file's sync)
/// runs in front of one request's store call, and at 1,000 frames it ran
/// twice a second at 100 requests/s (bench/README.md).
const WAL_CATCH_UP_FRAMES: i64 = 16384;

/// One passive checkpoint: `(frames in the log, frames now in the
/// database)`; `None` when it could not run (busy, or the file gone),
/// which the next round retries.
fn passive_checkpoint(conn: &Connection) -> Option<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    })
    .ok()
}

fn spawn_checkpointer(path: &Path, catch_up: Arc<AtomicBool>) -> Option<Checkpointer> {
    let conn = Connection::open(path).ok()?;
    conn.busy_timeout(BUSY_TIMEOUT).ok()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("kiln-sqlite-checkpoint".into())
        .spawn(move || {
            let mut every = CHECKPOINT_EVERY;
            while !flag.load(Ordering::Acquire) {
                std::thread::sleep(every);
                every = CHECKPOINT_EVERY;
                // `log` counts the frames since the log last started over:
                // past the mark, it is not starting over by itself.
                if let Some((log, _)) = passive_checkpoint(&conn) {
                    if log > WAL_CATCH_UP_FRAMES {
                        // Copy what landed during that pass too, so the
                        // store's own pass has only a moment's worth left.
                        passive_checkpoint(&conn);
                        catch_up.store(true, Ordering::Release);
                        every = CHECKPOINT_BUSY_EVERY;
                    }
                }
            }
        })
        .ok()?;
    Some(Checkpointer { stop })
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
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Setting journal_mode answers with the mode now in force.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        // NORMAL is durable across application crashes in WAL mode; a power
        // loss may drop the last few calls, never corrupt the file.
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(open_err)?;
        let mut store = Self::with_connection(conn, path)?;
        store.file = FileIdentity::of(path);
        store.checkpointer = spawn_checkpointer(path, store.catch_up.clone());
        if store.checkpointer.is_some() {
            store
                .lock()?
                .execute_batch("PRAGMA wal_autocheckpoint = 0")
                .map_err(open_err)?;
        }
        Ok(store)
    }

    /// A private in-memory database (tests, runs without a store file).
    pub fn open_in_memory() -> Result<Store> {
        let path = Path::new(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::with_connection(conn, path)
    }

    fn with_connection(mut conn: Connection, path: &Path) -> Result<Store> {
        migrate(&mut conn, path)?;
        Ok(Store {
            conn: Mutex::new(conn),
            catch_up: Arc::new(AtomicBool::new(false)),
            checkpointer: None,
            file: None,
        })
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64> {
        current_version(&*self.lock()?)
    }

    /// The connection, once the database file is known to be still there.
    fn lock(&self) -> Result<MutexGuard<'_, Connection>> {
        if let Some(f) = &self.file {
            f.check()?;
        }
        let no_wait = crate::waiting_refused();
        let conn = if no_wait {
            self.conn_within(NO_WAIT_SPIN)?
        } else {
            self.conn_unchecked()
        };
        // SQLite's own wait for another process's write lock.
        conn.busy_timeout(if no_wait {
            Duration::ZERO
        } else {
            BUSY_TIMEOUT
        })?;
        if self.catch_up.swap(false, Ordering::AcqRel) {
            passive_checkpoint(&conn);
        }
        Ok(conn)
    }

    /// The connection if it is free within `spin` (other threads hold it for
    /// a transaction of well under a millisecond; a long report longer).
    fn conn_within(&self, spin: Duration) -> Result<MutexGuard<'_, Connection>> {
        let started = std::time::Instant::now();
        loop {
            match self.conn.try_lock() {
                Ok(conn) => return Ok(conn),
                Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if started.elapsed() < spin => {
                    std::thread::yield_now();
                }
                Err(std::sync::TryLockError::WouldBlock) => return Err(StoreError::WouldWait),
            }
        }
    }

    fn conn_unchecked(&self) -> MutexGuard<'_, Connection> {
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

fn refuse_newer(current: i64, path: &Path) -> Result<()> {
    if current > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Applies every migration newer than the database's version, each in an
/// IMMEDIATE transaction (taking the write lock first), so two processes
/// opening the same file at once do not both apply it.
fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT    NOT NULL,
             applied_at INTEGER NOT NULL
         )",
    )?;
    refuse_newer(current_version(conn)?, path)?;
    for m in MIGRATIONS {
        let err = |source| StoreError::Migration {
            path: path.to_path_buf(),
            version: m.version,
            name: m.name,
            source,
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let current = current_version(&tx)?;
        refuse_newer(current, path)?;
        if m.version <= current {
            continue;
        }
        tx.execute_batch(m.sql).map_err(err)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![m.version, m.name, crate::now_ms()],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::calls::{CallLog, CallRecord, ModelUsage, Outcome};
    use crate::endpoint;
    use crate::money::Money;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn call(model: &str, outcome: Outcome, prompt: u64, completion: u64) -> CallRecord {
        CallRecord {
            created_at_ms: now(),
            request_id: format!("req-{model}-{prompt}-{completion}"),
            endpoint: endpoint::CHAT_COMPLETIONS.into(),
            model: model.into(),
            prompt_tokens: prompt,
            cached_tokens: prompt / 2,
            completion_tokens: completion,
            outcome,
            latency_ms: 120,
            ttft_ms: Some(15),
            caller: None,
            backend: "embedded".into(),
            prices: None,
            cost: Money::ZERO,
        }
    }

    fn now() -> i64 {
        crate::now_ms()
    }

    fn count(store: &Store, sql: &str) -> rusqlite::Result<i64> {
        store.conn_unchecked().query_row(sql, [], |r| r.get(0))
    }

    #[test]
    fn migrations_are_numbered_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.name);
        }
        assert_eq!(SCHEMA_VERSION, MIGRATIONS.len() as i64);
    }

    #[test]
    fn migrations_are_idempotent() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("nested/kiln.db");
        let store = Store::open(&path)?;
        assert_eq!(store.schema_version()?, SCHEMA_VERSION);
        store.record_call(&call("m", Outcome::Stop, 3, 4))?;
        drop(store);
        for _ in 0..2 {
            let store = Store::open(&path)?;
            assert_eq!(store.schema_version()?, SCHEMA_VERSION);
            assert_eq!(store.recent_calls(None, 10)?.len(), 1);
            let applied = count(&store, "SELECT COUNT(*) FROM schema_migrations")?;
            assert_eq!(applied, MIGRATIONS.len() as i64);
        }
        Ok(())
    }

    #[test]
    fn an_old_database_gets_only_the_new_migrations() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kiln.db");
        // A database as the first release left it: migration 1 and one row.
        {
            let conn = Connection::open(&path)?;
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,
                     name TEXT NOT NULL, applied_at INTEGER NOT NULL);
                 INSERT INTO schema_migrations VALUES (1, 'request_log', 7);",
            )?;
            conn.execute_batch(MIGRATIONS[0].sql)?;
            conn.execute(
                "INSERT INTO request_log (created_at, request_id, endpoint, model, prompt_tokens,
                     cached_tokens, completion_tokens, outcome, latency_ms, ttft_ms)
                 VALUES (5, 'r1', '/v1/chat/completions', 'm', 10, 0, 3, 'error:busy', 9, NULL)",
                [],
            )?;
        }
        let store = Store::open(&path)?;
        assert_eq!(store.schema_version()?, SCHEMA_VERSION);
        // Migration 1 was not applied again: its applied_at is untouched.
        let first = count(
            &store,
            "SELECT applied_at FROM schema_migrations WHERE version = 1",
        )?;
        assert_eq!(first, 7);
        let calls = store.recent_calls(None, 10)?;
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].id, "legacy-1");
        assert_eq!(calls[0].record.outcome, Outcome::Error("busy".into()));
        assert_eq!(calls[0].record.ttft_ms, None);
        store.record_call(&call("m", Outcome::Ok, 1, 0))?;
        assert_eq!(store.usage_totals()?[0].calls, 2);
        Ok(())
    }

    #[test]
    fn compacting_the_billing_tables_keeps_their_rows() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kiln.db");
        // A database at migration 9 with a call in flight and a month's spend.
        {
            let mut conn = Connection::open(&path)?;
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,
                     name TEXT NOT NULL, applied_at INTEGER NOT NULL);",
            )?;
            let tx = conn.transaction()?;
            for m in &MIGRATIONS[..9] {
                tx.execute_batch(m.sql)?;
                tx.execute(
                    "INSERT INTO schema_migrations VALUES (?1, ?2, 0)",
                    params![m.version, m.name],
                )?;
            }
            tx.execute_batch(
                "INSERT INTO tenants (id, name, created_at) VALUES ('ten-1', 'acme', 0);
                 INSERT INTO reservations (id, replica_id, created_at, tenant_id, request_id,
                     endpoint, model, backend, prompt_tokens, max_completion_tokens, amount_nanos)
                 VALUES ('use-1', 'rep-1', 5, 'ten-1', 'r1', '/v1/completions', 'm', 'embedded',
                     10, 20, 300);
                 INSERT INTO monthly_spend VALUES ('ten-1', '2026-11', 42);",
            )?;
            tx.commit()?;
        }
        let store = Store::open(&path)?;
        assert_eq!(store.schema_version()?, SCHEMA_VERSION);
        let open = crate::Billing::open_reservations(&store)?;
        assert_eq!(open.len(), 1);
        assert_eq!((open[0].id.as_str(), open[0].amount), ("use-1", Money(300)));
        assert_eq!(
            count(
                &store,
                "SELECT spent_nanos FROM monthly_spend WHERE account = 'ten-1'"
            )?,
            42
        );
        let plain: i64 = store.conn_unchecked().query_row(
            "SELECT count(*) FROM sqlite_schema
             WHERE name IN ('reservations', 'monthly_spend') AND sql LIKE '%WITHOUT ROWID%'",
            [],
            |r| r.get(0),
        )?;
        assert_eq!(plain, 2);
        Ok(())
    }

    #[test]
    fn a_newer_schema_is_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kiln.db");
        let store = Store::open(&path)?;
        store.conn_unchecked().execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, 'future', 0)",
            [SCHEMA_VERSION + 1],
        )?;
        drop(store);
        let err = Store::open(&path).err().ok_or("must refuse")?;
        assert!(
            matches!(err, StoreError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1)
        );
        let text = err.to_string();
        assert!(
            text.contains("newer Kiln") && text.contains("kiln.db"),
            "{text}"
        );
        Ok(())
    }

    #[test]
    fn calls_round_trip_and_total() -> TestResult {
        let store = Store::open_in_memory()?;
        let a = call("smollm2-135m", Outcome::Stop, 10, 5);
        let mut b = call("smollm2-135m", Outcome::Error("busy".into()), 7, 0);
        b.ttft_ms = None;
        let mut c = call("all-minilm-l6-v2", Outcome::Ok, 4, 0);
        c.endpoint = endpoint::EMBEDDINGS.into();
        c.ttft_ms = None;
        let d = call("smollm2-135m", Outcome::Cancelled, 1, 1);
        let e = call("smollm2-135m", Outcome::Length, 2, 9);
        // Same millisecond for all: insertion order breaks the tie.
        for r in [&a, &b, &c, &d, &e] {
            let mut r = r.clone();
            r.created_at_ms = 1_700_000_000_000;
            store.record_call(&r)?;
        }
        let recent = store.recent_calls(None, 3)?;
        let got: Vec<_> = recent.iter().map(|s| s.record.model.clone()).collect();
        assert_eq!(got, ["smollm2-135m", "smollm2-135m", "all-minilm-l6-v2"]);
        assert_eq!(recent[0].record.outcome, Outcome::Length);
        assert_eq!(recent[2].record.endpoint, "embeddings");
        let mut expected = c.clone();
        expected.created_at_ms = 1_700_000_000_000;
        assert_eq!(recent[2].record, expected);
        assert!(recent.iter().all(|s| s.id.starts_with("call-")));
        assert_ne!(recent[0].id, recent[1].id);
        assert!(store.recent_calls(None, 0)?.is_empty());
        // Recency is by time, not by insertion: an old call recorded late
        // does not come first.
        let mut old = call("x", Outcome::Stop, 1, 1);
        old.created_at_ms = 1;
        store.record_call(&old)?;
        assert_eq!(
            store.recent_calls(None, 1)?[0].record.outcome,
            Outcome::Length
        );

        let totals = store.usage_totals()?;
        assert_eq!(
            totals,
            vec![
                ModelUsage {
                    model: "all-minilm-l6-v2".into(),
                    calls: 1,
                    errors: 0,
                    prompt_tokens: 4,
                    cached_tokens: 2,
                    completion_tokens: 0
                },
                ModelUsage {
                    model: "smollm2-135m".into(),
                    calls: 4,
                    errors: 1,
                    prompt_tokens: 20,
                    cached_tokens: 9,
                    completion_tokens: 15
                },
                ModelUsage {
                    model: "x".into(),
                    calls: 1,
                    errors: 0,
                    prompt_tokens: 1,
                    cached_tokens: 0,
                    completion_tokens: 1
                },
            ]
        );
        Ok(())
    }

    #[test]
    fn the_schema_refuses_unknown_outcomes_and_reads_report_them() -> TestResult {
        let store = Store::open_in_memory()?;
        store.record_call(&call("m", Outcome::Stop, 1, 1))?;
        let refused = store
            .conn_unchecked()
            .execute("UPDATE usage_ledger SET outcome = 'exploded'", []);
        assert!(refused.is_err(), "the CHECK constraint refuses it");
        let refused = store
            .conn_unchecked()
            .execute("UPDATE usage_ledger SET outcome = 'error:'", []);
        assert!(refused.is_err(), "an error needs a code");
        // A row that slipped past the constraint is an error naming the row.
        store.conn_unchecked().execute_batch(
            "PRAGMA ignore_check_constraints = ON;
             UPDATE usage_ledger SET outcome = 'exploded';",
        )?;
        let err = store.recent_calls(None, 1).err().ok_or("must fail")?;
        assert!(matches!(err, StoreError::BadRow { .. }), "{err}");
        assert!(err.to_string().contains("exploded"), "{err}");
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
    fn files_use_wal_and_a_busy_timeout() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("kiln.db"))?;
        let mode: String = store
            .conn_unchecked()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        assert_eq!(mode, "wal");
        let timeout = count(&store, "PRAGMA busy_timeout")?;
        assert_eq!(timeout, BUSY_TIMEOUT.as_millis() as i64);
        Ok(())
    }

    #[test]
    fn a_call_made_without_waiting_gives_up_at_once_and_does_nothing() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kiln.db");
        let store = Arc::new(Store::open(&path)?);
        let quick = std::time::Instant::now();
        crate::without_waiting(|| store.record_call(&call("m", Outcome::Stop, 1, 1)))?;
        // Another process holds the write lock: refused at once, not after
        // the 10 s busy timeout; once it lets go, the same call goes in.
        let other = Connection::open(&path)?;
        other.execute_batch("BEGIN EXCLUSIVE")?;
        let started = std::time::Instant::now();
        let err = crate::without_waiting(|| store.record_call(&call("m", Outcome::Stop, 2, 2)))
            .err()
            .ok_or("a locked database was written")?;
        assert!(err.would_wait(), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        other.execute_batch("ROLLBACK")?;
        // This process's connection held by a long call: refused too.
        let held = store.conn_unchecked();
        let s2 = store.clone();
        let refused = std::thread::spawn(move || {
            crate::without_waiting(|| s2.record_call(&call("m", Outcome::Stop, 3, 3)))
                .err()
                .is_some_and(|e| e.would_wait())
        })
        .join()
        .map_err(|_| "panicked")?;
        drop(held);
        assert!(refused);
        // Outside, calls wait as before; nothing refused went in.
        store.record_call(&call("m", Outcome::Stop, 4, 4))?;
        let totals = store.usage_totals()?;
        assert_eq!(totals[0].calls, 2);
        assert!(quick.elapsed() < Duration::from_secs(5));
        Ok(())
    }

    /// The WAL header's checkpoint sequence number (bytes 12..16, big
    /// endian): SQLite adds one each time the log starts over.
    fn wal_restarts(wal: &Path) -> std::io::Result<u32> {
        use std::io::Read;
        let mut header = [0u8; 16];
        std::fs::File::open(wal)?.read_exact(&mut header)?;
        Ok(u32::from_be_bytes([
            header[12], header[13], header[14], header[15],
        ]))
    }

    #[test]
    fn the_wal_starts_over_under_steady_writes() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kiln.db");
        let store = Store::open(&path)?;
        let wal = dir.path().join("kiln.db-wal");
        let (mut written, mut first, mut restarts) = (0u64, None, 0);
        let started = std::time::Instant::now();
        // Writes back to back, as a busy gateway does: a passive checkpoint
        // alone never sees the log wholly copied, so SQLite never starts it
        // over and the file grows by every frame written. With the
        // catch-up, the log starts over once a round passes the bound. How
        // many frames a round holds depends on how fast the disk syncs
        // (writes land while the passes sync), so the test counts the
        // restarts, not the file's bytes: on a slow disk a round is larger,
        // not endless. A slow disk gets a minute; a log that never starts
        // over stops the test at 2 GiB (about 15 s here).
        let mut wal_len = 0;
        while restarts < 2 && started.elapsed() < Duration::from_secs(60) && wal_len < 2 << 30 {
            for _ in 0..50 {
                let mut r = call("m", Outcome::Stop, 1, 1);
                r.request_id = format!("{written}-{}", "x".repeat(100));
                store.record_call(&r)?;
                written += 1;
            }
            let seq = wal_restarts(&wal)?;
            restarts = seq.wrapping_sub(*first.get_or_insert(seq));
            wal_len = std::fs::metadata(&wal)?.len();
        }
        assert!(
            restarts >= 2,
            "the log started over {restarts} times in {:?} ({written} writes, {} MiB of WAL)",
            started.elapsed(),
            wal_len >> 20
        );
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
        let distinct = count(
            &reader,
            "SELECT COUNT(DISTINCT request_id) FROM usage_ledger",
        )?;
        assert_eq!(distinct as u64, 2 * 4 * per_thread);
        Ok(())
    }

    #[test]
    fn a_deleted_database_file_is_an_error_not_silent_loss() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kiln.db");
        let store = Store::open(&path)?;
        store.record_call(&call("m", Outcome::Stop, 1, 1))?;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let err = store.record_call(&call("m", Outcome::Stop, 1, 1)).err();
        assert!(matches!(err, Some(StoreError::Gone { .. })), "{err:?}");
        assert!(store.recent_calls(None, 1).is_err());
        // A new file in its place is not the one this store opened either.
        drop(Store::open(&path)?);
        let err = store.record_call(&call("m", Outcome::Stop, 1, 1)).err();
        assert!(matches!(err, Some(StoreError::Gone { .. })), "{err:?}");
        Ok(())
    }

    #[test]
    fn a_full_database_fails_the_write_and_keeps_working() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("kiln.db"))?;
        let pages = count(&store, "PRAGMA page_count")?;
        store
            .conn_unchecked()
            .execute_batch(&format!("PRAGMA max_page_count = {}", pages + 2))?;
        let mut failed = None;
        for i in 0..10_000 {
            let mut r = call("m", Outcome::Stop, 1, 1);
            r.request_id = format!("{i}-{}", "x".repeat(200));
            if let Err(e) = store.record_call(&r) {
                failed = Some(e);
                break;
            }
        }
        let e = failed.ok_or("the database never filled up")?;
        assert!(e.to_string().contains("full"), "{e}");
        // Reads still work, and a write fits again once there is room.
        assert!(!store.recent_calls(None, 5)?.is_empty());
        store
            .conn_unchecked()
            .execute_batch("PRAGMA max_page_count = 1073741823")?;
        store.record_call(&call("m", Outcome::Stop, 1, 1))?;
        Ok(())
    }

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Store>();
        let _: Option<Arc<dyn crate::Database>> = None;
    }
}
