//! Coupling on images (RealNVP multi-scale, Glow): a binary mask `b` over `[C, H, W]` keeps
//! half the elements, and a convolutional network of the kept half gives a shift `t` and a
//! scale `s` for the other half:
//!
//! `z = b⊙x + (1−b)⊙((x + t)·s)`, `s = sigmoid(h + 2)` (Glow's scale; 1 for additive),
//! `log|det| = Σ (1−b)⊙log s`.
//!
//! Masks: a checkerboard over pixels (every channel) or the first/second half of the
//! channels. The network's last layer starts at zero, so with `s = sigmoid(2)` constant
//! the layer starts as a fixed scaling (additive: the identity).

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::{Bijector, LogDet};
use crate::nn::{Activation, ConvNet};
use crate::onnx::{Graph, Value};
use crate::params::Params;

/// Which elements of an image a coupling keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageMask {
    /// Pixels with (y + x) even (odd when flipped), in every channel.
    Checkerboard,
    /// The first half of the channels (the second when flipped).
    Channel,
}

/// An affine (or additive) coupling with a convolutional conditioner.
pub struct ConvCoupling {
    keep: Tensor,
    net: ConvNet,
    additive: bool,
    channels: usize,
}

impl ConvCoupling {
    /// A coupling over `[c, h, w]` events with a `hidden`-channel network.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &Params,
        shape: [usize; 3],
        mask: ImageMask,
        flip: bool,
        hidden: usize,
        activation: Activation,
        additive: bool,
    ) -> Result<Self> {
        let [c, h, w] = shape;
        if mask == ImageMask::Channel && c < 2 {
            candle_core::bail!("a channel mask needs at least 2 channels, got {c}");
        }
        let keep: Vec<f32> = (0..c * h * w)
            .map(|i| {
                let (ch, y, x) = (i / (h * w), (i / w) % h, i % w);
                let kept = match mask {
                    ImageMask::Checkerboard => (y + x) % 2 == 0,
                    ImageMask::Channel => ch < c / 2,
                };
                if kept != flip {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        Ok(ConvCoupling {
            keep: Tensor::from_vec(keep, (1, c, h, w), &Device::Cpu)?,
            net: ConvNet::new(p, c, hidden, 2 * c, activation, true)?,
            additive,
            channels: c,
        })
    }

    /// `(t, log s)` from the kept part `xa`; log s is `None` for additive coupling.
    fn shift_log_scale(&self, xa: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let h = self.net.forward(xa)?;
        let t = h.narrow(1, 0, self.channels)?;
        if self.additive {
            return Ok((t, None));
        }
        let raw = (h.narrow(1, self.channels, self.channels)? + 2.0)?;
        Ok((t, Some(candle_nn::ops::sigmoid(&raw)?.log()?)))
    }

    fn emit_shift_scale(&self, g: &mut Graph, xa: &Value) -> Result<(Value, Option<Value>)> {
        let h = self.net.emit(g, xa)?;
        let c = self.channels;
        let t = g.slice(&h, 1, 0, c);
        if self.additive {
            return Ok((t, None));
        }
        let raw = g.slice(&h, 1, c, 2 * c);
        let two = g.scalar("two", 2.0);
        let shifted = g.add(&raw, &two);
        Ok((t, Some(g.op("Sigmoid", &[&shifted], vec![]))))
    }

    fn changed(&self) -> Result<Tensor> {
        self.keep.ones_like()? - &self.keep
    }
}

impl Bijector for ConvCoupling {
    fn name(&self) -> &'static str {
        "conv_coupling"
    }

    fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let xa = x.broadcast_mul(&self.keep)?;
        let (t, log_s) = self.shift_log_scale(&xa)?;
        let moved = (x + t)?;
        let changed = self.changed()?;
        let (out, ld) = match log_s {
            Some(ls) => (
                moved.mul(&ls.exp()?)?,
                ls.broadcast_mul(&changed)?.flatten_from(1)?.sum(1)?,
            ),
            None => (moved, Tensor::zeros(x.dim(0)?, DType::F32, x.device())?),
        };
        Ok(((xa + out.broadcast_mul(&changed)?)?, ld))
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let za = z.broadcast_mul(&self.keep)?;
        let (t, log_s) = self.shift_log_scale(&za)?;
        let unscaled = match log_s {
            Some(ls) => z.mul(&ls.neg()?.exp()?)?,
            None => z.clone(),
        };
        za + (unscaled - t)?.broadcast_mul(&self.changed()?)?
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let keep = g.tensor("keep", &self.keep.squeeze(0)?)?;
        let changed = g.tensor("changed", &self.changed()?.squeeze(0)?)?;
        let xa = g.mul(x, &keep);
        let (t, s) = self.emit_shift_scale(g, &xa)?;
        let mut out = g.add(x, &t);
        let mut ld = None;
        if let Some(s) = s {
            out = g.mul(&out, &s);
            let log_s = g.op("Log", &[&s], vec![]);
            let counted = g.mul(&log_s, &changed);
            ld = Some(g.sum_per_row(&counted));
        }
        let out = g.mul(&out, &changed);
        let z = g.add(&xa, &out);
        Ok((
            z,
            match ld {
                Some(v) => LogDet::Rows(v),
                None => LogDet::Const(0.0),
            },
        ))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let keep = g.tensor("keep", &self.keep.squeeze(0)?)?;
        let changed = g.tensor("changed", &self.changed()?.squeeze(0)?)?;
        let za = g.mul(z, &keep);
        let (t, s) = self.emit_shift_scale(g, &za)?;
        let unscaled = match s {
            Some(s) => g.div(z, &s),
            None => z.clone(),
        };
        let out = g.sub(&unscaled, &t);
        let out = g.mul(&out, &changed);
        Ok(g.add(&za, &out))
    }
}
