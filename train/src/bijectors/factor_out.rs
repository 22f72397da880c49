//! Multi-scale factor-out (RealNVP §3.6, Glow): the first `keep` channels go on through an
//! inner chain of bijectors (the deeper levels), the others leave the flow here — they are
//! latents already, under the standard normal base. `z = concat(inner(x[:keep]), x[keep:])`.

use candle_core::{Result, Tensor};
use flowpack::Cost;

use super::{Bijector, Chain, Ctx, LogDet};
use crate::onnx::{Graph, Value};

/// Applies `inner` to the first `keep` of `channels` channels; the rest pass through.
pub struct FactorOut {
    keep: usize,
    channels: usize,
    inner: Chain,
}

impl FactorOut {
    /// The deeper levels `inner` (data → latent order) over the first `keep` channels.
    pub fn new(keep: usize, channels: usize, inner: Chain) -> Result<Self> {
        if keep == 0 || keep >= channels {
            candle_core::bail!("factor-out keeps 1..{channels} channels, not {keep}");
        }
        Ok(FactorOut {
            keep,
            channels,
            inner,
        })
    }

    /// `(kept, leaving)` channels of `x`.
    fn split(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            x.narrow(1, 0, self.keep)?,
            x.narrow(1, self.keep, self.channels - self.keep)?,
        ))
    }
}

impl Bijector for FactorOut {
    fn name(&self) -> &'static str {
        "factor_out"
    }

    fn encode(&self, x: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        let (kept, rest) = self.split(x)?;
        let (h, ld) = self.inner.encode(&kept, cx)?;
        Ok((Tensor::cat(&[&h, &rest], 1)?, ld))
    }

    fn decode(&self, z: &Tensor, cx: &Ctx) -> Result<Tensor> {
        let (kept, rest) = self.split(z)?;
        Tensor::cat(&[&self.inner.decode(&kept, cx)?, &rest], 1)
    }

    fn decode_with_log_det(&self, z: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        let (kept, rest) = self.split(z)?;
        let (h, ld) = self.inner.decode_with_log_det(&kept, cx)?;
        Ok((Tensor::cat(&[&h, &rest], 1)?, ld))
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let kept = g.slice(x, 1, 0, self.keep);
        let (h, ld) = self.inner.emit_encode(g, &kept)?;
        let rest = g.slice(x, 1, self.keep, self.channels);
        Ok((g.concat(&[&h, &rest], 1), ld))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let kept = g.slice(z, 1, 0, self.keep);
        let h = self.inner.emit_decode(g, &kept)?;
        let rest = g.slice(z, 1, self.keep, self.channels);
        Ok(g.concat(&[&h, &rest], 1))
    }

    fn cost(&self) -> [Cost; 2] {
        self.inner.cost()
    }
}
