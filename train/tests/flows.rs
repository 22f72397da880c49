//! Whole flows, trained briefly and exported: the package passes flowpack's checks, the
//! exported log_prob equals candle's, graphs round-trip, and a 2-D density integrates to 1.

mod common;

use std::path::Path;

use common::*;
use flowpack::Package;
use flowtrain::bijectors::Ctx;
use flowtrain::config::{Config, Family, PermutationKind};
use flowtrain::data::Table;
use flowtrain::eval::{mean_nll, reverse_kl};
use flowtrain::pipeline::{density_grid, load_run, train_and_export, LoadedRun};
use flowtrain::runtime::PackageRunner;

fn config(family: Family, dataset: &str, batch_norm: bool, steps: u64) -> Config {
    let mut c = Config::default();
    c.model.family = family;
    c.model.layers = 4;
    c.model.hidden = 32;
    c.model.batch_norm = batch_norm;
    c.data.dataset = dataset.into();
    c.data.toy_samples = 4000;
    c.train.steps = steps;
    c.train.eval_every = 50;
    c.train.checkpoint_every = 100;
    c.train.log_every = 10;
    c.train.batch_size = 128;
    c.train.seed = 3;
    c
}

/// Trains `config` into `dir`, then checks the export against the training side on the
/// test split and round-trips through the graphs.
fn train_export_compare(config: &Config, dir: &Path) {
    let summary = train_and_export(config, dir, "test", false, false).unwrap();
    assert!(summary.outcome.best_val_loss.is_finite());
    let package = Package::open(dir).expect("the exported package passes flowpack's checks");
    assert_eq!(package.manifest.family, config.model.family.as_str());

    // Rebuild the training side from the best checkpoint the run kept.
    let LoadedRun {
        data,
        flow,
        dequantized: deq,
        ..
    } = load_run(dir).unwrap();
    let val_seed = flowtrain::seeds::validation(config.train.seed);
    let val = mean_nll(&flow, &data.val, &deq, val_seed, 1).unwrap();
    assert!(
        (val - summary.outcome.best_val_loss).abs() < 1e-6,
        "restored best state: {val} vs {}",
        summary.outcome.best_val_loss
    );

    let test: &Table = &data.test;
    let d = test.dim;
    let want = to_vec(
        &flow
            .log_prob(&tensor(&test.values, d), None, &Ctx::EVAL)
            .unwrap(),
    );
    let mut runner = PackageRunner::open(dir).unwrap();
    let (z, got) = runner.encode(&test.values, &[]).unwrap();
    assert_close(&got, &want, 1e-4, 1e-4, "exported log_prob vs candle");
    let cz = to_vec(
        &flow
            .encode(&tensor(&test.values, d), None, &Ctx::EVAL)
            .unwrap()
            .0,
    );
    assert_close(&z, &cz, 1e-4, 1e-4, "exported z vs candle");
    let back = runner.decode(&z, &[]).unwrap();
    assert_close(
        &back,
        &test.values,
        1e-3,
        1e-4,
        "decode(encode(x)) through the graphs",
    );

    // The reference set is the validation and test rows as the graph scores them.
    let set = package.reference.as_ref().expect("a reference set");
    let mut held_out = data.val.values.clone();
    held_out.extend_from_slice(&test.values);
    let served = runner.log_prob(&held_out, &[]).unwrap();
    assert_eq!(set.len() as usize, served.len());
    let mut sorted = served.clone();
    sorted.sort_by(f32::total_cmp);
    let median = sorted[sorted.len() / 2];
    let k = sorted.iter().filter(|&&v| v <= median).count();
    assert_eq!(set.count_at_or_below(median) as usize, k);
}

#[test]
fn nice_without_batch_norm() {
    let dir = tempfile::tempdir().unwrap();
    train_export_compare(
        &config(Family::Nice, "eight_gaussians", false, 150),
        dir.path(),
    );
}

#[test]
fn nice_with_batch_norm_on_wine() {
    let dir = tempfile::tempdir().unwrap();
    train_export_compare(&config(Family::Nice, "wine", true, 150), dir.path());
}

#[test]
fn realnvp_without_batch_norm_on_digits() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Family::Realnvp, "digits", false, 100);
    c.model.permutation = PermutationKind::Random;
    train_export_compare(&c, dir.path());
    let m = Package::open(dir.path()).unwrap().manifest;
    assert_eq!(m.event_shape, vec![64]);
    assert_eq!(
        m.domain.quantized.iter().filter(|q| q.step == 1.0).count(),
        64,
        "digits' pixels are integers and were dequantised"
    );
    let bpd = m
        .metrics
        .test_bits_per_dim
        .expect("bits/dim for dequantised data");
    let nll = m.metrics.test_nll.unwrap();
    assert!((bpd - nll / (64.0 * std::f64::consts::LN_2)).abs() < 1e-9);
}

