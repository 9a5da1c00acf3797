//! Knowledge bases in a running server: where they live, the ingestion
//! worker, and the metered embedder every knowledge-base call goes through.
//!
//! Each knowledge base is a directory under `$KILN_HOME/kb/` (see
//! [`kiln_rag::kb`]); the server opens them all at start and queues the
//! ingestions a previous run left unfinished.
//!
//! In this phase a knowledge base lives on the replica that created it. The
//! database's knowledge-base directory ([`kiln_store::KbDirectory`]) says
//! which replica that is (its `--advertise-url`), so any replica sharing the
//! database finds every knowledge base, keeps names unique per tenant, and
//! forwards a request for one it does not hold to the replica that does
//! ([`crate::forward`]); that replica authenticates and meters it as if it
//! had been sent there directly.
//!
//! Every embedding a knowledge base makes — chunks during ingestion, the
//! query of a search — is a metered call charged to the key that caused it
//! (the uploader's for ingestion, kept with the document version so a
//! resumed ingestion is charged to the same key), with the same admission,
//! reservation and ledger as `/v1/embeddings`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use kiln_rag::kb::{EmbedError, Embedder, KnowledgeBase, Settings};
use kiln_store::{Database, KbEntry};
use kiln_types::error::ErrorCode;
use tokio::sync::mpsc;

use crate::api::calls::{CallContext, EMBEDDED_BACKEND};
use crate::api::SharedState;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::forward::Forwarder;
use crate::upstream::Upstream;

/// The ledger endpoint of embeddings made while ingesting a document.
pub const INGEST_ENDPOINT: &str = "/api/kbs/ingest";
/// The ledger endpoint of the one embedding that learns the vector length
/// of an upstream's model when a knowledge base is created on it.
pub const CREATE_ENDPOINT: &str = "/api/kbs";
/// The ledger endpoint of a knowledge-base search's query embedding.
pub const SEARCH_ENDPOINT: &str = "/api/kbs/search";
/// How long an ingestion waits out one rate-limit refusal, and how many
/// times, before it stops.
const RATE_WAIT: Duration = Duration::from_secs(2);
const RATE_TRIES: usize = 90;

/// A document version to ingest.
#[derive(Debug, Clone)]
pub struct Job {
    pub kb: String,
    pub doc: String,
    pub version: i64,
    pub charge_to: String,
}

pub struct Knowledge {
    root: PathBuf,
    bases: RwLock<BTreeMap<String, Arc<KnowledgeBase>>>,
    jobs: mpsc::UnboundedSender<Job>,
    max_upload_bytes: usize,
    db: Arc<dyn Database>,
    /// Where other replicas reach this one; set once the server listens.
    advertise_url: OnceLock<Option<String>>,
    forwarder: Forwarder,
    /// The vector length of each embedding model a knowledge base was
    /// created with here: an upstream's model is probed once.
    dimensions: Mutex<HashMap<String, usize>>,
}

impl Knowledge {
    /// The vector length of `model`, if a knowledge base was created with
    /// it since the server started.
    pub fn known_dimensions(&self, model: &str) -> Option<usize> {
        self.dimensions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
            .copied()
    }

    pub fn learned_dimensions(&self, model: &str, dimensions: usize) {
        self.dimensions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(model.to_string(), dimensions);
    }

