//! The storage port's conformance suite: every adapter must pass every case. A macro
//! instantiates each case once per backend, so a new case covers both automatically.

use std::sync::Arc;

use chrono::{SubsecRound, Utc};
use orders_service::{
    config::DatabaseSettings,
    domain::{LineItemDraft, ListQuery, NewOrder, Order, OrderDraft, OrderId, OrderStatus, PageToken},
    store::{self, KeyBinding, Store, StoreError},
};

use crate::support::{Backend, fresh_postgres, settings};

/// A migrated, empty store of the given kind (the temp dir keeps a SQLite file alive).
pub async fn store(backend: Backend) -> (Arc<dyn Store>, Option<tempfile::TempDir>) {
    let (store, dir, _) = store_with_url(backend).await;
    (store, dir)
}

/// Like [`store`], and also returns the database URL.
pub async fn store_with_url(backend: Backend) -> (Arc<dyn Store>, Option<tempfile::TempDir>, String) {
    let (url, dir) = match backend {
        Backend::Postgres => (fresh_postgres().await, None),
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            (format!("sqlite://{}/conformance.db", dir.path().display()), Some(dir))
        }
    };
    let db: DatabaseSettings = settings(&url, &[]).database;
    let store = store::connect(&db).await.expect("connect").api;
    assert!(!store.migrations_applied().await.expect("check"), "a fresh database has pending migrations");
    store.migrate().await.expect("migrate");
    assert!(store.migrations_applied().await.expect("check"));
    (store, dir, url)
}

fn order(note: Option<&str>) -> Order {
    let new = NewOrder::parse(OrderDraft {
        customer_id: "cust-7".into(),
        items: vec![LineItemDraft { sku: "A-1".into(), quantity: 3, unit_price_minor: 500 }],
        currency: "CHF".into(),
        note: note.map(str::to_owned),
    })
    .expect("valid");
    Order::create(OrderId::generate(), new, Utc::now().trunc_subsecs(6))
}

async fn insert(store: &dyn Store, order: &Order) {
    let mut tx = store.begin().await.expect("begin");
    tx.insert_order(order, None).await.expect("insert");
    tx.commit().await.expect("commit");
}

async fn round_trips_every_field(backend: Backend) {
    let (store, _dir) = store(backend).await;
    for original in [order(Some("ring twice\nthen wait")), order(None)] {
        insert(&*store, &original).await;
        assert_eq!(store.get_order(original.id).await.expect("get"), Some(original));
    }
    assert_eq!(store.get_order(OrderId::generate()).await.expect("get"), None);
    store.ping().await.expect("ping");
}

async fn uncommitted_writes_vanish(backend: Backend) {
    let (store, _dir) = store(backend).await;
    let order = order(None);
    let mut tx = store.begin().await.expect("begin");
    tx.insert_order(&order, None).await.expect("insert");
    drop(tx);
    assert_eq!(store.get_order(order.id).await.expect("get"), None);
}

async fn lists_newest_first_after_the_cursor(backend: Backend) {
    let (store, _dir) = store(backend).await;
    let mut orders = Vec::new();
    for _ in 0..5 {
        let o = order(None);
        insert(&*store, &o).await;
        orders.push(o.id);
    }
    orders.reverse();
    let first = store.list_orders(&ListQuery { page_size: 2, after: None }).await.expect("list");
    assert_eq!(first.iter().map(|o| o.id).collect::<Vec<_>>(), orders[..3], "page_size + 1 rows");
    let after = Some(PageToken { after: orders[1] });
    let next = store.list_orders(&ListQuery { page_size: 10, after }).await.expect("list");
    assert_eq!(next.iter().map(|o| o.id).collect::<Vec<_>>(), orders[2..]);
}

async fn updates_are_guarded_by_version(backend: Backend) {
    let (store, _dir) = store(backend).await;
    let original = order(None);
    insert(&*store, &original).await;

    let mut tx = store.begin().await.expect("begin");
    let mut locked = tx.get_order_for_update(original.id).await.expect("read").expect("exists");
    locked.cancel(Utc::now().trunc_subsecs(6)).expect("pending cancels");
    tx.update_order(&locked, original.version).await.expect("update");
    tx.commit().await.expect("commit");
    let stored = store.get_order(original.id).await.expect("get").expect("exists");
    assert_eq!((stored.status, stored.version), (OrderStatus::Cancelled, 2));

    // A writer holding the stale version loses.
    let mut tx = store.begin().await.expect("begin");
    let result = tx.update_order(&locked, original.version).await;
    assert!(matches!(result, Err(StoreError::Conflict)), "{result:?}");
    assert_eq!(tx.get_order_for_update(OrderId::generate()).await.expect("read"), None);
}

/// Two retries both found the binding expired; the first released it and bound a new
/// order; the second's release must leave that fresh binding alone.
async fn only_a_lapsed_idempotency_binding_is_released(backend: Backend) {
    let (store, _dir) = store(backend).await;
    let bind = |order: Order, expires_at| {
        let store = store.clone();
        async move {
            let mut tx = store.begin().await.expect("begin");
            let binding = KeyBinding { key: "scoped-key", fingerprint: b"fingerprint", expires_at };
            tx.insert_order(&order, Some(binding)).await.expect("insert bound");
            tx.commit().await.expect("commit");
            order
        }
    };
    let now = Utc::now().trunc_subsecs(6);
    bind(order(None), now - chrono::Duration::seconds(1)).await;
    assert!(store.release_idempotency_key("scoped-key", now).await.expect("release"), "the lapsed one goes");
    let fresh = bind(order(None), now + chrono::Duration::hours(1)).await;
    assert!(!store.release_idempotency_key("scoped-key", now).await.expect("release"), "the live one stays");
    let bound = store.find_by_idempotency_key("scoped-key").await.expect("find").expect("bound");
    assert_eq!(bound.order.id, fresh.id);
}

/// Data the database itself refuses is classified as rejected (never retried as transient).
async fn out_of_range_values_are_rejected_not_retried(backend: Backend) {
    let (store, _dir) = store(backend).await;
    let mut bad = order(None);
    bad.total_minor = -1; // violates the CHECK (total_minor >= 0) on both databases
    let mut tx = store.begin().await.expect("begin");
    let refused = tx.insert_order(&bad, None).await.expect_err("check constraint");
    assert!(matches!(refused, StoreError::Rejected(_)), "{refused:?}");
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test] async fn $case() { super::$case(super::Backend::Postgres).await })*
        }
        mod sqlite {
            $(#[tokio::test] async fn $case() { super::$case(super::Backend::Sqlite).await })*
        }
    };
}

conformance!(
    round_trips_every_field,
    uncommitted_writes_vanish,
    lists_newest_first_after_the_cursor,
    updates_are_guarded_by_version,
    only_a_lapsed_idempotency_binding_is_released,
    out_of_range_values_are_rejected_not_retried,
);
