//! End-to-end tests of `http_request` over in-memory streams: a fake
//! resolver, and a connector that counts connects and serves each address
//! with a tiny HTTP/1.1 responder on a `tokio::io::duplex` pipe. No test
//! opens a socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_agents::{
    BoxedStream, ConnectFuture, ConnectTarget, Connector, HttpRequest, HttpRequestConfig,
    ResolveFuture, Resolver, SecretHeader, Tool, ToolError, ToolOutput,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PUBLIC: &str = "93.184.216.34";
const OTHER_PUBLIC: &str = "93.184.216.35";
const SECRET: &str = "Bearer sk-live-7f3a9c";

#[derive(Default)]
struct FakeResolver {
    names: HashMap<String, Vec<IpAddr>>,
}

impl FakeResolver {
    fn with(mut self, name: &str, ips: &[&str]) -> Self {
        self.names.insert(
            name.to_owned(),
            ips.iter().map(|s| s.parse().unwrap()).collect(),
        );
        self
    }
}

impl Resolver for FakeResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            self.names
                .get(host)
                .cloned()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))
        })
    }
}

/// What the responder saw.
#[derive(Debug, Clone)]
struct Seen {
    addr: SocketAddr,
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    delay: Duration,
}

fn reply(status: u16, body: impl Into<Vec<u8>>) -> Reply {
    Reply {
        status,
        headers: vec![("content-type".to_owned(), "text/plain".to_owned())],
        body: body.into(),
        delay: Duration::ZERO,
    }
}

fn redirect(status: u16, location: &str) -> Reply {
    Reply {
        status,
        headers: vec![("location".to_owned(), location.to_owned())],
        body: Vec::new(),
        delay: Duration::ZERO,
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// Serves registered addresses from memory and records every connect.
#[derive(Default)]
struct MemoryConnector {
    handlers: HashMap<SocketAddr, Handler>,
    connects: Mutex<Vec<ConnectTarget>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl MemoryConnector {
    fn serve(mut self, ip: &str, handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        let addr = SocketAddr::new(ip.parse().unwrap(), 80);
        self.handlers.insert(addr, Arc::new(handler));
        self
    }

    fn connect_count(&self) -> usize {
        self.connects.lock().unwrap().len()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Connector for MemoryConnector {
    fn connect<'a>(&'a self, target: &'a ConnectTarget) -> ConnectFuture<'a> {
        Box::pin(async move {
            self.connects.lock().unwrap().push(target.clone());
            let handler = self
                .handlers
                .get(&target.addr)
                .cloned()
                .ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionRefused, "refused"))?;
            let (client, server) = tokio::io::duplex(16 * 1024);
            let seen = Arc::clone(&self.seen);
            let addr = target.addr;
            tokio::spawn(async move {
                let _ = respond(server, addr, handler, seen).await;
            });
            Ok(Box::new(client) as BoxedStream)
        })
    }
}

/// A minimal HTTP/1.1 responder: one request (Content-Length bodies only),
/// one response, then close.
async fn respond(
    mut stream: tokio::io::DuplexStream,
    addr: SocketAddr,
    handler: Handler,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let request = Seen {
        addr,
        method,
        target,
        headers,
        body,
    };
    seen.lock().unwrap().push(request.clone());
    let reply = handler(&request);
    tokio::time::sleep(reply.delay).await;
    let mut out = format!("HTTP/1.1 {} X\r\n", reply.status);
    for (n, v) in &reply.headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        reply.body.len()
    ));
    stream.write_all(out.as_bytes()).await?;
    stream.write_all(&reply.body).await?;
    stream.shutdown().await
}

struct Harness {
    tool: HttpRequest,
    connector: Arc<MemoryConnector>,
}

impl Harness {
    fn new(config: HttpRequestConfig, resolver: FakeResolver, connector: MemoryConnector) -> Self {
        let connector = Arc::new(connector);
        let tool = HttpRequest::with_network(
            config,
            Arc::new(resolver),
            Arc::clone(&connector) as Arc<dyn Connector>,
        )
        .unwrap();
        Harness { tool, connector }
    }

    async fn call(&self, args: Value) -> Result<ToolOutput, ToolError> {
        self.tool.call(&args).await
    }
}

fn config(hosts: &[&str]) -> HttpRequestConfig {
    HttpRequestConfig::with_allowed_hosts(hosts.iter().copied()).unwrap()
}

fn public_site() -> (FakeResolver, MemoryConnector) {
    (
        FakeResolver::default().with("api.example.com", &[PUBLIC]),
        MemoryConnector::default().serve(PUBLIC, |_| reply(200, "hello")),
    )
}

/// Asserts a refusal that never reached the connector.
async fn assert_refused(h: &Harness, url: &str, want: &str) {
    let err = h.call(json!({ "url": url })).await.unwrap_err();
    assert_eq!(err.code(), "refused", "{url}: {err}");
    assert!(err.to_string().contains(want), "{url}: {err}");
    assert_eq!(h.connector.connect_count(), 0, "{url} connected");
}

#[tokio::test]
async fn plain_get_returns_status_type_and_body() {
    let (resolver, connector) = public_site();
    let h = Harness::new(config(&["api.example.com"]), resolver, connector);
    let out = h
        .call(json!({"url": "http://api.example.com/v1/items?x=1"}))
        .await
        .unwrap();
    assert!(!out.truncated);
    assert_eq!(
        out.text,
        "HTTP 200 OK\nurl: http://api.example.com/v1/items?x=1\ncontent-type: text/plain\n\nhello"
    );
    let seen = h.connector.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].addr, SocketAddr::new(PUBLIC.parse().unwrap(), 80));
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, "/v1/items?x=1");
    assert_eq!(seen[0].header("host"), Some("api.example.com"));
    let connects = h.connector.connects.lock().unwrap().clone();
    assert_eq!(connects[0].host, "api.example.com");
}

