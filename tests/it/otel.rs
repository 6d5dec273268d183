//! Tracing end to end: the real binary, configured only by the standard `OTEL_*`
//! variables, exports to an OTLP receiver run by the test (the collector's own protocol:
//! the `TraceService` of `opentelemetry-proto` over gRPC, and `POST /v1/traces` with a
//! protobuf body over HTTP). The trace a caller starts must cover its request, the insert,
//! the relay's publish, the payment consumed and the `OrderPaid` published, with the
//! semantic-convention attributes, in the spans and in the Kafka headers alike.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value as Any},
    trace::v1::span::SpanKind,
};
use orders_service::pb::orders::v1::{
    CreateOrderRequest, LineItem, order_service_client::OrderServiceClient,
};
use prost::Message as _;
use serde_json::{Value, json};
use sqlx::Connection as _;

use crate::{
    inbox::{Topics, event, produce},
    kafka,
    support::{eventually, fresh_postgres, valid_order},
};

/// A received span, flattened: ids in hex, attributes as strings, with its resource's.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent_id: String,
    attributes: HashMap<String, String>,
    resource: HashMap<String, String>,
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

/// What the receiver has been sent so far.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

impl Receiver {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().expect("lock");
        for resource_spans in request.resource_spans {
            let resource = attributes(&resource_spans.resource.map(|r| r.attributes).unwrap_or_default());
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    name: span.name,
                    kind: span.kind,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_id: hex(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                    resource: resource.clone(),
                });
            }
        }
    }

    fn spans(&self) -> Vec<Received> {
        self.0.lock().expect("lock").clone()
    }

    /// The one span named `name` (panics if there are several).
    fn named(&self, name: &str) -> Received {
        let found: Vec<Received> = self.spans().into_iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "spans named {name:?}: {found:#?}");
        found.into_iter().next().expect("one")
    }

    /// Serves OTLP/gRPC on a free port; returns its endpoint.
    async fn grpc(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }

    /// Serves OTLP/HTTP (protobuf) on a free port; returns its endpoint.
    async fn http(&self) -> String {
        let receiver = self.clone();
        let router = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| async move {
                receiver.take(ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body"));
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The binary, its REST and gRPC addresses, and its JSON log lines as they arrive.
struct Binary {
    child: Child,
    http: SocketAddr,
    grpc: SocketAddr,
    logs: Arc<Mutex<Vec<Value>>>,
}

impl Binary {
    fn start(env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_orders-service"))
            .env_clear()
            .envs([
                ("APP_HTTP__ADDR", "127.0.0.1:0"),
                ("APP_GRPC__ADDR", "127.0.0.1:0"),
                ("APP_ADMIN__ADDR", "127.0.0.1:0"),
                ("APP_LOG_FORMAT", "json"),
                ("APP_KAFKA__TOPIC_REPLICATION", "1"),
                // Export within 100 ms instead of 5 s, so the test does not wait.
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut early = Vec::new();
        let (http, grpc) = loop {
            let line = lines.next().expect("binary logged its addresses").expect("utf-8 log line");
            let Ok(log) = serde_json::from_str::<Value>(&line) else { continue };
            early.push(log.clone());
            if log["message"] == "orders-service listening" {
                let addr = |key: &str| log[key].as_str().expect("addr").parse().expect("socket addr");
                break (addr("http"), addr("grpc"));
            }
        };
        let logs = Arc::new(Mutex::new(early));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(log) = serde_json::from_str::<Value>(&line) {
                    sink.lock().expect("lock").push(log);
                }
            }
        });
        Self { child, http, grpc, logs }
    }
}

impl Binary {
    /// SIGTERM, then waits (at most 30 s) for the exit without blocking this runtime: it
    /// may be serving the receiver a final flush goes to.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let status =
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(exit) = self.child.try_wait().expect("try_wait") {
                return exit;
            }
            assert!(tokio::time::Instant::now() < deadline, "the binary did not exit within 30 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether a log line so far satisfies `predicate`.
    fn logged(&self, predicate: impl Fn(&Value) -> bool) -> bool {
        self.logs.lock().expect("lock").iter().any(predicate)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// Whether `span` is `ancestor` or lies below it.
fn descends(spans: &[Received], span: &Received, ancestor: &Received) -> bool {
    let mut current = Some(span);
    while let Some(s) = current {
        if s.span_id == ancestor.span_id {
            return true;
        }
        current = spans.iter().find(|p| p.span_id == s.parent_id);
    }
    false
}

fn traceparent_of(headers: &HashMap<String, String>) -> (String, String) {
    let tp = headers.get("traceparent").expect("a traceparent header");
    let parts: Vec<&str> = tp.split('-').collect();
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test]
async fn one_trace_spans_the_request_the_relay_the_consumer_and_order_paid() {
    let receiver = Receiver::default();
    let endpoint = receiver.grpc().await;
    let database_url = fresh_postgres().await;
    let topics = Topics::create().await;
    let orders_topic = kafka::fresh_topic().await;
    let brokers = kafka::brokers();
    let service = Binary::start(&[
        ("APP_DATABASE__URL", &database_url),
        ("APP_KAFKA__BROKERS", &brokers),
        ("APP_EVENTS__TOPIC", &orders_topic),
        ("APP_KAFKA__GROUP_ID", &topics.group),
        ("APP_INBOX__PAYMENTS_TOPIC", &topics.payments),
        ("APP_INBOX__CUSTOMERS_TOPIC", &topics.customers),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_SERVICE_NAME", "orders-service-test"),
        ("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=orders-1,k8s.namespace.name=shop"),
    ]);
    let events = kafka::Tail::start(&brokers, &orders_topic);

    // A caller with a trace of its own creates an order over REST.
    let created: Value = reqwest::Client::new()
        .post(format!("http://{}/v1/orders", service.http))
        .header("idempotency-key", "otel-1")
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&valid_order())
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    let published = |ce_type: &'static str| {
        let id = id.clone();
        let events = &events;
        async move {
            let mut found = None;
            eventually(Duration::from_secs(20), ce_type, || {
                found = events.find(|r| {
                    r.headers.get("ce_subject") == Some(&id)
                        && r.headers.get("ce_type").map(String::as_str) == Some(ce_type)
                });
                std::future::ready(found.is_some())
            })
            .await;
            found.expect("found")
        }
    };
    let order_created = published("orders.events.v1.OrderCreated").await;

    // The payments service continues that trace: its PaymentCaptured carries the
    // traceparent of the OrderCreated it reacted to.
    let data = json!({"paymentId": "pay-otel", "orderId": id, "amountMinor": created["total_minor"].to_string(),
                      "currency": created["currency"]});
    let mut payment =
        event(&topics.payments, "payments.events.v1.PaymentCaptured", "pay-otel-1", &id, data.clone());
    payment.headers.push(("traceparent".into(), order_created.headers["traceparent"].clone().into()));
    // A second capture for the now-paid order is rejected, with a warning logged in its span.
    let mut late = event(&topics.payments, "payments.events.v1.PaymentCaptured", "pay-otel-2", &id, data);
    late.headers.push(("traceparent".into(), order_created.headers["traceparent"].clone().into()));
    produce(vec![payment, late]).await;
    let order_paid = published("orders.events.v1.OrderPaid").await;

    let send = format!("send {orders_topic}");
    let process = format!("process {}", topics.payments);
    eventually(Duration::from_secs(20), "the spans of the whole flow", || {
        let names: Vec<String> = receiver.spans().into_iter().map(|s| s.name).collect();
        let count = |n: &str| names.iter().filter(|x| *x == n).count();
        std::future::ready(count("POST /v1/orders") == 1 && count(&send) == 2 && count(&process) == 2)
    })
    .await;
    let spans: Vec<Received> = receiver.spans().into_iter().filter(|s| s.trace_id == TRACE_ID).collect();

    // The request: an HTTP server span continuing the caller's span.
    let request = receiver.named("POST /v1/orders");
    assert_eq!((request.trace_id.as_str(), request.parent_id.as_str()), (TRACE_ID, CALLER_SPAN));
    assert_eq!(request.kind, SpanKind::Server as i32);
    for (key, value) in
        [("http.request.method", "POST"), ("http.route", "/v1/orders"), ("http.response.status_code", "201")]
    {
        assert_eq!(request.attributes.get(key).map(String::as_str), Some(value), "{key} on {request:#?}");
    }
    assert_eq!(request.resource.get("service.name").map(String::as_str), Some("orders-service-test"));
    assert_eq!(request.resource.get("k8s.pod.name").map(String::as_str), Some("orders-1"));
    assert_eq!(request.resource.get("k8s.namespace.name").map(String::as_str), Some("shop"));

    // The transaction's insert: a database client span inside the request.
    let insert = spans
        .iter()
        .find(|s| s.name == "INSERT orders" && descends(&spans, s, &request))
        .unwrap_or_else(|| panic!("no INSERT orders under the request: {spans:#?}"));
    assert_eq!(insert.kind, SpanKind::Client as i32);
    for (key, value) in
        [("db.system.name", "postgresql"), ("db.operation.name", "INSERT"), ("db.collection.name", "orders")]
    {
        assert_eq!(insert.attributes.get(key).map(String::as_str), Some(value), "{key} on {insert:#?}");
    }

    // The relay's publish of OrderCreated: a producer span, child of the request through the
    // context stored in the outbox row; the Kafka record carries the publish span's context.
    let (created_trace, created_parent) = traceparent_of(&order_created.headers);
    assert_eq!(created_trace, TRACE_ID, "the outbox row kept the caller's trace");
    let publish_created =
        spans.iter().find(|s| s.span_id == created_parent).expect("the OrderCreated publish span");
    assert_eq!(
        (publish_created.name.as_str(), publish_created.parent_id.as_str()),
        (send.as_str(), request.span_id.as_str())
    );
    assert_eq!(publish_created.kind, SpanKind::Producer as i32);
    for (key, value) in [
        ("messaging.system", "kafka"),
        ("messaging.operation.type", "send"),
        ("messaging.destination.name", orders_topic.as_str()),
    ] {
        assert_eq!(publish_created.attributes.get(key).map(String::as_str), Some(value), "{key}");
    }

    // The consumer: a process span, child of the context the payment carried.
    let applied = spans
        .iter()
        .find(|s| {
            s.name == process
                && s.attributes.get("messaging.message.id").map(String::as_str) == Some("pay-otel-1")
        })
        .expect("the process span of the applied payment");
    assert_eq!(applied.parent_id, publish_created.span_id);
    assert_eq!(applied.kind, SpanKind::Consumer as i32);
    for (key, value) in [
        ("messaging.system", "kafka"),
        ("messaging.operation.type", "process"),
        ("messaging.consumer.group.name", topics.group.as_str()),
    ] {
        assert_eq!(applied.attributes.get(key).map(String::as_str), Some(value), "{key}");
    }

    // OrderPaid, emitted by the effect, published in the same trace under the consumer.
    let (paid_trace, paid_parent) = traceparent_of(&order_paid.headers);
    assert_eq!(paid_trace, TRACE_ID);
    let publish_paid = spans.iter().find(|s| s.span_id == paid_parent).expect("the OrderPaid publish span");
    assert_eq!(
        (publish_paid.name.as_str(), publish_paid.parent_id.as_str()),
        (send.as_str(), applied.span_id.as_str())
    );

    // No ids in span names.
    for span in receiver.spans() {
        assert!(!span.name.contains(&id), "an id in the span name {:?}", span.name);
    }

    // The rejected late payment logged its warning as a JSON line joined to its span.
    let rejected = spans
        .iter()
        .find(|s| {
            s.name == process
                && s.attributes.get("messaging.message.id").map(String::as_str) == Some("pay-otel-2")
        })
        .expect("the process span of the rejected payment");
    eventually(Duration::from_secs(5), "the rejection's log line", || {
        let logs = service.logs.lock().expect("lock");
        std::future::ready(logs.iter().any(|l| {
            l["message"] == "inbox: message rejected"
                && l["trace_id"] == TRACE_ID
                && l["span_id"] == rejected.span_id.as_str()
        }))
    })
    .await;
}

#[tokio::test]
async fn grpc_calls_continue_the_callers_trace_over_otlp_http() {
    let receiver = Receiver::default();
    let endpoint = receiver.http().await;
    let database_url = fresh_postgres().await;
    let service = Binary::start(&[
        ("APP_DATABASE__URL", &database_url),
        ("APP_ROLES", "api"), // no relay: the outbox row stays to be read
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), // http/protobuf: the specification's default
    ]);
    assert!(service.logged(|l| l["message"] == "OpenTelemetry tracing" && l["exporting"] == true));
    let mut client = OrderServiceClient::connect(format!("http://{}", service.grpc)).await.expect("connects");
    let mut request = tonic::Request::new(CreateOrderRequest {
        customer_id: "cust-otel".into(),
        items: vec![LineItem { sku: "SKU-1".into(), quantity: 1, unit_price_minor: 100 }],
        currency: "EUR".into(),
        ..Default::default()
    });
    let metadata = request.metadata_mut();
    metadata.insert("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().expect("metadata"));
    metadata.insert("idempotency-key", "otel-grpc-1".parse().expect("metadata"));
    let created = client.create_order(request).await.expect("created").into_inner();

    let name = "orders.v1.OrderService/CreateOrder";
    eventually(Duration::from_secs(20), "the CreateOrder span", || {
        std::future::ready(receiver.spans().iter().any(|s| s.name == name))
    })
    .await;
    let call = receiver.named(name);
    assert_eq!((call.trace_id.as_str(), call.parent_id.as_str()), (TRACE_ID, CALLER_SPAN));
    assert_eq!(call.kind, SpanKind::Server as i32);
    for (key, value) in [
        ("rpc.system", "grpc"),
        ("rpc.service", "orders.v1.OrderService"),
        ("rpc.method", "CreateOrder"),
        ("rpc.grpc.status_code", "0"),
    ] {
        assert_eq!(call.attributes.get(key).map(String::as_str), Some(value), "{key} on {call:#?}");
    }
    assert_eq!(
        call.resource.get("service.name").map(String::as_str),
        Some("orders-service"),
        "the default name"
    );

    // The outbox row carries the call's trace: the caller's trace id, a span of this call.
    let mut db = sqlx::PgConnection::connect(&database_url).await.expect("db");
    let (traceparent,): (Option<String>,) =
        sqlx::query_as("SELECT traceparent FROM outbox WHERE aggregate_id = $1")
            .bind(created.order.expect("order").id)
            .fetch_one(&mut db)
            .await
            .expect("the OrderCreated row");
    let traceparent = traceparent.expect("a traceparent");
    let span_id = traceparent.split('-').nth(2).expect("parent id").to_owned();
    assert!(traceparent.starts_with(&format!("00-{TRACE_ID}-")), "{traceparent}");
    let spans = receiver.spans();
    let stored = spans.iter().find(|s| s.span_id == span_id).expect("the stored span was exported");
    assert!(descends(&spans, stored, &call), "the stored context is the call's or below it");
}

#[tokio::test]
async fn queued_spans_are_flushed_at_shutdown_and_no_endpoint_means_no_exporter() {
    let receiver = Receiver::default();
    let endpoint = receiver.http().await;
    let database_url = fresh_postgres().await;
    let mut service = Binary::start(&[
        ("APP_DATABASE__URL", &database_url),
        ("APP_ROLES", "api"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"), // nothing leaves before shutdown
    ]);
    let response =
        reqwest::get(format!("http://{}/v1/orders/01938f6e-4c2a-7b3e-9d41-6a2f0c5e8b17", service.http))
            .await
            .expect("get");
    assert_eq!(response.status(), 404);
    assert!(receiver.spans().is_empty(), "exported before shutdown");
    let exit = service.terminate().await;
    assert!(exit.success(), "{exit:?}");
    let get = receiver.named("GET /v1/orders/{id}");
    assert_eq!(get.attributes.get("http.response.status_code").map(String::as_str), Some("404"));

    // Without an endpoint the binary says it exports nothing (no exporter was built).
    let quiet = Binary::start(&[("APP_DATABASE__URL", &database_url), ("APP_ROLES", "api")]);
    assert!(quiet.logged(|l| l["message"] == "OpenTelemetry tracing" && l["exporting"] == false));
}

/// A collector that accepts and never answers (blackholed) costs dropped spans, not
/// requests: every request is answered within its client deadline while the exporter's
/// queue overflows, and shutdown gives up flushing after its bound instead of hanging.
#[tokio::test]
async fn a_blackholed_collector_costs_spans_not_requests_nor_a_hung_shutdown() {
    let collector = crate::proxy::Blackhole::start().await;
    let database_url = fresh_postgres().await;
    let endpoint = format!("http://{}", collector.addr);
    let mut service = Binary::start(&[
        ("APP_DATABASE__URL", &database_url),
        ("APP_ROLES", "api"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
    ]);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("client");
    let url = format!("http://{}/v1/orders/01938f6e-4c2a-7b3e-9d41-6a2f0c5e8b17", service.http);
    for i in 0..300 {
        let response = client.get(&url).send().await.unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(response.status(), 404, "request {i}");
    }
    let exit = service.terminate().await;
    assert!(exit.success(), "{exit:?}");
}
