//! Idempotency-Key against the real Redis and PostgreSQL, over REST and gRPC. Each test has
//! its own Redis key prefix and database; the service runs the `api` role only, so outbox
//! rows stay countable.

use std::time::Duration;

use orders_service::pb::orders::v1::{CreateOrderRequest, LineItem};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tonic::Code;

use crate::support::{TestApp, lock_order, problem, until_blocked_on_lock, valid_order};

pub(crate) fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// An api-only instance using Redis under a fresh prefix (returned for flushing).
async fn spawn(extra: &[(&str, &str)]) -> (TestApp, String) {
    let prefix = format!("test-{}:", uuid::Uuid::now_v7().simple());
    let redis = redis_url();
    let mut settings = vec![
        ("APP_ROLES", "api"),
        ("APP_REDIS__URL", redis.as_str()),
        ("APP_REDIS__KEY_PREFIX", prefix.as_str()),
    ];
    settings.extend_from_slice(extra);
    (TestApp::spawn_configured(&settings).await, prefix)
}

async fn count(app: &TestApp, table: &str) -> i64 {
    let mut conn = PgConnection::connect(&app.database_url).await.expect("connect");
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&mut conn).await.expect("count")
}

fn replayed(response: &reqwest::Response) -> bool {
    response.headers().get("idempotent-replayed").is_some_and(|v| v == "true")
}

async fn flush(prefix: &str) {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut con = client.get_multiplexed_async_connection().await.expect("redis");
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut con).await.expect("keys");
    assert!(!keys.is_empty(), "the first request left a key to flush");
    let _: i64 = redis::cmd("DEL").arg(keys).query_async(&mut con).await.expect("del");
}

#[tokio::test]
async fn a_retry_replays_the_original_response_and_creates_nothing() {
    let (app, _) = spawn(&[]).await;
    let first = app.create_with_key(&valid_order(), "retry-1").await;
    assert_eq!(first.status(), 201);
    assert!(!replayed(&first));
    let location = first.headers()["location"].clone();
    let body: Value = first.json().await.expect("json");

    for key in ["retry-1", "\"retry-1\""] {
        let again = app.create_with_key(&valid_order(), key).await;
        assert_eq!(again.status(), 201);
        assert!(replayed(&again), "{key}: Idempotent-Replayed: true");
        assert_eq!(again.headers()["location"], location);
        assert_eq!(again.json::<Value>().await.expect("json"), body, "byte-for-byte the same order");
    }
    assert_eq!(count(&app, "orders").await, 1);
    assert_eq!(count(&app, "outbox").await, 1, "one OrderCreated event");
    assert!(app.metrics().await.contains(r#"idempotency_outcomes_total{outcome="replayed"} 2"#));
}

#[tokio::test]
async fn a_hundred_concurrent_requests_with_one_key_create_one_order() {
    let (app, _) = spawn(&[]).await;
    let app = std::sync::Arc::new(app);
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let response = app.create_with_key(&valid_order(), "storm").await;
                (response.status().as_u16(), replayed(&response))
            })
        })
        .collect();
    let mut fresh = 0;
    for request in requests {
        match request.await.expect("task") {
            (201, false) => fresh += 1,
            (201, true) | (409, _) => {}
            other => panic!("unexpected response {other:?}"),
        }
    }
    assert_eq!(fresh, 1, "exactly one request ran");
    assert_eq!(count(&app, "orders").await, 1);
    assert_eq!(count(&app, "outbox").await, 1);
}

