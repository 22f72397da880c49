//! One error type for every failure a client can see: `{"error": {"type", "message"}}` with
//! its status, `Retry-After` and rejection reason derived here, in one place.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::batcher::BatchError;
use crate::metrics::Rejection;

/// An error answered to a client; each variant holds a sentence naming the field or cause.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 400: the body (or a header) is not what the endpoint reads.
    #[error("{0}")]
    Malformed(String),
    /// 404: no such model.
    #[error("no model named {0:?} is served; GET /v1/models lists them")]
    UnknownModel(String),
    /// 404: no such route.
    #[error("{0}")]
    NoRoute(String),
    /// 405: the route exists for other methods.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 413: too large.
    #[error("{0}")]
    TooLarge(String),
    /// 415: not JSON.
    #[error("{0}")]
    NotJson(String),
    /// 408: the body did not arrive within `--body-read-timeout-ms`.
    #[error("{0}")]
    BodyTimeout(String),
    /// 409: the request conflicts with how the server runs (a repository change without
    /// `--model-control explicit`).
    #[error("{0}")]
    Conflict(String),
    /// 422: well-formed but invalid values.
    #[error("{0}")]
    Invalid(String),
    /// 429: the model's queue is full.
    #[error("the queue is full ({queued} rows waiting, limit {limit}); retry later")]
    Overloaded {
        /// Rows waiting when the request came.
        queued: usize,
        /// The configured limit.
        limit: usize,
    },
    /// 500: the engine failed on the batch holding the request's rows.
    #[error("inference failed: {0}")]
    Engine(String),
    /// 503: not ready, draining, or shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// 504: the deadline passed.
    #[error("the request's deadline passed while it waited in the queue")]
    Deadline,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::UnknownModel(_) | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotJson(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Deadline => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The stable snake_case `type` clients match on.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Malformed(_) => "malformed_request",
            ApiError::UnknownModel(_) => "model_not_found",
            ApiError::NoRoute(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::NotJson(_) => "unsupported_media_type",
            ApiError::BodyTimeout(_) => "request_timeout",
            ApiError::Conflict(_) => "conflict",
            ApiError::Invalid(_) => "invalid_input",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::Engine(_) => "engine_error",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Deadline => "deadline_exceeded",
        }
    }

    /// The `reason` it is counted under in `rejections_total` (none for routing and
    /// availability answers).
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            ApiError::Malformed(_)
            | ApiError::UnknownModel(_)
            | ApiError::TooLarge(_)
            | ApiError::NotJson(_)
            | ApiError::Invalid(_) => Some(Rejection::Invalid),
            ApiError::Overloaded { .. } => Some(Rejection::Overloaded),
            ApiError::Engine(_) => Some(Rejection::EngineError),
            ApiError::Deadline => Some(Rejection::Timeout),
            ApiError::NoRoute(_)
            | ApiError::MethodNotAllowed(_)
            | ApiError::Conflict(_)
            | ApiError::BodyTimeout(_)
            | ApiError::Unavailable(_) => None,
        }
    }

    /// Seconds a client should wait before retrying, when retrying can help.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::Overloaded { .. } | ApiError::Unavailable(_) => Some(1),
            _ => None,
        }
    }
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Overloaded { queued, limit } => ApiError::Overloaded { queued, limit },
            BatchError::Timeout => ApiError::Deadline,
            BatchError::Engine(m) => ApiError::Engine(m),
            BatchError::Closed => ApiError::Unavailable(e.to_string()),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    /// The JSON body and status; the response carries the error itself for the metrics
    /// layer.
    fn into_response(self) -> Response {
        let message = self.to_string();
        let body = Body {
            error: Detail {
                kind: self.kind(),
                message: &message,
            },
        };
        let mut r = (self.status(), axum::Json(body)).into_response();
        if matches!(self, ApiError::BodyTimeout(_)) {
            // The rest of the body is never read: the connection cannot carry another request.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(s) = self.retry_after() {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r.extensions_mut().insert(self);
        r
    }
}
