//! Prometheus metrics, exposed by the admin server on their own port (kept off the public
//! listener so ingress never exposes them).
//!
//! Names are stable and catalogued in `docs/metrics.md` (type, labels, meaning, the alert
//! that reads each), which `tests/it/metrics.rs` keeps complete against a real scrape;
//! labels are route templates and gRPC method names, never raw paths or ids, so
//! cardinality stays bounded.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use crate::store::PoolProbe;
use axum::{
    extract::{MatchedPath, Request, State},
    http::HeaderValue,
    middleware::Next,
    response::Response,
};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, from 1 ms to 10 s.
const BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// gRPC services whose method names are used as labels; anything else is `unknown`.
const GRPC_SERVICES: &[&str] = &[
    "/orders.v1.OrderService/",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The service's metrics, in a registry of its own (not the global one), so parallel tests
/// each see only their own numbers.
pub struct Metrics {
    /// Registry that `/metrics` encodes.
    pub registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    grpc_requests: IntCounterVec,
    grpc_duration: HistogramVec,
    /// Outbox rows waiting to be published.
    pub outbox_pending: IntGauge,
    /// Age of the oldest waiting outbox row, seconds.
    pub outbox_oldest_age: Gauge,
    /// Outbox rows published and deleted.
    pub outbox_published: IntCounter,
    /// Publish failures by kind.
    pub outbox_publish_errors: IntCounterVec,
    /// Rows in the dead-letter table.
    pub outbox_dead_letters: IntGauge,
    /// Partitions leased by this replica's relay.
    pub outbox_partitions_owned: IntGauge,
    /// Commit → broker acknowledgement.
    pub outbox_publish_latency: Histogram,
    /// Live relays at the last acquisition.
    pub outbox_relays_live: IntGauge,
    /// Relay passes.
    pub outbox_relay_passes: IntCounter,
    /// Where commit → acknowledgement goes, by stage: per event `queued` (created → fetched);
    /// per pass `fetch` and `settle` (one statement each) and `publish` (a batch handed over
    /// until the broker answered for all of it).
    pub outbox_relay_stage: HistogramVec,
    /// Producers rebuilt, by reason.
    pub outbox_producer_rebuilds: IntCounterVec,
    /// Rows whose settlement the lease no longer covered.
    pub outbox_settle_fenced: IntCounter,
    /// Events the broker acknowledged after an earlier event of their aggregate failed in
    /// the same batch (the publisher's ordering contract broken); each is published again.
    pub outbox_order_violations: IntCounter,
    /// Inbound messages by topic and result.
    pub inbox_messages: IntCounterVec,
    /// Time to handle one inbound message, retries included.
    pub inbox_processing: HistogramVec,
    /// Transient inbox failures that were retried.
    pub inbox_retries: IntCounterVec,
    /// Messages that could not be handed to their partition's worker.
    pub inbox_dispatch_failures: IntCounterVec,
    /// Consumer lag per partition (messages behind the high watermark).
    pub inbox_consumer_lag: IntGaugeVec,
    /// Partitions paused for back-pressure (their worker is behind).
    pub inbox_partitions_paused: IntGauge,
    /// Dead-letter producers rebuilt, by reason (fatal error, or unresponsive).
    pub inbox_dlq_producer_rebuilds: IntCounterVec,
    /// 1 while the consumer's group membership is steady (joined, assignment applied).
    pub inbox_group_steady: IntGauge,
    /// Partitions the consumer holds after its last rebalance.
    pub inbox_partitions_assigned: IntGauge,
    /// Times the consumer left and rejoined its group because a partition it does not hold
    /// made no progress (see `inbox::kafka`).
    pub inbox_group_rejoins: IntCounter,
    /// Idempotency-Key outcomes.
    pub idempotency_outcomes: IntCounterVec,
    /// Circuit breaker state per dependency.
    pub breaker_state: IntGaugeVec,
    /// Breaker transitions per dependency and target state.
    pub breaker_transitions: IntCounterVec,
    /// Calls refused by an open breaker.
    pub calls_refused: IntCounterVec,
    /// Attempts cut by a policy timeout.
    pub dependency_timeouts: IntCounterVec,
    /// Retries attempted or refused by the budget.
    pub retries: IntCounterVec,
    /// Inbound requests shed at the concurrency limit.
    pub shed: IntCounterVec,
    /// Calls to deprecated operations, per caller: who still has to migrate.
    pub deprecated_calls: IntCounterVec,
    /// Redis command latency by operation and outcome.
    pub redis_call_duration: HistogramVec,
    /// Calls waiting for a concurrency slot of a dependency's policy.
    pub calls_waiting: IntGaugeVec,
}

/// `db_pool_connections{pool, state}` and `db_pool_max_connections{pool}`, read from the
/// pools when scraped (no task keeps them fresh).
struct PoolCollector {
    connections: IntGaugeVec,
    max: IntGaugeVec,
    pools: Vec<(&'static str, PoolProbe)>,
}

impl prometheus::core::Collector for PoolCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.connections.desc().into_iter().chain(self.max.desc()).collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        for (pool, probe) in &self.pools {
            let stats = probe();
            let gauge = |state: &str| self.connections.with_label_values(&[pool, state]);
            gauge("in_use").set(i64::from(stats.size.saturating_sub(stats.idle)));
            gauge("idle").set(i64::from(stats.idle));
            self.max.with_label_values(&[pool]).set(i64::from(stats.max));
        }
        let mut families = self.connections.collect();
        families.extend(self.max.collect());
        families
    }
}

