//! NICE's final diagonal scaling `z = x · exp(s)`, with a trained log-scale per feature.

use candle_core::{Result, Var};

use super::channel_affine::{ChannelAffine, PerChannelAffine};
use crate::params::Params;

/// `z = x · exp(s)`, log|det| = Σ s.
pub struct DiagonalScaling {
    log_scale: Var,
}

impl DiagonalScaling {
    /// Starts as the identity (s = 0).
    pub fn new(p: &Params, dim: usize) -> Result<Self> {
        Ok(DiagonalScaling {
            log_scale: p.zeros("log_scale", dim)?,
        })
    }
}

impl PerChannelAffine for DiagonalScaling {
    const NAME: &'static str = "scaling";

    fn affine(&self) -> Result<ChannelAffine> {
        Ok(ChannelAffine {
            a: self.log_scale.as_tensor().exp()?,
            c: None,
            spatial: 1,
        })
    }
}
