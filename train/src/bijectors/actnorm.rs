//! Actnorm (Glow §3.1): a per-channel affine map `z = (x + b) · exp(s)` whose parameters
//! are initialised from the first training batch so that each channel has mean 0 and
//! standard deviation 1 after it, then trained freely. Works on `[N, C]` rows and on
//! `[N, C, H, W]` images alike (channel axis 1); log|det| = (H·W) · Σ s.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::{constant_rows, Bijector, LogDet};
use crate::onnx::{Graph, Value};
use crate::params::Params;

/// Per-channel affine map with data-dependent initialisation.
pub struct ActNorm {
    log_scale: Var,
    bias: Var,
    /// 1 once initialised; a buffer, so a resumed run does not initialise twice.
    initialized: Var,
    channels: usize,
    /// Elements per channel per example (H·W; 1 for rows).
    spatial: usize,
    training: std::sync::atomic::AtomicBool,
}

impl ActNorm {
    /// An actnorm over `channels`, each with `spatial` elements per example; it starts as
    /// the identity and initialises itself on the first batch it sees in training.
    pub fn new(p: &Params, channels: usize, spatial: usize) -> Result<Self> {
        Ok(ActNorm {
            log_scale: p.zeros("log_scale", channels)?,
            bias: p.zeros("bias", channels)?,
            initialized: p.buffer("initialized", Tensor::zeros(1, DType::F32, &Device::Cpu)?)?,
            channels,
            spatial,
            training: Default::default(),
        })
    }

    /// Whether the data-dependent initialisation has run.
    pub fn is_initialized(&self) -> Result<bool> {
        Ok(self
            .initialized
            .as_detached_tensor()
            .to_vec1::<f32>()?
            .first()
            .is_some_and(|&v| v > 0.0))
    }

    /// Sets `b = −mean`, `s = −log(std)` per channel from the batch `x`.
    pub fn initialize(&self, x: &Tensor) -> Result<()> {
        let per_channel = x
            .detach()
            .transpose(0, 1)?
            .contiguous()?
            .reshape((self.channels, ()))?;
        let mean = per_channel.mean(1)?;
        let std = per_channel
            .broadcast_sub(&mean.unsqueeze(1)?)?
            .sqr()?
            .mean(1)?
            .sqrt()?;
        self.bias.set(&mean.neg()?)?;
        self.log_scale.set(&(std + 1e-6)?.log()?.neg()?)?;
        self.initialized
            .set(&Tensor::ones(1, DType::F32, &Device::Cpu)?)
    }

    /// A `[C]` parameter shaped to broadcast over `[N, C, ...]` of rank `rank`.
    fn per_channel(&self, t: &Tensor, rank: usize) -> Result<Tensor> {
        let mut shape = vec![1; rank];
        shape[1] = self.channels;
        t.reshape(shape)
    }

    fn graph_shape(&self) -> Vec<usize> {
        if self.spatial == 1 {
            vec![self.channels]
        } else {
            vec![self.channels, 1, 1]
        }
    }
}

impl Bijector for ActNorm {
    fn name(&self) -> &'static str {
        "actnorm"
    }

    fn set_training(&self, training: bool) {
        self.training
            .store(training, std::sync::atomic::Ordering::Relaxed);
    }

    fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.training.load(std::sync::atomic::Ordering::Relaxed) && !self.is_initialized()? {
            self.initialize(x)?;
        }
        let r = x.rank();
        let s = self.log_scale.as_tensor();
        let z = x
            .broadcast_add(&self.per_channel(self.bias.as_tensor(), r)?)?
            .broadcast_mul(&self.per_channel(&s.exp()?, r)?)?;
        let ld = (s.sum_all()? * self.spatial as f64)?;
        Ok((z, constant_rows(x, &ld)?))
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let r = z.rank();
        let inv = self.log_scale.as_tensor().neg()?.exp()?;
        z.broadcast_mul(&self.per_channel(&inv, r)?)?
            .broadcast_sub(&self.per_channel(self.bias.as_tensor(), r)?)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let shape = self.graph_shape();
        let s = self.log_scale.as_tensor();
        let b = g.tensor(
            "actnorm_bias",
            &self.bias.as_tensor().reshape(shape.clone())?,
        )?;
        let e = g.tensor("actnorm_scale", &s.exp()?.reshape(shape)?)?;
        let shifted = g.add(x, &b);
        let ld = s.sum_all()?.to_scalar::<f32>()? as f64 * self.spatial as f64;
        Ok((g.mul(&shifted, &e), LogDet::Const(ld)))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let shape = self.graph_shape();
        let inv = self.log_scale.as_tensor().neg()?.exp()?;
        let b = g.tensor(
            "actnorm_bias",
            &self.bias.as_tensor().reshape(shape.clone())?,
        )?;
        let e = g.tensor("actnorm_inverse_scale", &inv.reshape(shape)?)?;
        let scaled = g.mul(z, &e);
        Ok(g.sub(&scaled, &b))
    }
}
