//! Coupling layers (Dinh et al. 2014, 2016; Kingma & Dhariwal 2018), one type for all:
//! a [`Partition`] of the elements into a kept part and a moved part, a conditioner network
//! ([`Net`]) of the kept part, and an [`Elementwise`] invertible map of the moved part whose
//! parameters the conditioner gives. The kept part passes through, so the inverse needs the
//! conditioner only forwards, and log|det| is the sum of the map's log-scales.
//!
//! | flow | partition | conditioner | map |
//! |---|---|---|---|
//! | NICE | [`Partition::Split`] | [`Net::mlp`] | [`Elementwise::Shift`] |
//! | RealNVP on rows | [`Partition::Split`] | [`Net::mlp`] | [`Elementwise::ClampedAffine`] |
//! | RealNVP on images, Glow | [`Partition::Image`] | [`Net::conv`] | [`Elementwise::SigmoidAffine`] (or `Shift`: additive) |
//! | neural spline flow (NSF) | either | either | [`Elementwise::Spline`] |
//!
//! The conditioner's last layer starts at zero, so a coupling starts as the identity (or,
//! with `SigmoidAffine`, as a fixed scaling by sigmoid(2)).
//!
//! A conditional coupling's network also sees the context ([`Ctx::context`]): appended to
//! the kept features of rows, or as extra constant channels of an image (one per context
//! value, as in class-conditional Glow).

use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::spline::{emit_params_last, params_last, RqSpline};
use super::{zero_rows, Bijector, Ctx, Dependence, LogDet, Mask, Split};
use crate::nn::{Activation, Net, OutputFold};
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

/// How a coupling divides the elements of an example.
pub enum Partition {
    /// Rows `[N, D]`: the features `cond` are kept (and condition), the features `trans`
    /// are moved.
    Split(Split),
    /// Images `[N, C, H, W]`: the elements where `keep` is 1 are kept; the conditioner sees
    /// the image with the moved elements zeroed, the map runs over every element and only
    /// the moved ones (`moved` = 1 − keep) are taken.
    Image {
        /// `[1, C, H, W]` of 0/1.
        keep: Tensor,
        /// `1 − keep`.
        moved: Tensor,
    },
}

impl Partition {
    /// The shape of one example's moved part as the map's parameters index it: `[n]` moved
    /// features, or `[C, H, W]`.
    fn moved_shape(&self) -> Result<Vec<usize>> {
        Ok(match self {
            Partition::Split(s) => vec![s.trans.len()],
            Partition::Image { keep, .. } => keep.dims()[1..].to_vec(),
        })
    }

    /// The rank of the examples (with the batch axis).
    fn rank(&self) -> usize {
        match self {
            Partition::Split(_) => 2,
            Partition::Image { .. } => 4,
        }
    }

