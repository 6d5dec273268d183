//! Deprecation and sunset through the real listeners: the headers to the byte, 410 Gone and
//! UNIMPLEMENTED after the sunset (without running the handler), the served OpenAPI
//! document following the table in force, and calls counted per caller.

#![allow(deprecated)] // GetOrderStatus is deprecated in the proto; calling it is the point.

use orders_service::pb::orders::v1::{GetOrderRequest, GetOrderStatusRequest, OrderStatus};
use serde_json::Value;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{TestApp, problem};

const LINK: &str = "https://docs.example/migrate-to-get-order";

/// A table with the legacy operations deprecated at 2026-12-01 and sunset at `sunset`.
fn table(sunset: &str) -> String {
    serde_json::json!([
        {"operation": "GET /v1/orders/{id}/status", "deprecation": "2026-12-01T00:00:00Z",
         "sunset": sunset, "link": LINK, "successor": "/v1/orders/{id}"},
        {"operation": "/orders.v1.OrderService/GetOrderStatus", "deprecation": "2026-12-01T00:00:00Z",
         "sunset": sunset, "link": LINK, "successor": "/orders.v1.OrderService/GetOrder"},
    ])
    .to_string()
}

async fn app(sunset: &str) -> TestApp {
    let table = table(sunset);
    TestApp::spawn_configured(&[
        ("APP_DEPRECATIONS", &table),
        ("APP_IDEMPOTENCY__IDENTITY_HEADER", "x-caller"),
    ])
    .await
}

fn values<'a>(headers: impl IntoIterator<Item = &'a http::HeaderValue>) -> Vec<&'a str> {
    headers.into_iter().map(|v| v.to_str().expect("ascii")).collect()
}

