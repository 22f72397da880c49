//! The stride-1 "same" convolution that image couplings train with, as one candle custom op
//! on the CPU: each example's im2col columns are gathered through one index table per call
//! (padding read as a zero kept past the example) and multiplied by the weight with one
//! direct GEMM call; the backward pass is two more ops (dW = Σ dY·colsᵀ, dX = col2im(Wᵀ·dY)).
//! Examples are split over the threads candle is given (on its persistent pool), each with its
//! own column buffer.
//!
//! It replaces an im2col built from candle ops (pad, an index_select gather, a matmul over a
//! transposed copy), whose gather, scatter-add gradient and copies were most of a Glow step.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::nn::channel_matmul;

/// `x[N, C, H, W]` convolved with `w[O, C, k, k]` (k odd), zero padding k/2: `[N, O, H, W]`.
/// Differentiable in both arguments. float32 on the CPU takes the custom op; anything else
/// (float64 in tests, another device) the same convolution built from candle ops.
pub fn conv_same(x: &Tensor, w: &Tensor, k: usize) -> Result<Tensor> {
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 || !x.device().is_cpu() {
        return conv_same_candle(x, w, k);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    x.apply_op2(&w, ConvSame { k })
}

/// The same convolution from candle ops: im2col as one gather over the padded input (its
/// gradient one index-add) and one matmul. The custom op's reference in tests.
pub fn conv_same_candle(x: &Tensor, w: &Tensor, k: usize) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    if k == 1 {
        return channel_matmul(&w.reshape((o, c))?, &x.reshape((n, c, h * wd))?)?
            .reshape((n, o, h, wd));
    }
    let pad = k / 2;
    let (hp, wp) = (h + 2 * pad, wd + 2 * pad);
    let xp = x
        .pad_with_zeros(2, pad, pad)?
        .pad_with_zeros(3, pad, pad)?
        .reshape((n * c, hp * wp))?;
    // Column dy·k + dx of output pixel (y, x) reads padded pixel (y + dy, x + dx).
    let mut idx = Vec::with_capacity(k * k * h * wd);
    for dy in 0..k {
        for dx in 0..k {
            for y in 0..h {
                for xx in 0..wd {
                    idx.push(((y + dy) * wp + xx + dx) as u32);
                }
            }
        }
    }
    let idx = Tensor::from_vec(idx, k * k * h * wd, x.device())?;
    // Column c·k² + dy·k + dx matches the kernel layout [O, C, k, k].
    let cols = xp.index_select(&idx, 1)?.reshape((n, c * k * k, h * wd))?;
    channel_matmul(&w.reshape((o, c * k * k))?, &cols)?.reshape((n, o, h, wd))
}

/// The sizes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
}

impl Dims {
    fn of(x: &Layout, w: &Layout, k: usize) -> Result<Dims> {
        let (n, c, h, wd) = x.shape().dims4()?;
        let (o, c2, k1, k2) = w.shape().dims4()?;
        if c2 != c || k1 != k || k2 != k || k.is_multiple_of(2) {
            candle_core::bail!(
                "conv_same: x {:?} and w {:?} with k = {k}",
                x.shape(),
                w.shape()
            );
        }
        Ok(Dims {
            n,
            c,
            h,
            w: wd,
            o,
            k,
        })
    }
    fn hw(&self) -> usize {
        self.h * self.w
    }
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("conv_same: a non-contiguous argument"),
    }
}

/// For each entry of an example's columns (row `(c·k + dy)·k + dx`, pixel `y·W + x`), the
/// index of the input value it reads, `x[c][y + dy − k/2][x + dx − k/2]` in `[C·H·W]`, or
/// `C·H·W` outside the image: a zero kept one past the example's values. Built once per call
/// and shared by every example (the images are small, so the table is: 36·16 entries for a
/// 3×3 layer on 4 channels of 4×4).
fn gather_table(d: Dims) -> Vec<u32> {
    let (h, w, k, p) = (d.h as isize, d.w as isize, d.k as isize, (d.k / 2) as isize);
    let outside = (d.c * d.hw()) as u32;
    let mut table = Vec::with_capacity(d.ckk() * d.hw());
    for c in 0..d.c {
        for dy in 0..k {
            for dx in 0..k {
                for y in 0..h {
                    for x in 0..w {
                        let (sy, sx) = (y + dy - p, x + dx - p);
                        table.push(if sy < 0 || sx < 0 || sy >= h || sx >= w {
                            outside
                        } else {
                            (c * d.hw()) as u32 + (sy * w + sx) as u32
                        });
                    }
                }
            }
        }
    }
    table
}

/// An example's columns, and the buffers that make them: for k = 1 the example itself;
/// otherwise gathered through the table from a copy of the example with a zero after it.
struct Columns {
    table: Vec<u32>,
    padded: Vec<f32>,
    cols: Vec<f32>,
}

impl Columns {
    fn new(d: Dims) -> Columns {
        if d.k == 1 {
            return Columns {
                table: vec![],
                padded: vec![],
                cols: vec![],
            };
        }
        Columns {
            table: gather_table(d),
            padded: vec![0.0; d.c * d.hw() + 1],
            cols: vec![0.0; d.ckk() * d.hw()],
        }
    }

