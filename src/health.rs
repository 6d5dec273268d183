//! Readiness: one set of checks behind both `/readyz` and `grpc.health.v1.Health`, so an
//! HTTP probe and a mesh's gRPC health check never disagree.
//!
//! Liveness (`/healthz`) deliberately checks nothing external: a database outage must make
//! the pod unready (taken out of load balancing), not restart it.

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

use crate::store::Store;

/// gRPC service names whose health mirrors readiness ("" is the whole server).
const GRPC_SERVICES: [&str; 2] = ["", "orders.v1.OrderService"];

/// The result of one readiness evaluation, served as the `/readyz` body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReadinessReport {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// Each check and its outcome.
    pub checks: Vec<Check>,
}

impl ReadinessReport {
    /// Whether every check passed.
    pub fn is_ready(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// One named readiness check.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Check {
    /// `database`, `migrations` or `shutdown`.
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// Why it failed (absent when it passed).
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
    /// The status last published; the lock also orders concurrent publishes, so a check
    /// that started before shutdown can never re-publish SERVING after it.
    published: tokio::sync::Mutex<Option<ServingStatus>>,
}

impl Readiness {
    /// Builds the checker; gRPC health reads NOT_SERVING until the first check passes.
    pub async fn new(store: Arc<dyn Store>, reporter: HealthReporter, timeout: Duration) -> Arc<Self> {
        let readiness = Arc::new(Self {
            store,
            reporter,
            shutting_down: AtomicBool::new(false),
            timeout,
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
        let shutdown =
            if shutting_down { failed("shutdown", "shutting down".into()) } else { passed("shutdown") };
        let checks = vec![database, migrations, shutdown];
        let ready = checks.iter().all(|c| c.ok);
        self.publish(ready).await;
        ReadinessReport { status: if ready { "ready" } else { "not_ready" }, checks }
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
    Check { name, ok: true, detail: None }
}

fn failed(name: &'static str, detail: String) -> Check {
    Check { name, ok: false, detail: Some(detail) }
}
