//! `Idempotency-Key` (IETF httpapi draft, Stripe semantics) for REST and gRPC.
//!
//! A request with a key runs at most once per scope: the caller's identity, the method and
//! the target (the concrete REST path, or the gRPC method plus the order id for
//! CancelOrder), so one key never stands for two different resources. Its fingerprint
//! (SHA-256 of method, target and body) must match on retries. The fast path is a [`KeyStore`] (Redis, or memory in the embedded default): an
//! in-flight marker taken with `SET NX` and a short TTL, then the completed response for
//! `APP_IDEMPOTENCY__TTL_MS`. PostgreSQL is the backstop: a created order keeps the scoped
//! key and fingerprint under a unique index, so a lost or unreachable key store still
//! yields exactly one order.
//!
//! | situation | REST | gRPC |
//! |---|---|---|
//! | key missing (where required) or malformed | 400 | INVALID_ARGUMENT |
//! | same key, same fingerprint, completed | original response + `Idempotent-Replayed: true` | same, trailing metadata `idempotent-replayed: true` |
//! | same key, different fingerprint | 422 | FAILED_PRECONDITION |
//! | same key still in flight | 409 + `Retry-After` | ABORTED |
//!
//! Outcomes that are not deterministic (5xx, timeouts, unavailable dependencies, a lost
//! concurrent update: anything answered with `Retry-After` / a retryable code) release the
//! key so the client's retry really runs; successes and other 4xx are stored.

pub mod http;
mod memory;
mod redis;

use std::{future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use memory::MemoryKeyStore;
pub use redis::RedisKeyStore;

use crate::{error::ApiError, metrics::Metrics};

/// A validated key: 1–255 visible ASCII characters, from a bare token or the draft's
/// quoted string form (`"abc"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Parses the header or metadata value.
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        let raw = raw.trim();
        let key = raw.strip_prefix('"').and_then(|k| k.strip_suffix('"')).unwrap_or(raw);
        if !(1..=255).contains(&key.len())
            || !key.bytes().all(|b| (0x21..=0x7e).contains(&b))
            || key.contains('"')
        {
            return Err(ApiError::IdempotencyKey(
                "Idempotency-Key must be 1 to 255 visible ASCII characters, bare or in double quotes".into(),
            ));
        }
        Ok(Self(key.to_owned()))
    }
}

/// SHA-256 over what makes two requests "the same".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a request: method, target (path) and body bytes.
    pub fn of(method: &str, route: &str, body: &[u8]) -> Self {
        let mut hash = Sha256::new();
        for part in [method.as_bytes(), b"\n", route.as_bytes(), b"\n", body] {
            hash.update(part);
        }
        Self(hash.finalize().into())
    }

    /// Lower-case hex.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key as scoped to one caller, method and route; what the stores index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedKey(String);

impl ScopedKey {
    /// Hashes identity, method, route and key together (bounded length, no injection).
    pub fn new(identity: &str, method: &str, route: &str, key: &IdempotencyKey) -> Self {
        let mut hash = Sha256::new();
        for part in [identity, "\n", method, "\n", route, "\n", &key.0] {
            hash.update(part.as_bytes());
        }
        Self(hex(&hash.finalize()))
    }

    /// The 64-character hex form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the use-case needs for the PostgreSQL backstop.
#[derive(Debug, Clone)]
pub struct IdempotencyContext {
    /// The scoped key.
    pub key: ScopedKey,
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
    /// How long the key stays bound to this request.
    pub ttl: Duration,
}

/// A response as stored for replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// HTTP status, or the gRPC code for gRPC responses.
    pub status: u16,
    /// Selected headers (REST) or metadata (gRPC).
    pub headers: Vec<(String, String)>,
    /// Body (REST) or the encoded message / status details (gRPC).
    pub body: Vec<u8>,
}

/// The fast-path store's answer when a request starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// This request holds the key; `token` releases it.
    Acquired {
        /// Proves ownership of the in-flight marker.
        token: String,
    },
    /// Another request with this key and fingerprint is running.
    InFlight,
    /// Done before: replay this.
    Completed(StoredResponse),
    /// The key was used with a different request.
    Mismatch,
}

