//! Every bijector: decode(encode(x)) = x, log-det = log|det J| from autodiff, and its ONNX
//! twin (run by ONNX Runtime) agrees with candle in both directions.

mod common;

use candle_core::Tensor;
use common::*;
use flowtrain::bijectors::*;
use flowtrain::nn::Activation;
use flowtrain::params::Params;

fn affine(clamp: f64) -> Elementwise {
    Elementwise::ClampedAffine { clamp }
}

#[test]
fn elementwise_affine() {
    let p = Params::new(1);
    let b = ElementwiseAffine::new(&p, &[0.5, -1.0, 3.0, 0.0, 2.0], &[2.0, 0.25, 1.5, 1.0, 7.0])
        .unwrap();
    check_bijector(&b, 5, 10);
    assert!(
        ElementwiseAffine::new(&Params::new(1), &[0.0], &[0.0]).is_err(),
        "zero scale refused"
    );
}

#[test]
fn yeo_johnson_transform() {
    let (lo, hi) = LAMBDA_RANGE;
    let b = YeoJohnson::new(&[lo as f32, 0.3, 1.0, 1.4, hi as f32]).unwrap();
    check_bijector(&b, 5, 12);
    // Far tails, zero and values next to it invert too (in candle and in ONNX Runtime).
    let x: Vec<f32> = [-300.0, -12.0, -1e-3, 0.0, 1e-3, 0.5, 12.0, 300.0, 5e3, -5e3]
        .iter()
        .flat_map(|&v| [v; 5])
        .collect();
    let (z, ld) = b.encode(&tensor(&x, 5), &Ctx::EVAL).unwrap();
    let back = to_vec(&b.decode(&z, &Ctx::EVAL).unwrap());
    assert_close(&back, &x, 1e-5, 1e-5, "yeo_johnson: tails");
    let (oz, old) = onnx_encode(&b, &x, &[5]);
    assert_close(
        &oz,
        &to_vec(&z),
        1e-5,
        1e-5,
        "yeo_johnson: ONNX z in the tails",
    );
    assert_close(
        &old,
        &to_vec(&ld),
        1e-5,
        1e-5,
        "yeo_johnson: ONNX log-det in the tails",
    );
    // λ = 1 is the identity; monotone increasing for every λ.
    assert_close(
        &oz[2..50].iter().step_by(5).copied().collect::<Vec<_>>(),
        &x[2..50].iter().step_by(5).copied().collect::<Vec<_>>(),
        1e-6,
        1e-6,
        "λ = 1 (up to rounding)",
    );
    let grid: Vec<f32> = (0..2001)
        .map(|i| -20.0 + i as f32 * 0.02)
        .flat_map(|v| [v; 5])
        .collect();
    let (gz, _) = onnx_encode(&b, &grid, &[5]);
    for k in 0..5 {
        let col: Vec<f32> = gz.iter().skip(k).step_by(5).copied().collect();
        assert!(
            col.windows(2).all(|w| w[1] > w[0]),
            "feature {k}: not increasing"
        );
    }
    for bad in [0.0, 2.0, -1.0, f32::NAN] {
        assert!(YeoJohnson::new(&[bad]).is_err(), "λ = {bad} refused");
    }
}

#[test]
fn yeo_johnson_fit_takes_out_skew() {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let normal: Vec<f64> = (0..4000).map(|_| StandardNormal.sample(&mut rng)).collect();
    let standardise = |v: Vec<f64>| {
        let n = v.len() as f64;
        let m = v.iter().sum::<f64>() / n;
        let s = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt();
        v.into_iter().map(|x| (x - m) / s).collect::<Vec<_>>()
    };
    let skew = |v: &[f64]| {
        let v = standardise(v.to_vec());
        v.iter().map(|x| x.powi(3)).sum::<f64>() / v.len() as f64
    };
    // Gaussian data: λ near 1 (the identity).
    let l = YeoJohnson::fit(&normal);
    assert!((l - 1.0).abs() < 0.1, "Gaussian: λ = {l}");
    // Right-skewed (log-normal) data: λ < 1, and the transform removes most of the skew.
    let right = standardise(normal.iter().map(|x| (0.6 * x).exp()).collect());
    let l = YeoJohnson::fit(&right);
    let after: Vec<f64> = right.iter().map(|&v| yeo_johnson(v, l)).collect();
    assert!(l < 0.6, "log-normal: λ = {l}");
    assert!(
        skew(&right) > 1.5 && skew(&after).abs() < 0.5 * skew(&right),
        "skew {} → {}",
        skew(&right),
        skew(&after)
    );
    // Left-skewed data: λ > 1.
    let left: Vec<f64> = right.iter().map(|v| -v).collect();
    let l = YeoJohnson::fit(&left);
    assert!(l > 1.4, "reflected log-normal: λ = {l}");
}

#[test]
fn permutations() {
    check_bijector(&Permutation::reverse(5).unwrap(), 5, 11);
    check_bijector(&Permutation::random(6, 3).unwrap(), 6, 12);
    assert!(
        Permutation::new(vec![0, 0, 1]).is_err(),
        "not a permutation"
    );
}

