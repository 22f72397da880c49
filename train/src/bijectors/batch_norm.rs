//! Batch normalisation as a bijector (RealNVP, MAF): in training it normalises with the
//! batch's statistics (and the log-det counts them); in evaluation, and in the export, with
//! running averages, where it is a fixed per-feature affine map. On images (`[N, C, H, W]`)
//! the statistics are per channel, over the batch and the pixels, as in RealNVP.

use candle_core::{Result, Tensor, Var};

use super::channel_affine::{per_channel, ChannelAffine, PerChannelAffine};
use super::constant_rows;
use crate::params::Params;

/// `z = (x - μ) / √(σ² + ε) · exp(γ) + β`.
pub struct BatchNorm {
    log_gamma: Var,
    beta: Var,
    running_mean: Var,
    running_var: Var,
    momentum: f64,
    eps: f64,
    /// Elements per channel per example (H·W; 1 for rows).
    spatial: usize,
}

impl BatchNorm {
    /// Starts as the identity on standardised data; running averages move by `momentum`
    /// per training batch.
    pub fn new(p: &Params, dim: usize, momentum: f64, eps: f64) -> Result<Self> {
        Self::per_channel(p, dim, 1, momentum, eps)
    }

    /// Batch norm over `channels` with `spatial` elements each per example (images).
    pub fn per_channel(
        p: &Params,
        dim: usize,
        spatial: usize,
        momentum: f64,
        eps: f64,
    ) -> Result<Self> {
        let dev = &candle_core::Device::Cpu;
        Ok(BatchNorm {
            log_gamma: p.zeros("log_gamma", dim)?,
            beta: p.zeros("beta", dim)?,
            running_mean: p.buffer(
                "running_mean",
                Tensor::zeros(dim, candle_core::DType::F32, dev)?,
            )?,
            running_var: p.buffer(
                "running_var",
                Tensor::ones(dim, candle_core::DType::F32, dev)?,
            )?,
            momentum,
            eps,
            spatial,
        })
    }
}

impl PerChannelAffine for BatchNorm {
    const NAME: &'static str = "batch_norm";

    fn train(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        self.batch_statistics(x).map(Some)
    }

    /// The evaluation-mode map as `z = x · a + c` (running statistics).
    fn affine(&self) -> Result<ChannelAffine> {
        let a = self
            .log_gamma
            .as_tensor()
            .exp()?
            .div(&(self.running_var.as_detached_tensor() + self.eps)?.sqrt()?)?;
        let c = (self.beta.as_tensor() - self.running_mean.as_detached_tensor().mul(&a)?)?;
        Ok(ChannelAffine {
            a,
            c: Some(c),
            spatial: self.spatial,
        })
    }
}

impl BatchNorm {
    /// Training: normalise with the batch's statistics (the log-det counts them) and move
    /// the running averages.
    fn batch_statistics(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let r = x.rank();
        let spatial = self.spatial as f64;
        let n = x.dim(0)? * self.spatial;
        if n < 2 {
            candle_core::bail!("batch norm in training needs at least 2 rows per batch");
        }
        // Per channel, over the batch (and the pixels).
        let columns = x.transpose(0, 1)?.flatten_from(1)?;
        let mean = columns.mean(1)?;
        let var = columns.broadcast_sub(&mean.unsqueeze(1)?)?.sqr()?.mean(1)?;
        let std = (&var + self.eps)?.sqrt()?;
        let gamma = self.log_gamma.as_tensor();
        let z = x
            .broadcast_sub(&per_channel(&mean, r)?)?
            .broadcast_mul(&per_channel(&(gamma.exp()? / &std)?, r)?)?
            .broadcast_add(&per_channel(self.beta.as_tensor(), r)?)?;
        let ld = ((gamma - std.log()?)?.sum_all()? * spatial)?;
        let m = self.momentum;
        let unbiased = (var.detach() * (n as f64 / (n as f64 - 1.0)))?;
        // A batch that went non-finite is skipped by the trainer; keep it out of the averages.
        let moved = (mean.sum_all()? + unbiased.sum_all()?)?.to_scalar::<f32>()?;
        if !moved.is_finite() {
            return Ok((z, constant_rows(x, &ld)?));
        }
        self.running_mean.set(
            &((self.running_mean.as_detached_tensor() * (1.0 - m))? + (mean.detach() * m)?)?,
        )?;
        self.running_var
            .set(&((self.running_var.as_detached_tensor() * (1.0 - m))? + (unbiased * m)?)?)?;
        Ok((z, constant_rows(x, &ld)?))
    }
}
