//! `flowtrain train` end to end: data → flow → training → plots → package.

use std::path::Path;

use anyhow::{Context, Result};
use flowpack::{Manifest, Metrics, Training};
use serde::Serialize;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::bijectors::Ctx;
use crate::config::Config;
use crate::data::{self, Splits, Table};
use crate::eval::{mean_nll, to_tensor};
use crate::export::{export, ExportInfo};
use crate::flows::{Flow, Preprocess};
use crate::params::Params;
use crate::plot;
use crate::seeds::{self, TEST_NOISE};
use crate::train::{train, Outcome, Run};
use flowpack::sampling::latent_noise;

/// What a finished `train` reports.
pub struct Summary {
    /// The exported manifest.
    pub manifest: Manifest,
    /// The training outcome.
    pub outcome: Outcome,
    /// Trainable scalars.
    pub parameters: usize,
    /// Test NLL of the density averaged over `model.ensemble` mask sets, when above 1.
    pub ensemble_test_nll: Option<f64>,
    /// The best validation reverse KL(flow ‖ teacher) of a distilled flow, in nats.
    pub reverse_kl: Option<f64>,
    /// A conditional flow with one categorical context column: the test NLL of each
    /// category's rows.
    pub test_nll_by_context: Vec<GroupNll>,
}

/// The test NLL of the rows of one context category.
#[derive(Debug, Clone, Serialize)]
pub struct GroupNll {
    /// The category.
    pub context: String,
    /// Test rows in it.
    pub rows: usize,
    /// Their mean NLL, nats per example.
    pub nll: f64,
}

/// Per category of a single categorical context column, the mean NLL of `table`'s rows
/// (dequantised with the test noise); empty for other contexts.
pub fn nll_by_context(
    flow: &Flow,
    data: &Splits,
    table: &Table,
    deq: &[f32],
) -> Result<Vec<GroupNll>> {
    let Some(spec) = &data.context else {
        return Ok(Vec::new());
    };
    let [column] = &spec.columns[..] else {
        return Ok(Vec::new());
    };
    let flowpack::ContextKind::Categorical { categories } = &column.kind else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (k, name) in categories.iter().enumerate() {
        let idx: Vec<usize> = (0..table.rows())
            .filter(|&r| table.context[r] == k as f32)
            .collect();
        if idx.is_empty() {
            continue;
        }
        out.push(GroupNll {
            context: format!("{}={name}", column.name),
            rows: idx.len(),
            nll: mean_nll(flow, &table.select(&idx), deq, TEST_NOISE, 1)?,
        });
    }
    Ok(out)
}

/// A flow built for `config` over `data`, with its parameter store and dequantised columns.
pub fn build(config: &Config, data: &Splits) -> Result<(Flow, Params, Vec<f32>)> {
    let deq = data::quantization_steps(&config.data, &data.train);
    let params = Params::new(config.train.seed);
    let t = &data.train;
    let context = data.context.clone().map(|mut spec| {
        spec.embedding =
            (config.model.context_embedding > 0).then_some(config.model.context_embedding);
        spec
    });
    let flow = if config.model.family.is_image() {
        let Some(shape) = data.image else {
            anyhow::bail!(
                "{} models images; {} is not an image dataset (digits, or keep all columns)",
                config.model.family.as_str(),
                data.source
            );
        };
        // Dequantised pixels lie within half a step of the observed range.
        let step = deq.iter().copied().fold(0f32, f32::max) as f64;
        let [lo, hi] = flowpack::image::value_range(&t.values);
        let pre = Preprocess::Logit {
            low: lo - step / 2.0,
            high: hi + step / 2.0,
        };
        Flow::build(&config.model, &shape, pre, &params, context)?
    } else {
        let standardize = config.data.standardize.then(|| {
            let mut s = data::standardization(t, &deq);
            if config.data.power_transform {
                let mut rng = ChaCha8Rng::seed_from_u64(seeds::power_transform(config.train.seed));
                data::fit_power_transform(&mut s, t, &deq, &mut rng);
            }
            s
        });
        let pre = match &standardize {
            Some(s) => Preprocess::Standardize(s),
            None => Preprocess::None,
        };
        Flow::build(&config.model, &[t.dim], pre, &params, context)?
    };
    Ok((flow, params, deq))
}

