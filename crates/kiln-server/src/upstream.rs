//! Upstream backends: models served by another OpenAI-compatible server
//! (vLLM, SGLang, llama.cpp's server, another Kiln), named in the config:
//!
//! ```toml
//! [[upstreams]]
//! name = "vllm-a"
//! base_url = "http://10.0.0.5:8000/v1"
//! models = ["llama-3-70b"]
//! api_key_env = "VLLM_A_KEY"      # optional: the upstream's key, read from this variable
//! timeout_seconds = 300            # optional: connect + each read (default 300)
//! default_max_tokens = 4096        # optional: set when a request gives none
//! tokenizer = "smollm2-135m"       # optional: the model whose tokenizer counts tokens
//!                                  # when the upstream reports no usage: a GGUF text
//!                                  # model, or an installed embedding model
//! max_input_tokens = 512           # optional: longest input its embedding models take
//! ca_file = "/etc/kiln/ca.pem"     # optional, https: trust these CAs instead of the system's
//! client_cert_file = "kiln.pem"    # optional, https: a client certificate (mutual TLS)
//! client_key_file = "kiln.key"     #   and its private key (PEM)
//! ```
//!
//! A request for one of these models is metered exactly like one for the
//! embedded engine: admitted (rate limits, then a reservation of its worst
//! case), forwarded with its JSON unchanged but for a `max_tokens` when it had
//! none (so the worst case is bounded) and `stream_options.include_usage`
//! when streamed (so usage comes back), and settled from the upstream's
//! reported usage before the response's last bytes go out. Streams are passed
//! through event by event, never buffered whole.
//!
//! The worst case takes the prompt's size in bytes plus a margin as its token
//! count: a byte-level tokenizer never makes more tokens than bytes. When the
//! upstream reports no usage, tokens are counted with `tokenizer` if one is
//! configured, else the prompt is charged at that byte bound and the
//! completion at one token per streamed chunk (or per 4 bytes of text).
//!
//! An upstream that cannot be reached or answers 5xx gives the client 502
//! (`upstream_error`), one that does not answer in time 504
//! (`upstream_timeout`); a 4xx is the client's own mistake and passes
//! through. Failed calls are recorded as errors and charged nothing, but for
//! a stream that breaks off after tokens went out: like a stream the client
//! abandons, it is charged for what the client received (the prompt and the
//! tokens streamed), and recorded as `upstream_error`.
//!
//! Cached prompt tokens the upstream reports
//! (`usage.prompt_tokens_details.cached_tokens`) are priced as cached.
//!
//! An upstream's embedding models can also build knowledge bases
//! ([`embed`]): chunks are sized with `tokenizer` (by bytes without one, a
//! bound no tokenizer exceeds) and kept within `max_input_tokens`.
//!
//! An `https://` upstream is reached over TLS 1.2 or 1.3 (rustls): its
//! certificate must chain to the system's trusted roots, or to `ca_file`'s
//! when one is given, and name the URL's host; a certificate that does not
//! is a 502 that says why, and nothing is sent.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_engine::bert::wordpiece::WordPieceTokenizer;
use kiln_engine::tokenizer::Tokenizer;
use kiln_store::Outcome;
use kiln_types::error::{ErrorBody, ErrorCode};
use serde::Deserialize;
use serde_json::Value;

use crate::api::calls::{CallContext, Used};
use crate::error::ApiError;
use kiln_store::money::TokenCounts;

pub const DEFAULT_TIMEOUT_SECONDS: u64 = 300;
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
/// Tokens added to a prompt's byte count for special and template tokens.
const PROMPT_MARGIN_TOKENS: u64 = 64;
/// Largest upstream response body read whole (non-streamed).
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// The longest embedding input assumed when neither `max_input_tokens` nor
/// an embedding model's tokenizer says (BERT-family models take 512).
pub const DEFAULT_MAX_INPUT_TOKENS: u64 = 512;

