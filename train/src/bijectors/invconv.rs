//! Invertible 1×1 convolution (Glow §3.2): every pixel's channel vector is multiplied by a
//! learned `C × C` matrix W, initialised as a random rotation. log|det| = (H·W)·log|det W|.
//!
//! Two parameterisations:
//! - **plain**: W itself; log|det W| and W⁻¹ come from an f64 LU decomposition, and the
//!   gradient of log|det W| is W⁻ᵀ (put into autodiff by a surrogate whose value is the
//!   f64 log-det and whose derivative is W⁻ᵀ — candle has no determinant op).
//! - **LU**: `W = P·L·(U + diag(sign·exp(log_s)))` with P fixed, L unit lower triangular and
//!   U strictly upper triangular: log|det W| = Σ log_s, O(C) instead of O(C³).
//!
//! Decode and the exported decode use W⁻¹ computed in f64 (no matrix inverse in the graph).

use candle_core::{DType, Device, Result, Tensor, Var};

use super::{constant_rows, Bijector, Ctx, LogDet};
use crate::linalg;
use crate::onnx::{Graph, Value};
use crate::params::Params;

enum Weight {
    Plain(Var),
    Lu {
        p: Tensor,
        lower: Var,
        upper: Var,
        log_s: Var,
        sign: Tensor,
        lower_mask: Tensor,
        upper_mask: Tensor,
    },
}

/// A learned invertible channel mixing, applied at every pixel.
pub struct InvConv1x1 {
    weight: Weight,
    channels: usize,
    /// Pixels per example (H·W; 1 for `[N, C]` rows).
    spatial: usize,
}

fn f64_tensor(v: &[f64], n: usize) -> Result<Tensor> {
    Tensor::from_vec(v.iter().map(|&x| x as f32).collect(), (n, n), &Device::Cpu)
}

