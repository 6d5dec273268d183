//! Inbound protection, one tower layer for REST and gRPC alike:
//! - a global concurrency limit shared by both listeners, with load shedding: a request
//!   over the limit is answered at once (503 + `Retry-After` / `UNAVAILABLE` with
//!   `retry-after`) instead of queueing, so overload costs the excess milliseconds, not
//!   everyone seconds, and memory stays bounded;
//! - the request's deadline (the server's request timeout, or a shorter `grpc-timeout`),
//!   made available to the store through [`deadline`], which turns it into the
//!   transaction's `statement_timeout` so the database abandons work nobody waits for.
//!
//! Probes are exempt: an overloaded pod must still answer its kubelet.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use prometheus::IntCounter;
use tokio::{sync::Semaphore, time::Instant};

tokio::task_local! {
    static DEADLINE: Instant;
}

/// The deadline of the request this task is handling, if it is handling one.
pub fn deadline() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// Runs `future` with `deadline` as its request deadline (tests and background work that
/// want the same statement-timeout behaviour).
pub async fn with_deadline<F: Future>(deadline: Instant, future: F) -> F::Output {
    DEADLINE.scope(deadline, future).await
}

/// Parses a `grpc-timeout` header value (`<digits><H|M|S|m|u|n>`).
pub fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Builds the rejection for a shed request, in the listener's protocol.
pub type Reject<B> = fn() -> http::Response<B>;

/// The layer; clone it per listener with [`InboundLayer::new`] sharing one semaphore.
pub struct InboundLayer<B> {
    permits: Arc<Semaphore>,
    timeout: Duration,
    /// Honour `grpc-timeout` (gRPC listener).
    grpc: bool,
    /// Paths that bypass the limit (probes, health checks).
    exempt: fn(&str) -> bool,
    reject: Reject<B>,
    shed: IntCounter,
}

impl<B> Clone for InboundLayer<B> {
    fn clone(&self) -> Self {
        Self {
            permits: self.permits.clone(),
            timeout: self.timeout,
            grpc: self.grpc,
            exempt: self.exempt,
            reject: self.reject,
            shed: self.shed.clone(),
        }
    }
}

impl<B> InboundLayer<B> {
    /// A layer over `permits` (shared by every listener), with the server's `timeout`.
    pub fn new(
        permits: Arc<Semaphore>,
        timeout: Duration,
        grpc: bool,
        exempt: fn(&str) -> bool,
        reject: Reject<B>,
        shed: IntCounter,
    ) -> Self {
        Self { permits, timeout, grpc, exempt, reject, shed }
    }
}

impl<S, B> tower::Layer<S> for InboundLayer<B> {
    type Service = Inbound<S, B>;
    fn layer(&self, inner: S) -> Self::Service {
        Inbound { inner, layer: self.clone() }
    }
}

/// The service [`InboundLayer`] produces.
pub struct Inbound<S, B> {
    inner: S,
    layer: InboundLayer<B>,
}

impl<S: Clone, B> Clone for Inbound<S, B> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), layer: self.layer.clone() }
    }
}

impl<S, ReqB, B> tower::Service<http::Request<ReqB>> for Inbound<S, B>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqB>) -> Self::Future {
        let layer = &self.layer;
        if (layer.exempt)(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let Ok(permit) = layer.permits.clone().try_acquire_owned() else {
            layer.shed.inc();
            let rejection = (layer.reject)();
            return Box::pin(async move { Ok(rejection) });
        };
        let requested = layer
            .grpc
            .then(|| {
                request.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(grpc_timeout)
            })
            .flatten();
        let budget = requested.map_or(layer.timeout, |r| r.min(layer.timeout));
        let deadline = Instant::now() + budget;
        let response = DEADLINE.scope(deadline, self.inner.call(request));
        Box::pin(async move {
            let response = response.await;
            drop(permit);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        assert_eq!(grpc_timeout("50m"), Some(Duration::from_millis(50)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("100u"), Some(Duration::from_micros(100)));
        for bad in ["", "m", "10", "123456789m", "-1m", "5x"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
