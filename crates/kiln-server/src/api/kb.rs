//! Knowledge bases under `/api/kbs`.
//!
//! ```text
//! GET    /api/kbs                          list the caller's tenant's knowledge bases
//! POST   /api/kbs                          create {name, description, chunking}
//! GET    /api/kbs/{kb}                     one knowledge base (by id or name)
//! DELETE /api/kbs/{kb}                     delete it and all its documents
//! GET    /api/kbs/{kb}/documents           documents with their ingestion state, newest first;
//!                                          ?limit= (100, at most 1000) &after=ID &status=S
//! POST   /api/kbs/{kb}/documents?name=F    upload (raw body); &group=G, &meta=KEY:VALUE repeatable
//! GET    /api/kbs/{kb}/documents/{doc}     one document (progress while ingesting)
//! PUT    /api/kbs/{kb}/documents/{doc}     upload a new version (raw body)
//! DELETE /api/kbs/{kb}/documents/{doc}     delete it from every index
//! POST   /api/kbs/{kb}/search              {query, k, mode, metadata}
//! POST   /api/kbs/{kb}/ask                 {question, model, sources, max_tokens, metadata}
//! ```
//!
//! Any key of the tenant may read and search; creating, uploading and
//! deleting need a tenant admin (or the platform admin). A document
//! restricted to groups is visible only to keys in one of them (and to
//! admins): to anyone else it does not exist — not in lists, counts, search
//! results or error messages. Another tenant's knowledge base answers 404
//! like one that does not exist.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use kiln_rag::chunk::ChunkOptions;
use kiln_rag::fulltext::Filter;
use kiln_rag::ground::Thresholds;
use kiln_rag::kb::{
    Document, DocumentQuery, Embedder as _, KbError, KnowledgeBase, Query as KbQuery, Settings,
    Status, Upload, VisibleCounts,
};
use kiln_rag::retrieve::{Fusion, Mode};
use kiln_store::accounts::Role;
use kiln_types::error::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::SharedState;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::forward::FORWARDED_BY;
use crate::knowledge::{Job, Knowledge, MeteredEmbedder, CREATE_ENDPOINT, SEARCH_ENDPOINT};

/// Most results one search returns.
const MAX_K: usize = 100;

pub fn routes(state: SharedState) -> Router<SharedState> {
    let uploads = Router::new()
        .route("/api/kbs/{kb}/documents", get(list_documents).post(upload))
        .route(
            "/api/kbs/{kb}/documents/{doc}",
            get(get_document).put(new_version).delete(delete_document),
        )
        // Uploads are limited by the knowledge bases' own setting, checked
        // against Content-Length before anything is read.
        .layer(axum::extract::DefaultBodyLimit::disable());
    let per_kb = Router::new()
        .route("/api/kbs/{kb}", get(show).delete(delete))
        .route("/api/kbs/{kb}/search", post(search))
        .route("/api/kbs/{kb}/ask", post(ask))
        .merge(uploads)
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            to_serving_replica,
        ));
    Router::new()
        .route("/api/kbs", get(list).post(create))
        .merge(per_kb)
}

/// Sends a request for a knowledge base another replica holds to that
/// replica (see [`crate::forward`]); anything else is served here.
async fn to_serving_replica(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(params): Path<HashMap<String, String>>,
    req: Request,
    next: Next,
) -> Response {
    let (Some(key), Ok(k)) = (params.get("kb"), knowledge(&state)) else {
        return next.run(req).await;
    };
    if req.headers().contains_key(FORWARDED_BY) || find(&state, &p, key).is_ok() {
        return next.run(req).await;
    }
    let (k, tenant, key) = (k.clone(), scope(&p).map(String::from), key.clone());
    let owner = {
        let k = k.clone();
        blocking(move || k.owner(tenant.as_deref(), &key)).await
    };
    match owner {
        Ok(Some(url)) => k.forward(&url, req).await,
        Ok(None) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

type Caller = Extension<Arc<Principal>>;

fn knowledge(state: &SharedState) -> Result<&Arc<Knowledge>, ApiError> {
    state.knowledge.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::ServiceUnavailable,
            "knowledge bases need an embedding model: start the server with --embedding-model, or configure an upstream that serves one",
        )
    })
}

