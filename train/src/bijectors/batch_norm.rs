//! Batch normalisation as a bijector (RealNVP, MAF): in training it normalises with the
//! batch's statistics (and the log-det counts them); in evaluation, and in the export, with
//! running averages, where it is a fixed per-feature affine map. On images (`[N, C, H, W]`)
//! the statistics are per channel, over the batch and the pixels, as in RealNVP.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Result, Tensor, Var};

use super::{constant_rows, Bijector, LogDet};
use crate::onnx::{Graph, Value};
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
    training: AtomicBool,
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
            training: AtomicBool::new(false),
        })
    }

    /// The evaluation-mode map as `z = x · a + c` (the form exported and used in eval).
    fn folded(&self) -> Result<(Tensor, Tensor)> {
        let a = self
            .log_gamma
            .as_tensor()
            .exp()?
            .div(&(self.running_var.as_detached_tensor() + self.eps)?.sqrt()?)?;
        let c = (self.beta.as_tensor() - self.running_mean.as_detached_tensor().mul(&a)?)?;
        Ok((a, c))
    }

    /// A `[C]` vector shaped to broadcast over `[N, C, ...]` of rank `rank`.
    fn shaped(t: &Tensor, rank: usize) -> Result<Tensor> {
        let mut shape = vec![1; rank];
        shape[1] = t.dim(0)?;
        t.reshape(shape)
    }

    /// The graph shape of per-channel constants: `[C]` for rows, `[C, 1, 1]` for images.
    fn graph_constant(&self, t: &Tensor) -> Result<Tensor> {
        if self.spatial == 1 {
            Ok(t.clone())
        } else {
            t.reshape((t.dim(0)?, 1, 1))
        }
    }
}

impl Bijector for BatchNorm {
    fn name(&self) -> &'static str {
        "batch_norm"
    }

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let r = x.rank();
        let spatial = self.spatial as f64;
        if !self.training.load(Ordering::Relaxed) {
            let (a, c) = self.folded()?;
            let z = x
                .broadcast_mul(&Self::shaped(&a, r)?)?
                .broadcast_add(&Self::shaped(&c, r)?)?;
            return Ok((z, constant_rows(x, &(a.log()?.sum_all()? * spatial)?)?));
        }
        let n = x.dim(0)? * self.spatial;
        if n < 2 {
            candle_core::bail!("batch norm in training needs at least 2 rows per batch");
        }
        // Per channel, over the batch (and the pixels).
        let per_channel = x.transpose(0, 1)?.flatten_from(1)?;
        let mean = per_channel.mean(1)?;
        let var = per_channel
            .broadcast_sub(&mean.unsqueeze(1)?)?
            .sqr()?
            .mean(1)?;
        let std = (&var + self.eps)?.sqrt()?;
        let gamma = self.log_gamma.as_tensor();
        let z = x
            .broadcast_sub(&Self::shaped(&mean, r)?)?
            .broadcast_mul(&Self::shaped(&(gamma.exp()? / &std)?, r)?)?
            .broadcast_add(&Self::shaped(self.beta.as_tensor(), r)?)?;
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

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (a, c) = self.folded()?;
        let r = z.rank();
        z.broadcast_sub(&Self::shaped(&c, r)?)?
            .broadcast_div(&Self::shaped(&a, r)?)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let (a, c) = self.folded()?;
        let ld = a.log()?.sum_all()?.to_scalar::<f32>()? as f64 * self.spatial as f64;
        let av = g.tensor("bn_scale", &self.graph_constant(&a)?)?;
        let cv = g.tensor("bn_shift", &self.graph_constant(&c)?)?;
        let scaled = g.mul(x, &av);
        Ok((g.add(&scaled, &cv), LogDet::Const(ld)))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let (a, c) = self.folded()?;
        let av = g.tensor("bn_scale", &self.graph_constant(&a)?)?;
        let cv = g.tensor("bn_shift", &self.graph_constant(&c)?)?;
        let centred = g.sub(z, &cv);
        Ok(g.div(&centred, &av))
    }
}
