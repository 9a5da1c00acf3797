//! End-to-end test support: start the real `kiln` binary on port 0 with the
//! real models, and talk HTTP/1.1 to it over a plain socket (so tests can send
//! bytes no client library would, and hang up mid-stream).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub const CHAT_MODEL: &str = "smollm2-135m";
pub const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";

/// The Kiln home holding the test models: `$KILN_TEST_HOME`, else
/// `$HOME/.cache/kiln/home`.
pub fn test_home() -> PathBuf {
    std::env::var_os("KILN_TEST_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/home")
        })
}

pub fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_HOME", test_home())
        .env_remove("KILN_PORT")
        .env_remove("KILN_MODELS")
        .env_remove("KILN_QUEUE_CAPACITY")
        .env("KILN_LOG", "info");
    cmd
}

pub struct Server {
    child: Child,
    pub port: u16,
    /// Everything the server wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
    /// Holds the server's database (`kiln.db`); shared with a restarted
    /// server.
    pub data: Arc<tempfile::TempDir>,
    /// The platform admin key the first start printed; sent with every
    /// request that sets no `Authorization` of its own.
    pub admin_key: Option<String>,
}

/// The line `kiln serve` prints once with the first admin key.
pub const ADMIN_KEY_LINE: &str =
    "created the platform admin API key (shown only now, keep it safe): ";

impl Server {
    /// Starts `kiln serve --port 0` with `extra` arguments and waits for its
    /// "listening" line.
    pub fn start(extra: &[&str]) -> Result<Server> {
        Self::start_in(Arc::new(tempfile::tempdir()?), extra)
    }

    /// Starts on the database in `data` (a restart keeps its ledger).
    pub fn start_in(data: Arc<tempfile::TempDir>, extra: &[&str]) -> Result<Server> {
        Self::start_with(data, extra, &[])
    }

    /// Starts with extra environment variables.
    pub fn start_with(
        data: Arc<tempfile::TempDir>,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Server> {
        let db = data.path().join("kiln.db");
        let mut cmd = kiln();
        cmd.envs(envs.iter().copied())
            .args(["serve", "--host", "127.0.0.1", "--port", "0"]);
        // A test may name its own database (PostgreSQL).
        if !extra.contains(&"--database") {
            cmd.arg("--database").arg(&db);
        }
        let mut child = cmd
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning kiln")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("kiln listening on http://").nth(1) {
                    let port = rest
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.trim().parse::<u16>().ok());
                    let _ = tx.send(port);
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(Some(port)) => {
                let admin_key = log
                    .lock()
                    .unwrap()
                    .lines()
                    .find_map(|l| l.split(ADMIN_KEY_LINE).nth(1))
                    .map(|k| k.trim().to_string());
                Ok(Server {
                    child,
                    port,
                    log,
                    data,
                    admin_key,
                })
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(200));
                bail!("kiln did not start; its log:\n{}", log.lock().unwrap())
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        let auth = self.admin_key.as_ref().map(|k| format!("Bearer {k}"));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        let has_auth = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
        if let (Some(a), false) = (&auth, has_auth) {
            all.push(("Authorization", a));
        }
        request(self.port, method, path, &all, body)
    }

    /// A JSON request made with `key` (`None`: no key at all).
    pub fn call_as(
        &self,
        key: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response> {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        let body = body.map(Value::to_string).unwrap_or_default();
        request(self.port, method, path, &headers, body.as_bytes())
    }

    pub fn get(&self, path: &str) -> Result<Response> {
        self.request("GET", path, &[], b"")
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Result<Response> {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill failed");
        }
        self.wait_exit(Duration::from_secs(60))
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if started.elapsed() > limit {
                bail!("kiln did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of a metric line starting with `prefix` (labels included).
    pub fn metric(&self, prefix: &str) -> Result<f64> {
        let body = self.get("/metrics")?.text();
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("metric `{prefix}` not found"))
    }
}

impl Server {
    pub fn db_path(&self) -> PathBuf {
        self.data.path().join("kiln.db")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("not JSON: {}", self.text()))
    }

    /// The `data:` payloads of a server-sent-event body.
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }

    /// Checks the status and that the body is an OpenAI error with `code`.
    pub fn expect_error(&self, status: u16, code: &str) -> Result<String> {
        let body = self.json()?;
        if self.status != status {
            bail!("expected status {status}, got {}: {body}", self.status);
        }
        let err = &body["error"];
        if err["code"] != code
            || !err["message"].is_string()
            || !err["type"].is_string()
            || err.get("param").is_none()
        {
            bail!("expected an error with code {code}, got {body}");
        }
        Ok(err["message"].as_str().unwrap_or_default().to_string())
    }
}

fn write_request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)
}

/// One request on a fresh connection, read to the end.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    // The server may answer (413) before reading a large body and close:
    // write from another thread so the answer is read as soon as it comes.
    let mut writer = stream.try_clone()?;
    let head_and_body = (
        method.to_string(),
        path.to_string(),
        headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>(),
        body.to_vec(),
    );
    std::thread::spawn(move || {
        let (method, path, headers, body) = head_and_body;
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let _ = write_request(&mut writer, &method, &path, &headers, &body);
    });
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    if raw.is_empty() {
        read?;
        bail!("empty response");
    }
    parse_response(&raw)
}

