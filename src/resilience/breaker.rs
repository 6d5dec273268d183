//! A circuit breaker per dependency: failsafe's state machine with a consecutive-failures
//! policy and exponentially growing open periods, plus what failsafe leaves out: one probe
//! at a time while half-open (so a recovering dependency gets one request, not the whole
//! backlog at once) and its state and transitions in Prometheus.
//!
//! Policy: closed until `failures` consecutive calls fail; then open (every call refused at
//! once) for `open`, doubling on each failed probe up to `open_max`; then half-open, where
//! a single probe runs: success closes the circuit, failure opens it again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::Duration,
};

use failsafe::{
    StateMachine,
    failure_policy::{self, ConsecutiveFailures},
};
use prometheus::{IntCounterVec, IntGauge};

use crate::backoff::Backoff;

/// Breaker states as the gauge reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls flow.
    Closed = 0,
    /// One probe may run.
    HalfOpen = 1,
    /// Calls are refused.
    Open = 2,
}

/// Breaker tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the circuit.
    pub failures: u32,
    /// First open period.
    pub open: Duration,
    /// Longest open period (each failed probe doubles it up to this).
    pub open_max: Duration,
}

/// Where the breaker reports, per dependency.
#[derive(Clone)]
pub struct BreakerMetrics {
    /// `resilience_breaker_state{dependency}`: 0 closed, 1 half-open, 2 open.
    pub state: IntGauge,
    /// `resilience_breaker_transitions_total{dependency, to}`.
    pub transitions: IntCounterVec,
    /// `resilience_calls_refused_total{dependency}` (refused while open).
    pub refused: prometheus::IntCounter,
    /// The dependency label.
    pub dependency: &'static str,
}

/// Mirrors failsafe's transitions into an atomic (for the half-open gate) and the metrics.
struct Observer {
    state: Arc<AtomicU8>,
    metrics: BreakerMetrics,
}

impl Observer {
    fn enter(&self, state: State, label: &str) {
        self.state.store(state as u8, Ordering::Release);
        self.metrics.state.set(state as i64);
        self.metrics.transitions.with_label_values(&[self.metrics.dependency, label]).inc();
    }
}

impl failsafe::Instrument for Observer {
    fn on_call_rejected(&self) {
        self.metrics.refused.inc();
    }
    fn on_open(&self) {
        self.enter(State::Open, "open");
        tracing::warn!(dependency = self.metrics.dependency, "circuit breaker opened");
    }
    fn on_half_open(&self) {
        self.enter(State::HalfOpen, "half_open");
    }
    fn on_closed(&self) {
        // failsafe reports "closed" once at construction; only count real transitions.
        if self.state.swap(State::Closed as u8, Ordering::AcqRel) != State::Closed as u8 {
            self.metrics.state.set(0);
            self.metrics.transitions.with_label_values(&[self.metrics.dependency, "closed"]).inc();
            tracing::info!(dependency = self.metrics.dependency, "circuit breaker closed");
        }
    }
}

/// Open periods: `open`, doubling up to `open_max` (failsafe's own exponential backoff
/// refuses periods under a second, which tests and fast dependencies need).
#[derive(Clone)]
struct OpenPeriods {
    backoff: Backoff,
    attempt: u32,
}

impl Iterator for OpenPeriods {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let period = self.backoff.ceiling(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        Some(period)
    }
}

type Machine = StateMachine<ConsecutiveFailures<OpenPeriods>, Observer>;

