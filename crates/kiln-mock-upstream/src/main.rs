//! `kiln-mock-upstream`: an OpenAI-compatible server that answers at once
//! with fixed text and honest usage counts, for measuring a gateway (Kiln,
//! LiteLLM) without a model behind it. Not a test double for Kiln's own
//! logic: Kiln's tests carry their own mock with failure modes.
//!
//! `POST /v1/chat/completions` and `/v1/completions` answer `completion_tokens`
//! words (`--tokens`, at most `max_tokens`), streamed as SSE when asked, with
//! a usage chunk when `stream_options.include_usage` is set; the prompt's
//! whitespace-separated words are its `prompt_tokens`. `POST /v1/embeddings`
//! answers one 8-dimensional vector per input. `POST /v1/rerank` scores each
//! of `documents` by the share of the query's words it contains (the shape
//! vLLM and Text Embeddings Inference answer). `GET /v1/models` lists `mock`.
//!
//! With `--tool-rounds N` (N > 0) it also plays an agent's model: a chat
//! request that offers `tools` and holds fewer than N messages of role
//! `tool` is answered with one call of the first tool offered,
//! `{"expression": "1+K"}` with id `call_K` (K: 1 plus the tool messages
//! so far), `finish_reason` `tool_calls`, streamed or not; the request with
//! N tool results gets the text answer. So one agent run is N + 1 model
//! steps and N tool steps. Its completion tokens are the call's
//! whitespace-separated words (name and arguments).
//!
//! Prints `mock upstream listening on http://ADDR` once bound.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(
    name = "kiln-mock-upstream",
    about = "A fast OpenAI-compatible mock upstream"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Words per answer (capped by the request's max_tokens).
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Answer a chat request that offers tools with a call of its first
    /// tool until it holds this many tool results (0: never call a tool).
    #[arg(long, default_value_t = 0)]
    tool_rounds: usize,
}

struct Mock {
    tokens: usize,
    tool_rounds: usize,
}

/// The tool call a chat request gets, if it gets one: the first offered
/// tool's name and the call's number (from 1).
fn tool_round(tool_rounds: usize, req: &Value) -> Option<(String, usize)> {
    if tool_rounds == 0 {
        return None;
    }
    let name = req["tools"].as_array()?.first()?["function"]["name"].as_str()?;
    let results = req["messages"]
        .as_array()
        .map_or(0, |m| m.iter().filter(|m| m["role"] == "tool").count());
    (results < tool_rounds).then(|| (name.to_string(), results + 1))
}

/// A chat answer that calls `name`, OpenAI's shape, with its usage.
fn tool_call_response(
    model: &str,
    name: &str,
    k: usize,
    prompt: usize,
    stream: bool,
    usage_chunk: bool,
) -> Response {
    let arguments = format!(r#"{{"expression": "1+{k}"}}"#);
    let completion = name.split_whitespace().count() + arguments.split_whitespace().count();
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion});
    let call = json!({"id": format!("call_{k}"), "type": "function",
        "function": {"name": name, "arguments": arguments}});
    if !stream {
        let choice = json!({"index": 0, "finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": null, "tool_calls": [call]}});
        return json_response(
            &json!({"id": "mock-1", "object": "chat.completion", "created": 0,
            "model": model, "choices": [choice], "usage": usage}),
        );
    }
    let mut delta_call = call;
    delta_call["index"] = json!(0);
    let chunk = |choices: Value| {
        json!({"id": "mock-1", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": choices})
    };
    let mut events = vec![
        chunk(json!([{"index": 0, "finish_reason": null,
            "delta": {"role": "assistant", "content": null, "tool_calls": [delta_call]}}])),
        chunk(json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])),
    ];
    if usage_chunk {
        let mut last = chunk(json!([]));
        last["usage"] = usage;
        events.push(last);
    }
    let mut sse: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    sse.push("data: [DONE]\n\n".to_string());
    sse_response(sse)
}

fn sse_response(events: Vec<String>) -> Response {
    let stream = futures::stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<Bytes, Infallible>(Bytes::from(e))),
    );
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

fn words(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("w{i} ")).collect()
}

fn prompt_words(endpoint: &str, body: &Value) -> usize {
    let count = |v: &Value| match v {
        Value::String(s) => s.split_whitespace().count(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    match endpoint {
        "chat" => body["messages"]
            .as_array()
            .map(|m| m.iter().map(|m| count(&m["content"]) + 1).sum())
            .unwrap_or(0),
        "embeddings" => count(&body["input"]),
        _ => count(&body["prompt"]),
    }
}

fn json_response(v: &Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn bad(message: &str) -> Response {
    let e = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}});
    let mut r = json_response(&e);
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r
}

