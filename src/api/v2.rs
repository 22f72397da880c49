//! The Open Inference Protocol (KServe v2) over REST, on the same port as the flowserve API
//! and through the same checks, batcher and metrics: server and model metadata, health, and
//! inference with JSON or binary tensors.
//!
//! Each package is served as three v2 models, so that each has fixed inputs and outputs that
//! its metadata can state:
//!
//! | v2 model | inputs | outputs |
//! |---|---|---|
//! | `{name}` | `x` FP32 `[-1, ...event]` | `z`, `log_prob`, and `log_prob_terms` (exact per-feature terms) and `tail_probability` (FP64) where the package has them |
//! | `{name}.decode` | `z` FP32 `[-1, ...event]` | `x` |
//! | `{name}.sample` | `num_samples` INT64 `[1]`; optional `temperature` FP32 `[1]`, `seed` UINT64 `[1]` | `x` |
//!
//! Errors are `{"error": "..."}` with the flowserve API's status codes.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flowpack::signature::{CONTEXT, DATA, LATENT, LOG_PROB, LOG_PROB_TERMS};
use flowpack::Direction;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::call::{finite, Call};
use super::context::from_tensor;
use super::error::ApiError;
use super::extract::{explain, Body, Deadline};
use super::handlers::{ready, scored, OUT_OF_DOMAIN};
use super::record::Served;
use super::tensor::{self, Data, DataType, InferHeader, Input, OutData, Output};
use super::wire::Rows;
use super::AppState;
use crate::batcher::Outputs;
use crate::lifecycle::{self, ModelControl};
use crate::repository::Model;
use tokio::time::Instant;

type St = State<Arc<AppState>>;

/// The platform string of ONNX models in the protocol.
const PLATFORM: &str = "onnx_onnxv1";

/// Which of a package's graphs a v2 model name means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Encode,
    Decode,
    Sample,
}

