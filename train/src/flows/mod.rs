//! Flows: a preprocessing chain and a chain of bijectors over a standard normal base.
//!
//! `log p(x) = log N(z; 0, I) + Σ log|det ∂zₖ/∂zₖ₋₁|`, with `z = encode(x)`.

use candle_core::{Result, Tensor};
use flowpack::onnx::ModelProto;
use flowpack::Cost;

use crate::bijectors::{BatchNorm, Bijector, ElementwiseAffine, LogDet};
use crate::config::{Family, ModelConfig};
use crate::onnx::Graph;
use crate::params::Params;

mod maf;
mod nice;
mod realnvp;

/// log(2π).
const LN_2PI: f64 = 1.837_877_066_409_345_5;

/// A normalizing flow over events of shape `[dim]`.
pub struct Flow {
    /// The family it was built as.
    pub family: Family,
    /// Features per example.
    pub dim: usize,
    /// data → latent order; the first ones are preprocessing.
    pub layers: Vec<Box<dyn Bijector>>,
}

/// Per-feature standardisation fitted on the training split: `z = (x - shift) / scale`.
#[derive(Debug, Clone)]
pub struct Standardization {
    /// Per-feature mean.
    pub shift: Vec<f32>,
    /// Per-feature standard deviation.
    pub scale: Vec<f32>,
}

impl Flow {
    /// Builds the configured family over `dim` features, with `standardize` (if any) as
    /// the first bijector so that the flow's input is raw data.
    pub fn build(
        cfg: &ModelConfig,
        dim: usize,
        standardize: Option<&Standardization>,
        params: &Params,
    ) -> Result<Flow> {
        let mut layers: Vec<Box<dyn Bijector>> = Vec::new();
        if let Some(s) = standardize {
            layers.push(Box::new(ElementwiseAffine::new(
                &params.pp("standardize"),
                &s.shift,
                &s.scale,
            )?));
        }
        match cfg.family {
            Family::Nice => nice::build(cfg, dim, params, &mut layers)?,
            Family::Realnvp => realnvp::build(cfg, dim, params, &mut layers)?,
            Family::Made | Family::Maf | Family::Iaf => maf::build(cfg, dim, params, &mut layers)?,
        }
        Ok(Flow {
            family: cfg.family,
            dim,
            layers,
        })
    }

    /// How the two directions scale with the dimension: sequential if any layer's is.
    pub fn costs(&self) -> [Cost; 2] {
        let seq = |f: fn(&dyn Bijector) -> Cost| {
            if self
                .layers
                .iter()
                .any(|l| f(l.as_ref()) == Cost::Sequential)
            {
                Cost::Sequential
            } else {
                Cost::OnePass
            }
        };
        [seq(|b| b.encode_cost()), seq(|b| b.decode_cost())]
    }

    /// Training (batch statistics) or evaluation behaviour for every layer.
    pub fn set_training(&self, training: bool) {
        for l in &self.layers {
            l.set_training(training);
        }
    }

