//! One knowledge base on disk: its documents, their chunks and vectors, and
//! the full-text index, kept consistent across crashes.
//!
//! # Layout
//! ```text
//! <dir>/kb.sqlite     settings, documents, versions, chunks (text, offsets, vectors)
//! <dir>/fulltext/     the tantivy index
//! <dir>/files/        uploaded originals, one per document version
//! <dir>/vectors.hnsw  the vector index's graph, while it is approximate (a cache)
//! ```
//!
//! # Consistency
//! The database is the source of truth. A document version becomes
//! searchable in one transaction that writes all its chunks and vectors and
//! makes it the document's live version (dropping the previous one's
//! chunks); the full-text index is then updated in one tantivy commit, and
//! the in-memory vector index and access map under the same lock. Until
//! that transaction commits nothing of the version exists anywhere, so a
//! failed or interrupted ingestion leaves no half index. When the knowledge
//! base opens, the full-text index is reconciled with the database: every
//! `doc@version` it holds that is not live is deleted, and every live
//! version it lacks (or holds partly) is re-added from the database. Search
//! results are also checked against the live map, so a chunk deleted a
//! moment ago is never returned even while a commit is in flight.
//!
//! Versions still queued or being ingested when the process died are
//! reported by [`KnowledgeBase::pending`] for the server to run again.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chunk::{self, ChunkOptions};
use crate::extract::{self, ExtractError, Limits};
use crate::fulltext::{Filter, FullText, IndexedChunk};
use crate::retrieve::{self, Fusion, Mode};
use crate::vector::{self, Opened, VectorIndex, APPROXIMATE_FROM};
use sql::{
    chunk_rows, document_row, input_hash, insert_version, open_db, visibility_param, ChunkRow,
    DOCUMENT_SELECT, VISIBLE,
};

mod ingest;
mod search;
mod sql;

/// What the knowledge base needs from an embedding model. The server's
/// implementation meters every call against the key that caused it.
pub trait Embedder: Send + Sync {
    /// The model's name; a knowledge base is pinned to it.
    fn model(&self) -> &str;
    fn dimensions(&self) -> usize;
    /// Most tokens of text one input may have (special tokens excluded).
    fn max_tokens(&self) -> usize;
    fn count_tokens(&self, text: &str) -> usize;
    fn embed(&self, texts: &[String]) -> std::result::Result<Vec<Vec<f32>>, EmbedError>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    /// The caller's budget or rate limit does not cover the call: ingestion
    /// stops and the document is marked `stopped`.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum KbError {
    #[error("{0}")]
    Invalid(String),
    #[error("document `{0}` not found")]
    DocumentNotFound(String),
    #[error("this knowledge base was built with embedding model `{built}`, not `{given}`")]
    WrongModel { built: String, given: String },
    #[error(transparent)]
    Extract(#[from] ExtractError),
    #[error("embedding: {0}")]
    Embed(#[from] EmbedError),
    #[error("knowledge-base storage: {0}")]
    Storage(String),
}

impl From<rusqlite::Error> for KbError {
    fn from(e: rusqlite::Error) -> Self {
        KbError::Storage(e.to_string())
    }
}

impl From<crate::fulltext::FullTextError> for KbError {
    fn from(e: crate::fulltext::FullTextError) -> Self {
        KbError::Storage(e.to_string())
    }
}

impl From<std::io::Error> for KbError {
    fn from(e: std::io::Error) -> Self {
        KbError::Storage(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, KbError>;

/// A knowledge base's fixed settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub id: String,
    pub tenant: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub embedding_model: String,
    pub dimensions: usize,
    pub chunking: ChunkOptions,
    /// The grounded answer's relevance gate and sentence check. A cosine
    /// threshold belongs to its embedding model: the default's is
    /// all-MiniLM-L6-v2's.
    #[serde(default)]
    pub grounding: crate::ground::Thresholds,
    pub created_ms: i64,
}

/// Where a document version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Ingesting,
    Ready,
    Failed,
    /// Stopped because the caller's budget ran out.
    Stopped,
    /// A newer version was uploaded before this one finished.
    Superseded,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Ingesting => "ingesting",
            Status::Ready => "ready",
            Status::Failed => "failed",
            Status::Stopped => "stopped",
            Status::Superseded => "superseded",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "queued" => Status::Queued,
            "ingesting" => Status::Ingesting,
            "ready" => Status::Ready,
            "stopped" => Status::Stopped,
            "superseded" => Status::Superseded,
            _ => Status::Failed,
        }
    }

    /// Whether ingestion of this version is over.
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::Ingesting)
    }
}

