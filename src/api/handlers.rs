//! Request handlers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use super::error::ApiError;
use super::wire::{
    parse_json, InputsRequest, LatentsRequest, NamesModel, Rows, RowsOut, SampleFormat,
    SampleRequest,
};
use super::AppState;
use crate::batcher::Outputs;
use crate::repository::{valid_name, Model};

type St = State<Arc<AppState>>;

/// In the order of [`crate::metrics::ENDPOINTS`].
#[derive(Clone, Copy)]
enum Endpoint {
    LogProb = 0,
    Encode = 1,
    Sample = 2,
    Decode = 3,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::LogProb => "log_prob",
            Endpoint::Encode => "encode",
            Endpoint::Sample => "sample",
            Endpoint::Decode => "decode",
        }
    }
}

/// A successful inference: the model, the JSON body and where the time went.
struct Done {
    model: Arc<Model>,
    rows: usize,
    body: Vec<u8>,
    content_type: &'static str,
    queue: Duration,
    inference: Duration,
}

impl Done {
    /// A successful answer: `body` of `content_type`, with the timing of `out`.
    fn new(
        model: Arc<Model>,
        rows: usize,
        out: &Outputs,
        body: Vec<u8>,
        content_type: &'static str,
    ) -> Done {
        Done {
            model,
            rows,
            body,
            content_type,
            queue: out.queue_time,
            inference: out.inference_time,
        }
    }
}

/// The model and its error, for metric labels (unresolved models count under "").
type Failed = (Option<Arc<Model>>, ApiError);

struct InFlight<'a>(&'a AppState);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.metrics.in_flight.dec();
    }
}

async fn serve(
    state: Arc<AppState>,
    path_model: Option<String>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    state.metrics.in_flight.inc();
    let _guard = InFlight(&state);
    let result = match endpoint {
        Endpoint::LogProb | Endpoint::Encode => {
            run_encode(&state, path_model, endpoint, &headers, body, started).await
        }
        Endpoint::Sample => run_sample(&state, path_model, &headers, body, started).await,
        Endpoint::Decode => run_decode(&state, path_model, &headers, body, started).await,
    };
    let m = &state.metrics;
    let total = started.elapsed();
    match result {
        Ok(done) => {
            let series = &done.model.series[endpoint as usize];
            series.ok.inc();
            series.rows.inc_by(done.rows as u64);
            series.duration.observe(total.as_secs_f64());
            let mut r = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, done.content_type)],
                done.body,
            )
                .into_response();
            let h = r.headers_mut();
            h.insert(
                "x-queue-time-us",
                HeaderValue::from(done.queue.as_micros() as u64),
            );
            h.insert(
                "x-inference-time-us",
                HeaderValue::from(done.inference.as_micros() as u64),
            );
            h.insert(
                "x-total-time-us",
                HeaderValue::from(started.elapsed().as_micros() as u64),
            );
            r
        }
        Err((model, e)) => {
            let (name, v) = model.as_ref().map_or((String::new(), String::new()), |m| {
                (m.name.clone(), m.version.to_string())
            });
            m.requests
                .with_label_values(&[&name, &v, endpoint.label(), e.code()])
                .inc();
            let reason = match e.status.as_u16() {
                429 => Some("overloaded"),
                504 => Some("timeout"),
                500 => Some("engine_error"),
                400 | 404 | 413 | 415 | 422 => Some("invalid"),
                _ => None,
            };
            // Time-outs and cancellations inside the queue are counted by the queue itself.
            if let (Some(r), Some(model)) = (reason, &model) {
                if r != "timeout" {
                    m.rejections.with_label_values(&[&model.name, r]).inc();
                }
            } else if let Some(r) = reason {
                m.rejections.with_label_values(&["", r]).inc();
            }
            let mut r = e.into_response();
            r.headers_mut().insert(
                "x-total-time-us",
                HeaderValue::from(started.elapsed().as_micros() as u64),
            );
            r
        }
    }
}

