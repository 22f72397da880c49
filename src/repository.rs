//! The model repository: `<dir>/<model>/<version>/flow.json`. Each model's highest version
//! that passes flowpack's checks, loads into ONNX Runtime and warms up is served; every
//! package refused on the way is reported with its reason and stops no other model. Models
//! load concurrently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flowpack::runtime::{GraphSession, Placement, SessionOptions};
use flowpack::{Cost, Direction, Package};
use serde::Serialize;

use crate::batcher::{BatchConfig, Batcher};
use crate::engine::{warm_up, Engine};
use crate::metrics::{Metrics, ModelMetrics};

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
    /// Context values per example of a conditional model (0: unconditional). Its queues
    /// carry each row's context after its values.
    pub context_width: usize,
    placements: [Placement; 2],
    /// Per graph, the providers passed over before its placement, and why (empty unless it
    /// fell back).
    passed_over: [Vec<String>; 2],
    /// Its metric series.
    pub metrics: ModelMetrics,
    queues: [Batcher; 2],
    engines: Mutex<Vec<JoinHandle<()>>>,
}

impl Model {
    /// The queue of one graph (`/log_prob` and `/encode` use encode, `/sample` and
    /// `/decode` decode).
    pub fn queue(&self, graph: Direction) -> &Batcher {
        &self.queues[graph.index()]
    }

    /// Where one graph's session runs.
    pub fn placement(&self, graph: Direction) -> &Placement {
        &self.placements[graph.index()]
    }

    /// The providers one graph passed over before its placement, and why.
    pub fn passed_over(&self, graph: Direction) -> &[String] {
        &self.passed_over[graph.index()]
    }

    /// Closes both queues (what still waits is answered 503) and hands over the engine
    /// threads, which end once their last batch is done.
    fn close(&self) -> Vec<JoinHandle<()>> {
        for g in Direction::BOTH {
            self.queue(g).close();
        }
        std::mem::take(&mut *self.engines.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Takes a model that is no longer published out of service once no request holds it any
/// more (or after `limit`): requests that already have it finish on it; new ones cannot
/// reach it.
pub fn retire(model: Arc<Model>, limit: Duration) {
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + limit;
        while Arc::strong_count(&model) > 1 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (name, version) = (model.name.clone(), model.version);
        model.metrics.unloaded();
        let threads = model.close();
        let _ = tokio::task::spawn_blocking(move || {
            threads.into_iter().for_each(|t| {
                let _ = t.join();
            })
        })
        .await;
        tracing::info!(model = %name, version, "retired");
    });
}

/// The served models: none until the first load finishes, then a snapshot replaced whole
/// whenever a model is loaded, swapped or unloaded. A request works on the snapshot it got.
#[derive(Default)]
pub struct Registry {
    current: RwLock<Option<Arc<Repository>>>,
}

impl Registry {
    /// The current snapshot (none while the first load runs).
    pub fn get(&self) -> Option<Arc<Repository>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes `repo` as the current snapshot.
    pub fn set(&self, repo: Repository) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(repo));
    }

    /// Publishes a snapshot made from the current one by `change`.
    pub fn update<T>(&self, change: impl FnOnce(&mut Repository) -> T) -> T {
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        let mut next = guard.as_deref().cloned().unwrap_or_default();
        let out = change(&mut next);
        *guard = Some(Arc::new(next));
        out
    }
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
#[derive(Default, Clone)]
pub struct Repository {
    /// The newest served version of each model, by name: what a request that names no
    /// version gets.
    pub models: BTreeMap<String, Arc<Model>>,
    /// Every served version of each model (the version policy may keep several).
    pub versions: BTreeMap<String, BTreeMap<u64, Arc<Model>>>,
    /// Refused packages.
    pub failures: Vec<LoadFailure>,
}

impl Repository {
    /// Serves `model` beside the model's other versions; returns the one it replaces (the
    /// same name and version), if any.
    pub fn publish(&mut self, model: Arc<Model>) -> Option<Arc<Model>> {
        let name = model.name.clone();
        let old = self
            .versions
            .entry(name.clone())
            .or_default()
            .insert(model.version, model);
        self.relink(&name);
        old
    }

    /// Stops serving one version; returns it.
    pub fn withdraw(&mut self, name: &str, version: u64) -> Option<Arc<Model>> {
        let old = self.versions.get_mut(name)?.remove(&version);
        self.relink(name);
        old
    }

