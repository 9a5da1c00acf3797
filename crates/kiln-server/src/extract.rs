//! `ApiJson<T>`: the JSON body extractor for `/v1`. Unlike axum's own, every
//! rejection is an [`ApiError`] in OpenAI's shape: a wrong content type is
//! 415, a body over the limit 413, malformed JSON or a field of the wrong
//! type 400 with serde's description of what and where.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use kiln_types::error::ErrorCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_json(content_type) {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!(
                    "the request body must be JSON with `Content-Type: application/json` (got `{}`)",
                    if content_type.is_empty() { "none" } else { content_type }
                ),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    "the request body is larger than this server accepts",
                )
            } else {
                ApiError::new(
                    ErrorCode::InvalidJson,
                    format!("could not read the request body: {}", rejection.body_text()),
                )
            }
        })?;
        parse(&bytes).map(ApiJson)
    }
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.len() > 5
            && essence[..essence.len() - 5].contains('/')
            && essence.to_ascii_lowercase().ends_with("+json"))
}

/// Parses a body, describing what is wrong when it cannot be parsed.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "the request body is not valid UTF-8",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => {
                "the request body has a field of the wrong type or a missing field"
            }
            serde_json::error::Category::Eof => "the request body ends before the JSON does",
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
                "the request body is not valid JSON"
            }
        };
        ApiError::new(ErrorCode::InvalidJson, format!("{what}: {e}"))
    })
}

/// Reads a typed request out of a body already parsed as JSON, with the
/// same errors as [`parse`].
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidJson,
            format!("the request body has a field of the wrong type or a missing field: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_types::openai::ChatCompletionRequest;

    #[test]
    fn content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/vnd.api+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
        assert!(!is_json("+json"));
    }

    #[test]
    fn bad_bodies_are_invalid_json_errors() {
        for body in [
            &b"{"[..],
            b"\xff\xfe",
            b"[]",
            br#"{"model": 5, "messages": []}"#,
        ] {
            let r = parse::<ChatCompletionRequest>(body);
            assert!(matches!(
                r,
                Err(ApiError {
                    code: ErrorCode::InvalidJson,
                    ..
                })
            ));
        }
    }
}