#[tokio::test]
async fn a_deprecated_route_works_and_says_so_to_the_byte() {
    let app = app("2099-01-01T00:00:00Z").await;
    let order = app.create_ok().await;
    let id = order["id"].as_str().expect("id");
    let response = app
        .client
        .get(format!("{}/v1/orders/{id}/status", app.http))
        .header("x-caller", "web-app")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(values(headers.get_all("deprecation")), ["@1796083200"]);
    assert_eq!(values(headers.get_all("sunset")), ["Thu, 01 Jan 2099 00:00:00 GMT"]);
    assert_eq!(
        values(headers.get_all("link")),
        [
            format!("<{LINK}>; rel=\"deprecation\""),
            format!("<{LINK}>; rel=\"sunset\""),
            format!("</v1/orders/{id}>; rel=\"successor-version\""),
        ]
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body, serde_json::json!({"id": id, "status": "PENDING"}));

    // The successor is not deprecated, and says nothing.
    let successor = app.get(&format!("/v1/orders/{id}")).await;
    assert_eq!(successor.status(), 200);
    assert!(successor.headers().get("deprecation").is_none() && successor.headers().get("link").is_none());

    // Errors of the deprecated route carry the headers too; calls are counted per caller.
    let missing = app.get(&format!("/v1/orders/{}/status", uuid::Uuid::now_v7())).await;
    assert_eq!(missing.headers()["deprecation"], "@1796083200");
    problem(missing, 404, "not-found").await;
    let metrics = app.metrics().await;
    for (caller, n) in [("web-app", 1), ("anonymous", 1)] {
        let line = format!(
            "deprecated_calls_total{{caller=\"{caller}\",operation=\"GET /v1/orders/{{id}}/status\",outcome=\"served\"}} {n}"
        );
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
}

#[tokio::test]
async fn after_the_sunset_the_route_is_gone_without_running() {
    let app = app("2026-12-01T00:00:01Z").await;
    let order = app.create_ok().await;
    let id = order["id"].as_str().expect("id");
    let response = app.get(&format!("/v1/orders/{id}/status")).await;
    assert_eq!(values(response.headers().get_all("sunset")), ["Tue, 01 Dec 2026 00:00:01 GMT"]);
    assert_eq!(response.headers().get_all("link").iter().count(), 3);
    let body = problem(response, 410, "gone").await;
    assert_eq!(
        body["detail"],
        format!(
            "GET /v1/orders/{{id}}/status was retired at 2026-12-01T00:00:01Z, use /v1/orders/{{id}}; see {LINK}"
        )
    );
    // The handler does not run: an unknown order is gone too, not 404, and a malformed
    // id is not even parsed.
    problem(app.get(&format!("/v1/orders/{}/status", uuid::Uuid::now_v7())).await, 410, "gone").await;
    problem(app.get("/v1/orders/not-a-uuid/status").await, 410, "gone").await;
    assert!(app.metrics().await.contains(
        "deprecated_calls_total{caller=\"anonymous\",operation=\"GET /v1/orders/{id}/status\",outcome=\"gone\"} 3"
    ));
    // Everything else still works.
    assert_eq!(app.get(&format!("/v1/orders/{id}")).await.status(), 200);
}

#[tokio::test]
async fn grpc_carries_the_same_metadata_and_is_unimplemented_after_the_sunset() {
    let app = app("2099-01-01T00:00:00Z").await;
    let order = app.create_ok().await;
    let id = order["id"].as_str().expect("id").to_owned();
    let mut client = app.grpc().await;
    let response = client.get_order_status(GetOrderStatusRequest { id: id.clone() }).await.expect("served");
    let metadata = response.metadata().clone().into_headers();
    assert_eq!(values(metadata.get_all("deprecation")), ["@1796083200"]);
    assert_eq!(values(metadata.get_all("sunset")), ["Thu, 01 Jan 2099 00:00:00 GMT"]);
    assert_eq!(
        values(metadata.get_all("link")),
        [
            format!("<{LINK}>; rel=\"deprecation\""),
            format!("<{LINK}>; rel=\"sunset\""),
            "</orders.v1.OrderService/GetOrder>; rel=\"successor-version\"".to_owned(),
        ]
    );
    let status = response.into_inner();
    assert_eq!((status.id.as_str(), status.status), (id.as_str(), OrderStatus::Pending as i32));
    let plain = client.get_order(GetOrderRequest { id: id.clone() }).await.expect("served");
    assert!(plain.metadata().get("deprecation").is_none());

    let gone = app_gone_grpc(&id).await;
    assert_eq!(gone.code(), Code::Unimplemented, "{gone:?}");
    assert_eq!(gone.metadata().get("sunset").expect("sunset metadata"), "Tue, 01 Dec 2026 00:00:01 GMT");
    let info = gone.get_details_error_info().expect("google.rpc.ErrorInfo");
    assert_eq!((info.reason.as_str(), info.domain.as_str()), ("API_SUNSET", "orders-service"));
    assert_eq!(info.metadata["successor"], "/orders.v1.OrderService/GetOrder");
    assert_eq!(info.metadata["sunset"], "2026-12-01T00:00:01Z");
}

/// Calls GetOrderStatus on an instance whose sunset has passed.
async fn app_gone_grpc(id: &str) -> tonic::Status {
    let app = app("2026-12-01T00:00:01Z").await;
    let mut client = app.grpc().await;
    let gone = client.get_order_status(GetOrderStatusRequest { id: id.to_owned() }).await.expect_err("gone");
    assert!(app.metrics().await.contains(
        "deprecated_calls_total{caller=\"anonymous\",operation=\"/orders.v1.OrderService/GetOrderStatus\",outcome=\"gone\"} 1"
    ));
    gone
}

#[tokio::test]
async fn the_served_document_follows_the_table_in_force() {
    let table = serde_json::json!([{"operation": "POST /v1/orders/{id}/cancel", "deprecation": "2026-12-01T00:00:00Z",
        "sunset": "2099-01-01T00:00:00Z", "link": LINK}])
    .to_string();
    let app = TestApp::spawn_configured(&[("APP_DEPRECATIONS", &table)]).await;
    let doc: Value = app.get("/openapi.json").await.json().await.expect("json");
    let cancel = &doc["paths"]["/v1/orders/{id}/cancel"]["post"];
    assert_eq!(cancel["deprecated"], true);
    assert!(cancel["responses"]["410"].is_object(), "{cancel}");
    assert!(cancel["responses"]["200"]["headers"]["Sunset"].is_object(), "{cancel}");
    // Not in this table: the legacy route is an ordinary operation here.
    assert!(doc["paths"]["/v1/orders/{id}/status"]["get"].get("deprecated").is_none());
}
