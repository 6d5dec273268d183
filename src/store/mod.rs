//! The storage port and its two adapters: PostgreSQL (production, many replicas) and SQLite
//! (the embedded default for `cargo run`). Both pass the same conformance suite
//! (`tests/it/store_conformance.rs`).
//!
//! Writes go through [`Store::begin`]: the use-case owns the [`Tx`], performs every write of
//! one state change in it (the outbox insert joins it later) and commits once.

mod idempotency_sql;
mod inbox_sql;
mod postgres;
mod postgres_outbox;
mod sqlite;
mod sqlite_outbox;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type, types::Json};
use uuid::Uuid;

use crate::{
    config::DatabaseSettings,
    domain::{Currency, CustomerId, LineItem, ListQuery, Note, Order, OrderId, OrderStatus, Quantity, Sku},
    inbox::{CustomerProjection, Rejection},
    outbox::{DeadLetter, NewOutboxEvent, OutboxRecord, OutboxStore, TraceContext},
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

/// Line items as stored in the `items` JSON column. Separate from the domain type so the
/// storage format changes only deliberately.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ItemRecord {
    sku: String,
    quantity: u32,
    unit_price_minor: i64,
}

/// Inserts an order; the SQL is portable (`$N` placeholders work in SQLite too).
async fn insert_order<'e, DB, E>(executor: E, order: &Order) -> Result<(), StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> Uuid: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
    for<'q> Json<Vec<ItemRecord>>: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(
        "INSERT INTO orders (id, customer_id, items, currency, total_minor, status, note, created_at, updated_at, version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(order.id.as_uuid())
    .bind(order.customer_id.to_string())
    .bind(item_records(order))
    .bind(order.currency.to_string())
    .bind(order.total_minor)
    .bind(order.status.as_str().to_owned())
    .bind(order.note.as_ref().map(|n| n.to_string()))
    .bind(order.created_at)
    .bind(order.updated_at)
    .bind(order.version)
    .execute(executor)
    .await?;
    Ok(())
}

/// Writes an order's mutable fields guarded by its previous version (optimistic locking).
async fn update_order<'e, DB, E>(executor: E, order: &Order, expected_version: i64) -> Result<(), StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> Uuid: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
{
    let updated: Option<i64> = sqlx::query_scalar(
        "UPDATE orders SET status = $1, updated_at = $2, version = $3, payment_id = $6, payment_failure = $7
         WHERE id = $4 AND version = $5 RETURNING version",
    )
    .bind(order.status.as_str().to_owned())
    .bind(order.updated_at)
    .bind(order.version)
    .bind(order.id.as_uuid())
    .bind(expected_version)
    .bind(order.payment_id.clone())
    .bind(order.payment_failure.clone())
    .fetch_optional(executor)
    .await?;
    updated.map(drop).ok_or(StoreError::Conflict)
}

fn item_records(order: &Order) -> Json<Vec<ItemRecord>> {
    Json(
        order
            .items
            .iter()
            .map(|i| ItemRecord {
                sku: i.sku.to_string(),
                quantity: i.quantity.get(),
                unit_price_minor: i.unit_price_minor,
            })
            .collect(),
    )
}

