//! The pieces under the training loop: schedule, optimiser, data handling.

use candle_core::{Device, Tensor, Var};
use flowtrain::config::{Config, DataConfig, Dequantize};
use flowtrain::data::{self, toy, Table};
use flowtrain::optim::{learning_rate, Adam};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn warm_up_then_cosine() {
    let lr = |s| learning_rate(s, 1100, 1e-3, 100, 0.1);
    assert!((lr(0) - 1e-5).abs() < 1e-12);
    assert!((lr(99) - 1e-3).abs() < 1e-12);
    assert!((lr(100) - 1e-3).abs() < 1e-12);
    assert!((lr(600) - 0.55e-3).abs() < 1e-9, "half way down the cosine");
    assert!((lr(1100) - 1e-4).abs() < 1e-12);
    assert!((1..1100).all(|s| lr(s) <= 1e-3 + 1e-15));
}

#[test]
fn adam_minimises_a_quadratic_and_clipping_scales_gradients() {
    let w = Var::from_tensor(&Tensor::new(&[3f32, -2.0], &Device::Cpu).unwrap()).unwrap();
    let mut adam = Adam::new(vec![w.clone()], 0.0).unwrap();
    for _ in 0..500 {
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        adam.step(&g, 0.05, 1.0).unwrap();
    }
    let v = w.as_tensor().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.abs() < 1e-2), "{v:?}");
    assert_eq!(adam.t, 500);

    let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let norm = adam.grad_norm(&g).unwrap();
    let want = 2.0 * v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    assert!((norm - want).abs() < 1e-6);
}

#[test]
fn the_weight_average_follows_the_parameters_and_swaps_in_and_out() {
    // With constant gradients the parameter moves by lr each step (Adam's normalised step);
    // its average lags behind by the decay's horizon.
    let w = Var::from_tensor(&Tensor::new(&[0f32], &Device::Cpu).unwrap()).unwrap();
    let mut adam = Adam::new(vec![w.clone()], 0.0)
        .unwrap()
        .with_average(0.9)
        .unwrap();
    let mut avg = 0f64;
    for t in 1..=200u64 {
        let loss = (w.as_tensor() * -1.0).unwrap().sum_all().unwrap();
        adam.step(&loss.backward().unwrap(), 0.01, 1.0).unwrap();
        let d = 0.9f64.min((1.0 + t as f64) / (10.0 + t as f64));
        let now = w.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        avg = d * avg + (1.0 - d) * now;
    }
    let now = w.as_tensor().to_vec1::<f32>().unwrap()[0];
    assert!((now - 2.0).abs() < 1e-3, "{now}");
    adam.swap_average().unwrap();
    let swapped = w.as_tensor().to_vec1::<f32>().unwrap()[0];
    assert!((swapped as f64 - avg).abs() < 1e-4, "{swapped} vs {avg}");
    assert!(swapped < now - 0.05, "the average lags: {swapped} vs {now}");
    adam.swap_average().unwrap();
    assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap()[0], now);
    // The average is checkpointed with the moments.
    assert!(adam.state().contains_key("adam.avg.0"));
}

