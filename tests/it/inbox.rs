//! The inbox against PostgreSQL and the Kafka broker (and SQLite with the in-process bus
//! through the running service): exactly-once effects over at-least-once delivery.

use std::{sync::Arc, time::Duration};

use orders_service::{
    backoff::Backoff,
    domain::{Order, OrderStatus},
    inbox::{InboundMessage, Inbox, InboxSettings, Outcome, kafka::KafkaInbox},
    publish::{KafkaPublisher, OutboundMessage, Publisher},
    store::{self, Store},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    kafka,
    outbox::{PARTITIONS, Pipeline, Sink, header},
    proxy::ChaosProxy,
    support::{self, Backend, eventually},
};

/// Fresh payments and customers topics (and their DLQs) and a fresh group per test.
pub struct Topics {
    pub payments: String,
    pub customers: String,
    pub group: String,
}

impl Topics {
    pub async fn create() -> Self {
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let topics = Self {
            payments: format!("payments.events.test-{suffix}"),
            customers: format!("customers.events.test-{suffix}"),
            group: format!("orders-service-test-{suffix}"),
        };
        let names = [
            topics.payments.clone(),
            format!("{}.dlq", topics.payments),
            topics.customers.clone(),
            format!("{}.dlq", topics.customers),
        ];
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        kafka::settings(&kafka::brokers()).create_topics(&names, &kafka::layout()).await.expect("topics");
        topics
    }

    pub fn settings(&self, retention: Duration) -> InboxSettings {
        InboxSettings {
            group_id: self.group.clone(),
            payments_topic: self.payments.clone(),
            customers_topic: self.customers.clone(),
            retention,
            max_parallel_partitions: 4,
            max_attempts: 5,
        }
    }
}

pub fn inbox(pipeline: &Pipeline, store: Arc<dyn Store>, topics: &Topics, retention: Duration) -> Arc<Inbox> {
    inbox_with(pipeline, store, topics.settings(retention))
}

/// An inbox with explicit settings.
pub fn inbox_with(pipeline: &Pipeline, store: Arc<dyn Store>, settings: InboxSettings) -> Arc<Inbox> {
    inbox_counted_by(pipeline, store, settings, pipeline.metrics.clone())
}

/// An inbox with explicit settings counting into its own `metrics` (a second consumer).
pub fn inbox_counted_by(
    pipeline: &Pipeline,
    store: Arc<dyn Store>,
    settings: InboxSettings,
    metrics: Arc<orders_service::metrics::Metrics>,
) -> Arc<Inbox> {
    inbox_dead_lettering_to(pipeline, store, settings, metrics, Arc::new(kafka::publisher()))
}

/// An inbox whose poison messages go to `dlq`.
pub fn inbox_dead_lettering_to(
    pipeline: &Pipeline,
    store: Arc<dyn Store>,
    settings: InboxSettings,
    metrics: Arc<orders_service::metrics::Metrics>,
    dlq: Arc<dyn Publisher>,
) -> Arc<Inbox> {
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500)).expect("backoff");
    Inbox::new(store, pipeline.wakeup(), PARTITIONS, dlq, metrics, backoff, settings)
}

/// Starts the Kafka runner; cancel the token to stop it.
pub fn consume(inbox: Arc<Inbox>, metrics: Arc<orders_service::metrics::Metrics>) -> CancellationToken {
    consume_joinable(inbox, metrics).0
}

/// Like [`consume`], with the runner's handle to await its graceful stop.
pub fn consume_joinable(
    inbox: Arc<Inbox>,
    metrics: Arc<orders_service::metrics::Metrics>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let runner = KafkaInbox::new(&kafka::settings(&kafka::brokers()), inbox, metrics).expect("consumer");
    let handle = tokio::spawn(runner.run(stop.clone()));
    (stop, handle)
}

pub fn event(topic: &str, ce_type: &str, id: &str, key: &str, data: serde_json::Value) -> OutboundMessage {
    OutboundMessage {
        topic: topic.to_owned(),
        key: key.to_owned(),
        payload: serde_json::to_vec(&data).expect("json"),
        headers: [
            ("ce_specversion", "1.0"),
            ("ce_id", id),
            ("ce_type", ce_type),
            ("ce_source", "/payments-service"),
            ("content-type", "application/json"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.to_owned().into()))
        .collect(),
    }
}

