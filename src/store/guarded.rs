//! The PostgreSQL store behind its resilience policy: every call passes the database's
//! circuit breaker (open: refused at once with `Unavailable`, so requests fail in
//! microseconds instead of queueing on the pool), a concurrency limit and a timeout.
//! Reads and `BEGIN` are retried on connection failures within the retry budget; writes
//! outside a transaction are never retried blindly (a lost acknowledgement could apply
//! them twice), and statements inside a transaction are not retried either: their
//! transaction rolls back and the caller (or the Idempotency-Key) decides.
//!
//! `ping` and `migrate` bypass the policy: readiness must see the database as it is, and
//! migrations have their own lock timeout.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{IdempotentOrder, Store, StoreError, Tx};
use crate::{
    domain::{ListQuery, Order, OrderId},
    inbox::Rejection,
    outbox::{
        DeadLetter, Lease, Membership, OutboxRecord, OutboxStats, OutboxStore, RelayIdentity, Settled,
        Settlement,
    },
    resilience::{Failure, Policy, Refused},
};

impl Failure for StoreError {
    fn is_outage(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
    fn is_retriable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<Refused<StoreError>> for StoreError {
    fn from(refused: Refused<StoreError>) -> Self {
        match refused {
            Refused::Failed(e) => e,
            other => Self::Unavailable(anyhow::Error::new(other)),
        }
    }
}

/// A store whose calls pass a [`Policy`].
pub struct Guarded {
    inner: Arc<dyn Store>,
    policy: Arc<Policy>,
}

impl Guarded {
    /// Wraps `inner` (one of the role pools) in the database's shared policy.
    pub fn wrap(inner: Arc<dyn Store>, policy: Arc<Policy>) -> Arc<dyn Store> {
        Arc::new(Self { inner, policy })
    }
}

/// Reads and other calls that may run twice.
macro_rules! idempotent {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        Ok($self.policy.call(true, || $self.inner.$method($($arg),*)).await?)
    };
}

/// Writes: guarded by the breaker and the timeout, never retried.
macro_rules! once {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        Ok($self.policy.call(false, || $self.inner.$method($($arg),*)).await?)
    };
}

#[async_trait]
impl Store for Guarded {
    async fn begin(&self) -> Result<Box<dyn Tx>, StoreError> {
        idempotent!(self.begin())
    }
    async fn get_order(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        idempotent!(self.get_order(id))
    }
    async fn list_orders(&self, query: &ListQuery) -> Result<Vec<Order>, StoreError> {
        idempotent!(self.list_orders(query))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn migrations_applied(&self) -> Result<bool, StoreError> {
        self.inner.migrations_applied().await
    }
    async fn migrate(&self) -> anyhow::Result<()> {
        self.inner.migrate().await
    }
    async fn customer_display_name(&self, customer_id: &str) -> Result<Option<String>, StoreError> {
        idempotent!(self.customer_display_name(customer_id))
    }
    async fn purge_inbox(&self, older_than: DateTime<Utc>, limit: i64) -> Result<u64, StoreError> {
        idempotent!(self.purge_inbox(older_than, limit))
    }
    async fn list_rejections(&self, limit: i64) -> Result<Vec<Rejection>, StoreError> {
        idempotent!(self.list_rejections(limit))
    }
    async fn find_by_idempotency_key(&self, key: &str) -> Result<Option<IdempotentOrder>, StoreError> {
        idempotent!(self.find_by_idempotency_key(key))
    }
    async fn release_idempotency_key(&self, key: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        once!(self.release_idempotency_key(key, now))
    }
}

#[async_trait]
impl OutboxStore for Guarded {
    async fn ensure_partitions(&self, partitions: i32) -> Result<(), StoreError> {
        idempotent!(self.ensure_partitions(partitions))
    }
    async fn acquire_partitions(
        &self,
        relay: &RelayIdentity,
        partitions: i32,
        ttl: std::time::Duration,
    ) -> Result<Membership, StoreError> {
        once!(self.acquire_partitions(relay, partitions, ttl))
    }
    async fn release_partitions(&self, relay: &RelayIdentity) -> Result<(), StoreError> {
        once!(self.release_partitions(relay))
    }
    async fn fetch_due(
        &self,
        partitions: &[i32],
        per_partition: i64,
        now: DateTime<Utc>,
        in_flight: &[&str],
    ) -> Result<Vec<OutboxRecord>, StoreError> {
        idempotent!(self.fetch_due(partitions, per_partition, now, in_flight))
    }
    async fn settle(
        &self,
        owner: &str,
        leases: &[Lease],
        rows: &[Settlement],
    ) -> Result<Settled, StoreError> {
        once!(self.settle(owner, leases, rows))
    }
    async fn list_dead_letters(&self, limit: i64) -> Result<Vec<DeadLetter>, StoreError> {
        idempotent!(self.list_dead_letters(limit))
    }
    async fn replay_dead_letter(&self, seq: i64) -> Result<Option<i32>, StoreError> {
        once!(self.replay_dead_letter(seq))
    }
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        idempotent!(self.stats())
    }
    async fn repartition(&self, partitions: i32) -> Result<u64, StoreError> {
        self.inner.repartition(partitions).await
    }
}
