//! `orders-loadgen`: the load generator behind `scripts/bench.sh`, so that every figure in
//! `BENCHMARKS.md` comes from one tool whose requests are checked, not only counted.
//!
//! `orders-loadgen --help` prints the modes and their options ([`USAGE`]).
//!
//! Creates run at a fixed concurrency (closed loop) or, with `--rate`, at a fixed rate
//! (open loop: latency counts from the scheduled start, so a stall is not hidden by the
//! requests it delays). Every create carries its own Idempotency-Key and every response is
//! checked (status, id, total); a wrong answer counts as an error. `raw-produce` sends the
//! relay's messages (same keys, payload size, CloudEvents headers) with the relay's own
//! producer, as fast as it can or, with `--rate`, at a rate while it reads them back
//! (produce → consume latency). `e2e-latency` creates over REST at a rate while it reads
//! the events topic: create → receipt of `OrderCreated`, and answer → receipt (the create's
//! commit is behind its answer, so this is the relay's and the broker's part alone).
//! `verify-topic` reads a topic whole and fails unless it holds exactly `--expect` records
//! with distinct `ce_id`s, one per key for OrderCreated, and, where payloads carry a `seq`,
//! every key's records in order. Prints one JSON line, then a table.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use orders_service::{
    pb::orders::v1::{CreateOrderRequest, LineItem, order_service_client::OrderServiceClient},
    publish::{KafkaPublisher, KafkaSettings, OutboundMessage, Publisher, TopicSettings},
};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};

/// `--name=value` options with defaults.
struct Options(HashMap<String, String>);

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let mut map = HashMap::new();
        for arg in args {
            let Some((name, value)) = arg.strip_prefix("--").and_then(|a| a.split_once('=')) else {
                bail!("expected --name=value, got {arg:?}");
            };
            map.insert(name.to_owned(), value.to_owned());
        }
        Ok(Self(map))
    }

    fn text(&self, name: &str, default: &str) -> String {
        self.0.get(name).cloned().unwrap_or_else(|| default.to_owned())
    }

    fn number(&self, name: &str, default: u64) -> anyhow::Result<u64> {
        self.0.get(name).map_or(Ok(default), |v| v.parse().with_context(|| format!("--{name}={v}")))
    }
}

/// What one run measured.
struct Report {
    mode: String,
    /// Successful operations in the measured window.
    ok: u64,
    /// Failed or wrong answers in the measured window.
    errors: u64,
    /// Successful creates over the whole run, warm-up included (what the database holds).
    created_total: u64,
    seconds: f64,
    /// Latencies in microseconds.
    latency: Histogram<u64>,
    /// `e2e-latency` only: from the create's answer (its commit is behind it) to receipt,
    /// the part of the path that compares with the broker's own produce → consume.
    answered: Option<Histogram<u64>>,
}

impl Report {
    fn print(&self) {
        let latency_ms = |q: f64| ms(&self.latency, q);
        let rate = self.ok as f64 / self.seconds;
        let answered = self.answered.as_ref().map_or(String::new(), |h| {
            format!(",\"answered_p50_ms\":{:.2},\"answered_p99_ms\":{:.2}", ms(h, 0.5), ms(h, 0.99))
        });
        println!(
            "{{\"mode\":\"{}\",\"ok\":{},\"errors\":{},\"created_total\":{},\"seconds\":{:.2},\"per_second\":{:.0},\
             \"p50_ms\":{:.2},\"p99_ms\":{:.2},\"max_ms\":{:.2}{answered}}}",
            self.mode,
            self.ok,
            self.errors,
            self.created_total,
            self.seconds,
            rate,
            latency_ms(0.5),
            latency_ms(0.99),
            latency_ms(1.0)
        );
        println!("| mode | ok | errors | per second | p50 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
            self.mode,
            self.ok,
            self.errors,
            rate,
            latency_ms(0.5),
            latency_ms(0.99),
            latency_ms(1.0)
        );
        if let Some(h) = &self.answered {
            println!(
                "| answer → receipt | | | | {:.2} | {:.2} | {:.2} |",
                ms(h, 0.5),
                ms(h, 0.99),
                ms(h, 1.0)
            );
        }
    }
}

/// A latency histogram's quantile `q`, in milliseconds.
fn ms(histogram: &Histogram<u64>, q: f64) -> f64 {
    histogram.value_at_quantile(q) as f64 / 1000.0
}