#[test]
fn realnvp_with_batch_norm_on_wine() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Family::Realnvp, "wine", true, 150);
    c.model.permutation = PermutationKind::Reverse;
    train_export_compare(&c, dir.path());
}

/// A short seeded RealNVP run on two moons: the exported density sums to 1 over a grid.
#[test]
fn realnvp_on_moons_integrates_to_one() {
    let mut c = config(Family::Realnvp, "moons", false, 600);
    c.model.layers = 6;
    c.model.hidden = 64;
    c.train.lr = 3e-3;
    exported_moons_density_integrates_to_one(&c);
}

/// The same for a neural spline flow, whose splines meet the identity tails at ±B: the
/// mass there counts too.
#[test]
fn nsf_on_moons_integrates_to_one() {
    let mut c = config(Family::Nsf, "moons", false, 600);
    c.model.layers = 4;
    c.model.hidden = 64;
    c.model.bins = 8;
    c.train.lr = 3e-3;
    exported_moons_density_integrates_to_one(&c);
}

/// The autoregressive neural spline flow (`maf --transform spline`) on moons.
#[test]
fn spline_maf_on_moons_integrates_to_one() {
    let mut c = config(Family::Maf, "moons", false, 600);
    c.model.layers = 3;
    c.model.hidden = 64;
    c.model.transform = flowtrain::config::TransformKind::Spline;
    c.model.permutation = PermutationKind::Reverse;
    c.train.lr = 3e-3;
    exported_moons_density_integrates_to_one(&c);
}

/// On wine in one shared order: exported with parity, and its per-feature terms exact.
#[test]
fn spline_maf_on_wine_keeps_exact_contributions() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Family::Maf, "wine", false, 100);
    c.model.layers = 2;
    c.model.transform = flowtrain::config::TransformKind::Spline;
    train_export_compare(&c, dir.path());
    let m = Package::open(dir.path()).unwrap().manifest;
    assert!(m.scoring.contributions.order().is_some());
    assert_eq!(m.graphs.decode.cost, flowpack::Cost::Sequential);
}

/// NSF with each kind of layer between its couplings: the paper's learned LU-linear maps
/// (wine, with batch norm) and seeded permutations (digits).
#[test]
fn nsf_on_wine_and_digits_exports_and_round_trips() {
    let mut matmuls = Vec::new();
    for (data, bn, between) in [
        ("wine", true, PermutationKind::Lu),
        ("digits", false, PermutationKind::Random),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(Family::Nsf, data, bn, 100);
        assert_eq!(c.model.layers, 4);
        c.model.permutation = between;
        train_export_compare(&c, dir.path());
        let m = Package::open(dir.path()).unwrap().manifest;
        assert_eq!(m.family, "nsf");
        assert_eq!(m.graphs.encode.cost, flowpack::Cost::OnePass);
        assert_eq!(m.graphs.decode.cost, flowpack::Cost::OnePass);
        matmuls.push(count_ops(dir.path(), "encode.onnx", "MatMul"));
    }
    // The same stack but for the layers between: one MatMul more per LU layer.
    assert_eq!(
        matmuls[0],
        matmuls[1] + 4 - 1,
        "MatMuls with LU vs permutations"
    );
}

/// A spline MAF with LU-linear layers between its MADEs: exported with parity, sequential
/// sampling, and no exact per-feature terms (the linear maps mix features both ways).
#[test]
fn spline_maf_with_lu_layers_exports_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Family::Maf, "wine", false, 100);
    c.model.layers = 3;
    c.model.transform = flowtrain::config::TransformKind::Spline;
    c.model.permutation = PermutationKind::Lu;
    train_export_compare(&c, dir.path());
    let m = Package::open(dir.path()).unwrap().manifest;
    assert!(m.scoring.contributions.order().is_none());
    assert_eq!(m.graphs.decode.cost, flowpack::Cost::Sequential);
}

fn exported_moons_density_integrates_to_one(c: &Config) {
    let dir = tempfile::tempdir().unwrap();
    let summary = train_and_export(c, dir.path(), "moons", false, false).unwrap();
    assert!(
        summary.outcome.best_val_loss < 1.6,
        "learned something: val NLL {}",
        summary.outcome.best_val_loss
    );

    let (x0, x1, y0, y1, res) = (-4.0f64, 5.0f64, -4.0f64, 4.5f64, 500usize);
    let (dx, dy) = ((x1 - x0) / res as f64, (y1 - y0) / res as f64);
    let mut grid = Vec::with_capacity(res * res * 2);
    for i in 0..res {
        for j in 0..res {
            grid.push((x0 + (j as f64 + 0.5) * dx) as f32);
            grid.push((y0 + (i as f64 + 0.5) * dy) as f32);
        }
    }
    let mut runner = PackageRunner::open(dir.path()).unwrap();
    let (_, lp) = runner.encode(&grid, &[]).unwrap();
    let mass: f64 = lp.iter().map(|&v| (v as f64).exp()).sum::<f64>() * dx * dy;
    assert!((mass - 1.0).abs() <= 0.02, "density integrates to {mass}");
}

