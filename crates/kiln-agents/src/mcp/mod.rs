//! A Model Context Protocol (MCP) client: the tools of operator-configured
//! MCP servers become [`Tool`]s an agent can call.
//!
//! [`McpClient::connect`] starts (stdio) or reaches (streamable HTTP) one
//! server, runs the handshake (`initialize`, `notifications/initialized`,
//! `tools/list`) and keeps the tool list. [`McpClient::tools`] hands out one
//! [`McpTool`] per remote tool, named `<server>__<tool>`; calling it sends
//! `tools/call`.
//!
//! Invariants:
//! - nothing a server sends can panic this module: every message is parsed
//!   as untyped JSON and checked field by field, messages are capped at
//!   [`MAX_MESSAGE_BYTES`], and every request runs under the server's timeout;
//! - HTTP header values and stdio `env` values from the config are secrets:
//!   `Debug` redacts them, they are never logged, never put in an error, and
//!   scrubbed from tool output in case a server echoes them;
//! - a client is cheap to clone and safe to share; all clones and tools
//!   share one connection, and the stdio child is killed when the last one
//!   is dropped. When the connection breaks (the stdio server exits, the
//!   HTTP server stops answering), the next call connects again, with
//!   backoff; a call under way when it broke is not sent twice.

mod config;
mod http;
mod stdio;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

pub use config::{McpServerConfig, McpTransportConfig, DEFAULT_TIMEOUT_SECONDS};

use crate::agent::MAX_TOOL_TEXT;
use crate::tool::{truncate_for_message, Tool, ToolError, ToolFuture, ToolOutput};

/// Protocol versions this client speaks, newest first; the first is the one
/// it asks for in `initialize`.
pub const MCP_PROTOCOL_VERSIONS: &[&str] = &["2025-06-18", "2025-03-26", "2024-11-05"];
/// Cap on one JSON-RPC message, either way.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Most tools kept from one server; the rest are dropped with a warning.
pub const MAX_TOOLS_PER_SERVER: usize = 256;
/// Most pages of `tools/list` followed (guards against a cursor loop).
const MAX_LIST_PAGES: usize = 64;
/// Longest `<server>__<tool>` name (OpenAI's limit on function names).
const MAX_TOOL_NAME: usize = 64;
/// Longest tool description kept, in characters.
const MAX_DESCRIPTION_CHARS: usize = 4096;

/// Why connecting to, or talking to, an MCP server failed. The text names
/// the server and never carries a header or env value.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum McpError {
    /// The configuration is not valid.
    #[error("invalid MCP server config: {0}")]
    InvalidConfig(String),
    /// The stdio server's command could not be started.
    #[error("could not start MCP server `{server}`: {message}")]
    Spawn { server: String, message: String },
    /// The server could not be reached, or the connection broke.
    #[error("MCP server `{server}`: {message}")]
    Transport { server: String, message: String },
    /// The server sent something that is not valid MCP / JSON-RPC.
    #[error("MCP server `{server}` broke the protocol: {message}")]
    Protocol { server: String, message: String },
    /// The server only speaks protocol versions this client does not.
    #[error(
        "MCP server `{server}` answered with protocol version `{version}`; \
         this client supports {}", MCP_PROTOCOL_VERSIONS.join(", ")
    )]
    UnsupportedVersion { server: String, version: String },
    /// The server answered with a JSON-RPC error.
    #[error("MCP server `{server}` returned error {code}: {message}")]
    Rpc {
        server: String,
        code: i64,
        message: String,
    },
    /// The server did not answer in time.
    #[error("MCP server `{server}` did not answer `{method}` within {}ms", timeout.as_millis())]
    Timeout {
        server: String,
        method: String,
        timeout: Duration,
    },
    /// The stdio server has exited (or closed its output).
    #[error("MCP server `{server}` is no longer running ({reason}); reconnect to use it again")]
    Closed { server: String, reason: String },
}

impl McpError {
    /// A stable machine-readable code for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            McpError::InvalidConfig(_) => "invalid_config",
            McpError::Spawn { .. } => "spawn_failed",
            McpError::Transport { .. } => "transport",
            McpError::Protocol { .. } => "protocol",
            McpError::UnsupportedVersion { .. } => "unsupported_version",
            McpError::Rpc { .. } => "rpc_error",
            McpError::Timeout { .. } => "timeout",
            McpError::Closed { .. } => "closed",
        }
    }
}

