//! The order aggregate and its state machine.

use std::fmt;

use chrono::{DateTime, Utc};

use super::{
    Currency, CustomerId, DomainError, FieldViolation, LineItem, Note, OrderId, Quantity, Sku,
    ValidationError,
};

/// Where an order is in its lifecycle. New states are appended, never renumbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    /// Created, awaiting payment; the only cancellable state.
    Pending,
    /// Payment captured.
    Paid,
    /// Cancelled; terminal.
    Cancelled,
}

impl OrderStatus {
    /// The stable upper-case name used in storage, JSON and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Paid => "PAID",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Parses the stable name written by [`OrderStatus::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Pending, Self::Paid, Self::Cancelled].into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Unvalidated input for one line item, as any adapter received it.
#[derive(Debug, Clone, Default)]
pub struct LineItemDraft {
    /// Raw SKU.
    pub sku: String,
    /// Raw quantity; wide so negative input gets a validation error.
    pub quantity: i64,
    /// Raw unit price in minor units.
    pub unit_price_minor: i64,
}

/// Unvalidated input for a new order, as any adapter received it.
#[derive(Debug, Clone, Default)]
pub struct OrderDraft {
    /// Raw customer id.
    pub customer_id: String,
    /// Raw line items.
    pub items: Vec<LineItemDraft>,
    /// Raw currency code.
    pub currency: String,
    /// Raw note; `None` when absent.
    pub note: Option<String>,
}

/// The largest unit price: at 1000 units × 100 lines, no total can overflow 64 bits.
pub const MAX_UNIT_PRICE_MINOR: i64 = i64::MAX / (1000 * 100);

/// A validated request to create an order; its total is known not to overflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    /// Who ordered.
    pub customer_id: CustomerId,
    /// 1–100 lines.
    pub items: Vec<LineItem>,
    /// Currency of every price.
    pub currency: Currency,
    /// Optional note.
    pub note: Option<Note>,
    /// Sum of the line subtotals.
    pub total_minor: i64,
}

impl NewOrder {
    /// Validates a draft, reporting every violation at once.
    pub fn parse(draft: OrderDraft) -> Result<Self, ValidationError> {
        let mut v = Violations::default();
        let customer_id = v.check(CustomerId::parse("customer_id", &draft.customer_id));
        let currency = v.check(Currency::parse("currency", &draft.currency));
        let note = match &draft.note {
            Some(raw) => v.check(Note::parse("note", raw)).map(Some),
            None => Some(None),
        };
        if !(1..=100).contains(&draft.items.len()) {
            v.push("items", "must contain 1 to 100 items");
        }
        let mut items = Vec::with_capacity(draft.items.len());
        for (i, item) in draft.items.iter().enumerate() {
            let sku = v.check(Sku::parse(&format!("items[{i}].sku"), &item.sku));
            let quantity = v.check(Quantity::parse(&format!("items[{i}].quantity"), item.quantity));
            let price_ok = (0..=MAX_UNIT_PRICE_MINOR).contains(&item.unit_price_minor);
            if !price_ok {
                v.push(
                    format!("items[{i}].unit_price_minor"),
                    format!("must be between 0 and {MAX_UNIT_PRICE_MINOR}"),
                );
            }
            if let (Some(sku), Some(quantity), true) = (sku, quantity, price_ok) {
                items.push(LineItem { sku, quantity, unit_price_minor: item.unit_price_minor });
            }
        }
        // Unreachable with the bounds above; kept so a loosened bound cannot overflow silently.
        let total_minor = items.iter().try_fold(0i64, |sum, item| sum.checked_add(item.subtotal_minor()?));
        if total_minor.is_none() {
            v.push("items", "order total overflows a 64-bit amount");
        }
        match (customer_id, currency, note, total_minor) {
            (Some(customer_id), Some(currency), Some(note), Some(total_minor)) if v.0.is_empty() => {
                Ok(Self { customer_id, items, currency, note, total_minor })
            }
            _ => Err(ValidationError { violations: v.0 }),
        }
    }
}

/// Collects violations while validation carries on, so the client hears about all of them.
#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        result.map_err(|violation| self.0.push(violation)).ok()
    }

    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldViolation::new(field, message));
    }
}

/// The order aggregate as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Identity.
    pub id: OrderId,
    /// Who ordered.
    pub customer_id: CustomerId,
    /// The lines.
    pub items: Vec<LineItem>,
    /// Currency of every amount.
    pub currency: Currency,
    /// Sum of the line subtotals.
    pub total_minor: i64,
    /// Lifecycle state; change it only through the transition methods.
    pub status: OrderStatus,
    /// Optional note.
    pub note: Option<Note>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Time of the last state change.
    pub updated_at: DateTime<Utc>,
    /// Starts at 1, incremented by every transition; storage uses it for optimistic locking.
    pub version: i64,
    /// The payment that paid the order (set with PAID).
    pub payment_id: Option<String>,
    /// Why the last payment attempt failed, while the order is still payable.
    pub payment_failure: Option<String>,
}

