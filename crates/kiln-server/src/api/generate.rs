//! What chat and text completions share: reading sampling fields, stop
//! strings and token limits off the wire; running a generation to the end;
//! and turning a generation into a server-sent-event stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use kiln_engine::engine::{
    Completion, EngineHandle, GenerateEvent, GenerationStream, TokenLogprob,
};
use kiln_engine::sampler::SamplingParams;
use kiln_types::error::{ErrorBody, ErrorCode};
use kiln_types::openai::{PromptTokensDetails, SamplingFields, Usage};
use serde_json::Value;

use super::calls::{CallContext, Used};
use super::Streamed;
use crate::error::ApiError;

/// Most alternatives a client may ask for per token.
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 4;

pub fn sampling_params(f: &SamplingFields) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let top_k = match f.top_k {
        None => d.top_k,
        Some(k) if k < 0 => {
            return Err(ApiError::invalid(
                "top_k",
                "`top_k` must be 0 (disabled) or more",
            ))
        }
        Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
    };
    let params = SamplingParams {
        temperature: f.temperature.map_or(d.temperature, |v| v as f32),
        top_k,
        top_p: f.top_p.map_or(d.top_p, |v| v as f32),
        min_p: f.min_p.map_or(d.min_p, |v| v as f32),
        // Any 64-bit pattern is a fine seed; negative ones are reinterpreted.
        seed: f.seed.map(|s| s as u64),
        presence_penalty: f.presence_penalty.map_or(d.presence_penalty, |v| v as f32),
        frequency_penalty: f
            .frequency_penalty
            .map_or(d.frequency_penalty, |v| v as f32),
        repetition_penalty: f
            .repetition_penalty
            .map_or(d.repetition_penalty, |v| v as f32),
    };
    params.validate()?;
    Ok(params)
}

/// `stop`: absent, null, a string, or a list of at most four strings.
pub fn stop_strings(stop: &Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "stop",
            format!("`stop` must be a string or a list of at most {MAX_STOP_STRINGS} strings"),
        )
    };
    let list = match stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP_STRINGS {
                return Err(bad());
            }
            items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_, _>>()?
        }
        Some(_) => return Err(bad()),
    };
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    Ok(list)
}

pub fn check_n(n: Option<i64>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(ApiError::invalid(
            "n",
            format!("`n` is {n}, but only 1 choice per request is supported"),
        )),
    }
}

/// The scheduling priority a request runs at: its key's priority, or less
/// when the request asks for less (`priority`, -100 to 100). A request can
/// lower its priority (background work yields to interactive calls) but never
/// raise it above its key's, so no caller jumps ahead of what the operator
/// gave it.
pub fn priority(asked: Option<i64>, key_priority: i32) -> Result<i32, ApiError> {
    match asked {
        None => Ok(key_priority),
        Some(p) if (-100..=100).contains(&p) => Ok((p as i32).min(key_priority)),
        Some(p) => Err(ApiError::invalid(
            "priority",
            format!("`priority` is {p}; it must be between -100 and 100"),
        )),
    }
}

/// The number of tokens to generate: the client's limit, checked against the
/// context, or by default all the context the prompt leaves.
pub fn max_tokens(
    given: Option<i64>,
    param: &'static str,
    prompt_tokens: usize,
    context_length: usize,
) -> Result<usize, ApiError> {
    if prompt_tokens >= context_length {
        return Err(kiln_engine::EngineError::ContextOverflow {
            prompt_tokens,
            context_length,
        }
        .into());
    }
    let room = context_length - prompt_tokens;
    match given {
        None => Ok(room),
        Some(n) if n < 1 => Err(ApiError::invalid(
            param,
            format!("`{param}` is {n}; it must be at least 1"),
        )),
        Some(n) if n as u64 > room as u64 => Err(ApiError {
            code: ErrorCode::ContextLengthExceeded,
            message: format!(
                "the prompt is {prompt_tokens} tokens and `{param}` is {n}, but the model's context length is {context_length} tokens; at most {room} tokens can be generated for this prompt"
            ),
            param: Some(param),
            headers: Vec::new(),
        }),
        Some(n) => Ok(n as usize),
    }
}

pub fn top_logprobs(n: Option<i64>, param: &'static str) -> Result<usize, ApiError> {
    match n {
        None => Ok(0),
        Some(n) if (0..=MAX_TOP_LOGPROBS).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::invalid(
            param,
            format!("`{param}` is {n}; it must be between 0 and {MAX_TOP_LOGPROBS}"),
        )),
    }
}