pub fn payment_captured(topic: &str, id: &str, order: &Order) -> OutboundMessage {
    capture(topic, id, &order.id.to_string(), order.total_minor, order.currency.as_str())
}

/// `PaymentCaptured` (event id `id`, payment `pay-<id>`) of `amount_minor` for `order_id`.
pub fn capture(topic: &str, id: &str, order_id: &str, amount_minor: i64, currency: &str) -> OutboundMessage {
    let data = json!({"paymentId": format!("pay-{id}"), "orderId": order_id,
                      "amountMinor": amount_minor.to_string(), "currency": currency});
    event(topic, "payments.events.v1.PaymentCaptured", id, order_id, data)
}

/// `message` as the inbox receives it at `offset` of partition 0.
pub fn inbound(message: &OutboundMessage, offset: i64) -> InboundMessage {
    InboundMessage {
        topic: message.topic.clone(),
        partition: 0,
        offset,
        key: Some(message.key.clone().into_bytes()),
        headers: orders_service::publish::owned_headers(message.headers.clone()),
        payload: message.payload.clone(),
    }
}

pub async fn produce(messages: Vec<OutboundMessage>) {
    let publisher: KafkaPublisher = kafka::publisher();
    for result in publisher.publish(messages).await {
        result.expect("produced");
    }
}

pub fn count(pipeline: &Pipeline, topic: &str, result: &str) -> u64 {
    pipeline.metrics.inbox_messages.with_label_values(&[topic, result]).get()
}

/// Publishes the outbox to a bus and returns the OrderPaid events' keys.
pub async fn order_paid_keys(pipeline: &Pipeline) -> Vec<String> {
    let sink = Sink::bus(1_000_000);
    pipeline.drain(&pipeline.relay_to("relay-check", &sink)).await;
    sink.read(0)
        .await
        .into_iter()
        .filter(|r| header(r, "ce_type") == "orders.events.v1.OrderPaid")
        .map(|r| r.key)
        .collect()
}

#[tokio::test]
async fn one_two_and_fifty_deliveries_have_exactly_one_effect_each() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let orders = [pipeline.create(1).await, pipeline.create(2).await, pipeline.create(3).await];
    let mut messages = vec![payment_captured(&topics.payments, "once", &orders[0])];
    messages.extend((0..2).map(|_| payment_captured(&topics.payments, "twice", &orders[1])));
    messages.extend((0..50).map(|_| payment_captured(&topics.payments, "fifty", &orders[2])));
    produce(messages).await;
    let stop = consume(
        inbox(&pipeline, pipeline.store.clone(), &topics, Duration::from_secs(3600)),
        pipeline.metrics.clone(),
    );
    eventually(Duration::from_secs(30), "53 deliveries handled", || async {
        count(&pipeline, &topics.payments, "applied") + count(&pipeline, &topics.payments, "duplicate") == 53
    })
    .await;
    stop.cancel();
    assert_eq!(count(&pipeline, &topics.payments, "applied"), 3);
    assert_eq!(
        count(&pipeline, &topics.payments, "duplicate"),
        50,
        "duplicates are acknowledged and counted"
    );
    for order in &orders {
        let stored = pipeline.store.get_order(order.id).await.expect("get").expect("order");
        assert_eq!((stored.status, stored.version), (OrderStatus::Paid, 2), "paid exactly once");
    }
    let mut paid = order_paid_keys(&pipeline).await;
    paid.sort();
    let mut expected: Vec<String> = orders.iter().map(|o| o.id.to_string()).collect();
    expected.sort();
    assert_eq!(paid, expected, "one OrderPaid per order");
}

#[tokio::test]
async fn a_crash_after_commit_before_the_offset_commit_is_a_counted_duplicate() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let order = pipeline.create(1).await;
    let inbox = inbox(&pipeline, pipeline.store.clone(), &topics, Duration::from_secs(3600));
    let message = payment_captured(&topics.payments, "crash", &order);
    // The previous consumer applied it and died before storing the offset…
    let inbound = inbound(&message, 0);
    assert_eq!(inbox.handle(&inbound).await.expect("handled"), Outcome::Applied);
    // …so the broker redelivers it to the group.
    produce(vec![message]).await;
    let stop = consume(inbox, pipeline.metrics.clone());
    eventually(Duration::from_secs(30), "the redelivery", || async {
        count(&pipeline, &topics.payments, "duplicate") == 1
    })
    .await;
    stop.cancel();
    assert_eq!(count(&pipeline, &topics.payments, "applied"), 0);
    assert_eq!(pipeline.store.get_order(order.id).await.expect("get").expect("order").version, 2);
    assert_eq!(order_paid_keys(&pipeline).await, [order.id.to_string()]);
}