#[tokio::test]
async fn names_resolving_to_loopback_are_refused_without_connecting() {
    let resolver = FakeResolver::default()
        .with("v4.example.com", &["127.0.0.2"])
        .with("v6.example.com", &["::1"])
        .with("mapped.example.com", &["::ffff:127.0.0.1"])
        .with("nat64.example.com", &["64:ff9b::7f00:1"])
        .with("meta.example.com", &["169.254.169.254"])
        .with("mixed.example.com", &[PUBLIC, "10.0.0.7"]);
    let connector = MemoryConnector::default()
        .serve("127.0.0.2", |_| reply(200, "internal"))
        .serve(PUBLIC, |_| reply(200, "public"));
    let h = Harness::new(config(&["*.example.com"]), resolver, connector);
    assert_refused(
        &h,
        "http://v4.example.com/",
        "resolves to 127.0.0.2, which is a loopback address",
    )
    .await;
    assert_refused(
        &h,
        "http://v6.example.com/",
        "resolves to ::1, which is a loopback address",
    )
    .await;
    assert_refused(
        &h,
        "http://mapped.example.com/",
        "resolves to ::ffff:127.0.0.1, which is a loopback",
    )
    .await;
    assert_refused(&h, "http://nat64.example.com/", "loopback").await;
    assert_refused(&h, "http://meta.example.com/", "link-local").await;
    // One bad address in the answer refuses the whole name.
    assert_refused(
        &h,
        "http://mixed.example.com/",
        "resolves to 10.0.0.7, which is a private",
    )
    .await;
}

