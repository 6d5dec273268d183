//! Partition leases on PostgreSQL: even splits, no two owners even when relays race, one
//! process per owner id, fencing epochs, prompt rebalancing, and a partition count every
//! replica agrees on.

use std::{collections::HashSet, sync::Arc, time::Duration};

use orders_service::{
    app::App,
    outbox::{RelayIdentity, Settle, Settlement, partition_of},
    publish::{OutboundMessage, PublishError, Publisher},
};
use tokio::sync::Barrier;

use crate::{
    outbox::{PARTITIONS, Pipeline, Sink, header},
    support::{Backend, TestApp, eventually, fresh_postgres, settings},
};

fn identity(owner: &str) -> RelayIdentity {
    RelayIdentity { owner: owner.to_owned(), instance: uuid::Uuid::new_v4() }
}

/// Expires every lease and heartbeat of `owner`, as if its process had stalled past them.
async fn expire(url: &str, owner: &str) {
    expire_in(url, owner, -1.0).await;
}

/// Moves every lease and heartbeat of `owner` to expire `secs` from now, as if its process
/// had died that much less than a lease ago.
async fn expire_in(url: &str, owner: &str, secs: f64) {
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    for table in ["outbox_lease", "outbox_relay"] {
        sqlx::query(&format!(
            "UPDATE {table} SET expires_at = now() + make_interval(secs => $2) WHERE owner = $1"
        ))
        .bind(owner)
        .bind(secs)
        .execute(&pool)
        .await
        .expect("expire");
    }
}

#[tokio::test]
async fn two_relays_split_partitions_evenly_never_overlap_and_fail_over() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let sink = Sink::bus(1_000_000);
    let ttl = Duration::from_millis(1500);
    let relay =
        |owner: &str| pipeline.relay(owner, pipeline.store.clone(), sink.publisher.clone(), &sink.topic, ttl);
    let (a, b) = (relay("relay-a"), relay("relay-b"));
    assert_eq!(
        a.heartbeat().await.expect("heartbeat").len(),
        PARTITIONS as usize,
        "alone, A owns everything"
    );

    let disjoint = |x: &[i32], y: &[i32]| x.iter().all(|p| !y.contains(p));
    let mut settled = false;
    for _ in 0..4 {
        let owned_b = b.heartbeat().await.expect("heartbeat");
        let owned_a = a.heartbeat().await.expect("heartbeat");
        assert!(disjoint(&owned_a, &owned_b), "a partition had two owners: {owned_a:?} / {owned_b:?}");
        if owned_a.len() == 4 && owned_b.len() == 4 {
            settled = true;
            break;
        }
    }
    assert!(settled, "leases settle to an even split");

    let mut expected = std::collections::HashSet::new();
    for _ in 0..20 {
        expected.insert(pipeline.create(1).await.id.to_string());
    }
    for _ in 0..3 {
        a.relay_once().await.expect("pass");
        b.relay_once().await.expect("pass");
    }
    assert_eq!(pipeline.pending().await, 0, "together they publish every partition");

    // A dies without releasing its leases; B takes them over once they expire.
    drop(a);
    for _ in 0..10 {
        expected.insert(pipeline.create(1).await.id.to_string());
    }
    assert_eq!(b.heartbeat().await.expect("heartbeat").len(), 4, "A's leases are still valid");
    crate::support::eventually(ttl * 4, "B to take over A's partitions", || async {
        b.heartbeat().await.expect("heartbeat").len() == PARTITIONS as usize
    })
    .await;
    pipeline.drain(&b).await;
    let records = sink.read(30).await;
    let keys: std::collections::HashSet<String> = records.iter().map(|r| r.key.clone()).collect();
    assert_eq!(records.len(), 30, "no duplicates without failures");
    assert_eq!(keys, expected, "all events delivered");
}

