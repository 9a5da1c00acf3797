//! Every environment variable Kiln reads, declared once with what it means.
//! Code reads them only through these constants.

/// Kiln's home directory: models under `models/`, `kiln.toml`, the request
/// log. Default `~/.kiln`.
pub const KILN_HOME: &str = "KILN_HOME";
/// Address to listen on. Default `127.0.0.1`.
pub const KILN_HOST: &str = "KILN_HOST";
/// Port to listen on; `0` picks a free one. Default `8080`.
pub const KILN_PORT: &str = "KILN_PORT";
/// Comma-separated text models to serve (`NAME`, `PATH` or `ALIAS=PATH`).
/// Default: every installed text model.
pub const KILN_MODELS: &str = "KILN_MODELS";
/// Embedding model to serve (`NAME` or directory). Default: the installed one,
/// if any.
pub const KILN_EMBEDDING_MODEL: &str = "KILN_EMBEDDING_MODEL";
/// Requests that may wait per model before new ones get 429. Default 16.
pub const KILN_QUEUE_CAPACITY: &str = "KILN_QUEUE_CAPACITY";
/// Sequences one model generates together (continuous batching). Default 16.
pub const KILN_MAX_BATCH: &str = "KILN_MAX_BATCH";
/// KV cache budget per model in MiB; past it new work waits or running
/// sequences are preempted and recomputed later. Default 512.
pub const KILN_KV_CACHE_MB: &str = "KILN_KV_CACHE_MB";
/// Largest request body accepted, in bytes. Default 8 MiB (a 10 MB body
/// is refused with 413).
pub const KILN_MAX_BODY_BYTES: &str = "KILN_MAX_BODY_BYTES";
/// Directory of the knowledge bases. Default `$KILN_HOME/kb`.
pub const KILN_KB_DIR: &str = "KILN_KB_DIR";
/// The URL other replicas reach this one at (e.g. `http://10.0.0.5:8080`),
/// to forward requests for the knowledge bases it holds. Default: none.
pub const KILN_ADVERTISE_URL: &str = "KILN_ADVERTISE_URL";
/// Largest document upload to a knowledge base, in MiB. Default 64.
pub const KILN_KB_MAX_UPLOAD_MB: &str = "KILN_KB_MAX_UPLOAD_MB";
/// Compute threads for the engine. Default: all cores.
pub const KILN_THREADS: &str = "KILN_THREADS";
/// Log filter in `tracing` syntax, e.g. `info` or `kiln_server=debug`.
/// Default `info`.
pub const KILN_LOG: &str = "KILN_LOG";
/// SQLite file of the usage ledger, keys and tenants. Default
/// `$KILN_HOME/kiln.db`.
pub const KILN_DATABASE: &str = "KILN_DATABASE";
/// Concurrent embedding batches. Default 2.
pub const KILN_EMBEDDING_CONCURRENCY: &str = "KILN_EMBEDDING_CONCURRENCY";
/// `1` or `true`: `/v1` accepts requests without an API key, charged to
/// the `local` tenant. Default: a key is required.
pub const KILN_NO_AUTH: &str = "KILN_NO_AUTH";
/// Seconds a replica's lease lasts without renewal; after that its open
/// reservations are settled as interrupted. Default 10.
pub const KILN_LEASE_SECONDS: &str = "KILN_LEASE_SECONDS";

/// Every variable above, for `--help` text and checks.
pub const ALL: &[&str] = &[
    KILN_HOME,
    KILN_HOST,
    KILN_PORT,
    KILN_MODELS,
    KILN_EMBEDDING_MODEL,
    KILN_QUEUE_CAPACITY,
    KILN_MAX_BATCH,
    KILN_KV_CACHE_MB,
    KILN_MAX_BODY_BYTES,
    KILN_KB_DIR,
    KILN_ADVERTISE_URL,
    KILN_KB_MAX_UPLOAD_MB,
    KILN_THREADS,
    KILN_LOG,
    KILN_EMBEDDING_CONCURRENCY,
    KILN_DATABASE,
    KILN_NO_AUTH,
    KILN_LEASE_SECONDS,
];
