//! The inbox under the faults production has: control characters and data PostgreSQL
//! rejects, a message that keeps aborting, a dead-letter producer in librdkafka's fatal
//! state, one partition stuck behind a row lock while the others must flow (and revoked and
//! reassigned while paused), a second consumer joining the group mid-stream, and a member
//! killed without leaving the group.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use orders_service::{
    domain::{Order, OrderStatus},
    inbox::{InboxSettings, kafka::KafkaInbox},
    metrics::Metrics,
    publish::{KafkaPublisher, OutboundMessage, Publisher},
    store::{self, Store, StoreError},
};
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
    message::{Header, OwnedHeaders},
    mocking::MockCluster,
    producer::{FutureProducer, FutureRecord},
    types::{RDKafkaApiKey, RDKafkaRespErr},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    inbox::{
        Topics, consume, count, event, inbound, inbox, inbox_counted_by, inbox_dead_lettering_to, inbox_with,
        payment_captured,
    },
    kafka,
    outbox::Pipeline,
    support::{self, Backend, eventually},
};

/// Produces `messages` to one partition of their topic, in order.
async fn produce_to(partition: i32, messages: Vec<OutboundMessage>) {
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", kafka::brokers()).create().expect("producer");
    for m in &messages {
        let headers = m
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: Some(v.as_bytes()) }));
        let record = FutureRecord::to(&m.topic)
            .partition(partition)
            .key(m.key.as_bytes())
            .payload(&m.payload)
            .headers(headers);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("produced");
    }
}

async fn status(store: &Arc<dyn Store>, order: &Order) -> OrderStatus {
    store.get_order(order.id).await.expect("get").expect("order").status
}

/// A store whose statements time out after `ms` (a row lock then aborts the attempt).
async fn impatient_store(pipeline: &Pipeline, ms: &str) -> Arc<dyn Store> {
    let db = support::settings(&pipeline.url, &[("APP_DATABASE__STATEMENT_TIMEOUT_MS", ms)]).database;
    store::connect(&db).await.expect("connect").inbox
}

#[tokio::test]
async fn control_characters_go_to_the_dlq_at_once_and_the_partition_moves_on() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let (poisoned, healthy) = (pipeline.create(1).await, pipeline.create(1).await);
    let nul = json!({"paymentId": "p-\u{0}-nul", "orderId": poisoned.id.to_string(),
                     "amountMinor": poisoned.total_minor.to_string(), "currency": "EUR"});
    produce_to(
        0,
        vec![
            event(
                &topics.payments,
                "payments.events.v1.PaymentCaptured",
                "nul-1",
                &poisoned.id.to_string(),
                nul,
            ),
            payment_captured(&topics.payments, "fine-1", &healthy),
        ],
    )
    .await;
    let name = json!({"customerId": "cust-1", "displayName": "Ada\u{0}Lovelace", "version": "1"});
    produce_to(
        0,
        vec![event(&topics.customers, "customers.events.v1.CustomerUpdated", "nul-2", "cust-1", name)],
    )
    .await;
    let stop = consume(
        inbox(&pipeline, pipeline.store.clone(), &topics, Duration::from_secs(3600)),
        pipeline.metrics.clone(),
    );
    eventually(Duration::from_secs(15), "the valid payment behind the poison", || async {
        status(&pipeline.store, &healthy).await == OrderStatus::Paid
    })
    .await;
    eventually(Duration::from_secs(15), "both poison messages dead-lettered", || async {
        count(&pipeline, &topics.payments, "dead_lettered") == 1
            && count(&pipeline, &topics.customers, "dead_lettered") == 1
    })
    .await;
    stop.cancel();
    assert_eq!(
        pipeline.metrics.inbox_retries.with_label_values(&[&topics.payments]).get(),
        0,
        "never retried"
    );
    assert_eq!(status(&pipeline.store, &poisoned).await, OrderStatus::Pending);
    let reasons: Vec<String> =
        pipeline.store.list_rejections(10).await.expect("list").into_iter().map(|r| r.reason).collect();
    assert!(
        reasons.iter().any(|r| r.contains("paymentId contains the control character U+0000")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("displayName contains the control character U+0000")),
        "{reasons:?}"
    );
    let dlq =
        kafka::read(&kafka::brokers(), &format!("{}.dlq", topics.payments), 1, Duration::from_secs(10)).await;
    assert_eq!(dlq.len(), 1);
    assert!(dlq[0].headers["dlq_error"].contains("control character"));
}

