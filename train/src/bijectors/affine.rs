//! Fixed elementwise affine map `z = (x - shift) / scale`: the standardisation that lets
//! clients send raw features while the flow sees unit-scale data. Its log-det is counted.

use candle_core::{Result, Tensor, Var};

use super::{constant_rows, Bijector, LogDet};
use crate::onnx::{Graph, Value};
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

    /// The buffers as constants: they are never trained, so they stay out of the autodiff graph.
    fn shift(&self) -> Tensor {
        self.shift.as_detached_tensor()
    }

    fn scale(&self) -> Tensor {
        self.scale.as_detached_tensor()
    }

    fn log_det(&self) -> Result<Tensor> {
        self.scale().log()?.sum_all()?.neg()
    }
}

impl Bijector for ElementwiseAffine {
    fn name(&self) -> &'static str {
        "standardize"
    }

    fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = x
            .broadcast_sub(&self.shift())?
            .broadcast_div(&self.scale())?;
        Ok((z, constant_rows(x, &self.log_det()?)?))
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        z.broadcast_mul(&self.scale())?.broadcast_add(&self.shift())
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let shift = g.tensor("shift", &self.shift())?;
        let scale = g.tensor("scale", &self.scale())?;
        let centred = g.sub(x, &shift);
        let z = g.div(&centred, &scale);
        let ld = self.log_det()?.to_scalar::<f32>()? as f64;
        Ok((z, LogDet::Const(ld)))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let shift = g.tensor("shift", &self.shift())?;
        let scale = g.tensor("scale", &self.scale())?;
        let scaled = g.mul(z, &scale);
        Ok(g.add(&scaled, &shift))
    }
}
