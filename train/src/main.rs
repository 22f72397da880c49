//! `flowtrain`: train, evaluate and sample normalizing flows from the command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use flowpack::sampling::latent_noise;
use flowtrain::bijectors::Mask;
use flowtrain::config::{Config, Dequantize, Family, PermutationKind, Preset};
use flowtrain::data::{self, toy, Columns};
use flowtrain::nn::Activation;
use flowtrain::runtime::PackageRunner;
use rand::SeedableRng;

// candle allocates a fresh buffer for every tensor op; glibc's allocator returns and
// re-faults those pages constantly (over half of a training step went to the kernel).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "flowtrain",
    version,
    about = "Train normalizing flows and export them as ONNX model packages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a flow and write its package (flow.json, encode.onnx, decode.onnx) into --out.
    Train(Box<TrainArgs>),
    /// Print the NLL of a package on a dataset's test split or on a whole CSV/NPY file.
    Eval(EvalArgs),
    /// Draw samples from a package into a CSV file or a PNG plot.
    Sample(SampleArgs),
    /// Score normal rows with a package and store their log-densities as its reference set
    /// (what turns a served score into a tail probability).
    Calibrate(CalibrateArgs),
    /// Write a dataset's training, validation and test splits as .npy files, exactly as
    /// `train` with the same seed sees them (validation and test with their fixed
    /// dequantisation noise), to train and score another library's model on the same rows.
    Splits(SplitsArgs),
}

#[derive(Args)]
struct SplitsArgs {
    /// A built-in dataset (as `train --data`) or a .csv/.npy path.
    #[arg(long)]
    data: String,
    /// The split seed `train` would use (its --split-seed, else its --seed): it fixes the
    /// split and the validation noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder: train.npy, val.npy, test.npy and splits.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct CalibrateArgs {
    /// Package folder (rewritten in place: reference.bin and flow.json).
    #[arg(long)]
    model: PathBuf,
    /// Normal rows: a .csv file with the model's feature columns (others are ignored), or
    /// a .npy array of exactly the model's features.
    #[arg(long)]
    data: PathBuf,
    /// What the rows are, for the manifest (default: the file name and row count).
    #[arg(long)]
    source: Option<String>,
}