#[test]
fn maf_with_batch_norm_on_wine() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(Family::Maf, "wine", true, 150);
    train_export_compare(&c, dir.path());
    let m = Package::open(dir.path()).unwrap().manifest;
    assert_eq!(m.family, "maf");
    assert_eq!(
        m.graphs.encode.cost,
        flowpack::Cost::OnePass,
        "density in one pass"
    );
    assert_eq!(
        m.graphs.decode.cost,
        flowpack::Cost::Sequential,
        "sampling is sequential"
    );
}

#[test]
fn made_alone_on_moons() {
    let dir = tempfile::tempdir().unwrap();
    train_export_compare(&config(Family::Made, "moons", false, 150), dir.path());
}

#[test]
fn iaf_trained_by_maximum_likelihood_on_moons() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Family::Iaf, "moons", false, 150);
    c.model.layers = 3;
    train_export_compare(&c, dir.path());
    let m = Package::open(dir.path()).unwrap().manifest;
    assert_eq!(
        m.graphs.encode.cost,
        flowpack::Cost::Sequential,
        "density is sequential"
    );
    assert_eq!(
        m.graphs.decode.cost,
        flowpack::Cost::OnePass,
        "sampling in one pass"
    );
}

/// Order- and connectivity-agnostic MAF on two moons: training cycles through mask sets
/// with different orders, and the ensemble density (log-sum-exp over 4 mask sets) is a
/// valid density: it integrates to 1 over a grid, and it beats the single mask set.
#[test]
fn order_agnostic_maf_ensemble_integrates_to_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Family::Maf, "moons", false, 500);
    c.model.layers = 3;
    c.model.hidden = 64;
    c.model.order_agnostic = true;
    c.model.connectivity_agnostic = true;
    c.model.masks = 4;
    c.model.ensemble = 4;
    c.train.lr = 3e-3;
    let summary = train_and_export(&c, dir.path(), "moons", false, false).unwrap();
    let ensemble = summary.ensemble_test_nll.expect("ensemble NLL reported");
    let single = summary.manifest.metrics.test_nll.unwrap();
    assert!(ensemble < 1.6, "learned something: ensemble NLL {ensemble}");
    assert!(
        ensemble <= single + 0.05,
        "an ensemble of densities is no worse than its first member: {ensemble} vs {single}"
    );

    let run = load_run(dir.path()).unwrap();
    let mut orders = std::collections::HashSet::new();
    for k in 0..4 {
        let lp = to_vec(
            &run.flow
                .log_prob(&tensor(&run.data.test.values, 2), None, &Ctx::eval(k))
                .unwrap(),
        );
        orders.insert(lp.iter().map(|v| v.to_bits()).take(4).collect::<Vec<_>>());
    }
    // In 2-D each MADE has two orders (and hidden degrees are all 1), so sets may repeat.
    assert!(orders.len() >= 2, "the mask sets are different models");
    let (win, res) = ([(-4.0, 5.0), (-4.0, 4.5)], 500);
    let density = density_grid(&run.flow, win, res, 4, &[]).unwrap();
    let cell = (9.0 / res as f64) * (8.5 / res as f64);
    let mass: f64 = density.iter().map(|&p| p as f64).sum::<f64>() * cell;
    assert!(
        (mass - 1.0).abs() <= 0.02,
        "ensemble density integrates to {mass}"
    );
}

/// Counts the nodes of `op` in a package's graph file.
fn count_ops(dir: &Path, file: &str, op: &str) -> usize {
    use prost::Message;
    let bytes = std::fs::read(dir.join(file)).unwrap();
    let model = flowpack::onnx::ModelProto::decode(bytes.as_slice()).unwrap();
    let graph = model.graph.unwrap();
    graph
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some(op))
        .count()
}

