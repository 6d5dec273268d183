//! The outbox on SQLite. SQLite serves exactly one process, so that process's relay owns
//! every partition and no leases are needed; ordering, retries and dead-lettering behave
//! as on PostgreSQL. Settling loops over rows inside one `BEGIN IMMEDIATE` transaction:
//! statements are in-process calls here, not round trips.

use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    SqliteStore, StoreError,
    sql::{OUTBOX_COLUMNS, OUTBOX_STATS, PENDING_EXACT_UP_TO, due_head, outbox_stats},
};

/// The portable statements, for this database.
type Sql = super::Sql<sqlx::Sqlite>;
use crate::outbox::{
    DeadLetter, Lease, Membership, OutboxRecord, OutboxStats, OutboxStore, PartitionMismatch, RelayIdentity,
    Settle, Settled, Settlement, partition_of,
};

const MOVE_COLUMNS: &str = "seq, message_id, partition, aggregate_type, aggregate_id, event_type, payload, traceparent, tracestate, created_at";

#[async_trait]
impl OutboxStore for SqliteStore {
    async fn ensure_partitions(&self, partitions: i32) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO outbox_meta (singleton, partitions) VALUES (1, $1) ON CONFLICT DO NOTHING")
            .bind(partitions)
            .execute(self.pool())
            .await?;
        let stored: i32 =
            sqlx::query_scalar("SELECT partitions FROM outbox_meta").fetch_one(self.pool()).await?;
        if stored != partitions {
            return Err(StoreError::Other(PartitionMismatch { configured: partitions, stored }.into()));
        }
        Ok(())
    }

    async fn acquire_partitions(
        &self,
        _relay: &RelayIdentity,
        partitions: i32,
        _ttl: Duration,
    ) -> Result<Membership, StoreError> {
        self.ensure_partitions(partitions).await?;
        Ok(Membership {
            leases: (0..partitions).map(|partition| Lease { partition, epoch: 0 }).collect(),
            live_relays: 1,
            fair_share: partitions as usize,
            next_expiry: None,
        })
    }

    async fn release_partitions(&self, _relay: &RelayIdentity) -> Result<(), StoreError> {
        Ok(())
    }

    async fn fetch_due(
        &self,
        partitions: &[i32],
        per_partition: i64,
        now: DateTime<Utc>,
        in_flight: &[&str],
    ) -> Result<Vec<OutboxRecord>, StoreError> {
        // The one relay owns every partition: one statement numbers each partition's rows.
        // SQLite has no array parameters: the in-flight aggregate ids travel as a JSON array.
        let sql = format!(
            "SELECT * FROM (
                SELECT {OUTBOX_COLUMNS}, row_number() OVER (PARTITION BY partition ORDER BY seq) AS rank
                FROM outbox o WHERE o.aggregate_id NOT IN (SELECT value FROM json_each($3)) AND {}
             ) WHERE rank <= $1 ORDER BY seq",
            due_head("$2")
        );
        let in_flight = serde_json::to_string(in_flight).map_err(|e| StoreError::Other(e.into()))?;
        let rows =
            sqlx::query(&sql).bind(per_partition).bind(now).bind(in_flight).fetch_all(self.pool()).await?;
        let rows = rows.iter().map(Sql::decode_outbox).collect::<Result<Vec<_>, _>>()?;
        Ok(rows.into_iter().filter(|r| partitions.contains(&r.partition)).collect())
    }

    async fn settle(
        &self,
        _owner: &str,
        _leases: &[Lease],
        rows: &[Settlement],
    ) -> Result<Settled, StoreError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let mut settled = Settled::default();
        for row in rows {
            match &row.outcome {
                Settle::Published => {
                    settled.published += sqlx::query("DELETE FROM outbox WHERE seq = $1")
                        .bind(row.seq)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                Settle::Retry { error, next_attempt_at } => {
                    settled.retried += sqlx::query(
                        "UPDATE outbox SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3
                         WHERE seq = $1",
                    )
                    .bind(row.seq)
                    .bind(error.as_str())
                    .bind(*next_attempt_at)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
                Settle::DeadLetter { error } => {
                    settled.dead_lettered += sqlx::query(&format!(
                        "INSERT INTO outbox_dead_letter ({MOVE_COLUMNS}, attempts, error, dead_at)
                         SELECT {MOVE_COLUMNS}, attempts + 1, $2, $3 FROM outbox WHERE seq = $1"
                    ))
                    .bind(row.seq)
                    .bind(error.as_str())
                    .bind(Utc::now())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    sqlx::query("DELETE FROM outbox WHERE seq = $1").bind(row.seq).execute(&mut *tx).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(settled)
    }

    async fn list_dead_letters(&self, limit: i64) -> Result<Vec<DeadLetter>, StoreError> {
        Sql::list_dead_letters(self.pool(), limit).await
    }

    async fn replay_dead_letter(&self, seq: i64) -> Result<Option<i32>, StoreError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let partition: Option<i32> = sqlx::query_scalar(&format!(
            "INSERT INTO outbox ({MOVE_COLUMNS}, next_attempt_at)
             SELECT {MOVE_COLUMNS}, $2 FROM outbox_dead_letter WHERE seq = $1 RETURNING partition"
        ))
        .bind(seq)
        .bind(Utc::now())
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM outbox_dead_letter WHERE seq = $1").bind(seq).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(partition)
    }

    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let (counted, span, oldest, dead_letters): (i64, Option<i64>, Option<DateTime<Utc>>, i64) =
            sqlx::query_as(OUTBOX_STATS).bind(PENDING_EXACT_UP_TO + 1).fetch_one(self.pool()).await?;
        Ok(outbox_stats(counted, span, oldest, dead_letters))
    }

    async fn repartition(&self, partitions: i32) -> Result<u64, StoreError> {
        if !(1..=1024).contains(&partitions) {
            return Err(StoreError::Other(anyhow!("partitions must be between 1 and 1024")));
        }
        // The write lock keeps the (single) service process out while rows move.
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT aggregate_id FROM outbox UNION SELECT aggregate_id FROM outbox_dead_letter",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut moved = 0;
        for id in &ids {
            for table in ["outbox", "outbox_dead_letter"] {
                let sql =
                    format!("UPDATE {table} SET partition = $1 WHERE aggregate_id = $2 AND partition <> $1");
                moved += sqlx::query(&sql)
                    .bind(partition_of(id, partitions))
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
        }
        sqlx::query(
            "INSERT INTO outbox_meta (singleton, partitions) VALUES (1, $1)
             ON CONFLICT (singleton) DO UPDATE SET partitions = excluded.partitions",
        )
        .bind(partitions)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(moved)
    }
}