#[derive(Args)]
struct TrainArgs {
    /// Flow family.
    #[arg(long, value_enum)]
    family: Option<Family>,
    /// moons, eight_gaussians, checkerboard, rings, pinwheel, wine, digits, mnist, fashion_mnist
    /// (the last two after `make data`), or a .csv/.npy path.
    #[arg(long)]
    data: Option<String>,
    /// Output folder: the package, checkpoints, metrics.jsonl and plots.
    #[arg(long)]
    out: PathBuf,
    /// TOML file with [model], [train] and [data] tables; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start from a task's configuration (anomaly: an explainable MAF sized by the data);
    /// other flags override its values.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Model name recorded in the manifest (default: the output folder's name).
    #[arg(long)]
    name: Option<String>,
    /// Maximum optimiser steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Seed for everything random.
    #[arg(long)]
    seed: Option<u64>,
    /// Seed of the data split and the validation noise alone (default: --seed): train
    /// several seeds on the same rows.
    #[arg(long)]
    split_seed: Option<u64>,
    /// Coupling layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Hidden units per layer.
    #[arg(long)]
    hidden: Option<usize>,
    /// Hidden layers per conditioner.
    #[arg(long)]
    hidden_layers: Option<usize>,
    /// Hidden nonlinearity.
    #[arg(long, value_enum)]
    activation: Option<Activation>,
    /// Batch norm after coupling layers.
    #[arg(long)]
    batch_norm: Option<bool>,
    /// A Yeo–Johnson power transform per feature after standardising (fitted on the
    /// training split, exported with the flow).
    #[arg(long)]
    power_transform: Option<bool>,
    /// How couplings split the features.
    #[arg(long, value_enum)]
    mask: Option<Mask>,
    /// What goes between couplings (or MADEs): nothing, a reversal, a seeded permutation, or
    /// a learned LU-parameterised linear map (`lu`, the NSF paper's choice).
    #[arg(long, value_enum)]
    permutation: Option<PermutationKind>,
    /// Image families: scales (squeeze, steps, factor out half the channels).
    #[arg(long)]
    levels: Option<usize>,
    /// Image families: additive instead of affine coupling.
    #[arg(long)]
    additive: Option<bool>,
    /// Glow: LU-parameterised 1×1 convolutions (false: the plain matrix).
    #[arg(long)]
    lu: Option<bool>,
    /// Image families: learn the factored-out channels' Gaussian from the remaining half.
    #[arg(long)]
    learned_prior: Option<bool>,
    /// MADE/MAF/IAF: a new input order per minibatch.
    #[arg(long)]
    order_agnostic: Option<bool>,
    /// MADE/MAF/IAF: new hidden degrees per minibatch.
    #[arg(long)]
    connectivity_agnostic: Option<bool>,
    /// Mask sets cycled by agnostic training (0: fresh every minibatch).
    #[arg(long)]
    masks: Option<usize>,
    /// Evaluate as the average density over this many mask sets.
    #[arg(long)]
    ensemble: Option<usize>,
    /// A trained run folder to distil (e.g. a MAF into --family iaf): minimise the reverse KL
    /// on this flow's samples instead of the NLL of the data.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Minibatch size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Decoupled weight decay (AdamW); 0 for plain Adam.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Keep a moving average of the weights with this decay (e.g. 0.995) and validate and
    /// export the average; 0: off.
    #[arg(long)]
    average_decay: Option<f64>,
    /// Validation passes without improvement before stopping (0: never).
    #[arg(long)]
    patience: Option<u64>,
    /// Steps between validation passes.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Steps between checkpoints.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// CSV columns to leave out, comma-separated.
    #[arg(long, value_delimiter = ',')]
    drop_columns: Option<Vec<String>>,
    /// Context columns for a conditional flow p(x | context), comma-separated: `name`,
    /// `name:numeric` or `name:categorical` (built-in tables offer their label too:
    /// `quality` for wine, `label` for digits/mnist/fashion_mnist).
    #[arg(long, value_delimiter = ',')]
    context: Option<Vec<String>>,
    /// made/maf/iaf: the per-feature transform (affine, or spline: the autoregressive
    /// neural spline flow); glow/realnvp_image: the couplings' map.
    #[arg(long, value_enum)]
    transform: Option<flowtrain::config::TransformKind>,
    /// Spline flows (nsf, --transform spline): bins per rational-quadratic spline.
    #[arg(long)]
    bins: Option<usize>,
    /// Spline flows (nsf): the splines act on [-B, B] of the standardised data, the
    /// identity outside.
    #[arg(long)]
    tail_bound: Option<f64>,
    /// Conditional flows: units of a learned embedding of the context (0: none).
    #[arg(long)]
    context_embedding: Option<usize>,
    /// Dequantise integer-valued columns (training only).
    #[arg(long, value_enum)]
    dequantize: Option<Dequantize>,
    /// Ignore any checkpoint in --out and start over.
    #[arg(long)]
    fresh: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Threads for training (default, or 0: image flows time their first steps on 1 thread
    /// and on all the cores and keep the faster; rows flows, whose small tensors gain nothing
    /// from a second thread, use 1). RAYON_NUM_THREADS, if set, gives it too.
    #[arg(long, env = "FLOWTRAIN_THREADS")]
    threads: Option<usize>,
}

#[derive(Args)]
struct EvalArgs {
    /// Package folder.
    #[arg(long)]
    model: PathBuf,
    /// A dataset name (its test split, as split in training) or a .csv/.npy file (all rows).
    #[arg(long)]
    data: Option<String>,
}

#[derive(Args)]
struct SampleArgs {
    /// Package folder.
    #[arg(long)]
    model: PathBuf,
    /// Number of samples.
    #[arg(short = 'n', long, default_value_t = 1000)]
    num_samples: usize,
    /// Standard deviation multiplier of the base distribution.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Seed (default: fresh entropy, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// A conditional model's context for every sample: `name=value`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    context: Vec<String>,
    /// A categorical context column: draw -n samples for each of its categories (the same
    /// latents for each), one row of the PNG grid per category.
    #[arg(long)]
    rows_by: Option<String>,
    /// Output: .csv (a header of feature names) or .png (a scatter plot of 2-D models, a grid
    /// of image samples).
    #[arg(long)]
    out: PathBuf,
}

fn config_for(a: &TrainArgs) -> Result<Config> {
    let mut c = match &a.config {
        Some(p) => Config::from_toml_file(p)?,
        None => Config::default(),
    };
    if let Some(preset) = a.preset {
        if let Some(d) = &a.data {
            c.data.dataset = d.clone();
        }
        let drop = a
            .drop_columns
            .clone()
            .unwrap_or(c.data.drop_columns.clone());
        let rows = data::read_table(&c.data.dataset, Columns::Drop(&drop))
            .map(|t| t.rows())
            .unwrap_or(0);
        preset.apply(&mut c, rows);
    }
    macro_rules! set {
        ($($field:expr => $value:expr),* $(,)?) => {$(if let Some(v) = $value.clone() { $field = v; })*};
    }
    set!(
        c.model.family => a.family, c.data.dataset => a.data, c.train.steps => a.steps,
        c.train.seed => a.seed, c.model.layers => a.layers, c.model.hidden => a.hidden,
        c.model.hidden_layers => a.hidden_layers, c.model.activation => a.activation,
        c.model.batch_norm => a.batch_norm, c.data.power_transform => a.power_transform, c.model.mask => a.mask, c.model.permutation => a.permutation,
        c.train.batch_size => a.batch_size, c.train.lr => a.lr, c.train.weight_decay => a.weight_decay,
        c.train.average_decay => a.average_decay, c.train.patience => a.patience,
        c.train.eval_every => a.eval_every, c.train.checkpoint_every => a.checkpoint_every,
        c.data.drop_columns => a.drop_columns, c.data.dequantize => a.dequantize,
        c.model.order_agnostic => a.order_agnostic, c.model.masks => a.masks,
        c.model.connectivity_agnostic => a.connectivity_agnostic, c.model.ensemble => a.ensemble,
        c.model.levels => a.levels, c.model.additive => a.additive, c.model.lu => a.lu,
        c.model.learned_prior => a.learned_prior, c.data.context => a.context,
        c.model.context_embedding => a.context_embedding, c.model.bins => a.bins,
        c.model.tail_bound => a.tail_bound, c.model.transform => a.transform,
    );
    if let Some(t) = &a.teacher {
        c.train.teacher = Some(t.display().to_string());
    }
    if a.split_seed.is_some() {
        c.data.split_seed = a.split_seed;
    }
    if a.data.is_none() && a.config.is_none() {
        bail!("no dataset: pass --data (a built-in name or a .csv/.npy path)");
    }
    c.validate()?;
    Ok(c)
}

fn train(a: TrainArgs) -> Result<()> {
    let config = config_for(&a)?;
    // Default name: the output folder's, or its parent's when the folder is a repository
    // version (`models/wine/3` → "wine").
    let name = a.name.clone().unwrap_or_else(|| {
        let leaf = a.out.file_name().and_then(|n| n.to_str()).unwrap_or("flow");
        let parent = a
            .out
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str());
        match (leaf.parse::<u64>(), parent) {
            (Ok(_), Some(p)) => p.to_string(),
            _ => leaf.to_string(),
        }
    });
    if !a.fresh && flowtrain::checkpoint::exists(&a.out) {
        eprintln!("resuming from the checkpoint in {}", a.out.display());
    }
    let s = flowtrain::pipeline::train_and_export(&config, &a.out, &name, !a.quiet, a.fresh)?;
    let m = &s.manifest.metrics;
    let o = &s.outcome;
    println!(
        "model        {} ({}, {} parameters)",
        name,
        config.model.family.as_str(),
        s.parameters
    );
    println!(
        "data         {} ({})",
        s.manifest.training.dataset,
        match s.manifest.event_shape.as_slice() {
            [d] => format!("{d} features"),
            shape => format!(
                "{} images",
                shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("×")
            ),
        }
    );
    println!(
        "steps        {} (best at {}{}), {:.1} steps/s (median step {:.2} ms)",
        o.steps,
        o.best_step,
        if o.stopped_early {
            ", stopped early"
        } else {
            ""
        },
        1.0 / o.median_step_seconds,
        o.median_step_seconds * 1e3
    );
    if let Some(kl) = s.reverse_kl {
        println!("reverse KL   {kl:.4} nats (validation draws, flow ‖ teacher)");
    }
    println!(
        "val NLL      {:.4} nats/example",
        m.validation_nll.unwrap_or(f64::NAN)
    );
    println!(
        "test NLL     {:.4} nats/example",
        m.test_nll.unwrap_or(f64::NAN)
    );
    if let Some(e) = s.ensemble_test_nll {
        println!(
            "ensemble NLL {e:.4} nats/example (test, {} mask sets)",
            config.model.ensemble
        );
    }
    for g in &s.test_nll_by_context {
        println!(
            "  given {:<12} {:.4} nats/example ({} test rows)",
            g.context, g.nll, g.rows
        );
    }
    if let Some(b) = m.test_bits_per_dim {
        println!("test bits/dim {b:.4}");
    }
    if o.nan_skips > 0 {
        println!("skipped      {} non-finite steps", o.nan_skips);
    }
    println!("package      {}", a.out.display());
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let mut runner = PackageRunner::open(&a.model)?;
    let m = runner.package.manifest.clone();
    let config: Config = serde_json::from_value(m.training.config.clone())
        .context("the manifest's training.config is not a flowtrain configuration")?;
    let dataset = a
        .data
        .clone()
        .unwrap_or_else(|| config.data.dataset.clone());
    let builtin = toy::TOY.contains(&dataset.as_str()) || data::BUILTIN.contains(&dataset.as_str());
    let (table, what) = if builtin {
        let mut dc = config.data.clone();
        dc.dataset = dataset.clone();
        let splits = data::load(&dc, config.split_seed())?;
        (splits.test, format!("{dataset} test split"))
    } else {
        (
            read_package_rows(&dataset, &m)?,
            format!("{dataset} (all rows)"),
        )
    };
    if table.dim != runner.package.event_size() {
        bail!(
            "{what} has {} columns but the model takes {}",
            table.dim,
            runner.package.event_size()
        );
    }
    let nll = |values: &[f32], runner: &mut PackageRunner| -> Result<f64> {
        let lp = runner.log_prob(values, &table.context)?;
        Ok(-lp.iter().map(|&v| v as f64).sum::<f64>() / table.rows() as f64)
    };
    println!(
        "model        {} ({}, {} features)",
        a.model.display(),
        m.family,
        table.dim
    );
    println!("data         {what}, {} rows", table.rows());
    println!(
        "NLL          {:.4} nats/example (log_prob as served)",
        nll(&table.values, &mut runner)?
    );
    let steps: Vec<f32> = table
        .names
        .iter()
        .map(|n| {
            let q = m.domain.quantized.iter().find(|q| &q.feature == n);
            q.map_or(0.0, |q| q.step as f32)
        })
        .collect();
    if steps.iter().any(|&q| q > 0.0) {
        let mut values = table.values.clone();
        let mut noise = rand_chacha::ChaCha8Rng::seed_from_u64(flowtrain::seeds::TEST_NOISE);
        data::dequantize(&mut values, table.dim, &steps, &mut noise);
        let dq = nll(&values, &mut runner)?;
        println!("NLL          {dq:.4} nats/example (dequantised, as in training)");
        if steps.iter().all(|&q| q == 1.0) {
            println!(
                "bits/dim     {:.4}",
                dq / (table.dim as f64 * std::f64::consts::LN_2)
            );
        }
    }
    Ok(())
}

