//! The relay: publishes outbox rows of the partitions it leases, in `seq` order per
//! aggregate, and deletes them only after the broker acknowledged them.
//!
//! A pass renews leases when due, fetches the due rows of every owned
//! partition in one statement, hands them to the producer as one batch and takes in the
//! batches that landed. Each batch is published and then settled (one statement) by a task
//! of its own, and up to `in_flight_batches` batches are out at once, so fetching, the
//! broker's round and settling overlap instead of waiting for each other. Once caught up,
//! a pass waits for the broker's acknowledgements but not for the settles.
//! [`Relay::relay_once`] is one pass with a window of one (fetch, publish, settle), the
//! deterministic step tests drive.
//!
//! Order per aggregate: a fetch skips every aggregate with an event in flight, so an
//! aggregate's later events are handed over only after its earlier ones were settled. Inside
//! a batch an aggregate's consecutive events go out together, in order, to one Kafka
//! partition (same key); the [`Publisher`] contract keeps them in order and delivers none
//! after the first that failed. Settling follows the same rule: once an event of an
//! aggregate failed, its later events in the batch are retried after it; one that was
//! delivered anyway (the contract broken) is counted in `outbox_order_violations_total` and
//! published again after its predecessor, so the last copy a consumer sees is in order.
//! - retriable failure: the row gets an attempt, an error and a jittered next-attempt time;
//!   its aggregate waits, other aggregates go on;
//! - permanent failure: the row moves to `outbox_dead_letter`; its aggregate waits until it
//!   is replayed;
//! - fatal producer error: the relay settles what is in flight, releases its leases,
//!   rebuilds the producer and backs off.
//!
//! Leases change only with nothing in flight: a partition released while one of its batches
//! is unacknowledged could be fetched and published by its next owner in between.
//!
//! Waiting costs nothing: a pass that got no acknowledgement at all (broker unreachable)
//! starts a backoff during which commits do not wake the relay; leases are still renewed.
//! The window opens only while batches are acknowledged (slow start), so a dead broker
//! costs one batch per backoff.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashSet, VecDeque},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{SecondsFormat, Utc};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Lease, OutboxRecord, OutboxStore, RelayIdentity, Settle, Settlement, Wakeup};
use crate::{
    backoff::Backoff,
    metrics::Metrics,
    publish::{Header, OutboundMessage, PublishError, Publisher},
    resilience::{Policy, breaker::Permit},
    store::StoreError,
    telemetry,
};

/// Consecutive passes without any acknowledgement after which the producer is rebuilt.
const UNRESPONSIVE_PASSES: u32 = 3;
/// How long after another relay's membership expires this one renews, so that by the
/// database's clock it has expired when the statement runs.
const AFTER_EXPIRY: Duration = Duration::from_millis(100);

/// Relay tuning.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Number of outbox partitions (P).
    pub partitions: i32,
    /// Rows fetched per partition per pass.
    pub batch_size: i64,
    /// Batches with the broker at once (the pipeline's depth); 1 = fetch, publish and
    /// settle strictly one after the other.
    pub in_flight_batches: usize,
    /// Fallback polling interval when no wake-up arrives.
    pub poll_interval: Duration,
    /// Lease duration; renewed every third of it.
    pub lease_ttl: Duration,
    /// Longest a publish may take; no batch starts with less lease time than this left.
    pub publish_timeout: Duration,
    /// Retry delays for retriable failures, per row and for the relay during an outage.
    pub backoff: Backoff,
    /// Destination topic.
    pub topic: String,
    /// CloudEvents `source`.
    pub source: String,
}

