//! Conditional flows p(x | c): every conditional bijector with random contexts
//! (invertibility, log-det against the brute-force Jacobian, ONNX parity both ways), MADE
//! autoregressive in x for every c, and whole conditional flows trained on a table with a
//! categorical context — exported with the context as a second graph input, each
//! conditional density integrating to 1 and following its own data.

mod common;

use std::path::Path;

use candle_core::Var;
use common::*;
use flowpack::{ContextKind, Package};
use flowtrain::bijectors::{
    ContextAffine, Coupling, Ctx, Elementwise, ImageMask, Inverse, Made, Mask, Transform,
};
use flowtrain::config::{Config, Family, PermutationKind};
use flowtrain::nn::Activation;
use flowtrain::params::Params;
use flowtrain::pipeline::{density_grid, load_run, train_and_export};
use flowtrain::runtime::PackageRunner;

const K: usize = 3;

/// `encode` of the first rows under two different contexts differs: the context is used.
fn context_matters(b: &dyn flowtrain::bijectors::Bijector, event: &[usize], k: usize) {
    let d: usize = event.iter().product();
    let x = tensor_shaped(&random_rows(8, d, 1), event);
    let (c1, c2) = (
        tensor(&random_rows(8, k, 2), k),
        tensor(&random_rows(8, k, 3), k),
    );
    let z1 = to_vec(&b.encode(&x, &Ctx::EVAL.with_context(Some(&c1))).unwrap().0);
    let z2 = to_vec(&b.encode(&x, &Ctx::EVAL.with_context(Some(&c2))).unwrap().0);
    let moved = z1
        .iter()
        .zip(&z2)
        .filter(|(a, b)| (*a - *b).abs() > 1e-4)
        .count();
    assert!(
        moved > d,
        "{}: the context changes z ({moved} of {} moved)",
        b.name(),
        z1.len()
    );
    let missing = b.encode(&x, &Ctx::EVAL);
    assert!(
        missing.is_err(),
        "{}: a conditional layer refuses to run without its context",
        b.name()
    );
}

#[test]
fn conditional_couplings_on_rows() {
    let maps = [
        Elementwise::Shift,
        Elementwise::ClampedAffine { clamp: 3.0 },
    ];
    for (i, (map, mask)) in maps
        .into_iter()
        .flat_map(|m| [(m, Mask::Alternate), (m, Mask::Half)])
        .enumerate()
    {
        let p = Params::new(i as u64);
        let b = Coupling::rows(&p, 5, mask, i % 2 == 1, 16, 2, Activation::Tanh, map, K).unwrap();
        randomize(&p, 40 + i as u64, 0.5);
        check_conditional_bijector(&b, &[5], &[5], K, 60 + i as u64);
        context_matters(&b, &[5], K);
    }
}

#[test]
fn conditional_couplings_on_images() {
    for (i, (mask, map)) in [
        (ImageMask::Checkerboard, Elementwise::SigmoidAffine),
        (ImageMask::Channel, Elementwise::SigmoidAffine),
        (ImageMask::Channel, Elementwise::Shift),
    ]
    .into_iter()
    .enumerate()
    {
        let p = Params::new(i as u64);
        let b = Coupling::image(&p, [2, 4, 4], mask, false, 8, Activation::Relu, map, 2).unwrap();
        randomize(&p, 80 + i as u64, 0.3);
        check_conditional_bijector(&b, &[2, 4, 4], &[2, 4, 4], 2, 90 + i as u64);
        context_matters(&b, &[2, 4, 4], 2);
    }
}

fn conditional_made(order: Vec<usize>, seed: u64) -> (Params, Made) {
    test_made(
        order,
        seed,
        16,
        Transform::Affine { clamp: 3.0 },
        K,
        (300 + seed, 0.5),
    )
}

#[test]
fn conditional_made_and_its_inverse() {
    for (k, order) in [vec![0, 1, 2, 3, 4], vec![2, 0, 4, 1, 3]]
        .into_iter()
        .enumerate()
    {
        let (_p, m) = conditional_made(order.clone(), k as u64);
        check_conditional_bijector(&m, &[5], &[5], K, 20 + k as u64);
        context_matters(&m, &[5], K);
        let m = m.rebased(5 + k as u64);
        check_conditional_bijector(&m, &[5], &[5], K, 30 + k as u64);
        let (_p, m) = conditional_made(order, 10 + k as u64);
        let iaf = Inverse(m);
        check_conditional_bijector(&iaf, &[5], &[5], K, 40 + k as u64);
    }
}

