//! Extractors: the JSON body ([`ApiJson`]: 415 unless JSON, 413 past the limit, 400 for
//! malformed JSON, 422 naming the element for wrong values) and the request's deadline
//! ([`Deadline`]: the server's timeout, shortened by `x-request-timeout-ms`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::error::ApiError;
use super::AppState;

/// A JSON request body parsed as `T`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        check_json_type(req.headers())?;
        let Body(bytes) = Body::from_request(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::Malformed(
                "the body is empty; send a JSON object".into(),
            ));
        }
        // The fast path parses directly; only a failed parse is repeated with path tracking,
        // so the error can name the element (`inputs[3][1]`).
        match serde_json::from_slice::<T>(&bytes) {
            Ok(value) => Ok(ApiJson(value)),
            Err(_) => Err(explain::<T>(&bytes)),
        }
    }
}

/// A request body of any type, read whole up to `--max-body-bytes` (413 past it; a
/// compressed body is measured as decompressed).
pub struct Body(pub Bytes);

impl FromRequest<Arc<AppState>> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let limit = state.config.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if let Some(len) = declared.filter(|&len| len > limit) {
            return Err(ApiError::TooLarge(format!(
                "the body has {len} bytes; the limit is {limit}"
            )));
        }
        let wait = Duration::from_millis(state.config.body_read_timeout_ms);
        let bytes = tokio::time::timeout(wait, axum::body::to_bytes(req.into_body(), limit))
            .await
            .map_err(|_| {
                state.metrics.body_read_timeouts.inc();
                ApiError::BodyTimeout(format!(
                    "the body did not arrive within {} ms (--body-read-timeout-ms)",
                    wait.as_millis()
                ))
            })?
            .map_err(|e| {
                let e = e.into_inner();
                if e.is::<http_body_util::LengthLimitError>() {
                    ApiError::TooLarge(format!(
                        "the body is larger than the limit of {limit} bytes"
                    ))
                } else {
                    // The client went away (or broke the framing) mid-body.
                    ApiError::Malformed(format!("the body could not be read whole: {e}"))
                }
            })?;
        Ok(Body(bytes))
    }
}

/// 415 unless the content type is JSON.
pub(super) fn check_json_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !(mime.eq_ignore_ascii_case("application/json")
        || mime.to_ascii_lowercase().ends_with("+json"))
    {
        let got = if ct.is_empty() {
            "none".to_string()
        } else {
            format!("{ct:?}")
        };
        return Err(ApiError::NotJson(format!(
            "send the body as JSON with Content-Type: application/json (got {got})"
        )));
    }
    Ok(())
}

/// Re-parses a body that failed, to say where and why.
pub(super) fn explain<T: DeserializeOwned>(bytes: &[u8]) -> ApiError {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let e = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(_) => {
            return match de.end() {
                Ok(()) => ApiError::Malformed("malformed JSON".into()),
                Err(e) => ApiError::Malformed(format!("malformed JSON: {e}")),
            }
        }
        Err(e) => e,
    };
    let path = e.path().to_string();
    let inner = e.into_inner();
    let msg = inner.to_string();
    let at = if path == "." || path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    };
    use serde_json::error::Category;
    match inner.classify() {
        _ if msg.starts_with("number out of range") => ApiError::Invalid(format!(
            "{at}a number is outside the float64 range ({msg}); values must be finite float32"
        )),
        _ if msg.starts_with("recursion limit exceeded") => {
            ApiError::Invalid(format!("{at}arrays are nested too deeply"))
        }
        Category::Data => ApiError::Invalid(format!("{at}{msg}")),
        Category::Syntax | Category::Eof | Category::Io => ApiError::Malformed(format!(
            "malformed JSON: {msg} (JSON has no NaN or Infinity; send finite numbers)"
        )),
    }
}

/// The header a client shortens its deadline with.
pub(super) const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

/// The milliseconds `x-request-timeout-ms` asks for (400 unless a whole number).
pub(super) fn timeout_ms(v: &axum::http::HeaderValue) -> Result<u64, ApiError> {
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::Malformed(
                "x-request-timeout-ms must be a whole number of milliseconds".into(),
            )
        })
}

/// When the request must be answered: `--request-timeout-ms` from now, or sooner if the
/// client's `x-request-timeout-ms` header asks.
pub struct Deadline(pub Instant);

impl FromRequestParts<Arc<AppState>> for Deadline {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let mut ms = state.config.request_timeout_ms;
        if let Some(v) = parts.headers.get(TIMEOUT_HEADER) {
            ms = ms.min(timeout_ms(v)?);
        }
        Ok(Deadline(Instant::now() + Duration::from_millis(ms)))
    }
}