/// One `[[upstreams]]` entry of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// Base URL ending in the API root, e.g. `http://host:8000/v1`.
    pub base_url: String,
    pub models: Vec<String>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub default_max_tokens: Option<u64>,
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// The longest input, in tokens (special tokens included), its
    /// embedding models take.
    #[serde(default)]
    pub max_input_tokens: Option<u64>,
    /// PEM file of the CA certificates an `https` upstream's certificate
    /// must chain to (instead of the system's roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM files of a client certificate chain and its key, for an
    /// `https` upstream that asks for one.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

impl UpstreamConfig {
    fn tls_files(&self) -> TlsFiles<'_> {
        TlsFiles {
            ca_file: self.ca_file.as_deref(),
            client_cert_file: self.client_cert_file.as_deref(),
            client_key_file: self.client_key_file.as_deref(),
        }
    }

    /// Checks what can be checked without connecting.
    pub fn validate(&self) -> Result<(), String> {
        crate::config::validate_plain_name("upstream name", &self.name)?;
        let uri: Uri = self.base_url.parse().map_err(|e| {
            format!(
                "upstream `{}`: base_url `{}`: {e}",
                self.name, self.base_url
            )
        })?;
        self.tls_files().check(&uri).map_err(|e| {
            format!(
                "upstream `{}`: base_url `{}`: {e}",
                self.name, self.base_url
            )
        })?;
        if self.models.is_empty() || self.models.iter().any(|m| m.trim().is_empty()) {
            return Err(format!(
                "upstream `{}` must list the model names it serves",
                self.name
            ));
        }
        if let Some(t) = self.timeout_seconds {
            if !(1..=3600).contains(&t) {
                return Err(format!(
                    "upstream `{}`: timeout_seconds {t} must be between 1 and 3600",
                    self.name
                ));
            }
        }
        if let Some(m) = self.max_input_tokens {
            if !(8..=1_000_000).contains(&m) {
                return Err(format!(
                    "upstream `{}`: max_input_tokens {m} must be between 8 and 1000000",
                    self.name
                ));
            }
        }
        if let Some(m) = self.default_max_tokens {
            if !(1..=1_000_000).contains(&m) {
                return Err(format!(
                    "upstream `{}`: default_max_tokens {m} must be between 1 and 1000000",
                    self.name
                ));
            }
        }
        Ok(())
    }
}

/// A connected upstream.
pub struct Upstream {
    pub name: String,
    base_url: String,
    api_key: Option<String>,
    client: HttpClient,
    timeout: Duration,
    pub default_max_tokens: u64,
    tokenizer: Option<TokenCounter>,
    /// Tokens the model adds around every input: the tokenizer's, else 2
    /// assumed (`[CLS]` and `[SEP]`, or BOS and EOS).
    special_tokens: u64,
    /// The longest embedding input, special tokens included.
    pub max_input_tokens: u64,
}

/// Where an upstream's tokenizer comes from (`tokenizer` in its config).
#[derive(Debug, Clone)]
pub enum TokenizerFile {
    /// A GGUF text model's file.
    Gguf(PathBuf),
    /// A sentence-transformers model's directory.
    SentenceTransformers(PathBuf),
}

/// Counts tokens as an upstream's model does.
enum TokenCounter {
    Gguf(Box<Tokenizer>),
    /// Its counts include `[CLS]` and `[SEP]`, as the model's input does.
    WordPiece(WordPieceTokenizer),
}

impl TokenCounter {
    fn load(file: &TokenizerFile) -> Result<(TokenCounter, Option<u64>), String> {
        match file {
            TokenizerFile::Gguf(path) => {
                let gguf = kiln_engine::gguf::GgufFile::open(path)
                    .map_err(|e| format!("tokenizer {}: {e}", path.display()))?;
                let t = Tokenizer::from_gguf(gguf.content())
                    .map_err(|e| format!("tokenizer {}: {e}", path.display()))?;
                Ok((TokenCounter::Gguf(Box::new(t)), None))
            }
            TokenizerFile::SentenceTransformers(dir) => {
                let (t, max) = kiln_engine::bert::BertEmbedder::load_tokenizer(dir)
                    .map_err(|e| format!("tokenizer {}: {e}", dir.display()))?;
                Ok((TokenCounter::WordPiece(t), Some(max as u64)))
            }
        }
    }

