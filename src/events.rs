//! The events this service publishes, encoded for the outbox: `orders.events.v1` messages
//! in the proto3 JSON mapping (see `proto/orders/events/v1/events.proto`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    domain::{CapturedPayment, Order},
    outbox::{NewOutboxEvent, TraceContext, partition_of},
    pb::orders::events::v1 as pb,
};

/// Aggregate type of every order event.
pub const ORDER_AGGREGATE: &str = "order";
/// CloudEvents type of [`pb::OrderCreated`].
pub const ORDER_CREATED: &str = "orders.events.v1.OrderCreated";
/// CloudEvents type of [`pb::OrderPaid`].
pub const ORDER_PAID: &str = "orders.events.v1.OrderPaid";
/// CloudEvents type of [`pb::OrderCancelled`].
pub const ORDER_CANCELLED: &str = "orders.events.v1.OrderCancelled";

fn timestamp(t: DateTime<Utc>) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// `OrderCreated` for a newly stored order.
pub fn order_created(order: &Order, trace: &TraceContext, partitions: i32) -> NewOutboxEvent {
    let message = pb::OrderCreated {
        order_id: order.id.to_string(),
        customer_id: order.customer_id.to_string(),
        items: order
            .items
            .iter()
            .map(|i| pb::OrderLine {
                sku: i.sku.to_string(),
                quantity: i.quantity.get(),
                unit_price_minor: i.unit_price_minor,
            })
            .collect(),
        currency: order.currency.to_string(),
        total_minor: order.total_minor,
        note: order.note.as_ref().map(|n| n.to_string()),
        create_time: Some(timestamp(order.created_at)),
        version: order.version,
    };
    outbox_event(order, ORDER_CREATED, json(&message), trace, partitions)
}

/// `OrderCancelled` for an order that was just cancelled.
pub fn order_cancelled(order: &Order, trace: &TraceContext, partitions: i32) -> NewOutboxEvent {
    let message = pb::OrderCancelled {
        order_id: order.id.to_string(),
        cancel_time: Some(timestamp(order.updated_at)),
        version: order.version,
    };
    outbox_event(order, ORDER_CANCELLED, json(&message), trace, partitions)
}

/// `OrderPaid` for an order a captured payment just paid.
pub fn order_paid(
    order: &Order,
    payment: &CapturedPayment,
    trace: &TraceContext,
    partitions: i32,
) -> NewOutboxEvent {
    let message = pb::OrderPaid {
        order_id: order.id.to_string(),
        payment_id: payment.payment_id.clone(),
        amount_minor: payment.amount_minor,
        currency: payment.currency.clone(),
        pay_time: Some(timestamp(order.updated_at)),
        version: order.version,
    };
    outbox_event(order, ORDER_PAID, json(&message), trace, partitions)
}

fn json<T: serde::Serialize>(message: &T) -> Vec<u8> {
    // Generated proto3-JSON serializers of plain messages cannot fail.
    serde_json::to_vec(message).unwrap_or_default()
}

fn outbox_event(
    order: &Order,
    event_type: &'static str,
    payload: Vec<u8>,
    trace: &TraceContext,
    partitions: i32,
) -> NewOutboxEvent {
    let aggregate_id = order.id.to_string();
    NewOutboxEvent {
        message_id: Uuid::now_v7(),
        partition: partition_of(&aggregate_id, partitions),
        partitions,
        aggregate_type: ORDER_AGGREGATE,
        aggregate_id,
        event_type,
        payload,
        trace: trace.clone(),
        created_at: order.updated_at,
    }
}