    /// Opens every knowledge base under `root`; returns the service and the
    /// receiving end of its job queue, already holding the unfinished
    /// ingestions of a previous run.
    pub fn open(
        root: &Path,
        max_upload_bytes: usize,
        db: Arc<dyn Database>,
    ) -> anyhow::Result<(Knowledge, mpsc::UnboundedReceiver<Job>)> {
        std::fs::create_dir_all(root)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut bases = BTreeMap::new();
        for entry in std::fs::read_dir(root)?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".trash-") {
                // A deletion interrupted after its rename: finish it.
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a deleted knowledge base");
                }
                continue;
            }
            if !path.join("kb.sqlite").is_file() {
                continue;
            }
            match KnowledgeBase::open(&path) {
                Ok(kb) => {
                    let kb = kb.with_max_upload(max_upload_bytes);
                    for p in kb.pending().unwrap_or_default() {
                        let _ = tx.send(Job {
                            kb: kb.settings().id.clone(),
                            doc: p.doc,
                            version: p.version,
                            charge_to: p.charge_to,
                        });
                    }
                    bases.insert(kb.settings().id.clone(), Arc::new(kb));
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot open a knowledge base; it is not served");
                }
            }
        }
        Ok((
            Knowledge {
                root: root.to_path_buf(),
                bases: RwLock::new(bases),
                jobs: tx,
                max_upload_bytes,
                db,
                advertise_url: OnceLock::new(),
                forwarder: Forwarder::new(),
                dimensions: Mutex::new(HashMap::new()),
            },
            rx,
        ))
    }

    /// Lists every knowledge base this replica holds in the database's
    /// directory, reachable at `url` (again at each start: the URL may have
    /// changed, or the directory may predate them). Call once, when the
    /// server listens.
    ///
    /// Entries whose files are gone are dropped: on a database only this
    /// replica uses (`shared` false), every entry it does not hold; on a
    /// shared one, those listed at this replica's own URL.
    pub fn advertise(&self, url: Option<String>, shared: bool) {
        let url = self.advertise_url.get_or_init(|| url);
        for kb in self.list(None) {
            if let Err(e) = self.db.announce_kb(&directory_entry(kb.settings(), url)) {
                tracing::error!(kb = %kb.settings().id, error = %e, "cannot list a knowledge base in the database's directory; only requests sent to this replica reach it");
            }
        }
        let listed = match self.db.kb_entries(None) {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the database's knowledge-base directory");
                return;
            }
        };
        for e in listed {
            let gone = self.get(&e.id, None).is_none()
                && (!shared || (url.is_some() && e.replica_url == *url));
            if gone {
                tracing::warn!(kb = %e.id, name = %e.name, "a listed knowledge base's files are gone; it is removed from the directory");
                if let Err(err) = self.db.unregister_kb(&e.id) {
                    tracing::warn!(kb = %e.id, error = %err, "cannot remove it");
                }
            }
        }
    }

    /// The client this replica reaches the others with.
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }

    /// This replica's advertised URL, if it has one.
    pub fn own_url(&self) -> Option<&String> {
        self.advertise_url.get().and_then(Option::as_ref)
    }

    /// The knowledge base `id` if `tenant` owns it (`None`: any tenant).
    pub fn get(&self, id: &str, tenant: Option<&str>) -> Option<Arc<KnowledgeBase>> {
        let bases = self.bases.read().unwrap_or_else(PoisonError::into_inner);
        bases
            .get(id)
            .filter(|kb| tenant.is_none_or(|t| kb.settings().tenant == t))
            .cloned()
    }

    /// Knowledge bases of `tenant` (`None`: all), by id.
    pub fn list(&self, tenant: Option<&str>) -> Vec<Arc<KnowledgeBase>> {
        let bases = self.bases.read().unwrap_or_else(PoisonError::into_inner);
        bases
            .values()
            .filter(|kb| tenant.is_none_or(|t| kb.settings().tenant == t))
            .cloned()
            .collect()
    }

    /// Creates a knowledge base; names are unique within a tenant.
    pub fn create(&self, settings: Settings) -> Result<Arc<KnowledgeBase>, ApiError> {
        let mut bases = self.bases.write().unwrap_or_else(PoisonError::into_inner);
        if bases.values().any(|kb| {
            kb.settings().tenant == settings.tenant && kb.settings().name == settings.name
        }) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("a knowledge base named `{}` already exists", settings.name),
            ));
        }
        // Names are unique across replicas: the directory decides.
        let listed = directory_entry(&settings, &self.own_url().cloned());
        self.db
            .register_kb(&listed)
            .map_err(crate::error::store_unavailable)?;
        let dir = self.root.join(&settings.id);
        let kb = match KnowledgeBase::create(&dir, settings) {
            Ok(kb) => kb.with_max_upload(self.max_upload_bytes),
            Err(e) => {
                tracing::error!(error = %e, "cannot create a knowledge base");
                let _ = self.db.unregister_kb(&listed.id);
                return Err(ApiError::internal());
            }
        };
        let kb = Arc::new(kb);
        bases.insert(kb.settings().id.clone(), kb.clone());
        Ok(kb)
    }

    /// Deletes a knowledge base and everything in it. Its directory is
    /// renamed first (atomic), then removed; a crash in between is finished
    /// at the next start.
    pub fn delete(&self, id: &str) -> Result<(), ApiError> {
        let kb = self
            .bases
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        let Some(kb) = kb else {
            return Ok(());
        };
        if let Err(e) = self.db.unregister_kb(id) {
            tracing::warn!(kb = %id, error = %e, "cannot remove a deleted knowledge base from the database's directory");
        }
        let dir = kb.dir().to_path_buf();
        drop(kb);
        let trash = self.root.join(format!(".trash-{id}"));
        std::fs::rename(&dir, &trash).map_err(|e| {
            tracing::error!(error = %e, "cannot delete a knowledge base");
            ApiError::internal()
        })?;
        if let Err(e) = std::fs::remove_dir_all(&trash) {
            tracing::warn!(error = %e, "cannot remove a deleted knowledge base's files; removed at the next start");
        }
        Ok(())
    }

    /// Where the knowledge base `key` (an id, or a name within `tenant`)
    /// is served when this replica does not hold it: the serving replica's
    /// URL. `Ok(None)` when no replica has it (or only this one, which then
    /// answers itself).
    pub fn owner(&self, tenant: Option<&str>, key: &str) -> Result<Option<String>, ApiError> {
        let Some(e) = self
            .db
            .kb_entry(tenant, key)
            .map_err(crate::error::store_unavailable)?
        else {
            return Ok(None);
        };
        if self.get(&e.id, None).is_some() {
            return Ok(None);
        }
        match e.replica_url {
            // Listed as this replica's, but its files are not here.
            Some(url) if Some(&url) == self.own_url() => Ok(None),
            Some(url) => Ok(Some(url)),
            None => Err(ApiError::new(
                ErrorCode::ServiceUnavailable,
                format!(
                    "knowledge base `{key}` is held by another replica that advertises no address \
                     (start it with --advertise-url); send the request to that replica"
                ),
            )),
        }
    }

    /// Sends `req` to the replica at `url` and relays its answer.
    pub async fn forward(
        &self,
        url: &str,
        req: axum::extract::Request,
    ) -> axum::response::Response {
        let by = self.own_url().map_or("unadvertised", String::as_str);
        self.forwarder.send(url, req, by).await
    }

    /// Knowledge bases of `tenant` (`None`: all) other replicas hold.
    pub fn held_elsewhere(&self, tenant: Option<&str>) -> Result<Vec<KbEntry>, ApiError> {
        Ok(self
            .db
            .kb_entries(tenant)
            .map_err(crate::error::store_unavailable)?
            .into_iter()
            .filter(|e| self.get(&e.id, None).is_none())
            .collect())
    }

    /// How the replica holding `e` describes it to the caller whose request
    /// `headers` are; when it cannot, what the directory knows and why.
    pub async fn describe_remote(
        &self,
        e: &KbEntry,
        headers: &axum::http::HeaderMap,
    ) -> serde_json::Value {
        let by = self.own_url().map_or("unadvertised", String::as_str);
        let why = match &e.replica_url {
            Some(url) if Some(url) != self.own_url() => {
                let path = format!("/api/kbs/{}", e.id);
                match self.forwarder.get_json(url, &path, headers, by).await {
                    Ok(described) => return described,
                    Err(why) => why,
                }
            }
            Some(_) => "listed as this replica's, but its files are not here".into(),
            None => "its replica advertises no address".into(),
        };
        serde_json::json!({
            "id": e.id,
            "object": "knowledge_base",
            "name": e.name,
            "tenant_id": e.tenant_id,
            "created_at": e.created_at_ms / 1000,
            "replica_url": e.replica_url,
            "unavailable": why,
        })
    }

    /// The largest upload accepted, in bytes.
    pub fn max_upload_bytes(&self) -> usize {
        self.max_upload_bytes
    }

    pub fn enqueue(&self, job: Job) {
        let _ = self.jobs.send(job);
    }
}

