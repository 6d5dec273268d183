//! The storage port and its two adapters: PostgreSQL (production, many replicas) and SQLite
//! (the embedded default for `cargo run`). Both pass the same conformance suite
//! (`tests/it/store_conformance.rs`).
//!
//! Writes go through [`Store::begin`]: the use-case owns the [`Tx`], performs every write of
//! one state change in it (the outbox insert joins it later) and commits once.

/// Declares an adapter's write transaction: a newtype over a sqlx transaction whose
/// [`Tx`] methods all run [`Sql`] statements. Only the row lock differs between databases:
/// `$for_update` is ` FOR UPDATE` on PostgreSQL and empty on SQLite, where `BEGIN IMMEDIATE`
/// already holds the write lock.
macro_rules! sql_tx {
    ($name:ident, $db:ty, $for_update:literal) => {
        /// A write transaction of this adapter.
        pub(super) struct $name(sqlx::Transaction<'static, $db>);

        #[async_trait::async_trait]
        impl crate::store::Tx for $name {
            async fn insert_order(
                &mut self,
                order: &crate::domain::Order,
            ) -> Result<(), crate::store::StoreError> {
                crate::store::Sql::<$db>::insert_order(&mut *self.0, order).await
            }

            async fn get_order_for_update(
                &mut self,
                id: crate::domain::OrderId,
            ) -> Result<Option<crate::domain::Order>, crate::store::StoreError> {
                let sql = format!(
                    "SELECT {} FROM orders WHERE id = $1{}",
                    crate::store::ORDER_COLUMNS,
                    $for_update
                );
                let row = sqlx::query(&sql).bind(id.as_uuid()).fetch_optional(&mut *self.0).await?;
                row.as_ref().map(crate::store::Sql::<$db>::decode_order).transpose()
            }

            async fn update_order(
                &mut self,
                order: &crate::domain::Order,
                expected_version: i64,
            ) -> Result<(), crate::store::StoreError> {
                crate::store::Sql::<$db>::update_order(&mut *self.0, order, expected_version).await
            }

            async fn insert_outbox(
                &mut self,
                event: &crate::outbox::NewOutboxEvent,
            ) -> Result<(), crate::store::StoreError> {
                crate::store::Sql::<$db>::insert_outbox(&mut *self.0, event).await
            }

            async fn insert_inbox(
                &mut self,
                consumer: &str,
                message_id: &str,
            ) -> Result<bool, crate::store::StoreError> {
                crate::store::Sql::<$db>::insert_inbox(&mut *self.0, consumer, message_id).await
            }

            async fn upsert_customer(
                &mut self,
                customer: &crate::inbox::CustomerProjection,
            ) -> Result<bool, crate::store::StoreError> {
                crate::store::Sql::<$db>::upsert_customer(&mut *self.0, customer).await
            }

            async fn insert_rejection(
                &mut self,
                rejection: &crate::inbox::Rejection,
            ) -> Result<(), crate::store::StoreError> {
                crate::store::Sql::<$db>::insert_rejection(&mut *self.0, rejection).await
            }

            async fn bind_idempotency_key(
                &mut self,
                order: crate::domain::OrderId,
                key: &str,
                fingerprint: &[u8],
                expires_at: chrono::DateTime<chrono::Utc>,
            ) -> Result<(), crate::store::StoreError> {
                crate::store::Sql::<$db>::bind_idempotency_key(
                    &mut *self.0,
                    order,
                    key,
                    fingerprint,
                    expires_at,
                )
                .await
            }

            async fn commit(self: Box<Self>) -> Result<(), crate::store::StoreError> {
                self.0.commit().await?;
                Ok(())
            }
        }
    };
}

mod postgres;
mod postgres_outbox;
mod sql;
mod sqlite;
mod sqlite_outbox;

use sql::{ORDER_COLUMNS, Sql};

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::{
    config::DatabaseSettings,
    domain::{ListQuery, Order, OrderId},
    inbox::{CustomerProjection, Rejection},
    outbox::{NewOutboxEvent, OutboxStore},
};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Why a storage call failed, classified for the error table.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An optimistic-concurrency check failed: someone else changed the row first.
    #[error("concurrent update")]
    Conflict,
    /// A unique constraint rejected a write; carries the constraint (index) name.
    #[error("unique constraint {0} violated")]
    UniqueViolation(String),
    /// The database is unreachable, overloaded or timed out; retrying later may succeed.
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// Anything else (a bug, corrupt data, a constraint we did not expect).
    #[error("database error")]
    Other(#[source] anyhow::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if let Some(constraint) = unique_constraint(&err) {
            return Self::UniqueViolation(constraint);
        }
        let transient = match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                // Postgres: connection exceptions (08), insufficient resources (53),
                // operator intervention such as admin shutdown (57). SQLite: BUSY, LOCKED.
                code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57")
                    || code == "5"
                    || code == "6"
            }),
            _ => false,
        };
        if transient { Self::Unavailable(err.into()) } else { Self::Other(err.into()) }
    }
}

