//! `POST /v1/embeddings`: text or token arrays in, one vector per input out.
//! Inputs longer than the model's limit are refused, never truncated.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use kiln_types::openai::{
    Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage, EmbeddingVector,
};
use serde_json::Value;

use super::calls::CallContext;
use super::{finish_call, route, RequestId, Routed, SharedState};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{self, ApiJson};
use crate::upstream::Endpoint;

/// Most inputs in one request.
pub const MAX_INPUTS: usize = 2048;

pub async fn embeddings(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Extension(principal): Extension<Arc<Principal>>,
    ApiJson(body): ApiJson<Value>,
) -> Response {
    let endpoint = "/v1/embeddings";
    let (call, body) = match route(
        state,
        request_id,
        principal,
        endpoint,
        Endpoint::Embeddings,
        body,
    )
    .await
    {
        Routed::Done(response) => return response,
        Routed::Local(call, body) => (call, body),
    };
    let req: EmbeddingRequest = match extract::from_value(body) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let result = run(&call, req).await;
    finish_call(&call, result)
}

enum Input {
    Text(String),
    Tokens(Vec<u32>),
}

fn parse_input(v: &Value) -> Result<Vec<Input>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "input",
            "`input` must be a string, a list of strings, an array of token ids, or a list of token arrays",
        )
    };
    let tokens = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(bad)
            })
            .collect()
    };
    let inputs = match v {
        Value::String(s) => vec![Input::Text(s.clone())],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("input", "`input` must not be empty"))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![Input::Tokens(tokens(items)?)]
        }
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(Input::Text(s.clone())),
                Value::Array(t) => Ok(Input::Tokens(tokens(t)?)),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "`input` has {} items; at most {MAX_INPUTS} are allowed",
                inputs.len()
            ),
        ));
    }
    for (i, input) in inputs.iter().enumerate() {
        let empty = match input {
            Input::Text(s) => s.is_empty(),
            Input::Tokens(t) => t.is_empty(),
        };
        if empty {
            return Err(ApiError::invalid("input", format!("input {i} is empty")));
        }
    }
    Ok(inputs)
}

async fn run(call: &CallContext, req: EmbeddingRequest) -> Result<Response, ApiError> {
    let state = &call.state;
    let model = state.embedding_model(&req.model)?;
    call.principal.check_model(&req.model)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` is `{other}`; it must be `float` or `base64`"),
            ))
        }
    };
    let dims = model.embedder.dimensions();
    if let Some(d) = req.dimensions {
        if d != dims as i64 {
            return Err(ApiError::invalid(
                "dimensions",
                format!("`dimensions` is {d}, but this model's embeddings have {dims} dimensions and cannot be shortened"),
            ));
        }
    }
    let inputs = parse_input(&req.input)?;
    let embedder = model.embedder.clone();
    let batch = tokio::task::spawn_blocking(move || {
        let max = embedder.max_tokens();
        let mut batch = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.into_iter().enumerate() {
            let ids = match input {
                Input::Text(s) => embedder.tokenize(&s),
                Input::Tokens(t) => t,
            };
            if ids.len() > max {
                return Err(ApiError::invalid(
                    "input",
                    format!(
                        "input {i} is {} tokens, more than this model's limit of {max} tokens; inputs are never truncated, so split it",
                        ids.len()
                    ),
                ));
            }
            batch.push(ids);
        }
        Ok(batch)
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "tokenizer task failed");
        ApiError::internal()
    })??;
    let tokens: usize = batch.iter().map(Vec::len).sum();
    call.admit(tokens, 0).await?;
    let _permit = model
        .permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::internal())?;
    let embedder = model.embedder.clone();
    let vectors = tokio::task::spawn_blocking(move || embedder.embed(&batch))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "embedding task failed");
            ApiError::internal()
        })??;
    call.embedded(tokens).await?;
    state
        .metrics
        .prompt_tokens
        .with_label_values(&[&model.name])
        .inc_by(tokens as u64);
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| Embedding {
            object: "embedding".into(),
            index,
            embedding: if base64 {
                EmbeddingVector::Base64(encode_base64(&v))
            } else {
                EmbeddingVector::Float(v)
            },
        })
        .collect();
    Ok(Json(EmbeddingList {
        object: "list".into(),
        data,
        model: model.name.clone(),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
    .into_response())
}

/// Little-endian `f32`s in standard base64, as the OpenAI clients decode them.
fn encode_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn input_shapes() {
        assert_eq!(parse_input(&json!("a")).map(|v| v.len()).ok(), Some(1));
        assert_eq!(
            parse_input(&json!(["a", "b"])).map(|v| v.len()).ok(),
            Some(2)
        );
        assert_eq!(
            parse_input(&json!([1, 2, 3])).map(|v| v.len()).ok(),
            Some(1)
        );
        assert_eq!(
            parse_input(&json!([[1], [2, 3]])).map(|v| v.len()).ok(),
            Some(2)
        );
        assert!(parse_input(&json!([])).is_err());
        assert!(parse_input(&json!([""])).is_err());
        assert!(parse_input(&json!([[]])).is_err());
        assert!(parse_input(&json!([1, "a"])).is_err());
        assert!(parse_input(&json!(5)).is_err());
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(encode_base64(&[1.0]), "AACAPw==");
    }
}