impl View {
    const SUFFIXES: [(&'static str, View); 2] =
        [(".decode", View::Decode), (".sample", View::Sample)];

    /// The graph this view runs.
    fn graph(self) -> Direction {
        match self {
            View::Encode => Direction::Encode,
            View::Decode | View::Sample => Direction::Decode,
        }
    }
}

/// `{name}` and, on versioned routes, `{version}`.
#[derive(Debug, Deserialize)]
pub(super) struct ModelPath {
    name: String,
    version: Option<String>,
}

/// The package and view a v2 model name (and version, if given) means. A package's own name
/// wins over a view of another package.
fn resolve(call: &Call, p: &ModelPath) -> Result<(Arc<Model>, View), ApiError> {
    let repo = call.repository()?;
    let (base, view) = if repo.models.contains_key(&p.name) {
        (p.name.as_str(), View::Encode)
    } else {
        View::SUFFIXES
            .iter()
            .find_map(|(s, v)| p.name.strip_suffix(s).map(|b| (b, *v)))
            .filter(|(b, _)| repo.models.contains_key(*b))
            .ok_or_else(|| ApiError::UnknownModel(p.name.clone()))?
    };
    let model = match &p.version {
        None => call.lookup(base)?,
        Some(v) => {
            let served = repo.served_versions(base);
            let found = v.parse::<u64>().ok().filter(|v| served.contains(v));
            match found {
                Some(v) => call.lookup_version(base, v)?,
                None => {
                    let list: Vec<String> = served.iter().map(u64::to_string).collect();
                    return Err(ApiError::NoRoute(format!(
                        "model {:?} has no version {v:?}; served: {}",
                        p.name,
                        list.join(", ")
                    )));
                }
            }
        }
    };
    Ok((model, view))
}

/// A tensor of a v2 model's signature.
#[derive(Serialize)]
pub(crate) struct TensorMeta {
    /// Its name.
    pub name: &'static str,
    /// Its element type.
    pub datatype: &'static str,
    /// Its shape, -1 for the batch dimension.
    pub shape: Vec<i64>,
}

/// A v2 model's metadata.
#[derive(Serialize)]
pub(crate) struct Metadata {
    /// The v2 model name.
    pub name: String,
    /// The served version.
    pub versions: Vec<String>,
    /// `onnx_onnxv1`.
    pub platform: &'static str,
    /// What it takes.
    pub inputs: Vec<TensorMeta>,
    /// What it returns.
    pub outputs: Vec<TensorMeta>,
    /// Where its graph runs (`cpu`, `cuda`, `cuda+cpu`): an extension field of the REST
    /// metadata; gRPC's `ModelMetadataResponse` has no place for it.
    pub execution_provider: String,
}

/// The metadata of v2 model `name` (at `version`, if given).
pub(crate) fn describe(
    call: &Call,
    name: String,
    version: Option<String>,
) -> Result<Metadata, ApiError> {
    let p = ModelPath { name, version };
    let (model, view) = resolve(call, &p)?;
    let (inputs, outputs) = signature(&model, view);
    let versions = call.repository()?.served_versions(&model.name);
    Ok(Metadata {
        name: p.name,
        versions: versions.iter().map(u64::to_string).collect(),
        platform: PLATFORM,
        inputs,
        outputs,
        execution_provider: model.placement(view.graph()).label(),
    })
}

/// Whether v2 model `name` (at `version`, if given) is served and the server ready.
pub(crate) fn model_is_ready(
    call: &Call,
    state: &AppState,
    name: String,
    version: Option<String>,
) -> Result<(), ApiError> {
    resolve(call, &ModelPath { name, version })?;
    ready(state)?;
    Ok(())
}

fn meta(name: &'static str, datatype: DataType, shape: Vec<i64>) -> TensorMeta {
    TensorMeta {
        name,
        datatype: datatype.as_str(),
        shape,
    }
}

/// `[-1, ...event]`.
fn batched(model: &Model) -> Vec<i64> {
    std::iter::once(-1)
        .chain(model.package.manifest.event_shape.iter().map(|&d| d as i64))
        .collect()
}

/// What `model`'s encode view can return, in order.
fn encode_outputs(model: &Model) -> Vec<TensorMeta> {
    let m = &model.package.manifest;
    let mut out = vec![
        meta(LATENT, DataType::Fp32, batched(model)),
        meta(LOG_PROB, DataType::Fp32, vec![-1]),
    ];
    if m.scoring.contributions.order().is_some() {
        out.push(meta(LOG_PROB_TERMS, DataType::Fp32, batched(model)));
    }
    if model.package.reference.is_some() {
        out.push(meta(TAIL_PROBABILITY, DataType::Fp64, vec![-1]));
    }
    out
}

const TAIL_PROBABILITY: &str = "tail_probability";
const NUM_SAMPLES: &str = "num_samples";
const TEMPERATURE: &str = "temperature";
const SEED: &str = "seed";

fn signature(model: &Model, view: View) -> (Vec<TensorMeta>, Vec<TensorMeta>) {
    let (mut inputs, outputs) = signature_without_context(model, view);
    // A conditional model takes its context as a second FP32 tensor, one row per example.
    if model.context_width > 0 {
        inputs.push(meta(
            CONTEXT,
            DataType::Fp32,
            vec![-1, model.context_width as i64],
        ));
    }
    (inputs, outputs)
}

fn signature_without_context(model: &Model, view: View) -> (Vec<TensorMeta>, Vec<TensorMeta>) {
    match view {
        View::Encode => (
            vec![meta(DATA, DataType::Fp32, batched(model))],
            encode_outputs(model),
        ),
        View::Decode => (
            vec![meta(LATENT, DataType::Fp32, batched(model))],
            vec![meta(DATA, DataType::Fp32, batched(model))],
        ),
        View::Sample => (
            vec![
                meta(NUM_SAMPLES, DataType::Int64, vec![1]),
                meta(TEMPERATURE, DataType::Fp32, vec![1]),
                meta(SEED, DataType::Uint64, vec![1]),
            ],
            vec![meta(DATA, DataType::Fp32, batched(model))],
        ),
    }
}

/// Every response of a v2 route that failed gets the protocol's error body,
/// `{"error": "..."}`, with the status (and `Retry-After`) the flowserve API would give.
pub(super) async fn errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let Some(e) = res.extensions().get::<ApiError>().cloned() else {
        return res;
    };
    let retry = res.headers().get(header::RETRY_AFTER).cloned();
    let mut r = (e.status(), Json(json!({ "error": e.to_string() }))).into_response();
    if let Some(v) = retry {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r.extensions_mut().insert(e);
    r
}

/// The server's name in the protocol's metadata.
pub(crate) const SERVER_NAME: &str = "flowserve";
/// The protocol extensions the REST API supports.
pub(crate) const EXTENSIONS: [&str; 1] = ["binary_tensor_data"];

/// `GET /v2`: the server's name, version and protocol extensions.
pub(super) async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
    }))
}

