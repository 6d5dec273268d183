//! gRPC end-to-end tests over a real socket against PostgreSQL.

use orders_service::pb::orders::v1::{
    CancelOrderRequest, CreateOrderRequest, GetOrderRequest, LineItem, ListOrdersRequest, OrderStatus,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::TestApp;

/// A CreateOrder request with a fresh `idempotency-key`.
fn keyed(message: CreateOrderRequest) -> tonic::Request<CreateOrderRequest> {
    let mut request = tonic::Request::new(message);
    let key = crate::support::fresh_key().parse().expect("ascii metadata");
    request.metadata_mut().insert("idempotency-key", key);
    request
}

fn valid_request() -> CreateOrderRequest {
    CreateOrderRequest {
        customer_id: "cust-1".into(),
        items: vec![
            LineItem { sku: "SKU-1".into(), quantity: 2, unit_price_minor: 1250 },
            LineItem { sku: "SKU-2".into(), quantity: 1, unit_price_minor: 99 },
        ],
        currency: "EUR".into(),
        note: None,
    }
}

#[tokio::test]
async fn create_get_list_cancel() {
    let app = TestApp::spawn().await;
    let mut client = app.grpc().await;
    let created =
        client.create_order(keyed(valid_request())).await.expect("create").into_inner().order.expect("order");
    assert_eq!(created.status(), OrderStatus::Pending);
    assert_eq!(created.total_minor, 2599);
    assert_eq!(created.note, None);

    let fetched = client.get_order(GetOrderRequest { id: created.id.clone() }).await.expect("get");
    assert_eq!(fetched.into_inner().order.as_ref(), Some(&created));

    for _ in 0..2 {
        client.create_order(keyed(valid_request())).await.expect("create");
    }
    let first = client
        .list_orders(ListOrdersRequest { page_size: 2, page_token: String::new() })
        .await
        .expect("list");
    let first = first.into_inner();
    assert_eq!(first.orders.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = client
        .list_orders(ListOrdersRequest { page_size: 2, page_token: first.next_page_token })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(second.orders.len(), 1);
    assert_eq!(second.orders[0].id, created.id, "the oldest order is last");
    assert!(second.next_page_token.is_empty());

    let cancelled = client.cancel_order(CancelOrderRequest { id: created.id.clone() }).await.expect("cancel");
    assert_eq!(cancelled.into_inner().order.expect("order").status(), OrderStatus::Cancelled);
    let again = client.cancel_order(CancelOrderRequest { id: created.id }).await.expect_err("second cancel");
    assert_eq!(again.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn errors_map_to_precise_codes_with_field_details() {
    let app = TestApp::spawn().await;
    let mut client = app.grpc().await;

    let missing =
        client.get_order(GetOrderRequest { id: uuid::Uuid::now_v7().to_string() }).await.expect_err("404");
    assert_eq!(missing.code(), Code::NotFound);

    let bad_id = client.get_order(GetOrderRequest { id: "nope".into() }).await.expect_err("bad id");
    assert_eq!(bad_id.code(), Code::InvalidArgument);
    assert_eq!(bad_id.get_details_bad_request().expect("details").field_violations[0].field, "id");

    let mut request = valid_request();
    request.customer_id = String::new();
    request.items[1].quantity = 0;
    request.currency = "usd".into();
    let invalid = client.create_order(keyed(request)).await.expect_err("invalid");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let fields: Vec<String> = invalid
        .get_details_bad_request()
        .expect("details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["customer_id", "currency", "items[1].quantity"]);

    let mut empty = valid_request();
    empty.items.clear();
    let no_items = client.create_order(keyed(empty)).await.expect_err("no items");
    assert_eq!(no_items.get_details_bad_request().expect("details").field_violations[0].field, "items");

    let token = client
        .list_orders(ListOrdersRequest { page_size: 0, page_token: "garbage".into() })
        .await
        .expect_err("bad token");
    assert_eq!(token.code(), Code::InvalidArgument);
    let size = client
        .list_orders(ListOrdersRequest { page_size: -3, page_token: String::new() })
        .await
        .expect_err("size");
    assert_eq!(size.get_details_bad_request().expect("details").field_violations[0].field, "page_size");

    let listed = client.list_orders(ListOrdersRequest::default()).await.expect("list").into_inner();
    assert!(listed.orders.is_empty(), "nothing invalid was stored");

    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"grpc_requests_total{code="5",method="/orders.v1.OrderService/GetOrder"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"grpc_requests_total{code="3",method="/orders.v1.OrderService/CreateOrder"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn oversize_messages_are_rejected() {
    let app = TestApp::spawn().await;
    let mut client = app.grpc().await;
    let mut request = valid_request();
    request.note = Some("x".repeat(2 * 1024 * 1024));
    let err = client.create_order(keyed(request)).await.expect_err("too large");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let app = TestApp::spawn().await;
    let mut client = ServerReflectionClient::new(app.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        client.server_reflection_info(tokio_stream::once(request)).await.expect("reflection").into_inner();
    let response = responses.message().await.expect("stream").expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected {response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"orders.v1.OrderService".to_owned()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");
}

#[tokio::test]
async fn the_clients_grpc_timeout_is_honoured() {
    let app = TestApp::spawn().await;
    let mut client = app.grpc().await;
    let created =
        client.create_order(keyed(valid_request())).await.expect("create").into_inner().order.expect("order");
    let lock = app.lock_order(&created.id).await;
    let mut request = tonic::Request::new(CancelOrderRequest { id: created.id.clone() });
    let deadline = std::time::Duration::from_millis(200);
    request.set_timeout(deadline);
    let mut cancelling = client.clone();
    let call = tokio::spawn(async move { cancelling.cancel_order(request).await });
    // The server handler is running (blocked on the row lock), so it received the request
    // by now and its own grpc-timeout deadline ends within `deadline` from here.
    crate::support::until_blocked_on_lock(&app.database_url).await;
    let server_deadline = tokio::time::Instant::now() + deadline;
    let err = call.await.expect("task").expect_err("deadline");
    assert_eq!(err.code(), Code::Cancelled, "{err:?}");
    // The client enforces the deadline too and may give up first: release the lock only
    // once the server's deadline has provably passed as well.
    tokio::time::sleep_until(server_deadline + std::time::Duration::from_millis(50)).await;
    drop(lock);
    let stored = client.get_order(GetOrderRequest { id: created.id }).await.expect("get").into_inner();
    assert_eq!(stored.order.expect("order").status(), OrderStatus::Pending, "rolled back");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"grpc_requests_total{code="1",method="/orders.v1.OrderService/CancelOrder"} 1"#),
        "calls cut short by their deadline are counted: {metrics}"
    );
}

#[tokio::test]
async fn behind_a_connection_balancing_service_an_aged_connection_moves_calls_to_another_replica() {
    use orders_service::pb::orders::v1::{GetOrderRequest, order_service_client::OrderServiceClient};
    let database = crate::support::fresh_postgres().await;
    let config = [
        ("APP_ROLES", "api"),
        ("APP_GRPC__MAX_CONNECTION_AGE_MS", "300"),
        ("APP_GRPC__MAX_CONNECTION_AGE_GRACE_MS", "1000"),
    ];
    let (a, b) =
        (TestApp::start_on(database.clone(), &config).await, TestApp::start_on(database, &config).await);
    let id = a.create_ok().await["id"].as_str().expect("id").to_owned();
    let service = crate::proxy::RoundRobin::start(vec![a.grpc_addr, b.grpc_addr]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", service.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    let mut client = OrderServiceClient::new(channel);
    let started = std::time::Instant::now();
    let (mut calls, mut retried) = (0, 0);
    while started.elapsed() < std::time::Duration::from_secs(3) {
        // grpc-go, -java and -python retry a call that raced a GOAWAY transparently; tonic's
        // client does not yet (hyperium/tonic#2185), so this client retries such a call once.
        let first = client.get_order(GetOrderRequest { id: id.clone() }).await;
        if let Err(status) = first {
            assert!(matches!(status.code(), Code::Unknown | Code::Unavailable), "{status:?}");
            retried += 1;
            client.get_order(GetOrderRequest { id: id.clone() }).await.expect("the retry succeeds");
        }
        calls += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let served = |metrics: String| {
        let series = "grpc_requests_total{code=\"0\",method=\"/orders.v1.OrderService/GetOrder\"}";
        crate::support::sample(&metrics, series).map_or(0, |v| v as u64)
    };
    let (on_a, on_b) = (served(a.metrics().await), served(b.metrics().await));
    eprintln!(
        "{calls} calls over one client channel: {on_a} on replica A, {on_b} on replica B, {retried} retried"
    );
    assert!(on_a > 0 && on_b > 0, "both replicas served calls: {on_a} / {on_b}");
    let served = on_a + on_b;
    assert!(
        served >= calls && served <= calls + retried,
        "{served} served for {calls} calls ({retried} retried)"
    );
}
