//! Outbox and relay against the real components: PostgreSQL with the Kafka broker, and
//! SQLite with the in-process bus. Relays are driven pass by pass with `relay_once`.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orders_service::{
    backoff::Backoff,
    domain::{LineItemDraft, NewOrder, Order, OrderDraft},
    metrics::Metrics,
    orders::Orders,
    outbox::{
        DeadLetter, Lease, Membership, OutboxRecord, OutboxStats, OutboxStore, RelayIdentity, Settle,
        Settled, Settlement, TraceContext, Wakeup,
        relay::{Relay, RelaySettings},
    },
    pb::orders::events::v1::{OrderCancelled, OrderCreated},
    publish::{InMemoryBus, KafkaPublisher, OutboundMessage, PublishError, Publisher},
    store::{Store, StoreError},
};

use crate::{kafka, store_conformance::store_with_url, support::Backend};

pub const PARTITIONS: i32 = 8;
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Where a test's events go, and how to read them back.
pub struct Sink {
    pub publisher: Arc<dyn Publisher>,
    bus: Option<Arc<InMemoryBus>>,
    pub topic: String,
    brokers: String,
}

impl Sink {
    pub async fn kafka() -> Self {
        let topic = kafka::fresh_topic().await;
        Self { publisher: Arc::new(kafka::publisher()), bus: None, topic, brokers: kafka::brokers() }
    }

    pub fn bus(max_message_bytes: usize) -> Self {
        let bus = Arc::new(InMemoryBus::new(max_message_bytes));
        Self { publisher: bus.clone(), bus: Some(bus), topic: "orders.events".into(), brokers: String::new() }
    }

    /// The same destination through a publisher with a smaller size limit.
    fn with_limit(&self, max_message_bytes: usize) -> Arc<dyn Publisher> {
        match &self.bus {
            Some(bus) => Arc::new(SizeLimit { inner: bus.clone(), max_message_bytes }),
            None => {
                let mut settings = kafka::settings(&self.brokers);
                settings.message_max_bytes = max_message_bytes;
                Arc::new(KafkaPublisher::new(&settings).expect("producer"))
            }
        }
    }

    pub async fn read(&self, expected: usize) -> Vec<kafka::Record> {
        match &self.bus {
            Some(bus) => bus
                .records(&self.topic)
                .into_iter()
                .map(|r| kafka::Record {
                    key: r.key,
                    headers: r.headers.into_iter().collect(),
                    payload: r.payload,
                    partition: 0,
                    offset: r.offset as i64,
                })
                .collect(),
            None => kafka::read(&self.brokers, &self.topic, expected, Duration::from_secs(15)).await,
        }
    }
}

/// The in-process bus with a lower size limit (the bus checks its own limit the same way).
struct SizeLimit {
    inner: Arc<InMemoryBus>,
    max_message_bytes: usize,
}

#[async_trait]
impl Publisher for SizeLimit {
    async fn publish(&self, messages: Vec<OutboundMessage>) -> Vec<Result<(), PublishError>> {
        let mut results = Vec::new();
        // The publisher contract: after a key's failure, nothing later with that key is sent.
        let mut failed_keys = std::collections::HashSet::new();
        for message in messages {
            if failed_keys.contains(&message.key) {
                results.push(Err(PublishError::Retriable("held back behind its key".into())));
            } else if message.payload.len() > self.max_message_bytes {
                failed_keys.insert(message.key.clone());
                results.push(Err(PublishError::Permanent("message too large".into())));
            } else {
                results.extend(self.inner.publish(vec![message]).await);
            }
        }
        results
    }
    async fn flush(&self, timeout: Duration) {
        self.inner.flush(timeout).await;
    }
}

/// Store, use-cases and the pieces a relay needs, without any server.
pub struct Pipeline {
    pub store: Arc<dyn Store>,
    /// The database URL (a SQLite URL for the embedded backend).
    pub url: String,
    pub orders: Orders,
    pub metrics: Arc<Metrics>,
    wakeup: Arc<Wakeup>,
    _dir: Option<tempfile::TempDir>,
}

impl Pipeline {
    pub async fn new(backend: Backend) -> Self {
        let (store, dir, url) = store_with_url(backend).await;
        let wakeup = Wakeup::new(None);
        let orders = Orders::new(store.clone(), wakeup.clone(), PARTITIONS);
        Self { store, url, orders, metrics: Metrics::new().expect("metrics"), wakeup, _dir: dir }
    }