/// `GET /v2/health/live`.
pub(super) async fn live() -> Json<serde_json::Value> {
    Json(json!({"live": true}))
}

/// `GET /v2/health/ready`: what `/readyz` says (503 while loading, draining, or with no
/// model).
pub(super) async fn server_ready(State(s): St) -> Result<Json<serde_json::Value>, ApiError> {
    ready(&s)?;
    Ok(Json(json!({"ready": true})))
}

/// `GET /v2/models/{name}[/versions/{version}]`.
pub(super) async fn model_metadata(
    call: Call,
    Path(p): Path<ModelPath>,
) -> Result<Response, ApiError> {
    Ok(Json(describe(&call, p.name, p.version)?).into_response())
}

/// `GET /v2/models/{name}[/versions/{version}]/ready`: a served model is loaded, checked
/// and warmed; it answers 503 while the server drains.
pub(super) async fn model_ready(
    State(s): St,
    call: Call,
    Path(p): Path<ModelPath>,
) -> Result<Response, ApiError> {
    model_is_ready(&call, &s, p.name.clone(), p.version)?;
    Ok(Json(json!({"name": p.name, "ready": true})).into_response())
}

/// A v2 inference request, decoded from whichever transport carried it.
pub(crate) struct InferCall {
    /// The v2 model name (`{name}`, `{name}.decode` or `{name}.sample`).
    pub model: String,
    /// The version asked for, if any.
    pub version: Option<String>,
    /// The decoded inputs.
    pub inputs: Vec<Input>,
    /// The outputs asked for, by name (all when `None`).
    pub outputs: Option<Vec<String>>,
}

/// Where an output's values are.
enum Source {
    /// Output `i` of the graph run.
    Graph(usize),
    /// The tail probabilities.
    Tails,
}

