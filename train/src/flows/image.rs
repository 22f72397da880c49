//! Multi-scale image flows over `[C, H, W]` events.
//!
//! Each level squeezes (`[C, H, W] → [4C, H/2, W/2]`), runs its steps, hands the first half of
//! the channels to the next level (factor-out: the other half are latents now) and unsqueezes
//! back, so every level — and the whole flow — maps `[C, H, W]` to `[C, H, W]` and the latent
//! is a rearrangement of the per-scale Gaussians.
//!
//! - **Glow** (Kingma & Dhariwal, 2018): K steps of actnorm → invertible 1×1 convolution →
//!   channel-mask coupling per level. With `learned_prior`, the channels that leave at a level
//!   get a Gaussian conditioned on those that stay (a coupling of one half on the other)
//!   instead of the standard normal.
//! - **RealNVP** (Dinh et al., 2016): K checkerboard couplings (alternating), squeeze, K
//!   channel-mask couplings (alternating), factor out; the last level is 2K checkerboard
//!   couplings on its input. Per-channel batch norm follows each coupling (`batch_norm`), or
//!   actnorm (the per-channel affine map batch norm becomes at evaluation, initialised from
//!   data, with no running statistics).
//!
//! `transform = spline` gives every step's coupling a rational-quadratic spline (the image
//! neural spline flow) instead of the affine map.

use candle_core::Result;

use crate::bijectors::{
    ActNorm, BatchNorm, Bijector, Chain, Coupling, Elementwise, FactorOut, ImageMask, InvConv1x1,
    Inverse, RqSpline, Squeeze,
};
use crate::config::{Family, ModelConfig, TransformKind};
use crate::params::Params;

pub(super) fn build(
    cfg: &ModelConfig,
    shape: [usize; 3],
    p: &Params,
    context: usize,
) -> Result<Chain> {
    check_shape(cfg, shape)?;
    level(cfg, shape, 0, &p.pp("level0"), context)
}

/// Every level but the last squeezes and halves the channels; the spatial size must allow it.
fn check_shape(cfg: &ModelConfig, shape: [usize; 3]) -> Result<()> {
    let [_, mut h, mut w] = shape;
    let squeezes = match cfg.family {
        Family::Glow => cfg.levels,
        _ => cfg.levels - 1,
    };
    for l in 0..squeezes {
        if h % 2 != 0 || w % 2 != 0 {
            candle_core::bail!(
                "{} with {} levels squeezes {squeezes} times, but level {l} sees {h}×{w} (odd); use fewer levels",
                cfg.family.as_str(),
                cfg.levels
            );
        }
        h /= 2;
        w /= 2;
    }
    Ok(())
}

fn level(
    cfg: &ModelConfig,
    shape: [usize; 3],
    l: usize,
    p: &Params,
    context: usize,
) -> Result<Chain> {
    let last = l + 1 == cfg.levels;
    let mut out = Chain::new();
    let map = match (cfg.additive, cfg.transform) {
        (true, _) => Elementwise::Shift,
        (false, TransformKind::Affine) => Elementwise::SigmoidAffine,
        (false, TransformKind::Spline) => {
            Elementwise::Spline(RqSpline::new(cfg.bins, cfg.tail_bound)?)
        }
    };
    let coupling_with = |map, p: &Params, shape, mask, flip| -> Result<Box<dyn Bijector>> {
        Ok(Box::new(Coupling::image(
            p,
            shape,
            mask,
            flip,
            cfg.hidden,
            cfg.activation,
            map,
            context,
        )?))
    };
    let coupling = |p: &Params, shape, mask, flip| coupling_with(map, p, shape, mask, flip);
    let actnorm = |p: &Params, s: [usize; 3]| -> Result<Box<dyn Bijector>> {
        Ok(Box::new(ActNorm::new(p, s[0], s[1] * s[2])?))
    };
    // Image RealNVP normalises after each coupling: per-channel batch norm as in the paper
    // with `batch_norm`, else actnorm.
    let normalise = |p: &Params, s: [usize; 3]| -> Result<Box<dyn Bijector>> {
        if cfg.batch_norm {
            Ok(Box::new(BatchNorm::per_channel(
                &p.pp("batch_norm"),
                s[0],
                s[1] * s[2],
                cfg.batch_norm_momentum,
                1e-5,
            )?))
        } else {
            actnorm(&p.pp("actnorm"), s)
        }
    };
    if cfg.family == Family::RealnvpImage {
        let k = if last { 2 * cfg.layers } else { cfg.layers };
        for i in 0..k {
            let q = p.pp(format!("checkerboard{i}"));
            out.push_boxed(coupling(&q, shape, ImageMask::Checkerboard, i % 2 == 1)?);
            out.push_boxed(normalise(&q, shape)?);
        }
        if last {
            return Ok(out);
        }
    }
    let sq = Squeeze::new(shape[0], shape[1], shape[2])?;
    let s = sq.output_shape();
    out.push(sq);
    for i in 0..cfg.layers {
        let q = p.pp(format!("step{i}"));
        if cfg.family == Family::Glow {
            out.push_boxed(actnorm(&q.pp("actnorm"), s)?);
            let seed = crate::seeds::invconv(p.seed(), l, i);
            out.push(InvConv1x1::new(
                &q.pp("invconv"),
                s[0],
                s[1] * s[2],
                cfg.lu,
                seed,
            )?);
            out.push_boxed(coupling(&q.pp("coupling"), s, ImageMask::Channel, false)?);
        } else {
            out.push_boxed(coupling(&q, s, ImageMask::Channel, i % 2 == 1)?);
            out.push_boxed(normalise(&q, s)?);
        }
    }
    if !last {
        let keep = s[0] / 2;
        if cfg.learned_prior {
            // Glow's split prior: the leaving half's Gaussian is conditioned on the staying
            // half — an affine coupling of the second half of the channels on the first
            // (affine with spline steps too: it is the Gaussian's mean and scale).
            let prior = match map {
                Elementwise::Spline(_) => Elementwise::SigmoidAffine,
                m => m,
            };
            out.push_boxed(coupling_with(
                prior,
                &p.pp("prior"),
                s,
                ImageMask::Channel,
                false,
            )?);
        }
        let inner = level(
            cfg,
            [keep, s[1], s[2]],
            l + 1,
            &p.pp(format!("level{}", l + 1)),
            context,
        )?;
        out.push(FactorOut::new(keep, s[0], inner)?);
    }
    out.push(Inverse(Squeeze::new(shape[0], shape[1], shape[2])?));
    Ok(out)
}
