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
}

struct Mock {
    tokens: usize,
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
    if req["stream"].as_bool() != Some(true) {
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
