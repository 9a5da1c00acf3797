//! `ApiError`: every failure a `/v1` request can end in, and the one place
//! that decides its HTTP status and stable code.
//!
//! Engine errors are mapped exhaustively (no catch-all arm), so a new engine
//! error variant fails to compile here until someone decides how clients see
//! it. Internal failures (tensor, I/O) are logged with their detail and sent
//! to the client as a generic message.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_engine::EngineError;
use kiln_types::error::{ErrorBody, ErrorCode};

/// Seconds a client should wait before retrying a 429.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub param: Option<&'static str>,
    /// Extra response headers (`Retry-After`, `x-ratelimit-*`).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            param: None,
            headers: Vec::new(),
        }
    }

    /// A bad value in field `param`.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code: ErrorCode::InvalidRequest,
            message: message.into(),
            param: Some(param),
            headers: Vec::new(),
        }
    }

    pub fn model_not_found(model: &str, kind: &str) -> Self {
        ApiError {
            code: ErrorCode::ModelNotFound,
            message: format!(
                "the {kind} model `{model}` does not exist or is not served here; GET /v1/models lists the models served"
            ),
            param: Some("model"),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl ToString) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    pub fn internal() -> Self {
        ApiError::new(
            ErrorCode::InternalError,
            "the server failed to complete the request; see its log for details",
        )
    }
}

/// The HTTP status for each code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidJson | ErrorCode::InvalidRequest | ErrorCode::ContextLengthExceeded => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::ModelNotFound | ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::ServerBusy | ErrorCode::RateLimitExceeded | ErrorCode::InsufficientQuota => {
            StatusCode::TOO_MANY_REQUESTS
        }
        ErrorCode::MissingApiKey | ErrorCode::InvalidApiKey => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied | ErrorCode::AccountDisabled => StatusCode::FORBIDDEN,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::LedgerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::UpstreamError => StatusCode::BAD_GATEWAY,
        ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A store failure as the client sees it: the caller's own mistakes
/// (invalid values, a clash, a missing object) keep their message; anything
/// else means the database cannot be used, logged in detail and answered 503.
pub fn store_unavailable(e: kiln_store::StoreError) -> ApiError {
    use kiln_store::StoreError;
    match e {
        StoreError::Invalid(m) => ApiError::new(ErrorCode::InvalidRequest, m),
        StoreError::Conflict(m) => ApiError::new(ErrorCode::Conflict, m),
        StoreError::NotFound(m) => ApiError::new(ErrorCode::NotFound, m),
        e => {
            tracing::error!(error = %e, "the store failed");
            ApiError::new(
                ErrorCode::LedgerUnavailable,
                "the usage ledger cannot be written right now, so the request was not served; retry later",
            )
            .with_header("retry-after", RETRY_AFTER_SECS)
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest(msg) => ApiError::new(ErrorCode::InvalidRequest, msg),
            EngineError::ContextOverflow {
                prompt_tokens,
                context_length,
            } => ApiError {
                code: ErrorCode::ContextLengthExceeded,
                message: format!(
                    "the prompt is {prompt_tokens} tokens but the model's context length is {context_length} tokens; shorten the prompt (it is never truncated)"
                ),
                param: None,
                headers: Vec::new(),
            },
            EngineError::KvCacheFull { needed, capacity } => ApiError {
                code: ErrorCode::ContextLengthExceeded,
                message: format!(
                    "the prompt needs {needed} tokens of KV cache but this server's KV cache budget holds {capacity} tokens; shorten the prompt (the operator can raise kv_cache_mb)"
                ),
                param: None,
                headers: Vec::new(),
            },
            EngineError::Template(msg) => ApiError {
                code: ErrorCode::InvalidRequest,
                message: format!("the model's chat template refused these messages: {msg}"),
                param: Some("messages"),
                headers: Vec::new(),
            },
            EngineError::Busy => ApiError::new(
                ErrorCode::ServerBusy,
                "the model's request queue is full; retry shortly",
            ),
            EngineError::Stopped => ApiError::new(
                ErrorCode::ServiceUnavailable,
                "the model is not running (the server may be shutting down)",
            ),
            // Failures of the model or the machine, not of the request: the
            // detail goes to the log only.
            e @ (EngineError::BadModelFile { .. }
            | EngineError::UnsupportedArchitecture(_)
            | EngineError::Metadata(_)
            | EngineError::Tensor(_)
            | EngineError::Io { .. }
            | EngineError::Pull(_)) => {
                tracing::error!(error = %e, "internal engine error");
                ApiError::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(self.code);
        let body = ErrorBody::new(self.code, self.message, self.param);
        let mut response = (status, Json(body)).into_response();
        if self.code == ErrorCode::ServerBusy {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, v);
            }
        }
        // The metrics middleware counts errors by code.
        response.extensions_mut().insert(self.code);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_do_not_leak_detail() {
        let e: ApiError = EngineError::io("/secret/path", std::io::Error::other("disk")).into();
        assert_eq!(e.code, ErrorCode::InternalError);
        assert!(!e.message.contains("secret"));
    }

    #[test]
    fn context_overflow_names_both_lengths() {
        let e: ApiError = EngineError::ContextOverflow {
            prompt_tokens: 9000,
            context_length: 8192,
        }
        .into();
        assert_eq!(status_of(e.code), StatusCode::BAD_REQUEST);
        assert!(e.message.contains("9000") && e.message.contains("8192"));
    }

    #[test]
    fn busy_carries_retry_after() {
        let r = ApiError::from(EngineError::Busy).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
    }
}