/// What one pass did.
#[derive(Debug, Default, Clone)]
pub struct PassReport {
    /// Rows the broker acknowledged.
    pub published: usize,
    /// Rows that failed retriably and will be tried again.
    pub retried: usize,
    /// Rows moved to the dead-letter table.
    pub dead_lettered: usize,
    /// Rows whose settlement the lease no longer covered (another relay owns them now).
    pub fenced: usize,
    /// Partitions that returned a full batch of due heads: there is more to do right away.
    pub full_batches: usize,
    /// Rows were attempted and the broker acknowledged none (unreachable, or a fatal
    /// producer error): the run loop backs off instead of re-reading.
    pub outage: bool,
    /// The producer reported a fatal error; it was rebuilt and the leases released.
    pub fatal: bool,
    /// The Kafka breaker is open: nothing was fetched or published.
    pub refused: bool,
    /// When the earliest retry this relay scheduled becomes due, if one is pending.
    pub next_retry_in: Option<Duration>,
    /// Partitions owned during this pass.
    pub owned: Vec<i32>,
}

/// A batch handed to the producer and not settled yet.
struct Flight {
    /// Its rows' aggregates: the next fetch skips them until the settle has committed.
    aggregates: Vec<String>,
    /// The broker breaker's permit, answered once the acknowledgements are in.
    permit: Option<Permit>,
    /// Publishes the batch, then settles it on its own connection, so settling one batch
    /// overlaps fetching the next.
    landing: tokio::task::JoinHandle<Result<Landed, StoreError>>,
    /// Set once the broker answered for the whole batch: `true` if it acknowledged any of
    /// it. A caught-up relay fetches again then, while the batch settles.
    answered: tokio::sync::watch::Receiver<Option<bool>>,
}

/// What one batch came to once acknowledged and settled.
#[derive(Debug, Default)]
struct Landed {
    published: usize,
    retried: usize,
    dead_lettered: usize,
    /// Rows whose settlement the lease no longer covered.
    fenced: usize,
    /// The producer reported a fatal error.
    fatal: bool,
    /// When the rows that failed retriably come due again.
    retries: Vec<Instant>,
}

/// Batches handed to the producer and not settled yet, oldest first. Owned by the run loop,
/// so a pass can end with batches still in flight.
#[derive(Default)]
struct Window(VecDeque<Flight>);

impl Window {
    /// Nothing in flight.
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The aggregates with an event in flight, which the next fetch must skip: borrowed, and
    /// neither sorted nor deduplicated (the database hashes them), since every pass asks.
    fn aggregates(&self) -> Vec<&str> {
        self.0.iter().flat_map(|f| f.aggregates.iter().map(String::as_str)).collect()
    }

    /// Waits until the broker answered for every batch in flight; `false` if it acknowledged
    /// nothing of one of them (or its task ended without saying).
    async fn acknowledged(&mut self) -> bool {
        for flight in &mut self.0 {
            if !matches!(flight.answered.wait_for(Option::is_some).await.as_deref(), Ok(Some(true))) {
                return false;
            }
        }
        true
    }
}

/// Lease state of this relay.
#[derive(Debug, Default)]
struct Leases {
    held: Vec<Lease>,
    /// What the last acquisition said this relay should hold.
    fair_share: usize,
    /// No batch may start after this instant: the lease could have expired by its end.
    publish_until: Option<Instant>,
    renewed_at: Option<Instant>,
    /// The next renewal: a third of the TTL after the last, or just after another relay's
    /// membership expires if that comes sooner.
    renew_at: Option<Instant>,
    /// When the retries this relay scheduled come due (earliest first): after a pass that
    /// found nothing due, the next one starts at the earliest rather than at the poll
    /// interval. Bounded: one entry per row retried, popped once due.
    retries: BinaryHeap<Reverse<Instant>>,
}

/// An outbox relay.
pub struct Relay {
    /// Lease owner id and this process's instance.
    identity: RelayIdentity,
    store: Arc<dyn OutboxStore>,
    publisher: Arc<dyn Publisher>,
    wakeup: Arc<Wakeup>,
    metrics: Arc<Metrics>,
    settings: RelaySettings,
    leases: Mutex<Leases>,
    /// When the backlog gauges were last refreshed (they cost a query).
    stats_at: Mutex<Option<Instant>>,
    /// A background refresh of the gauges is under way.
    refreshing: AtomicBool,
    /// The broker's breaker, when publishing to Kafka: while it is open, passes neither read
    /// the outbox nor publish.
    publish_policy: OnceLock<Arc<Policy>>,
}