fn is_admin(p: &Principal) -> bool {
    matches!(p.role(), Role::PlatformAdmin | Role::TenantAdmin)
}

fn require_admin(p: &Principal, what: &str) -> Result<(), ApiError> {
    if is_admin(p) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::PermissionDenied,
            format!("this key's role may not {what}; a tenant admin key may"),
        ))
    }
}

/// The tenant whose knowledge bases the caller sees (`None`: all, for the
/// platform admin).
pub(super) fn scope(p: &Principal) -> Option<&str> {
    (p.role() != Role::PlatformAdmin).then_some(p.tenant.id.as_str())
}

/// What the caller may see inside a knowledge base: admins everything,
/// others the unrestricted documents and those of their key's groups.
pub(super) fn visibility(p: &Principal) -> Option<Vec<String>> {
    if is_admin(p) {
        None
    } else {
        Some(p.key.as_ref().map(|k| k.groups.clone()).unwrap_or_default())
    }
}

fn may_see(groups: &Option<Vec<String>>, doc: &Document) -> bool {
    match groups {
        None => true,
        Some(mine) => doc.groups.is_empty() || doc.groups.iter().any(|g| mine.contains(g)),
    }
}

/// Finds a knowledge base by id, or by name within the caller's tenant.
pub(super) fn find(
    state: &SharedState,
    p: &Principal,
    key: &str,
) -> Result<Arc<KnowledgeBase>, ApiError> {
    let k = knowledge(state)?;
    if let Some(kb) = k.get(key, scope(p)) {
        return Ok(kb);
    }
    k.list(Some(&p.tenant.id))
        .into_iter()
        .find(|kb| kb.settings().name == key)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no knowledge base `{key}`")))
}

pub(super) fn kb_error(e: KbError) -> ApiError {
    match e {
        KbError::Invalid(m) => ApiError::new(ErrorCode::InvalidRequest, m),
        KbError::DocumentNotFound(d) => {
            ApiError::new(ErrorCode::NotFound, format!("no document `{d}`"))
        }
        KbError::Extract(x) => {
            let code = match x {
                kiln_rag::extract::ExtractError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
                _ => ErrorCode::InvalidRequest,
            };
            ApiError::new(code, x.to_string())
        }
        KbError::Embed(kiln_rag::kb::EmbedError::Refused(m)) => {
            ApiError::new(ErrorCode::InsufficientQuota, m)
        }
        e @ (KbError::WrongModel { .. } | KbError::Embed(_)) => {
            ApiError::new(ErrorCode::ServiceUnavailable, e.to_string())
        }
        KbError::Storage(m) => {
            tracing::error!(error = %m, "knowledge-base storage failed");
            ApiError::internal()
        }
    }
}

/// Runs knowledge-base work on the blocking pool.
pub(super) async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::internal())?
}

fn kb_json(kb: &KnowledgeBase, visible: VisibleCounts) -> serde_json::Value {
    let s = kb.settings();
    json!({
        "id": s.id,
        "object": "knowledge_base",
        "name": s.name,
        "description": s.description,
        "tenant_id": s.tenant,
        "embedding_model": s.embedding_model,
        "dimensions": s.dimensions,
        "chunking": s.chunking,
        "grounding": s.grounding,
        "created_at": s.created_ms / 1000,
        "documents": visible.documents,
        "chunks": visible.chunks,
    })
}

fn count_visible(kb: &KnowledgeBase, p: &Principal) -> Result<VisibleCounts, ApiError> {
    kb.count_visible(visibility(p).as_deref()).map_err(kb_error)
}

