//! Resilience against the real dependencies behind the fault proxy: a blackholed Redis, a
//! blackholed PostgreSQL, connections reset under the pool, a blackholed broker, overload,
//! and a client deadline that must cancel the statement on the server.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use orders_service::{
    metrics::Metrics,
    pb::orders::v1::CancelOrderRequest,
    publish::KafkaPublisher,
    resilience::{BreakerSettings, Dependency, Policy, PolicySettings},
};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::{
    kafka,
    outbox::{Instrumented, Pipeline, relay_settings},
    proxy::{ChaosProxy, Mode},
    support::{
        Backend, TestApp, eventually, problem, sample, until_blocked_on_lock, until_lock_waiters, valid_order,
    },
};

async fn breaker_state(app: &TestApp, dependency: &str) -> Option<f64> {
    sample(&app.metrics().await, &format!("resilience_breaker_state{{dependency=\"{dependency}\"}}"))
}

async fn orders(url: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&mut conn).await.expect("count")
}

/// `n` concurrent creates with keys `prefix-0..n`; returns their statuses and latencies.
async fn concurrent_creates(app: &TestApp, prefix: &str, n: usize) -> Vec<(u16, Duration)> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (client, http, key) = (app.client.clone(), app.http.clone(), format!("{prefix}-{i}"));
            tokio::spawn(async move {
                let started = Instant::now();
                let response = client
                    .post(format!("{http}/v1/orders"))
                    .header("idempotency-key", key)
                    .json(&valid_order())
                    .send()
                    .await
                    .expect("request");
                (response.status().as_u16(), started.elapsed())
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task"));
    }
    results
}

#[tokio::test]
async fn a_blackholed_redis_opens_its_breaker_idempotency_holds_and_a_probe_closes_it() {
    let proxy = ChaosProxy::start("127.0.0.1:6379".parse().expect("addr")).await;
    let url = format!("redis://{}", proxy.addr);
    let prefix = format!("test-{}:", uuid::Uuid::now_v7().simple());
    let app = TestApp::spawn_configured(&[
        ("APP_ROLES", "api"),
        ("APP_REDIS__URL", &url),
        ("APP_REDIS__KEY_PREFIX", &prefix),
        ("APP_REDIS__TIMEOUT_MS", "250"),
        ("APP_RESILIENCE__REDIS__BREAKER_FAILURES", "3"),
        ("APP_RESILIENCE__REDIS__BREAKER_OPEN_MS", "500"),
    ])
    .await;
    let first = app.create_with_key(&valid_order(), "before").await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.expect("json");

    proxy.set(Mode::Blackhole);
    let results = concurrent_creates(&app, "blackholed", 50).await;
    let mut latencies: Vec<Duration> = results.iter().map(|(_, l)| *l).collect();
    latencies.sort();
    eprintln!("Redis blackholed: 50 concurrent creates, p50 {:?}, p99 {:?}", latencies[24], latencies[49]);
    assert!(results.iter().all(|(status, _)| *status == 201), "{results:?}");
    assert!(latencies[49] < Duration::from_millis(1500), "p99 {:?}", latencies[49]);
    assert_eq!(breaker_state(&app, "redis").await, Some(2.0), "the Redis breaker is open");
    let ready: Value = app.get("/readyz").await.json().await.expect("json");
    assert_eq!(ready["status"], "degraded", "{ready}");

    // The backstop keeps the key: a retry of the first create replays its order.
    let retried = app.create_with_key(&valid_order(), "before").await;
    assert_eq!(retried.status(), 201);
    assert_eq!(retried.json::<Value>().await.expect("json")["id"], first["id"]);
    assert_eq!(orders(&app.database_url).await, 51, "exactly one order per key");

    proxy.restore();
    eventually(Duration::from_secs(15), "a half-open probe to close the breaker", || async {
        let _ = app.create(&valid_order()).await;
        breaker_state(&app, "redis").await == Some(0.0)
    })
    .await;
    let ready: Value = app.get("/readyz").await.json().await.expect("json");
    assert_eq!(ready["status"], "ready", "{ready}");
}

