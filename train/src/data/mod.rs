//! Data: built-in and file tables, seeded splits, dequantisation and standardisation.
//!
//! Everything random here comes from seeded ChaCha streams, so a split or a batch is a
//! pure function of the seed.

use std::path::Path;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use flowpack::ContextSpec;

use crate::bijectors::{yeo_johnson, YeoJohnson};
use crate::config::{DataConfig, Dequantize};
use crate::flows::{PowerTransform, Standardization};

mod builtin;
pub mod context;
mod files;
pub mod images;

pub use context::ContextRequest;
pub use files::{read_csv_cells, Columns};
pub mod toy;

/// A row-major table of finite f32 values with named columns, and — for conditional
/// flows — each row's context beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Column names.
    pub names: Vec<String>,
    /// Columns per row.
    pub dim: usize,
    /// `rows × dim` values, row-major.
    pub values: Vec<f32>,
    /// Context values per row (0: no context).
    pub context_dim: usize,
    /// `rows × context_dim` raw context values (what the graphs' `context` input takes),
    /// row-major.
    pub context: Vec<f32>,
}

impl Table {
    /// A table whose values fill whole rows.
    pub fn new(names: Vec<String>, values: Vec<f32>) -> Result<Table> {
        let dim = names.len();
        if dim == 0 || !values.len().is_multiple_of(dim) {
            bail!("a table needs at least one column and whole rows");
        }
        if values.is_empty() {
            bail!("the table has no rows");
        }
        Ok(Table {
            names,
            dim,
            values,
            context_dim: 0,
            context: Vec::new(),
        })
    }

    /// The table with `context` (`context_dim` raw values per row) beside its rows.
    pub fn with_context(mut self, context_dim: usize, context: Vec<f32>) -> Result<Table> {
        if context_dim == 0 || context.len() != self.rows() * context_dim {
            bail!(
                "{} context values are not {} rows of {context_dim}",
                context.len(),
                self.rows()
            );
        }
        self.context_dim = context_dim;
        self.context = context;
        Ok(self)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.values.len() / self.dim
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Table {
        Table {
            names: self.names.clone(),
            dim: self.dim,
            values: self.select_values(idx),
            context_dim: self.context_dim,
            context: self.select_context(idx),
        }
    }

    /// The context of the rows at `idx`, in that order (empty without a context).
    pub fn select_context(&self, idx: &[usize]) -> Vec<f32> {
        let w = self.context_dim;
        let mut out = Vec::with_capacity(idx.len() * w);
        for &i in idx {
            out.extend_from_slice(&self.context[i * w..(i + 1) * w]);
        }
        out
    }

    /// The values of the rows at `idx`, in that order (a training batch: no column names).
    pub fn select_values(&self, idx: &[usize]) -> Vec<f32> {
        let mut values = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            values.extend_from_slice(self.row(i));
        }
        values
    }

    /// Values of column `c`.
    pub fn column(&self, c: usize) -> impl Iterator<Item = f32> + Clone + '_ {
        self.values.iter().skip(c).step_by(self.dim).copied()
    }

    /// Per column, the grid step its values were recorded on, or 0 for continuous data.
    ///
    /// A column is quantized with step 10^-k (k from 0 to 5) when at least 99 % of its
    /// values are multiples of the step and values repeat (at most half are distinct): a
    /// count, a reading with two decimals. Such data has no density until dequantised.
    pub fn quantization_steps(&self) -> Vec<f32> {
        (0..self.dim)
            .map(|c| {
                let mut distinct: Vec<u32> = self.column(c).map(f32::to_bits).collect();
                distinct.sort_unstable();
                distinct.dedup();
                if distinct.len() * 2 > self.rows() {
                    return 0.0;
                }
                (0..=5)
                    .map(|k| 10f64.powi(-k))
                    .find(|&q| {
                        let on_grid = self
                            .column(c)
                            .filter(|&v| {
                                // A multiple of q up to f32 rounding of the recorded value.
                                let v = v as f64;
                                (v - q * (v / q).round()).abs()
                                    <= 4.0 * f32::EPSILON as f64 * v.abs().max(q)
                            })
                            .count();
                        on_grid * 100 >= self.rows() * 99
                    })
                    .map_or(0.0, |q| q as f32)
            })
            .collect()
    }
}