    /// data → latent, with the summed log|det| per row.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut z = x.clone();
        let mut total: Option<Tensor> = None;
        for l in &self.layers {
            let (next, ld) = l.encode(&z)?;
            z = next;
            total = Some(match total {
                Some(t) => (t + ld)?,
                None => ld,
            });
        }
        let total = match total {
            Some(t) => t,
            None => Tensor::zeros(x.dim(0)?, x.dtype(), x.device())?,
        };
        Ok((z, total))
    }

    /// log p(x) per row.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let (z, ld) = self.encode(x)?;
        base_log_prob(&z)? + ld
    }

    /// latent → data with log q(x) of each sample: `log N(z) − Σ log|det ∂x/∂z|`. One pass
    /// for IAF, which is what makes density distillation fast.
    pub fn sample_with_log_prob(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = z.clone();
        let mut lp = base_log_prob(z)?;
        for l in self.layers.iter().rev() {
            let (next, ld) = l.decode_with_log_det(&x)?;
            x = next;
            lp = (lp - ld)?;
        }
        Ok((x, lp))
    }

    /// Monte-Carlo reverse KL(self ‖ teacher) in nats: the mean of `log q(x) − log p(x)`
    /// over samples `x` of this flow decoded from the base draws `z`. Differentiable in this
    /// flow's parameters (the reparameterisation trick).
    pub fn reverse_kl(&self, teacher: &Flow, z: &Tensor) -> Result<Tensor> {
        let (x, log_q) = self.sample_with_log_prob(z)?;
        (log_q - teacher.log_prob(&x)?)?.mean_all()
    }

    /// Uses mask set `k` in every masked layer (0: the exported one).
    pub fn select_masks(&self, k: u64) -> Result<()> {
        self.layers.iter().try_for_each(|l| l.select_masks(k))
    }

    /// log p(x) per row averaged over mask sets `0..ensemble` as densities:
    /// `log (1/K) Σₖ pₖ(x)`, by log-sum-exp. Leaves mask set 0 selected.
    pub fn ensemble_log_prob(&self, x: &Tensor, ensemble: usize) -> Result<Tensor> {
        if ensemble <= 1 {
            self.select_masks(0)?;
            return self.log_prob(x);
        }
        let mut each = Vec::with_capacity(ensemble);
        for k in 0..ensemble as u64 {
            self.select_masks(k)?;
            each.push(self.log_prob(x)?);
        }
        self.select_masks(0)?;
        Tensor::stack(&each, 0)?.log_sum_exp(0)? - (ensemble as f64).ln()
    }

    /// latent → data.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = z.clone();
        for l in self.layers.iter().rev() {
            x = l.decode(&x)?;
        }
        Ok(x)
    }

    /// `encode.onnx`: `x[N, D] → z[N, D], log_prob[N]`, evaluation behaviour.
    pub fn encode_graph(&self, name: &str) -> Result<ModelProto> {
        let mut g = Graph::new();
        let event = [self.dim];
        let x = g.input("x", &event);
        let mut z = x;
        let mut constant = -0.5 * self.dim as f64 * LN_2PI;
        let mut rows = Vec::new();
        for l in &self.layers {
            let (next, ld) = l.emit_encode(&mut g, &z)?;
            z = next;
            match ld {
                LogDet::Const(c) => constant += c,
                LogDet::Rows(v) => rows.push(v),
            }
        }
        let sq = g.mul(&z, &z);
        let ss = g.sum_per_row(&sq);
        let half = g.scalar("neg_half", -0.5);
        let mut lp = g.mul(&ss, &half);
        let c = g.scalar("log_prob_constant", constant as f32);
        lp = g.add(&lp, &c);
        for r in rows {
            lp = g.add(&lp, &r);
        }
        g.output(&z, "z", &event);
        g.output(&lp, "log_prob", &[]);
        Ok(g.finish(
            &format!("{name}_encode"),
            "data → latent and exact log-density under a standard normal base",
        ))
    }

    /// `decode.onnx`: `z[N, D] → x[N, D]`.
    pub fn decode_graph(&self, name: &str) -> Result<ModelProto> {
        let mut g = Graph::new();
        let event = [self.dim];
        let mut x = g.input("z", &event);
        for l in self.layers.iter().rev() {
            x = l.emit_decode(&mut g, &x)?;
        }
        g.output(&x, "x", &event);
        Ok(g.finish(&format!("{name}_decode"), "latent → data"))
    }
}

/// The batch norm that follows layer `i` when the config asks for one.
fn batch_norm(cfg: &ModelConfig, dim: usize, i: usize, p: &Params) -> Result<Box<dyn Bijector>> {
    let bn = BatchNorm::new(
        &p.pp(format!("batch_norm{i}")),
        dim,
        cfg.batch_norm_momentum,
        1e-5,
    )?;
    Ok(Box::new(bn))
}

/// log N(z; 0, I) per row.
pub fn base_log_prob(z: &Tensor) -> Result<Tensor> {
    let d = z.dim(1)? as f64;
    (z.sqr()?.sum(1)? * -0.5)? - 0.5 * d * LN_2PI
}
