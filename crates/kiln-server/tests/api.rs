//! The OpenAI-compatible API end to end: one real `kiln serve` with SmolLM2
//! and all-MiniLM-L6-v2, every endpoint, every kind of bad input, and that
//! the server keeps answering normally after each.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use common::{ensure, Checks, Server, CHAT_MODEL, EMBEDDING_MODEL};
use serde_json::{json, Value};

/// A second text model, served beside the chat model.
const BASE_MODEL: &str = "gemma3-270m";

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

fn check_chat_ok(s: &Server) -> Result<Value> {
    let r = s.post_json("/v1/chat/completions", &chat_body(json!({})))?;
    ensure(r.status == 200, || {
        format!("chat failed: {} {}", r.status, r.text())
    })?;
    r.json()
}

fn context_length(s: &Server) -> Result<u64> {
    let card = s.get(&format!("/v1/models/{CHAT_MODEL}"))?.json()?;
    card["context_length"].as_u64().context("no context_length")
}

#[test]
fn api_end_to_end() {
    let server = Server::start(&[
        "--model",
        CHAT_MODEL,
        "--model",
        BASE_MODEL,
        "--embedding-model",
        EMBEDDING_MODEL,
    ])
    .expect("server starts");
    let s = &server;
    let mut c = Checks::new();

    c.run("healthz and generated request id", || {
        let r = s.get("/healthz")?;
        ensure(r.status == 200, || r.text())?;
        ensure(r.json()?["status"] == "ok", || r.text())?;
        ensure(
            r.header("x-request-id").is_some_and(|v| v.len() >= 16),
            || format!("{:?}", r.headers),
        )
    });

    c.run("client request id is echoed, odd ones replaced", || {
        let r = s.request("GET", "/healthz", &[("X-Request-Id", "client-id_42")], b"")?;
        ensure(r.header("x-request-id") == Some("client-id_42"), || {
            format!("{:?}", r.headers)
        })?;
        let r = s.request(
            "GET",
            "/healthz",
            &[("X-Request-Id", "has spaces <and> stuff")],
            b"",
        )?;
        ensure(
            r.header("x-request-id").is_some_and(|v| !v.contains(' ')),
            || format!("{:?}", r.headers),
        )
    });

    c.run("models list and lookup", || {
        let list = s.get("/v1/models")?.json()?;
        let ids: Vec<&str> = list["data"]
            .as_array()
            .context("data")?
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        ensure(
            ids.contains(&CHAT_MODEL) && ids.contains(&EMBEDDING_MODEL),
            || format!("{list}"),
        )?;
        let one = s.get(&format!("/v1/models/{CHAT_MODEL}"))?;
        ensure(
            one.status == 200 && one.json()?["object"] == "model",
            || one.text(),
        )?;
        s.get("/v1/models/nope")?
            .expect_error(404, "model_not_found")
            .map(|_| ())
    });

    let mut greedy_text = String::new();
    c.run("chat completion", || {
        let body = check_chat_ok(s)?;
        let content = body["choices"][0]["message"]["content"]
            .as_str()
            .context("content")?;
        let u = &body["usage"];
        let (p, cpl, t) = (
            u["prompt_tokens"].as_u64().context("prompt_tokens")?,
            u["completion_tokens"]
                .as_u64()
                .context("completion_tokens")?,
            u["total_tokens"].as_u64().context("total_tokens")?,
        );
        ensure(p > 5 && (1..=8).contains(&cpl) && t == p + cpl, || {
            format!("usage {u}")
        })?;
        ensure(body["object"] == "chat.completion", || format!("{body}"))?;
        let reason = body["choices"][0]["finish_reason"].as_str().unwrap_or("");
        ensure(reason == "stop" || reason == "length", || format!("{body}"))?;
        greedy_text = content.to_string();
        Ok(())
    });

    c.run(
        "streamed chat with usage matches the non-streamed one",
        || {
            let r = s.post_json(
                "/v1/chat/completions",
                &chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
            )?;
            ensure(r.status == 200, || r.text())?;
            ensure(
                r.header("content-type")
                    .is_some_and(|v| v.starts_with("text/event-stream")),
                || format!("{:?}", r.headers),
            )?;
            let data = r.sse_data();
            ensure(data.last().map(String::as_str) == Some("[DONE]"), || {
                format!("{data:?}")
            })?;
            let chunks: Vec<Value> = data[..data.len() - 1]
                .iter()
                .map(|d| serde_json::from_str(d))
                .collect::<Result<_, _>>()?;
            let usage_chunk = chunks.last().context("no chunks")?;
            ensure(
                usage_chunk["choices"].as_array().is_some_and(Vec::is_empty)
                    && usage_chunk["usage"]["total_tokens"].is_u64(),
                || format!("last chunk {usage_chunk}"),
            )?;
            let text: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            ensure(text == greedy_text, || {
                format!("streamed {text:?} vs {greedy_text:?}")
            })?;
            ensure(
                chunks
                    .iter()
                    .any(|c| c["choices"][0]["finish_reason"].is_string()),
                || "no finish_reason".into(),
            )
        },
    );

    c.run("chat logprobs", || {
        let r = s.post_json(
            "/v1/chat/completions",
            &chat_body(json!({"logprobs": true, "top_logprobs": 3})),
        )?;
        let body = r.json()?;
        let content = body["choices"][0]["logprobs"]["content"]
            .as_array()
            .context("logprobs")?;
        let n = body["usage"]["completion_tokens"]
            .as_u64()
            .context("usage")?;
        ensure(content.len() as u64 == n, || {
            format!("{} logprobs for {n} tokens", content.len())
        })?;
        ensure(
            content.iter().all(|t| {
                t["top_logprobs"].as_array().is_some_and(|a| a.len() == 3)
                    && t["logprob"].as_f64().is_some_and(|l| l <= 0.0)
            }),
            || format!("{body}"),
        )
    });

    c.run("content as text parts; stop string", || {
        let r = s.post_json(
            "/v1/chat/completions",
            &chat_body(
                json!({"messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Count: 1, 2,"}]}],
                "stop": ["\n"], "seed": 7, "top_k": 20, "top_p": 0.9, "min_p": 0.05,
                "presence_penalty": 0.1, "frequency_penalty": 0.1, "repetition_penalty": 1.1,
                "temperature": 0.7, "some_unknown_field": {"x": 1}}),
            ),
        )?;
        ensure(r.status == 200, || r.text())?;
        let content = r.json()?["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("\n")
            .to_string();
        ensure(!content.contains('\n'), || {
            format!("stop string in output: {content:?}")
        })
    });

    c.run("text completion, string and token prompts, logprobs", || {
        let r = s.post_json("/v1/completions", &json!({"model": CHAT_MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 2}))?;
        ensure(r.status == 200, || r.text())?;
        let body = r.json()?;
        ensure(body["object"] == "text_completion" && body["choices"][0]["text"].is_string(), || format!("{body}"))?;
        let lp = &body["choices"][0]["logprobs"];
        let n = body["usage"]["completion_tokens"].as_u64().context("usage")?;
        ensure(lp["tokens"].as_array().is_some_and(|t| t.len() as u64 == n), || format!("{body}"))?;
        ensure(lp["top_logprobs"][0].as_object().is_some_and(|m| m.len() <= 2 && !m.is_empty()), || format!("{body}"))?;
        let r = s.post_json("/v1/completions", &json!({"model": CHAT_MODEL, "prompt": [504, 3458, 282], "max_tokens": 3}))?;
        ensure(r.status == 200, || r.text())?;
        ensure(r.json()?["usage"]["prompt_tokens"] == 3, || r.text())
    });

    c.run("a second model is chosen by name", || {
        let r = s.post_json("/v1/completions", &json!({"model": BASE_MODEL, "prompt": "The sky is", "max_tokens": 3, "temperature": 0}))?;
        ensure(r.status == 200, || r.text())?;
        let body = r.json()?;
        ensure(body["model"] == BASE_MODEL && body["usage"]["completion_tokens"].as_u64().is_some_and(|n| (1..=3).contains(&n)), || format!("{body}"))
    });

    c.run("streamed text completion", || {
        let r = s.post_json("/v1/completions", &json!({"model": CHAT_MODEL, "prompt": "Once upon a time", "max_tokens": 5, "stream": true}))?;
        let data = r.sse_data();
        ensure(r.status == 200 && data.last().map(String::as_str) == Some("[DONE]"), || r.text())?;
        ensure(data.len() >= 2, || format!("{data:?}"))
    });

    c.run("embeddings: float, base64 and every input shape", || {
        let f = s.post_json("/v1/embeddings", &json!({"model": EMBEDDING_MODEL, "input": "hello world"}))?.json()?;
        let floats: Vec<f64> = f["data"][0]["embedding"].as_array().context("floats")?.iter().filter_map(Value::as_f64).collect();
        ensure(floats.len() == 384, || format!("{} dims", floats.len()))?;
        let norm: f64 = floats.iter().map(|x| x * x).sum::<f64>().sqrt();
        ensure((norm - 1.0).abs() < 1e-3, || format!("norm {norm}"))?;
        ensure(f["usage"]["prompt_tokens"].as_u64().is_some_and(|t| t > 0), || format!("{}", f["usage"]))?;
        let b = s.post_json("/v1/embeddings", &json!({"model": EMBEDDING_MODEL, "input": "hello world", "encoding_format": "base64"}))?.json()?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b["data"][0]["embedding"].as_str().context("base64")?)?;
        let decoded: Vec<f64> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect();
        ensure(decoded.len() == 384, || "base64 length".into())?;
        ensure(decoded.iter().zip(&floats).all(|(a, b)| (a - b).abs() < 1e-6), || "base64 differs from float".into())?;
        for input in [json!(["a", "b", "c"]), json!([101, 7592, 102]), json!([[101, 7592, 102], [101, 102]])] {
            let r = s.post_json("/v1/embeddings", &json!({"model": EMBEDDING_MODEL, "input": input, "dimensions": 384}))?;
            ensure(r.status == 200, || r.text())?;
        }
        let r = s.post_json("/v1/embeddings", &json!({"model": EMBEDDING_MODEL, "input": "x", "dimensions": 128}))?;
        r.expect_error(400, "invalid_request").map(|_| ())
    });

    c.run(
        "embedding input over 256 tokens is refused, not truncated",
        || {
            let tokens: Vec<u32> = std::iter::once(101)
                .chain(std::iter::repeat_n(7592, 255))
                .chain([102])
                .collect();
            ensure(tokens.len() == 257, || "setup".into())?;
            let msg = s
                .post_json(
                    "/v1/embeddings",
                    &json!({"model": EMBEDDING_MODEL, "input": tokens}),
                )?
                .expect_error(400, "invalid_request")?;
            ensure(msg.contains("257") && msg.contains("256"), || msg.clone())?;
            let long_text = "hello ".repeat(300);
            let msg = s
                .post_json(
                    "/v1/embeddings",
                    &json!({"model": EMBEDDING_MODEL, "input": long_text}),
                )?
                .expect_error(400, "invalid_request")?;
            ensure(msg.contains("256"), || msg.clone())
        },
    );

    c.run("bad inputs get OpenAI-shaped 4xx", || {
        let json_ct = [("Content-Type", "application/json")];
        s.request("POST", "/v1/chat/completions", &json_ct, b"{\"model\": ")?.expect_error(400, "invalid_json")?;
        s.request("POST", "/v1/chat/completions", &json_ct, b"{\"model\": \"\xff\xfe\"}")?.expect_error(400, "invalid_json")?;
        s.request("POST", "/v1/chat/completions", &[("Content-Type", "text/plain")], b"{}")?.expect_error(415, "unsupported_media_type")?;
        s.post_json("/v1/chat/completions", &chat_body(json!({"max_tokens": "ten"})))?.expect_error(400, "invalid_json")?;
        s.post_json("/v1/chat/completions", &chat_body(json!({"messages": "hi"})))?.expect_error(400, "invalid_json")?;
        s.post_json("/v1/chat/completions", &json!({"messages": []}))?.expect_error(400, "invalid_json")?;
        s.post_json("/v1/chat/completions", &chat_body(json!({"model": "gpt-9"})))?.expect_error(404, "model_not_found")?;
        s.post_json("/v1/embeddings", &json!({"model": "nope", "input": "x"}))?.expect_error(404, "model_not_found")?;
        s.post_json("/v1/chat/completions", &chat_body(json!({"messages": []})))?.expect_error(400, "invalid_request")?;
        s.post_json("/v1/chat/completions", &chat_body(json!({"max_tokens": 0})))?.expect_error(400, "invalid_request")?;
        s.post_json("/v1/chat/completions", &chat_body(json!({"max_tokens": -5})))?.expect_error(400, "invalid_request")?;
        s.post_json("/v1/chat/completions", &chat_body(json!({"n": 2})))?.expect_error(400, "invalid_request")?;
        s.post_json("/v1/chat/completions", &chat_body(json!({"temperature": 9})))?.expect_error(400, "invalid_request")?;
        s.post_json("/v1/chat/completions", &chat_body(json!({"top_logprobs": 21, "logprobs": true})))?.expect_error(400, "invalid_request")?;
        s.post_json("/v1/chat/completions", &chat_body(json!({"stop": ["a", "b", "c", "d", "e"]})))?.expect_error(400, "invalid_request")?;
        s.post_json("/v1/chat/completions", &chat_body(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]})))?
            .expect_error(400, "invalid_request")?;
        s.post_json("/v1/completions", &json!({"model": CHAT_MODEL, "prompt": ["a", "b"]}))?.expect_error(400, "invalid_request")?;
        s.post_json("/v1/completions", &json!({"model": CHAT_MODEL, "prompt": [99999999]}))?.expect_error(400, "invalid_request")?;
        s.post_json("/v1/embeddings", &json!({"model": EMBEDDING_MODEL, "input": "x", "encoding_format": "hex"}))?.expect_error(400, "invalid_request")?;
        s.get("/v1/nothing-here")?.expect_error(404, "not_found")?;
        s.get("/v1/chat/completions")?.expect_error(405, "method_not_allowed")?;
        Ok(())
    });

    c.run(
        "max_tokens past the context and prompts past the context",
        || {
            let ctx = context_length(s)?;
            let msg = s
                .post_json(
                    "/v1/chat/completions",
                    &chat_body(json!({"max_tokens": ctx})),
                )?
                .expect_error(400, "context_length_exceeded")?;
            ensure(msg.contains(&ctx.to_string()), || msg.clone())?;
            let long = "hello ".repeat(ctx as usize + 100);
            let msg = s
                .post_json(
                    "/v1/chat/completions",
                    &chat_body(json!({"messages": [{"role": "user", "content": long}]})),
                )?
                .expect_error(400, "context_length_exceeded")?;
            let numbers: Vec<u64> = msg
                .split(|ch: char| !ch.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            ensure(
                numbers.contains(&ctx) && numbers.iter().any(|&n| n > ctx),
                || msg.clone(),
            )?;
            let msg = s
                .post_json(
                    "/v1/completions",
                    &json!({"model": CHAT_MODEL, "prompt": "hello ".repeat(ctx as usize + 100)}),
                )?
                .expect_error(400, "context_length_exceeded")?;
            ensure(msg.contains(&ctx.to_string()), || msg.clone())
        },
    );

    c.run("a 10 MB body is refused with 413", || {
        let mut body =
            br#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": ""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', 10_000_000));
        body.extend_from_slice(br#""}]}"#);
        s.request(
            "POST",
            "/v1/chat/completions",
            &[("Content-Type", "application/json")],
            &body,
        )?
        .expect_error(413, "payload_too_large")
        .map(|_| ())
    });

    c.run("the server still answers normally after bad input", || {
        check_chat_ok(s).map(|_| ())
    });

    c.run("metrics", || {
        let r = s.get("/metrics")?;
        ensure(r.status == 200, || r.text())?;
        let text = r.text();
        for needle in [
            "kiln_requests_total{endpoint=\"/v1/chat/completions\",model=\"smollm2-135m\",status=\"200\"}",
            "kiln_errors_total{code=\"invalid_json\"}",
            "kiln_errors_total{code=\"model_not_found\"}",
            "kiln_prompt_tokens_total{model=\"smollm2-135m\"}",
            "kiln_completion_tokens_total{model=\"smollm2-135m\"}",
            "kiln_time_to_first_token_seconds_bucket",
            "kiln_queue_wait_seconds_bucket",
            "kiln_prefill_seconds_bucket",
            "kiln_decode_seconds_bucket",
            "kiln_request_duration_seconds_bucket",
            "kiln_queue_depth{model=\"smollm2-135m\"}",
        ] {
            if !text.contains(needle) {
                bail!("metrics lack {needle}");
            }
        }
        Ok(())
    });

    c.run("no panic in the log", || {
        let log = s.log.lock().map(|l| l.clone()).unwrap_or_default();
        ensure(!log.contains("panicked"), || log.clone())
    });

    // Read while the server (and the directory holding its database) lives.
    let db = server.db_path();
    c.run("model calls are in the usage ledger", || {
        use kiln_store::CallLog as _;
        let store = kiln_store::Store::open(&db)?;
        let calls = store.recent_calls(None, 1000)?;
        let chats = calls
            .iter()
            .filter(|c| c.record.endpoint == "/v1/chat/completions" && c.record.model == CHAT_MODEL)
            .count();
        let embeds = calls
            .iter()
            .filter(|c| c.record.endpoint == "/v1/embeddings")
            .count();
        let errors = calls
            .iter()
            .filter(|c| matches!(c.record.outcome, kiln_store::Outcome::Error(_)))
            .count();
        ensure(chats >= 3 && embeds >= 2 && errors >= 1, || {
            format!("{chats} chat, {embeds} embedding, {errors} error calls")
        })
    });
    drop(server);
    c.finish();
}
