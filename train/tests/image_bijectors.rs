//! The image bijectors (squeeze, actnorm, invertible 1×1 convolution) on tiny images:
//! invertibility, log-det against the brute-force Jacobian, ONNX parity both ways, and the
//! properties each one promises.

mod common;

use common::*;
use flowtrain::bijectors::*;
use flowtrain::linalg;
use flowtrain::params::Params;

#[test]
fn squeeze_moves_each_2x2_patch_into_channels() {
    let sq = Squeeze::new(2, 4, 6).unwrap();
    assert_eq!(sq.output_shape(), [8, 2, 3]);
    check_bijector_shaped(&sq, &[2, 4, 6], &[8, 2, 3], 1);

    // The documented layout: output channel 4c + 2i + j at (y, x) is input (c, 2y + i, 2x + j).
    let x: Vec<f32> = (0..2 * 4 * 6).map(|v| v as f32).collect();
    let (z, ld) = sq
        .encode(&tensor_shaped(&x, &[2, 4, 6]), &Ctx::EVAL)
        .unwrap();
    assert_eq!(to_vec(&ld), vec![0.0]);
    let z = to_vec(&z);
    for c in 0..2 {
        for (i, j) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            for y in 0..2 {
                for xx in 0..3 {
                    let out = z[((4 * c + 2 * i + j) * 2 + y) * 3 + xx];
                    let inp = x[(c * 4 + 2 * y + i) * 6 + 2 * xx + j];
                    assert_eq!(out, inp, "channel {c}, patch ({i},{j}), at ({y},{xx})");
                }
            }
        }
    }
    assert!(Squeeze::new(1, 3, 4).is_err(), "odd height is refused");
}

#[test]
fn actnorm_initialises_to_zero_mean_unit_std_per_channel() {
    let p = Params::new(0);
    let an = ActNorm::new(&p, 3, 16).unwrap();
    // A batch with very different per-channel statistics.
    let mut x = random_rows(32, 3 * 16, 5);
    for (k, v) in x.iter_mut().enumerate() {
        let c = (k / 16) % 3;
        *v = *v * (1.0 + 3.0 * c as f32) + 10.0 * c as f32 - 4.0;
    }
    let x = tensor_shaped(&x, &[3, 4, 4]);
    assert!(!an.is_initialized().unwrap());
    let (z, _) = an.encode(&x, &Ctx::train(0)).unwrap();
    assert!(an.is_initialized().unwrap());
    let per_channel = z.transpose(0, 1).unwrap().flatten_from(1).unwrap();
    let mean = to_vec(&per_channel.mean(1).unwrap());
    let var = to_vec(
        &per_channel
            .broadcast_sub(&per_channel.mean_keepdim(1).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .mean(1)
            .unwrap(),
    );
    for c in 0..3 {
        assert!(mean[c].abs() < 1e-4, "channel {c} mean {}", mean[c]);
        assert!(
            (var[c].sqrt() - 1.0).abs() < 1e-3,
            "channel {c} std {}",
            var[c].sqrt()
        );
    }
    // Initialisation happens once: a second, different batch leaves the parameters alone.
    let before = p.snapshot();
    an.encode(&(x * 2.0).unwrap(), &Ctx::train(0)).unwrap();
    for (k, v) in p.snapshot() {
        assert_eq!(to_vec(&v), to_vec(&before[&k]), "{k} changed");
    }
    check_bijector_shaped(&an, &[3, 4, 4], &[3, 4, 4], 2);
}

#[test]
fn actnorm_on_rows_and_with_random_parameters() {
    let p = Params::new(1);
    let an = ActNorm::new(&p, 5, 1).unwrap();
    randomize(&p, 3, 0.7);
    check_bijector(&an, 5, 3);
    let p = Params::new(2);
    let an = ActNorm::new(&p, 2, 9).unwrap();
    randomize(&p, 4, 0.7);
    check_bijector_shaped(&an, &[2, 3, 3], &[2, 3, 3], 4);
}

fn weight_f64(conv: &InvConv1x1) -> Vec<f64> {
    to_vec(&conv.weight().unwrap())
        .into_iter()
        .map(f64::from)
        .collect()
}

#[test]
fn invconv_starts_as_a_rotation() {
    for lu in [false, true] {
        let p = Params::new(3);
        let conv = InvConv1x1::new(&p, 6, 4, lu, 11).unwrap();
        let w = weight_f64(&conv);
        let wt: Vec<f64> = (0..36).map(|i| w[(i % 6) * 6 + i / 6]).collect();
        let wwt = linalg::matmul(&w, &wt, 6);
        for (i, v) in wwt.iter().enumerate() {
            let want = if i / 6 == i % 6 { 1.0 } else { 0.0 };
            assert!((v - want).abs() < 1e-5, "lu {lu}: W·Wᵀ[{i}] = {v}");
        }
        let ld = conv
            .log_abs_det_weight()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            ld.abs() < 1e-5,
            "lu {lu}: log|det| of a rotation is 0, got {ld}"
        );
    }
}