pub fn usage(c: &Completion) -> Usage {
    Usage {
        prompt_tokens: c.prompt_tokens,
        completion_tokens: c.completion_tokens,
        total_tokens: c.prompt_tokens + c.completion_tokens,
        prompt_tokens_details: Some(PromptTokensDetails {
            cached_tokens: c.cached_tokens,
        }),
    }
}

/// Tokenizes off the async threads: a long prompt takes a while.
pub async fn tokenize_blocking<F>(engine: &EngineHandle, f: F) -> Result<Vec<u32>, ApiError>
where
    F: FnOnce(&EngineHandle) -> Result<Vec<u32>, ApiError> + Send + 'static,
{
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || f(&engine))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "tokenizer task failed");
            ApiError::internal()
        })?
}

/// A whole generation: the text, per-token log-probabilities and the summary.
pub struct Generated {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub completion: Completion,
}

/// Runs a generation to its end, recording its metrics, and settles the
/// call before returning.
pub async fn collect(
    call: &CallContext,
    mut stream: GenerationStream,
) -> Result<Generated, ApiError> {
    let metrics = &call.state.metrics;
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut first_token = None;
    let mut used = Used::default();
    while let Some(event) = stream.next().await {
        match event {
            Ok(GenerateEvent::Token {
                text: piece,
                logprob,
                cached_tokens,
                ..
            }) => {
                if first_token.is_none() {
                    let after = call.received.elapsed();
                    metrics.record_first_token(&call.model, after);
                    first_token = Some(after);
                }
                used.prompt_done = true;
                used.cached_tokens = cached_tokens;
                used.completion_tokens += 1;
                call.progress(used);
                text.push_str(&piece);
                logprobs.extend(logprob);
            }
            Ok(GenerateEvent::Finished(completion)) => {
                metrics.record_generation(&call.model, &completion);
                call.finished(&completion, first_token).await?;
                return Ok(Generated {
                    text,
                    logprobs,
                    completion,
                });
            }
            Err(e) => {
                let e = ApiError::from(e);
                call.failed(e.code.as_str(), used);
                return Err(e);
            }
        }
    }
    tracing::error!("generation ended without a summary");
    call.failed(ErrorCode::InternalError.as_str(), used);
    Err(ApiError::internal())
}

/// What a streamed response makes of each step of a generation.
pub trait ChunkWriter: Send + 'static {
    /// JSON payloads to send before the first token.
    fn start(&mut self) -> Vec<String>;
    /// Payloads for one token (none when it released no text and no logprob is wanted).
    fn token(&mut self, text: String, logprob: Option<TokenLogprob>) -> Vec<String>;
    /// Payloads after the last token.
    fn finish(&mut self, completion: &Completion) -> Vec<String>;
}

struct SseState<W> {
    stream: GenerationStream,
    writer: W,
    pending: VecDeque<String>,
    call: CallContext,
    first_token: Option<Duration>,
    used: Used,
    ended: bool,
}

/// A server-sent-event response for a generation, ending with `data: [DONE]`.
/// Dropping it (the client went away) drops the generation stream, which
/// stops the generation.
pub fn sse_response<W: ChunkWriter>(
    call: CallContext,
    stream: GenerationStream,
    mut writer: W,
) -> Response {
    let pending: VecDeque<String> = writer.start().into();
    let sse = SseState {
        stream,
        writer,
        pending,
        call,
        first_token: None,
        used: Used::default(),
        ended: false,
    };
    let body = Sse::new(events(sse)).keep_alive(KeepAlive::default());
    let mut response = body.into_response();
    response.extensions_mut().insert(Streamed);
    response
}