/// The rows of a `.csv` (the package's feature columns, and its context columns for a
/// conditional package) or `.npy` file (all columns) for a package.
fn read_package_rows(path: &str, m: &flowpack::Manifest) -> Result<data::Table> {
    let features = m.domain.features.clone().unwrap_or_default();
    if !path.ends_with(".csv") {
        if m.context.is_some() {
            bail!("{path}: a conditional model's rows come from a CSV file naming its context columns");
        }
        return data::read_table(path, Columns::Drop(&[]));
    }
    let table = data::read_table(path, Columns::Select(&features))?;
    let Some(spec) = &m.context else {
        return Ok(table);
    };
    let names: Vec<String> = spec.columns.iter().map(|c| c.name.clone()).collect();
    let cells = data::read_csv_cells(Path::new(path), &names)?;
    let values = data::context::graph_values(spec, &cells).with_context(|| path.to_string())?;
    table.with_context(spec.width(), values)
}

fn splits(a: SplitsArgs) -> Result<()> {
    let mut config = Config::default();
    config.data.dataset = a.data.clone();
    let splits = data::load(&config.data, a.seed)?;
    let steps = data::quantization_steps(&config.data, &splits.train);
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let write = |name: &str, table: &data::Table, noise: Option<u64>| -> Result<()> {
        let mut values = table.values.clone();
        if let Some(seed) = noise {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            data::dequantize(&mut values, table.dim, &steps, &mut rng);
        }
        let array = ndarray::Array2::from_shape_vec((table.rows(), table.dim), values)?;
        let path = a.out.join(name);
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        ndarray_npy::WriteNpyExt::write_npy(&array, file)?;
        Ok(())
    };
    write("train.npy", &splits.train, None)?;
    write(
        "val.npy",
        &splits.val,
        Some(flowtrain::seeds::validation(a.seed)),
    )?;
    write("test.npy", &splits.test, Some(flowtrain::seeds::TEST_NOISE))?;
    let info = serde_json::json!({
        "source": splits.source,
        "image": splits.image,
        "features": splits.train.names,
        "rows": [splits.train.rows(), splits.val.rows(), splits.test.rows()],
        "dequantization_steps": steps,
        "range": flowpack::image::value_range(&splits.train.values),
    });
    std::fs::write(
        a.out.join("splits.json"),
        serde_json::to_string_pretty(&info)? + "\n",
    )?;
    println!(
        "{}: {} / {} / {} rows -> {}",
        splits.source,
        splits.train.rows(),
        splits.val.rows(),
        splits.test.rows(),
        a.out.display()
    );
    Ok(())
}