/// Training, validation and test tables.
#[derive(Debug, Clone)]
pub struct Splits {
    /// What was loaded.
    pub source: String,
    /// Training rows.
    pub train: Table,
    /// Validation rows (early stopping).
    pub val: Table,
    /// Test rows (reported metrics, calibration).
    pub test: Table,
    /// `[C, H, W]` when the rows are images (row-major pixels), for the image families.
    pub image: Option<[usize; 3]>,
    /// The context columns of a conditional flow (numeric statistics fitted on the
    /// training split); every table then carries each row's context.
    pub context: Option<ContextSpec>,
}

/// The built-in tables (besides the toy densities); mnist and fashion_mnist are fetched by
/// `make data`.
pub const BUILTIN: [&str; 4] = ["wine", "digits", "mnist", "fashion_mnist"];

/// The image shape of a built-in image dataset's rows (all its columns kept).
pub fn image_shape(dataset: &str) -> Option<[usize; 3]> {
    match dataset {
        "digits" => Some([1, 8, 8]),
        "mnist" | "fashion_mnist" => Some([1, 28, 28]),
        _ => None,
    }
}

/// Reads a whole table: a built-in name or a `.csv`/`.npy` path.
pub fn read_table(dataset: &str, columns: Columns) -> Result<Table> {
    if let Some(t) = builtin::load(dataset)? {
        let keep = columns.keep(&t.names, dataset)?;
        if keep.len() == t.dim {
            return Ok(t);
        }
        let names = keep.iter().map(|&c| t.names[c].clone()).collect();
        let values = (0..t.rows())
            .flat_map(|r| {
                let row = t.row(r);
                keep.iter().map(move |&c| row[c])
            })
            .collect();
        return Table::new(names, values);
    }
    let path = Path::new(dataset);
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => files::read_csv(path, columns),
        Some("npy") => files::read_npy(path),
        _ if !path.exists() && (dataset.contains('/') || dataset.contains('.')) => {
            bail!("cannot read data file {dataset}: no such file")
        }
        _ => bail!(
            "unknown dataset {dataset:?}: use one of {}, {}, or a path ending in .csv or .npy",
            toy::TOY.join(", "),
            BUILTIN.join(", ")
        ),
    }
}

/// The seeded order in which a table's rows are dealt into splits.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(crate::seeds::split(seed)));
    idx
}

/// Loads and splits the configured dataset. Toy densities are sampled afresh for each split;
/// tables are shuffled with `seed` and cut into validation, test and training rows.
pub fn load(cfg: &DataConfig, seed: u64) -> Result<Splits> {
    let mut splits = load_rows(cfg, seed)?;
    if let Some(spec) = &mut splits.context {
        context::fit_numeric(spec, &splits.train);
    }
    Ok(splits)
}

