//! The Yeo–Johnson power transform (Yeo & Johnson, 2000) as a fixed elementwise bijector:
//! it makes skewed, heavy-tailed features nearly Gaussian before the flow sees them, which
//! a MAF in one feature order (whose conditionals are Gaussian) cannot do by itself.
//!
//! With `L = ln(1 + |x|)` and `p = λ` for x ≥ 0, `p = 2 − λ` for x < 0 (written
//! `p = 1 + (λ − 1)·sign(x)`), the map is `ψ(x) = sign(x)·(e^{p·L} − 1)/p` and
//! `ln ψ'(x) = (p − 1)·L`. For λ in (0, 2) both branches are unbounded, so ψ is a bijection
//! of the real line and densities stay normalised; λ is fitted by maximum likelihood per
//! feature and kept inside [`LAMBDA_RANGE`], away from 0 and 2 where `(e^{pL} − 1)/p`
//! would lose digits in float32. The inverse is `x = sign(z)·((1 + p·|z|)^{1/p} − 1)`.

use candle_core::{Result, Tensor};

use super::{Bijector, Ctx, Dependence, LogDet};
use crate::onnx::{Graph, Value};

/// The λ a fit may choose: a bijection of ℝ needs (0, 2); the margins keep float32 exact
/// to about 1e-6.
pub const LAMBDA_RANGE: (f64, f64) = (0.05, 1.95);

/// `z = ψ_λ(x)` per feature, λ fixed.
pub struct YeoJohnson {
    lambda: Tensor,
}

impl YeoJohnson {
    /// The transform with one λ per feature, each inside [`LAMBDA_RANGE`].
    pub fn new(lambda: &[f32]) -> Result<Self> {
        let (lo, hi) = LAMBDA_RANGE;
        if lambda
            .iter()
            .any(|&l| !(lo as f32..=hi as f32).contains(&l))
        {
            candle_core::bail!("Yeo–Johnson λ must lie in [{lo}, {hi}]");
        }
        Ok(YeoJohnson {
            lambda: Tensor::new(lambda, &candle_core::Device::Cpu)?,
        })
    }

    /// The λ maximising the Gaussian profile likelihood of ψ_λ(`column`) over
    /// [`LAMBDA_RANGE`]: a grid, then golden-section refinement around its best point.
    pub fn fit(column: &[f64]) -> f64 {
        let (lo, hi) = LAMBDA_RANGE;
        let n = 40;
        let grid = |i: usize| lo + (hi - lo) * i as f64 / n as f64;
        let best = (0..=n)
            .max_by(|&a, &b| {
                profile_likelihood(column, grid(a)).total_cmp(&profile_likelihood(column, grid(b)))
            })
            .expect("non-empty grid");
        let (mut a, mut b) = (grid(best.saturating_sub(1)), grid((best + 1).min(n)));
        let phi = (5f64.sqrt() - 1.0) / 2.0;
        for _ in 0..40 {
            let (c, d) = (b - phi * (b - a), a + phi * (b - a));
            if profile_likelihood(column, c) >= profile_likelihood(column, d) {
                b = d;
            } else {
                a = c;
            }
        }
        (a + b) / 2.0
    }

    /// `[1, D]` λ and the per-element exponent `p = 1 + (λ − 1)·sign(v)`.
    fn exponent(&self, v: &Tensor) -> Result<Tensor> {
        let lambda = self.lambda.unsqueeze(0)?;
        v.sign()?
            .broadcast_mul(&lambda.affine(1.0, -1.0)?)?
            .affine(1.0, 1.0)
    }

