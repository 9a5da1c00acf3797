//! The HTTP surface: the route table, shared state, and the middleware every
//! request passes through (request id, tracing span, metrics).
//!
//! Handlers live one endpoint family per module; they turn wire requests into
//! engine calls and never contain model logic.

pub mod admin;
mod agents;
mod ask;
pub mod calls;
mod chat;
mod completions;
mod embeddings;
mod generate;
mod info;
mod kb;
mod output;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kiln_engine::engine::EngineHandle;
use kiln_store::Database;
use kiln_types::error::ErrorCode;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::auth::{Auth, Principal};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::{EmbeddingModel, ServedModels};
use calls::Meter;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

pub struct AppState {
    pub models: ServedModels,
    pub metrics: Metrics,
    /// Unix time the server started; `created` of every model card.
    pub started: u64,
    pub auth: Arc<Auth>,
    pub meter: Meter,
    /// Knowledge bases; `None` without an embedding model.
    pub knowledge: Option<Arc<crate::knowledge::Knowledge>>,
    /// The upstream reranker knowledge-base searches use, if configured.
    pub rerank: Option<Arc<crate::knowledge::Rerank>>,
    /// The tools agents may be given.
    pub tools: Arc<crate::runs::ServerTools>,
    /// Wakes the requests waiting on a run and its event streams when
    /// this replica writes to the run or its journal (runs other replicas
    /// drive are looked at on a timer).
    pub run_watch: crate::runs::RunWatch,
    /// The secret replicas sign requests to each other with, read from the
    /// store when first needed.
    cluster_secret: tokio::sync::OnceCell<String>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn new(models: ServedModels, metrics: Metrics, auth: Arc<Auth>, meter: Meter) -> Self {
        AppState {
            models,
            metrics,
            started: unix_now(),
            auth,
            meter,
            knowledge: None,
            rerank: None,
            tools: Arc::new(crate::runs::ServerTools::new(crate::runs::default_toolbox())),
            run_watch: crate::runs::RunWatch::default(),
            cluster_secret: tokio::sync::OnceCell::new(),
        }
    }

    /// The secret every replica of this database signs its requests to
    /// the others with.
    pub async fn cluster_secret(&self) -> Result<&str, ApiError> {
        let secret = self
            .cluster_secret
            .get_or_try_init(|| async {
                let db = self.db().clone();
                tokio::task::spawn_blocking(move || db.cluster_secret())
                    .await
                    .map_err(|_| ApiError::internal())?
                    .map_err(crate::error::store_unavailable)
            })
            .await?;
        Ok(secret.as_str())
    }

    /// Wakes whatever waits on run `id` (see `run_watch`).
    pub fn run_changed(&self, id: &str) {
        self.run_watch.changed(id);
    }

    pub fn db(&self) -> &Arc<dyn Database> {
        &self.meter.db
    }

    fn is_served(&self, model: &str) -> bool {
        self.models.text.contains_key(model)
            || self.models.upstream.contains_key(model)
            || self
                .models
                .embedding
                .as_ref()
                .is_some_and(|m| m.name == model)
    }

    fn text_model(&self, name: &str) -> Result<&EngineHandle, ApiError> {
        self.models
            .text
            .get(name)
            .ok_or_else(|| ApiError::model_not_found(name, "text"))
    }

