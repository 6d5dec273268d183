//! Validated value types. Each has one constructor that checks the rules from the API
//! contract, so holding a value proves it is valid.

use std::fmt;

use uuid::Uuid;

use super::FieldViolation;

/// An order id: a UUID v7, so ids sort by creation time and index well.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrderId(Uuid);

impl OrderId {
    /// A fresh, time-ordered id.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses a client-supplied id; `field` names it in the error.
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldViolation> {
        Uuid::try_parse(raw).map(Self).map_err(|_| {
            FieldViolation::new(field, "must be a UUID such as 0190c2a4-6f1e-7b3c-9a5d-2f4e8c1b7a90")
        })
    }

    /// Wraps an id read back from storage.
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

macro_rules! string_value {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            /// The validated text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_value!(
    /// The customer who placed an order: 1–64 characters of `A-Z a-z 0-9 . _ : @ -`, starting
    /// with a letter or digit (an identifier from another system, never free text).
    CustomerId
);
string_value!(
    /// A stock keeping unit: 1–64 characters of `A-Z a-z 0-9 - _ .`.
    Sku
);
string_value!(
    /// An ISO 4217 alphabetic currency code that is in active use.
    Currency
);
string_value!(
    /// Free text from the customer: at most 500 characters, no control characters except newlines.
    Note
);

impl CustomerId {
    /// The rule as a regular expression, for the OpenAPI document (same as [`CustomerId::parse`]).
    pub const PATTERN: &'static str = "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$";

    /// Validates a customer id.
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldViolation> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-');
        let valid = (1..=64).contains(&raw.len())
            && raw.as_bytes()[0].is_ascii_alphanumeric()
            && raw.bytes().all(allowed);
        if !valid {
            return Err(FieldViolation::new(
                field,
                "must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':', '@' or '-', starting with a letter or digit",
            ));
        }
        Ok(Self(raw.to_owned()))
    }
}

impl Sku {
    /// The rule as a regular expression, for the OpenAPI document.
    pub const PATTERN: &'static str = "^[A-Za-z0-9._-]{1,64}$";

    /// Validates a SKU.
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldViolation> {
        if !(1..=64).contains(&raw.len())
            || !raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(FieldViolation::new(
                field,
                "must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' or '.'",
            ));
        }
        Ok(Self(raw.to_owned()))
    }
}

/// Active ISO 4217 alphabetic codes (funds and precious-metal codes excluded).
pub const ISO_4217: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL \
BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL \
GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD \
KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD \
OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP \
SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG";

impl Currency {
    /// Validates a currency code (upper case, e.g. `EUR`).
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldViolation> {
        let known = raw.len() == 3 && ISO_4217.split(' ').any(|code| code == raw);
        if !known {
            return Err(FieldViolation::new(
                field,
                "must be an ISO 4217 currency code in upper case, e.g. EUR",
            ));
        }
        Ok(Self(raw.to_owned()))
    }
}

impl Note {
    /// The rule as a regular expression (no control characters but newlines), for OpenAPI.
    pub const PATTERN: &'static str = "^[^\\x00-\\x09\\x0b-\\x1f\\x7f-\\x9f]*$";

    /// Validates a note.
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldViolation> {
        if raw.chars().count() > 500 {
            return Err(FieldViolation::new(field, "must be at most 500 characters"));
        }
        if raw.chars().any(|c| c.is_control() && c != '\n') {
            return Err(FieldViolation::new(
                field,
                "must not contain control characters other than newlines",
            ));
        }
        Ok(Self(raw.to_owned()))
    }
}

/// Number of units of one line: 1–1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(u32);

impl Quantity {
    /// Validates a quantity; takes `i64` so negative JSON numbers get this error, not a parse error.
    pub fn parse(field: &str, raw: i64) -> Result<Self, FieldViolation> {
        match u32::try_from(raw) {
            Ok(q @ 1..=1000) => Ok(Self(q)),
            _ => Err(FieldViolation::new(field, "must be between 1 and 1000")),
        }
    }

    /// The number of units.
    pub fn get(&self) -> u32 {
        self.0
    }
}

/// One validated order line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineItem {
    /// What is ordered.
    pub sku: Sku,
    /// How many units.
    pub quantity: Quantity,
    /// Price of one unit in the currency's minor unit; never negative.
    pub unit_price_minor: i64,
}

impl LineItem {
    /// quantity × unit price, or `None` on overflow.
    pub fn subtotal_minor(&self) -> Option<i64> {
        self.unit_price_minor.checked_mul(i64::from(self.quantity.get()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries() {
        assert!(CustomerId::parse("c", &"a".repeat(64)).is_ok());
        assert!(CustomerId::parse("c", &"a".repeat(65)).is_err());
        assert!(CustomerId::parse("c", "").is_err());
        assert!(CustomerId::parse("c", " padded").is_err());
        assert!(CustomerId::parse("c", "crm:42@eu-1.example").is_ok());
        assert!(CustomerId::parse("c", "-leading").is_err());
        assert!(CustomerId::parse("c", "ünï").is_err());
        assert!(Quantity::parse("q", 0).is_err());
        assert!(Quantity::parse("q", 1000).is_ok());
        assert!(Quantity::parse("q", 1001).is_err());
        assert!(Quantity::parse("q", -1).is_err());
        assert!(Note::parse("n", &"é".repeat(500)).is_ok());
        assert!(Note::parse("n", &"é".repeat(501)).is_err());
        assert!(Currency::parse("c", "EUR").is_ok());
        assert!(Currency::parse("c", "eur").is_err());
        assert!(Currency::parse("c", "XYZ").is_err());
        assert!(Sku::parse("s", "ABC-1_2.3").is_ok());
        assert!(Sku::parse("s", "a b").is_err());
    }

    #[test]
    fn order_id_round_trips_and_names_the_field() {
        let id = OrderId::generate();
        assert_eq!(OrderId::parse("id", &id.to_string()), Ok(id));
        assert_eq!(OrderId::parse("id", "not-a-uuid").unwrap_err().field, "id");
    }
}
