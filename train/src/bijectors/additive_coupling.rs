//! NICE's additive coupling: `z_B = x_B + m(x_A)`, `z_A = x_A`; volume-preserving.

use candle_core::{Result, Tensor};

use super::{Bijector, LogDet, Mask, Split};
use crate::nn::{Activation, Mlp};
use crate::onnx::{Graph, Value};
use crate::params::Params;

/// Additive coupling layer (Dinh et al., 2014).
pub struct AdditiveCoupling {
    split: Split,
    net: Mlp,
}

impl AdditiveCoupling {
    /// A coupling over `dim` features whose shift network has `hidden_layers` layers of
    /// `hidden` units; its last layer starts at zero (the layer starts as the identity).
    pub fn new(
        p: &Params,
        dim: usize,
        mask: Mask,
        flip: bool,
        hidden: usize,
        hidden_layers: usize,
        activation: Activation,
    ) -> Result<Self> {
        let split = Split::new(dim, mask, flip)?;
        let mut sizes = vec![split.cond.len()];
        sizes.extend(std::iter::repeat_n(hidden, hidden_layers));
        sizes.push(split.trans.len());
        let net = Mlp::new(&p.pp("net"), &sizes, activation, true)?;
        Ok(AdditiveCoupling { split, net })
    }
}

impl Bijector for AdditiveCoupling {
    fn name(&self) -> &'static str {
        "additive_coupling"
    }

    fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (a, b) = self.split.split(x)?;
        let zb = (b + self.net.forward(&a)?)?;
        let ld = Tensor::zeros(x.dim(0)?, x.dtype(), x.device())?;
        Ok((self.split.join(&a, &zb)?, ld))
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (a, b) = self.split.split(z)?;
        let xb = (b - self.net.forward(&a)?)?;
        self.split.join(&a, &xb)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let (a, b) = self.split.emit_split(g, x);
        let m = self.net.emit(g, &a)?;
        let zb = g.add(&b, &m);
        Ok((self.split.emit_join(g, &a, &zb), LogDet::Const(0.0)))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let (a, b) = self.split.emit_split(g, z);
        let m = self.net.emit(g, &a)?;
        let xb = g.sub(&b, &m);
        Ok(self.split.emit_join(g, &a, &xb))
    }
}
