//! Whole flows, trained briefly and exported: the package passes flowpack's checks, the
//! exported log_prob equals candle's, graphs round-trip, and a 2-D density integrates to 1.

mod common;

use std::path::Path;

use common::*;
use flowpack::Package;
use flowtrain::config::{Config, Family, PermutationKind};
use flowtrain::data::Table;
use flowtrain::pipeline::{build, train_and_export};
use flowtrain::runtime::PackageRunner;
use flowtrain::train::mean_nll;

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
    assert!(summary.outcome.best_val_nll.is_finite());
    let package = Package::open(dir).expect("the exported package passes flowpack's checks");
    assert_eq!(package.manifest.family, config.model.family.as_str());

    // Rebuild the training side from the best checkpoint the run kept.
    let data = flowtrain::data::load(&config.data, config.train.seed).unwrap();
    let (flow, params, deq) = build(config, &data).unwrap();
    let ckpt = std::fs::read_dir(dir.join("checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let saved = candle_core::safetensors::load(ckpt, &candle_core::Device::Cpu).unwrap();
    let best: std::collections::HashMap<_, _> = saved
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("best.").map(|k| (k.to_string(), v.clone())))
        .collect();
    params.restore(&best).unwrap();
    flow.set_training(false);
    let val = mean_nll(&flow, &data.val, &deq, config.train.seed ^ 0x7a1).unwrap();
    assert!(
        (val - summary.outcome.best_val_nll).abs() < 1e-6,
        "restored best state: {val} vs {}",
        summary.outcome.best_val_nll
    );

    let test: &Table = &data.test;
    let d = test.dim;
    let want = to_vec(&flow.log_prob(&tensor(&test.values, d)).unwrap());
    let mut runner = PackageRunner::open(dir).unwrap();
    let (z, got) = runner.encode(&test.values).unwrap();
    assert_close(&got, &want, 1e-4, 1e-4, "exported log_prob vs candle");
    let cz = to_vec(&flow.encode(&tensor(&test.values, d)).unwrap().0);
    assert_close(&z, &cz, 1e-4, 1e-4, "exported z vs candle");
    let back = runner.decode(&z).unwrap();
    assert_close(
        &back,
        &test.values,
        1e-3,
        1e-4,
        "decode(encode(x)) through the graphs",
    );

    // Calibration quantiles are ascending and bracket the median score.
    let q = &package.manifest.calibration.quantiles;
    assert!(q
        .windows(2)
        .all(|w| w[0].log_prob <= w[1].log_prob && w[0].q < w[1].q));
    let p50 = package
        .manifest
        .calibration
        .percentile(q[q.len() / 2].log_prob)
        .unwrap();
    assert!((p50 - q[q.len() / 2].q).abs() < 1e-9);
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
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Family::Realnvp, "moons", false, 600);
    c.model.layers = 6;
    c.model.hidden = 64;
    c.train.lr = 3e-3;
    let summary = train_and_export(&c, dir.path(), "moons", false, false).unwrap();
    assert!(
        summary.outcome.best_val_nll < 1.6,
        "learned something: val NLL {}",
        summary.outcome.best_val_nll
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
    let (_, lp) = runner.encode(&grid).unwrap();
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