#[test]
fn invconv_plain_and_lu_pass_the_bijector_checks() {
    for (k, lu) in [false, true].into_iter().enumerate() {
        let p = Params::new(10 + k as u64);
        let conv = InvConv1x1::new(&p, 4, 9, lu, 20 + k as u64).unwrap();
        // Move away from the rotation: perturb every parameter (the plain W stays invertible).
        randomize_around(&p, 30 + k as u64, 0.3);
        check_bijector_shaped(&conv, &[4, 3, 3], &[4, 3, 3], 40 + k as u64);
        // On rows ([N, C], one pixel) it is a learned linear map; exported as MatMul.
        let p = Params::new(50 + k as u64);
        let rows = InvConv1x1::new(&p, 5, 1, lu, 60 + k as u64).unwrap();
        randomize_around(&p, 70 + k as u64, 0.3);
        check_bijector(&rows, 5, 80 + k as u64);
    }
}

/// Adds uniform noise in ±`scale` to every trainable parameter.
fn randomize_around(p: &Params, seed: u64, scale: f32) {
    let noise = Params::new(seed);
    for (i, v) in p.trainable().into_iter().enumerate() {
        let n = noise
            .uniform(&format!("noise{i}"), v.shape().clone(), scale as f64)
            .unwrap();
        v.set(&(v.as_tensor() + n.as_tensor()).unwrap()).unwrap();
    }
}

#[test]
fn invconv_lu_log_det_equals_the_f64_determinant() {
    let p = Params::new(7);
    let conv = InvConv1x1::new(&p, 8, 5, true, 9).unwrap();
    randomize_around(&p, 8, 0.5);
    let from_lu = conv
        .log_abs_det_weight()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let direct = linalg::log_abs_det(&weight_f64(&conv), 8);
    assert!(
        (from_lu - direct).abs() < 1e-4 * (1.0 + direct.abs()),
        "Σ log s = {from_lu}, log|det W| in f64 = {direct}"
    );
    assert!(from_lu.abs() > 0.1, "the test moved W away from a rotation");
}

#[test]
fn invconv_plain_log_det_gradient_is_w_inverse_transposed() {
    let p = Params::new(12);
    let conv = InvConv1x1::new(&p, 4, 1, false, 13).unwrap();
    randomize_around(&p, 14, 0.4);
    let w = p.trainable().remove(0);
    let grads = conv.log_abs_det_weight().unwrap().backward().unwrap();
    let got = to_vec(grads.get(w.as_tensor()).unwrap());
    // Central differences of log|det W| in f64.
    let base = weight_f64(&conv);
    for i in 0..16 {
        let h = 1e-6;
        let (mut up, mut down) = (base.clone(), base.clone());
        up[i] += h;
        down[i] -= h;
        let fd = (linalg::log_abs_det(&up, 4) - linalg::log_abs_det(&down, 4)) / (2.0 * h);
        assert!(
            (got[i] as f64 - fd).abs() < 1e-3 * (1.0 + fd.abs()),
            "∂ log|det W| / ∂W[{i}]: autodiff {} vs finite difference {fd}",
            got[i]
        );
    }
}

