//! flowserve: serves flowtrain's model packages over HTTP with ONNX Runtime.
//!
//! Start-up: parse the config, open the port (liveness answers at once), load, check and
//! warm every model on blocking threads, then report ready. SIGTERM/SIGINT: readiness turns
//! false, the listener closes after the drain delay, in-flight requests finish, the queues
//! close and the engine threads are joined; exit 0, or 1 if the shutdown timeout cut
//! requests off.
//!
//! The request path: [`api`] (parse, validate against the manifest) → [`batcher`] (queue,
//! batch) → [`engine`] (one thread per graph) → back through the batcher to the request.
//! [`repository`] loads the models; [`metrics`] holds every Prometheus metric.

#![warn(missing_docs)]

pub mod api;
pub mod batch;
pub mod batcher;
pub mod config;
pub mod engine;
pub mod grpc;
pub mod healthcheck;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod repository;
pub mod scoring;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flowpack::runtime::{CudaOptions, SessionOptions};

use crate::api::AppState;
use crate::batcher::BatchConfig;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::repository::LoadOptions;

async fn shutdown_signal(state: Arc<AppState>, closing: tokio::sync::watch::Sender<bool>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    state.draining.store(true, Ordering::SeqCst);
    let delay = Duration::from_millis(state.config.drain_delay_ms);
    let limit = Duration::from_millis(state.config.shutdown_timeout_ms);
    tracing::info!(in_flight = state.metrics.in_flight.get(), "shutting down: /readyz now 503; serving {delay:?} more, then draining in-flight requests (at most {limit:?})");
    tokio::time::sleep(delay).await;
    let _ = closing.send(true);
    tokio::spawn(async move {
        tokio::time::sleep(limit).await;
        let left = state.metrics.in_flight.get();
        tracing::error!(
            in_flight = left,
            "drain timeout reached; exiting with requests still in flight"
        );
        std::process::exit(1);
    });
}

/// Serves until SIGTERM/SIGINT and the drain that follows.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{}:{}", config.host, config.port)
        .parse()
        .with_context(|| format!("--host {} --port {}", config.host, config.port))?;
    // Fail fast, with a clear message, when ONNX Runtime cannot be loaded at all.
    flowpack::runtime::environment()?;
    let options = LoadOptions {
        session: SessionOptions {
            intra_threads: config.intra_op_threads,
            providers: config.execution_providers.clone(),
            cuda: CudaOptions {
                device_id: config.cuda_device_id,
                memory_limit: config.cuda_memory_limit_bytes,
                tf32: config.cuda_tf32,
            },
        },
        batch: BatchConfig {
            max_batch_rows: config.max_batch_rows as usize,
            max_queue_rows: config.max_queue_rows as usize,
            max_delay: Duration::from_micros(config.max_queue_delay_us),
        },
        policy: config.version_policy.clone(),
    };
    let state = Arc::new(AppState {
        config,
        metrics: Metrics::new(),
        repo: Default::default(),
        load_options: options.clone(),
        draining: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "listening; loading models from {}", state.config.models.display());

    let loader = state.clone();
    tokio::spawn(async move {
        match repository::load(&loader.config.models, &options, &loader.metrics).await {
            Ok(repo) => {
                let (n, failed) = (repo.models.len(), repo.failures.len());
                loader.repo.set(repo);
                if loader.config.model_control == lifecycle::ModelControl::Poll {
                    let every = Duration::from_secs_f64(loader.config.poll_interval_s);
                    tracing::info!(every = ?every, "watching the repository for new versions");
                    tokio::spawn(lifecycle::poll(loader.clone(), options.clone(), every));
                }
                if n == 0 {
                    tracing::error!(failed, "no model could be loaded; /readyz stays 503");
                } else {
                    tracing::info!(models = n, failed, "ready");
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                loader.repo.set(Default::default());
            }
        }
    });

    // Both listeners close together, after the drain delay.
    let (closing, closed) = tokio::sync::watch::channel(false);
    let grpc = match state.config.grpc_port {
        None => None,
        Some(port) => {
            let addr: SocketAddr = format!("{}:{port}", state.config.host)
                .parse()
                .with_context(|| format!("--host {} --grpc-port {port}", state.config.host))?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for gRPC"))?;
            tracing::info!(addr = %listener.local_addr()?, "gRPC (Open Inference Protocol) listening");
            let mut closed = closed.clone();
            let shutdown = async move {
                let _ = closed.wait_for(|&c| c).await;
            };
            Some(tokio::spawn(grpc::serve(state.clone(), listener, shutdown)))
        }
    };
    let app = api::router(state.clone());
    listener::serve(
        listener,
        app,
        state.clone(),
        shutdown_signal(state.clone(), closing),
    )
    .await;
    if let Some(g) = grpc {
        g.await
            .context("gRPC server task")?
            .context("gRPC server error")?;
    }
    if let Some(repo) = state.repo.get() {
        let limit = Duration::from_millis(state.config.shutdown_timeout_ms);
        repo.shutdown(limit).await;
    }
    tracing::info!("drained; bye");
    Ok(())
}
