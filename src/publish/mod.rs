//! The publisher port: where the relay sends events. Two adapters: Kafka (production) and
//! an in-process bus (the embedded default, and what a single-process `cargo run` consumes).
//! Both report per-message outcomes so the relay deletes exactly what was acknowledged.

mod kafka;
mod memory;

use std::{borrow::Cow, time::Duration};

use async_trait::async_trait;

pub use kafka::{KafkaPublisher, KafkaSettings, TopicSettings};
pub use memory::{BusRecord, InMemoryBus};

/// One message to publish.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    /// Destination topic.
    pub topic: String,
    /// Partitioning key (the aggregate id), so one aggregate's events stay in order.
    pub key: String,
    /// Message value.
    pub payload: Vec<u8>,
    /// Headers (CloudEvents binary mode and W3C trace context).
    pub headers: Vec<Header>,
}

/// A header's name and value. Both borrow where they are constant (`ce_specversion: 1.0`),
/// so the relay allocates only the values it computes; owned names and values were the
/// largest single source of its allocations, and dropping them cut the service's CPU per
/// relayed event by a tenth (BENCHMARKS.md, run 6).
pub type Header = (Cow<'static, str>, Cow<'static, str>);

/// Owned header pairs, for code that keeps them (the in-process bus).
pub fn owned_headers(headers: Vec<Header>) -> Vec<(String, String)> {
    headers.into_iter().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

/// Why a message was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Worth retrying later (broker unreachable, timeout, leader moving).
    #[error("retriable: {0}")]
    Retriable(String),
    /// Will never succeed as is (message too large, invalid record): dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The producer itself is broken for good (librdkafka's fatal error state, e.g. an
    /// idempotence sequence desync): nothing it sends will succeed until
    /// [`Publisher::recover`] rebuilds it. The message is retried afterwards.
    #[error("fatal producer error: {0}")]
    Fatal(String),
}

impl PublishError {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Retriable(_) => "retriable",
            Self::Permanent(_) => "permanent",
            Self::Fatal(_) => "fatal",
        }
    }
}

/// The publisher port.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes a batch concurrently; the result for each message, in input order, arrives
    /// only once the broker acknowledged (or definitively failed) it. Messages with the same
    /// key are delivered in input order, and once one of them fails none after it in the
    /// batch is delivered (they fail too): the relay sends an aggregate's consecutive events
    /// in one batch and relies on this to keep them in order.
    async fn publish(&self, messages: Vec<OutboundMessage>) -> Vec<Result<(), PublishError>>;
    /// Waits for anything still in flight (graceful shutdown).
    async fn flush(&self, timeout: Duration);
    /// Replaces a producer that reported [`PublishError::Fatal`] with a fresh one.
    async fn recover(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The error for a message not sent because an earlier one with its key failed.
pub(crate) fn held_back() -> PublishError {
    PublishError::Retriable("not sent: an earlier message with the same key failed".into())
}
