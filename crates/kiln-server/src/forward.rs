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

/// On a request one replica makes of another on a run's behalf: the
/// HMAC-SHA256 of its body under the cluster secret, in hex.
pub const SIGNATURE: HeaderName = HeaderName::from_static("x-kiln-signature");

/// How long a signed request to another replica may take.
const SIGNED_TIMEOUT: Duration = Duration::from_secs(120);

/// HMAC-SHA256 (RFC 2104) of `message` under `key`, in hex.
pub fn sign(key: &[u8], message: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    hex::encode(outer)
}

/// Whether `signature` is `message`'s under `key`, compared in constant
/// time.
pub fn verify(key: &[u8], message: &[u8], signature: &str) -> bool {
    let want = sign(key, message);
    want.len() == signature.len()
        && want
            .bytes()
            .zip(signature.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

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
        let (status, body) = self.exchange(req, DESCRIBE_TIMEOUT).await?;
        if !status.is_success() {
            return Err(format!("the serving replica answered {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }

    /// Sends `req` and reads the whole answer, all within `limit`.
    async fn exchange(
        &self,
        req: Request,
        limit: Duration,
    ) -> Result<(axum::http::StatusCode, axum::body::Bytes), String> {
        let answer = tokio::time::timeout(limit, async {
            let answer = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = answer.status();
            let body = http_body_util::BodyExt::collect(answer.into_body())
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, body))
        })
        .await;
        answer.unwrap_or_else(|_| Err("the replica did not answer in time".into()))
    }
}

impl Forwarder {
    /// POSTs a JSON `body` signed with `key` to `path` on the replica at
    /// `base`; its JSON answer, or why there is none (with the replica's
    /// error message when it gave one).
    pub async fn post_signed(
        &self,
        base: &str,
        path: &str,
        body: Vec<u8>,
        key: &[u8],
        by: &str,
    ) -> Result<serde_json::Value, String> {
        let mut req = Request::post(format!("{base}{path}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE, sign(key, &body));
        if let Ok(v) = HeaderValue::from_str(by) {
            req = req.header(FORWARDED_BY, v);
        }
        let req = req.body(Body::from(body)).map_err(|e| e.to_string())?;
        let (status, body) = self.exchange(req, SIGNED_TIMEOUT).await?;
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| format!("the replica answered {status} without JSON"))?;
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .unwrap_or("no reason given");
            return Err(format!("the replica answered {status}: {message}"));
        }
        Ok(value)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_rfc_4231_hmac_sha256() {
        // RFC 4231, test cases 2 and 6 (a key longer than the block).
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            sign(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        let s = sign(b"k", b"m");
        assert!(verify(b"k", b"m", &s));
        assert!(!verify(b"k", b"n", &s));
        assert!(!verify(b"other", b"m", &s));
        assert!(!verify(b"k", b"m", &s[..10]));
    }
}
