//! Typed settings read from `APP_*` environment variables (what Helm values and Kubernetes
//! Secrets supply), with defaults that make `cargo run` work with no setup at all.
//!
//! Every variable is listed in [`VARIABLES`] (the README table is generated from the same
//! names). Values are validated once, at startup, and an error names the variable.

use std::{collections::BTreeMap, fmt, net::SocketAddr, str::FromStr, time::Duration};

use crate::{
    backoff::Backoff,
    deprecation::Deprecation,
    idempotency::IdempotencySettings,
    inbox::InboxSettings,
    publish::{KafkaSettings, TopicSettings},
    resilience::{BreakerSettings, PolicySettings},
};

/// Redis connection settings.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://…` (may carry a password).
    pub url: Secret,
    /// Key namespace.
    pub key_prefix: String,
    /// Deadline per call.
    pub timeout: Duration,
    /// PEM CA that signed the server's certificate (`rediss://` only); without it the
    /// system's roots are trusted.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Every variable this service reads, with its default and meaning.
pub const VARIABLES: &[(&str, &str, &str)] = &[
    ("APP_HTTP__ADDR", "127.0.0.1:8080", "REST API, /healthz, /readyz"),
    ("APP_GRPC__ADDR", "127.0.0.1:50051", "gRPC API, health, reflection"),
    (
        "APP_GRPC__MAX_CONNECTION_AGE_MS",
        "300000",
        "connections get GOAWAY after this long (rebalancing without a mesh)",
    ),
    ("APP_GRPC__MAX_CONNECTION_AGE_GRACE_MS", "30000", "in-flight calls may finish this long after GOAWAY"),
    ("APP_GRPC__KEEPALIVE_INTERVAL_MS", "30000", "HTTP/2 PING interval on idle connections"),
    ("APP_GRPC__KEEPALIVE_TIMEOUT_MS", "10000", "a connection whose PING is unanswered this long is closed"),
    ("APP_ADMIN__ADDR", "127.0.0.1:9090", "/metrics"),
    ("APP_AUTH__ENABLED", "false", "verify JWT bearer tokens on the REST and gRPC API"),
    ("APP_AUTH__JWKS_FILE", "", "JWKS document with the signing keys (one of FILE or URL)"),
    (
        "APP_AUTH__JWKS_URL",
        "",
        "https:// (or http://) JWKS endpoint, refetched every REFRESH and on an unknown key",
    ),
    (
        "APP_AUTH__JWKS_CA_FILE",
        "",
        "PEM CA that signs the JWKS endpoint's certificate (default: the webpki roots)",
    ),
    ("APP_AUTH__JWKS_REFRESH_MS", "300000", "how long fetched keys are used before a refetch"),
    ("APP_AUTH__ISSUER", "", "required iss"),
    ("APP_AUTH__AUDIENCE", "", "required aud"),
    ("APP_AUTH__LEEWAY_MS", "30000", "clock skew tolerated on exp and nbf"),
    ("APP_AUTH__SCOPE_CREATE", "orders:write", "scope a create needs"),
    ("APP_AUTH__SCOPE_READ", "orders:read", "scope a read (get, list, status) needs"),
    ("APP_AUTH__SCOPE_CANCEL", "orders:write", "scope a cancel needs"),
    (
        "APP_ADMIN__TOKEN",
        "",
        "bearer token for the admin endpoints that change data (secret); required off loopback",
    ),
    ("APP_HTTP__REQUEST_TIMEOUT_MS", "10000", "per-request deadline (REST and gRPC)"),
    ("APP_HTTP__BODY_LIMIT_BYTES", "1048576", "largest accepted request body / gRPC message"),
    ("APP_HTTP__MAX_CONCURRENT_REQUESTS", "256", "REST + gRPC requests in flight; more are shed with 503"),
    ("APP_DATABASE__URL", "sqlite://data/orders.db", "postgres://… or sqlite://…"),
    ("APP_DATABASE__MAX_CONNECTIONS", "10", "API connection pool size (per replica)"),
    ("APP_DATABASE__RELAY_MAX_CONNECTIONS", "2", "relay connection pool size (PostgreSQL)"),
    ("APP_DATABASE__INBOX_MAX_CONNECTIONS", "8", "inbox connection pool size (PostgreSQL)"),
    ("APP_DATABASE__STATEMENT_TIMEOUT_MS", "5000", "longest statement the service runs"),
    ("APP_DATABASE__MIGRATION_LOCK_TIMEOUT_MS", "60000", "longest wait of a migration for a lock"),
    ("APP_DATABASE__ACQUIRE_TIMEOUT_MS", "2000", "wait for a pooled connection before 503"),
    ("APP_DATABASE__MIGRATE_ON_START", "true", "apply migrations in `serve`"),
    ("APP_HEALTH__CHECK_INTERVAL_MS", "5000", "how often gRPC health is refreshed"),
    ("APP_HEALTH__CHECK_TIMEOUT_MS", "1000", "deadline for one readiness check"),
    ("APP_HEALTH__DATABASE_GRACE_MS", "5000", "database unreachable this long before not ready"),
    ("APP_SHUTDOWN__DRAIN_TIMEOUT_MS", "20000", "how long in-flight requests may finish"),
    ("APP_ROLES", "api,relay,consumer", "what `serve` runs: any of api, relay, consumer"),
    ("APP_KAFKA__BROKERS", "", "bootstrap servers; empty = in-process event bus"),
    ("APP_KAFKA__PROPERTIES", "", "extra librdkafka properties, `key=value;…` (secret)"),
    ("APP_KAFKA__MESSAGE_TIMEOUT_MS", "10000", "delivery deadline per message, retries included"),
    (
        "APP_KAFKA__LINGER_MS",
        "0",
        "how long the producer holds a message for others to join its request (the relay hands it whole batches)",
    ),
    ("APP_KAFKA__MESSAGE_MAX_BYTES", "1000000", "larger events are dead-lettered"),
    ("APP_KAFKA__CREATE_TOPICS", "true", "create missing topics at startup"),
    ("APP_KAFKA__TOPIC_PARTITIONS", "3", "partitions of topics created at startup"),
    ("APP_KAFKA__TOPIC_REPLICATION", "3", "replication factor of topics created at startup"),
    (
        "APP_KAFKA__TOPIC_MIN_INSYNC_REPLICAS",
        "",
        "min.insync.replicas of created topics; empty = replication - 1 (at least 1)",
    ),
    ("APP_KAFKA__GROUP_ID", "orders-service", "consumer group of the inbox"),
    ("APP_EVENTS__TOPIC", "orders.events", "topic the relay publishes to"),
    ("APP_INBOX__PAYMENTS_TOPIC", "payments.events", "payment events consumed"),
    ("APP_INBOX__CUSTOMERS_TOPIC", "customers.events", "customer events consumed"),
    ("APP_INBOX__RETENTION_HOURS", "336", "inbox rows kept (longer than the broker's retention)"),
    ("APP_INBOX__MAX_PARALLEL_PARTITIONS", "8", "partitions processed at once"),
    ("APP_INBOX__MAX_ATTEMPTS", "10", "aborted attempts of one message before it is dead-lettered"),
    ("APP_EVENTS__SOURCE", "/orders-service", "CloudEvents source attribute"),
    (
        "APP_OUTBOX__PARTITIONS",
        "16",
        "outbox partitions (P); recorded at first start, see `outbox repartition`",
    ),
    ("APP_OUTBOX__BATCH_SIZE", "100", "rows fetched per partition per pass"),
    ("APP_OUTBOX__IN_FLIGHT_BATCHES", "4", "batches with the broker at once (1 = no pipelining)"),
    ("APP_OUTBOX__POLL_INTERVAL_MS", "1000", "relay polling fallback"),
    ("APP_OUTBOX__LEASE_TTL_MS", "30000", "partition lease duration (> 2 × message timeout)"),
    ("APP_OUTBOX__NOTIFY_WINDOW_MS", "20", "coalescing window of cross-process wake-ups"),
    ("APP_OUTBOX__RETRY_MIN_MS", "200", "first retry delay ceiling (full jitter)"),
    ("APP_OUTBOX__RETRY_MAX_MS", "30000", "largest retry delay"),
    ("APP_OUTBOX__RELAY_ID", "", "lease owner id; empty = $HOSTNAME plus a random suffix"),
    ("APP_REDIS__URL", "", "redis:// URL of the idempotency store; empty = in memory"),
    ("APP_REDIS__KEY_PREFIX", "orders-service:idem:", "namespace of idempotency keys in Redis"),
    ("APP_REDIS__TIMEOUT_MS", "250", "deadline per Redis call before falling back to the database"),
    ("APP_REDIS__CA_FILE", "", "PEM CA for rediss:// (a private CA); empty = the system's roots"),
    ("APP_IDEMPOTENCY__TTL_MS", "86400000", "how long a completed response is replayed (24 h)"),
    ("APP_IDEMPOTENCY__LOCK_TTL_MS", "30000", "in-flight marker lifetime (> request timeout)"),
    ("APP_IDEMPOTENCY__IDENTITY_HEADER", "", "trusted caller-identity header/metadata; empty = anonymous"),
    ("APP_IDEMPOTENCY__MEMORY_CAPACITY", "100000", "entries the in-memory key store keeps (without Redis)"),
    ("APP_RESILIENCE__POSTGRES__RETRIES", "2", "retries of idempotent database calls"),
    ("APP_RESILIENCE__POSTGRES__RETRY_BUDGET_PERCENT", "10", "retries as a share of recent database calls"),
    (
        "APP_RESILIENCE__POSTGRES__BREAKER_FAILURES",
        "5",
        "consecutive database failures that open the breaker",
    ),
    ("APP_RESILIENCE__POSTGRES__BREAKER_OPEN_MS", "1000", "first open period of the database breaker"),
    ("APP_RESILIENCE__POSTGRES__CONCURRENCY", "256", "database calls in flight at most"),
    ("APP_RESILIENCE__REDIS__BREAKER_FAILURES", "3", "consecutive Redis failures that open the breaker"),
    ("APP_RESILIENCE__REDIS__BREAKER_OPEN_MS", "1000", "first open period of the Redis breaker"),
    ("APP_RESILIENCE__REDIS__CONCURRENCY", "256", "Redis calls in flight at most"),
    (
        "APP_RESILIENCE__KAFKA__BREAKER_FAILURES",
        "3",
        "relay passes without an acknowledgement that open the breaker",
    ),
    ("APP_RESILIENCE__KAFKA__BREAKER_OPEN_MS", "5000", "first open period of the Kafka breaker"),
    (
        "APP_DEPRECATIONS",
        "",
        "JSON table of deprecated operations with deprecation, sunset, link, successor; empty = built-in",
    ),
    ("APP_LOG_FORMAT", "text", "text or json"),
    ("APP_LOG_LEVEL", "info", "tracing filter, e.g. info,orders_service=debug"),
];