fn triangle_mask(n: usize, lower: bool) -> Result<Tensor> {
    let m: Vec<f32> = (0..n * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            if (lower && r > c) || (!lower && r < c) {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(m, (n, n), &Device::Cpu)
}

impl InvConv1x1 {
    /// A 1×1 convolution over `channels` with `spatial` pixels per example, W initialised as
    /// a rotation drawn from `seed`; `lu` selects the LU parameterisation.
    pub fn new(p: &Params, channels: usize, spatial: usize, lu: bool, seed: u64) -> Result<Self> {
        let n = channels;
        let q = linalg::random_rotation(n, seed);
        let weight = if lu {
            let f = linalg::lu(&q, n).expect("a rotation is invertible");
            let diag: Vec<f64> = (0..n).map(|i| f.u[i * n + i]).collect();
            let strict_upper: Vec<f64> = (0..n * n)
                .map(|i| if i / n < i % n { f.u[i] } else { 0.0 })
                .collect();
            let strict_lower: Vec<f64> = (0..n * n)
                .map(|i| if i / n > i % n { f.l[i] } else { 0.0 })
                .collect();
            let dev = &Device::Cpu;
            Weight::Lu {
                p: f64_tensor(&linalg::permutation_matrix(&f.perm), n)?,
                lower: p.init("lower", f64_tensor(&strict_lower, n)?)?,
                upper: p.init("upper", f64_tensor(&strict_upper, n)?)?,
                log_s: p.init(
                    "log_s",
                    Tensor::new(
                        diag.iter().map(|d| d.abs().ln() as f32).collect::<Vec<_>>(),
                        dev,
                    )?,
                )?,
                sign: Tensor::new(
                    diag.iter()
                        .map(|d| if *d < 0.0 { -1f32 } else { 1.0 })
                        .collect::<Vec<_>>(),
                    dev,
                )?,
                lower_mask: triangle_mask(n, true)?,
                upper_mask: triangle_mask(n, false)?,
            }
        } else {
            Weight::Plain(p.init("weight", f64_tensor(&q, n)?)?)
        };
        Ok(InvConv1x1 {
            weight,
            channels,
            spatial,
        })
    }

    /// W as a (differentiable) `[C, C]` tensor.
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Plain(w) => Ok(w.as_tensor().clone()),
            Weight::Lu {
                p,
                lower,
                upper,
                log_s,
                sign,
                lower_mask,
                upper_mask,
            } => {
                let n = self.channels;
                let eye = Tensor::eye(n, DType::F32, &Device::Cpu)?;
                let l = (lower.as_tensor().mul(lower_mask)? + &eye)?;
                let diag = eye.broadcast_mul(&(log_s.as_tensor().exp()? * sign)?.unsqueeze(0)?)?;
                let u = (upper.as_tensor().mul(upper_mask)? + diag)?;
                p.matmul(&l)?.matmul(&u)
            }
        }
    }

    fn weight_f64(&self) -> Result<Vec<f64>> {
        Ok(self
            .weight()?
            .detach()
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    }

    /// log|det W| (a scalar tensor), differentiable in the parameters.
    pub fn log_abs_det_weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Lu { log_s, .. } => log_s.as_tensor().sum_all(),
            Weight::Plain(w) => {
                let n = self.channels;
                let wf = self.weight_f64()?;
                let value = linalg::log_abs_det(&wf, n);
                let inv = linalg::inverse(&wf, n)
                    .ok_or_else(|| candle_core::Error::Msg("singular 1×1 convolution".into()))?;
                // d log|det W| / dW = W⁻ᵀ: sum(W ⊙ W⁻ᵀ) has that gradient; subtract its value.
                let inv_t = f64_tensor(&inv, n)?.t()?;
                let surrogate = w.as_tensor().mul(&inv_t)?.sum_all()?;
                let offset = value - surrogate.to_scalar::<f32>()? as f64;
                surrogate + offset
            }
        }
    }

    /// W⁻¹, computed in f64.
    pub fn inverse_weight(&self) -> Result<Tensor> {
        let inv = linalg::inverse(&self.weight_f64()?, self.channels)
            .ok_or_else(|| candle_core::Error::Msg("singular 1×1 convolution".into()))?;
        f64_tensor(&inv, self.channels)
    }

    /// `m · x` at every pixel of `x` (`[N, C, ...]`).
    fn mix(&self, m: &Tensor, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let flat = x.reshape((dims[0], self.channels, ()))?;
        crate::nn::channel_matmul(m, &flat)?.reshape(dims)
    }

    fn emit_mix(&self, g: &mut Graph, hint: &str, m: &Tensor, x: &Value) -> Result<Value> {
        if self.spatial == 1 {
            let wt = g.tensor(hint, &m.t()?.contiguous()?)?;
            Ok(g.matmul(x, &wt))
        } else {
            let k = g.tensor(hint, &m.reshape((self.channels, self.channels, 1, 1))?)?;
            Ok(g.conv(x, &k, None, 0))
        }
    }
}

impl Bijector for InvConv1x1 {
    fn name(&self) -> &'static str {
        if self.spatial == 1 {
            "lu_linear"
        } else {
            "invconv1x1"
        }
    }

    fn encode(&self, x: &Tensor, _: &Ctx) -> Result<(Tensor, Tensor)> {
        let z = self.mix(&self.weight()?, x)?;
        let ld = (self.log_abs_det_weight()? * self.spatial as f64)?;
        Ok((z, constant_rows(x, &ld)?))
    }

    fn decode(&self, z: &Tensor, _: &Ctx) -> Result<Tensor> {
        self.mix(&self.inverse_weight()?, z)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let w = self.weight()?.detach();
        let z = self.emit_mix(g, "invconv_weight", &w, x)?;
        let ld = linalg::log_abs_det(&self.weight_f64()?, self.channels) * self.spatial as f64;
        Ok((z, LogDet::Const(ld)))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let inv = self.inverse_weight()?;
        self.emit_mix(g, "invconv_inverse_weight", &inv, z)
    }
}
