//! The outbox on PostgreSQL: partition leases shared by every replica's relay. Lease
//! expiry uses the database clock, so replicas' clocks need not agree.
//!
//! A pass costs the same few round trips whatever the number of partitions: one
//! [`fetch_due`] statement (in a read-only transaction that pins its plan, see
//! [`FETCH_DUE_BEGIN`]), the broker round, one [`settle`] statement; the relay overlaps the
//! broker round of one pass with the fetch of the next. Leases are renewed
//! every third of their TTL, just after another relay's membership expires, and at once
//! when membership changes (a `rebalance` notification).
//!
//! [`fetch_due`]: OutboxStore::fetch_due
//! [`settle`]: OutboxStore::settle

use std::{sync::LazyLock, time::Duration};

use anyhow::anyhow;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{
    PostgresStore, StoreError,
    sql::{OUTBOX_COLUMNS, OUTBOX_STATS, PENDING_EXACT_UP_TO, due_head, outbox_stats},
};

/// The portable statements, for this database.
type Sql = super::Sql<sqlx::Postgres>;
use crate::outbox::{
    DeadLetter, Lease, Membership, OutboxRecord, OutboxStats, OutboxStore, PartitionMismatch, RelayIdentity,
    Settle, Settled, Settlement, notify, partition_of,
};

/// How many partitions the relay at `index` (0-based, in owner order) of `live` relays
/// should own: `P / live`, plus one for the first `P % live` relays.
pub(super) fn fair_share(partitions: i32, live: usize, index: usize) -> usize {
    let (p, n) = (partitions.max(0) as usize, live.max(1));
    p / n + usize::from(index < p % n)
}

/// How the relay's fetch transaction begins. With the statistics of a nearly empty outbox
/// (analyzed before a backlog grew faster than autovacuum re-analyzes it, e.g. during a
/// broker outage at a high write rate), the planner reads each partition whole and sorts it
/// on every pass: measured 728 ms instead of 23 ms per pass at 100,000 rows. The index on
/// `(partition, seq)` already yields each partition in order, so forbidding the sort makes
/// the plan independent of statistics. `SET LOCAL` ends with the transaction, so it is safe
/// behind PgBouncer in transaction mode; one simple-protocol round trip with the `BEGIN`.
pub const FETCH_DUE_BEGIN: &str = "BEGIN READ ONLY; SET LOCAL enable_sort = off";

/// The relay's fetch: the first `$2` due rows (`$3` = now) of each partition in `$1` whose
/// aggregate has no event in flight (`$4`, the aggregate ids of earlier passes' batches not
/// settled yet), built once (every pass runs it). `NOT IN (SELECT unnest(…))` is planned as
/// one hashed subplan per statement: a hash probe per row, not a scan of the array. Public
/// so tests can `EXPLAIN` exactly what the relay runs.
pub fn fetch_due_sql() -> &'static str {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT o.* FROM unnest($1::int[]) AS p(partition)
             CROSS JOIN LATERAL (
                SELECT {OUTBOX_COLUMNS} FROM outbox o
                WHERE o.partition = p.partition AND o.aggregate_id NOT IN (SELECT unnest($4::text[])) AND {}
                ORDER BY o.seq LIMIT $2
             ) o",
            due_head("$3")
        )
    });
    &SQL
}

/// Settlement kinds as the settle statement encodes them.
const PUBLISHED: i16 = 0;
const RETRY: i16 = 1;
const DEAD: i16 = 2;

/// Deletes published rows, reschedules retried ones and moves dead letters, each only in a
/// partition `$1` still holds with the epoch given for it (`$2`, `$3`).
const SETTLE: &str = "
WITH held AS (
    SELECT l.partition FROM outbox_lease l
    JOIN unnest($2::int[], $3::bigint[]) AS h(partition, epoch)
      ON h.partition = l.partition AND h.epoch = l.epoch
    WHERE l.owner = $1 AND l.expires_at > now()
),
s AS (SELECT * FROM unnest($4::bigint[], $5::smallint[], $6::text[], $7::timestamptz[])
                 AS s(seq, kind, error, next_attempt_at)),