fn counters(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> anyhow::Result<IntCounterVec> {
    registered(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
}

/// Registers `metric` and hands it back, so each metric is declared in one statement.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> anyhow::Result<M> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    /// Records that a relay pass spent the time since `since` in `stage` (`fetch`,
    /// `publish` or `settle`).
    pub fn relay_stage(&self, stage: &str, since: std::time::Instant) {
        self.outbox_relay_stage.with_label_values(&[stage]).observe(since.elapsed().as_secs_f64());
    }

    /// Records, per fetched event, how long it waited for the fetch since it was created
    /// (`stage="queued"`): its create's transaction, then the wake-up and the pass in
    /// flight. The part of commit → acknowledgement the per-pass stages do not time.
    pub fn relay_queued(&self, waits: impl Iterator<Item = chrono::TimeDelta>) {
        let queued = self.outbox_relay_stage.with_label_values(&["queued"]);
        for wait in waits {
            queued.observe(wait.to_std().unwrap_or_default().as_secs_f64());
        }
    }

    /// Registers the database pools' occupancy, read at every scrape.
    pub fn register_pools(&self, pools: Vec<(&'static str, PoolProbe)>) -> anyhow::Result<()> {
        let connections = IntGaugeVec::new(
            Opts::new("db_pool_connections", "Database connections by pool and state (in_use, idle)"),
            &["pool", "state"],
        )?;
        let max = IntGaugeVec::new(
            Opts::new("db_pool_max_connections", "The most connections a database pool opens"),
            &["pool"],
        )?;
        self.registry.register(Box::new(PoolCollector { connections, max, pools }))?;
        Ok(())
    }

    /// Creates and registers every metric.
    pub fn new() -> anyhow::Result<Arc<Self>> {
        let registry = Registry::new();
        let http_requests = registered(
            &registry,
            IntCounterVec::new(
                Opts::new("http_requests_total", "REST requests by method, route template and status"),
                &["method", "route", "status"],
            )?,
        )?;
        let http_duration = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new("http_request_duration_seconds", "REST request latency")
                    .buckets(BUCKETS.to_vec()),
                &["method", "route"],
            )?,
        )?;
        let grpc_requests = registered(
            &registry,
            IntCounterVec::new(
                Opts::new("grpc_requests_total", "gRPC requests by method and status code"),
                &["method", "code"],
            )?,
        )?;
        let grpc_duration = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new("grpc_request_duration_seconds", "gRPC request latency")
                    .buckets(BUCKETS.to_vec()),
                &["method"],
            )?,
        )?;
        let outbox_pending =
            registered(&registry, IntGauge::new("outbox_pending", "Outbox rows waiting to be published")?)?;
        let outbox_oldest_age = registered(
            &registry,
            Gauge::new("outbox_oldest_age_seconds", "Age of the oldest waiting outbox row in seconds")?,
        )?;
        let outbox_published = registered(
            &registry,
            IntCounter::new("outbox_published_total", "Outbox rows published and deleted")?,
        )?;
        let outbox_publish_errors = registered(
            &registry,
            IntCounterVec::new(
                Opts::new("outbox_publish_errors_total", "Outbox publish failures by kind"),
                &["kind"],
            )?,
        )?;
        let outbox_dead_letters = registered(
            &registry,
            IntGauge::new("outbox_dead_letters", "Rows in the outbox dead-letter table")?,
        )?;
        let outbox_partitions_owned = registered(
            &registry,
            IntGauge::new("outbox_partitions_owned", "Outbox partitions leased by this replica's relay")?,
        )?;
        let outbox_publish_latency = registered(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "outbox_publish_latency_seconds",
                    "Outbox commit to broker acknowledgement",
                )
                .buckets(BUCKETS.to_vec()),
            )?,
        )?;
        let outbox_relays_live = registered(
            &registry,
            IntGauge::new("outbox_relays_live", "Live relays at this relay's last lease acquisition")?,
        )?;
        let outbox_relay_passes =
            registered(&registry, IntCounter::new("outbox_relay_passes_total", "Outbox relay passes")?)?;
        let outbox_relay_stage = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "outbox_relay_stage_seconds",
                    "Outbox relay time per stage: queued per event (created to fetched), fetch and settle statements, publish until acknowledged",
                )
                .buckets(BUCKETS.to_vec()),
                &["stage"],
            )?,
        )?;
        let outbox_producer_rebuilds = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "outbox_producer_rebuilds_total",
                    "Kafka producers rebuilt (fatal error, or unresponsive)",
                ),
                &["reason"],
            )?,
        )?;
        let outbox_settle_fenced = registered(
            &registry,
            IntCounter::new(
                "outbox_settle_fenced_total",
                "Outbox rows not settled because their partition lease had moved on",
            )?,
        )?;
        let outbox_order_violations = registered(
            &registry,
            IntCounter::new(
                "outbox_order_violations_total",
                "Outbox events acknowledged after an earlier event of their aggregate failed in the same batch",
            )?,
        )?;
        let inbox_messages = registered(
            &registry,
            IntCounterVec::new(
                Opts::new("inbox_messages_total", "Inbound messages by topic and result"),
                &["topic", "result"],
            )?,
        )?;
        let inbox_processing = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new("inbox_processing_seconds", "Time to handle one inbound message")
                    .buckets(BUCKETS.to_vec()),
                &["topic"],
            )?,
        )?;
        let inbox_retries = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "inbox_retries_total",
                    "Inbox attempts retried (database unavailable or attempt aborted)",
                ),
                &["topic"],
            )?,
        )?;
        let inbox_dispatch_failures = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "inbox_dispatch_failures_total",
                    "Inbound messages whose partition worker had died",
                ),
                &["topic"],
            )?,
        )?;
        let inbox_consumer_lag = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new("inbox_consumer_lag", "Messages behind the high watermark, per partition"),
                &["topic", "partition"],
            )?,
        )?;
        let inbox_partitions_paused = registered(
            &registry,
            IntGauge::new(
                "inbox_partitions_paused",
                "Inbound partitions paused because their worker is behind",
            )?,
        )?;
        let inbox_group_steady = registered(
            &registry,
            IntGauge::new(
                "inbox_group_steady",
                "1 while the inbox consumer's group membership is steady (joined, assignment applied)",
            )?,
        )?;
        let inbox_partitions_assigned = registered(
            &registry,
            IntGauge::new(
                "inbox_partitions_assigned",
                "Partitions the inbox consumer holds after its last rebalance",
            )?,
        )?;
        let inbox_group_rejoins = registered(
            &registry,
            IntCounter::new(
                "inbox_group_rejoins_total",
                "Times the inbox consumer rejoined its group because a partition no member consumed trailed without progress",
            )?,
        )?;
        let inbox_dlq_producer_rebuilds = counters(
            &registry,
            "inbox_dlq_producer_rebuilds_total",
            "Producers rebuilt by the inbox's dead-letter path (fatal error, or unresponsive)",
            &["reason"],
        )?;
        let idempotency_outcomes = registered(
            &registry,
            IntCounterVec::new(
                Opts::new("idempotency_outcomes_total", "Idempotency-Key outcomes"),
                &["outcome"],
            )?,
        )?;
        let breaker_state = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new("resilience_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open"),
                &["dependency"],
            )?,
        )?;
        let breaker_transitions = counters(
            &registry,
            "resilience_breaker_transitions_total",
            "Circuit breaker transitions",
            &["dependency", "to"],
        )?;
        let calls_refused = counters(
            &registry,
            "resilience_calls_refused_total",
            "Calls refused by an open breaker",
            &["dependency"],
        )?;
        let dependency_timeouts = counters(
            &registry,
            "resilience_timeouts_total",
            "Attempts cut by the policy timeout",
            &["dependency"],
        )?;
        let retries = counters(
            &registry,
            "resilience_retries_total",
            "Retries attempted or refused by the retry budget",
            &["dependency", "outcome"],
        )?;
        let shed = counters(
            &registry,
            "inbound_shed_total",
            "Requests shed at the concurrency limit",
            &["protocol"],
        )?;
        let deprecated_calls = counters(
            &registry,
            "deprecated_calls_total",
            "Calls to deprecated operations (served before the sunset, gone after it)",
            &["operation", "caller", "outcome"],
        )?;
        let redis_call_duration = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "redis_call_duration_seconds",
                    "Redis command latency, the policy's wait included",
                )
                .buckets(BUCKETS.to_vec()),
                &["operation", "outcome"],
            )?,
        )?;
        let calls_waiting = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "resilience_calls_waiting",
                    "Calls waiting for a concurrency slot of the dependency's policy",
                ),
                &["dependency"],
            )?,
        )?;
        let build_info = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "orders_service_build_info",
                    "The running build: always 1, labelled with its version and commit",
                ),
                &["version", "commit"],
            )?,
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), option_env!("GIT_COMMIT").unwrap_or("unknown")])
            .set(1);
        Ok(Arc::new(Self {
            redis_call_duration,
            calls_waiting,
            deprecated_calls,
            breaker_state,
            breaker_transitions,
            calls_refused,
            dependency_timeouts,
            retries,
            shed,
            registry,
            http_requests,
            http_duration,
            grpc_requests,
            grpc_duration,
            outbox_pending,
            outbox_oldest_age,
            outbox_published,
            outbox_publish_errors,
            outbox_dead_letters,
            outbox_partitions_owned,
            outbox_publish_latency,
            outbox_relays_live,
            outbox_relay_passes,
            outbox_relay_stage,
            outbox_producer_rebuilds,
            outbox_settle_fenced,
            outbox_order_violations,
            inbox_messages,
            inbox_processing,
            inbox_retries,
            inbox_dispatch_failures,
            inbox_consumer_lag,
            inbox_partitions_paused,
            inbox_dlq_producer_rebuilds,
            inbox_group_steady,
            inbox_group_rejoins,
            inbox_partitions_assigned,
            idempotency_outcomes,
        }))
    }

    /// Encodes every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// axum middleware recording REST RED metrics by route template, inside the request's HTTP
