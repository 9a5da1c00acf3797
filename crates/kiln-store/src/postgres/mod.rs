//! The PostgreSQL store, shared by several `kiln serve` replicas: the same
//! traits as the SQLite [`crate::Store`], with row locks (`SELECT ... FOR
//! UPDATE`) where SQLite takes its single write lock, so admissions on
//! different replicas never both spend the same balance.
//!
//! Connections come from a small pool; a connection that broke is dropped,
//! not reused. Each connection prepares a statement once and keeps it (see
//! [`Db`]), so a query is one round trip to the server, not two. Migrations are serialised across replicas that start together
//! by a transaction-scoped advisory lock.

mod accounts;
mod billing;
mod directory;
mod ledger;
mod runs;

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Row, Statement, Transaction};

use crate::error::{Result, StoreError};

/// How long a caller waits for a free connection before giving up: a pool
/// that stays exhausted this long means something holds connections (a stuck
/// query, a lock wait), and an error is better than a request hanging forever.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(30);

/// Statements one connection keeps prepared. More distinct statements
/// than this means SQL is being built from values somewhere; the cache then
/// starts over rather than grow.
const MAX_STATEMENTS: usize = 512;

/// The advisory lock key migrations hold ("kiln" in ASCII).
const MIGRATION_LOCK: i64 = 0x6b69_6c6e;

struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// PostgreSQL migrations, in order, numbered from 1 without gaps.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "schema",
        sql: include_str!("../../migrations/postgres/0001_schema.sql"),
    },
    Migration {
        version: 2,
        name: "key_priority",
        sql: include_str!("../../migrations/postgres/0002_key_priority.sql"),
    },
    Migration {
        version: 3,
        name: "key_groups",
        sql: include_str!("../../migrations/postgres/0003_key_groups.sql"),
    },
    Migration {
        version: 4,
        name: "knowledge_bases",
        sql: include_str!("../../migrations/postgres/0004_knowledge_bases.sql"),
    },
    Migration {
        version: 5,
        name: "runs",
        sql: include_str!("../../migrations/postgres/0005_runs.sql"),
    },
    Migration {
        version: 6,
        name: "step_paths",
        sql: include_str!("../../migrations/postgres/0006_step_paths.sql"),
    },
    Migration {
        version: 7,
        name: "cluster_secret",
        sql: include_str!("../../migrations/postgres/0007_cluster_secret.sql"),
    },
];

/// The newest PostgreSQL schema version this build understands.
pub const PG_SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Whether a database setting names PostgreSQL rather than a SQLite file.
pub fn is_postgres_url(spec: &str) -> bool {
    spec.starts_with("postgres://") || spec.starts_with("postgresql://")
}

/// The store on PostgreSQL.
pub struct PgStore {
    config: postgres::Config,
    /// `user@host:port/dbname`, for messages (never the password).
    target: String,
    idle: Mutex<Vec<Pooled>>,
    /// Connections open (idle or lent), bounded by `max`.
    open: Mutex<usize>,
    freed: Condvar,
    max: usize,
    checkout_timeout: Duration,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// An open connection and the statements it has prepared.
struct Pooled {
    client: Client,
    statements: Statements,
}

/// The statements a connection has prepared, by their SQL text.
#[derive(Default)]
pub(crate) struct Statements {
    by_sql: HashMap<String, Statement>,
}

impl Statements {
    /// `sql` prepared on `client`'s connection: from the cache, or parsed
    /// now (one round trip) and kept.
    fn get(
        &mut self,
        client: &mut impl GenericClient,
        sql: &str,
    ) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.by_sql.get(sql) {
            return Ok(statement.clone());
        }
        let statement = client.prepare(sql)?;
        if self.by_sql.len() >= MAX_STATEMENTS {
            self.by_sql.clear();
        }
        self.by_sql.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

/// Queries through a connection's prepared statements: what the store's
/// code calls instead of the driver's `query` family, which prepares the
/// statement again on every call (a second round trip each time).
pub(crate) trait Db {
    /// The driver's handle (a connection or a transaction on it).
    type Client: GenericClient;

    fn parts(&mut self) -> (&mut Self::Client, &mut Statements);

    /// Runs `run` with `sql` prepared. A statement whose cached plan went
    /// stale (another replica migrated the schema under it) empties the
    /// cache, so the next call prepares afresh.
    fn prepared<T>(
        &mut self,
        sql: &str,
        run: impl FnOnce(&mut Self::Client, &Statement) -> Result<T, postgres::Error>,
    ) -> Result<T, postgres::Error> {
        let (client, statements) = self.parts();
        let statement = statements.get(client, sql)?;
        let out = run(client, &statement);
        if let Err(e) = &out {
            if e.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED) {
                statements.by_sql.clear();
            }
        }
        out
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        self.prepared(sql, |c, s| c.query(s, params))
    }

    fn query_one(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        self.prepared(sql, |c, s| c.query_one(s, params))
    }

    fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        self.prepared(sql, |c, s| c.query_opt(s, params))
    }

    fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        self.prepared(sql, |c, s| c.execute(s, params))
    }
}

/// A pooled connection; goes back to the pool when dropped, unless broken.
pub(crate) struct Conn<'a> {
    store: &'a PgStore,
    pooled: Option<Pooled>,
}

impl Conn<'_> {
    fn pooled(&mut self) -> &mut Pooled {
        // Present from creation until drop.
        self.pooled.as_mut().unwrap_or_else(|| unreachable!())
    }

    /// Starts a transaction that queries through this connection's
    /// prepared statements.
    pub(crate) fn transaction(&mut self) -> Result<Tx<'_>, postgres::Error> {
        let Pooled { client, statements } = self.pooled();
        Ok(Tx {
            tx: client.transaction()?,
            statements,
        })
    }
}

impl Db for Conn<'_> {
    type Client = Client;

    fn parts(&mut self) -> (&mut Client, &mut Statements) {
        let Pooled { client, statements } = self.pooled();
        (client, statements)
    }
}

/// A transaction on a pooled connection; rolled back when dropped
/// without [`Tx::commit`].
pub(crate) struct Tx<'a> {
    tx: Transaction<'a>,
    statements: &'a mut Statements,
}

impl Tx<'_> {
    pub(crate) fn commit(self) -> Result<(), postgres::Error> {
        self.tx.commit()
    }

    pub(crate) fn rollback(self) -> Result<(), postgres::Error> {
        self.tx.rollback()
    }
}

impl<'a> Db for Tx<'a> {
    type Client = Transaction<'a>;