    fn count(&self, text: &str) -> u64 {
        match self {
            TokenCounter::Gguf(t) => t.encode(text, false).len() as u64,
            TokenCounter::WordPiece(t) => t.encode(text).len() as u64,
        }
    }

    /// Tokens the model adds around every input (`[CLS]` and `[SEP]`).
    fn special_tokens(&self) -> u64 {
        match self {
            TokenCounter::Gguf(_) => 0,
            TokenCounter::WordPiece(t) => t.encode("").len() as u64,
        }
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// `tokenizer` is the model named by `tokenizer`, already resolved.
    pub fn new(cfg: &UpstreamConfig, tokenizer: Option<TokenizerFile>) -> anyhow::Result<Upstream> {
        cfg.validate().map_err(anyhow::Error::msg)?;
        let api_key = match &cfg.api_key_env {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|_| {
                anyhow::anyhow!(
                    "upstream `{}`: the environment variable {var} (api_key_env) is not set",
                    cfg.name
                )
            })?),
        };
        let timeout = Duration::from_secs(cfg.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS));
        let client = http_client(
            &cfg.name,
            &cfg.base_url,
            &cfg.tls_files(),
            timeout.min(Duration::from_secs(10)),
        )
        .map_err(|e| anyhow::anyhow!("upstream `{}`: {e}", cfg.name))?;
        let (tokenizer, model_max) = match tokenizer.as_ref().map(TokenCounter::load) {
            None => (None, None),
            Some(Ok((t, max))) => (Some(t), max),
            Some(Err(e)) => anyhow::bail!("upstream `{}`: {e}", cfg.name),
        };
        Ok(Upstream {
            name: cfg.name.clone(),
            base_url: cfg.base_url.trim_end_matches('/').to_string(),
            api_key,
            client,
            timeout,
            default_max_tokens: cfg.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            special_tokens: tokenizer.as_ref().map_or(2, TokenCounter::special_tokens),
            tokenizer,
            max_input_tokens: cfg
                .max_input_tokens
                .or(model_max)
                .unwrap_or(DEFAULT_MAX_INPUT_TOKENS),
        })
    }

    fn count_tokens(&self, text: &str) -> Option<u64> {
        self.tokenizer.as_ref().map(|t| t.count(text))
    }

    /// Tokens of `text` as a chunk of a knowledge base, special tokens
    /// excluded: the tokenizer's count, else the text's bytes (no tokenizer
    /// makes more tokens than bytes).
    pub fn chunk_tokens(&self, text: &str) -> u64 {
        match &self.tokenizer {
            Some(t) => t.count(text).saturating_sub(self.special_tokens),
            None => text.len() as u64,
        }
    }

    /// The most tokens a chunk may have, special tokens excluded.
    pub fn max_chunk_tokens(&self) -> u64 {
        self.max_input_tokens.saturating_sub(self.special_tokens)
    }

    /// The worst-case token count of embedding `inputs`: the tokenizer's
    /// count, else each input's bytes plus a margin.
    pub fn embedding_bound(&self, inputs: &[String]) -> u64 {
        inputs
            .iter()
            .map(|t| {
                self.count_tokens(t)
                    .unwrap_or(t.len() as u64 + PROMPT_MARGIN_TOKENS)
            })
            .sum()
    }
}

/// An HTTP/1 client for `http://` and `https://` URLs.
pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The TLS files of a configured endpoint (an upstream, the reranker).
pub(crate) struct TlsFiles<'a> {
    /// PEM CA certificates to trust instead of the system's.
    pub ca_file: Option<&'a Path>,
    /// A PEM client certificate chain and its key (mutual TLS).
    pub client_cert_file: Option<&'a Path>,
    pub client_key_file: Option<&'a Path>,
}

