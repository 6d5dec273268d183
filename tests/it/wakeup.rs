//! Post-commit wake-ups: with a 60 s polling interval, an event must still be published
//! within seconds, whether the relay runs in the writing process or in another one.

use std::time::Duration;

use crate::{
    kafka,
    support::{TestApp, eventually, fresh_postgres},
};

async fn relay_owns_its_partitions(app: &TestApp) {
    eventually(Duration::from_secs(10), "the relay to lease every partition", || async {
        app.metrics().await.contains("\noutbox_partitions_owned 16\n")
    })
    .await;
}

fn kafka_config<'a>(brokers: &'a str, topic: &'a str, roles: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("APP_ROLES", roles),
        ("APP_KAFKA__BROKERS", brokers),
        ("APP_KAFKA__MESSAGE_TIMEOUT_MS", "2000"),
        ("APP_OUTBOX__LEASE_TTL_MS", "10000"),
        ("APP_OUTBOX__POLL_INTERVAL_MS", "60000"),
        ("APP_EVENTS__TOPIC", topic),
    ]
}

#[tokio::test]
async fn the_relay_in_the_writing_process_is_woken_in_process() {
    let (brokers, topic) = (kafka::brokers(), kafka::fresh_topic().await);
    let app = TestApp::spawn_configured(&kafka_config(&brokers, &topic, "api,relay")).await;
    relay_owns_its_partitions(&app).await;

    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response = app
        .client
        .post(format!("{}/v1/orders", app.http))
        .header("traceparent", traceparent)
        .header("idempotency-key", crate::support::fresh_key())
        .json(&crate::support::valid_order())
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), 201);
    let id = response.json::<serde_json::Value>().await.expect("json")["id"].as_str().expect("id").to_owned();

    let records = kafka::read(&brokers, &topic, 1, Duration::from_secs(10)).await;
    assert_eq!(records.len(), 1, "published long before the 60 s poll");
    assert_eq!(records[0].key, id);
    assert_eq!(
        records[0].headers["traceparent"], traceparent,
        "the request's trace context travels with the event"
    );
}

#[tokio::test]
async fn a_relay_in_another_process_is_woken_by_notify() {
    let (brokers, topic) = (kafka::brokers(), kafka::fresh_topic().await);
    let database = fresh_postgres().await;
    let relay = TestApp::start_on(database.clone(), &kafka_config(&brokers, &topic, "relay")).await;
    relay_owns_its_partitions(&relay).await;
    let api = TestApp::start_on(database, &kafka_config(&brokers, &topic, "api")).await;
    assert!(api.metrics().await.contains("\noutbox_partitions_owned 0\n"), "the api process runs no relay");

    let id = api.create_ok().await["id"].as_str().expect("id").to_owned();
    let records = kafka::read(&brokers, &topic, 1, Duration::from_secs(10)).await;
    assert_eq!(records.len(), 1, "published long before the 60 s poll");
    assert_eq!(records[0].key, id);
}

#[tokio::test]
async fn replaying_a_dead_letter_wakes_the_relay_that_owns_it_in_another_process() {
    let database = fresh_postgres().await;
    let relay_config = [("APP_ROLES", "relay"), ("APP_OUTBOX__POLL_INTERVAL_MS", "60000")];
    let relay = TestApp::start_on(database.clone(), &relay_config).await;
    relay_owns_its_partitions(&relay).await;
    let api = TestApp::start_on(database.clone(), &[("APP_ROLES", "api")]).await;
    let aggregate = uuid::Uuid::now_v7().to_string();
    let partition = orders_service::outbox::partition_of(&aggregate, 16);
    let pool = sqlx::PgPool::connect(&database).await.expect("connect");
    sqlx::query(
        "INSERT INTO outbox_dead_letter (seq, message_id, partition, aggregate_type, aggregate_id, event_type,
                                         payload, created_at, attempts, error)
         VALUES (424242, $1, $2, 'order', $3, 'orders.events.v1.OrderCreated', '{}'::bytea, now(), 1, 'too large')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(partition)
    .bind(&aggregate)
    .execute(&pool)
    .await
    .expect("dead letter");

    let replay =
        api.client.post(format!("{}/admin/outbox/dead-letters/424242/replay", api.admin)).send().await;
    assert_eq!(replay.expect("replay").status(), 200);
    eventually(Duration::from_secs(10), "the relay in the other process to publish it", || async {
        let records = relay.admin_json("/admin/bus/orders.events").await;
        records.as_array().is_some_and(|r| r.iter().any(|r| r["key"] == aggregate.as_str()))
    })
    .await;
}
