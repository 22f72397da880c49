//! Flows: a preprocessing chain and a chain of bijectors over a standard normal base.
//!
//! `log p(x) = log N(z; 0, I) + Σ log|det ∂zₖ/∂zₖ₋₁|`, with `z = encode(x)`.
//!
//! A conditional flow p(x | c) ([`Flow::context`]) feeds its encoded context to every
//! conditioner and ends its chain with a [`ContextAffine`] (a context-dependent Gaussian
//! base); its methods then take raw context rows beside the data, and both graphs take them
//! as a second input.

use candle_core::{Result, Tensor};
use flowpack::onnx::ModelProto;
use flowpack::signature::{CONTEXT, DATA, LATENT, LOG_PROB, LOG_PROB_TERMS};
use flowpack::{Base, ContextSpec, Contributions, Cost};

use crate::bijectors::{
    BatchNorm, Bijector, Chain, ContextAffine, Coupling, Ctx, Dependence, Elementwise,
    ElementwiseAffine, InvConv1x1, LogDetSum, Logit, Permutation, YeoJohnson,
};
use crate::config::{Family, ModelConfig, PermutationKind};
use crate::context::ContextNet;
use crate::onnx::Graph;
use crate::params::Params;

mod image;
mod maf;
mod nice;
mod nsf;
mod realnvp;

/// log(2π).
const LN_2PI: f64 = 1.837_877_066_409_345_5;

/// A normalizing flow over events of shape `event` (`[D]` rows or `[C, H, W]` images): a
/// chain of bijectors (the first ones preprocessing) over a base density. Its candle API
/// takes and returns flat `[N, D]` rows; image layers see `[N, C, H, W]`.
pub struct Flow {
    /// The family it was built as.
    pub family: Family,
    /// Elements per example (the product of `event`).
    pub dim: usize,
    /// The event shape of data and latents.
    pub event: Vec<usize>,
    /// data → latent.
    pub chain: Chain,
    /// The density of the latent.
    pub base: Base,
    /// The context encoder of a conditional flow p(x | c); `None`: unconditional.
    pub context: Option<ContextNet>,
}

/// Per-feature standardisation fitted on the training split: `z = (x - shift) / scale`.
#[derive(Debug, Clone)]
pub struct Standardization {
    /// Per-feature mean.
    pub shift: Vec<f32>,
    /// Per-feature standard deviation.
    pub scale: Vec<f32>,
    /// A Yeo–Johnson transform of the standardised features, if fitted.
    pub power: Option<PowerTransform>,
}