#[test]
fn linalg_inverse_and_lu_reconstruct() {
    let a: Vec<f64> = random_rows(1, 25, 99).into_iter().map(f64::from).collect();
    let inv = linalg::inverse(&a, 5).unwrap();
    let eye = linalg::matmul(&a, &inv, 5);
    for (i, v) in eye.iter().enumerate() {
        let want = if i / 5 == i % 5 { 1.0 } else { 0.0 };
        assert!((v - want).abs() < 1e-9, "A·A⁻¹[{i}] = {v}");
    }
    let f = linalg::lu(&a, 5).unwrap();
    let plu = linalg::matmul(
        &linalg::permutation_matrix(&f.perm),
        &linalg::matmul(&f.l, &f.u, 5),
        5,
    );
    for (x, y) in plu.iter().zip(&a) {
        assert!((x - y).abs() < 1e-9, "P·L·U = A");
    }
}

#[test]
fn conv_coupling_all_masks_affine_and_additive() {
    let mut k = 0;
    for mask in [ImageMask::Checkerboard, ImageMask::Channel] {
        for flip in [false, true] {
            for additive in [false, true] {
                k += 1;
                let p = Params::new(k);
                let map = if additive {
                    Elementwise::Shift
                } else {
                    Elementwise::SigmoidAffine
                };
                let c = Coupling::image(
                    &p,
                    [2, 4, 4],
                    mask,
                    flip,
                    8,
                    flowtrain::nn::Activation::Relu,
                    map,
                    0,
                )
                .unwrap();
                randomize(&p, 100 + k, 0.3);
                check_bijector_shaped(&c, &[2, 4, 4], &[2, 4, 4], 200 + k);
            }
        }
    }
}

/// Glow's affine coupling on [2, 4, 4] images, checkerboard mask, width 8.
fn glow_checkerboard_coupling(p: &Params) -> Coupling {
    Coupling::image(
        p,
        [2, 4, 4],
        ImageMask::Checkerboard,
        false,
        8,
        flowtrain::nn::Activation::Relu,
        Elementwise::SigmoidAffine,
        0,
    )
    .unwrap()
}

#[test]
fn conv_coupling_keeps_its_mask_and_starts_as_a_fixed_map() {
    let p = Params::new(3);
    let c = glow_checkerboard_coupling(&p);
    let x = random_rows(4, 32, 9);
    let (z, ld) = c
        .encode(&tensor_shaped(&x, &[2, 4, 4]), &Ctx::EVAL)
        .unwrap();
    let z = to_vec(&z);
    let s = 1.0 / (1.0 + (-2.0f32).exp());
    for (i, (zi, xi)) in z.iter().zip(&x).enumerate() {
        let (y, xx) = ((i / 4) % 4, i % 4);
        let want = if (y + xx) % 2 == 0 { *xi } else { xi * s };
        assert!((zi - want).abs() < 1e-6, "element {i}: {zi} vs {want}");
    }
    // Half of the 32 elements scaled by sigmoid(2).
    let want_ld = 16.0 * s.ln();
    assert!(to_vec(&ld).iter().all(|v| (v - want_ld).abs() < 1e-5));
}

#[test]
fn logit_preprocessing() {
    let lg = Logit::new(-0.5, 16.5, 0.05).unwrap();
    // Pixel-like values inside [low, high].
    let x: Vec<f32> = random_rows(64, 12, 5)
        .into_iter()
        .map(|v| (v + 2.0) * 4.0 - 0.4)
        .collect();
    let (z, ld) = lg.encode(&tensor(&x, 12), &Ctx::EVAL).unwrap();
    let back = to_vec(&lg.decode(&z, &Ctx::EVAL).unwrap());
    assert_close(&back, &x, 1e-4, 1e-5, "logit decode(encode(x))");
    let brute = brute_force_log_det(&lg, &x[..8 * 12], &[12]);
    let ld = to_vec(&ld);
    for (r, want) in brute.iter().enumerate() {
        assert!(
            (ld[r] as f64 - want).abs() < 1e-3 * (1.0 + want.abs()),
            "row {r}"
        );
    }
    let (oz, old) = onnx_encode(&lg, &x, &[12]);
    assert_close(&oz, &to_vec(&z), 1e-4, 1e-4, "ONNX logit z");
    assert_close(&old, &ld, 1e-3, 1e-4, "ONNX logit log-det");
    let ox = onnx_decode(&lg, &oz, &[12]);
    assert_close(&ox, &x, 1e-3, 1e-4, "ONNX logit decode");
}

