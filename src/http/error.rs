//! The one place where failures become HTTP responses.
//!
//! Every error body is `{"error": "<what is wrong and what is expected>"}` with
//! `Content-Type: application/json`; a `503` also says when to retry.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// Seconds a client should wait before retrying a `503`.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The caller sent something we cannot serve; the message says what is expected.
    #[error("{0}")]
    BadRequest(String),
    #[error("template {0} not found")]
    TemplateNotFound(i64),
    #[error("no such endpoint: {0}")]
    NoSuchEndpoint(String),
    #[error("method {method} is not allowed here: use {allowed}")]
    MethodNotAllowed {
        method: String,
        allowed: &'static str,
    },
    /// The answer could not be produced in time; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

/// A JSON body for `message`.
pub fn error_json(message: &str) -> String {
    serde_json::to_string(&ErrorBody { error: message })
        .unwrap_or_else(|_| r#"{"error":"internal error"}"#.to_owned())
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TemplateNotFound(_) | ApiError::NoSuchEndpoint(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.content_type(mime_json());
        match self {
            ApiError::Unavailable(_) => {
                response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS));
            }
            ApiError::MethodNotAllowed { allowed, .. } => {
                response.insert_header((header::ALLOW, *allowed));
            }
            _ => {}
        }
        response.body(error_json(&self.to_string()))
    }
}

pub fn mime_json() -> header::HeaderValue {
    header::HeaderValue::from_static("application/json")
}