    /// The wake-up handle shared by the use-cases and relays of this pipeline.
    pub fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }

    pub fn relay(
        &self,
        owner: &str,
        store: Arc<dyn OutboxStore>,
        publisher: Arc<dyn Publisher>,
        topic: &str,
        lease_ttl: Duration,
    ) -> Arc<Relay> {
        self.relay_with(owner, store, publisher, relay_settings(topic, lease_ttl))
    }

    /// A relay with its own settings (see [`relay_settings`] for the test defaults) and
    /// its own wake-up handle.
    pub fn relay_with(
        &self,
        owner: &str,
        store: Arc<dyn OutboxStore>,
        publisher: Arc<dyn Publisher>,
        settings: RelaySettings,
    ) -> Arc<Relay> {
        Relay::new(owner.to_owned(), store, publisher, self.wakeup.clone(), self.metrics.clone(), settings)
    }

    /// A relay on the real store publishing to `sink`.
    pub fn relay_to(&self, owner: &str, sink: &Sink) -> Arc<Relay> {
        self.relay(owner, self.store.clone(), sink.publisher.clone(), &sink.topic, Duration::from_secs(10))
    }

    pub async fn create(&self, items: usize) -> Order {
        new_order(&self.orders, items).await
    }

    pub async fn pending(&self) -> i64 {
        self.store.stats().await.expect("stats").pending
    }

    /// Runs passes until the outbox is empty (bounded by 60 s).
    pub async fn drain(&self, relay: &Arc<Relay>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.pending().await > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "outbox did not drain: {} rows left",
                self.pending().await
            );
            relay.relay_once().await.expect("pass");
            if self.pending().await > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await; // let retry backoff elapse
            }
        }
    }
}

/// Test relay settings: a 60 s poll (so only wake-ups and `relay_once` drive it), quick
/// retries.
pub fn relay_settings(topic: &str, lease_ttl: Duration) -> RelaySettings {
    RelaySettings {
        partitions: PARTITIONS,
        batch_size: 100,
        in_flight_batches: 4,
        poll_interval: Duration::from_secs(60),
        lease_ttl,
        publish_timeout: lease_ttl / 3,
        backoff: Backoff::new(Duration::from_millis(50), Duration::from_millis(200)).expect("backoff"),
        topic: topic.to_owned(),
        source: "/orders-service/test".into(),
    }
}

/// Creates a valid order with `items` lines, carrying a trace context.
async fn new_order(orders: &Orders, items: usize) -> Order {
    let trace = TraceContext::from_headers(Some(TRACEPARENT), Some("vendor=1"));
    orders.create(draft(items), &trace, None).await.expect("create").order
}

/// A valid new order with `items` lines.
pub fn draft(items: usize) -> NewOrder {
    NewOrder::parse(OrderDraft {
        customer_id: "cust-1".into(),
        items: (0..items)
            .map(|i| LineItemDraft { sku: format!("SKU-{i}"), quantity: 1, unit_price_minor: 100 })
            .collect(),
        currency: "EUR".into(),
        note: None,
    })
    .expect("valid")
}

pub fn header<'a>(record: &'a kafka::Record, name: &str) -> &'a str {
    record
        .headers
        .get(name)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("header {name} missing: {record:?}"))
}

async fn events_are_complete_ordered_and_well_formed(backend: Backend, sink: Sink) {
    let pipeline = Pipeline::new(backend).await;
    let creates = (0..30).map(|_| {
        let orders = pipeline.orders.clone();
        async move { new_order(&orders, 2).await }
    });
    let orders: Vec<Order> = futures_join_all(creates).await;
    for order in orders.iter().take(10) {
        pipeline.orders.cancel(order.id, &TraceContext::default()).await.expect("cancel");
    }
    assert_eq!(pipeline.pending().await, 40, "one outbox row per change, committed with it");
    // A partial failure inside the batch: every OrderCreated fails once while the rest of
    // the batch goes through. The cancels must still never overtake their creates.
    let flaky = Arc::new(FailFirstAttempt::new(sink.publisher.clone(), "orders.events.v1.OrderCreated"));
    let relay = pipeline.relay(
        "relay-a",
        pipeline.store.clone(),
        flaky.clone(),
        &sink.topic,
        Duration::from_secs(10),
    );
    pipeline.drain(&relay).await;
    assert_eq!(flaky.failed(), 30, "every create failed once, in a batch that also held successes");

    let records = sink.read(40).await;
    assert_eq!(records.len(), 40, "exactly one event per change");
    let mut ids = std::collections::HashSet::new();
    let mut per_order: HashMap<String, Vec<&str>> = HashMap::new();
    for record in &records {
        assert_eq!(header(record, "ce_specversion"), "1.0");
        assert_eq!(header(record, "ce_source"), "/orders-service/test");
        assert_eq!(header(record, "ce_subject"), record.key);
        assert_eq!(header(record, "content-type"), "application/json");
        assert!(chrono::DateTime::parse_from_rfc3339(header(record, "ce_time")).is_ok());
        assert!(ids.insert(header(record, "ce_id").to_owned()), "ce_id is unique per event");
        let ce_type = header(record, "ce_type");
        match ce_type {
            "orders.events.v1.OrderCreated" => {
                let event: OrderCreated = serde_json::from_slice(&record.payload).expect("OrderCreated JSON");
                assert_eq!(event.order_id, record.key);
                assert_eq!((event.total_minor, event.items.len(), event.version), (200, 2, 1));
                assert_eq!(header(record, "traceparent"), TRACEPARENT);
                assert_eq!(header(record, "tracestate"), "vendor=1");
            }
            "orders.events.v1.OrderCancelled" => {
                let event: OrderCancelled =
                    serde_json::from_slice(&record.payload).expect("OrderCancelled JSON");
                assert_eq!((event.order_id.as_str(), event.version), (record.key.as_str(), 2));
                assert!(!record.headers.contains_key("traceparent"), "no trace context was given");
            }
            other => panic!("unexpected ce_type {other}"),
        }
        per_order.entry(record.key.clone()).or_default().push(ce_type);
    }
    assert_eq!(per_order.len(), 30);
    for order in &orders[..10] {
        let types = &per_order[&order.id.to_string()];
        assert_eq!(
            types,
            &["orders.events.v1.OrderCreated", "orders.events.v1.OrderCancelled"],
            "per-order order kept"
        );
    }
    assert_eq!(pipeline.metrics.outbox_published.get(), 40);
}

