//! The relay against the faults production has: a broker killed with `kill -9` while the
//! backlog exceeds a batch per partition (what waiting costs, and a drain in order
//! afterwards), and librdkafka's fatal producer state (injected with its mock cluster, the
//! only way to reach that state on demand).

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use orders_service::{backoff::Backoff, domain::Order, outbox::TraceContext, publish::KafkaPublisher};
use rdkafka::{
    ClientConfig, Message,
    consumer::{BaseConsumer, Consumer},
    mocking::MockCluster,
    types::{RDKafkaApiKey, RDKafkaRespErr},
};
use tokio_util::sync::CancellationToken;

use crate::{
    kafka,
    outbox::{Instrumented, PARTITIONS, Pipeline, header, relay_settings},
    support::Backend,
};

#[tokio::test]
async fn a_killed_broker_costs_almost_nothing_while_down_and_the_backlog_drains_in_order() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let port = kafka::free_port();
    let broker = kafka::PrivateBroker::start(port).await;
    let topic = "orders.events.outage";
    let layout = kafka::layout();
    kafka::settings(&broker.addr).create_topics(&[topic], &layout).await.expect("topic");
    let mut producer = kafka::settings(&broker.addr);
    producer.properties = vec![("reconnect.backoff.max.ms".into(), "500".into())];
    let publisher = Arc::new(KafkaPublisher::new(&producer).expect("producer"));
    let store = Instrumented::new(pipeline.store.clone());
    let mut settings = relay_settings(topic, Duration::from_secs(10));
    settings.batch_size = 10;
    settings.backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(2)).expect("backoff");
    let relay = pipeline.relay_with("relay-outage", store.clone(), publisher, settings);
    pipeline.create(1).await;
    assert_eq!(relay.relay_once().await.expect("pass").published, 1, "the producer is connected");

    broker.kill();
    // More than a batch per partition: 160 orders over 8 partitions, 40 of them cancelled.
    let mut orders: Vec<Order> = Vec::new();
    for i in 0..160 {
        let order = pipeline.create(1).await;
        if i % 4 == 0 {
            pipeline.orders.cancel(order.id, &TraceContext::default()).await.expect("cancel");
        }
        orders.push(order);
    }
    let (passes, calls) = (pipeline.metrics.outbox_relay_passes.get(), store.calls.load(Ordering::Relaxed));
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.clone().run(stop.clone()));
    // Eight seconds of outage, with writes still arriving (each commit rings the relay).
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(8) {
        orders.push(pipeline.create(1).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seconds = window.elapsed().as_secs_f64();
    let passes = (pipeline.metrics.outbox_relay_passes.get() - passes) as f64 / seconds;
    let statements = (store.calls.load(Ordering::Relaxed) - calls) as f64 / seconds;
    eprintln!(
        "broker down: {passes:.2} passes/s, {statements:.2} outbox statements/s, backlog {}",
        pipeline.pending().await
    );
    assert!(passes <= 1.0, "{passes:.2} passes per second while nothing can be published");
    assert!(statements <= 3.0, "{statements:.2} statements per second while nothing can be published");

    let broker = kafka::PrivateBroker::start(port).await; // memory storage: an empty broker
    kafka::settings(&broker.addr).create_topics(&[topic], &layout).await.expect("topic");
    let deadline = Instant::now() + Duration::from_secs(60);
    while pipeline.pending().await > 0 {
        let m = &pipeline.metrics;
        assert!(
            Instant::now() < deadline,
            "the backlog did not drain: {} pending after {} passes, rebuilds {}/{}, retriable errors {}",
            pipeline.pending().await,
            m.outbox_relay_passes.get(),
            m.outbox_producer_rebuilds.with_label_values(&["unresponsive"]).get(),
            m.outbox_producer_rebuilds.with_label_values(&["fatal"]).get(),
            m.outbox_publish_errors.with_label_values(&["retriable"]).get(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    running.await.expect("relay stops");

    let expected = orders.len() + 40;
    let records = kafka::read(&broker.addr, topic, expected, Duration::from_secs(20)).await;
    let mut per_order: HashMap<&str, Vec<&str>> = HashMap::new();
    for record in &records {
        per_order.entry(record.key.as_str()).or_default().push(header(record, "ce_type"));
    }
    for (i, order) in orders.iter().enumerate() {
        let mut types = per_order.get(order.id.to_string().as_str()).cloned().unwrap_or_default();
        types.dedup(); // at least once: a redelivery repeats an event in place
        let want: &[&str] = if i < 160 && i % 4 == 0 {
            &["orders.events.v1.OrderCreated", "orders.events.v1.OrderCancelled"]
        } else {
            &["orders.events.v1.OrderCreated"]
        };
        assert_eq!(types, want, "order {i}: nothing lost, nothing reordered");
    }
}

#[tokio::test]
async fn a_fatal_producer_error_releases_the_leases_and_the_rebuilt_producer_delivers() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = "orders.events.fatal";
    mock.create_topic(topic, 1, 1).expect("topic");
    let mut producer = kafka::settings(&mock.bootstrap_servers());
    producer.message_timeout = Duration::from_secs(5);
    let publisher = Arc::new(KafkaPublisher::new(&producer).expect("producer"));
    let relay =
        pipeline.relay("relay-fatal", pipeline.store.clone(), publisher, topic, Duration::from_secs(30));
    let orders: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(pipeline.create(1).await.id.to_string());
        }
        ids
    };
    // A sequence desynchronisation on the head-of-line request: fatal for an idempotent producer.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    let report = relay.relay_once().await.expect("pass");
    assert!(report.fatal, "{report:?}");
    assert_eq!(report.published, 0);
    assert_eq!(pipeline.metrics.outbox_producer_rebuilds.with_label_values(&["fatal"]).get(), 1);
    assert_eq!(
        pipeline.metrics.outbox_partitions_owned.get(),
        0,
        "leases released while the producer is rebuilt"
    );
    let pool = sqlx::PgPool::connect(&pipeline.url).await.expect("connect");
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_lease WHERE owner IS NOT NULL")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(held, 0, "other replicas may take the partitions at once");
    assert_eq!(pipeline.pending().await, 3, "nothing lost");

    mock.clear_request_errors(RDKafkaApiKey::Produce);
    pipeline.drain(&relay).await;
    assert_eq!(pipeline.metrics.outbox_partitions_owned.get(), PARTITIONS as i64, "the relay rejoined");
    let bootstrap = mock.bootstrap_servers();
    let keys = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "fatal-reader")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut keys = Vec::new();
        while keys.len() < 3 && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                keys.push(String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned());
            }
        }
        keys
    })
    .await
    .expect("reader");
    let mut keys = keys;
    keys.sort();
    keys.dedup();
    let mut expected = orders;
    expected.sort();
    assert_eq!(keys, expected, "the rebuilt producer delivered every event");
}
