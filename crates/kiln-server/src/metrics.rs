//! Prometheus metrics, one registry per server. Durations are histograms in
//! seconds, per phase (queue wait, time to first token, prefill, decode, whole
//! request); failures are counted by stable error code.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub errors: IntCounterVec,
    pub prompt_tokens: IntCounterVec,
    pub completion_tokens: IntCounterVec,
    /// Requests refused before running, by reason.
    pub refusals: IntCounterVec,
    /// Money charged, in nano-units of the platform currency.
    pub cost_nanos: IntCounterVec,
    pub request_duration: HistogramVec,
    /// Gateway phases: `admission` (rate limits and budget reservation),
    /// `settlement` (the ledger write), `upstream` (an upstream's time to
    /// its response headers).
    pub phase: HistogramVec,
    pub queue_wait: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub prefill: HistogramVec,
    pub decode: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub running: IntGaugeVec,
    pub kv_used: IntGaugeVec,
    pub kv_budget: IntGaugeVec,
    pub preemptions: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram = |name: &str, help: &str| -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                &["model"],
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["model"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "kiln_request_duration_seconds",
                "Time from request received to response complete (streams: to the last event).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint"],
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let phase = HistogramVec::new(
            HistogramOpts::new(
                "kiln_phase_seconds",
                "Time spent per gateway phase: admission, settlement, upstream.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 5.0, 30.0,
            ]),
            &["phase"],
        )?;
        registry.register(Box::new(phase.clone()))?;
        Ok(Metrics {
            requests: counter(
                "kiln_requests_total",
                "HTTP requests by endpoint, model and status.",
                &["endpoint", "model", "status"],
            )?,
            errors: counter(
                "kiln_errors_total",
                "Failed requests by stable error code.",
                &["code"],
            )?,
            prompt_tokens: counter(
                "kiln_prompt_tokens_total",
                "Prompt tokens processed.",
                &["model"],
            )?,
            completion_tokens: counter(
                "kiln_completion_tokens_total",
                "Tokens generated.",
                &["model"],
            )?,
            refusals: counter(
                "kiln_refusals_total",
                "Requests refused before running, by reason (rate_limit, insufficient_credit, monthly_limit, account_disabled).",
                &["reason"],
            )?,
            cost_nanos: counter(
                "kiln_cost_nanos_total",
                "Money charged, in nano-units (1e-9) of the platform currency.",
                &["model"],
            )?,
            request_duration,
            phase,
            queue_wait: histogram(
                "kiln_queue_wait_seconds",
                "Time a generation request waited in the model's queue.",
            )?,
            time_to_first_token: histogram(
                "kiln_time_to_first_token_seconds",
                "Time from request received to the first generated token.",
            )?,
            prefill: histogram("kiln_prefill_seconds", "Time spent reading the prompt.")?,
            decode: histogram("kiln_decode_seconds", "Time spent generating tokens.")?,
            queue_depth: gauge(
                "kiln_queue_depth",
                "Generation requests waiting in the model's queue.",
            )?,
            running: gauge(
                "kiln_running_requests",
                "Generation requests being generated now.",
            )?,
            kv_used: gauge(
                "kiln_kv_cache_used_bytes",
                "KV cache held by running sequences.",
            )?,
            kv_budget: gauge(
                "kiln_kv_cache_budget_bytes",
                "The model's KV cache budget (kv_cache_mb).",
            )?,
            preemptions: gauge(
                "kiln_preemptions",
                "Sequences preempted for KV blocks since start (recomputed later).",
            )?,
            registry,
        })
    }

    /// Counts a finished generation: tokens and per-phase timings.
    pub fn record_generation(&self, model: &str, c: &kiln_engine::engine::Completion) {
        self.prompt_tokens
            .with_label_values(&[model])
            .inc_by(c.prompt_tokens as u64);
        self.completion_tokens
            .with_label_values(&[model])
            .inc_by(c.completion_tokens as u64);
        self.queue_wait
            .with_label_values(&[model])
            .observe(c.queued.as_secs_f64());
        self.prefill
            .with_label_values(&[model])
            .observe(c.prefill.as_secs_f64());
        self.decode
            .with_label_values(&[model])
            .observe(c.decode.as_secs_f64());
    }

    pub fn record_first_token(&self, model: &str, after: Duration) {
        self.time_to_first_token
            .with_label_values(&[model])
            .observe(after.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() -> Result<(), prometheus::Error> {
        let m = Metrics::new()?;
        m.requests
            .with_label_values(&["/v1/chat/completions", "m", "200"])
            .inc();
        m.errors.with_label_values(&["invalid_json"]).inc();
        let text = m.render()?;
        assert!(text.contains(
            "kiln_requests_total{endpoint=\"/v1/chat/completions\",model=\"m\",status=\"200\"} 1"
        ));
        assert!(text.contains("kiln_errors_total{code=\"invalid_json\"} 1"));
        Ok(())
    }
}