    /// The columns `[C·k·k, H·W]` of example `x[C·H·W]`.
    fn of<'a>(&'a mut self, x: &'a [f32]) -> &'a [f32] {
        if self.table.is_empty() {
            return x;
        }
        let n = x.len();
        self.padded[..n].copy_from_slice(x);
        for (c, &i) in self.cols.iter_mut().zip(&self.table) {
            *c = self.padded[i as usize];
        }
        &self.cols
    }

    /// Adds the columns' gradient `g[C·k·k, H·W]` back into an example's `dx[C·H·W]`
    /// (the gather's adjoint: a scatter-add through the same table).
    fn add_back(&mut self, g: &[f32], dx: &mut [f32]) {
        self.padded.fill(0.0);
        for (&v, &i) in g.iter().zip(&self.table) {
            self.padded[i as usize] += v;
        }
        let n = dx.len();
        dx.copy_from_slice(&self.padded[..n]);
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + lhs[m×k] · rhs[k×n]`, each given by its row and
/// column strides (in elements).
#[allow(clippy::too_many_arguments)]
fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    let last = |(rs, cs): (usize, usize), r: usize, c: usize| {
        (r.saturating_sub(1)) * rs + (c.saturating_sub(1)) * cs
    };
    assert!(m == 0 || n == 0 || last(dst_strides, m, n) < dst.len());
    assert!(m == 0 || k == 0 || last(lhs_strides, m, k) < lhs.len());
    assert!(k == 0 || n == 0 || last(rhs_strides, k, n) < rhs.len());
    // SAFETY: every index the GEMM touches is inside its slice (asserted above), and `dst`
    // is borrowed mutably, apart from `lhs` and `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_strides.1 as isize,
            dst_strides.0 as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.1 as isize,
            lhs_strides.0 as isize,
            rhs.as_ptr(),
            rhs_strides.1 as isize,
            rhs_strides.0 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Runs `f(first example, examples, out chunk)` over contiguous chunks of the batch, one
/// chunk per thread of candle's count, on its persistent pool.
fn over_batch<F>(n: usize, per_example_out: usize, out: &mut [f32], f: F)
where
    F: Fn(usize, usize, &mut [f32]) + Sync,
{
    let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
    if threads == 1 || per_example_out == 0 {
        f(0, n, out);
        return;
    }
    let per = n.div_ceil(threads);
    on_pool(out, per * per_example_out, |t, chunk| {
        f(t * per, chunk.len() / per_example_out, chunk)
    });
}

/// Runs `f(t, chunk t)` for every `chunk_len`-long chunk of `out` on candle's persistent
/// thread pool (its workers and this thread, each taking the next chunk until none is left):
/// no threads are started per call.
fn on_pool<F: Fn(usize, &mut [f32]) + Sync>(out: &mut [f32], chunk_len: usize, f: F) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let chunks: Vec<Mutex<&mut [f32]>> = out.chunks_mut(chunk_len).map(Mutex::new).collect();
    let next = AtomicUsize::new(0);
    candle_core::utils::barrier_pool().execute(|_| loop {
        let t = next.fetch_add(1, Ordering::Relaxed);
        let Some(chunk) = chunks.get(t) else { break };
        // Each chunk is taken once: the lock is never contended.
        f(
            t,
            &mut chunk.lock().expect("a chunk's lock is never poisoned"),
        );
    });
}

/// The forward op: `x`, `w` → `y`.
struct ConvSame {
    k: usize,
}

impl CustomOp2 for ConvSame {
    fn name(&self) -> &'static str {
        "conv_same"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1, l2, self.k)?;
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let (hw, ckk, o) = (d.hw(), d.ckk(), d.o);
        let mut y = vec![0f32; d.n * o * hw];
        over_batch(d.n, o * hw, &mut y, |first, count, out| {
            let mut columns = Columns::new(d);
            for i in 0..count {
                let e = first + i;
                let cols = columns.of(&x[e * d.c * hw..(e + 1) * d.c * hw]);
                let dst = &mut out[i * o * hw..(i + 1) * o * hw];
                gemm(
                    (o, hw, ckk),
                    dst,
                    (hw, 1),
                    false,
                    w,
                    (ckk, 1),
                    cols,
                    (hw, 1),
                );
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((d.n, o, d.h, d.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(
            w,
            &ConvSameInput {
                k: self.k,
                x: x.shape().clone(),
            },
        )?;
        let dw = dy.apply_op2_no_bwd(
            x,
            &ConvSameWeight {
                k: self.k,
                w: w.shape().clone(),
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The gradient with respect to the input: `dy`, `w` → `dx = col2im(Wᵀ·dy)`.
struct ConvSameInput {
    k: usize,
    x: Shape,
}

impl CustomOp2 for ConvSameInput {
    fn name(&self) -> &'static str {
        "conv_same_input_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(&Layout::contiguous(self.x.clone()), l2, self.k)?;
        let (dy, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let (hw, ckk, o, c) = (d.hw(), d.ckk(), d.o, d.c);
        let mut dx = vec![0f32; d.n * c * hw];
        over_batch(d.n, c * hw, &mut dx, |first, count, out| {
            let mut columns = Columns::new(d);
            let mut cols = vec![0f32; if d.k == 1 { 0 } else { ckk * hw }];
            for i in 0..count {
                let e = first + i;
                let g = &dy[e * o * hw..(e + 1) * o * hw];
                let dst = &mut out[i * c * hw..(i + 1) * c * hw];
                // cols[CKK×HW] = Wᵀ · dy_e (Wᵀ's (i, j) is w[j·CKK + i]); for k = 1 the
                // columns are the gradient itself.
                if d.k == 1 {
                    gemm((ckk, hw, o), dst, (hw, 1), false, w, (1, ckk), g, (hw, 1));
                } else {
                    gemm(
                        (ckk, hw, o),
                        &mut cols,
                        (hw, 1),
                        false,
                        w,
                        (1, ckk),
                        g,
                        (hw, 1),
                    );
                    columns.add_back(&cols, dst);
                }
            }
        });
        Ok((CpuStorage::F32(dx), self.x.clone()))
    }
}

/// The gradient with respect to the weight: `dy`, `x` → `dw = Σ_e dy_e · cols_eᵀ`.
struct ConvSameWeight {
    k: usize,
    w: Shape,
}

impl CustomOp2 for ConvSameWeight {
    fn name(&self) -> &'static str {
        "conv_same_weight_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(l2, &Layout::contiguous(self.w.clone()), self.k)?;
        let (dy, x) = (slice(s1, l1)?, slice(s2, l2)?);
        let (hw, ckk, o, c) = (d.hw(), d.ckk(), d.o, d.c);
        let threads = candle_core::utils::get_num_threads().clamp(1, d.n.max(1));
        // One partial sum per thread, added at the end.
        let mut partial = vec![0f32; threads * o * ckk];
        let per = d.n.div_ceil(threads);
        let work = |t: usize, acc: &mut [f32]| {
            let mut columns = Columns::new(d);
            for e in (t * per)..((t + 1) * per).min(d.n) {
                let cols = columns.of(&x[e * c * hw..(e + 1) * c * hw]);
                let g = &dy[e * o * hw..(e + 1) * o * hw];
                // acc[O×CKK] += dy_e[O×HW] · colsᵀ: colsᵀ's (i, j) is cols[j·HW + i].
                gemm((o, ckk, hw), acc, (ckk, 1), true, g, (hw, 1), cols, (1, hw));
            }
        };
        if threads == 1 {
            work(0, &mut partial);
        } else {
            on_pool(&mut partial, o * ckk, work);
        }
        let (first, rest) = partial.split_at_mut(o * ckk);
        for acc in rest.chunks(o * ckk) {
            for (a, b) in first.iter_mut().zip(acc) {
                *a += b;
            }
        }
        partial.truncate(o * ckk);
        Ok((CpuStorage::F32(partial), self.w.clone()))
    }
}

/// `y[N, C, H, W] + b[C]` per channel, whose gradient for `b` (the sum of `dy` over
/// examples and pixels) is one pass over `dy`: candle's autodiff of a broadcast add reduces
/// over the broadcast dimensions with a strided fold that took a fifth of a Glow step.
pub fn add_channel_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    if y.dtype() != DType::F32 || b.dtype() != DType::F32 || !y.device().is_cpu() {
        return y.broadcast_add(&b.reshape((1, (), 1, 1))?);
    }
    let (y, b) = (y.contiguous()?, b.contiguous()?);
    y.apply_op2(&b, ChannelBias)
}

/// The forward op of [`add_channel_bias`].
struct ChannelBias;

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "add_channel_bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        if l2.shape().elem_count() != c {
            candle_core::bail!("add_channel_bias: y {:?}, b {:?}", l1.shape(), l2.shape());
        }
        let (y, b) = (slice(s1, l1)?, slice(s2, l2)?);
        let hw = h * w;
        let mut out = y.to_vec();
        for (i, plane) in out.chunks_mut(hw.max(1)).enumerate().take(n * c) {
            let v = b[i % c];
            plane.iter_mut().for_each(|x| *x += v);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = dy.contiguous()?.apply_op1_no_bwd(&ChannelSum)?;
        Ok((Some(dy.clone()), Some(db.reshape(b.shape())?)))
    }
}

/// `dy[N, C, H, W]` summed over examples and pixels: `[C]`.
struct ChannelSum;

impl candle_core::CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel_sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let dy = slice(s, l)?;
        let hw = h * w;
        let mut sum = vec![0f64; c];
        for (i, plane) in dy.chunks(hw.max(1)).enumerate().take(n * c) {
            sum[i % c] += plane.iter().map(|&v| f64::from(v)).sum::<f64>();
        }
        let sum: Vec<f32> = sum.into_iter().map(|v| v as f32).collect();
        Ok((CpuStorage::F32(sum), Shape::from(c)))
    }
}