fn calibrate(a: CalibrateArgs) -> Result<()> {
    let package = flowpack::Package::open(&a.model)?;
    let path = a.data.display().to_string();
    let table = read_package_rows(&path, &package.manifest)?;
    if table.dim != package.event_size() {
        bail!(
            "{path} has {} columns but the model takes {}",
            table.dim,
            package.event_size()
        );
    }
    let source = a
        .source
        .unwrap_or_else(|| format!("{} rows of {path}", table.rows()));
    let manifest = flowtrain::export::calibrate(&a.model, &table.values, &table.context, &source)?;
    let r = manifest.reference.as_ref().expect("just written");
    println!(
        "reference    {} rows ({}), {}",
        r.count,
        if r.exact {
            "every log-density stored"
        } else {
            "a geometric sketch"
        },
        r.source
    );
    println!(
        "resolution   tail probabilities from {:.2e} up",
        1.0 / (r.count as f64 + 1.0)
    );
    println!("package      {}", a.model.display());
    Ok(())
}

fn sample(a: SampleArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!(
            "--temperature must be a finite number ≥ 0, got {}",
            a.temperature
        );
    }
    if a.num_samples == 0 {
        bail!("-n must be at least 1");
    }
    let ext = a
        .out
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_string();
    if !["csv", "png"].contains(&ext.as_str()) {
        bail!("--out must end in .csv or .png, got {}", a.out.display());
    }
    if a.rows_by.is_some() && ext != "png" {
        bail!("--rows-by draws a PNG grid, one row per category; for a CSV, sample each context with --context");
    }
    let mut runner = PackageRunner::open(&a.model)?;
    let dim = runner.package.event_size();
    let seed = a.seed.unwrap_or_else(rand::random);
    let z = latent_noise(a.num_samples, dim, a.temperature, seed);
    let m = runner.package.manifest.clone();
    // One group of samples per context: the given one, or each category of --rows-by.
    let groups: Vec<Vec<String>> = match &a.rows_by {
        None => vec![a.context.clone()],
        Some(column) => {
            let categories = match m.context.as_ref().and_then(|c| c.column(column)) {
                Some((_, c)) => match &c.kind {
                    flowpack::ContextKind::Categorical { categories } => categories.clone(),
                    flowpack::ContextKind::Numeric { .. } => {
                        bail!("--rows-by {column}: a numeric column has no categories")
                    }
                },
                None => bail!("--rows-by: the model has no context column {column:?}"),
            };
            categories
                .iter()
                .map(|k| {
                    let mut pairs = a.context.clone();
                    pairs.push(format!("{column}={k}"));
                    pairs
                })
                .collect()
        }
    };
    let mut x = Vec::with_capacity(groups.len() * z.len());
    for pairs in &groups {
        let context = sample_context(pairs, &m)?;
        x.extend(runner.decode(&z, &context.repeat(a.num_samples))?);
    }
    let names = m
        .domain
        .features
        .clone()
        .unwrap_or_else(|| (0..dim).map(|i| format!("x{i}")).collect());
    if ext == "png" && m.event_shape.len() == 3 {
        let columns = a.rows_by.as_ref().map(|_| a.num_samples);
        let png = flowpack::image::grid_png(&x, &m.event_shape, m.domain.pixel_range, columns)
            .map_err(|e| anyhow::anyhow!("cannot draw the samples: {e}"))?;
        std::fs::write(&a.out, png).with_context(|| format!("cannot write {}", a.out.display()))?;
    } else {
        write_samples(&a.out, &ext, &names, &x, dim)?;
    }
    println!(
        "wrote {} samples (seed {seed}, temperature {}) to {}",
        x.len() / dim,
        a.temperature,
        a.out.display()
    );
    Ok(())
}

