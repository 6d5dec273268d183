//! Keyset pagination: pages are addressed by the last id seen, never by offset, so a page
//! costs the same at any depth and concurrent inserts do not shift later pages.

use super::{FieldViolation, OrderId, ValidationError};

/// An opaque continuation token; clients must not parse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    /// The last id of the previous page; the next page starts strictly after it.
    pub after: OrderId,
}

const PREFIX: &str = "v1.";

impl PageToken {
    /// The token format as a regular expression, for the OpenAPI document: every string it
    /// matches is a valid cursor, so a client (or a fuzzer) that follows it is never refused.
    pub const PATTERN: &'static str = "^v1\\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";

    /// Encodes the token (versioned, so its format can change without breaking clients).
    pub fn encode(&self) -> String {
        format!("{PREFIX}{}", self.after.as_uuid().hyphenated())
    }

    /// Decodes a token produced by [`PageToken::encode`].
    pub fn decode(field: &str, raw: &str) -> Result<Self, FieldViolation> {
        let invalid = || FieldViolation::new(field, "is not a token returned by a previous page");
        let id = raw.strip_prefix(PREFIX).filter(|id| id.len() == 36).ok_or_else(invalid)?;
        OrderId::parse(field, id).map(|after| Self { after }).map_err(|_| invalid())
    }
}

/// A validated list request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListQuery {
    /// Orders per page: 1–100.
    pub page_size: u32,
    /// Where to continue; `None` for the first page.
    pub after: Option<PageToken>,
}

impl ListQuery {
    /// Page size used when the client sends none (or 0, the proto3 default).
    pub const DEFAULT_PAGE_SIZE: u32 = 20;
    /// Largest page a client may ask for.
    pub const MAX_PAGE_SIZE: u32 = 100;

    /// Validates raw paging input from any adapter.
    pub fn parse(page_size: Option<i64>, page_token: Option<&str>) -> Result<Self, ValidationError> {
        let mut violations = Vec::new();
        let page_size = match page_size.unwrap_or(0) {
            0 => Some(Self::DEFAULT_PAGE_SIZE),
            n @ 1..=100 => Some(n as u32),
            _ => {
                violations
                    .push(FieldViolation::new("page_size", "must be between 1 and 100 (0 for the default)"));
                None
            }
        };
        let after = match page_token.filter(|t| !t.is_empty()) {
            None => None,
            Some(raw) => match PageToken::decode("page_token", raw) {
                Ok(token) => Some(token),
                Err(v) => {
                    violations.push(v);
                    None
                }
            },
        };
        match page_size {
            Some(page_size) if violations.is_empty() => Ok(Self { page_size, after }),
            _ => Err(ValidationError { violations }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let token = PageToken { after: OrderId::generate() };
        assert_eq!(PageToken::decode("t", &token.encode()), Ok(token));
        assert!(PageToken::decode("t", "garbage!").is_err());
        let other_version = token.encode().replacen("v1.", "v2.", 1);
        assert!(PageToken::decode("t", &other_version).is_err());
        assert!(PageToken::decode("t", &format!("v1.{{{}}}", token.after.as_uuid())).is_err());
    }

    #[test]
    fn page_size_defaults_and_bounds() {
        assert_eq!(ListQuery::parse(None, None).expect("valid").page_size, 20);
        assert_eq!(ListQuery::parse(Some(100), Some("")).expect("valid").page_size, 100);
        assert!(ListQuery::parse(Some(101), None).is_err());
        assert!(ListQuery::parse(Some(-1), None).is_err());
    }
}

#[cfg(test)]
mod properties {
    //! Page tokens come back from clients: any string decodes or is refused, never panics,
    //! and every token this service issues decodes to what it encoded.
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_string_decodes_or_is_refused(raw in any::<String>()) {
            if let Ok(token) = PageToken::decode("page_token", &raw) {
                // Upper-case hex is accepted too: more lenient than the documented pattern.
                prop_assert_eq!(token.encode(), raw.to_ascii_lowercase());
            }
        }

        #[test]
        fn issued_tokens_round_trip(bytes in any::<[u8; 16]>()) {
            let token = PageToken { after: OrderId::from_uuid(uuid::Uuid::from_bytes(bytes)) };
            prop_assert_eq!(PageToken::decode("page_token", &token.encode()), Ok(token));
        }

        #[test]
        fn page_sizes_outside_the_bounds_are_field_errors(size in any::<i64>()) {
            match ListQuery::parse(Some(size), None) {
                Ok(query) => prop_assert!((1..=100).contains(&i64::from(query.page_size))),
                Err(e) => prop_assert!(e.violations.iter().all(|v| v.field == "page_size")),
            }
        }
    }
}
