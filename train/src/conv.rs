//! The stride-1 "same" convolution that image couplings train with, as one candle custom op
//! on the CPU. The batch is split into one chunk per thread (on candle's persistent pool);
//! a chunk's im2col matrix `[C·k·k, m·H·W]` is gathered through one index table per call
//! (padding read as a zero kept past each example) and multiplied by the weight in one GEMM
//! call over all its examples' pixels — these images are small (4×4 pixels is common), so a
//! GEMM per example would be mostly call overhead. The bias is added as the result is laid
//! back out per example. The backward pass is one more op: dW from the columns the forward
//! pass kept, db, and dx as a scatter-add or, when it touches less memory, as the
//! convolution of dY with the flipped kernel.
//!
//! It replaces an im2col built from candle ops (pad, an index_select gather, a matmul over a
//! transposed copy), whose gather, scatter-add gradient and copies were most of a Glow step.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::nn::channel_matmul;
use crate::parallel::{on_pool, pieces, values, Split};

/// `x[N, C, H, W]` convolved with `w[O, C, k, k]` (k odd, zero padding k/2) plus the bias
/// `b[O]` per output channel: `[N, O, H, W]`. Differentiable in all three. float32 on the
/// CPU takes the custom op; anything else (float64 in tests, another device) the same
/// convolution built from candle ops.
pub fn conv_same(x: &Tensor, w: &Tensor, b: &Tensor, k: usize) -> Result<Tensor> {
    let f32_cpu = [x, w, b].iter().all(|t| t.dtype() == DType::F32) && x.device().is_cpu();
    if !f32_cpu {
        return conv_same_candle(x, w, k)?.broadcast_add(&b.reshape((1, (), 1, 1))?);
    }
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    x.apply_op3(
        &w,
        &b,
        ConvSame {
            k,
            saved: Mutex::new(None),
        },
    )
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
    /// With fewer outputs than inputs (Glow's last layer: hidden → 2C), a k×k layer works
    /// on the output side: Z = W_s·x for every tap s in one GEMM, then y sums Z shifted by
    /// each tap — k²·O gathered rows instead of k²·C; and its backward pass gathers dY
    /// (O channels) instead of scattering into x (C channels).
    fn output_side(&self) -> bool {
        self.k > 1 && self.o < self.c
    }
    /// The rows of the columns a chunk keeps for dW: x itself on the output side.
    fn kept_rows(&self) -> usize {
        if self.output_side() {
            self.c
        } else {
            self.ckk()
        }
    }
    /// The same sizes with a 1×1 kernel (im2col is then a transpose).
    fn pointwise(&self) -> Dims {
        Dims { k: 1, ..*self }
    }
}