/// A configuration value that must never be printed (database URLs carry passwords).
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a sensitive value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value itself, for the one place that needs it (opening a connection).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// All settings, one struct per section.
#[derive(Debug, Clone)]
pub struct Settings {
    /// REST listener and inbound limits (also applied to gRPC).
    pub http: HttpSettings,
    /// gRPC listener.
    pub grpc: GrpcSettings,
    /// Admin listener for `/metrics`.
    pub admin: AdminSettings,
    /// The database the service owns.
    pub database: DatabaseSettings,
    /// Readiness checking.
    pub health: HealthSettings,
    /// Graceful shutdown.
    pub shutdown: ShutdownSettings,
    /// Logging.
    pub log: LogSettings,
    /// Which roles `serve` runs.
    pub roles: Roles,
    /// Kafka, when `APP_KAFKA__BROKERS` is set; otherwise events use the in-process bus.
    pub kafka: Option<KafkaConfig>,
    /// Where events go.
    pub events: EventsSettings,
    /// The outbox relay.
    pub outbox: OutboxSettings,
    /// The inbox consumer.
    pub inbox: InboxSettings,
    /// Idempotency-Key handling.
    pub idempotency: IdempotencySettings,
    /// Redis, when `APP_REDIS__URL` is set.
    pub redis: Option<RedisSettings>,
    /// JWT verification of API callers, when `APP_AUTH__ENABLED=true`.
    pub auth: Option<crate::auth::AuthSettings>,
    /// Per-dependency resilience policies.
    pub resilience: ResilienceSettings,
    /// Deprecated operations and their sunsets.
    pub deprecations: Vec<Deprecation>,
    /// `APP_*` variables that matched no setting (probably typos), reported after logging starts.
    unknown: Vec<String>,
}

