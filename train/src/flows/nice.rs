//! NICE (Dinh et al., 2014): additive couplings with alternating halves (batch norm after
//! each, if asked), then a diagonal scaling that carries the whole log-det.

use candle_core::Result;

use super::{coupling_steps, stack, BatchNormAt};
use crate::bijectors::{Chain, DiagonalScaling, Elementwise};
use crate::config::ModelConfig;
use crate::params::Params;

pub(super) fn build(cfg: &ModelConfig, dim: usize, p: &Params, context: usize) -> Result<Chain> {
    let steps = coupling_steps(cfg, dim, p, Elementwise::Shift, context)?;
    let mut chain = stack(cfg, dim, p, steps, BatchNormAt::AfterEach)?;
    chain.push(DiagonalScaling::new(&p.pp("scaling"), dim)?);
    Ok(chain)
}
