//! Monotonic rational-quadratic splines (Durkan et al., 2019, "Neural Spline Flows") as an
//! elementwise map: K bins on [−B, B] whose widths, heights and interior knot derivatives
//! come from 3K − 1 unconstrained parameters per element, and the identity outside (linear
//! tails of slope 1, so the map and its derivative are continuous at ±B).
//!
//! Widths and heights are softmaxes with a floor (each bin at least `MIN_BIN` of the
//! interval), interior derivatives softpluses with a floor, shifted so that zero parameters
//! give derivative 1: with every parameter zero the spline is the identity. The bin of a
//! value is found by comparing it with the knots and counting — written the same way in
//! candle and in ONNX (`GreaterOrEqual`, `ReduceSum`, a one-hot `Equal`), so any ONNX
//! Runtime runs it: no `searchsorted`, no custom operator. The inverse solves the bin's
//! quadratic in its numerically stable form.
//!
//! Values `x` have any shape `[N, ...]`; parameters `u` are `[N, ..., 3K − 1]` (widths, then
//! heights, then the K − 1 interior derivatives on the last axis).

use candle_core::{DType, Result, Tensor};

use crate::onnx::{Attr, Graph, Value};

/// The smallest share of the interval a bin may take, in width and in height.
pub const MIN_BIN: f64 = 1e-3;
/// The smallest derivative at an interior knot.
pub const MIN_DERIVATIVE: f64 = 1e-3;

/// A rational-quadratic spline with `bins` bins on `[-bound, bound]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RqSpline {
    /// K.
    pub bins: usize,
    /// B: the spline acts on [−B, B], the identity outside.
    pub bound: f64,
}

/// A spline's knots per element, each `[..., K + 1]`: x positions, y positions, derivatives.
struct Knots<T> {
    x: T,
    y: T,
    d: T,
}

/// The bin's quantities per element, each shaped like the values.
struct Bin<T> {
    x_lo: T,
    width: T,
    y_lo: T,
    height: T,
    d_lo: T,
    d_hi: T,
}

impl RqSpline {
    /// A spline of `bins` bins (at least 2) on `[-bound, bound]` (bound > 0).
    pub fn new(bins: usize, bound: f64) -> Result<RqSpline> {
        if bins < 2 || (bins as f64) * MIN_BIN >= 1.0 {
            candle_core::bail!(
                "a spline needs between 2 and {} bins, got {bins}",
                (1.0 / MIN_BIN) as usize - 1
            );
        }
        if !(bound.is_finite() && bound > 0.0) {
            candle_core::bail!("the spline's bound must be positive, got {bound}");
        }
        Ok(RqSpline { bins, bound })
    }

    /// Parameters per element: K widths, K heights, K − 1 interior derivatives.
    pub fn params(&self) -> usize {
        3 * self.bins - 1
    }

    /// softplus(u + c₀) with c₀ = log(e^{1−m} − 1), so that u = 0 gives derivative 1.
    fn derivative_shift() -> f64 {
        ((1.0 - MIN_DERIVATIVE).exp() - 1.0).ln()
    }

    /// `[K, K − 1]` with 1 where row ≤ column: bin fractions → the interior knots'
    /// cumulative shares (the edges are exactly −B and B, added apart).
    fn cumulative(&self) -> Vec<f32> {
        let k = self.bins;
        (0..k)
            .flat_map(|j| (0..k - 1).map(move |c| if j <= c { 1.0 } else { 0.0 }))
            .collect()
    }

