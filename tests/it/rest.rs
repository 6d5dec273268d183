//! REST end-to-end tests over a real socket against PostgreSQL.

use serde_json::{Value, json};

use crate::support::{TestApp, fresh_key, problem, valid_order};

#[tokio::test]
async fn create_then_get_round_trips() {
    let app = TestApp::spawn().await;
    let response = app.create(&valid_order()).await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().expect("ascii").to_owned();
    let created: Value = response.json().await.expect("json");
    assert_eq!(location, format!("/v1/orders/{}", created["id"].as_str().expect("id")));
    assert_eq!(created["status"], "PENDING");
    assert_eq!(created["total_minor"], 2 * 1250 + 99);
    assert_eq!(created["version"], 1);
    assert_eq!(created["note"], "leave at the door");

    let fetched = app.get(&location).await;
    assert_eq!(fetched.status(), 200);
    assert_eq!(
        fetched.json::<Value>().await.expect("json"),
        created,
        "GET returns exactly what POST returned"
    );
}

#[tokio::test]
async fn list_pages_through_every_order_newest_first() {
    let app = TestApp::spawn().await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(app.create_ok().await["id"].as_str().expect("id").to_owned());
    }
    created.reverse(); // newest first

    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &token {
            Some(t) => format!("/v1/orders?page_size=2&page_token={t}"),
            None => "/v1/orders?page_size=2".to_owned(),
        };
        let page: Value = app.get(&path).await.json().await.expect("json");
        pages += 1;
        let orders = page["orders"].as_array().expect("orders");
        assert!(orders.len() <= 2);
        seen.extend(orders.iter().map(|o| o["id"].as_str().expect("id").to_owned()));
        match page.get("next_page_token").and_then(Value::as_str) {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created, "every order exactly once, newest first");
}

#[tokio::test]
async fn cancel_once_then_conflict() {
    let app = TestApp::spawn().await;
    let id = app.create_ok().await["id"].as_str().expect("id").to_owned();
    let cancelled = app.post_empty(&format!("/v1/orders/{id}/cancel")).await;
    assert_eq!(cancelled.status(), 200);
    let body: Value = cancelled.json().await.expect("json");
    assert_eq!((body["status"].as_str(), body["version"].as_i64()), (Some("CANCELLED"), Some(2)));

    let again = problem(app.post_empty(&format!("/v1/orders/{id}/cancel")).await, 409, "invalid-state").await;
    assert!(again["detail"].as_str().expect("detail").contains("CANCELLED"), "{again}");
    let stored: Value = app.get(&format!("/v1/orders/{id}")).await.json().await.expect("json");
    assert_eq!(stored["version"], 2, "the rejected cancel changed nothing");
}

#[tokio::test]
async fn unknown_and_malformed_ids() {
    let app = TestApp::spawn().await;
    let missing = uuid::Uuid::now_v7();
    problem(app.get(&format!("/v1/orders/{missing}")).await, 404, "not-found").await;
    problem(app.post_empty(&format!("/v1/orders/{missing}/cancel")).await, 404, "not-found").await;
    let bad = problem(app.get("/v1/orders/not-a-uuid").await, 400, "validation").await;
    assert_eq!(bad["errors"][0]["field"], "id");
    problem(app.post_empty("/v1/orders/12345/cancel").await, 400, "validation").await;
}

/// Applies `edit` to a valid order and expects a 400 naming `field`.
async fn expect_violation(app: &TestApp, field: &str, edit: impl FnOnce(&mut Value)) {
    let mut body = valid_order();
    edit(&mut body);
    let problem = problem(app.create(&body).await, 400, "validation").await;
    let fields: Vec<&str> =
        problem["errors"].as_array().expect("errors").iter().filter_map(|e| e["field"].as_str()).collect();
    assert_eq!(fields, [field], "{problem}");
}

#[tokio::test]
async fn every_validation_rule_names_its_field() {
    let app = TestApp::spawn().await;
    expect_violation(&app, "customer_id", |b| b["customer_id"] = json!("")).await;
    expect_violation(&app, "customer_id", |b| b["customer_id"] = json!("c".repeat(65))).await;
    expect_violation(&app, "items", |b| b["items"] = json!([])).await;
    expect_violation(&app, "items", |b| {
        b["items"] = json!(vec![json!({"sku": "A", "quantity": 1, "unit_price_minor": 1}); 101])
    })
    .await;
    expect_violation(&app, "items[0].quantity", |b| b["items"][0]["quantity"] = json!(0)).await;
    expect_violation(&app, "items[1].quantity", |b| b["items"][1]["quantity"] = json!(1001)).await;
    expect_violation(&app, "items[0].unit_price_minor", |b| b["items"][0]["unit_price_minor"] = json!(-1))
        .await;
    expect_violation(&app, "items[0].sku", |b| b["items"][0]["sku"] = json!("has space")).await;
    expect_violation(&app, "items[0].unit_price_minor", |b| {
        b["items"][0]["unit_price_minor"] = json!(i64::MAX)
    })
    .await;
    expect_violation(&app, "currency", |b| b["currency"] = json!("EURO")).await;
    expect_violation(&app, "note", |b| b["note"] = json!("n".repeat(501))).await;
    // Boundaries that must pass.
    let mut body = valid_order();
    body["customer_id"] = json!("c".repeat(64));
    body["note"] = json!("n".repeat(500));
    body["items"][0]["quantity"] = json!(1000);
    body["items"][1]["unit_price_minor"] = json!(0);
    assert_eq!(app.create(&body).await.status(), 201);
    let listed: Value = app.get("/v1/orders").await.json().await.expect("json");
    assert_eq!(listed["orders"].as_array().expect("orders").len(), 1, "no rejected order was stored");
}

