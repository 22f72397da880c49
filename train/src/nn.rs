//! The conditioner networks inside coupling layers: a multilayer perceptron whose candle
//! forward pass and ONNX emission sit side by side.

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

/// A fully connected network `sizes[0] → … → sizes[last]`.
pub struct Mlp {
    layers: Vec<(Var, Var)>,
    activation: Activation,
}

impl Mlp {
    /// Weights drawn as PyTorch's `Linear` does (uniform, bound 1/√fan_in); with
    /// `zero_last` the output layer starts at zero, so a coupling starts as the identity.
    pub fn new(
        p: &Params,
        sizes: &[usize],
        activation: Activation,
        zero_last: bool,
    ) -> Result<Self> {
        let mut layers = Vec::new();
        for (i, w) in sizes.windows(2).enumerate() {
            let (fan_in, fan_out) = (w[0], w[1]);
            let last = i + 2 == sizes.len();
            let bound = 1.0 / (fan_in as f64).sqrt();
            let layer = p.pp(format!("linear{i}"));
            let (weight, bias) = if last && zero_last {
                (
                    layer.zeros("weight", (fan_in, fan_out))?,
                    layer.zeros("bias", fan_out)?,
                )
            } else {
                (
                    layer.uniform("weight", (fan_in, fan_out), bound)?,
                    layer.uniform("bias", fan_out, bound)?,
                )
            };
            layers.push((weight, bias));
        }
        Ok(Mlp { layers, activation })
    }

    /// The network applied to rows `x[N, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            h = h.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            if i + 1 < self.layers.len() {
                h = self.activation.apply(&h)?;
            }
        }
        Ok(h)
    }

    /// The same network as ONNX nodes.
    pub fn emit(&self, g: &mut Graph, x: &Value) -> Result<Value> {
        let mut h = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            let w = g.tensor("weight", w.as_tensor())?;
            let b = g.tensor("bias", b.as_tensor())?;
            let m = g.matmul(&h, &w);
            h = g.add(&m, &b);
            if i + 1 < self.layers.len() {
                h = self.activation.emit(g, &h);
            }
        }
        Ok(h)
    }
}

/// Glow's coupling network on images: a 3×3 convolution, a 1×1 convolution (both followed
/// by the activation) and a 3×3 convolution, padded to keep the spatial size. With
/// `zero_last` the last convolution starts at zero, so a coupling starts as the identity.
pub struct ConvNet {
    layers: Vec<(Var, Var, usize)>,
    activation: Activation,
}

impl ConvNet {
    /// `channels_in → hidden → hidden → channels_out`, weights uniform in ±1/√fan_in.
    pub fn new(
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
            let bound = 1.0 / ((cin * k * k) as f64).sqrt();
            let (w, b) = if i == 2 && zero_last {
                (
                    layer.zeros("weight", (cout, cin, k, k))?,
                    layer.zeros("bias", cout)?,
                )
            } else {
                (
                    layer.uniform("weight", (cout, cin, k, k), bound)?,
                    layer.uniform("bias", cout, bound)?,
                )
            };
            layers.push((w, b, k));
        }
        Ok(ConvNet { layers, activation })
    }

    /// The network applied to `x[N, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (w, b, k)) in self.layers.iter().enumerate() {
            h = conv_same(&h, w.as_tensor(), *k)?.broadcast_add(&b.as_tensor().reshape((
                1,
                (),
                1,
                1,
            ))?)?;
            if i + 1 < self.layers.len() {
                h = self.activation.apply(&h)?;
            }
        }
        Ok(h)
    }

    /// The same network as ONNX `Conv` nodes.
    pub fn emit(&self, g: &mut Graph, x: &Value) -> Result<Value> {
        let mut h = x.clone();
        for (i, (w, b, k)) in self.layers.iter().enumerate() {
            let w = g.tensor("conv_weight", w.as_tensor())?;
            let b = g.tensor("conv_bias", b.as_tensor())?;
            h = g.conv(&h, &w, Some(&b), k / 2);
            if i + 1 < self.layers.len() {
                h = self.activation.emit(g, &h);
            }
        }
        Ok(h)
    }
}

/// A stride-1 "same" convolution of `x[N, C, H, W]` with `w[O, C, k, k]` (k odd) as im2col +
/// one batched matmul. candle's own conv2d backward (a naive transposed convolution) was
/// ~10× slower than this on the small images here; narrow, stack and matmul differentiate fast.
pub fn conv_same(x: &Tensor, w: &Tensor, k: usize) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    if k == 1 {
        return channel_matmul(&w.reshape((o, c))?, &x.reshape((n, c, h * wd))?)?
            .reshape((n, o, h, wd));
    }
    let pad = k / 2;
    let (hp, wp) = (h + 2 * pad, wd + 2 * pad);
    let xp = x
        .pad_with_zeros(2, pad, pad)?
        .pad_with_zeros(3, pad, pad)?
        .reshape((n * c, hp * wp))?;
    // One gather (its gradient is one index-add): column dy·k + dx of output pixel (y, x)
    // reads padded pixel (y + dy, x + dx).
    let mut idx = Vec::with_capacity(k * k * h * wd);
    for dy in 0..k {
        for dx in 0..k {
            for y in 0..h {
                for xx in 0..wd {
                    idx.push(((y + dy) * wp + xx + dx) as u32);
                }
            }
        }
    }
    let idx = Tensor::from_vec(idx, k * k * h * wd, x.device())?;
    // Column c·k² + dy·k + dx matches the kernel layout [O, C, k, k].
    let cols = xp.index_select(&idx, 1)?.reshape((n, c * k * k, h * wd))?;
    channel_matmul(&w.reshape((o, c * k * k))?, &cols)?.reshape((n, o, h, wd))
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