    fn knots(&self, u: &Tensor) -> Result<Knots<Tensor>> {
        let k = self.bins;
        let last = u.rank() - 1;
        let (b, floor) = (self.bound, MIN_BIN);
        let fractions = |raw: &Tensor| -> Result<Tensor> {
            // Written out: candle_nn's fused softmax_last_dim has no backward pass (it would
            // leave widths and heights untrained). The max is a constant shift.
            let shifted = raw.broadcast_sub(&raw.max_keepdim(last)?.detach())?.exp()?;
            let soft = shifted.broadcast_div(&shifted.sum_keepdim(last)?)?;
            (soft * (1.0 - floor * k as f64))? + floor
        };
        let cum = Tensor::from_vec(self.cumulative(), (k, k - 1), u.device())?;
        let positions = |frac: &Tensor| -> Result<Tensor> {
            let interior = ((frac.broadcast_matmul(&cum)? * (2.0 * b))? - b)?;
            let edge = interior.narrow(last, 0, 1)?.ones_like()?;
            Tensor::cat(&[&(&edge * -b)?, &interior, &(&edge * b)?], last)
        };
        let x = positions(&fractions(&u.narrow(last, 0, k)?)?)?;
        let y = positions(&fractions(&u.narrow(last, k, k)?)?)?;
        let raw = (u.narrow(last, 2 * k, k - 1)? + Self::derivative_shift())?;
        let inner = (crate::nn::softplus(&raw)? + MIN_DERIVATIVE)?;
        let mut edge_shape = inner.dims().to_vec();
        edge_shape[last] = 1;
        let one = Tensor::ones(edge_shape, DType::F32, u.device())?;
        let d = Tensor::cat(&[&one, &inner, &one], last)?;
        Ok(Knots { x, y, d })
    }

    /// The knots' x positions per element, `[..., K + 1]` from −B to B, for parameters `u`
    /// (where bins begin and end: what tests probe, and what a person plotting the map
    /// wants).
    pub fn knot_positions(&self, u: &Tensor) -> Result<Tensor> {
        Ok(self.knots(u)?.x)
    }

    /// The bin of each value of `v` (clamped into [−B, B]) among `edges` (`[..., K + 1]`),
    /// as a one-hot `[..., K]`: the count of interior knots at or below the value.
    fn one_hot(&self, v: &Tensor, edges: &Tensor) -> Result<Tensor> {
        let k = self.bins;
        let last = edges.rank() - 1;
        let interior = edges.narrow(last, 1, k - 1)?;
        let count = v
            .unsqueeze(last)?
            .broadcast_ge(&interior)?
            .to_dtype(DType::F32)?
            .sum_keepdim(last)?;
        let index = Tensor::arange(0u32, k as u32, v.device())?.to_dtype(DType::F32)?;
        count.broadcast_eq(&index)?.to_dtype(DType::F32)
    }

    fn bin(&self, knots: &Knots<Tensor>, one_hot: &Tensor) -> Result<Bin<Tensor>> {
        let k = self.bins;
        let last = one_hot.rank() - 1;
        let pick = |t: &Tensor, from: usize| -> Result<Tensor> {
            t.narrow(last, from, k)?.mul(one_hot)?.sum(last)
        };
        let x_lo = pick(&knots.x, 0)?;
        let y_lo = pick(&knots.y, 0)?;
        Ok(Bin {
            width: (pick(&knots.x, 1)? - &x_lo)?,
            height: (pick(&knots.y, 1)? - &y_lo)?,
            x_lo,
            y_lo,
            d_lo: pick(&knots.d, 0)?,
            d_hi: pick(&knots.d, 1)?,
        })
    }

    /// 1 where `v` lies in [−B, B], else 0.
    fn inside(&self, v: &Tensor) -> Result<Tensor> {
        let b = self.bound;
        let ge = v.ge(-b)?.to_dtype(DType::F32)?;
        let le = v.le(b)?.to_dtype(DType::F32)?;
        ge.mul(&le)
    }

    /// `(y, log dy/dx)` per element of `x` under parameters `u`.
    pub fn forward(&self, x: &Tensor, u: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = self.bound;
        let knots = self.knots(u)?;
        let xc = x.clamp(-b, b)?;
        let bin = self.bin(&knots, &self.one_hot(&xc, &knots.x)?)?;
        let s = (&bin.height / &bin.width)?;
        let xi = ((&xc - &bin.x_lo)? / &bin.width)?;
        let one_minus = xi.affine(-1.0, 1.0)?;
        let xi1 = (&xi * &one_minus)?;
        let slopes = ((&bin.d_hi + &bin.d_lo)? - (&s * 2.0)?)?;
        let denom = (&s + (&slopes * &xi1)?)?;
        let numer = ((&s * xi.sqr()?)? + (&bin.d_lo * &xi1)?)?;
        let y = (&bin.y_lo + (&bin.height * numer)?.div(&denom)?)?;
        let dnum = (((&bin.d_hi * xi.sqr()?)? + ((&s * 2.0)? * &xi1)?)?
            + (&bin.d_lo * one_minus.sqr()?)?)?;
        let log_deriv = ((s.sqr()?.log()? + dnum.log()?)? - (denom.sqr()?.log()?))?;
        let inside = self.inside(x)?;
        let outside = inside.affine(-1.0, 1.0)?;
        let y = ((y * &inside)? + (x * &outside)?)?;
        Ok((y, (log_deriv * inside)?))
    }

