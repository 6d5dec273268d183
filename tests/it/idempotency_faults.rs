//! Idempotency-Key under faults and unusual use: one key used on two different targets, a
//! blackholed Redis, concurrent retries of an expired key with only the database backstop
//! answering, and a create in flight on a replica killed with `kill -9`.

use std::time::{Duration, Instant};

use orders_service::pb::orders::v1::CancelOrderRequest;
use serde_json::Value;
use sqlx::{Connection, PgConnection};

use crate::{
    idempotency::redis_url,
    kafka::free_port,
    proxy::Blackhole,
    support::{Backend, TestApp, eventually, fresh_postgres, until_blocked_on_lock, valid_order},
};

fn replayed(response: &reqwest::Response) -> bool {
    response.headers().get("idempotent-replayed").is_some_and(|v| v == "true")
}

async fn cancel(app: &TestApp, id: &str, key: &str) -> reqwest::Response {
    let url = format!("{}/v1/orders/{id}/cancel", app.http);
    app.client.post(url).header("idempotency-key", key).send().await.expect("cancel")
}

async fn status(app: &TestApp, id: &str) -> String {
    let order: Value = app.get(&format!("/v1/orders/{id}")).await.json().await.expect("json");
    order["status"].as_str().expect("status").to_owned()
}

async fn a_cancel_key_stands_for_one_order_only(backend: Backend) {
    let app = TestApp::spawn_with_settings(backend, &[("APP_ROLES", "api")]).await;
    let a = app.create_ok().await["id"].as_str().expect("id").to_owned();
    let b = app.create_ok().await["id"].as_str().expect("id").to_owned();
    assert_eq!(cancel(&app, &a, "k-cancel").await.status(), 200);
    let retried = cancel(&app, &a, "k-cancel").await;
    assert!(replayed(&retried), "a retry of the same cancel replays");
    let other = cancel(&app, &b, "k-cancel").await;
    assert_eq!(other.status(), 200);
    assert!(!replayed(&other), "the key on another order is another request");
    assert_eq!(other.json::<Value>().await.expect("json")["id"], b.as_str());
    assert_eq!(status(&app, &b).await, "CANCELLED");
}

#[tokio::test]
async fn a_cancel_key_stands_for_one_order_only_on_postgres() {
    a_cancel_key_stands_for_one_order_only(Backend::Postgres).await;
}

#[tokio::test]
async fn a_cancel_key_stands_for_one_order_only_on_sqlite() {
    a_cancel_key_stands_for_one_order_only(Backend::Sqlite).await;
}

#[tokio::test]
async fn over_grpc_a_cancel_key_stands_for_one_order_only() {
    let app = TestApp::spawn_configured(&[("APP_ROLES", "api")]).await;
    let (a, b) = (app.create_ok().await, app.create_ok().await);
    let mut client = app.grpc().await;
    let call = |id: &Value| {
        let mut request = tonic::Request::new(CancelOrderRequest { id: id.as_str().expect("id").to_owned() });
        request.metadata_mut().insert("idempotency-key", "g-cancel".parse().expect("ascii"));
        request
    };
    client.cancel_order(call(&a["id"])).await.expect("cancel A");
    let other = client.cancel_order(call(&b["id"])).await.expect("cancel B with the same key");
    assert!(other.metadata().get("idempotent-replayed").is_none());
    assert_eq!(other.into_inner().order.expect("order").id, b["id"].as_str().expect("id"));
    assert_eq!(status(&app, b["id"].as_str().expect("id")).await, "CANCELLED");
}