/// What a transport reports for one request, before the server's name is
/// attached.
#[derive(Debug)]
pub(crate) enum RpcFailure {
    Transport(String),
    Protocol(String),
    Rpc { code: i64, message: String },
    Closed(String),
}

enum Transport {
    Stdio(stdio::StdioTransport),
    Http(http::HttpTransport),
}

struct Inner {
    name: String,
    timeout: Duration,
    transport: Transport,
    next_id: AtomicU64,
    protocol_version: String,
    tools: Vec<RemoteTool>,
    /// Config secrets scrubbed from tool output.
    secrets: Vec<String>,
}

#[derive(Debug, Clone)]
struct RemoteTool {
    remote_name: String,
    full_name: String,
    description: String,
    parameters: Value,
}

/// A connection to one MCP server. Clones share the connection.
///
/// When the server goes away (a stdio server exits, an HTTP server stops
/// answering or forgets the session), the next tool call connects again:
/// a new child or session, the handshake, then the call. A call that was
/// under way when the connection broke is not sent again, since its effect
/// may have happened; it fails with the reason. Reconnecting waits 1, 2, 4
/// ... up to 30 s between failed tries, failing calls at once meanwhile.
#[derive(Clone)]
pub struct McpClient {
    /// The first session: the server's name, protocol and tools as listed
    /// at connect.
    inner: Arc<Inner>,
    /// How to connect again, and the session calls go to now.
    live: Arc<Live>,
    /// Timeout of each tool call made through this handle.
    call_timeout: Duration,
}

struct Live {
    config: McpServerConfig,
    state: tokio::sync::Mutex<LiveState>,
}

struct LiveState {
    session: Arc<Inner>,
    /// The connection broke: connect again before the next call.
    broken: bool,
    /// After a failed reconnect: no new try before this, and why.
    retry_at: Option<(std::time::Instant, String)>,
    backoff: Duration,
}

/// Longest wait between two tries to reconnect.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);

impl std::fmt::Debug for McpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpClient")
            .field("name", &self.inner.name)
            .field("protocol_version", &self.inner.protocol_version)
            .field("tools", &self.tool_names())
            .finish()
    }
}

impl McpClient {
    /// Starts or reaches the server, runs the handshake and lists its tools.
    pub async fn connect(config: &McpServerConfig) -> Result<McpClient, McpError> {
        let inner = Arc::new(Inner::connect(config).await?);
        Ok(McpClient {
            call_timeout: inner.timeout,
            live: Arc::new(Live {
                config: config.clone(),
                state: tokio::sync::Mutex::new(LiveState {
                    session: inner.clone(),
                    broken: false,
                    retry_at: None,
                    backoff: Duration::from_secs(1),
                }),
            }),
            inner,
        })
    }
}

impl Inner {
    /// Starts or reaches the server, runs the handshake and lists its tools.
    async fn connect(config: &McpServerConfig) -> Result<Inner, McpError> {
        config.validate()?;
        let name = config.name.clone();
        let timeout = config.timeout();
        let (transport, secrets) = match &config.transport {
            McpTransportConfig::Stdio { command, args, env } => (
                Transport::Stdio(stdio::StdioTransport::spawn(&name, command, args, env)?),
                env.values().cloned().collect::<Vec<_>>(),
            ),
            McpTransportConfig::Http { url, headers } => (
                Transport::Http(http::HttpTransport::new(&name, url, headers)?),
                headers.values().cloned().collect(),
            ),
        };
        let mut inner = Inner {
            name,
            timeout,
            transport,
            next_id: AtomicU64::new(1),
            protocol_version: String::new(),
            tools: Vec::new(),
            secrets: secrets.into_iter().filter(|s| s.len() >= 4).collect(),
        };
        inner.protocol_version = inner.initialize().await?;
        inner.tools = inner.list_tools().await?;
        tracing::info!(
            server = %inner.name,
            protocol_version = %inner.protocol_version,
            tools = inner.tools.len(),
            "MCP server connected"
        );
        Ok(inner)
    }
}

impl McpClient {
    /// A handle on the same connection whose tool calls (and the tools it
    /// hands out) time out after `timeout` instead of the configured one.
    pub fn with_timeout(&self, timeout: Duration) -> McpClient {
        McpClient {
            inner: self.inner.clone(),
            live: self.live.clone(),
            call_timeout: timeout,
        }
    }

    /// The timeout of each tool call made through this handle.
    pub fn timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The server's configured name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The protocol version agreed in `initialize`.
    pub fn protocol_version(&self) -> &str {
        &self.inner.protocol_version
    }