    /// `(kept, moved)`: what the conditioner sees and what the map transforms.
    fn split(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            Partition::Split(s) => s.split(x),
            Partition::Image { keep, .. } => Ok((x.broadcast_mul(keep)?, x.clone())),
        }
    }

    /// The example from the kept part and the (transformed) moved part.
    fn join(&self, kept: &Tensor, moved: &Tensor) -> Result<Tensor> {
        match self {
            Partition::Split(s) => s.join(kept, moved),
            Partition::Image { moved: m, .. } => kept + moved.broadcast_mul(m)?,
        }
    }

    /// log|det| per row from the map's per-element log-scales.
    fn log_det(&self, log_scale: &Tensor) -> Result<Tensor> {
        match self {
            Partition::Split(_) => log_scale.sum(1),
            Partition::Image { moved, .. } => {
                log_scale.broadcast_mul(moved)?.flatten_from(1)?.sum(1)
            }
        }
    }

    /// The conditioner's input: the kept part with the context `[N, K]` appended (as
    /// columns of rows, or as `K` constant channels of images).
    fn with_context(&self, kept: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let Some(c) = context else {
            return Ok(kept.clone());
        };
        match self {
            Partition::Split(_) => Tensor::cat(&[kept, c], 1),
            Partition::Image { .. } => {
                let (n, _, h, w) = kept.dims4()?;
                let k = c.dim(1)?;
                let planes = c.reshape((n, k, 1, 1))?.broadcast_as((n, k, h, w))?;
                Tensor::cat(&[kept, &planes.contiguous()?], 1)
            }
        }
    }

    fn emit_with_context(
        &self,
        g: &mut Graph,
        kept: &Value,
        context: Option<Value>,
    ) -> Result<Value> {
        let Some(c) = context else {
            return Ok(kept.clone());
        };
        Ok(match self {
            Partition::Split(_) => g.concat(&[kept, &c], 1),
            Partition::Image { keep, .. } => {
                let (_, _, h, w) = keep.dims4()?;
                let planes = g.reshape(&c, &[0, -1, 1, 1]);
                let ones = g.constant("context_plane", &vec![1f32; h * w], &[1, 1, h, w]);
                let planes = g.mul(&planes, &ones);
                g.concat(&[kept, &planes], 1)
            }
        })
    }

    fn emit_split(&self, g: &mut Graph, x: &Value) -> Result<(Value, Value)> {
        Ok(match self {
            Partition::Split(s) => s.emit_split(g, x),
            Partition::Image { keep, .. } => {
                let keep = g.tensor("keep", &keep.squeeze(0)?)?;
                (g.mul(x, &keep), x.clone())
            }
        })
    }

    fn emit_join(&self, g: &mut Graph, kept: &Value, moved: &Value) -> Result<Value> {
        Ok(match self {
            Partition::Split(s) => s.emit_join(g, kept, moved),
            Partition::Image { moved: m, .. } => {
                let m = g.tensor("moved", &m.squeeze(0)?)?;
                let taken = g.mul(moved, &m);
                g.add(kept, &taken)
            }
        })
    }

    fn emit_log_det(&self, g: &mut Graph, log_scale: &Value) -> Result<Value> {
        let counted = match self {
            Partition::Split(_) => log_scale.clone(),
            Partition::Image { moved, .. } => {
                let m = g.tensor("moved", &moved.squeeze(0)?)?;
                g.mul(log_scale, &m)
            }
        };
        Ok(g.sum_per_row(&counted, Some(self.rank())))
    }
}

/// The invertible elementwise map of the moved part. Its parameters are the conditioner's
/// outputs, stacked along axis 1 in the order each variant names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Elementwise {
    /// `y = x + t` (NICE's additive coupling; volume-preserving). Parameters: `t`.
    Shift,
    /// `y = x·exp(s) + t`, `s = c·tanh(h/c)` (RealNVP, with a soft clamp so no layer scales
    /// by more than e^c and training cannot blow up). Parameters: `h`, `t`.
    ClampedAffine {
        /// The bound `c` on |s|.
        clamp: f64,
    },
    /// `y = (x + t)·σ(h + 2)` (Glow's scale: near 1 at the start, never 0). Parameters:
    /// `t`, `h`.
    SigmoidAffine,
    /// A monotonic rational-quadratic spline per element (neural spline flows), the identity
    /// outside its interval. Parameters: K widths, K heights, K − 1 derivatives.
    Spline(RqSpline),
}

/// log sigmoid(r) = −softplus(−r), finite wherever r is: `sigmoid(r).log()` is −inf in float32
/// once sigmoid(r) underflows (r < −104), which the composed path (float64, or a device without
/// the fused op) must not reach either.
fn log_sigmoid(r: &Tensor) -> Result<Tensor> {
    crate::nn::softplus(&r.neg()?)?.neg()
}

impl Elementwise {
    /// Parameters per moved element.
    fn params(self) -> usize {
        match self {
            Elementwise::Shift => 1,
            Elementwise::Spline(s) => s.params(),
            _ => 2,
        }
    }

    /// The `k`-th of the stacked parameter blocks of `h`.
    fn block(h: &Tensor, k: usize, n: usize) -> Result<Tensor> {
        h.narrow(1, k * n, n)
    }

