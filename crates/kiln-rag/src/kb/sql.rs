//! The knowledge base's database: schema and row mapping.

use super::*;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    groups TEXT NOT NULL,
    metadata TEXT NOT NULL,
    latest_version INTEGER NOT NULL,
    live_version INTEGER,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    doc_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    error_code TEXT,
    error TEXT,
    format TEXT,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    charge_to TEXT NOT NULL DEFAULT '',
    chunks INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    PRIMARY KEY (doc_id, version)
);
CREATE INDEX IF NOT EXISTS versions_sha ON versions(sha256);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    ord INTEGER NOT NULL,
    start_char INTEGER NOT NULL,
    end_char INTEGER NOT NULL,
    heading TEXT NOT NULL,
    text TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    vector BLOB NOT NULL,
    input_hash TEXT
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id, version);
CREATE INDEX IF NOT EXISTS documents_listing ON documents(created_ms DESC, id);
";

/// Whether the caller may see document `d`: parameter `?2` is `NULL` (sees
/// everything) or a JSON array of the caller's groups; a document without
/// groups is seen by all.
pub(super) const VISIBLE: &str = "(?2 IS NULL OR d.groups = '[]'
    OR EXISTS (SELECT 1 FROM json_each(d.groups) g WHERE g.value IN (SELECT value FROM json_each(?2))))";

/// The `?2` parameter of [`VISIBLE`].
pub(super) fn visibility_param(groups: Option<&[String]>) -> Option<String> {
    groups.map(|g| serde_json::to_string(g).unwrap_or_else(|_| "[]".into()))
}

pub(super) struct ChunkRow {
    pub(super) id: u64,
    pub(super) doc: String,
    pub(super) index_text: String,
}

/// A live document's chunks as the full-text index gets them.
pub(super) fn chunk_rows(db: &Connection, doc: &str) -> Result<Vec<ChunkRow>> {
    let mut stmt = db.prepare(
        "SELECT c.id, c.heading, c.text FROM chunks c JOIN documents d
         ON d.id = c.doc_id AND d.live_version = c.version WHERE c.doc_id = ?1 ORDER BY c.ord",
    )?;
    let rows = stmt.query_map(params![doc], |r| {
        let heading: String = r.get(1)?;
        let text: String = r.get(2)?;
        Ok(ChunkRow {
            id: r.get::<_, i64>(0)? as u64,
            doc: doc.to_string(),
            index_text: if heading.is_empty() {
                text
            } else {
                format!("{heading}\n{text}")
            },
        })
    })?;
    Ok(rows.collect::<std::result::Result<_, _>>()?)
}

pub(super) const DOCUMENT_SELECT: &str = "SELECT d.id, d.name, d.groups, d.metadata, d.latest_version, d.live_version,
    v.status, v.error_code, v.error, v.format, v.size_bytes, v.sha256, v.done, v.total,
    d.created_ms, d.updated_ms,
    COALESCE((SELECT chunks FROM versions l WHERE l.doc_id = d.id AND l.version = d.live_version), 0),
    COALESCE((SELECT tokens FROM versions l WHERE l.doc_id = d.id AND l.version = d.live_version), 0)
    FROM documents d JOIN versions v ON v.doc_id = d.id AND v.version = d.latest_version";

pub(super) fn document_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Document> {
    let groups: String = r.get(2)?;
    let metadata: String = r.get(3)?;
    Ok(Document {
        id: r.get(0)?,
        name: r.get(1)?,
        groups: serde_json::from_str(&groups).unwrap_or_default(),
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        version: r.get(4)?,
        live_version: r.get(5)?,
        status: Status::parse(&r.get::<_, String>(6)?),
        error_code: r.get(7)?,
        error: r.get(8)?,
        format: r.get(9)?,
        size_bytes: r.get(10)?,
        sha256: r.get(11)?,
        progress: Progress {
            done: r.get(12)?,
            total: r.get(13)?,
        },
        created_ms: r.get(14)?,
        updated_ms: r.get(15)?,
        chunks: r.get(16)?,
        tokens: r.get(17)?,
    })
}

pub(super) fn insert_version(
    tx: &rusqlite::Transaction<'_>,
    doc: &str,
    version: i64,
    size: usize,
    sha: &str,
    charge_to: &str,
    now: i64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO versions (doc_id, version, status, size_bytes, sha256, charge_to, created_ms)
         VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6)",
        params![doc, version, size as i64, sha, charge_to, now],
    )?;
    Ok(())
}

pub(super) fn open_db(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))?;
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")?;
    conn.execute_batch(SCHEMA)?;
    // Added after the first release: the hash of what a chunk's vector was
    // computed from, to reuse it for identical text.
    let has_hash = conn
        .prepare("SELECT 1 FROM pragma_table_info('chunks') WHERE name = 'input_hash'")?
        .exists([])?;
    if !has_hash {
        conn.execute_batch("ALTER TABLE chunks ADD COLUMN input_hash TEXT")?;
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS chunks_input ON chunks(input_hash)")?;
    Ok(conn)
}

/// The key under which a chunk's vector is found again: a hash of exactly
/// what was embedded.
pub(super) fn input_hash(input: &str) -> String {
    hex::encode(&Sha256::digest(input.as_bytes())[..16])
}