/// `GET /api/kbs`: the knowledge bases this replica holds, and those the
/// database's directory lists on other replicas (as their replicas describe
/// them, or with `unavailable` saying why they cannot).
async fn list(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Extension(p): Caller,
) -> Result<Response, ApiError> {
    let k = knowledge(&state)?.clone();
    let bases = k.list(scope(&p));
    let tenant = scope(&p).map(String::from);
    let (mut data, elsewhere) = blocking(move || {
        let here = bases
            .iter()
            .map(|kb| Ok(kb_json(kb, count_visible(kb, &p)?)))
            .collect::<Result<Vec<_>, ApiError>>()?;
        let elsewhere = k.held_elsewhere(tenant.as_deref())?;
        Ok((here, elsewhere))
    })
    .await?;
    // A forwarded listing stops here: the other replicas list their own.
    if !headers.contains_key(FORWARDED_BY) {
        let k = knowledge(&state)?;
        let described = elsewhere.iter().map(|e| k.describe_remote(e, &headers));
        data.extend(futures::future::join_all(described).await);
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKb {
    name: String,
    #[serde(default)]
    description: String,
    chunking: Option<ChunkOptions>,
    /// The embedding model it is built with: the server's own (the
    /// default), or one an upstream serves.
    embedding_model: Option<String>,
    /// The answers' relevance gate and sentence check.
    grounding: Option<Thresholds>,
    /// The platform admin may create one for another tenant.
    tenant_id: Option<String>,
}

async fn create(
    State(state): State<SharedState>,
    Extension(p): Caller,
    ApiJson(body): ApiJson<CreateKb>,
) -> Result<Response, ApiError> {
    require_admin(&p, "create knowledge bases")?;
    let k = knowledge(&state)?;
    let model = match (body.embedding_model, &state.models.embedding) {
        (Some(m), _) => m,
        (None, Some(local)) => local.name.clone(),
        (None, None) => {
            return Err(ApiError::invalid(
                "embedding_model",
                "this server has no embedding model of its own: name one an upstream serves in `embedding_model`",
            ))
        }
    };
    let name = body.name.trim().to_string();
    if name.is_empty()
        || name.chars().count() > 128
        || name.chars().any(char::is_control)
        || name.starts_with("kb_")
    {
        return Err(ApiError::invalid(
            "name",
            "a knowledge base name must be 1 to 128 printable characters and not begin with `kb_`",
        ));
    }
    let tenant = match body.tenant_id {
        Some(t) if t != p.tenant.id => {
            if p.role() != Role::PlatformAdmin {
                return Err(ApiError::new(
                    ErrorCode::PermissionDenied,
                    "only the platform admin may create a knowledge base for another tenant",
                ));
            }
            let lookup = t.clone();
            let db = state.db().clone();
            let found =
                blocking(move || db.tenant(&lookup).map_err(crate::error::store_unavailable))
                    .await?;
            found
                .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no tenant `{t}`")))?
                .id
        }
        _ => p.tenant.id.clone(),
    };
    let embedder = MeteredEmbedder::new(state.clone(), p.clone(), CREATE_ENDPOINT, &model, None)
        .map_err(|why| ApiError::invalid("embedding_model", why))?;
    let chunking = body.chunking.unwrap_or_default();
    chunking
        .validate(embedder.max_tokens())
        .map_err(|m| ApiError::invalid("chunking", m))?;
    let grounding = body.grounding.unwrap_or_default();
    grounding
        .validate()
        .map_err(|m| ApiError::invalid("grounding", m))?;
    let dimensions = match k.known_dimensions(&model) {
        Some(d) => d,
        None => {
            let d = blocking(move || embedder.probe_dimensions()).await?;
            k.learned_dimensions(&model, d);
            d
        }
    };
    let settings = Settings {
        id: format!("kb_{}", uuid::Uuid::new_v4().simple()),
        tenant,
        name,
        description: body.description,
        embedding_model: model,
        dimensions,
        chunking,
        grounding,
        created_ms: kiln_store::now_ms(),
    };
    let k = k.clone();
    let kb = blocking(move || k.create(settings)).await?;
    let empty = VisibleCounts {
        documents: 0,
        chunks: 0,
    };
    Ok((StatusCode::CREATED, Json(kb_json(&kb, empty))).into_response())
}

async fn show(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let kb = find(&state, &p, &key)?;
    let body = blocking(move || Ok(kb_json(&kb, count_visible(&kb, &p)?))).await?;
    Ok(Json(body).into_response())
}

async fn delete(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&p, "delete knowledge bases")?;
    let kb = find(&state, &p, &key)?;
    let id = kb.settings().id.clone();
    drop(kb);
    let s = state.clone();
    let id2 = id.clone();
    blocking(move || knowledge(&s)?.delete(&id2)).await?;
    Ok(Json(json!({"id": id, "object": "knowledge_base", "deleted": true})).into_response())
}

/// Documents listed per page by default, and at most.
const DOCUMENTS_PAGE: usize = 100;
const DOCUMENTS_PAGE_MAX: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentsParams {
    limit: Option<usize>,
    /// The last document id of the previous page.
    after: Option<String>,
    status: Option<Status>,
}

/// `GET /api/kbs/{kb}/documents?limit=&after=&status=`: newest first, in
/// pages, with `has_more` and `last_id` to ask for the next.
async fn list_documents(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(key): Path<String>,
    params: Result<Query<DocumentsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = params.limit.unwrap_or(DOCUMENTS_PAGE);
    if !(1..=DOCUMENTS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be between 1 and {DOCUMENTS_PAGE_MAX}"),
        ));
    }
    let kb = find(&state, &p, &key)?;
    let query = DocumentQuery {
        groups: visibility(&p),
        status: params.status,
        after: params.after,
        limit,
    };
    let page = blocking(move || {
        kb.list_documents(&query).map_err(|e| match e {
            KbError::DocumentNotFound(d) => ApiError::invalid(
                "after",
                format!("no document `{d}` to continue after; list again from the start"),
            ),
            e => kb_error(e),
        })
    })
    .await?;
    Ok(Json(json!({
        "object": "list",
        "first_id": page.documents.first().map(|d| &d.id),
        "last_id": page.documents.last().map(|d| &d.id),
        "has_more": page.has_more,
        "data": page.documents,
    }))
    .into_response())
}