/// A Yeo–Johnson transform per standardised feature followed by a second standardisation
/// of its output, both fitted on the (dequantised) training split.
#[derive(Debug, Clone)]
pub struct PowerTransform {
    /// Per-feature λ.
    pub lambda: Vec<f32>,
    /// Per-feature mean of the transformed features.
    pub shift: Vec<f32>,
    /// Per-feature standard deviation of the transformed features.
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
    /// bijector so that the flow's input is raw data; conditional on `context` if given.
    pub fn build(
        cfg: &ModelConfig,
        event: &[usize],
        pre: Preprocess,
        params: &Params,
        context: Option<ContextSpec>,
    ) -> Result<Flow> {
        let dim = event.iter().product();
        let context = context
            .map(|spec| ContextNet::new(&params.pp("context"), spec, cfg.activation))
            .transpose()?;
        let ctx = context.as_ref().map_or(0, ContextNet::width);
        let mut chain = Chain::new();
        match pre {
            Preprocess::None => {}
            Preprocess::Standardize(s) => {
                chain.push(ElementwiseAffine::new(
                    &params.pp("standardize"),
                    &s.shift,
                    &s.scale,
                )?);
                if let Some(pt) = &s.power {
                    chain.push(YeoJohnson::new(&pt.lambda)?);
                    chain.push(ElementwiseAffine::new(
                        &params.pp("power_standardize"),
                        &pt.shift,
                        &pt.scale,
                    )?);
                }
            }
            Preprocess::Logit { low, high } => chain.push(Logit::new(low, high, LOGIT_ALPHA)?),
        }
        chain.append(match cfg.family {
            Family::Nice => nice::build(cfg, dim, params, ctx)?,
            Family::Realnvp => realnvp::build(cfg, dim, params, ctx)?,
            Family::Nsf => nsf::build(cfg, dim, params, ctx)?,
            Family::Made | Family::Maf | Family::Iaf => maf::build(cfg, dim, params, ctx)?,
            Family::Glow | Family::RealnvpImage => {
                let shape: [usize; 3] = event.try_into().map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "{} needs image data ([C, H, W] events: digits, mnist, fashion_mnist), got shape {event:?}",
                        cfg.family.as_str()
                    ))
                })?;
                image::build(cfg, shape, params, ctx)?
            }
        });
        if ctx > 0 {
            chain.push(ContextAffine::new(&params.pp("context_base"), event, ctx)?);
        }
        Ok(Flow {
            family: cfg.family,
            dim,
            event: event.to_vec(),
            chain,
            base: Base::StandardNormal,
            context,
        })
    }

    /// Raw context values per row (0: unconditional).
    pub fn context_width(&self) -> usize {
        self.context.as_ref().map_or(0, ContextNet::raw_width)
    }

    /// What the conditioners see for raw context rows `c`, checked against the flow: a
    /// conditional flow needs one row of context per row of data, an unconditional one none.
    fn conditioner_input(&self, c: Option<&Tensor>, rows: usize) -> Result<Option<Tensor>> {
        match (&self.context, c) {
            (None, None) => Ok(None),
            (Some(net), Some(c)) => {
                if c.dim(0)? != rows {
                    candle_core::bail!("{} context rows for {rows} rows", c.dim(0)?);
                }
                Ok(Some(net.forward(c)?))
            }
            (Some(net), None) => candle_core::bail!(
                "this flow is conditional: it needs a context of {} values per row",
                net.raw_width()
            ),
            (None, Some(_)) => {
                candle_core::bail!("this flow is unconditional: it takes no context")
            }
        }
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
        self.chain.cost()
    }

    /// log of the base density per row of flat latents `z`.
    pub fn base_log_prob(&self, z: &Tensor) -> Result<Tensor> {
        match self.base {
            Base::StandardNormal => {
                let d = z.dim(1)? as f64;
                (z.sqr()?.sum(1)? * -0.5)? - 0.5 * d * LN_2PI
            }
        }
    }

    /// data → latent (`[N, D]` rows both), with the summed log|det| per row; `c` is the
    /// raw context `[N, columns]` of a conditional flow (`None` for an unconditional one).
    pub fn encode(&self, x: &Tensor, c: Option<&Tensor>, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        let h = self.conditioner_input(c, x.dim(0)?)?;
        let (z, ld) = self
            .chain
            .encode(&self.shaped(x)?, &cx.with_context(h.as_ref()))?;
        Ok((z.flatten_from(1)?, ld))
    }

    /// log p(x | c) per row.
    pub fn log_prob(&self, x: &Tensor, c: Option<&Tensor>, cx: &Ctx) -> Result<Tensor> {
        let (z, ld) = self.encode(x, c, cx)?;
        self.base_log_prob(&z)? + ld
    }

    /// latent → data (`[N, D]` rows both), given the raw context of a conditional flow.
    pub fn decode(&self, z: &Tensor, c: Option<&Tensor>, cx: &Ctx) -> Result<Tensor> {
        let h = self.conditioner_input(c, z.dim(0)?)?;
        self.chain
            .decode(&self.shaped(z)?, &cx.with_context(h.as_ref()))?
            .flatten_from(1)
    }

    /// latent → data with log q(x | c) of each sample: `log N(z) − Σ log|det ∂x/∂z|`. One
    /// pass for IAF, which is what makes density distillation fast.
    pub fn sample_with_log_prob(
        &self,
        z: &Tensor,
        c: Option<&Tensor>,
        cx: &Ctx,
    ) -> Result<(Tensor, Tensor)> {
        let h = self.conditioner_input(c, z.dim(0)?)?;
        let (x, ld) = self
            .chain
            .decode_with_log_det(&self.shaped(z)?, &cx.with_context(h.as_ref()))?;
        Ok((x.flatten_from(1)?, (self.base_log_prob(z)? - ld)?))
    }

    /// Monte-Carlo reverse KL(self ‖ teacher) in nats: the mean of `log q(x|c) − log p(x|c)`
    /// over samples `x` of this flow decoded from the base draws `z` (with contexts `c`, for
    /// conditional flows). Differentiable in this flow's parameters (the
    /// reparameterisation trick); the teacher is evaluated as exported.
    pub fn reverse_kl(
        &self,
        teacher: &Flow,
        z: &Tensor,
        c: Option<&Tensor>,
        cx: &Ctx,
    ) -> Result<Tensor> {
        let (x, log_q) = self.sample_with_log_prob(z, c, cx)?;
        (log_q - teacher.log_prob(&x, c, &Ctx::EVAL)?)?.mean_all()
    }

    /// log p(x | c) per row (evaluation) averaged over mask sets `0..ensemble` as
    /// densities: `log (1/K) Σₖ pₖ(x | c)`, by log-sum-exp.
    pub fn ensemble_log_prob(
        &self,
        x: &Tensor,
        c: Option<&Tensor>,
        ensemble: usize,
    ) -> Result<Tensor> {
        if ensemble <= 1 {
            return self.log_prob(x, c, &Ctx::EVAL);
        }
        let each = (0..ensemble as u64)
            .map(|k| self.log_prob(x, c, &Ctx::eval(k)))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&each, 0)?.log_sum_exp(0)? - (ensemble as f64).ln()
    }

    /// Whether the exported log-density splits exactly into per-feature terms: tabular
    /// flows whose layers are all elementwise or autoregressive in one shared order.
    pub fn contributions(&self) -> Contributions {
        if self.event.len() != 1 {
            return Contributions::Unavailable {
                reason: "image models have no per-feature explanation".into(),
            };
        }
        match self.chain.dependence() {
            Dependence::Autoregressive(order) => Contributions::Exact { order },
            Dependence::Elementwise => Contributions::Exact {
                order: (0..self.dim).collect(),
            },
            Dependence::Mixing(reason) => Contributions::Unavailable {
                reason: format!("{}: {reason}", self.family.as_str()),
            },
        }
    }

    /// `encode.onnx`: `x[N, ...event] → z[N, ...event], log_prob[N]`, evaluation behaviour;
    /// with exact [`Flow::contributions`], also `log_prob_terms[N, D]` (term i is
    /// log N(zᵢ) + log|∂zᵢ/∂xᵢ|, and `log_prob` is their sum).
    pub fn encode_graph(&self, name: &str) -> Result<ModelProto> {
        let mut g = Graph::new();
        let event = self.event.clone();
        let x = g.input(DATA, &event);
        self.emit_context(&mut g)?;
        if let Contributions::Exact { .. } = self.contributions() {
            let Base::StandardNormal = self.base;
            let (z, diagonal) = self.chain.emit_encode_diagonal(&mut g, &x)?;
            let sq = g.mul(&z, &z);
            let half = g.scalar("neg_half", -0.5);
            let base = g.mul(&sq, &half);
            let c = g.scalar("log_normal_constant", (-0.5 * LN_2PI) as f32);
            let base = g.add(&base, &c);
            let terms = g.add(&base, &diagonal);
            let lp = g.sum_per_row(&terms, Some(2));
            g.output(&z, LATENT, &event);
            g.output(&lp, LOG_PROB, &[]);
            g.output(&terms, LOG_PROB_TERMS, &event);
            return Ok(g.finish(
                &format!("{name}_encode"),
                "data → latent, exact log-density under a standard normal base, and its per-feature terms",
            ));
        }
        let Base::StandardNormal = self.base;
        let mut sum = LogDetSum::new(-0.5 * self.dim as f64 * LN_2PI);
        let z = self.chain.emit_encode_sum(&mut g, &x, &mut sum)?;
        let sq = g.mul(&z, &z);
        let ss = g.sum_per_row(&sq, Some(1 + event.len()));
        let half = g.scalar("neg_half", -0.5);
        let mut lp = g.mul(&ss, &half);
        let c = g.scalar("log_prob_constant", sum.constant as f32);
        lp = g.add(&lp, &c);
        if let Some(rows) = sum.rows {
            lp = g.add(&lp, &rows);
        }
        g.output(&z, LATENT, &event);
        g.output(&lp, LOG_PROB, &[]);
        Ok(g.finish(
            &format!("{name}_encode"),
            "data → latent and exact log-density under a standard normal base",
        ))
    }

    /// A conditional flow's second graph input, `context[N, columns]`, encoded for the
    /// conditioners ([`Graph::context_for`]).
    fn emit_context(&self, g: &mut Graph) -> Result<()> {
        if let Some(net) = &self.context {
            let raw = g.input(CONTEXT, &[net.raw_width()]);
            let h = net.emit(g, &raw)?;
            g.set_context(h);
        }
        Ok(())
    }

    /// `decode.onnx`: `z[N, ...event] → x[N, ...event]` (and `context[N, columns]` as the
    /// second input of a conditional flow).
    pub fn decode_graph(&self, name: &str) -> Result<ModelProto> {
        let mut g = Graph::new();
        let event = self.event.clone();
        let z = g.input(LATENT, &event);
        self.emit_context(&mut g)?;
        let x = self.chain.emit_decode(&mut g, &z)?;
        g.output(&x, DATA, &event);
        Ok(g.finish(&format!("{name}_decode"), "latent → data"))
    }
}

