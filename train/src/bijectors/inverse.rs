//! A bijector used the other way round: `encode` is the inner `decode` and vice versa.
//! IAF is MADE inverted (Kingma et al., 2016): sampling becomes one pass and the density of
//! an arbitrary point becomes sequential — the same network, the costs swapped.

use candle_core::{Result, Tensor};
use flowpack::Cost;

use super::{Bijector, Ctx, Dependence, LogDet};
use crate::onnx::{Graph, Value};

/// `encode = inner.decode`, `decode = inner.encode`; log|det ∂z/∂x| is minus the inner
/// encode's log-det at z.
pub struct Inverse<B>(pub B);

impl<B: Bijector> Bijector for Inverse<B> {
    fn name(&self) -> &'static str {
        "inverse"
    }

    fn cost(&self) -> [Cost; 2] {
        let [encode, decode] = self.0.cost();
        [decode, encode]
    }

    fn encode(&self, x: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        let z = self.0.decode(x, cx)?;
        let (_, ld) = self.0.encode(&z, cx)?;
        Ok((z, ld.neg()?))
    }

    fn decode(&self, z: &Tensor, cx: &Ctx) -> Result<Tensor> {
        Ok(self.0.encode(z, cx)?.0)
    }

    /// One pass of the inner encode: the sample and its log-det together.
    fn decode_with_log_det(&self, z: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        self.0.encode(z, cx)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let z = self.0.emit_decode(g, x)?;
        let (_, ld) = self.0.emit_encode(g, &z)?;
        let ld = match ld {
            LogDet::Const(c) => LogDet::Const(-c),
            LogDet::Rows(v) => LogDet::Rows(g.neg(&v)),
        };
        Ok((z, ld))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        Ok(self.0.emit_encode(g, z)?.0)
    }

    fn dependence(&self) -> Dependence {
        Dependence::Mixing(
            "its density direction inverts the layers sequentially (IAF); per-feature terms are exported for MADE and MAF".into(),
        )
    }
}