#[tokio::test]
async fn malformed_requests_get_problems_not_500s() {
    let app = TestApp::spawn().await;
    let url = format!("{}/v1/orders", app.http);
    let send = |body: &'static str, content_type: &'static str| {
        app.client
            .post(&url)
            .header("content-type", content_type)
            .header("idempotency-key", fresh_key())
            .body(body)
            .send()
    };
    problem(send("{not json", "application/json").await.expect("request"), 400, "malformed-request").await;
    let missing = problem(
        send(r#"{"currency":"EUR","items":[]}"#, "application/json").await.expect("request"),
        400,
        "malformed-request",
    )
    .await;
    assert!(missing["detail"].as_str().expect("detail").contains("customer_id"), "{missing}");
    let wrong_type =
        r#"{"customer_id":"c","currency":"EUR","items":[{"sku":"A","quantity":"two","unit_price_minor":1}]}"#;
    let typed =
        problem(send(wrong_type, "application/json").await.expect("request"), 400, "malformed-request").await;
    assert!(typed["detail"].as_str().expect("detail").contains("items[0].quantity"), "{typed}");
    problem(send("{}", "text/plain").await.expect("request"), 415, "unsupported-media-type").await;

    let oversize =
        format!(r#"{{"customer_id":"c","currency":"EUR","items":[],"note":"{}"}}"#, "x".repeat(1024 * 1024));
    let response = app
        .client
        .post(&url)
        .header("content-type", "application/json")
        .header("idempotency-key", fresh_key())
        .body(oversize)
        .send()
        .await
        .expect("request");
    problem(response, 413, "payload-too-large").await;

    problem(app.get("/v1/orders?page_size=1000").await, 400, "validation").await;
    problem(app.get("/v1/orders?page_size=abc").await, 400, "malformed-request").await;
    let token = problem(app.get("/v1/orders?page_token=bogus").await, 400, "validation").await;
    assert_eq!(token["errors"][0]["field"], "page_token");
    problem(app.get("/v2/nothing").await, 404, "not-found").await;
    problem(app.client.delete(&url).send().await.expect("request"), 405, "method-not-allowed").await;
}

#[tokio::test]
async fn metrics_are_labelled_by_route_template() {
    let app = TestApp::spawn().await;
    let id = app.create_ok().await["id"].as_str().expect("id").to_owned();
    app.get(&format!("/v1/orders/{id}")).await;
    app.get("/v1/orders/not-a-uuid").await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"http_requests_total{method="POST",route="/v1/orders",status="201"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"http_requests_total{method="GET",route="/v1/orders/{id}",status="200"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"http_requests_total{method="GET",route="/v1/orders/{id}",status="400"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains(&id), "ids never become labels");
}

#[tokio::test]
async fn the_embedded_sqlite_backend_serves_the_same_api() {
    let app = TestApp::spawn_with(crate::support::Backend::Sqlite, false).await;
    let id = app.create_ok().await["id"].as_str().expect("id").to_owned();
    assert_eq!(app.get(&format!("/v1/orders/{id}")).await.status(), 200);
    assert_eq!(app.post_empty(&format!("/v1/orders/{id}/cancel")).await.status(), 200);
    problem(app.post_empty(&format!("/v1/orders/{id}/cancel")).await, 409, "invalid-state").await;
    assert_eq!(app.get("/readyz").await.status(), 200);
}

#[tokio::test]
async fn slow_requests_hit_the_deadline_and_roll_back() {
    let app = crate::support::TestApp::spawn_configured(&[("APP_HTTP__REQUEST_TIMEOUT_MS", "300")]).await;
    let id = app.create_ok().await["id"].as_str().expect("id").to_owned();
    // Hold the row lock so the cancel cannot finish inside its deadline.
    let _lock = app.lock_order(&id).await;
    let response = app.post_empty(&format!("/v1/orders/{id}/cancel")).await;
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    problem(response, 503, "timeout").await;
    drop(_lock);
    let stored: Value = app.get(&format!("/v1/orders/{id}")).await.json().await.expect("json");
    assert_eq!(stored["status"], "PENDING", "the timed-out cancel was rolled back");
}