#[test]
fn factor_out_runs_deeper_levels_on_half_the_channels() {
    let p = Params::new(21);
    let mut inner = Chain::new();
    inner.push(ActNorm::new(&p.pp("a"), 2, 4).unwrap());
    inner.push(InvConv1x1::new(&p.pp("b"), 2, 4, true, 3).unwrap());
    inner.push(
        Coupling::image(
            &p.pp("c"),
            [2, 2, 2],
            ImageMask::Checkerboard,
            false,
            4,
            flowtrain::nn::Activation::Relu,
            Elementwise::SigmoidAffine,
            0,
        )
        .unwrap(),
    );
    let f = FactorOut::new(2, 4, inner).unwrap();
    randomize(&p, 22, 0.3);
    check_bijector_shaped(&f, &[4, 2, 2], &[4, 2, 2], 23);
    // The factored-out channels pass through untouched.
    let x = random_rows(3, 16, 24);
    let (z, _) = f
        .encode(&tensor_shaped(&x, &[4, 2, 2]), &Ctx::EVAL)
        .unwrap();
    let z = to_vec(&z);
    for n in 0..3 {
        assert_eq!(&z[n * 16 + 8..n * 16 + 16], &x[n * 16 + 8..n * 16 + 16]);
    }
}

#[test]
fn batch_norm_per_channel_on_images() {
    let p = Params::new(31);
    let bn = BatchNorm::per_channel(&p, 3, 4, 1.0, 1e-5).unwrap();
    // Training: each channel normalised over batch and pixels; momentum 1 copies the stats.
    let mut x = random_rows(16, 12, 32);
    for (k, v) in x.iter_mut().enumerate() {
        let c = (k / 4) % 3;
        *v = *v * (0.5 + c as f32) + 3.0 * c as f32;
    }
    let (z, ld) = bn
        .encode(&tensor_shaped(&x, &[3, 2, 2]), &Ctx::train(0))
        .unwrap();
    let per_channel = z.transpose(0, 1).unwrap().flatten_from(1).unwrap();
    for (c, m) in to_vec(&per_channel.mean(1).unwrap()).iter().enumerate() {
        assert!(m.abs() < 1e-4, "channel {c} mean {m}");
    }
    let ld = to_vec(&ld);
    assert!(
        ld.iter().all(|v| (v - ld[0]).abs() < 1e-6),
        "one log-det per batch"
    );
    // Evaluation with the running statistics it just took (and random γ, β): a bijector.
    randomize_around(&p, 33, 0.3);
    check_bijector_shaped(&bn, &[3, 2, 2], &[3, 2, 2], 34);
}

/// Glow's log-scale log sigmoid(r) stays finite in the exported graph where sigmoid(r)
/// underflows in float32 (r < -104, what an outlier image reached in a Fashion-MNIST Glow):
/// the graph's log-det equals the training op's, and neither is infinite.
#[test]
fn conv_coupling_log_det_is_finite_in_the_graph_where_the_sigmoid_underflows() {
    let p = Params::new(5);
    let c = glow_checkerboard_coupling(&p);
    randomize(&p, 7, 0.3);
    let x: Vec<f32> = random_rows(4, 32, 11).iter().map(|v| v * 1e4).collect();
    let (_, ld) = c
        .encode(&tensor_shaped(&x, &[2, 4, 4]), &Ctx::EVAL)
        .unwrap();
    let ld = to_vec(&ld);
    let (_, graph_ld) = onnx_encode(&c, &x, &[2, 4, 4]);
    assert!(
        ld.iter().any(|v| *v < -200.0),
        "the inputs reach the underflow: {ld:?}"
    );
    assert!(graph_ld.iter().all(|v| v.is_finite()), "{graph_ld:?}");
    assert_close(&graph_ld, &ld, 1e-2, 1e-4, "log-det, graph vs training op");
}
