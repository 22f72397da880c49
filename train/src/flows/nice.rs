//! NICE (Dinh et al., 2014): additive couplings with alternating halves, then a diagonal
//! scaling that carries the whole log-det.

use candle_core::Result;

use super::realnvp::between;
use crate::bijectors::{AdditiveCoupling, Bijector, DiagonalScaling};
use crate::config::ModelConfig;
use crate::params::Params;

pub(super) fn build(
    cfg: &ModelConfig,
    dim: usize,
    p: &Params,
    layers: &mut Vec<Box<dyn Bijector>>,
) -> Result<()> {
    for i in 0..cfg.layers {
        let flip = between(cfg, dim, i, p, layers)?;
        let lp = p.pp(format!("coupling{i}"));
        layers.push(Box::new(AdditiveCoupling::new(
            &lp,
            dim,
            cfg.mask,
            flip,
            cfg.hidden,
            cfg.hidden_layers,
            cfg.activation,
        )?));
        if cfg.batch_norm {
            layers.push(super::batch_norm(cfg, dim, i, p)?);
        }
    }
    layers.push(Box::new(DiagonalScaling::new(&p.pp("scaling"), dim)?));
    Ok(())
}