/// Density distillation (Parallel WaveNet / IAF): a MAF teacher on two moons, an IAF
/// student trained only on its own samples scored by the teacher. The reverse KL, estimated
/// independently through the exported graphs on fresh draws, ends below 0.25 nats and below
/// a third of where it started; the student's exported decode is one pass.
#[test]
fn iaf_distilled_from_a_maf_teacher() {
    let teacher_dir = tempfile::tempdir().unwrap();
    let mut t = config(Family::Maf, "moons", false, 1500);
    t.model.layers = 3;
    t.model.hidden = 64;
    t.train.lr = 3e-3;
    train_and_export(&t, teacher_dir.path(), "teacher", false, false).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Family::Iaf, "moons", false, 2000);
    c.model.layers = 5;
    c.model.hidden = 64;
    c.train.lr = 3e-3;
    c.train.eval_every = 100;
    c.train.teacher = Some(teacher_dir.path().display().to_string());
    let teacher = load_run(teacher_dir.path()).unwrap();
    let data = flowtrain::data::load(&c.data, c.train.seed).unwrap();
    let (fresh, _, _) = flowtrain::pipeline::build(&c, &data).unwrap();
    let start = reverse_kl(&fresh, &teacher.flow, 4096, 11).unwrap();

    let summary = train_and_export(&c, dir.path(), "student", false, false).unwrap();
    let trained = summary
        .reverse_kl
        .expect("a distilled run reports its reverse KL");

    // Independent estimate: fresh base draws, the student's exported decode (one pass) and
    // its exported sequential encode for log q, the teacher's exported encode for log p.
    let z = flowpack::sampling::latent_noise(4096, 2, 1.0, 12345);
    let mut student = PackageRunner::open(dir.path()).unwrap();
    let mut teacher_graphs = PackageRunner::open(teacher_dir.path()).unwrap();
    let x = student.decode(&z, &[]).unwrap();
    let (z_back, log_q) = student.encode(&x, &[]).unwrap();
    assert_close(&z_back, &z, 1e-3, 1e-3, "student encode(decode(z))");
    let (_, log_p) = teacher_graphs.encode(&x, &[]).unwrap();
    let kl = log_q
        .iter()
        .zip(&log_p)
        .map(|(q, p)| (q - p) as f64)
        .sum::<f64>()
        / log_q.len() as f64;
    eprintln!("reverse KL: start {start:.4}, validation {trained:.4}, exported graphs {kl:.4}");
    assert!(
        kl.is_finite() && kl > -0.02,
        "a KL estimate is about ≥ 0: {kl}"
    );
    assert!(kl < 0.25, "reverse KL after distillation: {kl} nats");
    assert!(kl < start / 3.0, "distillation cut the KL: {start} → {kl}");

    let m = Package::open(dir.path()).unwrap().manifest;
    assert_eq!(m.graphs.decode.cost, flowpack::Cost::OnePass);
    assert_eq!(m.graphs.encode.cost, flowpack::Cost::Sequential);
    // 5 MADEs × 3 masked layers: once each when sampling, D + 1 times each for the density.
    assert_eq!(count_ops(dir.path(), "decode.onnx", "MatMul"), 15);
    assert_eq!(count_ops(dir.path(), "encode.onnx", "MatMul"), 15 * 3);
}

/// A short image run on 8×8 digits ([1, 8, 8] events, logit pre-processing).
fn image_config(family: Family) -> Config {
    let mut c = config(family, "digits", false, 40);
    c.model.layers = 2;
    c.model.levels = 2;
    c.model.hidden = 16;
    c.train.batch_size = 64;
    c.train.eval_every = 20;
    c
}

#[test]
fn glow_on_digits_trains_exports_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for lu in [true, false] {
        let mut c = image_config(Family::Glow);
        c.model.lu = lu;
        c.model.learned_prior = !lu;
        let _ = std::fs::remove_dir_all(dir.path());
        train_export_compare(&c, dir.path());
        let m = Package::open(dir.path()).unwrap().manifest;
        assert_eq!(m.event_shape, vec![1, 8, 8]);
        assert!(count_ops(dir.path(), "encode.onnx", "Conv") > 0);
        let bpd = m.metrics.test_bits_per_dim.unwrap();
        assert!(bpd < 4.5, "learned something in 40 steps: {bpd} bits/dim");
    }
}

/// Glow and the image RealNVP with spline couplings (`--transform spline`).
#[test]
fn image_flows_with_spline_couplings_train_export_and_round_trip() {
    for family in [Family::Glow, Family::RealnvpImage] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = image_config(family);
        c.model.transform = flowtrain::config::TransformKind::Spline;
        c.model.learned_prior = true;
        train_export_compare(&c, dir.path());
        assert!(count_ops(dir.path(), "encode.onnx", "GreaterOrEqual") > 0);
        assert!(count_ops(dir.path(), "decode.onnx", "GreaterOrEqual") > 0);
    }
}

#[test]
fn multiscale_realnvp_on_digits_trains_exports_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for batch_norm in [true, false] {
        let mut c = image_config(Family::RealnvpImage);
        c.model.additive = !batch_norm;
        c.model.batch_norm = batch_norm;
        let _ = std::fs::remove_dir_all(dir.path());
        train_export_compare(&c, dir.path());
    }
    assert_eq!(
        Package::open(dir.path()).unwrap().manifest.family,
        "realnvp_image"
    );
}