#[tokio::test]
async fn a_blackholed_database_fails_fast_once_the_breaker_is_open_and_recovers() {
    let app = TestApp::spawn_via_proxy(&[
        ("APP_ROLES", "api"),
        ("APP_DATABASE__STATEMENT_TIMEOUT_MS", "500"),
        ("APP_HEALTH__DATABASE_GRACE_MS", "500"),
        ("APP_RESILIENCE__POSTGRES__BREAKER_FAILURES", "3"),
        ("APP_RESILIENCE__POSTGRES__BREAKER_OPEN_MS", "1000"),
    ])
    .await;
    let proxy = app.proxy.as_ref().expect("proxy");
    let id = app.create_ok().await["id"].as_str().expect("id").to_owned();
    proxy.set(Mode::Blackhole);
    eventually(Duration::from_secs(20), "the database breaker to open", || async {
        let _ = app.get(&format!("/v1/orders/{id}")).await;
        breaker_state(&app, "postgres").await == Some(2.0)
    })
    .await;
    // Open: each request is answered at once, none waits on the pool; 50 concurrent ones
    // do not pile up either.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let status = app.get(&format!("/v1/orders/{id}")).await.status();
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, 503);
    }
    let started = Instant::now();
    let results = concurrent_creates(&app, "while-open", 50).await;
    eprintln!(
        "database breaker open: sequential requests answered in at most {slowest:?}; 50 concurrent in {:?}",
        started.elapsed()
    );
    assert!(slowest < Duration::from_millis(50), "slowest {slowest:?}");
    assert!(results.iter().all(|(status, _)| *status == 503), "{results:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "no pile-up: {:?}", started.elapsed());
    let response = app.get(&format!("/v1/orders/{id}")).await;
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    problem(response, 503, "unavailable").await;
    eventually(Duration::from_secs(10), "not ready after the grace period", || async {
        app.get("/readyz").await.status() == 503
    })
    .await;

    proxy.restore();
    eventually(Duration::from_secs(20), "recovery by itself", || async {
        app.get(&format!("/v1/orders/{id}")).await.status() == 200 && app.get("/readyz").await.status() == 200
    })
    .await;
    assert_eq!(app.create(&valid_order()).await.status(), 201);
}

/// Holds `LOCK TABLE orders` until the returned connection is dropped: every statement on
/// the table waits on the server, provably in flight.
async fn lock_orders_table(url: &str) -> PgConnection {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut conn).await.expect("begin");
    sqlx::query("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE").execute(&mut conn).await.expect("lock");
    conn
}

#[tokio::test]
async fn reads_are_retried_across_reset_connections_and_writes_are_not_duplicated() {
    let app = TestApp::spawn_via_proxy(&[("APP_ROLES", "api")]).await;
    let proxy = app.proxy.as_ref().expect("proxy");
    app.create_ok().await;
    // A read waiting on the server (behind a table lock) when its connection is reset.
    let lock = lock_orders_table(&app.database_url).await;
    let read = {
        let (client, url) = (app.client.clone(), format!("{}/v1/orders", app.http));
        tokio::spawn(async move { client.get(url).send().await.expect("get").status().as_u16() })
    };
    until_blocked_on_lock(&app.database_url).await;
    proxy.reset();
    drop(lock);
    assert_eq!(read.await.expect("task"), 200, "the read was retried on a fresh connection");
    let metrics = app.metrics().await;
    let retried = sample(&metrics, "resilience_retries_total{dependency=\"postgres\",outcome=\"attempted\"}");
    assert!(retried.unwrap_or(0.0) >= 1.0, "{metrics}");

    // A create waiting inside its transaction when its connection is reset is not retried
    // behind the client's back; the client's retry with the same key makes the one order.
    let lock = lock_orders_table(&app.database_url).await;
    let create = {
        let (client, url) = (app.client.clone(), format!("{}/v1/orders", app.http));
        tokio::spawn(async move {
            let request = client.post(url).header("idempotency-key", "reset-mid-create").json(&valid_order());
            request.send().await.expect("create").status().as_u16()
        })
    };
    until_blocked_on_lock(&app.database_url).await;
    proxy.reset();
    assert_eq!(create.await.expect("task"), 503, "a write is never retried blindly");
    drop(lock);
    let retry = app.create_with_key(&valid_order(), "reset-mid-create").await;
    assert_eq!(retry.status(), 201);
    assert_eq!(orders(&app.database_url).await, 2, "no write was duplicated");
}