#[tokio::test]
async fn out_of_order_customer_versions_leave_the_newest() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let update = |version: i64| {
        let data = json!({"customerId": "cust-1", "displayName": format!("Ada v{version}"), "tier": "CUSTOMER_TIER_GOLD", "version": version.to_string()});
        event(
            &topics.customers,
            "customers.events.v1.CustomerUpdated",
            &format!("cu-{version}"),
            "cust-1",
            data,
        )
    };
    produce(vec![update(3), update(1), update(2)]).await;
    let stop = consume(
        inbox(&pipeline, pipeline.store.clone(), &topics, Duration::from_secs(3600)),
        pipeline.metrics.clone(),
    );
    eventually(Duration::from_secs(30), "three updates handled", || async {
        count(&pipeline, &topics.customers, "applied") + count(&pipeline, &topics.customers, "stale") == 3
    })
    .await;
    stop.cancel();
    assert_eq!(count(&pipeline, &topics.customers, "stale"), 2);
    assert_eq!(
        pipeline.store.customer_display_name("cust-1").await.expect("read").as_deref(),
        Some("Ada v3")
    );
    let order = pipeline.create(1).await; // placed by cust-1
    let (_, name) = pipeline.orders.get(order.id).await.expect("get");
    assert_eq!(name.as_deref(), Some("Ada v3"), "GetOrder shows the projected display name");
}

#[tokio::test]
async fn poison_goes_to_the_dlq_with_its_provenance_and_the_stream_goes_on() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let order = pipeline.create(1).await;
    let key = order.id.to_string();
    let mut garbage =
        event(&topics.payments, "payments.events.v1.PaymentCaptured", "bad-json", &key, json!(null));
    garbage.payload = b"{not json".to_vec();
    let unknown = event(&topics.payments, "payments.events.v9.Refund", "bad-type", &key, json!({}));
    let invalid = event(
        &topics.payments,
        "payments.events.v1.PaymentCaptured",
        "bad-id",
        &key,
        json!({"paymentId": "p", "orderId": "not-a-uuid", "amountMinor": "1", "currency": "EUR"}),
    );
    // Same key, so all four land on one partition, in this order.
    produce(vec![garbage, unknown, invalid, payment_captured(&topics.payments, "good", &order)]).await;
    let stop = consume(
        inbox(&pipeline, pipeline.store.clone(), &topics, Duration::from_secs(3600)),
        pipeline.metrics.clone(),
    );
    eventually(Duration::from_secs(30), "the good message after the poison", || async {
        count(&pipeline, &topics.payments, "applied") == 1
    })
    .await;
    stop.cancel();
    assert_eq!(count(&pipeline, &topics.payments, "dead_lettered"), 3);
    let dlq =
        kafka::read(&kafka::brokers(), &format!("{}.dlq", topics.payments), 3, Duration::from_secs(15)).await;
    assert_eq!(dlq.len(), 3);
    for record in &dlq {
        assert_eq!(header(record, "dlq_source_topic"), topics.payments);
        assert!(header(record, "dlq_source_partition").parse::<i32>().is_ok());
        assert!(header(record, "dlq_source_offset").parse::<i64>().is_ok());
        assert!(!header(record, "dlq_error").is_empty());
        assert_eq!(record.key, key);
    }
    let errors: Vec<&str> = dlq.iter().map(|r| header(r, "dlq_error")).collect();
    assert!(errors.iter().any(|e| e.contains("undecodable")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("unknown ce_type")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("order_id")), "{errors:?}");
    let rejections = pipeline.store.list_rejections(10).await.expect("rejections");
    assert_eq!(rejections.iter().filter(|r| r.kind == "dead-lettered").count(), 3);
    assert_eq!(
        pipeline.store.get_order(order.id).await.expect("get").expect("order").status,
        OrderStatus::Paid
    );
}