/// A publisher that fails (retriably) the first attempt of every message of one
/// `ce_type` and passes everything else through: a partial failure inside a batch.
pub struct FailFirstAttempt {
    inner: Arc<dyn Publisher>,
    ce_type: &'static str,
    failed: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Keep the publisher contract (hold back a failed key's later messages); `false`
    /// delivers them anyway, as a broken publisher would.
    contract: bool,
}

impl FailFirstAttempt {
    pub fn new(inner: Arc<dyn Publisher>, ce_type: &'static str) -> Self {
        Self { inner, ce_type, failed: Default::default(), contract: true }
    }

    /// The same, delivering a failed key's later messages anyway.
    pub fn breaking_order(inner: Arc<dyn Publisher>, ce_type: &'static str) -> Self {
        Self { contract: false, ..Self::new(inner, ce_type) }
    }

    /// How many distinct messages were failed.
    pub fn failed(&self) -> usize {
        self.failed.lock().expect("lock").len()
    }
}

#[async_trait]
impl Publisher for FailFirstAttempt {
    async fn publish(&self, messages: Vec<OutboundMessage>) -> Vec<Result<(), PublishError>> {
        let mut verdicts = Vec::new();
        let mut passed = Vec::new();
        // The publisher contract: after a key's failure, nothing later with that key is sent.
        let mut failed_keys = std::collections::HashSet::new();
        for message in messages {
            let ce = |name: &str| message.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.to_string());
            let first = self.contract && failed_keys.contains(&message.key)
                || ce("ce_type").as_deref() == Some(self.ce_type)
                    && self.failed.lock().expect("lock").insert(ce("ce_id").unwrap_or_default());
            verdicts.push(first);
            if first {
                failed_keys.insert(message.key.clone());
            } else {
                passed.push(message);
            }
        }
        let mut results = self.inner.publish(passed).await.into_iter();
        verdicts
            .into_iter()
            .map(|failed| match failed {
                true => Err(PublishError::Retriable("injected: broker timed out".into())),
                false => results.next().unwrap_or(Err(PublishError::Retriable("missing result".into()))),
            })
            .collect()
    }
    async fn flush(&self, timeout: Duration) {
        self.inner.flush(timeout).await;
    }
}

/// The real outbox store, counting the statements the relay sends it, and able to fail
/// settling (the relay "dies" after the broker acknowledged, before deleting).
pub struct Instrumented {
    inner: Arc<dyn Store>,
    /// Outbox calls made (each is one statement or one short transaction).
    pub calls: AtomicU64,
    /// When set, `settle` fails as if the process died before it.
    pub fail_settle: AtomicBool,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self { inner, calls: AtomicU64::new(0), fail_settle: AtomicBool::new(false) })
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl OutboxStore for Instrumented {
    async fn ensure_partitions(&self, p: i32) -> Result<(), StoreError> {
        self.count();
        self.inner.ensure_partitions(p).await
    }
    async fn acquire_partitions(
        &self,
        r: &RelayIdentity,
        p: i32,
        ttl: Duration,
    ) -> Result<Membership, StoreError> {
        self.count();
        self.inner.acquire_partitions(r, p, ttl).await
    }
    async fn release_partitions(&self, r: &RelayIdentity) -> Result<(), StoreError> {
        self.count();
        self.inner.release_partitions(r).await
    }
    async fn fetch_due(
        &self,
        p: &[i32],
        n: i64,
        now: DateTime<Utc>,
        in_flight: &[&str],
    ) -> Result<Vec<OutboxRecord>, StoreError> {
        self.count();
        self.inner.fetch_due(p, n, now, in_flight).await
    }
    async fn settle(&self, o: &str, l: &[Lease], rows: &[Settlement]) -> Result<Settled, StoreError> {
        self.count();
        if self.fail_settle.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(anyhow::anyhow!("relay crashed before deleting")));
        }
        self.inner.settle(o, l, rows).await
    }
    async fn list_dead_letters(&self, l: i64) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.list_dead_letters(l).await
    }
    async fn replay_dead_letter(&self, s: i64) -> Result<Option<i32>, StoreError> {
        self.inner.replay_dead_letter(s).await
    }
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        self.count();
        self.inner.stats().await
    }
    async fn repartition(&self, p: i32) -> Result<u64, StoreError> {
        self.inner.repartition(p).await
    }
}

