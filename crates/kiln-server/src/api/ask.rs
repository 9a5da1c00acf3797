//! Grounded answers from a knowledge base: `POST /api/kbs/{kb}/ask`, and
//! the same through `/v1/chat/completions` with the model `kb:<name>`, so
//! OpenAI clients use a knowledge base unchanged.
//!
//! The question is searched (hybrid), the hits are passed through the
//! relevance gate of [`kiln_rag::ground`], and only when something relevant
//! is left is the model asked, greedily, with the hits as numbered sources.
//! When nothing is relevant the answer says the knowledge base does not
//! contain it, and no generation is made (nor charged). Each sentence of the
//! answer is checked against the sources and returned marked supported or
//! not, with citations quoting the source sentence and its character
//! offsets in the document. The query embedding and the generation are
//! metered to the caller's key like any call.

use std::sync::Arc;

use axum::http::HeaderMap;
use kiln_engine::engine::{EngineHandle, GenerateRequest};
use kiln_engine::sampler::SamplingParams;
use kiln_engine::template::ChatMessage;
use kiln_rag::fulltext::Filter;
use kiln_rag::ground::{self, CheckedSentence, Citation, Thresholds};
use kiln_rag::kb::{Hit, KnowledgeBase, Query};
use kiln_rag::retrieve::{Fusion, Mode};
use serde::Serialize;

use super::calls::CallContext;
use super::kb::visibility;
use super::{generate, SharedState};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::forward::FORWARDED_BY;

/// Chat completions with the model `kb:<name or id>` answer from that
/// knowledge base.
pub const KB_MODEL_PREFIX: &str = "kb:";

/// The ledger endpoint of an answer's generation.
pub const ASK_ENDPOINT: &str = "/api/kbs/ask";
/// The text model answers use when none is named, if it is served: the
/// instruction-tuned one.
const PREFERRED_MODEL: &str = "smollm2-135m";
const DEFAULT_SOURCES: usize = 4;
const DEFAULT_MAX_TOKENS: usize = 256;

/// What is asked.
pub struct Question {
    pub text: String,
    pub model: Option<String>,
    pub sources: Option<usize>,
    pub max_tokens: Option<usize>,
    pub metadata: Vec<(String, String)>,
    /// This ask's thresholds instead of the knowledge base's.
    pub grounding: Option<Thresholds>,
}

#[derive(Debug, Serialize)]
pub struct Answer {
    pub object: &'static str,
    pub answer: String,
    /// False when the knowledge base does not hold the answer.
    pub found: bool,
    pub model: String,
    pub sentences: Vec<CheckedSentence>,
    pub citations: Vec<Citation>,
    pub sources: Vec<Hit>,
    pub usage: kiln_types::openai::Usage,
    pub finish_reason: String,
}

/// The model answers use: the one named, else the instruction-tuned
/// default, else the first served.
fn answer_model<'a>(
    state: &'a SharedState,
    named: Option<&str>,
) -> Result<(String, &'a EngineHandle), ApiError> {
    let name = match named {
        Some(n) => n.to_string(),
        None if state.models.text.contains_key(PREFERRED_MODEL) => PREFERRED_MODEL.to_string(),
        None => state
            .models
            .text
            .keys()
            .next()
            .cloned()
            .ok_or_else(|| ApiError::model_not_found("(none)", "text"))?,
    };
    let engine = state.text_model(&name)?;
    Ok((name, engine))
}

pub async fn answer(
    state: &SharedState,
    principal: &Arc<Principal>,
    request_id: &str,
    kb: Arc<KnowledgeBase>,
    q: Question,
) -> Result<Answer, ApiError> {
    if q.text.trim().is_empty() {
        return Err(ApiError::invalid(
            "question",
            "the question must not be empty",
        ));
    }
    let k = q.sources.unwrap_or(DEFAULT_SOURCES);
    if !(1..=20).contains(&k) {
        return Err(ApiError::invalid(
            "sources",
            "`sources` must be between 1 and 20",
        ));
    }
    let (model, engine) = answer_model(state, q.model.as_deref())?;
    principal.check_model(&model)?;
    let engine = engine.clone();
    let thresholds = match q.grounding {
        Some(t) => {
            t.validate()
                .map_err(|m| ApiError::invalid("grounding", m))?;
            t
        }
        None => kb.settings().grounding,
    };
    let query = Query {
        text: q.text.clone(),
        k,
        mode: Mode::Hybrid,
        fusion: Fusion::default(),
        filter: Filter {
            groups: visibility(principal),
            metadata: q.metadata,
        },
    };
    let hits = super::kb::metered_search(state, principal, kb, query).await?;
    let mut sources: Vec<Hit> = hits
        .into_iter()
        .filter(|h| ground::is_relevant(&q.text, h, &thresholds))
        .collect();
    let none = |model: String| Answer {
        object: "knowledge_base.answer",
        answer: ground::NOT_FOUND.to_string(),
        found: false,
        model,
        sentences: Vec::new(),
        citations: Vec::new(),
        sources: Vec::new(),
        usage: kiln_types::openai::Usage::default(),
        finish_reason: "stop".into(),
    };
    if sources.is_empty() {
        return Ok(none(model));
    }
    // Fit the prompt: drop the weakest sources until it leaves room.
    let ctx = engine.model().info().context_length;
    let max_tokens = q.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if !(1..=4096).contains(&max_tokens) {
        return Err(ApiError::invalid(
            "max_tokens",
            "`max_tokens` must be between 1 and 4096",
        ));
    }
    let prompt = loop {
        let (system, user) = ground::prompt(&q.text, &sources);
        let messages = vec![
            ChatMessage::new("system", system),
            ChatMessage::new("user", user),
        ];
        let prompt = generate::tokenize_blocking(&engine, move |e| {
            e.chat_prompt(&messages).map_err(ApiError::from)
        })
        .await?;
        if prompt.len() + max_tokens <= ctx || sources.len() == 1 {
            break prompt;
        }
        sources.pop();
    };
    let max_tokens =
        generate::max_tokens(Some(max_tokens as i64), "max_tokens", prompt.len(), ctx)?;
    let call = CallContext::new(
        state.clone(),
        request_id.to_string(),
        ASK_ENDPOINT,
        model.clone(),
        principal.clone(),
    );
    call.admit(prompt.len(), max_tokens).await?;
    let stream = engine.submit(GenerateRequest {
        prompt,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        max_tokens,
        priority: principal.priority(),
        tenant: principal.tenant.id.clone(),
        ..GenerateRequest::default()
    });
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            let e = ApiError::from(e);
            call.failed(e.code.as_str(), super::calls::Used::default());
            return Err(e);
        }
    };
    let done = generate::collect(&call, stream).await?;
    let text = done.text.trim().to_string();
    let found = !ground::says_not_found(&text);
    let sentences = if found {
        ground::check(&text, &sources, &thresholds)
    } else {
        Vec::new()
    };
    let citations = ground::citations(&sentences, &sources);
    Ok(Answer {
        object: "knowledge_base.answer",
        answer: text,
        found,
        model,
        sentences,
        citations,
        sources,
        usage: generate::usage(&done.completion),
        finish_reason: done.completion.finish_reason.as_str().into(),
    })
}

