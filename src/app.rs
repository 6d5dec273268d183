//! Wiring: the only module that knows every adapter. [`App::build`] connects the store and
//! binds the listeners (port 0 works, for tests); [`App::run_until_stopped`] serves until
//! SIGTERM/SIGINT or [`App::shutdown_token`] fires, then drains within a bounded time.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{pb::health_server::HealthServer, server::HealthReporter, server::HealthService};

use crate::{
    admin::{self, AdminState},
    auth,
    config::Settings,
    deprecation::{self, DeprecationLayer, Deprecations},
    grpc::{self, GrpcOrders},
    health::Readiness,
    http::{self, AppState, Limits},
    idempotency::{Idempotency, KeyStore, MemoryKeyStore, RedisKeyStore, http::IdempotencyLayerState},
    inbox::{self, Inbox, kafka::KafkaInbox},
    metrics::{GrpcMetricsLayer, Metrics},
    orders::Orders,
    outbox::{
        Wakeup, notify,
        relay::{Relay, RelaySettings},
    },
    pb,
    publish::{InMemoryBus, KafkaPublisher, Publisher},
    resilience::{Dependency, Policy, inbound::InboundLayer},
    store::{self, Stores},
};

/// A built, bound, not yet running service.
pub struct App {
    settings: Settings,
    /// The bound REST, gRPC and admin addresses (port 0 resolved).
    addrs: [SocketAddr; 3],
    http: TcpListener,
    grpc: TcpListener,
    admin: TcpListener,
    stores: Stores,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    health: HealthReporter,
    /// One resilience policy per dependency.
    policies: Policies,
    shutdown: CancellationToken,
    wakeup: Arc<Wakeup>,
    /// The relay, when this process runs the relay role.
    relay: Option<Arc<Relay>>,
    /// The inbox, when this process runs the consumer role.
    inbox: Option<Arc<Inbox>>,
    /// The in-process bus, when no Kafka is configured.
    bus: Option<Arc<InMemoryBus>>,
    /// Cross-process wake-ups (PostgreSQL only): the notifier's queue.
    notify_rx: Option<tokio::sync::mpsc::Receiver<i32>>,
    /// JWT verification, when `APP_AUTH__ENABLED`; its keys are loaded before serving.
    auth: Option<Arc<auth::Authenticator>>,
}