    fn embedding_model(&self, name: &str) -> Result<&EmbeddingModel, ApiError> {
        self.models
            .embedding
            .as_ref()
            .filter(|m| m.name == name)
            .ok_or_else(|| ApiError::model_not_found(name, "embedding"))
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The model a response was for, for metrics labels.
#[derive(Debug, Clone)]
pub struct ModelLabel(pub String);

/// Marks a streamed response; its duration is recorded when the stream ends.
#[derive(Debug, Clone, Copy)]
pub struct Streamed;

/// The id of the request being served.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub fn router(state: SharedState, max_body_bytes: usize) -> Router {
    let model_api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(info::list_models))
        .route("/v1/models/{*id}", get(info::get_model))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate_model_api,
        ));
    let admin_api = admin::routes()
        .merge(kb::routes(state.clone()))
        .merge(agents::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate_admin_api,
        ));
    Router::new()
        .merge(model_api)
        .merge(admin_api)
        .route(kb::INTERNAL_SEARCH, post(kb::internal_search))
        .route("/healthz", get(info::healthz))
        .route("/metrics", get(info::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// `/v1`: a valid key, or none under `--no-auth`.
async fn authenticate_model_api(
    State(state): State<SharedState>,
    mut req: Request,
    next: Next,
) -> Response {
    match state.auth.for_model_api(req.headers()).await {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => {
            // A disabled tenant's key is refused here once the key cache
            // knows, at admission before that: count both the same way.
            if e.code == ErrorCode::AccountDisabled {
                state
                    .metrics
                    .refusals
                    .with_label_values(&["account_disabled"])
                    .inc();
            }
            e.into_response()
        }
    }
}

/// `/api`: always a valid key; each route checks the key's role.
async fn authenticate_admin_api(
    State(state): State<SharedState>,
    mut req: Request,
    next: Next,
) -> Response {
    match state.auth.for_admin_api(req.headers()).await {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// A panic in a handler is a bug: log it, answer 500 in the API's shape.
fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::internal().into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not accept that method",
    )
}

/// A client's id is echoed when it is short and plain; otherwise one is made.
fn request_id_from(req: &Request) -> String {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

async fn observe(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = request_id_from(&req);
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        endpoint = %endpoint,
        model = tracing::field::Empty,
    );
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    let model = response
        .extensions()
        .get::<ModelLabel>()
        .map(|m| m.0.clone())
        .unwrap_or_default();
    let m = &state.metrics;
    m.requests
        .with_label_values(&[&endpoint, &model, status.as_str()])
        .inc();
    if let Some(code) = response.extensions().get::<ErrorCode>() {
        m.errors.with_label_values(&[code.as_str()]).inc();
        span.in_scope(|| {
            tracing::info!(
                status = status.as_u16(),
                code = code.as_str(),
                "request failed"
            )
        });
    } else {
        span.in_scope(|| {
            tracing::info!(
                status = status.as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "{}",
                if response.extensions().get::<Streamed>().is_some() {
                    "stream started"
                } else {
                    "request done"
                }
            )
        });
    }
    if response.extensions().get::<Streamed>().is_none() {
        m.request_duration
            .with_label_values(&[&endpoint])
            .observe(started.elapsed().as_secs_f64());
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

/// A whole chat completion from the embedded engine for an internal call
/// (an agent's step), metered through `call`.
pub(crate) async fn chat_complete(
    call: &calls::CallContext,
    req: kiln_types::openai::ChatCompletionRequest,
) -> Result<kiln_types::openai::ChatCompletion, ApiError> {
    chat::complete(call, req).await
}

/// A knowledge-base search for an agent's tool (see [`kb`]).
pub(crate) async fn kb_search(
    state: &SharedState,
    principal: &Arc<Principal>,
    kb: &str,
    query: &str,
    k: usize,
) -> Result<Vec<kiln_rag::kb::Hit>, ApiError> {
    kb::search_as(state, principal, kb, query, k).await
}

/// Where a model request goes.
pub enum Routed {
    /// Answered already: proxied to the upstream serving the model.
    Done(Response),
    /// For the embedded engine: the call and the request body.
    Local(calls::CallContext, serde_json::Value),
}

/// Sends a request for a model an upstream serves to that upstream
/// (metered); hands anything else back for the embedded engine.
pub async fn route(
    state: SharedState,
    request_id: RequestId,
    principal: Arc<Principal>,
    endpoint: &'static str,
    kind: crate::upstream::Endpoint,
    body: serde_json::Value,
) -> Routed {
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let up = state.models.upstream.get(&model).cloned();
    let call = calls::CallContext::new(state, request_id.0, endpoint, model, principal);
    let Some(up) = up else {
        return Routed::Local(call, body);
    };
    let result = match call.principal.check_model(&call.model) {
        Ok(()) => crate::upstream::proxy(&call, &up, kind, body).await,
        Err(e) => Err(e),
    };
    Routed::Done(finish_call(&call, result))
}

/// Finishes a model endpoint's response: a failure for a served model is
/// recorded in the request log; the model becomes the metrics label and is
/// recorded on the request's span. Names of models not served are not
/// labels: clients must not grow the metrics.
fn finish_call(call: &calls::CallContext, result: Result<Response, ApiError>) -> Response {
    let served = call.state.is_served(&call.model);
    if let (Err(e), true) = (&result, served) {
        call.failed(e.code.as_str(), calls::Used::default());
    }
    let model = if served { call.model.as_str() } else { "" };
    tracing::Span::current().record("model", model);
    let mut r = result.into_response();
    for (name, value) in call.rate_headers() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            r.headers_mut().insert(name, v);
        }
    }
    r.extensions_mut().insert(ModelLabel(model.to_string()));
    r
}