/// The directory entry of a knowledge base this replica holds.
fn directory_entry(s: &Settings, advertise_url: &Option<String>) -> KbEntry {
    KbEntry {
        id: s.id.clone(),
        tenant_id: s.tenant.clone(),
        name: s.name.clone(),
        replica_url: advertise_url.clone(),
        created_at_ms: s.created_ms,
    }
}

/// Most document versions ingested together (one embedding stream, one
/// commit).
const INGEST_GROUP: usize = 64;

/// Runs queued ingestions: whatever is waiting is taken together, grouped
/// by knowledge base and payer, and each group is ingested in one pass
/// (shared embedding batches, one commit), so a thousand small uploads do
/// not cost a thousand commits. On two cores one ingestion keeps the
/// machine busy; chat requests interleave between its embedding batches.
pub fn spawn_worker(state: SharedState, mut jobs: mpsc::UnboundedReceiver<Job>) {
    tokio::spawn(async move {
        while let Some(first) = jobs.recv().await {
            let mut taken = vec![first];
            while taken.len() < INGEST_GROUP {
                match jobs.try_recv() {
                    Ok(j) => taken.push(j),
                    Err(_) => break,
                }
            }
            let mut groups: BTreeMap<(String, String), Vec<Job>> = BTreeMap::new();
            for j in taken {
                groups
                    .entry((j.kb.clone(), j.charge_to.clone()))
                    .or_default()
                    .push(j);
            }
            for ((kb, charge_to), group) in groups {
                let s = state.clone();
                let done =
                    tokio::task::spawn_blocking(move || run_group(&s, &kb, &charge_to, &group))
                        .await;
                if let Err(e) = done {
                    tracing::error!(error = %e, "an ingestion task failed");
                }
            }
        }
    });
}

