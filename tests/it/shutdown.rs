//! Graceful shutdown of the real binary: SIGTERM while a request is in flight.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::support::{eventually, fresh_postgres, lock_order, until_blocked_on_lock, valid_order};

/// Starts `orders-service` with JSON logs on port 0 and reads its addresses from the
/// "listening" log line.
fn start_binary(database_url: &str) -> (std::process::Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_orders-service"))
        .env_clear()
        .env("APP_HTTP__ADDR", "127.0.0.1:0")
        .env("APP_GRPC__ADDR", "127.0.0.1:0")
        .env("APP_ADMIN__ADDR", "127.0.0.1:0")
        .env("APP_DATABASE__URL", database_url)
        .env("APP_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let http = loop {
        let line = lines.next().expect("binary logged its addresses").expect("utf-8 log line");
        let Ok(log) = serde_json::from_str::<Value>(&line) else { continue };
        if log["message"] == "orders-service listening" {
            break log["http"].as_str().expect("http addr").parse().expect("socket addr");
        }
    };
    std::thread::spawn(move || lines.for_each(drop)); // keep draining logs
    (child, http)
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_zero() {
    let database_url = fresh_postgres().await;
    let (mut child, http) = start_binary(&database_url);
    let client = reqwest::Client::new();
    let created: Value = client
        .post(format!("http://{http}/v1/orders"))
        .header("idempotency-key", "shutdown-test")
        .json(&valid_order())
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id").to_owned();

    // Hold the order's row lock so the cancel below is provably in flight.
    let mut blocker = lock_order(&database_url, &id).await;
    let in_flight = tokio::spawn({
        let url = format!("http://{http}/v1/orders/{id}/cancel");
        async move { client.post(url).send().await }
    });
    until_blocked_on_lock(&database_url).await;

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    eventually(Duration::from_secs(10), "new connections to be refused", || async {
        tokio::net::TcpStream::connect(http).await.is_err()
    })
    .await;

    sqlx::query("COMMIT").execute(&mut blocker).await.expect("release the lock");
    let response = in_flight.await.expect("task").expect("the in-flight request completed");
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.expect("json")["status"], "CANCELLED");

    let exit = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
}
