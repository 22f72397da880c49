//! The rational-quadratic spline map (neural spline flows): invertible to 1e-5 everywhere —
//! inside bins, exactly at the knots, at ±B and in the identity tails — with a log-derivative
//! that matches autodiff and finite differences, monotone on a dense grid, the identity at
//! zero parameters, and its ONNX twin equal in both directions; and spline couplings on rows
//! and images as bijectors.

mod common;

use candle_core::{Tensor, Var};
use common::*;
use flowpack::runtime::{GraphSession, SessionOptions};
use flowpack::TensorSpec;
use flowtrain::bijectors::{Coupling, Elementwise, ImageMask, Mask, RqSpline};
use flowtrain::nn::Activation;
use flowtrain::onnx::Graph;
use flowtrain::params::Params;
use prost::Message;

const K: usize = 6;
const B: f64 = 3.0;

fn spline() -> RqSpline {
    RqSpline::new(K, B).unwrap()
}

/// `n` rows of `d` elements, each with random parameters `[n, d, 3K − 1]` of scale `scale`.
fn params(n: usize, d: usize, seed: u64, scale: f32) -> Tensor {
    let p = 3 * K - 1;
    let v: Vec<f32> = random_rows(n * d, p, seed)
        .iter()
        .map(|x| x * scale)
        .collect();
    Tensor::from_vec(v, (n, d, p), &candle_core::Device::Cpu).unwrap()
}

/// `got` against `want` (inverse images), each element within 1e-5 (absolute and relative)
/// divided by the slope there (`log_deriv` of the forward map, capped at 1): float32 holds y
/// to about 1e-7, and inverting a map of slope f′ turns that into 1e-7/f′ in x — the
/// conditioning of the problem, not of the code.
fn assert_inverse_close(got: &[f32], want: &[f32], log_deriv: &[f32], what: &str) {
    for (i, ((g, w), l)) in got.iter().zip(want).zip(log_deriv).enumerate() {
        let slope = l.exp().min(1.0);
        let tol = 1e-5 * (1.0 + w.abs()) / slope;
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i}: {g} vs {w} (slope {slope}, tolerance {tol})"
        );
    }
}

#[test]
fn invertible_everywhere_including_knots_and_tails() {
    let s = spline();
    let (n, d) = (200, 3);
    let u = params(n, d, 1, 1.0);
    // Inside, exactly at every knot (±B included), just beyond ±B, and far out in the tails.
    let mut x = random_rows(n, d, 2)
        .iter()
        .map(|v| v * 1.2)
        .collect::<Vec<f32>>();
    let knots = to_vec(&s.knot_positions(&u).unwrap());
    for r in 0..40 {
        for j in 0..d {
            let e = r * d + j;
            x[e] = knots[e * (K + 1) + r % (K + 1)];
        }
    }
    let specials = [-B as f32 - 1e-4, B as f32 + 1e-4, -40.0, 55.0];
    for (i, v) in specials.iter().enumerate() {
        x[(40 + i) * d] = *v;
    }
    let (y, ld) = s.forward(&tensor(&x, d), &u).unwrap();
    let back = to_vec(&s.inverse(&y, &u).unwrap());
    let (yv, ldv) = (to_vec(&y), to_vec(&ld));
    assert_inverse_close(&back, &x, &ldv, "inverse(forward(x))");
    // forward(inverse(forward(x))) = forward(x) to float32 rounding, whatever the slope.
    let again = to_vec(&s.forward(&tensor(&back, d), &u).unwrap().0);
    assert_close(&again, &yv, 1e-6, 1e-6, "forward ∘ inverse on the image");
    for i in 40..44 {
        assert_eq!(yv[i * d], x[i * d], "identity in the tails");
        assert_eq!(ldv[i * d], 0.0, "log-derivative 0 in the tails");
    }
    // The knots of the first rows are at −B … B, and ±B map to themselves.
    for e in 0..d {
        assert_eq!(knots[e * (K + 1)], -B as f32);
        assert_eq!(knots[e * (K + 1) + K], B as f32);
    }
    assert_eq!(
        yv[0], -B as f32,
        "x = −B (the first knot of row 0) maps to −B"
    );
}

