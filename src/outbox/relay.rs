//! The relay: publishes outbox rows of the partitions it leases, in `seq` order per
//! aggregate, and deletes them only after the broker acknowledged them.
//!
//! One pass ([`Relay::relay_once`]) renews leases when due, then publishes one batch from
//! every owned partition together. A batch holds at most one event per aggregate (the
//! oldest), so a failure can never let a later event of the same aggregate overtake an
//! earlier one:
//! - retriable failure: the row gets an attempt, an error and a jittered next-attempt time;
//!   its aggregate waits, other aggregates go on;
//! - permanent failure: the row moves to `outbox_dead_letter`; its aggregate waits until it
//!   is replayed.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{SecondsFormat, Utc};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{OutboxRecord, OutboxStore, Wakeup};
use crate::{
    backoff::Backoff,
    metrics::Metrics,
    publish::{OutboundMessage, PublishError, Publisher},
    store::StoreError,
};

/// Relay tuning.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Number of outbox partitions (P).
    pub partitions: i32,
    /// Rows fetched per partition per pass.
    pub batch_size: i64,
    /// Fallback polling interval when no wake-up arrives.
    pub poll_interval: Duration,
    /// Lease duration; renewed every third of it.
    pub lease_ttl: Duration,
    /// Longest a publish may take; no batch starts with less lease time than this left.
    pub publish_timeout: Duration,
    /// Retry delays for retriable failures.
    pub backoff: Backoff,
    /// Destination topic.
    pub topic: String,
    /// CloudEvents `source`.
    pub source: String,
}

/// What one pass did.
#[derive(Debug, Default, Clone)]
pub struct PassReport {
    /// Rows published and deleted.
    pub published: usize,
    /// Rows that failed retriably and will be tried again.
    pub retried: usize,
    /// Rows moved to the dead-letter table.
    pub dead_lettered: usize,
    /// Partitions whose batch was full: there is more to do right away.
    pub full_batches: usize,
    /// Partitions owned during this pass.
    pub owned: Vec<i32>,
}

/// Lease state of this relay.
#[derive(Debug, Default)]
struct Leases {
    owned: Vec<i32>,
    /// No batch may start after this instant: the lease could have expired by its end.
    publish_until: Option<Instant>,
    renewed_at: Option<Instant>,
}

/// An outbox relay.
pub struct Relay {
    /// Unique id of this relay instance (lease owner).
    owner: String,
    store: Arc<dyn OutboxStore>,
    publisher: Arc<dyn Publisher>,
    wakeup: Arc<Wakeup>,
    metrics: Arc<Metrics>,
    settings: RelaySettings,
    leases: Mutex<Leases>,
    /// When the backlog gauges were last refreshed (they cost a query).
    stats_at: Mutex<Option<Instant>>,
}

impl Relay {
    /// A relay identified by `owner` (unique per process: pod name plus a random suffix).
    pub fn new(
        owner: String,
        store: Arc<dyn OutboxStore>,
        publisher: Arc<dyn Publisher>,
        wakeup: Arc<Wakeup>,
        metrics: Arc<Metrics>,
        settings: RelaySettings,
    ) -> Arc<Self> {
        Arc::new(Self {
            owner,
            store,
            publisher,
            wakeup,
            metrics,
            settings,
            leases: Mutex::new(Leases::default()),
            stats_at: Mutex::new(None),
        })
    }

    /// This relay's lease owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Renews and rebalances leases now; returns the partitions owned.
    pub async fn heartbeat(&self) -> Result<Vec<i32>, StoreError> {
        let mut leases = self.leases.lock().await;
        self.renew(&mut leases).await?;
        Ok(leases.owned.clone())
    }

    async fn renew(&self, leases: &mut Leases) -> Result<(), StoreError> {
        let started = Instant::now();
        let owned = self
            .store
            .acquire_partitions(&self.owner, self.settings.partitions, self.settings.lease_ttl)
            .await?;
        leases.publish_until =
            Some(started + self.settings.lease_ttl.saturating_sub(self.settings.publish_timeout));
        leases.renewed_at = Some(started);
        self.wakeup.set_owned(&owned);
        self.metrics.outbox_partitions_owned.set(owned.len() as i64);
        leases.owned = owned;
        Ok(())
    }

