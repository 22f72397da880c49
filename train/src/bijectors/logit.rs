//! Logit pre-processing for bounded data (RealNVP §4.1): values in `[low, high]` are
//! rescaled to `p = α + (1 − 2α)·(x − low)/(high − low)` and mapped to `logit(p)`. As a
//! bijector its log-det is counted, so the exported log_prob is of the original pixel values:
//! per element `log((1 − 2α)/(high − low)) − log p − log(1 − p)`.

use candle_core::{Result, Tensor};

use super::{Bijector, Ctx, LogDet};
use crate::onnx::{Graph, Value};

/// `z = logit(α + (1 − 2α)·(x − low)/(high − low))`, elementwise.
pub struct Logit {
    low: f64,
    high: f64,
    alpha: f64,
}

impl Logit {
    /// A logit transform of values in `[low, high]` with boundary margin `alpha`.
    pub fn new(low: f64, high: f64, alpha: f64) -> Result<Self> {
        if !(high > low && (0.0..0.5).contains(&alpha)) {
            candle_core::bail!("logit needs low < high and 0 ≤ α < 0.5");
        }
        Ok(Logit { low, high, alpha })
    }

    fn a(&self) -> f64 {
        (1.0 - 2.0 * self.alpha) / (self.high - self.low)
    }
}

impl Bijector for Logit {
    fn name(&self) -> &'static str {
        "logit"
    }

    fn encode(&self, x: &Tensor, _: &Ctx) -> Result<(Tensor, Tensor)> {
        let p = ((x - self.low)? * self.a())?.affine(1.0, self.alpha)?;
        let q = p.affine(-1.0, 1.0)?;
        let (lp, lq) = (p.log()?, q.log()?);
        let z = (&lp - &lq)?;
        let per = ((lp + lq)?.neg()? + self.a().ln())?;
        Ok((z, per.flatten_from(1)?.sum(1)?))
    }

    fn decode(&self, z: &Tensor, _: &Ctx) -> Result<Tensor> {
        let p = candle_nn::ops::sigmoid(z)?;
        (p - self.alpha)?.affine(1.0 / self.a(), self.low)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let low = g.scalar("logit_low", self.low as f32);
        let a = g.scalar("logit_a", self.a() as f32);
        let alpha = g.scalar("logit_alpha", self.alpha as f32);
        let one = g.scalar("one", 1.0);
        let centred = g.sub(x, &low);
        let scaled = g.mul(&centred, &a);
        let p = g.add(&scaled, &alpha);
        let q = g.sub(&one, &p);
        let lp = g.op("Log", &[&p], vec![]);
        let lq = g.op("Log", &[&q], vec![]);
        let z = g.sub(&lp, &lq);
        let both = g.add(&lp, &lq);
        let log_a = g.scalar("logit_log_a", self.a().ln() as f32);
        let per = g.sub(&log_a, &both);
        Ok((z, LogDet::Rows(g.sum_per_row(&per, None))))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let p = g.op("Sigmoid", &[z], vec![]);
        let alpha = g.scalar("logit_alpha", self.alpha as f32);
        let a = g.scalar("logit_a", self.a() as f32);
        let low = g.scalar("logit_low", self.low as f32);
        let shifted = g.sub(&p, &alpha);
        let scaled = g.div(&shifted, &a);
        Ok(g.add(&scaled, &low))
    }
}
