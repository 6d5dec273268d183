//! PostgreSQL adapter: the production store, shared by every replica.

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    ConnectOptions, PgPool, Postgres, Transaction,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{IdempotentOrder, ORDER_COLUMNS, Store, StoreError, Tx};

/// The portable statements, for this database.
type Sql = super::Sql<Postgres>;
use crate::{
    config::DatabaseSettings,
    domain::{ListQuery, Order, OrderId},
    inbox::Rejection,
    resilience::inbound,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The PostgreSQL store: one pool, for one role.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// How long `migrate` waits for a lock (another replica migrating, a long transaction
    /// on a table a migration alters) before failing with a message naming the holders.
    migration_lock_timeout: Duration,
    /// The pool's statement timeout; a nearer request deadline replaces it per transaction.
    statement_timeout: Duration,
}

impl PostgresStore {
    /// Builds a lazily connecting pool of at most `max_connections`, named
    /// `orders-service/<role>` in `pg_stat_activity`: the service starts (and reports
    /// unready) while the database is still coming up, instead of crash-looping.
    pub fn connect(settings: &DatabaseSettings, role: &str, max_connections: u32) -> anyhow::Result<Self> {
        let statement_timeout = format!("{}ms", settings.statement_timeout.as_millis());
        let options = PgConnectOptions::from_str(settings.url.expose())
            .context("APP_DATABASE__URL is not a valid postgres URL")?
            .application_name(&format!("orders-service/{role}"))
            .options([
                ("statement_timeout", statement_timeout.as_str()),
                // Every transaction here lasts milliseconds: a session idle inside one for
                // this long is stuck, and the server ends it (releasing its locks).
                ("idle_in_transaction_session_timeout", "30s"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            migration_lock_timeout: settings.migration_lock_timeout,
            statement_timeout: settings.statement_timeout,
        })
    }

    /// The underlying pool, for tests and metrics.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `BEGIN`, protected from cancellation. sqlx 0.8.6 (and 0.9.0) return a connection to the
    /// pool inside an open server-side transaction when the future of `Pool::begin` is
    /// dropped during the `BEGIN` round trip (transact-rs/sqlx#4393); the next borrower's
    /// statements then run, and hold locks, inside that stale transaction. A client
    /// disconnecting or a request deadline firing is exactly such a drop, so the `BEGIN` runs
    /// in its own task: if the caller goes away, the task still finishes and its dropped
    /// `Transaction` rolls back properly. Found by `scripts/bench.sh` (relay deletes blocked
    /// behind a stale transaction after wrk closed its connections).
    pub(super) async fn begin_shielded(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.begin_shielded_with(self.begin_statement()).await
    }

    /// [`PostgresStore::begin_shielded`] with its own `BEGIN` statement (it may carry
    /// `SET LOCAL`s, sent in the same round trip).
    pub(super) async fn begin_shielded_with(
        &self,
        begin: String,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        let pool = self.pool.clone();
        match tokio::spawn(async move { pool.begin_with(begin).await }).await {
            Ok(result) => Ok(result?),
            Err(e) => Err(StoreError::Other(anyhow::Error::new(e).context("BEGIN task failed"))),
        }
    }

    /// `BEGIN`, and when the request being served has a deadline nearer than the pool's
    /// statement timeout, `SET LOCAL statement_timeout` to what is left of it (plus a small
    /// margin, so the caller's own timeout answers first), in the same round trip: a
    /// statement nobody waits for any more is cancelled by the server.
    fn begin_statement(&self) -> String {
        const MARGIN: Duration = Duration::from_millis(50);
        let remaining = inbound::deadline().map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
        match remaining.map(|left| left + MARGIN) {
            Some(limit) if limit < self.statement_timeout => {
                format!("BEGIN; SET LOCAL statement_timeout = {}", limit.as_millis())
            }
            _ => "BEGIN".to_owned(),
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn begin(&self) -> Result<Box<dyn Tx>, StoreError> {
        Ok(Box::new(PgTx(self.begin_shielded().await?)))
    }

    #[tracing::instrument(name = "SELECT orders", skip_all, fields(otel.kind = "client", db.system.name = "postgresql",
        db.operation.name = "SELECT", db.collection.name = "orders"))]
    async fn get_order(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1");
        let row = sqlx::query(&sql).bind(id.as_uuid()).fetch_optional(&self.pool).await?;
        row.as_ref().map(Sql::decode_order).transpose()
    }