    /// The `<server>__<tool>` names of the tools kept from `tools/list`.
    pub fn tool_names(&self) -> Vec<&str> {
        self.inner
            .tools
            .iter()
            .map(|t| t.full_name.as_str())
            .collect()
    }

    /// One [`Tool`] per remote tool, sharing this client's connection.
    pub fn tools(&self) -> Vec<McpTool> {
        self.inner
            .tools
            .iter()
            .map(|t| McpTool {
                client: self.clone(),
                tool: t.clone(),
            })
            .collect()
    }

    /// Calls the server's tool `name` (its own name, without the
    /// `<server>__` prefix) with an arguments object.
    pub async fn call_tool(&self, name: &str, arguments: &Value) -> Result<ToolOutput, ToolError> {
        let session = self.session().await.map_err(ToolError::RequestFailed)?;
        let called = session.call_tool(name, arguments, self.call_timeout).await;
        if let Err(Some(broken)) = &called.as_ref().map_err(|(_, broken)| broken.clone()) {
            tracing::warn!(server = %self.inner.name, reason = %broken, "the MCP connection broke; the next call connects again");
            let mut live = self.live.state.lock().await;
            if Arc::ptr_eq(&live.session, &session) {
                live.broken = true;
            }
        }
        called.map_err(|(e, _)| e)
    }

    /// The session to call through, connecting again first when the last
    /// one broke.
    async fn session(&self) -> Result<Arc<Inner>, String> {
        let mut live = self.live.state.lock().await;
        let closed = match &live.session.transport {
            Transport::Stdio(t) => t.is_closed(),
            Transport::Http(_) => false,
        };
        if !live.broken && !closed {
            return Ok(live.session.clone());
        }
        if let Some((at, why)) = &live.retry_at {
            if std::time::Instant::now() < *at {
                return Err(format!(
                    "MCP server `{}` is unavailable ({why}); trying again shortly",
                    self.inner.name
                ));
            }
        }
        match Inner::connect(&self.live.config).await {
            Ok(session) => {
                tracing::info!(server = %self.inner.name, "reconnected to an MCP server");
                live.session = Arc::new(session);
                live.broken = false;
                live.retry_at = None;
                live.backoff = Duration::from_secs(1);
                Ok(live.session.clone())
            }
            Err(e) => {
                let why = e.to_string();
                live.broken = true;
                live.retry_at = Some((std::time::Instant::now() + live.backoff, why.clone()));
                live.backoff = (live.backoff * 2).min(MAX_RECONNECT_BACKOFF);
                Err(format!("reconnecting failed: {why}"))
            }
        }
    }
}

impl Inner {
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn request(&self, method: &str, params: Value) -> Result<Value, McpError> {
        self.request_within(method, params, self.timeout).await
    }