#[tokio::test]
async fn payments_that_do_not_fit_are_rejected_visibly_not_retried() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let order = pipeline.create(1).await;
    let cancelled = pipeline.create(1).await;
    pipeline.orders.cancel(cancelled.id, &Default::default()).await.expect("cancel");
    let mut wrong_amount = payment_captured(&topics.payments, "short", &order);
    wrong_amount.payload = serde_json::to_vec(
        &json!({"paymentId": "p1", "orderId": order.id.to_string(), "amountMinor": "1", "currency": "EUR"}),
    )
    .expect("json");
    let failed = event(
        &topics.payments,
        "payments.events.v1.PaymentFailed",
        "declined",
        &order.id.to_string(),
        json!({"paymentId": "p2", "orderId": order.id.to_string(), "reason": "card declined"}),
    );
    produce(vec![wrong_amount, failed, payment_captured(&topics.payments, "late", &cancelled)]).await;
    let stop = consume(
        inbox(&pipeline, pipeline.store.clone(), &topics, Duration::from_secs(3600)),
        pipeline.metrics.clone(),
    );
    eventually(Duration::from_secs(30), "three messages handled", || async {
        count(&pipeline, &topics.payments, "rejected") + count(&pipeline, &topics.payments, "applied") == 3
    })
    .await;
    stop.cancel();
    assert_eq!(count(&pipeline, &topics.payments, "rejected"), 2);
    let stored = pipeline.store.get_order(order.id).await.expect("get").expect("order");
    assert_eq!(
        (stored.status, stored.payment_failure.as_deref()),
        (OrderStatus::Pending, Some("card declined"))
    );
    let reasons: Vec<String> =
        pipeline.store.list_rejections(10).await.expect("list").into_iter().map(|r| r.reason).collect();
    assert!(reasons.iter().any(|r| r.contains("captured 1 EUR")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("CANCELLED")), "{reasons:?}");
}

#[tokio::test]
async fn a_database_outage_mid_stream_loses_and_duplicates_nothing() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let proxy = ChaosProxy::start(support::host_of(&pipeline.url)).await;
    let proxied = support::settings(&support::with_host(&pipeline.url, proxy.addr), &[]).database;
    let inbox_store = store::connect(&proxied).await.expect("connect").inbox;
    let mut orders = Vec::new();
    for _ in 0..10 {
        orders.push(pipeline.create(1).await);
    }
    let stop =
        consume(inbox(&pipeline, inbox_store, &topics, Duration::from_secs(3600)), pipeline.metrics.clone());
    produce(
        orders[..5]
            .iter()
            .enumerate()
            .map(|(i, o)| payment_captured(&topics.payments, &format!("m{i}"), o))
            .collect(),
    )
    .await;
    eventually(Duration::from_secs(30), "the first five", || async {
        count(&pipeline, &topics.payments, "applied") == 5
    })
    .await;

    proxy.cut();
    produce(
        orders[5..]
            .iter()
            .enumerate()
            .map(|(i, o)| payment_captured(&topics.payments, &format!("n{i}"), o))
            .collect(),
    )
    .await;
    eventually(Duration::from_secs(30), "the consumer to hit the outage", || async {
        pipeline.metrics.inbox_retries.with_label_values(&[&topics.payments]).get() > 0
    })
    .await;
    assert_eq!(
        count(&pipeline, &topics.payments, "applied"),
        5,
        "nothing applied while the database is away"
    );
    proxy.restore();
    eventually(Duration::from_secs(60), "all ten applied", || async {
        count(&pipeline, &topics.payments, "applied") == 10
    })
    .await;
    stop.cancel();
    for order in &orders {
        assert_eq!(
            pipeline.store.get_order(order.id).await.expect("get").expect("order").status,
            OrderStatus::Paid
        );
    }
    assert_eq!(order_paid_keys(&pipeline).await.len(), 10, "exactly one OrderPaid per order");
}