#[tokio::test]
async fn data_the_database_rejects_is_classified_as_rejected_not_transient() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let mut tx = pipeline.store.begin().await.expect("begin");
    let refused =
        tx.insert_inbox("consumer", "id-with-\u{0}-nul").await.expect_err("PostgreSQL refuses NUL in text");
    assert!(matches!(refused, StoreError::Rejected(_)), "{refused:?}");
    assert!(!refused.is_retriable());
}

#[tokio::test]
async fn a_message_that_keeps_aborting_is_dead_lettered_after_max_attempts() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let (locked, next) = (pipeline.create(1).await, pipeline.create(1).await);
    let _lock = support::lock_order(&pipeline.url, &locked.id.to_string()).await;
    let store = impatient_store(&pipeline, "200").await;
    let mut settings = topics.settings(Duration::from_secs(3600));
    settings.max_attempts = 3;
    produce_to(
        0,
        vec![
            payment_captured(&topics.payments, "stuck", &locked),
            payment_captured(&topics.payments, "next", &next),
        ],
    )
    .await;
    let stop = consume(inbox_with(&pipeline, store, settings), pipeline.metrics.clone());
    eventually(Duration::from_secs(20), "the message behind it", || async {
        status(&pipeline.store, &next).await == OrderStatus::Paid
    })
    .await;
    stop.cancel();
    assert_eq!(count(&pipeline, &topics.payments, "dead_lettered"), 1);
    assert_eq!(
        pipeline.metrics.inbox_retries.with_label_values(&[&topics.payments]).get(),
        2,
        "3 attempts, 2 retries"
    );
    let reasons: Vec<String> =
        pipeline.store.list_rejections(10).await.expect("list").into_iter().map(|r| r.reason).collect();
    assert!(reasons.iter().any(|r| r.contains("gave up after 3 aborted attempts")), "{reasons:?}");
}

#[tokio::test]
async fn a_fatal_dead_letter_producer_is_rebuilt_and_the_poison_message_still_goes_to_the_dlq() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = "payments.events.fatal";
    let dlq_topic = format!("{topic}.dlq");
    mock.create_topic(&dlq_topic, kafka::TOPIC_PARTITIONS, 1).expect("topic");
    let mut producer = kafka::settings(&mock.bootstrap_servers());
    producer.message_timeout = Duration::from_secs(5);
    let dlq: Arc<dyn Publisher> = Arc::new(KafkaPublisher::new(&producer).expect("producer"));
    let settings = InboxSettings {
        group_id: "fatal-dlq".into(),
        payments_topic: topic.into(),
        customers_topic: "customers.events.fatal".into(),
        retention: Duration::from_secs(3600),
        max_parallel_partitions: 1,
        max_attempts: 5,
    };
    let inbox =
        inbox_dead_lettering_to(&pipeline, pipeline.store.clone(), settings, pipeline.metrics.clone(), dlq);
    let poison = event(topic, "payments.events.v1.PaymentCaptured", "poison-1", "k", json!({"orderId": 7}));
    // A sequence desynchronisation on the first produce: librdkafka's fatal state, in which
    // the same producer fails every later message too.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    let done = tokio::time::timeout(
        Duration::from_secs(30),
        inbox.process(&inbound(&poison, 3), &CancellationToken::new()),
    )
    .await
    .expect("dead-lettered despite the fatal producer");
    assert!(done, "processed, so the offset may move on");
    let rebuilds = |reason| pipeline.metrics.inbox_dlq_producer_rebuilds.with_label_values(&[reason]).get();
    assert_eq!((rebuilds("fatal"), rebuilds("unresponsive")), (1, 0));
    assert_eq!(count(&pipeline, topic, "dead_lettered"), 1);
    let on_dlq = kafka::read(&mock.bootstrap_servers(), &dlq_topic, 1, Duration::from_secs(20)).await;
    assert_eq!(on_dlq.len(), 1);
    assert_eq!(on_dlq[0].headers["dlq_source_offset"], "3");
}

