//! The `http_request` tool: operator configuration ([`HttpRequestConfig`]),
//! the per-hop policy checks, and the HTTP/1.1 exchange over a vetted
//! connection (hyper's client `conn` API, no connection pool).
//!
//! Invariants: no connection is opened before the hop's URL passed the
//! allowlist and every resolved address passed [`address::classify_ip`];
//! the connection goes to one of exactly those addresses; operator secret
//! values never reach `Debug`, logs, errors or output text.

pub mod address;
pub mod net;
mod url;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, LOCATION, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};

use self::address::{classify_ip, parse_host, Host, IpVerdict};
use self::net::{ConnectTarget, Connector, Resolver, TcpConnector, TokioResolver};
use self::url::{HttpUrl, UrlError};
use crate::tool::{parse_args, truncate_for_message, Tool, ToolError, ToolFuture, ToolOutput};

/// The header a durable run's POST carries its step's key in.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Most headers the model may set on one request.
const MAX_MODEL_HEADERS: usize = 32;
/// Most addresses taken from one resolution.
const MAX_RESOLVED_ADDRESSES: usize = 16;
/// Cap on the response head hyper buffers (status line + headers).
const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;

/// Headers the model may not set: connection management, framing, and the
/// `Host` header (always derived from the vetted URL).
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "expect",
];

/// A problem in the operator's configuration, found at start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid allowed host pattern `{pattern}`: {reason}")]
    HostPattern { pattern: String, reason: String },
    #[error("invalid secret header name `{0}`")]
    SecretHeaderName(String),
    #[error("the secret header `{0}` has an empty or invalid value (the value is not shown)")]
    SecretHeaderValue(String),
    #[error("max_response_bytes must be at least 1")]
    ZeroResponseLimit,
}

/// One allowlist entry: an exact host (`api.example.com`, `93.184.216.34`,
/// `[2001:db8::1]`) or `*.suffix`, which matches names under `suffix` at any
/// depth but not `suffix` itself. Wildcards never match IP addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(Host),
    Subdomains(String),
}

impl HostPattern {
    pub fn parse(pattern: &str) -> Result<HostPattern, ConfigError> {
        let err = |reason: &str| ConfigError::HostPattern {
            pattern: pattern.to_owned(),
            reason: reason.to_owned(),
        };
        let p = pattern.trim();
        if let Some(suffix) = p.strip_prefix("*.") {
            return match parse_host(suffix) {
                Ok(Host::Name(name)) if !name.contains('*') => Ok(HostPattern::Subdomains(name)),
                Ok(Host::Name(_)) => Err(err("only one leading `*.` is allowed")),
                Ok(Host::Ip(_)) => Err(err("a wildcard cannot cover IP addresses")),
                Err(reason) => Err(err(&reason)),
            };
        }
        if p.contains('*') {
            return Err(err("`*` is only allowed as a leading `*.`"));
        }
        // Bare IPv6 is accepted in configuration for convenience.
        if let Ok(ip) = p.parse::<std::net::Ipv6Addr>() {
            return Ok(HostPattern::Exact(Host::Ip(IpAddr::V6(ip))));
        }
        parse_host(p).map(HostPattern::Exact).map_err(|r| err(&r))
    }

    pub fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (HostPattern::Exact(want), got) => want == got,
            (HostPattern::Subdomains(suffix), Host::Name(name)) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            (HostPattern::Subdomains(_), Host::Ip(_)) => false,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => write!(f, "{h}"),
            HostPattern::Subdomains(s) => write!(f, "*.{s}"),
        }
    }
}

/// A secret string whose `Debug` is `[REDACTED]` and which has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// A header the operator attaches to requests whose host matches `host`
/// (for example an `Authorization` token). The model never sees its value.
#[derive(Debug, Clone)]
pub struct SecretHeader {
    pub host: HostPattern,
    pub name: HeaderName,
    value: SecretValue,
}

