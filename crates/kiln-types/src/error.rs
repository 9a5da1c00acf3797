//! Stable error codes and the OpenAI error body.
//!
//! A code is part of the API: clients match on it, so a code's string never
//! changes once shipped. The HTTP status for each code is decided in one
//! place, by the server.

use serde::{Deserialize, Serialize};

/// Why a request failed, as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The body is not valid JSON, or a field has the wrong type.
    InvalidJson,
    /// A field's value is not allowed.
    InvalidRequest,
    /// The prompt (plus the tokens asked for) does not fit the model's context.
    ContextLengthExceeded,
    /// No model of that name is being served.
    ModelNotFound,
    /// No route at that path.
    NotFound,
    /// The route exists but not for that method.
    MethodNotAllowed,
    /// The body is larger than the server accepts.
    PayloadTooLarge,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// The model's queue is full; retry after a moment.
    ServerBusy,
    /// No API key was sent.
    MissingApiKey,
    /// The API key is unknown, revoked or expired.
    InvalidApiKey,
    /// The key may not do this (a non-admin key on an admin route, a model
    /// the key is not allowed).
    PermissionDenied,
    /// The key's tenant is disabled.
    AccountDisabled,
    /// A requests- or tokens-per-minute limit is reached; retry after
    /// `Retry-After`.
    RateLimitExceeded,
    /// The credit balance or the monthly spending limit cannot cover the
    /// request's worst case.
    InsufficientQuota,
    /// The change clashes with what exists (a duplicate name).
    Conflict,
    /// The usage ledger cannot be written (its database is locked, full or
    /// gone); nothing is served unmetered.
    LedgerUnavailable,
    /// The upstream backend failed or answered with an error.
    UpstreamError,
    /// The upstream backend did not answer in time.
    UpstreamTimeout,
    /// The model's worker has stopped.
    ServiceUnavailable,
    /// Something failed inside the server; details are in its log only.
    InternalError,
}

impl ErrorCode {
    /// The `code` field of the error body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::ContextLengthExceeded => "context_length_exceeded",
            ErrorCode::ModelNotFound => "model_not_found",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::ServerBusy => "server_busy",
            ErrorCode::MissingApiKey => "missing_api_key",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::AccountDisabled => "account_disabled",
            ErrorCode::RateLimitExceeded => "rate_limit_exceeded",
            ErrorCode::InsufficientQuota => "insufficient_quota",
            ErrorCode::Conflict => "conflict",
            ErrorCode::LedgerUnavailable => "ledger_unavailable",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::ServiceUnavailable => "service_unavailable",
            ErrorCode::InternalError => "internal_error",
        }
    }

    /// The `type` field of the error body, in OpenAI's vocabulary.
    pub fn error_type(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::InvalidRequest
            | ErrorCode::ContextLengthExceeded
            | ErrorCode::ModelNotFound
            | ErrorCode::NotFound
            | ErrorCode::MethodNotAllowed
            | ErrorCode::PayloadTooLarge
            | ErrorCode::UnsupportedMediaType
            | ErrorCode::Conflict => "invalid_request_error",
            ErrorCode::MissingApiKey | ErrorCode::InvalidApiKey => "authentication_error",
            ErrorCode::PermissionDenied | ErrorCode::AccountDisabled => "permission_error",
            ErrorCode::ServerBusy | ErrorCode::RateLimitExceeded => "rate_limit_error",
            ErrorCode::InsufficientQuota => "insufficient_quota",
            ErrorCode::ServiceUnavailable
            | ErrorCode::InternalError
            | ErrorCode::LedgerUnavailable
            | ErrorCode::UpstreamError
            | ErrorCode::UpstreamTimeout => "server_error",
        }
    }
}

/// `{"error": {...}}`, the body of every failed `/v1` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>, param: Option<&str>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                kind: code.error_type().to_string(),
                param: param.map(str::to_string),
                code: Some(code.as_str().to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_openai_shape() {
        let body = ErrorBody::new(ErrorCode::ModelNotFound, "no model `x`", Some("model"));
        let json = serde_json::to_value(&body).unwrap_or_default();
        assert_eq!(
            json,
            serde_json::json!({"error": {"message": "no model `x`", "type": "invalid_request_error",
                "param": "model", "code": "model_not_found"}})
        );
    }
}
