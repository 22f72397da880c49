//! RealNVP for flat data (Dinh et al., 2016): affine couplings with alternating masks (or
//! fixed permutations between them), optionally with batch norm between them.

use candle_core::Result;

use super::{coupling_steps, stack, BatchNormAt};
use crate::bijectors::{Chain, Elementwise};
use crate::config::ModelConfig;
use crate::params::Params;

pub(super) fn build(cfg: &ModelConfig, dim: usize, p: &Params, context: usize) -> Result<Chain> {
    let map = Elementwise::ClampedAffine {
        clamp: cfg.scale_clamp,
    };
    let steps = coupling_steps(cfg, dim, p, map, context)?;
    stack(cfg, dim, p, steps, BatchNormAt::Between)
}