struct UploadParams {
    name: Option<String>,
    groups: Vec<String>,
    metadata: HashMap<String, String>,
}

/// `name`, `group` (repeatable, or comma-separated) and `meta=KEY:VALUE`
/// (repeatable) from the query string.
fn upload_params(query: Option<&str>) -> Result<UploadParams, ApiError> {
    let mut name = None;
    let mut groups = Vec::new();
    let mut metadata = HashMap::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "name" => name = Some(v.into_owned()),
            "group" | "groups" => groups.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_string),
            ),
            "meta" => {
                let Some((mk, mv)) = v.split_once(':') else {
                    return Err(ApiError::invalid("meta", "`meta` must be KEY:VALUE"));
                };
                metadata.insert(mk.trim().to_string(), mv.trim().to_string());
            }
            other => {
                return Err(ApiError::invalid(
                    "query",
                    format!("unknown query parameter `{other}`; use name, group and meta"),
                ))
            }
        }
    }
    groups.sort();
    groups.dedup();
    Ok(UploadParams {
        name,
        groups,
        metadata,
    })
}

/// Reads an upload of at most `limit` bytes; a larger one is refused from
/// its `Content-Length` before any of it is read, or as soon as it passes
/// the limit when it has none.
async fn body_bytes(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the upload is larger than this server accepts ({} MiB; see --kb-max-upload-mb)",
                limit >> 20
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            too_large()
        } else {
            ApiError::invalid("body", format!("could not read the upload: {e}"))
        }
    })
}

fn added_response(
    state: &SharedState,
    kb: &KnowledgeBase,
    added: kiln_rag::kb::Added,
    p: &Principal,
) -> Result<Response, ApiError> {
    if !added.duplicate {
        knowledge(state)?.enqueue(Job {
            kb: kb.settings().id.clone(),
            doc: added.document.id.clone(),
            version: added.document.version,
            charge_to: p.key.as_ref().map(|k| k.id.clone()).unwrap_or_default(),
        });
    }
    let status = if added.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut body = serde_json::to_value(&added.document).map_err(|_| ApiError::internal())?;
    body["duplicate"] = json!(added.duplicate);
    body["object"] = json!("knowledge_base.document");
    Ok((status, Json(body)).into_response())
}