fn run_group(state: &SharedState, kb_id: &str, charge_to: &str, group: &[Job]) {
    let Some(knowledge) = state.knowledge.as_ref() else {
        return;
    };
    let Some(kb) = knowledge.get(kb_id, None) else {
        return;
    };
    let abandon = |code: &str, why: &str| {
        for j in group {
            let _ = kb.abandon(&j.doc, j.version, code, why);
        }
    };
    let principal = match payer(state, charge_to) {
        Ok(p) => p,
        Err(why) => return abandon("payer_unavailable", &why),
    };
    let embedder =
        match MeteredEmbedder::of(state.clone(), principal, INGEST_ENDPOINT, kb.settings()) {
            Ok(e) => e,
            Err(why) => return abandon("model_unavailable", &why),
        };
    let jobs: Vec<(String, i64)> = group.iter().map(|j| (j.doc.clone(), j.version)).collect();
    match kb.ingest_many(&jobs, &embedder) {
        Ok(statuses) => {
            tracing::info!(
                kb = kb_id,
                documents = jobs.len(),
                ready = statuses
                    .iter()
                    .filter(|s| **s == kiln_rag::kb::Status::Ready)
                    .count(),
                "ingestion ended"
            )
        }
        Err(e) => {
            tracing::error!(kb = kb_id, error = %e, "ingestion failed");
            abandon("internal", &e.to_string());
        }
    }
}

