//! Bijectors: invertible maps with a tractable log-determinant.
//!
//! Every bijector maps data → latent with [`Bijector::encode`] and latent → data with
//! [`Bijector::decode`], and emits the same two maps as ONNX nodes. Math and emission live
//! in one file per bijector so that each file's parity test covers both. What changes
//! between calls — training or evaluation behaviour, MADE's mask set — travels in a [`Ctx`]
//! argument (candle's `forward_t(x, train)` idea), never in the layers, so containers
//! ([`Chain`], [`FactorOut`], [`Inverse`]) have nothing to forward by hand. The emitted
//! graphs are the evaluation behaviour with mask set 0: the exported flow.

use candle_core::{Result, Tensor};
use flowpack::Cost;

use crate::onnx::{Graph, Value};

mod actnorm;
mod affine;
mod batch_norm;
mod chain;
mod channel_affine;
mod context_affine;
mod coupling;
mod diagonal_scaling;
mod factor_out;
mod invconv;
mod inverse;
mod logit;
mod made;
mod permutation;
mod power;
mod spline;
mod split;
mod squeeze;

pub use actnorm::ActNorm;
pub use affine::ElementwiseAffine;
pub use batch_norm::BatchNorm;
pub use chain::Chain;
pub use context_affine::ContextAffine;
pub use coupling::{Coupling, Elementwise, ImageMask, Partition};
pub use diagonal_scaling::DiagonalScaling;
pub use factor_out::FactorOut;
pub use invconv::InvConv1x1;
pub use inverse::Inverse;
pub use logit::Logit;
pub use made::{degrees, Agnostic, Made, Transform};
pub use permutation::Permutation;
pub use power::{yeo_johnson, YeoJohnson, LAMBDA_RANGE};
pub use spline::{emit_params_last, params_last, RqSpline, MIN_BIN, MIN_DERIVATIVE};
pub use split::{Mask, Split};
pub use squeeze::Squeeze;

/// How a call should behave, and what it is conditioned on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ctx<'a> {
    /// Training behaviour: batch norm uses (and tracks) batch statistics, actnorm
    /// initialises itself on its first batch.
    pub training: bool,
    /// The mask set of order- and connectivity-agnostic MADEs (0: the exported one).
    pub mask_set: u64,
    /// The conditioners' context input `[N, K]` of a conditional flow (the encoded and
    /// embedded context, one row per example); `None` for unconditional flows. Its ONNX
    /// twin is [`Graph::context_for`].
    pub context: Option<&'a Tensor>,
}

impl<'a> Ctx<'a> {
    /// Evaluation with mask set 0: what the exported graphs compute.
    pub const EVAL: Ctx<'static> = Ctx {
        training: false,
        mask_set: 0,
        context: None,
    };

    /// Training with mask set `mask_set`.
    pub fn train(mask_set: u64) -> Ctx<'static> {
        Ctx {
            training: true,
            mask_set,
            context: None,
        }
    }

    /// Evaluation with mask set `mask_set`.
    pub fn eval(mask_set: u64) -> Ctx<'static> {
        Ctx {
            training: false,
            mask_set,
            context: None,
        }
    }

    /// The same behaviour conditioned on `context` (`[N, K]`).
    pub fn with_context<'b>(&self, context: Option<&'b Tensor>) -> Ctx<'b> {
        Ctx {
            training: self.training,
            mask_set: self.mask_set,
            context,
        }
    }

    /// The context a conditioner of `width` context inputs needs (`None` when it takes
    /// none), checked against the rows it conditions.
    pub fn context_for(&self, width: usize, rows: usize) -> Result<Option<&'a Tensor>> {
        if width == 0 {
            return Ok(None);
        }
        let Some(c) = self.context else {
            candle_core::bail!(
                "this flow is conditional: it needs a context of {width} values per row"
            );
        };
        if c.dims() != [rows, width] {
            candle_core::bail!(
                "the context has shape {:?}, the conditioner needs [{rows}, {width}]",
                c.dims()
            );
        }
        Ok(Some(c))
    }
}

/// A bijector's log|det ∂z/∂x| in an ONNX graph: a constant (folded by the flow) or one
/// value per row.
pub enum LogDet {
    /// The same for every row.
    Const(f64),
    /// A `[N]` value.
    Rows(Value),
}

/// Log-dets summed as they are emitted: constants folded into one number, per-row values
/// added as graph nodes.
pub struct LogDetSum {
    /// The sum of the constant parts.
    pub constant: f64,
    /// The sum of the per-row parts, if any.
    pub rows: Option<Value>,
}

impl LogDetSum {
    /// A sum starting at `constant`.
    pub fn new(constant: f64) -> Self {
        LogDetSum {
            constant,
            rows: None,
        }
    }

