//! Recording each model call in the request log ([`kiln_store::CallLog`]).
//!
//! A call is recorded once, when it ends: finished, failed (with its error
//! code) or cancelled by the client. Writes run on the blocking pool and a
//! failed write is logged, never returned to the client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_engine::engine::{Completion, FinishReason};
use kiln_store::{CallLog, CallRecord, Outcome};

use super::SharedState;

/// What is known about a call while it runs.
#[derive(Clone)]
pub struct CallContext {
    pub state: SharedState,
    pub request_id: String,
    pub endpoint: &'static str,
    pub model: String,
    pub received: Instant,
}

impl CallContext {
    pub fn finished(&self, c: &Completion, first_token: Option<Duration>) {
        let outcome = match c.finish_reason {
            FinishReason::Stop => Outcome::Stop,
            FinishReason::Length => Outcome::Length,
        };
        self.record(
            outcome,
            c.prompt_tokens,
            c.cached_tokens,
            c.completion_tokens,
            first_token,
        );
    }

    pub fn failed(&self, code: &str) {
        self.record(Outcome::Error(code.to_string()), 0, 0, 0, None);
    }

    pub fn cancelled(&self, first_token: Option<Duration>) {
        self.record(Outcome::Cancelled, 0, 0, 0, first_token);
    }

    pub fn embedded(&self, prompt_tokens: usize) {
        self.record(Outcome::Stop, prompt_tokens, 0, 0, None);
    }

    fn record(
        &self,
        outcome: Outcome,
        prompt_tokens: usize,
        cached_tokens: usize,
        completion_tokens: usize,
        first_token: Option<Duration>,
    ) {
        let Some(log) = self.state.calls.clone() else {
            return;
        };
        let record = CallRecord {
            created_at_ms: kiln_store::now_ms(),
            request_id: self.request_id.clone(),
            endpoint: self.endpoint.to_string(),
            model: self.model.clone(),
            prompt_tokens: prompt_tokens as u64,
            cached_tokens: cached_tokens as u64,
            completion_tokens: completion_tokens as u64,
            outcome,
            latency_ms: millis(self.received.elapsed()),
            ttft_ms: first_token.map(millis),
        };
        write(log, record);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn write(log: Arc<dyn CallLog>, record: CallRecord) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn_blocking(move || {
        if let Err(e) = log.record_call(&record) {
            tracing::error!(error = %e, request_id = %record.request_id, "recording the call failed");
        }
    });
}