#[tokio::test]
async fn bad_keys_and_reused_keys_are_refused() {
    let (app, _) = spawn(&[]).await;
    assert_eq!(app.create_with_key(&valid_order(), "reused").await.status(), 201);
    let mut other = valid_order();
    other["customer_id"] = json!("someone-else");
    problem(app.create_with_key(&other, "reused").await, 422, "idempotency-mismatch").await;

    let url = format!("{}/v1/orders", app.http);
    let missing = app.client.post(&url).json(&valid_order()).send().await.expect("request");
    problem(missing, 400, "idempotency-key").await;
    problem(app.create_with_key(&valid_order(), &"k".repeat(300)).await, 400, "idempotency-key").await;
    problem(app.create_with_key(&valid_order(), "with space").await, 400, "idempotency-key").await;
    assert_eq!(count(&app, "orders").await, 1);
    let metrics = app.metrics().await;
    for outcome in ["mismatch", "missing", "malformed"] {
        assert!(
            metrics.contains(&format!("idempotency_outcomes_total{{outcome=\"{outcome}\"}}")),
            "{outcome}"
        );
    }
}

#[tokio::test]
async fn deterministic_errors_are_stored_too() {
    let (app, _) = spawn(&[]).await;
    let mut invalid = valid_order();
    invalid["items"] = json!([]);
    let first = app.create_with_key(&invalid, "bad-body").await;
    assert_eq!(first.status(), 400);
    let again = app.create_with_key(&invalid, "bad-body").await;
    assert!(replayed(&again), "a validation error is a committed outcome");
    problem(again, 400, "validation").await;
}

#[tokio::test]
async fn a_flushed_redis_falls_back_to_the_database_backstop() {
    let (app, prefix) = spawn(&[]).await;
    let first: Value = app.create_with_key(&valid_order(), "flushed").await.json().await.expect("json");
    flush(&prefix).await;
    let again = app.create_with_key(&valid_order(), "flushed").await;
    assert_eq!(again.status(), 201);
    assert!(replayed(&again));
    assert_eq!(again.json::<Value>().await.expect("json")["id"], first["id"], "the same order");
    flush(&prefix).await;
    let mut other = valid_order();
    other["note"] = json!("different");
    problem(app.create_with_key(&other, "flushed").await, 422, "idempotency-mismatch").await;
    assert_eq!(count(&app, "orders").await, 1);
}

