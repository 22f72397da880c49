//! RealNVP's affine coupling: `z_B = x_B · exp(s(x_A)) + t(x_A)`, `z_A = x_A`.
//!
//! The log-scale is bounded with a soft clamp, `s = c · tanh(h / c)`, so no single layer
//! can scale by more than e^c and training cannot blow up; near zero it is the identity.

use candle_core::{Result, Tensor};

use super::{Bijector, LogDet, Mask, Split};
use crate::nn::{Activation, Mlp};
use crate::onnx::{Graph, Value};
use crate::params::Params;

/// Affine coupling layer (Dinh et al., 2016).
pub struct AffineCoupling {
    split: Split,
    net: Mlp,
    clamp: f64,
}

impl AffineCoupling {
    /// A coupling over `dim` features; the conditioner outputs log-scale and shift for the
    /// transformed part and starts at zero (the layer starts as the identity).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &Params,
        dim: usize,
        mask: Mask,
        flip: bool,
        hidden: usize,
        hidden_layers: usize,
        activation: Activation,
        clamp: f64,
    ) -> Result<Self> {
        if !(clamp.is_finite() && clamp > 0.0) {
            candle_core::bail!("the log-scale clamp must be positive, got {clamp}");
        }
        let split = Split::new(dim, mask, flip)?;
        let mut sizes = vec![split.cond.len()];
        sizes.extend(std::iter::repeat_n(hidden, hidden_layers));
        sizes.push(2 * split.trans.len());
        let net = Mlp::new(&p.pp("net"), &sizes, activation, true)?;
        Ok(AffineCoupling { split, net, clamp })
    }

    fn scale_shift(&self, a: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.net.forward(a)?;
        let nb = self.split.trans.len();
        let s = ((h.narrow(1, 0, nb)? / self.clamp)?.tanh()? * self.clamp)?;
        Ok((s, h.narrow(1, nb, nb)?))
    }

    fn emit_scale_shift(&self, g: &mut Graph, a: &Value) -> Result<(Value, Value)> {
        let h = self.net.emit(g, a)?;
        let nb = self.split.trans.len();
        let raw = g.slice(&h, 1, 0, nb);
        let t = g.slice(&h, 1, nb, 2 * nb);
        let c = g.scalar("clamp", self.clamp as f32);
        let scaled = g.div(&raw, &c);
        let th = g.tanh(&scaled);
        Ok((g.mul(&th, &c), t))
    }
}

impl Bijector for AffineCoupling {
    fn name(&self) -> &'static str {
        "affine_coupling"
    }

    fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (a, b) = self.split.split(x)?;
        let (s, t) = self.scale_shift(&a)?;
        let zb = (b.mul(&s.exp()?)? + t)?;
        Ok((self.split.join(&a, &zb)?, s.sum(1)?))
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (a, b) = self.split.split(z)?;
        let (s, t) = self.scale_shift(&a)?;
        let xb = (b - t)?.mul(&s.neg()?.exp()?)?;
        self.split.join(&a, &xb)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let (a, b) = self.split.emit_split(g, x);
        let (s, t) = self.emit_scale_shift(g, &a)?;
        let e = g.exp(&s);
        let scaled = g.mul(&b, &e);
        let zb = g.add(&scaled, &t);
        let ld = g.sum_per_row(&s);
        Ok((self.split.emit_join(g, &a, &zb), LogDet::Rows(ld)))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let (a, b) = self.split.emit_split(g, z);
        let (s, t) = self.emit_scale_shift(g, &a)?;
        let centred = g.sub(&b, &t);
        let ns = g.neg(&s);
        let e = g.exp(&ns);
        let xb = g.mul(&centred, &e);
        Ok(self.split.emit_join(g, &a, &xb))
    }
}
