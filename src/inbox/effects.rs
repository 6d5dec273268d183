//! Decoding inbound events and applying their effects, one transaction per message.

use chrono::Utc;

use super::{CustomerProjection, HandleError, InboundMessage, Inbox, Outcome, Rejection};
use crate::{
    domain::{CapturedPayment, CustomerId, OrderId},
    events,
    orders::{self, change_order},
    outbox::TraceContext,
    pb::{customers::events::v1 as customers, payments::events::v1 as payments},
    store::{StoreError, Tx},
};

/// CloudEvents types this service consumes.
pub const PAYMENT_CAPTURED: &str = "payments.events.v1.PaymentCaptured";
/// See [`PAYMENT_CAPTURED`].
pub const PAYMENT_FAILED: &str = "payments.events.v1.PaymentFailed";
/// See [`PAYMENT_CAPTURED`].
pub const CUSTOMER_UPDATED: &str = "customers.events.v1.CustomerUpdated";

/// A decoded, validated inbound event.
enum Event {
    PaymentCaptured { order_id: OrderId, payment: CapturedPayment },
    PaymentFailed { order_id: OrderId, reason: String },
    CustomerUpdated(CustomerProjection),
}

fn json<T: serde::de::DeserializeOwned>(message: &InboundMessage, ce_type: &str) -> Result<T, String> {
    serde_json::from_slice(&message.payload).map_err(|e| format!("undecodable {ce_type}: {e}"))
}

/// Rejects control characters (PostgreSQL refuses NUL in text; the rest has no business in
/// ids or names), except newlines and tabs in free text.
fn clean(field: &str, value: &str, free_text: bool) -> Result<(), String> {
    let allowed = |c: char| free_text && (c == '\n' || c == '\t');
    match value.chars().find(|&c| c.is_control() && !allowed(c)) {
        Some(c) => Err(format!("{field} contains the control character U+{:04X}", u32::from(c))),
        None => Ok(()),
    }
}

/// Decodes and validates; every failure is a poison message (it can never succeed).
fn decode(inbox: &Inbox, message: &InboundMessage) -> Result<(String, Event), String> {
    let id = message
        .header("ce_id")
        .filter(|id| !id.is_empty() && id.len() <= 255)
        .ok_or("missing or invalid ce_id")?;
    clean("ce_id", id, false)?;
    let ce_type = message.header("ce_type").ok_or("missing ce_type")?;
    let settings = inbox.settings();
    let expected_topic = match ce_type {
        PAYMENT_CAPTURED | PAYMENT_FAILED => &settings.payments_topic,
        CUSTOMER_UPDATED => &settings.customers_topic,
        other => return Err(format!("unknown ce_type {other:?}")),
    };
    if &message.topic != expected_topic {
        return Err(format!("{ce_type} does not belong on topic {}", message.topic));
    }
    let order_id =
        |raw: &str| OrderId::parse("order_id", raw).map_err(|v| format!("{}: {}", v.field, v.message));
    let event = match ce_type {
        PAYMENT_CAPTURED => {
            let e: payments::PaymentCaptured = json(message, ce_type)?;
            clean("paymentId", &e.payment_id, false)?;
            clean("currency", &e.currency, false)?;
            if e.payment_id.is_empty() || e.amount_minor < 0 || e.currency.len() != 3 {
                return Err("PaymentCaptured needs a payment_id, a non-negative amount and a currency".into());
            }
            let payment = CapturedPayment {
                payment_id: e.payment_id,
                amount_minor: e.amount_minor,
                currency: e.currency,
            };
            Event::PaymentCaptured { order_id: order_id(&e.order_id)?, payment }
        }
        PAYMENT_FAILED => {
            let e: payments::PaymentFailed = json(message, ce_type)?;
            clean("reason", &e.reason, true)?;
            if e.reason.trim().is_empty() {
                return Err("PaymentFailed needs a reason".into());
            }
            Event::PaymentFailed { order_id: order_id(&e.order_id)?, reason: e.reason }
        }
        _ => {
            let e: customers::CustomerUpdated = json(message, ce_type)?;
            clean("displayName", &e.display_name, false)?;
            let customer_id = CustomerId::parse("customer_id", &e.customer_id)
                .map_err(|v| format!("{}: {}", v.field, v.message))?;
            if e.display_name.trim().is_empty() || e.display_name.chars().count() > 200 || e.version < 1 {
                return Err(
                    "CustomerUpdated needs a display_name (1-200 characters) and a version >= 1".into()
                );
            }
            let tier = e.tier().as_str_name().trim_start_matches("CUSTOMER_TIER_").to_owned();
            Event::CustomerUpdated(CustomerProjection {
                customer_id: customer_id.to_string(),
                display_name: e.display_name,
                tier,
                version: e.version,
            })
        }
    };
    Ok((id.to_owned(), event))
}

pub(super) async fn handle(inbox: &Inbox, message: &InboundMessage) -> Result<Outcome, HandleError> {
    let (id, event) = decode(inbox, message).map_err(HandleError::Poison)?;
    let consumer = inbox.consumer_name(&message.topic);
    let mut tx = inbox.store.begin().await?;
    if !tx.insert_inbox(&consumer, &id).await? {
        return Ok(Outcome::Duplicate); // dropping the transaction rolls it back
    }
    // The events this effect emits continue the consumer's span (with tracing off: the
    // producer's context as received).
    let received = TraceContext::from_headers(message.header("traceparent"), message.header("tracestate"));
    let trace = crate::telemetry::current_or(received);
    let (outcome, woken) = apply(inbox, &mut *tx, event, &trace).await?;
    if let Outcome::Rejected(reason) = &outcome {
        tracing::warn!(topic = %message.topic, message_id = %id, %reason, "inbox: message rejected");
        let rejection = Rejection {
            consumer,
            message_id: Some(id),
            topic: message.topic.clone(),
            partition: message.partition,
            offset: message.offset,
            event_type: message.header("ce_type").map(str::to_owned),
            kind: Rejection::REJECTED,
            reason: reason.clone(),
            at: Utc::now(),
        };
        tx.insert_rejection(&rejection).await?;
    }
    tx.commit().await?;
    if let Some(partition) = woken {
        inbox.wakeup.committed(partition);
    }
    Ok(outcome)
}

/// Applies the effect inside `tx`; returns the outcome and the outbox partition written, if any.
async fn apply(
    inbox: &Inbox,
    tx: &mut dyn Tx,
    event: Event,
    trace: &TraceContext,
) -> Result<(Outcome, Option<i32>), StoreError> {
    let now = orders::now();
    match event {
        Event::PaymentCaptured { order_id, payment } => {
            match change_order(tx, order_id, |order| order.pay(&payment, now)).await? {
                Ok(order) => {
                    let event = events::order_paid(&order, &payment, trace, inbox.partitions);
                    tx.insert_outbox(&event).await?;
                    Ok((Outcome::Applied, Some(event.partition)))
                }
                Err(refused) => Ok((Outcome::Rejected(refused.to_string()), None)),
            }
        }
        Event::PaymentFailed { order_id, reason } => {
            match change_order(tx, order_id, |order| order.record_payment_failure(&reason, now)).await? {
                Ok(_) => Ok((Outcome::Applied, None)),
                Err(refused) => Ok((Outcome::Rejected(refused.to_string()), None)),
            }
        }
        Event::CustomerUpdated(customer) => {
            let applied = tx.upsert_customer(&customer).await?;
            Ok((if applied { Outcome::Applied } else { Outcome::Stale }, None))
        }
    }
}
