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
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]{1,64}$", example = "SKU-123")]
    pub sku: String,
    /// Units ordered: 1–1000 (a JSON integer).
    #[schema(minimum = 1, maximum = 1000, example = 2)]
    #[serde(deserialize_with = "json_integer")]
    pub quantity: i64,
    /// Price of one unit in the currency's minor unit (cents), a JSON integer from 0 to
    /// 92233720368547 (so no order total can overflow 64 bits).
    #[schema(minimum = 0, maximum = 92_233_720_368_547_i64, example = 1999)]
    #[serde(deserialize_with = "json_integer")]
    pub unit_price_minor: i64,
}

/// Reads a JSON integer the way JSON Schema defines one: any number with a zero fractional
/// part, so `2.0` is `2` (a client that writes doubles is not refused for a valid value).
/// Magnitudes beyond `i64` saturate, so the domain's range check names the field instead of
/// the parser failing the whole body; numbers with a fraction are refused here.
fn json_integer<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(n) = number.as_i64() {
        return Ok(n);
    }
    if number.as_u64().is_some() {
        return Ok(i64::MAX);
    }
    match number.as_f64() {
        // Saturating cast: out-of-range doubles become i64::MIN / i64::MAX.
        Some(f) if f.fract() == 0.0 => Ok(f as i64),
        _ => Err(serde::de::Error::custom(format_args!("invalid number {number}, expected an integer"))),
    }
}

/// Body of `POST /v1/orders`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateOrderBody {
    /// The customer placing the order: 1–64 characters of `A-Z a-z 0-9 . _ : @ -`,
    /// starting with a letter or digit.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$",
        example = "cust-42"
    )]
    pub customer_id: String,
    /// 1–100 lines.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<LineItemBody>,
    /// An active ISO 4217 currency code, upper case.
    #[schema(value_type = CurrencyCode, example = "EUR")]
    pub currency: String,
    /// Optional free text: at most 500 characters, no control characters except newlines.
    #[schema(max_length = 500, pattern = "^[^\\x00-\\x09\\x0b-\\x1f\\x7f-\\x9f]*$")]
    pub note: Option<String>,
}

/// The currency codes the server accepts, as a named enum in the document (from the
/// domain's list), so generated clients get one `CurrencyCode` type.
pub struct CurrencyCode;

impl utoipa::PartialSchema for CurrencyCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("An active ISO 4217 currency code, upper case."))
            .enum_values(Some(crate::domain::ISO_4217.split(' ')))
            .examples(["EUR"])
            .into()
    }
}

impl utoipa::ToSchema for CurrencyCode {}

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
    /// Orders per page: 1–100; 0 or absent means 20.
    #[param(minimum = 0, maximum = 100)]
    pub page_size: Option<i64>,
    /// `next_page_token` from the previous page (opaque; empty means the first page).
    #[param(pattern = "^(v1\\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?$")]
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
        ("Idempotency-Key" = String, Header, pattern = "^([!#-~]{1,255}|\"[!#-~]{1,255}\")$",
            description = "Required. 1-255 visible ASCII characters other than `\"`, bare or in double quotes. \
            Scoped to the caller, method and target; a retry with the same key and body replays the original response \
            (for 24 h by default)."),
    ),
    request_body = CreateOrderBody,
    responses(
        (status = 201, description = "Order created, or an earlier response replayed", body = OrderBody,
            headers(("Location" = String, description = "URL of the new order"),
                    ("Idempotent-Replayed" = String, description = "`true` when this is a replay of an earlier response")),
            links(
                ("GetOrder" = (operation_id = "getOrder", parameters(("id" = "$response.body#/id")),
                    description = "The order just created")),
                ("CancelOrder" = (operation_id = "cancelOrder", parameters(("id" = "$response.body#/id")),
                    description = "Cancel the order just created")),
            )),
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

/// The legacy status view of `GET /v1/orders/{id}/status`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrderStatusView {
    /// The order id.
    pub id: Uuid,
    /// Current state.
    pub status: OrderStatusBody,
}