#[tokio::test]
async fn a_blackholed_redis_costs_each_create_at_most_its_timeout() {
    let blackhole = Blackhole::start().await;
    let url = format!("redis://{}", blackhole.addr);
    let app = TestApp::spawn_configured(&[
        ("APP_ROLES", "api"),
        ("APP_REDIS__URL", &url),
        ("APP_REDIS__TIMEOUT_MS", "250"),
        ("APP_DATABASE__MAX_CONNECTIONS", "10"),
    ])
    .await;
    let creates: Vec<_> = (0..50)
        .map(|i| {
            let (client, http) = (app.client.clone(), app.http.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let response = client
                    .post(format!("{http}/v1/orders"))
                    .header("idempotency-key", format!("blackhole-{i}"))
                    .json(&valid_order())
                    .send()
                    .await
                    .expect("request");
                (response.status(), started.elapsed())
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for create in creates {
        let (status, latency) = create.await.expect("task");
        assert_eq!(status, 201);
        latencies.push(latency);
    }
    latencies.sort();
    let (p50, p99) = (latencies[24], latencies[49]);
    eprintln!("blackholed Redis, 50 concurrent creates: p50 {p50:?}, p99 {p99:?}");
    // The Redis timeout (250 ms) once or twice, plus database time: not a queue of requests.
    assert!(p99 < Duration::from_millis(1500), "p99 {p99:?}");
    let mut conn = PgConnection::connect(&app.database_url).await.expect("connect");
    let orders: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&mut conn).await.expect("count");
    assert_eq!(orders, 50);
}

#[tokio::test]
async fn concurrent_retries_of_an_expired_key_make_exactly_one_new_order() {
    let dead = format!("redis://127.0.0.1:{}", crate::kafka::free_port());
    let app = TestApp::spawn_configured(&[
        ("APP_ROLES", "api"),
        ("APP_REDIS__URL", &dead),
        ("APP_IDEMPOTENCY__TTL_MS", "200"),
    ])
    .await;
    let first: Value = app.create_with_key(&valid_order(), "expiring").await.json().await.expect("json");
    let mut conn = PgConnection::connect(&app.database_url).await.expect("connect");
    crate::support::eventually(Duration::from_secs(5), "the binding to lapse", || {
        let url = app.database_url.clone();
        async move {
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            sqlx::query_scalar::<_, bool>("SELECT idempotency_expires_at < now() FROM orders")
                .fetch_one(&mut conn)
                .await
                .expect("expiry")
        }
    })
    .await;
    let retries: Vec<_> = (0..20)
        .map(|_| {
            let (client, http) = (app.client.clone(), app.http.clone());
            tokio::spawn(async move {
                let response = client
                    .post(format!("{http}/v1/orders"))
                    .header("idempotency-key", "expiring")
                    .json(&valid_order())
                    .send()
                    .await
                    .expect("request");
                let status = response.status().as_u16();
                (
                    status,
                    response.json::<Value>().await.ok().and_then(|v| v["id"].as_str().map(str::to_owned)),
                )
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for retry in retries {
        match retry.await.expect("task") {
            (201, Some(id)) => {
                ids.insert(id);
            }
            (409, _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "every retry that got an order got the same one: {ids:?}");
    assert!(!ids.contains(first["id"].as_str().expect("id")), "a new order under the reused key");
    let orders: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&mut conn).await.expect("count");
    assert_eq!(orders, 2, "the first order and exactly one new one");
}

/// The shape of chaos-ledger run 13: a REST create in flight on a replica when it is killed
/// with `kill -9`, holding the key's in-flight marker in Redis and an uncommitted order row
/// that binds the key in PostgreSQL. The client's retries on another replica are answered
/// 409 while the marker lives; after it lapses a retry makes the one order. Fails if the
/// dead request's marker or key binding outlives the lock TTL.
#[tokio::test]
async fn a_create_in_flight_on_a_killed_replica_is_made_by_a_retry_once_its_marker_lapses() {
    const LOCK_TTL: Duration = Duration::from_secs(3);
    let (database_url, redis) = (fresh_postgres().await, redis_url());
    let prefix = format!("test-{}:", uuid::Uuid::now_v7().simple());
    let lock_ttl = LOCK_TTL.as_millis().to_string();
    let shared = [
        ("APP_ROLES", "api"),
        ("APP_REDIS__URL", redis.as_str()),
        ("APP_REDIS__KEY_PREFIX", prefix.as_str()),
        ("APP_IDEMPOTENCY__LOCK_TTL_MS", lock_ttl.as_str()),
        // Below the lock TTL, as the settings require, and far above the time the victim's
        // create waits on the lock before the kill, so its own timeout never releases the key.
        ("APP_HTTP__REQUEST_TIMEOUT_MS", "2500"),
    ];
    let survivor = TestApp::start_on(database_url.clone(), &shared).await; // applies the migrations
    let victim_http = format!("127.0.0.1:{}", free_port());
    let mut victim = std::process::Command::new(env!("CARGO_BIN_EXE_orders-service"))
        .env_clear()
        .envs(shared)
        .env("APP_DATABASE__URL", &database_url)
        .env("APP_HTTP__ADDR", &victim_http)
        .env("APP_GRPC__ADDR", "127.0.0.1:0")
        .env("APP_ADMIN__ADDR", "127.0.0.1:0")
        .env("APP_LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the victim replica starts");
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the victim replica to be ready", || async {
        let ready = client.get(format!("http://{victim_http}/readyz")).send().await;
        ready.is_ok_and(|r| r.status() == 200)
    })
    .await;

    // Its create binds the key (INSERT orders) and then waits on the outbox insert.
    let mut lock = PgConnection::connect(&database_url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut lock).await.expect("begin");
    sqlx::query("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE").execute(&mut lock).await.expect("lock");
    let in_flight = {
        let request =
            client.post(format!("http://{victim_http}/v1/orders")).header("idempotency-key", "killed-1");
        tokio::spawn(request.json(&valid_order()).send())
    };
    until_blocked_on_lock(&database_url).await;
    victim.kill().expect("kill -9");
    victim.wait().expect("reaped");
    let killed = Instant::now();
    drop(lock);
    assert!(in_flight.await.expect("task").is_err(), "the client saw its connection die");

    let (mut conflicts, deadline) = (0, killed + LOCK_TTL + Duration::from_secs(5));
    let created = loop {
        let retry = survivor.create_with_key(&valid_order(), "killed-1").await;
        match retry.status().as_u16() {
            201 => break retry.json::<Value>().await.expect("order"),
            409 if Instant::now() < deadline => conflicts += 1,
            status => panic!(
                "retry {:.1} s after the kill: {status} {}",
                killed.elapsed().as_secs_f64(),
                retry.text().await.unwrap_or_default()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "made by a retry {:.1} s after the kill, after {conflicts} × 409",
        killed.elapsed().as_secs_f64()
    );
    assert!(conflicts > 0, "the dead request's marker answered 409 until it lapsed");
    let mut conn = PgConnection::connect(&database_url).await.expect("connect");
    let orders: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM orders").fetch_all(&mut conn).await.expect("orders");
    assert_eq!(orders, [created["id"].as_str().expect("id")], "exactly the one order the retry returned");
}