async fn upload(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_admin(&p, "add documents")?;
    let kb = find(&state, &p, &key)?;
    let UploadParams {
        name,
        groups,
        metadata,
    } = upload_params(query.as_deref())?;
    let name = name.ok_or_else(|| {
        ApiError::invalid(
            "name",
            "the document's file name is required: `?name=report.pdf`",
        )
    })?;
    let bytes = body_bytes(&headers, body, knowledge(&state)?.max_upload_bytes()).await?;
    let charge_to = p.key.as_ref().map(|k| k.id.clone()).unwrap_or_default();
    let kb2 = kb.clone();
    let added = blocking(move || {
        kb2.add(Upload {
            name,
            bytes: bytes.to_vec(),
            groups,
            metadata,
            charge_to,
        })
        .map_err(kb_error)
    })
    .await?;
    added_response(&state, &kb, added, &p)
}

async fn get_document(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path((key, doc)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let kb = find(&state, &p, &key)?;
    let d = visible_document(kb, &p, doc).await?;
    Ok(Json(d).into_response())
}

/// A document the caller may see; any other answers 404 as if absent.
async fn visible_document(
    kb: Arc<KnowledgeBase>,
    p: &Principal,
    doc: String,
) -> Result<Document, ApiError> {
    let groups = visibility(p);
    let id = doc.clone();
    let d = blocking(move || kb.document(&id).map_err(kb_error)).await?;
    if may_see(&groups, &d) {
        Ok(d)
    } else {
        Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no document `{doc}`"),
        ))
    }
}

