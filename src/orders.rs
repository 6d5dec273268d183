//! The orders use-cases, shared by the REST and gRPC adapters. Each state change owns one
//! store transaction from `begin` to `commit`, so everything it writes (the order now, its
//! outbox event later) is committed together or not at all.

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};

use crate::{
    domain::{DomainError, ListQuery, NewOrder, Order, OrderId, PageToken},
    events,
    idempotency::IdempotencyContext,
    outbox::{TraceContext, Wakeup},
    store::{IDEMPOTENCY_KEY_INDEX, KeyBinding, Store, StoreError, Tx},
};

/// Why a use-case did not do what was asked. Transport-free: the REST and gRPC edges map
/// it through the one error table (`error.rs`).
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// There is no such order.
    #[error("order {0} not found")]
    NotFound(OrderId),
    /// A business rule refused the change (e.g. cancelling a cancelled order).
    #[error(transparent)]
    Rule(#[from] DomainError),
    /// The Idempotency-Key is bound to a different request.
    #[error("the Idempotency-Key was used with a different request")]
    IdempotencyMismatch,
    /// A request with the same Idempotency-Key is still running.
    #[error("a request with this Idempotency-Key is in flight")]
    IdempotencyInFlight,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A created order, or the one an earlier request with the same Idempotency-Key created.
#[derive(Debug)]
pub struct Created {
    /// The order.
    pub order: Order,
    /// `true` when the database backstop found it (the key store had lost the response).
    pub replayed: bool,
}

/// One page of a listing.
#[derive(Debug)]
pub struct Page {
    /// The orders on this page, newest first.
    pub orders: Vec<Order>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageToken>,
}

/// The orders application service.
#[derive(Clone)]
pub struct Orders {
    store: Arc<dyn Store>,
    /// Rung after each commit that wrote an outbox row.
    wakeup: Arc<Wakeup>,
    /// Number of outbox partitions (P).
    partitions: i32,
}

impl Orders {
    /// Builds the service over a store; events go to `partitions` outbox partitions.
    pub fn new(store: Arc<dyn Store>, wakeup: Arc<Wakeup>, partitions: i32) -> Self {
        Self { store, wakeup, partitions }
    }

    /// Stores a new PENDING order and its `OrderCreated` event in one transaction. With an
    /// Idempotency-Key the order is bound to the scoped key under a unique index (the
    /// backstop): a second create with the key returns the first order, or fails with a
    /// mismatch if the request differs.
    #[tracing::instrument(skip_all, fields(order_id), err(level = "debug"))]
    pub async fn create(
        &self,
        new: NewOrder,
        trace: &TraceContext,
        idempotency: Option<&IdempotencyContext>,
    ) -> Result<Created, OrderError> {
        // A second round happens only after an expired key binding was released.
        for _ in 0..2 {
            let order = Order::create(OrderId::generate(), new.clone(), now());
            tracing::Span::current().record("order_id", tracing::field::display(order.id));
            let event = events::order_created(&order, trace, self.partitions);
            let mut tx = self.store.begin().await?;
            let binding = idempotency.map(|idem| KeyBinding {
                key: idem.key.as_str(),
                fingerprint: &idem.fingerprint.0,
                expires_at: now() + idem.ttl,
            });
            match (tx.insert_order(&order, binding).await, idempotency) {
                (Err(StoreError::UniqueViolation(index)), Some(idem)) if index == IDEMPOTENCY_KEY_INDEX => {
                    drop(tx);
                    match self.existing(idem).await? {
                        Some(created) => return Ok(created),
                        None => continue,
                    }
                }
                (result, _) => result?,
            }
            tx.insert_outbox(&event).await?;
            tx.commit().await?;
            self.wakeup.committed(event.partition);
            return Ok(Created { order, replayed: false });
        }
        // Rare (the binding was released and taken again twice while this request ran), and
        // answered with the same 409 as a live in-flight marker: logged so the two are told
        // apart when a client reports a key stuck in flight.
        tracing::warn!(
            key = idempotency.map(|i| i.key.as_str()),
            "the Idempotency-Key's database binding changed hands twice during this create; answering 409"
        );
        Err(OrderError::IdempotencyInFlight)
    }

    /// The order already bound to the key, if the binding is live and the request matches.
    async fn existing(&self, idem: &IdempotencyContext) -> Result<Option<Created>, OrderError> {
        let Some(bound) = self.store.find_by_idempotency_key(idem.key.as_str()).await? else {
            return Ok(None);
        };
        let now = Utc::now();
        if bound.expires_at <= now {
            // Conditional: a concurrent retry may have re-bound the key first; then the next
            // round finds that fresh binding instead of unbinding it.
            self.store.release_idempotency_key(idem.key.as_str(), now).await?;
            return Ok(None);
        }
        if bound.fingerprint != idem.fingerprint.0 {
            return Err(OrderError::IdempotencyMismatch);
        }
        Ok(Some(Created { order: bound.order, replayed: true }))
    }

    /// Reads one order, with its customer's display name when the projection knows it.
    #[tracing::instrument(skip(self), err(level = "debug"))]
    pub async fn get(&self, id: OrderId) -> Result<(Order, Option<String>), OrderError> {
        let order = self.store.get_order(id).await?.ok_or(OrderError::NotFound(id))?;
        let display_name = self.store.customer_display_name(order.customer_id.as_str()).await?;
        Ok((order, display_name))
    }

    /// Reads one page of orders, newest first.
    #[tracing::instrument(skip(self), err(level = "debug"))]
    pub async fn list(&self, query: ListQuery) -> Result<Page, OrderError> {
        let mut orders = self.store.list_orders(&query).await?;
        let page_size = query.page_size as usize;
        let next = if orders.len() > page_size {
            orders.truncate(page_size);
            orders.last().map(|o| PageToken { after: o.id })
        } else {
            None
        };
        Ok(Page { orders, next })
    }

    /// Cancels a PENDING order (any other state is a conflict) and emits `OrderCancelled`
    /// in the same transaction.
    #[tracing::instrument(skip(self, trace), err(level = "debug"))]
    pub async fn cancel(&self, id: OrderId, trace: &TraceContext) -> Result<Order, OrderError> {
        let mut tx = self.store.begin().await?;
        let order = match change_order(&mut *tx, id, |order| order.cancel(now())).await? {
            Ok(order) => order,
            Err(Refused::NotFound(id)) => return Err(OrderError::NotFound(id)),
            Err(Refused::Rule(rule)) => return Err(OrderError::Rule(rule)),
        };
        let event = events::order_cancelled(&order, trace, self.partitions);
        tx.insert_outbox(&event).await?;
        tx.commit().await?;
        self.wakeup.committed(event.partition);
        Ok(order)
    }
}

/// Why [`change_order`] left an order alone.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// There is no such order.
    #[error("no order {0}")]
    NotFound(OrderId),
    /// The transition's business rule said no.
    #[error(transparent)]
    Rule(DomainError),
}

/// The one way a state change is applied: read the order with a row lock inside `tx`, run
/// the domain `transition`, and write it back guarded by the version it was read at. Used
/// by the API's use-cases and by the inbox's effects alike.
pub(crate) async fn change_order(
    tx: &mut dyn Tx,
    id: OrderId,
    transition: impl FnOnce(&mut Order) -> Result<(), DomainError>,
) -> Result<Result<Order, Refused>, StoreError> {
    let Some(mut order) = tx.get_order_for_update(id).await? else {
        return Ok(Err(Refused::NotFound(id)));
    };
    let expected_version = order.version;
    if let Err(rule) = transition(&mut order) {
        return Ok(Err(Refused::Rule(rule)));
    }
    tx.update_order(&order, expected_version).await?;
    Ok(Ok(order))
}

/// The current time at the precision every store keeps (Postgres: microseconds), so a
/// response and a later read of the same order agree to the digit.
pub(crate) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}