impl Relay {
    /// A relay identified by `owner` (unique among live relays: pod name plus a random
    /// suffix by default); the store refuses a second live process with the same owner.
    pub fn new(
        owner: String,
        store: Arc<dyn OutboxStore>,
        publisher: Arc<dyn Publisher>,
        wakeup: Arc<Wakeup>,
        metrics: Arc<Metrics>,
        settings: RelaySettings,
    ) -> Arc<Self> {
        Arc::new(Self {
            identity: RelayIdentity { owner, instance: uuid::Uuid::new_v4() },
            store,
            publisher,
            wakeup,
            metrics,
            settings,
            leases: Mutex::new(Leases::default()),
            stats_at: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            publish_policy: OnceLock::new(),
        })
    }

    /// Puts publishing behind the broker's breaker: a pass the broker acknowledged nothing
    /// of counts as a failure, any acknowledgement as a success.
    pub fn guard_publishing(&self, policy: Arc<Policy>) {
        let _ = self.publish_policy.set(policy);
    }

    /// This relay's lease owner id.
    pub fn owner(&self) -> &str {
        &self.identity.owner
    }

    /// Renews and rebalances leases now; returns the partitions owned.
    pub async fn heartbeat(&self) -> Result<Vec<i32>, StoreError> {
        let mut leases = self.leases.lock().await;
        self.wakeup.take_rebalance();
        self.renew(&mut leases).await?;
        Ok(partitions(&leases.held))
    }

    /// Renewal is due every third of the TTL, just after another relay's membership expires
    /// (a killed relay's partitions move then), at once when membership changed, and every
    /// poll interval while this relay holds less than its fair share (others still have to
    /// let go; without LISTEN there is no notification when they do).
    fn renew_due(&self, leases: &Leases) -> bool {
        let rebalance = self.wakeup.take_rebalance();
        let (Some(at), Some(renew_at)) = (leases.renewed_at, leases.renew_at) else { return true };
        let short = self.settings.poll_interval.min(self.settings.lease_ttl / 3);
        rebalance
            || Instant::now() >= renew_at
            || (leases.held.len() < leases.fair_share && at.elapsed() >= short)
    }

    async fn renew(&self, leases: &mut Leases) -> Result<(), StoreError> {
        let started = Instant::now();
        // Until a renewal succeeds, every pass tries again (and idling waits the usual third).
        leases.renew_at = None;
        let membership = self
            .store
            .acquire_partitions(&self.identity, self.settings.partitions, self.settings.lease_ttl)
            .await?;
        leases.publish_until =
            Some(started + self.settings.lease_ttl.saturating_sub(self.settings.publish_timeout));
        leases.renewed_at = Some(started);
        // Measured from before the statement, so the margin also covers its duration.
        let renew_in = membership
            .next_expiry
            .map_or(self.settings.lease_ttl / 3, |e| (e + AFTER_EXPIRY).min(self.settings.lease_ttl / 3));
        leases.renew_at = Some(started + renew_in);
        leases.fair_share = membership.fair_share;
        leases.held = membership.leases;
        let owned = partitions(&leases.held);
        self.wakeup.set_owned(&owned);
        self.metrics.outbox_partitions_owned.set(owned.len() as i64);
        self.metrics.outbox_relays_live.set(membership.live_relays as i64);
        Ok(())
    }

    /// One pass with a window of one: renew leases if due, fetch the due heads of every
    /// owned partition, publish them all at once (one round of broker acknowledgements,
    /// however many partitions), then settle every row in one statement: delete, schedule a
    /// retry, or dead-letter. The deterministic step for tests.
    pub async fn relay_once(self: &Arc<Self>) -> Result<PassReport, StoreError> {
        let report = self.pass(&mut Window::default(), 1).await?;
        self.refresh_stats().await;
        Ok(report)
    }