fn resolve(
    state: &AppState,
    path: Option<&str>,
    body: Option<&str>,
) -> Result<Arc<Model>, ApiError> {
    let repo = state.repo.get().ok_or_else(|| {
        ApiError::unavailable("models are still loading; GET /readyz says when they are ready")
    })?;
    if let (Some(p), Some(b)) = (path, body) {
        if p != b {
            return Err(ApiError::invalid(format!(
                "model: the body names {b:?} but the URL names {p:?}"
            )));
        }
    }
    let name = match path.or(body) {
        Some(n) => n.to_string(),
        None => match (&state.config.default_model, repo.models.len()) {
            (Some(d), _) => d.clone(),
            (None, 1) => repo.models.keys().next().expect("one model").clone(),
            (None, _) => {
                let names: Vec<&str> = repo.models.keys().map(String::as_str).collect();
                return Err(ApiError::invalid(format!(
                    "model: name one of the served models ({})",
                    names.join(", ")
                )));
            }
        },
    };
    if !valid_name(&name) {
        return Err(ApiError::unknown_model(&name));
    }
    repo.models
        .get(&name)
        .cloned()
        .ok_or_else(|| ApiError::unknown_model(&name))
}

fn deadline(state: &AppState, headers: &HeaderMap, started: Instant) -> Result<Instant, ApiError> {
    let mut ms = state.config.request_timeout_ms;
    if let Some(v) = headers.get("x-request-timeout-ms") {
        let asked = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::malformed("x-request-timeout-ms must be a whole number of milliseconds")
            })?;
        ms = ms.min(asked);
    }
    Ok(started + Duration::from_millis(ms))
}

fn check_rows(field: &str, rows: &Rows, model: &Model, max_rows: usize) -> Result<(), ApiError> {
    let event = &model.package.manifest.event_shape;
    if rows.count == 0 {
        return Err(ApiError::invalid(format!(
            "{field}: the array is empty; send at least one row"
        )));
    }
    if rows.row_shape != *event {
        let what = match (&model.package.manifest.domain.features, event.len()) {
            (Some(f), 1) if f.len() <= 16 => format!("{} numbers ({})", event[0], f.join(", ")),
            (_, 1) => format!("{} numbers", event[0]),
            _ => format!("shape {event:?} ([C][H][W] nested arrays)"),
        };
        let got = if rows.row_shape.is_empty() {
            "a bare number".to_string()
        } else {
            format!("shape {:?}", rows.row_shape)
        };
        return Err(ApiError::invalid(format!(
            "{field}: each row of model {:?} must have {what}; got {got}",
            model.name
        )));
    }
    if rows.count > max_rows {
        return Err(ApiError::too_large(format!(
            "{field}: {} rows in one request; the limit is {max_rows} (split the request)",
            rows.count
        )));
    }
    Ok(())
}

async fn submit(
    queue: &crate::batcher::Batcher,
    input: Vec<f32>,
    rows: usize,
    deadline: Instant,
) -> Result<Outputs, ApiError> {
    match tokio::time::timeout_at(deadline, queue.submit(input, rows, deadline)).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(_) => Err(ApiError::from(crate::batcher::BatchError::Timeout)),
    }
}

#[derive(Serialize)]
struct LogProbOut<'a> {
    model: &'a str,
    version: u64,
    log_prob: &'a [f32],
}

#[derive(Serialize)]
struct EncodeOut<'a> {
    model: &'a str,
    version: u64,
    latents: RowsOut<'a>,
    log_prob: &'a [f32],
}

#[derive(Serialize)]
struct SamplesOut<'a> {
    model: &'a str,
    version: u64,
    samples: RowsOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
}

/// What every inference request starts from: its parsed body, its model and its deadline.
struct Prepared<T> {
    req: T,
    model: Arc<Model>,
    deadline: Instant,
}