#[tokio::test]
async fn retention_purges_old_inbox_rows_in_bounded_batches() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let inbox = inbox(&pipeline, pipeline.store.clone(), &topics, Duration::from_millis(1));
    for i in 0..5 {
        let message = event(
            &topics.customers,
            "customers.events.v1.CustomerUpdated",
            &format!("c{i}"),
            "c",
            json!({"customerId": format!("c{i}"), "displayName": "C", "version": "1"}),
        );
        let inbound = inbound(&message, i);
        assert_eq!(inbox.handle(&inbound).await.expect("handled"), Outcome::Applied);
    }
    tokio::time::sleep(Duration::from_millis(5)).await; // older than the 1 ms horizon
    assert_eq!(inbox.purge_once(2).await.expect("purge"), 2);
    assert_eq!(inbox.purge_once(2).await.expect("purge"), 2);
    assert_eq!(inbox.purge_once(2).await.expect("purge"), 1);
    assert_eq!(inbox.purge_once(2).await.expect("purge"), 0);
}

#[tokio::test]
async fn end_to_end_a_captured_payment_pays_the_order_and_publishes_order_paid() {
    let topics = Topics::create().await;
    let (brokers, orders_topic) = (kafka::brokers(), kafka::fresh_topic().await);
    let app = support::TestApp::spawn_configured(&[
        ("APP_KAFKA__BROKERS", &brokers),
        ("APP_KAFKA__MESSAGE_TIMEOUT_MS", "2000"),
        ("APP_OUTBOX__LEASE_TTL_MS", "10000"),
        ("APP_EVENTS__TOPIC", &orders_topic),
        ("APP_KAFKA__GROUP_ID", &topics.group),
        ("APP_INBOX__PAYMENTS_TOPIC", &topics.payments),
        ("APP_INBOX__CUSTOMERS_TOPIC", &topics.customers),
    ])
    .await;
    let created = app.create_ok().await;
    let id = created["id"].as_str().expect("id").to_owned();
    let data = json!({"paymentId": "pay-e2e", "orderId": id, "amountMinor": created["total_minor"].to_string(), "currency": "EUR"});
    produce(vec![event(&topics.payments, "payments.events.v1.PaymentCaptured", "e2e-1", &id, data)]).await;
    eventually(Duration::from_secs(30), "the order to be PAID", || async {
        let order: serde_json::Value = app.get(&format!("/v1/orders/{id}")).await.json().await.expect("json");
        order["status"] == "PAID" && order["payment_id"] == "pay-e2e"
    })
    .await;
    let records = kafka::read(&brokers, &orders_topic, 2, Duration::from_secs(15)).await;
    let types: Vec<&str> = records.iter().map(|r| header(r, "ce_type")).collect();
    assert_eq!(types, ["orders.events.v1.OrderCreated", "orders.events.v1.OrderPaid"]);
    assert_ne!(header(&records[0], "ce_id"), header(&records[1], "ce_id"), "OrderPaid has a fresh ce_id");
    assert_ne!(header(&records[1], "ce_id"), "e2e-1", "not the payment's id");
    let paid: serde_json::Value = serde_json::from_slice(&records[1].payload).expect("json");
    assert_eq!(paid["paymentId"], "pay-e2e");
    eventually(Duration::from_secs(15), "consumer lag from librdkafka statistics", || async {
        let metrics = app.metrics().await;
        metrics.lines().any(|l| {
            l.starts_with("inbox_consumer_lag{") && l.contains(&topics.payments) && l.ends_with(" 0")
        })
    })
    .await;
}

#[tokio::test]
async fn embedded_mode_consumes_injected_events_from_the_bus() {
    let app = support::TestApp::spawn_with(Backend::Sqlite, false).await;
    let created = app.create_ok().await;
    let id = created["id"].as_str().expect("id").to_owned();
    let inject = |topic: &str, body: serde_json::Value| {
        app.client.post(format!("{}/admin/bus/{topic}", app.admin)).json(&body).send()
    };
    let customer = json!({"type": "customers.events.v1.CustomerUpdated", "id": "cu-1", "key": "cust-1",
        "data": {"customerId": "cust-1", "displayName": "Grace", "tier": "CUSTOMER_TIER_PLATINUM", "version": "1"}});
    assert_eq!(inject("customers.events", customer.clone()).await.expect("inject").status(), 202);
    assert_eq!(inject("customers.events", customer).await.expect("inject").status(), 202, "same id again");
    let payment = json!({"type": "payments.events.v1.PaymentCaptured", "key": id,
        "data": {"paymentId": "pay-1", "orderId": id, "amountMinor": created["total_minor"].to_string(), "currency": "EUR"}});
    assert_eq!(inject("payments.events", payment).await.expect("inject").status(), 202);
    eventually(Duration::from_secs(10), "the order to be PAID with the customer's name", || async {
        let order: serde_json::Value = app.get(&format!("/v1/orders/{id}")).await.json().await.expect("json");
        order["status"] == "PAID" && order["customer_display_name"] == "Grace"
    })
    .await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"inbox_messages_total{result="duplicate",topic="customers.events"} 1"#),
        "{metrics}"
    );
    eventually(Duration::from_secs(10), "OrderPaid on the bus", || async {
        let published = app.admin_json("/admin/bus/orders.events").await;
        published
            .as_array()
            .expect("records")
            .iter()
            .any(|r| r["headers"]["ce_type"] == "orders.events.v1.OrderPaid")
    })
    .await;
}

