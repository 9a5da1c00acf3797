//! Metering against the real binary: budgets under 50 concurrent requests,
//! the ledger after a SIGKILL in the middle of load, and the admin API's
//! roles and refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{
    completion_body, ensure, post_as, received_usage, request, Checks, Server, CHAT_MODEL,
};
use kiln_store::billing::Billing as _;
use kiln_store::{CallLog as _, UsageQuery};
use serde_json::{json, Value};

fn admin(s: &Server, method: &str, path: &str, body: Value) -> Result<Value> {
    let r = s.call_as(s.admin_key.as_deref(), method, path, Some(&body))?;
    ensure((200..300).contains(&r.status), || {
        format!("{method} {path}: {} {}", r.status, r.text())
    })?;
    r.json()
}

/// A tenant with a member key; returns (tenant id, key id, secret).
fn tenant_with_key(
    s: &Server,
    name: &str,
    credit: Option<&str>,
) -> Result<(String, String, String)> {
    let t = admin(s, "POST", "/api/tenants", json!({ "name": name }))?;
    let tid = t["id"].as_str().context("tenant id")?.to_string();
    if let Some(amount) = credit {
        admin(
            s,
            "POST",
            &format!("/api/tenants/{tid}/credits"),
            json!({ "amount": amount, "kind": "grant" }),
        )?;
    }
    let k = admin(
        s,
        "POST",
        "/api/keys",
        json!({ "tenant_id": tid, "name": "load" }),
    )?;
    Ok((
        tid,
        k["key"]["id"].as_str().context("key id")?.to_string(),
        k["secret"].as_str().context("secret")?.to_string(),
    ))
}

