//! Neural spline flow (Durkan et al., 2019), coupling version: RealNVP's stack with each
//! coupling's affine map replaced by a monotonic rational-quadratic spline of `cfg.bins`
//! bins on [−`cfg.tail_bound`, `cfg.tail_bound`] (the identity outside), the configured
//! permutations between couplings and batch norm between steps when asked for.

use candle_core::Result;

use super::{coupling_steps, stack, BatchNormAt};
use crate::bijectors::{Chain, Elementwise, RqSpline};
use crate::config::ModelConfig;
use crate::params::Params;

pub(super) fn build(cfg: &ModelConfig, dim: usize, p: &Params, context: usize) -> Result<Chain> {
    let map = Elementwise::Spline(RqSpline::new(cfg.bins, cfg.tail_bound)?);
    let steps = coupling_steps(cfg, dim, p, map, context)?;
    stack(cfg, dim, p, steps, BatchNormAt::Between)
}