    /// Version `version` of `name`, or its newest served version.
    pub fn get(&self, name: &str, version: Option<u64>) -> Option<&Arc<Model>> {
        match version {
            None => self.models.get(name),
            Some(v) => self.versions.get(name)?.get(&v),
        }
    }

    /// The served versions of `name`, oldest first.
    pub fn served_versions(&self, name: &str) -> Vec<u64> {
        self.versions
            .get(name)
            .map(|v| v.keys().copied().collect())
            .unwrap_or_default()
    }

    fn relink(&mut self, name: &str) {
        match self.versions.get(name).and_then(|v| v.values().next_back()) {
            Some(newest) => {
                self.models.insert(name.to_string(), newest.clone());
            }
            None => {
                self.versions.remove(name);
                self.models.remove(name);
            }
        }
    }
}

/// Which versions of a model are served: `latest:N` (the N newest that load; default
/// `latest:1`), `specific:1,3` (those, where they load) or `all`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The N newest versions that load.
    Latest(usize),
    /// These versions.
    Specific(Vec<u64>),
    /// Every version.
    All,
}

impl std::str::FromStr for VersionPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected latest:N (N ≥ 1), specific:V[,V...] or all");
        match s.trim().split_once(':') {
            None if s.trim() == "all" => Ok(VersionPolicy::All),
            Some(("latest", n)) => match n.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(VersionPolicy::Latest(n)),
                _ => Err(bad()),
            },
            Some(("specific", list)) => {
                let v: Vec<u64> = list
                    .split(',')
                    .map(|x| x.trim().parse::<u64>().ok().filter(|&v| v > 0))
                    .collect::<Option<_>>()
                    .ok_or_else(bad)?;
                Ok(VersionPolicy::Specific(v))
            }
            _ => Err(bad()),
        }
    }
}

impl VersionPolicy {
    /// The versions (of those on disk, newest first) worth trying, in order, and how many
    /// of them to serve at most.
    pub fn candidates(&self, on_disk: &[u64]) -> (Vec<u64>, usize) {
        match self {
            VersionPolicy::Latest(n) => (on_disk.to_vec(), *n),
            VersionPolicy::Specific(list) => {
                let v: Vec<u64> = on_disk
                    .iter()
                    .copied()
                    .filter(|v| list.contains(v))
                    .collect();
                let n = v.len();
                (v, n)
            }
            VersionPolicy::All => (on_disk.to_vec(), on_disk.len()),
        }
    }
}

