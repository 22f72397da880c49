//! The HTTP listener: accepts connections and serves each with hyper, bounded so that no
//! client can hold the server. A connection must send its request headers within
//! `--header-read-timeout-ms` (slow headers are cut off by hyper, and an idle keep-alive
//! connection is closed after as long); a request body must
//! arrive within `--body-read-timeout-ms` (408, in [`crate::api`]'s body extractor). Past
//! `--max-connections` open connections, a new one is still accepted but answers only the
//! health probes; everything else gets a 503 with `Retry-After` and the connection closes,
//! so a flood is refused cleanly while Kubernetes keeps seeing the process alive.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::{ApiError, AppState};

/// Routes still answered on a connection past the limit: the probes.
const PROBES: [&str; 4] = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"];

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits for
/// the open connections to finish their requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    let config = &state.config;
    let limit = config.max_connections as usize;
    let slots = Arc::new(Semaphore::new(limit));
    let header_timeout = Duration::from_millis(config.header_read_timeout_ms);
    let overflow = app
        .clone()
        .layer(axum::middleware::from_fn_with_state(limit, probes_only));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let slot = slots.clone().try_acquire_owned().ok();
        let service = match slot {
            Some(_) => app.clone(),
            None => {
                state.metrics.connections_refused.inc();
                overflow.clone()
            }
        };
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(slot.is_some());
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let conn = graceful.watch(conn);
        let open = state.metrics.open_connections.clone();
        open.inc();
        tokio::spawn(async move {
            // Errors here are the client's (reset, timed out headers): nothing to answer.
            let _ = conn.await;
            open.dec();
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// On a connection past the limit: the probes answer, everything else is refused.
async fn probes_only(
    axum::extract::State(limit): axum::extract::State<usize>,
    req: Request,
    next: Next,
) -> Response {
    if PROBES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let mut r = ApiError::Unavailable(format!(
        "the server has {limit} connections open (--max-connections); retry, or reuse a connection"
    ))
    .into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}