/// Joins `group` with a plain consumer of `topic`, waits until the group handed it
/// partitions (every member's partitions were revoked and reassigned), then leaves (the
/// group rebalances again). Returns how many partitions it held.
async fn join_and_leave(group: &str, topic: &str) -> usize {
    let (group, topic) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka::brokers())
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let _ = consumer.poll(Duration::from_millis(100));
            let held = consumer.assignment().expect("assignment").count();
            if held > 0 {
                return held; // dropping the consumer leaves the group
            }
        }
        panic!("the group never assigned the second consumer a partition");
    })
    .await
    .expect("second consumer")
}

/// Partition 0 of the payments topic with its head stuck behind a row lock and 100 payments
/// behind it (more than a worker queues before pausing), consumed with an impatient store.
struct Stuck {
    locked: Order,
    behind: Vec<Order>,
    /// Dropping it releases the head.
    lock: sqlx::PgConnection,
    stop: CancellationToken,
}

async fn stuck_partition(pipeline: &Pipeline, topics: &Topics) -> Stuck {
    let locked = pipeline.create(1).await;
    let mut behind = Vec::new();
    for _ in 0..100 {
        behind.push(pipeline.create(1).await);
    }
    let lock = support::lock_order(&pipeline.url, &locked.id.to_string()).await;
    let mut messages = vec![payment_captured(&topics.payments, "locked", &locked)];
    messages.extend(
        behind.iter().enumerate().map(|(i, o)| payment_captured(&topics.payments, &format!("b{i}"), o)),
    );
    produce_to(0, messages).await;
    let store = impatient_store(pipeline, "500").await;
    let mut settings = topics.settings(Duration::from_secs(3600));
    settings.max_attempts = 1000;
    let stop = consume(inbox_with(pipeline, store, settings), pipeline.metrics.clone());
    Stuck { locked, behind, lock, stop }
}

#[tokio::test]
async fn a_partition_paused_when_revoked_is_resumed_when_assigned_again() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let Stuck { locked, behind, lock, stop } = stuck_partition(&pipeline, &topics).await;
    let paused = || pipeline.metrics.inbox_partitions_paused.get();
    eventually(Duration::from_secs(20), "partition 0 paused behind its stuck head", || async {
        paused() == 1
    })
    .await;
    // A second member joins (every partition is revoked while partition 0 is paused and
    // reassigned), then leaves (reassigned again).
    assert!(join_and_leave(&topics.group, &topics.payments).await > 0);
    drop(lock);
    eventually(Duration::from_secs(60), "partition 0 to catch up after the rebalances", || async {
        status(&pipeline.store, &behind[99]).await == OrderStatus::Paid
    })
    .await;
    stop.cancel();
    assert_eq!(status(&pipeline.store, &locked).await, OrderStatus::Paid);
    assert_eq!(paused(), 0, "nothing left paused");
}