    async fn request_within(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, McpError> {
        let id = self.next_id();
        let message = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let bytes = encode(&message).map_err(|m| self.protocol(m))?;
        let sent = match &self.transport {
            Transport::Stdio(t) => tokio::time::timeout(timeout, t.request(id, bytes)).await,
            Transport::Http(t) => tokio::time::timeout(timeout, t.request(id, bytes)).await,
        };
        match sent {
            Err(_) => Err(McpError::Timeout {
                server: self.name.clone(),
                method: method.to_owned(),
                timeout,
            }),
            Ok(result) => result.map_err(|f| self.failure(f)),
        }
    }

    async fn notify(&self, method: &str) -> Result<(), McpError> {
        let message = json!({"jsonrpc": "2.0", "method": method});
        let bytes = encode(&message).map_err(|m| self.protocol(m))?;
        let sent = match &self.transport {
            Transport::Stdio(t) => tokio::time::timeout(self.timeout, t.notify(bytes)).await,
            Transport::Http(t) => tokio::time::timeout(self.timeout, t.notify(bytes)).await,
        };
        match sent {
            Err(_) => Err(McpError::Timeout {
                server: self.name.clone(),
                method: method.to_owned(),
                timeout: self.timeout,
            }),
            Ok(result) => result.map_err(|f| self.failure(f)),
        }
    }

    fn failure(&self, f: RpcFailure) -> McpError {
        let server = self.name.clone();
        match f {
            RpcFailure::Transport(message) => McpError::Transport { server, message },
            RpcFailure::Protocol(message) => McpError::Protocol { server, message },
            RpcFailure::Rpc { code, message } => McpError::Rpc {
                server,
                code,
                message: self.redact(&truncate_for_message(&message, 500)),
            },
            RpcFailure::Closed(reason) => McpError::Closed { server, reason },
        }
    }

    fn protocol(&self, message: String) -> McpError {
        McpError::Protocol {
            server: self.name.clone(),
            message,
        }
    }

    async fn initialize(&self) -> Result<String, McpError> {
        let result = self
            .request(
                "initialize",
                json!({
                    "protocolVersion": MCP_PROTOCOL_VERSIONS[0],
                    "capabilities": {},
                    "clientInfo": {"name": "kiln", "version": env!("CARGO_PKG_VERSION")},
                }),
            )
            .await?;
        let version = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                self.protocol("the initialize result has no protocolVersion".to_owned())
            })?;
        if !MCP_PROTOCOL_VERSIONS.contains(&version) {
            return Err(McpError::UnsupportedVersion {
                server: self.name.clone(),
                version: truncate_for_message(version, 40),
            });
        }
        if let Transport::Http(t) = &self.transport {
            t.set_protocol_version(version);
        }
        self.notify("notifications/initialized").await?;
        Ok(version.to_owned())
    }

    async fn list_tools(&self) -> Result<Vec<RemoteTool>, McpError> {
        let mut tools: Vec<RemoteTool> = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let page = self.request("tools/list", params).await?;
            let Some(items) = page.get("tools").and_then(Value::as_array) else {
                return Err(self.protocol("the tools/list result has no `tools` array".to_owned()));
            };
            for item in items {
                if tools.len() >= MAX_TOOLS_PER_SERVER {
                    tracing::warn!(
                        server = %self.name,
                        limit = MAX_TOOLS_PER_SERVER,
                        "MCP server lists more tools than the limit; the rest are dropped"
                    );
                    return Ok(tools);
                }
                if let Some(tool) = self.remote_tool(item) {
                    if tools.iter().any(|t| t.full_name == tool.full_name) {
                        tracing::warn!(server = %self.name, tool = %tool.remote_name, "MCP tool listed twice; the first is kept");
                        continue;
                    }
                    tools.push(tool);
                }
            }
            match page.get("nextCursor").and_then(Value::as_str) {
                Some(next) if !next.is_empty() => cursor = Some(next.to_owned()),
                _ => return Ok(tools),
            }
        }
        tracing::warn!(server = %self.name, pages = MAX_LIST_PAGES, "MCP tools/list still had pages after the limit; the rest are dropped");
        Ok(tools)
    }

    /// One `tools/list` entry as a tool, or `None` (with a warning) when its
    /// name cannot be used.
    fn remote_tool(&self, item: &Value) -> Option<RemoteTool> {
        let Some(remote_name) = item.get("name").and_then(Value::as_str) else {
            tracing::warn!(server = %self.name, "MCP tool without a name skipped");
            return None;
        };
        let full_name = format!("{}__{}", self.name, remote_name);
        let valid = !remote_name.is_empty()
            && remote_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid || full_name.len() > MAX_TOOL_NAME {
            tracing::warn!(
                server = %self.name,
                tool = %truncate_for_message(remote_name, 80),
                "MCP tool skipped: its name must be [A-Za-z0-9_-] and `<server>__<tool>` at most {MAX_TOOL_NAME} characters"
            );
            return None;
        }
        let description = item
            .get("description")
            .and_then(Value::as_str)
            .map(|d| truncate_for_message(d, MAX_DESCRIPTION_CHARS))
            .unwrap_or_else(|| format!("Tool `{remote_name}` of the MCP server `{}`.", self.name));
        let parameters = match item.get("inputSchema") {
            Some(schema @ Value::Object(_)) => schema.clone(),
            _ => json!({"type": "object"}),
        };
        Some(RemoteTool {
            remote_name: remote_name.to_owned(),
            full_name,
            description,
            parameters,
        })
    }

    /// Calls a tool; a failure comes with, when the connection broke, why
    /// (the next call must connect again).
    async fn call_tool(
        &self,
        name: &str,
        arguments: &Value,
        timeout: Duration,
    ) -> Result<ToolOutput, (ToolError, Option<String>)> {
        let arguments = match arguments {
            Value::Object(_) => arguments.clone(),
            Value::Null => Value::Object(Map::new()),
            _ => {
                return Err((
                    ToolError::InvalidArguments("arguments must be a JSON object".to_owned()),
                    None,
                ))
            }
        };
        let result = self
            .request_within(
                "tools/call",
                json!({"name": name, "arguments": arguments}),
                timeout,
            )
            .await
            .map_err(|e| {
                let broken = matches!(e, McpError::Closed { .. } | McpError::Transport { .. })
                    .then(|| e.to_string());
                (self.tool_error(e), broken)
            })?;
        let text = self.redact(&content_text(&result));
        let (text, truncated) = cap_text(text);
        if result.get("isError").and_then(Value::as_bool) == Some(true) {
            return Err((
                ToolError::RequestFailed(format!(
                    "the MCP tool `{}__{name}` reported an error: {text}",
                    self.name
                )),
                None,
            ));
        }
        Ok(ToolOutput { text, truncated })
    }

    /// An [`McpError`] from a tool call, as text for the model.
    fn tool_error(&self, e: McpError) -> ToolError {
        match e {
            McpError::Timeout { timeout, .. } => ToolError::Timeout(timeout),
            McpError::Rpc {
                code: -32602,
                message,
                ..
            } => ToolError::InvalidArguments(format!("the MCP server refused them: {message}")),
            other => ToolError::RequestFailed(other.to_string()),
        }
    }

    fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "[REDACTED]");
            }
        }
        out
    }
}

