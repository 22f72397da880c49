//! Bijectors: invertible maps with a tractable log-determinant.
//!
//! Every bijector maps data → latent with [`Bijector::encode`] and latent → data with
//! [`Bijector::decode`], and emits the same two maps as ONNX nodes. Math and emission live
//! in one file per bijector so that each file's parity test covers both.

use candle_core::{Result, Tensor};
use flowpack::Cost;

use crate::onnx::{Graph, Value};

mod actnorm;
mod additive_coupling;
mod affine;
mod affine_coupling;
mod batch_norm;
mod conv_coupling;
mod diagonal_scaling;
mod factor_out;
mod invconv;
mod inverse;
mod logit;
mod made;
mod permutation;
mod split;
mod squeeze;

pub use actnorm::ActNorm;
pub use additive_coupling::AdditiveCoupling;
pub use affine::ElementwiseAffine;
pub use affine_coupling::AffineCoupling;
pub use batch_norm::BatchNorm;
pub use conv_coupling::{ConvCoupling, ImageMask};
pub use diagonal_scaling::DiagonalScaling;
pub use factor_out::FactorOut;
pub use invconv::InvConv1x1;
pub use inverse::Inverse;
pub use logit::Logit;
pub use made::{degrees, Agnostic, Made};
pub use permutation::Permutation;
pub use split::{Mask, Split};
pub use squeeze::Squeeze;

/// A bijector's log|det ∂z/∂x| in an ONNX graph: a constant (folded by the flow) or one
/// value per row.
pub enum LogDet {
    /// The same for every row.
    Const(f64),
    /// A `[N]` value.
    Rows(Value),
}

/// An invertible map between data space and latent space.
pub trait Bijector {
    /// A short name for logs and ONNX node names.
    fn name(&self) -> &'static str;
    /// data → latent, with log|det ∂z/∂x| per row (`[N]`).
    fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)>;
    /// latent → data.
    fn decode(&self, z: &Tensor) -> Result<Tensor>;
    /// latent → data with log|det ∂x/∂z| per row: the sampling path of density
    /// distillation. By default one decode and one encode; bijectors whose inverse gives the
    /// log-det for free (IAF) override it.
    fn decode_with_log_det(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.decode(z)?;
        let (_, ld) = self.encode(&x)?;
        Ok((x, ld.neg()?))
    }
    /// [`Bijector::encode`] as ONNX nodes (evaluation mode).
    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)>;
    /// [`Bijector::decode`] as ONNX nodes (evaluation mode).
    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value>;
    /// How `encode` scales with the dimension (one pass unless autoregressive inversion).
    fn encode_cost(&self) -> Cost {
        Cost::OnePass
    }
    /// How `decode` scales with the dimension.
    fn decode_cost(&self) -> Cost {
        Cost::OnePass
    }
    /// Switches between training (batch statistics) and evaluation behaviour.
    fn set_training(&self, _training: bool) {}
    /// Uses mask set `k` (order-/connectivity-agnostic MADE); 0 is the exported one.
    /// Bijectors without masks ignore it.
    fn select_masks(&self, _k: u64) -> Result<()> {
        Ok(())
    }
}

/// `[N]` filled with `value`, for bijectors whose log-det does not depend on the input.
pub(crate) fn constant_rows(x: &Tensor, value: &Tensor) -> Result<Tensor> {
    value.broadcast_as(x.dim(0)?)?.contiguous()
}