/// server span (see [`crate::telemetry::http_server_span`]).
pub async fn track_http(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let matched = (route != "unmatched").then_some(route.as_str());
    let span = crate::telemetry::http_server_span(&method, matched, &request);
    let start = Instant::now();
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    crate::telemetry::http_status(&span, response.status());
    metrics.http_duration.with_label_values(&[&method, &route]).observe(start.elapsed().as_secs_f64());
    metrics.http_requests.with_label_values(&[&method, &route, response.status().as_str()]).inc();
    response
}

/// Tower layer recording gRPC RED metrics by method.
#[derive(Clone)]
pub struct GrpcMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner, metrics: self.0.clone() }
    }
}

/// The service produced by [`GrpcMetricsLayer`].
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let method = if GRPC_SERVICES.iter().any(|s| path.starts_with(s)) {
            path.to_owned()
        } else {
            "unknown".into()
        };
        // Dropped before completing means tonic's deadline (grpc-timeout) cut the call short:
        // the guard records it as CANCELLED (1), the code the client receives.
        let span = crate::telemetry::grpc_server_span(path, request.headers());
        let mut record =
            Recorder { metrics: self.metrics.clone(), method, start: Instant::now(), code: None };
        let future = span.in_scope(|| self.inner.call(request));
        let traced = span.clone();
        Box::pin(tracing::Instrument::instrument(
            async move {
                let result = future.await;
                // Unary errors are "trailers-only" responses with grpc-status in the headers;
                // a response without it carries status 0 (OK) in its trailers.
                let code = match &result {
                    Ok(response) => response.headers().get("grpc-status").map_or("0", grpc_code),
                    Err(_) => "transport_error",
                };
                crate::telemetry::grpc_status(&traced, code);
                record.completed(code);
                result
            },
            span,
        ))
    }
}

/// Records one gRPC call when dropped, whether it completed or was cut short.
struct Recorder {
    metrics: Arc<Metrics>,
    method: String,
    start: Instant,
    /// The status code, once the call completed.
    code: Option<String>,
}

impl Recorder {
    fn completed(&mut self, code: &str) {
        self.code = Some(code.to_owned());
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let code = self.code.as_deref().unwrap_or("1");
        self.metrics
            .grpc_duration
            .with_label_values(&[&self.method])
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics.grpc_requests.with_label_values(&[&self.method, code]).inc();
    }
}

fn grpc_code(value: &HeaderValue) -> &str {
    value.to_str().unwrap_or("invalid")
}