/// 50 concurrent requests against a grant that covers 10 worst cases: some
/// are admitted, the rest refused with `insufficient_quota`, and the grant
/// is never overspent.
fn budget_holds_under_50_concurrent(s: &Server) -> Result<()> {
    let (tid, _, key) = tenant_with_key(s, "budget", Some("0.0005"))?;
    let port = s.port;
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let key = key.clone();
            let statuses = statuses.clone();
            std::thread::spawn(move || {
                let r = post_as(
                    port,
                    &key,
                    &format!("budget-{i}"),
                    &completion_body(20, false),
                );
                let got = r.map(|r| {
                    let code = r
                        .json()
                        .ok()
                        .and_then(|b| b["error"]["code"].as_str().map(str::to_string));
                    (r.status, code)
                });
                statuses
                    .lock()
                    .map(|mut v| v.push(got.map_err(|e| e.to_string())))
                    .ok();
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    }
    let statuses = statuses
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut ok = 0;
    for st in &statuses {
        match st {
            Ok((200, _)) => ok += 1,
            Ok((429, Some(code))) if code == "insufficient_quota" => {}
            other => bail!("unexpected answer {other:?}"),
        }
    }
    // Worst case is 10 * 1000 + 20 * 2000 = 50_000 nano-units: 10 fit.
    ensure(ok >= 10, || format!("only {ok} of 50 admitted"))?;
    let db = kiln_store::Store::open(&s.db_path())?;
    let budget = db.budget(&tid, None)?.context("budget")?;
    let spent: i64 = db
        .usage(&UsageQuery {
            tenant_id: Some(tid.clone()),
            ..UsageQuery::default()
        })?
        .iter()
        .map(|r| r.cost.nanos())
        .sum();
    let balance = budget.balance.context("balance")?.nanos();
    ensure(balance >= 0, || format!("overspent: balance {balance}"))?;
    ensure(balance == 500_000 - spent, || {
        format!("balance {balance} but ledger spent {spent}")
    })?;
    ensure(budget.reserved.nanos() == 0, || format!("{budget:?}"))
}

#[test]
fn budgets_and_the_ledger_under_load_and_sigkill() {
    let data = Arc::new(tempfile::tempdir().expect("tempdir"));
    let envs = [("KILN_LEASE_SECONDS", "2")];
    let mut server =
        Server::start_with(data.clone(), &["--model", CHAT_MODEL], &envs).expect("server starts");
    let mut c = Checks::new();
    c.run("prices are set", || {
        admin(
            &server,
            "PUT",
            &format!("/api/prices/{CHAT_MODEL}"),
            json!({ "input": "1", "output": "2" }),
        )
        .map(|_| ())
    });
    c.run("50 concurrent requests never overspend a budget", || {
        budget_holds_under_50_concurrent(&server)
    });

    // Load, then SIGKILL in the middle of it.
    let (tid, _, key) = tenant_with_key(&server, "load", None).expect("tenant");
    let port = server.port;
    let received: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    // Kill once enough responses completed (a slow machine gets longer).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load_started = Instant::now();
    let clients: Vec<_> = (0..6)
        .map(|t| {
            let key = key.clone();
            let received = received.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let stream = i % 2 == 1;
                    let id = format!("load-{t}-{i}");
                    i += 1;
                    let Ok(r) = post_as(port, &key, &id, &completion_body(16, stream)) else {
                        break; // the server is gone
                    };
                    if let Some(u) = received_usage(&r, stream) {
                        received.lock().map(|mut m| m.insert(id, u)).ok();
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
    server.kill9().expect("SIGKILL");
    // The other replica (if any) keeps serving the clients for a moment.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Release);
    for t in clients {
        let _ = t.join();
    }
    let received = received.lock().map(|m| m.clone()).unwrap_or_default();
    let server =
        Server::start_with(data.clone(), &["--model", CHAT_MODEL], &envs).expect("server restarts");
    let db = kiln_store::Store::open(&server.db_path()).expect("open the database");

    c.run("the restart settles the dead run's reservations", || {
        common::wait_until_settled(&db, Duration::from_secs(20))
    });
    c.run(
        "every response received in full is in the ledger, once",
        || {
            let rows = db.recent_calls(Some(&tid), 100_000)?;
            common::received_are_in_ledger(&received, &rows, 16)
        },
    );
    c.run("the tenant's spend equals the ledger's cost", || {
        let spent: i64 = db
            .usage(&UsageQuery {
                tenant_id: Some(tid.clone()),
                ..UsageQuery::default()
            })?
            .iter()
            .map(|r| r.cost.nanos())
            .sum();
        let b = db.budget(&tid, None)?.context("budget")?;
        ensure(
            b.spent_this_month.nanos() == spent && b.reserved.nanos() == 0,
            || format!("budget {b:?}, ledger {spent}"),
        )
    });
    c.finish();
}

#[test]
fn admin_api_roles_and_bad_input() {
    let server = Server::start(&["--model", CHAT_MODEL]).expect("server starts");
    let s = &server;
    let mut c = Checks::new();
    let (tid, kid, member) = tenant_with_key(s, "acme", None).expect("tenant");
    let (other_tid, other_kid, _) = tenant_with_key(s, "globex", None).expect("tenant");
    let expect = |key: Option<&str>,
                  method: &str,
                  path: &str,
                  body: Value,
                  status: u16,
                  code: &str|
     -> Result<String> {
        let r = s.call_as(key, method, path, Some(&body))?;
        r.expect_error(status, code)
    };

    c.run("keys are required and checked", || {
        expect(None, "GET", "/v1/models", json!({}), 401, "missing_api_key")?;
        expect(None, "GET", "/api/me", json!({}), 401, "missing_api_key")?;
        expect(
            Some("kiln-sk-nope"),
            "GET",
            "/v1/models",
            json!({}),
            401,
            "invalid_api_key",
        )?;
        let r = request(
            s.port,
            "GET",
            "/v1/models",
            &[("Authorization", "Basic abc")],
            b"",
        )?;
        r.expect_error(401, "invalid_api_key").map(|_| ())
    });
    c.run("a member cannot administer", || {
        let m = Some(member.as_str());
        expect(
            m,
            "POST",
            "/api/tenants",
            json!({"name": "x"}),
            403,
            "permission_denied",
        )?;
        expect(
            m,
            "PUT",
            "/api/prices/m",
            json!({"input": 1, "output": 1}),
            403,
            "permission_denied",
        )?;
        expect(m, "GET", "/api/ledger", json!({}), 403, "permission_denied")?;
        let mine = s.call_as(m, "GET", "/api/tenants", None)?.json()?;
        ensure(
            mine["data"].as_array().map(Vec::len) == Some(1)
                && mine["data"][0]["id"] == tid.as_str(),
            || mine.to_string(),
        )
    });
    c.run("another tenant's objects look absent", || {
        let m = Some(member.as_str());
        let a = expect(
            m,
            "GET",
            &format!("/api/tenants/{other_tid}"),
            json!({}),
            404,
            "not_found",
        )?;
        let b = expect(
            m,
            "GET",
            "/api/tenants/ten-doesnotexist",
            json!({}),
            404,
            "not_found",
        )?;
        ensure(
            a.replace(&other_tid, "X") == b.replace("ten-doesnotexist", "X"),
            || format!("{a} / {b}"),
        )?;
        expect(
            m,
            "POST",
            &format!("/api/keys/{other_kid}/revoke"),
            json!({}),
            404,
            "not_found",
        )
        .map(|_| ())
    });
    c.run("a tenant admin manages its own tenant only", || {
        let issued = admin(
            s,
            "POST",
            "/api/keys",
            json!({"tenant_id": tid, "name": "boss", "role": "tenant_admin"}),
        )?;
        let boss = issued["secret"].as_str().context("secret")?.to_string();
        let b = Some(boss.as_str());
        let k = s.call_as(b, "POST", "/api/keys", Some(&json!({"name": "worker"})))?;
        ensure(
            k.status == 201 && k.json()?["key"]["tenant_id"] == tid.as_str(),
            || k.text(),
        )?;
        expect(
            b,
            "POST",
            "/api/keys",
            json!({"name": "root", "role": "platform_admin"}),
            403,
            "permission_denied",
        )?;
        expect(
            b,
            "POST",
            "/api/keys",
            json!({"name": "x", "tenant_id": other_tid}),
            404,
            "not_found",
        )?;
        // Priority above the default is the platform's to give; below it
        // (background keys) a tenant admin may.
        expect(
            b,
            "POST",
            "/api/keys",
            json!({"name": "vip", "priority": 10}),
            403,
            "permission_denied",
        )?;
        let slow = s.call_as(
            b,
            "POST",
            "/api/keys",
            Some(&json!({"name": "batch", "priority": -20})),
        )?;
        ensure(
            slow.status == 201 && slow.json()?["key"]["priority"] == -20,
            || slow.text(),
        )?;
        let vip = admin(
            s,
            "POST",
            "/api/keys",
            json!({"tenant_id": tid, "name": "vip", "priority": 10}),
        )?;
        ensure(vip["key"]["priority"] == 10, || vip.to_string())?;
        expect(
            s.admin_key.as_deref(),
            "POST",
            "/api/keys",
            json!({"tenant_id": tid, "name": "x", "priority": 101}),
            400,
            "invalid_request",
        )?;
        let keys = s.call_as(b, "GET", "/api/keys", None)?.json()?;
        let all_own = keys["data"]
            .as_array()
            .is_some_and(|v| v.iter().all(|k| k["tenant_id"] == tid.as_str()));
        ensure(all_own, || keys.to_string())?;
        let rotated = s.call_as(b, "POST", &format!("/api/keys/{kid}/rotate"), None)?;
        ensure(rotated.status == 200, || rotated.text())?;
        // The member's old secret stopped working at once on this replica.
        expect(
            Some(member.as_str()),
            "GET",
            "/v1/models",
            json!({}),
            401,
            "invalid_api_key",
        )
        .map(|_| ())
    });
    c.run("bad amounts and limits are refused", || {
        let a = s.admin_key.as_deref();
        expect(
            a,
            "PUT",
            "/api/prices/m",
            json!({"input": -1, "output": 1}),
            400,
            "invalid_request",
        )?;
        expect(
            a,
            "PUT",
            "/api/prices/m",
            json!({"input": "1e3", "output": 1}),
            400,
            "invalid_json",
        )?;
        expect(
            a,
            "PUT",
            "/api/prices/m",
            json!({"input": 5000000, "output": 1}),
            400,
            "invalid_request",
        )?;
        let credits = format!("/api/tenants/{tid}/credits");
        expect(
            a,
            "POST",
            &credits,
            json!({"amount": "1000000000000"}),
            400,
            "invalid_json",
        )?;
        expect(
            a,
            "POST",
            &credits,
            json!({"amount": "2000000000"}),
            400,
            "invalid_request",
        )?;
        expect(
            a,
            "POST",
            &credits,
            json!({"amount": "-5"}),
            400,
            "invalid_request",
        )?;
        expect(
            a,
            "POST",
            &credits,
            json!({"amount": "abc"}),
            400,
            "invalid_json",
        )?;
        expect(
            a,
            "POST",
            &credits,
            json!({"amount": 1, "kind": "gift"}),
            400,
            "invalid_request",
        )?;
        expect(
            a,
            "PATCH",
            &format!("/api/tenants/{tid}"),
            json!({"monthly_limit": "-1"}),
            400,
            "invalid_request",
        )?;
        expect(
            a,
            "PATCH",
            &format!("/api/tenants/{tid}"),
            json!({"requests_per_minute": 0}),
            400,
            "invalid_request",
        )?;
        expect(
            a,
            "POST",
            "/api/tenants",
            json!({"name": "acme"}),
            409,
            "conflict",
        )?;
        expect(
            a,
            "POST",
            "/api/tenants",
            json!({"name": "bad name!"}),
            400,
            "invalid_request",
        )?;
        expect(
            a,
            "GET",
            "/api/usage?group_by=planet",
            json!({}),
            400,
            "invalid_request",
        )?;
        expect(
            a,
            "GET",
            "/api/usage?from=2025-02-30",
            json!({}),
            400,
            "invalid_request",
        )
        .map(|_| ())
    });
    c.run("a disabled tenant is refused on /v1", || {
        let issued = admin(
            s,
            "POST",
            "/api/keys",
            json!({"tenant_id": other_tid, "name": "late"}),
        )?;
        let key = issued["secret"].as_str().context("secret")?.to_string();
        admin(
            s,
            "PATCH",
            &format!("/api/tenants/{other_tid}"),
            json!({"disabled": true}),
        )?;
        expect(
            Some(&key),
            "GET",
            "/v1/models",
            json!({}),
            403,
            "account_disabled",
        )?;
        admin(
            s,
            "PATCH",
            &format!("/api/tenants/{other_tid}"),
            json!({"disabled": false}),
        )?;
        let r = s.call_as(Some(&key), "GET", "/v1/models", None)?;
        ensure(r.status == 200, || r.text())
    });
    c.run("a client that hangs up on a plain call leaves no reservation open", || {
        use std::io::Write;
        let key = s.admin_key.clone().unwrap_or_default();
        let body = completion_body(400, false).to_string();
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.port))?;
        write!(
            sock,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Request-Id: hangup-1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        std::thread::sleep(Duration::from_millis(500));
        drop(sock);
        let db = kiln_store::Store::open(&s.db_path())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row = db
                .recent_calls(None, 50)?
                .into_iter()
                .find(|r| r.record.request_id == "hangup-1");
            if let Some(row) = row {
                ensure(row.record.outcome == kiln_store::Outcome::Cancelled, || format!("{row:?}"))?;
                ensure(row.record.completion_tokens < 400, || format!("{row:?}"))?;
                return common::wait_until_settled(&db, Duration::from_secs(5));
            }
            if Instant::now() > deadline {
                bail!("the abandoned call never reached the ledger");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    c.run("usage reports as JSON and CSV", || {
        let a = s.admin_key.as_deref();
        let r = s.call_as(
            a,
            "POST",
            "/v1/completions",
            Some(&completion_body(4, false)),
        )?;
        ensure(r.status == 200, || r.text())?;
        let report = s
            .call_as(a, "GET", "/api/usage?group_by=tenant,model,day", None)?
            .json()?;
        ensure(report["totals"]["calls"].as_u64() >= Some(1), || {
            report.to_string()
        })?;
        let csv = s.call_as(a, "GET", "/api/usage?group_by=model&format=csv", None)?;
        ensure(
            csv.header("content-type")
                .is_some_and(|v| v.starts_with("text/csv"))
                && csv.text().starts_with("model,calls,errors,prompt_tokens"),
            || csv.text(),
        )
    });
    drop(server);
    c.finish();
}

/// A ledger database that cannot be written: nothing is served unmetered,
/// the client gets a clear 503, and service resumes when it is writable.
#[test]
fn a_locked_ledger_refuses_instead_of_serving_unmetered() {
    let server = Server::start(&["--model", CHAT_MODEL]).expect("server starts");
    let s = &server;
    let mut c = Checks::new();
    let body = completion_body(4, false);
    c.run(
        "a request while another process holds the write lock",
        || {
            let lock = rusqlite::Connection::open(s.db_path())?;
            lock.execute_batch("BEGIN EXCLUSIVE")?;
            let key = s.admin_key.clone().unwrap_or_default();
            let r = post_as(s.port, &key, "locked-1", &body)?;
            lock.execute_batch("ROLLBACK")?;
            let message = r.expect_error(503, "ledger_unavailable")?;
            ensure(
                r.header("retry-after").is_some() && message.contains("ledger"),
                || format!("{message} {:?}", r.headers),
            )?;
            // The counter appears with its first token.
            let generated = s.metric("kiln_completion_tokens_total").unwrap_or(0.0);
            ensure(generated == 0.0, || {
                format!("{generated} tokens were generated unmetered")
            })
        },
    );
    c.run("served and metered again once the lock is gone", || {
        let key = s.admin_key.clone().unwrap_or_default();
        let r = post_as(s.port, &key, "locked-2", &body)?;
        ensure(r.status == 200, || r.text())?;
        let db = kiln_store::Store::open(&s.db_path())?;
        let rows = db.recent_calls(None, 10)?;
        ensure(
            rows.iter().any(|r| r.record.request_id == "locked-2"),
            || format!("{rows:?}"),
        )
    });
    drop(server);
    c.finish();
}

/// Sets the soft file-size limit (`ulimit -f`) of a running process.
fn set_file_size_limit(pid: u32, bytes: u64) -> Result<()> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the limit into `old`, a valid rlimit.
    if unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            std::ptr::null(),
            &mut old,
        )
    } != 0
    {
        bail!("prlimit: {}", std::io::Error::last_os_error());
    }
    let new = libc::rlimit {
        rlim_cur: bytes.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: `new` is a valid rlimit; the old value is not asked for.
    if unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &new,
            std::ptr::null_mut(),
        )
    } != 0
    {
        bail!("prlimit: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A ledger that cannot take another write (a full disk; here the server's
/// file-size limit, which fails SQLite's writes the same way) or whose file
/// was deleted: nothing is served unmetered, the client gets a clear 503,
/// and once there is room again service resumes, metered.
#[test]
fn a_full_or_deleted_ledger_refuses_instead_of_serving_unmetered() {
    let server = Server::start(&["--model", CHAT_MODEL]).expect("server starts");
    let s = &server;
    let key = s.admin_key.clone().unwrap_or_default();
    let mut c = Checks::new();
    let body = completion_body(4, false);
    let generated = || s.metric("kiln_completion_tokens_total").unwrap_or(0.0);
    c.run("served and metered while there is room", || {
        let r = post_as(s.port, &key, "room-1", &body)?;
        ensure(r.status == 200, || r.text())
    });
    c.run("refused while no write fits, served once one does", || {
        let before = generated();
        set_file_size_limit(s.pid(), 1)?;
        let refused = post_as(s.port, &key, "full-1", &body);
        set_file_size_limit(s.pid(), libc::RLIM_INFINITY)?;
        let message = refused?.expect_error(503, "ledger_unavailable")?;
        ensure(message.contains("ledger"), || message.clone())?;
        ensure(generated() == before, || {
            format!("{} tokens were generated unmetered", generated() - before)
        })?;
        let r = post_as(s.port, &key, "full-2", &body)?;
        ensure(r.status == 200, || r.text())?;
        let db = kiln_store::Store::open(&s.db_path())?;
        let rows = db.recent_calls(None, 20)?;
        ensure(
            rows.iter()
                .any(|r| r.record.request_id == "full-2" && r.record.completion_tokens > 0),
            || format!("{rows:?}"),
        )
    });
    c.run(
        "a deleted database file: refused, the log saying why",
        || {
            let before = generated();
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", s.db_path().display()));
            }
            for id in ["gone-1", "gone-2"] {
                let r = post_as(s.port, &key, id, &body)?;
                let message = r.expect_error(503, "ledger_unavailable")?;
                ensure(message.contains("ledger"), || message.clone())?;
            }
            ensure(generated() == before, || {
                format!("{} tokens were generated unmetered", generated() - before)
            })?;
            // The client is told the ledger is unavailable; the operator's
            // log names the file and what happened to it.
            let log = s.log.lock().map(|l| l.clone()).unwrap_or_default();
            ensure(log.contains("was deleted or replaced"), || log.clone())
        },
    );
    drop(server);
    c.finish();
}