#[test]
fn log_derivative_matches_autodiff_and_finite_differences() {
    let s = spline();
    let (n, d) = (64, 4);
    let u = params(n, d, 5, 1.0);
    let x = random_rows(n, d, 6);
    let xv = Var::from_tensor(&tensor(&x, d)).unwrap();
    let (y, ld) = s.forward(xv.as_tensor(), &u).unwrap();
    let grad = y.sum_all().unwrap().backward().unwrap();
    let dydx = to_vec(grad.get(xv.as_tensor()).unwrap());
    let ld = to_vec(&ld);
    for (i, (g, l)) in dydx.iter().zip(&ld).enumerate() {
        assert!(
            (g.ln() - l).abs() < 1e-4,
            "element {i}: log dy/dx {} vs autodiff {}",
            l,
            g.ln()
        );
    }
    // Central finite differences (float32: a step of 1e-3, tolerance to match).
    let h = 1e-3f32;
    let shift = |delta: f32| {
        let xs: Vec<f32> = x.iter().map(|v| v + delta).collect();
        to_vec(&s.forward(&tensor(&xs, d), &u).unwrap().0)
    };
    let (up, down) = (shift(h), shift(-h));
    for i in 0..n * d {
        if (x[i].abs() as f64 - B).abs() < 2e-3 {
            continue;
        }
        // Compared as derivatives: float32 differences of y over 2e-3 carry ~1e-4 of rounding.
        let fd = (up[i] - down[i]) / (2.0 * h);
        let want = ld[i].exp();
        assert!(
            (fd - want).abs() < 5e-4 + 5e-3 * want,
            "element {i}: finite differences {fd} vs exp(log-derivative) {want}"
        );
    }
}