/// The one place that recognises unique-constraint violations, by constraint name:
/// PostgreSQL reports the name; SQLite only names the columns (`orders.idempotency_key`),
/// which are mapped to the index names the migrations create.
fn unique_constraint(err: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(db) = err else { return None };
    if !db.is_unique_violation() {
        return None;
    }
    if let Some(name) = db.constraint() {
        return Some(name.to_owned());
    }
    let message = db.message();
    Some(if message.contains("orders.idempotency_key") {
        IDEMPOTENCY_KEY_INDEX.to_owned()
    } else {
        message.to_owned()
    })
}

/// Name of the unique index binding an order to its scoped Idempotency-Key.
pub const IDEMPOTENCY_KEY_INDEX: &str = "orders_idempotency_key";

/// The storage port: orders, and (as a supertrait) the outbox.
#[async_trait]
pub trait Store: OutboxStore {
    /// Starts a write transaction.
    async fn begin(&self) -> Result<Box<dyn Tx>, StoreError>;
    /// Reads one order.
    async fn get_order(&self, id: OrderId) -> Result<Option<Order>, StoreError>;
    /// Reads up to `query.page_size + 1` orders, newest first, after the query's cursor
    /// (the extra row tells the caller whether another page exists).
    async fn list_orders(&self, query: &ListQuery) -> Result<Vec<Order>, StoreError>;
    /// Round-trips a trivial query: is the database reachable?
    async fn ping(&self) -> Result<(), StoreError>;
    /// Whether every migration embedded in this binary has been applied.
    async fn migrations_applied(&self) -> Result<bool, StoreError>;
    /// Applies pending migrations.
    async fn migrate(&self) -> anyhow::Result<()>;
    /// The customer's display name from the projection, if known.
    async fn customer_display_name(&self, customer_id: &str) -> Result<Option<String>, StoreError>;
    /// Deletes up to `limit` inbox rows received before `older_than`; returns how many.
    async fn purge_inbox(&self, older_than: DateTime<Utc>, limit: i64) -> Result<u64, StoreError>;
    /// The most recent rejected or dead-lettered inbound messages.
    async fn list_rejections(&self, limit: i64) -> Result<Vec<Rejection>, StoreError>;
    /// The order bound to a scoped Idempotency-Key, with the bound fingerprint and expiry.
    async fn find_by_idempotency_key(&self, key: &str) -> Result<Option<IdempotentOrder>, StoreError>;
    /// Unbinds an expired key from its order, so the key can be used again.
    async fn release_idempotency_key(&self, key: &str) -> Result<(), StoreError>;
}

/// An order found by its Idempotency-Key (the PostgreSQL backstop).
#[derive(Debug, Clone)]
pub struct IdempotentOrder {
    /// The order.
    pub order: Order,
    /// Fingerprint of the request that created it.
    pub fingerprint: Vec<u8>,
    /// When the binding lapses.
    pub expires_at: DateTime<Utc>,
}

/// One write transaction. Dropping it without [`Tx::commit`] rolls back.
#[async_trait]
pub trait Tx: Send {
    /// Inserts a new order.
    async fn insert_order(&mut self, order: &Order) -> Result<(), StoreError>;
    /// Reads an order and locks it until the transaction ends.
    async fn get_order_for_update(&mut self, id: OrderId) -> Result<Option<Order>, StoreError>;
    /// Writes the order's mutable fields if the stored version is still `expected_version`;
    /// otherwise fails with [`StoreError::Conflict`].
    async fn update_order(&mut self, order: &Order, expected_version: i64) -> Result<(), StoreError>;
    /// Appends an event to the outbox, atomically with the state change it describes.
    async fn insert_outbox(&mut self, event: &NewOutboxEvent) -> Result<(), StoreError>;
    /// Records a consumed message; `false` if `(consumer, message_id)` was already there.
    async fn insert_inbox(&mut self, consumer: &str, message_id: &str) -> Result<bool, StoreError>;
    /// Upserts a customer unless the stored version is at least as new; `true` if applied.
    async fn upsert_customer(&mut self, customer: &CustomerProjection) -> Result<bool, StoreError>;
    /// Records an inbound message that was not applied.
    async fn insert_rejection(&mut self, rejection: &Rejection) -> Result<(), StoreError>;
    /// Binds an order to a scoped Idempotency-Key; fails with
    /// [`StoreError::UniqueViolation`] (`orders_idempotency_key`) if the key is taken.
    async fn bind_idempotency_key(
        &mut self,
        order: OrderId,
        key: &str,
        fingerprint: &[u8],
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Commits every write of this transaction atomically.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// An opened store, plus the PostgreSQL pool when there is one (for LISTEN/NOTIFY).
pub struct Connected {
    /// The storage port.
    pub store: Arc<dyn Store>,
    /// `Some` for PostgreSQL.
    pub pg_pool: Option<sqlx::PgPool>,
}

/// Opens the store named by the URL's scheme.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<Connected> {
    let url = settings.url.expose();
    if url.starts_with("sqlite:") {
        return Ok(Connected { store: Arc::new(SqliteStore::connect(settings).await?), pg_pool: None });
    }
    let store = PostgresStore::connect(settings)?;
    Ok(Connected { pg_pool: Some(store.pool().clone()), store: Arc::new(store) })
}

/// `orders-service migrate`: applies migrations and exits.
pub async fn migrate(settings: &DatabaseSettings) -> anyhow::Result<()> {
    connect(settings).await?.store.migrate().await.context("applying migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

/// How long a single statement may take before the pool gives the connection up.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
