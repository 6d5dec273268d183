//! Kafka adapter (rdkafka, bundled librdkafka): an idempotent producer (`acks=all`,
//! `enable.idempotence=true`), so librdkafka's own retries never duplicate or reorder
//! messages within a partition.

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, Producer},
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

    /// Creates the topics that do not exist yet (brokers without auto-creation, dev clusters).
    pub async fn create_topics(&self, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> =
            self.client_config().create().context("creating the Kafka admin client")?;
        let new: Vec<NewTopic> =
            topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1))).collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&new, &options).await.context("creating Kafka topics")? {
            match result {
                Ok(topic) => tracing::info!(topic, "created Kafka topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => anyhow::bail!("creating Kafka topic {topic}: {code}"),
            }
        }
        Ok(())
    }
}

/// The Kafka publisher.
pub struct KafkaPublisher {
    producer: FutureProducer,
}

impl KafkaPublisher {
    /// Builds the idempotent producer (connections are made lazily by librdkafka).
    pub fn new(settings: &KafkaSettings) -> anyhow::Result<Self> {
        let producer = settings
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", settings.message_timeout.as_millis().to_string())
            .set("message.max.bytes", settings.message_max_bytes.to_string())
            .create()
            .context("creating the Kafka producer (check APP_KAFKA__*)")?;
        Ok(Self { producer })
    }
}

/// Errors that no retry can fix: the record itself is unacceptable.
fn classify(err: &KafkaError) -> PublishError {
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
        // Enqueue everything first so the batch is in flight concurrently, then collect
        // the acknowledgements in order.
        let mut pending = Vec::with_capacity(messages.len());
        for m in &messages {
            let headers =
                m.headers.iter().fold(OwnedHeaders::new_with_capacity(m.headers.len()), |h, (k, v)| {
                    h.insert(Header { key: k.as_str(), value: Some(v.as_bytes()) })
                });
            let record =
                FutureRecord::to(&m.topic).key(m.key.as_bytes()).payload(&m.payload).headers(headers);
            pending.push(self.producer.send_result(record).map_err(|(e, _)| classify(&e)));
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
        results
    }

    async fn flush(&self, timeout: Duration) {
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
    }
}