#[tokio::test]
async fn a_dead_relays_partitions_move_right_after_its_membership_expires() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let sink = Sink::bus(1_000_000);
    // A 30 s lease: a relay at its fair share renews every 10 s on its own.
    let ttl = Duration::from_secs(30);
    let relay =
        |owner: &str| pipeline.relay(owner, pipeline.store.clone(), sink.publisher.clone(), &sink.topic, ttl);
    let (a, b) = (relay("relay-a"), relay("relay-b"));
    for _ in 0..3 {
        b.heartbeat().await.expect("heartbeat");
        a.heartbeat().await.expect("heartbeat");
    }
    // B died 29 s ago and never renews; A renews now, at its fair share.
    expire_in(&pipeline.url, "relay-b", 1.0).await;
    assert_eq!(a.heartbeat().await.expect("heartbeat").len(), PARTITIONS as usize / 2);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(a.clone().run(stop.clone()));
    let pool = sqlx::PgPool::connect(&pipeline.url).await.expect("connect");
    eventually(
        Duration::from_secs(5),
        "A to take B's partitions after B's expiry, not 10 s later",
        || async {
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox_lease WHERE owner = 'relay-a' AND expires_at > now()",
            )
            .fetch_one(&pool)
            .await
            .expect("count");
            held == i64::from(PARTITIONS)
        },
    )
    .await;
    stop.cancel();
    running.await.expect("relay stops");
}

#[tokio::test]
async fn relays_racing_for_leases_never_both_own_a_partition() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let sink = Sink::bus(1_000_000);
    let relays: Vec<_> = ["relay-a", "relay-b", "relay-c"]
        .iter()
        .map(|o| {
            pipeline.relay(
                o,
                pipeline.store.clone(),
                sink.publisher.clone(),
                &sink.topic,
                Duration::from_secs(10),
            )
        })
        .collect();
    let barrier = Arc::new(Barrier::new(relays.len()));
    for round in 0..15 {
        // Everyone lets go, then all ask at the same instant for the same free partitions.
        for relay in &relays {
            relay.release().await;
        }
        let tasks: Vec<_> = relays
            .iter()
            .map(|relay| {
                let (relay, barrier) = (relay.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    relay.heartbeat().await.expect("heartbeat")
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for task in tasks {
            for partition in task.await.expect("task") {
                assert!(seen.insert(partition), "round {round}: partition {partition} has two owners");
            }
        }
    }
}

#[tokio::test]
async fn a_second_process_with_the_same_relay_id_is_refused() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let sink = Sink::bus(1_000_000);
    let relay = || {
        pipeline.relay(
            "relay-same",
            pipeline.store.clone(),
            sink.publisher.clone(),
            &sink.topic,
            Duration::from_secs(10),
        )
    };
    let (first, second) = (relay(), relay());
    assert_eq!(first.heartbeat().await.expect("first").len(), PARTITIONS as usize);
    let refused = second.heartbeat().await.expect_err("same id, another process");
    assert!(format!("{:#}", anyhow::Error::from(refused)).contains("held by another live process"));
    assert_eq!(
        first.heartbeat().await.expect("first").len(),
        PARTITIONS as usize,
        "the first keeps its leases"
    );
    second.release().await; // a refused process must not free the live one's leases
    assert_eq!(first.heartbeat().await.expect("first").len(), PARTITIONS as usize);
    first.release().await;
    assert_eq!(second.heartbeat().await.expect("after the first left").len(), PARTITIONS as usize);
}

#[tokio::test]
async fn a_stale_relay_cannot_settle_rows_of_a_partition_that_moved_on() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let store = pipeline.store.clone();
    let ttl = Duration::from_secs(10);
    let (a, b) = (identity("relay-a"), identity("relay-b"));
    let first_tenure = store.acquire_partitions(&a, PARTITIONS, ttl).await.expect("a").leases;
    pipeline.create(1).await;
    let all: Vec<i32> = (0..PARTITIONS).collect();
    let rows = store.fetch_due(&all, 10, chrono::Utc::now(), &[]).await.expect("fetch");
    assert_eq!(rows.len(), 1);
    let settle =
        |outcome: Settle| vec![Settlement { seq: rows[0].seq, partition: rows[0].partition, outcome }];

    // A stalls past its leases; B takes over, then leaves; A comes back and holds the
    // partition again, under a new epoch.
    expire(&pipeline.url, "relay-a").await;
    let taken = store.acquire_partitions(&b, PARTITIONS, ttl).await.expect("b").leases;
    assert!(
        taken.iter().all(|l| first_tenure.iter().any(|f| f.partition == l.partition && l.epoch > f.epoch))
    );
    store.release_partitions(&b).await.expect("release");
    let second_tenure = store.acquire_partitions(&a, PARTITIONS, ttl).await.expect("a again").leases;
    assert_eq!(second_tenure.len(), PARTITIONS as usize);

    // A's settlement from its first tenure is fenced off: same owner, stale epoch.
    for outcome in [
        Settle::Published,
        Settle::Retry {
            error: "stale".into(),
            next_attempt_at: chrono::Utc::now() + chrono::Duration::hours(1),
        },
        Settle::DeadLetter { error: "stale".into() },
    ] {
        let settled = store.settle("relay-a", &first_tenure, &settle(outcome)).await.expect("settle");
        assert_eq!((settled.published, settled.retried, settled.dead_lettered), (0, 0, 0));
    }
    assert_eq!(pipeline.pending().await, 1, "the row is untouched");
    assert_eq!(
        store.fetch_due(&all, 10, chrono::Utc::now(), &[]).await.expect("fetch").len(),
        1,
        "and still due"
    );
    let settled = store.settle("relay-a", &second_tenure, &settle(Settle::Published)).await.expect("settle");
    assert_eq!(settled.published, 1, "the current tenure settles it");
}

