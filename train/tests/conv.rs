//! The image couplings' convolution (flowtrain::conv): its custom CPU op against a direct
//! convolution written out here, its gradients (input, weight, bias) against finite
//! differences and against the autodiff of the same convolution built from candle ops, with
//! both ways of computing dx (scatter-add, and the flipped-kernel convolution when there are
//! fewer outputs than inputs), and the same answer on any number of threads.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{flat, max_diff, uniform};
use flowtrain::conv::{conv_same, conv_same_candle};

/// y[n, o, i, j] = b[o] + Σ_c Σ_dy Σ_dx w[o, c, dy, dx] · x[n, c, i + dy − p, j + dx − p].
fn direct(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    (n, c, h, wd): (usize, usize, usize, usize),
    o: usize,
    k: usize,
) -> Vec<f32> {
    let p = (k / 2) as isize;
    let mut y = vec![0f32; n * o * h * wd];
    for e in 0..n {
        for oo in 0..o {
            for i in 0..h as isize {
                for j in 0..wd as isize {
                    let mut acc = f64::from(b[oo]);
                    for cc in 0..c {
                        for dy in 0..k as isize {
                            for dx in 0..k as isize {
                                let (si, sj) = (i + dy - p, j + dx - p);
                                if si < 0 || sj < 0 || si >= h as isize || sj >= wd as isize {
                                    continue;
                                }
                                let xv = x[((e * c + cc) * h + si as usize) * wd + sj as usize];
                                let wv = w[((oo * c + cc) * k + dy as usize) * k + dx as usize];
                                acc += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    y[((e * o + oo) * h + i as usize) * wd + j as usize] = acc as f32;
                }
            }
        }
    }
    y
}

/// The shapes the tests use: Glow's 3×3 and 1×1 layers, a non-square image, a 5×5 kernel,
/// more output channels than inputs (dx by scatter-add) and fewer (dx by the flipped kernel).
/// (x's shape [N, C, H, W], output channels, kernel size).
type Case = ((usize, usize, usize, usize), usize, usize);

const CASES: [Case; 5] = [
    ((3, 4, 4, 4), 8, 3),
    ((2, 8, 2, 2), 6, 3),
    ((3, 2, 5, 3), 4, 3),
    ((2, 3, 6, 5), 2, 5),
    ((4, 6, 3, 4), 5, 1),
];

#[test]
fn the_custom_op_equals_a_direct_convolution() {
    let dev = Device::Cpu;
    for (i, &(shape, o, k)) in CASES.iter().enumerate() {
        let (n, c, h, wd) = shape;
        let xv = uniform(n * c * h * wd, 1 + i as u64, 1.0);
        let wv = uniform(o * c * k * k, 100 + i as u64, 1.0);
        let bv = uniform(o, 300 + i as u64, 1.0);
        let x = Tensor::from_vec(xv.clone(), shape, &dev).unwrap();
        let w = Tensor::from_vec(wv.clone(), (o, c, k, k), &dev).unwrap();
        let b = Tensor::from_vec(bv.clone(), o, &dev).unwrap();
        let got = flat(&conv_same(&x, &w, &b, k).unwrap());
        let want = direct(&xv, &wv, &bv, shape, o, k);
        assert!(
            max_diff(&got, &want) < 1e-5,
            "case {i}: {}",
            max_diff(&got, &want)
        );
        // A non-contiguous input (a transposed view) gives the same.
        let xt = x
            .transpose(2, 3)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let again = flat(&conv_same(&xt, &w, &b, k).unwrap());
        assert_eq!(got, again, "case {i}: strided input");
    }
}

type Conv = fn(&Tensor, &Tensor, &Tensor, usize) -> candle_core::Result<Tensor>;

/// The reference: candle's gather-and-matmul convolution and a broadcast add of the bias.
fn reference(x: &Tensor, w: &Tensor, b: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    conv_same_candle(x, w, k)?.broadcast_add(&b.reshape((1, (), 1, 1))?)
}

/// The gradients of the loss Σ y ⊙ r (r fixed and random) through `conv`: (dx, dw, db).
fn grads(
    conv: Conv,
    xv: &[f32],
    wv: &[f32],
    shape: (usize, usize, usize, usize),
    o: usize,
    k: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::from_vec(xv.to_vec(), shape, &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::from_vec(wv.to_vec(), (o, shape.1, k, k), &dev).unwrap())
        .unwrap();
    let b = Var::from_tensor(&Tensor::from_vec(uniform(o, 9, 1.0), o, &dev).unwrap()).unwrap();
    let y = conv(x.as_tensor(), w.as_tensor(), b.as_tensor(), k).unwrap();
    let r = Tensor::from_vec(uniform(y.elem_count(), 7, 1.0), y.shape(), &dev).unwrap();
    let loss = (y * r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let grad = |v: &Var| flat(grads.get(v).unwrap());
    (grad(&x), grad(&w), grad(&b))
}

#[test]
fn gradients_match_finite_differences_and_the_candle_autodiff() {
    for (i, &(shape, o, k)) in CASES.iter().enumerate() {
        let (n, c, h, wd) = shape;
        let xv = uniform(n * c * h * wd, 11 + i as u64, 1.0);
        let wv = uniform(o * c * k * k, 200 + i as u64, 1.0);
        let (dx, dw, db) = grads(conv_same, &xv, &wv, shape, o, k);
        // Against candle's autodiff of the gather-and-matmul convolution: every element.
        let (dx_ref, dw_ref, db_ref) = grads(reference, &xv, &wv, shape, o, k);
        assert!(
            max_diff(&dx, &dx_ref) < 1e-4,
            "case {i}: dx {}",
            max_diff(&dx, &dx_ref)
        );
        assert!(
            max_diff(&dw, &dw_ref) < 1e-4,
            "case {i}: dw {}",
            max_diff(&dw, &dw_ref)
        );
        // db[o] = Σ r over the examples and pixels of output o.
        let r = uniform(n * o * h * wd, 7, 1.0);
        let db_sum: Vec<f32> = (0..o)
            .map(|oo| {
                (0..n)
                    .flat_map(|e| &r[(e * o + oo) * h * wd..(e * o + oo + 1) * h * wd])
                    .sum()
            })
            .collect();
        assert!(
            max_diff(&db, &db_ref) < 1e-4,
            "case {i}: db {db:?} vs {db_ref:?}"
        );
        assert!(
            max_diff(&db, &db_sum) < 1e-4,
            "case {i}: db {db:?} vs {db_sum:?}"
        );
        // Against central differences of the loss, computed in f64 by the direct convolution.
        let bv = uniform(o, 9, 1.0);
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            direct(x, w, &bv, shape, o, k)
                .iter()
                .zip(&r)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        };
        let eps = 1e-2f32;
        for j in (0..xv.len()).step_by(7) {
            let (mut up, mut down) = (xv.clone(), xv.clone());
            up[j] += eps;
            down[j] -= eps;
            let fd = (loss(&up, &wv) - loss(&down, &wv)) / (2.0 * f64::from(eps));
            assert!(
                (fd - f64::from(dx[j])).abs() < 2e-3 * (1.0 + fd.abs()),
                "case {i}: dx[{j}] {} vs {fd}",
                dx[j]
            );
        }
        for j in (0..wv.len()).step_by(3) {
            let (mut up, mut down) = (wv.clone(), wv.clone());
            up[j] += eps;
            down[j] -= eps;
            let fd = (loss(&xv, &up) - loss(&xv, &down)) / (2.0 * f64::from(eps));
            assert!(
                (fd - f64::from(dw[j])).abs() < 2e-3 * (1.0 + fd.abs()),
                "case {i}: dw[{j}] {} vs {fd}",
                dw[j]
            );
        }
        // Non-zero gradients everywhere that matters: the test could not pass on zeros.
        assert!(
            dx.iter().filter(|v| v.abs() > 1e-3).count() > dx.len() / 2,
            "case {i}"
        );
        assert!(
            dw.iter().filter(|v| v.abs() > 1e-3).count() > dw.len() / 2,
            "case {i}"
        );
    }
}

#[test]
fn float64_takes_the_candle_path_with_the_same_result() {
    let dev = Device::Cpu;
    let ((n, c, h, wd), o, k) = CASES[0];
    let xv = uniform(n * c * h * wd, 3, 1.0);
    let wv = uniform(o * c * k * k, 4, 1.0);
    let x = Tensor::from_vec(xv.clone(), (n, c, h, wd), &dev).unwrap();
    let w = Tensor::from_vec(wv.clone(), (o, c, k, k), &dev).unwrap();
    let b = Tensor::from_vec(uniform(o, 5, 1.0), o, &dev).unwrap();
    let y32 = flat(&conv_same(&x, &w, &b, k).unwrap());
    let y64 = conv_same(
        &x.to_dtype(DType::F64).unwrap(),
        &w.to_dtype(DType::F64).unwrap(),
        &b.to_dtype(DType::F64).unwrap(),
        k,
    )
    .unwrap();
    let y64 = flat(&y64);
    assert!(max_diff(&y32, &y64) < 1e-5);
}

#[test]
fn any_number_of_threads_gives_the_same_answer() {
    // candle reads RAYON_NUM_THREADS at every call; this test has its own process (nextest).
    // dx by scatter-add (8 outputs from 4 channels) and by the flipped kernel (4 from 8).
    for ((n, c, h, wd), o, k) in [((7, 4, 4, 4), 8, 3), ((7, 8, 4, 4), 4, 3)] {
        let xv = uniform(n * c * h * wd, 5, 1.0);
        let wv = uniform(o * c * k * k, 6, 1.0);
        let run = |threads: &str| {
            std::env::set_var("RAYON_NUM_THREADS", threads);
            let dev = Device::Cpu;
            let x = Tensor::from_vec(xv.clone(), (n, c, h, wd), &dev).unwrap();
            let w = Tensor::from_vec(wv.clone(), (o, c, k, k), &dev).unwrap();
            let b = Tensor::from_vec(uniform(o, 8, 1.0), o, &dev).unwrap();
            let y = flat(&conv_same(&x, &w, &b, k).unwrap());
            let (dx, dw, db) = grads(conv_same, &xv, &wv, (n, c, h, wd), o, k);
            (y, dx, dw, db)
        };
        let one = run("1");
        for threads in ["2", "3", "16"] {
            let many = run(threads);
            // One GEMM per thread's examples: the sums run in the same order for any split.
            assert!(
                max_diff(&one.0, &many.0) < 1e-6,
                "{threads} threads: forward"
            );
            assert!(max_diff(&one.1, &many.1) < 1e-6, "{threads} threads: dx");
            // dW and db add per-thread partial sums: the order of the additions differs.
            assert!(max_diff(&one.2, &many.2) < 1e-5, "{threads} threads: dw");
            assert!(max_diff(&one.3, &many.3) < 1e-5, "{threads} threads: db");
        }
    }
}