async fn a_relay_that_dies_before_deleting_is_followed_by_a_republish(backend: Backend, sink: Sink) {
    let pipeline = Pipeline::new(backend).await;
    let order = pipeline.create(1).await;
    let store = Instrumented::new(pipeline.store.clone());
    store.fail_settle.store(true, Ordering::Relaxed);
    let ttl = Duration::from_millis(1500);
    let doomed = pipeline.relay("relay-doomed", store, sink.publisher.clone(), &sink.topic, ttl);
    assert!(doomed.relay_once().await.is_err(), "published, then failed to delete");
    assert_eq!(pipeline.pending().await, 1, "nothing lost: the row is still there");
    // Its successor takes the partitions over once the dead relay's leases expire, and
    // publishes the event again.
    let successor =
        pipeline.relay("relay-successor", pipeline.store.clone(), sink.publisher.clone(), &sink.topic, ttl);
    pipeline.drain(&successor).await;
    let records = sink.read(2).await;
    assert_eq!(records.len(), 2, "at-least-once: the event arrives twice");
    assert_eq!(
        header(&records[0], "ce_id"),
        header(&records[1], "ce_id"),
        "the duplicate carries the same ce_id"
    );
    assert!(records.iter().all(|r| r.key == order.id.to_string()));
}

async fn a_poison_event_is_dead_lettered_others_flow_and_replay_publishes_it(backend: Backend, sink: Sink) {
    let pipeline = Pipeline::new(backend).await;
    let big = pipeline.create(100).await; // ~5 KB of JSON
    pipeline.orders.cancel(big.id, &TraceContext::default()).await.expect("cancel"); // must wait behind it
    let small = pipeline.create(1).await;
    let strict = pipeline.relay(
        "relay-strict",
        pipeline.store.clone(),
        sink.with_limit(2000),
        &sink.topic,
        Duration::from_secs(10),
    );
    for _ in 0..3 {
        strict.relay_once().await.expect("pass");
    }
    let dead = pipeline.store.list_dead_letters(10).await.expect("list");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].aggregate_id, big.id.to_string());
    assert_eq!(dead[0].event_type, "orders.events.v1.OrderCreated");
    assert!(
        dead[0].error.to_lowercase().contains("too large") || dead[0].error.contains("exceeds"),
        "{}",
        dead[0].error
    );
    assert_eq!(pipeline.pending().await, 1, "the big order's cancel waits behind its dead letter");
    assert_eq!(pipeline.metrics.outbox_publish_errors.with_label_values(&["permanent"]).get(), 1);
    let published = sink.read(1).await;
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].key, small.id.to_string(), "other aggregates keep flowing");

    // The strict relay stops gracefully, handing its partitions over at once.
    strict.release().await;
    assert_eq!(
        pipeline.store.replay_dead_letter(dead[0].seq).await.expect("replay"),
        Some(dead[0].partition())
    );
    assert_eq!(pipeline.store.replay_dead_letter(dead[0].seq).await.expect("replay"), None, "replayed once");
    let relaxed = pipeline.relay_to("relay-relaxed", &sink);
    pipeline.drain(&relaxed).await;
    let records = sink.read(3).await;
    let big_events: Vec<&str> =
        records.iter().filter(|r| r.key == big.id.to_string()).map(|r| header(r, "ce_type")).collect();
    assert_eq!(
        big_events,
        ["orders.events.v1.OrderCreated", "orders.events.v1.OrderCancelled"],
        "replay kept the order"
    );
    assert!(pipeline.store.list_dead_letters(10).await.expect("list").is_empty());
}

/// Partition of a dead letter, recomputed the way the outbox assigns it.
trait PartitionOf {
    fn partition(&self) -> i32;
}
impl PartitionOf for DeadLetter {
    fn partition(&self) -> i32 {
        orders_service::outbox::partition_of(&self.aggregate_id, PARTITIONS)
    }
}

/// Awaits every future concurrently (a tiny join_all without the futures crate).
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.expect("task"));
    }
    outputs
}