impl App {
    /// Connects the store (migrating it if configured) and binds every listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let metrics = Metrics::new()?;
        let policies = Policies::new(&settings, &metrics);
        let stores = store::connect_guarded(&settings.database, policies.postgres.clone())
            .await
            .context("connecting to the database")?;
        metrics.register_pools(stores.pools.clone())?;
        if settings.database.migrate_on_start {
            stores.api.migrate().await.context("applying migrations at startup")?;
        }
        if stores.api.migrations_applied().await.unwrap_or(false) {
            // Every role writes or reads partitioned outbox rows: all must agree on P.
            stores
                .api
                .ensure_partitions(settings.outbox.partitions)
                .await
                .context("checking APP_OUTBOX__PARTITIONS")?;
        }
        let bind = |addr: SocketAddr, var: &'static str| async move {
            TcpListener::bind(addr).await.with_context(|| format!("binding {addr} ({var})"))
        };
        let http = bind(settings.http.addr, "APP_HTTP__ADDR").await?;
        let grpc = bind(settings.grpc.addr, "APP_GRPC__ADDR").await?;
        let admin = bind(settings.admin.addr, "APP_ADMIN__ADDR").await?;
        let addrs = [http.local_addr()?, grpc.local_addr()?, admin.local_addr()?];
        let health = HealthReporter::new();
        let readiness = Readiness::new(
            stores.api.clone(),
            health.clone(),
            &settings.health,
            policies.optional(&settings),
        )
        .await;

        let (notify_tx, notify_rx) = match &stores.notify_pool {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::channel(1024);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let wakeup = Wakeup::new(notify_tx);
        let (publisher, bus) = publisher(&settings, stores.notify_pool.is_some())?;
        let relay = settings.roles.relay.then(|| {
            let owner = settings.outbox.relay_id.clone().unwrap_or_else(generated_relay_id);
            let relay_settings = relay_settings(&settings);
            let relay = Relay::new(
                owner,
                stores.relay.clone(),
                publisher.clone(),
                wakeup.clone(),
                metrics.clone(),
                relay_settings,
            );
            if settings.kafka.is_some() {
                relay.guard_publishing(policies.kafka.clone());
            }
            relay
        });
        let inbox = settings.roles.consumer.then(|| {
            let (partitions, backoff) = (settings.outbox.partitions, settings.outbox.backoff);
            let inbox_settings = settings.inbox.clone();
            Inbox::new(
                stores.inbox.clone(),
                wakeup.clone(),
                partitions,
                publisher,
                metrics.clone(),
                backoff,
                inbox_settings,
            )
        });
        let auth = match &settings.auth {
            Some(auth) => {
                Some(auth::Authenticator::new(auth.clone()).await.context("loading the JWKS (APP_AUTH__*)")?)
            }
            None => None,
        };
        Ok(Self {
            auth,
            settings,
            addrs,
            http,
            grpc,
            admin,
            stores,
            metrics,
            readiness,
            health,
            policies,
            shutdown: CancellationToken::new(),
            wakeup,
            relay,
            inbox,
            bus,
            notify_rx,
        })
    }

    /// The relay of this process, if it runs the relay role (tests drive it directly).
    pub fn relay(&self) -> Option<Arc<Relay>> {
        self.relay.clone()
    }

    /// The in-process event bus, when no Kafka is configured.
    pub fn bus(&self) -> Option<Arc<InMemoryBus>> {
        self.bus.clone()
    }

    /// Where REST listens (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Where gRPC listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addrs[1]
    }

    /// Where `/metrics` listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs[2]
    }

    /// Cancelling this token starts a graceful shutdown, exactly like SIGTERM.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until shutdown, then stops accepting, drains in-flight requests for at most
    /// `APP_SHUTDOWN__DRAIN_TIMEOUT_MS`, and returns.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let App {
            settings,
            addrs,
            http,
            grpc,
            admin,
            stores,
            metrics,
            readiness,
            health,
            policies,
            shutdown,
            wakeup,
            relay,
            inbox,
            bus,
            notify_rx,
            auth,
        } = self;
        let pg_pool = stores.notify_pool.clone();
        let [http_addr, grpc_addr, admin_addr] = addrs;
        tracing::info!(http = %http_addr, grpc = %grpc_addr, admin = %admin_addr, "orders-service listening");
        tokio::spawn(stop_on_signal(shutdown.clone()));
        tokio::spawn(readiness.clone().run(settings.health.check_interval, shutdown.clone()));

        // Background tasks stop after the servers drained, so in-flight writes still wake them.
        let background_stop = CancellationToken::new();
        let mut background = Vec::new();
        if let (Some(pool), Some(rx)) = (pg_pool.clone(), notify_rx) {
            let window = settings.outbox.notify_window;
            background.push(tokio::spawn(notify::run_notifier(pool, rx, window, background_stop.clone())));
        }
        if let Some(relay) = relay {
            if let Some(pool) = pg_pool.clone() {
                background.push(tokio::spawn(notify::run_listener(
                    pool,
                    wakeup.clone(),
                    background_stop.clone(),
                )));
            }
            background.push(tokio::spawn(relay.run(background_stop.clone())));
        }
        if let Some(inbox) = inbox {
            background
                .push(tokio::spawn(inbox.clone().run_retention(RETENTION_INTERVAL, background_stop.clone())));
            if let Some(kafka) = &settings.kafka {
                let consumer = KafkaInbox::new(&kafka.client, inbox, metrics.clone())?;
                background.push(tokio::spawn(consumer.run(background_stop.clone())));
            } else if let Some(bus) = &bus {
                // Subscribed here, before the servers accept requests, so nothing is missed.
                let records = bus.subscribe();
                background.push(tokio::spawn(inbox::bus::run(records, inbox, background_stop.clone())));
            }
        }

        let admin_state = AdminState {
            metrics: metrics.clone(),
            store: stores.api.clone(),
            wakeup: wakeup.clone(),
            bus,
            token: settings.admin.token.clone(),
        };
        let orders = Orders::new(stores.api.clone(), wakeup, settings.outbox.partitions);
        // One concurrency limit for both listeners: overload is a property of the process.
        let permits = Arc::new(Semaphore::new(settings.http.max_concurrent_requests));
        let timeout = settings.http.request_timeout;
        let shed = |protocol: &str| metrics.shed.with_label_values(&[protocol]);
        let limits = Limits {
            request_timeout: timeout,
            body_limit_bytes: settings.http.body_limit_bytes,
            inbound: InboundLayer::new(
                permits.clone(),
                timeout,
                false,
                |_| false,
                http::overloaded,
                shed("http"),
            ),
        };
        let grpc_inbound = InboundLayer::new(
            permits,
            timeout,
            true,
            grpc::exempt_from_limits,
            grpc::overloaded,
            shed("grpc"),
        );
        let idempotency = idempotency_service(&settings, pg_pool.is_some(), &policies, metrics.clone())?;
        let deprecations = Deprecations::new(
            settings.deprecations.clone(),
            Arc::new(chrono::Utc::now),
            settings.idempotency.identity_header.clone(),
            metrics.deprecated_calls.clone(),
        );
        let state = AppState {
            orders: orders.clone(),
            readiness: readiness.clone(),
            deprecations: deprecations.clone(),
        };
        let idempotency_layer = IdempotencyLayerState {
            idempotency: idempotency.clone(),
            body_limit: settings.http.body_limit_bytes,
        };
        let rest =
            http::router(state, metrics.clone(), limits, settings.roles.api, idempotency_layer, auth.clone());
        let g = &settings.grpc;
        let grpc_server = Server::builder()
            .timeout(settings.http.request_timeout)
            // GOAWAY on aged connections and at the start of the drain (tonic's graceful
            // shutdown), so clients behind a connection-balancing Service move on.
            .max_connection_age(g.max_connection_age)
            .max_connection_age_grace(g.max_connection_age_grace)
            .http2_keepalive_interval(Some(g.keepalive_interval))
            .http2_keepalive_timeout(Some(g.keepalive_timeout))
            .layer(GrpcMetricsLayer(metrics.clone()))
            .layer(tower::util::MapResponseLayer::new(grpc::replayed_trailers::<tonic::body::Body>))
            .layer(grpc_inbound)
            // Callers are verified before anything of theirs runs (health checks stay open).
            .layer(tower::util::option_layer(auth.map(auth::GrpcAuthLayer)))
            .layer(DeprecationLayer::new(deprecations, deprecation::grpc_gone))
            .add_service(HealthServer::new(HealthService::from_health_reporter(health)))
            .add_service(reflection().build_v1()?)
            // grpcurl before 1.9 and many other tools only speak v1alpha.
            .add_service(reflection().build_v1alpha()?)
            .add_optional_service(
                settings
                    .roles
                    .api
                    .then(|| GrpcOrders::server(orders, idempotency, settings.http.body_limit_bytes)),
            );

        // The admin server outlives the others so metrics stay scrapeable while draining.
        let admin_stop = CancellationToken::new();
        let mut servers: Vec<(&str, JoinHandle<anyhow::Result<()>>)> = vec![
            ("http", {
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    axum::serve(http, rest)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await
                        .context("http server")
                })
            }),
            ("grpc", {
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    grpc_server
                        .serve_with_incoming_shutdown(TcpIncoming::from(grpc), stop.cancelled_owned())
                        .await
                        .context("grpc server")
                })
            }),
        ];
        let admin_task = {
            let stop = admin_stop.clone();
            tokio::spawn(async move {
                axum::serve(admin, admin::router(admin_state))
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                    .context("admin server")
            })
        };

        // Wait for a shutdown request, or for a server to die (then shut the rest down).
        let mut failure: Option<anyhow::Error> = None;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {}
            (result, index, _) = futures_select_all(&mut servers) => {
                let (name, _) = servers.remove(index);
                // A server returning after shutdown began is the normal path, not a failure.
                if !shutdown.is_cancelled() {
                    failure = Some(match flatten(result) {
                        Ok(()) => anyhow::anyhow!("{name} server stopped unexpectedly"),
                        Err(e) => e.context(format!("{name} server failed")),
                    });
                    shutdown.cancel();
                }
            }
        }
        tracing::info!("shutting down: readiness off, draining in-flight requests");
        readiness.begin_shutdown().await;

        let drain = async {
            for (name, handle) in servers {
                if let Err(e) = flatten(handle.await) {
                    tracing::error!(server = name, error = format!("{e:#}"), "server failed while draining");
                }
            }
            // Then the relay finishes its in-flight batch, flushes and releases its leases.
            background_stop.cancel();
            for task in background {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(settings.shutdown.drain_timeout, drain).await.is_err() {
            tracing::warn!(timeout = ?settings.shutdown.drain_timeout, "drain timed out; abandoning in-flight requests");
        }
        admin_stop.cancel();
        let _ = admin_task.await;
        tracing::info!("stopped");
        failure.map_or(Ok(()), Err)
    }
}

