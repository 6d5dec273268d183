//! Cross-process wake-ups over PostgreSQL `LISTEN`/`NOTIFY`, outside every write
//! transaction. The notifier coalesces the partitions committed in a short window into one
//! `NOTIFY` on its own pooled connection; each relay's listener wakes its relay when a
//! notification names a partition it owns. Polling remains the fallback (and the only
//! mechanism behind PgBouncer in transaction mode, where `LISTEN` does not work).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Wakeup;

/// The notification channel.
pub const CHANNEL: &str = "orders_outbox";
/// Payload announcing that relay membership changed (a relay joined or let go of leases):
/// every relay re-balances at once instead of at its next heartbeat.
pub const REBALANCE: &str = "rebalance";

/// Sends at most one `NOTIFY` per `window`, carrying every partition committed in it.
pub async fn run_notifier(
    pool: PgPool,
    mut partitions: mpsc::Receiver<i32>,
    window: Duration,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            p = partitions.recv() => match p { Some(p) => p, None => return },
        };
        let mut touched = BTreeSet::from([first]);
        let window_end = tokio::time::sleep(window);
        tokio::pin!(window_end);
        loop {
            tokio::select! {
                _ = &mut window_end => break,
                p = partitions.recv() => match p { Some(p) => { touched.insert(p); } None => break },
            }
        }
        let payload = touched.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
        if let Err(e) =
            sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(&payload).execute(&pool).await
        {
            tracing::debug!(error = %e, "outbox NOTIFY failed; relays will poll");
        }
    }
}

/// Wakes the local relay when a notification names one of its partitions; reconnects
/// after errors.
pub async fn run_listener(pool: PgPool, wakeup: Arc<Wakeup>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::debug!(error = %e, "outbox LISTEN connection failed; retrying");
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => continue }
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::debug!(error = %e, "LISTEN failed; retrying");
            continue;
        }
        // Notifications sent while we were not listening are lost: look once, now.
        wakeup.request_rebalance();
        wakeup.wake_local();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                received = listener.recv() => match received {
                    Ok(notification) if notification.payload() == REBALANCE => wakeup.request_rebalance(),
                    Ok(notification) => {
                        let partitions: Vec<i32> =
                            notification.payload().split(',').filter_map(|p| p.parse().ok()).collect();
                        if wakeup.owns_any(&partitions) {
                            wakeup.wake_local();
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN connection lost; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}
