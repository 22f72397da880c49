//! Actnorm (Glow §3.1): a per-channel affine map `z = (x + b) · exp(s)` whose parameters
//! are initialised from the first training batch so that each channel has mean 0 and
//! standard deviation 1 after it, then trained freely. Works on `[N, C]` rows and on
//! `[N, C, H, W]` images alike (channel axis 1); log|det| = (H·W) · Σ s.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::channel_affine::{ChannelAffine, PerChannelAffine};
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
}

impl PerChannelAffine for ActNorm {
    const NAME: &'static str = "actnorm";

    /// As `x·a + c`: a = exp(s), c = b·exp(s).
    fn affine(&self) -> Result<ChannelAffine> {
        let a = self.log_scale.as_tensor().exp()?;
        let c = self.bias.as_tensor().mul(&a)?;
        Ok(ChannelAffine {
            a,
            c: Some(c),
            spatial: self.spatial,
        })
    }

    /// Initialises from the first training batch, then runs the map.
    fn train(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        if !self.is_initialized()? {
            self.initialize(x)?;
        }
        Ok(None)
    }
}
