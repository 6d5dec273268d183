//! Logs and traces. Logs: readable lines on a terminal, one JSON object per line
//! (`APP_LOG_FORMAT=json`) for log collectors, carrying `trace_id` and `span_id` while a
//! traced span is active. Traces: OpenTelemetry over OTLP, configured only by the standard
//! `OTEL_*` variables, so a collector sidecar or an operator's defaults just work.
//!
//! Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set and
//! `OTEL_TRACES_EXPORTER` is not `none`; otherwise no exporter, no tracer and no
//! OpenTelemetry layer exist, so the spans below cost what a disabled `tracing` span costs.
//! W3C trace context travels request → outbox row → Kafka headers → consumer → the next
//! outbox row, so one trace id covers a create, its relay publish, the payment consumed
//! and the `OrderPaid` it causes.

use std::{fmt, time::Duration};

use opentelemetry::{
    Context,
    propagation::{Extractor, TextMapCompositePropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    propagation::{BaggagePropagator, TraceContextPropagator},
    trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter},
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    prelude::*,
    registry::LookupSpan,
};

use crate::{
    config::{LogFormat, LogSettings},
    outbox::TraceContext,
};

/// The installed tracing pipeline; [`Telemetry::shutdown`] flushes what is queued.
#[must_use = "dropping it without shutdown() loses the spans still queued"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued (bounded by the exporter's timeout) and stops the
    /// exporter. Runs off the async workers: the export needs them to make progress.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let flushed =
                tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(5)));
            if let Ok(Err(e)) = flushed.await {
                eprintln!("OpenTelemetry: flushing spans at shutdown failed: {e}");
            }
        }
    }
}

/// What the OTLP exporter speaks (`OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (port 4317 by convention).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318), the specification's default.
    HttpProtobuf,
}

/// The exporter the environment asks for, if any.
pub fn otlp_protocol(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Protocol>> {
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none")
        || (set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none())
    {
        return Ok(None);
    }
    let protocol = set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL"));
    match protocol.as_deref().map(str::trim) {
        None | Some("http/protobuf") => Ok(Some(Protocol::HttpProtobuf)),
        Some("grpc") => Ok(Some(Protocol::Grpc)),
        Some(other) => {
            anyhow::bail!("OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported; use grpc or http/protobuf")
        }
    }
}

/// Installs the global subscriber and, when the environment asks for it, the OTLP
/// pipeline. `RUST_LOG`, when set, overrides `APP_LOG_LEVEL`. Call it inside the runtime.
pub fn init(settings: &LogSettings) -> anyhow::Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    let provider = match otlp_protocol(|name| std::env::var(name).ok())? {
        Some(protocol) => Some(provider(protocol)?),
        None => None,
    };
    // Spans carry the semantic-convention attributes set below, not tracing's bookkeeping
    // (source locations, threads, busy/idle times, targets).
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("orders-service"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_target(false)
    });
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    // try_init: a second call (tests) keeps the first subscriber instead of panicking.
    let _ = match settings.format {
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().event_format(JsonLines)).try_init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).try_init(),
    };
    Ok(Telemetry { provider })
}

fn provider(protocol: Protocol) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    // The builders read OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS and _TIMEOUT.
    let exporter = match protocol {
        Protocol::Grpc => {
            let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
            let processor = BatchSpanProcessor::builder(OnRuntime::new(exporter)).build();
            return Ok(builder().with_span_processor(processor).build());
        }
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()?,
    };
    // The batch processor runs on its own thread with a bounded queue (OTEL_BSP_* tune it);
    // a full queue drops spans, never blocks a request.
    Ok(builder().with_batch_exporter(exporter).build())
}

/// The provider with its resource: `service.name` (`OTEL_SERVICE_NAME`, else
/// `orders-service`), `service.version`, and `OTEL_RESOURCE_ATTRIBUTES` (the chart passes
/// the pod and namespace there). The sampler comes from `OTEL_TRACES_SAMPLER[_ARG]`.
fn builder() -> opentelemetry_sdk::trace::TracerProviderBuilder {
    let name = std::env::var("OTEL_SERVICE_NAME").ok().filter(|n| !n.trim().is_empty());
    let resource = Resource::builder()
        .with_service_name(name.unwrap_or_else(|| "orders-service".to_owned()))
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    SdkTracerProvider::builder().with_resource(resource)
}

