//! The "streamable HTTP" transport: each JSON-RPC message is POSTed to the
//! server's URL on its own HTTP/1.1 connection (hyper's `conn` API, no
//! pool), so concurrent requests never wait on each other.
//!
//! The answer to a request is either a JSON body or an SSE stream whose
//! `data:` events carry JSON-RPC messages; the one whose id matches is taken
//! and the stream is dropped. The `Mcp-Session-Id` the server returns from
//! `initialize` is sent on every later message, and `MCP-Protocol-Version`
//! once it is agreed. Requests the server makes over an SSE stream are not
//! answered (this client declares no capabilities that would invite them).
//! Plain `http://` only; the URL is operator-configured, so it is not put
//! through `http_request`'s address policy. The URL and header values never
//! appear in errors or logs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::stdio::response_of;
use super::{McpError, RpcFailure, MAX_MESSAGE_BYTES};

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";

/// The parts of an `http://host[:port]/path` URL this transport needs.
#[derive(Debug, Clone)]
pub(crate) struct McpUrl {
    authority: String,
    host: String,
    port: u16,
    path_and_query: String,
}

/// Parses the configured URL; the error does not quote it (it may carry a
/// token in its query).
pub(crate) fn parse_url(url: &str) -> Result<McpUrl, String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| "`url` is not a valid URL".to_owned())?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err("`url` uses https, which is not supported yet (no TLS); use http".into())
        }
        _ => return Err("`url` must start with http://".to_owned()),
    }
    let Some(authority) = uri.authority() else {
        return Err("`url` has no host".to_owned());
    };
    if authority.as_str().contains('@') {
        return Err("`url` must not carry user:password; use `headers`".to_owned());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err("`url` has no host".to_owned());
    }
    Ok(McpUrl {
        authority: authority.as_str().to_owned(),
        host,
        port: authority.port_u16().unwrap_or(80),
        path_and_query: uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
    })
}

pub(crate) struct HttpTransport {
    url: McpUrl,
    headers: Vec<(HeaderName, HeaderValue)>,
    session: Mutex<Option<HeaderValue>>,
    version: Mutex<Option<HeaderValue>>,
}

impl HttpTransport {
    pub(crate) fn new(
        server: &str,
        url: &str,
        headers: &BTreeMap<String, String>,
    ) -> Result<HttpTransport, McpError> {
        let url = parse_url(url)
            .map_err(|m| McpError::InvalidConfig(format!("server `{server}`: {m}")))?;
        let mut list = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                McpError::InvalidConfig(format!("server `{server}`: bad header name"))
            })?;
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                McpError::InvalidConfig(format!("server `{server}`: bad value for header `{name}`"))
            })?;
            value.set_sensitive(true);
            list.push((name, value));
        }
        Ok(HttpTransport {
            url,
            headers: list,
            session: Mutex::new(None),
            version: Mutex::new(None),
        })
    }

    pub(crate) fn set_protocol_version(&self, version: &str) {
        if let (Ok(v), Ok(mut slot)) = (HeaderValue::from_str(version), self.version.lock()) {
            *slot = Some(v);
        }
    }

    pub(crate) async fn request(&self, id: u64, bytes: Vec<u8>) -> Result<Value, RpcFailure> {
        let (response, _connection) = self.post(bytes).await?;
        let status = response.status();
        if let Some(session) = response.headers().get(SESSION_HEADER) {
            let visible = session.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b));
            if visible && session.len() <= 256 {
                if let Ok(mut slot) = self.session.lock() {
                    if slot.is_none() {
                        *slot = Some(session.clone());
                    }
                }
            }
        }
        if !status.is_success() {
            return Err(status_failure(status.as_u16()));
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let body = response.into_body();
        if content_type.starts_with("text/event-stream") {
            read_sse(body, id).await
        } else if content_type.starts_with("application/json") {
            let bytes = read_capped(body).await?;
            let message: Value = serde_json::from_slice(&bytes)
                .map_err(|_| RpcFailure::Protocol("the response body is not JSON".to_owned()))?;
            find_response(message, id).ok_or_else(|| {
                RpcFailure::Protocol("the response body holds no answer to the request".to_owned())
            })?
        } else {
            Err(RpcFailure::Protocol(format!(
                "the response has content type `{}`, not JSON or an event stream",
                crate::tool::truncate_for_message(&content_type, 60)
            )))
        }
    }

    pub(crate) async fn notify(&self, bytes: Vec<u8>) -> Result<(), RpcFailure> {
        let (response, _connection) = self.post(bytes).await?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(status_failure(status.as_u16()))
        }
    }

    async fn post(
        &self,
        bytes: Vec<u8>,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, ConnectionTask), RpcFailure> {
        let stream = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| RpcFailure::Transport(format!("could not connect: {}", e.kind())))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| RpcFailure::Transport(format!("HTTP handshake failed: {e}")))?;
        // Errors surface through `send_request` / the body stream.
        let task = ConnectionTask(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(self.url.path_and_query.as_str())
            .header(HOST, self.url.authority.as_str())
            .header(USER_AGENT, concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .header(ACCEPT, "application/json, text/event-stream")
            .header(CONTENT_TYPE, "application/json");
        if let Some(h) = builder.headers_mut() {
            for (name, value) in &self.headers {
                h.insert(name.clone(), value.clone());
            }
            if let Some(session) = self.session.lock().ok().and_then(|s| s.clone()) {
                h.insert(SESSION_HEADER, session);
            }
            if let Some(version) = self.version.lock().ok().and_then(|s| s.clone()) {
                h.insert(VERSION_HEADER, version);
            }
        }
        let request = builder
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|_| RpcFailure::Transport("could not build the HTTP request".to_owned()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| RpcFailure::Transport(format!("HTTP exchange failed: {e}")))?;
        Ok((response, task))
    }
}

