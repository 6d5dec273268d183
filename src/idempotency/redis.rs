//! Redis key store (redis-rs with a reconnecting connection manager). The connection is
//! made in the background and no lock is ever held across I/O; every call has a short
//! deadline. A slow, absent or blackholed Redis degrades to the PostgreSQL backstop
//! instead of stalling requests (each waits at most `APP_REDIS__TIMEOUT_MS`, concurrently).

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use async_trait::async_trait;
use redis::{AsyncCommands, Script, aio::ConnectionManager};
use tokio::sync::watch;

use super::{Begin, Fingerprint, KeyStore, Record, ScopedKey, StoredResponse};
use crate::{
    backoff::Backoff,
    metrics::Metrics,
    resilience::{Failure, Policy, Refused},
};

/// Deletes the in-flight marker only if it still carries our token.
const RELEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and string.find(v, ARGV[1], 1, true) and string.find(v, '"in_flight"', 1, true) then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Where the background connector is.
#[derive(Clone)]
enum Link {
    /// The first attempt is under way: calls wait for it, at most their timeout.
    Connecting,
    /// An attempt failed and none succeeded since: calls fail at once (the database
    /// backstop decides) while the connector retries in the background.
    Down,
    /// Connected; the connection manager reconnects by itself from here on.
    Up(ConnectionManager),
}

/// The Redis key store.
pub struct RedisKeyStore {
    /// Published by the background connector; read without holding anything across I/O.
    link: watch::Receiver<Link>,
    /// Namespaces keys (`orders-service:idem:` by default; tests use their own).
    prefix: String,
    /// Deadline for a connection being established (commands: the policy's timeout).
    timeout: Duration,
    /// The Redis policy: breaker, timeout, concurrency limit.
    policy: Arc<Policy>,
    /// `redis_call_duration_seconds`.
    metrics: Arc<Metrics>,
    /// Stops the background connector when the store is dropped.
    connector: tokio::task::AbortHandle,
}

impl RedisKeyStore {
    /// Starts connecting in the background (retrying with backoff until Redis answers);
    /// requests never queue behind it. Needs a Tokio runtime.
    pub fn new(
        url: &str,
        prefix: String,
        timeout: Duration,
        policy: Arc<Policy>,
        metrics: Arc<Metrics>,
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let client = match ca_file {
            None => redis::Client::open(url).context("APP_REDIS__URL is not a valid redis:// URL")?,
            Some(path) => {
                let root_cert = std::fs::read(path)
                    .with_context(|| format!("reading APP_REDIS__CA_FILE {}", path.display()))?;
                let certificates = redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) };
                redis::Client::build_with_tls(url, certificates)
                    .context("APP_REDIS__URL or APP_REDIS__CA_FILE is not usable for TLS")?
            }
        };
        let (publish, link) = watch::channel(Link::Connecting);
        let connector = tokio::spawn(connect(client, timeout, publish)).abort_handle();
        Ok(Self { link, prefix, timeout, policy, metrics, connector })
    }

    async fn connection(&self) -> anyhow::Result<ConnectionManager> {
        let mut link = self.link.clone();
        let settled = tokio::time::timeout(self.timeout, link.wait_for(|l| !matches!(l, Link::Connecting)));
        match settled.await {
            Ok(Ok(state)) => match &*state {
                Link::Up(connection) => Ok(connection.clone()),
                _ => anyhow::bail!("Redis is unreachable (reconnecting in the background)"),
            },
            Ok(Err(_)) => anyhow::bail!("the Redis connector stopped"),
            Err(_) => anyhow::bail!("connecting to Redis timed out"),
        }
    }

    fn key(&self, key: &ScopedKey) -> String {
        format!("{}{}", self.prefix, key.as_str())
    }

    /// One Redis command under the Redis policy: refused at once while the breaker is
    /// open (the database backstop decides), cut at the timeout otherwise.
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> anyhow::Result<T> {
        let started = std::time::Instant::now();
        let result = self.policy.once(async { call.await.map_err(RedisDown) }).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Refused::Failed(_)) => "error",
            Err(_) => "refused",
        };
        self.metrics
            .redis_call_duration
            .with_label_values(&[what, outcome])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(value) => Ok(value),
            Err(Refused::Failed(RedisDown(e))) => Err(anyhow::Error::new(e).context(format!("Redis {what}"))),
            Err(refused) => Err(anyhow::Error::new(refused).context(format!("Redis {what}"))),
        }
    }
}

/// Any Redis error counts against its breaker: this store only runs commands that succeed
/// on a healthy server.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct RedisDown(redis::RedisError);

impl Failure for RedisDown {
    fn is_outage(&self) -> bool {
        true
    }
    fn is_retriable(&self) -> bool {
        false
    }
}

impl Drop for RedisKeyStore {
    fn drop(&mut self) {
        self.connector.abort();
    }
}

/// Connects until it succeeds, each attempt bounded by twice the call timeout, backing off
/// up to 5 s between attempts; a blackholed Redis costs one pending attempt, not a queue of
/// requests.
async fn connect(client: redis::Client, timeout: Duration, link: watch::Sender<Link>) {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout)
        .set_number_of_retries(1);
    let backoff = Backoff::new(timeout, Duration::from_secs(5).max(timeout)).unwrap_or(Backoff::DEFAULT);
    for attempt in 0u32.. {
        let connecting = client.get_connection_manager_with_config(config.clone());
        match tokio::time::timeout(timeout * 2, connecting).await {
            Ok(Ok(connection)) => {
                link.send_replace(Link::Up(connection));
                tracing::info!("connected to Redis");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, attempt, "cannot connect to Redis; idempotency uses the database meanwhile")
            }
            Err(_) => tracing::warn!(
                attempt,
                "connecting to Redis timed out; idempotency uses the database meanwhile"
            ),
        }
        link.send_replace(Link::Down);
        tokio::time::sleep(backoff.delay(attempt)).await;
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
        // `SET … NX GET` (Redis >= 7): one atomic round trip that either takes the marker
        // (nil) or returns what holds the key; no window in which the record can expire
        // between a failed SET and a GET.
        let options = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .get(true)
            .with_expiration(redis::SetExpiry::PX(millis(lock_ttl)));
        let existing: Option<String> =
            self.bounded("SET NX GET", con.set_options(self.key(key), &marker, options)).await?;
        match existing {
            None => Ok(Begin::Acquired { token }),
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
