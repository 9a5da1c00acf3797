//! `POST /v1/chat/completions`, streamed or not.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_engine::engine::FinishReason;
use kiln_engine::engine::{Completion, GenerateRequest, TokenLogprob};
use kiln_engine::template::ChatMessage;
use kiln_engine::tools::{split_output, Piece, ToolCallParser};
use kiln_types::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatMessageIn, FunctionCallDelta,
    FunctionCallOut, TokenLogprobOut, ToolCallDelta, ToolCallOut, TopLogprobOut,
};
use serde_json::Value;

use super::calls::CallContext;
use super::generate::{self, ChunkWriter};
use super::output::{self, OutputRules};
use super::{finish_call, route, unix_now, RequestId, Routed, SharedState};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{self, ApiJson};
use crate::upstream::Endpoint;

const ENDPOINT: &str = "/v1/chat/completions";

pub async fn chat_completions(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Extension(principal): Extension<Arc<Principal>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Response {
    if let Some(forwarded) =
        super::ask::to_serving_replica(&state, &principal, &headers, &body).await
    {
        return forwarded;
    }
    let (call, body) =
        match route(state, request_id, principal, ENDPOINT, Endpoint::Chat, body).await {
            Routed::Done(response) => return response,
            Routed::Local(call, body) => (call, body),
        };
    let req: ChatCompletionRequest = match extract::from_value(body) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let result = run(&call, req).await;
    finish_call(&call, result)
}

async fn run(call: &CallContext, req: ChatCompletionRequest) -> Result<Response, ApiError> {
    if let Some(kb) = req.model.strip_prefix(super::ask::KB_MODEL_PREFIX) {
        if req.tools.is_some() || req.response_format.is_some() {
            return Err(ApiError::invalid(
                "tools",
                "a knowledge-base model answers in prose with citations; `tools` and `response_format` are not supported with it",
            ));
        }
        let messages = chat_messages(&req.messages)?;
        return super::ask::chat(call, &req, kb, &messages).await;
    }
    if req.stream.unwrap_or(false) {
        let started = start(call, &req).await?;
        let writer = ChatChunks {
            id: started.id,
            created: started.created,
            model: req.model.clone(),
            logprobs: started.logprobs.is_some(),
            include_usage: req
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            calls: started.rules.tool_calls.then(ToolCallParser::new),
            calls_sent: 0,
        };
        return Ok(generate::sse_response(call.clone(), started.stream, writer));
    }
    let body = complete(call, req).await?;
    Ok(Json(body).into_response())
}

/// A generation submitted to the engine, with what its response needs.
struct Started {
    stream: kiln_engine::engine::GenerationStream,
    rules: OutputRules,
    logprobs: Option<usize>,
    id: String,
    created: u64,
}

/// A whole (not streamed) chat completion from the embedded engine, for an
/// admitted-on-demand `call`: the API's own path, and the one agents' steps
/// take.
pub(crate) async fn complete(
    call: &CallContext,
    req: ChatCompletionRequest,
) -> Result<ChatCompletion, ApiError> {
    let started = start(call, &req).await?;
    let done = generate::collect(call, started.stream).await?;
    let finish = done.completion.finish_reason;
    let (message, finish_reason) = assistant_message(done.text, &started.rules, finish);
    Ok(ChatCompletion {
        id: started.id,
        object: "chat.completion".into(),
        created: started.created,
        model: req.model,
        choices: vec![ChatChoice {
            index: 0,
            message,
            logprobs: started.logprobs.map(|_| ChatLogprobs {
                content: done.logprobs.into_iter().map(logprob_out).collect(),
            }),
            finish_reason,
        }],
        usage: generate::usage(&done.completion),
    })
}

/// Checks the request, renders and admits its prompt, and submits it.
async fn start(call: &CallContext, req: &ChatCompletionRequest) -> Result<Started, ApiError> {
    let engine = call.state.text_model(&req.model)?.clone();
    call.principal.check_model(&req.model)?;
    generate::check_n(req.n)?;
    let messages = chat_messages(&req.messages)?;
    let sampling = generate::sampling_params(&req.sampling)?;
    let stop = generate::stop_strings(&req.stop)?;
    let rules = output::output_rules(req)?;
    if rules.forced && !stop.is_empty() {
        return Err(ApiError::invalid(
            "stop",
            "`stop` cannot be used when the output's form is forced (`response_format` or a required tool call): it ends where its JSON ends",
        ));
    }
    let top_logprobs = generate::top_logprobs(req.top_logprobs, "top_logprobs")?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, _) => Some(top_logprobs),
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (false, _) => None,
    };
    let (given, param) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    let tools = rules.tools.clone();
    let prompt = generate::tokenize_blocking(&engine, move |e| {
        e.chat_prompt_with_tools(&messages, &tools)
            .map_err(ApiError::from)
    })
    .await?;
    let ctx = engine.model().info().context_length;
    let max_tokens = generate::max_tokens(given, param, prompt.len(), ctx)?;
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
        grammar: rules.grammar.clone(),
    })?;
    Ok(Started {
        stream,
        rules,
        logprobs,
        id: format!("chatcmpl-{}", call.request_id),
        created: unix_now(),
    })
}