#[tokio::test]
async fn a_partition_stuck_behind_a_lock_does_not_hold_the_others() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let Stuck { behind, lock, stop, .. } = stuck_partition(&pipeline, &topics).await;
    let elsewhere = pipeline.create(1).await;
    eventually(Duration::from_secs(20), "the locked message to be retried", || async {
        pipeline.metrics.inbox_retries.with_label_values(&[&topics.payments]).get() > 0
    })
    .await;
    // Partition 0 now holds 100 messages behind its stuck head: more than a worker queues.
    produce_to(1, vec![payment_captured(&topics.payments, "elsewhere", &elsewhere)]).await;
    eventually(Duration::from_secs(10), "another partition's payment", || async {
        status(&pipeline.store, &elsewhere).await == OrderStatus::Paid
    })
    .await;
    assert_eq!(
        status(&pipeline.store, &behind[0]).await,
        OrderStatus::Pending,
        "partition 0 keeps its order"
    );
    drop(lock);
    eventually(Duration::from_secs(30), "partition 0 to catch up", || async {
        count(&pipeline, &topics.payments, "applied") == 102
    })
    .await;
    stop.cancel();
    assert_eq!(status(&pipeline.store, &behind[99]).await, OrderStatus::Paid);
}

/// The partitions a consumer's lag gauges name.
fn lag_partitions(metrics: &Metrics, topic: &str) -> HashSet<String> {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("inbox_consumer_lag{") && l.contains(&format!("topic=\"{topic}\"")))
        .filter_map(|l| l.split("partition=\"").nth(1).and_then(|r| r.split('"').next()).map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_consumer_joining_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let mut orders = Vec::new();
    for _ in 0..150 {
        orders.push(pipeline.create(1).await);
    }
    let messages = orders
        .iter()
        .enumerate()
        .map(|(i, o)| payment_captured(&topics.payments, &format!("m{i}"), o))
        .collect();
    crate::inbox::produce(messages).await;
    let first_metrics = pipeline.metrics.clone();
    let first = consume(
        inbox(&pipeline, pipeline.store.clone(), &topics, Duration::from_secs(3600)),
        first_metrics.clone(),
    );
    eventually(Duration::from_secs(30), "the first consumer to get going", || async {
        count(&pipeline, &topics.payments, "applied") >= 20
    })
    .await;
    let second_metrics = Metrics::new().expect("metrics");
    let settings = topics.settings(Duration::from_secs(3600));
    let second_inbox = inbox_counted_by(&pipeline, pipeline.store.clone(), settings, second_metrics.clone());
    let second = consume(second_inbox, second_metrics.clone());
    let handled = |m: &Metrics| {
        ["applied", "duplicate"]
            .iter()
            .map(|r| m.inbox_messages.with_label_values(&[topics.payments.as_str(), r]).get())
            .sum::<u64>()
    };
    eventually(Duration::from_secs(60), "every payment applied", || async {
        let mut paid = 0;
        for order in &orders {
            paid += usize::from(status(&pipeline.store, order).await == OrderStatus::Paid);
        }
        paid == orders.len()
    })
    .await;
    eventually(Duration::from_secs(20), "each partition's lag reported by its one owner", || async {
        let (a, b) = (
            lag_partitions(&first_metrics, &topics.payments),
            lag_partitions(&second_metrics, &topics.payments),
        );
        !b.is_empty() && a.is_disjoint(&b)
    })
    .await;
    let applied = || {
        count(&pipeline, &topics.payments, "applied")
            + second_metrics.inbox_messages.with_label_values(&[&topics.payments, "applied"]).get()
    };
    eventually(Duration::from_secs(10), "every effect counted", || async { applied() >= 150 }).await;
    first.cancel();
    second.cancel();
    assert_eq!(applied(), 150, "exactly one effect per message");
    assert!(handled(&first_metrics) + handled(&second_metrics) >= 150);
    for order in &orders {
        assert_eq!(
            pipeline.store.get_order(order.id).await.expect("get").expect("order").version,
            2,
            "paid once"
        );
    }
    let pool = sqlx::PgPool::connect(&pipeline.url).await.expect("connect");
    let paid_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE event_type = 'orders.events.v1.OrderPaid'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(paid_events, 150, "one OrderPaid per payment");
}