fn encode(message: &Value) -> Result<Vec<u8>, String> {
    let bytes = serde_json::to_vec(message).map_err(|e| format!("could not encode: {e}"))?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "the message is {} bytes; the limit is {MAX_MESSAGE_BYTES}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// The text of a `tools/call` result: text items joined by newlines, other
/// items as short placeholders; `structuredContent` when there is no content.
fn content_text(result: &Value) -> String {
    let items = result
        .get("content")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut parts: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        match kind {
            "text" => parts.push(
                item.get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            ),
            "resource" => match item.pointer("/resource/text").and_then(Value::as_str) {
                Some(text) => parts.push(text.to_owned()),
                None => parts.push("[resource]".to_owned()),
            },
            other => {
                let kind: String = other
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .take(32)
                    .collect();
                parts.push(format!("[{kind}]"));
            }
        }
    }
    if parts.is_empty() {
        if let Some(structured) = result.get("structuredContent") {
            return structured.to_string();
        }
    }
    parts.join("\n")
}

/// At most [`MAX_TOOL_TEXT`] characters, with a note when cut.
fn cap_text(text: String) -> (String, bool) {
    match text.char_indices().nth(MAX_TOOL_TEXT) {
        Some((end, _)) => (
            format!(
                "{}\n[MCP tool output cut at {MAX_TOOL_TEXT} characters]",
                &text[..end]
            ),
            true,
        ),
        None => (text, false),
    }
}

/// One tool of an MCP server, named `<server>__<tool>`.
#[derive(Debug, Clone)]
pub struct McpTool {
    client: McpClient,
    tool: RemoteTool,
}

impl McpTool {
    /// The tool's own name on its server.
    pub fn remote_name(&self) -> &str {
        &self.tool.remote_name
    }

    /// The name of the server the tool belongs to.
    pub fn server(&self) -> &str {
        self.client.name()
    }
}

impl Tool for McpTool {
    fn name(&self) -> &str {
        &self.tool.full_name
    }

    fn description(&self) -> &str {
        &self.tool.description
    }

    fn parameters(&self) -> Value {
        self.tool.parameters.clone()
    }

    fn call<'a>(&'a self, args: &'a Value) -> ToolFuture<'a> {
        Box::pin(self.client.call_tool(&self.tool.remote_name, args))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn content_is_joined_with_placeholders() {
        let result = json!({"content": [
            {"type": "text", "text": "a"},
            {"type": "image", "data": "xx", "mimeType": "image/png"},
            {"type": "resource", "resource": {"uri": "file:///x", "text": "r"}},
            {"type": "weird<>type"},
            {"type": "text", "text": "b"},
        ]});
        assert_eq!(content_text(&result), "a\n[image]\nr\n[weirdtype]\nb");
        assert_eq!(content_text(&json!({"content": "nope"})), "");
        assert_eq!(
            content_text(&json!({"structuredContent": {"x": 1}})),
            "{\"x\":1}"
        );
    }

    #[test]
    fn long_output_is_cut_with_a_note() {
        let (text, cut) = cap_text("y".repeat(MAX_TOOL_TEXT + 10));
        assert!(cut);
        assert!(text.ends_with("characters]"));
        assert_eq!(cap_text("short".into()), ("short".into(), false));
    }

    #[test]
    fn oversized_messages_are_refused() {
        let big = json!({"x": "z".repeat(MAX_MESSAGE_BYTES)});
        assert!(encode(&big).is_err());
        assert!(encode(&json!({"x": 1})).is_ok());
    }
}
