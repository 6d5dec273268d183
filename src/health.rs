//! Readiness: one set of checks behind both `/readyz` and `grpc.health.v1.Health`, so an
//! HTTP probe and a mesh's gRPC health check never disagree.
//!
//! Liveness (`/healthz`) deliberately checks nothing external: a database outage must make
//! the pod unready (taken out of load balancing), not restart it.
//!
//! Readiness semantics:
//! - the database must be reachable and migrated; once the service has been ready, a
//!   database that fails its checks stays "ready" for `APP_HEALTH__DATABASE_GRACE_MS` (a
//!   blip must not pull every replica out of load balancing at once), then turns not ready;
//! - Redis and Kafka are optional: their breakers being open or half-open make the report
//!   `degraded` but still ready, because writes keep working (the database backstops
//!   idempotency, the outbox buffers events);
//! - shutting down is never ready.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    config::HealthSettings,
    resilience::{Policy, State},
    store::Store,
};

/// gRPC service names whose health mirrors readiness ("" is the whole server).
const GRPC_SERVICES: [&str; 2] = ["", "orders.v1.OrderService"];

/// The result of one readiness evaluation, served as the `/readyz` body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReadinessReport {
    /// `ready`, `degraded` (ready, with an optional dependency failing) or `not_ready`.
    pub status: &'static str,
    /// Each check and its outcome.
    pub checks: Vec<Check>,
}

impl ReadinessReport {
    /// Whether every required check passed.
    pub fn is_ready(&self) -> bool {
        self.checks.iter().filter(|c| c.required).all(|c| c.ok)
    }
}

/// One named readiness check.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Check {
    /// `database`, `migrations`, `shutdown`, or an optional dependency (`redis`, `kafka`).
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// Whether readiness depends on it (optional dependencies only degrade the service).
    pub required: bool,
    /// Why it failed, or what is tolerated for now (absent when all is well).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Evaluates readiness and publishes it to the gRPC health service.
pub struct Readiness {
    /// The database whose reachability and schema are checked.
    store: Arc<dyn Store>,
    /// Handle to the gRPC health service's status table.
    reporter: HealthReporter,
    /// Set once at shutdown; never cleared.
    shutting_down: AtomicBool,
    /// Deadline for one evaluation, so a hung database reads as "not ready", not a hang.
    timeout: Duration,
    /// How long a failing database is tolerated once the service has been ready.
    grace: Duration,
    /// Since when the database has been failing, if it is; and whether it ever passed.
    database: std::sync::Mutex<DatabaseHistory>,
    /// Optional dependencies, reported as degraded while their breaker is not closed.
    optional: Vec<Arc<Policy>>,
    /// The status last published; the lock also orders concurrent publishes, so a check
    /// that started before shutdown can never re-publish SERVING after it.
    published: tokio::sync::Mutex<Option<ServingStatus>>,
}

/// What the database checks have been doing.
#[derive(Debug, Default)]
struct DatabaseHistory {
    failing_since: Option<tokio::time::Instant>,
    ever_passed: bool,
}

impl Readiness {
    /// Builds the checker; gRPC health reads NOT_SERVING until the first check passes.
    pub async fn new(
        store: Arc<dyn Store>,
        reporter: HealthReporter,
        settings: &HealthSettings,
        optional: Vec<Arc<Policy>>,
    ) -> Arc<Self> {
        let readiness = Arc::new(Self {
            store,
            reporter,
            shutting_down: AtomicBool::new(false),
            timeout: settings.check_timeout,
            grace: settings.database_grace,
            database: std::sync::Mutex::new(DatabaseHistory::default()),
            optional,
            published: tokio::sync::Mutex::new(None),
        });
        readiness.publish(false).await;
        readiness
    }

