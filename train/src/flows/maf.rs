//! MAF (Papamakarios et al., 2017): a stack of MADEs in one shared order (`--permutation
//! none`: the log-density then splits exactly into per-feature conditionals), or with orders
//! reversed on odd layers (`reverse`, the paper's) or seeded (`random`), optionally with
//! batch norm between them. MADE alone is
//! the one-layer case. Density (encode) is one pass; sampling (decode) is sequential.
//! IAF is the same stack with each MADE inverted: sampling one pass, density sequential.

use candle_core::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{stack, BatchNormAt};
use crate::bijectors::{Agnostic, Chain, Inverse, Made, RqSpline, Transform};
use crate::config::{Family, ModelConfig, PermutationKind, TransformKind};
use crate::params::Params;

pub(super) fn build(cfg: &ModelConfig, dim: usize, p: &Params, context: usize) -> Result<Chain> {
    let n = if cfg.family == Family::Made {
        1
    } else {
        cfg.layers
    };
    let hidden = vec![cfg.hidden; cfg.hidden_layers];
    let transform = match cfg.transform {
        TransformKind::Affine => Transform::Affine {
            clamp: cfg.scale_clamp,
        },
        TransformKind::Spline => Transform::Spline(RqSpline::new(cfg.bins, cfg.tail_bound)?),
    };
    let mut steps = Vec::new();
    for i in 0..n {
        let seed = crate::seeds::made(p.seed(), i);
        let mut order: Vec<usize> = (0..dim).collect();
        match cfg.permutation {
            // One shared order: the density splits exactly into per-feature terms.
            PermutationKind::None | PermutationKind::Lu => {}
            PermutationKind::Reverse if i % 2 == 1 => order.reverse(),
            PermutationKind::Reverse => {}
            PermutationKind::Random => order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed)),
        }
        let made = Made::new(
            &p.pp(format!("made{i}")),
            dim,
            &hidden,
            cfg.activation,
            order,
            transform,
            seed,
            context,
        )?
        .agnostic(Agnostic {
            order: cfg.order_agnostic,
            connectivity: cfg.connectivity_agnostic,
        });
        let mut step = Chain::new();
        if cfg.permutation == PermutationKind::Lu && i > 0 {
            step.push(super::lu_linear(p, dim, i)?);
        }
        if cfg.family == Family::Iaf {
            step.push(Inverse(made));
        } else {
            step.push(made);
        }
        steps.push(step);
    }
    stack(cfg, dim, p, steps, BatchNormAt::Between)
}
