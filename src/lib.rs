//! # orders-service
//!
//! A template for a Kubernetes-native, resilient Rust microservice. The example domain is
//! orders; the patterns (validated domain types, a storage port with two adapters, one
//! error table for REST and gRPC, health, metrics, graceful shutdown) are the point.
//!
//! # Layout
//! - [`app`]: the only place that wires adapters together; binds listeners and runs them
//!   until a shutdown signal.
//! - [`config`]: typed settings from `APP_*` environment variables, validated at startup.
//! - [`domain`]: validated value types and the order state machine; no I/O crates.
//! - [`orders`]: the use-cases; each state change owns exactly one store transaction.
//! - [`store`]: the storage port and its PostgreSQL and SQLite adapters.
//! - [`events`]: the events this service publishes, encoded for the outbox.
//! - [`outbox`]: outbox rows, partition wake-ups and the relay that publishes them.
//! - [`idempotency`]: Idempotency-Key for REST and gRPC: Redis (or memory) fast path, database backstop.
//! - [`inbox`]: idempotent consumption of payment and customer events, with dead-lettering.
//! - [`publish`]: the publisher port with its Kafka and in-process adapters.
//! - [`backoff`]: exponential backoff with full jitter, shared by retry loops.
//! - [`resilience`]: per-dependency policies (breaker, timeout, budgeted retries,
//!   concurrency limit) and the inbound load-shedding and deadline layer.
//! - [`admin`]: the admin server: metrics and outbox dead-letter operations.
//! - [`auth`]: optional JWT verification of API callers (REST and gRPC).
//! - [`error`]: the API error type and the one table mapping it to HTTP and gRPC.
//! - [`http`]: the REST API (axum), `/healthz`, `/readyz` and the OpenAPI document.
//! - [`grpc`]: the `orders.v1.OrderService` gRPC API (tonic).
//! - [`health`]: readiness checks shared by `/readyz` and `grpc.health.v1.Health`.
//! - [`metrics`]: Prometheus metrics and the admin server that exposes them.
//! - [`telemetry`]: structured logs and OpenTelemetry traces.
//! - [`pb`]: code generated from `proto/`; nothing else includes generated code.

pub mod admin;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod config;
pub mod deprecation;
pub mod domain;
pub mod error;
pub mod events;
pub mod grpc;
pub mod health;
pub mod http;
pub mod idempotency;
pub mod inbox;
pub mod metrics;
pub mod orders;
pub mod outbox;
pub mod pb;
pub mod publish;
pub mod resilience;
pub mod store;
pub mod telemetry;
