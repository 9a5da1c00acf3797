//! Read-only endpoints: `/v1/models`, `/healthz`, `/metrics`.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_types::openai::{ModelCard, ModelList};
use serde_json::json;

use std::sync::Arc;

use super::SharedState;
use crate::auth::Principal;
use crate::error::ApiError;

fn cards(state: &SharedState) -> Vec<ModelCard> {
    let mut cards: Vec<ModelCard> = state
        .models
        .text
        .iter()
        .map(|(name, engine)| {
            let info = engine.model().info();
            ModelCard {
                id: name.clone(),
                object: "model".into(),
                created: state.started,
                owned_by: "kiln".into(),
                kind: "chat".into(),
                context_length: Some(info.context_length),
                architecture: Some(info.architecture.clone()),
                quantization: Some(info.quantization.clone()),
            }
        })
        .collect();
    for (name, up) in &state.models.upstream {
        cards.push(ModelCard {
            id: name.clone(),
            object: "model".into(),
            created: state.started,
            owned_by: format!("upstream:{}", up.name),
            kind: "upstream".into(),
            context_length: None,
            architecture: None,
            quantization: None,
        });
    }
    if let Some(m) = &state.models.embedding {
        cards.push(ModelCard {
            id: m.name.clone(),
            object: "model".into(),
            created: state.started,
            owned_by: "kiln".into(),
            kind: "embedding".into(),
            context_length: Some(m.embedder.max_tokens()),
            architecture: Some("bert".into()),
            quantization: None,
        });
    }
    cards
}

/// The models the caller's key may use.
fn visible_cards(state: &SharedState, p: &Principal) -> Vec<ModelCard> {
    cards(state)
        .into_iter()
        .filter(|c| p.check_model(&c.id).is_ok())
        .collect()
}

pub async fn list_models(
    State(state): State<SharedState>,
    Extension(p): Extension<Arc<Principal>>,
) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: visible_cards(&state, &p),
    })
}

pub async fn get_model(
    State(state): State<SharedState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    visible_cards(&state, &p)
        .into_iter()
        .find(|c| c.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::model_not_found(&id, ""))
}

pub async fn healthz(State(state): State<SharedState>) -> Response {
    let models: Vec<String> = cards(&state).into_iter().map(|c| c.id).collect();
    Json(json!({"status": "ok", "models": models})).into_response()
}

pub async fn metrics(State(state): State<SharedState>) -> Response {
    for (name, engine) in &state.models.text {
        let m = &state.metrics;
        m.queue_depth
            .with_label_values(&[name])
            .set(engine.waiting() as i64);
        m.running
            .with_label_values(&[name])
            .set(engine.running() as i64);
        let (used, budget) = engine.kv_usage();
        m.kv_used.with_label_values(&[name]).set(used as i64);
        m.kv_budget.with_label_values(&[name]).set(budget as i64);
        m.preemptions
            .with_label_values(&[name])
            .set(engine.preemptions() as i64);
    }
    match state.metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            ApiError::internal().into_response()
        }
    }
}