/// The gradient with respect to the parameters — widths, heights and derivatives — matches
/// central finite differences: what training follows. (candle_nn's fused softmax has no
/// backward pass; with it the widths and heights got no gradient and never trained.)
#[test]
fn parameter_gradients_match_finite_differences() {
    let s = spline();
    let (n, d, p) = (16, 2, 3 * K - 1);
    let u0 = to_vec(&params(n, d, 9, 1.0));
    let x = random_rows(n, d, 10)
        .iter()
        .map(|v| v * 1.5)
        .collect::<Vec<f32>>();
    // Per element: a weighted sum of y and log dy/dx, so both parts of the loss count.
    let loss = |u: &Tensor| -> Tensor {
        let (y, ld) = s.forward(&tensor(&x, d), u).unwrap();
        ((y * 0.7).unwrap() + ld).unwrap()
    };
    let uv = Var::from_tensor(
        &Tensor::from_vec(u0.clone(), (n, d, p), &candle_core::Device::Cpu).unwrap(),
    )
    .unwrap();
    let grads = loss(uv.as_tensor()).sum_all().unwrap().backward().unwrap();
    let g = to_vec(grads.get(uv.as_tensor()).unwrap());
    let h = 1e-2f32;
    let mut checked = [0usize; 3];
    for e in 0..n * d {
        for j in 0..p {
            let at = |delta: f32| {
                let mut u = u0.clone();
                u[e * p + j] += delta;
                let t = Tensor::from_vec(u, (n, d, p), &candle_core::Device::Cpu).unwrap();
                to_vec(&loss(&t))[e]
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let got = g[e * p + j];
            assert!(
                (fd - got).abs() < 2e-3 + 2e-2 * fd.abs(),
                "element {e}, parameter {j}: autodiff {got} vs finite differences {fd}"
            );
            if fd.abs() > 1e-2 {
                checked[(j / K).min(2)] += 1;
            }
        }
    }
    assert!(
        checked.iter().all(|&c| c > 20),
        "non-zero gradients checked for widths, heights and derivatives: {checked:?}"
    );
}

#[test]
fn monotone_on_a_dense_grid_and_the_identity_at_zero() {
    let s = spline();
    let m = 20_001;
    let grid: Vec<f32> = (0..m)
        .map(|i| -4.5 + 9.0 * i as f32 / (m - 1) as f32)
        .collect();
    for seed in 0..4 {
        let u = params(1, 1, 10 + seed, 2.0)
            .broadcast_as((m, 1, 3 * K - 1))
            .unwrap()
            .contiguous()
            .unwrap();
        let (y, ld) = s.forward(&tensor(&grid, 1), &u).unwrap();
        let (y, ld) = (to_vec(&y), to_vec(&ld));
        let step = 9.0 / (m - 1) as f32;
        for (i, w) in y.windows(2).enumerate() {
            assert!(w[1] >= w[0], "decreasing at grid point {i} (seed {seed})");
            // Equal neighbours only where float32 cannot tell them apart: the slope times
            // the step below a few ulps of y.
            if w[1] == w[0] {
                let rise = ld[i].exp().min(ld[i + 1].exp()) * step;
                assert!(
                    rise < 4.0 * f32::EPSILON * w[0].abs().max(1.0),
                    "flat at {i}: rise {rise}"
                );
            }
        }
        assert!(ld.iter().all(|v| v.is_finite()));
    }
    let zero = Tensor::zeros(
        (m, 1, 3 * K - 1),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (y, ld) = s.forward(&tensor(&grid, 1), &zero).unwrap();
    assert_close(
        &to_vec(&y),
        &grid,
        1e-5,
        1e-5,
        "identity at zero parameters",
    );
    assert!(to_vec(&ld).iter().all(|v| v.abs() < 1e-5));
    assert!(RqSpline::new(1, 3.0).is_err() && RqSpline::new(8, 0.0).is_err());
}

#[test]
fn onnx_twin_matches_both_directions() {
    let s = spline();
    let (n, d) = (128, 3);
    let p = 3 * K - 1;
    let u = params(n, d, 21, 1.0);
    let mut x = random_rows(n, d, 22)
        .iter()
        .map(|v| v * 1.5)
        .collect::<Vec<f32>>();
    x[0] = -B as f32;
    x[1] = B as f32;
    x[2] = 9.0;
    let uv = to_vec(&u);
    let run = |inverse: bool, values: &[f32]| -> Vec<Vec<f32>> {
        let mut g = Graph::new();
        let v = g.input("v", &[d]);
        let uu = g.input("u", &[d, p]);
        let mut outputs = Vec::new();
        if inverse {
            let x = s.emit_inverse(&mut g, &v, &uu);
            g.output(&x, "out", &[d]);
            outputs.push(TensorSpec::batched("out", &[d]));
        } else {
            let (y, ld) = s.emit_forward(&mut g, &v, &uu);
            g.output(&y, "out", &[d]);
            g.output(&ld, "log_deriv", &[d]);
            outputs.push(TensorSpec::batched("out", &[d]));
            outputs.push(TensorSpec::batched("log_deriv", &[d]));
        }
        let inputs = [
            TensorSpec::batched("v", &[d]),
            TensorSpec::batched("u", &[d, p]),
        ];
        let bytes = g.finish("spline", "").encode_to_vec();
        let mut session =
            GraphSession::new(&bytes, &inputs, &outputs, &SessionOptions::default()).unwrap();
        session.run_inputs(&[values, &uv]).unwrap()
    };
    let (y, ld) = s.forward(&tensor(&x, d), &u).unwrap();
    let got = run(false, &x);
    assert_close(&got[0], &to_vec(&y), 1e-5, 1e-4, "ONNX forward");
    assert_close(&got[1], &to_vec(&ld), 1e-5, 1e-4, "ONNX log-derivative");
    let (ys, lds) = (to_vec(&y), to_vec(&ld));
    let back = run(true, &ys);
    let want = to_vec(&s.inverse(&y, &u).unwrap());
    assert_inverse_close(&back[0], &want, &lds, "ONNX inverse vs candle");
    assert_inverse_close(&back[0], &x, &lds, "ONNX inverse(forward(x))");
}

#[test]
fn spline_couplings_on_rows_and_images_are_bijectors() {
    for (i, mask) in [Mask::Alternate, Mask::Half].into_iter().enumerate() {
        let p = Params::new(i as u64);
        let b = Coupling::rows(
            &p,
            5,
            mask,
            i == 1,
            16,
            2,
            Activation::Relu,
            Elementwise::Spline(spline()),
            0,
        )
        .unwrap();
        randomize(&p, 7 + i as u64, 0.5);
        check_bijector(&b, 5, 40 + i as u64);
    }
    for (i, mask) in [ImageMask::Checkerboard, ImageMask::Channel]
        .into_iter()
        .enumerate()
    {
        let p = Params::new(i as u64);
        let b = Coupling::image(
            &p,
            [2, 4, 4],
            mask,
            false,
            8,
            Activation::Relu,
            Elementwise::Spline(spline()),
            0,
        )
        .unwrap();
        randomize(&p, 17 + i as u64, 0.3);
        check_bijector_shaped(&b, &[2, 4, 4], &[2, 4, 4], 50 + i as u64);
    }
    // Conditional too.
    let p = Params::new(9);
    let b = Coupling::rows(
        &p,
        4,
        Mask::Alternate,
        false,
        16,
        2,
        Activation::Tanh,
        Elementwise::Spline(spline()),
        2,
    )
    .unwrap();
    randomize(&p, 3, 0.5);
    check_conditional_bijector(&b, &[4], &[4], 2, 60);
}

fn spline_made(
    order: Vec<usize>,
    seed: u64,
    context: usize,
) -> (Params, flowtrain::bijectors::Made) {
    let spline = flowtrain::bijectors::Transform::Spline(spline());
    test_made(order, seed, 24, spline, context, (500 + seed, 0.3))
}

/// The autoregressive spline (MADE with 3K − 1 outputs per feature): a bijector whose
/// sequential inverse and ONNX graphs agree, for its exported and a resampled mask set, as
/// IAF, and conditioned on a context.
#[test]
fn autoregressive_spline_is_a_bijector_in_every_use() {
    for (k, order) in [vec![0, 1, 2, 3], vec![2, 0, 3, 1]].into_iter().enumerate() {
        let (_p, m) = spline_made(order.clone(), k as u64, 0);
        check_bijector(&m, 4, 80 + k as u64);
        check_bijector(&m.rebased(3), 4, 90 + k as u64);
        let (_p, m) = spline_made(order.clone(), 10 + k as u64, 0);
        check_bijector(&flowtrain::bijectors::Inverse(m), 4, 100 + k as u64);
        let (_p, m) = spline_made(order, 20 + k as u64, 3);
        check_conditional_bijector(&m, &[4], &[4], 3, 110 + k as u64);
    }
}

/// ∂zᵢ/∂xⱼ = 0 unless j comes before i (or is i) in the order, for several mask sets.
#[test]
fn autoregressive_spline_is_triangular_in_its_order() {
    use flowtrain::bijectors::{Bijector, Ctx};
    let d = 5;
    let (_p, m) = spline_made(vec![3, 1, 4, 0, 2], 7, 0);
    for set in 0..3u64 {
        let order = m.order(set).unwrap();
        let pos: Vec<usize> = (0..d)
            .map(|i| order.iter().position(|&o| o == i).unwrap())
            .collect();
        let x = Var::from_tensor(&tensor(&random_rows(6, d, 30 + set), d)).unwrap();
        let (z, _) = m.encode(x.as_tensor(), &Ctx::eval(set)).unwrap();
        for i in 0..d {
            let g = z
                .narrow(1, i, 1)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gx = to_vec(g.get(x.as_tensor()).unwrap());
            for r in 0..6 {
                for j in 0..d {
                    if pos[j] > pos[i] {
                        assert_eq!(gx[r * d + j], 0.0, "z[{i}] depends on x[{j}] (set {set})");
                    }
                }
                assert!(gx[r * d + i] > 0.0, "z[{i}] increases with x[{i}]");
            }
        }
    }
}
