//! What training minimises: the NLL of minibatches of data, or — to distil a trained
//! teacher into this flow — the reverse KL(flow ‖ teacher) on the flow's own samples. One
//! type, so the loop does not care which.

use anyhow::Result;
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use flowpack::sampling::latent_noise;

use crate::bijectors::Ctx;
use crate::data::{dequantize, Splits};
use crate::eval::{mean_nll, reverse_kl, to_tensor};
use crate::flows::Flow;
use crate::seeds;

/// The training rows of step `t`: rows `t·B..(t+1)·B` of a per-epoch seeded shuffle.
pub struct Batches {
    n: usize,
    size: usize,
    seed: u64,
    /// The shuffle of the epoch last used.
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
                    perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seeds::epoch(
                        self.seed, epoch,
                    )));
                    self.epoch = Some((epoch, perm));
                }
                self.epoch.as_ref().expect("set above").1[i]
            })
            .collect()
    }
}

/// A training objective, in nats.
pub enum Objective<'a> {
    /// Mean NLL of dequantised minibatches; validated on the validation split.
    Nll {
        /// The data.
        data: &'a Splits,
        /// Dequantisation step per column (0: none).
        dequantized: &'a [f32],
        /// Validation averages densities over this many mask sets.
        ensemble: usize,
        /// The minibatches.
        batches: Batches,
    },
    /// Reverse KL on fresh base draws; validated on fixed draws.
    ReverseKl {
        /// The trained flow to imitate.
        teacher: &'a Flow,
        /// Draws per step.
        batch: usize,
        /// Fixed draws per validation.
        val_samples: usize,
    },
}

impl<'a> Objective<'a> {
    /// Fitting `data` with minibatches of `batch_size` rows (shuffled from `seed`).
    pub fn nll(
        data: &'a Splits,
        dequantized: &'a [f32],
        batch_size: usize,
        ensemble: usize,
        seed: u64,
    ) -> Self {
        let n = data.train.rows();
        Objective::Nll {
            data,
            dequantized,
            ensemble,
            batches: Batches {
                n,
                size: batch_size.min(n),
                seed,
                epoch: None,
            },
        }
    }

    /// Distilling `teacher` with `batch` draws per step.
    pub fn reverse_kl(teacher: &'a Flow, batch: usize, val_samples: usize) -> Self {
        Objective::ReverseKl {
            teacher,
            batch,
            val_samples,
        }
    }

    /// What the loss is called in logs and plots.
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Nll { .. } => "NLL",
            Objective::ReverseKl { .. } => "reverse KL",
        }
    }

    /// The loss of step `step` with MADE mask set `mask_set`, differentiable in the flow's
    /// parameters. Every random choice is a function of (`seed`, `step`).
    pub fn loss(&mut self, flow: &Flow, seed: u64, step: u64, mask_set: u64) -> Result<Tensor> {
        Ok(match self {
            Objective::Nll {
                data,
                dequantized,
                batches,
                ..
            } => {
                let dim = data.train.dim;
                let rows = batches.rows(step);
                let mut values = data.train.select_values(&rows);
                dequantize(
                    &mut values,
                    dim,
                    dequantized,
                    &mut seeds::batch_noise(seed, step),
                );
                let x = to_tensor(values, dim)?;
                let c = match data.train.context_dim {
                    0 => None,
                    w => Some(to_tensor(data.train.select_context(&rows), w)?),
                };
                flow.log_prob(&x, c.as_ref(), &Ctx::train(mask_set))?
                    .mean_all()?
                    .neg()?
            }
            Objective::ReverseKl { teacher, batch, .. } => {
                // Batch norm stays a learned affine map: there are no data batches here.
                let z = latent_noise(*batch, flow.dim, 1.0, seeds::distill_step(seed, step));
                let z = to_tensor(z, flow.dim)?;
                flow.reverse_kl(teacher, &z, None, &Ctx::eval(mask_set))?
            }
        })
    }

    /// The validation loss (evaluation behaviour, fixed noise from `seed`).
    pub fn validate(&self, flow: &Flow, seed: u64) -> Result<f64> {
        let seed = seeds::validation(seed);
        match self {
            Objective::Nll {
                data,
                dequantized,
                ensemble,
                ..
            } => mean_nll(flow, &data.val, dequantized, seed, *ensemble),
            Objective::ReverseKl {
                teacher,
                val_samples,
                ..
            } => reverse_kl(flow, teacher, *val_samples, seed),
        }
    }
}