/// Opens a streaming request and returns the socket after the response
/// headers and the first `data:` event have arrived.
/// `key` goes in `Authorization: Bearer`.
pub fn open_stream(port: u16, path: &str, body: &Value, key: Option<&str>) -> Result<TcpStream> {
    open_stream_as(port, path, body, key, None)
}

/// [`open_stream`] with an `X-Request-Id`, to find the call in the ledger.
pub fn open_stream_as(
    port: u16,
    path: &str,
    body: &Value,
    key: Option<&str>,
    request_id: Option<&str>,
) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    if let Some(id) = request_id {
        headers.push(("X-Request-Id", id));
    }
    write_request(
        &mut stream,
        "POST",
        path,
        &headers,
        body.to_string().as_bytes(),
    )?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("stream closed early: {}", String::from_utf8_lossy(&seen));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    if !seen.starts_with(b"HTTP/1.1 200") {
        bail!("stream failed: {}", String::from_utf8_lossy(&seen));
    }
    Ok(stream)
}

fn parse_response(raw: &[u8]) -> Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no header end in {:?}", String::from_utf8_lossy(raw)))?;
    let head = std::str::from_utf8(&raw[..split])?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Runs named checks, collecting failures so one broken check does not hide
/// the others; panics at the end with every failure.
pub struct Checks {
    failures: Vec<String>,
}

impl Checks {
    pub fn new() -> Self {
        Checks {
            failures: Vec::new(),
        }
    }

    pub fn run(&mut self, name: &str, check: impl FnOnce() -> Result<()>) {
        let started = Instant::now();
        match check() {
            Ok(()) => eprintln!("ok   {name} ({:.1?})", started.elapsed()),
            Err(e) => {
                eprintln!("FAIL {name}: {e:#}");
                self.failures.push(format!("{name}: {e:#}"));
            }
        }
    }

    pub fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "failed checks:\n{}",
            self.failures.join("\n")
        );
    }
}

pub fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        bail!(what())
    }
}

/// 10 prompt tokens (any ids below SmolLM2's vocabulary size).
pub const PROMPT: [u32; 10] = [504, 1242, 1690, 253, 1425, 282, 253, 3445, 28, 216];

/// A greedy `/v1/completions` body on [`PROMPT`], with a usage chunk when
/// streamed.
pub fn completion_body(max_tokens: u32, stream: bool) -> Value {
    serde_json::json!({
        "model": CHAT_MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": { "include_usage": true },
    })
}

/// `POST /v1/completions` with a key and a request id of the test's choosing.
pub fn post_as(port: u16, key: &str, request_id: &str, body: &Value) -> Result<Response> {
    let auth = format!("Bearer {key}");
    request(
        port,
        "POST",
        "/v1/completions",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
            ("X-Request-Id", request_id),
        ],
        body.to_string().as_bytes(),
    )
}

/// (prompt, completion) tokens of a response the client received in full,
/// or `None` when it did not arrive whole.
pub fn received_usage(r: &Response, stream: bool) -> Option<(u64, u64)> {
    if r.status != 200 {
        return None;
    }
    let usage = if stream {
        let data = r.sse_data();
        if data.last().map(String::as_str) != Some("[DONE]") {
            return None;
        }
        data.iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|v| v["usage"].is_object())?["usage"]
            .clone()
    } else {
        r.json().ok()?["usage"].clone()
    };
    Some((
        usage["prompt_tokens"].as_u64()?,
        usage["completion_tokens"].as_u64()?,
    ))
}

/// Checks the ledger rows of a load that was cut by a SIGKILL: every
/// response a client received in full (`received`: request id -> prompt and
/// completion tokens) is there exactly once, with those tokens and a
/// successful outcome; nothing else is charged more than `max_completion`.
pub fn received_are_in_ledger(
    received: &std::collections::HashMap<String, (u64, u64)>,
    rows: &[kiln_store::LedgerEntry],
    max_completion: u64,
) -> Result<()> {
    if received.len() < 6 {
        bail!(
            "only {} responses completed before the kill",
            received.len()
        );
    }
    let mut by_id: std::collections::HashMap<&str, Vec<&kiln_store::LedgerEntry>> =
        std::collections::HashMap::new();
    for r in rows {
        by_id
            .entry(r.record.request_id.as_str())
            .or_default()
            .push(r);
    }
    for (id, (prompt, completion)) in received {
        let Some(entries) = by_id.get(id.as_str()) else {
            bail!("{id} was received in full but is not in the ledger");
        };
        if entries.len() != 1 {
            bail!("{id} is in the ledger {} times", entries.len());
        }
        let e = &entries[0].record;
        let ok = e.prompt_tokens == *prompt
            && e.completion_tokens == *completion
            && matches!(
                e.outcome,
                kiln_store::Outcome::Stop | kiln_store::Outcome::Length
            );
        if !ok {
            bail!("{id}: received {prompt}+{completion}, ledger {e:?}");
        }
    }
    for r in rows {
        if !received.contains_key(&r.record.request_id)
            && r.record.completion_tokens > max_completion
        {
            bail!("charged beyond max_tokens: {r:?}");
        }
    }
    Ok(())
}

/// Waits until no reservation is open (a dead replica's calls settled).
pub fn wait_until_settled(db: &dyn kiln_store::Database, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let open = db.open_reservations()?;
        if open.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} reservations still open: {open:?}", open.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