#[test]
fn toy_densities_are_seeded_and_finite() {
    for name in toy::TOY {
        let a = toy::sample(name, 500, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        let b = toy::sample(name, 500, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        let c = toy::sample(name, 500, &mut ChaCha8Rng::seed_from_u64(2)).unwrap();
        assert_eq!(a, b, "{name}: same seed, same points");
        assert_ne!(a, c, "{name}: another seed, other points");
        assert!(a.iter().all(|v| v.is_finite() && v.abs() < 20.0), "{name}");
    }
    assert!(toy::sample("nope", 1, &mut ChaCha8Rng::seed_from_u64(1)).is_none());
}

#[test]
fn the_split_seed_fixes_the_rows_whatever_the_training_seed() {
    let mut config = Config::default();
    config.data.dataset = "wine".into();
    config.train.seed = 3;
    assert_eq!(config.split_seed(), 3, "the training seed by default");
    config.data.split_seed = Some(7);
    assert_eq!(config.split_seed(), 7);
    let fixed = data::load(&config.data, config.split_seed()).unwrap();
    config.train.seed = 4;
    let again = data::load(&config.data, config.split_seed()).unwrap();
    assert_eq!(
        (&fixed.train, &fixed.val, &fixed.test),
        (&again.train, &again.val, &again.test)
    );
    let own = data::load(&config.data, config.train.seed).unwrap();
    assert_ne!(fixed.test, own.test, "seed 4's own split differs");
}

#[test]
fn splits_are_seeded_disjoint_and_complete() {
    let cfg = DataConfig {
        dataset: "wine".into(),
        ..Default::default()
    };
    let a = data::load(&cfg, 7).unwrap();
    let b = data::load(&cfg, 7).unwrap();
    assert_eq!(a.train, b.train);
    assert_eq!(
        (a.train.rows(), a.val.rows(), a.test.rows()),
        (1279, 160, 160)
    );
    assert_eq!(a.train.dim, 11);
    let c = data::load(&cfg, 8).unwrap();
    assert_ne!(a.test, c.test);
    let mut all: Vec<Vec<u32>> = [&a.train, &a.val, &a.test]
        .iter()
        .flat_map(|t| {
            (0..t.rows())
                .map(|r| t.row(r).iter().map(|v| v.to_bits()).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .collect();
    let whole = data::read_table("wine", data::Columns::Drop(&[])).unwrap();
    let mut want: Vec<Vec<u32>> = (0..whole.rows())
        .map(|r| whole.row(r).iter().map(|v| v.to_bits()).collect())
        .collect();
    all.sort();
    want.sort();
    assert_eq!(all, want, "the three splits partition the table");

    let digits = data::read_table("digits", data::Columns::Drop(&[])).unwrap();
    assert_eq!((digits.rows(), digits.dim), (1797, 64));
    assert!(digits.quantization_steps().iter().all(|&q| q == 1.0));
    let wine = data::read_table("wine", data::Columns::Drop(&[])).unwrap();
    let steps = wine.quantization_steps();
    assert_eq!(steps[6], 1.0, "total sulfur dioxide is a count: {steps:?}");
    assert!(
        steps.iter().all(|&q| q > 0.0 && q <= 1.0),
        "every wine column is recorded to a few decimals: {steps:?}"
    );
}

#[test]
fn dequantisation_and_standardisation() {
    let ints = [1.0f32, 3.0, 2.0, 1.0, 2.0, 3.0, 1.0, 2.0];
    let reals = [0.5f32, 1.5, 2.25, 0.123_456, 0.7, 0.9, 1.1, 1.3];
    let values: Vec<f32> = (0..8).flat_map(|r| [ints[r], reals[r], 4.0]).collect();
    let t = Table::new(vec!["int".into(), "real".into(), "const".into()], values).unwrap();
    assert_eq!(
        t.quantization_steps(),
        vec![1.0, 0.0, 1.0],
        "values repeat on a grid, or not"
    );
    let cfg = DataConfig {
        dequantize: Dequantize::Auto,
        ..Default::default()
    };
    let deq = data::quantization_steps(&cfg, &t);
    let mut v = t.values.clone();
    data::dequantize(&mut v, 3, &deq, &mut ChaCha8Rng::seed_from_u64(0));
    for (r, row) in v.chunks(3).enumerate() {
        assert!((row[0] - t.row(r)[0]).abs() <= 0.5 && row[0] != t.row(r)[0]);
        assert_eq!(row[1], t.row(r)[1], "real-valued column untouched");
    }
    let s = data::standardization(&t, &deq);
    let mean = ints.iter().sum::<f32>() as f64 / 8.0;
    assert!((s.shift[0] as f64 - mean).abs() < 1e-6);
    let var0 = ints.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 8.0 + 1.0 / 12.0;
    assert!(
        (s.scale[0] as f64 - f64::sqrt(var0)).abs() < 1e-6,
        "noise variance counted"
    );
    assert!(
        (s.scale[2] as f64 - f64::sqrt(1.0 / 12.0)).abs() < 1e-6,
        "constant integer column: noise only"
    );
    let s2 = data::standardization(&t, &[0.0, 0.0, 0.0]);
    assert_eq!(s2.scale[2], 1.0, "constant column keeps scale 1");
}

#[test]
fn config_files_layer_under_flags_and_reject_unknown_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.toml");
    std::fs::write(
        &p,
        "[model]\nfamily = \"nice\"\nlayers = 3\n[train]\nlr = 0.01\n[data]\ndataset = \"rings\"\n",
    )
    .unwrap();
    let c = Config::from_toml_file(&p).unwrap();
    assert_eq!(c.model.layers, 3);
    assert_eq!(c.train.lr, 0.01);
    assert_eq!(c.train.batch_size, 256, "unset keys keep defaults");
    c.validate().unwrap();
    std::fs::write(&p, "[train]\nlearning_rate = 0.01\n").unwrap();
    let e = Config::from_toml_file(&p).unwrap_err().to_string();
    assert!(e.contains("learning_rate"), "{e}");
    let mut bad = Config::default();
    bad.train.batch_size = 1;
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("batch_size"));
    let mut bad = Config::default();
    bad.model.family = flowtrain::config::Family::Glow;
    bad.data.power_transform = true;
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("power_transform"));
    // Spline maps: where each family takes them, and never with additive couplings.
    use flowtrain::config::{Family, TransformKind};
    for (family, additive, ok) in [
        (Family::Maf, false, true),
        (Family::Glow, false, true),
        (Family::RealnvpImage, false, true),
        (Family::Realnvp, false, false),
        (Family::Nsf, false, false),
        (Family::Glow, true, false),
    ] {
        let mut c = Config::default();
        c.model.family = family;
        c.model.additive = additive;
        c.model.transform = TransformKind::Spline;
        match c.validate() {
            Ok(()) => assert!(ok, "{family:?} additive={additive} accepted"),
            Err(e) => {
                assert!(!ok, "{family:?}: {e}");
                assert!(e.to_string().contains("transform"), "{e}");
            }
        }
    }
}

#[test]
fn npy_tables_are_read_and_bad_values_refused() {
    use ndarray_npy::WriteNpyExt;
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.npy");
    let a = ndarray::Array2::from_shape_vec((3, 2), vec![1.0f64, 2.0, 3.0, 4.0, 5.0, 6.5]).unwrap();
    a.write_npy(std::fs::File::create(&p).unwrap()).unwrap();
    let t = data::read_table(p.to_str().unwrap(), data::Columns::Drop(&[])).unwrap();
    assert_eq!((t.rows(), t.dim), (3, 2));
    assert_eq!(t.values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
    assert_eq!(t.names, vec!["x0", "x1"]);

    let q = tmp.path().join("f32.npy");
    let b = ndarray::Array2::from_shape_vec((1, 2), vec![1.0f32, f32::INFINITY]).unwrap();
    b.write_npy(std::fs::File::create(&q).unwrap()).unwrap();
    let e = data::read_table(q.to_str().unwrap(), data::Columns::Drop(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("row 0, column 1") && e.contains("not a finite value"),
        "{e}"
    );
}

#[test]
fn non_finite_steps_are_skipped_logged_and_slow_the_learning_rate() {
    use flowtrain::pipeline::build;
    use flowtrain::train::{train, Record, Run};
    let mut config = Config::default();
    config.data.dataset = "moons".into();
    config.data.toy_samples = 500;
    config.model.hidden = 8;
    config.train.steps = 50;
    let data = data::load(&config.data, 0).unwrap();
    let (flow, params, deq) = build(&config, &data).unwrap();
    // Poison the weights (ReLU would swallow a NaN in a hidden layer): every loss is NaN.
    for w in params.trainable() {
        w.set(&w.as_tensor().affine(0.0, f64::NAN).unwrap())
            .unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = Run {
        flow: &flow,
        params: &params,
        config: &config,
        data: &data,
        dequantized: &deq,
        out: tmp.path(),
        progress: false,
        teacher: None,
    };
    let e = train(&run).unwrap_err().to_string();
    assert!(e.contains("20 consecutive steps"), "{e}");
    let log = flowtrain::train::read_history(tmp.path(), u64::MAX).unwrap();
    let scales: Vec<f64> = log
        .iter()
        .filter_map(|r| match r {
            Record::Skip { lr_scale, .. } => Some(*lr_scale),
            _ => None,
        })
        .collect();
    assert_eq!(scales.len(), 20);
    assert_eq!(scales[0], 0.5);
    assert_eq!(scales[1], 0.25, "each skip halves the learning rate");
}

#[test]
fn idx_files_read_plain_and_gzipped_and_refuse_bad_headers() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    // Two 2×3 images of unsigned bytes.
    let mut idx = vec![0u8, 0, 0x08, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
    idx.extend(0u8..12);
    let plain = dir.path().join("x-idx3-ubyte");
    std::fs::write(&plain, &idx).unwrap();
    let gz = dir.path().join("x-idx3-ubyte.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&idx).unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    for path in [&plain, &gz] {
        let t = flowtrain::data::images::idx_images(path).unwrap();
        assert_eq!((t.rows(), t.dim), (2, 6));
        assert_eq!(t.row(1), &[6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        assert_eq!(t.names[4], "pixel_1_1");
    }
    let short = dir.path().join("short-idx3-ubyte");
    std::fs::write(&short, &idx[..20]).unwrap();
    let e = flowtrain::data::images::idx_images(&short)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the header says"), "{e}");
    let bad = dir.path().join("bad-idx3-ubyte");
    std::fs::write(&bad, [1u8, 2, 3, 4]).unwrap();
    let e = flowtrain::data::images::idx_images(&bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an IDX file"), "{e}");
}
