//! NICE's final diagonal scaling `z = x · exp(s)`, with a trained log-scale per feature.

use candle_core::{Result, Tensor, Var};

use super::{constant_rows, Bijector, LogDet};
use crate::onnx::{Graph, Value};
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

impl Bijector for DiagonalScaling {
    fn name(&self) -> &'static str {
        "diagonal_scaling"
    }

    fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = self.log_scale.as_tensor();
        let z = x.broadcast_mul(&s.exp()?)?;
        Ok((z, constant_rows(x, &s.sum_all()?)?))
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        z.broadcast_mul(&self.log_scale.as_tensor().neg()?.exp()?)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let s = self.log_scale.as_tensor();
        let e = g.tensor("scale", &s.exp()?)?;
        let ld = s.sum_all()?.to_scalar::<f32>()? as f64;
        Ok((g.mul(x, &e), LogDet::Const(ld)))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let e = g.tensor("inv_scale", &self.log_scale.as_tensor().neg()?.exp()?)?;
        Ok(g.mul(z, &e))
    }
}