/// Where batch norm goes in a stack of steps, when the config asks for it.
#[derive(Clone, Copy)]
enum BatchNormAt {
    /// After every step (NICE).
    AfterEach,
    /// Between steps, not after the last (RealNVP, MAF — as in the MAF paper).
    Between,
}

/// The steps chained, with a batch norm over `dim` features placed by `at` when
/// `cfg.batch_norm` is set (parameters `batch_norm{i}` after step `i`).
fn stack(
    cfg: &ModelConfig,
    dim: usize,
    p: &Params,
    steps: Vec<Chain>,
    at: BatchNormAt,
) -> Result<Chain> {
    let n = steps.len();
    let mut chain = Chain::new();
    for (i, step) in steps.into_iter().enumerate() {
        chain.append(step);
        let wanted = match at {
            BatchNormAt::AfterEach => true,
            BatchNormAt::Between => i + 1 < n,
        };
        if cfg.batch_norm && wanted {
            let bn = BatchNorm::new(
                &p.pp(format!("batch_norm{i}")),
                dim,
                cfg.batch_norm_momentum,
                1e-5,
            )?;
            chain.push(bn);
        }
    }
    Ok(chain)
}

/// The learned LU-parameterised linear map over rows of `dim` features placed before step
/// `i` (parameters `linear{i}`), initialised as a rotation drawn from the model seed.
fn lu_linear(p: &Params, dim: usize, i: usize) -> Result<InvConv1x1> {
    InvConv1x1::new(
        &p.pp(format!("linear{i}")),
        dim,
        1,
        true,
        crate::seeds::permutation(p.seed(), i),
    )
}

