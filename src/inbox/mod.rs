//! The inbox: idempotent consumption of other services' events.
//!
//! Each message is handled in one transaction: insert `(consumer, message id)` into
//! `inbox` (`ON CONFLICT DO NOTHING`); only if that inserted a row is the effect applied;
//! commit; and only then may the runner store the Kafka offset. A redelivered message
//! finds its row and is acknowledged as a duplicate, never applied twice.
//!
//! - An unreachable database is retried with backoff without limit and the offset is not
//!   stored, so no message is ever skipped.
//! - An attempt that aborts (deadlock, serialization failure, lock or statement timeout) is
//!   retried up to `APP_INBOX__MAX_ATTEMPTS` times, then the message is dead-lettered: one
//!   message cannot hold its partition forever.
//! - Poison messages (undecodable, unknown type, invalid, control characters, data the
//!   database rejects, a panicking handler) go to `<topic>.dlq` with headers naming the
//!   error and the source position, are recorded in `inbox_rejection`, and the stream
//!   continues. A failed dead-letter publish is retried (the offset stays put); a fatal or
//!   fenced producer, or one that failed three times in a row, is rebuilt first.
//! - Messages that are valid but not applicable (a payment for an order in another state or
//!   for another amount) are recorded as rejected, visible to operators, and not retried.
//!
//! [`kafka`] runs this against Kafka (one worker per partition, bounded), [`bus`] against
//! the in-process bus of the embedded mode.

pub mod bus;
mod effects;
pub mod kafka;

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    backoff::Backoff,
    metrics::Metrics,
    outbox::Wakeup,
    publish::{Header, OutboundMessage, PublishError, Publisher},
    store::{Store, StoreError},
};

/// Failed dead-letter publishes in a row after which the producer is rebuilt even without a
/// fatal error: one stuck on state the broker no longer has (producer id, epochs) fails
/// every retry, and the partition behind the poison message waits. The relay does the same.
const DLQ_FAILURES_BEFORE_REBUILD: u32 = 3;

/// The customer read model kept from `customers.events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerProjection {
    /// Customer id.
    pub customer_id: String,
    /// Name shown on orders.
    pub display_name: String,
    /// Loyalty tier (`STANDARD`, `GOLD`, …).
    pub tier: String,
    /// Highest version applied.
    pub version: i64,
}

/// An inbound message that was not applied, as recorded for operators.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    /// Consumer name (group / topic).
    pub consumer: String,
    /// CloudEvents id, when the message had one.
    pub message_id: Option<String>,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// CloudEvents type, when known.
    pub event_type: Option<String>,
    /// [`Rejection::REJECTED`] or [`Rejection::DEAD_LETTERED`].
    pub kind: &'static str,
    /// Why.
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
}

impl Rejection {
    /// Understood but not applicable (recorded, not retried).
    pub const REJECTED: &'static str = "rejected";
    /// Poison: sent to the DLQ.
    pub const DEAD_LETTERED: &'static str = "dead-lettered";
}

/// A consumed message, independent of where it came from.
#[derive(Debug, Clone)]
pub struct InboundMessage {
    /// Source topic.
    pub topic: String,
    /// Source partition (0 on the in-process bus).
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// Value.
    pub payload: Vec<u8>,
}

impl InboundMessage {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// What handling a message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect was applied.
    Applied,
    /// Seen before: acknowledged, no effect.
    Duplicate,
    /// Older than what is stored (a customer version): acknowledged, ignored.
    Stale,
    /// Valid but not applicable; recorded.
    Rejected(String),
}

impl Outcome {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::Rejected(_) => "rejected",
        }
    }
}

/// Why a message could not be handled, by what retrying it can achieve.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The database is unreachable: not this message's fault. Retried without limit and
    /// without storing the offset (nothing behind it could be applied either).
    #[error("database unavailable: {0}")]
    Unavailable(#[source] StoreError),
    /// This attempt lost (deadlock, serialization failure, lock or statement timeout, an
    /// unexpected error): retried up to `max_attempts`, then dead-lettered.
    #[error("attempt aborted: {0}")]
    Aborted(#[source] StoreError),
    /// The message can never be applied (undecodable, invalid, or data the database
    /// rejects): dead-letter it at once.
    #[error("poison: {0}")]
    Poison(String),
}

impl From<StoreError> for HandleError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(_) => Self::Unavailable(err),
            StoreError::Rejected(_) => Self::Poison(format!("{:#}", anyhow::Error::from(err))),
            _ => Self::Aborted(err),
        }
    }
}

