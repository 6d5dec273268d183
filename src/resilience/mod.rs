//! Resilience: one policy per outbound dependency (PostgreSQL, Redis, Kafka) and the
//! inbound protection shared by REST and gRPC ([`inbound`]).
//!
//! A [`Policy`] call goes through, outermost first:
//! 1. the circuit breaker ([`breaker`]): open means refused at once, no waiting;
//! 2. a concurrency limit (a semaphore; waiting for it counts against the timeout);
//! 3. a timeout per attempt;
//! 4. retries with full-jitter exponential backoff, only for failures the caller marks
//!    retriable and calls it marks idempotent, each withdrawn from a retry budget (tower's
//!    `TpsBudget`: a share of recent calls, plus a small floor), so retries cannot
//!    multiply an outage.
//!
//! Every attempt's outcome feeds the breaker: "the dependency failed" (unreachable, timed
//! out) counts against it, an application-level answer (a constraint violation, not found)
//! counts as the dependency being healthy.
//!
//! Why not one generic tower `Service` per dependency: each dependency is called with its
//! own signatures (SQL statements, Redis commands, a publish batch), and a `Service` per
//! signature would need boxed, clonable requests for tower's retry layer. The policy
//! composes the same parts (tower's budget, failsafe's state machine, tokio's semaphore and
//! timeout) around a closure instead.

pub mod breaker;
pub mod inbound;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::Semaphore;
use tower::retry::budget::{Budget, TpsBudget};

pub use breaker::{Breaker, BreakerMetrics, BreakerSettings, State};

use crate::{backoff::Backoff, metrics::Metrics};

/// The dependencies that have a policy (also the metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// The database.
    Postgres,
    /// The Idempotency-Key fast path.
    Redis,
    /// The broker the relay publishes to.
    Kafka,
}

impl Dependency {
    /// The label and configuration name (`APP_RESILIENCE__<NAME>__*`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Redis => "redis",
            Self::Kafka => "kafka",
        }
    }
}

/// One dependency's policy settings (`APP_RESILIENCE__<DEP>__*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicySettings {
    /// Deadline of one attempt (concurrency wait included).
    pub timeout: Duration,
    /// Retries after the first attempt (retriable failures of idempotent calls only).
    pub retries: u32,
    /// Delay between retries: full jitter, `random(0, min(max, min * 2^n))`.
    pub backoff: Backoff,
    /// Retries allowed as a share of recent calls (0.1 = one retry per ten calls), on top
    /// of `retry_floor_per_sec`.
    pub retry_ratio: f32,
    /// Retries always allowed per second, so a quiet service can still retry.
    pub retry_floor_per_sec: u32,
    /// Circuit breaker.
    pub breaker: BreakerSettings,
    /// Calls in flight at most.
    pub concurrency: usize,
}

/// How a dependency's error reads to the policy.
pub trait Failure {
    /// The dependency itself is failing (unreachable, overloaded, timed out): counts
    /// against the breaker. An application-level error means the dependency answered.
    fn is_outage(&self) -> bool;
    /// Running the same call again may succeed.
    fn is_retriable(&self) -> bool;
}

/// Why a call did not return the dependency's own result.
#[derive(Debug, thiserror::Error)]
pub enum Refused<E> {
    /// The breaker is open (or a half-open probe is already running).
    #[error("{0} circuit open")]
    Open(&'static str),
    /// The attempt (or the wait for a concurrency slot) exceeded the timeout.
    #[error("{0} call timed out after {1:?}")]
    Timeout(&'static str, Duration),
    /// The dependency's error, after any retries.
    #[error(transparent)]
    Failed(E),
}

/// Counts a call as waiting for a concurrency slot until dropped (also when the timeout
/// cuts the wait short).
struct Waiting<'a>(&'a prometheus::IntGauge);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A dependency's policy: breaker, concurrency limit, timeout, budgeted retries.
pub struct Policy {
    dependency: Dependency,
    settings: PolicySettings,
    breaker: Breaker,
    budget: TpsBudget,
    permits: Semaphore,
    /// `resilience_calls_waiting` of this dependency, resolved once (every call moves it).
    waiting: prometheus::IntGauge,
    metrics: Arc<Metrics>,
}

impl Policy {
    /// Builds the policy; its breaker starts closed.
    pub fn new(dependency: Dependency, settings: PolicySettings, metrics: Arc<Metrics>) -> Arc<Self> {
        let name = dependency.name();
        let breaker_metrics = BreakerMetrics {
            state: metrics.breaker_state.with_label_values(&[name]),
            transitions: metrics.breaker_transitions.clone(),
            refused: metrics.calls_refused.with_label_values(&[name]),
            dependency: name,
        };
        Arc::new(Self {
            dependency,
            settings,
            breaker: Breaker::new(settings.breaker, breaker_metrics),
            budget: TpsBudget::new(
                Duration::from_secs(10),
                settings.retry_floor_per_sec,
                settings.retry_ratio.clamp(0.0, 1000.0),
            ),
            permits: Semaphore::new(settings.concurrency.max(1)),
            waiting: metrics.calls_waiting.with_label_values(&[name]),
            metrics,
        })
    }