    /// Runs every check now and publishes the outcome to gRPC health.
    pub async fn check(&self) -> ReadinessReport {
        let shutting_down = self.shutting_down.load(Ordering::SeqCst);
        let (database, migrations) = match tokio::time::timeout(self.timeout, self.check_database()).await {
            Ok(result) => result,
            Err(_) => {
                let detail = format!("no answer within {:?}", self.timeout);
                (failed("database", detail.clone()), failed("migrations", detail))
            }
        };
        let (database, migrations) = self.within_grace(database, migrations);
        let shutdown =
            if shutting_down { failed("shutdown", "shutting down".into()) } else { passed("shutdown") };
        let mut checks = vec![database, migrations, shutdown];
        let mut degraded = false;
        for policy in &self.optional {
            let state = policy.state();
            degraded |= state != State::Closed;
            checks.push(Check {
                name: policy.dependency().name(),
                ok: state == State::Closed,
                required: false,
                detail: match state {
                    State::Closed => None,
                    State::HalfOpen => Some("recovering: circuit half-open; degraded".into()),
                    State::Open => Some("unreachable: circuit open; degraded".into()),
                },
            });
        }
        let report = ReadinessReport { status: "not_ready", checks };
        let ready = report.is_ready();
        self.publish(ready).await;
        let status = match (ready, degraded) {
            (false, _) => "not_ready",
            (true, true) => "degraded",
            (true, false) => "ready",
        };
        ReadinessReport { status, ..report }
    }

    /// Tolerates a failing database for the grace period once the service has been ready.
    fn within_grace(&self, database: Check, migrations: Check) -> (Check, Check) {
        let mut history = self.database.lock().unwrap_or_else(|p| p.into_inner());
        if database.ok && migrations.ok {
            *history = DatabaseHistory { failing_since: None, ever_passed: true };
            return (database, migrations);
        }
        if !history.ever_passed {
            return (database, migrations);
        }
        let since = *history.failing_since.get_or_insert_with(tokio::time::Instant::now);
        let failing = since.elapsed();
        if failing >= self.grace {
            return (database, migrations);
        }
        let tolerate = |mut check: Check| {
            if !check.ok {
                let cause = check.detail.take().unwrap_or_default();
                check.ok = true;
                check.detail = Some(format!("{cause} for {failing:.1?}; not ready after {:?}", self.grace));
            }
            check
        };
        (tolerate(database), tolerate(migrations))
    }

    async fn check_database(&self) -> (Check, Check) {
        if let Err(e) = self.store.ping().await {
            tracing::debug!(
                error = format!("{:#}", anyhow::Error::from(e)),
                "readiness: database check failed"
            );
            return (
                failed("database", "unreachable".into()),
                failed("migrations", "database unreachable".into()),
            );
        }
        let migrations = match self.store.migrations_applied().await {
            Ok(true) => passed("migrations"),
            Ok(false) => failed("migrations", "pending migrations: run `orders-service migrate`".into()),
            Err(e) => failed("migrations", e.to_string()),
        };
        (passed("database"), migrations)
    }

    /// Marks the service as draining: readiness fails from now on and gRPC health says
    /// NOT_SERVING, so load balancers and meshes stop sending new work.
    pub async fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.publish(false).await;
    }

    /// Re-checks every `interval` so gRPC health watchers see changes without polling us.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    let report = self.check().await;
                    if !report.is_ready() {
                        tracing::debug!(?report, "not ready");
                    }
                }
            }
        }
    }

    async fn publish(&self, ready: bool) {
        let mut published = self.published.lock().await;
        let ready = ready && !self.shutting_down.load(Ordering::SeqCst);
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        if *published == Some(status) {
            return; // watchers only hear about changes
        }
        for service in GRPC_SERVICES {
            self.reporter.set_service_status(service, status).await;
        }
        *published = Some(status);
    }
}

fn passed(name: &'static str) -> Check {
    Check { name, ok: true, required: true, detail: None }
}

fn failed(name: &'static str, detail: String) -> Check {
    Check { name, ok: false, required: true, detail: Some(detail) }
}