/// Topics and naming.
#[derive(Debug, Clone)]
pub struct InboxSettings {
    /// Consumer group; also prefixes inbox consumer names.
    pub group_id: String,
    /// Topic of payment events.
    pub payments_topic: String,
    /// Topic of customer events.
    pub customers_topic: String,
    /// Inbox rows older than this are purged (keep it longer than the broker's retention).
    pub retention: Duration,
    /// Upper bound on partitions processed at once.
    pub max_parallel_partitions: usize,
    /// Aborted attempts (deadlock, serialization, lock or statement timeout, unexpected
    /// errors) of one message before it is dead-lettered. A database that is unreachable
    /// is not the message's fault and is retried without limit.
    pub max_attempts: u32,
}

/// The inbox handler shared by the Kafka and bus runners.
pub struct Inbox {
    store: Arc<dyn Store>,
    wakeup: Arc<Wakeup>,
    /// Outbox partitions, for the events the effects emit.
    partitions: i32,
    /// Where poison messages go (`<topic>.dlq`).
    dlq: Arc<dyn Publisher>,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    settings: InboxSettings,
}

impl Inbox {
    /// Builds the handler.
    pub fn new(
        store: Arc<dyn Store>,
        wakeup: Arc<Wakeup>,
        partitions: i32,
        dlq: Arc<dyn Publisher>,
        metrics: Arc<Metrics>,
        backoff: Backoff,
        settings: InboxSettings,
    ) -> Arc<Self> {
        Arc::new(Self { store, wakeup, partitions, dlq, metrics, backoff, settings })
    }

    /// The topics consumed.
    pub fn topics(&self) -> Vec<String> {
        vec![self.settings.payments_topic.clone(), self.settings.customers_topic.clone()]
    }

    /// Settings in force.
    pub fn settings(&self) -> &InboxSettings {
        &self.settings
    }

    fn consumer_name(&self, topic: &str) -> String {
        format!("{}/{topic}", self.settings.group_id)
    }

    /// Handles one message in one transaction (the single step tests drive).
    pub async fn handle(&self, message: &InboundMessage) -> Result<Outcome, HandleError> {
        effects::handle(self, message).await
    }

    /// Handles a message until it is done: retries an unreachable database without limit
    /// and aborted attempts up to `max_attempts` (the offset must not move past an unapplied
    /// message), dead-letters poison and messages that keep aborting. A panicking handler
    /// is poison too. Returns `false` if `stop` fired first, in which case the caller must
    /// not store the offset.
    pub async fn process(self: &Arc<Self>, message: &InboundMessage, stop: &CancellationToken) -> bool {
        let span = crate::telemetry::process_span(message, &self.settings.group_id);
        tracing::Instrument::instrument(self.process_traced(message, stop), span).await
    }

