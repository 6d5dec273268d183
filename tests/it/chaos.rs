//! The chaos ledger: the evidence behind the README's guarantees.
//!
//! Three replicas of the real binary (api, relay and consumer roles each) run on fixed
//! 127.0.0.1 ports behind nginx (`proxy_pass` for REST, `grpc_pass` for gRPC: the stand-in
//! for a Kubernetes Service or a mesh) and share a private PostgreSQL cluster, a private
//! Redis and a private broker, the last two behind the fault proxy. Clients create and
//! cancel orders over REST and gRPC at a steady rate, retrying failures with the same
//! Idempotency-Key as a real client would; a stand-in payments service publishes
//! `PaymentCaptured` (some twice, with poison messages in between). Meanwhile, once per
//! cycle: `kill -9` of a replica and its restart, the broker unreachable for 20 s, a
//! PostgreSQL restart, a Redis `FLUSHALL`, Redis blackholed for 10 s.
//!
//! Afterwards every event on the topic (the ledger) is checked against the database:
//! nothing lost, no effect twice, no key with two orders, per-order event order, partitions
//! spread over the replicas and taken over within one renewal period and a second of the
//! lease expiry, client errors only inside fault windows and all retryable, every poison
//! message on the DLQ.
//!
//! `CHAOS_CYCLES` (default 1, about 90 s of load) repeats the fault cycle; `CHAOS_LEDGER`
//! names a file the printed ledger is also written to (`scripts/replicas.sh` sets both);
//! `CHAOS_KAFKA_PROPERTIES` and `CHAOS_LOG_LEVEL` pass librdkafka properties and a log
//! filter to the replicas (`debug=cgrp` and `info,librdkafka=debug` show the group's state);
//! the replicas run with a 10 s group session.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use orders_service::{
    backoff::Backoff,
    pb::orders::v1::{
        CancelOrderRequest, CreateOrderRequest, LineItem, order_service_client::OrderServiceClient,
    },
    publish::{KafkaPublisher, Publisher},
};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::sync::mpsc;
use tonic::{Code, transport::Channel};

use crate::{
    cluster::PgCluster,
    inbox::{capture, event},
    kafka::{self, PrivateBroker, Tail, free_port},
    proxy::{ChaosProxy, Mode},
    support::{Reaped, cached_tool, eventually, sample, until_listening, valid_order},
};

const REPLICAS: usize = 3;
/// `APP_OUTBOX__PARTITIONS` (the default).
const PARTITIONS: i64 = 16;
const LEASE_TTL: Duration = Duration::from_secs(5);
/// In-flight markers of a killed replica block a retry with the same key this long.
const LOCK_TTL: Duration = Duration::from_secs(6);
/// Client-visible errors count as inside a fault window until this long after it ends.
const GRACE: Duration = Duration::from_secs(2);
/// Creates per second over all clients (4 clients, one every 200 ms each).
const CLIENTS: u64 = 4;
const TICK: Duration = Duration::from_millis(200);
/// How long a client keeps retrying one operation.
const GIVE_UP: Duration = Duration::from_secs(60);
/// Length of one fault cycle; the faults happen at fixed offsets inside it.
const CYCLE: Duration = Duration::from_secs(84);

