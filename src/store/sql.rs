//! Statements and row decoding that are portable between PostgreSQL and SQLite (`$N`
//! placeholders, `ON CONFLICT`, `RETURNING`), so both adapters share one copy: orders,
//! outbox, inbox, customer projection and the Idempotency-Key backstop.
//!
//! Every statement is an associated function of [`Sql`], whose single `where` clause names
//! the column types sqlx must bind and decode for a database; the adapters call them as
//! `Sql::<Postgres>::…` / `Sql::<Sqlite>::…`.

use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, FromRow, IntoArguments, Row, Type, types::Json};
use uuid::Uuid;

use super::{IdempotentOrder, StoreError};
use crate::{
    domain::{Currency, CustomerId, LineItem, Note, Order, OrderId, OrderStatus, Quantity, Sku},
    inbox::{CustomerProjection, Rejection},
    outbox::{DeadLetter, NewOutboxEvent, OutboxRecord, OutboxStats, TraceContext},
};

/// Line items as stored in the `items` JSON column. Separate from the domain type so the
/// storage format changes only deliberately.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ItemRecord {
    sku: String,
    quantity: u32,
    unit_price_minor: i64,
}

/// Columns selected by every order query, in the order [`Sql::decode_order`] expects them.
pub(super) const ORDER_COLUMNS: &str = "id, customer_id, items, currency, total_minor, status, note, created_at, \
                                        updated_at, version, payment_id, payment_failure";
pub(super) const OUTBOX_COLUMNS: &str = "seq, partition, message_id, aggregate_type, aggregate_id, event_type, \
                                         payload, traceparent, tracestate, created_at, attempts";

/// The relay's fetch condition on an outbox row `o`, with the relay's clock as parameter
/// `now`. A fetch reads each partition in `seq` order and keeps the rows for which this
/// holds: the row is due (never attempted, or its backoff has elapsed: a fresh row is due
/// whatever the writer's clock said) and no earlier event of its aggregate is in backoff or
/// dead-lettered. Every other earlier event of the aggregate is due too, so it precedes the
/// row in the same read (the relay also skips aggregates with an event in flight): what a
/// fetch returns per aggregate is a run of consecutive events starting at its oldest. Both
/// probes use indexes that are empty while the broker is healthy (`attempts > 0`, dead letters).
pub(super) fn due_head(now: &str) -> String {
    format!(
        "(o.attempts = 0 OR o.next_attempt_at <= {now})
         AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.attempts > 0 AND e.aggregate_type = o.aggregate_type
                         AND e.aggregate_id = o.aggregate_id AND e.seq < o.seq)
         AND NOT EXISTS (SELECT 1 FROM outbox_dead_letter d WHERE d.aggregate_type = o.aggregate_type
                         AND d.aggregate_id = o.aggregate_id AND d.seq < o.seq)"
    )
}
/// Up to this many pending rows the backlog gauge is an exact count.
pub const PENDING_EXACT_UP_TO: i64 = 10_000;

/// The backlog figures, without reading the whole outbox: every relay refreshes them every
/// second, and the outbox is largest exactly when the broker is down, so a `count(*)` would
/// cost most when the system can least afford it. Columns: an exact count of at most `$1`
/// rows, the span of pending seqs, the oldest row by `seq` (both from the primary key), the
/// dead letters.
pub const OUTBOX_STATS: &str = "SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT $1) AS capped),
        (SELECT max(seq) - min(seq) + 1 FROM outbox),
        (SELECT created_at FROM outbox ORDER BY seq LIMIT 1),
        (SELECT count(*) FROM outbox_dead_letter)";

/// Backlog figures from [`OUTBOX_STATS`]' columns (queried with `$1` one above
/// [`PENDING_EXACT_UP_TO`]): the exact count while it fits, beyond that the span of pending
/// seqs, an upper bound (rows already published inside the span are counted).
pub(super) fn outbox_stats(
    counted: i64,
    span: Option<i64>,
    oldest: Option<DateTime<Utc>>,
    dead_letters: i64,
) -> OutboxStats {
    let pending = if counted <= PENDING_EXACT_UP_TO { counted } else { span.unwrap_or(counted).max(counted) };
    let oldest_age_seconds = oldest.map_or(0.0, |t| (Utc::now() - t).as_seconds_f64().max(0.0));
    OutboxStats { pending, oldest_age_seconds, dead_letters }
}

