//! HTTP routes: parse → validate against the manifest → queue → respond. Handlers are thin;
//! batching lives in [`crate::batcher`], models in [`crate::repository`].

mod error;
mod handlers;
pub mod wire;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use axum::routing::{get, post};
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
    /// Set on SIGTERM: readiness turns false while in-flight requests finish.
    pub draining: AtomicBool,
}

/// Every route of the wire contract (`openapi.yaml`).
pub fn router(state: Arc<AppState>) -> Router {
    use handlers::*;
    Router::new()
        .route("/log_prob", post(log_prob))
        .route("/encode", post(encode))
        .route("/sample", post(sample))
        .route("/decode", post(decode))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}", get(model_info))
        .route("/v1/models/{name}/log_prob", post(log_prob_named))
        .route("/v1/models/{name}/encode", post(encode_named))
        .route("/v1/models/{name}/sample", post(sample_named))
        .route("/v1/models/{name}/decode", post(decode_named))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}