/// A document as listed: its latest version's state, and which version is
/// searchable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Document {
    pub id: String,
    pub name: String,
    pub groups: Vec<String>,
    pub metadata: HashMap<String, String>,
    /// The latest version uploaded.
    pub version: i64,
    /// The version search uses, if any is ready.
    pub live_version: Option<i64>,
    pub status: Status,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub format: Option<String>,
    pub size_bytes: i64,
    pub sha256: String,
    pub chunks: i64,
    pub tokens: i64,
    pub progress: Progress,
    pub created_ms: i64,
    pub updated_ms: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: i64,
    pub total: i64,
}

/// Which documents [`KnowledgeBase::list_documents`] returns.
#[derive(Debug, Clone, Default)]
pub struct DocumentQuery {
    /// Only documents one of these groups may see (unrestricted ones are
    /// seen by all); `None` lists every document.
    pub groups: Option<Vec<String>>,
    /// Only documents whose latest version has this status.
    pub status: Option<Status>,
    /// Continue after this document (the last one of the previous page).
    /// A document the caller may not see is not found.
    pub after: Option<String>,
    pub limit: usize,
}

#[derive(Debug, Clone)]
pub struct DocumentPage {
    pub documents: Vec<Document>,
    /// Whether more documents follow the last one.
    pub has_more: bool,
}

/// A new document (or version) as uploaded.
#[derive(Debug, Clone, Default)]
pub struct Upload {
    pub name: String,
    pub bytes: Vec<u8>,
    pub groups: Vec<String>,
    pub metadata: HashMap<String, String>,
    /// Who pays for its ingestion (the server's caller id, opaque here);
    /// kept with the version so an ingestion resumed after a restart is
    /// charged to the same key.
    pub charge_to: String,
}

/// A version waiting for ingestion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub doc: String,
    pub version: i64,
    pub charge_to: String,
}

/// What an upload did.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    pub document: Document,
    /// The content was already in the knowledge base: nothing was queued.
    pub duplicate: bool,
}

/// A search request.
#[derive(Debug, Clone)]
pub struct Query {
    pub text: String,
    pub k: usize,
    pub mode: Mode,
    pub fusion: Fusion,
    pub filter: Filter,
}

/// One retrieved chunk, with what a citation needs.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Hit {
    pub chunk_id: u64,
    pub document_id: String,
    pub document_name: String,
    pub version: i64,
    pub heading: String,
    pub text: String,
    /// Character offsets of `text` in the document's extracted text.
    pub start: usize,
    pub end: usize,
    /// The fused score (or the single side's score outside hybrid mode).
    pub score: f32,
    /// (rank, BM25 score) on the full-text side, when found there.
    pub bm25: Option<(usize, f32)>,
    /// (rank, cosine similarity) on the vector side, when found there.
    pub vector: Option<(usize, f32)>,
    /// The reranker's score, when a reranker ordered the results.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rerank: Option<f32>,
}

/// Who may see a live document's chunks, and its metadata for filters.
#[derive(Debug)]
struct Access {
    version: i64,
    groups: Vec<String>,
    metadata: Vec<(String, String)>,
    chunk_ids: Vec<u64>,
}

impl Access {
    fn allows(&self, f: &Filter) -> bool {
        let group_ok = match &f.groups {
            None => true,
            Some(mine) => self.groups.is_empty() || self.groups.iter().any(|g| mine.contains(g)),
        };
        group_ok && f.metadata.iter().all(|kv| self.metadata.contains(kv))
    }
}

