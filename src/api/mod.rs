//! HTTP: routes, extractors, wire types, errors, and the metrics layer. A request flows
//! [`extract`] (body, deadline) → [`handlers`] (model, checks) → the batcher → a response
//! that the [`record`] layer measures.

pub(crate) mod call;
mod context;
mod error;
mod extract;
#[cfg(test)]
mod fuzz;
pub(crate) mod handlers;
pub(crate) mod record;
pub mod tensor;
pub(crate) mod v2;
pub mod wire;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::handler::Handler;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post, MethodRouter};
use axum::{Extension, Router};

pub use error::ApiError;

use crate::config::Config;
use crate::metrics::{Endpoint, Metrics};
use crate::repository::{LoadOptions, Registry};

/// What every handler shares.
pub struct AppState {
    /// The server's settings.
    pub config: Config,
    /// The metric families.
    pub metrics: Metrics,
    /// The served models, once the first load has finished.
    pub repo: Registry,
    /// How models are loaded (at start, and by the lifecycle routes and watcher).
    pub load_options: LoadOptions,
    /// Set on SIGTERM: readiness turns false; requests are still served until the listener
    /// closes (after `--drain-delay-ms`) and in-flight ones finish.
    pub draining: AtomicBool,
}

/// An inference route: `handler` behind the metrics layer of `endpoint`.
fn inference<H, T>(endpoint: Endpoint, handler: H) -> MethodRouter<Arc<AppState>>
where
    H: Handler<T, Arc<AppState>>,
    T: 'static,
{
    post(handler).layer(from_fn_with_state(endpoint, record::record))
}

/// Every route of the wire contract: method, path and handler. `openapi.yaml` describes
/// exactly these (a test keeps the two in step).
pub fn routes() -> Vec<(&'static str, &'static str, MethodRouter<Arc<AppState>>)> {
    use handlers::*;
    use Endpoint::*;
    vec![
        ("POST", "/log_prob", inference(LogProb, log_prob)),
        ("POST", "/encode", inference(Encode, encode)),
        ("POST", "/sample", inference(Sample, sample)),
        ("POST", "/decode", inference(Decode, decode)),
        ("POST", "/score", inference(Score, score)),
        ("GET", "/v1/models", get(list_models)),
        ("GET", "/v1/models/{name}", get(model_info)),
        (
            "POST",
            "/v1/models/{name}/log_prob",
            inference(LogProb, log_prob),
        ),
        (
            "POST",
            "/v1/models/{name}/encode",
            inference(Encode, encode),
        ),
        (
            "POST",
            "/v1/models/{name}/sample",
            inference(Sample, sample),
        ),
        (
            "POST",
            "/v1/models/{name}/decode",
            inference(Decode, decode),
        ),
        ("POST", "/v1/models/{name}/score", inference(Score, score)),
        ("GET", "/healthz", get(healthz)),
        ("GET", "/readyz", get(readyz)),
        ("GET", "/metrics", get(metrics)),
        // The Open Inference Protocol (KServe v2).
        ("GET", "/v2", oip(get(v2::server_metadata))),
        ("GET", "/v2/health/live", oip(get(v2::live))),
        ("GET", "/v2/health/ready", oip(get(v2::server_ready))),
        ("GET", "/v2/models/{name}", oip(get(v2::model_metadata))),
        (
            "GET",
            "/v2/models/{name}/versions/{version}",
            oip(get(v2::model_metadata)),
        ),
        ("GET", "/v2/models/{name}/ready", oip(get(v2::model_ready))),
        (
            "GET",
            "/v2/models/{name}/versions/{version}/ready",
            oip(get(v2::model_ready)),
        ),
        (
            "POST",
            "/v2/models/{name}/infer",
            oip(inference(Infer, v2::infer)),
        ),
        (
            "POST",
            "/v2/models/{name}/versions/{version}/infer",
            oip(inference(Infer, v2::infer)),
        ),
        (
            "POST",
            "/v2/repository/index",
            oip(post(v2::repository_index)),
        ),
        (
            "POST",
            "/v2/repository/models/{name}/load",
            oip(post(v2::repository_load)),
        ),
        (
            "POST",
            "/v2/repository/models/{name}/unload",
            oip(post(v2::repository_unload)),
        ),
    ]
}

/// A route of the Open Inference Protocol: its errors in the protocol's shape.
fn oip(route: MethodRouter<Arc<AppState>>) -> MethodRouter<Arc<AppState>> {
    route.layer(axum::middleware::from_fn(v2::errors))
}

/// The service's router over [`routes`].
pub fn router(state: Arc<AppState>) -> Router {
    routes()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .fallback(handlers::fallback)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(tower_http::decompression::RequestDecompressionLayer::new())
        .layer(Extension(state.clone()))
        .with_state(state)
}
