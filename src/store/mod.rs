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
                binding: Option<crate::store::KeyBinding<'_>>,
            ) -> Result<(), crate::store::StoreError> {
                crate::store::Sql::<$db>::insert_order(&mut *self.0, order, binding).await
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

            /// Runs `COMMIT` in a task of its own: once sent, it must finish. A caller cancelled
            /// mid-commit (a client gone, a deadline) would otherwise make sqlx queue a
            /// `ROLLBACK` behind a commit that already landed ("there is no transaction in
            /// progress" under load) and leave the outcome unknown to this process.
            async fn commit(self: Box<Self>) -> Result<(), crate::store::StoreError> {
                let tx = self.0;
                match tokio::spawn(async move { tx.commit().await }).await {
                    Ok(result) => Ok(result?),
                    Err(e) => Err(crate::store::StoreError::Other(
                        anyhow::Error::new(e).context("COMMIT task failed"),
                    )),
                }
            }
        }
    };
}

mod guarded;
mod postgres;
mod postgres_outbox;
mod sql;
mod sqlite;
mod sqlite_outbox;

use sql::{ORDER_COLUMNS, Sql};

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::{
    config::DatabaseSettings,
    domain::{ListQuery, Order, OrderId},
    inbox::{CustomerProjection, Rejection},
    outbox::{NewOutboxEvent, OutboxStore},
    resilience::Policy,
};

pub use postgres::PostgresStore;
pub use postgres_outbox::{FETCH_DUE_BEGIN, fetch_due_sql};
pub use sql::{OUTBOX_STATS, PENDING_EXACT_UP_TO};
pub use sqlite::SqliteStore;