/// One replica of the binary on fixed ports (a restart keeps them, as a pod keeps its
/// Service); killed when dropped.
struct Replica {
    /// `HOSTNAME`, so its relay id (`<HOSTNAME>-<random>`) says which replica holds a lease.
    name: String,
    http: u16,
    grpc: u16,
    admin: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_orders-service"))
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("HOSTNAME", &self.name)
            .env("APP_HTTP__ADDR", format!("127.0.0.1:{}", self.http))
            .env("APP_GRPC__ADDR", format!("127.0.0.1:{}", self.grpc))
            .env("APP_ADMIN__ADDR", format!("127.0.0.1:{}", self.admin))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("binary starts");
        self.child = Some(child);
    }

    /// `kill -9`: no drain, no lease release, in-flight requests cut.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn ready(&self, http: &reqwest::Client) {
        let url = format!("http://127.0.0.1:{}/readyz", self.http);
        eventually(Duration::from_secs(60), "a replica to become ready", || {
            let request = http.get(&url).send();
            async move { request.await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
    }

    /// A counter or gauge from this replica's scrape, if it answers.
    async fn metric(&self, http: &reqwest::Client, name: &str) -> Option<i64> {
        let scrape = http.get(format!("http://127.0.0.1:{}/metrics", self.admin)).send().await.ok()?;
        sample(&scrape.text().await.ok()?, name).map(|v| v as i64)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nginx in front of the replicas: one process (`master_process off`), so its PID is all
/// there is to stop. Its own errors (no upstream reachable, an upstream that died mid-call)
/// reach gRPC clients as `UNAVAILABLE` trailers, as a mesh answers, not as an HTML page.
struct Nginx {
    _process: Reaped,
    rest: u16,
    grpc: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(replicas: &[Replica]) -> Self {
        let bin = cached_tool("NGINX_BIN", "nginx/usr/sbin/nginx");
        let dir = tempfile::tempdir().expect("tempdir");
        let (rest, grpc) = (free_port(), free_port());
        let servers = |port: fn(&Replica) -> u16| {
            replicas
                .iter()
                .map(|r| format!("server 127.0.0.1:{} max_fails=1 fail_timeout=2s;", port(r)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let d = dir.path().display();
        let conf = format!(
            "master_process off; daemon off; pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  # nginx closes a client connection after 1,000 requests (GOAWAY); tonic reports a call that
  # races the GOAWAY as CANCELLED (hyperium/tonic#2185) instead of retrying it as grpc-go does.
  # That is a client library's behaviour, not one of the faults under test.
  keepalive_requests 1000000;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream orders_rest {{ {rest_servers} keepalive 32; }}
  upstream orders_grpc {{ {grpc_servers} keepalive 32; }}
  server {{ listen 127.0.0.1:{rest};
    location / {{ proxy_pass http://orders_rest; proxy_http_version 1.1; proxy_set_header Connection \"\";
                 proxy_connect_timeout 1s; proxy_read_timeout 15s; }} }}
  server {{ listen 127.0.0.1:{grpc} http2;
    location / {{ grpc_pass grpc://orders_grpc; grpc_connect_timeout 1s; grpc_read_timeout 15s;
                 error_page 502 503 504 = /grpc-unavailable; }}
    location = /grpc-unavailable {{ internal; default_type application/grpc; add_header grpc-status 14;
                 add_header grpc-message \"upstream unavailable\"; add_header content-length 0; return 204; }} }}
}}
",
            rest_servers = servers(|r| r.http),
            grpc_servers = servers(|r| r.grpc),
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("nginx.conf");
        let child = Command::new(&bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("nginx ({bin}; scripts/tools.sh unpacks it): {e}"));
        until_listening(rest, "nginx");
        Self { _process: Reaped(child), rest, grpc, _dir: dir }
    }
}

/// A private Redis (nothing persisted); killed when dropped.
struct Redis {
    _process: Reaped,
    port: u16,
}

impl Redis {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        until_listening(port, "redis-server");
        Self { _process: Reaped(child), port }
    }

    fn flush_all(&self) {
        crate::cluster::run(Command::new("redis-cli").args(["-p", &self.port.to_string(), "FLUSHALL"]));
    }
}

/// One client call as the client saw it.
struct Attempt {
    at: Duration,
    /// `None` for a success; otherwise what failed and whether a client may retry it.
    error: Option<(String, bool)>,
}

/// What went wrong with one attempt.
struct Failure {
    status: String,
    retryable: bool,
    /// The order is not PENDING (a cancel that an earlier attempt already applied).
    invalid_state: bool,
}

/// The clients: REST through nginx's HTTP port, gRPC through its h2c port.
struct Clients {
    t0: Instant,
    http: reqwest::Client,
    rest: String,
    grpc: OrderServiceClient<Channel>,
    attempts: Mutex<Vec<Attempt>>,
    /// Idempotency-Key → every order id a success returned for it.
    keys: Mutex<HashMap<String, HashSet<String>>>,
    cancelled: Mutex<HashSet<String>>,
}

impl Clients {
    fn record(&self, error: Option<&Failure>) {
        let at = self.t0.elapsed();
        let error = error.map(|f| (f.status.clone(), f.retryable));
        self.attempts.lock().expect("attempts").push(Attempt { at, error });
    }

    /// Runs `call(attempt)` until it succeeds, fails for good, or [`GIVE_UP`] passes,
    /// waiting between attempts as the service's own retries do (full jitter, doubling);
    /// every attempt is recorded.
    async fn until_done<T, F, Fut>(&self, mut call: F) -> Result<T, String>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1600)).expect("backoff");
        let deadline = Instant::now() + GIVE_UP;
        let mut attempt = 0;
        // When each failed attempt ended (seconds into the run) and how, for the replica logs.
        let mut history = Vec::new();
        loop {
            attempt += 1;
            let failure = match call(attempt).await {
                Ok(value) => {
                    self.record(None);
                    return Ok(value);
                }
                Err(failure) => failure,
            };
            self.record(Some(&failure));
            history.push(format!("{:.1} s {}", self.t0.elapsed().as_secs_f64(), failure.status));
            if !failure.retryable || Instant::now() >= deadline {
                return Err(format!("{} (attempts: {})", failure.status, history.join("; ")));
            }
            tokio::time::sleep(backoff.delay(attempt)).await;
        }
    }

    async fn rest_failure(response: reqwest::Response) -> Failure {
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or_default();
        let slug =
            body["type"].as_str().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_owned();
        let retryable = matches!(status, 429 | 502 | 503 | 504)
            || (status == 409 && matches!(slug.as_str(), "idempotency-in-flight" | "concurrent-update"));
        Failure {
            status: format!("HTTP {status} {slug}").trim_end().to_owned(),
            retryable,
            invalid_state: slug == "invalid-state",
        }
    }

    fn transport_failure(e: &reqwest::Error) -> Failure {
        Failure { status: format!("transport: {e}"), retryable: true, invalid_state: false }
    }

    fn grpc_failure(status: &tonic::Status) -> Failure {
        // These clients never cancel a call, so CANCELLED is the connection going away under
        // it (a GOAWAY race, tonic#2185): retried, as grpc-go does transparently. So is
        // tonic's own "transport error" (UNKNOWN, no answer from any server: the connection
        // broke): the call may or may not have run, which the Idempotency-Key settles.
        let transport = status.code() == Code::Unknown && status.message() == "transport error";
        let retryable = transport
            || matches!(
                status.code(),
                Code::Unavailable
                    | Code::Aborted
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Cancelled
            );
        Failure {
            status: if retryable {
                format!("gRPC {:?}", status.code())
            } else {
                format!("gRPC {:?}: {}", status.code(), status.message())
            },
            retryable,
            invalid_state: status.code() == Code::FailedPrecondition,
        }
    }

    /// Creates an order under `key`; returns its id and total.
    async fn create(&self, grpc: bool, key: &str) -> Result<(String, i64), String> {
        let created = self
            .until_done(|_| async move {
                if grpc {
                    let mut request = tonic::Request::new(CreateOrderRequest {
                        customer_id: "chaos".into(),
                        items: vec![LineItem { sku: "SKU-1".into(), quantity: 2, unit_price_minor: 1250 }],
                        currency: "EUR".into(),
                        note: None,
                    });
                    request.metadata_mut().insert("idempotency-key", key.parse().expect("ascii key"));
                    request.set_timeout(Duration::from_secs(8));
                    let order =
                        self.grpc.clone().create_order(request).await.map_err(|s| Self::grpc_failure(&s))?;
                    let order = order.into_inner().order.expect("order");
                    Ok((order.id, order.total_minor))
                } else {
                    let response = self
                        .http
                        .post(format!("{}/v1/orders", self.rest))
                        .header("idempotency-key", key)
                        .json(&valid_order())
                        .send()
                        .await
                        .map_err(|e| Self::transport_failure(&e))?;
                    if !response.status().is_success() {
                        return Err(Self::rest_failure(response).await);
                    }
                    let body: Value = response.json().await.map_err(|e| Self::transport_failure(&e))?;
                    Ok((
                        body["id"].as_str().expect("id").to_owned(),
                        body["total_minor"].as_i64().expect("total"),
                    ))
                }
            })
            .await?;
        self.keys.lock().expect("keys").entry(key.to_owned()).or_default().insert(created.0.clone());
        Ok(created)
    }

    /// Cancels `id` under its own Idempotency-Key.
    async fn cancel(&self, grpc: bool, id: &str) -> Result<(), String> {
        let key = format!("cancel-{id}");
        let key = key.as_str();
        self.until_done(|attempt| async move {
            let applied_before = |failure: Failure| match failure {
                // A retry that finds the order cancelled: an earlier attempt applied it.
                Failure { invalid_state: true, .. } if attempt > 1 => Ok(()),
                failure => Err(failure),
            };
            if grpc {
                let mut request = tonic::Request::new(CancelOrderRequest { id: id.to_owned() });
                request.metadata_mut().insert("idempotency-key", key.parse().expect("ascii key"));
                request.set_timeout(Duration::from_secs(8));
                if let Err(status) = self.grpc.clone().cancel_order(request).await {
                    return applied_before(Self::grpc_failure(&status));
                }
            } else {
                let response = self
                    .http
                    .post(format!("{}/v1/orders/{id}/cancel", self.rest))
                    .header("idempotency-key", key)
                    .send()
                    .await
                    .map_err(|e| Self::transport_failure(&e))?;
                if !response.status().is_success() {
                    return applied_before(Self::rest_failure(response).await);
                }
            }
            Ok(())
        })
        .await?;
        self.cancelled.lock().expect("cancelled").insert(id.to_owned());
        Ok(())
    }
}

/// One client: a create every [`TICK`], every fifth order cancelled, every fifth (another
/// one) paid, until `stop`.
async fn client(
    clients: Arc<Clients>,
    index: u64,
    next: Arc<AtomicU64>,
    payments: mpsc::UnboundedSender<(String, i64)>,
    stop: Arc<AtomicBool>,
) {
    let grpc = index % 2 == 1;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let n = next.fetch_add(1, Ordering::Relaxed);
        let key = format!("chaos-{n}");
        let (id, total) =
            clients.create(grpc, &key).await.unwrap_or_else(|e| panic!("create {key} failed for good: {e}"));
        match n % 5 {
            0 => {
                clients.cancel(grpc, &id).await.unwrap_or_else(|e| panic!("cancel {id} failed for good: {e}"))
            }
            1 => payments.send((id, total)).expect("payments running"),
            _ => {}
        }
    }
}

/// What the payments stand-in published.
#[derive(Default)]
struct Published {
    /// Distinct payment ids (`ce_id`s) and the order each pays.
    payments: HashMap<String, String>,
    /// Payments published twice with the same `ce_id`.
    duplicates: usize,
    poison: HashSet<String>,
}

/// The payments service: `PaymentCaptured` for each order it is handed, every fourth one
/// twice, and a poison message (a payload that is not an object) every tenth, keyed like
/// the order so it shares its partition and must not block it.
async fn payments(
    brokers: String,
    topic: String,
    mut orders: mpsc::UnboundedReceiver<(String, i64)>,
) -> Published {
    let publisher = KafkaPublisher::new(&kafka::settings(&brokers)).expect("producer");
    let mut published = Published::default();
    let mut n = 0usize;
    while let Some((order, total)) = orders.recv().await {
        n += 1;
        let id = format!("pay-{order}");
        let mut batch = vec![capture(&topic, &id, &order, total, "EUR")];
        if n.is_multiple_of(4) {
            batch.push(batch[0].clone());
            published.duplicates += 1;
        }
        if n.is_multiple_of(10) {
            let poison = format!("poison-{n}");
            batch
                .insert(0, event(&topic, "payments.events.v1.PaymentCaptured", &poison, &order, json!(null)));
            published.poison.insert(poison);
        }
        // A real producer retries until the broker takes it: same message, same ce_id; a
        // producer that acknowledged nothing for a while is rebuilt (an idempotent producer
        // can be left with state the restored broker no longer has).
        let deadline = Instant::now() + GIVE_UP;
        for round in 1u32.. {
            let results = publisher.publish(batch.clone()).await;
            let failed: Vec<String> =
                results.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
            batch = batch.into_iter().zip(results).filter(|(_, r)| r.is_err()).map(|(m, _)| m).collect();
            if batch.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the payments stand-in could not publish for {GIVE_UP:?}: {failed:?}"
            );
            if round.is_multiple_of(3) {
                publisher.recover().await.expect("a fresh producer");
            }
            tokio::time::sleep(Backoff::DEFAULT.delay(round)).await;
        }
        published.payments.insert(id, order);
    }
    published
}

/// One kind of event of one order on the topic: its distinct `ce_id`s (more than one is a
/// second effect) and where the first copy arrived.
struct Seen {
    ids: HashSet<String>,
    first: (i32, i64),
}

/// A fault and when it was active, relative to the start of the load.
struct Window {
    fault: &'static str,
    from: Duration,
    to: Duration,
}

/// What a replica logs when its inbox rejoins the group for a partition no member consumes.
const WATCHDOG_REJOINED: &str = "partitions no member consumes";

/// The replicas' librdkafka properties: a 10 s session, then `CHAOS_KAFKA_PROPERTIES`.
fn kafka_properties() -> String {
    let mut properties = vec!["session.timeout.ms=10000".to_owned()];
    properties.extend(std::env::var("CHAOS_KAFKA_PROPERTIES").ok().filter(|p| !p.is_empty()));
    properties.join(";")
}

fn cycles() -> u32 {
    std::env::var("CHAOS_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1)
}

async fn owned(replicas: &[Replica], http: &reqwest::Client, skip: Option<usize>) -> Vec<Option<i64>> {
    let mut out = Vec::new();
    for (i, replica) in replicas.iter().enumerate() {
        out.push(if Some(i) == skip { None } else { replica.metric(http, "outbox_partitions_owned").await });
    }
    out
}

async fn relay_passes(replicas: &[Replica], http: &reqwest::Client) -> i64 {
    let mut total = 0;
    for replica in replicas {
        total += replica.metric(http, "outbox_relay_passes_total").await.unwrap_or(0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_ledger_three_replicas_behind_nginx_lose_nothing_and_apply_nothing_twice() {
    let run = uuid::Uuid::now_v7().simple().to_string();
    // Replica logs: removed after a green run, kept for reading after a red one.
    let logs = std::env::temp_dir().join(format!("orders-chaos-{run}"));
    std::fs::create_dir_all(&logs).expect("log dir");
    let mut cluster = PgCluster::start();
    let redis = Redis::start();
    let redis_proxy = ChaosProxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let (tansu_port, broker_port) = (free_port(), free_port());
    let broker_listener = tokio::net::TcpListener::bind(("127.0.0.1", broker_port)).await.expect("bind");
    let broker = PrivateBroker::start_advertising(tansu_port, broker_port).await;
    let broker_proxy = ChaosProxy::serve(broker_listener, broker.addr.parse().expect("addr"));
    let brokers = broker_proxy.addr.to_string();
    let (events, payments_topic) =
        (format!("orders.events.chaos-{run}"), format!("payments.events.chaos-{run}"));
    let env: Vec<(String, String)> = [
        ("APP_DATABASE__URL", cluster.url()),
        ("APP_REDIS__URL", format!("redis://{}", redis_proxy.addr)),
        ("APP_REDIS__KEY_PREFIX", format!("chaos-{run}:")),
        ("APP_KAFKA__BROKERS", brokers.clone()),
        ("APP_KAFKA__TOPIC_REPLICATION", "1".into()),
        ("APP_KAFKA__TOPIC_PARTITIONS", kafka::TOPIC_PARTITIONS.to_string()),
        ("APP_KAFKA__MESSAGE_TIMEOUT_MS", "2000".into()),
        ("APP_KAFKA__GROUP_ID", format!("chaos-{run}")),
        ("APP_EVENTS__TOPIC", events.clone()),
        ("APP_INBOX__PAYMENTS_TOPIC", payments_topic.clone()),
        ("APP_INBOX__CUSTOMERS_TOPIC", format!("customers.events.chaos-{run}")),
        ("APP_OUTBOX__LEASE_TTL_MS", LEASE_TTL.as_millis().to_string()),
        ("APP_HTTP__REQUEST_TIMEOUT_MS", "5000".into()),
        ("APP_IDEMPOTENCY__LOCK_TTL_MS", LOCK_TTL.as_millis().to_string()),
        ("APP_HEALTH__CHECK_INTERVAL_MS", "1000".into()),
        ("APP_LOG_FORMAT", "json".into()),
        // Extra librdkafka properties for diagnosis, e.g. `debug=cgrp`.
        // A 10 s session (librdkafka's default is 45 s): a killed replica's group partitions
        // move sooner, and the inbox's orphan watchdog acts after 30 s instead of 100 s.
        ("APP_KAFKA__PROPERTIES", kafka_properties()),
        ("APP_LOG_LEVEL", std::env::var("CHAOS_LOG_LEVEL").unwrap_or_else(|_| "info".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(8)).build().expect("client");
    let mut replicas: Vec<Replica> = (0..REPLICAS)
        .map(|i| Replica {
            http: free_port(),
            grpc: free_port(),
            admin: free_port(),
            env: env.clone(),
            name: format!("chaos-replica-{i}"),
            log: logs.join(format!("replica-{i}.log")),
            child: None,
        })
        .collect();
    for replica in &mut replicas {
        replica.start();
        replica.ready(&http).await; // one at a time: the first applies the migrations
    }
    let nginx = Nginx::start(&replicas);
    let channel =
        Channel::from_shared(format!("http://127.0.0.1:{}", nginx.grpc)).expect("uri").connect_lazy();
    let t0 = Instant::now();
    println!("chaos load starts at {} (client attempt times count from here)", chrono::Utc::now());
    let clients = Arc::new(Clients {
        t0,
        http: http.clone(),
        rest: format!("http://127.0.0.1:{}", nginx.rest),
        grpc: OrderServiceClient::new(channel),
        attempts: Mutex::default(),
        keys: Mutex::default(),
        cancelled: Mutex::default(),
    });

    // The load.
    let (pay_tx, pay_rx) = mpsc::unbounded_channel();
    let payments_task = tokio::spawn(payments(brokers.clone(), payments_topic.clone(), pay_rx));
    let (stop, next) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(clients.clone(), i, next.clone(), pay_tx.clone(), stop.clone())))
        .collect();
    drop(pay_tx);

    // The faults, once per cycle.
    let at = |cycle: u32, offset: u64| t0 + CYCLE * cycle + Duration::from_secs(offset);
    let since = |t: Instant| t.duration_since(t0);
    let mut windows = Vec::new();
    let mut takeovers = Vec::new();
    let mut outage_passes = Vec::new();
    for cycle in 0..cycles() {
        let victim = cycle as usize % REPLICAS;
        tokio::time::sleep_until(at(cycle, 8).into()).await;
        let killed = Instant::now();
        replicas[victim].kill();
        // When the dead relay's leases expire, by the database's clock (the one leases use).
        let mut db = PgConnection::connect(&cluster.url()).await.expect("connect");
        let expiry: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT max(expires_at) FROM outbox_lease WHERE owner LIKE $1")
                .bind(format!("{}-%", replicas[victim].name))
                .fetch_one(&mut db)
                .await
                .expect("the victim's leases");
        let expiry = expiry.expect("the killed replica held leases");
        let after_kill = loop {
            let held: i64 = owned(&replicas, &http, Some(victim)).await.into_iter().flatten().sum();
            if held == PARTITIONS || killed.elapsed() > Duration::from_secs(30) {
                break killed.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let after_expiry: f64 =
            sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp() - $1)::float8")
                .bind(expiry)
                .fetch_one(&mut db)
                .await
                .expect("clock");
        takeovers.push((after_kill, after_expiry));
        windows.push(Window {
            fault: "kill -9 of a replica",
            from: since(killed),
            to: since(killed) + LOCK_TTL,
        });
        tokio::time::sleep_until(at(cycle, 16).into()).await;
        let restarted = Instant::now();
        replicas[victim].start();
        replicas[victim].ready(&http).await;
        windows.push(Window { fault: "its restart", from: since(restarted), to: since(Instant::now()) });

        tokio::time::sleep_until(at(cycle, 26).into()).await;
        let (cut, passes_before) = (Instant::now(), relay_passes(&replicas, &http).await);
        broker_proxy.cut();
        tokio::time::sleep_until(at(cycle, 46).into()).await;
        let passes = relay_passes(&replicas, &http).await - passes_before;
        outage_passes.push(passes as f64 / cut.elapsed().as_secs_f64());
        broker_proxy.restore();
        windows.push(Window { fault: "broker unreachable", from: since(cut), to: since(Instant::now()) });

        tokio::time::sleep_until(at(cycle, 52).into()).await;
        let restart = Instant::now();
        cluster = tokio::task::spawn_blocking(move || {
            cluster.restart();
            cluster
        })
        .await
        .expect("restart");
        windows.push(Window { fault: "PostgreSQL restart", from: since(restart), to: since(Instant::now()) });

        tokio::time::sleep_until(at(cycle, 62).into()).await;
        let flushed = Instant::now();
        redis.flush_all();
        windows.push(Window { fault: "Redis FLUSHALL", from: since(flushed), to: since(flushed) });
        tokio::time::sleep_until(at(cycle, 66).into()).await;
        let blackholed = Instant::now();
        redis_proxy.set(Mode::Blackhole);
        tokio::time::sleep_until(at(cycle, 76).into()).await;
        redis_proxy.restore();
        windows.push(Window {
            fault: "Redis blackholed",
            from: since(blackholed),
            to: since(Instant::now()),
        });
    }
    tokio::time::sleep_until(at(cycles(), 0).into()).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("client");
    }
    let published = payments_task.await.expect("payments");
    let load = t0.elapsed();

    // Everything settles: the outbox drains, the inbox has seen every payment and poison.
    let mut db = PgConnection::connect(&cluster.url()).await.expect("connect");
    // Counted by id: a redelivered poison message is dead-lettered (and recorded) again.
    let payment_ids: Vec<&String> = published.payments.keys().collect();
    let poison_ids: Vec<&String> = published.poison.iter().collect();
    let mut settled = false;
    for _ in 0..600 {
        let (outbox, applied, dead_lettered): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox),
                    (SELECT count(*) FROM inbox WHERE message_id = ANY($1)),
                    (SELECT count(DISTINCT message_id) FROM inbox_rejection
                      WHERE kind = 'dead-lettered' AND message_id = ANY($2))",
        )
        .bind(&payment_ids)
        .bind(&poison_ids)
        .fetch_one(&mut db)
        .await
        .expect("progress");
        if outbox == 0 && applied as usize == payment_ids.len() && dead_lettered as usize == poison_ids.len()
        {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let orders: Vec<(String, String)> =
        sqlx::query_as("SELECT id::text, status FROM orders").fetch_all(&mut db).await.expect("orders");
    let orders: HashMap<String, String> = orders.into_iter().collect();
    fn want(status: &str) -> &'static [&'static str] {
        match status {
            "CANCELLED" => &["OrderCreated", "OrderCancelled"],
            "PAID" => &["OrderCreated", "OrderPaid"],
            _ => &["OrderCreated"],
        }
    }
    let expected_events: usize = orders.values().map(|s| want(s).len()).sum();

    // The ledger: every record on the topic, read once everything has settled.
    let tail = Tail::start(&brokers, &events);
    let short_type =
        |r: &kafka::Record| r.headers["ce_type"].rsplit('.').next().unwrap_or_default().to_owned();
    let distinct =
        |records: &[kafka::Record]| records.iter().map(|r| &r.headers["ce_id"]).collect::<HashSet<_>>().len();
    for _ in 0..600 {
        // Fewer records than expected events cannot hold them all: no need to copy them yet.
        if tail.len() >= expected_events && distinct(&tail.records()) >= expected_events {
            tokio::time::sleep(Duration::from_secs(1)).await; // late duplicates, if any
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = tail.records();
    drop(tail); // before the broker goes: its reader would report the broker gone
    // Read until every poison id is there: a redelivered one can be on the DLQ twice.
    let dlq_tail = Tail::start(&brokers, &format!("{payments_topic}.dlq"));
    let dlq_ids = |tail: &Tail| -> HashSet<String> {
        tail.records().iter().map(|r| r.headers["ce_id"].clone()).collect()
    };
    for _ in 0..300 {
        if dlq_tail.len() >= published.poison.len() && published.poison.is_subset(&dlq_ids(&dlq_tail)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dlq_ids = dlq_ids(&dlq_tail);
    drop(dlq_tail);

    // Per order: the distinct events of each type, and the offset each first arrived at.
    let mut seen: HashMap<String, BTreeMap<String, Seen>> = HashMap::new();
    for r in &records {
        let entry = seen
            .entry(r.key.clone())
            .or_default()
            .entry(short_type(r))
            .or_insert_with(|| Seen { ids: HashSet::new(), first: (r.partition, r.offset) });
        entry.ids.insert(r.headers["ce_id"].clone());
        entry.first = entry.first.min((r.partition, r.offset));
    }
    let distinct_ids: HashSet<&str> = records.iter().map(|r| r.headers["ce_id"].as_str()).collect();
    let mut lost = Vec::new();
    let (mut twice, mut out_of_order) = (0, 0);
    for (id, status) in &orders {
        let events = seen.get(id);
        for &kind in want(status) {
            match events.and_then(|e| e.get(kind)) {
                None => lost.push(format!("{id} {kind}")),
                Some(seen) if seen.ids.len() > 1 => twice += 1,
                Some(_) => {}
            }
        }
        if let Some(events) = events {
            let created = events.get("OrderCreated").map(|e| e.first);
            if events.iter().any(|(kind, e)| kind != "OrderCreated" && created.is_some_and(|c| e.first < c)) {
                out_of_order += 1;
            }
        }
    }
    let phantom = seen.keys().filter(|k| !orders.contains_key(*k)).count();
    let keys = clients.keys.lock().expect("keys").clone();
    let two_orders = keys.values().filter(|ids| ids.len() > 1).count();
    let client_ids: HashSet<&String> = keys.values().flatten().collect();
    let unseen_by_clients = orders.keys().filter(|id| !client_ids.contains(id)).count();
    let cancelled = clients.cancelled.lock().expect("cancelled").clone();
    let not_cancelled =
        cancelled.iter().filter(|id| orders.get(*id).map(String::as_str) != Some("CANCELLED")).count();
    let not_paid =
        published.payments.values().filter(|id| orders.get(*id).map(String::as_str) != Some("PAID")).count();
    let poison_missing = published.poison.iter().filter(|id| !dlq_ids.contains(*id)).count();
    // Where each unapplied payment and each poison message missing from the DLQ stands in
    // the database: what an operator would look at, printed with a failure.
    let mut stuck = Vec::new();
    // Where each message sits on the payments topic (partition/offset, and the partition's
    // last offset), to compare with the replicas' logs.
    let (on_topic, last_offset): (HashMap<String, (i32, i64)>, HashMap<i32, i64>) =
        if not_paid + poison_missing > 0 {
            let all = published.payments.len() + published.duplicates + published.poison.len();
            let records = kafka::read(&brokers, &payments_topic, all, Duration::from_secs(30)).await;
            let mut last = HashMap::new();
            for r in &records {
                let end = last.entry(r.partition).or_insert(r.offset);
                *end = (*end).max(r.offset);
            }
            (records.iter().map(|r| (r.headers["ce_id"].clone(), (r.partition, r.offset))).collect(), last)
        } else {
            (HashMap::new(), HashMap::new())
        };
    let unpaid =
        published.payments.iter().filter(|(_, order)| orders.get(*order).map(String::as_str) != Some("PAID"));
    let missing = published.poison.iter().filter(|id| !dlq_ids.contains(*id)).map(|id| (id, id));
    for (message, order) in unpaid.chain(missing) {
        let (inbox_rows, rejections): (i64, Option<String>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM inbox WHERE message_id = $1),
                    (SELECT string_agg(kind || ' at ' || kafka_partition || '/' || kafka_offset || ': ' || reason, '; ')
                       FROM inbox_rejection WHERE message_id = $1)",
        )
        .bind(message)
        .fetch_one(&mut db)
        .await
        .expect("where a message stands");
        let at = on_topic
            .get(message)
            .map(|(p, o)| format!("at {p}/{o} (partition ends at {:?})", last_offset.get(p)));
        stuck.push(format!(
            "{message} (order {order}: {:?}): on the payments topic {at:?}, inbox rows {inbox_rows}, rejections \
             {rejections:?}",
            orders.get(order),
        ));
    }
    let spread: Vec<i64> = owned(&replicas, &http, None).await.into_iter().map(|o| o.unwrap_or(-1)).collect();
    // From the logs, which outlive restarts (the metric counts since the last start).
    let rejoins: Vec<usize> = replicas
        .iter()
        .map(|r| std::fs::read_to_string(&r.log).unwrap_or_default().matches(WATCHDOG_REJOINED).count())
        .collect();

    // Client-visible errors, inside and outside the fault windows.
    let attempts = std::mem::take(&mut *clients.attempts.lock().expect("attempts"));
    let inside = |at: Duration| windows.iter().find(|w| at >= w.from && at <= w.to + GRACE).map(|w| w.fault);
    let mut errors: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    let (mut outside_ok, mut outside_all, mut not_retryable) = (0usize, 0usize, 0usize);
    for attempt in &attempts {
        let window = inside(attempt.at);
        if window.is_none() {
            outside_all += 1;
            outside_ok += usize::from(attempt.error.is_none());
        }
        if let Some((status, retryable)) = &attempt.error {
            not_retryable += usize::from(!retryable);
            *errors
                .entry(window.unwrap_or("outside every fault window"))
                .or_default()
                .entry(status.clone())
                .or_default() += 1;
        }
    }

    let mut ledger = String::new();
    let w = &mut ledger;
    let _ = writeln!(
        w,
        "## Chaos ledger: {REPLICAS} replicas behind nginx, {} fault cycle(s), {:.0} s of load\n",
        cycles(),
        load.as_secs_f64()
    );
    let _ = writeln!(w, "| check | result |\n|---|---|");
    let _ = writeln!(
        w,
        "| orders committed in PostgreSQL | {} ({} cancelled, {} paid) |",
        orders.len(),
        orders.values().filter(|s| *s == "CANCELLED").count(),
        orders.values().filter(|s| *s == "PAID").count()
    );
    let _ = writeln!(
        w,
        "| events expected / distinct on the topic / records (duplicates on the wire) | {expected_events} / {} / {} ({}) |",
        distinct_ids.len(),
        records.len(),
        records.len() - distinct_ids.len()
    );
    let _ = writeln!(w, "| lost (an order's event missing from the topic) | {} |", lost.len());
    let _ = writeln!(w, "| applied twice (two distinct events for one fact) | {twice} |");
    let _ = writeln!(w, "| events for orders that do not exist | {phantom} |");
    let _ = writeln!(
        w,
        "| Idempotency-Keys that produced two orders | {two_orders} (keys used: {}) |",
        keys.len()
    );
    let _ = writeln!(w, "| orders no client was told about | {unseen_by_clients} |");
    let _ = writeln!(w, "| per-order order violated (a follow-up before OrderCreated) | {out_of_order} |");
    let _ = writeln!(
        w,
        "| cancels acknowledged but order not CANCELLED | {not_cancelled} of {} |",
        cancelled.len()
    );
    let _ = writeln!(
        w,
        "| payments published ({} twice) but order not PAID | {not_paid} of {} |",
        published.duplicates,
        published.payments.len()
    );
    let _ = writeln!(
        w,
        "| poison messages on the DLQ | {} of {} |",
        published.poison.len() - poison_missing,
        published.poison.len()
    );
    let _ = writeln!(w, "| relay partitions per replica at the end | {spread:?} |");
    let _ = writeln!(
        w,
        "| takeover of a killed replica's partitions: after the kill / after its leases expired (lease {} s) | {} |",
        LEASE_TTL.as_secs(),
        takeovers
            .iter()
            .map(|(kill, expiry)| format!("{:.1} s / {expiry:.1} s", kill.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        w,
        "| relay passes per second while the broker was unreachable (all replicas) | {} |",
        outage_passes.iter().map(|p| format!("{p:.1}")).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        w,
        "| inbox group rejoins forced by the orphan watchdog, per replica (logged) | {rejoins:?} |"
    );
    let _ =
        writeln!(w, "| client calls outside fault windows: succeeded / all | {outside_ok} / {outside_all} |");
    let _ = writeln!(w, "| client errors that were not retryable | {not_retryable} |");
    for (window, statuses) in &errors {
        let _ = writeln!(
            w,
            "| errors during {window} | {} |",
            statuses.iter().map(|(s, n)| format!("{n} × {s}")).collect::<Vec<_>>().join(", ")
        );
    }
    println!("{ledger}");
    if let Ok(path) = std::env::var("CHAOS_LEDGER") {
        std::fs::write(path, &ledger).expect("write the ledger");
    }

    let keep = |what: &str| format!("{what}; replica logs kept in {}", logs.display());
    assert!(
        settled,
        "{}: {stuck:?}",
        keep("the outbox did not drain or the inbox did not see every payment")
    );
    assert!(lost.is_empty(), "{}: {:?}", keep("events lost"), &lost[..lost.len().min(10)]);
    assert_eq!(twice, 0, "{}", keep("an effect was applied twice"));
    assert_eq!(phantom, 0, "events for orders that were never committed");
    assert_eq!(two_orders, 0, "an Idempotency-Key produced two orders");
    assert_eq!(unseen_by_clients, 0, "an order exists that no client's key produced");
    assert_eq!(out_of_order, 0, "per-order event order violated");
    assert_eq!(not_cancelled, 0, "an acknowledged cancel did not hold");
    assert_eq!(not_paid, 0, "{}: {stuck:?}", keep("a captured payment was not applied"));
    assert_eq!(poison_missing, 0, "{}: {stuck:?}", keep("poison messages missing from the DLQ"));
    assert!(spread.iter().all(|&n| n >= 0), "a replica did not answer at the end: {spread:?}");
    assert_eq!(spread.iter().sum::<i64>(), PARTITIONS, "every partition owned once: {spread:?}");
    assert!(
        spread.iter().max().expect("replicas") - spread.iter().min().expect("replicas") <= 1,
        "partitions spread evenly: {spread:?}"
    );
    for (after_kill, after_expiry) in &takeovers {
        // Survivors renew just after another relay's membership expires.
        assert!(
            *after_expiry <= 1.0,
            "takeover {after_expiry:.2} s after the lease expired ({after_kill:?} after the kill)"
        );
    }
    assert_eq!(not_retryable, 0, "every client-visible error is retryable: {errors:?}");
    assert_eq!(outside_ok, outside_all, "client errors outside the fault windows: {errors:?}");
    drop((nginx, broker, redis_proxy));
    let _ = std::fs::remove_dir_all(&logs);
}
