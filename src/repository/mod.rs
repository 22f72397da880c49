//! The model repository: `<dir>/<model>/<version>/flow.json`. Each model's highest version
//! that passes flowpack's checks, loads into ONNX Runtime and warms up is served; every
//! package refused on the way is reported with its reason and stops no other model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use flowpack::runtime::{Provider, SessionOptions};
use flowpack::{Cost, Package};
use serde::Serialize;

use crate::batcher::{BatchConfig, Batcher, QueueMetrics};
use crate::metrics::{EndpointSeries, Metrics, ENDPOINTS};
use crate::runtime::Engine;
use prometheus::Histogram;

/// A served model version.
pub struct Model {
    /// Name clients use (the folder name).
    pub name: String,
    /// Version served (the folder name).
    pub version: u64,
    /// The checked package.
    pub package: Package,
    /// Scalars per example.
    pub event_size: usize,
    /// Queue of the data → latent graph (`/log_prob`, `/encode`).
    pub encode: Batcher,
    /// Queue of the latent → data graph (`/sample`, `/decode`).
    pub decode: Batcher,
    /// Providers the two sessions run on.
    pub providers: [Provider; 2],
    /// Seconds to load, check and warm.
    pub load_seconds: f64,
    /// Success series per endpoint, in [`crate::metrics::ENDPOINTS`] order.
    pub series: Vec<EndpointSeries>,
    /// Served log_prob values.
    pub log_prob: Histogram,
}

/// A package that was refused.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFailure {
    /// Model folder name.
    pub model: String,
    /// Version folder, when the failure is about one.
    pub version: Option<u64>,
    /// Why, as a sentence.
    pub reason: String,
}

/// What was loaded.
#[derive(Default)]
pub struct Repository {
    /// Served models by name.
    pub models: BTreeMap<String, Arc<Model>>,
    /// Refused packages.
    pub failures: Vec<LoadFailure>,
}

/// How models are loaded.
#[derive(Clone)]
pub struct LoadOptions {
    /// ONNX Runtime session settings.
    pub session: SessionOptions,
    /// Queue settings.
    pub batch: BatchConfig,
}

/// Whether `name` may be a model name in URLs and folders.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn versions(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
        .filter(|&v| v > 0)
        .collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v
}

fn queue_metrics(metrics: &Metrics, name: &str, version: &str, graph: &str) -> QueueMetrics {
    let l = [name, version, graph];
    QueueMetrics {
        queue_rows: metrics.queue_rows.with_label_values(&l),
        queue_duration: metrics.queue_duration.with_label_values(&l),
        inference_duration: metrics.inference_duration.with_label_values(&l),
        batch_rows: metrics.batch_rows.with_label_values(&l),
        batch_requests: metrics.batch_requests.with_label_values(&l),
        cancelled: metrics.rejections.with_label_values(&[name, "cancelled"]),
        expired: metrics.rejections.with_label_values(&[name, "timeout"]),
    }
}