/// `cfg.layers` coupling steps over rows of `dim` features with elementwise map `map`: each
/// the configured permutation (none before the first) and a coupling (parameters
/// `coupling{i}`) whose mask is flipped on alternate steps when there is no permutation.
fn coupling_steps(
    cfg: &ModelConfig,
    dim: usize,
    p: &Params,
    map: Elementwise,
    context: usize,
) -> Result<Vec<Chain>> {
    let mut steps = Vec::new();
    for i in 0..cfg.layers {
        let mut step = Chain::new();
        let flip = match cfg.permutation {
            _ if i == 0 => false,
            PermutationKind::None => i % 2 == 1,
            PermutationKind::Reverse => {
                step.push(Permutation::reverse(dim)?);
                false
            }
            PermutationKind::Random => {
                let seed = crate::seeds::permutation(p.seed(), i);
                step.push(Permutation::random(dim, seed)?);
                false
            }
            PermutationKind::Lu => {
                step.push(lu_linear(p, dim, i)?);
                false
            }
        };
        step.push(Coupling::rows(
            &p.pp(format!("coupling{i}")),
            dim,
            cfg.mask,
            flip,
            cfg.hidden,
            cfg.hidden_layers,
            cfg.activation,
            map,
            context,
        )?);
        steps.push(step);
    }
    Ok(steps)
}
