//! The REST side of Idempotency-Key: a middleware for the routes that take a key. It reads
//! the body once (for the fingerprint), hands the scoped key to the handler for the
//! database backstop, and stores or replays the response.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderName, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{Executed, Fingerprint, Idempotency, IdempotencyContext, ScopedKey, StoredResponse};
use crate::error::{ApiError, Malformed};

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The response header marking a replay.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Response headers kept with a stored response (the rest are recomputed).
const STORED_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::LOCATION, header::RETRY_AFTER];

/// What the middleware needs: the service and the body size limit.
#[derive(Clone)]
pub struct IdempotencyLayerState {
    /// The idempotency service.
    pub idempotency: Arc<Idempotency>,
    /// Largest body read for fingerprinting (the REST body limit).
    pub body_limit: usize,
}

/// Middleware for routes where the key is required (`POST /v1/orders`).
pub async fn required(State(state): State<IdempotencyLayerState>, request: Request, next: Next) -> Response {
    handle(state, true, request, next).await
}

/// Middleware for routes where the key is optional (`POST /v1/orders/{id}/cancel`).
pub async fn optional(State(state): State<IdempotencyLayerState>, request: Request, next: Next) -> Response {
    handle(state, false, request, next).await
}

async fn handle(state: IdempotencyLayerState, required: bool, request: Request, next: Next) -> Response {
    let idem = &state.idempotency;
    let raw = request.headers().get(IDEMPOTENCY_KEY).map(|v| v.to_str().ok());
    let key = match idem.key(raw, required) {
        Ok(Some(key)) => key,
        Ok(None) => return next.run(request).await,
        Err(e) => return e.into_response(),
    };
    let identity = idem
        .caller(request.extensions().get(), |name| request.headers().get(name).and_then(|v| v.to_str().ok()));
    // The concrete path, not the route template: a key used to cancel order A must not
    // replay A's response when it is sent again to cancel order B.
    let route = request.uri().path().to_owned();
    let method = request.method().as_str().to_owned();
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, state.body_limit).await else {
        let detail = "request body exceeds the configured limit".to_owned();
        return ApiError::BadRequest { kind: Malformed::TooLarge, detail }.into_response();
    };
    let fingerprint = Fingerprint::of(&method, &route, &bytes);
    let scoped = ScopedKey::new(&identity, &method, &route, &key);
    let mut request = Request::from_parts(parts, Body::from(bytes));
    let context = IdempotencyContext { key: scoped.clone(), fingerprint, ttl: idem.settings().ttl };
    request.extensions_mut().insert(context);

    let executed = idem
        .execute(&scoped, &fingerprint, || async move {
            let response = next.run(request).await;
            // 5xx (unavailable, timeout, bug) and anything the client is told to retry
            // (Retry-After: a lost concurrent update) is not an outcome to hold it to.
            let deterministic =
                !response.status().is_server_error() && !response.headers().contains_key(header::RETRY_AFTER);
            (store(response).await, deterministic)
        })
        .await;
    match executed {
        Ok(Executed::Fresh(response)) => restore(response, false),
        Ok(Executed::Replayed(response)) => restore(response, true),
        Err(e) => e.into_response(),
    }
}

async fn store(response: Response) -> StoredResponse {
    let (parts, body) = response.into_parts();
    let headers = STORED_HEADERS
        .iter()
        .chain(std::iter::once(&HeaderName::from_static(IDEMPOTENT_REPLAYED)))
        .filter_map(|name| {
            parts.headers.get(name).and_then(|v| v.to_str().ok()).map(|v| (name.to_string(), v.to_owned()))
        })
        .collect();
    let body = axum::body::to_bytes(body, usize::MAX).await.map(|b| b.to_vec()).unwrap_or_default();
    StoredResponse { status: parts.status.as_u16(), headers, body }
}

fn restore(stored: StoredResponse, replayed: bool) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, stored.body).into_response();
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    }
    if replayed {
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use axum::{Router, routing::post};
    use tower::ServiceExt;

    use super::*;
    use crate::{
        idempotency::{IdempotencySettings, MemoryKeyStore},
        metrics::Metrics,
    };

    /// A route that loses a concurrent update the first time and succeeds afterwards.
    fn router(calls: Arc<AtomicUsize>) -> Router {
        let settings = IdempotencySettings {
            ttl: Duration::from_secs(60),
            lock_ttl: Duration::from_secs(30),
            identity_header: String::new(),
            memory_capacity: 100,
        };
        let idempotency =
            Idempotency::new(Arc::new(MemoryKeyStore::new(100)), settings, Metrics::new().expect("metrics"));
        let state = IdempotencyLayerState { idempotency, body_limit: 1024 };
        let handler = move || {
            let calls = calls.clone();
            async move {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => ApiError::ConcurrentUpdate.into_response(),
                    _ => StatusCode::CREATED.into_response(),
                }
            }
        };
        Router::new()
            .route("/v1/orders", post(handler))
            .layer(axum::middleware::from_fn_with_state(state, required))
    }

    fn request() -> Request {
        Request::post("/v1/orders").header(IDEMPOTENCY_KEY, "k-1").body(Body::from("{}")).expect("request")
    }

    #[tokio::test]
    async fn a_lost_concurrent_update_is_not_replayed_the_retry_runs() {
        let calls = Arc::new(AtomicUsize::new(0));
        let app = router(calls.clone());
        let first = app.clone().oneshot(request()).await.expect("first");
        assert_eq!(first.status(), StatusCode::CONFLICT);
        assert!(first.headers().contains_key(header::RETRY_AFTER), "the client is told to retry");
        let retry = app.clone().oneshot(request()).await.expect("retry");
        assert_eq!(retry.status(), StatusCode::CREATED, "the retry ran instead of replaying the 409");
        assert!(!retry.headers().contains_key(IDEMPOTENT_REPLAYED));
        let replay = app.oneshot(request()).await.expect("replay");
        assert_eq!(replay.headers().get(IDEMPOTENT_REPLAYED).map(|v| v.as_bytes()), Some(&b"true"[..]));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the success is stored and replayed");
    }
}