#[tokio::test]
async fn a_blackholed_broker_costs_a_bounded_attempt_rate_and_the_backlog_drains() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let (port, public) = (kafka::free_port(), kafka::free_port());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", public)).await.expect("bind proxy");
    let proxy = ChaosProxy::serve(listener, format!("127.0.0.1:{port}").parse().expect("addr"));
    let _broker = kafka::PrivateBroker::start_advertising(port, public).await;
    let brokers = format!("127.0.0.1:{public}");
    let topic = "orders.events.blackholed";
    kafka::settings(&brokers).create_topics(&[topic], &kafka::layout()).await.expect("topic");
    let publisher = Arc::new(KafkaPublisher::new(&kafka::settings(&brokers)).expect("producer"));
    let store = Instrumented::new(pipeline.store.clone());
    let relay = pipeline.relay_with(
        "relay-blackholed",
        store.clone(),
        publisher,
        relay_settings(topic, Duration::from_secs(10)),
    );
    let policy_settings = PolicySettings {
        timeout: Duration::from_secs(2),
        retries: 0,
        backoff: orders_service::backoff::Backoff::DEFAULT,
        retry_ratio: 0.0,
        retry_floor_per_sec: 0,
        breaker: BreakerSettings {
            failures: 2,
            open: Duration::from_secs(2),
            open_max: Duration::from_secs(8),
        },
        concurrency: 1,
    };
    relay.guard_publishing(Policy::new(Dependency::Kafka, policy_settings, pipeline.metrics.clone()));
    pipeline.create(1).await;
    assert_eq!(relay.relay_once().await.expect("pass").published, 1, "connected through the proxy");

    proxy.set(Mode::Blackhole);
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(pipeline.create(1).await.id.to_string());
    }
    let metrics: &Metrics = &pipeline.metrics;
    let errors = || metrics.outbox_publish_errors.with_label_values(&["retriable"]).get();
    let (attempts, calls, passes) =
        (errors(), store.calls.load(Ordering::Relaxed), metrics.outbox_relay_passes.get());
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.clone().run(stop.clone()));
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await; // the outage lasting: what does it cost?
    let seconds = window.elapsed().as_secs_f64();
    let attempts = (errors() - attempts) as f64 / seconds;
    let statements = (store.calls.load(Ordering::Relaxed) - calls) as f64 / seconds;
    let passes = (metrics.outbox_relay_passes.get() - passes) as f64 / seconds;
    eprintln!(
        "broker blackholed: {attempts:.1} publish attempts/s, {statements:.2} statements/s, {passes:.2} passes/s"
    );
    // Without a breaker, a publish round of the 40 heads ends every message timeout (2 s):
    // 20 attempts per second. The open breaker skips rounds (2 s, then 4 s, 8 s…).
    assert!(attempts < 15.0, "{attempts:.1} attempts per second for a 40-row backlog");
    assert!(statements <= 2.0, "{statements:.2} statements per second");
    assert!(metrics.breaker_state.with_label_values(&["kafka"]).get() > 0, "the broker's breaker opened");
    assert_eq!(pipeline.pending().await, 40, "the backlog waits in the outbox");

    proxy.restore();
    eventually(Duration::from_secs(60), "the backlog to drain", || async { pipeline.pending().await == 0 })
        .await;
    stop.cancel();
    running.await.expect("relay stops");
    // Requests the blackhole held were delivered once it healed: expect duplicates (same
    // ce_id), so read everything there is.
    let records = kafka::read(&brokers, topic, 10_000, Duration::from_secs(5)).await;
    let keys: std::collections::HashSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
    assert!(ids.iter().all(|id| keys.contains(id.as_str())), "nothing lost");
}

