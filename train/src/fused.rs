//! Glow's affine coupling map on images as two candle custom ops on the CPU, in place of
//! the chain of about a dozen elementwise ops (and their autodiff) it is built from in
//! [`crate::bijectors::coupling`]:
//!
//! - `y = keep·x + moved·(x + t)·σ(s + 2)`,
//! - `log|det|` per example `= Σ moved·log σ(s + 2)`,
//!
//! where the conditioner's output `h = [t; s]` stacks `t` and `s` along the channels and
//! `moved = 1 − keep` is the coupling's 0/1 mask of `[C, H, W]`. Each op reads its inputs once
//! and writes its output once, in both directions; examples are split over candle's threads.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::parallel::{on_pool, pieces, values, Split};

/// `(y, log|det| per example)` of Glow's affine coupling for `x[N, C, H, W]`, conditioner
/// output `h[N, 2C, H, W]` and the mask `moved[C·H·W]` (1 where the map applies). float32
/// on the CPU; differentiable in `x` and `h`.
pub fn image_sigmoid_affine(x: &Tensor, h: &Tensor, moved: &[f32]) -> Result<(Tensor, Tensor)> {
    let (x, h) = (x.contiguous()?, h.contiguous()?);
    // One copy of the mask, shared by both ops and their gradients.
    let moved: Arc<[f32]> = moved.into();
    let y = x.apply_op2(
        &h,
        Map {
            moved: moved.clone(),
        },
    )?;
    let ld = h.apply_op1(LogDet { moved })?;
    Ok((y, ld))
}

fn sigmoid(u: f32) -> f32 {
    1.0 / (1.0 + (-u).exp())
}

/// log σ(u), without overflow for either sign.
fn log_sigmoid(u: f32) -> f32 {
    if u >= 0.0 {
        -(-u).exp().ln_1p()
    } else {
        u - u.exp().ln_1p()
    }
}

/// The sizes: examples, and values per example of x (`C·H·W`).
fn sizes(x: &Layout, h: &Layout, moved: &[f32]) -> Result<(usize, usize)> {
    let n = x.shape().dims().first().copied().unwrap_or(0);
    let per = x.shape().elem_count() / n.max(1);
    if per != moved.len() || h.shape().elem_count() != 2 * n * per {
        candle_core::bail!(
            "fused coupling: x {:?}, h {:?} and a mask of {}",
            x.shape(),
            h.shape(),
            moved.len()
        );
    }
    Ok((n, per))
}

/// `y` from `x` and `h`.
struct Map {
    moved: Arc<[f32]>,
}