/// Trains (resuming from a checkpoint in `out` unless `fresh`), draws the plots and writes
/// the package into `out`.
pub fn train_and_export(
    config: &Config,
    out: &Path,
    name: &str,
    progress: bool,
    fresh: bool,
) -> Result<Summary> {
    config.validate()?;
    let data = data::load(&config.data, config.split_seed())?;
    let (flow, params, deq) = build(config, &data)?;
    let teacher = match &config.train.teacher {
        Some(dir) => {
            let t = load_run(Path::new(dir)).context("cannot load the teacher")?;
            anyhow::ensure!(
                t.config.data == config.data,
                "the teacher in {dir} was trained on other data ({}); distil on the same data settings",
                t.config.data.dataset
            );
            Some(t)
        }
        None => None,
    };
    if fresh {
        let _ = std::fs::remove_dir_all(out.join("checkpoint"));
        let _ = std::fs::remove_file(out.join("metrics.jsonl"));
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("config.toml"), toml::to_string_pretty(config)?)?;
    let run = Run {
        flow: &flow,
        params: &params,
        config,
        data: &data,
        dequantized: &deq,
        out,
        progress,
        teacher: teacher.as_ref().map(|t| &t.flow),
    };
    let outcome = train(&run)?;
    let test_nll = mean_nll(&flow, &data.test, &deq, TEST_NOISE, 1)?;
    // A distilled flow's validation objective was the reverse KL; report both.
    let (validation_nll, reverse_kl) = match &teacher {
        Some(_) => (
            mean_nll(
                &flow,
                &data.val,
                &deq,
                seeds::validation(config.split_seed()),
                1,
            )?,
            Some(outcome.best_val_loss),
        ),
        None => (outcome.best_val_loss, None),
    };
    let ensemble = config.model.ensemble;
    let ensemble_test_nll = if ensemble > 1 {
        Some(mean_nll(&flow, &data.test, &deq, TEST_NOISE, ensemble)?)
    } else {
        None
    };
    let test_nll_by_context = nll_by_context(&flow, &data, &data.test, &deq)?;
    let dim = data.train.dim;
    let bits = deq
        .iter()
        .all(|&q| q == 1.0)
        .then(|| test_nll / (dim as f64 * std::f64::consts::LN_2));

    plot::loss_curves(
        &outcome.history,
        run.objective().name(),
        &out.join("loss.png"),
    )?;
    if dim == 2 {
        density_plot(&flow, &data, config, &out.join("density.png"))?;
    }
    let mut reference = data.val.clone();
    reference.values.extend_from_slice(&data.test.values);
    reference.context.extend_from_slice(&data.test.context);
    let manifest = export(
        &flow,
        ExportInfo {
            name,
            features: data.train.names.clone(),
            dequantized: &deq,
            train: &data.train,
            reference: &reference,
            reference_source: format!(
                "{} rows: the validation and test splits of {}",
                reference.rows(),
                data.source
            ),
            metrics: Metrics {
                validation_nll: Some(validation_nll),
                test_nll: Some(test_nll),
                test_bits_per_dim: bits,
            },
            training: Training {
                dataset: data.source.clone(),
                seed: config.train.seed,
                steps: outcome.steps,
                best_step: Some(outcome.best_step),
                config: serde_json::to_value(config)?,
                flowtrain_version: env!("CARGO_PKG_VERSION").into(),
            },
        },
        out,
    )?;
    let report = Report {
        family: config.model.family.as_str(),
        dataset: &data.source,
        features: dim,
        parameters: params.count(),
        steps: outcome.steps,
        best_step: outcome.best_step,
        stopped_early: outcome.stopped_early,
        median_step_ms: outcome.median_step_seconds * 1e3,
        threads: outcome.threads,
        train_seconds: outcome.train_seconds,
        validation_nll,
        teacher: config.train.teacher.as_deref(),
        reverse_kl,
        test_nll,
        ensemble,
        ensemble_test_nll,
        test_bits_per_dim: bits,
        skipped_steps: outcome.nan_skips,
        context: data.context.as_ref().map(|c| {
            c.columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        }),
        test_nll_by_context: &test_nll_by_context,
    };
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    Ok(Summary {
        manifest,
        outcome,
        parameters: params.count(),
        ensemble_test_nll,
        reverse_kl,
        test_nll_by_context,
    })
}

