//! Runs the inbox against Kafka: consumer group `APP_KAFKA__GROUP_ID`, one worker per
//! assigned partition (messages of a partition in order, partitions in parallel up to a
//! bound), offsets stored only after a message is done and committed by librdkafka in the
//! background; on shutdown the in-flight message finishes, offsets are committed
//! synchronously and the consumer leaves the group.
//!
//! The poll loop never waits on a worker: a partition whose worker falls
//! [`PAUSE_AT`] messages behind is paused (librdkafka stops fetching it) and resumed once
//! the worker is down to [`RESUME_AT`], so one stuck partition never stalls the others nor
//! trips `max.poll.interval.ms`. librdkafka keeps that pause across a revoke, and a paused
//! partition never delivers the message that would start (and resume) its next worker, so
//! every assignment resumes what it assigns. When a rebalance revokes partitions, their workers are
//! told to stop before the revoke completes: queued messages are dropped (the next owner
//! reads them from the committed offset), an in-flight one finishes, and the inbox table
//! turns any overlap with the next owner into a counted duplicate.
//!
//! A partition nobody consumes is the one failure the group protocol never reports to its
//! members: every member is steady, and the partition's messages wait on the topic. A
//! watchdog therefore looks at the partitions this member does not hold, every quarter of
//! [`stall_after`]: one whose committed offset trails its end and has not moved for that long
//! makes this member leave and rejoin the group, which starts a fresh assignment. Measured
//! case: tansu 0.6 keeps a member that vanished without leaving (`kill -9`) in its stored
//! assignment after the session expired, so its partitions stayed unconsumed for good.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use rdkafka::{
    ClientContext, Message, Offset, Statistics, TopicPartitionList,
    consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    message::Headers,
};
use tokio::sync::mpsc;
use tokio::{sync::Semaphore, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{InboundMessage, Inbox};
use crate::{metrics::Metrics, publish::KafkaSettings};

/// A partition's worker is paused once this many of its messages wait.
pub const PAUSE_AT: usize = 64;
/// ...and resumed once it is down to this many.
pub const RESUME_AT: usize = 16;

/// `(topic, partition)`.
type PartitionKey = (String, i32);

/// Receives librdkafka's statistics (consumer lag per partition) and rebalance callbacks.
pub struct InboxContext {
    metrics: Arc<Metrics>,
    /// Stop tokens of the running workers, so a revoke can stop them synchronously.
    workers: Mutex<HashMap<PartitionKey, CancellationToken>>,
    /// Partitions this consumer paused; the lock also serializes pause and resume.
    paused: Mutex<HashSet<PartitionKey>>,
    /// The group membership (`state`, `join_state`) librdkafka's statistics last reported.
    group: Mutex<(String, String)>,
}

impl InboxContext {
    fn paused(&self) -> std::sync::MutexGuard<'_, HashSet<PartitionKey>> {
        self.paused.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Logs every change of the group membership and keeps `inbox_group_steady`: a member
    /// that stays out of `up`/`steady` holds no partitions, and nothing else would say so.
    fn record_group(&self, cgrp: &rdkafka::statistics::ConsumerGroup) {
        let mut group = self.group.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if group.0 != cgrp.state || group.1 != cgrp.join_state {
            tracing::info!(state = %cgrp.state, join_state = %cgrp.join_state, assigned = cgrp.assignment_size,
                "inbox: consumer group membership");
            *group = (cgrp.state.clone(), cgrp.join_state.clone());
        }
        let steady = cgrp.state == "up" && cgrp.join_state == "steady";
        self.metrics.inbox_group_steady.set(i64::from(steady));
    }
}

impl ClientContext for InboxContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(cgrp) = &statistics.cgrp {
            self.record_group(cgrp);
        }
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's "no partition"; a partition this consumer is not assigned
                // (any more) keeps stale figures in the statistics, so only assigned ones count.
                if *partition < 0 {
                    continue;
                }
                let partition = partition.to_string();
                let labels = [topic.as_str(), partition.as_str()];
                if p.desired && p.consumer_lag >= 0 {
                    self.metrics.inbox_consumer_lag.with_label_values(&labels).set(p.consumer_lag);
                } else if !p.desired {
                    let _ = self.metrics.inbox_consumer_lag.remove_label_values(&labels);
                }
            }
        }
    }
}

