//! Extractors that turn axum's rejections into the same problem+json errors as domain
//! failures, so a client sees one error shape whether its JSON was malformed or invalid.

use axum::{
    extract::{
        FromRequest, FromRequestParts,
        rejection::{JsonRejection, PathRejection, QueryRejection},
    },
    http::StatusCode,
};

use crate::error::{ApiError, Malformed};

/// `axum::Json` with problem+json rejections.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

/// `axum::extract::Query` with problem+json rejections.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// `axum::extract::Path` with problem+json rejections.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let kind = match rejection.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Malformed::MediaType,
            StatusCode::PAYLOAD_TOO_LARGE => Malformed::TooLarge,
            _ => Malformed::Syntax,
        };
        let detail = match kind {
            Malformed::MediaType => "expected Content-Type: application/json".to_owned(),
            Malformed::TooLarge => "request body exceeds the configured limit".to_owned(),
            Malformed::Syntax => rejection.body_text(),
        };
        ApiError::BadRequest { kind, detail }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::BadRequest { kind: Malformed::Syntax, detail: rejection.body_text() }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::BadRequest { kind: Malformed::Syntax, detail: rejection.body_text() }
    }
}
