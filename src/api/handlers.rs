//! The handlers, one per route: resolve the model, check, queue, respond. Each inference
//! route serves both `/{endpoint}` and `/v1/models/{name}/{endpoint}`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use flowpack::{Contributions, Cost, Direction, Domain, Metrics, Reference, SUMMARY_LEVELS};
use serde::Serialize;
use serde_json::json;

use super::call::{finite, Call};
use super::context::per_row;
use super::error::ApiError;
use super::extract::{ApiJson, Deadline};
use super::record::Served;
use super::wire::*;
use super::AppState;
use crate::batcher::Outputs;
use crate::repository::{LoadFailure, Model};
use crate::scoring::{check_threshold, Scorer};

type St = State<Arc<AppState>>;
type Answer = Result<Served, ApiError>;
type Inputs = ApiJson<InputsRequest>;

pub(super) const OUT_OF_DOMAIN: &str =
    "log_prob is not a finite float32: the row lies far outside the data the model was trained on";

/// Rows (the request's `field`) through `model`'s encode graph, with finite scores counted
/// in its score histogram and, for a model with a reference set, their tail probabilities
/// (returned, and counted in the drift histogram whichever route served them).
pub(super) async fn scored(
    call: &Call,
    d: Deadline,
    model: &Model,
    field: &str,
    inputs: Rows,
    context: Vec<f32>,
) -> Result<(Outputs, Option<Vec<f64>>), ApiError> {
    let out = call
        .run(model, Direction::Encode, field, inputs, context, d.0)
        .await?;
    finite(&out.values[1], 1, field, OUT_OF_DOMAIN)?;
    model.metrics.observe_log_prob(&out.values[1]);
    let tails = model.package.reference.as_ref().map(|reference| {
        let tails: Vec<f64> = out.values[1]
            .iter()
            .map(|&v| reference.tail_probability(v))
            .collect();
        model.metrics.observe_tail_probabilities(&tails);
        tails
    });
    Ok((out, tails))
}

/// `POST /score`: per row, log p(x), its tail probability against the model's reference
/// set, whether that is at or below the threshold, and (for models with exact
/// per-feature terms) each feature's conditional log-density, most surprising first.
pub(super) async fn score(call: Call, d: Deadline, ApiJson(req): ApiJson<ScoreRequest>) -> Answer {
    let model = call.model(req.model.as_deref())?;
    let scorer = Scorer::new(&model.package).map_err(ApiError::Invalid)?;
    let threshold = match req.threshold {
        Some(t) => check_threshold(t).map_err(ApiError::Invalid)?,
        None => scorer.default_threshold,
    };
    if req.top == Some(0) {
        return Err(ApiError::Invalid(
            "top must be at least 1 (leave it out for every feature)".into(),
        ));
    }
    let context = per_row(&model, req.context.as_ref(), req.inputs.count)?;
    let (out, tails) = scored(&call, d, &model, "inputs", req.inputs, context).await?;
    let tails = tails.expect("Scorer::new checked the reference set");
    let contributions = match (req.contributions.unwrap_or(true), out.values.get(2)) {
        (true, Some(terms)) if scorer.has_terms => {
            finite(terms, model.event_size, "inputs", OUT_OF_DOMAIN)?;
            let top = req.top.unwrap_or(usize::MAX);
            Some((terms.as_slice(), &scorer.features[..], top))
        }
        _ => None,
    };
    let body = ScoreOut {
        model: &model.name,
        version: model.version,
        reference_size: scorer.reference.len(),
        threshold,
        log_prob: &out.values[1],
        tail_probability: &tails,
        contributions,
    };
    Ok(Served::json(&out, &body))
}

/// `POST /log_prob`: log p(x) per row.
pub(super) async fn log_prob(call: Call, d: Deadline, ApiJson(req): Inputs) -> Answer {
    let model = call.model(req.model.as_deref())?;
    let context = per_row(&model, req.context.as_ref(), req.inputs.count)?;
    let (out, _) = scored(&call, d, &model, "inputs", req.inputs, context).await?;
    let lp = &out.values[1];
    let body = LogProbOut {
        model: &model.name,
        version: model.version,
        log_prob: lp,
    };
    Ok(Served::json(&out, &body))
}

/// `POST /encode`: z and log p(x) per row.
pub(super) async fn encode(call: Call, d: Deadline, ApiJson(req): Inputs) -> Answer {
    let model = call.model(req.model.as_deref())?;
    let context = per_row(&model, req.context.as_ref(), req.inputs.count)?;
    let (out, _) = scored(&call, d, &model, "inputs", req.inputs, context).await?;
    let (z, lp) = (&out.values[0], &out.values[1]);
    finite(z, model.event_size, "inputs", OUT_OF_DOMAIN)?;
    let event_shape = &model.package.manifest.event_shape;
    let body = EncodeOut {
        model: &model.name,
        version: model.version,
        latents: RowsOut {
            data: z,
            event_shape,
        },
        log_prob: lp,
    };
    Ok(Served::json(&out, &body))
}