/// Publishes like its inner publisher, but before the first batch goes out, lets the lease
/// move to another relay: the stall of a relay between its lease check and the broker.
struct StallDuringPublish {
    inner: Arc<dyn Publisher>,
    takeover: tokio::sync::Mutex<Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>>,
}

#[async_trait::async_trait]
impl Publisher for StallDuringPublish {
    async fn publish(&self, messages: Vec<OutboundMessage>) -> Vec<Result<(), PublishError>> {
        if let Some(takeover) = self.takeover.lock().await.take() {
            takeover.await;
        }
        self.inner.publish(messages).await
    }
    async fn flush(&self, timeout: Duration) {
        self.inner.flush(timeout).await;
    }
}

#[tokio::test]
async fn a_relay_that_stalls_past_its_lease_publishes_a_duplicate_but_settles_nothing() {
    let pipeline = Arc::new(Pipeline::new(Backend::Postgres).await);
    let sink = Sink::bus(1_000_000);
    let order = pipeline.create(1).await;
    let ttl = Duration::from_secs(10);
    let successor =
        pipeline.relay("relay-b", pipeline.store.clone(), sink.publisher.clone(), &sink.topic, ttl);
    let takeover = {
        let (pipeline, successor) = (pipeline.clone(), successor.clone());
        Box::pin(async move {
            expire(&pipeline.url, "relay-a").await;
            pipeline.drain(&successor).await; // takes every partition, publishes, deletes
        })
    };
    let stalling = Arc::new(StallDuringPublish {
        inner: sink.publisher.clone(),
        takeover: tokio::sync::Mutex::new(Some(takeover)),
    });
    let stale = pipeline.relay("relay-a", pipeline.store.clone(), stalling, &sink.topic, ttl);
    let report = stale.relay_once().await.expect("pass");
    assert_eq!((report.published, report.fenced), (1, 1), "published late, settled nothing");
    assert_eq!(pipeline.metrics.outbox_settle_fenced.get(), 1);
    assert_eq!(pipeline.pending().await, 0);
    let records = sink.read(2).await;
    assert_eq!(records.len(), 2, "the documented window: a stale relay republishes once");
    assert_eq!(
        header(&records[0], "ce_id"),
        header(&records[1], "ce_id"),
        "a duplicate consumers drop by ce_id"
    );
    assert!(records.iter().all(|r| r.key == order.id.to_string()));
}

