//! The stdio transport: a child process speaking newline-delimited JSON-RPC
//! on its stdin and stdout.
//!
//! One writer task owns stdin, so a request cancelled half-way never leaves
//! half a line on the pipe; one reader task reads stdout, routes responses
//! to the waiting request by id, ignores notifications and answers server
//! requests (`ping` with an empty result, anything else with "method not
//! found") so the server never waits on us. When stdout ends, every pending
//! and later request fails with [`RpcFailure::Closed`]. The child's stderr is
//! discarded: it may print anything, secrets included.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{McpError, RpcFailure, MAX_MESSAGE_BYTES};

/// Variables a stdio server inherits from Kiln's environment; everything
/// else (Kiln's own secrets included) is withheld.
const INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LC_ALL", "TMPDIR", "TZ",
];

type Reply = Result<Value, RpcFailure>;

#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set once stdout has ended: why.
    closed: Option<String>,
}

pub(crate) struct StdioTransport {
    pending: Arc<Mutex<Pending>>,
    outbox: mpsc::Sender<Vec<u8>>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    /// Held so the child is killed (`kill_on_drop`) with the transport.
    _child: Child,
}

impl Drop for StdioTransport {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// Removes a request's waiter when the request ends, however it ends
/// (answer, timeout, cancellation).
struct WaitGuard<'a> {
    pending: &'a Mutex<Pending>,
    id: u64,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            p.waiting.remove(&self.id);
        }
    }
}

impl StdioTransport {
    pub(crate) fn spawn(
        server: &str,
        command: &str,
        args: &[String],
        env: &BTreeMap<String, String>,
    ) -> Result<StdioTransport, McpError> {
        let mut cmd = Command::new(command);
        cmd.args(args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for key in INHERITED_ENV {
            if let Some(value) = std::env::var_os(key) {
                cmd.env(key, value);
            }
        }
        cmd.envs(env);
        let mut child = cmd.spawn().map_err(|e| McpError::Spawn {
            server: server.to_owned(),
            message: match e.kind() {
                std::io::ErrorKind::NotFound => {
                    format!("command `{command}` was not found")
                }
                std::io::ErrorKind::PermissionDenied => {
                    format!("command `{command}` is not executable (permission denied)")
                }
                _ => format!("command `{command}` failed to start: {e}"),
            },
        })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(McpError::Spawn {
                server: server.to_owned(),
                message: "the child's stdin/stdout pipes are missing".to_owned(),
            });
        };
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (outbox, inbox) = mpsc::channel::<Vec<u8>>(64);
        let writer = tokio::spawn(write_loop(stdin, inbox));
        let reader = tokio::spawn(read_loop(
            server.to_owned(),
            stdout,
            pending.clone(),
            outbox.clone(),
        ));
        Ok(StdioTransport {
            pending,
            outbox,
            reader,
            writer,
            _child: child,
        })
    }

    pub(crate) async fn request(&self, id: u64, bytes: Vec<u8>) -> Reply {
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self
                .pending
                .lock()
                .map_err(|_| RpcFailure::Transport("internal lock poisoned".to_owned()))?;
            if let Some(reason) = &p.closed {
                return Err(RpcFailure::Closed(reason.clone()));
            }
            p.waiting.insert(id, tx);
        }
        let _guard = WaitGuard {
            pending: &self.pending,
            id,
        };
        self.send(bytes).await?;
        match rx.await {
            Ok(reply) => reply,
            Err(_) => Err(RpcFailure::Closed(self.closed_reason())),
        }
    }

    pub(crate) async fn notify(&self, bytes: Vec<u8>) -> Result<(), RpcFailure> {
        if let Ok(p) = self.pending.lock() {
            if let Some(reason) = &p.closed {
                return Err(RpcFailure::Closed(reason.clone()));
            }
        }
        self.send(bytes).await
    }

    async fn send(&self, mut bytes: Vec<u8>) -> Result<(), RpcFailure> {
        bytes.push(b'\n');
        self.outbox
            .send(bytes)
            .await
            .map_err(|_| RpcFailure::Closed(self.closed_reason()))
    }

    /// Whether the server has exited (or closed its output).
    pub(crate) fn is_closed(&self) -> bool {
        self.pending.lock().map_or(true, |p| p.closed.is_some())
    }

    fn closed_reason(&self) -> String {
        self.pending
            .lock()
            .ok()
            .and_then(|p| p.closed.clone())
            .unwrap_or_else(|| "its input pipe is closed".to_owned())
    }
}

async fn write_loop(mut stdin: ChildStdin, mut inbox: mpsc::Receiver<Vec<u8>>) {
    while let Some(line) = inbox.recv().await {
        if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
            // The reader sees the exit and fails the waiting requests.
            return;
        }
    }
}

/// One line of at most `limit` bytes (without the newline). `Ok(None)` at
/// the end of the stream; an over-long line is an error.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    limit: usize,
) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    loop {
        let buf = reader
            .fill_buf()
            .await
            .map_err(|e| format!("reading its output failed: {e}"))?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(line) });
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if line.len() + chunk.len() > limit {
            return Err(format!("it sent a message over {limit} bytes"));
        }
        line.extend_from_slice(chunk);
        match done {
            Some(used) => {
                reader.consume(used);
                return Ok(Some(line));
            }
            None => {
                let used = chunk.len();
                reader.consume(used);
            }
        }
    }
}