/// The resilience policy of each dependency. Timeouts come from each dependency's own
/// settings (statement timeout, `APP_REDIS__TIMEOUT_MS`, message timeout); open periods
/// double on each failed probe up to eight times the first.
#[derive(Debug, Clone, Copy)]
pub struct ResilienceSettings {
    /// PostgreSQL.
    pub postgres: PolicySettings,
    /// Redis (no retries: a repeated `SET NX` would find its own marker).
    pub redis: PolicySettings,
    /// Kafka, as the relay publishes to it (librdkafka retries inside one publish).
    pub kafka: PolicySettings,
}

/// REST listener and inbound request limits.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Where REST, `/healthz` and `/readyz` listen; port 0 picks a free port (tests).
    pub addr: SocketAddr,
    /// Deadline for one request; a gRPC client's shorter `grpc-timeout` wins.
    pub request_timeout: Duration,
    /// Largest request body (REST) or message (gRPC) accepted; larger gets 413 / RESOURCE_EXHAUSTED.
    pub body_limit_bytes: usize,
    /// REST and gRPC requests in flight at most (one limit for both); more are shed.
    pub max_concurrent_requests: usize,
}

/// gRPC listener. Behind a plain Kubernetes Service (no mesh), connections, not calls, are
/// balanced: a maximum connection age makes clients reconnect now and then, so new replicas
/// get traffic; keepalives find dead peers.
#[derive(Debug, Clone)]
pub struct GrpcSettings {
    /// Where the gRPC server listens.
    pub addr: SocketAddr,
    /// After this long a connection is sent GOAWAY (clients reconnect, maybe elsewhere).
    pub max_connection_age: Duration,
    /// How long calls in flight on an aged connection may still finish.
    pub max_connection_age_grace: Duration,
    /// HTTP/2 keepalive PING interval.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
}

/// Admin listener, kept off the public port so metrics are not exposed through ingress.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Where `/metrics` listens.
    pub addr: SocketAddr,
    /// Bearer token required by the admin endpoints that change data (replay, inject).
    pub token: Option<Secret>,
}

/// Database connection settings.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `postgres://…` (production) or `sqlite://…` (embedded default); carries credentials.
    pub url: Secret,
    /// Upper bound on the API's pooled connections per replica.
    pub max_connections: u32,
    /// The relay's pool (PostgreSQL; SQLite shares one pool).
    pub relay_max_connections: u32,
    /// The inbox's pool (PostgreSQL).
    pub inbox_max_connections: u32,
    /// Longest statement on the service's pools (`statement_timeout`; SQLite busy timeout).
    pub statement_timeout: Duration,
    /// Longest wait of `migrate` for a lock; migrations have no statement timeout.
    pub migration_lock_timeout: Duration,
    /// How long a request waits for a connection before failing fast with 503.
    pub acquire_timeout: Duration,
    /// Apply migrations when `serve` starts (off in Kubernetes, where a hook Job runs `migrate`).
    pub migrate_on_start: bool,
}

/// Readiness checking.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// Interval of the background check that keeps gRPC health current.
    pub check_interval: Duration,
    /// Deadline for one check, so a hung database makes the service unready, not stuck.
    pub check_timeout: Duration,
    /// How long the database may fail its checks before the service reports not ready
    /// (a blip must not pull every replica out of load balancing at once).
    pub database_grace: Duration,
}

/// Graceful shutdown.
#[derive(Debug, Clone)]
pub struct ShutdownSettings {
    /// Upper bound on waiting for in-flight requests after SIGTERM (keep below the pod's
    /// `terminationGracePeriodSeconds`).
    pub drain_timeout: Duration,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Text or JSON.
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive.
    pub level: String,
}

/// The roles a `serve` process runs, so they can be split into separate Deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// REST and gRPC APIs.
    pub api: bool,
    /// The outbox relay.
    pub relay: bool,
    /// The inbox consumer.
    pub consumer: bool,
}

/// Kafka settings.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Producer and admin client settings.
    pub client: KafkaSettings,
    /// Create missing topics at startup (brokers without auto-creation, dev clusters).
    pub create_topics: bool,
    /// How topics created at startup are laid out.
    pub topics: TopicSettings,
}

/// Event publishing.
#[derive(Debug, Clone)]
pub struct EventsSettings {
    /// Topic of the events this service publishes.
    pub topic: String,
    /// CloudEvents `source`.
    pub source: String,
    /// Size limit of the in-process bus (the same limit Kafka's producer enforces).
    pub max_message_bytes: usize,
}

/// Outbox relay settings.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// Number of partitions (P).
    pub partitions: i32,
    /// Rows per partition per pass.
    pub batch_size: i64,
    /// Batches with the broker at once.
    pub in_flight_batches: usize,
    /// Polling fallback.
    pub poll_interval: Duration,
    /// Lease duration.
    pub lease_ttl: Duration,
    /// Coalescing window of cross-process NOTIFYs.
    pub notify_window: Duration,
    /// Retry delays.
    pub backoff: Backoff,
    /// Lease owner id; `None` = generated.
    pub relay_id: Option<String>,
}

/// A configuration error naming the variable and what was wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: String,
    /// What was wrong.
    pub message: String,
}

