//! Data: built-in and file tables, seeded splits, dequantisation and standardisation.
//!
//! Everything random here comes from seeded ChaCha streams, so a split or a batch is a
//! pure function of the seed.

use std::path::Path;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{DataConfig, Dequantize};
use crate::flows::Standardization;

mod builtin;
mod files;

pub use files::Columns;
pub mod toy;

/// A row-major table of finite f32 values with named columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Column names.
    pub names: Vec<String>,
    /// Columns per row.
    pub dim: usize,
    /// `rows × dim` values, row-major.
    pub values: Vec<f32>,
}

impl Table {
    /// A table whose values fill whole rows.
    pub fn new(names: Vec<String>, values: Vec<f32>) -> Result<Table> {
        let dim = names.len();
        if dim == 0 || values.len() % dim != 0 {
            bail!("a table needs at least one column and whole rows");
        }
        if values.is_empty() {
            bail!("the table has no rows");
        }
        Ok(Table { names, dim, values })
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
        let mut values = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            values.extend_from_slice(self.row(i));
        }
        Table {
            names: self.names.clone(),
            dim: self.dim,
            values,
        }
    }

    /// Columns whose values are all integers.
    pub fn integer_columns(&self) -> Vec<bool> {
        (0..self.dim)
            .map(|c| (0..self.rows()).all(|r| self.values[r * self.dim + c].fract() == 0.0))
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
}

/// Reads a whole table: a built-in name or a `.csv`/`.npy` path.
pub fn read_table(dataset: &str, columns: Columns) -> Result<Table> {
    if let Some(t) = builtin::load(dataset)? {
        return Ok(t);
    }
    let path = Path::new(dataset);
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => files::read_csv(path, columns),
        Some("npy") => files::read_npy(path),
        _ if !path.exists() && (dataset.contains('/') || dataset.contains('.')) => {
            bail!("cannot read data file {dataset}: no such file")
        }
        _ => bail!(
            "unknown dataset {dataset:?}: use one of {}, wine, digits, or a path ending in .csv or .npy",
            toy::TOY.join(", ")
        ),
    }
}

/// Loads and splits the configured dataset. Toy densities are sampled afresh for each split;
/// tables are shuffled with `seed` and cut into validation, test and training rows.
pub fn load(cfg: &DataConfig, seed: u64) -> Result<Splits> {
    let name = cfg.dataset.as_str();
    if toy::TOY.contains(&name) {
        let names = vec!["x".to_string(), "y".to_string()];
        let n = cfg.toy_samples;
        let draw = |stream: u64, n: usize| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(stream);
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
        });
    }
    let table = read_table(name, Columns::Drop(&cfg.drop_columns))?;
    let n = table.rows();
    let n_val = (n as f64 * cfg.val_fraction).round() as usize;
    let n_test = (n as f64 * cfg.test_fraction).round() as usize;
    if n < 10 || n_val == 0 || n_test == 0 || n_val + n_test >= n {
        bail!("{name}: {n} rows are too few to split into training, validation and test sets");
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5_9117));
    Ok(Splits {
        source: name.to_string(),
        val: table.select(&idx[..n_val]),
        test: table.select(&idx[n_val..n_val + n_test]),
        train: table.select(&idx[n_val + n_test..]),
    })
}

/// Which columns get dequantisation noise, by the config and the training split.
pub fn dequantized_columns(cfg: &DataConfig, train: &Table) -> Vec<bool> {
    match cfg.dequantize {
        Dequantize::None => vec![false; train.dim],
        Dequantize::All => vec![true; train.dim],
        Dequantize::Auto => train.integer_columns(),
    }
}

/// Adds uniform noise on [-0.5, 0.5) to the marked columns of row-major `values`.
///
/// Training only: the model then spreads the mass of an integer k over [k - ½, k + ½), so
/// the exported graph, given k itself, returns the density at the centre of k's cell.
pub fn dequantize(values: &mut [f32], dim: usize, columns: &[bool], rng: &mut ChaCha8Rng) {
    if !columns.iter().any(|&c| c) {
        return;
    }
    for row in values.chunks_mut(dim) {
        for (v, &on) in row.iter_mut().zip(columns) {
            if on {
                *v += rng.random_range(-0.5f32..0.5);
            }
        }
    }
}

/// Per-feature mean and standard deviation of the training split; dequantised columns
/// add the noise's variance (1/12), and constant columns keep scale 1.
pub fn standardization(train: &Table, dequantized: &[bool]) -> Standardization {
    let n = train.rows() as f64;
    let (mut shift, mut scale) = (Vec::new(), Vec::new());
    for c in 0..train.dim {
        let col = (0..train.rows()).map(|r| train.values[r * train.dim + c] as f64);
        let mean = col.clone().sum::<f64>() / n;
        let mut var = col.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        if dequantized[c] {
            var += 1.0 / 12.0;
        }
        let std = var.sqrt();
        shift.push(mean as f32);
        scale.push(if std > 1e-6 { std as f32 } else { 1.0 });
    }
    Standardization { shift, scale }
}