/// The fast-path key store port: Redis, or memory for the embedded default.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Takes the in-flight marker (`SET NX` with `lock_ttl`) or reports what is there.
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> anyhow::Result<Begin>;
    /// Stores the completed response for `ttl`.
    async fn complete(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        response: &StoredResponse,
        ttl: Duration,
    ) -> anyhow::Result<()>;
    /// Removes the in-flight marker if `token` still owns it.
    async fn release(&self, key: &ScopedKey, token: &str) -> anyhow::Result<()>;
}

/// Idempotency settings.
#[derive(Debug, Clone)]
pub struct IdempotencySettings {
    /// How long a completed response is replayed (and the key bound).
    pub ttl: Duration,
    /// How long an in-flight marker lives if its request never finishes.
    pub lock_ttl: Duration,
    /// Trusted header naming the caller (e.g. a mesh identity header); empty = anonymous.
    pub identity_header: String,
    /// Keys the in-memory store keeps at most (used without Redis).
    pub memory_capacity: u64,
}

/// How a request ran.
#[derive(Debug)]
pub enum Executed {
    /// It ran now.
    Fresh(StoredResponse),
    /// An earlier run's response.
    Replayed(StoredResponse),
}

/// The idempotency service shared by the REST middleware and the gRPC handler.
pub struct Idempotency {
    store: Arc<dyn KeyStore>,
    settings: IdempotencySettings,
    metrics: Arc<Metrics>,
}

impl Idempotency {
    /// Builds the service.
    pub fn new(store: Arc<dyn KeyStore>, settings: IdempotencySettings, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { store, settings, metrics })
    }

    /// Settings in force.
    pub fn settings(&self) -> &IdempotencySettings {
        &self.settings
    }

    /// Reads a request's key from its header / metadata value: `None` when absent, `Some(None)`
    /// when present but not text. A missing required key and a malformed key are counted and
    /// refused; a missing optional key is `Ok(None)`.
    pub fn key(&self, raw: Option<Option<&str>>, required: bool) -> Result<Option<IdempotencyKey>, ApiError> {
        let parsed = match raw {
            None if required => {
                self.count("missing");
                return Err(ApiError::IdempotencyKey(
                    "an Idempotency-Key is required on this request".into(),
                ));
            }
            None => return Ok(None),
            Some(Some(value)) => IdempotencyKey::parse(value),
            Some(None) => IdempotencyKey::parse(""),
        };
        parsed.map(Some).inspect_err(|_| self.count("malformed"))
    }

    /// The caller's identity: the verified token's (`iss|sub`) when auth is on, else the
    /// value of the trusted identity header (looked up by name with `lookup`), else
    /// `anonymous`.
    pub fn caller<'a>(
        &self,
        verified: Option<&crate::auth::Caller>,
        lookup: impl FnOnce(&str) -> Option<&'a str>,
    ) -> String {
        if let Some(caller) = verified {
            return caller.identity.clone();
        }
        let name = &self.settings.identity_header;
        let identity = if name.is_empty() { None } else { lookup(name).filter(|v| !v.is_empty()) };
        identity.unwrap_or("anonymous").to_owned()
    }

    /// Counts an outcome (`new`, `replayed`, `conflict`, `mismatch`, `missing`, `malformed`, `store_error`).
    pub fn count(&self, outcome: &str) {
        self.metrics.idempotency_outcomes.with_label_values(&[outcome]).inc();
    }

    /// Runs `op` unless the key says otherwise. `op` returns the response and whether it
    /// is deterministic (stored) or not (the key is released for a retry). If the key
    /// store is unreachable, `op` runs anyway: the PostgreSQL backstop keeps creates
    /// exactly-once.
    pub async fn execute<F, Fut>(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        op: F,
    ) -> Result<Executed, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = (StoredResponse, bool)>,
    {
        let token = match self.store.begin(key, fingerprint, self.settings.lock_ttl).await {
            Ok(Begin::Acquired { token }) => Some(token),
            Ok(Begin::InFlight) => {
                self.count("conflict");
                return Err(ApiError::IdempotencyInFlight);
            }
            Ok(Begin::Mismatch) => {
                self.count("mismatch");
                return Err(ApiError::IdempotencyMismatch);
            }
            Ok(Begin::Completed(response)) => {
                self.count("replayed");
                return Ok(Executed::Replayed(response));
            }
            Err(e) => {
                self.count("store_error");
                tracing::warn!(
                    error = format!("{e:#}"),
                    "idempotency key store unavailable; relying on the database"
                );
                None
            }
        };
        // If this future is dropped mid-way (request deadline, client gone), the guard
        // releases the key: the work was abandoned, so a retry must be allowed to run.
        let mut guard = token.map(|token| ReleaseOnDrop {
            store: self.store.clone(),
            key: key.clone(),
            token: Some(token),
        });
        let (response, deterministic) = op().await;
        if let Some(token) = guard.as_mut().and_then(|g| g.token.take()) {
            let stored = if deterministic {
                self.store.complete(key, fingerprint, &response, self.settings.ttl).await
            } else {
                self.store.release(key, &token).await
            };
            if let Err(e) = stored {
                self.count("store_error");
                tracing::warn!(error = format!("{e:#}"), "could not record the idempotent response");
                // Do not leave retries facing 409 until the marker expires: the database
                // backstop answers them (creates) once the key is free.
                let _ = self.store.release(key, &token).await;
            }
        }
        self.count("new");
        Ok(Executed::Fresh(response))
    }
}

