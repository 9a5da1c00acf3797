//! Upstream backends against the real binary: `kiln serve` proxies to a small
//! OpenAI-compatible server run by this test (vLLM and SGLang cannot run on
//! this machine). The model name picks the mock's behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::{ensure, request, Checks, Server, CHAT_MODEL};
use kiln_store::{CallLog as _, Outcome};
use serde_json::{json, Value};

const WORDS: [&str; 5] = ["The", " sky", " is", " blue", "."];

fn usage(model: &str) -> Value {
    let mut u = json!({"prompt_tokens": 12, "completion_tokens": WORDS.len(), "total_tokens": 12 + WORDS.len()});
    if model == "mock-cached" {
        // As vLLM and SGLang report a prefix-cache hit.
        u["prompt_tokens_details"] = json!({"cached_tokens": 8});
    }
    u
}

fn chunk(delta: &str, finish: Option<&str>) -> String {
    let c = json!({"object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": finish}]});
    format!("data: {c}\n\n")
}

async fn chat(Json(body): Json<Value>) -> Response {
    let model = body["model"].as_str().unwrap_or_default().to_string();
    match model.as_str() {
        "mock-500" => {
            return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()
        }
        "mock-400" => {
            let e = json!({"error": {"message": "temperature too high", "type": "invalid_request_error", "param": "temperature", "code": null}});
            return (axum::http::StatusCode::BAD_REQUEST, Json(e)).into_response();
        }
        "mock-hang" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        _ => {}
    }
    let with_usage = model != "mock-nousage";
    if body["stream"].as_bool() != Some(true) {
        let mut out = json!({"id": "chatcmpl-up", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": WORDS.concat()}, "finish_reason": "stop"}]});
        if with_usage {
            out["usage"] = usage(&model);
        }
        return Json(out).into_response();
    }
    let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
    let abort = model == "mock-abort";
    let slow = model == "mock-slow";
    let usage = usage(&model);
    let events = async_stream(move |tx| async move {
        for (i, w) in WORDS.iter().enumerate() {
            let _ = tx.send(chunk(w, None)).await;
            if slow && i == 0 {
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
            if abort && i == 1 {
                return;
            }
        }
        let _ = tx.send(chunk("", Some("stop"))).await;
        if include_usage && with_usage {
            let u = json!({"object": "chat.completion.chunk", "choices": [], "usage": usage});
            let _ = tx.send(format!("data: {u}\n\n")).await;
        }
        let _ = tx.send("data: [DONE]\n\n".to_string()).await;
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(events)
        .unwrap()
}

/// A body fed by a task writing strings into a channel; the body ends when
/// the task returns.
fn async_stream<F, Fut>(f: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<String>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(16);
    tokio::spawn(f(tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|s| (Ok::<Bytes, Infallible>(Bytes::from(s)), rx))
    });
    Body::from_stream(stream)
}

/// Starts the mock on a free port in a background runtime.
fn start_mock() -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let app = Router::new().route("/v1/chat/completions", post(chat));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

fn chat_body(model: &str, stream: bool, include_usage: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "What colour is the sky?"}],
           "stream": stream, "stream_options": {"include_usage": include_usage}})
}