/// For each entry of an example's columns (row `(c·k + dy)·k + dx`, pixel `y·W + x`), the
/// index of the input value it reads, `x[c][y + dy − k/2][x + dx − k/2]` in `[C·H·W]`, or
/// `C·H·W` outside the image: a zero kept one past the example's values. Built once per call
/// and shared by every example (the images are small, so the table is: 36·16 entries for a
/// 3×3 layer on 4 channels of 4×4). Empty for k = 1, which needs none.
fn gather_table(d: Dims) -> Vec<u32> {
    if d.k == 1 {
        return Vec::new();
    }
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

/// The im2col matrix `[C·k·k, m·H·W]` of `m` examples `x[m, C, H, W]`, written into `cols`
/// (cleared first; written in order, so nothing is zeroed first): column `e·H·W + p` holds
/// what output pixel p of example e reads (k = 1: the examples' pixels, channels as rows).
/// Row `(c·k + dy)·k + dx` matches the kernel layout `[O, C, k, k]`.
fn im2col(d: Dims, table: &[u32], x: &[f32], cols: &mut Vec<f32>) {
    let (hw, chw) = (d.hw(), d.c * d.hw());
    cols.clear();
    if d.k == 1 {
        for c in 0..d.c {
            for ex in x.chunks(chw) {
                cols.extend_from_slice(&ex[c * hw..(c + 1) * hw]);
            }
        }
        return;
    }
    // Each example followed by a zero, which the table's outside taps (index C·H·W) read:
    // the gather below then needs no branch.
    PADDED.with(|p| {
        let mut padded = p.borrow_mut();
        padded.clear();
        for ex in x.chunks(chw) {
            padded.extend_from_slice(ex);
            padded.push(0.0);
        }
        for taps in table.chunks(hw) {
            for ex in padded.chunks(chw + 1) {
                cols.extend(taps.iter().map(|&i| ex[i as usize]));
            }
        }
    });
}

/// `out[m, R, H·W]` from a matrix `[R, m·H·W]` (column `e·H·W + p`), plus `bias[r]` if given.
fn to_examples(t: &[f32], rows: usize, hw: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    let row = t.len() / rows.max(1);
    for (e, ex) in out.chunks_mut(rows * hw).enumerate() {
        for (r, plane) in ex.chunks_mut(hw).enumerate() {
            let src = &t[r * row + e * hw..r * row + (e + 1) * hw];
            let b = bias.map_or(0.0, |b| b[r]);
            for (o, &v) in plane.iter_mut().zip(src) {
                *o = v + b;
            }
        }
    }
}

/// Buffers reused from call to call, so that a training step does not fault in and clear
/// fresh pages for every matrix: the forward pass's columns go back to [`COLUMNS`] once the
/// backward pass has used them, and each thread keeps its scratch matrices.
static COLUMNS: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// At most this many column buffers wait in [`COLUMNS`].
const POOLED: usize = 256;

fn column_buffer() -> Vec<f32> {
    COLUMNS
        .lock()
        .expect("never poisoned")
        .pop()
        .unwrap_or_default()
}

fn recycle(buffers: Vec<Vec<f32>>) {
    let mut pool = COLUMNS.lock().expect("never poisoned");
    for b in buffers {
        if pool.len() < POOLED {
            pool.push(b);
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = Default::default();
    static PADDED: std::cell::RefCell<Vec<f32>> = Default::default();
}

/// `f` with this thread's three scratch vectors (of any length and contents).
fn with_scratch<R>(f: impl FnOnce(&mut [Vec<f32>; 3]) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// The first `len` elements of `v`, grown if needed; their contents are whatever was there.
fn prefix(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// The forward pass's columns, one matrix per chunk, and the split that made them, handed
/// to the backward pass.
type Saved = Mutex<Option<(Split, Vec<Vec<f32>>)>>;

/// Largest im2col matrix (in floats) the forward pass keeps for the weight gradient; a
/// larger one is gathered again in the backward pass.
const KEEP_COLUMNS: usize = 1 << 24;

/// The forward op: `x`, `w`, `b` → `y`. It keeps its im2col matrices for the backward pass.
struct ConvSame {
    k: usize,
    /// The columns of the forward pass, one matrix per chunk, and the split that made them.
    saved: Saved,
}

impl CustomOp3 for ConvSame {
    fn name(&self) -> &'static str {
        "conv_same"
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
        let d = Dims::of(l1, l2, self.k)?;
        let (x, w, b) = (
            values(s1, l1, "conv_same")?,
            values(s2, l2, "conv_same")?,
            values(s3, l3, "conv_same")?,
        );
        if b.len() != d.o {
            candle_core::bail!("conv_same: {} biases for {} outputs", b.len(), d.o);
        }
        let (hw, ckk, o, chw) = (d.hw(), d.ckk(), d.o, d.c * d.hw());
        let table = gather_table(d);
        let (kk, c) = (d.k * d.k, d.c);
        // Output side: the taps' table of one channel, and W as [k²·O, C] (row (s, o)).
        let taps = gather_table(Dims { c: 1, ..d });
        let mut stacked = Vec::new();
        if d.output_side() {
            stacked.resize(kk * o * c, 0.0);
            for (i, &v) in w.iter().enumerate() {
                let (oo, ci, s) = (i / (c * kk), (i / kk) % c, i % kk);
                stacked[(s * o + oo) * c + ci] = v;
            }
        }
        let split = Split::of(d.n);
        let mut y = vec![0f32; d.n * o * hw];
        let mut cols: Vec<Vec<f32>> = (0..split.chunks).map(|_| column_buffer()).collect();
        let items: Vec<_> = pieces(&mut y, split.per * o * hw)
            .into_iter()
            .zip(cols.iter_mut())
            .collect();
        on_pool(items, |t, (y, cols)| {
            let r = split.range(t, d.n);
            let m = r.len() * hw;
            let x = &x[r.start * chw..r.end * chw];
            if !d.output_side() {
                im2col(d, &table, x, cols);
                with_scratch(|[out, ..]| {
                    let out = prefix(out, o * m);
                    gemm((o, m, ckk), out, (m, 1), false, w, (ckk, 1), cols, (m, 1));
                    to_examples(out, o, hw, Some(b), y);
                });
                return;
            }
            im2col(d.pointwise(), &[], x, cols);
            with_scratch(|[z, ..]| {
                let z = prefix(z, kk * o * m);
                gemm(
                    (kk * o, m, c),
                    z,
                    (m, 1),
                    false,
                    &stacked,
                    (c, 1),
                    cols,
                    (m, 1),
                );
                // y[o, p] = b[o] + Σ_s Z[(s, o), p + shift_s], taps outside the image
                // (index H·W in the table) left out.
                for (e, ex) in y.chunks_mut(o * hw).enumerate() {
                    for (oo, plane) in ex.chunks_mut(hw).enumerate() {
                        plane.fill(b[oo]);
                        for (s, tap) in taps.chunks(hw).enumerate() {
                            let row = &z[(s * o + oo) * m + e * hw..][..hw];
                            for (dst, &q) in plane.iter_mut().zip(tap) {
                                if let Some(v) = row.get(q as usize) {
                                    *dst += v;
                                }
                            }
                        }
                    }
                }
            });
        });
        if d.n * d.kept_rows() * hw <= KEEP_COLUMNS {
            *self.saved.lock().expect("never poisoned") = Some((split, cols));
        } else {
            recycle(cols);
        }
        Ok((CpuStorage::F32(y), Shape::from((d.n, o, d.h, d.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().expect("never poisoned").take();
        let grad = ConvSameGrad {
            k: self.k,
            saved: Mutex::new(saved),
        };
        let grads = dy.contiguous()?.apply_op3_no_bwd(x, w, &grad)?;
        let (nx, nw) = (x.elem_count(), w.elem_count());
        let dx = grads.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = grads.narrow(0, nx, nw)?.reshape(w.shape())?;
        let db = grads
            .narrow(0, nx + nw, b.elem_count())?
            .reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl Drop for ConvSame {
    /// Columns no backward pass took (evaluation) go back to the pool.
    fn drop(&mut self) {
        if let Some((_, cols)) = self.saved.get_mut().ok().and_then(Option::take) {
            recycle(cols);
        }
    }
}

/// The backward op: `dy`, `x`, `w` → `[dx | dW | db]` flattened into one vector:
/// dW = Σ dY·colsᵀ, db = Σ dY over examples and pixels, and dx either as col2im(Wᵀ·dY) (a
/// scatter-add through the gather's table) or, with fewer outputs than inputs, as the
/// convolution of dY with the flipped, transposed kernel (a gather over the O channels of
/// dY: fewer taps).
struct ConvSameGrad {
    k: usize,
    saved: Saved,
}

impl CustomOp3 for ConvSameGrad {
    fn name(&self) -> &'static str {
        "conv_same_grad"
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
        let d = Dims::of(l2, l3, self.k)?;
        let (dy, x, w) = (
            values(s1, l1, "conv_same")?,
            values(s2, l2, "conv_same")?,
            values(s3, l3, "conv_same")?,
        );
        let (hw, ckk, o, c, k) = (d.hw(), d.ckk(), d.o, d.c, d.k);
        let (chw, ohw) = (c * hw, o * hw);
        let table = gather_table(d);
        let (split, mut cols) = match self.saved.lock().expect("never poisoned").take() {
            Some(saved) => saved,
            None => {
                let split = Split::of(d.n);
                (split, (0..split.chunks).map(|_| Vec::new()).collect())
            }
        };
        // dx by the transposed convolution when dY has fewer channels than x.
        let transposed = d.output_side();
        let flipped_dims = Dims { c: o, o: c, ..d };
        let (flipped_table, flipped) = if transposed {
            let mut wf = vec![0f32; c * o * k * k];
            // wf[c, o, i, j] = w[o, c, k − 1 − i, k − 1 − j].
            for oo in 0..o {
                for ci in 0..c {
                    for i in 0..k {
                        for j in 0..k {
                            wf[((ci * o + oo) * k + i) * k + j] =
                                w[((oo * c + ci) * k + (k - 1 - i)) * k + (k - 1 - j)];
                        }
                    }
                }
            }
            (gather_table(flipped_dims), wf)
        } else {
            (Vec::new(), Vec::new())
        };
        let mut out = vec![0f32; d.n * chw + o * ckk + o];
        let (dx, _) = out.split_at_mut(d.n * chw);
        let mut partial = vec![0f32; split.chunks * (o * ckk + o)];
        let items: Vec<_> = pieces(dx, split.per * chw)
            .into_iter()
            .zip(pieces(&mut partial, o * ckk + o))
            .zip(cols.iter_mut())
            .collect();
        on_pool(items, |t, ((dx, acc), cols)| {
            let r = split.range(t, d.n);
            let m = r.len() * hw;
            let dy = &dy[r.start * ohw..r.end * ohw];
            if cols.len() != d.kept_rows() * m {
                let x = &x[r.start * chw..r.end * chw];
                match transposed {
                    true => im2col(d.pointwise(), &[], x, cols),
                    false => im2col(d, &table, x, cols),
                }
            }
            with_scratch(|[g, gc, gcols]| {
                // dY as a matrix [O, m·H·W], the layout of the columns.
                im2col(
                    Dims {
                        c: o,
                        ..d.pointwise()
                    },
                    &[],
                    dy,
                    g,
                );
                let (dw, db) = acc.split_at_mut(o * ckk);
                for (s, row) in db.iter_mut().zip(g.chunks(m.max(1))) {
                    *s = row.iter().sum();
                }
                if transposed {
                    let okk = o * k * k;
                    im2col(flipped_dims, &flipped_table, dy, gcols);
                    // dW[o, c, a, b] = Σ_q dY[o, q − (a, b) + pad]·x[c, q]: the flipped
                    // gather's row (o, k−1−a, k−1−b) times x. G = gcols·xᵀ, stored
                    // column-major (G[c·O·k² + row]) like dW below.
                    let kk = k * k;
                    let g2 = prefix(gc, okk * c);
                    gemm(
                        (okk, c, m),
                        g2,
                        (1, okk),
                        false,
                        gcols,
                        (m, 1),
                        cols,
                        (1, m),
                    );
                    for ci in 0..c {
                        for oo in 0..o {
                            for a in 0..kk {
                                dw[(ci * kk + a) * o + oo] = g2[ci * okk + oo * kk + kk - 1 - a];
                            }
                        }
                    }
                    let t = prefix(gc, c * m);
                    gemm(
                        (c, m, okk),
                        t,
                        (m, 1),
                        false,
                        &flipped,
                        (okk, 1),
                        gcols,
                        (m, 1),
                    );
                    to_examples(t, c, hw, None, dx);
                    return;
                }
                // dW[O×CKK] = g · colsᵀ (colsᵀ's (i, j) is cols[j·m + i]), stored
                // column-major (dw[j·O + i]): the GEMM then packs the small g, not the
                // columns, and the sum below lays it out row-major.
                gemm((o, ckk, m), dw, (1, o), false, g, (m, 1), cols, (1, m));
                // The columns' gradient Wᵀ·g (Wᵀ's (i, j) is w[j·CKK + i]).
                let gc = prefix(gc, ckk * m);
                gemm((ckk, m, o), gc, (m, 1), false, w, (1, ckk), g, (m, 1));
                if k == 1 {
                    to_examples(gc, c, hw, None, dx);
                    return;
                }
                // col2im: the gather's adjoint, a scatter-add through the same table.
                for (e, dx) in dx.chunks_mut(chw).enumerate() {
                    for (row, taps) in table.chunks(hw).enumerate() {
                        let src = &gc[row * m + e * hw..row * m + (e + 1) * hw];
                        for (&v, &i) in src.iter().zip(taps) {
                            if let Some(slot) = dx.get_mut(i as usize) {
                                *slot += v;
                            }
                        }
                    }
                }
            });
        });
        recycle(cols);
        // The chunks' partial dW (column-major) and db, summed into the tail of the output.
        let (first, rest) = partial.split_at_mut(o * ckk + o);
        for acc in rest.chunks(o * ckk + o) {
            for (a, b) in first.iter_mut().zip(acc) {
                *a += b;
            }
        }
        let (dw, db) = out[d.n * chw..].split_at_mut(o * ckk);
        for (j, column) in first[..o * ckk].chunks(o).enumerate() {
            for (i, &v) in column.iter().enumerate() {
                dw[i * ckk + j] = v;
            }
        }
        db.copy_from_slice(&first[o * ckk..]);
        Ok((CpuStorage::F32(out), Shape::from(d.n * chw + o * ckk + o)))
    }
}
