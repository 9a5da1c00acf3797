//! The HTTP client the commands that talk to a running server share.

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A server's `/api`, with an optional key.
pub struct Api {
    base: String,
    key: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub fn new(base: &str, key: Option<String>) -> Api {
        Api {
            base: base.to_string(),
            key,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Value> {
        let uri = format!("{}{}", self.base.trim_end_matches('/'), path);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", content_type);
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = req.body(Full::new(Bytes::from(body)))?;
        let resp = self
            .client
            .request(req)
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(v)
    }

    pub async fn json(
        &self,
        method: hyper::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(&body)?
        };
        self.call(method, path, "application/json", bytes).await
    }
}

pub fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
