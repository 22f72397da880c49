//! The conditioner networks inside coupling layers ([`Net`]: a multilayer perceptron or
//! Glow's convolutional network), whose candle forward pass and ONNX emission sit side by
//! side, and the im2col convolution their training uses.

use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::onnx::{Attr, Graph, Value};
use crate::params::Params;

/// Hidden-layer nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(x, 0)
    Relu,
    /// tanh(x)
    Tanh,
    /// x for x > 0, exp(x) - 1 otherwise
    Elu,
    /// x · sigmoid(x)
    Silu,
}

impl Activation {
    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::Tanh => x.tanh(),
            Activation::Elu => x.elu(1.0),
            Activation::Silu => x.silu(),
        }
    }

    pub(crate) fn emit(self, g: &mut Graph, x: &Value) -> Value {
        match self {
            Activation::Relu => g.op("Relu", &[x], vec![]),
            Activation::Tanh => g.tanh(x),
            Activation::Elu => g.op("Elu", &[x], vec![("alpha", Attr::Float(1.0))]),
            Activation::Silu => {
                let s = g.op("Sigmoid", &[x], vec![]);
                g.mul(x, &s)
            }
        }
    }
}

/// An affine map of a network's outputs folded into its last layer at export: output `j`
/// becomes `h_j · scale[j] + shift[j]` with no node of its own.
pub struct OutputFold {
    /// Per output (column or channel).
    pub scale: Vec<f32>,
    /// Per output.
    pub shift: Vec<f32>,
}

impl OutputFold {
    /// The last layer's weight and bias with the fold applied; `w` has the outputs on
    /// `axis` (1 for `[in, out]` matrices, 0 for `[out, in, k, k]` kernels).
    fn apply(&self, w: &Tensor, b: &Tensor, axis: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let n = self.scale.len();
        let scale = Tensor::from_slice(&self.scale, n, w.device())?;
        let shift = Tensor::from_slice(&self.shift, n, w.device())?;
        let mut shape = vec![1; w.rank()];
        shape[axis] = n;
        let w = w.broadcast_mul(&scale.reshape(shape)?)?;
        let b = (b.mul(&scale)? + shift)?;
        Ok((w, b))
    }
}

/// What one layer computes.
#[derive(Clone, Copy)]
enum Op {
    /// `h · W + b` with `W[in, out]` (rows).
    Dense,
    /// A stride-1 "same" `k × k` convolution with `W[out, in, k, k]` (images).
    Conv(usize),
}

impl Op {
    /// The axis of the weight that indexes the outputs.
    fn outputs_axis(self) -> usize {
        match self {
            Op::Dense => 1,
            Op::Conv(_) => 0,
        }
    }
}

/// The conditioner networks of coupling layers: layers of one kind with the activation
/// between them; the candle forward pass and the ONNX emission are written once, side by
/// side. [`Net::mlp`] for rows, [`Net::conv`] (Glow's) for images.
pub struct Net {
    layers: Vec<(Var, Var, Op)>,
    activation: Activation,
}

impl Net {
    /// A fully connected network `sizes[0] → … → sizes[last]`, weights drawn as PyTorch's
    /// `Linear` does (uniform, bound 1/√fan_in); with `zero_last` the output layer starts
    /// at zero, so a coupling starts as the identity.
    pub fn mlp(
        p: &Params,
        sizes: &[usize],
        activation: Activation,
        zero_last: bool,
    ) -> Result<Self> {
        let n = sizes.len() - 1;
        let mut layers = Vec::new();
        for (i, w) in sizes.windows(2).enumerate() {
            let (fan_in, fan_out) = (w[0], w[1]);
            let layer = p.pp(format!("linear{i}"));
            let zero = zero_last && i + 1 == n;
            let (weight, bias) = init(&layer, (fan_in, fan_out), fan_out, fan_in, zero)?;
            layers.push((weight, bias, Op::Dense));
        }
        Ok(Net { layers, activation })
    }

