//! The conditional base of a conditional flow: `z = (x − μ(c))·exp(−s(c))` per element, with
//! `[μ ‖ s] = c·W + b` linear in the context and `s = k·tanh(raw/k)` softly bounded. Last in
//! a conditional flow's chain it turns the standard normal base into N(μ(c), diag e^{2s(c)})
//! — class-conditional Glow's top prior, and over the factored-out latents its split priors'
//! class dependence — while every exported graph keeps the one standard normal base.
//!
//! `W` and `b` start at zero, so the layer starts as the identity.

use candle_core::{Result, Tensor, Var};

use super::{Bijector, Ctx, Dependence, LogDet};
use crate::onnx::{Graph, Value};
use crate::params::Params;

/// The bound `k` on |s|: no context moves the base's scale by more than e^k.
const LOG_SCALE_BOUND: f64 = 5.0;

/// `z = (x − μ(c))·exp(−s(c))` over events of a fixed shape.
pub struct ContextAffine {
    /// The event shape (`[D]` or `[C, H, W]`).
    event: Vec<usize>,
    /// `[K, 2D]`: μ's columns, then the raw log-scale's.
    weight: Var,
    /// `[2D]`.
    bias: Var,
}

impl ContextAffine {
    /// A layer over events shaped `event`, driven by `context` context values per row.
    pub fn new(p: &Params, event: &[usize], context: usize) -> Result<Self> {
        if context == 0 {
            candle_core::bail!("a context affine layer needs at least one context value");
        }
        let d: usize = event.iter().product();
        Ok(ContextAffine {
            event: event.to_vec(),
            weight: p.zeros("weight", (context, 2 * d))?,
            bias: p.zeros("bias", 2 * d)?,
        })
    }

    fn dim(&self) -> usize {
        self.event.iter().product()
    }

    /// `(μ, s)`, each `[N, ...event]`, for the rows of `x`.
    fn params(&self, cx: &Ctx, rows: usize) -> Result<(Tensor, Tensor)> {
        let k = self.weight.dims()[0];
        let c = cx
            .context_for(k, rows)?
            .expect("a context affine layer always takes a context");
        let h = c
            .matmul(self.weight.as_tensor())?
            .broadcast_add(self.bias.as_tensor())?;
        let d = self.dim();
        let mut shape = vec![rows];
        shape.extend(&self.event);
        let mu = h.narrow(1, 0, d)?.reshape(shape.clone())?;
        let s = ((h.narrow(1, d, d)? / LOG_SCALE_BOUND)?.tanh()? * LOG_SCALE_BOUND)?;
        Ok((mu, s.reshape(shape)?))
    }

    /// `(μ, s)` as ONNX nodes, each `[N, ...event]`; the bound's division is folded into
    /// the weights.
    fn emit_params(&self, g: &mut Graph) -> Result<(Value, Value)> {
        let k = self.weight.dims()[0];
        let c = g
            .context_for(k)?
            .expect("a context affine layer always takes a context");
        let d = self.dim();
        let fold: Vec<f32> = (0..2 * d)
            .map(|j| {
                if j < d {
                    1.0
                } else {
                    (1.0 / LOG_SCALE_BOUND) as f32
                }
            })
            .collect();
        let fold = Tensor::from_vec(fold, 2 * d, self.bias.device())?;
        let w = self.weight.as_tensor().broadcast_mul(&fold.unsqueeze(0)?)?;
        let b = self.bias.as_tensor().mul(&fold)?;
        let (w, b) = (g.tensor("weight", &w)?, g.tensor("bias", &b)?);
        let m = g.matmul(&c, &w);
        let h = g.add(&m, &b);
        let (mu, raw) = g.halves(&h, 1);
        let th = g.tanh(&raw);
        let bound = g.scalar("log_scale_bound", LOG_SCALE_BOUND as f32);
        let s = g.mul(&th, &bound);
        let mut shape = vec![0i64];
        shape.extend(self.event.iter().map(|&e| e as i64));
        Ok((g.reshape(&mu, &shape), g.reshape(&s, &shape)))
    }
}

impl Bijector for ContextAffine {
    fn name(&self) -> &'static str {
        "context_affine"
    }

    fn encode(&self, x: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        let (mu, s) = self.params(cx, x.dim(0)?)?;
        let z = (x - mu)?.mul(&s.neg()?.exp()?)?;
        Ok((z, s.flatten_from(1)?.sum(1)?.neg()?))
    }

    fn decode(&self, z: &Tensor, cx: &Ctx) -> Result<Tensor> {
        let (mu, s) = self.params(cx, z.dim(0)?)?;
        z.mul(&s.exp()?)? + mu
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let (z, neg_s) = self.emit_encode_diagonal(g, x)?;
        Ok((z, LogDet::Rows(g.sum_per_row(&neg_s, None))))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let (mu, s) = self.emit_params(g)?;
        let e = g.exp(&s);
        let scaled = g.mul(z, &e);
        Ok(g.add(&scaled, &mu))
    }

    /// zᵢ depends on xᵢ (and the context) alone.
    fn dependence(&self) -> Dependence {
        Dependence::Elementwise
    }

    /// log|∂zᵢ/∂xᵢ| = −sᵢ(c).
    fn emit_encode_diagonal(&self, g: &mut Graph, x: &Value) -> Result<(Value, Value)> {
        let (mu, s) = self.emit_params(g)?;
        let centred = g.sub(x, &mu);
        let neg_s = g.neg(&s);
        let e = g.exp(&neg_s);
        Ok((g.mul(&centred, &e), neg_s))
    }
}
