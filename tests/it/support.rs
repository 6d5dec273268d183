//! Test harness: a fresh database per test and the service started on port 0.

use std::{future::Future, net::SocketAddr, time::Duration};

use orders_service::{app::App, config::Settings, pb::orders::v1::order_service_client::OrderServiceClient};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::proxy::ChaosProxy;

/// Administrative connection string for creating per-test databases.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Creates an empty PostgreSQL database named `orders_test_<uuid>` and returns its URL.
/// `scripts/test.sh` drops leftovers of earlier runs.
pub async fn fresh_postgres() -> String {
    let admin = admin_url();
    let name = format!("orders_test_{}", uuid::Uuid::now_v7().simple());
    let mut conn = PgConnection::connect(&admin).await.expect("connect to TEST_DATABASE_URL");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create test database");
    with_database(&admin, &name)
}

/// Replaces the database name (the URL path) in a postgres URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// Replaces host:port in a postgres URL (to route it through a proxy).
pub fn with_host(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("url has a scheme");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@")).unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}/{path}")
}

/// host:port of a postgres URL.
pub fn host_of(url: &str) -> SocketAddr {
    let rest = url.split_once("://").expect("scheme").1;
    let authority = rest.split('/').next().expect("authority");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hostport = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:5432") };
    std::net::ToSocketAddrs::to_socket_addrs(&hostport)
        .expect("resolvable database host")
        .find(SocketAddr::is_ipv4)
        .expect("an IPv4 address for the database host")
}

/// Settings for a test instance: every port 0, fast health checks.
pub fn settings(database_url: &str, extra: &[(&str, &str)]) -> Settings {
    let mut vars = vec![
        ("APP_HTTP__ADDR", "127.0.0.1:0"),
        ("APP_GRPC__ADDR", "127.0.0.1:0"),
        ("APP_ADMIN__ADDR", "127.0.0.1:0"),
        ("APP_DATABASE__URL", database_url),
        ("APP_DATABASE__MAX_CONNECTIONS", "5"),
        ("APP_DATABASE__ACQUIRE_TIMEOUT_MS", "500"),
        ("APP_HEALTH__CHECK_INTERVAL_MS", "100"),
        ("APP_HEALTH__CHECK_TIMEOUT_MS", "1000"),
        // One test broker: topics the service creates get one replica.
        ("APP_KAFKA__TOPIC_REPLICATION", "1"),
    ];
    vars.extend_from_slice(extra);
    Settings::from_vars(vars.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())))
        .expect("valid test settings")
}

/// A running service instance.
pub struct TestApp {
    /// `http://127.0.0.1:<port>` of the REST listener.
    pub http: String,
    /// `http://127.0.0.1:<port>` of the admin listener.
    pub admin: String,
    /// The gRPC listener.
    pub grpc_addr: SocketAddr,
    /// The database the instance uses (before any proxy).
    pub database_url: String,
    /// HTTP client.
    pub client: reqwest::Client,
    /// Cancelling it shuts the instance down.
    pub shutdown: CancellationToken,
    /// Kept alive for instances that reach the database through a proxy.
    pub proxy: Option<ChaosProxy>,
    _sqlite_dir: Option<tempfile::TempDir>,
}

/// Which store a test instance uses.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// A fresh PostgreSQL database.
    Postgres,
    /// A fresh SQLite file.
    Sqlite,
}

impl TestApp {
    /// Starts an instance on a fresh PostgreSQL database.
    pub async fn spawn() -> Self {
        Self::spawn_with(Backend::Postgres, false).await
    }

    /// Starts an instance on a fresh PostgreSQL database with extra settings.
    pub async fn spawn_configured(extra: &[(&str, &str)]) -> Self {
        Self::start(Backend::Postgres, false, extra).await
    }

    /// Starts an instance; with `via_proxy`, its database traffic passes a [`ChaosProxy`].
    pub async fn spawn_with(backend: Backend, via_proxy: bool) -> Self {
        Self::start(backend, via_proxy, &[]).await
    }

    /// Starts an instance on a fresh PostgreSQL database reached through a [`ChaosProxy`].
    pub async fn spawn_via_proxy(extra: &[(&str, &str)]) -> Self {
        Self::start(Backend::Postgres, true, extra).await
    }

    /// Starts an instance on a fresh database of the given kind with extra settings.
    pub async fn spawn_with_settings(backend: Backend, extra: &[(&str, &str)]) -> Self {
        Self::start(backend, false, extra).await
    }

    /// Starts an instance on an existing PostgreSQL database (several instances may share one).
    pub async fn start_on(database_url: String, extra: &[(&str, &str)]) -> Self {
        Self::launch(database_url, None, false, extra).await
    }