/// The principal an ingestion is charged to, looked up again now: a key
/// revoked since the upload pays for nothing more.
fn payer(state: &SharedState, key_id: &str) -> Result<Arc<Principal>, String> {
    let db = state.db();
    let key = db
        .key(key_id)
        .map_err(|e| format!("the key that uploaded the document cannot be read: {e}"))?
        .ok_or_else(|| "the key that uploaded the document no longer exists".to_string())?;
    if let Some(why) = key.unusable_because(kiln_store::now_ms()) {
        return Err(format!("the key that uploaded the document {why}"));
    }
    let tenant = db
        .tenant(&key.tenant_id)
        .map_err(|e| format!("the uploader's tenant cannot be read: {e}"))?
        .ok_or_else(|| "the uploader's tenant no longer exists".to_string())?;
    if tenant.disabled_at_ms.is_some() {
        return Err(format!("the tenant `{}` is disabled", tenant.name));
    }
    Ok(Arc::new(Principal {
        tenant,
        key: Some(key),
    }))
}

/// A knowledge base's embedding model, each call admitted, reserved and
/// settled against `principal` like a `/v1/embeddings` request: the
/// server's own model, or one an upstream serves. Used from blocking
/// threads only (it waits on the runtime for admission and settlement).
pub struct MeteredEmbedder {
    state: SharedState,
    principal: Arc<Principal>,
    endpoint: &'static str,
    runtime: tokio::runtime::Handle,
    /// Rate-limit refusals are waited out (ingestion), or returned at once
    /// (a search the caller is waiting for).
    wait_for_rate: bool,
    model: String,
    backend: Backend,
    /// What the knowledge base was built with; `None` while a new one's
    /// upstream model is probed.
    dimensions: Option<usize>,
}

enum Backend {
    /// The server's own embedding model.
    Local,
    Upstream(Arc<Upstream>),
}

impl MeteredEmbedder {
    /// The embedder of `model` with vectors of `dimensions`, or why there
    /// is none: the model is not served here, or no runtime runs.
    pub fn new(
        state: SharedState,
        principal: Arc<Principal>,
        endpoint: &'static str,
        model: &str,
        dimensions: Option<usize>,
    ) -> Result<MeteredEmbedder, String> {
        let backend = match (&state.models.embedding, state.models.upstream.get(model)) {
            (Some(local), _) if local.name == model => Backend::Local,
            (_, Some(up)) => Backend::Upstream(up.clone()),
            _ => return Err(format!("the embedding model `{model}` is not served here")),
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "no async runtime is running".to_string())?;
        Ok(MeteredEmbedder {
            state,
            principal,
            endpoint,
            runtime,
            wait_for_rate: endpoint == INGEST_ENDPOINT,
            model: model.to_string(),
            backend,
            dimensions,
        })
    }

    /// The embedder of the knowledge base with `settings`.
    pub fn of(
        state: SharedState,
        principal: Arc<Principal>,
        endpoint: &'static str,
        settings: &Settings,
    ) -> Result<MeteredEmbedder, String> {
        Self::new(
            state,
            principal,
            endpoint,
            &settings.embedding_model,
            Some(settings.dimensions),
        )
    }

    fn local(&self) -> Option<&crate::registry::EmbeddingModel> {
        self.state.models.embedding.as_ref()
    }

    /// One metered call of `tokens` (its worst case) to `backend`; `run`
    /// embeds and returns the vectors and the tokens to charge.
    fn metered(
        &self,
        tokens: usize,
        backend: &str,
        run: impl FnOnce(&CallContext) -> Result<(Vec<Vec<f32>>, usize), ApiError>,
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        // A long ingestion looks at its payer again before every batch: a
        // key revoked (or a tenant disabled) meanwhile stops it.
        if let (true, Some(key)) = (self.wait_for_rate, &self.principal.key) {
            if let Err(why) = payer(&self.state, &key.id) {
                return Err(ApiError::new(ErrorCode::PermissionDenied, why));
            }
        }
        self.principal.check_model(&self.model)?;
        let call = CallContext::new(
            self.state.clone(),
            format!("kb-{}", uuid::Uuid::new_v4().simple()),
            self.endpoint,
            self.model.clone(),
            self.principal.clone(),
        );
        self.runtime.block_on(call.admit_to(tokens, 0, backend))?;
        match run(&call) {
            Ok((vectors, tokens)) => {
                self.runtime.block_on(call.embedded(tokens))?;
                self.state
                    .metrics
                    .prompt_tokens
                    .with_label_values(&[&self.model])
                    .inc_by(tokens as u64);
                Ok(vectors)
            }
            Err(e) => {
                call.failed(e.code.as_str(), crate::api::calls::Used::default());
                Err(e)
            }
        }
    }