#[tokio::test]
async fn an_unreachable_redis_still_yields_exactly_one_order() {
    let dead = format!("redis://127.0.0.1:{}", crate::kafka::free_port());
    let (app, _) = spawn(&[("APP_REDIS__URL", &dead)]).await;
    let first = app.create_with_key(&valid_order(), "no-redis").await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.expect("json");
    let again = app.create_with_key(&valid_order(), "no-redis").await;
    assert_eq!(again.status(), 201);
    assert!(replayed(&again));
    assert_eq!(again.json::<Value>().await.expect("json")["id"], first["id"]);
    let mut other = valid_order();
    other["note"] = json!("different");
    problem(app.create_with_key(&other, "no-redis").await, 422, "idempotency-mismatch").await;
    assert_eq!(count(&app, "orders").await, 1);
    assert!(app.metrics().await.contains(r#"idempotency_outcomes_total{outcome="store_error"}"#));
}

#[tokio::test]
async fn different_callers_have_independent_keys() {
    let (app, _) = spawn(&[("APP_IDEMPOTENCY__IDENTITY_HEADER", "X-Caller")]).await;
    let mut ids = Vec::new();
    for caller in ["alice", "bob"] {
        let response = app
            .client
            .post(format!("{}/v1/orders", app.http))
            .header("idempotency-key", "shared")
            .header("x-caller", caller)
            .json(&valid_order())
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 201);
        assert!(!replayed(&response), "{caller} gets a fresh result");
        ids.push(response.json::<Value>().await.expect("json")["id"].clone());
    }
    assert_ne!(ids[0], ids[1]);
    assert_eq!(count(&app, "orders").await, 2);
}

#[tokio::test]
async fn a_key_is_reusable_once_its_retention_lapses() {
    let (app, _) = spawn(&[("APP_IDEMPOTENCY__TTL_MS", "300")]).await;
    let first: Value = app.create_with_key(&valid_order(), "short-lived").await.json().await.expect("json");
    let mut other = valid_order();
    other["note"] = json!("a new request");
    problem(app.create_with_key(&other, "short-lived").await, 422, "idempotency-mismatch").await;
    // Poll (bounded) until the key lapses; no fixed sleep.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let second: Value = loop {
        let response = app.create_with_key(&other, "short-lived").await;
        if response.status() == 201 {
            break response.json().await.expect("json");
        }
        assert_eq!(response.status(), 422, "until it lapses the key stays bound");
        assert!(tokio::time::Instant::now() < deadline, "the key never lapsed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(second["id"], first["id"], "a new order under the reused key");
    assert_eq!(count(&app, "orders").await, 2);
}

#[tokio::test]
async fn in_flight_duplicates_get_409_and_failures_release_the_key() {
    let (app, _) = spawn(&[("APP_HTTP__REQUEST_TIMEOUT_MS", "1500")]).await;
    let id = app.create_ok().await["id"].as_str().expect("id").to_owned();
    let cancel = |key: &'static str| {
        app.client.post(format!("{}/v1/orders/{id}/cancel", app.http)).header("idempotency-key", key).send()
    };
    let lock = lock_order(&app.database_url, &id).await;
    let first = tokio::spawn(cancel("cancel-1"));
    until_blocked_on_lock(&app.database_url).await;
    let duplicate = cancel("cancel-1").await.expect("request");
    assert_eq!(duplicate.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    problem(duplicate, 409, "idempotency-in-flight").await;

    // The first one times out (503): not an outcome to hold the client to.
    problem(first.await.expect("task").expect("request"), 503, "timeout").await;
    drop(lock);
    // The abandoned request releases its marker as it is dropped, just after its 503 went
    // out; until then a retry may still meet 409 + Retry-After, which clients honour.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let retry = loop {
        let response = cancel("cancel-1").await.expect("request");
        if response.status() != 409 || tokio::time::Instant::now() >= deadline {
            break response;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(retry.status(), 200, "the key was released, so the retry runs");
    assert!(!replayed(&retry));
    assert_eq!(retry.json::<Value>().await.expect("json")["status"], "CANCELLED");
}

fn grpc_request(
    key: Option<&str>,
    caller: Option<&str>,
    customer: &str,
) -> tonic::Request<CreateOrderRequest> {
    let mut request = tonic::Request::new(CreateOrderRequest {
        customer_id: customer.into(),
        items: vec![LineItem { sku: "SKU-1".into(), quantity: 1, unit_price_minor: 100 }],
        currency: "EUR".into(),
        note: None,
    });
    if let Some(key) = key {
        request.metadata_mut().insert("idempotency-key", key.parse().expect("ascii"));
    }
    if let Some(caller) = caller {
        request.metadata_mut().insert("x-caller", caller.parse().expect("ascii"));
    }
    request
}

#[tokio::test]
async fn the_same_rules_hold_over_grpc() {
    let (app, prefix) = spawn(&[("APP_IDEMPOTENCY__IDENTITY_HEADER", "x-caller")]).await;
    let mut client = app.grpc().await;
    let first = client.create_order(grpc_request(Some("g-1"), None, "c1")).await.expect("create");
    assert!(first.metadata().get("idempotent-replayed").is_none());
    let first = first.into_inner().order.expect("order");

    let again = client.create_order(grpc_request(Some("g-1"), None, "c1")).await.expect("replay");
    assert_eq!(again.metadata().get("idempotent-replayed").and_then(|v| v.to_str().ok()), Some("true"));
    assert_eq!(again.into_inner().order.expect("order"), first, "the original response");

    let mismatch = client.create_order(grpc_request(Some("g-1"), None, "c2")).await.expect_err("mismatch");
    assert_eq!(mismatch.code(), Code::FailedPrecondition);
    let missing = client.create_order(grpc_request(None, None, "c1")).await.expect_err("missing");
    assert_eq!(missing.code(), Code::InvalidArgument);
    let long = "k".repeat(300);
    let malformed = client.create_order(grpc_request(Some(&long), None, "c1")).await.expect_err("malformed");
    assert_eq!(malformed.code(), Code::InvalidArgument);

    let other_caller = client.create_order(grpc_request(Some("g-1"), Some("bob"), "c1")).await.expect("bob");
    assert_ne!(
        other_caller.into_inner().order.expect("order").id,
        first.id,
        "another caller's key is its own"
    );

    flush(&prefix).await;
    let backstop = client.create_order(grpc_request(Some("g-1"), None, "c1")).await.expect("backstop");
    assert_eq!(backstop.metadata().get("idempotent-replayed").and_then(|v| v.to_str().ok()), Some("true"));
    assert_eq!(backstop.into_inner().order.expect("order").id, first.id);
    assert_eq!(count(&app, "orders").await, 2);

    // In flight: a table lock holds the first create; the duplicate is ABORTED.
    let mut locker = PgConnection::connect(&app.database_url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut locker).await.expect("begin");
    sqlx::query("LOCK TABLE orders IN EXCLUSIVE MODE").execute(&mut locker).await.expect("lock");
    let mut blocked_client = client.clone();
    let blocked =
        tokio::spawn(async move { blocked_client.create_order(grpc_request(Some("g-2"), None, "c3")).await });
    until_blocked_on_lock(&app.database_url).await;
    let duplicate = client.create_order(grpc_request(Some("g-2"), None, "c3")).await.expect_err("in flight");
    assert_eq!(duplicate.code(), Code::Aborted);
    sqlx::query("COMMIT").execute(&mut locker).await.expect("unlock");
    blocked.await.expect("task").expect("the held create completes");
    assert_eq!(count(&app, "orders").await, 3);

    // CancelOrder takes an optional key: a retried cancel replays instead of FAILED_PRECONDITION.
    let cancel = |key: &str| {
        let mut request =
            tonic::Request::new(orders_service::pb::orders::v1::CancelOrderRequest { id: first.id.clone() });
        request.metadata_mut().insert("idempotency-key", key.parse().expect("ascii"));
        request
    };
    let cancelled = client.cancel_order(cancel("c-1")).await.expect("cancel");
    assert!(cancelled.metadata().get("idempotent-replayed").is_none());
    let retried = client.cancel_order(cancel("c-1")).await.expect("replayed cancel");
    assert_eq!(retried.metadata().get("idempotent-replayed").and_then(|v| v.to_str().ok()), Some("true"));
    assert_eq!(retried.into_inner(), cancelled.into_inner());
    let fresh_key = client.cancel_order(cancel("c-2")).await.expect_err("a new key really cancels again");
    assert_eq!(fresh_key.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn over_grpc_a_hundred_concurrent_calls_and_a_dead_redis_still_make_one_order_per_key() {
    let (app, _) = spawn(&[]).await;
    let client = app.grpc().await;
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.create_order(grpc_request(Some("g-storm"), None, "c1")).await })
        })
        .collect();
    let mut fresh = 0;
    for call in calls {
        match call.await.expect("task") {
            Ok(response) if response.metadata().get("idempotent-replayed").is_none() => fresh += 1,
            Ok(_) => {}
            Err(status) => assert_eq!(status.code(), Code::Aborted, "only replays or in-flight conflicts"),
        }
    }
    assert_eq!(fresh, 1);
    assert_eq!(count(&app, "orders").await, 1);

    let dead = format!("redis://127.0.0.1:{}", crate::kafka::free_port());
    let (app, _) = spawn(&[("APP_REDIS__URL", &dead)]).await;
    let mut client = app.grpc().await;
    let first = client.create_order(grpc_request(Some("g-dead"), None, "c1")).await.expect("create");
    let again = client.create_order(grpc_request(Some("g-dead"), None, "c1")).await.expect("backstop replay");
    assert_eq!(again.metadata().get("idempotent-replayed").and_then(|v| v.to_str().ok()), Some("true"));
    assert_eq!(again.into_inner().order, first.into_inner().order, "the original order, from the database");
    assert_eq!(count(&app, "orders").await, 1);
}
