//! Pact consumer tests: this service as the consumer of `payments.events` and
//! `customers.events`. Each test states, with `pact_consumer`, the messages the inbox relies
//! on (body shape, CloudEvents metadata), feeds every example message through the real
//! inbox handler on PostgreSQL and checks its effect, then compares the pact it wrote with
//! the committed `pacts/orders-service-<provider>.json`: the contract the providers verify
//! is the one this code was tested against. `UPDATE_PACTS=1` rewrites the committed file.

use std::{path::PathBuf, sync::Arc};

use orders_service::{
    domain::{LineItemDraft, NewOrder, Order, OrderDraft, OrderId, OrderStatus},
    inbox::{InboundMessage, Inbox, Outcome},
    store::Store,
};
use pact_consumer::{builders::MessageInteractionBuilder, prelude::*};
use pact_models::{
    matchingrules::{MatchingRule, RuleLogic},
    path_exp::DocPath,
    v4::async_message::AsynchronousMessage,
};
use serde_json::Value;

use crate::{
    inbox::{Topics, inbox},
    outbox::Pipeline,
    support::Backend,
};

const PAID_ORDER: &str = "01938f6e-4c2a-7b3e-9d41-6a2f0c5e8b17";
const UNPAID_ORDER: &str = "01938f6e-4c2a-7b3e-9d41-6a2f0c5e8b18";
const UUID: &str = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";
/// What the inbox accepts as a message id (its dedup key): 1-255 characters.
const CE_ID: &str = r"^\S{1,255}$";

/// A message interaction with the CloudEvents metadata the inbox reads, and no more: the
/// type and spec version exactly, `ce_id` (the dedup key) by shape.
fn cloud_event(
    description: &str,
    state: &str,
    (ce_type, ce_id): (&str, &str),
    body: JsonPattern,
) -> AsynchronousMessage {
    let mut builder = MessageInteractionBuilder::new(description);
    builder
        .given(state)
        .json_body(body)
        .metadata("contentType", "application/json")
        .metadata("ce_specversion", "1.0")
        .metadata("ce_type", ce_type)
        .metadata("ce_id", ce_id);
    let mut message = builder.build();
    // The builder has no matchers for metadata; add them to the built interaction.
    message.contents.matching_rules.add_category("metadata").add_rule(
        DocPath::new_unwrap("ce_id"),
        MatchingRule::Regex(CE_ID.into()),
        RuleLogic::And,
    );
    message
}

/// The example message as the Kafka runner would hand it to the inbox.
fn inbound(message: &AsynchronousMessage, topic: &str) -> InboundMessage {
    let headers = message
        .contents
        .metadata
        .iter()
        .map(|(key, value)| {
            let key = if key == "contentType" { "content-type" } else { key.as_str() };
            (key.to_owned(), value.as_str().expect("string metadata").to_owned())
        })
        .collect();
    InboundMessage {
        topic: topic.to_owned(),
        partition: 0,
        offset: 0,
        key: None,
        headers,
        payload: message.contents.contents.value().expect("a body").to_vec(),
    }
}

/// The consumer-side state: a pending order of 25.00 EUR with the id the message names.
async fn pending_order(store: &Arc<dyn Store>, message: &AsynchronousMessage) -> Order {
    let body: Value =
        serde_json::from_slice(&message.contents.contents.value().expect("body")).expect("json");
    let draft = OrderDraft {
        customer_id: "cust-1".into(),
        items: vec![LineItemDraft { sku: "SKU-1".into(), quantity: 2, unit_price_minor: 1250 }],
        currency: "EUR".into(),
        note: None,
    };
    let order = Order::create(
        OrderId::parse("orderId", body["orderId"].as_str().expect("orderId")).expect("a valid id"),
        NewOrder::parse(draft).expect("draft"),
        chrono::Utc::now(),
    );
    let mut tx = store.begin().await.expect("begin");
    tx.insert_order(&order, None).await.expect("insert");
    tx.commit().await.expect("commit");
    order
}

/// Writes the pact of `builder` (by dropping its message iterator) and compares it with the
/// committed file, or rewrites that file with `UPDATE_PACTS=1`.
fn check_against_committed(written_in: &tempfile::TempDir, file: &str) {
    let written = written_in.path().join(file);
    let generated: Value =
        serde_json::from_slice(&std::fs::read(&written).expect("pact written")).expect("json");
    let committed_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pacts").join(file);
    if std::env::var_os("UPDATE_PACTS").is_some() {
        let text = serde_json::to_string_pretty(&generated).expect("json") + "\n";
        std::fs::write(&committed_path, text).expect("write the committed pact");
        return;
    }
    let committed: Value = std::fs::read(&committed_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Value::Null);
    assert!(
        committed == generated,
        "pacts/{file} differs from what the consumer test generates; review and run with UPDATE_PACTS=1:\n{}",
        serde_json::to_string_pretty(&generated).expect("json")
    );
}

