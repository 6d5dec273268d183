//! Statements and row decoding for orders and the outbox that are portable between
//! PostgreSQL and SQLite (`$N` placeholders, `ON CONFLICT`, `RETURNING`), so both adapters
//! share one copy.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type, types::Json};
use std::time::Duration;
use uuid::Uuid;

use super::StoreError;
use crate::{
    domain::{Currency, CustomerId, LineItem, Note, Order, OrderId, OrderStatus, Quantity, Sku},
    outbox::{DeadLetter, NewOutboxEvent, OutboxRecord, TraceContext},
};

/// Line items as stored in the `items` JSON column. Separate from the domain type so the
/// storage format changes only deliberately.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ItemRecord {
    sku: String,
    quantity: u32,
    unit_price_minor: i64,
}

/// Inserts an order; the SQL is portable (`$N` placeholders work in SQLite too).
pub(super) async fn insert_order<'e, DB, E>(executor: E, order: &Order) -> Result<(), StoreError>
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
pub(super) async fn update_order<'e, DB, E>(
    executor: E,
    order: &Order,
    expected_version: i64,
) -> Result<(), StoreError>
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

pub(super) fn item_records(order: &Order) -> Json<Vec<ItemRecord>> {
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
pub(super) fn decode_order<'r, R>(row: &'r R) -> Result<Order, StoreError>
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

pub(super) fn corrupt(what: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!("corrupt order row: invalid {what}"))
}

/// A stored value that fails validation means the row is corrupt.
pub(super) fn stored<T>(value: Result<T, crate::domain::FieldViolation>) -> Result<T, StoreError> {
    value.map_err(|v| corrupt(&v.field))
}

/// Appends an outbox row; portable SQL like [`insert_order`].
pub(super) async fn insert_outbox<'e, DB, E>(executor: E, event: &NewOutboxEvent) -> Result<(), StoreError>
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
pub(super) fn fetch_batch_sql() -> String {
    format!(
        "SELECT {OUTBOX_COLUMNS} FROM outbox o WHERE partition = $1
           AND NOT EXISTS (SELECT 1 FROM outbox_dead_letter d
                           WHERE d.aggregate_type = o.aggregate_type AND d.aggregate_id = o.aggregate_id)
         ORDER BY seq LIMIT $2"
    )
}

/// The oldest `$1` dead letters (portable SQL).
pub(super) fn list_dead_letters_sql() -> String {
    format!("SELECT {DEAD_LETTER_COLUMNS} FROM outbox_dead_letter ORDER BY seq LIMIT $1")
}

/// Records a failed publish attempt and when to retry (application clock; portable SQL).
pub(super) async fn record_failure<'e, DB, E>(
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
pub(super) const OUTBOX_COLUMNS: &str = "seq, message_id, aggregate_type, aggregate_id, event_type, payload, traceparent, \
                              tracestate, created_at, attempts, next_attempt_at";

/// Decodes an `outbox` row from either database.
pub(super) fn decode_outbox<'r, R>(row: &'r R) -> Result<OutboxRecord, StoreError>
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
pub(super) const DEAD_LETTER_COLUMNS: &str = "seq, message_id, aggregate_type, aggregate_id, event_type, \
                                   length(payload) AS payload_bytes, attempts, error, created_at, dead_at";

/// Decodes an `outbox_dead_letter` row from either database.
pub(super) fn decode_dead_letter<'r, R>(row: &'r R) -> Result<DeadLetter, StoreError>
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
pub(super) const ORDER_COLUMNS: &str = "id, customer_id, items, currency, total_minor, status, note, created_at, updated_at, \
                             version, payment_id, payment_failure";
