//! Load and lifecycle, on a server with a queue of one: a client hanging up
//! mid-stream stops its generation; a full queue answers 429 with
//! Retry-After; SIGTERM lets an in-flight request finish and exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::{ensure, open_stream, request, Checks, Server, CHAT_MODEL};
use serde_json::json;

const RUNNING: &str = "kiln_running_requests{model=\"smollm2-135m\"}";

fn long_chat(max_tokens: u32, stream: bool) -> serde_json::Value {
    json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": stream,
    })
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if cond()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("timed out waiting for {what}")
}

#[test]
fn load_and_lifecycle() {
    let mut server = Server::start(&["--model", CHAT_MODEL, "--queue-capacity", "1", "--no-auth"])
        .expect("server starts");
    let port = server.port;
    let mut c = Checks::new();

    c.run("client disconnect mid-stream stops generation", || {
        let stream = open_stream(port, "/v1/chat/completions", &long_chat(4000, true), None)?;
        wait_for("the request to run", Duration::from_secs(30), || {
            Ok(server.metric(RUNNING)? == 1.0)
        })?;
        let before = server.metric("kiln_completion_tokens_total").unwrap_or(0.0);
        drop(stream);
        // 4000 tokens take minutes; a stopped generation frees the worker at once.
        wait_for("the generation to stop", Duration::from_secs(10), || {
            Ok(server.metric(RUNNING)? == 0.0)
        })?;
        let after = server.metric("kiln_completion_tokens_total").unwrap_or(0.0);
        ensure(after == before, || {
            "a cancelled generation was counted as finished".into()
        })
    });

    c.run("full queue answers 429 with Retry-After", || {
        let body = long_chat(24, false).to_string();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let body = body.clone();
                std::thread::spawn(move || {
                    request(
                        port,
                        "POST",
                        "/v1/chat/completions",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    )
                })
            })
            .collect();
        let responses: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect::<Result<_>>()?;
        let busy: Vec<_> = responses.iter().filter(|r| r.status == 429).collect();
        let ok = responses.iter().filter(|r| r.status == 200).count();
        ensure(!busy.is_empty() && ok >= 1 && busy.len() + ok == 4, || {
            format!(
                "statuses {:?}",
                responses.iter().map(|r| r.status).collect::<Vec<_>>()
            )
        })?;
        for r in busy {
            r.expect_error(429, "server_busy")?;
            ensure(r.header("retry-after").is_some(), || {
                format!("{:?}", r.headers)
            })?;
        }
        let r = server.post_json("/v1/chat/completions", &long_chat(2, false))?;
        ensure(r.status == 200, || r.text())
    });

    c.run(
        "SIGTERM lets the in-flight request finish, then exits 0",
        || {
            let body = long_chat(20, false).to_string();
            let inflight = std::thread::spawn(move || {
                request(
                    port,
                    "POST",
                    "/v1/chat/completions",
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                )
            });
            wait_for("the request to run", Duration::from_secs(30), || {
                Ok(server.metric(RUNNING)? == 1.0)
            })?;
            let status = server.terminate()?;
            let r = inflight.join().expect("thread")?;
            ensure(r.status == 200, || r.text())?;
            ensure(r.json()?["usage"]["completion_tokens"] == 20, || r.text())?;
            ensure(status.success(), || format!("exit status {status}"))
        },
    );

    c.finish();
}