/// A v2 inference answer: the graph run's outputs, kept where they are, and which of them
/// the client gets, in order, with their shapes.
pub(crate) struct Answer {
    /// The v2 model name answered for.
    pub model: String,
    /// Its version.
    pub version: u64,
    /// The graph run (values and timing).
    pub run: Outputs,
    tails: Option<Vec<f64>>,
    outputs: Vec<(&'static str, Vec<usize>, Source)>,
    /// Response parameters (`.sample`: the seed and temperature).
    pub parameters: Option<serde_json::Value>,
}

impl Answer {
    /// The outputs, in the order asked for: name, shape and values.
    pub fn outputs(&self) -> impl Iterator<Item = (&'static str, &[usize], OutData<'_>)> {
        self.outputs.iter().map(|(name, shape, src)| {
            let data = match src {
                Source::Graph(i) => OutData::F32(&self.run.values[*i]),
                Source::Tails => OutData::F64(self.tails.as_deref().expect("listed with tails")),
            };
            (*name, shape.as_slice(), data)
        })
    }
}

/// Runs a v2 inference request through the same checks and queues as the flowserve API.
pub(crate) async fn run(
    call: &Call,
    deadline: Instant,
    req: InferCall,
) -> Result<Answer, ApiError> {
    let p = ModelPath {
        name: req.model,
        version: req.version,
    };
    let (model, view) = resolve(call, &p)?;
    let mut inputs = req.inputs;
    let (expected, available) = signature(&model, view);
    for i in &inputs {
        if !expected.iter().any(|e| e.name == i.name) {
            let names: Vec<&str> = expected.iter().map(|e| e.name).collect();
            return Err(ApiError::Invalid(format!(
                "unknown input {:?}; {} takes {}",
                i.name,
                p.name,
                names.join(", ")
            )));
        }
    }
    let wanted: Vec<&'static str> = match &req.outputs {
        None => available.iter().map(|o| o.name).collect(),
        Some(list) => list
            .iter()
            .map(|o| {
                available
                    .iter()
                    .find(|a| a.name == o)
                    .map(|a| a.name)
                    .ok_or_else(|| {
                        let names: Vec<&str> = available.iter().map(|a| a.name).collect();
                        ApiError::Invalid(format!(
                            "unknown output {o:?}; {} has {}",
                            p.name,
                            names.join(", ")
                        ))
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    let event = &model.package.manifest.event_shape;
    let rows_shape =
        |n: usize| -> Vec<usize> { std::iter::once(n).chain(event.iter().copied()).collect() };
    let answer = |run: Outputs, tails, outputs, parameters| Answer {
        model: p.name.clone(),
        version: model.version,
        run,
        tails,
        outputs,
        parameters,
    };
    match view {
        View::Encode => {
            let context = take_optional(&mut inputs, CONTEXT);
            let x = rows(take(inputs, DATA, &p.name)?, event)?;
            let n = x.count;
            let context = from_tensor(&model, context, n)?;
            let (out, tails) = scored(call, Deadline(deadline), &model, DATA, x, context).await?;
            let mut outputs = Vec::with_capacity(wanted.len());
            for name in wanted {
                let (shape, src) = match name {
                    LATENT => {
                        finite(&out.values[0], model.event_size, DATA, OUT_OF_DOMAIN)?;
                        (rows_shape(n), Source::Graph(0))
                    }
                    LOG_PROB => (vec![n], Source::Graph(1)),
                    LOG_PROB_TERMS => {
                        finite(&out.values[2], model.event_size, DATA, OUT_OF_DOMAIN)?;
                        (rows_shape(n), Source::Graph(2))
                    }
                    _ => (vec![n], Source::Tails),
                };
                outputs.push((name, shape, src));
            }
            Ok(answer(out, tails, outputs, None))
        }
        View::Decode => {
            let context = take_optional(&mut inputs, CONTEXT);
            let z = rows(take(inputs, LATENT, &p.name)?, event)?;
            let n = z.count;
            let context = from_tensor(&model, context, n)?;
            let out = call
                .run(&model, Direction::Decode, LATENT, z, context, deadline)
                .await?;
            let why = "the decoded sample overflowed float32: the latent lies too far out";
            finite(&out.values[0], model.event_size, LATENT, why)?;
            Ok(answer(
                out,
                None,
                vec![(DATA, rows_shape(n), Source::Graph(0))],
                None,
            ))
        }
        View::Sample => {
            let n = scalar_int(&mut inputs, NUM_SAMPLES)?.ok_or_else(|| {
                ApiError::Invalid(format!("{} needs input {NUM_SAMPLES:?}", p.name))
            })?;
            let limit = call.config().max_samples_per_request.min(call.max_rows());
            if n < 1 || n > limit as i128 {
                return Err(ApiError::Invalid(format!(
                    "input {NUM_SAMPLES:?} must be between 1 and {limit}, got {n}"
                )));
            }
            let t = match take_optional(&mut inputs, TEMPERATURE) {
                None => 1.0,
                Some(i) => scalar_float(i)?,
            };
            if !(t.is_finite() && t >= 0.0) {
                return Err(ApiError::Invalid(format!(
                    "input {TEMPERATURE:?} must be a finite number ≥ 0, got {t}"
                )));
            }
            let seed = match scalar_int(&mut inputs, SEED)? {
                None => rand::random(),
                Some(s) => u64::try_from(s).map_err(|_| {
                    ApiError::Invalid(format!("input {SEED:?} must be a UINT64, got {s}"))
                })?,
            };
            let n = n as usize;
            // One context row per sample (N = num_samples), or one for all (N = 1).
            let context = match take_optional(&mut inputs, CONTEXT) {
                Some(c) if c.shape.first() == Some(&1) && n > 1 => {
                    from_tensor(&model, Some(c), 1)?.repeat(n)
                }
                c => from_tensor(&model, c, n)?,
            };
            let z = flowpack::sampling::latent_noise(n, model.event_size, t, seed);
            if z.iter().any(|v| !v.is_finite()) {
                return Err(ApiError::Invalid(format!(
                    "input {TEMPERATURE:?}: {t:?} makes the latent noise overflow float32; lower it"
                )));
            }
            let out = call
                .submit(&model, Direction::Decode, z, context, deadline)
                .await?;
            let why =
                format!("the decoded sample overflowed float32 at temperature {t:?}; lower it");
            finite(&out.values[0], model.event_size, DATA, &why)?;
            let drawn = json!({"seed": seed, "temperature": t});
            Ok(answer(
                out,
                None,
                vec![(DATA, rows_shape(n), Source::Graph(0))],
                Some(drawn),
            ))
        }
    }
}

/// `POST /v2/models/{name}[/versions/{version}]/infer`: JSON or binary tensors in, each output
/// out as the request asks.
pub(super) async fn infer(
    call: Call,
    Deadline(deadline): Deadline,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Served, ApiError> {
    let length = headers
        .get(tensor::HEADER_LENGTH)
        .map(|v| v.to_str().unwrap_or("?"));
    let (json_part, binary) = tensor::split_body(&body, length)?;
    if json_part.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::Invalid(
            "the body is empty; send an inference request".into(),
        ));
    }
    let mut req: InferHeader = serde_json::from_slice(json_part).map_err(|e| match length {
        Some(n) if e.is_eof() || e.is_syntax() => ApiError::Malformed(format!(
            "the body's first {n} bytes (Inference-Header-Content-Length) are not a whole JSON \
             inference request: {e}"
        )),
        _ => explain::<InferHeader>(json_part),
    })?;
    tensor::check_binary_flags(&req)?;
    let inputs = tensor::decode_inputs(&mut req, binary)?;
    let outputs = req
        .outputs
        .as_ref()
        .map(|list| list.iter().map(|o| o.name.clone()).collect());
    let call_req = InferCall {
        model: p.name,
        version: p.version,
        inputs,
        outputs,
    };
    let answer = run(&call, deadline, call_req).await?;
    let outputs: Vec<Output> = answer
        .outputs()
        .map(|(name, shape, data)| Output {
            name,
            shape: shape.to_vec(),
            data,
            binary: tensor::wants_binary(&req, name),
        })
        .collect();
    let (body, json_length) = tensor::encode_response(
        &answer.model,
        answer.version,
        req.id.as_deref(),
        &outputs,
        answer.parameters.clone(),
    );
    Ok(Served::inference(&answer.run, body, json_length))
}

/// The one input a view takes, by name.
fn take(inputs: Vec<Input>, name: &str, model: &str) -> Result<Input, ApiError> {
    let n = inputs.len();
    let mut it = inputs.into_iter();
    match (it.next(), n) {
        (Some(i), 1) if i.name == name => Ok(i),
        _ => Err(ApiError::Invalid(format!(
            "{model} takes one input, {name:?}; got {n}"
        ))),
    }
}

fn take_optional(inputs: &mut Vec<Input>, name: &str) -> Option<Input> {
    let i = inputs.iter().position(|i| i.name == name)?;
    Some(inputs.swap_remove(i))
}

/// An FP32 `[N, ...event]` input as rows for the batcher (whose checks name it).
fn rows(input: Input, event: &[usize]) -> Result<Rows, ApiError> {
    let name = &input.name;
    if input.datatype != DataType::Fp32 {
        return Err(ApiError::Invalid(format!(
            "input {name:?}: datatype {}; the model takes FP32",
            input.datatype.as_str()
        )));
    }
    if input.shape.len() != event.len() + 1 {
        return Err(ApiError::Invalid(format!(
            "input {name:?}: shape {:?}; the model takes [N, {}]",
            input.shape,
            event
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let Data::F32(values) = input.data else {
        unreachable!("FP32 inputs decode to F32")
    };
    Ok(Rows {
        values,
        count: input.shape[0],
        row_shape: input.shape[1..].to_vec(),
    })
}

/// A one-element integer input, if sent.
fn scalar_int(inputs: &mut Vec<Input>, name: &str) -> Result<Option<i128>, ApiError> {
    let Some(i) = take_optional(inputs, name) else {
        return Ok(None);
    };
    match i.data {
        Data::Int(v) if v.len() == 1 => Ok(Some(v[0])),
        Data::Int(v) => Err(ApiError::Invalid(format!(
            "input {name:?}: one element expected, got {}",
            v.len()
        ))),
        _ => Err(ApiError::Invalid(format!(
            "input {name:?}: datatype {}; send an integer type (INT64, UINT64, ...)",
            i.datatype.as_str()
        ))),
    }
}

/// A one-element float input.
fn scalar_float(i: Input) -> Result<f64, ApiError> {
    let v: Vec<f64> = match i.data {
        Data::F32(v) => v.into_iter().map(f64::from).collect(),
        Data::F64(v) => v,
        Data::Int(_) => {
            return Err(ApiError::Invalid(format!(
                "input {:?}: datatype {}; send FP32 or FP64",
                i.name,
                i.datatype.as_str()
            )))
        }
    };
    match v[..] {
        [x] => Ok(x),
        _ => Err(ApiError::Invalid(format!(
            "input {:?}: one element expected, got {}",
            i.name,
            v.len()
        ))),
    }
}

/// One entry of the repository index.
#[derive(Serialize)]
pub(super) struct IndexEntry {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// The optional body of the repository routes: nothing, or a JSON object (its `ready` read by
/// the index; other keys, such as Triton's load `parameters`, ignored).
fn repository_body(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Default::default());
    }
    match serde_json::from_slice(body) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::Malformed(
            "the body must be a JSON object (or empty)".into(),
        )),
        Err(e) => Err(ApiError::Malformed(format!("malformed JSON: {e}"))),
    }
}

/// `POST /v2/repository/index`: every served model (READY) and every refused package
/// (UNAVAILABLE, with the reason); with `{"ready": true}` only the served ones.
pub(super) async fn repository_index(
    call: Call,
    Body(body): Body,
) -> Result<Json<Vec<IndexEntry>>, ApiError> {
    let ready_only = match repository_body(&body)?.get("ready") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::Invalid("ready must be true or false".into())),
    };
    let repo = call.repository()?;
    let mut index: Vec<IndexEntry> = repo
        .versions
        .values()
        .flat_map(|v| v.values())
        .map(|m| IndexEntry {
            name: m.name.clone(),
            version: Some(m.version.to_string()),
            state: "READY",
            reason: None,
        })
        .collect();
    if ready_only {
        return Ok(Json(index));
    }
    index.extend(repo.failures.iter().map(|f| IndexEntry {
        name: f.model.clone(),
        version: f.version.map(|v| v.to_string()),
        state: "UNAVAILABLE",
        reason: Some(f.reason.clone()),
    }));
    Ok(Json(index))
}

fn explicit(s: &AppState, what: &str) -> Result<(), ApiError> {
    if s.config.model_control != ModelControl::Explicit {
        return Err(ApiError::Conflict(format!(
            "{what} needs --model-control explicit (this server runs with {})",
            clap::ValueEnum::to_possible_value(&s.config.model_control)
                .map_or_else(String::new, |v| v.get_name().to_string())
        )));
    }
    Ok(())
}

/// `POST /v2/repository/models/{name}/load`: loads (or reloads) the model's newest version
/// beside what is served, then swaps it in (explicit model control).
pub(super) async fn repository_load(
    State(s): St,
    Path(name): Path<String>,
    Body(body): Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    repository_body(&body)?;
    explicit(&s, "loading a model")?;
    let versions = lifecycle::load(&s, &s.load_options, &name).await?;
    let all: Vec<String> = versions.iter().map(u64::to_string).collect();
    Ok(Json(json!({
        "name": name,
        "version": all.last(),
        "versions": all,
        "state": "READY",
    })))
}

/// `POST /v2/repository/models/{name}/unload`: stops serving the model; requests that
/// already have it finish (explicit model control).
pub(super) async fn repository_unload(
    State(s): St,
    Path(name): Path<String>,
    Body(body): Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    repository_body(&body)?;
    explicit(&s, "unloading a model")?;
    lifecycle::unload(&s, &name)?;
    Ok(Json(json!({"name": name, "state": "UNAVAILABLE"})))
}
