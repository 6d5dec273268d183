//! Inbox, rejection and customer-projection statements, portable between PostgreSQL and
//! SQLite (`$N` placeholders, `ON CONFLICT`, `RETURNING`), shared by both adapters.

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type};

use super::StoreError;
use crate::inbox::{CustomerProjection, Rejection};

/// Inserts `(consumer, message_id)`; `true` if it was new, `false` for a duplicate.
pub(super) async fn insert_inbox<'e, DB, E>(
    executor: E,
    consumer: &str,
    message_id: &str,
) -> Result<bool, StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
    for<'r> (i32,): sqlx::FromRow<'r, DB::Row>,
{
    let inserted: Option<i32> = sqlx::query_scalar(
        "INSERT INTO inbox (consumer, message_id, received_at) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING RETURNING 1",
    )
    .bind(consumer.to_owned())
    .bind(message_id.to_owned())
    .bind(Utc::now())
    .fetch_optional(executor)
    .await?;
    Ok(inserted.is_some())
}

/// Upserts a customer unless the stored version is at least as new; `true` if applied.
pub(super) async fn upsert_customer<'e, DB, E>(
    executor: E,
    c: &CustomerProjection,
) -> Result<bool, StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
{
    let applied: Option<i64> = sqlx::query_scalar(
        "INSERT INTO customer_projection (customer_id, display_name, tier, version, updated_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (customer_id) DO UPDATE
            SET display_name = excluded.display_name, tier = excluded.tier,
                version = excluded.version, updated_at = excluded.updated_at
          WHERE customer_projection.version < excluded.version
         RETURNING version",
    )
    .bind(c.customer_id.clone())
    .bind(c.display_name.clone())
    .bind(c.tier.clone())
    .bind(c.version)
    .bind(Utc::now())
    .fetch_optional(executor)
    .await?;
    Ok(applied.is_some())
}

/// Records a message that was not applied.
pub(super) async fn insert_rejection<'e, DB, E>(executor: E, r: &Rejection) -> Result<(), StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
    for<'q> i32: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(
        "INSERT INTO inbox_rejection (consumer, message_id, topic, kafka_partition, kafka_offset, event_type, kind, reason, at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(r.consumer.clone())
    .bind(r.message_id.clone())
    .bind(r.topic.clone())
    .bind(r.partition)
    .bind(r.offset)
    .bind(r.event_type.clone())
    .bind(r.kind.to_owned())
    .bind(r.reason.clone())
    .bind(r.at)
    .execute(executor)
    .await?;
    Ok(())
}

/// The most recent rejections, newest first.
pub(super) async fn list_rejections<'e, DB, E>(executor: E, limit: i64) -> Result<Vec<Rejection>, StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    for<'r> Option<String>: Decode<'r, DB> + Type<DB>,
    for<'r> i32: Decode<'r, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
    for<'r> DateTime<Utc>: Decode<'r, DB> + Type<DB>,
{
    let rows = sqlx::query(
        "SELECT consumer, message_id, topic, kafka_partition, kafka_offset, event_type, kind, reason, at
         FROM inbox_rejection ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(executor)
    .await?;
    rows.iter()
        .map(|row| {
            let kind: String = row.try_get("kind")?;
            Ok(Rejection {
                consumer: row.try_get("consumer")?,
                message_id: row.try_get("message_id")?,
                topic: row.try_get("topic")?,
                partition: row.try_get("kafka_partition")?,
                offset: row.try_get("kafka_offset")?,
                event_type: row.try_get("event_type")?,
                kind: if kind == "dead-lettered" { Rejection::DEAD_LETTERED } else { Rejection::REJECTED },
                reason: row.try_get("reason")?,
                at: row.try_get("at")?,
            })
        })
        .collect()
}

/// Deletes up to `limit` inbox rows received before `older_than`; returns how many.
pub(super) async fn purge_inbox<'e, DB, E>(
    executor: E,
    older_than: DateTime<Utc>,
    limit: i64,
) -> Result<u64, StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
    for<'r> (i32,): sqlx::FromRow<'r, DB::Row>,
{
    let deleted: Vec<i32> = sqlx::query_scalar(
        "DELETE FROM inbox WHERE (consumer, message_id) IN
            (SELECT consumer, message_id FROM inbox WHERE received_at < $1 LIMIT $2)
         RETURNING 1",
    )
    .bind(older_than)
    .bind(limit)
    .fetch_all(executor)
    .await?;
    Ok(deleted.len() as u64)
}

/// A customer's display name from the projection.
pub(super) async fn customer_display_name<'e, DB, E>(
    executor: E,
    customer_id: &str,
) -> Result<Option<String>, StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'r> (String,): sqlx::FromRow<'r, DB::Row>,
{
    Ok(sqlx::query_scalar("SELECT display_name FROM customer_projection WHERE customer_id = $1")
        .bind(customer_id.to_owned())
        .fetch_optional(executor)
        .await?)
}
