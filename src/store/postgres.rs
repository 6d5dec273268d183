//! PostgreSQL adapter: the production store, shared by every replica.

use std::str::FromStr;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    PgPool, Postgres, Transaction,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{IdempotentOrder, ORDER_COLUMNS, STATEMENT_TIMEOUT, Store, StoreError, Tx};

/// The portable statements, for this database.
type Sql = super::Sql<Postgres>;
use crate::{
    config::DatabaseSettings,
    domain::{ListQuery, Order, OrderId},
    inbox::Rejection,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Builds a lazily connecting pool: the service starts (and reports unready) while the
    /// database is still coming up, instead of crash-looping.
    pub fn connect(settings: &DatabaseSettings) -> anyhow::Result<Self> {
        let statement_timeout = format!("{}ms", STATEMENT_TIMEOUT.as_millis());
        let options = PgConnectOptions::from_str(settings.url.expose())
            .context("APP_DATABASE__URL is not a valid postgres URL")?
            .application_name("orders-service")
            .options([
                ("statement_timeout", statement_timeout.as_str()),
                // Every transaction here lasts milliseconds: a session idle inside one for
                // this long is stuck, and the server ends it (releasing its locks).
                ("idle_in_transaction_session_timeout", "30s"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options);
        Ok(Self { pool })
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
        let pool = self.pool.clone();
        match tokio::spawn(async move { pool.begin().await }).await {
            Ok(result) => Ok(result?),
            Err(e) => Err(StoreError::Other(anyhow::Error::new(e).context("BEGIN task failed"))),
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn begin(&self) -> Result<Box<dyn Tx>, StoreError> {
        Ok(Box::new(PgTx(self.begin_shielded().await?)))
    }

    async fn get_order(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1");
        let row = sqlx::query(&sql).bind(id.as_uuid()).fetch_optional(&self.pool).await?;
        row.as_ref().map(Sql::decode_order).transpose()
    }

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

    async fn release_idempotency_key(&self, key: &str) -> Result<(), StoreError> {
        Sql::release_idempotency_key(&self.pool, key).await
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        MIGRATOR.run(&self.pool).await.context("running postgres migrations")
    }
}

sql_tx!(PgTx, Postgres, " FOR UPDATE");
