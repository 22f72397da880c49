//! The training loop: minibatch loss with Adam, warm-up + cosine schedule, gradient
//! clipping, a guard against non-finite steps, early stopping on the validation loss with
//! best-state restore, and checkpoints from which a killed run resumes exactly.
//!
//! Every random choice is a pure function of (seed, step) ([`crate::seeds`]), so a resumed
//! run takes the same steps as one that was never stopped.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, State};
use crate::config::Config;
use crate::data::Splits;
use crate::flows::Flow;
use crate::objective::Objective;
use crate::optim::{learning_rate, Adam};
use crate::params::Params;
use crate::threads::Trial;

/// Consecutive skipped steps after which training gives up.
const MAX_CONSECUTIVE_SKIPS: u64 = 20;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A training step's minibatch loss (nats per example).
    Train {
        /// Steps done after this one.
        step: u64,
        /// Minibatch loss: the NLL, or the reverse KL when distilling.
        #[serde(alias = "nll")]
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Gradient norm before clipping.
        grad_norm: f64,
    },
    /// A validation pass.
    Val {
        /// Steps done.
        step: u64,
        /// Validation loss: the mean NLL, or the reverse KL when distilling.
        #[serde(alias = "nll")]
        loss: f64,
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

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Steps taken in total (across resumptions).
    pub steps: u64,
    /// The step whose parameters were kept.
    pub best_step: u64,
    /// The validation loss at that step (NLL, or the reverse KL when distilling).
    pub best_val_loss: f64,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Steps skipped for non-finite loss or gradient.
    pub nan_skips: u64,
    /// Seconds spent in optimiser steps (not validation or checkpoints).
    pub train_seconds: f64,
    /// Median wall time of one optimiser step in this invocation (robust to a noisy machine).
    pub median_step_seconds: f64,
    /// The threads the steps ran on at the end (given, or chosen by timing).
    pub threads: usize,
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

impl<'a> Run<'a> {
    /// What this run minimises.
    pub fn objective(&self) -> Objective<'a> {
        let cfg = &self.config.train;
        let batch = cfg.batch_size.min(self.data.train.rows());
        match self.teacher {
            Some(t) => Objective::reverse_kl(t, batch, cfg.distill_val_samples),
            None => Objective::nll(
                self.data,
                self.dequantized,
                batch,
                self.config.model.ensemble,
                cfg.seed,
            ),
        }
    }
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

/// The loop's state around the math: optimiser, best parameters, log and progress.
struct Trainer<'r, 'a> {
    run: &'r Run<'a>,
    state: State,
    adam: Adam,
    best: HashMap<String, Tensor>,
    resumed_from: Option<u64>,
    history: Vec<Record>,
    log: File,
    bar: ProgressBar,
    consecutive_skips: u64,
    /// Early stopping ended the run in this invocation.
    stopped_early: bool,
    last_loss: f64,
    step_times: Vec<f64>,
}

impl<'r, 'a> Trainer<'r, 'a> {
    /// Resumes from `run.out/checkpoint` when one exists (and matches the config), else
    /// starts fresh; the metrics log is cut back to the checkpoint.
    fn resume_or_new(run: &'r Run<'a>) -> Result<Self> {
        let out = run.out;
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let mut adam = Adam::new(run.params.trainable(), run.config.train.weight_decay)?
            .with_average(run.config.train.average_decay)?;
        let (state, best, resumed_from) = match Checkpoint::load(out)? {
            Some(c) => {
                if c.state.config != *run.config {
                    bail!(
                        "{} holds a checkpoint of a different configuration; pass --fresh to start over or use another --out",
                        out.display()
                    );
                }
                run.params.restore(&c.tensors)?;
                adam.load_state(&c.tensors, c.state.adam_t)?;
                let best = c.best();
                let step = c.state.step;
                (c.state, best, Some(step))
            }
            None => (State::fresh(run.config), run.params.snapshot(), None),
        };
        // Keep the log consistent with the checkpoint: drop what a killed run wrote after it.
        let history = read_history(out, state.step)?;
        let mut text = String::new();
        for r in &history {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        std::fs::write(out.join("metrics.jsonl"), text)?;
        let log = OpenOptions::new()
            .append(true)
            .open(out.join("metrics.jsonl"))?;
        let steps = run.config.train.steps;
        let bar = if run.progress {
            ProgressBar::new(steps)
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
        Ok(Trainer {
            run,
            state,
            adam,
            best,
            resumed_from,
            history,
            log,
            bar,
            consecutive_skips: 0,
            stopped_early: false,
            last_loss: f64::NAN,
            step_times: Vec::new(),
        })
    }

    fn emit(&mut self, r: Record) -> Result<()> {
        writeln!(self.log, "{}", serde_json::to_string(&r)?)?;
        self.history.push(r);
        Ok(())
    }

    /// The next step to take, if any.
    fn next_step(&self) -> Option<u64> {
        let done = self.state.step >= self.run.config.train.steps || self.state.finished;
        (!done).then_some(self.state.step)
    }

    /// Backpropagates `loss`, then takes an Adam step — or, if the loss or a gradient is
    /// not finite, skips it and halves the learning rate.
    fn apply(&mut self, loss: Tensor, started: Instant) -> Result<()> {
        let cfg = &self.run.config.train;
        let step = self.state.step;
        let value = loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        let grad_norm = self.adam.grad_norm(&grads)?;
        let lr = learning_rate(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            * self.state.lr_scale;
        if !value.is_finite() || !grad_norm.is_finite() {
            self.consecutive_skips += 1;
            self.state.nan_skips += 1;
            self.state.lr_scale *= 0.5;
            let reason = if value.is_finite() {
                "non-finite gradient"
            } else {
                "non-finite loss"
            };
            let lr_scale = self.state.lr_scale;
            self.bar.println(format!(
                "step {step}: {reason}; skipped, learning rate now × {lr_scale}"
            ));
            self.emit(Record::Skip {
                step,
                reason: reason.into(),
                lr_scale,
            })?;
            if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
                bail!("{} consecutive steps had a non-finite loss or gradient; lower train.lr or check the data", self.consecutive_skips);
            }
        } else {
            self.consecutive_skips = 0;
            let scale = if cfg.grad_clip > 0.0 && grad_norm > cfg.grad_clip {
                cfg.grad_clip / grad_norm
            } else {
                1.0
            };
            self.adam.step(&grads, lr, scale)?;
            self.last_loss = value;
        }
        self.state.step += 1;
        let took = started.elapsed().as_secs_f64();
        self.state.train_seconds += took;
        self.step_times.push(took);
        self.bar.set_position(self.state.step);
        let done = self.state.step;
        if done.is_multiple_of(cfg.log_every) && value.is_finite() {
            self.emit(Record::Train {
                step: done,
                loss: value,
                lr,
                grad_norm,
            })?;
        }
        Ok(())
    }

    fn due_validation(&self) -> bool {
        let cfg = &self.run.config.train;
        self.state.step.is_multiple_of(cfg.eval_every) || self.state.step == cfg.steps
    }

    /// Validates, keeps the parameters if they are the best so far, and decides early
    /// stopping.
    fn validate(&mut self, objective: &Objective) -> Result<()> {
        let patience = self.run.config.train.patience;
        let split_seed = self.run.config.split_seed();
        // With weight averaging, the average is what is validated and kept.
        self.adam.swap_average()?;
        let val = objective.validate(self.run.flow, split_seed);
        let improved = val.as_ref().is_ok_and(|&v| v < self.state.best_val_loss);
        if improved {
            self.best = self.run.params.snapshot();
        }
        self.adam.swap_average()?;
        let val = val?;
        let s = &mut self.state;
        if improved {
            s.best_val_loss = val;
            s.best_step = s.step;
            s.evals_since_best = 0;
        } else {
            s.evals_since_best += 1;
        }
        if patience > 0 && s.evals_since_best >= patience {
            s.finished = true;
            self.stopped_early = true;
        }
        let (step, best_loss, best_step) = (s.step, s.best_val_loss, s.best_step);
        self.emit(Record::Val {
            step,
            loss: val,
            best: improved,
        })?;
        self.bar.set_message(format!(
            "train {:.3} val {val:.3} (best {best_loss:.3} @ {best_step})",
            self.last_loss
        ));
        Ok(())
    }

    fn due_checkpoint(&self) -> bool {
        let cfg = &self.run.config.train;
        let done = self.state.step;
        done.is_multiple_of(cfg.checkpoint_every) || done == cfg.steps || self.state.finished
    }

    fn checkpoint(&mut self) -> Result<()> {
        self.state.adam_t = self.adam.t;
        self.state.tensors = format!("step-{:08}.safetensors", self.state.step);
        Checkpoint::save(
            self.run.out,
            self.run.params,
            &self.adam,
            &self.best,
            &self.state,
        )
    }

    /// Restores the best parameters and reports.
    fn finish(mut self) -> Result<Outcome> {
        self.bar.finish_and_clear();
        if self.best.is_empty() || !self.state.best_val_loss.is_finite() {
            bail!("training produced no finite validation loss");
        }
        self.run.params.restore(&self.best)?;
        self.step_times.sort_by(f64::total_cmp);
        let s = &self.state;
        Ok(Outcome {
            median_step_seconds: self
                .step_times
                .get(self.step_times.len() / 2)
                .copied()
                .unwrap_or(f64::NAN),
            steps: s.step,
            best_step: s.best_step,
            best_val_loss: s.best_val_loss,
            stopped_early: self.stopped_early
                || (s.finished && s.step < self.run.config.train.steps),
            nan_skips: s.nan_skips,
            train_seconds: s.train_seconds,
            threads: crate::threads::current(),
            resumed_from: self.resumed_from,
            history: self.history,
        })
    }
}

/// Trains `run.flow`, resuming from `run.out/checkpoint` when one exists; returns with the
/// best parameters restored.
pub fn train(run: &Run) -> Result<Outcome> {
    let mut t = Trainer::resume_or_new(run)?;
    let mut objective = run.objective();
    let seed = run.config.train.seed;
    let mut trial = Trial::new(run.data.image.is_some(), run.config.train.steps);
    while let Some(step) = t.next_step() {
        trial.before_step();
        let started = Instant::now();
        let mask_set = run.config.model.mask_set(step);
        let loss = objective.loss(run.flow, seed, step, mask_set)?;
        t.apply(loss, started)?;
        let took = t.step_times.last().copied().unwrap_or(f64::NAN);
        if let Some(n) = trial.after_step(took) {
            let timed: Vec<String> = trial
                .medians()
                .iter()
                .map(|(n, s)| format!("{n}: {:.1} ms", s * 1e3))
                .collect();
            t.bar.println(format!(
                "threads: {n} (median step on {})",
                timed.join(", ")
            ));
        }
        if t.due_validation() {
            t.validate(&objective)?;
        }
        if t.due_checkpoint() {
            t.checkpoint()?;
        }
    }
    t.finish()
}