#[tokio::test]
async fn a_graceful_stop_commits_offsets_so_a_successor_does_not_redeliver() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let mut orders = Vec::new();
    for _ in 0..4 {
        orders.push(pipeline.create(1).await);
    }
    produce(
        orders[..3]
            .iter()
            .enumerate()
            .map(|(i, o)| payment_captured(&topics.payments, &format!("g{i}"), o))
            .collect(),
    )
    .await;
    let inbox = inbox(&pipeline, pipeline.store.clone(), &topics, Duration::from_secs(3600));
    let (stop, runner) = consume_joinable(inbox.clone(), pipeline.metrics.clone());
    eventually(Duration::from_secs(30), "three applied", || async {
        count(&pipeline, &topics.payments, "applied") == 3
    })
    .await;
    stop.cancel();
    runner.await.expect("the runner stops cleanly");

    // A successor in the same group starts after the committed offsets.
    let (stop, runner) = consume_joinable(inbox, pipeline.metrics.clone());
    produce(vec![payment_captured(&topics.payments, "g3", &orders[3])]).await;
    eventually(Duration::from_secs(30), "the fourth applied", || async {
        count(&pipeline, &topics.payments, "applied") == 4
    })
    .await;
    stop.cancel();
    runner.await.expect("stops");
    assert_eq!(count(&pipeline, &topics.payments, "duplicate"), 0, "nothing was redelivered");
}

/// Tolerant reader: a producer may add fields (buf allows it), so an event carrying fields
/// this service does not know is applied, not dead-lettered.
#[tokio::test]
async fn events_with_fields_a_newer_producer_added_are_applied() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let order = pipeline.create(1).await;
    let data = json!({"paymentId": "pay-new", "orderId": order.id.to_string(), "amountMinor": order.total_minor.to_string(),
                      "currency": order.currency.as_str(), "capturedAt": "2026-12-02T09:00:00Z", "method": {"card": "visa"}});
    let customer = json!({"customerId": "cust-1", "displayName": "Ada", "tier": "CUSTOMER_TIER_GOLD", "version": "1",
                          "email": "ada@example.com"});
    produce(vec![
        event(&topics.payments, "payments.events.v1.PaymentCaptured", "new-1", &order.id.to_string(), data),
        event(&topics.customers, "customers.events.v1.CustomerUpdated", "new-2", "cust-1", customer),
    ])
    .await;
    let stop = consume(
        inbox(&pipeline, pipeline.store.clone(), &topics, Duration::from_secs(3600)),
        pipeline.metrics.clone(),
    );
    eventually(Duration::from_secs(30), "both events handled", || async {
        let handled = |topic: &str| {
            ["applied", "dead_lettered"].iter().map(|r| count(&pipeline, topic, r)).sum::<u64>()
        };
        handled(&topics.payments) + handled(&topics.customers) == 2
    })
    .await;
    stop.cancel();
    assert_eq!(
        count(&pipeline, &topics.payments, "dead_lettered")
            + count(&pipeline, &topics.customers, "dead_lettered"),
        0
    );
    let stored = pipeline.store.get_order(order.id).await.expect("get").expect("order");
    assert_eq!(stored.status, OrderStatus::Paid);
    assert_eq!(pipeline.store.customer_display_name("cust-1").await.expect("read").as_deref(), Some("Ada"));
}
