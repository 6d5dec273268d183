//! The outbox on PostgreSQL: partition leases shared by every replica's relay. Lease
//! expiry uses the database clock, so replicas' clocks need not agree.

use std::time::Duration;

use async_trait::async_trait;

use super::{PostgresStore, StoreError};

/// The portable statements, for this database.
type Sql = super::Sql<sqlx::Postgres>;
use crate::outbox::{DeadLetter, OutboxRecord, OutboxStats, OutboxStore};

/// "`owner` still holds `partition`" as a SQL condition on parameters `$2` (partition) and
/// `$3` (owner): every destructive relay statement carries it.
const LEASE_HELD: &str =
    "EXISTS (SELECT 1 FROM outbox_lease l WHERE l.partition = $2 AND l.owner = $3 AND l.expires_at > now())";

/// How many partitions the relay at `index` (0-based, in owner order) of `live` relays
/// should own: `P / live`, plus one for the first `P % live` relays.
pub(super) fn fair_share(partitions: i32, live: usize, index: usize) -> usize {
    let (p, n) = (partitions.max(0) as usize, live.max(1));
    p / n + usize::from(index < p % n)
}

#[async_trait]
impl OutboxStore for PostgresStore {
    async fn acquire_partitions(
        &self,
        owner: &str,
        partitions: i32,
        ttl: Duration,
    ) -> Result<Vec<i32>, StoreError> {
        let ttl_secs = ttl.as_secs_f64();
        let mut tx = self.begin_shielded().await?;
        sqlx::query(
            "INSERT INTO outbox_relay (owner, expires_at) VALUES ($1, now() + make_interval(secs => $2))
             ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .bind(owner)
        .bind(ttl_secs)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO outbox_lease (partition) SELECT generate_series(0, $1 - 1) ON CONFLICT DO NOTHING",
        )
        .bind(partitions)
        .execute(&mut *tx)
        .await?;
        // Locking every lease row serializes rebalancing between relays (P rows, every few seconds).
        let leases: Vec<(i32, Option<String>, bool)> = sqlx::query_as(
            "SELECT partition, owner, expires_at > now() FROM outbox_lease
             WHERE partition < $1 ORDER BY partition FOR UPDATE",
        )
        .bind(partitions)
        .fetch_all(&mut *tx)
        .await?;
        let live: Vec<String> =
            sqlx::query_scalar("SELECT owner FROM outbox_relay WHERE expires_at > now() ORDER BY owner")
                .fetch_all(&mut *tx)
                .await?;
        let index = live.iter().position(|o| o == owner).unwrap_or(live.len());
        let target = fair_share(partitions, live.len(), index);

        let mut mine: Vec<i32> =
            leases.iter().filter(|(_, o, _)| o.as_deref() == Some(owner)).map(|(p, _, _)| *p).collect();
        let release = if mine.len() > target { mine.split_off(target) } else { Vec::new() };
        if mine.len() < target {
            let free =
                leases.iter().filter(|(_, o, live)| o.as_deref() != Some(owner) && (o.is_none() || !live));
            let wanted = target - mine.len();
            mine.extend(free.take(wanted).map(|(p, _, _)| *p));
        }
        sqlx::query(
            "UPDATE outbox_lease SET owner = NULL, expires_at = '-infinity' WHERE partition = ANY($1)",
        )
        .bind(&release)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE outbox_lease SET owner = $2, expires_at = now() + make_interval(secs => $3) WHERE partition = ANY($1)",
        )
        .bind(&mine)
        .bind(owner)
        .bind(ttl_secs)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM outbox_relay WHERE expires_at < now() - interval '1 hour'")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        mine.sort_unstable();
        Ok(mine)
    }

    async fn release_partitions(&self, owner: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_shielded().await?;
        sqlx::query("UPDATE outbox_lease SET owner = NULL, expires_at = '-infinity' WHERE owner = $1")
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM outbox_relay WHERE owner = $1").bind(owner).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn fetch_batch(&self, partition: i32, limit: i64) -> Result<Vec<OutboxRecord>, StoreError> {
        Sql::fetch_batch(self.pool(), partition, limit).await
    }

    async fn delete_published(&self, owner: &str, partition: i32, seqs: &[i64]) -> Result<u64, StoreError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let sql = format!("DELETE FROM outbox WHERE seq = ANY($1) AND partition = $2 AND {LEASE_HELD}");
        let result = sqlx::query(&sql).bind(seqs).bind(partition).bind(owner).execute(self.pool()).await?;
        Ok(result.rows_affected())
    }

    async fn record_failure(&self, seq: i64, error: &str, retry_in: Duration) -> Result<(), StoreError> {
        Sql::record_failure(self.pool(), seq, error, retry_in).await
    }

    async fn dead_letter(
        &self,
        owner: &str,
        partition: i32,
        seq: i64,
        error: &str,
    ) -> Result<bool, StoreError> {
        let sql = format!(
            "WITH moved AS (DELETE FROM outbox WHERE seq = $1 AND partition = $2 AND {LEASE_HELD} RETURNING *)
             INSERT INTO outbox_dead_letter (seq, message_id, partition, aggregate_type, aggregate_id, event_type,
                                             payload, traceparent, tracestate, created_at, attempts, error)
             SELECT seq, message_id, partition, aggregate_type, aggregate_id, event_type,
                    payload, traceparent, tracestate, created_at, attempts + 1, $4 FROM moved"
        );
        let result =
            sqlx::query(&sql).bind(seq).bind(partition).bind(owner).bind(error).execute(self.pool()).await?;
        Ok(result.rows_affected() == 1)
    }

    async fn list_dead_letters(&self, limit: i64) -> Result<Vec<DeadLetter>, StoreError> {
        Sql::list_dead_letters(self.pool(), limit).await
    }

    async fn replay_dead_letter(&self, seq: i64) -> Result<Option<i32>, StoreError> {
        let partition = sqlx::query_scalar(
            "WITH moved AS (DELETE FROM outbox_dead_letter WHERE seq = $1 RETURNING *)
             INSERT INTO outbox (seq, message_id, partition, aggregate_type, aggregate_id, event_type, payload,
                                 traceparent, tracestate, created_at)
             SELECT seq, message_id, partition, aggregate_type, aggregate_id, event_type, payload,
                    traceparent, tracestate, created_at FROM moved
             RETURNING partition",
        )
        .bind(seq)
        .fetch_optional(self.pool())
        .await?;
        Ok(partition)
    }

    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let (pending, oldest_age_seconds, dead_letters): (i64, f64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox),
                    COALESCE(EXTRACT(EPOCH FROM now() - (SELECT min(created_at) FROM outbox))::float8, 0),
                    (SELECT count(*) FROM outbox_dead_letter)",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(OutboxStats { pending, oldest_age_seconds: oldest_age_seconds.max(0.0), dead_letters })
    }
}

#[cfg(test)]
mod tests {
    use super::fair_share;

    #[test]
    fn shares_differ_by_at_most_one_and_cover_every_partition() {
        for partitions in [1, 7, 16, 64] {
            for live in 1..=9 {
                let shares: Vec<usize> = (0..live).map(|i| fair_share(partitions, live, i)).collect();
                assert_eq!(shares.iter().sum::<usize>(), partitions as usize);
                assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
            }
        }
    }
}