const DEAD_LETTER_COLUMNS: &str = "seq, message_id, aggregate_type, aggregate_id, event_type, \
                                   length(payload) AS payload_bytes, attempts, error, created_at, dead_at";

/// The portable statements for database `DB`.
pub(super) struct Sql<DB>(PhantomData<DB>);

/// `db.system.name` of the semantic conventions for the database behind `DB`.
fn db_system<DB: Database>() -> &'static str {
    match DB::NAME {
        "PostgreSQL" => "postgresql",
        "SQLite" => "sqlite",
        _ => "other_sql",
    }
}

impl<DB: Database> Sql<DB>
where
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
    for<'a> Uuid: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> String: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> Option<String>: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> i32: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> Vec<u8>: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> Option<Vec<u8>>: Encode<'a, DB> + Type<DB>,
    for<'a> DateTime<Utc>: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> Option<DateTime<Utc>>: Encode<'a, DB> + Type<DB>,
    for<'a> Json<Vec<ItemRecord>>: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (i32,): FromRow<'r, DB::Row>,
    for<'r> (String,): FromRow<'r, DB::Row>,
{
    // ----- orders -----

    /// Inserts an order with its Idempotency-Key binding, if any, in the same statement.
    #[tracing::instrument(name = "INSERT orders", skip_all, fields(otel.kind = "client", db.system.name = db_system::<DB>(),
        db.operation.name = "INSERT", db.collection.name = "orders"))]
    pub(super) async fn insert_order<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        order: &Order,
        binding: Option<super::KeyBinding<'_>>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO orders (id, customer_id, items, currency, total_minor, status, note, created_at, updated_at, version,
                                 idempotency_key, idempotency_fingerprint, idempotency_expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
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
        .bind(binding.map(|b| b.key.to_owned()))
        .bind(binding.map(|b| b.fingerprint.to_vec()))
        .bind(binding.map(|b| b.expires_at))
        .execute(executor)
        .await?;
        Ok(())
    }

    /// Writes an order's mutable fields guarded by its previous version (optimistic locking).
    #[tracing::instrument(name = "UPDATE orders", skip_all, fields(otel.kind = "client", db.system.name = db_system::<DB>(),
        db.operation.name = "UPDATE", db.collection.name = "orders"))]
    pub(super) async fn update_order<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        order: &Order,
        expected_version: i64,
    ) -> Result<(), StoreError> {
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

    /// Decodes an `orders` row, re-validating every value so a corrupt row surfaces as an
    /// error instead of an invalid domain object.
    pub(super) fn decode_order(row: &DB::Row) -> Result<Order, StoreError> {
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

    // ----- outbox -----

    /// Appends an outbox row, unless the outbox records another partition count than the
    /// one the row's partition was computed with (then nothing is inserted and the write
    /// fails: a stale replica must not strand rows in partitions no relay reads).
    #[tracing::instrument(name = "INSERT outbox", skip_all, fields(otel.kind = "client", db.system.name = db_system::<DB>(),
        db.operation.name = "INSERT", db.collection.name = "outbox"))]
    pub(super) async fn insert_outbox<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        event: &NewOutboxEvent,
    ) -> Result<(), StoreError> {
        let inserted: Option<i32> = sqlx::query_scalar(
            "INSERT INTO outbox (message_id, partition, aggregate_type, aggregate_id, event_type, payload,
                                 traceparent, tracestate, created_at, next_attempt_at)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $9
             WHERE NOT EXISTS (SELECT 1 FROM outbox_meta WHERE partitions <> $10)
             RETURNING 1",
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
        .bind(event.partitions)
        .fetch_optional(executor)
        .await?;
        if inserted.is_none() {
            return Err(StoreError::Other(anyhow::anyhow!(
                "the outbox partition count changed; this replica still computes partitions with \
                 APP_OUTBOX__PARTITIONS={} and must be restarted with the recorded value",
                event.partitions
            )));
        }
        Ok(())
    }

    /// Decodes an outbox row selected with [`OUTBOX_COLUMNS`].
    pub(super) fn decode_outbox(row: &DB::Row) -> Result<OutboxRecord, StoreError> {
        Ok(OutboxRecord {
            seq: row.try_get("seq")?,
            partition: row.try_get("partition")?,
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
        })
    }

    /// The oldest `limit` dead letters.
    pub(super) async fn list_dead_letters<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let sql = format!("SELECT {DEAD_LETTER_COLUMNS} FROM outbox_dead_letter ORDER BY seq LIMIT $1");
        let rows = sqlx::query(&sql).bind(limit).fetch_all(executor).await?;
        rows.iter()
            .map(|row| {
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
            })
            .collect()
    }

    // ----- inbox and customer projection -----

    /// Inserts `(consumer, message_id)`; `true` if it was new, `false` for a duplicate.
    #[tracing::instrument(name = "INSERT inbox", skip_all, fields(otel.kind = "client", db.system.name = db_system::<DB>(),
        db.operation.name = "INSERT", db.collection.name = "inbox"))]
    pub(super) async fn insert_inbox<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        consumer: &str,
        message_id: &str,
    ) -> Result<bool, StoreError> {
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

    /// Deletes up to `limit` inbox rows received before `older_than`; returns how many.
    pub(super) async fn purge_inbox<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        older_than: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
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

    /// Records a message that was not applied.
    pub(super) async fn insert_rejection<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        r: &Rejection,
    ) -> Result<(), StoreError> {
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
    pub(super) async fn list_rejections<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        limit: i64,
    ) -> Result<Vec<Rejection>, StoreError> {
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
                    kind: if kind == Rejection::DEAD_LETTERED {
                        Rejection::DEAD_LETTERED
                    } else {
                        Rejection::REJECTED
                    },
                    reason: row.try_get("reason")?,
                    at: row.try_get("at")?,
                })
            })
            .collect()
    }

    /// Upserts a customer unless the stored version is at least as new; `true` if applied.
    #[tracing::instrument(name = "INSERT customer_projection", skip_all, fields(otel.kind = "client", db.system.name = db_system::<DB>(),
        db.operation.name = "INSERT", db.collection.name = "customer_projection"))]
    pub(super) async fn upsert_customer<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        c: &CustomerProjection,
    ) -> Result<bool, StoreError> {
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

    /// A customer's display name from the projection.
    #[tracing::instrument(name = "SELECT customer_projection", skip_all, fields(otel.kind = "client", db.system.name = db_system::<DB>(),
        db.operation.name = "SELECT", db.collection.name = "customer_projection"))]
    pub(super) async fn customer_display_name<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        customer_id: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT display_name FROM customer_projection WHERE customer_id = $1")
            .bind(customer_id.to_owned())
            .fetch_optional(executor)
            .await?)
    }

    // ----- Idempotency-Key backstop -----

    /// The order bound to `key`, if any.
    #[tracing::instrument(name = "SELECT orders", skip_all, fields(otel.kind = "client", db.system.name = db_system::<DB>(),
        db.operation.name = "SELECT", db.collection.name = "orders"))]
    pub(super) async fn find_by_idempotency_key<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        key: &str,
    ) -> Result<Option<IdempotentOrder>, StoreError> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS}, idempotency_fingerprint, idempotency_expires_at FROM orders
             WHERE idempotency_key = $1"
        );
        let Some(row) = sqlx::query(&sql).bind(key.to_owned()).fetch_optional(executor).await? else {
            return Ok(None);
        };
        Ok(Some(IdempotentOrder {
            order: Self::decode_order(&row)?,
            fingerprint: row.try_get("idempotency_fingerprint")?,
            expires_at: row.try_get("idempotency_expires_at")?,
        }))
    }

    /// Unbinds `key` if its binding lapsed by `now`; `false` if it is still (or again)
    /// live. The condition matters: two retries that both saw the expired binding must not
    /// unbind the fresh one the first of them just made.
    pub(super) async fn release_idempotency_key<'e, E: Executor<'e, Database = DB>>(
        executor: E,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let released: Option<i32> = sqlx::query_scalar(
            "UPDATE orders SET idempotency_key = NULL, idempotency_fingerprint = NULL, idempotency_expires_at = NULL
             WHERE idempotency_key = $1 AND idempotency_expires_at <= $2 RETURNING 1",
        )
        .bind(key.to_owned())
        .bind(now)
        .fetch_optional(executor)
        .await?;
        Ok(released.is_some())
    }
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

fn corrupt(what: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!("corrupt order row: invalid {what}"))
}

/// A stored value that fails validation means the row is corrupt.
fn stored<T>(value: Result<T, crate::domain::FieldViolation>) -> Result<T, StoreError> {
    value.map_err(|v| corrupt(&v.field))
}
