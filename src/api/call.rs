//! [`Call`]: what an inference handler works with — the model (from the URL, the body or the
//! default), the checks of rows against its manifest and the limits, and the queue.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, OptionalFromRequestParts, Path};
use axum::http::request::Parts;
use flowpack::Direction;
use tokio::time::Instant;

use super::error::ApiError;
use super::record::Scope;
use super::wire::Rows;
use super::AppState;
use crate::batcher::{BatchError, Outputs};
use crate::repository::{valid_name, Model, Repository};

/// One inference request's context.
pub struct Call {
    state: Arc<AppState>,
    /// The model named in the URL (`/v1/models/{name}/...`).
    named: Option<String>,
    scope: Arc<Scope>,
}

impl FromRequestParts<Arc<AppState>> for Call {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let params =
            <Path<HashMap<String, String>> as OptionalFromRequestParts<_>>::from_request_parts(
                parts, state,
            )
            .await
            .map_err(|e| ApiError::Malformed(format!("the model name in the URL: {e}")))?;
        Ok(Call {
            state: state.clone(),
            named: params.and_then(|Path(mut p)| p.remove("name")),
            scope: parts
                .extensions
                .get::<Arc<Scope>>()
                .cloned()
                .unwrap_or_default(),
        })
    }
}

impl Call {
    /// A call outside HTTP (gRPC) that reports to `scope`.
    pub fn detached(state: Arc<AppState>, scope: Arc<Scope>) -> Call {
        Call {
            state,
            named: None,
            scope,
        }
    }

    /// The server's settings.
    pub fn config(&self) -> &crate::config::Config {
        &self.state.config
    }

    /// The model this request is for: the URL's, else the body's (they must agree), else the
    /// default one.
    pub fn model(&self, in_body: Option<&str>) -> Result<Arc<Model>, ApiError> {
        let repo = self.repository()?;
        let name = match (self.named.as_deref(), in_body) {
            (Some(p), Some(b)) if p != b => {
                return Err(ApiError::Invalid(format!(
                    "model: the body names {b:?} but the URL names {p:?}"
                )))
            }
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => match (&self.state.config.default_model, repo.models.len()) {
                (Some(d), _) => d.as_str(),
                (None, 1) => repo.models.keys().next().expect("one model"),
                (None, _) => {
                    let names: Vec<&str> = repo.models.keys().map(String::as_str).collect();
                    return Err(ApiError::Invalid(format!(
                        "model: name one of the served models ({})",
                        names.join(", ")
                    )));
                }
            },
        };
        self.lookup(name)
    }

    /// The loaded models.
    pub fn repository(&self) -> Result<Arc<Repository>, ApiError> {
        self.state.repo.get().ok_or_else(|| {
            ApiError::Unavailable(
                "models are still loading; GET /readyz says when they are ready".into(),
            )
        })
    }

    /// The newest served version of model `name`, which this request is now for.
    pub fn lookup(&self, name: &str) -> Result<Arc<Model>, ApiError> {
        self.find(name, None)
    }

    /// Version `version` of model `name`, which this request is now for.
    pub fn lookup_version(&self, name: &str, version: u64) -> Result<Arc<Model>, ApiError> {
        self.find(name, Some(version))
    }

    fn find(&self, name: &str, version: Option<u64>) -> Result<Arc<Model>, ApiError> {
        let repo = self.repository()?;
        let model = repo
            .get(name, version)
            .filter(|_| valid_name(name))
            .ok_or_else(|| ApiError::UnknownModel(name.to_string()))?;
        self.scope.set_model(model);
        Ok(model.clone())
    }

    /// The most rows one request may carry.
    pub fn max_rows(&self) -> usize {
        let c = &self.state.config;
        c.max_request_rows.min(c.max_queue_rows) as usize
    }

    /// Checks `rows` (the request's `field`) against the model's event shape and the row
    /// limit, then runs them on `graph` with a conditional model's `context` (graph values,
    /// one row per row; empty for an unconditional model).
    pub async fn run(
        &self,
        model: &Model,
        graph: Direction,
        field: &str,
        rows: Rows,
        context: Vec<f32>,
        deadline: Instant,
    ) -> Result<Outputs, ApiError> {
        let event = &model.package.manifest.event_shape;
        if rows.count == 0 {
            return Err(ApiError::Invalid(format!(
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
            return Err(ApiError::Invalid(format!(
                "{field}: each row of model {:?} must have {what}; got {got}",
                model.name
            )));
        }
        let max = self.max_rows();
        if rows.count > max {
            return Err(ApiError::TooLarge(format!(
                "{field}: {} rows in one request; the limit is {max} (split the request)",
                rows.count
            )));
        }
        self.submit(model, graph, rows.values, context, deadline)
            .await
    }

    /// Queues valid rows on `graph` — with their graph-ready `context` for a conditional
    /// model (empty otherwise) — and waits for them until `deadline`.
    pub async fn submit(
        &self,
        model: &Model,
        graph: Direction,
        values: Vec<f32>,
        context: Vec<f32>,
        deadline: Instant,
    ) -> Result<Outputs, ApiError> {
        let (d, k) = (model.event_size, model.context_width);
        let rows = values.len() / d;
        if context.len() != rows * k {
            return Err(ApiError::Invalid(format!(
                "context: {} values for {rows} rows of a model taking {k} per row",
                context.len()
            )));
        }
        self.scope.set_rows(rows);
        let input = if k == 0 {
            values
        } else {
            // The queue carries each row's context after its values (see Engine::start).
            let mut joined = Vec::with_capacity(rows * (d + k));
            for (x, c) in values.chunks_exact(d).zip(context.chunks_exact(k)) {
                joined.extend_from_slice(x);
                joined.extend_from_slice(c);
            }
            joined
        };
        let queued = model.queue(graph).submit(input, deadline);
        match tokio::time::timeout_at(deadline, queued).await {
            Ok(Err(BatchError::Engine(why))) => {
                // Only the batch holding these rows failed; say which model and graph.
                tracing::warn!(model = %model.name, version = model.version, graph = graph.as_str(), "batch failed: {why}");
                Err(ApiError::Engine(format!(
                    "model {:?} (version {}), {} graph: {why}",
                    model.name,
                    model.version,
                    graph.as_str()
                )))
            }
            Ok(r) => r.map_err(ApiError::from),
            Err(_) => Err(ApiError::from(BatchError::Timeout)),
        }
    }
}

/// `Ok` when every value is finite; else a 422 naming the first rows (of `width` values)
/// that are not, as `{field}[i]`, with `why`. A response never carries a non-finite number.
pub fn finite(values: &[f32], width: usize, field: &str, why: &str) -> Result<(), ApiError> {
    if values.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    let bad: Vec<usize> = values
        .chunks(width.max(1))
        .enumerate()
        .filter(|(_, r)| r.iter().any(|v| !v.is_finite()))
        .map(|(i, _)| i)
        .collect();
    let shown: Vec<String> = bad
        .iter()
        .take(5)
        .map(|i| format!("{field}[{i}]"))
        .collect();
    let more = if bad.len() > 5 {
        format!(" and {} more", bad.len() - 5)
    } else {
        String::new()
    };
    Err(ApiError::Invalid(format!(
        "{}{more}: {why}",
        shown.join(", ")
    )))
}
