//! A fixed permutation of features (reversal or a seeded shuffle); log-det 0.

use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{zero_rows, Bijector, Ctx, LogDet};
use crate::onnx::{Graph, Value};

/// `z[:, i] = x[:, perm[i]]`.
pub struct Permutation {
    perm: Vec<usize>,
    inverse: Vec<usize>,
    perm_t: Tensor,
    inverse_t: Tensor,
}

impl Permutation {
    /// The permutation `perm` of `0..perm.len()`.
    pub fn new(perm: Vec<usize>) -> Result<Self> {
        let mut inverse = vec![usize::MAX; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            if p >= perm.len() || inverse[p] != usize::MAX {
                candle_core::bail!("{perm:?} is not a permutation");
            }
            inverse[p] = i;
        }
        let t = |v: &[usize]| {
            Tensor::from_vec(
                v.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                v.len(),
                &Device::Cpu,
            )
        };
        Ok(Permutation {
            perm_t: t(&perm)?,
            inverse_t: t(&inverse)?,
            perm,
            inverse,
        })
    }

    /// Reverses the feature order.
    pub fn reverse(dim: usize) -> Result<Self> {
        Self::new((0..dim).rev().collect())
    }

    /// A uniformly random permutation drawn from `seed`.
    pub fn random(dim: usize, seed: u64) -> Result<Self> {
        let mut perm: Vec<usize> = (0..dim).collect();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        Self::new(perm)
    }
}

impl Bijector for Permutation {
    fn name(&self) -> &'static str {
        "permutation"
    }

    fn encode(&self, x: &Tensor, _: &Ctx) -> Result<(Tensor, Tensor)> {
        Ok((x.index_select(&self.perm_t, 1)?, zero_rows(x)?))
    }

    fn decode(&self, z: &Tensor, _: &Ctx) -> Result<Tensor> {
        z.index_select(&self.inverse_t, 1)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        Ok((g.gather(x, &self.perm, 1), LogDet::Const(0.0)))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        Ok(g.gather(z, &self.inverse, 1))
    }
}
