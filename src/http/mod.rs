//! The REST adapter: `/v1/orders`, `/healthz`, `/readyz` and `/openapi.json`.
//!
//! Inbound protection lives here: the shared concurrency limit with load shedding (503
//! problem, `Retry-After`), a per-request deadline (503 problem on expiry, and the
//! database's statement timeout for the request's transaction), a body size limit (413),
//! and problem+json for every error, including unknown routes.

pub(crate) mod extract;
pub mod orders;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    error_handling::HandleErrorLayer,
    extract::{DefaultBodyLimit, State},
    http::{StatusCode, Uri},
    middleware,
    response::IntoResponse,
    routing::{get, post},
};
use tower::ServiceBuilder;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

use crate::{
    error::{ApiError, Problem, ProblemField},
    health::{Check, Readiness, ReadinessReport},
    idempotency::{self, http::IdempotencyLayerState},
    metrics::{self, Metrics},
    orders::Orders,
    resilience::inbound::InboundLayer,
};

/// What every REST handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The use-cases.
    pub orders: Orders,
    /// Readiness checks for `/readyz`.
    pub readiness: Arc<Readiness>,
}

/// The OpenAPI document, generated from the handlers' annotations. `openapi.yaml` at the
/// repository root is this document; a test fails if they drift apart.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "orders-service",
        description = "Orders REST API.\n\nEvery error is an RFC 9457 problem details body \
(application/problem+json) whose `type` is a stable URN `urn:problem-type:orders:<slug>`: \
`validation` (400, with `errors[]` naming each field), `malformed-request` (400), \
`unsupported-media-type` (415), `payload-too-large` (413), `not-found` (404), \
`method-not-allowed` (405), `invalid-state` (409), `concurrent-update` (409, retry), \
`unavailable` (503, retry after `Retry-After`), `timeout` (503, retry), `overloaded` (503, \
shed at the concurrency limit before any work; retry after `Retry-After`), `internal` (500).\n\n\
Callers are not authenticated by the service itself yet: put it behind a mesh or gateway that \
authenticates them (the empty security requirement below says so explicitly).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(orders::create_order, orders::get_order, orders::list_orders, orders::cancel_order, healthz, readyz),
    components(schemas(Problem, ProblemField, Check, ReadinessReport)),
    tags((name = "orders", description = "Order lifecycle"), (name = "health", description = "Kubernetes probes")),
    servers((url = "/", description = "The host serving this document")),
    security(()),
    modifiers(&CamelCaseLinks)
)]
pub struct ApiDoc;

/// utoipa 5.5 writes a Link Object's fields in snake_case (`operation_id`), which OpenAPI
/// tools ignore, so stateful fuzzers and generated clients would never follow the links.
/// This moves them to the spelling the specification defines (`operationId`).
struct CamelCaseLinks;

impl utoipa::Modify for CamelCaseLinks {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, extensions::Extensions};
        let operations = doc.paths.paths.values_mut().flat_map(|item| {
            [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch]
                .into_iter()
                .flatten()
        });
        for operation in operations {
            for response in operation.responses.responses.values_mut() {
                let RefOr::T(response) = response else { continue };
                for link in response.links.values_mut() {
                    let RefOr::T(link) = link else { continue };
                    let id = std::mem::take(&mut link.operation_id);
                    if !id.is_empty() {
                        let spelled: Extensions = [("operationId", id)].into_iter().collect();
                        link.extensions.get_or_insert_with(Extensions::default).merge(spelled);
                    }
                }
            }
        }
    }
}

/// The OpenAPI document as YAML, exactly as committed in `openapi.yaml`.
pub fn openapi_yaml() -> anyhow::Result<String> {
    Ok(ApiDoc::openapi().to_yaml()?)
}

/// Limits applied to every REST request.
#[derive(Clone)]
pub struct Limits {
    /// Deadline for one request.
    pub request_timeout: Duration,
    /// Largest accepted body.
    pub body_limit_bytes: usize,
    /// Load shedding and the request deadline, shared with the gRPC listener.
    pub inbound: InboundLayer<axum::body::Body>,
}

/// The answer to a request shed at the concurrency limit: 503 problem, `Retry-After`.
pub fn overloaded() -> axum::response::Response {
    ApiError::Overloaded.into_response()
}

/// Builds the REST router; without the `api` role only the probes are served.
pub fn router(
    state: AppState,
    metrics: Arc<Metrics>,
    limits: Limits,
    api_role: bool,
    idempotency: IdempotencyLayerState,
) -> Router {
    let api = if api_role {
        let required = middleware::from_fn_with_state(idempotency.clone(), idempotency::http::required);
        let optional = middleware::from_fn_with_state(idempotency, idempotency::http::optional);
        // The API routes, not the probes, sit behind the shared concurrency limit.
        Router::new()
            .route("/v1/orders", post(orders::create_order).layer(required).get(orders::list_orders))
            .route("/v1/orders/{id}", get(orders::get_order))
            .route("/v1/orders/{id}/cancel", post(orders::cancel_order).layer(optional))
            .layer(limits.inbound.clone())
    } else {
        Router::new()
    };
    let api = api
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_json))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(
            |uri: Uri| async move { ApiError::NotFound { resource: "route", id: uri.path().to_owned() } },
        )
        .with_state(state);
    api.layer(
        ServiceBuilder::new()
            .layer(TraceLayer::new_for_http())
            .layer(middleware::from_fn_with_state(metrics, metrics::track_http))
            .layer(HandleErrorLayer::new(|_: tower::BoxError| async { ApiError::Timeout }))
            .timeout(limits.request_timeout)
            .layer(DefaultBodyLimit::max(limits.body_limit_bytes)),
    )
}

/// Liveness: the process is up and serving HTTP. Checks nothing external on purpose.
#[utoipa::path(get, path = "/healthz", tag = "health", operation_id = "healthz",
    responses((status = 200, description = "Alive", body = String, example = "ok")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: database reachable, migrations applied, not shutting down.
#[utoipa::path(get, path = "/readyz", tag = "health", operation_id = "readyz",
    responses(
        (status = 200, description = "Ready to serve", body = ReadinessReport),
        (status = 503, description = "Not ready; see the failed checks", body = ReadinessReport),
    ))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let report = state.readiness.check().await;
    let status = if report.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(report))
}

async fn openapi_json() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}
