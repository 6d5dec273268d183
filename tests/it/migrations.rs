//! Migrations and pools on PostgreSQL: `migrate` is not bound by the service's statement
//! timeout but gives up on a lock after its own timeout, naming who holds it; each role
//! runs on its own pool.

use std::time::Duration;

use orders_service::store;
use sqlx::{Connection, PgConnection};

use crate::support::{TestApp, eventually, fresh_postgres, settings};

/// Holds an ACCESS EXCLUSIVE lock on the migrations table (what a replica migrating, or a
/// long schema change, looks like to another `migrate`), as application `holder`.
async fn hold_migrations_table(url: &str, holder: &str) -> PgConnection {
    let mut conn = PgConnection::connect(&format!("{url}?application_name={holder}")).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut conn).await.expect("begin");
    sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut conn)
        .await
        .expect("lock");
    conn
}

#[tokio::test]
async fn migrations_outwait_the_statement_timeout_and_name_the_lock_holder_when_they_give_up() {
    let database = fresh_postgres().await;
    let patient = settings(&database, &[("APP_DATABASE__STATEMENT_TIMEOUT_MS", "200")]).database;
    let store = store::connect(&patient).await.expect("connect").api;
    store.migrate().await.expect("first migration");

    let mut holder = hold_migrations_table(&database, "schema-change").await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await; // a migration elsewhere taking 1 s
        sqlx::query("COMMIT").execute(&mut holder).await.expect("commit");
    });
    let started = std::time::Instant::now();
    store.migrate().await.expect("waits past the 200 ms statement timeout");
    assert!(started.elapsed() >= Duration::from_millis(900), "it really waited for the lock");
    release.await.expect("released");

    let _held = hold_migrations_table(&database, "long-schema-change").await;
    let impatient = settings(&database, &[("APP_DATABASE__MIGRATION_LOCK_TIMEOUT_MS", "300")]).database;
    let error = store::connect(&impatient).await.expect("connect").api.migrate().await.expect_err("gives up");
    let message = format!("{error:#}");
    assert!(message.contains("APP_DATABASE__MIGRATION_LOCK_TIMEOUT_MS (300ms)"), "{message}");
    assert!(message.contains("long-schema-change"), "names the session holding the lock: {message}");
}

#[tokio::test]
async fn each_role_has_its_own_pool() {
    let database = fresh_postgres().await;
    let app = TestApp::start_on(
        database.clone(),
        &[("APP_DATABASE__RELAY_MAX_CONNECTIONS", "1"), ("APP_DATABASE__INBOX_MAX_CONNECTIONS", "1")],
    )
    .await;
    app.create_ok().await;
    let observer = database.clone();
    let mut conn = PgConnection::connect(&observer).await.expect("connect");
    eventually(Duration::from_secs(10), "every role to have connected", || {
        let url = observer.clone();
        async move {
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let names: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT application_name FROM pg_stat_activity WHERE datname = current_database()",
            )
            .fetch_all(&mut conn)
            .await
            .expect("activity");
            ["api", "relay", "inbox", "notify"]
                .iter()
                .all(|role| names.contains(&format!("orders-service/{role}")))
        }
    })
    .await;
    let per_role: Vec<(String, i64)> = sqlx::query_as(
        "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = current_database()
         AND application_name LIKE 'orders-service/%' GROUP BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .expect("activity");
    for (role, connections) in per_role {
        let limit = match role.as_str() {
            "orders-service/relay" | "orders-service/inbox" => 1,
            "orders-service/notify" => 2,
            _ => 5,
        };
        assert!(
            connections <= limit,
            "{role} holds {connections} connections, more than its pool of {limit}"
        );
    }
}
