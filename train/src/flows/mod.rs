//! Flows: a preprocessing chain and a chain of bijectors over a standard normal base.
//!
//! `log p(x) = log N(z; 0, I) + Σ log|det ∂zₖ/∂zₖ₋₁|`, with `z = encode(x)`.

use candle_core::{Result, Tensor};
use flowpack::onnx::ModelProto;
use flowpack::signature::{DATA, LATENT, LOG_PROB};
use flowpack::Cost;

use crate::bijectors::{BatchNorm, Bijector, ElementwiseAffine, LogDet, Logit};
use crate::config::{Family, ModelConfig};
use crate::onnx::Graph;
use crate::params::Params;

mod image;
mod maf;
mod nice;
mod realnvp;

/// log(2π).
const LN_2PI: f64 = 1.837_877_066_409_345_5;

/// A normalizing flow over events of shape `event` (`[D]` rows or `[C, H, W]` images). Its
/// candle API takes and returns flat `[N, D]` rows; image layers see `[N, C, H, W]`.
pub struct Flow {
    /// The family it was built as.
    pub family: Family,
    /// Elements per example (the product of `event`).
    pub dim: usize,
    /// The event shape of data and latents.
    pub event: Vec<usize>,
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

/// The first bijector of a flow: what makes raw data unit-scale and unbounded.
pub enum Preprocess<'a> {
    /// Nothing.
    None,
    /// Per-feature standardisation fitted on the training split.
    Standardize(&'a Standardization),
    /// Logit of pixel values rescaled from `[low, high]` (image families).
    Logit {
        /// The smallest possible (dequantised) value.
        low: f64,
        /// The largest possible (dequantised) value.
        high: f64,
    },
}

/// Boundary margin α of the logit pre-processing (RealNVP used 0.05 on CIFAR-10).
pub const LOGIT_ALPHA: f64 = 0.05;

impl Flow {
    /// Builds the configured family over events shaped `event`, with `pre` as the first
    /// bijector so that the flow's input is raw data.
    pub fn build(
        cfg: &ModelConfig,
        event: &[usize],
        pre: Preprocess,
        params: &Params,
    ) -> Result<Flow> {
        let dim = event.iter().product();
        let mut layers: Vec<Box<dyn Bijector>> = Vec::new();
        match pre {
            Preprocess::None => {}
            Preprocess::Standardize(s) => layers.push(Box::new(ElementwiseAffine::new(
                &params.pp("standardize"),
                &s.shift,
                &s.scale,
            )?)),
            Preprocess::Logit { low, high } => {
                layers.push(Box::new(Logit::new(low, high, LOGIT_ALPHA)?))
            }
        }
        match cfg.family {
            Family::Nice => nice::build(cfg, dim, params, &mut layers)?,
            Family::Realnvp => realnvp::build(cfg, dim, params, &mut layers)?,
            Family::Made | Family::Maf | Family::Iaf => maf::build(cfg, dim, params, &mut layers)?,
            Family::Glow | Family::RealnvpImage => {
                let shape: [usize; 3] = event.try_into().map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "{} needs image data ([C, H, W] events: digits, mnist, fashion_mnist), got shape {event:?}",
                        cfg.family.as_str()
                    ))
                })?;
                image::build(cfg, shape, params, &mut layers)?
            }
        }
        Ok(Flow {
            family: cfg.family,
            dim,
            event: event.to_vec(),
            layers,
        })
    }

    /// Rows `[N, D]` as `[N, ...event]`.
    fn shaped(&self, x: &Tensor) -> Result<Tensor> {
        if self.event.len() == 1 {
            return Ok(x.clone());
        }
        let mut shape = vec![x.dim(0)?];
        shape.extend_from_slice(&self.event);
        x.reshape(shape)
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

    /// data → latent (`[N, D]` rows both), with the summed log|det| per row.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut z = self.shaped(x)?;
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
        Ok((z.flatten_from(1)?, total))
    }

    /// log p(x) per row.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let (z, ld) = self.encode(x)?;
        base_log_prob(&z)? + ld
    }

    /// latent → data with log q(x) of each sample: `log N(z) − Σ log|det ∂x/∂z|`. One pass
    /// for IAF, which is what makes density distillation fast.
    pub fn sample_with_log_prob(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = self.shaped(z)?;
        let mut lp = base_log_prob(z)?;
        for l in self.layers.iter().rev() {
            let (next, ld) = l.decode_with_log_det(&x)?;
            x = next;
            lp = (lp - ld)?;
        }
        Ok((x.flatten_from(1)?, lp))
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

    /// latent → data (`[N, D]` rows both).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = self.shaped(z)?;
        for l in self.layers.iter().rev() {
            x = l.decode(&x)?;
        }
        x.flatten_from(1)
    }

    /// `encode.onnx`: `x[N, ...event] → z[N, ...event], log_prob[N]`, evaluation behaviour.
    pub fn encode_graph(&self, name: &str) -> Result<ModelProto> {
        let mut g = Graph::new();
        let event = self.event.clone();
        let x = g.input(DATA, &event);
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
        g.output(&z, LATENT, &event);
        g.output(&lp, LOG_PROB, &[]);
        Ok(g.finish(
            &format!("{name}_encode"),
            "data → latent and exact log-density under a standard normal base",
        ))
    }

    /// `decode.onnx`: `z[N, ...event] → x[N, ...event]`.
    pub fn decode_graph(&self, name: &str) -> Result<ModelProto> {
        let mut g = Graph::new();
        let event = self.event.clone();
        let mut x = g.input(LATENT, &event);
        for l in self.layers.iter().rev() {
            x = l.emit_decode(&mut g, &x)?;
        }
        g.output(&x, DATA, &event);
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