fn ledger_row(s: &Server, request_id: &str) -> Result<kiln_store::LedgerEntry> {
    let db = kiln_store::Store::open(&s.db_path())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = db
            .recent_calls(None, 1000)?
            .into_iter()
            .find(|r| r.record.request_id == request_id)
        {
            return Ok(r);
        }
        if Instant::now() > deadline {
            anyhow::bail!("no ledger row for {request_id}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn post_chat(s: &Server, id: &str, body: &Value) -> Result<common::Response> {
    let auth = format!("Bearer {}", s.admin_key.as_deref().unwrap_or_default());
    request(
        s.port,
        "POST",
        "/v1/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
            ("X-Request-Id", id),
        ],
        body.to_string().as_bytes(),
    )
}

#[test]
fn upstream_backends_are_proxied_and_metered() {
    let mock = start_mock();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    let home = common::test_home();
    let tokenizer = home.join("models").join(CHAT_MODEL).join("model.gguf");
    std::fs::write(
        &config,
        format!(
            "[[upstreams]]\nname = \"mock\"\nbase_url = \"http://127.0.0.1:{mock}/v1\"\n\
             models = [\"mock-ok\", \"mock-cached\", \"mock-500\", \"mock-400\", \"mock-hang\", \"mock-abort\", \"mock-slow\"]\n\
             timeout_seconds = 1\n\n\
             [[upstreams]]\nname = \"counted\"\nbase_url = \"http://127.0.0.1:{mock}/v1\"\n\
             models = [\"mock-nousage\"]\ntokenizer = \"{}\"\n",
            tokenizer.display()
        ),
    )
    .unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]).expect("server starts");
    let s = &server;
    let mut c = Checks::new();

    c.run("prices", || {
        for m in [
            "mock-ok",
            "mock-cached",
            "mock-nousage",
            "mock-abort",
            "mock-slow",
        ] {
            let r = s.call_as(
                s.admin_key.as_deref(),
                "PUT",
                &format!("/api/prices/{m}"),
                Some(&json!({"input": "1", "cached_input": "0.25", "output": "2"})),
            )?;
            ensure(r.status == 200, || r.text())?;
        }
        Ok(())
    });
    c.run("the models list names the upstream models", || {
        let list = s.get("/v1/models")?.json()?;
        let ids: Vec<&str> = list["data"]
            .as_array()
            .context("data")?
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        ensure(
            ids.contains(&"mock-ok") && ids.contains(&"mock-nousage"),
            || list.to_string(),
        )
    });
    c.run("a plain call is charged the upstream's usage", || {
        let r = post_chat(s, "up-plain", &chat_body("mock-ok", false, false))?;
        ensure(
            r.status == 200 && r.json()?["choices"][0]["message"]["content"] == "The sky is blue.",
            || r.text(),
        )?;
        let row = ledger_row(s, "up-plain")?.record;
        ensure(
            row.backend == "mock"
                && row.prompt_tokens == 12
                && row.completion_tokens == 5
                && row.outcome == Outcome::Stop
                && row.cost.nanos() == 12 * 1000 + 5 * 2000,
            || format!("{row:?}"),
        )
    });
    c.run(
        "cached prompt tokens the upstream reports are priced as cached",
        || {
            for (id, stream) in [("up-cached", false), ("up-cached-stream", true)] {
                let r = post_chat(s, id, &chat_body("mock-cached", stream, false))?;
                ensure(r.status == 200, || r.text())?;
                let row = ledger_row(s, id)?.record;
                ensure(
                    row.prompt_tokens == 12
                        && row.cached_tokens == 8
                        && row.completion_tokens == 5
                        && row.cost.nanos() == 4 * 1000 + 8 * 250 + 5 * 2000,
                    || format!("{id}: {row:?}"),
                )?;
            }
            Ok(())
        },
    );
    c.run(
        "a stream passes through, its usage chunk only when asked for",
        || {
            let r = post_chat(s, "up-stream", &chat_body("mock-ok", true, false))?;
            let data = r.sse_data();
            ensure(data.last().map(String::as_str) == Some("[DONE]"), || {
                r.text()
            })?;
            ensure(!r.text().contains("\"usage\""), || r.text())?;
            let row = ledger_row(s, "up-stream")?.record;
            ensure(
                row.prompt_tokens == 12 && row.completion_tokens == 5,
                || format!("{row:?}"),
            )?;
            let r = post_chat(s, "up-stream-usage", &chat_body("mock-ok", true, true))?;
            ensure(r.text().contains("\"usage\""), || r.text())
        },
    );
    c.run("chunks are forwarded as they come, not buffered", || {
        use std::io::Read;
        let started = Instant::now();
        let key = s.admin_key.clone().unwrap_or_default();
        let mut stream = common::open_stream(
            s.port,
            "/v1/chat/completions",
            &chat_body("mock-slow", true, false),
            Some(&key),
        )?;
        let first = started.elapsed();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        // The mock holds the rest back 700 ms after its first chunk: a
        // relay that buffered would deliver the first event with the rest.
        let total = started.elapsed();
        ensure(
            total.saturating_sub(first) >= Duration::from_millis(350),
            || format!("first event after {first:?}, all after {total:?}"),
        )
    });
    c.run(
        "without reported usage, tokens are counted with the tokenizer",
        || {
            let r = post_chat(s, "up-count", &chat_body("mock-nousage", false, false))?;
            ensure(r.status == 200, || r.text())?;
            let row = ledger_row(s, "up-count")?.record;
            // "The sky is blue." is 5 SmolLM2 tokens; the prompt counts the
            // role and content ("user" + the question).
            ensure(
                row.completion_tokens == 5 && row.prompt_tokens > 5 && row.prompt_tokens < 20,
                || format!("{row:?}"),
            )
        },
    );
    c.run(
        "a failing upstream is a 502, recorded and not charged",
        || {
            let r = post_chat(s, "up-500", &chat_body("mock-500", false, false))?;
            r.expect_error(502, "upstream_error")?;
            let row = ledger_row(s, "up-500")?.record;
            ensure(
                row.outcome == Outcome::Error("upstream_error".into()) && row.cost.nanos() == 0,
                || format!("{row:?}"),
            )
        },
    );
    c.run("a slow upstream is a 504, recorded and not charged", || {
        let r = post_chat(s, "up-hang", &chat_body("mock-hang", false, false))?;
        r.expect_error(504, "upstream_timeout")?;
        let row = ledger_row(s, "up-hang")?.record;
        ensure(
            row.outcome == Outcome::Error("upstream_timeout".into())
                && row.cost.nanos() == 0
                && row.completion_tokens == 0,
            || format!("{row:?}"),
        )
    });
    c.run("an upstream's 4xx passes through", || {
        let r = post_chat(s, "up-400", &chat_body("mock-400", false, false))?;
        ensure(
            r.status == 400 && r.json()?["error"]["param"] == "temperature",
            || r.text(),
        )?;
        let row = ledger_row(s, "up-400")?.record;
        ensure(row.outcome == Outcome::Error("upstream_400".into()), || {
            format!("{row:?}")
        })
    });
    c.run(
        "a stream the upstream breaks ends with an error event",
        || {
            let r = post_chat(s, "up-abort", &chat_body("mock-abort", true, false))?;
            let data = r.sse_data();
            ensure(
                data.iter().any(|d| d.contains("upstream_error"))
                    && data.last().map(String::as_str) == Some("[DONE]"),
                || r.text(),
            )?;
            // Charged for what the client received: the prompt (at its
            // byte bound, as this upstream reports no usage and has no
            // tokenizer) and the two chunks streamed before the break.
            let prompt_bound = "userWhat colour is the sky?".len() as u64 + 64;
            let row = ledger_row(s, "up-abort")?.record;
            ensure(
                row.outcome == Outcome::Error("upstream_error".into())
                    && row.prompt_tokens == prompt_bound
                    && row.completion_tokens == 2
                    && row.cost.nanos() == (prompt_bound * 1000 + 2 * 2000) as i64,
                || format!("{row:?}"),
            )
        },
    );
    c.run(
        "a stream the client abandons is charged for what it received",
        || {
            let key = s.admin_key.clone().unwrap_or_default();
            // The mock sends one chunk, then waits 700 ms: leave in between.
            let stream = common::open_stream_as(
                s.port,
                "/v1/chat/completions",
                &chat_body("mock-slow", true, false),
                Some(&key),
                Some("up-abandoned"),
            )?;
            drop(stream);
            let row = ledger_row(s, "up-abandoned")?.record;
            let prompt_bound = "userWhat colour is the sky?".len() as u64 + 64;
            // At least the chunk it read; more if the relay had forwarded
            // others before it saw the connection close.
            ensure(
                row.outcome == Outcome::Cancelled
                    && row.prompt_tokens == prompt_bound
                    && (1..WORDS.len() as u64).contains(&row.completion_tokens)
                    && row.cost.nanos()
                        == (prompt_bound * 1000 + row.completion_tokens * 2000) as i64,
                || format!("{row:?}"),
            )
        },
    );
    c.run("a key is still required", || {
        let r = s.call_as(
            None,
            "POST",
            "/v1/chat/completions",
            Some(&chat_body("mock-ok", false, false)),
        )?;
        r.expect_error(401, "missing_api_key").map(|_| ())
    });
    drop(server);
    c.finish();
}