/// `POST /decode`: x per latent row.
pub(super) async fn decode(
    call: Call,
    Deadline(d): Deadline,
    ApiJson(req): ApiJson<LatentsRequest>,
) -> Answer {
    let model = call.model(req.model.as_deref())?;
    let context = per_row(&model, req.context.as_ref(), req.latents.count)?;
    let out = call
        .run(
            &model,
            Direction::Decode,
            "latents",
            req.latents,
            context,
            d,
        )
        .await?;
    let why = "the decoded sample overflowed float32: the latent lies too far out";
    finite(&out.values[0], model.event_size, "latents", why)?;
    Ok(samples(&model, &out.values[0], None, &out))
}

/// `POST /sample`: x = decode(z) for z ~ N(0, T²·I) from a seeded stream; numbers, or a PNG
/// grid for image models.
pub(super) async fn sample(
    call: Call,
    Deadline(d): Deadline,
    headers: HeaderMap,
    ApiJson(req): ApiJson<SampleRequest>,
) -> Answer {
    let model = call.model(req.model.as_deref())?;
    let limit = call.config().max_samples_per_request.min(call.max_rows());
    if req.num_samples < 1 || req.num_samples as u64 > limit as u64 {
        return Err(ApiError::Invalid(format!(
            "num_samples must be between 1 and {limit}, got {}",
            req.num_samples
        )));
    }
    let t = req.temperature.unwrap_or(1.0);
    if !(t.is_finite() && t >= 0.0) {
        return Err(ApiError::Invalid(format!(
            "temperature must be a finite number ≥ 0, got {t}"
        )));
    }
    let m = &model.package.manifest;
    let picture = req.format == Some(SampleFormat::Png);
    if picture && m.event_shape.len() != 3 {
        return Err(ApiError::Invalid(format!(
            "format: png draws image models ([C, H, W] events); {} has event shape {:?}",
            model.name, m.event_shape
        )));
    }
    let n = req.num_samples as usize;
    let context = super::context::for_samples(&model, req.context.as_ref(), n)?;
    let seed = req.seed.unwrap_or_else(rand::random);
    let z = flowpack::sampling::latent_noise(n, model.event_size, t, seed);
    if z.iter().any(|v| !v.is_finite()) {
        return Err(ApiError::Invalid(format!(
            "temperature: {t:?} makes the latent noise overflow float32; lower it"
        )));
    }
    let out = call
        .submit(&model, Direction::Decode, z, context, d)
        .await?;
    let x = &out.values[0];
    let why = format!("the decoded sample overflowed float32 at temperature {t:?}; lower it");
    finite(x, model.event_size, "samples", &why)?;
    if !picture {
        return Ok(samples(&model, x, Some((seed, t)), &out));
    }
    let columns = (n as f64).sqrt().ceil() as usize;
    let png = flowpack::image::grid_png(x, &m.event_shape, m.domain.pixel_range, Some(columns))
        .map_err(|e| ApiError::Invalid(format!("format png: {e}")))?;
    let wants_png = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with("image/png")));
    if wants_png {
        return Ok(Served::bytes(&out, png, "image/png"));
    }
    Ok(Served::json(
        &out,
        &PictureOut {
            model: &model.name,
            version: model.version,
            format: "png",
            png: base64::engine::general_purpose::STANDARD.encode(&png),
            columns,
            seed,
            temperature: t,
        },
    ))
}

/// A `/decode` or `/sample` answer as numbers (for samples, with how they were drawn).
fn samples(
    model: &Model,
    x: &[f32],
    drawn: Option<(u64, f64)>,
    out: &crate::batcher::Outputs,
) -> Served {
    let event_shape = &model.package.manifest.event_shape;
    Served::json(
        out,
        &SamplesOut {
            model: &model.name,
            version: model.version,
            samples: RowsOut {
                data: x,
                event_shape,
            },
            seed: drawn.map(|d| d.0),
            temperature: drawn.map(|d| d.1),
        },
    )
}

/// A model as `/v1/models` describes it.
#[derive(Serialize)]
struct Summary<'a> {
    name: &'a str,
    version: u64,
    family: &'a str,
    event_shape: &'a [usize],
    domain: &'a Domain,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a flowpack::ContextSpec>,
    metrics: &'a Metrics,
    cost: Costs,
    execution_providers: Providers<'a>,
    reference: Option<ReferenceSummary<'a>>,
    scoring: ScoringSummary<'a>,
}

/// The reference set as `/v1/models` shows it: provenance and log_prob quantiles.
#[derive(Serialize)]
struct ReferenceSummary<'a> {
    #[serde(flatten)]
    reference: &'a Reference,
    quantiles: Vec<QuantileOut>,
}

#[derive(Serialize)]
struct QuantileOut {
    q: f64,
    log_prob: f32,
}