#[tokio::test]
async fn numeric_ipv4_forms_are_recognised_and_refused() {
    // With 127.0.0.1 on the allowlist, the address policy is what refuses.
    let h = Harness::new(
        config(&["127.0.0.1", "10.0.0.1"]),
        FakeResolver::default(),
        MemoryConnector::default().serve("127.0.0.1", |_| reply(200, "internal")),
    );
    for url in [
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://0x7f.0.0.1/",
        "http://0x7F000001/",
        "http://127.1/",
        "http://127.0.0.1.:80/",
    ] {
        assert_refused(&h, url, "`127.0.0.1` is a loopback address").await;
    }
    assert_refused(&h, "http://10.1/", "`10.0.0.1` is a private address").await;
    // Without it, the allowlist refuses them by their real address.
    let h = Harness::new(
        config(&["api.example.com"]),
        FakeResolver::default(),
        MemoryConnector::default(),
    );
    for url in ["http://2130706433/", "http://0x7f.1/", "http://0/"] {
        let err = h.call(json!({ "url": url })).await.unwrap_err();
        assert!(err.to_string().contains("is not on the allowlist"), "{err}");
    }
    assert_eq!(h.connector.connect_count(), 0);
    // Numeric-looking garbage is refused, not resolved as a name.
    let err = h
        .call(json!({"url": "http://1.2.3.4.5/"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a valid one"), "{err}");
}

#[tokio::test]
async fn ipv6_literals_are_checked() {
    let h = Harness::new(
        config(&[
            "::1",
            "::ffff:7f00:1",
            "64:ff9b::a9fe:a9fe",
            "::",
            "fd00::1",
        ]),
        FakeResolver::default(),
        MemoryConnector::default(),
    );
    assert_refused(&h, "http://[::1]/", "`[::1]` is a loopback address").await;
    assert_refused(&h, "http://[::ffff:127.0.0.1]/", "loopback").await;
    assert_refused(&h, "http://[::ffff:7f00:1]:8080/", "loopback").await;
    assert_refused(&h, "http://[64:ff9b::169.254.169.254]/", "link-local").await;
    assert_refused(&h, "http://[::]/", "unspecified").await;
    assert_refused(&h, "http://[fd00::1]/", "unique-local").await;
}

#[tokio::test]
async fn allow_private_lets_operators_reach_internal_hosts_but_not_unspecified() {
    let mut cfg = config(&["internal.corp", "0.0.0.0"]);
    cfg.allow_private = true;
    let h = Harness::new(
        cfg,
        FakeResolver::default().with("internal.corp", &["10.1.2.3"]),
        MemoryConnector::default().serve("10.1.2.3", |_| reply(200, "ok")),
    );
    let out = h
        .call(json!({"url": "http://internal.corp/"}))
        .await
        .unwrap();
    assert!(out.text.ends_with("\n\nok"));
    let err = h.call(json!({"url": "http://0.0.0.0/"})).await.unwrap_err();
    assert!(err.to_string().contains("unspecified"), "{err}");
    assert_eq!(h.connector.connect_count(), 1);
}

#[tokio::test]
async fn allowlist_wildcards() {
    let resolver = FakeResolver::default()
        .with("a.example.com", &[PUBLIC])
        .with("a.b.example.com", &[PUBLIC])
        .with("example.com", &[PUBLIC])
        .with("badexample.com", &[PUBLIC])
        .with("example.com.evil.net", &[PUBLIC]);
    let connector = MemoryConnector::default().serve(PUBLIC, |_| reply(200, "hi"));
    let h = Harness::new(config(&["*.example.com"]), resolver, connector);
    for url in ["http://a.example.com/", "http://A.B.Example.com./x"] {
        h.call(json!({ "url": url })).await.unwrap();
    }
    assert_eq!(h.connector.connect_count(), 2);
    for host in [
        "example.com",
        "badexample.com",
        "example.com.evil.net",
        "93.184.216.34",
    ] {
        let err = h
            .call(json!({ "url": format!("http://{host}/") }))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("request refused: the host `{host}` is not on the allowlist; allowed hosts: *.example.com")
        );
    }
    assert_eq!(h.connector.connect_count(), 2);
    // An empty allowlist allows nothing.
    let (resolver, connector) = public_site();
    let h = Harness::new(HttpRequestConfig::default(), resolver, connector);
    let err = h
        .call(json!({"url": "http://api.example.com/"}))
        .await
        .unwrap_err();
    assert!(err.to_string().ends_with("allowed hosts: none"), "{err}");
}

#[tokio::test]
async fn redirect_to_loopback_is_refused_before_second_connection() {
    let resolver = FakeResolver::default().with("api.example.com", &[PUBLIC]);
    let connector = MemoryConnector::default()
        .serve(PUBLIC, |_| redirect(302, "http://127.0.0.1/admin"))
        .serve("127.0.0.1", |_| reply(200, "internal secrets"));
    // Even with 127.0.0.1 on the allowlist, the address policy stops the hop.
    let h = Harness::new(
        config(&["api.example.com", "127.0.0.1"]),
        resolver,
        connector,
    );
    let err = h
        .call(json!({"url": "http://api.example.com/"}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "refused");
    assert!(
        err.to_string()
            .contains("`127.0.0.1` is a loopback address"),
        "{err}"
    );
    assert_eq!(h.connector.connect_count(), 1);

    // Same through a name that resolves to loopback, and through decimal form.
    for location in ["http://sneaky.example.org/", "http://2130706433:8080/"] {
        let resolver = FakeResolver::default()
            .with("api.example.com", &[PUBLIC])
            .with("sneaky.example.org", &["127.0.0.1"]);
        let loc = location.to_owned();
        let connector = MemoryConnector::default().serve(PUBLIC, move |_| redirect(307, &loc));
        let h = Harness::new(
            config(&["api.example.com", "sneaky.example.org", "127.0.0.1"]),
            resolver,
            connector,
        );
        let err = h
            .call(json!({"url": "http://api.example.com/"}))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{location}: {err}");
        assert_eq!(h.connector.connect_count(), 1);
    }
}

#[tokio::test]
async fn redirect_to_other_host_or_scheme_is_refused_before_second_connection() {
    let resolver = FakeResolver::default()
        .with("api.example.com", &[PUBLIC])
        .with("evil.net", &[OTHER_PUBLIC]);
    let connector = MemoryConnector::default()
        .serve(PUBLIC, |s| match s.target.as_str() {
            "/https" => redirect(301, "https://api.example.com/"),
            "/file" => redirect(301, "file:///etc/passwd"),
            "/userinfo" => redirect(301, "http://api.example.com@evil.net/"),
            _ => redirect(301, "http://evil.net/steal"),
        })
        .serve(OTHER_PUBLIC, |_| reply(200, "evil"));
    let h = Harness::new(config(&["api.example.com"]), resolver, connector);
    let cases = [
        ("/", "the host `evil.net` is not on the allowlist"),
        ("/https", "https is not supported yet"),
        ("/file", "only http://"),
        ("/userinfo", "user name or password"),
    ];
    for (i, (path, want)) in cases.iter().enumerate() {
        let err = h
            .call(json!({ "url": format!("http://api.example.com{path}") }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "refused", "{path}: {err}");
        assert!(err.to_string().contains(want), "{path}: {err}");
        assert_eq!(h.connector.connect_count(), i + 1, "{path}");
    }
    assert!(h
        .connector
        .seen()
        .iter()
        .all(|s| s.addr.ip().to_string() == PUBLIC));
}

#[tokio::test]
async fn redirects_are_followed_up_to_the_limit() {
    let resolver = FakeResolver::default()
        .with("api.example.com", &[PUBLIC])
        .with("cdn.example.com", &[OTHER_PUBLIC]);
    let connector = MemoryConnector::default()
        .serve(PUBLIC, |s| match s.target.as_str() {
            "/start" => redirect(301, "/a/b"),
            "/a/b" => redirect(308, "c?q=1"),
            "/a/c?q=1" => redirect(302, "http://cdn.example.com/final"),
            "/loop" => redirect(302, "/loop"),
            other => reply(404, format!("no {other}")),
        })
        .serve(OTHER_PUBLIC, |s| {
            reply(200, format!("final at {}", s.target))
        });
    let h = Harness::new(config(&["*.example.com"]), resolver, connector);
    let out = h
        .call(json!({"url": "http://api.example.com/start"}))
        .await
        .unwrap();
    assert!(
        out.text
            .starts_with("HTTP 200 OK\nurl: http://cdn.example.com/final (after 3 redirects)\n"),
        "{}",
        out.text
    );
    assert!(out.text.ends_with("final at /final"));
    assert_eq!(h.connector.connect_count(), 4);

    let err = h
        .call(json!({"url": "http://api.example.com/loop"}))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "request failed: too many redirects (the limit is 3)"
    );
    assert_eq!(h.connector.connect_count(), 4 + 4);
}

#[tokio::test]
async fn post_body_is_sent_and_303_turns_it_into_get() {
    let resolver = FakeResolver::default().with("api.example.com", &[PUBLIC]);
    let connector = MemoryConnector::default().serve(PUBLIC, |s| match s.target.as_str() {
        "/submit" => redirect(303, "/done"),
        "/keep" if s.method == "POST" => redirect(307, "/echo"),
        _ => reply(
            200,
            format!(
                "{} {} {}",
                s.method,
                s.header("content-type").unwrap_or("-"),
                String::from_utf8_lossy(&s.body)
            ),
        ),
    });
    let h = Harness::new(config(&["api.example.com"]), resolver, connector);
    let body = r#"{"query": "kiln"}"#;
    let out = h
        .call(json!({
            "url": "http://api.example.com/echo",
            "method": "post",
            "body": body,
            "headers": {"Content-Type": "application/json"}
        }))
        .await
        .unwrap();
    assert!(
        out.text
            .ends_with(&format!("\n\nPOST application/json {body}")),
        "{}",
        out.text
    );
    let seen = h.connector.seen();
    assert_eq!(seen[0].body, body.as_bytes());
    assert_eq!(seen[0].header("content-length"), Some("17"));

    let out = h
        .call(json!({"url": "http://api.example.com/submit", "method": "POST", "body": "x=1"}))
        .await
        .unwrap();
    assert!(out.text.ends_with("\n\nGET - "), "{}", out.text);

    let out = h
        .call(json!({"url": "http://api.example.com/keep", "method": "POST", "body": "x=2"}))
        .await
        .unwrap();
    assert!(out.text.ends_with("\n\nPOST - x=2"), "{}", out.text);
}

#[tokio::test]
async fn secret_header_goes_only_to_its_host_and_never_back_to_the_model() {
    let resolver = FakeResolver::default()
        .with("api.example.com", &[PUBLIC])
        .with("cdn.example.com", &[OTHER_PUBLIC]);
    // Both servers echo the request headers back, as httpbin would.
    let echo = |s: &Seen| {
        let mut body = String::new();
        for (n, v) in &s.headers {
            body.push_str(&format!("{n}: {v}\n"));
        }
        if s.target == "/bounce" {
            let mut r = redirect(302, "http://cdn.example.com/echo");
            r.body = body.into_bytes();
            return r;
        }
        reply(200, body)
    };
    let connector = MemoryConnector::default()
        .serve(PUBLIC, echo)
        .serve(OTHER_PUBLIC, echo);
    let mut cfg = config(&["*.example.com"]);
    cfg.secret_headers
        .push(SecretHeader::new("api.example.com", "Authorization", SECRET).unwrap());
    let h = Harness::new(cfg, resolver, connector);

    let out = h
        .call(json!({"url": "http://api.example.com/echo"}))
        .await
        .unwrap();
    assert_eq!(h.connector.seen()[0].header("authorization"), Some(SECRET));
    assert!(!out.text.contains(SECRET), "{}", out.text);
    assert!(!out.text.contains("sk-live"), "{}", out.text);
    assert!(
        out.text.contains("authorization: [REDACTED]"),
        "{}",
        out.text
    );

    // The model cannot override the operator's secret for that host.
    h.call(
        json!({"url": "http://api.example.com/echo", "headers": {"Authorization": "Bearer mine"}}),
    )
    .await
    .unwrap();
    assert_eq!(h.connector.seen()[1].header("authorization"), Some(SECRET));

    // A redirect to another allowed host does not carry the secret along.
    let out = h
        .call(json!({"url": "http://api.example.com/bounce"}))
        .await
        .unwrap();
    let seen = h.connector.seen();
    assert_eq!(seen[2].header("authorization"), Some(SECRET));
    assert_eq!(seen[3].addr.ip().to_string(), OTHER_PUBLIC);
    assert_eq!(seen[3].header("authorization"), None);
    assert!(!out.text.contains("sk-live"));

    // Errors and Debug output never show it.
    let err = h
        .call(json!({"url": "http://api.example.com/x", "headers": {"Host": "evil"}}))
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("sk-live"));
    assert!(!format!("{err:?}").contains("sk-live"));
    let debug = format!("{:?}", h.tool);
    assert!(!debug.contains("sk-live"), "{debug}");
    assert!(debug.contains("[REDACTED]"), "{debug}");
}

#[tokio::test]
async fn huge_body_is_cut_at_the_limit() {
    let resolver = FakeResolver::default().with("api.example.com", &[PUBLIC]);
    let connector =
        MemoryConnector::default().serve(PUBLIC, |_| reply(200, vec![b'a'; 1024 * 1024]));
    let h = Harness::new(config(&["api.example.com"]), resolver, connector);
    let out = h
        .call(json!({"url": "http://api.example.com/big"}))
        .await
        .unwrap();
    assert!(out.truncated);
    let (head, body) = out.text.split_once("\n\n").unwrap();
    assert!(
        head.contains("note: the body was cut off at 65536 bytes"),
        "{head}"
    );
    assert_eq!(body.len(), 64 * 1024);
    assert!(body.bytes().all(|b| b == b'a'));

    let mut cfg = config(&["api.example.com"]);
    cfg.max_response_bytes = 10;
    let resolver = FakeResolver::default().with("api.example.com", &[PUBLIC]);
    let connector = MemoryConnector::default().serve(PUBLIC, |_| reply(200, "0123456789"));
    let h = Harness::new(cfg, resolver, connector);
    let out = h
        .call(json!({"url": "http://api.example.com/"}))
        .await
        .unwrap();
    assert!(!out.truncated, "exactly at the limit is complete");
    assert!(out.text.ends_with("\n\n0123456789"));
}

#[tokio::test]
async fn non_utf8_body_is_decoded_lossily_with_a_note() {
    let resolver = FakeResolver::default().with("api.example.com", &[PUBLIC]);
    let connector = MemoryConnector::default()
        .serve(PUBLIC, |_| reply(200, vec![b'o', b'k', 0xff, 0xfe, b'!']));
    let h = Harness::new(config(&["api.example.com"]), resolver, connector);
    let out = h
        .call(json!({"url": "http://api.example.com/bin"}))
        .await
        .unwrap();
    assert!(
        out.text.contains("note: the body is not valid UTF-8"),
        "{}",
        out.text
    );
    assert!(
        out.text.ends_with("\n\nok\u{fffd}\u{fffd}!"),
        "{}",
        out.text
    );
}

#[tokio::test]
async fn slow_server_times_out() {
    let resolver = FakeResolver::default().with("api.example.com", &[PUBLIC]);
    let connector = MemoryConnector::default().serve(PUBLIC, |_| Reply {
        delay: Duration::from_secs(30),
        ..reply(200, "late")
    });
    let mut cfg = config(&["api.example.com"]);
    cfg.timeout = Duration::from_millis(200);
    let h = Harness::new(cfg, resolver, connector);
    let started = std::time::Instant::now();
    let err = h
        .call(json!({"url": "http://api.example.com/"}))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "timed out after 200ms");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn connect_and_resolve_failures_are_reported() {
    let resolver = FakeResolver::default().with("down.example.com", &[OTHER_PUBLIC]);
    let h = Harness::new(
        config(&["*.example.com"]),
        resolver,
        MemoryConnector::default(),
    );
    let err = h
        .call(json!({"url": "http://down.example.com/"}))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "request failed: could not connect to `down.example.com`: refused"
    );
    let err = h
        .call(json!({"url": "http://nx.example.com/"}))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "request failed: could not resolve `nx.example.com`: no such host"
    );
}

