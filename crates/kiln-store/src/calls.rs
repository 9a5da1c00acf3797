//! The request log: one [`CallRecord`] per model call (chat, completion,
//! embedding; a user's own or one made inside a RAG answer or agent step),
//! written when the call ends, and the queries over it ([`CallLog`]).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The values of [`CallRecord::endpoint`].
pub mod endpoint {
    /// `POST /v1/chat/completions`.
    pub const CHAT_COMPLETIONS: &str = "chat.completions";
    /// `POST /v1/completions`.
    pub const COMPLETIONS: &str = "completions";
    /// `POST /v1/embeddings`.
    pub const EMBEDDINGS: &str = "embeddings";
}

/// How a model call ended. Stored as text: `ok`, `stop`, `length`,
/// `cancelled` or `error:<code>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Succeeded without generating (embeddings).
    Ok,
    /// Generation finished naturally (end of sequence or a stop sequence).
    Stop,
    /// Generation hit `max_tokens` or the context length.
    Length,
    /// The client went away or cancelled.
    Cancelled,
    /// Failed; the stable error code (`busy`, `context_length_exceeded`, ...).
    Error(String),
}

impl Outcome {
    /// The text stored in the `outcome` column.
    pub fn as_db_text(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Stop => "stop".into(),
            Outcome::Length => "length".into(),
            Outcome::Cancelled => "cancelled".into(),
            Outcome::Error(code) => format!("error:{code}"),
        }
    }

    /// Parses the `outcome` column; `None` for text this build does not know.
    pub fn from_db_text(text: &str) -> Option<Outcome> {
        match text {
            "ok" => Some(Outcome::Ok),
            "stop" => Some(Outcome::Stop),
            "length" => Some(Outcome::Length),
            "cancelled" => Some(Outcome::Cancelled),
            other => other
                .strip_prefix("error:")
                .filter(|code| !code.is_empty())
                .map(|code| Outcome::Error(code.to_string())),
        }
    }

    /// Whether the call failed.
    pub fn is_error(&self) -> bool {
        matches!(self, Outcome::Error(_))
    }
}

/// One model call, as the server records it when the call ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// Unix milliseconds; [`now_ms`] gives the current time.
    pub created_at_ms: i64,
    /// The HTTP request that caused the call (several calls may share one).
    pub request_id: String,
    /// Which API was called; see [`endpoint`].
    pub endpoint: String,
    pub model: String,
    pub prompt_tokens: u64,
    /// Prompt tokens served from a prefix cache (a subset of `prompt_tokens`).
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub outcome: Outcome,
    /// From receiving the request to the call's end.
    pub latency_ms: u64,
    /// Time to first token; `None` for embeddings and calls that produced none.
    pub ttft_ms: Option<u64>,
}

/// A [`CallRecord`] read back, with the id the store gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCall {
    /// `call-<32 hex digits>`, unique without a shared counter.
    pub id: String,
    #[serde(flatten)]
    pub record: CallRecord,
}

/// Totals for one model over the whole log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelUsage {
    pub model: String,
    pub calls: u64,
    /// Calls whose outcome was an error.
    pub errors: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
}

/// The request log of model calls. Implemented for SQLite by
/// [`crate::Store`]; every method blocks (call it from `spawn_blocking`).
pub trait CallLog: Send + Sync {
    /// Appends one call under a new id.
    fn record_call(&self, call: &CallRecord) -> Result<()>;
    /// The newest `limit` calls (by `created_at`, then insertion order),
    /// newest first.
    fn recent_calls(&self, limit: usize) -> Result<Vec<StoredCall>>;
    /// Per-model totals, ordered by model name.
    fn usage_totals(&self) -> Result<Vec<ModelUsage>>;
}

/// Current time in unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A fresh call id.
pub(crate) fn new_call_id() -> String {
    format!("call-{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_text_round_trips() {
        for o in [
            Outcome::Ok,
            Outcome::Stop,
            Outcome::Length,
            Outcome::Cancelled,
            Outcome::Error("context_length_exceeded".into()),
        ] {
            assert_eq!(Outcome::from_db_text(&o.as_db_text()), Some(o));
        }
        assert_eq!(Outcome::from_db_text("weird"), None);
        assert_eq!(Outcome::from_db_text("error:"), None);
    }

    #[test]
    fn call_ids_are_distinct() {
        let a = new_call_id();
        assert!(a.starts_with("call-") && a.len() == 37, "{a}");
        assert_ne!(a, new_call_id());
    }
}
