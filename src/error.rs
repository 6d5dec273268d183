//! The API error type and the one table that maps it to HTTP and gRPC.
//!
//! Policy:
//! - Every failure a client can see is an [`ApiError`] variant. [`ApiError::kind`] gives its
//!   stable problem `type`, HTTP status and gRPC code in one match, so REST and gRPC never
//!   disagree about what went wrong.
//! - Client errors (4xx) say precisely what to fix; validation errors list every field.
//! - Server errors (5xx) never echo internals: the body says what kind of failure it was,
//!   the cause chain is logged once, where the error is turned into a response.
//! - Dependency outages are `Unavailable` (503 / UNAVAILABLE, retryable), not 500.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    domain::{DomainError, FieldViolation, ValidationError},
    orders::OrderError,
    store::StoreError,
};

/// Media type of RFC 9457 problem details.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A failure as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Input failed validation; lists every violation.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The request could not be read at all (syntax, wrong types, wrong media type, too large).
    #[error("{detail}")]
    BadRequest {
        /// Which kind of malformed request this is.
        kind: Malformed,
        /// What was wrong, for the client.
        detail: String,
    },
    /// The addressed resource does not exist.
    #[error("{resource} {id} not found")]
    NotFound {
        /// Resource type, e.g. `order`.
        resource: &'static str,
        /// The id the client asked for.
        id: String,
    },
    /// The route exists but not for this HTTP method.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// The resource's state forbids the operation (e.g. cancelling a cancelled order).
    #[error(transparent)]
    StateConflict(DomainError),
    /// The `Idempotency-Key` is missing where required, or malformed.
    #[error("{0}")]
    IdempotencyKey(String),
    /// A request with the same key is still being processed; retry later.
    #[error("a request with this Idempotency-Key is still in flight; retry later")]
    IdempotencyInFlight,
    /// The key was already used with a different request.
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyMismatch,
    /// A concurrent update won; retrying the request is safe.
    #[error("the resource was modified concurrently; retry")]
    ConcurrentUpdate,
    /// A dependency (the database) is unreachable or overloaded; retry later.
    #[error("service temporarily unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// The request did not finish within the server's deadline.
    #[error("request timed out")]
    Timeout,
    /// More requests are in flight than the server admits; this one was shed unread.
    #[error("the server is at its concurrency limit; retry later")]
    Overloaded,
    /// The operation passed its sunset (see [`crate::deprecation`]); it will not come back.
    #[error("{operation} was retired at {sunset}{}; see {link}", successor.as_ref().map(|s| format!(", use {s}")).unwrap_or_default())]
    Gone {
        /// The retired operation, as the deprecation table names it.
        operation: String,
        /// When it was retired (RFC 3339).
        sunset: String,
        /// What to use instead.
        successor: Option<String>,
        /// The migration documentation.
        link: String,
    },
    /// The caller did not prove who it is (no, or a wrong, credential).
    #[error("{detail}")]
    Unauthenticated {
        /// The `WWW-Authenticate` challenge, e.g. `Bearer realm="orders-service-admin"`.
        challenge: String,
        /// What was wrong, for the client (never the expected credential).
        detail: String,
    },
    /// The caller is known but its token lacks the scope this operation needs.
    #[error("{detail}")]
    Forbidden {
        /// The `WWW-Authenticate` challenge naming the scope (RFC 6750 `insufficient_scope`).
        challenge: String,
        /// What was missing.
        detail: String,
    },
    /// A bug or an unexpected state; details are logged, never returned.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// Kinds of unreadable requests, each with its own status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Body is not valid JSON or does not match the schema: 400.
    Syntax,
    /// `Content-Type` is not `application/json`: 415.
    MediaType,
    /// Body exceeds the configured limit: 413.
    TooLarge,
}

/// The mapping row for one error: stable problem type slug, HTTP status, gRPC code, title.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind {
    /// Slug appended to the problem type URI; stable, documented in `openapi.yaml`.
    pub slug: &'static str,
    /// HTTP status.
    pub status: StatusCode,
    /// gRPC status code.
    pub code: Code,
    /// Short human-readable summary (RFC 9457 `title`).
    pub title: &'static str,
}

