//! The committed `openapi.yaml` is the REST contract clients are generated from: it must
//! equal the document generated from the code, and every operation in it must be served.

use serde_json::Value;

use crate::support::TestApp;

const COMMITTED: &str = include_str!("../../openapi.yaml");

#[test]
fn committed_openapi_matches_the_code() {
    let generated = orders_service::http::openapi_yaml().expect("yaml");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"), &generated)
            .expect("write openapi.yaml");
        return;
    }
    assert!(
        generated == COMMITTED,
        "openapi.yaml is stale: run `UPDATE_OPENAPI=1 cargo test committed_openapi` and commit the result"
    );
}

#[tokio::test]
async fn every_documented_operation_is_served() {
    let app = TestApp::spawn().await;
    let served: Value = app.get("/openapi.json").await.json().await.expect("json");
    let paths = served["paths"].as_object().expect("paths");
    let mut operations = 0;
    for (path, item) in paths {
        for method in item.as_object().expect("path item").keys() {
            // A malformed id proves the route exists: it reaches the handler's validation.
            let url = format!("{}{}", app.http, path.replace("{id}", "not-a-uuid"));
            let request = app.client.request(method.to_uppercase().parse().expect("method"), &url);
            let request = if method == "post" { request.json(&serde_json::json!({})) } else { request };
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert!(
                status != 405
                    && !(status == 404 && body["detail"].as_str().is_some_and(|d| d.starts_with("route "))),
                "{method} {path} is documented but not served ({status})"
            );
            operations += 1;
        }
    }
    assert_eq!(operations, 7);
}