    /// Embeds with the server's own model: admitted for the exact tokens.
    fn embed_locally(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ApiError> {
        let model = self.local().ok_or_else(ApiError::internal)?;
        let max = model.embedder.max_tokens();
        let mut batch = Vec::with_capacity(texts.len());
        for t in texts {
            let mut ids = model.embedder.tokenize(t);
            if ids.len() > max {
                // Chunks are cut to fit; a query may not be. Keep the
                // start and the closing `[SEP]`.
                let sep = ids.last().copied();
                ids.truncate(max - 1);
                ids.extend(sep);
            }
            batch.push(ids);
        }
        let tokens: usize = batch.iter().map(Vec::len).sum();
        self.metered(tokens, EMBEDDED_BACKEND, |_| {
            let _permit = self
                .runtime
                .block_on(model.permits.clone().acquire_owned())
                .map_err(|_| ApiError::internal())?;
            let vectors = model.embedder.embed(&batch).map_err(ApiError::from)?;
            Ok((vectors, tokens))
        })
    }

    /// Embeds at the upstream: admitted for the tokenizer's count (or the
    /// bytes), charged what the upstream reports.
    fn embed_upstream(&self, up: &Upstream, texts: &[String]) -> Result<Vec<Vec<f32>>, ApiError> {
        let bound = up.embedding_bound(texts) as usize;
        self.metered(bound, &up.name, |call| {
            let (vectors, reported) = self
                .runtime
                .block_on(crate::upstream::embed(call, up, &self.model, texts))?;
            let want = self.dimensions.or(vectors.first().map(Vec::len)).unwrap_or(0);
            if let Some(v) = vectors
                .iter()
                .find(|v| v.len() != want || v.iter().any(|x| !x.is_finite()))
            {
                return Err(crate::upstream::upstream_error(
                    up,
                    format!(
                        "`{}` answered a vector of {} dimensions (or not finite) where {want} were expected",
                        self.model,
                        v.len()
                    ),
                ));
            }
            Ok((vectors, reported.map_or(bound, |t| t as usize)))
        })
    }

    /// The length of `model`'s vectors, from one metered call: what a new
    /// knowledge base on an upstream model is built with.
    pub fn probe_dimensions(&self) -> Result<usize, ApiError> {
        match &self.backend {
            Backend::Local => Ok(self.local().map_or(0, |m| m.embedder.dimensions())),
            Backend::Upstream(up) => {
                let vectors = self.embed_upstream(up, &["dimensions".to_string()])?;
                let dims = vectors.first().map_or(0, Vec::len);
                if dims == 0 {
                    return Err(crate::upstream::upstream_error(
                        up,
                        format!("`{}` answered an empty embedding", self.model),
                    ));
                }
                Ok(dims)
            }
        }
    }
}

impl Embedder for MeteredEmbedder {
    fn model(&self) -> &str {
        &self.model
    }

    fn dimensions(&self) -> usize {
        match (&self.backend, self.dimensions) {
            (_, Some(d)) => d,
            (Backend::Local, None) => self.local().map_or(0, |m| m.embedder.dimensions()),
            (Backend::Upstream(_), None) => 0,
        }
    }