    /// `x` from `y` under the same parameters.
    pub fn inverse(&self, y: &Tensor, u: &Tensor) -> Result<Tensor> {
        let b = self.bound;
        let knots = self.knots(u)?;
        let yc = y.clamp(-b, b)?;
        let bin = self.bin(&knots, &self.one_hot(&yc, &knots.y)?)?;
        let s = (&bin.height / &bin.width)?;
        let slopes = ((&bin.d_hi + &bin.d_lo)? - (&s * 2.0)?)?;
        let dy = (&yc - &bin.y_lo)?;
        let qa = ((&bin.height * (&s - &bin.d_lo)?)? + (&dy * &slopes)?)?;
        let qb = ((&bin.height * &bin.d_lo)? - (&dy * &slopes)?)?;
        let qc = (s.neg()? * &dy)?;
        // ξ = 2c / (−b − √(b² − 4ac)): no cancellation where a → 0.
        let disc = (qb.sqr()? - ((qa * 4.0)? * &qc)?)?.relu()?;
        let xi = ((qc * 2.0)? / (qb.neg()? - disc.sqrt()?)?)?;
        let x = (&bin.x_lo + (xi * &bin.width)?)?;
        let inside = self.inside(y)?;
        let outside = inside.affine(-1.0, 1.0)?;
        (x * &inside)? + (y * &outside)?
    }

    fn emit_knots(&self, g: &mut Graph, u: &Value) -> Knots<Value> {
        let k = self.bins;
        let (b, floor) = (self.bound, MIN_BIN);
        let last = -1i64;
        let cum = g.constant("spline_cumulative", &self.cumulative(), &[k, k - 1]);
        let pos_b = g.scalar("spline_right", b as f32);
        let zero = g.scalar("zero", 0.0);
        let scale = g.scalar("spline_bin_scale", (1.0 - floor * k as f64) as f32);
        let min_bin = g.scalar("spline_min_bin", floor as f32);
        let two_b = g.scalar("spline_width", (2.0 * b) as f32);
        let neg_b = g.scalar("spline_left", -b as f32);
        let positions = |g: &mut Graph, raw: &Value| -> Value {
            let soft = g.op("Softmax", &[raw], vec![("axis", Attr::Int(last))]);
            let scaled = g.mul(&soft, &scale);
            let frac = g.add(&scaled, &min_bin);
            let cumulative = g.matmul(&frac, &cum);
            let stretched = g.mul(&cumulative, &two_b);
            let interior = g.add(&stretched, &neg_b);
            // The edges exactly −B and B, shaped like one column.
            let first = g.slice(&interior, last, 0, 1);
            let zeroed = g.mul(&first, &zero);
            let left = g.add(&zeroed, &neg_b);
            let right = g.add(&zeroed, &pos_b);
            g.concat(&[&left, &interior, &right], last)
        };
        let uw = g.slice(u, last, 0, k);
        let uh = g.slice(u, last, k, 2 * k);
        let ud = g.slice(u, last, 2 * k, 3 * k - 1);
        let x = positions(g, &uw);
        let y = positions(g, &uh);
        let shift = g.scalar("spline_derivative_shift", Self::derivative_shift() as f32);
        let raw = g.add(&ud, &shift);
        let soft = g.op("Softplus", &[&raw], vec![]);
        let min_d = g.scalar("spline_min_derivative", MIN_DERIVATIVE as f32);
        let inner = g.add(&soft, &min_d);
        // The boundary derivatives (1): ones shaped like one column of `inner`.
        let first = g.slice(&inner, last, 0, 1);
        let one = g.scalar("one", 1.0);
        let zeroed = g.mul(&first, &zero);
        let ones = g.add(&zeroed, &one);
        let d = g.concat(&[&ones, &inner, &ones], last);
        Knots { x, y, d }
    }

