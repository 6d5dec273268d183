//! The outbox on SQLite. SQLite serves exactly one process, so that process's relay owns
//! every partition and no leases are needed; ordering, retries and dead-lettering behave
//! as on PostgreSQL.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{SqliteStore, StoreError};

/// The portable statements, for this database.
type Sql = super::Sql<sqlx::Sqlite>;
use crate::outbox::{DeadLetter, OutboxRecord, OutboxStats, OutboxStore};

const MOVE_COLUMNS: &str = "seq, message_id, partition, aggregate_type, aggregate_id, event_type, payload, traceparent, tracestate, created_at";

#[async_trait]
impl OutboxStore for SqliteStore {
    async fn acquire_partitions(
        &self,
        _owner: &str,
        partitions: i32,
        _ttl: Duration,
    ) -> Result<Vec<i32>, StoreError> {
        Ok((0..partitions).collect())
    }

    async fn release_partitions(&self, _owner: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn fetch_batch(&self, partition: i32, limit: i64) -> Result<Vec<OutboxRecord>, StoreError> {
        Sql::fetch_batch(self.pool(), partition, limit).await
    }

    async fn delete_published(&self, _owner: &str, partition: i32, seqs: &[i64]) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let mut deleted = 0;
        for seq in seqs {
            let result = sqlx::query("DELETE FROM outbox WHERE seq = $1 AND partition = $2")
                .bind(seq)
                .bind(partition)
                .execute(&mut *tx)
                .await?;
            deleted += result.rows_affected();
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn record_failure(&self, seq: i64, error: &str, retry_in: Duration) -> Result<(), StoreError> {
        Sql::record_failure(self.pool(), seq, error, retry_in).await
    }

    async fn dead_letter(
        &self,
        _owner: &str,
        partition: i32,
        seq: i64,
        error: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let moved = sqlx::query(&format!(
            "INSERT INTO outbox_dead_letter ({MOVE_COLUMNS}, attempts, error, dead_at)
             SELECT {MOVE_COLUMNS}, attempts + 1, $3, $4 FROM outbox WHERE seq = $1 AND partition = $2"
        ))
        .bind(seq)
        .bind(partition)
        .bind(error)
        .bind(Utc::now())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM outbox WHERE seq = $1").bind(seq).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(moved == 1)
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
        let (pending, oldest, dead_letters): (i64, Option<DateTime<Utc>>, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox), (SELECT min(created_at) FROM outbox),
                    (SELECT count(*) FROM outbox_dead_letter)",
        )
        .fetch_one(self.pool())
        .await?;
        let oldest_age_seconds = oldest.map_or(0.0, |t| (Utc::now() - t).as_seconds_f64().max(0.0));
        Ok(OutboxStats { pending, oldest_age_seconds, dead_letters })
    }
}