impl ApiError {
    /// The single table mapping each failure to its REST and gRPC representation.
    pub fn kind(&self) -> ErrorKind {
        let (slug, status, code, title) = match self {
            Self::Validation(_) => {
                ("validation", StatusCode::BAD_REQUEST, Code::InvalidArgument, "Request validation failed")
            }
            Self::BadRequest { kind: Malformed::Syntax, .. } => {
                ("malformed-request", StatusCode::BAD_REQUEST, Code::InvalidArgument, "Malformed request")
            }
            Self::BadRequest { kind: Malformed::MediaType, .. } => (
                "unsupported-media-type",
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Code::InvalidArgument,
                "Unsupported media type",
            ),
            Self::BadRequest { kind: Malformed::TooLarge, .. } => (
                "payload-too-large",
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::ResourceExhausted,
                "Request body too large",
            ),
            Self::MethodNotAllowed => (
                "method-not-allowed",
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
                "Method not allowed",
            ),
            Self::NotFound { .. } => {
                ("not-found", StatusCode::NOT_FOUND, Code::NotFound, "Resource not found")
            }
            Self::StateConflict(_) => (
                "invalid-state",
                StatusCode::CONFLICT,
                Code::FailedPrecondition,
                "Operation not allowed in this state",
            ),
            Self::IdempotencyKey(_) => {
                ("idempotency-key", StatusCode::BAD_REQUEST, Code::InvalidArgument, "Invalid Idempotency-Key")
            }
            Self::IdempotencyInFlight => {
                ("idempotency-in-flight", StatusCode::CONFLICT, Code::Aborted, "Request still in flight")
            }
            Self::IdempotencyMismatch => (
                "idempotency-mismatch",
                StatusCode::UNPROCESSABLE_ENTITY,
                Code::FailedPrecondition,
                "Idempotency-Key reused with a different request",
            ),
            Self::ConcurrentUpdate => {
                ("concurrent-update", StatusCode::CONFLICT, Code::Aborted, "Concurrent modification")
            }
            Self::Unavailable(_) => {
                ("unavailable", StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, "Service unavailable")
            }
            Self::Timeout => {
                ("timeout", StatusCode::SERVICE_UNAVAILABLE, Code::DeadlineExceeded, "Request timed out")
            }
            Self::Overloaded => {
                ("overloaded", StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, "Server overloaded")
            }
            Self::Gone { .. } => ("gone", StatusCode::GONE, Code::Unimplemented, "Operation retired"),
            Self::Unauthenticated { .. } => (
                "unauthenticated",
                StatusCode::UNAUTHORIZED,
                Code::Unauthenticated,
                "Authentication required",
            ),
            Self::Forbidden { .. } => {
                ("forbidden", StatusCode::FORBIDDEN, Code::PermissionDenied, "Not allowed")
            }
            Self::Internal(_) => {
                ("internal", StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, "Internal error")
            }
        };
        ErrorKind { slug, status, code, title }
    }

    fn violations(&self) -> &[FieldViolation] {
        match self {
            Self::Validation(v) => &v.violations,
            _ => &[],
        }
    }

    /// Whether the client may retry the same request later (drives `Retry-After`). Such
    /// outcomes are never stored for Idempotency-Key replay: the retry must really run.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_)
                | Self::Timeout
                | Self::Overloaded
                | Self::IdempotencyInFlight
                | Self::ConcurrentUpdate
        )
    }

    /// Logs server-side failures with their cause chain, once.
    fn log(&self) {
        match self {
            Self::Unavailable(cause) => {
                tracing::warn!(error = format!("{cause:#}"), "dependency unavailable")
            }
            Self::Internal(cause) => tracing::error!(error = format!("{cause:#}"), "internal error"),
            _ => {}
        }
    }

    /// The RFC 9457 body for this error.
    pub fn problem(&self) -> Problem {
        let kind = self.kind();
        Problem {
            r#type: format!("{PROBLEM_TYPE_BASE}{}", kind.slug),
            title: kind.title,
            status: kind.status.as_u16(),
            detail: self.to_string(),
            errors: self
                .violations()
                .iter()
                .map(|v| ProblemField { field: v.field.clone(), message: v.message.clone() })
                .collect(),
        }
    }
}

