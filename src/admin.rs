//! The admin server (port 9090 by default): `/metrics`, and outbox dead-letter operations.
//! It is meant for operators and Prometheus only: keep it off ingress (the Helm chart's
//! NetworkPolicy does).
//!
//! - `GET /admin/outbox/dead-letters?limit=` lists dead letters, oldest first;
//! - `POST /admin/outbox/dead-letters/{seq}/replay` puts one back into the outbox at its
//!   original position and wakes the relay.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::header,
    response::IntoResponse,
    routing::{get, post},
};
use serde::Deserialize;

use crate::{
    error::ApiError,
    metrics::Metrics,
    outbox::{DeadLetter, OutboxStore, Wakeup},
};

/// What the admin handlers need.
#[derive(Clone)]
pub struct AdminState {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// The outbox, for dead letters.
    pub outbox: Arc<dyn OutboxStore>,
    /// Wakes the local relay after a replay.
    pub wakeup: Arc<Wakeup>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/admin/outbox/dead-letters", get(list_dead_letters))
        .route("/admin/outbox/dead-letters/{seq}/replay", post(replay_dead_letter))
        .with_state(state)
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

#[derive(Debug, Deserialize)]
struct ListParams {
    limit: Option<i64>,
}

async fn list_dead_letters(
    State(state): State<AdminState>,
    Query(params): Query<ListParams>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    let limit = params.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(state.outbox.list_dead_letters(limit).await?))
}

async fn replay_dead_letter(
    State(state): State<AdminState>,
    Path(seq): Path<i64>,
) -> Result<impl IntoResponse, ApiError> {
    match state.outbox.replay_dead_letter(seq).await? {
        Some(partition) => {
            tracing::info!(seq, partition, "dead letter replayed");
            state.wakeup.wake_local();
            Ok(Json(serde_json::json!({ "replayed": seq, "partition": partition })))
        }
        None => Err(ApiError::NotFound { resource: "dead letter", id: seq.to_string() }),
    }
}