/// Loads one version: check the package, build and warm both sessions (on a blocking
/// thread), then start their engines and queues.
async fn load_version(
    name: &str,
    version: u64,
    dir: PathBuf,
    options: &LoadOptions,
    metrics: &Metrics,
) -> Result<Model, String> {
    let started = Instant::now();
    let opts = options.clone();
    let (package, engines) =
        tokio::task::spawn_blocking(move || -> Result<(Package, Vec<Engine>), String> {
            let package = Package::open(&dir).map_err(|e| e.to_string())?;
            let m = &package.manifest;
            let mut engines = Vec::new();
            for (graph, input, outputs) in [
                (&m.graphs.encode, "x", &["z", "log_prob"][..]),
                (&m.graphs.decode, "z", &["x"][..]),
            ] {
                let path = package.path(&graph.file);
                let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let mut engine =
                    Engine::load(&bytes, &opts.session, input, outputs, &m.event_shape)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                // Sequential graphs cost one pass per dimension: warm them with small batches.
                let warm_rows = if graph.cost == Cost::Sequential {
                    8
                } else {
                    opts.batch.max_batch_rows
                };
                engine
                    .warm_up(warm_rows)
                    .map_err(|e| format!("{}: warm-up failed: {e}", path.display()))?;
                engines.push(engine);
            }
            Ok((package, engines))
        })
        .await
        .map_err(|e| format!("loading panicked: {e}"))??;

    let v = version.to_string();
    let event_size: usize = package.manifest.event_shape.iter().product();
    let mut engines = engines.into_iter();
    let (enc, dec) = (
        engines.next().expect("two engines"),
        engines.next().expect("two engines"),
    );
    for (graph, e) in [("encode", &enc), ("decode", &dec)] {
        for why in &e.skipped {
            tracing::warn!(
                model = name,
                version,
                graph,
                "execution provider passed over: {why}"
            );
        }
        tracing::info!(
            model = name,
            version,
            graph,
            provider = e.provider.as_str(),
            "session ready"
        );
    }
    let providers = [enc.provider, dec.provider];
    let start = |e: Engine, graph: &str| {
        e.start(&format!("{name}-{version}-{graph}"))
            .map_err(|e| format!("cannot start an engine thread: {e}"))
    };
    let enc_tx = start(enc, "encode")?;
    let dec_tx = start(dec, "decode")?;
    metrics.register_model(name, &v);
    let encode = Batcher::start(
        enc_tx,
        options.batch,
        event_size,
        vec![event_size, 1],
        queue_metrics(metrics, name, &v, "encode"),
    );
    let decode = Batcher::start(
        dec_tx,
        options.batch,
        event_size,
        vec![event_size],
        queue_metrics(metrics, name, &v, "decode"),
    );
    let load_seconds = started.elapsed().as_secs_f64();
    metrics
        .model_load_duration
        .with_label_values(&[name, &v])
        .set(load_seconds);
    let provider = if providers[0] == providers[1] {
        providers[0].as_str().to_string()
    } else {
        format!("{}+{}", providers[0].as_str(), providers[1].as_str())
    };
    metrics
        .model_info
        .with_label_values(&[name, &v, &package.manifest.family, &provider])
        .set(1);
    let series = ENDPOINTS
        .iter()
        .map(|e| metrics.endpoint_series(name, &v, e))
        .collect();
    let log_prob = metrics.log_prob.with_label_values(&[name, &v]);
    Ok(Model {
        series,
        log_prob,
        name: name.to_string(),
        version,
        package,
        event_size,
        encode,
        decode,
        providers,
        load_seconds,
    })
}

/// Scans `dir` and loads every model it can.
pub async fn load(
    dir: &Path,
    options: &LoadOptions,
    metrics: &Metrics,
) -> Result<Repository, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("model repository {}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    let mut repo = Repository::default();
    for name in names {
        let mut fail = |version: Option<u64>, reason: String| {
            tracing::error!(model = %name, version, "package refused: {reason}");
            metrics.model_load_failures.inc();
            repo.failures.push(LoadFailure {
                model: name.clone(),
                version,
                reason,
            });
        };
        if !valid_name(&name) {
            fail(
                None,
                "the folder name is not a valid model name (letters, digits, '-', '_', '.')".into(),
            );
            continue;
        }
        let vs = versions(&dir.join(&name));
        if vs.is_empty() {
            fail(
                None,
                format!(
                    "no version folders: expected {}/{name}/1/flow.json",
                    dir.display()
                ),
            );
            continue;
        }
        let mut loaded = None;
        for v in vs {
            match load_version(
                &name,
                v,
                dir.join(&name).join(v.to_string()),
                options,
                metrics,
            )
            .await
            {
                Ok(m) => {
                    loaded = Some(m);
                    break;
                }
                Err(reason) => fail(Some(v), reason),
            }
        }
        if let Some(m) = loaded {
            tracing::info!(model = %m.name, version = m.version, family = %m.package.manifest.family, seconds = m.load_seconds, "model ready");
            repo.models.insert(name.clone(), Arc::new(m));
        }
    }
    Ok(repo)
}