#[tokio::test]
async fn broker_down_writes_succeed_the_backlog_grows_and_drains_without_loss() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let port = kafka::free_port();
    let mut settings = kafka::settings(&format!("127.0.0.1:{port}"));
    // Reconnect quickly once the broker is back (the default backs off up to 10 s).
    settings.properties = vec![("reconnect.backoff.max.ms".into(), "500".into())];
    let publisher = Arc::new(KafkaPublisher::new(&settings).expect("producer"));
    let topic = "orders.events.outage";
    let relay =
        pipeline.relay("relay-outage", pipeline.store.clone(), publisher, topic, Duration::from_secs(10));

    let mut ids = std::collections::HashSet::new();
    for _ in 0..5 {
        ids.insert(pipeline.create(1).await.id.to_string()); // writes never wait for Kafka
    }
    let report = relay.relay_once().await.expect("pass");
    assert_eq!((report.published, report.retried), (0, 5), "broker unreachable: every row is retried later");
    assert_eq!(pipeline.metrics.outbox_pending.get(), 5);
    assert_eq!(pipeline.metrics.outbox_publish_errors.with_label_values(&["retriable"]).get(), 5);
    for _ in 0..3 {
        ids.insert(pipeline.create(1).await.id.to_string());
    }
    assert_eq!(pipeline.pending().await, 8, "the outbox buffers the outage");

    let broker = kafka::PrivateBroker::start(port).await;
    kafka::settings(&broker.addr).create_topics(&[topic], &kafka::layout()).await.expect("topic");
    pipeline.drain(&relay).await;
    let records = kafka::read(&broker.addr, topic, 8, Duration::from_secs(15)).await;
    let keys: std::collections::HashSet<String> = records.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys, ids, "every order's event arrived after the outage");
    // A pass refreshes the backlog gauges at most once a second (they cost a query).
    crate::support::eventually(Duration::from_secs(5), "the pending gauge to reach 0", || async {
        relay.relay_once().await.expect("pass");
        pipeline.metrics.outbox_pending.get() == 0
    })
    .await;
}

/// The run loop keeps several batches with the broker at once (small batches, a window of
/// four): a backlog arrives exactly once, and no order's cancel overtakes its create. A
/// fetch that did not skip the rows in flight would publish them twice.
async fn a_pipelined_relay_publishes_a_backlog_once_and_in_order(backend: Backend, sink: Sink) {
    let pipeline = Pipeline::new(backend).await;
    let mut orders = Vec::new();
    for i in 0..200 {
        let order = pipeline.create(1).await;
        if i % 4 == 0 {
            pipeline.orders.cancel(order.id, &TraceContext::default()).await.expect("cancel");
        }
        orders.push(order);
    }
    let mut settings = relay_settings(&sink.topic, Duration::from_secs(10));
    (settings.batch_size, settings.in_flight_batches) = (5, 4);
    let relay =
        pipeline.relay_with("relay-pipelined", pipeline.store.clone(), sink.publisher.clone(), settings);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(relay.clone().run(stop.clone()));
    crate::support::eventually(Duration::from_secs(60), "the backlog to drain", || async {
        pipeline.pending().await == 0
    })
    .await;
    stop.cancel();
    running.await.expect("relay stops");

    assert_eq!(pipeline.metrics.outbox_published.get(), 250, "every event published exactly once");
    let records = sink.read(250).await;
    let ids: std::collections::HashSet<&str> = records.iter().map(|r| header(r, "ce_id")).collect();
    assert_eq!((records.len(), ids.len()), (250, 250), "no event twice on the wire");
    let mut per_order: HashMap<&str, Vec<&str>> = HashMap::new();
    for record in &records {
        per_order.entry(record.key.as_str()).or_default().push(header(record, "ce_type"));
    }
    for (i, order) in orders.iter().enumerate() {
        let want: &[&str] = if i % 4 == 0 {
            &["orders.events.v1.OrderCreated", "orders.events.v1.OrderCancelled"]
        } else {
            &["orders.events.v1.OrderCreated"]
        };
        assert_eq!(per_order[order.id.to_string().as_str()], want, "order {i}");
    }
}

/// A caught-up relay does not wait for a batch's settle, only for its acknowledgement: while
/// the settle of one event is blocked (its row locked by another transaction), an event
/// committed meanwhile still goes out, and once the lock is gone each went out once. A relay
/// that waited for the settle would hold the second event until the lock is released.
#[tokio::test]
async fn a_caught_up_relay_publishes_the_next_commit_while_the_last_batch_settles() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let sink = Sink::bus(1 << 20);
    let relay = pipeline.relay_to("relay-settle-behind", &sink);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(relay.clone().run(stop.clone()));
    let on_the_bus = |n: usize| {
        let sink = &sink;
        move || async move { sink.read(n).await.len() >= n }
    };
    // One acknowledged pass opens the window beyond one batch (slow start).
    pipeline.create(1).await;
    crate::support::eventually(Duration::from_secs(10), "the first event", on_the_bus(1)).await;

    // The second order is committed without waking the relay, so its row is locked before
    // the relay sees it; then the relay is woken.
    let quiet = Orders::new(pipeline.store.clone(), Wakeup::new(None), PARTITIONS);
    let settling = new_order(&quiet, 1).await;
    let pool = sqlx::PgPool::connect(&pipeline.url).await.expect("connect");
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM outbox WHERE aggregate_id = $1 FOR UPDATE")
        .bind(settling.id.to_string())
        .fetch_one(&mut *lock)
        .await
        .expect("lock the row");
    pipeline.wakeup().wake_local();
    crate::support::eventually(Duration::from_secs(10), "the second event", on_the_bus(2)).await;

    let next = pipeline.create(1).await;
    // Shorter than the statement timeout, after which the blocked settle fails and the
    // relay goes on (publishing the second event again).
    crate::support::eventually(
        Duration::from_secs(2),
        "the third event while the second is still settling",
        on_the_bus(3),
    )
    .await;
    let unsettled: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE aggregate_id = $1")
        .bind(settling.id.to_string())
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(unsettled, 1, "the second event's settle was still blocked");

    lock.rollback().await.expect("release the lock");
    crate::support::eventually(Duration::from_secs(10), "the outbox to drain", || async {
        pipeline.pending().await == 0
    })
    .await;
    stop.cancel();
    running.await.expect("relay stops");
    let keys: Vec<String> = sink.read(3).await.into_iter().map(|r| r.key).collect();
    assert_eq!(keys.len(), 3, "each event once: {keys:?}");
    assert_eq!(keys[1..], [settling.id.to_string(), next.id.to_string()]);
    assert_eq!(pipeline.metrics.outbox_published.get(), 3);
}

