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
        converge(state, options, name, Some(refused)).await;
    }
    for name in current.versions.keys() {
        if !names.contains(name) {
            let _ = unload(state, name);
        }
    }
}

/// Brings the served versions of `name` in line with its folder and the version policy:
/// the newest versions that load (or the pinned ones) are served, each loaded beside what
/// is served before it takes traffic; the others are retired. Versions refused before are
/// skipped while their files stay the same (when `refused` is given). Returns the versions
/// served after it.
async fn converge(
    state: &Arc<AppState>,
    options: &LoadOptions,
    name: &str,
    mut refused: Option<&mut Refused>,
) -> Vec<u64> {
    let dir = state.config.models.join(name);
    let on_disk = versions(&dir);
    let (candidates, wanted) = options.policy.candidates(&on_disk);
    let served = state
        .repo
        .get()
        .map(|r| r.served_versions(name))
        .unwrap_or_default();
    let mut keep = Vec::new();
    for v in candidates {
        if keep.len() == wanted {
            break;
        }
        if served.contains(&v) {
            keep.push(v);
            continue;
        }
        let print = fingerprint(&dir.join(v.to_string()));
        let key = (name.to_string(), v);
        if let Some(r) = refused.as_deref() {
            if r.0.get(&key) == Some(&print) {
                continue;
            }
        }
        match swap_in(state, options, name, v).await {
            Ok(()) => {
                keep.push(v);
                if let Some(r) = refused.as_deref_mut() {
                    r.0.remove(&key);
                }
            }
            Err(_) => {
                if let Some(r) = refused.as_deref_mut() {
                    r.0.insert(key, print);
                }
            }
        }
    }
    for v in served {
        if !keep.contains(&v) {
            if let Some(old) = state.repo.update(|r| r.withdraw(name, v)) {
                tracing::info!(
                    model = name,
                    version = v,
                    "version no longer served; it drains"
                );
                retire(old, Duration::from_millis(state.config.shutdown_timeout_ms));
            }
        }
    }
    keep.sort_unstable();
    keep
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
                r.failures
                    .retain(|f| !(f.model == name && f.version.is_none_or(|v| v <= version)));
                r.publish(Arc::new(model))
            });
            tracing::info!(model = name, version, "version loaded and serving");
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

/// Loads model `name` from its folder (explicit model control): the versions its policy
/// asks for, each beside what is served, and retires the others; returns the versions
/// served after it. When the newest version is refused, what was served keeps serving and
/// the call fails with the reason.
pub async fn load(
    state: &Arc<AppState>,
    options: &LoadOptions,
    name: &str,
) -> Result<Vec<u64>, ApiError> {
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
    let served = converge(state, options, name, None).await;
    let newest_served = served.last().copied().unwrap_or(0);
    let refusal = state.repo.get().and_then(|r| {
        r.failures
            .iter()
            .filter(|f| f.model == name)
            .find(|f| f.version.is_some_and(|v| v > newest_served && v <= newest))
            .cloned()
    });
    match refusal {
        Some(f) => Err(ApiError::Invalid(format!(
            "{name} version {} was refused: {}",
            f.version.unwrap_or(newest),
            f.reason
        ))),
        None if served.is_empty() => Err(ApiError::Invalid(format!(
            "{name}: no version could be loaded"
        ))),
        None => Ok(served),
    }
}

/// Stops serving every version of model `name`; requests that already have one finish.
pub fn unload(state: &Arc<AppState>, name: &str) -> Result<(), ApiError> {
    let old = state.repo.update(|r| {
        let versions = r.served_versions(name);
        versions
            .into_iter()
            .filter_map(|v| r.withdraw(name, v))
            .collect::<Vec<_>>()
    });
    if old.is_empty() {
        return Err(ApiError::UnknownModel(name.to_string()));
    }
    for m in old {
        tracing::info!(model = name, version = m.version, "model unloaded");
        retire(m, Duration::from_millis(state.config.shutdown_timeout_ms));
    }
    Ok(())
}
