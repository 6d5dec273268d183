//! The admin port's token: endpoints that change data (dead-letter replay, bus injection)
//! answer 401 with a `WWW-Authenticate` challenge without the right bearer token; listings
//! and `/metrics` stay open on the admin address.

use serde_json::{Value, json};

use crate::support::TestApp;

const TOKEN: &str = "test-admin-token-0123456789";

#[tokio::test]
async fn changing_data_on_the_admin_port_needs_the_token_reading_does_not() {
    let app = TestApp::spawn_configured(&[("APP_ADMIN__TOKEN", TOKEN)]).await;
    let replay = format!("{}/admin/outbox/dead-letters/1/replay", app.admin);
    for (authorization, detail) in [
        (None, "this admin endpoint needs the admin token"),
        (Some("Bearer wrong-token-0123456789"), "the admin token is wrong"),
        (Some(&format!("Basic {TOKEN}")[..]), "this admin endpoint needs the admin token"),
    ] {
        let mut request = app.client.post(&replay);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), 401, "{authorization:?}");
        assert_eq!(
            response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()),
            Some(r#"Bearer realm="orders-service-admin""#)
        );
        let problem: Value = response.json().await.expect("problem");
        assert_eq!(problem["type"], "urn:problem-type:orders:unauthenticated");
        assert_eq!(problem["detail"], detail);
    }
    // With the token the request runs: there is no dead letter 1.
    let response = app.client.post(&replay).bearer_auth(TOKEN).send().await.expect("request");
    assert_eq!(response.status(), 404);

    // Injection into the embedded bus is guarded the same way.
    let inject = format!("{}/admin/bus/payments.events", app.admin);
    let event = json!({"type": "payments.events.v1.PaymentFailed", "key": "k",
                       "data": {"paymentId": "p", "orderId": "01938f6e-4c2a-7b3e-9d41-6a2f0c5e8b17", "reason": "declined"}});
    let response = app.client.post(&inject).json(&event).send().await.expect("request");
    assert_eq!(response.status(), 401);

    // Reading needs no token.
    for path in ["/metrics", "/admin/outbox/dead-letters", "/admin/inbox/rejections"] {
        let response = app.client.get(format!("{}{path}", app.admin)).send().await.expect("request");
        assert_eq!(response.status(), 200, "{path}");
    }
}
