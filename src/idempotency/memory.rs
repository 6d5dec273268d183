//! In-memory key store: the embedded default (one process, nothing to install). Same
//! semantics as Redis, expiry included.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use async_trait::async_trait;

use super::{Begin, Fingerprint, KeyStore, Record, ScopedKey, StoredResponse};

/// Records and their expiry; expired entries are dropped as they are met and swept when
/// the map grows.
#[derive(Default)]
pub struct MemoryKeyStore {
    entries: Mutex<HashMap<String, (Record, Instant)>>,
}

impl MemoryKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, (Record, Instant)>) -> T) -> anyhow::Result<T> {
        let mut entries = self.entries.lock().map_err(|_| anyhow::anyhow!("idempotency map poisoned"))?;
        if entries.len() > 100_000 {
            let now = Instant::now();
            entries.retain(|_, (_, expires)| *expires > now);
        }
        Ok(f(&mut entries))
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
        self.with(|entries| {
            let now = Instant::now();
            match entries.get(key.as_str()) {
                Some((record, expires)) if *expires > now => record.begin_outcome(fingerprint),
                _ => {
                    let token = uuid::Uuid::now_v7().to_string();
                    let record = Record::InFlight { fingerprint: fingerprint.hex(), token: token.clone() };
                    entries.insert(key.as_str().to_owned(), (record, now + lock_ttl));
                    Begin::Acquired { token }
                }
            }
        })
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        response: &StoredResponse,
        ttl: Duration,
    ) -> anyhow::Result<()> {
        self.with(|entries| {
            let record = Record::Done { fingerprint: fingerprint.hex(), response: response.clone() };
            entries.insert(key.as_str().to_owned(), (record, Instant::now() + ttl));
        })
    }

    async fn release(&self, key: &ScopedKey, token: &str) -> anyhow::Result<()> {
        self.with(|entries| {
            if matches!(entries.get(key.as_str()), Some((Record::InFlight { token: t, .. }, _)) if t == token)
            {
                entries.remove(key.as_str());
            }
        })
    }
}