    fn parts(&mut self) -> (&mut Transaction<'a>, &mut Statements) {
        (&mut self.tx, self.statements)
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let Some(pooled) = self.pooled.take() else {
            return;
        };
        if pooled.client.is_closed() {
            *self
                .store
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner) -= 1;
        } else {
            self.store
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(pooled);
        }
        self.store.freed.notify_one();
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user:pass@host:port/db`, with
    /// `?options=-csearch_path%3D...` for a schema) with up to `pool_size`
    /// connections, and brings the schema up to date.
    pub fn connect(url: &str, pool_size: usize) -> Result<PgStore> {
        let config: postgres::Config = url.parse().map_err(|e| StoreError::PgConfig {
            reason: crate::error::pg_reason(&e),
        })?;
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let target = format!(
            "{}@{}:{port}/{}",
            config.get_user().unwrap_or(""),
            hosts.join(","),
            config.get_dbname().unwrap_or("")
        );
        let mut config = config;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let store = PgStore {
            config,
            target,
            idle: Mutex::new(Vec::new()),
            open: Mutex::new(0),
            freed: Condvar::new(),
            max: pool_size.max(1),
            checkout_timeout: CHECKOUT_TIMEOUT,
        };
        let mut conn = store.conn()?;
        migrate(&mut conn.pooled().client, &store.target)?;
        drop(conn);
        Ok(store)
    }

    fn connect_one(&self) -> Result<Client> {
        self.config
            .connect(NoTls)
            .map_err(|error| StoreError::PgConnect {
                target: self.target.clone(),
                error,
            })
    }

    /// A connection from the pool, waiting while all are lent (up to
    /// [`CHECKOUT_TIMEOUT`]).
    pub(crate) fn conn(&self) -> Result<Conn<'_>> {
        let deadline = Instant::now() + self.checkout_timeout;
        loop {
            if let Some(pooled) = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()
            {
                if pooled.client.is_closed() {
                    *self.open.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
                    continue;
                }
                return Ok(Conn {
                    store: self,
                    pooled: Some(pooled),
                });
            }
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            if *open < self.max {
                *open += 1;
                drop(open);
                return match self.connect_one() {
                    Ok(client) => Ok(Conn {
                        store: self,
                        pooled: Some(Pooled {
                            client,
                            statements: Statements::default(),
                        }),
                    }),
                    Err(e) => {
                        *self.open.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::PgPoolExhausted {
                    target: self.target.clone(),
                    size: self.max,
                    waited_ms: u64::try_from(self.checkout_timeout.as_millis()).unwrap_or(u64::MAX),
                });
            }
            // Bounded, so a wake-up missed between the idle check and the
            // wait costs at most this long.
            let wait = (deadline - now).min(Duration::from_millis(100));
            let (guard, _) = self
                .freed
                .wait_timeout(open, wait)
                .unwrap_or_else(PoisonError::into_inner);
            drop(guard);
        }
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64> {
        current_version(&mut self.conn()?.pooled().client)
    }
}

fn current_version(client: &mut Client) -> Result<i64> {
    let row = client.query_one(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        &[],
    )?;
    Ok(row.get(0))
}

fn migrate(client: &mut Client, target: &str) -> Result<()> {
    // Under the lock too: concurrent CREATE TABLE IF NOT EXISTS can collide.
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    BIGINT PRIMARY KEY,
             name       TEXT   NOT NULL,
             applied_at BIGINT NOT NULL
         )",
    )?;
    tx.commit()?;
    for m in MIGRATIONS {
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        let current: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )?
            .get(0);
        if current > PG_SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: target.into(),
                found: current,
                supported: PG_SCHEMA_VERSION,
            });
        }
        if m.version <= current {
            continue;
        }
        tx.batch_execute(m.sql)
            .map_err(|error| StoreError::PgMigration {
                target: target.to_string(),
                version: m.version,
                name: m.name,
                error,
            })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &crate::now_ms()],
        )?;
        tx.commit()?;
    }
    let current = current_version(client)?;
    if current > PG_SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: target.into(),
            found: current,
            supported: PG_SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// A `u64` count as a BIGINT.
pub(crate) fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A BIGINT count as a `u64` (never negative: the schema checks).
pub(crate) fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.name);
        }
    }

    /// With every connection lent, a caller gets an error naming the pool
    /// rather than waiting forever. Needs `KILN_TEST_PG_URL` (the
    /// integration tests insist on it; this one just returns without it).
    #[test]
    fn an_exhausted_pool_times_out_with_a_clear_error() -> Result<(), Box<dyn std::error::Error>> {
        let Some(url) = std::env::var("KILN_TEST_PG_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            return Ok(());
        };
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut admin = Client::connect(&url, NoTls)?;
        admin.batch_execute(&format!("CREATE SCHEMA {schema}"))?;
        let sep = if url.contains('?') { '&' } else { '?' };
        let result = (|| -> Result<(), Box<dyn std::error::Error>> {
            let mut store =
                PgStore::connect(&format!("{url}{sep}options=-csearch_path%3D{schema}"), 1)?;
            store.checkout_timeout = Duration::from_millis(300);
            let held = store.conn()?;
            let started = Instant::now();
            let err = store
                .conn()
                .err()
                .ok_or("a second connection from a pool of one")?;
            assert!(started.elapsed() >= Duration::from_millis(300));
            assert!(
                matches!(err, StoreError::PgPoolExhausted { size: 1, .. }),
                "{err}"
            );
            assert!(err.to_string().contains("all 1 connections"), "{err}");
            drop(held);
            // Given back, it is lent again.
            store.conn()?;
            Ok(())
        })();
        admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;
        result
    }

    /// A statement is prepared once per connection and reused; after
    /// another client changes a table under a cached plan, at most one
    /// call fails and the next prepares afresh. Needs `KILN_TEST_PG_URL`.
    #[test]
    fn statements_are_prepared_once_and_survive_a_schema_change(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let Some(url) = std::env::var("KILN_TEST_PG_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            return Ok(());
        };
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut admin = Client::connect(&url, NoTls)?;
        admin.batch_execute(&format!("CREATE SCHEMA {schema}"))?;
        let sep = if url.contains('?') { '&' } else { '?' };
        let result = (|| -> Result<(), Box<dyn std::error::Error>> {
            let store =
                PgStore::connect(&format!("{url}{sep}options=-csearch_path%3D{schema}"), 1)?;
            let mut conn = store.conn()?;
            conn.execute("CREATE TABLE things (id BIGINT)", &[])?;
            const READ: &str = "SELECT * FROM things WHERE id > $1";
            for _ in 0..3 {
                conn.query(READ, &[&0_i64])?;
                let mut tx = conn.transaction()?;
                tx.query(READ, &[&0_i64])?;
                tx.commit()?;
            }
            let prepared: i64 = conn
                .query_one(
                    "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1",
                    &[&READ],
                )?
                .get(0);
            assert_eq!(prepared, 1);
            admin.batch_execute(&format!("ALTER TABLE {schema}.things ADD COLUMN name TEXT"))?;
            conn.execute(&format!("INSERT INTO {schema}.things VALUES (1, 'a')"), &[])?;
            let rows = conn
                .query(READ, &[&0_i64])
                .or_else(|_| conn.query(READ, &[&0_i64]))?;
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].len(), 2, "the new column is read");
            Ok(())
        })();
        admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;
        result
    }

    #[test]
    fn urls_are_recognised() {
        assert!(is_postgres_url("postgres://u@h/db"));
        assert!(is_postgres_url("postgresql://h/db"));
        assert!(!is_postgres_url("/var/lib/kiln.db"));
    }

    #[test]
    fn a_bad_url_is_a_clear_error_without_the_password() {
        let err = PgStore::connect("postgres://kiln:s3cret@127.0.0.1:1/kiln", 1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("kiln@127.0.0.1:1/kiln"), "{err}");
        assert!(err.contains("error connecting to server: "), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let err = PgStore::connect("postgres://kiln@host:notaport/x", 1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("PostgreSQL URL"), "{err}");
        assert!(err.contains("`port`"), "{err}");
    }
}
