//! What candle lacks for training flows: Adam with bias correction and decoupled weight
//! decay whose moments can be checkpointed, an exponential moving average of the weights
//! (Polyak averaging), global gradient-norm clipping, and a linear warm-up + cosine
//! learning-rate schedule.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

/// Adam (Kingma & Ba, 2015), with AdamW's decoupled weight decay when `weight_decay > 0`.
pub struct Adam {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far (for bias correction).
    pub t: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// The moving average of each parameter, when averaging is on.
    average: Option<Average>,
}

/// An exponential moving average of the parameters.
struct Average {
    decay: f64,
    values: Vec<Tensor>,
}

impl Adam {
    /// An optimiser over `vars` with zeroed moments.
    pub fn new(vars: Vec<Var>, weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Adam {
            m: vars.iter().map(zeros).collect::<Result<_>>()?,
            v: vars.iter().map(zeros).collect::<Result<_>>()?,
            vars,
            t: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            average: None,
        })
    }

    /// Keeps a moving average of the parameters with this decay (0 < decay < 1), updated
    /// after every step: `avg ← d·avg + (1 − d)·θ`, with `d = min(decay, (1 + t)/(10 + t))`
    /// so the first steps do not drag the average back to the initialisation.
    pub fn with_average(mut self, decay: f64) -> Result<Self> {
        if decay > 0.0 {
            self.average = Some(Average {
                decay,
                values: self
                    .vars
                    .iter()
                    .map(|v| v.as_tensor().copy())
                    .collect::<Result<_>>()?,
            });
        }
        Ok(self)
    }

    /// Exchanges the parameters and their moving average (twice restores them): validation
    /// and the kept best parameters see the average. No-op without averaging.
    pub fn swap_average(&mut self) -> Result<()> {
        if let Some(avg) = &mut self.average {
            for (var, a) in self.vars.iter().zip(avg.values.iter_mut()) {
                let current = var.as_tensor().copy()?;
                var.set(a)?;
                *a = current;
            }
        }
        Ok(())
    }

    /// The global L2 norm of the gradients (missing gradients count as zero), read back
    /// from the tensors once.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let squares = self
            .vars
            .iter()
            .filter_map(|var| grads.get(var.as_tensor()))
            .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
            .collect::<Result<Vec<_>>>()?;
        if squares.is_empty() {
            return Ok(0.0);
        }
        let total = Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f64>()?;
        Ok(total.sqrt())
    }

    /// One update at learning rate `lr`, with gradients multiplied by `grad_scale` (clipping).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let c1 = 1.0 - self.beta1.powi(t);
        let c2 = 1.0 - self.beta2.powi(t);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Gradients computed from variables still carry their op graph: detach them,
            // or every step's moments would keep all earlier steps' graphs alive.
            let g = (g.detach() * grad_scale)?;
            self.m[i] = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let m_hat = (&self.m[i] / c1)?;
            let v_hat = (&self.v[i] / c2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let mut next = (var.as_tensor() - (update * lr)?)?;
            if self.weight_decay > 0.0 {
                next = (next - (var.as_tensor() * (lr * self.weight_decay))?)?;
            }
            var.set(&next)?;
        }
        if let Some(avg) = &mut self.average {
            let t = self.t as f64;
            let d = avg.decay.min((1.0 + t) / (10.0 + t));
            for (var, a) in self.vars.iter().zip(avg.values.iter_mut()) {
                *a = ((&*a * d)? + (var.as_tensor() * (1.0 - d))?)?;
            }
        }
        Ok(())
    }

    /// The moments as named tensors, for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            out.insert(format!("adam.m.{i}"), m.clone());
            out.insert(format!("adam.v.{i}"), v.clone());
        }
        if let Some(avg) = &self.average {
            for (i, a) in avg.values.iter().enumerate() {
                out.insert(format!("adam.avg.{i}"), a.clone());
            }
        }
        out
    }

    /// Restores moments saved by [`Adam::state`] after `t` updates.
    pub fn load_state(&mut self, saved: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for i in 0..self.vars.len() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("adam.{kind}.{i}");
                let s = saved
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint has no {key}")))?;
                if s.dims() != slot.dims() {
                    candle_core::bail!(
                        "checkpoint {key} has shape {:?}, expected {:?}",
                        s.dims(),
                        slot.dims()
                    );
                }
                *slot = s.clone();
            }
            if let Some(avg) = &mut self.average {
                let key = format!("adam.avg.{i}");
                let s = saved
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint has no {key}")))?;
                avg.values[i] = s.clone();
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Learning rate at `step`: linear warm-up to `peak`, then cosine decay to `peak · min_ratio`
/// at `total` steps.
pub fn learning_rate(step: u64, total: u64, peak: f64, warmup: u64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}