/// A built-in table or a CSV file with the requested context columns taken out of the
/// features and carried beside each row.
fn read_with_context(
    dataset: &str,
    drop_columns: &[String],
    requests: &[ContextRequest],
) -> Result<(Table, ContextSpec)> {
    // The features: every column but the dropped ones and the context's.
    let drop = |context_columns: &[String]| -> Vec<String> {
        let mut d = drop_columns.to_vec();
        d.extend(
            requests
                .iter()
                .filter(|r| context_columns.contains(&r.name))
                .map(|r| r.name.clone()),
        );
        d
    };
    let (table, cells) = if let Some(full) = builtin::load(dataset)? {
        let label = builtin::label(dataset)?;
        let mut cells = Vec::new();
        for r in requests {
            if let Some(c) = full.names.iter().position(|n| *n == r.name) {
                cells.push(context::Cells::Numbers(
                    full.column(c).map(f64::from).collect(),
                ));
            } else if let Some((_, values)) = label.as_ref().filter(|(n, _)| *n == r.name) {
                cells.push(context::Cells::Numbers(values.clone()));
            } else {
                bail!(
                    "{dataset}: --context names {:?}, which is neither its label ({}) nor a column",
                    r.name,
                    label.as_ref().map_or("none", |l| l.0)
                );
            }
        }
        // The label is not among the table's columns: of the context, drop only what is.
        (
            read_table(dataset, Columns::Drop(&drop(&full.names)))?,
            cells,
        )
    } else if Path::new(dataset).extension().is_some_and(|e| e == "csv") {
        let names: Vec<String> = requests.iter().map(|r| r.name.clone()).collect();
        let cells = files::read_csv_cells(Path::new(dataset), &names)?;
        (
            read_table(dataset, Columns::Drop(&drop(&names)))?,
            cells.into_iter().map(context::Cells::from_text).collect(),
        )
    } else {
        bail!("{dataset}: context columns come from a built-in table or a CSV file with a header");
    };
    let (spec, values) = context::build(requests, cells)?;
    let table = table.with_context(spec.width(), values)?;
    Ok((table, spec))
}

fn load_rows(cfg: &DataConfig, seed: u64) -> Result<Splits> {
    let name = cfg.dataset.as_str();
    let requests = ContextRequest::parse_all(&cfg.context)?;
    if toy::TOY.contains(&name) && !requests.is_empty() {
        bail!("{name} is a toy density without context columns; conditional flows need a table");
    }
    if toy::TOY.contains(&name) {
        let names = vec!["x".to_string(), "y".to_string()];
        let n = cfg.toy_samples;
        let draw = |stream: u64, n: usize| {
            let mut rng = crate::seeds::toy_split(seed, stream);
            Table::new(
                names.clone(),
                toy::sample(name, n, &mut rng).expect("toy name checked"),
            )
        };
        return Ok(Splits {
            source: name.to_string(),
            train: draw(1, n)?,
            val: draw(2, n / 5)?,
            test: draw(3, n / 5)?,
            image: None,
            context: None,
        });
    }
    let image = image_shape(name).filter(|_| cfg.drop_columns.is_empty());
    if name == "fashion_mnist" {
        // The official split: test is t10k; validation is a seeded part of the training set.
        let (mut train, mut test) = images::fashion_mnist()?;
        let mut spec = None;
        if !requests.is_empty() {
            if requests.len() != 1 || requests[0].name != "label" {
                bail!("fashion_mnist offers one context column, label");
            }
            let (train_labels, test_labels) = images::fashion_mnist_labels()?;
            let (s, train_c) =
                context::build(&requests, vec![context::Cells::Numbers(train_labels)])?;
            let (_, test_c) =
                context::build(&requests, vec![context::Cells::Numbers(test_labels)])?;
            train = train.with_context(1, train_c)?;
            test = test.with_context(1, test_c)?;
            spec = Some(s);
        }
        let n = train.rows();
        let n_val = ((n as f64 * cfg.val_fraction).round() as usize).max(1);
        let idx = shuffled(n, seed);
        return Ok(Splits {
            image,
            source: name.to_string(),
            val: train.select(&idx[..n_val]),
            train: train.select(&idx[n_val..]),
            test,
            context: spec,
        });
    }
    let (table, spec) = if requests.is_empty() {
        (read_table(name, Columns::Drop(&cfg.drop_columns))?, None)
    } else {
        let (t, s) = read_with_context(name, &cfg.drop_columns, &requests)?;
        (t, Some(s))
    };
    // A context taken from the pixels leaves no image.
    let image = image.filter(|s| s.iter().product::<usize>() == table.dim);
    let n = table.rows();
    let n_val = (n as f64 * cfg.val_fraction).round() as usize;
    let n_test = (n as f64 * cfg.test_fraction).round() as usize;
    if n < 10 || n_val == 0 || n_test == 0 || n_val + n_test >= n {
        bail!("{name}: {n} rows are too few to split into training, validation and test sets");
    }
    let idx = shuffled(n, seed);
    Ok(Splits {
        image,
        source: name.to_string(),
        val: table.select(&idx[..n_val]),
        test: table.select(&idx[n_val..n_val + n_test]),
        train: table.select(&idx[n_val + n_test..]),
        context: spec,
    })
}