impl SecretHeader {
    pub fn new(
        host_pattern: &str,
        name: &str,
        value: impl Into<String>,
    ) -> Result<SecretHeader, ConfigError> {
        let host = HostPattern::parse(host_pattern)?;
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::SecretHeaderName(truncate_for_message(name, 64)))?;
        let value = SecretValue::new(value);
        if value.expose().is_empty() || HeaderValue::from_str(value.expose()).is_err() {
            return Err(ConfigError::SecretHeaderValue(name.to_string()));
        }
        Ok(SecretHeader { host, name, value })
    }

    fn header_value(&self) -> Option<HeaderValue> {
        let mut v = HeaderValue::from_str(self.value.expose()).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

/// Operator configuration of `http_request`. The default allows no host.
#[derive(Debug, Clone)]
pub struct HttpRequestConfig {
    /// Hosts the model may reach; empty means none.
    pub allowed_hosts: Vec<HostPattern>,
    /// Allow loopback, private, link-local and other special-purpose
    /// addresses (never unspecified, multicast or broadcast).
    pub allow_private: bool,
    /// Response body bytes returned; the rest is cut off and flagged.
    pub max_response_bytes: usize,
    /// Longest request body the model may send.
    pub max_request_body_bytes: usize,
    /// Deadline for the whole call, redirects and body included.
    pub timeout: Duration,
    /// Redirects followed before giving up.
    pub max_redirects: u32,
    /// Headers attached per host, values hidden from the model.
    pub secret_headers: Vec<SecretHeader>,
    pub user_agent: String,
}

impl Default for HttpRequestConfig {
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            allow_private: false,
            max_response_bytes: 64 * 1024,
            max_request_body_bytes: 64 * 1024,
            timeout: Duration::from_secs(10),
            max_redirects: 3,
            secret_headers: Vec::new(),
            user_agent: concat!("kiln-agents/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

impl HttpRequestConfig {
    /// Default settings with the given allowlist.
    pub fn with_allowed_hosts<'a>(
        patterns: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, ConfigError> {
        let allowed_hosts = patterns
            .into_iter()
            .map(HostPattern::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            allowed_hosts,
            ..Self::default()
        })
    }

    /// Checks values that would make the tool unusable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_response_bytes == 0 {
            return Err(ConfigError::ZeroResponseLimit);
        }
        Ok(())
    }

    fn is_allowed(&self, host: &Host) -> bool {
        self.allowed_hosts.iter().any(|p| p.matches(host))
    }

    fn allowlist_summary(&self) -> String {
        if self.allowed_hosts.is_empty() {
            return "none".to_owned();
        }
        let shown: Vec<String> = self
            .allowed_hosts
            .iter()
            .take(20)
            .map(ToString::to_string)
            .collect();
        let more = self.allowed_hosts.len().saturating_sub(shown.len());
        if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    }

    /// Replaces every secret value in `text` with `[REDACTED]`.
    fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secret_headers {
            let v = s.value.expose();
            if !v.is_empty() && out.contains(v) {
                out = out.replace(v, "[REDACTED]");
            }
        }
        out
    }
}

/// The `http_request` tool.
#[derive(Clone)]
pub struct HttpRequest {
    config: Arc<HttpRequestConfig>,
    resolver: Arc<dyn Resolver>,
    connector: Arc<dyn Connector>,
}

impl fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRequest")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpArgs {
    url: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
}

/// The model's request after validation.
struct PreparedRequest {
    url: HttpUrl,
    method: Method,
    body: Option<Bytes>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Aborts the spawned connection driver when dropped.
struct ConnectionTask(tokio::task::JoinHandle<()>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl HttpRequest {
    /// Uses the system resolver and plain TCP.
    pub fn new(config: HttpRequestConfig) -> Result<Self, ConfigError> {
        Self::with_network(config, Arc::new(TokioResolver), Arc::new(TcpConnector))
    }

    /// Uses the given resolver and connector (tests use in-memory fakes).
    pub fn with_network(
        config: HttpRequestConfig,
        resolver: Arc<dyn Resolver>,
        connector: Arc<dyn Connector>,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config: Arc::new(config),
            resolver,
            connector,
        })
    }

    pub fn config(&self) -> &HttpRequestConfig {
        &self.config
    }

