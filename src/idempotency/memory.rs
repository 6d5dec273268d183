//! In-memory key store: the embedded default (one process, nothing to install). Same
//! semantics as Redis, expiry included, and bounded: a `moka` cache holds at most
//! `APP_IDEMPOTENCY__MEMORY_CAPACITY` entries (evicting the least useful first), each
//! expiring after its own TTL, with no sweep under a global lock. An evicted entry means a
//! retry runs again; for creates the database backstop still returns the original order.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use moka::{Expiry, ops::compute::Op, sync::Cache};

use super::{Begin, Fingerprint, KeyStore, Record, ScopedKey, StoredResponse};

/// A record and how long it lives from its last write.
#[derive(Debug)]
struct Entry {
    record: Record,
    ttl: Duration,
}

/// Each entry expires `ttl` after it was written (an in-flight marker after the lock TTL,
/// a completed response after the retention).
struct PerEntryTtl;

impl Expiry<String, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(&self, _key: &String, value: &Arc<Entry>, _at: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Arc<Entry>,
        _at: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The bounded in-memory key store.
pub struct MemoryKeyStore {
    entries: Cache<String, Arc<Entry>>,
}

impl MemoryKeyStore {
    /// An empty store holding at most `capacity` keys.
    pub fn new(capacity: u64) -> Self {
        Self { entries: Cache::builder().max_capacity(capacity).expire_after(PerEntryTtl).build() }
    }

    /// Keys currently held (after pending evictions ran), for tests and metrics.
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl KeyStore for MemoryKeyStore {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> anyhow::Result<Begin> {
        let token = uuid::Uuid::now_v7().to_string();
        let mut outcome = Begin::Acquired { token: token.clone() };
        // Atomic per key: concurrent begins on one key are serialized.
        self.entries.entry(key.as_str().to_owned()).and_compute_with(|existing| match existing {
            Some(entry) => {
                outcome = entry.value().record.begin_outcome(fingerprint);
                Op::Nop
            }
            None => Op::Put(Arc::new(Entry {
                record: Record::InFlight { fingerprint: fingerprint.hex(), token },
                ttl: lock_ttl,
            })),
        });
        Ok(outcome)
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        response: &StoredResponse,
        ttl: Duration,
    ) -> anyhow::Result<()> {
        let record = Record::Done { fingerprint: fingerprint.hex(), response: response.clone() };
        self.entries.insert(key.as_str().to_owned(), Arc::new(Entry { record, ttl }));
        Ok(())
    }

    async fn release(&self, key: &ScopedKey, token: &str) -> anyhow::Result<()> {
        self.entries.entry(key.as_str().to_owned()).and_compute_with(|existing| match existing {
            Some(entry) if matches!(&entry.value().record, Record::InFlight { token: t, .. } if t == token) => {
                Op::Remove
            }
            _ => Op::Nop,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::IdempotencyKey;

    fn key(i: usize) -> ScopedKey {
        ScopedKey::new(
            "caller",
            "POST",
            "/v1/orders",
            &IdempotencyKey::parse(&format!("k-{i}")).expect("key"),
        )
    }

    #[tokio::test]
    async fn holds_at_most_its_capacity() {
        let store = MemoryKeyStore::new(100);
        let fp = Fingerprint::of("POST", "/v1/orders", b"{}");
        for i in 0..1_000 {
            store.begin(&key(i), &fp, Duration::from_secs(60)).await.expect("begin");
        }
        assert!(store.len() <= 100, "{} entries held", store.len());
    }

    #[tokio::test]
    async fn markers_expire_and_release_needs_the_token() {
        let store = MemoryKeyStore::new(100);
        let fp = Fingerprint::of("POST", "/v1/orders", b"{}");
        let Begin::Acquired { token } =
            store.begin(&key(1), &fp, Duration::from_secs(60)).await.expect("begin")
        else {
            panic!("first begin acquires");
        };
        assert_eq!(store.begin(&key(1), &fp, Duration::from_secs(60)).await.expect("begin"), Begin::InFlight);
        store.release(&key(1), "someone else").await.expect("release");
        assert_eq!(store.begin(&key(1), &fp, Duration::from_secs(60)).await.expect("begin"), Begin::InFlight);
        store.release(&key(1), &token).await.expect("release");
        assert!(matches!(
            store.begin(&key(1), &fp, Duration::from_millis(20)).await.expect("begin"),
            Begin::Acquired { .. }
        ));
        tokio::time::sleep(Duration::from_millis(40)).await; // moka reads a real clock
        assert!(matches!(
            store.begin(&key(1), &fp, Duration::from_secs(1)).await.expect("begin"),
            Begin::Acquired { .. }
        ));
    }
}