/// The OTLP/gRPC exporter needs a Tokio reactor, and the batch processor calls it from its
/// own thread, which has none: each export runs on the service's runtime instead.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: E,
    runtime: tokio::runtime::Handle,
}

impl<E> OnRuntime<E> {
    fn new(inner: E) -> Self {
        Self { inner, runtime: tokio::runtime::Handle::current() }
    }
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        self.runtime.block_on(self.inner.export(batch))
    }
    fn shutdown_with_timeout(&mut self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn force_flush(&mut self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Reads W3C trace context and baggage from any header carrier.
struct Carrier<'a, F: Fn(&str) -> Option<&'a str>>(F, &'a [&'a str]);

impl<'a, F: Fn(&str) -> Option<&'a str>> Extractor for Carrier<'a, F> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }
    fn keys(&self) -> Vec<&str> {
        self.1.to_vec()
    }
}

/// The remote parent named by `traceparent`/`tracestate`/`baggage` headers (empty if none).
pub fn extract<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Context {
    let carrier = Carrier(get, &["traceparent", "tracestate", "baggage"]);
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier))
}

/// Makes `span` a child of the remote context the headers carry, if they carry one.
pub fn continue_from<'a>(span: &Span, get: impl Fn(&str) -> Option<&'a str>) {
    let parent = extract(get);
    if parent.span().span_context().is_valid() {
        // Fails only when tracing is off (no OpenTelemetry layer): nothing to continue then.
        let _ = span.set_parent(parent);
    }
}

/// The trace context to store with an event written now: the current span's (so the
/// relay's publish span becomes its child), or, with tracing off, `received` as it came.
pub fn current_or(received: TraceContext) -> TraceContext {
    context_of(&Span::current(), received)
}

/// [`current_or`] the W3C context that `get` reads from headers, metadata or a message.
pub fn event_context<'a>(get: impl Fn(&str) -> Option<&'a str>) -> TraceContext {
    current_or(TraceContext::from_headers(get("traceparent"), get("tracestate")))
}

/// `span`'s trace context as W3C headers, or `fallback` when it is not traced.
pub fn context_of(span: &Span, fallback: TraceContext) -> TraceContext {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return fallback;
    }
    let mut headers = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut headers));
    TraceContext::from_headers(
        headers.get("traceparent").map(String::as_str),
        headers.get("tracestate").map(String::as_str),
    )
}

/// The HTTP server span of a request (semantic conventions): named `METHOD /route` (the
/// route template, never the raw path), continuing the caller's trace; [`http_status`]
/// completes it.
pub fn http_server_span(method: &str, route: Option<&str>, request: &axum::extract::Request) -> Span {
    let name = route.map_or_else(|| method.to_owned(), |r| format!("{method} {r}"));
    let span = tracing::info_span!("http.server", otel.name = %name, otel.kind = "server",
        http.request.method = method, http.route = route, url.path = request.uri().path(),
        url.scheme = "http", http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty, "error.type" = tracing::field::Empty);
    continue_from(&span, |name| request.headers().get(name).and_then(|v| v.to_str().ok()));
    span
}

/// Records the response status; a 5xx marks the span failed.
pub fn http_status(span: &Span, status: http::StatusCode) {
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        failed(span, status.as_str());
    }
}

/// The RPC server span of a gRPC call: named `package.Service/Method`, continuing the
/// caller's trace; [`grpc_status`] completes it.
pub fn grpc_server_span(path: &str, headers: &http::HeaderMap) -> Span {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("unknown", "unknown"));
    let span = tracing::info_span!("rpc.server", otel.name = %format!("{service}/{method}"), otel.kind = "server",
        rpc.system = "grpc", rpc.service = service, rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty, otel.status_code = tracing::field::Empty);
    continue_from(&span, |name| headers.get(name).and_then(|v| v.to_str().ok()));
    span
}