    fn max_tokens(&self) -> usize {
        match &self.backend {
            // The model's limit counts `[CLS]` and `[SEP]`.
            Backend::Local => self
                .local()
                .map_or(0, |m| m.embedder.max_tokens().saturating_sub(2)),
            Backend::Upstream(up) => up.max_chunk_tokens() as usize,
        }
    }

    fn count_tokens(&self, text: &str) -> usize {
        match &self.backend {
            Backend::Local => self
                .local()
                .map_or(0, |m| m.embedder.tokenize(text).len().saturating_sub(2)),
            Backend::Upstream(up) => up.chunk_tokens(text) as usize,
        }
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut tries = 0;
        loop {
            let result = match &self.backend {
                Backend::Local => self.embed_locally(texts),
                Backend::Upstream(up) => self.embed_upstream(up, texts),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if e.code == ErrorCode::RateLimitExceeded && self.wait_for_rate => {
                    tries += 1;
                    if tries >= RATE_TRIES {
                        return Err(EmbedError::Refused(e.message));
                    }
                    std::thread::sleep(RATE_WAIT);
                }
                Err(e) => {
                    return Err(match e.code {
                        ErrorCode::InsufficientQuota
                        | ErrorCode::AccountDisabled
                        | ErrorCode::RateLimitExceeded
                        | ErrorCode::PermissionDenied => EmbedError::Refused(e.message),
                        _ => EmbedError::Failed(e.message),
                    })
                }
            }
        }
    }
}

/// The ledger endpoint of a knowledge-base search's rerank call.
pub const RERANK_ENDPOINT: &str = "/api/kbs/rerank";
/// How long a rerank call may take.
const RERANK_TIMEOUT: Duration = Duration::from_secs(30);

/// An upstream rerank endpoint (`[rerank]` in the configuration): vLLM's,
/// Text Embeddings Inference's or any server speaking the common
/// `{model, query, documents}` → `{results: [{index, relevance_score}]}`
/// shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerankConfig {
    /// The endpoint's full URL, e.g. `http://host:8000/v1/rerank`.
    pub url: String,
    /// The model name sent, and metered and priced under.
    pub model: String,
    /// An environment variable holding the upstream's API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// For an `https` URL: CAs to trust instead of the system's, and a
    /// client certificate and key (PEM), as for `[[upstreams]]`.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub client_cert_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<std::path::PathBuf>,
}

impl RerankConfig {
    fn tls_files(&self) -> crate::upstream::TlsFiles<'_> {
        crate::upstream::TlsFiles {
            ca_file: self.ca_file.as_deref(),
            client_cert_file: self.client_cert_file.as_deref(),
            client_key_file: self.client_key_file.as_deref(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let uri: hyper::Uri = self
            .url
            .parse()
            .map_err(|e| format!("rerank url `{}`: {e}", self.url))?;
        self.tls_files()
            .check(&uri)
            .map_err(|e| format!("rerank url `{}`: {e}", self.url))?;
        crate::config::validate_plain_name("rerank model", &self.model)
    }
}

/// The configured rerank endpoint and its client, made once at start.
pub struct Rerank {
    pub config: RerankConfig,
    client: crate::upstream::HttpClient,
}

impl Rerank {
    pub fn new(config: RerankConfig) -> Result<Rerank, String> {
        config.validate()?;
        let client = crate::upstream::http_client(
            "rerank",
            &config.url,
            &config.tls_files(),
            Duration::from_secs(10),
        )
        .map_err(|e| format!("[rerank]: {e}"))?;
        Ok(Rerank { config, client })
    }
}

/// The configured rerank endpoint, each call metered to `principal`. Used
/// from blocking threads only.
pub struct UpstreamReranker {
    state: SharedState,
    principal: Arc<Principal>,
    rerank: Arc<Rerank>,
    runtime: tokio::runtime::Handle,
}

impl UpstreamReranker {
    /// `None` when no reranker is configured.
    pub fn new(state: SharedState, principal: Arc<Principal>) -> Option<UpstreamReranker> {
        let rerank = state.rerank.clone()?;
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(UpstreamReranker {
            state,
            principal,
            rerank,
            runtime,
        })
    }