published AS (
    DELETE FROM outbox o USING s
    WHERE o.seq = s.seq AND s.kind = 0 AND o.partition IN (SELECT partition FROM held)
    RETURNING o.seq
),
retried AS (
    UPDATE outbox o SET attempts = o.attempts + 1, last_error = s.error, next_attempt_at = s.next_attempt_at
    FROM s WHERE o.seq = s.seq AND s.kind = 1 AND o.partition IN (SELECT partition FROM held)
    RETURNING o.seq
),
dead AS (
    DELETE FROM outbox o USING s
    WHERE o.seq = s.seq AND s.kind = 2 AND o.partition IN (SELECT partition FROM held)
    RETURNING o.*, s.error AS dead_error
),
buried AS (
    INSERT INTO outbox_dead_letter (seq, message_id, partition, aggregate_type, aggregate_id, event_type,
                                    payload, traceparent, tracestate, created_at, attempts, error)
    SELECT seq, message_id, partition, aggregate_type, aggregate_id, event_type,
           payload, traceparent, tracestate, created_at, attempts + 1, dead_error FROM dead
    RETURNING seq
)
SELECT (SELECT count(*) FROM published), (SELECT count(*) FROM retried), (SELECT count(*) FROM buried)";

impl PostgresStore {
    /// Records `partitions` if no P is recorded yet, then compares with the recorded one,
    /// share-locked so a concurrent repartition waits for us (and we for it).
    async fn check_partitions(
        tx: &mut Transaction<'static, Postgres>,
        partitions: i32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO outbox_meta (singleton, partitions) VALUES (true, $1) ON CONFLICT DO NOTHING",
        )
        .bind(partitions)
        .execute(&mut **tx)
        .await?;
        let stored: Option<i32> = sqlx::query_scalar("SELECT partitions FROM outbox_meta FOR SHARE")
            .fetch_optional(&mut **tx)
            .await?;
        match stored {
            Some(stored) if stored != partitions => {
                Err(StoreError::Other(PartitionMismatch { configured: partitions, stored }.into()))
            }
            _ => Ok(()),
        }
    }

    /// Heartbeats `relay`; `Ok(true)` when it joined (new, or taking over an expired id).
    async fn heartbeat(
        tx: &mut Transaction<'static, Postgres>,
        relay: &RelayIdentity,
        ttl_secs: f64,
    ) -> Result<bool, StoreError> {
        let existing: Option<(Option<Uuid>, bool)> = sqlx::query_as(
            "SELECT instance, expires_at > now() FROM outbox_relay WHERE owner = $1 FOR UPDATE",
        )
        .bind(&relay.owner)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some((Some(instance), true)) = existing
            && instance != relay.instance
        {
            return Err(StoreError::Other(anyhow!(
                "relay id {:?} is held by another live process; give each replica its own \
                 APP_OUTBOX__RELAY_ID (or leave it empty to generate one)",
                relay.owner
            )));
        }
        sqlx::query(
            "INSERT INTO outbox_relay (owner, instance, expires_at) VALUES ($1, $2, now() + make_interval(secs => $3))
             ON CONFLICT (owner) DO UPDATE SET instance = excluded.instance, expires_at = excluded.expires_at",
        )
        .bind(&relay.owner)
        .bind(relay.instance)
        .bind(ttl_secs)
        .execute(&mut **tx)
        .await?;
        Ok(!matches!(existing, Some((Some(i), true)) if i == relay.instance))
    }

    /// Tells every relay's listener that membership changed, at commit.
    async fn announce_rebalance(tx: &mut Transaction<'static, Postgres>) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(notify::CHANNEL)
            .bind(notify::REBALANCE)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl OutboxStore for PostgresStore {
    async fn ensure_partitions(&self, partitions: i32) -> Result<(), StoreError> {
        let mut tx = self.begin_shielded().await?;
        Self::check_partitions(&mut tx, partitions).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn acquire_partitions(
        &self,
        relay: &RelayIdentity,
        partitions: i32,
        ttl: Duration,
    ) -> Result<Membership, StoreError> {
        let ttl_secs = ttl.as_secs_f64();
        let owner = relay.owner.as_str();
        let mut tx = self.begin_shielded().await?;
        Self::check_partitions(&mut tx, partitions).await?;
        let joined = Self::heartbeat(&mut tx, relay, ttl_secs).await?;
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
        let members: Vec<(String, f64)> = sqlx::query_as(
            "SELECT owner, extract(epoch FROM expires_at - now())::float8 FROM outbox_relay
             WHERE expires_at > now() ORDER BY owner",
        )
        .fetch_all(&mut *tx)
        .await?;
        let next_expiry = members
            .iter()
            .filter(|(o, _)| o != owner)
            .map(|(_, left)| *left)
            .min_by(f64::total_cmp)
            .map(|left| Duration::from_secs_f64(left.max(0.0)));
        let live: Vec<String> = members.into_iter().map(|(o, _)| o).collect();
        let index = live.iter().position(|o| o == owner).unwrap_or(live.len());
        let target = fair_share(partitions, live.len(), index);

        let held = |o: &Option<String>, live: bool| live && o.as_deref() == Some(owner);
        let mut mine: Vec<i32> = leases.iter().filter(|(_, o, l)| held(o, *l)).map(|(p, _, _)| *p).collect();
        let release = if mine.len() > target { mine.split_off(target) } else { Vec::new() };
        if mine.len() < target {
            let free = leases.iter().filter(|(_, o, live)| o.is_none() || !live);
            let wanted = target - mine.len();
            mine.extend(free.take(wanted).map(|(p, _, _)| *p));
        }
        sqlx::query(
            "UPDATE outbox_lease SET owner = NULL, expires_at = '-infinity' WHERE partition = ANY($1)",
        )
        .bind(&release)
        .execute(&mut *tx)
        .await?;
        // A partition changing hands (or coming back after a lapse) starts a new epoch.
        let mut held: Vec<(i32, i64)> = sqlx::query_as(
            "UPDATE outbox_lease
                SET epoch = CASE WHEN owner = $2 AND expires_at > now() THEN epoch ELSE epoch + 1 END,
                    owner = $2, expires_at = now() + make_interval(secs => $3)
              WHERE partition = ANY($1)
             RETURNING partition, epoch",
        )
        .bind(&mine)
        .bind(owner)
        .bind(ttl_secs)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM outbox_relay WHERE expires_at < now() - interval '1 hour'")
            .execute(&mut *tx)
            .await?;
        if joined || !release.is_empty() {
            Self::announce_rebalance(&mut tx).await?;
        }
        tx.commit().await?;
        held.sort_unstable();
        Ok(Membership {
            leases: held.into_iter().map(|(partition, epoch)| Lease { partition, epoch }).collect(),
            live_relays: live.len(),
            fair_share: target,
            next_expiry,
        })
    }

    async fn release_partitions(&self, relay: &RelayIdentity) -> Result<(), StoreError> {
        let mut tx = self.begin_shielded().await?;
        let mine: Option<i32> =
            sqlx::query_scalar("DELETE FROM outbox_relay WHERE owner = $1 AND instance = $2 RETURNING 1")
                .bind(&relay.owner)
                .bind(relay.instance)
                .fetch_optional(&mut *tx)
                .await?;
        if mine.is_some() {
            sqlx::query("UPDATE outbox_lease SET owner = NULL, expires_at = '-infinity' WHERE owner = $1")
                .bind(&relay.owner)
                .execute(&mut *tx)
                .await?;
            Self::announce_rebalance(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn fetch_due(
        &self,
        partitions: &[i32],
        per_partition: i64,
        now: DateTime<Utc>,
        in_flight: &[&str],
    ) -> Result<Vec<OutboxRecord>, StoreError> {
        let mut tx = self.begin_shielded_with(FETCH_DUE_BEGIN.to_owned()).await?;
        let rows = sqlx::query(fetch_due_sql())
            .bind(partitions)
            .bind(per_partition)
            .bind(now)
            .bind(in_flight)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        rows.iter().map(Sql::decode_outbox).collect()
    }

    async fn settle(
        &self,
        owner: &str,
        leases: &[Lease],
        rows: &[Settlement],
    ) -> Result<Settled, StoreError> {
        if rows.is_empty() {
            return Ok(Settled::default());
        }
        let now = Utc::now();
        let (mut seqs, mut kinds, mut errors, mut next) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for row in rows {
            let (kind, error, at) = match &row.outcome {
                Settle::Published => (PUBLISHED, None, now),
                Settle::Retry { error, next_attempt_at } => (RETRY, Some(error.as_str()), *next_attempt_at),
                Settle::DeadLetter { error } => (DEAD, Some(error.as_str()), now),
            };
            seqs.push(row.seq);
            kinds.push(kind);
            errors.push(error);
            next.push(at);
        }
        let (partitions, epochs): (Vec<i32>, Vec<i64>) =
            leases.iter().map(|l| (l.partition, l.epoch)).unzip();
        let (published, retried, dead_lettered): (i64, i64, i64) = sqlx::query_as(SETTLE)
            .bind(owner)
            .bind(&partitions)
            .bind(&epochs)
            .bind(&seqs)
            .bind(&kinds)
            .bind(&errors)
            .bind(&next)
            .fetch_one(self.pool())
            .await?;
        Ok(Settled {
            published: published as u64,
            retried: retried as u64,
            dead_lettered: dead_lettered as u64,
        })
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
        let (counted, span, oldest, dead_letters): (i64, Option<i64>, Option<DateTime<Utc>>, i64) =
            sqlx::query_as(OUTBOX_STATS).bind(PENDING_EXACT_UP_TO + 1).fetch_one(self.pool()).await?;
        Ok(outbox_stats(counted, span, oldest, dead_letters))
    }

    async fn repartition(&self, partitions: i32) -> Result<u64, StoreError> {
        let mut tx = self.begin_shielded().await?;
        sqlx::query("SELECT partitions FROM outbox_meta FOR UPDATE").fetch_optional(&mut *tx).await?;
        let live: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_relay WHERE expires_at > now()")
            .fetch_one(&mut *tx)
            .await?;
        if live > 0 {
            return Err(StoreError::Other(anyhow!(
                "{live} relay(s) are live: stop every replica (e.g. scale the Deployment to 0) before repartitioning"
            )));
        }
        // Writers with the old P wait here, then fail their insert against the new P.
        sqlx::query("LOCK TABLE outbox, outbox_dead_letter IN EXCLUSIVE MODE").execute(&mut *tx).await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT aggregate_id FROM outbox UNION SELECT aggregate_id FROM outbox_dead_letter",
        )
        .fetch_all(&mut *tx)
        .await?;
        let targets: Vec<i32> = ids.iter().map(|id| partition_of(id, partitions)).collect();
        let mut moved = 0;
        for table in ["outbox", "outbox_dead_letter"] {
            let sql = format!(
                "UPDATE {table} t SET partition = u.partition FROM unnest($1::text[], $2::int[]) AS u(id, partition)
                 WHERE t.aggregate_id = u.id AND t.partition <> u.partition"
            );
            moved += sqlx::query(&sql).bind(&ids).bind(&targets).execute(&mut *tx).await?.rows_affected();
        }
        sqlx::query("DELETE FROM outbox_lease WHERE partition >= $1")
            .bind(partitions)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO outbox_meta (singleton, partitions) VALUES (true, $1)
             ON CONFLICT (singleton) DO UPDATE SET partitions = excluded.partitions",
        )
        .bind(partitions)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(moved)
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
