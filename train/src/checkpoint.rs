//! Checkpoints: the resumable state (`state.json`) beside one safetensors file holding the
//! parameters, Adam's moments and the best parameters so far (prefixed `best.`), written
//! atomically. One loader serves resuming and reading a run's best state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::optim::Adam;
use crate::params::Params;

/// Where a run has got to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Steps taken.
    pub step: u64,
    /// The tensor file of this checkpoint (in the checkpoint folder).
    pub tensors: String,
    /// Adam's update count.
    pub adam_t: u64,
    /// The step whose parameters are the best so far.
    pub best_step: u64,
    /// The validation loss at that step (NLL, or the reverse KL when distilling).
    #[serde(alias = "best_val_nll")]
    pub best_val_loss: f64,
    /// Validations since the best one (early stopping).
    pub evals_since_best: u64,
    /// The learning-rate multiplier (halved by each skipped step).
    pub lr_scale: f64,
    /// Steps skipped for a non-finite loss or gradient.
    pub nan_skips: u64,
    /// Whether early stopping ended the run.
    pub finished: bool,
    /// Seconds spent in optimiser steps.
    pub train_seconds: f64,
    /// The configuration the run was started with (resuming checks it).
    pub config: Config,
}

impl State {
    /// The state of a run that has not started.
    pub fn fresh(config: &Config) -> State {
        State {
            step: 0,
            tensors: String::new(),
            adam_t: 0,
            best_step: 0,
            best_val_loss: f64::INFINITY,
            evals_since_best: 0,
            lr_scale: 1.0,
            nan_skips: 0,
            finished: false,
            train_seconds: 0.0,
            config: config.clone(),
        }
    }
}

/// A checkpoint read back: its state and every tensor it holds.
pub struct Checkpoint {
    /// Where the run had got to.
    pub state: State,
    /// Parameters, `adam.*` moments and `best.*` parameters.
    pub tensors: HashMap<String, Tensor>,
}

fn dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Whether `out` holds a checkpoint.
pub fn exists(out: &Path) -> bool {
    dir(out).join("state.json").exists()
}

impl Checkpoint {
    /// The checkpoint in run folder `out`, if there is one.
    pub fn load(out: &Path) -> Result<Option<Checkpoint>> {
        let path = dir(out).join("state.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let state: State = serde_json::from_str(&text)
            .with_context(|| format!("{}: unreadable checkpoint state", path.display()))?;
        let tensors = candle_core::safetensors::load(dir(out).join(&state.tensors), &Device::Cpu)
            .with_context(|| format!("cannot read checkpoint {}", state.tensors))?;
        Ok(Some(Checkpoint { state, tensors }))
    }

    /// The best parameters the run kept, by parameter name.
    pub fn best(&self) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("best.").map(|k| (k.to_string(), v.clone())))
            .collect()
    }

    /// Writes a checkpoint of `params`, `adam` and `best` at `state` into `out`, then
    /// removes older tensor files.
    pub fn save(
        out: &Path,
        params: &Params,
        adam: &Adam,
        best: &HashMap<String, Tensor>,
        state: &State,
    ) -> Result<()> {
        let dir = dir(out);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut extra = adam.state();
        for (k, v) in best {
            extra.insert(format!("best.{k}"), v.clone());
        }
        let tensors = dir.join(&state.tensors);
        let tmp = tensors.with_extension("tmp");
        params.save(&tmp, extra)?;
        std::fs::rename(&tmp, &tensors)?;
        write_atomic(
            &dir.join("state.json"),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )?;
        for entry in std::fs::read_dir(&dir)? {
            let p = entry?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with("step-") && name != state.tensors {
                let _ = std::fs::remove_file(&p);
            }
        }
        Ok(())
    }
}

/// The best parameters of the run in `out`.
pub fn best_tensors(out: &Path) -> Result<HashMap<String, Tensor>> {
    let c =
        Checkpoint::load(out)?.with_context(|| format!("no checkpoint in {}", out.display()))?;
    Ok(c.best())
}