    /// `(y, log-scale per element)` for `x` and parameters `h` (none for `Shift`).
    fn forward(self, x: &Tensor, h: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let n = x.dim(1)?;
        Ok(match self {
            Elementwise::Shift => ((x + h)?, None),
            Elementwise::ClampedAffine { clamp } => {
                let s = ((Self::block(h, 0, n)? / clamp)?.tanh()? * clamp)?;
                let y = (x.mul(&s.exp()?)? + Self::block(h, 1, n)?)?;
                (y, Some(s))
            }
            Elementwise::SigmoidAffine => {
                let ls = log_sigmoid(&(Self::block(h, 1, n)? + 2.0)?)?;
                let y = (x + Self::block(h, 0, n)?)?.mul(&ls.exp()?)?;
                (y, Some(ls))
            }
            Elementwise::Spline(s) => {
                let (y, ld) = s.forward(x, &params_last(h, s.params())?)?;
                (y, Some(ld))
            }
        })
    }

    /// `x` from `y` and the same parameters.
    fn inverse(self, y: &Tensor, h: &Tensor) -> Result<Tensor> {
        let n = y.dim(1)?;
        match self {
            Elementwise::Shift => y - h,
            Elementwise::ClampedAffine { clamp } => {
                let s = ((Self::block(h, 0, n)? / clamp)?.tanh()? * clamp)?;
                (y - Self::block(h, 1, n)?)?.mul(&s.neg()?.exp()?)
            }
            Elementwise::SigmoidAffine => {
                let ls = log_sigmoid(&(Self::block(h, 1, n)? + 2.0)?)?;
                y.mul(&ls.neg()?.exp()?)? - Self::block(h, 0, n)?
            }
            Elementwise::Spline(s) => s.inverse(y, &params_last(h, s.params())?),
        }
    }

    /// What the export folds into the conditioner's last layer (for `n` moved elements or
    /// channels): ClampedAffine's `1/c` and SigmoidAffine's `+2`.
    fn fold(self, n: usize) -> Option<OutputFold> {
        let ones = vec![1f32; n];
        let zeros = vec![0f32; n];
        match self {
            Elementwise::Shift | Elementwise::Spline(_) => None,
            Elementwise::ClampedAffine { clamp } => Some(OutputFold {
                scale: [vec![(1.0 / clamp) as f32; n], ones].concat(),
                shift: [zeros.clone(), zeros].concat(),
            }),
            Elementwise::SigmoidAffine => Some(OutputFold {
                scale: [ones.clone(), ones].concat(),
                shift: [zeros, vec![2f32; n]].concat(),
            }),
        }
    }

    /// The folded parameters `h` as `(t, s)`: the shift and, for the affine maps, the
    /// log-scale (ClampedAffine: `c·tanh(h)`) or the scale (SigmoidAffine: `σ(h)`).
    fn emit_params(self, g: &mut Graph, h: &Value) -> (Value, Option<Value>) {
        match self {
            Elementwise::Shift | Elementwise::Spline(_) => (h.clone(), None),
            Elementwise::ClampedAffine { clamp } => {
                let (raw, t) = g.halves(h, 1);
                let th = g.tanh(&raw);
                let c = g.scalar("clamp", clamp as f32);
                (t, Some(g.mul(&th, &c)))
            }
            Elementwise::SigmoidAffine => {
                // The log-scale log sigmoid(r) = −softplus(−r): Log(Sigmoid(r)) is −inf in
                // float32 once sigmoid(r) underflows (r < −104, an outlier image can get
                // there), where the training ops stay finite.
                let (t, raw) = g.halves(h, 1);
                let flipped = g.op("Neg", &[&raw], vec![]);
                let soft = g.op("Softplus", &[&flipped], vec![]);
                (t, Some(g.op("Neg", &[&soft], vec![])))
            }
        }
    }

    /// [`Elementwise::forward`] as ONNX nodes, on parameters with [`Elementwise::fold`]
    /// applied, for moved parts shaped `moved` per example; the log-scale per element.
    fn emit_forward(
        self,
        g: &mut Graph,
        x: &Value,
        h: &Value,
        moved: &[usize],
    ) -> (Value, Option<Value>) {
        if let Elementwise::Spline(s) = self {
            let u = emit_params_last(g, h, s.params(), moved[0], &moved[1..]);
            let (y, ld) = s.emit_forward(g, x, &u);
            return (y, Some(ld));
        }
        match (self, self.emit_params(g, h)) {
            (Elementwise::ClampedAffine { .. }, (t, Some(s))) => {
                let e = g.exp(&s);
                let scaled = g.mul(x, &e);
                (g.add(&scaled, &t), Some(s))
            }
            (Elementwise::SigmoidAffine, (t, Some(s))) => {
                let moved = g.add(x, &t);
                let e = g.exp(&s);
                (g.mul(&moved, &e), Some(s))
            }
            (_, (t, _)) => (g.add(x, &t), None),
        }
    }

