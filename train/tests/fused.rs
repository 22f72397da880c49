//! Glow's fused image coupling map (flowtrain::fused): its values, log-determinants and
//! gradients against the same map composed from candle ops (what the coupling computes in
//! float64 and on other devices), and its gradients against central differences.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{flat, max_diff, uniform};
use flowtrain::fused::image_sigmoid_affine;

/// The map from candle ops, as `Elementwise::SigmoidAffine` and the image partition do.
fn composed(x: &Tensor, h: &Tensor, moved: &Tensor) -> (Tensor, Tensor) {
    let c = x.dim(1).unwrap();
    let keep = (moved.ones_like().unwrap() - moved).unwrap();
    let t = h.narrow(1, 0, c).unwrap();
    let s = h.narrow(1, c, c).unwrap();
    let ls = candle_nn::ops::sigmoid(&(s + 2.0).unwrap())
        .unwrap()
        .log()
        .unwrap();
    let y = (x + t).unwrap().mul(&ls.exp().unwrap()).unwrap();
    let out = (x.broadcast_mul(&keep).unwrap() + y.broadcast_mul(moved).unwrap()).unwrap();
    let ld = ls
        .broadcast_mul(moved)
        .unwrap()
        .flatten_from(1)
        .unwrap()
        .sum(1)
        .unwrap();
    (out, ld)
}

/// The masks the couplings use: channel halves and a checkerboard, of [C, H, W].
fn masks(c: usize, h: usize, w: usize) -> Vec<Vec<f32>> {
    let channel = (0..c * h * w)
        .map(|i| f32::from(i / (h * w) >= c / 2))
        .collect();
    let checker = (0..c * h * w)
        .map(|i| f32::from(((i / w) % h + i % w) % 2 == 1))
        .collect();
    vec![channel, checker]
}

/// (y, ld, dL/dx, dL/dh) for L = Σ y ⊙ r + Σ ld ⊙ q, through `f`.
type Map = dyn Fn(&Tensor, &Tensor, &[f32]) -> (Tensor, Tensor);

fn run(
    f: &Map,
    xv: &[f32],
    hv: &[f32],
    shape: (usize, usize, usize, usize),
    mask: &[f32],
) -> [Vec<f32>; 4] {
    let dev = Device::Cpu;
    let (n, c, hh, w) = shape;
    let x = Var::from_tensor(&Tensor::from_vec(xv.to_vec(), shape, &dev).unwrap()).unwrap();
    let h =
        Var::from_tensor(&Tensor::from_vec(hv.to_vec(), (n, 2 * c, hh, w), &dev).unwrap()).unwrap();
    let (y, ld) = f(x.as_tensor(), h.as_tensor(), mask);
    let r = Tensor::from_vec(uniform(y.elem_count(), 5, 1.0), y.shape(), &dev).unwrap();
    let q = Tensor::from_vec(uniform(n, 6, 1.0), n, &dev).unwrap();
    let loss =
        ((&y * &r).unwrap().sum_all().unwrap() + (&ld * &q).unwrap().sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap();
    [
        flat(&y),
        flat(&ld),
        flat(g.get(&x).unwrap()),
        flat(g.get(&h).unwrap()),
    ]
}

fn fused(x: &Tensor, h: &Tensor, mask: &[f32]) -> (Tensor, Tensor) {
    image_sigmoid_affine(x, h, mask).unwrap()
}

fn reference(x: &Tensor, h: &Tensor, mask: &[f32]) -> (Tensor, Tensor) {
    let (_, c, hh, w) = x.dims4().unwrap();
    let moved = Tensor::from_vec(mask.to_vec(), (1, c, hh, w), x.device()).unwrap();
    composed(x, h, &moved)
}

#[test]
fn the_fused_map_equals_the_composed_one_in_values_and_gradients() {
    for (shape, threads) in [
        ((5, 4, 3, 2), "1"),
        ((9, 6, 2, 2), "2"),
        ((3, 2, 4, 4), "3"),
    ] {
        // One process per test (nextest): the thread count is this test's own.
        std::env::set_var("RAYON_NUM_THREADS", threads);
        let (n, c, h, w) = shape;
        for (m, mask) in masks(c, h, w).iter().enumerate() {
            let xv = uniform(n * c * h * w, 1, 2.0);
            // Scales from tiny to saturated sigmoids.
            let hv = uniform(2 * n * c * h * w, 2, 6.0);
            let [y, ld, dx, dh] = run(&fused, &xv, &hv, shape, mask);
            let [y0, ld0, dx0, dh0] = run(&reference, &xv, &hv, shape, mask);
            let what = format!("{shape:?}, mask {m}");
            assert!(max_diff(&y, &y0) < 1e-5, "{what}: y {}", max_diff(&y, &y0));
            assert!(
                max_diff(&ld, &ld0) < 1e-4,
                "{what}: ld {}",
                max_diff(&ld, &ld0)
            );
            assert!(
                max_diff(&dx, &dx0) < 1e-5,
                "{what}: dx {}",
                max_diff(&dx, &dx0)
            );
            assert!(
                max_diff(&dh, &dh0) < 1e-5,
                "{what}: dh {}",
                max_diff(&dh, &dh0)
            );
            // Kept elements pass through: y = x and dx = r there, dh = 0 for them.
            let kept = |i: usize| mask[i % (c * h * w)] == 0.0;
            assert!(
                (0..y.len()).filter(|&i| kept(i)).all(|i| y[i] == xv[i]),
                "{what}"
            );
            assert!(
                dh.iter().filter(|v| v.abs() > 1e-4).count() > dh.len() / 4,
                "{what}: dh is mostly zero"
            );
        }
    }
}

#[test]
fn gradients_match_central_differences() {
    let shape = (3, 4, 2, 2);
    let (n, c, h, w) = shape;
    let mask = &masks(c, h, w)[1];
    let xv = uniform(n * c * h * w, 11, 2.0);
    let hv = uniform(2 * n * c * h * w, 12, 3.0);
    let [_, _, dx, dh] = run(&fused, &xv, &hv, shape, mask);
    let loss = |x: &[f32], hh: &[f32]| -> f64 {
        let dev = Device::Cpu;
        let xt = Tensor::from_vec(x.to_vec(), shape, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let ht = Tensor::from_vec(hh.to_vec(), (n, 2 * c, h, w), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let moved = Tensor::from_vec(mask.clone(), (1, c, h, w), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let (y, ld) = composed(&xt, &ht, &moved);
        let r = Tensor::from_vec(uniform(y.elem_count(), 5, 1.0), y.shape(), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let q = Tensor::from_vec(uniform(n, 6, 1.0), n, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let l =
            ((y * r).unwrap().sum_all().unwrap() + (ld * q).unwrap().sum_all().unwrap()).unwrap();
        l.to_scalar::<f64>().unwrap()
    };
    let eps = 1e-2f32;
    let check = |grad: &[f32], at: &dyn Fn(usize, f32) -> f64, what: &str| {
        for (j, &g) in grad.iter().enumerate() {
            let fd = (at(j, eps) - at(j, -eps)) / (2.0 * f64::from(eps));
            assert!(
                (fd - f64::from(g)).abs() < 2e-3 * (1.0 + fd.abs()),
                "{what}[{j}]: {g} vs {fd}"
            );
        }
    };
    check(
        &dx,
        &|j, e| {
            let mut x = xv.clone();
            x[j] += e;
            loss(&x, &hv)
        },
        "dx",
    );
    check(
        &dh,
        &|j, e| {
            let mut hh = hv.clone();
            hh[j] += e;
            loss(&xv, &hh)
        },
        "dh",
    );
}
