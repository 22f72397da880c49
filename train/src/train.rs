//! The training loop: minibatch NLL with Adam, warm-up + cosine schedule, gradient
//! clipping, a guard against non-finite steps, early stopping on validation NLL with
//! best-state restore, and checkpoints from which a killed run resumes exactly.
//!
//! Every random choice is a pure function of (seed, step): batch `t` is rows
//! `t·B..(t+1)·B` of a per-epoch seeded shuffle and its dequantisation noise comes from
//! stream `t`, so a resumed run takes the same steps as one that was never stopped.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use flowpack::sampling::latent_noise;

use crate::config::Config;
use crate::data::{dequantize, Splits, Table};
use crate::flows::Flow;
use crate::optim::{learning_rate, Adam};
use crate::params::Params;

/// Consecutive skipped steps after which training gives up.
const MAX_CONSECUTIVE_SKIPS: u64 = 20;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A training step's minibatch NLL (nats per example).
    Train {
        /// Steps done after this one.
        step: u64,
        /// Minibatch NLL.
        nll: f64,
        /// Learning rate used.
        lr: f64,
        /// Gradient norm before clipping.
        grad_norm: f64,
    },
    /// A validation pass.
    Val {
        /// Steps done.
        step: u64,
        /// Mean validation NLL, or the reverse KL (nats) when distilling.
        nll: f64,
        /// Whether it is the best so far.
        best: bool,
    },
    /// A step skipped because the loss or gradient was not finite.
    Skip {
        /// The step.
        step: u64,
        /// Why.
        reason: String,
        /// The learning-rate multiplier from now on.
        lr_scale: f64,
    },
}

impl Record {
    fn step(&self) -> u64 {
        match self {
            Record::Train { step, .. } | Record::Val { step, .. } | Record::Skip { step, .. } => {
                *step
            }
        }
    }
}

/// The resumable state beside the tensors of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: u64,
    tensors: String,
    adam_t: u64,
    best_step: u64,
    best_val_nll: f64,
    evals_since_best: u64,
    lr_scale: f64,
    nan_skips: u64,
    finished: bool,
    train_seconds: f64,
    config: Config,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Steps taken in total (across resumptions).
    pub steps: u64,
    /// The step whose parameters were kept.
    pub best_step: u64,
    /// Validation NLL at that step.
    pub best_val_nll: f64,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Steps skipped for non-finite loss or gradient.
    pub nan_skips: u64,
    /// Seconds spent in optimiser steps (not validation or checkpoints).
    pub train_seconds: f64,
    /// Median wall time of one optimiser step in this invocation (robust to a noisy machine).
    pub median_step_seconds: f64,
    /// Whether this invocation resumed from a checkpoint.
    pub resumed_from: Option<u64>,
    /// Every metrics record of the run, in order.
    pub history: Vec<Record>,
}

/// A training run's inputs.
pub struct Run<'a> {
    /// The flow to train (its parameters live in `params`).
    pub flow: &'a Flow,
    /// The parameter store.
    pub params: &'a Params,
    /// The whole configuration (recorded in checkpoints; resuming checks it).
    pub config: &'a Config,
    /// The data.
    pub data: &'a Splits,
    /// Dequantisation step per column (0: none).
    pub dequantized: &'a [f32],
    /// The run's folder.
    pub out: &'a Path,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Distil this trained flow instead of fitting the data: the loss is the reverse
    /// KL(flow ‖ teacher) on the flow's own samples, validated on fixed base draws.
    pub teacher: Option<&'a Flow>,
}

/// Rows of a table as a `[N, D]` tensor.
pub fn to_tensor(values: &[f32], dim: usize) -> candle_core::Result<Tensor> {
    Tensor::from_slice(values, (values.len() / dim, dim), &Device::Cpu)
}

/// Elements per evaluation chunk: image flows hold `hidden` channels per pixel in every
/// coupling network, so whole test sets at once would take gigabytes.
const EVAL_CHUNK_ELEMENTS: usize = 1 << 18;