    /// Tokens the call is charged when the upstream reports none: the query
    /// once per passage plus the passages, by the embedding tokenizer.
    fn estimate(&self, query: &str, passages: &[&str]) -> usize {
        let count = |t: &str| {
            self.state
                .models
                .embedding
                .as_ref()
                .map_or(t.split_whitespace().count(), |m| {
                    m.embedder.tokenize(t).len()
                })
        };
        let q = count(query);
        passages.iter().map(|p| q + count(p)).sum()
    }

    async fn post(&self, body: Vec<u8>) -> Result<serde_json::Value, String> {
        use http_body_util::BodyExt;
        let mut req = hyper::Request::post(&self.rerank.config.url)
            .header("content-type", "application/json");
        if let Some(var) = &self.rerank.config.api_key_env {
            if let Ok(key) = std::env::var(var) {
                req = req.header("authorization", format!("Bearer {key}"));
            }
        }
        let req = req
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(RERANK_TIMEOUT, self.rerank.client.request(req))
            .await
            .map_err(|_| "the rerank upstream did not answer in time".to_string())?
            .map_err(|e| {
                format!(
                    "cannot reach the rerank upstream: {}",
                    crate::upstream::causes(&e)
                )
            })?;
        let status = resp.status();
        let bytes = tokio::time::timeout(RERANK_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| "the rerank upstream did not answer in time".to_string())?
            .map_err(|e| format!("reading the rerank answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "the rerank upstream answered {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(300)
                    .collect::<String>()
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("the rerank answer is not JSON: {e}"))
    }
}

impl kiln_rag::retrieve::Reranker for UpstreamReranker {
    fn model(&self) -> &str {
        &self.rerank.config.model
    }

    fn rerank(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>, EmbedError> {
        let estimate = self.estimate(query, passages);
        let call = CallContext::new(
            self.state.clone(),
            format!("kb-{}", uuid::Uuid::new_v4().simple()),
            RERANK_ENDPOINT,
            self.rerank.config.model.clone(),
            self.principal.clone(),
        );
        self.principal
            .check_model(&self.rerank.config.model)
            .map_err(|e| EmbedError::Refused(e.message))?;
        self.runtime
            .block_on(call.admit_to(estimate, 0, "rerank"))
            .map_err(|e| EmbedError::Refused(e.message))?;
        let body = serde_json::json!({
            "model": self.rerank.config.model,
            "query": query,
            "documents": passages,
        });
        let answer = serde_json::to_vec(&body)
            .map_err(|e| e.to_string())
            .and_then(|b| self.runtime.block_on(self.post(b)));
        let parsed = answer.and_then(|v| {
            let mut scores = vec![f32::NAN; passages.len()];
            for r in v["results"].as_array().into_iter().flatten() {
                let (Some(i), Some(s)) = (r["index"].as_u64(), r["relevance_score"].as_f64())
                else {
                    return Err("a rerank result lacks index or relevance_score".to_string());
                };
                match scores.get_mut(i as usize) {
                    Some(slot) => *slot = s as f32,
                    None => return Err(format!("a rerank result's index {i} is out of range")),
                }
            }
            if scores.iter().any(|s| s.is_nan()) {
                return Err("the rerank upstream did not score every passage".to_string());
            }
            let used = v["usage"]["total_tokens"]
                .as_u64()
                .map_or(estimate, |t| t as usize);
            Ok((scores, used))
        });
        match parsed {
            Ok((scores, used)) => {
                self.runtime
                    .block_on(call.embedded(used))
                    .map_err(|e| EmbedError::Failed(e.message))?;
                Ok(scores)
            }
            Err(why) => {
                call.failed(
                    ErrorCode::UpstreamError.as_str(),
                    crate::api::calls::Used::default(),
                );
                Err(EmbedError::Failed(why))
            }
        }
    }
}