async fn handled(inbox: &Inbox, message: &InboundMessage) -> Outcome {
    inbox
        .handle(message)
        .await
        .unwrap_or_else(|e| panic!("{} was not handled: {e}", String::from_utf8_lossy(&message.payload)))
}

#[tokio::test]
async fn payments_events_the_inbox_relies_on() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let inbox = inbox(&pipeline, pipeline.store.clone(), &topics, std::time::Duration::from_secs(3600));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pact = PactBuilder::new_v4("orders-service", "payments-service");
    pact.with_output_dir(dir.path());
    pact.push_interaction(&cloud_event(
        "a PaymentCaptured event",
        "a payment was captured for an order",
        ("payments.events.v1.PaymentCaptured", "01938f6e-5d11-7c0a-8b9e-3f4a5b6c7d01"),
        json_pattern!({
            "paymentId": like!("pay-1"),
            "orderId": term!(UUID, PAID_ORDER),
            "amountMinor": term!(r"^\d+$", "2500"),
            "currency": term!("^[A-Z]{3}$", "EUR"),
        }),
    ));
    pact.push_interaction(&cloud_event(
        "a PaymentFailed event",
        "a payment failed for an order",
        ("payments.events.v1.PaymentFailed", "01938f6e-5d11-7c0a-8b9e-3f4a5b6c7d02"),
        json_pattern!({
            "paymentId": like!("pay-1"),
            "orderId": term!(UUID, UNPAID_ORDER),
            "reason": like!("card declined"),
        }),
    ));
    {
        let messages = pact.messages();
        let mut described = Vec::new();
        for message in messages {
            let order = pending_order(&pipeline.store, &message).await;
            let inbound = inbound(&message, &topics.payments);
            assert_eq!(handled(&inbox, &inbound).await, Outcome::Applied, "{}", message.description);
            let stored = pipeline.store.get_order(order.id).await.expect("get").expect("order");
            match message.description.as_str() {
                "a PaymentCaptured event" => {
                    assert_eq!(
                        (stored.status, stored.payment_id.as_deref()),
                        (OrderStatus::Paid, Some("pay-1"))
                    );
                }
                "a PaymentFailed event" => {
                    assert_eq!(
                        (stored.status, stored.payment_failure.as_deref()),
                        (OrderStatus::Pending, Some("card declined"))
                    );
                }
                other => panic!("no check for {other:?}"),
            }
            described.push(message.description.clone());
        }
        assert_eq!(described.len(), 2, "every interaction was exercised");
    } // dropping the iterator writes the pact
    check_against_committed(&dir, "orders-service-payments-service.json");
}

#[tokio::test]
async fn customers_events_the_inbox_relies_on() {
    let pipeline = Pipeline::new(Backend::Postgres).await;
    let topics = Topics::create().await;
    let inbox = inbox(&pipeline, pipeline.store.clone(), &topics, std::time::Duration::from_secs(3600));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pact = PactBuilder::new_v4("orders-service", "customers-service");
    pact.with_output_dir(dir.path());
    pact.push_interaction(&cloud_event(
        "a CustomerUpdated event",
        "a customer changed their display name",
        ("customers.events.v1.CustomerUpdated", "01938f6e-5d11-7c0a-8b9e-3f4a5b6c7d03"),
        json_pattern!({
            "customerId": like!("cust-1"),
            "displayName": like!("Ada Lovelace"),
            "tier": term!("^CUSTOMER_TIER_(STANDARD|GOLD|PLATINUM)$", "CUSTOMER_TIER_GOLD"),
            "version": term!(r"^[1-9]\d*$", "3"),
        }),
    ));
    {
        let messages: Vec<_> = pact.messages().collect();
        assert_eq!(messages.len(), 1);
        let inbound = inbound(&messages[0], &topics.customers);
        assert_eq!(handled(&inbox, &inbound).await, Outcome::Applied);
        let name = pipeline.store.customer_display_name("cust-1").await.expect("read");
        assert_eq!(name.as_deref(), Some("Ada Lovelace"), "the projection took the event");
    }
    check_against_committed(&dir, "orders-service-customers-service.json");
}