async fn read_loop(
    server: String,
    stdout: impl AsyncRead + Unpin,
    pending: Arc<Mutex<Pending>>,
    outbox: mpsc::Sender<Vec<u8>>,
) {
    let mut reader = BufReader::new(stdout);
    let reason = loop {
        let line = match read_line(&mut reader, MAX_MESSAGE_BYTES).await {
            Ok(Some(line)) => line,
            Ok(None) => break "it exited or closed its output".to_owned(),
            Err(e) => break e,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let message: Value = match serde_json::from_slice(&line) {
            Ok(m) => m,
            Err(_) => {
                tracing::debug!(server = %server, "MCP server wrote a line that is not JSON; ignored");
                continue;
            }
        };
        route(&server, message, &pending, &outbox);
    };
    tracing::warn!(server = %server, reason = %reason, "MCP stdio server connection ended");
    let waiting = match pending.lock() {
        Ok(mut p) => {
            p.closed = Some(reason.clone());
            std::mem::take(&mut p.waiting)
        }
        Err(_) => HashMap::new(),
    };
    for (_, tx) in waiting {
        let _ = tx.send(Err(RpcFailure::Closed(reason.clone())));
    }
}

/// Hands one message from the server to whoever it is for.
fn route(server: &str, message: Value, pending: &Mutex<Pending>, outbox: &mpsc::Sender<Vec<u8>>) {
    match message {
        Value::Array(batch) => {
            for m in batch {
                route(server, m, pending, outbox);
            }
        }
        Value::Object(ref obj) => {
            let id = obj.get("id");
            if let Some(method) = obj.get("method").and_then(Value::as_str) {
                let Some(id) = id else {
                    tracing::trace!(server = %server, "MCP notification ignored");
                    return;
                };
                let reply = if method == "ping" {
                    json!({"jsonrpc": "2.0", "id": id, "result": {}})
                } else {
                    json!({"jsonrpc": "2.0", "id": id, "error": {
                        "code": -32601,
                        "message": "method not supported by this client",
                    }})
                };
                if let Ok(mut bytes) = serde_json::to_vec(&reply) {
                    bytes.push(b'\n');
                    // Never block the reader on the writer.
                    if outbox.try_send(bytes).is_err() {
                        tracing::debug!(server = %server, "MCP server request left unanswered: outbox full");
                    }
                }
                return;
            }
            let Some(id) = id.and_then(Value::as_u64) else {
                tracing::debug!(server = %server, "MCP message without a usable id ignored");
                return;
            };
            let reply = response_of(obj);
            let tx = pending.lock().ok().and_then(|mut p| p.waiting.remove(&id));
            match tx {
                Some(tx) => {
                    let _ = tx.send(reply);
                }
                None => {
                    tracing::debug!(server = %server, id, "MCP response for no waiting request ignored")
                }
            }
        }
        _ => tracing::debug!(server = %server, "MCP message that is not an object ignored"),
    }
}

/// The result or error of a JSON-RPC response object.
pub(crate) fn response_of(obj: &serde_json::Map<String, Value>) -> Reply {
    if let Some(error) = obj.get("error") {
        let code = error.get("code").and_then(Value::as_i64).unwrap_or(0);
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("(no message)")
            .to_owned();
        return Err(RpcFailure::Rpc { code, message });
    }
    match obj.get("result") {
        Some(result) => Ok(result.clone()),
        None => Err(RpcFailure::Protocol(
            "a response has neither `result` nor `error`".to_owned(),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_capped() {
        let data: &[u8] = b"short\n0123456789abc\nlast";
        let mut r = BufReader::with_capacity(4, data);
        assert_eq!(read_line(&mut r, 10).await.unwrap().unwrap(), b"short");
        assert!(read_line(&mut r, 10).await.is_err());
        let mut r = BufReader::with_capacity(4, &b"a\n\nlast"[..]);
        assert_eq!(read_line(&mut r, 10).await.unwrap().unwrap(), b"a");
        assert_eq!(read_line(&mut r, 10).await.unwrap().unwrap(), b"");
        assert_eq!(read_line(&mut r, 10).await.unwrap().unwrap(), b"last");
        assert!(read_line(&mut r, 10).await.unwrap().is_none());
    }

    #[test]
    fn responses_are_result_or_error() {
        let ok = json!({"id": 1, "result": {"x": 1}});
        assert_eq!(
            response_of(ok.as_object().unwrap()).unwrap(),
            json!({"x": 1})
        );
        let err = json!({"id": 1, "error": {"code": -32601, "message": "nope"}});
        assert!(matches!(
            response_of(err.as_object().unwrap()),
            Err(RpcFailure::Rpc { code: -32601, .. })
        ));
        let bad = json!({"id": 1});
        assert!(response_of(bad.as_object().unwrap()).is_err());
    }
}