/// The dequantisation step of each column (0: none), by the config and the training split.
pub fn quantization_steps(cfg: &DataConfig, train: &Table) -> Vec<f32> {
    match cfg.dequantize {
        Dequantize::None => vec![0.0; train.dim],
        Dequantize::Integer => vec![1.0; train.dim],
        Dequantize::Auto => train.quantization_steps(),
    }
}

/// Adds uniform noise on [-q/2, q/2) to each column of row-major `values`, q its step.
///
/// Training only: the model then spreads the mass of a grid value k over [k - q/2, k + q/2),
/// so the exported graph, given k itself, returns the density at the centre of k's cell.
pub fn dequantize(values: &mut [f32], dim: usize, steps: &[f32], rng: &mut ChaCha8Rng) {
    if steps.iter().all(|&q| q == 0.0) {
        return;
    }
    for row in values.chunks_mut(dim) {
        for (v, &q) in row.iter_mut().zip(steps) {
            if q > 0.0 {
                *v += q * rng.random_range(-0.5f32..0.5);
            }
        }
    }
}

/// Per-feature mean and standard deviation of the training split; dequantised columns
/// add the noise's variance (q²/12), and constant columns keep scale 1.
pub fn standardization(train: &Table, steps: &[f32]) -> Standardization {
    let n = train.rows() as f64;
    let (mut shift, mut scale) = (Vec::new(), Vec::new());
    for (c, &q) in steps.iter().enumerate().take(train.dim) {
        let col = (0..train.rows()).map(|r| train.values[r * train.dim + c] as f64);
        let mean = col.clone().sum::<f64>() / n;
        let mut var = col.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        var += (q as f64).powi(2) / 12.0;
        let std = var.sqrt();
        shift.push(mean as f32);
        scale.push(if std > 1e-6 { std as f32 } else { 1.0 });
    }
    Standardization {
        shift,
        scale,
        power: None,
    }
}

/// Fits a Yeo–Johnson λ per feature (maximum likelihood) to the standardised training split,
/// dequantised with noise from `rng` so that grid values are not point masses, and the
/// standardisation of the result; stores it in `std`.
pub fn fit_power_transform(
    std: &mut Standardization,
    train: &Table,
    steps: &[f32],
    rng: &mut ChaCha8Rng,
) {
    let dim = train.dim;
    let mut values = train.values.clone();
    dequantize(&mut values, dim, steps, rng);
    let (mut lambda, mut shift, mut scale) = (Vec::new(), Vec::new(), Vec::new());
    for c in 0..dim {
        let col: Vec<f64> = values
            .iter()
            .skip(c)
            .step_by(dim)
            .map(|&v| ((v - std.shift[c]) / std.scale[c]) as f64)
            .collect();
        let l = YeoJohnson::fit(&col) as f32;
        let z: Vec<f64> = col.iter().map(|&v| yeo_johnson(v, l as f64)).collect();
        let n = z.len() as f64;
        let mean = z.iter().sum::<f64>() / n;
        let sd = (z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        lambda.push(l);
        shift.push(mean as f32);
        scale.push(if sd > 1e-6 { sd as f32 } else { 1.0 });
    }
    std.power = Some(PowerTransform {
        lambda,
        shift,
        scale,
    });
}