    /// [`Elementwise::inverse`] as ONNX nodes, on folded parameters.
    fn emit_inverse(self, g: &mut Graph, y: &Value, h: &Value, moved: &[usize]) -> Value {
        if let Elementwise::Spline(s) = self {
            let u = emit_params_last(g, h, s.params(), moved[0], &moved[1..]);
            return s.emit_inverse(g, y, &u);
        }
        match (self, self.emit_params(g, h)) {
            (Elementwise::ClampedAffine { .. }, (t, Some(s))) => {
                let e = g.exp(&s);
                let centred = g.sub(y, &t);
                g.div(&centred, &e)
            }
            (Elementwise::SigmoidAffine, (t, Some(s))) => {
                let e = g.exp(&s);
                let unscaled = g.div(y, &e);
                g.sub(&unscaled, &t)
            }
            (_, (t, _)) => g.sub(y, &t),
        }
    }
}

/// A coupling layer: partition × conditioner × elementwise map.
pub struct Coupling {
    part: Partition,
    /// The conditioner: the map's parameters from the kept part (and the context).
    net: Net,
    map: Elementwise,
    /// Moved elements per row (rows) or channels (images): the size of a parameter block.
    moved: usize,
    /// Context values per row the conditioner takes (0: unconditional).
    context: usize,
}

impl Coupling {
    /// A coupling over rows of `dim` features divided by `mask` (`flip` swaps the parts),
    /// with an MLP conditioner of `hidden_layers` layers of `hidden` units that also takes
    /// `context` context values (0: unconditional).
    #[allow(clippy::too_many_arguments)]
    pub fn rows(
        p: &Params,
        dim: usize,
        mask: Mask,
        flip: bool,
        hidden: usize,
        hidden_layers: usize,
        activation: Activation,
        map: Elementwise,
        context: usize,
    ) -> Result<Self> {
        check_map(map)?;
        let split = Split::new(dim, mask, flip)?;
        let moved = split.trans.len();
        let mut sizes = vec![split.cond.len() + context];
        sizes.extend(std::iter::repeat_n(hidden, hidden_layers));
        sizes.push(map.params() * moved);
        let net = Net::mlp(&p.pp("net"), &sizes, activation, true)?;
        Ok(Coupling {
            part: Partition::Split(split),
            net,
            map,
            moved,
            context,
        })
    }

    /// A coupling over `[c, h, w]` images divided by `mask` (`flip` swaps the parts), with
    /// a `hidden`-channel convolutional conditioner that also takes `context` context
    /// values as constant channels (0: unconditional).
    #[allow(clippy::too_many_arguments)]
    pub fn image(
        p: &Params,
        shape: [usize; 3],
        mask: ImageMask,
        flip: bool,
        hidden: usize,
        activation: Activation,
        map: Elementwise,
        context: usize,
    ) -> Result<Self> {
        check_map(map)?;
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
        let keep = Tensor::from_vec(keep, (1, c, h, w), &Device::Cpu)?;
        let net = Net::conv(p, c + context, hidden, map.params() * c, activation, true)?;
        Ok(Coupling {
            part: Partition::Image {
                moved: (keep.ones_like()? - &keep)?,
                keep,
            },
            net,
            map,
            moved: c,
            context,
        })
    }
}

fn check_map(map: Elementwise) -> Result<()> {
    if let Elementwise::ClampedAffine { clamp } = map {
        if !(clamp.is_finite() && clamp > 0.0) {
            candle_core::bail!("the log-scale clamp must be positive, got {clamp}");
        }
    }
    Ok(())
}

impl Bijector for Coupling {
    fn dependence(&self) -> Dependence {
        Dependence::Mixing(
            "its coupling layers alternate which features condition the others, so no single feature order makes the Jacobian triangular".into(),
        )
    }