impl Settings {
    /// Reads settings from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads settings from the given variables; tests use this instead of mutating the
    /// process environment.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let vars: BTreeMap<String, String> =
            vars.into_iter().filter(|(k, _)| k.starts_with("APP_")).collect();
        let env = Vars(&vars);
        let settings = Settings {
            http: HttpSettings {
                addr: env.parse("APP_HTTP__ADDR")?,
                request_timeout: env.millis("APP_HTTP__REQUEST_TIMEOUT_MS")?,
                body_limit_bytes: env.parse("APP_HTTP__BODY_LIMIT_BYTES")?,
                max_concurrent_requests: env.parse("APP_HTTP__MAX_CONCURRENT_REQUESTS")?,
            },
            grpc: GrpcSettings {
                addr: env.parse("APP_GRPC__ADDR")?,
                max_connection_age: env.millis("APP_GRPC__MAX_CONNECTION_AGE_MS")?,
                max_connection_age_grace: env.millis("APP_GRPC__MAX_CONNECTION_AGE_GRACE_MS")?,
                keepalive_interval: env.millis("APP_GRPC__KEEPALIVE_INTERVAL_MS")?,
                keepalive_timeout: env.millis("APP_GRPC__KEEPALIVE_TIMEOUT_MS")?,
            },
            admin: AdminSettings {
                addr: env.parse("APP_ADMIN__ADDR")?,
                token: Some(env.raw("APP_ADMIN__TOKEN")).filter(|t| !t.is_empty()).map(Secret::new),
            },
            database: DatabaseSettings {
                url: Secret::new(env.raw("APP_DATABASE__URL")),
                max_connections: env.parse("APP_DATABASE__MAX_CONNECTIONS")?,
                relay_max_connections: env.parse("APP_DATABASE__RELAY_MAX_CONNECTIONS")?,
                inbox_max_connections: env.parse("APP_DATABASE__INBOX_MAX_CONNECTIONS")?,
                statement_timeout: env.millis("APP_DATABASE__STATEMENT_TIMEOUT_MS")?,
                migration_lock_timeout: env.millis("APP_DATABASE__MIGRATION_LOCK_TIMEOUT_MS")?,
                acquire_timeout: env.millis("APP_DATABASE__ACQUIRE_TIMEOUT_MS")?,
                migrate_on_start: env.parse("APP_DATABASE__MIGRATE_ON_START")?,
            },
            health: HealthSettings {
                check_interval: env.millis("APP_HEALTH__CHECK_INTERVAL_MS")?,
                check_timeout: env.millis("APP_HEALTH__CHECK_TIMEOUT_MS")?,
                database_grace: env.millis("APP_HEALTH__DATABASE_GRACE_MS")?,
            },
            shutdown: ShutdownSettings { drain_timeout: env.millis("APP_SHUTDOWN__DRAIN_TIMEOUT_MS")? },
            log: LogSettings {
                format: match env.raw("APP_LOG_FORMAT").as_str() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    other => {
                        return Err(error("APP_LOG_FORMAT", format!("expected text or json, got {other:?}")));
                    }
                },
                level: env.raw("APP_LOG_LEVEL"),
            },
            roles: parse_roles(&env.raw("APP_ROLES"))?,
            kafka: match env.raw("APP_KAFKA__BROKERS") {
                brokers if brokers.is_empty() => None,
                brokers => Some(KafkaConfig {
                    client: KafkaSettings {
                        brokers,
                        message_timeout: env.millis("APP_KAFKA__MESSAGE_TIMEOUT_MS")?,
                        message_max_bytes: env.parse("APP_KAFKA__MESSAGE_MAX_BYTES")?,
                        linger: Duration::from_millis(env.parse("APP_KAFKA__LINGER_MS")?),
                        properties: parse_properties(&env.raw("APP_KAFKA__PROPERTIES"))?,
                    },
                    create_topics: env.parse("APP_KAFKA__CREATE_TOPICS")?,
                    topics: TopicSettings {
                        partitions: env.parse("APP_KAFKA__TOPIC_PARTITIONS")?,
                        replication: env.parse("APP_KAFKA__TOPIC_REPLICATION")?,
                        min_insync_replicas: match env.raw("APP_KAFKA__TOPIC_MIN_INSYNC_REPLICAS") {
                            raw if raw.is_empty() => None,
                            _ => Some(env.parse("APP_KAFKA__TOPIC_MIN_INSYNC_REPLICAS")?),
                        },
                    },
                }),
            },
            events: EventsSettings {
                topic: env.raw("APP_EVENTS__TOPIC"),
                source: env.raw("APP_EVENTS__SOURCE"),
                max_message_bytes: env.parse("APP_KAFKA__MESSAGE_MAX_BYTES")?,
            },
            outbox: OutboxSettings {
                partitions: env.parse("APP_OUTBOX__PARTITIONS")?,
                batch_size: env.parse("APP_OUTBOX__BATCH_SIZE")?,
                in_flight_batches: env.parse("APP_OUTBOX__IN_FLIGHT_BATCHES")?,
                poll_interval: env.millis("APP_OUTBOX__POLL_INTERVAL_MS")?,
                lease_ttl: env.millis("APP_OUTBOX__LEASE_TTL_MS")?,
                notify_window: env.millis("APP_OUTBOX__NOTIFY_WINDOW_MS")?,
                backoff: Backoff::new(
                    env.millis("APP_OUTBOX__RETRY_MIN_MS")?,
                    env.millis("APP_OUTBOX__RETRY_MAX_MS")?,
                )
                .map_err(|e| error("APP_OUTBOX__RETRY_MIN_MS", e.to_string()))?,
                relay_id: Some(env.raw("APP_OUTBOX__RELAY_ID")).filter(|id| !id.is_empty()),
            },
            inbox: InboxSettings {
                group_id: env.raw("APP_KAFKA__GROUP_ID"),
                payments_topic: env.raw("APP_INBOX__PAYMENTS_TOPIC"),
                customers_topic: env.raw("APP_INBOX__CUSTOMERS_TOPIC"),
                retention: Duration::from_secs(3600 * env.parse::<u64>("APP_INBOX__RETENTION_HOURS")?),
                max_parallel_partitions: env.parse("APP_INBOX__MAX_PARALLEL_PARTITIONS")?,
                max_attempts: env.parse("APP_INBOX__MAX_ATTEMPTS")?,
            },
            auth: match env.parse::<bool>("APP_AUTH__ENABLED")? {
                false => None,
                true => Some(auth_settings(&env)?),
            },
            idempotency: IdempotencySettings {
                ttl: env.millis("APP_IDEMPOTENCY__TTL_MS")?,
                lock_ttl: env.millis("APP_IDEMPOTENCY__LOCK_TTL_MS")?,
                identity_header: env.raw("APP_IDEMPOTENCY__IDENTITY_HEADER").to_ascii_lowercase(),
                memory_capacity: env.parse("APP_IDEMPOTENCY__MEMORY_CAPACITY")?,
            },
            redis: match env.raw("APP_REDIS__URL") {
                url if url.is_empty() => None,
                url => Some(RedisSettings {
                    url: Secret::new(url),
                    key_prefix: env.raw("APP_REDIS__KEY_PREFIX"),
                    timeout: env.millis("APP_REDIS__TIMEOUT_MS")?,
                    ca_file: Some(env.raw("APP_REDIS__CA_FILE")).filter(|f| !f.is_empty()).map(Into::into),
                }),
            },
            resilience: resilience(&env)?,
            deprecations: {
                let raw = env.raw("APP_DEPRECATIONS");
                let raw = if raw.trim().is_empty() { crate::deprecation::DEFAULT_TABLE } else { &raw };
                crate::deprecation::parse_table(raw, &crate::deprecation::known_operations())
                    .map_err(|message| error("APP_DEPRECATIONS", message))?
            },
            unknown: vars
                .keys()
                .filter(|k| !VARIABLES.iter().any(|(name, _, _)| name == k))
                .cloned()
                .collect(),
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Cross-field and range checks that parsing alone cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.database.url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://") || url.starts_with("sqlite:"))
        {
            return Err(error("APP_DATABASE__URL", "expected a postgres:// or sqlite: URL"));
        }
        for (variable, size) in [
            ("APP_DATABASE__MAX_CONNECTIONS", self.database.max_connections),
            ("APP_DATABASE__RELAY_MAX_CONNECTIONS", self.database.relay_max_connections),
            ("APP_DATABASE__INBOX_MAX_CONNECTIONS", self.database.inbox_max_connections),
        ] {
            if size == 0 {
                return Err(error(variable, "must be at least 1"));
            }
        }
        if let Some(kafka) = &self.kafka {
            kafka.topics.validate().map_err(|(variable, message)| error(variable, message))?;
        }
        if self.inbox.max_attempts == 0 {
            return Err(error("APP_INBOX__MAX_ATTEMPTS", "must be at least 1"));
        }
        if self.idempotency.memory_capacity == 0 {
            return Err(error("APP_IDEMPOTENCY__MEMORY_CAPACITY", "must be at least 1"));
        }
        if self.http.max_concurrent_requests == 0 {
            return Err(error("APP_HTTP__MAX_CONCURRENT_REQUESTS", "must be at least 1"));
        }
        if self.http.body_limit_bytes < 1024 {
            return Err(error("APP_HTTP__BODY_LIMIT_BYTES", "must be at least 1024"));
        }
        if !(1..=1024).contains(&self.outbox.partitions) {
            return Err(error("APP_OUTBOX__PARTITIONS", "must be between 1 and 1024"));
        }
        if !(1..=10_000).contains(&self.outbox.batch_size) {
            return Err(error("APP_OUTBOX__BATCH_SIZE", "must be between 1 and 10000"));
        }
        if !(1..=64).contains(&self.outbox.in_flight_batches) {
            return Err(error("APP_OUTBOX__IN_FLIGHT_BATCHES", "must be between 1 and 64"));
        }
        let publish_timeout = self.publish_timeout();
        if self.outbox.lease_ttl <= publish_timeout * 2 {
            return Err(error(
                "APP_OUTBOX__LEASE_TTL_MS",
                format!(
                    "must exceed twice APP_KAFKA__MESSAGE_TIMEOUT_MS ({publish_timeout:?}) so a batch never outlives its lease"
                ),
            ));
        }
        if self.inbox.retention.is_zero() {
            return Err(error("APP_INBOX__RETENTION_HOURS", "must be at least 1"));
        }
        if !(1..=256).contains(&self.inbox.max_parallel_partitions) {
            return Err(error("APP_INBOX__MAX_PARALLEL_PARTITIONS", "must be between 1 and 256"));
        }
        if self.inbox.group_id.is_empty() {
            return Err(error("APP_KAFKA__GROUP_ID", "must not be empty"));
        }
        if self.idempotency.lock_ttl <= self.http.request_timeout {
            return Err(error(
                "APP_IDEMPOTENCY__LOCK_TTL_MS",
                "must exceed APP_HTTP__REQUEST_TIMEOUT_MS, or a slow request's key could be taken twice",
            ));
        }
        if let Some(redis) = &self.redis
            && !(redis.url.expose().starts_with("redis://") || redis.url.expose().starts_with("rediss://"))
        {
            return Err(error("APP_REDIS__URL", "expected a redis:// or rediss:// URL"));
        }
        if let Some(redis) = &self.redis
            && redis.ca_file.is_some()
            && !redis.url.expose().starts_with("rediss://")
        {
            return Err(error("APP_REDIS__CA_FILE", "needs a rediss:// APP_REDIS__URL (TLS)"));
        }
        if self.events.topic.is_empty() {
            return Err(error("APP_EVENTS__TOPIC", "must not be empty"));
        }
        match &self.admin.token {
            None if !self.admin.addr.ip().is_loopback() => {
                return Err(error(
                    "APP_ADMIN__TOKEN",
                    format!(
                        "is required when APP_ADMIN__ADDR ({}) is reachable from other hosts: the admin port can replay \
                         dead letters and inject events",
                        self.admin.addr
                    ),
                ));
            }
            Some(token)
                if token.expose().len() < 16 || token.expose().chars().any(|c| !c.is_ascii_graphic()) =>
            {
                return Err(error(
                    "APP_ADMIN__TOKEN",
                    "must be at least 16 printable ASCII characters without spaces",
                ));
            }
            _ => {}
        }
        if !(1000..=100_000_000).contains(&self.events.max_message_bytes) {
            return Err(error("APP_KAFKA__MESSAGE_MAX_BYTES", "must be between 1000 and 100000000"));
        }
        Ok(())
    }

    /// Longest one publish may take: Kafka's delivery timeout, or a nominal second in-process.
    pub fn publish_timeout(&self) -> Duration {
        self.kafka.as_ref().map_or(Duration::from_secs(1), |k| k.client.message_timeout)
    }

    /// Logs a warning for each `APP_*` variable that matched no setting.
    pub fn warn_unknown_vars(&self) {
        for name in &self.unknown {
            tracing::warn!(variable = %name, "unknown configuration variable ignored (typo?)");
        }
    }
}