/// The group's session timeout in the vanished-member test, short so the test is too.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// A second member of `topics.group`: the real binary with only the consumer role, so it
/// can be killed with `kill -9` (no LeaveGroup; the broker finds out by the session timeout).
fn second_member(pipeline: &Pipeline, topics: &Topics, log: &std::path::Path) -> std::process::Child {
    let log = std::fs::File::create(log).expect("log file");
    std::process::Command::new(env!("CARGO_BIN_EXE_orders-service"))
        .env_clear()
        .env("APP_ROLES", "consumer")
        .env("APP_DATABASE__URL", &pipeline.url)
        .env("APP_OUTBOX__PARTITIONS", crate::outbox::PARTITIONS.to_string())
        .env("APP_KAFKA__BROKERS", kafka::brokers())
        .env("APP_KAFKA__GROUP_ID", &topics.group)
        .env("APP_KAFKA__TOPIC_REPLICATION", "1")
        .env("APP_KAFKA__TOPIC_PARTITIONS", kafka::TOPIC_PARTITIONS.to_string())
        .env("APP_KAFKA__PROPERTIES", session_properties().join(";"))
        .env("APP_INBOX__PAYMENTS_TOPIC", &topics.payments)
        .env("APP_INBOX__CUSTOMERS_TOPIC", &topics.customers)
        .env("APP_HTTP__ADDR", "127.0.0.1:0")
        .env("APP_GRPC__ADDR", "127.0.0.1:0")
        .env("APP_ADMIN__ADDR", "127.0.0.1:0")
        .env("APP_LOG_FORMAT", "json")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("the second member starts")
}

fn session_properties() -> Vec<String> {
    vec![format!("session.timeout.ms={}", SESSION_TIMEOUT.as_millis()), "heartbeat.interval.ms=500".into()]
}

#[tokio::test]
async fn a_member_killed_without_leaving_has_its_partitions_taken_over() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let mut settings = kafka::settings(&kafka::brokers());
    settings.properties = session_properties()
        .iter()
        .filter_map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let inbox = inbox(&pipeline, pipeline.store.clone(), &topics, Duration::from_secs(3600));
    let runner = KafkaInbox::new(&settings, inbox, pipeline.metrics.clone()).expect("consumer");
    let stop = CancellationToken::new();
    tokio::spawn(runner.run(stop.clone()));
    let held = || pipeline.metrics.inbox_partitions_assigned.get();
    let all = 2 * i64::from(kafka::TOPIC_PARTITIONS); // payments and customers
    eventually(Duration::from_secs(30), "the first member to hold every partition", || async {
        held() == all
    })
    .await;
    let log = std::env::temp_dir().join(format!("{}-second-member.log", topics.group));
    let mut second = second_member(&pipeline, &topics, &log);
    eventually(Duration::from_secs(60), "the second member to take a share", || async {
        (1..all).contains(&held())
    })
    .await;
    second.kill().expect("kill -9");
    second.wait().expect("reaped");
    let killed = Instant::now();
    // One payment per partition, so whichever the dead member held has one waiting.
    let mut orders = Vec::new();
    for partition in 0..kafka::TOPIC_PARTITIONS {
        let order = pipeline.create(1).await;
        produce_to(partition, vec![payment_captured(&topics.payments, &format!("p{partition}"), &order)])
            .await;
        orders.push(order);
    }
    eventually(SESSION_TIMEOUT * 10, "every partition's payment applied by the member left", || async {
        let mut paid = 0;
        for order in &orders {
            paid += usize::from(status(&pipeline.store, order).await == OrderStatus::Paid);
        }
        paid == orders.len()
    })
    .await;
    println!(
        "partitions taken over {:.1} s after the kill (session timeout {SESSION_TIMEOUT:?})",
        killed.elapsed().as_secs_f64()
    );
    stop.cancel();
    let _ = std::fs::remove_file(log);
}
