//! REST handlers for `/v1/orders` and their JSON bodies. Handlers only translate: wire
//! types in, [`OrderDraft`]/[`OrderId`] through the domain's validation, use-case, wire out.

use axum::{
    Extension,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::IntoResponse,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    AppState,
    extract::{Json, Path, Query},
};
use crate::{
    domain::{LineItemDraft, ListQuery, NewOrder, Order, OrderDraft, OrderId, OrderStatus},
    error::{ApiError, Problem},
    idempotency::{IdempotencyContext, http::IDEMPOTENT_REPLAYED},
    outbox::TraceContext,
};

/// One order line, in requests and responses.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LineItemBody {
    /// Stock keeping unit: 1–64 characters of `A-Z a-z 0-9 - _ .`.
    #[schema(example = "SKU-123")]
    pub sku: String,
    /// Units ordered: 1–1000.
    #[schema(minimum = 1, maximum = 1000, example = 2)]
    pub quantity: i64,
    /// Price of one unit in the currency's minor unit (cents): >= 0.
    #[schema(minimum = 0, example = 1999)]
    pub unit_price_minor: i64,
}

/// Body of `POST /v1/orders`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateOrderBody {
    /// The customer placing the order: 1–64 characters.
    #[schema(example = "cust-42")]
    pub customer_id: String,
    /// 1–100 lines.
    pub items: Vec<LineItemBody>,
    /// ISO 4217 code in upper case.
    #[schema(example = "EUR")]
    pub currency: String,
    /// Optional free text, at most 500 characters.
    pub note: Option<String>,
}

/// Order states; clients must tolerate values added later.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatusBody {
    /// Awaiting payment; cancellable.
    Pending,
    /// Paid.
    Paid,
    /// Cancelled; terminal.
    Cancelled,
}

/// An order as returned by every endpoint.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrderBody {
    /// UUID v7 assigned by the server.
    pub id: Uuid,
    /// The customer who placed the order.
    pub customer_id: String,
    /// The lines.
    pub items: Vec<LineItemBody>,
    /// ISO 4217 currency code.
    pub currency: String,
    /// Sum of quantity × unit price, computed by the server.
    pub total_minor: i64,
    /// Current state.
    pub status: OrderStatusBody,
    /// The customer's note, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Creation time (RFC 3339).
    pub create_time: DateTime<Utc>,
    /// Time of the last change (RFC 3339).
    pub update_time: DateTime<Utc>,
    /// Starts at 1; incremented on every change.
    pub version: i64,
    /// The customer's display name, when known (`GET /v1/orders/{id}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_display_name: Option<String>,
    /// The payment that paid the order (once PAID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// Why the last payment attempt failed, while PENDING.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_failure: Option<String>,
}

/// One page of `GET /v1/orders`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrderPageBody {
    /// Orders on this page, newest first.
    pub orders: Vec<OrderBody>,
    /// Pass as `page_token` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// Query parameters of `GET /v1/orders`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Orders per page: 1–100, default 20.
    pub page_size: Option<i64>,
    /// `next_page_token` from the previous page.
    pub page_token: Option<String>,
}

impl From<Order> for OrderBody {
    fn from(order: Order) -> Self {
        Self {
            id: order.id.as_uuid(),
            customer_id: order.customer_id.to_string(),
            items: order
                .items
                .into_iter()
                .map(|i| LineItemBody {
                    sku: i.sku.to_string(),
                    quantity: i.quantity.get().into(),
                    unit_price_minor: i.unit_price_minor,
                })
                .collect(),
            currency: order.currency.to_string(),
            total_minor: order.total_minor,
            status: match order.status {
                OrderStatus::Pending => OrderStatusBody::Pending,
                OrderStatus::Paid => OrderStatusBody::Paid,
                OrderStatus::Cancelled => OrderStatusBody::Cancelled,
            },
            note: order.note.map(|n| n.to_string()),
            create_time: order.created_at,
            update_time: order.updated_at,
            version: order.version,
            customer_display_name: None,
            payment_id: order.payment_id,
            payment_failure: order.payment_failure,
        }
    }
}

