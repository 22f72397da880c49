//! HTTP routes: parse → validate against the manifest → queue → respond. Handlers are thin;
//! batching lives in [`crate::batcher`], models in [`crate::repository`].

mod error;
mod handlers;
pub mod wire;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use axum::routing::{get, post, MethodRouter};
use axum::Router;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::repository::Repository;

/// What every handler shares.
pub struct AppState {
    /// Settings.
    pub config: Config,
    /// Metrics.
    pub metrics: Metrics,
    /// The loaded models, once loading has finished.
    pub repo: OnceLock<Repository>,
    /// Set on SIGTERM: readiness turns false; requests are still served until the listener
    /// closes (after `--drain-delay-ms`) and in-flight ones finish.
    pub draining: AtomicBool,
}

/// Every route of the wire contract: method, path and handler. `openapi.yaml` describes
/// exactly these (a test keeps the two in step).
pub fn routes() -> Vec<(&'static str, &'static str, MethodRouter<Arc<AppState>>)> {
    use handlers::*;
    vec![
        ("POST", "/log_prob", post(log_prob)),
        ("POST", "/encode", post(encode)),
        ("POST", "/sample", post(sample)),
        ("POST", "/decode", post(decode)),
        ("GET", "/v1/models", get(list_models)),
        ("GET", "/v1/models/{name}", get(model_info)),
        ("POST", "/v1/models/{name}/log_prob", post(log_prob_named)),
        ("POST", "/v1/models/{name}/encode", post(encode_named)),
        ("POST", "/v1/models/{name}/sample", post(sample_named)),
        ("POST", "/v1/models/{name}/decode", post(decode_named)),
        ("GET", "/healthz", get(healthz)),
        ("GET", "/readyz", get(readyz)),
        ("GET", "/metrics", get(metrics)),
    ]
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
        .with_state(state)
}
