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
//! sets. [`Made::select_masks`] switches to mask set k — a seeded input order and/or seeded
//! hidden degrees — so the trainer can draw one per minibatch and the evaluator can average
//! densities over several. Mask set 0 is the configured order: the one exported.

use std::sync::RwLock;

use candle_core::{DType, Device, Result, Tensor, Var};
use flowpack::Cost;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Bijector, LogDet};
use crate::nn::Activation;
use crate::onnx::{Graph, Value};
use crate::params::Params;

/// A masked autoregressive Gaussian bijector.
pub struct Made {
    dim: usize,
    hidden: Vec<usize>,
    layers: Vec<(Var, Var)>,
    activation: Activation,
    clamp: f64,
    base_order: Vec<usize>,
    seed: u64,
    agnostic: Agnostic,
    masks: RwLock<Masks>,
}

/// Which parts of the connectivity [`Made::select_masks`] redraws for mask sets k ≥ 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Agnostic {
    /// A seeded random input order per mask set.
    pub order: bool,
    /// Seeded random hidden degrees per mask set.
    pub connectivity: bool,
}

/// The order and the per-layer masks in use, and which mask set they are.
struct Masks {
    set: u64,
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

/// The masks of every layer (hidden layers, then the μ‖α output) for an order and the
/// hidden degrees drawn from `seed`.
fn masks(order: &[usize], hidden: &[usize], seed: u64) -> Result<Vec<Tensor>> {
    let (input, hidden_deg) = degrees(order, hidden, seed);
    let mut degs = vec![input.clone()];
    degs.extend(hidden_deg);
    let mut out = Vec::new();
    for l in 0..hidden.len() {
        out.push(mask(&degs[l], &degs[l + 1], false)?);
    }
    // Output: μ then α for each feature, seeing hidden units of strictly lower degree.
    let out_deg: Vec<usize> = input.iter().chain(input.iter()).copied().collect();
    out.push(mask(degs.last().expect("input degrees"), &out_deg, true)?);
    Ok(out)
}

impl Made {
    /// A MADE over `dim` features with the given hidden widths; `order[k]` is the feature
    /// that comes k-th; hidden degrees are drawn from `seed`. The output layer starts at
    /// zero, so the bijector starts as the identity.
    pub fn new(
        p: &Params,
        dim: usize,
        hidden: &[usize],
        activation: Activation,
        order: Vec<usize>,
        clamp: f64,
        seed: u64,
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
        widths.push(2 * dim);
        let mut layers = Vec::new();
        for l in 0..widths.len() - 1 {
            let lp = p.pp(format!("masked{l}"));
            let (i, o) = (widths[l], widths[l + 1]);
            // The output layer starts at zero, so the bijector starts as the identity.
            layers.push(if l + 2 < widths.len() {
                let bound = 1.0 / (i as f64).sqrt();
                (
                    lp.uniform("weight", (i, o), bound)?,
                    lp.uniform("bias", o, bound)?,
                )
            } else {
                (lp.zeros("weight", (i, o))?, lp.zeros("bias", o)?)
            });
        }
        let masks = RwLock::new(Masks {
            set: 0,
            layers: masks(&order, hidden, seed)?,
            order: order.clone(),
        });
        Ok(Made {
            dim,
            hidden: hidden.to_vec(),
            layers,
            activation,
            clamp,
            base_order: order,
            seed,
            agnostic: Agnostic::default(),
            masks,
        })
    }

    /// Makes mask sets k ≥ 1 redraw the order and/or the hidden degrees.
    pub fn agnostic(mut self, agnostic: Agnostic) -> Self {
        self.agnostic = agnostic;
        self
    }

