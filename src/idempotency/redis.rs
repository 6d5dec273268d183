//! Redis key store (redis-rs with a reconnecting connection manager). Every call has a
//! short deadline: a slow or absent Redis degrades to the PostgreSQL backstop instead of
//! stalling requests.

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use redis::{AsyncCommands, Script, aio::ConnectionManager};
use tokio::sync::Mutex;

use super::{Begin, Fingerprint, KeyStore, Record, ScopedKey, StoredResponse};

/// Deletes the in-flight marker only if it still carries our token.
const RELEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and string.find(v, ARGV[1], 1, true) and string.find(v, '"in_flight"', 1, true) then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The Redis key store.
pub struct RedisKeyStore {
    client: redis::Client,
    /// Created on first successful use, then reconnects by itself.
    connection: Mutex<Option<ConnectionManager>>,
    /// Namespaces keys (`orders-service:idem:` by default; tests use their own).
    prefix: String,
    /// Deadline for each Redis round trip.
    timeout: Duration,
}

impl RedisKeyStore {
    /// Prepares the client; nothing connects until the first request.
    pub fn new(url: &str, prefix: String, timeout: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).context("APP_REDIS__URL is not a valid redis:// URL")?;
        Ok(Self { client, connection: Mutex::new(None), prefix, timeout })
    }

    async fn connection(&self) -> anyhow::Result<ConnectionManager> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1);
        let connection =
            tokio::time::timeout(self.timeout * 2, self.client.get_connection_manager_with_config(config))
                .await
                .context("connecting to Redis timed out")?
                .context("connecting to Redis")?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    fn key(&self, key: &ScopedKey) -> String {
        format!("{}{}", self.prefix, key.as_str())
    }

    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> anyhow::Result<T> {
        tokio::time::timeout(self.timeout, call)
            .await
            .with_context(|| format!("Redis {what} timed out"))?
            .with_context(|| format!("Redis {what}"))
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

#[async_trait]
impl KeyStore for RedisKeyStore {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> anyhow::Result<Begin> {
        let mut con = self.connection().await?;
        let token = uuid::Uuid::now_v7().to_string();
        let marker = serde_json::to_string(&Record::InFlight {
            fingerprint: fingerprint.hex(),
            token: token.clone(),
        })?;
        let options = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::PX(millis(lock_ttl)));
        let set: Option<String> =
            self.bounded("SET NX", con.set_options(self.key(key), &marker, options)).await?;
        if set.is_some() {
            return Ok(Begin::Acquired { token });
        }
        let existing: Option<String> = self.bounded("GET", con.get(self.key(key))).await?;
        match existing {
            // Expired between SET and GET: rare; report in-flight so the client retries.
            None => Ok(Begin::InFlight),
            Some(raw) => Ok(serde_json::from_str::<Record>(&raw)
                .context("corrupt idempotency record")?
                .begin_outcome(fingerprint)),
        }
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        response: &StoredResponse,
        ttl: Duration,
    ) -> anyhow::Result<()> {
        let mut con = self.connection().await?;
        let record = serde_json::to_string(&Record::Done {
            fingerprint: fingerprint.hex(),
            response: response.clone(),
        })?;
        let options = redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(millis(ttl)));
        let _: Option<String> = self.bounded("SET", con.set_options(self.key(key), record, options)).await?;
        Ok(())
    }

    async fn release(&self, key: &ScopedKey, token: &str) -> anyhow::Result<()> {
        let mut con = self.connection().await?;
        let script = Script::new(RELEASE);
        let _: i64 =
            self.bounded("release", script.key(self.key(key)).arg(token).invoke_async(&mut con)).await?;
        Ok(())
    }
}