    async fn start(backend: Backend, via_proxy: bool, extra: &[(&str, &str)]) -> Self {
        let (database_url, dir) = match backend {
            Backend::Postgres => (fresh_postgres().await, None),
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                (format!("sqlite://{}/orders.db", dir.path().display()), Some(dir))
            }
        };
        Self::launch(database_url, dir, via_proxy, extra).await
    }

    async fn launch(
        database_url: String,
        dir: Option<tempfile::TempDir>,
        via_proxy: bool,
        extra: &[(&str, &str)],
    ) -> Self {
        let (app_url, proxy) = if via_proxy {
            let proxy = ChaosProxy::start(host_of(&database_url)).await;
            (with_host(&database_url, proxy.addr), Some(proxy))
        } else {
            (database_url.clone(), None)
        };
        let app = App::build(settings(&app_url, extra)).await.expect("app builds");
        let (http, admin, grpc_addr) = (app.http_addr(), app.admin_addr(), app.grpc_addr());
        let shutdown = app.shutdown_token();
        tokio::spawn(app.run_until_stopped());
        Self {
            http: format!("http://{http}"),
            admin: format!("http://{admin}"),
            grpc_addr,
            database_url,
            client: reqwest::Client::new(),
            shutdown,
            proxy,
            _sqlite_dir: dir,
        }
    }

    /// A gRPC client connected to this instance.
    pub async fn grpc(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::connect(format!("http://{}", self.grpc_addr)).await.expect("grpc connects")
    }

    /// A gRPC channel to this instance (for the health and reflection clients).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .expect("uri")
            .connect()
            .await
            .expect("connects")
    }

    /// `POST /v1/orders` with a JSON body and a fresh Idempotency-Key.
    pub async fn create(&self, body: &Value) -> reqwest::Response {
        self.create_with_key(body, &fresh_key()).await
    }

    /// `POST /v1/orders` with a JSON body and the given Idempotency-Key.
    pub async fn create_with_key(&self, body: &Value, key: &str) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/orders", self.http))
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// Creates a valid order and returns its JSON.
    pub async fn create_ok(&self) -> Value {
        let response = self.create(&valid_order()).await;
        assert_eq!(response.status(), 201);
        response.json().await.expect("json")
    }

    /// `GET` a path on the REST listener.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(format!("{}{path}", self.http)).send().await.expect("request")
    }

    /// `POST` to a path with no body.
    pub async fn post_empty(&self, path: &str) -> reqwest::Response {
        self.client.post(format!("{}{path}", self.http)).send().await.expect("request")
    }

    /// Locks an order's row (PostgreSQL only) until the returned connection is dropped, so
    /// a request that writes it is provably stuck in flight.
    pub async fn lock_order(&self, id: &str) -> PgConnection {
        lock_order(&self.database_url, id).await
    }

    /// `GET` a JSON document from the admin listener.
    pub async fn admin_json(&self, path: &str) -> Value {
        let response = self.client.get(format!("{}{path}", self.admin)).send().await.expect("admin request");
        response.json().await.expect("admin json")
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Locks an order's row in `database_url` until the returned connection is dropped.
pub async fn lock_order(database_url: &str, id: &str) -> PgConnection {
    let mut conn = PgConnection::connect(database_url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut conn).await.expect("begin");
    sqlx::query("SELECT 1 FROM orders WHERE id = $1::uuid FOR UPDATE")
        .bind(id)
        .execute(&mut conn)
        .await
        .expect("lock");
    conn
}

/// Waits until one session of `database_url` waits on a lock: a request is provably stuck
/// behind [`lock_order`] (or a table lock).
pub async fn until_blocked_on_lock(database_url: &str) {
    until_lock_waiters(database_url, 1).await;
}

/// Waits until exactly `n` sessions of `database_url` wait on a lock.
pub async fn until_lock_waiters(database_url: &str, n: i64) {
    let observer = sqlx::PgPool::connect(database_url).await.expect("connect");
    eventually(Duration::from_secs(10), &format!("{n} session(s) to wait on a lock"), || {
        let observer = observer.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&observer)
            .await
            .expect("pg_stat_activity");
            waiting == n
        }
    })
    .await;
}

/// A unique Idempotency-Key.
pub fn fresh_key() -> String {
    format!("test-{}", uuid::Uuid::now_v7())
}

/// A request body that passes every validation rule.
pub fn valid_order() -> Value {
    json!({
        "customer_id": "cust-1",
        "currency": "EUR",
        "items": [
            {"sku": "SKU-1", "quantity": 2, "unit_price_minor": 1250},
            {"sku": "SKU-2", "quantity": 1, "unit_price_minor": 99}
        ],
        "note": "leave at the door"
    })
}

/// The value of one series (`name` or `name{labels}`, exactly as rendered) in a scrape.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A tool the scripts install under `~/.cache/orders-service` (`relative` inside it), or
/// where the environment variable `var` says.
pub fn cached_tool(var: &str, relative: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        format!("{}/.cache/orders-service/{relative}", std::env::var("HOME").unwrap_or_default())
    })
}

/// A server process of a test's own, killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves nothing running.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Blocks until something accepts TCP connections on 127.0.0.1:`port` (at most 10 s).
pub fn until_listening(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes. For conditions that
/// depend on another process or the network; never a fixed sleep.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts a problem+json response and returns its body.
pub async fn problem(response: reqwest::Response, status: u16, slug: &str) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["type"], format!("urn:problem-type:orders:{slug}"), "{body}");
    assert_eq!(body["status"], status);
    body
}