    /// Adds one bijector's log-det.
    pub fn add(&mut self, g: &mut Graph, ld: LogDet) {
        match ld {
            LogDet::Const(c) => self.constant += c,
            LogDet::Rows(v) => {
                self.rows = Some(match self.rows.take() {
                    Some(r) => g.add(&r, &v),
                    None => v,
                })
            }
        }
    }

    /// The total as one [`LogDet`].
    pub fn finish(self, g: &mut Graph) -> LogDet {
        match self.rows {
            None => LogDet::Const(self.constant),
            Some(r) if self.constant == 0.0 => LogDet::Rows(r),
            Some(r) => {
                let c = g.scalar("log_det_constant", self.constant as f32);
                LogDet::Rows(g.add(&r, &c))
            }
        }
    }
}

/// An invertible map between data space and latent space.
pub trait Bijector {
    /// A short name for logs and messages.
    fn name(&self) -> &'static str;
    /// data → latent, with log|det ∂z/∂x| per row (`[N]`).
    fn encode(&self, x: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)>;
    /// latent → data.
    fn decode(&self, z: &Tensor, cx: &Ctx) -> Result<Tensor>;
    /// latent → data with log|det ∂x/∂z| per row: the sampling path of density
    /// distillation. By default one decode and one encode; bijectors whose inverse gives the
    /// log-det for free (IAF) override it.
    fn decode_with_log_det(&self, z: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        let x = self.decode(z, cx)?;
        let (_, ld) = self.encode(&x, cx)?;
        Ok((x, ld.neg()?))
    }
    /// [`Bijector::encode`] as ONNX nodes ([`Ctx::EVAL`]).
    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)>;
    /// [`Bijector::decode`] as ONNX nodes ([`Ctx::EVAL`]).
    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value>;
    /// How `encode` and `decode` scale with the dimension (one pass unless autoregressive
    /// inversion makes a direction sequential).
    fn cost(&self) -> [Cost; 2] {
        [Cost::OnePass; 2]
    }

    /// How each latent coordinate depends on the data at evaluation: what decides whether
    /// a flow's log-density splits exactly into per-feature terms.
    fn dependence(&self) -> Dependence {
        Dependence::Mixing(format!(
            "its {} layers have no triangular Jacobian in one feature order",
            self.name()
        ))
    }

    /// [`Bijector::emit_encode`] with log|∂zᵢ/∂xᵢ| per feature (`[N, D]`, or `[D]` when it
    /// is the same for every row) instead of summed. Only for bijectors whose
    /// [`Bijector::dependence`] is elementwise or autoregressive: their Jacobian is triangular
    /// and these are its diagonal.
    fn emit_encode_diagonal(&self, _g: &mut Graph, _x: &Value) -> Result<(Value, Value)> {
        candle_core::bail!("{} has no per-feature log-det", self.name())
    }
}

/// How the latent depends on the data, for exact per-feature log-density terms.
///
/// If every layer of a tabular flow is elementwise or autoregressive in one shared order,
/// its Jacobian is triangular in that order and zᵢ depends only on the features up to i, so
/// log p(x) = Σᵢ [log N(zᵢ) + log|∂zᵢ/∂xᵢ|] with term i exactly log p(xᵢ | x₍<ᵢ₎).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dependence {
    /// zᵢ depends on xᵢ alone.
    Elementwise,
    /// zᵢ depends on the features up to i in this order (feature indices).
    Autoregressive(Vec<usize>),
    /// Features mixed both ways; the sentence says where.
    Mixing(String),
}

impl Dependence {
    /// The dependence of two layers applied one after the other (`self` first).
    pub fn then(self, next: Dependence) -> Dependence {
        use Dependence::*;
        match (self, next) {
            (Mixing(why), _) | (_, Mixing(why)) => Mixing(why),
            (Elementwise, d) | (d, Elementwise) => d,
            (Autoregressive(a), Autoregressive(b)) if a == b => Autoregressive(a),
            (Autoregressive(_), Autoregressive(_)) => Mixing(
                "its autoregressive layers use different feature orders (train with --permutation none for one shared order)".into(),
            ),
        }
    }
}

/// `[N]` filled with `value`, for bijectors whose log-det does not depend on the input.
pub(crate) fn constant_rows(x: &Tensor, value: &Tensor) -> Result<Tensor> {
    value.broadcast_as(x.dim(0)?)?.contiguous()
}

/// `[N]` zeros: the log-det of a volume-preserving map.
pub(crate) fn zero_rows(x: &Tensor) -> Result<Tensor> {
    Tensor::zeros(x.dim(0)?, x.dtype(), x.device())
}