/// A captured payment, as reported by the payments service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedPayment {
    /// The payment's id.
    pub payment_id: String,
    /// Amount captured in minor units.
    pub amount_minor: i64,
    /// Currency of the amount.
    pub currency: String,
}

impl Order {
    /// A new PENDING order.
    pub fn create(id: OrderId, new: NewOrder, now: DateTime<Utc>) -> Self {
        Self {
            id,
            customer_id: new.customer_id,
            items: new.items,
            currency: new.currency,
            total_minor: new.total_minor,
            status: OrderStatus::Pending,
            note: new.note,
            created_at: now,
            updated_at: now,
            version: 1,
            payment_id: None,
            payment_failure: None,
        }
    }

    /// PENDING → PAID, if the payment covers exactly the order's total in its currency.
    pub fn pay(&mut self, payment: &CapturedPayment, now: DateTime<Utc>) -> Result<(), DomainError> {
        if self.status == OrderStatus::Pending
            && (payment.amount_minor != self.total_minor || payment.currency != self.currency.as_str())
        {
            return Err(DomainError::PaymentMismatch(format!(
                "payment {} captured {} {} for an order of {} {}",
                payment.payment_id, payment.amount_minor, payment.currency, self.total_minor, self.currency
            )));
        }
        self.transition(OrderStatus::Pending, OrderStatus::Paid, "pay", now)?;
        self.payment_id = Some(payment.payment_id.clone());
        self.payment_failure = None;
        Ok(())
    }

    /// Records a failed payment attempt on a PENDING order; it stays payable.
    pub fn record_payment_failure(&mut self, reason: &str, now: DateTime<Utc>) -> Result<(), DomainError> {
        self.transition(OrderStatus::Pending, OrderStatus::Pending, "record a payment failure on", now)?;
        self.payment_failure = Some(reason.chars().take(500).collect());
        Ok(())
    }

    /// PENDING → CANCELLED. Anything else, including a second cancel, is a conflict.
    pub fn cancel(&mut self, now: DateTime<Utc>) -> Result<(), DomainError> {
        self.transition(OrderStatus::Pending, OrderStatus::Cancelled, "cancel", now)
    }

    fn transition(
        &mut self,
        from: OrderStatus,
        to: OrderStatus,
        action: &'static str,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        if self.status != from {
            return Err(DomainError::InvalidTransition { from: self.status, action });
        }
        self.status = to;
        self.updated_at = now;
        self.version += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft() -> OrderDraft {
        OrderDraft {
            customer_id: "cust-1".into(),
            items: vec![
                LineItemDraft { sku: "A".into(), quantity: 2, unit_price_minor: 150 },
                LineItemDraft { sku: "B".into(), quantity: 1, unit_price_minor: 99 },
            ],
            currency: "EUR".into(),
            note: None,
        }
    }

    #[test]
    fn computes_the_total() {
        assert_eq!(NewOrder::parse(draft()).expect("valid").total_minor, 399);
    }

    #[test]
    fn reports_every_violation_with_its_path() {
        let mut d = draft();
        d.customer_id = String::new();
        d.items[1].quantity = 0;
        d.items[0].unit_price_minor = -1;
        let fields: Vec<_> =
            NewOrder::parse(d).unwrap_err().violations.into_iter().map(|v| v.field).collect();
        assert_eq!(fields, ["customer_id", "items[0].unit_price_minor", "items[1].quantity"]);
    }

    #[test]
    fn rejects_empty_too_many_and_overflowing_items() {
        let mut d = draft();
        d.items.clear();
        assert_eq!(NewOrder::parse(d).unwrap_err().violations[0].field, "items");
        let mut d = draft();
        d.items = vec![LineItemDraft { sku: "A".into(), quantity: 1, unit_price_minor: 1 }; 101];
        assert_eq!(NewOrder::parse(d).unwrap_err().violations[0].field, "items");
        let mut d = draft();
        d.items[0].unit_price_minor = i64::MAX;
        assert_eq!(NewOrder::parse(d).unwrap_err().violations[0].field, "items[0].unit_price_minor");
        // The bound makes overflow impossible: the largest order still fits.
        let mut d = draft();
        d.items =
            vec![
                LineItemDraft { sku: "A".into(), quantity: 1000, unit_price_minor: MAX_UNIT_PRICE_MINOR };
                100
            ];
        assert!(NewOrder::parse(d).is_ok());
    }

