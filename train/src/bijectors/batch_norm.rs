//! Batch normalisation as a bijector (RealNVP, MAF): in training it normalises with the
//! batch's statistics (and the log-det counts them); in evaluation, and in the export, with
//! running averages, where it is a fixed per-feature affine map.

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
    training: AtomicBool,
}

impl BatchNorm {
    /// Starts as the identity on standardised data; running averages move by `momentum`
    /// per training batch.
    pub fn new(p: &Params, dim: usize, momentum: f64, eps: f64) -> Result<Self> {
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
}

impl Bijector for BatchNorm {
    fn name(&self) -> &'static str {
        "batch_norm"
    }

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        if !self.training.load(Ordering::Relaxed) {
            let (a, c) = self.folded()?;
            let z = x.broadcast_mul(&a)?.broadcast_add(&c)?;
            return Ok((z, constant_rows(x, &a.log()?.sum_all()?)?));
        }
        let n = x.dim(0)?;
        if n < 2 {
            candle_core::bail!("batch norm in training needs at least 2 rows per batch");
        }
        let mean = x.mean(0)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean(0)?;
        let std = (&var + self.eps)?.sqrt()?;
        let gamma = self.log_gamma.as_tensor();
        let z = centred
            .broadcast_div(&std)?
            .broadcast_mul(&gamma.exp()?)?
            .broadcast_add(self.beta.as_tensor())?;
        let ld = (gamma - std.log()?)?.sum_all()?;
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
        z.broadcast_sub(&c)?.broadcast_div(&a)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let (a, c) = self.folded()?;
        let ld = a.log()?.sum_all()?.to_scalar::<f32>()? as f64;
        let av = g.tensor("bn_scale", &a)?;
        let cv = g.tensor("bn_shift", &c)?;
        let scaled = g.mul(x, &av);
        Ok((g.add(&scaled, &cv), LogDet::Const(ld)))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let (a, c) = self.folded()?;
        let av = g.tensor("bn_scale", &a)?;
        let cv = g.tensor("bn_shift", &c)?;
        let centred = g.sub(z, &cv);
        Ok(g.div(&centred, &av))
    }
}
