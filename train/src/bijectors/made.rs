//! MADE (Germain et al., 2015) as a Gaussian autoregressive bijector — MAF's building block.
//!
//! Masks come from connectivity degrees: input i has degree 1 + its position in `order`,
//! hidden units draw degrees in [min of the layer below, D − 1] from a seeded RNG (so every
//! unit connects), and output i only sees hidden units of degree < degree(i). Hence μᵢ and
//! αᵢ depend only on inputs earlier in the order. MAF's convention:
//! encode (data → latent) `zᵢ = (xᵢ − μᵢ(x₍<ᵢ₎)) · exp(−αᵢ)` is one pass; decode is
//! sequential, D passes, each fixing one more coordinate. α is bounded, α = c·tanh(h/c).
//!
//! Order- and connectivity-agnostic training (MADE §4.2): one set of weights, many mask
//! sets. [`Ctx::mask_set`] picks mask set k — a seeded input order and/or seeded hidden
//! degrees — so the trainer can draw one per minibatch and the evaluator can average
//! densities over several. Mask set 0 is the configured order: the one exported.
//!
//! The transform of each feature given its conditioner outputs is [`Transform::Affine`]
//! (MAF's Gaussian: μᵢ, αᵢ) or [`Transform::Spline`] (a rational-quadratic spline per
//! feature with 3K − 1 outputs: the autoregressive neural spline flow). The output layer
//! gives every feature its block of outputs; the masks repeat the feature's degree for each.
//!
//! A conditional MADE adds `c·Vₗ` to every layer's pre-activation, hidden and output
//! alike, with unmasked context weights `Vₗ`: the context reaches every unit — even the
//! first feature's μ and α, which see no hidden unit — and never an input of the wrong
//! degree, so the masks stay autoregressive in x for every c.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor, Var};
use flowpack::Cost;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::spline::{emit_params_last, params_last, RqSpline};
use super::{Bijector, Ctx, Dependence, LogDet};
use crate::nn::Activation;
use crate::onnx::{Graph, Value};
use crate::params::Params;

/// How each feature is transformed given its conditioner's outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    /// `zᵢ = (xᵢ − μᵢ)·exp(−αᵢ)` with `α = c·tanh(h/c)` (MAF).
    Affine {
        /// The bound `c` on |α|.
        clamp: f64,
    },
    /// `zᵢ = splineᵢ(xᵢ)`, the spline's 3K − 1 parameters from the conditioner.
    Spline(RqSpline),
}

impl Transform {
    /// Conditioner outputs per feature.
    fn outputs(self) -> usize {
        match self {
            Transform::Affine { .. } => 2,
            Transform::Spline(s) => s.params(),
        }
    }
}

/// A masked autoregressive bijector.
pub struct Made {
    dim: usize,
    hidden: Vec<usize>,
    layers: Vec<(Var, Var)>,
    /// Per layer, the unmasked context weights `[K, width]` (empty when unconditional).
    context: Vec<Var>,
    activation: Activation,
    transform: Transform,
    base_order: Vec<usize>,
    seed: u64,
    agnostic: Agnostic,
    /// Added to every mask set asked for (see [`Made::rebased`]).
    offset: u64,
    /// Mask set 0, always at hand.
    first: Arc<Masks>,
    /// The last other mask set built (training draws one per step; rebuilding only when it
    /// changes).
    last: Mutex<Option<(u64, Arc<Masks>)>>,
}

/// A layer's masked weight and its bias (`[N, width]` when the context term is folded in).
type EmittedLayer = (Value, Value);

/// An affine MADE's `(μ, α = c·tanh(h))` from its folded output layer `h` (μ ‖ h/c).
fn emit_mu_alpha(g: &mut Graph, h: &Value, clamp: f64) -> (Value, Value) {
    let (mu, raw) = g.halves(h, 1);
    let c = g.scalar("clamp", clamp as f32);
    let th = g.tanh(&raw);
    (mu, g.mul(&th, &c))
}

/// Which parts of the connectivity mask sets k ≥ 1 redraw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Agnostic {
    /// A seeded random input order per mask set.
    pub order: bool,
    /// Seeded random hidden degrees per mask set.
    pub connectivity: bool,
}

/// One mask set: the input order and the per-layer masks.
struct Masks {
    order: Vec<usize>,
    layers: Vec<Tensor>,
}

