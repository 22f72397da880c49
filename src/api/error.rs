//! One error type for every failure a client can see: status + `{"error": {"type", "message"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::batcher::BatchError;

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case type.
    pub kind: &'static str,
    /// A sentence naming the field or the cause.
    pub message: String,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }
    /// 400: the body is not what the endpoint reads.
    pub fn malformed(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_request", m)
    }
    /// 404: no such model.
    pub fn unknown_model(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("no model named {name:?} is served; GET /v1/models lists them"),
        )
    }
    /// 404: no such route.
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", m)
    }
    /// 413: too large.
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", m)
    }
    /// 415: not JSON.
    pub fn unsupported_media_type(m: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            m,
        )
    }
    /// 422: well-formed but invalid values.
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", m)
    }
    /// 503: not ready or draining.
    pub fn unavailable(m: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m);
        e.retry_after = Some(1);
        e
    }
    /// The `code` label for metrics.
    pub fn code(&self) -> &'static str {
        self.status.as_str_static()
    }
}

trait StaticStatus {
    fn as_str_static(&self) -> &'static str;
}

impl StaticStatus for StatusCode {
    fn as_str_static(&self) -> &'static str {
        match self.as_u16() {
            200 => "200",
            400 => "400",
            404 => "404",
            413 => "413",
            415 => "415",
            422 => "422",
            429 => "429",
            500 => "500",
            503 => "503",
            504 => "504",
            _ => "other",
        }
    }
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Overloaded { .. } => {
                let mut a = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "overloaded",
                    format!("{e}; retry later"),
                );
                a.retry_after = Some(1);
                a
            }
            BatchError::Timeout => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                e.to_string(),
            ),
            BatchError::Engine(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "engine_error",
                e.to_string(),
            ),
            BatchError::Closed => Self::unavailable(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"type": self.kind, "message": self.message}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
