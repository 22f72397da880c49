//! Multi-scale factor-out (RealNVP §3.6, Glow): the first `keep` channels go on through an
//! inner chain of bijectors (the deeper levels), the others leave the flow here — they are
//! latents already, under the standard normal base. `z = concat(inner(x[:keep]), x[keep:])`.

use candle_core::{Result, Tensor};

use super::{Bijector, LogDet};
use crate::onnx::{Graph, Value};

/// Applies `inner` to the first `keep` of `channels` channels; the rest pass through.
pub struct FactorOut {
    keep: usize,
    channels: usize,
    inner: Vec<Box<dyn Bijector>>,
}

impl FactorOut {
    /// The deeper levels `inner` (data → latent order) over the first `keep` channels.
    pub fn new(keep: usize, channels: usize, inner: Vec<Box<dyn Bijector>>) -> Result<Self> {
        if keep == 0 || keep >= channels {
            candle_core::bail!("factor-out keeps 1..{channels} channels, not {keep}");
        }
        Ok(FactorOut {
            keep,
            channels,
            inner,
        })
    }
}

impl Bijector for FactorOut {
    fn name(&self) -> &'static str {
        "factor_out"
    }

    fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = x.narrow(1, 0, self.keep)?;
        let mut total = Tensor::zeros(x.dim(0)?, x.dtype(), x.device())?;
        for l in &self.inner {
            let (next, ld) = l.encode(&h)?;
            h = next;
            total = (total + ld)?;
        }
        let rest = x.narrow(1, self.keep, self.channels - self.keep)?;
        Ok((Tensor::cat(&[&h, &rest], 1)?, total))
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = z.narrow(1, 0, self.keep)?;
        for l in self.inner.iter().rev() {
            h = l.decode(&h)?;
        }
        let rest = z.narrow(1, self.keep, self.channels - self.keep)?;
        Tensor::cat(&[&h, &rest], 1)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let mut h = g.slice(x, 1, 0, self.keep);
        let mut constant = 0.0;
        let mut rows: Option<Value> = None;
        for l in &self.inner {
            let (next, ld) = l.emit_encode(g, &h)?;
            h = next;
            match ld {
                LogDet::Const(c) => constant += c,
                LogDet::Rows(v) => {
                    rows = Some(match rows {
                        Some(r) => g.add(&r, &v),
                        None => v,
                    })
                }
            }
        }
        let rest = g.slice(x, 1, self.keep, self.channels);
        let z = g.concat(&[&h, &rest], 1);
        let ld = match rows {
            None => LogDet::Const(constant),
            Some(r) if constant == 0.0 => LogDet::Rows(r),
            Some(r) => {
                let c = g.scalar("log_det_constant", constant as f32);
                LogDet::Rows(g.add(&r, &c))
            }
        };
        Ok((z, ld))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let mut h = g.slice(z, 1, 0, self.keep);
        for l in self.inner.iter().rev() {
            h = l.emit_decode(g, &h)?;
        }
        let rest = g.slice(z, 1, self.keep, self.channels);
        Ok(g.concat(&[&h, &rest], 1))
    }

    fn set_training(&self, training: bool) {
        for l in &self.inner {
            l.set_training(training);
        }
    }
}