/// The raw context row of `--context name=value,...` for a conditional package (every
/// column named once), or nothing for an unconditional one.
fn sample_context(pairs: &[String], m: &flowpack::Manifest) -> Result<Vec<f32>> {
    let Some(spec) = &m.context else {
        if !pairs.is_empty() {
            bail!("--context: this model is unconditional");
        }
        return Ok(Vec::new());
    };
    let mut cells = vec![None; spec.width()];
    for p in pairs {
        let Some((name, value)) = p.split_once('=') else {
            bail!("--context {p:?}: write name=value");
        };
        let Some((j, _)) = spec.column(name) else {
            bail!("--context: the model has no context column {name:?}");
        };
        cells[j] = Some(vec![value.to_string()]);
    }
    let cells: Vec<Vec<String>> = cells
        .into_iter()
        .zip(&spec.columns)
        .map(|(c, col)| {
            c.ok_or_else(|| {
                anyhow::anyhow!(
                    "--context: this model is conditional; give {}=... (every context column: {})",
                    col.name,
                    spec.columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
        .collect::<Result<_>>()?;
    data::context::graph_values(spec, &cells).context("--context")
}

fn write_samples(out: &Path, ext: &str, names: &[String], x: &[f32], dim: usize) -> Result<()> {
    if ext == "png" {
        if dim != 2 {
            bail!("PNG output draws a scatter plot of 2-D models or a grid of image samples; this model has {dim} features, use .csv");
        }
        let title = format!("{} samples", x.len() / dim);
        return flowtrain::plot::scatter(x, &title, out);
    }
    let mut w =
        csv::Writer::from_path(out).with_context(|| format!("cannot write {}", out.display()))?;
    w.write_record(names)?;
    for row in x.chunks(dim) {
        w.write_record(row.iter().map(|v| v.to_string()))?;
    }
    w.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's message without its usage block.
            let text = e.render().to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("Usage:")
                        && !l.starts_with("For more information")
                })
                .collect();
            eprintln!("{}", lines.join(" "));
            return ExitCode::from(2);
        }
    };
    // Still one thread here: the environment can be set.
    flowtrain::threads::init(match &cli.command {
        Command::Train(a) => a.threads,
        _ => None,
    });
    let result = match cli.command {
        Command::Train(a) => train(*a),
        Command::Eval(a) => eval(a),
        Command::Sample(a) => sample(a),
        Command::Calibrate(a) => calibrate(a),
        Command::Splits(a) => splits(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
