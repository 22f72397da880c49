//! Exact per-feature contributions: for autoregressive flows in one shared order the
//! exported `log_prob_terms` sum to `log_prob` and each equals the conditional density
//! log p(xᵢ | x₍<ᵢ₎) — checked here against marginals integrated numerically from the
//! exported joint density, independently of how the graph computes the terms.

use std::path::Path;

use flowpack::{Contributions, Package};
use flowtrain::config::{Config, Family, PermutationKind};
use flowtrain::pipeline::train_and_export;
use flowtrain::runtime::PackageRunner;

fn config(family: Family, dataset: &str, permutation: PermutationKind) -> Config {
    let mut c = Config::default();
    c.model.family = family;
    c.model.layers = 3;
    c.model.hidden = 32;
    c.model.batch_norm = true;
    c.model.permutation = permutation;
    c.data.dataset = dataset.into();
    c.data.toy_samples = 3000;
    c.train.steps = 300;
    c.train.eval_every = 100;
    c.train.batch_size = 128;
    c.train.seed = 5;
    c
}

/// A 3-D table with curved dependence: x ~ N(0, 1), y = x² − 1 + 0.3ε, w = sin(2y) + 0.3ε'.
fn write_curved_csv(path: &Path, n: usize) {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut text = String::from("x,y,w\n");
    for _ in 0..n {
        let e: [f64; 3] = std::array::from_fn(|_| StandardNormal.sample(&mut rng));
        let x = e[0];
        let y = x * x - 1.0 + 0.3 * e[1];
        let w = (2.0 * y).sin() + 0.3 * e[2];
        text.push_str(&format!("{x},{y},{w}\n"));
    }
    std::fs::write(path, text).unwrap();
}

/// `log ∫ exp(log_prob)` over the coordinates in `free` (a `res`-point midpoint grid over
/// `range` each), the others fixed at `row`'s values.
fn log_marginal(
    runner: &mut PackageRunner,
    row: &[f32],
    free: &[usize],
    range: &[(f64, f64)],
    res: usize,
) -> f64 {
    let d = row.len();
    let cells = res.pow(free.len() as u32);
    let mut grid = Vec::with_capacity(cells * d);
    let mut volume = 1.0;
    for &f in free {
        volume *= (range[f].1 - range[f].0) / res as f64;
    }
    for cell in 0..cells {
        let mut r = row.to_vec();
        let mut c = cell;
        for &f in free {
            let (lo, hi) = range[f];
            r[f] = (lo + (c % res) as f64 * (hi - lo) / res as f64 + 0.5 * (hi - lo) / res as f64)
                as f32;
            c /= res;
        }
        grid.extend_from_slice(&r);
    }
    let lp = runner.log_prob(&grid, &[]).unwrap();
    let max = lp.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = lp.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + (sum * volume).ln()
}

/// Trains, then checks the terms of a few test rows: they sum to log_prob within 1e-5,
/// and term k (the k-th feature in the order) equals log p(x₍≤k₎) − log p(x₍<k₎), both
/// marginals integrated from the exported joint density.
fn check_terms(config: &Config, dir: &Path, range: &[(f64, f64)], res: usize, rows: &[Vec<f32>]) {
    train_and_export(config, dir, "terms", false, true).unwrap();
    let package = Package::open(dir).unwrap();
    let order = match &package.manifest.scoring.contributions {
        Contributions::Exact { order } => order.clone(),
        other => panic!("expected exact contributions, got {other:?}"),
    };
    let d = order.len();
    let mut runner = PackageRunner::open(dir).unwrap();
    let flat: Vec<f32> = rows.concat();
    let (lp, terms) = runner.log_prob_terms(&flat, &[]).unwrap();
    let terms = terms.expect("a log_prob_terms output");
    for (i, row) in rows.iter().enumerate() {
        let t = &terms[i * d..(i + 1) * d];
        let sum: f64 = t.iter().map(|&v| v as f64).sum();
        assert!(
            (sum - lp[i] as f64).abs() < 1e-5,
            "row {i}: terms sum to {sum}, log_prob is {}",
            lp[i]
        );
        // log p(x₍≤k₎) for k = 0..d: the first d − 1 by integration, the last is log_prob.
        let mut prefix = vec![0.0];
        for k in 1..d {
            let free = &order[k..];
            prefix.push(log_marginal(&mut runner, row, free, range, res));
        }
        prefix.push(lp[i] as f64);
        for k in 0..d {
            let want = prefix[k + 1] - prefix[k];
            let got = t[order[k]] as f64;
            assert!(
                (got - want).abs() < 0.02,
                "row {i}, feature {} ({}-th in the order): term {got}, conditional by integration {want}",
                order[k],
                k + 1
            );
        }
    }
}

#[test]
fn maf_terms_are_the_conditionals_on_2d_data() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(Family::Maf, "moons", PermutationKind::None);
    let range = [(-4.0, 5.0), (-4.0, 4.0)];
    let rows = vec![
        vec![0.0, 0.5],
        vec![1.0, -0.4],
        vec![-0.8, 0.2],
        vec![2.5, 2.0],
    ];
    check_terms(&cfg, dir.path(), &range, 1500, &rows);
}

#[test]
fn made_terms_follow_a_shuffled_order_on_3d_data() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("curved.csv");
    write_curved_csv(&csv, 3000);
    // One MADE with a seeded order, and a MAF whose MADEs share the identity order after a
    // Yeo–Johnson transform per feature (elementwise, so the terms stay exact).
    for (family, permutation) in [
        (Family::Made, PermutationKind::Random),
        (Family::Maf, PermutationKind::None),
    ] {
        let dir = tmp.path().join(format!("{family:?}"));
        let mut cfg = config(family, csv.to_str().unwrap(), permutation);
        cfg.data.power_transform = family == Family::Maf;
        let range = [(-6.0, 6.0), (-5.0, 14.0), (-3.5, 3.5)];
        let rows = vec![
            vec![0.1, -0.9, 0.9],
            vec![1.5, 1.2, 0.6],
            vec![-1.0, 0.5, -0.5],
        ];
        check_terms(&cfg, &dir, &range, 160, &rows);
    }
}

#[test]
fn flows_without_an_exact_decomposition_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    for (family, permutation, why) in [
        (Family::Realnvp, PermutationKind::None, "coupling"),
        (
            Family::Maf,
            PermutationKind::Reverse,
            "different feature orders",
        ),
        (Family::Iaf, PermutationKind::None, "IAF"),
    ] {
        let dir = tmp.path().join(format!("{family:?}{permutation:?}"));
        let mut cfg = config(family, "moons", permutation);
        cfg.train.steps = 20;
        train_and_export(&cfg, &dir, "mixing", false, true).unwrap();
        let package = Package::open(&dir).unwrap();
        match &package.manifest.scoring.contributions {
            Contributions::Unavailable { reason } => {
                assert!(reason.contains(why), "{family:?}: {reason}")
            }
            other => panic!("{family:?} {permutation:?}: {other:?}"),
        }
        let outputs = &package.manifest.graphs.encode.outputs;
        assert_eq!(outputs.len(), 2, "no log_prob_terms output");
        let mut runner = PackageRunner::open(&dir).unwrap();
        assert!(runner.log_prob_terms(&[0.0, 0.0], &[]).unwrap().1.is_none());
    }
}