#[test]
fn additive_coupling_all_masks() {
    for (k, (mask, flip)) in [
        (Mask::Alternate, false),
        (Mask::Alternate, true),
        (Mask::Half, false),
        (Mask::Half, true),
    ]
    .into_iter()
    .enumerate()
    {
        let p = Params::new(k as u64);
        let b = Coupling::rows(
            &p,
            5,
            mask,
            flip,
            16,
            2,
            Activation::Relu,
            Elementwise::Shift,
            0,
        )
        .unwrap();
        randomize(&p, 100 + k as u64, 0.5);
        check_bijector(&b, 5, 20 + k as u64);
    }
}

#[test]
fn affine_coupling_all_masks_and_activations() {
    let cases = [
        (Mask::Alternate, false, Activation::Relu),
        (Mask::Alternate, true, Activation::Tanh),
        (Mask::Half, false, Activation::Elu),
        (Mask::Half, true, Activation::Silu),
    ];
    for (k, (mask, flip, act)) in cases.into_iter().enumerate() {
        let p = Params::new(k as u64);
        let b = Coupling::rows(&p, 5, mask, flip, 16, 2, act, affine(3.0), 0).unwrap();
        randomize(&p, 200 + k as u64, 0.5);
        check_bijector(&b, 5, 30 + k as u64);
    }
}

#[test]
fn affine_coupling_starts_as_identity() {
    let p = Params::new(0);
    let b = Coupling::rows(
        &p,
        4,
        Mask::Half,
        false,
        8,
        1,
        Activation::Relu,
        affine(3.0),
        0,
    )
    .unwrap();
    let x = random_rows(16, 4, 1);
    let (z, ld) = b.encode(&tensor(&x, 4), &Ctx::EVAL).unwrap();
    assert_close(&to_vec(&z), &x, 0.0, 0.0, "identity at init");
    assert!(to_vec(&ld).iter().all(|&v| v == 0.0));
}

#[test]
fn affine_coupling_log_scale_is_bounded() {
    let p = Params::new(0);
    let b = Coupling::rows(
        &p,
        2,
        Mask::Alternate,
        false,
        8,
        1,
        Activation::Relu,
        affine(2.0),
        0,
    )
    .unwrap();
    randomize(&p, 5, 50.0);
    let x = random_rows(256, 2, 9);
    let ld = to_vec(&b.encode(&tensor(&x, 2), &Ctx::EVAL).unwrap().1);
    assert!(
        ld.iter().all(|v| v.abs() <= 2.0 + 1e-5),
        "one transformed feature, |s| ≤ clamp"
    );
}

#[test]
fn diagonal_scaling() {
    let p = Params::new(0);
    let b = DiagonalScaling::new(&p, 5).unwrap();
    randomize(&p, 7, 1.0);
    check_bijector(&b, 5, 40);
}

#[test]
fn batch_norm_eval_mode() {
    let p = Params::new(0);
    let b = BatchNorm::new(&p, 5, 0.5, 1e-5).unwrap();
    randomize(&p, 8, 0.7);
    // Give it non-trivial running statistics through a few training batches.
    for s in 0..3 {
        let x: Vec<f32> = random_rows(128, 5, 50 + s)
            .iter()
            .map(|v| v * 3.0 + 1.0)
            .collect();
        b.encode(&tensor(&x, 5), &Ctx::train(0)).unwrap();
    }
    check_bijector(&b, 5, 41);
}

#[test]
fn batch_norm_training_normalises_and_tracks_statistics() {
    let p = Params::new(0);
    let b = BatchNorm::new(&p, 3, 1.0, 1e-5).unwrap();
    let x: Vec<f32> = random_rows(512, 3, 60)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1 + i % 3) as f32 + 5.0)
        .collect();
    let (z, ld) = b.encode(&tensor(&x, 3), &Ctx::train(0)).unwrap();
    let z = to_vec(&z);
    for c in 0..3 {
        let col: Vec<f32> = z.iter().skip(c).step_by(3).copied().collect();
        let mean = col.iter().sum::<f32>() / col.len() as f32;
        let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / col.len() as f32;
        assert!(
            mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
            "column {c}: mean {mean}, var {var}"
        );
    }
    // log-det of a batch-statistics normalisation: -Σ log σ_batch.
    let mut want = 0f64;
    for c in 0..3 {
        let col: Vec<f64> = x.iter().skip(c).step_by(3).map(|&v| v as f64).collect();
        let m = col.iter().sum::<f64>() / col.len() as f64;
        want -=
            0.5 * (col.iter().map(|v| (v - m).powi(2)).sum::<f64>() / col.len() as f64 + 1e-5).ln();
    }
    assert!(
        (to_vec(&ld)[0] as f64 - want).abs() < 1e-4,
        "{} vs {want}",
        to_vec(&ld)[0]
    );
    // With momentum 1 the running mean is the batch mean; eval now maps the batch to ~N(0,1).
    let ze = to_vec(&b.encode(&tensor(&x, 3), &Ctx::EVAL).unwrap().0);
    let mean0 = ze.iter().step_by(3).sum::<f32>() / 512.0;
    assert!(mean0.abs() < 1e-3, "eval mean {mean0}");
}

