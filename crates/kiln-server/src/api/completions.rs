//! `POST /v1/completions`: raw-prompt text completion, streamed or not.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_engine::engine::{Completion, GenerateRequest, TokenLogprob};
use kiln_types::openai::{CompletionRequest, TextChoice, TextCompletion, TextLogprobs, Usage};
use serde_json::Value;

use super::calls::CallContext;
use super::generate::{self, ChunkWriter};
use super::{finish_call, route, unix_now, RequestId, Routed, SharedState};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{self, ApiJson};
use crate::upstream::Endpoint;

const ENDPOINT: &str = "/v1/completions";

pub async fn completions(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Extension(principal): Extension<Arc<Principal>>,
    ApiJson(body): ApiJson<Value>,
) -> Response {
    let (call, body) = match route(
        state,
        request_id,
        principal,
        ENDPOINT,
        Endpoint::Completions,
        body,
    )
    .await
    {
        Routed::Done(response) => return response,
        Routed::Local(call, body) => (call, body),
    };
    let req: CompletionRequest = match extract::from_value(body) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let result = run(&call, req).await;
    finish_call(&call, result)
}

/// A prompt as the client sent it.
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

fn parse_prompt(v: &Value) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, an array of token ids, or a one-element list of either",
        )
    };
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(items) if items.iter().all(Value::is_number) && !items.is_empty() => items
            .iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<_, _>>()
            .map(Prompt::Tokens),
        Value::Array(items) if items.len() == 1 && !items[0].is_number() => parse_prompt(&items[0]),
        Value::Array(items) if items.len() > 1 && !items[0].is_number() => Err(ApiError::invalid(
            "prompt",
            format!(
                "`prompt` holds {} prompts; only one prompt per request is supported",
                items.len()
            ),
        )),
        _ => Err(bad()),
    }
}

async fn run(call: &CallContext, req: CompletionRequest) -> Result<Response, ApiError> {
    let engine = call.state.text_model(&req.model)?.clone();
    call.principal.check_model(&req.model)?;
    generate::check_n(req.n)?;
    if req.echo.unwrap_or(false) {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    let prompt = parse_prompt(&req.prompt)?;
    let sampling = generate::sampling_params(&req.sampling)?;
    let stop = generate::stop_strings(&req.stop)?;
    let logprobs = match req.logprobs {
        None => None,
        Some(n) => Some(generate::top_logprobs(Some(n), "logprobs")?),
    };
    let prompt = match prompt {
        Prompt::Tokens(t) => t,
        Prompt::Text(text) => {
            generate::tokenize_blocking(&engine, move |e| Ok(e.model().text_prompt(&text))).await?
        }
    };
    let ctx = engine.model().info().context_length;
    // OpenAI's legacy default is 16 tokens; Kiln's is what fits the context.
    let max_tokens = generate::max_tokens(req.max_tokens, "max_tokens", prompt.len(), ctx)?;
    call.admit(prompt.len(), max_tokens).await?;
    let stream = engine.submit(GenerateRequest {
        prompt,
        sampling,
        max_tokens,
        stop,
        logprobs,
        ignore_eos: req.ignore_eos.unwrap_or(false),
        priority: generate::priority(req.priority, call.principal.priority())?,
        tenant: call.principal.tenant.id.clone(),
        grammar: None,
    })?;
    let mut chunks = TextChunks {
        id: format!("cmpl-{}", call.request_id),
        created: unix_now(),
        model: req.model.clone(),
        logprobs: logprobs.is_some(),
        include_usage: req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        offset: 0,
    };
    if req.stream.unwrap_or(false) {
        return Ok(generate::sse_response(call.clone(), stream, chunks));
    }
    let done = generate::collect(call, stream).await?;
    let logprobs = chunks.logprobs.then(|| chunks.text_logprobs(done.logprobs));
    let body = chunks.body(
        done.text,
        logprobs,
        Some(done.completion.finish_reason.as_str().into()),
        Some(generate::usage(&done.completion)),
    );
    Ok(Json(body).into_response())
}

struct TextChunks {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    include_usage: bool,
    /// Characters of text sent so far, for `text_offset`.
    offset: usize,
}

impl TextChunks {
    fn body(
        &self,
        text: String,
        logprobs: Option<TextLogprobs>,
        finish_reason: Option<String>,
        usage: Option<Usage>,
    ) -> TextCompletion {
        TextCompletion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![TextChoice {
                index: 0,
                text,
                logprobs,
                finish_reason,
            }],
            usage,
        }
    }

    fn text_logprobs(&mut self, lps: Vec<TokenLogprob>) -> TextLogprobs {
        let mut out = TextLogprobs::default();
        for lp in lps {
            out.text_offset.push(self.offset);
            self.offset += lp.token.chars().count();
            out.tokens.push(lp.token);
            out.token_logprobs.push(lp.logprob);
            out.top_logprobs
                .push(lp.top.into_iter().map(|(t, _, l)| (t, l)).collect());
        }
        out
    }
}

impl ChunkWriter for TextChunks {
    fn start(&mut self) -> Vec<String> {
        Vec::new()
    }

    fn token(&mut self, text: String, logprob: Option<TokenLogprob>) -> Vec<String> {
        let logprobs = match (self.logprobs, logprob) {
            (true, Some(lp)) => Some(self.text_logprobs(vec![lp])),
            _ => None,
        };
        if text.is_empty() && logprobs.is_none() {
            return Vec::new();
        }
        let chunk = self.body(text, logprobs, None, None);
        vec![serde_json::to_string(&chunk).unwrap_or_default()]
    }

    fn finish(&mut self, c: &Completion) -> Vec<String> {
        let last = self.body(
            String::new(),
            None,
            Some(c.finish_reason.as_str().into()),
            None,
        );
        let mut out = vec![serde_json::to_string(&last).unwrap_or_default()];
        if self.include_usage {
            let mut usage = self.body(String::new(), None, None, Some(generate::usage(c)));
            usage.choices.clear();
            out.push(serde_json::to_string(&usage).unwrap_or_default());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompt_shapes() {
        assert!(matches!(parse_prompt(&json!("hi")), Ok(Prompt::Text(_))));
        assert!(matches!(parse_prompt(&json!([1, 2])), Ok(Prompt::Tokens(t)) if t == vec![1, 2]));
        assert!(matches!(parse_prompt(&json!(["hi"])), Ok(Prompt::Text(_))));
        assert!(matches!(parse_prompt(&json!([[3]])), Ok(Prompt::Tokens(_))));
        assert!(parse_prompt(&json!(["a", "b"])).is_err());
        assert!(parse_prompt(&json!([-1])).is_err());
        assert!(parse_prompt(&json!([1.5])).is_err());
        assert!(parse_prompt(&json!([])).is_err());
        assert!(parse_prompt(&json!({"a": 1})).is_err());
    }
}