impl ConsumerContext for InboxContext {
    /// Runs on the polling task before librdkafka gives revoked partitions up.
    fn pre_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else { return };
        let mut workers = self.workers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for element in revoked.elements() {
            let key = (element.topic().to_owned(), element.partition());
            if let Some(stop) = workers.remove(&key) {
                stop.cancel();
            }
            let _ = self.metrics.inbox_consumer_lag.remove_label_values(&[&key.0, &key.1.to_string()]);
            self.paused().remove(&key);
        }
        self.metrics.inbox_partitions_paused.set(self.paused().len() as i64);
        if revoked.count() > 0 {
            tracing::info!(
                partitions = revoked.count(),
                "inbox: partitions revoked; their queued work is dropped"
            );
        }
    }

    /// Resumes every assigned partition: one paused before a revoke (here or, earlier, by
    /// this consumer before it moved away) would otherwise stay paused for good.
    /// Also keeps `inbox_partitions_assigned`: a steady member holding nothing is otherwise
    /// invisible.
    fn post_rebalance(&self, consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Ok(assignment) = consumer.assignment() {
            self.metrics.inbox_partitions_assigned.set(assignment.count() as i64);
        }
        let Rebalance::Assign(assigned) = rebalance else { return };
        if assigned.count() == 0 {
            return;
        }
        if let Err(e) = consumer.resume(assigned) {
            tracing::warn!(error = %e, "inbox: could not resume the assigned partitions");
        }
    }
}

/// The Kafka runner.
pub struct KafkaInbox {
    consumer: Arc<StreamConsumer<InboxContext>>,
    inbox: Arc<Inbox>,
    metrics: Arc<Metrics>,
    /// How long a partition this member does not hold may trail without progress before
    /// this member rejoins the group.
    stall_after: Duration,
}

/// The dispatcher's handle on one partition's worker.
struct WorkerHandle {
    queue: mpsc::UnboundedSender<InboundMessage>,
    /// Messages handed to the worker and not finished yet.
    queued: Arc<AtomicUsize>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl KafkaInbox {
    /// Creates the group consumer (it joins on [`KafkaInbox::run`]).
    pub fn new(settings: &KafkaSettings, inbox: Arc<Inbox>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let context = InboxContext {
            metrics: metrics.clone(),
            workers: Mutex::new(HashMap::new()),
            paused: Mutex::new(HashSet::new()),
            group: Mutex::default(),
        };
        let consumer: StreamConsumer<InboxContext> = settings
            .client_config()
            .set("group.id", &inbox.settings().group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            // Offsets are stored by hand, after the message's transaction committed.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "5000")
            .set("max.poll.interval.ms", max_poll_interval(settings))
            .create_with_context(context)
            .context("creating the Kafka consumer (check APP_KAFKA__*)")?;
        Ok(Self { consumer: Arc::new(consumer), inbox, metrics, stall_after: stall_after(settings) })
    }

    /// Consumes until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let topics = self.inbox.topics();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = self.consumer.subscribe(&names) {
            tracing::error!(error = %e, "inbox: cannot subscribe; consumer not running");
            return;
        }
        let watchdog = tokio::spawn(watch_for_orphans(
            self.consumer.clone(),
            topics.clone(),
            self.stall_after,
            self.metrics.clone(),
            stop.clone(),
        ));
        let permits = Arc::new(Semaphore::new(self.inbox.settings().max_parallel_partitions.max(1)));
        let mut workers: HashMap<PartitionKey, WorkerHandle> = HashMap::new();
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
            // A revoked worker stops; a message for the partition (reassigned) starts a new one
            // that waits for the old one's in-flight message first.
            let predecessor = match workers.remove(&key) {
                Some(worker) if worker.stop.is_cancelled() => Some(worker.task),
                Some(worker) => {
                    workers.insert(key.clone(), worker);
                    None
                }
                None => None,
            };
            let worker = workers
                .entry(key.clone())
                .or_insert_with(|| self.spawn_worker(&key, &permits, &stop, predecessor));
            let offset = message.offset;
            if worker.queue.send(message).is_err() {
                // The worker is gone without being revoked: never skip past its message.
                self.metrics.inbox_dispatch_failures.with_label_values(&[&key.0]).inc();
                tracing::error!(topic = %key.0, partition = key.1, offset,
                    "inbox: partition worker died; rewinding to its message");
                workers.remove(&key);
                let seek = self.consumer.seek(
                    &key.0,
                    key.1,
                    Offset::Offset(offset),
                    std::time::Duration::from_secs(5),
                );
                if let Err(e) = seek {
                    tracing::error!(error = %e, "inbox: rewind failed; the partition restarts from its committed offset");
                }
                continue;
            }
            let queued = worker.queued.fetch_add(1, Ordering::AcqRel) + 1;
            if queued >= PAUSE_AT {
                set_paused(&self.consumer, &key, true);
                // The worker may have drained its queue between the count and the pause,
                // past the point where it resumes: look again, or the partition stays
                // paused with nothing queued that would ever resume it.
                if worker.queued.load(Ordering::Acquire) <= RESUME_AT {
                    set_paused(&self.consumer, &key, false);
                }
            }
        }
        watchdog.abort();
        let handles: Vec<JoinHandle<()>> = workers.into_values().map(|w| w.task).collect();
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