impl CustomOp2 for Map {
    fn name(&self) -> &'static str {
        "image_sigmoid_affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, per) = sizes(l1, l2, &self.moved)?;
        let (x, h) = (
            values(s1, l1, "fused coupling")?,
            values(s2, l2, "fused coupling")?,
        );
        let mut y = vec![0f32; x.len()];
        let split = Split::of(n);
        on_pool(pieces(&mut y, split.per * per), |t, y| {
            for (i, y) in y.chunks_mut(per).enumerate() {
                let e = t * split.per + i;
                let (x, h) = (
                    &x[e * per..(e + 1) * per],
                    &h[2 * e * per..2 * (e + 1) * per],
                );
                let (tt, s) = h.split_at(per);
                for j in 0..per {
                    y[j] = if self.moved[j] == 0.0 {
                        x[j]
                    } else {
                        (x[j] + tt[j]) * sigmoid(s[j] + 2.0)
                    };
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grads = dy.contiguous()?.apply_op3_no_bwd(
            x,
            h,
            &MapGrad {
                moved: self.moved.clone(),
            },
        )?;
        let nx = x.elem_count();
        let dx = grads.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dh = grads.narrow(0, nx, h.elem_count())?.reshape(h.shape())?;
        Ok((Some(dx), Some(dh)))
    }
}

/// `dy`, `x`, `h` → `[dx | dh]`: where moved, dx = dy·σ, dt = dy·σ and
/// ds = dy·(x + t)·σ·(1 − σ) with σ = σ(s + 2); elsewhere dx = dy and dh = 0.
struct MapGrad {
    moved: Arc<[f32]>,
}

impl CustomOp3 for MapGrad {
    fn name(&self) -> &'static str {
        "image_sigmoid_affine_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, per) = sizes(l2, l3, &self.moved)?;
        let (dy, x, h) = (
            values(s1, l1, "fused coupling")?,
            values(s2, l2, "fused coupling")?,
            values(s3, l3, "fused coupling")?,
        );
        let mut out = vec![0f32; 3 * n * per];
        let (dx, dh) = out.split_at_mut(n * per);
        let split = Split::of(n);
        let items: Vec<_> = pieces(dx, split.per * per)
            .into_iter()
            .zip(pieces(dh, 2 * split.per * per))
            .collect();
        on_pool(items, |t, (dx, dh)| {
            for (i, (dx, dh)) in dx.chunks_mut(per).zip(dh.chunks_mut(2 * per)).enumerate() {
                let e = t * split.per + i;
                let (dy, x) = (&dy[e * per..(e + 1) * per], &x[e * per..(e + 1) * per]);
                let h = &h[2 * e * per..2 * (e + 1) * per];
                let (tt, s) = h.split_at(per);
                let (dt, ds) = dh.split_at_mut(per);
                for j in 0..per {
                    if self.moved[j] == 0.0 {
                        dx[j] = dy[j];
                        continue;
                    }
                    let sg = sigmoid(s[j] + 2.0);
                    dx[j] = dy[j] * sg;
                    dt[j] = dy[j] * sg;
                    ds[j] = dy[j] * (x[j] + tt[j]) * sg * (1.0 - sg);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(3 * n * per)))
    }
}

/// log|det| per example from `h`.
struct LogDet {
    moved: Arc<[f32]>,
}

impl CustomOp1 for LogDet {
    fn name(&self) -> &'static str {
        "image_sigmoid_affine_log_det"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = values(s, l, "fused coupling")?;
        let per = self.moved.len();
        let n = h.len() / (2 * per).max(1);
        let ld: Vec<f32> = h
            .chunks(2 * per)
            .map(|h| {
                let s = &h[per..];
                let total: f64 = (0..per)
                    .filter(|&j| self.moved[j] != 0.0)
                    .map(|j| f64::from(log_sigmoid(s[j] + 2.0)))
                    .sum();
                total as f32
            })
            .collect();
        Ok((CpuStorage::F32(ld), Shape::from(n)))
    }

    fn bwd(&self, h: &Tensor, _ld: &Tensor, dld: &Tensor) -> Result<Option<Tensor>> {
        let dh = dld.contiguous()?.apply_op2_no_bwd(
            h,
            &LogDetGrad {
                moved: self.moved.clone(),
            },
        )?;
        Ok(Some(dh))
    }
}

/// `dld`, `h` → `dh`: ds = dld·(1 − σ(s + 2)) where moved, dt = 0.
struct LogDetGrad {
    moved: Arc<[f32]>,
}

impl CustomOp2 for LogDetGrad {
    fn name(&self) -> &'static str {
        "image_sigmoid_affine_log_det_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dld, h) = (
            values(s1, l1, "fused coupling")?,
            values(s2, l2, "fused coupling")?,
        );
        let per = self.moved.len();
        let mut dh = vec![0f32; h.len()];
        for ((dh, h), &g) in dh.chunks_mut(2 * per).zip(h.chunks(2 * per)).zip(dld) {
            let (s, ds) = (&h[per..], &mut dh[per..]);
            for j in 0..per {
                if self.moved[j] != 0.0 {
                    ds[j] = g * (1.0 - sigmoid(s[j] + 2.0));
                }
            }
        }
        Ok((CpuStorage::F32(dh), l2.shape().clone()))
    }
}
