//! Kafka adapter (rdkafka, bundled librdkafka): an idempotent producer (`acks=all`,
//! `enable.idempotence=true`), so librdkafka's own retries never duplicate or reorder
//! messages within a partition, with `enable.gapless.guarantee=true`, so a batch the broker
//! rejects cannot leave a gap that later messages of the same partition skip over (the
//! producer fails fatally instead and is rebuilt). A message refused before it was sent
//! holds back the later messages of its key in the same batch. Together that is the
//! [`Publisher`] contract, except for one case librdkafka does not cover: a message timing
//! out in the queue just before a later one of its key is delivered (the relay counts it
//! in `outbox_order_violations_total` and republishes the later one).

use std::{sync::RwLock, time::Duration};

use anyhow::Context;
use async_trait::async_trait;
use rdkafka::{
    ClientConfig, ClientContext,
    admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication},
    client::DefaultClientContext,
    config::RDKafkaLogLevel,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{BaseProducer, FutureProducer, FutureRecord, Producer},
};

use super::{OutboundMessage, PublishError, Publisher};

/// Connection and producer settings.
#[derive(Clone)]
pub struct KafkaSettings {
    /// `host:port,…` bootstrap servers.
    pub brokers: String,
    /// Upper bound on one message's delivery, retries included; failures surface after it.
    pub message_timeout: Duration,
    /// Producer-side size limit (`message.max.bytes`); larger messages are dead-lettered.
    pub message_max_bytes: usize,
    /// How long the producer holds a message for more to join its request (`linger.ms`).
    /// The relay hands over whole batches, so the default is 0: at 800 events/s, 5 ms put
    /// 9 ms on the median commit → receipt and nothing on throughput (BENCHMARKS.md, run 9).
    pub linger: Duration,
    /// Extra librdkafka properties (e.g. `security.protocol`), from `APP_KAFKA__PROPERTIES`.
    pub properties: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaSettings {
    /// Property values may hold credentials (`sasl.password`): only their keys are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("message_timeout", &self.message_timeout)
            .field("message_max_bytes", &self.message_max_bytes)
            .field("linger", &self.linger)
            .field("properties", &self.properties.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

impl KafkaSettings {
    /// Base client configuration shared by the producer, consumer and admin client.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers).set("client.id", "orders-service");
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// Creates the topics that do not exist yet (brokers without auto-creation, dev
    /// clusters) with `layout`, then checks every topic's `min.insync.replicas` against its
    /// replication factor: with `acks=all`, a topic whose minimum exceeds its replica count
    /// rejects every write, and that is refused here with a message saying so.
    pub async fn create_topics(&self, topics: &[&str], layout: &TopicSettings) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> =
            self.client_config().create().context("creating the Kafka admin client")?;
        let min_isr = layout.min_isr().to_string();
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| {
                NewTopic::new(t, layout.partitions, TopicReplication::Fixed(layout.replication))
                    .set("min.insync.replicas", &min_isr)
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&new, &options).await.context("creating Kafka topics")? {
            match result {
                Ok(topic) => tracing::info!(topic, "created Kafka topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => anyhow::bail!("creating Kafka topic {topic}: {code}"),
            }
        }
        check_min_insync(self.client_config(), &admin, topics, &options).await
    }
}

/// How the service lays out the topics it creates (where no platform owns them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSettings {
    /// Partitions per topic.
    pub partitions: i32,
    /// Replication factor (3 in production; 1 for a single dev broker).
    pub replication: i32,
    /// `min.insync.replicas`; `None` = replication − 1, at least 1, so `acks=all` survives
    /// one broker down without acknowledging writes held by a single replica.
    pub min_insync_replicas: Option<i32>,
}

impl TopicSettings {
    /// The effective `min.insync.replicas`.
    pub fn min_isr(&self) -> i32 {
        self.min_insync_replicas.unwrap_or((self.replication - 1).max(1))
    }

    /// Refuses layouts that cannot work: the error names the variable.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=10_000).contains(&self.partitions) {
            return Err(("APP_KAFKA__TOPIC_PARTITIONS", "must be between 1 and 10000".into()));
        }
        if !(1..=32).contains(&self.replication) {
            return Err(("APP_KAFKA__TOPIC_REPLICATION", "must be between 1 and 32".into()));
        }
        if !(1..=self.replication).contains(&self.min_isr()) {
            return Err((
                "APP_KAFKA__TOPIC_MIN_INSYNC_REPLICAS",
                format!(
                    "must be between 1 and APP_KAFKA__TOPIC_REPLICATION ({}): with acks=all a larger minimum \
                     rejects every write",
                    self.replication
                ),
            ));
        }
        Ok(())
    }
}