    fn emit_bin(&self, g: &mut Graph, v: &Value, knots: &Knots<Value>, on_y: bool) -> Bin<Value> {
        let k = self.bins;
        let last = -1i64;
        let edges = if on_y { &knots.y } else { &knots.x };
        let interior = g.slice(edges, last, 1, k);
        let axes = g.constant_i64("axes", &[last], &[1]);
        let col = g.op("Unsqueeze", &[v, &axes], vec![]);
        let ge = g.op("GreaterOrEqual", &[&col, &interior], vec![]);
        let ge = g.op("Cast", &[&ge], vec![("to", Attr::Int(1))]);
        let count = g.op("ReduceSum", &[&ge, &axes], vec![("keepdims", Attr::Int(1))]);
        let index: Vec<f32> = (0..k).map(|i| i as f32).collect();
        let index = g.constant("spline_bin_index", &index, &[k]);
        let hit = g.op("Equal", &[&count, &index], vec![]);
        let one_hot = g.op("Cast", &[&hit], vec![("to", Attr::Int(1))]);
        let pick = |g: &mut Graph, t: &Value, from: usize| -> Value {
            let part = g.slice(t, last, from, from + k);
            let masked = g.mul(&part, &one_hot);
            g.op(
                "ReduceSum",
                &[&masked, &axes],
                vec![("keepdims", Attr::Int(0))],
            )
        };
        let x_lo = pick(g, &knots.x, 0);
        let x_hi = pick(g, &knots.x, 1);
        let y_lo = pick(g, &knots.y, 0);
        let y_hi = pick(g, &knots.y, 1);
        let d_lo = pick(g, &knots.d, 0);
        let d_hi = pick(g, &knots.d, 1);
        Bin {
            width: g.sub(&x_hi, &x_lo),
            height: g.sub(&y_hi, &y_lo),
            x_lo,
            y_lo,
            d_lo,
            d_hi,
        }
    }

    /// `(clamped v, inside, outside)`: v clamped into [−B, B], and the 0/1 masks.
    fn emit_range(&self, g: &mut Graph, v: &Value) -> (Value, Value, Value) {
        let lo = g.scalar("spline_left", -self.bound as f32);
        let hi = g.scalar("spline_right", self.bound as f32);
        let clamped = g.op("Clip", &[v, &lo, &hi], vec![]);
        let ge = g.op("GreaterOrEqual", &[v, &lo], vec![]);
        let le = g.op("LessOrEqual", &[v, &hi], vec![]);
        let both = g.op("And", &[&ge, &le], vec![]);
        let inside = g.op("Cast", &[&both], vec![("to", Attr::Int(1))]);
        let one = g.scalar("one", 1.0);
        let outside = g.sub(&one, &inside);
        (clamped, inside, outside)
    }

    /// [`RqSpline::forward`] as ONNX nodes.
    pub fn emit_forward(&self, g: &mut Graph, x: &Value, u: &Value) -> (Value, Value) {
        let knots = self.emit_knots(g, u);
        let (xc, inside, outside) = self.emit_range(g, x);
        let bin = self.emit_bin(g, &xc, &knots, false);
        let s = g.div(&bin.height, &bin.width);
        let offset = g.sub(&xc, &bin.x_lo);
        let xi = g.div(&offset, &bin.width);
        let one = g.scalar("one", 1.0);
        let two = g.scalar("two", 2.0);
        let one_minus = g.sub(&one, &xi);
        let xi1 = g.mul(&xi, &one_minus);
        let xi2 = g.mul(&xi, &xi);
        let d_sum = g.add(&bin.d_hi, &bin.d_lo);
        let s2 = g.mul(&s, &two);
        let slopes = g.sub(&d_sum, &s2);
        let t = g.mul(&slopes, &xi1);
        let denom = g.add(&s, &t);
        let a = g.mul(&s, &xi2);
        let c = g.mul(&bin.d_lo, &xi1);
        let numer = g.add(&a, &c);
        let hn = g.mul(&bin.height, &numer);
        let frac = g.div(&hn, &denom);
        let y = g.add(&bin.y_lo, &frac);
        let p = g.mul(&bin.d_hi, &xi2);
        let q = g.mul(&s2, &xi1);
        let om2 = g.mul(&one_minus, &one_minus);
        let r = g.mul(&bin.d_lo, &om2);
        let pq = g.add(&p, &q);
        let dnum = g.add(&pq, &r);
        let ss = g.mul(&s, &s);
        let dd = g.mul(&denom, &denom);
        let top = g.mul(&ss, &dnum);
        let ratio = g.div(&top, &dd);
        let log_deriv = g.op("Log", &[&ratio], vec![]);
        let y_in = g.mul(&y, &inside);
        let x_out = g.mul(x, &outside);
        let y = g.add(&y_in, &x_out);
        (y, g.mul(&log_deriv, &inside))
    }

