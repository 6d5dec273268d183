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
fn decode(settings: &super::InboxSettings, message: &InboundMessage) -> Result<(String, Event), String> {
    let id = message
        .header("ce_id")
        .filter(|id| !id.is_empty() && id.len() <= 255)
        .ok_or("missing or invalid ce_id")?;
    clean("ce_id", id, false)?;
    let ce_type = message.header("ce_type").ok_or("missing ce_type")?;
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
    let (id, event) = decode(inbox.settings(), message).map_err(HandleError::Poison)?;
    let consumer = inbox.consumer_name(&message.topic);
    let mut tx = inbox.store.begin().await?;
    if !tx.insert_inbox(&consumer, &id).await? {
        return Ok(Outcome::Duplicate); // dropping the transaction rolls it back
    }
    // The events this effect emits continue the consumer's span (with tracing off: the
    // producer's context as received).
    let trace = crate::telemetry::event_context(|name| message.header(name));
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

#[cfg(test)]
mod properties {
    //! Inbound events are untrusted input: whatever the headers and payload, decoding never
    //! panics, and everything it accepts is clean (no control characters reach the store).
    use proptest::prelude::*;

    use super::*;

    fn settings() -> super::super::InboxSettings {
        super::super::InboxSettings {
            group_id: "g".into(),
            payments_topic: "payments.events".into(),
            customers_topic: "customers.events".into(),
            retention: std::time::Duration::from_secs(3600),
            max_parallel_partitions: 1,
            max_attempts: 1,
        }
    }

    fn message(topic: &str, ce_id: String, ce_type: &str, payload: Vec<u8>) -> InboundMessage {
        InboundMessage {
            topic: topic.into(),
            partition: 0,
            offset: 0,
            key: None,
            headers: vec![("ce_id".into(), ce_id), ("ce_type".into(), ce_type.into())],
            payload,
        }
    }

    fn ce_type() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![PAYMENT_CAPTURED, PAYMENT_FAILED, CUSTOMER_UPDATED, "x.y.Unknown"])
    }

    /// Short ASCII strings, control characters (NUL included) as likely as letters.
    fn ascii() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::char::range('\0', '\u{7f}'), 1..12)
            .prop_map(|chars| chars.into_iter().collect())
    }

    /// A message id: mostly well formed, sometimes with control characters.
    fn ce_id() -> impl Strategy<Value = String> {
        prop_oneof![3 => "[a-z0-9-]{1,20}".boxed(), 1 => ascii().boxed()]
    }

    /// A JSON object with the fields the decoders read: mostly plausible values (so many
    /// messages are accepted and their cleanliness is checked), sometimes any string (control
    /// characters included), a number or null.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        let field = |plausible: BoxedStrategy<String>| {
            prop_oneof![
                4 => plausible.prop_map(serde_json::Value::from),
                2 => ascii().prop_map(serde_json::Value::from),
                1 => any::<i64>().prop_map(serde_json::Value::from),
                1 => Just(serde_json::Value::Null),
            ]
        };
        let text = || "[ -~]{1,12}".boxed();
        (
            (field(text()), field(Just("01938f6e-4c2a-7b3e-9d41-6a2f0c5e8b17".to_owned()).boxed()), field("[0-9]{1,6}".boxed())),
            (field(Just("EUR".to_owned()).boxed()), field(text()), field("[a-z0-9-]{1,12}".boxed())),
            (field(text()), field(Just("CUSTOMER_TIER_GOLD".to_owned()).boxed()), field("[1-9][0-9]{0,3}".boxed())),
        )
            .prop_map(|((payment, order, amount), (currency, reason, customer), (name, tier, version))| {
                serde_json::to_vec(&serde_json::json!({
                    "paymentId": payment, "orderId": order, "amountMinor": amount, "currency": currency,
                    "reason": reason, "customerId": customer, "displayName": name, "tier": tier, "version": version,
                }))
                .expect("json")
            })
    }

    #[test]
    fn fields_a_newer_producer_adds_are_ignored() {
        let captured = serde_json::json!({"paymentId": "p", "orderId": "01938f6e-4c2a-7b3e-9d41-6a2f0c5e8b17",
            "amountMinor": "100", "currency": "EUR", "capturedAt": "2026-12-02T00:00:00Z", "method": {"card": "visa"}});
        let message =
            message("payments.events", "id-1".into(), PAYMENT_CAPTURED, captured.to_string().into_bytes());
        assert!(
            decode(&settings(), &message).is_ok(),
            "a tolerant reader: {:?}",
            decode(&settings(), &message).err()
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(ce_id in any::<String>(), ce_type in ce_type(), payload in any::<Vec<u8>>()) {
            let settings = settings();
            for topic in ["payments.events", "customers.events", "elsewhere"] {
                let _ = decode(&settings, &message(topic, ce_id.clone(), ce_type, payload.clone()));
            }
        }

        #[test]
        fn what_is_accepted_is_clean(ce_id in ce_id(), ce_type in ce_type(), payload in payload()) {
            let settings = settings();
            let topic = if ce_type == CUSTOMER_UPDATED { "customers.events" } else { "payments.events" };
            if let Ok((id, event)) = decode(&settings, &message(topic, ce_id, ce_type, payload)) {
                let clean = |s: &str| !s.chars().any(|c| c == '\0' || (c.is_control() && c != '\n' && c != '\t'));
                prop_assert!(!id.is_empty() && id.len() <= 255 && clean(&id));
                match event {
                    Event::PaymentCaptured { payment, .. } => {
                        prop_assert!(clean(&payment.payment_id) && payment.amount_minor >= 0 && payment.currency.len() == 3);
                    }
                    Event::PaymentFailed { reason, .. } => prop_assert!(clean(&reason) && !reason.trim().is_empty()),
                    Event::CustomerUpdated(c) => {
                        prop_assert!(clean(&c.display_name) && c.version >= 1 && !c.customer_id.is_empty());
                    }
                }
            }
        }

        #[test]
        fn a_nul_anywhere_in_a_string_field_is_a_poison_verdict(prefix in "[a-z]{0,8}", suffix in "[a-z]{0,8}") {
            let settings = settings();
            let bad = format!("{prefix}\u{0}{suffix}");
            let failed = serde_json::json!({"paymentId": "p", "orderId": "01938f6e-4c2a-7b3e-9d41-6a2f0c5e8b17", "reason": bad});
            let verdict = decode(&settings, &message("payments.events", "id-1".into(), PAYMENT_FAILED, failed.to_string().into_bytes()));
            prop_assert!(matches!(&verdict, Err(reason) if reason.contains("U+0000")), "{:?}", verdict.err());
            let verdict = decode(&settings, &message("payments.events", bad.clone(), PAYMENT_FAILED, Vec::new()));
            prop_assert!(matches!(&verdict, Err(reason) if reason.contains("ce_id")), "{:?}", verdict.err());
        }
    }
}