async fn new_version(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path((key, doc)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_admin(&p, "replace documents")?;
    let kb = find(&state, &p, &key)?;
    let bytes = body_bytes(&headers, body, knowledge(&state)?.max_upload_bytes()).await?;
    let charge_to = p.key.as_ref().map(|k| k.id.clone()).unwrap_or_default();
    let kb2 = kb.clone();
    let added = blocking(move || {
        kb2.replace(&doc, bytes.to_vec(), &charge_to)
            .map_err(kb_error)
    })
    .await?;
    added_response(&state, &kb, added, &p)
}

async fn delete_document(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path((key, doc)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    require_admin(&p, "delete documents")?;
    let kb = find(&state, &p, &key)?;
    let id = doc.clone();
    blocking(move || kb.delete(&id).map_err(kb_error)).await?;
    Ok(
        Json(json!({"id": doc, "object": "knowledge_base.document", "deleted": true}))
            .into_response(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchRequest {
    query: String,
    k: Option<usize>,
    mode: Option<String>,
    #[serde(default)]
    metadata: HashMap<String, String>,
    /// Overrides of the fusion settings (for evaluation and tuning).
    fusion: Option<Fusion>,
}

fn check_fusion(f: Option<Fusion>) -> Result<Fusion, ApiError> {
    let f = f.unwrap_or_default();
    let weights_ok = [f.bm25_weight, f.vector_weight]
        .iter()
        .all(|w| w.is_finite() && (0.0..=100.0).contains(w));
    let k_ok = f.k.is_finite() && (0.0..=10_000.0).contains(&f.k);
    let ok = k_ok && weights_ok && (1..=1000).contains(&f.candidates);
    if !ok {
        return Err(ApiError::invalid(
            "fusion",
            "`fusion` needs k in 0..=10000, weights in 0..=100 and candidates in 1..=1000",
        ));
    }
    Ok(f)
}

async fn search(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Path(key): Path<String>,
    ApiJson(body): ApiJson<SearchRequest>,
) -> Result<Response, ApiError> {
    let kb = find(&state, &p, &key)?;
    let k = body.k.unwrap_or(10);
    if k == 0 || k > MAX_K {
        return Err(ApiError::invalid(
            "k",
            format!("`k` must be between 1 and {MAX_K}"),
        ));
    }
    let mode = match body.mode.as_deref() {
        None => Mode::Hybrid,
        Some(m) => Mode::parse(m).ok_or_else(|| {
            ApiError::invalid("mode", "`mode` must be `hybrid`, `bm25` or `vector`")
        })?,
    };
    if body.query.trim().is_empty() {
        return Err(ApiError::invalid("query", "`query` must not be empty"));
    }
    let mut metadata: Vec<(String, String)> = body.metadata.into_iter().collect();
    metadata.sort();
    let q = KbQuery {
        text: body.query,
        k,
        mode,
        fusion: check_fusion(body.fusion)?,
        filter: Filter {
            groups: visibility(&p),
            metadata,
        },
    };
    let hits = metered_search(&state, &p, kb, q).await?;
    Ok(Json(json!({"object": "list", "data": hits})).into_response())
}

/// A hybrid search as an agent's tool makes it: `p`'s knowledge base `kb`
/// (by name or id), seen with `p`'s groups, the query embedding metered
/// to `p`. Knowledge bases held by another replica are not reached.
pub(crate) async fn search_as(
    state: &SharedState,
    p: &Arc<Principal>,
    kb: &str,
    query: &str,
    k: usize,
) -> Result<Vec<kiln_rag::kb::Hit>, ApiError> {
    match find(state, p, kb) {
        Ok(_) => search_here(state, p, kb, query, k).await,
        Err(e) if e.code == ErrorCode::NotFound => {
            let k_ = knowledge(state)?.clone();
            let (tenant, key) = (scope(p).map(String::from), kb.to_string());
            match blocking(move || k_.owner(tenant.as_deref(), &key)).await? {
                Some(url) => search_elsewhere(state, p, &url, kb, query, k).await,
                None => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Where a replica asks another to search for a run.
pub const INTERNAL_SEARCH: &str = "/internal/kb-search";
/// How old a signed search request may be.
const SIGNED_FOR_MS: i64 = 60_000;

/// What one replica asks another to search, on behalf of a key (a run's
/// `kb_search` or `retrieve` step); signed with the cluster secret.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedSearch {
    tenant_id: String,
    key_id: Option<String>,
    knowledge_base: String,
    query: String,
    k: usize,
    issued_at_ms: i64,
}

/// Asks the replica at `url`, which holds `kb`, to search it as `p`; it
/// meters the query embedding to `p`'s key.
async fn search_elsewhere(
    state: &SharedState,
    p: &Arc<Principal>,
    url: &str,
    kb: &str,
    query: &str,
    k: usize,
) -> Result<Vec<kiln_rag::kb::Hit>, ApiError> {
    let knowledge = knowledge(state)?;
    let body = serde_json::to_vec(&SignedSearch {
        tenant_id: p.tenant.id.clone(),
        key_id: p.key.as_ref().map(|k| k.id.clone()),
        knowledge_base: kb.to_string(),
        query: query.to_string(),
        k,
        issued_at_ms: kiln_store::now_ms(),
    })
    .map_err(|_| ApiError::internal())?;
    let secret = state.cluster_secret().await?;
    let answer = knowledge
        .forwarder()
        .post_signed(url, INTERNAL_SEARCH, body, secret.as_bytes(), knowledge.own_url().map_or("unadvertised", String::as_str))
        .await
        .map_err(|why| {
            ApiError::new(
                ErrorCode::ServiceUnavailable,
                format!("knowledge base `{kb}` is held by the replica at {url}, which could not search it: {why}"),
            )
        })?;
    serde_json::from_value(answer["hits"].clone()).map_err(|e| {
        ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!(
                "the replica at {url} answered a search with hits this replica cannot read: {e}"
            ),
        )
    })
}

/// `POST /internal/kb-search`: a search another replica asks for on a
/// key's behalf. Needs the cluster secret's signature over the body and an
/// issue time within a minute; the key (and its tenant) must still be
/// usable, and it sees what that key sees. Never forwarded again.
pub async fn internal_search(
    State(state): State<SharedState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let result = async {
        let refused = |m: &str| ApiError::new(ErrorCode::PermissionDenied, m.to_string());
        let signature = headers
            .get(crate::forward::SIGNATURE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| refused("a request between replicas must be signed"))?;
        let secret = state.cluster_secret().await?;
        if !crate::forward::verify(secret.as_bytes(), &body, signature) {
            return Err(refused("the request's signature is not this cluster's"));
        }
        let req: SignedSearch =
            serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body", e.to_string()))?;
        if (kiln_store::now_ms() - req.issued_at_ms).abs() > SIGNED_FOR_MS {
            return Err(refused(
                "the signed request is too old (or the replicas' clocks disagree)",
            ));
        }
        let p = match crate::runs::principal_of(&state, &req.tenant_id, req.key_id.as_deref()).await
        {
            Ok(p) => p,
            Err(crate::runs::NoPrincipal::Refused(why)) => return Err(refused(&why)),
            Err(crate::runs::NoPrincipal::Unavailable(why)) => {
                return Err(ApiError::new(ErrorCode::ServiceUnavailable, why))
            }
        };
        find(&state, &p, &req.knowledge_base)?;
        let hits = search_here(
            &state,
            &p,
            &req.knowledge_base,
            &req.query,
            req.k.clamp(1, 50),
        )
        .await?;
        Ok::<_, ApiError>(Json(serde_json::json!({"hits": hits})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Searches a knowledge base this replica holds as `p` sees it.
async fn search_here(
    state: &SharedState,
    p: &Arc<Principal>,
    kb: &str,
    query: &str,
    k: usize,
) -> Result<Vec<kiln_rag::kb::Hit>, ApiError> {
    let found = find(state, p, kb)?;
    let q = KbQuery {
        text: query.to_string(),
        k,
        mode: Mode::Hybrid,
        fusion: Fusion::default(),
        filter: Filter {
            groups: visibility(p),
            metadata: Vec::new(),
        },
    };
    metered_search(state, p, found, q).await
}

/// Runs a search on the blocking pool with the caller's metered embedder
/// and, when one is configured, the upstream reranker.
pub(super) async fn metered_search(
    state: &SharedState,
    p: &Arc<Principal>,
    kb: Arc<KnowledgeBase>,
    q: KbQuery,
) -> Result<Vec<kiln_rag::kb::Hit>, ApiError> {
    let embedder =
        MeteredEmbedder::of(state.clone(), p.clone(), SEARCH_ENDPOINT, kb.settings()).ok();
    let reranker = crate::knowledge::UpstreamReranker::new(state.clone(), p.clone());
    blocking(move || {
        kb.search_reranked(
            &q,
            embedder.as_ref().map(|e| e as &dyn kiln_rag::kb::Embedder),
            reranker
                .as_ref()
                .map(|r| r as &dyn kiln_rag::retrieve::Reranker),
        )
        .map_err(kb_error)
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AskRequest {
    question: String,
    model: Option<String>,
    /// Most sources given to the model (default 4).
    sources: Option<usize>,
    max_tokens: Option<usize>,
    #[serde(default)]
    metadata: HashMap<String, String>,
    /// Thresholds for this ask instead of the knowledge base's.
    grounding: Option<Thresholds>,
}

async fn ask(
    State(state): State<SharedState>,
    Extension(p): Caller,
    Extension(request_id): Extension<super::RequestId>,
    Path(key): Path<String>,
    ApiJson(body): ApiJson<AskRequest>,
) -> Result<Response, ApiError> {
    let kb = find(&state, &p, &key)?;
    let mut metadata: Vec<(String, String)> = body.metadata.into_iter().collect();
    metadata.sort();
    let answer = super::ask::answer(
        &state,
        &p,
        &request_id.0,
        kb,
        super::ask::Question {
            text: body.question,
            model: body.model,
            sources: body.sources,
            max_tokens: body.max_tokens,
            metadata,
            grounding: body.grounding,
        },
    )
    .await?;
    Ok(Json(answer).into_response())
}