/// How models are loaded.
#[derive(Clone)]
pub struct LoadOptions {
    /// ONNX Runtime session settings.
    pub session: SessionOptions,
    /// Queue settings.
    pub batch: BatchConfig,
    /// Which versions of each model to serve.
    pub policy: VersionPolicy,
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

/// The version folders of a model folder, highest first.
pub fn versions(dir: &Path) -> Vec<u64> {
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

/// A package with both graphs in warmed sessions.
struct Opened {
    package: Package,
    sessions: [GraphSession; 2],
}

/// Checks the package and builds and warms both sessions (blocking work).
fn open(dir: &Path, options: &LoadOptions) -> Result<Opened, String> {
    let package = Package::open(dir).map_err(|e| e.to_string())?;
    let session = |d: Direction| -> Result<GraphSession, String> {
        let graph = package.manifest.graphs.get(d);
        let path = package.path(&graph.file);
        let mut s = GraphSession::open(&package, d, &options.session)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // Sequential graphs cost one pass per dimension: warm them with small batches.
        let rows = match graph.cost {
            Cost::Sequential => 8,
            Cost::OnePass => options.batch.max_batch_rows,
        };
        warm_up(&mut s, rows).map_err(|e| format!("{}: warm-up failed: {e}", path.display()))?;
        Ok(s)
    };
    let sessions = [session(Direction::Encode)?, session(Direction::Decode)?];
    Ok(Opened { package, sessions })
}

/// Loads one version: open it on a blocking thread, then start its engines and queues.
pub async fn load_version(
    name: &str,
    version: u64,
    dir: PathBuf,
    options: &LoadOptions,
    metrics: &Metrics,
) -> Result<Model, String> {
    let started = Instant::now();
    let opts = options.clone();
    let Opened { package, sessions } = tokio::task::spawn_blocking(move || open(&dir, &opts))
        .await
        .map_err(|e| format!("loading panicked: {e}"))??;
    let placements = sessions.each_ref().map(|s| s.placement.clone());
    let passed_over = sessions.each_ref().map(|s| s.passed_over.clone());
    for (graph, s) in Direction::BOTH.iter().zip(&sessions) {
        for why in &s.passed_over {
            tracing::warn!(
                model = name,
                version,
                graph = graph.as_str(),
                provider = s.placement.label(),
                "fell back: {why}"
            );
        }
        tracing::info!(
            model = name,
            version,
            graph = graph.as_str(),
            provider = s.placement.label(),
            "session ready"
        );
    }
    let widths = sessions.each_ref().map(|s| s.output_widths().to_vec());
    let mut engines = Vec::new();
    for (graph, session) in Direction::BOTH.into_iter().zip(sessions) {
        let engine = Engine::start(session, &format!("{name}-{version}-{}", graph.as_str()))
            .map_err(|e| format!("cannot start an engine thread: {e}"))?;
        engines.push(engine);
    }
    let event_size = package.event_size();
    let context_width = package.manifest.context.as_ref().map_or(0, |c| c.width());
    let metrics = metrics.for_model(
        name,
        version,
        &package.manifest.family,
        placements.each_ref(),
        &options.session.providers,
        started.elapsed(),
    );
    let mut threads = Vec::new();
    let mut queues = Vec::new();
    for ((graph, engine), widths) in Direction::BOTH.into_iter().zip(engines).zip(&widths) {
        queues.push(Batcher::start(
            engine.feed,
            options.batch,
            event_size + context_width,
            widths,
            metrics.queue(graph),
        ));
        threads.push(engine.thread);
    }
    let queues: [Batcher; 2] = queues.try_into().unwrap_or_else(|_| unreachable!());
    Ok(Model {
        name: name.to_string(),
        version,
        package,
        event_size,
        context_width,
        placements,
        passed_over,
        metrics,
        queues,
        engines: Mutex::new(threads),
    })
}

/// Loads the versions of model `name` its version policy asks for (the newest that work);
/// the refusals on the way.
async fn load_model(
    dir: &Path,
    name: String,
    options: &LoadOptions,
    metrics: &Metrics,
) -> (Vec<Model>, Vec<LoadFailure>) {
    let mut failures = Vec::new();
    let mut fail = |version: Option<u64>, reason: String| {
        tracing::error!(model = %name, version, "package refused: {reason}");
        metrics.model_load_failures.inc();
        failures.push(LoadFailure {
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
        return (Vec::new(), failures);
    }
    let vs = versions(&dir.join(&name));
    if vs.is_empty() {
        let expected = format!("{}/{name}/1/flow.json", dir.display());
        fail(None, format!("no version folders: expected {expected}"));
        return (Vec::new(), failures);
    }
    let (candidates, wanted) = options.policy.candidates(&vs);
    let mut loaded = Vec::new();
    for v in candidates {
        if loaded.len() == wanted {
            break;
        }
        let folder = dir.join(&name).join(v.to_string());
        match load_version(&name, v, folder, options, metrics).await {
            Ok(m) => loaded.push(m),
            Err(reason) => fail(Some(v), reason),
        }
    }
    (loaded, failures)
}

/// Scans `dir` and loads every model it can, the models concurrently.
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
    let loads = names
        .into_iter()
        .map(|name| load_model(dir, name, options, metrics));
    let mut repo = Repository::default();
    for (models, failures) in futures_util::future::join_all(loads).await {
        repo.failures.extend(failures);
        for m in models {
            tracing::info!(model = %m.name, version = m.version, family = %m.package.manifest.family, "model ready");
            repo.publish(Arc::new(m));
        }
    }
    Ok(repo)
}

impl Repository {
    /// Closes every queue (what still waits is answered 503) and joins the engine threads,
    /// waiting at most `limit` for the batches they are running.
    pub async fn shutdown(&self, limit: Duration) {
        let mut threads = Vec::new();
        for m in self.versions.values().flat_map(|v| v.values()) {
            threads.append(&mut m.close());
        }
        let n = threads.len();
        let join = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        match tokio::time::timeout(limit, join).await {
            Ok(_) => tracing::info!(engines = n, "engine threads stopped"),
            Err(_) => tracing::warn!(engines = n, "engine threads still running at exit"),
        }
    }
}