/// Aborts a request's connection task when the request ends, timed out or
/// cancelled included, so no connection outlives its request.
struct ConnectionTask(tokio::task::JoinHandle<()>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn status_failure(status: u16) -> RpcFailure {
    match status {
        404 => RpcFailure::Transport(
            "HTTP 404: the MCP endpoint or session was not found (an expired session needs a \
             new client)"
                .to_owned(),
        ),
        401 | 403 => {
            RpcFailure::Transport(format!("HTTP {status}: the server refused the credentials"))
        }
        _ => RpcFailure::Transport(format!("HTTP {status}")),
    }
}

/// The answer to request `id` in a JSON-RPC message or batch, if any.
fn find_response(message: Value, id: u64) -> Option<Result<Value, RpcFailure>> {
    match message {
        Value::Array(batch) => batch.into_iter().find_map(|m| find_response(m, id)),
        Value::Object(obj) => {
            let is_response = !obj.contains_key("method");
            (is_response && obj.get("id").and_then(Value::as_u64) == Some(id))
                .then(|| response_of(&obj))
        }
        _ => None,
    }
}

async fn read_capped(mut body: hyper::body::Incoming) -> Result<Vec<u8>, RpcFailure> {
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| RpcFailure::Transport(format!("reading the response failed: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_MESSAGE_BYTES {
                return Err(RpcFailure::Protocol(format!(
                    "the response is over {MAX_MESSAGE_BYTES} bytes"
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

/// Reads SSE events until one carries the answer to `id`.
async fn read_sse(mut body: hyper::body::Incoming, id: u64) -> Result<Value, RpcFailure> {
    let mut parser = SseParser::default();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| RpcFailure::Transport(format!("reading the event stream failed: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for event in parser.push(&data)? {
            if let Ok(message) = serde_json::from_str::<Value>(&event) {
                if let Some(reply) = find_response(message, id) {
                    return reply;
                }
            }
        }
    }
    Err(RpcFailure::Transport(
        "the event stream ended without an answer".to_owned(),
    ))
}

/// An incremental parser of `text/event-stream`: yields each event's data
/// (its `data:` lines joined by `\n`). Lines and events are capped.
#[derive(Default)]
struct SseParser {
    line: Vec<u8>,
    data: String,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) -> Result<Vec<String>, RpcFailure> {
        let mut events = Vec::new();
        for &b in chunk {
            if b != b'\n' {
                if self.line.len() >= MAX_MESSAGE_BYTES {
                    return Err(RpcFailure::Protocol(format!(
                        "an event stream line is over {MAX_MESSAGE_BYTES} bytes"
                    )));
                }
                self.line.push(b);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(std::mem::take(&mut self.data));
                }
                continue;
            }
            let line = String::from_utf8_lossy(&line);
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_ref(), ""),
            };
            if field == "data" {
                if self.data.len() + value.len() + 1 > MAX_MESSAGE_BYTES {
                    return Err(RpcFailure::Protocol(format!(
                        "an event is over {MAX_MESSAGE_BYTES} bytes"
                    )));
                }
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
            }
        }
        Ok(events)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sse_events_are_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p
            .push(b"event: message\r\ndata: {\"a\"")
            .unwrap()
            .is_empty());
        assert_eq!(
            p.push(b":1}\r\n\r\n: comment\n\ndata: x\ndata: y\n\n")
                .unwrap(),
            vec!["{\"a\":1}".to_owned(), "x\ny".to_owned()]
        );
    }

    #[test]
    fn the_matching_response_is_found() {
        let batch = json!([
            {"jsonrpc": "2.0", "method": "notifications/progress"},
            {"jsonrpc": "2.0", "id": 7, "method": "ping"},
            {"jsonrpc": "2.0", "id": 6, "result": {}},
            {"jsonrpc": "2.0", "id": 7, "result": {"ok": true}},
        ]);
        assert_eq!(
            find_response(batch, 7).unwrap().unwrap(),
            json!({"ok": true})
        );
        assert!(find_response(json!({"id": 1, "result": {}}), 2).is_none());
    }

    #[test]
    fn urls_are_http_only_and_not_quoted() {
        let u = parse_url("http://127.0.0.1:8931/mcp?token=abc").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 8931));
        assert_eq!(u.path_and_query, "/mcp?token=abc");
        assert_eq!(parse_url("http://h").unwrap().path_and_query, "/");
        assert!(parse_url("https://h/mcp").unwrap_err().contains("https"));
        let err = parse_url("ftp://secret-host/x").unwrap_err();
        assert!(!err.contains("secret-host"));
        assert!(parse_url("http://u:p@h/").is_err());
    }
}