/// The assistant's message: with tool calls, the text split into prose and
/// calls, and `tool_calls` as the finish reason when it made any.
fn assistant_message(
    text: String,
    rules: &OutputRules,
    finish: FinishReason,
) -> (AssistantMessage, String) {
    if !rules.tool_calls {
        let message = AssistantMessage {
            role: "assistant".into(),
            content: Some(text),
            tool_calls: None,
        };
        return (message, finish.as_str().into());
    }
    let (content, mut calls) = split_output(&text);
    if finish == FinishReason::Length {
        // `max_tokens` cut the last call short: a call whose arguments do
        // not parse is no call at all.
        while calls
            .last()
            .is_some_and(|(_, args)| serde_json::from_str::<Value>(args).is_err())
        {
            calls.pop();
        }
    }
    let calls: Vec<ToolCallOut> = calls
        .into_iter()
        .map(|(name, arguments)| ToolCallOut {
            id: output::call_id(),
            kind: "function".into(),
            function: FunctionCallOut { name, arguments },
        })
        .collect();
    let reason = finish_reason(finish, !calls.is_empty());
    let message = AssistantMessage {
        role: "assistant".into(),
        content: (!content.is_empty() || calls.is_empty()).then_some(content),
        tool_calls: (!calls.is_empty()).then_some(calls),
    };
    (message, reason)
}

fn finish_reason(finish: FinishReason, called: bool) -> String {
    match finish {
        FinishReason::Stop if called => "tool_calls".into(),
        other => other.as_str().into(),
    }
}

/// Wire messages to the engine's: roles checked, content parts joined.
fn chat_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                other => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!(
                            "message {i} has role `{other}`; the roles supported are system, user, assistant and tool"
                        ),
                    ))
                }
            };
            let mut message = ChatMessage::new(role, content_text(i, &m.content)?);
            if role == "assistant" {
                message.tool_calls = output::history_calls(i, m.tool_calls.as_ref())?;
            } else if m.tool_calls.as_ref().is_some_and(|c| !c.is_null()) {
                return Err(ApiError::invalid(
                    "messages",
                    format!("message {i}: only assistant messages carry `tool_calls`"),
                ));
            }
            if role == "tool" {
                message.tool_call_id = m.tool_call_id.clone();
            }
            Ok(message)
        })
        .collect()
}

fn content_text(i: usize, content: &Option<Value>) -> Result<String, ApiError> {
    let bad = |what: String| ApiError::invalid("messages", format!("message {i}: {what}"));
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                if kind != "text" {
                    return Err(bad(format!(
                        "content part {j} has type `{kind}`; only `text` parts are supported"
                    )));
                }
                let Some(t) = part.get("text").and_then(Value::as_str) else {
                    return Err(bad(format!("content part {j} needs a string `text`")));
                };
                text.push_str(t);
            }
            Ok(text)
        }
        Some(_) => Err(bad(
            "`content` must be a string or an array of text parts".to_string()
        )),
    }
}

fn logprob_out(lp: TokenLogprob) -> TokenLogprobOut {
    TokenLogprobOut {
        token: lp.token,
        logprob: lp.logprob,
        bytes: lp.bytes,
        top_logprobs: lp
            .top
            .into_iter()
            .map(|(token, bytes, logprob)| TopLogprobOut {
                token,
                logprob,
                bytes,
            })
            .collect(),
    }
}

struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    include_usage: bool,
    /// Splits the text into prose and tool calls, when tools may be called.
    calls: Option<ToolCallParser>,
    calls_sent: usize,
}

impl ChatChunks {
    fn delta(&self, delta: ChatDelta, logprobs: Option<ChatLogprobs>) -> String {
        self.chunk(
            vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason: None,
            }],
            None,
        )
    }

    /// Chunks for pieces of split text: prose as content; a call's id, type
    /// and name when it starts, then its arguments as they come.
    fn pieces(&mut self, pieces: Vec<Piece>) -> Vec<String> {
        let mut out = Vec::new();
        for piece in pieces {
            let delta = match piece {
                Piece::Text(text) => ChatDelta {
                    content: Some(text),
                    ..ChatDelta::default()
                },
                Piece::CallStart { name } => {
                    self.calls_sent += 1;
                    self.call_delta(Some(output::call_id()), Some(name), String::new())
                }
                Piece::Arguments(arguments) => self.call_delta(None, None, arguments),
            };
            out.push(self.delta(delta, None));
        }
        out
    }

    fn chunk(
        &self,
        choices: Vec<ChatChunkChoice>,
        usage: Option<kiln_types::openai::Usage>,
    ) -> String {
        let chunk = ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    fn call_delta(&self, id: Option<String>, name: Option<String>, arguments: String) -> ChatDelta {
        ChatDelta {
            tool_calls: Some(vec![ToolCallDelta {
                index: self.calls_sent.saturating_sub(1),
                kind: id.as_ref().map(|_| "function".to_string()),
                id,
                function: FunctionCallDelta { name, arguments },
            }]),
            ..ChatDelta::default()
        }
    }
}

impl ChunkWriter for ChatChunks {
    fn start(&mut self) -> Vec<String> {
        vec![self.chunk(
            vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                logprobs: None,
                finish_reason: None,
            }],
            None,
        )]
    }

    fn token(&mut self, text: String, logprob: Option<TokenLogprob>) -> Vec<String> {
        if let Some(parser) = &mut self.calls {
            let pieces = parser.push(&text);
            return self.pieces(pieces);
        }
        if text.is_empty() && !(self.logprobs && logprob.is_some()) {
            return Vec::new();
        }
        let logprobs = if self.logprobs {
            logprob.map(|lp| ChatLogprobs {
                content: vec![logprob_out(lp)],
            })
        } else {
            None
        };
        vec![self.chunk(
            vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta {
                    role: None,
                    content: Some(text),
                    tool_calls: None,
                },
                logprobs,
                finish_reason: None,
            }],
            None,
        )]
    }

    fn finish(&mut self, c: &Completion) -> Vec<String> {
        let mut out = match self.calls.as_mut().map(ToolCallParser::finish) {
            Some(rest) => self.pieces(rest),
            None => Vec::new(),
        };
        out.push(self.chunk(
            vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta::default(),
                logprobs: None,
                finish_reason: Some(finish_reason(c.finish_reason, self.calls_sent > 0)),
            }],
            None,
        ));
        if self.include_usage {
            out.push(self.chunk(Vec::new(), Some(generate::usage(c))));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msgs(v: Value) -> Vec<ChatMessageIn> {
        serde_json::from_value(v).unwrap_or_default()
    }

    #[test]
    fn text_parts_are_joined_and_other_parts_refused() {
        let ok = chat_messages(&msgs(json!([{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])));
        assert_eq!(
            ok.ok().map(|m| m[0].content.clone()),
            Some("ab".to_string())
        );
        let image = chat_messages(&msgs(json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}])));
        assert!(image.is_err_and(|e| e.message.contains("image_url")));
    }

    #[test]
    fn empty_messages_and_unknown_roles_are_refused() {
        assert!(chat_messages(&[]).is_err());
        assert!(chat_messages(&msgs(json!([{"role": "robot", "content": "x"}]))).is_err());
        assert!(chat_messages(&msgs(
            json!([{"role": "user", "content": "x", "tool_calls": []}])
        ))
        .is_err());
    }
}