/// The resilience policy of each dependency; the breakers' state is in `/readyz`.
#[derive(Clone)]
struct Policies {
    postgres: Arc<Policy>,
    redis: Arc<Policy>,
    kafka: Arc<Policy>,
}

impl Policies {
    fn new(settings: &Settings, metrics: &Arc<Metrics>) -> Self {
        let r = &settings.resilience;
        Self {
            postgres: Policy::new(Dependency::Postgres, r.postgres, metrics.clone()),
            redis: Policy::new(Dependency::Redis, r.redis, metrics.clone()),
            kafka: Policy::new(Dependency::Kafka, r.kafka, metrics.clone()),
        }
    }

    /// The optional dependencies this process uses: they degrade readiness, never fail it.
    fn optional(&self, settings: &Settings) -> Vec<Arc<Policy>> {
        let mut optional = Vec::new();
        if settings.redis.is_some() && settings.roles.api {
            optional.push(self.redis.clone());
        }
        if settings.kafka.is_some() && settings.roles.relay {
            optional.push(self.kafka.clone());
        }
        optional
    }
}

/// Idempotency-Key service: Redis when configured, else in memory (single process).
fn idempotency_service(
    settings: &Settings,
    shared_database: bool,
    policies: &Policies,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<Idempotency>> {
    let store: Arc<dyn KeyStore> = match &settings.redis {
        Some(redis) => Arc::new(RedisKeyStore::new(
            redis.url.expose(),
            redis.key_prefix.clone(),
            redis.timeout,
            policies.redis.clone(),
            metrics.clone(),
            redis.ca_file.as_deref(),
        )?),
        None => {
            if shared_database {
                tracing::warn!(
                    "APP_REDIS__URL is empty with PostgreSQL: Idempotency-Key responses are kept per process. \
                     With more than one replica, a retry on another replica is answered by the database \
                     backstop only (creates) or runs again (cancels): set APP_REDIS__URL"
                );
            }
            Arc::new(MemoryKeyStore::new(settings.idempotency.memory_capacity))
        }
    };
    Ok(Idempotency::new(store, settings.idempotency.clone(), metrics))
}

/// How often expired inbox rows are purged.
const RETENTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// The in-process bus, when there is one.
type EmbeddedBus = Option<Arc<InMemoryBus>>;

/// Where the relay publishes and the inbox dead-letters: Kafka when configured, else the
/// in-process bus (returned too, for the inbox runner and the admin API).
fn publisher(
    settings: &Settings,
    shared_database: bool,
) -> anyhow::Result<(Arc<dyn Publisher>, EmbeddedBus)> {
    let Some(kafka) = &settings.kafka else {
        if shared_database && settings.roles.relay {
            tracing::warn!(
                "APP_KAFKA__BROKERS is empty: events go to the in-process bus and never leave this process"
            );
        }
        let bus = Arc::new(InMemoryBus::new(settings.events.max_message_bytes));
        return Ok((bus.clone(), Some(bus)));
    };
    let mut topics = Vec::new();
    if settings.roles.relay {
        topics.push(settings.events.topic.clone());
    }
    if settings.roles.consumer {
        for topic in [&settings.inbox.payments_topic, &settings.inbox.customers_topic] {
            topics.extend([topic.clone(), format!("{topic}.dlq")]);
        }
    }
    if kafka.create_topics && !topics.is_empty() {
        // In the background: Kafka being down must delay neither startup nor writes; until
        // the topics exist, publishing fails retriably and the outbox buffers.
        let (client, layout) = (kafka.client.clone(), kafka.topics);
        tokio::spawn(async move {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            if let Err(e) = client.create_topics(&names, &layout).await {
                tracing::error!(
                    error = format!("{e:#}"),
                    "Kafka topics are missing or misconfigured; publishing retries until they accept writes"
                );
            }
        });
    }
    Ok((Arc::new(KafkaPublisher::new(&kafka.client)?), None))
}

fn relay_settings(settings: &Settings) -> RelaySettings {
    RelaySettings {
        partitions: settings.outbox.partitions,
        batch_size: settings.outbox.batch_size,
        in_flight_batches: settings.outbox.in_flight_batches,
        poll_interval: settings.outbox.poll_interval,
        lease_ttl: settings.outbox.lease_ttl,
        publish_timeout: settings.publish_timeout(),
        backoff: settings.outbox.backoff,
        topic: settings.events.topic.clone(),
        source: settings.events.source.clone(),
    }
}

/// `$HOSTNAME` (the pod name in Kubernetes) plus a random suffix, so a restarted pod with
/// the same name never inherits its predecessor's leases by accident.
fn generated_relay_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "orders-service".to_owned());
    let random = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}-{}", &random[random.len() - 8..])
}

/// Serves the descriptors of every gRPC service here, so grpcurl and `buf curl` need no protos.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Waits for the first of several join handles without an extra dependency.
async fn futures_select_all(
    servers: &mut [(&str, JoinHandle<anyhow::Result<()>>)],
) -> (Result<anyhow::Result<()>, tokio::task::JoinError>, usize, ()) {
    std::future::poll_fn(|cx| {
        for (index, (_, handle)) in servers.iter_mut().enumerate() {
            if let std::task::Poll::Ready(result) = std::pin::Pin::new(handle).poll(cx) {
                return std::task::Poll::Ready((result, index, ()));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

fn flatten(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    result.context("server task panicked")?
}

/// Cancels `shutdown` on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn stop_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = shutdown.cancelled() => {}
    }
    shutdown.cancel();
}
