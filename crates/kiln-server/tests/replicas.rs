//! Two `kiln serve` replicas on one PostgreSQL (`KILN_TEST_PG_URL`, started
//! by `scripts/pg.sh`): one budget and one rate limit between them, a
//! revocation seen by both, and a replica killed mid-load whose open calls
//! the other settles once its lease lapses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{completion_body, ensure, received_usage, request, Checks, Server, CHAT_MODEL};
use kiln_store::billing::Billing as _;
use kiln_store::{CallLog as _, PgStore, UsageQuery};
use serde_json::{json, Value};

/// A fresh schema in the test database, dropped afterwards.
struct Schema {
    admin_url: String,
    name: String,
}

impl Schema {
    fn new() -> Option<Schema> {
        let url = match std::env::var("KILN_TEST_PG_URL") {
            Ok(u) if !u.is_empty() => u,
            _ if std::env::var("KILN_SKIP_PG").as_deref() == Ok("1") => return None,
            _ => panic!("KILN_TEST_PG_URL is not set: run `eval \"$(scripts/pg.sh start)\"` and export it (or KILN_SKIP_PG=1)"),
        };
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        c.batch_execute(&format!("CREATE SCHEMA {name}"))
            .expect("schema");
        Some(Schema {
            admin_url: url,
            name,
        })
    }

    fn url(&self) -> String {
        let sep = if self.admin_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{sep}options=-csearch_path%3D{}",
            self.admin_url, self.name
        )
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin_url, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

fn call(
    port: u16,
    key: &str,
    method: &str,
    path: &str,
    body: &Value,
    id: &str,
) -> Result<common::Response> {
    let auth = format!("Bearer {key}");
    request(
        port,
        method,
        path,
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
            ("X-Request-Id", id),
        ],
        body.to_string().as_bytes(),
    )
}

fn admin(port: u16, key: &str, method: &str, path: &str, body: Value) -> Result<Value> {
    let r = call(port, key, method, path, &body, "admin")?;
    ensure((200..300).contains(&r.status), || {
        format!("{method} {path}: {} {}", r.status, r.text())
    })?;
    r.json()
}

/// Tenant (with optional grant) and a member key with optional limits.
fn tenant(
    port: u16,
    admin_key: &str,
    name: &str,
    grant: Option<&str>,
    key_limits: Value,
) -> Result<(String, String, String)> {
    let t = admin(
        port,
        admin_key,
        "POST",
        "/api/tenants",
        json!({"name": name}),
    )?;
    let tid = t["id"].as_str().context("id")?.to_string();
    if let Some(g) = grant {
        admin(
            port,
            admin_key,
            "POST",
            &format!("/api/tenants/{tid}/credits"),
            json!({"amount": g, "kind": "grant"}),
        )?;
    }
    let mut body = json!({"tenant_id": tid, "name": "k"});
    if let (Some(b), Some(l)) = (body.as_object_mut(), key_limits.as_object()) {
        b.extend(l.clone());
    }
    let k = admin(port, admin_key, "POST", "/api/keys", body)?;
    Ok((
        tid,
        k["key"]["id"].as_str().context("key id")?.to_string(),
        k["secret"].as_str().context("secret")?.to_string(),
    ))
}