    fn spawn_worker(
        &self,
        key: &PartitionKey,
        permits: &Arc<Semaphore>,
        stop: &CancellationToken,
        predecessor: Option<JoinHandle<()>>,
    ) -> WorkerHandle {
        let (queue, messages) = mpsc::unbounded_channel();
        let worker_stop = stop.child_token();
        self.consumer
            .context()
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), worker_stop.clone());
        let queued = Arc::new(AtomicUsize::new(0));
        // A partition assigned again may still carry an earlier worker's pause.
        set_paused(&self.consumer, key, false);
        let worker = Worker {
            consumer: self.consumer.clone(),
            inbox: self.inbox.clone(),
            permits: permits.clone(),
            stop: worker_stop.clone(),
            queued: queued.clone(),
            key: key.clone(),
        };
        let task = tokio::spawn(worker.run(messages, predecessor));
        WorkerHandle { queue, queued, stop: worker_stop, task }
    }
}

/// How long a partition this member does not hold may trail its end without its committed
/// offset moving before this member forces a new assignment: twice the session timeout (a
/// vanished member's partitions move after one) plus 10 s for the rebalance itself.
pub fn stall_after(settings: &KafkaSettings) -> Duration {
    Duration::from_millis(2 * session_timeout_ms(settings)) + Duration::from_secs(10)
}

/// `session.timeout.ms` from `APP_KAFKA__PROPERTIES`, or librdkafka's default.
fn session_timeout_ms(settings: &KafkaSettings) -> u64 {
    property(settings, "session.timeout.ms").and_then(|v| v.parse().ok()).unwrap_or(45_000)
}

/// A librdkafka property given in `APP_KAFKA__PROPERTIES`.
fn property(settings: &KafkaSettings, key: &str) -> Option<String> {
    settings.properties.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// Each librdkafka request of the watchdog waits at most this long.
const WATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Every quarter of `stall_after`, looks at the partitions of `topics` this member does not
/// hold and rejoins the group when one has trailed without progress for `stall_after`. After
/// a rejoin the clocks restart, and each further rejoin waits twice as long (at most 10
/// minutes, back to `stall_after` once every partition elsewhere is caught up), so a
/// partition stuck for another reason (its owner's handler failing) costs a rebalance now
/// and then, not a storm. While waiting it costs a metadata request, an
/// offset fetch and two watermark requests per partition not held, per check.
async fn watch_for_orphans(
    consumer: Arc<StreamConsumer<InboxContext>>,
    topics: Vec<String>,
    stall_after: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut progress: HashMap<PartitionKey, (i64, Instant)> = HashMap::new();
    let mut patience = stall_after;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(stall_after / 4) => {}
        }
        let (watched, names) = (consumer.clone(), topics.clone());
        let checked = tokio::task::spawn_blocking(move || {
            let stalled = stalled_elsewhere(&watched, &names, &mut progress, patience);
            (stalled, progress)
        })
        .await;
        let Ok((stalled, returned)) = checked else {
            tracing::error!("inbox: the orphan check panicked; the watchdog stops");
            return;
        };
        progress = returned;
        let stalled = match stalled {
            Ok(stalled) if stalled.is_empty() => {
                if progress.is_empty() {
                    patience = stall_after; // every partition elsewhere is caught up
                }
                continue;
            }
            Ok(stalled) => stalled,
            Err(e) => {
                // No view of the group (broker unreachable): the clocks restart afterwards.
                tracing::debug!(error = %e, "inbox: orphan check skipped");
                progress.clear();
                continue;
            }
        };
        tracing::warn!(?stalled, after = ?patience,
            "inbox: partitions no member consumes; leaving and rejoining the group for a new assignment");
        metrics.inbox_group_rejoins.inc();
        let (rejoining, names) = (consumer.clone(), topics.clone());
        let rejoined = tokio::task::spawn_blocking(move || {
            rejoining.unsubscribe();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            rejoining.subscribe(&names)
        })
        .await;
        if let Ok(Err(e)) = rejoined {
            tracing::error!(error = %e, "inbox: could not subscribe again; retrying at the next check");
        }
        progress.clear();
        patience = (patience * 2).min(Duration::from_secs(600));
    }
}

