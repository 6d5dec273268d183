//! The orders domain: validated value types and the order state machine.
//!
//! Nothing here knows about HTTP, gRPC or SQL. Adapters turn wire input into an
//! [`OrderDraft`] and call [`NewOrder::parse`]; an invalid order cannot be constructed, so
//! everything downstream can trust what it is given.

mod order;
mod page;
mod values;

pub use order::{
    CapturedPayment, LineItemDraft, MAX_UNIT_PRICE_MINOR, NewOrder, Order, OrderDraft, OrderStatus,
};
pub use page::{ListQuery, PageToken};
pub use values::{Currency, CustomerId, ISO_4217, LineItem, Note, OrderId, Quantity, Sku};

/// One invalid input field: the path of the field (as the client spelled it, e.g.
/// `items[2].quantity`) and a sentence saying what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// JSON-path-like location of the field, identical for REST and gRPC.
    pub field: String,
    /// Human-readable reason.
    pub message: String,
}

impl FieldViolation {
    /// Builds a violation for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Everything wrong with one request, collected so a client can fix it in one go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request: {}", .violations.iter().map(|v| format!("{}: {}", v.field, v.message)).collect::<Vec<_>>().join("; "))]
pub struct ValidationError {
    /// The violations, in field order.
    pub violations: Vec<FieldViolation>,
}

impl ValidationError {
    /// A validation error with a single violation.
    pub fn single(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { violations: vec![FieldViolation::new(field, message)] }
    }
}

/// Business rules that reject an operation on a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The input is malformed or out of range.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The order's current state does not allow the operation (e.g. cancelling twice).
    #[error("cannot {action} an order that is {from}")]
    InvalidTransition {
        /// The state the order is in.
        from: OrderStatus,
        /// What was attempted.
        action: &'static str,
    },
    /// A payment does not match the order (amount or currency).
    #[error("{0}")]
    PaymentMismatch(String),
}