/// Parses the body, resolves the model (URL, then body, then default) and the deadline.
async fn prepare<T: for<'de> serde::Deserialize<'de> + NamesModel>(
    state: &AppState,
    path: Option<String>,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Prepared<T>, Failed> {
    let req: T = parse_json(headers, body, state.config.max_body_bytes)
        .await
        .map_err(|e| (None, e))?;
    let model = resolve(state, path.as_deref(), req.model()).map_err(|e| (None, e))?;
    let deadline = deadline(state, headers, started).map_err(|e| (Some(model.clone()), e))?;
    Ok(Prepared {
        req,
        model,
        deadline,
    })
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("responses serialise")
}

/// A `/decode` or `/sample` answer: the decoded rows (and, for samples, how they were drawn).
fn samples_done(
    model: Arc<Model>,
    rows: usize,
    out: Outputs,
    seed: Option<u64>,
    temperature: Option<f64>,
) -> Done {
    let body = to_json(&SamplesOut {
        model: &model.name,
        version: model.version,
        samples: RowsOut {
            data: &out.values[0],
            event_shape: &model.package.manifest.event_shape,
        },
        seed,
        temperature,
    });
    Done::new(model, rows, &out, body, JSON)
}

const JSON: &str = "application/json";

#[derive(Serialize)]
struct PictureOut<'a> {
    model: &'a str,
    version: u64,
    format: &'static str,
    /// The PNG file, base64.
    png: String,
    columns: usize,
    seed: u64,
    temperature: f64,
}

/// A `/sample` answer as a picture: the PNG itself when the client accepts `image/png`,
/// else base64 inside JSON.
fn picture_done(
    model: Arc<Model>,
    rows: usize,
    out: Outputs,
    headers: &HeaderMap,
    seed: u64,
    temperature: f64,
) -> Result<Done, Failed> {
    let m = &model.package.manifest;
    let columns = (rows as f64).sqrt().ceil() as usize;
    let picture = flowpack::image::grid_png(
        &out.values[0],
        &m.event_shape,
        m.domain.pixel_range,
        Some(columns),
    );
    let png = picture.map_err(|e| {
        (
            Some(model.clone()),
            ApiError::invalid(format!("format png: {e}")),
        )
    })?;
    let wants_png = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with("image/png")));
    let (body, content_type) = if wants_png {
        (png, "image/png")
    } else {
        use base64::Engine as _;
        let body = to_json(&PictureOut {
            model: &model.name,
            version: model.version,
            format: "png",
            png: base64::engine::general_purpose::STANDARD.encode(&png),
            columns,
            seed,
            temperature,
        });
        (body, JSON)
    };
    Ok(Done::new(model, rows, &out, body, content_type))
}