#[tokio::test]
async fn bad_arguments_are_refused_before_any_connection() {
    let (resolver, connector) = public_site();
    let h = Harness::new(config(&["api.example.com"]), resolver, connector);
    let url = "http://api.example.com/";
    let cases = [
        (
            json!({"url": "https://api.example.com/"}),
            "https is not supported yet",
        ),
        (
            json!({"url": "http://user:pw@api.example.com/"}),
            "user name or password",
        ),
        (json!({"url": "gopher://api.example.com/"}), "only http://"),
        (json!({"url": "api.example.com"}), "must be absolute"),
        (
            json!({"url": url, "method": "DELETE"}),
            "method `DELETE` is not allowed; use GET or POST",
        ),
        (
            json!({"url": url, "body": "x"}),
            "a body can only be sent with method POST",
        ),
        (
            json!({"url": url, "headers": {"Host": "127.0.0.1"}}),
            "the header `Host` cannot be set",
        ),
        (
            json!({"url": url, "headers": {"Transfer-Encoding": "chunked"}}),
            "cannot be set",
        ),
        (
            json!({"url": url, "headers": {"Connection": "upgrade"}}),
            "cannot be set",
        ),
        (
            json!({"url": url, "headers": {"X-A": "a\r\nX-B: b"}}),
            "characters that are not allowed",
        ),
        (
            json!({"url": url, "headers": {"bad name": "v"}}),
            "not a valid header name",
        ),
        (
            json!({"url": url, "headers": {"X-A": 1}}),
            "invalid arguments",
        ),
        (json!({"url": url, "extra": true}), "unknown field `extra`"),
        (json!({}), "missing field `url`"),
    ];
    for (args, want) in cases {
        let err = h.call(args.clone()).await.unwrap_err();
        assert!(err.to_string().contains(want), "{args}: {err}");
    }
    assert_eq!(h.connector.connect_count(), 0);
}