impl TlsFiles<'_> {
    /// Checks `uri` is `http[s]://HOST...` and the files fit its scheme.
    pub(crate) fn check(&self, uri: &Uri) -> Result<(), String> {
        let https = uri.scheme_str() == Some("https");
        if !(https || uri.scheme_str() == Some("http")) || uri.authority().is_none() {
            return Err("must be http[s]://HOST[:PORT]/PATH".into());
        }
        if !https && (self.ca_file.is_some() || self.client_cert_file.is_some()) {
            return Err("ca_file and client_cert_file need an https:// URL".into());
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err("client_cert_file and client_key_file go together".into());
        }
        Ok(())
    }
}

/// A pooled client for `url`: plain HTTP, or TLS 1.2/1.3 checked against
/// the system's CAs (or `files.ca_file`'s), with the client certificate if
/// one is given. `name` names the endpoint in warnings.
pub(crate) fn http_client(
    name: &str,
    url: &str,
    files: &TlsFiles<'_>,
    connect_timeout: Duration,
) -> Result<HttpClient, String> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(name, url, files)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector))
}

/// The TLS settings for `url`: the CAs its certificate is checked against,
/// and the client certificate, if any. An `http://` URL gets an empty root
/// store it never uses.
fn tls_config(name: &str, url: &str, files: &TlsFiles<'_>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem_certs = |path: &Path, what: &str| -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{what} {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{what} {}: no PEM certificate in it",
                path.display()
            ));
        }
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = files.ca_file {
        for cert in pem_certs(path, "ca_file")? {
            roots
                .add(cert)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        }
    } else if url.starts_with("https:") {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(endpoint = %name, error = %e, "a system CA certificate could not be read");
        }
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                endpoint = %name,
                "no trusted CA certificates were found on this system: every TLS connection to it will fail; give it a ca_file"
            );
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    match (files.client_cert_file, files.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = pem_certs(cert, "client_cert_file")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("client_key_file {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// An error and its causes, outermost first: a connection error says
/// which certificate check failed, not only that connecting did.
pub(crate) fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// Which API a proxied request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat/completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// The text a prompt is made of: what the byte bound and a tokenizer count.
fn prompt_text(endpoint: Endpoint, body: &Value) -> String {
    let mut out = String::new();
    let mut add = |v: &Value| match v {
        Value::String(s) => out.push_str(s),
        other => out.push_str(&other.to_string()),
    };
    match endpoint {
        Endpoint::Chat => {
            for m in body["messages"].as_array().into_iter().flatten() {
                add(&m["role"]);
                add(&m["content"]);
                if let Some(calls) = m.get("tool_calls") {
                    add(calls);
                }
            }
            if let Some(tools) = body.get("tools") {
                add(tools);
            }
        }
        Endpoint::Completions => add(&body["prompt"]),
        Endpoint::Embeddings => add(&body["input"]),
    }
    out
}

/// Sets a bounded `max_tokens` and asks for usage; returns the limit.
fn prepare(endpoint: Endpoint, body: &mut Value, up: &Upstream) -> Result<u64, ApiError> {
    let Some(obj) = body.as_object_mut() else {
        return Err(ApiError::invalid(
            "body",
            "the request body must be a JSON object",
        ));
    };
    if endpoint == Endpoint::Embeddings {
        return Ok(0);
    }
    let field = if obj.contains_key("max_completion_tokens") {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max = match obj.get(field) {
        None | Some(Value::Null) => {
            obj.insert(field.to_string(), Value::from(up.default_max_tokens));
            up.default_max_tokens
        }
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => n,
            _ => {
                return Err(ApiError::invalid(
                    if field == "max_tokens" {
                        "max_tokens"
                    } else {
                        "max_completion_tokens"
                    },
                    format!("`{field}` must be a whole number of at least 1"),
                ))
            }
        },
    };
    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        let opts = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(o) = opts.as_object_mut() {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    Ok(max)
}

pub(crate) fn upstream_error(up: &Upstream, what: String) -> ApiError {
    tracing::warn!(upstream = %up.name, "{what}");
    ApiError::new(
        ErrorCode::UpstreamError,
        format!("the upstream backend `{}` failed: {what}", up.name),
    )
}

fn upstream_timeout(up: &Upstream) -> ApiError {
    ApiError::new(
        ErrorCode::UpstreamTimeout,
        format!(
            "the upstream backend `{}` did not answer within {} s",
            up.name,
            up.timeout.as_secs()
        ),
    )
}

/// Forwards a request to `up`, metered. `client_wants_usage` is whether the
/// client itself asked for a usage chunk in a stream.
pub async fn proxy(
    call: &CallContext,
    up: &Arc<Upstream>,
    endpoint: Endpoint,
    mut body: Value,
) -> Result<Response, ApiError> {
    let client_wants_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
    let stream = body["stream"].as_bool() == Some(true);
    let max_tokens = prepare(endpoint, &mut body, up)?;
    let text = prompt_text(endpoint, &body);
    let prompt_bound = text.len() as u64 + PROMPT_MARGIN_TOKENS;
    call.admit_to(prompt_bound as usize, max_tokens as usize, &up.name)
        .await?;
    let payload = serde_json::to_vec(&body).map_err(|_| ApiError::internal())?;
    let answer = post(call, up, endpoint, payload).await?;
    let status = answer.status();
    if !status.is_success() {
        let bytes = read_all(up, answer.into_body()).await?;
        if status.is_client_error() {
            // The client's own mistake (or a refusal): passed through as is,
            // recorded as an error, charged nothing.
            call.failed(&format!("upstream_{}", status.as_u16()), Used::default());
            return Ok(passthrough(status, bytes));
        }
        return Err(upstream_error(
            up,
            format!(
                "it answered {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            ),
        ));
    }
    if stream {
        return Ok(stream_response(
            call.clone(),
            up.clone(),
            answer.into_body(),
            client_wants_usage,
            text,
            prompt_bound,
        ));
    }
    let bytes = read_all(up, answer.into_body()).await?;
    let json: Value = serde_json::from_slice(&bytes)
        .map_err(|e| upstream_error(up, format!("its answer is not JSON: {e}")))?;
    let tokens = match usage_of(&json["usage"]) {
        Some(u) => u,
        None => {
            let generated = generated_text(&json);
            TokenCounts {
                prompt: up.count_tokens(&text).unwrap_or(prompt_bound),
                cached: 0,
                completion: up
                    .count_tokens(&generated)
                    .unwrap_or((generated.len() as u64).div_ceil(4)),
            }
        }
    };
    let outcome = match (endpoint, json["choices"][0]["finish_reason"].as_str()) {
        (Endpoint::Embeddings, _) => Outcome::Ok,
        (_, Some("length")) => Outcome::Length,
        _ => Outcome::Stop,
    };
    call.settle_tokens(tokens, outcome, None).await?;
    Ok(passthrough(StatusCode::OK, bytes))
}

/// Posts `payload` to `up`'s `endpoint` and waits for the answer's head
/// (the `upstream` phase): a 502 when it cannot be reached, a 504 past its
/// timeout.
async fn post(
    call: &CallContext,
    up: &Upstream,
    endpoint: Endpoint,
    payload: Vec<u8>,
) -> Result<hyper::Response<hyper::body::Incoming>, ApiError> {
    let uri = format!("{}/{}", up.base_url, endpoint.path());
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(&uri)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-request-id", &call.request_id);
    if let Some(k) = &up.api_key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = req
        .body(Full::new(Bytes::from(payload)))
        .map_err(|e| upstream_error(up, format!("building the request to {uri}: {e}")))?;
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(up.timeout, up.client.request(req)).await;
    call.state
        .metrics
        .phase
        .with_label_values(&["upstream"])
        .observe(started.elapsed().as_secs_f64());
    match answer {
        Err(_) => Err(upstream_timeout(up)),
        Ok(Err(e)) => Err(upstream_error(
            up,
            format!("cannot reach {uri}: {}", causes(&e)),
        )),
        Ok(Ok(r)) => Ok(r),
    }
}

/// The vectors `model` at `up` gives `inputs`, in input order, and the
/// prompt tokens the upstream reported (if it did). Admission and
/// settlement are the caller's. A 400, 404 or 422 (an unknown model, or
/// one that does not embed) is `invalid_request_error` with the upstream's
/// message; any other failure is 502 or 504.
pub async fn embed(
    call: &CallContext,
    up: &Upstream,
    model: &str,
    inputs: &[String],
) -> Result<(Vec<Vec<f32>>, Option<u64>), ApiError> {
    let body = serde_json::json!({"model": model, "input": inputs, "encoding_format": "float"});
    let payload = serde_json::to_vec(&body).map_err(|_| ApiError::internal())?;
    let answer = post(call, up, Endpoint::Embeddings, payload).await?;
    let status = answer.status();
    let bytes = read_all(up, answer.into_body()).await?;
    if !status.is_success() {
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let said = json["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned()
            });
        let what = format!("it answered {status} to embedding with `{model}`: {said}");
        return Err(match status.as_u16() {
            400 | 404 | 422 => ApiError::new(
                ErrorCode::InvalidRequest,
                format!("the upstream backend `{}` refused: {what}", up.name),
            ),
            _ => upstream_error(up, what),
        });
    }
    #[derive(Deserialize)]
    struct Item {
        index: usize,
        embedding: Vec<f32>,
    }
    #[derive(Deserialize)]
    struct List {
        data: Vec<Item>,
        #[serde(default)]
        usage: Value,
    }
    let list: List = serde_json::from_slice(&bytes).map_err(|e| {
        upstream_error(
            up,
            format!("its embeddings answer is not the expected JSON: {e}"),
        )
    })?;
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; inputs.len()];
    for item in list.data {
        let slot = vectors.get_mut(item.index).ok_or_else(|| {
            upstream_error(
                up,
                format!(
                    "it answered an embedding for input {} of {}",
                    item.index,
                    inputs.len()
                ),
            )
        })?;
        *slot = Some(item.embedding);
    }
    let vectors = vectors
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            upstream_error(
                up,
                format!(
                    "it answered fewer embeddings than the {} inputs",
                    inputs.len()
                ),
            )
        })?;
    Ok((vectors, list.usage["prompt_tokens"].as_u64()))
}