/// `summary.json`: what a run reports, for scripts (the benchmark tables read it).
#[derive(Serialize)]
struct Report<'a> {
    family: &'a str,
    dataset: &'a str,
    features: usize,
    parameters: usize,
    steps: u64,
    best_step: u64,
    stopped_early: bool,
    median_step_ms: f64,
    /// The threads training ran on (given, or chosen by timing its first steps).
    threads: usize,
    train_seconds: f64,
    validation_nll: f64,
    teacher: Option<&'a str>,
    reverse_kl: Option<f64>,
    test_nll: f64,
    ensemble: usize,
    ensemble_test_nll: Option<f64>,
    test_bits_per_dim: Option<f64>,
    skipped_steps: u64,
    /// The context columns of a conditional flow, comma-separated.
    context: Option<String>,
    test_nll_by_context: &'a [GroupNll],
}

/// A finished (or interrupted) run read back from its folder: its configuration, its data
/// and the flow with the best parameters the run kept, in evaluation mode.
pub struct LoadedRun {
    /// The run's `config.toml`.
    pub config: Config,
    /// The data, split as in training.
    pub data: Splits,
    /// The flow, best parameters restored.
    pub flow: Flow,
    /// Its parameter store.
    pub params: Params,
    /// Dequantisation step per column.
    pub dequantized: Vec<f32>,
}

/// Reads a run folder written by [`train_and_export`] (config.toml and the checkpoint).
pub fn load_run(dir: &Path) -> Result<LoadedRun> {
    let config = Config::from_toml_file(&dir.join("config.toml"))
        .with_context(|| format!("{} is not a flowtrain run folder", dir.display()))?;
    let tensors = crate::checkpoint::best_tensors(dir)?;
    let data = data::load(&config.data, config.split_seed())?;
    let (flow, params, dequantized) = build(&config, &data)?;
    params.restore(&tensors).with_context(|| {
        format!(
            "the checkpoint in {} does not fit its config",
            dir.display()
        )
    })?;
    Ok(LoadedRun {
        config,
        data,
        flow,
        params,
        dequantized,
    })
}

/// Values of exp(log p) on a `res × res` grid over `win`, rows from top to bottom, the
/// density averaged over `ensemble` mask sets; a conditional flow's density given the raw
/// context row `context` (empty for an unconditional flow).
pub fn density_grid(
    flow: &Flow,
    win: [(f64, f64); 2],
    res: usize,
    ensemble: usize,
    context: &[f32],
) -> Result<Vec<f32>> {
    let mut pts = Vec::with_capacity(res * res * 2);
    for r in 0..res {
        let y = win[1].1 - (r as f64 + 0.5) * (win[1].1 - win[1].0) / res as f64;
        for c in 0..res {
            let x = win[0].0 + (c as f64 + 0.5) * (win[0].1 - win[0].0) / res as f64;
            pts.push(x as f32);
            pts.push(y as f32);
        }
    }
    let c = match context.len() {
        0 => None,
        w => Some(to_tensor(context.repeat(res * res), w)?),
    };
    let lp = flow
        .ensemble_log_prob(&to_tensor(pts, 2)?, c.as_ref(), ensemble)?
        .exp()?;
    Ok(lp.to_vec1::<f32>()?)
}

/// The 2-D density, its samples and the test data side by side; a conditional flow's
/// given the first test row's context, beside the test rows that share it.
fn density_plot(flow: &Flow, data: &Splits, config: &Config, path: &Path) -> Result<()> {
    let test = &data.test;
    let (context, shown) = match test.context_dim {
        0 => (Vec::new(), test.values.clone()),
        w => {
            let first = test.context[..w].to_vec();
            let shown = (0..test.rows())
                .filter(|&r| test.context[r * w..(r + 1) * w] == first[..])
                .flat_map(|r| test.row(r).to_vec())
                .collect();
            (first, shown)
        }
    };
    let win = plot::window(&test.values);
    let res = 150;
    let density = density_grid(flow, win, res, config.model.ensemble, &context)?;
    let n = 5000;
    let z = latent_noise(n, 2, 1.0, seeds::plot_samples(config.train.seed));
    let c = match context.len() {
        0 => None,
        w => Some(to_tensor(context.repeat(n), w)?),
    };
    let samples = flow
        .decode(&to_tensor(z, 2)?, c.as_ref(), &Ctx::EVAL)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    plot::density_panels(&shown, &density, res, &samples, win, path)
}
