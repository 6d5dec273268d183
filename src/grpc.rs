//! The gRPC adapter: `orders.v1.OrderService`. Translates protobuf messages into domain
//! input and [`ApiError`]s into precise status codes with `google.rpc.BadRequest` details.

use std::sync::Arc;

use prost::Message;
use prost_types::Timestamp;
use tonic::{Code, Request, Response, Status};

use crate::{
    domain::{LineItemDraft, ListQuery, NewOrder, Order, OrderDraft, OrderId, OrderStatus},
    error::ApiError,
    idempotency::{
        Executed, Fingerprint, Idempotency, IdempotencyContext, ScopedKey, StoredResponse,
        http::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED},
    },
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
    idempotency: Arc<Idempotency>,
}

/// Health checks and reflection bypass the concurrency limit: a mesh must see an
/// overloaded replica's health as it is.
pub fn exempt_from_limits(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The answer to a call shed at the concurrency limit: `UNAVAILABLE` (safe to retry: the
/// call was not started) with `retry-after` and gRPC's own retry pushback.
pub fn overloaded() -> http::Response<tonic::body::Body> {
    let mut status = Status::from(ApiError::Overloaded);
    status.metadata_mut().insert("retry-after", tonic::metadata::MetadataValue::from_static("1"));
    status
        .metadata_mut()
        .insert("grpc-retry-pushback-ms", tonic::metadata::MetadataValue::from_static("1000"));
    status.into_http()
}

/// gRPC method paths: what idempotency keys are scoped to (CancelOrder adds the order id).
const CREATE_ORDER: &str = "/orders.v1.OrderService/CreateOrder";
/// See [`CREATE_ORDER`].
const CANCEL_ORDER: &str = "/orders.v1.OrderService/CancelOrder";

impl GrpcOrders {
    /// Wraps the use-cases in a tonic server, with the message size limit applied.
    pub fn server(
        orders: Orders,
        idempotency: Arc<Idempotency>,
        max_message_bytes: usize,
    ) -> OrderServiceServer<Self> {
        OrderServiceServer::new(Self { orders, idempotency })
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
        let scope = CREATE_ORDER.to_owned();
        self.idempotent(request, scope, true, |request, context| self.create(request, context)).await
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let id = OrderId::parse("id", &request.into_inner().id).map_err(ApiError::from)?;
        let (order, customer_display_name) = self.orders.get(id).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::GetOrderResponse {
            order: Some(pb::Order { customer_display_name, ..to_pb(order) }),
        }))
    }

    async fn get_order_status(
        &self,
        request: Request<pb::GetOrderStatusRequest>,
    ) -> Result<Response<pb::GetOrderStatusResponse>, Status> {
        let id = OrderId::parse("id", &request.into_inner().id).map_err(ApiError::from)?;
        let (order, _) = self.orders.get(id).await.map_err(ApiError::from)?;
        let pb::Order { id, status, .. } = to_pb(order);
        Ok(Response::new(pb::GetOrderStatusResponse { id, status }))
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let r = request.into_inner();
        let query =
            ListQuery::parse(Some(r.page_size.into()), Some(&r.page_token)).map_err(ApiError::from)?;
        let page = self.orders.list(query).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListOrdersResponse {
            orders: page.orders.into_iter().map(to_pb).collect(),
            next_page_token: page.next.map(|t| t.encode()).unwrap_or_default(),
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CancelOrderResponse>, Status> {
        // Scoped to the order, as REST scopes to the concrete path: one key, one target.
        let scope = format!("{CANCEL_ORDER}/{}", request.get_ref().id);
        self.idempotent(request, scope, false, |request, _| self.cancel(request)).await
    }
}

impl GrpcOrders {
    /// Runs a unary call under the Idempotency-Key rules (metadata `idempotency-key`,
    /// required or optional): replays, conflicts and mismatches are answered here; `op`
    /// runs at most once per key and returns the response and whether the database
    /// backstop replayed it.
    async fn idempotent<Req, Res, F, Fut>(
        &self,
        request: Request<Req>,
        route: String,
        required: bool,
        op: F,
    ) -> Result<Response<Res>, Status>
    where
        Req: Message,
        Res: Message + Default,
        F: FnOnce(Request<Req>, Option<IdempotencyContext>) -> Fut,
        Fut: Future<Output = Result<(Res, bool), ApiError>>,
    {
        let idem = &self.idempotency;
        let raw = request.metadata().get(IDEMPOTENCY_KEY).map(|v| v.to_str().ok());
        let Some(key) = idem.key(raw, required)? else {
            return Ok(Response::new(op(request, None).await?.0));
        };
        let identity = idem.caller(request.extensions().get(), |name| {
            request.metadata().get(name).and_then(|v| v.to_str().ok())
        });
        let fingerprint = Fingerprint::of("grpc", &route, &request.get_ref().encode_to_vec());
        let scoped = ScopedKey::new(&identity, "grpc", &route, &key);
        let context = IdempotencyContext { key: scoped.clone(), fingerprint, ttl: idem.settings().ttl };
        let executed = idem
            .execute(&scoped, &fingerprint, || async { stored(op(request, Some(context)).await) })
            .await
            .map_err(Status::from)?;
        match executed {
            Executed::Fresh(stored) => restore(stored, false),
            Executed::Replayed(stored) => restore(stored, true),
        }
    }

    /// CancelOrder proper.
    async fn cancel(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<(pb::CancelOrderResponse, bool), ApiError> {
        let trace = trace_context(request.metadata());
        let id = OrderId::parse("id", &request.into_inner().id)?;
        let order = self.orders.cancel(id, &trace).await?;
        Ok((pb::CancelOrderResponse { order: Some(to_pb(order)) }, false))
    }

    /// CreateOrder proper: validate, then the use-case with the backstop context.
    async fn create(
        &self,
        request: Request<pb::CreateOrderRequest>,
        context: Option<IdempotencyContext>,
    ) -> Result<(pb::CreateOrderResponse, bool), ApiError> {
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
        let new = NewOrder::parse(draft)?;
        let created = self.orders.create(new, &trace, context.as_ref()).await?;
        Ok((pb::CreateOrderResponse { order: Some(to_pb(created.order)) }, created.replayed))
    }
}

/// A unary outcome as stored for replay: code 0 with the encoded response, or the error's
/// code, message and details. Only deterministic outcomes are kept.
fn stored<Res: Message>(result: Result<(Res, bool), ApiError>) -> (StoredResponse, bool) {
    match result {
        Ok((response, replayed)) => {
            let headers =
                if replayed { vec![(IDEMPOTENT_REPLAYED.to_owned(), "true".to_owned())] } else { Vec::new() };
            (StoredResponse { status: 0, headers, body: response.encode_to_vec() }, true)
        }
        Err(error) => {
            let deterministic = !error.kind().status.is_server_error() && !error.retryable();
            let status = Status::from(error);
            let headers = vec![("grpc-message".to_owned(), status.message().to_owned())];
            (
                StoredResponse { status: status.code() as u16, headers, body: status.details().to_vec() },
                deterministic,
            )
        }
    }
}

/// Rebuilds the gRPC response (or status) from a stored outcome.
fn restore<Res: Message + Default>(stored: StoredResponse, replayed: bool) -> Result<Response<Res>, Status> {
    let replayed = replayed || stored.headers.iter().any(|(k, _)| k == IDEMPOTENT_REPLAYED);
    if stored.status != 0 {
        let message = stored
            .headers
            .iter()
            .find(|(k, _)| k == "grpc-message")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        return Err(Status::with_details(Code::from(i32::from(stored.status)), message, stored.body.into()));
    }
    let message = Res::decode(stored.body.as_slice())
        .map_err(|e| Status::internal(format!("corrupt stored response: {e}")))?;
    let mut response = Response::new(message);
    if replayed {
        response.extensions_mut().insert(Replayed);
    }
    Ok(response)
}

/// Marks a response as a replay; [`replayed_trailers`] turns it into trailing metadata.
#[derive(Debug, Clone, Copy)]
struct Replayed;

/// Response mapper for the gRPC server: a replayed response carries
/// `idempotent-replayed: true` in its trailers (trailing metadata), after the message, as
/// the key's outcome is only final once the call completed.
pub fn replayed_trailers<B>(response: http::Response<B>) -> http::Response<ReplayedTrailers<B>> {
    let add = response.extensions().get::<Replayed>().is_some();
    response.map(|inner| ReplayedTrailers { inner, add })
}

/// A response body that appends `idempotent-replayed: true` to the trailers when asked.
pub struct ReplayedTrailers<B> {
    inner: B,
    add: bool,
}

impl<B> http_body::Body for ReplayedTrailers<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let add = self.add;
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(frame))) if add && frame.is_trailers() => {
                let mut trailers = frame.into_trailers().unwrap_or_default();
                trailers.insert(IDEMPOTENT_REPLAYED, http::HeaderValue::from_static("true"));
                std::task::Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The trace context stored with the events this call emits: the call's span, or with
/// tracing off the caller's W3C metadata.
fn trace_context(metadata: &tonic::metadata::MetadataMap) -> TraceContext {
    crate::telemetry::event_context(|name| metadata.get(name).and_then(|v| v.to_str().ok()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_outcomes_a_client_is_not_told_to_retry_are_stored() {
        let ok: Result<(pb::CancelOrderResponse, bool), ApiError> =
            Ok((pb::CancelOrderResponse::default(), false));
        assert!(stored(ok).1, "a success is replayed");
        let conflict = ApiError::StateConflict(crate::domain::DomainError::InvalidTransition {
            from: crate::domain::OrderStatus::Cancelled,
            action: "cancel",
        });
        assert!(stored::<pb::CancelOrderResponse>(Err(conflict)).1, "a deterministic refusal is replayed");
        for retryable in [ApiError::ConcurrentUpdate, ApiError::Timeout, ApiError::IdempotencyInFlight] {
            let (response, keep) = stored::<pb::CancelOrderResponse>(Err(retryable));
            assert!(!keep, "code {} must run again on retry", response.status);
        }
    }
}