fn passthrough(status: StatusCode, bytes: Bytes) -> Response {
    let mut r = (status, bytes).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn read_all(up: &Upstream, body: hyper::body::Incoming) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_RESPONSE_BYTES);
    match tokio::time::timeout(up.timeout, limited.collect()).await {
        Err(_) => Err(upstream_timeout(up)),
        Ok(Err(e)) => Err(upstream_error(up, format!("reading its answer: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// The tokens a usage object reports, with the prompt's cached part
/// (`prompt_tokens_details.cached_tokens`, as OpenAI, vLLM and SGLang
/// report it) when it is given.
fn usage_of(u: &Value) -> Option<TokenCounts> {
    Some(TokenCounts {
        prompt: u["prompt_tokens"].as_u64()?,
        cached: u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        completion: u["completion_tokens"].as_u64().unwrap_or(0),
    })
}

/// The text a (non-streamed) answer generated.
fn generated_text(json: &Value) -> String {
    let c = &json["choices"][0];
    c["message"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap_or("")
        .to_string()
}

/// The text of one streamed chunk.
fn chunk_text(json: &Value) -> &str {
    let c = &json["choices"][0];
    c["delta"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap_or("")
}

struct Relay {
    call: CallContext,
    up: Arc<Upstream>,
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    out: VecDeque<Bytes>,
    client_wants_usage: bool,
    prompt_text: String,
    prompt_bound: u64,
    usage: Option<TokenCounts>,
    text: String,
    chunks: u64,
    length: bool,
    first_token: Option<Duration>,
    ended: bool,
}

impl Relay {
    /// The tokens of the whole call: the upstream's report when it gave
    /// one, else counted.
    fn tokens(&self) -> TokenCounts {
        self.usage.unwrap_or_else(|| TokenCounts {
            prompt: self
                .up
                .count_tokens(&self.prompt_text)
                .unwrap_or(self.prompt_bound),
            cached: 0,
            completion: self.completion_estimate(),
        })
    }

    /// The tokens of a stream that stopped early: those the client
    /// received, and the prompt once a first token showed it was processed.
    fn spent(&self) -> TokenCounts {
        if self.usage.is_none() && self.chunks == 0 {
            return TokenCounts::default();
        }
        self.tokens()
    }

    fn completion_estimate(&self) -> u64 {
        self.up.count_tokens(&self.text).unwrap_or(self.chunks)
    }

    /// The stream broke off with `e`: the call is recorded as failed,
    /// charged for what the client had received, and the client told.
    fn broke(&mut self, e: ApiError) {
        self.call.ended_early(
            Outcome::Error(e.code.as_str().into()),
            self.spent(),
            self.first_token,
        );
        self.error_event(&e);
        self.ended = true;
    }

    fn error_event(&mut self, e: &ApiError) {
        let body = ErrorBody::new(e.code, e.message.clone(), e.param);
        let data = serde_json::to_string(&body).unwrap_or_default();
        self.out.push_back(Bytes::from(format!("data: {data}\n\n")));
        self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
    }

    /// Handles one complete SSE event (without its blank line).
    async fn event(&mut self, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw);
        let data: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim_start)
            .collect::<Vec<_>>()
            .join("\n");
        if data.is_empty() {
            return;
        }
        if data == "[DONE]" {
            let tokens = self.tokens();
            // The end goes out only once the call is in the ledger.
            match self
                .call
                .settle_tokens(
                    tokens,
                    if self.length {
                        Outcome::Length
                    } else {
                        Outcome::Stop
                    },
                    self.first_token,
                )
                .await
            {
                Ok(()) => self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n")),
                Err(e) => self.error_event(&e),
            }
            self.ended = true;
            return;
        }
        let Ok(json) = serde_json::from_str::<Value>(&data) else {
            self.forward(raw);
            return;
        };
        if let Some(u) = usage_of(&json["usage"]) {
            self.usage = Some(u);
            let only_usage = json["choices"].as_array().is_none_or(Vec::is_empty);
            if only_usage && !self.client_wants_usage {
                return;
            }
        }
        let piece = chunk_text(&json);
        if !piece.is_empty() {
            if self.first_token.is_none() {
                self.first_token = Some(self.call.received.elapsed());
            }
            self.chunks += 1;
            self.text.push_str(piece);
        }
        if json["choices"][0]["finish_reason"].as_str() == Some("length") {
            self.length = true;
        }
        self.forward(raw);
    }

    fn forward(&mut self, raw: &[u8]) {
        let mut b = raw.to_vec();
        b.extend_from_slice(b"\n\n");
        self.out.push_back(Bytes::from(b));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if !self.ended {
            self.call
                .ended_early(Outcome::Cancelled, self.spent(), self.first_token);
        }
    }
}

/// Position just past the first blank line (`\n\n` or `\r\n\r\n`) in `buf`.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn stream_response(
    call: CallContext,
    up: Arc<Upstream>,
    body: hyper::body::Incoming,
    client_wants_usage: bool,
    prompt_text: String,
    prompt_bound: u64,
) -> Response {
    let relay = Relay {
        call,
        up,
        body,
        buf: Vec::new(),
        out: VecDeque::new(),
        client_wants_usage,
        prompt_text,
        prompt_bound,
        usage: None,
        text: String::new(),
        chunks: 0,
        length: false,
        first_token: None,
        ended: false,
    };
    let events = futures::stream::unfold(relay, |mut r| async move {
        loop {
            if let Some(b) = r.out.pop_front() {
                return Some((Ok::<Bytes, std::io::Error>(b), r));
            }
            if r.ended {
                return None;
            }
            if let Some((end, next)) = event_end(&r.buf) {
                let raw: Vec<u8> = r.buf[..end].to_vec();
                r.buf.drain(..next);
                r.event(&raw).await;
                continue;
            }
            match tokio::time::timeout(r.up.timeout, r.body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        r.buf.extend_from_slice(&data);
                    }
                }
                // Ended without [DONE]: the upstream broke off.
                Ok(None) => r.broke(upstream_error(&r.up, "its stream ended early".into())),
                Ok(Some(Err(err))) => {
                    r.broke(upstream_error(&r.up, format!("its stream broke: {err}")))
                }
                Err(_) => r.broke(upstream_timeout(&r.up)),
            }
        }
    });
    let mut response = Response::new(Body::from_stream(events.boxed()));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response.extensions_mut().insert(crate::api::Streamed);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> UpstreamConfig {
        UpstreamConfig {
            name: "up".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            models: vec!["m".into()],
            api_key_env: None,
            timeout_seconds: None,
            default_max_tokens: Some(100),
            tokenizer: None,
            max_input_tokens: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }

    #[test]
    fn configs_are_checked() {
        assert!(cfg().validate().is_ok());
        let mut c = cfg();
        c.base_url = "https://x/v1".into();
        assert!(c.validate().is_ok());
        c.client_cert_file = Some("kiln.pem".into());
        assert!(c.validate().is_err(), "a certificate without its key");
        c.client_key_file = Some("kiln.key".into());
        assert!(c.validate().is_ok());
        let mut c = cfg();
        c.ca_file = Some("ca.pem".into());
        assert!(c.validate().is_err(), "a CA file for plain http");
        let mut c = cfg();
        c.base_url = "ftp://x/v1".into();
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.models.clear();
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.timeout_seconds = Some(0);
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.max_input_tokens = Some(4);
        assert!(c.validate().is_err());
    }

    #[test]
    fn without_a_tokenizer_embedding_inputs_are_sized_by_bytes() -> anyhow::Result<()> {
        let up = Upstream::new(&cfg(), None)?;
        assert_eq!(up.max_input_tokens, DEFAULT_MAX_INPUT_TOKENS);
        assert_eq!(up.max_chunk_tokens(), DEFAULT_MAX_INPUT_TOKENS - 2);
        assert_eq!(
            up.chunk_tokens("héllo 世界"),
            13,
            "bytes, a bound no tokenizer exceeds"
        );
        let inputs = ["ab".to_string(), "世".to_string()];
        assert_eq!(
            up.embedding_bound(&inputs),
            2 + 3 + 2 * PROMPT_MARGIN_TOKENS
        );
        let mut c = cfg();
        c.max_input_tokens = Some(8192);
        assert_eq!(Upstream::new(&c, None)?.max_chunk_tokens(), 8190);
        Ok(())
    }

    #[test]
    fn requests_get_a_bounded_max_tokens_and_ask_for_usage() -> anyhow::Result<()> {
        let up = Upstream::new(&cfg(), None)?;
        let mut body = json!({"model": "m", "messages": [], "stream": true});
        assert_eq!(prepare(Endpoint::Chat, &mut body, &up).ok(), Some(100));
        assert_eq!(body["max_tokens"], 100);
        assert_eq!(body["stream_options"]["include_usage"], true);
        let mut body = json!({"model": "m", "max_completion_tokens": 7});
        assert_eq!(prepare(Endpoint::Chat, &mut body, &up).ok(), Some(7));
        let mut bad = json!({"model": "m", "max_tokens": -3});
        assert!(prepare(Endpoint::Completions, &mut bad, &up).is_err());
        let mut emb = json!({"model": "m", "input": "x"});
        assert_eq!(prepare(Endpoint::Embeddings, &mut emb, &up).ok(), Some(0));
        Ok(())
    }

    #[test]
    fn sse_events_split_on_blank_lines() {
        assert_eq!(event_end(b"data: x\n\ndata: y"), Some((7, 9)));
        assert_eq!(event_end(b"data: x\r\n\r\n"), Some((7, 11)));
        assert_eq!(event_end(b"data: x\n"), None);
    }

    #[test]
    fn prompt_text_covers_what_is_tokenized() {
        let chat = json!({"messages": [{"role": "user", "content": "hello"}]});
        assert_eq!(prompt_text(Endpoint::Chat, &chat), "userhello");
        let tokens = json!({"prompt": [1, 2, 3]});
        assert_eq!(prompt_text(Endpoint::Completions, &tokens), "[1,2,3]");
    }
}
