//! Tables from files: CSV (a header row, numeric cells) and NPY (a 2-D float array).

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::Table;

/// Which CSV columns to read.
pub enum Columns<'a> {
    /// Every column but these.
    Drop(&'a [String]),
    /// Exactly these, in this order.
    Select(&'a [String]),
}

impl Columns<'_> {
    /// The indices of `headers` to keep, in order; `source` names the table in errors.
    pub fn keep(&self, headers: &[String], source: &str) -> Result<Vec<usize>> {
        let (names, what) = match self {
            Columns::Drop(n) => (n, "--drop-columns names"),
            Columns::Select(n) => (n, "the model needs column"),
        };
        for d in names.iter() {
            if !headers.contains(d) {
                bail!(
                    "{source}: {what} {d:?}, which is not a column (columns: {})",
                    headers.join(", ")
                );
            }
        }
        let keep: Vec<usize> = match self {
            Columns::Drop(drop) => (0..headers.len())
                .filter(|&i| !drop.contains(&headers[i]))
                .collect(),
            Columns::Select(sel) => sel
                .iter()
                .map(|n| headers.iter().position(|h| h == n).expect("checked"))
                .collect(),
        };
        if keep.is_empty() {
            bail!("{source}: no columns left to model");
        }
        Ok(keep)
    }
}

/// A CSV reader past the header row (cells trimmed), and the header's names.
fn open_csv(path: &Path) -> Result<(csv::Reader<std::fs::File>, Vec<String>)> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .with_context(|| format!("cannot read data file {}", path.display()))?;
    let headers: Vec<String> = reader
        .headers()
        .with_context(|| format!("{}: cannot read the header row", path.display()))?
        .iter()
        .map(str::to_string)
        .collect();
    Ok((reader, headers))
}

/// Reads a CSV file with a header row; every kept cell must be a finite number.
pub fn read_csv(path: &Path, columns: Columns) -> Result<Table> {
    let (mut reader, headers) = open_csv(path)?;
    let keep = columns.keep(&headers, &path.display().to_string())?;
    let mut values = Vec::new();
    for (r, record) in reader.records().enumerate() {
        let line = r + 2;
        let record =
            record.with_context(|| format!("{}: line {line} is not valid CSV", path.display()))?;
        if record.len() != headers.len() {
            bail!(
                "{}: line {line} has {} cells, the header has {}",
                path.display(),
                record.len(),
                headers.len()
            );
        }
        for &c in &keep {
            let cell = &record[c];
            let v: f64 = cell.parse().map_err(|_| {
                anyhow::anyhow!(
                    "{}: line {line}, column {:?}: {cell:?} is not a number (drop the column with --drop-columns)",
                    path.display(),
                    headers[c]
                )
            })?;
            if !v.is_finite() || v.abs() > f32::MAX as f64 {
                bail!("{}: line {line}, column {:?}: {cell} is not a finite value; clean the data first", path.display(), headers[c]);
            }
            values.push(v as f32);
        }
    }
    let names: Vec<String> = keep.iter().map(|&c| headers[c].clone()).collect();
    Table::new(names, values).with_context(|| format!("{}", path.display()))
}

/// The cells of the columns `names` of a CSV file with a header row, as text (one vector
/// per column, in the order of `names`).
pub fn read_csv_cells(path: &Path, names: &[String]) -> Result<Vec<Vec<String>>> {
    let (mut reader, headers) = open_csv(path)?;
    let keep = Columns::Select(names).keep(&headers, &path.display().to_string())?;
    let mut out = vec![Vec::new(); keep.len()];
    for (r, record) in reader.records().enumerate() {
        let record = record
            .with_context(|| format!("{}: line {} is not valid CSV", path.display(), r + 2))?;
        for (col, &c) in out.iter_mut().zip(&keep) {
            col.push(record.get(c).unwrap_or("").to_string());
        }
    }
    Ok(out)
}

/// Reads a 2-D `.npy` array of float32 or float64 (rows are examples).
pub fn read_npy(path: &Path) -> Result<Table> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read data file {}", path.display()))?;
    let arr: ndarray::Array2<f64> = match ndarray_npy::ReadNpyExt::read_npy(&file) {
        Ok(a) => a,
        Err(_) => {
            let file = std::fs::File::open(path)?;
            let a: ndarray::Array2<f32> =
                ndarray_npy::ReadNpyExt::read_npy(&file).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: not a 2-D float32/float64 .npy array: {e}",
                        path.display()
                    )
                })?;
            a.mapv(f64::from)
        }
    };
    let (_, d) = arr.dim();
    let mut values = Vec::with_capacity(arr.len());
    for ((r, c), v) in arr.indexed_iter() {
        if !v.is_finite() || v.abs() > f32::MAX as f64 {
            bail!(
                "{}: row {r}, column {c}: {v} is not a finite value; clean the data first",
                path.display()
            );
        }
        values.push(*v as f32);
    }
    Table::new((0..d).map(|c| format!("x{c}")).collect(), values)
        .with_context(|| format!("{}", path.display()))
}