/// Connectivity degrees: inputs from `order`, hidden layers drawn from `seed`.
pub fn degrees(order: &[usize], hidden: &[usize], seed: u64) -> (Vec<usize>, Vec<Vec<usize>>) {
    let d = order.len();
    let mut input = vec![0; d];
    for (pos, &i) in order.iter().enumerate() {
        input[i] = pos + 1;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut layers = Vec::new();
    let mut low = 1;
    for &h in hidden {
        let top = d.saturating_sub(1).max(1);
        let layer: Vec<usize> = (0..h)
            .map(|_| rng.random_range(low.min(top)..=top))
            .collect();
        low = *layer.iter().min().unwrap_or(&1);
        layers.push(layer);
    }
    (input, layers)
}

fn mask(from: &[usize], to: &[usize], strict: bool) -> Result<Tensor> {
    let data: Vec<f32> = from
        .iter()
        .flat_map(|&a| {
            to.iter().map(move |&b| {
                if (strict && b > a) || (!strict && b >= a) {
                    1.0
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (from.len(), to.len()), &Device::Cpu)
}

/// The masks of every layer (hidden layers, then the output: `per_feature` blocks of one
/// output per feature) for an order and the hidden degrees drawn from `seed`.
fn masks(order: &[usize], hidden: &[usize], seed: u64, per_feature: usize) -> Result<Vec<Tensor>> {
    let (input, hidden_deg) = degrees(order, hidden, seed);
    let mut degs = vec![input.clone()];
    degs.extend(hidden_deg);
    let mut out = Vec::new();
    for l in 0..hidden.len() {
        out.push(mask(&degs[l], &degs[l + 1], false)?);
    }
    // Output: each block has one output per feature, seeing hidden units of strictly lower
    // degree than the feature.
    let out_deg: Vec<usize> = (0..per_feature)
        .flat_map(|_| input.iter().copied())
        .collect();
    out.push(mask(degs.last().expect("input degrees"), &out_deg, true)?);
    Ok(out)
}

impl Made {
    /// A MADE over `dim` features with the given hidden widths transforming each feature by
    /// `transform`; `order[k]` is the feature that comes k-th; hidden degrees are drawn from
    /// `seed`; `context` context values per row feed every layer (0: unconditional). The
    /// output layer starts at zero, so the bijector starts as the identity.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &Params,
        dim: usize,
        hidden: &[usize],
        activation: Activation,
        order: Vec<usize>,
        transform: Transform,
        seed: u64,
        context: usize,
    ) -> Result<Self> {
        if order.len() != dim || {
            let mut o = order.clone();
            o.sort_unstable();
            o != (0..dim).collect::<Vec<_>>()
        } {
            candle_core::bail!("the MADE order must be a permutation of 0..{dim}");
        }
        let mut widths = vec![dim];
        widths.extend(hidden);
        widths.push(transform.outputs() * dim);
        let mut layers = Vec::new();
        let mut context_weights = Vec::new();
        for l in 0..widths.len() - 1 {
            let lp = p.pp(format!("masked{l}"));
            let (i, o) = (widths[l], widths[l + 1]);
            // The output layer starts at zero, so the bijector starts as the identity.
            let last = l + 2 == widths.len();
            layers.push(if !last {
                let bound = 1.0 / (i as f64).sqrt();
                (
                    lp.uniform("weight", (i, o), bound)?,
                    lp.uniform("bias", o, bound)?,
                )
            } else {
                (lp.zeros("weight", (i, o))?, lp.zeros("bias", o)?)
            });
            if context > 0 {
                context_weights.push(if last {
                    lp.zeros("context_weight", (context, o))?
                } else {
                    let bound = 1.0 / (context as f64).sqrt();
                    lp.uniform("context_weight", (context, o), bound)?
                });
            }
        }
        let first = Arc::new(Masks {
            layers: masks(&order, hidden, seed, transform.outputs())?,
            order: order.clone(),
        });
        Ok(Made {
            dim,
            hidden: hidden.to_vec(),
            layers,
            context: context_weights,
            activation,
            transform,
            base_order: order,
            seed,
            agnostic: Agnostic::default(),
            offset: 0,
            first,
            last: Mutex::new(None),
        })
    }

    /// Makes mask sets k ≥ 1 redraw the order and/or the hidden degrees.
    pub fn agnostic(mut self, agnostic: Agnostic) -> Self {
        self.agnostic = agnostic;
        self
    }

    /// Uses mask set `k` where it used 0 (and `k + j` where it used `j`): evaluation with
    /// [`Ctx::EVAL`] and the export then see mask set `k` (to check that any set is a
    /// bijector with a faithful ONNX twin).
    pub fn rebased(mut self, k: u64) -> Self {
        self.offset = k;
        self
    }

    /// Mask set `k`: 0 is the configured order and degrees; k ≥ 1 draws what
    /// [`Made::agnostic`] allows from (seed, k), the same set for the same k every time.
    fn masks(&self, k: u64) -> Result<Arc<Masks>> {
        // Without agnostic training every set is set 0.
        let k = if self.agnostic == Agnostic::default() {
            0
        } else {
            k.wrapping_add(self.offset)
        };
        if k == 0 {
            return Ok(self.first.clone());
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((set, m)) = last.as_ref() {
            if *set == k {
                return Ok(m.clone());
            }
        }
        let mix = crate::seeds::mask_set(self.seed, k);
        let mut order = self.base_order.clone();
        if self.agnostic.order {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix));
        }
        let degree_seed = if self.agnostic.connectivity {
            crate::seeds::mask_set_degrees(mix)
        } else {
            self.seed
        };
        let m = Arc::new(Masks {
            layers: masks(&order, &self.hidden, degree_seed, self.transform.outputs())?,
            order,
        });
        *last = Some((k, m.clone()));
        Ok(m)
    }

    /// The feature order of mask set `k`.
    pub fn order(&self, k: u64) -> Result<Vec<usize>> {
        Ok(self.masks(k)?.order.clone())
    }

    /// The weights with the masks of set `k` applied.
    fn masked_weights(&self, k: u64) -> Result<Vec<(Tensor, Tensor)>> {
        let m = self.masks(k)?;
        self.layers
            .iter()
            .zip(&m.layers)
            .map(|((w, b), m)| Ok((w.as_tensor().mul(m)?, b.as_tensor().clone())))
            .collect()
    }

    /// Context values per row this MADE takes (0: unconditional).
    pub fn context_width(&self) -> usize {
        self.context.first().map_or(0, |v| v.dims()[0])
    }

    /// `(μ, α)` of an affine MADE for rows `x` under mask set `k` and context `c` (`[N, K]`,
    /// for a conditional MADE): each depends only on the features before it in that set's
    /// order.
    pub fn conditionals(&self, x: &Tensor, k: u64, c: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let Transform::Affine { clamp } = self.transform else {
            candle_core::bail!("a spline MADE has no (μ, α): its outputs are spline parameters");
        };
        let h = self.outputs(x, k, c)?;
        let mu = h.narrow(1, 0, self.dim)?;
        let alpha = ((h.narrow(1, self.dim, self.dim)? / clamp)?.tanh()? * clamp)?;
        Ok((mu, alpha))
    }

    /// The output layer for rows `x` under mask set `k` and context `c`: `[N, P·D]`, block
    /// j holding output j of every feature.
    fn outputs(&self, x: &Tensor, k: u64, c: Option<&Tensor>) -> Result<Tensor> {
        let weights = self.masked_weights(k)?;
        let mut h = x.clone();
        for (i, (w, b)) in weights.iter().enumerate() {
            h = h.matmul(w)?.broadcast_add(b)?;
            if let (Some(c), Some(v)) = (c, self.context.get(i)) {
                h = (h + c.matmul(v.as_tensor())?)?;
            }
            if i + 1 < weights.len() {
                h = self.activation.apply(&h)?;
            }
        }
        Ok(h)
    }

    /// `(z, log|∂zᵢ/∂xᵢ|)` per feature for rows `x` under mask set `k` and context `c`.
    fn transform_rows(&self, x: &Tensor, k: u64, c: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        match self.transform {
            Transform::Affine { .. } => {
                let (mu, alpha) = self.conditionals(x, k, c)?;
                Ok(((x - mu)?.mul(&alpha.neg()?.exp()?)?, alpha.neg()?))
            }
            Transform::Spline(s) => {
                let u = params_last(&self.outputs(x, k, c)?, s.params())?;
                s.forward(x, &u)
            }
        }
    }

    /// The masked weights of mask set 0 as graph constants, emitted once and shared by
    /// every pass.
    /// An affine MADE's α columns are divided by the clamp here, so the graph computes
    /// `c·tanh(h)` without a division node.
    fn emit_weights(&self, g: &mut Graph) -> Result<Vec<EmittedLayer>> {
        let mut weights = self.masked_weights(0)?;
        let mut context: Vec<Tensor> = self.context.iter().map(|v| v.as_tensor().clone()).collect();
        let clamp = match self.transform {
            Transform::Affine { clamp } => Some(clamp),
            Transform::Spline(_) => None,
        };
        if let (Some(clamp), Some((w, b))) = (clamp, weights.last_mut()) {
            let d = self.dim;
            let scale: Vec<f32> = (0..2 * d)
                .map(|j| if j < d { 1.0 } else { (1.0 / clamp) as f32 })
                .collect();
            let scale = Tensor::from_vec(scale, 2 * d, &Device::Cpu)?;
            *w = w.broadcast_mul(&scale.unsqueeze(0)?)?;
            *b = b.mul(&scale)?;
            if let Some(v) = context.last_mut() {
                *v = v.broadcast_mul(&scale.unsqueeze(0)?)?;
            }
        }
        let c = g.context_for(self.context_width())?;
        let mut context = context.into_iter();
        weights
            .iter()
            .map(|(w, b)| {
                let w = g.tensor("masked_weight", w)?;
                let mut b = g.tensor("bias", b)?;
                // The context term does not change between sequential passes: computed once.
                if let (Some(c), Some(v)) = (&c, context.next()) {
                    let v = g.tensor("context_weight", &v)?;
                    let cv = g.matmul(c, &v);
                    b = g.add(&cv, &b);
                }
                Ok((w, b))
            })
            .collect()
    }

    /// The output layer as ONNX nodes (with an affine MADE's fold applied).
    fn emit_outputs(&self, g: &mut Graph, weights: &[EmittedLayer], x: &Value) -> Value {
        let mut h = x.clone();
        for (i, (w, b)) in weights.iter().enumerate() {
            let m = g.matmul(&h, w);
            h = g.add(&m, b);
            if i + 1 < weights.len() {
                h = self.activation.emit(g, &h);
            }
        }
        h
    }

    /// `(z, log|∂zᵢ/∂xᵢ|)` as ONNX nodes.
    fn emit_transform(&self, g: &mut Graph, weights: &[EmittedLayer], x: &Value) -> (Value, Value) {
        let h = self.emit_outputs(g, weights, x);
        match self.transform {
            Transform::Affine { clamp } => {
                let (mu, alpha) = emit_mu_alpha(g, &h, clamp);
                let centred = g.sub(x, &mu);
                let na = g.neg(&alpha);
                let e = g.exp(&na);
                (g.mul(&centred, &e), na)
            }
            Transform::Spline(s) => {
                let u = emit_params_last(g, &h, s.params(), self.dim, &[]);
                s.emit_forward(g, x, &u)
            }
        }
    }

    /// One pass of the sequential inverse as ONNX nodes: `x` from `z` given the current
    /// estimate `x` (exact for one more feature each pass).
    fn emit_inverse_pass(
        &self,
        g: &mut Graph,
        weights: &[EmittedLayer],
        z: &Value,
        x: &Value,
    ) -> Value {
        let h = self.emit_outputs(g, weights, x);
        match self.transform {
            Transform::Affine { clamp } => {
                let (mu, alpha) = emit_mu_alpha(g, &h, clamp);
                let e = g.exp(&alpha);
                let scaled = g.mul(z, &e);
                g.add(&scaled, &mu)
            }
            Transform::Spline(s) => {
                let u = emit_params_last(g, &h, s.params(), self.dim, &[]);
                s.emit_inverse(g, z, &u)
            }
        }
    }
}

impl Bijector for Made {
    fn name(&self) -> &'static str {
        "made"
    }

    fn cost(&self) -> [Cost; 2] {
        [Cost::OnePass, Cost::Sequential]
    }

    fn encode(&self, x: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        let c = cx.context_for(self.context_width(), x.dim(0)?)?;
        let (z, diagonal) = self.transform_rows(x, cx.mask_set, c)?;
        Ok((z, diagonal.sum(1)?))
    }

    fn decode(&self, z: &Tensor, cx: &Ctx) -> Result<Tensor> {
        let c = cx.context_for(self.context_width(), z.dim(0)?)?;
        let mut x = Tensor::zeros(z.dims(), DType::F32, z.device())?;
        for _ in 0..self.dim {
            x = match self.transform {
                Transform::Affine { .. } => {
                    let (mu, alpha) = self.conditionals(&x, cx.mask_set, c)?;
                    (z.mul(&alpha.exp()?)? + mu)?
                }
                Transform::Spline(s) => {
                    let u = params_last(&self.outputs(&x, cx.mask_set, c)?, s.params())?;
                    s.inverse(z, &u)?
                }
            };
        }
        Ok(x)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let (z, diagonal) = self.emit_encode_diagonal(g, x)?;
        Ok((z, LogDet::Rows(g.sum_per_row(&diagonal, Some(2)))))
    }

    /// zᵢ depends on the features up to i in the exported mask set's order.
    fn dependence(&self) -> Dependence {
        match self.order(0) {
            Ok(order) => Dependence::Autoregressive(order),
            Err(e) => Dependence::Mixing(format!("made masks: {e}")),
        }
    }

    /// log|∂zᵢ/∂xᵢ|: −αᵢ, or the spline's log-derivative.
    fn emit_encode_diagonal(&self, g: &mut Graph, x: &Value) -> Result<(Value, Value)> {
        let weights = self.emit_weights(g)?;
        Ok(self.emit_transform(g, &weights, x))
    }

    /// D passes unrolled (weights shared): graph size grows with D, run time is D passes.
    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let weights = self.emit_weights(g)?;
        let zero = g.scalar("zero", 0.0);
        let mut x = g.mul(z, &zero);
        for _ in 0..self.dim {
            x = self.emit_inverse_pass(g, &weights, z, &x);
        }
        Ok(x)
    }
}
