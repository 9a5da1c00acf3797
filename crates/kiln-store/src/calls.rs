//! The usage ledger: one [`CallRecord`] per model call (chat, completion,
//! embedding; a user's own or one made inside a RAG answer or agent step),
//! written when the call ends, with who it was charged to and at which
//! prices, and the queries over it ([`CallLog`]).
//!
//! Admitted calls reach the ledger through [`crate::Billing::settle`];
//! [`CallLog::record_call`] records calls that failed before admission
//! (a bad request, a refusal), which cost nothing.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::billing::Caller;
use crate::error::Result;
use crate::money::{Money, Prices};

/// The values of [`CallRecord::endpoint`].
pub mod endpoint {
    /// `POST /v1/chat/completions`.
    pub const CHAT_COMPLETIONS: &str = "chat.completions";
    /// `POST /v1/completions`.
    pub const COMPLETIONS: &str = "completions";
    /// `POST /v1/embeddings`.
    pub const EMBEDDINGS: &str = "embeddings";
}

/// How a model call ended. Stored (and serialized) as text: `ok`, `stop`,
/// `length`, `cancelled` or `error:<code>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Succeeded without generating (embeddings).
    Ok,
    /// Generation finished naturally (end of sequence or a stop sequence).
    Stop,
    /// Generation hit `max_tokens` or the context length.
    Length,
    /// The client went away or cancelled; charged for the tokens generated.
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

impl Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_db_text())
    }
}

impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Outcome::from_db_text(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown outcome `{text}`")))
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
    /// Who was charged; `None` for calls before tenants existed.
    #[serde(flatten)]
    pub caller: Option<Caller>,
    /// `embedded`, or the upstream backend that served the call.
    pub backend: String,
    /// The prices the call was charged at; `None`: the model had none.
    pub prices: Option<Prices>,
    pub cost: Money,
}

/// A ledger row: a [`CallRecord`] with the id the store gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// `use-<32 hex digits>` for admitted calls (the reservation's id),
    /// `call-<32 hex digits>` for calls refused or failed before admission.
    pub id: String,
    #[serde(flatten)]
    pub record: CallRecord,
}

/// How [`CallLog::usage`] groups rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Tenant,
    Key,
    Model,
    /// The UTC day of the call.
    Day,
}

impl GroupBy {
    pub fn parse(text: &str) -> Option<GroupBy> {
        match text {
            "tenant" => Some(GroupBy::Tenant),
            "key" => Some(GroupBy::Key),
            "model" => Some(GroupBy::Model),
            "day" => Some(GroupBy::Day),
            _ => None,
        }
    }
}

/// Which ledger rows a report covers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageQuery {
    /// Unix milliseconds, inclusive.
    pub from_ms: Option<i64>,
    /// Unix milliseconds, exclusive.
    pub to_ms: Option<i64>,
    pub tenant_id: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
    /// In this order; empty: one row of totals.
    pub group_by: Vec<GroupBy>,
}

/// One group of a usage report. Grouping fields not asked for are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UsageRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    pub calls: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Money,
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

/// The usage ledger. Implemented for SQLite by [`crate::Store`]; every
/// method blocks (call it from `spawn_blocking`).
pub trait CallLog: Send + Sync {
    /// Appends one call that was never admitted, under a new id.
    fn record_call(&self, call: &CallRecord) -> Result<()>;
    /// The newest `limit` rows (by `created_at`, then insertion order),
    /// newest first, of one tenant or all.
    fn recent_calls(&self, tenant_id: Option<&str>, limit: usize) -> Result<Vec<LedgerEntry>>;
    /// Per-model totals, ordered by model name.
    fn usage_totals(&self) -> Result<Vec<ModelUsage>>;
    /// Totals per group, ordered by the grouping fields.
    fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>>;
    /// One row by id.
    fn ledger_entry(&self, id: &str) -> Result<Option<LedgerEntry>>;
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
        let json = serde_json::to_string(&Outcome::Error("busy".into())).unwrap_or_default();
        assert_eq!(json, "\"error:busy\"");
        assert!(serde_json::from_str::<Outcome>("\"weird\"").is_err());
        assert_eq!(Outcome::from_db_text("error:"), None);
    }

    #[test]
    fn call_ids_are_distinct() {
        let a = new_call_id();
        assert!(a.starts_with("call-") && a.len() == 37, "{a}");
        assert_ne!(a, new_call_id());
    }
}