fn events<W: ChunkWriter>(sse: SseState<W>) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(sse, |mut s| async move {
        loop {
            if let Some(data) = s.pending.pop_front() {
                return Some((Ok(Event::default().data(data)), s));
            }
            if s.ended {
                return None;
            }
            match s.stream.next().await {
                Some(Ok(GenerateEvent::Token {
                    text,
                    logprob,
                    cached_tokens,
                    ..
                })) => {
                    if s.first_token.is_none() {
                        let after = s.call.received.elapsed();
                        s.call
                            .state
                            .metrics
                            .record_first_token(&s.call.model, after);
                        s.first_token = Some(after);
                    }
                    s.used.prompt_done = true;
                    s.used.cached_tokens = cached_tokens;
                    s.used.completion_tokens += 1;
                    s.pending.extend(s.writer.token(text, logprob));
                }
                Some(Ok(GenerateEvent::Finished(c))) => {
                    s.call.state.metrics.record_generation(&s.call.model, &c);
                    // The final chunks go out only once the call is in the ledger.
                    match s.call.finished(&c, s.first_token).await {
                        Ok(()) => s.pending.extend(s.writer.finish(&c)),
                        Err(e) => s.error_event(e),
                    }
                    s.finish();
                }
                Some(Err(e)) => {
                    let e = ApiError::from(e);
                    s.call.failed(e.code.as_str(), s.used);
                    s.error_event(e);
                    s.finish();
                }
                None => {
                    tracing::error!("generation ended without a summary");
                    s.call.failed(ErrorCode::InternalError.as_str(), s.used);
                    s.finish();
                }
            }
        }
    })
}

impl<W> SseState<W> {
    fn error_event(&mut self, e: ApiError) {
        self.call
            .state
            .metrics
            .errors
            .with_label_values(&[e.code.as_str()])
            .inc();
        let body = ErrorBody::new(e.code, e.message, e.param);
        self.pending
            .push_back(serde_json::to_string(&body).unwrap_or_default());
    }

    fn finish(&mut self) {
        self.pending.push_back("[DONE]".to_string());
        self.ended = true;
        self.call
            .state
            .metrics
            .request_duration
            .with_label_values(&[self.call.endpoint])
            .observe(self.call.received.elapsed().as_secs_f64());
    }
}

/// A stream dropped before its end: the client went away.
impl<W> Drop for SseState<W> {
    fn drop(&mut self) {
        if !self.ended {
            tracing::info!(request_id = %self.call.request_id, "client disconnected; generation cancelled");
            self.call.cancelled(self.used, self.first_token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_may_lower_its_priority_but_not_raise_it() {
        assert_eq!(priority(None, 0).ok(), Some(0));
        assert_eq!(priority(None, 20).ok(), Some(20));
        assert_eq!(priority(Some(-50), 20).ok(), Some(-50));
        assert_eq!(priority(Some(90), 20).ok(), Some(20));
        assert_eq!(priority(Some(90), -10).ok(), Some(-10));
        assert!(priority(Some(101), 100).is_err());
        assert!(priority(Some(-101), 0).is_err());
    }

    #[test]
    fn max_tokens_rules() {
        assert_eq!(max_tokens(None, "max_tokens", 10, 100).ok(), Some(90));
        assert_eq!(max_tokens(Some(5), "max_tokens", 10, 100).ok(), Some(5));
        let zero = max_tokens(Some(0), "max_tokens", 10, 100).err();
        assert_eq!(zero.map(|e| e.code), Some(ErrorCode::InvalidRequest));
        let past = max_tokens(Some(91), "max_tokens", 10, 100).err();
        assert!(past.is_some_and(|e| e.message.contains("100") && e.message.contains("91")));
        let overflow = max_tokens(None, "max_tokens", 100, 100).err();
        assert_eq!(
            overflow.map(|e| e.code),
            Some(ErrorCode::ContextLengthExceeded)
        );
    }

    #[test]
    fn stop_shapes() {
        assert_eq!(stop_strings(&None).ok(), Some(vec![]));
        assert_eq!(
            stop_strings(&Some(Value::from("x"))).ok(),
            Some(vec!["x".to_string()])
        );
        assert!(stop_strings(&Some(serde_json::json!(["a", "b", "c", "d", "e"]))).is_err());
        assert!(stop_strings(&Some(serde_json::json!([1]))).is_err());
        assert!(stop_strings(&Some(serde_json::json!(3))).is_err());
    }

    #[test]
    fn sampling_ranges_are_checked() {
        let f = SamplingFields {
            temperature: Some(3.0),
            ..SamplingFields::default()
        };
        assert!(sampling_params(&f).is_err());
        let f = SamplingFields {
            top_k: Some(-1),
            ..SamplingFields::default()
        };
        assert!(sampling_params(&f).is_err());
        assert!(sampling_params(&SamplingFields::default()).is_ok());
    }
}