    fn prepare(&self, args: HttpArgs) -> Result<PreparedRequest, ToolError> {
        let url = parse_url(&args.url)?;
        let method = match args
            .method
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            None | Some("GET") => Method::GET,
            Some("POST") => Method::POST,
            Some(other) => {
                return Err(ToolError::InvalidArguments(format!(
                    "method `{}` is not allowed; use GET or POST",
                    truncate_for_message(other, 16)
                )))
            }
        };
        let body = match args.body {
            None => None,
            Some(_) if method == Method::GET => {
                return Err(ToolError::InvalidArguments(
                    "a body can only be sent with method POST".to_owned(),
                ))
            }
            Some(b) if b.len() > self.config.max_request_body_bytes => {
                return Err(ToolError::InvalidArguments(format!(
                    "the body is too long ({} bytes; the limit is {})",
                    b.len(),
                    self.config.max_request_body_bytes
                )))
            }
            Some(b) => Some(Bytes::from(b)),
        };
        let model_headers = args.headers.unwrap_or_default();
        if model_headers.len() > MAX_MODEL_HEADERS {
            return Err(ToolError::InvalidArguments(format!(
                "too many headers ({}; the limit is {MAX_MODEL_HEADERS})",
                model_headers.len()
            )));
        }
        let mut headers = Vec::with_capacity(model_headers.len());
        for (name, value) in model_headers {
            let shown = truncate_for_message(&name, 64);
            let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ToolError::InvalidArguments(format!("`{shown}` is not a valid header name"))
            })?;
            if FORBIDDEN_HEADERS.contains(&header_name.as_str()) {
                return Err(ToolError::InvalidArguments(format!(
                    "the header `{shown}` cannot be set; the tool manages connection, framing and Host headers itself"
                )));
            }
            let header_value = HeaderValue::from_str(&value).map_err(|_| {
                ToolError::InvalidArguments(format!(
                    "the value of header `{shown}` has characters that are not allowed"
                ))
            })?;
            headers.push((header_name, header_value));
        }
        Ok(PreparedRequest {
            url,
            method,
            body,
            headers,
        })
    }

    /// The allowlist and address policy for one hop; returns the vetted
    /// addresses to connect to.
    async fn vet(&self, url: &HttpUrl) -> Result<Vec<SocketAddr>, ToolError> {
        if !self.config.is_allowed(&url.host) {
            return Err(ToolError::Refused(format!(
                "the host `{}` is not on the allowlist; allowed hosts: {}",
                url.host,
                self.config.allowlist_summary()
            )));
        }
        let ips: Vec<IpAddr> = match &url.host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => {
                let mut ips = self.resolver.resolve(name).await.map_err(|e| {
                    ToolError::RequestFailed(format!("could not resolve `{name}`: {e}"))
                })?;
                ips.truncate(MAX_RESOLVED_ADDRESSES);
                ips
            }
        };
        if ips.is_empty() {
            return Err(ToolError::RequestFailed(format!(
                "`{}` has no addresses",
                url.host
            )));
        }
        let mut vetted = Vec::with_capacity(ips.len());
        for ip in ips {
            let refusal = match classify_ip(ip) {
                IpVerdict::Public => None,
                IpVerdict::Private(_) if self.config.allow_private => None,
                IpVerdict::Private(kind) | IpVerdict::Forbidden(kind) => Some(kind),
            };
            if let Some(kind) = refusal {
                let subject = match &url.host {
                    Host::Ip(_) => format!("`{}` is", url.host),
                    Host::Name(_) => format!("`{}` resolves to {ip}, which is", url.host),
                };
                return Err(ToolError::Refused(format!(
                    "{subject} a {kind} address; only public internet addresses may be fetched"
                )));
            }
            vetted.push(SocketAddr::new(ip.to_canonical(), url.port));
        }
        Ok(vetted)
    }

    /// Connects to the first vetted address that accepts.
    async fn connect(
        &self,
        url: &HttpUrl,
        addrs: &[SocketAddr],
    ) -> Result<net::BoxedStream, ToolError> {
        let mut last_error = None;
        for addr in addrs {
            let target = ConnectTarget {
                addr: *addr,
                host: url.host.to_string(),
            };
            match self.connector.connect(&target).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = Some(e),
            }
        }
        Err(ToolError::RequestFailed(format!(
            "could not connect to `{}`: {}",
            url.authority(),
            last_error.map_or_else(|| "no address".to_owned(), |e| e.to_string())
        )))
    }

    async fn fetch(&self, request: PreparedRequest) -> Result<ToolOutput, ToolError> {
        let PreparedRequest {
            mut url,
            mut method,
            mut body,
            headers,
        } = request;
        let mut redirects = 0u32;
        loop {
            let addrs = self.vet(&url).await?;
            let stream = self.connect(&url, &addrs).await?;
            let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
                .max_buf_size(MAX_RESPONSE_HEAD_BYTES)
                .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| ToolError::RequestFailed(format!("HTTP handshake failed: {e}")))?;
            let _task = ConnectionTask(tokio::spawn(async move {
                // Errors surface through `send_request` / the body stream.
                let _ = connection.await;
            }));

            let mut builder = Request::builder()
                .method(method.clone())
                .uri(url.path_and_query.as_str())
                .header(HOST, url.authority())
                .header(USER_AGENT, self.config.user_agent.as_str());
            if let Some(h) = builder.headers_mut() {
                for (name, value) in &headers {
                    h.insert(name.clone(), value.clone());
                }
                for secret in &self.config.secret_headers {
                    if secret.host.matches(&url.host) {
                        if let Some(v) = secret.header_value() {
                            h.insert(secret.name.clone(), v);
                        }
                    }
                }
            }
            let req = builder
                .body(Full::new(body.clone().unwrap_or_default()))
                .map_err(|_| {
                    ToolError::InvalidArguments(
                        "the URL path cannot be sent as an HTTP request target".to_owned(),
                    )
                })?;
            let response = sender
                .send_request(req)
                .await
                .map_err(|e| ToolError::RequestFailed(format!("HTTP exchange failed: {e}")))?;
            let status = response.status();
            tracing::debug!(host = %url.host, %method, status = status.as_u16(), "http_request hop");

            let location = response
                .headers()
                .get(LOCATION)
                .map(|v| v.to_str().map(str::to_owned));
            let is_redirect = matches!(
                status,
                StatusCode::MOVED_PERMANENTLY
                    | StatusCode::FOUND
                    | StatusCode::SEE_OTHER
                    | StatusCode::TEMPORARY_REDIRECT
                    | StatusCode::PERMANENT_REDIRECT
            );
            if let (true, Some(location)) = (is_redirect, location) {
                if redirects >= self.config.max_redirects {
                    return Err(ToolError::RequestFailed(format!(
                        "too many redirects (the limit is {})",
                        self.config.max_redirects
                    )));
                }
                let location = location.map_err(|_| {
                    ToolError::RequestFailed(
                        "the server redirected with an unreadable Location header".to_owned(),
                    )
                })?;
                let next = url.join(&location).map_err(|e| match e {
                    UrlError::Invalid(m) => {
                        ToolError::RequestFailed(format!("the server redirected to a bad URL: {m}"))
                    }
                    UrlError::Unsupported(m) => ToolError::Refused(format!(
                        "the server redirected to a URL that is refused: {m}"
                    )),
                })?;
                if status == StatusCode::SEE_OTHER
                    || (method == Method::POST
                        && matches!(status, StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND))
                {
                    method = Method::GET;
                    body = None;
                }
                redirects += 1;
                url = next;
                continue;
            }

            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let (bytes, truncated) =
                read_limited(response.into_body(), self.config.max_response_bytes).await?;
            let (text, lossy) = decode_body(bytes, truncated);

            let mut out = format!(
                "HTTP {} {}\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
            out.push_str(&format!("url: {url}"));
            if redirects > 0 {
                let s = if redirects == 1 { "" } else { "s" };
                out.push_str(&format!(" (after {redirects} redirect{s})"));
            }
            out.push('\n');
            if let Some(ct) = content_type {
                out.push_str(&format!(
                    "content-type: {}\n",
                    truncate_for_message(&ct, 200)
                ));
            }
            if truncated {
                out.push_str(&format!(
                    "note: the body was cut off at {} bytes\n",
                    self.config.max_response_bytes
                ));
            }
            if lossy {
                out.push_str(
                    "note: the body is not valid UTF-8; invalid bytes were replaced with U+FFFD\n",
                );
            }
            out.push('\n');
            out.push_str(&text);
            return Ok(ToolOutput {
                text: self.config.redact(&out),
                truncated,
            });
        }
    }
}