/// Where the vector index's graph is saved, under the knowledge base's
/// directory.
const GRAPH_FILE: &str = "vectors.hnsw";

/// What search reads: live documents and the vector index.
#[derive(Debug, Default)]
struct Live {
    docs: HashMap<String, Access>,
    chunk_doc: HashMap<u64, String>,
    vectors: VectorIndex,
}

impl Live {
    fn allows(&self, chunk: u64, f: &Filter) -> bool {
        self.chunk_doc
            .get(&chunk)
            .and_then(|d| self.docs.get(d))
            .is_some_and(|a| a.allows(f))
    }

    fn remove_doc(&mut self, doc: &str) {
        if let Some(a) = self.docs.remove(doc) {
            for id in a.chunk_ids {
                self.chunk_doc.remove(&id);
                self.vectors.remove(id);
            }
        }
    }
}

pub struct KnowledgeBase {
    dir: PathBuf,
    settings: Settings,
    db: Mutex<Connection>,
    fulltext: FullText,
    live: RwLock<Live>,
    /// Serialises the steps that make versions live or delete them, so the
    /// database, the full-text index and the live map change in one order.
    commit: Mutex<()>,
    limits: Limits,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn vector_from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn doc_version(doc: &str, version: i64) -> String {
    format!("{doc}@{version}")
}

fn sorted_metadata(m: &HashMap<String, String>) -> Vec<(String, String)> {
    let mut v: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort();
    v
}

/// Checks a document name: what a file could be called.
fn check_name(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(KbError::Invalid("a document needs a name".into()));
    }
    if name.chars().count() > 255 || name.chars().any(char::is_control) {
        return Err(KbError::Invalid(
            "a document name must be at most 255 characters, without control characters".into(),
        ));
    }
    Ok(())
}

fn check_labels(what: &str, items: impl Iterator<Item = String>) -> Result<()> {
    for s in items {
        if s.is_empty()
            || s.len() > 128
            || s.contains('=')
            || s.chars().any(char::is_control)
            || s == crate::fulltext::PUBLIC_GROUP
        {
            return Err(KbError::Invalid(format!(
                "{what} `{}` is not allowed: use 1 to 128 printable characters, no `=`, not `*`",
                s.escape_debug()
            )));
        }
    }
    Ok(())
}

/// What [`KnowledgeBase::count_visible`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisibleCounts {
    pub documents: usize,
    pub chunks: usize,
}