    /// The breaker's state (readiness reports degraded dependencies from it).
    pub fn state(&self) -> State {
        self.breaker.state()
    }

    /// The dependency this policy guards.
    pub fn dependency(&self) -> Dependency {
        self.dependency
    }

    /// Runs `op` under the policy. `idempotent` says whether running it twice is
    /// harmless; only then are retriable failures retried.
    pub async fn call<T, E, F, Fut>(&self, idempotent: bool, mut op: F) -> Result<T, Refused<E>>
    where
        E: Failure,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let name = self.dependency.name();
        self.budget.deposit();
        let mut retry = 0u32;
        loop {
            let Some(permit) = self.breaker.permit() else { return Err(Refused::Open(name)) };
            let attempt = async {
                let waiting = Waiting::new(&self.waiting);
                let _slot = self.permits.acquire().await;
                drop(waiting);
                op().await
            };
            let failure = match tokio::time::timeout(self.settings.timeout, attempt).await {
                Ok(Ok(value)) => {
                    permit.success();
                    return Ok(value);
                }
                Ok(Err(error)) if !error.is_outage() => {
                    permit.success();
                    return Err(Refused::Failed(error));
                }
                Ok(Err(error)) => {
                    permit.failure();
                    let retriable = error.is_retriable();
                    (Refused::Failed(error), retriable)
                }
                Err(_) => {
                    permit.failure();
                    self.metrics.dependency_timeouts.with_label_values(&[name]).inc();
                    (Refused::Timeout(name, self.settings.timeout), true)
                }
            };
            let (refused, retriable) = failure;
            if !(idempotent && retriable && retry < self.settings.retries) {
                return Err(refused);
            }
            if !self.budget.withdraw() {
                self.metrics.retries.with_label_values(&[name, "refused_by_budget"]).inc();
                return Err(refused);
            }
            self.metrics.retries.with_label_values(&[name, "attempted"]).inc();
            tokio::time::sleep(self.settings.backoff.delay(retry)).await;
            retry += 1;
        }
    }

    /// Runs a call that must not be repeated (one attempt, no retries).
    pub async fn once<T, E, Fut>(&self, attempt: Fut) -> Result<T, Refused<E>>
    where
        E: Failure,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = Some(attempt);
        // `call` without idempotence invokes its closure exactly once.
        self.call(false, || attempt.take().expect("a call that is not retried runs once")).await
    }

    /// Asks the breaker for one call made outside [`Policy::call`] (the relay's publish
    /// round, whose outcome is judged as a whole): `None` while open.
    pub fn permit(&self) -> Option<breaker::Permit> {
        self.breaker.permit()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Debug)]
    struct Down;
    impl Failure for Down {
        fn is_outage(&self) -> bool {
            true
        }
        fn is_retriable(&self) -> bool {
            true
        }
    }

    fn policy(retries: u32, ratio: f32, floor: u32) -> Arc<Policy> {
        let settings = PolicySettings {
            timeout: Duration::from_millis(100),
            retries,
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(40)).expect("backoff"),
            retry_ratio: ratio,
            retry_floor_per_sec: floor,
            breaker: BreakerSettings {
                failures: 1000,
                open: Duration::from_secs(1),
                open_max: Duration::from_secs(2),
            },
            concurrency: 4,
        };
        Policy::new(Dependency::Redis, settings, Metrics::new().expect("metrics"))
    }

    #[tokio::test(start_paused = true)]
    async fn retries_only_idempotent_calls_and_only_within_the_budget() {
        let policy = policy(3, 0.0, 1); // a floor of one retry per second, nothing earned
        let attempts = AtomicU32::new(0);
        let call = || async {
            attempts.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(Down)
        };
        assert!(policy.call(false, call).await.is_err());
        assert_eq!(attempts.swap(0, Ordering::SeqCst), 1, "a non-idempotent call is never retried");
        assert!(policy.call(true, call).await.is_err());
        let with_budget = attempts.swap(0, Ordering::SeqCst);
        assert!((2..=4).contains(&with_budget), "retried from the floor: {with_budget} attempts");
        for _ in 0..20 {
            let _ = policy.call(true, call).await;
        }
        let refused = policy.metrics.retries.with_label_values(&["redis", "refused_by_budget"]).get();
        assert!(refused > 0, "the budget runs out during an outage");
        assert!(attempts.load(Ordering::SeqCst) < 20 * 4, "retries did not multiply the outage");
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_hangs_times_out() {
        let policy = policy(0, 0.0, 0);
        let hung = policy.call(true, std::future::pending::<Result<(), Down>>).await;
        assert!(matches!(hung, Err(Refused::Timeout("redis", _))));
        assert_eq!(policy.metrics.dependency_timeouts.with_label_values(&["redis"]).get(), 1);
    }

    #[test]
    fn full_jitter_stays_under_the_ceiling_and_spreads() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).expect("backoff");
        let delays: Vec<Duration> = (0..200).map(|_| backoff.delay(4)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(1600)));
        let distinct: std::collections::HashSet<_> = delays.iter().map(|d| d.as_millis() / 100).collect();
        assert!(distinct.len() >= 10, "delays spread over the whole range, not clustered: {distinct:?}");
    }
}