    /// Glow's coupling network on images: a 3×3 convolution, a 1×1 convolution (both
    /// followed by the activation) and a 3×3 convolution, padded to keep the spatial size,
    /// `channels_in → hidden → hidden → channels_out`, weights uniform in ±1/√fan_in. With
    /// `zero_last` the last convolution starts at zero.
    pub fn conv(
        p: &Params,
        channels_in: usize,
        hidden: usize,
        channels_out: usize,
        activation: Activation,
        zero_last: bool,
    ) -> Result<Self> {
        let spec = [
            (channels_in, hidden, 3),
            (hidden, hidden, 1),
            (hidden, channels_out, 3),
        ];
        let mut layers = Vec::new();
        for (i, &(cin, cout, k)) in spec.iter().enumerate() {
            let layer = p.pp(format!("conv{i}"));
            let zero = zero_last && i == 2;
            let (w, b) = init(&layer, (cout, cin, k, k), cout, cin * k * k, zero)?;
            layers.push((w, b, Op::Conv(k)));
        }
        Ok(Net { layers, activation })
    }

    /// The network applied to `x` (`[N, in]` rows or `[N, C, H, W]` images).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (w, b, op)) in self.layers.iter().enumerate() {
            let (w, b) = (w.as_tensor(), b.as_tensor());
            h = match op {
                Op::Dense => h.matmul(w)?.broadcast_add(b)?,
                Op::Conv(k) => crate::conv::conv_same(&h, w, b, *k)?,
            };
            if i + 1 < self.layers.len() {
                h = self.activation.apply(&h)?;
            }
        }
        Ok(h)
    }

    /// The same network as ONNX nodes, with `fold` applied to its outputs.
    pub fn emit(&self, g: &mut Graph, x: &Value, fold: Option<&OutputFold>) -> Result<Value> {
        let n = self.layers.len();
        let mut h = x.clone();
        for (i, (w, b, op)) in self.layers.iter().enumerate() {
            let last = i + 1 == n;
            let (w, b) = match fold {
                Some(f) if last => f.apply(w.as_tensor(), b.as_tensor(), op.outputs_axis())?,
                _ => (w.as_tensor().clone(), b.as_tensor().clone()),
            };
            h = match op {
                Op::Dense => {
                    let (w, b) = (g.tensor("weight", &w)?, g.tensor("bias", &b)?);
                    let m = g.matmul(&h, &w);
                    g.add(&m, &b)
                }
                Op::Conv(k) => {
                    let w = g.tensor("conv_weight", &w)?;
                    let b = g.tensor("conv_bias", &b)?;
                    g.conv(&h, &w, Some(&b), k / 2)
                }
            };
            if !last {
                h = self.activation.emit(g, &h);
            }
        }
        Ok(h)
    }
}

/// A layer's weight of `shape` and bias of `outputs`: zeros, or uniform in ±1/√fan_in.
fn init(
    p: &Params,
    shape: impl Into<candle_core::Shape>,
    outputs: usize,
    fan_in: usize,
    zero: bool,
) -> Result<(Var, Var)> {
    if zero {
        return Ok((p.zeros("weight", shape)?, p.zeros("bias", outputs)?));
    }
    let bound = 1.0 / (fan_in as f64).sqrt();
    Ok((
        p.uniform("weight", shape, bound)?,
        p.uniform("bias", outputs, bound)?,
    ))
}

/// softplus(x) = log(1 + eˣ) = max(x, 0) + log(1 + e^(−|x|)), finite for any x (the naive form
/// overflows in float32 above x ≈ 88); what ONNX's `Softplus` computes in ONNX Runtime.
pub(crate) fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// `m[O, K] · x[n]` for every example: `x[N, K, S] → [N, O, S]`, as one 2-D matmul over
/// `[K, N·S]` (a broadcast batched matmul would sum an `[N, O, K]` gradient in backward).
pub fn channel_matmul(m: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (n, k, s) = x.dims3()?;
    let flat = x.transpose(0, 1)?.reshape((k, n * s))?;
    let o = m.dim(0)?;
    m.matmul(&flat)?
        .reshape((o, n, s))?
        .transpose(0, 1)?
        .contiguous()
}
