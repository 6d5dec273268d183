//! Runs the inbox against Kafka: consumer group `APP_KAFKA__GROUP_ID`, one worker per
//! assigned partition (messages of a partition in order, partitions in parallel up to a
//! bound), offsets stored only after a message is done and committed by librdkafka in the
//! background; on shutdown the in-flight message finishes, offsets are committed
//! synchronously and the consumer leaves the group.

use std::{collections::HashMap, sync::Arc};

use anyhow::Context;
use rdkafka::{
    ClientContext, Message, Statistics,
    consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer},
    message::Headers,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::{InboundMessage, Inbox};
use crate::{metrics::Metrics, publish::KafkaSettings};

/// Receives librdkafka's statistics to export consumer lag per partition.
pub struct LagContext(Arc<Metrics>);

impl ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // librdkafka reports -1 for partitions it does not consume.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    let partition = partition.to_string();
                    self.0.inbox_consumer_lag.with_label_values(&[topic, &partition]).set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for LagContext {}

/// Messages buffered per partition worker (backpressure on the consumer beyond this).
const WORKER_QUEUE: usize = 64;

/// The Kafka runner.
pub struct KafkaInbox {
    consumer: Arc<StreamConsumer<LagContext>>,
    inbox: Arc<Inbox>,
}

impl KafkaInbox {
    /// Creates the group consumer (it joins on [`KafkaInbox::run`]).
    pub fn new(settings: &KafkaSettings, inbox: Arc<Inbox>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let consumer: StreamConsumer<LagContext> = settings
            .client_config()
            .set("group.id", &inbox.settings().group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            // Offsets are stored by hand, after the message's transaction committed.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "5000")
            .create_with_context(LagContext(metrics))
            .context("creating the Kafka consumer (check APP_KAFKA__*)")?;
        Ok(Self { consumer: Arc::new(consumer), inbox })
    }

    /// Consumes until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let topics = self.inbox.topics();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = self.consumer.subscribe(&names) {
            tracing::error!(error = %e, "inbox: cannot subscribe; consumer not running");
            return;
        }
        let permits = Arc::new(Semaphore::new(self.inbox.settings().max_parallel_partitions.max(1)));
        let mut workers: HashMap<(String, i32), mpsc::Sender<InboundMessage>> = HashMap::new();
        let mut handles = Vec::new();
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => break,
                received = self.consumer.recv() => received,
            };
            let message = match received {
                Ok(m) => inbound(&m),
                Err(e) => {
                    tracing::warn!(error = %e, "inbox: consumer error");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => continue,
                    }
                }
            };
            let key = (message.topic.clone(), message.partition);
            let sender = workers.entry(key).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                let worker = Worker {
                    consumer: self.consumer.clone(),
                    inbox: self.inbox.clone(),
                    permits: permits.clone(),
                    stop: stop.clone(),
                };
                handles.push(tokio::spawn(worker.run(rx)));
                tx
            });
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = sender.send(message) => {}
            }
        }
        drop(workers);
        for handle in handles {
            let _ = handle.await;
        }
        let consumer = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "inbox: final offset commit");
            }
            consumer.unsubscribe();
        })
        .await;
        tracing::info!("inbox consumer stopped");
    }
}

/// Processes one partition's messages in order.
struct Worker {
    consumer: Arc<StreamConsumer<LagContext>>,
    inbox: Arc<Inbox>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
}

impl Worker {
    async fn run(self, mut messages: mpsc::Receiver<InboundMessage>) {
        while let Some(message) = messages.recv().await {
            if self.stop.is_cancelled() {
                return; // not processed, offset not stored: redelivered after restart
            }
            let Ok(_permit) = self.permits.acquire().await else { return };
            if !self.inbox.process(&message, &self.stop).await {
                return;
            }
            // librdkafka stores offset + 1, the next message to read.
            if let Err(e) = self.consumer.store_offset(&message.topic, message.partition, message.offset) {
                // Typically the partition was revoked meanwhile; the new owner redelivers and
                // the inbox recognises the duplicate.
                tracing::debug!(error = %e, "inbox: could not store offset");
            }
        }
    }
}

fn inbound(message: &rdkafka::message::BorrowedMessage<'_>) -> InboundMessage {
    let headers = message
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    InboundMessage {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        headers,
        payload: message.payload().unwrap_or_default().to_vec(),
    }
}
