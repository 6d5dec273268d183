//! Integration tests: one binary (one link step) running against the real PostgreSQL and
//! SQLite, over real sockets. Every test gets its own database, so they run in parallel.
//!
//! `TEST_DATABASE_URL` points at a PostgreSQL server where the tests may create databases
//! (default `postgres://postgres:postgres@127.0.0.1:5432/postgres`); `scripts/test.sh`
//! starts one if none is running.

mod admin_auth;
mod auth;
mod chaos;
mod cluster;
mod deprecation;
mod grpc;
mod health;
mod idempotency;
mod idempotency_faults;
mod inbox;
mod inbox_faults;
mod kafka;
mod leases;
mod metrics;
mod migrations;
mod openapi;
mod otel;
mod outbox;
mod pact_consumer;
mod pact_provider;
mod proxy;
mod relay_faults;
mod resilience;
mod rest;
mod shutdown;
mod store_conformance;
mod support;
mod tls;
mod wakeup;
