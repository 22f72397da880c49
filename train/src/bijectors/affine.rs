//! Fixed elementwise affine map `z = (x - shift) / scale`: the standardisation that lets
//! clients send raw features while the flow sees unit-scale data. Its log-det is counted.

use candle_core::{Result, Tensor, Var};

use super::channel_affine::{ChannelAffine, PerChannelAffine};
use crate::params::Params;

/// `z = (x - shift) / scale`, per feature, not trained.
pub struct ElementwiseAffine {
    shift: Var,
    scale: Var,
}

impl ElementwiseAffine {
    /// A standardisation with the given per-feature shift and (positive) scale.
    pub fn new(p: &Params, shift: &[f32], scale: &[f32]) -> Result<Self> {
        if shift.len() != scale.len() || scale.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            candle_core::bail!("standardisation needs one finite positive scale per feature");
        }
        let dev = &candle_core::Device::Cpu;
        Ok(ElementwiseAffine {
            shift: p.buffer("shift", Tensor::new(shift, dev)?)?,
            scale: p.buffer("scale", Tensor::new(scale, dev)?)?,
        })
    }
}

impl PerChannelAffine for ElementwiseAffine {
    const NAME: &'static str = "standardize";

    /// As `x·a + c`: a = 1/scale, c = −shift/scale. The buffers are never trained, so they
    /// stay out of the autodiff graph.
    fn affine(&self) -> Result<ChannelAffine> {
        let a = self.scale.as_detached_tensor().recip()?;
        let c = (self.shift.as_detached_tensor() * &a)?.neg()?;
        Ok(ChannelAffine {
            a,
            c: Some(c),
            spatial: 1,
        })
    }
}