async fn generate(mock: &Mock, endpoint: &'static str, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return bad("the body is not JSON");
    };
    let model = req["model"].as_str().unwrap_or("mock").to_string();
    let max = req["max_tokens"]
        .as_u64()
        .or(req["max_completion_tokens"].as_u64())
        .map_or(mock.tokens, |m| (m as usize).min(mock.tokens));
    let prompt = prompt_words(endpoint, &req);
    let usage =
        json!({"prompt_tokens": prompt, "completion_tokens": max, "total_tokens": prompt + max});
    let chat = endpoint == "chat";
    let stream = req["stream"].as_bool() == Some(true);
    if chat {
        if let Some((name, k)) = tool_round(mock.tool_rounds, &req) {
            let usage_chunk = req["stream_options"]["include_usage"].as_bool() == Some(true);
            return tool_call_response(&model, &name, k, prompt, stream, usage_chunk);
        }
    }
    if !stream {
        let text: String = words(max).concat();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        return json_response(
            &json!({"id": "mock-1", "object": object, "created": 0, "model": model,
            "choices": [choice], "usage": usage}),
        );
    }
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let mut events: Vec<String> = words(max)
        .into_iter()
        .map(|w| {
            let choice = if chat {
                json!({"index": 0, "delta": {"content": w}, "finish_reason": null})
            } else {
                json!({"index": 0, "text": w, "finish_reason": null})
            };
            let c = json!({"id": "mock-1", "object": object, "created": 0, "model": model, "choices": [choice]});
            format!("data: {c}\n\n")
        })
        .collect();
    let last = if chat {
        json!({"index": 0, "delta": {}, "finish_reason": "length"})
    } else {
        json!({"index": 0, "text": "", "finish_reason": "length"})
    };
    events.push(format!(
        "data: {}\n\n",
        json!({"id": "mock-1", "object": object, "created": 0, "model": model, "choices": [last]})
    ));
    if req["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push(format!(
            "data: {}\n\n",
            json!({"id": "mock-1", "object": object, "created": 0, "model": model, "choices": [], "usage": usage})
        ));
    }
    events.push("data: [DONE]\n\n".to_string());
    sse_response(events)
}

async fn chat(State(m): State<Arc<Mock>>, body: Bytes) -> Response {
    generate(&m, "chat", body).await
}

async fn completions(State(m): State<Arc<Mock>>, body: Bytes) -> Response {
    generate(&m, "completions", body).await
}

async fn embeddings(body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return bad("the body is not JSON");
    };
    let inputs = match &req["input"] {
        Value::Array(a) if a.iter().all(|v| !v.is_number()) => a.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]}))
        .collect();
    let n = prompt_words("embeddings", &req);
    json_response(
        &json!({"object": "list", "data": data, "model": req["model"],
        "usage": {"prompt_tokens": n, "total_tokens": n}}),
    )
}

async fn rerank(body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return bad("the body is not JSON");
    };
    let (Some(query), Some(docs)) = (req["query"].as_str(), req["documents"].as_array()) else {
        return bad("`query` (a string) and `documents` (an array) are required");
    };
    let words = |t: &str| -> Vec<String> {
        t.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let q = words(query);
    let mut tokens = 0;
    let mut results: Vec<Value> = Vec::with_capacity(docs.len());
    for (index, d) in docs.iter().enumerate() {
        let text = d.as_str().or_else(|| d["text"].as_str()).unwrap_or("");
        let w = words(text);
        tokens += q.len() + w.len();
        let shared = q.iter().filter(|x| w.contains(x)).count();
        let score = shared as f64 / q.len().max(1) as f64;
        results.push(json!({"index": index, "relevance_score": score}));
    }
    results.sort_by(|a, b| {
        let s = |v: &Value| v["relevance_score"].as_f64().unwrap_or(0.0);
        s(b).total_cmp(&s(a))
    });
    json_response(
        &json!({"model": req["model"], "results": results, "usage": {"total_tokens": tokens}}),
    )
}

async fn models() -> Response {
    json_response(
        &json!({"object": "list", "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "mock"}]}),
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mock = Arc::new(Mock {
            tokens: args.tokens,
            tool_rounds: args.tool_rounds,
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/rerank", post(rerank))
            .route("/v1/models", get(models))
            .with_state(mock);
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
        eprintln!(
            "mock upstream listening on http://{}",
            listener.local_addr()?
        );
        axum::serve(listener, app).await?;
        Ok(())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn chat(tool_results: usize, tools: bool) -> Value {
        let mut messages = vec![json!({"role": "user", "content": "what is one plus one"})];
        for k in 1..=tool_results {
            messages.push(json!({"role": "assistant", "content": null, "tool_calls": []}));
            messages
                .push(json!({"role": "tool", "tool_call_id": format!("call_{k}"), "content": "2"}));
        }
        let mut req = json!({"model": "m", "messages": messages});
        if tools {
            req["tools"] = json!([{"type": "function", "function": {"name": "calculator"}},
                {"type": "function", "function": {"name": "current_time"}}]);
        }
        req
    }

    #[test]
    fn tools_are_called_until_enough_results_are_in() {
        assert_eq!(tool_round(0, &chat(0, true)), None);
        assert_eq!(tool_round(2, &chat(0, false)), None);
        assert_eq!(
            tool_round(2, &chat(0, true)),
            Some(("calculator".into(), 1))
        );
        assert_eq!(
            tool_round(2, &chat(1, true)),
            Some(("calculator".into(), 2))
        );
        assert_eq!(tool_round(2, &chat(2, true)), None);
        let mut empty = chat(0, true);
        empty["tools"] = json!([]);
        assert_eq!(tool_round(2, &empty), None);
    }

    #[tokio::test]
    async fn a_tool_call_has_openais_shape_and_usage() {
        let mock = Mock {
            tokens: 4,
            tool_rounds: 1,
        };
        let body = Bytes::from(chat(0, true).to_string());
        let r = generate(&mock, "chat", body).await;
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null);
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["id"], "call_1");
        assert_eq!(call["function"]["name"], "calculator");
        assert_eq!(call["function"]["arguments"], r#"{"expression": "1+1"}"#);
        assert_eq!(v["usage"]["completion_tokens"], 3);
        assert_eq!(
            v["usage"]["total_tokens"],
            v["usage"]["prompt_tokens"].as_u64().unwrap() + 3
        );

        let body = Bytes::from(chat(1, true).to_string());
        let r = generate(&mock, "chat", body).await;
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "w0 w1 w2 w3 ");
    }
}