/// Why a storage call failed, classified so callers can tell "try again later" (the
/// database), "try this again" (this transaction) and "never" (this data) apart.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An optimistic-concurrency check failed: someone else changed the row first.
    #[error("concurrent update")]
    Conflict,
    /// A unique constraint rejected a write; carries the constraint (index) name.
    #[error("unique constraint {0} violated")]
    UniqueViolation(String),
    /// The database is unreachable or overloaded (connection failures, pool exhausted,
    /// shutting down): not this request's fault; retrying later may succeed.
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// This transaction lost: serialization failure, deadlock, lock or statement timeout.
    /// Running it again may succeed, but a message that keeps failing this way is stuck.
    #[error("transaction aborted")]
    Aborted(#[source] anyhow::Error),
    /// The database refused the data itself (invalid values such as a NUL character or a
    /// number out of range, a violated check): no retry can succeed.
    #[error("the database rejected the data")]
    Rejected(#[source] anyhow::Error),
    /// Anything else (a bug, corrupt data, a schema mismatch).
    #[error("database error")]
    Other(#[source] anyhow::Error),
}

/// What a failure says about retrying.
#[derive(Clone, Copy)]
enum Retry {
    Later,
    Again,
    Never,
}

/// What a PostgreSQL SQLSTATE says about retrying: 08 connection, 53 insufficient
/// resources, 57P0x shutdown → later; 40 rollback (serialization, deadlock), 55P03 lock
/// not available, 57014 statement timeout → again; 22 data exception, 23 integrity → never.
fn classify_postgres(code: &str) -> Option<Retry> {
    match code {
        "57014" | "55P03" => Some(Retry::Again),
        c if c.starts_with("40") => Some(Retry::Again),
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("57") => Some(Retry::Later),
        c if c.starts_with("22") || c.starts_with("23") => Some(Retry::Never),
        _ => None,
    }
}

/// What a SQLite result code says (the primary code is the low byte of the extended one):
/// 5 BUSY, 6 LOCKED → again; 18 TOOBIG, 19 CONSTRAINT, 20 MISMATCH → never.
fn classify_sqlite(code: &str) -> Option<Retry> {
    match code.parse::<u32>().ok()? & 0xff {
        5 | 6 => Some(Retry::Again),
        18..=20 => Some(Retry::Never),
        _ => None,
    }
}

impl StoreError {
    /// Whether running the same transaction again later can succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Conflict | Self::Unavailable(_) | Self::Aborted(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if let Some(constraint) = unique_constraint(&err) {
            return Self::UniqueViolation(constraint);
        }
        let retry = match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => Some(Retry::Later),
            sqlx::Error::Database(db)
                if db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() =>
            {
                db.code().and_then(|code| classify_postgres(&code))
            }
            sqlx::Error::Database(db) => db.code().and_then(|code| classify_sqlite(&code)),
            // sqlx refused to encode a value for its column type.
            sqlx::Error::Encode(_) => Some(Retry::Never),
            _ => None,
        };
        match retry {
            Some(Retry::Later) => Self::Unavailable(err.into()),
            Some(Retry::Again) => Self::Aborted(err.into()),
            Some(Retry::Never) => Self::Rejected(err.into()),
            None => Self::Other(err.into()),
        }
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
    /// Unbinds `key` from its order if the binding lapsed by `now`, so the key can be used
    /// again; `false` if it is still live (a concurrent retry re-bound it first).
    async fn release_idempotency_key(&self, key: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;
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

/// The Idempotency-Key backstop's binding of a new order.
#[derive(Debug, Clone, Copy)]
pub struct KeyBinding<'a> {
    /// The scoped key (caller and operation included).
    pub key: &'a str,
    /// Fingerprint of the request, to tell a replay from a reuse.
    pub fingerprint: &'a [u8],
    /// When the binding lapses.
    pub expires_at: DateTime<Utc>,
}

/// One write transaction. Dropping it without [`Tx::commit`] rolls back.
#[async_trait]
pub trait Tx: Send {
    /// Inserts a new order, bound to a scoped Idempotency-Key when `binding` is given (one
    /// statement: the key costs no extra round trip); fails with
    /// [`StoreError::UniqueViolation`] (`orders_idempotency_key`) if the key is taken.
    async fn insert_order(
        &mut self,
        order: &Order,
        binding: Option<KeyBinding<'_>>,
    ) -> Result<(), StoreError>;
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
    /// Commits every write of this transaction atomically.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// The stores the roles use. On PostgreSQL each role has its own pool (sizes in
/// [`DatabaseSettings`]), so a busy inbox or a relay catching up cannot take the
/// connections the API needs; pools connect lazily, so a role that does not run costs
/// nothing. SQLite has one pool for everything (it has one writer anyway).
#[derive(Clone)]
pub struct Stores {
    /// REST, gRPC, readiness and the admin API.
    pub api: Arc<dyn Store>,
    /// The outbox relay.
    pub relay: Arc<dyn Store>,
    /// The inbox consumer.
    pub inbox: Arc<dyn Store>,
    /// LISTEN/NOTIFY wake-ups (PostgreSQL only): one listener, one notifier connection.
    pub notify_pool: Option<sqlx::PgPool>,
    /// Each connection pool by name, for the pool metrics.
    pub pools: Vec<(&'static str, PoolProbe)>,
}

/// A connection pool's occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Open connections.
    pub size: u32,
    /// Open connections not in use.
    pub idle: u32,
    /// The most the pool opens.
    pub max: u32,
}

/// Reads one pool's occupancy (at scrape time).
pub type PoolProbe = Arc<dyn Fn() -> PoolStats + Send + Sync>;

fn probe<DB: sqlx::Database>(pool: sqlx::Pool<DB>) -> PoolProbe {
    Arc::new(move || PoolStats {
        size: pool.size(),
        idle: u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
        max: pool.options().get_max_connections(),
    })
}

/// Opens the stores with every PostgreSQL pool behind `policy` (the database's breaker,
/// timeout and retry budget, shared by all roles: it is one database).
pub async fn connect_guarded(settings: &DatabaseSettings, policy: Arc<Policy>) -> anyhow::Result<Stores> {
    let stores = connect(settings).await?;
    if stores.notify_pool.is_none() {
        return Ok(stores); // SQLite: in-process, nothing to break
    }
    let guard = |store: Arc<dyn Store>| guarded::Guarded::wrap(store, policy.clone());
    Ok(Stores {
        api: guard(stores.api),
        relay: guard(stores.relay),
        inbox: guard(stores.inbox),
        notify_pool: stores.notify_pool,
        pools: stores.pools,
    })
}

/// Opens the stores named by the URL's scheme.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<Stores> {
    let url = settings.url.expose();
    if url.starts_with("sqlite:") {
        let sqlite = SqliteStore::connect(settings).await?;
        let pools = vec![("embedded", probe(sqlite.pool().clone()))];
        let store: Arc<dyn Store> = Arc::new(sqlite);
        return Ok(Stores {
            api: store.clone(),
            relay: store.clone(),
            inbox: store,
            notify_pool: None,
            pools,
        });
    }
    let pool = |role: &str, size: u32| PostgresStore::connect(settings, role, size);
    let (api, relay, inbox) = (
        pool("api", settings.max_connections)?,
        pool("relay", settings.relay_max_connections)?,
        pool("inbox", settings.inbox_max_connections)?,
    );
    let notify = pool("notify", 2)?.pool().clone();
    let pools = vec![
        ("api", probe(api.pool().clone())),
        ("relay", probe(relay.pool().clone())),
        ("inbox", probe(inbox.pool().clone())),
        ("notify", probe(notify.clone())),
    ];
    Ok(Stores {
        api: Arc::new(api),
        relay: Arc::new(relay),
        inbox: Arc::new(inbox),
        notify_pool: Some(notify),
        pools,
    })
}

/// `orders-service migrate`: applies migrations and exits.
pub async fn migrate(settings: &DatabaseSettings) -> anyhow::Result<()> {
    connect(settings).await?.api.migrate().await.context("applying migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

/// `orders-service outbox repartition`: moves every outbox row and dead letter to the
/// partition `APP_OUTBOX__PARTITIONS` gives it and records the new P. Refuses while any
/// relay is live.
pub async fn repartition(settings: &DatabaseSettings, partitions: i32) -> anyhow::Result<()> {
    let store = connect(settings).await?.api;
    store.migrate().await.context("applying migrations")?;
    let moved = store.repartition(partitions).await.context("repartitioning the outbox")?;
    tracing::info!(partitions, moved, "outbox repartitioned");
    Ok(())
}