    /// [`RqSpline::inverse`] as ONNX nodes.
    pub fn emit_inverse(&self, g: &mut Graph, y: &Value, u: &Value) -> Value {
        let knots = self.emit_knots(g, u);
        let (yc, inside, outside) = self.emit_range(g, y);
        let bin = self.emit_bin(g, &yc, &knots, true);
        let s = g.div(&bin.height, &bin.width);
        let two = g.scalar("two", 2.0);
        let four = g.scalar("four", 4.0);
        let d_sum = g.add(&bin.d_hi, &bin.d_lo);
        let s2 = g.mul(&s, &two);
        let slopes = g.sub(&d_sum, &s2);
        let dy = g.sub(&yc, &bin.y_lo);
        let s_minus = g.sub(&s, &bin.d_lo);
        let ha = g.mul(&bin.height, &s_minus);
        let dys = g.mul(&dy, &slopes);
        let qa = g.add(&ha, &dys);
        let hd = g.mul(&bin.height, &bin.d_lo);
        let qb = g.sub(&hd, &dys);
        let sdy = g.mul(&s, &dy);
        let qc = g.neg(&sdy);
        let bb = g.mul(&qb, &qb);
        let ac = g.mul(&qa, &qc);
        let ac4 = g.mul(&ac, &four);
        let disc = g.sub(&bb, &ac4);
        let disc = g.op("Relu", &[&disc], vec![]);
        let root = g.op("Sqrt", &[&disc], vec![]);
        let nb = g.neg(&qb);
        let den = g.sub(&nb, &root);
        let c2 = g.mul(&qc, &two);
        let xi = g.div(&c2, &den);
        let scaled = g.mul(&xi, &bin.width);
        let x = g.add(&bin.x_lo, &scaled);
        let x_in = g.mul(&x, &inside);
        let y_out = g.mul(y, &outside);
        g.add(&x_in, &y_out)
    }
}

/// Unconstrained parameters laid out as a conditioner gives them — `[N, P·n]` rows or
/// `[N, P·C, H, W]` images, parameter block j in columns (channels) j·n..(j + 1)·n — as
/// `[N, n, P]` or `[N, C, H, W, P]`.
pub fn params_last(h: &Tensor, p: usize) -> Result<Tensor> {
    let dims = h.dims().to_vec();
    let n = dims[1] / p;
    let mut shape = vec![dims[0], p, n];
    shape.extend_from_slice(&dims[2..]);
    let split = h.reshape(shape)?;
    let rank = split.rank();
    let mut order: Vec<usize> = (0..rank).filter(|&a| a != 1).collect();
    order.push(1);
    split.permute(order)?.contiguous()
}

/// [`params_last`] as ONNX nodes, for values of `rank` (2: rows, 4: images) with `n`
/// elements (or channels) per block and `spatial` trailing sizes.
pub fn emit_params_last(g: &mut Graph, h: &Value, p: usize, n: usize, spatial: &[usize]) -> Value {
    let mut shape = vec![0i64, p as i64, n as i64];
    shape.extend(spatial.iter().map(|&s| s as i64));
    let split = g.reshape(h, &shape);
    let rank = shape.len();
    let mut order: Vec<usize> = (0..rank).filter(|&a| a != 1).collect();
    order.push(1);
    g.transpose(&split, &order)
}