/// Problem type URIs are `urn:problem-type:orders:<slug>`: stable identifiers that do not
/// pretend to be dereferenceable documentation pages.
pub const PROBLEM_TYPE_BASE: &str = "urn:problem-type:orders:";

/// An RFC 9457 problem details body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Stable identifier of the problem kind, e.g. `urn:problem-type:orders:validation`.
    pub r#type: String,
    /// Short summary of the problem kind.
    pub title: &'static str,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong in this occurrence.
    pub detail: String,
    /// Field-level violations (validation problems only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ProblemField>,
}

/// One invalid field in a problem body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProblemField {
    /// Path of the field, e.g. `items[0].quantity`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let problem = self.problem();
        let status = self.kind().status;
        let mut response = (status, axum::Json(problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.retryable() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::Unauthenticated { challenge, .. } | ApiError::Forbidden { challenge, .. } = &self
            && let Ok(value) = HeaderValue::from_str(challenge)
        {
            headers.insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        err.log();
        let kind = err.kind();
        let message = err.to_string();
        if let ApiError::Gone { sunset, successor, link, .. } = &err {
            let mut metadata = std::collections::HashMap::from([
                ("sunset".to_owned(), sunset.clone()),
                ("link".to_owned(), link.clone()),
            ]);
            if let Some(successor) = successor {
                metadata.insert("successor".to_owned(), successor.clone());
            }
            let details = ErrorDetails::with_error_info("API_SUNSET", "orders-service", metadata);
            return tonic::Status::with_error_details(kind.code, message, details);
        }
        let violations = err.violations();
        if violations.is_empty() {
            return tonic::Status::new(kind.code, message);
        }
        let mut details = ErrorDetails::new();
        for v in violations {
            details.add_bad_request_violation(v.field.clone(), v.message.clone());
        }
        tonic::Status::with_error_details(kind.code, message, details)
    }
}

impl From<DomainError> for ApiError {
    fn from(err: DomainError) -> Self {
        match err {
            DomainError::Validation(v) => Self::Validation(v),
            other => Self::StateConflict(other),
        }
    }
}

impl From<OrderError> for ApiError {
    fn from(err: OrderError) -> Self {
        match err {
            OrderError::NotFound(id) => Self::NotFound { resource: "order", id: id.to_string() },
            OrderError::Rule(rule) => rule.into(),
            OrderError::IdempotencyMismatch => Self::IdempotencyMismatch,
            OrderError::IdempotencyInFlight => Self::IdempotencyInFlight,
            OrderError::Store(store) => store.into(),
        }
    }
}

impl From<FieldViolation> for ApiError {
    fn from(v: FieldViolation) -> Self {
        Self::Validation(ValidationError { violations: vec![v] })
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Conflict | StoreError::UniqueViolation(_) => Self::ConcurrentUpdate,
            StoreError::Unavailable(e) | StoreError::Aborted(e) => Self::Unavailable(e),
            StoreError::Rejected(e) => {
                // Validation should have caught it first; say what kind of input it was.
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the database rejected a value validation let through"
                );
                Self::BadRequest {
                    kind: Malformed::Syntax,
                    detail: "a value was rejected by the database (for example a NUL character or a number out of range)"
                        .into(),
                }
            }
            StoreError::Other(e) => Self::Internal(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_do_not_leak_causes() {
        let err = ApiError::Internal(anyhow::anyhow!("password=hunter2 in connection string"));
        let problem = err.problem();
        assert_eq!(problem.status, 500);
        assert!(!problem.detail.contains("hunter2"));
        let status = tonic::Status::from(ApiError::Unavailable(anyhow::anyhow!("secret host")));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("secret"));
    }

    #[test]
    fn validation_carries_field_details_over_grpc() {
        let err = ApiError::from(FieldViolation::new("items[0].quantity", "must be between 1 and 1000"));
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad_request = status.get_details_bad_request().expect("BadRequest details");
        assert_eq!(bad_request.field_violations[0].field, "items[0].quantity");
    }
}
