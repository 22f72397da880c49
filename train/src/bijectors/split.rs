//! Which features condition a coupling layer and which it transforms.

use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::onnx::{Graph, Value};

/// How features are divided between the two halves of a coupling layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mask {
    /// Even-indexed features condition, odd-indexed ones are transformed (flipped on
    /// alternate layers).
    Alternate,
    /// The first ⌈D/2⌉ features condition, the rest are transformed (flipped on alternate
    /// layers).
    Half,
}

/// A division of D features into a conditioning part and a transformed part.
pub struct Split {
    /// Indices that pass through unchanged and feed the conditioner.
    pub cond: Vec<usize>,
    /// Indices that are transformed.
    pub trans: Vec<usize>,
    inverse: Vec<usize>,
    cond_t: Tensor,
    trans_t: Tensor,
    inverse_t: Tensor,
}

fn index_tensor(ix: &[usize]) -> Result<Tensor> {
    let v: Vec<u32> = ix.iter().map(|&i| i as u32).collect();
    Tensor::from_vec(v, ix.len(), &Device::Cpu)
}

impl Split {
    /// The split of `dim` features for `mask`; `flip` swaps the two parts.
    pub fn new(dim: usize, mask: Mask, flip: bool) -> Result<Self> {
        if dim < 2 {
            candle_core::bail!("a coupling layer needs at least 2 features, got {dim}");
        }
        let first: Vec<bool> = match mask {
            Mask::Alternate => (0..dim).map(|i| i % 2 == 0).collect(),
            Mask::Half => (0..dim).map(|i| i < dim.div_ceil(2)).collect(),
        };
        let cond: Vec<usize> = (0..dim).filter(|&i| first[i] != flip).collect();
        let trans: Vec<usize> = (0..dim).filter(|&i| first[i] == flip).collect();
        let order: Vec<usize> = cond.iter().chain(trans.iter()).copied().collect();
        let mut inverse = vec![0; dim];
        for (p, &i) in order.iter().enumerate() {
            inverse[i] = p;
        }
        Ok(Split {
            cond_t: index_tensor(&cond)?,
            trans_t: index_tensor(&trans)?,
            inverse_t: index_tensor(&inverse)?,
            cond,
            trans,
            inverse,
        })
    }

    /// `(x[:, cond], x[:, trans])`.
    pub fn split(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            x.index_select(&self.cond_t, 1)?,
            x.index_select(&self.trans_t, 1)?,
        ))
    }

    /// The inverse of [`Split::split`].
    pub fn join(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Tensor::cat(&[a, b], 1)?.index_select(&self.inverse_t, 1)
    }

    /// [`Split::split`] as ONNX nodes.
    pub fn emit_split(&self, g: &mut Graph, x: &Value) -> (Value, Value) {
        (g.gather(x, &self.cond, 1), g.gather(x, &self.trans, 1))
    }

    /// [`Split::join`] as ONNX nodes.
    pub fn emit_join(&self, g: &mut Graph, a: &Value, b: &Value) -> Value {
        let cat = g.concat(&[a, b], 1);
        g.gather(&cat, &self.inverse, 1)
    }
}