    /// Switches to mask set `k`: 0 is the configured order and degrees; k ≥ 1 draws what
    /// [`Made::agnostic`] allows from (seed, k), the same set for the same k every time.
    pub fn select_masks(&self, k: u64) -> Result<()> {
        // Without agnostic training every set is set 0; rebuild only when the set changes
        // (the trainer selects one every step).
        let k = if self.agnostic == Agnostic::default() {
            0
        } else {
            k
        };
        if self.masks.read().expect("mask lock").set == k {
            return Ok(());
        }
        let mix = self.seed ^ k.wrapping_mul(0xd1b5_4a32_d192_ed03);
        let mut order = self.base_order.clone();
        if k > 0 && self.agnostic.order {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix));
        }
        let degree_seed = if k > 0 && self.agnostic.connectivity {
            mix.rotate_left(17)
        } else {
            self.seed
        };
        let layers = masks(&order, &self.hidden, degree_seed)?;
        let mut m = self.masks.write().expect("mask lock");
        m.set = k;
        m.order = order;
        m.layers = layers;
        Ok(())
    }

    /// The feature order of the mask set in use.
    pub fn order(&self) -> Vec<usize> {
        self.masks.read().expect("mask lock").order.clone()
    }

    /// The weights with the masks in use applied.
    fn masked_weights(&self) -> Result<Vec<(Tensor, Tensor)>> {
        let m = self.masks.read().expect("mask lock");
        self.layers
            .iter()
            .zip(&m.layers)
            .map(|((w, b), m)| Ok((w.as_tensor().mul(m)?, b.as_tensor().clone())))
            .collect()
    }

    /// `(μ, α)` for rows `x`: each depends only on the features before it in the order.
    pub fn conditionals(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let weights = self.masked_weights()?;
        let mut h = x.clone();
        for (i, (w, b)) in weights.iter().enumerate() {
            h = h.matmul(w)?.broadcast_add(b)?;
            if i + 1 < weights.len() {
                h = self.activation.apply(&h)?;
            }
        }
        let mu = h.narrow(1, 0, self.dim)?;
        let alpha = ((h.narrow(1, self.dim, self.dim)? / self.clamp)?.tanh()? * self.clamp)?;
        Ok((mu, alpha))
    }

    /// The masked weights as graph constants, emitted once and shared by every pass.
    fn emit_weights(&self, g: &mut Graph) -> Result<Vec<(Value, Value)>> {
        self.masked_weights()?
            .iter()
            .map(|(w, b)| Ok((g.tensor("masked_weight", w)?, g.tensor("bias", b)?)))
            .collect()
    }

    fn emit_conditionals(
        &self,
        g: &mut Graph,
        weights: &[(Value, Value)],
        x: &Value,
    ) -> (Value, Value) {
        let mut h = x.clone();
        for (i, (w, b)) in weights.iter().enumerate() {
            let m = g.matmul(&h, w);
            h = g.add(&m, b);
            if i + 1 < weights.len() {
                h = self.activation.emit(g, &h);
            }
        }
        let mu = g.slice(&h, 1, 0, self.dim);
        let raw = g.slice(&h, 1, self.dim, 2 * self.dim);
        let c = g.scalar("clamp", self.clamp as f32);
        let scaled = g.div(&raw, &c);
        let th = g.tanh(&scaled);
        (mu, g.mul(&th, &c))
    }
}

impl Bijector for Made {
    fn name(&self) -> &'static str {
        "made"
    }

    fn decode_cost(&self) -> Cost {
        Cost::Sequential
    }

    fn select_masks(&self, k: u64) -> Result<()> {
        Made::select_masks(self, k)
    }

    fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (mu, alpha) = self.conditionals(x)?;
        let z = (x - mu)?.mul(&alpha.neg()?.exp()?)?;
        Ok((z, alpha.sum(1)?.neg()?))
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = Tensor::zeros(z.dims(), DType::F32, z.device())?;
        for _ in 0..self.dim {
            let (mu, alpha) = self.conditionals(&x)?;
            x = (z.mul(&alpha.exp()?)? + mu)?;
        }
        Ok(x)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let weights = self.emit_weights(g)?;
        let (mu, alpha) = self.emit_conditionals(g, &weights, x);
        let centred = g.sub(x, &mu);
        let na = g.neg(&alpha);
        let e = g.exp(&na);
        let z = g.mul(&centred, &e);
        let s = g.sum_per_row(&alpha);
        Ok((z, LogDet::Rows(g.neg(&s))))
    }

    /// D passes unrolled (weights shared): graph size grows with D, run time is D passes.
    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let weights = self.emit_weights(g)?;
        let zero = g.scalar("zero", 0.0);
        let mut x = g.mul(z, &zero);
        for _ in 0..self.dim {
            let (mu, alpha) = self.emit_conditionals(g, &weights, &x);
            let e = g.exp(&alpha);
            let scaled = g.mul(z, &e);
            x = g.add(&scaled, &mu);
        }
        Ok(x)
    }
}