    /// One pass: renew leases if due, fetch one batch per owned partition, publish them all
    /// at once (one round of broker acknowledgements, however many partitions), then
    /// settle each row: delete, schedule a retry, or dead-letter.
    pub async fn relay_once(&self) -> Result<PassReport, StoreError> {
        let mut leases = self.leases.lock().await;
        let due = leases.renewed_at.is_none_or(|at| at.elapsed() >= self.settings.lease_ttl / 3);
        if due {
            self.renew(&mut leases).await?;
        }
        let mut report = PassReport { owned: leases.owned.clone(), ..PassReport::default() };
        let mut batch = Vec::new();
        for &partition in &leases.owned {
            let rows = self.store.fetch_batch(partition, self.settings.batch_size).await?;
            if rows.len() as i64 >= self.settings.batch_size {
                report.full_batches += 1;
            }
            // The oldest row of each aggregate, and only if its backoff has elapsed.
            let mut seen = HashSet::new();
            batch.extend(
                rows.into_iter()
                    .filter(|r| seen.insert((r.aggregate_type.clone(), r.aggregate_id.clone())))
                    .filter(|r| r.due)
                    .map(|r| (partition, r)),
            );
        }
        // Publishing must end before the lease can expire: renewal happens every ttl/3 and
        // ttl exceeds twice the publish timeout, so this only trips after a stall.
        if leases.publish_until.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(owner = %self.owner, "lease too close to expiry after a stall; skipping this pass");
            return Ok(report);
        }
        if !batch.is_empty() {
            self.publish(batch, &mut report).await?;
        }
        drop(leases);
        self.refresh_stats().await;
        Ok(report)
    }

    async fn publish(
        &self,
        mut batch: Vec<(i32, OutboxRecord)>,
        report: &mut PassReport,
    ) -> Result<(), StoreError> {
        let messages = batch.iter_mut().map(|(_, r)| self.message(r)).collect();
        let results = self.publisher.publish(messages).await;
        let mut published: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        for ((partition, row), result) in batch.iter().zip(results) {
            match result {
                Ok(()) => {
                    published.entry(*partition).or_default().push(row.seq);
                    let latency = (Utc::now() - row.created_at).to_std().unwrap_or_default();
                    self.metrics.outbox_publish_latency.observe(latency.as_secs_f64());
                }
                Err(PublishError::Retriable(reason)) => {
                    self.metrics.outbox_publish_errors.with_label_values(&["retriable"]).inc();
                    let retry_in = self.settings.backoff.delay(row.attempts.max(0) as u32);
                    tracing::warn!(seq = row.seq, attempts = row.attempts + 1, ?retry_in, %reason, "publish failed; will retry");
                    self.store.record_failure(row.seq, &reason, retry_in).await?;
                    report.retried += 1;
                }
                Err(PublishError::Permanent(reason)) => {
                    self.metrics.outbox_publish_errors.with_label_values(&["permanent"]).inc();
                    tracing::error!(seq = row.seq, aggregate_id = %row.aggregate_id, %reason, "publish rejected; dead-lettering");
                    if self.store.dead_letter(&self.owner, *partition, row.seq, &reason).await? {
                        report.dead_lettered += 1;
                    }
                }
            }
        }
        for (partition, seqs) in published {
            let deleted = self.store.delete_published(&self.owner, partition, &seqs).await?;
            if (deleted as usize) < seqs.len() {
                tracing::warn!(
                    partition,
                    "lease lost during publish; the new owner republishes (consumers dedupe by ce_id)"
                );
            }
            self.metrics.outbox_published.inc_by(seqs.len() as u64);
            report.published += seqs.len();
        }
        Ok(())
    }

    /// The Kafka message for a row: key = aggregate id, CloudEvents binary-mode headers.
    /// Moves the payload out of the row (the row keeps only what settling it needs).
    fn message(&self, row: &mut OutboxRecord) -> OutboundMessage {
        let mut headers = vec![
            ("ce_specversion", "1.0".to_owned()),
            ("ce_id", row.message_id.to_string()),
            ("ce_type", row.event_type.clone()),
            ("ce_source", self.settings.source.clone()),
            ("ce_time", row.created_at.to_rfc3339_opts(SecondsFormat::Micros, true)),
            ("ce_subject", row.aggregate_id.clone()),
            ("content-type", "application/json".to_owned()),
        ];
        if let Some(tp) = &row.trace.traceparent {
            headers.push(("traceparent", tp.clone()));
        }
        if let Some(ts) = &row.trace.tracestate {
            headers.push(("tracestate", ts.clone()));
        }
        let headers = headers.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        OutboundMessage {
            topic: self.settings.topic.clone(),
            key: row.aggregate_id.clone(),
            payload: std::mem::take(&mut row.payload),
            headers,
        }
    }

    async fn refresh_stats(&self) {
        let mut at = self.stats_at.lock().await;
        if at.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *at = Some(Instant::now());
        match self.store.stats().await {
            Ok(stats) => {
                self.metrics.outbox_pending.set(stats.pending);
                self.metrics.outbox_oldest_age.set(stats.oldest_age_seconds);
                self.metrics.outbox_dead_letters.set(stats.dead_letters);
            }
            Err(e) => tracing::debug!(error = %e, "outbox stats unavailable"),
        }
    }

    /// Runs passes until `shutdown`: immediately again after a full batch, otherwise on a
    /// wake-up or the poll interval. A panicking pass is logged and the loop goes on. On
    /// shutdown the in-flight pass finishes, the producer is flushed and leases released.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let relay = self.clone();
            let pass = tokio::spawn(async move { relay.relay_once().await });
            let wait = match pass.await {
                Ok(Ok(report)) if report.full_batches > 0 => {
                    failures = 0;
                    Duration::ZERO
                }
                Ok(Ok(report)) => {
                    failures = 0;
                    if report.retried > 0 {
                        self.settings.backoff.ceiling(0)
                    } else {
                        self.settings.poll_interval
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = format!("{:#}", anyhow::Error::from(e)), "relay pass failed");
                    failures += 1;
                    self.settings.backoff.delay(failures)
                }
                Err(join) => {
                    tracing::error!(error = %join, "relay pass panicked");
                    failures += 1;
                    self.settings.backoff.delay(failures)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wakeup.notified(), if wait > Duration::ZERO => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.publisher.flush(self.settings.publish_timeout).await;
        if let Err(e) = self.store.release_partitions(&self.owner).await {
            tracing::warn!(error = %e, "could not release leases; they expire on their own");
        }
        self.wakeup.set_owned(&[]);
        self.metrics.outbox_partitions_owned.set(0);
        tracing::info!(owner = %self.owner, "relay stopped");
    }
}
