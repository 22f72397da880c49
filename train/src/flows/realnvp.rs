//! RealNVP for flat data (Dinh et al., 2016): affine couplings with alternating masks (or
//! fixed permutations between them), optionally followed by batch norm.

use candle_core::Result;

use crate::bijectors::{AffineCoupling, Bijector, Permutation};
use crate::config::{ModelConfig, PermutationKind};
use crate::params::Params;

/// Adds the permutation that precedes coupling `i` (if configured) and says whether the
/// coupling's mask is flipped (when there is no permutation, masks alternate).
pub(super) fn between(
    cfg: &ModelConfig,
    dim: usize,
    i: usize,
    p: &Params,
    layers: &mut Vec<Box<dyn Bijector>>,
) -> Result<bool> {
    if i == 0 {
        return Ok(false);
    }
    match cfg.permutation {
        PermutationKind::None => Ok(i % 2 == 1),
        PermutationKind::Reverse => {
            layers.push(Box::new(Permutation::reverse(dim)?));
            Ok(false)
        }
        PermutationKind::Random => {
            layers.push(Box::new(Permutation::random(
                dim,
                p.seed().wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64,
            )?));
            Ok(false)
        }
    }
}

pub(super) fn build(
    cfg: &ModelConfig,
    dim: usize,
    p: &Params,
    layers: &mut Vec<Box<dyn Bijector>>,
) -> Result<()> {
    for i in 0..cfg.layers {
        let flip = between(cfg, dim, i, p, layers)?;
        layers.push(Box::new(AffineCoupling::new(
            &p.pp(format!("coupling{i}")),
            dim,
            cfg.mask,
            flip,
            cfg.hidden,
            cfg.hidden_layers,
            cfg.activation,
            cfg.scale_clamp,
        )?));
        if cfg.batch_norm && i + 1 < cfg.layers {
            layers.push(super::batch_norm(cfg, dim, i, p)?);
        }
    }
    Ok(())
}