impl KnowledgeBase {
    /// Creates a knowledge base in the empty (or absent) directory `dir`.
    pub fn create(dir: &Path, settings: Settings) -> Result<KnowledgeBase> {
        if dir.join("kb.sqlite").exists() {
            return Err(KbError::Invalid(format!(
                "{} already holds a knowledge base",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir.join("files"))?;
        let conn = open_db(&dir.join("kb.sqlite"))?;
        let json = serde_json::to_string(&settings).map_err(|e| KbError::Storage(e.to_string()))?;
        conn.execute(
            "INSERT INTO settings (id, json) VALUES (1, ?1)",
            params![json],
        )?;
        drop(conn);
        Self::open(dir)
    }

    /// Opens the knowledge base in `dir`, reconciling its indexes with its
    /// database.
    pub fn open(dir: &Path) -> Result<KnowledgeBase> {
        Self::open_with_vector_threshold(dir, APPROXIMATE_FROM)
    }

    /// [`KnowledgeBase::open`] with the vector index approximate past
    /// `threshold` chunks instead of [`APPROXIMATE_FROM`]: for tests and
    /// measurements of the approximate path without tens of thousands of
    /// chunks.
    #[doc(hidden)]
    pub fn open_with_vector_threshold(dir: &Path, threshold: usize) -> Result<KnowledgeBase> {
        let conn = open_db(&dir.join("kb.sqlite"))?;
        let json: String = conn
            .query_row("SELECT json FROM settings WHERE id = 1", [], |r| r.get(0))
            .optional()?
            .ok_or_else(|| {
                KbError::Storage(format!("{} has no knowledge-base settings", dir.display()))
            })?;
        let settings: Settings = serde_json::from_str(&json)
            .map_err(|e| KbError::Storage(format!("unreadable settings: {e}")))?;
        std::fs::create_dir_all(dir.join("files"))?;
        let fulltext = FullText::open(&dir.join("fulltext"))?;
        let kb = KnowledgeBase {
            dir: dir.to_path_buf(),
            live: RwLock::new(Live {
                vectors: VectorIndex::new(settings.dimensions),
                ..Default::default()
            }),
            settings,
            db: Mutex::new(conn),
            fulltext,
            commit: Mutex::new(()),
            limits: Limits::default(),
        };
        kb.load(threshold)?;
        Ok(kb)
    }

    /// Sets the largest upload accepted (the extraction limits follow:
    /// extracted text and decompressed parts may be up to four times it).
    pub fn with_max_upload(mut self, bytes: usize) -> Self {
        self.limits.max_input_bytes = bytes;
        self.limits.max_text_bytes = self.limits.max_text_bytes.max(bytes);
        self.limits.max_uncompressed_bytes =
            self.limits.max_uncompressed_bytes.max(bytes as u64 * 4);
        self
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn file_path(&self, doc: &str, version: i64) -> PathBuf {
        self.dir.join("files").join(format!("{doc}.{version}"))
    }

    /// Loads live documents and vectors, and brings the full-text index in
    /// line with the database. The vector index's graph is read from its
    /// file when that matches the live vectors exactly, and built from them
    /// (and saved) otherwise.
    fn load(&self, vector_threshold: usize) -> Result<()> {
        let _commit = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let mut live = Live::default();
        let db = self.db();
        let live_chunks: i64 = db.query_row(
            "SELECT COUNT(*) FROM chunks c JOIN documents d
             ON d.id = c.doc_id AND d.live_version = c.version",
            [],
            |r| r.get(0),
        )?;
        let mut vectors = VectorIndex::restore(
            &self.dir.join(GRAPH_FILE),
            self.settings.dimensions,
            vector_threshold,
            live_chunks as usize,
        );
        let mut docs = db.prepare(
            "SELECT id, groups, metadata, live_version FROM documents WHERE live_version IS NOT NULL",
        )?;
        let rows = docs.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (id, groups, metadata, version) = row?;
            let groups: Vec<String> = serde_json::from_str(&groups).unwrap_or_default();
            let metadata: HashMap<String, String> =
                serde_json::from_str(&metadata).unwrap_or_default();
            live.docs.insert(
                id,
                Access {
                    version,
                    groups,
                    metadata: sorted_metadata(&metadata),
                    chunk_ids: Vec::new(),
                },
            );
        }
        drop(docs);
        let mut chunks = db.prepare("SELECT id, doc_id, version, vector FROM chunks")?;
        let mut stale = Vec::new();
        let rows = chunks.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        for row in rows {
            let (id, doc, version, vector) = row?;
            match live.docs.get_mut(&doc) {
                Some(a) if a.version == version => {
                    vectors
                        .insert(id, &vector_from_bytes(&vector))
                        .map_err(KbError::Storage)?;
                    a.chunk_ids.push(id);
                    live.chunk_doc.insert(id, doc);
                }
                _ => stale.push(id as i64),
            }
        }
        drop(chunks);
        let (vectors, opened) = vectors.finish();
        live.vectors = vectors;
        let kb = &self.settings.id;
        let chunks = live.vectors.len();
        match &opened {
            Opened::Exact => {}
            Opened::Loaded => tracing::info!(%kb, chunks, "vector graph read from its file"),
            Opened::Built(why) if why.is_damage() => {
                tracing::warn!(%kb, chunks, reason = %why, "vector graph rebuilt")
            }
            Opened::Built(why) => {
                tracing::info!(%kb, chunks, reason = %why, "vector graph rebuilt")
            }
        }
        // Chunks of versions that are not live cannot exist by construction;
        // if a bug ever leaves some, they are dropped here.
        for id in stale {
            db.execute("DELETE FROM chunks WHERE id = ?1", params![id])?;
        }
        // Full-text reconciliation.
        let indexed = self.fulltext.doc_versions()?;
        let mut remove: Vec<String> = Vec::new();
        let mut want: HashSet<String> = HashSet::new();
        for (doc, a) in &live.docs {
            let dv = doc_version(doc, a.version);
            if indexed.get(&dv).copied() != Some(a.chunk_ids.len() as u64) {
                if indexed.contains_key(&dv) {
                    remove.push(dv.clone());
                }
                if !a.chunk_ids.is_empty() {
                    want.insert(doc.clone());
                }
            }
        }
        for dv in indexed.keys() {
            let keep = dv
                .rsplit_once('@')
                .and_then(|(d, v)| Some((live.docs.get(d)?, v.parse::<i64>().ok()?)))
                .is_some_and(|(a, v)| a.version == v);
            if !keep {
                remove.push(dv.clone());
            }
        }
        if !remove.is_empty() || !want.is_empty() {
            tracing::info!(
                kb = %self.settings.id,
                removed = remove.len(),
                readded = want.len(),
                "reconciling the full-text index with the document list"
            );
            let mut rows = Vec::new();
            for doc in &want {
                rows.extend(chunk_rows(&db, doc)?);
            }
            let added: Vec<(String, &Access, &ChunkRow)> = rows
                .iter()
                .filter_map(|c| {
                    let a = live.docs.get(&c.doc)?;
                    Some((doc_version(&c.doc, a.version), a, c))
                })
                .collect();
            let indexed: Vec<IndexedChunk<'_>> = added
                .iter()
                .map(|(dv, a, c)| IndexedChunk {
                    id: c.id,
                    doc_version: dv,
                    groups: &a.groups,
                    metadata: &a.metadata,
                    text: &c.index_text,
                })
                .collect();
            let remove: Vec<&str> = remove.iter().map(String::as_str).collect();
            self.fulltext.replace(&remove, &indexed)?;
        }
        // A version that went live in the database but was not yet marked
        // ready when the process stopped is complete now.
        db.execute(
            "UPDATE versions SET status = 'ready', finished_ms = ?1
             WHERE status IN ('queued', 'ingesting')
               AND EXISTS (SELECT 1 FROM documents d WHERE d.id = versions.doc_id AND d.live_version = versions.version)",
            params![now_ms()],
        )?;
        drop(db);
        *self.live.write().unwrap_or_else(PoisonError::into_inner) = live;
        if !matches!(opened, Opened::Loaded) {
            self.save_vector_graph();
        }
        Ok(())
    }

    /// Brings [`GRAPH_FILE`] in line with the vector index: its graph while
    /// it is approximate, no file while it is exact. Called with `commit`
    /// held after every change to the live vectors (a commit of new
    /// versions, a delete, an open that rebuilt), so the file is written
    /// in the order of the changes.
    ///
    /// Saving at once, rather than on a timer or at close, keeps the file
    /// current without a background task, and is cheap next to what it
    /// follows: at 100,000 chunks of 384 dimensions the graph is 12 MB and
    /// a save took about 0.1 s (serialise and checksum, write, fsync,
    /// rename; `examples/vector_graph.rs`), the order of the full-text
    /// commit each change also makes, against minutes to rebuild the graph
    /// at open. Only serialising holds the live map, and only for reading,
    /// so searches go on meanwhile. A crash before the save leaves the
    /// previous file, which no longer matches the database and is rebuilt
    /// from it; a failed save removes the file for the same reason.
    fn save_vector_graph(&self) {
        let path = self.dir.join(GRAPH_FILE);
        let graph = self
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .vectors
            .graph_bytes();
        if let Err(e) = vector::store_graph(&path, graph.as_deref()) {
            tracing::warn!(kb = %self.settings.id, error = %e, "the vector graph could not be saved; the next open rebuilds it");
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Adds a document; its ingestion is queued (run it with
    /// [`KnowledgeBase::ingest`]). The same upload again (the same bytes
    /// under the same name, groups and metadata as a document's latest
    /// version) is not added twice: the existing document is returned as a
    /// duplicate. The same bytes under another name, groups or metadata make
    /// a new document, whose vectors are reused rather than embedded again.
    pub fn add(&self, upload: Upload) -> Result<Added> {
        check_name(&upload.name)?;
        check_labels("group", upload.groups.iter().cloned())?;
        check_labels("metadata key", upload.metadata.keys().cloned())?;
        self.check_upload(&upload.bytes, &upload.name)?;
        let sha = hex::encode(Sha256::digest(&upload.bytes));
        let _commit = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(document) = self.find_same(&sha, &upload)? {
            return Ok(Added {
                document,
                duplicate: true,
            });
        }
        let id = format!("doc_{}", uuid::Uuid::new_v4().simple());
        std::fs::write(self.file_path(&id, 1), &upload.bytes)?;
        let now = now_ms();
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO documents (id, name, groups, metadata, latest_version, live_version, created_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, 1, NULL, ?5, ?5)",
            params![
                id,
                upload.name,
                serde_json::to_string(&upload.groups).unwrap_or_else(|_| "[]".into()),
                serde_json::to_string(&upload.metadata).unwrap_or_else(|_| "{}".into()),
                now
            ],
        )?;
        insert_version(
            &tx,
            &id,
            1,
            upload.bytes.len(),
            &sha,
            &upload.charge_to,
            now,
        )?;
        tx.commit()?;
        drop(db);
        Ok(Added {
            document: self.document(&id)?,
            duplicate: false,
        })
    }

    /// Uploads a new version of document `doc`. The current version stays
    /// searchable until the new one is ready.
    pub fn replace(&self, doc: &str, bytes: Vec<u8>, charge_to: &str) -> Result<Added> {
        let current = self.document(doc)?;
        self.check_upload(&bytes, &current.name)?;
        let sha = hex::encode(Sha256::digest(&bytes));
        let _commit = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.document(doc)?;
        if current.sha256 == sha && current.status != Status::Failed {
            return Ok(Added {
                document: current,
                duplicate: true,
            });
        }
        let version = current.version + 1;
        std::fs::write(self.file_path(doc, version), &bytes)?;
        let now = now_ms();
        let mut db = self.db();
        let tx = db.transaction()?;
        // A version still waiting is superseded: only the newest runs.
        tx.execute(
            "UPDATE versions SET status = 'superseded', finished_ms = ?2
             WHERE doc_id = ?1 AND status IN ('queued', 'ingesting')",
            params![doc, now],
        )?;
        tx.execute(
            "UPDATE documents SET latest_version = ?2, updated_ms = ?3 WHERE id = ?1",
            params![doc, version, now],
        )?;
        insert_version(&tx, doc, version, bytes.len(), &sha, charge_to, now)?;
        tx.commit()?;
        drop(db);
        Ok(Added {
            document: self.document(doc)?,
            duplicate: false,
        })
    }

    /// Refuses at once what can never be ingested: too big, empty, or of
    /// a type not supported (detected from the content). Damage found only
    /// by reading the whole file fails the version during ingestion.
    fn check_upload(&self, bytes: &[u8], name: &str) -> Result<()> {
        if bytes.len() > self.limits.max_input_bytes {
            return Err(KbError::Extract(ExtractError::TooLarge {
                what: "upload".into(),
                size: bytes.len() as u64,
                limit: self.limits.max_input_bytes as u64,
            }));
        }
        if bytes.is_empty() {
            return Err(KbError::Extract(ExtractError::Empty));
        }
        extract::detect(bytes, name)?;
        Ok(())
    }

    /// A document whose latest version is this upload again: the same
    /// bytes, name, groups and metadata (and not failed or stopped).
    fn find_same(&self, sha: &str, upload: &Upload) -> Result<Option<Document>> {
        let ids: Vec<String> = {
            let db = self.db();
            let mut stmt = db.prepare(
                "SELECT v.doc_id FROM versions v JOIN documents d ON d.id = v.doc_id
                 WHERE v.sha256 = ?1 AND v.version = d.latest_version AND d.name = ?2
                   AND v.status NOT IN ('failed', 'stopped')",
            )?;
            let rows = stmt.query_map(params![sha, upload.name], |r| r.get(0))?;
            rows.collect::<std::result::Result<_, _>>()?
        };
        let sorted = |g: &[String]| {
            let mut g = g.to_vec();
            g.sort();
            g.dedup();
            g
        };
        for id in ids {
            let d = self.document(&id)?;
            if sorted(&d.groups) == sorted(&upload.groups) && d.metadata == upload.metadata {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    /// Deletes a document: it leaves every index at once, and an ingestion
    /// of it still running is abandoned.
    pub fn delete(&self, doc: &str) -> Result<()> {
        let _commit = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let (latest, live_version): (i64, Option<i64>) = self
            .db()
            .query_row(
                "SELECT latest_version, live_version FROM documents WHERE id = ?1",
                params![doc],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| KbError::DocumentNotFound(doc.to_string()))?;
        {
            let mut live = self.live.write().unwrap_or_else(PoisonError::into_inner);
            let mut db = self.db();
            let tx = db.transaction()?;
            tx.execute("DELETE FROM chunks WHERE doc_id = ?1", params![doc])?;
            tx.execute("DELETE FROM versions WHERE doc_id = ?1", params![doc])?;
            tx.execute("DELETE FROM documents WHERE id = ?1", params![doc])?;
            tx.commit()?;
            live.remove_doc(doc);
        }
        if live_version.is_some() {
            self.save_vector_graph();
        }
        if let Some(v) = live_version {
            self.fulltext.replace(&[&doc_version(doc, v)], &[])?;
        }
        for v in 1..=latest {
            let _ = std::fs::remove_file(self.file_path(doc, v));
        }
        Ok(())
    }

    /// Every document, newest first.
    pub fn documents(&self) -> Result<Vec<Document>> {
        let page = self.list_documents(&DocumentQuery {
            limit: usize::MAX,
            ..Default::default()
        })?;
        Ok(page.documents)
    }

    /// One page of documents, newest first, as `query` selects them.
    pub fn list_documents(&self, query: &DocumentQuery) -> Result<DocumentPage> {
        let groups = visibility_param(query.groups.as_deref());
        let status = query.status.map(Status::as_str);
        let db = self.db();
        let cursor = match &query.after {
            None => None,
            Some(after) => Some(
                db.query_row(
                    &format!("SELECT d.created_ms FROM documents d WHERE d.id = ?1 AND {VISIBLE}"),
                    params![after, groups],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?
                .ok_or_else(|| KbError::DocumentNotFound(after.clone()))?,
            ),
        };
        let mut stmt = db.prepare(&format!(
            "{DOCUMENT_SELECT} WHERE {VISIBLE} AND (?3 IS NULL OR v.status = ?3)
               AND (?4 IS NULL OR d.created_ms < ?4 OR (d.created_ms = ?4 AND d.id > ?1))
             ORDER BY d.created_ms DESC, d.id LIMIT ?5"
        ))?;
        // One more than asked, to know whether there are more.
        let fetch = query.limit.saturating_add(1).min(i64::MAX as usize) as i64;
        let rows = stmt.query_map(
            params![query.after, groups, status, cursor, fetch],
            document_row,
        )?;
        let mut documents: Vec<Document> = rows.collect::<std::result::Result<_, _>>()?;
        let has_more = documents.len() > query.limit;
        documents.truncate(query.limit);
        Ok(DocumentPage {
            documents,
            has_more,
        })
    }

    /// How many documents the holder of `groups` may see (`None`: all).
    /// The documents and the indexed chunks a caller with `groups` may
    /// see (`None`: all), so counts reveal nothing of restricted documents.
    pub fn count_visible(&self, groups: Option<&[String]>) -> Result<VisibleCounts> {
        let db = self.db();
        let visible = visibility_param(groups);
        let documents: i64 = db.query_row(
            &format!("SELECT COUNT(*) FROM documents d WHERE {VISIBLE}"),
            params![Option::<String>::None, visible],
            |r| r.get(0),
        )?;
        let chunks: i64 = db.query_row(
            &format!(
                "SELECT COUNT(*) FROM chunks c JOIN documents d ON d.id = c.doc_id
                 WHERE c.version = d.live_version AND {VISIBLE}"
            ),
            params![Option::<String>::None, visible],
            |r| r.get(0),
        )?;
        Ok(VisibleCounts {
            documents: documents as usize,
            chunks: chunks as usize,
        })
    }

    pub fn document(&self, doc: &str) -> Result<Document> {
        self.db()
            .query_row(
                &format!("{DOCUMENT_SELECT} WHERE d.id = ?1"),
                params![doc],
                document_row,
            )
            .optional()?
            .ok_or_else(|| KbError::DocumentNotFound(doc.to_string()))
    }

    /// Versions waiting to be ingested (also those a crash interrupted),
    /// oldest first.
    pub fn pending(&self) -> Result<Vec<Pending>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT doc_id, version, charge_to FROM versions WHERE status IN ('queued', 'ingesting')
             ORDER BY created_ms, doc_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Pending {
                doc: r.get(0)?,
                version: r.get(1)?,
                charge_to: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Whether `version` is still the one to ingest for `doc`.
    fn is_current(&self, doc: &str, version: i64) -> Result<bool> {
        Ok(self
            .db()
            .query_row(
                "SELECT status FROM versions v JOIN documents d ON d.id = v.doc_id
                 WHERE v.doc_id = ?1 AND v.version = ?2 AND d.latest_version = ?2",
                params![doc, version],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .is_some_and(|s| !Status::parse(&s).is_final()))
    }

    /// Marks versions that are live in every index as ready.
    fn mark_ready(&self, versions: &[(&str, i64)]) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = now_ms();
        for (doc, version) in versions {
            tx.execute(
                "UPDATE versions SET status = 'ready', finished_ms = ?3 WHERE doc_id = ?1 AND version = ?2",
                params![doc, version, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn set_status(
        &self,
        doc: &str,
        version: i64,
        status: Status,
        error: Option<(&str, &str)>,
    ) -> Result<()> {
        let finished = status.is_final().then(now_ms);
        self.db().execute(
            "UPDATE versions SET status = ?3, error_code = ?4, error = ?5, finished_ms = ?6
             WHERE doc_id = ?1 AND version = ?2",
            params![
                doc,
                version,
                status.as_str(),
                error.map(|e| e.0),
                error.map(|e| e.1),
                finished
            ],
        )?;
        Ok(())
    }

    fn set_progress(&self, doc: &str, version: i64, p: Progress) -> Result<()> {
        self.db().execute(
            "UPDATE versions SET done = ?3, total = ?4 WHERE doc_id = ?1 AND version = ?2",
            params![doc, version, p.done, p.total],
        )?;
        Ok(())
    }

    /// Ends a waiting version without ingesting it (its payer can no longer
    /// pay, say), with a reason.
    pub fn abandon(&self, doc: &str, version: i64, code: &str, message: &str) -> Result<()> {
        if self.is_current(doc, version)? {
            self.set_status(doc, version, Status::Stopped, Some((code, message)))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub documents: usize,
    pub chunks: usize,
    pub vector_memory_bytes: usize,
    pub disk_bytes: u64,
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A handle to share: knowledge bases are used from many threads.
pub type SharedKb = Arc<KnowledgeBase>;