/// Records the call's gRPC status; the server-side error codes mark the span failed.
pub fn grpc_status(span: &Span, code: &str) {
    if let Ok(code) = code.parse::<u8>() {
        span.record("rpc.grpc.status_code", code);
        // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
        if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// The producer span of one relayed event, `send <topic>`: a child of the context stored
/// with the outbox row (the request that wrote it); its own context goes into the Kafka
/// headers. Field values are formatted only when the span is enabled.
pub fn publish_span(topic: &str, message_id: &uuid::Uuid, stored: &TraceContext) -> Span {
    let span = tracing::info_span!("messaging.send", otel.name = %format!("send {topic}"), otel.kind = "producer",
        messaging.system = "kafka", messaging.operation.type = "send", messaging.operation.name = "send",
        messaging.destination.name = topic, messaging.message.id = %message_id,
        otel.status_code = tracing::field::Empty, "error.type" = tracing::field::Empty);
    continue_from(&span, |name| match name {
        "traceparent" => stored.traceparent.as_deref(),
        "tracestate" => stored.tracestate.as_deref(),
        _ => None,
    });
    span
}

/// The consumer span of one inbound message, `process <topic>`: a child of the producer's
/// context from the message's headers, so the effect (and the event it emits) join its trace.
pub fn process_span(message: &crate::inbox::InboundMessage, group: &str) -> Span {
    let span = tracing::info_span!("messaging.process", otel.name = %format!("process {}", message.topic),
        otel.kind = "consumer", messaging.system = "kafka", messaging.operation.type = "process",
        messaging.operation.name = "process", messaging.destination.name = %message.topic,
        messaging.consumer.group.name = group, messaging.destination.partition.id = %message.partition,
        messaging.kafka.offset = message.offset, messaging.message.id = message.header("ce_id"),
        otel.status_code = tracing::field::Empty, "error.type" = tracing::field::Empty);
    continue_from(&span, |name| message.header(name));
    span
}

/// Marks `span` failed, `error.type` naming the kind of failure (a low-cardinality label).
pub fn failed(span: &Span, error_type: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", error_type);
}

/// One JSON object per line: time, level, target, the event's fields, the current span's
/// name and, inside a traced span, `trace_id` and `span_id` for joining logs to traces.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut line = serde_json::Map::new();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        line.insert("timestamp".into(), now.into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        event.record(&mut JsonFields(&mut line));
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
            let ids = span
                .extensions()
                .get::<tracing_opentelemetry::OtelData>()
                .and_then(|d| d.trace_id().zip(d.span_id()));
            if let Some((trace_id, span_id)) = ids {
                line.insert("trace_id".into(), trace_id.to_string().into());
                line.insert("span_id".into(), span_id.to_string().into());
            }
        }
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

/// Collects an event's fields into the JSON line.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn no_endpoint_means_no_exporter() {
        assert_eq!(otlp_protocol(env(&[])).unwrap(), None);
        assert_eq!(otlp_protocol(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])).unwrap(), None);
        let off = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_TRACES_EXPORTER", "none")];
        assert_eq!(otlp_protocol(env(&off)).unwrap(), None);
    }

    #[test]
    fn the_protocol_follows_the_standard_variables() {
        let http = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")];
        assert_eq!(otlp_protocol(env(&http)).unwrap(), Some(Protocol::HttpProtobuf), "the spec's default");
        let grpc = [
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ];
        assert_eq!(otlp_protocol(env(&grpc)).unwrap(), Some(Protocol::Grpc));
        let json =
            [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")];
        let err = otlp_protocol(env(&json)).unwrap_err().to_string();
        assert!(err.contains("http/json"), "{err}");
    }

    #[test]
    fn with_tracing_off_the_received_context_is_stored_as_it_came() {
        let received =
            TraceContext::from_headers(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), None);
        assert_eq!(current_or(received.clone()), received);
    }
}