/// `/v1/chat/completions` with the model `kb:<name>`: the last user message
/// is the question; the answer comes back as the assistant message, with
/// the checked sentences and citations in an extra `citations` field (and
/// in the last stream chunk when streamed).
/// A chat request for a knowledge base another replica holds, sent there
/// (see [`crate::forward`]); `None` when this replica answers it.
pub async fn to_serving_replica(
    state: &SharedState,
    principal: &Principal,
    headers: &HeaderMap,
    body: &serde_json::Value,
) -> Option<axum::response::Response> {
    use axum::response::IntoResponse;
    let kb = body["model"].as_str()?.strip_prefix(KB_MODEL_PREFIX)?;
    let k = state.knowledge.as_ref()?;
    if headers.contains_key(FORWARDED_BY) || super::kb::find(state, principal, kb).is_ok() {
        return None;
    }
    let (k2, tenant, key) = (
        k.clone(),
        super::kb::scope(principal).map(String::from),
        kb.to_string(),
    );
    let owner = super::kb::blocking(move || k2.owner(tenant.as_deref(), &key)).await;
    let url = match owner {
        Ok(Some(url)) => url,
        Ok(None) => return None,
        Err(e) => return Some(e.into_response()),
    };
    let mut req = axum::extract::Request::new(axum::body::Body::from(body.to_string()));
    *req.method_mut() = axum::http::Method::POST;
    *req.uri_mut() = axum::http::Uri::from_static("/v1/chat/completions");
    *req.headers_mut() = headers.clone();
    req.headers_mut().remove(axum::http::header::CONTENT_LENGTH);
    Some(k.forward(&url, req).await)
}

pub async fn chat(
    call: &CallContext,
    req: &kiln_types::openai::ChatCompletionRequest,
    kb: &str,
    messages: &[ChatMessage],
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let state = &call.state;
    let base = super::kb::find(state, &call.principal, kb)?;
    let question = messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.clone())
        .ok_or_else(|| {
            ApiError::invalid(
                "messages",
                "a knowledge-base model needs a user message: the question",
            )
        })?;
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .map(|n| usize::try_from(n).unwrap_or(0));
    let a = answer(
        state,
        &call.principal,
        &call.request_id,
        base,
        Question {
            text: question,
            model: None,
            sources: None,
            max_tokens,
            metadata: Vec::new(),
            grounding: None,
        },
    )
    .await?;
    let id = format!("chatcmpl-{}", call.request_id);
    let created = super::unix_now();
    let extra = serde_json::json!({
        "found": a.found,
        "sentences": a.sentences,
        "citations": a.citations,
    });
    if req.stream.unwrap_or(false) {
        let chunk = |delta: serde_json::Value, finish: Option<&str>, with_extra: bool| {
            let mut c = serde_json::json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            });
            if with_extra {
                c["knowledge_base"] = extra.clone();
            }
            format!("data: {c}\n\n")
        };
        let body = [
            chunk(
                serde_json::json!({"role": "assistant", "content": ""}),
                None,
                false,
            ),
            chunk(serde_json::json!({"content": a.answer}), None, false),
            chunk(serde_json::json!({}), Some(&a.finish_reason), true),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        return Ok((
            [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
            body,
        )
            .into_response());
    }
    Ok(axum::Json(serde_json::json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": a.answer},
            "finish_reason": a.finish_reason,
        }],
        "usage": a.usage,
        "knowledge_base": extra,
    }))
    .into_response())
}
