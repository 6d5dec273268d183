//! The admin server (port 9090 by default): `/metrics`, and outbox dead-letter operations.
//! It is meant for operators and Prometheus only: keep it off ingress (the Helm chart's
//! NetworkPolicy does).
//!
//! - `GET /admin/outbox/dead-letters?limit=` lists dead letters, oldest first;
//! - `POST /admin/outbox/dead-letters/{seq}/replay` puts one back into the outbox at its
//!   original position and wakes the relay;
//! - `GET /admin/inbox/rejections?limit=` lists inbound messages that were rejected or
//!   dead-lettered, newest first;
//! - `GET /admin/bus/{topic}` shows what the in-process bus holds (embedded mode only), so
//!   `cargo run` users can see the events the relay published;
//! - `POST /admin/bus/{topic}` (embedded mode only) injects an event as another service
//!   would publish it: `{"type": "payments.events.v1.PaymentCaptured", "key": "…", "data": {…}}`
//!   (`id` optional), so the inbox can be tried without Kafka.
//!
//! The two endpoints that change data (replay, inject) need `Authorization: Bearer
//! <APP_ADMIN__TOKEN>` when a token is set; startup refuses an admin address reachable
//! from other hosts without one. Listings and `/metrics` stay open on the admin address.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{FromRequestParts, Path, Query, State},
    http::{header, request::Parts},
    response::IntoResponse,
    routing::{get, post},
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    config::Secret,
    error::ApiError,
    inbox::Rejection,
    metrics::Metrics,
    outbox::{DeadLetter, Wakeup},
    publish::{InMemoryBus, OutboundMessage, Publisher},
    store::Store,
};

/// What the admin handlers need.
#[derive(Clone)]
pub struct AdminState {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// The store: outbox dead letters and inbox rejections.
    pub store: Arc<dyn Store>,
    /// Wakes the partition's relay after a replay.
    pub wakeup: Arc<Wakeup>,
    /// The in-process bus, when no Kafka is configured.
    pub bus: Option<Arc<InMemoryBus>>,
    /// `APP_ADMIN__TOKEN`: required by the endpoints that change data, when set.
    pub token: Option<Secret>,
}

/// Proof that a request may change data: it carries the admin token, or none is set (then
/// startup made sure the admin address is loopback only).
struct Authorized;

impl FromRequestParts<AdminState> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, ApiError> {
        let Some(token) = &state.token else { return Ok(Self) };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Digests of equal length, compared in constant time: the comparison reveals neither
        // the token's length nor how much of a guess was right.
        let matches = |p: &str| bool::from(Sha256::digest(p).ct_eq(&Sha256::digest(token.expose())));
        match presented {
            Some(p) if matches(p) => Ok(Self),
            other => Err(ApiError::Unauthenticated {
                challenge: r#"Bearer realm="orders-service-admin""#.to_owned(),
                detail: if other.is_some() {
                    "the admin token is wrong"
                } else {
                    "this admin endpoint needs the admin token"
                }
                .to_owned(),
            }),
        }
    }
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/admin/outbox/dead-letters", get(list_dead_letters))
        .route("/admin/outbox/dead-letters/{seq}/replay", post(replay_dead_letter))
        .route("/admin/bus/{topic}", get(bus_records).post(inject_event))
        .route("/admin/inbox/rejections", get(list_rejections))
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
    Ok(Json(state.store.list_dead_letters(limit).await?))
}

async fn replay_dead_letter(
    _: Authorized,
    State(state): State<AdminState>,
    Path(seq): Path<i64>,
) -> Result<impl IntoResponse, ApiError> {
    match state.store.replay_dead_letter(seq).await? {
        Some(partition) => {
            tracing::info!(seq, partition, "dead letter replayed");
            // Wakes whichever relay owns the partition: this process's, or another's by NOTIFY.
            state.wakeup.committed(partition);
            Ok(Json(serde_json::json!({ "replayed": seq, "partition": partition })))
        }
        None => Err(ApiError::NotFound { resource: "dead letter", id: seq.to_string() }),
    }
}

/// The in-process bus's records of a topic: headers, key and the JSON value.
async fn bus_records(
    State(state): State<AdminState>,
    Path(topic): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let Some(bus) = &state.bus else {
        return Err(ApiError::NotFound { resource: "in-process bus (Kafka is configured)", id: topic });
    };
    let records: Vec<serde_json::Value> = bus
        .records(&topic)
        .into_iter()
        .map(|r| {
            let value = serde_json::from_slice::<serde_json::Value>(&r.payload)
                .unwrap_or_else(|_| String::from_utf8_lossy(&r.payload).into());
            let headers: serde_json::Map<String, serde_json::Value> =
                r.headers.into_iter().map(|(k, v)| (k, v.into())).collect();
            serde_json::json!({ "offset": r.offset, "key": r.key, "headers": headers, "value": value })
        })
        .collect();
    Ok(Json(records))
}

async fn list_rejections(
    State(state): State<AdminState>,
    Query(params): Query<ListParams>,
) -> Result<Json<Vec<Rejection>>, ApiError> {
    let limit = params.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(state.store.list_rejections(limit).await?))
}

/// An event to inject into the in-process bus.
#[derive(Debug, Deserialize)]
struct Injected {
    /// CloudEvents type, e.g. `customers.events.v1.CustomerUpdated`.
    r#type: String,
    /// CloudEvents id; a fresh UUID when absent (send the same id twice to see deduplication).
    id: Option<String>,
    /// Message key.
    #[serde(default)]
    key: String,
    /// The event in the proto3 JSON mapping.
    data: serde_json::Value,
}

async fn inject_event(
    _: Authorized,
    State(state): State<AdminState>,
    Path(topic): Path<String>,
    crate::http::extract::Json(event): crate::http::extract::Json<Injected>,
) -> Result<impl IntoResponse, ApiError> {
    let Some(bus) = &state.bus else {
        return Err(ApiError::NotFound { resource: "in-process bus (Kafka is configured)", id: topic });
    };
    let id = event.id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let message = OutboundMessage {
        topic,
        key: event.key,
        payload: serde_json::to_vec(&event.data).unwrap_or_default(),
        headers: vec![
            ("ce_specversion".into(), "1.0".into()),
            ("ce_id".into(), id.clone().into()),
            ("ce_type".into(), event.r#type.into()),
            ("ce_source".into(), "/admin/bus".into()),
            ("content-type".into(), "application/json".into()),
        ],
    };
    match bus.publish(vec![message]).await.into_iter().next() {
        Some(Err(e)) => {
            Err(ApiError::BadRequest { kind: crate::error::Malformed::TooLarge, detail: e.to_string() })
        }
        _ => Ok((axum::http::StatusCode::ACCEPTED, Json(serde_json::json!({ "id": id })))),
    }
}