/// ∂(μᵢ, αᵢ)/∂xⱼ is zero unless j comes before i in the order, for several contexts and
/// mask sets; and every μᵢ, αᵢ — the first feature's too — depends on the context.
#[test]
fn conditional_made_stays_autoregressive_in_x_for_every_context() {
    let d = 6;
    for seed in 0..3u64 {
        let (_p, m) = conditional_made(vec![3, 1, 5, 0, 2, 4], seed);
        for set in 0..3u64 {
            let order = m.order(set).unwrap();
            let pos: Vec<usize> = (0..d)
                .map(|i| order.iter().position(|&o| o == i).unwrap())
                .collect();
            for draw in 0..3u64 {
                let x = Var::from_tensor(&tensor(&random_rows(4, d, 10 + draw), d)).unwrap();
                let c = Var::from_tensor(&tensor(&random_rows(4, K, 20 + draw), K)).unwrap();
                let (mu, alpha) = m
                    .conditionals(x.as_tensor(), set, Some(c.as_tensor()))
                    .unwrap();
                for (what, out) in [("mu", &mu), ("alpha", &alpha)] {
                    for i in 0..d {
                        let g = out
                            .narrow(1, i, 1)
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .backward()
                            .unwrap();
                        let gx = g.get(x.as_tensor()).map(to_vec).unwrap_or(vec![0.0; 4 * d]);
                        for r in 0..4 {
                            for j in 0..d {
                                if pos[j] >= pos[i] {
                                    assert_eq!(
                                        gx[r * d + j], 0.0,
                                        "{what}[{i}] depends on x[{j}] (set {set}, context draw {draw})"
                                    );
                                }
                            }
                        }
                        let gc = g.get(c.as_tensor()).map(to_vec).unwrap_or_default();
                        assert!(
                            gc.iter().any(|v| v.abs() > 1e-6),
                            "{what}[{i}] does not depend on the context (set {set})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn context_affine_base_on_rows_and_images() {
    for (i, event) in [vec![4], vec![2, 2, 2]].into_iter().enumerate() {
        let p = Params::new(i as u64);
        let b = ContextAffine::new(&p, &event, K).unwrap();
        randomize(&p, 7 + i as u64, 0.5);
        check_conditional_bijector(&b, &event, &event, K, 11 + i as u64);
        context_matters(&b, &event, K);
    }
    assert!(ContextAffine::new(&Params::new(0), &[3], 0).is_err());
}

/// Two 2-D clouds, one per category of `c`: "a" around (−1.5, 0), stretched along x;
/// "b" around (1.5, 1), stretched along y.
fn write_two_clouds(path: &Path, n: usize) {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let normal = Normal::new(0.0f64, 1.0).unwrap();
    let mut text = String::from("x,y,c,w\n");
    for i in 0..n {
        let (u, v) = (normal.sample(&mut rng), normal.sample(&mut rng));
        let w = normal.sample(&mut rng);
        let (x, y, c) = if i % 2 == 0 {
            (-1.5 + 0.8 * u, 0.3 * v, "a")
        } else {
            (1.5 + 0.3 * u, 1.0 + 0.8 * v, "b")
        };
        text.push_str(&format!("{x},{y},{c},{w}\n"));
    }
    std::fs::write(path, text).unwrap();
}

fn conditional_config(family: Family, data: &Path, steps: u64) -> Config {
    let mut c = Config::default();
    c.model.family = family;
    c.model.layers = 4;
    c.model.hidden = 32;
    c.model.permutation = PermutationKind::None;
    c.data.dataset = data.display().to_string();
    c.data.context = vec!["c".into(), "w:numeric".into()];
    c.train.steps = steps;
    c.train.eval_every = 100;
    c.train.checkpoint_every = 200;
    c.train.batch_size = 256;
    c.train.lr = 3e-3;
    c.train.seed = 4;
    c
}

/// Trains a conditional flow, then checks its package: the manifest's context, the graphs
/// against candle with the test rows' contexts, decode∘encode, and a refusal without
/// context.
fn train_and_compare(config: &Config, dir: &Path) {
    train_and_export(config, dir, "cond", false, false).unwrap();
    let package = Package::open(dir).expect("a conditional package passes flowpack's checks");
    let spec = package
        .manifest
        .context
        .clone()
        .expect("the manifest describes the context");
    assert_eq!(spec.columns.len(), 2);
    assert_eq!(spec.columns[0].name, "c");
    assert_eq!(
        spec.columns[0].kind,
        ContextKind::Categorical {
            categories: vec!["a".into(), "b".into()]
        }
    );
    assert!(
        matches!(spec.columns[1].kind, ContextKind::Numeric { std, .. } if (std - 1.0).abs() < 0.1)
    );
    assert_eq!(package.manifest.graphs.encode.inputs.len(), 2);
    assert_eq!(
        package.manifest.domain.features,
        Some(vec!["x".into(), "y".into()])
    );

    let run = load_run(dir).unwrap();
    let test = &run.data.test;
    assert_eq!(test.context_dim, 2);
    let c = tensor(&test.context, 2);
    let want = to_vec(
        &run.flow
            .log_prob(&tensor(&test.values, 2), Some(&c), &Ctx::EVAL)
            .unwrap(),
    );
    let mut runner = PackageRunner::open(dir).unwrap();
    let (z, got) = runner.encode(&test.values, &test.context).unwrap();
    assert_close(&got, &want, 1e-4, 1e-4, "exported log p(x | c) vs candle");
    let back = runner.decode(&z, &test.context).unwrap();
    assert_close(&back, &test.values, 1e-3, 1e-4, "decode(encode(x, c), c)");
    assert!(
        runner.encode(&test.values, &[]).is_err(),
        "the graphs need the context"
    );
}

/// Each conditional density integrates to 1 and puts its mass where its own data are.
fn check_conditional_densities(dir: &Path) {
    let run = load_run(dir).unwrap();
    let (win, res) = ([(-5.0, 5.0), (-4.0, 5.0)], 400);
    let cell = (10.0 / res as f64) * (9.0 / res as f64);
    // Category index 0 is "a", 1 is "b"; w at its mean.
    let mut at = Vec::new();
    for (cat, centre) in [(0.0f32, (-1.5, 0.0)), (1.0, (1.5, 1.0))] {
        let density = density_grid(&run.flow, win, res, 1, &[cat, 0.0]).unwrap();
        let mass: f64 = density.iter().map(|&p| p as f64).sum::<f64>() * cell;
        assert!(
            (mass - 1.0).abs() <= 0.02,
            "p(x | c = {cat}) integrates to {mass}"
        );
        // The density at each cloud's centre, under this context.
        let index = |(x, y): (f64, f64)| {
            let col = ((x - win[0].0) / (win[0].1 - win[0].0) * res as f64) as usize;
            let row = ((win[1].1 - y) / (win[1].1 - win[1].0) * res as f64) as usize;
            row * res + col
        };
        at.push((
            density[index(centre)],
            density[index((-centre.0, 1.0 - centre.1))],
        ));
    }
    for (k, (own, other)) in at.iter().enumerate() {
        assert!(
            *own > 20.0 * other,
            "context {k}: density at its own cloud {own} vs at the other {other}"
        );
    }
}

#[test]
fn conditional_realnvp_on_a_table_with_a_categorical_context() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("clouds.csv");
    write_two_clouds(&data, 4000);
    let out = dir.path().join("model");
    train_and_compare(&conditional_config(Family::Realnvp, &data, 1200), &out);
    check_conditional_densities(&out);
}

#[test]
fn conditional_maf_with_an_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("clouds.csv");
    write_two_clouds(&data, 4000);
    let out = dir.path().join("model");
    let mut c = conditional_config(Family::Maf, &data, 1200);
    c.model.context_embedding = 8;
    train_and_compare(&c, &out);
    check_conditional_densities(&out);
    let m = Package::open(&out).unwrap().manifest;
    assert_eq!(m.context.unwrap().embedding, Some(8));
    // One shared order: the per-feature terms stay exact under a context.
    assert!(m.scoring.contributions.order().is_some());
}

#[test]
fn every_tabular_family_exports_a_conditional_package() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("clouds.csv");
    write_two_clouds(&data, 1000);
    for family in [Family::Nice, Family::Made, Family::Iaf] {
        let out = dir.path().join(family.as_str());
        train_and_compare(&conditional_config(family, &data, 60), &out);
    }
}

#[test]
fn class_conditional_glow_on_digits() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::default();
    c.model.family = Family::Glow;
    c.model.layers = 2;
    c.model.hidden = 8;
    c.model.levels = 2;
    c.model.learned_prior = true;
    c.data.dataset = "digits".into();
    c.data.context = vec!["label:categorical".into()];
    c.train.steps = 20;
    c.train.eval_every = 20;
    c.train.batch_size = 64;
    c.train.seed = 2;
    let summary = train_and_export(&c, dir.path(), "digits", false, false).unwrap();
    // One categorical context: the test NLL of each class's rows, which average to the
    // whole split's (up to the dequantisation noise drawn per group).
    let groups = &summary.test_nll_by_context;
    assert_eq!(groups.len(), 10);
    assert_eq!(groups[3].context, "label=3");
    let rows: usize = groups.iter().map(|g| g.rows).sum();
    let mean = groups.iter().map(|g| g.nll * g.rows as f64).sum::<f64>() / rows as f64;
    let test_nll = summary.manifest.metrics.test_nll.unwrap();
    assert!(
        (mean - test_nll).abs() < 0.01 * test_nll.abs(),
        "{mean} vs {test_nll}"
    );
    let m = Package::open(dir.path()).unwrap().manifest;
    assert_eq!(m.event_shape, vec![1, 8, 8]);
    let spec = m.context.unwrap();
    assert_eq!(
        spec.columns[0].kind,
        ContextKind::Categorical {
            categories: (0..10).map(|d| d.to_string()).collect()
        }
    );
    let run = load_run(dir.path()).unwrap();
    let test = &run.data.test;
    let n = 32;
    let (x, ctx) = (&test.values[..n * 64], &test.context[..n]);
    let want = to_vec(
        &run.flow
            .log_prob(&tensor(x, 64), Some(&tensor(ctx, 1)), &Ctx::EVAL)
            .unwrap(),
    );
    let mut runner = PackageRunner::open(dir.path()).unwrap();
    let (z, got) = runner.encode(x, ctx).unwrap();
    assert_close(
        &got,
        &want,
        1e-3,
        1e-4,
        "class-conditional Glow: graphs vs candle",
    );
    let back = runner.decode(&z, ctx).unwrap();
    assert_close(
        &back,
        x,
        1e-2,
        1e-3,
        "class-conditional Glow: decode∘encode",
    );
}

#[test]
fn context_requests_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("clouds.csv");
    write_two_clouds(&data, 200);
    let mut c = conditional_config(Family::Realnvp, &data, 5);
    let out = dir.path().join("m");
    for (context, says) in [
        (vec!["nope".to_string()], "nope"),
        (vec!["c:numeric".into()], "use c:categorical"),
        (vec!["c:weird".into()], "numeric or categorical"),
        (vec!["c".into(), "c".into()], "twice"),
    ] {
        c.data.context = context;
        let err = format!(
            "{:#}",
            train_and_export(&c, &out, "m", false, false).err().unwrap()
        );
        assert!(err.contains(says), "{err}");
    }
    c.data.dataset = "moons".into();
    c.data.context = vec!["c".into()];
    let err = format!(
        "{:#}",
        train_and_export(&c, &out, "m", false, false).err().unwrap()
    );
    assert!(err.contains("toy density"), "{err}");
}

/// The bundled class-conditional Glow (`models/digits_by_label`, `make models`) draws the
/// digit asked for: a nearest-class-mean classifier fitted on the digits training split
/// labels its samples at T = 0.7 as the class they were drawn for at least eight times as
/// often as chance (80 % against 10 %).
#[test]
fn the_bundled_class_conditional_glow_draws_the_digit_asked_for() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits_by_label/1");
    let mut runner = PackageRunner::open(&dir).unwrap();
    let spec = runner.package.manifest.context.clone().unwrap();
    let ContextKind::Categorical { categories } = &spec.columns[0].kind else {
        panic!("label is categorical")
    };
    assert_eq!(
        categories,
        &(0..10).map(|d| d.to_string()).collect::<Vec<_>>()
    );
    let cfg = flowtrain::config::DataConfig {
        dataset: "digits".into(),
        context: vec!["label:categorical".into()],
        ..Default::default()
    };
    let data = flowtrain::data::load(&cfg, 1).unwrap();
    let d = 64;
    let mut means = vec![vec![0f64; d]; 10];
    let mut counts = [0usize; 10];
    for r in 0..data.train.rows() {
        let k = data.train.context[r] as usize;
        counts[k] += 1;
        for (m, &v) in means[k].iter_mut().zip(data.train.row(r)) {
            *m += v as f64;
        }
    }
    for (m, &c) in means.iter_mut().zip(&counts) {
        m.iter_mut().for_each(|v| *v /= c as f64);
    }
    let classify = |x: &[f32]| -> usize {
        (0..10)
            .min_by(|&a, &b| {
                let dist = |k: usize| -> f64 {
                    x.iter()
                        .zip(&means[k])
                        .map(|(&v, m)| (v as f64 - m).powi(2))
                        .sum()
                };
                dist(a).total_cmp(&dist(b))
            })
            .unwrap()
    };
    let test = &data.test;
    let real = (0..test.rows())
        .filter(|&r| classify(test.row(r)) == test.context[r] as usize)
        .count() as f64
        / test.rows() as f64;
    let per_class = 50;
    let z = flowpack::sampling::latent_noise(per_class, d, 0.7, 11);
    let hits: Vec<usize> = (0..10)
        .map(|k| {
            let x = runner.decode(&z, &vec![k as f32; per_class]).unwrap();
            x.chunks(d).filter(|s| classify(s) == k).count()
        })
        .collect();
    let accuracy = hits.iter().sum::<usize>() as f64 / (10 * per_class) as f64;
    println!("nearest-class-mean accuracy: real test digits {real:.3}, samples {accuracy:.3}, per class {hits:?}");
    assert!(real > 0.85, "the classifier works on real digits: {real}");
    assert!(
        accuracy >= 0.8,
        "samples drawn for class k are classified as k {accuracy:.3} of the time (chance 0.1); per class {hits:?}"
    );
}