/// Lookup over the `APP_*` variables, falling back to the documented defaults.
struct Vars<'a>(&'a BTreeMap<String, String>);

impl Vars<'_> {
    fn raw(&self, name: &str) -> String {
        match self.0.get(name) {
            Some(value) => value.trim().to_owned(),
            None => default_of(name).to_owned(),
        }
    }

    fn parse<T: FromStr>(&self, name: &str) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        let raw = self.raw(name);
        raw.parse().map_err(|e| error(name, format!("cannot parse {raw:?}: {e}")))
    }

    /// A duration in milliseconds; zero is rejected because every timeout here must fire.
    fn millis(&self, name: &str) -> Result<Duration, ConfigError> {
        match self.parse::<u64>(name)? {
            0 => Err(error(name, "must be greater than 0")),
            ms => Ok(Duration::from_millis(ms)),
        }
    }
}

/// Reads `APP_AUTH__*` (auth is on): exactly one key source, an issuer and an audience.
fn auth_settings(env: &Vars<'_>) -> Result<crate::auth::AuthSettings, ConfigError> {
    use crate::auth::{AuthSettings, JwksSource, Scopes};
    let required = |name: &str| {
        let value = env.raw(name);
        if value.is_empty() { Err(error(name, "is required when APP_AUTH__ENABLED=true")) } else { Ok(value) }
    };
    let jwks = match (env.raw("APP_AUTH__JWKS_FILE"), env.raw("APP_AUTH__JWKS_URL")) {
        (file, url) if file.is_empty() == url.is_empty() => {
            return Err(error(
                "APP_AUTH__JWKS_FILE",
                "set exactly one of APP_AUTH__JWKS_FILE and APP_AUTH__JWKS_URL",
            ));
        }
        (file, _) if !file.is_empty() => JwksSource::File(file.into()),
        (_, url) if url.starts_with("https://") || url.starts_with("http://") => JwksSource::Url(url),
        _ => return Err(error("APP_AUTH__JWKS_URL", "expected an https:// (or http://) URL")),
    };
    let scope = |name: &str| {
        let value = env.raw(name);
        if value.is_empty() || value.contains(char::is_whitespace) {
            Err(error(name, "must be one scope, without spaces"))
        } else {
            Ok(value)
        }
    };
    Ok(AuthSettings {
        jwks,
        issuer: required("APP_AUTH__ISSUER")?,
        audience: required("APP_AUTH__AUDIENCE")?,
        leeway: Duration::from_millis(env.parse::<u64>("APP_AUTH__LEEWAY_MS")?),
        refresh: env.millis("APP_AUTH__JWKS_REFRESH_MS")?,
        jwks_ca: Some(env.raw("APP_AUTH__JWKS_CA_FILE")).filter(|f| !f.is_empty()).map(Into::into),
        scopes: Scopes {
            create: scope("APP_AUTH__SCOPE_CREATE")?,
            read: scope("APP_AUTH__SCOPE_READ")?,
            cancel: scope("APP_AUTH__SCOPE_CANCEL")?,
        },
    })
}