/// Releases an in-flight marker whose request was abandoned before it finished.
struct ReleaseOnDrop {
    store: Arc<dyn KeyStore>,
    key: ScopedKey,
    /// `None` once the request finished and recorded its outcome.
    token: Option<String>,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            let (store, key) = (self.store.clone(), self.key.clone());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(e) = store.release(&key, &token).await {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "could not release an abandoned idempotency key"
                        );
                    }
                });
            }
        }
    }
}

/// The in-flight marker / completed record as both stores keep it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Record {
    InFlight { fingerprint: String, token: String },
    Done { fingerprint: String, response: StoredResponse },
}

impl Record {
    /// What a request with `fingerprint` should do given this existing record.
    fn begin_outcome(&self, fingerprint: &Fingerprint) -> Begin {
        let matches = |fp: &str| fp == fingerprint.hex();
        match self {
            Record::InFlight { fingerprint, .. } if matches(fingerprint) => Begin::InFlight,
            Record::Done { fingerprint, response } if matches(fingerprint) => {
                Begin::Completed(response.clone())
            }
            _ => Begin::Mismatch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_accept_bare_and_quoted_forms_within_limits() {
        assert_eq!(IdempotencyKey::parse("abc-123").expect("bare"), IdempotencyKey("abc-123".into()));
        assert_eq!(IdempotencyKey::parse("\"abc\"").expect("quoted"), IdempotencyKey("abc".into()));
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("\"\"").is_err());
        assert!(IdempotencyKey::parse("has space").is_err());
        assert!(IdempotencyKey::parse("ünï").is_err());
    }

    #[test]
    fn scope_and_fingerprint_separate_what_they_should() {
        let key = IdempotencyKey::parse("k").expect("key");
        let a = ScopedKey::new("alice", "POST", "/v1/orders", &key);
        assert_ne!(a, ScopedKey::new("bob", "POST", "/v1/orders", &key));
        assert_ne!(a, ScopedKey::new("alice", "POST", "/v1/orders/{id}/cancel", &key));
        assert_eq!(a.as_str().len(), 64);
        assert_ne!(Fingerprint::of("POST", "/r", b"{}"), Fingerprint::of("POST", "/r", b"{ }"));
    }
}

#[cfg(test)]
mod properties {
    //! Idempotency-Key headers are untrusted: any value parses to the key it spells or is a
    //! typed 400, and no accepted key carries a byte outside visible ASCII.
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_header_value_parses_or_is_a_typed_error(raw in any::<String>()) {
            match IdempotencyKey::parse(&raw) {
                Ok(key) => {
                    prop_assert!((1..=255).contains(&key.0.len()));
                    prop_assert!(key.0.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'"'));
                    prop_assert!(raw.contains(&key.0));
                }
                Err(e) => prop_assert!(matches!(e, ApiError::IdempotencyKey(_))),
            }
        }

        #[test]
        fn visible_ascii_keys_round_trip(key in "[!#-~]{1,255}") {
            prop_assert_eq!(IdempotencyKey::parse(&key).expect("valid").0, key.clone());
            prop_assert_eq!(IdempotencyKey::parse(&format!("\"{key}\"")).expect("quoted").0, key);
        }
    }
}