#[tokio::test]
async fn partitions_move_within_moments_when_a_relay_joins_or_leaves() {
    // A 30 s lease renews every 10 s: only the membership notifications make this fast.
    let database = fresh_postgres().await;
    let config = [
        ("APP_ROLES", "relay"),
        ("APP_OUTBOX__LEASE_TTL_MS", "30000"),
        ("APP_OUTBOX__POLL_INTERVAL_MS", "1000"),
    ];
    let owned = |n: usize| format!("\noutbox_partitions_owned {n}\n");
    let a = TestApp::start_on(database.clone(), &config).await;
    eventually(Duration::from_secs(10), "A to own every partition", || async {
        a.metrics().await.contains(&owned(16))
    })
    .await;

    let joined = std::time::Instant::now();
    let b = TestApp::start_on(database.clone(), &config).await;
    eventually(Duration::from_secs(5), "an even split after B joined", || async {
        a.metrics().await.contains(&owned(8)) && b.metrics().await.contains(&owned(8))
    })
    .await;
    let split = joined.elapsed();

    let left = std::time::Instant::now();
    a.shutdown.cancel();
    eventually(Duration::from_secs(5), "B to own everything after A left", || async {
        b.metrics().await.contains(&owned(16))
    })
    .await;
    eprintln!("rebalance after a join: {split:?}; takeover after a graceful leave: {:?}", left.elapsed());
}

#[tokio::test]
async fn every_replica_must_agree_on_the_partition_count() {
    let database = fresh_postgres().await;
    let first = TestApp::start_on(database.clone(), &[("APP_OUTBOX__PARTITIONS", "8")]).await;
    first.create_ok().await;
    let refused = App::build(settings(&database, &[("APP_OUTBOX__PARTITIONS", "16")])).await;
    let message = format!("{:#}", refused.err().expect("another P is refused"));
    assert!(message.contains("APP_OUTBOX__PARTITIONS is 16 but the outbox was created with 8"), "{message}");
    assert!(message.contains("orders-service outbox repartition"), "{message}");

    // A writer that still computes with a stale P cannot insert rows no relay would read.
    let store =
        orders_service::store::connect(&settings(&database, &[]).database).await.expect("connect").api;
    let stale = orders_service::orders::Orders::new(store, orders_service::outbox::Wakeup::new(None), 16);
    let draft = crate::outbox::draft(1);
    let failed = stale.create(draft, &Default::default(), None).await;
    assert!(failed.is_err(), "a stale writer's create fails instead of stranding its event");
}

#[tokio::test]
async fn repartition_moves_every_row_and_refuses_while_a_relay_runs() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let sink = Sink::bus(1_000_000);
    pipeline.store.ensure_partitions(PARTITIONS).await.expect("record P");
    let mut orders = Vec::new();
    for _ in 0..20 {
        let order = pipeline.create(1).await;
        pipeline.orders.cancel(order.id, &Default::default()).await.expect("cancel");
        orders.push(order.id.to_string());
    }
    let relay = pipeline.relay(
        "relay-old",
        pipeline.store.clone(),
        sink.publisher.clone(),
        &sink.topic,
        Duration::from_secs(10),
    );
    relay.heartbeat().await.expect("a live relay");
    let refused = pipeline.store.repartition(3).await.expect_err("a relay is live");
    assert!(format!("{:#}", anyhow::Error::from(refused)).contains("relay(s) are live"));
    relay.release().await;

    let moved = pipeline.store.repartition(3).await.expect("repartition");
    assert!(moved > 0);
    pipeline.store.ensure_partitions(3).await.expect("the new P is recorded");
    assert!(pipeline.store.ensure_partitions(PARTITIONS).await.is_err(), "the old P is refused now");
    let pool = sqlx::PgPool::connect(&pipeline.url).await.expect("connect");
    let rows: Vec<(String, i32)> =
        sqlx::query_as("SELECT aggregate_id, partition FROM outbox").fetch_all(&pool).await.expect("rows");
    assert_eq!(rows.len(), 40);
    assert!(rows.iter().all(|(id, p)| *p == partition_of(id, 3)), "every row sits where P = 3 puts it");

    let mut settings = crate::outbox::relay_settings(&sink.topic, Duration::from_secs(10));
    settings.partitions = 3;
    let relay = pipeline.relay_with("relay-new", pipeline.store.clone(), sink.publisher.clone(), settings);
    pipeline.drain(&relay).await;
    let records = sink.read(40).await;
    for id in &orders {
        let types: Vec<&str> =
            records.iter().filter(|r| &r.key == id).map(|r| header(r, "ce_type")).collect();
        assert_eq!(types, ["orders.events.v1.OrderCreated", "orders.events.v1.OrderCancelled"]);
    }
}