    #[test]
    fn cancel_only_from_pending() {
        let now = Utc::now();
        let mut order = Order::create(OrderId::generate(), NewOrder::parse(draft()).expect("valid"), now);
        order.cancel(now).expect("pending orders cancel");
        assert_eq!((order.status, order.version), (OrderStatus::Cancelled, 2));
        assert_eq!(
            order.cancel(now),
            Err(DomainError::InvalidTransition { from: OrderStatus::Cancelled, action: "cancel" })
        );
        assert_eq!(order.version, 2, "a rejected transition changes nothing");
    }

    #[test]
    fn pay_requires_pending_and_the_exact_amount() {
        let now = Utc::now();
        let mut order = Order::create(OrderId::generate(), NewOrder::parse(draft()).expect("valid"), now);
        let payment = |amount, currency: &str| CapturedPayment {
            payment_id: "pay-1".into(),
            amount_minor: amount,
            currency: currency.into(),
        };
        assert!(matches!(order.pay(&payment(398, "EUR"), now), Err(DomainError::PaymentMismatch(_))));
        assert!(matches!(order.pay(&payment(399, "USD"), now), Err(DomainError::PaymentMismatch(_))));
        order.record_payment_failure("card declined", now).expect("pending");
        assert_eq!((order.status, order.version), (OrderStatus::Pending, 2));
        order.pay(&payment(399, "EUR"), now).expect("exact payment");
        assert_eq!(
            (order.status, order.version, order.payment_failure.as_deref()),
            (OrderStatus::Paid, 3, None)
        );
        assert!(matches!(order.pay(&payment(399, "EUR"), now), Err(DomainError::InvalidTransition { .. })));
        assert!(order.cancel(now).is_err(), "a paid order cannot be cancelled");
    }
}

#[cfg(test)]
mod properties {
    //! The order document is untrusted input: any draft parses or is refused with field
    //! violations on the fields that are wrong, and what parses keeps its values exactly.
    use proptest::prelude::*;

    use super::*;

    fn line() -> impl Strategy<Value = LineItemDraft> {
        (
            prop_oneof![any::<String>(), "[A-Za-z0-9._-]{1,64}"],
            any::<i64>(),
            prop_oneof![any::<i64>(), 0..1_000_000i64],
        )
            .prop_map(|(sku, quantity, unit_price_minor)| LineItemDraft {
                sku,
                quantity: quantity % 2000,
                unit_price_minor,
            })
    }

    fn draft() -> impl Strategy<Value = OrderDraft> {
        (
            prop_oneof![any::<String>(), "[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}"],
            prop::collection::vec(line(), 0..110),
            prop_oneof![any::<String>(), Just("EUR".to_owned())],
            prop::option::of(any::<String>()),
        )
            .prop_map(|(customer_id, items, currency, note)| OrderDraft {
                customer_id,
                items,
                currency,
                note,
            })
    }

    proptest! {
        #[test]
        fn every_draft_parses_or_names_its_wrong_fields(draft in draft()) {
            match NewOrder::parse(draft.clone()) {
                Ok(order) => {
                    prop_assert_eq!(order.customer_id.as_str(), draft.customer_id.as_str());
                    prop_assert_eq!(order.items.len(), draft.items.len());
                    for (parsed, raw) in order.items.iter().zip(&draft.items) {
                        prop_assert_eq!(parsed.sku.as_str(), raw.sku.as_str());
                        prop_assert_eq!(i64::from(parsed.quantity.get()), raw.quantity);
                        prop_assert_eq!(parsed.unit_price_minor, raw.unit_price_minor);
                    }
                    let total: i64 = draft.items.iter().map(|i| i.quantity * i.unit_price_minor).sum();
                    prop_assert_eq!(order.total_minor, total);
                    prop_assert!(!order.customer_id.as_str().contains('\0'));
                }
                Err(e) => {
                    prop_assert!(!e.violations.is_empty());
                    for v in &e.violations {
                        let known = ["customer_id", "currency", "note", "items"].iter().any(|f| v.field.starts_with(f));
                        prop_assert!(known, "unknown field {}", v.field);
                        prop_assert!(!v.message.is_empty());
                    }
                }
            }
        }

        #[test]
        fn control_characters_are_refused_at_the_field(c in prop::char::range('\0', '\u{1f}'), at in 0usize..8) {
            let mut poisoned = "cust-1".to_owned();
            poisoned.insert(at.min(poisoned.len()), c);
            let draft = OrderDraft { customer_id: poisoned, items: vec![LineItemDraft { sku: "A".into(), quantity: 1, unit_price_minor: 1 }],
                                     currency: "EUR".into(), note: Some(format!("a{c}b")) };
            let err = NewOrder::parse(draft).expect_err("refused");
            prop_assert!(err.violations.iter().any(|v| v.field == "customer_id"));
            if c != '\n' {
                prop_assert!(err.violations.iter().any(|v| v.field == "note"), "{:?}", err.violations);
            }
        }
    }
}