async fn run_encode(
    state: &AppState,
    path: Option<String>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Done, Failed> {
    let Prepared {
        req,
        model,
        deadline,
    } = prepare::<InputsRequest>(state, path, headers, body, started).await?;
    let fail = |e: ApiError| (Some(model.clone()), e);
    check_rows(
        "inputs",
        &req.inputs,
        &model,
        state.config.max_queue_rows as usize,
    )
    .map_err(fail)?;
    let rows = req.inputs.count;
    let out = submit(&model.encode, req.inputs.values, rows, deadline)
        .await
        .map_err(fail)?;
    let (z, lp) = (&out.values[0], &out.values[1]);
    for &v in lp {
        model.log_prob.observe(v as f64);
    }
    let m = &model.package.manifest;
    let body = match endpoint {
        Endpoint::LogProb => to_json(&LogProbOut {
            model: &model.name,
            version: model.version,
            log_prob: lp,
        }),
        _ => to_json(&EncodeOut {
            model: &model.name,
            version: model.version,
            latents: RowsOut {
                data: z,
                event_shape: &m.event_shape,
            },
            log_prob: lp,
        }),
    };
    Ok(Done::new(model, rows, &out, body, JSON))
}

async fn run_decode(
    state: &AppState,
    path: Option<String>,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Done, Failed> {
    let Prepared {
        req,
        model,
        deadline,
    } = prepare::<LatentsRequest>(state, path, headers, body, started).await?;
    let fail = |e: ApiError| (Some(model.clone()), e);
    check_rows(
        "latents",
        &req.latents,
        &model,
        state.config.max_queue_rows as usize,
    )
    .map_err(fail)?;
    let rows = req.latents.count;
    let out = submit(&model.decode, req.latents.values, rows, deadline)
        .await
        .map_err(fail)?;
    Ok(samples_done(model, rows, out, None, None))
}

async fn run_sample(
    state: &AppState,
    path: Option<String>,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Done, Failed> {
    let Prepared {
        req,
        model,
        deadline,
    } = prepare::<SampleRequest>(state, path, headers, body, started).await?;
    let fail = |e: ApiError| (Some(model.clone()), e);
    let limit = state
        .config
        .max_samples_per_request
        .min(state.config.max_queue_rows as usize);
    if req.num_samples < 1 || req.num_samples as u64 > limit as u64 {
        return Err(fail(ApiError::invalid(format!(
            "num_samples must be between 1 and {limit}, got {}",
            req.num_samples
        ))));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(fail(ApiError::invalid(format!(
            "temperature must be a finite number ≥ 0, got {temperature}"
        ))));
    }
    let picture = req.format == Some(SampleFormat::Png);
    if picture && model.package.manifest.event_shape.len() != 3 {
        return Err(fail(ApiError::invalid(format!(
            "format: png draws image models ([C, H, W] events); {} has event shape {:?}",
            model.name, model.package.manifest.event_shape
        ))));
    }
    let n = req.num_samples as usize;
    let seed = req.seed.unwrap_or_else(rand::random);
    let z = flowpack::sampling::latent_noise(n, model.event_size, temperature, seed);
    let out = submit(&model.decode, z, n, deadline).await.map_err(fail)?;
    if picture {
        return picture_done(model, n, out, headers, seed, temperature);
    }
    Ok(samples_done(model, n, out, Some(seed), Some(temperature)))
}

macro_rules! endpoint {
    ($short:ident, $named:ident, $ep:expr) => {
        pub(super) async fn $short(State(s): St, headers: HeaderMap, body: Body) -> Response {
            serve(s, None, $ep, headers, body).await
        }
        pub(super) async fn $named(
            State(s): St,
            Path(name): Path<String>,
            headers: HeaderMap,
            body: Body,
        ) -> Response {
            serve(s, Some(name), $ep, headers, body).await
        }
    };
}

endpoint!(log_prob, log_prob_named, Endpoint::LogProb);
endpoint!(encode, encode_named, Endpoint::Encode);
endpoint!(sample, sample_named, Endpoint::Sample);
endpoint!(decode, decode_named, Endpoint::Decode);

fn summary(m: &Model) -> serde_json::Value {
    let man = &m.package.manifest;
    json!({
        "name": m.name,
        "version": m.version,
        "family": man.family,
        "event_shape": man.event_shape,
        "domain": man.domain,
        "metrics": man.metrics,
        "cost": {"encode": man.graphs.encode.cost, "decode": man.graphs.decode.cost},
        "execution_providers": {"encode": m.providers[0].as_str(), "decode": m.providers[1].as_str()},
        "calibration": man.calibration,
    })
}

pub(super) async fn list_models(State(s): St) -> Response {
    let Some(repo) = s.repo.get() else {
        return ApiError::unavailable("models are still loading").into_response();
    };
    let models: Vec<_> = repo.models.values().map(|m| summary(m)).collect();
    axum::Json(json!({"models": models, "unavailable": repo.failures})).into_response()
}

pub(super) async fn model_info(State(s): St, Path(name): Path<String>) -> Response {
    let Some(repo) = s.repo.get() else {
        return ApiError::unavailable("models are still loading").into_response();
    };
    match repo.models.get(&name) {
        Some(m) => axum::Json(summary(m)).into_response(),
        None => ApiError::unknown_model(&name).into_response(),
    }
}

pub(super) async fn healthz() -> Response {
    axum::Json(json!({"status": "alive"})).into_response()
}

pub(super) async fn readyz(State(s): St) -> Response {
    if s.draining.load(Ordering::Relaxed) {
        return ApiError::unavailable("draining: the server is shutting down").into_response();
    }
    match s.repo.get() {
        None => ApiError::unavailable("models are still loading").into_response(),
        Some(r) if r.models.is_empty() => {
            ApiError::unavailable("no model could be loaded; GET /v1/models says why")
                .into_response()
        }
        Some(r) => axum::Json(json!({"status": "ready", "models": r.models.len()})).into_response(),
    }
}

pub(super) async fn metrics(State(s): St) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

pub(super) async fn fallback(uri: axum::http::Uri) -> Response {
    ApiError::not_found(format!("no route {}; see openapi.yaml", uri.path())).into_response()
}

pub(super) async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    let mut e = ApiError::not_found(format!("{method} is not allowed on {}", uri.path()));
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e.kind = "method_not_allowed";
    e.into_response()
}