/// Reads `APP_RESILIENCE__*`, with each dependency's timeout from its own settings.
fn resilience(env: &Vars<'_>) -> Result<ResilienceSettings, ConfigError> {
    let breaker = |dep: &str| -> Result<BreakerSettings, ConfigError> {
        let failures: u32 = env.parse(&format!("APP_RESILIENCE__{dep}__BREAKER_FAILURES"))?;
        if failures == 0 {
            return Err(error(&format!("APP_RESILIENCE__{dep}__BREAKER_FAILURES"), "must be at least 1"));
        }
        let open = env.millis(&format!("APP_RESILIENCE__{dep}__BREAKER_OPEN_MS"))?;
        Ok(BreakerSettings { failures, open, open_max: open * 8 })
    };
    let statement = env.millis("APP_DATABASE__STATEMENT_TIMEOUT_MS")?;
    let acquire = env.millis("APP_DATABASE__ACQUIRE_TIMEOUT_MS")?;
    let backoff =
        |max: Duration| Backoff::new(Duration::from_millis(20).min(max), max).unwrap_or(Backoff::DEFAULT);
    let percent: f32 = env.parse("APP_RESILIENCE__POSTGRES__RETRY_BUDGET_PERCENT")?;
    if !(0.0..=100.0).contains(&percent) {
        return Err(error("APP_RESILIENCE__POSTGRES__RETRY_BUDGET_PERCENT", "must be between 0 and 100"));
    }
    let concurrency = |dep: &str| -> Result<usize, ConfigError> {
        let name = format!("APP_RESILIENCE__{dep}__CONCURRENCY");
        match env.parse::<usize>(&name)? {
            0 => Err(error(&name, "must be at least 1")),
            n => Ok(n),
        }
    };
    let redis_timeout = env.millis("APP_REDIS__TIMEOUT_MS")?;
    let kafka_timeout = env.millis("APP_KAFKA__MESSAGE_TIMEOUT_MS")?;
    Ok(ResilienceSettings {
        postgres: PolicySettings {
            timeout: statement + acquire,
            retries: env.parse("APP_RESILIENCE__POSTGRES__RETRIES")?,
            backoff: backoff(Duration::from_millis(500)),
            retry_ratio: percent / 100.0,
            retry_floor_per_sec: 1,
            breaker: breaker("POSTGRES")?,
            concurrency: concurrency("POSTGRES")?,
        },
        redis: PolicySettings {
            timeout: redis_timeout,
            retries: 0,
            backoff: backoff(redis_timeout),
            retry_ratio: 0.0,
            retry_floor_per_sec: 0,
            breaker: breaker("REDIS")?,
            concurrency: concurrency("REDIS")?,
        },
        kafka: PolicySettings {
            timeout: kafka_timeout,
            retries: 0,
            backoff: backoff(kafka_timeout),
            retry_ratio: 0.0,
            retry_floor_per_sec: 0,
            breaker: breaker("KAFKA")?,
            concurrency: 1,
        },
    })
}