/// A certificate authority made for one test, and certificates it signs.
struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// A certificate for `names` (DNS names), and its key.
    fn issue(&self, names: &[&str]) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        (params.signed_by(&key, &self.cert, &self.key).unwrap(), key)
    }
}

/// Accepts TLS connections for axum; a failed handshake is dropped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// The mock behind TLS with `ca`'s certificate for `localhost`; with
/// `clients_of`, it asks for a client certificate from that CA. Returns the
/// port and a count of the requests that reached it.
fn start_tls_mock(
    ca: &TestCa,
    clients_of: Option<&TestCa>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let (cert, key) = ca.issue(&["localhost"]);
    let chain = vec![cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let config = match clients_of {
        None => builder.with_no_client_auth(),
        Some(client_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from(client_ca.cert.der().to_vec()))
                .unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    }
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let app = Router::new().route(
                "/v1/chat/completions",
                post(move |body: Json<Value>| {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    chat(body)
                }),
            );
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(tcp.local_addr().unwrap().port()).unwrap();
            axum::serve(TlsListener { tcp, acceptor }, app)
                .await
                .unwrap();
        });
    });
    (rx.recv().unwrap(), hits)
}

#[test]
fn https_upstreams_are_verified_and_metered() {
    let ca = TestCa::new("kiln test CA");
    let stranger = TestCa::new("some other CA");
    let clients = TestCa::new("kiln client CA");
    let (port, hits) = start_tls_mock(&ca, None);
    let (mutual_port, mutual_hits) = start_tls_mock(&ca, Some(&clients));
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca_pem = write("ca.pem", ca.cert.pem());
    let stranger_pem = write("stranger.pem", stranger.cert.pem());
    let (client_cert, client_key) = clients.issue(&["kiln-replica"]);
    let client_pem = write("client.pem", client_cert.pem());
    let client_key = write("client.key", client_key.serialize_pem());
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[[upstreams]]\nname = \"secure\"\nbase_url = \"https://localhost:{port}/v1\"\n\
             models = [\"tls-ok\"]\nca_file = \"{ca_pem}\"\n\n\
             [[upstreams]]\nname = \"stranger\"\nbase_url = \"https://localhost:{port}/v1\"\n\
             models = [\"tls-stranger\"]\nca_file = \"{stranger_pem}\"\n\n\
             [[upstreams]]\nname = \"system\"\nbase_url = \"https://localhost:{port}/v1\"\n\
             models = [\"tls-system\"]\n\n\
             [[upstreams]]\nname = \"by-address\"\nbase_url = \"https://127.0.0.1:{port}/v1\"\n\
             models = [\"tls-address\"]\nca_file = \"{ca_pem}\"\n\n\
             [[upstreams]]\nname = \"mutual\"\nbase_url = \"https://localhost:{mutual_port}/v1\"\n\
             models = [\"tls-mutual\"]\nca_file = \"{ca_pem}\"\n\
             client_cert_file = \"{client_pem}\"\nclient_key_file = \"{client_key}\"\n\n\
             [[upstreams]]\nname = \"anonymous\"\nbase_url = \"https://localhost:{mutual_port}/v1\"\n\
             models = [\"tls-anonymous\"]\nca_file = \"{ca_pem}\"\n"
        ),
    )
    .unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]).expect("server starts");
    let s = &server;
    let mut c = Checks::new();
    let seen = |h: &std::sync::atomic::AtomicUsize| h.load(std::sync::atomic::Ordering::SeqCst);

    c.run("a trusted https upstream answers and is metered", || {
        let r = post_chat(s, "tls-plain", &chat_body("tls-ok", false, false))?;
        ensure(
            r.status == 200 && r.json()?["choices"][0]["message"]["content"] == "The sky is blue.",
            || r.text(),
        )?;
        let row = ledger_row(s, "tls-plain")?.record;
        ensure(
            row.backend == "secure" && row.prompt_tokens == 12 && row.completion_tokens == 5,
            || format!("{row:?}"),
        )?;
        let r = post_chat(s, "tls-stream", &chat_body("tls-ok", true, true))?;
        let data = r.sse_data();
        ensure(
            data.last().map(String::as_str) == Some("[DONE]") && r.text().contains("\"usage\""),
            || r.text(),
        )
    });
    c.run(
        "an untrusted or misnamed certificate is a 502 that says why, and nothing is sent",
        || {
            let before = seen(&hits);
            for (model, id, why) in [
                ("tls-stranger", "tls-stranger", "UnknownIssuer"),
                ("tls-system", "tls-system", "UnknownIssuer"),
                ("tls-address", "tls-address", "not valid for name"),
            ] {
                let r = post_chat(s, id, &chat_body(model, false, false))?;
                let message = r.expect_error(502, "upstream_error")?;
                ensure(
                    message.contains("certificate") && message.contains(why),
                    || format!("{model}: {message}"),
                )?;
                let row = ledger_row(s, id)?.record;
                ensure(
                    row.outcome != Outcome::Stop && row.cost.nanos() == 0,
                    || format!("{row:?}"),
                )?;
            }
            ensure(seen(&hits) == before, || {
                format!("{} requests got through", seen(&hits) - before)
            })
        },
    );
    c.run("mutual TLS: the client certificate is presented", || {
        let r = post_chat(s, "tls-mutual", &chat_body("tls-mutual", false, false))?;
        ensure(r.status == 200, || r.text())?;
        let r = post_chat(
            s,
            "tls-anonymous",
            &chat_body("tls-anonymous", false, false),
        )?;
        r.expect_error(502, "upstream_error")?;
        ensure(seen(&mutual_hits) == 1, || {
            format!(
                "{} requests reached the mutual-TLS mock",
                seen(&mutual_hits)
            )
        })
    });
    c.finish();
}

#[test]
fn a_bad_tls_setting_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    std::fs::write(
        &config,
        format!(
            "[[upstreams]]\nname = \"secure\"\nbase_url = \"https://localhost:1/v1\"\n\
             models = [\"tls-ok\"]\nca_file = \"{}\"\n",
            not_pem.display()
        ),
    )
    .unwrap();
    let out = common::kiln()
        .args(["serve", "--port", "0", "--config", config.to_str().unwrap()])
        .args(["--database", dir.path().join("kiln.db").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("upstream `secure`") && stderr.contains("ca_file"),
        "{stderr}"
    );
}