#[tokio::test]
async fn overload_sheds_the_excess_at_once_while_admitted_requests_finish() {
    let app =
        TestApp::spawn_configured(&[("APP_ROLES", "api"), ("APP_HTTP__MAX_CONCURRENT_REQUESTS", "4")]).await;
    let id = app.create_ok().await["id"].as_str().expect("id").to_owned();
    let lock = app.lock_order(&id).await;
    // Four cancels wait on the row lock: every slot is taken.
    let held: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (app.client.clone(), format!("{}/v1/orders/{id}/cancel", app.http));
            tokio::spawn(async move { client.post(url).send().await.expect("cancel").status().as_u16() })
        })
        .collect();
    until_lock_waiters(&app.database_url, 4).await;
    let started = Instant::now();
    for _ in 0..20 {
        let response = app.get(&format!("/v1/orders/{id}")).await;
        assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
        problem(response, 503, "overloaded").await;
    }
    let shed_in = started.elapsed();
    let mut grpc = app.grpc().await;
    let refused = grpc.cancel_order(CancelOrderRequest { id: id.clone() }).await.expect_err("shed");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(refused.metadata().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert_eq!(app.get("/readyz").await.status(), 200, "probes are exempt");
    eprintln!("overload: 20 requests shed in {shed_in:?}");
    assert!(shed_in < Duration::from_secs(1), "shed at once, not queued: {shed_in:?}");
    drop(lock);
    let mut statuses = Vec::new();
    for task in held {
        statuses.push(task.await.expect("task"));
    }
    statuses.sort();
    assert_eq!(statuses, [200, 409, 409, 409], "the admitted requests all finished");
    let metrics = app.metrics().await;
    assert_eq!(sample(&metrics, "inbound_shed_total{protocol=\"http\"}"), Some(20.0));
    assert_eq!(sample(&metrics, "inbound_shed_total{protocol=\"grpc\"}"), Some(1.0));
}

#[tokio::test]
async fn against_a_delayed_database_a_client_deadline_is_answered_on_time() {
    let app = TestApp::spawn_via_proxy(&[("APP_ROLES", "api")]).await;
    let id = app.create_ok().await["id"].as_str().expect("id").to_owned();
    app.proxy.as_ref().expect("proxy").set(Mode::Delay(Duration::from_millis(300)));
    let mut client = app.grpc().await;
    let mut request = tonic::Request::new(CancelOrderRequest { id });
    request.set_timeout(Duration::from_millis(50));
    let started = Instant::now();
    let status = client.cancel_order(request).await.expect_err("deadline");
    let took = started.elapsed();
    eprintln!("delayed database (300 ms per packet), 50 ms deadline: {:?} after {took:?}", status.code());
    assert!(matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{status:?}");
    assert!(took < Duration::from_millis(500), "answered at the deadline, not after the database: {took:?}");
}

#[tokio::test]
async fn a_client_deadline_cancels_the_statement_on_the_server() {
    let app = TestApp::spawn_configured(&[("APP_ROLES", "api")]).await;
    let id = app.create_ok().await["id"].as_str().expect("id").to_owned();
    let _lock = app.lock_order(&id).await;
    let mut client = app.grpc().await;
    let mut request = tonic::Request::new(CancelOrderRequest { id: id.clone() });
    request.set_timeout(Duration::from_millis(50));
    let started = Instant::now();
    let status = client.cancel_order(request).await.expect_err("deadline");
    eprintln!("client deadline 50 ms: {:?} after {:?}", status.code(), started.elapsed());
    assert!(matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{status:?}");
    // The pool's statement timeout is 5 s; the request's deadline made it ~100 ms.
    let cancelled = Instant::now();
    until_lock_waiters(&app.database_url, 0).await;
    assert!(
        cancelled.elapsed() < Duration::from_secs(1),
        "the statement outlived its caller: {:?}",
        cancelled.elapsed()
    );
}