fn parse_roles(raw: &str) -> Result<Roles, ConfigError> {
    let mut roles = Roles { api: false, relay: false, consumer: false };
    for role in raw.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        match role {
            "api" => roles.api = true,
            "relay" => roles.relay = true,
            "consumer" => roles.consumer = true,
            other => {
                return Err(error(
                    "APP_ROLES",
                    format!("unknown role {other:?}; expected api, relay, consumer"),
                ));
            }
        }
    }
    if !roles.api && !roles.relay && !roles.consumer {
        return Err(error("APP_ROLES", "needs at least one role"));
    }
    Ok(roles)
}

/// `key=value;key=value` librdkafka properties.
fn parse_properties(raw: &str) -> Result<Vec<(String, String)>, ConfigError> {
    raw.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(error("APP_KAFKA__PROPERTIES", "expected key=value pairs separated by ';'")),
        })
        .collect()
}

fn default_of(name: &str) -> &'static str {
    VARIABLES.iter().find(|(n, _, _)| *n == name).map(|(_, default, _)| *default).unwrap_or_default()
}

fn error(variable: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { variable: variable.to_owned(), message: message.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_need_no_environment() {
        let settings = Settings::from_vars(vars(&[])).expect("defaults are valid");
        assert_eq!(settings.http.addr.port(), 8080);
        assert_eq!(settings.grpc.addr.port(), 50051);
        assert_eq!(settings.admin.addr.port(), 9090);
        assert!(settings.database.url.expose().starts_with("sqlite:"));
        assert_eq!(settings.http.body_limit_bytes, 1024 * 1024);
    }

    #[test]
    fn an_admin_port_reachable_from_other_hosts_needs_a_token() {
        let err = Settings::from_vars(vars(&[("APP_ADMIN__ADDR", "0.0.0.0:9090")])).unwrap_err();
        assert_eq!(err.variable, "APP_ADMIN__TOKEN");
        assert!(err.message.contains("0.0.0.0:9090"), "{}", err.message);
        let short = [("APP_ADMIN__ADDR", "0.0.0.0:9090"), ("APP_ADMIN__TOKEN", "short")];
        assert_eq!(Settings::from_vars(vars(&short)).unwrap_err().variable, "APP_ADMIN__TOKEN");
        let spaced = [("APP_ADMIN__TOKEN", "a token with spaces in it")];
        assert_eq!(Settings::from_vars(vars(&spaced)).unwrap_err().variable, "APP_ADMIN__TOKEN");
        let ok = [("APP_ADMIN__ADDR", "0.0.0.0:9090"), ("APP_ADMIN__TOKEN", "0123456789abcdef")];
        let settings = Settings::from_vars(vars(&ok)).expect("a token makes it acceptable");
        assert_eq!(format!("{:?}", settings.admin.token), "Some(Secret([redacted]))", "never printed");
        let loopback = Settings::from_vars(vars(&[("APP_ADMIN__ADDR", "[::1]:9090")])).expect("loopback");
        assert!(loopback.admin.token.is_none(), "loopback without a token: cargo run's default");
    }

    #[test]
    fn auth_needs_one_key_source_an_issuer_and_an_audience() {
        let on = |extra: &[(&str, &str)]| {
            let mut all = vec![
                ("APP_AUTH__ENABLED", "true"),
                ("APP_AUTH__ISSUER", "https://id"),
                ("APP_AUTH__AUDIENCE", "orders"),
            ];
            all.extend_from_slice(extra);
            Settings::from_vars(vars(&all))
        };
        assert_eq!(on(&[]).unwrap_err().variable, "APP_AUTH__JWKS_FILE", "no key source");
        let both = [("APP_AUTH__JWKS_FILE", "/k.json"), ("APP_AUTH__JWKS_URL", "http://id/jwks")];
        assert_eq!(on(&both).unwrap_err().variable, "APP_AUTH__JWKS_FILE", "two key sources");
        let ftp = on(&[("APP_AUTH__JWKS_URL", "ftp://id/jwks")]).unwrap_err();
        assert_eq!(ftp.variable, "APP_AUTH__JWKS_URL");
        let https = on(&[("APP_AUTH__JWKS_URL", "https://id/jwks"), ("APP_AUTH__JWKS_CA_FILE", "/ca.crt")]);
        assert_eq!(
            https.expect("https is served by rustls").auth.expect("on").jwks_ca,
            Some("/ca.crt".into())
        );
        let spaced = [("APP_AUTH__JWKS_FILE", "/k.json"), ("APP_AUTH__SCOPE_READ", "a b")];
        assert_eq!(on(&spaced).unwrap_err().variable, "APP_AUTH__SCOPE_READ");
        let no_issuer = [
            ("APP_AUTH__ENABLED", "true"),
            ("APP_AUTH__JWKS_FILE", "/k.json"),
            ("APP_AUTH__AUDIENCE", "orders"),
        ];
        assert_eq!(Settings::from_vars(vars(&no_issuer)).unwrap_err().variable, "APP_AUTH__ISSUER");
        let settings = on(&[("APP_AUTH__JWKS_URL", "http://id/jwks")]).expect("valid");
        let auth = settings.auth.expect("on");
        assert_eq!(auth.jwks, crate::auth::JwksSource::Url("http://id/jwks".into()));
        assert_eq!((auth.scopes.create.as_str(), auth.scopes.read.as_str()), ("orders:write", "orders:read"));
        assert!(Settings::from_vars(vars(&[])).expect("defaults").auth.is_none(), "off by default");
    }

    #[test]
    fn errors_name_the_variable() {
        let err = Settings::from_vars(vars(&[("APP_HTTP__REQUEST_TIMEOUT_MS", "0")])).unwrap_err();
        assert_eq!(err.variable, "APP_HTTP__REQUEST_TIMEOUT_MS");
        let err = Settings::from_vars(vars(&[("APP_GRPC__ADDR", "nowhere")])).unwrap_err();
        assert_eq!(err.variable, "APP_GRPC__ADDR");
        let err = Settings::from_vars(vars(&[("APP_DATABASE__URL", "mysql://x")])).unwrap_err();
        assert_eq!(err.variable, "APP_DATABASE__URL");
        let err = Settings::from_vars(vars(&[("APP_LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.to_string().starts_with("APP_LOG_FORMAT: "), "{err}");
        let err = Settings::from_vars(vars(&[("APP_ROLES", "api,worker")])).unwrap_err();
        assert_eq!(err.variable, "APP_ROLES");
        let err = Settings::from_vars(vars(&[
            ("APP_OUTBOX__RETRY_MIN_MS", "5000"),
            ("APP_OUTBOX__RETRY_MAX_MS", "10"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable, "APP_OUTBOX__RETRY_MIN_MS");
        let err = Settings::from_vars(vars(&[
            ("APP_KAFKA__BROKERS", "k:9092"),
            ("APP_OUTBOX__LEASE_TTL_MS", "15000"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable, "APP_OUTBOX__LEASE_TTL_MS");
        let err = Settings::from_vars(vars(&[
            ("APP_KAFKA__BROKERS", "k:9092"),
            ("APP_KAFKA__PROPERTIES", "novalue"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable, "APP_KAFKA__PROPERTIES");
        let err = Settings::from_vars(vars(&[
            ("APP_KAFKA__BROKERS", "k:9092"),
            ("APP_KAFKA__TOPIC_REPLICATION", "1"),
            ("APP_KAFKA__TOPIC_MIN_INSYNC_REPLICAS", "2"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable, "APP_KAFKA__TOPIC_MIN_INSYNC_REPLICAS");
        assert!(err.message.contains("rejects every write"), "{err}");
        let err = Settings::from_vars(vars(&[("APP_INBOX__MAX_ATTEMPTS", "0")])).unwrap_err();
        assert_eq!(err.variable, "APP_INBOX__MAX_ATTEMPTS");
    }

    #[test]
    fn topics_default_to_three_replicas_acknowledged_by_two() {
        let settings = Settings::from_vars(vars(&[("APP_KAFKA__BROKERS", "k:9092")])).expect("valid");
        let topics = settings.kafka.expect("kafka").topics;
        assert_eq!((topics.replication, topics.min_isr()), (3, 2));
        let single = Settings::from_vars(vars(&[
            ("APP_KAFKA__BROKERS", "k:9092"),
            ("APP_KAFKA__TOPIC_REPLICATION", "1"),
        ]))
        .expect("valid");
        assert_eq!(single.kafka.expect("kafka").topics.min_isr(), 1);
    }

    #[test]
    fn every_variable_is_documented_in_the_readme() {
        let readme = include_str!("../README.md");
        for (name, default, _) in VARIABLES {
            let row = format!("| `{name}` | ");
            assert!(readme.contains(&row), "README.md has no configuration row for {name}");
            if !default.is_empty() {
                assert!(
                    readme.contains(&format!("{row}`{default}` |")),
                    "README.md shows a wrong default for {name}"
                );
            }
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let settings = Settings::from_vars(vars(&[("APP_DATABASE__URL", "postgres://u:hunter2@db/orders")]))
            .expect("valid");
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn a_sunset_before_its_deprecation_stops_startup() {
        let table = r#"[{"operation":"GET /v1/orders/{id}/status","deprecation":"2027-01-01T00:00:00Z",
            "sunset":"2026-01-01T00:00:00Z","link":"https://docs.example/d"}]"#;
        let err = Settings::from_vars(vars(&[("APP_DEPRECATIONS", table)])).expect_err("refused");
        assert_eq!(err.variable, "APP_DEPRECATIONS");
        assert!(err.message.contains("must come after the deprecation"), "{err}");
        let defaults = Settings::from_vars(vars(&[])).expect("valid");
        assert_eq!(defaults.deprecations.len(), 2, "the built-in table");
        let none = Settings::from_vars(vars(&[("APP_DEPRECATIONS", "[]")])).expect("valid");
        assert!(none.deprecations.is_empty());
    }

    #[test]
    fn unknown_variables_are_remembered() {
        let settings =
            Settings::from_vars(vars(&[("APP_HTTP__ADR", "x"), ("HOME", "/root")])).expect("valid");
        assert_eq!(settings.unknown, vec!["APP_HTTP__ADR".to_owned()]);
    }
}

#[cfg(test)]
mod properties {
    //! Configuration values come from the environment: any value of any variable is
    //! accepted or refused with an error naming a variable, never a panic.
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_value_is_accepted_or_names_a_variable(index in 0..VARIABLES.len(), value in any::<String>()) {
            let name = VARIABLES[index].0;
            if let Err(e) = Settings::from_vars([(name.to_owned(), value)]) {
                prop_assert!(e.variable.starts_with("APP_"), "{}", e.variable);
                prop_assert!(!e.message.is_empty());
            }
        }
    }
}