#[test]
fn two_replicas_share_budgets_limits_and_recovery() {
    let Some(schema) = Schema::new() else {
        return;
    };
    let url = schema.url();
    let envs = [("KILN_LEASE_SECONDS", "2")];
    let args = ["--model", CHAT_MODEL, "--database", url.as_str()];
    let data = Arc::new(tempfile::tempdir().unwrap());
    let mut a = Server::start_with(data.clone(), &args, &envs).expect("replica A starts");
    let b = Server::start_with(data.clone(), &args, &envs).expect("replica B starts");
    let admin_key = a
        .admin_key
        .clone()
        .expect("the first replica prints the admin key");
    ensure(b.admin_key.is_none(), || {
        "the second replica made another admin key".into()
    })
    .unwrap();
    let db = PgStore::connect(&url, 2).expect("store");
    let ports = [a.port, b.port];
    let mut c = Checks::new();

    c.run("prices set on one replica apply on both", || {
        admin(
            b.port,
            &admin_key,
            "PUT",
            &format!("/api/prices/{CHAT_MODEL}"),
            json!({"input": "1", "output": "2"}),
        )
        .map(|_| ())
    });

    c.run(
        "50 concurrent requests over two replicas never overspend",
        || {
            let (tid, _, key) = tenant(a.port, &admin_key, "budget", Some("0.0005"), json!({}))?;
            let answers = Arc::new(Mutex::new(Vec::new()));
            let threads: Vec<_> = (0..50)
                .map(|i| {
                    let (key, answers) = (key.clone(), answers.clone());
                    let port = ports[i % 2];
                    std::thread::spawn(move || {
                        let r = call(
                            port,
                            &key,
                            "POST",
                            "/v1/completions",
                            &completion_body(20, false),
                            &format!("b-{i}"),
                        );
                        let got = r.map(|r| {
                            (
                                r.status,
                                r.json()
                                    .ok()
                                    .and_then(|b| b["error"]["code"].as_str().map(str::to_string)),
                            )
                        });
                        answers.lock().unwrap().push(got.map_err(|e| e.to_string()));
                    })
                })
                .collect();
            for t in threads {
                t.join().map_err(|_| anyhow::anyhow!("client panicked"))?;
            }
            let mut ok = 0;
            for a in answers.lock().unwrap().iter() {
                match a {
                    Ok((200, _)) => ok += 1,
                    Ok((429, Some(code))) if code == "insufficient_quota" => {}
                    other => bail!("unexpected {other:?}"),
                }
            }
            ensure(ok >= 10, || format!("only {ok} admitted"))?;
            let spent: i64 = db
                .usage(&UsageQuery {
                    tenant_id: Some(tid.clone()),
                    ..UsageQuery::default()
                })?
                .iter()
                .map(|r| r.cost.nanos())
                .sum();
            let budget = db.budget(&tid, None)?.context("budget")?;
            let balance = budget.balance.context("balance")?.nanos();
            ensure(
                balance >= 0 && balance == 500_000 - spent && budget.reserved.nanos() == 0,
                || format!("balance {balance}, spent {spent}, {budget:?}"),
            )
        },
    );

    c.run("one rate limit across both replicas", || {
        let (_, _, key) = tenant(
            a.port,
            &admin_key,
            "limited",
            None,
            json!({"requests_per_minute": 4}),
        )?;
        let mut statuses = Vec::new();
        for i in 0..6 {
            let r = call(
                ports[i % 2],
                &key,
                "POST",
                "/v1/completions",
                &completion_body(2, false),
                &format!("r-{i}"),
            )?;
            statuses.push(r.status);
        }
        let ok = statuses.iter().filter(|s| **s == 200).count();
        let limited = statuses.iter().filter(|s| **s == 429).count();
        ensure(ok == 4 && limited == 2, || format!("{statuses:?}"))
    });

    c.run(
        "a key revoked on one replica is refused by the other within a second",
        || {
            let (_, kid, key) = tenant(a.port, &admin_key, "revoked", None, json!({}))?;
            let r = call(b.port, &key, "GET", "/v1/models", &json!({}), "pre")?;
            ensure(r.status == 200, || r.text())?;
            admin(
                a.port,
                &admin_key,
                "POST",
                &format!("/api/keys/{kid}/revoke"),
                json!({}),
            )?;
            let revoked = Instant::now();
            loop {
                let r = call(b.port, &key, "GET", "/v1/models", &json!({}), "post")?;
                if r.status == 401 {
                    return Ok(());
                }
                if revoked.elapsed() > Duration::from_secs(1) {
                    bail!("replica B still accepted the key after 1 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        },
    );

    // Load on both replicas, then SIGKILL replica A in the middle of it.
    let (tid, _, key) = tenant(a.port, &admin_key, "load", None, json!({})).expect("tenant");
    let received: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    // Kill once enough responses completed (a slow machine gets longer).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load_started = Instant::now();
    let clients: Vec<_> = (0..6)
        .map(|t| {
            let (key, received, stop) = (key.clone(), received.clone(), stop.clone());
            let port = ports[t % 2];
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let stream = i % 2 == 1;
                    let id = format!("load-{t}-{i}");
                    i += 1;
                    let Ok(r) = call(
                        port,
                        &key,
                        "POST",
                        "/v1/completions",
                        &completion_body(16, stream),
                        &id,
                    ) else {
                        break;
                    };
                    if let Some(u) = received_usage(&r, stream) {
                        received.lock().unwrap().insert(id, u);
                    }
                }
            })
        })
        .collect();
    while load_started.elapsed() < Duration::from_secs(120)
        && (load_started.elapsed() < Duration::from_secs(2)
            || received.lock().map(|m| m.len()).unwrap_or(0) < 12)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    a.kill9().expect("SIGKILL replica A");
    // The other replica (if any) keeps serving the clients for a moment.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Release);
    for t in clients {
        let _ = t.join();
    }
    let received = received.lock().unwrap().clone();

    c.run("the surviving replica settles the dead one's calls", || {
        common::wait_until_settled(&db, Duration::from_secs(20))
    });
    c.run(
        "every response received in full is in the ledger, once",
        || {
            let rows = db.recent_calls(Some(&tid), 100_000)?;
            common::received_are_in_ledger(&received, &rows, 16)?;
            let spent: i64 = rows.iter().map(|r| r.record.cost.nanos()).sum();
            let b = db.budget(&tid, None)?.context("budget")?;
            ensure(
                b.spent_this_month.nanos() == spent && b.reserved.nanos() == 0,
                || format!("{b:?} vs {spent}"),
            )
        },
    );
    drop(b);
    c.finish();
}

/// Polls a document through `port` until its ingestion is over.
fn wait_ready(port: u16, key: &str, kb: &str, doc: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let d = admin(
            port,
            key,
            "GET",
            &format!("/api/kbs/{kb}/documents/{doc}"),
            Value::Null,
        )?;
        if !matches!(d["status"].as_str(), Some("queued" | "ingesting")) {
            return Ok(d);
        }
        ensure(Instant::now() < deadline, || {
            format!("still ingesting: {d}")
        })?;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A knowledge base lives on the replica that created it; the other
/// replica finds it in the database's directory and forwards every call
/// (uploads, searches, answers through the chat API) there, where it is
/// authenticated and metered once.
#[test]
fn a_knowledge_base_is_reached_through_either_replica() {
    let Some(schema) = Schema::new() else {
        return;
    };
    let url = schema.url();
    let data = Arc::new(tempfile::tempdir().unwrap());
    let (kb_a, kb_b) = (data.path().join("kb-a"), data.path().join("kb-b"));
    let replica = |kb_dir: &std::path::Path| {
        let args = [
            "--model",
            CHAT_MODEL,
            "--embedding-model",
            common::EMBEDDING_MODEL,
            "--database",
            url.as_str(),
            "--kb-dir",
            kb_dir.to_str().unwrap(),
            "--advertise-url",
            "http://127.0.0.1",
        ];
        Server::start_with(data.clone(), &args, &[])
    };
    let mut a = replica(&kb_a).expect("replica A starts");
    let b = replica(&kb_b).expect("replica B starts");
    let admin_key = a.admin_key.clone().expect("admin key");
    let (_, key_id, key) = tenant(
        a.port,
        &admin_key,
        "library",
        None,
        json!({"role": "tenant_admin"}),
    )
    .expect("tenant");
    let (_, _, outsider) = tenant(
        b.port,
        &admin_key,
        "elsewhere",
        None,
        json!({"role": "tenant_admin"}),
    )
    .expect("other tenant");
    let mut c = Checks::new();

    c.run("names are unique across replicas", || {
        admin(
            a.port,
            &key,
            "POST",
            "/api/kbs",
            json!({"name": "handbook"}),
        )?;
        let again = call(
            b.port,
            &key,
            "POST",
            "/api/kbs",
            &json!({"name": "handbook"}),
            "dup",
        )?;
        again.expect_error(409, "conflict").map(|_| ())
    });

    c.run(
        "an upload through B is ingested on A and metered once",
        || {
            let auth = format!("Bearer {key}");
            let r = request(
                b.port,
                "POST",
                "/api/kbs/handbook/documents?name=leave.md",
                &[("Authorization", &auth)],
                b"# Leave\nEvery employee receives twenty-five days of paid vacation per year.\n",
            )?;
            ensure(r.status == 202, || format!("{} {}", r.status, r.text()))?;
            let doc = r.json()?["id"].as_str().context("doc id")?.to_string();
            let d = wait_ready(b.port, &key, "handbook", &doc)?;
            ensure(d["status"] == "ready", || d.to_string())?;
            ensure(
                std::fs::read_dir(&kb_a)?.count() == 1 && std::fs::read_dir(&kb_b)?.count() == 0,
                || "the files are not only on A".into(),
            )?;
            let ledger = admin(
                a.port,
                &admin_key,
                "GET",
                "/api/ledger?limit=1000",
                Value::Null,
            )?;
            let ingest = ledger["data"]
                .as_array()
                .context("ledger")?
                .iter()
                .filter(|r| r["key_id"] == key_id.as_str() && r["endpoint"] == "/api/kbs/ingest")
                .count();
            ensure(ingest == 1, || format!("{ingest} ingestion rows: {ledger}"))
        },
    );

    c.run("B lists, searches and answers from A's knowledge base", || {
        let list = admin(b.port, &key, "GET", "/api/kbs", Value::Null)?;
        let kbs = list["data"].as_array().context("data")?;
        ensure(
            kbs.len() == 1 && kbs[0]["name"] == "handbook" && kbs[0]["documents"] == 1,
            || list.to_string(),
        )?;
        let hits = admin(
            b.port,
            &key,
            "POST",
            "/api/kbs/handbook/search",
            json!({"query": "paid vacation days", "k": 3}),
        )?;
        ensure(hits["data"][0]["document_name"] == "leave.md", || hits.to_string())?;
        let answer = admin(
            b.port,
            &key,
            "POST",
            "/v1/chat/completions",
            json!({"model": "kb:handbook", "max_tokens": 24,
                   "messages": [{"role": "user", "content": "How many vacation days do employees get?"}]}),
        )?;
        ensure(answer["object"] == "chat.completion", || answer.to_string())?;
        ensure(answer["knowledge_base"].is_object(), || answer.to_string())
    });

    c.run(
        "another tenant cannot tell it exists through either replica",
        || {
            for port in [a.port, b.port] {
                let r = call(
                    port,
                    &outsider,
                    "POST",
                    "/api/kbs/handbook/search",
                    &json!({"query": "vacation"}),
                    "o",
                )?;
                r.expect_error(404, "not_found")?;
                let list = admin(port, &outsider, "GET", "/api/kbs", Value::Null)?;
                ensure(list["data"] == json!([]), || list.to_string())?;
            }
            Ok(())
        },
    );

    c.run(
        "a workflow run on B searches A's knowledge base as its key",
        || {
            let workflow = json!({
                "name": "lookup",
                "inputs": {"q": {"type": "string"}},
                "steps": [{"id": "docs", "kind": "retrieve", "knowledge_base": "handbook",
                           "query": "{{ inputs.q }}", "top_k": 2}],
                "output": "{{ steps.docs.output[0].document }}",
            });
            admin(b.port, &key, "POST", "/api/workflows", workflow)?;
            let run = admin(
                b.port,
                &key,
                "POST",
                "/api/runs",
                json!({"workflow": "lookup", "input": {"q": "paid vacation days"}, "wait": true}),
            )?;
            ensure(run["status"] == "succeeded", || run.to_string())?;
            ensure(run["result"]["output"] == "leave.md", || run.to_string())
        },
    );

    c.run(
        "replicas refuse a search that is not signed with the cluster secret",
        || {
            let body = json!({"tenant_id": "t", "key_id": null, "knowledge_base": "handbook",
                          "query": "vacation", "k": 2, "issued_at_ms": 0})
            .to_string();
            for signature in [None, Some("00".repeat(32))] {
                let mut headers = vec![("Content-Type", "application/json")];
                if let Some(s) = &signature {
                    headers.push(("x-kiln-signature", s.as_str()));
                }
                let r = request(
                    a.port,
                    "POST",
                    "/internal/kb-search",
                    &headers,
                    body.as_bytes(),
                )?;
                ensure(r.status == 403, || format!("{} {}", r.status, r.text()))?;
            }
            Ok(())
        },
    );

    a.kill9().expect("SIGKILL replica A");
    c.run(
        "with A gone, a run on B fails its search step saying so",
        || {
            let run = admin(
                b.port,
                &key,
                "POST",
                "/api/runs",
                json!({"workflow": "lookup", "input": {"q": "vacation"}, "wait": true}),
            )?;
            ensure(run["status"] == "failed", || run.to_string())?;
            let error = run["error"].as_str().unwrap_or_default();
            ensure(
                error.contains("step `docs`") && error.contains("could not search it"),
                || run.to_string(),
            )
        },
    );
    c.run(
        "with A gone, B says the knowledge base cannot be reached",
        || {
            let r = call(
                b.port,
                &key,
                "POST",
                "/api/kbs/handbook/search",
                &json!({"query": "vacation"}),
                "gone",
            )?;
            let message = r.expect_error(503, "service_unavailable")?;
            ensure(message.contains("cannot be reached"), || message)?;
            let list = admin(b.port, &key, "GET", "/api/kbs", Value::Null)?;
            ensure(list["data"][0]["unavailable"].is_string(), || {
                list.to_string()
            })
        },
    );
    c.finish();
}

/// A TCP relay in front of PostgreSQL that the test can cut: while it is
/// down, open connections are shut and new ones closed at once, as when the
/// database server goes away.
struct Relay {
    port: u16,
    down: Arc<std::sync::atomic::AtomicBool>,
    open: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start(target: std::net::SocketAddr) -> Result<Relay> {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (d, o) = (down.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    let mut list = o.lock().unwrap();
                    list.push(c2);
                    list.push(s2);
                }
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    pipe(c2, s2);
                }
                pipe(server, client);
            }
        });
        Ok(Relay { port, down, open })
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// PostgreSQL going away under a running server: calls are refused with a
/// clear 503 and nothing is served unmetered; once it is back, service
/// resumes without a restart and every call served is in the ledger.
#[test]
fn a_database_that_goes_away_refuses_then_recovers() {
    let Some(schema) = Schema::new() else {
        return;
    };
    let config: postgres::Config = schema.admin_url.parse().expect("url");
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        _ => panic!("KILN_TEST_PG_URL must name a TCP host"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let target = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .expect("address")
        .next()
        .expect("address");
    let relay = Relay::start(target).expect("relay");
    let url = schema
        .url()
        .replacen(&format!(":{port}/"), &format!(":{}/", relay.port), 1);
    assert!(url.contains(&format!(":{}/", relay.port)), "{url}");
    let data = Arc::new(tempfile::tempdir().unwrap());
    let args = ["--model", CHAT_MODEL, "--database", url.as_str()];
    let s = Server::start_with(data, &args, &[]).expect("server starts");
    let key = s.admin_key.clone().expect("admin key");
    let db = PgStore::connect(&schema.url(), 1).expect("store");
    let body = completion_body(4, false);
    let generated = || s.metric("kiln_completion_tokens_total").unwrap_or(0.0);
    let mut c = Checks::new();

    c.run("served while the database is there", || {
        let r = call(s.port, &key, "POST", "/v1/completions", &body, "pg-up-1")?;
        ensure(r.status == 200, || r.text())
    });
    c.run("refused while it is gone, nothing served unmetered", || {
        let before = generated();
        relay.set_down(true);
        for id in ["pg-down-1", "pg-down-2", "pg-down-3"] {
            let r = call(s.port, &key, "POST", "/v1/completions", &body, id)?;
            let message = r.expect_error(503, "ledger_unavailable")?;
            ensure(
                r.header("retry-after").is_some() && message.contains("ledger"),
                || message.clone(),
            )?;
        }
        ensure(generated() == before, || {
            format!("{} tokens were generated unmetered", generated() - before)
        })
    });
    c.run("served and metered again once it is back", || {
        relay.set_down(false);
        let r = call(s.port, &key, "POST", "/v1/completions", &body, "pg-up-2")?;
        ensure(r.status == 200, || r.text())?;
        let rows = db.recent_calls(None, 50)?;
        for id in ["pg-up-1", "pg-up-2"] {
            ensure(
                rows.iter()
                    .any(|r| r.record.request_id == id && r.record.completion_tokens > 0),
                || format!("{id} is not in the ledger: {rows:?}"),
            )?;
        }
        ensure(
            !rows.iter().any(|r| {
                r.record.request_id.starts_with("pg-down") && r.record.completion_tokens > 0
            }),
            || format!("{rows:?}"),
        )
    });
    drop(s);
    c.finish();
}