/// Get only an order's status (legacy; use `GET /v1/orders/{id}`).
///
/// Kept for clients written before the full order was returned. It is in the deprecation
/// table (`APP_DEPRECATIONS`): responses carry `Deprecation`, `Sunset` and `Link` headers,
/// and after the sunset it answers 410 Gone.
#[utoipa::path(
    get, path = "/v1/orders/{id}/status", tag = "orders", operation_id = "getOrderStatus",
    params(("id" = Uuid, Path, description = "Order id")),
    responses(
        (status = 200, description = "The order's status", body = OrderStatusView),
        (status = 400, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable or request timed out; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_order_status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<OrderStatusView>, ApiError> {
    let id = OrderId::parse("id", &id)?;
    let (order, _) = state.orders.get(id).await?;
    let OrderBody { id, status, .. } = order.into();
    Ok(axum::Json(OrderStatusView { id, status }))
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
        ("Idempotency-Key" = Option<String>, Header, pattern = "^([!#-~]{1,255}|\"[!#-~]{1,255}\")$",
            description = "Optional; same semantics as on createOrder, scoped to this order."),
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

/// The trace context stored with the events this request emits: the request's span, or
/// with tracing off the caller's W3C headers.
fn trace_context(headers: &HeaderMap) -> TraceContext {
    crate::telemetry::event_context(|name| headers.get(name).and_then(|v| v.to_str().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CustomerId, Note, Sku};
    use utoipa::OpenApi;

    /// The document's rule for `field` of component `schema`, as JSON.
    fn rule(schema: &str, field: &str) -> serde_json::Value {
        let doc = serde_json::to_value(crate::http::ApiDoc::openapi()).expect("serializable");
        doc["components"]["schemas"][schema]["properties"][field].clone()
    }

    /// What a client generated from the document would accept, for a string field.
    fn spec_accepts(rule: &serde_json::Value, raw: &str) -> bool {
        let pattern = regex::Regex::new(rule["pattern"].as_str().expect("a pattern")).expect("a valid regex");
        let chars = raw.chars().count() as u64;
        pattern.is_match(raw)
            && rule["minLength"].as_u64().is_none_or(|min| chars >= min)
            && rule["maxLength"].as_u64().is_none_or(|max| chars <= max)
    }

    /// The spec and the server agree on every string rule: a string the document allows is
    /// accepted, and one it forbids is refused, over samples at every edge of each rule.
    #[test]
    fn the_documented_string_rules_are_the_servers() {
        let mut samples: Vec<String> =
            ["", "a", "A-1", "-a", ".a", "a b", "é", "a@b:c.d_e-f", "a\n", "a\r", "\0", "\u{7f}"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        samples.extend(["a".repeat(63), "a".repeat(64), "a".repeat(65), "é".repeat(500), "é".repeat(501)]);
        samples.extend(["line\nbreak".into(), "tab\there".into(), "\u{85}".into(), "\u{a0}".into()]);
        type Accepts = fn(&str) -> bool;
        let cases: [(&str, &str, &str, Accepts); 3] = [
            ("CreateOrderBody", "customer_id", CustomerId::PATTERN, |s| CustomerId::parse("f", s).is_ok()),
            ("LineItemBody", "sku", Sku::PATTERN, |s| Sku::parse("f", s).is_ok()),
            ("CreateOrderBody", "note", Note::PATTERN, |s| Note::parse("f", s).is_ok()),
        ];
        for (schema, field, pattern, server_accepts) in cases {
            let rule = rule(schema, field);
            assert_eq!(rule["pattern"], pattern, "{schema}.{field}: the attribute drifted from the domain");
            for raw in &samples {
                assert_eq!(spec_accepts(&rule, raw), server_accepts(raw), "{schema}.{field} on {raw:?}");
            }
        }
    }

    /// JSON Schema's integer is any number without a fraction; so is the server's.
    #[test]
    fn integers_follow_json_schema() {
        let line = |n: &str| {
            serde_json::from_str::<LineItemBody>(&format!(
                r#"{{"sku":"A","quantity":{n},"unit_price_minor":{n}}}"#
            ))
        };
        assert_eq!(line("2.0").expect("integral double").quantity, 2);
        assert_eq!(line("1e3").expect("exponent").unit_price_minor, 1000);
        assert_eq!(line("1e30").expect("saturates").quantity, i64::MAX);
        assert_eq!(line("18446744073709551615").expect("saturates").quantity, i64::MAX);
        assert_eq!(line("-1e30").expect("saturates").quantity, i64::MIN);
        assert!(line("2.5").is_err());
        assert!(line("\"2\"").is_err());
    }
}