/// An order's create and cancel, both pending, go out in one pass, in order, and the pass's
/// stages are timed.
async fn an_aggregates_consecutive_events_go_out_in_one_pass_in_order(backend: Backend, sink: Sink) {
    let pipeline = Pipeline::new(backend).await;
    let order = pipeline.create(1).await;
    pipeline.orders.cancel(order.id, &TraceContext::default()).await.expect("cancel");
    let relay = pipeline.relay_to("relay-runs", &sink);
    assert_eq!(relay.relay_once().await.expect("pass").published, 2, "both events in one pass");
    // One fetch, one batch published, one settle: each stage timed once; each of the two
    // events' wait for that fetch once.
    for (stage, times) in [("queued", 2), ("fetch", 1), ("publish", 1), ("settle", 1)] {
        let timed = pipeline.metrics.outbox_relay_stage.with_label_values(&[stage]).get_sample_count();
        assert_eq!(timed, times, "outbox_relay_stage_seconds{{stage={stage:?}}}");
    }
    // Created before the fetch, moments ago (a reversed difference would record 0).
    let waited = pipeline.metrics.outbox_relay_stage.with_label_values(&["queued"]).get_sample_sum();
    assert!(waited > 0.0 && waited < 60.0, "the two events waited {waited} s in all");
    let types: Vec<String> = sink.read(2).await.iter().map(|r| header(r, "ce_type").to_owned()).collect();
    assert_eq!(types, ["orders.events.v1.OrderCreated", "orders.events.v1.OrderCancelled"]);
}

/// A publisher that delivers a later event of an aggregate after an earlier one failed in
/// the same batch breaks the order; the relay counts it and publishes the later event
/// again after the earlier one, so the last copy a consumer sees is in order.
async fn a_publisher_breaking_the_order_is_counted_and_repaired(backend: Backend, sink: Sink) {
    let pipeline = Pipeline::new(backend).await;
    let order = pipeline.create(1).await;
    pipeline.orders.cancel(order.id, &TraceContext::default()).await.expect("cancel");
    let broken =
        Arc::new(FailFirstAttempt::breaking_order(sink.publisher.clone(), "orders.events.v1.OrderCreated"));
    let relay =
        pipeline.relay("relay-broken", pipeline.store.clone(), broken, &sink.topic, Duration::from_secs(10));
    let report = relay.relay_once().await.expect("pass");
    assert_eq!((report.published, report.retried), (0, 2), "the cancel waits for its create");
    assert_eq!(pipeline.metrics.outbox_order_violations.get(), 1);
    pipeline.drain(&relay).await;
    let types: Vec<String> = sink.read(3).await.iter().map(|r| header(r, "ce_type").to_owned()).collect();
    assert_eq!(
        types,
        [
            "orders.events.v1.OrderCancelled",
            "orders.events.v1.OrderCreated",
            "orders.events.v1.OrderCancelled"
        ],
        "the stray cancel is followed by the create and the cancel again"
    );
}

/// An event in backoff holds back the later events of its aggregate, even fresh ones that
/// are due, and nothing else.
async fn an_event_in_backoff_holds_back_its_aggregate_only(backend: Backend, _sink: Sink) {
    let pipeline = Pipeline::new(backend).await;
    let store = pipeline.store.clone();
    let me = RelayIdentity { owner: "relay-backoff".into(), instance: uuid::Uuid::new_v4() };
    let leases =
        store.acquire_partitions(&me, PARTITIONS, Duration::from_secs(30)).await.expect("leases").leases;
    let all: Vec<i32> = (0..PARTITIONS).collect();
    let (a, b) = (pipeline.create(1).await, pipeline.create(1).await);
    let heads = store.fetch_due(&all, 10, Utc::now(), &[]).await.expect("fetch");
    let seq_of = |id: &str| heads.iter().find(|r| r.aggregate_id == id).expect("fetched").seq;
    let (a1, b1) = (seq_of(&a.id.to_string()), seq_of(&b.id.to_string()));
    let later = Utc::now() + chrono::Duration::hours(1);
    let settle = |seq: i64, outcome: Settle| Settlement {
        seq,
        partition: heads.iter().find(|r| r.seq == seq).expect("row").partition,
        outcome,
    };
    store
        .settle(
            &me.owner,
            &leases,
            &[
                settle(a1, Settle::Retry { error: "down".into(), next_attempt_at: later }),
                settle(b1, Settle::Published),
            ],
        )
        .await
        .expect("settle");
    pipeline.orders.cancel(a.id, &TraceContext::default()).await.expect("cancel"); // fresh and due
    let c = pipeline.create(1).await;
    let due: Vec<String> = store
        .fetch_due(&all, 10, Utc::now(), &[])
        .await
        .expect("fetch")
        .into_iter()
        .map(|r| r.aggregate_id)
        .collect();
    assert_eq!(due, [c.id.to_string()], "A's cancel waits behind its create in backoff; C goes on");
}

