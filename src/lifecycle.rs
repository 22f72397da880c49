//! Models that change without a restart. With `--model-control poll` the repository is
//! scanned every `--poll-interval-s`: a model's newest version folder, once it differs from
//! the served one, is checked, loaded and warmed beside it, then published, and the old
//! version is retired when the requests that hold it finish — no request fails during the
//! swap. A version that is refused is reported (`GET /v1/models`, the load-failure metric)
//! while the old one keeps serving, and retried only when its files change. A model folder
//! that disappears is unloaded. With `--model-control explicit` nothing is watched: the
//! Open Inference Protocol's repository routes load and unload models by name.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::api::{ApiError, AppState};
use crate::repository::{load_version, retire, valid_name, versions, LoadFailure, LoadOptions};

/// How the set of served models may change while the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelControl {
    /// Models load at start only.
    None,
    /// The repository is scanned every `--poll-interval-s`.
    Poll,
    /// `POST /v2/repository/models/{name}/load` and `/unload` change them.
    Explicit,
}

/// When a version folder's files last changed: the newest modification time in it, and how
/// many entries it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint(Option<SystemTime>, usize);

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut newest = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        n += 1;
        let t = e.metadata().and_then(|m| m.modified()).ok();
        newest = newest.max(t);
    }
    Fingerprint(newest, n)
}

/// Versions refused, with the files they were refused for.
#[derive(Default)]
pub struct Refused(HashMap<(String, u64), Fingerprint>);

/// Scans the repository every `every` until the server drains, bringing the served models
/// in line with it.
pub async fn poll(state: Arc<AppState>, options: LoadOptions, every: Duration) {
    let mut refused = Refused::default();
    loop {
        tokio::time::sleep(every).await;
        if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if state.repo.get().is_some() {
            reconcile(&state, &options, &mut refused).await;
        }
    }
}

/// The model folders of the repository.
fn model_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| valid_name(n))
        .collect();
    names.sort();
    names
}

/// One scan: load what is new, swap what changed, unload what is gone.
pub async fn reconcile(state: &Arc<AppState>, options: &LoadOptions, refused: &mut Refused) {
    let dir = state.config.models.clone();
    let names = model_names(&dir);
    let Some(current) = state.repo.get() else {
        return;
    };
    for name in &names {
        let Some(&newest) = versions(&dir.join(name)).first() else {
            continue;
        };
        if current.models.get(name).map(|m| m.version) == Some(newest) {
            continue;
        }
        let folder = dir.join(name).join(newest.to_string());
        let print = fingerprint(&folder);
        if refused.0.get(&(name.clone(), newest)) == Some(&print) {
            continue;
        }
        match swap_in(state, options, name, newest).await {
            Ok(()) => {
                refused.0.remove(&(name.clone(), newest));
            }
            Err(_) => {
                refused.0.insert((name.clone(), newest), print);
            }
        }
    }
    for name in current.models.keys() {
        if !names.contains(name) || versions(&dir.join(name)).is_empty() {
            let _ = unload(state, name);
        }
    }
}

/// Loads version `version` of `name` beside what is served and publishes it; on failure the
/// served version (if any) stays, and the refusal is reported.
async fn swap_in(
    state: &Arc<AppState>,
    options: &LoadOptions,
    name: &str,
    version: u64,
) -> Result<(), String> {
    let folder = state.config.models.join(name).join(version.to_string());
    match load_version(name, version, folder, options, &state.metrics).await {
        Ok(model) => {
            let old = state.repo.update(|r| {
                r.failures.retain(|f| f.model != name);
                r.models.insert(name.to_string(), Arc::new(model))
            });
            match &old {
                Some(o) => tracing::info!(
                    model = name,
                    version,
                    from = o.version,
                    "new version serving; the old one drains"
                ),
                None => tracing::info!(model = name, version, "model loaded"),
            }
            if let Some(o) = old {
                retire(o, Duration::from_millis(state.config.shutdown_timeout_ms));
            }
            Ok(())
        }
        Err(reason) => {
            let serving = state
                .repo
                .get()
                .and_then(|r| r.models.get(name).map(|m| m.version));
            tracing::error!(model = name, version, serving, "package refused: {reason}");
            state.metrics.model_load_failures.inc();
            state.repo.update(|r| {
                r.failures
                    .retain(|f| !(f.model == name && f.version == Some(version)));
                r.failures.push(LoadFailure {
                    model: name.to_string(),
                    version: Some(version),
                    reason: reason.clone(),
                });
            });
            Err(reason)
        }
    }
}

/// Loads (or reloads) model `name` from its newest version folder: explicit model control.
pub async fn load(
    state: &Arc<AppState>,
    options: &LoadOptions,
    name: &str,
) -> Result<u64, ApiError> {
    if !valid_name(name) {
        return Err(ApiError::Invalid(format!(
            "{name:?} is not a valid model name"
        )));
    }
    let dir = state.config.models.join(name);
    let Some(&newest) = versions(&dir).first() else {
        return Err(ApiError::UnknownModel(format!(
            "{name} (no version folders in {})",
            dir.display()
        )));
    };
    swap_in(state, options, name, newest)
        .await
        .map_err(|reason| {
            ApiError::Invalid(format!("{name} version {newest} was refused: {reason}"))
        })?;
    Ok(newest)
}

/// Stops serving model `name`; requests that already have it finish.
pub fn unload(state: &Arc<AppState>, name: &str) -> Result<(), ApiError> {
    let old = state.repo.update(|r| r.models.remove(name));
    let old = old.ok_or_else(|| ApiError::UnknownModel(name.to_string()))?;
    tracing::info!(model = name, version = old.version, "model unloaded");
    retire(old, Duration::from_millis(state.config.shutdown_timeout_ms));
    Ok(())
}