    /// One pass of the pipeline: renew leases if due (after landing everything in flight),
    /// fetch the due rows of aggregates not in `window`, hand them to the producer, then
    /// take in the oldest batches: while `depth` of them are in flight, and all of them once
    /// the backlog is caught up (no full batch). A caught-up pass with room in the window
    /// ends once the broker acknowledged every batch, leaving them to settle while the next
    /// pass fetches (or, if it launched nothing, at the next commit); with a window of one
    /// (`relay_once`, slow start) every batch lands before the pass ends. A batch that got
    /// no acknowledgement, or a fatal producer error, lands the whole window.
    async fn pass(self: &Arc<Self>, window: &mut Window, depth: usize) -> Result<PassReport, StoreError> {
        self.metrics.outbox_relay_passes.inc();
        let mut report = PassReport::default();
        let mut leases = self.leases.lock().await;
        if self.renew_due(&leases) {
            if !window.is_empty() {
                drop(leases);
                self.land_all(window, &mut report).await?;
                leases = self.leases.lock().await;
            }
            self.renew(&mut leases).await?;
        }
        report.owned = partitions(&leases.held);
        let permit = match self.publish_policy.get().map(|policy| policy.permit()) {
            _ if report.owned.is_empty() => None,
            Some(None) => {
                report.refused = true; // breaker open: no statement, no publish
                None
            }
            Some(Some(permit)) => Some(permit),
            None => None,
        };
        if report.owned.is_empty() || report.refused {
            drop(leases);
            self.land_all(window, &mut report).await?;
            return Ok(report);
        }
        let (fetched_at, now) = (Instant::now(), Utc::now());
        let rows =
            self.store.fetch_due(&report.owned, self.settings.batch_size, now, &window.aggregates()).await?;
        self.metrics.relay_stage("fetch", fetched_at);
        self.metrics.relay_queued(rows.iter().map(|row| now - row.created_at));
        report.full_batches = report
            .owned
            .iter()
            .filter(|&&p| rows.iter().filter(|r| r.partition == p).count() as i64 >= self.settings.batch_size)
            .count();
        // Publishing must end before the lease can expire: renewal happens every ttl/3 and
        // ttl exceeds twice the publish timeout, so this only trips after a stall.
        if leases.publish_until.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(owner = %self.identity.owner, "lease too close to expiry after a stall; skipping this pass");
            leases.renewed_at = None;
            drop(leases);
            self.land_all(window, &mut report).await?;
            return Ok(report);
        }
        let held = leases.held.clone();
        drop(leases);
        let launched = !rows.is_empty();
        if launched {
            window.0.push_back(self.launch(rows, held, permit));
        }
        loop {
            let full = window.0.len() >= depth.max(1);
            let Some(oldest) = window.0.front_mut() else { break };
            // A backlog fills the window; once caught up, the relay waits for what is in
            // flight, and the commits meanwhile make up the next batch. Launching a batch per
            // wake-up instead measured 3 times the relay's statements and 20 % fewer creates
            // per second at 64 connections (run 4), and a slower commit → ack p99 (run 13).
            if !full && report.full_batches > 0 {
                break; // more is due: fetch the next batch while these are in flight
            }
            // Waiting for the acknowledgements but not the settles took 3–4 ms off the
            // relay's commit → ack p99 at 850 creates/s (BENCHMARKS.md, run 13). The fetch
            // skips the settling batches' aggregates, so nothing goes out twice.
            let caught_up = !full;
            if caught_up && launched && !oldest.landing.is_finished() && window.acknowledged().await {
                break;
            }
            let oldest = window.0.front_mut().expect("the window is not empty");
            let landed = if caught_up && !launched {
                // Nothing was due: land the oldest batch, unless a commit comes first.
                tokio::select! {
                    biased;
                    landed = &mut oldest.landing => landed,
                    () = self.wakeup.notified() => break,
                }
            } else {
                (&mut oldest.landing).await
            };
            let flight = window.0.pop_front().expect("the oldest flight was just seen");
            self.land(flight.permit, landed, &mut report).await?;
            if report.outage || report.fatal {
                self.land_all(window, &mut report).await?;
            }
        }
        if report.fatal {
            let mut leases = self.leases.lock().await;
            self.recover_from_fatal(&mut leases).await;
        }
        // Retries that came due before the fetch were fetched; one that came due during this
        // pass (or too close to the fetch to tell, given two clocks) makes the next pass
        // start at once.
        let mut leases = self.leases.lock().await;
        let settled_before = fetched_at.checked_sub(Duration::from_millis(50)).unwrap_or(fetched_at);
        while leases.retries.peek().is_some_and(|Reverse(at)| *at <= settled_before) {
            leases.retries.pop();
        }
        let now = Instant::now();
        report.next_retry_in = leases.retries.peek().map(|Reverse(at)| at.saturating_duration_since(now));
        Ok(report)
    }

    /// Hands `rows` to a task of their own that publishes them and settles them, so the
    /// relay can fetch the next batch meanwhile.
    fn launch(
        self: &Arc<Self>,
        mut rows: Vec<OutboxRecord>,
        leases: Vec<Lease>,
        permit: Option<Permit>,
    ) -> Flight {
        let spans: Vec<tracing::Span> = rows
            .iter()
            .map(|r| telemetry::publish_span(&self.settings.topic, &r.message_id, &r.trace))
            .collect();
        let messages = rows.iter_mut().zip(&spans).map(|(r, span)| self.message(r, span)).collect();
        let aggregates = rows.iter().map(|r| r.aggregate_id.clone()).collect();
        let relay = self.clone();
        let (answer, answered) = tokio::sync::watch::channel(None);
        let landing = tokio::spawn(async move {
            let published_at = Instant::now();
            let results = relay.publisher.publish(messages).await;
            relay.metrics.relay_stage("publish", published_at);
            answer.send_replace(Some(results.iter().any(Result::is_ok)));
            let settled_at = Instant::now();
            let landed = relay.settle(&rows, spans, results, &leases).await;
            relay.metrics.relay_stage("settle", settled_at);
            landed
        });
        Flight { aggregates, permit, landing, answered }
    }

    /// Waits for every batch in flight to land, oldest first; all of them are waited for
    /// even if one failed to settle, so nothing is in flight afterwards.
    async fn land_all(&self, window: &mut Window, report: &mut PassReport) -> Result<(), StoreError> {
        let mut failed = None;
        while let Some(mut flight) = window.0.pop_front() {
            let landed = (&mut flight.landing).await;
            if let Err(e) = self.land(flight.permit, landed, report).await {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Settles one acknowledged batch in one statement: delete, schedule a retry, or
    /// dead-letter each row, fenced by the leases it was fetched under.
    async fn settle(
        &self,
        rows: &[OutboxRecord],
        spans: Vec<tracing::Span>,
        results: Vec<Result<(), PublishError>>,
        leases: &[Lease],
    ) -> Result<Landed, StoreError> {
        let now = Utc::now();
        let mut landed = Landed::default();
        let mut settlements = Vec::with_capacity(rows.len());
        // Aggregates with a failed event earlier in this batch: their later events follow it.
        let mut failed: HashSet<&str> = HashSet::new();
        for ((row, result), span) in rows.iter().zip(results).zip(spans) {
            if let Err(e) = &result {
                telemetry::failed(&span, e.kind());
            }
            let result = match result {
                Ok(()) if failed.contains(row.aggregate_id.as_str()) => {
                    self.metrics.outbox_order_violations.inc();
                    tracing::error!(seq = row.seq, aggregate_id = %row.aggregate_id,
                        "delivered after an earlier event of its aggregate failed; publishing it again after that one");
                    Err(PublishError::Retriable("an earlier event of this aggregate failed".into()))
                }
                // Dead-lettered only in its own turn, once its predecessor is settled.
                Err(PublishError::Permanent(reason)) if failed.contains(row.aggregate_id.as_str()) => {
                    Err(PublishError::Retriable(format!(
                        "an earlier event of this aggregate failed; then: {reason}"
                    )))
                }
                Err(e) => {
                    failed.insert(row.aggregate_id.as_str());
                    Err(e)
                }
                ok => ok,
            };
            let outcome = match result {
                Ok(()) => {
                    landed.published += 1;
                    let latency = (now - row.created_at).to_std().unwrap_or_default();
                    self.metrics.outbox_publish_latency.observe(latency.as_secs_f64());
                    Settle::Published
                }
                Err(PublishError::Permanent(reason)) => {
                    self.metrics.outbox_publish_errors.with_label_values(&["permanent"]).inc();
                    tracing::error!(seq = row.seq, aggregate_id = %row.aggregate_id, %reason, "publish rejected; dead-lettering");
                    Settle::DeadLetter { error: reason }
                }
                Err(e @ (PublishError::Retriable(_) | PublishError::Fatal(_))) => {
                    landed.fatal |= matches!(e, PublishError::Fatal(_));
                    self.metrics.outbox_publish_errors.with_label_values(&[e.kind()]).inc();
                    let retry_in = self.settings.backoff.delay(row.attempts.max(0) as u32);
                    landed.retries.push(Instant::now() + retry_in);
                    tracing::debug!(seq = row.seq, attempts = row.attempts + 1, ?retry_in, error = %e, "publish failed; will retry");
                    let next_attempt_at = now + chrono::Duration::from_std(retry_in).unwrap_or_default();
                    Settle::Retry { error: e.to_string(), next_attempt_at }
                }
            };
            settlements.push(Settlement { seq: row.seq, partition: row.partition, outcome });
        }
        let settled = self.store.settle(&self.identity.owner, leases, &settlements).await?;
        landed.retried = settled.retried as usize;
        landed.dead_lettered = settled.dead_lettered as usize;
        landed.fenced =
            settlements.len() - (settled.published + settled.retried + settled.dead_lettered) as usize;
        Ok(landed)
    }

    /// Takes a landed batch into `report`, the breaker, the retry schedule and the metrics.
    async fn land(
        &self,
        permit: Option<Permit>,
        landed: Result<Result<Landed, StoreError>, tokio::task::JoinError>,
        report: &mut PassReport,
    ) -> Result<(), StoreError> {
        let landed = match landed {
            Ok(landed) => landed?,
            Err(panicked) => {
                // Unsettled: its rows are published again later.
                return Err(StoreError::Other(anyhow::anyhow!("a publish task failed: {panicked}")));
            }
        };
        let outage = landed.published == 0 && landed.dead_lettered == 0;
        report.published += landed.published;
        report.retried += landed.retried;
        report.dead_lettered += landed.dead_lettered;
        report.fenced += landed.fenced;
        report.fatal |= landed.fatal;
        report.outage |= outage;
        match permit {
            Some(permit) if outage => permit.failure(),
            Some(permit) => permit.success(),
            None => {}
        }
        self.metrics.outbox_published.inc_by(landed.published as u64);
        let mut leases = self.leases.lock().await;
        leases.retries.extend(landed.retries.into_iter().map(Reverse));
        if landed.retried > 0 {
            tracing::warn!(
                failed = landed.retried,
                published = landed.published,
                "publish failures; retrying with backoff"
            );
        }
        if landed.fenced > 0 {
            self.metrics.outbox_settle_fenced.inc_by(landed.fenced as u64);
            tracing::warn!(
                rows = landed.fenced,
                "lease moved on during publish; the new owner republishes (consumers dedupe by ce_id)"
            );
            leases.renewed_at = None;
        }
        Ok(())
    }

    /// A fatal producer error: let other replicas take the partitions while this one
    /// rebuilds its producer, then rejoin at the next pass.
    async fn recover_from_fatal(&self, leases: &mut Leases) {
        tracing::error!(owner = %self.identity.owner, "fatal producer error: releasing leases and rebuilding the producer");
        self.give_up(leases).await;
        self.rebuild_producer("fatal").await;
    }

    async fn rebuild_producer(&self, reason: &str) {
        self.metrics.outbox_producer_rebuilds.with_label_values(&[reason]).inc();
        if let Err(e) = self.publisher.recover().await {
            tracing::error!(
                error = format!("{e:#}"),
                "could not rebuild the producer; retrying after backoff"
            );
        }
    }

    /// The Kafka message for a row: key = aggregate id, CloudEvents binary-mode headers, and
    /// the trace context of its publish span (or, with tracing off, the one stored).
    /// Moves the payload and trace context out of the row (the row keeps only what settling
    /// it needs).
    fn message(&self, row: &mut OutboxRecord, span: &tracing::Span) -> OutboundMessage {
        let mut headers: Vec<Header> = Vec::with_capacity(9);
        headers.extend([
            ("ce_specversion".into(), "1.0".into()),
            ("ce_id".into(), row.message_id.to_string().into()),
            ("ce_type".into(), row.event_type.clone().into()),
            ("ce_source".into(), self.settings.source.clone().into()),
            ("ce_time".into(), row.created_at.to_rfc3339_opts(SecondsFormat::Micros, true).into()),
            ("ce_subject".into(), row.aggregate_id.clone().into()),
            ("content-type".into(), "application/json".into()),
        ]);
        let trace = telemetry::context_of(span, std::mem::take(&mut row.trace));
        if let Some(tp) = trace.traceparent {
            headers.push(("traceparent".into(), tp.into()));
        }
        if let Some(ts) = trace.tracestate {
            headers.push(("tracestate".into(), ts.into()));
        }
        OutboundMessage {
            topic: self.settings.topic.clone(),
            key: row.aggregate_id.clone(),
            payload: std::mem::take(&mut row.payload),
            headers,
        }
    }

    /// [`Relay::refresh_stats`] in a task of its own, one at a time, so the relay never waits
    /// for it: while a drain leaves published rows dead but not yet vacuumed, the statement
    /// reads past them, and waiting for it at the end of every pass measured a fifth of the
    /// drain rate (63,000 → 50,000 events/s).
    fn refresh_stats_in_background(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let relay = self.clone();
        tokio::spawn(async move {
            relay.refresh_stats().await;
            relay.refreshing.store(false, Ordering::Release);
        });
    }

    /// Refreshes the backlog gauges, at most once a second (they cost a query).
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

    /// Runs passes until `shutdown`: immediately again while work flows (a full batch, or
    /// heads published whose successors may now be due), otherwise on a wake-up, the next
    /// scheduled retry or the poll interval. After a pass the broker acknowledged nothing
    /// of, or a failed pass, it backs off with jitter and ignores wake-ups. A panicking pass
    /// is logged and the loop goes on (the batches it had in flight are published again
    /// later). On shutdown the in-flight pass finishes, the batches in flight are settled,
    /// the producer is flushed and leases released.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (mut failures, mut outages) = (0u32, 0u32);
        // Slow start: the window opens (doubling) only while batches are acknowledged and
        // closes to one after an outage or a failure, so a dead broker costs one batch per
        // backoff, not a window of them.
        let mut depth = 1;
        let mut window = Window::default();
        loop {
            let relay = self.clone();
            let mut flights = std::mem::take(&mut window);
            let pass = tokio::spawn(async move {
                let report = relay.pass(&mut flights, depth).await;
                (flights, report)
            });
            let outcome = pass.await.map(|(flights, report)| {
                window = flights;
                report
            });
            self.refresh_stats_in_background();
            let (wait, wake_on_commit) = match outcome {
                // Breaker open: no statement, no publish; look again after a backoff.
                Ok(Ok(report)) if report.refused => (self.settings.backoff.delay(outages.max(1)), false),
                Ok(Ok(report)) if report.outage => {
                    failures = 0;
                    outages += 1;
                    if outages % UNRESPONSIVE_PASSES == 0 && !report.fatal {
                        // A producer can get stuck on state a restarted or replaced broker
                        // no longer has (producer id, leader epochs); between passes nothing
                        // is in flight, so a fresh one costs only a reconnect.
                        tracing::warn!(
                            outages,
                            "nothing acknowledged for several passes; rebuilding the producer"
                        );
                        self.rebuild_producer("unresponsive").await;
                    }
                    (self.settings.backoff.delay(outages), false)
                }
                Ok(Ok(report)) => {
                    (failures, outages) = (0, 0);
                    if report.published > 0 {
                        depth = (depth * 2).min(self.settings.in_flight_batches.max(1));
                    }
                    let flowing = report.full_batches > 0
                        || report.published > 0
                        || report.dead_lettered > 0
                        || !window.is_empty();
                    let poll = self.settings.poll_interval;
                    let wait = if flowing {
                        Duration::ZERO
                    } else {
                        report.next_retry_in.map_or(poll, |r| r.min(poll))
                    };
                    (wait, true)
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = format!("{:#}", anyhow::Error::from(e)), "relay pass failed");
                    // Nothing may stay in flight while leases are renewed during the backoff.
                    let _ = self.land_all(&mut window, &mut PassReport::default()).await;
                    failures += 1;
                    (self.settings.backoff.delay(failures), false)
                }
                Err(join) => {
                    tracing::error!(error = %join, "relay pass panicked");
                    failures += 1;
                    (self.settings.backoff.delay(failures), false)
                }
            };
            if !wake_on_commit {
                depth = 1; // an outage, an open breaker or a failed pass
            }
            if !self.idle(wait, wake_on_commit, &shutdown).await {
                break;
            }
        }
        // The batches in flight finish: settled, or (database gone) left to be published again.
        if let Err(e) = self.land_all(&mut window, &mut PassReport::default()).await {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(e)),
                "could not settle the last batches"
            );
        }
        self.publisher.flush(self.settings.publish_timeout).await;
        self.release().await;
        tracing::info!(owner = %self.identity.owner, "relay stopped");
    }

    /// Gives every lease back and leaves the membership, so other relays take over at once
    /// (graceful shutdown; tests use it to hand partitions over).
    pub async fn release(&self) {
        let mut leases = self.leases.lock().await;
        self.give_up(&mut leases).await;
    }

    async fn give_up(&self, leases: &mut Leases) {
        if let Err(e) = self.store.release_partitions(&self.identity).await {
            tracing::warn!(error = %e, "could not release leases; they expire on their own");
        }
        *leases = Leases::default();
        self.wakeup.set_owned(&[]);
        self.metrics.outbox_partitions_owned.set(0);
    }

    /// Waits `wait` (returning early on a commit wake-up if `wake_on_commit`, or on a
    /// rebalance request), renewing leases meanwhile so a long backoff never lets them
    /// lapse. `false` once `shutdown` fired.
    async fn idle(&self, wait: Duration, wake_on_commit: bool, shutdown: &CancellationToken) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            // `renew_at` is never more than a third of the TTL ahead; unset after a failed renewal.
            let renew_in = self
                .leases
                .lock()
                .await
                .renew_at
                .map_or(self.settings.lease_ttl / 3, |at| at.saturating_duration_since(Instant::now()));
            let renew_at = tokio::time::Instant::now() + renew_in;
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = self.wakeup.notified(), if wake_on_commit => return true,
                _ = self.wakeup.rebalance_requested(), if wake_on_commit => return true,
                _ = self.wakeup.rebalance_requested(), if !wake_on_commit => self.heartbeat_logged().await,
                _ = tokio::time::sleep_until(deadline.min(renew_at)) => {
                    if tokio::time::Instant::now() < deadline {
                        self.heartbeat_logged().await;
                    }
                }
            }
        }
        !shutdown.is_cancelled()
    }

    async fn heartbeat_logged(&self) {
        if let Err(e) = self.heartbeat().await {
            tracing::warn!(error = format!("{:#}", anyhow::Error::from(e)), "lease renewal failed");
        }
    }
}

fn partitions(leases: &[Lease]) -> Vec<i32> {
    leases.iter().map(|l| l.partition).collect()
}
