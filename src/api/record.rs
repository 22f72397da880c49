//! The metrics layer: one middleware around every inference route records the request's
//! metrics and timing headers from what the handler left in its [`Scope`] (the model, the
//! rows) and what the response carries ([`Timing`] on success, the [`ApiError`] on failure).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Serialize;
use tokio::time::Instant;

use super::error::ApiError;
use super::AppState;
use crate::batcher::Outputs;
use crate::metrics::Endpoint;
use crate::repository::Model;

/// What a handler tells the metrics layer as it goes.
#[derive(Default)]
pub struct Scope {
    model: OnceLock<Arc<Model>>,
    rows: AtomicUsize,
}

impl Scope {
    /// The request is for `model`.
    pub fn set_model(&self, model: &Arc<Model>) {
        let _ = self.model.set(model.clone());
    }

    /// `rows` rows were admitted to a queue.
    pub fn set_rows(&self, rows: usize) {
        self.rows.store(rows, Ordering::Relaxed);
    }
}

/// Where a successful request's time went.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    queue: Duration,
    inference: Duration,
}

/// A successful inference answer: its body and timing.
pub struct Served {
    body: Vec<u8>,
    content_type: &'static str,
    /// The length of a JSON part followed by binary tensors (Open Inference Protocol).
    inference_header: Option<usize>,
    timing: Timing,
}

impl Served {
    /// `body` as JSON, with the timing of `out`.
    pub fn json<T: Serialize>(out: &Outputs, body: &T) -> Served {
        // About 12 bytes a number; reserving up front spares the regrowth copies.
        let numbers: usize = out.values.iter().map(Vec::len).sum();
        let mut bytes = Vec::with_capacity(96 + 12 * numbers);
        serde_json::to_writer(&mut bytes, body).expect("responses serialise");
        let body = bytes;
        Served::bytes(out, body, "application/json")
    }

    /// A body of `content_type`, with the timing of `out`.
    pub fn bytes(out: &Outputs, body: Vec<u8>, content_type: &'static str) -> Served {
        Served {
            body,
            content_type,
            inference_header: None,
            timing: Timing {
                queue: out.queue_time,
                inference: out.inference_time,
            },
        }
    }
}

impl Served {
    /// An Open Inference Protocol answer: JSON, or (`json_length` given) a JSON part of that
    /// length followed by binary tensors.
    pub fn inference(out: &Outputs, body: Vec<u8>, json_length: Option<usize>) -> Served {
        let content_type = match json_length {
            Some(_) => "application/octet-stream",
            None => "application/json",
        };
        Served {
            inference_header: json_length,
            ..Served::bytes(out, body, content_type)
        }
    }
}

impl IntoResponse for Served {
    fn into_response(self) -> Response {
        let mut r = ([(header::CONTENT_TYPE, self.content_type)], self.body).into_response();
        if let Some(n) = self.inference_header {
            r.headers_mut()
                .insert(super::tensor::HEADER_LENGTH, HeaderValue::from(n));
        }
        r.extensions_mut().insert(self.timing);
        r
    }
}

fn micros(d: Duration) -> HeaderValue {
    HeaderValue::from(d.as_micros() as u64)
}

/// Counts one finished request of `endpoint` (HTTP or gRPC): requests, rows, latency and
/// rejections by model, or by endpoint alone when it failed before naming a model.
pub fn observe(
    app: &AppState,
    endpoint: Endpoint,
    scope: &Scope,
    took: Duration,
    error: Option<&ApiError>,
) {
    let rows = scope.rows.load(Ordering::Relaxed);
    match (scope.model.get(), error) {
        (Some(m), None) => m.metrics.served(endpoint, rows, took),
        (Some(m), Some(e)) => {
            m.metrics
                .failed(endpoint, e.status().as_str(), rows, took, e.rejection())
        }
        (None, Some(e)) => {
            app.metrics
                .failed_unresolved(endpoint, e.status().as_str(), e.rejection())
        }
        (None, None) => {}
    }
}

/// Holds the in-flight gauge up while a request runs.
pub struct InFlightGuard<'a>(&'a prometheus::IntGauge);

impl<'a> InFlightGuard<'a> {
    /// Counts a request in flight until dropped.
    pub fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlightGuard(gauge)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The middleware of one inference endpoint (its state): requests, rows, latency and
/// rejections by model, the in-flight gauge, and the `x-*-time-us` headers.
pub async fn record(
    State(endpoint): State<Endpoint>,
    Extension(app): Extension<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let scope = Arc::new(Scope::default());
    req.extensions_mut().insert(scope.clone());
    let _in_flight = InFlightGuard::new(&app.metrics.in_flight);
    let mut res = next.run(req).await;
    observe(
        &app,
        endpoint,
        &scope,
        started.elapsed(),
        res.extensions().get::<ApiError>(),
    );
    let timing = res.extensions().get::<Timing>().copied();
    let h = res.headers_mut();
    if let Some(t) = timing {
        h.insert("x-queue-time-us", micros(t.queue));
        h.insert("x-inference-time-us", micros(t.inference));
    }
    h.insert("x-total-time-us", micros(started.elapsed()));
    res
}
