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
    deprecation::{self, Deprecation, DeprecationLayer, Deprecations},
    error::{ApiError, PROBLEM_JSON, Problem, ProblemField},
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
    /// Deprecated operations (headers, sunsets, and the served document's markings).
    pub deprecations: Arc<Deprecations>,
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
shed at the concurrency limit before any work; retry after `Retry-After`), `unauthenticated` \
(401, with a `WWW-Authenticate` challenge), `forbidden` (403, the token lacks the operation's \
scope), `internal` (500).\n\n\
Callers authenticate with a JWT bearer token when the deployment turns verification on \
(`APP_AUTH__ENABLED`): creates and cancels need the scope `orders:write`, reads \
`orders:read` (configurable). With verification off, no credential is needed (the empty \
security requirement).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        orders::create_order,
        orders::get_order,
        orders::list_orders,
        orders::cancel_order,
        orders::get_order_status,
        healthz,
        readyz
    ),
    components(schemas(Problem, ProblemField, Check, ReadinessReport)),
    tags((name = "orders", description = "Order lifecycle"), (name = "health", description = "Kubernetes probes")),
    servers((url = "/", description = "The host serving this document")),
    security((), ("bearer" = [])),
    modifiers(&CamelCaseLinks, &BearerScheme)
)]
pub struct ApiDoc;

/// The `bearer` security scheme: a JWT in `Authorization`.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .description(Some("A JWT from the deployment's identity provider (when APP_AUTH__ENABLED)."))
            .build();
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

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

/// The OpenAPI document as YAML with the built-in deprecation table, exactly as committed
/// in `openapi.yaml`.
pub fn openapi_yaml() -> anyhow::Result<String> {
    let table = deprecation::parse_table(deprecation::DEFAULT_TABLE, &deprecation::known_operations())
        .map_err(anyhow::Error::msg)?;
    Ok(document(&table).to_yaml()?)
}

/// The OpenAPI document with a deprecation table applied: each deprecated REST operation
/// is marked `deprecated`, says when it sunsets and what replaces it, and documents its
/// `Deprecation`, `Sunset` and `Link` headers and its 410 after the sunset. The server
/// serves it with the table in force, so the document tells what the server does.
pub fn document<'a>(table: impl IntoIterator<Item = &'a Deprecation>) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{
        Content, Deprecated, Ref, RefOr, ResponseBuilder,
        header::HeaderBuilder,
        schema::{Object, Type},
    };
    let mut doc = ApiDoc::openapi();
    for entry in table {
        let Some((method, path)) = entry.operation.split_once(' ') else { continue };
        let Some(item) = doc.paths.paths.get_mut(path) else { continue };
        let operation = match method {
            "GET" => &mut item.get,
            "POST" => &mut item.post,
            "PUT" => &mut item.put,
            "PATCH" => &mut item.patch,
            "DELETE" => &mut item.delete,
            _ => continue,
        };
        let Some(operation) = operation.as_mut() else { continue };
        operation.deprecated = Some(Deprecated::True);
        let successor = entry.successor.as_ref().map(|s| format!(" Use `{s}` instead.")).unwrap_or_default();
        let note = format!(
            "**Deprecated** since {}; sunset at {} (410 Gone from then on).{successor} See {}.",
            entry.deprecation.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            entry.sunset.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            entry.link
        );
        operation.description =
            Some(operation.description.take().map_or(note.clone(), |d| format!("{d}\n\n{note}")));
        let gone = ResponseBuilder::new()
            .description("The operation is past its sunset (problem type `gone`)")
            .content(PROBLEM_JSON, Content::new(Some(Ref::from_schema_name("Problem"))))
            .build();
        operation.responses.responses.insert("410".into(), gone.into());
        let header = |description: &str| {
            HeaderBuilder::new()
                .schema(Object::with_type(Type::String))
                .description(Some(description))
                .build()
        };
        for response in operation.responses.responses.values_mut() {
            let RefOr::T(response) = response else { continue };
            response.headers.insert(
                "Deprecation".into(),
                header("When the operation was deprecated: `@` and Unix seconds (RFC 9745)"),
            );
            response
                .headers
                .insert("Sunset".into(), header("When it stops working, an IMF-fixdate (RFC 8594)"));
            response.headers.insert(
                "Link".into(),
                header("The documentation (`rel=\"deprecation\"`, `rel=\"sunset\"`) and the successor (`rel=\"successor-version\"`)"),
            );
        }
    }
    doc
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
    auth: Option<Arc<crate::auth::Authenticator>>,
) -> Router {
    let api = if api_role {
        let required = middleware::from_fn_with_state(idempotency.clone(), idempotency::http::required);
        let optional = middleware::from_fn_with_state(idempotency, idempotency::http::optional);
        // The API routes, not the probes, sit behind the shared concurrency limit.
        Router::new()
            .route("/v1/orders", post(orders::create_order).layer(required).get(orders::list_orders))
            .route("/v1/orders/{id}", get(orders::get_order))
            .route("/v1/orders/{id}/cancel", post(orders::cancel_order).layer(optional))
            .route("/v1/orders/{id}/status", get(orders::get_order_status))
            // After routing, so the layer sees the route template it is keyed by.
            .route_layer(DeprecationLayer::new(state.deprecations.clone(), deprecation::rest_gone))
            // Outermost of the route layers: nothing runs for a caller that is not verified.
            .route_layer(tower::util::option_layer(
                auth.map(|auth| middleware::from_fn_with_state(auth, crate::auth::rest)),
            ))
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
            // RED metrics and the HTTP server span, in one pass over the request.
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

async fn openapi_json(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(document(state.deprecations.entries()))
}