fn parse_url(raw: &str) -> Result<HttpUrl, ToolError> {
    HttpUrl::parse(raw).map_err(|e| match e {
        UrlError::Invalid(m) => ToolError::InvalidArguments(format!("bad url: {m}")),
        UrlError::Unsupported(m) => ToolError::Refused(m),
    })
}

/// Reads at most `limit` bytes of `body`; true when more was available.
async fn read_limited(
    mut body: hyper::body::Incoming,
    limit: usize,
) -> Result<(Vec<u8>, bool), ToolError> {
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ToolError::RequestFailed(format!("reading the response body failed: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let room = limit - buf.len();
        if data.len() > room {
            buf.extend_from_slice(&data[..room]);
            return Ok((buf, true));
        }
        buf.extend_from_slice(&data);
    }
    Ok((buf, false))
}

/// UTF-8 decoding; a sequence cut by truncation is dropped rather than
/// reported as invalid. Returns the text and whether bytes were replaced.
fn decode_body(mut bytes: Vec<u8>, truncated: bool) -> (String, bool) {
    if truncated {
        if let Err(e) = std::str::from_utf8(&bytes) {
            if e.error_len().is_none() {
                bytes.truncate(e.valid_up_to());
            }
        }
    }
    match String::from_utf8(bytes) {
        Ok(s) => (s, false),
        Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), true),
    }
}

impl Tool for HttpRequest {
    fn name(&self) -> &str {
        "http_request"
    }