/// A duration as the histograms record it: whole microseconds, at least 1.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Order id → when its create was started (or scheduled) and when it was answered.
type Sent = Arc<Mutex<HashMap<String, (Instant, Instant)>>>;

/// The run's clock: warm-up, then the measured window.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    end: Instant,
}

impl Window {
    fn new(options: &Options) -> anyhow::Result<Self> {
        let start = Instant::now();
        let measure_from = start + Duration::from_secs(options.number("warmup", 2)?);
        Ok(Self { measure_from, end: measure_from + Duration::from_secs(options.number("duration", 10)?) })
    }

    fn seconds(&self) -> f64 {
        (self.end - self.measure_from).as_secs_f64()
    }
}

/// Counts shared by the workers of one run.
struct Tally {
    latency: Histogram<u64>,
    ok: u64,
    errors: u64,
    created_total: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Arc<Mutex<Self>> {
        let latency = Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        Arc::new(Mutex::new(Self { latency, ok: 0, errors: 0, created_total: 0, first_error: None }))
    }

    /// Records one operation that started (or was scheduled) at `start`.
    fn record(&mut self, window: &Window, start: Instant, result: &anyhow::Result<()>) {
        let now = Instant::now();
        if result.is_ok() {
            self.created_total += 1;
        }
        if start < window.measure_from || start >= window.end {
            return;
        }
        match result {
            Ok(()) => {
                self.ok += 1;
                self.latency.saturating_record(micros(now - start));
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One create call; `Ok` only for a 201 / OK whose answer is the order asked for.
type CreateFn = Arc<dyn Fn(usize) -> CreateFuture + Send + Sync>;
type CreateFuture = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<String>> + Send>>;

/// The request every create sends: two lines, total 2599.
const TOTAL_MINOR: i64 = 2 * 1250 + 99;

fn rest_create(options: &Options) -> anyhow::Result<CreateFn> {
    let target = options.text("target", "http://127.0.0.1:8080");
    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
    let url = format!("{target}/v1/orders");
    Ok(Arc::new(move |_worker| {
        let (client, url) = (client.clone(), url.clone());
        Box::pin(async move {
            let body = serde_json::json!({"customer_id": "bench", "currency": "EUR", "items": [
                {"sku": "SKU-1", "quantity": 2, "unit_price_minor": 1250},
                {"sku": "SKU-2", "quantity": 1, "unit_price_minor": 99}]});
            let response = client
                .post(&url)
                .header("idempotency-key", uuid::Uuid::now_v7().to_string())
                .json(&body)
                .send()
                .await?;
            let status = response.status();
            let order: serde_json::Value = response.json().await.context("a JSON answer")?;
            if status != 201 || order["status"] != "PENDING" || order["total_minor"] != TOTAL_MINOR {
                bail!("unexpected answer {status}: {order}");
            }
            order["id"].as_str().map(str::to_owned).context("no id")
        })
    }))
}

async fn grpc_create(options: &Options, workers: usize) -> anyhow::Result<CreateFn> {
    let target = options.text("target", "http://127.0.0.1:50051");
    // One connection per worker, as that many independent clients would have.
    let mut clients = Vec::with_capacity(workers);
    for _ in 0..workers {
        let channel = tonic::transport::Endpoint::from_shared(target.clone())?.connect().await?;
        clients.push(OrderServiceClient::new(channel));
    }
    let clients = Arc::new(clients);
    Ok(Arc::new(move |worker| {
        let mut client = clients[worker % clients.len()].clone();
        Box::pin(async move {
            let mut request = tonic::Request::new(CreateOrderRequest {
                customer_id: "bench".into(),
                items: vec![
                    LineItem { sku: "SKU-1".into(), quantity: 2, unit_price_minor: 1250 },
                    LineItem { sku: "SKU-2".into(), quantity: 1, unit_price_minor: 99 },
                ],
                currency: "EUR".into(),
                note: None,
            });
            request.metadata_mut().insert("idempotency-key", uuid::Uuid::now_v7().to_string().parse()?);
            let order = client.create_order(request).await?.into_inner().order.context("no order")?;
            if order.total_minor != TOTAL_MINOR || order.id.is_empty() {
                bail!("unexpected order {order:?}");
            }
            Ok(order.id)
        })
    }))
}

/// Runs `create` at a fixed concurrency (`--rate=0`) or a fixed rate; `sent` learns each
/// created id and when its request started.
async fn drive(
    options: &Options,
    mode: &str,
    create: CreateFn,
    sent: Option<Sent>,
) -> anyhow::Result<Report> {
    let concurrency = usize::try_from(options.number("concurrency", 64)?)?.max(1);
    let rate = options.number("rate", 0)?;
    let window = Window::new(options)?;
    let tally = Tally::new();
    let one = {
        let (tally, sent) = (tally.clone(), sent.clone());
        move |worker: usize, start: Instant| {
            let (create, tally, sent) = (create.clone(), tally.clone(), sent.clone());
            async move {
                let result = create(worker).await.map(|id| {
                    // Like `tally`, only what started inside the measured window counts.
                    if let Some(sent) = sent.as_ref().filter(|_| start >= window.measure_from) {
                        lock(sent).insert(id, (start, Instant::now()));
                    }
                });
                lock(&tally).record(&window, start, &result);
            }
        }
    };
    if rate == 0 {
        let workers: Vec<_> = (0..concurrency)
            .map(|worker| {
                let one = one.clone();
                tokio::spawn(async move {
                    while Instant::now() < window.end {
                        one(worker, Instant::now()).await;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await?;
        }
    } else {
        let limit = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut n = 0;
        let mut tasks = tokio::task::JoinSet::new();
        while Instant::now() < window.end {
            let scheduled = ticks.tick().await.into_std();
            let permit = limit.clone().acquire_owned().await?;
            let one = one.clone();
            n += 1;
            tasks.spawn(async move {
                one(n % concurrency, scheduled).await;
                drop(permit);
            });
        }
        while tasks.join_next().await.is_some() {}
    }
    let tally = lock(&tally);
    if let Some(e) = &tally.first_error {
        eprintln!("first error: {e}");
    }
    Ok(Report {
        mode: mode.to_owned(),
        ok: tally.ok,
        errors: tally.errors,
        created_total: tally.created_total,
        seconds: window.seconds(),
        latency: tally.latency.clone(),
        answered: None,
    })
}

/// Every partition of `topic`, assigned from the beginning (no group: nothing to join, and
/// a fresh topic's first records are never skipped by an offset resolved late).
fn assigned(brokers: &str, topic: &str) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("loadgen-{}", uuid::Uuid::now_v7().simple()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    // A topic the service has just created can take a moment to show up in the metadata.
    let deadline = Instant::now() + Duration::from_secs(10);
    let partitions = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        if partitions > 0 {
            break partitions;
        }
        if Instant::now() >= deadline {
            bail!("topic {topic} has no partitions after 10 s (does it exist?)");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut assignment = TopicPartitionList::new();
    for p in 0..i32::try_from(partitions)? {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Follows `topic` on its own thread, handing each record's key to `seen` with its arrival
/// time until `stop`.
fn follow(
    brokers: &str,
    topic: &str,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seen: impl Fn(String, Instant) + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let consumer = assigned(brokers, topic)?;
    Ok(std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
                let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
                seen(key, Instant::now());
            }
        }
    }))
}

/// Create → receipt: creates at `--rate` while following the events topic.
async fn e2e_latency(options: &Options) -> anyhow::Result<Report> {
    let (brokers, topic) =
        (options.text("brokers", "127.0.0.1:9092"), options.text("topic", "orders.events"));
    let sent: Sent = Arc::default();
    let received: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sink = received.clone();
    let reader = follow(&brokers, &topic, stop.clone(), move |key, at| lock(&sink).push((key, at)))?;
    let mut options = Options(options.0.clone());
    options.0.entry("rate".into()).or_insert_with(|| "50".into());
    let creates = drive(&options, "e2e-latency", rest_create(&options)?, Some(sent.clone())).await?;
    // Give the last events time to arrive (the warm-up's events are received, not counted).
    let deadline = Instant::now() + Duration::from_secs(10);
    let arrived = || {
        let sent = lock(&sent);
        lock(&received).iter().filter(|(key, _)| sent.contains_key(key)).count()
    };
    while arrived() < lock(&sent).len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = reader.join();
    let (sent, received) = (lock(&sent), lock(&received));
    let mut latency = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    let mut answered = latency.clone();
    let mut arrived = 0u64;
    for (key, at) in received.iter() {
        if let Some((start, answer)) = sent.get(key) {
            arrived += 1;
            latency.saturating_record(micros(*at - *start));
            // An event may arrive before its create's answer does: 0, not negative.
            answered.saturating_record(micros(at.saturating_duration_since(*answer)));
        }
    }
    let missing = sent.len() as u64 - arrived.min(sent.len() as u64);
    Ok(Report {
        mode: "e2e-latency".into(),
        ok: arrived,
        errors: creates.errors + missing,
        created_total: creates.created_total,
        seconds: creates.seconds,
        latency,
        answered: Some(answered),
    })
}

/// The relay's messages without the relay: the same producer, keys, payload and headers.
async fn raw_produce(options: &Options) -> anyhow::Result<Report> {
    let (brokers, topic) =
        (options.text("brokers", "127.0.0.1:9092"), options.text("topic", "orders.events.raw"));
    let (messages, keys) = (options.number("messages", 100_000)?, options.number("keys", 10_000)?.max(1));
    let (payload, rate) = (usize::try_from(options.number("payload", 100)?)?, options.number("rate", 0)?);
    let settings = KafkaSettings {
        brokers: brokers.clone(),
        message_timeout: Duration::from_secs(30),
        message_max_bytes: 1_000_000,
        // The service's default (APP_KAFKA__LINGER_MS); the ceiling uses the relay's settings.
        linger: Duration::from_millis(options.number("linger-ms", 0)?),
        properties: Vec::new(),
    };
    // The layout the service gives the topics it creates (APP_KAFKA__TOPIC_PARTITIONS).
    let partitions = i32::try_from(options.number("partitions", 3)?)?;
    let layout = TopicSettings { partitions, replication: 1, min_insync_replicas: None };
    settings.create_topics(&[&topic], &layout).await?;
    let publisher = Arc::new(KafkaPublisher::new(&settings)?);
    let message = |n: u64| OutboundMessage {
        topic: topic.clone(),
        key: format!("order-{:06}", n % keys),
        payload: vec![b'x'; payload],
        headers: [
            ("ce_specversion", "1.0".to_owned()),
            ("ce_id", uuid::Uuid::now_v7().to_string()),
            ("ce_type", "orders.events.v1.OrderCreated".to_owned()),
            ("ce_source", "orders-service".to_owned()),
            ("ce_time", chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            ("ce_subject", format!("order-{:06}", n % keys)),
            ("content-type", "application/json".to_owned()),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect(),
    };
    if rate > 0 {
        // Produce → consume latency at a rate, the broker's own floor for P3.
        let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen_sent, seen_latency) = (sent.clone(), latency.clone());
        let reader = follow(&brokers, &topic, stop.clone(), move |key, at| {
            if let Some(start) = lock(&seen_sent).remove(&key) {
                lock(&seen_latency).saturating_record(micros(at - start));
            }
        })?;
        let window = Window::new(options)?;
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        let (mut n, mut errors, mut ok) = (0, 0, 0);
        let mut tasks = tokio::task::JoinSet::new();
        while Instant::now() < window.end {
            let start = ticks.tick().await.into_std();
            n += 1;
            // A unique key per message, so receipts match sends one to one.
            let mut m = message(n);
            m.key = format!("raw-{n}");
            let measured = start >= window.measure_from;
            if measured {
                lock(&sent).insert(m.key.clone(), start);
            }
            let publisher = publisher.clone();
            tasks.spawn(async move { (measured, publisher.publish(vec![m]).await.remove(0).is_ok()) });
        }
        while let Some(done) = tasks.join_next().await {
            match done? {
                (true, true) => ok += 1,
                (true, false) => errors += 1,
                _ => {}
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lock(&sent).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = reader.join();
        errors += lock(&sent).len() as u64; // never arrived
        let latency = lock(&latency).clone();
        return Ok(Report {
            mode: "raw-produce-latency".into(),
            ok,
            errors,
            created_total: 0,
            seconds: window.seconds(),
            latency,
            answered: None,
        });
    }
    // Throughput: batches of the relay's size, several in flight, as the relay's partitions are.
    let batch = options.number("batch", 1_000)?.max(1);
    let in_flight = usize::try_from(options.number("in-flight", 16)?)?.max(1);
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let limit = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut n = 0;
    while n < messages {
        let size = batch.min(messages - n);
        let batch: Vec<OutboundMessage> = (n..n + size).map(&message).collect();
        n += size;
        let (publisher, latency) = (publisher.clone(), latency.clone());
        let permit = limit.clone().acquire_owned().await?;
        tasks.spawn(async move {
            let start = Instant::now();
            let results = publisher.publish(batch).await;
            lock(&latency).saturating_record(micros(start.elapsed()));
            drop(permit);
            results.iter().filter(|r| r.is_ok()).count() as u64
        });
    }
    let mut ok = 0;
    while let Some(done) = tasks.join_next().await {
        ok += done?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let latency = lock(&latency).clone();
    Ok(Report {
        mode: "raw-produce".into(),
        ok,
        errors: messages - ok,
        created_total: 0,
        seconds,
        latency,
        answered: None,
    })
}

/// Reads `topic` whole (every partition from the beginning until 3 s pass with nothing new)
/// and checks what the relay promises: no loss, no duplicate, per-key order.
fn verify_topic(options: &Options) -> anyhow::Result<()> {
    use rdkafka::message::Headers;
    let (brokers, topic) =
        (options.text("brokers", "127.0.0.1:9092"), options.text("topic", "orders.events"));
    let expect = options.number("expect", 0)?;
    let consumer = assigned(&brokers, &topic)?;
    let (mut records, mut ce_ids, mut created) = (0u64, std::collections::HashSet::new(), HashMap::new());
    let (mut last_seq, mut out_of_order) = (HashMap::<String, u64>::new(), 0u64);
    let mut idle_since = Instant::now();
    while idle_since.elapsed() < Duration::from_secs(3) {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message?;
        idle_since = Instant::now();
        records += 1;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let header = |name: &str| {
            message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == name)
                    .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
            })
        };
        ce_ids.insert(header("ce_id").unwrap_or_default());
        if header("ce_type").as_deref() == Some("orders.events.v1.OrderCreated") {
            *created.entry(key.clone()).or_insert(0u64) += 1;
        }
        let seq = serde_json::from_slice::<serde_json::Value>(message.payload().unwrap_or_default())
            .ok()
            .and_then(|v| v["seq"].as_u64());
        if let Some(seq) = seq {
            if last_seq.get(&key).is_some_and(|last| *last >= seq) {
                out_of_order += 1;
            }
            last_seq.insert(key, seq);
        }
    }
    let twice = created.values().filter(|n| **n > 1).count();
    println!(
        "{{\"mode\":\"verify-topic\",\"records\":{records},\"distinct_ce_ids\":{},\"orders_created_twice\":{twice},\
         \"out_of_order\":{out_of_order}}}",
        ce_ids.len()
    );
    if records != expect || ce_ids.len() as u64 != records || twice > 0 || out_of_order > 0 {
        bail!(
            "{topic}: expected {expect} records with distinct ce_ids, each order created once, in order per key; \
             got {records} records, {} distinct ce_ids, {twice} orders created twice, {out_of_order} out of order",
            ce_ids.len()
        );
    }
    Ok(())
}

/// What `--help` prints: the modes and their options.
const USAGE: &str = "\
orders-loadgen grpc-create  [--target=http://127.0.0.1:50051] [--concurrency=64] [--rate=0]
orders-loadgen rest-create  [--target=http://127.0.0.1:8080]  [--concurrency=64] [--rate=0]
orders-loadgen raw-produce  [--brokers=127.0.0.1:9092] --topic=T [--messages=100000] [--keys=10000] [--payload=100]
                            [--rate=0] [--partitions=3] [--batch=1000] [--in-flight=16] [--linger-ms=0]
orders-loadgen e2e-latency  [--target=http://127.0.0.1:8080] [--brokers=…] --topic=T [--rate=50]
orders-loadgen verify-topic [--brokers=…] --topic=T --expect=N
       common: [--warmup=2] [--duration=10] (seconds)
";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    if matches!(mode.as_str(), "" | "help" | "-h" | "--help") {
        print!("{USAGE}");
        return Ok(());
    }
    let options = Options::parse(args)?;
    let report = match mode.as_str() {
        "rest-create" => drive(&options, &mode, rest_create(&options)?, None).await?,
        "grpc-create" => {
            let workers = usize::try_from(options.number("concurrency", 64)?)?.max(1);
            drive(&options, &mode, grpc_create(&options, workers).await?, None).await?
        }
        "raw-produce" => raw_produce(&options).await?,
        "e2e-latency" => e2e_latency(&options).await?,
        "verify-topic" => return tokio::task::spawn_blocking(move || verify_topic(&options)).await?,
        other => bail!(
            "unknown mode {other:?}: grpc-create, rest-create, raw-produce, e2e-latency or verify-topic"
        ),
    };
    report.print();
    if report.ok == 0 {
        bail!("nothing succeeded");
    }
    Ok(())
}