/// log p of every row of `values` (row-major, `flow.dim` per row), in chunks, averaged over
/// `ensemble` mask sets.
pub fn log_prob_rows(flow: &Flow, values: &[f32], ensemble: usize) -> Result<Vec<f32>> {
    let rows = (EVAL_CHUNK_ELEMENTS / flow.dim).clamp(1, 4096);
    let mut out = Vec::with_capacity(values.len() / flow.dim);
    for chunk in values.chunks(rows * flow.dim) {
        let lp = flow.ensemble_log_prob(&to_tensor(chunk, flow.dim)?, ensemble)?;
        out.extend(lp.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Mean NLL (nats per example) of `table` under `flow` in evaluation mode, averaging
/// densities over mask sets `0..ensemble` (1: the exported flow alone); integer columns get
/// the fixed dequantisation noise of `noise_seed` when `dequantized` marks them.
pub fn mean_nll(
    flow: &Flow,
    table: &Table,
    dequantized: &[f32],
    noise_seed: u64,
    ensemble: usize,
) -> Result<f64> {
    flow.set_training(false);
    let mut values = table.values.clone();
    dequantize(
        &mut values,
        table.dim,
        dequantized,
        &mut ChaCha8Rng::seed_from_u64(noise_seed),
    );
    let lp = log_prob_rows(flow, &values, ensemble)?;
    let total: f64 = lp.iter().map(|&v| v as f64).sum();
    Ok(-total / table.rows() as f64)
}

/// Reverse KL(flow ‖ teacher) in nats, estimated on `n` fixed base draws of `seed`.
pub fn reverse_kl(flow: &Flow, teacher: &Flow, n: usize, seed: u64) -> Result<f64> {
    flow.set_training(false);
    let dim = flow.dim;
    let z = latent_noise(n, dim, 1.0, seed);
    let mut total = 0f64;
    for chunk in z.chunks(4096 * dim) {
        let rows = chunk.len() / dim;
        let kl = flow.reverse_kl(teacher, &to_tensor(chunk, dim)?)?;
        total += kl.to_scalar::<f32>()? as f64 * rows as f64;
    }
    Ok(total / n as f64)
}

struct Batches {
    n: usize,
    size: usize,
    seed: u64,
    epoch: Option<(u64, Vec<usize>)>,
}

impl Batches {
    fn rows(&mut self, step: u64) -> Vec<usize> {
        (0..self.size as u64)
            .map(|j| {
                let global = step * self.size as u64 + j;
                let (epoch, i) = (global / self.n as u64, (global % self.n as u64) as usize);
                if self.epoch.as_ref().map(|e| e.0) != Some(epoch) {
                    let mut perm: Vec<usize> = (0..self.n).collect();
                    perm.shuffle(&mut ChaCha8Rng::seed_from_u64(
                        self.seed ^ epoch.wrapping_mul(0x2545_f491_4f6c_dd1d),
                    ));
                    self.epoch = Some((epoch, perm));
                }
                self.epoch.as_ref().expect("set above").1[i]
            })
            .collect()
    }
}

fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn save_checkpoint(
    run: &Run,
    adam: &Adam,
    best: &HashMap<String, Tensor>,
    state: &State,
) -> Result<()> {
    let dir = checkpoint_dir(run.out);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut extra = adam.state();
    for (k, v) in best {
        extra.insert(format!("best.{k}"), v.clone());
    }
    let tensors = dir.join(&state.tensors);
    let tmp = tensors.with_extension("tmp");
    run.params.save(&tmp, extra)?;
    std::fs::rename(&tmp, &tensors)?;
    write_atomic(
        &dir.join("state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    for entry in std::fs::read_dir(&dir)? {
        let p = entry?.path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.starts_with("step-") && name != state.tensors {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(())
}

/// The best parameters a run kept, from its latest checkpoint.
pub fn best_tensors(out: &Path) -> Result<HashMap<String, Tensor>> {
    let dir = checkpoint_dir(out);
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("no checkpoint in {}", out.display()))?;
    let state: State = serde_json::from_str(&text)
        .with_context(|| format!("{}: unreadable checkpoint state", state_path.display()))?;
    let tensors = candle_core::safetensors::load(dir.join(&state.tensors), &Device::Cpu)
        .with_context(|| format!("cannot read checkpoint {}", state.tensors))?;
    Ok(tensors
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("best.").map(|k| (k.to_string(), v)))
        .collect())
}

/// Whether `out` holds a checkpoint of a run that has not finished.
pub fn has_checkpoint(out: &Path) -> bool {
    checkpoint_dir(out).join("state.json").exists()
}

/// Reads `metrics.jsonl`, keeping only records up to `until` (a resumed run rewrites what
/// came after its checkpoint).
pub fn read_history(out: &Path, until: u64) -> Result<Vec<Record>> {
    let path = out.join("metrics.jsonl");
    let Ok(file) = File::open(&path) else {
        return Ok(Vec::new());
    };
    let mut records = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        if let Ok(r) = serde_json::from_str::<Record>(&line) {
            if r.step() <= until {
                records.push(r);
            }
        }
    }
    Ok(records)
}

/// Trains `run.flow`, resuming from `run.out/checkpoint` when one exists; returns with the
/// best parameters restored and the flow in evaluation mode.
pub fn train(run: &Run) -> Result<Outcome> {
    let cfg = &run.config.train;
    let dim = run.data.train.dim;
    std::fs::create_dir_all(run.out)
        .with_context(|| format!("cannot create {}", run.out.display()))?;
    let mut adam = Adam::new(run.params.trainable(), cfg.weight_decay)?;
    let mut best = run.params.snapshot();
    let mut state = State {
        step: 0,
        tensors: String::new(),
        adam_t: 0,
        best_step: 0,
        best_val_nll: f64::INFINITY,
        evals_since_best: 0,
        lr_scale: 1.0,
        nan_skips: 0,
        finished: false,
        train_seconds: 0.0,
        config: run.config.clone(),
    };
    let mut resumed_from = None;
    let state_path = checkpoint_dir(run.out).join("state.json");
    if state_path.exists() {
        let text = std::fs::read_to_string(&state_path)?;
        let saved: State = serde_json::from_str(&text)
            .with_context(|| format!("{}: unreadable checkpoint state", state_path.display()))?;
        if saved.config != *run.config {
            bail!(
                "{} holds a checkpoint of a different configuration; pass --fresh to start over or use another --out",
                run.out.display()
            );
        }
        let tensors = candle_core::safetensors::load(
            checkpoint_dir(run.out).join(&saved.tensors),
            &Device::Cpu,
        )
        .with_context(|| format!("cannot read checkpoint {}", saved.tensors))?;
        run.params.restore(&tensors)?;
        adam.load_state(&tensors, saved.adam_t)?;
        best = tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("best.").map(|k| (k.to_string(), v.clone())))
            .collect();
        resumed_from = Some(saved.step);
        state = saved;
    }
    // Keep the log consistent with the checkpoint: drop what a killed run wrote after it.
    let mut history = read_history(run.out, state.step)?;
    {
        let mut text = String::new();
        for r in &history {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        std::fs::write(run.out.join("metrics.jsonl"), text)?;
    }
    let mut log = OpenOptions::new()
        .append(true)
        .open(run.out.join("metrics.jsonl"))?;
    let mut emit = |r: Record, history: &mut Vec<Record>| -> Result<()> {
        writeln!(log, "{}", serde_json::to_string(&r)?)?;
        history.push(r);
        Ok(())
    };

    let bar = if run.progress {
        ProgressBar::new(cfg.steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {per_sec} {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(state.step);

    let mut batches = Batches {
        n: run.data.train.rows(),
        size: cfg.batch_size.min(run.data.train.rows()),
        seed: cfg.seed,
        epoch: None,
    };
    let val_seed = cfg.seed ^ 0x7a1;
    let mut consecutive_skips = 0;
    let mut last_nll = f64::NAN;
    let mut stopped_early = false;
    let mut step_times: Vec<f64> = Vec::new();
    while state.step < cfg.steps && !state.finished {
        let started = Instant::now();
        let step = state.step;
        run.flow.select_masks(run.config.model.mask_set(step))?;
        let loss = match run.teacher {
            None => {
                let rows = batches.rows(step);
                let mut values = run.data.train.select(&rows).values;
                let mut noise = ChaCha8Rng::seed_from_u64(cfg.seed);
                noise.set_stream(step + 1);
                dequantize(&mut values, dim, run.dequantized, &mut noise);
                run.flow.set_training(true);
                let x = to_tensor(&values, dim)?;
                run.flow.log_prob(&x)?.mean_all()?.neg()?
            }
            Some(teacher) => {
                // Batch norm stays a learned affine map: there are no data batches here.
                run.flow.set_training(false);
                let seed = cfg.seed ^ (step + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let z = latent_noise(batches.size, dim, 1.0, seed);
                run.flow.reverse_kl(teacher, &to_tensor(&z, dim)?)?
            }
        };
        let nll = loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        let grad_norm = adam.grad_norm(&grads)?;
        let lr = learning_rate(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            * state.lr_scale;
        if !nll.is_finite() || !grad_norm.is_finite() {
            consecutive_skips += 1;
            state.nan_skips += 1;
            state.lr_scale *= 0.5;
            let reason = if nll.is_finite() {
                "non-finite gradient"
            } else {
                "non-finite loss"
            };
            bar.println(format!(
                "step {step}: {reason}; skipped, learning rate now × {}",
                state.lr_scale
            ));
            emit(
                Record::Skip {
                    step,
                    reason: reason.into(),
                    lr_scale: state.lr_scale,
                },
                &mut history,
            )?;
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
                bail!("{consecutive_skips} consecutive steps had a non-finite loss or gradient; lower train.lr or check the data");
            }
        } else {
            consecutive_skips = 0;
            let scale = if cfg.grad_clip > 0.0 && grad_norm > cfg.grad_clip {
                cfg.grad_clip / grad_norm
            } else {
                1.0
            };
            adam.step(&grads, lr, scale)?;
            last_nll = nll;
        }
        state.step += 1;
        let took = started.elapsed().as_secs_f64();
        state.train_seconds += took;
        step_times.push(took);
        bar.set_position(state.step);
        let done = state.step;
        if done.is_multiple_of(cfg.log_every) && nll.is_finite() {
            emit(
                Record::Train {
                    step: done,
                    nll,
                    lr,
                    grad_norm,
                },
                &mut history,
            )?;
        }
        if done.is_multiple_of(cfg.eval_every) || done == cfg.steps {
            let val = match run.teacher {
                None => mean_nll(
                    run.flow,
                    &run.data.val,
                    run.dequantized,
                    val_seed,
                    run.config.model.ensemble,
                )?,
                Some(teacher) => reverse_kl(run.flow, teacher, cfg.distill_val_samples, val_seed)?,
            };
            let improved = val < state.best_val_nll;
            if improved {
                state.best_val_nll = val;
                state.best_step = done;
                state.evals_since_best = 0;
                best = run.params.snapshot();
            } else {
                state.evals_since_best += 1;
            }
            emit(
                Record::Val {
                    step: done,
                    nll: val,
                    best: improved,
                },
                &mut history,
            )?;
            bar.set_message(format!(
                "train {last_nll:.3} val {val:.3} (best {:.3} @ {})",
                state.best_val_nll, state.best_step
            ));
            if cfg.patience > 0 && state.evals_since_best >= cfg.patience {
                stopped_early = true;
                state.finished = true;
            }
        }
        if done.is_multiple_of(cfg.checkpoint_every) || done == cfg.steps || state.finished {
            state.adam_t = adam.t;
            state.tensors = format!("step-{done:08}.safetensors");
            save_checkpoint(run, &adam, &best, &state)?;
        }
    }
    bar.finish_and_clear();
    if best.is_empty() || !state.best_val_nll.is_finite() {
        bail!("training produced no finite validation NLL");
    }
    run.params.restore(&best)?;
    run.flow.set_training(false);
    run.flow.select_masks(0)?;
    step_times.sort_by(f64::total_cmp);
    Ok(Outcome {
        median_step_seconds: step_times
            .get(step_times.len() / 2)
            .copied()
            .unwrap_or(f64::NAN),
        steps: state.step,
        best_step: state.best_step,
        best_val_nll: state.best_val_nll,
        stopped_early: stopped_early || (state.finished && state.step < cfg.steps),
        nan_skips: state.nan_skips,
        train_seconds: state.train_seconds,
        resumed_from,
        history,
    })
}