#[test]
fn batch_norm_ignores_non_finite_batches() {
    let p = Params::new(0);
    let b = BatchNorm::new(&p, 2, 0.5, 1e-5).unwrap();
    let mut x = random_rows(8, 2, 1);
    x[3] = f32::NAN;
    b.encode(&tensor(&x, 2), &Ctx::train(0)).unwrap();
    let one = Tensor::new(&[[1f32, 2.0]], &candle_core::Device::Cpu).unwrap();
    let z = to_vec(&b.encode(&one, &Ctx::EVAL).unwrap().0);
    assert!(
        z.iter().all(|v| v.is_finite()),
        "running statistics stayed finite: {z:?}"
    );
    let _ = zeros(1);
}

fn made(order: Vec<usize>, seed: u64) -> (Params, Made) {
    test_made(
        order,
        seed,
        16,
        Transform::Affine { clamp: 3.0 },
        0,
        (300 + seed, 0.5),
    )
}

#[test]
fn made_inverts_and_matches_its_sequential_onnx_graphs() {
    for (k, order) in [
        vec![0, 1, 2, 3, 4],
        vec![4, 3, 2, 1, 0],
        vec![2, 0, 4, 1, 3],
    ]
    .into_iter()
    .enumerate()
    {
        let (_p, m) = made(order, k as u64);
        check_bijector(&m, 5, 50 + k as u64);
        // A resampled mask set (another order, other hidden degrees) is a bijector too.
        let m = m.rebased(7 + k as u64);
        check_bijector(&m, 5, 70 + k as u64);
    }
}

#[test]
fn made_is_autoregressive_in_its_order() {
    use candle_core::Var;
    for (k, order) in [
        vec![0, 1, 2, 3, 4, 5],
        vec![5, 4, 3, 2, 1, 0],
        vec![3, 1, 5, 0, 2, 4],
    ]
    .into_iter()
    .enumerate()
    {
        // Mask set 0 is the given order; sets 1.. resample the order and the hidden
        // degrees (order- and connectivity-agnostic training), for two weight seeds.
        let mut orders = std::collections::HashSet::new();
        for (seed, set) in (0..2u64).flat_map(|s| (0..4u64).map(move |k| (s, k))) {
            let (_p, m) = made(order.clone(), 10 * k as u64 + seed);
            let order = m.order(set).unwrap();
            orders.insert(order.clone());
            let pos: Vec<usize> = (0..6)
                .map(|i| order.iter().position(|&o| o == i).unwrap())
                .collect();
            let x = Var::from_tensor(&tensor(&random_rows(4, 6, seed), 6)).unwrap();
            let (mu, alpha) = m.conditionals(x.as_tensor(), set, None).unwrap();
            let mut connected = 0;
            for (what, out) in [("mu", &mu), ("alpha", &alpha)] {
                for i in 0..6 {
                    let g = out
                        .narrow(1, i, 1)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let grad = g
                        .get(x.as_tensor())
                        .map(to_vec)
                        .unwrap_or_else(|| vec![0.0; 24]);
                    for j in 0..6 {
                        let col: Vec<f32> = grad.iter().skip(j).step_by(6).copied().collect();
                        if pos[j] >= pos[i] {
                            assert!(
                                col.iter().all(|&v| v == 0.0),
                                "order {order:?}: ∂{what}_{i}/∂x_{j} = {col:?}, must be 0"
                            );
                        } else if col.iter().any(|&v| v != 0.0) {
                            connected += 1;
                        }
                    }
                }
            }
            assert!(connected > 0, "some allowed connections are used");
        }
        assert!(orders.len() >= 3, "mask sets draw new orders: {orders:?}");
    }
}

#[test]
fn made_degrees_connect_every_hidden_unit() {
    let (input, hidden) = degrees(&[2, 0, 1], &[8, 8], 5);
    assert_eq!(input, vec![2, 3, 1]);
    for layer in &hidden {
        assert!(layer.iter().all(|&d| (1..=2).contains(&d)));
    }
    assert!(
        hidden[1].iter().min() >= hidden[0].iter().min(),
        "each layer's degrees start at the previous minimum"
    );
}

#[test]
fn iaf_is_made_inverted_with_the_costs_swapped() {
    use flowpack::Cost;
    for (k, order) in [vec![0, 1, 2, 3, 4], vec![3, 1, 4, 0, 2]]
        .into_iter()
        .enumerate()
    {
        let (_p, m) = made(order, 20 + k as u64);
        let iaf = Inverse(m);
        assert_eq!(iaf.cost(), [Cost::Sequential, Cost::OnePass]);
        check_bijector(&iaf, 5, 60 + k as u64);
    }
}