/// Fails if a topic's `min.insync.replicas` exceeds its replica count (every `acks=all`
/// produce would fail with NOT_ENOUGH_REPLICAS); warns if it equals a replica count above
/// one (any broker down stops writes). Brokers that cannot describe configs are skipped.
async fn check_min_insync(
    config: ClientConfig,
    admin: &AdminClient<DefaultClientContext>,
    topics: &[&str],
    options: &AdminOptions,
) -> anyhow::Result<()> {
    let specifiers: Vec<ResourceSpecifier> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let configs = match admin.describe_configs(&specifiers, options).await {
        Ok(configs) => configs,
        Err(e) => {
            tracing::debug!(error = %e, "broker cannot describe topic configs; min.insync.replicas not checked");
            return Ok(());
        }
    };
    // Metadata reads block: one client, off the async threads.
    let names: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    let replicas: Vec<Option<usize>> = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let client: BaseProducer = config.create().context("creating a Kafka metadata client")?;
        names
            .iter()
            .map(|topic| {
                let metadata = client
                    .client()
                    .fetch_metadata(Some(topic), Duration::from_secs(10))
                    .with_context(|| format!("reading metadata of Kafka topic {topic}"))?;
                Ok(metadata
                    .topics()
                    .first()
                    .and_then(|t| t.partitions().iter().map(|p| p.replicas().len()).min()))
            })
            .collect()
    })
    .await
    .context("metadata task")??;
    for ((topic, config), replicas) in topics.iter().zip(configs).zip(replicas) {
        let Some(min_isr) = config
            .ok()
            .and_then(|c| c.get("min.insync.replicas").and_then(|e| e.value.clone()))
            .and_then(|v| v.parse::<usize>().ok())
        else {
            continue;
        };
        let Some(replicas) = replicas else { continue };
        if min_isr > replicas {
            anyhow::bail!(
                "Kafka topic {topic} has min.insync.replicas={min_isr} but only {replicas} replica(s): every \
                 acks=all write to it fails; lower min.insync.replicas or add replicas"
            );
        }
        if min_isr == replicas && replicas > 1 {
            tracing::warn!(
                topic,
                min_isr,
                replicas,
                "min.insync.replicas equals the replica count: one broker down stops writes"
            );
        }
    }
    Ok(())
}

/// The Kafka publisher.
pub struct KafkaPublisher {
    /// The producer's configuration, kept to rebuild it after a fatal error.
    config: ClientConfig,
    /// Swapped by [`Publisher::recover`]; cloned (an `Arc` inside) for each batch, so the
    /// lock is never held across I/O.
    producer: RwLock<FutureProducer<ProducerContext>>,
}

impl KafkaPublisher {
    /// Builds the idempotent producer (connections are made lazily by librdkafka).
    pub fn new(settings: &KafkaSettings) -> anyhow::Result<Self> {
        let mut config = settings.client_config();
        config
            .set("enable.idempotence", "true")
            .set("enable.gapless.guarantee", "true")
            .set("acks", "all")
            .set("linger.ms", settings.linger.as_millis().to_string())
            .set("message.timeout.ms", settings.message_timeout.as_millis().to_string())
            .set("message.max.bytes", settings.message_max_bytes.to_string());
        let producer = Self::create(&config).context("creating the Kafka producer (check APP_KAFKA__*)")?;
        Ok(Self { config, producer: RwLock::new(producer) })
    }

    /// A producer from `config`, with this publisher's logging context (first and rebuilt alike).
    fn create(config: &ClientConfig) -> rdkafka::error::KafkaResult<FutureProducer<ProducerContext>> {
        config.create_with_context(ProducerContext)
    }

