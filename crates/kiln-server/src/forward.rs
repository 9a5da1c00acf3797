//! Forwarding a request to the replica that serves a knowledge base.
//!
//! The request goes on as it came — method, path, query, headers (the
//! caller's API key included) and body, streamed — and the answer comes
//! back the same way, so uploads are not buffered and streamed chat answers
//! stay streamed. The serving replica authenticates and meters the request
//! itself. A forwarded request carries [`FORWARDED_BY`]; a replica never
//! forwards such a request again, so a stale directory cannot make a loop.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_types::error::ErrorCode;

use crate::error::ApiError;

/// Set on a forwarded request: the forwarding replica's advertised URL.
pub const FORWARDED_BY: HeaderName = HeaderName::from_static("x-kiln-forwarded-by");

/// How long connecting to another replica may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long describing a knowledge base another replica holds may take.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Headers that belong to one connection, not to the request.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::HOST,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

pub struct Forwarder {
    client: Client<HttpConnector, Body>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl Forwarder {
    pub fn new() -> Forwarder {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        Forwarder {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }

    /// Sends `req` to the replica at `base` (`http://host:port`) and relays
    /// its answer; `by` names this replica in [`FORWARDED_BY`].
    pub async fn send(&self, base: &str, req: Request, by: &str) -> Response {
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri: Uri = match format!("{base}{path}").parse() {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(replica = base, error = %e, "a replica's advertised URL is not usable");
                return unreachable_replica(base).into_response();
            }
        };
        parts.uri = uri;
        strip_hop_by_hop(&mut parts.headers);
        if let Ok(v) = HeaderValue::from_str(by) {
            parts.headers.insert(FORWARDED_BY, v);
        }
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(answer) => {
                let (mut parts, body) = answer.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Err(e) => {
                tracing::warn!(replica = base, error = %e, "cannot reach the replica serving a knowledge base");
                unreachable_replica(base).into_response()
            }
        }
    }
}

impl Forwarder {
    /// `GET base + path` with the caller's key, for a JSON answer within
    /// [`DESCRIBE_TIMEOUT`]; `Err` says why there is none.
    pub async fn get_json(
        &self,
        base: &str,
        path: &str,
        caller: &HeaderMap,
        by: &str,
    ) -> Result<serde_json::Value, String> {
        let mut req = Request::get(format!("{base}{path}"));
        if let Some(auth) = caller.get(header::AUTHORIZATION) {
            req = req.header(header::AUTHORIZATION, auth);
        }
        if let Ok(v) = HeaderValue::from_str(by) {
            req = req.header(FORWARDED_BY, v);
        }
        let req = req.body(Body::empty()).map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(DESCRIBE_TIMEOUT, async {
            let answer = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = answer.status();
            let body = http_body_util::BodyExt::collect(answer.into_body())
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("the serving replica answered {status}"));
            }
            serde_json::from_slice(&body).map_err(|e| e.to_string())
        })
        .await;
        answer.unwrap_or_else(|_| Err("the serving replica did not answer in time".into()))
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove("keep-alive");
    headers.remove(header::TRANSFER_ENCODING);
}

fn unreachable_replica(base: &str) -> ApiError {
    ApiError::new(
        ErrorCode::ServiceUnavailable,
        format!("the replica serving this knowledge base ({base}) cannot be reached; retry later"),
    )
}
