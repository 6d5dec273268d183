//! SQLite adapter: the embedded default, so `cargo run` needs no database server. One
//! process owns the file; write transactions take the write lock up front (`BEGIN
//! IMMEDIATE`) so concurrent writers queue on the busy timeout instead of failing with
//! SQLITE_BUSY halfway through.

use std::str::FromStr;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    Sqlite, SqlitePool,
    migrate::Migrator,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::{IdempotentOrder, ORDER_COLUMNS, Store, StoreError, Tx};

/// The portable statements, for this database.
type Sql = super::Sql<Sqlite>;
use crate::{
    config::DatabaseSettings,
    domain::{ListQuery, Order, OrderId},
    inbox::Rejection,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and its directory.
    pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(settings.url.expose())
            .context("APP_DATABASE__URL is not a valid sqlite URL")?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(settings.statement_timeout);
        if let Some(dir) = options.get_filename().parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating database directory {}", dir.display()))?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(options)
            .await
            .context("opening the sqlite database")?;
        Ok(Self { pool })
    }

    pub(super) fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn begin(&self) -> Result<Box<dyn Tx>, StoreError> {
        Ok(Box::new(SqliteTx(self.pool.begin_with("BEGIN IMMEDIATE").await?)))
    }

    async fn get_order(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = ?1");
        let row = sqlx::query(&sql).bind(id.as_uuid()).fetch_optional(&self.pool).await?;
        row.as_ref().map(Sql::decode_order).transpose()
    }

    async fn list_orders(&self, query: &ListQuery) -> Result<Vec<Order>, StoreError> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2"
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
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
        )
        .fetch_one(&self.pool)
        .await?;
        if !exists {
            return Ok(false);
        }
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&self.pool)
            .await?;
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

    async fn migrate(&self) -> anyhow::Result<()> {
        MIGRATOR.run(&self.pool).await.context("running sqlite migrations")
    }
}

sql_tx!(SqliteTx, Sqlite, "");