/// Decodes an `orders` row from either database, re-validating every value so a corrupt
/// row surfaces as an error instead of an invalid domain object.
fn decode_order<'r, R>(row: &'r R) -> Result<Order, StoreError>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    Uuid: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    DateTime<Utc>: Decode<'r, R::Database> + Type<R::Database>,
    Json<Vec<ItemRecord>>: Decode<'r, R::Database> + Type<R::Database>,
{
    let items: Json<Vec<ItemRecord>> = row.try_get("items")?;
    let items = items
        .0
        .into_iter()
        .map(|i| {
            Ok(LineItem {
                sku: stored(Sku::parse("sku", &i.sku))?,
                quantity: stored(Quantity::parse("quantity", i.quantity.into()))?,
                unit_price_minor: i.unit_price_minor,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let status: String = row.try_get("status")?;
    Ok(Order {
        id: OrderId::from_uuid(row.try_get("id")?),
        customer_id: stored(CustomerId::parse("customer_id", &row.try_get::<String, _>("customer_id")?))?,
        items,
        currency: stored(Currency::parse("currency", &row.try_get::<String, _>("currency")?))?,
        total_minor: row.try_get("total_minor")?,
        status: OrderStatus::from_name(&status).ok_or_else(|| corrupt("status"))?,
        note: row
            .try_get::<Option<String>, _>("note")?
            .map(|n| stored(Note::parse("note", &n)))
            .transpose()?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
        payment_id: row.try_get("payment_id")?,
        payment_failure: row.try_get("payment_failure")?,
    })
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!("corrupt order row: invalid {what}"))
}

/// A stored value that fails validation means the row is corrupt.
fn stored<T>(value: Result<T, crate::domain::FieldViolation>) -> Result<T, StoreError> {
    value.map_err(|v| corrupt(&v.field))
}

/// Appends an outbox row; portable SQL like [`insert_order`].
async fn insert_outbox<'e, DB, E>(executor: E, event: &NewOutboxEvent) -> Result<(), StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> Uuid: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
    for<'q> i32: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(
        "INSERT INTO outbox (message_id, partition, aggregate_type, aggregate_id, event_type, payload,
                             traceparent, tracestate, created_at, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
    )
    .bind(event.message_id)
    .bind(event.partition)
    .bind(event.aggregate_type.to_owned())
    .bind(event.aggregate_id.clone())
    .bind(event.event_type.to_owned())
    .bind(event.payload.clone())
    .bind(event.trace.traceparent.clone())
    .bind(event.trace.tracestate.clone())
    .bind(event.created_at)
    .execute(executor)
    .await?;
    Ok(())
}

/// The oldest `$2` rows of partition `$1`, skipping aggregates with a dead letter (portable SQL).
fn fetch_batch_sql() -> String {
    format!(
        "SELECT {OUTBOX_COLUMNS} FROM outbox o WHERE partition = $1
           AND NOT EXISTS (SELECT 1 FROM outbox_dead_letter d
                           WHERE d.aggregate_type = o.aggregate_type AND d.aggregate_id = o.aggregate_id)
         ORDER BY seq LIMIT $2"
    )
}

/// The oldest `$1` dead letters (portable SQL).
fn list_dead_letters_sql() -> String {
    format!("SELECT {DEAD_LETTER_COLUMNS} FROM outbox_dead_letter ORDER BY seq LIMIT $1")
}

/// Records a failed publish attempt and when to retry (application clock; portable SQL).
async fn record_failure<'e, DB, E>(
    executor: E,
    seq: i64,
    error: &str,
    retry_in: Duration,
) -> Result<(), StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(
        "UPDATE outbox SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3 WHERE seq = $1",
    )
    .bind(seq)
    .bind(error.to_owned())
    .bind(Utc::now() + retry_in)
    .execute(executor)
    .await?;
    Ok(())
}

/// Columns [`decode_outbox`] expects.
const OUTBOX_COLUMNS: &str = "seq, message_id, aggregate_type, aggregate_id, event_type, payload, traceparent, \
                              tracestate, created_at, attempts, next_attempt_at";

/// Decodes an `outbox` row from either database.
fn decode_outbox<'r, R>(row: &'r R) -> Result<OutboxRecord, StoreError>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    Uuid: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
    DateTime<Utc>: Decode<'r, R::Database> + Type<R::Database>,
{
    let next_attempt_at: DateTime<Utc> = row.try_get("next_attempt_at")?;
    Ok(OutboxRecord {
        seq: row.try_get("seq")?,
        message_id: row.try_get("message_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        event_type: row.try_get("event_type")?,
        payload: row.try_get("payload")?,
        trace: TraceContext {
            traceparent: row.try_get("traceparent")?,
            tracestate: row.try_get("tracestate")?,
        },
        created_at: row.try_get("created_at")?,
        attempts: row.try_get("attempts")?,
        due: next_attempt_at <= Utc::now(),
    })
}

/// Columns [`decode_dead_letter`] expects.
const DEAD_LETTER_COLUMNS: &str = "seq, message_id, aggregate_type, aggregate_id, event_type, \
                                   length(payload) AS payload_bytes, attempts, error, created_at, dead_at";

/// Decodes an `outbox_dead_letter` row from either database.
fn decode_dead_letter<'r, R>(row: &'r R) -> Result<DeadLetter, StoreError>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    Uuid: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
    DateTime<Utc>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(DeadLetter {
        seq: row.try_get("seq")?,
        message_id: row.try_get("message_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        event_type: row.try_get("event_type")?,
        payload_bytes: row.try_get::<i32, _>("payload_bytes").map(i64::from)?,
        attempts: row.try_get("attempts")?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        dead_at: row.try_get("dead_at")?,
    })
}

/// Columns selected by every order query, in the order [`decode_order`] expects them.
const ORDER_COLUMNS: &str = "id, customer_id, items, currency, total_minor, status, note, created_at, updated_at, \
                             version, payment_id, payment_failure";
