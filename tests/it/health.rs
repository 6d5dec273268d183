//! Liveness and readiness, REST and gRPC, including a real database outage through the
//! chaos proxy.

use std::time::Duration;

use serde_json::Value;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{TestApp, eventually, problem, valid_order};

async fn grpc_status(app: &TestApp, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(app.channel().await);
    let response = client.check(HealthCheckRequest { service: service.into() }).await.expect("health check");
    response.into_inner().status()
}

#[tokio::test]
async fn ready_when_the_database_is_migrated() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "ready");
    let names: Vec<&str> =
        body["checks"].as_array().expect("checks").iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["database", "migrations", "shutdown"]);
    eventually(Duration::from_secs(5), "gRPC health SERVING", || async {
        grpc_status(&app, "").await == ServingStatus::Serving
            && grpc_status(&app, "orders.v1.OrderService").await == ServingStatus::Serving
    })
    .await;
}

#[tokio::test]
async fn database_outage_makes_the_service_unready_after_its_grace_then_it_recovers() {
    let app = TestApp::spawn_via_proxy(&[("APP_HEALTH__DATABASE_GRACE_MS", "1000")]).await;
    let proxy = app.proxy.as_ref().expect("proxy");
    assert_eq!(app.create(&valid_order()).await.status(), 201);
    eventually(Duration::from_secs(5), "ready", || async { app.get("/readyz").await.status() == 200 }).await;

    proxy.cut();
    let tolerated = app.get("/readyz").await;
    assert_eq!(tolerated.status(), 200, "a blip does not pull the replica out of load balancing");
    let body: Value = tolerated.json().await.expect("json");
    assert!(body["checks"][0]["detail"].as_str().is_some_and(|d| d.contains("not ready after")), "{body}");
    let mut unready = app.get("/readyz").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while unready.status() == 200 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        unready = app.get("/readyz").await;
    }
    assert_eq!(unready.status(), 503, "not ready once the grace period is over");
    let body: Value = unready.json().await.expect("json");
    assert_eq!(body["checks"][0]["name"], "database");
    assert_eq!(body["checks"][0]["ok"], false);
    assert_eq!(app.get("/healthz").await.status(), 200, "liveness ignores dependencies");
    // Writes fail fast with a retryable problem, not a 500.
    let response = app.create(&valid_order()).await;
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    problem(response, 503, "unavailable").await;
    eventually(Duration::from_secs(5), "gRPC health NOT_SERVING", || async {
        grpc_status(&app, "").await == ServingStatus::NotServing
    })
    .await;

    proxy.restore();
    eventually(Duration::from_secs(10), "/readyz 200 after recovery", || async {
        app.get("/readyz").await.status() == 200
    })
    .await;
    eventually(Duration::from_secs(5), "gRPC health SERVING after recovery", || async {
        grpc_status(&app, "orders.v1.OrderService").await == ServingStatus::Serving
    })
    .await;
    // The database's breaker closes on its next successful probe (reads are probes too).
    eventually(Duration::from_secs(20), "the breaker to close", || async {
        app.get("/v1/orders").await.status() == 200
    })
    .await;
    assert_eq!(app.create(&valid_order()).await.status(), 201);
    let listed: Value = app.get("/v1/orders").await.json().await.expect("json");
    assert_eq!(listed["orders"].as_array().expect("orders").len(), 2, "nothing lost, nothing duplicated");
}

#[tokio::test]
async fn unmigrated_database_is_not_ready() {
    let url = crate::support::fresh_postgres().await;
    let settings = crate::support::settings(&url, &[("APP_DATABASE__MIGRATE_ON_START", "false")]);
    let app = orders_service::app::App::build(settings).await.expect("builds without migrating");
    let http = format!("http://{}", app.http_addr());
    let stop = app.shutdown_token();
    tokio::spawn(app.run_until_stopped());
    let response = reqwest::get(format!("{http}/readyz")).await.expect("readyz");
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["checks"][1]["name"], "migrations");
    assert_eq!(body["checks"][1]["ok"], false);
    stop.cancel();
}

#[tokio::test]
async fn shutdown_flips_grpc_health_before_the_listeners_close() {
    let app = TestApp::spawn().await;
    let mut client = HealthClient::new(app.channel().await);
    eventually(Duration::from_secs(5), "SERVING", || async {
        grpc_status(&app, "").await == ServingStatus::Serving
    })
    .await;
    let mut watch =
        client.watch(HealthCheckRequest { service: String::new() }).await.expect("watch").into_inner();
    assert_eq!(watch.message().await.expect("stream").expect("first").status(), ServingStatus::Serving);
    app.shutdown.cancel();
    let next = watch.message().await.expect("stream").expect("update");
    assert_eq!(next.status(), ServingStatus::NotServing, "the next update is the shutdown flip");
}