    async fn process_traced(self: &Arc<Self>, message: &InboundMessage, stop: &CancellationToken) -> bool {
        let started = std::time::Instant::now();
        let (mut attempt, mut aborted, mut dlq_failures) = (0u32, 0u32, 0u32);
        let result = loop {
            let poison = match self.handle_isolated(message).await {
                Ok(outcome) => break outcome.label(),
                Err(HandleError::Poison(reason)) => Some(reason),
                Err(HandleError::Aborted(e)) if aborted + 1 >= self.settings.max_attempts => Some(format!(
                    "gave up after {} aborted attempts: {:#}",
                    aborted + 1,
                    anyhow::Error::from(e)
                )),
                Err(e) => {
                    aborted += u32::from(matches!(e, HandleError::Aborted(_)));
                    self.metrics.inbox_retries.with_label_values(&[&message.topic]).inc();
                    tracing::warn!(topic = %message.topic, partition = message.partition, offset = message.offset,
                        attempt, error = format!("{:#}", anyhow::Error::from(e)), "inbox: retrying");
                    None
                }
            };
            if let Some(reason) = poison {
                match self.dead_letter(message, &reason).await {
                    Ok(()) => break "dead_lettered",
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "could not dead-letter; retrying");
                        if let Some(failure) = e.downcast_ref::<PublishError>() {
                            dlq_failures += 1;
                            if matches!(failure, PublishError::Fatal(_)) {
                                self.rebuild_dlq_producer("fatal").await;
                            } else if dlq_failures % DLQ_FAILURES_BEFORE_REBUILD == 0 {
                                self.rebuild_dlq_producer("unresponsive").await;
                            }
                        }
                    }
                }
            }
            attempt += 1;
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(self.backoff.delay(attempt)) => {}
            }
        };
        if result == "dead_lettered" {
            crate::telemetry::failed(&tracing::Span::current(), result);
        }
        self.metrics.inbox_messages.with_label_values(&[&message.topic, result]).inc();
        self.metrics
            .inbox_processing
            .with_label_values(&[&message.topic])
            .observe(started.elapsed().as_secs_f64());
        true
    }

    /// Replaces the dead-letter producer ([`Publisher::recover`]); a failure is logged and
    /// the next attempt tries again.
    async fn rebuild_dlq_producer(&self, reason: &'static str) {
        tracing::warn!(reason, "inbox: rebuilding the dead-letter producer");
        self.metrics.inbox_dlq_producer_rebuilds.with_label_values(&[reason]).inc();
        if let Err(e) = self.dlq.recover().await {
            tracing::error!(error = format!("{e:#}"), "inbox: could not rebuild the dead-letter producer");
        }
    }

    /// [`Inbox::handle`] in a task of its own, so a panic becomes a poison verdict for this
    /// message instead of killing the partition's worker.
    async fn handle_isolated(self: &Arc<Self>, message: &InboundMessage) -> Result<Outcome, HandleError> {
        let (inbox, owned) = (self.clone(), message.clone());
        let handled = tracing::Instrument::in_current_span(async move { inbox.handle(&owned).await });
        match tokio::spawn(handled).await {
            Ok(result) => result,
            Err(join) if join.is_panic() => {
                let panic = join.into_panic();
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(HandleError::Poison(format!("the handler panicked: {what}")))
            }
            Err(join) => Err(HandleError::Aborted(StoreError::Other(anyhow::Error::new(join)))),
        }
    }

    /// Publishes a poison message to `<topic>.dlq` with error headers and records it.
    async fn dead_letter(&self, message: &InboundMessage, reason: &str) -> anyhow::Result<()> {
        tracing::error!(topic = %message.topic, partition = message.partition, offset = message.offset, %reason,
            "inbox: poison message; sending to the DLQ");
        let mut headers: Vec<Header> =
            message.headers.iter().map(|(k, v)| (k.clone().into(), v.clone().into())).collect();
        headers.extend([
            ("dlq_error".into(), reason.to_owned().into()),
            ("dlq_source_topic".into(), message.topic.clone().into()),
            ("dlq_source_partition".into(), message.partition.to_string().into()),
            ("dlq_source_offset".into(), message.offset.to_string().into()),
            ("dlq_consumer".into(), self.settings.group_id.clone().into()),
        ]);
        let dlq = OutboundMessage {
            topic: format!("{}.dlq", message.topic),
            key: message.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
            payload: message.payload.clone(),
            headers,
        };
        if let Some(Err(e)) = self.dlq.publish(vec![dlq]).await.into_iter().next() {
            return Err(anyhow::Error::new(e).context("publishing to the DLQ"));
        }
        let rejection = Rejection {
            consumer: self.consumer_name(&message.topic),
            message_id: message.header("ce_id").map(str::to_owned),
            topic: message.topic.clone(),
            partition: message.partition,
            offset: message.offset,
            event_type: message.header("ce_type").map(str::to_owned),
            kind: Rejection::DEAD_LETTERED,
            reason: reason.to_owned(),
            at: Utc::now(),
        };
        let mut tx = self.store.begin().await?;
        tx.insert_rejection(&rejection).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes one bounded batch of expired inbox rows; returns how many.
    pub async fn purge_once(&self, limit: i64) -> Result<u64, StoreError> {
        let horizon =
            Utc::now() - chrono::Duration::from_std(self.settings.retention).unwrap_or(chrono::Duration::MAX);
        self.store.purge_inbox(horizon, limit).await
    }

    /// Purges expired inbox rows every `interval`, in batches of 1,000 so no statement runs long.
    pub async fn run_retention(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        loop {
            loop {
                match self.purge_once(1000).await {
                    Ok(1000) => continue,
                    Ok(n) => {
                        if n > 0 {
                            tracing::info!(deleted = n, "inbox retention purge");
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "inbox retention purge failed");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