    #[tracing::instrument(name = "SELECT orders", skip_all, fields(otel.kind = "client", db.system.name = "postgresql",
        db.operation.name = "SELECT", db.collection.name = "orders"))]
    async fn list_orders(&self, query: &ListQuery) -> Result<Vec<Order>, StoreError> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE ($1::uuid IS NULL OR id < $1) ORDER BY id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(query.after.map(|t| t.after.as_uuid()))
            .bind(i64::from(query.page_size) + 1)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Sql::decode_order).collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn migrations_applied(&self) -> Result<bool, StoreError> {
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&self.pool)
            .await
            .or_else(|e| match &e {
                // 42P01 undefined_table: nothing has been migrated yet.
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(Vec::new()),
                _ => Err(e),
            })?;
        Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
    }

    async fn customer_display_name(&self, customer_id: &str) -> Result<Option<String>, StoreError> {
        Sql::customer_display_name(&self.pool, customer_id).await
    }

    async fn purge_inbox(&self, older_than: DateTime<Utc>, limit: i64) -> Result<u64, StoreError> {
        Sql::purge_inbox(&self.pool, older_than, limit).await
    }

    async fn list_rejections(&self, limit: i64) -> Result<Vec<Rejection>, StoreError> {
        Sql::list_rejections(&self.pool, limit).await
    }

    async fn find_by_idempotency_key(&self, key: &str) -> Result<Option<IdempotentOrder>, StoreError> {
        Sql::find_by_idempotency_key(&self.pool, key).await
    }

    async fn release_idempotency_key(&self, key: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        Sql::release_idempotency_key(&self.pool, key, now).await
    }

    /// Runs on a connection of its own without the pool's statement timeout (a big
    /// `CREATE INDEX` may take minutes, and waiting behind another replica's migration is
    /// normal), but with a lock timeout that names what it waited for.
    async fn migrate(&self) -> anyhow::Result<()> {
        let lock_timeout = format!("{}ms", self.migration_lock_timeout.as_millis());
        let options = (*self.pool.connect_options())
            .clone()
            .application_name("orders-service/migrate")
            .options([("statement_timeout", "0"), ("lock_timeout", lock_timeout.as_str())]);
        let mut conn = options.connect().await.context("connecting to run migrations")?;
        let result = MIGRATOR.run_direct(&mut conn).await;
        let Err(e) = result else { return Ok(()) };
        let lock_timed_out = matches!(&e, sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("55P03"));
        if !lock_timed_out {
            return Err(anyhow::Error::new(e).context("running postgres migrations"));
        }
        let holders: Vec<(i32, String, String, String)> = sqlx::query_as(
            "SELECT DISTINCT a.pid, a.application_name, coalesce(a.state, ''), left(coalesce(a.query, ''), 120)
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.granted AND a.datname = current_database() AND a.pid <> pg_backend_pid()
               AND l.locktype IN ('advisory', 'relation')
             ORDER BY a.pid LIMIT 5",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
        let holders: Vec<String> = holders
            .iter()
            .map(|(pid, app, state, query)| format!("pid {pid} ({app}, {state}): {query}"))
            .collect();
        Err(anyhow::Error::new(e).context(format!(
            "migrations waited longer than APP_DATABASE__MIGRATION_LOCK_TIMEOUT_MS ({lock_timeout}) for a lock \
             (another replica migrating, or a long transaction on a table being altered); sessions holding \
             locks: {}",
            if holders.is_empty() { "none found".to_owned() } else { holders.join("; ") }
        )))
    }
}

sql_tx!(PgTx, Postgres, " FOR UPDATE");