#[derive(Serialize)]
struct ScoringSummary<'a> {
    threshold: f64,
    contributions: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    order: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    why_not: Option<&'a str>,
}

#[derive(Serialize)]
struct Costs {
    encode: Cost,
    decode: Cost,
}

/// Where each graph runs (`cpu`, `cuda`, `cuda+cpu` when some nodes stay on the CPU), and
/// for a graph that fell back, the providers passed over and why.
#[derive(Serialize)]
struct Providers<'a> {
    encode: String,
    decode: String,
    #[serde(skip_serializing_if = "Fallbacks::is_empty")]
    fallbacks: Fallbacks<'a>,
}

#[derive(Serialize)]
struct Fallbacks<'a> {
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    encode: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    decode: &'a [String],
}

impl Fallbacks<'_> {
    fn is_empty(&self) -> bool {
        self.encode.is_empty() && self.decode.is_empty()
    }
}

fn summary(m: &Model) -> Summary<'_> {
    let man = &m.package.manifest;
    Summary {
        name: &m.name,
        version: m.version,
        family: &man.family,
        event_shape: &man.event_shape,
        domain: &man.domain,
        context: man.context.as_ref(),
        metrics: &man.metrics,
        cost: Costs {
            encode: man.graphs.encode.cost,
            decode: man.graphs.decode.cost,
        },
        execution_providers: Providers {
            encode: m.placement(Direction::Encode).label(),
            decode: m.placement(Direction::Decode).label(),
            fallbacks: Fallbacks {
                encode: m.passed_over(Direction::Encode),
                decode: m.passed_over(Direction::Decode),
            },
        },
        reference: man
            .reference
            .as_ref()
            .zip(m.package.reference.as_ref())
            .map(|(reference, set)| ReferenceSummary {
                reference,
                quantiles: SUMMARY_LEVELS
                    .iter()
                    .map(|&q| QuantileOut {
                        q,
                        log_prob: set.quantile(q),
                    })
                    .collect(),
            }),
        scoring: ScoringSummary {
            threshold: man.scoring.threshold,
            contributions: man.scoring.contributions.order().is_some(),
            order: man.scoring.contributions.order().map(|o| {
                o.iter()
                    .map(|&i| {
                        man.domain
                            .features
                            .as_ref()
                            .and_then(|f| f.get(i))
                            .map_or("?", String::as_str)
                    })
                    .collect()
            }),
            why_not: match &man.scoring.contributions {
                Contributions::Unavailable { reason } => Some(reason),
                Contributions::Exact { .. } => None,
            },
        },
    }
}

#[derive(Serialize)]
struct ModelList<'a> {
    models: Vec<Summary<'a>>,
    unavailable: &'a [LoadFailure],
}

fn loading() -> ApiError {
    ApiError::Unavailable("models are still loading".into())
}

/// `GET /v1/models`: every served model, and every package refused with its reason.
pub(super) async fn list_models(State(s): St) -> Result<Response, ApiError> {
    let repo = s.repo.get().ok_or_else(loading)?;
    let models = repo.models.values().map(|m| summary(m)).collect();
    let list = ModelList {
        models,
        unavailable: &repo.failures,
    };
    Ok(Json(list).into_response())
}

/// `GET /v1/models/{name}`.
pub(super) async fn model_info(
    State(s): St,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let repo = s.repo.get().ok_or_else(loading)?;
    let m = repo.models.get(&name).ok_or(ApiError::UnknownModel(name))?;
    Ok(Json(summary(m)).into_response())
}

/// `GET /healthz`: the process answers (never touches a queue).
pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "alive"}))
}

/// The number of models served, when the server is ready: every model loaded, checked and
/// warmed, at least one of them, and not draining.
pub(crate) fn ready(s: &AppState) -> Result<usize, ApiError> {
    if s.draining.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable(
            "draining: the server is shutting down".into(),
        ));
    }
    match s.repo.get() {
        None => Err(loading()),
        Some(r) if r.models.is_empty() => Err(ApiError::Unavailable(
            "no model could be loaded; GET /v1/models says why".into(),
        )),
        Some(r) => Ok(r.models.len()),
    }
}

/// `GET /readyz`: see [`ready`].
pub(super) async fn readyz(State(s): St) -> Result<Json<serde_json::Value>, ApiError> {
    let models = ready(&s)?;
    Ok(Json(json!({"status": "ready", "models": models})))
}

/// `GET /metrics`: the Prometheus text exposition.
pub(super) async fn metrics(State(s): St) -> impl IntoResponse {
    let ct = "text/plain; version=0.0.4; charset=utf-8";
    ([(header::CONTENT_TYPE, ct)], s.metrics.render())
}

/// Any other path.
pub(super) async fn fallback(uri: Uri) -> ApiError {
    ApiError::NoRoute(format!("no route {}; see openapi.yaml", uri.path()))
}

/// A known path with the wrong method.
pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}