    fn name(&self) -> &'static str {
        match self.map {
            Elementwise::Shift => "additive_coupling",
            Elementwise::Spline(_) => "spline_coupling",
            _ => "affine_coupling",
        }
    }

    fn encode(&self, x: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        let (kept, moved) = self.part.split(x)?;
        let c = cx.context_for(self.context, x.dim(0)?)?;
        let h = self.net.forward(&self.part.with_context(&kept, c)?)?;
        // Glow's map on float32 images: one fused op each way (crate::fused).
        if let (Partition::Image { moved: mask, .. }, Elementwise::SigmoidAffine) =
            (&self.part, self.map)
        {
            if x.dtype() == candle_core::DType::F32 && x.device().is_cpu() {
                let mask = mask.flatten_all()?.to_vec1::<f32>()?;
                return crate::fused::image_sigmoid_affine(x, &h, &mask);
            }
        }
        let (y, log_scale) = self.map.forward(&moved, &h)?;
        let ld = match log_scale {
            Some(ls) => self.part.log_det(&ls)?,
            None => zero_rows(x)?,
        };
        Ok((self.part.join(&kept, &y)?, ld))
    }

    fn decode(&self, z: &Tensor, cx: &Ctx) -> Result<Tensor> {
        let (kept, moved) = self.part.split(z)?;
        let c = cx.context_for(self.context, z.dim(0)?)?;
        let h = self.net.forward(&self.part.with_context(&kept, c)?)?;
        let x = self.map.inverse(&moved, &h)?;
        self.part.join(&kept, &x)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let (kept, moved) = self.part.emit_split(g, x)?;
        let c = g.context_for(self.context)?;
        let input = self.part.emit_with_context(g, &kept, c)?;
        let h = self
            .net
            .emit(g, &input, self.map.fold(self.moved).as_ref())?;
        let shape = self.part.moved_shape()?;
        let (y, log_scale) = self.map.emit_forward(g, &moved, &h, &shape);
        let ld = match log_scale {
            Some(ls) => LogDet::Rows(self.part.emit_log_det(g, &ls)?),
            None => LogDet::Const(0.0),
        };
        Ok((self.part.emit_join(g, &kept, &y)?, ld))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let (kept, moved) = self.part.emit_split(g, z)?;
        let c = g.context_for(self.context)?;
        let input = self.part.emit_with_context(g, &kept, c)?;
        let h = self
            .net
            .emit(g, &input, self.map.fold(self.moved).as_ref())?;
        let shape = self.part.moved_shape()?;
        let x = self.map.emit_inverse(g, &moved, &h, &shape);
        self.part.emit_join(g, &kept, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The composed SigmoidAffine map keeps a finite log-scale where sigmoid underflows in
    /// float32 (as the fused CPU op does; other devices take this path) and stays invertible
    /// where its scale is representable.
    #[test]
    fn composed_sigmoid_affine_is_finite_where_the_sigmoid_underflows() -> Result<()> {
        let x = Tensor::new(&[[0.5f32, -1.0, 2.0]], &Device::Cpu)?;
        // Shifts, then raw scales h; sigmoid sees r = h + 2 = -300, 0, 40 (log sigmoid: -300,
        // -ln 2, -4e-18).
        let h = Tensor::new(&[[0.1f32, 0.2, -0.3, -302.0, -2.0, 38.0]], &Device::Cpu)?;
        let (y, ls) = Elementwise::SigmoidAffine.forward(&x, &h)?;
        let ls = ls
            .expect("an affine map has a log-scale")
            .to_vec2::<f32>()?;
        assert!((ls[0][0] + 300.0).abs() < 1e-3, "{ls:?}");
        assert!((ls[0][1] + std::f32::consts::LN_2).abs() < 1e-6, "{ls:?}");
        assert!(ls[0][2].abs() < 1e-6, "{ls:?}");
        let back = Elementwise::SigmoidAffine
            .inverse(&y, &h)?
            .to_vec2::<f32>()?;
        // Element 0's scale exp(-300) is 0 in float32: only the others can come back.
        for (a, b) in back[0][1..].iter().zip([-1.0f32, 2.0]) {
            assert!((a - b).abs() < 1e-4, "{back:?}");
        }
        Ok(())
    }
}