/// The partitions of `topics` not assigned to this member whose committed offset trails the
/// end and has not moved for `patience`, updating `progress` (offset, unchanged since).
fn stalled_elsewhere(
    consumer: &StreamConsumer<InboxContext>,
    topics: &[String],
    progress: &mut HashMap<PartitionKey, (i64, Instant)>,
    patience: Duration,
) -> Result<Vec<PartitionKey>, rdkafka::error::KafkaError> {
    let held: HashSet<PartitionKey> =
        consumer.assignment()?.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
    let mut others = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), WATCH_TIMEOUT)?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            if !held.contains(&(topic.clone(), partition.id())) {
                others.add_partition(topic, partition.id());
            }
        }
    }
    progress.retain(|key, _| !held.contains(key));
    if others.count() == 0 {
        return Ok(Vec::new());
    }
    let committed = consumer.committed_offsets(others, WATCH_TIMEOUT)?;
    let now = Instant::now();
    let mut stalled = Vec::new();
    for element in committed.elements() {
        let key = (element.topic().to_owned(), element.partition());
        let (low, high) = consumer.fetch_watermarks(&key.0, key.1, WATCH_TIMEOUT)?;
        // Never committed: the group starts at the beginning (auto.offset.reset = earliest).
        let position = match element.offset() {
            Offset::Offset(offset) => offset.max(low),
            _ => low,
        };
        if position >= high {
            progress.remove(&key);
            continue;
        }
        let since = progress.entry(key.clone()).or_insert((position, now));
        if since.0 != position {
            *since = (position, now);
        }
        if now.duration_since(since.1) >= patience {
            stalled.push(key);
        }
    }
    Ok(stalled)
}

/// How long a rebalance waits for members to rejoin (librdkafka sends `max.poll.interval.ms`
/// as the rebalance timeout). The poll loop never waits on a worker, so the 5-minute default
/// would only lengthen a rebalance waiting on a member that will not rejoin; the session
/// timeout is the least librdkafka accepts. A value in `APP_KAFKA__PROPERTIES` wins.
fn max_poll_interval(settings: &KafkaSettings) -> String {
    property(settings, "max.poll.interval.ms").unwrap_or_else(|| session_timeout_ms(settings).to_string())
}

/// Pauses or resumes fetching one partition unless it already is (paused or not);
/// librdkafka may refuse, e.g. for a partition revoked meanwhile.
fn set_paused(consumer: &StreamConsumer<InboxContext>, key: &PartitionKey, pause: bool) {
    let context = consumer.context();
    let mut paused = context.paused();
    if paused.contains(key) == pause {
        return;
    }
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition(&key.0, key.1);
    let result = if pause { consumer.pause(&partitions) } else { consumer.resume(&partitions) };
    match result {
        Ok(()) if pause => {
            paused.insert(key.clone());
        }
        Ok(()) => {
            paused.remove(key);
        }
        Err(e) => {
            tracing::debug!(error = %e, topic = %key.0, partition = key.1, pause, "inbox: pause/resume refused");
        }
    }
    context.metrics.inbox_partitions_paused.set(paused.len() as i64);
}

/// Processes one partition's messages in order.
struct Worker {
    consumer: Arc<StreamConsumer<InboxContext>>,
    inbox: Arc<Inbox>,
    permits: Arc<Semaphore>,
    /// Cancelled by a revoke of this partition or by shutdown.
    stop: CancellationToken,
    queued: Arc<AtomicUsize>,
    key: PartitionKey,
}

impl Worker {
    async fn run(
        self,
        mut messages: mpsc::UnboundedReceiver<InboundMessage>,
        predecessor: Option<JoinHandle<()>>,
    ) {
        if let Some(previous) = predecessor {
            let _ = previous.await; // its in-flight message commits before we start
        }
        while let Some(message) = messages.recv().await {
            if self.stop.is_cancelled() {
                return; // not processed, offset not stored: redelivered to the next owner
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
            let queued = self.queued.fetch_sub(1, Ordering::AcqRel) - 1;
            if queued <= RESUME_AT {
                set_paused(&self.consumer, &self.key, false);
            }
        }
    }
}

/// A Kafka record as the inbox sees it (headers as UTF-8, lossily).
pub fn inbound(message: &rdkafka::message::BorrowedMessage<'_>) -> InboundMessage {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(properties: &[(&str, &str)]) -> KafkaSettings {
        KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            message_timeout: Duration::from_secs(10),
            message_max_bytes: 1_000_000,
            linger: Duration::ZERO,
            properties: properties.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }

    #[test]
    fn the_watchdog_waits_past_a_takeover_by_the_broker() {
        // A vanished member's partitions move after one session timeout plus a rebalance;
        // the watchdog must not act before that.
        assert_eq!(stall_after(&settings(&[])), Duration::from_secs(100));
        assert_eq!(stall_after(&settings(&[("session.timeout.ms", "6000")])), Duration::from_secs(22));
        assert_eq!(max_poll_interval(&settings(&[("session.timeout.ms", "6000")])), "6000");
        assert_eq!(max_poll_interval(&settings(&[("max.poll.interval.ms", "9000")])), "9000");
    }
}
