//! Idempotency-Key backstop statements, portable between PostgreSQL and SQLite.

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type, types::Json};
use uuid::Uuid;

use super::{IdempotentOrder, ItemRecord, ORDER_COLUMNS, StoreError, decode_order};
use crate::domain::OrderId;

/// Binds `order` to `key`; the unique index rejects a key that is already bound.
pub(super) async fn bind<'e, DB, E>(
    executor: E,
    order: OrderId,
    key: &str,
    fingerprint: &[u8],
    expires_at: DateTime<Utc>,
) -> Result<(), StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> Uuid: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(
        "UPDATE orders SET idempotency_key = $2, idempotency_fingerprint = $3, idempotency_expires_at = $4 WHERE id = $1",
    )
    .bind(order.as_uuid())
    .bind(key.to_owned())
    .bind(fingerprint.to_vec())
    .bind(expires_at)
    .execute(executor)
    .await?;
    Ok(())
}

/// The order bound to `key`, if any.
pub(super) async fn find<'e, DB, E>(executor: E, key: &str) -> Result<Option<IdempotentOrder>, StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
    for<'r> Uuid: Decode<'r, DB> + Type<DB>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    for<'r> Option<String>: Decode<'r, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
    for<'r> Vec<u8>: Decode<'r, DB> + Type<DB>,
    for<'r> DateTime<Utc>: Decode<'r, DB> + Type<DB>,
    for<'r> Json<Vec<ItemRecord>>: Decode<'r, DB> + Type<DB>,
{
    let sql = format!(
        "SELECT {ORDER_COLUMNS}, idempotency_fingerprint, idempotency_expires_at FROM orders WHERE idempotency_key = $1"
    );
    let Some(row) = sqlx::query(&sql).bind(key.to_owned()).fetch_optional(executor).await? else {
        return Ok(None);
    };
    Ok(Some(IdempotentOrder {
        order: decode_order(&row)?,
        fingerprint: row.try_get("idempotency_fingerprint")?,
        expires_at: row.try_get("idempotency_expires_at")?,
    }))
}

/// Unbinds `key` (after its retention lapsed).
pub(super) async fn release<'e, DB, E>(executor: E, key: &str) -> Result<(), StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(
        "UPDATE orders SET idempotency_key = NULL, idempotency_fingerprint = NULL, idempotency_expires_at = NULL
         WHERE idempotency_key = $1",
    )
    .bind(key.to_owned())
    .execute(executor)
    .await?;
    Ok(())
}