/// Instantiates each scenario for PostgreSQL + Kafka and for SQLite + the in-process bus.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod postgres_kafka {
            use super::*;
            $(#[tokio::test] async fn $case() { super::$case(Backend::Postgres, Sink::kafka().await).await })*
        }
        mod sqlite_bus {
            use super::*;
            $(#[tokio::test] async fn $case() { super::$case(Backend::Sqlite, Sink::bus(1_000_000)).await })*
        }
    };
}

on_both_backends!(
    events_are_complete_ordered_and_well_formed,
    a_relay_that_dies_before_deleting_is_followed_by_a_republish,
    a_poison_event_is_dead_lettered_others_flow_and_replay_publishes_it,
    a_pipelined_relay_publishes_a_backlog_once_and_in_order,
    an_aggregates_consecutive_events_go_out_in_one_pass_in_order,
    a_publisher_breaking_the_order_is_counted_and_repaired,
    an_event_in_backoff_holds_back_its_aggregate_only,
);

#[tokio::test]
async fn embedded_mode_publishes_to_the_bus_and_operators_manage_dead_letters() {
    use crate::support::{TestApp, eventually, problem, valid_order};
    let app =
        TestApp::spawn_with_settings(Backend::Sqlite, &[("APP_KAFKA__MESSAGE_MAX_BYTES", "1000")]).await;
    let small = app.create_ok().await["id"].as_str().expect("id").to_owned();
    let mut big = valid_order();
    big["items"] = serde_json::json!(
        (0..40)
            .map(|i| serde_json::json!({"sku": format!("SKU-{i}"), "quantity": 1, "unit_price_minor": 1}))
            .collect::<Vec<_>>()
    );
    let big = app.create(&big).await.json::<serde_json::Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();

    let admin = |path: &str| format!("{}{path}", app.admin);
    eventually(Duration::from_secs(10), "the big event to be dead-lettered", || async {
        let dead = app.admin_json("/admin/outbox/dead-letters").await;
        dead.as_array().is_some_and(|d| d.len() == 1 && d[0]["aggregate_id"] == big)
    })
    .await;
    let bus = app.admin_json("/admin/bus/orders.events").await;
    let keys: Vec<&str> = bus.as_array().expect("records").iter().filter_map(|r| r["key"].as_str()).collect();
    assert_eq!(keys, [small.as_str()], "the small order's event went through the in-process bus");
    assert_eq!(bus[0]["value"]["orderId"], small.as_str(), "proto3 JSON uses lowerCamelCase names");

    let dead = app.admin_json("/admin/outbox/dead-letters").await;
    let seq = dead[0]["seq"].as_i64().expect("seq");
    let replay = app
        .client
        .post(admin(&format!("/admin/outbox/dead-letters/{seq}/replay")))
        .send()
        .await
        .expect("replay");
    assert_eq!(replay.status(), 200);
    problem(
        app.client.post(admin("/admin/outbox/dead-letters/999999/replay")).send().await.expect("replay"),
        404,
        "not-found",
    )
    .await;
    let metrics = app.metrics().await;
    assert!(metrics.contains("outbox_publish_errors_total{kind=\"permanent\"}"), "{metrics}");
}

#[tokio::test]
async fn a_stopping_relay_releases_its_leases() {
    use crate::support::{TestApp, eventually};
    let app = TestApp::spawn().await;
    let url = app.database_url.clone();
    eventually(Duration::from_secs(10), "the relay to lease every partition", || async {
        app.metrics().await.contains("\noutbox_partitions_owned 16\n")
    })
    .await;
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let owned = || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_lease WHERE owner IS NOT NULL")
            .fetch_one(&pool)
    };
    assert_eq!(owned().await.expect("count"), 16);
    app.shutdown.cancel();
    eventually(Duration::from_secs(10), "leases to be released", || async {
        owned().await.expect("count") == 0
    })
    .await;
}