    fn description(&self) -> &str {
        "Fetches an http:// URL with GET or POST and returns the status, content type and body \
         (cut off at a size limit). Only hosts on the operator's allowlist can be reached."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "url": {"type": "string", "description": "Absolute http:// URL."},
                "method": {"type": "string", "enum": ["GET", "POST"], "description": "Defaults to GET."},
                "body": {"type": "string", "description": "Request body; POST only."},
                "headers": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "description": "Extra request headers, for example Content-Type or Accept.",
                },
            },
            "required": ["url"],
            "additionalProperties": false,
        })
    }

    fn call<'a>(&'a self, args: &'a Value) -> ToolFuture<'a> {
        Box::pin(self.call_with(args, None))
    }

    /// A POST carries the step's key as `Idempotency-Key` (replacing one the
    /// model set), so a server that honours it applies a retried step once.
    fn call_keyed<'a>(&'a self, args: &'a Value, key: &'a str) -> ToolFuture<'a> {
        Box::pin(self.call_with(args, Some(key)))
    }
}

impl HttpRequest {
    async fn call_with(&self, args: &Value, key: Option<&str>) -> Result<ToolOutput, ToolError> {
        let args: HttpArgs = parse_args(args)?;
        let mut request = self.prepare(args)?;
        if let (Some(key), true) = (key, request.method == Method::POST) {
            request
                .headers
                .retain(|(name, _)| name.as_str() != IDEMPOTENCY_KEY);
            if let Ok(value) = HeaderValue::from_str(key) {
                request
                    .headers
                    .push((HeaderName::from_static(IDEMPOTENCY_KEY), value));
            }
        }
        let timeout = self.config.timeout;
        let result = match tokio::time::timeout(timeout, self.fetch(request)).await {
            Ok(result) => result,
            Err(_) => Err(ToolError::Timeout(timeout)),
        };
        // Defence in depth: no error text may carry a secret value.
        result.map_err(|e| match e {
            ToolError::RequestFailed(m) => ToolError::RequestFailed(self.config.redact(&m)),
            ToolError::Refused(m) => ToolError::Refused(self.config.redact(&m)),
            ToolError::InvalidArguments(m) => ToolError::InvalidArguments(self.config.redact(&m)),
            other => other,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_patterns() {
        let p = HostPattern::parse("*.example.com").unwrap();
        let name = |s: &str| Host::Name(s.to_owned());
        assert!(p.matches(&name("a.example.com")));
        assert!(p.matches(&name("a.b.example.com")));
        assert!(!p.matches(&name("example.com")));
        assert!(!p.matches(&name("badexample.com")));
        assert!(!p.matches(&name("example.com.evil.net")));
        assert!(!p.matches(&name(".example.com")));
        let exact = HostPattern::parse("API.example.com.").unwrap();
        assert!(exact.matches(&name("api.example.com")));
        assert!(!exact.matches(&name("x.api.example.com")));
        let ip = HostPattern::parse("2130706433").unwrap();
        assert!(ip.matches(&Host::Ip("127.0.0.1".parse().unwrap())));
        let v6 = HostPattern::parse("::1").unwrap();
        assert!(v6.matches(&Host::Ip("::1".parse().unwrap())));
        for bad in [
            "*",
            "*.",
            "a.*.com",
            "*.*.com",
            "*.127.0.0.1",
            "exa mple.com",
            "",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_values_are_redacted_in_debug() {
        let secret =
            SecretHeader::new("api.example.com", "Authorization", "Bearer hunter2").unwrap();
        let mut config = HttpRequestConfig::with_allowed_hosts(["api.example.com"]).unwrap();
        config.secret_headers.push(secret.clone());
        let tool = HttpRequest::new(config.clone()).unwrap();
        for debug in [
            format!("{secret:?}"),
            format!("{config:?}"),
            format!("{tool:?}"),
            format!("{:#?}", tool),
        ] {
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("[REDACTED]"), "{debug}");
        }
        assert_eq!(config.redact("echo: Bearer hunter2!"), "echo: [REDACTED]!");
        // A bad value is reported without being shown.
        let err =
            SecretHeader::new("api.example.com", "Authorization", "bad\nhunter2").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn decode_handles_cut_and_bad_utf8() {
        let cut = "é".as_bytes()[..1].to_vec();
        assert_eq!(
            decode_body([b"ab".as_slice(), &cut].concat(), true),
            ("ab".to_owned(), false)
        );
        assert_eq!(
            decode_body(vec![b'a', 0xff, b'b'], false),
            ("a\u{fffd}b".to_owned(), true)
        );
    }
}
