//! The gRPC adapter: `orders.v1.OrderService`. Translates protobuf messages into domain
//! input and [`ApiError`]s into precise status codes with `google.rpc.BadRequest` details.

use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use crate::{
    domain::{LineItemDraft, ListQuery, NewOrder, Order, OrderDraft, OrderId, OrderStatus},
    error::ApiError,
    orders::Orders,
    outbox::TraceContext,
    pb::orders::v1::{
        self as pb,
        order_service_server::{OrderService, OrderServiceServer},
    },
};

/// The gRPC service implementation.
pub struct GrpcOrders {
    orders: Orders,
}

impl GrpcOrders {
    /// Wraps the use-cases in a tonic server, with the message size limit applied.
    pub fn server(orders: Orders, max_message_bytes: usize) -> OrderServiceServer<Self> {
        OrderServiceServer::new(Self { orders })
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes * 4)
    }
}

#[tonic::async_trait]
impl OrderService for GrpcOrders {
    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::CreateOrderResponse>, Status> {
        let trace = trace_context(request.metadata());
        let r = request.into_inner();
        let draft = OrderDraft {
            customer_id: r.customer_id,
            items: r
                .items
                .into_iter()
                .map(|i| LineItemDraft {
                    sku: i.sku,
                    quantity: i.quantity.into(),
                    unit_price_minor: i.unit_price_minor,
                })
                .collect(),
            currency: r.currency,
            note: r.note,
        };
        let new = NewOrder::parse(draft).map_err(ApiError::from)?;
        let order = self.orders.create(new, &trace).await?;
        Ok(Response::new(pb::CreateOrderResponse { order: Some(to_pb(order)) }))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let id = OrderId::parse("id", &request.into_inner().id).map_err(ApiError::from)?;
        let (order, customer_display_name) = self.orders.get(id).await?;
        Ok(Response::new(pb::GetOrderResponse {
            order: Some(pb::Order { customer_display_name, ..to_pb(order) }),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let r = request.into_inner();
        let query =
            ListQuery::parse(Some(r.page_size.into()), Some(&r.page_token)).map_err(ApiError::from)?;
        let page = self.orders.list(query).await?;
        Ok(Response::new(pb::ListOrdersResponse {
            orders: page.orders.into_iter().map(to_pb).collect(),
            next_page_token: page.next.map(|t| t.encode()).unwrap_or_default(),
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CancelOrderResponse>, Status> {
        let trace = trace_context(request.metadata());
        let id = OrderId::parse("id", &request.into_inner().id).map_err(ApiError::from)?;
        let order = self.orders.cancel(id, &trace).await?;
        Ok(Response::new(pb::CancelOrderResponse { order: Some(to_pb(order)) }))
    }
}

/// The caller's W3C trace context from gRPC metadata.
fn trace_context(metadata: &tonic::metadata::MetadataMap) -> TraceContext {
    let get = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
    TraceContext::from_headers(get("traceparent"), get("tracestate"))
}

fn to_pb(order: Order) -> pb::Order {
    let timestamp = |t: chrono::DateTime<chrono::Utc>| Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    };
    pb::Order {
        id: order.id.to_string(),
        customer_id: order.customer_id.to_string(),
        items: order
            .items
            .into_iter()
            .map(|i| pb::LineItem {
                sku: i.sku.to_string(),
                quantity: i.quantity.get(),
                unit_price_minor: i.unit_price_minor,
            })
            .collect(),
        currency: order.currency.to_string(),
        total_minor: order.total_minor,
        status: match order.status {
            OrderStatus::Pending => pb::OrderStatus::Pending,
            OrderStatus::Paid => pb::OrderStatus::Paid,
            OrderStatus::Cancelled => pb::OrderStatus::Cancelled,
        } as i32,
        note: order.note.map(|n| n.to_string()),
        create_time: Some(timestamp(order.created_at)),
        update_time: Some(timestamp(order.updated_at)),
        version: order.version,
        customer_display_name: None,
        payment_id: order.payment_id,
        payment_failure: order.payment_failure,
    }
}
