//! Kafka helpers for tests: the shared broker (`TEST_KAFKA_BROKERS`), unique topics per
//! test, a reader, and private tansu brokers (`TANSU_BIN`) for outage scenarios.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use orders_service::publish::{KafkaPublisher, KafkaSettings, TopicSettings};
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};

/// Partitions of every test topic.
pub const TOPIC_PARTITIONS: i32 = 3;

/// Bootstrap servers of the shared test broker.
pub fn brokers() -> String {
    std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// Producer settings for `brokers` with a short delivery timeout, so failures surface fast.
pub fn settings(brokers: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: brokers.to_owned(),
        message_timeout: Duration::from_secs(2),
        message_max_bytes: 1_000_000,
        linger: Duration::ZERO,
        properties: Vec::new(),
    }
}

/// How test topics are laid out: a single broker, so one replica.
pub fn layout() -> TopicSettings {
    TopicSettings { partitions: TOPIC_PARTITIONS, replication: 1, min_insync_replicas: None }
}

/// A topic no other test uses, created on the shared broker.
pub async fn fresh_topic() -> String {
    let topic = format!("orders.events.test-{}", uuid::Uuid::now_v7().simple());
    settings(&brokers()).create_topics(&[&topic], &layout()).await.expect("create topic");
    topic
}

/// A publisher to the shared broker.
pub fn publisher() -> KafkaPublisher {
    KafkaPublisher::new(&settings(&brokers())).expect("producer")
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Kafka key.
    pub key: String,
    /// Headers by name.
    pub headers: HashMap<String, String>,
    /// Value.
    pub payload: Vec<u8>,
    /// Kafka partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
}

/// A consumer of every partition of `topic` from the beginning, with a throwaway group;
/// `properties` are extra librdkafka settings (TLS).
fn reader(brokers: &str, properties: &[(String, String)], topic: &str) -> BaseConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-reader-{}", uuid::Uuid::now_v7().simple()))
        .set("enable.auto.commit", "false");
    for (key, value) in properties {
        config.set(key, value);
    }
    let consumer: BaseConsumer = config.create().expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for p in 0..TOPIC_PARTITIONS {
        assignment.add_partition_offset(topic, p, Offset::Beginning).expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    consumer
}

/// The next record, if one arrives within 100 ms.
fn next_record(consumer: &BaseConsumer) -> Option<Record> {
    let message = consumer.poll(Duration::from_millis(100))?.expect("consume");
    let inbound = orders_service::inbox::kafka::inbound(&message);
    Some(Record {
        key: String::from_utf8_lossy(&inbound.key.unwrap_or_default()).into_owned(),
        headers: inbound.headers.into_iter().collect(),
        payload: inbound.payload,
        partition: inbound.partition,
        offset: inbound.offset,
    })
}

/// Reads `topic` from the beginning until `expected` records arrived or `timeout` passed;
/// returns them ordered by (partition, offset).
pub async fn read(brokers: &str, topic: &str, expected: usize, timeout: Duration) -> Vec<Record> {
    read_with(brokers, &[], topic, expected, timeout).await
}

/// [`read`] with extra client `properties` (e.g. `security.protocol`).
pub async fn read_with(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<Record> {
    let (brokers, properties, topic) = (brokers.to_owned(), properties.to_vec(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer = reader(&brokers, &properties, &topic);
        let deadline = Instant::now() + timeout;
        let mut records = Vec::new();
        while records.len() < expected && Instant::now() < deadline {
            records.extend(next_record(&consumer));
        }
        records.sort_by_key(|r| (r.partition, r.offset));
        records
    })
    .await
    .expect("reader task")
}

/// Follows a topic from the beginning in the background, collecting every record, until
/// dropped (for tests that wait for one particular record among many).
pub struct Tail {
    records: std::sync::Arc<std::sync::Mutex<Vec<Record>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Tail {
    /// Starts following `topic`.
    pub fn start(brokers: &str, topic: &str) -> Self {
        let tail = Self { records: Default::default(), stop: Default::default() };
        let (records, stop) = (tail.records.clone(), tail.stop.clone());
        let consumer = reader(brokers, &[], topic);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(record) = next_record(&consumer) {
                    records.lock().expect("records").push(record);
                }
            }
        });
        tail
    }

    /// How many records were collected so far.
    pub fn len(&self) -> usize {
        self.records.lock().expect("records").len()
    }

    /// Every record collected so far.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().expect("records").clone()
    }

    /// The first record collected so far that satisfies `predicate`.
    pub fn find(&self, predicate: impl Fn(&Record) -> bool) -> Option<Record> {
        self.records.lock().expect("records").iter().find(|r| predicate(r)).cloned()
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A private tansu broker on its own port, stopped (by PID) when dropped.
pub struct PrivateBroker {
    _process: crate::support::Reaped,
    /// `127.0.0.1:<port>`.
    pub addr: String,
}

impl PrivateBroker {
    /// Starts tansu on `port` (memory storage) and waits until it accepts connections.
    pub async fn start(port: u16) -> Self {
        Self::start_advertising(port, port).await
    }

    /// Starts tansu on `port`, telling clients to connect to `advertised` (a fault proxy in
    /// front of it), so every client connection passes the proxy.
    pub async fn start_advertising(port: u16, advertised: u16) -> Self {
        // scripts/kafka.sh installs it there; TANSU_BIN overrides.
        let bin = crate::support::cached_tool("TANSU_BIN", "tansu/bin/tansu");
        let (url, public) = (format!("tcp://127.0.0.1:{port}"), format!("tcp://127.0.0.1:{advertised}"));
        let child = Command::new(bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &public])
            .args(["--storage-engine", "memory://tansu/"])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        let addr = format!("127.0.0.1:{port}");
        crate::support::eventually(Duration::from_secs(10), "private tansu to listen", || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(&addr).await.is_ok() }
        })
        .await;
        Self { _process: crate::support::Reaped(child), addr }
    }
}

impl PrivateBroker {
    /// `kill -9`: the broker dies with whatever it held (memory storage), no goodbye.
    pub fn kill(self) {
        drop(self); // SIGKILL, then reaped
    }
}

/// A port nothing listens on right now (below the ephemeral range).
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let port = 20_000 + (uuid::Uuid::now_v7().as_u128() % 10_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found");
}

#[tokio::test]
async fn a_topic_whose_min_insync_replicas_exceeds_its_replicas_is_refused() {
    use rdkafka::{
        admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
        client::DefaultClientContext,
    };
    let topic = format!("orders.events.misconfigured-{}", uuid::Uuid::now_v7().simple());
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("admin");
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1)).set("min.insync.replicas", "2")],
            &AdminOptions::new(),
        )
        .await
        .expect("create");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let refused = settings(&brokers()).create_topics(&[&topic], &layout()).await.expect_err("refused");
    let message = format!("{refused:#}");
    assert!(message.contains("min.insync.replicas=2 but only 1 replica"), "{message}");
    settings(&brokers())
        .create_topics(&[&fresh_topic().await], &layout())
        .await
        .expect("a sound topic passes");
}