/// A dependency's circuit breaker.
pub struct Breaker {
    machine: Machine,
    state: Arc<AtomicU8>,
    /// A half-open probe is in flight.
    probing: Arc<AtomicBool>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings, metrics: BreakerMetrics) -> Self {
        let state = Arc::new(AtomicU8::new(State::Closed as u8));
        metrics.state.set(0);
        let backoff = Backoff::new(settings.open, settings.open_max).unwrap_or(Backoff::DEFAULT);
        let policy = failure_policy::consecutive_failures(
            settings.failures.max(1),
            OpenPeriods { backoff, attempt: 0 },
        );
        let observer = Observer { state: state.clone(), metrics };
        Self {
            machine: StateMachine::new(policy, observer),
            state,
            probing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            0 => State::Closed,
            1 => State::HalfOpen,
            _ => State::Open,
        }
    }

    /// Asks to make a call: `None` while open, or while half-open with a probe in flight.
    pub fn permit(&self) -> Option<Permit> {
        if !self.machine.is_call_permitted() {
            return None;
        }
        let probe = self.state() == State::HalfOpen;
        if probe && self.probing.swap(true, Ordering::AcqRel) {
            return None; // someone else is probing
        }
        Some(Permit { machine: self.machine.clone(), probing: probe.then(|| self.probing.clone()) })
    }
}

/// Permission for one call; report how it went. Dropping it unreported (a cancelled call)
/// frees the probe slot without judging the dependency.
pub struct Permit {
    machine: Machine,
    /// Set when this call is the half-open probe.
    probing: Option<Arc<AtomicBool>>,
}

impl Permit {
    /// The dependency answered (even with an application error).
    pub fn success(self) {
        self.machine.on_success();
    }

    /// The dependency failed (unreachable, timed out, overloaded).
    pub fn failure(self) {
        self.machine.on_error();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(probing) = &self.probing {
            probing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounter, Opts};

    fn breaker() -> (Breaker, BreakerMetrics) {
        let metrics = BreakerMetrics {
            state: IntGauge::new("state", "s").expect("gauge"),
            transitions: IntCounterVec::new(Opts::new("transitions", "t"), &["dependency", "to"])
                .expect("vec"),
            refused: IntCounter::new("refused", "r").expect("counter"),
            dependency: "test",
        };
        let settings =
            BreakerSettings { failures: 3, open: Duration::from_secs(1), open_max: Duration::from_secs(4) };
        (Breaker::new(settings, metrics.clone()), metrics)
    }

    #[test]
    fn opens_after_consecutive_failures_probes_once_and_backs_off() {
        failsafe::clock::freeze(|clock| {
            let (breaker, metrics) = breaker();
            for _ in 0..2 {
                breaker.permit().expect("closed").failure();
            }
            breaker.permit().expect("closed").success(); // a success resets the count
            for _ in 0..3 {
                breaker.permit().expect("closed").failure();
            }
            assert_eq!(breaker.state(), State::Open);
            assert_eq!(metrics.state.get(), 2);
            assert!(breaker.permit().is_none(), "open: refused at once");
            assert_eq!(metrics.refused.get(), 1);

            clock.advance(Duration::from_millis(1001));
            let probe = breaker.permit().expect("half-open: one probe");
            assert_eq!((breaker.state(), metrics.state.get()), (State::HalfOpen, 1));
            assert!(breaker.permit().is_none(), "only one probe at a time");
            probe.failure();
            assert_eq!(breaker.state(), State::Open);
            clock.advance(Duration::from_millis(1500));
            assert!(breaker.permit().is_none(), "the second open period is longer (2 s)");
            clock.advance(Duration::from_millis(600));
            breaker.permit().expect("probe").success();
            assert_eq!((breaker.state(), metrics.state.get()), (State::Closed, 0));
            assert_eq!(metrics.transitions.with_label_values(&["test", "open"]).get(), 2);
            assert_eq!(metrics.transitions.with_label_values(&["test", "closed"]).get(), 1);
        });
    }

    #[test]
    fn a_cancelled_probe_frees_the_slot() {
        failsafe::clock::freeze(|clock| {
            let (breaker, _) = breaker();
            for _ in 0..3 {
                breaker.permit().expect("closed").failure();
            }
            clock.advance(Duration::from_millis(1001));
            drop(breaker.permit().expect("probe"));
            assert!(breaker.permit().is_some(), "another probe may run");
        });
    }
}