    fn producer(&self) -> FutureProducer<ProducerContext> {
        match self.producer.read() {
            Ok(producer) => producer.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The producer's librdkafka context: it logs as the default one does, except librdkafka's
/// warning that `enable.gapless.guarantee` is experimental. The publisher sets that property
/// on purpose (it is what keeps a rejected batch from leaving a gap), so the warning said
/// nothing an operator could act on, at WARN level, at every start and every rebuild.
struct ProducerContext;

impl ProducerContext {
    /// Whether a librdkafka log line is the warning about a property this publisher sets
    /// knowingly.
    fn expected(facility: &str, message: &str) -> bool {
        facility == "CONFWARN" && message.contains("enable.gapless.guarantee")
    }
}

impl ClientContext for ProducerContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if Self::expected(facility, message) {
            tracing::debug!(target: "librdkafka", facility, message, "expected configuration warning");
        } else {
            DefaultClientContext.log(level, facility, message);
        }
    }
}

/// Sorts a delivery failure by what can fix it: the record itself is unacceptable
/// (permanent), only a new producer helps (fatal: librdkafka's fatal state, or a producer id
/// the broker has fenced, which every retry of the same producer repeats), or time may.
fn classify(err: &KafkaError) -> PublishError {
    let fatal = matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    );
    if fatal {
        return PublishError::Fatal(err.to_string());
    }
    let permanent = matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    );
    if permanent {
        PublishError::Permanent(err.to_string())
    } else {
        PublishError::Retriable(err.to_string())
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, messages: Vec<OutboundMessage>) -> Vec<Result<(), PublishError>> {
        let producer = self.producer();
        // Enqueue everything first so the batch is in flight concurrently, then collect
        // the acknowledgements in order.
        let mut pending = Vec::with_capacity(messages.len());
        let mut refused = std::collections::HashSet::new();
        for m in &messages {
            if refused.contains(&m.key) {
                pending.push(Err(super::held_back()));
                continue;
            }
            let headers =
                m.headers.iter().fold(OwnedHeaders::new_with_capacity(m.headers.len()), |h, (k, v)| {
                    h.insert(Header { key: k, value: Some(v.as_bytes()) })
                });
            let record =
                FutureRecord::to(&m.topic).key(m.key.as_bytes()).payload(&m.payload).headers(headers);
            let sent = producer.send_result(record).map_err(|(e, _)| classify(&e));
            if sent.is_err() {
                refused.insert(m.key.clone());
            }
            pending.push(sent);
        }
        let mut results = Vec::with_capacity(pending.len());
        for delivery in pending {
            results.push(match delivery {
                Err(e) => Err(e),
                Ok(future) => match future.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(classify(&e)),
                    Err(_) => Err(PublishError::Retriable("producer dropped the delivery report".into())),
                },
            });
        }
        // With idempotence on, librdkafka can enter a fatal state in which every message
        // fails; the per-message errors do not always say so, the client does.
        if let Some((code, reason)) = producer.client().fatal_error() {
            let fatal = PublishError::Fatal(format!("{code}: {reason}"));
            for result in &mut results {
                if result.is_err() {
                    *result = Err(fatal.clone());
                }
            }
        }
        results
    }

    async fn flush(&self, timeout: Duration) {
        let producer = self.producer();
        let _ = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
    }

    async fn recover(&self) -> anyhow::Result<()> {
        let fresh =
            Self::create(&self.config).context("re-creating the Kafka producer after a fatal error")?;
        let old = match self.producer.write() {
            Ok(mut producer) => std::mem::replace(&mut *producer, fresh),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), fresh),
        };
        // Dropping a producer purges its queue; do it off the async threads.
        tokio::task::spawn_blocking(move || drop(old)).await.context("dropping the failed producer")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producer_lingers_as_configured() {
        let settings = KafkaSettings {
            brokers: "127.0.0.1:9".into(),
            message_timeout: Duration::from_secs(10),
            message_max_bytes: 1_000_000,
            linger: Duration::from_millis(7),
            properties: vec![("linger.ms".into(), "500".into())],
        };
        let publisher = KafkaPublisher::new(&settings).expect("producer");
        assert_eq!(publisher.config.get("linger.ms"), Some("7"));
        assert_eq!(publisher.config.get("acks"), Some("all"), "the relay's guarantees are not configurable");
    }

    #[test]
    fn only_the_gapless_guarantee_warning_is_quietened() {
        let gapless =
            "Configuration property enable.gapless.guarantee is experimental: When set to `true`, …";
        assert!(ProducerContext::expected("CONFWARN", gapless));
        let other = "Configuration property fetch.wait.max.ms is a consumer property and will be ignored by this producer instance";
        assert!(!ProducerContext::expected("CONFWARN", other), "other configuration warnings stay warnings");
        assert!(!ProducerContext::expected("FAIL", gapless));
    }

    #[test]
    fn a_fenced_producer_is_fatal_not_retriable() {
        // tansu answered an idempotent producer ProducerFenced for 95 s after an outage:
        // retrying the same producer never helps, a rebuilt one does.
        for code in [
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::Fenced,
            RDKafkaErrorCode::Fatal,
        ] {
            let classified = classify(&KafkaError::MessageProduction(code));
            assert!(matches!(classified, PublishError::Fatal(_)), "{code:?}: {classified:?}");
        }
        let too_large = classify(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(matches!(too_large, PublishError::Permanent(_)));
        let timeout = classify(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut));
        assert!(matches!(timeout, PublishError::Retriable(_)));
    }
}