/// Rows a plan read from the outbox (only where it is aliased `alias`, if given): actual
/// rows, kept or filtered out, × loops of every node on it, through the whole tree.
fn rows_read(plan: &serde_json::Value, alias: Option<&str>) -> f64 {
    let own = if plan["Relation Name"] == "outbox" && alias.is_none_or(|a| plan["Alias"] == a) {
        let rows = plan["Actual Rows"].as_f64().unwrap_or(0.0)
            + plan["Rows Removed by Filter"].as_f64().unwrap_or(0.0);
        rows * plan["Actual Loops"].as_f64().unwrap_or(0.0)
    } else {
        0.0
    };
    own + plan["Plans"].as_array().map_or(0.0, |children| children.iter().map(|c| rows_read(c, alias)).sum())
}

#[tokio::test]
async fn the_relay_fetch_reads_only_the_heads_it_returns_even_with_stale_statistics() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let pool = sqlx::PgPool::connect(&pipeline.url).await.expect("connect");
    // The statistics of an empty outbox, then a backlog faster than autovacuum re-analyzes.
    for statement in [
        "ALTER TABLE outbox SET (autovacuum_enabled = false)",
        "ANALYZE outbox",
        "INSERT INTO outbox (message_id, partition, aggregate_type, aggregate_id, event_type, payload)
         SELECT gen_random_uuid(), (n % 5000) % 16, 'order', 'order-' || (n % 5000), 'x', '\\x00'::bytea
           FROM generate_series(1, 50000) AS n",
    ] {
        sqlx::query(statement).execute(&pool).await.expect(statement);
    }
    let (partitions, per_partition): (Vec<i32>, i64) = ((0..16).collect(), 100);
    let fetched = pipeline.store.fetch_due(&partitions, per_partition, Utc::now(), &[]).await.expect("fetch");
    assert_eq!(fetched.len(), 1600, "the first 100 heads of each of 16 partitions");
    // The next pass, with those 1,600 aggregates still in flight, gets the next 1,600 heads.
    let in_flight: Vec<&str> = fetched.iter().map(|r| r.aggregate_id.as_str()).collect();
    let next =
        pipeline.store.fetch_due(&partitions, per_partition, Utc::now(), &in_flight).await.expect("next");
    assert_eq!(next.len(), 1600, "the next 100 heads of each partition");
    assert!(
        next.iter().all(|r| !in_flight.contains(&r.aggregate_id.as_str())),
        "an aggregate in flight was fetched again"
    );

    // The same transaction and statement, explained, for both passes.
    for (pass, skipped) in [("first", Vec::new()), ("next", in_flight)] {
        let mut tx = pool.begin_with(orders_service::store::FETCH_DUE_BEGIN).await.expect("begin");
        let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", orders_service::store::fetch_due_sql());
        let plan: serde_json::Value = sqlx::query_scalar(&explain)
            .bind(&partitions)
            .bind(per_partition)
            .bind(Utc::now())
            .bind(&skipped)
            .fetch_one(&mut *tx)
            .await
            .expect("explain");
        let read = rows_read(&plan[0]["Plan"], Some("o"));
        eprintln!(
            "{pass} fetch of 1,600 heads from 50,000 rows ({} in flight) read {read} rows",
            skipped.len()
        );
        // In flight or not, a partition is read from its oldest row: 1,600 rows per pass in flight at most.
        let bound = 2.0 * (1600 + skipped.len()) as f64;
        assert!(read <= bound, "{pass}: read {read} rows for 1,600 heads: {plan:#}");
    }
}

/// Every relay refreshes the backlog gauges every second, and the outbox is largest when
/// the broker is down: the statement reads at most the exact-count cap, whatever the
/// backlog, and still reports it (exactly below the cap, by the span of seqs above).
#[tokio::test]
async fn the_backlog_gauges_never_scan_a_large_outbox() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let pool = sqlx::PgPool::connect(&pipeline.url).await.expect("connect");
    let insert = |n: i64| {
        format!(
            "INSERT INTO outbox (message_id, partition, aggregate_type, aggregate_id, event_type, payload, created_at)
             SELECT gen_random_uuid(), n % 16, 'order', 'order-' || n, 'x', '\\x00'::bytea, now() - interval '1 minute'
               FROM generate_series(1, {n}) AS n"
        )
    };
    sqlx::query(&insert(500)).execute(&pool).await.expect("insert");
    let small = pipeline.store.stats().await.expect("stats");
    assert_eq!(small.pending, 500, "exact below the cap");
    assert!(small.oldest_age_seconds >= 59.0, "the oldest row's age: {}", small.oldest_age_seconds);
    sqlx::query(&insert(49_500)).execute(&pool).await.expect("insert");
    assert_eq!(
        pipeline.store.stats().await.expect("stats").pending,
        50_000,
        "the span of pending seqs above it"
    );

    let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", orders_service::store::OUTBOX_STATS);
    let plan: serde_json::Value = sqlx::query_scalar(&explain)
        .bind(orders_service::store::PENDING_EXACT_UP_TO + 1)
        .fetch_one(&pool)
        .await
        .expect("explain");
    let read = rows_read(&plan[0]["Plan"], None);
    eprintln!("backlog gauges at 50,000 pending rows read {read} rows");
    assert!(read <= (orders_service::store::PENDING_EXACT_UP_TO + 100) as f64, "read {read} rows: {plan:#}");
}