impl From<CreateOrderBody> for OrderDraft {
    fn from(body: CreateOrderBody) -> Self {
        Self {
            customer_id: body.customer_id,
            items: body
                .items
                .into_iter()
                .map(|i| LineItemDraft {
                    sku: i.sku,
                    quantity: i.quantity,
                    unit_price_minor: i.unit_price_minor,
                })
                .collect(),
            currency: body.currency,
            note: body.note,
        }
    }
}

/// Create an order.
#[utoipa::path(
    post, path = "/v1/orders", tag = "orders", operation_id = "createOrder",
    params(
        ("Idempotency-Key" = String, Header, description = "Required. 1-255 visible ASCII characters, bare or quoted. \
            Scoped to the caller, method and route; a retry with the same key and body replays the original response \
            (for 24 h by default)."),
    ),
    request_body = CreateOrderBody,
    responses(
        (status = 201, description = "Order created, or an earlier response replayed", body = OrderBody,
            headers(("Location" = String, description = "URL of the new order"),
                    ("Idempotent-Replayed" = String, description = "`true` when this is a replay of an earlier response"))),
        (status = 400, description = "Validation failed, malformed JSON, or the Idempotency-Key is missing or malformed", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A request with this Idempotency-Key is still in flight; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The Idempotency-Key was used with a different request", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body larger than the limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable or request timed out; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    idempotency: Option<Extension<IdempotencyContext>>,
    Json(body): Json<CreateOrderBody>,
) -> Result<impl IntoResponse, ApiError> {
    let new = NewOrder::parse(body.into())?;
    let idempotency = idempotency.map(|Extension(context)| context);
    let created = state.orders.create(new, &trace_context(&headers), idempotency.as_ref()).await?;
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/orders/{}", created.order.id)) {
        headers.insert(header::LOCATION, location);
    }
    if created.replayed {
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok((StatusCode::CREATED, headers, axum::Json(OrderBody::from(created.order))))
}

/// Get one order.
#[utoipa::path(
    get, path = "/v1/orders/{id}", tag = "orders", operation_id = "getOrder",
    params(("id" = Uuid, Path, description = "Order id")),
    responses(
        (status = 200, description = "The order", body = OrderBody),
        (status = 400, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable or request timed out; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<OrderBody>, ApiError> {
    let id = OrderId::parse("id", &id)?;
    let (order, customer_display_name) = state.orders.get(id).await?;
    Ok(axum::Json(OrderBody { customer_display_name, ..order.into() }))
}

/// List orders, newest first.
#[utoipa::path(
    get, path = "/v1/orders", tag = "orders", operation_id = "listOrders",
    params(ListParams),
    responses(
        (status = 200, description = "One page of orders", body = OrderPageBody),
        (status = 400, description = "Invalid page_size or page_token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable or request timed out; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_orders(
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
) -> Result<axum::Json<OrderPageBody>, ApiError> {
    let query = ListQuery::parse(params.page_size, params.page_token.as_deref())?;
    let page = state.orders.list(query).await?;
    Ok(axum::Json(OrderPageBody {
        orders: page.orders.into_iter().map(OrderBody::from).collect(),
        next_page_token: page.next.map(|t| t.encode()),
    }))
}

/// Cancel a PENDING order.
#[utoipa::path(
    post, path = "/v1/orders/{id}/cancel", tag = "orders", operation_id = "cancelOrder",
    params(
        ("id" = Uuid, Path, description = "Order id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Optional; same semantics as on createOrder."),
    ),
    responses(
        (status = 200, description = "The cancelled order", body = OrderBody),
        (status = 400, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The order is not PENDING (type invalid-state), a concurrent update won (type concurrent-update; retry), or a request with the same Idempotency-Key is in flight", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The Idempotency-Key was used with a different request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable or request timed out; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<OrderBody>, ApiError> {
    let id = OrderId::parse("id", &id)?;
    Ok(axum::Json(state.orders.cancel(id, &trace_context(&headers)).await?.into()))
}

/// The caller's W3C trace context, stored with the events this request emits.
fn trace_context(headers: &HeaderMap) -> TraceContext {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    TraceContext::from_headers(get("traceparent"), get("tracestate"))
}