    /// ψ(x) and ln ψ'(x) per element.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = self.exponent(x)?;
        let l = x.abs()?.affine(1.0, 1.0)?.log()?;
        let z = ((&p * &l)?.exp()?.affine(1.0, -1.0)? / &p)?;
        let z = (z * x.sign()?)?;
        let log_deriv = (p.affine(1.0, -1.0)? * l)?;
        Ok((z, log_deriv))
    }

    /// The graph of [`YeoJohnson::exponent`], for either direction (ψ keeps the sign):
    /// the constant 1, sign(v), p and |v|.
    fn emit_exponent(&self, g: &mut Graph, v: &Value) -> Result<(Value, Value, Value, Value)> {
        let one = g.scalar("one", 1.0);
        let lambda_minus_one = g.tensor(
            "yeo_johnson_lambda_minus_one",
            &self.lambda.affine(1.0, -1.0)?,
        )?;
        let sign = g.op("Sign", &[v], vec![]);
        let tilt = g.mul(&sign, &lambda_minus_one);
        let p = g.add(&tilt, &one);
        let abs = g.op("Abs", &[v], vec![]);
        Ok((one, sign, p, abs))
    }

    /// The graph of [`YeoJohnson::forward`].
    fn emit_forward(&self, g: &mut Graph, x: &Value) -> Result<(Value, Value)> {
        let (one, sign, p, abs) = self.emit_exponent(g, x)?;
        let shifted = g.add(&abs, &one);
        let l = g.op("Log", &[&shifted], vec![]);
        let pl = g.mul(&p, &l);
        let e = g.op("Exp", &[&pl], vec![]);
        let em1 = g.sub(&e, &one);
        let magnitude = g.div(&em1, &p);
        let z = g.mul(&magnitude, &sign);
        let p_minus_one = g.sub(&p, &one);
        let log_deriv = g.mul(&p_minus_one, &l);
        Ok((z, log_deriv))
    }
}

/// ψ_λ(v) in float64.
pub fn yeo_johnson(v: f64, lambda: f64) -> f64 {
    let p = if v >= 0.0 { lambda } else { 2.0 - lambda };
    v.signum() * (p * v.abs().ln_1p()).exp_m1() / p
}

/// The log-likelihood of a Gaussian fitted to ψ_λ(x), plus the log-Jacobian, up to a
/// constant: −n/2·ln σ̂² + Σ (p − 1)·ln(1 + |x|).
fn profile_likelihood(x: &[f64], lambda: f64) -> f64 {
    let n = x.len() as f64;
    let (mut sum, mut sum_sq, mut log_jac) = (0.0, 0.0, 0.0);
    for &v in x {
        let p = if v >= 0.0 { lambda } else { 2.0 - lambda };
        let l = v.abs().ln_1p();
        let z = yeo_johnson(v, lambda);
        sum += z;
        sum_sq += z * z;
        log_jac += (p - 1.0) * l;
    }
    let var = (sum_sq / n - (sum / n).powi(2)).max(1e-300);
    -0.5 * n * var.ln() + log_jac
}

impl Bijector for YeoJohnson {
    fn name(&self) -> &'static str {
        "yeo_johnson"
    }

    fn encode(&self, x: &Tensor, _: &Ctx) -> Result<(Tensor, Tensor)> {
        let (z, log_deriv) = self.forward(x)?;
        Ok((z, log_deriv.sum(1)?))
    }

    fn decode(&self, z: &Tensor, _: &Ctx) -> Result<Tensor> {
        let p = self.exponent(z)?;
        let base = (z.abs()? * &p)?.affine(1.0, 1.0)?;
        let magnitude = (base.log()? / &p)?.exp()?.affine(1.0, -1.0)?;
        magnitude * z.sign()?
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let (z, log_deriv) = self.emit_forward(g, x)?;
        Ok((z, LogDet::Rows(g.sum_per_row(&log_deriv, None))))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let (one, sign, p, abs) = self.emit_exponent(g, z)?;
        let scaled = g.mul(&abs, &p);
        let base = g.add(&scaled, &one);
        let log_base = g.op("Log", &[&base], vec![]);
        let root = g.div(&log_base, &p);
        let e = g.op("Exp", &[&root], vec![]);
        let magnitude = g.sub(&e, &one);
        Ok(g.mul(&magnitude, &sign))
    }

    fn dependence(&self) -> Dependence {
        Dependence::Elementwise
    }

    fn emit_encode_diagonal(&self, g: &mut Graph, x: &Value) -> Result<(Value, Value)> {
        self.emit_forward(g, x)
    }
}
